//! Shared-memory rings of the data plane: the region layout, descriptors, and the
//! single-producer/single-consumer ring operations with their wake-up protocol.
//!
//! Used by the supervisor (which creates and seals the region, see [`create_region`])
//! and by every worker that serves or reaches nodes across processes (which map it,
//! see [`Region::map`]). The region is shared with another worker, so everything in
//! it is untrusted: each side keeps its own ring indices privately and only *reads*
//! the peer's index, checking it before use; descriptors are copied out of shared
//! memory once and validated on the copy, never re-read. A peer that breaks a rule
//! makes the operation fail with [`RingError::Violation`]; callers treat that as a
//! dead peer. Nothing here can crash on hostile contents.
//!
//! Layout (all offsets from the start of the memfd, see [`RingLayout`]):
//!
//! ```text
//! 0        control page: magic/version/entries/pool size (informational), then one
//!          128-byte line each for sq_tail, sq_head, cq_tail, cq_head,
//!          server_sleeping, client_sleeping, depth_hint (u32 atomics)
//! 4096     submission ring: `entries` × 64-byte [`Sqe`]
//! ...      completion ring: `entries` × 32-byte [`Cqe`]
//! pool     buffer pool (64 KiB aligned): `pool_bytes`, carved in [`CHUNK`]s by the client
//! ```

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

/// Allocation unit of the buffer pool, and its alignment.
pub const CHUNK: usize = 64 * 1024;

/// Bytes of the control page at the start of the region.
const CONTROL_BYTES: usize = 4096;
/// Distance between the shared atomics: two cache lines, so that neither false sharing
/// nor the adjacent-line prefetcher couples the producer's and consumer's indices.
const LINE: usize = 128;
const OFF_SQ_TAIL: usize = LINE;
const OFF_SQ_HEAD: usize = 2 * LINE;
const OFF_CQ_TAIL: usize = 3 * LINE;
const OFF_CQ_HEAD: usize = 4 * LINE;
const OFF_SERVER_SLEEPING: usize = 5 * LINE;
const OFF_CLIENT_SLEEPING: usize = 6 * LINE;
const OFF_DEPTH_HINT: usize = 7 * LINE;

/// Magic number at offset 0 ("BHDPRING").
pub const MAGIC: u64 = u64::from_le_bytes(*b"BHDPRING");
/// Layout version.
pub const VERSION: u32 = 1;

/// Largest number of ring entries a layout may ask for.
pub const MAX_ENTRIES: u32 = 4096;
/// Largest pool a layout may ask for.
pub const MAX_POOL_BYTES: u64 = 1 << 30;

