//! QEMU's iotest `tests/qsd-jobs`, as differential scripts against qsd 10.0.2: the
//! same images, command lines and commands (128 MiB qcow2 images, a base and an
//! overlay).
//!
//! - "Job still present at shutdown": an active commit, then `quit`. The iotest
//!   sends `quit` at once; here the step waits for `BLOCK_JOB_READY` first, since
//!   whether the job is ready when `quit` comes depends on timing on both daemons
//!   (qsd 10.0.2 then cancels it: standby, ready, aborting, `BLOCK_JOB_CANCELLED`;
//!   the upstream `.out` shows a later QEMU's `BLOCK_JOB_COMPLETED`).
//! - "Streaming can't get permission on base node": `block-stream` of an overlay
//!   whose base a writable NBD export uses fails with qsd's permission conflict.

use std::io;
use std::path::Path;

use bulkhead_systests::jobs::same_lines_masked;
use bulkhead_systests::{Script, Step, differential, differential_with, run_in};

fn make_images(dir: &Path) -> io::Result<()> {
    run_in(
        dir,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "t.qcow2.base",
            "128M",
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
            "-b",
            "t.qcow2.base",
            "-F",
            "qcow2",
            "t.qcow2",
        ],
    )
}

fn job_still_present_at_shutdown() -> Script {
    Script {
        name: "qsd-jobs: job still present at shutdown".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "node-name=file0,driver=file,filename=$DIR/t.qcow2",
            "--blockdev",
            "node-name=fmt0,driver=qcow2,file=file0",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps: vec![
            Step::line(r#"{"execute":"qmp_capabilities"}"#),
            // qsd's job may be ready before its reply goes out or after.
            Step::line(
                r#"{"execute": "block-commit", "arguments": {"device": "fmt0", "job-id": "job0"}}"#,
            )
            .until_event("BLOCK_JOB_READY")
            .check(same_lines_masked),
            Step::line(r#"{"execute": "quit"}"#).until_eof(),
        ],
    }
}

fn stream_without_permission_on_base() -> Script {
    Script {
        name: "qsd-jobs: streaming can't get permission on base node".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "node-name=file_base,driver=file,filename=$DIR/t.qcow2.base",
            "--blockdev",
            "node-name=fmt_base,driver=qcow2,file=file_base",
            "--blockdev",
            "node-name=file_overlay,driver=file,filename=$DIR/t.qcow2",
            "--blockdev",
            "node-name=fmt_overlay,driver=qcow2,file=file_overlay,backing=fmt_base",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=export1,node-name=fmt_base,writable=on,name=export1",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps: vec![
            Step::line(r#"{"execute": "qmp_capabilities"}"#),
            Step::line(
                r#"{"execute": "block-stream", "arguments": {"device": "fmt_overlay", "job-id": "job0"}}"#,
            ),
            Step::line(r#"{"execute": "quit"}"#).until_eof(),
        ],
    }
}

#[test]
fn qsd_jobs_job_still_present_at_shutdown() {
    if let Err(report) = differential(&job_still_present_at_shutdown()) {
        panic!("{report}");
    }
}

#[test]
fn qsd_jobs_job_still_present_at_shutdown_with_a_worker_per_image() {
    let script = job_still_present_at_shutdown();
    if let Err(report) = differential_with(&script, &["--isolation", "image"]) {
        panic!("{report}");
    }
}

#[test]
fn qsd_jobs_streaming_cannot_get_permission_on_base() {
    if let Err(report) = differential(&stream_without_permission_on_base()) {
        panic!("{report}");
    }
}
