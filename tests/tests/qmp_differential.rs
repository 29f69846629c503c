//! Differential QMP tests: the same command line and the same scripted session against
//! qemu-storage-daemon 10.0.2 and against bulkhead, every reply and event compared byte for
//! byte after masking (timestamps, versions, temp dirs, auto node-name numbers).
//!
//! `BULKHEAD_DIFF_AGAINST=qsd` runs qsd against itself, which checks the scripts and the
//! harness; `BULKHEAD_DIFF_DUMP=<dir>` writes both transcripts. Steps are data: add one by
//! appending a `Step` to a script.

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::Duration;

use bulkhead_systests::loopdev::LoopDevice;
use bulkhead_systests::qmp::parse_line;
use bulkhead_systests::script::{HookContext, StepOutput, run_tool};
use bulkhead_systests::{HarnessError, Script, Step, differential};
use serde_json::Value;

/// Commands bulkhead implements for issue 2; `query-commands` must list at least these.
const IMPLEMENTED_COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "block_resize",
    "query-named-block-nodes",
    "query-block",
    "x-debug-query-block-graph",
];

/// Image files every run of the basic script gets in `$DIR`, all sparse.
fn make_images(dir: &Path) -> io::Result<()> {
    for (name, size) in [
        ("disk.img", 1 << 20),
        ("disk2.img", 2 << 20),
        ("ro.img", 1 << 20),
        ("cache.img", 1 << 20),
        ("grow.img", 1 << 20),
    ] {
        File::create(dir.join(name))?.set_len(size)?;
    }
    Ok(())
}

/// Parses the names out of a `query-commands` reply line.
fn command_names(output: &StepOutput) -> Result<Vec<String>, String> {
    let lines = output.monitor(0);
    let [line] = lines else {
        return Err(format!("expected one reply line, got {}", lines.len()));
    };
    if !line.ends_with(b"\r\n") {
        return Err("the reply does not end with \\r\\n".into());
    }
    let reply = parse_line(line).map_err(|e| e.to_string())?;
    if reply.get("id") != Some(&Value::String("cmds".into())) {
        return Err(format!("the reply does not echo id \"cmds\": {reply}"));
    }
    let Some(list) = reply.get("return").and_then(Value::as_array) else {
        return Err(format!("\"return\" is not a list: {reply}"));
    };
    let mut names = Vec::new();
    for entry in list {
        let Some(object) = entry.as_object() else {
            return Err(format!("entry {entry} is not an object"));
        };
        match (object.len(), object.get("name").and_then(Value::as_str)) {
            (1, Some(name)) => names.push(name.to_string()),
            _ => return Err(format!("entry {entry} is not exactly {{\"name\": str}}")),
        }
    }
    Ok(names)
}

/// query-commands is not compared byte for byte: bulkhead lists what it implements. It must
/// list every implemented command, only commands qsd has (or bulkhead's own, named
/// `x-bulkhead-*`), each once.
fn check_query_commands(reference: &StepOutput, tested: &StepOutput) -> Result<(), String> {
    let qsd = command_names(reference).map_err(|e| format!("qsd: {e}"))?;
    let ours = command_names(tested)?;
    let missing: Vec<&&str> = IMPLEMENTED_COMMANDS
        .iter()
        .filter(|c| !ours.iter().any(|o| o == *c))
        .collect();
    let unknown: Vec<&String> = ours
        .iter()
        .filter(|o| !qsd.contains(o) && !o.starts_with("x-bulkhead-"))
        .collect();
    let mut sorted = ours.clone();
    sorted.sort();
    sorted.dedup();
    if !missing.is_empty() || !unknown.is_empty() || sorted.len() != ours.len() {
        return Err(format!(
            "query-commands: missing implemented {missing:?}, not in qsd {unknown:?}, duplicates: {}",
            sorted.len() != ours.len()
        ));
    }
    Ok(())
}

