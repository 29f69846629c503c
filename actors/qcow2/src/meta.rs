//! Metadata state behind the engine's one lock: the L1 table, the L2 cache, refcounts,
//! the cluster allocator, in-flight allocations and the overlap map.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::header::{self, INCOMPAT_CORRUPT};
use crate::refcount::{RcError, Refcounts};
use crate::snapshot::SnapshotInfo;
use crate::storage::Storage;
use crate::{Entry, Geo};

pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
/// Host offsets the format can express (QCOW_MAX_CLUSTER_OFFSET).
pub const MAX_CLUSTER_OFFSET: u64 = (1 << 56) - 1;

/// Metadata kinds guarded by the overlap check (QEMU's names, for its messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Header,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
    BitmapDirectory,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Header => "qcow2_header",
            Section::ActiveL1 => "active L1 table",
            Section::ActiveL2 => "active L2 table",
            Section::RefcountTable => "refcount table",
            Section::RefcountBlock => "refcount block",
            Section::SnapshotTable => "snapshot table",
            Section::InactiveL1 => "inactive L1 table",
            Section::BitmapDirectory => "bitmap directory",
        }
    }
    /// Part of QEMU's "constant" template (no table walks needed)?
    fn constant(self) -> bool {
        !matches!(self, Section::ActiveL2 | Section::RefcountBlock)
    }
}

/// Which overlap checks run before writes (QEMU's `overlap-check` templates; `All`
/// also covers inactive L2 tables in QEMU, which this engine treats like `Cached`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverlapCheck {
    None,
    Constant,
    #[default]
    Cached,
    All,
}

struct L2Slot {
    words: Box<[u64]>,
    stamp: u64,
}

pub(crate) struct Meta {
    pub file: Arc<dyn Storage>,
    pub geo: Geo,
    pub writable: bool,
    pub dead: Arc<AtomicBool>,
    pub incompat: u64,
    pub size: u64,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    l2: HashMap<u64, L2Slot>,
    l2_cap: usize,
    tick: u64,
    pub rc: Refcounts,
    /// Reserved clusters (refcount 1 on disk, unused), and whether each is known to
    /// read as zeroes (it was past the end of the file when reserved).
    pub reserved: VecDeque<(u64, bool)>,
    pub free_hint: u64,
    /// One past the highest cluster index this engine reserved or laid out.
    pub alloc_end: u64,
    /// Clusters the next reservation takes: it doubles with each reservation up to
    /// `batch_max` (allocations that keep coming, a mirror or a fill, pay one
    /// refcount write and flush per 32 MiB instead of per 4 MiB).
    pub batch: usize,
    batch_max: usize,
    pub inflight: HashSet<u64>,
    overlap: BTreeMap<u64, (u64, Section)>,
    pub overlap_mode: OverlapCheck,
    pub pass_discard: bool,
    /// The snapshot table: entries, and where it is (offset, length).
    pub snapshots: Vec<SnapshotInfo>,
    pub snap_table: (u64, u64),
    /// The host cluster compressed writes are packing into, and the bytes used.
    pub ctail: Option<(u64, u64)>,
}

pub(crate) struct MetaInit {
    pub file: Arc<dyn Storage>,
    pub geo: Geo,
    pub writable: bool,
    pub dead: Arc<AtomicBool>,
    pub incompat: u64,
    pub size: u64,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub l2_cap: usize,
    pub rc: Refcounts,
    pub batch: usize,
    /// The most a reservation grows to (at least `batch`).
    pub batch_max: usize,
    pub overlap_mode: OverlapCheck,
    pub pass_discard: bool,
}

impl Meta {
    pub fn new(i: MetaInit) -> Meta {
        Meta {
            file: i.file,
            geo: i.geo,
            writable: i.writable,
            dead: i.dead,
            incompat: i.incompat,
            size: i.size,
            l1: i.l1,
            l1_offset: i.l1_offset,
            l2: HashMap::new(),
            l2_cap: i.l2_cap.max(2),
            tick: 0,
            rc: i.rc,
            reserved: VecDeque::new(),
            free_hint: 0,
            alloc_end: 0,
            batch: i.batch.max(1),
            batch_max: i.batch_max.max(i.batch).max(1),
            inflight: HashSet::new(),
            overlap: BTreeMap::new(),
            overlap_mode: i.overlap_mode,
            pass_discard: i.pass_discard,
            snapshots: Vec::new(),
            snap_table: (0, 0),
            ctail: None,
        }
    }

    // ---- corruption -------------------------------------------------------------

    /// Reports a metadata inconsistency as QEMU's `qcow2_signal_corruption` does: on a
    /// writable image the header gets the corrupt bit and the image takes no more I/O.
    pub fn corrupt(&mut self, message: String, offset: Option<u64>, size: Option<u64>) -> Error {
        let fatal = self.writable;
        if fatal && !self.dead.swap(true, Ordering::SeqCst) {
            self.incompat |= INCOMPAT_CORRUPT;
            let _ = self
                .file
                .write_at(&self.incompat.to_be_bytes(), header::OFF_INCOMPAT);
            let _ = self.file.flush();
        }
        Error::Corrupt {
            message,
            offset,
            size,
            fatal,
        }
    }

    fn rc_err(&mut self, e: RcError) -> Error {
        match e {
            RcError::Corrupt((msg, off)) => self.corrupt(msg, Some(off), None),
            RcError::Other(e) => e,
        }
    }

    // ---- overlap ------------------------------------------------------------------

