//! Export lifecycle, connection limits and misbehaving peers: a bad or stalled
//! client must never crash the server or hold up other clients.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_block::{BlockIo, Extent, IoFuture, WriteFlags, ZeroFlags};
use bulkhead_nbd::{ExportConfig, RemoveMode, ServerConfig};
use common::*;

fn server_with_image(config: ServerConfig) -> Server {
    let s = Server::start(config);
    let img = s.dir.path("img");
    make_image(&img, 1 << 20, &["write -P 0x42 0 64k"]);
    s.export("exp", &img, true, None, false);
    s
}

/// A healthy client still gets served: structured GO, then a READ.
fn healthy_read(s: &Server) {
    let mut r = Raw::go(&s.sock, "exp", false, false, &[]);
    r.request(0, 0, 7, 0, 512);
    assert_eq!(r.simple(), Some((0, 7)));
    assert_eq!(r.read_n(512), Some(vec![0x42; 512]));
}

#[test]
fn wrong_magic_unknown_flags_and_oversized_options_close_only_that_connection() {
    let s = server_with_image(ServerConfig::default());
    let mut a = Raw::fixed(&s.sock);
    a.send(&[0xde; 16]);
    assert!(a.closed());
    let mut b = Raw::connect(&s.sock);
    b.send(&0x80u32.to_be_bytes());
    assert!(b.closed());
    let mut c = Raw::fixed(&s.sock);
    let mut h = OPTS_MAGIC.to_be_bytes().to_vec();
    h.extend_from_slice(&3u32.to_be_bytes());
    h.extend_from_slice(&((32u32 << 20) + 1).to_be_bytes());
    c.send(&h);
    assert!(c.closed());
    healthy_read(&s);
}

#[test]
fn unknown_options_are_refused_and_negotiation_continues() {
    let s = server_with_image(ServerConfig::default());
    let mut r = Raw::fixed(&s.sock);
    r.opt(1234, b"payload");
    let reps = r.replies().unwrap();
    assert_eq!(
        reps,
        vec![(0x8000_0001, b"Unsupported option 1234 (<unknown>)".to_vec())]
    );
    let mut d = name_bytes("exp");
    d.extend_from_slice(&0u16.to_be_bytes());
    r.opt(7, &d);
    assert_eq!(r.replies().unwrap().last().unwrap().0, 1);
}

#[test]
fn clients_vanishing_mid_option_or_mid_request_do_not_disturb_others() {
    let s = server_with_image(ServerConfig::default());
    // Announces a 1 MiB option, sends 10 bytes, hangs up.
    let mut a = Raw::fixed(&s.sock);
    let mut h = OPTS_MAGIC.to_be_bytes().to_vec();
    h.extend_from_slice(&6u32.to_be_bytes());
    h.extend_from_slice(&(1u32 << 20).to_be_bytes());
    h.extend_from_slice(&[0; 10]);
    a.send(&h);
    drop(a);
    // Sends half a WRITE payload, hangs up.
    let mut b = Raw::go(&s.sock, "exp", true, false, &[]);
    b.request(0, 1, 1, 0, 1 << 20);
    b.send(&vec![1; 1 << 19]);
    drop(b);
    // Sends half a request header, hangs up.
    let mut c = Raw::go(&s.sock, "exp", false, false, &[]);
    c.send(&[0x25, 0x60, 0x95]);
    drop(c);
    healthy_read(&s);
    // The half-written request did not reach the image.
    let mut r = Raw::go(&s.sock, "exp", false, false, &[]);
    r.request(0, 0, 1, 0, 4096);
    assert_eq!(r.simple(), Some((0, 1)));
    assert_eq!(r.read_n(4096), Some(vec![0x42; 4096]));
    // Every connection is gone once the peers are.
    let deadline = Instant::now() + Duration::from_secs(5);
    drop(r);
    while s.server.connection_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "connections leaked: {} open, {:?} attached",
            s.server.connection_count(),
            s.server.client_count("exp")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.server.client_count("exp"), Some(0));
}

