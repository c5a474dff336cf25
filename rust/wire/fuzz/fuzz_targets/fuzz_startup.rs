//! Startup packets and the startup-phase framer: never a panic, never an allocation
//! driven by an unchecked length, and decode/encode agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden_wire::{read_startup, MessageFramer};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((packet, consumed))) = read_startup(data, 10_000) {
        assert!(consumed >= 8 && consumed <= data.len());
        let mut again = Vec::new();
        packet.encode(&mut again);
        let (decoded, n) = read_startup(&again, 10_000)
            .expect("re-encoded packet decodes")
            .expect("re-encoded packet is complete");
        assert_eq!(decoded, packet);
        assert_eq!(n, again.len());
    }
    let mut framer = MessageFramer::new(1 << 16);
    for chunk in data.chunks(3) {
        framer.extend(chunk);
        loop {
            match framer.next_frame() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert!(framer.pending().len() < (1 << 16) + 5);
});
