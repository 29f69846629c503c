//! A qcow2 image engine (QEMU's docs/interop/qcow2.txt), hand-written for bulkhead's
//! sandboxed driver worker. It depends on no other bulkhead crate.
//!
//! - [`Storage`]: positioned I/O on the image file and an external data file
//!   ([`FdStorage`] over an owned descriptor, [`MemStorage`] in memory).
//! - [`Backing`]: reads of the backing node (the supervisor opens it; the engine only
//!   reports the name from the header in [`Info`]). [`Qcow2`] implements it, for chains.
//! - [`Qcow2::open`] with [`OpenOptions`]; [`Qcow2::info`] for queries.
//! - `&self` I/O callable from many threads at once: [`Qcow2::read`], [`Qcow2::write`],
//!   [`Qcow2::write_zeroes`], [`Qcow2::discard`], [`Qcow2::write_compressed`],
//!   [`Qcow2::flush`], [`Qcow2::block_status`], [`Qcow2::resize`], [`Qcow2::close`].
//! - [`Error`]: open errors carry QEMU's texts; run-time metadata inconsistencies are
//!   [`Error::Corrupt`] with what QEMU's `BLOCK_IMAGE_CORRUPTED` event reports.
//!
//! Crash invariant: every metadata update a completed request depends on is written
//! (pwrite) before the request returns, in the order data → L2 entry → L1 entry, and
//! a cluster's refcount is on disk (and flushed, batch-wise) before any L2 entry uses
//! it. See design/qcow2.md.

mod bitmap;
mod compress;
mod create;
mod error;
mod header;
mod meta;
mod probe;
mod refcount;
mod repair;
mod snapshot;
mod storage;
mod stored;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

pub use bitmap::{BitmapInfo, BitmapStatus};
pub use create::{CreateOptions, create_layout};
pub use error::{Error, Result};
pub use header::{CompressionType, FeatureName};
pub use meta::OverlapCheck;
pub use probe::{HeaderFacts, header_facts, named_data_file};
pub use snapshot::SnapshotInfo;
pub use storage::{Backing, FdStorage, MemStorage, Storage};
pub use stored::{StoreBitmap, TakenBitmap, can_store_new, dir_entry_size};

use header::{INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2};
use meta::{
    L2E_OFFSET_MASK, MAX_CLUSTER_OFFSET, Meta, MetaInit, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO, Section,
};

/// Options of [`Qcow2::open`].
#[derive(Clone, Default)]
pub struct OpenOptions {
    pub writable: bool,
    /// The external data file, required when the image has one (the engine never opens
    /// paths: [`Info::data_file`] names it for the caller).
    pub data_file: Option<Arc<dyn Storage>>,
    /// The backing node; `None` reads unallocated clusters as zeroes.
    pub backing: Option<Arc<dyn Backing>>,
    /// L2 table cache size in bytes (QEMU's `l2-cache-size`; default 32 MiB, never more
    /// than the image needs, at least 2 tables).
    pub l2_cache_size: Option<u64>,
    /// Refcount block cache size in bytes (`refcount-cache-size`; default 4 clusters,
    /// at least 2 blocks).
    pub refcount_cache_size: Option<u64>,
    /// `overlap-check` (default `cached`).
    pub overlap_check: OverlapCheck,
    /// `discard-no-unref`: a discard keeps the cluster allocated (it reads as zeroes).
    pub discard_no_unref: bool,
    /// `pass-discard-request`-like: clusters freed are discarded on the image file.
    pub pass_discard: bool,
    /// Clusters reserved per refcount update + flush (default: 4 MiB worth, growing
    /// to 32 MiB worth, 16..1024 clusters; a given batch does not grow).
    pub alloc_batch: Option<usize>,
}

/// What a parent needs to know about the image.
#[derive(Debug, Clone)]
pub struct Info {
    pub virtual_size: u64,
    pub cluster_size: u64,
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub dirty: bool,
    pub corrupt: bool,
    pub extended_l2: bool,
    pub compression_type: CompressionType,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub data_file_raw: bool,
    /// 0 none, 1 AES, 2 LUKS (the engine opens only 0).
    pub crypt_method: u32,
    pub snapshots: Vec<SnapshotInfo>,
    /// The bitmaps extension is present (and valid: its autoclear bit is set).
    pub has_bitmaps: bool,
    pub bitmaps: Vec<BitmapInfo>,
    pub feature_table: Vec<FeatureName>,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
}

/// One extent of [`Qcow2::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    /// Reads as data (allocated here, compressed, or an allocated non-zero subcluster).
    pub data: bool,
    /// Reads as zeroes because of a zero flag.
    pub zero: bool,
    /// Allocated in this image (false: the backing node or zeroes answer).
    pub allocated: bool,
    /// Where the data is in the data file (plain allocated clusters only).
    pub host_offset: Option<u64>,
}

/// Geometry derived from the header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geo {
    pub cluster_bits: u32,
    pub cs: u64,
    pub l2_bits: u32,
    pub l2_entries: u64,
    pub ext_l2: bool,
    /// Subcluster size (the cluster size without extended L2).
    pub scs: u64,
    pub sc_per_cluster: u64,
    pub rc_order: u32,
    /// log2 of the entries in one refcount block.
    pub rb_bits: u32,
    pub csize_shift: u32,
    pub csize_mask: u64,
    pub coff_mask: u64,
    pub version: u32,
}

/// One L2 entry: the standard 64 bits and, with extended L2, the subcluster bitmap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub l2: u64,
    pub bitmap: u64,
}

/// How one subcluster reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Unalloc,
    Zero,
    /// Host offset of the subcluster's start.
    Data(u64),
    Compressed,
}

const ALL_ALLOC: u64 = 0xffff_ffff;

impl Geo {
    fn compressed_span(&self, l2: u64) -> (u64, u64) {
        let coff = l2 & self.coff_mask;
        let nb = ((l2 >> self.csize_shift) & self.csize_mask) + 1;
        (coff, nb * 512 - (coff & 511))
    }
}

/// The qcow2 engine. `Send + Sync`; see the crate docs.
pub struct Qcow2 {
    file: Arc<dyn Storage>,
    data: Arc<dyn Storage>,
    /// The backing node and its length (cached: re-read by `set_backing` and
    /// `refresh_backing_len`).
    backing: RwLock<Option<(Arc<dyn Backing>, u64)>>,
    geo: Geo,
    writable: bool,
    external_data: bool,
    data_raw: bool,
    discard_no_unref: bool,
    info: Info,
    size: AtomicU64,
    dead: Arc<AtomicBool>,
    closed: AtomicBool,
    meta: Mutex<Meta>,
    /// Signalled when an in-flight allocation completes.
    alloc_done: Condvar,
    /// Every persistent bitmap loaded at open, in directory order (see `bitmap`).
    live: Mutex<Vec<bitmap::Loaded>>,
    /// Some loaded bitmap records writes (enabled, consistent, image writable).
    has_live: bool,
    /// The bitmap directory as on disk now (flags in use while loaded writable).
    dir: Mutex<stored::StoredDir>,
    /// Backing file name and format as the header says now.
    backing_names: Mutex<(Option<String>, Option<String>)>,
    /// Held shared by requests doing I/O on clusters they looked up, exclusively while
    /// clusters are freed: a cluster is never reused under a request still using it.
    gate: RwLock<()>,
    /// Writes in place outside the engine ([`InPlace`]) still running: they took the
    /// gate shared to start, and whoever takes it exclusively waits for them too.
    pins: Mutex<usize>,
    unpinned: Condvar,
}

/// A lease to write guest bytes in place without the engine: the clusters under them
/// stay the guest range's (no free, reuse, snapshot or close) until it is dropped.
#[must_use]
pub struct InPlace<'a> {
    engine: &'a Qcow2,
    host: u64,
}

impl InPlace<'_> {
    /// Where the bytes go in the data file (the image file unless it has a data file).
    pub fn host(&self) -> u64 {
        self.host
    }
}

impl std::fmt::Debug for InPlace<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPlace").field("host", &self.host).finish()
    }
}

impl Drop for InPlace<'_> {
    fn drop(&mut self) {
        let mut pins = self.engine.pins.lock().unwrap_or_else(lock_err);
        *pins -= 1;
        if *pins == 0 {
            self.engine.unpinned.notify_all();
        }
    }
}

fn lock_err<T>(e: std::sync::PoisonError<T>) -> T {
    e.into_inner()
}

