//! Dirty bitmaps as QEMU keeps them (`block/dirty-bitmap.c` over `util/hbitmap.c`).
//!
//! A bitmap covers a node of `size` bytes in chunks of `granularity` bytes (a power of
//! two, at least 512): bit `i` is set when some write touched bytes
//! `[i * granularity, (i + 1) * granularity)`. What QMP shows of it follows QEMU's
//! representation, so it is kept here:
//! - `count` is the number of set bits times the granularity (a partial last chunk
//!   counts whole, as `hbitmap_count` does);
//! - `x-debug-block-dirty-bitmap-sha256` hashes HBitmap's last level: the bits as
//!   little-endian 64-bit words, `ceil(bits / 64)` of them and at least one
//!   (`hbitmap_sha256` on x86-64).
//!
//! The words are atomics behind any `Deref<Target = [AtomicU64]>`, so that a bitmap can
//! live in memory shared by the processes that write the node (the node's worker, an
//! export writing the image in place) and the supervisor that reads, clears and merges
//! it: marking is a lock-free `fetch_or`, and a worker restart loses nothing.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// The smallest granularity QEMU accepts (`BDRV_SECTOR_SIZE`).
pub const MIN_GRANULARITY: u64 = 512;
/// The largest granularity: QMP's `granularity` is a `uint32`, so 2^31 is the largest
/// power of two a client can ask for (the schema refuses more).
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// Why a bitmap cannot be made or merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// QEMU's text for a granularity that is not a power of two of at least 512.
    #[error("Granularity must be power of 2 and at least 512")]
    Granularity,
    /// The words given do not hold the bitmap of this size and granularity.
    #[error("a dirty bitmap of {bits} bits needs {needed} words, not {given}")]
    Words {
        /// Bits of the bitmap.
        bits: u64,
        /// Words it needs.
        needed: usize,
        /// Words given.
        given: usize,
    },
    /// QEMU's text for a merge of bitmaps of nodes of different sizes.
    #[error(
        "Bitmaps are of different sizes (destination size is {destination}, source size is {from}) and can't be merged"
    )]
    Incompatible {
        /// Bytes the destination covers.
        destination: u64,
        /// Bytes the source covers.
        from: u64,
    },
}

/// The granularity QEMU picks when `block-dirty-bitmap-add` names none
/// (`bdrv_get_default_bitmap_granularity`): the node's cluster size within
/// [4 KiB, 64 KiB], or 64 KiB for a node without clusters.
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536),
        _ => 65536,
    }
}

/// Checks a granularity as `block-dirty-bitmap-add` does.
pub fn check_granularity(granularity: u64) -> Result<(), BitmapError> {
    if !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) || !granularity.is_power_of_two()
    {
        return Err(BitmapError::Granularity);
    }
    Ok(())
}

/// Words of a bitmap over `size` bytes at `granularity` (at least one, as HBitmap).
pub fn words_for(size: u64, granularity: u64) -> usize {
    let bits = size.div_ceil(granularity.max(1));
    usize::try_from(bits.div_ceil(64).max(1)).unwrap_or(usize::MAX)
}

/// A dirty bitmap over `words` (see the module documentation).
#[derive(Debug)]
pub struct DirtyBitmap<W = Box<[AtomicU64]>> {
    words: W,
    size: u64,
    shift: u32,
    bits: u64,
}

impl DirtyBitmap {
    /// An empty bitmap in its own memory.
    pub fn new(size: u64, granularity: u64) -> Result<DirtyBitmap, BitmapError> {
        check_granularity(granularity)?;
        let words = (0..words_for(size, granularity))
            .map(|_| AtomicU64::new(0))
            .collect();
        DirtyBitmap::on(words, size, granularity)
    }
}

impl<W: Deref<Target = [AtomicU64]>> DirtyBitmap<W> {
    /// The bitmap kept in `words` (shared memory, say), which must be exactly
    /// [`words_for`] long.
    pub fn on(words: W, size: u64, granularity: u64) -> Result<DirtyBitmap<W>, BitmapError> {
        check_granularity(granularity)?;
        let needed = words_for(size, granularity);
        let bits = size.div_ceil(granularity);
        if words.len() != needed {
            return Err(BitmapError::Words {
                bits,
                needed,
                given: words.len(),
            });
        }
        Ok(DirtyBitmap {
            words,
            size,
            shift: granularity.trailing_zeros(),
            bits,
        })
    }

