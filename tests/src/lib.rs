//! System-test harness for bulkhead: runs the real binary and qemu-storage-daemon (qsd)
//! side by side and drives them with real clients.
//!
//! Runs only in test processes. Everything read from a daemon is untrusted: malformed
//! output becomes a [`HarnessError`], never a panic.
//!
//! # Layout
//! - [`daemon`]: find qsd or bulkhead, start one in a temp dir with N QMP monitors, kill it
//!   (and everything it spawned) on drop.
//! - [`qmp`]: raw-bytes QMP client, line by line with timeouts.
//! - [`mask`]: masking of timestamps, versions, temp dirs and auto node names.
//! - [`script`]: data-driven QMP sessions, run against two daemons and compared byte for byte.
//! - [`procs`]: `/proc` reading (children, argv, liveness) and signals.
//! - [`loopdev`]: a loop device for host_device tests.
//! - [`writes`]: verifiable write rounds over NBD and their expected image.
//! - [`workers`]: multi-image daemons and what `x-bulkhead-query-workers` reports.
//! - [`nbd`]: a raw NBD client (handshake, READ/WRITE/FLUSH, the errno a server sends).
//!
//! The daemon compared with qsd is bulkhead unless `BULKHEAD_DIFF_AGAINST=qsd`; bulkhead is
//! `BULKHEAD_BIN` or `target/<profile>/bulkhead` next to the test executable's `deps/`.

pub mod daemon;
pub mod error;
pub mod jobs;
pub mod loopdev;
pub mod mask;
pub mod nbd;
pub mod procs;
pub mod qmp;
pub mod script;
pub mod workers;
pub mod writes;

pub use daemon::{Daemon, DaemonKind, TempDir};
pub use error::HarnessError;
pub use qmp::QmpConnection;
pub use script::{Script, Step, differential, differential_with};

/// Runs `args[0]` with the rest in `dir` (a test's image setup: `qemu-img`,
/// `qemu-io`); its stderr becomes the error when it fails.
pub fn run_in(dir: &std::path::Path, args: &[&str]) -> std::io::Result<()> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| std::io::Error::other("no program"))?;
    let out = std::process::Command::new(program)
        .args(rest)
        .current_dir(dir)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
