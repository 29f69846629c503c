//! A graph that changes shape under live I/O: while an NBD client writes a
//! verifiable pattern, a pass-through raw "filter" is inserted above the exported
//! node and removed again, the export is re-pointed to a second node over the same
//! file and back, and a parent's child is replaced; a worker serving a re-pointed
//! export is killed and its replacement must serve the new node. Every write the
//! client saw acknowledged must be in the image and no request may fail, under
//! `--isolation kind` and `image`. Uses the `x-bulkhead-*` graph test hooks (a binary built with
//! `--features bulkhead/test-hooks`). bulkhead only.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::procs;
use bulkhead_systests::workers::{start_images, wait_all_running, workers};
use bulkhead_systests::writes::{self, Write, sparse_file, wait_ok};
use bulkhead_systests::{Daemon, DaemonKind, QmpConnection, TempDir};
use serde_json::{Value, json};

const IMAGE_SIZE: u64 = 16 << 20;
const BLOCK: u64 = 64 << 10;

/// A round long enough (1024 writes of 64 KiB) that the change lands among them.
fn writes_for(round: u64) -> Vec<Write> {
    writes::writes_for(round, 1024, BLOCK, IMAGE_SIZE)
}

/// Whether the round's first write has reached the image (its pattern is the
/// round's own, so no earlier round left it there).
fn first_write_landed(image: &Path, batch: &[Write]) -> bool {
    use std::os::unix::fs::FileExt;
    let Some(&(offset, pattern)) = batch.first() else {
        return true;
    };
    let mut byte = [0u8; 1];
    std::fs::File::open(image)
        .and_then(|f| f.read_exact_at(&mut byte, offset))
        .is_ok_and(|()| byte[0] == pattern)
}

/// `wr_highest_offset` of `node`: non-zero once a write went through it.
fn highest_write(qmp: &mut QmpConnection, node: &str) -> u64 {
    match qmp.execute("query-blockstats", Some(json!({"query-nodes": true}))) {
        Ok(v) => v["return"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["node-name"] == node))
            .and_then(|s| s["stats"]["wr_highest_offset"].as_u64())
            .unwrap_or(0),
        Err(e) => panic!("QMP stopped answering: {e}"),
    }
}

fn ok(qmp: &mut QmpConnection, command: &str, args: Value) {
    if let Err(e) = qmp.execute_ok(command, Some(args.clone())) {
        panic!("{command} {args}: {e}");
    }
}

fn error(qmp: &mut QmpConnection, command: &str, args: Value) -> String {
    match qmp.execute(command, Some(args.clone())) {
        Ok(v) => v["error"]["desc"]
            .as_str()
            .map_or_else(|| panic!("{command} {args} succeeded: {v}"), str::to_string),
        Err(e) => panic!("{command} {args}: {e}"),
    }
}

fn exported_node(qmp: &mut QmpConnection, id: &str) -> String {
    match qmp.execute("query-block-exports", None) {
        Ok(v) => v["return"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["id"] == id))
            .and_then(|e| e["node-name"].as_str())
            .unwrap_or_default()
            .to_string(),
        Err(e) => panic!("QMP stopped answering: {e}"),
    }
}

