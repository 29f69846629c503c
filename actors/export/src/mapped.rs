//! An exported node reached through its worker, or, while the supervisor grants a
//! mapping, straight on its image descriptor.
//!
//! [`MappedNode`] is the backend an export front runs requests against. Without a
//! mapping every call goes to the node's worker over the data channel (the `remote`
//! [`BlockIo`]). With one ([`Mapping`]: the image descriptor, where guest offset 0
//! lies in the file, the node's size, and the statistics of every node the request
//! would have passed), reads, sparse reads and plain writes that can complete at
//! once run here, saving the round trip and two process wake-ups per request (see
//! `design/data-path.md`, "Mapped I/O"). Whatever is left goes to the worker as
//! before: writes that would cross a write threshold (the node's own layer reports
//! the crossing), FUA, write-zeroes, discards, flushes, block status, anything out
//! of range, anything that would wait.
//!
//! What the node layer does for a write is done here too, on the same shared
//! counters: `wr_highest_offset` of every node on the way. The supervisor grants a
//! mapping only where nothing else runs on a write (no detect-zeroes, no write
//! notifiers, an active writable node), and revokes it before any command that
//! could change that; [`MappedNode::revoke`] returns once no request uses the old
//! mapping.

use std::collections::BTreeMap;
use std::future::ready;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bulkhead_block::mapped::MappedFile;
use bulkhead_block::stats::CountersRef;
use bulkhead_block::{
    BlockIo, Extent, IoBuffer, IoError, IoFuture, MapKind, MapRun, SparseFuture, SparseReadError,
    WriteFlags, ZeroFlags,
};

/// One node a mapped request passes, as its own layer would have seen it.
#[derive(Debug)]
pub struct MappedLayer {
    /// The node's shared counters (threshold, highest offset).
    pub counters: CountersRef,
    /// The node's offset of guest offset 0 (a raw node's is 0, its file child's is
    /// the raw window's start).
    pub shift: u64,
}

/// What the supervisor granted for one export.
#[derive(Debug)]
pub struct Mapping {
    /// The image.
    pub file: MappedFile,
    /// File offset of guest offset 0.
    pub base: u64,
    /// Guest bytes the mapping covers (the node's size when granted).
    pub size: u64,
    /// Plain writes may go through the descriptor.
    pub writable: bool,
    /// Every node a request passes, top first.
    pub layers: Vec<MappedLayer>,
    /// A format node (qcow2): guest offsets lie where its worker says
    /// ([`BlockIo::map`]), not at `base`; reads only. `layers` are then the format
    /// nodes of its chain, top first, whose map epochs together decide staleness.
    pub format: Option<FormatMap>,
}

/// Most runs a [`FormatMap`] keeps; past it, it starts again empty.
const MAP_CACHE_RUNS: usize = 1 << 16;
/// Guest bytes one fetch asks the worker about.
const MAP_FETCH: u64 = 64 << 20;

/// A format node's guest-to-file runs, as its worker reported them, valid while the
/// node's `map_epoch` (raised after every write-type request, before it completes)
/// still holds the value read before they were asked for.
#[derive(Debug, Default)]
pub struct FormatMap {
    cache: Mutex<MapCache>,
    /// A fetch is under way (one at a time; other misses go to the worker).
    fetching: AtomicBool,
    /// The image files of the backing layers granted (layer 1 first); a run in a
    /// layer past them goes to the worker.
    backing_files: Vec<MappedFile>,
}

impl FormatMap {
    /// A map for a chain whose backing layers' files are `backing_files`.
    pub fn new(backing_files: Vec<MappedFile>) -> FormatMap {
        FormatMap {
            backing_files,
            ..FormatMap::default()
        }
    }
}

#[derive(Debug, Default)]
struct MapCache {
    epoch: u64,
    /// Guest start → run.
    runs: BTreeMap<u64, MapRun>,
}

