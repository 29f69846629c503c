//! The data channel, version 2: node I/O between two workers over shared-memory rings.
//!
//! Runs in every worker that serves nodes to, or reaches nodes in, another worker. The
//! supervisor creates one channel per (client worker, serving worker): a sealed memfd
//! holding a submission ring, a completion ring and a buffer pool (see [`crate::ring`]),
//! two doorbell eventfds and a socket pair used only to notice that the other end has
//! gone ([`NewChannel`]). The client side is [`RemoteNode`], an implementation of
//! [`BlockIo`], so drivers and exports never know whether a node is local or remote.
//!
//! Payloads never cross a socket: a read or write names a range of the pool. When the
//! caller's buffer already lives in the pool (an export got it from
//! [`BlockIo::alloc_buffer`]) the server works on it in place; otherwise the client
//! copies once through a pool lease. Everything the peer writes into the region is
//! untrusted: the server validates each descriptor (op, flags, lengths, buffer range
//! inside the pool and not overlapping another request it is running) and the client
//! each completion (tag issued and pending, status, extent count). A violation ends the
//! channel as if the peer had died; nothing the peer writes can crash us.
//!
//! Fencing: every incarnation of a serving worker gets a new channel (a new memfd),
//! attached to the client's [`Peer`] with a higher generation only after the old
//! process was reaped; requests pending on the dead one are resubmitted there.

use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bulkhead_block::{
    BlockIo, Extent, IoBuffer, IoError, IoFuture, IoResult, SparseFuture, SparseReadError,
    WriteFlags, ZeroFlags,
};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::sync::{Notify, oneshot};

use crate::ring::{
    self, CHUNK, Consumer, Cqe, Producer, Region, RingError, RingLayout, Sqe, flag, op, status,
};
use crate::wire::NodeId;

/// Largest read or write payload (NBD's 32 MiB request limit).
pub const MAX_IO_PAYLOAD: usize = 32 << 20;

/// Most extents one block-status completion carries; callers ask again from where it
/// stopped (the trait allows fewer extents than asked for).
pub use crate::ring::MAX_EXTENTS;
use crate::ring::{EXTENT_BUFFER, EXTENT_BYTES};

/// How long a request may wait (for a ring slot, pool space and its completion) before
/// it fails with `ETIMEDOUT`. The channel stays usable: a late completion is consumed
/// and the request's pool memory stays reserved until then.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest period of a client's watchdog, which also trims the pool: a pool idle for
/// one full tick gives its used pages back, so memory returns within half a second
/// of the last request.
const TICK_MAX: Duration = Duration::from_millis(250);

/// Data channel errors (the channel is unusable afterwards).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Socket or eventfd failure.
    #[error("data channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol, or the region is unusable.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// Wrong descriptors came with the channel message.
    #[error("data channel needs {expected} descriptors, got {got}")]
    Descriptors {
        /// How many were expected.
        expected: usize,
        /// How many came.
        got: usize,
    },
}

fn violation(msg: impl Into<String>) -> DataError {
    DataError::Ring(RingError::Violation(msg.into()))
}

/// The descriptors of one end of a channel, in the order they travel with
/// `ServeDataChannel`/`ConnectDataChannel`: liveness socket, region memfd, submission
/// doorbell, completion doorbell.
#[derive(Debug)]
pub struct ChannelFds {
    /// This end of the socket pair; it carries no data, its EOF means the peer is gone.
    pub liveness: OwnedFd,
    /// The region memfd.
    pub region: OwnedFd,
    /// Eventfd the client writes when the server sleeps.
    pub sq_bell: OwnedFd,
    /// Eventfd the server writes when the client sleeps.
    pub cq_bell: OwnedFd,
}

impl ChannelFds {
    /// Descriptors per channel message.
    pub const COUNT: usize = 4;

    /// Takes the descriptors received with a channel message.
    pub fn from_vec(fds: Vec<OwnedFd>) -> Result<ChannelFds, DataError> {
        let got = fds.len();
        let mut it = fds.into_iter();
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some(liveness), Some(region), Some(sq_bell), Some(cq_bell), None) => Ok(ChannelFds {
                liveness,
                region,
                sq_bell,
                cq_bell,
            }),
            _ => Err(DataError::Descriptors {
                expected: ChannelFds::COUNT,
                got,
            }),
        }
    }
}

/// A new channel, created by the supervisor: both ends' descriptors.
#[derive(Debug)]
pub struct NewChannel {
    /// The geometry both ends must be told.
    pub layout: RingLayout,
    server_sock: OwnedFd,
    client_sock: OwnedFd,
    region: OwnedFd,
    sq_bell: OwnedFd,
    cq_bell: OwnedFd,
}

impl NewChannel {
    /// Creates the region (sealed memfd), both doorbells and the liveness socket pair.
    pub fn create(layout: RingLayout) -> Result<NewChannel, DataError> {
        let region = ring::create_region(layout)?;
        let bell = || {
            rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .map_err(RingError::from)
        };
        let (server_sock, client_sock) =
            crate::fd::stream_pair().map_err(|e| DataError::Io(std::io::Error::other(e)))?;
        Ok(NewChannel {
            layout,
            server_sock,
            client_sock,
            region,
            sq_bell: bell()?,
            cq_bell: bell()?,
        })
    }

    /// The descriptors for `ServeDataChannel`.
    pub fn server_fds(&self) -> [BorrowedFd<'_>; ChannelFds::COUNT] {
        [
            self.server_sock.as_fd(),
            self.region.as_fd(),
            self.sq_bell.as_fd(),
            self.cq_bell.as_fd(),
        ]
    }

    /// The descriptors for `ConnectDataChannel`.
    pub fn client_fds(&self) -> [BorrowedFd<'_>; ChannelFds::COUNT] {
        [
            self.client_sock.as_fd(),
            self.region.as_fd(),
            self.sq_bell.as_fd(),
            self.cq_bell.as_fd(),
        ]
    }

    /// Splits into the two ends, duplicating the shared descriptors (tests and
    /// single-process use).
    pub fn into_ends(self) -> Result<(ChannelFds, ChannelFds), DataError> {
        let dup =
            |fd: &OwnedFd| crate::fd::dup(fd).map_err(|e| DataError::Io(std::io::Error::other(e)));
        let client = ChannelFds {
            liveness: self.client_sock,
            region: dup(&self.region)?,
            sq_bell: dup(&self.sq_bell)?,
            cq_bell: dup(&self.cq_bell)?,
        };
        let server = ChannelFds {
            liveness: self.server_sock,
            region: self.region,
            sq_bell: self.sq_bell,
            cq_bell: self.cq_bell,
        };
        Ok((server, client))
    }
}

fn mutex<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere while holding it; every critical
    // section here leaves the data consistent at each step.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Rings a doorbell. A full counter (EAGAIN) already means "wake up".
fn ring_bell(fd: BorrowedFd<'_>) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Waits until a doorbell rang, and resets it.
async fn wait_bell(bell: &AsyncFd<OwnedFd>) -> std::io::Result<()> {
    let mut guard = bell.readable().await?;
    let mut buf = [0u8; 8];
    match rustix::io::read(bell.get_ref(), &mut buf) {
        Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
        Err(e) => return Err(e.into()),
    }
    // The counter is 0 now; a later write makes the eventfd readable again, which
    // the reactor reports as a new event.
    guard.clear_ready();
    Ok(())
}

/// Waits until the peer closes its end of the liveness socket (or sends anything,
/// which it never should).
async fn wait_gone(sock: &UnixStream) {
    let mut buf = [0u8; 16];
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        match sock.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => return,
        }
    }
}

fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    crate::fd::set_nonblocking(fd.as_fd()).map_err(std::io::Error::other)?;
    // SAFETY: an OwnedFd always returns the same open descriptor from `as_raw_fd`,
    // and the AsyncFd owns it until dropped.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))
}

fn stream(fd: OwnedFd) -> std::io::Result<UnixStream> {
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    UnixStream::from_std(std)
}

/// Polls `fut` once, outside any task's waker. A driver that completes synchronously
/// (null, errors, in-process raw windows) is done here, with no task spawned and no
/// wake-up; otherwise the caller spawns the future, whose next poll registers a real
/// waker.
fn poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::Pin::new(fut).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

// ---------------------------------------------------------------------------------
// Buffer pool (client side). Only the client allocates; the allocator's state is in
// private memory, so the server cannot corrupt it.

struct PoolState {
    /// One bit per chunk, set when free.
    free: Vec<u64>,
    /// Requests in flight using each chunk; a chunk freed while pinned is freed when
    /// its last request completes, so the server never writes into reused memory.
    pins: Vec<u32>,
    /// Chunks released by their owner while pinned.
    deferred: Vec<u64>,
    /// Chunks leased since the last trim: their pages may hold memory.
    dirty: Vec<u64>,
    /// Leases taken so far; the trimmer compares it between ticks to see idleness.
    leases: u64,
    chunks: usize,
    /// Set when the channel closed: nothing is allocated any more.
    closed: bool,
}

impl PoolState {
    fn is_free(&self, c: usize) -> bool {
        self.free[c / 64] & (1 << (c % 64)) != 0
    }

    fn set_free(&mut self, c: usize, free: bool) {
        if free {
            self.free[c / 64] |= 1 << (c % 64);
        } else {
            self.free[c / 64] &= !(1 << (c % 64));
        }
    }

    /// First fit of `count` consecutive free chunks.
    fn find(&self, count: usize) -> Option<usize> {
        let mut run = 0;
        let mut c = 0;
        while c < self.chunks {
            if c % 64 == 0 && run == 0 && self.free[c / 64] == 0 {
                c += 64;
                continue;
            }
            if self.is_free(c) {
                run += 1;
                if run == count {
                    return Some(c + 1 - count);
                }
            } else {
                run = 0;
            }
            c += 1;
        }
        None
    }

    fn release(&mut self, first: usize, count: usize) {
        for c in first..first + count {
            if self.pins[c] > 0 {
                self.deferred[c / 64] |= 1 << (c % 64);
            } else {
                self.set_free(c, true);
            }
        }
    }

