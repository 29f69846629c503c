//! The node I/O interface.
//!
//! Every method takes `&self`: a node serves many requests at once (several NBD
//! clients, each with many requests in flight), so implementations use interior
//! mutability where they need it. Buffers are borrowed from the caller so that an
//! export can hand in the very buffer it received a payload into (or a slot of a data
//! channel's shared-memory pool, see `alloc_buffer`) without an extra copy.

use std::future::Future;
use std::pin::Pin;

/// A boxed future returned by [`BlockIo`] methods.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = IoResult<T>> + Send + 'a>>;

/// The future of a snapshot operation; its error is the text QEMU gives for it.
pub type SnapshotFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// What a new internal snapshot records (`blockdev-snapshot-internal-sync`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRequest {
    /// Its name (the id is chosen by the format, as QEMU's are).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Creation time, the nanoseconds.
    pub date_nsec: u32,
    /// The VM clock (a storage daemon's is the host's).
    pub vm_clock_nsec: u64,
}

/// What a node without internal snapshots answers (QEMU's `-ENOTSUP`).
pub const SNAPSHOTS_UNSUPPORTED: &str = "Operation not supported";

/// A request about a format node's persistent bitmaps (qcow2): the daemon keeps
/// them in memory of its own while the node is open and stores them back.
#[derive(Debug, Clone)]
pub enum StoredBitmaps {
    /// Hand over these usable bitmaps the image brought; the engine stops tracking
    /// them.
    Take(Vec<String>),
    /// Store these in the image (each replaces the stored one of its name).
    Store(Vec<StoredBitmap>),
    /// Drop this one from the image now.
    Remove(String),
}

/// One persistent bitmap's bits (least significant bit first, one per granule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    pub name: String,
    pub granularity: u64,
    pub enabled: bool,
    pub bits: Vec<u8>,
}

/// Result of a node I/O operation.
pub type IoResult<T> = Result<T, IoError>;

/// Why an I/O request failed. Each variant maps to one errno, which is what NBD and
/// virtio-blk clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum IoError {
    /// The operating system reported an error (the raw errno value).
    #[error("I/O error (errno {0})")]
    Os(i32),
    /// The request reaches beyond the end of the node.
    #[error("request beyond the end of the node")]
    OutOfRange,
    /// A write-type request on a read-only node.
    #[error("node is read-only")]
    ReadOnly,
    /// The node's driver cannot do this operation.
    #[error("operation not supported")]
    Unsupported,
    /// The peer serving this node went away (a worker died); the request may be retried
    /// once a replacement is up.
    #[error("node is unreachable")]
    Disconnected,
    /// The request is malformed (bad alignment, zero length where not allowed).
    #[error("invalid request")]
    Invalid,
    /// A copy's read of its source failed with this errno (a job's
    /// `on-source-error` applies); only the copying process tells it apart: across
    /// a data channel it is a plain OS error.
    #[error("reading the source failed (errno {0})")]
    Source(i32),
}

impl IoError {
    /// The errno value a protocol should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            IoError::Os(e) => *e,
            IoError::OutOfRange => libc::EINVAL,
            IoError::ReadOnly => libc::EPERM,
            IoError::Unsupported => libc::ENOTSUP,
            IoError::Disconnected => libc::EIO,
            IoError::Invalid => libc::EINVAL,
            IoError::Source(e) => *e,
        }
    }

    /// The same failure, as a copy's read of its source.
    pub fn in_source(self) -> IoError {
        match self {
            IoError::Source(_) => self,
            other => IoError::Source(other.errno()),
        }
    }

    /// Builds an error from a raw errno value, keeping the named variants stable.
    pub fn from_errno(errno: i32) -> IoError {
        IoError::Os(errno)
    }
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> IoError {
        IoError::Os(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteFlags {
    /// Force unit access: the data must be on stable storage before completion.
    pub fua: bool,
    /// The write may end past the node's end, which then grows to the write's end, as
    /// QEMU's protocol drivers grow under a format driver's allocations (no separate
    /// truncate). Drivers that cannot grow this way refuse it as out of range, and the
    /// caller resizes first.
    pub extend: bool,
    /// Store the data compressed (QEMU's `BDRV_REQ_WRITE_COMPRESSED`, which the
    /// `compress` filter adds): qcow2 compresses each cluster, and refuses a cluster
    /// already allocated; drivers that cannot compress refuse the write.
    pub compressed: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ZeroFlags {
    /// Force unit access.
    pub fua: bool,
    /// The range may be deallocated (punched) instead of written (NBD: no NO_HOLE flag).
    pub may_unmap: bool,
    /// Fail with `ENOTSUP` rather than fall back to a slow explicit write (NBD FAST_ZERO).
    pub no_fallback: bool,
}

/// One extent of block status: a run of bytes with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    /// Length in bytes (never 0).
    pub length: u64,
    /// The range holds data (as opposed to a hole).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// Allocation depth as in QEMU's `qemu:allocation-depth`: 0 unallocated in the
    /// whole chain, 1 allocated in this node's top layer, 2 in its first backing, ...
    pub depth: u32,
}

/// Where a run of guest bytes lies ([`BlockIo::map`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Plain data at this offset of the image file of one layer of the node's chain.
    Data {
        /// File offset of the run's first byte.
        host: u64,
        /// 0: the node's own file, 1: its backing's, ... (allocation depth - 1).
        layer: u32,
    },
    /// Reads as zeroes.
    Zero {
        /// Allocation depth as in [`Extent::depth`]: 0 nowhere in the chain, 1 a zero
        /// cluster of the node itself, 2 of its backing, ...
        depth: u32,
    },
    /// Only the node's driver can read it (compressed, in a backing file, ...).
    Driver,
}

/// The most runs one [`BlockIo::map`] answer holds.
pub const MAX_MAP_RUNS: usize = 512;

/// A run of guest bytes with one [`MapKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRun {
    /// Length in bytes (never 0).
    pub length: u64,
    /// Where it lies.
    pub kind: MapKind,
}

