//! The `qcow2` format driver: a node served by the `bulkhead_qcow2` engine over its
//! `file` child, reading unallocated clusters from its `backing` child and, with an
//! external data file, its data from its `data-file` child.
//!
//! Runs in the qcow2 driver worker (or an image worker). Everything in the image is
//! untrusted; the engine parses it, bounded by QEMU's limits. The engine is
//! synchronous: its calls run on the worker's format threads
//! ([`crate::threads::run_format`]), and its I/O on the children goes through their
//! [`BlockIo`] (so their own statistics and write thresholds see it), the calling
//! format thread waiting for each request. A child's requests run on the I/O threads
//! or, in another worker, over a data channel driven by the executor, never on the
//! format threads, so a busy format pool cannot starve what it waits for; a backing
//! qcow2 node in the same worker runs its engine inline on the same thread.
//!
//! The backing file named inside the image never reaches this module as a path: the
//! supervisor reads the name from the node's image information, checks it, opens it
//! and attaches the backing node as a child.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use bulkhead_qcow2::{OpenOptions, OverlapCheck, Qcow2};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::runtime::Handle;

use crate::config::CommonOptions;
use crate::driver::{
    BlockDriver, ChildRole, ChildSlot, Children, DriverInfo, OpenFuture, ParseError, Parsed,
    Resize, decode,
};
use crate::io::{
    BitmapEntry, BlockIo, Extent, FormatInfo, IoError, IoFuture, IoResult, MAX_MAP_RUNS, MapKind,
    MapRun, SnapshotEntry, SnapshotFuture, SnapshotRequest, SparseFuture, SparseReadError,
    WriteFlags, ZeroFlags,
};
use crate::threads;

/// `overlap-check` (`Qcow2OverlapCheckMode`; the per-structure flags form takes its
/// template).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overlap {
    /// `none`.
    #[serde(rename = "none")]
    None,
    /// `constant`.
    #[serde(rename = "constant")]
    Constant,
    /// `cached` (QEMU's default).
    #[default]
    #[serde(rename = "cached")]
    Cached,
    /// `all`.
    #[serde(rename = "all")]
    All,
}

/// `qcow2` configuration (`BlockdevOptionsQcow2` minus its children).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qcow2Config {
    /// The generic node options.
    pub common: CommonOptions,
    /// `cache-size` in bytes (split between the two caches).
    pub cache_size: Option<u64>,
    /// `l2-cache-size` in bytes.
    pub l2_cache_size: Option<u64>,
    /// `refcount-cache-size` in bytes.
    pub refcount_cache_size: Option<u64>,
    /// `overlap-check`.
    pub overlap_check: Overlap,
    /// `discard-no-unref`.
    pub discard_no_unref: bool,
    /// `pass-discard-request` (QEMU's default: on with `discard=unmap`).
    pub pass_discard_request: Option<bool>,
    /// `l2-cache-entry-size` in bytes (checked against the cluster size).
    pub l2_cache_entry_size: Option<u64>,
    /// `cache-clean-interval` in seconds, as given (the engine keeps no idle cache
    /// to clean; QEMU's bound is checked).
    pub cache_clean_interval: Option<i64>,
    /// `lazy-refcounts` (the header decides how the engine updates refcounts; the
    /// option is checked against the image's version as QEMU does).
    pub lazy_refcounts: Option<bool>,
    /// `encrypt.format`: what the header's encryption must be.
    pub encrypt_format: Option<EncryptFormat>,
}

/// `BlockdevQcow2EncryptionFormat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncryptFormat {
    /// `aes`, the legacy encryption (crypt method 1).
    #[serde(rename = "aes")]
    Aes,
    /// `luks` (crypt method 2).
    #[serde(rename = "luks")]
    Luks,
}

impl EncryptFormat {
    fn name(self) -> &'static str {
        match self {
            EncryptFormat::Aes => "aes",
            EncryptFormat::Luks => "luks",
        }
    }
}

/// `Qcow2OverlapChecks`: a mode, or flags with a template.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum OverlapChecks {
    Mode(Overlap),
    Flags(OverlapFlags),
}

/// `Qcow2OverlapCheckFlags` (only the template is applied).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)] // Per-structure switches are accepted; the template decides.
struct OverlapFlags {
    template: Option<Overlap>,
    main_header: Option<bool>,
    active_l1: Option<bool>,
    active_l2: Option<bool>,
    refcount_table: Option<bool>,
    refcount_block: Option<bool>,
    snapshot_table: Option<bool>,
    inactive_l1: Option<bool>,
    inactive_l2: Option<bool>,
    bitmap_directory: Option<bool>,
}

