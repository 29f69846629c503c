//! The engine against qemu-img/qemu-io 10.0.2 as the oracle, over every image option
//! qemu-img writes.

mod common;

use std::sync::Arc;

use bulkhead_qcow2::Qcow2;
use common::*;

const SIZE: u64 = 8 << 20;

/// qemu-img create options for the matrix.
fn configs() -> Vec<(&'static str, String)> {
    vec![
        ("v2-64k", "compat=0.10".into()),
        ("v3-64k", "compat=1.1".into()),
        ("v3-512", "cluster_size=512".into()),
        ("v2-512", "compat=0.10,cluster_size=512".into()),
        ("v3-4k", "cluster_size=4096".into()),
        ("v3-2M", "cluster_size=2M".into()),
        ("rc1", "refcount_bits=1,cluster_size=4096".into()),
        ("rc64", "refcount_bits=64".into()),
        ("rc2-512", "refcount_bits=2,cluster_size=512".into()),
        ("lazy", "lazy_refcounts=on".into()),
        ("extl2", "extended_l2=on".into()),
        ("extl2-16k", "extended_l2=on,cluster_size=16k".into()),
        ("prealloc-meta", "preallocation=metadata".into()),
        (
            "prealloc-falloc",
            "preallocation=falloc,cluster_size=4096".into(),
        ),
        (
            "extl2-prealloc",
            "extended_l2=on,preallocation=metadata".into(),
        ),
        ("zstd", "compression_type=zstd".into()),
    ]
}

fn create(dir: &TempDir, name: &str, opts: &str) -> String {
    let p = dir.path(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        &p,
        &SIZE.to_string(),
    ]);
    p
}

/// Patterns written by qemu-io read back identically through the engine.
#[test]
fn reads_what_qemu_wrote() {
    let dir = TempDir::new("read");
    for (name, opts) in configs() {
        let img = create(&dir, name, &opts);
        qemu_io(
            &img,
            &[
                "write -P 0x11 0 64k",
                "write -P 0x22 100000 3000",
                "write -P 0x33 1M 1M",
                "write -z 1536k 200k",
                "discard 1792k 256k",
                "write -P 0x44 7M 1M",
                "write -P 0x55 5000 1",
            ],
        );
        let q = open(&img, false);
        let expected = raw_of(&img, &dir, &[]);
        assert_same(&read_all(&q), &expected, name);
        // block_status covers the image and agrees with reads of zero extents.
        let mut off = 0;
        while off < q.size() {
            let e = q.block_status(off, q.size() - off).expect("status");
            assert!(e.len > 0);
            if e.zero || (!e.allocated && !e.data) {
                assert!(
                    expected[off as usize..(off + e.len) as usize]
                        .iter()
                        .all(|&b| b == 0)
                );
            }
            off += e.len;
        }
    }
}

/// Random writes through the engine read back identically with qemu-img, and
/// `qemu-img check` finds nothing.
#[test]
fn qemu_reads_what_engine_wrote() {
    let dir = TempDir::new("write");
    for (i, (name, opts)) in configs().into_iter().enumerate() {
        let img = create(&dir, name, &opts);
        qemu_io(&img, &["write -P 0x66 64k 300k", "write -z 3M 100k"]);
        let mut reference = raw_of(&img, &dir, &[]);
        let q = open(&img, true);
        let cs = q.info().cluster_size;
        let mut rng = Rng(0x1234_5678 + i as u64);
        random_ops(&q, &mut reference, &mut rng, 120, cs);
        assert_same(&read_all(&q), &reference, &format!("{name}: engine"));
        q.close().expect("close");
        drop(q);
        check(&img, false);
        assert_same(
            &raw_of(&img, &dir, &[]),
            &reference,
            &format!("{name}: qemu-img"),
        );
    }
}

/// Compressed images (zlib, zstd) read correctly; writes over compressed clusters copy
/// them; compressed writes by the engine read back with qemu-img.
#[test]
fn compressed_clusters() {
    let dir = TempDir::new("compress");
    for ctype in ["zlib", "zstd"] {
        for cs in ["64k", "4k"] {
            let src = create(&dir, &format!("src-{ctype}-{cs}"), "compat=1.1");
            qemu_io(
                &src,
                &[
                    "write -P 0x11 0 2M",
                    "write -P 0x22 3M 100k",
                    "write -P 0x33 5M 1M",
                ],
            );
            let img = dir.path(&format!("c-{ctype}-{cs}"));
            qemu_img(&[
                "convert",
                "-q",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ctype},cluster_size={cs}"),
                &src,
                &img,
            ]);
            let q = open(&img, false);
            let mut reference = raw_of(&src, &dir, &[]);
            assert_same(&read_all(&q), &reference, "compressed read");
            drop(q);
            let q = open(&img, true);
            let csz = q.info().cluster_size;
            let mut rng = Rng(77);
            random_ops(&q, &mut reference, &mut rng, 60, csz);
            // Compressed writes into unallocated clusters.
            let mut c = vec![0u8; csz as usize];
            for (k, b) in c.iter_mut().enumerate() {
                *b = (k / 100) as u8;
            }
            let target = SIZE - csz;
            q.discard(target, csz).expect("discard");
            q.write_compressed(&c, target).expect("write_compressed");
            reference[target as usize..].copy_from_slice(&c);
            assert_same(&read_all(&q), &reference, "engine after writes");
            q.close().expect("close");
            drop(q);
            check(&img, false);
            assert_same(&raw_of(&img, &dir, &[]), &reference, "qemu after writes");
        }
    }
}

/// A three-deep chain: reads fall through; writes copy from the backing.
#[test]
fn backing_chain() {
    let dir = TempDir::new("chain");
    let base = create(&dir, "base", "cluster_size=4096");
    qemu_io(&base, &["write -P 0x11 0 8M"]);
    let mid = dir.path("mid");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid,
    ]);
    qemu_io(
        &mid,
        &["write -P 0x22 1M 1M", "write -z 3M 64k", "discard 5M 1M"],
    );
    let top = dir.path("top");
    // A shorter backing: the top grows past it.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        &mid,
        "-F",
        "qcow2",
        &top,
        "12M",
    ]);
    qemu_io(&top, &["write -P 0x33 4k 3k", "write -P 0x44 10M 64k"]);
    let b = Arc::new(open(&base, false));
    let m = Arc::new(open_with(&mid, false, Some(b.clone()), None));
    let info = m.info();
    assert_eq!(info.backing_file.as_deref(), Some(base.as_str()));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    let t = open_with(&top, true, Some(m.clone()), None);
    let mut reference = raw_of(&top, &dir, &[]);
    assert_same(&read_all(&t), &reference, "chain read");
    let mut rng = Rng(99);
    random_ops(&t, &mut reference, &mut rng, 100, 65536);
    assert_same(&read_all(&t), &reference, "chain after writes");
    t.close().expect("close");
    drop(t);
    check(&top, false);
    assert_same(
        &raw_of(&top, &dir, &[]),
        &reference,
        "qemu chain after writes",
    );
}

