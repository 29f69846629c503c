//! How bulkhead's processes talk to each other.
//!
//! Used by the supervisor and by every worker. Everything a worker sends is untrusted
//! input for the supervisor (and for other workers): messages are size-bounded before
//! they are decoded, and decoding never trusts a length prefix.
//!
//! # Layout
//! - [`fd`]: `SOCK_SEQPACKET` socket pairs and passing file descriptors (`SCM_RIGHTS`).
//! - [`codec`]: the one place that turns wire types into bytes (bincode 2, bounded).
//! - [`wire`]: control-plane message types, one enum per direction.
//! - [`control`]: the async control channel between the supervisor and one worker.
//! - [`ring`]: the shared-memory region of a data channel: layout, descriptors and
//!   the single-producer/single-consumer rings with their wake-up protocol.
//! - [`data`]: the data channel through which a worker reaches nodes served by another
//!   worker; it implements [`bulkhead_block::BlockIo`] on the client side.
//! - [`stats`]: a node's statistics region (shared memory the supervisor reads).
#![warn(missing_docs)]

pub mod bitmap;
pub mod codec;
pub mod control;
pub mod data;
pub mod fd;
pub mod ring;
pub mod shm;
pub mod stats;
pub mod wire;
