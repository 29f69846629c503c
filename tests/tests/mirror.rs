//! Mirror jobs against qsd: `blockdev-mirror` (its errors in qsd's order; `sync`
//! top in write-blocking mode, cancelled when ready so nothing pivots; `sync` full
//! in the background under client writes, paused when ready, completed with the
//! pivot: the export follows the target) and the active `block-commit`, in both
//! placements; the images afterwards hold what the clients wrote. And a mirror
//! whose source's worker is SIGKILLed twice (bulkhead only): it scans again, ends
//! ready, and the target equals the source.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_systests::jobs::{same_lines_masked, same_lines_masked_totals};
use bulkhead_systests::script::run_tool;
use bulkhead_systests::{
    Daemon, DaemonKind, QmpConnection, Script, Step, TempDir, differential, differential_with,
    run_in,
};
use serde_json::{Value, json};

fn qmp(id: &str, command: &str, args: &str) -> Step {
    Step::line(&format!(
        r#"{{"execute": "{command}", "arguments": {args}, "id": "{id}"}}"#
    ))
}

fn mirror(id: &str, args: &str) -> Step {
    qmp(id, "blockdev-mirror", args)
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

/// `b.qcow2` (4 MiB of 0x01), `s.qcow2` over it (8 MiB of 0x05 at 8 MiB), the
/// targets: `tg.qcow2` (empty), `tt.qcow2` (an overlay of `b.qcow2`, for `sync:
/// top`), `small.qcow2` (another size).
fn make_images(dir: &Path) -> io::Result<()> {
    run_in(
        dir,
        &["qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "32M"],
    )?;
    run_in(dir, &["qemu-io", "-c", "write -P 1 0 4M", "b.qcow2"])?;
    run_in(
        dir,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "s.qcow2",
        ],
    )?;
    run_in(dir, &["qemu-io", "-c", "write -P 5 8M 8M", "s.qcow2"])?;
    run_in(
        dir,
        &["qemu-img", "create", "-q", "-f", "qcow2", "tg.qcow2", "32M"],
    )?;
    run_in(
        dir,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "tt.qcow2",
        ],
    )?;
    run_in(
        dir,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "small.qcow2",
            "16M",
        ],
    )
}

const NBD_S: &str = "nbd+unix:///s?socket=$DIR/nbd.sock";

