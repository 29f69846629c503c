//! One client connection: handshake, then the transmission phase.
//!
//! Runs in the NBD export worker, one tokio task per connection plus one per
//! request in flight. Handles untrusted bytes: request headers and WRITE
//! payloads come straight from the client and are checked (magic, lengths,
//! flags, bounds) in [`Conn::receive`] before any I/O is started, in qsd's order
//! and with qsd's errno choices.
//!
//! A request travels like this: the connection task takes one of 16 in-flight
//! slots, reads its header (and payload) into a pooled or backend-lent buffer,
//! validates it and spawns a request task; it then goes straight back to reading.
//! The request task runs it through the generic executor (`bulkhead_export::exec`,
//! which calls the export's `BlockIo`), then sends the whole reply: small replies
//! that are ready together are copied into one output buffer and written with one
//! system call, large ones are written directly with one vectored write under the
//! connection's write lock. Replies go out as requests finish, in any order, never
//! interleaved. Buffers return to the pool.
//!
//! Layout: this file holds the connection's state and its task; [`parse`] reads and
//! checks requests (NBD wire), [`exec`] turns them into executor calls and picks
//! the reply, [`reply`] encodes and writes replies. The in-flight slots, buffer
//! budgets and buffers are the generic ones of `bulkhead_export::memory`.

mod exec;
mod parse;
mod reply;
mod spin;

use std::future::Future;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_block::ZeroFlags;
use bulkhead_block::posix::strerror;
use bulkhead_export::exec::{self as executor, Failed, Failure, Op, Run};
use bulkhead_export::{Buf, ConnBounds, Reservation};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::JoinSet;

use crate::handoff::HandOff;
use crate::handshake::{self, BitmapSet, Contexts, HandshakeError, Mode, Session};
use crate::proto::*;
use crate::server::{ConnectionSlot, Export, MAX_EXPORT_BITMAPS, Shared, signalled};

/// Read buffer size: big enough to batch many small request headers per syscall.
const READ_BUF: usize = 64 * 1024;
/// Read buffer size during negotiation: option headers are small, and up to a
/// thousand clients may be negotiating at once.
pub(crate) const HANDSHAKE_BUF: usize = 4 * 1024;
/// Most iovecs per writev (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// Request buffer memory one connection may hold at once (the generic bound).
pub use bulkhead_export::CONN_BUFFER_BYTES;

/// Runs one connection: negotiation, then the transmission phase, or, on a server
/// that hands clients off, returns what was negotiated with the socket halves and
/// the slot (to be released once the socket has been passed on).
pub(crate) async fn run<R, W>(
    shared: Arc<Shared>,
    slot: ConnectionSlot,
    r: R,
    w: W,
) -> Option<(HandOff, R, W, ConnectionSlot)>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Locals drop in reverse order: the socket halves before the slot, so that a
    // dropped slot means a closed descriptor (the accept loop, out of descriptors,
    // waits for that).
    let slot = slot;
    let mut w = w;
    let mut r = BufReader::with_capacity(HANDSHAKE_BUF, r);
    let mut shutdown = shared.shutdown_signal();
    // handshake-max-seconds ends the negotiation the way qsd's timer does: qsd shuts
    // the socket down, so the read it was waiting in sees end-of-file and the usual
    // report follows (none for a client that never sent its flags).
    let deadline = shared
        .handshake_limit()
        .map(|limit| tokio::time::Instant::now() + limit);
    let mut limited_r = Deadline::new(&mut r, deadline, Some(&slot));
    let mut limited_w = Deadline::new(&mut w, deadline, None);
    let session = tokio::select! {
        _ = signalled(&mut shutdown) => return None,
        _ = slot.evicted() => {
            tracing::debug!("NBD client dropped while negotiating, to make room");
            return None;
        }
        s = handshake::negotiate(&shared, &mut limited_r, &mut limited_w) => s,
    };
    drop(limited_r);
    drop(limited_w);
    match session {
        Ok(session) if shared.hands_off() => {
            // The listener's part ends here; the client's hold on the metadata
            // export (`session.client`) ends with this function.
            let hand = HandOff {
                export: session.client.export.name.clone(),
                mode: session.mode,
                base_allocation: session.contexts.base_allocation,
                allocation_depth: session.contexts.allocation_depth,
                // At most MAX_EXPORT_BITMAPS (256) indexes: they fit in u32.
                bitmaps: session.contexts.bitmaps.iter().map(|i| i as u32).collect(),
                reply: session.pending,
                leftover: r.buffer().to_vec(),
            };
            Some((hand, r.into_inner(), w, slot))
        }
        Ok(session) => {
            let early = r.buffer().to_vec();
            serve_negotiated(shared, slot, session, early, r.into_inner(), w).await;
            None
        }
        Err(e) => {
            tracing::debug!("NBD negotiation ended: {e}");
            // What qsd prints for a failed negotiation; a client that said
            // NBD_OPT_ABORT, or left before sending its flags, is not reported.
            let text = match &e {
                HandshakeError::Aborted | HandshakeError::Probe => None,
                HandshakeError::Io(io) => Some(io_text(io)),
                HandshakeError::Read(what, io) => {
                    Some(format!("Failed to read {what}: {}", io_text(io)))
                }
                other => Some(other.to_string()),
            };
            if let Some(text) = text {
                shared.report(&format!("option negotiation failed: {text}"));
            }
            None
        }
    }
}

