//! `--isolation image` with NBD: one listener negotiates for every export and holds no
//! data channel; each export has a worker of its own, reaching only its image's
//! worker, which serves the clients the listener hands over. Killing an export's
//! worker, the listener or an image's worker disturbs nothing else, and no
//! acknowledged write is lost. bulkhead only.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::daemon::run_tool;
use bulkhead_systests::nbd::NbdPeer;
use bulkhead_systests::procs;
use bulkhead_systests::workers::{start_images, workers};
use bulkhead_systests::writes::{self, Write, sparse_file, wait_ok};
use bulkhead_systests::{Daemon, DaemonKind, QmpConnection, TempDir};
use serde_json::{Value, json};

const IMAGE_SIZE: u64 = 16 << 20;
const BLOCK: u64 = 64 << 10;
const IMAGES: [&str; 2] = ["a", "b"];

fn start() -> Daemon {
    start_images("bulkhead-handoff", "image", &IMAGES, IMAGE_SIZE)
}

fn qmp(daemon: &Daemon) -> QmpConnection {
    match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}\n{}", daemon.stderr()),
    }
}

/// The worker hosting node `node`.
fn image_worker(qmp: &mut QmpConnection, node: &str) -> Value {
    let list = workers(qmp);
    list.iter()
        .find(|w| {
            w["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x == node))
        })
        .cloned()
        .unwrap_or_else(|| panic!("no worker hosts {node}: {list:?}"))
}

fn export_worker(qmp: &mut QmpConnection, x: &str) -> Value {
    let list = workers(qmp);
    list.iter()
        .find(|w| w["role"] == "export" && w["exports"] == json!([format!("e-{x}")]))
        .cloned()
        .unwrap_or_else(|| panic!("no worker for export e-{x}: {list:?}"))
}

fn listener(qmp: &mut QmpConnection) -> Value {
    let list = workers(qmp);
    let found: Vec<&Value> = list.iter().filter(|w| w["role"] == "listener").collect();
    assert_eq!(found.len(), 1, "one NBD listener: {list:?}");
    found[0].clone()
}

fn pid(w: &Value) -> u32 {
    w["pid"]
        .as_u64()
        .map_or_else(|| panic!("no pid in {w}"), |p| p as u32)
}

fn kill(pid: u32, what: &str) {
    if let Err(e) = procs::send_signal(pid, libc::SIGKILL) {
        panic!("cannot kill {what} ({pid}): {e}");
    }
}

fn uri(dir: &Path, x: &str) -> String {
    format!(
        "nbd+unix:///raw-{x}?socket={}",
        dir.join("nbd.sock").display()
    )
}

fn tool(program: &str, args: &[&str]) -> String {
    match run_tool(program, args) {
        Ok(out) => out,
        Err(e) => panic!("{program} {args:?}: {e}"),
    }
}

#[test]
fn each_export_has_a_worker_that_reaches_only_its_image() {
    let daemon = start();
    let dir = daemon.dir().to_path_buf();
    let mut qmp = qmp(&daemon);
    let all = workers(&mut qmp);
    assert_eq!(
        all.iter().filter(|w| w["kind"] == "nbd").count(),
        3,
        "one listener and two export workers: {all:?}"
    );
    let l = listener(&mut qmp);
    assert_eq!(
        l["reaches"],
        json!([]),
        "the listener reaches no image: {l}"
    );
    for x in IMAGES {
        let image = image_worker(&mut qmp, &format!("raw-{x}"));
        let e = export_worker(&mut qmp, x);
        assert_eq!(
            e["reaches"],
            json!([image["id"]]),
            "export e-{x}'s worker reaches image {x}'s worker only: {all:?}"
        );
        assert!(e["nodes"].as_array().is_some_and(Vec::is_empty), "{e}");
    }

    // Real clients on both exports: writes land in the right image.
    for (x, pattern) in [("a", "0x0a"), ("b", "0x0b")] {
        let out = tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                &uri(&dir, x),
                "-c",
                &format!("write -P {pattern} 1M 64k"),
            ],
        );
        assert!(out.contains("wrote 65536/65536"), "{out}");
        let info = tool("nbdinfo", &["--size", &uri(&dir, x)]);
        assert_eq!(info.trim(), IMAGE_SIZE.to_string());
        let copy = dir.join(format!("copy-{x}.img"));
        tool("nbdcopy", &[&uri(&dir, x), &copy.to_string_lossy()]);
        tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                &copy.to_string_lossy(),
                "-c",
                &format!("read -P {pattern} 1M 64k"),
            ],
        );
        tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                &dir.join(format!("disk-{x}.img")).to_string_lossy(),
                "-c",
                &format!("read -P {pattern} 1M 64k"),
            ],
        );
    }

    // Killing one image's worker restarts neither export's worker, and the other
    // export keeps serving throughout.
    for (victim, other) in [("a", "b"), ("b", "a")] {
        let before: Vec<Value> = IMAGES.iter().map(|x| export_worker(&mut qmp, x)).collect();
        let image = image_worker(&mut qmp, &format!("raw-{victim}"));
        kill(pid(&image), "an image worker");
        let out = tool(
            "qemu-io",
            &["-f", "raw", &uri(&dir, other), "-c", "read 0 64k"],
        );
        assert!(out.contains("read 65536/65536"), "{out}");
        // The victim's export serves again once its image's worker is back.
        let out = tool(
            "qemu-io",
            &["-f", "raw", &uri(&dir, victim), "-c", "read 1M 64k"],
        );
        assert!(out.contains("read 65536/65536"), "{out}");
        for (x, b) in IMAGES.iter().zip(before) {
            let now = export_worker(&mut qmp, x);
            assert_eq!(now["pid"], b["pid"], "export e-{x}'s worker untouched");
            assert_eq!(now["restarts"], json!(0));
        }
    }
}

