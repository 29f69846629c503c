//! The `file` and `host_device` drivers: I/O on an already open image descriptor.
//!
//! Runs in the `file` and `host_device` driver workers. The supervisor opened the image
//! (see [`crate::posix::open_image`]) and passed the fd in; this module never opens a
//! path. Blocking syscalls run on the worker's start-up I/O threads ([`crate::threads`]),
//! reads and writes directly on the caller's buffer (often a shared-memory pool slot);
//! `SEEK_DATA`/`SEEK_HOLE` for block status run inline, as in QEMU.
//! Inputs are request offsets/lengths from other bulkhead processes, checked against the
//! node size before any syscall; no untrusted bytes are parsed.
//!
//! Behaviour follows QEMU's file-posix: reads past the end of file (inside the node,
//! whose size is the file length rounded up to 512) return zeroes; write-zeroes tries a
//! hole punch when unmapping is allowed, then `FALLOC_FL_ZERO_RANGE`, then punch +
//! reallocate, then (unless `no_fallback`) explicit zero writes; block status comes
//! from `SEEK_DATA`/`SEEK_HOLE` (data → `data`, hole → `zero`, both allocated at depth 1,
//! as a protocol node always is); device nodes report everything as data.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustix::fs::{FallocateFlags, FileType, SeekFrom};
use rustix::io::Errno;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{Aio, CommonOptions, ConfigError, OnOffAuto};
use crate::driver::{
    BlockDriver, Children, DriverInfo, ImageSpec, OpenFuture, ParseError, Parsed, Resize, decode,
    opened,
};
use crate::io::{BlockIo, Extent, IoError, IoFuture, IoResult, WriteFlags, ZeroFlags};
use crate::threads;

/// `file` and `host_device` configuration (`BlockdevOptionsFile` minus the filename,
/// which only the supervisor sees).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileConfig {
    /// The generic node options.
    pub common: CommonOptions,
    /// `aio`.
    pub aio: Aio,
    /// `locking`; applied by the supervisor, which holds the lock bytes (see [`crate::lock`]).
    pub locking: OnOffAuto,
}

/// `BlockdevOptionsFile`, the QAPI members of `file`, `host_device` and `host_cdrom`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileOptions {
    filename: String,
    #[allow(dead_code)] // Accepted as qsd accepts it; no persistent reservations here.
    pr_manager: Option<String>,
    locking: Option<OnOffAuto>,
    aio: Option<Aio>,
    #[allow(dead_code)] // Batching is the I/O threads' business.
    aio_max_batch: Option<i64>,
    #[allow(dead_code)] // The page cache is dropped on inactivation regardless.
    drop_cache: Option<bool>,
    #[allow(dead_code)] // A QEMU debug option.
    x_check_cache_dropped: Option<bool>,
}

/// The `file` driver.
pub struct File;

/// The `host_device` driver.
pub struct HostDevice;

fn parse_file(members: &Map<String, Value>) -> Result<Parsed<FileConfig>, ParseError> {
    let o: FileOptions = decode(members)?;
    let locking = o.locking.unwrap_or_default();
    Ok(Parsed {
        config: FileConfig {
            common: CommonOptions::default(),
            aio: o.aio.unwrap_or_default(),
            locking,
        },
        image: Some(ImageSpec {
            filename: o.filename,
            locking,
        }),
        strong: Map::new(),
    })
}

fn validate_file(config: &FileConfig) -> Result<(), ConfigError> {
    if config.aio == Aio::Native && !config.common.direct {
        return Err(ConfigError::NativeAioNeedsDirect);
    }
    Ok(())
}

fn open_file(
    config: &FileConfig,
    kind: FileKind,
    fd: Option<OwnedFd>,
) -> Result<Arc<dyn BlockIo>, crate::OpenError> {
    let fd = fd.ok_or(crate::OpenError::MissingFd(match kind {
        FileKind::File => "file",
        FileKind::HostDevice => "host_device",
    }))?;
    Ok(Arc::new(FileDriver::new(fd, kind, config)?))
}