/// A negotiated client (here or in a listener that handed it over): waits for a
/// `max-connections` slot, sends the final negotiation reply and serves requests.
/// `early`: bytes the client sent after its final option, read before the socket.
pub(crate) async fn serve_negotiated<R, W>(
    shared: Arc<Shared>,
    mut slot: ConnectionSlot,
    session: Session,
    early: Vec<u8>,
    r: R,
    mut w: W,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut shutdown = shared.shutdown_signal();
    // Wait for a max-connections slot before the final reply, outside the
    // handshake deadline: the client did its part (a qsd client over the
    // limit waits too, in the listen backlog).
    slot.waiting();
    let mut closing = session.client.export.closing();
    let permit = tokio::select! {
        _ = signalled(&mut shutdown) => return,
        _ = signalled(&mut closing) => return,
        _ = slot.evicted() => return,
        p = shared.admission() => match p {
            Some(p) => p,
            None => return,
        },
    };
    slot.admitted(permit);
    if w.write_all(&session.pending).await.is_err() {
        return;
    }
    let _slot = slot;
    // The bigger buffer of the transmission phase; bytes the client sent
    // after its GO (pipelined requests) are read first.
    let r = BufReader::with_capacity(
        READ_BUF,
        spin::Spin::new(std::io::Cursor::new(early).chain(r)),
    );
    transmission(shared, session, r, w).await
}

/// A stream whose reads reach end-of-file, and whose writes fail with EPIPE, once
/// its deadline has passed (like a socket qsd shut down); no deadline, no limit.
/// Reads that bring bytes mark `activity`'s client as active.
struct Deadline<'a, T> {
    inner: &'a mut T,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    activity: Option<&'a ConnectionSlot>,
}

