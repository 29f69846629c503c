//! Block job timings against qsd (`--jobs`): how long `block-commit` (intermediate
//! and active), `block-stream`, `blockdev-backup` and `blockdev-mirror` (to a qcow2
//! and to a raw target) of an image full of data take on each daemon, and whether a
//! speed limit holds over 10 s. A mirror or active commit is completed as soon as
//! it is ready; its time runs to the end.
//!
//! Runs in the benchmark harness only. Each run starts a fresh daemon with only a
//! QMP monitor, copies the prepared images, adds the nodes over QMP, starts the job
//! and polls `query-jobs` every 10 ms until it concludes (the time includes one poll
//! interval at most, on both daemons alike). Runs alternate the daemons' order;
//! medians over the repetitions.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon::{Programs, Server, spawn_qmp_daemon};
use crate::qmp::Qmp;

/// A job the bench times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Commit,
    Stream,
    BackupQcow2,
    BackupRaw,
    MirrorQcow2,
    MirrorRaw,
    ActiveCommit,
}

impl Job {
    fn title(self) -> &'static str {
        match self {
            Job::Commit => "block-commit (intermediate, 1 layer of data)",
            Job::Stream => "block-stream (1 layer of data)",
            Job::BackupQcow2 => "blockdev-backup sync=full to qcow2",
            Job::BackupRaw => "blockdev-backup sync=full to raw",
            Job::MirrorQcow2 => "blockdev-mirror sync=full to qcow2, then complete",
            Job::MirrorRaw => "blockdev-mirror sync=full to raw, then complete",
            Job::ActiveCommit => "block-commit (active, 1 layer of data), then complete",
        }
    }
}

/// The images a run copies: `full.qcow2` holds `size` bytes of data, `empty.qcow2`
/// none, `overlay.qcow2` is an empty overlay of `full.qcow2` (its backing renamed
/// per run), `empty.raw` is sparse.
struct Templates {
    dir: PathBuf,
    size: u64,
}

fn run_tool(program: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Templates {
    fn make(dir: &Path, size: u64) -> Result<Templates, String> {
        let p = |n: &str| dir.join(n).display().to_string();
        let size_arg = size.to_string();
        run_tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &p("full.qcow2"), &size_arg],
        )?;
        run_tool(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("write -P 0x5a 0 {size}"),
                &p("full.qcow2"),
            ],
        )?;
        run_tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &p("empty.qcow2"), &size_arg],
        )?;
        Ok(Templates {
            dir: dir.to_path_buf(),
            size,
        })
    }

    fn copy(&self, from: &str, to: &Path) -> Result<(), String> {
        std::fs::copy(self.dir.join(from), to)
            .map(|_| ())
            .map_err(|e| format!("copy {from}: {e}"))
    }
}

/// One daemon with the images of one run.
struct Run {
    child: crate::procs::Guarded,
    qmp: Qmp,
    dir: PathBuf,
}