/// Errors of region creation, mapping and ring operations.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// A system call failed.
    #[error("shared memory: {0}")]
    Os(#[from] rustix::io::Errno),
    /// The layout (from the supervisor) is unusable.
    #[error("invalid ring layout: {0}")]
    Layout(&'static str),
    /// The memfd handed in does not match the layout or is not sealed.
    #[error("shared memory region refused: {0}")]
    Region(&'static str),
    /// The peer broke the ring protocol; the channel is dead.
    #[error("data channel peer violated the ring protocol: {0}")]
    Violation(String),
}

/// The geometry of one channel's region, chosen by the supervisor and sent to both
/// ends with the channel messages (so neither end trusts the region's own header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingLayout {
    /// Entries of each ring (a power of two); also the most requests in flight.
    pub entries: u32,
    /// Bytes of the buffer pool (a multiple of [`CHUNK`]).
    pub pool_bytes: u64,
}

impl Default for RingLayout {
    /// 256 entries (the old channel's in-flight limit) and a 64 MiB pool: room for two
    /// 32 MiB requests, or a thousand small ones. Pool pages cost memory only once
    /// touched.
    fn default() -> RingLayout {
        RingLayout {
            entries: 256,
            pool_bytes: 64 << 20,
        }
    }
}

impl RingLayout {
    /// Checks the geometry is one both ends can use.
    pub fn validate(&self) -> Result<(), RingError> {
        if self.entries == 0 || !self.entries.is_power_of_two() || self.entries > MAX_ENTRIES {
            return Err(RingError::Layout(
                "entries must be a power of two up to 4096",
            ));
        }
        if self.pool_bytes == 0
            || !self.pool_bytes.is_multiple_of(CHUNK as u64)
            || self.pool_bytes > MAX_POOL_BYTES
        {
            return Err(RingError::Layout(
                "pool must be a non-zero multiple of 64 KiB up to 1 GiB",
            ));
        }
        Ok(())
    }

    fn sq_offset(&self) -> usize {
        CONTROL_BYTES
    }

    fn cq_offset(&self) -> usize {
        self.sq_offset() + self.entries as usize * size_of::<Sqe>()
    }

    /// Offset of the buffer pool in the region.
    pub fn pool_offset(&self) -> usize {
        (self.cq_offset() + self.entries as usize * size_of::<Cqe>()).next_multiple_of(CHUNK)
    }

    /// Size of the whole region in bytes.
    pub fn total_bytes(&self) -> usize {
        self.pool_offset() + self.pool_bytes as usize
    }
}

/// Operation codes of a submission.
pub mod op {
    /// Read `len` bytes into the buffer.
    pub const READ: u8 = 1;
    /// Write the buffer's `len` bytes.
    pub const WRITE: u8 = 2;
    /// Write zeroes over `len` bytes.
    pub const WRITE_ZEROES: u8 = 3;
    /// Discard `len` bytes.
    pub const DISCARD: u8 = 4;
    /// Flush.
    pub const FLUSH: u8 = 5;
    /// Block status of `len` bytes; extents are written into the buffer.
    pub const BLOCK_STATUS: u8 = 6;
    /// Size and read-only state.
    pub const INFO: u8 = 7;
    /// Block status of `len` bytes and a read of every non-zero run into the
    /// buffer; extents go to the extent buffer at `aux_off`.
    pub const READ_SPARSE: u8 = 8;
    /// Where `len` guest bytes lie in the node's image file (`BlockIo::map`); runs
    /// are written into the buffer ([`MAP_RUN_BYTES`] each).
    pub const MAP: u8 = 9;
}

/// Flag bits of a submission.
pub mod flag {
    /// Force unit access (write, write-zeroes).
    pub const FUA: u8 = 1;
    /// Write-zeroes may deallocate.
    pub const MAY_UNMAP: u8 = 2;
    /// Write-zeroes must not fall back to writing.
    pub const NO_FALLBACK: u8 = 4;
    /// A write to store compressed (`WriteFlags::compressed`).
    pub const COMPRESSED: u8 = 8;
    /// Every defined bit.
    pub const ALL: u8 = FUA | MAY_UNMAP | NO_FALLBACK | COMPRESSED;
}

/// A submission descriptor (client → server), 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sqe {
    /// Chosen by the client (slot index and sequence number), echoed in the completion.
    pub tag: u64,
    /// The node.
    pub node: u64,
    /// Byte offset in the node.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the buffer in the pool (read, write, block status).
    pub buf_off: u64,
    /// Length of the buffer.
    pub buf_len: u64,
    /// READ_SPARSE: offset in the pool of the extent buffer
    /// ([`EXTENT_BUFFER`] bytes); 0 for other ops.
    pub aux_off: u64,
    /// One of [`op`].
    pub op: u8,
    /// Bits of [`flag`].
    pub flags: u8,
    _pad: [u8; 6],
}

/// Bytes of one extent in the pool: length u64, flags u32 (1 data, 2 zero), depth u32.
pub const EXTENT_BYTES: usize = 16;
/// Most extents one completion carries.
pub const MAX_EXTENTS: usize = 1024;
/// Size of an extent buffer (block status, sparse reads).
pub const EXTENT_BUFFER: usize = MAX_EXTENTS * EXTENT_BYTES;

/// Bytes of one map run in the pool: length u64, host offset u64, kind u32 (0 data,
/// 1 zeroes, 3 driver only), then u32: the data's layer, or the zeroes' allocation
/// depth (0 for driver-only runs).
pub const MAP_RUN_BYTES: usize = 24;

