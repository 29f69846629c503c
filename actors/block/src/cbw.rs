//! The `copy-before-write` filter driver (QEMU's `block/copy-before-write.c`): before
//! a write, write-zeroes or discard changes bytes of its `file` child, the clusters
//! they touch are copied, as they were, to its `target` child, once each. The target
//! thus keeps the image as it was when the filter went in: a backup's point in
//! time, or a fleecing image (a qcow2 overlay with the source as its backing, whose
//! unallocated clusters read the unchanged source).
//!
//! Runs in a driver worker; both children may live in other processes (reached
//! through [`BlockIo`]). A cluster is copied by exactly one request at a time
//! (a claim in `inflight`): a guest write waits for a copy already running and
//! finds it done; a backup job's copy ([`BlockIo::copy_before_write`]) goes through
//! the same claims, so it never reads a cluster a guest write has already changed.
//! A copy that fails fails the guest write (QEMU's default `on-cbw-error`,
//! `break-guest-write`). No untrusted bytes are parsed here.

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

/// The unit copied (QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`).
pub const CLUSTER: u64 = 64 << 10;
/// Most clusters one read and one write carry (8 MiB).
const MAX_RUN: u64 = 128;

/// Sorted cluster numbers as runs `(first, count)` of consecutive ones, each at most
/// [`MAX_RUN`] long.
fn runs(clusters: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in clusters {
        match out.last_mut() {
            Some((first, count)) if *first + *count == c && *count < MAX_RUN => *count += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}

/// `copy-before-write` configuration: the generic options (`bitmap`, `on-cbw-error`,
/// `cbw-timeout` and `min-cluster-size` are refused for now).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CbwConfig {
    /// The generic node options.
    pub common: CommonOptions,
    /// An option given that bulkhead does not implement yet (refused at open).
    pub unsupported: bool,
    /// Saves are written compressed (a backup's `compress`: the supervisor's
    /// `x-compress`, which the QAPI schema does not let users give).
    pub compress: bool,
}

/// `BlockdevOptionsCbw` minus its children.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CbwOptions {
    bitmap: Option<Value>,
    on_cbw_error: Option<String>,
    cbw_timeout: Option<u32>,
    min_cluster_size: Option<u64>,
    x_compress: Option<bool>,
}

/// The `copy-before-write` driver.
pub struct Cbw;

impl BlockDriver for Cbw {
    type Config = CbwConfig;
    const INFO: DriverInfo = DriverInfo {
        name: "copy-before-write",
        image: None,
        protocol: false,
        children: &[
            ChildSlot {
                key: "file",
                role: ChildRole::File,
                required: true,
            },
            ChildSlot {
                key: "target",
                role: ChildRole::Target,
                required: true,
            },
        ],
        reopen_options: &[],
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
        protocol_child: false,
    };

    fn parse(members: &Map<String, Value>) -> Result<Parsed<CbwConfig>, ParseError> {
        let o: CbwOptions = decode(members)?;
        let unsupported = o.bitmap.is_some()
            || o.on_cbw_error
                .as_deref()
                .is_some_and(|e| e != "break-guest-write")
            || o.cbw_timeout.is_some_and(|t| t != 0)
            || o.min_cluster_size.is_some();
        Ok(Parsed {
            config: CbwConfig {
                unsupported,
                compress: o.x_compress.unwrap_or(false),
                ..CbwConfig::default()
            },
            image: None,
            strong: Map::new(),
        })
    }

    fn common(config: &CbwConfig) -> &CommonOptions {
        &config.common
    }

    fn common_mut(config: &mut CbwConfig) -> &mut CommonOptions {
        &mut config.common
    }

    fn open(config: &CbwConfig, _: Option<OwnedFd>, mut children: Children) -> OpenFuture {
        if config.unsupported {
            return opened(Err(crate::OpenError::Image(
                "bulkhead's copy-before-write takes no bitmap, on-cbw-error, cbw-timeout or min-cluster-size yet"
                    .into(),
            )));
        }
        let read_only = config.common.read_only;
        let (source, target) = (
            children.take(ChildRole::File),
            children.take(ChildRole::Target),
        );
        opened(match (source, target) {
            (Some(source), Some(target)) => {
                let mut cbw = CbwDriver::new(source, target, read_only);
                cbw.compress = config.compress;
                Ok(Arc::new(cbw) as Arc<dyn BlockIo>)
            }
            _ => Err(crate::OpenError::MissingChild),
        })
    }
}

