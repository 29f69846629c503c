//! Command-line option values: keyval parsing (`a.b=c,x=y`, implied keys, help) and
//! the QAPI visitor that checks the tree against an option's type, in both flavours
//! (keyval trees of strings, and JSON for values starting with `{`).
//!
//! Input: a selector byte (implied key, type, JSON or keyval), then the option value as
//! UTF-8 (argv elements are strings by the time the parser sees them).
#![no_main]

use bulkhead_actors::dispatch::validate_type;
use bulkhead_qmp::json::JsonStreamer;
use bulkhead_qmp::keyval;
use libfuzzer_sys::fuzz_target;

const IMPLIED: [Option<&str>; 5] = [
    None,
    Some("driver"),
    Some("type"),
    Some("chardev"),
    Some("qom-type"),
];
const TYPES: [&str; 4] = [
    "BlockdevOptions",
    "BlockExportOptions",
    "NbdServerOptions",
    "ObjectOptions",
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let implied = IMPLIED[usize::from(sel & 7) % IMPLIED.len()];
    let type_name = TYPES[usize::from((sel >> 3) & 3)];
    if sel & 0x40 != 0 {
        // The JSON form of --blockdev/--export/--nbd-server: the first value, strictly.
        let mut streamer = JsonStreamer::new();
        let mut bytes = text.as_bytes().to_vec();
        // The option value ends like a line, so a trailing number or keyword completes.
        bytes.push(b'\n');
        if let Some(Ok(v)) = streamer.feed(&bytes).into_iter().next() {
            let _ = validate_type(type_name, &v, true);
        }
        return;
    }
    if sel & 0x80 != 0 {
        if let Ok((tree, _help)) = keyval::parse_with_help(text, implied) {
            assert!(tree.is_object(), "keyval tree is not an object: {tree}");
        }
        return;
    }
    if let Ok(tree) = keyval::parse(text, implied) {
        assert!(tree.is_object(), "keyval tree is not an object: {tree}");
        let _ = validate_type(type_name, &tree, false);
    }
});