/// A completion descriptor (server → client), 32 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cqe {
    /// The submission's tag.
    pub tag: u64,
    /// Info: the node size. Error: the errno of [`status::OS`].
    pub value: u64,
    /// One of [`status`].
    pub status: u32,
    /// Info: 1 if read-only. Block status, sparse read: number of extents in the
    /// buffer. A failed sparse read: 1 if the block status failed, 2 the read.
    pub aux: u32,
    _pad: [u8; 8],
}

/// Completion status codes (the [`bulkhead_block::IoError`] variants).
pub mod status {
    /// Success.
    pub const OK: u32 = 0;
    /// `IoError::Os(value)`.
    pub const OS: u32 = 1;
    /// `IoError::OutOfRange`.
    pub const OUT_OF_RANGE: u32 = 2;
    /// `IoError::ReadOnly`.
    pub const READ_ONLY: u32 = 3;
    /// `IoError::Unsupported`.
    pub const UNSUPPORTED: u32 = 4;
    /// `IoError::Disconnected`.
    pub const DISCONNECTED: u32 = 5;
    /// `IoError::Invalid`.
    pub const INVALID: u32 = 6;
}

impl Sqe {
    /// A submission with every field set.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tag: u64,
        node: u64,
        op: u8,
        flags: u8,
        offset: u64,
        len: u64,
        buf_off: u64,
        buf_len: u64,
    ) -> Sqe {
        Sqe {
            tag,
            node,
            offset,
            len,
            buf_off,
            buf_len,
            aux_off: 0,
            op,
            flags,
            _pad: [0; 6],
        }
    }

    /// The same submission with an extent buffer.
    pub fn with_aux(self, aux_off: u64) -> Sqe {
        Sqe { aux_off, ..self }
    }
}

impl Cqe {
    /// A completion.
    pub fn new(tag: u64, status: u32, value: u64, aux: u32) -> Cqe {
        Cqe {
            tag,
            value,
            status,
            aux,
            _pad: [0; 8],
        }
    }
}

/// Creates a channel region (supervisor side): a memfd of the layout's size, with the
/// informational header written, sealed against resizing so a peer cannot truncate
/// it under the other's mapping (which would turn accesses into `SIGBUS`).
pub fn create_region(layout: RingLayout) -> Result<OwnedFd, RingError> {
    use rustix::fs::{MemfdFlags, SealFlags};
    layout.validate()?;
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    let fd = match rustix::fs::memfd_create(c"bulkhead-data", flags | MemfdFlags::NOEXEC_SEAL) {
        Ok(fd) => fd,
        // Kernels before 6.3 do not know MFD_NOEXEC_SEAL.
        Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(c"bulkhead-data", flags)?,
        Err(e) => return Err(e.into()),
    };
    rustix::fs::ftruncate(&fd, layout.total_bytes() as u64)?;
    let mut header = [0u8; 24];
    header[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&layout.entries.to_le_bytes());
    header[16..24].copy_from_slice(&layout.pool_bytes.to_le_bytes());
    let n = rustix::io::pwrite(&fd, &header, 0)?;
    if n != header.len() {
        return Err(RingError::Region("short header write"));
    }
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// A mapped channel region. Unmapped when the last owner drops it.
#[derive(Debug)]
pub struct Region {
    base: NonNull<u8>,
    layout: RingLayout,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics,
// volatile copies of descriptors, or pool slices whose exclusivity the data channel
// guarantees (see `data/server.rs`).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base` and the length are exactly what `mmap` returned, and the last
        // owner is dropping it, so no reference into the mapping remains.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.layout.total_bytes()) };
    }
}

