//! Node statistics and write thresholds with the I/O coming from NBD clients:
//! `query-blockstats` (with and without `query-nodes`), `block-set-write-threshold`,
//! `BLOCK_WRITE_THRESHOLD` and `write_threshold` in `query-named-block-nodes`,
//! compared with qsd byte for byte in both placements (`--isolation kind` and
//! `image`); then, bulkhead only, that a SIGKILLed worker's replacement continues its
//! nodes' counters and thresholds.
//!
//! What qsd shows (measured with 10.0.2): a node's BlockDeviceStats are all zero but
//! `wr_highest_offset` (the end of the furthest write or write-zeroes through that
//! node, discards excluded), because the read/write/flush/failed/invalid counters
//! belong to BlockBackends and an export's is anonymous; file nodes add the file
//! driver's discard counts. Thresholds fire once, for writes, zero-writes and discards
//! that reach the node, then read 0.

use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_systests::daemon::run_tool;
use bulkhead_systests::loopdev::LoopDevice;
use bulkhead_systests::procs::{self, worker_pid};
use bulkhead_systests::script::HookContext;
use bulkhead_systests::{
    Daemon, DaemonKind, HarnessError, QmpConnection, Script, Step, TempDir, differential_with,
};
use serde_json::{Value, json};

fn make_images(dir: &Path) -> std::io::Result<()> {
    for name in ["disk0.img", "disk1.img"] {
        std::fs::File::create(dir.join(name))?.set_len(1 << 20)?;
    }
    Ok(())
}

