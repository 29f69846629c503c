//! Writes in place outside the engine (`Qcow2::try_in_place`): only where no metadata
//! changes, and the leased clusters are never freed or snapshotted under the write.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bulkhead_qcow2::{NewSnapshot, Qcow2};
use common::*;

const SIZE: u64 = 8 << 20;
const MIB: u64 = 1 << 20;

/// An image with its first MiB written by qemu-io (pattern 0x11), opened writable.
fn image(dir: &TempDir, opts: &str) -> (String, Qcow2) {
    image_with(dir, opts, "write -P 0x11 0 1M")
}

/// An image of [`SIZE`] that `write` (a qemu-io command) went into, opened writable.
fn image_with(dir: &TempDir, opts: &str, write: &str) -> (String, Qcow2) {
    let p = dir.path("t.qcow2");
    let size = SIZE.to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &p, &size]);
    qemu_io(&p, &[write]);
    let q = open(&p, true);
    // Warm the L2 cache: a lease is only given from cached tables.
    let mut b = vec![0u8; 512];
    q.read(&mut b, 0).expect("read");
    (p, q)
}

/// Writes `data` at `offset` through a lease, as the node driver does: to the file
/// at the leased host offset.
fn write_leased(path: &str, q: &Qcow2, data: &[u8], offset: u64) -> bool {
    let Some(lease) = q.try_in_place(offset, data.len() as u64).expect("no error") else {
        return false;
    };
    storage(path, true)
        .write_at(data, lease.host())
        .expect("write the file");
    drop(lease);
    true
}

#[test]
fn a_lease_covers_allocated_clusters_and_lands_where_the_engine_reads() {
    let dir = TempDir::new("inplace-where");
    let (p, q) = image(&dir, "cluster_size=65536");
    // Inside one cluster, across two, unaligned.
    assert!(write_leased(&p, &q, &[0x22; 4096], 8192));
    assert!(write_leased(&p, &q, &[0x33; 100_000], 65536 - 700));
    let mut want = vec![0x11u8; MIB as usize];
    want[8192..8192 + 4096].fill(0x22);
    want[65536 - 700..65536 - 700 + 100_000].fill(0x33);
    let mut got = vec![0u8; MIB as usize];
    q.read(&mut got, 0).expect("read");
    assert_same(&got, &want, "engine reads the leased writes");
    q.close().expect("close");
    drop(q);
    check(&p, false);
    assert_same(
        &raw_of(&p, &dir, &[])[..MIB as usize],
        &want,
        "qemu-img reads the leased writes",
    );
}

#[test]
fn no_lease_where_a_write_must_change_metadata() {
    let dir = TempDir::new("inplace-none");
    let (_p, q) = image(&dir, "cluster_size=65536");
    // Unallocated, or running from allocated into unallocated.
    assert!(q.try_in_place(2 * MIB, 4096).expect("ok").is_none());
    assert!(q.try_in_place(MIB - 4096, 8192).expect("ok").is_none());
    // Past the end, and empty.
    assert!(q.try_in_place(SIZE - 512, 1024).expect("ok").is_none());
    assert!(q.try_in_place(0, 0).expect("ok").is_none());
    // Shared with a snapshot (no COPIED flag): copy-on-write through the engine.
    q.snapshot_create(NewSnapshot {
        id: None,
        name: "s".into(),
        date_sec: 0,
        date_nsec: 0,
        vm_clock_nsec: 0,
        icount: None,
    })
    .expect("snapshot");
    assert!(q.try_in_place(0, 4096).expect("ok").is_none());
    // Once the engine copied the cluster, it is the image's alone again.
    q.write(&[0x44; 4096], 0, false).expect("write");
    assert!(q.try_in_place(0, 4096).expect("ok").is_some());
    // A read-only open never leases.
    let dir2 = TempDir::new("inplace-ro");
    let (p2, q2) = image(&dir2, "cluster_size=65536");
    drop(q2);
    let ro = open(&p2, false);
    assert!(ro.try_in_place(0, 4096).expect("ok").is_none());
}

#[test]
fn no_lease_for_partly_allocated_subclusters() {
    let dir = TempDir::new("inplace-extl2");
    // Subclusters of 2 KiB: only the first of cluster 0 written.
    let (_p, q) = image_with(&dir, "extended_l2=on", "write -P 0x11 0 2k");
    assert!(q.try_in_place(0, 2048).expect("ok").is_some());
    assert!(q.try_in_place(0, 4096).expect("ok").is_none());
}

/// Whoever frees or shares clusters (discard, snapshot, close) waits for the leases.
#[test]
fn freeing_and_snapshotting_wait_for_leases_in_flight() {
    let dir = TempDir::new("inplace-wait");
    let (_p, q) = image(&dir, "cluster_size=65536");
    type Op = fn(&Qcow2);
    let ops: [(&str, Op); 3] = [
        ("discard", |q| q.discard(0, 65536).expect("discard")),
        ("snapshot", |q| {
            q.snapshot_create(NewSnapshot {
                id: None,
                name: "w".into(),
                date_sec: 0,
                date_nsec: 0,
                vm_clock_nsec: 0,
                icount: None,
            })
            .map(|_| ())
            .expect("snapshot")
        }),
        ("close", |q| q.close().expect("close")),
    ];
    for (what, op) in ops {
        // Cluster 0 is the image's alone again (rewritten after a snapshot).
        q.write(&[0x55; 65536], 0, false).expect("write");
        let mut b = vec![0u8; 512];
        q.read(&mut b, 0).expect("read");
        let lease = q.try_in_place(0, 4096).expect("ok").expect("a lease");
        let released = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                op(&q);
                released.load(Ordering::SeqCst)
            });
            std::thread::sleep(Duration::from_millis(200));
            assert!(!waiter.is_finished(), "{what} went on under a lease");
            released.store(true, Ordering::SeqCst);
            drop(lease);
            assert!(
                waiter.join().expect("join"),
                "{what} ended before the lease"
            );
        });
        // No new lease once closed.
        if what == "close" {
            assert!(q.try_in_place(0, 4096).expect("ok").is_none());
        }
    }
}
