//! Every worker runs sandboxed (seccomp in filter mode, no_new_privs, no capabilities),
//! a worker that makes a forbidden system call dies of SIGSYS and is replaced, and a
//! worker that breaks the control protocol is killed and replaced while the supervisor
//! carries on. Needs a binary built with `--features bulkhead/test-hooks` (the README's
//! test command builds one); bulkhead only.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::procs::{self, worker_pid};
use bulkhead_systests::{Daemon, DaemonKind, QmpConnection, TempDir};
use serde_json::{Value, json};

/// Tests that set `BULKHEAD_TEST_MISBEHAVE` for their daemon run one at a time.
static ENV_LOCK: Mutex<()> = Mutex::new(());

/// Worker kinds under `--isolation kind` (`file`: a file node with no parent; raw0's
/// file child lives in the raw worker).
const KINDS: &[&str] = &["file", "raw", "null-co", "null-aio", "qcow2", "nbd"];
/// Worker kinds under `--isolation image`.
const IMAGE_KINDS: &[&str] = &["image", "nbd"];

fn start() -> Daemon {
    start_with("kind")
}

fn start_with(isolation: &str) -> Daemon {
    let dir = match TempDir::new("bulkhead-sandbox") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    for name in ["disk.img", "disk2.img"] {
        if let Err(e) =
            std::fs::File::create(dir.path().join(name)).and_then(|f| f.set_len(16 << 20))
        {
            panic!("cannot create {name}: {e}");
        }
    }
    let qcow2 = dir.path().join("disk3.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow2)
        .arg("16M")
        .output();
    assert!(made.is_ok_and(|o| o.status.success()), "qemu-img create");
    let args: Vec<String> = [
        "--isolation",
        isolation,
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=file,node-name=file1,filename=$DIR/disk2.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--blockdev",
        "driver=null-co,node-name=null0,size=1048576",
        "--blockdev",
        "driver=null-aio,node-name=null1,size=1048576",
        "--blockdev",
        "driver=file,node-name=file2,filename=$DIR/disk3.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=q0,file=file2",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=raw0,writable=on",
        "--export",
        "type=nbd,id=e1,node-name=q0,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

fn qemu_io(dir: &Path, cmds: &[&str]) -> (bool, String) {
    qemu_io_on(dir, "raw0", cmds)
}

fn qemu_io_on(dir: &Path, export: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.arg("--image-opts").arg(format!(
        "driver=nbd,server.type=unix,server.path={},export={export},reconnect-delay=30,open-timeout=30",
        dir.join("nbd.sock").display()
    ));
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    match c.output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => panic!("cannot run qemu-io (install qemu-utils): {e}"),
    }
}

fn execute(qmp: &mut QmpConnection, command: &str) -> Value {
    match qmp.execute(command, None) {
        Ok(v) => v["return"].clone(),
        Err(e) => panic!("QMP stopped answering: {e}"),
    }
}

fn wait_for_stderr(daemon: &Daemon, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemon.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "stderr never said {needle:?}:\n{}",
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_worker_kind_runs_with_seccomp_no_new_privs_and_no_capabilities() {
    let _env = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    check_sandboxes("kind", KINDS);
    check_sandboxes("image", IMAGE_KINDS);
}

fn check_sandboxes(isolation: &str, kinds: &[&str]) {
    let daemon = start_with(isolation);
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    let (ok, out) = qemu_io(daemon.dir(), &["write -P 0x33 0 64k", "read -P 0x33 0 64k"]);
    assert!(ok, "traffic failed: {out}");
    // The qcow2 engine allocating, copying on write and reading under its filter.
    let (ok, out) = qemu_io_on(
        daemon.dir(),
        "q0",
        &[
            "write -P 0x34 1000 200k",
            "write -z 64k 64k",
            "read -P 0x34 1000 1000",
        ],
    );
    assert!(ok, "qcow2 traffic failed: {out}");
    let workers = execute(&mut qmp, "x-bulkhead-query-workers");
    for kind in kinds {
        let pid = worker_pid(daemon.pid(), kind, None);
        assert_eq!(
            status_field(pid, "Seccomp"),
            "2",
            "{kind} worker (pid {pid}) seccomp mode"
        );
        assert_eq!(
            status_field(pid, "NoNewPrivs"),
            "1",
            "{kind} worker no_new_privs"
        );
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(
                status_field(pid, set),
                "0000000000000000",
                "{kind} worker {set}"
            );
        }
        let layers = workers
            .as_array()
            .and_then(|l| l.iter().find(|w| w["kind"] == *kind))
            .map(|w| w["sandbox"].clone())
            .unwrap_or(Value::Null);
        for layer in [
            "seccomp",
            "no-new-privs",
            "caps-dropped",
            "close-fds",
            "not-dumpable",
        ] {
            assert!(
                layers
                    .as_array()
                    .is_some_and(|l| l.iter().any(|x| x == layer)),
                "{kind} worker does not report {layer}: {layers}"
            );
        }
    }
}

#[test]
fn a_forbidden_syscall_kills_the_worker_with_sigsys_and_the_export_serves_again() {
    let _env = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let daemon = start();
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    let (ok, out) = qemu_io(daemon.dir(), &["write -P 0x44 1M 64k"]);
    assert!(ok, "{out}");
    for kind in ["raw", "file", "nbd", "null-co"] {
        let victim = worker_pid(daemon.pid(), kind, None);
        if let Err(e) = procs::send_signal(victim, libc::SIGUSR1) {
            panic!("cannot signal worker {}: {e}", victim);
        }
        let replacement = worker_pid(daemon.pid(), kind, Some(victim));
        assert_ne!(replacement, victim);
        wait_for_stderr(
            &daemon,
            &format!("pid={victim} status=killed by signal {}", libc::SIGSYS),
        );
        let (ok, out) = qemu_io(
            daemon.dir(),
            &[
                "read -P 0x44 1M 64k",
                "write -P 0x45 2M 4k",
                "read -P 0x45 2M 4k",
            ],
        );
        assert!(
            ok,
            "after the {kind} worker's SIGSYS the export must serve: {out}"
        );
        assert_eq!(
            execute(&mut qmp, "query-block-exports"),
            json!([
                {"node-name": "q0", "shutting-down": false, "type": "nbd", "id": "e1"},
                {"node-name": "raw0", "shutting-down": false, "type": "nbd", "id": "e0"}
            ])
        );
    }
}

#[test]
fn a_worker_that_breaks_the_control_protocol_is_killed_and_replaced() {
    // The NBD worker is the one kind that may send events; flooding them is a violation.
    for (mode, kind) in [
        ("garbage", "raw"),
        ("oversized", "raw"),
        ("truncated", "raw"),
        ("event-flood", "nbd"),
    ] {
        let _env = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: ENV_LOCK keeps other test threads of this binary off the environment.
        unsafe { std::env::set_var("BULKHEAD_TEST_MISBEHAVE", mode) };
        let daemon = start();
        // SAFETY: as above.
        unsafe { std::env::remove_var("BULKHEAD_TEST_MISBEHAVE") };
        let mut qmp = match daemon.qmp(0) {
            Ok(q) => q,
            Err(e) => panic!("{e}\n{}", daemon.stderr()),
        };
        let victim = worker_pid(daemon.pid(), kind, None);
        if let Err(e) = procs::send_signal(victim, libc::SIGUSR2) {
            panic!("cannot signal worker {}: {e}", victim);
        }
        wait_for_stderr(&daemon, "killing misbehaving worker");
        if mode == "event-flood" {
            wait_for_stderr(&daemon, "reason=event flood");
        }
        let replacement = worker_pid(daemon.pid(), kind, Some(victim));
        assert_ne!(replacement, victim, "{mode}");
        let (ok, out) = qemu_io(daemon.dir(), &["write -P 0x55 0 64k", "read -P 0x55 0 64k"]);
        assert!(
            ok,
            "{mode}: the export must serve through the replacement: {out}"
        );
        let version = execute(&mut qmp, "query-version");
        assert!(
            version["package"].is_string(),
            "{mode}: supervisor unharmed: {version}"
        );
    }
}

#[test]
fn a_worker_may_open_files_beside_its_own_images_only_and_not_flood_questions() {
    let _env = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Node ids follow creation order: file0 1, file1 2, raw0 3. The raw worker hosts
    // raw0 and its child file0; file1 stays in the file worker.
    // SAFETY: ENV_LOCK keeps other test threads of this binary off the environment.
    unsafe {
        std::env::set_var("BULKHEAD_TEST_MISBEHAVE", "ask");
        std::env::set_var(
            "BULKHEAD_TEST_ASK",
            "1:disk.img;3:./disk.img;2:disk.img;1:disk2.img;1:/etc/passwd;1:../disk2.img;1:nothing.img",
        );
    }
    let daemon = start();
    // SAFETY: as above.
    unsafe {
        std::env::remove_var("BULKHEAD_TEST_MISBEHAVE");
        std::env::remove_var("BULKHEAD_TEST_ASK");
    }
    // The greeting comes once the command line has run: every worker is up.
    if let Err(e) = daemon.qmp(0) {
        panic!("{e}\n{}", daemon.stderr());
    }
    let victim = worker_pid(daemon.pid(), "raw", None);
    if let Err(e) = procs::send_signal(victim, libc::SIGUSR2) {
        panic!("cannot signal worker {victim}: {e}");
    }
    for expected in [
        "node=1 file=disk.img: opened, 16777216 bytes",
        "node=3 file=./disk.img: opened, 16777216 bytes",
        "node=2 file=disk.img: refused: NotFound",
        // file1's image, served by the file worker: never handed to another worker.
        "node=1 file=disk2.img: refused: Invalid",
        "node=1 file=/etc/passwd: refused: Invalid",
        "node=1 file=../disk2.img: refused: Io",
        "node=1 file=nothing.img: refused: Io",
    ] {
        wait_for_stderr(&daemon, expected);
    }
    assert_eq!(
        worker_pid(daemon.pid(), "raw", None),
        victim,
        "questions within the rules keep the worker alive"
    );

    // SAFETY: as above.
    unsafe { std::env::set_var("BULKHEAD_TEST_MISBEHAVE", "ask-flood") };
    let daemon = start();
    // SAFETY: as above.
    unsafe { std::env::remove_var("BULKHEAD_TEST_MISBEHAVE") };
    if let Err(e) = daemon.qmp(0) {
        panic!("{e}\n{}", daemon.stderr());
    }
    let victim = worker_pid(daemon.pid(), "raw", None);
    if let Err(e) = procs::send_signal(victim, libc::SIGUSR2) {
        panic!("cannot signal worker {victim}: {e}");
    }
    wait_for_stderr(&daemon, "reason=question flood");
    let replacement = worker_pid(daemon.pid(), "raw", Some(victim));
    assert_ne!(replacement, victim);
    let (ok, out) = qemu_io(daemon.dir(), &["write -P 0x66 0 64k", "read -P 0x66 0 64k"]);
    assert!(ok, "the export serves through the replacement: {out}");
}

#[test]
fn a_hung_worker_misses_its_heartbeat_and_is_replaced() {
    let _env = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: ENV_LOCK keeps other test threads of this binary off the environment.
    unsafe {
        std::env::set_var("BULKHEAD_TEST_MISBEHAVE", "hang");
        std::env::set_var("BULKHEAD_HEARTBEAT_MS", "200");
    }
    let daemon = start();
    // SAFETY: as above.
    unsafe {
        std::env::remove_var("BULKHEAD_TEST_MISBEHAVE");
        std::env::remove_var("BULKHEAD_HEARTBEAT_MS");
    }
    if let Err(e) = daemon.qmp(0) {
        panic!("{e}\n{}", daemon.stderr());
    }
    let victim = worker_pid(daemon.pid(), "raw", None);
    if let Err(e) = procs::send_signal(victim, libc::SIGUSR2) {
        panic!("cannot signal worker {victim}: {e}");
    }
    wait_for_stderr(&daemon, "killing hung worker (no heartbeat)");
    let replacement = worker_pid(daemon.pid(), "raw", Some(victim));
    assert_ne!(replacement, victim);
    let (ok, out) = qemu_io(daemon.dir(), &["write -P 0x77 0 64k", "read -P 0x77 0 64k"]);
    assert!(ok, "the export serves through the replacement: {out}");
}
