//! Mapped I/O: an export of `raw` over a file on tmpfs moves its data on the image
//! descriptor in the export worker (design/data-path.md, "Mapped I/O"), and the
//! commands that change the node take the shortcut away first. Checked from outside
//! with qemu-io over NBD, QMP queries and events, and the image file itself, in both
//! placements. bulkhead only (qsd has no export workers); skipped without /dev/shm.

use std::path::Path;
use std::process::Output;

use std::time::Duration;

use bulkhead_systests::nbd::NbdPeer;
use bulkhead_systests::procs::{self, worker_pid};
use bulkhead_systests::writes::{nbd_image_opts, qemu_io, sparse_file};
use bulkhead_systests::{Daemon, DaemonKind, QmpConnection, TempDir};
use serde_json::{Value, json};

const SIZE: u64 = 4 << 20;

fn start(isolation: &str) -> Option<Daemon> {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return None;
    }
    let dir = match TempDir::new_in(shm, "bulkhead-mapped") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    sparse_file(&dir.path().join("disk.img"), SIZE);
    let args: Vec<String> = [
        "--isolation",
        isolation,
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => Some(d),
        Err(e) => panic!("{e}"),
    }
}

/// qemu-io over NBD on export `raw0` running `commands`.
fn io(daemon: &Daemon, commands: &[&str]) -> Output {
    io_on(daemon, "raw0", commands)
}

/// qemu-io over NBD on `export` running `commands`.
///
/// With `-t unsafe`: qemu-io's default cache mode (writethrough) would make every write
/// FUA, which the mapping leaves to the node's worker, and it flushes when it closes;
/// writeback without flushes keeps plain writes plain and the worker out of it.
fn io_on(daemon: &Daemon, export: &str, commands: &[&str]) -> Output {
    let socket = daemon.dir().join("nbd.sock");
    let mut args = vec![
        "-t".to_string(),
        "unsafe".to_string(),
        "--image-opts".to_string(),
        nbd_image_opts(&socket, export),
    ];
    for c in commands {
        args.push("-c".into());
        args.push((*c).into());
    }
    match qemu_io(&args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run qemu-io: {e}"),
    }
}

/// qemu-io succeeded, and printed no failure.
fn io_ok(daemon: &Daemon, commands: &[&str]) {
    let out = io(daemon, commands);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "qemu-io {commands:?}: {text}\n{}",
        daemon.stderr()
    );
}

fn ok(qmp: &mut QmpConnection, command: &str, args: Value) -> Value {
    match qmp.execute_ok(command, Some(args)) {
        Ok(v) => v,
        Err(e) => panic!("{command}: {e}"),
    }
}

/// The exports whose mapping some worker holds.
fn mapped(qmp: &mut QmpConnection) -> Vec<String> {
    let workers = match qmp.execute_ok("x-bulkhead-query-workers", None) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    let mut out: Vec<String> = workers
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["mapped"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.as_str().map(String::from))
        .collect();
    out.sort();
    out
}

