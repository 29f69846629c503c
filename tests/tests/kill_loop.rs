//! The kill loop: 100 SIGKILLs of random workers (NBD, raw, file) every 50–300 ms,
//! sometimes two or three at once, under verified NBD write load on two exports (a raw
//! image, and a file node exported directly). The restart budget is lifted. Every
//! write round must be acknowledged in full, every acknowledged write must read back
//! over NBD and be in the image files, the exports must serve at the end, and QMP must
//! answer throughout. bulkhead only.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::procs;
use bulkhead_systests::writes::{self, Write, sparse_file, wait_ok};
use bulkhead_systests::{Daemon, DaemonKind, TempDir};

const IMAGE_SIZE: u64 = 16 << 20;
const BLOCK: u64 = 64 << 10;
const KILLS: usize = 100;
/// The exports and the image file under each.
const EXPORTS: [(&str, &str); 2] = [("raw0", "disk0.img"), ("file1", "disk1.img")];

/// A small deterministic generator (xorshift), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn start() -> Daemon {
    let dir = match TempDir::new("bulkhead-kill-loop") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    for (_, file) in EXPORTS {
        sparse_file(&dir.path().join(file), IMAGE_SIZE);
    }
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk0.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--blockdev",
        "driver=file,node-name=file1,filename=$DIR/disk1.img",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=raw0,writable=on",
        "--export",
        "type=nbd,id=e1,node-name=file1,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    // Only this test in this binary sets the variable, before its daemon starts.
    // SAFETY: no other thread of this test process reads or writes the environment now.
    unsafe { std::env::set_var("BULKHEAD_RESTART_BUDGET", "100000") };
    match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

/// The supervisor's worker processes.
fn worker_pids(supervisor: u32) -> Vec<u32> {
    procs::children(supervisor)
        .into_iter()
        .filter(|p| p.argv.get(1).is_some_and(|a| a == "worker"))
        .map(|p| p.pid)
        .collect()
}

/// Write rounds on both exports until `stop`; returns the rounds written.
fn write_load(dir: &Path, stop: &AtomicBool) -> u64 {
    let socket = dir.join("nbd.sock");
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<Write> = writes::writes_for(round, 16, BLOCK, IMAGE_SIZE);
        let clients: Vec<_> = EXPORTS
            .iter()
            .map(|(export, _)| writes::nbd_writer(&socket, export, &batch, BLOCK))
            .collect();
        for ((export, _), client) in EXPORTS.iter().zip(clients) {
            wait_ok(client, &format!("round {round}: writes to {export}"));
            writes::apply_directly(&dir.join(format!("expected-{export}.img")), &batch, BLOCK);
        }
        round += 1;
    }
    round
}

#[test]
fn a_hundred_random_kills_under_write_load_lose_no_acknowledged_write() {
    let daemon = start();
    let dir = daemon.dir().to_path_buf();
    let supervisor = daemon.pid();
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    };
    for (export, _) in EXPORTS {
        sparse_file(&dir.join(format!("expected-{export}.img")), IMAGE_SIZE);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, stop) = (dir.clone(), Arc::clone(&stop));
        thread::spawn(move || write_load(&dir, &stop))
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut kills = 0;
    let mut slowest_qmp = Duration::ZERO;
    while kills < KILLS {
        thread::sleep(Duration::from_millis(50 + rng.below(251)));
        let pids = worker_pids(supervisor);
        if pids.is_empty() {
            continue;
        }
        // One victim usually, sometimes two or three at once.
        let victims = match rng.below(10) {
            0 => 3,
            1 | 2 => 2,
            _ => 1,
        };
        for _ in 0..victims.min(pids.len()) {
            let pid = pids[rng.below(pids.len() as u64) as usize];
            if procs::send_signal(pid, libc::SIGKILL).is_ok() {
                kills += 1;
            }
        }
        // QMP answers throughout, normally.
        let asked = Instant::now();
        let version = qmp.execute("query-version", None);
        slowest_qmp = slowest_qmp.max(asked.elapsed());
        assert!(
            version
                .as_ref()
                .is_ok_and(|v| v["return"]["qemu"].is_object()),
            "QMP after {kills} kills: {version:?}"
        );
        assert!(
            !writer.is_finished(),
            "the writer stopped after {kills} kills"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = match writer.join() {
        Ok(r) => r,
        Err(_) => panic!("a write round failed (see above)\n{}", daemon.stderr()),
    };
    assert!(rounds > 0, "no write round completed");
    eprintln!("kill loop: {kills} kills, {rounds} rounds, slowest QMP reply {slowest_qmp:?}");
    let exports = qmp.execute("query-block-exports", None);
    assert_eq!(
        exports
            .map(|v| v["return"].as_array().map_or(0, Vec::len))
            .ok(),
        Some(2),
        "both exports serve at the end"
    );
    let socket = dir.join("nbd.sock");
    for (export, file) in EXPORTS {
        let expected = dir.join(format!("expected-{export}.img"));
        let expected = expected.to_string_lossy();
        // Read back over NBD, then straight from the image file.
        let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
        writes::assert_same_images(
            &["-f", "raw", &uri],
            &["-F", "raw", &expected],
            &format!("{export} read back over NBD"),
        );
        let disk = dir.join(file);
        writes::assert_same_images(
            &["-f", "raw", &disk.to_string_lossy()],
            &["-F", "raw", &expected],
            &format!("{export}'s image file"),
        );
    }
    let workers = qmp.execute("x-bulkhead-query-workers", None);
    assert!(
        workers.as_ref().is_ok_and(|w| w["return"]
            .as_array()
            .is_some_and(|l| l.iter().all(|w| w["restarts"].is_u64()))),
        "{workers:?}"
    );
}