/// Which clusters have been copied, and which are being copied.
#[derive(Debug, Default)]
struct Clusters {
    copied: Vec<u64>,
    inflight: HashSet<u64>,
}

impl Clusters {
    fn is_copied(&self, c: u64) -> bool {
        usize::try_from(c / 64)
            .ok()
            .and_then(|i| self.copied.get(i))
            .is_some_and(|w| w >> (c % 64) & 1 != 0)
    }

    fn mark_copied(&mut self, c: u64) {
        if let Ok(i) = usize::try_from(c / 64) {
            if self.copied.len() <= i {
                self.copied.resize(i + 1, 0);
            }
            self.copied[i] |= 1 << (c % 64);
        }
    }
}

/// A `copy-before-write` node.
pub struct CbwDriver {
    source: Arc<dyn BlockIo>,
    target: Arc<dyn BlockIo>,
    read_only: bool,
    clusters: Mutex<Clusters>,
    /// Woken when a claim is released.
    released: Notify,
    /// Saves are written compressed.
    compress: bool,
}

impl std::fmt::Debug for CbwDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CbwDriver")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl CbwDriver {
    fn new(source: Arc<dyn BlockIo>, target: Arc<dyn BlockIo>, read_only: bool) -> CbwDriver {
        CbwDriver {
            read_only: read_only || source.read_only(),
            source,
            target,
            clusters: Mutex::new(Clusters::default()),
            released: Notify::new(),
            compress: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Clusters> {
        self.clusters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies every cluster `[offset, offset + len)` touches that was not copied:
    /// those nobody copies yet are claimed at once and copied in runs (one read and
    /// one write per run of up to [`MAX_RUN`] clusters); then it waits for those
    /// other requests were copying, and takes any they failed.
    async fn before_write(&self, offset: u64, len: u64) -> Result<(), IoError> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / CLUSTER;
        let last = offset.saturating_add(len - 1) / CLUSTER;
        loop {
            // Registered before the claims, so a release meanwhile wakes it.
            let released = self.released.notified();
            let (mine, others) = {
                let mut s = self.lock();
                let mut mine = Vec::new();
                let mut others = false;
                for c in first..=last {
                    if s.is_copied(c) {
                        continue;
                    }
                    if s.inflight.insert(c) {
                        mine.push(c);
                    } else {
                        others = true;
                    }
                }
                (mine, others)
            };
            let mut result = Ok(());
            for run in runs(&mine) {
                let copied = if result.is_ok() {
                    self.copy_run(run.0, run.1).await
                } else {
                    Err(IoError::Invalid)
                };
                {
                    let mut s = self.lock();
                    for c in run.0..run.0 + run.1 {
                        s.inflight.remove(&c);
                        if copied.is_ok() {
                            s.mark_copied(c);
                        }
                    }
                }
                self.released.notify_waiters();
                if result.is_ok() {
                    result = copied;
                }
            }
            result?;
            if !others {
                return Ok(());
            }
            released.await;
        }
    }

    /// Copies `count` clusters from cluster `first` (claimed by the caller).
    async fn copy_run(&self, first: u64, count: u64) -> Result<(), IoError> {
        let size = self.source.size();
        let start = first.saturating_mul(CLUSTER);
        if start >= size {
            return Ok(());
        }
        let len = (count * CLUSTER).min(size - start);
        let end = start + len;
        // Zeroes are saved as zeroes (QEMU's block-copy does the same), never
        // unmapped: a fleecing overlay would then read the source as it is now.
        let mut buf = Vec::new();
        let mut at = start;
        while at < end {
            let before = at;
            // A failed read of the source is the backup's source error.
            let status = self.source.block_status(at, end - at).await;
            for e in status.map_err(IoError::in_source)? {
                let stop = at.saturating_add(e.length).min(end);
                if stop <= at {
                    break;
                }
                if e.zero && !e.data {
                    self.target
                        .write_zeroes(at, stop - at, ZeroFlags::default())
                        .await?;
                } else {
                    let n = usize::try_from(stop - at).map_err(|_| IoError::Invalid)?;
                    // Read straight into the target channel's shared pool when the
                    // target is in another process (its worker writes from there).
                    let mut shared = self.target.alloc_buffer(n);
                    let data: &mut [u8] = match shared.as_deref_mut() {
                        Some(b) => b,
                        None => {
                            buf.resize(n, 0);
                            &mut buf[..]
                        }
                    };
                    self.source
                        .read(at, data)
                        .await
                        .map_err(IoError::in_source)?;
                    let flags = WriteFlags {
                        compressed: self.compress,
                        ..WriteFlags::default()
                    };
                    self.target.write(at, data, flags).await?;
                }
                at = stop;
            }
            if at == before {
                return Err(IoError::Invalid);
            }
        }
        Ok(())
    }
}

impl BlockIo for CbwDriver {
    fn size(&self) -> u64 {
        self.source.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.source.read(offset, buf)
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(IoError::ReadOnly);
            }
            self.before_write(offset, buf.len() as u64).await?;
            self.source.write(offset, buf, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.source.write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.source.discard(offset, len).await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.target.flush().await?;
            self.source.flush().await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.source.block_status(offset, len)
    }

    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        self.source.read_sparse(offset, buf)
    }

    fn refresh(&self) -> IoFuture<'_, ()> {
        self.source.refresh()
    }

    fn copy_before_write(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.before_write(offset, len))
    }

    fn snapshot_read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(self.read_snapshot(offset, buf))
    }

    fn snapshot_block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(self.snapshot_status(offset, len))
    }

    fn snapshot_discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // Whole clusters only: they need not be saved any more.
            let first = offset.div_ceil(CLUSTER);
            let end = offset.saturating_add(len) / CLUSTER;
            let mut s = self.lock();
            for c in first..end {
                s.mark_copied(c);
            }
            Ok(())
        })
    }
}