/// `BlockdevOptionsQcow2` minus `file`, `backing` and `data-file`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)] // Accepted as qsd accepts them; see the field comments.
struct Qcow2Options {
    lazy_refcounts: Option<bool>,
    pass_discard_request: Option<bool>,
    pass_discard_snapshot: Option<bool>,
    pass_discard_other: Option<bool>,
    discard_no_unref: Option<bool>,
    overlap_check: Option<OverlapChecks>,
    cache_size: Option<i64>,
    l2_cache_size: Option<i64>,
    l2_cache_entry_size: Option<i64>,
    refcount_cache_size: Option<i64>,
    cache_clean_interval: Option<i64>,
    encrypt: Option<Value>,
}

/// The two cache sizes from `cache-size`, `l2-cache-size` and `refcount-cache-size`,
/// or the text qsd refuses the combination with (`qcow2_update_options_prepare`,
/// which checks them once the header is read).
fn cache_sizes(config: &Qcow2Config) -> Result<(Option<u64>, Option<u64>), &'static str> {
    Ok(
        match (
            config.cache_size,
            config.l2_cache_size,
            config.refcount_cache_size,
        ) {
            (Some(_), Some(_), Some(_)) => {
                return Err(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
                );
            }
            (Some(c), Some(l), None) if l > c => {
                return Err("l2-cache-size may not exceed cache-size");
            }
            (Some(c), None, Some(r)) if r > c => {
                return Err("refcount-cache-size may not exceed cache-size");
            }
            (Some(c), Some(l), None) => (Some(l), Some(c - l)),
            (Some(c), None, Some(r)) => (Some(c - r), Some(r)),
            (Some(c), None, None) => (Some(c), None),
            (None, l, r) => (l, r),
        },
    )
}

/// The text qsd refuses `config` with for an image whose header says `facts`
/// (`qcow2_update_options_prepare`, in its order), checked before the image is
/// opened for real: nothing is written to an image opened with options it refuses.
fn options_error(config: &Qcow2Config, facts: &bulkhead_qcow2::HeaderFacts) -> Option<String> {
    if let Err(text) = cache_sizes(config) {
        return Some(text.to_string());
    }
    if let Some(entry) = config.l2_cache_entry_size
        && (entry < 512 || entry > facts.cluster_size || !entry.is_power_of_two())
    {
        return Some(format!(
            "L2 cache entry size must be a power of two between 512 and the cluster size ({})",
            facts.cluster_size
        ));
    }
    // QEMU reads the number unsigned: a negative one is a huge one.
    if config
        .cache_clean_interval
        .is_some_and(|i| u32::try_from(i).is_err())
    {
        return Some("Cache clean interval too big".to_string());
    }
    if config.lazy_refcounts == Some(true) && facts.version < 3 {
        return Some(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                .to_string(),
        );
    }
    let format = config.encrypt_format?;
    match facts.crypt_method {
        0 => Some(format!(
            "No encryption in image header, but options specified format '{}'",
            format.name()
        )),
        1 if format != EncryptFormat::Aes => Some(format!(
            "Header reported 'aes' encryption format but options specify '{}'",
            format.name()
        )),
        2 if format != EncryptFormat::Luks => Some(format!(
            "Header reported 'luks' encryption format but options specify '{}'",
            format.name()
        )),
        _ => None,
    }
}

fn parse_qcow2(members: &Map<String, Value>) -> Result<Parsed<Qcow2Config>, ParseError> {
    let o: Qcow2Options = decode(members)?;
    let size = |v: Option<i64>, name: &'static str| crate::driver::size_option(v, name);
    let cache = size(o.cache_size, "cache-size")?;
    let l2 = size(o.l2_cache_size, "l2-cache-size")?;
    let refcount = size(o.refcount_cache_size, "refcount-cache-size")?;
    let l2_cache_entry_size = size(o.l2_cache_entry_size, "l2-cache-entry-size")?;
    let encrypt_format = match o.encrypt.as_ref().and_then(|e| e.get("format")) {
        Some(f) => {
            Some(serde_json::from_value(f.clone()).map_err(|e| ParseError::Decode(e.to_string()))?)
        }
        None => None,
    };
    let overlap_check = match o.overlap_check {
        Some(OverlapChecks::Mode(m)) => m,
        Some(OverlapChecks::Flags(f)) => f.template.unwrap_or_default(),
        None => Overlap::default(),
    };
    Ok(Parsed {
        config: Qcow2Config {
            common: CommonOptions::default(),
            cache_size: cache,
            l2_cache_size: l2,
            refcount_cache_size: refcount,
            overlap_check,
            discard_no_unref: o.discard_no_unref.unwrap_or(false),
            pass_discard_request: o.pass_discard_request,
            l2_cache_entry_size,
            cache_clean_interval: o.cache_clean_interval,
            lazy_refcounts: o.lazy_refcounts,
            encrypt_format,
        },
        image: None,
        strong: Map::new(),
    })
}

