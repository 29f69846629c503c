//! `blockdev-backup` with dirty bitmaps against qsd (libvirt's push-mode
//! incremental backup): `sync: incremental` and `bitmap` copy only what the bitmap
//! holds; `bitmap-mode` decides what the bitmap keeps (on-success: only the writes
//! since the job started; never: everything; a cancelled job gives the bits back);
//! every check in qsd's order; in both placements. The targets afterwards hold
//! the dirty clusters and nothing else.

use std::io;
use std::path::Path;

use bulkhead_systests::jobs::same_lines_masked;
use bulkhead_systests::qmp::parse_line;
use bulkhead_systests::script::{StepOutput, run_tool};
use bulkhead_systests::{Script, Step, differential, differential_with, run_in};
use serde_json::Value;

fn qmp(id: &str, command: &str, args: &str) -> Step {
    Step::line(&format!(
        r#"{{"execute": "{command}", "arguments": {args}, "id": "{id}"}}"#
    ))
}

fn backup(id: &str, args: &str) -> Step {
    qmp(id, "blockdev-backup", args)
}

fn add_qcow2(id: &str, node: &str, file: &str) -> Step {
    qmp(
        id,
        "blockdev-add",
        &format!(
            r#"{{"driver": "qcow2", "node-name": "{node}", "file": {{"driver": "file", "filename": "$DIR/{file}"}}}}"#
        ),
    )
}

