//! Driver configuration as it travels from the supervisor to a driver worker.
//!
//! These types cross a process boundary in bincode, so they use no serde attribute
//! that bincode cannot round-trip (flatten, untagged, skip, tag).

use serde::{Deserialize, Serialize};

/// `detect-zeroes` (BlockdevDetectZeroesOptions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DetectZeroes {
    /// Writes are written as they are.
    #[default]
    Off,
    /// All-zero writes become write-zeroes requests.
    On,
    /// All-zero writes become write-zeroes requests that may unmap (if discard=unmap).
    Unmap,
}

/// Options common to every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonConfig {
    /// The node refuses write-type requests.
    pub read_only: bool,
    /// `discard: unmap` (true) or `ignore` (false).
    pub discard_unmap: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `cache.no-flush`: flush requests succeed without reaching the disk.
    pub no_flush: bool,
    /// `cache.direct`: the image was opened with O_DIRECT.
    pub direct: bool,
}

/// `file` and `host_device` nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileConfig {
    /// Common options.
    pub common: CommonConfig,
}

/// `raw` nodes: a window over the child.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawConfig {
    /// Common options.
    pub common: CommonConfig,
    /// Start of the window in the child.
    pub offset: u64,
    /// Size of the window; `None` means up to the child's end.
    pub size: Option<u64>,
}

/// `null-co` and `null-aio` nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NullConfig {
    /// Common options.
    pub common: CommonConfig,
    /// Size in bytes.
    pub size: u64,
    /// Reads fill the buffer with zeroes (otherwise it is left as is).
    pub read_zeroes: bool,
    /// Artificial latency of every request.
    pub latency_ns: u64,
}

/// What a driver worker needs to open one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DriverConfig {
    /// `file`.
    File(FileConfig),
    /// `host_device`.
    HostDevice(FileConfig),
    /// `raw`.
    Raw(RawConfig),
    /// `null-co`.
    NullCo(NullConfig),
    /// `null-aio`.
    NullAio(NullConfig),
}
