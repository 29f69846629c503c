//! Open errors: the engine's texts are qsd's. Each broken image is offered to
//! qemu-storage-daemon 10.0.2 (the oracle) and to the engine; both must print the
//! text listed here.

mod common;

use std::process::Command;

use bulkhead_qcow2::{OpenOptions, Qcow2};
use common::*;

fn set32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn set64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// qsd's error for opening `img` (None: it opened).
fn qsd_error(img: &str, writable: bool) -> Option<String> {
    let ro = if writable { "" } else { ",read-only=on" };
    let file = format!("driver=file,node-name=f,filename={img}{ro}");
    let q = format!("driver=qcow2,node-name=q,file=f{ro}");
    let out = Command::new("timeout")
        .args([
            "5",
            "qemu-storage-daemon",
            "--blockdev",
            &file,
            "--blockdev",
            &q,
        ])
        .output()
        .expect("qemu-storage-daemon must be installed");
    if out.status.code() == Some(124) {
        return None; // it opened and kept running
    }
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let prefix = format!("qemu-storage-daemon: --blockdev {q}: ");
    Some(
        err.lines()
            .next()
            .unwrap_or("")
            .strip_prefix(&prefix)
            .unwrap_or(&err)
            .to_string(),
    )
}

fn engine_error(img: &str, writable: bool) -> Option<String> {
    let opts = OpenOptions {
        writable,
        ..OpenOptions::default()
    };
    Qcow2::open(storage(img, writable), opts)
        .err()
        .map(|e| e.to_string())
}

type Patch = fn(&mut Vec<u8>);

#[test]
fn open_errors_match_qsd() {
    let dir = TempDir::new("openerr");
    let good = dir.path("good");
    qemu_img(&["create", "-q", "-f", "qcow2", &good, "1M"]);
    let base = std::fs::read(&good).expect("image");
    let cases: Vec<(&str, Patch, bool, &str)> = vec![
        (
            "magic",
            |b| set32(b, 0, 0x1234_5678),
            false,
            "Image is not in qcow2 format",
        ),
        (
            "version 4",
            |b| set32(b, 4, 4),
            false,
            "Unsupported qcow2 version 4",
        ),
        (
            "version 1",
            |b| set32(b, 4, 1),
            false,
            "Unsupported qcow2 version 1",
        ),
        (
            "cluster bits 22",
            |b| set32(b, 20, 22),
            false,
            "Unsupported cluster size: 2^22",
        ),
        (
            "cluster bits 8",
            |b| set32(b, 20, 8),
            false,
            "Unsupported cluster size: 2^8",
        ),
        (
            "header length",
            |b| set32(b, 100, 96),
            false,
            "qcow2 header too short",
        ),
        (
            "header length > cluster",
            |b| set32(b, 100, 0x20000),
            false,
            "qcow2 header exceeds cluster size",
        ),
        (
            "backing offset",
            |b| set64(b, 8, 0x20000),
            false,
            "Invalid backing file offset",
        ),
        (
            "refcount order 7",
            |b| set32(b, 96, 7),
            false,
            "Reference count entry width too large; may not exceed 64 bits",
        ),
        (
            "unknown incompatible",
            |b| set64(b, 72, 1 << 20),
            false,
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000",
        ),
        (
            "corrupt, writable",
            |b| set64(b, 72, 2),
            true,
            "qcow2: Image is corrupt; cannot be opened read/write",
        ),
        (
            "no refcount table",
            |b| set32(b, 56, 0),
            false,
            "Image does not contain a reference count table",
        ),
        (
            "refcount table too large",
            |b| set32(b, 56, 0x100000),
            false,
            "Reference count table too large",
        ),
        (
            "refcount table offset",
            |b| set64(b, 48, 0x10200),
            false,
            "Reference count table offset invalid",
        ),
        (
            "snapshots",
            |b| set32(b, 60, 100_000),
            false,
            "Snapshot table too large",
        ),
        (
            "snapshot offset",
            |b| {
                set32(b, 60, 1);
                set64(b, 64, 0x777);
            },
            false,
            "Snapshot table offset invalid",
        ),
        (
            "L1 size",
            |b| set32(b, 36, 0x0100_0000),
            false,
            "Active L1 table too large",
        ),
        (
            "L1 offset",
            |b| set64(b, 40, 0x30008),
            false,
            "Active L1 table offset invalid",
        ),
        (
            "L1 small",
            |b| set64(b, 24, 1 << 40),
            false,
            "L1 table is too small",
        ),
        (
            "too big",
            |b| set64(b, 24, 1 << 62),
            false,
            "Image is too big",
        ),
        (
            "compression type",
            |b| b[104] = 7,
            false,
            "qcow2: unknown compression type: 7",
        ),
        (
            "zstd without the bit",
            |b| b[104] = 1,
            false,
            "qcow2: Compression type incompatible feature bit must be set",
        ),
        (
            "zlib with the bit",
            |b| set64(b, 72, 8),
            false,
            "qcow2: Compression type incompatible feature bit must not be set",
        ),
        (
            "extension too large",
            |b| {
                set32(b, 112, 0xe279_2aca);
                set32(b, 116, 0x20000);
            },
            false,
            "Header extension too large",
        ),
        (
            "backing format too long",
            |b| {
                set32(b, 112, 0xe279_2aca);
                set32(b, 116, 20);
            },
            false,
            "ERROR: ext_backing_format: len=20 too large (>=16)",
        ),
        (
            "backing name too long",
            |b| {
                set64(b, 8, 0x1000);
                set32(b, 16, 2000);
            },
            false,
            "Backing file name too long",
        ),
        (
            "AES",
            |b| set32(b, 32, 1),
            false,
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        (
            "LUKS without its header",
            |b| set32(b, 32, 2),
            false,
            "Missing CRYPTO header for crypt method 2",
        ),
        (
            "encryption method 3",
            |b| set32(b, 32, 3),
            false,
            "Unsupported encryption method 3",
        ),
        (
            "data file bit without a name",
            |b| set64(b, 72, 4),
            false,
            "'data-file' is required for this image",
        ),
        (
            "data-file-raw without a data file",
            |b| set64(b, 88, 2),
            false,
            "data-file-raw requires a data file",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, patch, writable, want)) in cases.iter().enumerate() {
        let img = dir.path(&format!("case{i}"));
        let mut b = base.clone();
        patch(&mut b);
        std::fs::write(&img, &b).expect("write");
        let q = qsd_error(&img, *writable);
        let e = engine_error(&img, *writable);
        if q.as_deref() != Some(*want) || e.as_deref() != Some(*want) {
            failures.push(format!("{what}: want {want:?}, qsd {q:?}, engine {e:?}"));
        }
    }
    // A real LUKS image (qemu-img create -o encrypt.format=luks): refused, never read
    // as plaintext.
    let luks = dir.path("luks");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        &luks,
        "1M",
    ]);
    let want = "Parameter 'encrypt.key-secret' is required for cipher";
    let (q, e) = (qsd_error(&luks, false), engine_error(&luks, false));
    if q.as_deref() != Some(want) || e.as_deref() != Some(want) {
        failures.push(format!("luks: want {want:?}, qsd {q:?}, engine {e:?}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