/// Internal snapshots made by qemu-img stay intact; writes copy shared clusters.
#[test]
fn snapshots_stay_intact() {
    let dir = TempDir::new("snap");
    for opts in [
        "cluster_size=4096",
        "compat=0.10",
        "extended_l2=on",
        "refcount_bits=2",
    ] {
        let img = create(&dir, opts, opts);
        qemu_io(&img, &["write -P 0x11 0 3M", "write -P 0x12 6M 100k"]);
        qemu_img(&["snapshot", "-c", "one", &img]);
        let one = raw_of(&img, &dir, &[]);
        qemu_io(&img, &["write -P 0x21 1M 1M"]);
        qemu_img(&["snapshot", "-c", "two", &img]);
        let two = raw_of(&img, &dir, &[]);
        let q = open(&img, true);
        let info = q.info();
        assert_eq!(info.snapshots.len(), 2);
        assert_eq!(info.snapshots[0].name, "one");
        assert_eq!(info.snapshots[1].name, "two");
        assert_eq!(info.snapshots[1].id, "2");
        assert_eq!(info.snapshots[0].disk_size, Some(SIZE));
        let mut reference = two.clone();
        let mut rng = Rng(5);
        random_ops(&q, &mut reference, &mut rng, 100, info.cluster_size);
        if opts == "compat=0.10" {
            let e = q.resize(SIZE * 2).expect_err("v2 resize with snapshots");
            assert_eq!(e.to_string(), "Can't resize a v2 image which has snapshots");
            assert_eq!(q.size(), SIZE);
        }
        q.close().expect("close");
        drop(q);
        check(&img, false);
        assert_same(&raw_of(&img, &dir, &[]), &reference, "active");
        assert_same(
            &raw_of(&img, &dir, &["-l", "snapshot.name=one"]),
            &one,
            "one",
        );
        assert_same(
            &raw_of(&img, &dir, &["-l", "snapshot.name=two"]),
            &two,
            "two",
        );
    }
}

/// Dirty ranges of a persistent bitmap, as QEMU reads them (qemu-nbd exports the
/// bitmap; `qemu-img map` with x-dirty-bitmap shows dirty areas as not data).
fn dirty_ranges(dir: &TempDir, img: &str, bitmap: &str) -> Vec<(u64, u64)> {
    // A socket of its own per call: a killed qemu-nbd leaves its socket file behind.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let sock = dir.path(&format!("nbd-{bitmap}-{n}.sock"));
    let _ = std::fs::remove_file(&sock);
    /// Kills qemu-nbd when done, a failed assertion included.
    struct Nbd(std::process::Child);
    impl Drop for Nbd {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _nbd = Nbd(std::process::Command::new("qemu-nbd")
        .args([
            "-r",
            "-t",
            "-f",
            "qcow2",
            "-B",
            bitmap,
            &format!("--socket={sock}"),
            img,
        ])
        .spawn()
        .expect("qemu-nbd must be installed"));
    for _ in 0..250 {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
    );
    let out = qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    drop(_nbd);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for line in out.lines() {
        let num = |key: &str| -> u64 {
            let at = line.find(key).expect("key") + key.len();
            line[at..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .expect("number")
        };
        if !line.contains("\"start\"") || !line.contains("\"data\": false") {
            continue;
        }
        let (start, len) = (num("\"start\":"), num("\"length\":"));
        match ranges.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => ranges.push((start, len)),
        }
    }
    ranges
}

/// Persistent bitmaps: listed; enabled ones track the engine's writes and are stored
/// on close (no longer in use); disabled ones stay as they were.
#[test]
fn bitmaps_kept() {
    let dir = TempDir::new("bitmap");
    let img = create(&dir, "bm", "compat=1.1");
    qemu_img(&["bitmap", "--add", &img, "b1"]);
    qemu_img(&["bitmap", "--add", "-g", "128k", &img, "b2"]);
    qemu_img(&["bitmap", "--add", "--disable", &img, "b3"]);
    qemu_io(&img, &["write -P 0x11 0 1M"]);
    let q = open(&img, false);
    let info = q.info();
    assert!(info.has_bitmaps);
    let names: Vec<_> = info.bitmaps.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["b1", "b2", "b3"]);
    assert_eq!(info.bitmaps[1].granularity(), 128 << 10);
    assert!(info.bitmaps[0].auto() && !info.bitmaps[0].in_use());
    assert!(!info.bitmaps[2].auto());
    drop(q);
    let q = open(&img, true);
    // While open writable, every bitmap is in use (on disk too, as with QEMU).
    assert!(q.info().bitmaps.iter().all(|b| b.in_use()));
    q.write(&[7u8; 70000], (2 << 20) + 12345, false)
        .expect("write");
    q.write_zeroes(5 << 20, 64 << 10, true).expect("zero");
    q.discard(6 << 20, 128 << 10).expect("discard");
    q.close().expect("close");
    assert!(!q.info().bitmaps[0].in_use());
    drop(q);
    let out = qemu_img(&["info", &img]);
    assert!(
        out.contains("name: b1") && out.contains("name: b3"),
        "{out}"
    );
    assert!(!out.contains("in-use"), "{out}");
    check(&img, false);
    let m = 1u64 << 20;
    assert_eq!(
        dirty_ranges(&dir, &img, "b1"),
        [(0, m), (2 * m, 2 * 65536), (5 * m, 65536), (6 * m, 131072)]
    );
    assert_eq!(
        dirty_ranges(&dir, &img, "b2"),
        [(0, m), (2 * m, 131072), (5 * m, 131072), (6 * m, 131072)]
    );
    assert_eq!(dirty_ranges(&dir, &img, "b3"), []);
}

/// The engine's bitmap status as qsd lists `dirty-bitmaps` (reverse directory order).
fn as_qsd(q: &Qcow2) -> Vec<QsdBitmap> {
    q.bitmap_status()
        .into_iter()
        .rev()
        .map(|b| QsdBitmap {
            name: b.name,
            recording: b.recording,
            granularity: b.granularity,
            count: b.count,
            inconsistent: b.inconsistent,
        })
        .collect()
}

