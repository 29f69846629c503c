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
