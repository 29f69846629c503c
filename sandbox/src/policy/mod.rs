//! Seccomp allow-lists, one per worker kind, built at run time from the Rust tables in
//! this module's children.
//!
//! Runs in every worker, once, after the tokio runtime and the I/O threads exist: the
//! filter goes onto every thread at once (TSYNC) and any call outside the list kills the
//! whole process (`SECCOMP_RET_KILL_PROCESS`, the worker dies of SIGSYS), so a
//! compromised worker can neither carry on half-alive nor try again. The supervisor
//! sees the death and replaces the worker.
//!
//! A policy is the common list ([`common`]: runtime, logging, control and data
//! channels) plus the kind's own list ([`file`] for `file` and `host_device`, [`raw`],
//! [`null`], [`nbd`]). Every line allows one system call, names the code path that
//! needs it, and restricts its arguments where that is cheap: `ioctl` per request,
//! `mmap`/`mprotect` never with `PROT_EXEC`, `clone` only for threads, `fcntl` per
//! command. Nothing opens a path, creates a socket or executes a program.
//!
//! A few calls are answered with an error instead of killing, by a first, separate
//! filter ([`ERRNO_CALLS`]), because code we do not control makes them on paths we
//! cannot rule out, and handles the error: `clone3` (its flags sit behind a pointer, so
//! it cannot be checked; `ENOSYS` makes the C library fall back to `clone`, whose flags
//! the allow-list checks) and `open`/`openat` (glibc's malloc reads
//! `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's heap; `ENOENT`
//! is what it would get in the empty root anyway). The allow-list lets these calls
//! through to the first filter's answer: with two filters the kernel takes the
//! stricter result, so they never reach the kernel proper.

pub mod common;
pub mod file;
pub mod nbd;
pub mod null;
pub mod qcow2;
pub mod raw;

use std::collections::BTreeMap;

use bulkhead_ipc::wire::{DriverKind, WorkerKind};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::SandboxError;

/// One allowed system call.
pub struct Allowed {
    /// The system call number (`libc::SYS_*` of the build target).
    pub nr: i64,
    /// Its name, for reports and tests.
    pub name: &'static str,
    /// Argument filters, any of which allows the call; empty means any arguments.
    pub when: Vec<SeccompRule>,
    /// The code path that needs it.
    pub why: &'static str,
}

/// A policy table, or the seccompiler error of a malformed argument filter.
pub type Table = Result<Vec<Allowed>, seccompiler::BackendError>;

/// Builds an [`Allowed`] line: `sys!(SYS_read, "why")` or
/// `sys!(SYS_ioctl if rules, "why")`.
macro_rules! sys {
    ($sys:ident, $why:literal) => {
        $crate::policy::Allowed {
            nr: libc::$sys,
            name: $crate::policy::strip_sys(stringify!($sys)),
            when: Vec::new(),
            why: $why,
        }
    };
    ($sys:ident if $rules:expr, $why:literal) => {
        $crate::policy::Allowed {
            nr: libc::$sys,
            name: $crate::policy::strip_sys(stringify!($sys)),
            when: $rules,
            why: $why,
        }
    };
}
pub(crate) use sys;

#[doc(hidden)]
pub const fn strip_sys(name: &'static str) -> &'static str {
    match name.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(s) => s,
            Err(_) => name,
        },
        _ => name,
    }
}

/// Allows the call when argument `arg` equals one of `values` (compared on the low 32
/// bits, as the kernel does for `int` and `unsigned int` arguments such as ioctl
/// requests and fcntl commands).
pub(crate) fn arg_in(
    arg: u8,
    values: &[u64],
) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )?])
        })
        .collect()
}

/// Allows the call when every bit of `mask` is clear in argument `arg`.
pub(crate) fn arg_clear(arg: u8, mask: u64) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )?])?])
}

/// Allows the call when every bit of `mask` is set in argument `arg`.
pub(crate) fn arg_set(arg: u8, mask: u64) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        mask,
    )?])?])
}

/// Builds one policy's own lines.
pub type PolicyFn = fn() -> Table;