    /// Bytes of the node the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// The bits `[first, last]` a byte range touches, within the bitmap; `None` for an
    /// empty range or one past the end.
    fn bit_span(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset >> self.shift, (end - 1) >> self.shift))
    }

    /// Applies `f(word, mask)` to every word with bits in `[first, last]`.
    fn for_bits(&self, first: u64, last: u64, f: impl Fn(&AtomicU64, u64)) {
        let (w0, w1) = (first / 64, last / 64);
        for w in w0..=w1 {
            let lo = if w == w0 { first % 64 } else { 0 };
            let hi = if w == w1 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - (hi - lo))) << lo;
            // In range: `last` < bits, and the words hold every bit.
            if let Some(word) = usize::try_from(w).ok().and_then(|i| self.words.get(i)) {
                f(word, mask);
            }
        }
    }

    /// Marks the chunks `[offset, offset + len)` touches (QEMU's `bdrv_set_dirty`).
    pub fn set(&self, offset: u64, len: u64) {
        if let Some((first, last)) = self.bit_span(offset, len) {
            self.for_bits(first, last, |w, m| {
                // Most writes land on chunks already dirty: no read-modify-write then.
                if w.load(Ordering::Relaxed) & m != m {
                    w.fetch_or(m, Ordering::Relaxed);
                }
            });
        }
    }

    /// Clears the chunks lying wholly inside `[offset, offset + len)`, the chunk at
    /// the end of the node counting as whole (QEMU's `bdrv_reset_dirty_bitmap`, whose
    /// callers pass aligned ranges).
    pub fn reset(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let g = self.granularity();
        let end = offset.saturating_add(len).min(self.size);
        let first = offset.div_ceil(g);
        let last_excl = if end == self.size {
            self.bits
        } else {
            end >> self.shift
        };
        if first < last_excl {
            self.for_bits(first, last_excl - 1, |w, m| {
                w.fetch_and(!m, Ordering::Relaxed);
            });
        }
    }

    /// Clears every bit (`block-dirty-bitmap-clear`).
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the chunk holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let bit = offset >> self.shift;
        usize::try_from(bit / 64)
            .ok()
            .and_then(|i| self.words.get(i))
            .is_some_and(|w| w.load(Ordering::Relaxed) >> (bit % 64) & 1 != 0)
    }

    /// Dirty bytes as QMP's `count` shows them: set bits times the granularity.
    pub fn count(&self) -> u64 {
        let bits: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        bits << self.shift
    }

    /// Sets every bit `other` has set, over the same bytes (`block-dirty-bitmap-merge`;
    /// granularities may differ, as HBitmap's merge allows: the dirty chunks of
    /// `other` dirty every chunk of this bitmap they overlap).
    pub fn merge_from<V: Deref<Target = [AtomicU64]>>(
        &self,
        other: &DirtyBitmap<V>,
    ) -> Result<(), BitmapError> {
        if other.size != self.size {
            return Err(BitmapError::Incompatible {
                destination: self.size,
                from: other.size,
            });
        }
        if other.shift == self.shift {
            for (dst, src) in self.words.iter().zip(other.words.iter()) {
                let bits = src.load(Ordering::Relaxed);
                if bits != 0 {
                    dst.fetch_or(bits, Ordering::Relaxed);
                }
            }
            return Ok(());
        }
        for (start, len) in other.dirty_ranges(0, other.size) {
            self.set(start, len);
        }
        Ok(())
    }

    /// Sets the bits `other` (the same bitmap before a resize: same granularity, any
    /// size) has set over the bytes both cover, as `hbitmap_truncate` keeps them:
    /// growing adds clean chunks, shrinking drops the chunks past the new end.
    pub fn copy_resized<V: Deref<Target = [AtomicU64]>>(&self, other: &DirtyBitmap<V>) {
        if other.shift != self.shift {
            for (start, len) in other.dirty_ranges(0, other.size.min(self.size)) {
                self.set(start, len);
            }
            return;
        }
        let bits = self.bits.min(other.bits);
        let whole = usize::try_from(bits / 64).unwrap_or(usize::MAX);
        for (dst, src) in self.words.iter().zip(other.words.iter()).take(whole) {
            let b = src.load(Ordering::Relaxed);
            if b != 0 {
                dst.fetch_or(b, Ordering::Relaxed);
            }
        }
        let tail = bits % 64;
        if tail != 0
            && let (Some(dst), Some(src)) = (self.words.get(whole), other.words.get(whole))
        {
            let b = src.load(Ordering::Relaxed) & ((1u64 << tail) - 1);
            if b != 0 {
                dst.fetch_or(b, Ordering::Relaxed);
            }
        }
    }

    /// The dirty byte ranges `(start, length)` within `[offset, offset + len)`,
    /// clipped to it and to the node, adjacent dirty chunks merged.
    pub fn dirty_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        self.runs(offset, len)
            .into_iter()
            .scan(offset, |pos, (length, dirty)| {
                let start = *pos;
                *pos += length;
                Some((start, length, dirty))
            })
            .filter(|&(_, _, dirty)| dirty)
            .map(|(start, length, _)| (start, length))
            .collect()
    }

    /// `[offset, offset + len)` (clipped to the node) as runs `(length, dirty)` that
    /// tile it, adjacent runs of the same kind merged: what an NBD
    /// `qemu:dirty-bitmap:` context reports.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        if offset >= self.size {
            return out;
        }
        let end = offset.saturating_add(len).min(self.size);
        let g = self.granularity();
        let mut pos = offset;
        while pos < end {
            let bit = pos >> self.shift;
            let dirty = self.is_dirty(pos);
            // Skip whole words of the same kind at once.
            let mut next_bit = bit + 1;
            while next_bit < self.bits {
                let word = usize::try_from(next_bit / 64)
                    .ok()
                    .and_then(|i| self.words.get(i))
                    .map_or(0, |w| w.load(Ordering::Relaxed));
                if next_bit.is_multiple_of(64) && word == if dirty { u64::MAX } else { 0 } {
                    next_bit += 64;
                    continue;
                }
                if (word >> (next_bit % 64) & 1 != 0) != dirty {
                    break;
                }
                next_bit += 1;
            }
            let run_end = next_bit.saturating_mul(g).min(end);
            let length = run_end - pos;
            match out.last_mut() {
                Some(last) if last.1 == dirty => last.0 += length,
                _ => out.push((length, dirty)),
            }
            pos = run_end;
        }
        out
    }

    /// The bits as bytes, least significant bit first, `ceil(bits / 8)` of them: the
    /// order qcow2 stores a bitmap in.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = usize::try_from(self.bits.div_ceil(8)).unwrap_or(0);
        let mut out = Vec::with_capacity(len + 8);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Sets the bits `bytes` has set (least significant bit first, as
    /// [`DirtyBitmap::to_bytes`] gives them); bits past the bitmap's end are ignored.
    pub fn or_bytes(&self, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            let first = i as u64 * 64;
            if first >= self.bits {
                break;
            }
            let valid = (self.bits - first).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            let v = u64::from_le_bytes(le) & mask;
            if v != 0
                && let Some(word) = self.words.get(i)
            {
                word.fetch_or(v, Ordering::Relaxed);
            }
        }
    }

    /// QEMU's `x-debug-block-dirty-bitmap-sha256`: SHA-256 of the words as
    /// little-endian bytes, in lowercase hexadecimal.
    pub fn sha256(&self) -> String {
        let mut hash = Sha256::new();
        for w in self.words.iter() {
            hash.update(w.load(Ordering::Relaxed).to_le_bytes());
        }
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn bytes_round_trip_in_qcow2_order_and_stop_at_the_end() {
        let b = DirtyBitmap::new(10 * 65536 + 1, 65536).unwrap();
        b.set(0, 1);
        b.set(9 * 65536, 1);
        b.set(10 * 65536, 1);
        // 11 bits: bits 0, 9 and 10 set.
        assert_eq!(b.to_bytes(), vec![0x01, 0x06]);
        let c = DirtyBitmap::new(10 * 65536 + 1, 65536).unwrap();
        c.or_bytes(&[0x01, 0xff, 0xff]);
        assert_eq!(c.to_bytes(), vec![0x01, 0x07]);
        assert_eq!(c.count(), 4 * 65536);
    }

    #[test]
    fn granularities_are_checked_and_defaulted_as_qemu_does() {
        assert_eq!(check_granularity(512), Ok(()));
        assert_eq!(check_granularity(256), Err(BitmapError::Granularity));
        assert_eq!(check_granularity(3 * 4096), Err(BitmapError::Granularity));
        assert_eq!(check_granularity(1 << 31), Ok(()));
        assert_eq!(check_granularity(1 << 32), Err(BitmapError::Granularity));
        assert_eq!(default_granularity(None), 65536);
        assert_eq!(default_granularity(Some(512)), 4096);
        assert_eq!(default_granularity(Some(65536)), 65536);
        assert_eq!(default_granularity(Some(2 * MIB)), 65536);
    }

    #[test]
    fn writes_dirty_every_chunk_they_touch_and_count_whole_chunks() {
        let b = DirtyBitmap::new(64 * MIB + 1000, 65536).unwrap();
        assert_eq!(b.count(), 0);
        b.set(65535, 2);
        assert_eq!(b.count(), 2 * 65536);
        assert!(b.is_dirty(0) && b.is_dirty(65536) && !b.is_dirty(2 * 65536));
        // The partial last chunk counts whole.
        b.set(64 * MIB + 999, 1);
        assert_eq!(b.count(), 3 * 65536);
        // Past the end, and empty writes, change nothing.
        b.set(64 * MIB + 1000, 4096);
        b.set(4 * MIB, 0);
        assert_eq!(b.count(), 3 * 65536);
        assert_eq!(
            b.dirty_ranges(0, u64::MAX),
            vec![(0, 2 * 65536), (64 * MIB, 1000)]
        );
    }

    #[test]
    fn runs_tile_the_request_and_cross_words() {
        let b = DirtyBitmap::new(64 * MIB, 4096).unwrap();
        b.set(0, 70 * 4096);
        b.set(200 * 4096, 4096);
        let runs = b.runs(4096, 300 * 4096);
        assert_eq!(
            runs,
            vec![
                (69 * 4096, true),
                (130 * 4096, false),
                (4096, true),
                (100 * 4096, false)
            ]
        );
        assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), 300 * 4096);
        // Clipped to the node.
        assert_eq!(b.runs(64 * MIB - 4096, MIB), vec![(4096, false)]);
        assert!(b.runs(64 * MIB, 1).is_empty());
    }

    #[test]
    fn reset_clears_whole_chunks_only_and_clear_clears_all() {
        let b = DirtyBitmap::new(MIB + 512, 65536).unwrap();
        b.set(0, MIB + 512);
        b.reset(1000, 65536 * 2);
        // Only the chunk at 64 KiB lies wholly inside [1000, 132072).
        assert!(b.is_dirty(0) && !b.is_dirty(65536) && b.is_dirty(2 * 65536));
        // The node's last, partial chunk counts as whole at the end.
        b.reset(MIB, 512);
        assert!(!b.is_dirty(MIB));
        b.clear();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn merges_need_the_same_size_and_widen_finer_bits() {
        let coarse = DirtyBitmap::new(MIB, 65536).unwrap();
        let fine = DirtyBitmap::new(MIB, 512).unwrap();
        fine.set(65536 + 512, 512);
        coarse.merge_from(&fine).unwrap();
        assert_eq!(coarse.dirty_ranges(0, MIB), vec![(65536, 65536)]);
        let fine2 = DirtyBitmap::new(MIB, 512).unwrap();
        fine2.merge_from(&coarse).unwrap();
        assert_eq!(fine2.count(), 65536);
        let other = DirtyBitmap::new(2 * MIB, 65536).unwrap();
        assert_eq!(
            coarse.merge_from(&other),
            Err(BitmapError::Incompatible {
                destination: coarse.size(),
                from: other.size()
            })
        );
    }

    #[test]
    fn a_resized_copy_keeps_the_bits_both_sizes_cover() {
        let old = DirtyBitmap::new(64 * MIB, 65536).unwrap();
        old.set(0, 1);
        old.set(63 * 65536, 1);
        old.set(64 * MIB - 1, 1);
        let grown = DirtyBitmap::new(128 * MIB, 65536).unwrap();
        grown.copy_resized(&old);
        assert_eq!(grown.count(), 3 * 65536);
        assert!(grown.is_dirty(64 * MIB - 1) && !grown.is_dirty(64 * MIB));
        // Shrunk into the middle of a word: bits past the new end are dropped.
        let shrunk = DirtyBitmap::new(63 * 65536 + 100, 65536).unwrap();
        shrunk.copy_resized(&old);
        assert_eq!(
            shrunk.dirty_ranges(0, shrunk.size()),
            vec![(0, 65536), (63 * 65536, 100)]
        );
        let tiny = DirtyBitmap::new(65536, 65536).unwrap();
        tiny.copy_resized(&old);
        assert_eq!(tiny.count(), 65536);
    }

    #[test]
    fn words_of_another_length_are_refused() {
        let words: Box<[AtomicU64]> = (0..3).map(|_| AtomicU64::new(0)).collect();
        assert!(matches!(
            DirtyBitmap::on(words, MIB, 4096),
            Err(BitmapError::Words { needed: 4, .. })
        ));
        // At least one word, as HBitmap.
        assert_eq!(words_for(0, 65536), 1);
    }

    #[test]
    fn the_hash_of_an_empty_bitmap_is_that_of_its_zero_words() {
        // 64 MiB at 64 KiB: 1024 bits, 16 words, 128 zero bytes (qsd's answer in the
        // reference transcript for such a node).
        let b = DirtyBitmap::new(64 * MIB, 65536).unwrap();
        assert_eq!(
            b.sha256(),
            "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"
        );
    }
}
