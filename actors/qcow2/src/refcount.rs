//! Refcount table and blocks: any entry width 1..64 bits, a bounded block cache,
//! write-through updates (no refcount lives only in memory).

use std::collections::HashMap;
use std::sync::Arc;

use crate::Geo;
use crate::error::{Error, Result};
use crate::storage::Storage;

pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

pub(crate) struct Refcounts {
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u64,
    blocks: HashMap<u64, Box<[u8]>>,
    cap: usize,
    /// Byte ranges of cached blocks changed but not yet written (set_deferred).
    pending: HashMap<u64, (usize, usize)>,
}

impl Refcounts {
    pub fn new(table: Vec<u64>, table_offset: u64, table_clusters: u64, cap: usize) -> Refcounts {
        Refcounts {
            table,
            table_offset,
            table_clusters,
            blocks: HashMap::new(),
            cap: cap.max(2),
            pending: HashMap::new(),
        }
    }

    /// The refblock offset for cluster `idx`, 0 when none; errors on a hostile entry.
    pub fn block_offset(&self, geo: &Geo, idx: u64) -> Result<u64, (String, u64)> {
        let bi = idx >> geo.rb_bits;
        let Some(&e) = self.table.get(bi as usize) else {
            return Ok(0);
        };
        let off = e & REFT_OFFSET_MASK;
        if !off.is_multiple_of(geo.cs) {
            return Err((
                format!(
                    "Refblock offset {} unaligned (reftable index: {})",
                    crate::error::hx(off),
                    crate::error::hx(bi)
                ),
                off,
            ));
        }
        Ok(off)
    }

    fn load<'a>(
        &'a mut self,
        file: &Arc<dyn Storage>,
        geo: &Geo,
        off: u64,
    ) -> Result<&'a mut [u8]> {
        if !self.blocks.contains_key(&off) {
            if self.blocks.len() >= self.cap {
                // Evict a clean block (all blocks are clean except pending ones).
                let victim = self
                    .blocks
                    .keys()
                    .copied()
                    .find(|k| !self.pending.contains_key(k));
                if let Some(v) = victim {
                    self.blocks.remove(&v);
                }
            }
            let mut b = vec![0u8; geo.cs as usize].into_boxed_slice();
            file.read_at(&mut b, off)
                .map_err(Error::io("reading a refcount block"))?;
            self.blocks.insert(off, b);
        }
        Ok(self.blocks.get_mut(&off).expect("just inserted").as_mut())
    }

    pub fn insert_block(&mut self, off: u64, data: Box<[u8]>) {
        self.blocks.insert(off, data);
    }

    /// The refcount of cluster `idx` (0 where no block covers it). `Err(Corrupt)` when
    /// the table entry is unaligned.
    pub fn get(&mut self, file: &Arc<dyn Storage>, geo: &Geo, idx: u64) -> Result<u64, RcError> {
        let off = self.block_offset(geo, idx).map_err(RcError::Corrupt)?;
        if off == 0 {
            return Ok(0);
        }
        let i = idx & ((1u64 << geo.rb_bits) - 1);
        let b = self.load(file, geo, off).map_err(RcError::Other)?;
        Ok(get_entry(b, geo.rc_order, i))
    }

    /// The refcount block covering cluster `idx` (`None` where no block does), for
    /// scans that read many entries of one block.
    pub fn block(
        &mut self,
        file: &Arc<dyn Storage>,
        geo: &Geo,
        idx: u64,
    ) -> Result<Option<&[u8]>, RcError> {
        let off = self.block_offset(geo, idx).map_err(RcError::Corrupt)?;
        if off == 0 {
            return Ok(None);
        }
        let b = self.load(file, geo, off).map_err(RcError::Other)?;
        Ok(Some(b))
    }

    /// Sets the refcount; the block must exist. Written through unless `defer` (then
    /// `write_pending` writes it).
    pub fn set(
        &mut self,
        file: &Arc<dyn Storage>,
        geo: &Geo,
        idx: u64,
        value: u64,
        defer: bool,
    ) -> Result<(), RcError> {
        let off = self.block_offset(geo, idx).map_err(RcError::Corrupt)?;
        if off == 0 {
            return Err(RcError::Other(Error::Invalid(
                "refcount block missing".into(),
            )));
        }
        let i = idx & ((1u64 << geo.rb_bits) - 1);
        let order = geo.rc_order;
        let b = self.load(file, geo, off).map_err(RcError::Other)?;
        set_entry(b, order, i, value);
        let (lo, hi) = entry_bytes(order, i);
        if defer {
            let p = self.pending.entry(off).or_insert((lo, hi));
            p.0 = p.0.min(lo);
            p.1 = p.1.max(hi);
        } else {
            file.write_at(&b[lo..hi], off + lo as u64)
                .map_err(|e| RcError::Other(Error::io("writing a refcount block")(e)))?;
        }
        Ok(())
    }

    pub fn write_pending(&mut self, file: &Arc<dyn Storage>) -> Result<()> {
        for (off, (lo, hi)) in std::mem::take(&mut self.pending) {
            if let Some(b) = self.blocks.get(&off) {
                file.write_at(&b[lo..hi], off + lo as u64)
                    .map_err(Error::io("writing a refcount block"))?;
            }
        }
        Ok(())
    }
}

pub(crate) enum RcError {
    Corrupt((String, u64)),
    Other(Error),
}

/// Byte range holding entry `i` (sub-byte widths share a byte).
fn entry_bytes(order: u32, i: u64) -> (usize, usize) {
    let bits = 1u64 << order;
    let lo = (i * bits / 8) as usize;
    let hi = ((i * bits + bits).div_ceil(8)) as usize;
    (lo, hi)
}

pub fn get_entry(b: &[u8], order: u32, i: u64) -> u64 {
    match order {
        0..=2 => {
            let bits = 1u64 << order;
            let byte = b[(i * bits / 8) as usize];
            let shift = (i * bits) % 8;
            (u64::from(byte) >> shift) & ((1 << bits) - 1)
        }
        3 => u64::from(b[i as usize]),
        4 => u64::from(u16::from_be_bytes([
            b[2 * i as usize],
            b[2 * i as usize + 1],
        ])),
        5 => {
            let at = 4 * i as usize;
            u64::from(u32::from_be_bytes(
                b[at..at + 4].try_into().unwrap_or([0; 4]),
            ))
        }
        _ => {
            let at = 8 * i as usize;
            u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
        }
    }
}

pub fn set_entry(b: &mut [u8], order: u32, i: u64, v: u64) {
    match order {
        0..=2 => {
            let bits = 1u64 << order;
            let at = (i * bits / 8) as usize;
            let shift = (i * bits) % 8;
            let mask = (((1u64 << bits) - 1) << shift) as u8;
            b[at] = (b[at] & !mask) | (((v << shift) as u8) & mask);
        }
        3 => b[i as usize] = v as u8,
        4 => b[2 * i as usize..2 * i as usize + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => b[4 * i as usize..4 * i as usize + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => b[8 * i as usize..8 * i as usize + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let n = (512 * 8) >> order;
            for i in 0..n as u64 {
                set_entry(&mut b, order, i, (i * 7) & max);
            }
            for i in 0..n as u64 {
                assert_eq!(
                    get_entry(&b, order, i),
                    (i * 7) & max,
                    "order {order} i {i}"
                );
            }
        }
        // 1-bit refcounts: least significant bit first, as QEMU.
        let mut b = vec![0u8; 8];
        set_entry(&mut b, 0, 0, 1);
        set_entry(&mut b, 0, 9, 1);
        assert_eq!(b[0], 1);
        assert_eq!(b[1], 2);
    }
}