/// The policies a driver's [`DriverInfo::policy`](bulkhead_ipc::wire::DriverKind)
/// may name, with their tables. A new driver whose code makes calls no policy here
/// allows brings a module of its own and a line here.
pub const POLICIES: &[(&str, PolicyFn)] = &[
    ("file", file::table),
    ("raw", raw::table),
    ("null", null::table),
    ("qcow2", qcow2::table),
];

/// The table of the policy named `name`.
fn policy(name: &str) -> Table {
    match POLICIES.iter().find(|(n, _)| *n == name) {
        Some((_, table)) => table(),
        // A registry line naming no policy gets none (a test checks every line).
        None => Ok(Vec::new()),
    }
}

/// The full table of a worker kind: the common lines, then the kind's own.
pub fn table(kind: WorkerKind) -> Table {
    let mut lines = common::table()?;
    let mut names: Vec<&'static str> = Vec::new();
    match kind {
        WorkerKind::Driver(d) => {
            names.push(d.info().policy);
            // A format node's local protocol child (file, host_device, null) lives in
            // the format node's worker: a hop between them would isolate nothing.
            if !d.info().protocol && d.info().protocol_child {
                names.extend(protocol_policies());
            }
        }
        // An image worker hosts every driver of its image.
        WorkerKind::Image => names.extend(DriverKind::ALL.iter().map(|d| d.info().policy)),
        WorkerKind::Nbd => lines.extend(nbd::table()?),
        // Data channels and timers only: the common lines.
        WorkerKind::Jobs => {}
    }
    let mut seen: Vec<&str> = Vec::new();
    for name in names {
        if !seen.contains(&name) {
            seen.push(name);
            lines.extend(policy(name)?);
        }
    }
    Ok(lines)
}

/// The policies of the protocol drivers.
fn protocol_policies() -> impl Iterator<Item = &'static str> {
    DriverKind::ALL
        .iter()
        .filter(|d| d.info().protocol)
        .map(|d| d.info().policy)
}

/// Merges lines for the same call: any unconditional line wins, otherwise the argument
/// filters are OR-ed.
fn merge(lines: Vec<Allowed>) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut merged: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for line in lines {
        let entry = merged.entry(line.nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), line.when.is_empty()) {
            (_, true) => *entry = None,
            (Some(rules), false) => rules.extend(line.when),
            (None, false) => {}
        }
    }
    merged
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect()
}

/// The allow-list of `kind` compiled to BPF for `arch`, killing the process on any
/// other call (or only logging it when `log_only`).
pub fn seccomp_program_for(
    kind: WorkerKind,
    arch: TargetArch,
    log_only: bool,
) -> Result<BpfProgram, SandboxError> {
    let policy_err = |e: &dyn std::fmt::Display| SandboxError::Policy {
        kind,
        detail: e.to_string(),
    };
    let lines = table(kind).map_err(|e| policy_err(&e))?;
    let mismatch = if log_only {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    };
    let mut rules = merge(lines);
    // Answered by the errno filters; letting them through here keeps this filter from
    // overriding that answer with a kill.
    for &(nr, _, _, _) in ERRNO_CALLS {
        rules.insert(nr, Vec::new());
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| policy_err(&e))?;
    filter.try_into().map_err(|e| policy_err(&e))
}

/// The allow-list of `kind` for the architecture this binary runs on.
pub fn seccomp_program(kind: WorkerKind) -> Result<BpfProgram, SandboxError> {
    seccomp_program_for(kind, host_arch(kind)?, false)
}

/// Calls answered with an errno by the first filter, never executed: (number, name,
/// errno, why).
pub const ERRNO_CALLS: &[(i64, &str, i32, &str)] = &[
    (
        libc::SYS_clone3,
        "clone3",
        libc::ENOSYS,
        "flags unreadable by seccomp; the C library falls back to clone (checked)",
    ),
    (
        libc::SYS_openat,
        "openat",
        libc::ENOENT,
        "glibc malloc reads /proc/sys/vm/overcommit_memory when shrinking a heap",
    ),
    #[cfg(target_arch = "x86_64")]
    (
        libc::SYS_open,
        "open",
        libc::ENOENT,
        "as openat, for C libraries that still use open",
    ),
];

