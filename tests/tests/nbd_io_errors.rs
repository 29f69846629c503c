//! I/O errors lose nothing: an exported image whose file system fills up, served by
//! qemu-storage-daemon 10.0.2 and by the daemon under test on identical set-ups.
//!
//! The image lives on a small tmpfs the test mounts (tests run as root; without
//! `mount` the test prints a note and passes). A raw NBD client writes until the
//! server answers an error, then checks the errno qsd sends, that the daemon keeps
//! serving another export, that the same connection writes again once space is freed,
//! and that every acknowledged write is in the image.
//!
//! Runs in the test process; the mount is undone on drop, after the daemon is gone.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::nbd::{NbdError, NbdPeer};
use bulkhead_systests::{Daemon, DaemonKind, TempDir};

const PATIENCE: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
/// Size of the tmpfs; a filler file takes half of it.
const TMPFS_MIB: u64 = 8;
const FILLER_MIB: u64 = 4;
/// The exported image's virtual size (sparse, far larger than the room left).
const IMAGE_MIB: u64 = 16;

fn under_test() -> DaemonKind {
    DaemonKind::under_test().unwrap_or_else(|e| panic!("{e}"))
}

/// A tmpfs mounted on a fresh directory; unmounted (lazily, in case a process that is
/// going away still holds a file) and removed on drop.
struct SmallTmpfs {
    dir: TempDir,
}

impl SmallTmpfs {
    /// `None` (after printing why) when this machine cannot mount one.
    fn mount() -> Option<SmallTmpfs> {
        let dir = TempDir::new("bulkhead-enospc").unwrap_or_else(|e| panic!("{e}"));
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}m"), "tmpfs"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match status {
            Ok(out) if out.status.success() => Some(SmallTmpfs { dir }),
            Ok(out) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .status();
    }
}

/// The byte chunk `i` is written with.
fn pattern(i: u64) -> u8 {
    0x10 + i as u8
}

fn chunk(i: u64) -> Vec<u8> {
    vec![pattern(i); MIB as usize]
}

