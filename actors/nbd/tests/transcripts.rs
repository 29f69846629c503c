//! Byte-for-byte comparison with qemu-storage-daemon 10.0.2: the same scripted
//! client (options, then requests) is played against qsd and against our
//! server, and every reply (option replies, simple replies, structured and
//! extended chunks, error texts, disconnects) must be identical.

mod common;

use std::path::Path;

use bulkhead_nbd::ServerConfig;
use common::*;

#[derive(Clone)]
enum Step {
    /// Client flags word right after the greeting.
    Flags(u32),
    /// An option with its payload.
    Opt(u32, Vec<u8>),
    /// Raw bytes (malformed input).
    Bytes(Vec<u8>),
    /// A request: flags, type, offset, length, payload.
    Req(u16, u16, u64, u64, Vec<u8>),
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Options,
    Simple,
    Structured,
    Extended,
}

/// Plays `steps` and returns a printable transcript of everything received.
fn play(sock: &Path, steps: &[Step]) -> Vec<String> {
    let mut r = Raw::connect(sock);
    let mut out = Vec::new();
    let mut negotiated = Phase::Simple;
    let mut phase = Phase::Options;
    let mut cookie = 0u64;
    for step in steps {
        match step {
            Step::Flags(f) => r.send(&f.to_be_bytes()),
            Step::Bytes(b) => r.send(b),
            Step::Opt(opt, data) => {
                r.opt(*opt, data);
                match r.replies() {
                    None => {
                        out.push(format!("opt {opt}: closed"));
                        return out;
                    }
                    Some(reps) => {
                        let last = reps.last().map(|x| x.0);
                        if last == Some(1) {
                            match opt {
                                8 => negotiated = Phase::Structured,
                                11 => negotiated = Phase::Extended,
                                7 => phase = negotiated,
                                _ => {}
                            }
                        }
                        out.push(format!("opt {opt}: {reps:?}"));
                    }
                }
            }
            Step::Req(flags, kind, offset, len, payload) => {
                cookie += 1;
                if phase == Phase::Extended {
                    r.request_ext(*flags, *kind, cookie, *offset, *len);
                } else {
                    r.request(*flags, *kind, cookie, *offset, *len as u32);
                }
                r.send(payload);
                let line = match phase {
                    Phase::Simple | Phase::Options => match r.simple() {
                        None => None,
                        Some((err, c)) => {
                            let mut data = Vec::new();
                            if err == 0 && *kind == 0 {
                                data = r.read_n(*len as usize).unwrap_or_default();
                            }
                            Some(format!(
                                "simple err={err} cookie={c} data={}",
                                digest(&data)
                            ))
                        }
                    },
                    Phase::Structured => {
                        let mut chunks = Vec::new();
                        loop {
                            match r.chunk() {
                                None => {
                                    chunks.push("closed".to_owned());
                                    break;
                                }
                                Some((f, t, c, d)) => {
                                    chunks.push(format!("f={f} t={t} c={c} {}", digest(&d)));
                                    if f & 1 != 0 {
                                        break;
                                    }
                                }
                            }
                        }
                        Some(chunks.join(" | "))
                    }
                    Phase::Extended => {
                        let mut chunks = Vec::new();
                        loop {
                            match r.chunk_ext() {
                                None => {
                                    chunks.push("closed".to_owned());
                                    break;
                                }
                                Some((f, t, c, o, d)) => {
                                    chunks.push(format!("f={f} t={t} c={c} o={o} {}", digest(&d)));
                                    if f & 1 != 0 {
                                        break;
                                    }
                                }
                            }
                        }
                        Some(chunks.join(" | "))
                    }
                };
                match line {
                    Some(l) => out.push(format!("req {kind}: {l}")),
                    None => {
                        out.push(format!("req {kind}: closed"));
                        return out;
                    }
                }
            }
        }
    }
    out.push(format!("closed at end: {}", r.closed_soon()));
    out
}

/// Short payloads verbatim, long ones as length + checksum.
fn digest(d: &[u8]) -> String {
    if d.len() <= 64 {
        format!("{d:?}")
    } else {
        let sum = d
            .iter()
            .fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
        format!("[{} bytes, sum {sum:x}]", d.len())
    }
}

