//! Block node drivers and the narrow I/O interface every node is reached through.
//!
//! Runs inside driver workers (one per driver kind or per image, see the supervisor's
//! placement), except [`posix`] and [`lock`], which the supervisor uses to open and lock
//! image files. The drivers here never open paths: the supervisor opens image files and
//! passes descriptors in. Export workers and other drivers reach a node only through
//! [`BlockIo`], whether the node lives in the same process or behind a shared-memory
//! data channel to another worker, so drivers and exports do not depend on the
//! transport.
//!
//! # Layout
//! - [`io`]: the [`BlockIo`] trait, its error type and block-status extents.
//! - [`config`]: serde driver configurations ([`DriverConfig`]) and their validation.
//! - [`file`], [`raw`], [`null`]: the drivers; [`node`]: the generic option layer
//!   (read-only, detect-zeroes, discard, no-flush) around each of them.
//! - [`slot`]: a node whose implementation `blockdev-reopen` can replace under load.
//! - [`stats`]: per-node counters, write threshold and write notifiers, which
//!   [`node::Node`] updates for every request.
//! - [`threads`]: the start-up I/O threads that run blocking syscalls.
//! - [`posix`], [`lock`]: supervisor side, opening images and QEMU-compatible locking.
//! - [`open`]: the single entry point a driver worker calls.

pub mod config;
pub mod file;
pub mod io;
pub mod lock;
pub mod mapped;
pub mod node;
pub mod null;
pub mod posix;
pub mod raw;
pub mod slot;
pub mod stats;
pub mod threads;

use std::os::fd::OwnedFd;
use std::sync::Arc;

pub use config::DriverConfig;
pub use io::{
    BlockIo, Extent, IoBuffer, IoError, IoFuture, IoResult, SparseFuture, SparseReadError,
    WriteFlags, ZeroFlags,
};

/// Why a worker could not open a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The options are a combination qsd refuses (text is qsd's).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// `file`/`host_device` without an fd.
    #[error("the {0} driver needs an image descriptor")]
    MissingFd(&'static str),
    /// `raw` without a child node.
    #[error("the raw driver needs a child node")]
    MissingChild,
    /// An fd or child was passed to a driver that takes none.
    #[error("the {0} driver takes no descriptor or child")]
    Unexpected(&'static str),
    /// The fd is unusable for the driver.
    #[error(transparent)]
    File(#[from] file::FileOpenError),
    /// The raw window does not fit its child (text is qsd's).
    #[error(transparent)]
    Raw(#[from] raw::RawOpenError),
}

/// Opens a node with counters nobody else reads; see [`open_with`].
pub fn open(
    config: DriverConfig,
    fd: Option<OwnedFd>,
    child: Option<Arc<dyn BlockIo>>,
) -> Result<Arc<dyn BlockIo>, OpenError> {
    open_with(config, fd, child, stats::Accounting::default())
}

/// Opens a node in a driver worker: the driver for `config`, on `fd` (file and
/// host_device) or over `child` (raw), wrapped in the generic option layer
/// ([`node::Node`]) that records into `accounting`.
pub fn open_with(
    config: DriverConfig,
    fd: Option<OwnedFd>,
    child: Option<Arc<dyn BlockIo>>,
    accounting: stats::Accounting,
) -> Result<Arc<dyn BlockIo>, OpenError> {
    config.validate()?;
    let name = config.driver_name();
    let common = *config.common();
    let (driver, native_write_zeroes): (Arc<dyn BlockIo>, bool) = match (config, fd, child) {
        (DriverConfig::File(c), Some(fd), None) => (
            Arc::new(file::FileDriver::new(fd, file::FileKind::File, &c)?),
            true,
        ),
        (DriverConfig::HostDevice(c), Some(fd), None) => (
            Arc::new(file::FileDriver::new(fd, file::FileKind::HostDevice, &c)?),
            true,
        ),
        (DriverConfig::File(_) | DriverConfig::HostDevice(_), None, _) => {
            return Err(OpenError::MissingFd(name));
        }
        (DriverConfig::Raw(c), None, Some(child)) => {
            (Arc::new(raw::RawDriver::new(&c, child)?), true)
        }
        (DriverConfig::Raw(_), _, None) => return Err(OpenError::MissingChild),
        (DriverConfig::NullCo(c) | DriverConfig::NullAio(c), None, None) => {
            (Arc::new(null::NullDriver::new(&c)), false)
        }
        _ => return Err(OpenError::Unexpected(name)),
    };
    // The native drivers (file, host_device, raw) zero and discard; null does neither.
    // Only file-posix counts its discards.
    let caps = node::Capabilities {
        write_zeroes: native_write_zeroes,
        discard: native_write_zeroes,
        discard_stats: matches!(name, "file" | "host_device"),
    };
    Ok(Arc::new(node::Node::new(driver, common, caps, accounting)))
}