impl Region {
    /// Maps a region handed in by the supervisor, after checking it has exactly the
    /// layout's size and cannot be resized any more.
    pub fn map(fd: BorrowedFd<'_>, layout: RingLayout) -> Result<Region, RingError> {
        use rustix::fs::SealFlags;
        layout.validate()?;
        let st = rustix::fs::fstat(fd)?;
        if u64::try_from(st.st_size).ok() != Some(layout.total_bytes() as u64) {
            return Err(RingError::Region("size does not match the layout"));
        }
        let seals = rustix::fs::fcntl_get_seals(fd)?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL) {
            return Err(RingError::Region("not sealed against resizing"));
        }
        // SAFETY: a fresh shared mapping of a sealed memfd of exactly this size; we
        // pass no address hint, so nothing existing is replaced.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                layout.total_bytes(),
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(RingError::Region("null mapping"))?;
        Ok(Region { base, layout })
    }

    /// Maps a freshly created region (tests and single-process use).
    pub fn map_owned(fd: &OwnedFd, layout: RingLayout) -> Result<Region, RingError> {
        Region::map(fd.as_fd(), layout)
    }

    /// The region's geometry.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    fn atomic(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: `offset` is one of the control-page constants: in bounds, 4-aligned
        // (the mapping is page-aligned), and only ever accessed atomically.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// The client's queue depth at its latest submission, written by the client
    /// and read by the server only to decide whether to spin (an untrusted hint: a
    /// lying client only changes how long the server polls, within its bound).
    pub fn depth_hint(&self) -> &AtomicU32 {
        self.atomic(OFF_DEPTH_HINT)
    }

    /// First byte of the buffer pool.
    pub fn pool_ptr(&self) -> *mut u8 {
        // SAFETY: the pool offset lies inside the mapping.
        unsafe { self.base.as_ptr().add(self.layout.pool_offset()) }
    }

    /// Length of the buffer pool.
    pub fn pool_len(&self) -> usize {
        self.layout.pool_bytes as usize
    }

    /// Whether `[off, off + len)` lies inside the pool.
    pub fn pool_contains(&self, off: u64, len: u64) -> bool {
        off.checked_add(len)
            .is_some_and(|end| end <= self.layout.pool_bytes)
    }

    /// The pool offset of `ptr..ptr+len` if that range lies inside the pool.
    pub fn pool_offset_of(&self, ptr: *const u8, len: usize) -> Option<u64> {
        let start = self.pool_ptr() as usize;
        let p = ptr as usize;
        let off = p.checked_sub(start)?;
        self.pool_contains(off as u64, len as u64)
            .then_some(off as u64)
    }

    /// The submission ring as its producer (client side).
    pub fn sq_producer(self: &Arc<Self>) -> Producer<Sqe> {
        Producer {
            _region: Arc::clone(self),
            ring: self.ring(
                self.layout.sq_offset(),
                OFF_SQ_HEAD,
                OFF_SQ_TAIL,
                OFF_SERVER_SLEEPING,
            ),
            tail: 0,
            head_seen: 0,
        }
    }

    /// The submission ring as its consumer (server side).
    pub fn sq_consumer(self: &Arc<Self>) -> Consumer<Sqe> {
        Consumer {
            _region: Arc::clone(self),
            ring: self.ring(
                self.layout.sq_offset(),
                OFF_SQ_HEAD,
                OFF_SQ_TAIL,
                OFF_SERVER_SLEEPING,
            ),
            head: 0,
        }
    }

    /// The completion ring as its producer (server side).
    pub fn cq_producer(self: &Arc<Self>) -> Producer<Cqe> {
        Producer {
            _region: Arc::clone(self),
            ring: self.ring(
                self.layout.cq_offset(),
                OFF_CQ_HEAD,
                OFF_CQ_TAIL,
                OFF_CLIENT_SLEEPING,
            ),
            tail: 0,
            head_seen: 0,
        }
    }

    /// The completion ring as its consumer (client side).
    pub fn cq_consumer(self: &Arc<Self>) -> Consumer<Cqe> {
        Consumer {
            _region: Arc::clone(self),
            ring: self.ring(
                self.layout.cq_offset(),
                OFF_CQ_HEAD,
                OFF_CQ_TAIL,
                OFF_CLIENT_SLEEPING,
            ),
            head: 0,
        }
    }

    fn ring<T>(&self, entries_off: usize, head: usize, tail: usize, sleeping: usize) -> RingRef<T> {
        RingRef {
            // SAFETY: the ring lies inside the mapping (see `RingLayout`).
            entries: unsafe { self.base.as_ptr().add(entries_off).cast::<T>() },
            mask: self.layout.entries - 1,
            head: self.atomic(head),
            tail: self.atomic(tail),
            sleeping: self.atomic(sleeping),
        }
    }
}

/// Raw view of one ring inside a region. Valid while the region is mapped: the
/// `Producer`/`Consumer` holding it also holds the `Region`.
struct RingRef<T> {
    entries: *mut T,
    mask: u32,
    head: *const AtomicU32,
    tail: *const AtomicU32,
    sleeping: *const AtomicU32,
}

