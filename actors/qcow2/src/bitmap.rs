//! The persistent bitmap directory: parsed (capped) for queries, and marked in use
//! when the image is opened writable, since the engine does not update bitmaps yet:
//! QEMU then reports them inconsistent instead of trusting stale bits.

use crate::error::{Error, Result};
use crate::header;

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
/// QEMU's BME_MAX_GRANULARITY_BITS / BME_MIN_GRANULARITY_BITS, BME_MAX_NAME_SIZE,
/// BME_MAX_TABLE_SIZE.
const MAX_GRANULARITY_BITS: u8 = 31;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_NAME_SIZE: u16 = 1023;
const MAX_TABLE_SIZE: u32 = 0x0800_0000;

/// One persistent dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity_bits: u8,
    pub flags: u32,
    pub table_offset: u64,
    pub table_size: u32,
    /// Offset of this entry's flags field in the file (for marking it in use).
    pub(crate) flags_offset: u64,
}

impl BitmapInfo {
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Parses the directory bytes (`dir_offset` is where they are in the file).
pub fn parse(dir: &[u8], nb: u32, dir_offset: u64, cluster_size: u64) -> Result<Vec<BitmapInfo>> {
    let bad =
        |what: &str| Error::open(libc::EINVAL, format!("Bitmap directory is invalid: {what}"));
    let mut out = Vec::with_capacity((nb as usize).min(1024));
    let mut off = 0usize;
    for _ in 0..nb {
        let e = dir.get(off..off + 24).ok_or_else(|| bad("truncated"))?;
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let kind = e[16];
        let granularity_bits = e[17];
        let name_size = be16(e, 18);
        let extra_size = be32(e, 20);
        if kind != 1 {
            return Err(bad("unsupported type"));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(bad("unsupported granularity"));
        }
        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(bad("invalid name size"));
        }
        if table_size > MAX_TABLE_SIZE || !table_offset.is_multiple_of(cluster_size) {
            return Err(bad("invalid bitmap table"));
        }
        if extra_size > 1024 * 1024 {
            return Err(bad("extra data too large"));
        }
        let name_at = off + 24 + extra_size as usize;
        let name = dir
            .get(name_at..name_at + name_size as usize)
            .ok_or_else(|| bad("truncated"))?;
        out.push(BitmapInfo {
            name: String::from_utf8_lossy(name).into_owned(),
            granularity_bits,
            flags,
            table_offset,
            table_size,
            flags_offset: dir_offset.saturating_add(off as u64 + 12),
        });
        off = (name_at + name_size as usize + 7) & !7;
    }
    let _ = header::MAX_BITMAPS;
    Ok(out)
}

/// Bitmaps whose in-memory copy grows past this are not tracked (left in use).
const MAX_LIVE_BYTES: u64 = 256 << 20;
const BME_TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// An enabled ("auto") bitmap tracked while the image is open writable: loaded on open,
/// every write sets its bits, stored back on close (then no longer in use).
pub(crate) struct Live {
    pub info: BitmapInfo,
    /// Bit i is granularity chunk i, least significant bit first (the on-disk order).
    pub bits: Vec<u8>,
    /// The table as read (entries: data cluster offset, 0 zeroes, 1 ones).
    pub table: Vec<u64>,
}

impl Live {
    /// Loads `b` when it can be tracked: enabled, not in use, sane sizes.
    pub fn load(
        file: &dyn crate::Storage,
        b: &BitmapInfo,
        virtual_size: u64,
        cluster_size: u64,
    ) -> Option<Live> {
        if !b.auto() || b.in_use() {
            return None;
        }
        let chunks = virtual_size.div_ceil(b.granularity());
        let bytes = chunks.div_ceil(8);
        let want_table = bytes.div_ceil(cluster_size);
        if bytes > MAX_LIVE_BYTES || u64::from(b.table_size) != want_table {
            return None;
        }
        let mut raw = vec![0u8; (want_table * 8) as usize];
        file.read_at(&mut raw, b.table_offset).ok()?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let mut bits = vec![0u8; (want_table * cluster_size) as usize];
        for (i, &e) in table.iter().enumerate() {
            let part = &mut bits[i * cluster_size as usize..(i + 1) * cluster_size as usize];
            let off = e & BME_TABLE_OFFSET_MASK;
            if off == 0 {
                if e & 1 != 0 {
                    part.fill(0xff);
                }
            } else if !off.is_multiple_of(cluster_size) || file.read_at(part, off).is_err() {
                return None;
            }
        }
        bits.truncate(bytes as usize);
        Some(Live {
            info: b.clone(),
            bits,
            table,
        })
    }

    /// Marks `[off, off + len)` dirty.
    pub fn set(&mut self, off: u64, len: u64) {
        if len == 0 || self.bits.is_empty() {
            return;
        }
        let g = self.info.granularity_bits;
        let first = off >> g;
        let last = ((off + len - 1) >> g).min(self.bits.len() as u64 * 8 - 1);
        let mut i = first;
        while i <= last {
            if i.is_multiple_of(8) && i + 7 <= last {
                let fb = (i / 8) as usize;
                let lb = ((last + 1) / 8) as usize;
                self.bits[fb..lb].fill(0xff);
                i = lb as u64 * 8;
                continue;
            }
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
            i += 1;
        }
    }
}