    pub fn add_section(&mut self, off: u64, len: u64, s: Section) {
        if len > 0 {
            self.overlap.insert(off, (len, s));
        }
    }

    pub fn remove_section(&mut self, off: u64) {
        self.overlap.remove(&off);
    }

    /// QEMU's pre-write overlap check: a write into metadata marks the image corrupt.
    pub fn check_overlap(&mut self, off: u64, len: u64) -> Result<()> {
        if let Some(sec) = self.overlap_hit(off, len) {
            let msg = format!(
                "Preventing invalid write on metadata (overlaps with {})",
                sec.name()
            );
            return Err(self.corrupt(msg, Some(off), Some(len)));
        }
        Ok(())
    }

    /// The metadata section a write of `[off, off + len)` would overwrite, as the
    /// configured overlap checks see it (nothing is marked).
    pub fn overlap_hit(&self, off: u64, len: u64) -> Option<Section> {
        if self.overlap_mode == OverlapCheck::None || len == 0 {
            return None;
        }
        let end = off.saturating_add(len);
        self.overlap
            .range(..end)
            .next_back()
            .filter(|(s, (l, _))| s.saturating_add(*l) > off)
            .map(|(_, (_, sec))| *sec)
            .filter(|sec| self.overlap_mode != OverlapCheck::Constant || sec.constant())
    }

    // ---- L2 tables ----------------------------------------------------------------

    fn l2_words(&self) -> usize {
        (self.geo.l2_entries * if self.geo.ext_l2 { 2 } else { 1 }) as usize
    }

    fn load_l2(&mut self, off: u64) -> Result<&mut L2Slot> {
        self.tick += 1;
        let tick = self.tick;
        if !self.l2.contains_key(&off) {
            if self.l2.len() >= self.l2_cap
                && let Some((&victim, _)) = self.l2.iter().min_by_key(|(_, s)| s.stamp)
            {
                self.l2.remove(&victim);
            }
            let mut raw = vec![0u8; self.geo.cs as usize];
            self.file
                .read_at(&mut raw, off)
                .map_err(Error::io("reading an L2 table"))?;
            let words: Box<[u64]> = raw
                .chunks_exact(8)
                .take(self.l2_words())
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            self.l2.insert(off, L2Slot { words, stamp: tick });
        }
        let slot = self.l2.get_mut(&off).expect("present");
        slot.stamp = tick;
        Ok(slot)
    }

    /// The L2 table offset for guest cluster `gc` (0: none), validated.
    pub fn l2_offset(&mut self, gc: u64) -> Result<(u64, bool)> {
        let l1i = gc >> self.geo.l2_bits;
        let Some(&l1e) = self.l1.get(l1i as usize) else {
            return Ok((0, false));
        };
        let off = l1e & L1E_OFFSET_MASK;
        if !off.is_multiple_of(self.geo.cs) {
            let msg = format!(
                "L2 table offset {} unaligned (L1 index: {})",
                crate::error::hx(off),
                crate::error::hx(l1i)
            );
            return Err(self.corrupt(msg, None, None));
        }
        Ok((off, l1e & OFLAG_COPIED != 0))
    }

    /// The L2 entry of guest cluster `gc` (zero entry when there is no L2 table).
    pub fn entry(&mut self, gc: u64) -> Result<Entry> {
        let (off, _) = self.l2_offset(gc)?;
        if off == 0 {
            return Ok(Entry::default());
        }
        let i = (gc & (self.geo.l2_entries - 1)) as usize;
        let ext = self.geo.ext_l2;
        let slot = self.load_l2(off)?;
        Ok(if ext {
            Entry {
                l2: slot.words[2 * i],
                bitmap: slot.words[2 * i + 1],
            }
        } else {
            Entry {
                l2: slot.words[i],
                bitmap: 0,
            }
        })
    }

    /// [`Self::entry`] without I/O: `None` when the L2 table is not cached.
    pub fn cached_entry(&mut self, gc: u64) -> Result<Option<Entry>> {
        let (off, _) = self.l2_offset(gc)?;
        if off == 0 {
            return Ok(Some(Entry::default()));
        }
        self.tick += 1;
        let tick = self.tick;
        let i = (gc & (self.geo.l2_entries - 1)) as usize;
        let ext = self.geo.ext_l2;
        let Some(slot) = self.l2.get_mut(&off) else {
            return Ok(None);
        };
        slot.stamp = tick;
        Ok(Some(if ext {
            Entry {
                l2: slot.words[2 * i],
                bitmap: slot.words[2 * i + 1],
            }
        } else {
            Entry {
                l2: slot.words[i],
                bitmap: 0,
            }
        }))
    }

    /// Up to `n` consecutive entries from `gc` within one L2 table (for long reads).
    pub fn entries(&mut self, gc: u64, n: u64, out: &mut Vec<Entry>) -> Result<()> {
        out.clear();
        let (off, _) = self.l2_offset(gc)?;
        let i0 = gc & (self.geo.l2_entries - 1);
        let n = n.min(self.geo.l2_entries - i0).max(1);
        if off == 0 {
            out.resize(n as usize, Entry::default());
            return Ok(());
        }
        let ext = self.geo.ext_l2;
        let slot = self.load_l2(off)?;
        for i in i0..i0 + n {
            let i = i as usize;
            out.push(if ext {
                Entry {
                    l2: slot.words[2 * i],
                    bitmap: slot.words[2 * i + 1],
                }
            } else {
                Entry {
                    l2: slot.words[i],
                    bitmap: 0,
                }
            });
        }
        Ok(())
    }

