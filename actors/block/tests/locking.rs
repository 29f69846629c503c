//! Image locking against itself and against real QEMU tools holding the same image.
//!
//! The permission sets used are the ones qsd computes for its users: a writable NBD
//! export takes consistent-read + write and unshares resize; a read-only NBD export
//! takes consistent-read and unshares resize; qemu-io on a qcow2 image takes
//! consistent-read + write + resize on the file and unshares write + resize.

mod common;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_block::config::OnOffAuto;
use bulkhead_block::lock::{ImageLock, LockError, perm};
use common::{Scratch, path_str};

const EXPORT_RW: (u64, u64) = (
    perm::CONSISTENT_READ | perm::WRITE,
    perm::CONSISTENT_READ | perm::WRITE | perm::WRITE_UNCHANGED,
);
const EXPORT_RO: (u64, u64) = (perm::CONSISTENT_READ, perm::ALL & !perm::RESIZE);
const QCOW2_FILE: (u64, u64) = (
    perm::CONSISTENT_READ | perm::WRITE | perm::RESIZE,
    perm::CONSISTENT_READ | perm::WRITE_UNCHANGED,
);

fn lock_for(path: &Path, locking: OnOffAuto) -> ImageLock {
    let fd: OwnedFd = common::open(path, false, false);
    ImageLock::new(fd, path_str(path), locking)
}

fn texts(result: Result<(), LockError>) -> Result<(), (String, String)> {
    result.map_err(|e| (e.to_string(), e.hint()))
}

/// Lock byte ranges held on `path`'s inode, from /proc/locks.
/// These tests read the system-wide `/proc/locks` while taking and dropping locks; run
/// them one at a time so one test's lock churn never shows up in another's snapshot.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn held_bytes(path: &Path) -> Vec<(u64, u64)> {
    let ino = match std::fs::metadata(path) {
        Ok(m) => std::os::unix::fs::MetadataExt::ino(&m),
        Err(e) => panic!("{e}"),
    };
    let table = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let needle = format!(":{ino} ");
    let mut bytes: Vec<(u64, u64)> = table
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let n = fields.len();
            Some((
                fields.get(n - 2)?.parse().ok()?,
                fields.get(n - 1)?.parse().ok()?,
            ))
        })
        .collect();
    bytes.sort_unstable();
    bytes
}

#[test]
fn a_second_writer_is_refused_the_resize_lock_like_qsd() {
    let _serial = serial();
    let s = Scratch::new("lock2");
    let path = s.sparse("a.img", 1 << 20);
    let mut export = lock_for(&path, OnOffAuto::Auto);
    assert_eq!(texts(export.set_perm(EXPORT_RW.0, EXPORT_RW.1)), Ok(()));
    assert_eq!(held_bytes(&path), vec![(100, 101), (203, 203)]);
    let mut qcow2 = lock_for(&path, OnOffAuto::Auto);
    let name = path_str(&path).to_string();
    assert_eq!(
        texts(qcow2.set_perm(QCOW2_FILE.0, QCOW2_FILE.1)),
        Err((
            "Failed to get \"resize\" lock".to_string(),
            format!("Is another process using the image [{name}]?")
        ))
    );
    // The failed attempt left nothing behind.
    assert_eq!(held_bytes(&path), vec![(100, 101), (203, 203)]);
    assert_eq!(qcow2.perm(), 0);
    // Another read-write export shares everything the first one needs.
    let mut second = lock_for(&path, OnOffAuto::On);
    assert_eq!(texts(second.set_perm(EXPORT_RW.0, EXPORT_RW.1)), Ok(()));
    drop(export);
    drop(second);
    assert_eq!(held_bytes(&path), vec![]);
    assert_eq!(texts(qcow2.set_perm(QCOW2_FILE.0, QCOW2_FILE.1)), Ok(()));
}

#[test]
fn locking_off_neither_takes_nor_checks_locks() {
    let _serial = serial();
    let s = Scratch::new("lockoff");
    let path = s.sparse("a.img", 1 << 20);
    let mut holder = lock_for(&path, OnOffAuto::Auto);
    assert_eq!(texts(holder.set_perm(QCOW2_FILE.0, QCOW2_FILE.1)), Ok(()));
    let mut off = lock_for(&path, OnOffAuto::Off);
    assert_eq!(texts(off.set_perm(QCOW2_FILE.0, QCOW2_FILE.1)), Ok(()));
    assert_eq!(
        held_bytes(&path),
        vec![(100, 101), (103, 103), (201, 201), (203, 203)]
    );
}

#[test]
fn dropping_permissions_releases_their_bytes_without_checking() {
    let _serial = serial();
    let s = Scratch::new("lockdrop");
    let path = s.sparse("a.img", 1 << 20);
    let mut lock = lock_for(&path, OnOffAuto::Auto);
    assert_eq!(texts(lock.set_perm(QCOW2_FILE.0, QCOW2_FILE.1)), Ok(()));
    assert_eq!(
        texts(lock.set_perm(perm::CONSISTENT_READ, perm::ALL)),
        Ok(())
    );
    assert_eq!(held_bytes(&path), vec![(100, 100)]);
    lock.release();
    assert_eq!(held_bytes(&path), vec![]);
}

/// A qemu-io process holding a qcow2 image open read-write until dropped.
struct QemuIo {
    child: Child,
}

