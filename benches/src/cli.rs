//! Command-line options of `bulkhead-bench`.
//!
//! Runs in the benchmark harness only. Parsing is pure (no files, no processes), so it
//! is unit-tested; paths are checked later, when they are used.

use std::path::PathBuf;

use crate::daemon::Backing;

/// Usage text printed by `--help` and after a bad option.
pub const USAGE: &str = "\
usage: cargo run --release -p bulkhead-benches -- [options]

Benchmarks bulkhead against qemu-storage-daemon (and nbdkit as a reference) in the
same run, one server at a time, alternating, and prints medians with min-max spread.

options:
  --quick           2 s per fio job instead of 5 (qemu-img bench runs follow)
  --repeat N        measure everything N times (default 3)
  --runtime SECS    seconds per fio job (overrides --quick)
  --json PATH       write the raw results (every sample, every fio JSON output) to PATH
  --bulkhead PATH   use this bulkhead binary instead of building target/release/bulkhead
  --size MIB        size of the exported image and null device in MiB (default 1024;
                    the fresh qcow2 image is 16 times that, mostly unallocated)
  --only LIST       run only these parts, comma-separated: control, null, raw-file,
                    file, qcow2-full, qcow2-fresh, qcow2-chain, or qcow2 for all three
                    qcow2 ones (default: everything)
  --jobs            time block jobs (commit, stream, backup) against qsd instead
                    of the I/O rows (`--size` and `--repeat` apply)
  --help            print this text
";

/// Parsed options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Seconds per fio job.
    pub runtime_s: u64,
    /// Repetitions of every measurement.
    pub repeat: u32,
    /// Requests per `qemu-img bench` run.
    pub qemu_img_count: u64,
    /// Where to write the raw results.
    pub json: Option<PathBuf>,
    /// A prebuilt bulkhead; `None` builds the workspace's release binary.
    pub bulkhead: Option<PathBuf>,
    /// Exported size in bytes.
    pub size: u64,
    /// `--quick` was given.
    pub quick: bool,
    /// Measure the control plane.
    pub control: bool,
    /// Backings to measure, in table order.
    pub backings: Vec<Backing>,
    /// Time block jobs instead (`--jobs`; see `jobs.rs`).
    pub jobs: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            runtime_s: 5,
            repeat: 3,
            qemu_img_count: 50_000,
            json: None,
            bulkhead: None,
            size: 1 << 30,
            quick: false,
            control: true,
            backings: Backing::ALL.to_vec(),
            jobs: false,
        }
    }
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Run the benchmark.
    Run(Options),
    /// Print [`USAGE`] and stop.
    Help,
}

/// A command-line mistake.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// An option this program does not have.
    #[error("unknown option `{0}`")]
    Unknown(String),
    /// An option that needs a value came last.
    #[error("option `{0}` needs a value")]
    MissingValue(String),
    /// A value that is not a positive whole number.
    #[error("option `{0}` needs a positive whole number, not `{1}`")]
    BadNumber(String, String),
    /// `--only` named a part that does not exist.
    #[error("`--only` knows no part `{0}`")]
    UnknownPart(String),
}

/// Parses `--only`'s list into (control plane?, backings in table order).
pub fn parse_only(list: &str) -> Result<(bool, Vec<Backing>), CliError> {
    let mut control = false;
    let mut chosen = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "control" => control = true,
            "qcow2" => chosen.extend(Backing::ALL.into_iter().filter(|b| b.is_qcow2())),
            _ => chosen.push(
                Backing::from_name(part).ok_or_else(|| CliError::UnknownPart(part.to_owned()))?,
            ),
        }
    }
    if !control && chosen.is_empty() {
        return Err(CliError::UnknownPart(list.to_owned()));
    }
    let backings = Backing::ALL
        .into_iter()
        .filter(|b| chosen.contains(b))
        .collect();
    Ok((control, backings))
}

