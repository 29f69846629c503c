//! A rough single-threaded benchmark of the engine (4 KiB random reads/writes), to set
//! next to `qemu-img bench` on the same image. Usage:
//!   qcow2_bench <image> <read|write> <count> [backing...]
//! Backing files are opened read-only as a chain (first = direct backing).

use std::sync::Arc;
use std::time::Instant;

use bulkhead_qcow2::{Backing, FdStorage, OpenOptions, Qcow2};

fn open(path: &str, writable: bool, backing: Option<Arc<dyn Backing>>) -> Qcow2 {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .expect("open");
    let opts = OpenOptions {
        writable,
        backing,
        ..OpenOptions::default()
    };
    Qcow2::open(Arc::new(FdStorage::from(f)), opts).expect("qcow2")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (img, mode, count) = (&args[1], &args[2], args[3].parse::<u64>().expect("count"));
    let mut backing: Option<Arc<dyn Backing>> = None;
    for b in args[4..].iter().rev() {
        backing = Some(Arc::new(open(b, false, backing)));
    }
    let q = open(img, mode == "write", backing);
    let size = q.size();
    let mut buf = vec![0x5au8; 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 4096)) * 4096;
        if mode == "write" {
            q.write(&buf, off, false).expect("write");
        } else {
            q.read(&mut buf, off).expect("read");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    q.close().expect("close");
    println!(
        "{count} x 4 KiB {mode}: {secs:.3} s, {:.0} IOPS",
        count as f64 / secs
    );
}