/// The engine's bitmap flags as QEMU's format-specific info lists them.
fn engine_flags(q: &Qcow2) -> String {
    q.info()
        .bitmaps
        .iter()
        .map(|b| {
            let mut f = Vec::new();
            if b.in_use() {
                f.push("in-use");
            }
            if b.auto() {
                f.push("auto");
            }
            format!("{}:{}", b.name, f.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The bitmap flags on disk, as `qemu-img info -U` reads them.
fn disk_flags(img: &str) -> String {
    bitmap_flags_of_json(&qemu_img(&["info", "-U", "--output=json", img]))
}

/// Every bitmap is loaded (enabled and disabled), marked in use while open writable,
/// counted as qsd counts, and stored back on close: the same bitmaps, flags and
/// contents as QEMU's after the same writes by qemu-io.
#[test]
fn bitmaps_match_qsd() {
    let dir = TempDir::new("bmqsd");
    let img = dir.path("a");
    // An odd size: the last granule is partial (QEMU counts it whole).
    let size = (8u64 << 20) + 512;
    qemu_img(&["create", "-q", "-f", "qcow2", &img, &size.to_string()]);
    qemu_img(&["bitmap", "--add", "-g", "65536", &img, "b1"]);
    qemu_img(&["bitmap", "--add", &img, "b2"]);
    qemu_img(&["bitmap", "--add", "-g", "128k", "--disable", &img, "b3"]);
    qemu_img(&["bitmap", "--add", "-g", "512", &img, "b4"]);
    qemu_io(&img, &["write 0 100k", "write 5M 1k"]);
    qemu_img(&["bitmap", "--disable", &img, "b2"]);
    let oracle = dir.path("oracle");
    std::fs::copy(&img, &oracle).expect("copy");

    // Read-only: loaded for counting, nothing marked.
    let q = open(&img, false);
    let (ro, ro_flags) = qsd_bitmaps(&dir, &oracle, true);
    assert_eq!(as_qsd(&q), ro);
    assert_eq!(engine_flags(&q), ro_flags);
    assert_eq!(ro_flags, "b1:auto b2: b3: b4:auto");
    assert_eq!(ro[3].count, 196608, "{ro:?}");
    drop(q);

    // Writable: every bitmap in use, on disk too, as qsd shows while it has it open.
    let q = open(&img, true);
    let (rw, rw_flags) = qsd_bitmaps(&dir, &oracle, false);
    assert_eq!(as_qsd(&q), rw);
    assert_eq!(engine_flags(&q), rw_flags);
    assert_eq!(disk_flags(&img), rw_flags);
    assert_eq!(
        rw_flags,
        "b1:in-use,auto b2:in-use b3:in-use b4:in-use,auto"
    );

    q.write(&[7u8; 70000], (2 << 20) + 12345, false)
        .expect("write");
    q.write_zeroes(5 << 20, 64 << 10, true).expect("zero");
    q.discard(6 << 20, 128 << 10).expect("discard");
    q.write(&[9u8; 512], 8 << 20, false).expect("write tail");
    q.write(&[3u8; 4096], 7 << 20, true).expect("fua write");
    let during = as_qsd(&q);
    q.close().expect("close");
    assert_eq!(engine_flags(&q), "b1:auto b2: b3: b4:auto");
    drop(q);
    qemu_io(
        &oracle,
        &[
            "write -P 7 2109497 70000",
            "write -z -u 5M 64k",
            "discard 6M 128k",
            "write -P 9 8M 512",
            "write -P 3 7M 4k",
        ],
    );

    check(&img, false);
    assert_eq!(disk_flags(&img), disk_flags(&oracle));
    qemu_img(&["compare", "-q", &img, &oracle]);
    let (after, _) = qsd_bitmaps(&dir, &oracle, true);
    assert_eq!(during, after);
    assert_eq!(as_qsd(&open(&img, false)), after);
    assert_eq!(qsd_bitmaps(&dir, &img, true).0, after);
    for b in ["b1", "b2", "b3", "b4"] {
        assert_eq!(
            dirty_ranges(&dir, &img, b),
            dirty_ranges(&dir, &oracle, b),
            "{b}"
        );
    }
    // The tail granule of b1 is partial and counted whole, as in QEMU.
    assert!(after.iter().any(|b| b.name == "b1" && b.count % 65536 == 0));
    // And a second writable round trip keeps everything.
    let q = open(&img, true);
    q.write(&[1u8; 1], 3 << 20, false).expect("write");
    q.close().expect("close");
    drop(q);
    qemu_io(&oracle, &["write -P 1 3M 1"]);
    check(&img, false);
    assert_eq!(
        as_qsd(&open(&img, false)),
        qsd_bitmaps(&dir, &oracle, true).0
    );
}

/// A bitmap already in use at open (its writer died) is inconsistent, as in QEMU:
/// not loaded, counted 0, never recording, left in use on close; the others work.
#[test]
fn bitmap_in_use_at_open() {
    let dir = TempDir::new("bminuse");
    let img = create(&dir, "a", "compat=1.1");
    qemu_img(&["bitmap", "--add", &img, "b1"]);
    qemu_img(&["bitmap", "--add", "--disable", &img, "b2"]);
    qemu_io(&img, &["write 0 100k"]);
    // A writer that dies leaves both in use.
    let q = open(&img, true);
    drop(q);
    assert_eq!(disk_flags(&img), "b1:in-use,auto b2:in-use");
    qemu_img(&["bitmap", "--add", &img, "b3"]);
    let oracle = dir.path("oracle");
    std::fs::copy(&img, &oracle).expect("copy");

    let q = open(&img, false);
    let (ro, _) = qsd_bitmaps(&dir, &oracle, true);
    assert_eq!(as_qsd(&q), ro);
    assert!(ro.iter().filter(|b| b.inconsistent).count() == 2, "{ro:?}");
    drop(q);

    let q = open(&img, true);
    let (rw, rw_flags) = qsd_bitmaps(&dir, &oracle, false);
    assert_eq!(as_qsd(&q), rw);
    assert_eq!(engine_flags(&q), rw_flags);
    q.write(&[5u8; 3000], 1 << 20, false).expect("write");
    q.close().expect("close");
    drop(q);
    qemu_io(&oracle, &["write -P 5 1M 3000"]);
    check(&img, false);
    assert_eq!(disk_flags(&img), "b1:in-use,auto b2:in-use b3:auto");
    assert_eq!(disk_flags(&img), disk_flags(&oracle));
    assert_eq!(
        as_qsd(&open(&img, false)),
        qsd_bitmaps(&dir, &oracle, true).0
    );
    assert_eq!(
        dirty_ranges(&dir, &img, "b3"),
        dirty_ranges(&dir, &oracle, "b3")
    );
}

/// Where the bitmap directory starts in a v3 image (its extension), the entries'
/// offsets, and each entry's table offset.
fn bitmap_entries(b: &[u8]) -> Vec<(usize, u64)> {
    let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4"));
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8"));
    let mut off = be32(100) as usize;
    loop {
        let (t, l) = (be32(off), be32(off + 4) as usize);
        assert_ne!(t, 0, "no bitmaps extension");
        if t == 0x2385_2875 {
            let nb = be32(off + 8) as usize;
            let mut e = be64(off + 24) as usize;
            let mut out = Vec::new();
            for _ in 0..nb {
                out.push((e, be64(e)));
                let name = u16::from_be_bytes([b[e + 18], b[e + 19]]) as usize;
                e += (24 + name).next_multiple_of(8);
            }
            return out;
        }
        off += 8 + l.next_multiple_of(8);
    }
}

/// Broken directories and tables fail the open (read-only too) with QEMU's text.
#[test]
fn bitmap_open_errors_match_qemu() {
    let dir = TempDir::new("bmerr");
    let good = create(&dir, "good", "compat=1.1");
    qemu_img(&["bitmap", "--add", &good, "b1"]);
    qemu_img(&["bitmap", "--add", "--disable", &good, "b2"]);
    qemu_io(&good, &["write 0 100k"]);
    let base = std::fs::read(&good).expect("image");
    let ents = bitmap_entries(&base);
    let (e1, t1) = ents[0];
    let (e2, t2) = ents[1];
    let set = |b: &mut [u8], at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    type P = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, P)> = vec![
        (
            "reserved entry bit",
            Box::new(move |b| b[t1 as usize + 6] |= 2),
        ),
        (
            "unaligned entry",
            Box::new(move |b| b[t1 as usize + 6] |= 0x10),
        ),
        (
            "all-ones with offset",
            Box::new(move |b| b[t1 as usize + 7] |= 1),
        ),
        (
            "table size",
            Box::new(move |b| set(b, e1 + 8, &2u32.to_be_bytes())),
        ),
        ("disabled table", Box::new(move |b| b[t2 as usize + 7] = 2)),
        (
            "zero table size",
            Box::new(move |b| set(b, e1 + 8, &0u32.to_be_bytes())),
        ),
        (
            "table offset",
            Box::new(move |b| set(b, e1, &1000u64.to_be_bytes())),
        ),
        ("type", Box::new(move |b| b[e1 + 16] = 2)),
        ("granularity", Box::new(move |b| b[e2 + 17] = 8)),
        ("reserved flag", Box::new(move |b| b[e1 + 15] |= 4)),
        (
            "extra data",
            Box::new(move |b| set(b, e1 + 20, &8u32.to_be_bytes())),
        ),
        (
            "name size",
            Box::new(move |b| set(b, e2 + 18, &200u16.to_be_bytes())),
        ),
        ("same name", Box::new(move |b| b[e2 + 25] = b'1')),
        // Too large for QEMU (BME_MAX_PHYS_SIZE).
        (
            "too large",
            Box::new(move |b| set(b, e1 + 8, &8193u32.to_be_bytes())),
        ),
        // In use: neither checked against the size nor read.
        (
            "in use",
            Box::new(move |b| {
                b[e1 + 15] |= 1;
                set(b, e1 + 8, &2u32.to_be_bytes());
                b[t1 as usize + 6] |= 2;
            }),
        ),
        (
            "in use, same name",
            Box::new(move |b| {
                b[e2 + 15] |= 1;
                b[e2 + 25] = b'1';
            }),
        ),
    ];
    for (what, patch) in cases {
        let img = dir.path("t");
        let mut b = base.clone();
        patch(&mut b);
        std::fs::write(&img, &b).expect("write");
        for writable in [false, true] {
            let mut args = vec!["-f", "qcow2"];
            if !writable {
                args.push("-r");
            }
            args.extend([img.as_str(), "-c", "quit"]);
            let (ok, out) = run_status("qemu-io", &args);
            let theirs = if ok {
                None
            } else {
                let p = format!("can't open device {img}: ");
                Some(
                    out[out.find(&p).expect("qemu-io message") + p.len()..]
                        .trim()
                        .to_string(),
                )
            };
            std::fs::write(&img, &b).expect("write");
            let opts = bulkhead_qcow2::OpenOptions {
                writable,
                ..Default::default()
            };
            let ours = match bulkhead_qcow2::Qcow2::open(storage(&img, writable), opts) {
                Ok(q) => {
                    let st = q.bitmap_status();
                    q.close().expect("close");
                    assert!(ok, "{what}: opened, QEMU: {theirs:?} {st:?}");
                    None
                }
                Err(e) => Some(e.to_string()),
            };
            assert_eq!(ours, theirs, "{what} (writable: {writable})");
        }
    }
}

/// External data files, with and without data-file-raw.
#[test]
fn data_file() {
    let dir = TempDir::new("datafile");
    for raw in ["off", "on"] {
        let img = dir.path(&format!("df-{raw}"));
        let data = dir.path(&format!("df-{raw}.data"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={data},data_file_raw={raw}"),
            &img,
            &SIZE.to_string(),
        ]);
        qemu_io(&img, &["write -P 0x11 0 1M", "write -z 2M 64k"]);
        let q = open_with(&img, true, None, Some(&data));
        let info = q.info();
        assert_eq!(info.data_file.as_deref(), Some(data.as_str()));
        assert_eq!(info.data_file_raw, raw == "on");
        let mut reference = raw_of(&img, &dir, &[]);
        assert_same(&read_all(&q), &reference, "data file read");
        let mut rng = Rng(3);
        random_ops(&q, &mut reference, &mut rng, 80, 65536);
        q.close().expect("close");
        drop(q);
        check(&img, false);
        assert_same(
            &raw_of(&img, &dir, &[]),
            &reference,
            "data file after writes",
        );
        if raw == "on" {
            let d = std::fs::read(&data).expect("data");
            let n = d.len().min(reference.len());
            assert_same(&d[..n], &reference[..n], "raw data file");
        }
        // Opening without the data file is refused with QEMU's text.
        let e = bulkhead_qcow2::Qcow2::open(storage(&img, false), Default::default())
            .err()
            .expect("refused");
        assert_eq!(e.to_string(), "'data-file' is required for this image");
    }
}

/// Grow and shrink.
#[test]
fn resize() {
    let dir = TempDir::new("resize");
    let img = create(&dir, "r", "cluster_size=512");
    qemu_io(&img, &["write -P 0x11 0 8M"]);
    let q = open(&img, true);
    // Past what the L1 table covers (512 B clusters: 64 entries of 32 KiB each... grow a lot).
    q.resize(64 << 20).expect("grow");
    q.write(&[9u8; 5000], 60 << 20, false)
        .expect("write past old end");
    q.resize(4 << 20).expect("shrink");
    q.resize((4 << 20) + 1024).expect("grow a little");
    q.close().expect("close");
    drop(q);
    check(&img, false);
    let raw = raw_of(&img, &dir, &[]);
    assert_eq!(raw.len(), (4 << 20) + 1024);
    assert!(raw[..4 << 20].iter().all(|&b| b == 0x11));
    assert!(raw[4 << 20..].iter().all(|&b| b == 0));
}

/// One image state made by qemu-img/qemu-io for the resize parity tests.
fn resize_base(dir: &TempDir, name: &str, opts: &str, setup: &str) -> String {
    let img = dir.path(name);
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &img, "1M"]);
    match setup {
        "fresh" => {}
        "data" => {
            qemu_io(&img, &["write -P 0x11 0 100k", "write -P 0x22 300k 64k"]);
        }
        _ => {
            qemu_io(&img, &["write -P 0x11 0 100k"]);
            qemu_img(&["snapshot", "-c", "s1", &img]);
            qemu_io(&img, &["write -P 0x22 50k 100k"]);
            qemu_img(&["snapshot", "-c", "s2", &img]);
        }
    }
    img
}

/// Everything `qemu-img` says about an image that a resize could change.
fn image_facts(img: &str) -> (u64, String, String, String) {
    let len = std::fs::metadata(img).expect("stat").len();
    let (_, check) = run_status("qemu-img", &["check", img]);
    let map = qemu_img(&["map", "--output=json", img]);
    let snaps = qemu_img(&["snapshot", "-l", img]);
    (len, check, map, snaps)
}

/// Growing through the engine and through `qemu-img resize` (copies of the same
/// image) gives the same file: the grown active L1 table lands where QEMU's allocator
/// puts it, written with exactly its entries, the old table freed afterwards. Fresh
/// images, images with data, with internal snapshots (kept as they are: their L1
/// tables and disk sizes untouched), 512 B, 4 KiB, 64 KiB and 2 MiB clusters, small
/// and large factors, several grows in a row.
#[test]
fn grow_matches_qemu_resize() {
    let dir = TempDir::new("growparity");
    let cases: &[(&str, &[u64])] = &[
        ("cluster_size=512", &[4 << 20]),
        ("cluster_size=512", &[1 << 30]),
        ("cluster_size=512", &[2 << 20, 8 << 20, 32 << 20, 1 << 30]),
        ("cluster_size=4096", &[10 << 30]),
        ("cluster_size=65536", &[4 << 20, 1 << 40]),
        ("cluster_size=65536", &[4 << 40, 64 << 40]),
        ("cluster_size=2M", &[4 << 20, 1 << 40]),
        ("compat=0.10,cluster_size=512", &[4 << 20, 1 << 30]),
    ];
    let mut n = 0;
    for (opts, sizes) in cases {
        for setup in ["fresh", "data", "snap"] {
            if setup == "snap" && opts.contains("compat=0.10") {
                continue;
            }
            n += 1;
            let base = resize_base(&dir, &format!("base{n}"), opts, setup);
            let (ours, theirs) = (
                dir.path(&format!("ours{n}")),
                dir.path(&format!("theirs{n}")),
            );
            std::fs::copy(&base, &ours).expect("copy");
            std::fs::copy(&base, &theirs).expect("copy");
            let q = open(&ours, true);
            for &s in *sizes {
                q.resize(s).expect("grow");
                qemu_img(&["resize", "-q", &theirs, &s.to_string()]);
            }
            q.close().expect("close");
            drop(q);
            let what = format!("{opts} {setup} {sizes:?}");
            let (a, b) = (image_facts(&ours), image_facts(&theirs));
            assert_eq!(a.0, b.0, "{what}: file length");
            assert_eq!(a.1, b.1, "{what}: qemu-img check");
            assert_eq!(a.2, b.2, "{what}: qemu-img map");
            assert_eq!(a.3, b.3, "{what}: snapshot list");
            assert!(a.1.contains("No errors were found"), "{what}: {}", a.1);
            qemu_img(&["compare", "-q", &ours, &theirs]);
            let ob = std::fs::read(&ours).expect("read");
            let tb = std::fs::read(&theirs).expect("read");
            assert_same(&ob, &tb, &format!("{what}: image bytes"));
            // The old contents, and zeroes past them (qemu-img compare checks that the
            // larger image's extra area reads as zeroes).
            qemu_img(&["compare", "-q", &base, &ours]);
        }
    }
}

/// Internal snapshots and resize, as QEMU 10.0.2: a v3 image grows and shrinks with
/// its snapshots kept (entries, disk sizes and L1 tables untouched, contents intact);
/// a v2 image with snapshots is refused with QEMU's text; a grow past QEMU's L1 limit
/// fails with QEMU's text and changes nothing.
#[test]
fn resize_with_snapshots() {
    let dir = TempDir::new("resizesnap");
    for opts in ["cluster_size=512", "cluster_size=65536", "extended_l2=on"] {
        let img = resize_base(&dir, "img", opts, "snap");
        let s1 = raw_of(&img, &dir, &["-l", "snapshot.name=s1"]);
        let s2 = raw_of(&img, &dir, &["-l", "snapshot.name=s2"]);
        let active = raw_of(&img, &dir, &[]);
        let q = open(&img, true);
        let snaps = q.info().snapshots;
        q.resize(64 << 20).expect("grow with snapshots");
        q.write(&[0x33; 4096], 60 << 20, false)
            .expect("write past old end");
        q.resize(512 << 10).expect("shrink with snapshots");
        q.resize(2 << 20).expect("grow again");
        let after = q.info().snapshots;
        assert_eq!(after, snaps, "{opts}: snapshot entries");
        assert_eq!(after[0].disk_size, Some(1 << 20));
        q.close().expect("close");
        drop(q);
        check(&img, false);
        let raw = raw_of(&img, &dir, &[]);
        assert_eq!(raw.len(), 2 << 20, "{opts}");
        assert_same(&raw[..512 << 10], &active[..512 << 10], opts);
        assert!(
            raw[512 << 10..].iter().all(|&b| b == 0),
            "{opts}: regrown area"
        );
        for (name, want) in [("s1", &s1), ("s2", &s2)] {
            // convert shows a snapshot at the image's current size.
            let got = raw_of(&img, &dir, &["-l", &format!("snapshot.name={name}")]);
            assert_same(&got[..1 << 20], want, name);
            assert!(got[1 << 20..].iter().all(|&b| b == 0), "{name}");
        }
        let list = qemu_img(&["snapshot", "-l", &img]);
        assert!(list.contains("s1") && list.contains("s2"), "{list}");
    }
    // v2 with a snapshot: QEMU's refusal, word for word, for both directions.
    let img = resize_base(&dir, "v2", "compat=0.10", "snap");
    let (ok, text) = run_status("qemu-img", &["resize", &img, "4M"]);
    assert!(!ok);
    let q = open(&img, true);
    for size in [4 << 20, 512 << 10] {
        let e = q.resize(size).expect_err("v2 with snapshots");
        assert_eq!(format!("qemu-img: {e}\n"), text);
    }
    assert_eq!(q.size(), 1 << 20);
    q.close().expect("close");
    // Past QEMU's L1 limit (512 B clusters: 32 MiB of L1 covers 128 GiB).
    let img = resize_base(&dir, "big", "cluster_size=512", "fresh");
    let (ok, text) = run_status("qemu-img", &["resize", &img, "200G"]);
    assert!(!ok);
    let len = std::fs::metadata(&img).expect("stat").len();
    let q = open(&img, true);
    let e = q.resize(200 << 30).expect_err("too large");
    assert_eq!(format!("qemu-img: {e}\n"), text);
    assert_eq!(q.size(), 1 << 20);
    q.close().expect("close");
    drop(q);
    assert_eq!(std::fs::metadata(&img).expect("stat").len(), len);
    check(&img, false);
}

/// Concurrent writers and readers on disjoint and overlapping ranges.
#[test]
fn concurrent_io() {
    let dir = TempDir::new("conc");
    let img = create(&dir, "c", "cluster_size=4096");
    let q = Arc::new(open(&img, true));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(t + 1);
                for _ in 0..300 {
                    // Each thread owns the bytes at offsets = t (mod 4) in 1 KiB units,
                    // so writes from different threads share clusters but not bytes.
                    let unit = rng.below(SIZE / 4096) * 4 + t;
                    let buf = [t as u8 + 1; 1024];
                    q.write(&buf, unit * 1024, false).expect("write");
                    let mut back = [0u8; 1024];
                    q.read(&mut back, unit * 1024).expect("read");
                    assert_eq!(back, buf);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let all = read_all(&q);
    for (i, chunk) in all.chunks(1024).enumerate() {
        let owner = (i % 4) as u8 + 1;
        assert!(chunk.iter().all(|&b| b == 0 || b == owner), "unit {i}");
    }
    q.close().expect("close");
    q.close().expect("a second close does nothing");
    assert!(matches!(
        q.write(&[0u8; 512], 0, false),
        Err(bulkhead_qcow2::Error::Closed)
    ));
    check(&img, false);
    assert_same(&raw_of(&img, &dir, &[]), &all, "concurrent");
}

/// A lazy-refcounts image left dirty by a killed qemu-io (stale refcounts) is repaired
/// on a writable open, as QEMU does; read-only opens read it as it is.
#[test]
fn dirty_image_repaired() {
    let dir = TempDir::new("dirty");
    for opts in [
        "lazy_refcounts=on",
        "lazy_refcounts=on,cluster_size=4096,refcount_bits=2",
    ] {
        let img = create(&dir, opts, opts);
        qemu_io(&img, &["write -P 0x11 0 1M"]);
        qemu_img(&["snapshot", "-c", "s", &img]);
        let (_, _) = run_status(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                &img,
                "-c",
                "write -P 0x22 512k 2M",
                "-c",
                "write -P 0x33 5M 100k",
                "-c",
                "sigraise 9",
            ],
        );
        let (ok, out) = run_status("qemu-img", &["check", &img]);
        assert!(
            !ok && out.contains("ERROR"),
            "the kill left stale refcounts: {out}"
        );
        let q = open(&img, false);
        assert!(q.info().dirty);
        let mut reference = read_all(&q);
        assert!(
            reference[512 << 10..(512 << 10) + (2 << 20)]
                .iter()
                .all(|&b| b == 0x22)
        );
        drop(q);
        let q = open(&img, true);
        assert!(!q.info().dirty);
        let mut rng = Rng(11);
        random_ops(&q, &mut reference, &mut rng, 40, q.info().cluster_size);
        q.close().expect("close");
        drop(q);
        check(&img, false);
        assert_same(&raw_of(&img, &dir, &[]), &reference, "repaired");
        let snap = raw_of(&img, &dir, &["-l", "snapshot.name=s"]);
        assert!(snap[..1 << 20].iter().all(|&b| b == 0x11));
    }
}

/// Internal snapshots created and deleted by the engine, as qemu-img sees them.
#[test]
fn internal_snapshots() {
    use bulkhead_qcow2::NewSnapshot;
    let dir = TempDir::new("isnap");
    for opts in [
        "cluster_size=4096",
        "compat=0.10",
        "extended_l2=on",
        "refcount_bits=4",
    ] {
        let img = create(&dir, opts, opts);
        qemu_io(&img, &["write -P 0x11 0 2M"]);
        qemu_img(&["snapshot", "-c", "q1", &img]);
        let q1 = raw_of(&img, &dir, &[]);
        let q = open(&img, true);
        let mut reference = q1.clone();
        let mut rng = Rng(21);
        random_ops(&q, &mut reference, &mut rng, 40, q.info().cluster_size);
        let a = q
            .snapshot_create(NewSnapshot {
                name: "a".into(),
                date_sec: 1_700_000_000,
                ..Default::default()
            })
            .expect("create a");
        assert_eq!(a.id, "2");
        let state_a = reference.clone();
        random_ops(&q, &mut reference, &mut rng, 40, q.info().cluster_size);
        let b = q
            .snapshot_create(NewSnapshot {
                name: "b".into(),
                ..Default::default()
            })
            .expect("create b");
        assert_eq!(b.id, "3");
        let state_b = reference.clone();
        random_ops(&q, &mut reference, &mut rng, 40, q.info().cluster_size);
        assert_same(&read_all(&q), &reference, "active after snapshots");
        q.close().expect("close");
        drop(q);
        check(&img, false);
        let list = qemu_img(&["snapshot", "-l", &img]);
        assert!(
            list.contains(" a ") && list.contains(" b ") && list.contains(" q1 "),
            "{list}"
        );
        assert_same(
            &raw_of(&img, &dir, &["-l", "snapshot.name=a"]),
            &state_a,
            "a",
        );
        assert_same(
            &raw_of(&img, &dir, &["-l", "snapshot.name=b"]),
            &state_b,
            "b",
        );
        assert_same(&raw_of(&img, &dir, &["-l", "snapshot.name=q1"]), &q1, "q1");
        assert_same(&raw_of(&img, &dir, &[]), &reference, "active");
        // Delete one made by qemu-img and one made by the engine; keep writing.
        let q = open(&img, true);
        q.snapshot_delete(None, Some("q1")).expect("delete q1");
        q.snapshot_delete(Some("2"), None).expect("delete a");
        assert!(q.snapshot_delete(None, Some("nope")).is_err());
        random_ops(&q, &mut reference, &mut rng, 40, q.info().cluster_size);
        assert_eq!(q.info().snapshots.len(), 1);
        q.close().expect("close");
        drop(q);
        check(&img, false);
        assert_same(
            &raw_of(&img, &dir, &["-l", "snapshot.name=b"]),
            &state_b,
            "b after",
        );
        assert_same(&raw_of(&img, &dir, &[]), &reference, "active after deletes");
        // qemu-img deletes the engine's snapshot cleanly too.
        qemu_img(&["snapshot", "-d", "b", &img]);
        check(&img, false);
        // With no snapshot left, resize works again.
        let q = open(&img, true);
        q.resize(SIZE * 2).expect("resize");
        q.close().expect("close");
        drop(q);
        check(&img, false);
    }
}

/// Narrow refcounts: a snapshot that would overflow one is refused, nothing changes.
#[test]
fn snapshot_refcount_overflow() {
    use bulkhead_qcow2::{Error, NewSnapshot};
    let dir = TempDir::new("isnap-rc2");
    let img = create(&dir, "rc2", "refcount_bits=2");
    qemu_io(&img, &["write -P 0x11 0 1M"]);
    qemu_img(&["snapshot", "-c", "q1", &img]);
    let q = open(&img, true);
    let new = |n: &str| NewSnapshot {
        name: n.into(),
        ..Default::default()
    };
    q.snapshot_create(new("a"))
        .expect("3 references fit in 2 bits");
    match q.snapshot_create(new("b")) {
        Err(Error::TooLarge(_)) => {}
        other => panic!("expected an overflow error, got {other:?}"),
    }
    q.write(&[1u8; 4096], 0, false).expect("writes go on");
    q.close().expect("close");
    drop(q);
    check(&img, false);
    assert_eq!(qemu_img(&["snapshot", "-l", &img]).lines().count(), 4);
}

/// Compressed writes pack several clusters into one host cluster (not with 1-bit
/// refcounts); overwriting and discarding them frees what they used.
#[test]
fn compressed_packing() {
    let dir = TempDir::new("cpack");
    for (opts, packs) in [
        ("cluster_size=4096", true),
        ("cluster_size=65536,compression_type=zstd", true),
        ("cluster_size=4096,refcount_bits=1", false),
    ] {
        let img = create(&dir, opts, opts);
        let q = open(&img, true);
        let cs = q.info().cluster_size;
        let mut reference = vec![0u8; SIZE as usize];
        for (i, chunk) in reference.chunks_mut(cs as usize).enumerate() {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = ((i * 7 + j / 512) % 5) as u8;
            }
        }
        for (i, chunk) in reference.chunks(cs as usize).enumerate() {
            q.write_compressed(chunk, i as u64 * cs)
                .expect("write_compressed");
        }
        assert_same(&read_all(&q), &reference, "compressed");
        let len = std::fs::metadata(&img).expect("len").len();
        assert_eq!(len < SIZE / 4, packs, "{opts}: {len} bytes");
        let mut rng = Rng(8);
        random_ops(&q, &mut reference, &mut rng, 60, cs);
        q.close().expect("close");
        drop(q);
        check(&img, false);
        assert_same(&raw_of(&img, &dir, &[]), &reference, opts);
    }
}

