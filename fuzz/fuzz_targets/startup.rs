//! Startup packet parsing on arbitrary bytes: never panics; a parsed packet consumed exactly its
//! declared length, and a StartupMessage survives re-encoding.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rlsgate::protocol::startup::{MAX_STARTUP_LEN, StartupPacket, try_read_startup};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let before = buf.clone();
    match try_read_startup(&mut buf) {
        Ok(None) => {
            assert_eq!(&buf[..], &before[..]);
            if before.len() >= 4 {
                let declared = i32::from_be_bytes([before[0], before[1], before[2], before[3]]);
                assert!(declared as usize > before.len());
            }
        }
        Ok(Some(packet)) => {
            let declared =
                i32::from_be_bytes([before[0], before[1], before[2], before[3]]) as usize;
            assert!((8..=MAX_STARTUP_LEN).contains(&declared));
            assert_eq!(&buf[..], &before[declared..]);
            if let StartupPacket::Startup(m) = packet {
                assert_eq!(m.major, 3);
                // re-encode and parse again: same message
                let mut body = Vec::new();
                body.extend_from_slice(
                    &((i32::from(m.major) << 16) | i32::from(m.minor)).to_be_bytes(),
                );
                for (k, v) in &m.params {
                    body.extend_from_slice(k.as_bytes());
                    body.push(0);
                    body.extend_from_slice(v.as_bytes());
                    body.push(0);
                }
                body.push(0);
                let mut again = BytesMut::new();
                again.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
                again.extend_from_slice(&body);
                if again.len() <= MAX_STARTUP_LEN {
                    match try_read_startup(&mut again) {
                        Ok(Some(StartupPacket::Startup(m2))) => {
                            assert_eq!(m2.params, m.params);
                            assert_eq!((m2.major, m2.minor), (m.major, m.minor));
                        }
                        other => panic!("re-encoded startup message did not parse: {other:?}"),
                    }
                }
            }
        }
        Err(_) => {}
    }
});
