//! The data channel, version 2: node I/O between two workers over shared-memory rings.
//!
//! Runs in every worker that serves nodes to, or reaches nodes in, another worker. The
//! supervisor creates one channel per (client worker, serving worker): a sealed memfd
//! holding a submission ring, a completion ring and a buffer pool (see [`crate::ring`]),
//! two doorbell eventfds and a socket pair used only to notice that the other end has
//! gone ([`NewChannel`]). The client side is [`RemoteNode`], an implementation of
//! [`BlockIo`], so drivers and exports never know whether a node is local or remote.
//!
//! Payloads never cross a socket: a read or write names a range of the pool. When the
//! caller's buffer already lives in the pool (an export got it from
//! [`BlockIo::alloc_buffer`]) the server works on it in place; otherwise the client
//! copies once through a pool lease. Everything the peer writes into the region is
//! untrusted: the server validates each descriptor (op, flags, lengths, buffer range
//! inside the pool and not overlapping another request it is running) and the client
//! each completion (tag issued and pending, status, extent count). A violation ends the
//! channel as if the peer had died; nothing the peer writes can crash us.
//!
//! Fencing: every incarnation of a serving worker gets a new channel (a new memfd),
//! attached to the client's [`Peer`] with a higher generation only after the old
//! process was reaped; requests pending on the dead one are resubmitted there.
//!
//! # Layout
//! One file per job, so each trust decision sits in one place (everything public is
//! re-exported here; callers name `bulkhead_ipc::data::...` only):
//! - `channel`: the descriptors of a channel ([`NewChannel`], [`ChannelFds`]) and the
//!   doorbell and liveness waits both ends use.
//! - `pool`: the client's allocator for the shared buffer pool, pinning and trimming.
//! - `completion`: what a completion's status and extent buffer mean, encoded and
//!   decoded side by side.
//! - `client`: [`DataClient`], one channel's submitter, completion reaper and watchdog.
//! - `remote`: [`Peer`] (restart fencing and resubmission across incarnations) and
//!   [`RemoteNode`] (the [`BlockIo`] over it).
//! - `server`: [`serve`], the ring loop that validates descriptors and runs them on
//!   the worker's nodes ([`NodeLookup`]).
//!
//! [`BlockIo`]: bulkhead_block::BlockIo
//! [`BlockIo::alloc_buffer`]: bulkhead_block::BlockIo::alloc_buffer

use std::sync::{Mutex, MutexGuard};

use crate::ring::RingError;

mod channel;
mod client;
mod completion;
mod pool;
mod remote;
mod server;

pub use channel::{ChannelFds, NewChannel};
pub use client::{ClientOptions, DataClient, REQUEST_TIMEOUT};
pub use remote::{Peer, RESUBMIT_TIMEOUT, RemoteNode};
pub use server::{NodeLookup, serve};

/// Largest read or write payload (NBD's 32 MiB request limit).
pub const MAX_IO_PAYLOAD: usize = 32 << 20;

/// Most extents one block-status completion carries; callers ask again from where it
/// stopped (the trait allows fewer extents than asked for).
pub use crate::ring::MAX_EXTENTS;

/// Data channel errors (the channel is unusable afterwards).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Socket or eventfd failure.
    #[error("data channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol, or the region is unusable.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// Wrong descriptors came with the channel message.
    #[error("data channel needs {expected} descriptors, got {got}")]
    Descriptors {
        /// How many were expected.
        expected: usize,
        /// How many came.
        got: usize,
    },
}

fn violation(msg: impl Into<String>) -> DataError {
    DataError::Ring(RingError::Violation(msg.into()))
}

fn mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere while holding it; every critical
    // section here leaves the data consistent at each step.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod test_util;

/// A micro-benchmark of the channel's own cost (run under callgrind to see where
/// instructions go): `cargo test --release -p bulkhead-ipc -- --ignored --nocapture
/// channel_round_trips`.
#[cfg(test)]
mod bench;
