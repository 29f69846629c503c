//! fio job lines and fio JSON result parsing, plus `qemu-img bench` output parsing.
//!
//! Runs in the benchmark harness only. Parses output of tools the harness started
//! itself (fio, qemu-img), so nothing here is untrusted, but a tool that failed or was
//! interrupted must give a clear error instead of a zero in the table.

use serde_json::Value;

/// Data direction of a fio job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reads only.
    Read,
    /// Writes only.
    Write,
}

impl Direction {
    /// fio's name for the result object of this direction.
    pub fn fio_key(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
        }
    }
}

/// One fio job the benchmark runs against every target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FioJob {
    /// Short name, used for file names and the JSON output.
    pub name: &'static str,
    /// Direction of every request.
    pub direction: Direction,
    /// Random (true) or sequential offsets.
    pub random: bool,
    /// Request size in bytes.
    pub block_size: u64,
    /// Requests in flight.
    pub iodepth: u32,
}

/// How a job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// After its runtime, going over the export again as often as it gets there.
    Time,
    /// After `ios` requests or its runtime, whichever comes first, never going over the
    /// export twice; random offsets aligned to `align` bytes (the writes of a fresh
    /// qcow2 image, one cluster per request).
    Requests {
        /// Most requests.
        ios: u64,
        /// Alignment of random offsets.
        align: u64,
    },
}

impl FioJob {
    /// fio's `rw=` value.
    pub fn rw(&self) -> &'static str {
        match (self.random, self.direction) {
            (true, Direction::Read) => "randread",
            (true, Direction::Write) => "randwrite",
            (false, Direction::Read) => "read",
            (false, Direction::Write) => "write",
        }
    }

    /// fio's command-line arguments for this job against `uri`, running `runtime_s`
    /// seconds (at most, with [`Bound::Requests`]) and writing JSON to `output`.
    pub fn args(&self, uri: &str, runtime_s: u64, output: &str, bound: Bound) -> Vec<String> {
        let mut args = vec![
            format!("--name={}", self.name),
            "--ioengine=nbd".to_owned(),
            format!("--uri={uri}"),
            format!("--rw={}", self.rw()),
            format!("--bs={}", self.block_size),
            format!("--iodepth={}", self.iodepth),
            // Random offsets without a map: the map costs client CPU that the 2-core
            // machine would take away from the server under test.
            "--norandommap".to_owned(),
            "--randrepeat=0".to_owned(),
        ];
        match bound {
            Bound::Time => args.push("--time_based".to_owned()),
            Bound::Requests { ios, align } => {
                // Without --time_based fio stops at the first of: `ios` requests, the
                // runtime, or the export's size in bytes of I/O.
                args.push(format!("--number_ios={ios}"));
                if self.random {
                    args.push(format!("--blockalign={align}"));
                }
            }
        }
        args.extend([
            format!("--runtime={runtime_s}"),
            "--output-format=json".to_owned(),
            format!("--output={output}"),
        ]);
        args
    }
}

/// The jobs of one target, in the order they run.
pub const JOBS: [FioJob; 6] = [
    FioJob {
        name: "randread-4k-qd1",
        direction: Direction::Read,
        random: true,
        block_size: 4096,
        iodepth: 1,
    },
    FioJob {
        name: "randread-4k-qd32",
        direction: Direction::Read,
        random: true,
        block_size: 4096,
        iodepth: 32,
    },
    FioJob {
        name: "randwrite-4k-qd1",
        direction: Direction::Write,
        random: true,
        block_size: 4096,
        iodepth: 1,
    },
    FioJob {
        name: "randwrite-4k-qd32",
        direction: Direction::Write,
        random: true,
        block_size: 4096,
        iodepth: 32,
    },
    // QD 8 for the sequential jobs: enough to keep a 1 MiB pipeline busy without
    // measuring queueing in the client.
    FioJob {
        name: "seqread-1m-qd8",
        direction: Direction::Read,
        random: false,
        block_size: 1 << 20,
        iodepth: 8,
    },
    FioJob {
        name: "seqwrite-1m-qd8",
        direction: Direction::Write,
        random: false,
        block_size: 1 << 20,
        iodepth: 8,
    },
];