impl FormatMap {
    /// The pieces of `[offset, offset + len)`, each `(length, kind, offset into the
    /// run)`, if every byte is known at `epoch`.
    fn lookup(&self, epoch: u64, offset: u64, len: u64) -> Option<Vec<(u64, MapKind, u64)>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.epoch != epoch {
            return None;
        }
        let end = offset.checked_add(len)?;
        let mut pieces = Vec::with_capacity(2);
        let mut pos = offset;
        while pos < end {
            let (start, run) = cache.runs.range(..=pos).next_back()?;
            let run_end = start.checked_add(run.length)?;
            if run_end <= pos {
                return None;
            }
            let take = run_end.min(end) - pos;
            pieces.push((take, run.kind, pos - start));
            pos += take;
        }
        Some(pieces)
    }

    /// Keeps `runs` from `start`, fetched at `epoch`; runs of another epoch go.
    fn insert(&self, epoch: u64, start: u64, runs: &[MapRun]) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.epoch != epoch || cache.runs.len() + runs.len() > MAP_CACHE_RUNS {
            cache.runs.clear();
            cache.epoch = epoch;
        }
        let mut at = start;
        for r in runs {
            cache.runs.insert(at, *r);
            at = at.saturating_add(r.length);
        }
    }
}

impl Mapping {
    /// The file offset of `[offset, offset + len)`, if it lies inside the mapping.
    fn locate(&self, offset: u64, len: u64) -> Option<u64> {
        let end = offset.checked_add(len)?;
        if len == 0 || end > self.size {
            return None;
        }
        self.base.checked_add(offset)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), IoError>> {
        if self.format.is_some() {
            return self.read_format(offset, buf, true).map(|r| {
                r.map(|_| ()).map_err(|e| match e {
                    SparseReadError::Status(e) | SparseReadError::Read(e) => e,
                })
            });
        }
        let at = self.locate(offset, buf.len() as u64)?;
        self.file.read(at, buf)
    }

    /// The map epochs of the nodes now, summed (each only grows, so the sum
    /// moves whenever one does).
    fn epoch(&self) -> u64 {
        self.layers.iter().fold(0u64, |sum, l| {
            sum.wrapping_add(l.counters.map_epoch.load(Ordering::Acquire))
        })
    }

    /// A read of a format node through its cached runs: the extents it read (as the
    /// node's sparse read reports them), or `None` when a run is unknown or the
    /// read would wait. Zero runs are zeroed in `buf` only with `fill_zeroes` (a plain
    /// read); a sparse read leaves them, as `read_sparse` promises: its reader skips
    /// holes, and zeroing a 1 MiB hole took 60 % of such a read's time.
    fn read_format(
        &self,
        offset: u64,
        buf: &mut [u8],
        fill_zeroes: bool,
    ) -> Option<Result<Vec<Extent>, SparseReadError>> {
        let format = self.format.as_ref()?;
        let len = buf.len() as u64;
        if len == 0 || offset.checked_add(len)? > self.size {
            return None;
        }
        let pieces = format.lookup(self.epoch(), offset, len)?;
        let mut extents: Vec<Extent> = Vec::with_capacity(pieces.len());
        let mut pos = 0usize;
        for (length, kind, within) in pieces {
            let n = usize::try_from(length).ok()?;
            let (data, zero, depth) = match kind {
                MapKind::Data { host, layer } => {
                    let file = match layer {
                        0 => &self.file,
                        l => format.backing_files.get(usize::try_from(l - 1).ok()?)?,
                    };
                    let at = host.checked_add(within)?;
                    if let Err(e) = file.read(at, &mut buf[pos..pos + n])? {
                        return Some(Err(SparseReadError::Read(e)));
                    }
                    (true, false, layer.saturating_add(1))
                }
                MapKind::Zero { depth } => {
                    if fill_zeroes {
                        buf[pos..pos + n].fill(0);
                    }
                    (false, true, depth)
                }
                MapKind::Driver => return None,
            };
            match extents.last_mut() {
                Some(last) if last.zero == zero => {
                    last.length += length;
                    last.data |= data;
                }
                _ => extents.push(Extent {
                    length,
                    data,
                    zero,
                    depth,
                }),
            }
            pos += n;
        }
        Some(Ok(extents))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Option<Result<(), IoError>> {
        if !self.writable || self.format.is_some() {
            return None;
        }
        let len = data.len() as u64;
        let at = self.locate(offset, len)?;
        let end = offset + len;
        // A crossing is reported by the node's own layer, before the write.
        let crosses = self
            .layers
            .iter()
            .any(|l| !l.counters.within_threshold(end.saturating_add(l.shift)));
        if crosses {
            return None;
        }
        let result = self.file.write(at, data)?;
        // Whether it succeeded or not, as QEMU's bdrv_co_write_req_finish.
        for l in &self.layers {
            l.counters.wrote_up_to(end.saturating_add(l.shift));
        }
        Some(result)
    }

    /// A sparse read done here: block status, then the data runs; `None` as soon as
    /// any part would wait (reads change nothing, so the worker can redo it whole).
    fn read_sparse(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<Result<Vec<Extent>, SparseReadError>> {
        if self.format.is_some() {
            return self.read_format(offset, buf, false);
        }
        let len = buf.len() as u64;
        let at = self.locate(offset, len)?;
        let mut runs: Vec<Extent> = Vec::with_capacity(2);
        let mut done = 0u64;
        while done < len {
            let extents = match self.file.block_status(at + done, len - done) {
                Ok(e) => e,
                Err(e) => return Some(Err(SparseReadError::Status(e))),
            };
            let before = done;
            for e in extents {
                let take = e.length.min(len - done);
                if take == 0 {
                    break;
                }
                match runs.last_mut() {
                    Some(last) if last.zero == e.zero => last.length += take,
                    _ => runs.push(Extent { length: take, ..e }),
                }
                done += take;
            }
            if done == before {
                return Some(Err(SparseReadError::Status(IoError::Os(libc::EIO))));
            }
        }
        let mut pos = 0usize;
        for run in &runs {
            let n = run.length as usize;
            if !run.zero {
                match self.file.read(at + pos as u64, &mut buf[pos..pos + n])? {
                    Ok(()) => {}
                    Err(e) => return Some(Err(SparseReadError::Read(e))),
                }
            }
            pos += n;
        }
        Some(Ok(runs))
    }
}

/// How long [`MappedNode::revoke`] waits for requests still using the old mapping.
const REVOKE_WAIT: Duration = Duration::from_secs(10);

/// An exported node: its worker, and a mapping while one is granted.
pub struct MappedNode {
    remote: Arc<dyn BlockIo>,
    mapping: RwLock<Option<Arc<Mapping>>>,
}

impl std::fmt::Debug for MappedNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedNode")
            .field("mapped", &self.is_mapped())
            .finish_non_exhaustive()
    }
}

