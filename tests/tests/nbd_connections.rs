//! NBD connection handling against qemu-storage-daemon 10.0.2: clients that never
//! finish the handshake, `handshake-max-seconds`, `max-connections`, and an NBD worker
//! that runs out of descriptors.
//!
//! Runs in the test process. Each test starts its daemons in fresh temp dirs (removed
//! on drop with every process the daemon spawned). Everything a daemon sends is read
//! through the bounded raw client of `bulkhead_systests::nbd`.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::nbd::{GREETING, NbdPeer, raise_nofile};
use bulkhead_systests::{Daemon, DaemonKind, TempDir};

/// How long a socket gets to appear, a client to be served, a server to hang up.
const PATIENCE: Duration = Duration::from_secs(20);

/// How many clients sit in the handshake while another one is served.
const IDLE_CLIENTS: usize = 1000;

fn under_test() -> DaemonKind {
    DaemonKind::under_test().unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `kind` serving a 1 MiB raw image as export `exp` on `$DIR/nbd.sock`, with
/// `server` appended to the `--nbd-server` options.
fn start(kind: DaemonKind, server: &str) -> Daemon {
    let dir =
        TempDir::new(&format!("bulkhead-conn-{}", kind.name())).unwrap_or_else(|e| panic!("{e}"));
    let image = dir.path().join("disk.img");
    if let Err(e) = std::fs::File::create(&image).and_then(|f| f.set_len(1 << 20)) {
        panic!("cannot create {}: {e}", image.display());
    }
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--nbd-server",
        &format!("addr.type=unix,addr.path=$DIR/nbd.sock{server}"),
        "--export",
        "type=nbd,id=e0,node-name=file0,name=exp,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let daemon = Daemon::start_in(kind, dir, 1, &args, &[]).unwrap_or_else(|e| panic!("{e}"));
    let socket = socket(&daemon);
    let deadline = Instant::now() + PATIENCE;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not create {}; stderr:\n{}",
            kind.name(),
            socket.display(),
            daemon.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
    daemon
}

fn socket(daemon: &Daemon) -> PathBuf {
    daemon.dir().join("nbd.sock")
}

/// A client that connects and reads the greeting, then sends `bytes` and nothing more.
fn stalled(socket: &Path, bytes: &[u8]) -> NbdPeer {
    let mut peer = NbdPeer::connect(socket, PATIENCE).unwrap_or_else(|e| panic!("connect: {e}"));
    let greeting = peer
        .greeting(PATIENCE)
        .unwrap_or_else(|e| panic!("greeting: {e}"));
    assert_eq!(greeting, GREETING);
    peer.send(bytes).unwrap_or_else(|e| panic!("send: {e}"));
    peer
}

/// Opens export `exp` and reads its first sector: a client being served.
fn served(socket: &Path) -> Result<(), String> {
    let mut peer = NbdPeer::open(socket, "exp", PATIENCE).map_err(|e| e.to_string())?;
    let data = peer.read(0, 512).map_err(|e| e.to_string())?;
    if data != vec![0u8; 512] {
        return Err("unexpected data".into());
    }
    Ok(())
}

/// The daemon's stderr with the program name replaced by `<prog>`.
fn stderr_of(daemon: &Daemon) -> String {
    bulkhead_systests::daemon::mask_program_output(&daemon.stderr(), daemon.dir(), daemon.program())
}

#[test]
fn a_thousand_clients_that_never_negotiate_do_not_delay_a_new_one() {
    // The test holds a descriptor per idle client; the daemons inherit the limit.
    let limit = raise_nofile(4096);
    assert!(
        limit >= IDLE_CLIENTS as u64 + 64,
        "cannot raise the descriptor limit above {limit}"
    );
    let mut report = Vec::new();
    for kind in [DaemonKind::Qsd, under_test()] {
        // No connection limit and no handshake limit: the idle clients stay for the
        // whole test (with qsd's default of 100 connections, the 101st client waits
        // in the backlog until a handshake times out, in qsd as here).
        let daemon = start(kind, ",max-connections=0,handshake-max-seconds=0");
        let socket = socket(&daemon);
        let mut idle = Vec::with_capacity(IDLE_CLIENTS);
        for i in 0..IDLE_CLIENTS {
            let peer = NbdPeer::connect(&socket, PATIENCE)
                .unwrap_or_else(|e| panic!("{}: idle client {i}: {e}", kind.name()));
            idle.push(peer);
        }
        // Every idle client was accepted and greeted: each holds a connection in the
        // server, waiting for client flags that never come.
        for (i, peer) in idle.iter_mut().enumerate() {
            match peer.greeting(PATIENCE) {
                Ok(g) => assert_eq!(g, GREETING, "{}: idle client {i}", kind.name()),
                Err(e) => panic!(
                    "{}: idle client {i} got no greeting: {e}\nstderr:\n{}",
                    kind.name(),
                    daemon.stderr()
                ),
            }
        }
        let started = Instant::now();
        let result = served(&socket);
        let latency = started.elapsed();
        assert_eq!(
            result,
            Ok(()),
            "{}: a new client beside {IDLE_CLIENTS} idle ones; stderr:\n{}",
            kind.name(),
            daemon.stderr()
        );
        // Not a benchmark: only "served at all, and not after some timeout".
        assert!(
            latency < Duration::from_secs(5),
            "{}: served after {latency:?}",
            kind.name()
        );
        report.push(format!("{}: {latency:?}", kind.name()));
        drop(idle);
    }
    eprintln!(
        "a new client beside {IDLE_CLIENTS} idle ones was served in: {}",
        report.join(", ")
    );
}

/// A client connects, reads the greeting and sends these bytes, then nothing.
const STALLS: [(&str, &[u8]); 4] = [
    ("nothing", b""),
    ("the client flags", b"\x00\x00\x00\x03"),
    (
        "flags and half an option header",
        b"\x00\x00\x00\x03IHAVEOPT\x00\x00",
    ),
    (
        "flags and EXPORT_NAME without the name",
        b"\x00\x00\x00\x03IHAVEOPT\x00\x00\x00\x01\x00\x00\x00\x04",
    ),
];

/// What qsd 10.0.2 prints when `handshake-max-seconds` cuts off the clients of
/// [`STALLS`]: nothing for a client that sent nothing (a port probe), and for the
/// others what a hang-up at the same point gets.
const TIMEOUT_STDERR: &str = "<prog>: option negotiation failed: Failed to read opts magic: Unexpected end-of-file before all data were read
<prog>: option negotiation failed: Failed to read option: Unexpected end-of-file before all data were read
<prog>: option negotiation failed: Failed to read export name: Unexpected end-of-file before all data were read
";

#[test]
fn handshake_max_seconds_drops_stalled_clients_and_reports_them_like_qsd() {
    let mut stderrs = Vec::new();
    for kind in [DaemonKind::Qsd, under_test()] {
        let daemon = start(kind, ",handshake-max-seconds=1");
        let socket = socket(&daemon);
        let mut log = Vec::new();
        for (n, (what, bytes)) in STALLS.iter().enumerate() {
            let mut peer = stalled(&socket, bytes);
            let closed = peer.closed_within(PATIENCE);
            log.push(format!("after {what}: closed {closed}"));
            // Reported asynchronously: wait for this client's line before the next
            // client, so the order is fixed (the first client gets none).
            let deadline = Instant::now() + Duration::from_secs(5);
            while stderr_of(&daemon).lines().count() < n && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        // A client that negotiates in time is served as usual.
        log.push(format!("a prompt client: {:?}", served(&socket)));
        assert_eq!(
            log.join("\n"),
            "after nothing: closed true\n\
             after the client flags: closed true\n\
             after flags and half an option header: closed true\n\
             after flags and EXPORT_NAME without the name: closed true\n\
             a prompt client: Ok(())",
            "{}",
            kind.name()
        );
        stderrs.push(stderr_of(&daemon));
    }
    assert_eq!(stderrs[0], TIMEOUT_STDERR, "qsd");
    assert_eq!(stderrs[1], stderrs[0], "against qsd");
}

#[test]
fn handshake_max_seconds_zero_lets_a_stalled_client_wait() {
    for kind in [DaemonKind::Qsd, under_test()] {
        let daemon = start(kind, ",handshake-max-seconds=0");
        let mut peer = stalled(&socket(&daemon), b"\x00\x00\x00\x03");
        assert!(
            !peer.closed_within(Duration::from_millis(2500)),
            "{}: a stalled client was dropped with handshake-max-seconds=0",
            kind.name()
        );
        assert_eq!(served(&socket(&daemon)), Ok(()), "{}", kind.name());
    }
}

#[test]
fn at_max_connections_a_new_client_waits_for_a_slot_freed_by_the_handshake_limit() {
    let mut logs = Vec::new();
    for kind in [DaemonKind::Qsd, under_test()] {
        let daemon = start(kind, ",max-connections=2,handshake-max-seconds=3");
        let socket = socket(&daemon);
        let _first = stalled(&socket, b"");
        let _second = stalled(&socket, b"\x00\x00\x00\x03");
        // The third connects (the listen backlog takes it) but hears nothing while
        // both slots are held...
        let mut third = NbdPeer::connect(&socket, PATIENCE).unwrap_or_else(|e| panic!("{e}"));
        let early = third
            .greeting(Duration::from_millis(700))
            .map_err(|_| "nothing yet");
        // ...until handshake-max-seconds drops the stalled ones.
        let later = third.greeting(PATIENCE).map_err(|e| e.to_string());
        // The client that had sent its flags is reported; the limit itself is not.
        let deadline = Instant::now() + Duration::from_secs(5);
        while stderr_of(&daemon).is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        logs.push(format!(
            "at the limit: {early:?}\nafter the limit: {later:?}\nstderr: {}",
            stderr_of(&daemon)
        ));
    }
    assert_eq!(
        logs[0],
        format!(
            "at the limit: Err(\"nothing yet\")\nafter the limit: Ok({:?})\nstderr: {}",
            GREETING.to_vec(),
            "<prog>: option negotiation failed: Failed to read opts magic: \
             Unexpected end-of-file before all data were read\n"
        ),
        "qsd"
    );
    assert_eq!(logs[1], logs[0], "against qsd");
}

/// `utime + stime` of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the ')'.
    field(11) + field(12)
}

fn open_descriptors(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

#[test]
fn running_out_of_descriptors_neither_spins_nor_stops_the_accept_loop() {
    let kind = under_test();
    if kind == DaemonKind::Qsd {
        eprintln!("qsd retries a failed accept at once (it spins); nothing to test");
        return;
    }
    raise_nofile(4096);
    let daemon = start(kind, ",max-connections=0,handshake-max-seconds=0");
    let socket = socket(&daemon);
    assert_eq!(served(&socket), Ok(()));
    let worker = bulkhead_systests::procs::worker_pid(daemon.pid(), "nbd", None);
    // Room for 10 more descriptors in the NBD worker.
    let room = open_descriptors(worker) + 10;
    let pid =
        rustix::process::Pid::from_raw(worker as i32).unwrap_or_else(|| panic!("pid {worker}"));
    let cap = rustix::process::Rlimit {
        current: Some(room),
        maximum: Some(room),
    };
    if let Err(e) = rustix::process::prlimit(Some(pid), rustix::process::Resource::Nofile, cap) {
        panic!("cannot lower the NBD worker's descriptor limit: {e}");
    }
    // More clients than descriptors: the first ones are accepted, the rest wait in the
    // backlog while every accept fails with EMFILE.
    let mut clients: Vec<NbdPeer> = (0..30)
        .map(|i| NbdPeer::connect(&socket, PATIENCE).unwrap_or_else(|e| panic!("client {i}: {e}")))
        .collect();
    let greeted = clients[0].greeting(PATIENCE).map_err(|e| e.to_string());
    assert_eq!(greeted, Ok(GREETING.to_vec()), "the first client is served");
    thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(worker);
    thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(worker) - before;
    // A spinning accept loop burns the whole 2 s (about 200 ticks).
    assert!(
        used < 100,
        "the NBD worker used {used} ticks in 2 s while out of descriptors"
    );
    let last = clients.len() - 1;
    assert!(
        clients[last].greeting(Duration::from_millis(300)).is_err(),
        "the last client cannot have been accepted yet"
    );
    let stderr = daemon.stderr();
    assert_eq!(
        stderr.matches("NBD accept failed").count(),
        1,
        "one report per run of failures; stderr:\n{stderr}"
    );
    // Descriptors come back: the waiting clients are accepted and new ones served.
    clients.truncate(1);
    assert_eq!(
        served(&socket),
        Ok(()),
        "a new client once descriptors are free"
    );
}