/// What the benchmark takes from one fio run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FioResult {
    /// Completed requests per second.
    pub iops: f64,
    /// Mean total latency (submission to completion) in microseconds.
    pub mean_lat_us: f64,
    /// Throughput in bytes per second.
    pub bw_bytes: f64,
    /// Requests completed.
    pub total_ios: u64,
}

/// Why fio's output could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FioError {
    /// The output holds no JSON object at all (fio died before printing it).
    #[error("fio printed no JSON object")]
    NoJson,
    /// The JSON object is not valid JSON (fio was cut off while printing).
    #[error("fio's JSON output does not parse: {0}")]
    BadJson(String),
    /// A field the benchmark needs is missing or has the wrong type.
    #[error("fio's JSON output has no usable `{0}`")]
    MissingField(String),
    /// fio reported an error for the job (its `error` field, an errno value).
    #[error("fio job `{job}` failed with error {errno}")]
    JobFailed {
        /// Job name.
        job: String,
        /// fio's `error` value.
        errno: i64,
    },
    /// The job completed no request, so its numbers would be zeros, not measurements.
    #[error("fio job `{0}` completed no {1} request")]
    NoIo(String, &'static str),
}

/// Parses fio's `--output-format=json` output for the single job in it.
///
/// fio's nbd engine prints `fio: connected to NBD server` on stdout before the JSON
/// object, so everything before the first `{` is skipped.
pub fn parse_fio_json(text: &str, direction: Direction) -> Result<(FioResult, Value), FioError> {
    let start = text.find('{').ok_or(FioError::NoJson)?;
    let doc: Value =
        serde_json::from_str(&text[start..]).map_err(|e| FioError::BadJson(e.to_string()))?;
    let job = doc
        .get("jobs")
        .and_then(Value::as_array)
        .and_then(|jobs| jobs.first())
        .ok_or_else(|| FioError::MissingField("jobs[0]".to_owned()))?;
    let name = job
        .get("jobname")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned();
    let errno = job
        .get("error")
        .and_then(Value::as_i64)
        .ok_or_else(|| FioError::MissingField("error".to_owned()))?;
    if errno != 0 {
        return Err(FioError::JobFailed { job: name, errno });
    }
    let key = direction.fio_key();
    let side = job
        .get(key)
        .ok_or_else(|| FioError::MissingField(key.to_owned()))?;
    let number = |path: &[&str]| -> Result<f64, FioError> {
        let mut v = side;
        for p in path {
            v = v
                .get(*p)
                .ok_or_else(|| FioError::MissingField(format!("{key}.{}", path.join("."))))?;
        }
        v.as_f64()
            .ok_or_else(|| FioError::MissingField(format!("{key}.{}", path.join("."))))
    };
    let total_ios = side
        .get("total_ios")
        .and_then(Value::as_u64)
        .ok_or_else(|| FioError::MissingField(format!("{key}.total_ios")))?;
    if total_ios == 0 {
        return Err(FioError::NoIo(name, key));
    }
    let result = FioResult {
        iops: number(&["iops"])?,
        mean_lat_us: number(&["lat_ns", "mean"])? / 1000.0,
        bw_bytes: number(&["bw_bytes"])?,
        total_ios,
    };
    Ok((result, doc))
}

/// Why `qemu-img bench` output could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QemuImgBenchError {
    /// The `Run completed in N seconds.` line is missing.
    #[error("qemu-img bench printed no `Run completed in` line")]
    NoCompletionLine,
    /// The duration is not a positive number.
    #[error("qemu-img bench reported an unusable duration `{0}`")]
    BadDuration(String),
}