/// The `qcow2` driver.
pub struct Qcow2Format;

impl BlockDriver for Qcow2Format {
    type Config = Qcow2Config;
    const INFO: DriverInfo = DriverInfo {
        name: "qcow2",
        image: None,
        protocol: false,
        children: &[
            ChildSlot {
                key: "file",
                role: ChildRole::File,
                required: true,
            },
            ChildSlot {
                key: "backing",
                role: ChildRole::Backing,
                required: false,
            },
            ChildSlot {
                key: "data-file",
                role: ChildRole::DataFile,
                required: false,
            },
        ],
        // What `qcow2_update_options_prepare` applies on reopen: the image is
        // closed and opened again with them (the worker's reopen).
        reopen_options: &[
            "lazy-refcounts",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "discard-no-unref",
            "overlap-check",
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
            "cache-clean-interval",
            "encrypt",
        ],
        resize: Resize::Image,
        caps: crate::node::Capabilities {
            write_zeroes: true,
            discard: true,
            discard_stats: false,
        },
        policy: "qcow2",
        format_threads: true,
        filter: false,
        protocol_child: true,
    };

    fn parse(members: &Map<String, Value>) -> Result<Parsed<Qcow2Config>, ParseError> {
        parse_qcow2(members)
    }

    fn reopen(
        config: &mut Qcow2Config,
        members: &Map<String, Value>,
    ) -> Result<Option<Map<String, Value>>, ParseError> {
        // The runtime options are taken anew (left out means the default again, as
        // in QEMU); the cache sizes are checked when the worker opens the image.
        let common = config.common;
        *config = parse_qcow2(members)?.config;
        config.common = common;
        Ok(None)
    }

    fn common(config: &Qcow2Config) -> &CommonOptions {
        &config.common
    }

    fn common_mut(config: &mut Qcow2Config) -> &mut CommonOptions {
        &mut config.common
    }

    fn open(config: &Qcow2Config, _: Option<OwnedFd>, mut children: Children) -> OpenFuture {
        let config = *config;
        let file = children.take(ChildRole::File);
        let backing = children.take(ChildRole::Backing);
        let data_file = children.take(ChildRole::DataFile);
        let data_child = data_file.clone();
        let events = children.events();
        Box::pin(async move {
            let file = file.ok_or(crate::OpenError::MissingChild)?;
            let handle = Handle::try_current().map_err(|_| crate::OpenError::NoRuntime)?;
            let writable = !config.common.read_only && !config.common.inactive;
            let (l2_cache_size, refcount_cache_size) = cache_sizes(&config).unwrap_or((None, None));
            let pass_discard = config
                .pass_discard_request
                .unwrap_or(config.common.discard == crate::config::Discard::Unmap);
            let options = OpenOptions {
                writable,
                data_file: data_file.clone().map(|d| {
                    Arc::new(NodeStorage::new(d, handle.clone()))
                        as Arc<dyn bulkhead_qcow2::Storage>
                }),
                backing: backing.clone().map(|b| {
                    Arc::new(NodeStorage::new(b, handle.clone()))
                        as Arc<dyn bulkhead_qcow2::Backing>
                }),
                l2_cache_size,
                refcount_cache_size,
                overlap_check: match config.overlap_check {
                    Overlap::None => OverlapCheck::None,
                    Overlap::Constant => OverlapCheck::Constant,
                    Overlap::Cached => OverlapCheck::Cached,
                    Overlap::All => OverlapCheck::All,
                },
                discard_no_unref: config.discard_no_unref,
                pass_discard,
                alloc_batch: None,
            };
            let data_in_file = options.data_file.is_none();
            let data = data_child.unwrap_or_else(|| Arc::clone(&file));
            let storage: Arc<dyn bulkhead_qcow2::Storage> =
                Arc::new(NodeStorage::new(file, handle.clone()));
            // The header alone first: the options QEMU checks against it, and a data
            // file the image names (the supervisor opens it and asks again with it as
            // a child).
            let probe = Arc::clone(&storage);
            let facts =
                threads::run_format(move || Ok(bulkhead_qcow2::header_facts(probe.as_ref())))
                    .await
                    .map_err(|e| crate::OpenError::Image(crate::posix::strerror(e.errno())))?
                    .map_err(|e| crate::OpenError::Image(e.to_string()))?;
            if let Some(text) = options_error(&config, &facts) {
                return Err(crate::OpenError::Image(text));
            }
            if let (None, Some(name)) = (&options.data_file, facts.data_file) {
                return Err(crate::OpenError::NeedsDataFile(name));
            }
            let engine = threads::run_format(move || Ok(Qcow2::open(storage, options)))
                .await
                .map_err(|e| crate::OpenError::Image(crate::posix::strerror(e.errno())))?
                .map_err(|e| crate::OpenError::Image(e.to_string()))?;
            let cluster_size = engine.info().cluster_size;
            Ok(Arc::new(Qcow2Driver {
                cluster_size,
                engine: Arc::new(engine),
                data,
                backing,
                read_only: !writable,
                handle,
                data_in_file,
                events: Errors(events),
                closed: std::sync::atomic::AtomicBool::new(false),
                compressing: Arc::new(Mutex::new(())),
            }) as Arc<dyn BlockIo>)
        })
    }
}