/// Both drivers serve every request natively and count their discards
/// (file-posix's `discard-nb-ok`).
const CAPS: crate::node::Capabilities = crate::node::Capabilities {
    write_zeroes: true,
    discard: true,
    discard_stats: true,
};

impl BlockDriver for File {
    type Config = FileConfig;
    const INFO: DriverInfo = DriverInfo {
        name: "file",
        image: Some(FileKind::File),
        protocol: true,
        children: &[],
        reopen_options: &[],
        resize: Resize::Image,
        caps: CAPS,
        policy: "file",
        format_threads: false,
        filter: false,
        protocol_child: true,
    };

    fn parse(members: &Map<String, Value>) -> Result<Parsed<FileConfig>, ParseError> {
        parse_file(members)
    }
    fn common(config: &FileConfig) -> &CommonOptions {
        &config.common
    }
    fn common_mut(config: &mut FileConfig) -> &mut CommonOptions {
        &mut config.common
    }
    fn validate(config: &FileConfig) -> Result<(), ConfigError> {
        validate_file(config)
    }
    fn open(config: &FileConfig, fd: Option<OwnedFd>, _: Children) -> OpenFuture {
        opened(open_file(config, FileKind::File, fd))
    }
}

impl BlockDriver for HostDevice {
    type Config = FileConfig;
    const INFO: DriverInfo = DriverInfo {
        name: "host_device",
        image: Some(FileKind::HostDevice),
        protocol: true,
        children: &[],
        reopen_options: &[],
        resize: Resize::Image,
        caps: CAPS,
        policy: "file",
        format_threads: false,
        filter: false,
        protocol_child: true,
    };

    fn parse(members: &Map<String, Value>) -> Result<Parsed<FileConfig>, ParseError> {
        parse_file(members)
    }
    fn common(config: &FileConfig) -> &CommonOptions {
        &config.common
    }
    fn common_mut(config: &mut FileConfig) -> &mut CommonOptions {
        &mut config.common
    }
    fn validate(config: &FileConfig) -> Result<(), ConfigError> {
        validate_file(config)
    }
    fn resize_error(_: &FileConfig, err: &IoError) -> Option<String> {
        matches!(err, IoError::Invalid).then(|| "Cannot grow device files".to_string())
    }
    fn open(config: &FileConfig, fd: Option<OwnedFd>, _: Children) -> OpenFuture {
        opened(open_file(config, FileKind::HostDevice, fd))
    }
}

/// Alignment used for `cache.direct=on`: a multiple of every logical block size Linux
/// supports, so it is valid whatever the device's real one is.
pub const DIRECT_ALIGNMENT: u64 = 4096;

/// Most extents one block-status call returns; callers ask again from where it stopped.
const MAX_EXTENTS: usize = 1024;

/// Chunk size of the explicit zero writes used when no fallocate mode works.
const ZERO_CHUNK: usize = 1 << 20;

// Linux block-device ioctls (linux/fs.h), not exported by the libc crate.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Which of the two fd-based drivers a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FileKind {
    /// `file`: a regular file.
    File,
    /// `host_device`: a block or character device.
    HostDevice,
}

/// Why a descriptor cannot back a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileOpenError {
    /// `fstat` or the size query failed (raw errno).
    #[error("cannot query the image (errno {0})")]
    Os(i32),
    /// The fd is not a regular file (`file`) or not a device (`host_device`); the
    /// supervisor reports this with the path, see [`crate::posix::open_image`].
    #[error("the descriptor is not of the type the driver requires")]
    WrongType,
}

