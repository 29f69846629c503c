//! The one error type of the system-test harness.
//!
//! Runs in the test process only. The texts end up in test failure messages, so each
//! variant carries what a person needs to act on it (paths, the daemon's stderr).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the harness can fail on.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The bulkhead binary is not where we looked.
    #[error(
        "bulkhead binary not found at {path} (set BULKHEAD_BIN, or run `cargo build --workspace` \
         so that target/<profile>/bulkhead exists)"
    )]
    BulkheadMissing {
        /// Where we looked.
        path: PathBuf,
    },
    /// qemu-storage-daemon is not installed.
    #[error("qemu-storage-daemon not found at {path} (install qemu-utils 10.0.2, or set QSD_BIN)")]
    QsdMissing {
        /// Where we looked.
        path: PathBuf,
    },
    /// `BULKHEAD_DIFF_AGAINST` holds something we do not understand.
    #[error("BULKHEAD_DIFF_AGAINST={value:?}: expected \"bulkhead\" or \"qsd\"")]
    BadDaemonChoice {
        /// The variable's value.
        value: String,
    },
    /// A temporary directory could not be made.
    #[error("cannot create a temporary directory under {base}")]
    TempDir {
        /// The parent directory.
        base: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The daemon exited before its QMP sockets appeared.
    #[error(
        "{daemon} exited ({status}) before its QMP socket {socket} appeared; stderr:\n{stderr}"
    )]
    ExitedEarly {
        /// Which daemon.
        daemon: String,
        /// The socket we waited for.
        socket: PathBuf,
        /// How it exited.
        status: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// The daemon did not create a QMP socket in time.
    #[error(
        "{daemon} did not create its QMP socket {socket} within {timeout:?}; stderr:\n{stderr}"
    )]
    SocketTimeout {
        /// Which daemon.
        daemon: String,
        /// The socket we waited for.
        socket: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// What it wrote to stderr so far.
        stderr: String,
    },
    /// Connecting to a QMP socket failed.
    #[error("cannot connect to QMP socket {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No complete line arrived in time.
    #[error("no complete QMP line within {timeout:?} (partial line so far: {partial:?})")]
    ReadTimeout {
        /// How long we waited.
        timeout: Duration,
        /// Bytes received without a line end.
        partial: String,
    },
    /// The daemon closed the connection.
    #[error("the daemon closed the QMP connection (partial line: {partial:?})")]
    Eof {
        /// Bytes received without a line end.
        partial: String,
    },
    /// Socket or file I/O failed.
    #[error("I/O error while {doing}")]
    Io {
        /// What the harness was doing.
        doing: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A QMP line was not what the protocol promises.
    #[error("unexpected QMP line {line:?}: {reason}")]
    Unexpected {
        /// The line.
        line: String,
        /// What was wrong with it.
        reason: String,
    },
    /// An external tool (losetup, qemu-img, ...) failed.
    #[error("{program} {args:?} failed: {detail}")]
    Tool {
        /// The tool.
        program: String,
        /// Its arguments.
        args: Vec<String>,
        /// Exit status and stderr.
        detail: String,
    },
}

impl HarnessError {
    /// Wraps an `io::Error` with what we were doing when it happened.
    pub fn io(doing: impl Into<String>, source: io::Error) -> Self {
        HarnessError::Io {
            doing: doing.into(),
            source,
        }
    }
}