    fn unpin(&mut self, first: usize, count: usize) {
        for c in first..first + count {
            self.pins[c] = self.pins[c].saturating_sub(1);
            if self.pins[c] == 0 && self.deferred[c / 64] & (1 << (c % 64)) != 0 {
                self.deferred[c / 64] &= !(1 << (c % 64));
                self.set_free(c, true);
            }
        }
    }
}

struct Pool {
    region: Arc<Region>,
    state: Mutex<PoolState>,
    space: Notify,
}

/// Chunks `[first, first + count)` covering pool bytes `[off, off + len)`.
fn chunk_span(off: u64, len: u64) -> (usize, usize) {
    let first = (off / CHUNK as u64) as usize;
    let end = (off + len).div_ceil(CHUNK as u64) as usize;
    (first, end.saturating_sub(first))
}

impl Pool {
    fn new(region: Arc<Region>) -> Pool {
        let chunks = region.pool_len() / CHUNK;
        let words = chunks.div_ceil(64);
        let mut free = vec![0u64; words];
        for c in 0..chunks {
            free[c / 64] |= 1 << (c % 64);
        }
        Pool {
            region,
            state: Mutex::new(PoolState {
                free,
                pins: vec![0; chunks],
                deferred: vec![0; words],
                dirty: vec![0; words],
                leases: 0,
                chunks,
                closed: false,
            }),
            space: Notify::new(),
        }
    }

    fn try_lease(self: &Arc<Self>, len: usize) -> Option<Lease> {
        let count = len.div_ceil(CHUNK).max(1);
        let mut s = mutex(&self.state);
        if s.closed {
            return None;
        }
        let first = s.find(count)?;
        for c in first..first + count {
            s.set_free(c, false);
            s.dirty[c / 64] |= 1 << (c % 64);
        }
        s.leases += 1;
        Some(Lease {
            pool: Arc::clone(self),
            first,
            count,
            len,
        })
    }

    /// A lease of `len` bytes, waiting (at most `timeout`) for space if the pool is
    /// busy.
    async fn lease(self: &Arc<Self>, len: usize, timeout: Duration) -> IoResult<Lease> {
        if len > self.region.pool_len() {
            return Err(IoError::Invalid);
        }
        if let Some(l) = self.try_lease(len) {
            return Ok(l);
        }
        tokio::time::timeout(timeout, self.wait_lease(len))
            .await
            .unwrap_or(Err(IoError::Os(libc::ETIMEDOUT)))
    }

    async fn wait_lease(self: &Arc<Self>, len: usize) -> IoResult<Lease> {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = self.try_lease(len) {
                return Ok(l);
            }
            if mutex(&self.state).closed {
                return Err(IoError::Disconnected);
            }
            notified.await;
        }
    }

    fn pin(&self, off: u64, len: u64) {
        let (first, count) = chunk_span(off, len);
        let mut s = mutex(&self.state);
        for c in first..(first + count).min(s.chunks) {
            s.pins[c] += 1;
        }
    }

    fn unpin(&self, off: u64, len: u64) {
        let (first, count) = chunk_span(off, len);
        let mut s = mutex(&self.state);
        let count = count.min(s.chunks.saturating_sub(first));
        s.unpin(first, count);
        drop(s);
        self.space.notify_waiters();
    }

    fn close(&self) {
        mutex(&self.state).closed = true;
        self.space.notify_waiters();
    }

    /// Gives the memory of used chunks back to the system once the pool has been idle
    /// (no lease taken) since the previous call, whose lease count `seen` holds.
    ///
    /// Pool pages are shared memory, so every touched page stays resident (and counts
    /// in the RSS of both ends) until the pool is unmapped: a burst of 1 MiB requests
    /// would otherwise pin megabytes per channel for the life of the worker. Only free,
    /// unpinned chunks are punched (`MADV_REMOVE`, which frees the memfd's pages for
    /// both mappings; they read as zeroes afterwards), under the state lock so no
    /// lease can take one meanwhile. Returns how many chunks were released.
    fn trim_if_idle(&self, seen: &mut u64) -> usize {
        let mut s = mutex(&self.state);
        if s.closed || s.leases != *seen {
            *seen = s.leases;
            return 0;
        }
        let mut released = 0;
        let mut c = 0;
        while c < s.chunks {
            if s.dirty[c / 64] == 0 && c % 64 == 0 {
                c += 64;
                continue;
            }
            let trimmable = |s: &PoolState, c: usize| {
                s.dirty[c / 64] & (1 << (c % 64)) != 0 && s.is_free(c) && s.pins[c] == 0
            };
            if !trimmable(&s, c) {
                c += 1;
                continue;
            }
            let first = c;
            while c < s.chunks && trimmable(&s, c) {
                s.dirty[c / 64] &= !(1 << (c % 64));
                c += 1;
            }
            // SAFETY: the range lies inside the pool mapping; no lease or request
            // uses it (free, unpinned) and none can take it while we hold the lock.
            let punched = unsafe {
                rustix::mm::madvise(
                    self.region.pool_ptr().add(first * CHUNK).cast(),
                    (c - first) * CHUNK,
                    rustix::mm::Advice::LinuxRemove,
                )
            };
            if punched.is_ok() {
                released += c - first;
            }
        }
        released
    }
}

/// Pool chunks owned by one buffer; returned (or deferred while pinned) on drop.
struct Lease {
    pool: Arc<Pool>,
    first: usize,
    count: usize,
    len: usize,
}

impl Lease {
    fn offset(&self) -> u64 {
        (self.first * CHUNK) as u64
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: the lease lies inside the pool.
        unsafe { self.pool.region.pool_ptr().add(self.first * CHUNK) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: leased chunks are ours alone in this process until dropped; the
        // server touches them only while a request naming them is in flight.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }

    fn into_buffer(self) -> IoBuffer {
        let ptr = NonNull::new(self.ptr()).unwrap_or(NonNull::dangling());
        let len = self.len;
        // SAFETY: the lease keeps the region mapped and the chunks reserved for this
        // buffer alone until it is dropped (with the buffer).
        unsafe { IoBuffer::from_raw_parts(ptr, len, Box::new(self)) }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        mutex(&self.pool.state).release(self.first, self.count);
        self.pool.space.notify_waiters();
    }
}

// ---------------------------------------------------------------------------------
// Client.

/// One request waiting for its completion.
struct Pending {
    /// Taken when the request is answered, or given up on by the watchdog.
    tx: Option<oneshot::Sender<Cqe>>,
    /// When the watchdog fails the request with `ETIMEDOUT`.
    deadline: std::time::Instant,
    /// Pool range the server may touch until it completes.
    buf: (u64, u64),
}

struct Slot {
    seq: u32,
    pending: Option<Pending>,
}

struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
    closed: bool,
}

/// Options of a client channel end.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// See [`REQUEST_TIMEOUT`].
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            timeout: REQUEST_TIMEOUT,
        }
    }
}

/// The submission ring's producer.
struct SqState {
    producer: Producer<Sqe>,
    /// A submitter has pushed and will publish (with everything pushed meanwhile)
    /// once the requests that are ready now have been pushed too.
    publisher: bool,
}

/// Publishes the submissions pushed so far when dropped: the deferred publisher
/// holds one across its yield, so even a cancelled submitter publishes.
struct PublishOnDrop<'a>(&'a DataClient);

impl Drop for PublishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.publish();
    }
}

/// The completion ring's consumer and a reusable batch.
struct CqState {
    consumer: Consumer<Cqe>,
    batch: Vec<Cqe>,
}

/// The client end of a data channel, shared by every [`RemoteNode`] reached through it.
pub struct DataClient {
    region: Arc<Region>,
    sq: Mutex<SqState>,
    cq: Mutex<CqState>,
    sq_bell: OwnedFd,
    slots: Mutex<Slots>,
    /// Free ring slots (one permit each).
    tags: tokio::sync::Semaphore,
    inflight: AtomicU32,
    pool: Arc<Pool>,
    closed: AtomicBool,
    close_notify: Notify,
    liveness: OwnedFd,
    options: ClientOptions,
}

impl std::fmt::Debug for DataClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataClient")
            .field("layout", &self.region.layout())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// What a completed request returns.
enum Done {
    Unit,
    Extents(Vec<Extent>),
    /// A sparse read's outcome as the server reported it.
    Sparse(Result<Vec<Extent>, SparseReadError>),
    Info {
        size: u64,
        read_only: bool,
    },
}

/// A request as the client side sees it, borrowing the caller's buffer.
enum Req<'a> {
    Read {
        offset: u64,
        buf: &'a mut [u8],
    },
    ReadSparse {
        offset: u64,
        buf: &'a mut [u8],
    },
    Write {
        offset: u64,
        buf: &'a [u8],
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
    BlockStatus {
        offset: u64,
        len: u64,
    },
    Info,
}

/// Writes `extents` into an extent buffer; returns how many fit.
fn encode_extents(extents: &[Extent], buf: &mut [u8]) -> u32 {
    let mut count = 0;
    for (e, out) in extents.iter().zip(buf.chunks_exact_mut(EXTENT_BYTES)) {
        out[..8].copy_from_slice(&e.length.to_le_bytes());
        let flags = u32::from(e.data) | (u32::from(e.zero) << 1);
        out[8..12].copy_from_slice(&flags.to_le_bytes());
        out[12..16].copy_from_slice(&e.depth.to_le_bytes());
        count += 1;
    }
    count
}

/// Reads `count` extents written by the server; `None` if any is malformed or they
/// add up to more than `len` (or, with `exact`, to anything but `len`).
fn decode_extents(buf: &[u8], count: usize, len: u64, exact: bool) -> Option<Vec<Extent>> {
    if count == 0 || count > MAX_EXTENTS || count * EXTENT_BYTES > buf.len() {
        return None;
    }
    let mut extents = Vec::with_capacity(count);
    let mut total = 0u64;
    for raw in buf[..count * EXTENT_BYTES].chunks_exact(EXTENT_BYTES) {
        let mut l = [0u8; 8];
        l.copy_from_slice(&raw[..8]);
        let length = u64::from_le_bytes(l);
        let flags = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let depth = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        total = total.checked_add(length)?;
        if length == 0 || total > len || flags & !3 != 0 {
            return None;
        }
        extents.push(Extent {
            length,
            data: flags & 1 != 0,
            zero: flags & 2 != 0,
            depth,
        });
    }
    (!exact || total == len).then_some(extents)
}