/// A `file` or `host_device` node over an open descriptor.
#[derive(Debug)]
pub struct FileDriver {
    fd: Arc<OwnedFd>,
    kind: FileKind,
    device: DeviceType,
    /// Node size: the length rounded up to 512, as QEMU's `bdrv_getlength` reports it.
    size: AtomicU64,
    read_only: bool,
    direct: bool,
    /// In direct mode an unaligned write is a read-modify-write of whole aligned blocks,
    /// which must not interleave with other writes; aligned writes share the lock.
    rmw: Arc<RwLock<()>>,
    /// The last run of data `SEEK_DATA`/`SEEK_HOLE` found (QEMU's block-status cache):
    /// an NBD server asks for block status before every read, and on a large file each
    /// `SEEK_HOLE` can walk far, so repeated lookups inside a known data run skip it.
    data_run: DataRunCache,
    /// Which reads and writes run on the caller's thread instead of an I/O thread.
    inline: Inline,
}

/// Largest request served inline: a copy this size takes a few microseconds; larger
/// ones go to the I/O threads, which also spread them over the cores.
pub(crate) const INLINE_MAX: usize = 128 << 10;

/// When a read or write may skip the hand-off to an I/O thread (two thread wake-ups,
/// which cost more than a small copy from the page cache). Never in direct mode: that
/// goes to the device.
#[derive(Debug)]
pub(crate) struct Inline {
    /// The image is a regular file on a file system that lives in memory (tmpfs,
    /// ramfs): its reads and writes are memory copies that never wait for a device.
    memory: bool,
    /// Reads try `preadv2(RWF_NOWAIT)` first: served from the page cache or refused
    /// with `EAGAIN`, never blocking. Cleared when the file system does not support it.
    nowait_reads: AtomicBool,
}

impl Inline {
    pub(crate) fn new(fd: BorrowedFd<'_>, device: DeviceType, direct: bool) -> Inline {
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        // A block device's node lives on devtmpfs, whose magic is tmpfs's: only a
        // regular file's file system says where its data is.
        let memory = !direct
            && device == DeviceType::Regular
            && rustix::fs::fstatfs(fd).is_ok_and(|s| {
                // `f_type`'s integer type differs between architectures.
                #[allow(clippy::unnecessary_cast)]
                let magic = s.f_type as i64;
                magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
            });
        Inline {
            memory,
            nowait_reads: AtomicBool::new(!direct && !memory),
        }
    }

    /// Reads what it can without blocking; returns how many bytes it read.
    pub(crate) fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> IoResult<usize> {
        if buf.len() > INLINE_MAX {
            return Ok(0);
        }
        if self.memory {
            pread_full(fd, buf, offset)?;
            return Ok(buf.len());
        }
        if !self.nowait_reads.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let mut iov = [std::io::IoSliceMut::new(buf)];
        match rustix::io::preadv2(fd, &mut iov, offset, rustix::io::ReadWriteFlags::NOWAIT) {
            Ok(n) => Ok(n),
            Err(Errno::OPNOTSUPP) => {
                self.nowait_reads.store(false, Ordering::Relaxed);
                Ok(0)
            }
            // EAGAIN (not cached), EINTR, or anything else: the I/O thread retries
            // with a plain pread and reports its errors.
            Err(_) => Ok(0),
        }
    }

    /// The file lives in memory (tmpfs, ramfs).
    pub(crate) fn memory(&self) -> bool {
        self.memory
    }

    pub(crate) fn write(&self, len: usize) -> bool {
        self.memory && len <= INLINE_MAX
    }
}

/// A cached `[start, end)` known to hold data. Writes keep data data, so only discard,
/// write-zeroes and truncate invalidate it; the generation keeps a lookup that raced an
/// invalidation from putting a stale run back.
#[derive(Debug, Default)]
pub(crate) struct DataRunCache {
    inner: std::sync::Mutex<(u64, Option<(u64, u64)>)>,
}