/// A qcow2 node.
pub struct Qcow2Driver {
    engine: Arc<Qcow2>,
    /// The child guest data lies in (`file`, or `data-file`), for writes in place.
    data: Arc<dyn BlockIo>,
    backing: Option<Arc<dyn BlockIo>>,
    read_only: bool,
    /// The worker's runtime, for a structured read waiting on a format thread.
    handle: Handle,
    /// Guest data lies in the `file` child (no external data file), so host offsets
    /// are offsets in it.
    data_in_file: bool,
    events: Errors,
    /// Closed cleanly (`BlockIo::close`).
    closed: std::sync::atomic::AtomicBool,
    /// Held by a compressed write (one at a time, see `write_compressed`).
    compressing: Arc<Mutex<()>>,
    /// The image's cluster size (fixed for its life).
    cluster_size: u64,
}

/// Turns engine errors into request errors, reporting corruption on the way.
#[derive(Clone)]
struct Errors(Option<Arc<dyn crate::stats::ImageEvents>>);

impl Errors {
    fn io(&self, e: bulkhead_qcow2::Error) -> IoError {
        if let bulkhead_qcow2::Error::Corrupt {
            message,
            offset,
            size,
            fatal,
        } = &e
        {
            tracing::error!(corruption = %message, fatal, "qcow2 metadata inconsistency");
            if let Some(sink) = &self.0 {
                sink.corrupted(message, *offset, *size, *fatal);
            }
        }
        io_error(e)
    }
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Qcow2Driver {
    /// Where the backing node's bytes of an unallocated range lie, as the backing
    /// sees them (zeroes past its end); a backing that cannot say (another driver, an
    /// error) makes the range the driver's.
    async fn backing_map(&self, offset: u64, len: u64) -> Vec<MapRun> {
        let Some(backing) = &self.backing else {
            return vec![MapRun {
                length: len,
                kind: MapKind::Zero { depth: 0 },
            }];
        };
        let bsize = backing.size();
        let inside = len.min(bsize.saturating_sub(offset));
        let mut out = Vec::new();
        if inside > 0 {
            match backing.map(offset, inside).await {
                Ok(runs) => {
                    let covered: u64 = runs.iter().map(|r| r.length).sum();
                    out = runs;
                    if covered < inside {
                        return out;
                    }
                }
                Err(_) => {
                    return vec![MapRun {
                        length: inside,
                        kind: MapKind::Driver,
                    }];
                }
            }
        }
        if inside < len {
            // Past the backing's end: zeroes, in no layer (one_layer_deeper keeps 0).
            out.push(MapRun {
                length: len - inside,
                kind: MapKind::Zero { depth: 0 },
            });
        }
        out
    }

    /// A write through the `compress` filter: every cluster it touches is stored
    /// compressed, as QEMU's filter (whose requests the block layer aligns to the
    /// cluster, reading the rest of a partly written cluster first) and
    /// `qcow2_co_pwritev_compressed_part` do: a cluster already allocated refuses
    /// it with EIO, the image's last, partial cluster is padded with zeroes. One such
    /// write at a time, so that two partial writes of a cluster do not interleave
    /// their read-modify-write.
    fn write_compressed<'a>(&'a self, offset: u64, buf: &'a [u8], fua: bool) -> IoFuture<'a, ()> {
        let engine = Arc::clone(&self.engine);
        let errs = self.events.clone();
        let one = Arc::clone(&self.compressing);
        let cs = self.cluster_size;
        Box::pin(threads::run_format_on_slice(buf, move |data| {
            let _one = one.lock().unwrap_or_else(|p| p.into_inner());
            let size = engine.size();
            let end = offset
                .checked_add(data.len() as u64)
                .filter(|&e| e <= size)
                .ok_or(IoError::OutOfRange)?;
            let mut cluster = vec![0u8; cs as usize];
            let mut at = offset / cs * cs;
            while at < end {
                let in_image = (size - at).min(cs) as usize;
                let (from, to) = (at.max(offset), (at + cs).min(end));
                cluster.fill(0);
                if from > at || to < at + in_image as u64 {
                    engine
                        .read(&mut cluster[..in_image], at)
                        .map_err(|e| errs.io(e))?;
                }
                let src = (from - offset) as usize..(to - offset) as usize;
                cluster[(from - at) as usize..(to - at) as usize].copy_from_slice(&data[src]);
                engine.write_compressed(&cluster, at).map_err(|e| match e {
                    // QEMU's answer for an allocated cluster.
                    bulkhead_qcow2::Error::Invalid(_) => IoError::Os(libc::EIO),
                    e => errs.io(e),
                })?;
                at += cs;
            }
            if fua {
                engine.flush().map_err(|e| errs.io(e))?;
            }
            Ok(())
        }))
    }

    /// What the image's header and tables say (for queries).
    pub fn info(&self) -> bulkhead_qcow2::Info {
        self.engine.info()
    }
}

/// The errno an engine error answers a request with.
fn io_error(e: bulkhead_qcow2::Error) -> IoError {
    match e {
        bulkhead_qcow2::Error::ReadOnly => IoError::ReadOnly,
        bulkhead_qcow2::Error::OutOfRange { .. } => IoError::OutOfRange,
        bulkhead_qcow2::Error::Unsupported(_) => IoError::Unsupported,
        other => IoError::Os(other.errno()),
    }
}

impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        // The worker closes a node before it lets it go (`BlockIo::close`); one that
        // goes unclosed (its worker exiting) leaves what a crash leaves: leaked
        // reservations at most, and bitmaps marked in use.
        if !self.read_only && !self.closed.load(std::sync::atomic::Ordering::Acquire) {
            tracing::debug!("a qcow2 image dropped without a clean close");
        }
    }
}