fn writes_for(round: u64) -> Vec<Write> {
    writes::writes_for(round, 32, BLOCK, IMAGE_SIZE)
}

#[test]
fn killing_an_export_worker_loses_no_acknowledged_write() {
    let daemon = start();
    let dir = daemon.dir().to_path_buf();
    let socket = dir.join("nbd.sock");
    let mut qmp = qmp(&daemon);
    let victim = pid(&export_worker(&mut qmp, "a"));
    let other = pid(&export_worker(&mut qmp, "b"));
    let listener_pid = pid(&listener(&mut qmp));
    for x in IMAGES {
        sparse_file(&dir.join(format!("expected-{x}.img")), IMAGE_SIZE);
    }
    for round in 0..5 {
        let batch = writes_for(round);
        let clients: Vec<_> = IMAGES
            .iter()
            .map(|x| writes::nbd_writer(&socket, &format!("raw-{x}"), &batch, BLOCK))
            .collect();
        if round == 2 {
            thread::sleep(Duration::from_millis(30));
            kill(victim, "export a's worker");
        }
        for (x, client) in IMAGES.iter().zip(clients) {
            wait_ok(client, &format!("round {round}: writes to raw-{x}"));
            writes::apply_directly(&dir.join(format!("expected-{x}.img")), &batch, BLOCK);
        }
    }
    assert_ne!(
        pid(&export_worker(&mut qmp, "a")),
        victim,
        "a new worker for e-a"
    );
    assert_eq!(
        pid(&export_worker(&mut qmp, "b")),
        other,
        "e-b's worker untouched"
    );
    assert_eq!(
        pid(&listener(&mut qmp)),
        listener_pid,
        "the listener untouched"
    );
    for x in IMAGES {
        writes::assert_same_images(
            &[
                "-f",
                "raw",
                &dir.join(format!("disk-{x}.img")).to_string_lossy(),
            ],
            &[
                "-F",
                "raw",
                &dir.join(format!("expected-{x}.img")).to_string_lossy(),
            ],
            &format!("image {x} against its acknowledged writes"),
        );
    }
}

