//! Persistent dirty bitmaps, as QEMU 10.0.2 handles them (`qcow2-bitmap.c`).
//!
//! The directory is checked on every open as `bitmap_list_load` checks it (same
//! limits, same texts: an image QEMU refuses to open is refused). Then every bitmap is
//! loaded, read-only opens included: one already `in-use` is not read (its bits are
//! unusable) and shows as inconsistent, never recording, and is left as it is on disk;
//! the others are read (a broken table or a table of the wrong size fails the open, as
//! in QEMU). A writable open then marks every loaded one in use on disk; enabled
//! ("auto") ones record every write; a clean close stores them all and clears in-use.
//!
//! In memory a bitmap is one chunk per bitmap-table entry (one cluster of bits, the
//! on-disk granule): all zeroes, all ones, or the cluster's bytes. Memory is thus
//! bounded by what the image holds (plus what writes set), and a load budget per image
//! stops hostile tables that point many entries at the same cluster.

use crate::error::{Error, Result};
use crate::header;

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
/// BME_RESERVED_FLAGS.
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// QEMU's BME_MAX_GRANULARITY_BITS / BME_MIN_GRANULARITY_BITS, BME_MAX_NAME_SIZE,
/// BME_MAX_TABLE_SIZE, BME_MAX_PHYS_SIZE.
const MAX_GRANULARITY_BITS: u8 = 31;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_NAME_SIZE: u16 = 1023;
const MAX_TABLE_SIZE: u32 = 0x0800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// BME_TABLE_ENTRY_RESERVED_MASK, BME_TABLE_ENTRY_OFFSET_MASK, the all-ones flag.
const ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
pub(crate) const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const ENTRY_ALL_ONES: u64 = 1;
/// Memory for loaded bitmaps per image at most (clusters read from the image, tables
/// and chunks): past it the open fails with ENOMEM instead of exhausting memory (QEMU
/// would abort). A bitmap is at most BME_MAX_PHYS_SIZE, so the largest still loads.
const LOAD_BUDGET: u64 = 2 * MAX_PHYS_SIZE;

/// One persistent dirty bitmap's directory entry.
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

/// A loaded bitmap as `query-named-block-nodes`' `dirty-bitmaps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapStatus {
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Enabled: writes set its bits (false for disabled and inconsistent bitmaps).
    pub recording: bool,
    /// Dirty bytes: set bits × granularity (`bdrv_get_dirty_count`; not clipped to
    /// the virtual size, as in QEMU).
    pub count: u64,
    /// It was in use when the image was opened: its bits are unusable and not loaded.
    pub inconsistent: bool,
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

/// The bare strerror text QEMU prints after `: `.
pub(crate) fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::open(libc::EINVAL, msg)
}

/// Bytes of a bitmap of `virtual_size` at `granularity_bits` (QEMU's
/// get_bitmap_bytes_needed).
fn bytes_needed(virtual_size: u64, granularity_bits: u8) -> u64 {
    virtual_size.div_ceil(1u64 << granularity_bits).div_ceil(8)
}