impl Run {
    fn start(programs: &Programs, server: Server, dir: &Path, tag: &str) -> Result<Run, String> {
        let (mut child, sock, log) =
            spawn_qmp_daemon(programs, server, dir, tag).map_err(|e| e.to_string())?;
        let qmp = Qmp::open(&sock, Duration::from_secs(20), || Ok(())).map_err(|e| {
            let _ = &log;
            e.to_string()
        });
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                child.stop();
                return Err(e);
            }
        };
        Ok(Run {
            child,
            qmp,
            dir: dir.to_path_buf(),
        })
    }

    fn qcow2(&mut self, name: &str, file: &Path, backing: Option<&str>) -> Result<(), String> {
        let mut o = json!({"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": file}});
        if let Some(b) = backing {
            o["backing"] = json!(b);
        }
        self.qmp
            .execute("blockdev-add", Some(o))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn raw(&mut self, name: &str, file: &Path) -> Result<(), String> {
        let o = json!({"driver": "raw", "node-name": name,
            "file": {"driver": "file", "filename": file}});
        self.qmp
            .execute("blockdev-add", Some(o))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Polls `query-jobs` until job `id` concludes; the progress at each poll goes to
    /// `seen` (time, offset).
    fn wait(
        &mut self,
        id: &str,
        mut seen: impl FnMut(Duration, u64) -> bool,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            crate::procs::check_interrupted().map_err(|e| e.to_string())?;
            let jobs = self
                .qmp
                .execute("query-jobs", None)
                .map_err(|e| e.to_string())?;
            let job = jobs
                .as_array()
                .and_then(|l| l.iter().find(|j| j["id"] == id))
                .cloned()
                .unwrap_or(Value::Null);
            if let Some(e) = job.get("error") {
                return Err(format!("job {id} failed: {e}"));
            }
            if job["status"] == "concluded" || job.is_null() {
                return Ok(());
            }
            let done = job["current-progress"].as_u64().unwrap_or(0);
            if !seen(start.elapsed(), done) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(600) {
                return Err(format!("job {id} did not end in 10 minutes"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `query-jobs` until job `id` is ready, completes it, and polls until it
    /// concludes.
    fn wait_completing(&mut self, id: &str) -> Result<(), String> {
        let start = Instant::now();
        let mut completed = false;
        loop {
            crate::procs::check_interrupted().map_err(|e| e.to_string())?;
            let jobs = self
                .qmp
                .execute("query-jobs", None)
                .map_err(|e| e.to_string())?;
            let job = jobs
                .as_array()
                .and_then(|l| l.iter().find(|j| j["id"] == id))
                .cloned()
                .unwrap_or(Value::Null);
            if let Some(e) = job.get("error") {
                return Err(format!("job {id} failed: {e}"));
            }
            if job["status"] == "concluded" || job.is_null() {
                return Ok(());
            }
            if job["status"] == "ready" && !completed {
                self.qmp
                    .execute("job-complete", Some(json!({"id": id})))
                    .map_err(|e| e.to_string())?;
                completed = true;
            }
            if start.elapsed() > Duration::from_secs(600) {
                return Err(format!("job {id} did not end in 10 minutes"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) {
        let _ = self.qmp.execute("quit", None);
        let _ = self.child.wait_timeout(Duration::from_secs(20));
        self.child.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Times one job on one daemon.
fn time_job(
    programs: &Programs,
    server: Server,
    t: &Templates,
    job: Job,
    dir: &Path,
) -> Result<Duration, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let f = |n: &str| dir.join(n);
    let mut run = Run::start(programs, server, dir, "jobs")?;
    let outcome = (|| -> Result<Duration, String> {
        let started = match job {
            Job::Commit => {
                t.copy("empty.qcow2", &f("b.qcow2"))?;
                t.copy("full.qcow2", &f("m.qcow2"))?;
                t.copy("empty.qcow2", &f("t.qcow2"))?;
                run.qcow2("b", &f("b.qcow2"), None)?;
                run.qcow2("m", &f("m.qcow2"), Some("b"))?;
                run.qcow2("t", &f("t.qcow2"), Some("m"))?;
                let s = Instant::now();
                run.qmp
                    .execute(
                        "block-commit",
                        Some(json!({"job-id": "j", "device": "t", "top-node": "m", "auto-dismiss": false})),
                    )
                    .map_err(|e| e.to_string())?;
                s
            }
            Job::Stream => {
                t.copy("full.qcow2", &f("b.qcow2"))?;
                t.copy("empty.qcow2", &f("t.qcow2"))?;
                run.qcow2("b", &f("b.qcow2"), None)?;
                run.qcow2("t", &f("t.qcow2"), Some("b"))?;
                let s = Instant::now();
                run.qmp
                    .execute(
                        "block-stream",
                        Some(json!({"job-id": "j", "device": "t", "auto-dismiss": false})),
                    )
                    .map_err(|e| e.to_string())?;
                s
            }
            Job::BackupQcow2 | Job::BackupRaw => {
                t.copy("full.qcow2", &f("s.qcow2"))?;
                run.qcow2("s", &f("s.qcow2"), None)?;
                if job == Job::BackupQcow2 {
                    t.copy("empty.qcow2", &f("tg.qcow2"))?;
                    run.qcow2("tg", &f("tg.qcow2"), None)?;
                } else {
                    std::fs::File::create(f("tg.raw"))
                        .and_then(|file| file.set_len(t.size))
                        .map_err(|e| e.to_string())?;
                    run.raw("tg", &f("tg.raw"))?;
                }
                let s = Instant::now();
                run.qmp
                    .execute(
                        "blockdev-backup",
                        Some(json!({"job-id": "j", "device": "s", "target": "tg", "sync": "full", "auto-dismiss": false})),
                    )
                    .map_err(|e| e.to_string())?;
                s
            }
            Job::MirrorQcow2 | Job::MirrorRaw => {
                t.copy("full.qcow2", &f("s.qcow2"))?;
                run.qcow2("s", &f("s.qcow2"), None)?;
                if job == Job::MirrorQcow2 {
                    t.copy("empty.qcow2", &f("tg.qcow2"))?;
                    run.qcow2("tg", &f("tg.qcow2"), None)?;
                } else {
                    std::fs::File::create(f("tg.raw"))
                        .and_then(|file| file.set_len(t.size))
                        .map_err(|e| e.to_string())?;
                    run.raw("tg", &f("tg.raw"))?;
                }
                let s = Instant::now();
                run.qmp
                    .execute(
                        "blockdev-mirror",
                        Some(json!({"job-id": "j", "device": "s", "target": "tg", "sync": "full", "auto-dismiss": false})),
                    )
                    .map_err(|e| e.to_string())?;
                s
            }
            Job::ActiveCommit => {
                t.copy("empty.qcow2", &f("b.qcow2"))?;
                t.copy("full.qcow2", &f("t.qcow2"))?;
                run.qcow2("b", &f("b.qcow2"), None)?;
                run.qcow2("t", &f("t.qcow2"), Some("b"))?;
                let s = Instant::now();
                run.qmp
                    .execute(
                        "block-commit",
                        Some(json!({"job-id": "j", "device": "t", "auto-dismiss": false})),
                    )
                    .map_err(|e| e.to_string())?;
                s
            }
        };
        if matches!(job, Job::MirrorQcow2 | Job::MirrorRaw | Job::ActiveCommit) {
            run.wait_completing("j")?;
        } else {
            run.wait("j", |_, _| true)?;
        }
        Ok(started.elapsed())
    })();
    run.stop();
    outcome
}

/// A commit at `speed` bytes/s: the bytes it moved between 1 s and 11 s, over 10 s,
/// against the limit.
fn speed_accuracy(
    programs: &Programs,
    server: Server,
    t: &Templates,
    dir: &Path,
    speed: u64,
) -> Result<f64, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let f = |n: &str| dir.join(n);
    let mut run = Run::start(programs, server, dir, "speed")?;
    let outcome = (|| -> Result<f64, String> {
        t.copy("empty.qcow2", &f("b.qcow2"))?;
        t.copy("full.qcow2", &f("m.qcow2"))?;
        t.copy("empty.qcow2", &f("t.qcow2"))?;
        run.qcow2("b", &f("b.qcow2"), None)?;
        run.qcow2("m", &f("m.qcow2"), Some("b"))?;
        run.qcow2("t", &f("t.qcow2"), Some("m"))?;
        run.qmp
            .execute(
                "block-commit",
                Some(json!({"job-id": "j", "device": "t", "top-node": "m", "speed": speed})),
            )
            .map_err(|e| e.to_string())?;
        let (mut at1, mut at11) = (None, None);
        run.wait("j", |elapsed, done| {
            if at1.is_none() && elapsed >= Duration::from_secs(1) {
                at1 = Some((elapsed, done));
            }
            if elapsed >= Duration::from_secs(11) {
                at11 = Some((elapsed, done));
                return false;
            }
            true
        })?;
        let _ = run.qmp.execute("job-cancel", Some(json!({"id": "j"})));
        match (at1, at11) {
            (Some((t1, d1)), Some((t2, d2))) => {
                let rate = (d2.saturating_sub(d1)) as f64 / (t2 - t1).as_secs_f64();
                Ok(rate / speed as f64)
            }
            _ => Err("the commit ended before 11 s".into()),
        }
    })();
    run.stop();
    outcome
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs every measurement `repeat` times and returns the table.
pub fn run(programs: &Programs, scratch: &Path, repeat: u32, size: u64) -> Result<String, String> {
    eprintln!("bulkhead-bench: making the job images ({} MiB)", size >> 20);
    let t = Templates::make(scratch, size)?;
    let mut table = format!(
        "Block jobs on an image of {} MiB full of data, in /dev/shm; seconds until \
         `query-jobs` shows the job concluded, median of {repeat}; ratio = bulkhead / qsd \
         (at most 1.0: bulkhead is as fast or faster).\n\n\
         | job | qsd s | bulkhead s | ratio |\n|---|---|---|---|\n",
        size >> 20
    );
    for job in [
        Job::Commit,
        Job::ActiveCommit,
        Job::Stream,
        Job::BackupQcow2,
        Job::BackupRaw,
        Job::MirrorQcow2,
        Job::MirrorRaw,
    ] {
        let (mut q, mut b) = (Vec::new(), Vec::new());
        for r in 0..repeat {
            let order = if r % 2 == 0 {
                [Server::Qsd, Server::Bulkhead]
            } else {
                [Server::Bulkhead, Server::Qsd]
            };
            for server in order {
                let dir = scratch.join(format!("run-{r}-{}", server.name()));
                let d = time_job(programs, server, &t, job, &dir)?;
                eprintln!(
                    "bulkhead-bench: {:?} on {}: {:.2} s",
                    job,
                    server.name(),
                    d.as_secs_f64()
                );
                match server {
                    Server::Qsd => q.push(d.as_secs_f64()),
                    _ => b.push(d.as_secs_f64()),
                }
            }
        }
        let (q, b) = (median(q), median(b));
        table += &format!("| {} | {q:.2} | {b:.2} | {:.2} |\n", job.title(), b / q);
    }
    let speed = 64 << 20;
    table += &format!(
        "\nSpeed limit: a commit at {} MiB/s; bytes moved from 1 s to 11 s over 10 s, \
         against the limit (1.00 = exact; within 0.95-1.05 holds it within 5 %).\n\n\
         | daemon | measured / limit |\n|---|---|\n",
        speed >> 20
    );
    for server in [Server::Qsd, Server::Bulkhead] {
        let mut v = Vec::new();
        for r in 0..repeat {
            let dir = scratch.join(format!("speed-{r}-{}", server.name()));
            v.push(speed_accuracy(programs, server, &t, &dir, speed)?);
        }
        table += &format!("| {} | {:.3} |\n", server.name(), median(v));
    }
    Ok(table)
}
