//! The worker sandbox: what a worker does to itself before it serves anything.
//!
//! Runs in every worker process, on its main thread, before the async runtime starts
//! (so no thread escapes a process-wide setting). Each layer that is applied is
//! reported back to the supervisor by name, so `x-bulkhead-query-workers` can say what
//! actually holds rather than what was hoped for.
//!
//! Layers applied today: inherited descriptors above the control socket closed,
//! `RLIMIT_CORE` 0 (no core file with image data in it), `RLIMIT_NOFILE` bounded, and
//! the process made non-dumpable (no ptrace or /proc/PID/mem access by same-uid
//! processes). Seccomp, capabilities and namespaces come with the sandbox issue.
#![warn(missing_docs)]

use bulkhead_ipc::wire::WorkerKind;
use rustix::process::{Resource, Rlimit};

/// Highest number of open descriptors a worker may hold (crosvm uses 4096).
pub const WORKER_NOFILE: u64 = 4096;

/// Sandbox set-up errors. Each names the layer that failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A system call needed by a layer failed.
    #[error("sandbox layer {layer}: {errno}")]
    Layer {
        /// The layer's name.
        layer: &'static str,
        /// The error.
        errno: rustix::io::Errno,
    },
}

fn layer(layer: &'static str) -> impl FnOnce(rustix::io::Errno) -> SandboxError {
    move |errno| SandboxError::Layer { layer, errno }
}

/// Applies the layers that must come before any thread or file exists. Returns the
/// names of the layers applied.
pub fn apply_early(_kind: WorkerKind) -> Result<Vec<String>, SandboxError> {
    let mut applied = Vec::new();

    // Descriptor 3 is the control socket; anything above it leaked from the parent.
    close_inherited_above(3).map_err(layer("close-fds"))?;
    applied.push("close-fds".to_string());

    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    rustix::process::setrlimit(Resource::Core, zero).map_err(layer("rlimit-core"))?;
    applied.push("rlimit-core".to_string());

    let nofile = Rlimit {
        current: Some(WORKER_NOFILE),
        maximum: Some(WORKER_NOFILE),
    };
    rustix::process::setrlimit(Resource::Nofile, nofile).map_err(layer("rlimit-nofile"))?;
    applied.push("rlimit-nofile".to_string());

    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(layer("not-dumpable"))?;
    applied.push("not-dumpable".to_string());

    Ok(applied)
}

fn close_inherited_above(keep: u32) -> Result<(), rustix::io::Errno> {
    // SAFETY: close_range only closes descriptors; the ones above `keep` are not owned
    // by any Rust object in this process yet (we run before anything opens files).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(rustix::io::Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL),
        ))
    }
}
