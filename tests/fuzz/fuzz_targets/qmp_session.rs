//! A QMP client connection: arbitrary bytes through the session's JSON streamer,
//! envelope checks, negotiation state and QAPI argument checks (everything before the
//! supervisor acts), as `bulkhead_actors::front::gate::replay`.
//!
//! Input: the first byte picks compact or pretty output (bit 7) and the size of the
//! reads (bits 0-6) the rest arrives in. Checks: no panic, the replies are the same
//! whatever the read sizes, and they are ASCII (the writer escapes everything else).
#![no_main]

use bulkhead_actors::front::gate::replay;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let pretty = first & 0x80 != 0;
    let read_size = usize::from(first & 0x7f).max(1);
    let whole = replay([rest], pretty);
    let split = replay(rest.chunks(read_size), pretty);
    assert_eq!(
        whole, split,
        "replies depend on how the bytes were split into reads"
    );
    assert!(whole.is_ascii(), "non-ASCII reply");
});
