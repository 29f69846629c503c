//! System calls every worker needs once it serves: the tokio runtime (epoll, futex,
//! timers), memory allocation, logging to stderr, the control channel (seqpacket with
//! descriptors) and data channels (shared-memory rings with eventfd doorbells and a liveness socket), thread exit at shutdown.
//!
//! Part of the seccomp policy installed in every worker (see the parent module). The
//! runtime, the I/O threads and the logger exist before the filter, so what they need
//! only to start (epoll_create1, eventfd2, opening files) is not here.

use super::{Table, arg_clear, arg_in, arg_set, sys};

/// `FIONBIO`: std's `set_nonblocking` on a received socket.
pub const FIONBIO: u64 = 0x5421;
/// `FIOCLEX`: std's `set_cloexec`.
pub const FIOCLEX: u64 = 0x5451;

/// The common lines.
pub fn table() -> Table {
    Ok(vec![
        // Reading and writing byte streams.
        sys!(
            SYS_read,
            "tokio: eventfd wake-ups; data channels and NBD streams (read)"
        ),
        sys!(
            SYS_write,
            "tokio: eventfd wake-ups; tracing to stderr; data channels (write)"
        ),
        sys!(SYS_readv, "tokio/std vectored reads on streams"),
        sys!(
            SYS_writev,
            "tokio/std vectored writes: data-channel header + payload"
        ),
        sys!(
            SYS_recvmsg,
            "ipc::fd: control channel receive with SCM_RIGHTS"
        ),
        sys!(SYS_sendmsg, "ipc::fd: control channel send"),
        sys!(SYS_recvfrom, "std UnixStream/TcpStream recv, peek"),
        sys!(SYS_sendto, "std send on sockets (MSG_NOSIGNAL)"),
        sys!(
            SYS_close,
            "dropping descriptors: sockets, removed nodes' images"
        ),
        sys!(
            SYS_shutdown,
            "closing a data channel or NBD connection half"
        ),
        // The tokio runtime.
        #[cfg(target_arch = "x86_64")]
        sys!(SYS_epoll_wait, "tokio/mio: I/O driver poll"),
        sys!(
            SYS_epoll_pwait,
            "tokio/mio: I/O driver poll (epoll_pwait variant)"
        ),
        sys!(
            SYS_epoll_pwait2,
            "tokio/mio: I/O driver poll (epoll_pwait2 variant)"
        ),
        sys!(
            SYS_epoll_ctl,
            "tokio/mio: registering sockets received at run time"
        ),
        sys!(
            SYS_futex,
            "parking runtime and I/O threads; Mutex/Condvar; mpsc"
        ),
        sys!(SYS_sched_yield, "tokio worker spinning; std spin loops"),
        sys!(
            SYS_clock_gettime,
            "Instant::now when the vDSO falls back to the syscall"
        ),
        sys!(
            SYS_clock_nanosleep,
            "std::thread::sleep (not used on hot paths)"
        ),
        sys!(SYS_nanosleep, "std::thread::sleep on older C libraries"),
        sys!(
            SYS_getrandom,
            "std HashMap RandomState keys on a thread's first map"
        ),
        sys!(SYS_gettid, "tracing/thread ids; C library internals"),
        sys!(SYS_getpid, "C library: raise() and abort()"),
        // Memory.
        sys!(SYS_brk, "malloc: main arena growth"),
        sys!(SYS_mmap if arg_clear(2, libc::PROT_EXEC as u64)?, "malloc arenas, large buffers; never executable"),
        sys!(SYS_mprotect if arg_clear(2, libc::PROT_EXEC as u64)?, "malloc arena growth, thread stack guards; never executable"),
        sys!(SYS_munmap, "freeing large buffers, thread stacks at exit"),
        sys!(SYS_mremap, "realloc of large buffers"),
        sys!(SYS_madvise if arg_in(2, &[libc::MADV_DONTNEED as u64, libc::MADV_FREE as u64, libc::MADV_REMOVE as u64])?, "malloc trimming, thread stack release at exit; ipc::data: an idle pool's pages given back (MADV_REMOVE)"),
        // Signals and threads.
        sys!(SYS_rt_sigprocmask, "C library: thread start/exit, abort()"),
        sys!(SYS_rt_sigreturn, "returning from a signal handler"),
        sys!(
            SYS_sigaltstack,
            "std: stack-overflow handler stack at thread start/exit"
        ),
        sys!(SYS_tgkill if arg_in(2, &[libc::SIGABRT as u64])?, "abort() after a double panic: SIGABRT to ourselves only"),
        sys!(SYS_clone if arg_set(0, libc::CLONE_THREAD as u64)?, "threads only (tokio blocking pool, if ever used); never fork"),
        sys!(SYS_set_robust_list, "C library: start of a new thread"),
        sys!(SYS_rseq, "C library: start of a new thread"),
        sys!(SYS_prctl if arg_in(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64])?, "naming a new thread"),
        sys!(
            SYS_sched_getaffinity,
            "C library: thread start, std available_parallelism"
        ),
        sys!(SYS_exit, "a thread ends (runtime shutdown)"),
        sys!(SYS_exit_group, "the worker ends"),
        sys!(SYS_restart_syscall, "kernel restarting an interrupted call"),
        // Descriptors.
        sys!(SYS_fcntl if arg_in(1, &[
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_DUPFD_CLOEXEC as u64,
            libc::F_GET_SEALS as u64,
        ])?, "ipc::fd: descriptor flags, O_NONBLOCK, dup above stdio; ipc::data: check a channel region's seals before mapping it"),
        sys!(
            SYS_fstat,
            "ipc::data: check a channel region's size before mapping it"
        ),
        sys!(SYS_ioctl if arg_in(1, &[FIONBIO, FIOCLEX])?, "std set_nonblocking / set_cloexec on received sockets"),
    ])
}