/// Threads doing writes, zero-writes, discards and reads at once, each on its own
/// clusters (so each can check its data), over a backing file, with snapshots taken
/// meanwhile: no deadlock, every thread reads what it wrote, qemu-img agrees.
#[test]
fn concurrent_mixed() {
    use bulkhead_qcow2::NewSnapshot;
    let dir = TempDir::new("mixed");
    let base = create(&dir, "base", "cluster_size=4096");
    qemu_io(&base, &["write -P 0x77 0 8M"]);
    let img = dir.path("top");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        &base,
        "-F",
        "qcow2",
        &img,
    ]);
    let b: Arc<dyn bulkhead_qcow2::Backing> = Arc::new(open(&base, false));
    let q = Arc::new(open_with(&img, true, Some(b), None));
    let cs = 4096u64;
    let clusters = SIZE / cs;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut mine = vec![0x77u8; SIZE as usize];
                let mut rng = Rng(t + 100);
                for i in 0..400 {
                    let c = rng.below(clusters / 4) * 4 + t;
                    let (o, l) = match rng.below(3) {
                        0 => (0, cs),
                        _ => {
                            let o = rng.below(cs - 1);
                            (o, 1 + rng.below(cs - o))
                        }
                    };
                    let off = c * cs + o;
                    let r = &mut mine[off as usize..(off + l) as usize];
                    match rng.below(6) {
                        0 => {
                            q.write_zeroes(off, l, rng.below(2) == 0).expect("zero");
                            r.fill(0);
                        }
                        1 if l == cs => {
                            q.discard(off, l).expect("discard");
                            r.fill(0); // v3 with a backing file: discarded reads zeroes
                        }
                        _ => {
                            rng.fill(r);
                            q.write(r, off, false).expect("write");
                        }
                    }
                    if i % 50 == 0 {
                        let mut back = vec![0u8; cs as usize];
                        q.read(&mut back, c * cs).expect("read");
                        assert_eq!(back[..], mine[(c * cs) as usize..((c + 1) * cs) as usize]);
                    }
                }
                mine
            })
        })
        .collect();
    let snapper = {
        let q = q.clone();
        std::thread::spawn(move || {
            for i in 0..3 {
                std::thread::sleep(std::time::Duration::from_millis(5));
                q.snapshot_create(NewSnapshot {
                    name: format!("s{i}"),
                    ..Default::default()
                })
                .expect("snapshot");
            }
        })
    };
    let mut expected = vec![0u8; SIZE as usize];
    for (t, h) in threads.into_iter().enumerate() {
        let mine = h.join().expect("thread");
        for c in (t as u64..clusters).step_by(4) {
            let r = (c * cs) as usize..((c + 1) * cs) as usize;
            expected[r.clone()].copy_from_slice(&mine[r]);
        }
    }
    snapper.join().expect("snapper");
    assert_same(&read_all(&q), &expected, "engine");
    q.close().expect("close");
    drop(q);
    check(&img, false);
    assert_same(&raw_of(&img, &dir, &[]), &expected, "qemu-img");
}