impl MapKind {
    /// The same run as seen from the node above this one in a backing chain.
    pub fn one_layer_deeper(self) -> MapKind {
        match self {
            MapKind::Data { host, layer } => MapKind::Data {
                host,
                layer: layer.saturating_add(1),
            },
            MapKind::Zero { depth: 0 } => MapKind::Zero { depth: 0 },
            MapKind::Zero { depth } => MapKind::Zero {
                depth: depth.saturating_add(1),
            },
            MapKind::Driver => MapKind::Driver,
        }
    }
}

impl MapRun {
    /// Appends `length` bytes of `kind`, merged into the last run where they continue
    /// it.
    pub fn push(runs: &mut Vec<MapRun>, length: u64, kind: MapKind) {
        if let Some(last) = runs.last_mut() {
            let merged = match (last.kind, kind) {
                (MapKind::Data { host: a, layer: x }, MapKind::Data { host: b, layer: y }) => {
                    x == y && a.checked_add(last.length) == Some(b)
                }
                (a, b) => a == b && !matches!(a, MapKind::Data { .. }),
            };
            if merged {
                last.length += length;
                return;
            }
        }
        runs.push(MapRun { length, kind });
    }
}

/// The I/O a node offers. Offsets and lengths are bytes; callers stay within
/// [`BlockIo::size`] (implementations still check and return [`IoError::OutOfRange`]).
pub trait BlockIo: Send + Sync {
    /// The node's current size in bytes.
    fn size(&self) -> u64;

    /// Whether write-type requests are refused.
    fn read_only(&self) -> bool;

    /// Reads `buf.len()` bytes at `offset`.
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()>;

    /// Writes `buf` at `offset`.
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()>;

    /// Makes `len` bytes at `offset` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()>;

    /// Discards (trims) `len` bytes at `offset`; the range's content becomes unspecified.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;

    /// Makes every completed write durable (fdatasync for files).
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Allocation status of `[offset, offset + len)`. Returns at least one extent
    /// starting at `offset`; the extents may cover less than `len` but never more.
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>>;

    /// Re-reads sizes cached from below (a child in another process may have been
    /// resized). Drivers without such caches keep this default.
    fn refresh(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Changes the node's size. Drivers that cannot resize keep this default.
    fn resize(&self, _new_size: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    /// Reads `buf.len()` bytes at `offset` for a reader that skips holes (NBD's
    /// structured reads): returns extents tiling exactly `[offset, offset +
    /// buf.len())`, adjacent ones merged when both are or both are not `zero`, and
    /// fills `buf` wherever an extent is not `zero` (zero ranges are left as they
    /// are). The default asks [`BlockIo::block_status`] until the range is covered,
    /// then reads the data runs; a node in another process does both in one round
    /// trip.
    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        Box::pin(read_sparse_default(self, offset, buf))
    }

    /// A buffer of at least `len` bytes that this node's transport can use without
    /// copying (a slot of a shared-memory pool for a node in another process), or
    /// `None` when it has no such memory (or none free right now). Exports receive
    /// payloads into it and send replies from it; any other buffer works too, at the
    /// cost of one copy.
    fn alloc_buffer(&self, _len: usize) -> Option<IoBuffer> {
        None
    }

    /// What a format driver read from its image (for queries, and the backing file
    /// the image names); `None` for the drivers without an image format.
    fn format_info(&self) -> Option<FormatInfo> {
        None
    }

    /// Writes back what a clean close of the image writes and stops the node (a
    /// format engine: reservations returned, bitmaps stored, the dirty bit cleared);
    /// later requests fail. Called when the node goes and before a reopen opens the
    /// image again; the default does nothing.
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Where the guest range `[offset, offset + len)` lies in the node's image file,
    /// from its start, in runs (possibly covering less than `len`), for an export that
    /// reads the file itself. A format driver answers; the default is unsupported.
    fn map(&self, _offset: u64, _len: u64) -> IoFuture<'_, Vec<MapRun>> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    /// Creates an internal snapshot of the image (qcow2).
    fn snapshot_create(&self, _request: SnapshotRequest) -> SnapshotFuture<'_, ()> {
        Box::pin(async { Err(SNAPSHOTS_UNSUPPORTED.to_string()) })
    }

