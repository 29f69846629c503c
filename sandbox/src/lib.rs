//! The worker sandbox: what a worker does to itself before it serves anything.
//!
//! Runs in every worker process. [`apply_early`] runs on the main thread before any
//! other thread or runtime exists, so every thread created later inherits what it sets
//! (namespaces, capabilities, `no_new_privs`, Landlock). [`apply_late`] runs once the
//! runtime and the I/O threads exist, and installs the seccomp allow-list on every
//! thread at once (TSYNC). No untrusted bytes are handled here; the point is to limit
//! what the code that does handle them (NBD clients, other workers' messages) can do.
//!
//! Each layer that is applied is reported back to the supervisor by name, so the
//! supervisor can say what actually holds rather than what was hoped for. A layer the
//! kernel does not offer is reported as `unavailable:<layer>:<reason>` and the worker
//! carries on with the others: a stock distribution kernel that forbids unprivileged
//! user namespaces must not stop the daemon from starting.
//!
//! `BULKHEAD_SANDBOX=off` in a worker's environment turns every layer off (for
//! debugging; the supervisor warns), and `BULKHEAD_SANDBOX=log` applies every layer
//! but makes the seccomp filter log forbidden calls instead of killing the worker.
#![warn(missing_docs)]

mod early;
#[cfg(feature = "test-hooks")]
mod hooks;
mod lsm;
mod namespaces;
pub mod policy;

use bulkhead_ipc::wire::WorkerKind;

pub use early::raise_nofile_soft_limit;
pub use policy::{apply_seccomp, seccomp_program};

/// Highest number of open descriptors a worker may hold (crosvm uses 4096).
pub const WORKER_NOFILE: u64 = 4096;

/// The environment variable that switches the sandbox (`off`, `log`; anything else or
/// unset means on).
pub const SANDBOX_ENV: &str = "BULKHEAD_SANDBOX";

/// The environment variable read by the `test-hooks` build: a worker whose kind it
/// names issues a forbidden system call right after its seccomp filter is in place.
pub const FORBIDDEN_SYSCALL_ENV: &str = "BULKHEAD_TEST_FORBIDDEN_SYSCALL";

/// The single entry reported when the sandbox is switched off.
pub const OFF: &str = "off";

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
    /// Dropping capabilities failed.
    #[error("sandbox layer caps-dropped: {0}")]
    Caps(String),
    /// The seccomp filter could not be built from its rules (a bug in a policy table).
    #[error("seccomp policy for {kind}: {detail}")]
    Policy {
        /// The worker kind whose policy is wrong.
        kind: WorkerKind,
        /// What seccompiler said.
        detail: String,
    },
    /// The kernel refused the seccomp filter.
    #[error("sandbox layer seccomp: {0}")]
    Seccomp(String),
}

fn layer(layer: &'static str) -> impl FnOnce(rustix::io::Errno) -> SandboxError {
    move |errno| SandboxError::Layer { layer, errno }
}

/// How the sandbox is switched for this worker, from [`SANDBOX_ENV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every layer, seccomp violations kill the worker (the default).
    On,
    /// Every layer, but seccomp violations are logged by the kernel and allowed.
    Log,
    /// No layer at all (only the parent-death signal, which is not a sandbox layer).
    Off,
}

impl Mode {
    /// The mode named by an environment value (`None` when unset).
    pub fn from_env_value(value: Option<&str>) -> Mode {
        match value {
            Some("off") => Mode::Off,
            Some("log") => Mode::Log,
            _ => Mode::On,
        }
    }

    /// The mode this process runs in.
    pub fn current() -> Mode {
        let value = std::env::var(SANDBOX_ENV).ok();
        Mode::from_env_value(value.as_deref())
    }
}

/// The list of layers sent to the supervisor in `Ready { sandbox }`.
#[derive(Debug, Default)]
pub(crate) struct Report(Vec<String>);

impl Report {
    fn applied(&mut self, layer: &str) {
        self.0.push(layer.to_string());
    }

    fn unavailable(&mut self, layer: &str, reason: impl std::fmt::Display) {
        tracing::warn!(layer, %reason, "sandbox layer unavailable");
        self.0.push(format!("unavailable:{layer}:{reason}"));
    }
}

/// Applies the layers that must come before any thread exists, in this order:
/// rlimits, inherited descriptors, namespaces with an empty root, capabilities,
/// `no_new_privs`, not dumpable, Landlock. Returns the layers applied and the ones the
/// kernel did not offer. Call it on the main thread of a single-threaded process.
pub fn apply_early(kind: WorkerKind) -> Result<Vec<String>, SandboxError> {
    apply_early_in(kind, Mode::current())
}

/// [`apply_early`] with an explicit mode.
pub fn apply_early_in(kind: WorkerKind, mode: Mode) -> Result<Vec<String>, SandboxError> {
    let mut report = Report::default();
    if mode == Mode::Off {
        tracing::warn!(worker = %kind, "sandbox switched off ({SANDBOX_ENV}=off)");
        report.applied(OFF);
        return Ok(report.0);
    }
    early::rlimits(kind, &mut report)?;
    early::close_inherited(&mut report)?;
    namespaces::enter(&mut report);
    early::drop_caps(&mut report)?;
    early::no_new_privs(&mut report)?;
    early::not_dumpable(&mut report)?;
    lsm::landlock(&mut report);
    Ok(report.0)
}

/// Installs the seccomp filter of `kind` on every thread (unless the sandbox is off)
/// and adds `seccomp` to `layers`. Call it once the runtime and the I/O threads exist
/// and before serving any request. With the `test-hooks` feature, this is also where a
/// worker named by [`FORBIDDEN_SYSCALL_ENV`] makes a forbidden call and dies.
pub fn apply_late(kind: WorkerKind, layers: &mut Vec<String>) -> Result<(), SandboxError> {
    let mode = Mode::current();
    if mode == Mode::Off {
        return Ok(());
    }
    match policy::apply(kind, mode == Mode::Log) {
        Ok(()) => layers.push(if mode == Mode::Log {
            "seccomp-log".to_string()
        } else {
            "seccomp".to_string()
        }),
        Err(policy::ApplyError::Unsupported(reason)) => {
            let mut report = Report::default();
            report.unavailable("seccomp", reason);
            layers.extend(report.0);
        }
        Err(policy::ApplyError::Failed(e)) => return Err(e),
    }
    #[cfg(feature = "test-hooks")]
    hooks::forbidden_syscall_if_asked(kind);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_is_on_unless_the_environment_says_off_or_log() {
        assert_eq!(Mode::from_env_value(None), Mode::On);
        assert_eq!(Mode::from_env_value(Some("on")), Mode::On);
        assert_eq!(Mode::from_env_value(Some("OFF")), Mode::On);
        assert_eq!(Mode::from_env_value(Some("")), Mode::On);
        assert_eq!(Mode::from_env_value(Some("off")), Mode::Off);
        assert_eq!(Mode::from_env_value(Some("log")), Mode::Log);
    }

    #[test]
    fn the_sandbox_switched_off_reports_only_off() {
        let layers = apply_early_in(
            WorkerKind::Driver(bulkhead_ipc::wire::DriverKind::Raw),
            Mode::Off,
        )
        .ok();
        assert_eq!(layers, Some(vec!["off".to_string()]));
    }

    #[test]
    fn an_unavailable_layer_is_reported_with_its_reason() {
        let mut report = Report::default();
        report.applied("netns");
        report.unavailable("userns", rustix::io::Errno::PERM);
        assert_eq!(
            report.0,
            [
                "netns",
                "unavailable:userns:Operation not permitted (os error 1)"
            ]
        );
    }
}