#[test]
fn a_stalled_handshake_is_dropped_after_handshake_max_seconds_and_blocks_nobody() {
    let s = server_with_image(ServerConfig {
        max_connections: 100,
        handshake_max_seconds: 1,
    });
    let mut stalled = Raw::connect(&s.sock);
    healthy_read(&s);
    let t = Instant::now();
    assert!(stalled.closed());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn requests_are_served_concurrently_and_answered_by_cookie() {
    let s = server_with_image(ServerConfig::default());
    let mut r = Raw::go(&s.sock, "exp", false, false, &[]);
    // 64 pipelined reads: the server keeps at most 16 in flight but answers all.
    for i in 0..64u64 {
        r.request(0, 0, 1000 + i, i * 512, 512);
    }
    let mut seen = Vec::new();
    for _ in 0..64 {
        let (err, cookie) = r.simple().unwrap();
        assert_eq!(err, 0);
        assert_eq!(r.read_n(512), Some(vec![0x42; 512]));
        seen.push(cookie);
    }
    seen.sort();
    assert_eq!(seen, (1000..1064).collect::<Vec<_>>());
}

/// Small replies are batched into one write and large ones written directly; mixed
/// and pipelined, every reply still arrives whole, never interleaved with another.
#[test]
fn small_and_large_replies_pipelined_arrive_whole() {
    let s = server_with_image(ServerConfig::default());
    let mut r = Raw::go(&s.sock, "exp", false, false, &[]);
    const LARGE: u32 = 128 * 1024;
    for i in 0..24u64 {
        r.request(0, 0, 2000 + i, 65536 - 256, 512);
        r.request(0, 0, 3000 + i, 0, LARGE);
    }
    let mut large = vec![0x42u8; 65536];
    large.resize(LARGE as usize, 0);
    let mut small = vec![0x42u8; 256];
    small.resize(512, 0);
    let mut seen = Vec::new();
    for _ in 0..48 {
        let (err, cookie) = r.simple().unwrap();
        assert_eq!(err, 0);
        let (len, expected) = match cookie {
            2000..2024 => (512, &small),
            3000..3024 => (LARGE as usize, &large),
            other => panic!("unexpected cookie {other}"),
        };
        assert!(
            r.read_n(len).as_ref() == Some(expected),
            "payload of {cookie}"
        );
        seen.push(cookie);
    }
    seen.sort();
    let mut want: Vec<u64> = (2000..2024).chain(3000..3024).collect();
    want.sort();
    assert_eq!(seen, want);
}

#[test]
fn safe_removal_is_refused_with_a_client_and_hard_removal_disconnects_it() {
    let s = server_with_image(ServerConfig::default());
    let mut r = Raw::go(&s.sock, "exp", false, false, &[]);
    assert_eq!(s.server.client_count("exp"), Some(1));
    let e = s.server.remove_export("exp", RemoveMode::Safe).unwrap_err();
    assert_eq!(e.to_string(), "export 'exp' still in use");
    assert_eq!(s.server.export_names(), vec!["exp".to_owned()]);
    let removal = s.server.remove_export("exp", RemoveMode::Hard).unwrap();
    s.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), removal.finished())
            .await
            .expect("hard removal finishes once the client is dropped");
    });
    r.request(0, 0, 1, 0, 512);
    assert_eq!(r.simple(), None, "the client sees the connection closed");
    // The export is gone for new clients.
    let mut c = Raw::fixed(&s.sock);
    let mut d = name_bytes("exp");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.opt(7, &d);
    assert_eq!(
        c.replies().unwrap(),
        vec![(0x8000_0006, b"export 'exp' not present".to_vec())]
    );
}

/// A node whose reads never complete.
struct Stuck;

impl BlockIo for Stuck {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read<'a>(&'a self, _: u64, _: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(std::future::pending())
    }
    fn write<'a>(&'a self, _: u64, _: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(std::future::pending())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
    fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
    fn block_status(&self, _: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            Ok(vec![Extent {
                length: len,
                data: true,
                zero: false,
                depth: 1,
            }])
        })
    }
}

#[test]
fn hard_removal_aborts_requests_stuck_in_the_backend() {
    let s = Server::start(ServerConfig::default());
    s.server
        .add_export(
            ExportConfig {
                name: "stuck".to_owned(),
                description: None,
                writable: true,
                allocation_depth: false,
                bitmaps: Vec::new(),
            },
            Arc::new(Stuck),
        )
        .unwrap();
    let mut r = Raw::go(&s.sock, "stuck", false, false, &[]);
    for i in 0..20 {
        r.request(0, 0, i, 0, 512);
    }
    r.request(0, 3, 99, 0, 0);
    std::thread::sleep(Duration::from_millis(200));
    let removal = s.server.remove_export("stuck", RemoveMode::Hard).unwrap();
    s.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), removal.finished())
            .await
            .expect("in-flight requests are aborted");
    });
    assert_eq!(r.simple(), None);
}