    /// Makes sure the point-in-time image a `copy-before-write` filter keeps holds
    /// `[offset, offset + len)` (a backup job's copy): the clusters not saved yet
    /// are copied to its target now.
    fn copy_before_write(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    /// Copies into the top layer of this filter's child what the `layers` layers
    /// below it hold of `[offset, offset + len)` (0: every layer): a stream job's
    /// copy through a `copy-on-read` filter.
    fn copy_on_read(&self, _offset: u64, _len: u64, _layers: u32) -> IoFuture<'_, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    /// Reads the point in time a `copy-before-write` filter keeps (for a
    /// `snapshot-access` parent).
    fn snapshot_read<'a>(&'a self, _offset: u64, _buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    /// The block status of that point in time.
    fn snapshot_block_status(&self, _offset: u64, _len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    /// Tells a `copy-before-write` filter `[offset, offset + len)` of its point in
    /// time is no longer needed (it stops saving those clusters).
    fn snapshot_discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    /// One step of a mirror job's copy through a `mirror_top` filter (see
    /// [`crate::mirror`]).
    fn mirror(
        &self,
        _request: crate::mirror::MirrorRequest,
    ) -> IoFuture<'_, crate::mirror::MirrorStatus> {
        Box::pin(async { Err(IoError::Unsupported) })
    }

    /// Takes, stores or drops persistent bitmaps (see [`StoredBitmaps`]); what `Take`
    /// handed over, else nothing.
    fn stored_bitmaps(&self, _request: StoredBitmaps) -> SnapshotFuture<'_, Vec<StoredBitmap>> {
        Box::pin(async { Err(SNAPSHOTS_UNSUPPORTED.to_string()) })
    }

    /// Writes `name` and `format` into the image header as its backing file
    /// (`change-backing-file`); the backing node in use does not change.
    fn set_backing_file(&self, _name: String, _format: String) -> SnapshotFuture<'_, ()> {
        Box::pin(async { Err(SNAPSHOTS_UNSUPPORTED.to_string()) })
    }

    /// Deletes the internal snapshot matching `id` and/or `name`, returning it.
    fn snapshot_delete(
        &self,
        _id: Option<String>,
        _name: Option<String>,
    ) -> SnapshotFuture<'_, SnapshotEntry> {
        Box::pin(async { Err(SNAPSHOTS_UNSUPPORTED.to_string()) })
    }
}

/// What a format driver read from its image: qcow2's header, snapshot table and
/// bitmap directory. Every string comes from image bytes: untrusted, bounded by the
/// format's own limits, and checked again by the supervisor before any use beyond
/// showing it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct FormatInfo {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// The image was not closed cleanly (lazy refcounts' dirty bit).
    pub dirty: bool,
    /// `compat`: `0.10` or `1.1`.
    pub compat: String,
    /// Lazy refcounts are on.
    pub lazy_refcounts: bool,
    /// Bits per refcount.
    pub refcount_bits: u32,
    /// The image is marked corrupt.
    pub corrupt: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// `zlib` or `zstd`.
    pub compression_type: String,
    /// The backing file the image names, as written in it.
    pub backing_file: Option<String>,
    /// The backing file's format, as written in it.
    pub backing_format: Option<String>,
    /// The external data file the image names.
    pub data_file: Option<String>,
    /// The data file holds the guest data raw.
    pub data_file_raw: bool,
    /// Persistent bitmaps (with the bitmaps extension).
    pub bitmaps: Option<Vec<BitmapEntry>>,
    /// The persistent bitmaps the node has loaded, as `dirty-bitmaps` shows them, in
    /// the image's directory order.
    pub dirty_bitmaps: Vec<DirtyBitmap>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotEntry>,
}

