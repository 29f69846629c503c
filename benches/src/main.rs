//! `bulkhead-bench`: bulkhead against qemu-storage-daemon (and nbdkit as a reference) in
//! the same run, on the same backings, one server at a time.
//!
//! Run it with `cargo run --release -p bulkhead-benches -- [--quick]` from the workspace;
//! it builds `target/release/bulkhead` first. It is a separate program, not part of any
//! bulkhead process, and handles no untrusted input: it parses the output of tools it
//! started itself (fio, qemu-img, nbdinfo, /proc).
//!
//! # Layout
//! - `cli`: options.
//! - `procs`: child guards, signal handling, scratch directory, /proc reading (RSS).
//! - `qmp`: a small blocking QMP client.
//! - `daemon`: starting qsd, bulkhead and nbdkit on a backing and proving they serve.
//! - `fio`: fio job lines and JSON parsing; `qemu-img bench` parsing.
//! - `images`: the qcow2 images (qemu-img) and the bounds of allocating jobs.
//! - `run`: the measurement plan and the samples.
//! - `stats`, `table`: medians, spread, the Markdown table.

mod cli;
mod daemon;
mod fio;
mod images;
mod jobs;
mod procs;
mod qmp;
mod run;
mod stats;
mod table;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use serde_json::{Value, json};

use crate::cli::{Options, Parsed};
use crate::daemon::{Backing, Programs};
use crate::procs::{ProcError, ScratchDir};
use crate::run::{Plan, RunError, Samples};

/// The documented way to run the benchmark.
const COMMAND: &str = "cargo run --release -p bulkhead-benches --";

/// Why the benchmark did not run to the end.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}\n{usage}", usage = cli::USAGE)]
    Cli(#[from] cli::CliError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("building bulkhead failed ({0}); run `cargo build --release -p bulkhead` to see why")]
    Build(String),
    #[error("{0} is missing; {1}")]
    Missing(PathBuf, &'static str),
    #[error("this fio has no nbd engine (`fio --enghelp` does not list it)")]
    NoFioNbd,
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("cannot make the qcow2 images: {0}")]
    Image(#[from] images::ImageError),
    #[error("job benchmark: {0}")]
    Jobs(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match real_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-bench: error: {e}");
            if procs::interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    // The crate sits at <root>/benches.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn real_main(args: &[String]) -> Result<(), BenchError> {
    let options = match cli::parse(args)? {
        Parsed::Help => {
            print!("{}", cli::USAGE);
            return Ok(());
        }
        Parsed::Run(o) => o,
    };
    procs::install_signal_thread()?;
    let root = workspace_root();
    let bulkhead = match &options.bulkhead {
        Some(p) => p.clone(),
        None => build_bulkhead(&root)?,
    };
    let programs = Programs {
        qsd: PathBuf::from("/usr/bin/qemu-storage-daemon"),
        bulkhead,
        nbdkit: PathBuf::from("nbdkit"),
    };
    for (p, hint) in [
        (&programs.qsd, "install qemu-storage-daemon"),
        (
            &programs.bulkhead,
            "build it with `cargo build --release -p bulkhead`",
        ),
    ] {
        if !p.exists() {
            return Err(BenchError::Missing(p.clone(), hint));
        }
    }
    if options.jobs {
        let scratch = ScratchDir::new(Path::new("/dev/shm"), "bulkhead-bench-jobs")?;
        let table = jobs::run(&programs, scratch.path(), options.repeat, options.size)
            .map_err(BenchError::Jobs)?;
        println!("{table}");
        return Ok(());
    }
    if !command_output("fio", &["--enghelp"]).contains("nbd") {
        return Err(BenchError::NoFioNbd);
    }

    let started = utc_now();
    let machine = machine_info();
    let versions = versions(&programs, &root);
    let record_dir = root
        .join("target/bulkhead-bench")
        .join(started.replace(':', ""));
    std::fs::create_dir_all(&record_dir).map_err(|e| BenchError::Write(record_dir.clone(), e))?;
    let command_line = format!("{COMMAND} {}", args.join(" "));
    eprintln!("bulkhead-bench: {command_line}");
    eprintln!("machine: {machine}");
    eprintln!("versions: {versions}");
    eprintln!("fio JSON outputs go to {}", record_dir.display());

    let scratch = ScratchDir::new(Path::new("/dev/shm"), "bulkhead-bench")?;
    let image = scratch.path().join("image.raw");
    make_image(&image, options.size)?;
    let qcow2 = if options
        .backings
        .iter()
        .any(|b| matches!(b, Backing::Qcow2Full | Backing::Qcow2Chain))
    {
        eprintln!("bulkhead-bench: making the qcow2 images");
        Some(images::Qcow2Images::make(&image, scratch.path())?)
    } else {
        None
    };

    let mut samples = Samples::default();
    let plan = Plan {
        options: &options,
        programs: &programs,
        image: &image,
        qcow2: qcow2.as_ref(),
        scratch: scratch.path(),
        record_dir: record_dir.clone(),
    };
    let outcome = plan.run(&mut samples);
    let finished = utc_now();
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let report = header(&options, &command_line, &started, &machine, &versions)
        + &format!("load average after the run: {}\n\n", load_after.trim())
        + &table::render(&samples.sections(options.control, &options.backings))
        + &notes(&samples.notes);
    let report = if outcome.is_err() {
        format!("PARTIAL RESULTS: the run stopped early (the error follows the table)\n{report}")
    } else {
        report
    };
    let raw = json!({
        "started": started, "finished": finished, "command": command_line,
        "machine": machine, "versions": versions,
        "options": {
            "repeat": options.repeat, "runtime_s": options.runtime_s,
            "qemu_img_count": options.qemu_img_count, "size": options.size,
            "starts": run::STARTS, "qmp_calls": run::QMP_CALLS,
            "control": options.control,
            "backings": options.backings.iter().map(|b| b.name()).collect::<Vec<_>>(),
        },
        "complete": outcome.is_ok(),
        "table": report,
        "samples": samples.to_json(),
    });
    let summary_path = record_dir.join("results.json");
    write_json(&summary_path, &raw)?;
    if let Some(path) = &options.json {
        write_json(path, &raw)?;
    }
    // A partial table is still worth seeing, but the exit status says it is partial.
    println!("{report}");
    outcome?;
    Ok(())
}

fn notes(notes: &[String]) -> String {
    if notes.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nnotes:\n");
    for n in notes {
        out.push_str(&format!("- {}\n", n.replace('\n', " ")));
    }
    out
}

fn write_json(path: &Path, v: &Value) -> Result<(), BenchError> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    std::fs::write(path, text + "\n").map_err(|e| BenchError::Write(path.to_owned(), e))
}

fn header(o: &Options, command: &str, date: &str, machine: &Value, versions: &Value) -> String {
    let v = |k: &str| versions[k].as_str().unwrap_or("?").to_owned();
    format!(
        "date: {date}\ncommand: {command}\nmachine: {} cores, kernel {}, {}, load average before: {}\n\
         versions: qsd {}; bulkhead {}; nbdkit {}; {}; {}; libnbd {}\n\
         medians of {} repetitions, spread (min-max) in parentheses; fio {} s per job, ioengine=nbd \
         over a Unix socket; {} MiB export; servers run one at a time, qsd/bulkhead order \
         alternating; ratio = bulkhead median / qsd median\n",
        machine["nproc"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["cpu"].as_str().unwrap_or("?"),
        machine["loadavg_before"].as_str().unwrap_or("?"),
        v("qsd"),
        v("bulkhead"),
        v("nbdkit"),
        v("fio"),
        v("qemu-img"),
        v("libnbd"),
        o.repeat,
        o.runtime_s,
        o.size >> 20,
    )
}

/// Builds the release bulkhead with the same cargo that runs this program.
fn build_bulkhead(root: &Path) -> Result<PathBuf, BenchError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("bulkhead-bench: building target/release/bulkhead");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "bulkhead", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .status()
        .map_err(|e| BenchError::Build(e.to_string()))?;
    if !status.success() {
        return Err(BenchError::Build(status.to_string()));
    }
    // Honour a redirected target directory the way cargo does.
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("release/bulkhead"))
}

