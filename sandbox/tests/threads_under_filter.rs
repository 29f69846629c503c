//! The seccomp allow-list installed in a whole (multi-threaded) process, as a worker
//! does it: threads started afterwards, sleeps, big allocations and thread exit must
//! all pass, and a forbidden call must not.
//!
//! This file is its own test binary, so the filter it installs (on every thread, like
//! a worker) touches nothing else. It has one test on purpose: the filter stays for
//! the rest of the process.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use bulkhead_ipc::wire::WorkerKind;

#[test]
fn threads_start_sleep_allocate_and_exit_under_a_workers_filter() {
    // A thread that exists before the filter, like the runtime's, must get it too.
    let (to_early, early_rx) = mpsc::channel::<()>();
    let early = std::thread::spawn(move || {
        let _ = early_rx.recv();
        std::fs::File::open("/")
            .map(|_| ())
            .map_err(|e| e.raw_os_error())
    });

    let applied =
        bulkhead_sandbox::apply_seccomp(WorkerKind::Driver(bulkhead_ipc::wire::DriverKind::Raw));
    assert!(applied.is_ok(), "{applied:?}");

    // Thread creation goes through clone3 -> ENOSYS -> clone(CLONE_THREAD).
    let (tx, rx) = mpsc::channel();
    let late = std::thread::Builder::new()
        .name("after-filter".into())
        .spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            let mut map = HashMap::new();
            // Large enough for mmap/munmap rather than the heap.
            map.insert(1u32, vec![7u8; 8 << 20]);
            let sum: u64 = map.values().map(|v| u64::from(v[v.len() - 1])).sum();
            let _ = tx.send(sum);
        });
    assert!(late.is_ok());
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(7));
    assert!(late.is_ok_and(|h| h.join().is_ok()));

    // The pre-existing thread is filtered too: opening a file answers ENOENT.
    assert_eq!(to_early.send(()), Ok(()));
    assert_eq!(early.join().ok(), Some(Err(Some(libc::ENOENT))));
}