/// One persistent bitmap of an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BitmapEntry {
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Marked in use (not cleanly stored).
    pub in_use: bool,
    /// Tracks writes when loaded (`auto`).
    pub auto: bool,
}

/// A loaded persistent dirty bitmap (QAPI `BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirtyBitmap {
    /// Its name (image bytes).
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Enabled: writes set its bits.
    pub recording: bool,
    /// Dirty bytes.
    pub count: u64,
    /// It was in use when the image was opened (not stored cleanly).
    pub inconsistent: bool,
}

/// One internal snapshot of an image (`SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotEntry {
    /// `id`.
    pub id: String,
    /// `name`.
    pub name: String,
    /// `vm-state-size`.
    pub vm_state_size: u64,
    /// `date-sec`.
    pub date_sec: u64,
    /// `date-nsec`.
    pub date_nsec: u64,
    /// `vm-clock-sec`.
    pub vm_clock_sec: u64,
    /// `vm-clock-nsec`.
    pub vm_clock_nsec: u64,
    /// `icount`, when recorded.
    pub icount: Option<u64>,
}

/// The future of [`BlockIo::read_sparse`].
pub type SparseFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Extent>, SparseReadError>> + Send + 'a>>;

/// Which half of a sparse read failed (NBD reports them with different texts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparseReadError {
    /// Asking for the block status failed (or it made no progress: `Os(EIO)`).
    #[error("block status: {0}")]
    Status(IoError),
    /// Reading a data run failed.
    #[error("read: {0}")]
    Read(IoError),
}

/// Appends block status `extents` (starting at `*pos`) up to `end` to the runs of a
/// sparse read, merging neighbours that read alike (zeroes or not), and moves `*pos`
/// past them; `false` if they covered nothing.
pub(crate) fn tile_runs(
    runs: &mut Vec<Extent>,
    extents: &[Extent],
    pos: &mut u64,
    end: u64,
) -> bool {
    let before = *pos;
    for e in extents {
        let len = e.length.min(end - *pos);
        if len == 0 {
            break;
        }
        match runs.last_mut() {
            Some(last) if last.zero == e.zero => {
                last.length += len;
                last.data |= e.data;
            }
            _ => runs.push(Extent { length: len, ..*e }),
        }
        *pos += len;
        if *pos >= end {
            break;
        }
    }
    *pos != before
}

/// [`BlockIo::read_sparse`] from `block_status` and `read`.
pub async fn read_sparse_default<N: BlockIo + ?Sized>(
    node: &N,
    offset: u64,
    buf: &mut [u8],
) -> Result<Vec<Extent>, SparseReadError> {
    let end = offset + buf.len() as u64;
    let mut runs: Vec<Extent> = Vec::with_capacity(4);
    let mut pos = offset;
    while pos < end {
        let extents = node
            .block_status(pos, end - pos)
            .await
            .map_err(SparseReadError::Status)?;
        if !tile_runs(&mut runs, &extents, &mut pos, end) {
            // A node breaking its contract (no progress): an I/O error.
            return Err(SparseReadError::Status(IoError::Os(libc::EIO)));
        }
    }
    let mut at = 0usize;
    for run in &runs {
        let len = run.length as usize;
        if !run.zero {
            node.read(offset + at as u64, &mut buf[at..at + len])
                .await
                .map_err(SparseReadError::Read)?;
        }
        at += len;
    }
    Ok(runs)
}

/// A byte buffer in memory owned by something other than the caller (a shared-memory
/// pool); it is exclusively the holder's until dropped, when the owner gets it back.
pub struct IoBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// Returns the memory to its pool when dropped (after `ptr` is last used).
    _owner: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for IoBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuffer")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

// SAFETY: the buffer is exclusively the holder's (see `from_raw_parts`), like a Vec.
unsafe impl Send for IoBuffer {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for IoBuffer {}

impl IoBuffer {
    /// Wraps `len` bytes at `ptr`, kept valid by `owner` until it is dropped.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes for as long as `owner`
    /// lives, and nothing else in this process may access it meanwhile.
    pub unsafe fn from_raw_parts(
        ptr: std::ptr::NonNull<u8>,
        len: usize,
        owner: Box<dyn Send + Sync>,
    ) -> IoBuffer {
        IoBuffer {
            ptr,
            len,
            _owner: owner,
        }
    }
}

impl std::ops::Deref for IoBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: valid and exclusive while `_owner` lives (constructor contract).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}
