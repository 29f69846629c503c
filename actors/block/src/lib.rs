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
//! - [`driver`]: the [`driver::BlockDriver`] trait every driver module implements;
//!   [`registry`]: the list of driver modules, which derives [`DriverKind`] and
//!   [`DriverConfig`]; [`config`]: the generic options every configuration shares.
//! - [`file`], [`raw`], [`null`], [`qcow2`]: the drivers; [`node`]: the generic option layer
//!   (read-only, detect-zeroes, discard, no-flush) around each of them.
//! - [`slot`]: a node whose implementation `blockdev-reopen` can replace under load.
//! - [`stats`]: per-node counters, write threshold and write notifiers, which
//!   [`node::Node`] updates for every request.
//! - [`threads`]: the start-up I/O threads that run blocking syscalls.
//! - [`posix`], [`lock`]: supervisor side, opening images and QEMU-compatible locking.
//! - [`open`]: the single entry point a driver worker calls.

pub mod cbw;
pub mod compress;
pub mod config;
pub mod cor;
pub mod driver;
pub mod file;
pub mod io;
pub mod lock;
pub mod mapped;
pub mod mirror;
pub mod node;
pub mod null;
pub mod posix;
pub mod qcow2;
pub mod raw;
pub mod registry;
pub mod slot;
pub mod snapshot_access;
pub mod stats;
pub mod threads;

use std::os::fd::OwnedFd;
use std::sync::Arc;

pub use config::DriverConfig;
pub use driver::ChildRole;
pub use io::{
    BitmapEntry, BlockIo, DirtyBitmap, Extent, FormatInfo, IoBuffer, IoError, IoFuture, IoResult,
    MapKind, MapRun, SnapshotEntry, SnapshotRequest, SparseFuture, SparseReadError, StoredBitmap,
    StoredBitmaps, WriteFlags, ZeroFlags,
};
pub use registry::DriverKind;

/// Why a worker could not open a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The options are a combination qsd refuses (text is qsd's).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A driver on an image file without its descriptor.
    #[error("the {0} driver needs an image descriptor")]
    MissingFd(&'static str),
    /// A driver that needs a child node got none.
    #[error("the driver needs a child node")]
    MissingChild,
    /// A descriptor was passed to a driver that takes none.
    #[error("the {0} driver takes no descriptor")]
    Unexpected(&'static str),
    /// The children do not match the driver's slots.
    #[error(transparent)]
    Roles(#[from] driver::RoleError),
    /// The fd is unusable for the driver.
    #[error(transparent)]
    File(#[from] file::FileOpenError),
    /// The raw window does not fit its child (text is qsd's).
    #[error(transparent)]
    Raw(#[from] raw::RawOpenError),
    /// The image refuses to open (a format's header or tables); the text is QEMU's
    /// for the same condition.
    #[error("{0}")]
    Image(String),
    /// The image names an external data file, which its options did not give: the
    /// supervisor opens the file it names (after its checks) and opens the node again
    /// with it. The name comes from the image.
    #[error("the image needs its data file '{0}'")]
    NeedsDataFile(String),
    /// A driver that needs the worker's executor was opened outside one.
    #[error("the driver must be opened on the worker's executor")]
    NoRuntime,
}

/// Opens a node with counters nobody else reads; see [`open_with`].
pub async fn open(
    config: DriverConfig,
    fd: Option<OwnedFd>,
    children: Vec<(ChildRole, Arc<dyn BlockIo>)>,
) -> Result<Arc<dyn BlockIo>, OpenError> {
    open_with(config, fd, children, stats::Accounting::default()).await
}

/// Opens a node in a driver worker: the driver for `config`, on `fd` (drivers on an
/// image file) and over its `children`, wrapped in the generic option layer
/// ([`node::Node`]) that records into `accounting`.
pub async fn open_with(
    config: DriverConfig,
    fd: Option<OwnedFd>,
    children: Vec<(ChildRole, Arc<dyn BlockIo>)>,
    accounting: stats::Accounting,
) -> Result<Arc<dyn BlockIo>, OpenError> {
    config.validate()?;
    let info = config.kind().info();
    let roles: Vec<ChildRole> = children.iter().map(|(r, _)| *r).collect();
    driver::check_roles(info, &roles)?;
    if fd.is_some() && !info.is_posix() {
        return Err(OpenError::Unexpected(info.name));
    }
    let children = driver::Children::new(children).with_events(accounting.image_events.clone());
    let io = config.open_driver(fd, children).await?;
    Ok(Arc::new(node::Node::new(
        io,
        *config.common(),
        info.caps,
        accounting,
    )))
}
