//! Client-mode monitors: `--chardev socket,path=P` without `server=on` makes the daemon
//! connect out to a QMP client that listens on P (QEMU's own qsd tests work this way).
//! The test listens, qsd and the daemon under test each connect to it, and the same
//! session must read the same bytes from both (timestamps, versions and the temp dir
//! masked). A `reconnect-ms` monitor started before anybody listens connects once the
//! listener appears.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::mask::Masker;
use bulkhead_systests::{Daemon, DaemonKind, TempDir};

const ACCEPT_WITHIN: Duration = Duration::from_secs(15);

/// Accepts one connection, giving up after [`ACCEPT_WITHIN`].
fn accept(listener: &UnixListener) -> UnixStream {
    let _ = listener.set_nonblocking(true);
    let deadline = Instant::now() + ACCEPT_WITHIN;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(ACCEPT_WITHIN));
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the daemon never connected");
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Sends each request and collects every line read up to its reply, masked.
fn session(stream: UnixStream, dir: &Path, requests: &[&str]) -> Vec<String> {
    let mut masker = Masker::new().with_literal(dir.to_string_lossy().as_bytes(), "$DIR");
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => panic!("clone: {e}"),
    };
    let mut reader = BufReader::new(stream);
    let mut lines = Vec::new();
    let mut read_line = |lines: &mut Vec<String>| -> String {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => String::new(),
            Ok(_) => {
                let masked = String::from_utf8_lossy(&masker.mask(&line)).into_owned();
                lines.push(masked.clone());
                masked
            }
            Err(e) => panic!("read: {e} after {lines:?}"),
        }
    };
    read_line(&mut lines);
    for request in requests {
        if writer.write_all(request.as_bytes()).is_err() {
            break;
        }
        // Events may come before the reply; read until the reply (or EOF).
        loop {
            let line = read_line(&mut lines);
            if line.is_empty() || !line.contains("\"event\"") {
                break;
            }
        }
    }
    lines
}

const REQUESTS: &[&str] = &[
    "{\"execute\": \"query-version\", \"id\": 0}\n",
    "{\"execute\": \"qmp_capabilities\", \"id\": 1}\n",
    "{\"execute\": \"query-chardev\", \"id\": 2}\n",
    "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"null-co\", \"node-name\": \"n0\", \"size\": 4096}, \"id\": 3}\n",
    "{\"execute\": \"query-named-block-nodes\", \"arguments\": {\"flat\": true}, \"id\": 4}\n",
    "{\"execute\": \"chardev-remove\", \"arguments\": {\"id\": \"out\"}, \"id\": 5}\n",
    "{\"execute\": \"quit\", \"id\": 6}\n",
];

/// Runs [`REQUESTS`] over a client-mode monitor of `kind`; returns the masked lines.
fn run(kind: DaemonKind, extra: &str, listen_first: bool) -> Vec<String> {
    let dir = match TempDir::new("bulkhead-cm") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let path = dir.path().to_path_buf();
    let socket = path.join("client.sock");
    let bind = || match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => panic!("bind {}: {e}", socket.display()),
    };
    let early = listen_first.then(bind);
    let args = vec![
        "--chardev".to_owned(),
        format!("socket,path=$DIR/client.sock,id=out{extra}"),
        "--monitor".to_owned(),
        "out".to_owned(),
        "--chardev".to_owned(),
        "socket,path=$DIR/side.sock,server=on,wait=off,id=side".to_owned(),
        "--monitor".to_owned(),
        "side".to_owned(),
    ];
    let mut daemon = match Daemon::start_in(kind, dir, 0, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{}: {e}", kind.name()),
    };
    let listener = early.unwrap_or_else(|| {
        // Let the daemon fail its first attempt before anybody listens.
        thread::sleep(Duration::from_millis(300));
        bind()
    });
    let stream = accept(&listener);
    let lines = session(stream, &path, REQUESTS);
    let exit = daemon.wait_exit(Duration::from_secs(20));
    assert_eq!(
        exit.ok().flatten().map(|s| s.code()),
        Some(Some(0)),
        "{} did not exit 0 after quit; stderr:\n{}",
        kind.name(),
        daemon.stderr()
    );
    lines
}

