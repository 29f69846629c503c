//! Persistent bitmaps owned by the caller: the engine hands the bitmaps it loaded
//! over ([`Qcow2::take_bitmaps`]) and later stores the caller's set
//! ([`Qcow2::store_bitmaps`], QEMU's `qcow2_store_persistent_dirty_bitmaps`) or drops
//! one from the image ([`Qcow2::remove_bitmap`], `qcow2_co_remove_persistent_dirty_bitmap`).
//!
//! The bitmaps then live where the rest of the daemon's bitmaps live (bulkhead's
//! supervisor), so a worker that dies loses no bit, and the commands treat stored and
//! unstored bitmaps alike. While taken, a bitmap stays marked in use on disk: a crash
//! before the next store leaves it inconsistent, never stale.
//!
//! A store writes every given bitmap anew (data clusters, then its table), then a new
//! directory, a flush, then the header (extension and autoclear bit), a flush, and
//! only then frees the old tables, data and directory: a crash at any point leaves the
//! old directory or the new one, both whole. Clusters are placed as QEMU places them
//! (`qcow2_alloc_clusters` one at a time), so the file matches qsd's.

use crate::bitmap::{self, BitmapInfo, ENTRY_OFFSET_MASK, FLAG_AUTO, FLAG_IN_USE};
use crate::error::{Error, Result};
use crate::header::{self, BitmapsExt};
use crate::meta::{Meta, Section};
use crate::{Qcow2, lock_err};

/// The directory as it is on disk now.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoredDir {
    pub entries: Vec<BitmapInfo>,
    pub ext: Option<BitmapsExt>,
}

/// A bitmap the engine handed over (see [`Qcow2::take_bitmaps`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenBitmap {
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Writes mark it (the `auto` flag).
    pub enabled: bool,
    /// Its bits, least significant bit first, one per granule of the virtual size.
    pub bits: Vec<u8>,
}

/// A bitmap to store (see [`Qcow2::store_bitmaps`]).
#[derive(Debug, Clone, Copy)]
pub struct StoreBitmap<'a> {
    pub name: &'a str,
    /// Bytes per bit (a power of two).
    pub granularity: u64,
    /// Stored with the `auto` flag: it records again after the next open.
    pub enabled: bool,
    /// Least significant bit first; bytes past the bitmap's end are ignored, missing
    /// ones are zero.
    pub bits: &'a [u8],
}

/// QEMU's QCOW2_MAX_BITMAPS.
const MAX_BITMAPS: usize = 65535;

/// Bytes of one directory entry with a name of `name_len` bytes (`calc_dir_entry_size`).
pub fn dir_entry_size(name_len: usize) -> u64 {
    (24 + name_len as u64).next_multiple_of(8)
}

/// What QEMU 10's `qcow2_co_can_store_new_dirty_bitmap` checks, in its order:
/// `Ok`, or the text after "Can't make bitmap 'NAME' persistent in 'NODE': ".
/// `persistent`: the names of the node's persistent bitmaps in memory.
pub fn can_store_new(
    version: u32,
    persistent: &[&str],
    virtual_size: u64,
    cluster_size: u64,
    name: &str,
    granularity: u64,
) -> std::result::Result<(), String> {
    if version < 3 {
        return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
    }
    // check_constraints_on_bitmap
    let bits = granularity.trailing_zeros();
    if bits > 31 {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << 31
        ));
    }
    if bits < 9 {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << 9
        ));
    }
    let len = u128::from(virtual_size);
    if len > 0x2000_0000u128 << bits || len > (0x0800_0000u128 * u128::from(cluster_size)) << bits {
        return Err("Too much space will be occupied by the bitmap. Use larger granularity".into());
    }
    if name.len() > 1023 {
        return Err("Name length exceeds maximum (1023 characters)".into());
    }
    if persistent.len() + 1 > MAX_BITMAPS {
        return Err("Maximum number of persistent bitmaps is already reached".into());
    }
    let dir: u64 = persistent.iter().map(|n| dir_entry_size(n.len())).sum();
    if dir + dir_entry_size(name.len()) > header::MAX_BITMAP_DIRECTORY_BYTES {
        return Err("Not enough space in the bitmap directory".into());
    }
    Ok(())
}