#[test]
fn with_one_connection_allowed_a_second_client_negotiates_then_waits_for_the_first() {
    let s = server_with_image(ServerConfig {
        max_connections: 1,
        handshake_max_seconds: 1,
    });
    let first = Raw::go(&s.sock, "exp", false, false, &[]);
    // The second is greeted and negotiates (it takes no slot while it does), but
    // its GO gets every reply except the final ACK while the first is attached...
    let mut second = Raw::fixed(&s.sock);
    let mut d = name_bytes("exp");
    d.extend_from_slice(&0u16.to_be_bytes());
    second.opt(7, &d);
    let mut infos = Vec::new();
    for _ in 0..2 {
        let h = second.read_n(20).expect("an INFO reply");
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        second.read_n(len).expect("its payload");
        infos.push(kind);
    }
    assert_eq!(infos, vec![3, 3]);
    // ...and the handshake limit does not apply to that wait.
    second
        .s
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    assert_eq!(second.read_n(1), None, "no ACK while the first is attached");
    assert_eq!(s.server.connection_count(), 2);
    drop(first);
    second
        .s
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(second.replies().map(|r| r[0].0), Some(1), "the ACK");
    second.request(0, 0, 9, 0, 512);
    assert_eq!(second.simple(), Some((0, 9)));
    assert_eq!(second.read_n(512), Some(vec![0x42; 512]));
}

#[test]
fn requests_sent_with_go_in_one_write_are_served() {
    let s = server_with_image(ServerConfig::default());
    let mut r = Raw::connect(&s.sock);
    // Flags, GO and two READs in one write: the READs reach the server in the same
    // segment as GO, before it replies.
    let mut m = 3u32.to_be_bytes().to_vec();
    let mut d = name_bytes("exp");
    d.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&(d.len() as u32).to_be_bytes());
    m.extend_from_slice(&d);
    for cookie in [1u64, 2] {
        m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&512u32.to_be_bytes());
    }
    r.send(&m);
    assert_eq!(r.replies().and_then(|r| r.last().map(|l| l.0)), Some(1));
    for _ in 0..2 {
        let (err, cookie) = r.simple().expect("a reply");
        assert_eq!(err, 0, "cookie {cookie}");
        assert_eq!(r.read_n(512), Some(vec![0x42; 512]));
    }
}

#[test]
fn when_too_many_clients_negotiate_the_one_idle_longest_is_dropped() {
    let s = server_with_image(ServerConfig {
        max_connections: 100,
        handshake_max_seconds: 0,
    });
    assert_eq!(
        s.server.negotiating_limit(),
        bulkhead_nbd::server::NEGOTIATING_MAX
    );
    let limit = 16;
    s.server.set_negotiating_limit(limit);
    // The oldest client then talks (INFO for a missing export): it is the most
    // recently active, so the second oldest is the one idle longest.
    let mut idle: Vec<Raw> = (0..limit).map(|_| Raw::connect(&s.sock)).collect();
    std::thread::sleep(Duration::from_millis(20));
    idle[0].send(&3u32.to_be_bytes());
    let mut d = name_bytes("none");
    d.extend_from_slice(&0u16.to_be_bytes());
    idle[0].opt(6, &d);
    assert_eq!(idle[0].replies().map(|r| r[0].0), Some(0x8000_0006));
    std::thread::sleep(Duration::from_millis(20));
    // One more client: the set is full, so the one idle longest goes.
    healthy_read(&s);
    assert!(idle[1].closed(), "the client idle longest was dropped");
    for (i, c) in idle.iter_mut().enumerate().skip(2) {
        c.s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = std::io::Read::read(&mut c.s, &mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "client {i}: {r:?}"
        );
    }
    // The active one still negotiates.
    let mut d = name_bytes("exp");
    d.extend_from_slice(&0u16.to_be_bytes());
    idle[0].opt(7, &d);
    assert_eq!(
        idle[0].replies().and_then(|r| r.last().map(|l| l.0)),
        Some(1)
    );
}

#[test]
fn exports_added_and_removed_at_runtime_show_in_list() {
    let s = server_with_image(ServerConfig::default());
    let img2 = s.dir.path("img2");
    make_image(&img2, 1 << 20, &[]);
    s.export("second", &img2, false, Some("two"), false);
    let list = || {
        let mut r = Raw::fixed(&s.sock);
        r.opt(3, &[]);
        r.replies().unwrap()
    };
    let mut two = vec![0, 0, 0, 6];
    two.extend_from_slice(b"secondtwo");
    assert_eq!(
        list(),
        vec![(2, b"\0\0\0\x03exp".to_vec()), (2, two), (1, vec![])]
    );
    s.server.remove_export("exp", RemoveMode::Safe).unwrap();
    let mut two = vec![0, 0, 0, 6];
    two.extend_from_slice(b"secondtwo");
    assert_eq!(list(), vec![(2, two), (1, vec![])]);
}

