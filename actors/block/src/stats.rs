//! What the node layer records about the requests it passes: per-node counters, the
//! write threshold, and the write notifiers dirty bitmaps will hang on.
//!
//! Runs in driver workers, inside [`crate::node::Node`], which every request of a node
//! passes whichever process sent it (an export, a parent node in this worker, or one in
//! another worker over a data channel). Everything here is atomics: no lock, no
//! syscall, no process hop per request. The counters live in memory the node does not
//! own ([`CountersRef`]): in a worker, a sealed memfd the supervisor created and maps
//! too, so it reads them without asking and a restarted worker continues them.

use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// A node's counters, as QEMU keeps them per BlockDriverState: what `query-blockstats`
/// shows for a node (`wr_highest_offset`, and the file driver's discard counts), and
/// the write threshold. `#[repr(C)]` because the supervisor maps the same bytes.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Counters {
    /// End of the furthest write or write-zeroes seen (QEMU: `bs->wr_highest_offset`,
    /// updated whether or not the write succeeded).
    pub wr_highest_offset: AtomicU64,
    /// Offset a write-type request may not pass without an event; 0 = none. Set by the
    /// supervisor, cleared by the node when it fires.
    pub write_threshold: AtomicU64,
    /// Discards the file driver carried out (BlockStatsSpecificFile `discard-nb-ok`).
    pub discard_nb_ok: AtomicU64,
    /// Discards the file driver failed (`discard-nb-failed`).
    pub discard_nb_failed: AtomicU64,
    /// Bytes of the successful discards (`discard-bytes-ok`).
    pub discard_bytes_ok: AtomicU64,
    /// Raised after every write-type request, once the node has done it and before
    /// it completes: a guest-to-file mapping an export fetched ([`crate::BlockIo::map`])
    /// while this held an older value may be stale. See `design/data-path.md`.
    pub map_epoch: AtomicU64,
}

/// Size in bytes of [`Counters`], the size of a node's statistics region.
pub const COUNTERS_BYTES: usize = std::mem::size_of::<Counters>();

impl Counters {
    /// Whether a write-type request ending at `end` stays within the write threshold
    /// (none set, or not passed), so it needs no crossing report.
    pub fn within_threshold(&self, end: u64) -> bool {
        let threshold = self.write_threshold.load(Ordering::Relaxed);
        threshold == 0 || end <= threshold
    }

    /// Raises `wr_highest_offset` to `end` if it is below.
    pub fn wrote_up_to(&self, end: u64) {
        // A plain load first: most writes do not raise it, and a read-modify-write
        // would take the cache line exclusively on every request.
        if end > self.wr_highest_offset.load(Ordering::Relaxed) {
            self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
        }
    }

    /// A copy of the current values.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            wr_highest_offset: self.wr_highest_offset.load(Ordering::Relaxed),
            write_threshold: self.write_threshold.load(Ordering::Relaxed),
            discard_nb_ok: self.discard_nb_ok.load(Ordering::Relaxed),
            discard_nb_failed: self.discard_nb_failed.load(Ordering::Relaxed),
            discard_bytes_ok: self.discard_bytes_ok.load(Ordering::Relaxed),
        }
    }
}

/// Plain values of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// See [`Counters::wr_highest_offset`].
    pub wr_highest_offset: u64,
    /// See [`Counters::write_threshold`].
    pub write_threshold: u64,
    /// See [`Counters::discard_nb_ok`].
    pub discard_nb_ok: u64,
    /// See [`Counters::discard_nb_failed`].
    pub discard_nb_failed: u64,
    /// See [`Counters::discard_bytes_ok`].
    pub discard_bytes_ok: u64,
}

/// A node's [`Counters`], in memory kept alive by an owner (a shared mapping, or a
/// plain allocation for nodes nobody else watches).
pub struct CountersRef {
    ptr: NonNull<Counters>,
    /// Keeps the memory behind `ptr` valid; dropped after the last use of `ptr`.
    _owner: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for CountersRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CountersRef").field(&**self).finish()
    }
}

// SAFETY: `Counters` is only atomics, which any thread may access through `&`.
unsafe impl Send for CountersRef {}
// SAFETY: as above.
unsafe impl Sync for CountersRef {}

impl CountersRef {
    /// Counters in a private allocation (tests, nodes without a shared region).
    pub fn local() -> CountersRef {
        let owned = Box::new(Counters::default());
        let ptr = NonNull::from(&*owned);
        CountersRef { ptr, _owner: owned }
    }

    /// Counters at `ptr`, kept valid by `owner`.
    ///
    /// # Safety
    /// `ptr` must be aligned for `Counters` and point to `COUNTERS_BYTES` bytes that
    /// stay mapped, readable and writable for as long as `owner` lives, and that are
    /// only ever accessed atomically (by anyone, in any process).
    pub unsafe fn from_raw_parts(ptr: NonNull<Counters>, owner: Box<dyn Send + Sync>) -> Self {
        CountersRef { ptr, _owner: owner }
    }
}

impl std::ops::Deref for CountersRef {
    type Target = Counters;
    fn deref(&self) -> &Counters {
        // SAFETY: valid while `_owner` lives (constructor contract); atomics only.
        unsafe { self.ptr.as_ref() }
    }
}

