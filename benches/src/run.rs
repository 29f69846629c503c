//! The measurement plan: which server runs when, what is measured on it, and where the
//! samples go.
//!
//! Runs in the benchmark harness only. Servers run one at a time and never overlap; each
//! repetition alternates the order of qsd and bulkhead so neither always runs on a
//! machine warmed (or heated) by the other. nbdkit runs last in each backing as a
//! reference. Every number lands in [`Samples`], keyed by server, backing and metric.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cli::Options;
use crate::daemon::{self, Backing, DaemonError, Programs, Running, Server};
use crate::fio::{self, Bound, Direction, FioError, FioJob, JOBS, QemuImgBenchError};
use crate::images::{self, ImageError, Qcow2Images};
use crate::procs::{self, ProcError};
use crate::qmp::{self, Qmp, QmpError};
use crate::stats::{self, Summary};
use crate::table::{Row, Section};

/// Daemon starts per start-up measurement.
pub const STARTS: usize = 10;
/// `query-version` calls per round-trip measurement.
pub const QMP_CALLS: usize = 1000;
/// How long a server sits idle after its jobs before its memory is read.
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(1);

/// What is measured. Order is table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// fio 4 KiB random read, QD1.
    RandReadQd1Iops,
    /// fio 4 KiB random read, QD32.
    RandReadQd32Iops,
    /// fio 4 KiB random write, QD1.
    RandWriteQd1Iops,
    /// fio 4 KiB random write, QD32.
    RandWriteQd32Iops,
    /// Mean latency of the QD1 random reads.
    RandReadQd1LatUs,
    /// Mean latency of the QD1 random writes.
    RandWriteQd1LatUs,
    /// fio 1 MiB sequential read, QD8.
    SeqReadMiBs,
    /// fio 1 MiB sequential write, QD8.
    SeqWriteMiBs,
    /// `qemu-img bench` 4 KiB sequential reads, QD32.
    QemuImgReadIops,
    /// `qemu-img bench -w` 4 KiB sequential writes, QD32.
    QemuImgWriteIops,
    /// Summed RSS of every process of the server, idle after the jobs.
    IdleRssMiB,
    /// Process start to QMP greeting received (median of [`STARTS`]).
    StartupMs,
    /// `query-version` round trip (median of [`QMP_CALLS`]).
    QmpRttUs,
}

impl Metric {
    /// Row label with unit and direction of goodness.
    pub fn label(self) -> &'static str {
        match self {
            Metric::RandReadQd1Iops => "fio 4k randread QD1, IOPS",
            Metric::RandReadQd32Iops => "fio 4k randread QD32, IOPS",
            Metric::RandWriteQd1Iops => "fio 4k randwrite QD1, IOPS",
            Metric::RandWriteQd32Iops => "fio 4k randwrite QD32, IOPS",
            Metric::RandReadQd1LatUs => "fio 4k randread QD1 mean latency, µs (lower is better)",
            Metric::RandWriteQd1LatUs => "fio 4k randwrite QD1 mean latency, µs (lower is better)",
            Metric::SeqReadMiBs => "fio 1M seq read QD8, MiB/s",
            Metric::SeqWriteMiBs => "fio 1M seq write QD8, MiB/s",
            Metric::QemuImgReadIops => "qemu-img bench 4k read QD32, IOPS",
            Metric::QemuImgWriteIops => "qemu-img bench 4k write QD32, IOPS",
            Metric::IdleRssMiB => "idle RSS, all processes, MiB (lower is better)",
            Metric::StartupMs => "start to QMP greeting, ms (lower is better)",
            Metric::QmpRttUs => "QMP query-version round trip, µs (lower is better)",
        }
    }

    /// Stable key for the JSON output.
    pub fn key(self) -> &'static str {
        match self {
            Metric::RandReadQd1Iops => "randread_4k_qd1_iops",
            Metric::RandReadQd32Iops => "randread_4k_qd32_iops",
            Metric::RandWriteQd1Iops => "randwrite_4k_qd1_iops",
            Metric::RandWriteQd32Iops => "randwrite_4k_qd32_iops",
            Metric::RandReadQd1LatUs => "randread_4k_qd1_mean_lat_us",
            Metric::RandWriteQd1LatUs => "randwrite_4k_qd1_mean_lat_us",
            Metric::SeqReadMiBs => "seqread_1m_qd8_mib_s",
            Metric::SeqWriteMiBs => "seqwrite_1m_qd8_mib_s",
            Metric::QemuImgReadIops => "qemu_img_bench_read_4k_qd32_iops",
            Metric::QemuImgWriteIops => "qemu_img_bench_write_4k_qd32_iops",
            Metric::IdleRssMiB => "idle_rss_mib",
            Metric::StartupMs => "startup_to_qmp_greeting_ms",
            Metric::QmpRttUs => "qmp_query_version_rtt_us",
        }
    }

    /// Metrics measured per backing, in table order.
    pub const DATA: [Metric; 11] = [
        Metric::RandReadQd1Iops,
        Metric::RandReadQd32Iops,
        Metric::RandWriteQd1Iops,
        Metric::RandWriteQd32Iops,
        Metric::RandReadQd1LatUs,
        Metric::RandWriteQd1LatUs,
        Metric::SeqReadMiBs,
        Metric::SeqWriteMiBs,
        Metric::QemuImgReadIops,
        Metric::QemuImgWriteIops,
        Metric::IdleRssMiB,
    ];

    /// Metrics of the control plane, measured without a backing.
    pub const CONTROL: [Metric; 2] = [Metric::StartupMs, Metric::QmpRttUs];

    /// Whether `backing` gets this metric at all (the chain takes no writes, qcow2 no
    /// `qemu-img bench`), so its section leaves the row out instead of showing `-`.
    pub fn measured_on(self, backing: Backing) -> bool {
        let write = matches!(
            self,
            Metric::RandWriteQd1Iops
                | Metric::RandWriteQd32Iops
                | Metric::RandWriteQd1LatUs
                | Metric::SeqWriteMiBs
                | Metric::QemuImgWriteIops
        );
        let qemu_img = matches!(self, Metric::QemuImgReadIops | Metric::QemuImgWriteIops);
        (backing.takes_writes() || !write) && (backing.runs_qemu_img_bench() || !qemu_img)
    }
}