impl QemuIo {
    fn hold(path: &Path) -> QemuIo {
        let child = Command::new("qemu-io")
            .args(["-f", "qcow2", path_str(path)])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => panic!("cannot run qemu-io: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while held_bytes(path).is_empty() {
            assert!(Instant::now() < deadline, "qemu-io did not lock the image");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuIo { child }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qcow2_image(s: &Scratch) -> std::path::PathBuf {
    let path = s.dir.join("c.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", path_str(&path), "1M"])
        .status();
    assert!(
        matches!(status, Ok(st) if st.success()),
        "qemu-img create failed"
    );
    path
}

#[test]
fn qemu_io_holding_a_qcow2_image_excludes_our_writers_and_readers_with_qsd_texts() {
    let _serial = serial();
    let s = Scratch::new("qemuio");
    let path = qcow2_image(&s);
    let holder = QemuIo::hold(&path);
    assert_eq!(
        held_bytes(&path),
        vec![(100, 101), (103, 103), (201, 201), (203, 203)]
    );
    let name = path_str(&path).to_string();
    let hint = format!("Is another process using the image [{name}]?");
    let mut writer = lock_for(&path, OnOffAuto::Auto);
    assert_eq!(
        texts(writer.set_perm(EXPORT_RW.0, EXPORT_RW.1)),
        Err(("Failed to get \"write\" lock".to_string(), hint.clone()))
    );
    let mut reader = lock_for(&path, OnOffAuto::Auto);
    assert_eq!(
        texts(reader.set_perm(EXPORT_RO.0, EXPORT_RO.1)),
        Err(("Failed to get shared \"resize\" lock".to_string(), hint))
    );
    // force-share read-only users (consistent read, sharing everything) coexist.
    assert_eq!(
        texts(reader.set_perm(perm::CONSISTENT_READ, perm::ALL)),
        Ok(())
    );
    drop(holder);
    assert_eq!(texts(writer.set_perm(EXPORT_RW.0, EXPORT_RW.1)), Ok(()));
}

#[test]
fn qemu_img_is_refused_while_we_hold_an_image_like_a_qcow2_node() {
    let _serial = serial();
    let s = Scratch::new("qemuimg");
    let path = qcow2_image(&s);
    let mut lock = lock_for(&path, OnOffAuto::Auto);
    assert_eq!(texts(lock.set_perm(QCOW2_FILE.0, QCOW2_FILE.1)), Ok(()));
    let name = path_str(&path).to_string();
    let out = Command::new("qemu-img").args(["info", &name]).output();
    let Ok(out) = out else {
        panic!("cannot run qemu-img")
    };
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "qemu-img: Could not open '{name}': Failed to get shared \"write\" lock\nIs another process using the image [{name}]?\n"
        )
    );
    lock.release();
    let out = Command::new("qemu-img").args(["info", &name]).output();
    assert!(matches!(out, Ok(o) if o.status.success()));
}

/// A qemu-storage-daemon exporting `path` (raw over file) writably over NBD.
struct Qsd {
    child: Child,
}

fn qsd_args(s: &Scratch, path: &Path) -> Vec<String> {
    vec![
        "--nbd-server".to_string(),
        format!(
            "addr.type=unix,addr.path={}",
            path_str(&s.dir.join("nbd.sock"))
        ),
        "--blockdev".to_string(),
        format!("driver=file,node-name=f,filename={}", path_str(path)),
        "--blockdev".to_string(),
        "driver=raw,node-name=r,file=f".to_string(),
        "--export".to_string(),
        "type=nbd,id=e,node-name=r,writable=on".to_string(),
    ]
}

impl Qsd {
    fn export(s: &Scratch, path: &Path) -> Qsd {
        let child = Command::new("qemu-storage-daemon")
            .args(qsd_args(s, path))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => panic!("cannot run qemu-storage-daemon: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while held_bytes(path).is_empty() {
            assert!(Instant::now() < deadline, "qsd did not lock the image");
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd { child }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn qsd_and_bulkhead_exclude_each_other_both_ways() {
    let _serial = serial();
    let s = Scratch::new("qsd");
    let path = s.sparse("a.raw", 1 << 20);
    {
        let qsd = Qsd::export(&s, &path);
        // qsd's writable NBD export: consistent read + write, resize unshared.
        assert_eq!(held_bytes(&path), vec![(100, 101), (203, 203)]);
        let mut ours = lock_for(&path, OnOffAuto::Auto);
        assert_eq!(
            texts(ours.set_perm(QCOW2_FILE.0, QCOW2_FILE.1)).map_err(|(text, _)| text),
            Err("Failed to get \"resize\" lock".to_string())
        );
        assert_eq!(texts(ours.set_perm(EXPORT_RW.0, EXPORT_RW.1)), Ok(()));
        drop(qsd);
    }
    let mut ours = lock_for(&path, OnOffAuto::Auto);
    assert_eq!(texts(ours.set_perm(QCOW2_FILE.0, QCOW2_FILE.1)), Ok(()));
    let out = Command::new("qemu-storage-daemon")
        .args(qsd_args(&s, &path))
        .stdin(Stdio::null())
        .output();
    let Ok(out) = out else {
        panic!("cannot run qemu-storage-daemon")
    };
    assert_eq!(out.status.code(), Some(1));
    // qsd drops the hint line when the conflict shows up while adding an export.
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "qemu-storage-daemon: --export type=nbd,id=e,node-name=r,writable=on: Failed to get \"write\" lock\n"
    );
}