impl<'a, T> Deadline<'a, T> {
    fn new(
        inner: &'a mut T,
        at: Option<tokio::time::Instant>,
        activity: Option<&'a ConnectionSlot>,
    ) -> Deadline<'a, T> {
        Deadline {
            inner,
            deadline: at.map(|at| Box::pin(tokio::time::sleep_until(at))),
            activity,
        }
    }

    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Deadline<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.expired(cx) {
            // Nothing filled: end-of-file.
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before
            && let Some(slot) = self.activity
        {
            slot.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Deadline<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// What the connection task decided about one request.
enum Received {
    /// Run it.
    Run(Request),
    /// Reply EINVAL with this message (qsd answers every request it refuses
    /// before running it with EINVAL, whatever the reason); then drop the
    /// connection if `fatal`.
    Fail {
        cookie: u64,
        offset: u64,
        msg: String,
        fatal: bool,
    },
    /// Drop the connection (NBD_CMD_DISC, bad magic, client gone mid-payload);
    /// `why` is what qsd reports on stderr, if it reports anything.
    Disconnect { drain: bool, why: Option<String> },
}

impl Received {
    /// Drop the connection without a report (`drain`: answer what is in flight).
    fn gone(drain: bool) -> Received {
        Received::Disconnect { drain, why: None }
    }
}

/// A validated request ready for the backend.
struct Request {
    kind: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u64,
    /// READ target or WRITE payload, `len` bytes long (pooled).
    buf: Buf,
    /// Contexts selected for a BLOCK_STATUS request.
    contexts: Selected,
    /// The buffer's share of the connection's and the export's memory budgets,
    /// returned when the request is done.
    _memory: Option<Reservation>,
}

/// Meta contexts a BLOCK_STATUS request asks for.
#[derive(Clone, Copy, Default)]
struct Selected {
    base_allocation: bool,
    allocation_depth: bool,
    bitmaps: BitmapSet,
    count: u32,
}

/// State shared by a connection's reader and its request tasks.
struct Conn<W> {
    export: Arc<Export>,
    mode: Mode,
    contexts: Contexts,
    writer: tokio::sync::Mutex<W>,
    /// In-flight slots, buffer budget and buffer pool.
    bounds: ConnBounds,
    /// Small replies waiting to go out together (see [`Conn::send`]).
    out: Mutex<Out>,
    /// Requests started and not finished.
    running: AtomicUsize,
    /// The reader holds bytes of further requests (set after each request).
    more_input: AtomicBool,
    /// Set when a reply could not be written; the reader stops.
    dead: watch::Sender<bool>,
}

/// Replies of at most this many bytes are copied into the connection's output buffer
/// and written together with the other replies ready at the same moment: at queue
/// depth 32 the completions of a node come in batches, and one write per batch
/// instead of one per reply saves most of the connection's system calls (a 16 KiB
/// copy costs less than a `writev`).
const COALESCE_MAX: usize = 16 * 1024;
/// Most bytes the output buffer holds; a reply that does not fit waits for the
/// socket like a large one, so a client that stops reading cannot make us buffer
/// without bound.
const OUT_MAX: usize = 256 * 1024;

/// Replies gathered while a batch runs before some are written anyway (see
/// `Conn::flush_early`).
const EARLY_FLUSH_REPLIES: usize = 8;

/// The output buffer: replies appended whole, so they never interleave.
#[derive(Default)]
struct Out {
    bytes: Vec<u8>,
    /// Replies in `bytes`.
    replies: usize,
    /// A request task has taken on writing the buffer out (until it is empty).
    flushing: bool,
}

async fn transmission<R, W>(
    shared: Arc<Shared>,
    session: Session,
    mut r: BufReader<spin::Spin<R>>,
    w: W,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Session {
        client,
        mode,
        contexts,
        pending: _,
    } = session;
    let conn = Arc::new(Conn {
        export: client.export.clone(),
        mode,
        contexts,
        writer: tokio::sync::Mutex::new(w),
        bounds: ConnBounds::new(),
        out: Mutex::new(Out::default()),
        running: AtomicUsize::new(0),
        more_input: AtomicBool::new(false),
        dead: watch::Sender::new(false),
    });
    let mut stop = Stop {
        export: client.export.closing(),
        shutdown: shared.shutdown_signal(),
        dead: conn.dead.subscribe(),
    };
    let mut tasks = JoinSet::new();
    // Requests read since the reader last ran out of input.
    let mut batch = 0usize;
    let drain = loop {
        // The work first (biased): while requests are buffered, a slot and the next
        // request are ready at once and the stop signals are never even polled
        // (registering with three watch channels per request cost more than parsing
        // it); this check stands in for them.
        if stop.now() {
            break false;
        }
        let permit = tokio::select! {
            biased;
            p = conn.bounds.slot() => match p {
                Some(p) => p,
                None => break false,
            },
            _ = stop.wait() => break false,
        };
        if r.buffer().is_empty() {
            // About to wait for the client: after a lone request that is answered,
            // it is a queue-depth-1 client, whose next request comes at once.
            if batch == 1 && conn.running.load(Ordering::Relaxed) == 0 {
                r.get_mut().arm(spin::budget());
            }
            batch = 0;
        }
        batch += 1;
        let received = tokio::select! {
            biased;
            r = conn.receive(&mut r) => r,
            _ = stop.wait() => break false,
        };
        // More requests already read: replies can wait for theirs (`flush_out`).
        conn.more_input
            .store(!r.buffer().is_empty(), Ordering::Relaxed);
        match received {
            Received::Run(req) => {
                // Run it here until it has to wait: a request the backend finishes
                // at once (mapped I/O) needs no task of its own. Counted from now,
                // so that the first of a batch of requests parsed from one read
                // waits for the others' replies to send them all in one write
                // (`Conn::flush_out`).
                let mut request = Box::pin(Conn::execute(conn.start(), req, permit));
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                if request.as_mut().poll(&mut cx).is_pending() {
                    // Polled again by the runtime, which wakes it from now on.
                    tasks.spawn(request);
                }
            }
            Received::Fail {
                cookie,
                offset,
                msg,
                fatal,
            } => {
                let sent = conn
                    .reply_generic(cookie, offset, Err(libc::EINVAL), &msg)
                    .await;
                if fatal || sent.is_err() {
                    break false;
                }
            }
            Received::Disconnect { drain, why } => {
                if let Some(why) = why {
                    shared.report(&format!("Disconnect client, due to: {why}"));
                }
                break drain;
            }
        }
        while tasks.try_join_next().is_some() {}
    };
    if drain {
        // NBD_CMD_DISC or EOF: answer what is in flight, unless told to stop.
        loop {
            tokio::select! {
                _ = stop.wait() => break,
                t = tasks.join_next() => if t.is_none() { break },
            }
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    // Dropping the last `Conn` closes the socket; `client` then detaches.
    drop(conn);
    drop(client);
}

/// The reasons a connection stops early.
struct Stop {
    export: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    dead: watch::Receiver<bool>,
}

impl Stop {
    /// Whether a reason to stop is already there.
    fn now(&self) -> bool {
        *self.export.borrow() || *self.shutdown.borrow() || *self.dead.borrow()
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = signalled(&mut self.export) => {},
            _ = signalled(&mut self.shutdown) => {},
            _ = signalled(&mut self.dead) => {},
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Conn<W> {
    fn take_buf(&self, len: usize) -> Buf {
        self.bounds.take(&*self.export.backend, len)
    }

    fn put_buf(&self, buf: Buf) {
        self.bounds.put(buf);
    }
}

fn too_long(len: u64) -> String {
    format!("len ({len}) is larger than max len ({MAX_BUFFER_SIZE})")
}

/// QEMU's text for a failed socket read or write (`qio_channel_*_all`).
fn io_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            "Unexpected end-of-file before all data were read".to_owned()
        }
        std::io::ErrorKind::BrokenPipe => "Unable to write to socket: Broken pipe".to_owned(),
        _ => format!(
            "Unable to read from socket: {}",
            strerror(e.raw_os_error().unwrap_or(libc::EIO))
        ),
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on EOF before the first byte.
async fn read_exact_or_eof<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// Discards `len` bytes of the stream.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if copied != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes every byte of `bufs`, at most `IOV_MAX` slices per call.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let end = bufs.len().min(IOV_MAX);
        let n = w.write_vectored(&bufs[..end]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_drops_the_rust_suffix() {
        assert_eq!(strerror(libc::EIO), "Input/output error");
    }

    #[test]
    fn failed_steps_get_qsd_texts() {
        let text = |failed, errno| exec::failure_text(Failure { failed, errno });
        assert_eq!(text(Failed::Read, libc::EIO), "reading from file failed");
        assert_eq!(text(Failed::Write, libc::EIO), "writing to file failed");
        assert_eq!(
            text(Failed::WriteZeroes, libc::ENOSPC),
            "writing to file failed"
        );
        assert_eq!(text(Failed::Discard, libc::EIO), "discard failed");
        assert_eq!(text(Failed::Flush, libc::EIO), "flush failed");
        assert_eq!(
            text(Failed::HoleCheck, libc::EIO),
            "unable to check for holes: Input/output error"
        );
        assert_eq!(
            text(Failed::BlockStatus, libc::EIO),
            "can't get block status"
        );
    }

    #[test]
    fn too_long_uses_qsd_text() {
        assert_eq!(
            too_long(33554433),
            "len (33554433) is larger than max len (33554432)"
        );
    }
}