/// The fio jobs that run on `backing`, in order.
pub fn jobs_for(backing: Backing) -> Vec<&'static FioJob> {
    JOBS.iter()
        .filter(|j| backing.takes_writes() || j.direction == Direction::Read)
        .collect()
}

/// Takes one number out of a fio result.
type Extract = fn(&fio::FioResult) -> f64;

/// The metrics a fio job yields, and how to get each from its result.
fn job_metrics(job: &str) -> &'static [(Metric, Extract)] {
    fn iops(r: &fio::FioResult) -> f64 {
        r.iops
    }
    fn lat(r: &fio::FioResult) -> f64 {
        r.mean_lat_us
    }
    fn mib_s(r: &fio::FioResult) -> f64 {
        r.bw_bytes / f64::from(1u32 << 20)
    }
    match job {
        "randread-4k-qd1" => &[
            (Metric::RandReadQd1Iops, iops),
            (Metric::RandReadQd1LatUs, lat),
        ],
        "randread-4k-qd32" => &[(Metric::RandReadQd32Iops, iops)],
        "randwrite-4k-qd1" => &[
            (Metric::RandWriteQd1Iops, iops),
            (Metric::RandWriteQd1LatUs, lat),
        ],
        "randwrite-4k-qd32" => &[(Metric::RandWriteQd32Iops, iops)],
        "seqread-1m-qd8" => &[(Metric::SeqReadMiBs, mib_s)],
        "seqwrite-1m-qd8" => &[(Metric::SeqWriteMiBs, mib_s)],
        _ => &[],
    }
}

/// Where a sample belongs: server, backing (none for control-plane metrics), metric.
pub type Key = (Server, Option<Backing>, Metric);

/// Every sample of the run, plus the raw tool outputs.
#[derive(Debug, Default)]
pub struct Samples {
    /// Samples per key, in repetition order.
    pub values: BTreeMap<Key, Vec<f64>>,
    /// One entry per fio run: server, backing, job, repetition and fio's JSON.
    pub fio_outputs: Vec<Value>,
    /// Other per-run details (process counts, qemu-img output).
    pub details: Vec<Value>,
    /// Anything odd that happened and did not stop the run.
    pub notes: Vec<String>,
}

impl Samples {
    fn push(&mut self, key: Key, v: f64) {
        self.values.entry(key).or_default().push(v);
    }

    fn summary(&self, key: Key) -> Option<Summary> {
        self.values.get(&key).and_then(|v| stats::summarize(v))
    }