/// The kind of a write-type request, as a [`WriteNotifier`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// A data write (including one `detect-zeroes` turned into write-zeroes).
    Write,
    /// A write-zeroes request.
    WriteZeroes,
    /// A discard that reached the driver (not one `discard=ignore` dropped).
    Discard,
}

/// Told about every write, write-zeroes and discard of a node once the driver has
/// carried it out (or failed it), like QEMU's `bdrv_set_dirty` in
/// `bdrv_co_write_req_finish`. Dirty bitmaps implement it. Runs on the request's
/// path: implementations must only touch memory (atomics), never block or syscall.
pub trait WriteNotifier: Send + Sync {
    /// `len` bytes at `offset` changed (or may have, if the request failed).
    fn written(&self, kind: WriteKind, offset: u64, len: u64);
}

/// The future of [`ThresholdSink::crossed`].
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Where a node reports that a write-type request crossed its write threshold (a
/// worker sends it to the supervisor, which emits `BLOCK_WRITE_THRESHOLD`). The node
/// has already cleared the threshold, so this happens at most once per threshold set.
pub trait ThresholdSink: Send + Sync {
    /// A request ending at `end` crossed `threshold`. The node waits for this before
    /// it carries the request out, so the report goes out before the request completes
    /// (QEMU emits the event before the write).
    fn crossed(&self, threshold: u64, end: u64) -> SinkFuture<'_>;
}

/// Where a format driver reports what it found wrong in its image (a worker sends it to
/// the supervisor, which emits `BLOCK_IMAGE_CORRUPTED`). Called from the driver's
/// threads: implementations must not block.
pub trait ImageEvents: Send + Sync {
    /// A metadata inconsistency: QEMU's message, the host offset and size of the
    /// access that found it, and whether the image is now marked corrupt.
    fn corrupted(&self, msg: &str, offset: Option<u64>, size: Option<u64>, fatal: bool);
}

/// Everything the node layer records for one node.
pub struct Accounting {
    /// The node's counters.
    pub counters: CountersRef,
    /// Where threshold crossings go; `None` drops them (the threshold still clears).
    pub threshold_sink: Option<std::sync::Arc<dyn ThresholdSink>>,
    /// Write notifiers (dirty bitmaps), in the order they were added.
    pub notifiers: Vec<std::sync::Arc<dyn WriteNotifier>>,
    /// Where the node's driver reports corruption; `None` only logs it.
    pub image_events: Option<std::sync::Arc<dyn ImageEvents>>,
}

impl std::fmt::Debug for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounting")
            .field("counters", &self.counters)
            .field("notifiers", &self.notifiers.len())
            .finish_non_exhaustive()
    }
}

impl Default for Accounting {
    fn default() -> Self {
        Accounting {
            counters: CountersRef::local(),
            threshold_sink: None,
            notifiers: Vec::new(),
            image_events: None,
        }
    }
}

impl Accounting {
    /// Before a write-type request reaches the driver (QEMU's
    /// `bdrv_co_write_req_prepare`): checks the write threshold. Whoever clears a set
    /// threshold reports it, so two racing requests report it once.
    /// Returns the report to await when this request crossed the threshold; `None`
    /// (the common case) costs one load.
    pub(crate) fn before_write(&self, offset: u64, len: u64) -> Option<SinkFuture<'_>> {
        let end = offset.saturating_add(len);
        let threshold = self.counters.write_threshold.load(Ordering::Relaxed);
        if threshold == 0 || end <= threshold {
            return None;
        }
        self.counters
            .write_threshold
            .compare_exchange(threshold, 0, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        self.threshold_sink
            .as_ref()
            .map(|sink| sink.crossed(threshold, end))
    }

    /// After the driver carried out (or failed) a write-type request (QEMU's
    /// `bdrv_co_write_req_finish`): the highest written offset (writes only) and the
    /// notifiers.
    pub(crate) fn after_write(&self, kind: WriteKind, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if kind != WriteKind::Discard {
            self.counters.wrote_up_to(offset.saturating_add(len));
        }
        self.counters.map_epoch.fetch_add(1, Ordering::AcqRel);
        for n in &self.notifiers {
            n.written(kind, offset, len);
        }
    }

    /// The file driver's discard accounting (QEMU's `raw_account_discard`).
    pub(crate) fn discarded(&self, len: u64, ok: bool) {
        if ok {
            self.counters.discard_nb_ok.fetch_add(1, Ordering::Relaxed);
            self.counters
                .discard_bytes_ok
                .fetch_add(len, Ordering::Relaxed);
        } else {
            self.counters
                .discard_nb_failed
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_counters_start_at_zero_and_the_highest_offset_only_grows() {
        let acct = Accounting::default();
        assert_eq!(acct.counters.snapshot(), CountersSnapshot::default());
        acct.after_write(WriteKind::Write, 4096, 512);
        acct.after_write(WriteKind::WriteZeroes, 0, 512);
        acct.after_write(WriteKind::Discard, 1 << 20, 512);
        assert_eq!(acct.counters.snapshot().wr_highest_offset, 4608);
        acct.after_write(WriteKind::Write, u64::MAX, 2);
        assert_eq!(acct.counters.snapshot().wr_highest_offset, u64::MAX);
    }

    #[test]
    fn the_counters_are_eight_byte_aligned_u64s() {
        assert_eq!(std::mem::align_of::<Counters>(), 8);
        assert_eq!(COUNTERS_BYTES % 8, 0);
    }
}
