//! The `copy-on-read` filter driver (QEMU's `block/copy-on-read.c`), as a stream job
//! uses it: what the layers below its `file` child's top layer hold is copied into
//! that top layer ([`BlockIo::copy_on_read`]) piece by piece, while guest I/O passes
//! through. A piece being copied is claimed, and a guest write to it waits for the
//! copy: a copy never lands on data a guest has just written (the copy checks the
//! top layer and writes under the same claim). Reads are not copied on their own
//! (QEMU's filter copies them too; the stream job's copy covers every byte).
//!
//! Runs in a driver worker; its child may live in another process (reached through
//! [`BlockIo`]). No untrusted bytes are parsed here.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::config::CommonOptions;
use crate::driver::{
    BlockDriver, ChildRole, ChildSlot, Children, DriverInfo, OpenFuture, ParseError, Parsed,
    Resize, decode, opened,
};
use crate::io::{BlockIo, Extent, IoError, IoFuture, SparseFuture, WriteFlags, ZeroFlags};

/// The unit a write or a copy claims.
pub const PIECE: u64 = 64 << 10;
/// Most bytes one copy read and write carry.
const MAX_COPY: u64 = 4 << 20;

/// `copy-on-read` configuration: the generic options (`bottom` is refused for now).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorConfig {
    /// The generic node options.
    pub common: CommonOptions,
    /// `bottom` was given (not implemented yet: refused at open).
    pub bottom: bool,
}

/// `BlockdevOptionsCor` minus its child.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct CorOptions {
    bottom: Option<String>,
}

/// The `copy-on-read` driver.
pub struct Cor;

impl BlockDriver for Cor {
    type Config = CorConfig;
    const INFO: DriverInfo = DriverInfo {
        name: "copy-on-read",
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
            write_zeroes: true,
            discard: true,
            discard_stats: false,
        },
        policy: "raw",
        format_threads: false,
        filter: true,
        protocol_child: false,
    };

    fn parse(members: &Map<String, Value>) -> Result<Parsed<CorConfig>, ParseError> {
        let o: CorOptions = decode(members)?;
        Ok(Parsed {
            config: CorConfig {
                bottom: o.bottom.is_some(),
                ..CorConfig::default()
            },
            image: None,
            strong: Map::new(),
        })
    }

    fn common(config: &CorConfig) -> &CommonOptions {
        &config.common
    }

    fn common_mut(config: &mut CorConfig) -> &mut CommonOptions {
        &mut config.common
    }

    fn open(config: &CorConfig, _: Option<OwnedFd>, mut children: Children) -> OpenFuture {
        if config.bottom {
            return opened(Err(crate::OpenError::Image(
                "bulkhead's copy-on-read takes no 'bottom' yet".into(),
            )));
        }
        let read_only = config.common.read_only;
        opened(match children.take(ChildRole::File) {
            Some(child) => Ok(Arc::new(CorDriver {
                read_only: read_only || child.read_only(),
                child,
                claims: Mutex::new(HashSet::new()),
                released: Notify::new(),
            }) as Arc<dyn BlockIo>),
            None => Err(crate::OpenError::MissingChild),
        })
    }
}

/// A `copy-on-read` node.
pub struct CorDriver {
    child: Arc<dyn BlockIo>,
    read_only: bool,
    /// Pieces being copied or written.
    claims: Mutex<HashSet<u64>>,
    released: Notify,
}

impl std::fmt::Debug for CorDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorDriver")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Pieces held by one request, released when it drops.
struct Held<'a> {
    node: &'a CorDriver,
    pieces: Vec<u64>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        {
            let mut c = self.node.claims.lock().unwrap_or_else(|p| p.into_inner());
            for p in &self.pieces {
                c.remove(p);
            }
        }
        self.node.released.notify_waiters();
    }
}

impl CorDriver {
    /// Claims every piece `[offset, offset + len)` touches, waiting for those held.
    async fn claim(&self, offset: u64, len: u64) -> Held<'_> {
        let first = offset / PIECE;
        let last = offset.saturating_add(len.max(1) - 1) / PIECE;
        let mut held = Held {
            node: self,
            pieces: Vec::new(),
        };
        for p in first..=last {
            loop {
                let released = self.released.notified();
                if self
                    .claims
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(p)
                {
                    held.pieces.push(p);
                    break;
                }
                released.await;
            }
        }
        held
    }
}

impl BlockIo for CorDriver {
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
        Box::pin(async move {
            if self.read_only {
                return Err(IoError::ReadOnly);
            }
            let _held = self.claim(offset, buf.len() as u64).await;
            self.child.write(offset, buf, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let _held = self.claim(offset, len).await;
            self.child.write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let _held = self.claim(offset, len).await;
            self.child.discard(offset, len).await
        })
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

    fn copy_on_read(&self, offset: u64, len: u64, layers: u32) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if len == 0 {
                return Ok(());
            }
            let size = self.child.size();
            if offset >= size {
                return Ok(());
            }
            // The whole range at once: claimed (guest writes to it wait), one block
            // status, then each extent below the top copied in pieces of at most
            // `MAX_COPY`.
            let len = len.min(size - offset);
            let start = offset - offset % PIECE;
            let end = offset.saturating_add(len).next_multiple_of(PIECE).min(size);
            let _held = self.claim(start, end - start).await;
            let mut at = start;
            for e in self.child.block_status(start, end - start).await? {
                let stop = at.saturating_add(e.length).min(end);
                if stop <= at {
                    break;
                }
                let below = e.depth >= 2 && (layers == 0 || e.depth <= layers + 1);
                let mut pos = at;
                while below && pos < stop {
                    let n = MAX_COPY.min(stop - pos);
                    let mut buf = vec![0u8; usize::try_from(n).map_err(|_| IoError::Invalid)?];
                    self.child.read(pos, &mut buf).await?;
                    self.child.write(pos, &buf, WriteFlags::default()).await?;
                    pos += n;
                }
                at = stop;
            }
            if at == start {
                return Err(IoError::Invalid);
            }
            Ok(())
        })
    }
}