impl BlockIo for Qcow2Driver {
    fn size(&self) -> u64 {
        self.engine.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        let engine = Arc::clone(&self.engine);
        let errs = self.events.clone();
        Box::pin(threads::run_format_on_buffer(buf, move |b| {
            engine.read(b, offset).map_err(|e| errs.io(e))
        }))
    }

    /// An overwrite of clusters the image owns alone goes straight to the data child
    /// from here (no hand-off to a format thread and back: two thread wake-ups, more
    /// than the write itself on a file in memory), under the engine's lease, which
    /// keeps those clusters from being freed or snapshotted until it completes.
    /// Everything else, and FUA, runs in the engine on a format thread.
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        if flags.compressed {
            return self.write_compressed(offset, buf, flags.fua);
        }
        if !flags.fua {
            match self.engine.try_in_place(offset, buf.len() as u64) {
                Ok(Some(lease)) => {
                    return Box::pin(async move {
                        let done = self
                            .data
                            .write(lease.host(), buf, WriteFlags::default())
                            .await;
                        drop(lease);
                        done
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    let e = self.events.io(e);
                    return Box::pin(std::future::ready(Err(e)));
                }
            }
        }
        let engine = Arc::clone(&self.engine);
        let errs = self.events.clone();
        Box::pin(threads::run_format_on_slice(buf, move |b| {
            engine.write(b, offset, flags.fua).map_err(|e| errs.io(e))
        }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        let engine = Arc::clone(&self.engine);
        let errs = self.events.clone();
        Box::pin(threads::run_format(move || {
            engine
                .write_zeroes(offset, len, flags.may_unmap)
                .map_err(|e| errs.io(e))?;
            if flags.fua {
                engine.flush().map_err(|e| errs.io(e))?;
            }
            Ok(())
        }))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let engine = Arc::clone(&self.engine);
        let errs = self.events.clone();
        Box::pin(threads::run_format(move || {
            engine.discard(offset, len).map_err(|e| errs.io(e))
        }))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        let engine = Arc::clone(&self.engine);
        let errs = self.events.clone();
        Box::pin(threads::run_format(move || {
            engine.flush().map_err(|e| errs.io(e))
        }))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(status(
            &self.engine,
            &self.events,
            self.backing.as_ref(),
            offset,
            len,
        ))
    }

    /// One format job for the whole structured read (the status of every layer, then
    /// the data), instead of the default's job for each layer's status plus one for the
    /// read: every job is a hand-off to a format thread and a wake-up of the executor.
    /// On the format thread the calls run inline (a backing qcow2 node in this worker
    /// too); a backing node in another worker is waited for as the engine's children
    /// are.
    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        let engine = Arc::clone(&self.engine);
        let backing = self.backing.clone();
        let handle = self.handle.clone();
        let errs = self.events.clone();
        Box::pin(async move {
            threads::run_format_on_buffer(buf, move |b| {
                Ok(wait(
                    &handle,
                    sparse_read(&engine, &errs, backing.as_ref(), offset, b),
                ))
            })
            .await
            .map_err(SparseReadError::Read)?
        })
    }

    fn map(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<MapRun>> {
        let engine = Arc::clone(&self.engine);
        let errs = self.events.clone();
        let has_backing = self.backing.is_some();
        let data_in_file = self.data_in_file;
        Box::pin(async move {
            // This image's runs on a format thread (`None`: what the backing says).
            let here = threads::run_format(move || {
                let mut runs: Vec<(u64, Option<MapKind>)> = Vec::new();
                let end = offset.saturating_add(len).min(engine.size());
                let mut at = offset;
                while at < end && runs.len() < MAX_MAP_RUNS {
                    let e = engine.block_status(at, end - at).map_err(|e| errs.io(e))?;
                    if e.len == 0 {
                        break;
                    }
                    let kind = match (e.allocated, e.zero, e.host_offset) {
                        (true, true, _) => Some(MapKind::Zero { depth: 1 }),
                        (false, _, _) if has_backing => None,
                        (false, _, _) => Some(MapKind::Zero { depth: 0 }),
                        (true, false, Some(host)) if e.data && data_in_file => {
                            Some(MapKind::Data { host, layer: 0 })
                        }
                        // Compressed clusters, data in an external data file.
                        (true, false, _) => Some(MapKind::Driver),
                    };
                    runs.push((e.len, kind));
                    at = at.saturating_add(e.len);
                }
                Ok(runs)
            })
            .await?;
            let mut runs: Vec<MapRun> = Vec::with_capacity(here.len());
            let mut at = offset;
            for (length, kind) in here {
                if runs.len() >= MAX_MAP_RUNS {
                    break;
                }
                match kind {
                    Some(kind) => MapRun::push(&mut runs, length, kind),
                    None => {
                        // Unallocated here: the backing chain's runs, one layer deeper;
                        // stop where they stop.
                        let deeper = self.backing_map(at, length).await;
                        let covered: u64 = deeper.iter().map(|r| r.length).sum();
                        for r in deeper {
                            MapRun::push(&mut runs, r.length, r.kind.one_layer_deeper());
                        }
                        if covered < length {
                            break;
                        }
                    }
                }
                at = at.saturating_add(length);
            }
            runs.truncate(MAX_MAP_RUNS);
            Ok(runs)
        })
    }

    fn close(&self) -> IoFuture<'_, ()> {
        let engine = Arc::clone(&self.engine);
        let first = !self.closed.swap(true, std::sync::atomic::Ordering::AcqRel);
        let writable = !self.read_only;
        Box::pin(async move {
            if !(first && writable) {
                return Ok(());
            }
            threads::run_format(move || {
                engine.close().map_err(|e| {
                    tracing::warn!(error = %e, "qcow2 image could not be closed cleanly");
                    IoError::Os(e.errno())
                })
            })
            .await
        })
    }

    fn resize(&self, new_size: u64) -> IoFuture<'_, ()> {
        let engine = Arc::clone(&self.engine);
        let errs = self.events.clone();
        Box::pin(threads::run_format(move || {
            engine.resize(new_size).map_err(|e| errs.io(e))
        }))
    }

    fn format_info(&self) -> Option<FormatInfo> {
        let i = self.engine.info();
        Some(FormatInfo {
            cluster_size: i.cluster_size,
            dirty: i.dirty,
            compat: if i.version >= 3 { "1.1" } else { "0.10" }.to_string(),
            lazy_refcounts: i.lazy_refcounts,
            refcount_bits: i.refcount_bits,
            corrupt: i.corrupt,
            extended_l2: i.extended_l2,
            compression_type: i.compression_type.name().to_string(),
            backing_file: i.backing_file,
            backing_format: i.backing_format,
            data_file: i.data_file,
            data_file_raw: i.data_file_raw,
            bitmaps: i.has_bitmaps.then(|| {
                i.bitmaps
                    .iter()
                    .map(|b| BitmapEntry {
                        name: b.name.clone(),
                        granularity: 1u64 << b.granularity_bits.min(63),
                        in_use: b.in_use(),
                        auto: b.auto(),
                    })
                    .collect()
            }),
            snapshots: i.snapshots.iter().map(snapshot_entry).collect(),
            dirty_bitmaps: self
                .engine
                .bitmap_status()
                .into_iter()
                .map(|b| crate::io::DirtyBitmap {
                    name: b.name,
                    granularity: b.granularity,
                    recording: b.recording,
                    count: b.count,
                    inconsistent: b.inconsistent,
                })
                .collect(),
        })
    }

    fn snapshot_create(&self, request: SnapshotRequest) -> SnapshotFuture<'_, ()> {
        let engine = Arc::clone(&self.engine);
        Box::pin(async move {
            let made = threads::run_format(move || {
                Ok(engine.snapshot_create(bulkhead_qcow2::NewSnapshot {
                    id: None,
                    name: request.name,
                    date_sec: u32::try_from(request.date_sec).unwrap_or(u32::MAX),
                    date_nsec: request.date_nsec,
                    vm_clock_nsec: request.vm_clock_nsec,
                    icount: None,
                }))
            })
            .await
            .map_err(|e| crate::posix::strerror(e.errno()))?;
            made.map(|_| ()).map_err(|e| e.to_string())
        })
    }

