//! Arbitrary client bytes in arbitrary chunkings: never a panic, and what is forwarded
//! is always a prefix of what was received (messages are passed whole, in order).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden_wire::{SessionCodec, SessionConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, data)) = data.split_first() else {
        return;
    };
    let mut codec = SessionCodec::new(SessionConfig {
        max_message_len: 1 << 16,
        record_statements: seed & 1 != 0,
        client_events: seed & 2 != 0,
        max_param_bytes: 8,
        ..SessionConfig::default()
    });
    let mut forwarded = Vec::new();
    let mut pos = 0;
    let mut step = usize::from(seed >> 2) + 1;
    while pos < data.len() {
        let end = (pos + step).min(data.len());
        let chunk = &data[pos..end];
        match codec.feed_client(chunk) {
            Ok(fwd) => {
                let out = fwd.select(chunk, codec.client_buffer());
                let base = forwarded.len();
                for ev in codec.client_events() {
                    let (start, end) = match ev {
                        pgwarden_wire::ClientEvent::Query { start, end, .. }
                        | pgwarden_wire::ClientEvent::Parse { start, end, .. }
                        | pgwarden_wire::ClientEvent::Execute { start, end, .. }
                        | pgwarden_wire::ClientEvent::FunctionCall { start, end, .. }
                        | pgwarden_wire::ClientEvent::Terminate { start, end } => (*start, *end),
                    };
                    assert!(start < end && end <= out.len());
                    // Offsets index the forwarded bytes, which are the input's bytes.
                    assert_eq!(&out[start..end], &data[base + start..base + end]);
                }
                forwarded.extend_from_slice(out);
            }
            Err(_) => return,
        }
        pos = end;
        step = step * 7 % 61 + 1;
    }
    assert_eq!(&forwarded[..], &data[..forwarded.len()]);
    let _ = codec.take_records();
});