/// Extended L2: subcluster-aligned zero-writes set zero bits and allocate nothing,
/// as QEMU does (compared with qemu-img map on a twin image written by qemu-io).
#[test]
fn extl2_subcluster_zeroes() {
    let dir = TempDir::new("extl2z");
    let ours = create(&dir, "ours", "extended_l2=on");
    let theirs = create(&dir, "theirs", "extended_l2=on");
    for img in [&ours, &theirs] {
        qemu_io(img, &["write -P 0x11 64k 64k"]);
    }
    qemu_io(
        &theirs,
        &["write -z 2k 4k", "write -z 66k 2k", "write -z 1M 8k"],
    );
    let q = open(&ours, true);
    q.write_zeroes(2048, 4096, false).expect("zero");
    q.write_zeroes(66 << 10, 2048, false).expect("zero");
    q.write_zeroes(1 << 20, 8192, true).expect("zero");
    q.close().expect("close");
    drop(q);
    check(&ours, false);
    let map = |img: &str| qemu_img(&["map", "--output=json", img]);
    assert_eq!(map(&ours), map(&theirs));
    assert_same(
        &raw_of(&ours, &dir, &[]),
        &raw_of(&theirs, &dir, &[]),
        "contents",
    );
}

/// The same requests through the engine and through qemu-io give the same
/// `qemu-img map` (allocation, zero and data status; host offsets aside).
#[test]
fn map_parity_with_qemu() {
    let dir = TempDir::new("mapparity");
    for opts in [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=4096",
        "extended_l2=on",
    ] {
        let ours = create(&dir, &format!("ours-{opts}"), opts);
        let theirs = create(&dir, &format!("theirs-{opts}"), opts);
        for img in [&ours, &theirs] {
            qemu_io(img, &["write -P 0x11 0 1M", "write -P 0x12 2M 256k"]);
        }
        qemu_io(
            &theirs,
            &[
                "write -P 0x21 3M 100k",
                "write -P 0x22 4M 512",
                "write -z 128k 128k",
                "write -z -u 256k 128k",
                "discard 512k 128k",
                "discard 2M 64k",
                "write -z 5M 1M",
            ],
        );
        let q = open(&ours, true);
        q.write(&[0x21; 100 << 10], 3 << 20, false).expect("write");
        q.write(&[0x22; 512], 4 << 20, false).expect("write");
        q.write_zeroes(128 << 10, 128 << 10, false).expect("zero");
        q.write_zeroes(256 << 10, 128 << 10, true)
            .expect("zero unmap");
        q.discard(512 << 10, 128 << 10).expect("discard");
        q.discard(2 << 20, 64 << 10).expect("discard");
        q.write_zeroes(5 << 20, 1 << 20, false).expect("zero");
        q.close().expect("close");
        drop(q);
        check(&ours, false);
        let map = |img: &str| -> Vec<String> {
            qemu_img(&["map", "--output=json", img])
                .lines()
                .map(|l| match l.find(", \"offset\"") {
                    Some(i) => l[..i].to_string(),
                    None => l.trim_end_matches(['}', ']', ',']).to_string(),
                })
                .collect()
        };
        assert_eq!(map(&ours), map(&theirs), "{opts}");
        assert_same(&raw_of(&ours, &dir, &[]), &raw_of(&theirs, &dir, &[]), opts);
    }
}