// SAFETY: the pointers target shared memory accessed only through atomics and
// volatile copies; moving the view between threads changes nothing.
unsafe impl<T> Send for RingRef<T> {}

impl<T> RingRef<T> {
    fn head(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping (see the struct comment).
        unsafe { &*self.head }
    }
    fn tail(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.tail }
    }
    fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.sleeping }
    }
    fn entries(&self) -> u32 {
        self.mask + 1
    }
}

/// The producing end of a ring. Keeps its tail privately; reads the consumer's head
/// and refuses impossible values.
pub struct Producer<T> {
    _region: Arc<Region>,
    ring: RingRef<T>,
    tail: u32,
    head_seen: u32,
}

impl<T: Copy> Producer<T> {
    /// Appends `entry` without publishing it. A full ring is a violation: each side
    /// keeps at most `entries` requests in flight, so an honest peer never fills it.
    pub fn push(&mut self, entry: T) -> Result<(), RingError> {
        let head = self.ring.head().load(Ordering::Acquire);
        // The head may only move forward, and never past what we published.
        let used = self.tail.wrapping_sub(head);
        if used > self.ring.entries()
            || head.wrapping_sub(self.head_seen) > self.tail.wrapping_sub(self.head_seen)
        {
            return Err(RingError::Violation(format!(
                "consumer head {head} outside [{}, {}]",
                self.head_seen, self.tail
            )));
        }
        self.head_seen = head;
        if used == self.ring.entries() {
            return Err(RingError::Violation("ring full".into()));
        }
        let slot = (self.tail & self.ring.mask) as usize;
        // SAFETY: `slot` < entries, so the write stays inside the ring; T is a plain
        // repr(C) descriptor. Volatile: the peer reads this memory concurrently.
        unsafe { std::ptr::write_volatile(self.ring.entries.add(slot), entry) };
        self.tail = self.tail.wrapping_add(1);
        Ok(())
    }

    /// Publishes every pushed entry and says whether the consumer asked to be woken
    /// (it had gone to sleep): then the caller rings its doorbell. Taking the flag
    /// (swap to 0) makes concurrent producers ring at most once per sleep.
    #[must_use]
    pub fn publish(&mut self) -> bool {
        // SeqCst store + SeqCst swap against the consumer's SeqCst store of the flag +
        // SeqCst load of the tail (`Consumer::prepare_sleep`): at least one side sees
        // the other's write, so a submission is never left without a wake-up.
        self.ring.tail().store(self.tail, Ordering::SeqCst);
        self.ring.sleeping().swap(0, Ordering::SeqCst) != 0
    }
}

/// The consuming end of a ring. Keeps its head privately; reads the producer's tail
/// and refuses impossible values.
pub struct Consumer<T> {
    _region: Arc<Region>,
    ring: RingRef<T>,
    head: u32,
}

impl<T: Copy> Consumer<T> {
    /// Whether entries are waiting (a cheap check for spinning).
    pub fn has_work(&self) -> bool {
        self.ring.tail().load(Ordering::Acquire) != self.head
    }

    /// Copies every waiting entry (at most `entries`) into `out` and releases their
    /// slots to the producer. Returns how many were taken.
    pub fn drain(&mut self, out: &mut Vec<T>) -> Result<usize, RingError> {
        let tail = self.ring.tail().load(Ordering::Acquire);
        let avail = tail.wrapping_sub(self.head);
        if avail > self.ring.entries() {
            return Err(RingError::Violation(format!(
                "producer tail {tail} is {avail} entries past head {}",
                self.head
            )));
        }
        for _ in 0..avail {
            let slot = (self.head & self.ring.mask) as usize;
            // SAFETY: `slot` < entries; every bit pattern is a valid T (plain integer
            // fields). Volatile: the producer may (if hostile) write concurrently; we
            // copy once and validate only the copy.
            out.push(unsafe { std::ptr::read_volatile(self.ring.entries.add(slot)) });
            self.head = self.head.wrapping_add(1);
        }
        if avail > 0 {
            self.ring.head().store(self.head, Ordering::Release);
        }
        Ok(avail as usize)
    }