#[test]
fn killing_the_listener_leaves_transmissions_alone_and_new_clients_are_served_again() {
    let daemon = start();
    let dir = daemon.dir().to_path_buf();
    let socket = dir.join("nbd.sock");
    let mut qmp = qmp(&daemon);
    let patience = Duration::from_secs(10);
    let mut peers: Vec<NbdPeer> = IMAGES
        .iter()
        .map(
            |x| match NbdPeer::open(&socket, &format!("raw-{x}"), patience) {
                Ok(p) => p,
                Err(e) => panic!("raw-{x}: {e}\n{}", daemon.stderr()),
            },
        )
        .collect();
    let exporters: Vec<u32> = IMAGES
        .iter()
        .map(|x| pid(&export_worker(&mut qmp, x)))
        .collect();
    let old = listener(&mut qmp);
    kill(pid(&old), "the NBD listener");
    // Connections in transmission live in the export workers: they go on.
    for (i, peer) in peers.iter_mut().enumerate() {
        let data = vec![0x50 + i as u8; 4096];
        if let Err(e) = peer.write(8192, &data) {
            panic!("write on a live connection after the listener died: {e}");
        }
        match peer.read(8192, 4096) {
            Ok(back) => assert_eq!(back, data),
            Err(e) => panic!("read on a live connection: {e}"),
        }
    }
    // New clients wait in the backlog of the supervisor's socket and are served by
    // the replacement listener.
    for x in IMAGES {
        let info = tool("nbdinfo", &["--size", &uri(&dir, x)]);
        assert_eq!(info.trim(), IMAGE_SIZE.to_string());
    }
    let new = listener(&mut qmp);
    assert_ne!(new["pid"], old["pid"]);
    assert_eq!(new["restarts"], json!(1));
    let now: Vec<u32> = IMAGES
        .iter()
        .map(|x| pid(&export_worker(&mut qmp, x)))
        .collect();
    assert_eq!(now, exporters, "the export workers were not restarted");

    // Removal with a client living in the export's worker: safe is refused, hard
    // drops it, and the event comes once it is gone; the export's worker then stops.
    let reply = match qmp.execute("block-export-del", Some(json!({"id": "e-a"}))) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        reply["error"]["desc"], "export 'e-a' still in use",
        "{reply}"
    );
    let a = pid(&export_worker(&mut qmp, "a"));
    if let Err(e) = qmp.execute_ok(
        "block-export-del",
        Some(json!({"id": "e-a", "mode": "hard"})),
    ) {
        panic!("{e}");
    }
    drop(peers.remove(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut deleted = false;
    while !deleted && Instant::now() < deadline {
        let _ = qmp.execute("query-block-exports", None);
        deleted = qmp
            .take_events()
            .iter()
            .any(|e| e["event"] == "BLOCK_EXPORT_DELETED" && e["data"]["id"] == "e-a");
        if !deleted {
            thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(deleted, "BLOCK_EXPORT_DELETED for e-a");
    let left = workers(&mut qmp);
    assert!(
        !left.iter().any(|w| w["pid"] == json!(a)),
        "e-a's worker stopped with its export: {left:?}"
    );
    // The other export and its live connection are unaffected.
    match peers[0].read(8192, 4096) {
        Ok(back) => assert_eq!(back, vec![0x51; 4096]),
        Err(e) => panic!("e-b's connection: {e}"),
    }
}

#[test]
fn exports_added_and_removed_at_run_time_get_and_lose_their_own_worker() {
    let dir = match TempDir::new("bulkhead-handoff-qmp") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    sparse_file(&dir.path().join("disk-a.img"), IMAGE_SIZE);
    let args: Vec<String> = [
        "--isolation",
        "image",
        "--blockdev",
        "driver=file,node-name=file-a,filename=$DIR/disk-a.img",
        "--blockdev",
        "driver=raw,node-name=raw-a,file=file-a",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let dir = daemon.dir().to_path_buf();
    let mut qmp = qmp(&daemon);
    let ok = |qmp: &mut QmpConnection, cmd: &str, args: Value| {
        if let Err(e) = qmp.execute_ok(cmd, Some(args)) {
            panic!("{cmd}: {e}");
        }
    };
    let sock = dir.join("nbd.sock").to_string_lossy().into_owned();
    ok(
        &mut qmp,
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    assert_eq!(listener(&mut qmp)["exports"], json!([]));
    ok(
        &mut qmp,
        "block-export-add",
        json!({"type": "nbd", "id": "e-a", "node-name": "raw-a", "name": "raw-a", "writable": true}),
    );
    let e = export_worker(&mut qmp, "a");
    let image = image_worker(&mut qmp, "raw-a");
    assert_eq!(e["reaches"], json!([image["id"]]));
    let out = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri(&dir, "a"),
            "-c",
            "write -P 0x61 0 64k",
            "-c",
            "read -P 0x61 0 64k",
        ],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    // No client left: the event comes with the command, and the worker goes.
    let reply = match qmp.execute("block-export-del", Some(json!({"id": "e-a"}))) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(reply["return"], json!({}), "{reply}");
    let events = qmp.take_events();
    assert!(
        events
            .iter()
            .any(|ev| ev["event"] == "BLOCK_EXPORT_DELETED" && ev["data"]["id"] == "e-a"),
        "{events:?}"
    );
    let left = workers(&mut qmp);
    assert!(
        !left.iter().any(|w| w["role"] == "export"),
        "no export worker without an export: {left:?}"
    );
    // The export can come back, and the server stops cleanly.
    ok(
        &mut qmp,
        "block-export-add",
        json!({"type": "nbd", "id": "e-a2", "node-name": "raw-a", "name": "raw-a"}),
    );
    let info = tool("nbdinfo", &["--size", &uri(&dir, "a")]);
    assert_eq!(info.trim(), IMAGE_SIZE.to_string());
    ok(&mut qmp, "nbd-server-stop", json!({}));
    let events = qmp.take_events();
    assert!(
        events
            .iter()
            .any(|ev| ev["event"] == "BLOCK_EXPORT_DELETED" && ev["data"]["id"] == "e-a2"),
        "{events:?}"
    );
    let left = workers(&mut qmp);
    assert!(!left.iter().any(|w| w["role"] == "export"), "{left:?}");
}

#[test]
fn tcp_clients_are_handed_off_too() {
    let dir = match TempDir::new("bulkhead-handoff-tcp") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    sparse_file(&dir.path().join("disk-a.img"), IMAGE_SIZE);
    // A free port: bound by the kernel's choice, then released for the daemon.
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("{e}"),
    };
    let args: Vec<String> = vec![
        "--isolation".into(),
        "image".into(),
        "--blockdev".into(),
        "driver=file,node-name=file-a,filename=$DIR/disk-a.img".into(),
        "--blockdev".into(),
        "driver=raw,node-name=raw-a,file=file-a".into(),
        "--nbd-server".into(),
        format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "--export".into(),
        "type=nbd,id=e-a,node-name=raw-a,writable=on".into(),
    ];
    let daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut qmp = qmp(&daemon);
    let uri = format!("nbd://127.0.0.1:{port}/raw-a");
    let out = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x74 0 64k",
            "-c",
            "read -P 0x74 0 64k",
        ],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    assert_eq!(export_worker(&mut qmp, "a")["restarts"], json!(0));
}

#[test]
fn max_connections_counts_per_export() {
    let dir = match TempDir::new("bulkhead-handoff-max") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut args: Vec<String> = vec!["--isolation".into(), "image".into()];
    for x in IMAGES {
        sparse_file(&dir.path().join(format!("disk-{x}.img")), IMAGE_SIZE);
        args.extend([
            "--blockdev".to_string(),
            format!("driver=file,node-name=file-{x},filename=$DIR/disk-{x}.img"),
            "--blockdev".to_string(),
            format!("driver=raw,node-name=raw-{x},file=file-{x}"),
        ]);
    }
    args.extend([
        "--nbd-server".to_string(),
        "addr.type=unix,addr.path=$DIR/nbd.sock,max-connections=1".to_string(),
    ]);
    for x in IMAGES {
        args.extend([
            "--export".to_string(),
            format!("type=nbd,id=e-{x},node-name=raw-{x},writable=on"),
        ]);
    }
    let daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let socket = daemon.dir().join("nbd.sock");
    // One client on each export at once: the limit is each export worker's.
    let mut peers: Vec<NbdPeer> = IMAGES
        .iter()
        .map(
            |x| match NbdPeer::open(&socket, &format!("raw-{x}"), Duration::from_secs(10)) {
                Ok(p) => p,
                Err(e) => panic!("raw-{x}: {e}\n{}", daemon.stderr()),
            },
        )
        .collect();
    for peer in &mut peers {
        match peer.read(0, 512) {
            Ok(data) => assert_eq!(data, vec![0; 512]),
            Err(e) => panic!("{e}"),
        }
    }
}