/// `info()` says what `qemu-img info` says about the image's format-specific data.
#[test]
fn info_matches_qemu_img() {
    let dir = TempDir::new("info");
    for (i, opts) in [
        "compat=0.10",
        "compat=1.1,lazy_refcounts=on",
        "compression_type=zstd,extended_l2=on,refcount_bits=64",
        "cluster_size=2M,refcount_bits=1",
    ]
    .iter()
    .enumerate()
    {
        let img = create(&dir, &format!("i{i}"), opts);
        let json = qemu_img(&["info", "--output=json", &img]);
        let field = |key: &str| -> String {
            let at = json.rfind(&format!("\"{key}\": ")).expect("key") + key.len() + 4;
            json[at..]
                .split([',', '\n'])
                .next()
                .expect("value")
                .trim()
                .trim_matches('"')
                .to_string()
        };
        let info = open(&img, false).info();
        let compat = if info.version == 2 { "0.10" } else { "1.1" };
        assert_eq!(field("compat"), compat, "{opts}");
        assert_eq!(
            field("virtual-size"),
            info.virtual_size.to_string(),
            "{opts}"
        );
        assert_eq!(
            field("cluster-size"),
            info.cluster_size.to_string(),
            "{opts}"
        );
        assert_eq!(
            field("refcount-bits"),
            info.refcount_bits.to_string(),
            "{opts}"
        );
        assert_eq!(
            field("compression-type"),
            info.compression_type.name(),
            "{opts}"
        );
        // v2 images: QEMU shows compat, compression type and refcount bits only.
        if info.version >= 3 {
            assert_eq!(field("corrupt"), info.corrupt.to_string(), "{opts}");
            assert_eq!(
                field("lazy-refcounts"),
                info.lazy_refcounts.to_string(),
                "{opts}"
            );
            assert_eq!(field("extended-l2"), info.extended_l2.to_string(), "{opts}");
        }
        assert_eq!(field("dirty-flag"), info.dirty.to_string(), "{opts}");
    }
}

