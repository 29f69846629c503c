//! The `raw` format driver: a byte window (`offset`, `size`) over one child node.
//!
//! Runs in the `raw` driver worker. The child may live in another process; it is only
//! ever reached through [`BlockIo`]. Requests are range-checked against the window and
//! shifted by `offset`; block status is the child's, clipped to the window. No untrusted
//! bytes are parsed.
//!
//! Resize follows QEMU's raw driver: a node with a fixed `size` cannot be resized
//! ("Cannot resize fixed-size raw disks"); otherwise the child is truncated to
//! `offset + new_size`. A raw node is read-only if configured so or if its child is.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::CommonOptions;
use crate::driver::{
    BlockDriver, ChildRole, ChildSlot, Children, DriverInfo, OpenFuture, ParseError, Parsed,
    Resize, decode, opened, size_option,
};
use crate::file::check_range;
use crate::io::{
    BlockIo, Extent, IoError, IoFuture, IoResult, SparseFuture, SparseReadError, WriteFlags,
    ZeroFlags, read_sparse_default,
};

/// `raw` configuration (`BlockdevOptionsRaw`): a window over the child node.
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

impl RawConfig {
    /// The strong options QEMU reports for a window: `offset` and `size` as given.
    fn strong(offset: Option<u64>, size: Option<u64>) -> Map<String, Value> {
        let mut strong = Map::new();
        if let Some(o) = offset {
            strong.insert("offset".into(), o.into());
        }
        if let Some(s) = size {
            strong.insert("size".into(), s.into());
        }
        strong
    }
}

/// `BlockdevOptionsRaw` minus its `file` child (the supervisor resolves children).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawOptions {
    offset: Option<i64>,
    size: Option<i64>,
}

/// The `raw` driver.
pub struct Raw;

impl BlockDriver for Raw {
    type Config = RawConfig;
    const INFO: DriverInfo = DriverInfo {
        name: "raw",
        image: None,
        protocol: false,
        children: &[ChildSlot {
            key: "file",
            role: ChildRole::File,
            required: true,
        }],
        reopen_options: &["offset", "size", "file"],
        resize: Resize::Window,
        // Zeroes and discards pass to the child; file-posix counts the discards.
        caps: crate::node::Capabilities {
            write_zeroes: true,
            discard: true,
            discard_stats: false,
        },
        policy: "raw",
        format_threads: false,
        filter: false,
        protocol_child: true,
    };

    fn parse(members: &Map<String, Value>) -> Result<Parsed<RawConfig>, ParseError> {
        let o: RawOptions = decode(members)?;
        let offset = size_option(o.offset, "offset")?;
        let size = size_option(o.size, "size")?;
        Ok(Parsed {
            config: RawConfig {
                common: CommonOptions::default(),
                offset: offset.unwrap_or(0),
                size,
            },
            image: None,
            strong: RawConfig::strong(offset, size),
        })
    }

    fn common(config: &RawConfig) -> &CommonOptions {
        &config.common
    }

    fn common_mut(config: &mut RawConfig) -> &mut CommonOptions {
        &mut config.common
    }

    fn check_children(
        config: &RawConfig,
        children: &[(ChildRole, u64)],
    ) -> Result<(), crate::OpenError> {
        let size = children
            .iter()
            .find(|(r, _)| *r == ChildRole::File)
            .map_or(0, |c| c.1);
        Ok(check_window(config, size)?)
    }

    fn holds_size(config: &RawConfig) -> bool {
        config.offset > 0 || config.size.is_some()
    }

