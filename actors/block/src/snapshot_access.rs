//! The `snapshot-access` driver (QEMU's `block/snapshot-access.c`): reads the point
//! in time a `copy-before-write` child keeps (what it copied to its target, and the
//! rest from its source, which no guest write has changed yet), for a fleecing
//! export without an overlay. Writes are not supported (QEMU's `ENOTSUP`); a discard
//! tells the filter the range is no longer needed in the snapshot.
//!
//! Runs in the worker hosting its child (the supervisor places it there): the
//! snapshot calls ([`BlockIo::snapshot_read`] and the others) do not cross data
//! channels. No untrusted bytes are parsed here.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::CommonOptions;
use crate::driver::{
    BlockDriver, ChildRole, ChildSlot, Children, DriverInfo, OpenFuture, ParseError, Parsed,
    Resize, decode, opened,
};
use crate::io::{BlockIo, Extent, IoError, IoFuture, WriteFlags, ZeroFlags};

/// `snapshot-access` configuration: the generic options only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotAccessConfig {
    /// The generic node options.
    pub common: CommonOptions,
}

/// `BlockdevOptionsGenericFormat` minus its child: nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {}

/// The `snapshot-access` driver.
pub struct SnapshotAccess;

impl BlockDriver for SnapshotAccess {
    type Config = SnapshotAccessConfig;
    const INFO: DriverInfo = DriverInfo {
        name: "snapshot-access",
        image: None,
        protocol: false,
        children: &[ChildSlot {
            key: "file",
            role: ChildRole::File,
            required: true,
        }],
        reopen_options: &[],
        resize: Resize::Unsupported,
        caps: crate::node::Capabilities {
            write_zeroes: false,
            discard: true,
            discard_stats: false,
        },
        policy: "raw",
        format_threads: false,
        filter: false,
        protocol_child: false,
    };

    fn parse(members: &Map<String, Value>) -> Result<Parsed<SnapshotAccessConfig>, ParseError> {
        let _: Options = decode(members)?;
        Ok(Parsed {
            config: SnapshotAccessConfig::default(),
            image: None,
            strong: Map::new(),
        })
    }

    fn common(config: &SnapshotAccessConfig) -> &CommonOptions {
        &config.common
    }

    fn common_mut(config: &mut SnapshotAccessConfig) -> &mut CommonOptions {
        &mut config.common
    }

    fn open(_: &SnapshotAccessConfig, _: Option<OwnedFd>, mut children: Children) -> OpenFuture {
        opened(match children.take(ChildRole::File) {
            Some(file) => Ok(Arc::new(SnapshotAccessNode { file }) as Arc<dyn BlockIo>),
            None => Err(crate::OpenError::MissingChild),
        })
    }
}

/// A `snapshot-access` node.
struct SnapshotAccessNode {
    file: Arc<dyn BlockIo>,
}

impl std::fmt::Debug for SnapshotAccessNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotAccessNode").finish_non_exhaustive()
    }
}

impl BlockIo for SnapshotAccessNode {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.file.snapshot_read(offset, buf)
    }

    fn write<'a>(&'a self, _: u64, _: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.file.snapshot_discard(offset, len)
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.file.snapshot_block_status(offset, len)
    }

    fn refresh(&self) -> IoFuture<'_, ()> {
        self.file.refresh()
    }
}