fn error_of(cqe: &Cqe) -> Option<IoError> {
    Some(match cqe.status {
        status::OS => IoError::Os(i32::try_from(cqe.value).unwrap_or(libc::EIO)),
        status::OUT_OF_RANGE => IoError::OutOfRange,
        status::READ_ONLY => IoError::ReadOnly,
        status::UNSUPPORTED => IoError::Unsupported,
        status::DISCONNECTED => IoError::Disconnected,
        status::INVALID => IoError::Invalid,
        _ => return None,
    })
}

fn status_of(e: &IoError) -> (u32, u64) {
    match e {
        IoError::Os(errno) => (status::OS, u64::from(errno.unsigned_abs())),
        IoError::OutOfRange => (status::OUT_OF_RANGE, 0),
        IoError::ReadOnly => (status::READ_ONLY, 0),
        IoError::Unsupported => (status::UNSUPPORTED, 0),
        IoError::Disconnected => (status::DISCONNECTED, 0),
        IoError::Invalid => (status::INVALID, 0),
    }
}

impl DataClient {
    /// Maps the channel and starts its completion reaper on the current runtime.
    pub fn spawn(fds: ChannelFds, layout: RingLayout) -> Result<Arc<DataClient>, DataError> {
        DataClient::spawn_with(fds, layout, ClientOptions::default())
    }

    /// [`DataClient::spawn`] with options.
    pub fn spawn_with(
        fds: ChannelFds,
        layout: RingLayout,
        options: ClientOptions,
    ) -> Result<Arc<DataClient>, DataError> {
        let region = Arc::new(Region::map(fds.region.as_fd(), layout)?);
        let entries = layout.entries;
        let cq = Mutex::new(CqState {
            consumer: region.cq_consumer(),
            batch: Vec::with_capacity(entries as usize),
        });
        let bell = async_fd(fds.cq_bell)?;
        let live = stream(crate::fd::dup(&fds.liveness).map_err(std::io::Error::other)?)?;
        let client = Arc::new(DataClient {
            sq: Mutex::new(SqState {
                producer: region.sq_producer(),
                publisher: false,
            }),
            cq,
            sq_bell: fds.sq_bell,
            slots: Mutex::new(Slots {
                slots: (0..entries)
                    .map(|_| Slot {
                        seq: 0,
                        pending: None,
                    })
                    .collect(),
                free: (0..entries).rev().collect(),
                closed: false,
            }),
            tags: tokio::sync::Semaphore::new(entries as usize),
            inflight: AtomicU32::new(0),
            pool: Arc::new(Pool::new(Arc::clone(&region))),
            region,
            closed: AtomicBool::new(false),
            close_notify: Notify::new(),
            liveness: fds.liveness,
            options,
        });
        let watchdog = Arc::downgrade(&client);
        tokio::spawn(async move {
            let mut seen_leases = 0;
            // Holds the client only while checking, so a dropped channel ends it.
            loop {
                let Some(c) = watchdog.upgrade() else { return };
                if c.is_closed() {
                    return;
                }
                let period = (c.options.timeout / 4).clamp(Duration::from_millis(10), TICK_MAX);
                drop(c);
                tokio::time::sleep(period).await;
                let Some(c) = watchdog.upgrade() else { return };
                c.expire();
                c.pool.trim_if_idle(&mut seen_leases);
            }
        });
        let reaper = Arc::clone(&client);
        tokio::spawn(async move {
            let why = reaper.reap(bell, live).await;
            tracing::warn!(reason = %why, "data channel closed");
            reaper.close();
        });
        Ok(client)
    }

    /// Makes every pushed submission visible to the server (ringing its doorbell if
    /// it sleeps) and ends any burst's publisher role.
    fn publish(&self) {
        let wake = {
            let mut sq = mutex(&self.sq);
            sq.publisher = false;
            sq.producer.publish()
        };
        if wake {
            ring_bell(self.sq_bell.as_fd());
        }
    }

    /// Whether the channel is gone (the serving worker died or misbehaved).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends the channel: pending requests fail with `Disconnected`, the peer sees
    /// the liveness socket close. Pool memory of requests still in flight stays
    /// reserved (a live but misbehaving peer may still write there).
    fn close(&self) {
        let pending: Vec<Pending> = {
            let mut s = mutex(&self.slots);
            s.closed = true;
            self.closed.store(true, Ordering::Release);
            s.slots
                .iter_mut()
                .filter_map(|s| s.pending.take())
                .collect()
        };
        // Dropping the senders fails the waiting calls with Disconnected.
        drop(pending);
        self.pool.close();
        self.tags.close();
        let _ = rustix::net::shutdown(&self.liveness, rustix::net::Shutdown::Both);
        self.close_notify.notify_waiters();
    }

    fn fail(&self, why: &str) -> IoError {
        tracing::warn!(
            reason = why,
            "data channel peer misbehaved; closing the channel"
        );
        self.close();
        IoError::Disconnected
    }

    /// Takes every completion waiting in the ring and hands each to its request.
    /// Whoever gets the lock does the work: the reaper task, or a submitter spinning
    /// for its own completion. Returns how many were taken.
    fn reap_now(&self, cq: &mut CqState) -> Result<usize, DataError> {
        cq.batch.clear();
        let CqState { consumer, batch } = cq;
        let n = consumer.drain(batch)?;
        for cqe in batch.iter() {
            self.complete(cqe)?;
        }
        Ok(n)
    }