    /// Writes the entry of `gc` through to the image; its L2 table must be writable.
    pub fn set_entry(&mut self, gc: u64, e: Entry) -> Result<()> {
        let (off, copied) = self.l2_offset(gc)?;
        if off == 0 || !copied {
            return Err(Error::Invalid("L2 table not writable".into()));
        }
        let i = (gc & (self.geo.l2_entries - 1)) as usize;
        let ext = self.geo.ext_l2;
        let slot = self.load_l2(off)?;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&e.l2.to_be_bytes());
        bytes[8..].copy_from_slice(&e.bitmap.to_be_bytes());
        let (at, len) = if ext {
            slot.words[2 * i] = e.l2;
            slot.words[2 * i + 1] = e.bitmap;
            (off + 16 * i as u64, 16)
        } else {
            slot.words[i] = e.l2;
            (off + 8 * i as u64, 8)
        };
        self.file
            .write_at(&bytes[..len], at)
            .map_err(Error::io("writing an L2 entry"))
    }

    /// [`Self::set_entry`] for consecutive guest clusters from `gc` within one L2
    /// table, written to the file in one request.
    pub fn set_entries(&mut self, gc: u64, entries: &[Entry]) -> Result<()> {
        let (off, copied) = self.l2_offset(gc)?;
        let i0 = (gc & (self.geo.l2_entries - 1)) as usize;
        if off == 0 || !copied || i0 + entries.len() > self.geo.l2_entries as usize {
            return Err(Error::Invalid("L2 table not writable".into()));
        }
        let ext = self.geo.ext_l2;
        let per = if ext { 16 } else { 8 };
        let slot = self.load_l2(off)?;
        let mut bytes = Vec::with_capacity(entries.len() * per);
        for (k, e) in entries.iter().enumerate() {
            bytes.extend_from_slice(&e.l2.to_be_bytes());
            if ext {
                bytes.extend_from_slice(&e.bitmap.to_be_bytes());
                slot.words[2 * (i0 + k)] = e.l2;
                slot.words[2 * (i0 + k) + 1] = e.bitmap;
            } else {
                slot.words[i0 + k] = e.l2;
            }
        }
        self.file
            .write_at(&bytes, off + (per * i0) as u64)
            .map_err(Error::io("writing L2 entries"))
    }

    fn write_l1_entry(&mut self, l1i: u64) -> Result<()> {
        let v = self.l1[l1i as usize];
        self.file
            .write_at(&v.to_be_bytes(), self.l1_offset + 8 * l1i)
            .map_err(Error::io("writing an L1 entry"))
    }

    /// Makes the L2 table of `gc` exist and belong to the active L1 alone (COPIED):
    /// allocates a zeroed one, or copies one shared with a snapshot.
    pub fn ensure_l2_writable(&mut self, gc: u64) -> Result<()> {
        let l1i = gc >> self.geo.l2_bits;
        if l1i as usize >= self.l1.len() {
            return Err(Error::Invalid("write beyond the L1 table".into()));
        }
        let (old, copied) = self.l2_offset(gc)?;
        if old != 0 && copied {
            return Ok(());
        }
        let cs = self.geo.cs;
        let new = self.alloc_cluster()?;
        self.check_overlap(new, cs)?;
        let words: Box<[u64]> = if old == 0 {
            vec![0u64; self.l2_words()].into_boxed_slice()
        } else {
            self.load_l2(old)?.words.clone()
        };
        let mut raw = vec![0u8; cs as usize];
        for (c, w) in raw.chunks_exact_mut(8).zip(words.iter()) {
            c.copy_from_slice(&w.to_be_bytes());
        }
        // Table first, then the L1 entry that points to it.
        self.file
            .write_at(&raw, new)
            .map_err(Error::io("writing an L2 table"))?;
        self.l1[l1i as usize] = new | OFLAG_COPIED;
        self.write_l1_entry(l1i)?;
        self.tick += 1;
        self.l2.insert(
            new,
            L2Slot {
                words,
                stamp: self.tick,
            },
        );
        self.add_section(new, cs, Section::ActiveL2);
        if old != 0 {
            // The snapshot keeps its copy: one reference fewer.
            self.remove_section(old);
            self.l2.remove(&old);
            self.decref(old / cs)?;
        }
        Ok(())
    }

    /// Registers the active L2 tables in the overlap map.
    pub fn register_l2_tables(&mut self) {
        let offs: Vec<u64> = self
            .l1
            .iter()
            .map(|e| e & L1E_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        let cs = self.geo.cs;
        for o in offs {
            self.add_section(o, cs, Section::ActiveL2);
        }
    }

    pub fn register_refblocks(&mut self) {
        let offs: Vec<u64> = self
            .rc
            .table
            .iter()
            .map(|e| e & crate::refcount::REFT_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        let cs = self.geo.cs;
        for o in offs {
            self.add_section(o, cs, Section::RefcountBlock);
        }
    }

    // ---- refcounts and allocation ---------------------------------------------

    pub fn refcount(&mut self, idx: u64) -> Result<u64> {
        let geo = self.geo;
        let file = self.file.clone();
        self.rc.get(&file, &geo, idx).map_err(|e| self.rc_err(e))
    }

    fn set_refcount(&mut self, idx: u64, v: u64, defer: bool) -> Result<()> {
        let geo = self.geo;
        let file = self.file.clone();
        self.rc
            .set(&file, &geo, idx, v, defer)
            .map_err(|e| self.rc_err(e))
    }

    /// Sets a refcount (creating its block when needed); written by `flush_refcounts`.
    pub fn set_refcount_public(&mut self, idx: u64, v: u64) -> Result<()> {
        self.ensure_refblock(idx >> self.geo.rb_bits)?;
        self.set_refcount(idx, v, true)?;
        if v == 0 {
            self.free_hint = self.free_hint.min(idx);
        }
        Ok(())
    }

    pub fn flush_refcounts(&mut self) -> Result<()> {
        let file = self.file.clone();
        self.rc.write_pending(&file)?;
        self.file.flush().map_err(Error::io("flushing"))
    }

    /// Drops one reference to cluster `idx`; a cluster reaching 0 is free again.
    pub fn decref(&mut self, idx: u64) -> Result<()> {
        let v = self.refcount(idx)?;
        if v == 0 {
            let off = idx * self.geo.cs;
            let msg = format!(
                "Cannot free cluster {}: its refcount is already 0",
                crate::error::hx(off)
            );
            return Err(self.corrupt(msg, Some(off), Some(self.geo.cs)));
        }
        self.set_refcount(idx, v - 1, false)?;
        if v == 1 {
            self.forget_ctail(idx);
            self.free_hint = self.free_hint.min(idx);
            if self.pass_discard {
                let _ = self.file.discard(idx * self.geo.cs, self.geo.cs);
            }
        }
        Ok(())
    }

    /// Makes sure a refcount block covers block index `bi`, growing the table if needed.
    fn ensure_refblock(&mut self, bi: u64) -> Result<()> {
        if bi as usize >= self.rc.table.len() {
            self.grow_reftable(bi + 1)?;
        }
        let geo = self.geo;
        let e = self.rc.table[bi as usize] & crate::refcount::REFT_OFFSET_MASK;
        if e != 0 {
            if !e.is_multiple_of(geo.cs) {
                let msg = format!(
                    "Refblock offset {} unaligned (reftable index: {})",
                    crate::error::hx(e),
                    crate::error::hx(bi)
                );
                return Err(self.corrupt(msg, Some(e), None));
            }
            return Ok(());
        }
        // No block: every cluster it would cover has refcount 0. Put the block in the
        // first of them, counting itself.
        let c0 = bi << geo.rb_bits;
        let off = c0.saturating_mul(geo.cs);
        if off > MAX_CLUSTER_OFFSET {
            return Err(Error::TooLarge("image file too large".into()));
        }
        self.check_overlap(off, geo.cs)?;
        let mut b = vec![0u8; geo.cs as usize].into_boxed_slice();
        crate::refcount::set_entry(&mut b, geo.rc_order, 0, 1);
        self.file
            .write_at(&b, off)
            .map_err(Error::io("writing a refcount block"))?;
        self.file.flush().map_err(Error::io("flushing"))?;
        self.rc.insert_block(off, b);
        self.rc.table[bi as usize] = off;
        self.file
            .write_at(&off.to_be_bytes(), self.rc.table_offset + 8 * bi)
            .map_err(Error::io("writing the refcount table"))?;
        self.add_section(off, geo.cs, Section::RefcountBlock);
        self.alloc_end = self.alloc_end.max(c0 + 1);
        Ok(())
    }

    /// A larger refcount table, with the refcount blocks that count it, laid out past
    /// everything in use; then the header points to it and the old one is freed.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cs;
        let per = 1u64 << geo.rb_bits;
        let old_len = self.rc.table.len() as u64;
        let file_clusters = self
            .file
            .len()
            .map_err(Error::io("reading the image length"))?
            .div_ceil(cs);
        let a = file_clusters.max(old_len * per).max(self.alloc_end);
        let mut entries = min_entries.max(old_len + old_len / 2).max(cs / 8);
        let mut nblocks = 1u64;
        let mut guard = 0;
        let (first_b, tclusters) = loop {
            guard += 1;
            if guard > 64 {
                return Err(Error::TooLarge("refcount table layout".into()));
            }
            let tclusters = (entries * 8).div_ceil(cs);
            let total = nblocks + tclusters;
            let first_b = a / per;
            let last_b = (a + total - 1) / per;
            let need_blocks = last_b - first_b + 1;
            if need_blocks <= nblocks && last_b < entries {
                break (first_b, tclusters);
            }
            nblocks = nblocks.max(need_blocks);
            entries = entries.max(last_b + 1);
        };
        let end = (a + nblocks + tclusters).saturating_mul(cs);
        if tclusters * cs > header::MAX_REFTABLE_BYTES || end > MAX_CLUSTER_OFFSET {
            return Err(Error::TooLarge("Reference count table too large".into()));
        }
        let total = nblocks + tclusters;
        let mut blocks: Vec<Box<[u8]>> = (0..nblocks)
            .map(|_| vec![0u8; cs as usize].into_boxed_slice())
            .collect();
        for c in a..a + total {
            let k = (c / per - first_b) as usize;
            crate::refcount::set_entry(&mut blocks[k], geo.rc_order, c % per, 1);
        }
        let new_entries = tclusters * cs / 8;
        let mut table = self.rc.table.clone();
        table.resize(new_entries as usize, 0);
        for k in 0..nblocks {
            table[(first_b + k) as usize] = (a + k) * cs;
        }
        for (k, b) in blocks.iter().enumerate() {
            self.check_overlap((a + k as u64) * cs, cs)?;
            self.file
                .write_at(b, (a + k as u64) * cs)
                .map_err(Error::io("writing a refcount block"))?;
        }
        let mut raw = vec![0u8; (tclusters * cs) as usize];
        for (c, w) in raw.chunks_exact_mut(8).zip(table.iter()) {
            c.copy_from_slice(&w.to_be_bytes());
        }
        let new_off = (a + nblocks) * cs;
        self.check_overlap(new_off, tclusters * cs)?;
        self.file
            .write_at(&raw, new_off)
            .map_err(Error::io("writing the refcount table"))?;
        self.file.flush().map_err(Error::io("flushing"))?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(tclusters as u32).to_be_bytes());
        self.file
            .write_at(&hdr, header::OFF_REFTABLE)
            .map_err(Error::io("updating the header"))?;
        self.file.flush().map_err(Error::io("flushing"))?;
        let (old_off, old_clusters) = (self.rc.table_offset, self.rc.table_clusters);
        self.rc.table = table;
        self.rc.table_offset = new_off;
        self.rc.table_clusters = tclusters;
        for (k, b) in blocks.into_iter().enumerate() {
            self.rc.insert_block((a + k as u64) * cs, b);
            self.add_section((a + k as u64) * cs, cs, Section::RefcountBlock);
        }
        self.remove_section(old_off);
        self.add_section(new_off, tclusters * cs, Section::RefcountTable);
        self.alloc_end = self.alloc_end.max(a + total);
        for c in 0..old_clusters {
            self.decref(old_off / cs + c)?;
        }
        Ok(())
    }

    /// Refcounts for a batch of free clusters, written and flushed once; they are then
    /// handed out without further refcount I/O. A crash leaks the unused rest (at
    /// most `batch_max` clusters).
    fn reserve_batch(&mut self) -> Result<()> {
        let geo = self.geo;
        let mut got = Vec::with_capacity(self.batch);
        let mut idx = self.free_hint;
        // Past the file's end every cluster is free unless refcounts lie (a hostile
        // image can claim 2^64 clusters in use): the scan stops a bit beyond it.
        let file_clusters = self
            .file
            .len()
            .map_err(Error::io("reading the image length"))?
            .div_ceil(geo.cs);
        let max_idx = (MAX_CLUSTER_OFFSET / geo.cs)
            .min(file_clusters.max(self.alloc_end) + (1 << 16) + self.batch as u64);
        while got.len() < self.batch {
            if idx >= max_idx {
                if got.is_empty() {
                    return Err(Error::TooLarge("No space left in the image".into()));
                }
                break;
            }
            self.ensure_refblock(idx >> geo.rb_bits)?;
            if self.refcount(idx)? == 0 {
                got.push(idx);
            }
            idx += 1;
        }
        for &c in &got {
            self.set_refcount(c, 1, true)?;
        }
        let file = self.file.clone();
        self.rc.write_pending(&file)?;
        self.file.flush().map_err(Error::io("flushing"))?;
        self.free_hint = idx;
        if let Some(&last) = got.last() {
            self.alloc_end = self.alloc_end.max(last + 1);
        }
        self.batch = self.batch.saturating_mul(2).min(self.batch_max);
        self.reserved
            .extend(got.into_iter().map(|c| (c, c >= file_clusters)));
        Ok(())
    }

    /// One cluster with refcount 1 on disk (byte offset).
    pub fn alloc_cluster(&mut self) -> Result<u64> {
        Ok(self.alloc_cluster_z()?.0)
    }

    /// One cluster with refcount 1 on disk, and whether it reads as zeroes.
    pub fn alloc_cluster_z(&mut self) -> Result<(u64, bool)> {
        if self.reserved.is_empty() {
            self.reserve_batch()?;
        }
        let (idx, zeroed) = self
            .reserved
            .pop_front()
            .ok_or_else(|| Error::TooLarge("No space left in the image".into()))?;
        Ok((idx * self.geo.cs, zeroed))
    }

    /// Gives back an allocated but unused cluster (possibly written to).
    pub fn unalloc_cluster(&mut self, off: u64) {
        self.reserved.push_front((off / self.geo.cs, false));
    }

    /// `n` contiguous clusters with refcount 1 on disk (snapshot L1 copies, snapshot
    /// tables), where QEMU's `qcow2_alloc_clusters` puts them: the engine's reserved
    /// clusters go back first, then [`Meta::alloc_clusters_qemu`], then the refcounts
    /// are written and flushed. (Placing them "past everything in use" with each
    /// missing refcount block at the start of its own range never found a run of
    /// `2^rb_bits` clusters or more, e.g. the L1 copy of a 1 GiB image with 512 B
    /// clusters: a new block landed in every candidate run and the file grew without
    /// bound.)
    pub fn alloc_contiguous(&mut self, n: u64) -> Result<u64> {
        self.release_reserved()?;
        let off = self.alloc_clusters_qemu(n)?;
        self.flush_refcounts()?;
        Ok(off)
    }

    /// Returns every reserved cluster (clean close).
    pub fn release_reserved(&mut self) -> Result<()> {
        while let Some((idx, _)) = self.reserved.pop_front() {
            self.decref(idx)?;
        }
        Ok(())
    }

    /// Grows the active L1 table to exactly `entries`, as QEMU's `qcow2_grow_l1_table`
    /// with `exact_size` (what truncate asks for): the new table goes where
    /// `qcow2_alloc_clusters` would put it ([`Meta::alloc_clusters_qemu`]), written
    /// with exactly `entries * 8` bytes (the file may end mid-cluster), then the header
    /// points to it, then the old table's clusters are freed (no discard passed down:
    /// QEMU's `pass-discard-other` is off).
    pub fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries <= self.l1.len() as u64 {
            return Ok(());
        }
        // QEMU: INT_MAX / 8 first, then QCOW_MAX_L1_SIZE / 8; both EFBIG.
        if entries > i32::MAX as u64 / 8 || entries * 8 > header::MAX_L1_BYTES {
            return Err(Error::TooLarge(
                "Failed to grow the L1 table: File too large".into(),
            ));
        }
        // The engine's reserved clusters go back first: QEMU has none, and its search
        // must see the same free clusters.
        self.release_reserved()?;
        let cs = self.geo.cs;
        let bytes = entries * 8;
        let new_off = self.alloc_clusters_qemu(bytes.div_ceil(cs))?;
        self.flush_refcounts()?;
        let mut raw = Vec::with_capacity(bytes as usize);
        for w in &self.l1 {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        raw.resize(bytes as usize, 0);
        self.check_overlap(new_off, bytes)?;
        self.file
            .write_at(&raw, new_off)
            .map_err(Error::io("writing the L1 table"))?;
        self.file.flush().map_err(Error::io("flushing"))?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        self.file
            .write_at(&hdr, header::OFF_L1_SIZE)
            .map_err(Error::io("updating the header"))?;
        self.file.flush().map_err(Error::io("flushing"))?;
        let old_off = self.l1_offset;
        let old_bytes = self.l1.len() as u64 * 8;
        self.l1.resize(entries as usize, 0);
        self.l1_offset = new_off;
        self.remove_section(old_off);
        self.add_section(new_off, bytes, Section::ActiveL1);
        if old_bytes > 0 {
            for c in old_off / cs..=(old_off + old_bytes - 1) / cs {
                self.decref_quiet(c)?;
            }
            self.flush_refcounts()?;
        }
        Ok(())
    }

    /// Drops one reference without passing a discard down (QEMU's
    /// `QCOW2_DISCARD_OTHER`, off by default).
    fn decref_quiet(&mut self, idx: u64) -> Result<()> {
        let pass = std::mem::replace(&mut self.pass_discard, false);
        let r = self.decref(idx);
        self.pass_discard = pass;
        r
    }

    /// QEMU's `alloc_clusters_noref`: from the free-cluster index (`free_hint`), the
    /// first run of `n` clusters with refcount 0; the index moves past it. Bounded a bit
    /// past the file's end (hostile refcounts can claim every cluster in use).
    fn find_free_run(&mut self, n: u64) -> Result<u64> {
        let geo = self.geo;
        let file_clusters = self
            .file
            .len()
            .map_err(Error::io("reading the image length"))?
            .div_ceil(geo.cs);
        let limit = (MAX_CLUSTER_OFFSET / geo.cs).min(
            file_clusters
                .max(self.alloc_end)
                .max(self.free_hint)
                .saturating_add(n)
                .saturating_add(1 << 16),
        );
        let mut idx = self.free_hint;
        let mut run = 0;
        while run < n {
            if idx >= limit {
                return Err(Error::TooLarge("No space left in the image".into()));
            }
            // One range (one refcount block) at a time: the same answer as asking
            // each cluster's refcount, without a lookup per cluster.
            let range_end = ((idx >> geo.rb_bits) + 1) << geo.rb_bits;
            let end = range_end.min(limit);
            let file = self.file.clone();
            let block = match self.rc.block(&file, &geo, idx) {
                Ok(b) => b,
                Err(e) => return Err(self.rc_err(e)),
            };
            match block {
                // No block: every cluster of the range is free.
                None => {
                    let take = (end - idx).min(n - run);
                    run += take;
                    idx += take;
                }
                Some(b) => {
                    let mask = (1u64 << geo.rb_bits) - 1;
                    while idx < end && run < n {
                        let r = crate::refcount::get_entry(b, geo.rc_order, idx & mask);
                        idx += 1;
                        run = if r == 0 { run + 1 } else { 0 };
                    }
                }
            }
        }
        self.free_hint = idx;
        Ok(idx - n)
    }

    /// QEMU's `qcow2_alloc_clusters` for `n` contiguous clusters: a free run from the
    /// free-cluster index, then +1 on each; where a refcount block is missing, one is
    /// allocated as `alloc_refcount_block` does and the search starts again (so the
    /// same run may be chosen again, or one past the new block). Refcount updates are
    /// left pending (the caller flushes them). Returns the byte offset.
    pub fn alloc_clusters_qemu(&mut self, n: u64) -> Result<u64> {
        // Each round adds at most one refcount block (or grows the table): a run
        // needs at most one per block range it spans, plus the table's.
        let max_rounds = (n >> self.geo.rb_bits).saturating_add(3).saturating_mul(2);
        let mut rounds = 0u64;
        loop {
            rounds += 1;
            if rounds > max_rounds {
                return Err(Error::TooLarge("No space left in the image".into()));
            }
            let start = self.find_free_run(n)?;
            if self.incref_range_qemu(start, n)? {
                self.alloc_end = self.alloc_end.max(start + n);
                return Ok(start * self.geo.cs);
            }
        }
    }

    /// +1 on clusters `start..start + n` (QEMU's `update_refcount`). `Ok(false)` when a
    /// refcount block had to be created first: what was already counted is undone
    /// (which moves the free index back to `start`) and the caller searches again.
    fn incref_range_qemu(&mut self, start: u64, n: u64) -> Result<bool> {
        let geo = self.geo;
        let has_block = |m: &Meta, c: u64| {
            m.rc.table
                .get((c >> geo.rb_bits) as usize)
                .is_some_and(|e| e & crate::refcount::REFT_OFFSET_MASK != 0)
        };
        // QEMU counts the clusters before the first one without a block, allocates
        // that block, then undoes what it counted (the free index going back to
        // `start`). The counting and undoing cancel out: only the block is allocated,
        // and the index is moved back as the undo would.
        let mut c = start;
        while c < start + n {
            if !has_block(self, c) {
                self.alloc_refblock_qemu(c)?;
                if c > start {
                    self.free_hint = self.free_hint.min(start);
                }
                return Ok(false);
            }
            c = ((c >> geo.rb_bits) + 1) << geo.rb_bits;
        }
        for c in start..start + n {
            self.add_refcount(c, 1)?;
        }
        Ok(true)
    }

    /// QEMU's `alloc_refcount_block` for cluster `c` whose block is missing: the block
    /// goes at the next free cluster (describing itself when it lies in its own range,
    /// else counted where it lies), is written, and hooked into the table. Always
    /// means "search again" for the caller. A table too small is grown by the engine's
    /// own layout (not QEMU's `qcow2_refcount_area`).
    fn alloc_refblock_qemu(&mut self, c: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cs;
        let bi = c >> geo.rb_bits;
        if bi as usize >= self.rc.table.len() {
            return self.grow_reftable(bi + 1);
        }
        let nb = self.find_free_run(1)?;
        if nb == 0 {
            let msg = "Preventing invalid allocation of refcount block at offset 0".to_string();
            return Err(self.corrupt(msg, None, None));
        }
        let mut b = vec![0u8; cs as usize].into_boxed_slice();
        if nb >> geo.rb_bits == bi {
            crate::refcount::set_entry(&mut b, geo.rc_order, nb & ((1 << geo.rb_bits) - 1), 1);
        } else {
            if !self.incref_range_qemu(nb, 1)? {
                return Ok(());
            }
            self.flush_refcounts()?;
        }
        let off = nb * cs;
        self.check_overlap(off, cs)?;
        self.file
            .write_at(&b, off)
            .map_err(Error::io("writing a refcount block"))?;
        self.file.flush().map_err(Error::io("flushing"))?;
        self.file
            .write_at(&off.to_be_bytes(), self.rc.table_offset + 8 * bi)
            .map_err(Error::io("writing the refcount table"))?;
        self.file.flush().map_err(Error::io("flushing"))?;
        self.rc.insert_block(off, b);
        self.rc.table[bi as usize] = off;
        self.add_section(off, cs, Section::RefcountBlock);
        self.alloc_end = self.alloc_end.max(nb + 1);
        Ok(())
    }
}

