//! The `null-co` and `null-aio` drivers: a node with no storage.
//!
//! Runs in the null driver workers. Writes, write-zeroes and discards are accepted and
//! dropped. Reads, writes and flushes complete after `latency-ns` (the timer runs on the
//! executor, nothing blocks). Block status follows QEMU: with `read-zeroes=on` the whole
//! node is allocated zeroes (depth 1); without it, unallocated and neither data nor
//! zero (depth 0), which NBD clients see as a hole that is not known to be zero.
//!
//! qsd 10.0.2 defaults to `read-zeroes=off` and then leaves the read buffer untouched
//! (qemu-io shows its 0xab fill pattern). bulkhead zero-fills it in both modes: a
//! caller's buffer may hold another client's data from an earlier request, and leaking
//! it would be worse than the memset. The two drivers behave the same here (QEMU's
//! difference is only how completions are scheduled). No untrusted bytes are parsed.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::CommonOptions;
use crate::driver::{
    BlockDriver, Children, DriverInfo, OpenFuture, ParseError, Parsed, Resize, decode, opened,
    size_option,
};
use crate::file::check_range;
use crate::io::{BlockIo, Extent, IoError, IoFuture, WriteFlags, ZeroFlags};

/// `null-co` / `null-aio` configuration (`BlockdevOptionsNull`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NullConfig {
    /// The generic node options.
    pub common: CommonOptions,
    /// `size` in bytes (default 1 GiB).
    pub size: u64,
    /// `read-zeroes`: qsd 10.0.2's default is `false` (reads leave the buffer as it was;
    /// bulkhead zero-fills it anyway, see the module docs).
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

/// `BlockdevOptionsNull`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NullOptions {
    /// QAPI `int`: the visitor lets negative values through; qsd 10.0.2 then aborts,
    /// bulkhead refuses them.
    size: Option<i64>,
    /// QAPI `uint64` (`-1` arrives as 2^64-1).
    latency_ns: Option<u64>,
    read_zeroes: Option<bool>,
}

/// The `null-co` driver.
pub struct NullCo;

/// The `null-aio` driver (the same here: QEMU's difference is only how completions
/// are scheduled).
pub struct NullAio;

fn parse_null(members: &Map<String, Value>) -> Result<Parsed<NullConfig>, ParseError> {
    let o: NullOptions = decode(members)?;
    let size = size_option(o.size, "size")?;
    // QEMU's null driver reports `size` and `read-zeroes` as given (its strong
    // options); `latency-ns` does not show in the filename.
    let mut strong = Map::new();
    if let Some(s) = size {
        strong.insert("size".into(), s.into());
    }
    if let Some(z) = o.read_zeroes {
        strong.insert("read-zeroes".into(), z.into());
    }
    Ok(Parsed {
        config: NullConfig {
            common: CommonOptions::default(),
            size: size.unwrap_or(NULL_DEFAULT_SIZE),
            read_zeroes: o.read_zeroes.unwrap_or(false),
            latency_ns: o.latency_ns.unwrap_or(0),
        },
        image: None,
        strong,
    })
}

/// Null nodes neither zero nor discard natively: QEMU's null drivers have neither
/// callback, so detected zeroes stay writes and discards end above the driver.
const CAPS: crate::node::Capabilities = crate::node::Capabilities {
    write_zeroes: false,
    discard: false,
    discard_stats: false,
};

macro_rules! null_driver {
    ($marker:ty, $name:literal) => {
        impl BlockDriver for $marker {
            type Config = NullConfig;
            const INFO: DriverInfo = DriverInfo {
                name: $name,
                image: None,
                protocol: true,
                children: &[],
                reopen_options: &[],
                resize: Resize::Unsupported,
                caps: CAPS,
                policy: "null",
                format_threads: false,
                filter: false,
                protocol_child: true,
            };

            fn parse(members: &Map<String, Value>) -> Result<Parsed<NullConfig>, ParseError> {
                parse_null(members)
            }
            fn common(config: &NullConfig) -> &CommonOptions {
                &config.common
            }
            fn common_mut(config: &mut NullConfig) -> &mut CommonOptions {
                &mut config.common
            }
            fn open(config: &NullConfig, _: Option<OwnedFd>, _: Children) -> OpenFuture {
                opened(Ok(Arc::new(NullDriver::new(config))))
            }
        }
    };
}

