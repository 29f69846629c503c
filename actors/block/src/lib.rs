//! Block node drivers and the narrow I/O interface every node is reached through.
//!
//! Runs inside driver workers (one worker process per driver kind). The drivers here
//! never open paths: the supervisor opens image files and passes descriptors in.
//! Export workers and other drivers reach a node only through [`BlockIo`], whether the
//! node lives in the same process or behind a data channel to another worker, so the
//! transport under it can change (socket today, shared-memory rings later) without
//! touching drivers or exports.
//!
//! # Layout
//! - [`io`]: the [`BlockIo`] trait, its error type and block-status extents.

pub mod config;
pub mod io;

pub use io::{BlockIo, Extent, IoError, IoFuture, IoResult, WriteFlags, ZeroFlags};

/// Why a node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The driver is not available in this build.
    #[error("driver not available")]
    Unavailable,
}

/// Opens a node from its config, its image descriptor (file drivers) and its child
/// (format drivers). Placeholder until the drivers land.
pub fn open(
    _config: config::DriverConfig,
    _fd: Option<std::os::fd::OwnedFd>,
    _child: Option<std::sync::Arc<dyn BlockIo>>,
) -> Result<std::sync::Arc<dyn BlockIo>, OpenError> {
    Err(OpenError::Unavailable)
}
