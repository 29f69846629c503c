#![allow(dead_code)]
//! Helpers: qemu-img/qemu-io as the oracle, a deterministic RNG, images in a temp dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bulkhead_qcow2::{Backing, FdStorage, OpenOptions, Qcow2, Storage};

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "qcow2-test-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog} not runnable (it must be installed): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{prog} {args:?} failed: {text}");
    text
}

pub fn run_status(prog: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(prog).args(args).output().expect("runnable");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// `qemu-io -f qcow2 <img> -c cmd ...`
pub fn qemu_io(img: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "qcow2", img];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// `qemu-img check` must find no errors (and no leaks unless allowed).
pub fn check(img: &str, leaks_ok: bool) {
    let (ok, out) = run_status("qemu-img", &["check", img]);
    let has_leaks = out.contains("leaked");
    assert!(
        ok || (leaks_ok && has_leaks && !out.contains("ERROR") && !out.contains("corrupt")),
        "qemu-img check {img}: {out}"
    );
    if !leaks_ok {
        assert!(!has_leaks, "qemu-img check {img}: {out}");
    }
}

/// The guest contents of an image as qemu-img sees them.
pub fn raw_of(img: &str, dir: &TempDir, extra: &[&str]) -> Vec<u8> {
    let out = dir.path("raw-out");
    let mut args = vec!["convert", "-O", "raw"];
    args.extend_from_slice(extra);
    args.push(img);
    args.push(&out);
    qemu_img(&args);
    let v = std::fs::read(&out).expect("raw");
    let _ = std::fs::remove_file(&out);
    v
}

pub fn storage(path: &str, writable: bool) -> Arc<dyn Storage> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    Arc::new(FdStorage::from(f))
}

pub fn open(path: &str, writable: bool) -> Qcow2 {
    open_with(path, writable, None, None)
}

pub fn open_with(
    path: &str,
    writable: bool,
    backing: Option<Arc<dyn Backing>>,
    data_file: Option<&str>,
) -> Qcow2 {
    let opts = OpenOptions {
        writable,
        backing,
        data_file: data_file.map(|d| storage(d, writable)),
        ..OpenOptions::default()
    };
    Qcow2::open(storage(path, writable), opts).unwrap_or_else(|e| panic!("open {path}: {e}"))
}

pub fn read_all(q: &Qcow2) -> Vec<u8> {
    let mut v = vec![0u8; q.size() as usize];
    // In uneven chunks, to cross cluster and table boundaries.
    let mut off = 0usize;
    let mut step = 4096 * 3 + 512;
    while off < v.len() {
        let n = step.min(v.len() - off);
        q.read(&mut v[off..off + n], off as u64).expect("read");
        off += n;
        step = if step > 300_000 {
            4096 * 3 + 512
        } else {
            step * 2 + 512
        };
    }
    v
}

/// xorshift64*: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        let v = self.next();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (v >> ((i % 8) * 8)) as u8 ^ (i / 8) as u8;
        }
    }
}

/// Random writes, zero-writes and discards through the engine, mirrored in `reference`.
/// Returns nothing; `reference` is what the image must read as afterwards.
pub fn random_ops(q: &Qcow2, reference: &mut [u8], rng: &mut Rng, n: usize, cluster: u64) {
    let size = reference.len() as u64;
    for _ in 0..n {
        let kind = rng.below(10);
        let len = match rng.below(4) {
            0 => 1 + rng.below(700),
            1 => 1 + rng.below(cluster * 2),
            2 => cluster * (1 + rng.below(3)),
            _ => 1 + rng.below(200_000),
        }
        .min(size);
        let mut off = rng.below(size - len + 1);
        if rng.below(3) == 0 {
            off = off / cluster * cluster;
        }
        let len = len.min(size - off);
        let (o, l) = (off as usize, len as usize);
        match kind {
            0..=5 => {
                let mut buf = vec![0u8; l];
                rng.fill(&mut buf);
                q.write(&buf, off, rng.below(8) == 0).expect("write");
                reference[o..o + l].copy_from_slice(&buf);
            }
            6..=7 => {
                q.write_zeroes(off, len, rng.below(2) == 0)
                    .expect("write_zeroes");
                reference[o..o + l].fill(0);
            }
            _ => {
                // A discard leaves unspecified contents; follow with what the engine now
                // reads for the discarded range (checked separately to be zeroes or old).
                q.discard(off, len).expect("discard");
                q.read(&mut reference[o..o + l], off)
                    .expect("read after discard");
            }
        }
    }
}

