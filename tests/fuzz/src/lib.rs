//! Helpers shared by the data-channel targets: a channel in this process, with the
//! hostile end's view of the shared region.

use std::os::fd::AsFd;
use std::sync::Arc;

use bulkhead_block::BlockIo;
use bulkhead_ipc::data::{ChannelFds, NewChannel, NodeLookup};
use bulkhead_ipc::ring::{CHUNK, Region, RingLayout};
use bulkhead_ipc::wire::NodeId;
use bulkhead_nbd::testing::MemBackend;

/// A small geometry, so random offsets and indices often land inside it.
pub const LAYOUT: RingLayout = RingLayout {
    entries: 8,
    pool_bytes: 4 * CHUNK as u64,
};

/// Turns the spin phases off: they only burn time here (and add timing noise).
pub fn no_spinning() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: runs before the first channel exists, while libFuzzer has not started
        // any other thread; nothing reads the environment concurrently.
        unsafe {
            std::env::set_var("BULKHEAD_DATA_SPIN_US", "0");
            std::env::set_var("BULKHEAD_DATA_SERVER_SPIN_US", "0");
        }
    });
}

/// Both ends of a fresh channel: (server, client).
pub fn channel() -> Option<(ChannelFds, ChannelFds)> {
    NewChannel::create(LAYOUT).ok()?.into_ends().ok()
}

/// The hostile end's mapping of the region.
pub fn map(fds: &ChannelFds) -> Option<Arc<Region>> {
    Region::map(fds.region.as_fd(), LAYOUT).ok().map(Arc::new)
}

/// Writes `value` at `at` (rounded down to 4 bytes) anywhere before the pool: the
/// control page and both rings, as a hostile peer may.
pub fn poke(region: &Region, at: u32, value: u32) {
    let before_pool = LAYOUT.pool_offset();
    let at = (at as usize % before_pool) & !3;
    // SAFETY: `at` + 4 <= the pool offset, inside our own mapping, 4-aligned (the
    // mapping is page-aligned); the other end only reads this memory atomically or
    // with volatile copies.
    unsafe {
        let base = region.pool_ptr().sub(before_pool);
        let cell = std::sync::atomic::AtomicU32::from_ptr(base.add(at).cast());
        cell.store(value, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `bytes` into the pool at `at` (clipped to the pool).
pub fn write_pool(region: &Region, at: u64, bytes: &[u8]) {
    let len = region.pool_len();
    let Ok(at) = usize::try_from(at) else { return };
    if at >= len {
        return;
    }
    let n = bytes.len().min(len - at);
    // SAFETY: `[at, at + n)` lies inside the pool of our own mapping; the other end
    // treats pool bytes as untrusted and copies them with plain reads of memory it
    // may share, which a concurrent write cannot make unsound for it.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.pool_ptr().add(at), n) };
}

/// Rings a doorbell eventfd.
pub fn ring(fd: std::os::fd::BorrowedFd<'_>) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Nodes 1 (1 MiB + 100 bytes, writable) and 2 (64 KiB, read-only); others unknown.
pub struct Nodes {
    rw: Arc<dyn BlockIo>,
    ro: Arc<dyn BlockIo>,
}

impl Nodes {
    /// Fresh zeroed nodes.
    pub fn new() -> Arc<Nodes> {
        Arc::new(Nodes {
            rw: MemBackend::new((1 << 20) + 100),
            ro: MemBackend::read_only(65536),
        })
    }
}

impl NodeLookup for Nodes {
    fn lookup(&self, node: NodeId) -> Option<Arc<dyn BlockIo>> {
        match node.0 {
            1 => Some(Arc::clone(&self.rw)),
            2 => Some(Arc::clone(&self.ro)),
            _ => None,
        }
    }
}