    fn stored_bitmaps(
        &self,
        request: crate::io::StoredBitmaps,
    ) -> SnapshotFuture<'_, Vec<crate::io::StoredBitmap>> {
        use crate::io::{StoredBitmap, StoredBitmaps};
        let engine = Arc::clone(&self.engine);
        Box::pin(async move {
            let done = threads::run_format(move || {
                Ok(match request {
                    StoredBitmaps::Take(names) => Ok(engine
                        .take_bitmaps(&names)
                        .into_iter()
                        .map(|t| StoredBitmap {
                            name: t.name,
                            granularity: t.granularity,
                            enabled: t.enabled,
                            bits: t.bits,
                        })
                        .collect()),
                    StoredBitmaps::Store(list) => {
                        let list: Vec<_> = list
                            .iter()
                            .map(|b| bulkhead_qcow2::StoreBitmap {
                                name: &b.name,
                                granularity: b.granularity,
                                enabled: b.enabled,
                                bits: &b.bits,
                            })
                            .collect();
                        engine.store_bitmaps(&list).map(|()| Vec::new())
                    }
                    StoredBitmaps::Remove(name) => engine.remove_bitmap(&name).map(|()| Vec::new()),
                })
            })
            .await
            .map_err(|e| crate::posix::strerror(e.errno()))?;
            done.map_err(|e| e.to_string())
        })
    }

    fn set_backing_file(&self, name: String, format: String) -> SnapshotFuture<'_, ()> {
        let engine = Arc::clone(&self.engine);
        Box::pin(async move {
            let done = threads::run_format(move || {
                let format = Some(format.as_str()).filter(|f| !f.is_empty());
                Ok(engine.set_backing_file(Some(name.as_str()), format))
            })
            .await
            .map_err(|e| crate::posix::strerror(e.errno()))?;
            done.map_err(|e| crate::posix::strerror(e.errno()))
        })
    }

    fn snapshot_delete(
        &self,
        id: Option<String>,
        name: Option<String>,
    ) -> SnapshotFuture<'_, SnapshotEntry> {
        let engine = Arc::clone(&self.engine);
        Box::pin(async move {
            let gone = threads::run_format(move || {
                Ok(engine.snapshot_delete(id.as_deref(), name.as_deref()))
            })
            .await
            .map_err(|e| crate::posix::strerror(e.errno()))?;
            gone.map(|s| snapshot_entry(&s)).map_err(|e| e.to_string())
        })
    }
}