#[test]
fn shutdown_closes_every_connection_and_stops_listening() {
    let s = server_with_image(ServerConfig::default());
    let mut attached = Raw::go(&s.sock, "exp", false, false, &[]);
    let mut handshaking = Raw::connect(&s.sock);
    s.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), s.server.shutdown())
            .await
            .expect("shutdown completes");
    });
    assert!(attached.closed());
    assert!(handshaking.closed());
    assert_eq!(s.server.export_names(), Vec::<String>::new());
    assert_eq!(s.server.connection_count(), 0);
}

#[test]
fn tcp_listeners_and_handed_in_streams_are_served() {
    let s = server_with_image(ServerConfig::default());
    let img = s.dir.path("img");
    // TCP, driven by nbdinfo.
    let listener = {
        let _g = s.rt.enter();
        s.rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
    };
    let port = listener.local_addr().unwrap().port();
    let server = s.server.clone();
    s.rt.spawn(async move { server.serve_tcp_listener(listener).await });
    let out = run(
        "nbdinfo",
        &["--size", &format!("nbd://127.0.0.1:{port}/exp")],
    );
    assert_eq!(out, format!("{}\n", std::fs::metadata(&img).unwrap().len()));
    // An already-accepted Unix stream.
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let server = s.server.clone();
    s.rt.spawn(async move {
        let stream = tokio::net::UnixStream::from_std(ours).unwrap();
        server.serve_unix_stream(stream).await
    });
    theirs
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut r = Raw { s: theirs };
    assert_eq!(&r.read_n(18).unwrap()[..8], b"NBDMAGIC");
    r.send(&3u32.to_be_bytes());
    let mut d = name_bytes("exp");
    d.extend_from_slice(&0u16.to_be_bytes());
    r.opt(7, &d);
    assert_eq!(r.replies().unwrap().last().unwrap().0, 1);
    r.request(0, 0, 5, 0, 16);
    assert_eq!(r.simple(), Some((0, 5)));
    assert_eq!(r.read_n(16), Some(vec![0x42; 16]));
}

#[test]
fn export_name_replies_with_size_and_flags_padded_unless_no_zeroes() {
    let s = server_with_image(ServerConfig::default());
    for (flags, pad) in [(1u32, 124usize), (3, 0)] {
        let mut r = Raw::connect(&s.sock);
        r.send(&flags.to_be_bytes());
        r.opt(1, b"exp");
        let reply = r.read_n(10 + pad).unwrap();
        assert_eq!(&reply[..8], &(1u64 << 20).to_be_bytes());
        // Simple replies only: no DF.
        assert_eq!(&reply[8..10], &0x0d6du16.to_be_bytes());
        assert!(reply[10..].iter().all(|&b| b == 0));
        r.request(0, 0, 3, 0, 8);
        assert_eq!(r.simple(), Some((0, 3)));
        assert_eq!(r.read_n(8), Some(vec![0x42; 8]));
    }
    // An old (non-fixed) newstyle client may only send EXPORT_NAME.
    let mut r = Raw::connect(&s.sock);
    r.send(&0u32.to_be_bytes());
    r.opt(1, b"exp");
    assert_eq!(r.read_n(134).unwrap()[8..10], 0x0d6du16.to_be_bytes());
}

/// Reads at offset 0 wait until a read at offset 512 has run; counts started reads.
struct Gate {
    started: std::sync::atomic::AtomicUsize,
    gate: tokio::sync::Semaphore,
}

impl BlockIo for Gate {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.started
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if offset == 0 {
                // Each opening lets exactly one waiting read through.
                if let Ok(p) = self.gate.acquire().await {
                    p.forget();
                }
            } else if offset == 512 {
                self.gate.add_permits(1);
            }
            buf.fill(offset as u8 + 1);
            Ok(())
        })
    }
    fn write<'a>(&'a self, _: u64, _: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async { Err(bulkhead_block::IoError::ReadOnly) })
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(bulkhead_block::IoError::ReadOnly) })
    }
    fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(bulkhead_block::IoError::ReadOnly) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, _: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            Ok(vec![Extent {
                length: len,
                data: true,
                zero: false,
                depth: 1,
            }])
        })
    }
}

fn gate_server() -> (Server, Arc<Gate>) {
    let s = Server::start(ServerConfig::default());
    let gate = Arc::new(Gate {
        started: 0.into(),
        gate: tokio::sync::Semaphore::new(0),
    });
    s.server
        .add_export(
            ExportConfig {
                name: "gate".to_owned(),
                description: None,
                writable: false,
                allocation_depth: false,
                bitmaps: Vec::new(),
            },
            gate.clone(),
        )
        .unwrap();
    (s, gate)
}

