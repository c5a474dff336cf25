//! Every message decoder in both directions: never a panic, and re-encoding a decoded
//! message decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden_wire::backend::BackendMessage;
use pgwarden_wire::frontend::FrontendMessage;

fuzz_target!(|data: &[u8]| {
    let Some((&tag, body)) = data.split_first() else {
        return;
    };
    if let Ok(m) = FrontendMessage::decode(tag, body) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        assert_eq!(FrontendMessage::decode(buf[0], &buf[5..]).as_ref(), Ok(&m));
    }
    if let Ok(m) = BackendMessage::decode(tag, body) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        assert_eq!(BackendMessage::decode(buf[0], &buf[5..]).as_ref(), Ok(&m));
    }
});