/// The filters that answer [`ERRNO_CALLS`], one per errno (a seccompiler filter has
/// one match action), each allowing everything else: the allow-list, installed with
/// them, decides about the rest.
pub fn errno_programs(arch: TargetArch) -> Result<Vec<BpfProgram>, SandboxError> {
    let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for &(nr, _, errno, _) in ERRNO_CALLS {
        by_errno.entry(errno).or_default().insert(nr, Vec::new());
    }
    by_errno
        .into_iter()
        .map(|(errno, rules)| {
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                arch,
            )
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
            filter
                .try_into()
                .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))
        })
        .collect()
}

fn host_arch(kind: WorkerKind) -> Result<TargetArch, SandboxError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Policy {
            kind,
            detail: e.to_string(),
        })
}

/// Why [`apply`] did not install the filter.
pub(crate) enum ApplyError {
    /// The kernel has no seccomp filters; the worker carries on and reports it.
    Unsupported(String),
    /// Anything else stops the worker.
    Failed(SandboxError),
}

/// Installs the errno filters and the allow-list of `kind` on every thread.
pub(crate) fn apply(kind: WorkerKind, log_only: bool) -> Result<(), ApplyError> {
    let arch = host_arch(kind).map_err(ApplyError::Failed)?;
    let mut programs = errno_programs(arch).map_err(ApplyError::Failed)?;
    programs.push(seccomp_program_for(kind, arch, log_only).map_err(ApplyError::Failed)?);
    for (index, program) in programs.iter().enumerate() {
        match seccompiler::apply_filter_all_threads(program) {
            Ok(()) => {}
            // Only the first installation can tell us the kernel lacks seccomp filters;
            // once one filter is in, any failure is a real error.
            Err(seccompiler::Error::Seccomp(e))
                if index == 0
                    && matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) =>
            {
                return Err(ApplyError::Unsupported(e.to_string()));
            }
            Err(e) => return Err(ApplyError::Failed(SandboxError::Seccomp(e.to_string()))),
        }
    }
    Ok(())
}

/// Installs the allow-list of `kind` on every thread of this process, killing the
/// process on any other call. Unlike the worker start-up ([`crate::apply_late`]) this
/// ignores `BULKHEAD_SANDBOX` and fails when the kernel has no seccomp.
pub fn apply_seccomp(kind: WorkerKind) -> Result<(), SandboxError> {
    apply(kind, false).map_err(|e| match e {
        ApplyError::Unsupported(reason) => SandboxError::Seccomp(reason),
        ApplyError::Failed(e) => e,
    })
}