impl MappedNode {
    /// `remote`: the node as its worker serves it; no mapping yet.
    pub fn new(remote: Arc<dyn BlockIo>) -> MappedNode {
        MappedNode {
            remote,
            mapping: RwLock::new(None),
        }
    }

    fn current(&self) -> Option<Arc<Mapping>> {
        self.mapping
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a mapping is granted now.
    pub fn is_mapped(&self) -> bool {
        self.mapping
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Starts using `mapping` (replacing any earlier one, which requests still
    /// running finish on).
    pub fn grant(&self, mapping: Mapping) {
        *self.mapping.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(mapping));
    }

    /// Stops using the mapping; returns once no request uses it any more (`false`
    /// if one still did after [`REVOKE_WAIT`]). From then on, every request goes to
    /// the node's worker.
    pub async fn revoke(&self) -> bool {
        let old = self
            .mapping
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(old) = old else {
            return true;
        };
        // Requests hold their own Arc for their whole run.
        let deadline = tokio::time::Instant::now() + REVOKE_WAIT;
        while Arc::strong_count(&old) > 1 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }
}

impl MappedNode {
    /// Asks a format node's worker where the guest bytes from `offset` lie, unless
    /// the mapping is not a format one, the range is past it, or another fetch is
    /// under way; `true` once runs were kept.
    async fn fetch_map(&self, m: &Mapping, offset: u64, len: u64) -> bool {
        let Some(format) = &m.format else {
            return false;
        };
        if len == 0 || offset.saturating_add(len) > m.size {
            return false;
        }
        // Known already (a run only the driver reads): nothing to ask.
        if format.lookup(m.epoch(), offset, len).is_some() {
            return false;
        }
        if format.fetching.swap(true, Ordering::AcqRel) {
            return false;
        }
        // Cleared however the fetch ends (a dropped request included).
        struct Fetching<'a>(&'a AtomicBool);
        impl Drop for Fetching<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _fetching = Fetching(&format.fetching);
        // Read before asking: runs computed before a later write are then older
        // than the epoch that write leaves. A failed fetch only means the worker
        // serves the request.
        let epoch = m.epoch();
        let span = (m.size - offset).min(MAP_FETCH.max(len));
        match self.remote.map(offset, span).await {
            Ok(runs) if !runs.is_empty() => {
                format.insert(epoch, offset, &runs);
                true
            }
            _ => false,
        }
    }
}

impl BlockIo for MappedNode {
    fn size(&self) -> u64 {
        self.remote.size()
    }