/// An entry of the directory being written: kept as it is, or written from bits.
enum NewEntry<'a> {
    Keep(BitmapInfo),
    Write(StoreBitmap<'a>),
}

impl Qcow2 {
    /// Hands over the bitmaps named that were loaded at open and are usable
    /// (consistent), and stops tracking them: the caller marks writes from now on
    /// and stores the set back with [`Qcow2::store_bitmaps`]. They stay in use on
    /// disk meanwhile (a read-only image's are never marked in use, and nothing is
    /// stored to it).
    pub fn take_bitmaps(&self, names: &[String]) -> Vec<TakenBitmap> {
        let cs = self.geo.cs;
        let mut live = self.live.lock().unwrap_or_else(lock_err);
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *live)
            .into_iter()
            .partition(|l| !l.inconsistent && names.contains(&l.info.name));
        *live = kept;
        taken
            .into_iter()
            .map(|l| TakenBitmap {
                name: l.info.name.clone(),
                granularity: l.info.granularity(),
                enabled: l.info.auto(),
                bits: l.bytes(cs),
            })
            .collect()
    }

    /// Stores `bitmaps` in the image (QEMU's `qcow2_store_persistent_dirty_bitmaps`):
    /// each one replaces the stored bitmap of its name or is appended, flags `auto`
    /// as asked and no longer in use; stored bitmaps not named stay as they are
    /// (inconsistent ones among them). Needs every usable loaded bitmap taken first.
    pub fn store_bitmaps(&self, bitmaps: &[StoreBitmap<'_>]) -> Result<()> {
        self.check_writable()?;
        if self.geo.version < 3 && !bitmaps.is_empty() {
            return Err(Error::Unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        let (_gate, mut m) = self.quiesce()?;
        self.untaken_check()?;
        let dir = self.dir.lock().unwrap_or_else(lock_err).clone();
        let mut entries: Vec<NewEntry<'_>> = Vec::with_capacity(dir.entries.len());
        let mut drop_tables = Vec::new();
        for e in &dir.entries {
            match bitmaps.iter().find(|b| b.name == e.name) {
                Some(b) => {
                    drop_tables.push(e.clone());
                    // A hostile directory may name a bitmap twice: it is written
                    // once, in the first one's place, the others dropped.
                    let written = entries
                        .iter()
                        .any(|n| matches!(n, NewEntry::Write(w) if w.name == b.name));
                    if !written {
                        entries.push(NewEntry::Write(*b));
                    }
                }
                None => entries.push(NewEntry::Keep(e.clone())),
            }
        }
        for b in bitmaps {
            let stored = dir.entries.iter().any(|e| e.name == b.name);
            let twice = entries
                .iter()
                .any(|e| matches!(e, NewEntry::Write(w) if w.name == b.name));
            if !stored && !twice {
                entries.push(NewEntry::Write(*b));
            }
        }
        if bitmaps.is_empty() {
            return Ok(());
        }
        self.rewrite_dir(&mut m, &dir, entries, drop_tables)
    }

    /// Drops bitmap `name` from the image (its directory entry, table and data), as
    /// `qcow2_co_remove_persistent_dirty_bitmap`. A name the image does not hold is
    /// not an error (a persistent bitmap not stored yet).
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let (_gate, mut m) = self.quiesce()?;
        self.untaken_check()?;
        let dir = self.dir.lock().unwrap_or_else(lock_err).clone();
        let Some(gone) = dir.entries.iter().find(|e| e.name == name).cloned() else {
            return Ok(());
        };
        // Only the first of several equal names goes (QEMU's find_bitmap_by_name).
        let mut removed = false;
        let entries = dir
            .entries
            .iter()
            .filter(|e| {
                if !removed && e.name == name {
                    removed = true;
                    return false;
                }
                true
            })
            .map(|e| NewEntry::Keep(e.clone()))
            .collect();
        // A loaded but inconsistent one stops showing too.
        let mut live = self.live.lock().unwrap_or_else(lock_err);
        if let Some(i) = live.iter().position(|l| l.info.name == name) {
            live.remove(i);
        }
        drop(live);
        self.rewrite_dir(&mut m, &dir, entries, vec![gone])
    }

    /// Whether every directory entry is either taken by the caller or inconsistent
    /// (so a resize can go on: the caller resizes what it holds, as QEMU does with
    /// the bitmaps in memory); `Err` with QEMU's text otherwise.
    pub(crate) fn resize_bitmaps_check(&self) -> Result<()> {
        let live = self.live.lock().unwrap_or_else(lock_err);
        if let Some(l) = live.iter().find(|l| l.inconsistent) {
            return Err(Error::Unsupported(format!(
                "Bitmap '{}' is inconsistent and cannot be used\n\
                 Try block-dirty-bitmap-remove to delete this bitmap from disk",
                l.info.name
            )));
        }
        if live.iter().any(|l| l.marked) {
            return Err(Error::Unsupported(
                "Cannot resize an image with persistent bitmaps".into(),
            ));
        }
        Ok(())
    }

    fn untaken_check(&self) -> Result<()> {
        if self
            .live
            .lock()
            .unwrap_or_else(lock_err)
            .iter()
            .any(|l| l.marked)
        {
            return Err(Error::Invalid(
                "the image's bitmaps must be taken before they are stored".into(),
            ));
        }
        Ok(())
    }

    /// Writes `entries` as the new directory (see the module docs), then frees the
    /// clusters of `drop_tables` and of the old directory.
    fn rewrite_dir(
        &self,
        m: &mut Meta,
        old: &StoredDir,
        entries: Vec<NewEntry<'_>>,
        drop_tables: Vec<BitmapInfo>,
    ) -> Result<()> {
        let cs = self.geo.cs;
        let size = self.size();
        if entries.len() > MAX_BITMAPS {
            return Err(Error::TooLarge(
                "Maximum number of persistent bitmaps is already reached".into(),
            ));
        }
        m.release_reserved()?;
        let mut infos = Vec::with_capacity(entries.len());
        for e in entries {
            match e {
                NewEntry::Keep(info) => infos.push(info),
                NewEntry::Write(b) => infos.push(self.write_bitmap(m, &b, size)?),
            }
        }
        // The directory.
        let mut raw = Vec::new();
        for b in &infos {
            raw.extend_from_slice(&b.table_offset.to_be_bytes());
            raw.extend_from_slice(&b.table_size.to_be_bytes());
            raw.extend_from_slice(&b.flags.to_be_bytes());
            raw.push(1);
            raw.push(b.granularity_bits);
            raw.extend_from_slice(&(b.name.len() as u16).to_be_bytes());
            raw.extend_from_slice(&0u32.to_be_bytes());
            raw.extend_from_slice(b.name.as_bytes());
            raw.resize(raw.len().next_multiple_of(8), 0);
        }
        if raw.len() as u64 > header::MAX_BITMAP_DIRECTORY_BYTES {
            return Err(Error::TooLarge(
                "Not enough space in the bitmap directory".into(),
            ));
        }
        let ext = if infos.is_empty() {
            None
        } else {
            let clusters = (raw.len() as u64).div_ceil(cs);
            let at = m.alloc_clusters_qemu(clusters)?;
            m.flush_refcounts()?;
            m.check_overlap(at, raw.len() as u64)?;
            self.file
                .write_at(&raw, at)
                .map_err(Error::io("writing the bitmap directory"))?;
            Some(BitmapsExt {
                nb_bitmaps: infos.len() as u32,
                directory_size: raw.len() as u64,
                directory_offset: at,
            })
        };
        self.file.flush().map_err(Error::io("flushing"))?;
        self.write_header_exts(None, Some(ext))?;
        // Where each entry's flags are now (for a later close to update in place).
        let mut at = ext.map_or(0, |e| e.directory_offset);
        for b in &mut infos {
            b.flags_offset = at + 12;
            at += dir_entry_size(b.name.len());
        }
        if let Some(o) = old.ext {
            m.remove_section(o.directory_offset);
        }
        if let Some(e) = ext {
            m.add_section(
                e.directory_offset,
                e.directory_size,
                Section::BitmapDirectory,
            );
        }
        *self.dir.lock().unwrap_or_else(lock_err) = StoredDir {
            entries: infos,
            ext,
        };
        // The old data: each cluster once (a hostile image may share them), and only
        // references its refcount accounts for.
        let mut free = std::collections::BTreeSet::new();
        for t in &drop_tables {
            let n = (u64::from(t.table_size) * 8).div_ceil(cs);
            let mut table = vec![0u8; (u64::from(t.table_size) * 8) as usize];
            self.file
                .read_at(&mut table, t.table_offset)
                .map_err(Error::io("reading a bitmap table"))?;
            for e in table.chunks_exact(8) {
                let e = u64::from_be_bytes(e.try_into().unwrap_or([0; 8]));
                let off = e & ENTRY_OFFSET_MASK;
                if off != 0 {
                    free.insert(off / cs);
                }
            }
            for c in 0..n {
                free.insert(t.table_offset / cs + c);
            }
        }
        if let Some(o) = old.ext {
            for c in 0..o.directory_size.div_ceil(cs) {
                free.insert(o.directory_offset / cs + c);
            }
        }
        for c in free {
            if m.refcount(c)? > 0 {
                m.decref(c)?;
            }
        }
        m.flush_refcounts()
    }

    /// Writes one bitmap's data clusters (all-zero ones are not written) and its
    /// table, returning its new directory entry.
    fn write_bitmap(&self, m: &mut Meta, b: &StoreBitmap<'_>, size: u64) -> Result<BitmapInfo> {
        let cs = self.geo.cs;
        let gbits = b.granularity.trailing_zeros() as u8;
        if !b.granularity.is_power_of_two() || !(9..=31).contains(&gbits) {
            return Err(Error::Invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                b.name
            )));
        }
        let nbits = size.div_ceil(b.granularity);
        let bytes = nbits.div_ceil(8);
        let entries = bytes.div_ceil(cs);
        if entries > 0x0800_0000 || entries * cs > 0x2000_0000 {
            return Err(Error::TooLarge(
                "Too much space will be occupied by the bitmap. Use larger granularity".into(),
            ));
        }
        let mut table = Vec::with_capacity(entries as usize);
        let mut chunk = vec![0u8; cs as usize];
        for i in 0..entries {
            let from = (i * cs) as usize;
            let to = ((i + 1) * cs).min(bytes) as usize;
            chunk.fill(0);
            if let Some(src) = b.bits.get(from..to.min(b.bits.len())) {
                chunk[..src.len()].copy_from_slice(src);
            }
            // Bits past the end of the bitmap are not part of it.
            bitmap::clear_from(&mut chunk, nbits.saturating_sub(i * cs * 8).min(cs * 8));
            if chunk.iter().all(|&x| x == 0) {
                table.push(0u64);
                continue;
            }
            let at = m.alloc_clusters_qemu(1)?;
            m.check_overlap(at, cs)?;
            self.file
                .write_at(&chunk, at)
                .map_err(Error::io("writing a bitmap"))?;
            table.push(at);
        }
        let mut raw = Vec::with_capacity(table.len() * 8);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        let table_offset = m.alloc_clusters_qemu((raw.len() as u64).div_ceil(cs))?;
        m.flush_refcounts()?;
        m.check_overlap(table_offset, raw.len() as u64)?;
        self.file
            .write_at(&raw, table_offset)
            .map_err(Error::io("writing a bitmap table"))?;
        Ok(BitmapInfo {
            name: b.name.to_string(),
            granularity_bits: gbits,
            flags: if b.enabled { FLAG_AUTO } else { 0 } & !FLAG_IN_USE,
            table_offset,
            table_size: entries as u32,
            flags_offset: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, MemStorage, OpenOptions, Storage, create_layout};
    use std::sync::Arc;

    const SIZE: u64 = 64 << 20;

    fn image(size: u64) -> Arc<MemStorage> {
        let mem = Arc::new(MemStorage::new(Vec::new(), 1 << 30));
        let o = CreateOptions {
            size,
            cluster_size: 65536,
            ..Default::default()
        };
        for (off, bytes) in create_layout(&o).expect("layout") {
            mem.write_at(&bytes, off).expect("write");
        }
        mem
    }

    fn open(mem: &Arc<MemStorage>) -> Qcow2 {
        let opts = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        Qcow2::open(Arc::clone(mem) as Arc<dyn Storage>, opts).expect("open")
    }

    fn names_and_flags(q: &Qcow2) -> Vec<(String, u32)> {
        q.info()
            .bitmaps
            .iter()
            .map(|b| (b.name.clone(), b.flags))
            .collect()
    }

    #[test]
    fn stored_bitmaps_load_again_with_their_bits_and_a_removed_one_is_gone() {
        let mem = image(SIZE);
        // 1024 bits at 64 KiB: a pattern with a bit past the end that must not stick.
        let mut a = vec![0u8; 128];
        a[0] = 0b1010_0001;
        a[127] = 0x80;
        let b = vec![0xffu8; 2048]; // 16384 bits at 4 KiB
        let q = open(&mem);
        q.store_bitmaps(&[
            StoreBitmap {
                name: "a",
                granularity: 65536,
                enabled: true,
                bits: &a,
            },
            StoreBitmap {
                name: "b",
                granularity: 4096,
                enabled: false,
                bits: &b,
            },
        ])
        .expect("store");
        assert_eq!(
            names_and_flags(&q),
            vec![("a".into(), FLAG_AUTO), ("b".into(), 0)]
        );
        q.close().expect("close");

        let q = open(&mem);
        // Loaded by a writable open: in use on disk while open.
        assert_eq!(
            names_and_flags(&q),
            vec![
                ("a".into(), FLAG_AUTO | FLAG_IN_USE),
                ("b".into(), FLAG_IN_USE)
            ]
        );
        let taken = q.take_bitmaps(&["a".into(), "b".into()]);
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0].bits, a);
        assert!(taken[0].enabled);
        assert_eq!(taken[1].bits, b);
        assert!(!taken[1].enabled);
        // Taken: the engine's close leaves them in use; the caller stores them.
        q.remove_bitmap("a").expect("remove");
        q.store_bitmaps(&[StoreBitmap {
            name: "b",
            granularity: 4096,
            enabled: true,
            bits: &[0x01],
        }])
        .expect("store again");
        q.close().expect("close");

        let q = open(&mem);
        assert_eq!(
            names_and_flags(&q),
            vec![("b".into(), FLAG_AUTO | FLAG_IN_USE)]
        );
        let taken = q.take_bitmaps(&["b".into()]);
        let mut want = vec![0u8; 2048];
        want[0] = 0x01;
        assert_eq!(taken[0].bits, want);
        q.remove_bitmap("b").expect("remove the last");
        q.close().expect("close");
        let q = open(&mem);
        assert!(q.info().bitmaps.is_empty());
        assert!(!q.info().has_bitmaps);
    }

    #[test]
    fn untaken_bitmaps_are_not_overwritten_and_v2_images_store_none() {
        let mem = image(SIZE);
        let q = open(&mem);
        q.store_bitmaps(&[StoreBitmap {
            name: "a",
            granularity: 65536,
            enabled: true,
            bits: &[],
        }])
        .expect("store");
        q.close().expect("close");
        let q = open(&mem);
        assert!(q.store_bitmaps(&[]).is_err(), "not taken yet");
        assert!(q.remove_bitmap("a").is_err(), "not taken yet");
        drop(q);

        assert_eq!(
            can_store_new(2, &[], SIZE, 65536, "x", 65536),
            Err("Cannot store dirty bitmaps in qcow2 v2 files".into())
        );
        assert_eq!(
            can_store_new(3, &[], 1 << 50, 65536, "x", 512),
            Err("Too much space will be occupied by the bitmap. Use larger granularity".into())
        );
        assert_eq!(can_store_new(3, &["a"], SIZE, 65536, "x", 65536), Ok(()));
    }
}
