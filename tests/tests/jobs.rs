//! Block jobs against qsd: `block-commit` of an intermediate layer with every job
//! verb (pause, resume, set-speed, cancel, finalize, dismiss), their errors, the
//! events in order, `query-jobs`/`query-block-jobs`, the graph and the image chain
//! afterwards, in both placements; and a commit whose job runner is SIGKILLed twice
//! (bulkhead only) that still ends with the data qemu-img expects.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_systests::jobs::{ignoring_drain_pauses, same_lines_masked};
use bulkhead_systests::script::run_tool;
use bulkhead_systests::{
    Daemon, DaemonKind, Script, Step, TempDir, differential, differential_with,
};
use serde_json::{Value, json};

/// A three-image chain `b <- m <- t`: b holds 1 MiB of 0x01 at 0, m 16 MiB of 0x02
/// at 0 (over b's), t 1 MiB of 0x03 at 32 MiB; `expected.qcow2` is t's content,
/// flattened, for comparing afterwards.
fn make_chain(dir: &Path) -> io::Result<()> {
    let run = |args: &[&str]| -> io::Result<()> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| io::Error::other("empty"))?;
        let out = std::process::Command::new(program)
            .args(rest)
            .current_dir(dir)
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    };
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "64M"])?;
    run(&["qemu-io", "-c", "write -P 1 0 1M", "b.qcow2"])?;
    run(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "m.qcow2",
    ])?;
    run(&["qemu-io", "-c", "write -P 2 0 16M", "m.qcow2"])?;
    run(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "t.qcow2",
    ])?;
    run(&["qemu-io", "-c", "write -P 3 32M 1M", "t.qcow2"])?;
    run(&[
        "qemu-img",
        "convert",
        "-O",
        "qcow2",
        "t.qcow2",
        "expected.qcow2",
    ])
}

const CHAIN_ARGS: [&str; 12] = [
    "--blockdev",
    "driver=file,node-name=bf,filename=$DIR/b.qcow2",
    "--blockdev",
    "driver=qcow2,node-name=b,file=bf",
    "--blockdev",
    "driver=file,node-name=mf,filename=$DIR/m.qcow2",
    "--blockdev",
    "driver=qcow2,node-name=m,file=mf,backing=b",
    "--blockdev",
    "driver=file,node-name=tf,filename=$DIR/t.qcow2",
    "--blockdev",
    "driver=qcow2,node-name=t,file=tf,backing=m",
];

fn qmp(id: &str, command: &str, args: &str) -> Step {
    Step::line(&format!(
        r#"{{"execute": "{command}", "arguments": {args}, "id": "{id}"}}"#
    ))
}

fn commit(id: &str, args: &str) -> Step {
    qmp(id, "block-commit", args)
}