impl Meta {
    /// Drops every cached L2 table (after tables were rewritten behind the cache).
    pub fn clear_l2_cache(&mut self) {
        self.l2.clear();
    }

    /// Adds `addend` (+1, -1 or 0) to the refcount of every L2 table and data cluster
    /// under `l1` and, for `addend >= 0` on the active table, sets the COPIED flags from
    /// the resulting refcounts (QEMU's `qcow2_update_snapshot_refcount`). Returns the
    /// new L1 entries. Refcounts are written (deferred), L2 tables and L1 by the caller's
    /// order: see `snapshot_create`/`snapshot_delete`.
    pub fn update_tree_refcounts(
        &mut self,
        l1: &[u64],
        addend: i64,
        external: bool,
        fix_copied: bool,
    ) -> Result<Vec<u64>> {
        let geo = self.geo;
        let cs = geo.cs;
        let words_per = if geo.ext_l2 { 2usize } else { 1 };
        let mut new_l1 = l1.to_vec();
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(cs) {
                let msg = format!(
                    "L2 table offset {} unaligned (L1 index: {})",
                    crate::error::hx(l2),
                    crate::error::hx(i as u64)
                );
                return Err(self.corrupt(msg, None, None));
            }
            let mut raw = vec![0u8; cs as usize];
            self.file
                .read_at(&mut raw, l2)
                .map_err(Error::io("reading an L2 table"))?;
            let mut changed = false;
            for j in 0..geo.l2_entries as usize {
                let at = j * 8 * words_per;
                let mut ent = u64::from_be_bytes(raw[at..at + 8].try_into().unwrap_or([0; 8]));
                let refs: Vec<u64> = if ent & OFLAG_COMPRESSED != 0 {
                    let (coff, csize) = geo.compressed_span(ent);
                    (coff / cs..=(coff + csize - 1) / cs).collect()
                } else {
                    let off = ent & L2E_OFFSET_MASK;
                    if off == 0 || external {
                        Vec::new()
                    } else {
                        vec![off / cs]
                    }
                };
                let mut last = 0;
                for &c in &refs {
                    last = self.add_refcount(c, addend)?;
                }
                if fix_copied && ent & OFLAG_COMPRESSED == 0 && !refs.is_empty() {
                    let want = if last == 1 { OFLAG_COPIED } else { 0 };
                    if ent & OFLAG_COPIED != want {
                        ent = (ent & !OFLAG_COPIED) | want;
                        raw[at..at + 8].copy_from_slice(&ent.to_be_bytes());
                        changed = true;
                    }
                }
            }
            let rc = self.add_refcount(l2 / cs, addend)?;
            if changed {
                self.file
                    .write_at(&raw, l2)
                    .map_err(Error::io("writing an L2 table"))?;
            }
            if fix_copied {
                new_l1[i] = (e & !OFLAG_COPIED) | if rc == 1 { OFLAG_COPIED } else { 0 };
            }
        }
        Ok(new_l1)
    }

    pub fn add_refcount_pub(&mut self, idx: u64, addend: i64) -> Result<u64> {
        let v = self.add_refcount(idx, addend)?;
        if v == 0 {
            self.forget_ctail(idx);
            self.free_hint = self.free_hint.min(idx);
        }
        Ok(v)
    }

    /// A freed cluster is no longer one compressed writes may pack into.
    fn forget_ctail(&mut self, idx: u64) {
        if self.ctail.is_some_and(|(h, _)| h / self.geo.cs == idx) {
            self.ctail = None;
        }
    }

    /// Fails (without changing anything) if one more reference to everything under
    /// `l1` would overflow a refcount (narrow refcounts and many snapshots).
    pub fn check_tree_increment(&mut self, l1: &[u64], external: bool) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cs;
        let words_per = if geo.ext_l2 { 2usize } else { 1 };
        let max = if geo.rc_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << geo.rc_order)) - 1
        };
        // Each L2 table once, with the number of L1 entries pointing to it (a hostile
        // L1 can name one table millions of times).
        let mut tables: Vec<(u64, u64)> = Vec::new();
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for &e in l1 {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 || !l2.is_multiple_of(cs) {
                continue;
            }
            let k = *seen.entry(l2).or_insert_with(|| {
                tables.push((l2, 0));
                tables.len() - 1
            });
            tables[k].1 += 1;
        }
        let mut inc: HashMap<u64, u64> = HashMap::new();
        let mut raw = vec![0u8; cs as usize];
        for (l2, times) in tables {
            *inc.entry(l2 / cs).or_default() += times;
            self.file
                .read_at(&mut raw, l2)
                .map_err(Error::io("reading an L2 table"))?;
            for j in 0..geo.l2_entries as usize {
                let at = j * 8 * words_per;
                let ent = u64::from_be_bytes(raw[at..at + 8].try_into().unwrap_or([0; 8]));
                if ent & OFLAG_COMPRESSED != 0 {
                    let (coff, csize) = geo.compressed_span(ent);
                    for c in coff / cs..=(coff + csize - 1) / cs {
                        *inc.entry(c).or_default() += times;
                    }
                } else if ent & L2E_OFFSET_MASK != 0 && !external {
                    *inc.entry((ent & L2E_OFFSET_MASK) / cs).or_default() += times;
                }
            }
        }
        for (c, n) in inc {
            if self.refcount(c)?.saturating_add(n) > max {
                return Err(Error::TooLarge(format!(
                    "Refcount overflow: cluster {} would need more than {max} references",
                    crate::error::hx(c * cs)
                )));
            }
        }
        Ok(())
    }

    /// refcount(idx) += addend (deferred write); returns the new value.
    fn add_refcount(&mut self, idx: u64, addend: i64) -> Result<u64> {
        let v = self.refcount(idx)?;
        if addend == 0 {
            return Ok(v);
        }
        let max = if self.geo.rc_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.geo.rc_order)) - 1
        };
        let new = if addend > 0 {
            v.checked_add(addend as u64).filter(|&n| n <= max)
        } else {
            v.checked_sub(addend.unsigned_abs())
        };
        let Some(new) = new else {
            let off = idx * self.geo.cs;
            let msg = format!(
                "Refcount of cluster {} cannot change by {addend} from {v}",
                crate::error::hx(off)
            );
            return Err(self.corrupt(msg, Some(off), Some(self.geo.cs)));
        };
        self.set_refcount_public(idx, new)?;
        Ok(new)
    }

    /// Writes the whole active L1 table.
    pub fn write_l1(&mut self) -> Result<()> {
        let mut raw = Vec::with_capacity(self.l1.len() * 8);
        for e in &self.l1 {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.file
            .write_at(&raw, self.l1_offset)
            .map_err(Error::io("writing the L1 table"))
    }

    /// Writes a new snapshot table (contiguous clusters), switches the header to it
    /// (one 12-byte write), and frees the old one.
    pub fn replace_snapshot_table(
        &mut self,
        old: (u64, u64),
        entries: &[&[u8]],
    ) -> Result<(u64, u64)> {
        let cs = self.geo.cs;
        let table: Vec<u8> = entries.concat();
        let len = table.len() as u64;
        if len > header::MAX_SNAPSHOTS_BYTES {
            return Err(Error::TooLarge("Snapshot table too large".into()));
        }
        let new_off = if len > 0 {
            let off = self.alloc_contiguous(len.div_ceil(cs))?;
            self.check_overlap(off, len)?;
            self.file
                .write_at(&table, off)
                .map_err(Error::io("writing the snapshot table"))?;
            off
        } else {
            0
        };
        self.file.flush().map_err(Error::io("flushing"))?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries.len() as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        self.file
            .write_at(&hdr, 60)
            .map_err(Error::io("updating the header"))?;
        self.file.flush().map_err(Error::io("flushing"))?;
        self.remove_section(old.0);
        self.add_section(new_off, len, Section::SnapshotTable);
        if old.1 > 0 {
            for c in old.0 / cs..=(old.0 + old.1 - 1) / cs {
                self.decref(c)?;
            }
        }
        Ok((new_off, len))
    }
}
