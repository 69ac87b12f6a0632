//! `try_read_frame` / `peek_len` on arbitrary bytes with an arbitrary cap: never panics, and what
//! it consumes is exactly one well-formed frame as declared by its header.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rlsgate::protocol::ProtocolError;
use rlsgate::protocol::frame::{HEADER_LEN, peek_len, try_read_frame};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // cap from the first 3 bytes: 0 ..= 16 MiB, small values often
    let cap = (usize::from(data[0]) << 16 | usize::from(data[1]) << 8 | usize::from(data[2]))
        >> (data[0] & 15);
    let input = &data[3..];
    let mut buf = BytesMut::from(input);
    let mut offset = 0usize;
    loop {
        let before = buf.clone();
        let peeked = peek_len(&before);
        match try_read_frame(&mut buf, cap) {
            Ok(Some(f)) => {
                let declared = i32::from_be_bytes([before[1], before[2], before[3], before[4]]);
                assert!(declared >= 4);
                let total = declared as usize + 1;
                assert!(total <= cap, "frame of {total} bytes over the cap {cap}");
                assert_eq!(f.bytes.len(), total);
                assert_eq!(peeked, Some(total));
                assert_eq!(f.tag, before[0]);
                assert_eq!(&f.bytes[..], &before[..total]);
                assert_eq!(f.body(), &before[HEADER_LEN..total]);
                assert_eq!(&buf[..], &before[total..]);
                assert_eq!(&input[offset..offset + total], &f.bytes[..]);
                offset += total;
            }
            Ok(None) => {
                // nothing consumed; either no header yet or the frame is incomplete
                assert_eq!(&buf[..], &before[..]);
                if before.len() >= HEADER_LEN {
                    let total = peeked.expect("valid header when waiting for a body");
                    assert!(total > before.len() && total <= cap);
                }
                break;
            }
            Err(ProtocolError::BadLength(n)) => {
                assert!(n < 4);
                assert_eq!(peeked, None);
                break;
            }
            Err(ProtocolError::TooLarge { len, max }) => {
                assert_eq!(max, cap);
                assert!(len > cap);
                assert_eq!(peeked, Some(len));
                break;
            }
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
});
