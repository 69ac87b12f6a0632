//! The frontend message readers on arbitrary bodies: never panic; what parses survives
//! re-encoding with the writers the proxy uses to forward rewritten messages.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rlsgate::protocol::frontend as fe;

fuzz_target!(|data: &[u8]| {
    let body = data;
    let _ = fe::query_text(body);
    let _ = fe::execute_portal(body);
    let _ = fe::function_call_oid(body);
    let _ = fe::password(body);
    let _ = fe::target(body, "Describe");
    let _ = fe::target(body, "Close");

    if let Ok(q) = fe::query_text(body) {
        let mut out = BytesMut::new();
        if fe::write_query(q, &mut out).is_ok() {
            assert_eq!(out[0], fe::QUERY);
            assert_eq!(fe::query_text(&out[5..]).unwrap(), q);
        }
    }
    if let Ok(p) = fe::parse(body) {
        let mut out = BytesMut::new();
        fe::write_parse(p.name, p.sql, p.param_types, &mut out).unwrap();
        assert_eq!(&out[5..], body, "Parse re-encodes verbatim");
        assert_eq!(fe::parse(&out[5..]).unwrap(), p);
        // the same under another name (what the proxy does for named statements)
        let mut out = BytesMut::new();
        fe::write_parse("rg_0123456789abcdef", p.sql, p.param_types, &mut out).unwrap();
        let again = fe::parse(&out[5..]).unwrap();
        assert_eq!((again.sql, again.param_types), (p.sql, p.param_types));
    }
    if let Ok(b) = fe::bind(body) {
        let mut out = BytesMut::new();
        fe::write_bind(b.portal, b.statement, b.rest, &mut out).unwrap();
        assert_eq!(&out[5..], body, "Bind re-encodes verbatim");
        let mut out = BytesMut::new();
        fe::write_bind(b.portal, "rg_0123456789abcdef", b.rest, &mut out).unwrap();
        let again = fe::bind(&out[5..]).unwrap();
        assert_eq!((again.portal, again.rest), (b.portal, b.rest));
    }
    for what in ["Describe", "Close"] {
        if let Ok((kind, name)) = fe::target(body, what) {
            let mut out = BytesMut::new();
            if what == "Describe" {
                fe::write_describe(kind, name, &mut out).unwrap();
            } else {
                fe::write_close(kind, name, &mut out).unwrap();
            }
            assert_eq!(&out[5..], body);
        }
    }
    if let Ok(portal) = fe::execute_portal(body) {
        assert!(body.len() >= portal.len() + 5);
    }
    if let Ok(sql) = std::str::from_utf8(body) {
        let mut out = BytesMut::new();
        if fe::write_simple_extended(sql, &mut out).is_ok() {
            // three frames: Parse, Bind, Execute
            let mut buf = out;
            let mut tags = Vec::new();
            while let Some(f) =
                rlsgate::protocol::frame::try_read_frame(&mut buf, usize::MAX).unwrap()
            {
                tags.push(f.tag);
                match f.tag {
                    fe::PARSE => assert_eq!(fe::parse(f.body()).unwrap().sql, sql),
                    fe::BIND => assert!(fe::bind(f.body()).is_ok()),
                    fe::EXECUTE => assert_eq!(fe::execute_portal(f.body()).unwrap(), ""),
                    t => panic!("unexpected frame {t}"),
                }
            }
            assert_eq!(tags, vec![fe::PARSE, fe::BIND, fe::EXECUTE]);
            assert!(buf.is_empty());
        }
    }
});