/// Parses the directory (`dir` holds its `directory_size` bytes, `dir_offset` is
/// where they are in the file) as QEMU's `bitmap_list_load`: entries are walked
/// through the whole directory, each checked as `check_dir_entry` checks it.
pub fn parse(
    dir: &[u8],
    nb: u32,
    dir_offset: u64,
    cluster_size: u64,
    virtual_size: u64,
) -> Result<Vec<BitmapInfo>> {
    if dir.is_empty() {
        return Err(invalid("Requested bitmap directory size is zero"));
    }
    if dir.len() as u64 > header::MAX_BITMAP_DIRECTORY_BYTES {
        return Err(invalid("Requested bitmap directory size is too big"));
    }
    let broken = || invalid("Broken bitmap directory");
    let mut out = Vec::with_capacity((nb as usize).min(1024));
    let mut off = 0usize;
    let mut count = 0u32;
    while off < dir.len() {
        let e = dir.get(off..off + 24).ok_or_else(broken)?;
        count += 1;
        if count > nb {
            return Err(invalid(
                "More bitmaps found than specified in header extension",
            ));
        }
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let kind = e[16];
        let granularity_bits = e[17];
        let name_size = be16(e, 18);
        let extra_size = be32(e, 20);
        let next = (24u64 + u64::from(name_size) + u64::from(extra_size)).next_multiple_of(8);
        if off as u64 + next > dir.len() as u64 {
            return Err(broken());
        }
        if extra_size != 0 {
            return Err(invalid("Bitmap extra data is not supported"));
        }
        let raw_name = &dir[off + 24..off + 24 + name_size as usize];
        // g_strndup: the name ends at a NUL byte.
        let raw_name = raw_name.split(|&c| c == 0).next().unwrap_or(&[]);
        let name = String::from_utf8_lossy(raw_name).into_owned();
        let phys = u64::from(table_size) * cluster_size;
        let bad = table_size == 0
            || table_offset == 0
            || !table_offset.is_multiple_of(cluster_size)
            || table_size > MAX_TABLE_SIZE
            || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits)
            || flags & RESERVED_FLAGS != 0
            || name_size > MAX_NAME_SIZE
            || kind != 1
            || phys > MAX_PHYS_SIZE
            // A bitmap not in use must fit its table (one in use may be stale, e.g.
            // not stored after a resize).
            || (flags & FLAG_IN_USE == 0
                && u128::from(virtual_size) > (u128::from(phys) * 8) << granularity_bits);
        if bad {
            return Err(invalid(format!(
                "Bitmap '{name}' doesn't satisfy the constraints"
            )));
        }
        out.push(BitmapInfo {
            name,
            granularity_bits,
            flags,
            table_offset,
            table_size,
            flags_offset: dir_offset.saturating_add(off as u64 + 12),
        });
        off += next as usize;
    }
    if count != nb {
        return Err(invalid(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

/// One bitmap-table entry's worth of bits (a cluster of them).
pub(crate) enum Chunk {
    Zero,
    Ones,
    Data(Box<[u8]>),
}

/// A bitmap loaded at open (see the module docs).
pub(crate) struct Loaded {
    pub info: BitmapInfo,
    /// In use at open: nothing loaded, never recorded into, never stored.
    pub inconsistent: bool,
    /// Bits in the bitmap (the virtual size in granules).
    pub nbits: u64,
    pub chunks: Vec<Chunk>,
    /// Chunks set by writes since open (to be stored).
    pub changed: Vec<bool>,
    /// The table as read (entries: data cluster offset, 0 zeroes, 1 ones).
    pub table: Vec<u64>,
    /// Marked in use by this open (to be cleared by a clean close).
    pub marked: bool,
}

impl Loaded {
    pub fn recording(&self) -> bool {
        self.info.auto() && !self.inconsistent
    }

    /// Loads one bitmap as QEMU's `load_bitmap`: an in-use one is not read. `budget`
    /// is what may still be read into memory for this image.
    pub fn load(
        file: &dyn crate::Storage,
        b: &BitmapInfo,
        virtual_size: u64,
        cluster_size: u64,
        budget: &mut u64,
    ) -> Result<Loaded> {
        let nbits = virtual_size.div_ceil(b.granularity());
        let mut l = Loaded {
            info: b.clone(),
            inconsistent: b.in_use(),
            nbits,
            chunks: Vec::new(),
            changed: Vec::new(),
            table: Vec::new(),
            marked: false,
        };
        if l.inconsistent {
            return Ok(l);
        }
        let name = &b.name;
        let enomem = || {
            Error::open(
                libc::ENOMEM,
                format!(
                    "Could not read bitmap '{name}' from image: {}",
                    strerror(libc::ENOMEM)
                ),
            )
        };
        // The table and its chunks in memory count against the budget too (a
        // hostile directory can repeat the largest table 65,535 times).
        let table_cost = u64::from(b.table_size) * (8 + std::mem::size_of::<Chunk>() as u64 + 1);
        *budget = budget.checked_sub(table_cost).ok_or_else(enomem)?;
        // bitmap_table_load (the size is bounded by the directory checks).
        let n = b.table_size as usize;
        let mut raw = vec![0u8; n * 8];
        file.read_at(&mut raw, b.table_offset).map_err(|e| {
            Error::open(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!(
                    "Could not read bitmap_table table from image for bitmap '{name}': {}",
                    strerror(e.raw_os_error().unwrap_or(libc::EIO))
                ),
            )
        })?;
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        for &e in &table {
            let off = e & ENTRY_OFFSET_MASK;
            if e & ENTRY_RESERVED_MASK != 0
                || (off != 0 && (e & ENTRY_ALL_ONES != 0 || !off.is_multiple_of(cluster_size)))
            {
                return Err(invalid(format!(
                    "Could not read bitmap_table table from image for bitmap '{name}': Invalid argument"
                )));
            }
        }
        // load_bitmap_data: the table covers exactly the bitmap.
        let bytes = bytes_needed(virtual_size, b.granularity_bits);
        if bytes.div_ceil(cluster_size) != table.len() as u64 {
            return Err(invalid(format!(
                "Could not read bitmap '{name}' from image: Invalid argument"
            )));
        }
        let chunk_bits = cluster_size * 8;
        let mut chunks = Vec::with_capacity(table.len());
        for (i, &e) in table.iter().enumerate() {
            let off = e & ENTRY_OFFSET_MASK;
            if off == 0 {
                chunks.push(if e & ENTRY_ALL_ONES != 0 {
                    Chunk::Ones
                } else {
                    Chunk::Zero
                });
                continue;
            }
            *budget = budget.checked_sub(cluster_size).ok_or_else(enomem)?;
            let mut buf = vec![0u8; cluster_size as usize].into_boxed_slice();
            file.read_at(&mut buf, off).map_err(|e| {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                Error::open(
                    errno,
                    format!(
                        "Could not read bitmap '{name}' from image: {}",
                        strerror(errno)
                    ),
                )
            })?;
            // Bits past the end of the bitmap are not part of it.
            let first = i as u64 * chunk_bits;
            let valid = nbits.saturating_sub(first).min(chunk_bits);
            clear_from(&mut buf, valid);
            chunks.push(Chunk::Data(buf));
        }
        l.changed = vec![false; chunks.len()];
        l.chunks = chunks;
        l.table = table;
        Ok(l)
    }

    /// Marks `[off, off + len)` dirty.
    pub fn set(&mut self, off: u64, len: u64, cluster_size: u64) {
        if len == 0 || self.nbits == 0 || self.chunks.is_empty() {
            return;
        }
        let g = self.info.granularity_bits;
        let first = off >> g;
        let last = ((off.saturating_add(len - 1)) >> g).min(self.nbits - 1);
        if first > last {
            return;
        }
        let chunk_bits = cluster_size * 8;
        let mut bit = first;
        while bit <= last {
            let ci = (bit / chunk_bits) as usize;
            let end = last.min((ci as u64 + 1) * chunk_bits - 1);
            let Some(chunk) = self.chunks.get_mut(ci) else {
                return;
            };
            let from = bit - ci as u64 * chunk_bits;
            let to = end - ci as u64 * chunk_bits;
            match chunk {
                Chunk::Ones => {}
                Chunk::Zero => {
                    let mut buf = vec![0u8; cluster_size as usize].into_boxed_slice();
                    set_bits(&mut buf, from, to);
                    *chunk = Chunk::Data(buf);
                    self.changed[ci] = true;
                }
                Chunk::Data(buf) => {
                    set_bits(buf, from, to);
                    self.changed[ci] = true;
                }
            }
            bit = end + 1;
        }
    }

    /// Set bits.
    pub fn bits_set(&self, cluster_size: u64) -> u64 {
        let chunk_bits = cluster_size * 8;
        self.chunks
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Chunk::Zero => 0,
                Chunk::Ones => self
                    .nbits
                    .saturating_sub(i as u64 * chunk_bits)
                    .min(chunk_bits),
                Chunk::Data(b) => b.iter().map(|x| u64::from(x.count_ones())).sum(),
            })
            .sum()
    }

    /// The bits as bytes, least significant bit first (the on-disk order).
    pub fn bytes(&self, cluster_size: u64) -> Vec<u8> {
        let len = usize::try_from(self.nbits.div_ceil(8)).unwrap_or(0);
        let mut out = vec![0u8; len];
        for (i, c) in self.chunks.iter().enumerate() {
            let from = i * cluster_size as usize;
            let Some(dst) = out.get_mut(from..(from + cluster_size as usize).min(len)) else {
                break;
            };
            match c {
                Chunk::Zero => {}
                Chunk::Ones => dst.fill(0xff),
                Chunk::Data(b) => {
                    let n = dst.len().min(b.len());
                    dst[..n].copy_from_slice(&b[..n]);
                }
            }
        }
        // An all-ones chunk sets bits past the end of the bitmap too.
        clear_from(&mut out, self.nbits);
        out
    }

    pub fn status(&self, cluster_size: u64) -> BitmapStatus {
        BitmapStatus {
            name: self.info.name.clone(),
            granularity: self.info.granularity(),
            recording: self.recording(),
            count: self.bits_set(cluster_size) << self.info.granularity_bits,
            inconsistent: self.inconsistent,
        }
    }
}

/// Sets bits `from..=to` (least significant bit first, the on-disk order).
fn set_bits(buf: &mut [u8], from: u64, to: u64) {
    let mut i = from;
    while i <= to {
        if i.is_multiple_of(8) && i + 7 <= to {
            let fb = (i / 8) as usize;
            let lb = ((to + 1) / 8) as usize;
            if let Some(s) = buf.get_mut(fb..lb) {
                s.fill(0xff);
            }
            i = lb as u64 * 8;
            continue;
        }
        if let Some(b) = buf.get_mut((i / 8) as usize) {
            *b |= 1 << (i % 8);
        }
        i += 1;
    }
}

/// Clears every bit from `from` on.
pub(crate) fn clear_from(buf: &mut [u8], from: u64) {
    let byte = (from / 8) as usize;
    if byte >= buf.len() {
        return;
    }
    let keep = (from % 8) as u32;
    buf[byte] &= ((1u16 << keep) - 1) as u8;
    buf[byte + 1..].fill(0);
}

pub(crate) fn load_budget() -> u64 {
    LOAD_BUDGET
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let mut b = vec![0u8; 4];
        set_bits(&mut b, 3, 20);
        assert_eq!(b, [0xf8, 0xff, 0x1f, 0]);
        clear_from(&mut b, 10);
        assert_eq!(b, [0xf8, 0x03, 0, 0]);
    }

    /// Many bitmaps whose tables all point at one data cluster: the load budget
    /// stops them with ENOMEM instead of exhausting memory.
    #[test]
    fn load_budget_stops_repeated_tables() {
        let cs = 512u64;
        let file = crate::MemStorage::new(Vec::new(), 1 << 30);
        // One table of 2^16 entries at 512, every entry the cluster at 1 MiB.
        let entries = 1u64 << 16;
        let mut table = Vec::with_capacity((entries * 8) as usize);
        for _ in 0..entries {
            table.extend_from_slice(&(1u64 << 20).to_be_bytes());
        }
        crate::Storage::write_at(&file, &table, cs).expect("write");
        crate::Storage::write_at(&file, &[0xffu8; 512], 1 << 20).expect("write");
        let b = BitmapInfo {
            name: "b".into(),
            granularity_bits: 9,
            flags: FLAG_AUTO,
            table_offset: cs,
            table_size: entries as u32,
            flags_offset: 0,
        };
        let virtual_size = entries * cs * 8 * 512;
        // A smaller budget than load_budget() for the test's sake.
        let mut budget = 64u64 << 20;
        assert!(budget < load_budget());
        let first = Loaded::load(&file, &b, virtual_size, cs, &mut budget).expect("first");
        assert_eq!(first.bits_set(cs), entries * cs * 8);
        let mut failed = false;
        for _ in 0..4 {
            if let Err(e) = Loaded::load(&file, &b, virtual_size, cs, &mut budget) {
                assert_eq!(e.errno(), libc::ENOMEM);
                failed = true;
                break;
            }
        }
        assert!(failed);
    }
}
