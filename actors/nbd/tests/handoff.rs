//! Hand-off: a listener negotiates against metadata-only exports and passes each
//! client, with what it negotiated, to another server that serves the export (the
//! NBD listener and export workers of `--isolation image`).

mod common;

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use bulkhead_nbd::{ExportConfig, ExportError, HandOff, HandOffHook, Mode, NbdServer};
use bulkhead_nbd::{RemoveMode, ServerConfig};
use common::*;

/// A listener on a socket whose clients are adopted by `exporter`, which serves
/// "exp" from a file of 0x42 bytes (first 64 KiB) and holes.
struct Pair {
    listener: Server,
    exporter: NbdServer,
    handed: Arc<Mutex<Vec<HandOff>>>,
}

fn pair(depth: bool) -> Pair {
    let listener = Server::start(ServerConfig::default());
    let img = listener.dir.path("img");
    make_image(&img, 1 << 20, &["write -P 0x42 0 64k"]);
    let config = |depth| ExportConfig {
        name: "exp".into(),
        description: Some("the export".into()),
        writable: true,
        allocation_depth: depth,
        bitmaps: Vec::new(),
    };
    listener
        .server
        .add_metadata_export(config(true), 1 << 20)
        .unwrap();
    let exporter = NbdServer::new(ServerConfig::default());
    exporter
        .add_export(config(depth), FileBackend::open(&img, false))
        .unwrap();
    let handed = Arc::new(Mutex::new(Vec::new()));
    let (to, log) = (exporter.clone(), handed.clone());
    let hook: HandOffHook = Arc::new(move |hand: HandOff, fd: OwnedFd| {
        log.lock().unwrap().push(hand.clone());
        let to = to.clone();
        Box::pin(async move {
            let std = std::os::unix::net::UnixStream::from(fd);
            let stream = tokio::net::UnixStream::from_std(std).unwrap();
            // A refused hand-off drops the socket: the client sees it closed.
            let _ = to.adopt_unix(stream, hand);
        })
    });
    listener.server.set_hand_off(hook);
    Pair {
        listener,
        exporter,
        handed,
    }
}

#[test]
fn a_handed_off_client_is_served_by_the_adopting_server() {
    let p = pair(true);
    // qemu-io negotiates structured replies and base:allocation, then reads and
    // writes through the exporter.
    let uri = p.listener.uri("exp");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0x42 0 64k",
            "-c",
            "write -P 0x17 128k 4k",
            "-c",
            "read -P 0x17 128k 4k",
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    assert!(map.contains("\"data\": true"), "{map}");
    assert!(map.contains("\"data\": false"), "{map}");
    let handed = p.handed.lock().unwrap();
    assert_eq!(handed.len(), 2);
    assert!(
        handed
            .iter()
            .all(|h| h.export == "exp" && h.mode >= Mode::Structured)
    );
    assert!(
        handed[1].base_allocation,
        "qemu-img map selects base:allocation"
    );
    // The listener holds no client once it handed them off.
    assert_eq!(p.listener.server.client_count("exp"), Some(0));
}

#[test]
fn requests_sent_with_go_travel_with_the_hand_off() {
    let p = pair(false);
    let mut r = Raw::connect(&p.listener.sock);
    let mut m = 3u32.to_be_bytes().to_vec();
    let mut d = name_bytes("exp");
    d.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&(d.len() as u32).to_be_bytes());
    m.extend_from_slice(&d);
    for cookie in [1u64, 2] {
        m.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
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
    assert!(!p.handed.lock().unwrap()[0].leftover.is_empty());
    // The client lives in the exporter now: safe removal is refused there.
    assert_eq!(p.exporter.client_count("exp"), Some(1));
    let e = p
        .exporter
        .remove_export("exp", RemoveMode::Safe)
        .unwrap_err();
    assert_eq!(e, ExportError::InUse("exp".into()));
}