/// The basic session: negotiation, framing, envelope, ids, argument errors, blockdev-add of
/// every issue-2 driver, queries, resize, del, quit.
fn basic_script(loop_device: Option<&LoopDevice>) -> Script {
    let mut steps = vec![
        // Negotiation mode.
        Step::line(r#"{"execute": "query-version", "id": 1}"#).note("command before qmp_capabilities"),
        Step::line(r#"{"execute": "query-version", "arguments": {"x": 1}, "id": "pre"}"#)
            .note("bad arguments are not checked before negotiation"),
        Step::line(r#"{"execute": "no-such-command", "id": "pre2"}"#)
            .note("unknown command before negotiation"),
        Step::line(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}, "id": "bad-enable"}"#)
            .note("bad capability name"),
        Step::line(r#"{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}, "id": 4}"#)
            .note("enable not a list"),
        Step::line(r#"{"execute": "qmp_capabilities", "arguments": {"foo": 1}, "id": 5}"#)
            .note("unexpected qmp_capabilities argument"),
        Step::line(r#"{"execute": "qmp_capabilities", "arguments": null, "id": 6}"#)
            .note("arguments null before negotiation"),
        Step::line(r#"{ "execute": }"#).note("JSON error before negotiation"),
        Step::line(r#"[1, 2, 3]"#).note("non-object before negotiation"),
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#).note("negotiation succeeds"),
        Step::line(r#"{"execute": "qmp_capabilities", "id": "again"}"#)
            .note("second qmp_capabilities"),
        Step::line(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}, "id": "again-bad"}"#)
            .note("second qmp_capabilities with bad arguments"),
        // Malformed JSON, each followed (via the sync) by a working request.
        Step::line(r#"{ "execute": }"#).note("missing value"),
        Step::line(r#"{"execute": foo}"#).note("invalid keyword"),
        Step::line(r#"{"execute": "query-version",}"#).note("trailing comma"),
        Step::line(r#"{"a" 1}"#).note("missing colon"),
        Step::line(r#"{1: 2}"#).note("key not a string"),
        Step::line(r#"{"execute": "query-version" "id": 7}"#).note("missing comma"),
        Step::line(r#"{"id": 1, "id": 2, "execute": "query-version"}"#).note("duplicate key"),
        Step::line(r#"{"execute": "query-\x"}"#).note("invalid escape in a string"),
        Step::line(r#"{"execute": "\ud800", "id": 8}"#).note("lone surrogate escape"),
        Step::line(r#"{"execute": "query-version", "id": 01}"#).note("number with leading zero"),
        Step::raw(b"\x01\n").note("control character"),
        Step::raw(b"\xff\n").note("byte 0xff"),
        Step::raw(b"{\"execute\": \"query-version\", \"id\": \"unterminated\n")
            .note("newline inside a string"),
        Step::raw(format!("{}{}\n", "[".repeat(1025), "]".repeat(1025)).as_bytes())
            .note("nesting deeper than 1024"),
        Step::line(r#"{"execute": "query-block", "id": "a"}{"execute": "query-block", "id": "b"}"#)
            .note("two objects on one line"),
        Step::raw(b"{\"execute\":\n \"query-block\",\n \"id\": \"multi\"}\n")
            .note("one object over three lines"),
        Step::raw(b"\n\n   \n\t\n").note("whitespace only"),
        Step::line(r#"{'execute': 'query-block', 'id': 'single-quoted'}"#)
            .note("single-quoted strings"),
        Step::line(r#"{"execute": "query-block", "id": "caf\u00e9 \ud83d\ude00 é"}"#)
            .note("non-ASCII id is echoed as \\u escapes"),
        // Non-object input and envelope errors.
        Step::line(r#"[1, 2, 3]"#).note("array"),
        Step::line(r#""hello""#).note("string"),
        Step::line("42").note("number"),
        Step::line("null").note("null"),
        Step::line("{}").note("empty object"),
        Step::line(r#"{"id": 9}"#).note("missing execute"),
        Step::line(r#"{"execute": 1, "id": 10}"#).note("execute not a string"),
        Step::line(r#"{"execute": "query-version", "arguments": [], "id": 11}"#)
            .note("arguments a list"),
        Step::line(r#"{"execute": "query-version", "arguments": null, "id": 12}"#)
            .note("arguments null"),
        Step::line(r#"{"execute": "query-version", "bogus": 1, "id": 13}"#)
            .note("unknown top-level member"),
        Step::line(r#"{"execute": "query-version", "exec-oob": "query-version", "id": 14}"#)
            .note("execute and exec-oob"),
        Step::line(r#"{"exec-oob": "query-version", "id": 15}"#)
            .note("exec-oob without oob negotiated"),
        Step::line(r#"{"execute": "no-such-command", "id": 16}"#).note("unknown command"),
        Step::line(r#"{"execute": "eject", "arguments": {"device": "x"}, "id": 17}"#)
            .note("qemu-system command qsd lacks"),
        // id echo.
        Step::line(r#"{"execute": "query-block", "id": {"any": ["json", 1, null, true]}}"#).note("id object"),
        Step::line(r#"{"execute": "query-block", "id": [1, "two", {}]}"#).note("id array"),
        Step::line(r#"{"execute": "query-block", "id": null}"#).note("id null"),
        Step::line(r#"{"execute": "query-block", "id": true}"#).note("id true"),
        Step::line(r#"{"execute": "query-block", "id": false}"#).note("id false"),
        Step::line(r#"{"execute": "query-block", "id": ""}"#).note("id empty string"),
        Step::line(r#"{"execute": "query-block", "id": -17}"#).note("id negative"),
        Step::line(r#"{"execute": "query-block", "id": 1.5e3}"#).note("id 1.5e3"),
        Step::line(r#"{"execute": "query-block", "id": 1.0}"#).note("id 1.0"),
        Step::line(r#"{"execute": "query-block", "id": 0.1}"#).note("id 0.1"),
        Step::line(r#"{"execute": "query-block", "id": -0}"#).note("id -0"),
        Step::line(r#"{"execute": "query-block", "id": 12345678901234567890}"#).note("id u64"),
        Step::line(r#"{"execute": "query-block", "id": -9223372036854775809}"#)
            .note("id below i64"),
        Step::line(r#"{"execute": "no-such-command", "id": {"nested": [1]}}"#)
            .note("id echoed on an error"),
        // query-version, query-commands.
        Step::line(r#"{"execute": "query-version", "id": "ver"}"#).note("query-version"),
        Step::line(r#"{"execute": "query-version", "arguments": {}, "id": "ver2"}"#)
            .note("query-version with empty arguments"),
        Step::line(r#"{"execute": "query-version", "arguments": {"x": 1}, "id": "ver3"}"#)
            .note("query-version with an argument"),
        Step::line(r#"{"execute": "query-commands", "id": "cmds"}"#)
            .check(check_query_commands)
            .note("query-commands (implemented set only)"),
        // Argument errors: blockdev-add.
        Step::line(r#"{"execute": "blockdev-add", "id": 20}"#).note("blockdev-add without arguments"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"node-name": "x"}, "id": 21}"#)
            .note("driver missing"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": 5, "node-name": "x"}, "id": 22}"#)
            .note("driver not a string"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "nosuchdrv", "node-name": "x"}, "id": 23}"#)
            .note("driver not in the enum"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "size": "big"}, "id": 24}"#)
            .note("size not an integer"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "size": 1.5}, "id": 25}"#)
            .note("size a float"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "bogus": 1}, "id": 26}"#)
            .note("unexpected member"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": 7}, "id": 27}"#)
            .note("node-name not a string"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "x"}, "id": 28}"#)
            .note("file without filename"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "x"}, "id": 29}"#)
            .note("raw without file"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "x", "file": {"driver": "file"}}, "id": 30}"#)
            .note("nested missing member"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": 5}}, "id": 31}"#)
            .note("nested wrong type"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": "$DIR/disk.img", "aio": "bogus"}}, "id": 32}"#)
            .note("nested bad enum"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "x", "file": {"driver": "file", "filename": "$DIR/disk.img", "bogus": true}}, "id": 33}"#)
            .note("nested unexpected member"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "x", "file": 5}, "id": 34}"#)
            .note("BlockdevRef of the wrong type"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "read-only": "on"}, "id": 35}"#)
            .note("read-only not a boolean"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "cache": {"direct": "yes"}}, "id": 36}"#)
            .note("cache.direct not a boolean"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "cache": 1}, "id": 37}"#)
            .note("cache not an object"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "detect-zeroes": "sometimes"}, "id": 38}"#)
            .note("detect-zeroes bad enum"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "x", "discard": "maybe"}, "id": 39}"#)
            .note("discard bad enum"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-aio", "node-name": "x", "latency-ns": "slow"}, "id": 40}"#)
            .note("latency-ns not an integer"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-aio", "node-name": "x", "read-zeroes": 1}, "id": 41}"#)
            .note("read-zeroes not a boolean"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co"}, "id": 42}"#)
            .note("root node without node-name"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "1bad"}, "id": 43}"#)
            .note("node-name starting with a digit"),
        Step::line(r##"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "#block1"}, "id": 44}"##)
            .note("node-name in the reserved # space"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "a-name-that-is-longer-than-thirty-one-characters"}, "id": 45}"#)
            .note("node-name too long"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "sp ace"}, "id": 46}"#)
            .note("node-name with a space"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "null0"}, "id": 47}"#)
            .note("duplicate of a command-line node"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "missing", "filename": "$DIR/nonexistent.img"}, "id": 48}"#)
            .note("missing file"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "dirnode", "filename": "$DIR"}, "id": 49}"#)
            .note("file driver on a directory"),
        // blockdev-add successes.
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "file0", "filename": "$DIR/disk.img"}, "id": 50}"#)
            .note("file node"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "file0", "filename": "$DIR/disk2.img"}, "id": 51}"#)
            .note("duplicate node-name"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "file0b", "filename": "$DIR/disk.img"}, "id": 52}"#)
            .note("second writable node on a locked image"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "raw0", "file": "file0"}, "id": 53}"#)
            .note("raw over file by reference"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "raw-bad", "file": "nosuch"}, "id": 54}"#)
            .note("raw over a missing reference"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "raw1", "file": {"driver": "file", "filename": "$DIR/disk2.img"}}, "id": 55}"#)
            .note("raw over an inline file (auto node name)"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "raw2", "offset": 4096, "size": 65536, "file": {"driver": "null-co", "node-name": "rawchild", "size": 1048576}}, "id": 56}"#)
            .note("raw with offset and size over inline null-co"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "null1"}, "id": 57}"#)
            .note("null-co with defaults"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-aio", "node-name": "nullaio0", "size": 1048576, "read-zeroes": true, "latency-ns": 1000}, "id": 58}"#)
            .note("null-aio with options"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "ro0", "filename": "$DIR/ro.img", "read-only": true}, "id": 59}"#)
            .note("read-only file node"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "cached", "filename": "$DIR/cache.img", "cache": {"direct": true, "no-flush": true}, "discard": "unmap", "detect-zeroes": "unmap", "aio": "threads"}, "id": 60}"#)
            .note("cache, discard, detect-zeroes options"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "dz", "detect-zeroes": "unmap"}, "id": 61}"#)
            .note("detect-zeroes unmap without discard unmap"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "dz", "detect-zeroes": "on", "discard": "ignore"}, "id": 62}"#)
            .note("detect-zeroes on"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "grow", "filename": "$DIR/grow.img"}, "id": 63}"#)
            .note("file node to grow"),
    ];
    // $LOOP is set from the device in the script's vars below.
    if loop_device.is_some() {
        steps.extend([
            Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "host_device", "node-name": "hd0", "filename": "$LOOP"}, "id": 70}"#)
                .note("host_device on a loop device"),
            Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "hdraw", "file": "hd0"}, "id": 71}"#)
                .note("raw over host_device"),
            Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "host_device", "node-name": "hdbad", "filename": "$DIR/disk2.img"}, "id": 72}"#)
                .note("host_device on a regular file"),
            Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "hd0", "size": 1048576}, "id": 73}"#)
                .note("resize of a host_device"),
        ]);
    }
    steps.extend([
        // Queries.
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "nodes"}"#).note("query-named-block-nodes"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "flat"}"#)
            .note("query-named-block-nodes flat"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": false}, "id": "notflat"}"#)
            .note("query-named-block-nodes flat false"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": "yes"}, "id": 80}"#)
            .note("flat not a boolean"),
        Step::line(r#"{"execute": "query-block", "id": "qb"}"#).note("query-block"),
        Step::line(r#"{"execute": "query-block", "arguments": {"x": 1}, "id": 81}"#)
            .note("query-block with an argument"),
        Step::line(r#"{"execute": "x-debug-query-block-graph", "id": "graph"}"#)
            .note("block graph"),
        // block_resize.
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "null0"}, "id": 90}"#)
            .note("resize without size"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "null0", "size": "big"}, "id": 91}"#)
            .note("resize size not an integer"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "null0", "size": 1024, "extra": 1}, "id": 92}"#)
            .note("resize unexpected argument"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"size": 1024}, "id": 93}"#)
            .note("resize without device or node-name"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "nosuch", "size": 1024}, "id": 94}"#)
            .note("resize of a missing node"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"device": "null0", "size": 1024}, "id": 95}"#)
            .note("resize by device name"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"device": "", "node-name": "grow", "size": 2097152}, "id": 96}"#)
            .note("resize with device and node-name"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "null0", "size": 134217728}, "id": 97}"#)
            .note("resize null-co"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "nullaio0", "size": 2097152}, "id": 98}"#)
            .note("resize null-aio"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "raw0", "size": 2097152}, "id": 99}"#)
            .note("resize raw over file"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "file0", "size": 4194304}, "id": 100}"#)
            .note("resize a file node that has a parent"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "raw2", "size": 131072}, "id": 101}"#)
            .note("resize raw with a fixed size"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "ro0", "size": 2097152}, "id": 102}"#)
            .note("resize a read-only node"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "grow", "size": -1}, "id": 103}"#)
            .note("resize to a negative size"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "grow", "size": 3000000}, "id": 104}"#)
            .note("grow a file node to an unaligned size"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "grow", "size": 8388608}, "id": 105}"#)
            .note("grow a file node"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "grow", "size": 1048576}, "id": 106}"#)
            .note("shrink a file node"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "after-resize"}"#)
            .note("sizes after resize"),
        // blockdev-del.
        Step::line(r#"{"execute": "blockdev-del", "id": 110}"#).note("del without arguments"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": 5}, "id": 111}"#)
            .note("del node-name not a string"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "null0", "force": true}, "id": 112}"#)
            .note("del unexpected argument"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "nosuch"}, "id": 113}"#)
            .note("del of a missing node"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "file0"}, "id": 114}"#)
            .note("del of a node with a parent"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "rawchild"}, "id": 115}"#)
            .note("del of an inline child"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "raw0"}, "id": 116}"#)
            .note("del of a parent"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "file0"}, "id": 117}"#)
            .note("del of the now free child"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "raw1"}, "id": 118}"#)
            .note("del of a parent with an inline child"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "null0"}, "id": 119}"#)
            .note("del of a command-line node"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "null0"}, "id": 120}"#)
            .note("del twice"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "file0", "filename": "$DIR/disk.img"}, "id": 121}"#)
            .note("re-add after del (name and lock released)"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "end"}"#).note("nodes at the end"),
        Step::line(r#"{"execute": "x-debug-query-block-graph", "id": "graph-end"}"#)
            .note("graph at the end"),
        // quit.
        Step::line(r#"{"execute": "quit", "arguments": {"now": true}, "id": 130}"#)
            .note("quit with an argument"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ]);
    Script {
        name: "basic".into(),
        monitors: 1,
        args: vec![
            "--blockdev".into(),
            "driver=null-co,node-name=null0,size=67108864".into(),
        ],
        vars: loop_device
            .map(|d| vec![("LOOP".to_string(), d.path().to_string())])
            .unwrap_or_default(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn basic_qmp_session_matches_qsd_byte_for_byte() {
    let loop_device = match LoopDevice::attach(8 << 20) {
        Ok(device) => Some(device),
        Err(e) => {
            println!("note: no loop device ({e}); the host_device steps are skipped");
            None
        }
    };
    if let Err(report) = differential(&basic_script(loop_device.as_ref())) {
        panic!("{report}");
    }
}

/// Several monitors: negotiation is per connection, state is shared, a reconnect starts a
/// new session, `quit` closes every monitor. Monitor 2 never negotiates; events (none exist
/// in issue 2's scope, see the export script) must reach monitors 0 and 1 only.
fn monitors_script() -> Script {
    let steps = vec![
        Step::line(r#"{"execute": "query-version", "id": "m1-early"}"#)
            .on(1)
            .note("monitor 1 not negotiated while monitor 0 is idle"),
        Step::line(r#"{"execute": "qmp_capabilities", "id": "m0-cap"}"#).note("monitor 0 negotiates"),
        Step::line(r#"{"execute": "query-block", "id": "m1-still"}"#)
            .on(1)
            .note("monitor 1 is still in negotiation mode"),
        Step::line(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "m1-cap"}"#)
            .on(1)
            .note("monitor 1 negotiates with oob"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "shared", "size": 4096}, "id": "m0-add"}"#)
            .note("monitor 0 adds a node"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "m1-nodes"}"#)
            .on(1)
            .note("monitor 1 sees it"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "shared"}, "id": "m1-dup"}"#)
            .on(1)
            .note("duplicate across monitors"),
        Step::line(r#"{"exec-oob": "query-version", "id": "m1-oob"}"#)
            .on(1)
            .note("exec-oob with oob negotiated, command not OOB-capable"),
        Step::line(r#"{"exec-oob": "no-such-command", "id": "m1-oob2"}"#)
            .on(1)
            .note("exec-oob of an unknown command"),
        Step::line(r#"{"execute": "query-version", "exec-oob": "query-version", "id": "m1-clash"}"#)
            .on(1)
            .note("execute and exec-oob with oob negotiated"),
        Step::line(r#"{"exec-oob": "query-version", "id": "m0-oob"}"#)
            .note("exec-oob on the monitor without oob"),
        Step::line(r#"{"execute": "query-block", "id": "m2"}"#)
            .on(2)
            .note("monitor 2 never negotiates"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "shared"}, "id": "m1-del"}"#)
            .on(1)
            .note("monitor 1 deletes the node"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "m0-nodes"}"#)
            .note("monitor 0 sees it gone"),
        Step::reconnect(1),
        Step::line(r#"{"execute": "query-block", "id": "m1-new"}"#)
            .on(1)
            .note("a new connection starts in negotiation mode"),
        Step::line(r#"{"execute": "qmp_capabilities", "id": "m1-cap2"}"#)
            .on(1)
            .note("and negotiates again"),
        Step::reconnect(0),
        Step::line(r#"{"execute": "quit", "id": "m1-quit"}"#)
            .on(1)
            .until_eof()
            .note("quit closes every monitor"),
    ];
    Script {
        name: "monitors".into(),
        monitors: 3,
        args: vec![
            "--blockdev".into(),
            "driver=null-co,node-name=null0,size=1048576".into(),
        ],
        vars: Vec::new(),
        setup: None,
        steps,
    }
}

#[test]
fn three_monitors_negotiate_independently_and_share_state_like_qsd() {
    if let Err(report) = differential(&monitors_script()) {
        panic!("{report}");
    }
}

/// Chardevs: `query-chardev` (labels, filenames, `frontend-open`, and QEMU's hash-table
/// order), `chardev-add` of the backends bulkhead implements and qsd's errors for the
/// rest, `chardev-remove` of a free, a missing and a monitor's chardev.
fn chardevs_script() -> Script {
    let add = |id: &str, backend: &str, note: &'static str| {
        Step::line(&format!(
            r#"{{"execute": "chardev-add", "arguments": {{"id": "{id}", "backend": {backend}}}, "id": "add-{id}"}}"#
        ))
        .note(note)
    };
    let null = r#"{"type": "null", "data": {}}"#;
    let unix = |path: &str, extra: &str| {
        format!(
            r#"{{"type": "socket", "data": {{"addr": {{"type": "unix", "data": {{"path": "{path}"}}}}{extra}}}}}"#
        )
    };
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#).note("negotiate"),
        Step::line(r#"{"execute": "query-chardev", "id": "q0"}"#)
            .note("the command line's chardevs: monitors, a null monitor, a spare listener"),
        add("n0", null, "a null chardev"),
        add("n0", null, "duplicate id"),
        add(
            "qmp0",
            r#"{"type": "vc", "data": {}}"#,
            "a monitor's id, bad backend: duplicate first",
        ),
        add(
            "v0",
            r#"{"type": "vc", "data": {}}"#,
            "a backend qsd does not have",
        ),
        add("braille", r#"{"type": "braille", "data": {}}"#, "another"),
        add(
            "s1",
            &unix("$DIR/s1.sock", r#", "server": true, "wait": false"#),
            "a listening socket",
        ),
        add(
            "s2",
            &unix("$DIR/s2.sock", ""),
            "server is the default in QMP",
        ),
        add(
            "c1",
            &unix("$DIR/nobody.sock", r#", "server": false"#),
            "a client nobody listens for",
        ),
        add(
            "c2",
            &unix("$DIR/nobody.sock", r#", "server": false, "wait": false"#),
            "wait in client mode",
        ),
        add(
            "c3",
            &unix(
                "$DIR/nobody.sock",
                r#", "server": false, "reconnect": 1, "reconnect-ms": 5"#,
            ),
            "both reconnects",
        ),
        add(
            "c4",
            &unix("$DIR/nobody.sock", r#", "reconnect-ms": 5"#),
            "reconnect on a listener",
        ),
        add(
            "s3",
            &unix("$DIR/no/such/dir.sock", r#", "server": true"#),
            "bind fails",
        ),
        add(
            "f0",
            r#"{"type": "socket", "data": {"addr": {"type": "fd", "data": {"str": "7"}}, "server": false}}"#,
            "fd passing",
        ),
        add("", null, "an empty id is accepted"),
        add("9x", null, "so is one that is no identifier"),
        Step::line(r#"{"execute": "query-chardev", "id": "q1"}"#)
            .note("all of them, in qsd's order"),
        Step::line(
            r#"{"execute": "chardev-remove", "arguments": {"id": "qmp1"}, "id": "rm-busy"}"#,
        )
        .note("a monitor's chardev is busy"),
        Step::line(
            r#"{"execute": "chardev-remove", "arguments": {"id": "zz"}, "id": "rm-missing"}"#,
        )
        .note("no such chardev"),
        Step::line(r#"{"execute": "chardev-remove", "arguments": {"id": "n0"}, "id": "rm-n0"}"#)
            .note("a free chardev"),
        Step::line(r#"{"execute": "chardev-remove", "arguments": {"id": "s1"}, "id": "rm-s1"}"#)
            .note("a listener"),
        Step::line(
            r#"{"execute": "chardev-remove", "arguments": {"id": "spare"}, "id": "rm-spare"}"#,
        )
        .note("a command-line chardev no monitor uses"),
        add("n0", null, "an id is free again after removal"),
        Step::line(r#"{"execute": "query-chardev", "id": "q2"}"#).note("the order after removals"),
        Step::line(r#"{"execute": "quit", "id": "quit"}"#)
            .until_eof()
            .note("quit"),
    ];
    Script {
        name: "chardevs".into(),
        monitors: 2,
        args: vec![
            "--chardev".into(),
            "null,id=nul".into(),
            "--monitor".into(),
            "nul".into(),
            "--chardev".into(),
            "socket,path=$DIR/spare.sock,server=on,wait=off,id=spare".into(),
        ],
        vars: Vec::new(),
        setup: None,
        steps,
    }
}

#[test]
fn chardev_commands_match_qsd_byte_for_byte() {
    if let Err(report) = differential(&chardevs_script()) {
        panic!("{report}");
    }
}

/// A hook that connects `qemu-io` (read-only) to NBD export `export` on `$DIR/nbd.sock` and
/// keeps it connected; returns once a read succeeded, so the server has seen the client.
fn connect_nbd_client(
    client: &'static str,
    export: &'static str,
) -> impl Fn(&mut HookContext<'_>) -> Result<(), HarnessError> + Send + Sync + 'static {
    move |ctx| {
        let uri = format!("nbd+unix:///{export}?socket=$DIR/nbd.sock");
        ctx.spawn_client(client, "qemu-io", &["-r", "-f", "raw", &uri])?;
        ctx.write_client(client, b"read 0 512\n")?;
        ctx.wait_client_output(client, "read 512/512 bytes", Duration::from_secs(20))
    }
}

/// NBD server and export lifecycle (issue 3): errors of the reference's section 2.4,
/// BLOCK_EXPORT_DELETED order (before the reply) and delivery (monitors 0 and 1, not the
/// un-negotiated monitor 2), deletion with a connected client in safe and hard mode,
/// nbd-server-stop and quit with exports present.
fn exports_script() -> Script {
    let long_name = "n".repeat(4097);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap0"}"#).note("monitor 0 negotiates"),
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap1"}"#)
            .on(1)
            .note("monitor 1 negotiates"),
        Step::line(r#"{"execute": "nbd-server-stop", "id": 1}"#).note("stop when not running"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp0", "node-name": "raw0"}, "id": 2}"#)
            .note("export without a server"),
        Step::line(r#"{"execute": "nbd-server-add", "arguments": {"device": "null0"}, "id": 3}"#)
            .note("legacy add without a server"),
        Step::line(r#"{"execute": "nbd-server-start", "id": 4}"#).note("start without addr"),
        Step::line(r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "bogus", "data": {}}}, "id": 5}"#)
            .note("addr type not in the enum"),
        Step::line(r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {}}}, "id": 6}"#)
            .note("addr.data.path missing"),
        Step::line(r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": 5}}}, "id": 7}"#)
            .note("addr.data.path not a string"),
        Step::line(r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$DIR/nbd.sock"}}}, "id": 8}"#)
            .note("start"),
        Step::line(r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$DIR/nbd2.sock"}}}, "id": 9}"#)
            .note("start twice"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"id": "exp0", "node-name": "raw0"}, "id": 10}"#)
            .note("type missing"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "bogus", "id": "exp0", "node-name": "raw0"}, "id": 11}"#)
            .note("type not in the enum"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "node-name": "raw0"}, "id": 12}"#)
            .note("id missing"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp0"}, "id": 13}"#)
            .note("node-name missing"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp0", "node-name": "nosuch"}, "id": 14}"#)
            .note("missing node"),
        Step::line(r##"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "#invalid", "node-name": "raw0"}, "id": 15}"##)
            .note("invalid export id"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp0", "node-name": "ro0", "writable": true}, "id": 16}"#)
            .note("writable export of a read-only node"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp0", "node-name": "raw0", "iothread": "nosuch"}, "id": 17}"#)
            .note("missing iothread"),
        Step::line(&format!(r#"{{"execute": "block-export-add", "arguments": {{"type": "nbd", "id": "exp0", "node-name": "raw0", "name": "{long_name}"}}, "id": 18}}"#))
            .note("export name longer than 4096"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp0", "node-name": "raw0", "writable": true}, "id": 19}"#)
            .note("writable export"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp0", "node-name": "null0"}, "id": 20}"#)
            .note("duplicate export id"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp1", "node-name": "raw0"}, "id": 21}"#)
            .note("duplicate NBD name (defaults to node-name)"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "exp1", "node-name": "ro0", "name": "ro", "description": "read-only"}, "id": 22}"#)
            .note("read-only export with a description"),
        Step::line(r#"{"execute": "query-block-exports", "id": 23}"#).note("exports, newest first"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "raw0", "size": 2097152}, "id": 24}"#)
            .note("resize of an exported node"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "raw0"}, "id": 25}"#)
            .note("del of an exported node"),
        Step::line(r#"{"execute": "block-export-del", "arguments": {"id": "exp0"}, "id": 26}"#)
            .note("del: BLOCK_EXPORT_DELETED on monitors 0 and 1, before the reply"),
        Step::line(r#"{"execute": "block-export-del", "arguments": {"id": "exp0"}, "id": 27}"#)
            .note("del twice"),
        Step::line(r#"{"execute": "block-export-del", "arguments": {"id": "exp1", "mode": "bogus"}, "id": 28}"#)
            .note("del mode not in the enum"),
        Step::line(r#"{"execute": "nbd-server-add", "arguments": {"device": "null0", "name": "legacy"}, "id": 29}"#)
            .note("legacy add"),
        Step::line(r#"{"execute": "query-block-exports", "id": 30}"#).note("legacy export id = name"),
        Step::line(r#"{"execute": "nbd-server-remove", "arguments": {"name": "nosuch"}, "id": 31}"#)
            .note("legacy remove of a missing export"),
        Step::line(r#"{"execute": "nbd-server-remove", "arguments": {"name": "legacy"}, "id": 32}"#)
            .on(1)
            .note("legacy remove from monitor 1"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "busy", "node-name": "null0"}, "id": 33}"#)
            .note("export for a client"),
        Step::hook("client connects", connect_nbd_client("c1", "null0")),
        Step::line(r#"{"execute": "block-export-del", "arguments": {"id": "busy"}, "id": 34}"#)
            .note("safe del with a client connected"),
        Step::line(r#"{"execute": "query-block-exports", "id": 35}"#).note("the export stays"),
        Step::line(r#"{"execute": "block-export-del", "arguments": {"id": "busy", "mode": "hard"}, "id": 36}"#)
            .until_event("BLOCK_EXPORT_DELETED")
            .note("hard del with a client connected"),
        Step::hook("client goes", |ctx| ctx.stop_client("c1")),
        Step::line(r#"{"execute": "query-block-exports", "id": 37}"#).note("gone"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "s1", "node-name": "null0"}, "id": 38}"#)
            .note("export for nbd-server-stop"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "s2", "node-name": "raw0", "name": "second"}, "id": 39}"#)
            .note("second export for nbd-server-stop"),
        Step::hook("client connects to s1", connect_nbd_client("c2", "null0")),
        Step::line(r#"{"execute": "nbd-server-stop", "id": 40}"#)
            .note("stop deletes every export (events before the reply)"),
        Step::hook("client of s1 goes", |ctx| ctx.stop_client("c2")),
        Step::line(r#"{"execute": "query-block-exports", "id": 41}"#).note("none left"),
        Step::line(r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$DIR/nbd.sock"}}, "max-connections": 1}, "id": 42}"#)
            .note("restart on the same path"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "last", "node-name": "raw0", "writable": true}, "id": 43}"#)
            .note("export left for quit"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#)
            .until_eof()
            .note("quit deletes the export (event, then reply, then EOF)"),
    ];
    Script {
        name: "exports".into(),
        monitors: 3,
        args: vec![
            "--blockdev".into(),
            "driver=null-co,node-name=null0,size=67108864".into(),
            "--blockdev".into(),
            "driver=file,node-name=file0,filename=$DIR/disk.img".into(),
            "--blockdev".into(),
            "driver=raw,node-name=raw0,file=file0".into(),
            "--blockdev".into(),
            "driver=file,node-name=ro0,filename=$DIR/ro.img,read-only=on".into(),
        ],
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn nbd_export_lifecycle_and_its_events_match_qsd_byte_for_byte() {
    if let Err(report) = differential(&exports_script()) {
        panic!("{report}");
    }
}

/// `blockdev-reopen`, `blockdev-set-active`, `active=off` and `allow-inactive`: what
/// may change and qsd's errors for what may not, a raw node's child replaced under a
/// writable export (the data and the image locks follow it), read-only refused under
/// a writer, inactive nodes refusing writes and holding no lock.
fn reopen_script() -> Script {
    const NBD_R0: &str = "nbd+unix:///r0?socket=$DIR/nbd.sock";
    const NBD_I1: &str = "nbd+unix:///i1?socket=$DIR/nbd.sock";
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#).note("negotiate"),
        // What cannot change, with qsd's texts.
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0"}]}, "id": 1}"#)
            .note("raw without file"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "null-co", "size": 1048576}]}, "id": 2}"#)
            .note("no node-name"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "null-co", "node-name": "nosuch"}]}, "id": 3}"#)
            .note("missing node"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "r0", "filename": "x"}]}, "id": 4}"#)
            .note("driver change"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "f0", "filename": "$DIR/disk2.img"}]}, "id": 5}"#)
            .note("filename change"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "f2", "filename": "$DIR/cache.img"}]}, "id": 6}"#)
            .note("aio given at creation cannot be reset"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "f2", "filename": "$DIR/cache.img", "aio": "threads", "locking": "off"}]}, "id": 7}"#)
            .note("locking change"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "null-co", "node-name": "n0"}]}, "id": 8}"#)
            .note("null size cannot be reset"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "null-co", "node-name": "n0", "size": 1048576, "read-zeroes": true}]}, "id": 9}"#)
            .note("read-zeroes change"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "null-co", "node-name": "n0", "size": 1048576, "force-share": true}]}, "id": 10}"#)
            .note("force-share change"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "null-co", "node-name": "n0", "detect-zeroes": "unmap"}]}, "id": 11}"#)
            .note("detect-zeroes=unmap without discard, checked before the rest"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": "nosuch"}]}, "id": 12}"#)
            .note("missing child"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": "$DIR/disk.img"}}]}, "id": 13}"#)
            .note("inline child"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": "r0"}]}, "id": 14}"#)
            .note("cycle"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "f1", "filename": "$DIR/disk2.img", "read-only": true}, {"driver": "null-co", "node-name": "nosuch"}]}, "id": 15}"#)
            .note("a failing entry changes nothing"),
        // What can.
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "null-co", "node-name": "n0", "size": 1048576, "detect-zeroes": "on", "discard": "unmap", "cache": {"no-flush": true}}]}, "id": 16}"#)
            .note("generic options"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "f0", "filename": "$DIR/disk.img", "read-only": true}]}, "id": 17}"#)
            .note("file read-only"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": "f0", "read-only": true}]}, "id": 18}"#)
            .note("raw read-only"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 19}"#).note("ro and options shown"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "f0", "filename": "$DIR/disk.img"}, {"driver": "raw", "node-name": "r0", "file": "f0"}]}, "id": 20}"#)
            .note("both read-write again in one reopen"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": "f1", "offset": 512, "size": 4096}]}, "id": 21}"#)
            .note("new child and window"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 22}"#).note("json filename and size follow"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": "f0"}]}, "id": 23}"#)
            .note("back to the first child, whole"),
        Step::line(r#"{"execute": "x-debug-query-block-graph", "id": 24}"#).note("graph"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": "f0", "offset": 2097152}]}, "id": 25}"#)
            .note("window past the child"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": "f0", "size": 1000}]}, "id": 26}"#)
            .note("unaligned window"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r1", "file": {"driver": "file", "filename": "$DIR/ro.img"}}, "id": 27}"#)
            .note("raw with an inline child"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r1", "file": "f1"}]}, "id": 28}"#)
            .note("replacing it drops the inline child"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 29}"#).note("inline child gone"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "r1"}, "id": 291}"#)
            .note("del"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f3", "filename": "$DIR/ro.img", "read-only": true, "force-share": true}, "id": 292}"#)
            .note("force-share node"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "f3", "filename": "$DIR/ro.img"}]}, "id": 293}"#)
            .note("force-share cannot be reset"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "f3", "filename": "$DIR/ro.img", "force-share": true, "read-only": true}]}, "id": 294}"#)
            .note("nor given again"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "f3"}, "id": 295}"#)
            .note("del"),
        // Under a writable export.
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "r0", "writable": true}, "id": 30}"#)
            .note("writable export"),
        Step::hook("disk.img is in use", run_tool("qemu-img", &["resize", "-f", "raw", "$DIR/disk.img", "1M"], false, "Failed to get")),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": "f0", "read-only": true}]}, "id": 31}"#)
            .note("read-only under a writer"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "file", "node-name": "f0", "filename": "$DIR/disk.img", "read-only": true}]}, "id": 32}"#)
            .note("child read-only under a writer"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "r0", "file": "f1"}]}, "id": 33}"#)
            .note("new child under the export"),
        Step::hook("a write lands in the new child", run_tool("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 4096 512", NBD_R0], true, "wrote 512/512")),
        Step::hook("read back from disk2.img", run_tool("qemu-io", &["-U", "-r", "-f", "raw", "-c", "read -P 0x5a 4096 512", "$DIR/disk2.img"], true, "read 512/512")),
        Step::hook("disk.img is free", run_tool("qemu-img", &["resize", "-f", "raw", "$DIR/disk.img", "1M"], true, "Image resized")),
        Step::hook("disk2.img is in use", run_tool("qemu-img", &["resize", "-f", "raw", "$DIR/disk2.img", "2M"], false, "Failed to get")),
        // Activation.
        Step::line(r#"{"execute": "blockdev-set-active", "arguments": {"node-name": "nosuch", "active": false}, "id": 40}"#)
            .note("missing node"),
        Step::line(r#"{"execute": "blockdev-set-active", "arguments": {"node-name": "r0", "active": false}, "id": 41}"#)
            .note("a writable export refuses"),
        Step::line(r#"{"execute": "blockdev-set-active", "arguments": {"node-name": "f1", "active": false}, "id": 42}"#)
            .note("active parent"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "i0", "size": 1048576, "active": false}, "id": 43}"#)
            .note("add inactive"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "i1", "active": false, "file": {"driver": "file", "filename": "$DIR/grow.img", "node-name": "i1f"}}, "id": 44}"#)
            .note("add inactive over an active inline child"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 45}"#).note("active flags"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "x0", "node-name": "i0"}, "id": 46}"#)
            .note("an export without allow-inactive activates"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "x1", "node-name": "i1", "writable": true, "allow-inactive": true}, "id": 47}"#)
            .note("allow-inactive leaves it inactive"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 48}"#).note("active flags"),
        Step::hook("inactive node refuses writes", run_tool("qemu-io", &["-f", "raw", "-c", "write 0 512", NBD_I1], false, "Operation not permitted")),
        Step::hook("and serves reads", run_tool("qemu-io", &["-r", "-f", "raw", "-c", "read 0 512", NBD_I1], true, "read 512/512")),
        Step::hook("grow.img is not locked", run_tool("qemu-img", &["resize", "-f", "raw", "$DIR/grow.img", "1M"], true, "Image resized")),
        Step::line(r#"{"execute": "blockdev-set-active", "arguments": {"node-name": "i1", "active": true}, "id": 49}"#)
            .note("activate"),
        Step::hook("active node takes writes", run_tool("qemu-io", &["-f", "raw", "-c", "write 0 512", NBD_I1], true, "wrote 512/512")),
        Step::hook("grow.img is locked", run_tool("qemu-img", &["resize", "-f", "raw", "$DIR/grow.img", "1M"], false, "Failed to get")),
        Step::line(r#"{"execute": "blockdev-set-active", "arguments": {"node-name": "i1", "active": false}, "id": 50}"#)
            .note("inactivate again: its child too"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 51}"#).note("active flags"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "i2", "file": "i1f"}, "id": 52}"#)
            .note("active parent over an inactive child"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "i1", "file": "i1f"}]}, "id": 53}"#)
            .note("a node added with 'active' cannot be reopened"),
        Step::line(r#"{"execute": "blockdev-set-active", "arguments": {"node-name": "i0", "active": false}, "id": 54}"#)
            .note("a read-only export does not refuse"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "i0", "size": 4096}, "id": 55}"#)
            .note("resize of an inactive node"),
        Step::line(r#"{"execute": "blockdev-set-active", "arguments": {"active": true}, "id": 56}"#)
            .note("activate everything"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 57}"#).note("all active"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#)
            .until_eof()
            .note("quit"),
    ];
    Script {
        name: "reopen".into(),
        monitors: 1,
        args: vec![
            "--blockdev".into(),
            "driver=file,node-name=f0,filename=$DIR/disk.img".into(),
            "--blockdev".into(),
            "driver=raw,node-name=r0,file=f0".into(),
            "--blockdev".into(),
            "driver=file,node-name=f1,filename=$DIR/disk2.img".into(),
            "--blockdev".into(),
            "driver=file,node-name=f2,filename=$DIR/cache.img,aio=threads".into(),
            "--blockdev".into(),
            "driver=null-co,node-name=n0,size=1048576".into(),
            "--nbd-server".into(),
            "addr.type=unix,addr.path=$DIR/nbd.sock".into(),
        ],
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn reopen_and_activation_match_qsd_byte_for_byte() {
    if let Err(report) = differential(&reopen_script()) {
        panic!("{report}");
    }
}
