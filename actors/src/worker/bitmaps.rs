//! Dirty bitmaps a driver worker's node marks: the node layer's write notifier over
//! the regions the supervisor owns (`bulkhead_ipc::bitmap`).
//!
//! Runs in driver workers. The supervisor creates every bitmap's region and keeps it
//! (clear, merge, counts and hashes need no round trip); a node's worker maps the
//! enabled ones and marks every write, write-zeroes and discard that reached the
//! driver. The set arrives with `AddNode` (so a restarted worker marks from its
//! first request on) and again with `SetBitmaps` whenever it changes; a reopen keeps
//! it. Marking is a few atomic `fetch_or`s in shared memory: no syscall, no wait.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, RwLock};

use bulkhead_bitmap::{DirtyBitmap, words_for};
use bulkhead_block::stats::{WriteKind, WriteNotifier};
use bulkhead_ipc::bitmap::BitmapWords;
use bulkhead_ipc::wire::{BitmapSpec, MAX_RECORDING_BITMAPS, WorkerError, WorkerErrorKind};

/// One mapped bitmap.
type Mapped = DirtyBitmap<BitmapWords>;

/// The bitmaps one node marks. Shared by the node's accounting (across reopens) and
/// the worker's table, which replaces the set.
#[derive(Default)]
pub(crate) struct NodeBitmaps {
    /// The set; replaced whole, read under a lock that only `SetBitmaps` writes.
    set: RwLock<Arc<[Mapped]>>,
}

impl std::fmt::Debug for NodeBitmaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBitmaps")
            .field("bitmaps", &self.current().len())
            .finish()
    }
}

impl NodeBitmaps {
    fn current(&self) -> Arc<[Mapped]> {
        Arc::clone(&self.set.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Marks with `maps` from now on.
    pub(crate) fn replace(&self, maps: Vec<Mapped>) {
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = maps.into();
    }
}

impl WriteNotifier for NodeBitmaps {
    fn written(&self, _kind: WriteKind, offset: u64, len: u64) {
        // Every kind dirties (QEMU's `bdrv_set_dirty` does not tell them apart).
        let set = self.set.read().unwrap_or_else(|p| p.into_inner());
        for b in set.iter() {
            b.set(offset, len);
        }
    }
}

/// Maps the regions the supervisor attached, one per spec, in order. The sizes come
/// from the supervisor and are checked against the regions themselves.
pub(crate) fn map_all(specs: &[BitmapSpec], fds: &[OwnedFd]) -> Result<Vec<Mapped>, WorkerError> {
    let invalid = |detail: String| WorkerError::new(WorkerErrorKind::Invalid, libc::EINVAL, detail);
    if specs.len() != fds.len() || specs.len() > MAX_RECORDING_BITMAPS {
        return Err(invalid(format!(
            "{} bitmaps with {} regions",
            specs.len(),
            fds.len()
        )));
    }
    specs
        .iter()
        .zip(fds)
        .map(|(s, fd)| {
            bulkhead_bitmap::check_granularity(s.granularity)
                .map_err(|e| invalid(e.to_string()))?;
            let words = words_for(s.size, s.granularity);
            let mapped = BitmapWords::map(fd.as_fd(), words).map_err(|e| invalid(e.to_string()))?;
            DirtyBitmap::on(mapped, s.size, s.granularity).map_err(|e| invalid(e.to_string()))
        })
        .collect()
}

/// Maps persistent bitmaps' regions (`TakeBitmaps`, `StoreBitmaps`): one per spec,
/// at most a message's descriptors, read-only when the worker only reads them.
pub(crate) fn map_regions(
    specs: impl ExactSizeIterator<Item = BitmapSpec>,
    fds: &[OwnedFd],
    read_only: bool,
) -> Result<Vec<Mapped>, WorkerError> {
    let invalid = |detail: String| WorkerError::new(WorkerErrorKind::Invalid, libc::EINVAL, detail);
    if specs.len() != fds.len() || fds.len() > bulkhead_ipc::fd::MAX_FDS_PER_MESSAGE {
        return Err(invalid(format!(
            "{} bitmaps with {} regions",
            specs.len(),
            fds.len()
        )));
    }
    specs
        .zip(fds)
        .map(|(s, fd)| {
            bulkhead_bitmap::check_granularity(s.granularity)
                .map_err(|e| invalid(e.to_string()))?;
            let words = words_for(s.size, s.granularity);
            let mapped = if read_only {
                BitmapWords::map_read_only(fd.as_fd(), words)
            } else {
                BitmapWords::map(fd.as_fd(), words)
            }
            .map_err(|e| invalid(e.to_string()))?;
            DirtyBitmap::on(mapped, s.size, s.granularity).map_err(|e| invalid(e.to_string()))
        })
        .collect()
}

/// Fills each region of `TakeBitmaps` with the bits the engine handed over for its
/// name; a bitmap asked for but not handed over (or of another granularity) is an
/// error, and the supervisor leaves it with the image.
pub(crate) fn fill_taken(
    asked: &[(String, BitmapSpec)],
    maps: &[Mapped],
    taken: &[bulkhead_block::StoredBitmap],
) -> Result<(), WorkerError> {
    for ((name, spec), map) in asked.iter().zip(maps) {
        let t = taken
            .iter()
            .find(|t| &t.name == name && t.granularity == spec.granularity)
            .ok_or_else(|| {
                WorkerError::new(
                    WorkerErrorKind::NotFound,
                    libc::ENOENT,
                    format!("the image did not hand bitmap {name} over"),
                )
            })?;
        map.or_bytes(&t.bits);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_set_marks_the_new_regions_only() {
        let spec = BitmapSpec {
            size: 1 << 20,
            granularity: 65536,
        };
        let words = words_for(spec.size, spec.granularity);
        let a = bulkhead_ipc::bitmap::create_region(words).unwrap();
        let b = bulkhead_ipc::bitmap::create_region(words).unwrap();
        let view = |fd: &OwnedFd| {
            DirtyBitmap::on(
                BitmapWords::map(fd.as_fd(), words).unwrap(),
                spec.size,
                spec.granularity,
            )
            .unwrap()
        };
        let (va, vb) = (view(&a), view(&b));
        let node = NodeBitmaps::default();
        node.written(WriteKind::Write, 0, 1);
        node.replace(map_all(&[spec], std::slice::from_ref(&a)).unwrap());
        node.written(WriteKind::WriteZeroes, 65536, 1);
        node.replace(map_all(&[spec], std::slice::from_ref(&b)).unwrap());
        node.written(WriteKind::Discard, 2 * 65536, 1);
        assert_eq!(va.dirty_ranges(0, spec.size), vec![(65536, 65536)]);
        assert_eq!(vb.dirty_ranges(0, spec.size), vec![(2 * 65536, 65536)]);
    }

    #[test]
    fn regions_that_do_not_fit_their_specs_are_refused() {
        let spec = BitmapSpec {
            size: 1 << 30,
            granularity: 512,
        };
        let small = bulkhead_ipc::bitmap::create_region(1).unwrap();
        assert!(map_all(&[spec], std::slice::from_ref(&small)).is_err());
        assert!(map_all(&[spec], &[]).is_err());
        let bad = BitmapSpec {
            size: 4096,
            granularity: 1000,
        };
        assert!(map_all(&[bad], std::slice::from_ref(&small)).is_err());
    }
}
