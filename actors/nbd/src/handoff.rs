//! Handing a negotiated connection to another server (`--isolation image`).
//!
//! Runs in NBD worker processes. The listener's server negotiates every client
//! against metadata-only exports ([`MetadataOnly`]: a size and a read-only bit, no
//! data path) and, instead of serving, passes the socket and what was negotiated
//! ([`HandOff`]) to its [`HandOffHook`]. The server that holds the export's real
//! backend takes the connection over with [`crate::NbdServer::adopt_unix`] (or
//! `adopt_tcp`) and runs the transmission phase. Plain data only: the worker maps
//! it to its own wire types.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;

use bulkhead_block::{BlockIo, Extent, IoError, IoFuture, WriteFlags, ZeroFlags};

pub use crate::handshake::Mode;

/// Most bytes of a final negotiation reply (EXPORT_NAME: size, flags, 124 zeroes).
pub const MAX_REPLY: usize = 134;
/// Most bytes a client may have sent past its GO that travel with the hand-off (the
/// negotiation read buffer).
pub const MAX_LEFTOVER: usize = crate::conn::HANDSHAKE_BUF;

/// What a finished negotiation leaves for the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOff {
    /// The NBD name of the export the client chose.
    pub export: String,
    /// The reply format negotiated.
    pub mode: Mode,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
    /// `qemu:allocation-depth` was selected for this export.
    pub allocation_depth: bool,
    /// The export's bitmaps selected (`qemu:dirty-bitmap:NAME`), as indexes into
    /// its [`crate::ExportConfig::bitmaps`], ascending; at most
    /// [`crate::server::MAX_EXPORT_BITMAPS`].
    pub bitmaps: Vec<u32>,
    /// The final reply (GO's ACK or EXPORT_NAME's export data), not sent yet: the
    /// adopting server sends it once the client holds a `max-connections` slot.
    pub reply: Vec<u8>,
    /// Bytes the client sent after its final option that the listener had read
    /// already (pipelined requests); the adopting server reads them first.
    pub leftover: Vec<u8>,
}

impl HandOff {
    /// Whether the sizes are within what a real negotiation produces.
    pub fn is_bounded(&self) -> bool {
        self.export.len() <= crate::proto::MAX_STRING_SIZE
            && self.reply.len() <= MAX_REPLY
            && self.leftover.len() <= MAX_LEFTOVER
            && self.bitmaps.len() <= crate::server::MAX_EXPORT_BITMAPS
    }
}

/// Called by a listener's server for every negotiated client, with the client's
/// socket; the connection counts as open (server shutdown waits) until the
/// returned future resolves. Dropping the descriptor without passing it on closes
/// the client.
pub type HandOffHook =
    Arc<dyn Fn(HandOff, OwnedFd) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The backend of a metadata-only export: what negotiation needs (size and whether
/// it is read-only), and no data path at all. Every I/O request fails; none is ever
/// made, since the listener hands each client off before its first request.
#[derive(Debug, Clone, Copy)]
pub struct MetadataOnly {
    /// The exported node's size.
    pub size: u64,
    /// The export is read-only.
    pub read_only: bool,
}

impl BlockIo for MetadataOnly {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, _offset: u64, _buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    fn write<'a>(&'a self, _offset: u64, _buf: &'a [u8], _flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    fn block_status(&self, _offset: u64, _len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async { Err(IoError::Unsupported) })
    }
}
