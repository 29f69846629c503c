//! Under `--isolation kind` (the default) bulkhead runs every block driver kind in its
//! own worker process: the supervisor re-executes its own binary as
//! `bulkhead worker --kind <kind> --id <instance>`, one process per kind in use (a raw
//! node's file child lives in the raw worker), each a direct child of the supervisor,
//! and no worker survives a SIGKILL of the supervisor (PR_SET_PDEATHSIG). bulkhead
//! only; qsd has no workers. `--isolation image` is tested in `placement.rs`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::daemon::bulkhead_path;
use bulkhead_systests::procs::{self, ProcInfo};
use bulkhead_systests::{Daemon, DaemonKind, TempDir};
use serde_json::json;

/// Worker kinds named after the block drivers and export types.
const WORKER_KINDS: &[&str] = &["file", "host_device", "raw", "null-co", "null-aio", "nbd"];

/// How long workers get to appear or to die.
const SETTLE: Duration = Duration::from_secs(10);

/// The supervisor's children whose argv is `[_, "worker", "--kind", kind]` for a known
/// kind, as (kind, process).
fn workers_of(supervisor: u32) -> Vec<(String, ProcInfo)> {
    procs::children(supervisor)
        .into_iter()
        .filter_map(|p| match p.argv.as_slice() {
            [_, worker, flag, kind, ..] if worker == "worker" && flag == "--kind" => {
                Some((kind.clone(), p.clone()))
            }
            _ => None,
        })
        .filter(|(kind, _)| WORKER_KINDS.contains(&kind.as_str()))
        .collect()
}