/// The child `parent` has, by `x-debug-query-block-graph`.
fn file_child(qmp: &mut QmpConnection, parent: &str) -> String {
    let graph = match qmp.execute("x-debug-query-block-graph", None) {
        Ok(v) => v["return"].clone(),
        Err(e) => panic!("QMP stopped answering: {e}"),
    };
    let nodes = graph["nodes"].as_array().cloned().unwrap_or_default();
    let id_of = |name: &str| {
        nodes
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["id"].clone())
    };
    let name_of = |id: &Value| {
        nodes
            .iter()
            .find(|n| &n["id"] == id)
            .and_then(|n| n["name"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let pid = id_of(parent);
    graph["edges"]
        .as_array()
        .and_then(|e| {
            e.iter()
                .find(|e| Some(&e["parent"]) == pid.as_ref() && e["name"] == "file")
        })
        .map(|e| name_of(&e["child"]))
        .unwrap_or_default()
}

/// Runs rounds of writes to `export`, each with one graph change made while the
/// round's client writes; every client must finish without an error, and the
/// image then holds exactly the writes applied to a plain copy.
fn rounds_with_changes(
    daemon: &Daemon,
    qmp: &mut QmpConnection,
    export: &str,
    image: &str,
    changes: &mut [&mut dyn FnMut(&mut QmpConnection)],
) {
    let dir = daemon.dir().to_path_buf();
    let socket = dir.join("nbd.sock");
    let expected = dir.join("expected.img");
    sparse_file(&expected, IMAGE_SIZE);
    for (round, change) in changes.iter_mut().enumerate() {
        let batch = writes_for(round as u64);
        let mut client = writes::nbd_writer(&socket, export, &batch, BLOCK);
        // The change lands among the round's writes: after the first, before the last.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !first_write_landed(&dir.join(image), &batch) {
            assert!(Instant::now() < deadline, "round {round}: no write arrived");
            thread::sleep(Duration::from_millis(2));
        }
        change(qmp);
        let running = matches!(client.try_wait(), Ok(None));
        wait_ok(client, &format!("round {round}: writes to {export}"));
        assert!(
            running,
            "round {round}: the client finished before the change"
        );
        writes::apply_directly(&expected, &batch, BLOCK);
    }
    compare(&dir.join(image), &expected);
}

fn compare(image: &Path, expected: &Path) {
    writes::assert_same_images(
        &["-f", "raw", &image.to_string_lossy()],
        &["-F", "raw", &expected.to_string_lossy()],
        "the image against its acknowledged writes",
    );
}

fn filters_and_retargets(isolation: &str) {
    let daemon = start_images("bulkhead-graph-change", isolation, &["a"], IMAGE_SIZE);
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    // An inactive node cannot take over an export that does not allow one.
    ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "off", "file": "file-a", "active": false}),
    );
    assert_eq!(
        error(
            &mut qmp,
            "x-bulkhead-replace-node",
            json!({"old": "raw-a", "new": "off"})
        ),
        "Inactive 'off' can't serve export 'e-a', which does not allow inactive nodes"
    );
    // The filter and the second node exist before the I/O starts (blockdev-add is
    // not what is under test).
    ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "flt", "file": "raw-a"}),
    );
    ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "raw-a2", "file": "file-a"}),
    );
    // What QEMU would refuse, refused before anything changes.
    assert_eq!(
        error(
            &mut qmp,
            "x-bulkhead-replace-node",
            json!({"old": "raw-a", "new": "raw-a"})
        ),
        "Cannot replace node 'raw-a' by itself"
    );
    assert_eq!(
        error(
            &mut qmp,
            "x-bulkhead-insert-filter",
            json!({"node": "raw-a", "filter": "raw-a2"})
        ),
        "'raw-a2' must have 'raw-a' as its file child to be inserted above it"
    );
    ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "ro", "file": "file-a", "read-only": true}),
    );
    assert_eq!(
        error(
            &mut qmp,
            "x-bulkhead-replace-node",
            json!({"old": "raw-a", "new": "ro"})
        ),
        "Read-only block node 'ro' cannot support read-write users"
    );
    ok(&mut qmp, "blockdev-del", json!({"node-name": "ro"}));
    // flt is a parent of raw-a already.
    assert_eq!(
        error(
            &mut qmp,
            "x-bulkhead-replace-node",
            json!({"old": "raw-a", "new": "off"})
        ),
        "Inactive 'off' can't be a file child of active 'flt'"
    );
    ok(&mut qmp, "blockdev-del", json!({"node-name": "off"}));
    assert_eq!(exported_node(&mut qmp, "e-a"), "raw-a");

    let mut insert = |q: &mut QmpConnection| {
        ok(
            q,
            "x-bulkhead-insert-filter",
            json!({"node": "raw-a", "filter": "flt"}),
        );
        assert_eq!(exported_node(q, "e-a"), "flt");
        assert_eq!(file_child(q, "flt"), "raw-a");
    };
    let mut remove = |q: &mut QmpConnection| {
        assert!(
            highest_write(q, "flt") > 0,
            "writes went through the filter"
        );
        ok(q, "x-bulkhead-remove-filter", json!({"filter": "flt"}));
        assert_eq!(exported_node(q, "e-a"), "raw-a");
    };
    let mut to_second = |q: &mut QmpConnection| {
        ok(
            q,
            "x-bulkhead-replace-node",
            json!({"old": "raw-a", "new": "raw-a2"}),
        );
        assert_eq!(exported_node(q, "e-a"), "raw-a2");
    };
    let mut back = |q: &mut QmpConnection| {
        assert!(highest_write(q, "raw-a2") > 0, "writes went to raw-a2");
        ok(
            q,
            "x-bulkhead-replace-node",
            json!({"old": "raw-a2", "new": "raw-a"}),
        );
        assert_eq!(exported_node(q, "e-a"), "raw-a");
    };
    let mut nothing = |_: &mut QmpConnection| {};
    rounds_with_changes(
        &daemon,
        &mut qmp,
        "raw-a",
        "disk-a.img",
        &mut [
            &mut insert,
            &mut remove,
            &mut to_second,
            &mut back,
            &mut nothing,
        ],
    );
    // The filter left nothing behind: it can go now, and so can the second node.
    ok(&mut qmp, "blockdev-del", json!({"node-name": "flt"}));
    ok(&mut qmp, "blockdev-del", json!({"node-name": "raw-a2"}));
}