/// An overlay opened with `backing: null` gets its backing node at run time (as with
/// `blockdev-snapshot`) and loses it again.
#[test]
fn set_backing_at_run_time() {
    let dir = TempDir::new("setbacking");
    let base = create(&dir, "base", "compat=1.1");
    qemu_io(&base, &["write -P 0x42 0 8M"]);
    let top = dir.path("top");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    qemu_io(&top, &["write -P 0x43 1M 4k"]);
    let q = open(&top, true);
    let mut buf = vec![0u8; 8192];
    q.read(&mut buf, (1 << 20) - 4096).expect("read");
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0x43));
    let b: Arc<dyn bulkhead_qcow2::Backing> = Arc::new(open(&base, false));
    q.set_backing(Some(b)).expect("set");
    q.read(&mut buf, (1 << 20) - 4096).expect("read");
    assert!(buf[..4096].iter().all(|&b| b == 0x42) && buf[4096..].iter().all(|&b| b == 0x43));
    // A partial write now copies from the backing node.
    q.write(&[0x44; 100], 3 << 20, false).expect("write");
    q.set_backing(None).expect("unset");
    q.read(&mut buf, 3 << 20).expect("read");
    assert!(buf[..100].iter().all(|&b| b == 0x44) && buf[100..4096].iter().all(|&b| b == 0x42));
    assert!(
        buf[4096..].iter().all(|&b| b == 0x42),
        "the whole cluster was copied"
    );
    q.close().expect("close");
    drop(q);
    check(&top, false);
}

