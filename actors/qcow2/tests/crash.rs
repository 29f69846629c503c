//! Crash safety: a child process writes through the engine and logs each write before
//! it starts and once it is acknowledged; it is SIGKILLed at random moments. Every
//! acknowledged write must be in the image afterwards, and `qemu-img check` must find
//! no corruption (leaked clusters are allowed, as in QEMU).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const SIZE: u64 = 16 << 20;

/// The child's body: runs only when the parent sets QCOW2_CRASH_IMG.
#[test]
fn crash_child_entry() {
    let Ok(img) = std::env::var("QCOW2_CRASH_IMG") else {
        return;
    };
    let log_path = std::env::var("QCOW2_CRASH_LOG").expect("log");
    let seed: u64 = std::env::var("QCOW2_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let backing = std::env::var("QCOW2_CRASH_BACKING")
        .ok()
        .map(|b| Arc::new(open(&b, false)) as Arc<dyn bulkhead_qcow2::Backing>);
    let q = open_with(&img, true, backing, None);
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .expect("log");
    let mut rng = Rng(seed);
    for i in 0u64.. {
        let len = match rng.below(3) {
            0 => 1 + rng.below(5000),
            1 => 1 + rng.below(70_000),
            _ => 1 + rng.below(300_000),
        };
        let off = rng.below(SIZE - len);
        // 0 data, 1 zero-write, 2 discard (whole clusters read as zeroes afterwards:
        // v3, and any backing file is masked by the zero flag).
        let kind = match rng.below(8) {
            0 => 1,
            1 => 2,
            _ => 0,
        };
        let data_seed = seed.wrapping_mul(1_000_003).wrapping_add(i);
        // One write(2) per record: a record is in the log whole or not at all.
        log.write_all(format!("B {off} {len} {kind} {data_seed}\n").as_bytes())
            .expect("log");
        if kind == 1 {
            q.write_zeroes(off, len, rng.below(2) == 0).expect("zero");
        } else if kind == 2 {
            q.discard(off, len).expect("discard");
        } else {
            let mut buf = vec![0u8; len as usize];
            Rng(data_seed | 1).fill(&mut buf);
            q.write(&buf, off, false).expect("write");
        }
        log.write_all(b"A\n").expect("log");
    }
}

struct Model {
    /// Every logged operation: (round, off, len, kind, acknowledged), for diagnostics.
    history: Vec<(usize, u64, u64, u8, bool)>,
    round: usize,
    cluster: u64,
    data: Vec<u8>,
    /// Bytes whose content is unknown (a write in flight when the child died).
    unknown: Vec<bool>,
}

impl Model {
    fn apply_log(&mut self, log: &str) -> usize {
        let mut pending: Option<(u64, u64, u8, u64)> = None;
        let mut acked = 0;
        for line in log.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f[0] {
                "B" if f.len() == 5 => {
                    let p: (u64, u64, u8, u64) = (
                        f[1].parse().expect("off"),
                        f[2].parse().expect("len"),
                        f[3].parse().expect("kind"),
                        f[4].parse().expect("seed"),
                    );
                    // A discard touches whole clusters only; other bytes keep their state.
                    let (o, l) = if p.2 == 2 {
                        let cs = self.cluster;
                        let s = p.0.div_ceil(cs) * cs;
                        let e = ((p.0 + p.1) / cs * cs).max(s);
                        (s as usize, (e - s) as usize)
                    } else {
                        (p.0 as usize, p.1 as usize)
                    };
                    self.unknown[o..o + l].fill(true);
                    self.history.push((self.round, p.0, p.1, p.2, false));
                    pending = Some(p);
                }
                "A" => {
                    let (off, len, kind, seed) = pending.take().expect("A after B");
                    if let Some(h) = self.history.last_mut() {
                        h.4 = true;
                    }
                    let (o, l) = (off as usize, len as usize);
                    match kind {
                        1 => self.data[o..o + l].fill(0),
                        2 => {
                            // Only whole clusters are discarded; the rest is unchanged.
                            let cs = self.cluster;
                            let s = off.div_ceil(cs) * cs;
                            let e = (off + len) / cs * cs;
                            if e > s {
                                self.data[s as usize..e as usize].fill(0);
                            }
                        }
                        _ => Rng(seed | 1).fill(&mut self.data[o..o + l]),
                    }
                    if kind == 2 {
                        let cs = self.cluster;
                        let s = off.div_ceil(cs) * cs;
                        let e = ((off + len) / cs * cs).max(s);
                        self.unknown[s as usize..e as usize].fill(false);
                    } else {
                        self.unknown[o..o + l].fill(false);
                    }
                    acked += 1;
                }
                _ => {} // a torn last line: the write never started being logged
            }
        }
        acked
    }

    fn verify(&self, got: &[u8], round: usize) {
        for (i, (&g, &w)) in got.iter().zip(&self.data).enumerate() {
            if !self.unknown[i] && g != w {
                let i64_ = i as u64;
                let last: Vec<_> = self
                    .history
                    .iter()
                    .filter(|h| h.1 <= i64_ && i64_ < h.1 + h.2)
                    .rev()
                    .take(4)
                    .collect();
                panic!(
                    "round {round}: acknowledged byte {i:#x} is {g:#x}, expected {w:#x}; \
                     last operations on it (round, off, len, kind, acked): {last:x?}"
                );
            }
        }
    }
}

