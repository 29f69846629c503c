//! The option types every driver configuration shares: the generic node options
//! ([`CommonOptions`]), their enums, and [`ConfigError`]. Each driver's own
//! configuration is in its module; [`DriverConfig`] joins them (see
//! [`crate::registry`]).
//!
//! Built by the supervisor from a validated `blockdev-add` (or `--blockdev`) and sent to
//! the driver worker inside an IPC message, so every type here must round-trip through
//! bincode's serde mode: plain structs and externally tagged enums only (no flatten,
//! untagged, skip or internal tags). Values come from the supervisor, which is trusted;
//! [`DriverConfig::validate`] still re-checks the cross-field rules so that a worker never
//! runs a combination qsd would refuse. Defaults are qsd 10.0.2's.

use serde::{Deserialize, Serialize};

pub use crate::registry::DriverConfig;

/// `aio`: how the file driver submits I/O (`BlockdevAioOptions`).
///
/// bulkhead runs every mode on its own start-up I/O threads (see [`crate::file`]); the
/// value is kept so that queries report what the user asked for and so that
/// `aio=native` keeps qsd's `cache.direct` requirement.
/// Serialized under its QAPI names, so that the file driver decodes its QAPI options
/// straight into it (bincode encodes variants by index, so the names cost nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aio {
    /// `threads` (qsd's default).
    #[default]
    #[serde(rename = "threads")]
    Threads,
    /// `native` (Linux AIO); qsd requires `cache.direct=on` with it.
    #[serde(rename = "native")]
    Native,
    /// `io_uring`.
    #[serde(rename = "io_uring")]
    IoUring,
}

/// `OnOffAuto`, used by `locking`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOffAuto {
    /// `auto` (qsd's default for `locking`): lock when OFD locks are available.
    #[default]
    Auto,
    /// `on`.
    On,
    /// `off`: never touch the lock bytes.
    Off,
}

/// `discard` (`BlockdevDiscardOptions`): whether discard requests reach the driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Discard {
    /// `ignore` (qsd's default): discards succeed without doing anything.
    #[default]
    Ignore,
    /// `unmap`: discards are passed down (punch hole on files).
    Unmap,
}

/// `detect-zeroes` (`BlockdevDetectZeroesOptions`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DetectZeroes {
    /// `off` (qsd's default).
    #[default]
    Off,
    /// `on`: an all-zero write becomes a write-zeroes request.
    On,
    /// `unmap`: as `on`, and the range may be deallocated; needs `discard=unmap`.
    Unmap,
}

/// The options every node has that change how its I/O behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonOptions {
    /// `read-only`.
    pub read_only: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `discard`.
    pub discard: Discard,
    /// `cache.no-flush`: flushes (and the flush half of FUA) complete at once.
    pub no_flush: bool,
    /// `force-share`: other users may write; only valid with `read_only`.
    pub force_share: bool,
    /// Not `active` (`blockdev-set-active`, `active=off`): the node refuses writes
    /// (EPERM, as qsd's inactive nodes do) and serves reads.
    pub inactive: bool,
    /// `cache.direct`: the supervisor opened the node's image with `O_DIRECT`, so
    /// a driver on it must use aligned buffers, offsets and lengths.
    pub direct: bool,
}

/// A combination of options qsd refuses; the text is qsd's `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `detect-zeroes=unmap` without `discard=unmap`.
    #[error(
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
    )]
    DetectZeroesUnmapNeedsDiscard,
    /// `force-share=on` on a writable node.
    #[error("force-share=on can only be used with read-only images")]
    ForceShareNeedsReadOnly,
    /// `aio=native` without `cache.direct=on`.
    #[error("aio=native was specified, but it requires cache.direct=on, which was not specified.")]
    NativeAioNeedsDirect,
}
