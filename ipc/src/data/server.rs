//! The serving end of a channel: [`serve`] runs the ring loop of one channel in the
//! worker that has the nodes.
//!
//! Every descriptor the client writes is checked before it runs (op, flags, lengths,
//! buffer range inside the pool, and no overlap with a request still running, so no two
//! mutable slices of the pool ever alias here); a bad one ends the channel. Requests a
//! node finishes at once are answered inline, in one batch per wake-up; the rest run in
//! their own tasks.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bulkhead_block::{BlockIo, Extent, IoError, IoResult, SparseReadError, WriteFlags, ZeroFlags};
use tokio::sync::Notify;

use super::channel::{ChannelFds, async_fd, ring_bell, stream, wait_bell, wait_gone};
use super::completion::{encode_extents, encode_map, status_of};
use super::{DataError, MAX_EXTENTS, MAX_IO_PAYLOAD, mutex, violation};
use crate::ring::{
    self, Cqe, EXTENT_BUFFER, EXTENT_BYTES, Producer, Region, RingLayout, Sqe, flag, op, status,
};
use crate::wire::NodeId;

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
            op::WRITE => flag::FUA | flag::COMPRESSED,
            op::WRITE_ZEROES => flag::FUA | flag::MAY_UNMAP | flag::NO_FALLBACK,
            op::READ
            | op::READ_SPARSE
            | op::DISCARD
            | op::FLUSH
            | op::BLOCK_STATUS
            | op::INFO
            | op::MAP => 0,
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
            op::BLOCK_STATUS | op::MAP => {
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
            // Never `extend`: a client's write stays inside the node.
            let flags = WriteFlags {
                fua: sqe.flags & flag::FUA != 0,
                extend: false,
                compressed: sqe.flags & flag::COMPRESSED != 0,
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
        op::MAP => match node.map(sqe.offset, sqe.len).await {
            Ok(runs) => {
                let buf = server.pool_slice(sqe.buf_off, sqe.buf_len);
                match encode_map(&runs, buf) {
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

/// Polls `fut` once, outside any task's waker. A driver that completes synchronously
/// (null, errors, in-process raw windows) is done here, with no task spawned and no
/// wake-up; otherwise the caller spawns the future, whose next poll registers a real
/// waker.
pub(super) fn poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::Pin::new(fut).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::*;
    use crate::ring::{CHUNK, RingError};
    use std::time::Duration;

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
}