fn script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        commit("e1", r#"{"device": "t", "top-node": "m"}"#).note("no job id"),
        commit("e2", r#"{"device": "nosuch", "top-node": "m", "job-id": "j"}"#).note("no device"),
        commit("e3", r#"{"device": "t", "top-node": "nosuch", "job-id": "j"}"#).note("no top"),
        commit("e4", r#"{"device": "t", "top-node": "m", "base-node": "t", "job-id": "j"}"#)
            .note("a base above the top"),
        commit("e5", r#"{"device": "m", "top-node": "m", "job-id": "j"}"#).note("not a root"),
        commit("e6", r#"{"device": "t", "top-node": "b", "job-id": "j"}"#).note("into itself"),
        commit("e7", r#"{"device": "t", "top-node": "m", "job-id": "j", "speed": -1}"#)
            .note("a negative speed: created, then null"),
        qmp("e8", "job-pause", r#"{"id": "nosuch"}"#).note("no such job"),
        qmp("e9", "block-job-pause", r#"{"device": "nosuch"}"#).note("no such block job"),
        m(commit("c1", r#"{"device": "t", "top-node": "m", "job-id": "j1", "speed": 65536}"#))
            .note("a slow commit"),
        commit("e10", r#"{"device": "t", "top-node": "m", "job-id": "j2"}"#)
            .note("the device is busy"),
        qmp("e11", "blockdev-del", r#"{"node-name": "b"}"#).note("the base is busy"),
        m(Step::line(r#"{"execute": "query-block-jobs", "id": "q1"}"#)).note("running"),
        // qsd pauses a job at its next pause point, before or after the reply.
        m(qmp("p1", "job-pause", r#"{"id": "j1"}"#))
            .until_event("JOB_STATUS_CHANGE")
            .note("pause"),
        m(Step::line(r#"{"execute": "query-jobs", "id": "q2"}"#)).note("paused"),
        qmp("p2", "job-pause", r#"{"id": "j1"}"#).note("paused already"),
        qmp("p3", "block-job-pause", r#"{"device": "j1"}"#).note("paused already (block-job)"),
        qmp("p4", "job-complete", r#"{"id": "j1"}"#).note("complete: wrong state"),
        qmp("p5", "job-finalize", r#"{"id": "j1"}"#).note("finalize: wrong state"),
        qmp("p6", "job-dismiss", r#"{"id": "j1"}"#).note("dismiss: wrong state"),
        m(Step::line(r#"{"execute": "query-block-jobs", "id": "q3"}"#)).note("paused, not busy"),
        qmp("p7", "block-job-cancel", r#"{"device": "j1"}"#).note("a paused job needs force"),
        m(qmp("r1", "job-resume", r#"{"id": "j1"}"#))
            .until_event("JOB_STATUS_CHANGE")
            .note("resume"),
        qmp("r2", "job-resume", r#"{"id": "j1"}"#).note("not paused"),
        qmp("s1", "block-job-set-speed", r#"{"device": "j1", "speed": 131072}"#).note("speed"),
        qmp("s2", "block-job-set-speed", r#"{"device": "j1", "speed": -5}"#)
            .note("a negative speed"),
        m(qmp("x1", "block-job-cancel", r#"{"device": "j1"}"#))
            .until_events("JOB_STATUS_CHANGE", 3)
            .note("cancel"),
        Step::line(r#"{"execute": "query-block-jobs", "id": "q4"}"#).note("gone"),
        commit(
            "c2",
            r#"{"device": "t", "top-node": "m", "job-id": "j2", "auto-finalize": false, "auto-dismiss": false}"#,
        )
        .until_event("BLOCK_JOB_PENDING")
        .note("a commit that waits to be finalized"),
        qmp("f1", "job-dismiss", r#"{"id": "j2"}"#).note("pending: no dismiss"),
        Step::line(r#"{"execute": "query-jobs", "id": "q5"}"#).note("pending"),
        qmp("f2", "job-finalize", r#"{"id": "j2"}"#).note("finalize: the graph changes"),
        Step::line(r#"{"execute": "query-block-jobs", "id": "q6"}"#).note("concluded"),
        qmp("f3", "block-job-dismiss", r#"{"id": "j2"}"#).note("dismiss"),
        m(Step::line(r#"{"execute": "query-named-block-nodes", "id": "n1"}"#))
            .note("t now reads b directly"),
        Step::hook(
            "the chain holds what it held",
            // Through the daemon: its caches may not be on disk yet.
            run_tool(
                "qemu-img",
                &["compare", "-f", "raw", "nbd+unix:///t?socket=$DIR/nbd.sock", "$DIR/expected.qcow2"],
                true,
                "Images are identical",
            ),
        ),
        Step::hook(
            "t's header names b",
            run_tool("qemu-img", &["info", "-U", "$DIR/t.qcow2"], true, "backing file format: qcow2"),
        ),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "block-commit".into(),
        monitors: 1,
        args: CHAIN_ARGS
            .iter()
            .chain(&[
                "--nbd-server",
                "addr.type=unix,addr.path=$DIR/nbd.sock",
                "--export",
                "type=nbd,id=e,node-name=t",
            ])
            .map(|a| a.to_string())
            .collect(),
        vars: Vec::new(),
        setup: Some(make_chain),
        steps,
    }
}

#[test]
fn block_commit_matches_qsd() {
    if let Err(report) = differential(&script()) {
        panic!("{report}");
    }
}

#[test]
fn block_commit_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// The job runner is SIGKILLed twice during a slow commit: each time a new runner
/// goes on where the copy stood, the job completes without an error, and the chain
/// reads as before. The base is shared with another image (an overlay `o`) under
/// `--isolation image`, so it has a worker of its own and the copy crosses workers:
/// that is what the job runner is for (a commit within one worker runs there).
#[test]
fn a_commit_survives_kills_of_its_job_runner() {
    let dir = match TempDir::new("bulkhead-commit-kill") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    if let Err(e) = make_chain(dir.path()) {
        panic!("{e}");
    }
    let d = dir.path().to_path_buf();
    if let Err(e) = bulkhead_systests::run_in(
        &d,
        &[
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2",
        ],
    ) {
        panic!("{e}");
    }
    let mut args: Vec<String> = CHAIN_ARGS.iter().map(|a| a.to_string()).collect();
    args.extend(
        [
            "--blockdev",
            "driver=file,node-name=of,filename=$DIR/o.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=o,file=of,backing=b",
            "--isolation",
            "image",
        ]
        .map(String::from),
    );
    let daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    let start = json!({"device": "t", "top-node": "m", "job-id": "j", "speed": 4 << 20,
        "auto-dismiss": false});
    if let Err(e) = qmp.execute("block-commit", Some(start)) {
        panic!("{e}");
    }
    let mut killed = Vec::new();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(700));
        let workers = bulkhead_systests::workers::workers(&mut qmp);
        let Some(pid) = workers
            .iter()
            .find(|w| w["kind"] == "jobs")
            .and_then(|w| w["pid"].as_u64())
        else {
            panic!("no job runner: {workers:?}");
        };
        if let Err(e) = bulkhead_systests::procs::send_signal(pid as u32, libc::SIGKILL) {
            panic!("cannot kill the job runner: {e}");
        }
        killed.push(pid);
    }
    let until = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let jobs = match qmp.execute("query-jobs", None) {
            Ok(r) => r["return"].clone(),
            Err(e) => panic!("{e}"),
        };
        if jobs[0]["status"] == "concluded" {
            break jobs[0].clone();
        }
        assert!(Instant::now() < until, "the commit did not end: {jobs}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(job.get("error"), None, "the commit failed: {job}");
    assert_eq!(job["current-progress"], json!(64 << 20));
    let workers = bulkhead_systests::workers::workers(&mut qmp);
    let runner = workers.iter().find(|w| w["kind"] == "jobs");
    assert!(
        runner.is_some_and(|w| w["pid"].as_u64().is_some_and(|p| !killed.contains(&p))),
        "a new runner finished the job: {workers:?}"
    );
    let layers = runner.map(|w| w["sandbox"].to_string()).unwrap_or_default();
    assert!(
        layers.contains("seccomp"),
        "the runner is sandboxed: {layers}"
    );
    let _ = qmp.execute("quit", None);
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(d.join("t.qcow2"))
        .arg(d.join("expected.qcow2"))
        .output();
    match out {
        Ok(o) => assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("qemu-img: {e}"),
    }
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(d.join("t.qcow2"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(info.contains("b.qcow2"), "t's header names b: {info}");
}

/// `s`: 8 MiB of 0x05 at 0 in a 64 MiB qcow2, `s0.qcow2` a copy of it, `tg` an
/// empty target, `fl` a fleecing overlay with `s` as its backing, `small` a target
/// of another size.
fn make_backup_images(dir: &Path) -> io::Result<()> {
    let run = |args: &[&str]| -> io::Result<()> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| io::Error::other("empty"))?;
        let out = std::process::Command::new(program)
            .args(rest)
            .current_dir(dir)
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    };
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "64M"])?;
    run(&["qemu-io", "-c", "write -P 5 0 8M", "s.qcow2"])?;
    run(&["qemu-img", "convert", "-O", "qcow2", "s.qcow2", "s0.qcow2"])?;
    for t in ["tg.qcow2", "tg2.qcow2"] {
        run(&["qemu-img", "create", "-q", "-f", "qcow2", t, "64M"])?;
    }
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "small.qcow2",
        "32M",
    ])?;
    run(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "s.qcow2", "-F", "qcow2", "fl.qcow2",
    ])
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

fn backup(id: &str, args: &str) -> Step {
    qmp(id, "blockdev-backup", args)
}

/// `blockdev-backup`: its errors, a full backup whose target holds the source as it
/// was when the job started although a client rewrites the source meanwhile, and
/// fleecing (`sync: none` into an overlay of the source, exported over NBD): a
/// client reads the point in time while another writes the source.
fn backup_script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        add_qcow2("a1", "tg", "tg.qcow2").note("the target"),
        add_qcow2("a2", "sm", "small.qcow2").note("a smaller target"),
        backup("e1", r#"{"device": "s", "target": "tg", "sync": "full"}"#).note("no job id"),
        backup("e2", r#"{"device": "nosuch", "target": "tg", "sync": "full", "job-id": "b"}"#)
            .note("no device"),
        backup("e3", r#"{"device": "s", "target": "nosuch", "sync": "full", "job-id": "b"}"#)
            .note("no target"),
        backup("e4", r#"{"device": "s", "target": "sm", "sync": "full", "job-id": "b"}"#)
            .note("sizes differ"),
        backup("e5", r#"{"device": "s", "target": "s", "sync": "full", "job-id": "b"}"#)
            .note("onto itself"),
        m(backup(
            "b1",
            r#"{"device": "s", "target": "tg", "sync": "full", "job-id": "b", "speed": 33554432, "auto-dismiss": false}"#,
        ))
        .note("a full backup, at 32 MiB/s"),
        Step::hook(
            "a client rewrites the source during the backup",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 9 0 8M", "-c", "write -P 9 40M 1M", NBD_S], true, "wrote 1048576/1048576"),
        ),
        m(Step::line(r#"{"execute": "query-jobs", "id": "q1"}"#))
            .until_event("BLOCK_JOB_COMPLETED")
            .note("the backup ends"),
        qmp("d1", "job-dismiss", r#"{"id": "b"}"#).note("dismissed"),
        qmp("x1", "block-export-add", r#"{"type": "nbd", "id": "et", "node-name": "tg"}"#)
            .note("export the target"),
        Step::hook(
            "the target holds the source as it was",
            run_tool("qemu-img", &["compare", "-f", "raw", "nbd+unix:///tg?socket=$DIR/nbd.sock", "$DIR/s0.qcow2"], true, "Images are identical"),
        ),
        qmp("x2", "block-export-del", r#"{"id": "et"}"#)
            .until_event("BLOCK_EXPORT_DELETED")
            .note("unexport the target"),
        qmp("a3", "blockdev-add", r#"{"driver": "qcow2", "node-name": "fl", "file": {"driver": "file", "filename": "$DIR/fl.qcow2"}, "backing": "s"}"#)
            .note("a fleecing overlay"),
        Step::hook(
            "the source as it is now",
            run_tool("qemu-img", &["convert", "-O", "raw", "-f", "raw", NBD_S, "$DIR/now.raw"], true, ""),
        ),
        m(backup("f1", r#"{"device": "s", "target": "fl", "sync": "none", "job-id": "f"}"#))
            .note("fleecing: sync none"),
        m(Step::line(r#"{"execute": "query-block-jobs", "id": "q2"}"#)).note("it runs"),
        qmp("x3", "block-export-add", r#"{"type": "nbd", "id": "ef", "node-name": "fl"}"#)
            .check(ignoring_drain_pauses)
            .note("export the fleecing image"),
        Step::hook(
            "a client writes the source",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 7 1M 2M", "-c", "write -P 7 50M 64k", NBD_S], true, "wrote 65536/65536"),
        ),
        Step::hook(
            "the fleecing export reads the point in time",
            run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", "nbd+unix:///fl?socket=$DIR/nbd.sock", "$DIR/now.raw"], true, "Images are identical"),
        ),
        qmp("x4", "block-export-del", r#"{"id": "ef"}"#)
            .until_event("BLOCK_EXPORT_DELETED")
            .check(ignoring_drain_pauses)
            .note("unexport the fleecing image"),
        m(qmp("f2", "job-cancel", r#"{"id": "f"}"#)).note("fleecing ends"),
        Step::line(r#"{"execute": "query-block-jobs", "id": "q3"}"#).note("no job"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "blockdev-backup".into(),
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
        setup: Some(make_backup_images),
        steps,
    }
}

const NBD_S: &str = "nbd+unix:///s?socket=$DIR/nbd.sock";

#[test]
fn blockdev_backup_matches_qsd() {
    if let Err(report) = differential(&backup_script()) {
        panic!("{report}");
    }
}

#[test]
fn blockdev_backup_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&backup_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// `s` with 8 MiB of 0x05, an empty 64 MiB `full.qcow2` for the full backup, and a
/// fleecing overlay `fl.qcow2` over `s`.
fn make_pull_images(dir: &Path) -> io::Result<()> {
    let run = |args: &[&str]| -> io::Result<()> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| io::Error::other("empty"))?;
        let out = std::process::Command::new(program)
            .args(rest)
            .current_dir(dir)
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    };
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "64M"])?;
    run(&["qemu-io", "-c", "write -P 5 0 8M", "s.qcow2"])?;
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "full.qcow2",
        "64M",
    ])?;
    run(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "s.qcow2", "-F", "qcow2", "fl.qcow2",
    ])
}

/// A hook running `tests/python/pull_backup.py` (the backup client) with `args`
/// substituted; its output must hold `needle`.
fn pull_client(
    args: &'static [&'static str],
    needle: &'static str,
) -> impl Fn(
    &mut bulkhead_systests::script::HookContext<'_>,
) -> Result<(), bulkhead_systests::HarnessError>
+ Send
+ Sync
+ 'static {
    move |ctx| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pull_backup.py");
        let args: Vec<String> = args.iter().map(|a| ctx.substitute(a)).collect();
        let out = std::process::Command::new("python3")
            .arg(&script)
            .args(&args)
            .current_dir(ctx.dir)
            .output()
            .map_err(|source| bulkhead_systests::HarnessError::Spawn {
                program: "python3".into(),
                source,
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !text.contains(needle) {
            return Err(bulkhead_systests::HarnessError::Tool {
                program: "pull_backup.py".into(),
                args,
                detail: format!("against {:?}: expected {needle:?}: {text}", ctx.kind),
            });
        }
        Ok(())
    }
}

/// libvirt's pull-mode incremental backup, end to end, against qsd: a bitmap added
/// in one transaction with a full backup; guest writes through an NBD export;
/// later, in one transaction, a disabled copy of the bitmap and a fleecing backup
/// (`sync: none` into an overlay of the source), the overlay exported over NBD with
/// the copy; more guest writes; then a client reads only the dirty extents the
/// export reports (`nbdinfo --map=qemu:dirty-bitmap:`, `qemu-img dd`) on top of the
/// full backup, and the result equals the source as it was at the fleecing point;
/// `qemu-img map` with `x-dirty-bitmap` sees the same extents; then clean-up.
fn pull_script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        add_qcow2("a1", "full", "full.qcow2").note("the full backup's target"),
        m(qmp(
            "t1",
            "transaction",
            r#"{"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "s", "name": "b0"}}, {"type": "blockdev-backup", "data": {"device": "s", "target": "full", "sync": "full", "job-id": "full0"}}]}"#,
        ))
        .until_event("BLOCK_JOB_COMPLETED")
        .note("a bitmap and a full backup, in one transaction"),
        qmp("d1", "blockdev-del", r#"{"node-name": "full"}"#).note("the full backup closed"),
        Step::hook(
            "the guest writes",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 17 1M 64k", "-c", "write -P 18 20M 4k", "-c", "write -P 19 40M 1M", NBD_S], true, "wrote 1048576/1048576"),
        ),
        Step::hook(
            "the source at the next point in time",
            run_tool("qemu-img", &["convert", "-f", "raw", "-O", "raw", NBD_S, "$DIR/now.raw"], true, ""),
        ),
        qmp("a2", "blockdev-add", r#"{"driver": "qcow2", "node-name": "fl", "file": {"driver": "file", "filename": "$DIR/fl.qcow2"}, "backing": "s"}"#)
            .note("the fleecing overlay"),
        m(qmp(
            "t2",
            "transaction",
            r#"{"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "s", "name": "tmp", "disabled": true}}, {"type": "block-dirty-bitmap-merge", "data": {"node": "s", "target": "tmp", "bitmaps": ["b0"]}}, {"type": "blockdev-backup", "data": {"device": "s", "target": "fl", "sync": "none", "job-id": "fleece"}}]}"#,
        ))
        .note("a frozen copy of the bitmap and fleecing, in one transaction"),
        qmp("x1", "block-export-add", r#"{"type": "nbd", "id": "ef", "node-name": "fl", "bitmaps": [{"node": "s", "name": "tmp"}]}"#)
            .check(ignoring_drain_pauses)
            .note("the fleecing image exported with the bitmap"),
        Step::hook(
            "the guest writes after the point in time",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 33 1M 4k", "-c", "write -P 34 30M 64k", NBD_S], true, "wrote 65536/65536"),
        ),
        Step::hook(
            "the client reads the dirty extents onto the full backup",
            pull_client(&["$DIR/nbd.sock", "fl", "tmp", "$DIR/full.qcow2", "$DIR/rebuilt.raw"], "read 1179648 bytes of dirty extents"),
        ),
        Step::hook(
            "the rebuilt image is the point in time",
            run_tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", "$DIR/rebuilt.raw", "$DIR/now.raw"], true, "Images are identical"),
        ),
        Step::hook(
            "qemu-img map sees the dirty extents",
            run_tool(
                "qemu-img",
                &["map", "--output=json", "--image-opts", "driver=nbd,server.type=unix,server.path=$DIR/nbd.sock,export=fl,x-dirty-bitmap=qemu:dirty-bitmap:tmp"],
                true,
                r#"{ "start": 41943040, "length": 1048576, "depth": 0, "present": false, "zero": false, "data": false, "compressed": false}"#,
            ),
        ),
        qmp("x2", "block-export-del", r#"{"id": "ef"}"#)
            .until_event("BLOCK_EXPORT_DELETED")
            .check(ignoring_drain_pauses)
            .note("clean-up: the export"),
        m(qmp("c1", "job-cancel", r#"{"id": "fleece"}"#)).note("clean-up: the fleecing job"),
        qmp("c2", "block-dirty-bitmap-remove", r#"{"node": "s", "name": "tmp"}"#)
            .note("clean-up: the frozen bitmap"),
        qmp("c3", "blockdev-del", r#"{"node-name": "fl"}"#).note("clean-up: the overlay"),
        m(Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n1"}"#))
            .note("b0 keeps recording for the next backup"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "pull-mode-backup".into(),
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
        setup: Some(make_pull_images),
        steps,
    }
}

#[test]
fn pull_mode_incremental_backup_matches_qsd() {
    if let Err(report) = differential(&pull_script()) {
        panic!("{report}");
    }
}

#[test]
fn pull_mode_incremental_backup_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&pull_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// `blockdev-create` against qsd: a `file` image, a `qcow2` image on it (with a
/// backing file name and format) whose bytes equal qsd's, and the failures a create
/// job reports as its error (no such node, a size that is no multiple of 512).
fn create_script() -> Script {
    let create = |id: &str, options: &str| {
        qmp(
            id,
            "blockdev-create",
            &format!(r#"{{"job-id": "{id}", "options": {options}}}"#),
        )
        .until_events("JOB_STATUS_CHANGE", 5)
    };
    let failed = |id: &str, options: &str| {
        qmp(
            id,
            "blockdev-create",
            &format!(r#"{{"job-id": "{id}", "options": {options}}}"#),
        )
        .until_events("JOB_STATUS_CHANGE", 4)
    };
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        create("c1", r#"{"driver": "file", "filename": "$DIR/new.qcow2", "size": 0}"#)
            .note("an empty file"),
        Step::line(r#"{"execute": "query-jobs", "id": "q1"}"#).note("concluded, kept"),
        Step::line(r#"{"execute": "query-block-jobs", "id": "q2"}"#).note("not a block job"),
        qmp("d1", "job-dismiss", r#"{"id": "c1"}"#).note("dismissed"),
        qmp("a1", "blockdev-add", r#"{"driver": "file", "node-name": "nf", "filename": "$DIR/new.qcow2"}"#)
            .note("the file node"),
        create(
            "c2",
            r#"{"driver": "qcow2", "file": "nf", "size": 67108864, "backing-file": "$DIR/base.qcow2", "backing-fmt": "qcow2"}"#,
        )
        .note("a qcow2 image on it"),
        qmp("d2", "job-dismiss", r#"{"id": "c2"}"#).note("dismissed"),
        failed("c3", r#"{"driver": "qcow2", "file": "nosuch", "size": 67108864}"#)
            .note("no such node: the job fails"),
        failed("c4", r#"{"driver": "qcow2", "file": "nf", "size": 1000}"#)
            .note("a size the job refuses"),
        Step::line(r#"{"execute": "query-jobs", "id": "q3"}"#).note("the errors"),
        qmp("d3", "job-dismiss", r#"{"id": "c3"}"#).note("dismissed"),
        qmp("d4", "job-dismiss", r#"{"id": "c4"}"#).note("dismissed"),
        qmp("e1", "blockdev-create", r#"{"job-id": "c5", "options": {"driver": "raw", "file": "nf", "size": 1}}"#)
            .note("raw takes no size"),
        qmp("r1", "blockdev-del", r#"{"node-name": "nf"}"#).note("the file node goes"),
        Step::hook(
            "qemu-img finds the image clean with its backing name",
            run_tool("qemu-img", &["info", "-U", "$DIR/new.qcow2"], true, "backing file format: qcow2"),
        ),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "blockdev-create".into(),
        monitors: 1,
        args: Vec::new(),
        vars: Vec::new(),
        setup: None,
        steps,
    }
}

#[test]
fn blockdev_create_matches_qsd() {
    if let Err(report) = differential(&create_script()) {
        panic!("{report}");
    }
}

/// The qcow2 image `blockdev-create` writes is byte for byte qsd's, for a few sizes
/// and cluster sizes, with and without a backing file.
#[test]
fn created_qcow2_images_are_qsds_bytes() {
    let cases = [
        r#""size": 67108864"#,
        r#""size": 10737418240, "cluster-size": 4096"#,
        r#""size": 1048576, "cluster-size": 2097152, "lazy-refcounts": true"#,
        r#""size": 0, "backing-file": "/base.img", "backing-fmt": "raw""#,
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut images = Vec::new();
        for kind in [DaemonKind::Qsd, DaemonKind::Bulkhead] {
            let dir = match TempDir::new("bulkhead-create") {
                Ok(d) => d,
                Err(e) => panic!("{e}"),
            };
            let d = dir.path().to_path_buf();
            if let Err(e) = std::fs::File::create(d.join("img.qcow2")) {
                panic!("{e}");
            }
            let args: Vec<String> = [
                "--blockdev",
                "driver=file,node-name=f,filename=$DIR/img.qcow2",
            ]
            .map(String::from)
            .to_vec();
            let daemon = match Daemon::start_in(kind, dir, 1, &args, &[]) {
                Ok(d) => d,
                Err(e) => panic!("{e}"),
            };
            let mut qmp = match daemon.qmp(0) {
                Ok(q) => q,
                Err(e) => panic!("{e}"),
            };
            let options: Value = match serde_json::from_str(&format!(
                r#"{{"driver": "qcow2", "file": "f", {case}}}"#
            )) {
                Ok(v) => v,
                Err(e) => panic!("{e}"),
            };
            if let Err(e) = qmp.execute(
                "blockdev-create",
                Some(json!({"job-id": "c", "options": options})),
            ) {
                panic!("{kind:?} case {i}: {e}");
            }
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let jobs = qmp.execute("query-jobs", None).map(|r| r["return"].clone());
                if let Ok(j) = &jobs
                    && j[0]["status"] == "concluded"
                {
                    assert_eq!(j[0].get("error"), None, "{kind:?} case {i}");
                    break;
                }
                assert!(Instant::now() < until, "{kind:?} case {i}: {jobs:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = qmp.execute("quit", None);
            match std::fs::read(d.join("img.qcow2")) {
                Ok(b) => images.push(b),
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            images[0] == images[1],
            "case {i} ({case}): the images differ"
        );
    }
}

/// `block-stream` against qsd: its errors, a stream with nothing below (done at
/// once), a rate-limited stream into `t` from `m` down to `b` while a client writes
/// `t` (a copy never lands on what the client wrote), then a stream of everything;
/// the graph, the header and the data afterwards.
fn stream_script() -> Script {
    let m = |s: Step| s.check(same_lines_masked);
    const NBD_T: &str = "nbd+unix:///t?socket=$DIR/nbd.sock";
    let stream = |id: &str, args: &str| qmp(id, "block-stream", args);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        stream("e1", r#"{"device": "t"}"#).note("no job id"),
        stream("e2", r#"{"device": "nosuch", "job-id": "s"}"#).note("no device"),
        stream("e3", r#"{"device": "t", "job-id": "s", "base-node": "nosuch"}"#).note("no base"),
        stream("e4", r#"{"device": "t", "job-id": "s", "base-node": "t"}"#)
            .note("the base is the top"),
        m(stream("s0", r#"{"device": "b", "job-id": "s0"}"#)).note("nothing below: done at once"),
        m(stream("s1", r#"{"device": "t", "job-id": "s1", "base-node": "b", "speed": 16777216, "auto-dismiss": false}"#))
            .note("a slow stream from m into t"),
        Step::hook(
            "a client writes t meanwhile",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 7 1M 64k", "-c", "write -P 7 40M 64k", NBD_T], true, "wrote 65536/65536"),
        ),
        m(Step::line(r#"{"execute": "query-jobs", "id": "q1"}"#))
            .until_event("BLOCK_JOB_COMPLETED")
            .note("the stream ends"),
        qmp("d1", "job-dismiss", r#"{"id": "s1"}"#).note("dismissed"),
        m(Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n1"}"#))
            .note("t reads b"),
        Step::hook(
            "t holds its writes, m's data and its own",
            run_tool(
                "qemu-io",
                &["-f", "raw", "-c", "read -P 7 1M 64k", "-c", "read -P 2 2M 64k", "-c", "read -P 3 32M 1M", "-c", "read -P 7 40M 64k", NBD_T],
                true,
                "read 65536/65536 bytes at offset 41943040",
            ),
        ),
        m(stream("s2", r#"{"device": "t", "job-id": "s2"}"#))
            .until_event("BLOCK_JOB_COMPLETED")
            .note("everything into t"),
        m(Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n2"}"#))
            .note("t alone"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "block-stream".into(),
        monitors: 1,
        args: CHAIN_ARGS
            .iter()
            .chain(&[
                "--nbd-server",
                "addr.type=unix,addr.path=$DIR/nbd.sock",
                "--export",
                "type=nbd,id=e,node-name=t,writable=on",
            ])
            .map(|a| a.to_string())
            .collect(),
        vars: Vec::new(),
        setup: Some(make_chain),
        steps,
    }
}

#[test]
fn block_stream_matches_qsd() {
    if let Err(report) = differential(&stream_script()) {
        panic!("{report}");
    }
}

#[test]
fn block_stream_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&stream_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// `x-blockdev-amend` of a qcow2 node (bulkhead opens no encrypted image yet, so
/// this is every case there is): its checks in qsd's order, a job that succeeds
/// with nothing to amend and one that fails asking to amend encryption, all their
/// events before the reply, and manual dismissal.
fn amend_script() -> Script {
    let amend = |id: &str, args: &str| qmp(id, "x-blockdev-amend", args);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        amend("e1", r#"{"job-id": "a", "node-name": "nosuch", "options": {"driver": "qcow2"}}"#)
            .note("no node"),
        amend("e2", r#"{"job-id": "a", "node-name": "t", "options": {"driver": "raw"}}"#)
            .note("another driver"),
        amend("e3", r#"{"job-id": "a", "node-name": "tf", "options": {"driver": "file"}}"#)
            .note("a driver without amend"),
        amend("e4", r#"{"job-id": "", "node-name": "t", "options": {"driver": "qcow2"}}"#)
            .note("no job id"),
        amend("e5", r#"{"job-id": "a", "node-name": "t", "options": {"driver": "qcow2", "x": 1}}"#)
            .note("an unknown option"),
        amend("a1", r#"{"job-id": "a", "node-name": "t", "options": {"driver": "qcow2"}, "force": true}"#)
            .note("nothing to amend"),
        amend("a2", r#"{"job-id": "b", "node-name": "t", "options": {"driver": "qcow2", "encrypt": {"format": "luks", "state": "active", "new-secret": "s"}}}"#)
            .note("encryption of an image without it"),
        amend("e6", r#"{"job-id": "a", "node-name": "t", "options": {"driver": "qcow2"}}"#)
            .note("the id is taken until dismissed"),
        Step::line(r#"{"execute": "query-jobs", "id": "q1"}"#).note("both concluded"),
        Step::line(r#"{"execute": "query-block-jobs", "id": "q2"}"#).note("no block job"),
        qmp("d1", "job-dismiss", r#"{"id": "a"}"#),
        qmp("d2", "job-dismiss", r#"{"id": "b"}"#),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "x-blockdev-amend".into(),
        monitors: 1,
        args: CHAIN_ARGS.iter().map(|a| a.to_string()).collect(),
        vars: Vec::new(),
        setup: Some(make_chain),
        steps,
    }
}

#[test]
fn x_blockdev_amend_matches_qsd() {
    if let Err(report) = differential(&amend_script()) {
        panic!("{report}");
    }
}