fn tested() -> DaemonKind {
    match DaemonKind::under_test() {
        Ok(kind) => kind,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_client_mode_monitor_serves_qmp_over_the_outgoing_connection_like_qsd() {
    let reference = run(DaemonKind::Qsd, "", true);
    let tested = run(tested(), "", true);
    assert_eq!(tested, reference);
    // Something real was served: the chardev shows as connected and in use.
    assert!(
        reference.iter().any(|l| l.contains(
            r#"{"frontend-open": true, "filename": "unix:$DIR/client.sock", "label": "out"}"#
        )),
        "{reference:?}"
    );
}

#[test]
fn a_reconnecting_client_mode_monitor_connects_once_the_client_listens() {
    let reference = run(DaemonKind::Qsd, ",reconnect-ms=100", false);
    let tested = run(tested(), ",reconnect-ms=100", false);
    assert_eq!(tested, reference);
}

/// The `filename` `query-chardev` shows for `label`, polled until it satisfies `want`
/// (the daemon notices a peer asynchronously); gives up after [`ACCEPT_WITHIN`].
fn filename_when(
    qmp: &mut bulkhead_systests::QmpConnection,
    dir: &Path,
    label: &str,
    want: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + ACCEPT_WITHIN;
    loop {
        let list = match qmp.execute_ok("query-chardev", None) {
            Ok(v) => v,
            Err(e) => panic!("query-chardev: {e}"),
        };
        let name = list
            .as_array()
            .and_then(|l| l.iter().find(|c| c["label"] == label))
            .and_then(|c| c["filename"].as_str())
            .unwrap_or("(none)")
            .replace(&*dir.to_string_lossy(), "$DIR");
        if want(&name) || Instant::now() >= deadline {
            return name;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Chardevs `chardev-add` creates without a monitor: a listener takes a peer and shows
/// it as connected until it leaves; a client connects to our listener and shows the
/// peer leaving. Returns what `query-chardev` showed at each point.
fn unattached_sockets(kind: DaemonKind) -> Vec<String> {
    let mut daemon = match Daemon::start(kind, 1, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{}: {e}", kind.name()),
    };
    let dir = daemon.dir().to_path_buf();
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    let mut seen = Vec::new();
    let s1 = dir.join("s1.sock");
    let add = serde_json::json!({"id": "s1", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": s1.to_string_lossy()}}, "wait": false}}});
    if let Err(e) = qmp.execute_ok("chardev-add", Some(add)) {
        panic!("{e}");
    }
    seen.push(filename_when(&mut qmp, &dir, "s1", |_| true));
    let peer = match UnixStream::connect(&s1) {
        Ok(p) => p,
        Err(e) => panic!("connect: {e}"),
    };
    seen.push(filename_when(&mut qmp, &dir, "s1", |f| {
        !f.starts_with("disconnected:")
    }));
    drop(peer);
    seen.push(filename_when(&mut qmp, &dir, "s1", |f| {
        f.starts_with("disconnected:")
    }));
    let removed = qmp.execute_ok("chardev-remove", Some(serde_json::json!({"id": "s1"})));
    assert!(removed.is_ok(), "{removed:?}");
    seen.push(format!("socket file left: {}", s1.exists()));

    let listen = dir.join("listen.sock");
    let listener = match UnixListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => panic!("bind: {e}"),
    };
    let add = serde_json::json!({"id": "c1", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": listen.to_string_lossy()}}, "server": false}}});
    if let Err(e) = qmp.execute_ok("chardev-add", Some(add)) {
        panic!("{e}");
    }
    let accepted = accept(&listener);
    seen.push(filename_when(&mut qmp, &dir, "c1", |_| true));
    drop(accepted);
    seen.push(filename_when(&mut qmp, &dir, "c1", |f| {
        f.starts_with("disconnected:")
    }));
    let _ = qmp.execute("quit", None);
    let _ = daemon.wait_exit(Duration::from_secs(20));
    seen
}

#[test]
fn chardevs_without_a_monitor_show_their_peers_like_qsd() {
    let reference = unattached_sockets(DaemonKind::Qsd);
    assert_eq!(
        reference,
        [
            "disconnected:unix:$DIR/s1.sock,server=on",
            "unix:$DIR/s1.sock,server=on",
            "disconnected:unix:$DIR/s1.sock,server=on",
            "socket file left: false",
            "unix:$DIR/listen.sock",
            "disconnected:unix:$DIR/listen.sock",
        ]
    );
    assert_eq!(unattached_sockets(tested()), reference);
}