    /// The table: control plane first (when measured), then one section per backing in
    /// `backings`, each with the rows that backing gets.
    pub fn sections(&self, control: bool, backings: &[Backing]) -> Vec<Section> {
        let mut out = Vec::new();
        if control {
            out.push(Section {
                title: "control plane (no export)".to_owned(),
                nbdkit: false,
                rows: Metric::CONTROL
                    .iter()
                    .map(|&m| Row {
                        metric: m.label().to_owned(),
                        qsd: self.summary((Server::Qsd, None, m)),
                        bulkhead: self.summary((Server::Bulkhead, None, m)),
                        nbdkit: None,
                    })
                    .collect(),
            });
        }
        for &backing in backings {
            let twin = backing.nbdkit_twin();
            out.push(Section {
                title: backing.title().to_owned(),
                nbdkit: twin.is_some(),
                rows: Metric::DATA
                    .iter()
                    .filter(|m| m.measured_on(backing))
                    .map(|&m| Row {
                        metric: m.label().to_owned(),
                        qsd: self.summary((Server::Qsd, Some(backing), m)),
                        bulkhead: self.summary((Server::Bulkhead, Some(backing), m)),
                        nbdkit: twin.and_then(|t| self.summary((Server::Nbdkit, Some(t), m))),
                    })
                    .collect(),
            });
        }
        out
    }

    /// Every key with its samples and summary, for the JSON output.
    pub fn to_json(&self) -> Value {
        let results: Vec<Value> = self
            .values
            .iter()
            .map(|((server, backing, metric), v)| {
                let s = stats::summarize(v);
                json!({
                    "server": server.name(),
                    "backing": backing.map(Backing::name),
                    "metric": metric.key(),
                    "label": metric.label(),
                    "samples": v,
                    "median": s.map(|s| s.median),
                    "min": s.map(|s| s.min),
                    "max": s.map(|s| s.max),
                })
            })
            .collect();
        json!({
            "results": results, "fio": self.fio_outputs, "details": self.details,
            "notes": self.notes,
        })
    }
}

/// Why the run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A server failed to come up or to serve.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// A process failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// A QMP exchange failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// fio failed or printed nothing usable.
    #[error("fio {job} against {server} on {backing}: {source}\n--- fio output ---\n{output}")]
    Fio {
        /// Job name.
        job: &'static str,
        /// Server.
        server: Server,
        /// Backing.
        backing: &'static str,
        /// What was wrong.
        #[source]
        source: FioError,
        /// fio's own output.
        output: String,
    },
    /// qemu-img bench failed.
    #[error("qemu-img bench against {server} on {backing}: {source}\n{output}")]
    QemuImg {
        /// Server.
        server: Server,
        /// Backing.
        backing: &'static str,
        /// What was wrong.
        #[source]
        source: QemuImgBenchError,
        /// Its output.
        output: String,
    },
    /// The server died during the measurements.
    #[error("{0} on {1} died during the measurements\n{2}")]
    DiedDuringRun(Server, &'static str, String),
    /// The server's memory could not be read.
    #[error("cannot read the RSS of {0}")]
    NoRss(Server),
    /// A qcow2 image could not be made or checked.
    #[error("{0}: {1}")]
    Image(&'static str, #[source] ImageError),
}

/// Everything a measurement needs.
#[derive(Debug)]
pub struct Plan<'a> {
    /// Options.
    pub options: &'a Options,
    /// Server binaries.
    pub programs: &'a Programs,
    /// The shared raw image on /dev/shm.
    pub image: &'a Path,
    /// The qcow2 images made once per run (when a qcow2 backing is measured).
    pub qcow2: Option<&'a Qcow2Images>,
    /// Scratch directory for sockets and logs.
    pub scratch: &'a Path,
    /// Where fio's JSON files are kept.
    pub record_dir: PathBuf,
}

/// qsd and bulkhead, in the order repetition `r` runs them.
pub fn order(r: u32) -> [Server; 2] {
    if r.is_multiple_of(2) {
        [Server::Qsd, Server::Bulkhead]
    } else {
        [Server::Bulkhead, Server::Qsd]
    }
}