impl DataRunCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Option<(u64, u64)>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached run covering `offset`, as (generation, run end) or the generation.
    pub(crate) fn lookup(&self, offset: u64) -> Result<u64, u64> {
        let g = self.lock();
        match g.1 {
            Some((start, end)) if start <= offset && offset < end => Ok(end),
            _ => Err(g.0),
        }
    }

    pub(crate) fn store(&self, generation: u64, start: u64, end: u64) {
        let mut g = self.lock();
        if g.0 == generation && start < end {
            g.1 = Some((start, end));
        }
    }

    fn invalidate(&self) {
        let mut g = self.lock();
        g.0 += 1;
        g.1 = None;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceType {
    Regular,
    Block,
    Char,
}

impl FileDriver {
    /// Wraps `fd`, checking its type against `kind` and reading its size.
    pub fn new(
        fd: OwnedFd,
        kind: FileKind,
        config: &FileConfig,
    ) -> Result<FileDriver, FileOpenError> {
        let st = rustix::fs::fstat(&fd).map_err(|e| FileOpenError::Os(e.raw_os_error()))?;
        let device = match (kind, FileType::from_raw_mode(st.st_mode)) {
            (FileKind::File, FileType::RegularFile) => DeviceType::Regular,
            (FileKind::HostDevice, FileType::BlockDevice) => DeviceType::Block,
            (FileKind::HostDevice, FileType::CharacterDevice) => DeviceType::Char,
            _ => return Err(FileOpenError::WrongType),
        };
        let length = device_length(fd.as_fd(), device).map_err(|e| FileOpenError::Os(e.errno()))?;
        Ok(FileDriver {
            kind,
            device,
            size: AtomicU64::new(round_up(length, 512)),
            read_only: config.common.read_only,
            direct: config.common.direct,
            rmw: Arc::new(RwLock::new(())),
            data_run: DataRunCache::default(),
            inline: Inline::new(fd.as_fd(), device, config.common.direct),
            fd: Arc::new(fd),
        })
    }

    /// Which driver this node is.
    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// Allocated bytes of the image (`actual-size`).
    pub fn actual_size(&self) -> IoResult<u64> {
        crate::posix::actual_size(self.fd.as_fd())
    }

    fn check(&self, offset: u64, len: u64) -> IoResult<()> {
        check_range(offset, len, self.size())
    }

    fn check_write(&self, offset: u64, len: u64) -> IoResult<()> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        self.check(offset, len)
    }

    /// [`Self::check_write`] for a write that may extend a regular file (not in
    /// direct mode, whose read-modify-write of a partial block cannot read past the
    /// end); the write's end, for [`Self::grown_to`].
    fn check_extending_write(&self, offset: u64, len: u64, flags: WriteFlags) -> IoResult<u64> {
        if flags.compressed {
            return Err(IoError::Unsupported);
        }
        let end = offset.checked_add(len).ok_or(IoError::OutOfRange)?;
        if flags.extend && !self.direct && self.device == DeviceType::Regular {
            if self.read_only {
                return Err(IoError::ReadOnly);
            }
            return Ok(end);
        }
        self.check_write(offset, len)?;
        Ok(end)
    }

    /// Raises the size after a write that ended at `end` (rounded up to sectors, as a
    /// resize stores it).
    fn grown_to(&self, end: u64) {
        self.size.fetch_max(round_up(end, 512), Ordering::AcqRel);
    }
}

/// `offset + len` must stay inside `size`.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> IoResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(IoError::OutOfRange),
    }
}

fn round_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align).saturating_mul(align)
}

fn errno(e: Errno) -> IoError {
    IoError::Os(e.raw_os_error())
}

fn device_length(fd: BorrowedFd<'_>, device: DeviceType) -> IoResult<u64> {
    match device {
        DeviceType::Regular => {
            let st = rustix::fs::fstat(fd).map_err(errno)?;
            Ok(u64::try_from(st.st_size).unwrap_or(0))
        }
        DeviceType::Block => block_device_size(fd),
        // Character devices have no size ioctl; QEMU asks lseek, as here.
        DeviceType::Char => rustix::fs::seek(fd, SeekFrom::End(0)).map_err(errno),
    }
}

