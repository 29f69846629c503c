//! The client end of one channel: [`DataClient`].
//!
//! Submits descriptors, reaps completions and hands each to the request waiting for
//! it, and runs one watchdog per channel that times requests out and trims the pool.
//! Every completion is checked before it is believed (tag issued and pending, status,
//! extent count); a bad one closes the channel, and [`Peer`](super::Peer) resubmits
//! what was pending to the worker's next incarnation. A request's ring slot and pool
//! chunks stay reserved until the server answers it, even if the caller gave up,
//! because the server may still be writing there.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bulkhead_block::{Extent, IoBuffer, IoError, IoResult, MapRun, SparseReadError, ZeroFlags};
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::sync::{Notify, oneshot};

use super::channel::{ChannelFds, async_fd, ring_bell, stream, wait_bell, wait_gone};
use super::completion::{decode_extents, decode_map, error_of};
use super::pool::{Lease, Pool};
use super::{DataError, MAX_IO_PAYLOAD, mutex, violation};
use crate::ring::{
    self, Consumer, Cqe, EXTENT_BUFFER, Producer, Region, RingLayout, Sqe, flag, op, status,
};
use crate::wire::NodeId;

/// How long a request may wait (for a ring slot, pool space and its completion) before
/// it fails with `ETIMEDOUT`. The channel stays usable: a late completion is consumed
/// and the request's pool memory stays reserved until then.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest period of a client's watchdog, which also trims the pool: a pool idle for
/// one full tick gives its used pages back, so memory returns within half a second
/// of the last request.
const TICK_MAX: Duration = Duration::from_millis(250);

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

/// The client end of a data channel, shared by every [`RemoteNode`](super::RemoteNode) reached through it.
pub struct DataClient {
    region: Arc<Region>,
    sq: Mutex<SqState>,
    cq: Mutex<CqState>,
    sq_bell: OwnedFd,
    slots: Mutex<Slots>,
    /// Free ring slots (one permit each).
    tags: tokio::sync::Semaphore,
    inflight: AtomicU32,
    pub(super) pool: Arc<Pool>,
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
pub(super) enum Done {
    Unit,
    Extents(Vec<Extent>),
    Map(Vec<MapRun>),
    /// A sparse read's outcome as the server reported it.
    Sparse(Result<Vec<Extent>, SparseReadError>),
    Info {
        size: u64,
        read_only: bool,
    },
}

/// A request as the client side sees it, borrowing the caller's buffer.
pub(super) enum Req<'a> {
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
        compressed: bool,
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
    Map {
        offset: u64,
        len: u64,
    },
    Info,
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

    pub(super) async fn execute(&self, node: NodeId, req: &mut Req<'_>) -> IoResult<Done> {
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
            Req::Write {
                offset,
                buf,
                fua,
                compressed,
            } => {
                let len = payload_len(buf.len())?;
                let flags = if *fua { flag::FUA } else { 0 }
                    | if *compressed { flag::COMPRESSED } else { 0 };
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
            Req::Map { offset, len } => {
                let cap = EXTENT_BUFFER;
                let lease = self.pool.lease(cap, self.options.timeout).await?;
                let cqe = self
                    .submit(Sqe::new(
                        0,
                        n,
                        op::MAP,
                        0,
                        *offset,
                        *len,
                        lease.offset(),
                        cap as u64,
                    ))
                    .await?;
                self.expect_unit(&cqe)?;
                let runs = decode_map(lease.bytes(), cqe.aux as usize, *len)
                    .ok_or_else(|| self.fail("bad map runs"))?;
                Ok(Done::Map(runs))
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

    /// A buffer in this channel's pool (see [`BlockIo::alloc_buffer`](bulkhead_block::BlockIo::alloc_buffer)).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Peer;
    use crate::data::server::{poll_once, serve};
    use crate::data::test_util::*;
    use crate::ring::{CHUNK, MAX_EXTENTS};
    use bulkhead_block::{BlockIo, WriteFlags};

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
}
