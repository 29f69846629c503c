//! Long operations in workers (`design/processes.md`, "Long operations"), through the
//! test builds' `x-bulkhead-test-fill`: a fill slower than the heartbeat's limit runs
//! in its worker while the worker keeps answering pings (so it is not killed as
//! hung), its progress grows, it can be cancelled, a worker runs at most four at
//! once, one that makes no progress for its limit fails, and a SIGKILLed worker fails its operation with a clear error and does not
//! bring it back after its restart. bulkhead only.

use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::procs::{self, worker_pid};
use bulkhead_systests::writes::sparse_file;
use bulkhead_systests::{Daemon, DaemonKind, QmpConnection, TempDir};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn start() -> Daemon {
    let dir = match TempDir::new("bulkhead-ops") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    sparse_file(&dir.path().join("disk.img"), 64 * MIB);
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    // A ping every 200 ms, unanswered for 1.2 s kills the worker: the fills here run
    // for seconds.
    // SAFETY: the only test of this binary; no other thread reads the environment.
    unsafe { std::env::set_var("BULKHEAD_HEARTBEAT_MS", "200") };
    let daemon = Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]);
    // SAFETY: as above.
    unsafe { std::env::remove_var("BULKHEAD_HEARTBEAT_MS") };
    match daemon {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

fn ok(qmp: &mut QmpConnection, command: &str, args: Value) -> Value {
    match qmp.execute_ok(command, Some(args)) {
        Ok(v) => v,
        Err(e) => panic!("{command}: {e}"),
    }
}

fn fill(qmp: &mut QmpConnection, offset: u64, length: u64, pattern: u8, speed: u64) -> u64 {
    let r = ok(
        qmp,
        "x-bulkhead-test-fill",
        json!({"node-name": "file0", "offset": offset, "length": length,
               "pattern": pattern, "speed": speed}),
    );
    r["id"].as_u64().unwrap_or_else(|| panic!("no id in {r}"))
}

fn operation(qmp: &mut QmpConnection, id: u64) -> Value {
    let all = ok(qmp, "x-bulkhead-query-operations", json!({}));
    all.as_array()
        .and_then(|l| l.iter().find(|o| o["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("operation {id} not listed: {all}"))
}

/// Polls operation `id` until `until` holds (10 s at most); returns every state seen.
fn poll(qmp: &mut QmpConnection, id: u64, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let o = operation(qmp, id);
        seen.push(o.clone());
        if until(&o) {
            return seen;
        }
        assert!(Instant::now() < deadline, "operation {id} stuck: {o}");
        thread::sleep(Duration::from_millis(150));
    }
}

fn file_worker(qmp: &mut QmpConnection) -> Value {
    let workers = ok(qmp, "x-bulkhead-query-workers", json!({}));
    workers
        .as_array()
        .and_then(|l| l.iter().find(|w| w["kind"] == "file"))
        .cloned()
        .unwrap_or_else(|| panic!("no file worker: {workers}"))
}

#[test]
fn long_operations_run_beside_the_control_loop() {
    let daemon = start();
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    let pid = file_worker(&mut qmp)["pid"].clone();

    // 3 MiB at 1 MiB/s: 2.5 times the heartbeat's limit.
    let id = fill(&mut qmp, 0, 3 * MIB, 0xab, MIB);
    let seen = poll(&mut qmp, id, |o| o["status"] != "running");
    let last = seen.last().cloned().unwrap_or_default();
    assert_eq!(last["status"], "done", "{seen:?}");
    assert_eq!(last["done"], 3 * MIB);
    let running: Vec<u64> = seen
        .iter()
        .filter(|o| o["status"] == "running")
        .filter_map(|o| o["done"].as_u64())
        .collect();
    assert!(running.windows(2).all(|w| w[0] <= w[1]), "{running:?}");
    let distinct = running.windows(2).filter(|w| w[0] < w[1]).count();
    assert!(distinct >= 3, "progress did not grow: {running:?}");
    let w = file_worker(&mut qmp);
    assert_eq!((w["pid"].clone(), w["restarts"].clone()), (pid, json!(0)));
    let image = std::fs::read(daemon.dir().join("disk.img")).unwrap_or_default();
    let (head, tail) = image.split_at((3 * MIB) as usize);
    assert!(head.iter().all(|b| *b == 0xab) && tail[..MIB as usize].iter().all(|b| *b == 0));

    // Cancelled half-way.
    let id = fill(&mut qmp, 8 * MIB, 4 * MIB, 0xcd, MIB);
    poll(&mut qmp, id, |o| o["done"].as_u64().unwrap_or(0) > 0);
    ok(&mut qmp, "x-bulkhead-operation-cancel", json!({"id": id}));
    let seen = poll(&mut qmp, id, |o| o["status"] != "running");
    let last = seen.last().cloned().unwrap_or_default();
    assert_eq!(last["status"], "cancelled", "{seen:?}");
    assert!(
        last["done"].as_u64().unwrap_or(u64::MAX) < 4 * MIB,
        "{last}"
    );

    // At most four at once.
    let slow: Vec<u64> = (0..4)
        .map(|i| fill(&mut qmp, 16 * MIB + i * MIB, MIB, 1, 4096))
        .collect();
    let refused = qmp.execute(
        "x-bulkhead-test-fill",
        Some(json!({"node-name": "file0", "offset": 0, "length": 512, "pattern": 1})),
    );
    let refused = refused.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        refused["error"]["desc"], "Device or resource busy",
        "{refused}"
    );
    for id in &slow {
        ok(&mut qmp, "x-bulkhead-operation-cancel", json!({"id": id}));
    }
    for id in &slow {
        poll(&mut qmp, *id, |o| o["status"] == "cancelled");
    }

    // A limit on progress, not on duration: one write a second misses a 300 ms limit.
    let r = ok(
        &mut qmp,
        "x-bulkhead-test-fill",
        json!({"node-name": "file0", "offset": 24 * MIB, "length": MIB, "pattern": 2,
               "speed": 512, "stall-ms": 300}),
    );
    let id = r["id"].as_u64().unwrap_or_else(|| panic!("no id in {r}"));
    let seen = poll(&mut qmp, id, |o| o["status"] != "running");
    let last = seen.last().cloned().unwrap_or_default();
    assert_eq!(last["status"], "failed", "{seen:?}");
    assert_eq!(last["error"], "no progress for 0.3 s", "{last}");

    // A worker killed mid-way fails its operation, which its replacement does not
    // bring back.
    let id = fill(&mut qmp, 32 * MIB, 8 * MIB, 0xef, MIB);
    poll(&mut qmp, id, |o| o["done"].as_u64().unwrap_or(0) > 0);
    let victim = worker_pid(daemon.pid(), "file", None);
    if let Err(e) = procs::send_signal(victim, libc::SIGKILL) {
        panic!("kill: {e}");
    }
    let seen = poll(&mut qmp, id, |o| o["status"] != "running");
    let last = seen.last().cloned().unwrap_or_default();
    assert_eq!(last["status"], "failed", "{seen:?}");
    assert_eq!(
        last["error"], "the worker process running it ended (killed by signal 9)",
        "{last}"
    );
    // The replacement serves the node, and runs new operations.
    let id2 = fill(&mut qmp, 48 * MIB, MIB, 0x11, 0);
    let seen = poll(&mut qmp, id2, |o| o["status"] != "running");
    assert_eq!(
        seen.last().map(|o| o["status"].clone()),
        Some(json!("done"))
    );
    let o = operation(&mut qmp, id);
    assert_eq!(o["status"], "failed", "{o}");
    assert_eq!(file_worker(&mut qmp)["restarts"], 1);
}