    /// Announces that this side is about to sleep on its doorbell. Returns `false`
    /// (and withdraws the announcement) if entries arrived meanwhile.
    pub fn prepare_sleep(&self) -> bool {
        self.ring.sleeping().store(1, Ordering::SeqCst);
        if self.ring.tail().load(Ordering::SeqCst) != self.head {
            self.ring.sleeping().store(0, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Withdraws a sleep announcement after waking.
    pub fn woke(&self) {
        self.ring.sleeping().store(0, Ordering::Relaxed);
    }
}

/// How long the client's completion reaper spins for completions, while requests
/// are in flight, before sleeping on its doorbell: `BULKHEAD_DATA_SPIN_US` if set
/// (0 disables spinning), else [`DEFAULT_CLIENT_SPIN_US`].
pub fn client_spin() -> std::time::Duration {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| spin_from_env("BULKHEAD_DATA_SPIN_US", DEFAULT_CLIENT_SPIN_US))
}

/// How long the server spins for new submissions after its last batch before
/// sleeping: `BULKHEAD_DATA_SERVER_SPIN_US` if set, else [`DEFAULT_SERVER_SPIN_US`].
pub fn server_spin() -> std::time::Duration {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| spin_from_env("BULKHEAD_DATA_SERVER_SPIN_US", DEFAULT_SERVER_SPIN_US))
}

fn spin_from_env(var: &str, default: u64) -> std::time::Duration {
    let us = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .min(1000);
    std::time::Duration::from_micros(us)
}

/// Default client spin (see `design/data-path.md` for the measurements).
pub const DEFAULT_CLIENT_SPIN_US: u64 = 30;
/// Default server spin (see `design/data-path.md` for the measurements).
pub const DEFAULT_SERVER_SPIN_US: u64 = 60;

/// Spins until `ready()` or `budget` has passed. Yields the CPU between probes, so
/// on a machine with fewer cores than runnable threads the peer we wait for still
/// gets to run.
pub fn spin_until(budget: std::time::Duration, mut ready: impl FnMut() -> bool) -> bool {
    if budget.is_zero() {
        return ready();
    }
    let start = std::time::Instant::now();
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= budget {
            return ready();
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> RingLayout {
        RingLayout {
            entries: 4,
            pool_bytes: CHUNK as u64 * 2,
        }
    }

    fn region(layout: RingLayout) -> (OwnedFd, Arc<Region>) {
        let fd = create_region(layout).unwrap();
        let r = Region::map_owned(&fd, layout).unwrap();
        (fd, Arc::new(r))
    }

    #[test]
    fn descriptors_have_their_documented_sizes() {
        assert_eq!(size_of::<Sqe>(), 64);
        assert_eq!(size_of::<Cqe>(), 32);
        let l = RingLayout::default();
        assert_eq!(l.pool_offset() % CHUNK, 0);
        assert_eq!(l.total_bytes(), 64 * 1024 + (64 << 20));
    }

    #[test]
    fn a_created_region_is_sealed_and_maps_only_with_its_own_layout() {
        let layout = small();
        let fd = create_region(layout).unwrap();
        assert_eq!(
            rustix::fs::ftruncate(&fd, 1 << 20),
            Err(rustix::io::Errno::PERM)
        );
        assert!(matches!(
            Region::map_owned(
                &fd,
                RingLayout {
                    pool_bytes: CHUNK as u64,
                    ..layout
                }
            ),
            Err(RingError::Region("size does not match the layout"))
        ));
        let r = Region::map_owned(&fd, layout).unwrap();
        assert_eq!(r.pool_len(), 2 * CHUNK);
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        let layout = small();
        let fd = rustix::fs::memfd_create(c"t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, layout.total_bytes() as u64).unwrap();
        assert!(matches!(
            Region::map_owned(&fd, layout),
            Err(RingError::Region("not sealed against resizing"))
        ));
    }

    #[test]
    fn bad_layouts_are_refused() {
        for l in [
            RingLayout {
                entries: 3,
                pool_bytes: CHUNK as u64,
            },
            RingLayout {
                entries: 0,
                pool_bytes: CHUNK as u64,
            },
            RingLayout {
                entries: 8192,
                pool_bytes: CHUNK as u64,
            },
            RingLayout {
                entries: 8,
                pool_bytes: 1000,
            },
            RingLayout {
                entries: 8,
                pool_bytes: 0,
            },
        ] {
            assert!(matches!(l.validate(), Err(RingError::Layout(_))), "{l:?}");
        }
    }

    #[test]
    fn a_full_ring_refuses_more_and_wraps_around_after_draining() {
        let (_fd, r) = region(small());
        let mut p = r.sq_producer();
        let mut c = r.sq_consumer();
        let mut out = Vec::new();
        // Ten rounds through a four-entry ring: indices wrap many times.
        for round in 0..10u64 {
            for i in 0..4 {
                p.push(Sqe::new(round * 4 + i, 0, op::READ, 0, 0, 0, 0, 0))
                    .unwrap();
            }
            assert!(matches!(
                p.push(Sqe::default()),
                Err(RingError::Violation(m)) if m == "ring full"
            ));
            let _ = p.publish();
            out.clear();
            assert_eq!(c.drain(&mut out).unwrap(), 4);
            let tags: Vec<u64> = out.iter().map(|s| s.tag).collect();
            assert_eq!(tags, (round * 4..round * 4 + 4).collect::<Vec<_>>());
        }
        assert!(!c.has_work());
    }

    #[test]
    fn indices_wrap_around_u32() {
        let (_fd, r) = region(small());
        let mut p = r.cq_producer();
        let mut c = r.cq_consumer();
        p.tail = u32::MAX - 1;
        p.head_seen = u32::MAX - 1;
        c.head = u32::MAX - 1;
        c.ring.head().store(u32::MAX - 1, Ordering::Relaxed);
        for t in 0..3 {
            p.push(Cqe::new(t, 0, 0, 0)).unwrap();
        }
        let _ = p.publish();
        let mut out = Vec::new();
        assert_eq!(c.drain(&mut out).unwrap(), 3);
        assert_eq!(out.iter().map(|e| e.tag).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(c.head, 1);
    }

    #[test]
    fn a_tail_beyond_the_ring_is_a_violation() {
        let (_fd, r) = region(small());
        let mut c = r.sq_consumer();
        // A hostile producer claims 1000 entries.
        c.ring.tail().store(1000, Ordering::Release);
        let mut out = Vec::new();
        assert!(matches!(c.drain(&mut out), Err(RingError::Violation(_))));
        assert!(out.is_empty());
    }

    #[test]
    fn a_head_moved_past_the_tail_is_a_violation() {
        let (_fd, r) = region(small());
        let mut p = r.sq_producer();
        p.push(Sqe::default()).unwrap();
        let _ = p.publish();
        // A hostile consumer claims to have taken five of one.
        p.ring.head().store(5, Ordering::Release);
        assert!(matches!(
            p.push(Sqe::default()),
            Err(RingError::Violation(_))
        ));
    }

    #[test]
    fn a_sleeping_consumer_is_woken_exactly_once() {
        let (_fd, r) = region(small());
        let mut p = r.sq_producer();
        let c = r.sq_consumer();
        assert!(c.prepare_sleep());
        p.push(Sqe::default()).unwrap();
        assert!(p.publish());
        p.push(Sqe::default()).unwrap();
        assert!(!p.publish());
        // With work waiting, the consumer does not go to sleep at all.
        assert!(!c.prepare_sleep());
    }

    #[test]
    fn pool_ranges_are_checked_without_overflow() {
        let (_fd, r) = region(small());
        assert!(r.pool_contains(0, 2 * CHUNK as u64));
        assert!(!r.pool_contains(1, 2 * CHUNK as u64));
        assert!(!r.pool_contains(u64::MAX, 2));
        let p = r.pool_ptr();
        assert_eq!(r.pool_offset_of(p, 10), Some(0));
        // SAFETY: one chunk into a two-chunk pool stays inside the mapping.
        let second = unsafe { p.add(CHUNK) };
        assert_eq!(r.pool_offset_of(second, CHUNK), Some(CHUNK as u64));
        let outside = [0u8; 4];
        assert_eq!(r.pool_offset_of(outside.as_ptr(), 4), None);
    }
}