    /// [`DataClient::reap_now`] if nobody else is at it.
    fn try_reap(&self) -> Result<usize, DataError> {
        match self.cq.try_lock() {
            Ok(mut cq) => self.reap_now(&mut cq),
            Err(std::sync::TryLockError::Poisoned(p)) => self.reap_now(&mut p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Ok(0),
        }
    }

    /// The completion reaper: sleeps on the completion doorbell and dispatches. It
    /// does not spin; a lone request spins for its own completion in `submit`.
    async fn reap(&self, bell: AsyncFd<OwnedFd>, live: UnixStream) -> String {
        loop {
            if self.is_closed() {
                return "closed".into();
            }
            let reaped = self.reap_now(&mut mutex(&self.cq));
            match reaped {
                Err(e) => return e.to_string(),
                Ok(0) => {}
                Ok(_) => {
                    // Let the requests just woken run (they sit in this thread's
                    // run queue) before looking again.
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            if !mutex(&self.cq).consumer.prepare_sleep() {
                continue;
            }
            let closed = self.close_notify.notified();
            tokio::select! {
                r = wait_bell(&bell) => if let Err(e) = r { return e.to_string() },
                _ = wait_gone(&live) => return "serving worker gone".into(),
                _ = closed => {},
            }
            mutex(&self.cq).consumer.woke();
        }
    }

    /// Hands a completion to its waiting request.
    fn complete(&self, cqe: &Cqe) -> Result<(), DataError> {
        let index = (cqe.tag & 0xffff_ffff) as usize;
        let seq = (cqe.tag >> 32) as u32;
        let pending = {
            let mut s = mutex(&self.slots);
            let Some(slot) = s.slots.get_mut(index) else {
                return Err(violation(format!(
                    "completion for unknown tag {:#x}",
                    cqe.tag
                )));
            };
            if slot.seq != seq || slot.pending.is_none() {
                return Err(violation(format!(
                    "completion for tag {:#x} not in flight",
                    cqe.tag
                )));
            }
            let p = slot.pending.take();
            s.free.push(index as u32);
            p
        };
        self.inflight.fetch_sub(1, Ordering::AcqRel);
        self.tags.add_permits(1);
        if let Some(p) = pending {
            if p.buf.1 > 0 {
                self.pool.unpin(p.buf.0, p.buf.1);
            }
            // The caller may have given up (timeout, cancelled): nothing to do then.
            if let Some(tx) = p.tx {
                let _ = tx.send(*cqe);
            }
        }
        Ok(())
    }

    /// Submits one descriptor and waits for its completion.
    async fn submit(&self, mut sqe: Sqe) -> IoResult<Cqe> {
        let rx = {
            // No timer on the fast path: a free slot is taken at once; only waiting for
            // one is bounded by a timer.
            let permit = match self.tags.try_acquire() {
                Ok(p) => p,
                Err(tokio::sync::TryAcquireError::Closed) => return Err(IoError::Disconnected),
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    match tokio::time::timeout(self.options.timeout, self.tags.acquire()).await {
                        Ok(Ok(p)) => p,
                        Ok(Err(_)) => return Err(IoError::Disconnected),
                        Err(_) => return Err(IoError::Os(libc::ETIMEDOUT)),
                    }
                }
            };
            permit.forget();
            let (tx, rx) = oneshot::channel();
            let buf = (sqe.buf_off, sqe.buf_len);
            {
                let mut s = mutex(&self.slots);
                if s.closed {
                    return Err(IoError::Disconnected);
                }
                let Some(index) = s.free.pop() else {
                    return Err(IoError::Disconnected);
                };
                let slot = &mut s.slots[index as usize];
                slot.seq = slot.seq.wrapping_add(1);
                slot.pending = Some(Pending {
                    tx: Some(tx),
                    deadline: std::time::Instant::now() + self.options.timeout,
                    buf,
                });
                sqe.tag = (u64::from(slot.seq) << 32) | u64::from(index);
            }
            if buf.1 > 0 {
                self.pool.pin(buf.0, buf.1);
            }
            let depth = self.inflight.fetch_add(1, Ordering::AcqRel) + 1;
            self.region.depth_hint().store(depth, Ordering::Relaxed);
            // Alone in flight, publish at once. Otherwise the first submitter of a
            // burst publishes for all of it after one yield, so the server is woken
            // (and wakes us) once per burst, not once per request: with a sleeping
            // server each publish costs a doorbell write and a process wake-up.
            enum Publish {
                Now,
                AfterYield,
                ByAnother,
            }
            let publish = {
                let mut sq = mutex(&self.sq);
                if let Err(e) = sq.producer.push(sqe) {
                    drop(sq);
                    return Err(self.fail(&e.to_string()));
                }
                match (depth, sq.publisher) {
                    (1, _) => Publish::Now,
                    (_, true) => Publish::ByAnother,
                    (_, false) => {
                        sq.publisher = true;
                        Publish::AfterYield
                    }
                }
            };
            match publish {
                Publish::Now => self.publish(),
                Publish::AfterYield => {
                    let _publish = PublishOnDrop(self);
                    tokio::task::yield_now().await;
                }
                Publish::ByAnother => {}
            }
            rx
        };
        // Alone in flight (queue depth 1): poll for the completion ourselves for a
        // little while. An awake server answers within microseconds, and then the
        // request finishes with no wake-up at all. The polling is cooperative (the
        // task re-queues itself instead of blocking the thread), so other requests
        // still get submitted meanwhile; as soon as one is, this one stops polling
        // and waits for the reaper like any other.
        let mut rx = rx;
        let spin = ring::client_spin();
        let mut deadline = (!spin.is_zero()).then(|| std::time::Instant::now() + spin);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut rx).poll(cx) {
                return Poll::Ready(r.map_err(|_| IoError::Disconnected));
            }
            let Some(until) = deadline else {
                return Poll::Pending;
            };
            if self.inflight.load(Ordering::Acquire) != 1 || std::time::Instant::now() >= until {
                deadline = None;
                return Poll::Pending;
            }
            if let Err(e) = self.try_reap() {
                tracing::warn!(error = %e, "data channel closed");
                self.close();
            }
            if let Poll::Ready(r) = std::pin::Pin::new(&mut rx).poll(cx) {
                return Poll::Ready(r.map_err(|_| IoError::Disconnected));
            }
            std::hint::spin_loop();
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    fn expect_unit(&self, cqe: &Cqe) -> IoResult<Done> {
        match cqe.status {
            status::OK => Ok(Done::Unit),
            _ => Err(error_of(cqe).unwrap_or_else(|| self.fail("unknown completion status"))),
        }
    }

    /// Fails requests that have waited past their deadline with `ETIMEDOUT` (a
    /// synthetic completion). Their ring slot and pool chunks stay reserved until the
    /// server answers: it may still be working on them. Run periodically by one
    /// watchdog task per channel, instead of one timer per request.
    fn expire(&self) {
        let now = std::time::Instant::now();
        let mut s = mutex(&self.slots);
        for (index, slot) in s.slots.iter_mut().enumerate() {
            let Some(p) = slot.pending.as_mut() else {
                continue;
            };
            if p.deadline <= now
                && let Some(tx) = p.tx.take()
            {
                let tag = (u64::from(slot.seq) << 32) | index as u64;
                let _ = tx.send(Cqe::new(tag, status::OS, libc::ETIMEDOUT as u64, 0));
            }
        }
    }

    async fn execute(&self, node: NodeId, req: &mut Req<'_>) -> IoResult<Done> {
        if self.is_closed() {
            return Err(IoError::Disconnected);
        }
        let n = node.0;
        match req {
            Req::Read { offset, buf } => {
                let len = payload_len(buf.len())?;
                if let Some(off) = self.region.pool_offset_of(buf.as_ptr(), buf.len()) {
                    let cqe = self
                        .submit(Sqe::new(0, n, op::READ, 0, *offset, len, off, len))
                        .await?;
                    return self.expect_unit(&cqe);
                }
                let lease = self.pool.lease(buf.len(), self.options.timeout).await?;
                let cqe = self
                    .submit(Sqe::new(
                        0,
                        n,
                        op::READ,
                        0,
                        *offset,
                        len,
                        lease.offset(),
                        len,
                    ))
                    .await?;
                let done = self.expect_unit(&cqe)?;
                buf.copy_from_slice(lease.bytes());
                Ok(done)
            }
            Req::ReadSparse { offset, buf } => {
                let len = payload_len(buf.len())?;
                let extents = self.pool.lease(EXTENT_BUFFER, self.options.timeout).await?;
                let in_pool = self.region.pool_offset_of(buf.as_ptr(), buf.len());
                let mut copy = None;
                let off = match in_pool {
                    Some(off) => off,
                    None => {
                        let l = self.pool.lease(buf.len(), self.options.timeout).await?;
                        let off = l.offset();
                        copy = Some(l);
                        off
                    }
                };
                let sqe = Sqe::new(0, n, op::READ_SPARSE, 0, *offset, len, off, len)
                    .with_aux(extents.offset());
                let cqe = self.submit(sqe).await?;
                if cqe.status != status::OK {
                    let e = error_of(&cqe).ok_or_else(|| self.fail("unknown completion status"))?;
                    return match cqe.aux {
                        1 => Ok(Done::Sparse(Err(SparseReadError::Status(e)))),
                        2 => Ok(Done::Sparse(Err(SparseReadError::Read(e)))),
                        // Not answered by the node (unknown node, timeout, ...).
                        _ => Err(e),
                    };
                }
                let list = decode_extents(extents.bytes(), cqe.aux as usize, len, true)
                    .ok_or_else(|| self.fail("bad sparse-read extents"))?;
                if let Some(l) = copy {
                    // Only the data runs were filled; holes stay as the caller had them.
                    let mut at = 0usize;
                    for e in &list {
                        let end = at + e.length as usize;
                        if !e.zero {
                            buf[at..end].copy_from_slice(&l.bytes()[at..end]);
                        }
                        at = end;
                    }
                }
                Ok(Done::Sparse(Ok(list)))
            }
            Req::Write { offset, buf, fua } => {
                let len = payload_len(buf.len())?;
                let flags = if *fua { flag::FUA } else { 0 };
                if let Some(off) = self.region.pool_offset_of(buf.as_ptr(), buf.len()) {
                    let cqe = self
                        .submit(Sqe::new(0, n, op::WRITE, flags, *offset, len, off, len))
                        .await?;
                    return self.expect_unit(&cqe);
                }
                let mut lease = self.pool.lease(buf.len(), self.options.timeout).await?;
                lease.bytes_mut().copy_from_slice(buf);
                let cqe = self
                    .submit(Sqe::new(
                        0,
                        n,
                        op::WRITE,
                        flags,
                        *offset,
                        len,
                        lease.offset(),
                        len,
                    ))
                    .await?;
                self.expect_unit(&cqe)
            }
            Req::WriteZeroes { offset, len, flags } => {
                let mut f = 0;
                if flags.fua {
                    f |= flag::FUA;
                }
                if flags.may_unmap {
                    f |= flag::MAY_UNMAP;
                }
                if flags.no_fallback {
                    f |= flag::NO_FALLBACK;
                }
                let cqe = self
                    .submit(Sqe::new(0, n, op::WRITE_ZEROES, f, *offset, *len, 0, 0))
                    .await?;
                self.expect_unit(&cqe)
            }
            Req::Discard { offset, len } => {
                let cqe = self
                    .submit(Sqe::new(0, n, op::DISCARD, 0, *offset, *len, 0, 0))
                    .await?;
                self.expect_unit(&cqe)
            }
            Req::Flush => {
                let cqe = self
                    .submit(Sqe::new(0, n, op::FLUSH, 0, 0, 0, 0, 0))
                    .await?;
                self.expect_unit(&cqe)
            }
            Req::BlockStatus { offset, len } => {
                let cap = EXTENT_BUFFER;
                let lease = self.pool.lease(cap, self.options.timeout).await?;
                let cqe = self
                    .submit(Sqe::new(
                        0,
                        n,
                        op::BLOCK_STATUS,
                        0,
                        *offset,
                        *len,
                        lease.offset(),
                        cap as u64,
                    ))
                    .await?;
                self.expect_unit(&cqe)?;
                let extents = decode_extents(lease.bytes(), cqe.aux as usize, *len, false)
                    .ok_or_else(|| self.fail("bad extents"))?;
                Ok(Done::Extents(extents))
            }
            Req::Info => {
                let cqe = self.submit(Sqe::new(0, n, op::INFO, 0, 0, 0, 0, 0)).await?;
                match cqe.status {
                    status::OK if cqe.aux <= 1 => Ok(Done::Info {
                        size: cqe.value,
                        read_only: cqe.aux == 1,
                    }),
                    status::OK => Err(self.fail("bad info completion")),
                    _ => {
                        Err(error_of(&cqe)
                            .unwrap_or_else(|| self.fail("unknown completion status")))
                    }
                }
            }
        }
    }

    /// A buffer in this channel's pool (see [`BlockIo::alloc_buffer`]).
    pub fn alloc_buffer(&self, len: usize) -> Option<IoBuffer> {
        if len == 0 || len > MAX_IO_PAYLOAD {
            return None;
        }
        self.pool.try_lease(len).map(Lease::into_buffer)
    }
}

fn payload_len(len: usize) -> IoResult<u64> {
    if len > MAX_IO_PAYLOAD {
        return Err(IoError::Invalid);
    }
    Ok(len as u64)
}

/// How long a request waits for a replacement of a dead serving worker before it
/// fails. The supervisor restarts a worker within its backoff (at most a few seconds);
/// clients such as QEMU's NBD client with `reconnect-delay` wait about as long.
pub const RESUBMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection to one serving worker across its restarts.
///
/// Each incarnation of the serving worker gets a new channel (a new memfd) with a
/// higher generation. The supervisor attaches the new channel only after the old
/// process has been reaped, so a request resubmitted on a newer generation can never
/// race a stale copy of it still running in the dead worker: that is the fence.
#[derive(Debug)]
pub struct Peer {
    state: tokio::sync::watch::Sender<Option<(u64, Arc<DataClient>)>>,
}

impl Default for Peer {
    fn default() -> Peer {
        Peer {
            state: tokio::sync::watch::Sender::new(None),
        }
    }
}

impl Peer {
    /// A peer with no channel yet.
    pub fn new() -> Arc<Peer> {
        Arc::new(Peer::default())
    }

    /// Installs the channel to incarnation `generation`. Older generations are ignored.
    pub fn attach(&self, generation: u64, client: Arc<DataClient>) {
        self.state.send_if_modified(|cur| match cur {
            Some((g, _)) if *g >= generation => false,
            _ => {
                *cur = Some((generation, client));
                true
            }
        });
    }

    fn usable(
        s: &Option<(u64, Arc<DataClient>)>,
        min_generation: u64,
    ) -> Option<(u64, Arc<DataClient>)> {
        match s {
            Some((g, c)) if *g >= min_generation && !c.is_closed() => Some((*g, Arc::clone(c))),
            _ => None,
        }
    }

    /// The current channel, waiting (up to [`RESUBMIT_TIMEOUT`]) for one whose
    /// generation is at least `min_generation`.
    async fn client(&self, min_generation: u64) -> IoResult<(u64, Arc<DataClient>)> {
        if let Some(c) = Peer::usable(&self.state.borrow(), min_generation) {
            return Ok(c);
        }
        let mut rx = self.state.subscribe();
        let wait = rx.wait_for(|s| Peer::usable(s, min_generation).is_some());
        match tokio::time::timeout(RESUBMIT_TIMEOUT, wait).await {
            Ok(Ok(s)) => Peer::usable(&s, min_generation).ok_or(IoError::Disconnected),
            _ => Err(IoError::Disconnected),
        }
    }

    /// Runs a request, resubmitting it to the next incarnation if the serving worker
    /// dies before answering.
    async fn call(&self, node: NodeId, req: &mut Req<'_>) -> IoResult<Done> {
        let mut min_generation = 0;
        loop {
            let (generation, client) = self.client(min_generation).await?;
            match client.execute(node, req).await {
                Err(IoError::Disconnected) => {
                    tracing::info!(
                        node = node.0,
                        generation,
                        "serving worker gone; resubmitting to its replacement"
                    );
                    min_generation = generation + 1;
                }
                other => return other,
            }
        }
    }

    /// Opens a handle on `node`, served by this peer.
    pub async fn node(self: &Arc<Self>, node: NodeId) -> Result<RemoteNode, IoError> {
        match self.call(node, &mut Req::Info).await? {
            Done::Info { size, read_only } => Ok(RemoteNode {
                peer: Arc::clone(self),
                node,
                size: AtomicU64::new(size),
                read_only,
            }),
            _ => Err(IoError::Invalid),
        }
    }
}

/// A node served by another worker, reached through a [`Peer`].
#[derive(Debug)]
pub struct RemoteNode {
    peer: Arc<Peer>,
    node: NodeId,
    size: AtomicU64,
    read_only: bool,
}

impl RemoteNode {
    /// Re-reads the node's size (after a resize).
    pub async fn refresh(&self) -> IoResult<u64> {
        match self.peer.call(self.node, &mut Req::Info).await? {
            Done::Info { size, .. } => {
                self.size.store(size, Ordering::Release);
                Ok(size)
            }
            _ => Err(IoError::Invalid),
        }
    }

    async fn unit(&self, mut req: Req<'_>) -> IoResult<()> {
        match self.peer.call(self.node, &mut req).await? {
            Done::Unit => Ok(()),
            _ => Err(IoError::Invalid),
        }
    }
}

impl BlockIo for RemoteNode {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn refresh(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { RemoteNode::refresh(self).await.map(|_| ()) })
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(self.unit(Req::Read { offset, buf }))
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(self.unit(Req::Write {
            offset,
            buf,
            fua: flags.fua,
        }))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.unit(Req::WriteZeroes { offset, len, flags }))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.unit(Req::Discard { offset, len }))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.unit(Req::Flush))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            match self
                .peer
                .call(self.node, &mut Req::BlockStatus { offset, len })
                .await?
            {
                Done::Extents(e) => Ok(e),
                _ => Err(IoError::Invalid),
            }
        })
    }

    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        Box::pin(async move {
            let mut req = Req::ReadSparse { offset, buf };
            match self.peer.call(self.node, &mut req).await {
                Ok(Done::Sparse(r)) => r,
                Ok(_) => Err(SparseReadError::Read(IoError::Invalid)),
                Err(e) => Err(SparseReadError::Read(e)),
            }
        })
    }

    fn alloc_buffer(&self, len: usize) -> Option<IoBuffer> {
        let state = self.peer.state.borrow();
        let (_, client) = state.as_ref()?;
        if client.is_closed() {
            return None;
        }
        client.alloc_buffer(len)
    }
}