null_driver!(NullCo, "null-co");
null_driver!(NullAio, "null-aio");

/// A `null-co` or `null-aio` node.
#[derive(Debug, Clone)]
pub struct NullDriver {
    /// Node size: the configured size rounded up to 512, as qsd reports it
    /// (`size=1000` gives a 1024-byte node).
    size: u64,
    read_zeroes: bool,
    latency: Duration,
    read_only: bool,
}

impl NullDriver {
    /// A null node as configured.
    pub fn new(config: &NullConfig) -> NullDriver {
        NullDriver {
            size: config.size.div_ceil(512).saturating_mul(512),
            read_zeroes: config.read_zeroes,
            latency: Duration::from_nanos(config.latency_ns),
            read_only: config.common.read_only,
        }
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }
}

impl BlockIo for NullDriver {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            check_range(offset, buf.len() as u64, self.size)?;
            self.delay().await;
            buf.fill(0);
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if flags.compressed {
                return Err(IoError::Unsupported);
            }
            self.check_write(offset, buf.len() as u64)?;
            self.delay().await;
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        // QEMU's null has no write-zeroes callback, so the block layer writes a zero
        // buffer instead: that write pays the latency.
        Box::pin(async move {
            self.check_write(offset, len)?;
            self.delay().await;
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.check_write(offset, len) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            check_range(offset, len, self.size)?;
            if len == 0 {
                return Err(IoError::Invalid);
            }
            let zero = self.read_zeroes;
            Ok(vec![Extent {
                length: len,
                data: false,
                zero,
                depth: u32::from(zero),
            }])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_return_zeroes_even_without_read_zeroes() {
        let node = NullDriver::new(&NullConfig::default());
        let mut buf = vec![0xabu8; 4096];
        assert_eq!(node.read(0, &mut buf).await, Ok(()));
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn size_is_rounded_up_to_512_like_qsd() {
        let node = NullDriver::new(&NullConfig {
            size: 1000,
            ..NullConfig::default()
        });
        assert_eq!(node.size(), 1024);
        let mut buf = [0u8; 24];
        assert_eq!(node.read(1000, &mut buf).await, Ok(()));
        assert_eq!(node.read(1001, &mut buf).await, Err(IoError::OutOfRange));
    }

    #[tokio::test]
    async fn block_status_is_zero_at_depth_1_only_with_read_zeroes() {
        let plain = NullDriver::new(&NullConfig {
            size: 1 << 20,
            ..NullConfig::default()
        });
        assert_eq!(
            plain.block_status(4096, 8192).await,
            Ok(vec![Extent {
                length: 8192,
                data: false,
                zero: false,
                depth: 0
            }])
        );
        let zeroes = NullDriver::new(&NullConfig {
            size: 1 << 20,
            read_zeroes: true,
            ..NullConfig::default()
        });
        assert_eq!(
            zeroes.block_status(0, 1 << 20).await,
            Ok(vec![Extent {
                length: 1 << 20,
                data: false,
                zero: true,
                depth: 1
            }])
        );
    }

    #[tokio::test]
    async fn writes_are_dropped_and_refused_when_read_only() {
        let node = NullDriver::new(&NullConfig::default());
        assert_eq!(
            node.write(0, &[1, 2, 3], WriteFlags::default()).await,
            Ok(())
        );
        let mut buf = [9u8; 3];
        assert_eq!(node.read(0, &mut buf).await, Ok(()));
        assert_eq!(buf, [0, 0, 0]);
        let mut config = NullConfig::default();
        config.common.read_only = true;
        let ro = NullDriver::new(&config);
        assert_eq!(
            ro.write(0, &[1], WriteFlags::default()).await,
            Err(IoError::ReadOnly)
        );
        assert_eq!(ro.resize(4096).await, Err(IoError::Unsupported));
    }

    #[tokio::test]
    async fn latency_delays_reads() {
        let node = NullDriver::new(&NullConfig {
            latency_ns: 20_000_000,
            ..NullConfig::default()
        });
        let start = std::time::Instant::now();
        let mut buf = [0u8; 512];
        assert_eq!(node.read(0, &mut buf).await, Ok(()));
        assert!(start.elapsed() >= Duration::from_millis(20));
    }
}
