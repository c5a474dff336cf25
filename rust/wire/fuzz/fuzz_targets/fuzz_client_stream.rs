//! Arbitrary client bytes in arbitrary chunkings: never a panic, and what is forwarded is
//! what was received, message by message and in order, except a Query or Parse whose text
//! is not UTF-8, which goes as the gateway's refusal in its place (same tag), and, with a
//! row masker, a Describe of the portal the gateway sends ahead of an Execute.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden_wire::{ColumnMasker, MaskStyle, MaskedColumn, SessionCodec, SessionConfig};

/// The text a refused Query or Parse is replaced with (rust/wire/src/refusal.rs).
const REFUSAL_MARK: &[u8] = b"pgwarden refused this statement";

/// The whole messages at the start of `bytes` (tag, length, body), and their total length.
fn messages(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 5 <= bytes.len() {
        let len = u32::from_be_bytes([
            bytes[pos + 1],
            bytes[pos + 2],
            bytes[pos + 3],
            bytes[pos + 4],
        ]) as usize;
        if len < 4 || pos + 1 + len > bytes.len() {
            break;
        }
        out.push(&bytes[pos..pos + 1 + len]);
        pos += 1 + len;
    }
    (out, pos)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

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
    let masking = seed & 4 != 0;
    if masking {
        codec.set_masker(Some(Box::new(ColumnMasker::new([MaskedColumn {
            table_oid: 1,
            attnum: 1,
            style: MaskStyle::Null,
            name: "s.t.c".into(),
        }]))));
    }
    let mut forwarded = Vec::new();
    let mut pos = 0;
    let mut step = usize::from(seed >> 2) + 1;
    while pos < data.len() {
        let end = (pos + step).min(data.len());
        let chunk = &data[pos..end];
        match codec.feed_client(chunk) {
            Ok(fwd) => {
                let out = fwd.select(chunk, codec.client_buffer());
                for ev in codec.client_events() {
                    let (start, end) = match ev {
                        pgwarden_wire::ClientEvent::Query { start, end, .. }
                        | pgwarden_wire::ClientEvent::Parse { start, end, .. }
                        | pgwarden_wire::ClientEvent::Execute { start, end, .. }
                        | pgwarden_wire::ClientEvent::FunctionCall { start, end, .. }
                        | pgwarden_wire::ClientEvent::Terminate { start, end } => (*start, *end),
                    };
                    // Offsets index the forwarded bytes, at one whole message.
                    assert!(start < end && end <= out.len());
                    assert_eq!(messages(&out[start..end]).1, end - start);
                }
                forwarded.extend_from_slice(out);
            }
            Err(_) => return,
        }
        pos = end;
        step = step * 7 % 61 + 1;
    }
    let (mut sent, sent_len) = messages(&forwarded);
    let (received, _) = messages(data);
    if masking {
        // The gateway's Describe of a portal sits right before an Execute of that portal.
        let mut kept = Vec::with_capacity(sent.len());
        let mut i = 0;
        while i < sent.len() {
            let (m, next) = (sent[i], sent.get(i + 1));
            if let Some(e) =
                next.filter(|e| e[0] == b'E' && m[0] == b'D' && m.get(5) == Some(&b'P'))
            {
                let portal = &m[6..m.len() - 1];
                let injected = e[5..].starts_with(portal) && e.get(5 + portal.len()) == Some(&0);
                let received_here = received.get(kept.len()) == Some(&m);
                if injected && !received_here {
                    i += 1;
                    continue;
                }
            }
            kept.push(m);
            i += 1;
        }
        sent = kept;
    }
    let mut received_len = 0;
    for (i, out) in sent.iter().enumerate() {
        let in_ = received
            .get(i)
            .expect("a forwarded message was received whole");
        if out != in_ {
            assert_eq!(out[0], in_[0]);
            assert!(
                matches!(out[0], b'Q' | b'P'),
                "only a Query or Parse is replaced"
            );
            assert!(contains(out, REFUSAL_MARK));
            assert!(std::str::from_utf8(&in_[5..]).is_err());
        }
        received_len += in_.len();
    }
    // A message forwarded in part (CopyData streams through) is a prefix of what came.
    let rest = &forwarded[sent_len..];
    assert_eq!(rest, &data[received_len..received_len + rest.len()]);
    let _ = codec.take_records();
});