/// Waits until the set of worker kinds equals `expected` (sorted), returning the workers.
fn wait_for_workers(supervisor: u32, expected: &[&str]) -> Vec<(String, ProcInfo)> {
    let mut expected: Vec<String> = expected.iter().map(|k| k.to_string()).collect();
    expected.sort();
    let deadline = Instant::now() + SETTLE;
    loop {
        let workers = workers_of(supervisor);
        let mut kinds: Vec<String> = workers.iter().map(|(k, _)| k.clone()).collect();
        kinds.sort();
        if kinds == expected || Instant::now() >= deadline {
            return workers;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn start_with_file_raw_null() -> Daemon {
    let dir = match TempDir::new("bulkhead-workers") {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    };
    for name in ["disk.img", "disk2.img"] {
        if let Err(e) = File::create(dir.path().join(name)).and_then(|f| f.set_len(1 << 20)) {
            panic!("cannot create {name}: {e}");
        }
    }
    // file1 has no parent, so it stays in the file worker; file0 moves into the raw
    // worker when raw0 is put over it.
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=file,node-name=file1,filename=$DIR/disk2.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--blockdev",
        "driver=null-co,node-name=null0,size=1048576",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(daemon) => daemon,
        Err(e) => panic!("{e}"),
    }
}

fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// argv[0] as the worker's kernel sees it: relative paths are relative to its cwd.
fn resolved_argv0(worker: &ProcInfo) -> PathBuf {
    let argv0 = PathBuf::from(worker.argv.first().cloned().unwrap_or_default());
    if argv0.is_absolute() {
        canonical(&argv0)
    } else {
        let cwd = fs::read_link(format!("/proc/{}/cwd", worker.pid)).unwrap_or_default();
        canonical(&cwd.join(argv0))
    }
}

fn describe(workers: &[(String, ProcInfo)]) -> String {
    workers
        .iter()
        .map(|(kind, p)| format!("{kind}: pid {} ppid {} argv {:?}", p.pid, p.ppid, p.argv))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn each_driver_kind_in_use_runs_in_exactly_one_worker_process_named_after_it() {
    let daemon = start_with_file_raw_null();
    let supervisor = daemon.pid();
    let binary = match bulkhead_path() {
        Ok(path) => canonical(&path),
        Err(e) => panic!("{e}"),
    };
    // The QMP monitor answering means start-up (and the command-line blockdevs) is done.
    if let Err(e) = daemon.qmp(0) {
        panic!("{e}\nstderr:\n{}", daemon.stderr());
    }
    let workers = wait_for_workers(supervisor, &["file", "raw", "null-co"]);
    let all_children = procs::children(supervisor);

    let mut kinds: Vec<&str> = workers.iter().map(|(k, _)| k.as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec!["file", "null-co", "raw"],
        "one worker per kind in use; children of {supervisor}:\n{}",
        all_children
            .iter()
            .map(|p| format!("pid {} argv {:?}", p.pid, p.argv))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut pids: Vec<u32> = workers.iter().map(|(_, p)| p.pid).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 3, "distinct pids:\n{}", describe(&workers));
    for (kind, worker) in &workers {
        assert_ne!(worker.pid, supervisor);
        assert_eq!(worker.ppid, supervisor, "parent of the {kind} worker");
        assert_eq!(
            worker.argv.get(1..4).map(<[String]>::to_vec),
            Some(vec!["worker".to_string(), "--kind".into(), kind.clone()]),
            "argv of the {kind} worker starts [exe, worker, --kind, {kind}]"
        );
        assert!(
            worker.argv.len() == 6
                && worker.argv[4] == "--id"
                && worker.argv[5].parse::<u32>().is_ok(),
            "argv of the {kind} worker ends with --id N: {:?}",
            worker.argv
        );
        assert_eq!(
            resolved_argv0(worker),
            binary,
            "argv[0] of the {kind} worker ({:?}) is the bulkhead binary",
            worker.argv.first()
        );
        assert_eq!(
            worker.exe.as_deref().map(canonical),
            Some(binary.clone()),
            "/proc/{}/exe of the {kind} worker",
            worker.pid
        );
    }
}

#[test]
fn a_node_of_a_new_kind_starts_its_worker_and_a_known_kind_reuses_its_worker() {
    let daemon = start_with_file_raw_null();
    let supervisor = daemon.pid();
    let mut qmp = match daemon.qmp(0) {
        Ok(qmp) => qmp,
        Err(e) => panic!("{e}\nstderr:\n{}", daemon.stderr()),
    };
    let before = wait_for_workers(supervisor, &["file", "raw", "null-co"]);
    let null_co_before: Vec<u32> = before
        .iter()
        .filter(|(k, _)| k == "null-co")
        .map(|(_, p)| p.pid)
        .collect();
    for (driver, name) in [("null-aio", "aio0"), ("null-co", "null1")] {
        let reply = qmp.execute_ok(
            "blockdev-add",
            Some(json!({"driver": driver, "node-name": name, "size": 1048576})),
        );
        assert_eq!(reply.ok(), Some(json!({})), "blockdev-add {driver}");
    }
    let after = wait_for_workers(supervisor, &["file", "raw", "null-co", "null-aio"]);
    let mut kinds: Vec<&str> = after.iter().map(|(k, _)| k.as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec!["file", "null-aio", "null-co", "raw"],
        "{}",
        describe(&after)
    );
    let null_co_after: Vec<u32> = after
        .iter()
        .filter(|(k, _)| k == "null-co")
        .map(|(_, p)| p.pid)
        .collect();
    assert_eq!(
        null_co_after, null_co_before,
        "the null-co worker is reused"
    );
}

#[test]
fn sigkill_of_the_supervisor_leaves_no_worker_alive() {
    let mut daemon = start_with_file_raw_null();
    let supervisor = daemon.pid();
    if let Err(e) = daemon.qmp(0) {
        panic!("{e}\nstderr:\n{}", daemon.stderr());
    }
    let workers = wait_for_workers(supervisor, &["file", "raw", "null-co"]);
    assert_eq!(
        workers.len(),
        3,
        "workers before the kill:\n{}",
        describe(&workers)
    );
    let descendants = procs::descendants(supervisor);

    if let Err(e) = daemon.signal(libc::SIGKILL) {
        panic!("{e}");
    }
    let exit = daemon.wait_exit(SETTLE);
    assert!(matches!(exit, Ok(Some(_))), "the supervisor died: {exit:?}");

    let deadline = Instant::now() + SETTLE;
    let mut alive: Vec<ProcInfo> = descendants.clone();
    while Instant::now() < deadline {
        alive = descendants
            .iter()
            .filter(|p| procs::is_alive(p))
            .cloned()
            .collect();
        if alive.is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    // Never leave them behind, whatever the verdict.
    for process in &alive {
        let _ = procs::send_signal(process.pid, libc::SIGKILL);
    }
    assert!(
        alive.is_empty(),
        "processes of the supervisor still alive {SETTLE:?} after its SIGKILL:\n{}",
        alive
            .iter()
            .map(|p| format!("pid {} argv {:?}", p.pid, p.argv))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn an_nbd_export_runs_in_one_nbd_worker_process() {
    let daemon = start_with_file_raw_null();
    let supervisor = daemon.pid();
    let mut qmp = match daemon.qmp(0) {
        Ok(qmp) => qmp,
        Err(e) => panic!("{e}\nstderr:\n{}", daemon.stderr()),
    };
    let socket = daemon.dir().join("nbd.sock");
    let start = qmp.execute_ok(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": socket.to_string_lossy()}}})),
    );
    assert_eq!(start.ok(), Some(json!({})), "nbd-server-start");
    for (id, node) in [("e0", "raw0"), ("e1", "null0")] {
        let added = qmp.execute_ok(
            "block-export-add",
            Some(json!({"type": "nbd", "id": id, "node-name": node})),
        );
        assert_eq!(added.ok(), Some(json!({})), "block-export-add {id}");
    }
    let workers = wait_for_workers(supervisor, &["file", "raw", "null-co", "nbd"]);
    let nbd: Vec<&ProcInfo> = workers
        .iter()
        .filter(|(k, _)| k == "nbd")
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        nbd.len(),
        1,
        "one nbd worker for two exports:\n{}",
        describe(&workers)
    );
    assert_eq!(nbd[0].ppid, supervisor);
}