// ---------------------------------------------------------------------------------
// Server.

/// How the serving side finds the nodes it serves.
pub trait NodeLookup: Send + Sync + 'static {
    /// The node with this id, if this worker has it.
    fn lookup(&self, node: NodeId) -> Option<Arc<dyn BlockIo>>;
}

/// The extent buffer of a sparse read (empty for other ops).
fn aux_range(sqe: &Sqe) -> (u64, u64) {
    if sqe.op == op::READ_SPARSE {
        (sqe.aux_off, EXTENT_BUFFER as u64)
    } else {
        (0, 0)
    }
}

/// Whether two non-empty pool ranges share a byte.
fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// Server state shared by the ring loop and the request tasks it spawns.
struct Server {
    region: Arc<Region>,
    cq: Mutex<Producer<Cqe>>,
    cq_bell: OwnedFd,
    /// Pool ranges of the requests running now: a new request may not overlap one,
    /// so no two mutable slices of the pool ever alias in this process.
    busy: Mutex<Vec<(u64, u64)>>,
    inflight: AtomicU32,
    /// A completion could not be posted (the client broke the ring): stop serving.
    broken: AtomicBool,
    broken_notify: Notify,
}

impl Server {
    /// Posts completions; wakes the client if it sleeps.
    fn post(&self, cqes: &[Cqe]) {
        if cqes.is_empty() {
            return;
        }
        let wake = {
            let mut cq = mutex(&self.cq);
            for c in cqes {
                if let Err(e) = cq.push(*c) {
                    tracing::warn!(error = %e, "cannot post a completion");
                    self.broken.store(true, Ordering::Release);
                    self.broken_notify.notify_waiters();
                    return;
                }
            }
            cq.publish()
        };
        self.inflight.fetch_sub(cqes.len() as u32, Ordering::AcqRel);
        if wake {
            ring_bell(self.cq_bell.as_fd());
        }
    }

    fn release(&self, ranges: [(u64, u64); 2]) {
        let mut busy = mutex(&self.busy);
        for range in ranges {
            if range.1 == 0 {
                continue;
            }
            if let Some(i) = busy.iter().position(|r| *r == range) {
                busy.swap_remove(i);
            }
        }
    }

    /// Checks one descriptor. `Ok(None)`: well-formed, run it. `Err`: a violation.
    fn validate(&self, sqe: &Sqe) -> Result<(), DataError> {
        let bad = |what: &str| Err(violation(format!("{what} in {sqe:?}")));
        let allowed_flags = match sqe.op {
            op::WRITE => flag::FUA,
            op::WRITE_ZEROES => flag::ALL,
            op::READ | op::READ_SPARSE | op::DISCARD | op::FLUSH | op::BLOCK_STATUS | op::INFO => 0,
            _ => return bad("unknown op"),
        };
        if sqe.flags & !allowed_flags != 0 {
            return bad("flags");
        }
        if sqe.offset.checked_add(sqe.len).is_none() {
            return bad("range overflow");
        }
        match sqe.op {
            op::READ | op::WRITE | op::READ_SPARSE => {
                if sqe.len > MAX_IO_PAYLOAD as u64 || sqe.buf_len != sqe.len {
                    return bad("payload length");
                }
            }
            op::BLOCK_STATUS => {
                if sqe.buf_len < EXTENT_BYTES as u64 || sqe.buf_len > EXTENT_BUFFER as u64 {
                    return bad("extent buffer length");
                }
            }
            _ => {
                if sqe.buf_len != 0 || sqe.buf_off != 0 {
                    return bad("buffer on an op without payload");
                }
            }
        }
        if !self.region.pool_contains(sqe.buf_off, sqe.buf_len) {
            return bad("buffer outside the pool");
        }
        let aux = aux_range(sqe);
        if sqe.op == op::READ_SPARSE {
            if !self.region.pool_contains(aux.0, aux.1) {
                return bad("extent buffer outside the pool");
            }
            if overlaps(aux, (sqe.buf_off, sqe.buf_len)) {
                return bad("extent buffer overlapping the data buffer");
            }
        } else if sqe.aux_off != 0 {
            return bad("extent buffer on an op without one");
        }
        let mut busy = mutex(&self.busy);
        for r in [(sqe.buf_off, sqe.buf_len), aux] {
            if r.1 > 0 && busy.iter().any(|&b| overlaps(b, r)) {
                return bad("buffer overlapping a request in flight");
            }
        }
        for r in [(sqe.buf_off, sqe.buf_len), aux] {
            if r.1 > 0 {
                busy.push(r);
            }
        }
        Ok(())
    }

    #[allow(clippy::mut_from_ref)] // exclusivity is enforced by `busy`, not by borrows
    fn pool_slice(&self, off: u64, len: u64) -> &mut [u8] {
        // SAFETY: `validate` checked the range lies in the pool and overlaps no other
        // request running here; it stays reserved until `release`, which runs after
        // the last use of this slice. The client is another process: its concurrent
        // writes can change the bytes, never our memory safety.
        unsafe {
            std::slice::from_raw_parts_mut(self.region.pool_ptr().add(off as usize), len as usize)
        }
    }
}

async fn run_request(server: Arc<Server>, node: Option<Arc<dyn BlockIo>>, sqe: Sqe) -> Cqe {
    let ranges = [(sqe.buf_off, sqe.buf_len), aux_range(&sqe)];
    let cqe = match node {
        None => Cqe::new(sqe.tag, status::INVALID, 0, 0),
        Some(node) => execute(&server, node.as_ref(), &sqe).await,
    };
    server.release(ranges);
    cqe
}