// The tables use this build's libc::SYS_* numbers and the forked children run the
// filter for real, so the tests run where the build target is the filter's target.
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Calls no worker may make under any circumstance.
    const NEVER: &[(i64, &str)] = &[
        (libc::SYS_openat, "openat"),
        (libc::SYS_openat2, "openat2"),
        (libc::SYS_open, "open"),
        (libc::SYS_creat, "creat"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_socketpair, "socketpair"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_listen, "listen"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_unshare, "unshare"),
        (libc::SYS_setns, "setns"),
        (libc::SYS_io_uring_setup, "io_uring_setup"),
        (libc::SYS_memfd_create, "memfd_create"),
        (libc::SYS_process_vm_writev, "process_vm_writev"),
        (libc::SYS_unlinkat, "unlinkat"),
    ];

    fn tables() -> Vec<(WorkerKind, Vec<Allowed>)> {
        WorkerKind::all()
            .map(|k| match table(k) {
                Ok(t) => (k, t),
                Err(e) => panic!("table of {k} does not build: {e}"),
            })
            .collect()
    }

    #[test]
    fn every_driver_names_a_policy_that_exists() {
        for d in DriverKind::ALL {
            let name = d.info().policy;
            assert!(POLICIES.iter().any(|(n, _)| *n == name), "{d:?}: {name}");
        }
    }

    #[test]
    fn every_kinds_filter_compiles_for_x86_64() {
        for kind in WorkerKind::all() {
            let program = seccomp_program_for(kind, TargetArch::x86_64, false)
                .unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert!(program.len() > 50, "{kind}: {} instructions", program.len());
        }
        assert_eq!(
            errno_programs(TargetArch::x86_64).map(|p| p.len()).ok(),
            Some(2)
        );
    }

    #[test]
    fn no_table_lets_a_worker_open_files_create_sockets_or_run_programs() {
        for (kind, lines) in tables() {
            for line in &lines {
                assert!(
                    !NEVER.iter().any(|&(nr, _)| nr == line.nr),
                    "{kind} allows {}",
                    line.name
                );
            }
        }
    }

    #[test]
    fn calls_answered_with_an_errno_are_exactly_clone3_open_and_openat() {
        let names: Vec<(&str, i32)> = ERRNO_CALLS.iter().map(|c| (c.1, c.2)).collect();
        assert_eq!(
            names,
            [
                ("clone3", libc::ENOSYS),
                ("openat", libc::ENOENT),
                ("open", libc::ENOENT)
            ]
        );
    }

    #[test]
    fn only_the_nbd_worker_may_accept_connections_or_set_socket_options() {
        for (kind, lines) in tables() {
            let has = |name: &str| lines.iter().any(|l| l.name == name);
            assert_eq!(has("accept4"), kind == WorkerKind::Nbd, "{kind}");
            assert_eq!(has("setsockopt"), kind == WorkerKind::Nbd, "{kind}");
            assert!(!has("accept"), "{kind}");
        }
    }

    #[test]
    fn only_workers_hosting_protocol_nodes_may_do_file_io() {
        for (kind, lines) in tables() {
            let file = kind.does_file_io();
            // Export workers move data on mapped images, nothing more.
            let data = file || kind == WorkerKind::Nbd;
            for name in ["pread64", "pwrite64"] {
                assert_eq!(lines.iter().any(|l| l.name == name), data, "{kind} {name}");
            }
            for name in ["fallocate", "ftruncate", "fdatasync", "fsync"] {
                assert_eq!(lines.iter().any(|l| l.name == name), file, "{kind} {name}");
            }
        }
    }

    #[test]
    fn risky_calls_are_always_argument_filtered() {
        for (kind, lines) in tables() {
            for line in &lines {
                if [
                    "ioctl", "mmap", "mprotect", "clone", "fcntl", "prctl", "tgkill",
                ]
                .contains(&line.name)
                {
                    assert!(!line.when.is_empty(), "{kind}: {} unfiltered", line.name);
                }
            }
        }
    }

    #[test]
    fn every_line_says_why_and_names_its_call() {
        for (kind, lines) in tables() {
            for line in &lines {
                assert!(line.why.len() > 10, "{kind}: {}", line.name);
                assert!(!line.name.starts_with("SYS_"), "{kind}: {}", line.name);
            }
        }
        assert_eq!(strip_sys("SYS_read"), "read");
    }

    #[test]
    fn an_unconditional_line_wins_over_argument_filters_when_merged() {
        let lines = vec![
            sys!(SYS_ioctl if arg_in(1, &[1]).unwrap_or_default(), "first, filtered"),
            sys!(SYS_ioctl, "second, unconditional"),
            sys!(SYS_fcntl if arg_in(1, &[1, 2]).unwrap_or_default(), "filtered twice"),
            sys!(SYS_fcntl if arg_in(1, &[3]).unwrap_or_default(), "and once more"),
        ];
        let merged = merge(lines);
        assert_eq!(merged.get(&libc::SYS_ioctl).map(Vec::len), Some(0));
        assert_eq!(merged.get(&libc::SYS_fcntl).map(Vec::len), Some(3));
    }

    // The tests below install a filter in a forked child, which only makes raw system
    // calls (no allocation, no locks) before `_exit`, as is safe after fork in a
    // multi-threaded test process. The parent never gets a filter.

    /// What became of a child.
    #[derive(Debug, PartialEq, Eq)]
    enum End {
        Exit(i32),
        Signal(i32),
    }

    fn in_filtered_child(kind: WorkerKind, body: fn() -> i32) -> End {
        let mut programs = errno_programs(TargetArch::x86_64).unwrap_or_default();
        match seccomp_program_for(kind, TargetArch::x86_64, false) {
            Ok(p) => programs.push(p),
            Err(e) => panic!("{kind}: {e}"),
        }
        // SAFETY: the child only calls async-signal-safe functions (prctl, seccomp,
        // raw syscalls, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            for p in &programs {
                if seccompiler::apply_filter(p).is_err() {
                    // SAFETY: _exit ends the child without running the parent's atexit
                    // handlers or destructors.
                    unsafe { libc::_exit(100) };
                }
            }
            let code = body();
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; status is a valid out-pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        if libc::WIFSIGNALED(status) {
            End::Signal(libc::WTERMSIG(status))
        } else {
            End::Exit(libc::WEXITSTATUS(status))
        }
    }

    fn errno() -> i32 {
        // SAFETY: __errno_location returns this thread's errno slot.
        unsafe { *libc::__errno_location() }
    }

    #[test]
    fn a_worker_creating_a_socket_dies_of_sigsys() {
        for kind in WorkerKind::all() {
            let end = in_filtered_child(kind, || {
                // SAFETY: socket() takes no pointers.
                unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
                0
            });
            assert_eq!(end, End::Signal(libc::SIGSYS), "{kind}");
        }
    }

    #[test]
    fn allowed_calls_pass_the_filter() {
        let end = in_filtered_child(WorkerKind::Driver(DriverKind::Raw), || {
            // SAFETY: plain syscalls with valid pointers to local memory, on stderr,
            // which exists in any process.
            unsafe {
                libc::syscall(libc::SYS_gettid);
                libc::syscall(libc::SYS_sched_yield);
                let byte = 7u8;
                if libc::syscall(libc::SYS_write, 2, &byte as *const u8, 0) != 0 {
                    return 1;
                }
                if libc::syscall(libc::SYS_fcntl, 2, libc::F_GETFD) < 0 {
                    return 2;
                }
            }
            0
        });
        assert_eq!(end, End::Exit(0));
    }

    #[test]
    fn openat_fails_with_enoent_even_for_a_path_that_exists() {
        let end = in_filtered_child(WorkerKind::Driver(DriverKind::File), || {
            // SAFETY: a valid NUL-terminated path; no out-pointers.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    c"/".as_ptr(),
                    libc::O_RDONLY,
                )
            };
            if fd == -1 && errno() == libc::ENOENT {
                0
            } else {
                1
            }
        });
        assert_eq!(end, End::Exit(0));
    }

    #[test]
    fn clone3_fails_with_enosys_and_a_fork_through_clone_dies_of_sigsys() {
        let end = in_filtered_child(WorkerKind::Nbd, || {
            // SAFETY: clone3 is refused before the kernel reads the (null) argument.
            let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            if rc != -1 || errno() != libc::ENOSYS {
                return 1;
            }
            // A fork (no CLONE_THREAD): the filter kills us before a child exists.
            // SAFETY: fork-style clone with no stack and no pointers.
            unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            2
        });
        assert_eq!(end, End::Signal(libc::SIGSYS));
    }

    #[test]
    fn executable_memory_is_refused_with_sigsys() {
        let end = in_filtered_child(WorkerKind::Driver(DriverKind::NullCo), || {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            // SAFETY: anonymous mappings, no file, no fixed address.
            let plain = unsafe {
                libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    -1,
                    0,
                )
            };
            if plain < 0 {
                return 1;
            }
            // SAFETY: as above.
            unsafe {
                libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    flags,
                    -1,
                    0,
                )
            };
            2
        });
        assert_eq!(end, End::Signal(libc::SIGSYS));
    }

    #[test]
    fn an_unlisted_ioctl_request_dies_of_sigsys() {
        let end = in_filtered_child(WorkerKind::Driver(DriverKind::File), || {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 on stderr fails with ENOTTY; the pointer is valid.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_ioctl,
                    2,
                    file::BLKGETSIZE64,
                    &mut size as *mut u64,
                )
            };
            if rc != -1 {
                return 1;
            }
            let mut ws = [0u16; 4];
            // SAFETY: TIOCGWINSZ writes 8 bytes into ws.
            unsafe { libc::syscall(libc::SYS_ioctl, 2, libc::TIOCGWINSZ, ws.as_mut_ptr()) };
            2
        });
        assert_eq!(end, End::Signal(libc::SIGSYS));
    }
}