/// A block device's size in bytes (`BLKGETSIZE64`).
pub(crate) fn block_device_size(fd: BorrowedFd<'_>) -> IoResult<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live,
    // writable u64; the fd is borrowed, so it stays open for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc < 0 {
        return Err(IoError::from(std::io::Error::last_os_error()));
    }
    Ok(size)
}

fn block_ioctl_range(
    fd: BorrowedFd<'_>,
    request: libc::c_ulong,
    offset: u64,
    len: u64,
) -> IoResult<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD/BLKZEROOUT read two u64s (start, length) through the pointer,
    // which points at a live array of two u64s; the fd is borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, range.as_ptr()) };
    if rc < 0 {
        return Err(IoError::from(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Reads until `buf` is full; the part past end of file reads as zeroes.
pub(crate) fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> IoResult<()> {
    let mut done = 0usize;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

pub(crate) fn pwrite_full(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> IoResult<()> {
    let mut done = 0usize;
    while done < buf.len() {
        match rustix::io::pwrite(fd, &buf[done..], offset + done as u64) {
            Ok(0) => return Err(IoError::Os(libc::EIO)),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

fn fdatasync(fd: BorrowedFd<'_>) -> IoResult<()> {
    loop {
        match rustix::fs::fdatasync(fd) {
            Err(Errno::INTR) => {}
            other => return other.map_err(errno),
        }
    }
}

/// A buffer whose data starts on a [`DIRECT_ALIGNMENT`] boundary, as `O_DIRECT` needs.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let align = DIRECT_ALIGNMENT as usize;
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align).min(align);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// The aligned span `[start, end)` covering `[offset, offset + len)`.
fn aligned_span(offset: u64, len: u64) -> (u64, u64) {
    let start = offset - offset % DIRECT_ALIGNMENT;
    (start, round_up(offset + len, DIRECT_ALIGNMENT))
}

/// Whether `O_DIRECT` can use `buf` at `offset` as it is (no bounce buffer).
fn direct_ready(offset: u64, buf: &[u8]) -> bool {
    let a = DIRECT_ALIGNMENT;
    offset.is_multiple_of(a)
        && (buf.len() as u64).is_multiple_of(a)
        && (buf.as_ptr() as u64).is_multiple_of(a)
}

fn direct_read(fd: BorrowedFd<'_>, offset: u64, buf: &mut [u8]) -> IoResult<()> {
    if direct_ready(offset, buf) {
        return pread_full(fd, buf, offset);
    }
    let len = buf.len();
    let (start, end) = aligned_span(offset, len as u64);
    let mut bounce = AlignedBuf::zeroed((end - start) as usize);
    pread_full(fd, bounce.as_mut_slice(), start)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&bounce.as_slice()[skip..skip + len]);
    Ok(())
}

fn direct_write(fd: BorrowedFd<'_>, rmw: &RwLock<()>, offset: u64, data: &[u8]) -> IoResult<()> {
    if direct_ready(offset, data) {
        let _shared = rmw.read().unwrap_or_else(|p| p.into_inner());
        return pwrite_full(fd, data, offset);
    }
    let (start, end) = aligned_span(offset, data.len() as u64);
    let mut bounce = AlignedBuf::zeroed((end - start) as usize);
    let skip = (offset - start) as usize;
    if start == offset && end == offset + data.len() as u64 {
        let _shared = rmw.read().unwrap_or_else(|p| p.into_inner());
        bounce.as_mut_slice().copy_from_slice(data);
        return pwrite_full(fd, bounce.as_slice(), start);
    }
    let _exclusive = rmw.write().unwrap_or_else(|p| p.into_inner());
    pread_full(fd, bounce.as_mut_slice(), start)?;
    bounce.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data);
    pwrite_full(fd, bounce.as_slice(), start)
}

fn write_zero_buffers(
    fd: BorrowedFd<'_>,
    direct: bool,
    rmw: &RwLock<()>,
    offset: u64,
    len: u64,
) -> IoResult<()> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK as u64) as usize;
        if direct {
            direct_write(fd, rmw, offset + done, &zeroes[..n])?;
        } else {
            pwrite_full(fd, &zeroes[..n], offset + done)?;
        }
        done += n as u64;
    }
    Ok(())
}

fn fallocate(fd: BorrowedFd<'_>, mode: FallocateFlags, offset: u64, len: u64) -> Result<(), Errno> {
    loop {
        match rustix::fs::fallocate(fd, mode, offset, len) {
            Err(Errno::INTR) => {}
            other => return other,
        }
    }
}

fn is_unsupported(e: Errno) -> bool {
    e == Errno::OPNOTSUPP || e == Errno::NOSYS || e == Errno::NOTTY
}

/// Zeroes a regular file's range without writing data, QEMU's order: zero range, then
/// punch hole + reallocate. `Ok(false)` means no fallocate mode works here.
fn zero_range_without_writing(fd: BorrowedFd<'_>, offset: u64, len: u64) -> IoResult<bool> {
    match fallocate(fd, FallocateFlags::ZERO_RANGE, offset, len) {
        Ok(()) => return Ok(true),
        Err(e) if is_unsupported(e) || e == Errno::INVAL => {}
        Err(e) => return Err(errno(e)),
    }
    match fallocate(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => match fallocate(fd, FallocateFlags::empty(), offset, len) {
            Ok(()) => Ok(true),
            Err(e) if is_unsupported(e) => Ok(true),
            Err(e) => Err(errno(e)),
        },
        Err(e) if is_unsupported(e) || e == Errno::INVAL => Ok(false),
        Err(e) => Err(errno(e)),
    }
}

/// Block status of a regular file from `SEEK_DATA`/`SEEK_HOLE`, one extent per run,
/// and the end of the data run starting at `offset` (beyond `len`) if there is one.
fn seek_extents(fd: BorrowedFd<'_>, offset: u64, len: u64) -> IoResult<(Vec<Extent>, Option<u64>)> {
    let end = offset + len;
    let mut extents: Vec<Extent> = Vec::new();
    let mut first_run = None;
    let mut pos = offset;
    while pos < end && extents.len() < MAX_EXTENTS {
        let (data, next) = match rustix::fs::seek(fd, SeekFrom::Data(pos)) {
            Ok(data_at) if data_at == pos => match rustix::fs::seek(fd, SeekFrom::Hole(pos)) {
                Ok(hole_at) if hole_at > pos => {
                    if pos == offset {
                        first_run = Some(hole_at);
                    }
                    (true, hole_at)
                }
                // A racing truncate; report the rest as data, as QEMU does on errors.
                _ => (true, end),
            },
            Ok(data_at) if data_at > pos => (false, data_at),
            // No data after pos: a hole up to (and past) end of file.
            Err(Errno::NXIO) => (false, end),
            // No SEEK_DATA support (or a surprise): everything is data.
            _ => (true, end),
        };
        let next = next.min(end);
        let length = next - pos;
        match extents.last_mut() {
            Some(last) if last.data == data => last.length += length,
            _ => extents.push(Extent {
                length,
                data,
                zero: !data,
                depth: 1,
            }),
        }
        pos = next;
    }
    Ok((extents, first_run))
}

/// Block status of a regular file through `cache`: the data-run cache keeps a long
/// `SEEK_HOLE` walk (large fully allocated files) to once per run.
pub(crate) fn cached_seek_extents(
    fd: BorrowedFd<'_>,
    cache: &DataRunCache,
    offset: u64,
    len: u64,
) -> IoResult<Vec<Extent>> {
    let generation = match cache.lookup(offset) {
        Ok(run_end) => {
            return Ok(vec![Extent {
                length: run_end.min(offset + len) - offset,
                data: true,
                zero: false,
                depth: 1,
            }]);
        }
        Err(generation) => generation,
    };
    let (extents, run) = seek_extents(fd, offset, len)?;
    if let Some(run_end) = run {
        cache.store(generation, offset, run_end);
    }
    Ok(extents)
}

impl BlockIo for FileDriver {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check(offset, buf.len() as u64)?;
            if buf.is_empty() {
                return Ok(());
            }
            let done = if self.direct {
                0
            } else {
                self.inline.read(self.fd.as_fd(), buf, offset)?
            };
            if done >= buf.len() {
                return Ok(());
            }
            let (offset, buf) = (offset + done as u64, &mut buf[done..]);
            let fd = Arc::clone(&self.fd);
            let direct = self.direct;
            // In place: the caller's buffer (often a shared-memory pool slot) is the
            // pread target, no bounce copy unless O_DIRECT alignment demands one.
            threads::run_on_buffer(buf, move |buf| {
                if direct {
                    direct_read(fd.as_fd(), offset, buf)
                } else {
                    pread_full(fd.as_fd(), buf, offset)
                }
            })
            .await
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let end = self.check_extending_write(offset, buf.len() as u64, flags)?;
            if self.inline.write(buf.len()) {
                pwrite_full(self.fd.as_fd(), buf, offset)?;
                self.grown_to(end);
                return match flags.fua {
                    true => fdatasync(self.fd.as_fd()),
                    false => Ok(()),
                };
            }
            let fd = Arc::clone(&self.fd);
            let rmw = Arc::clone(&self.rmw);
            let direct = self.direct;
            let written = threads::run_on_slice(buf, move |data| {
                if direct {
                    direct_write(fd.as_fd(), &rmw, offset, data)?;
                } else {
                    pwrite_full(fd.as_fd(), data, offset)?;
                }
                if flags.fua {
                    fdatasync(fd.as_fd())
                } else {
                    Ok(())
                }
            })
            .await;
            // Even a failed write may have grown the file part of the way: the size
            // must not stay below what the file holds.
            self.grown_to(end);
            written
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_write(offset, len)?;
            // Before and after: the range may turn into a hole.
            self.data_run.invalidate();
            if len == 0 {
                return Ok(());
            }
            let fd = Arc::clone(&self.fd);
            let rmw = Arc::clone(&self.rmw);
            let (device, direct) = (self.device, self.direct);
            let result = threads::run(move || {
                let fd = fd.as_fd();
                // An unaligned direct write's read-modify-write must not straddle this.
                let _shared = direct.then(|| rmw.read().unwrap_or_else(|p| p.into_inner()));
                let zeroed = match device {
                    DeviceType::Regular => {
                        let punched = flags.may_unmap
                            && match fallocate(
                                fd,
                                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                                offset,
                                len,
                            ) {
                                Ok(()) => true,
                                Err(e) if is_unsupported(e) => false,
                                Err(e) => return Err(errno(e)),
                            };
                        punched || zero_range_without_writing(fd, offset, len)?
                    }
                    DeviceType::Block => match block_ioctl_range(fd, BLKZEROOUT, offset, len) {
                        Ok(()) => true,
                        Err(IoError::Os(e))
                            if e == libc::EOPNOTSUPP || e == libc::ENOTTY || e == libc::EINVAL =>
                        {
                            false
                        }
                        Err(e) => return Err(e),
                    },
                    DeviceType::Char => false,
                };
                if !zeroed {
                    if flags.no_fallback {
                        return Err(IoError::Unsupported);
                    }
                    drop(_shared);
                    write_zero_buffers(fd, direct, &rmw, offset, len)?;
                }
                if flags.fua { fdatasync(fd) } else { Ok(()) }
            })
            .await;
            self.data_run.invalidate();
            result
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_write(offset, len)?;
            // Before and after: the range may turn into a hole.
            self.data_run.invalidate();
            if len == 0 {
                return Ok(());
            }
            let fd = Arc::clone(&self.fd);
            let rmw = Arc::clone(&self.rmw);
            let (device, direct) = (self.device, self.direct);
            let result = threads::run(move || {
                let fd = fd.as_fd();
                let _shared = direct.then(|| rmw.read().unwrap_or_else(|p| p.into_inner()));
                // A discard the storage cannot do is not an error (QEMU ignores ENOTSUP).
                match device {
                    DeviceType::Regular => {
                        match fallocate(
                            fd,
                            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                            offset,
                            len,
                        ) {
                            Err(e) if !is_unsupported(e) => Err(errno(e)),
                            _ => Ok(()),
                        }
                    }
                    DeviceType::Block => match block_ioctl_range(fd, BLKDISCARD, offset, len) {
                        Err(IoError::Os(e)) if e != libc::EOPNOTSUPP && e != libc::ENOTTY => {
                            Err(IoError::Os(e))
                        }
                        _ => Ok(()),
                    },
                    DeviceType::Char => Ok(()),
                }
            })
            .await;
            self.data_run.invalidate();
            result
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let fd = Arc::clone(&self.fd);
            threads::run(move || fdatasync(fd.as_fd())).await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            self.check(offset, len)?;
            if len == 0 {
                return Err(IoError::Invalid);
            }
            if self.device != DeviceType::Regular {
                return Ok(vec![Extent {
                    length: len,
                    data: true,
                    zero: false,
                    depth: 1,
                }]);
            }
            // Inline, as QEMU's file-posix does from its coroutine: `SEEK_DATA`/
            // `SEEK_HOLE` only look at the extent map and return without waiting for
            // the disk, and a hop to an I/O thread and back costs two thread
            // wake-ups, more than the lseeks themselves.
            cached_seek_extents(self.fd.as_fd(), &self.data_run, offset, len)
        })
    }

    fn resize(&self, new_size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(IoError::ReadOnly);
            }
            match self.device {
                DeviceType::Regular => {
                    let fd = Arc::clone(&self.fd);
                    threads::run(move || {
                        rustix::fs::ftruncate(fd.as_fd(), new_size).map_err(errno)
                    })
                    .await?;
                    self.data_run.invalidate();
                    self.size.store(round_up(new_size, 512), Ordering::Release);
                    Ok(())
                }
                // QEMU: a device cannot grow ("Cannot grow device files"); shrinking
                // succeeds without changing anything.
                DeviceType::Block | DeviceType::Char => {
                    if new_size > self.size() {
                        Err(IoError::Invalid)
                    } else {
                        Ok(())
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_span_covers_the_request_with_whole_blocks() {
        assert_eq!(aligned_span(0, 4096), (0, 4096));
        assert_eq!(aligned_span(100, 10), (0, 4096));
        assert_eq!(aligned_span(4000, 200), (0, 8192));
    }

    #[test]
    fn aligned_buffers_start_on_the_direct_alignment() {
        for len in [1usize, 512, 4096, 10000] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(
                buf.as_slice().as_ptr() as usize % DIRECT_ALIGNMENT as usize,
                0
            );
            assert_eq!(buf.as_slice().len(), len);
        }
    }

    #[test]
    fn ranges_past_the_node_end_or_overflowing_are_out_of_range() {
        assert_eq!(check_range(0, 1024, 1024), Ok(()));
        assert_eq!(check_range(1024, 0, 1024), Ok(()));
        assert_eq!(check_range(1, 1024, 1024), Err(IoError::OutOfRange));
        assert_eq!(check_range(u64::MAX, 2, 1024), Err(IoError::OutOfRange));
    }
}
