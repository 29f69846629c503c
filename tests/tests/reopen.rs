//! A graph that changes shape under live I/O: `blockdev-reopen` replaces an exported
//! raw node's file child (and its options) while QEMU's NBD client writes a
//! verifiable pattern, in both placements (`--isolation kind` and `image`). Every
//! acknowledged write must be in the image afterwards (`qemu-img compare` against the
//! same writes applied directly). Then the child is moved to another image and the
//! raw node's worker is killed: the restarted worker must be given the new shape.
//! bulkhead only (qsd's differential counterpart is the `reopen` script of
//! `qmp_differential`).

use std::path::Path;
use std::thread;
use std::time::Duration;

use bulkhead_systests::procs;
use bulkhead_systests::writes::{self, Write, sparse_file, wait_ok};
use bulkhead_systests::{Daemon, DaemonKind, QmpConnection, TempDir};
use serde_json::{Value, json};

const IMAGE_SIZE: u64 = 32 << 20;
const BLOCK: u64 = 64 << 10;
/// Writes per round, so a reopen lands while the client is busy.
const WRITES_PER_ROUND: u64 = 48;
const ROUNDS: u64 = 12;

fn start(isolation: &str) -> Daemon {
    let dir = match TempDir::new("bulkhead-reopen") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    for image in ["a.img", "b.img", "expected.img"] {
        sparse_file(&dir.path().join(image), IMAGE_SIZE);
    }
    // f0 and f0b are two nodes on the same image: swapping between them replaces
    // the child (another node, possibly in another worker) while every write still
    // lands in a.img, so the result can be checked exactly.
    let args: Vec<String> = [
        "--isolation",
        isolation,
        "--blockdev",
        "driver=file,node-name=f0,filename=$DIR/a.img",
        "--blockdev",
        "driver=raw,node-name=r0,file=f0",
        "--blockdev",
        "driver=file,node-name=f0b,filename=$DIR/a.img",
        "--blockdev",
        "driver=file,node-name=f1,filename=$DIR/b.img",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=r0,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

fn execute_ok(qmp: &mut QmpConnection, command: &str, args: Value) -> Value {
    match qmp.execute_ok(command, Some(args)) {
        Ok(v) => v,
        Err(e) => panic!("{command}: {e}"),
    }
}

fn reopen_r0(qmp: &mut QmpConnection, child: &str, detect_zeroes: &str) {
    execute_ok(
        qmp,
        "blockdev-reopen",
        json!({"options": [{"driver": "raw", "node-name": "r0", "file": child,
                            "detect-zeroes": detect_zeroes}]}),
    );
}

/// The file child `x-debug-query-block-graph` shows under r0.
fn child_of_r0(qmp: &mut QmpConnection) -> String {
    let graph = execute_ok(qmp, "x-debug-query-block-graph", json!({}));
    let nodes = graph["nodes"].as_array().cloned().unwrap_or_default();
    let id_of = |name: &str| {
        nodes
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["id"].clone())
    };
    let r0 = id_of("r0");
    let child = graph["edges"]
        .as_array()
        .and_then(|edges| edges.iter().find(|e| Some(&e["parent"]) == r0.as_ref()))
        .map(|e| e["child"].clone());
    nodes
        .iter()
        .find(|n| Some(&n["id"]) == child.as_ref())
        .and_then(|n| n["name"].as_str())
        .unwrap_or("")
        .to_string()
}

/// The pid of the worker hosting `node`.
fn worker_of(qmp: &mut QmpConnection, node: &str) -> u32 {
    let workers = execute_ok(qmp, "x-bulkhead-query-workers", json!({}));
    workers
        .as_array()
        .and_then(|l| {
            l.iter().find(|w| {
                w["nodes"]
                    .as_array()
                    .is_some_and(|n| n.contains(&json!(node)))
            })
        })
        .and_then(|w| w["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no worker hosts {node}: {workers}"))
}

fn writes_for(round: u64) -> Vec<Write> {
    writes::writes_for(round, WRITES_PER_ROUND, BLOCK, IMAGE_SIZE)
}

fn qemu_io_ok(args: &[&str], what: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = match writes::qemu_io(&args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run qemu-io: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("error"),
        "{what}: {text}"
    );
    text
}

fn reopen_rounds(isolation: &str) {
    let daemon = start(isolation);
    let d = daemon.dir().to_path_buf();
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    let mut child = "f0";
    for round in 0..ROUNDS {
        let writes = writes_for(round);
        let client = writes::nbd_writer(&d.join("nbd.sock"), "r0", &writes, BLOCK);
        // Let the client get going, then change the graph under it: every other round
        // a new child, otherwise new options on the same one (a new implementation
        // either way, swapped in with requests in flight).
        thread::sleep(Duration::from_millis(20 + 15 * (round % 4)));
        if round % 2 == 0 {
            child = if child == "f0" { "f0b" } else { "f0" };
        }
        let detect_zeroes = if round % 4 < 2 { "on" } else { "off" };
        reopen_r0(&mut qmp, child, detect_zeroes);
        wait_ok(
            client,
            &format!("round {round}: qemu-io while r0 was reopened ({isolation})"),
        );
        writes::apply_directly(&d.join("expected.img"), &writes, BLOCK);
        assert_eq!(child_of_r0(&mut qmp), child, "round {round}");
    }
    let (a, expected) = (d.join("a.img"), d.join("expected.img"));
    writes::assert_same_images(
        &["-f", "raw", &a.to_string_lossy()],
        &["-F", "raw", &expected.to_string_lossy()],
        "a.img against the acknowledged writes",
    );
    restart_keeps_the_new_shape(&mut qmp, &d);
    assert!(
        daemon.stderr().lines().all(|l| !l.contains("panicked")),
        "{}",
        daemon.stderr()
    );
}

/// Moves r0 onto b.img, kills r0's worker, and writes: the replacement must serve the
/// new child (the graph is the source of truth for replay).
fn restart_keeps_the_new_shape(qmp: &mut QmpConnection, d: &Path) {
    reopen_r0(qmp, "f1", "off");
    let victim = worker_of(qmp, "r0");
    if let Err(e) = procs::send_signal(victim, libc::SIGKILL) {
        panic!("cannot signal worker {victim}: {e}");
    }
    let opts = writes::nbd_image_opts(&d.join("nbd.sock"), "r0");
    qemu_io_ok(
        &["--image-opts", &opts, "-c", "write -P 0xa5 1048576 65536"],
        "write after the restart",
    );
    let b = d.join("b.img").display().to_string();
    let a = d.join("a.img").display().to_string();
    qemu_io_ok(
        &[
            "-U",
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xa5 1048576 65536",
            &b,
        ],
        "the write is in b.img",
    );
    let in_a = qemu_io_ok(
        &["-U", "-r", "-f", "raw", "-c", "read -v 1048576 16", &a],
        "a.img read",
    );
    assert!(!in_a.contains("a5 a5"), "the write reached a.img: {in_a}");
    assert_ne!(worker_of(qmp, "r0"), victim, "r0's worker was replaced");
    assert_eq!(child_of_r0(qmp), "f1");
}

#[test]
fn replacing_a_child_under_nbd_writes_loses_nothing() {
    reopen_rounds("kind");
}

#[test]
fn replacing_a_child_under_nbd_writes_loses_nothing_with_one_worker_per_image() {
    reopen_rounds("image");
}

/// An inactive node stays inactive when its worker is replaced (the state travels in
/// the node's config, which restarts replay), and a reopened image descriptor (read-only
/// to read-write) is what the replacement gets.
#[test]
fn activation_and_access_mode_survive_a_worker_restart() {
    let daemon = start("kind");
    let d = daemon.dir().to_path_buf();
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    execute_ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "i1", "read-only": true,
               "file": {"driver": "file", "filename": d.join("b.img"), "node-name": "i1f"}}),
    );
    execute_ok(
        &mut qmp,
        "blockdev-set-active",
        json!({"node-name": "i1", "active": false}),
    );
    execute_ok(
        &mut qmp,
        "block-export-add",
        json!({"type": "nbd", "id": "x1", "node-name": "i1", "allow-inactive": true}),
    );
    let victim = worker_of(&mut qmp, "i1");
    if let Err(e) = procs::send_signal(victim, libc::SIGKILL) {
        panic!("cannot signal worker {victim}: {e}");
    }
    let opts = writes::nbd_image_opts(&d.join("nbd.sock"), "i1");
    qemu_io_ok(
        &["-r", "--image-opts", &opts, "-c", "read 0 512"],
        "read from the inactive node after the restart",
    );
    assert_ne!(
        worker_of(&mut qmp, "i1"),
        victim,
        "i1's worker was replaced"
    );
    let nodes = execute_ok(&mut qmp, "query-named-block-nodes", json!({}));
    let i1 = nodes
        .as_array()
        .and_then(|l| l.iter().find(|n| n["node-name"] == "i1"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (i1["active"].clone(), i1["ro"].clone()),
        (json!(false), json!(true))
    );
    // Read-write and active again: the supervisor reopens b.img for writing, and a
    // second restart must hand the replacement that descriptor.
    execute_ok(
        &mut qmp,
        "blockdev-reopen",
        json!({"options": [{"driver": "file", "node-name": "i1f", "filename": d.join("b.img")},
                           {"driver": "raw", "node-name": "i1", "file": "i1f"}]}),
    );
    execute_ok(
        &mut qmp,
        "blockdev-set-active",
        json!({"node-name": "i1", "active": true}),
    );
    let victim = worker_of(&mut qmp, "i1");
    if let Err(e) = procs::send_signal(victim, libc::SIGKILL) {
        panic!("cannot signal worker {victim}: {e}");
    }
    // A command right after a death could reach the dead process's channel before
    // the supervisor saw the death; wait for the replacement first.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while worker_of(&mut qmp, "i1") == victim {
        assert!(
            std::time::Instant::now() < deadline,
            "i1's worker not replaced"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // The first export is read-only; write through a writable one.
    execute_ok(
        &mut qmp,
        "block-export-add",
        json!({"type": "nbd", "id": "x2", "node-name": "i1", "name": "i1w", "writable": true}),
    );
    let opts = writes::nbd_image_opts(&d.join("nbd.sock"), "i1w");
    qemu_io_ok(
        &["--image-opts", &opts, "-c", "write -P 0x3c 0 4096"],
        "write to the reactivated, read-write node",
    );
    let b = d.join("b.img").display().to_string();
    qemu_io_ok(
        &["-U", "-r", "-f", "raw", "-c", "read -P 0x3c 0 4096", &b],
        "the write is in b.img",
    );
}

/// After a reopen gives r0 a child younger than itself in the same worker (a raw node
/// over f1, created later), a restart must open the child first.
#[test]
fn a_younger_child_in_the_same_worker_is_replayed_before_its_parent() {
    let daemon = start("kind");
    let d = daemon.dir().to_path_buf();
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    execute_ok(
        &mut qmp,
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r2", "file": "f1"}),
    );
    execute_ok(
        &mut qmp,
        "blockdev-reopen",
        json!({"options": [{"driver": "raw", "node-name": "r0", "file": "r2"}]}),
    );
    let victim = worker_of(&mut qmp, "r0");
    assert_eq!(
        worker_of(&mut qmp, "r2"),
        victim,
        "r0 and r2 share the raw worker"
    );
    if let Err(e) = procs::send_signal(victim, libc::SIGKILL) {
        panic!("cannot signal worker {victim}: {e}");
    }
    let opts = writes::nbd_image_opts(&d.join("nbd.sock"), "r0");
    qemu_io_ok(
        &["--image-opts", &opts, "-c", "write -P 0x69 8192 4096"],
        "write through r0 after the restart",
    );
    let b = d.join("b.img").display().to_string();
    qemu_io_ok(
        &["-U", "-r", "-f", "raw", "-c", "read -P 0x69 8192 4096", &b],
        "the write is in b.img",
    );
    assert_ne!(
        worker_of(&mut qmp, "r0"),
        victim,
        "the raw worker was replaced"
    );
}
