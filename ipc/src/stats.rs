//! A node's statistics region: one page of shared memory holding its
//! [`bulkhead_block::stats::Counters`].
//!
//! The supervisor creates it (a sealed memfd) when it creates the node and passes it
//! with every `AddNode` of that node, first of the request's descriptors: the worker's
//! node layer updates the counters with atomics, the supervisor reads them (and sets the
//! write threshold) without a round trip, and a restarted or moved node continues the
//! same counters. The worker can write anything there, so whatever the supervisor reads
//! back is untrusted (see `supervisor::stats`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use bulkhead_block::stats::{COUNTERS_BYTES, Counters, CountersRef};

/// Bytes of a statistics region: one page, whatever [`Counters`] grows to.
pub const REGION_BYTES: usize = 4096;

const _: () = assert!(COUNTERS_BYTES <= REGION_BYTES);

/// Why a statistics region could not be created or mapped.
pub type StatsError = crate::shm::ShmError;

/// Creates a zeroed statistics region (supervisor side), sealed against resizing so the
/// worker cannot truncate it under the supervisor's mapping (which would `SIGBUS`).
pub fn create_region() -> Result<OwnedFd, StatsError> {
    crate::shm::create_sealed(c"bulkhead-stats", REGION_BYTES)
}

/// A mapped statistics region, unmapped when dropped.
#[derive(Debug)]
pub struct StatsRegion {
    base: NonNull<Counters>,
}

// SAFETY: the mapping is shared memory accessed only through the atomics of `Counters`.
unsafe impl Send for StatsRegion {}
// SAFETY: as above.
unsafe impl Sync for StatsRegion {}

impl Drop for StatsRegion {
    fn drop(&mut self) {
        // SAFETY: `base` and the length are what `map_sealed` returned; the region is
        // being dropped, so no reference into it remains.
        unsafe { crate::shm::unmap(self.base.cast(), REGION_BYTES) };
    }
}

impl StatsRegion {
    /// Maps a region after checking it has exactly [`REGION_BYTES`] and cannot be
    /// resized any more.
    pub fn map(fd: BorrowedFd<'_>) -> Result<StatsRegion, StatsError> {
        let base = crate::shm::map_sealed(fd, REGION_BYTES)?;
        Ok(StatsRegion { base: base.cast() })
    }

    /// Maps a region the caller holds.
    pub fn map_owned(fd: &OwnedFd) -> Result<StatsRegion, StatsError> {
        StatsRegion::map(fd.as_fd())
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        // SAFETY: the mapping is page-aligned, REGION_BYTES >= size_of::<Counters>(),
        // lives as long as `self`, and is only accessed through atomics. Any bit
        // pattern is a valid `Counters` (plain u64s).
        unsafe { self.base.as_ref() }
    }

    /// The counters as the node layer holds them, keeping the mapping alive.
    pub fn into_counters_ref(self: Arc<Self>) -> CountersRef {
        let ptr = self.base;
        // SAFETY: `ptr` is aligned and points into the mapping, which `self` (the owner)
        // keeps mapped; every access is atomic (see `counters`).
        unsafe { CountersRef::from_raw_parts(ptr, Box::new(self)) }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn two_mappings_of_a_region_see_the_same_counters() {
        let fd = create_region().unwrap();
        let supervisor = StatsRegion::map_owned(&fd).unwrap();
        let worker = Arc::new(StatsRegion::map_owned(&fd).unwrap()).into_counters_ref();
        worker.wr_highest_offset.store(69632, Ordering::Relaxed);
        supervisor
            .counters()
            .write_threshold
            .store(7, Ordering::Relaxed);
        assert_eq!(supervisor.counters().snapshot().wr_highest_offset, 69632);
        assert_eq!(worker.snapshot().write_threshold, 7);
        // A restarted worker maps it again and continues.
        drop(worker);
        let again = StatsRegion::map_owned(&fd).unwrap();
        assert_eq!(again.counters().snapshot().wr_highest_offset, 69632);
    }

    #[test]
    fn unsealed_or_wrongly_sized_memfds_are_refused() {
        let fd = rustix::fs::memfd_create(c"t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, REGION_BYTES as u64).unwrap();
        assert!(matches!(
            StatsRegion::map_owned(&fd),
            Err(StatsError::Refused("not sealed against resizing"))
        ));
        let small = rustix::fs::memfd_create(c"t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&small, 8).unwrap();
        assert!(matches!(
            StatsRegion::map_owned(&small),
            Err(StatsError::Refused("wrong size"))
        ));
    }
}
