//! The qcow2 images of the qcow2 backings, made with `qemu-img` in the scratch
//! directory (on /dev/shm, beside the raw image), and the bounds of the jobs that
//! allocate.
//!
//! Runs in the benchmark harness only; parses the output of `qemu-img check`, a tool the
//! harness started itself.
//!
//! - Fully allocated: the raw image (filled with 0x5a) converted, so every cluster holds
//!   data, in guest order.
//! - Chain: a base converted the same way, then two empty overlays naming their backing
//!   (absolute path, `-F qcow2`); the export is the top, so every read walks three
//!   images before it finds data.
//! - Fresh: an empty image of [`crate::daemon::FRESH_SCALE`] times the export size, made anew before
//!   every job. A random 4 KiB write job writes at cluster-aligned offsets and stops
//!   after one request per eight clusters: the expected share of writes that land in a
//!   cluster not written before is then about 94 % (1 - e^(-1/8) clusters touched per
//!   request, over 1/8 requests per cluster), and the measured share is kept in the
//!   results (`qemu-img check` after the job). A sequential 1 MiB job writes new
//!   clusters only. Both stop after `2 × --size` bytes of new data at most, so /dev/shm
//!   holds at most that much for the job; fio then reports the rate over the time it
//!   actually took (at most the job's runtime).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::procs::{self, ProcError};

/// Cluster size of every image (qemu-img's default, named so it is explicit).
pub const CLUSTER: u64 = 64 << 10;
/// How long one qemu-img command may take (converting 1 GiB on tmpfs takes ~1 s).
const LIMIT: Duration = Duration::from_secs(300);

/// Why an image could not be made or checked.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// qemu-img could not run.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// qemu-img failed.
    #[error("qemu-img {args} exited {status}\n{output}")]
    Failed {
        /// Its arguments.
        args: String,
        /// Exit status.
        status: String,
        /// Its output.
        output: String,
    },
    /// `qemu-img check --output=json` printed something unusable.
    #[error("qemu-img check output has no usable `{0}`: {1}")]
    BadCheck(&'static str, String),
}

/// `qemu-img convert` arguments: `raw` (a raw image) to a qcow2 image at `dst`.
pub fn convert_args(raw: &Path, dst: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["convert", "-f", "raw", "-O", "qcow2", "-o"]
        .map(str::to_owned)
        .to_vec();
    a.push(format!("cluster_size={CLUSTER}"));
    a.push(raw.display().to_string());
    a.push(dst.display().to_string());
    a
}

/// `qemu-img create` arguments: an empty qcow2 image of `size` bytes, or (with
/// `backing`) an empty overlay of that qcow2 image, of its size.
pub fn create_args(dst: &Path, size: u64, backing: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> = ["create", "-q", "-f", "qcow2", "-o"]
        .map(str::to_owned)
        .to_vec();
    a.push(format!("cluster_size={CLUSTER}"));
    if let Some(b) = backing {
        a.extend(["-b".to_owned(), b.display().to_string()]);
        a.extend(["-F".to_owned(), "qcow2".to_owned()]);
        a.push(dst.display().to_string());
    } else {
        a.push(dst.display().to_string());
        a.push(size.to_string());
    }
    a
}

fn qemu_img(args: &[String], log: &Path) -> Result<String, ImageError> {
    let (status, out) =
        procs::run_logged("qemu-img", Command::new("qemu-img").args(args), log, LIMIT)?;
    if !status.success() {
        return Err(ImageError::Failed {
            args: args.join(" "),
            status: status.to_string(),
            output: out,
        });
    }
    Ok(out)
}

/// The fully allocated image and the top of the chain, made once per run.
#[derive(Debug, Clone)]
pub struct Qcow2Images {
    /// Fully allocated image (written by the write jobs, which keep it allocated).
    pub full: PathBuf,
    /// Top of the three-image chain.
    pub chain_top: PathBuf,
}

impl Qcow2Images {
    /// Converts `raw` twice (the full image and the chain's base) and stacks the two
    /// overlays, all in `dir`.
    pub fn make(raw: &Path, dir: &Path) -> Result<Qcow2Images, ImageError> {
        let log = dir.join("qemu-img-make.log");
        let full = dir.join("full.qcow2");
        let base = dir.join("chain-base.qcow2");
        let mid = dir.join("chain-mid.qcow2");
        let top = dir.join("chain-top.qcow2");
        qemu_img(&convert_args(raw, &full), &log)?;
        qemu_img(&convert_args(raw, &base), &log)?;
        qemu_img(&create_args(&mid, 0, Some(&base)), &log)?;
        qemu_img(&create_args(&top, 0, Some(&mid)), &log)?;
        Ok(Qcow2Images {
            full,
            chain_top: top,
        })
    }
}

/// Makes an empty qcow2 image of `size` bytes at `path`, replacing any old one.
pub fn make_fresh(path: &Path, size: u64, log: &Path) -> Result<(), ImageError> {
    let _ = std::fs::remove_file(path);
    qemu_img(&create_args(path, size, None), log).map(|_| ())
}