async fn execute(server: &Server, node: &dyn BlockIo, sqe: &Sqe) -> Cqe {
    let unit = |r: IoResult<()>| match r {
        Ok(()) => Cqe::new(sqe.tag, status::OK, 0, 0),
        Err(e) => {
            let (s, v) = status_of(&e);
            Cqe::new(sqe.tag, s, v, 0)
        }
    };
    match sqe.op {
        op::READ => {
            let buf = server.pool_slice(sqe.buf_off, sqe.buf_len);
            unit(node.read(sqe.offset, buf).await)
        }
        op::WRITE => {
            let buf = server.pool_slice(sqe.buf_off, sqe.buf_len);
            let flags = WriteFlags {
                fua: sqe.flags & flag::FUA != 0,
            };
            unit(node.write(sqe.offset, buf, flags).await)
        }
        op::WRITE_ZEROES => {
            let flags = ZeroFlags {
                fua: sqe.flags & flag::FUA != 0,
                may_unmap: sqe.flags & flag::MAY_UNMAP != 0,
                no_fallback: sqe.flags & flag::NO_FALLBACK != 0,
            };
            unit(node.write_zeroes(sqe.offset, sqe.len, flags).await)
        }
        op::DISCARD => unit(node.discard(sqe.offset, sqe.len).await),
        op::FLUSH => unit(node.flush().await),
        op::BLOCK_STATUS => match node.block_status(sqe.offset, sqe.len).await {
            Ok(extents) => {
                let buf = server.pool_slice(sqe.buf_off, sqe.buf_len);
                match encode_extents(&extents, buf) {
                    0 => Cqe::new(sqe.tag, status::INVALID, 0, 0),
                    count => Cqe::new(sqe.tag, status::OK, 0, count),
                }
            }
            Err(e) => unit(Err(e)),
        },
        op::READ_SPARSE => {
            let buf = server.pool_slice(sqe.buf_off, sqe.buf_len);
            let failed = |stage: u32, e: IoError| {
                let (s, v) = status_of(&e);
                Cqe::new(sqe.tag, s, v, stage)
            };
            let mut extents = match node.read_sparse(sqe.offset, buf).await {
                Ok(e) => e,
                Err(SparseReadError::Status(e)) => return failed(1, e),
                Err(SparseReadError::Read(e)) => return failed(2, e),
            };
            let total: u64 = extents.iter().map(|e| e.length).sum();
            if total != sqe.len || extents.iter().any(|e| e.length == 0) {
                return failed(1, IoError::Os(libc::EIO));
            }
            if extents.len() > MAX_EXTENTS {
                // Too fragmented for one completion: report the tail as one data run
                // (always correct: data may be zeroes) and read it whole.
                let tail_start: u64 = extents[..MAX_EXTENTS - 1].iter().map(|e| e.length).sum();
                let depth = extents[MAX_EXTENTS - 1].depth;
                extents.truncate(MAX_EXTENTS - 1);
                extents.push(Extent {
                    length: sqe.len - tail_start,
                    data: true,
                    zero: false,
                    depth,
                });
                let tail = &mut server.pool_slice(sqe.buf_off, sqe.buf_len)[tail_start as usize..];
                if let Err(e) = node.read(sqe.offset + tail_start, tail).await {
                    return failed(2, e);
                }
            }
            let count = encode_extents(
                &extents,
                server.pool_slice(sqe.aux_off, EXTENT_BUFFER as u64),
            );
            Cqe::new(sqe.tag, status::OK, 0, count)
        }
        _ => Cqe::new(
            sqe.tag,
            status::OK,
            node.size(),
            u32::from(node.read_only()),
        ),
    }
}

