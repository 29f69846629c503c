//! Driver configuration: what a driver worker needs to know to run one node.
//!
//! Built by the supervisor from a validated `blockdev-add` (or `--blockdev`) and sent to
//! the driver worker inside an IPC message, so every type here must round-trip through
//! bincode's serde mode: plain structs and externally tagged enums only (no flatten,
//! untagged, skip or internal tags). Values come from the supervisor, which is trusted;
//! [`DriverConfig::validate`] still re-checks the cross-field rules so that a worker never
//! runs a combination qsd would refuse. Defaults are qsd 10.0.2's.

use serde::{Deserialize, Serialize};

/// `aio`: how the file driver submits I/O (`BlockdevAioOptions`).
///
/// bulkhead runs every mode on its own start-up I/O threads (see [`crate::file`]); the
/// value is kept so that queries report what the user asked for and so that
/// `aio=native` keeps qsd's `cache.direct` requirement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aio {
    /// `threads` (qsd's default).
    #[default]
    Threads,
    /// `native` (Linux AIO); qsd requires `cache.direct=on` with it.
    Native,
    /// `io_uring`.
    IoUring,
}

/// `OnOffAuto`, used by `locking`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// `file` and `host_device` options (`BlockdevOptionsFile`, minus the filename, which
/// only the supervisor sees).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileConfig {
    /// The generic node options.
    pub common: CommonOptions,
    /// `aio`.
    pub aio: Aio,
    /// `locking`; applied by the supervisor, which holds the lock bytes (see [`crate::lock`]).
    pub locking: OnOffAuto,
    /// `cache.direct`: the supervisor opened the fd with `O_DIRECT`, so the driver must
    /// use aligned buffers, offsets and lengths.
    pub direct: bool,
}

/// `raw` options (`BlockdevOptionsRaw`): a window over the child node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawConfig {
    /// The generic node options.
    pub common: CommonOptions,
    /// `offset`: where the window starts in the child.
    pub offset: u64,
    /// `size`: the window length; `None` means "up to the child's end", and only then
    /// can the node be resized.
    pub size: Option<u64>,
}

/// `null-co` / `null-aio` options (`BlockdevOptionsNull`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NullConfig {
    /// The generic node options.
    pub common: CommonOptions,
    /// `size` in bytes (default 1 GiB).
    pub size: u64,
    /// `read-zeroes`: qsd 10.0.2's default is `false` (reads leave the buffer as it was;
    /// bulkhead zero-fills it anyway, see [`crate::null`]).
    pub read_zeroes: bool,
    /// `latency-ns`: every read, write and flush completes after this long.
    pub latency_ns: u64,
}

/// qsd's default `size` of a null node: 1 GiB.
pub const NULL_DEFAULT_SIZE: u64 = 1 << 30;

impl Default for NullConfig {
    fn default() -> NullConfig {
        NullConfig {
            common: CommonOptions::default(),
            size: NULL_DEFAULT_SIZE,
            read_zeroes: false,
            latency_ns: 0,
        }
    }
}

/// Which driver a worker runs for a node, with that driver's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DriverConfig {
    /// `file`: a regular file (needs an fd).
    File(FileConfig),
    /// `host_device`: a block or character device (needs an fd).
    HostDevice(FileConfig),
    /// `raw`: a window over a child node (needs a child).
    Raw(RawConfig),
    /// `null-co`.
    NullCo(NullConfig),
    /// `null-aio`.
    NullAio(NullConfig),
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