impl Plan<'_> {
    /// Runs every repetition, filling `samples`.
    pub fn run(&self, samples: &mut Samples) -> Result<(), RunError> {
        for r in 0..self.options.repeat {
            eprintln!(
                "== repetition {}/{} ({} first)",
                r + 1,
                self.options.repeat,
                order(r)[0]
            );
            if self.options.control {
                for server in order(r) {
                    self.control_plane(server, samples)?;
                }
            }
            for &backing in &self.options.backings {
                for server in order(r) {
                    self.target(server, backing, r, samples)?;
                }
                if backing.nbdkit_twin() == Some(backing) {
                    self.target(Server::Nbdkit, backing, r, samples)?;
                }
            }
        }
        Ok(())
    }

    fn control_plane(&self, server: Server, samples: &mut Samples) -> Result<(), RunError> {
        eprintln!("   {server}: start-up x{STARTS}, QMP round trips x{QMP_CALLS}");
        let mut starts = Vec::with_capacity(STARTS);
        for i in 0..STARTS {
            let tag = format!("{}-start{i}", server.name());
            let t0 = Instant::now();
            let (mut child, qmp_sock, log) =
                daemon::spawn_qmp_daemon(self.programs, server, self.scratch, &tag)?;
            let wrap = |source| DaemonError::Qmp {
                server,
                source,
                log: daemon::log_tail(&log, 20),
            };
            let stream =
                qmp::connect_when_ready(&qmp_sock, Duration::from_secs(20), || alive(&mut child))
                    .map_err(wrap)?;
            let (qmp, _greeting) = Qmp::greet(stream).map_err(wrap)?;
            starts.push(t0.elapsed().as_secs_f64() * 1000.0);
            drop(qmp);
            child.stop();
        }
        let startup = stats::median(&starts).unwrap_or(f64::NAN);
        samples.push((server, None, Metric::StartupMs), startup);
        samples.details.push(json!({
            "server": server.name(), "what": "startup_ms_each", "values": starts
        }));

        let (mut child, qmp_sock, log) = daemon::spawn_qmp_daemon(
            self.programs,
            server,
            self.scratch,
            &format!("{}-rtt", server.name()),
        )?;
        let mut q = Qmp::open(&qmp_sock, Duration::from_secs(20), || alive(&mut child)).map_err(
            |source| DaemonError::Qmp {
                server,
                source,
                log: daemon::log_tail(&log, 20),
            },
        )?;
        // A few calls first so the first allocation of buffers is not in the sample.
        for _ in 0..10 {
            q.execute("query-version", None)?;
        }
        let mut rtts = Vec::with_capacity(QMP_CALLS);
        for _ in 0..QMP_CALLS {
            let t0 = Instant::now();
            q.execute("query-version", None)?;
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        drop(q);
        child.stop();
        samples.push(
            (server, None, Metric::QmpRttUs),
            stats::median(&rtts).unwrap_or(f64::NAN),
        );
        Ok(())
    }

    /// The image `backing` is served from (the fresh image's path for
    /// [`Backing::Qcow2Fresh`]; it is made before each job).
    fn image_for(&self, backing: Backing) -> PathBuf {
        match (backing, self.qcow2) {
            (Backing::Qcow2Full, Some(q)) => q.full.clone(),
            (Backing::Qcow2Chain, Some(q)) => q.chain_top.clone(),
            (Backing::Qcow2Fresh, _) => self.scratch.join("fresh.qcow2"),
            _ => self.image.to_owned(),
        }
    }

    fn start(
        &self,
        server: Server,
        backing: Backing,
        r: u32,
        samples: &mut Samples,
    ) -> Result<Running, RunError> {
        let size = backing.export_size(self.options.size);
        let image = self.image_for(backing);
        let start = || Running::start(self.programs, server, backing, &image, size, self.scratch);
        // One retry with a fresh process when the QMP set-up fails: qsd 10.0.2 once
        // answered a well-formed blockdev-add with "JSON parse error, missing : in object
        // pair" under heavy load. The failure is kept in the notes, never hidden; a
        // second failure stops the run.
        match start() {
            Err(e @ DaemonError::Qmp { .. }) => {
                let note = format!(
                    "repetition {}: {server} on {}: set-up failed once and was retried: {e}",
                    r + 1,
                    backing.name()
                );
                eprintln!("   warning: {note}");
                samples.notes.push(note);
                Ok(start()?)
            }
            other => Ok(other?),
        }
    }

    fn target(
        &self,
        server: Server,
        backing: Backing,
        r: u32,
        samples: &mut Samples,
    ) -> Result<(), RunError> {
        procs::check_interrupted()?;
        eprintln!("   {server} on {}", backing.name());
        if backing.fresh_per_job() {
            return self.target_fresh(server, backing, r, samples);
        }
        let mut running = self.start(server, backing, r, samples)?;
        // fio's QD32 IOPS of this very server size the qemu-img bench runs below.
        let mut qd32_iops = [None, None];
        for job in jobs_for(backing) {
            let result = self.fio_job(&mut running, job, Bound::Time, r, samples)?;
            match job.name {
                "randread-4k-qd32" => qd32_iops[0] = Some(result.iops),
                "randwrite-4k-qd32" => qd32_iops[1] = Some(result.iops),
                _ => {}
            }
        }
        if backing.runs_qemu_img_bench() {
            for (write, metric, fio_iops) in [
                (false, Metric::QemuImgReadIops, qd32_iops[0]),
                (true, Metric::QemuImgWriteIops, qd32_iops[1]),
            ] {
                let count = qemu_img_count(
                    fio_iops,
                    self.options.runtime_s,
                    self.options.qemu_img_count,
                );
                let iops = self.qemu_img_bench(&running, write, count)?;
                samples.push((server, Some(backing), metric), iops);
                samples.details.push(json!({
                    "server": server.name(), "backing": backing.name(), "repeat": r + 1,
                    "what": if write { "qemu_img_bench_write" } else { "qemu_img_bench_read" },
                    "count": count, "iops": iops
                }));
                self.still_alive(&mut running)?;
            }
        }
        self.idle_rss(&running, r, samples)?;
        running.stop();
        Ok(())
    }

    /// Every job on its own new image and its own server, so every write job starts
    /// on an empty image; after each write job, `qemu-img check` counts the clusters it
    /// allocated (kept in the details; a share of allocating writes far below the
    /// expected ~94 %, or any check error or leak, goes in the notes).
    fn target_fresh(
        &self,
        server: Server,
        backing: Backing,
        r: u32,
        samples: &mut Samples,
    ) -> Result<(), RunError> {
        let image = self.image_for(backing);
        let log = self.scratch.join("qemu-img-fresh.log");
        let size = backing.export_size(self.options.size);
        // At most twice the export size of new data per job (see `images`).
        let budget = self.options.size.saturating_mul(2);
        let jobs = jobs_for(backing);
        for (i, job) in jobs.iter().enumerate() {
            procs::check_interrupted()?;
            images::make_fresh(&image, size, &log)
                .map_err(|e| RunError::Image("making the fresh qcow2 image", e))?;
            let mut running = self.start(server, backing, r, samples)?;
            let bound = match job.direction {
                Direction::Read => Bound::Time,
                Direction::Write => Bound::Requests {
                    ios: images::allocating_ios(job.random, job.block_size, size, budget),
                    align: images::CLUSTER,
                },
            };
            let result = self.fio_job(&mut running, job, bound, r, samples)?;
            if i + 1 == jobs.len() {
                self.idle_rss(&running, r, samples)?;
            }
            running.stop();
            if job.direction == Direction::Write {
                let check = images::check(&image, &log)
                    .map_err(|e| RunError::Image("checking the fresh qcow2 image", e))?;
                // The probe wrote one cluster (64 KiB at 1 MiB) before the job.
                let probe_clusters = 1;
                let by_job = check.allocated_clusters.saturating_sub(probe_clusters);
                let per_request = job.block_size.div_ceil(images::CLUSTER);
                let share = by_job as f64 / (result.total_ios * per_request) as f64;
                samples.details.push(json!({
                    "server": server.name(), "backing": backing.name(), "repeat": r + 1,
                    "what": "fresh_allocation", "job": job.name,
                    "requests": result.total_ios, "allocated_clusters": check.allocated_clusters,
                    "allocating_share": share, "check_errors": check.check_errors,
                    "corruptions": check.corruptions, "leaks": check.leaks,
                }));
                if share < 0.85 || check.check_errors + check.corruptions + check.leaks > 0 {
                    samples.notes.push(format!(
                        "repetition {}: {server} {} on a fresh image: {by_job} clusters \
                         allocated by {} requests ({:.0} % allocating); qemu-img check: \
                         {} errors, {} corruptions, {} leaks",
                        r + 1,
                        job.name,
                        result.total_ios,
                        share * 100.0,
                        check.check_errors,
                        check.corruptions,
                        check.leaks
                    ));
                }
            }
            let _ = std::fs::remove_file(&image);
        }
        Ok(())
    }

    /// Runs one fio job against `running` and records its metrics.
    fn fio_job(
        &self,
        running: &mut Running,
        job: &FioJob,
        bound: Bound,
        r: u32,
        samples: &mut Samples,
    ) -> Result<fio::FioResult, RunError> {
        let (server, backing) = (running.server, running.backing);
        let limit = Duration::from_secs(self.options.runtime_s + 60);
        let out_file = self.record_dir.join(format!(
            "{}-{}-{}-r{}.json",
            server.name(),
            backing.name(),
            job.name,
            r + 1
        ));
        let out_str = out_file.display().to_string();
        let mut cmd = Command::new("fio");
        cmd.args(job.args(&running.uri, self.options.runtime_s, &out_str, bound));
        let log = self.scratch.join("fio.log");
        let (status, console) = procs::run_logged("fio", &mut cmd, &log, limit)?;
        let text = std::fs::read_to_string(&out_file).unwrap_or_default();
        let fail = |source| RunError::Fio {
            job: job.name,
            server,
            backing: backing.name(),
            source,
            output: format!("{console}\n{text}"),
        };
        let (result, doc) = parse_job(&text, job.direction).map_err(fail)?;
        if !status.success() {
            return Err(fail(FioError::JobFailed {
                job: job.name.to_owned(),
                errno: i64::from(status.code().unwrap_or(-1)),
            }));
        }
        for (metric, get) in job_metrics(job.name) {
            samples.push((server, Some(backing), *metric), get(&result));
        }
        samples.fio_outputs.push(json!({
            "server": server.name(), "backing": backing.name(), "job": job.name,
            "repeat": r + 1, "output": doc
        }));
        self.still_alive(running)?;
        Ok(result)
    }

    /// Sum of the RSS of every process of the server after a second idle.
    fn idle_rss(&self, running: &Running, r: u32, samples: &mut Samples) -> Result<(), RunError> {
        let (server, backing) = (running.server, running.backing);
        std::thread::sleep(IDLE_BEFORE_RSS);
        let (kib, processes) = running.rss().ok_or(RunError::NoRss(server))?;
        samples.push(
            (server, Some(backing), Metric::IdleRssMiB),
            kib as f64 / 1024.0,
        );
        samples.details.push(json!({
            "server": server.name(), "backing": backing.name(), "repeat": r + 1,
            "what": "idle_rss", "kib": kib, "processes": processes
        }));
        Ok(())
    }

    fn still_alive(&self, running: &mut Running) -> Result<(), RunError> {
        match running.check_alive() {
            Ok(()) => Ok(()),
            Err(e) => Err(RunError::DiedDuringRun(
                running.server,
                running.backing.name(),
                e.to_string(),
            )),
        }
    }

    fn qemu_img_bench(&self, running: &Running, write: bool, count: u64) -> Result<f64, RunError> {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["bench", "-f", "raw", "-t", "none", "-d", "32"]);
        cmd.args(["-c", &count.to_string()]);
        if write {
            cmd.arg("-w");
        }
        cmd.arg(&running.uri);
        let log = self.scratch.join("qemu-img.log");
        let (status, out) =
            procs::run_logged("qemu-img bench", &mut cmd, &log, Duration::from_secs(300))?;
        let fail = |source| RunError::QemuImg {
            server: running.server,
            backing: running.backing.name(),
            source,
            output: out.clone(),
        };
        let secs = fio::parse_qemu_img_bench(&out).map_err(fail)?;
        if !status.success() {
            return Err(fail(QemuImgBenchError::NoCompletionLine));
        }
        Ok(count as f64 / secs)
    }
}

