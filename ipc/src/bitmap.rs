//! A dirty bitmap's words in shared memory: a sealed region (`shm`) of whole pages the
//! supervisor creates with the bitmap. The node's worker maps it to mark writes (and an
//! export writing the image in place would too), the supervisor to clear, merge, hash
//! and count; a worker restarted or replaced maps the same words again, so no write
//! marked before its death is lost. Any process that maps it can write any bits, so
//! the bits are trusted as much as that process's writes to the image itself.

use std::ops::Deref;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use crate::shm::{ShmError, create_sealed, map_sealed, map_sealed_read_only, unmap};

const PAGE: usize = 4096;

/// Bytes of the region holding `words` words: whole pages.
pub fn region_bytes(words: usize) -> usize {
    words
        .saturating_mul(8)
        .div_ceil(PAGE)
        .max(1)
        .saturating_mul(PAGE)
}

/// Creates a zeroed region for `words` words (supervisor side).
pub fn create_region(words: usize) -> Result<OwnedFd, ShmError> {
    create_sealed(c"bulkhead-bitmap", region_bytes(words))
}

/// The words of a mapped region, unmapped when dropped.
#[derive(Debug)]
pub struct BitmapWords {
    base: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: shared memory accessed only through atomics.
unsafe impl Send for BitmapWords {}
// SAFETY: as above.
unsafe impl Sync for BitmapWords {}

impl BitmapWords {
    /// Maps a region made for `words` words, after checking its size and seals.
    pub fn map(fd: BorrowedFd<'_>, words: usize) -> Result<BitmapWords, ShmError> {
        let base = map_sealed(fd, region_bytes(words))?;
        Ok(BitmapWords {
            base: base.cast(),
            words,
        })
    }
}

impl BitmapWords {
    /// Maps a region read-only (an export offering the bitmap reads it; a descriptor
    /// from [`crate::shm::read_only_copy`] allows nothing else). Only loads are valid
    /// on the words: a store faults.
    pub fn map_read_only(fd: BorrowedFd<'_>, words: usize) -> Result<BitmapWords, ShmError> {
        let base = map_sealed_read_only(fd, region_bytes(words))?;
        Ok(BitmapWords {
            base: base.cast(),
            words,
        })
    }
}

impl Deref for BitmapWords {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned, holds at least `words` u64s (whole pages
        // of `region_bytes`), lives as long as `self`, and is only accessed through
        // atomics; any bit pattern is a valid AtomicU64.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.words) }
    }
}

impl Drop for BitmapWords {
    fn drop(&mut self) {
        // SAFETY: what `map_sealed` returned for this size; being dropped, so no
        // reference into it remains (`deref` borrows `self`).
        unsafe { unmap(self.base.cast(), region_bytes(self.words)) };
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn two_mappings_share_the_bits_and_a_remap_keeps_them() {
        let words = 600; // more than a page
        let fd = create_region(words).unwrap();
        let supervisor = BitmapWords::map(fd.as_fd(), words).unwrap();
        let worker = BitmapWords::map(fd.as_fd(), words).unwrap();
        assert_eq!(supervisor.len(), words);
        worker[599].fetch_or(1 << 63, Ordering::Relaxed);
        assert_eq!(supervisor[599].load(Ordering::Relaxed), 1 << 63);
        drop(worker);
        let again = BitmapWords::map(fd.as_fd(), words).unwrap();
        assert_eq!(again[599].load(Ordering::Relaxed), 1 << 63);
    }

    #[test]
    fn a_read_only_copy_maps_for_reading_only() {
        let words = 10;
        let fd = create_region(words).unwrap();
        let rw = BitmapWords::map(fd.as_fd(), words).unwrap();
        let ro_fd = crate::shm::read_only_copy(fd.as_fd()).unwrap();
        // No writable mapping of the copy.
        assert!(matches!(
            BitmapWords::map(ro_fd.as_fd(), words),
            Err(ShmError::Os(rustix::io::Errno::ACCESS))
        ));
        let ro = BitmapWords::map_read_only(ro_fd.as_fd(), words).unwrap();
        rw[3].fetch_or(5, Ordering::Relaxed);
        assert_eq!(ro[3].load(Ordering::Relaxed), 5);
    }

    #[test]
    fn a_region_of_another_size_or_unsealed_is_refused() {
        let fd = create_region(10).unwrap();
        assert!(matches!(
            BitmapWords::map(fd.as_fd(), 1000),
            Err(ShmError::Refused("wrong size"))
        ));
        let loose = rustix::fs::memfd_create(c"t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&loose, PAGE as u64).unwrap();
        assert!(matches!(
            BitmapWords::map(loose.as_fd(), 10),
            Err(ShmError::Refused("not sealed against resizing"))
        ));
    }

    #[test]
    fn a_dirty_bitmap_marked_through_one_mapping_reads_the_same_through_another() {
        use bulkhead_bitmap::{DirtyBitmap, words_for};
        let (size, g) = (1u64 << 30, 65536);
        let words = words_for(size, g);
        let fd = create_region(words).unwrap();
        let worker =
            DirtyBitmap::on(BitmapWords::map(fd.as_fd(), words).unwrap(), size, g).unwrap();
        let supervisor =
            DirtyBitmap::on(BitmapWords::map(fd.as_fd(), words).unwrap(), size, g).unwrap();
        let alone = DirtyBitmap::new(size, g).unwrap();
        for (off, len) in [(0, 1), (12 << 20, 3 << 20), (size - 1, 1)] {
            worker.set(off, len);
            alone.set(off, len);
        }
        assert_eq!(supervisor.count(), alone.count());
        assert_eq!(supervisor.sha256(), alone.sha256());
        supervisor.clear();
        assert_eq!(worker.count(), 0);
    }
}
