//! The `compress` filter driver (QEMU's `block/filter-compress.c`): writes through it
//! are stored compressed by the format node below (qcow2), everything else passes
//! through unchanged.
//!
//! Runs in its own driver worker (or the image's); its child may live in another
//! process and is only reached through [`BlockIo`], the request flag travelling with
//! the write (`WriteFlags::compressed`). The cluster alignment QEMU's block layer gives
//! the filter's requests (a partly written cluster is read first) is done where the
//! cluster size is known, by the qcow2 driver. No untrusted bytes are parsed here.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::CommonOptions;
use crate::driver::{
    BlockDriver, ChildRole, ChildSlot, Children, DriverInfo, OpenFuture, ParseError, Parsed,
    Resize, decode, opened,
};
use crate::io::{BlockIo, Extent, IoError, IoFuture, SparseFuture, WriteFlags, ZeroFlags};

/// The formats whose drivers store compressed writes (QEMU's
/// `block_driver_can_compress`, of those bulkhead has).
const COMPRESSING_FORMATS: &[&str] = &["qcow2"];

/// `compress` configuration: only the generic options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressConfig {
    /// The generic node options.
    pub common: CommonOptions,
}

/// `BlockdevOptionsGenericFormat` minus its `file` child.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompressOptions {}

/// The `compress` driver.
pub struct Compress;

impl BlockDriver for Compress {
    type Config = CompressConfig;
    const INFO: DriverInfo = DriverInfo {
        name: "compress",
        image: None,
        protocol: false,
        children: &[ChildSlot {
            key: "file",
            role: ChildRole::File,
            required: true,
        }],
        reopen_options: &["file"],
        resize: Resize::Unsupported,
        caps: crate::node::Capabilities {
            write_zeroes: true,
            discard: true,
            discard_stats: false,
        },
        // A filter calls nothing beyond what `raw`'s window does.
        policy: "raw",
        format_threads: false,
        filter: true,
        // Only qcow2 may sit below (`check_child_drivers`): no file I/O here.
        protocol_child: false,
    };

    fn parse(members: &Map<String, Value>) -> Result<Parsed<CompressConfig>, ParseError> {
        let _: CompressOptions = decode(members)?;
        Ok(Parsed {
            config: CompressConfig::default(),
            image: None,
            strong: Map::new(),
        })
    }

    fn common(config: &CompressConfig) -> &CommonOptions {
        &config.common
    }

    fn common_mut(config: &mut CompressConfig) -> &mut CommonOptions {
        &mut config.common
    }

    fn check_child_drivers(
        _config: &CompressConfig,
        children: &[(ChildRole, &str)],
    ) -> Result<(), crate::OpenError> {
        match children.iter().find(|(r, _)| *r == ChildRole::File) {
            Some((_, driver)) if !COMPRESSING_FORMATS.contains(driver) => {
                Err(crate::OpenError::Image(format!(
                    "Compression is not supported for underlying format: {driver}"
                )))
            }
            _ => Ok(()),
        }
    }

    fn open(config: &CompressConfig, _: Option<OwnedFd>, mut children: Children) -> OpenFuture {
        let read_only = config.common.read_only;
        let child = children.take(ChildRole::File);
        opened(match child {
            Some(child) => Ok(Arc::new(CompressDriver {
                read_only: read_only || child.read_only(),
                child,
            }) as Arc<dyn BlockIo>),
            None => Err(crate::OpenError::MissingChild),
        })
    }
}

/// A `compress` node.
pub struct CompressDriver {
    child: Arc<dyn BlockIo>,
    read_only: bool,
}

impl std::fmt::Debug for CompressDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressDriver")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl BlockIo for CompressDriver {
    fn size(&self) -> u64 {
        self.child.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.child.read(offset, buf)
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        if self.read_only {
            return Box::pin(async { Err(IoError::ReadOnly) });
        }
        let flags = WriteFlags {
            compressed: true,
            ..flags
        };
        self.child.write(offset, buf, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        self.child.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.child.discard(offset, len)
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.child.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.child.block_status(offset, len)
    }

    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        self.child.read_sparse(offset, buf)
    }

    fn refresh(&self) -> IoFuture<'_, ()> {
        self.child.refresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_compressing_format_may_sit_below() {
        let c = CompressConfig::default();
        assert!(Compress::check_child_drivers(&c, &[(ChildRole::File, "qcow2")]).is_ok());
        let refused = Compress::check_child_drivers(&c, &[(ChildRole::File, "raw")]);
        assert_eq!(
            refused.map_err(|e| e.to_string()),
            Err("Compression is not supported for underlying format: raw".to_string())
        );
    }
}