/// `wr_highest_offset` of every node, by name.
fn highest(qmp: &mut QmpConnection) -> Vec<(String, u64)> {
    let stats = ok(qmp, "query-blockstats", json!({"query-nodes": true}));
    stats
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["node-name"].as_str().unwrap_or("").to_string(),
                s["stats"]["wr_highest_offset"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn file_bytes(daemon: &Daemon, offset: u64, len: usize) -> Vec<u8> {
    let data = match std::fs::read(daemon.dir().join("disk.img")) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    data[offset as usize..offset as usize + len].to_vec()
}

fn mapped_export_follows_the_node(isolation: &str) {
    let Some(daemon) = start(isolation) else {
        return;
    };
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    ok(
        &mut qmp,
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "raw0", "writable": true,
               "allow-inactive": true}),
    );
    assert_eq!(
        mapped(&mut qmp),
        ["e0"],
        "a raw-over-file export on tmpfs maps"
    );

    // Data written through the mapping is in the file, and counted on both nodes.
    io_ok(
        &daemon,
        &["write -P 0xab 65536 65536", "read -P 0xab 65536 65536"],
    );
    assert!(file_bytes(&daemon, 65536, 65536).iter().all(|b| *b == 0xab));
    let h = highest(&mut qmp);
    assert!(h.contains(&("raw0".into(), 131072)), "{h:?}");
    assert!(h.contains(&("file0".into(), 131072)), "{h:?}");

    // A write crossing a threshold goes through the node's worker, which reports it.
    ok(
        &mut qmp,
        "block-set-write-threshold",
        json!({"node-name": "file0", "write-threshold": 200000}),
    );
    assert_eq!(
        mapped(&mut qmp),
        ["e0"],
        "the grant comes back after the command"
    );
    io_ok(&daemon, &["write -P 0x11 196608 8192"]);
    let mut events = Vec::new();
    for _ in 0..50 {
        // Queries read the events that arrived meanwhile.
        let _ = mapped(&mut qmp);
        events.extend(qmp.take_events());
        if !events.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let crossing: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "BLOCK_WRITE_THRESHOLD")
        .collect();
    assert_eq!(crossing.len(), 1, "{events:?}");
    assert_eq!(
        crossing[0]["data"],
        json!({"node-name": "file0", "amount-exceeded": 4800, "write-threshold": 200000})
    );

    // Inactive: no mapping, and writes fail as the node refuses them.
    ok(
        &mut qmp,
        "blockdev-set-active",
        json!({"node-name": "raw0", "active": false}),
    );
    assert!(
        mapped(&mut qmp).is_empty(),
        "no mapping of an inactive node"
    );
    let out = io(&daemon, &["write -P 0x22 0 4096"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Operation not permitted"),
        "a write to an inactive node: {text}"
    );
    assert!(file_bytes(&daemon, 0, 4096).iter().all(|b| *b == 0));
    ok(
        &mut qmp,
        "blockdev-set-active",
        json!({"node-name": "raw0", "active": true}),
    );
    assert_eq!(mapped(&mut qmp), ["e0"]);

    // Read-only: the export goes on reading through the mapping, never writing.
    let reopen = |qmp: &mut QmpConnection, read_only: bool| {
        qmp.execute(
            "blockdev-reopen",
            Some(
                json!({"options": [{"driver": "raw", "node-name": "raw0", "file": "file0",
                                     "read-only": read_only}]}),
            ),
        )
    };
    let refused = reopen(&mut qmp, true).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        refused["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("cannot support read-write users")),
        "{refused}"
    );
    assert_eq!(
        mapped(&mut qmp),
        ["e0"],
        "a refused reopen leaves the grant"
    );

    // The image's worker frozen: plain reads and writes on a connection made before
    // still complete, so they never went to it (a request sent to it would wait
    // until it runs again; a new connection asks it for the size).
    let kind = if isolation == "image" { "image" } else { "raw" };
    let victim = worker_pid(daemon.pid(), kind, None);
    let socket = daemon.dir().join("nbd.sock");
    let mut peer = NbdPeer::open(&socket, "raw0", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("NBD: {e}"));
    if let Err(e) = procs::send_signal(victim, libc::SIGSTOP) {
        panic!("cannot stop {victim}: {e}");
    }
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = peer
            .write(131072, &[0x55; 65536])
            .and_then(|()| peer.read(131072, 65536));
        let _ = done.send(r);
    });
    let frozen = finished.recv_timeout(Duration::from_secs(10));
    let _ = procs::send_signal(victim, libc::SIGCONT);
    match frozen {
        Ok(Ok(back)) => assert!(back.iter().all(|b| *b == 0x55)),
        other => panic!("mapped I/O waited for the frozen image worker: {other:?}"),
    }
    assert!(
        file_bytes(&daemon, 131072, 65536)
            .iter()
            .all(|b| *b == 0x55)
    );

    // The image's worker dies: mapped requests do not even notice.
    let victim = worker_pid(daemon.pid(), kind, None);
    if let Err(e) = procs::send_signal(victim, libc::SIGKILL) {
        panic!("cannot kill {victim}: {e}");
    }
    io_ok(&daemon, &["write -P 0x44 0 65536", "read -P 0x44 0 65536"]);
    assert!(file_bytes(&daemon, 0, 65536).iter().all(|b| *b == 0x44));
    assert_eq!(mapped(&mut qmp), ["e0"]);

    // Removed with its export; a grown node's new export maps its new size (an
    // exported node cannot be resized, as in qsd).
    ok(&mut qmp, "block-export-del", json!({"id": "e0"}));
    assert!(mapped(&mut qmp).is_empty());
    ok(
        &mut qmp,
        "block_resize",
        json!({"node-name": "raw0", "size": SIZE * 2}),
    );
    ok(
        &mut qmp,
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "raw0", "writable": true}),
    );
    assert_eq!(mapped(&mut qmp), ["e1"]);
    io_ok(
        &daemon,
        &["write -P 0x33 6291456 4096", "read -P 0x33 6291456 4096"],
    );
    assert!(
        file_bytes(&daemon, 6291456, 4096)
            .iter()
            .all(|b| *b == 0x33)
    );
}

