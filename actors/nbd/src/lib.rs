//! NBD server library with qemu-storage-daemon 10.0.2's wire behaviour.
//!
//! Runs inside the NBD export worker process, on its tokio runtime. It speaks
//! fixed-newstyle NBD to untrusted clients (simple, structured and extended
//! replies; `base:allocation`, `qemu:allocation-depth` and
//! `qemu:dirty-bitmap:NAME` meta contexts) and reaches each exported node only
//! through [`bulkhead_block::BlockIo`], and its dirty bitmaps only through
//! [`DirtyRuns`]. The worker
//! wraps an [`NbdServer`]: it adds and removes exports as the supervisor asks,
//! and hands in listeners or accepted sockets.
//!
//! # Layout
//! - [`server`]: [`NbdServer`], export table, connection limit, removal, shutdown.
//! - `handshake`: option negotiation (untrusted bytes).
//! - `conn`: transmission phase: request parsing (untrusted bytes), request
//!   tasks, replies. Requests run through the front-independent executor of
//!   `bulkhead-export`, which also holds the in-flight bound, the buffer budgets and
//!   each export's attach/removal lifecycle.
//! - [`handoff`]: negotiating in one server and serving in another.
//! - [`proto`]: wire constants and header codecs.
//!
//! Not supported: TLS (STARTTLS is refused with qsd's "TLS not configured"),
//! NBD_CMD_RESIZE.

mod conn;
pub mod handoff;
mod handshake;
pub mod proto;
pub mod server;
/// In-memory export backend for tests and the fuzzer (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use conn::CONN_BUFFER_BYTES;
pub use handoff::{HandOff, HandOffHook, MetadataOnly, Mode};
pub use server::EXPORT_BUFFER_BYTES;
pub use server::{
    DirtyRuns, ExportBitmap, ExportConfig, ExportError, ExportRemoval, NbdServer, RemoveMode,
    ServerConfig,
};