impl DriverConfig {
    /// The QAPI driver name (`drv` in query-named-block-nodes).
    pub fn driver_name(&self) -> &'static str {
        match self {
            DriverConfig::File(_) => "file",
            DriverConfig::HostDevice(_) => "host_device",
            DriverConfig::Raw(_) => "raw",
            DriverConfig::NullCo(_) => "null-co",
            DriverConfig::NullAio(_) => "null-aio",
        }
    }

    /// The generic node options.
    pub fn common(&self) -> &CommonOptions {
        match self {
            DriverConfig::File(c) | DriverConfig::HostDevice(c) => &c.common,
            DriverConfig::Raw(c) => &c.common,
            DriverConfig::NullCo(c) | DriverConfig::NullAio(c) => &c.common,
        }
    }

    /// The generic node options, mutably (a reopen changes them in place).
    pub fn common_mut(&mut self) -> &mut CommonOptions {
        match self {
            DriverConfig::File(c) | DriverConfig::HostDevice(c) => &mut c.common,
            DriverConfig::Raw(c) => &mut c.common,
            DriverConfig::NullCo(c) | DriverConfig::NullAio(c) => &mut c.common,
        }
    }

    /// Checks the cross-field rules qsd applies when opening a node, in qsd's order
    /// (generic options first, then the driver's own).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let common = self.common();
        if common.detect_zeroes == DetectZeroes::Unmap && common.discard != Discard::Unmap {
            return Err(ConfigError::DetectZeroesUnmapNeedsDiscard);
        }
        if common.force_share && !common.read_only {
            return Err(ConfigError::ForceShareNeedsReadOnly);
        }
        match self {
            DriverConfig::File(c) | DriverConfig::HostDevice(c) => {
                if c.aio == Aio::Native && !c.direct {
                    return Err(ConfigError::NativeAioNeedsDirect);
                }
            }
            // The raw window is checked against the child's size by
            // `raw::check_window`, which keeps QEMU's error order.
            DriverConfig::Raw(_) | DriverConfig::NullCo(_) | DriverConfig::NullAio(_) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(config: DriverConfig) -> DriverConfig {
        let bytes = match bincode::serde::encode_to_vec(config, bincode::config::standard()) {
            Ok(b) => b,
            Err(e) => panic!("encode failed: {e}"),
        };
        match bincode::serde::decode_from_slice(&bytes, bincode::config::standard()) {
            Ok((c, used)) => {
                assert_eq!(used, bytes.len());
                c
            }
            Err(e) => panic!("decode failed: {e}"),
        }
    }

    #[test]
    fn every_driver_config_round_trips_through_bincode_serde() {
        let common = CommonOptions {
            read_only: true,
            detect_zeroes: DetectZeroes::Unmap,
            discard: Discard::Unmap,
            no_flush: true,
            force_share: true,
            inactive: true,
        };
        let configs = [
            DriverConfig::File(FileConfig {
                common,
                aio: Aio::IoUring,
                locking: OnOffAuto::Off,
                direct: true,
            }),
            DriverConfig::HostDevice(FileConfig::default()),
            DriverConfig::Raw(RawConfig {
                common,
                offset: 4096,
                size: Some(65536),
            }),
            DriverConfig::Raw(RawConfig::default()),
            DriverConfig::NullCo(NullConfig {
                common,
                size: 1,
                read_zeroes: true,
                latency_ns: 7,
            }),
            DriverConfig::NullAio(NullConfig::default()),
        ];
        for config in configs {
            assert_eq!(round_trip(config), config);
        }
    }

    #[test]
    fn defaults_are_qsd_defaults() {
        let null = NullConfig::default();
        assert_eq!(null.size, 1_073_741_824);
        assert!(!null.read_zeroes);
        assert_eq!(null.latency_ns, 0);
        let file = FileConfig::default();
        assert_eq!(file.aio, Aio::Threads);
        assert_eq!(file.locking, OnOffAuto::Auto);
        assert!(!file.direct);
        assert_eq!(file.common.discard, Discard::Ignore);
        assert_eq!(file.common.detect_zeroes, DetectZeroes::Off);
    }

    #[test]
    fn validate_reports_qsd_texts() {
        let mut file = FileConfig::default();
        file.common.detect_zeroes = DetectZeroes::Unmap;
        assert_eq!(
            DriverConfig::File(file).validate().map_err(|e| e.to_string()),
            Err("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".to_string())
        );
        file.common.discard = Discard::Unmap;
        assert_eq!(DriverConfig::File(file).validate(), Ok(()));
        file.aio = Aio::Native;
        assert_eq!(
            DriverConfig::File(file).validate().map_err(|e| e.to_string()),
            Err("aio=native was specified, but it requires cache.direct=on, which was not specified.".to_string())
        );
        file.direct = true;
        assert_eq!(DriverConfig::File(file).validate(), Ok(()));
        let mut null = NullConfig::default();
        null.common.force_share = true;
        assert_eq!(
            DriverConfig::NullCo(null)
                .validate()
                .map_err(|e| e.to_string()),
            Err("force-share=on can only be used with read-only images".to_string())
        );
    }
}