/// What `qemu-img check` says about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// Guest clusters allocated in this image (absent from the output when none).
    pub allocated_clusters: u64,
    /// Errors found while checking.
    pub check_errors: u64,
    /// Corruptions found.
    pub corruptions: u64,
    /// Leaked clusters.
    pub leaks: u64,
}

/// Parses `qemu-img check --output=json` (fields absent when zero).
pub fn parse_check(text: &str) -> Result<Check, ImageError> {
    let start = text
        .find('{')
        .ok_or_else(|| ImageError::BadCheck("{", text.to_owned()))?;
    // Only the first object: anything qemu-img wrote to stderr after it is not JSON.
    let doc: Value = serde_json::Deserializer::from_str(&text[start..])
        .into_iter::<Value>()
        .next()
        .ok_or_else(|| ImageError::BadCheck("JSON", text.to_owned()))?
        .map_err(|e| ImageError::BadCheck("JSON", e.to_string()))?;
    if doc.get("check-errors").and_then(Value::as_u64).is_none() {
        return Err(ImageError::BadCheck("check-errors", text.to_owned()));
    }
    let n = |k: &str| doc.get(k).and_then(Value::as_u64).unwrap_or(0);
    Ok(Check {
        allocated_clusters: n("allocated-clusters"),
        check_errors: n("check-errors"),
        corruptions: n("corruptions"),
        leaks: n("leaks"),
    })
}

/// Runs `qemu-img check` on `path` (which no server may have open). Exit statuses 2
/// (corruptions) and 3 (leaks) still print the JSON; the caller decides.
pub fn check(path: &Path, log: &Path) -> Result<Check, ImageError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["check", "--output=json", "-f", "qcow2"])
        .arg(path);
    let (_, out) = procs::run_logged("qemu-img check", &mut cmd, log, LIMIT)?;
    // qemu-img writes its JSON to stdout, which shares the log with stderr.
    parse_check(&out)
}

/// The most requests an allocating job on a fresh image of `virtual_size` bytes may
/// make: `budget` bytes of new clusters at most; random cluster-aligned writes also at
/// most one per eight clusters (see the module text). At least 1.
pub fn allocating_ios(random: bool, block_size: u64, virtual_size: u64, budget: u64) -> u64 {
    let n = if random {
        (virtual_size / CLUSTER / 8).min(budget / CLUSTER)
    } else {
        budget / block_size.max(1)
    };
    n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_converted_or_created_with_explicit_clusters_and_backing_format() {
        assert_eq!(
            convert_args(Path::new("/s/i.raw"), Path::new("/s/f.qcow2")).join(" "),
            "convert -f raw -O qcow2 -o cluster_size=65536 /s/i.raw /s/f.qcow2"
        );
        assert_eq!(
            create_args(Path::new("/s/n.qcow2"), 1 << 34, None).join(" "),
            "create -q -f qcow2 -o cluster_size=65536 /s/n.qcow2 17179869184"
        );
        assert_eq!(
            create_args(Path::new("/s/t.qcow2"), 0, Some(Path::new("/s/m.qcow2"))).join(" "),
            "create -q -f qcow2 -o cluster_size=65536 -b /s/m.qcow2 -F qcow2 /s/t.qcow2"
        );
    }

    #[test]
    fn check_output_gives_allocated_clusters_and_treats_absent_counts_as_zero() {
        // qemu-img 10.0.2, an empty image, then after two writes with one leak.
        let empty = r#"{
    "image-end-offset": 262144,
    "total-clusters": 16384,
    "check-errors": 0,
    "filename": "/dev/shm/t.qcow2",
    "format": "qcow2"
}"#;
        assert_eq!(
            parse_check(empty).expect("parses"),
            Check {
                allocated_clusters: 0,
                check_errors: 0,
                corruptions: 0,
                leaks: 0
            }
        );
        let written = r#"{"image-end-offset": 458752, "total-clusters": 16384,
            "check-errors": 0, "allocated-clusters": 2, "leaks": 1,
            "filename": "/dev/shm/t.qcow2", "format": "qcow2"}"#;
        let c = parse_check(written).expect("parses");
        assert_eq!((c.allocated_clusters, c.leaks), (2, 1));
        assert!(matches!(
            parse_check("qemu-img: Could not open 'x'"),
            Err(ImageError::BadCheck("{", _))
        ));
        assert!(matches!(
            parse_check("{\"filename\": \"x\"}"),
            Err(ImageError::BadCheck("check-errors", _))
        ));
    }

    #[test]
    fn allocating_jobs_are_bounded_by_clusters_and_by_the_byte_budget() {
        let gib = 1u64 << 30;
        // 16 GiB fresh image, 2 GiB budget: 262144 clusters / 8 = 32768 = 2 GiB / 64 KiB.
        assert_eq!(allocating_ios(true, 4096, 16 * gib, 2 * gib), 32_768);
        // A smaller budget wins.
        assert_eq!(allocating_ios(true, 4096, 16 * gib, gib), 16_384);
        // Sequential 1 MiB: the budget alone.
        assert_eq!(allocating_ios(false, 1 << 20, 16 * gib, 2 * gib), 2048);
        // Never zero (fio would treat 0 as "no limit").
        assert_eq!(allocating_ios(true, 4096, CLUSTER, 0), 1);
    }
}
