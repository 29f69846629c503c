//! The buffer pool's allocator (client side).
//!
//! Only the client allocates; the allocator's state is in private memory, so the
//! server cannot corrupt it. A chunk stays reserved while a request naming it is in
//! flight (pinned), even if its owner dropped it, so the server never writes into
//! memory that was handed to someone else; an idle pool gives its pages back.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_block::{IoBuffer, IoError, IoResult};
use tokio::sync::Notify;

use super::mutex;
use crate::ring::{CHUNK, Region};

struct PoolState {
    /// One bit per chunk, set when free.
    free: Vec<u64>,
    /// Requests in flight using each chunk; a chunk freed while pinned is freed when
    /// its last request completes, so the server never writes into reused memory.
    pins: Vec<u32>,
    /// Chunks released by their owner while pinned.
    deferred: Vec<u64>,
    /// Chunks leased since the last trim: their pages may hold memory.
    dirty: Vec<u64>,
    /// Leases taken so far; the trimmer compares it between ticks to see idleness.
    leases: u64,
    chunks: usize,
    /// Set when the channel closed: nothing is allocated any more.
    closed: bool,
}

impl PoolState {
    fn is_free(&self, c: usize) -> bool {
        self.free[c / 64] & (1 << (c % 64)) != 0
    }

    fn set_free(&mut self, c: usize, free: bool) {
        if free {
            self.free[c / 64] |= 1 << (c % 64);
        } else {
            self.free[c / 64] &= !(1 << (c % 64));
        }
    }

    /// First fit of `count` consecutive free chunks.
    fn find(&self, count: usize) -> Option<usize> {
        let mut run = 0;
        let mut c = 0;
        while c < self.chunks {
            if c % 64 == 0 && run == 0 && self.free[c / 64] == 0 {
                c += 64;
                continue;
            }
            if self.is_free(c) {
                run += 1;
                if run == count {
                    return Some(c + 1 - count);
                }
            } else {
                run = 0;
            }
            c += 1;
        }
        None
    }

    fn release(&mut self, first: usize, count: usize) {
        for c in first..first + count {
            if self.pins[c] > 0 {
                self.deferred[c / 64] |= 1 << (c % 64);
            } else {
                self.set_free(c, true);
            }
        }
    }

    fn unpin(&mut self, first: usize, count: usize) {
        for c in first..first + count {
            self.pins[c] = self.pins[c].saturating_sub(1);
            if self.pins[c] == 0 && self.deferred[c / 64] & (1 << (c % 64)) != 0 {
                self.deferred[c / 64] &= !(1 << (c % 64));
                self.set_free(c, true);
            }
        }
    }
}

pub(super) struct Pool {
    region: Arc<Region>,
    state: Mutex<PoolState>,
    space: Notify,
}

/// Chunks `[first, first + count)` covering pool bytes `[off, off + len)`.
fn chunk_span(off: u64, len: u64) -> (usize, usize) {
    let first = (off / CHUNK as u64) as usize;
    let end = (off + len).div_ceil(CHUNK as u64) as usize;
    (first, end.saturating_sub(first))
}

impl Pool {
    pub(super) fn new(region: Arc<Region>) -> Pool {
        let chunks = region.pool_len() / CHUNK;
        let words = chunks.div_ceil(64);
        let mut free = vec![0u64; words];
        for c in 0..chunks {
            free[c / 64] |= 1 << (c % 64);
        }
        Pool {
            region,
            state: Mutex::new(PoolState {
                free,
                pins: vec![0; chunks],
                deferred: vec![0; words],
                dirty: vec![0; words],
                leases: 0,
                chunks,
                closed: false,
            }),
            space: Notify::new(),
        }
    }

    pub(super) fn try_lease(self: &Arc<Self>, len: usize) -> Option<Lease> {
        let count = len.div_ceil(CHUNK).max(1);
        let mut s = mutex(&self.state);
        if s.closed {
            return None;
        }
        let first = s.find(count)?;
        for c in first..first + count {
            s.set_free(c, false);
            s.dirty[c / 64] |= 1 << (c % 64);
        }
        s.leases += 1;
        Some(Lease {
            pool: Arc::clone(self),
            first,
            count,
            len,
        })
    }

    /// A lease of `len` bytes, waiting (at most `timeout`) for space if the pool is
    /// busy.
    pub(super) async fn lease(self: &Arc<Self>, len: usize, timeout: Duration) -> IoResult<Lease> {
        if len > self.region.pool_len() {
            return Err(IoError::Invalid);
        }
        if let Some(l) = self.try_lease(len) {
            return Ok(l);
        }
        tokio::time::timeout(timeout, self.wait_lease(len))
            .await
            .unwrap_or(Err(IoError::Os(libc::ETIMEDOUT)))
    }

