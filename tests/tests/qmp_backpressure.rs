//! QMP clients that send without reading must not grow the supervisor: a session stops
//! reading requests while its replies are unread (as qsd suspends a monitor), so the
//! flood stays in the client's socket buffers. Another monitor keeps answering
//! throughout, and a flooded monitor serves its next client once the flooder leaves.
//!
//! Always bulkhead: qsd 10.0.2 reads such a flood to the end and buffers every reply
//! (measured: all 56 MB of requests taken in, several minutes of work), so there is no
//! qsd behaviour to compare with here.

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::Duration;

use bulkhead_systests::{Daemon, DaemonKind};

/// The supervisor must stay below this however many requests are left unread.
const RSS_LIMIT_KIB: u64 = 64 * 1024;
/// Requests one flooding client tries to send.
const FLOOD_REQUESTS: usize = 2_000_000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(u64::MAX)
}

fn start(monitors: usize) -> Daemon {
    match Daemon::start(DaemonKind::Bulkhead, monitors, &[]) {
        Ok(daemon) => daemon,
        Err(e) => panic!("{e}"),
    }
}

/// Connects and sends `qmp_capabilities` and then up to [`FLOOD_REQUESTS`]
/// `query-version`s without ever reading; returns the connection and how many bytes
/// went out before the daemon stopped taking them (no progress for a second).
fn flood(socket: &Path) -> (UnixStream, usize, usize) {
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => panic!("connect {}: {e}", socket.display()),
    };
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    let chunk_requests = 10_000;
    let mut chunk = Vec::new();
    for _ in 0..chunk_requests {
        chunk.extend_from_slice(br#"{"execute": "query-version"}"#);
    }
    let mut sent = 0usize;
    let total = br#"{"execute": "qmp_capabilities"}"#.len()
        + chunk.len() * (FLOOD_REQUESTS / chunk_requests);
    if s.write_all(br#"{"execute": "qmp_capabilities"}"#).is_err() {
        return (s, sent, total);
    }
    sent += br#"{"execute": "qmp_capabilities"}"#.len();
    'outer: for _ in 0..FLOOD_REQUESTS / chunk_requests {
        let mut off = 0;
        while off < chunk.len() {
            match s.write(&chunk[off..]) {
                Ok(n) => {
                    off += n;
                    sent += n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // WouldBlock/TimedOut: the daemon stopped reading, which is the point.
                Err(_) => break 'outer,
            }
        }
    }
    (s, sent, total)
}

fn answers(daemon: &Daemon, monitor: usize) {
    let mut qmp = match daemon.qmp(monitor) {
        Ok(q) => q,
        Err(e) => panic!("monitor {monitor}: {e}"),
    };
    match qmp.execute("query-version", None) {
        Ok(reply) => assert!(reply.get("return").is_some(), "monitor {monitor}: {reply}"),
        Err(e) => panic!("monitor {monitor}: {e}"),
    }
}

#[test]
fn a_client_that_never_reads_two_million_replies_does_not_grow_the_supervisor() {
    let daemon = start(2);
    answers(&daemon, 1);
    let idle = rss_kib(daemon.pid());
    let (flooder, sent, total) = flood(daemon.qmp_socket(0).unwrap_or(Path::new("")));
    assert!(
        sent < total,
        "the daemon read all {total} bytes of requests although no reply was read"
    );
    let rss = rss_kib(daemon.pid());
    assert!(
        rss < RSS_LIMIT_KIB,
        "supervisor RSS {rss} KiB (idle {idle} KiB) after {sent} unread bytes of requests"
    );
    answers(&daemon, 1);
    drop(flooder);
    // The flooded monitor serves its next client.
    answers(&daemon, 0);
    let rss = rss_kib(daemon.pid());
    assert!(
        rss < RSS_LIMIT_KIB,
        "supervisor RSS {rss} KiB after the flood"
    );
}

#[test]
fn fifty_flooding_clients_on_ten_monitors_do_not_grow_the_supervisor() {
    let monitors = 10;
    let daemon = start(monitors + 1);
    let idle = rss_kib(daemon.pid());
    let sockets: Vec<_> = (0..monitors)
        .filter_map(|i| daemon.qmp_socket(i).map(Path::to_path_buf))
        .collect();
    // Five clients per monitor: one is served, four wait to be accepted, as with qsd.
    let floods: Vec<_> = sockets
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.clone(), 5))
        .map(|s| thread::spawn(move || flood(&s)))
        .collect();
    let mut held = Vec::new();
    for f in floods {
        match f.join() {
            Ok((conn, _, _)) => held.push(conn),
            Err(_) => panic!("a flooding thread panicked"),
        }
    }
    let rss = rss_kib(daemon.pid());
    assert!(
        rss < RSS_LIMIT_KIB,
        "supervisor RSS {rss} KiB (idle {idle} KiB) with {} flooding clients",
        held.len()
    );
    answers(&daemon, monitors);
    drop(held);
    for i in 0..monitors {
        answers(&daemon, i);
    }
}