#[test]
fn a_mapped_export_follows_its_node_with_one_worker_per_kind() {
    mapped_export_follows_the_node("kind");
}

#[test]
fn a_mapped_export_follows_its_node_with_one_worker_per_image() {
    mapped_export_follows_the_node("image");
}

#[test]
fn exports_that_cannot_map_do_not() {
    let Some(daemon) = start("kind") else {
        return;
    };
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    // A raw window (the export would reach bytes its clients cannot) and a null
    // node (no image).
    ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "window", "file": "file0", "offset": 4096}),
    );
    ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "null0"}),
    );
    for (id, node) in [("w", "window"), ("n", "null0")] {
        ok(
            &mut qmp,
            "block-export-add",
            json!({"type": "nbd", "id": id, "node-name": node, "name": node}),
        );
    }
    assert!(mapped(&mut qmp).is_empty(), "neither maps");
}

#[test]
fn detect_zeroes_still_sees_every_write_of_a_mapped_export() {
    let Some(daemon) = start("kind") else {
        return;
    };
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    let image = daemon.dir().join("dz.img");
    sparse_file(&image, SIZE);
    ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "dz", "detect-zeroes": "unmap", "discard": "unmap",
               "file": {"driver": "file", "node-name": "dz-file", "discard": "unmap",
                        "filename": image.to_string_lossy()}}),
    );
    ok(
        &mut qmp,
        "block-export-add",
        json!({"type": "nbd", "id": "dz", "node-name": "dz", "writable": true}),
    );
    // Mapped for reads; its writes still go through the node, whose detect-zeroes
    // turns a zero write into a hole.
    assert_eq!(mapped(&mut qmp), ["dz"]);
    // Plain NBD_CMD_WRITEs (QEMU's client would send the zeroes as WRITE_ZEROES),
    // 64 KiB: small enough to be mapped if writes were.
    let socket = daemon.dir().join("nbd.sock");
    let mut peer =
        NbdPeer::open(&socket, "dz", Duration::from_secs(5)).unwrap_or_else(|e| panic!("NBD: {e}"));
    for byte in [0xaa, 0] {
        peer.write(0, &[byte; 64 << 10])
            .unwrap_or_else(|e| panic!("write: {e}"));
    }
    let back = peer
        .read(0, 64 << 10)
        .unwrap_or_else(|e| panic!("read: {e}"));
    assert!(back.iter().all(|b| *b == 0));
    let map = match std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(&image)
        .output()
    {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => panic!("qemu-img: {e}"),
    };
    let extents: Value = serde_json::from_str(&map).unwrap_or_else(|e| panic!("{e}: {map}"));
    let first = &extents[0];
    assert_eq!(
        (first["start"].as_u64(), first["data"].as_bool()),
        (Some(0), Some(false)),
        "the zeroed range is a hole again: {map}"
    );
    assert!(first["length"].as_u64().unwrap_or(0) >= 64 << 10, "{map}");
}