    async fn wait_lease(self: &Arc<Self>, len: usize) -> IoResult<Lease> {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = self.try_lease(len) {
                return Ok(l);
            }
            if mutex(&self.state).closed {
                return Err(IoError::Disconnected);
            }
            notified.await;
        }
    }

    pub(super) fn pin(&self, off: u64, len: u64) {
        let (first, count) = chunk_span(off, len);
        let mut s = mutex(&self.state);
        for c in first..(first + count).min(s.chunks) {
            s.pins[c] += 1;
        }
    }

    pub(super) fn unpin(&self, off: u64, len: u64) {
        let (first, count) = chunk_span(off, len);
        let mut s = mutex(&self.state);
        let count = count.min(s.chunks.saturating_sub(first));
        s.unpin(first, count);
        drop(s);
        self.space.notify_waiters();
    }

    pub(super) fn close(&self) {
        mutex(&self.state).closed = true;
        self.space.notify_waiters();
    }

    /// Gives the memory of used chunks back to the system once the pool has been idle
    /// (no lease taken) since the previous call, whose lease count `seen` holds.
    ///
    /// Pool pages are shared memory, so every touched page stays resident (and counts
    /// in the RSS of both ends) until the pool is unmapped: a burst of 1 MiB requests
    /// would otherwise pin megabytes per channel for the life of the worker. Only free,
    /// unpinned chunks are punched (`MADV_REMOVE`, which frees the memfd's pages for
    /// both mappings; they read as zeroes afterwards), under the state lock so no
    /// lease can take one meanwhile. Returns how many chunks were released.
    pub(super) fn trim_if_idle(&self, seen: &mut u64) -> usize {
        let mut s = mutex(&self.state);
        if s.closed || s.leases != *seen {
            *seen = s.leases;
            return 0;
        }
        let mut released = 0;
        let mut c = 0;
        while c < s.chunks {
            if s.dirty[c / 64] == 0 && c % 64 == 0 {
                c += 64;
                continue;
            }
            let trimmable = |s: &PoolState, c: usize| {
                s.dirty[c / 64] & (1 << (c % 64)) != 0 && s.is_free(c) && s.pins[c] == 0
            };
            if !trimmable(&s, c) {
                c += 1;
                continue;
            }
            let first = c;
            while c < s.chunks && trimmable(&s, c) {
                s.dirty[c / 64] &= !(1 << (c % 64));
                c += 1;
            }
            // SAFETY: the range lies inside the pool mapping; no lease or request
            // uses it (free, unpinned) and none can take it while we hold the lock.
            let punched = unsafe {
                rustix::mm::madvise(
                    self.region.pool_ptr().add(first * CHUNK).cast(),
                    (c - first) * CHUNK,
                    rustix::mm::Advice::LinuxRemove,
                )
            };
            if punched.is_ok() {
                released += c - first;
            }
        }
        released
    }
}

/// Pool chunks owned by one buffer; returned (or deferred while pinned) on drop.
pub(super) struct Lease {
    pool: Arc<Pool>,
    first: usize,
    count: usize,
    len: usize,
}

impl Lease {
    pub(super) fn offset(&self) -> u64 {
        (self.first * CHUNK) as u64
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: the lease lies inside the pool.
        unsafe { self.pool.region.pool_ptr().add(self.first * CHUNK) }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        // SAFETY: leased chunks are ours alone in this process until dropped; the
        // server touches them only while a request naming them is in flight.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }

    pub(super) fn into_buffer(self) -> IoBuffer {
        let ptr = NonNull::new(self.ptr()).unwrap_or(NonNull::dangling());
        let len = self.len;
        // SAFETY: the lease keeps the region mapped and the chunks reserved for this
        // buffer alone until it is dropped (with the buffer).
        unsafe { IoBuffer::from_raw_parts(ptr, len, Box::new(self)) }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        mutex(&self.pool.state).release(self.first, self.count);
        self.pool.space.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::*;

    /// Resident pages of the mapping that contains `ptr` (from /proc/self/smaps).
    fn resident_kib_of(ptr: *const u8) -> u64 {
        let addr = ptr as u64;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&addr);
            } else if inside && let Some(kib) = line.strip_prefix("Rss:") {
                return kib.trim().trim_end_matches(" kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[tokio::test]
    async fn an_idle_pool_gives_its_pages_back_but_never_a_leased_or_pinned_chunk() {
        let (peer, _server) = served(small(), mem(1 << 20));
        let client = client_of(&peer);
        let pool = Arc::clone(&client.pool);
        let mut kept = pool.try_lease(CHUNK).unwrap();
        kept.bytes_mut().fill(0xAA);
        let mut pinned = pool.try_lease(CHUNK).unwrap();
        pinned.bytes_mut().fill(0xBB);
        pool.pin(pinned.offset(), CHUNK as u64);
        let pinned_off = pinned.offset();
        drop(pinned);
        let mut freed = pool.try_lease(2 * CHUNK).unwrap();
        freed.bytes_mut().fill(0xCC);
        let freed_off = freed.offset() as usize;
        drop(freed);
        let before = resident_kib_of(pool.region.pool_ptr());
        let mut seen = 0;
        // The first tick sees leases since the last one: not idle, nothing released.
        assert_eq!(pool.trim_if_idle(&mut seen), 0);
        assert_eq!(pool.trim_if_idle(&mut seen), 2);
        assert_eq!(pool.trim_if_idle(&mut seen), 0, "already released");
        let after = resident_kib_of(pool.region.pool_ptr());
        assert!(
            after + 2 * CHUNK as u64 / 1024 <= before,
            "{before} KiB resident before, {after} after"
        );
        // SAFETY: test-only look at chunks nobody leases now.
        let view = |off: usize| unsafe { *pool.region.pool_ptr().add(off) };
        assert_eq!(view(freed_off), 0, "a released chunk reads as zeroes");
        assert_eq!(view(pinned_off as usize), 0xBB, "pinned chunk untouched");
        assert!(
            kept.bytes().iter().all(|&b| b == 0xAA),
            "leased chunk untouched"
        );
        // Once its request completes, the pinned chunk is free and goes next time.
        pool.unpin(pinned_off, CHUNK as u64);
        assert_eq!(pool.trim_if_idle(&mut seen), 1);
        // A new lease makes the pool busy again for one tick.
        drop(pool.try_lease(CHUNK).unwrap());
        assert_eq!(pool.trim_if_idle(&mut seen), 0);
    }
}