/// `s.qcow2`: 8 MiB of 0x05; three empty targets.
fn make_images(dir: &Path) -> io::Result<()> {
    run_in(
        dir,
        &["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "32M"],
    )?;
    run_in(dir, &["qemu-io", "-c", "write -P 5 0 8M", "s.qcow2"])?;
    for t in ["t1.qcow2", "t2.qcow2", "t3.qcow2"] {
        run_in(dir, &["qemu-img", "create", "-q", "-f", "qcow2", t, "32M"])?;
    }
    Ok(())
}

const NBD_S: &str = "nbd+unix:///s?socket=$DIR/nbd.sock";

fn bitmaps() -> Step {
    Step::line(
        r#"{"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "s", "name": "b0"}, "id": "h"}"#,
    )
}

/// Only the source's `dirty-bitmaps` in `query-named-block-nodes` (the other
/// nodes' descriptions are not what this test is about).
fn same_source_bitmaps(reference: &StepOutput, tested: &StepOutput) -> Result<(), String> {
    let view = |out: &StepOutput| -> Result<Vec<Value>, String> {
        let mut found = Vec::new();
        for line in out.monitor(0) {
            let v = parse_line(line).map_err(|e| e.to_string())?;
            if let Some(nodes) = v["return"].as_array() {
                for n in nodes.iter().filter(|n| n["node-name"] == "s") {
                    found.push(n["dirty-bitmaps"].clone());
                }
            }
        }
        Ok(found)
    };
    let (a, b) = (view(reference)?, view(tested)?);
    if a != b || a.is_empty() {
        return Err(format!("qsd: {a:?}\nbulkhead: {b:?}"));
    }
    Ok(())
}

fn script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let q = || {
        Step::line(
            r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n"}"#,
        )
        .check(same_source_bitmaps)
    };
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        add_qcow2("a1", "t1", "t1.qcow2").note("targets"),
        add_qcow2("a2", "t2", "t2.qcow2"),
        add_qcow2("a3", "t3", "t3.qcow2"),
        qmp("b1", "block-dirty-bitmap-add", r#"{"node": "s", "name": "b0"}"#).note("the bitmap"),
        Step::hook(
            "a client writes 64 KiB and 128 KiB",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 7 1M 64k", "-c", "write -P 7 5M 128k", NBD_S], true, "wrote 131072/131072"),
        ),
        backup("e1", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "bitmap"}"#)
            .note("bitmap sync without a bitmap"),
        backup("e2", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "incremental"}"#)
            .note("incremental without a bitmap"),
        backup("e3", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "full", "bitmap": "b0"}"#)
            .note("a bitmap without a mode"),
        backup("e4", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "full", "bitmap-mode": "never"}"#)
            .note("a mode without a bitmap"),
        backup("e5", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "bitmap", "bitmap": "nosuch", "bitmap-mode": "never"}"#)
            .note("no such bitmap"),
        backup("e6", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "incremental", "bitmap": "b0", "bitmap-mode": "never"}"#)
            .note("incremental is on-success"),
        backup("e7", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "top", "bitmap": "b0", "bitmap-mode": "never"}"#)
            .note("never with top"),
        backup("e8", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "none", "bitmap": "b0", "bitmap-mode": "always"}"#)
            .note("none with a bitmap"),
        backup("e9", r#"{"job-id": "j", "device": "nosuch", "target": "t1", "sync": "bitmap"}"#)
            .note("the device first"),
        bitmaps().note("the bitmap's hash"),
        m(backup(
            "j1",
            r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "never", "auto-dismiss": false}"#,
        ))
        .until_events("JOB_STATUS_CHANGE", 7)
        .note("bitmap mode never: 192 KiB"),
        m(Step::line(r#"{"execute": "query-jobs", "id": "q1"}"#)).note("its total: the dirty bytes"),
        qmp("d1", "job-dismiss", r#"{"id": "j"}"#),
        bitmaps().note("never: the bitmap is as it was"),
        m(backup(
            "j2",
            r#"{"job-id": "j", "device": "s", "target": "t2", "sync": "bitmap", "bitmap": "b0", "bitmap-mode": "on-success", "speed": 1}"#,
        ))
        .note("a slow bitmap backup"),
        q().note("the bitmap is busy and shows its frozen bits"),
        qmp("e10", "block-dirty-bitmap-clear", r#"{"node": "s", "name": "b0"}"#)
            .note("a busy bitmap cannot be cleared"),
        Step::hook(
            "a client writes during the job",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 8 9M 64k", NBD_S], true, "wrote 65536/65536"),
        ),
        m(qmp("c1", "block-job-cancel", r#"{"device": "j"}"#)).note("cancelled: the bits come back"),
        bitmaps().note("the old bits and the new write"),
        q().note("free again"),
        m(backup(
            "j3",
            r#"{"job-id": "j", "device": "s", "target": "t3", "sync": "incremental", "bitmap": "b0"}"#,
        ))
        .until_events("JOB_STATUS_CHANGE", 8)
        .note("incremental: on-success"),
        bitmaps().note("cleared by the success"),
        qmp("x1", "block-export-add", r#"{"type": "nbd", "id": "e3", "node-name": "t3"}"#)
            .note("export the incremental target"),
        Step::hook(
            "it holds the dirty clusters and nothing else",
            run_tool(
                "qemu-io",
                &["-f", "raw", "-r", "-c", "read -P 7 1M 64k", "-c", "read -P 7 5M 128k", "-c", "read -P 8 9M 64k", "-c", "read -P 0 0 1M", "-c", "read -P 0 6M 2M", "nbd+unix:///t3?socket=$DIR/nbd.sock"],
                true,
                "read 2097152/2097152",
            ),
        ),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "blockdev-backup with bitmaps".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=sf,filename=$DIR/s.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=s,file=sf",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=es,node-name=s,writable=on",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn incremental_backup_matches_qsd() {
    if let Err(report) = differential(&script()) {
        panic!("{report}");
    }
}

#[test]
fn incremental_backup_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// Fleecing without an overlay: a `copy-before-write` node above the source (the
/// guest writes through its export), a `snapshot-access` node over it exported
/// read-only; a client reads the point in time (data and block status) while
/// another writes the source; a writable export of the snapshot refuses writes
/// and takes discards, as qsd's.
fn snapshot_access_script() -> Script {
    const NBD_C: &str = "nbd+unix:///cbw?socket=$DIR/nbd.sock";
    const NBD_A: &str = "nbd+unix:///acc?socket=$DIR/nbd.sock";
    const NBD_W: &str = "nbd+unix:///accw?socket=$DIR/nbd.sock";
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        add_qcow2("a1", "tmp", "t1.qcow2").note("the copy-before-write target"),
        qmp(
            "a2",
            "blockdev-add",
            r#"{"driver": "copy-before-write", "node-name": "cbw", "file": "s", "target": "tmp"}"#,
        ),
        qmp(
            "x1",
            "block-export-add",
            r#"{"type": "nbd", "id": "ec", "node-name": "cbw", "writable": true}"#,
        )
        .note("the guest's export, through the filter"),
        qmp(
            "a3",
            "blockdev-add",
            r#"{"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}"#,
        ),
        qmp(
            "x2",
            "block-export-add",
            r#"{"type": "nbd", "id": "ea", "node-name": "acc"}"#,
        )
        .note("the snapshot's export"),
        Step::hook(
            "the guest writes",
            run_tool(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    "write -P 9 64k 64k",
                    "-c",
                    "write -P 9 3M 64k",
                    "-c",
                    "write -P 9 8M 1M",
                    NBD_C,
                ],
                true,
                "wrote 1048576/1048576",
            ),
        ),
        Step::hook(
            "the snapshot reads the point in time",
            run_tool(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-r",
                    "-c",
                    "read -P 5 0 8M",
                    "-c",
                    "read -P 0 8M 24M",
                    NBD_A,
                ],
                true,
                "read 25165824/25165824",
            ),
        ),
        Step::hook(
            "and its allocation",
            run_tool(
                "nbdinfo",
                &["--map", NBD_A],
                true,
                "8388608    25165824    3  hole,zero",
            ),
        ),
        Step::hook(
            "the guest reads what it wrote",
            run_tool(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-r",
                    "-c",
                    "read -P 9 64k 64k",
                    "-c",
                    "read -P 9 8M 1M",
                    NBD_C,
                ],
                true,
                "read 1048576/1048576",
            ),
        ),
        qmp(
            "x3",
            "block-export-add",
            r#"{"type": "nbd", "id": "ew", "node-name": "acc", "writable": true, "name": "accw"}"#,
        )
        .note("a writable export of the snapshot"),
        Step::hook(
            "refuses writes",
            run_tool(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 9 64k 64k", NBD_W],
                false,
                "write failed: Operation not supported",
            ),
        ),
        Step::hook(
            "takes discards",
            run_tool(
                "qemu-io",
                &["-f", "raw", "-c", "discard 0 64k", NBD_W],
                true,
                "discard 65536/65536",
            ),
        ),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#)
            .until_eof()
            .note("quit"),
    ];
    Script {
        name: "snapshot-access".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=sf,filename=$DIR/s.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=s,file=sf",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn snapshot_access_matches_qsd() {
    if let Err(report) = differential(&snapshot_access_script()) {
        panic!("{report}");
    }
}

#[test]
fn snapshot_access_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&snapshot_access_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// The worker holding a backup's filter (the source's) is SIGKILLed during the
/// copy: by the rule in `design/jobs.md` the job fails (what the filter saved
/// lived there), with `BLOCK_JOB_ERROR` then `BLOCK_JOB_COMPLETED` carrying the
/// error; the filter is gone, the export goes on serving the source, whose data is
/// intact, and a new backup afterwards succeeds.
#[test]
fn a_backup_fails_cleanly_when_its_filters_worker_dies() {
    use bulkhead_systests::{Daemon, DaemonKind, TempDir};
    use serde_json::json;
    use std::time::{Duration, Instant};

    let dir = match TempDir::new("bulkhead-backup-kill") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    if let Err(e) = make_images(dir.path()) {
        panic!("{e}");
    }
    let d = dir.path().to_path_buf();
    let args: Vec<String> = [
        "--blockdev",
        "driver=file,node-name=sf,filename=$DIR/s.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=s,file=sf",
        "--blockdev",
        "driver=file,node-name=tf,filename=$DIR/t1.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=t1,file=tf",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=es,node-name=s,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    let start = json!({"job-id": "j", "device": "s", "target": "t1", "sync": "full",
        "speed": 1 << 20, "auto-dismiss": false});
    match qmp.execute("blockdev-backup", Some(start)) {
        Ok(r) if r.get("return").is_some() => {}
        other => panic!("blockdev-backup: {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = bulkhead_systests::workers::pid_hosting(&mut qmp, "s");
    if let Err(e) = bulkhead_systests::procs::send_signal(pid, libc::SIGKILL) {
        panic!("{e}");
    }
    let until = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let jobs = match qmp.execute("query-jobs", None) {
            Ok(r) => r["return"].clone(),
            Err(e) => panic!("{e}"),
        };
        if jobs[0]["status"] == "concluded" {
            break jobs[0].clone();
        }
        assert!(Instant::now() < until, "the backup did not end: {jobs}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the worker holding the backup's filter ended"),
        "{job}"
    );
    let events: Vec<String> = qmp
        .take_events()
        .iter()
        .map(|e| e["event"].as_str().unwrap_or_default().to_string())
        .collect();
    let error_at = events.iter().position(|e| e == "BLOCK_JOB_ERROR");
    let completed_at = events.iter().position(|e| e == "BLOCK_JOB_COMPLETED");
    assert!(
        error_at.is_some() && error_at < completed_at,
        "BLOCK_JOB_ERROR, then BLOCK_JOB_COMPLETED: {events:?}"
    );
    let nodes = match qmp.execute("query-named-block-nodes", Some(json!({"flat": true}))) {
        Ok(r) => r["return"].clone(),
        Err(e) => panic!("{e}"),
    };
    assert!(
        !nodes.to_string().contains("copy-before-write"),
        "the filter is gone: {nodes}"
    );
    // The export serves the source, intact, and takes writes again.
    let nbd = format!("nbd+unix:///s?socket={}", d.join("nbd.sock").display());
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 5 0 8M",
            "-c",
            "write -P 6 1M 64k",
            &nbd,
        ])
        .output();
    match out {
        Ok(o) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => panic!("{e}"),
    }
    let _ = qmp.execute("job-dismiss", Some(json!({"id": "j"})));
    let again = json!({"job-id": "k", "device": "s", "target": "t1", "sync": "full"});
    match qmp.execute("blockdev-backup", Some(again)) {
        Ok(r) if r.get("return").is_some() => {}
        other => panic!("a new backup: {other:?}"),
    }
}

/// `blockdev-backup` tuning against qsd: `compress` (refused for a raw target; a
/// qcow2 target stores every cluster compressed), `x-perf` checks,
/// `filter-node-name` (taken, and the filter under that name); `block-stream`'s
/// `filter-node-name` likewise.
fn tuning_script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        add_qcow2("a1", "t1", "t1.qcow2"),
        qmp("a2", "blockdev-add", r#"{"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "$DIR/r.raw"}}"#),
        backup("e1", r#"{"job-id": "j", "device": "s", "target": "r", "sync": "full", "compress": true}"#)
            .note("no compression on raw"),
        backup("e2", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "full", "x-perf": {"max-workers": 0}}"#)
            .note("max-workers"),
        backup("e3", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "full", "x-perf": {"max-chunk": -1}}"#)
            .note("negative max-chunk"),
        backup("e4", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "full", "x-perf": {"max-chunk": 1000}}"#)
            .note("max-chunk below the cluster"),
        backup("e5", r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "full", "filter-node-name": "s"}"#)
            .note("the filter's name is taken"),
        m(backup(
            "b1",
            r#"{"job-id": "j", "device": "s", "target": "t1", "sync": "full", "compress": true, "filter-node-name": "bf", "speed": 1000000, "x-perf": {"max-workers": 8, "max-chunk": 0}}"#,
        ))
        .note("a compressed backup through a named filter"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n"}"#)
            .check(|r, t| {
                let has = |o: &bulkhead_systests::script::StepOutput| {
                    o.monitor(0).iter().any(|l| String::from_utf8_lossy(l).contains(r#""node-name": "bf""#))
                };
                if has(r) && has(t) { Ok(()) } else { Err("the filter is not called bf".into()) }
            })
            .note("the filter has its name"),
        m(qmp("b2", "block-job-set-speed", r#"{"device": "j", "speed": 0}"#))
            .until_event("BLOCK_JOB_COMPLETED")
            .note("the backup ends"),
        qmp("e6", "block-stream", r#"{"job-id": "k", "device": "s", "filter-node-name": "t1"}"#)
            .note("a stream filter's name taken"),
        qmp("e7", "block-stream", r##"{"job-id": "k", "device": "s", "filter-node-name": "#x"}"##)
            .note("and invalid"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
        Step::hook("every cluster compressed", run_tool("qemu-img", &["check", "$DIR/t1.qcow2"], true, "100.00% compressed clusters")),
        Step::hook("the data", run_tool("qemu-img", &["compare", "$DIR/s.qcow2", "$DIR/t1.qcow2"], true, "Images are identical")),
    ];
    Script {
        name: "blockdev-backup tuning".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=sf,filename=$DIR/s.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=s,file=sf",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(|dir: &Path| -> io::Result<()> {
            make_images(dir)?;
            run_in(dir, &["truncate", "-s", "32M", "r.raw"])
        }),
        steps,
    }
}

#[test]
fn backup_tuning_matches_qsd() {
    if let Err(report) = differential(&tuning_script()) {
        panic!("{report}");
    }
}

/// `drive-backup` in a `transaction` with a bitmap (a push-mode full backup that
/// starts tracking changes at its point in time): a target that cannot be created
/// leaves the transaction without effect (no bitmap); then the bitmap and two
/// backups in one go, their images equal to the source.
fn drive_transaction_script() -> Script {
    let tx =
        |id: &str, actions: &str| qmp(id, "transaction", &format!(r#"{{"actions": {actions}}}"#));
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        tx("t1", r#"[{"type": "block-dirty-bitmap-add", "data": {"node": "s", "name": "b0"}}, {"type": "drive-backup", "data": {"job-id": "j1", "device": "s", "target": "/nonexistent-dir/x.qcow2", "sync": "full"}}]"#)
            .note("a target that cannot be created"),
        bitmaps().note("no bitmap was added"),
        tx("t2", r#"[{"type": "drive-backup", "data": {"job-id": "j1", "device": "nosuch", "target": "$DIR/x.qcow2", "sync": "full"}}]"#)
            .note("no device"),
        // qsd's first backup pauses and resumes while the second's filter goes in
        // (bulkhead drains nothing): those pairs aside.
        tx("t3", r#"[{"type": "block-dirty-bitmap-add", "data": {"node": "s", "name": "b0"}}, {"type": "drive-backup", "data": {"job-id": "j1", "device": "s", "target": "$DIR/f1.qcow2", "sync": "full", "format": "qcow2"}}, {"type": "drive-backup", "data": {"job-id": "j2", "device": "s", "target": "$DIR/f2.raw", "sync": "full", "format": "raw"}}]"#)
            .check(bulkhead_systests::jobs::ignoring_drain_pauses)
            .until_events("BLOCK_JOB_COMPLETED", 2)
            .note("the bitmap and two backups"),
        bitmaps().note("the bitmap, empty"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
        Step::hook("f1", run_tool("qemu-img", &["compare", "$DIR/s.qcow2", "$DIR/f1.qcow2"], true, "Images are identical")),
        Step::hook("f2", run_tool("qemu-img", &["compare", "-F", "raw", "$DIR/s.qcow2", "$DIR/f2.raw"], true, "Images are identical")),
    ];
    Script {
        name: "drive-backup in a transaction".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=sf,filename=$DIR/s.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=s,file=sf",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn drive_backup_transactions_match_qsd() {
    if let Err(report) = differential(&drive_transaction_script()) {
        panic!("{report}");
    }
}

/// Both daemons' step: the events as a set (drain pauses aside), and no job
/// pending before both are waiting.
fn waits_for_the_group(
    reference: &bulkhead_systests::script::StepOutput,
    tested: &bulkhead_systests::script::StepOutput,
) -> Result<(), String> {
    bulkhead_systests::jobs::ignoring_drain_pauses(reference, tested)?;
    for (who, out) in [("qsd", reference), ("bulkhead", tested)] {
        let statuses: Vec<String> = out
            .monitor(0)
            .iter()
            .filter_map(|l| bulkhead_systests::qmp::parse_line(l).ok())
            .filter(|v| v["event"] == "JOB_STATUS_CHANGE")
            .map(|v| v["data"]["status"].as_str().unwrap_or_default().to_string())
            .collect();
        let last_waiting = statuses.iter().rposition(|s| s == "waiting");
        let first_pending = statuses.iter().position(|s| s == "pending");
        if !(last_waiting.is_some() && last_waiting < first_pending) {
            return Err(format!(
                "{who}: a job went on before the group: {statuses:?}"
            ));
        }
    }
    Ok(())
}

/// `completion-mode: grouped` over two backups: the first to finish waits for the
/// other, then both complete; cancelling one of a group cancels both.
fn grouped_script() -> Script {
    let tx = |id: &str, actions: &str| {
        qmp(
            id,
            "transaction",
            &format!(r#"{{"actions": {actions}, "properties": {{"completion-mode": "grouped"}}}}"#),
        )
        .check(bulkhead_systests::jobs::ignoring_drain_pauses)
    };
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        add_qcow2("a1", "t1", "t1.qcow2"),
        add_qcow2("a2", "t2", "t2.qcow2"),
        tx("g1", r#"[{"type": "blockdev-backup", "data": {"job-id": "j1", "device": "s", "target": "t1", "sync": "full"}}, {"type": "blockdev-backup", "data": {"job-id": "j2", "device": "s", "target": "t2", "sync": "full", "speed": 16777216}}]"#)
            .until_events("BLOCK_JOB_COMPLETED", 2)
            .check(waits_for_the_group)
            .note("the fast one waits for the slow one"),
        tx("g2", r#"[{"type": "blockdev-backup", "data": {"job-id": "j1", "device": "s", "target": "t1", "sync": "full", "speed": 1048576}}, {"type": "blockdev-backup", "data": {"job-id": "j2", "device": "s", "target": "t2", "sync": "full", "speed": 1048576}}]"#)
            .note("two slow ones"),
        qmp("c1", "block-job-cancel", r#"{"device": "j2"}"#)
            .check(same_lines_masked)
            .until_events("BLOCK_JOB_CANCELLED", 2)
            .note("cancelling one cancels both"),
        qmp("e1", "transaction", r#"{"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "s", "name": "b"}}], "properties": {"completion-mode": "grouped"}}"#)
            .note("grouped needs jobs"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "completion-mode grouped".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=sf,filename=$DIR/s.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=s,file=sf",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn grouped_backups_match_qsd() {
    if let Err(report) = differential(&grouped_script()) {
        panic!("{report}");
    }
}