#[test]
fn a_slow_request_does_not_hold_up_later_ones_on_the_same_connection() {
    let (s, _gate) = gate_server();
    let mut r = Raw::go(&s.sock, "gate", false, false, &[]);
    r.request(0, 0, 1, 0, 512);
    r.request(0, 0, 2, 512, 512);
    assert_eq!(r.simple(), Some((0, 2)));
    assert_eq!(r.read_n(512), Some(vec![1; 512]));
    assert_eq!(r.simple(), Some((0, 1)));
    assert_eq!(r.read_n(512), Some(vec![1; 512]));
}

#[test]
fn at_most_sixteen_requests_per_client_are_in_flight() {
    let (s, gate) = gate_server();
    let mut r = Raw::go(&s.sock, "gate", false, false, &[]);
    for i in 0..20 {
        r.request(0, 0, i, 0, 512);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gate.started.load(std::sync::atomic::Ordering::SeqCst), 16);
    // Releasing one lets exactly one more start.
    gate.gate.add_permits(1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gate.started.load(std::sync::atomic::Ordering::SeqCst), 17);
    assert_eq!(r.simple().map(|x| x.0), Some(0));
}

/// xorshift64*: deterministic pseudo-random bytes without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_garbage_in_every_phase_never_takes_the_server_down() {
    let s = server_with_image(ServerConfig::default());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let phase = round % 4;
        let mut r = match phase {
            0 => Raw::connect(&s.sock),
            1 => Raw::fixed(&s.sock),
            2 => Raw::go(&s.sock, "exp", false, false, &[]),
            _ => Raw::go(&s.sock, "exp", true, true, &["base:allocation"]),
        };
        let len = (rng.next() % 200) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Sometimes start with a valid magic so the parser goes deeper.
        if rng.next().is_multiple_of(2) && junk.len() >= 8 {
            let magic: &[u8] = match phase {
                0 | 1 => &OPTS_MAGIC.to_be_bytes(),
                2 => &0x2560_9513u32.to_be_bytes(),
                _ => &0x21e4_1c71u32.to_be_bytes(),
            };
            junk[..magic.len()].copy_from_slice(magic);
        }
        r.send(&junk);
        drop(r);
    }
    healthy_read(&s);
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.server.connection_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} connections still open",
            s.server.connection_count()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads that never finish, counted as they start.
struct CountingStuck {
    started: std::sync::atomic::AtomicUsize,
}

impl BlockIo for CountingStuck {
    fn size(&self) -> u64 {
        64 << 20
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read<'a>(&'a self, _: u64, _: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(std::future::pending())
    }
    fn write<'a>(&'a self, _: u64, _: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async { Err(bulkhead_block::IoError::ReadOnly) })
    }
    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(bulkhead_block::IoError::ReadOnly) })
    }
    fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(bulkhead_block::IoError::ReadOnly) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, _: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            Ok(vec![Extent {
                length: len,
                data: true,
                zero: false,
                depth: 1,
            }])
        })
    }
}

#[test]
fn a_connection_holds_at_most_its_buffer_budget_in_flight() {
    let s = Server::start(ServerConfig::default());
    let backend = Arc::new(CountingStuck {
        started: std::sync::atomic::AtomicUsize::new(0),
    });
    s.server
        .add_export(
            ExportConfig {
                name: "big".to_owned(),
                description: None,
                writable: false,
                allocation_depth: false,
                bitmaps: Vec::new(),
            },
            backend.clone(),
        )
        .unwrap();
    let mut r = Raw::go(&s.sock, "big", false, false, &[]);
    // Sixteen 32 MiB reads fit QEMU's request limit (512 MiB of buffers); the
    // connection's budget lets only two of them hold a buffer at once.
    let largest = bulkhead_nbd::proto::MAX_BUFFER_SIZE;
    for i in 0..16 {
        r.request(0, 0, i, 0, largest);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.started.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no read reached the backend");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Time for more to start, were the budget not enforced (a debug build zero-fills
    // each 32 MiB buffer slowly, so give it a few seconds).
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline
        && backend.started.load(std::sync::atomic::Ordering::SeqCst) <= 2
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = backend.started.load(std::sync::atomic::Ordering::SeqCst);
    // Two requests of the largest size, however the constant is spelled.
    let budget = 2;
    assert!(
        (1..=budget).contains(&started),
        "{started} reads of 32 MiB in flight; the budget allows {budget}"
    );
    let removal = s.server.remove_export("big", RemoveMode::Hard).unwrap();
    s.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), removal.finished())
            .await
            .expect("in-flight requests are aborted");
    });
}