/// A snapshot table entry as queries show it.
fn snapshot_entry(s: &bulkhead_qcow2::SnapshotInfo) -> SnapshotEntry {
    SnapshotEntry {
        id: s.id.clone(),
        name: s.name.clone(),
        vm_state_size: s.vm_state_size,
        date_sec: u64::from(s.date_sec),
        date_nsec: u64::from(s.date_nsec),
        vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
        vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
        icount: s.icount,
    }
}

/// Most extents one block-status call returns (callers ask again from where it
/// stopped).
const MAX_EXTENTS: usize = 1024;

/// Block status of `[offset, offset + len)`: this image's, and for what it does not
/// allocate, its backing chain's (a format job for this image, inline on a format
/// thread).
async fn status(
    engine: &Arc<Qcow2>,
    errs: &Errors,
    backing: Option<&Arc<dyn BlockIo>>,
    offset: u64,
    len: u64,
) -> IoResult<Vec<Extent>> {
    let engine = Arc::clone(engine);
    let errs = errs.clone();
    let here = threads::run_format(move || {
        let mut out = Vec::new();
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end && out.len() < MAX_EXTENTS {
            let e = engine.block_status(at, end - at).map_err(|e| errs.io(e))?;
            if e.len == 0 {
                break;
            }
            out.push(e);
            at = e.offset.saturating_add(e.len);
        }
        Ok(out)
    })
    .await?;
    let mut extents = Vec::with_capacity(here.len());
    for e in here {
        if e.allocated || backing.is_none() {
            extents.push(Extent {
                length: e.len,
                data: e.data,
                zero: e.zero || !e.allocated,
                depth: u32::from(e.allocated),
            });
            continue;
        }
        // Unallocated here: what the backing chain holds, one layer deeper.
        extents.extend(backing_status(backing, e.offset, e.len).await?);
    }
    Ok(extents)
}