impl Qcow2 {
    /// Opens an image; checks follow QEMU's order and texts.
    pub fn open(file: Arc<dyn Storage>, opts: OpenOptions) -> Result<Qcow2> {
        let mut first = vec![0u8; 512];
        file.read_at(&mut first, 0)
            .map_err(Error::io("Could not read qcow2 header"))?;
        let cb = u32::from_be_bytes(first[20..24].try_into().unwrap_or([0; 4]));
        if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cb) && cb > 9 {
            first = vec![0u8; 1usize << cb];
            file.read_at(&mut first, 0)
                .map_err(Error::io("Could not read qcow2 header"))?;
        }
        let h = header::parse(
            &first,
            header::ParseFlags {
                writable: opts.writable,
            },
        )?;
        drop(first);
        let cs = 1u64 << h.cluster_bits;
        if h.crypt_method != 0 {
            // LUKS comes with its own issue; an encrypted image is never read as
            // plaintext.
            return Err(Error::open(libc::EINVAL, header::KEY_SECRET_REQUIRED));
        }
        let ext_l2 = h.incompatible & INCOMPAT_EXTL2 != 0;
        let l2_entry_bytes = if ext_l2 { 16 } else { 8 };
        let geo = Geo {
            cluster_bits: h.cluster_bits,
            cs,
            l2_bits: h.cluster_bits - if ext_l2 { 4 } else { 3 },
            l2_entries: cs / l2_entry_bytes,
            ext_l2,
            scs: if ext_l2 { cs / 32 } else { cs },
            sc_per_cluster: if ext_l2 { 32 } else { 1 },
            rc_order: h.refcount_order,
            rb_bits: h.cluster_bits + 3 - h.refcount_order,
            csize_shift: 62 - (h.cluster_bits - 8),
            csize_mask: (1u64 << (h.cluster_bits - 8)) - 1,
            coff_mask: (1u64 << (62 - (h.cluster_bits - 8))) - 1,
            version: h.version,
        };
        // External data file.
        let has_df = h.incompatible & INCOMPAT_DATA_FILE != 0;
        let data_raw = h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0;
        let data: Arc<dyn Storage> = match (has_df, opts.data_file.clone()) {
            (true, Some(d)) => d,
            (true, None) => {
                return Err(Error::open(
                    libc::EINVAL,
                    "'data-file' is required for this image",
                ));
            }
            (false, Some(_)) => {
                return Err(Error::open(
                    libc::EINVAL,
                    "'data-file' can only be set for images with an external data file",
                ));
            }
            (false, None) => {
                if data_raw {
                    return Err(Error::open(
                        libc::EINVAL,
                        "data-file-raw requires a data file",
                    ));
                }
                file.clone()
            }
        };
        let file_len = file
            .len()
            .map_err(Error::io("Could not read image length"))?;
        // Snapshots (bounded by QCOW_MAX_SNAPSHOTS_SIZE and by the file).
        let snapshots = if h.nb_snapshots > 0 {
            let want = header::MAX_SNAPSHOTS_BYTES.min(file_len.saturating_sub(h.snapshots_offset));
            let mut raw = vec![0u8; want as usize];
            file.read_at(&mut raw, h.snapshots_offset)
                .map_err(Error::io("Failed to read snapshot table"))?;
            snapshot::parse(&raw, h.nb_snapshots, cs)?
        } else {
            (Vec::new(), 0)
        };
        let bitmaps = match h.bitmaps {
            Some(b) => {
                // Bounded by the header checks (64 MiB); past the end of the file
                // reads as zeroes, as in QEMU.
                let mut raw = vec![0u8; b.directory_size as usize];
                file.read_at(&mut raw, b.directory_offset).map_err(|e| {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    Error::open(
                        errno,
                        format!(
                            "Failed to read bitmap directory: {}",
                            bitmap::strerror(errno)
                        ),
                    )
                })?;
                bitmap::parse(&raw, b.nb_bitmaps, b.directory_offset, cs, h.size)?
            }
            None => Vec::new(),
        };
        // L1 table (<= 32 MiB) and refcount table (<= 8 MiB), capped by the file.
        let read_table = |off: u64, entries: u64, what: &'static str| -> Result<Vec<u64>> {
            let avail = file_len.saturating_sub(off) / 8;
            let mut raw = vec![0u8; (entries.min(avail) * 8) as usize];
            file.read_at(&mut raw, off).map_err(Error::io(what))?;
            let mut v: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            v.resize(entries as usize, 0);
            Ok(v)
        };
        let l1 = read_table(
            h.l1_table_offset,
            u64::from(h.l1_size),
            "Could not read L1 table",
        )?;
        let rt_entries = u64::from(h.refcount_table_clusters) * cs / 8;
        let rtable = read_table(
            h.refcount_table_offset,
            rt_entries,
            "Could not read refcount table",
        )?;
        let virtual_size = h.size;
        let mut info = Info {
            virtual_size,
            cluster_size: cs,
            version: h.version,
            refcount_bits: 1 << h.refcount_order,
            lazy_refcounts: h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
            dirty: h.incompatible & INCOMPAT_DIRTY != 0,
            corrupt: h.incompatible & INCOMPAT_CORRUPT != 0,
            extended_l2: ext_l2,
            compression_type: h.compression,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            data_file: h.data_file.clone(),
            data_file_raw: data_raw,
            crypt_method: h.crypt_method,
            snapshots: snapshots.0.clone(),
            has_bitmaps: h.bitmaps.is_some(),
            bitmaps: bitmaps.clone(),
            feature_table: h.feature_table.clone(),
            incompatible_features: h.incompatible,
            compatible_features: h.compatible,
            autoclear_features: h.autoclear,
        };
        let l2_cache = opts.l2_cache_size.unwrap_or(32 << 20);
        let l2_need = virtual_size
            .div_ceil(cs)
            .saturating_mul(l2_entry_bytes)
            .div_ceil(cs);
        let l2_cap = (l2_cache / cs).min(l2_need).clamp(2, 1 << 16) as usize;
        let rc_cap = (opts.refcount_cache_size.unwrap_or(4 * cs) / cs).clamp(2, 1 << 16) as usize;
        // 4 MiB worth first, growing to 32 MiB worth while allocations go on (never
        // past 1 024 clusters: small-cluster images keep QEMU's refcount block
        // layout); a batch given by the caller stays as it is.
        let (batch, batch_max) = match opts.alloc_batch {
            Some(b) => (b, b),
            None => (
                ((4u64 << 20) / cs).clamp(16, 1024) as usize,
                ((32u64 << 20) / cs).clamp(16, 1024) as usize,
            ),
        };
        let dead = Arc::new(AtomicBool::new(false));
        let mut meta = Meta::new(MetaInit {
            file: file.clone(),
            geo,
            writable: opts.writable,
            dead: dead.clone(),
            incompat: h.incompatible,
            size: virtual_size,
            l1,
            l1_offset: h.l1_table_offset,
            l2_cap,
            rc: refcount::Refcounts::new(
                rtable,
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters),
                rc_cap,
            ),
            batch,
            batch_max,
            overlap_mode: opts.overlap_check,
            pass_discard: opts.pass_discard,
        });
        meta.add_section(0, cs, Section::Header);
        meta.add_section(
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            Section::ActiveL1,
        );
        meta.add_section(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
            Section::RefcountTable,
        );
        meta.add_section(h.snapshots_offset, snapshots.1, Section::SnapshotTable);
        meta.snapshots = snapshots.0.clone();
        meta.snap_table = (h.snapshots_offset, snapshots.1);
        for s in &snapshots.0 {
            meta.add_section(
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
                Section::InactiveL1,
            );
        }
        if let Some(b) = h.bitmaps {
            meta.add_section(
                b.directory_offset,
                b.directory_size,
                Section::BitmapDirectory,
            );
        }
        if opts.overlap_check != OverlapCheck::None {
            meta.register_l2_tables();
            meta.register_refblocks();
        }
        // Every bitmap is loaded, read-only opens included (for their counts), as
        // qcow2_load_dirty_bitmaps: a failure fails the open, before anything is
        // written. A later entry named as an earlier one is skipped when in use,
        // refused otherwise (bdrv_create_dirty_bitmap).
        let mut live: Vec<bitmap::Loaded> = Vec::with_capacity(bitmaps.len());
        let mut budget = bitmap::load_budget();
        for b in &bitmaps {
            if live.iter().any(|l| l.info.name == b.name) {
                if b.in_use() {
                    continue;
                }
                return Err(Error::open(
                    libc::EINVAL,
                    format!("Bitmap already exists: {}", b.name),
                ));
            }
            live.push(bitmap::Loaded::load(
                &*file,
                b,
                virtual_size,
                cs,
                &mut budget,
            )?);
        }
        if opts.writable && h.incompatible & INCOMPAT_DIRTY != 0 {
            // QEMU repairs the refcounts of a dirty image on a writable open.
            repair::rebuild(
                &mut meta,
                &repair::Extra {
                    snapshots: &snapshots.0,
                    snapshot_table: (h.snapshots_offset, snapshots.1),
                    bitmaps: &bitmaps,
                    bitmap_dir: h.bitmaps.map(|b| (b.directory_offset, b.directory_size)),
                    external_data: has_df,
                },
            )?;
            info.dirty = false;
            info.incompatible_features &= !INCOMPAT_DIRTY;
        }
        if opts.writable {
            // Unknown autoclear bits are cleared, as QEMU does: their meaning is gone
            // once this engine writes.
            let known = h.autoclear & header::AUTOCLEAR_MASK;
            if known != h.autoclear {
                file.write_at(&known.to_be_bytes(), header::OFF_AUTOCLEAR)
                    .map_err(Error::io("Could not update qcow2 header"))?;
            }
            // Every bitmap loaded (not already in use) is marked in use on disk while
            // open, as qcow2_load_dirty_bitmaps does; enabled ones record every
            // write; close stores them all and clears the flags.
            let mut any = false;
            for l in live.iter_mut().filter(|l| !l.inconsistent) {
                let flags = l.info.flags | bitmap::FLAG_IN_USE;
                file.write_at(&flags.to_be_bytes(), l.info.flags_offset)
                    .map_err(|e| {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        Error::open(
                            errno,
                            format!("Can't update bitmap directory: {}", bitmap::strerror(errno)),
                        )
                    })?;
                l.marked = true;
                any = true;
            }
            if any || known != h.autoclear {
                file.flush()
                    .map_err(Error::io("Could not update qcow2 header"))?;
            }
        }
        let dir = stored::StoredDir {
            entries: bitmaps
                .iter()
                .map(|b| {
                    let mut b = b.clone();
                    if opts.writable && !b.in_use() {
                        b.flags |= bitmap::FLAG_IN_USE;
                    }
                    b
                })
                .collect(),
            ext: h.bitmaps,
        };
        let has_live = opts.writable && live.iter().any(|l| l.recording());
        let backing_pair = match opts.backing {
            Some(b) => {
                let len = b
                    .len()
                    .map_err(Error::io("reading the backing node's length"))?;
                Some((b, len))
            }
            None => None,
        };
        Ok(Qcow2 {
            live: Mutex::new(live),
            has_live,
            dir: Mutex::new(dir),
            backing_names: Mutex::new((h.backing_file.clone(), h.backing_format.clone())),
            file,
            data,
            backing: RwLock::new(backing_pair),
            geo,
            writable: opts.writable,
            external_data: has_df,
            data_raw,
            discard_no_unref: opts.discard_no_unref,
            info,
            size: AtomicU64::new(virtual_size),
            dead,
            closed: AtomicBool::new(false),
            meta: Mutex::new(meta),
            alloc_done: Condvar::new(),
            gate: RwLock::new(()),
            pins: Mutex::new(0),
            unpinned: Condvar::new(),
        })
    }

    /// Replaces the backing node at run time (`blockdev-snapshot` giving an overlay
    /// its backing, jobs re-pointing it; `None` for `backing: null`). The header's
    /// backing file name is not changed. Requests already reading the old node finish
    /// on it.
    pub fn set_backing(&self, backing: Option<Arc<dyn Backing>>) -> Result<()> {
        let pair = match backing {
            Some(b) => {
                let len = b
                    .len()
                    .map_err(Error::io("reading the backing node's length"))?;
                Some((b, len))
            }
            None => None,
        };
        *self.backing.write().unwrap_or_else(lock_err) = pair;
        Ok(())
    }

    /// Rewrites the header's backing file name and format (`change-backing-file`,
    /// stream/commit completion): the header cluster is rebuilt with every other
    /// extension kept byte for byte, written in one pwrite, flushed. QEMU's limits:
    /// a name of at most 1023 bytes, a format of at most 15.
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        let name = name.filter(|n| !n.is_empty());
        if name.is_some_and(|n| n.len() > 1023) {
            return Err(Error::Invalid("Backing file name too long".into()));
        }
        if format.is_some_and(|f| f.len() >= 16) {
            return Err(Error::Invalid("Backing file format too long".into()));
        }
        let (_gate, _m) = self.quiesce()?;
        self.write_header_exts(Some((name, format)), None)?;
        *self.backing_names.lock().unwrap_or_else(lock_err) = (
            name.map(str::to_string),
            format.filter(|_| name.is_some()).map(str::to_string),
        );
        Ok(())
    }

    /// Rebuilds the header cluster with a new backing name and format (`backing`)
    /// and/or a new bitmaps extension (`bitmaps`; `Some(None)` drops it and clears
    /// the autoclear bit), every other extension kept byte for byte; written in one
    /// pwrite, flushed. The caller holds the engine quiesced.
    pub(crate) fn write_header_exts(
        &self,
        backing: Option<(Option<&str>, Option<&str>)>,
        bitmaps: Option<Option<header::BitmapsExt>>,
    ) -> Result<()> {
        let cs = self.geo.cs;
        let mut old = vec![0u8; cs as usize];
        self.file
            .read_at(&mut old, 0)
            .map_err(Error::io("reading the header"))?;
        let be32 =
            |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]));
        let be64 =
            |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        let header_len = if self.geo.version == 2 {
            72
        } else {
            be32(&old, 100) as usize
        };
        let old_backing_off = be64(&old, 8);
        let ext_end = if old_backing_off != 0 {
            old_backing_off as usize
        } else {
            cs as usize
        };
        // The name stays unless a new one is given.
        let old_name = (old_backing_off != 0)
            .then(|| {
                let len = be32(&old, 16) as usize;
                old.get(old_backing_off as usize..old_backing_off as usize + len)
                    .map(<[u8]>::to_vec)
            })
            .flatten();
        let name: Option<Vec<u8>> = match backing {
            Some((n, _)) => n.map(|n| n.as_bytes().to_vec()),
            None => old_name,
        };
        // The extensions as they are (validated at open), minus the replaced ones.
        let mut exts: Vec<u8> = Vec::new();
        if let Some((n, Some(f))) = backing
            && n.is_some()
        {
            exts.extend_from_slice(&header::EXT_BACKING_FORMAT.to_be_bytes());
            exts.extend_from_slice(&(f.len() as u32).to_be_bytes());
            exts.extend_from_slice(f.as_bytes());
            exts.resize(exts.len().div_ceil(8) * 8, 0);
        }
        let mut off = header_len;
        while off + 8 <= ext_end {
            let magic = be32(&old, off);
            let len = be32(&old, off + 4) as usize;
            if magic == header::EXT_END {
                break;
            }
            let padded = len.div_ceil(8) * 8;
            let Some(raw) = old.get(off..off + 8 + padded) else {
                break;
            };
            let replaced = (magic == header::EXT_BACKING_FORMAT && backing.is_some())
                || (magic == header::EXT_BITMAPS && bitmaps.is_some());
            if !replaced {
                exts.extend_from_slice(raw);
            }
            off += 8 + padded;
        }
        if let Some(Some(b)) = bitmaps {
            exts.extend_from_slice(&header::EXT_BITMAPS.to_be_bytes());
            exts.extend_from_slice(&24u32.to_be_bytes());
            exts.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
            exts.extend_from_slice(&0u32.to_be_bytes());
            exts.extend_from_slice(&b.directory_size.to_be_bytes());
            exts.extend_from_slice(&b.directory_offset.to_be_bytes());
        }
        exts.extend_from_slice(&[0u8; 8]); // end of extensions
        let mut new = vec![0u8; cs as usize];
        new[..header_len].copy_from_slice(&old[..header_len]);
        if let Some(b) = bitmaps
            && self.geo.version >= 3
        {
            let mut autoclear = be64(&old, header::OFF_AUTOCLEAR as usize);
            if b.is_some() {
                autoclear |= header::AUTOCLEAR_BITMAPS;
            } else {
                autoclear &= !header::AUTOCLEAR_BITMAPS;
            }
            let at = header::OFF_AUTOCLEAR as usize;
            new[at..at + 8].copy_from_slice(&autoclear.to_be_bytes());
        }
        let ext_at = header_len;
        let name_at = ext_at + exts.len();
        let end = name_at + name.as_ref().map_or(0, Vec::len);
        if end > cs as usize {
            return Err(Error::TooLarge("qcow2 header exceeds cluster size".into()));
        }
        new[ext_at..name_at].copy_from_slice(&exts);
        match &name {
            Some(n) => {
                new[name_at..end].copy_from_slice(n);
                new[8..16].copy_from_slice(&(name_at as u64).to_be_bytes());
                new[16..20].copy_from_slice(&(n.len() as u32).to_be_bytes());
            }
            None => {
                new[8..16].fill(0);
                new[16..20].fill(0);
            }
        }
        self.file
            .write_at(&new[..end.max(name_at)], 0)
            .map_err(Error::io("updating the header"))?;
        self.file.flush().map_err(Error::io("flushing"))
    }

    /// Re-reads the backing node's length (after it was resized).
    pub fn refresh_backing_len(&self) -> Result<()> {
        let mut g = self.backing.write().unwrap_or_else(lock_err);
        if let Some((b, len)) = g.as_mut() {
            *len = b
                .len()
                .map_err(Error::io("reading the backing node's length"))?;
        }
        Ok(())
    }

    fn backing_node(&self) -> Option<(Arc<dyn Backing>, u64)> {
        self.backing
            .read()
            .unwrap_or_else(lock_err)
            .as_ref()
            .map(|(b, l)| (b.clone(), *l))
    }

    fn no_backing(&self) -> bool {
        self.backing.read().unwrap_or_else(lock_err).is_none()
    }

    /// The image's description (sizes as of open, except `virtual_size`).
    pub fn info(&self) -> Info {
        let mut i = self.info.clone();
        i.virtual_size = self.size();
        if self.dead.load(Ordering::SeqCst) {
            i.corrupt = true;
        }
        i.snapshots = self.meta.lock().unwrap_or_else(lock_err).snapshots.clone();
        let names = self.backing_names.lock().unwrap_or_else(lock_err).clone();
        (i.backing_file, i.backing_format) = names;
        let dir = self.dir.lock().unwrap_or_else(lock_err);
        i.bitmaps = dir.entries.clone();
        i.has_bitmaps = dir.ext.is_some();
        i
    }

    /// Marks a guest range dirty in every tracked bitmap.
    fn mark_dirty(&self, off: u64, len: u64) {
        if self.has_live {
            let cs = self.geo.cs;
            for l in self.live.lock().unwrap_or_else(lock_err).iter_mut() {
                if l.recording() {
                    l.set(off, len, cs);
                }
            }
        }
    }

    /// The persistent bitmaps loaded at open, in directory order (qsd lists them in
    /// reverse), as `query-named-block-nodes` shows them in `dirty-bitmaps`.
    pub fn bitmap_status(&self) -> Vec<BitmapStatus> {
        let cs = self.geo.cs;
        self.live
            .lock()
            .unwrap_or_else(lock_err)
            .iter()
            .map(|l| l.status(cs))
            .collect()
    }

    /// Stores the bitmaps this open marked in use and clears their flags (clean
    /// close). Chunks set since open are written (in place when the old cluster is
    /// the bitmap's alone, else to a new cluster), then the table, a flush, then the
    /// flags: a crash before leaves them in use, hence inconsistent, never stale.
    fn store_loaded_bitmaps(&self, m: &mut Meta) -> Result<()> {
        let cs = self.geo.cs;
        let mut live = self.live.lock().unwrap_or_else(lock_err);
        let mut to_free = Vec::new();
        let mut any = false;
        // Data clusters referenced by more than one table entry (hostile images) are
        // never written in place.
        let mut refs: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        for l in live.iter() {
            for e in &l.table {
                let off = e & bitmap::ENTRY_OFFSET_MASK;
                if off != 0 {
                    *refs.entry(off).or_default() += 1;
                }
            }
        }
        for l in live.iter_mut().filter(|l| l.marked) {
            any = true;
            let mut table = l.table.clone();
            for (i, chunk) in l.chunks.iter().enumerate() {
                if !l.changed.get(i).copied().unwrap_or(false) {
                    continue;
                }
                let bitmap::Chunk::Data(bits) = chunk else {
                    continue;
                };
                let Some(e) = table.get_mut(i) else {
                    continue;
                };
                let old = *e & bitmap::ENTRY_OFFSET_MASK;
                let rc = if old != 0 {
                    m.refcount(old / cs).unwrap_or(0)
                } else {
                    0
                };
                let host = if rc == 1 && refs.get(&old) == Some(&1) {
                    old
                } else {
                    // Only a reference the refcount accounts for is dropped (a
                    // hostile miscount leaks rather than frees a cluster in use).
                    if rc >= 2 {
                        to_free.push(old / cs);
                    }
                    m.alloc_cluster()?
                };
                m.check_overlap(host, cs)?;
                self.file
                    .write_at(bits, host)
                    .map_err(Error::io("writing a bitmap"))?;
                *e = host;
            }
            if table != l.table {
                let mut raw = Vec::with_capacity(table.len() * 8);
                for e in &table {
                    raw.extend_from_slice(&e.to_be_bytes());
                }
                m.check_overlap(l.info.table_offset, raw.len() as u64)?;
                self.file
                    .write_at(&raw, l.info.table_offset)
                    .map_err(Error::io("writing a bitmap table"))?;
                l.table = table;
            }
            l.changed.iter_mut().for_each(|c| *c = false);
        }
        if !any {
            return Ok(());
        }
        m.flush_refcounts()?;
        self.file.flush().map_err(Error::io("flushing"))?;
        let mut dir = self.dir.lock().unwrap_or_else(lock_err);
        for l in live.iter_mut().filter(|l| l.marked) {
            let f = l.info.flags & !bitmap::FLAG_IN_USE;
            self.file
                .write_at(&f.to_be_bytes(), l.info.flags_offset)
                .map_err(Error::io("updating the bitmap directory"))?;
            l.marked = false;
            if let Some(b) = dir
                .entries
                .iter_mut()
                .find(|b| b.flags_offset == l.info.flags_offset)
            {
                b.flags = f;
            }
        }
        self.file.flush().map_err(Error::io("flushing"))?;
        for c in to_free {
            m.decref(c)?;
        }
        Ok(())
    }

    /// The current virtual size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Meta>> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(Error::Dead);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(self.meta.lock().unwrap_or_else(lock_err))
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        let size = self.size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset: off,
                len,
                size,
            }),
        }
    }

    /// The host cluster of a plain (not compressed) entry. Offset 0 means unallocated,
    /// except with an external data file, where COPIED marks offset 0 as allocated.
    fn host_of(&self, e: Entry) -> Option<u64> {
        if e.l2 & OFLAG_COMPRESSED != 0 {
            return None;
        }
        let off = e.l2 & L2E_OFFSET_MASK;
        (off != 0 || (self.external_data && e.l2 & OFLAG_COPIED != 0)).then_some(off)
    }

    /// Classifies subcluster `sc` of `gc`'s entry; corrupt entries are reported.
    fn sub_kind(&self, m: &mut Meta, gc: u64, e: Entry, sc: u64) -> Result<Sub> {
        let geo = &self.geo;
        if e.l2 & OFLAG_COMPRESSED != 0 {
            if self.external_data {
                let msg = format!(
                    "Compressed cluster in an image with a data file (guest cluster {})",
                    crate::error::hx(gc)
                );
                return Err(m.corrupt(msg, None, None));
            }
            return Ok(Sub::Compressed);
        }
        let off = e.l2 & L2E_OFFSET_MASK;
        if !off.is_multiple_of(geo.cs) {
            let (l2off, _) = m.l2_offset(gc)?;
            let msg = format!(
                "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
                crate::error::hx(off),
                crate::error::hx(l2off),
                crate::error::hx(gc & (geo.l2_entries - 1))
            );
            return Err(m.corrupt(msg, Some(off), Some(geo.cs)));
        }
        if !geo.ext_l2 {
            if e.l2 & OFLAG_ZERO != 0 {
                if geo.version < 3 {
                    let (l2off, _) = m.l2_offset(gc)?;
                    let msg = format!(
                        "Zero cluster entry found in pre-v3 image (L2 offset: {}, L2 index: {})",
                        crate::error::hx(l2off),
                        crate::error::hx(gc & (geo.l2_entries - 1))
                    );
                    return Err(m.corrupt(msg, None, None));
                }
                return Ok(Sub::Zero);
            }
            return Ok(match self.host_of(e) {
                Some(h) => Sub::Data(h),
                None => Sub::Unalloc,
            });
        }
        let alloc = e.bitmap >> sc & 1 != 0;
        let zero = e.bitmap >> (32 + sc) & 1 != 0;
        match (alloc, zero) {
            (true, true) | (true, false) if zero || self.host_of(e).is_none() => {
                let (l2off, _) = m.l2_offset(gc)?;
                let msg = format!(
                    "Invalid cluster entry found (L2 offset: {}, L2 index: {})",
                    crate::error::hx(l2off),
                    crate::error::hx(gc & (geo.l2_entries - 1))
                );
                Err(m.corrupt(msg, None, None))
            }
            (true, _) => Ok(Sub::Data(off + sc * geo.scs)),
            (false, true) => Ok(Sub::Zero),
            (false, false) => Ok(Sub::Unalloc),
        }
    }

    fn read_backing(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let Some((b, blen)) = self.backing_node() else {
            buf.fill(0);
            return Ok(());
        };
        let n = blen.saturating_sub(off).min(buf.len() as u64) as usize;
        if n > 0 {
            b.read_at(&mut buf[..n], off)
                .map_err(Error::io("reading the backing node"))?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    fn read_compressed(&self, m: Option<&mut Meta>, l2: u64, out: &mut [u8]) -> Result<()> {
        let (coff, csize) = self.geo.compressed_span(l2);
        let mut src = vec![0u8; csize as usize];
        self.file
            .read_at(&mut src, coff)
            .map_err(Error::io("reading a compressed cluster"))?;
        if compress::decompress(self.info.compression_type, &src, out).is_err() {
            let msg = format!(
                "Compressed cluster at {} does not decompress to one cluster",
                crate::error::hx(coff)
            );
            return Err(match m {
                Some(m) => m.corrupt(msg, Some(coff), Some(csize)),
                None => self.lock()?.corrupt(msg, Some(coff), Some(csize)),
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`. An allocated run costs one cached lookup
    /// per cluster under the metadata lock and one pread without it.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let geo = self.geo;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let gc = pos >> geo.cluster_bits;
            let remaining = (buf.len() - done) as u64;
            let within = pos & (geo.cs - 1);
            let n_clusters = (within + remaining).div_ceil(geo.cs);
            let _gate = self.gate.read().unwrap_or_else(lock_err);
            let mut m = self.lock()?;
            let e0 = m.entry(gc)?;
            // The run: from pos, while the kind stays the same (and data contiguous).
            let sc = within / geo.scs;
            let first = self.sub_kind(&mut m, gc, e0, sc)?;
            let mut run = (geo.scs - (within & (geo.scs - 1))).min(remaining);
            if first != Sub::Compressed {
                let mut next_host = match first {
                    Sub::Data(h) => h + geo.scs,
                    _ => 0,
                };
                let mut c = 0u64;
                let mut s = sc + 1;
                let mut e = e0;
                while run < remaining {
                    if s == geo.sc_per_cluster {
                        c += 1;
                        s = 0;
                        if c >= n_clusters {
                            break;
                        }
                        e = m.entry(gc + c)?;
                    }
                    let k = self.sub_kind(&mut m, gc + c, e, s)?;
                    let same = match (first, k) {
                        (Sub::Data(_), Sub::Data(h)) => h == next_host,
                        (a, b) => a == b,
                    };
                    if !same {
                        break;
                    }
                    next_host += geo.scs;
                    run = (run + geo.scs).min(remaining);
                    s += 1;
                }
            }
            drop(m);
            let out = &mut buf[done..done + run as usize];
            match first {
                Sub::Data(h) => {
                    let host = h + (within & (geo.scs - 1));
                    self.data
                        .read_at(out, host)
                        .map_err(Error::io("reading image data"))?;
                }
                Sub::Zero => out.fill(0),
                Sub::Unalloc => self.read_backing(out, pos)?,
                Sub::Compressed => {
                    let mut tmp = vec![0u8; geo.cs as usize];
                    self.read_compressed(None, e0.l2, &mut tmp)?;
                    let w = within as usize;
                    out.copy_from_slice(&tmp[w..w + run as usize]);
                }
            }
            done += run as usize;
        }
        Ok(())
    }

    /// Fills `out` with what guest bytes `[gc*cs + from, ..)` of cluster `gc` read as
    /// under entry `e` (for copy-on-write).
    fn fill_view(&self, gc: u64, e: Entry, from: u64, out: &mut [u8]) -> Result<()> {
        let geo = self.geo;
        let mut decompressed: Option<Vec<u8>> = None;
        let mut pos = from;
        let end = from + out.len() as u64;
        while pos < end {
            let sc = pos / geo.scs;
            let sc_end = ((sc + 1) * geo.scs).min(end);
            let part = &mut out[(pos - from) as usize..(sc_end - from) as usize];
            let kind = {
                let mut m = self.meta.lock().unwrap_or_else(lock_err);
                self.sub_kind(&mut m, gc, e, sc)?
            };
            match kind {
                Sub::Data(h) => self
                    .data
                    .read_at(part, h + (pos - sc * geo.scs))
                    .map_err(Error::io("reading for copy-on-write"))?,
                Sub::Zero => part.fill(0),
                Sub::Unalloc => self.read_backing(part, gc * geo.cs + pos)?,
                Sub::Compressed => {
                    if decompressed.is_none() {
                        let mut t = vec![0u8; geo.cs as usize];
                        self.read_compressed(None, e.l2, &mut t)?;
                        decompressed = Some(t);
                    }
                    if let Some(t) = &decompressed {
                        part.copy_from_slice(&t[pos as usize..sc_end as usize]);
                    }
                }
            }
            pos = sc_end;
        }
        Ok(())
    }

    /// Does `[from, to)` of cluster `gc` read as zeroes under `e` without reading data?
    fn view_is_zero(&self, gc: u64, e: Entry, from: u64, to: u64) -> Result<bool> {
        if from >= to {
            return Ok(true);
        }
        let geo = self.geo;
        let backing_len = self.backing_node().map_or(0, |(_, l)| l);
        let mut m = self.meta.lock().unwrap_or_else(lock_err);
        for sc in from / geo.scs..=(to - 1) / geo.scs {
            match self.sub_kind(&mut m, gc, e, sc)? {
                Sub::Zero => {}
                Sub::Unalloc if gc * geo.cs + sc * geo.scs >= backing_len => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Host clusters whose reference `e` holds (to drop when `e` is replaced).
    fn refs_of(&self, e: Entry) -> Vec<u64> {
        let geo = self.geo;
        if e.l2 & OFLAG_COMPRESSED != 0 {
            let (coff, csize) = geo.compressed_span(e.l2);
            let first = coff / geo.cs;
            let last = (coff + csize - 1) / geo.cs;
            return (first..=last).collect();
        }
        match self.host_of(e) {
            Some(off) if !self.external_data => vec![off / geo.cs],
            _ => Vec::new(),
        }
    }

    fn free_clusters(&self, clusters: Vec<u64>) -> Result<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        let _g = self.exclusive();
        let mut m = self.lock()?;
        for c in clusters {
            m.decref(c)?;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        if self.dead.load(Ordering::SeqCst) {
            return Err(Error::Dead);
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua`, durable before returning.
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.mark_dirty(offset, buf.len() as u64);
        let geo = self.geo;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let gc = pos >> geo.cluster_bits;
            let within = pos & (geo.cs - 1);
            let whole = (buf.len() - done) as u64 / geo.cs;
            if within == 0 && whole >= 2 {
                // Up to the end of the L2 table, so that one write links them all.
                let k = whole.min(geo.l2_entries - (gc & (geo.l2_entries - 1)));
                let data = &buf[done..done + (k * geo.cs) as usize];
                let n = self.write_new_run(gc, data)?;
                if n > 0 {
                    done += (n * geo.cs) as usize;
                    continue;
                }
            }
            let n = ((geo.cs - within) as usize).min(buf.len() - done);
            self.write_cluster(gc, within, &buf[done..done + n])?;
            done += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// The gate, exclusively, once no write in place outside the engine runs.
    fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        let gate = self.gate.write().unwrap_or_else(lock_err);
        let mut pins = self.pins.lock().unwrap_or_else(lock_err);
        while *pins > 0 {
            pins = self.unpinned.wait(pins).unwrap_or_else(lock_err);
        }
        gate
    }

    /// Where `len` bytes at guest `offset` can be written in place by the caller, if
    /// that needs no metadata change and no waiting: every cluster of the range
    /// allocated, the image's alone (`COPIED`, its L2 table too), in cached tables,
    /// contiguous in the data file, clear of metadata, and nobody holding the engine's
    /// locks. `None` sends the write through [`Self::write`]. Bitmaps are marked before
    /// the lease is returned. Never blocks, so an async caller may ask on its executor.
    pub fn try_in_place(&self, offset: u64, len: u64) -> Result<Option<InPlace<'_>>> {
        if len == 0
            || !self.writable
            || self.dead.load(Ordering::SeqCst)
            || self.closed.load(Ordering::SeqCst)
            || self.check_range(offset, len).is_err()
        {
            return Ok(None);
        }
        let Ok(_gate) = self.gate.try_read() else {
            return Ok(None);
        };
        let Ok(mut m) = self.meta.try_lock() else {
            return Ok(None);
        };
        let geo = self.geo;
        let first = offset >> geo.cluster_bits;
        let last = (offset + len - 1) >> geo.cluster_bits;
        let mut start = None;
        for gc in first..=last {
            let (_, l1_copied) = m.l2_offset(gc)?;
            let Some(ent) = m.cached_entry(gc)? else {
                return Ok(None);
            };
            let s = if gc == first {
                offset & (geo.cs - 1)
            } else {
                0
            };
            let e = if gc == last {
                ((offset + len - 1) & (geo.cs - 1)) + 1
            } else {
                geo.cs
            };
            if !l1_copied {
                return Ok(None);
            }
            let Some(host) = self.in_place(&mut m, gc, ent, s, e)? else {
                return Ok(None);
            };
            let base = *start.get_or_insert(host);
            if host != base + (gc - first) * geo.cs {
                return Ok(None);
            }
        }
        let Some(base) = start else {
            return Ok(None);
        };
        let host = base + (offset & (geo.cs - 1));
        if !self.external_data && m.overlap_hit(host, len).is_some() {
            // The engine's own write reports the corruption.
            return Ok(None);
        }
        *self.pins.lock().unwrap_or_else(lock_err) += 1;
        drop(m);
        self.mark_dirty(offset, len);
        Ok(Some(InPlace { engine: self, host }))
    }

    /// Host offset for an in-place write of `[s, e)` in cluster `gc`, if no metadata
    /// has to change.
    fn in_place(&self, m: &mut Meta, gc: u64, ent: Entry, s: u64, e: u64) -> Result<Option<u64>> {
        if ent.l2 & OFLAG_COPIED == 0 || ent.l2 & OFLAG_COMPRESSED != 0 {
            return Ok(None);
        }
        let Some(host) = self.host_of(ent) else {
            return Ok(None);
        };
        for sc in s / self.geo.scs..=(e - 1) / self.geo.scs {
            if !matches!(self.sub_kind(m, gc, ent, sc)?, Sub::Data(_)) {
                return Ok(None);
            }
        }
        Ok(Some(host))
    }

    fn write_cluster(&self, gc: u64, s: u64, data: &[u8]) -> Result<()> {
        let geo = self.geo;
        let e = s + data.len() as u64;
        loop {
            {
                let _gate = self.gate.read().unwrap_or_else(lock_err);
                let mut m = self.lock()?;
                let ent = m.entry(gc)?;
                let (_, l1_copied) = m.l2_offset(gc)?;
                if l1_copied && let Some(host) = self.in_place(&mut m, gc, ent, s, e)? {
                    if !self.external_data {
                        m.check_overlap(host + s, data.len() as u64)?;
                    }
                    drop(m);
                    self.data
                        .write_at(data, host + s)
                        .map_err(Error::io("writing image data"))?;
                    return Ok(());
                }
            }
            let mut m = self.lock()?;
            if m.inflight.contains(&gc) {
                let _m = self.alloc_done.wait(m).unwrap_or_else(lock_err);
                continue;
            }
            m.ensure_l2_writable(gc)?;
            let old = m.entry(gc)?;
            // Validate the old entry's subclusters now (reports corruption early).
            for sc in 0..geo.sc_per_cluster {
                self.sub_kind(&mut m, gc, old, sc)?;
            }
            let old_host = self.host_of(old);
            let full_cow = old.l2 & OFLAG_COMPRESSED != 0
                || (old_host.is_some() && old.l2 & OFLAG_COPIED == 0 && !self.external_data);
            let reuse = !full_cow && old_host.is_some();
            let (host, fresh, zeroed) = if let (true, Some(h)) = (reuse, old_host) {
                (h, false, false)
            } else if self.external_data {
                (gc * geo.cs, false, false)
            } else {
                let (h, z) = m.alloc_cluster_z()?;
                (h, true, z)
            };
            if !self.external_data
                && let Err(err) = m.check_overlap(host, geo.cs)
            {
                return Err(err);
            }
            m.inflight.insert(gc);
            drop(m);
            let target = Target {
                host,
                full: full_cow,
                zeroed,
            };
            let res = self.alloc_write(gc, old, target, s, data);
            let mut m = self.meta.lock().unwrap_or_else(lock_err);
            let out = match res {
                Ok(new) => match m.set_entry(gc, new) {
                    Ok(()) => Ok(full_cow),
                    Err(err) => Err(err),
                },
                Err(err) => {
                    if fresh {
                        m.unalloc_cluster(host);
                    }
                    Err(err)
                }
            };
            m.inflight.remove(&gc);
            drop(m);
            self.alloc_done.notify_all();
            return match out {
                Ok(true) => self.free_clusters(self.refs_of(old)),
                Ok(false) => Ok(()),
                Err(err) => Err(err),
            };
        }
    }

    /// Writes whole clusters from `gc` (`data`, within one L2 table) that hold no
    /// data yet (unallocated or zero, nothing to copy or free), as QEMU allocates a
    /// request's clusters together: fresh clusters, the data in one write per
    /// contiguous host run, then the L2 entries in one write. Returns how many leading
    /// clusters it wrote; 0 when fewer than two qualify (the caller goes cluster by
    /// cluster).
    fn write_new_run(&self, gc: u64, data: &[u8]) -> Result<u64> {
        let geo = self.geo;
        if self.external_data {
            return Ok(0);
        }
        let want = data.len() as u64 / geo.cs;
        let mut m = self.lock()?;
        let mut n = 0;
        while n < want {
            let c = gc + n;
            if m.inflight.contains(&c) {
                break;
            }
            let old = m.entry(c)?;
            if old.l2 & OFLAG_COMPRESSED != 0 || self.host_of(old).is_some() {
                break;
            }
            // Validates the entry (reports corruption as the per-cluster path does).
            for sc in 0..geo.sc_per_cluster {
                self.sub_kind(&mut m, c, old, sc)?;
            }
            n += 1;
        }
        if n < 2 {
            return Ok(0);
        }
        m.ensure_l2_writable(gc)?;
        let mut hosts = Vec::with_capacity(n as usize);
        let mut got = Ok(());
        for _ in 0..n {
            match m.alloc_cluster_z() {
                Ok((h, _)) => match m.check_overlap(h, geo.cs) {
                    Ok(()) => hosts.push(h),
                    Err(e) => {
                        got = Err(e);
                        break;
                    }
                },
                Err(e) => {
                    got = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = got {
            for &h in hosts.iter().rev() {
                m.unalloc_cluster(h);
            }
            return Err(e);
        }
        m.inflight.extend(gc..gc + n);
        drop(m);
        let mut written = Ok(());
        let mut i = 0usize;
        while i < hosts.len() && written.is_ok() {
            let mut j = i + 1;
            while j < hosts.len() && hosts[j] == hosts[j - 1] + geo.cs {
                j += 1;
            }
            let from = i * geo.cs as usize;
            let to = j * geo.cs as usize;
            written = self
                .data
                .write_at(&data[from..to], hosts[i])
                .map_err(Error::io("writing image data"));
            i = j;
        }
        let mut m = self.meta.lock().unwrap_or_else(lock_err);
        let linked = match written {
            Ok(()) => {
                let entries: Vec<Entry> = hosts
                    .iter()
                    .map(|&h| Entry {
                        l2: h | OFLAG_COPIED,
                        bitmap: if geo.ext_l2 { ALL_ALLOC } else { 0 },
                    })
                    .collect();
                // A failed link is left as the per-cluster path leaves it: the
                // clusters stay referenced (leaked on disk at worst), never reused.
                m.set_entries(gc, &entries)
            }
            Err(e) => {
                for &h in hosts.iter().rev() {
                    m.unalloc_cluster(h);
                }
                Err(e)
            }
        };
        for c in gc..gc + n {
            m.inflight.remove(&c);
        }
        drop(m);
        self.alloc_done.notify_all();
        linked.map(|()| n)
    }

    /// The data part of an allocating write: copy-on-write around `[s, s+len)` into
    /// `host`, then the entry to link.
    fn alloc_write(&self, gc: u64, old: Entry, t: Target, s: u64, data: &[u8]) -> Result<Entry> {
        let Target { host, full, zeroed } = t;
        let geo = self.geo;
        let e = s + data.len() as u64;
        if full {
            let mut buf = vec![0u8; geo.cs as usize];
            self.fill_view(gc, old, 0, &mut buf[..s as usize])?;
            self.fill_view(gc, old, e, &mut buf[e as usize..])?;
            buf[s as usize..e as usize].copy_from_slice(data);
            self.data
                .write_at(&buf, host)
                .map_err(Error::io("writing image data"))?;
            return Ok(Entry {
                l2: host | OFLAG_COPIED,
                bitmap: if geo.ext_l2 { ALL_ALLOC } else { 0 },
            });
        }
        let first = s / geo.scs;
        let last = (e - 1) / geo.scs;
        let span_s = first * geo.scs;
        let span_e = (last + 1) * geo.scs;
        // A fresh cluster that reads as zeroes needs no copy-on-write of zeroes.
        let skip_cow = zeroed
            && self.view_is_zero(gc, old, span_s, s)?
            && self.view_is_zero(gc, old, e, span_e)?;
        if (span_s == s && span_e == e) || skip_cow {
            self.data
                .write_at(data, host + s)
                .map_err(Error::io("writing image data"))?;
        } else {
            let mut buf = vec![0u8; (span_e - span_s) as usize];
            let (head, rest) = buf.split_at_mut((s - span_s) as usize);
            self.fill_view(gc, old, span_s, head)?;
            let (mid, tail) = rest.split_at_mut(data.len());
            mid.copy_from_slice(data);
            self.fill_view(gc, old, e, tail)?;
            self.data
                .write_at(&buf, host + span_s)
                .map_err(Error::io("writing image data"))?;
        }
        Ok(if geo.ext_l2 {
            let bits = (ALL_ALLOC >> (31 - (last - first))) << first;
            Entry {
                l2: host | OFLAG_COPIED,
                bitmap: (old.bitmap | bits) & !(bits << 32),
            }
        } else {
            Entry {
                l2: host | OFLAG_COPIED,
                bitmap: 0,
            }
        })
    }

    /// Writes one compressed cluster (`buf` is exactly one cluster, `offset` aligned).
    /// The guest cluster must be unallocated, as QEMU requires. Data that does not
    /// compress is written as a normal cluster.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let geo = self.geo;
        if buf.len() as u64 != geo.cs || !offset.is_multiple_of(geo.cs) {
            return Err(Error::Invalid(
                "compressed writes must be one aligned cluster".into(),
            ));
        }
        if self.external_data {
            return Err(Error::Unsupported(
                "Compression is not supported with an external data file".into(),
            ));
        }
        self.check_range(offset, 1)?;
        self.mark_dirty(offset, geo.cs);
        let Some(c) = compress::compress(self.info.compression_type, buf, geo.cs as usize) else {
            return self.write(buf, offset, false);
        };
        let gc = offset >> geo.cluster_bits;
        loop {
            let mut m = self.lock()?;
            if m.inflight.contains(&gc) {
                let _m = self.alloc_done.wait(m).unwrap_or_else(lock_err);
                continue;
            }
            m.ensure_l2_writable(gc)?;
            let old = m.entry(gc)?;
            if old.l2 & (L2E_OFFSET_MASK | OFLAG_COMPRESSED) != 0 {
                return Err(Error::Invalid(
                    "compressed write to an allocated cluster".into(),
                ));
            }
            // Pack into the cluster the last compressed write started, as QEMU does,
            // while it has room and its refcount can take one more reference.
            let n = c.len() as u64;
            let max_rc = if geo.rc_order == 6 {
                u64::MAX
            } else {
                (1u64 << (1u32 << geo.rc_order)) - 1
            };
            let tail = m.ctail;
            let packed = match tail {
                Some((h, used)) if used + n <= geo.cs && m.refcount(h / geo.cs)? < max_rc => {
                    // The extra reference is durable before any L2 entry uses it.
                    m.add_refcount_pub(h / geo.cs, 1)?;
                    m.flush_refcounts()?;
                    Some(h + used)
                }
                _ => None,
            };
            let coff = match packed {
                Some(o) => o,
                None => m.alloc_cluster()?,
            };
            let start = coff - coff % geo.cs;
            m.ctail = Some((start, coff - start + n));
            m.check_overlap(coff, n)?;
            if coff > geo.coff_mask {
                return Err(Error::TooLarge(
                    "compressed cluster offset too large".into(),
                ));
            }
            m.inflight.insert(gc);
            drop(m);
            let res = self
                .file
                .write_at(&c, coff)
                .map_err(Error::io("writing a compressed cluster"));
            let mut m = self.meta.lock().unwrap_or_else(lock_err);
            // Additional 512-byte sectors the data reaches into, after the first.
            let nb = ((coff + n - 1) >> 9) - (coff >> 9);
            let out = res.and_then(|()| {
                m.set_entry(
                    gc,
                    Entry {
                        l2: coff | OFLAG_COMPRESSED | (nb << geo.csize_shift),
                        bitmap: 0,
                    },
                )
            });
            if out.is_err() {
                m.ctail = None;
                match packed {
                    Some(_) => {
                        let _ = m.decref(start / geo.cs);
                    }
                    None => m.unalloc_cluster(coff),
                }
            }
            m.inflight.remove(&gc);
            drop(m);
            self.alloc_done.notify_all();
            return out;
        }
    }

    /// Zeroes `[offset, offset+len)`. Whole clusters get the zero flag (v3) and, with
    /// `may_unmap`, lose their allocation; partial clusters are written with zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.mark_dirty(offset, len);
        self.zero_range(offset, len, Mode::Zero { may_unmap })
    }

    /// Discards whole clusters in the range (partial clusters are ignored, as QEMU's
    /// discard granularity is one cluster).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let cs = self.geo.cs;
        let start = offset.div_ceil(cs) * cs;
        let mut end = (offset + len) / cs * cs;
        // The partial cluster at the end of an unaligned image counts as whole.
        if offset + len == self.size() {
            end = offset + len;
        }
        if end <= start {
            return Ok(());
        }
        self.mark_dirty(start, end - start);
        self.zero_range(start, end - start, Mode::Discard)
    }

    fn zero_range(&self, offset: u64, len: u64, mode: Mode) -> Result<()> {
        let geo = self.geo;
        let size = self.size();
        let mut pos = offset;
        let end = offset + len;
        let zeroes = vec![0u8; geo.cs.min(len) as usize];
        while pos < end {
            let gc = pos >> geo.cluster_bits;
            let within = pos & (geo.cs - 1);
            let n = (geo.cs - within).min(end - pos);
            let whole = within == 0 && (n == geo.cs || pos + n == size);
            if whole
                && mode == Mode::Discard
                && self.no_backing()
                && self.lock()?.l2_offset(gc)?.0 == 0
            {
                // No L2 table and no backing: the whole table's range reads as zeroes.
                let next = ((gc >> geo.l2_bits) + 1).saturating_mul(geo.cs << geo.l2_bits);
                pos = next.min(end);
                continue;
            }
            // v2 has no zero flag: without a backing file QEMU zeroes by deallocating.
            let meta_ok = geo.version >= 3 || self.no_backing();
            let sc_aligned =
                within.is_multiple_of(geo.scs) && (n.is_multiple_of(geo.scs) || pos + n == size);
            if whole && (meta_ok || mode == Mode::Discard) {
                self.zero_cluster(gc, mode)?;
            } else if geo.ext_l2
                && matches!(mode, Mode::Zero { .. })
                && sc_aligned
                && self.zero_subclusters(gc, within / geo.scs, (within + n - 1) / geo.scs)?
            {
                // Zero flags on the subclusters (QEMU's zero_l2_subclusters).
            } else if matches!(mode, Mode::Zero { .. }) {
                let zero_already = self.reads_zero(gc)?;
                if zero_already && geo.version >= 3 {
                    // QEMU widens a zero-write to the whole cluster when the rest
                    // already reads as zeroes.
                    self.zero_cluster(gc, Mode::Zero { may_unmap: false })?;
                } else if zero_already && self.no_backing() {
                    // v2: unallocated already, which reads as zeroes.
                } else {
                    self.write_cluster(gc, within, &zeroes[..n as usize])?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Sets the zero bits of subclusters `first..=last` of `gc` (extended L2); false
    /// when the cluster is compressed (the caller writes zeroes instead).
    fn zero_subclusters(&self, gc: u64, first: u64, last: u64) -> Result<bool> {
        let mut m = loop {
            let m = self.lock()?;
            if m.inflight.contains(&gc) {
                drop(self.alloc_done.wait(m).unwrap_or_else(lock_err));
                continue;
            }
            break m;
        };
        let old = m.entry(gc)?;
        if old.l2 & OFLAG_COMPRESSED != 0 {
            return Ok(false);
        }
        for sc in 0..self.geo.sc_per_cluster {
            self.sub_kind(&mut m, gc, old, sc)?;
        }
        let bits = (ALL_ALLOC >> (31 - (last - first))) << first;
        let new = Entry {
            l2: old.l2,
            bitmap: (old.bitmap | (bits << 32)) & !bits,
        };
        if new != old {
            m.ensure_l2_writable(gc)?;
            m.set_entry(gc, new)?;
        }
        Ok(true)
    }

    /// Does the whole cluster read as zeroes without looking at data?
    fn reads_zero(&self, gc: u64) -> Result<bool> {
        let mut m = self.lock()?;
        let e = m.entry(gc)?;
        for sc in 0..self.geo.sc_per_cluster {
            match self.sub_kind(&mut m, gc, e, sc)? {
                Sub::Zero => {}
                Sub::Unalloc if self.no_backing() => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    fn zero_cluster(&self, gc: u64, mode: Mode) -> Result<()> {
        let geo = self.geo;
        let mut m = loop {
            let m = self.lock()?;
            if m.inflight.contains(&gc) {
                drop(self.alloc_done.wait(m).unwrap_or_else(lock_err));
                continue;
            }
            break m;
        };
        let old = m.entry(gc)?;
        let (l2off, _) = m.l2_offset(gc)?;
        if l2off == 0 && self.no_backing() && geo.version < 3 {
            return Ok(());
        }
        if old == Entry::default() && self.no_backing() && mode == Mode::Discard {
            // Unallocated without a backing node already reads as zeroes.
            return Ok(());
        }
        if l2off == 0 && mode == Mode::Discard && self.no_backing() {
            return Ok(());
        }
        let old_host = self.host_of(old).unwrap_or(0);
        let plain = self.host_of(old).is_some();
        let keep = geo.version >= 3
            && plain
            && (old.l2 & OFLAG_COPIED != 0 || self.external_data)
            && match mode {
                Mode::Zero { may_unmap } => !may_unmap || self.external_data,
                Mode::Discard => self.discard_no_unref || self.external_data,
            };
        let new = if geo.version < 3 {
            // v2 has no zero flag: discarding falls back to the backing file (QEMU too).
            Entry::default()
        } else if keep {
            if geo.ext_l2 {
                Entry {
                    l2: old_host | OFLAG_COPIED,
                    bitmap: ALL_ALLOC << 32,
                }
            } else {
                Entry {
                    l2: old_host | OFLAG_COPIED | OFLAG_ZERO,
                    bitmap: 0,
                }
            }
        } else if mode == Mode::Discard && self.no_backing() && old == Entry::default() {
            return Ok(());
        } else if geo.ext_l2 {
            Entry {
                l2: 0,
                bitmap: ALL_ALLOC << 32,
            }
        } else {
            Entry {
                l2: OFLAG_ZERO,
                bitmap: 0,
            }
        };
        if new == old {
            return Ok(());
        }
        m.ensure_l2_writable(gc)?;
        m.set_entry(gc, new)?;
        drop(m);
        if keep && self.data_raw {
            // The raw data file must read what the image reads.
            let zeroes = vec![0u8; geo.cs as usize];
            let n = geo.cs.min(self.size() - gc * geo.cs) as usize;
            self.data
                .write_at(&zeroes[..n], old_host)
                .map_err(Error::io("writing zeroes to the data file"))?;
        }
        if keep {
            Ok(())
        } else {
            self.free_clusters(self.refs_of(old))
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        if self.external_data {
            self.data
                .flush()
                .map_err(Error::io("flushing the data file"))?;
        }
        self.file.flush().map_err(Error::io("flushing the image"))
    }

    /// How `[offset, offset + max_len)` starts: one extent of uniform status.
    pub fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.size();
        if offset >= size {
            return Err(Error::OutOfRange {
                offset,
                len: max_len,
                size,
            });
        }
        let geo = self.geo;
        let max_len = max_len.min(size - offset);
        let mut m = self.lock()?;
        let mut entries = Vec::new();
        let gc = offset >> geo.cluster_bits;
        let within = offset & (geo.cs - 1);
        m.entries(gc, (within + max_len).div_ceil(geo.cs), &mut entries)?;
        let class = |k: Sub| match k {
            Sub::Data(_) => (true, false, true),
            Sub::Compressed => (true, false, true),
            Sub::Zero => (false, true, true),
            Sub::Unalloc => (false, false, false),
        };
        let sc0 = within / geo.scs;
        let k0 = self.sub_kind(&mut m, gc, entries[0], sc0)?;
        let c0 = class(k0);
        let host_offset = match k0 {
            Sub::Data(h) => Some(h + (within & (geo.scs - 1))),
            _ => None,
        };
        let mut len = (geo.scs - (within & (geo.scs - 1))).min(max_len);
        let mut c = 0usize;
        let mut s = sc0 + 1;
        let mut next_host = host_offset.map(|h| h + len);
        while len < max_len {
            if s == geo.sc_per_cluster {
                c += 1;
                s = 0;
                if c >= entries.len() {
                    break;
                }
            }
            let k = self.sub_kind(&mut m, gc + c as u64, entries[c], s)?;
            if class(k) != c0 {
                break;
            }
            if let Some(nh) = next_host {
                match k {
                    Sub::Data(h) if h == nh => next_host = Some(nh + geo.scs),
                    _ => break,
                }
            }
            len = (len + geo.scs).min(max_len);
            s += 1;
        }
        Ok(Extent {
            offset,
            len,
            data: c0.0,
            zero: c0.1,
            allocated: c0.2,
            host_offset,
        })
    }

    /// Changes the virtual size, as QEMU's `qcow2_co_truncate` (no preallocation).
    /// Growing may grow the active L1 table (placed as QEMU places it); shrinking frees
    /// the clusters past the end. Internal snapshots are kept as they are (their table
    /// entries, disk sizes and L1 tables untouched); a v2 image with snapshots is
    /// refused, as QEMU refuses it (v2 did not require the snapshot's disk size).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if !new_size.is_multiple_of(512) {
            return Err(Error::Invalid(
                "The new size must be a multiple of 512".into(),
            ));
        }
        if self.geo.version < 3 && !self.lock()?.snapshots.is_empty() {
            return Err(Error::Unsupported(
                "Can't resize a v2 image which has snapshots".into(),
            ));
        }
        self.resize_bitmaps_check()?;
        let geo = self.geo;
        let old = self.size();
        if new_size > MAX_CLUSTER_OFFSET {
            return Err(Error::TooLarge("Image size too large".into()));
        }
        if new_size < old {
            // Free every cluster past the new end (the partial one is kept).
            let start = new_size.div_ceil(geo.cs) * geo.cs;
            let mut gc = start / geo.cs;
            while gc.saturating_mul(geo.cs) < old {
                if self.lock()?.l2_offset(gc)?.0 == 0 {
                    gc = ((gc >> geo.l2_bits) + 1) << geo.l2_bits;
                    continue;
                }
                self.drop_cluster(gc)?;
                gc += 1;
            }
        }
        {
            let mut m = self.lock()?;
            let entries = new_size.div_ceil(geo.cs).div_ceil(geo.l2_entries);
            m.grow_l1(entries)?;
            self.file
                .write_at(&new_size.to_be_bytes(), header::OFF_SIZE)
                .map_err(Error::io("updating the header"))?;
            self.file.flush().map_err(Error::io("flushing"))?;
            m.size = new_size;
            self.size.store(new_size, Ordering::SeqCst);
        }
        let backing_len = self.backing_node().map_or(0, |(_, l)| l);
        if new_size > old && !old.is_multiple_of(geo.cs) && backing_len > old {
            // QEMU zeroes the new area only when a backing file would show through
            // (`bdrv_co_truncate`'s BDRV_REQ_ZERO_WRITE); otherwise what was past the
            // old end in its last cluster stays as it was, as in QEMU.
            let tail_end = (old.div_ceil(geo.cs) * geo.cs).min(new_size);
            self.write_zeroes(old, tail_end - old, false)?;
        }
        Ok(())
    }

    /// Unlinks cluster `gc` entirely (entry 0) and frees what it referenced.
    fn drop_cluster(&self, gc: u64) -> Result<()> {
        let mut m = self.lock()?;
        let old = m.entry(gc)?;
        if old == Entry::default() {
            return Ok(());
        }
        m.ensure_l2_writable(gc)?;
        m.set_entry(gc, Entry::default())?;
        drop(m);
        self.free_clusters(self.refs_of(old))
    }

    /// Takes the image quiet for a whole-image metadata change: no request does I/O on
    /// looked-up clusters (gate held exclusively) and no allocation is in flight.
    fn quiesce(&self) -> Result<(std::sync::RwLockWriteGuard<'_, ()>, MutexGuard<'_, Meta>)> {
        let gate = self.exclusive();
        let mut m = self.lock()?;
        while !m.inflight.is_empty() {
            m = self.alloc_done.wait(m).unwrap_or_else(lock_err);
        }
        Ok((gate, m))
    }

    /// Creates an internal snapshot of the active state (no VM state), as QEMU's
    /// `qcow2_snapshot_create`: a copy of the L1 table, +1 on every cluster it
    /// reaches (COPIED flags cleared), a new snapshot table, then the header.
    pub fn snapshot_create(&self, new: NewSnapshot) -> Result<SnapshotInfo> {
        self.check_writable()?;
        if self.external_data {
            return Err(Error::Unsupported(
                "internal snapshots are not supported with an external data file".into(),
            ));
        }
        let (_gate, mut m) = self.quiesce()?;
        if m.snapshots.len() as u64 >= header::MAX_SNAPSHOTS {
            return Err(Error::TooLarge("Too many snapshots".into()));
        }
        let id = match new.id {
            Some(id) => id,
            None => {
                // QEMU: one more than the largest numeric id.
                let max = m
                    .snapshots
                    .iter()
                    .filter_map(|s| s.id.parse::<u64>().ok())
                    .max()
                    .unwrap_or(0);
                (max + 1).to_string()
            }
        };
        if m.snapshots.iter().any(|s| s.id == id) {
            return Err(Error::Invalid(format!("Snapshot ID '{id}' already exists")));
        }
        if id.len() > u16::MAX as usize || new.name.len() > u16::MAX as usize {
            return Err(Error::Invalid("Snapshot name too long".into()));
        }
        let cs = self.geo.cs;
        let l1 = m.l1.clone();
        m.check_tree_increment(&l1, false)?;
        let l1_bytes = (l1.len() as u64 * 8).max(1);
        // 1. the L1 copy
        let l1_off = m.alloc_contiguous(l1_bytes.div_ceil(cs))?;
        let mut raw = Vec::with_capacity(l1.len() * 8);
        for e in &l1 {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        m.check_overlap(l1_off, l1_bytes)?;
        self.file
            .write_at(&raw, l1_off)
            .map_err(Error::io("writing a snapshot L1 table"))?;
        // 2. +1 on the tree, refcounts on disk first; then the COPIED flags.
        m.update_tree_refcounts(&l1, 1, false, false)?;
        m.flush_refcounts()?;
        let new_l1 = m.update_tree_refcounts(&l1, 0, false, true)?;
        m.l1 = new_l1;
        m.write_l1()?;
        m.clear_l2_cache();
        self.file.flush().map_err(Error::io("flushing"))?;
        // 3. the table with the new entry, then the header.
        let size = self.size();
        let entry = snapshot::encode(
            l1_off,
            l1.len() as u32,
            &id,
            &new.name,
            new.date_sec,
            new.date_nsec,
            new.vm_clock_nsec,
            size,
            new.icount,
        );
        let owned: Vec<Vec<u8>> = m.snapshots.iter().map(|s| s.raw.clone()).collect();
        let mut entries: Vec<&[u8]> = owned.iter().map(|e| e.as_slice()).collect();
        entries.push(&entry);
        let old_table = m.snap_table;
        let table = m.replace_snapshot_table(old_table, &entries)?;
        let info = SnapshotInfo {
            id,
            name: new.name,
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            date_sec: new.date_sec,
            date_nsec: new.date_nsec,
            vm_clock_nsec: new.vm_clock_nsec,
            vm_state_size: 0,
            disk_size: Some(size),
            icount: new.icount,
            raw: entry,
        };
        m.snap_table = table;
        m.add_section(l1_off, l1.len() as u64 * 8, Section::InactiveL1);
        m.snapshots.push(info.clone());
        Ok(info)
    }

    /// Deletes the internal snapshot matching `id` and/or `name` (at least one given;
    /// both must match when both are), as QEMU's `qcow2_snapshot_delete`: the table
    /// first (a crash then only leaks), then -1 on its tree, its L1 freed, COPIED
    /// flags of the active tables recomputed.
    pub fn snapshot_delete(&self, id: Option<&str>, name: Option<&str>) -> Result<SnapshotInfo> {
        self.check_writable()?;
        if id.is_none() && name.is_none() {
            return Err(Error::Invalid("a snapshot id or name is required".into()));
        }
        let (_gate, mut m) = self.quiesce()?;
        let pos = m
            .snapshots
            .iter()
            .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
            .ok_or_else(|| Error::Invalid("Can't find the snapshot".into()))?;
        let entries: Vec<Vec<u8>> = m
            .snapshots
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != pos)
            .map(|(_, s)| s.raw.clone())
            .collect();
        let refs: Vec<&[u8]> = entries.iter().map(|e| e.as_slice()).collect();
        let old_table = m.snap_table;
        m.snap_table = m.replace_snapshot_table(old_table, &refs)?;
        let sn = m.snapshots.remove(pos);
        m.remove_section(sn.l1_table_offset);
        // -1 on its tree (read from the image, bounded like at open).
        let file_len = self
            .file
            .len()
            .map_err(Error::io("reading the image length"))?;
        let n = u64::from(sn.l1_size).min(file_len.saturating_sub(sn.l1_table_offset) / 8);
        let mut raw = vec![0u8; (n * 8) as usize];
        self.file
            .read_at(&mut raw, sn.l1_table_offset)
            .map_err(Error::io("reading a snapshot L1 table"))?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        m.update_tree_refcounts(&l1, -1, false, false)?;
        let cs = self.geo.cs;
        let l1_bytes = u64::from(sn.l1_size) * 8;
        if l1_bytes > 0 {
            for c in sn.l1_table_offset / cs..=(sn.l1_table_offset + l1_bytes - 1) / cs {
                m.add_refcount_pub(c, -1)?;
            }
        }
        m.flush_refcounts()?;
        let active = m.l1.clone();
        let new_l1 = m.update_tree_refcounts(&active, 0, false, true)?;
        m.l1 = new_l1;
        m.write_l1()?;
        m.clear_l2_cache();
        self.file.flush().map_err(Error::io("flushing"))?;
        Ok(sn)
    }

    /// Clean shutdown: stores tracked bitmaps, returns reserved clusters, flushes.
    /// Later requests fail with [`Error::Closed`]; a second `close` does nothing.
    pub fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        if self.writable && !self.dead.load(Ordering::SeqCst) {
            let _g = self.exclusive();
            let mut m = self.lock()?;
            while !m.inflight.is_empty() {
                m = self.alloc_done.wait(m).unwrap_or_else(lock_err);
            }
            if self.closed.swap(true, Ordering::SeqCst) {
                return Ok(());
            }
            self.store_loaded_bitmaps(&mut m)?;
            m.release_reserved()?;
            drop(m);
            if self.external_data {
                self.data
                    .flush()
                    .map_err(Error::io("flushing the data file"))?;
            }
            self.file.flush().map_err(Error::io("flushing the image"))?;
        }
        self.closed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// What [`Qcow2::snapshot_create`] records (the VM-state fields of
/// `blockdev-snapshot-internal-sync`: no VM state).
#[derive(Debug, Clone, Default)]
pub struct NewSnapshot {
    /// `None`: one more than the largest numeric id, as QEMU picks.
    pub id: Option<String>,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub icount: Option<u64>,
}

/// Where an allocating write goes: the host cluster, whether the whole cluster is
/// copied (old cluster compressed or shared), whether the host reads as zeroes.
#[derive(Debug, Clone, Copy)]
struct Target {
    host: u64,
    full: bool,
    zeroed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Zero { may_unmap: bool },
    Discard,
}

impl Backing for Qcow2 {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read(buf, off)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.size())
    }
}

// Keep the constant referenced for documentation of limits.
const _: u64 = MAX_CLUSTER_OFFSET;