/// Seconds `qemu-img bench` took, from its `Run completed in 0.500 seconds.` line.
pub fn parse_qemu_img_bench(text: &str) -> Result<f64, QemuImgBenchError> {
    const PREFIX: &str = "Run completed in ";
    let at = text
        .find(PREFIX)
        .ok_or(QemuImgBenchError::NoCompletionLine)?;
    let rest = &text[at + PREFIX.len()..];
    let word = rest.split_whitespace().next().unwrap_or("");
    match word.parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() => Ok(s),
        _ => Err(QemuImgBenchError::BadDuration(word.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from fio 3.33 (ioengine=nbd, randread 4k QD32, 2 s) against qsd 10.0.2
    /// exporting null-co; it starts with the nbd engine's stdout line.
    const SAMPLE: &str = include_str!("testdata/fio-randread-qd32.json");

    #[test]
    fn the_captured_fio_sample_parses_to_its_read_numbers() {
        let (r, doc) = parse_fio_json(SAMPLE, Direction::Read).expect("sample parses");
        assert_eq!(r.iops, 7806.324111);
        assert_eq!(r.bw_bytes, 31974703.0);
        assert_eq!(r.mean_lat_us, 4094.936146266);
        assert_eq!(r.total_ios, 15800);
        assert_eq!(doc["fio version"], "fio-3.33");
    }

    #[test]
    fn asking_for_writes_of_a_read_job_is_an_error_not_a_zero() {
        assert_eq!(
            parse_fio_json(SAMPLE, Direction::Write),
            Err(FioError::NoIo("j".to_owned(), "write"))
        );
    }

    #[test]
    fn a_job_error_is_reported_with_its_errno() {
        let text = SAMPLE.replacen("\"error\" : 0,", "\"error\" : 5,", 1);
        assert_eq!(
            parse_fio_json(&text, Direction::Read),
            Err(FioError::JobFailed {
                job: "j".to_owned(),
                errno: 5
            })
        );
    }

    #[test]
    fn output_without_json_or_cut_short_is_rejected() {
        assert_eq!(
            parse_fio_json("fio: nbd_connect_uri: connect: refused\n", Direction::Read),
            Err(FioError::NoJson)
        );
        assert!(matches!(
            parse_fio_json(&SAMPLE[..SAMPLE.len() / 2], Direction::Read),
            Err(FioError::BadJson(_))
        ));
    }

    #[test]
    fn job_arguments_name_the_engine_uri_and_shape() {
        let args = JOBS[1].args("nbd+unix:///disk?socket=/s", 5, "/o.json", Bound::Time);
        assert_eq!(
            args,
            [
                "--name=randread-4k-qd32",
                "--ioengine=nbd",
                "--uri=nbd+unix:///disk?socket=/s",
                "--rw=randread",
                "--bs=4096",
                "--iodepth=32",
                "--norandommap",
                "--randrepeat=0",
                "--time_based",
                "--runtime=5",
                "--output-format=json",
                "--output=/o.json",
            ]
        );
    }

    #[test]
    fn request_bounded_jobs_are_not_time_based_and_align_only_random_offsets() {
        let bound = Bound::Requests {
            ios: 32_768,
            align: 65_536,
        };
        let random = JOBS[3].args("u", 2, "/o", bound);
        assert_eq!(random[1..8].len(), 7);
        assert!(!random.contains(&"--time_based".to_owned()));
        assert_eq!(
            random[8..],
            [
                "--number_ios=32768",
                "--blockalign=65536",
                "--runtime=2",
                "--output-format=json",
                "--output=/o"
            ]
        );
        let seq = JOBS[5].args("u", 2, "/o", bound);
        assert_eq!(seq[8], "--number_ios=32768");
        assert!(!seq.iter().any(|a| a.starts_with("--blockalign")));
    }

    #[test]
    fn qemu_img_bench_duration_comes_from_its_completion_line() {
        let out = "Sending 20000 read requests, 4096 bytes each, 32 in parallel \
                   (starting at offset 0, step size 4096)\nRun completed in 0.500 seconds.\n";
        assert_eq!(parse_qemu_img_bench(out), Ok(0.5));
        assert_eq!(
            parse_qemu_img_bench("qemu-img: Could not open"),
            Err(QemuImgBenchError::NoCompletionLine)
        );
        assert_eq!(
            parse_qemu_img_bench("Run completed in 0.000 seconds."),
            Err(QemuImgBenchError::BadDuration("0.000".to_owned()))
        );
    }
}
