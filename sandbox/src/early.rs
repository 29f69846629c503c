//! The process-wide early layers: resource limits, inherited descriptors,
//! capabilities, `no_new_privs` and dumpability.
//!
//! Runs in every worker, on the main thread, while it is the only thread: capabilities
//! are per thread and are inherited by the threads started afterwards, so dropping
//! them here covers the runtime and the I/O threads. No untrusted input.

use caps::{CapSet, Capability};
use rustix::process::{Resource, Rlimit};

use bulkhead_ipc::wire::WorkerKind;

use crate::{Report, SandboxError, WORKER_NOFILE, layer};

/// `RLIMIT_CORE` 0 (no core file with image data in it) and a bounded `RLIMIT_NOFILE`:
/// [`WORKER_NOFILE`], except for the NBD worker, which needs one descriptor per client
/// and so gets the whole hard limit it inherited (soft raised to it), as the supervisor.
pub(crate) fn rlimits(kind: WorkerKind, report: &mut Report) -> Result<(), SandboxError> {
    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    rustix::process::setrlimit(Resource::Core, zero).map_err(layer("rlimit-core"))?;
    report.applied("rlimit-core");

    let hard = rustix::process::getrlimit(Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    let limit = if kind == WorkerKind::Nbd {
        nofile_ceiling(hard)
    } else {
        // Never above what we inherited: raising a hard limit needs CAP_SYS_RESOURCE.
        WORKER_NOFILE.min(hard)
    };
    let nofile = Rlimit {
        current: Some(limit),
        maximum: Some(limit),
    };
    rustix::process::setrlimit(Resource::Nofile, nofile).map_err(layer("rlimit-nofile"))?;
    report.applied("rlimit-nofile");
    Ok(())
}

/// The highest soft `RLIMIT_NOFILE` a hard limit allows: the hard limit itself, or
/// the kernel's `nr_open` when the hard limit is infinite (setrlimit refuses more).
fn nofile_ceiling(hard: u64) -> u64 {
    if hard != u64::MAX {
        return hard;
    }
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, for a process that holds one
/// descriptor per client (the supervisor at start-up). Best effort: on failure the
/// limit stays as it was and clients beyond it wait in the listen backlog.
pub fn raise_nofile_soft_limit() {
    let current = rustix::process::getrlimit(Resource::Nofile);
    let hard = current.maximum.unwrap_or(u64::MAX);
    let wanted = Rlimit {
        current: Some(nofile_ceiling(hard)),
        maximum: current.maximum,
    };
    if let Err(e) = rustix::process::setrlimit(Resource::Nofile, wanted) {
        tracing::warn!(error = %e, "cannot raise the descriptor limit");
    }
}

/// Descriptor 3 is the control socket; anything above it leaked from the parent.
pub(crate) fn close_inherited(report: &mut Report) -> Result<(), SandboxError> {
    close_inherited_above(3).map_err(layer("close-fds"))?;
    report.applied("close-fds");
    Ok(())
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

/// Clears the effective, permitted, inheritable and ambient sets, and the bounding set
/// when we may (`CAP_SETPCAP`: root, or any process inside its own user namespace), so
/// not even a later `execve` of a file with capabilities could regain them.
pub(crate) fn drop_caps(report: &mut Report) -> Result<(), SandboxError> {
    let caps_err = |e: caps::errors::CapsError| SandboxError::Caps(e.to_string());
    // The bounding set first: dropping from it needs CAP_SETPCAP, which the clears
    // below remove.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(caps_err)? {
        caps::clear(None, CapSet::Bounding).map_err(caps_err)?;
        report.applied("caps-bounding");
    } else {
        report.unavailable("caps-bounding", "no CAP_SETPCAP");
    }
    // Kernels before 4.3 have no ambient set; there is nothing to clear there.
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(caps_err)?;
    }
    caps::clear(None, CapSet::Inheritable).map_err(caps_err)?;
    caps::clear(None, CapSet::Effective).map_err(caps_err)?;
    caps::clear(None, CapSet::Permitted).map_err(caps_err)?;
    report.applied("caps-dropped");
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS`: no `execve` can raise privileges; also what lets an
/// unprivileged process install seccomp and Landlock.
pub(crate) fn no_new_privs(report: &mut Report) -> Result<(), SandboxError> {
    rustix::thread::set_no_new_privs(true).map_err(layer("no-new-privs"))?;
    report.applied("no-new-privs");
    Ok(())
}

/// No ptrace and no /proc/PID/mem access by other processes of the same user.
pub(crate) fn not_dumpable(report: &mut Report) -> Result<(), SandboxError> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(layer("not-dumpable"))?;
    report.applied("not-dumpable");
    Ok(())
}