fn mirror_script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let t = |s: Step| s.check(same_lines_masked_totals);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        add_qcow2("a1", "tg", "tg.qcow2").note("the full target"),
        add_qcow2("a2", "tt", "tt.qcow2").note("the top target, over b"),
        add_qcow2("a3", "sm", "small.qcow2").note("a smaller target"),
        mirror("e1", r#"{"device": "s", "target": "tg", "sync": "full"}"#).note("no job id"),
        mirror("e2", r#"{"device": "nosuch", "target": "tg", "sync": "full", "job-id": "m"}"#)
            .note("no device"),
        mirror("e3", r#"{"device": "s", "target": "nosuch", "sync": "full", "job-id": "m"}"#)
            .note("no target"),
        mirror("e4", r#"{"device": "s", "target": "s", "sync": "full", "job-id": "m"}"#)
            .note("into itself"),
        mirror("e5", r#"{"device": "s", "target": "tg", "sync": "incremental", "job-id": "m"}"#)
            .note("incremental"),
        mirror("e6", r#"{"device": "s", "target": "s", "sync": "bitmap", "granularity": 1000, "job-id": "m"}"#)
            .note("granularity not a power of 2, first"),
        mirror("e7", r#"{"device": "s", "target": "tg", "sync": "full", "granularity": 256, "job-id": "m"}"#)
            .note("granularity too small"),
        mirror("e8", r#"{"device": "s", "target": "tg", "sync": "full", "buf-size": -1, "job-id": "m"}"#)
            .note("negative buf-size"),
        mirror("e9", r#"{"device": "s", "target": "tg", "sync": "incremental", "replaces": "nosuch", "job-id": "m"}"#)
            .note("replaces nothing, before the sync mode"),
        mirror("e10", r#"{"device": "s", "target": "tg", "sync": "full", "replaces": "tg", "job-id": "m"}"#)
            .note("replaces another node"),
        mirror("e11", r#"{"device": "s", "target": "tg", "sync": "full", "filter-node-name": "tg", "job-id": "m"}"#)
            .note("filter name taken"),
        mirror("e12", r##"{"device": "s", "target": "tg", "sync": "full", "filter-node-name": "#x", "job-id": "m"}"##)
            .note("filter name invalid"),
        mirror("e13", r#"{"device": "s", "target": "tg", "sync": "full", "speed": -1, "job-id": "m"}"#)
            .note("negative speed"),
        m(mirror("e14", r#"{"device": "s", "target": "sm", "sync": "full", "job-id": "m"}"#))
            .until_events("JOB_STATUS_CHANGE", 5)
            .note("sizes differ: the job fails as it runs"),
        m(mirror(
            "n1",
            r#"{"device": "s", "target": "tt", "sync": "top", "copy-mode": "write-blocking", "job-id": "n", "replaces": "s"}"#,
        ))
        .until_event("BLOCK_JOB_READY")
        .note("sync top, write-blocking: ready"),
        m(Step::line(r#"{"execute": "query-block-jobs", "id": "q1"}"#)).note("actively synced"),
        mirror("e15", r#"{"device": "s", "target": "tg", "sync": "full", "job-id": "m"}"#)
            .note("the source has a job"),
        qmp("e16", "blockdev-del", r#"{"node-name": "tt"}"#).note("the target is in use"),
        qmp("c1", "block-job-change", r#"{"id": "n", "type": "mirror", "copy-mode": "background"}"#)
            .note("back to background: refused"),
        qmp("c2", "block-job-change", r#"{"id": "n", "type": "mirror", "copy-mode": "write-blocking"}"#)
            .note("write-blocking again: nothing to do"),
        qmp("c3", "block-job-complete", r#"{"device": "nosuch"}"#).note("no such job"),
        Step::hook(
            "a client writes the source: the write reaches the target at once",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 8 9M 64k", NBD_S], true, "wrote 65536/65536"),
        ),
        m(qmp("n2", "block-job-cancel", r#"{"device": "n"}"#))
            .until_events("JOB_STATUS_CHANGE", 4)
            .note("cancelled when ready: completes without the pivot"),
        qmp("x1", "block-export-add", r#"{"type": "nbd", "id": "et", "node-name": "tt"}"#)
            .note("export the top target"),
        Step::hook(
            "the top target reads what the source does",
            run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", NBD_S, "nbd+unix:///tt?socket=$DIR/nbd.sock"], true, "Images are identical"),
        ),
        qmp("x2", "block-export-del", r#"{"id": "et"}"#)
            .until_event("BLOCK_EXPORT_DELETED")
            .note("unexport it"),
        t(mirror(
            "m1",
            r#"{"device": "s", "target": "tg", "sync": "full", "job-id": "m", "speed": 16777216, "granularity": 131072}"#,
        ))
        .note("sync full at 16 MiB/s"),
        Step::hook(
            "a client writes the source during the copy",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 9 1M 2M", "-c", "write -P 9 20M 1M", NBD_S], true, "wrote 1048576/1048576"),
        ),
        t(qmp("m2", "block-job-complete", r#"{"device": "m"}"#)).note("not ready yet"),
        t(qmp("m3", "block-job-set-speed", r#"{"device": "m", "speed": 0}"#))
            .until_event("BLOCK_JOB_READY")
            .note("no limit: ready"),
        t(qmp("m4", "block-job-pause", r#"{"device": "m"}"#)).note("paused when ready: standby"),
        Step::hook(
            "a client writes the source while the job stands by",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 7 4M 64k", NBD_S], true, "wrote 65536/65536"),
        ),
        t(Step::line(r#"{"execute": "query-jobs", "id": "q2"}"#)).note("standby"),
        t(qmp("m5", "block-job-resume", r#"{"device": "m"}"#)).note("ready again"),
        t(qmp("m6", "block-job-complete", r#"{"device": "m"}"#))
            .until_events("JOB_STATUS_CHANGE", 4)
            .note("complete: the pivot"),
        Step::line(r#"{"execute": "query-block-exports", "id": "q3"}"#)
            .note("the export serves the target now"),
        Step::hook(
            "a client writes through the export: the target only",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 6 10M 64k", NBD_S], true, "wrote 65536/65536"),
        ),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
        Step::hook(
            "the source plus the last write is the target",
            run_tool("qemu-io", &["-c", "write -P 6 10M 64k", "$DIR/s.qcow2"], true, "wrote 65536/65536"),
        ),
        Step::hook(
            "compare",
            run_tool("qemu-img", &["compare", "$DIR/s.qcow2", "$DIR/tg.qcow2"], true, "Images are identical"),
        ),
    ];
    Script {
        name: "blockdev-mirror".into(),
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
fn blockdev_mirror_matches_qsd() {
    if let Err(report) = differential(&mirror_script()) {
        panic!("{report}");
    }
}

#[test]
fn blockdev_mirror_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&mirror_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// `b <- m <- t`: b 4 MiB of 0x01, m 64 KiB of 0x02 at 1 MiB, t 128 KiB of 0x03 at
/// 2 MiB; t is exported.
fn make_chain(dir: &Path) -> io::Result<()> {
    run_in(
        dir,
        &["qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "16M"],
    )?;
    run_in(dir, &["qemu-io", "-c", "write -P 1 0 4M", "b.qcow2"])?;
    run_in(
        dir,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "m.qcow2",
        ],
    )?;
    run_in(dir, &["qemu-io", "-c", "write -P 2 1M 64k", "m.qcow2"])?;
    run_in(
        dir,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "t.qcow2",
        ],
    )?;
    run_in(dir, &["qemu-io", "-c", "write -P 3 2M 128k", "t.qcow2"])
}

const NBD_T: &str = "nbd+unix:///t?socket=$DIR/nbd.sock";

fn commit(id: &str, args: &str) -> Step {
    qmp(id, "block-commit", args)
}

/// The active `block-commit`: a mirror of the top into its base, ready, completed
/// with the pivot (the export serves the base), and the chain's data in the base.
fn active_commit_script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        commit(
            "e1",
            r#"{"job-id": "c", "device": "t", "backing-file": "x"}"#,
        )
        .note("backing-file on the active layer"),
        commit("e2", r#"{"job-id": "c", "device": "t", "speed": -1}"#).note("negative speed"),
        commit("e3", r#"{"device": "t"}"#).note("no job id"),
        m(commit(
            "c1",
            r#"{"job-id": "c", "device": "t", "auto-dismiss": false}"#,
        ))
        .until_event("BLOCK_JOB_READY")
        .note("ready"),
        m(Step::line(r#"{"execute": "query-block-jobs", "id": "q1"}"#)).note("a commit job, ready"),
        Step::hook(
            "a client writes the top while the job is ready",
            run_tool(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 4 3M 64k", NBD_T],
                true,
                "wrote 65536/65536",
            ),
        ),
        m(qmp("c2", "job-complete", r#"{"id": "c"}"#))
            .until_events("JOB_STATUS_CHANGE", 3)
            .note("complete: the pivot onto the base"),
        m(Step::line(r#"{"execute": "query-jobs", "id": "q2"}"#)).note("concluded"),
        m(qmp("c3", "job-dismiss", r#"{"id": "c"}"#)).note("dismissed"),
        Step::line(r#"{"execute": "query-block-exports", "id": "q3"}"#)
            .note("the export serves the base"),
        Step::hook(
            "a client writes through the export: the base only",
            run_tool(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 6 5M 64k", NBD_T],
                true,
                "wrote 65536/65536",
            ),
        ),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#)
            .until_eof()
            .note("quit"),
        Step::hook(
            "the top's chain plus the last write is the base",
            run_tool(
                "qemu-io",
                &["-c", "write -P 6 5M 64k", "$DIR/t.qcow2"],
                true,
                "wrote 65536/65536",
            ),
        ),
        Step::hook(
            "compare",
            run_tool(
                "qemu-img",
                &["compare", "$DIR/t.qcow2", "$DIR/b.qcow2"],
                true,
                "Images are identical",
            ),
        ),
        Step::hook(
            "the top's chain is unchanged",
            run_tool(
                "qemu-img",
                &["info", "--backing-chain", "$DIR/t.qcow2"],
                true,
                "backing file: b.qcow2",
            ),
        ),
    ];
    Script {
        name: "active block-commit".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=tf,filename=$DIR/t.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=t,file=tf",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=et,node-name=t,writable=on",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_chain),
        steps,
    }
}

#[test]
fn active_commit_matches_qsd() {
    if let Err(report) = differential(&active_commit_script()) {
        panic!("{report}");
    }
}

#[test]
fn active_commit_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&active_commit_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// Waits until `query-block-jobs` shows job `id` with `field` equal to `want`.
fn wait_job(qmp: &mut QmpConnection, id: &str, field: &str, want: &Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = match qmp.execute("query-block-jobs", None) {
            Ok(r) => r["return"].clone(),
            Err(e) => panic!("{e}"),
        };
        let job = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == id))
            .cloned()
            .unwrap_or(Value::Null);
        if &job[field] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} never had {field} {want}: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn qemu_io(nbd: &str, command: &str) {
    match std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", command, nbd])
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("qemu-io: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("qemu-io: {e}"),
    }
}

/// The worker hosting the mirror's filter (the source's) is SIGKILLed twice while
/// a client writes: each time the replacement scans again, the job goes on and gets
/// ready, and after the pivot the target holds everything the client wrote.
#[test]
fn a_mirror_survives_kills_of_its_sources_worker() {
    let dir = match TempDir::new("bulkhead-mirror-kill") {
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
        "driver=file,node-name=tgf,filename=$DIR/tg.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=tg,file=tgf",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=es,node-name=s,writable=on",
        "--isolation",
        "image",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let mut daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    let nbd = format!("nbd+unix:///s?socket={}", d.join("nbd.sock").display());
    let start = json!({"job-id": "m", "device": "s", "target": "tg", "sync": "full",
        "speed": 8 << 20});
    if let Err(e) = qmp.execute("blockdev-mirror", Some(start)) {
        panic!("{e}");
    }
    let mut killed = Vec::new();
    for (round, pattern) in [(0u32, 0x21u32), (1, 0x22)] {
        let pid = bulkhead_systests::workers::pid_hosting(&mut qmp, "s");
        qemu_io(&nbd, &format!("write -P {pattern} {}M 1M", 2 + round * 10));
        if let Err(e) = bulkhead_systests::procs::send_signal(pid, libc::SIGKILL) {
            panic!("cannot kill the source's worker: {e}");
        }
        killed.push(pid);
        std::thread::sleep(Duration::from_millis(500));
    }
    if let Err(e) = qmp.execute(
        "block-job-set-speed",
        Some(json!({"device": "m", "speed": 0})),
    ) {
        panic!("{e}");
    }
    wait_job(&mut qmp, "m", "ready", &json!(true));
    let pid = bulkhead_systests::workers::pid_hosting(&mut qmp, "s");
    assert!(!killed.contains(&pid), "a new worker hosts the source");
    qemu_io(&nbd, "write -P 0x23 30M 64k");
    if let Err(e) = qmp.execute("block-job-complete", Some(json!({"device": "m"}))) {
        panic!("{e}");
    }
    wait_job(&mut qmp, "m", "device", &Value::Null);
    let _ = qmp.execute("quit", None);
    drop(qmp);
    if let Err(e) = daemon.wait_exit(Duration::from_secs(20)) {
        panic!("{e}");
    }
    let out = std::process::Command::new("qemu-img")
        .arg("compare")
        .arg(d.join("s.qcow2"))
        .arg(d.join("tg.qcow2"))
        .output();
    match out {
        Ok(o) => assert!(
            o.status.success(),
            "the target differs from the source: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("qemu-img: {e}"),
    }
}

/// `s.qcow2` alone: 1 MiB of 0x01 in 4 MiB.
fn make_drive_source(dir: &Path) -> io::Result<()> {
    run_in(
        dir,
        &["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "4M"],
    )?;
    run_in(dir, &["qemu-io", "-c", "write -P 1 0 1M", "s.qcow2"])
}

/// `drive-backup` and `drive-mirror`: the targets they create (qcow2, raw; with
/// and without a mode), their errors, the jobs, the nodes before and after, and
/// the images afterwards.
fn drive_script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let nodes = || {
        Step::line(
            r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n"}"#,
        )
    };
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        m(qmp("b1", "drive-backup", r#"{"job-id": "j", "device": "s", "target": "$DIR/t1.qcow2", "sync": "full", "format": "qcow2"}"#))
            .until_event("BLOCK_JOB_COMPLETED")
            .note("a new qcow2 target"),
        nodes().note("the target went with the job"),
        m(qmp("b2", "drive-backup", r#"{"job-id": "j2", "device": "s", "target": "$DIR/t2.qcow2", "sync": "top"}"#))
            .until_event("BLOCK_JOB_COMPLETED")
            .note("the source's format, sync top"),
        m(qmp("b3", "drive-backup", r#"{"job-id": "j3", "device": "s", "target": "$DIR/t3.raw", "sync": "full", "format": "raw"}"#))
            .until_event("BLOCK_JOB_COMPLETED")
            .note("a new raw target"),
        qmp("e1", "drive-backup", r#"{"job-id": "j4", "device": "s", "target": "$DIR/nosuch.qcow2", "sync": "full", "format": "qcow2", "mode": "existing"}"#)
            .note("an existing target that is not there"),
        qmp("e2", "drive-backup", r#"{"job-id": "j5", "device": "nosuch", "target": "$DIR/x.qcow2", "sync": "full"}"#)
            .note("no device"),
        qmp("e3", "drive-backup", r#"{"job-id": "j6", "device": "s", "target": "/nonexistent-dir/x.qcow2", "sync": "full"}"#)
            .note("a target that cannot be created"),
        m(qmp("m1", "drive-mirror", r#"{"job-id": "m", "device": "s", "target": "$DIR/t4.qcow2", "sync": "full", "format": "qcow2"}"#))
            .until_event("BLOCK_JOB_READY")
            .note("a mirror to a new image: only what the source holds"),
        m(qmp("m2", "block-job-complete", r#"{"device": "m"}"#))
            .until_events("JOB_STATUS_CHANGE", 4)
            .note("complete"),
        nodes().note("nothing uses the target: it went"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
        Step::hook("t1", run_tool("qemu-img", &["compare", "$DIR/s.qcow2", "$DIR/t1.qcow2"], true, "Images are identical")),
        Step::hook("t2", run_tool("qemu-img", &["compare", "$DIR/s.qcow2", "$DIR/t2.qcow2"], true, "Images are identical")),
        Step::hook("t3", run_tool("qemu-img", &["compare", "-F", "raw", "$DIR/s.qcow2", "$DIR/t3.raw"], true, "Images are identical")),
        Step::hook("t4", run_tool("qemu-img", &["compare", "$DIR/s.qcow2", "$DIR/t4.qcow2"], true, "Images are identical")),
        Step::hook("t4's allocation", run_tool("qemu-img", &["map", "$DIR/t4.qcow2"], true, "0x100000")),
    ];
    Script {
        name: "drive-backup and drive-mirror".into(),
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
        setup: Some(make_drive_source),
        steps,
    }
}

#[test]
fn drive_backup_and_mirror_match_qsd() {
    if let Err(report) = differential(&drive_script()) {
        panic!("{report}");
    }
}

#[test]
fn drive_backup_and_mirror_match_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&drive_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// `s.qcow2` with 4 MiB of data, and a 4 MiB raw target on a 2 MiB tmpfs: the
/// target runs out of space half-way.
fn make_full_target(dir: &Path) -> io::Result<()> {
    run_in(
        dir,
        &["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "4M"],
    )?;
    run_in(dir, &["qemu-io", "-c", "write -P 1 0 4M", "s.qcow2"])?;
    std::fs::create_dir_all(dir.join("tiny"))?;
    run_in(
        dir,
        &["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", "tiny"],
    )?;
    run_in(dir, &["truncate", "-s", "4M", "tiny/t.raw"])
}

/// [`same_lines_masked`] with repeated `BLOCK_JOB_ERROR`s counted once: qsd emits
/// one per copy request in flight when the target fills up, bulkhead one per copy.
fn same_errors_once(
    reference: &bulkhead_systests::script::StepOutput,
    tested: &bulkhead_systests::script::StepOutput,
) -> Result<(), String> {
    let once = |out: &bulkhead_systests::script::StepOutput| {
        let mut kept = bulkhead_systests::script::StepOutput::default();
        let mut seen = false;
        for line in out.monitor(0) {
            let error = String::from_utf8_lossy(line).contains("\"BLOCK_JOB_ERROR\"");
            if error && seen {
                continue;
            }
            seen |= error;
            kept.push(0, line.clone());
        }
        kept
    };
    same_lines_masked(&once(reference), &once(tested))
}

/// [`same_lines_masked`] without `BLOCK_JOB_ERROR`s: the steps after a stop, where
/// qsd's last requests in flight may still report theirs.
fn same_without_errors(
    reference: &bulkhead_systests::script::StepOutput,
    tested: &bulkhead_systests::script::StepOutput,
) -> Result<(), String> {
    let strip = |out: &bulkhead_systests::script::StepOutput| {
        let mut kept = bulkhead_systests::script::StepOutput::default();
        for line in out.monitor(0) {
            if !String::from_utf8_lossy(line).contains("\"BLOCK_JOB_ERROR\"") {
                kept.push(0, line.clone());
            }
        }
        kept
    };
    same_lines_masked(&strip(reference), &strip(tested))
}

/// `on-target-error: stop` (and `enospc`) when the target is full: `BLOCK_JOB_ERROR`
/// with action stop, the job paused with `io-status` nospace; once there is space,
/// `block-job-resume` goes on and the mirror gets ready; and the default (report)
/// fails a backup with qsd's events.
fn target_error_script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let e = |s: Step| s.check(same_errors_once);
    let make_room = || {
        Step::hook(
            "make room on the target",
            run_tool(
                "sh",
                &[
                    "-c",
                    "truncate -s 0 $DIR/tiny/t.raw && truncate -s 4M $DIR/tiny/t.raw && echo done",
                ],
                true,
                "done",
            ),
        )
    };
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        qmp("a1", "blockdev-add", r#"{"driver": "raw", "node-name": "t", "file": {"driver": "file", "filename": "$DIR/tiny/t.raw"}}"#),
        e(mirror("m1", r#"{"job-id": "m", "device": "s", "target": "t", "sync": "full", "on-target-error": "stop"}"#))
            .until_events("JOB_STATUS_CHANGE", 3)
            .note("the target fills up: the mirror stops"),
        Step::line(r#"{"execute": "query-block-jobs", "id": "q1"}"#)
            .check(same_without_errors)
            .note("paused, nospace"),
        make_room(),
        m(qmp("m2", "block-job-resume", r#"{"device": "m"}"#))
            .until_event("BLOCK_JOB_READY")
            .note("resumed: ready"),
        m(Step::line(r#"{"execute": "query-block-jobs", "id": "q2"}"#)).note("ok again"),
        m(qmp("m3", "block-job-cancel", r#"{"device": "m", "force": true}"#))
            .until_events("JOB_STATUS_CHANGE", 3)
            .note("cancelled"),
        make_room(),
        e(qmp("b1", "blockdev-backup", r#"{"job-id": "b", "device": "s", "target": "t", "sync": "full", "on-target-error": "enospc"}"#))
            .until_events("JOB_STATUS_CHANGE", 5)
            .note("enospc stops a backup too"),
        qmp("b2", "block-job-cancel", r#"{"device": "b", "force": true}"#)
            .check(same_without_errors)
            .until_events("JOB_STATUS_CHANGE", 4)
            .note("cancelled: it resumes to take the cancel"),
        make_room(),
        e(qmp("b3", "blockdev-backup", r#"{"job-id": "c", "device": "s", "target": "t", "sync": "full"}"#))
            .until_events("JOB_STATUS_CHANGE", 7)
            .note("report: the backup fails"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
        Step::hook("unmount", run_tool("umount", &["$DIR/tiny"], true, "")),
    ];
    Script {
        name: "on-target-error".into(),
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
        setup: Some(make_full_target),
        steps,
    }
}

#[test]
fn target_errors_stop_jobs_as_in_qsd() {
    if let Err(report) = differential(&target_error_script()) {
        panic!("{report}");
    }
}

/// A 16 MiB source whose reads fail with EIO while `$DIR/trigger` exists: a FUSE
/// file (`nbdfuse`) over `nbdkit memory` behind the `error` filter (reads only),
/// 4 MiB of it written; and a 16 MiB raw target. The daemons read it with O_DIRECT
/// (the page cache would otherwise answer what an earlier job read). The last step
/// unmounts it.
fn make_failing_source(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir.join("mnt"))?;
    let log = std::fs::File::create(dir.join("nbdfuse.log"))?;
    let trigger = dir.join("trigger");
    // Runs until the script's last step unmounts the file.
    std::process::Command::new("nbdfuse")
        .arg(dir.join("mnt").join("disk"))
        .args([
            "--command",
            "nbdkit",
            "-s",
            "--filter=error",
            "memory",
            "16M",
        ])
        .args(["error=EIO", "error-pread-rate=100%"])
        .arg(format!("error-pread-file={}", trigger.display()))
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::metadata(dir.join("mnt/disk")).is_ok_and(|m| m.len() == 16 << 20) {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "nbdfuse did not mount: {}",
                std::fs::read_to_string(dir.join("nbdfuse.log")).unwrap_or_default()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    run_in(
        dir,
        &["qemu-io", "-f", "raw", "-c", "write -P 3 0 4M", "mnt/disk"],
    )?;
    run_in(dir, &["truncate", "-s", "16M", "t.raw"])
}

/// `on-source-error` when the source's reads fail (a FUSE file failing on demand):
/// `BLOCK_JOB_ERROR` with operation read and the policy's action, `stop` pausing the
/// job (`io-status` failed) until `block-job-resume` after the reads work again, while
/// `on-target-error` does not apply; `report` failing a backup, as in qsd.
fn source_error_script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let e = |s: Step| s.check(same_errors_once);
    const ON: &[&str] = &["-c", "touch $DIR/trigger && echo done"];
    const OFF: &[&str] = &["-c", "rm -f $DIR/trigger && echo done"];
    let reads_fail = |on: bool| {
        Step::hook(
            if on { "reads fail" } else { "reads work" },
            run_tool("sh", if on { ON } else { OFF }, true, "done"),
        )
    };
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        reads_fail(true),
        e(mirror("m1", r#"{"job-id": "m", "device": "s", "target": "t", "sync": "full", "on-source-error": "stop", "on-target-error": "report"}"#))
            .until_events("JOB_STATUS_CHANGE", 3)
            .note("a source read fails: the mirror stops"),
        Step::line(r#"{"execute": "query-block-jobs", "id": "q1"}"#)
            .check(same_without_errors)
            .note("paused, io-status failed"),
        reads_fail(false),
        m(qmp("m2", "block-job-resume", r#"{"device": "m"}"#))
            .until_event("BLOCK_JOB_READY")
            .note("resumed: ready"),
        m(qmp("m3", "block-job-cancel", r#"{"device": "m", "force": true}"#))
            .until_events("JOB_STATUS_CHANGE", 3)
            .note("cancelled"),
        reads_fail(true),
        e(qmp("b1", "blockdev-backup", r#"{"job-id": "b", "device": "s", "target": "t", "sync": "full", "on-source-error": "stop"}"#))
            .until_events("JOB_STATUS_CHANGE", 5)
            .note("a backup stops on a source error too"),
        qmp("b2", "block-job-cancel", r#"{"device": "b", "force": true}"#)
            .check(same_without_errors)
            .until_events("JOB_STATUS_CHANGE", 4)
            .note("cancelled: it resumes to take the cancel"),
        e(qmp("b3", "blockdev-backup", r#"{"job-id": "c", "device": "s", "target": "t", "sync": "full", "on-target-error": "stop"}"#))
            .until_events("JOB_STATUS_CHANGE", 7)
            .note("report (the default for the source): the backup fails"),
        reads_fail(false),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
        Step::hook("unmount", run_tool("fusermount3", &["-u", "$DIR/mnt"], true, "")),
    ];
    Script {
        name: "on-source-error".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=sf,filename=$DIR/mnt/disk,cache.direct=on",
            "--blockdev",
            "driver=raw,node-name=s,file=sf",
            "--blockdev",
            "driver=file,node-name=tf,filename=$DIR/t.raw",
            "--blockdev",
            "driver=raw,node-name=t,file=tf",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_failing_source),
        steps,
    }
}

/// Whether this machine mounts FUSE files (`/dev/fuse`, `nbdfuse`): the source
/// error test needs one, as `nbd_io_errors.rs` does.
fn fuse_mounts() -> bool {
    let dir = match bulkhead_systests::TempDir::new("bulkhead-fuse-probe") {
        Ok(d) => d,
        Err(_) => return false,
    };
    let ok = make_failing_source(dir.path()).is_ok();
    let _ = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(dir.path().join("mnt"))
        .status();
    ok
}

#[test]
fn source_errors_follow_on_source_error_as_in_qsd() {
    if !fuse_mounts() {
        eprintln!("skipped: this machine cannot mount a FUSE file (nbdfuse)");
        return;
    }
    if let Err(report) = differential(&source_error_script()) {
        panic!("{report}");
    }
}