/// Requests for one `qemu-img bench` run: what the server did in `runtime_s` seconds at
/// the same depth under fio, between [`MIN_QEMU_IMG_COUNT`] and `max`. A fixed count
/// would take minutes on a server that manages only a few hundred IOPS (bulkhead's file
/// driver on a large tmpfs file, today), so the run lasts about as long as a fio job.
fn qemu_img_count(fio_iops: Option<f64>, runtime_s: u64, max: u64) -> u64 {
    let guess = fio_iops.map_or(max, |iops| {
        let n = (iops * runtime_s as f64).round();
        if n.is_finite() && n > 0.0 {
            n as u64
        } else {
            0
        }
    });
    guess.clamp(MIN_QEMU_IMG_COUNT.min(max), max)
}

/// Fewer requests than this make the run too short to time.
const MIN_QEMU_IMG_COUNT: u64 = 1000;

fn parse_job(text: &str, direction: Direction) -> Result<(fio::FioResult, Value), FioError> {
    fio::parse_fio_json(text, direction)
}

fn alive(child: &mut procs::Guarded) -> Result<(), QmpError> {
    match child.try_status() {
        Ok(None) => Ok(()),
        Ok(Some(status)) => Err(QmpError::Gone(status.to_string())),
        Err(e) => Err(QmpError::Proc(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetitions_alternate_which_daemon_goes_first() {
        assert_eq!(order(0), [Server::Qsd, Server::Bulkhead]);
        assert_eq!(order(1), [Server::Bulkhead, Server::Qsd]);
        assert_eq!(order(2), [Server::Qsd, Server::Bulkhead]);
    }

    #[test]
    fn qemu_img_bench_runs_about_as_long_as_a_fio_job_within_bounds() {
        assert_eq!(qemu_img_count(Some(4000.4), 5, 50_000), 20_002);
        assert_eq!(qemu_img_count(Some(100_000.0), 5, 50_000), 50_000);
        assert_eq!(qemu_img_count(Some(80.0), 5, 50_000), 1000);
        assert_eq!(qemu_img_count(None, 5, 50_000), 50_000);
    }

    #[test]
    fn every_fio_job_feeds_at_least_one_metric() {
        for job in &JOBS {
            assert!(
                !job_metrics(job.name).is_empty(),
                "{} feeds nothing",
                job.name
            );
        }
    }

    #[test]
    fn the_nbdkit_file_column_repeats_in_both_file_sections() {
        let mut s = Samples::default();
        s.push(
            (Server::Nbdkit, Some(Backing::File), Metric::IdleRssMiB),
            3.0,
        );
        s.push(
            (Server::Qsd, Some(Backing::RawFile), Metric::IdleRssMiB),
            20.0,
        );
        s.push(
            (Server::Bulkhead, Some(Backing::RawFile), Metric::IdleRssMiB),
            30.0,
        );
        let sections = s.sections(true, &Backing::ALL);
        let rss = |i: usize| {
            sections[i]
                .rows
                .iter()
                .find(|r| r.metric == Metric::IdleRssMiB.label())
                .cloned()
        };
        let raw = rss(2).expect("raw section has an RSS row");
        assert_eq!(raw.nbdkit.map(|s| s.median), Some(3.0));
        assert_eq!(raw.qsd.map(|s| s.median), Some(20.0));
        assert_eq!(raw.bulkhead.map(|s| s.median), Some(30.0));
        assert_eq!(rss(3).and_then(|r| r.nbdkit).map(|s| s.median), Some(3.0));
        assert_eq!(rss(1).and_then(|r| r.nbdkit), None);
        assert!(sections[1].nbdkit);
        assert!(!sections[4].nbdkit);
    }

    #[test]
    fn the_chain_reads_only_and_qcow2_sections_drop_the_rows_they_never_measure() {
        let names = |b| jobs_for(b).iter().map(|j| j.name).collect::<Vec<_>>();
        assert_eq!(
            names(Backing::Qcow2Chain),
            ["randread-4k-qd1", "randread-4k-qd32", "seqread-1m-qd8"]
        );
        assert_eq!(names(Backing::Qcow2Fresh).len(), JOBS.len());
        let s = Samples::default();
        let sections = s.sections(
            false,
            &[Backing::RawFile, Backing::Qcow2Full, Backing::Qcow2Chain],
        );
        assert_eq!(sections.len(), 3);
        assert_eq!(sections[0].rows.len(), Metric::DATA.len());
        // qcow2: the six fio IOPS/bandwidth rows, two latencies and RSS; no qemu-img.
        assert_eq!(sections[1].rows.len(), Metric::DATA.len() - 2);
        // chain: reads only (QD1, QD32, latency, 1M read) and RSS.
        let labels: Vec<&str> = sections[2].rows.iter().map(|r| r.metric.as_str()).collect();
        assert_eq!(
            labels,
            [
                Metric::RandReadQd1Iops.label(),
                Metric::RandReadQd32Iops.label(),
                Metric::RandReadQd1LatUs.label(),
                Metric::SeqReadMiBs.label(),
                Metric::IdleRssMiB.label(),
            ]
        );
    }
}