#[test]
fn a_hand_off_the_adopter_cannot_honour_closes_the_client() {
    // The listener offers qemu:allocation-depth; this exporter's export does not.
    let p = pair(false);
    let mut r = Raw::fixed(&p.listener.sock);
    r.opt(8, &[]);
    r.replies().unwrap();
    let mut d = name_bytes("exp");
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&name_bytes("qemu:allocation-depth"));
    r.opt(10, &d);
    r.replies().unwrap();
    let mut d = name_bytes("exp");
    d.extend_from_slice(&0u16.to_be_bytes());
    r.opt(7, &d);
    // The INFO replies come from the listener; the final ACK never does.
    assert_eq!(r.replies(), None);
    assert!(p.handed.lock().unwrap()[0].allocation_depth);
    // An export the adopter does not have.
    let hand = HandOff {
        export: "other".into(),
        mode: Mode::Simple,
        base_allocation: false,
        allocation_depth: false,
        bitmaps: Vec::new(),
        reply: Vec::new(),
        leftover: Vec::new(),
    };
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let _g = p.listener.rt.enter();
    a.set_nonblocking(true).unwrap();
    let a = tokio::net::UnixStream::from_std(a).unwrap();
    assert_eq!(
        p.exporter.adopt_unix(a, hand),
        Err(ExportError::NotFound("other".into()))
    );
}

#[test]
fn selected_bitmaps_travel_as_indexes_and_unknown_ones_are_refused() {
    const K: u64 = 1024;
    let listener = Server::start(ServerConfig::default());
    let img = listener.dir.path("img");
    make_image(&img, 1 << 20, &[]);
    let bitmaps = || {
        vec![
            Runs::bitmap("b0", 1 << 20, &[(0, 4 * K)]),
            Runs::bitmap("b1", 1 << 20, &[(64 * K, 128 * K)]),
        ]
    };
    let config = ExportConfig {
        name: "exp".into(),
        description: None,
        writable: true,
        allocation_depth: false,
        bitmaps: bitmaps(),
    };
    listener
        .server
        .add_metadata_export(config.clone(), 1 << 20)
        .unwrap();
    let exporter = NbdServer::new(ServerConfig::default());
    exporter
        .add_export(config, FileBackend::open(&img, false))
        .unwrap();
    let handed = Arc::new(Mutex::new(Vec::new()));
    let (to, log) = (exporter.clone(), handed.clone());
    let hook: HandOffHook = Arc::new(move |hand: HandOff, fd: OwnedFd| {
        log.lock().unwrap().push(hand.clone());
        let to = to.clone();
        Box::pin(async move {
            let std = std::os::unix::net::UnixStream::from(fd);
            let stream = tokio::net::UnixStream::from_std(std).unwrap();
            let _ = to.adopt_unix(stream, hand);
        })
    });
    listener.server.set_hand_off(hook);
    let mut r = Raw::go(
        &listener.sock,
        "exp",
        true,
        false,
        &["qemu:dirty-bitmap:b1"],
    );
    r.request(0, 7, 1, 0, 1 << 20);
    let (flags, kind, _, d) = r.chunk().unwrap();
    assert_eq!((flags, kind), (1, 5));
    // Context id 3 (b1): clean 64 KiB, dirty 64 KiB, clean 896 KiB.
    let mut want = 3u32.to_be_bytes().to_vec();
    for (len, f) in [(64 * 1024u32, 0u32), (64 * 1024, 1), (896 * 1024, 0)] {
        want.extend_from_slice(&len.to_be_bytes());
        want.extend_from_slice(&f.to_be_bytes());
    }
    assert_eq!(d, want);
    assert_eq!(handed.lock().unwrap()[0].bitmaps, [1]);
    // Hand-offs negotiation cannot produce are refused.
    let _g = listener.rt.enter();
    let hand = |mode, bitmaps: Vec<u32>| HandOff {
        export: "exp".into(),
        mode,
        base_allocation: false,
        allocation_depth: false,
        bitmaps,
        reply: Vec::new(),
        leftover: Vec::new(),
    };
    for (h, err) in [
        (hand(Mode::Structured, vec![2]), "exp"),
        (hand(Mode::Structured, vec![1, 0]), "exp"),
        (hand(Mode::Structured, vec![0, 0]), "exp"),
        (hand(Mode::Simple, vec![0]), "exp"),
        (hand(Mode::Structured, vec![0; 257]), ""),
    ] {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = tokio::net::UnixStream::from_std(a).unwrap();
        let what = format!("{:?}", h.bitmaps.len());
        assert_eq!(
            exporter.adopt_unix(a, h),
            Err(ExportError::BadHandOff(err.into())),
            "{what}"
        );
    }
}
