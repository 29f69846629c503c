//! Run-time corruption: what QEMU reports (compared with qemu-io on the same image),
//! the corrupt bit set on a writable image, later requests refused.

mod common;

use bulkhead_qcow2::Error;
use common::*;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// An image whose first L2 entry points at `target` (COPIED), made from a real one.
fn image_with_entry(dir: &TempDir, name: &str, entry: impl Fn(&[u8]) -> u64) -> String {
    let img = dir.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "1M"]);
    qemu_io(&img, &["write -P 0x11 0 64k"]);
    let mut b = std::fs::read(&img).expect("read");
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = entry(&b);
    b[l2..l2 + 8].copy_from_slice(&e.to_be_bytes());
    std::fs::write(&img, &b).expect("write");
    img
}

#[test]
fn overlap_with_metadata_marks_corrupt() {
    let dir = TempDir::new("corrupt");
    // The data cluster of guest offset 0 is the refcount table.
    let entry = |b: &[u8]| be64(b, 48) | 1 << 63;
    let img = image_with_entry(&dir, "ol", entry);
    let qemu = image_with_entry(&dir, "ol-qemu", entry);
    let (_, qemu_out) = run_status("qemu-io", &["-f", "qcow2", &qemu, "-c", "write 0 512"]);
    let want = "Preventing invalid write on metadata (overlaps with refcount table)";
    assert!(qemu_out.contains(want), "qemu-io: {qemu_out}");
    let q = open(&img, true);
    match q.write(&[1u8; 512], 0, false) {
        Err(Error::Corrupt {
            message,
            offset,
            size,
            fatal,
        }) => {
            assert_eq!(message, want);
            assert_eq!(offset, Some(0x10000));
            assert_eq!(size, Some(512));
            assert!(fatal);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(matches!(
        q.write(&[1u8; 512], 4096, false),
        Err(Error::Dead)
    ));
    assert!(matches!(q.read(&mut [0u8; 512], 4096), Err(Error::Dead)));
    assert!(q.info().corrupt);
    drop(q);
    // The header says corrupt now, for qemu-img too; a writable open is refused.
    assert!(qemu_img(&["info", &img]).contains("corrupt: true"));
    let e = bulkhead_qcow2::Qcow2::open(
        storage(&img, true),
        bulkhead_qcow2::OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .err()
    .expect("refused");
    assert_eq!(
        e.to_string(),
        "qcow2: Image is corrupt; cannot be opened read/write"
    );
    // Read-only, the image still opens.
    let q = open(&img, false);
    let mut buf = [0u8; 512];
    q.read(&mut buf, 65536).expect("read elsewhere");
}

#[test]
fn unaligned_entries_are_corruption() {
    let dir = TempDir::new("unaligned");
    let img = image_with_entry(&dir, "ua", |b| (be64(b, 48) + 0x10000 + 0x200) | 1 << 63);
    let (_, qemu_out) = run_status("qemu-io", &["-f", "qcow2", &img, "-r", "-c", "read 0 512"]);
    let q = open(&img, false);
    let mut buf = [0u8; 512];
    match q.read(&mut buf, 0) {
        Err(Error::Corrupt { message, fatal, .. }) => {
            assert!(!fatal, "read-only: not fatal");
            assert!(
                qemu_out.contains(&message),
                "qemu-io said: {qemu_out}, engine: {message}"
            );
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    // Read-only corruption is not fatal: other clusters still read.
    q.read(&mut buf, 65536).expect("read elsewhere");
    // An unaligned L2 table offset.
    let img2 = dir.path("ua2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img2, "1M"]);
    qemu_io(&img2, &["write -P 0x11 0 64k"]);
    let mut b = std::fs::read(&img2).expect("read");
    let l1 = be64(&b, 40) as usize;
    let v = be64(&b, l1) + 0x200;
    b[l1..l1 + 8].copy_from_slice(&v.to_be_bytes());
    std::fs::write(&img2, &b).expect("write");
    let (_, qemu_out) = run_status("qemu-io", &["-f", "qcow2", &img2, "-r", "-c", "read 0 512"]);
    let q = open(&img2, false);
    match q.read(&mut buf, 0) {
        Err(Error::Corrupt { message, .. }) => {
            assert!(
                qemu_out.contains(&message),
                "qemu-io said: {qemu_out}, engine: {message}"
            );
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}