/// A hook running qemu-io `commands` against NBD export `export` on `$DIR/nbd.sock`.
fn nbd_io(
    export: &'static str,
    commands: &'static [&'static str],
) -> impl Fn(&mut HookContext<'_>) -> Result<(), HarnessError> + Send + Sync + 'static {
    move |ctx| {
        let uri = ctx.substitute(&format!("nbd+unix:///{export}?socket=$DIR/nbd.sock"));
        let mut args = vec!["-f", "raw"];
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(&uri);
        run_tool("qemu-io", &args).map(|_| ())
    }
}

const ARGS: &[&str] = &[
    "--blockdev",
    "driver=file,node-name=file0,filename=$DIR/disk0.img,discard=unmap",
    "--blockdev",
    "driver=raw,node-name=raw0,file=file0,offset=4096,size=524288,discard=unmap",
    "--blockdev",
    "driver=null-co,node-name=null0",
    "--blockdev",
    "driver=file,node-name=file1,filename=$DIR/disk1.img",
    "--blockdev",
    "driver=raw,node-name=raw1,file=file1",
    "--nbd-server",
    "addr.type=unix,addr.path=$DIR/nbd.sock",
    "--export",
    "type=nbd,id=exp0,node-name=raw0,writable=on",
    "--export",
    "type=nbd,id=exp1,node-name=null0,writable=on",
    "--export",
    "type=nbd,id=exp2,node-name=raw1,writable=on",
];

fn blockstats_script() -> Script {
    let all =
        r#"{"execute": "query-blockstats", "arguments": {"query-nodes": true}, "id": "nodes"}"#;
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities"}"#).note("negotiate"),
        Step::line(r#"{"execute": "query-blockstats", "id": 1}"#)
            .note("no named BlockBackend: empty"),
        Step::line(r#"{"execute": "query-blockstats", "arguments": {"query-nodes": false}, "id": 2}"#)
            .note("query-nodes false: the same"),
        Step::line(all).note("every node, zero, with raw's file child as parent"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "nosuch", "write-threshold": 1}, "id": 3}"#)
            .note("unknown node"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw0"}, "id": 4}"#)
            .note("threshold missing"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw0", "write-threshold": -1}, "id": "neg"}"#)
            .note("negative threshold: taken modulo 2^64"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "negq"}"#)
            .note("it prints as -1"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw0", "write-threshold": "10"}, "id": "str"}"#)
            .note("threshold as a string"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw0", "write-threshold": 1, "extra": 1}, "id": "extra"}"#)
            .note("unexpected member"),
        Step::line(r#"{"execute": "query-blockstats", "arguments": {"query-nodes": "yes"}, "id": "bad"}"#)
            .note("query-nodes not a bool"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw0", "write-threshold": 10000}, "id": 5}"#)
            .note("exported raw node"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "file0", "write-threshold": 20000}, "id": 6}"#)
            .note("its file child, not exported"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "null0", "write-threshold": 1}, "id": 7}"#)
            .note("null node"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw1", "write-threshold": 4096}, "id": 8}"#)
            .note("raw node with discard=ignore"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 9}"#)
            .note("write_threshold shows the thresholds"),
        Step::hook(
            "NBD writes, a discard, zero writes (with and without unmap), a flush, a read on raw0",
            nbd_io(
                "raw0",
                &[
                    "write 0 4096",
                    "discard 8192 4096",
                    "write -z 12288 512",
                    "write -z -u 16384 4096",
                    "flush",
                    "read 0 1024",
                ],
            ),
        )
        // raw0's and file0's thresholds: bulkhead's events may reach the monitor just
        // after qemu-io returned (design/node-state.md), so wait for both.
        .until_events("BLOCK_WRITE_THRESHOLD", 2),
        Step::line(all).note("raw0 and file0 crossed (events), highest offsets, one discard"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 10}"#)
            .note("crossed thresholds read 0"),
        Step::hook(
            "a write, a read and a flush on null0",
            nbd_io("null0", &["write 4096 4096", "read 0 4096", "flush"]),
        )
        .until_event("BLOCK_WRITE_THRESHOLD"),
        Step::hook(
            "an ignored discard past raw1's threshold, then a write crossing it",
            nbd_io("raw1", &["discard 0 65536", "write 8192 512"]),
        )
        .until_event("BLOCK_WRITE_THRESHOLD"),
        Step::line(all).note("null0 and raw1 crossed"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw0", "write-threshold": 1}, "id": 11}"#)
            .note("set again"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw0", "write-threshold": 0}, "id": 12}"#)
            .note("0 disables"),
        Step::hook(
            "an unaligned discard and a write on raw0 (no threshold left)",
            nbd_io("raw0", &["discard 0 1000", "write 0 512"]),
        ),
        Step::line(all).note("file0's discard count and bytes grow; no event"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "null0", "write-threshold": 18446744073709551615}, "id": 13}"#)
            .note("the largest uint64"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 14}"#)
            .note("crossed and disabled thresholds read 0; null0's prints as an int (-1)"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw1", "write-threshold": 600000}, "id": 15}"#)
            .note("a threshold before a reopen"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "raw", "node-name": "raw1", "file": "file1", "detect-zeroes": "on"}]}, "id": 16}"#)
            .note("reopen raw1 with another option"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": 17}"#)
            .note("the threshold survives the reopen"),
        Step::hook(
            "a write below, then one crossing the threshold on raw1",
            nbd_io("raw1", &["write 65536 4096", "write 598016 4096"]),
        )
        .until_event("BLOCK_WRITE_THRESHOLD"),
        Step::line(all).note("the highest offsets carry over the reopen; the event fired"),
    ];
    Script {
        name: "blockstats".into(),
        monitors: 1,
        args: ARGS.iter().map(|a| a.to_string()).collect(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn blockstats_and_write_thresholds_match_qsd_with_one_worker_per_kind() {
    if let Err(report) = differential_with(&blockstats_script(), &["--isolation", "kind"]) {
        panic!("{report}");
    }
}

#[test]
fn blockstats_and_write_thresholds_match_qsd_with_one_worker_per_image() {
    if let Err(report) = differential_with(&blockstats_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// Nodes added over QMP: a raw node with an inline file child (a generated name, masked
/// as `#blockNNN`), and, with a loop device, an exported host_device node whose
/// discards reach the driver. The host_device steps are skipped without a loop device.
fn added_nodes_script(loop_device: Option<&LoopDevice>) -> Script {
    let all =
        r#"{"execute": "query-blockstats", "arguments": {"query-nodes": true}, "id": "nodes"}"#;
    let mut steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities"}"#).note("negotiate"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "inl", "file": {"driver": "file", "filename": "$DIR/disk0.img"}}, "id": 1}"#)
            .note("raw with an inline file child"),
        Step::line(r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$DIR/nbd.sock"}}}, "id": 2}"#)
            .note("NBD server"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "inl", "writable": true}, "id": 3}"#)
            .note("export it"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "inl", "write-threshold": 65536}, "id": 4}"#)
            .note("threshold on the QMP-added node"),
        Step::hook(
            "writes past the threshold",
            nbd_io("inl", &["write 61440 8192", "write -z 131072 512"]),
        )
        .until_event("BLOCK_WRITE_THRESHOLD"),
        Step::line(all).note("the generated child name, its highest offset"),
    ];
    if loop_device.is_some() {
        steps.extend([
            Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "host_device", "node-name": "hd0", "filename": "$LOOP", "discard": "unmap"}, "id": 10}"#)
                .note("host_device on a loop device"),
            Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "hd0", "writable": true}, "id": 11}"#)
                .note("export it"),
            Step::hook(
                "a write and discards on the device",
                nbd_io("hd0", &["write 0 4096", "discard 0 4096", "discard 65536 65536"]),
            ),
            Step::line(all).note("host_device's driver-specific discard counts"),
            Step::line(r#"{"execute": "block-export-del", "arguments": {"id": "e1"}, "id": 12}"#)
                .until_event("BLOCK_EXPORT_DELETED")
                .note("unexport the device"),
            Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "hd0"}, "id": 13}"#)
                .note("delete it"),
        ]);
    }
    steps.push(Step::line(all).note("after the deletions"));
    Script {
        name: "blockstats-added".into(),
        monitors: 1,
        args: Vec::new(),
        vars: loop_device
            .map(|d| vec![("LOOP".to_string(), d.path().to_string())])
            .unwrap_or_default(),
        setup: Some(make_images),
        steps,
    }
}

fn added_nodes(isolation: &str) {
    let loop_device = match LoopDevice::attach(8 << 20) {
        Ok(device) => Some(device),
        Err(e) => {
            println!("note: no loop device ({e}); the host_device steps are skipped");
            None
        }
    };
    let script = added_nodes_script(loop_device.as_ref());
    if let Err(report) = differential_with(&script, &["--isolation", isolation]) {
        panic!("{report}");
    }
}

#[test]
fn blockstats_of_qmp_added_nodes_match_qsd_with_one_worker_per_kind() {
    added_nodes("kind");
}

#[test]
fn blockstats_of_qmp_added_nodes_match_qsd_with_one_worker_per_image() {
    added_nodes("image");
}

/// A 64 KiB tmpfs, so writes to a larger sparse image in it fail with ENOSPC; unmounted
/// on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    /// Where the scripts find it (one per test process; the one test using it runs its
    /// placements one after the other).
    fn path() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("bulkhead-enospc-{}", std::process::id()))
    }

    fn mount() -> Result<SmallFs, String> {
        let path = SmallFs::path();
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        let p = path.to_string_lossy().into_owned();
        match run_tool("mount", &["-t", "tmpfs", "-o", "size=64k", "tmpfs", &p]) {
            Ok(_) => Ok(SmallFs(path)),
            Err(e) => {
                let _ = std::fs::remove_dir(&path);
                Err(e.to_string())
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let p = self.0.to_string_lossy().into_owned();
        let _ = run_tool("umount", &[&p]);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A fresh sparse 1 MiB image in the small tmpfs (the previous daemon's writes filled it).
fn make_small_image(_dir: &Path) -> std::io::Result<()> {
    let image = SmallFs::path().join("small.img");
    let _ = std::fs::remove_file(&image);
    std::fs::File::create(&image)?.set_len(1 << 20)
}

/// Writes that fail (ENOSPC): they still cross the threshold and move
/// `wr_highest_offset` (QEMU updates both whatever the result), and the failed
/// counters stay 0 on nodes.
fn failed_writes_script() -> Script {
    let all =
        r#"{"execute": "query-blockstats", "arguments": {"query-nodes": true}, "id": "nodes"}"#;
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities"}"#).note("negotiate"),
        Step::line(r#"{"execute": "block-set-write-threshold", "arguments": {"node-name": "raw0", "write-threshold": 1000}, "id": 1}"#)
            .note("threshold"),
        Step::hook("writes that fail with ENOSPC", |ctx| {
            let uri = ctx.substitute("nbd+unix:///raw0?socket=$DIR/nbd.sock");
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "raw", "-c", "write 0 524288", "-c", "write 600000 1000", &uri])
                .output()
                .map_err(|e| HarnessError::io("running qemu-io", e))?;
            // Both writes must have reached the image and failed there.
            let text = String::from_utf8_lossy(&out.stdout);
            if text.matches("No space left on device").count() == 2 {
                Ok(())
            } else {
                Err(HarnessError::io(
                    format!("qemu-io did not fail twice with ENOSPC: {text}"),
                    std::io::Error::other("unexpected qemu-io output"),
                ))
            }
        })
        // bulkhead's event travels from the node's worker through the supervisor and
        // may reach the monitor a moment after the client saw its error (qsd emits it
        // before the write completes): wait for it rather than for a quiet moment.
        .until_event("BLOCK_WRITE_THRESHOLD"),
        Step::line(all).note("the failed writes' ends, no failed counts"),
    ];
    Script {
        name: "blockstats-failed".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=file0,filename=$SMALL/small.img",
            "--blockdev",
            "driver=raw,node-name=raw0,file=file0",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=exp0,node-name=raw0,writable=on",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect(),
        vars: vec![(
            "SMALL".to_string(),
            SmallFs::path().to_string_lossy().into_owned(),
        )],
        setup: Some(make_small_image),
        steps,
    }
}

#[test]
fn failed_writes_count_like_qsd_in_both_placements() {
    let _fs = match SmallFs::mount() {
        Ok(fs) => fs,
        Err(e) => {
            println!("note: cannot mount a small tmpfs ({e}); skipped");
            return;
        }
    };
    for isolation in ["kind", "image"] {
        if let Err(report) = differential_with(&failed_writes_script(), &["--isolation", isolation])
        {
            panic!("--isolation {isolation}: {report}");
        }
    }
}

fn execute(qmp: &mut QmpConnection, command: &str, args: Option<Value>) -> Value {
    match qmp.execute(command, args) {
        Ok(reply) => reply,
        Err(e) => panic!("{command}: {e}"),
    }
}

/// `(wr_highest_offset, discard-nb-ok)` of `node` in `query-blockstats`.
fn counters(qmp: &mut QmpConnection, node: &str) -> (u64, u64) {
    let reply = execute(qmp, "query-blockstats", Some(json!({"query-nodes": true})));
    let Some(list) = reply["return"].as_array() else {
        panic!("query-blockstats: {reply}");
    };
    let Some(stats) = list.iter().find(|s| s["node-name"] == node) else {
        panic!("{node} missing from {reply}");
    };
    (
        stats["stats"]["wr_highest_offset"]
            .as_u64()
            .unwrap_or(u64::MAX),
        stats["driver-specific"]["discard-nb-ok"]
            .as_u64()
            .unwrap_or(0),
    )
}

fn qemu_io_until_served(export: &str, socket: &Path, commands: &[&str]) {
    let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(&uri);
    // The export serves again once the replacement is restored.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match run_tool("qemu-io", &args) {
            Ok(_) => return,
            Err(e) if Instant::now() > deadline => panic!("qemu-io never succeeded: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The counters and the threshold live in the supervisor's shared memory: the worker
/// hosting the nodes dies, its replacement continues both.
fn counters_survive_a_worker_kill(isolation: &str, worker_kind: &str) {
    let dir = match TempDir::new("bulkhead-stats") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    if let Err(e) = make_images(dir.path()) {
        panic!("{e}");
    }
    let mut args: Vec<String> = ARGS.iter().map(|a| a.to_string()).collect();
    args.extend(["--isolation".to_string(), isolation.to_string()]);
    let daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let socket = daemon.dir().join("nbd.sock");
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    qemu_io_until_served("raw0", &socket, &["write 65536 4096", "discard 0 4096"]);
    assert_eq!(counters(&mut qmp, "raw0"), (69632, 0));
    assert_eq!(counters(&mut qmp, "file0"), (73728, 1));
    execute(
        &mut qmp,
        "block-set-write-threshold",
        Some(json!({"node-name": "raw0", "write-threshold": 200000})),
    );

    let old = worker_pid(daemon.pid(), worker_kind, None);
    if let Err(e) = procs::send_signal(old, libc::SIGKILL) {
        panic!("kill {old}: {e}");
    }
    let _new = worker_pid(daemon.pid(), worker_kind, Some(old));
    // Lower writes than before: the highest offset stays; the discard adds one.
    qemu_io_until_served("raw0", &socket, &["write 0 512", "discard 4096 4096"]);
    assert_eq!(counters(&mut qmp, "raw0"), (69632, 0));
    assert_eq!(counters(&mut qmp, "file0"), (73728, 2));
    let nodes = execute(&mut qmp, "query-named-block-nodes", None);
    let raw0 = nodes["return"]
        .as_array()
        .and_then(|l| l.iter().find(|n| n["node-name"] == "raw0"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(raw0["write_threshold"], 200000, "{nodes}");

    // The threshold set before the kill fires in the replacement.
    qemu_io_until_served("raw0", &socket, &["write 204800 4096"]);
    let _ = qmp.take_events();
    execute(&mut qmp, "query-version", None);
    let events = qmp.take_events();
    let crossed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "BLOCK_WRITE_THRESHOLD")
        .collect();
    assert_eq!(crossed.len(), 1, "{events:?}");
    assert_eq!(
        crossed[0]["data"],
        json!({"node-name": "raw0", "amount-exceeded": 8896, "write-threshold": 200000})
    );
    assert_eq!(counters(&mut qmp, "raw0"), (208896, 0));
}

#[test]
fn counters_and_thresholds_survive_a_worker_kill_with_one_worker_per_kind() {
    counters_survive_a_worker_kill("kind", "raw");
}

#[test]
fn counters_and_thresholds_survive_a_worker_kill_with_one_worker_per_image() {
    counters_survive_a_worker_kill("image", "image");
}