fn describe(r: &Result<(), NbdError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

/// Everything one daemon showed, as text to compare with qsd's.
fn run_one(kind: DaemonKind) -> Option<String> {
    let tmpfs = SmallTmpfs::mount()?;
    let filler = tmpfs.path().join("filler");
    fs::write(&filler, vec![0xffu8; (FILLER_MIB * MIB) as usize])
        .unwrap_or_else(|e| panic!("cannot fill the tmpfs: {e}"));
    let image = tmpfs.path().join("disk.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE_MIB * MIB))
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", image.display()));

    let dir =
        TempDir::new(&format!("bulkhead-ioerr-{}", kind.name())).unwrap_or_else(|e| panic!("{e}"));
    fs::File::create(dir.path().join("other.img"))
        .and_then(|f| f.set_len(MIB))
        .unwrap_or_else(|e| panic!("cannot create other.img: {e}"));
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=full,filename=$MNT/disk.img",
        "--blockdev",
        "driver=file,node-name=other,filename=$DIR/other.img",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=full,name=full,writable=on",
        "--export",
        "type=nbd,id=e1,node-name=other,name=other,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let vars = [(
        "MNT".to_string(),
        tmpfs.path().to_string_lossy().into_owned(),
    )];
    let daemon = Daemon::start_in(kind, dir, 1, &args, &vars).unwrap_or_else(|e| panic!("{e}"));
    let socket = daemon.dir().join("nbd.sock");
    let deadline = Instant::now() + PATIENCE;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no NBD socket; stderr:\n{}",
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let open = |export: &str| {
        NbdPeer::open(&socket, export, PATIENCE).unwrap_or_else(|e| {
            panic!(
                "{}: open {export}: {e}\nstderr:\n{}",
                kind.name(),
                daemon.stderr()
            )
        })
    };
    let mut log = Vec::new();

    // Fill the file system: 1 MiB writes until one fails.
    let mut peer = open("full");
    let mut acked = Vec::new();
    let mut failed = None;
    for i in 0..IMAGE_MIB {
        match peer.write(i * MIB, &chunk(i)) {
            Ok(()) => acked.push(i),
            Err(e) => {
                log.push(format!("write of chunk {i}: {e}"));
                failed = Some(i);
                break;
            }
        }
    }
    let Some(failed) = failed else {
        panic!(
            "{}: {IMAGE_MIB} MiB fit on a {TMPFS_MIB} MiB tmpfs",
            kind.name()
        );
    };
    log.push(format!("chunks acknowledged before: {}", acked.len()));
    // A second failing write on the same connection fails the same way.
    let again = peer.write(failed * MIB, &chunk(failed));
    log.push(format!("the same write again: {}", describe(&again)));
    log.push(format!("flush: {}", describe(&peer.flush())));

    // What a real client (qemu-io) reports for a write into the full file system.
    let uri = format!("nbd+unix:///full?socket={}", socket.display());
    let qemu_io = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x77 {} 64k", (IMAGE_MIB - 1) * MIB),
            &uri,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io: {e}"));
    let text = String::from_utf8_lossy(&qemu_io.stdout).into_owned()
        + &String::from_utf8_lossy(&qemu_io.stderr);
    log.push(format!("qemu-io: {}", text.trim()));

    // The other export is served meanwhile.
    let mut other = open("other");
    let wrote = other.write(0, &[0x5a; 4096]);
    let read = other.read(0, 4096);
    log.push(format!(
        "other export: write {}, read back {}",
        describe(&wrote),
        match read {
            Ok(d) if d == vec![0x5a; 4096] => "ok".to_string(),
            Ok(_) => "wrong data".to_string(),
            Err(e) => e.to_string(),
        }
    ));

    // Space comes back: the same connection writes again.
    fs::remove_file(&filler).unwrap_or_else(|e| panic!("cannot remove the filler: {e}"));
    let retry = peer.write(failed * MIB, &chunk(failed));
    log.push(format!(
        "after freeing space, the failed write: {}",
        describe(&retry)
    ));
    if retry.is_ok() {
        acked.push(failed);
    }
    let next = peer.write((failed + 1) * MIB, &chunk(failed + 1));
    log.push(format!("and the next one: {}", describe(&next)));
    if next.is_ok() {
        acked.push(failed + 1);
    }
    log.push(format!("flush: {}", describe(&peer.flush())));

    // Nothing acknowledged is lost: through the connection and in the file.
    let mut lost = Vec::new();
    for &i in &acked {
        match peer.read(i * MIB, MIB as u32) {
            Ok(d) if d == chunk(i) => {}
            Ok(_) => lost.push(format!("chunk {i}: wrong data over NBD")),
            Err(e) => lost.push(format!("chunk {i}: read {e}")),
        }
    }
    let file = fs::read(&image).unwrap_or_else(|e| panic!("cannot read the image: {e}"));
    for &i in &acked {
        let range = (i * MIB) as usize..((i + 1) * MIB) as usize;
        if file.get(range) != Some(&chunk(i)[..]) {
            lost.push(format!("chunk {i}: wrong data in the file"));
        }
    }
    log.push(format!("acknowledged chunks not in the image: {lost:?}"));
    drop(peer);
    drop(other);
    drop(daemon);
    drop(tmpfs);
    Some(log.join("\n"))
}

#[test]
fn a_full_file_system_gives_qsd_errno_loses_nothing_and_the_connection_recovers() {
    let Some(qsd) = run_one(DaemonKind::Qsd) else {
        return;
    };
    let Some(ours) = run_one(under_test()) else {
        return;
    };
    eprintln!("{}:\n{ours}", under_test().name());
    // ENOSPC (28) on the wire, like qsd; the rest as above.
    assert_eq!(qsd, expected(&qsd), "qsd");
    assert_eq!(ours, qsd, "against qsd");
}

/// qsd's transcript with the fill-up point taken from it (it depends on how much
/// room tmpfs leaves), so that everything else is checked exactly.
fn expected(qsd: &str) -> String {
    let acked: u64 = qsd
        .lines()
        .find_map(|l| l.strip_prefix("chunks acknowledged before: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    format!(
        "write of chunk {acked}: error 28\n\
         chunks acknowledged before: {acked}\n\
         the same write again: error 28\n\
         flush: ok\n\
         qemu-io: write failed: No space left on device\n\
         other export: write ok, read back ok\n\
         after freeing space, the failed write: ok\n\
         and the next one: ok\n\
         flush: ok\n\
         acknowledged chunks not in the image: []"
    )
}