/// A snapshot read's hold on its clusters: guest writes wait until it is dropped
/// (they then save the clusters as usual).
struct ReadHold<'a> {
    cbw: &'a CbwDriver,
    clusters: std::ops::RangeInclusive<u64>,
}

impl Drop for ReadHold<'_> {
    fn drop(&mut self) {
        {
            let mut s = self.cbw.lock();
            for c in self.clusters.clone() {
                s.inflight.remove(&c);
            }
        }
        self.cbw.released.notify_waiters();
    }
}

impl CbwDriver {
    /// Reads the point in time: clusters saved already from the target, the others
    /// from the source while holding them (a guest write waits, then saves them).
    async fn read_snapshot(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset.saturating_add(buf.len() as u64);
        let clusters = offset / CLUSTER..=(end - 1) / CLUSTER;
        loop {
            let released = self.released.notified();
            {
                let mut s = self.lock();
                if clusters.clone().all(|c| !s.inflight.contains(&c)) {
                    s.inflight.extend(clusters.clone());
                    break;
                }
            }
            released.await;
        }
        let _hold = ReadHold {
            cbw: self,
            clusters: clusters.clone(),
        };
        let copied: Vec<bool> = {
            let s = self.lock();
            clusters.clone().map(|c| s.is_copied(c)).collect()
        };
        let mut at = offset;
        for (i, c) in clusters.enumerate() {
            let stop = ((c + 1) * CLUSTER).min(end);
            let piece = &mut buf[(at - offset) as usize..(stop - offset) as usize];
            if copied.get(i).copied().unwrap_or(false) {
                self.target.read(at, piece).await?;
            } else {
                self.source.read(at, piece).await?;
            }
            at = stop;
        }
        Ok(())
    }