#[test]
fn filters_come_and_go_and_exports_move_under_live_io_isolation_kind() {
    filters_and_retargets("kind");
}

#[test]
fn filters_come_and_go_and_exports_move_under_live_io_isolation_image() {
    filters_and_retargets("image");
}

/// raw-top over raw-mid over file-a, exported at raw-top: raw-mid is replaced by
/// raw-mid2 (over the same file) and back while the client writes.
fn parent_child_replaced(isolation: &str) {
    let dir = match TempDir::new("bulkhead-graph-parent") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    sparse_file(&dir.path().join("disk-a.img"), IMAGE_SIZE);
    let args: Vec<String> = [
        "--isolation",
        isolation,
        "--blockdev",
        "driver=file,node-name=file-a,filename=$DIR/disk-a.img",
        "--blockdev",
        "driver=raw,node-name=raw-mid,file=file-a",
        "--blockdev",
        "driver=raw,node-name=raw-mid2,file=file-a",
        "--blockdev",
        "driver=raw,node-name=raw-top,file=raw-mid",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e-top,node-name=raw-top,writable=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    let mut replace = |q: &mut QmpConnection| {
        ok(
            q,
            "x-bulkhead-replace-node",
            json!({"old": "raw-mid", "new": "raw-mid2"}),
        );
        assert_eq!(file_child(q, "raw-top"), "raw-mid2");
        assert_eq!(exported_node(q, "e-top"), "raw-top");
    };
    let mut back = |q: &mut QmpConnection| {
        assert!(highest_write(q, "raw-mid2") > 0, "writes went to raw-mid2");
        ok(
            q,
            "x-bulkhead-replace-node",
            json!({"old": "raw-mid2", "new": "raw-mid"}),
        );
        assert_eq!(file_child(q, "raw-top"), "raw-mid");
    };
    let mut nothing = |_: &mut QmpConnection| {};
    rounds_with_changes(
        &daemon,
        &mut qmp,
        "raw-top",
        "disk-a.img",
        &mut [&mut replace, &mut back, &mut nothing],
    );
    // Nothing uses raw-mid2 any more.
    ok(&mut qmp, "blockdev-del", json!({"node-name": "raw-mid2"}));
}

#[test]
fn a_parents_child_is_replaced_under_live_io_isolation_kind() {
    parent_child_replaced("kind");
}

#[test]
fn a_parents_child_is_replaced_under_live_io_isolation_image() {
    parent_child_replaced("image");
}

/// The pid of the worker serving export `id`'s clients (not the listener).
fn export_server_pid(qmp: &mut QmpConnection, id: &str) -> u32 {
    workers(qmp)
        .iter()
        .find(|w| {
            w["role"] != "listener"
                && w["exports"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e == id))
        })
        .and_then(|w| w["pid"].as_u64())
        .map_or_else(|| panic!("no worker serves {id}"), |p| p as u32)
}

/// After a retarget, the old node is deleted and the worker serving the export is
/// killed: its replacement must serve the new node (a replay of the old target
/// would find no node), with every write of the next round in place.
fn restart_keeps_the_new_target(isolation: &str) {
    let daemon = start_images("bulkhead-graph-restart", isolation, &["a"], IMAGE_SIZE);
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "raw-a2", "file": "file-a"}),
    );
    let victim = export_server_pid(&mut qmp, "e-a");
    let mut retarget = |q: &mut QmpConnection| {
        ok(
            q,
            "x-bulkhead-replace-node",
            json!({"old": "raw-a", "new": "raw-a2"}),
        );
        ok(q, "blockdev-del", json!({"node-name": "raw-a"}));
    };
    let mut kill = |_: &mut QmpConnection| {
        if let Err(e) = procs::send_signal(victim, libc::SIGKILL) {
            panic!("cannot kill the export's worker {victim}: {e}");
        }
    };
    let mut nothing = |_: &mut QmpConnection| {};
    rounds_with_changes(
        &daemon,
        &mut qmp,
        "raw-a",
        "disk-a.img",
        &mut [&mut retarget, &mut kill, &mut nothing],
    );
    wait_all_running(&mut qmp);
    assert_ne!(export_server_pid(&mut qmp, "e-a"), victim, "a new worker");
    assert_eq!(exported_node(&mut qmp, "e-a"), "raw-a2");
}

#[test]
fn a_restarted_export_worker_serves_the_new_target_isolation_kind() {
    restart_keeps_the_new_target("kind");
}

#[test]
fn a_restarted_export_worker_serves_the_new_target_isolation_image() {
    restart_keeps_the_new_target("image");
}
