//! Refcount rebuild for an image opened writable with the dirty bit set (lazy
//! refcounts after a crash): QEMU repairs such an image on open; so does the engine.
//! Every reference is counted from the metadata, differing refcounts are rewritten,
//! then the dirty bit is cleared. Memory: 4 bytes per cluster of the file, capped.

use crate::error::{Error, Result};
use crate::meta::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, Meta, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::{BitmapInfo, SnapshotInfo, header};

/// Files with more clusters than this are not repaired (256 MiB of counters).
const MAX_CLUSTERS: u64 = 1 << 26;

pub(crate) struct Extra<'a> {
    pub snapshots: &'a [SnapshotInfo],
    pub snapshot_table: (u64, u64),
    pub bitmaps: &'a [BitmapInfo],
    pub bitmap_dir: Option<(u64, u64)>,
    pub external_data: bool,
}

fn failed(why: &str) -> Error {
    Error::open(libc::EIO, format!("Could not repair dirty image: {why}"))
}

struct Counter {
    counts: Vec<u32>,
    cs: u64,
}

impl Counter {
    fn inc(&mut self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = off / self.cs;
        let last = off
            .checked_add(len - 1)
            .ok_or_else(|| failed("reference out of range"))?
            / self.cs;
        if last >= self.counts.len() as u64 {
            return Err(failed("reference past the end of the file"));
        }
        for c in first..=last {
            let v = &mut self.counts[c as usize];
            *v = v.saturating_add(1);
        }
        Ok(())
    }
}

/// `n` big-endian words at `off`; only what the file holds (the rest would read as
/// zeroes, which reference nothing).
fn read_words(m: &Meta, off: u64, n: u64) -> Result<Vec<u64>> {
    let len = m
        .file
        .len()
        .map_err(Error::io("reading the image length"))?;
    let n = n.min(len.saturating_sub(off) / 8);
    let mut raw = vec![0u8; (n * 8) as usize];
    m.file
        .read_at(&mut raw, off)
        .map_err(Error::io("reading metadata for repair"))?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

fn count_l1(m: &Meta, c: &mut Counter, l1: &[u64], external: bool) -> Result<()> {
    let geo = m.geo;
    let words_per = if geo.ext_l2 { 2 } else { 1 };
    for &e in l1 {
        let l2 = e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !l2.is_multiple_of(geo.cs) {
            return Err(failed("unaligned L2 table"));
        }
        c.inc(l2, geo.cs)?;
        let words = read_words(m, l2, geo.l2_entries * words_per)?;
        for i in 0..words.len() / words_per as usize {
            let e = words[i * words_per as usize];
            if e & OFLAG_COMPRESSED != 0 {
                let (coff, csize) = geo.compressed_span(e);
                c.inc(coff, csize)?;
            } else {
                let off = e & L2E_OFFSET_MASK;
                if external {
                    continue;
                }
                if off != 0 {
                    if !off.is_multiple_of(geo.cs) {
                        return Err(failed("unaligned data cluster"));
                    }
                    c.inc(off, geo.cs)?;
                }
                let _ = OFLAG_COPIED;
            }
        }
    }
    Ok(())
}

pub(crate) fn rebuild(m: &mut Meta, x: &Extra<'_>) -> Result<()> {
    let geo = m.geo;
    let cs = geo.cs;
    let file_len = m
        .file
        .len()
        .map_err(Error::io("reading the image length"))?;
    let n = file_len.div_ceil(cs);
    if n > MAX_CLUSTERS {
        return Err(failed("image too large to repair"));
    }
    let mut c = Counter {
        counts: vec![0u32; n as usize],
        cs,
    };
    c.inc(0, cs)?;
    c.inc(m.l1_offset, m.l1.len() as u64 * 8)?;
    let l1 = m.l1.clone();
    count_l1(m, &mut c, &l1, x.external_data)?;
    c.inc(m.rc.table_offset, m.rc.table_clusters * cs)?;
    for &e in &m.rc.table {
        let rb = e & crate::refcount::REFT_OFFSET_MASK;
        if rb != 0 {
            c.inc(rb, cs)?;
        }
    }
    c.inc(x.snapshot_table.0, x.snapshot_table.1)?;
    for s in x.snapshots {
        c.inc(s.l1_table_offset, u64::from(s.l1_size) * 8)?;
        let l1 = read_words(m, s.l1_table_offset, u64::from(s.l1_size))?;
        count_l1(m, &mut c, &l1, x.external_data)?;
    }
    if let Some((off, len)) = x.bitmap_dir {
        c.inc(off, len)?;
    }
    for b in x.bitmaps {
        c.inc(b.table_offset, u64::from(b.table_size) * 8)?;
        for e in read_words(m, b.table_offset, u64::from(b.table_size))? {
            let off = e & 0x00ff_ffff_ffff_fe00;
            if off != 0 {
                c.inc(off, cs)?;
            }
        }
    }
    let max = if geo.rc_order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << geo.rc_order)) - 1
    };
    for idx in 0..n {
        let want = u64::from(c.counts[idx as usize]);
        if want > max {
            return Err(failed("refcount overflow"));
        }
        let have = m.refcount(idx)?;
        if have == want {
            continue;
        }
        let bi = idx >> geo.rb_bits;
        let missing =
            m.rc.table
                .get(bi as usize)
                .is_none_or(|e| e & crate::refcount::REFT_OFFSET_MASK == 0);
        if missing
            && c.counts
                .get((bi << geo.rb_bits) as usize)
                .is_some_and(|&v| v != 0)
        {
            return Err(failed("no room for a refcount block"));
        }
        m.set_refcount_public(idx, want)?;
    }
    m.flush_refcounts()?;
    m.incompat &= !header::INCOMPAT_DIRTY;
    m.file
        .write_at(&m.incompat.to_be_bytes(), header::OFF_INCOMPAT)
        .map_err(Error::io("updating the header"))?;
    m.file.flush().map_err(Error::io("flushing"))?;
    Ok(())
}