trait ClosedSoon {
    fn closed_soon(&mut self) -> bool;
}

impl ClosedSoon for Raw {
    fn closed_soon(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        use std::io::Read;
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

fn info(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = name_bytes(name);
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = name_bytes(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&name_bytes(q));
    }
    d
}

/// Runs every script against both servers serving copies of the same image.
fn compare(
    export_opts: &str,
    writable: bool,
    desc: Option<&str>,
    depth: bool,
    scripts: &[Vec<Step>],
) {
    let ours = Server::start(ServerConfig::default());
    let img = ours.dir.path("img");
    make_image(
        &img,
        1 << 20,
        &["write -P 0x5a 64k 64k", "write -P 0x11 512k 4k"],
    );
    let img2 = ours.dir.path("img2");
    run(
        "cp",
        &[
            "--sparse=always",
            img.to_str().unwrap(),
            img2.to_str().unwrap(),
        ],
    );
    ours.export("exp", &img, writable, desc, depth);
    let qsd = Qsd::start(&ours.dir, &img2, export_opts, "");
    for (i, script) in scripts.iter().enumerate() {
        let a = play(&ours.sock, script);
        let b = play(&qsd.sock, script);
        assert_eq!(a, b, "script {i} differs from qsd");
    }
}

fn opts(list: &[(u32, Vec<u8>)]) -> Vec<Step> {
    let mut s = vec![Step::Flags(3)];
    s.extend(list.iter().map(|(o, d)| Step::Opt(*o, d.clone())));
    s
}

#[test]
fn option_replies_match_qsd() {
    let long = "n".repeat(100);
    let scripts = vec![
        opts(&[
            (99, b"abc".to_vec()),
            (4, vec![]),
            (3, b"x".to_vec()),
            (3, vec![]),
        ]),
        opts(&[(5, vec![]), (5, b"x".to_vec()), (2, vec![])]),
        opts(&[
            (6, info("exp", &[1, 3, 2, 0, 77])),
            (6, info("exp", &[])),
            (7, {
                let mut d = info("exp", &[]);
                d.push(0);
                d
            }),
            (6, (5000u32).to_be_bytes().to_vec()),
            (6, vec![0, 0, 0, 9, b'a']),
            (7, info("a\0b", &[])),
            (6, info("nosuch", &[])),
            (6, info(&long, &[])),
            (9, meta("nosuch", &[])),
            (9, meta(&long, &[])),
        ]),
        opts(&[
            (10, meta("exp", &["base:allocation"])),
            (9, meta("exp", &[])),
            (9, meta("exp", &["qemu:"])),
            (9, meta("exp", &["base:"])),
            (9, meta("exp", &["qemu:dirty-bitmap:"])),
            (
                9,
                meta(
                    "exp",
                    &["other:thing", "base:allocation", "qemu:allocation-depth"],
                ),
            ),
            (9, {
                let mut d = name_bytes("exp");
                d.extend_from_slice(&2u32.to_be_bytes());
                d.extend_from_slice(&5000u32.to_be_bytes());
                d.push(b'q');
                d
            }),
            (8, vec![]),
            (8, vec![]),
            (8, b"x".to_vec()),
            (10, meta("exp", &["base:", "qemu:", "base:allocation"])),
            (10, meta("exp", &[])),
            (
                10,
                meta("exp", &["qemu:allocation-depth", "base:allocation"]),
            ),
            (11, vec![]),
            (11, vec![]),
            (8, vec![]),
            (6, info("exp", &[])),
            (7, info("exp", &[1])),
        ]),
        opts(&[(11, vec![]), (6, info("exp", &[])), (7, info("exp", &[]))]),
        opts(&[(11, vec![]), (1, b"exp".to_vec())]),
        // Not fixed newstyle: anything but EXPORT_NAME drops the connection.
        vec![Step::Flags(0), Step::Opt(3, vec![])],
        vec![Step::Flags(0x80)],
        vec![Step::Flags(3), Step::Bytes(vec![0; 16])],
        vec![Step::Flags(3), Step::Opt(1, b"nosuch".to_vec())],
    ];
    compare(
        "name=exp,writable=on,description=some text,allocation-depth=on",
        true,
        Some("some text"),
        true,
        &scripts,
    );
}

fn go_steps(structured: bool, extended: bool, contexts: &[&str]) -> Vec<Step> {
    let mut s = vec![Step::Flags(3)];
    if extended {
        s.push(Step::Opt(11, vec![]));
    } else if structured {
        s.push(Step::Opt(8, vec![]));
    }
    if !contexts.is_empty() {
        s.push(Step::Opt(10, meta("exp", contexts)));
    }
    s.push(Step::Opt(7, info("exp", &[])));
    s
}

fn requests() -> Vec<Step> {
    const M: u64 = 1 << 20;
    vec![
        Step::Req(0, 0, 0, 4096, vec![]),
        Step::Req(0, 0, 60 * 1024, 72 * 1024, vec![]),
        Step::Req(4, 0, 60 * 1024, 72 * 1024, vec![]),
        Step::Req(1, 0, 0, 512, vec![]),
        Step::Req(0, 0, M - 512, 1024, vec![]),
        Step::Req(0, 0, 2 * M, 1, vec![]),
        Step::Req(0x40, 0, 0, 512, vec![]),
        Step::Req(0, 0, 0, 0, vec![]),
        Step::Req(0, 0, 0, 33 * M, vec![]),
        Step::Req(0, 1, 4096, 512, vec![7; 512]),
        Step::Req(1, 1, 8192, 512, vec![8; 512]),
        Step::Req(0, 1, M - 256, 512, vec![9; 512]),
        Step::Req(2, 1, 0, 512, vec![9; 512]),
        Step::Req(0, 0, 4096, 8192, vec![]),
        Step::Req(0, 3, 0, 0, vec![]),
        Step::Req(0, 4, 200 * 1024, 64 * 1024, vec![]),
        Step::Req(1, 4, 300 * 1024, 64 * 1024, vec![]),
        Step::Req(0, 4, M, 1, vec![]),
        Step::Req(0, 6, 400 * 1024, 4096, vec![]),
        Step::Req(2, 6, 404 * 1024, 4096, vec![]),
        Step::Req(0x10, 6, 408 * 1024, 4096, vec![]),
        Step::Req(4, 6, 408 * 1024, 4096, vec![]),
        Step::Req(0, 6, M, 4096, vec![]),
        Step::Req(0, 5, 0, 4096, vec![]),
        Step::Req(0, 5, 0, 33 * M, vec![]),
        Step::Req(0, 7, 0, M, vec![]),
        Step::Req(8, 7, 0, M, vec![]),
        Step::Req(0, 7, 64 * 1024, 4096, vec![]),
        Step::Req(0, 7, 0, 0, vec![]),
        Step::Req(0, 7, 0, 2 * M, vec![]),
        Step::Req(0, 99, 0, 0, vec![]),
        Step::Req(0, 0, 0, M, vec![]),
        Step::Req(0, 2, 0, 0, vec![]),
    ]
}

fn transmission_scripts() -> Vec<Vec<Step>> {
    let mut scripts = Vec::new();
    for (s, e, ctx) in [
        (false, false, &[][..]),
        (true, false, &[][..]),
        (true, false, &["base:allocation"][..]),
        (
            true,
            false,
            &["base:allocation", "qemu:allocation-depth"][..],
        ),
        (true, true, &[][..]),
        (
            true,
            true,
            &["qemu:allocation-depth", "base:allocation"][..],
        ),
    ] {
        let mut script = go_steps(s, e, ctx);
        script.extend(requests());
        scripts.push(script);
    }
    scripts
}

#[test]
fn transmission_replies_match_qsd_on_a_writable_export() {
    compare(
        "name=exp,writable=on,allocation-depth=on",
        true,
        None,
        true,
        &transmission_scripts(),
    );
}

#[test]
fn transmission_replies_match_qsd_on_a_read_only_export() {
    compare(
        "name=exp,allocation-depth=on",
        false,
        None,
        true,
        &transmission_scripts(),
    );
}

#[test]
fn extended_block_status_payloads_and_oversize_writes_match_qsd() {
    let bs_payload = |effect: u64, ids: &[u32]| {
        let mut p = effect.to_be_bytes().to_vec();
        for id in ids {
            p.extend_from_slice(&id.to_be_bytes());
        }
        p
    };
    let mut scripts = Vec::new();
    for (ids, extra) in [
        (vec![0u32], 0usize),
        (vec![1], 0),
        (vec![1, 0], 0),
        (vec![0, 0], 0),
        (vec![5], 0),
        (vec![0, 1, 0], 0),
        (vec![0], 2),
    ] {
        let mut s = go_steps(true, true, &["base:allocation", "qemu:allocation-depth"]);
        let mut p = bs_payload(128 * 1024, &ids);
        p.extend(std::iter::repeat_n(0u8, extra));
        s.push(Step::Req(0x20, 7, 0, p.len() as u64, p));
        s.push(Step::Req(0, 0, 0, 512, vec![]));
        scripts.push(s);
    }
    // Extended-header oddities: payloads on commands that take none, WRITE
    // without PAYLOAD_LEN, 64-bit lengths.
    for req in [
        Step::Req(0x20, 0, 0, 512, vec![1; 512]),
        Step::Req(0x20, 3, 0, 8, vec![1; 8]),
        Step::Req(0x20, 6, 0, 8, vec![1; 8]),
        Step::Req(0, 1, 4096, 512, vec![3; 512]),
        Step::Req(0x21, 1, 8192, 512, vec![4; 512]),
        Step::Req(0, 7, 0, 1 << 33, vec![]),
        Step::Req(8, 7, 1000, 1 << 40, vec![]),
        Step::Req(0, 0, 0, (32 << 20) + 1, vec![]),
        Step::Req(0, 6, 0, 1 << 33, vec![]),
        Step::Req(0, 4, 0, 1 << 33, vec![]),
        Step::Req(0, 8, 0, 0, vec![]),
    ] {
        let mut s = go_steps(true, true, &["base:allocation", "qemu:allocation-depth"]);
        s.push(req);
        // Follow-up read away from freshly written ranges: qsd's file driver
        // caches block status, which can split a data run in two after a write.
        s.push(Step::Req(0, 0, 60 * 1024, 8192, vec![]));
        scripts.push(s);
    }
    // Sparse reads starting in a hole and ending in data, and the reverse;
    // REQ_ONE over both contexts.
    let mut s = go_steps(true, false, &["base:allocation", "qemu:allocation-depth"]);
    s.push(Step::Req(0, 0, 60 * 1024 + 3, 5000, vec![]));
    s.push(Step::Req(0, 0, 128 * 1024 - 7, 100, vec![]));
    s.push(Step::Req(8, 7, 60 * 1024, 100 * 1024, vec![]));
    s.push(Step::Req(8, 7, 64 * 1024, 100 * 1024, vec![]));
    scripts.push(s);
    // A WRITE longer than 32 MiB: error reply, then the connection drops.
    let mut s = go_steps(true, false, &[]);
    s.push(Step::Req(0, 1, 0, 33 << 20, vec![]));
    scripts.push(s);
    let mut s = go_steps(false, false, &[]);
    s.push(Step::Req(0, 1, 0, (32 << 20) + 1, vec![]));
    scripts.push(s);
    // Bad request magic drops the connection.
    let mut s = go_steps(true, false, &[]);
    s.push(Step::Bytes(vec![0; 28]));
    s.push(Step::Req(0, 0, 0, 512, vec![]));
    scripts.push(s);
    compare(
        "name=exp,writable=on,allocation-depth=on",
        true,
        None,
        true,
        &scripts,
    );
}

/// qsd exports a qcow2 image whose persistent bitmaps qemu-io writes made dirty:
/// b0 (64 KiB granules) at [64k, 128k) and [512k, 576k), b1 (4 KiB) at
/// [512k, 516k). Ours exports the same bitmaps from memory. The scripts ask for
/// bitmap contexts only (qcow2 allocation differs from a raw file's).
fn compare_bitmaps(scripts: &[Vec<Step>]) {
    const K: u64 = 1024;
    let ours = Server::start(ServerConfig::default());
    let img = ours.dir.path("img");
    make_image(&img, 1 << 20, &[]);
    ours.export_bitmaps(
        "exp",
        &img,
        true,
        vec![
            Runs::bitmap("b0", 1 << 20, &[(64 * K, 128 * K), (512 * K, 576 * K)]),
            Runs::bitmap("b1", 1 << 20, &[(512 * K, 516 * K)]),
        ],
    );
    let q = ours.dir.path("img.qcow2");
    let qs = q.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", qs, "1M"]);
    run("qemu-img", &["bitmap", "--add", qs, "b0"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 64k 64k", qs],
    );
    run("qemu-img", &["bitmap", "--add", "-g", "4096", qs, "b1"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 512k 4k", qs],
    );
    let qsd = Qsd::start_nodes(
        &ours.dir,
        &[
            format!("driver=file,node-name=f,filename={qs}"),
            "driver=qcow2,node-name=q,file=f".to_owned(),
        ],
        "q",
        "name=exp,writable=on,allocation-depth=on,bitmaps.0=b0,bitmaps.1=b1",
        "",
    );
    for (i, script) in scripts.iter().enumerate() {
        let a = play(&ours.sock, script);
        let b = play(&qsd.sock, script);
        assert_eq!(a, b, "script {i} differs from qsd");
    }
}

#[test]
fn dirty_bitmap_contexts_match_qsd() {
    const K: u64 = 1024;
    const M: u64 = 1 << 20;
    let b0 = "qemu:dirty-bitmap:b0";
    let b1 = "qemu:dirty-bitmap:b1";
    let mut scripts = vec![opts(&[
        (9, meta("exp", &[])),
        (9, meta("exp", &["qemu:"])),
        (9, meta("exp", &["qemu:dirty-bitmap:"])),
        (
            9,
            meta(
                "exp",
                &[
                    b1,
                    "qemu:dirty-bitmap:nosuch",
                    "base:allocation",
                    b0,
                    "qemu:dirty-bitmap:b",
                ],
            ),
        ),
        (10, meta("exp", &[b0])),
        (8, vec![]),
        (10, meta("exp", &[b1, b0, b1])),
        (10, meta("exp", &["qemu:", "qemu:dirty-bitmap:"])),
        (10, meta("exp", &[b1, "qemu:allocation-depth"])),
        (11, vec![]),
        (6, info("exp", &[])),
        (7, info("exp", &[])),
    ])];
    let requests = || {
        vec![
            Step::Req(0, 7, 0, M, vec![]),
            Step::Req(0, 7, 60 * K, 100 * K, vec![]),
            Step::Req(8, 7, 0, M, vec![]),
            Step::Req(8, 7, 64 * K, 100 * K, vec![]),
            Step::Req(0, 7, 100 * K, 1, vec![]),
            Step::Req(0, 7, 0, 0, vec![]),
            Step::Req(0, 7, M - 512, 1024, vec![]),
        ]
    };
    for (s, e, ctx) in [
        (true, false, &[b0, b1][..]),
        (true, false, &[b1][..]),
        (true, true, &[b1, b0][..]),
    ] {
        let mut script = go_steps(s, e, ctx);
        script.extend(requests());
        scripts.push(script);
    }
    // Extended payloads naming bitmap ids (2 = b0, 3 = b1).
    let bs_payload = |effect: u64, ids: &[u32]| {
        let mut p = effect.to_be_bytes().to_vec();
        for id in ids {
            p.extend_from_slice(&id.to_be_bytes());
        }
        p
    };
    let mut s = go_steps(true, true, &[b0, b1]);
    for (effect, ids, flags) in [
        (M, vec![3u32], 0x20u16),
        (520 * K, vec![3, 2], 0x20),
        (M, vec![2], 0x28),
        (M, vec![4], 0x20),
        (M, vec![2, 2], 0x20),
        (M, vec![0], 0x20),
        (2 * M, vec![2], 0x20),
    ] {
        let p = bs_payload(effect, &ids);
        s.push(Step::Req(flags, 7, 0, p.len() as u64, p));
    }
    scripts.push(s);
    compare_bitmaps(&scripts);
}
