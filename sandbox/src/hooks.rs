//! Test hooks, compiled only with the `test-hooks` feature: lets a system test check
//! that a worker's seccomp filter really kills it.
//!
//! Runs in a worker right after its filter is installed. The only input is the
//! worker's own environment, which the supervisor (under test) controls.

use bulkhead_ipc::wire::WorkerKind;

use crate::FORBIDDEN_SYSCALL_ENV;

/// If [`FORBIDDEN_SYSCALL_ENV`] names this worker's kind, creates a TCP socket: no
/// worker may create sockets, so the filter kills the process with SIGSYS and this
/// function does not return.
pub(crate) fn forbidden_syscall_if_asked(kind: WorkerKind) {
    if std::env::var(FORBIDDEN_SYSCALL_ENV).ok().as_deref() != Some(kind.as_str()) {
        return;
    }
    tracing::warn!(worker = %kind, "test hook: making a forbidden system call (socket)");
    // SAFETY: socket() takes no pointers; if it ever returns a descriptor, it is closed
    // right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    tracing::error!(worker = %kind, fd, "test hook: forbidden system call returned");
    if fd >= 0 {
        // SAFETY: fd was just returned by socket() and is owned by nobody else.
        unsafe { libc::close(fd) };
    }
}