    fn reopen(
        config: &mut RawConfig,
        members: &Map<String, Value>,
    ) -> Result<Option<Map<String, Value>>, ParseError> {
        // Unlike blockdev-add, a negative offset or size is refused with a type error.
        let o: RawOptions = decode(members)?;
        let unsigned = |v: Option<i64>, k: &'static str| {
            v.map(|n| u64::try_from(n).map_err(|_| ParseError::ExpectedInteger(k)))
                .transpose()
        };
        let offset = unsigned(o.offset, "offset")?;
        let size = unsigned(o.size, "size")?;
        config.offset = offset.unwrap_or(0);
        config.size = size;
        Ok(Some(RawConfig::strong(offset, size)))
    }

    fn resize_error(config: &RawConfig, err: &IoError) -> Option<String> {
        match err {
            IoError::Unsupported if config.size.is_some() => {
                Some("Cannot resize fixed-size raw disks".to_string())
            }
            IoError::Invalid => Some("Disk size too large for the chosen offset".to_string()),
            _ => None,
        }
    }

    fn open(config: &RawConfig, _: Option<OwnedFd>, mut children: Children) -> OpenFuture {
        let mut opened_raw = || -> Result<Arc<dyn BlockIo>, crate::OpenError> {
            let child = children
                .take(ChildRole::File)
                .ok_or(crate::OpenError::MissingChild)?;
            Ok(Arc::new(RawDriver::new(config, child)?))
        };
        opened(opened_raw())
    }
}

/// Why a raw window cannot be opened over its child; texts are qsd's (the double space
/// in the second one is QEMU's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RawOpenError {
    /// `offset` lies past the child's end.
    #[error("Offset ({offset}) cannot be greater than size of the containing file ({child_size})")]
    OffsetPastEnd {
        /// The configured offset.
        offset: u64,
        /// The child's size.
        child_size: u64,
    },
    /// `offset + size` lies past the child's end.
    #[error(
        "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({child_size})"
    )]
    WindowPastEnd {
        /// The configured offset.
        offset: u64,
        /// The configured size.
        size: u64,
        /// The child's size.
        child_size: u64,
    },
    /// `size` is not a multiple of 512.
    #[error("Specified size is not multiple of 512")]
    SizeUnaligned,
}

/// Checks a raw window against its child's size, in QEMU's order (so the first error
/// reported is qsd's). The supervisor may call it before asking a worker to open the node.
pub fn check_window(config: &RawConfig, child_size: u64) -> Result<(), RawOpenError> {
    if config.offset > child_size {
        return Err(RawOpenError::OffsetPastEnd {
            offset: config.offset,
            child_size,
        });
    }
    if let Some(size) = config.size {
        if child_size - config.offset < size {
            return Err(RawOpenError::WindowPastEnd {
                offset: config.offset,
                size,
                child_size,
            });
        }
        if size % 512 != 0 {
            return Err(RawOpenError::SizeUnaligned);
        }
    }
    Ok(())
}

/// A `raw` node.
pub struct RawDriver {
    child: Arc<dyn BlockIo>,
    offset: u64,
    size: Option<u64>,
    read_only: bool,
}

impl std::fmt::Debug for RawDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDriver")
            .field("offset", &self.offset)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl RawDriver {
    /// Opens a window over `child`, checking it fits as QEMU's `raw_open` does.
    pub fn new(config: &RawConfig, child: Arc<dyn BlockIo>) -> Result<RawDriver, RawOpenError> {
        check_window(config, child.size())?;
        Ok(RawDriver {
            read_only: config.common.read_only || child.read_only(),
            child,
            offset: config.offset,
            size: config.size,
        })
    }

    /// The child offset of a window offset, after checking the range.
    fn map(&self, offset: u64, len: u64) -> IoResult<u64> {
        check_range(offset, len, self.size())?;
        offset.checked_add(self.offset).ok_or(IoError::OutOfRange)
    }

    fn map_write(&self, offset: u64, len: u64) -> IoResult<u64> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        self.map(offset, len)
    }
}