fn positive(option: &str, value: &str) -> Result<u64, CliError> {
    match value.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(CliError::BadNumber(option.to_owned(), value.to_owned())),
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Parsed, CliError> {
    let mut o = Options::default();
    let mut runtime: Option<u64> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, CliError> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| CliError::MissingValue(name.to_owned())),
            }
        };
        match name {
            "--help" | "-h" => return Ok(Parsed::Help),
            "--quick" => o.quick = true,
            "--jobs" => o.jobs = true,
            "--repeat" => {
                let v = value()?;
                o.repeat = u32::try_from(positive(name, &v)?)
                    .map_err(|_| CliError::BadNumber(name.to_owned(), v))?;
            }
            "--runtime" => runtime = Some(positive(name, &value()?)?),
            "--json" => o.json = Some(PathBuf::from(value()?)),
            "--bulkhead" => o.bulkhead = Some(PathBuf::from(value()?)),
            "--size" => {
                let v = value()?;
                o.size = positive(name, &v)?
                    .checked_mul(1 << 20)
                    .ok_or_else(|| CliError::BadNumber(name.to_owned(), v))?;
            }
            "--only" => (o.control, o.backings) = parse_only(&value()?)?,
            _ => return Err(CliError::Unknown(arg.clone())),
        }
    }
    if o.quick {
        o.runtime_s = 2;
        o.qemu_img_count = 20_000;
    }
    if let Some(r) = runtime {
        o.runtime_s = r;
    }
    Ok(Parsed::Run(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn no_options_means_three_repeats_of_five_second_jobs_on_one_gib() {
        assert_eq!(parse(&[]), Ok(Parsed::Run(Options::default())));
        assert_eq!(Options::default().runtime_s, 5);
        assert_eq!(Options::default().repeat, 3);
        assert_eq!(Options::default().size, 1 << 30);
    }

    #[test]
    fn quick_shortens_jobs_but_an_explicit_runtime_wins() {
        let Ok(Parsed::Run(o)) = parse(&args(&["--quick"])) else {
            panic!("--quick parses");
        };
        assert_eq!((o.runtime_s, o.qemu_img_count, o.quick), (2, 20_000, true));
        let Ok(Parsed::Run(o)) = parse(&args(&["--runtime", "7", "--quick"])) else {
            panic!("--runtime parses");
        };
        assert_eq!(o.runtime_s, 7);
    }

    #[test]
    fn values_may_follow_or_be_joined_with_an_equals_sign() {
        let Ok(Parsed::Run(o)) =
            parse(&args(&["--repeat=5", "--json", "/tmp/r.json", "--size=64"]))
        else {
            panic!("options parse");
        };
        assert_eq!(o.repeat, 5);
        assert_eq!(o.json, Some(PathBuf::from("/tmp/r.json")));
        assert_eq!(o.size, 64 << 20);
    }

    #[test]
    fn only_selects_parts_in_table_order_and_qcow2_means_all_three() {
        let Ok(Parsed::Run(o)) = parse(&args(&["--only", "qcow2"])) else {
            panic!("--only parses");
        };
        assert!(!o.control);
        assert_eq!(
            o.backings,
            [Backing::Qcow2Full, Backing::Qcow2Fresh, Backing::Qcow2Chain]
        );
        assert_eq!(
            parse_only("qcow2-chain, raw-file,control"),
            Ok((true, vec![Backing::RawFile, Backing::Qcow2Chain]))
        );
        assert_eq!(parse_only("control"), Ok((true, vec![])));
        assert_eq!(
            parse_only("raw"),
            Err(CliError::UnknownPart("raw".to_owned()))
        );
        assert_eq!(parse_only(","), Err(CliError::UnknownPart(",".to_owned())));
        assert_eq!(Options::default().backings, Backing::ALL);
        assert!(Options::default().control);
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(
            parse(&args(&["--fast"])),
            Err(CliError::Unknown("--fast".to_owned()))
        );
        assert_eq!(
            parse(&args(&["--repeat"])),
            Err(CliError::MissingValue("--repeat".to_owned()))
        );
        assert_eq!(
            parse(&args(&["--repeat", "0"])),
            Err(CliError::BadNumber("--repeat".to_owned(), "0".to_owned()))
        );
        assert_eq!(parse(&args(&["--help"])), Ok(Parsed::Help));
    }
}