    /// The point in time's status: saved clusters as the target has them, the
    /// others as the source does.
    async fn snapshot_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, IoError> {
        let end = offset.saturating_add(len).min(self.source.size());
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let c = at / CLUSTER;
            let copied = self.lock().is_copied(c);
            // The run of clusters saved (or not) alike.
            let mut stop = ((c + 1) * CLUSTER).min(end);
            while stop < end && self.lock().is_copied(stop / CLUSTER) == copied {
                stop = ((stop / CLUSTER + 1) * CLUSTER).min(end);
            }
            // Saved clusters are as the target has them, the others as the source.
            let from = if copied { &self.target } else { &self.source };
            {
                let mut pos = at;
                while pos < stop {
                    let before = pos;
                    for e in from.block_status(pos, stop - pos).await? {
                        let l = e.length.min(stop - pos);
                        if l == 0 {
                            break;
                        }
                        out.push(Extent { length: l, ..e });
                        pos += l;
                    }
                    if pos == before {
                        return Err(IoError::Invalid);
                    }
                }
            }
            at = stop;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory node that counts reads.
    struct Mem(Mutex<Vec<u8>>, std::sync::atomic::AtomicUsize);

    impl Mem {
        fn new(len: usize, fill: u8) -> Arc<Mem> {
            Arc::new(Mem(Mutex::new(vec![fill; len]), Default::default()))
        }
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl BlockIo for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let o = offset as usize;
            buf.copy_from_slice(&self.0.lock().unwrap()[o..o + buf.len()]);
            Box::pin(async { Ok(()) })
        }
        fn write<'a>(&'a self, offset: u64, buf: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
            let o = offset as usize;
            self.0.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
            let o = offset as usize;
            self.0.lock().unwrap()[o..o + len as usize].fill(0);
            Box::pin(async { Ok(()) })
        }
        fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
            let _ = offset;
            Box::pin(async move {
                Ok(vec![Extent {
                    length: len,
                    data: true,
                    zero: false,
                    depth: 1,
                }])
            })
        }
    }

    #[tokio::test]
    async fn the_target_keeps_what_writes_overwrote_once_per_cluster() {
        let size = 4 * CLUSTER as usize + 1000;
        let (source, target) = (Mem::new(size, 1), Mem::new(size, 0));
        let cbw = CbwDriver::new(source.clone(), target.clone(), false);
        cbw.write(CLUSTER + 10, &[9; 20], WriteFlags::default())
            .await
            .unwrap();
        cbw.write(CLUSTER + 100, &[8; 20], WriteFlags::default())
            .await
            .unwrap();
        cbw.write_zeroes(4 * CLUSTER, 1000, ZeroFlags::default())
            .await
            .unwrap();
        let t = target.bytes();
        // Clusters 1 and 4 (the partial last one) hold the old bytes, once.
        assert!(
            t[CLUSTER as usize..2 * CLUSTER as usize]
                .iter()
                .all(|&b| b == 1)
        );
        assert!(t[4 * CLUSTER as usize..].iter().all(|&b| b == 1));
        assert!(t[..CLUSTER as usize].iter().all(|&b| b == 0));
        assert_eq!(source.1.load(std::sync::atomic::Ordering::Relaxed), 2);
        // A full copy afterwards takes the rest and skips what was copied: clusters
        // 0 and 2-3, in two runs (two reads).
        cbw.copy_before_write(0, size as u64).await.unwrap();
        assert_eq!(source.1.load(std::sync::atomic::Ordering::Relaxed), 4);
        let t = target.bytes();
        assert!(t.iter().all(|&b| b == 1), "the point-in-time image");
        assert_eq!(source.bytes()[CLUSTER as usize + 10], 9);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_copy_each_cluster_once() {
        let size = 8 * CLUSTER as usize;
        let (source, target) = (Mem::new(size, 7), Mem::new(size, 0));
        let cbw = Arc::new(CbwDriver::new(source.clone(), target.clone(), false));
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let cbw = Arc::clone(&cbw);
            tasks.push(tokio::spawn(async move {
                let off = (i % 8) * CLUSTER + i;
                cbw.write(off, &[i as u8; 16], WriteFlags::default()).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(target.bytes().iter().all(|&b| b == 7));
        assert_eq!(source.1.load(std::sync::atomic::Ordering::Relaxed), 8);
    }
}