/// The offsets of the snapshot table and of each snapshot's L1 table, from the header
/// and the snapshot table (QEMU's layout).
fn snapshot_layout(img: &str) -> (u64, Vec<(u64, u32)>) {
    let b = std::fs::read(img).expect("image");
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let (n, table) = (be32(60), be64(64));
    let mut at = table as usize;
    let mut l1s = Vec::new();
    for _ in 0..n {
        l1s.push((be64(at), be32(at + 8)));
        let (id_len, name_len) = (
            u16::from_be_bytes([b[at + 12], b[at + 13]]) as usize,
            u16::from_be_bytes([b[at + 14], b[at + 15]]) as usize,
        );
        let extra = be32(at + 36) as usize;
        at += (40 + extra + id_len + name_len).next_multiple_of(8);
    }
    (table, l1s)
}

/// A snapshot whose L1 copy needs more clusters than one refcount block covers (1 GiB
/// with 512 B clusters: a 256 KiB L1, 512 clusters; a 16-bit refcount block covers
/// 256). The copy used to go "past everything in use" with each missing refcount
/// block put at the start of its own range, so no candidate run was ever free: the
/// file grew without bound (to the in-memory cap in the fuzz target). Now it goes
/// where `qcow2_alloc_clusters` puts it: the same offsets as `qemu-img snapshot -c`.
#[test]
fn snapshot_l1_spanning_refcount_blocks() {
    use bulkhead_qcow2::NewSnapshot;
    let dir = TempDir::new("isnap-big-l1");
    for (name, opts) in [
        ("rc16", "cluster_size=512"),
        ("rc64", "cluster_size=512,refcount_bits=64"),
        ("rc32", "cluster_size=512,refcount_bits=32"),
    ] {
        let img = dir.path(name);
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &img, "1G"]);
        qemu_io(&img, &["write -P 0x5a 0 64k", "write -P 0xa5 512M 64k"]);
        let theirs = dir.path(&format!("{name}-qemu"));
        std::fs::copy(&img, &theirs).expect("copy");
        qemu_img(&["snapshot", "-c", "s", &theirs]);
        // In memory with a cap, so that the old behaviour fails (ENOSPC) instead of
        // filling the disk.
        let mem = Arc::new(bulkhead_qcow2::MemStorage::new(
            std::fs::read(&img).expect("image"),
            16 << 20,
        ));
        let opts = bulkhead_qcow2::OpenOptions {
            writable: true,
            ..Default::default()
        };
        let q = bulkhead_qcow2::Qcow2::open(mem.clone(), opts).expect("open");
        q.snapshot_create(NewSnapshot {
            name: "s".into(),
            ..NewSnapshot::default()
        })
        .unwrap_or_else(|e| panic!("{name}: snapshot create: {e}"));
        q.write(&[7u8; 4096], 0, false).expect("write after");
        q.close().expect("close");
        drop(q);
        std::fs::write(&img, mem.contents()).expect("write back");
        check(&img, false);
        let (ours, qemu) = (snapshot_layout(&img), snapshot_layout(&theirs));
        assert_eq!(ours.1, qemu.1, "{name}: snapshot L1 offset and size");
        assert_eq!(ours.0, qemu.0, "{name}: snapshot table offset");
        let len = std::fs::metadata(&img).expect("len").len();
        assert!(len < 4 << 20, "{name}: image grew to {len} bytes");
        // The snapshot holds what was there before.
        qemu_img(&["snapshot", "-a", "s", &img]);
        qemu_io(
            &img,
            &[
                "read -P 0x5a 0 64k",
                "read -P 0 64k 64k",
                "read -P 0xa5 512M 64k",
            ],
        );
    }
}
