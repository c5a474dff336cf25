//! Arbitrary server bytes in arbitrary chunkings, with and without a row masker (an
//! arbitrary rewrite, or pgwarden's column masker), after simple and extended-protocol
//! statements: never a panic; without a masker every byte is forwarded exactly as
//! received.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden_wire::backend::RowDescription;
use pgwarden_wire::masker::DataRowMasker;
use pgwarden_wire::{
    ClientEvent, ColumnMasker, MaskStyle, MaskedColumn, SessionCodec, SessionConfig,
};

/// Wants every other result and reverses row bodies (an arbitrary rewrite).
struct Reverse {
    want: bool,
}

impl DataRowMasker for Reverse {
    fn describe(&mut self, description: &RowDescription<'_>) {
        self.want = description.len() % 2 == 1;
    }
    fn wants_rows(&mut self, _statement: Option<&str>) -> bool {
        self.want
    }
    fn mask_row(&mut self, row: &[u8], out: &mut Vec<u8>) -> bool {
        out.extend(row.iter().rev());
        row.len() % 3 != 0
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, data)) = data.split_first() else {
        return;
    };
    let mut codec = SessionCodec::new(SessionConfig {
        max_message_len: 1 << 20,
        record_statements: true,
        client_events: true,
        ..SessionConfig::default()
    });
    let masking = seed & 1 != 0;
    if masking && seed & 2 != 0 {
        // pgwarden's own masker: any column 1 or 2 of tables 0 and 1 (0 is the origin
        // of computed columns, so most arbitrary descriptions hit it).
        codec.set_masker(Some(Box::new(ColumnMasker::new((0..4).map(|i| {
            MaskedColumn {
                table_oid: i / 2,
                attnum: (i % 2 + 1) as i16,
                style: if i % 2 == 0 {
                    MaskStyle::Null
                } else {
                    MaskStyle::Replace(b"****".to_vec().into())
                },
                name: "t.c".into(),
            }
        })))));
    } else if masking {
        codec.set_masker(Some(Box::new(Reverse { want: true })));
    }
    // Queue some statements so server messages have something to match.
    let mut client = Vec::new();
    for sql in ["SELECT 1", "COPY t FROM STDIN"] {
        pgwarden_wire::frontend::FrontendMessage::Query(pgwarden_wire::frontend::Query { sql })
            .encode(&mut client);
    }
    // An extended-protocol execution nobody described: with a masker the codec sends a
    // Describe of the portal ahead of it, whose answer it keeps from the client.
    let bind = b"B\0\0\0\x0c\0\0\0\0\0\0\0\0";
    let execute = b"E\0\0\0\x09\0\0\0\0\0";
    let sync = b"S\0\0\0\x04";
    for m in [&bind[..], &execute[..], &sync[..]] {
        client.extend_from_slice(m);
    }
    codec.feed_client(&client).expect("valid client bytes");
    assert!(!codec
        .client_events()
        .iter()
        .any(|e| matches!(e, ClientEvent::Terminate { .. })));

    let mut forwarded = Vec::new();
    let mut pos = 0;
    let mut step = usize::from(seed >> 2) + 1;
    let mut ok = true;
    while pos < data.len() {
        let end = (pos + step).min(data.len());
        let chunk = &data[pos..end];
        match codec.feed_server(chunk) {
            Ok(fwd) => forwarded.extend_from_slice(fwd.select(chunk, codec.server_buffer())),
            Err(_) => {
                ok = false;
                break;
            }
        }
        pos = end;
        step = step * 13 % 97 + 1;
    }
    if ok && !masking {
        assert_eq!(forwarded, data);
    }
    let _ = codec.take_records();
});