pub fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at {i:#x}: {:#x} vs {:#x}",
            a[i], b[i]
        );
    }
}

pub fn exists(p: &str) -> bool {
    Path::new(p).exists()
}

/// One entry of `query-named-block-nodes`' `dirty-bitmaps`, as qsd shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QsdBitmap {
    pub name: String,
    pub recording: bool,
    pub granularity: u64,
    pub count: u64,
    pub inconsistent: bool,
}

/// Opens `img` in qemu-storage-daemon (writable unless `read_only`) and returns the
/// qcow2 node's `dirty-bitmaps` (qsd's order) and its format-specific bitmap flags
/// as `name:flag,flag` strings, read while qsd has the image open.
pub fn qsd_bitmaps(dir: &TempDir, img: &str, read_only: bool) -> (Vec<QsdBitmap>, String) {
    use std::io::{BufRead, BufReader, Write};
    let sock = dir.path(&format!("qmp-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let ro = if read_only { ",read-only=on" } else { "" };
    let mut child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,filename={img},node-name=f0{ro}"),
            "--blockdev",
            &format!("driver=qcow2,file=f0,node-name=q0{ro}"),
            "--chardev",
            &format!("socket,path={sock},server=on,wait=off,id=c0"),
            "--monitor",
            "chardev=c0",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-storage-daemon must be installed");
    let mut conn = None;
    for _ in 0..250 {
        if let Ok(c) = std::os::unix::net::UnixStream::connect(&sock) {
            conn = Some(c);
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("qemu-storage-daemon exited ({st}): {err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let conn = conn.expect("QMP socket");
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    let mut reply = |w: &mut std::os::unix::net::UnixStream, cmd: &str| -> String {
        w.write_all(cmd.as_bytes()).expect("qmp write");
        loop {
            line.clear();
            r.read_line(&mut line).expect("qmp read");
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return line.clone();
            }
        }
    };
    reply(&mut w, "{\"execute\":\"qmp_capabilities\"}\n");
    let out = reply(&mut w, "{\"execute\":\"query-named-block-nodes\"}\n");
    let _ = reply(&mut w, "{\"execute\":\"quit\"}\n");
    let _ = child.wait();
    // The qcow2 node is the one whose "drv" is qcow2.
    let at = out.find("\"drv\": \"qcow2\"").expect("qcow2 node");
    let node_start = out[..at].rfind("{\"iops_rd\"").unwrap_or(0);
    let node = &out[node_start..];
    let db = node.find("\"dirty-bitmaps\": [").expect("dirty-bitmaps") + 18;
    let end = db + node[db..].find(']').expect("end");
    let mut list = Vec::new();
    for e in node[db..end].split('}').filter(|e| e.contains("\"name\"")) {
        let field = |k: &str| -> &str {
            let i = e.find(&format!("\"{k}\": ")).map(|i| i + k.len() + 4);
            match i {
                Some(i) => e[i..]
                    .split([',', '}'])
                    .next()
                    .unwrap_or("")
                    .trim()
                    .trim_matches('"'),
                None => "",
            }
        };
        list.push(QsdBitmap {
            name: field("name").to_string(),
            recording: field("recording") == "true",
            granularity: field("granularity").parse().expect("granularity"),
            count: field("count").parse().expect("count"),
            inconsistent: field("inconsistent") == "true",
        });
    }
    // Format-specific flags: "bitmaps": [{"flags": ["in-use", "auto"], "name": "b1", ...
    (list, bitmap_flags_of_json(node))
}

/// The format-specific bitmap flags in a QMP or `qemu-img info --output=json` text, as
/// `name:flag,flag` in directory order, space separated.
pub fn bitmap_flags_of_json(json: &str) -> String {
    let j: String = json.chars().filter(|c| !c.is_whitespace()).collect();
    let mut flags = Vec::new();
    if let Some(i) = j.find("\"bitmaps\":[") {
        let rest = &j[i + 11..];
        let rest = &rest[..rest.find("}]").map_or(0, |e| e + 1)];
        for e in rest.split("{\"flags\":[").skip(1) {
            let f_end = e.find(']').expect("flags end");
            let fl: Vec<&str> = e[..f_end]
                .split(',')
                .map(|x| x.trim_matches('"'))
                .filter(|x| !x.is_empty())
                .collect();
            let n = e.find("\"name\":\"").expect("name") + 8;
            let n_end = n + e[n..].find('"').expect("name end");
            flags.push(format!("{}:{}", &e[n..n_end], fl.join(",")));
        }
    }
    flags.join(" ")
}