impl BlockIo for RawDriver {
    fn size(&self) -> u64 {
        match self.size {
            Some(size) => size,
            // QEMU counts whole sectors here too: offset=100 over a 1536-byte child is a
            // 1536-byte node, whose last 100 bytes lie past the child's end.
            None => self
                .child
                .size()
                .saturating_sub(self.offset)
                .div_ceil(512)
                .saturating_mul(512),
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let at = self.map(offset, buf.len() as u64)?;
            // The part past the child's end (only possible in the rounded-up tail of an
            // open-ended window) reads as zeroes, as QEMU's block layer makes it.
            let inside = self.child.size().saturating_sub(at).min(buf.len() as u64) as usize;
            let (head, tail) = buf.split_at_mut(inside);
            tail.fill(0);
            if head.is_empty() {
                return Ok(());
            }
            self.child.read(at, head).await
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            // QEMU's raw format has no compressed writes (the `compress` filter
            // refuses to sit on it); never pass the flag down as plain data.
            if flags.compressed {
                return Err(IoError::Unsupported);
            }
            let at = self.map_write(offset, buf.len() as u64)?;
            self.child.write(at, buf, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let at = self.map_write(offset, len)?;
            self.child.write_zeroes(at, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let at = self.map_write(offset, len)?;
            self.child.discard(at, len).await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.child.flush()
    }

    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        Box::pin(async move {
            let len = buf.len() as u64;
            let at = self.map(offset, len).map_err(SparseReadError::Status)?;
            // Wholly inside the child: let it do both halves (one round trip when it
            // lives in another worker). The rounded-up tail past the child's end
            // needs the window logic of `read` and `block_status`.
            if len > 0 && self.child.size().saturating_sub(at) >= len {
                return self.child.read_sparse(at, buf).await;
            }
            read_sparse_default(self, offset, buf).await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            let at = self.map(offset, len)?;
            if len == 0 {
                return Err(IoError::Invalid);
            }
            // In the rounded-up tail past the child's end (see `size`) there is nothing
            // to ask the child: it reads as zeroes.
            let inside = self.child.size().saturating_sub(at).min(len);
            if inside == 0 {
                return Ok(vec![Extent {
                    length: len,
                    data: false,
                    zero: true,
                    depth: 1,
                }]);
            }
            let len = inside;
            let mut extents = self.child.block_status(at, len).await?;
            // The child promised not to overrun, but it may be in another process.
            let mut left = len;
            extents.retain_mut(|e| {
                let keep = left > 0 && e.length > 0;
                e.length = e.length.min(left);
                left -= e.length;
                keep
            });
            if extents.is_empty() {
                return Err(IoError::Os(libc::EIO));
            }
            Ok(extents)
        })
    }

    fn refresh(&self) -> IoFuture<'_, ()> {
        self.child.refresh()
    }

    fn resize(&self, new_size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.size.is_some() {
                return Err(IoError::Unsupported);
            }
            if self.read_only {
                return Err(IoError::ReadOnly);
            }
            let child_size = self.offset.checked_add(new_size).ok_or(IoError::Invalid)?;
            self.child.resize(child_size).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::null::NullConfig;
    use crate::null::NullDriver;

    fn null(size: u64, read_zeroes: bool) -> Arc<dyn BlockIo> {
        Arc::new(NullDriver::new(&NullConfig {
            size,
            read_zeroes,
            ..NullConfig::default()
        }))
    }

    #[test]
    fn windows_that_do_not_fit_are_refused_with_qsd_texts() {
        let child = null(1 << 20, false);
        let past = RawConfig {
            offset: 2 << 20,
            ..RawConfig::default()
        };
        assert_eq!(
            RawDriver::new(&past, Arc::clone(&child))
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(
                "Offset (2097152) cannot be greater than size of the containing file (1048576)"
                    .to_string()
            )
        );
        let sum = RawConfig {
            offset: 4096,
            size: Some(2 << 20),
            ..RawConfig::default()
        };
        assert_eq!(
            RawDriver::new(&sum, Arc::clone(&child)).map(|_| ()).map_err(|e| e.to_string()),
            Err("The sum of offset (4096) and size (2097152) has to be smaller or equal to the  actual size of the containing file (1048576)".to_string())
        );
        let odd = RawConfig {
            offset: 100,
            size: Some(1000),
            ..RawConfig::default()
        };
        assert_eq!(
            RawDriver::new(&odd, child).map(|_| ()),
            Err(RawOpenError::SizeUnaligned)
        );
    }

    #[tokio::test]
    async fn a_sparse_read_is_the_childs_inside_the_window_and_covers_the_tail_past_it() {
        // Wholly inside the child: the child's answer (read-zeroes: one zero run).
        let child = null(1 << 20, true);
        let raw = RawDriver::new(
            &RawConfig {
                offset: 4096,
                ..RawConfig::default()
            },
            Arc::clone(&child),
        )
        .map_err(|e| e.to_string());
        let Ok(raw) = raw else {
            panic!("window should open")
        };
        let mut buf = vec![9u8; 8192];
        assert_eq!(
            raw.read_sparse(0, &mut buf).await,
            Ok(vec![Extent {
                length: 8192,
                data: false,
                zero: true,
                depth: 1
            }])
        );
        assert_eq!(
            raw.read_sparse((1 << 20) - 4096, &mut buf[..1]).await,
            Err(SparseReadError::Status(IoError::OutOfRange))
        );
        let odd = RawDriver::new(
            &RawConfig {
                offset: 100,
                ..RawConfig::default()
            },
            null(1536, false),
        );
        let Ok(odd) = odd else {
            panic!("window should open")
        };
        // 1536-byte node whose last 100 bytes lie past the child: data then zero tail.
        let mut buf = vec![9u8; 1536];
        assert_eq!(
            odd.read_sparse(0, &mut buf).await,
            Ok(vec![
                Extent {
                    length: 1436,
                    data: false,
                    zero: false,
                    depth: 0
                },
                Extent {
                    length: 100,
                    data: false,
                    zero: true,
                    depth: 1
                },
            ])
        );
        assert!(buf[..1436].iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn size_follows_the_child_unless_fixed() {
        let child = null(1 << 20, false);
        let open = RawDriver::new(
            &RawConfig {
                offset: 131072,
                ..RawConfig::default()
            },
            Arc::clone(&child),
        );
        assert_eq!(open.map(|r| r.size()), Ok(917504));
        let fixed = RawDriver::new(
            &RawConfig {
                offset: 4096,
                size: Some(65536),
                ..RawConfig::default()
            },
            child,
        );
        let Ok(fixed) = fixed else {
            panic!("window should open")
        };
        assert_eq!(fixed.size(), 65536);
        assert_eq!(fixed.resize(131072).await, Err(IoError::Unsupported));
        let mut buf = [0u8; 512];
        assert_eq!(fixed.read(65536 - 512, &mut buf).await, Ok(()));
        assert_eq!(
            fixed.read(65536 - 511, &mut buf).await,
            Err(IoError::OutOfRange)
        );
    }

    #[tokio::test]
    async fn an_unaligned_open_window_rounds_its_size_up_and_reads_zeroes_past_the_child() {
        let child = null(1536, false);
        let Ok(raw) = RawDriver::new(
            &RawConfig {
                offset: 100,
                ..RawConfig::default()
            },
            child,
        ) else {
            panic!("window should open")
        };
        assert_eq!(raw.size(), 1536);
        let mut buf = [0xffu8; 200];
        assert_eq!(raw.read(1336, &mut buf).await, Ok(()));
        assert_eq!(buf, [0u8; 200]);
        assert_eq!(
            raw.block_status(1024, 512).await,
            Ok(vec![Extent {
                length: 412,
                data: false,
                zero: false,
                depth: 0
            }])
        );
        assert_eq!(
            raw.block_status(1436, 100).await,
            Ok(vec![Extent {
                length: 100,
                data: false,
                zero: true,
                depth: 1
            }])
        );
    }

    #[tokio::test]
    async fn read_only_is_inherited_from_the_child() {
        let mut config = NullConfig::default();
        config.common.read_only = true;
        let child: Arc<dyn BlockIo> = Arc::new(NullDriver::new(&config));
        let Ok(raw) = RawDriver::new(&RawConfig::default(), child) else {
            panic!("window should open")
        };
        assert!(raw.read_only());
        assert_eq!(
            raw.write(0, &[0u8; 512], WriteFlags::default()).await,
            Err(IoError::ReadOnly)
        );
        assert_eq!(raw.discard(0, 512).await, Err(IoError::ReadOnly));
    }

    #[tokio::test]
    async fn block_status_passes_the_child_status_through() {
        let Ok(raw) = RawDriver::new(
            &RawConfig {
                offset: 512,
                ..RawConfig::default()
            },
            null(1 << 20, true),
        ) else {
            panic!("window should open")
        };
        assert_eq!(
            raw.block_status(0, 4096).await,
            Ok(vec![Extent {
                length: 4096,
                data: false,
                zero: true,
                depth: 1
            }])
        );
    }
}
