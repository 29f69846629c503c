//! The parts of a block export that do not depend on its protocol.
//!
//! Runs inside an export worker process (today the NBD worker), on its tokio
//! runtime. A front (NBD; later vhost-user-blk, FUSE) decodes its protocol's
//! requests, runs them through this crate, and encodes the replies; it never calls
//! [`bulkhead_block::BlockIo`] itself. What lives here:
//!
//! - [`lifecycle`]: an export's attach counter, its closing flag and the removal a
//!   deferred `BLOCK_EXPORT_DELETED` waits for ([`Lifecycle`], [`Attachment`],
//!   [`Removal`]).
//! - [`memory`]: the request bounds a peer cannot exceed: requests in flight per
//!   connection, the byte budgets per connection and per export, and the pooled or
//!   backend-lent request buffers ([`ConnBounds`], [`Buf`]).
//! - [`exec`]: running a request against the node (read, sparse read, write with
//!   FUA, write-zeroes with flags, discard, flush, block status), with the errno
//!   that reaches the client and which step failed ([`Failure`]); the front picks
//!   its wire's text and error code for it.
//! - [`mapped`]: the exported node as the front sees it ([`MappedNode`]): its
//!   worker over the data channel, or, while the supervisor grants a [`Mapping`],
//!   reads and plain writes straight on the image descriptor.
//!
//! Nothing here allocates, spawns or boxes per request beyond what the node's
//! `BlockIo` call itself does; every function is an `async fn` the front's request
//! task awaits inline.

pub mod exec;
pub mod lifecycle;
pub mod mapped;
pub mod memory;

pub use exec::{Failed, Failure, Op, Run};
pub use lifecycle::{Attachment, Lifecycle, Removal};
pub use mapped::{FormatMap, MappedLayer, MappedNode, Mapping};
pub use memory::{
    Buf, CONN_BUFFER_BYTES, ConnBounds, EXPORT_BUFFER_BYTES, MAX_IN_FLIGHT, MAX_REQUEST_BYTES,
    Reservation,
};