    fn read_only(&self) -> bool {
        self.remote.read_only()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        let Some(m) = self.current() else {
            return self.remote.read(offset, buf);
        };
        if let Some(r) = m.read(offset, buf) {
            return Box::pin(ready(r));
        }
        Box::pin(async move {
            if self.fetch_map(&m, offset, buf.len() as u64).await
                && let Some(r) = m.read(offset, buf)
            {
                return r;
            }
            self.remote.read(offset, buf).await
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        if !flags.fua
            && let Some(m) = self.current()
            && let Some(r) = m.write(offset, buf)
        {
            return Box::pin(ready(r));
        }
        self.remote.write(offset, buf, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        self.remote.write_zeroes(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.remote.discard(offset, len)
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.remote.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.remote.block_status(offset, len)
    }

    fn refresh(&self) -> IoFuture<'_, ()> {
        self.remote.refresh()
    }

    fn resize(&self, new_size: u64) -> IoFuture<'_, ()> {
        self.remote.resize(new_size)
    }

    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        let Some(m) = self.current() else {
            return self.remote.read_sparse(offset, buf);
        };
        if let Some(r) = m.read_sparse(offset, buf) {
            return Box::pin(ready(r));
        }
        Box::pin(async move {
            if self.fetch_map(&m, offset, buf.len() as u64).await
                && let Some(r) = m.read_sparse(offset, buf)
            {
                return r;
            }
            self.remote.read_sparse(offset, buf).await
        })
    }

    fn alloc_buffer(&self, len: usize) -> Option<IoBuffer> {
        // A request the mapping serves reads or writes the caller's own buffer:
        // leasing shared-memory pool space would only cost time. One it does not
        // (too large to do inline) goes to the worker, which works in place on a
        // pool buffer and would otherwise need a copy.
        if self.current().is_some_and(|m| m.file.serves(len)) {
            return None;
        }
        self.remote.alloc_buffer(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A node's worker that only counts what reaches it.
    #[derive(Default)]
    struct Worker {
        calls: AtomicUsize,
        maps: AtomicUsize,
    }

    impl Worker {
        fn called(&self) -> IoFuture<'_, ()> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Box::pin(ready(Ok(())))
        }
    }

    impl BlockIo for Worker {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read<'a>(&'a self, _: u64, _: &'a mut [u8]) -> IoFuture<'a, ()> {
            self.called()
        }
        fn write<'a>(&'a self, _: u64, _: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
            self.called()
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
            self.called()
        }
        fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
            self.called()
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            self.called()
        }
        fn block_status(&self, _: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            Box::pin(ready(Ok(vec![Extent {
                length: len,
                data: true,
                zero: false,
                depth: 1,
            }])))
        }
        /// A format node's layout: 64 KiB of data at file offset 0 for guest
        /// [64 KiB, 128 KiB), then 64 KiB unallocated, then 64 KiB only the driver
        /// reads; guest [0, 64 KiB) is a zero cluster.
        fn map(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<MapRun>> {
            self.maps.fetch_add(1, Ordering::Relaxed);
            let layout = [
                MapKind::Zero { depth: 1 },
                MapKind::Data { host: 0, layer: 0 },
                MapKind::Zero { depth: 0 },
                MapKind::Driver,
            ];
            let mut runs = Vec::new();
            let mut at = offset;
            while at < offset + len && at < 4 << 16 {
                let i = (at >> 16) as usize;
                let kind = match layout[i] {
                    MapKind::Data { host, layer } => MapKind::Data {
                        host: host + (at & 0xffff),
                        layer,
                    },
                    k => k,
                };
                let take = (((at >> 16) + 1) << 16).min(offset + len) - at;
                MapRun::push(&mut runs, take, kind);
                at += take;
            }
            Box::pin(ready(Ok(runs)))
        }
    }

    struct Image {
        path: std::path::PathBuf,
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// A 1 MiB image on /dev/shm (tmpfs: mapped reads and writes both run here),
    /// 0x11 everywhere but a hole in the second half.
    fn image(name: &str) -> Option<(Image, OwnedFd)> {
        let path = std::path::Path::new("/dev/shm").join(format!(
            "bulkhead-mapped-node-{name}-{}",
            std::process::id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .ok()?;
        f.write_all(&[0x11; 1 << 19]).ok()?;
        f.set_len(1 << 20).ok()?;
        Some((Image { path }, OwnedFd::from(f)))
    }

    /// A raw node over its file child, the raw window starting at `base`.
    fn mapping(fd: OwnedFd, base: u64, writable: bool) -> Mapping {
        let file = MappedFile::new(fd, writable).expect("regular file");
        assert!(file.in_memory(), "/dev/shm is tmpfs");
        Mapping {
            file,
            base,
            size: (1 << 20) - base,
            writable,
            layers: vec![
                MappedLayer {
                    counters: CountersRef::local(),
                    shift: 0,
                },
                MappedLayer {
                    counters: CountersRef::local(),
                    shift: base,
                },
            ],
            format: None,
        }
    }

    fn node(worker: &Arc<Worker>) -> MappedNode {
        MappedNode::new(Arc::clone(worker) as Arc<dyn BlockIo>)
    }

    #[tokio::test]
    async fn mapped_reads_and_writes_never_reach_the_worker_and_count_on_every_layer() {
        let Some((_img, fd)) = image("rw") else {
            return;
        };
        let worker = Arc::new(Worker::default());
        let n = node(&worker);
        let m = mapping(fd, 4096, true);
        n.grant(m);
        let mut buf = vec![0u8; 4096];
        n.read(0, &mut buf).await.expect("read");
        assert!(buf.iter().all(|b| *b == 0x11));
        n.write(8192, &[0x22; 4096], WriteFlags::default())
            .await
            .expect("write");
        n.read(8192, &mut buf).await.expect("read back");
        assert!(buf.iter().all(|b| *b == 0x22));
        assert_eq!(worker.calls.load(Ordering::Relaxed), 0);
        let m = n.current().expect("mapped");
        let highest: Vec<u64> = m
            .layers
            .iter()
            .map(|l| l.counters.snapshot().wr_highest_offset)
            .collect();
        assert_eq!(highest, [12288, 12288 + 4096]);
        assert!(n.alloc_buffer(4096).is_none());
    }

    #[tokio::test]
    async fn a_sparse_read_reports_the_hole_and_reads_only_data() {
        let Some((_img, fd)) = image("sparse") else {
            return;
        };
        let worker = Arc::new(Worker::default());
        let n = node(&worker);
        n.grant(mapping(fd, 0, false));
        // 64 KiB of data, then 64 KiB of the hole.
        let mut buf = vec![0xffu8; 128 << 10];
        let runs = n
            .read_sparse((1 << 19) - (64 << 10), &mut buf)
            .await
            .expect("read");
        assert_eq!(runs.len(), 2);
        assert!(!runs[0].zero && runs[0].length == 64 << 10);
        assert!(runs[1].zero && runs[1].length == 64 << 10);
        assert!(buf[..64 << 10].iter().all(|b| *b == 0x11));
        assert_eq!(worker.calls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn what_the_mapping_does_not_cover_goes_to_the_worker() {
        let Some((_img, fd)) = image("fallback") else {
            return;
        };
        let worker = Arc::new(Worker::default());
        let n = node(&worker);
        let m = mapping(fd, 0, true);
        m.layers[1]
            .counters
            .write_threshold
            .store(65536, Ordering::Relaxed);
        n.grant(m);
        let calls = || worker.calls.load(Ordering::Relaxed);
        let data = [0x33u8; 4096];
        // FUA, a write that would cross a threshold, past the end, zero length.
        n.write(
            0,
            &data,
            WriteFlags {
                fua: true,
                ..Default::default()
            },
        )
        .await
        .expect("fua");
        assert_eq!(calls(), 1);
        n.write(65536 - 2048, &data, WriteFlags::default())
            .await
            .expect("crossing");
        assert_eq!(calls(), 2);
        n.write(1 << 20, &data, WriteFlags::default())
            .await
            .expect("past the end");
        assert_eq!(calls(), 3);
        let mut empty = [0u8; 0];
        n.read(0, &mut empty).await.expect("empty");
        assert_eq!(calls(), 4);
        n.write_zeroes(0, 4096, ZeroFlags::default())
            .await
            .expect("zeroes");
        n.discard(0, 4096).await.expect("discard");
        n.flush().await.expect("flush");
        assert_eq!(calls(), 7);
        // Up to the threshold is fine.
        n.write(65536 - 4096, &data, WriteFlags::default())
            .await
            .expect("below");
        assert_eq!(calls(), 7);
        // The worker-bound requests moved nothing here.
        let m = n.current().expect("mapped");
        assert_eq!(m.layers[0].counters.snapshot().wr_highest_offset, 65536);
    }

    #[tokio::test]
    async fn read_only_mappings_and_revoked_ones_send_writes_to_the_worker() {
        let Some((_img, fd)) = image("revoke") else {
            return;
        };
        let worker = Arc::new(Worker::default());
        let n = node(&worker);
        let rw = fd.try_clone().expect("dup");
        n.grant(mapping(fd, 0, false));
        n.write(0, &[1u8; 512], WriteFlags::default())
            .await
            .expect("w");
        assert_eq!(worker.calls.load(Ordering::Relaxed), 1);
        n.grant(mapping(rw, 0, true));
        n.write(0, &[1u8; 512], WriteFlags::default())
            .await
            .expect("w");
        assert_eq!(worker.calls.load(Ordering::Relaxed), 1);
        assert!(n.revoke().await);
        assert!(!n.is_mapped());
        let mut buf = [0u8; 512];
        n.read(0, &mut buf).await.expect("r");
        n.write(0, &[1u8; 512], WriteFlags::default())
            .await
            .expect("w");
        assert_eq!(worker.calls.load(Ordering::Relaxed), 3);
    }

    /// A qcow2-like node: reads go through runs its worker reported, kept until the
    /// node's map epoch moves; writes and what only the driver reads go to the worker.
    #[tokio::test]
    async fn format_reads_follow_the_runs_the_worker_reported_while_its_epoch_holds() {
        let Some((_img, fd)) = image("format") else {
            return;
        };
        let worker = Arc::new(Worker::default());
        let n = node(&worker);
        let mut m = mapping(fd, 0, false);
        m.size = 4 << 16;
        m.format = Some(FormatMap::default());
        n.grant(m);
        let calls = || worker.calls.load(Ordering::Relaxed);
        let maps = || worker.maps.load(Ordering::Relaxed);
        // The zero cluster: one fetch, from there to the end.
        let mut buf = vec![0xffu8; 4096];
        n.read(0, &mut buf).await.expect("zero cluster");
        assert!(buf.iter().all(|b| *b == 0));
        assert_eq!((calls(), maps()), (0, 1));
        // Known now: guest 64 KiB + 4 KiB is file offset 4 KiB (0x11 there), and a
        // read across data and zeroes reports both.
        n.read((1 << 16) + 4096, &mut buf).await.expect("read");
        assert!(buf.iter().all(|b| *b == 0x11));
        let mut two = vec![0xffu8; 8192];
        let runs = n
            .read_sparse((2 << 16) - 4096, &mut two)
            .await
            .expect("sparse");
        assert_eq!(runs.len(), 2);
        assert!(runs[0].data && !runs[0].zero && runs[0].depth == 1);
        assert!(runs[1].zero && runs[1].depth == 0);
        // The hole is left as it was (the reader skips it).
        assert!(two[..4096].iter().all(|b| *b == 0x11) && two[4096..].iter().all(|b| *b == 0xff));
        assert_eq!((calls(), maps()), (0, 1));
        // What only the driver reads, and every write, go to the worker.
        n.read(3 << 16, &mut buf).await.expect("driver run");
        n.write(1 << 16, &[7u8; 512], WriteFlags::default())
            .await
            .expect("write");
        assert_eq!(calls(), 2);
        // A write moved the epoch: the runs are stale and asked for again.
        let m = n.current().expect("mapped");
        m.layers[0]
            .counters
            .map_epoch
            .fetch_add(1, Ordering::AcqRel);
        n.read(1 << 16, &mut buf)
            .await
            .expect("after the epoch moved");
        assert_eq!((calls(), maps()), (2, 2));
    }
}