fn crash_rounds(
    tag: &str,
    cluster: u64,
    create: &[&str],
    backing: Option<&str>,
    base_data: Vec<u8>,
) {
    let dir = TempDir::new(tag);
    let img = dir.path("img");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create);
    args.push(&img);
    let size = SIZE.to_string();
    args.push(&size);
    qemu_img(&args);
    let rounds: usize = std::env::var("QCOW2_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let mut model = Model {
        history: Vec::new(),
        round: 0,
        cluster,
        data: base_data,
        unknown: vec![false; SIZE as usize],
    };
    let exe = std::env::current_exe().expect("exe");
    let mut rng = Rng(0xc0ffee);
    let mut total_acked = 0;
    for round in 0..rounds {
        let log = dir.path(&format!("log{round}"));
        std::fs::write(&log, b"").expect("log");
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--exact",
            "crash_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QCOW2_CRASH_IMG", &img)
        .env("QCOW2_CRASH_LOG", &log)
        .env("QCOW2_CRASH_SEED", (round as u64 + 1).to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(b) = backing {
            cmd.env("QCOW2_CRASH_BACKING", b);
        }
        let mut child = cmd.spawn().expect("spawn child");
        std::thread::sleep(Duration::from_millis(20 + rng.below(180)));
        // SIGKILL, by the child's own pid.
        child.kill().expect("kill");
        let _ = child.wait();
        let text = std::fs::read_to_string(&log).expect("log");
        model.round = round;
        total_acked += model.apply_log(&text);
        let q = open_with(
            &img,
            false,
            backing.map(|b| Arc::new(open(b, false)) as Arc<dyn bulkhead_qcow2::Backing>),
            None,
        );
        model.verify(&read_all(&q), round);
        drop(q);
        check(&img, true);
    }
    assert!(
        total_acked > rounds,
        "the child made progress: {total_acked} writes"
    );
    // qemu-img reads the same as the engine did.
    let raw = raw_of(&img, &dir, &[]);
    model.verify(&raw, rounds);
    // And `qemu-img check -r leaks` repairs what the kills leaked.
    qemu_img(&["check", "-q", "-r", "leaks", &img]);
    check(&img, false);
}

#[test]
fn crash_fresh_image() {
    crash_rounds(
        "crash-fresh",
        65536,
        &["-o", "cluster_size=65536"],
        None,
        vec![0u8; SIZE as usize],
    );
}

#[test]
fn crash_extended_l2() {
    crash_rounds(
        "crash-extl2",
        32768,
        &["-o", "cluster_size=32768,extended_l2=on,refcount_bits=64"],
        None,
        vec![0u8; SIZE as usize],
    );
}

#[test]
fn crash_overlay() {
    let dir = TempDir::new("crash-base");
    let base = dir.path("base");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, &SIZE.to_string()]);
    qemu_io(&base, &["write -P 0x5a 0 16M"]);
    let data = vec![0x5au8; SIZE as usize];
    crash_rounds(
        "crash-overlay",
        4096,
        &[
            "-o",
            "cluster_size=4096,refcount_bits=1",
            "-b",
            &base,
            "-F",
            "qcow2",
        ],
        Some(&base),
        data,
    );
}