/// Fills the image with a non-zero pattern, so reads of the file backings move real
/// pages and no read hits a tmpfs hole.
fn make_image(path: &Path, size: u64) -> Result<(), BenchError> {
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(path).map_err(|e| BenchError::Write(path.to_owned(), e))?;
    let mut left = size;
    while left > 0 {
        procs::check_interrupted()?;
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        f.write_all(&chunk[..n])
            .map_err(|e| BenchError::Write(path.to_owned(), e))?;
        left -= n as u64;
    }
    Ok(())
}

/// stdout and stderr of a short command, empty if it cannot run.
fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_owned()
}

fn machine_info() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().next().map(str::to_owned))
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpu": cpu,
        "memory": mem,
        "loadavg_before": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

fn versions(programs: &Programs, root: &Path) -> Value {
    let path = |p: &Path| p.display().to_string();
    let qsd = first_line(&command_output(&path(&programs.qsd), &["--version"]));
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let dirty = if git(&["status", "--porcelain"]).is_empty() {
        ""
    } else {
        " (uncommitted changes)"
    };
    json!({
        "qsd": qsd.trim_start_matches("qemu-storage-daemon version ").to_owned(),
        "bulkhead": format!("{}{dirty} ({})", git(&["rev-parse", "--short", "HEAD"]), path(&programs.bulkhead)),
        "nbdkit": first_line(&command_output(&path(&programs.nbdkit), &["--version"])).trim_start_matches("nbdkit ").to_owned(),
        "fio": first_line(&command_output("fio", &["--version"])),
        "qemu-img": first_line(&command_output("qemu-img", &["--version"])),
        "libnbd": first_line(&command_output("nbdinfo", &["--version"])),
    })
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// Formats seconds since the epoch as a UTC timestamp (days-to-civil conversion from
/// Howard Hinnant's date algorithms, valid for every date after 1970).
fn format_utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps_match_known_dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_245_168), "2026-11-21T07:12:48Z");
    }
}
