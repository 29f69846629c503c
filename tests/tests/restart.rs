//! Crash-restartable workers: SIGKILL of the NBD worker and of the image's worker, in
//! both placements (`--isolation kind` and `image`; under `image` the NBD worker is
//! the export's own and the NBD listener is killed too), while QEMU's NBD client writes a
//! verifiable pattern. Every write the client saw
//! acknowledged must be in the image afterwards (compared with `qemu-img compare`
//! against the same writes applied directly), and a QMP client connected throughout
//! sees only normal replies. The same with a qcow2 image that every write allocates
//! into (then `qemu-img check` must find no corruption; leaks are allowed, as in QEMU).
//! bulkhead only; qsd has no workers to kill.

use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::procs::{self, worker_pid};
use bulkhead_systests::writes::{self, Write, sparse_file, wait_ok};
use bulkhead_systests::{Daemon, DaemonKind, QmpConnection, TempDir};
use serde_json::{Value, json};

const IMAGE_SIZE: u64 = 64 << 20;
const BLOCK: u64 = 64 << 10;
/// Writes per round, so a kill lands while the client is busy.
const WRITES_PER_ROUND: u64 = 48;

/// Both tests set `BULKHEAD_RESTART_BUDGET` for the daemon they start; run them one at
/// a time so each daemon sees its own value.
static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn start(dir: TempDir, budget: &str, isolation: &str, format: &str) -> Daemon {
    let image = dir.path().join("disk.img");
    if format == "qcow2" {
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(IMAGE_SIZE.to_string())
            .output();
        assert!(out.is_ok_and(|o| o.status.success()), "qemu-img create");
    } else {
        sparse_file(&image, IMAGE_SIZE);
    }
    let top = format!("driver={format},node-name=raw0,file=file0");
    let args: Vec<String> = [
        "--isolation",
        isolation,
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        &top,
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=raw0,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    // The kill loop kills each worker eight times within a minute, past the default
    // budget of five; the budget itself is tested below.
    // SAFETY: callers hold ENV_LOCK, so no other test thread touches the environment
    // while it changes.
    unsafe { std::env::set_var("BULKHEAD_RESTART_BUDGET", budget) };
    match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

fn writes_for(round: u64) -> Vec<Write> {
    writes::writes_for(round, WRITES_PER_ROUND, BLOCK, IMAGE_SIZE)
}

fn exports(qmp: &mut QmpConnection) -> Value {
    match qmp.execute("query-block-exports", None) {
        Ok(reply) => reply["return"].clone(),
        Err(e) => panic!("QMP stopped answering: {e}"),
    }
}

#[test]
fn sigkill_of_any_worker_loses_no_acknowledged_write() {
    // The raw node and its file child share the raw worker.
    kill_rounds("kind", "raw", &["nbd", "raw"], 16);
}

#[test]
fn sigkill_of_any_worker_loses_no_acknowledged_write_with_one_worker_per_image() {
    kill_rounds("image", "raw", &["export", "image", "listener"], 12);
}

#[test]
fn sigkill_of_the_qcow2_worker_under_allocating_writes_loses_nothing() {
    kill_rounds("kind", "qcow2", &["qcow2", "nbd"], 12);
}

#[test]
fn sigkill_of_a_qcow2_image_worker_under_allocating_writes_loses_nothing() {
    kill_rounds("image", "qcow2", &["image", "export"], 8);
}

/// Whether worker `w` (from x-bulkhead-query-workers) is the one `what` names: a kind,
/// or a role (`export`: the NBD worker serving the export; `listener`).
fn is(w: &Value, what: &str) -> bool {
    w["kind"] == what || w["role"] == what
}

/// The pid of the worker `what` names, other than `not` (waiting for a replacement).
fn pid_of(qmp: &mut QmpConnection, what: &str, not: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let workers = match qmp.execute_ok("x-bulkhead-query-workers", None) {
            Ok(w) => w,
            Err(e) => panic!("QMP stopped answering: {e}"),
        };
        let found = workers
            .as_array()
            .and_then(|l| l.iter().find(|w| is(w, what)))
            .and_then(|w| w["pid"].as_u64())
            .map(|p| p as u32)
            .filter(|p| Some(*p) != not);
        if let Some(p) = found {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no (new) {what} worker: {workers}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `rounds` rounds of writes on an image in `format`, each killing the next of `kinds`
/// under them.
fn kill_rounds(isolation: &str, format: &str, kinds: &[&str], rounds: u64) {
    let _env = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = match TempDir::new("bulkhead-restart") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut daemon = start(dir, "1000", isolation, format);
    let d = daemon.dir().to_path_buf();
    sparse_file(&d.join("expected.img"), IMAGE_SIZE);
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    let normal = json!([{"node-name": "raw0", "shutting-down": false, "type": "nbd", "id": "e0"}]);
    for round in 0..rounds {
        let kind = kinds[(round % kinds.len() as u64) as usize];
        let victim = pid_of(&mut qmp, kind, None);
        let writes = writes_for(round);
        let client = writes::nbd_writer(&d.join("nbd.sock"), "raw0", &writes, BLOCK);
        // Let the client get going, then kill the worker under it.
        thread::sleep(Duration::from_millis(20 + 15 * (round % 4)));
        if let Err(e) = procs::send_signal(victim, libc::SIGKILL) {
            panic!("cannot signal worker {}: {e}", victim);
        }
        wait_ok(
            client,
            &format!("round {round}: qemu-io while the {kind} worker was killed"),
        );
        // The same writes, applied directly: the expected image.
        writes::apply_directly(&d.join("expected.img"), &writes, BLOCK);
        let replacement = pid_of(&mut qmp, kind, Some(victim));
        assert_ne!(replacement, victim);
        assert_eq!(
            exports(&mut qmp),
            normal,
            "round {round}: the export must survive"
        );
    }
    let workers = match qmp.execute("x-bulkhead-query-workers", None) {
        Ok(w) => w,
        Err(e) => panic!("{e}"),
    };
    for kind in kinds {
        let restarts = workers["return"]
            .as_array()
            .and_then(|l| l.iter().find(|w| is(w, kind)))
            .map(|w| w["restarts"].clone());
        assert_eq!(
            restarts,
            Some(json!(rounds / kinds.len() as u64)),
            "restarts of {kind}: {workers}"
        );
    }
    let (disk, expected) = (d.join("disk.img"), d.join("expected.img"));
    if format == "qcow2" {
        // Closed first: the image must be consistent for QEMU after the kills.
        let _ = qmp.execute("quit", None);
        let _ = daemon.wait_exit(Duration::from_secs(20));
        let check = std::process::Command::new("qemu-img")
            .arg("check")
            .arg(&disk)
            .output();
        let Ok(check) = check else {
            panic!("cannot run qemu-img check");
        };
        // Exit status 0: clean; 3: leaked clusters only. Anything else is corruption.
        assert!(
            matches!(check.status.code(), Some(0 | 3)),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    writes::assert_same_images(
        &["-U", "-f", format, &disk.to_string_lossy()],
        &["-F", "raw", &expected.to_string_lossy()],
        "the image against the acknowledged writes",
    );
}

#[test]
fn a_worker_that_keeps_dying_has_its_export_deleted_after_the_budget() {
    let _env = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = match TempDir::new("bulkhead-budget") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let daemon = start(dir, "3", "kind", "raw");
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    let supervisor = daemon.pid();
    let mut last = None;
    for _ in 0..4 {
        let pid = worker_pid(supervisor, "raw", last);
        if let Err(e) = procs::send_signal(pid, libc::SIGKILL) {
            panic!("cannot signal worker {}: {e}", pid);
        }
        last = Some(pid);
        thread::sleep(Duration::from_millis(1500));
    }
    // The fourth death exceeds a budget of three: the export goes, with its event.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = exports(&mut qmp);
        if reply == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "export still there: {reply}");
        thread::sleep(Duration::from_millis(200));
    }
    let events = qmp.take_events();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "BLOCK_EXPORT_DELETED" && e["data"]["id"] == "e0"),
        "no BLOCK_EXPORT_DELETED in {events:?}"
    );
    assert_eq!(
        qmp.execute("query-version", None)
            .ok()
            .map(|v| v["return"]["package"].is_string()),
        Some(true),
        "the supervisor must be unharmed"
    );
}