/// Serves requests arriving on the channel until the client goes away or breaks the
/// protocol (then the error says how).
pub async fn serve(
    fds: ChannelFds,
    layout: RingLayout,
    nodes: Arc<dyn NodeLookup>,
) -> Result<(), DataError> {
    let region = Arc::new(Region::map(fds.region.as_fd(), layout)?);
    let mut sq = region.sq_consumer();
    let bell = async_fd(fds.sq_bell)?;
    let live = stream(fds.liveness)?;
    let server = Arc::new(Server {
        cq: Mutex::new(region.cq_producer()),
        region,
        cq_bell: fds.cq_bell,
        busy: Mutex::new(Vec::new()),
        inflight: AtomicU32::new(0),
        broken: AtomicBool::new(false),
        broken_notify: Notify::new(),
    });
    let entries = layout.entries;
    let spin = ring::server_spin();
    let mut batch = Vec::with_capacity(entries as usize);
    let mut done = Vec::with_capacity(entries as usize);
    let mut last_batch = 0;
    loop {
        if server.broken.load(Ordering::Acquire) {
            return Err(violation("completion ring overrun"));
        }
        batch.clear();
        sq.drain(&mut batch)?;
        for sqe in &batch {
            if server.inflight.load(Ordering::Acquire) >= entries {
                return Err(violation("more requests in flight than ring entries"));
            }
            server.validate(sqe)?;
            server.inflight.fetch_add(1, Ordering::AcqRel);
            let node = nodes.lookup(NodeId(sqe.node));
            let mut fut = Box::pin(run_request(Arc::clone(&server), node, *sqe));
            match poll_once(&mut fut) {
                Some(cqe) => done.push(cqe),
                None => {
                    let s = Arc::clone(&server);
                    tokio::spawn(async move {
                        let cqe = fut.await;
                        s.post(&[cqe]);
                    });
                }
            }
        }
        // One publish (and at most one wake-up) for everything that finished inline.
        server.post(&done);
        done.clear();
        if !batch.is_empty() {
            last_batch = batch.len();
            continue;
        }
        // Spin only when idle (requests running in spawned tasks, such as file I/O,
        // need this thread to post their completions and must not wait for the spin
        // to end) and for a client at queue depth 1 (its depth hint, and a lone
        // request in the last batch): its next request comes soon and finds us awake.
        // Deeper queues submit in bursts and are better served by the CPU a spin
        // would take from them on a small machine.
        if last_batch == 1
            && server.region.depth_hint().load(Ordering::Relaxed) <= 1
            && server.inflight.load(Ordering::Acquire) == 0
            && ring::spin_until(spin, || sq.has_work())
        {
            continue;
        }
        if !sq.prepare_sleep() {
            continue;
        }
        let broken = server.broken_notify.notified();
        tokio::select! {
            r = wait_bell(&bell) => r?,
            _ = wait_gone(&live) => return Ok(()),
            _ = broken => {},
        }
        sq.woke();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny in-memory node for channel tests. Reads at `STUCK` never complete.
    struct Mem(Mutex<Vec<u8>>);

    const STUCK: u64 = 1 << 40;

    impl BlockIo for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
            Box::pin(async move {
                if offset == STUCK {
                    std::future::pending::<()>().await;
                }
                let d = self.0.lock().unwrap();
                let end = offset as usize + buf.len();
                if end > d.len() {
                    return Err(IoError::OutOfRange);
                }
                buf.copy_from_slice(&d[offset as usize..end]);
                Ok(())
            })
        }
        fn write<'a>(&'a self, offset: u64, buf: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
            Box::pin(async move {
                // Yield once, so writes complete from a spawned task, not inline.
                tokio::task::yield_now().await;
                let mut d = self.0.lock().unwrap();
                d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
                Ok(())
            })
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
            Box::pin(async { Err(IoError::Unsupported) })
        }
        fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            Box::pin(async { Err(IoError::Os(libc::ENOSPC)) })
        }
        fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
            Box::pin(async move {
                let half = len / 2;
                Ok(vec![
                    Extent {
                        length: half,
                        data: true,
                        zero: false,
                        depth: 1,
                    },
                    Extent {
                        length: len - half,
                        data: false,
                        zero: offset == 0,
                        depth: 0,
                    },
                ])
            })
        }
    }

    struct One(Arc<dyn BlockIo>);
    impl NodeLookup for One {
        fn lookup(&self, node: NodeId) -> Option<Arc<dyn BlockIo>> {
            (node == NodeId(1)).then(|| Arc::clone(&self.0))
        }
    }

    fn small() -> RingLayout {
        RingLayout {
            entries: 8,
            pool_bytes: 4 * CHUNK as u64,
        }
    }

    fn ends(layout: RingLayout) -> (ChannelFds, ChannelFds) {
        NewChannel::create(layout).unwrap().into_ends().unwrap()
    }

    fn mem(size: usize) -> Arc<dyn BlockIo> {
        Arc::new(Mem(Mutex::new(vec![0; size])))
    }

    /// A served channel: the server task and a peer attached at generation 1.
    fn served(
        layout: RingLayout,
        node: Arc<dyn BlockIo>,
    ) -> (Arc<Peer>, tokio::task::JoinHandle<Result<(), DataError>>) {
        let (s, c) = ends(layout);
        let server = tokio::spawn(serve(s, layout, Arc::new(One(node))));
        let peer = Peer::new();
        peer.attach(1, DataClient::spawn(c, layout).unwrap());
        (peer, server)
    }

    fn remote(peer: &Arc<Peer>, size: u64) -> RemoteNode {
        RemoteNode {
            peer: Arc::clone(peer),
            node: NodeId(1),
            size: AtomicU64::new(size),
            read_only: false,
        }
    }

    fn client_of(peer: &Peer) -> Arc<DataClient> {
        peer.state.borrow().as_ref().unwrap().1.clone()
    }

    #[tokio::test]
    async fn a_remote_node_reads_back_what_it_wrote_and_reports_errors() {
        let (peer, _server) = served(small(), mem(1 << 20));
        let node = peer.node(NodeId(1)).await.unwrap();
        assert_eq!(node.size(), 1 << 20);
        // 200 000 bytes span four pool chunks (copy path: the Vec is not in the pool).
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        node.write(4096, &data, WriteFlags::default())
            .await
            .unwrap();
        let mut back = vec![0u8; data.len()];
        node.read(4096, &mut back).await.unwrap();
        assert_eq!(back, data);
        let mut past = vec![0u8; 10];
        assert_eq!(
            node.read(1 << 20, &mut past).await,
            Err(IoError::OutOfRange)
        );
        assert_eq!(
            node.write_zeroes(0, 1, ZeroFlags::default()).await,
            Err(IoError::Unsupported)
        );
        assert_eq!(node.flush().await, Err(IoError::Os(libc::ENOSPC)));
        assert_eq!(node.discard(0, 512).await, Ok(()));
        assert_eq!(
            node.block_status(0, 1000).await,
            Ok(vec![
                Extent {
                    length: 500,
                    data: true,
                    zero: false,
                    depth: 1
                },
                Extent {
                    length: 500,
                    data: false,
                    zero: true,
                    depth: 0
                },
            ])
        );
        assert_eq!(peer.node(NodeId(2)).await.unwrap_err(), IoError::Invalid);
        // Too large for this test's 256 KiB pool: refused, channel still fine.
        let mut huge = vec![0u8; 5 * CHUNK];
        assert_eq!(node.read(0, &mut huge).await, Err(IoError::Invalid));
        assert_eq!(node.read(0, &mut past).await, Ok(()));
    }

    /// Resident pages of the mapping that contains `ptr` (from /proc/self/smaps).
    fn resident_kib_of(ptr: *const u8) -> u64 {
        let addr = ptr as u64;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&addr);
            } else if inside && let Some(kib) = line.strip_prefix("Rss:") {
                return kib.trim().trim_end_matches(" kB").trim().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[tokio::test]
    async fn an_idle_pool_gives_its_pages_back_but_never_a_leased_or_pinned_chunk() {
        let (peer, _server) = served(small(), mem(1 << 20));
        let client = client_of(&peer);
        let pool = Arc::clone(&client.pool);
        let mut kept = pool.try_lease(CHUNK).unwrap();
        kept.bytes_mut().fill(0xAA);
        let mut pinned = pool.try_lease(CHUNK).unwrap();
        pinned.bytes_mut().fill(0xBB);
        pool.pin(pinned.offset(), CHUNK as u64);
        let pinned_off = pinned.offset();
        drop(pinned);
        let mut freed = pool.try_lease(2 * CHUNK).unwrap();
        freed.bytes_mut().fill(0xCC);
        let freed_off = freed.offset() as usize;
        drop(freed);
        let before = resident_kib_of(pool.region.pool_ptr());
        let mut seen = 0;
        // The first tick sees leases since the last one: not idle, nothing released.
        assert_eq!(pool.trim_if_idle(&mut seen), 0);
        assert_eq!(pool.trim_if_idle(&mut seen), 2);
        assert_eq!(pool.trim_if_idle(&mut seen), 0, "already released");
        let after = resident_kib_of(pool.region.pool_ptr());
        assert!(
            after + 2 * CHUNK as u64 / 1024 <= before,
            "{before} KiB resident before, {after} after"
        );
        // SAFETY: test-only look at chunks nobody leases now.
        let view = |off: usize| unsafe { *pool.region.pool_ptr().add(off) };
        assert_eq!(view(freed_off), 0, "a released chunk reads as zeroes");
        assert_eq!(view(pinned_off as usize), 0xBB, "pinned chunk untouched");
        assert!(
            kept.bytes().iter().all(|&b| b == 0xAA),
            "leased chunk untouched"
        );
        // Once its request completes, the pinned chunk is free and goes next time.
        pool.unpin(pinned_off, CHUNK as u64);
        assert_eq!(pool.trim_if_idle(&mut seen), 1);
        // A new lease makes the pool busy again for one tick.
        drop(pool.try_lease(CHUNK).unwrap());
        assert_eq!(pool.trim_if_idle(&mut seen), 0);
    }

    /// Submissions made while others are in flight are published together by the
    /// first of them after a yield; if that submitter is cancelled meanwhile, its
    /// guard still publishes, so the requests that relied on it complete.
    #[tokio::test]
    async fn a_burst_is_published_once_even_if_its_publisher_is_cancelled() {
        let (peer, _server) = served(small(), mem(1 << 20));
        let node = peer.node(NodeId(1)).await.unwrap();
        let client = client_of(&peer);
        node.write(0, &[7u8; 4096], WriteFlags::default())
            .await
            .unwrap();
        let (mut a, mut b, mut c) = (vec![0u8; 512], vec![0u8; 512], vec![0u8; 512]);
        let mut ra = node.read(0, &mut a);
        let mut rb = node.read(512, &mut b);
        let mut rc = node.read(1024, &mut c);
        // A alone in flight: published at once. B: the burst's publisher, waiting
        // for its yield. C: pushed, left for B to publish.
        assert!(poll_once(&mut ra).is_none());
        assert!(poll_once(&mut rb).is_none());
        assert!(poll_once(&mut rc).is_none());
        let published = || {
            let sq = mutex(&client.sq);
            sq.publisher
        };
        assert!(published(), "B holds the publisher role");
        drop(rb);
        assert!(!published(), "dropping B published the burst");
        tokio::time::timeout(Duration::from_secs(10), async {
            ra.await.unwrap();
            rc.await.unwrap();
        })
        .await
        .expect("A and C complete");
        assert_eq!((a[0], c[0]), (7, 7));
    }

    #[tokio::test]
    async fn a_pool_buffer_is_used_in_place_and_returned_when_dropped() {
        let (peer, _server) = served(small(), mem(1 << 20));
        let node = peer.node(NodeId(1)).await.unwrap();
        let client = client_of(&peer);
        let mut buf = node.alloc_buffer(3 * CHUNK).unwrap();
        assert_eq!(buf.len(), 3 * CHUNK);
        assert!(
            client
                .region
                .pool_offset_of(buf.as_ptr(), buf.len())
                .is_some()
        );
        // Only one chunk is left now.
        assert!(node.alloc_buffer(2 * CHUNK).is_none());
        buf.fill(0x5a);
        node.write(0, &buf[100..CHUNK + 100], WriteFlags::default())
            .await
            .unwrap();
        buf.fill(0);
        node.read(0, &mut buf[..CHUNK]).await.unwrap();
        assert!(buf[..CHUNK].iter().all(|&b| b == 0x5a));
        drop(buf);
        assert!(node.alloc_buffer(4 * CHUNK).is_some());
    }

    #[tokio::test]
    async fn a_sparse_read_fills_only_data_runs_in_one_round_trip() {
        let (peer, _server) = served(small(), mem(1 << 20));
        let node = peer.node(NodeId(1)).await.unwrap();
        node.write(0, &[3u8; 1000], WriteFlags::default())
            .await
            .unwrap();
        let expect = vec![
            Extent {
                length: 500,
                data: true,
                zero: false,
                depth: 1,
            },
            Extent {
                length: 500,
                data: false,
                zero: true,
                depth: 0,
            },
        ];
        // Copy path (a Vec): the hole half keeps what the caller had.
        let mut v = vec![0xeeu8; 1000];
        assert_eq!(node.read_sparse(0, &mut v).await, Ok(expect.clone()));
        assert_eq!(&v[..500], &[3u8; 500][..]);
        assert_eq!(&v[500..], &[0xeeu8; 500][..]);
        // In place.
        let mut b = node.alloc_buffer(1000).unwrap();
        b.fill(0xee);
        assert_eq!(node.read_sparse(0, &mut b).await, Ok(expect));
        assert_eq!(&b[..500], &[3u8; 500][..]);
        assert_eq!(&b[500..], &[0xeeu8; 500][..]);
        // Errors keep their stage.
        let mut past = vec![0u8; 16];
        assert_eq!(
            node.read_sparse(1 << 20, &mut past).await,
            Err(SparseReadError::Read(IoError::OutOfRange))
        );
    }

    #[tokio::test]
    async fn more_requests_than_ring_entries_wait_for_slots_and_all_complete() {
        let (peer, _server) = served(small(), mem(1 << 20));
        let node = Arc::new(peer.node(NodeId(1)).await.unwrap());
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let node = Arc::clone(&node);
            tasks.push(tokio::spawn(async move {
                let data = [i as u8; 512];
                node.write(i * 512, &data, WriteFlags::default()).await?;
                let mut back = [0u8; 512];
                node.read(i * 512, &mut back).await?;
                Ok::<_, IoError>(back == data)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(true));
        }
        assert_eq!(client_of(&peer).inflight.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_stuck_request_times_out_without_holding_up_the_others() {
        let layout = small();
        let (s, c) = ends(layout);
        tokio::spawn(serve(s, layout, Arc::new(One(mem(1 << 20)))));
        let peer = Peer::new();
        let options = ClientOptions {
            timeout: Duration::from_millis(300),
        };
        peer.attach(1, DataClient::spawn_with(c, layout, options).unwrap());
        let node = Arc::new(remote(&peer, 1 << 20));
        let stuck = {
            let node = Arc::clone(&node);
            tokio::spawn(async move {
                let mut buf = node.alloc_buffer(512).unwrap();
                node.read(STUCK, &mut buf).await
            })
        };
        for _ in 0..20 {
            let mut buf = [1u8; 512];
            assert_eq!(node.read(0, &mut buf).await, Ok(()));
        }
        assert_eq!(stuck.await.unwrap(), Err(IoError::Os(libc::ETIMEDOUT)));
        // The timed-out request still holds its ring slot and pool chunk (the server
        // may yet write there); the channel keeps working.
        assert_eq!(client_of(&peer).inflight.load(Ordering::Acquire), 1);
        assert!(node.alloc_buffer(4 * CHUNK).is_none());
        let mut buf = [1u8; 512];
        assert_eq!(node.read(0, &mut buf).await, Ok(()));
    }

    #[tokio::test]
    async fn a_silent_peer_makes_requests_time_out() {
        let layout = small();
        let (_s, c) = ends(layout);
        let options = ClientOptions {
            timeout: Duration::from_millis(200),
        };
        let peer = Peer::new();
        peer.attach(1, DataClient::spawn_with(c, layout, options).unwrap());
        let node = remote(&peer, 4096);
        let mut buf = [0u8; 16];
        assert_eq!(
            node.read(0, &mut buf).await,
            Err(IoError::Os(libc::ETIMEDOUT))
        );
    }

    /// Writes raw submissions into a channel, as a hostile client would.
    async fn server_verdict(sqe: Sqe) -> Result<(), DataError> {
        let layout = small();
        let (s, c) = ends(layout);
        let server = tokio::spawn(serve(s, layout, Arc::new(One(mem(1 << 20)))));
        let region = Arc::new(Region::map(c.region.as_fd(), layout).unwrap());
        let mut sq = region.sq_producer();
        sq.push(sqe).unwrap();
        if sq.publish() {
            ring_bell(c.sq_bell.as_fd());
        }
        let verdict = tokio::time::timeout(Duration::from_secs(5), server).await;
        drop(c);
        verdict.unwrap().unwrap()
    }

    #[tokio::test]
    async fn the_server_rejects_malformed_descriptors() {
        let pool = small().pool_bytes;
        let cases = [
            ("unknown op", Sqe::new(1, 1, 99, 0, 0, 0, 0, 0)),
            ("flags", Sqe::new(1, 1, op::READ, flag::FUA, 0, 512, 0, 512)),
            (
                "payload length",
                Sqe::new(
                    1,
                    1,
                    op::READ,
                    0,
                    0,
                    (MAX_IO_PAYLOAD + 1) as u64,
                    0,
                    (MAX_IO_PAYLOAD + 1) as u64,
                ),
            ),
            (
                "payload length",
                Sqe::new(1, 1, op::WRITE, 0, 0, 512, 0, 1024),
            ),
            (
                "buffer outside the pool",
                Sqe::new(1, 1, op::READ, 0, 0, 512, pool - 256, 512),
            ),
            (
                "buffer outside the pool",
                Sqe::new(1, 1, op::WRITE, 0, 0, 512, u64::MAX - 10, 512),
            ),
            (
                "range overflow",
                Sqe::new(1, 1, op::DISCARD, 0, u64::MAX, 2, 0, 0),
            ),
            (
                "buffer on an op without payload",
                Sqe::new(1, 1, op::FLUSH, 0, 0, 0, 0, 512),
            ),
            (
                "extent buffer on an op without one",
                Sqe::new(1, 1, op::READ, 0, 0, 512, 0, 512).with_aux(CHUNK as u64),
            ),
            (
                "extent buffer outside the pool",
                Sqe::new(1, 1, op::READ_SPARSE, 0, 0, 512, 0, 512).with_aux(pool - 512),
            ),
            (
                "extent buffer overlapping the data buffer",
                Sqe::new(1, 1, op::READ_SPARSE, 0, 0, 4096, 0, 4096).with_aux(1024),
            ),
            (
                "extent buffer length",
                Sqe::new(1, 1, op::BLOCK_STATUS, 0, 0, 512, 0, 8),
            ),
        ];
        for (what, sqe) in cases {
            match server_verdict(sqe).await {
                Err(DataError::Ring(RingError::Violation(m))) => {
                    assert!(m.starts_with(what), "{what}: {m}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_server_rejects_overlapping_buffers_in_flight() {
        let layout = small();
        let (s, c) = ends(layout);
        let server = tokio::spawn(serve(s, layout, Arc::new(One(mem(1 << 20)))));
        let region = Arc::new(Region::map(c.region.as_fd(), layout).unwrap());
        let mut sq = region.sq_producer();
        // The first read never completes and keeps its range busy.
        sq.push(Sqe::new(1, 1, op::READ, 0, STUCK, 4096, 0, 4096))
            .unwrap();
        sq.push(Sqe::new(2, 1, op::WRITE, 0, 0, 512, 1024, 512))
            .unwrap();
        if sq.publish() {
            ring_bell(c.sq_bell.as_fd());
        }
        match tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
        {
            Err(DataError::Ring(RingError::Violation(m))) => {
                assert!(m.starts_with("buffer overlapping"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_completion_for_a_tag_never_issued_closes_the_channel() {
        let layout = small();
        let (s, c) = ends(layout);
        let peer = Peer::new();
        peer.attach(1, DataClient::spawn(c, layout).unwrap());
        let node = remote(&peer, 4096);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            node.read(0, &mut buf).await
        });
        // A hostile server answers with a tag the client never used.
        let region = Arc::new(Region::map(s.region.as_fd(), layout).unwrap());
        let mut cq = region.cq_producer();
        cq.push(Cqe::new(0xdead_0000_0003, status::OK, 0, 0))
            .unwrap();
        let _ = cq.publish();
        ring_bell(s.cq_bell.as_fd());
        // The channel closes; the read waits for a newer generation, which a
        // replacement server provides.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(client_of(&peer).is_closed());
        let (s2, c2) = ends(layout);
        let mut m = vec![0u8; 4096];
        m[..16].fill(9);
        tokio::spawn(serve(
            s2,
            layout,
            Arc::new(One(Arc::new(Mem(Mutex::new(m))))),
        ));
        peer.attach(2, DataClient::spawn(c2, layout).unwrap());
        assert_eq!(reader.await.unwrap(), Ok(()));
        drop(s);
    }

    #[tokio::test]
    async fn a_bad_extent_count_closes_the_channel() {
        let layout = small();
        let (s, c) = ends(layout);
        let peer = Peer::new();
        let client = DataClient::spawn(c, layout).unwrap();
        peer.attach(1, Arc::clone(&client));
        let node = remote(&peer, 4096);
        let status_task = tokio::spawn(async move { node.block_status(0, 4096).await });
        let region = Arc::new(Region::map(s.region.as_fd(), layout).unwrap());
        let mut sq = region.sq_consumer();
        let mut got = Vec::new();
        while got.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sq.drain(&mut got).unwrap();
        }
        let mut cq = region.cq_producer();
        cq.push(Cqe::new(got[0].tag, status::OK, 0, MAX_EXTENTS as u32 + 1))
            .unwrap();
        let _ = cq.publish();
        ring_bell(s.cq_bell.as_fd());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(client.is_closed());
        status_task.abort();
    }

    #[tokio::test]
    async fn a_request_to_a_dead_server_is_resubmitted_to_its_replacement() {
        let layout = small();
        let (s1, c1) = ends(layout);
        let peer = Peer::new();
        peer.attach(1, DataClient::spawn(c1, layout).unwrap());
        let node = remote(&peer, 4096);
        let writer = tokio::spawn(async move {
            let mut buf = node.alloc_buffer(16).unwrap();
            buf.fill(7);
            node.write(0, &buf, WriteFlags::default()).await?;
            buf.fill(0);
            node.read(0, &mut buf).await?;
            Ok::<_, IoError>(buf.to_vec())
        });
        // Generation 1 takes the write off the ring and dies without answering.
        let region = Arc::new(Region::map(s1.region.as_fd(), layout).unwrap());
        let mut sq = region.sq_consumer();
        let mut got = Vec::new();
        while got.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            sq.drain(&mut got).unwrap();
        }
        assert_eq!(got[0].op, op::WRITE);
        drop(s1);
        // An older generation is ignored; generation 2 gets the resubmitted write
        // (copied out of generation 1's pool) and the read after it.
        let (_s0, c0) = ends(layout);
        peer.attach(1, DataClient::spawn(c0, layout).unwrap());
        let (s2, c2) = ends(layout);
        tokio::spawn(serve(s2, layout, Arc::new(One(mem(4096)))));
        peer.attach(2, DataClient::spawn(c2, layout).unwrap());
        assert_eq!(writer.await.unwrap(), Ok(vec![7u8; 16]));
    }

    #[tokio::test]
    async fn a_client_that_goes_away_ends_the_server_cleanly() {
        let layout = small();
        let (s, c) = ends(layout);
        let server = tokio::spawn(serve(s, layout, Arc::new(One(mem(4096)))));
        drop(c);
        let r = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test]
    async fn a_channel_message_needs_exactly_four_descriptors() {
        let (a, _b) = crate::fd::stream_pair().unwrap();
        assert!(matches!(
            ChannelFds::from_vec(vec![a]),
            Err(DataError::Descriptors {
                expected: 4,
                got: 1
            })
        ));
    }
}

/// A micro-benchmark of the channel's own cost (run under callgrind to see where
/// instructions go): `cargo test --release -p bulkhead-ipc -- --ignored --nocapture
/// channel_round_trips`.
#[cfg(test)]
mod bench {
    use super::*;

    struct Zero;
    impl BlockIo for Zero {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read<'a>(&'a self, _: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
            Box::pin(async move {
                buf.fill(0);
                Ok(())
            })
        }
        fn write<'a>(&'a self, _: u64, _: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn block_status(&self, _: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
            Box::pin(async move {
                Ok(vec![Extent {
                    length: len,
                    data: true,
                    zero: false,
                    depth: 1,
                }])
            })
        }
    }

    struct Any(Arc<dyn BlockIo>);
    impl NodeLookup for Any {
        fn lookup(&self, _: NodeId) -> Option<Arc<dyn BlockIo>> {
            Some(Arc::clone(&self.0))
        }
    }

    #[test]
    #[ignore = "benchmark"]
    fn channel_round_trips() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let layout = RingLayout::default();
            let (s, c) = NewChannel::create(layout).unwrap().into_ends().unwrap();
            tokio::spawn(serve(s, layout, Arc::new(Any(Arc::new(Zero)))));
            let peer = Peer::new();
            peer.attach(1, DataClient::spawn(c, layout).unwrap());
            let node = peer.node(NodeId(1)).await.unwrap();
            let n: u64 = std::env::var("ROUNDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(20000);
            let start = std::time::Instant::now();
            for i in 0..n {
                let mut buf = node.alloc_buffer(4096).unwrap();
                node.read(i * 4096 % (1 << 30), &mut buf).await.unwrap();
            }
            let el = start.elapsed();
            println!(
                "{n} QD1 4 KiB reads in place: {:.2} us each",
                el.as_secs_f64() * 1e6 / n as f64
            );
            let start = std::time::Instant::now();
            let mut v = vec![0u8; 4096];
            for i in 0..n {
                node.read(i * 4096 % (1 << 30), &mut v).await.unwrap();
            }
            let el = start.elapsed();
            println!(
                "{n} QD1 4 KiB reads copied: {:.2} us each",
                el.as_secs_f64() * 1e6 / n as f64
            );
        });
    }
}