/// Block status of an unallocated range, from the backing node (zeroes past its end),
/// with depths one deeper.
async fn backing_status(
    backing: Option<&Arc<dyn BlockIo>>,
    offset: u64,
    len: u64,
) -> IoResult<Vec<Extent>> {
    let Some(backing) = backing else {
        return Ok(Vec::new());
    };
    let bsize = backing.size();
    let mut out = Vec::new();
    let inside = len.min(bsize.saturating_sub(offset));
    let mut covered = 0;
    if inside > 0 {
        for e in backing.block_status(offset, inside).await? {
            covered += e.length;
            out.push(Extent {
                depth: if e.depth == 0 { 0 } else { e.depth + 1 },
                ..e
            });
        }
    }
    if covered < len {
        out.push(Extent {
            length: len - covered,
            data: false,
            zero: true,
            depth: 0,
        });
    }
    Ok(out)
}

/// [`crate::io::read_sparse_default`] on a format thread: the status until the range
/// is covered (runs merged as there), then the engine reads the data runs.
async fn sparse_read(
    engine: &Arc<Qcow2>,
    errs: &Errors,
    backing: Option<&Arc<dyn BlockIo>>,
    offset: u64,
    buf: &mut [u8],
) -> Result<Vec<Extent>, SparseReadError> {
    let end = offset + buf.len() as u64;
    let mut runs: Vec<Extent> = Vec::with_capacity(4);
    let mut pos = offset;
    while pos < end {
        let extents = status(engine, errs, backing, pos, end - pos)
            .await
            .map_err(SparseReadError::Status)?;
        if !crate::io::tile_runs(&mut runs, &extents, &mut pos, end) {
            return Err(SparseReadError::Status(IoError::Os(libc::EIO)));
        }
    }
    let mut at = 0usize;
    for run in &runs {
        let len = usize::try_from(run.length).unwrap_or(usize::MAX);
        if !run.zero {
            engine
                .read(&mut buf[at..at + len], offset + at as u64)
                .map_err(|e| SparseReadError::Read(errs.io(e)))?;
        }
        at += len;
    }
    Ok(runs)
}

/// One of the engine's storages (its file or data file) or its backing, on a child
/// node: each request waits for the child's future on the calling format thread.
struct NodeStorage {
    node: Arc<dyn BlockIo>,
    handle: Handle,
    /// Serialises growing the file, so that a smaller growth never undoes a larger one.
    /// The file grows exactly to the end of what is written past it, as QEMU's file
    /// does (its length shows in queries).
    grow: Mutex<()>,
}

/// Waits for `fut` on the calling (format) thread. Inside the runtime's context, so
/// that a child over a data channel reaches the executor's reactor, but without
/// `Handle::block_on`, which refuses to nest: a backing node in the same worker runs
/// its engine inline, and its file child's request waits here again.
fn wait<F: std::future::Future>(handle: &Handle, fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let _context = handle.enter();
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

impl NodeStorage {
    fn new(node: Arc<dyn BlockIo>, handle: Handle) -> NodeStorage {
        NodeStorage {
            node,
            handle,
            grow: Mutex::new(()),
        }
    }

    fn io<T>(&self, f: impl std::future::Future<Output = IoResult<T>>) -> std::io::Result<T> {
        wait(&self.handle, f).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn read_clamped(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let size = self.node.size();
        let n = usize::try_from(size.saturating_sub(off))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (inside, past) = buf.split_at_mut(n);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        self.io(self.node.read(off, inside))
    }
}

impl bulkhead_qcow2::Storage for NodeStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read_clamped(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        let end = off.saturating_add(buf.len() as u64);
        if end > self.node.size() {
            // Past the end: the write grows the file itself where the child can
            // (a local file), saving a truncate; otherwise resize first.
            let extend = WriteFlags {
                extend: true,
                ..WriteFlags::default()
            };
            match wait(&self.handle, self.node.write(off, buf, extend)) {
                Err(IoError::OutOfRange) => {}
                done => return done.map_err(|e| std::io::Error::from_raw_os_error(e.errno())),
            }
            let _one = self.grow.lock().unwrap_or_else(|p| p.into_inner());
            if end > self.node.size() {
                self.io(self.node.resize(end))?;
            }
        }
        self.io(self.node.write(off, buf, WriteFlags::default()))
    }

    fn flush(&self) -> std::io::Result<()> {
        self.io(self.node.flush())
    }

    fn len(&self) -> std::io::Result<u64> {
        Ok(self.node.size())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let _one = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        self.io(self.node.resize(len))
    }

    fn discard(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.io(self.node.discard(off, len))
    }
}

impl bulkhead_qcow2::Backing for NodeStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read_clamped(buf, off)
    }

    fn len(&self) -> std::io::Result<u64> {
        Ok(self.node.size())
    }
}
