//! One client connection: handshake, then the transmission phase.
//!
//! Runs in the NBD export worker, one tokio task per connection plus one per
//! request in flight. Handles untrusted bytes: request headers and WRITE
//! payloads come straight from the client and are checked (magic, lengths,
//! flags, bounds) in [`Conn::receive`] before any I/O is started, in qsd's order
//! and with qsd's errno choices.
//!
//! A request travels like this: the connection task reads its header (and
//! payload) into a pooled buffer, validates it, takes one of 16 in-flight slots
//! and spawns a request task; it then goes straight back to reading. The request
//! task calls the export's `BlockIo`, then sends the whole reply: small replies
//! that are ready together are copied into one output buffer and written with one
//! system call, large ones are written directly with one vectored write under the
//! connection's write lock. Replies go out as requests finish, in any order, never
//! interleaved. Buffers return to the pool.

use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_block::posix::strerror;
use bulkhead_block::{BlockIo, Extent, IoBuffer, IoError, SparseReadError, WriteFlags, ZeroFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use crate::handshake::{self, Contexts, HandshakeError, Mode, Session};
use crate::proto::*;
use crate::server::{ConnectionSlot, Export, Shared, signalled};

/// Read buffer size: big enough to batch many small request headers per syscall.
const READ_BUF: usize = 64 * 1024;
/// Buffers above this size are freed after use instead of pooled.
const POOL_MAX_BUF: usize = 4 * 1024 * 1024;
/// Most iovecs per writev (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// Request buffer memory one connection may hold at once: two requests of the
/// largest size. QEMU allows 16 requests of 32 MiB per connection (512 MiB); past
/// this bound a request waits for its share before its payload is read, which
/// pushes back on the client through the socket.
pub const CONN_BUFFER_BYTES: usize = 2 * MAX_BUFFER_SIZE as usize;

/// Runs one connection to its end.
pub(crate) async fn run<R, W>(shared: Arc<Shared>, slot: ConnectionSlot, r: R, mut w: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _slot = slot;
    let mut r = BufReader::with_capacity(READ_BUF, r);
    let mut shutdown = shared.shutdown_signal();
    // handshake-max-seconds ends the negotiation the way qsd's timer does: qsd shuts
    // the socket down, so the read it was waiting in sees end-of-file and the usual
    // report follows (none for a client that never sent its flags).
    let deadline = shared
        .handshake_limit()
        .map(|limit| tokio::time::Instant::now() + limit);
    let mut limited_r = Deadline::new(&mut r, deadline);
    let mut limited_w = Deadline::new(&mut w, deadline);
    let session = tokio::select! {
        _ = signalled(&mut shutdown) => return,
        s = handshake::negotiate(&shared, &mut limited_r, &mut limited_w) => s,
    };
    match session {
        Ok(session) => transmission(shared, session, r, w).await,
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
        }
    }
}

/// A stream whose reads reach end-of-file, and whose writes fail with EPIPE, once
/// its deadline has passed (like a socket qsd shut down); no deadline, no limit.
struct Deadline<'a, T> {
    inner: &'a mut T,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<'a, T> Deadline<'a, T> {
    fn new(inner: &'a mut T, at: Option<tokio::time::Instant>) -> Deadline<'a, T> {
        Deadline {
            inner,
            deadline: at.map(|at| Box::pin(tokio::time::sleep_until(at))),
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
        std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf)
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
    _memory: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// A request's data buffer: lent by the backend when it has memory it can use without
/// copying (the shared-memory pool of a node in another worker, so the payload goes
/// from the socket to the node's worker and back with no copy in between), else one
/// of the connection's pooled vectors.
enum Buf {
    Local(Vec<u8>),
    Backend(IoBuffer),
}

impl Default for Buf {
    fn default() -> Buf {
        Buf::Local(Vec::new())
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Buf::Local(v) => v,
            Buf::Backend(b) => b,
        }
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::Local(v) => v,
            Buf::Backend(b) => b,
        }
    }
}

/// Meta contexts a BLOCK_STATUS request asks for.
#[derive(Clone, Copy, Default)]
struct Selected {
    base_allocation: bool,
    allocation_depth: bool,
    count: u32,
}

/// State shared by a connection's reader and its request tasks.
struct Conn<W> {
    export: Arc<Export>,
    mode: Mode,
    contexts: Contexts,
    writer: tokio::sync::Mutex<W>,
    pool: Mutex<Vec<Vec<u8>>>,
    /// Small replies waiting to go out together (see [`Conn::send`]).
    out: Mutex<Out>,
    /// Request tasks running.
    running: AtomicUsize,
    /// Set when a reply could not be written; the reader stops.
    dead: watch::Sender<bool>,
    /// Request buffer memory of this connection ([`CONN_BUFFER_BYTES`]).
    memory: Arc<Semaphore>,
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

/// The output buffer: replies appended whole, so they never interleave.
#[derive(Default)]
struct Out {
    bytes: Vec<u8>,
    /// A request task has taken on writing the buffer out (until it is empty).
    flushing: bool,
}

async fn transmission<R, W>(shared: Arc<Shared>, session: Session, mut r: BufReader<R>, w: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Session {
        client,
        mode,
        contexts,
    } = session;
    let conn = Arc::new(Conn {
        export: client.export.clone(),
        mode,
        contexts,
        writer: tokio::sync::Mutex::new(w),
        pool: Mutex::new(Vec::new()),
        out: Mutex::new(Out::default()),
        running: AtomicUsize::new(0),
        dead: watch::Sender::new(false),
        memory: Arc::new(Semaphore::new(CONN_BUFFER_BYTES)),
    });
    let mut stop = Stop {
        export: client.export.closing(),
        shutdown: shared.shutdown_signal(),
        dead: conn.dead.subscribe(),
    };
    let slots = Arc::new(Semaphore::new(MAX_REQUESTS));
    let mut tasks = JoinSet::new();
    let drain = loop {
        let permit = tokio::select! {
            _ = stop.wait() => break false,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break false,
            },
        };
        let received = tokio::select! {
            _ = stop.wait() => break false,
            r = conn.receive(&mut r) => r,
        };
        match received {
            Received::Run(req) => {
                tasks.spawn(conn.clone().execute(req, permit));
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
        if len > 0
            && let Some(b) = self.export.backend.alloc_buffer(len)
        {
            return Buf::Backend(b);
        }
        let mut buf = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.pop().unwrap_or_default()
        };
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Buf::Local(buf)
    }

    fn put_buf(&self, buf: Buf) {
        let Buf::Local(buf) = buf else {
            // Backend memory goes back to its owner when dropped.
            return;
        };
        if buf.capacity() == 0 || buf.capacity() > POOL_MAX_BUF {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_REQUESTS {
            pool.push(buf);
        }
    }

    /// Reads one request and validates it as qsd's `nbd_co_receive_request` does.
    async fn receive<R: AsyncRead + Unpin>(&self, r: &mut BufReader<R>) -> Received {
        let extended = self.mode >= Mode::Extended;
        let mut raw = [0u8; EXTENDED_REQUEST_SIZE];
        let size = if extended {
            EXTENDED_REQUEST_SIZE
        } else {
            REQUEST_SIZE
        };
        // A clean EOF between requests is a client going away; let in-flight
        // requests finish their replies (they may still be read).
        match read_exact_or_eof(r, &mut raw[..size]).await {
            Ok(true) => {}
            Ok(false) => return Received::gone(true),
            Err(_) => return Received::gone(false),
        }
        let h = RequestHeader::decode(&raw, extended);
        let expect = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if h.magic != expect {
            // qsd 10.0.2 still answers (with the garbage header's cookie) before
            // it drops the connection.
            return Received::Fail {
                cookie: h.cookie,
                offset: h.offset,
                msg: format!("invalid magic (got 0x{:x}, expected 0x{expect:x})", h.magic),
                fatal: true,
            };
        }
        if h.kind == CMD_DISC {
            return Received::gone(true);
        }
        let fail = |msg: String, fatal: bool| Received::Fail {
            cookie: h.cookie,
            offset: h.offset,
            msg,
            fatal,
        };
        let ext_payload = extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        let mut valid = CMD_FLAG_FUA;
        let mut payload_len = if ext_payload { h.len } else { 0 };
        let mut check_length = ext_payload;
        let mut alloc = false;
        let mut check_ro = false;
        let mut len = h.len;
        let mut selected = Selected {
            base_allocation: self.contexts.base_allocation,
            allocation_depth: self.contexts.allocation_depth,
            count: self.contexts.count,
        };
        match h.kind {
            CMD_READ => {
                if self.mode >= Mode::Structured {
                    valid |= CMD_FLAG_DF;
                }
                check_length = true;
                alloc = true;
            }
            CMD_WRITE => {
                if extended {
                    valid |= CMD_FLAG_PAYLOAD_LEN;
                }
                payload_len = h.len;
                check_length = true;
                alloc = true;
                check_ro = true;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                check_ro = true;
                if h.kind == CMD_WRITE_ZEROES {
                    valid |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO;
                }
            }
            CMD_CACHE => check_length = true,
            CMD_BLOCK_STATUS => {
                valid |= CMD_FLAG_REQ_ONE;
                if ext_payload {
                    valid |= CMD_FLAG_PAYLOAD_LEN;
                    if h.len > u64::from(MAX_BUFFER_SIZE) {
                        return fail(too_long(h.len), true);
                    }
                    match self.block_status_payload(r, h.len).await {
                        Ok(Some((effect, sel))) => {
                            len = effect;
                            selected = sel;
                        }
                        Ok(None) => {
                            len = 0;
                            selected = Selected::default();
                        }
                        Err(_) => {
                            return Received::gone(false);
                        }
                    }
                    payload_len = 0;
                    check_length = false;
                }
            }
            _ => {}
        }
        if check_length && h.len > u64::from(MAX_BUFFER_SIZE) {
            // An unread WRITE payload leaves the stream unusable: reply, then drop.
            return fail(too_long(h.len), payload_len != 0);
        }
        // Lengths of READ/WRITE/CACHE and payloads are now at most 32 MiB.
        let mut buf = Buf::default();
        let mut memory = None;
        if payload_len != 0 && !alloc {
            // A payload on a command that takes none: skip it, then let the flag
            // check below refuse the request.
            if skip(r, payload_len).await.is_err() {
                return Received::gone(false);
            }
        } else if alloc {
            memory = match self.reserve(h.len).await {
                Some(m) => Some(m),
                None => return Received::gone(false),
            };
            buf = self.take_buf(h.len as usize);
            if payload_len != 0
                && let Err(e) = r.read_exact(&mut buf[..h.len as usize]).await
            {
                let why = (h.kind == CMD_WRITE)
                    .then(|| format!("Failed to read CMD_WRITE data: {}", io_text(&e)));
                return Received::Disconnect { drain: false, why };
            }
        }
        if let Some(msg) = self.sanity(&h, len, check_ro, valid) {
            self.put_buf(buf);
            return fail(msg, false);
        }
        Received::Run(Request {
            kind: h.kind,
            flags: h.flags,
            cookie: h.cookie,
            offset: h.offset,
            len,
            buf,
            contexts: selected,
            _memory: memory,
        })
    }

    /// Waits for `len` bytes of the connection's, then the export's, buffer budget
    /// (always in that order, and released together, so waits cannot form a cycle).
    /// `None` if a semaphore was closed (never, today).
    async fn reserve(&self, len: u64) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let n = u32::try_from(len.max(1)).ok()?;
        let conn = self.memory.clone().acquire_many_owned(n).await.ok()?;
        let export = self
            .export
            .memory
            .clone()
            .acquire_many_owned(n)
            .await
            .ok()?;
        Some((conn, export))
    }

    /// qsd's final checks, in its order: read-only, bounds, flags. (qsd computes
    /// EROFS/ENOSPC here but the client always sees EINVAL.)
    fn sanity(&self, h: &RequestHeader, len: u64, check_ro: bool, valid: u16) -> Option<String> {
        let export = &self.export;
        if check_ro && export.read_only() {
            return Some("Export is read-only".to_owned());
        }
        if h.offset > export.size || len > export.size - h.offset {
            return Some(format!(
                "operation past EOF; From: {}, Len: {}, Size: {}",
                h.offset, len, export.size
            ));
        }
        if h.flags & !valid != 0 {
            return Some(format!(
                "unsupported flags for command {} (got 0x{:x})",
                cmd_name(h.kind),
                h.flags
            ));
        }
        None
    }

    /// Reads an extended BLOCK_STATUS payload (effect length + context ids) as
    /// qsd's `nbd_co_block_status_payload_read`; `None` means the payload was
    /// unusable and the request will be refused.
    async fn block_status_payload<R: AsyncRead + Unpin>(
        &self,
        r: &mut BufReader<R>,
        len: u64,
    ) -> std::io::Result<Option<(u64, Selected)>> {
        let negotiated = u64::from(self.contexts.count);
        if !len.is_multiple_of(4) || len < 8 || len > 8 + 4 * negotiated {
            skip(r, len).await?;
            return Ok(None);
        }
        // At most 8 + 4 * 2 bytes.
        let mut buf = [0u8; 16];
        let body = &mut buf[..len as usize];
        r.read_exact(body).await?;
        let mut effect = [0u8; 8];
        effect.copy_from_slice(&body[..8]);
        let mut sel = Selected::default();
        for id in body[8..].chunks_exact(4) {
            match u32::from_be_bytes([id[0], id[1], id[2], id[3]]) {
                META_ID_BASE_ALLOCATION
                    if self.contexts.base_allocation && !sel.base_allocation =>
                {
                    sel.base_allocation = true;
                }
                META_ID_ALLOCATION_DEPTH
                    if self.contexts.allocation_depth && !sel.allocation_depth =>
                {
                    sel.allocation_depth = true;
                }
                _ => return Ok(None),
            }
            sel.count += 1;
        }
        Ok(Some((u64::from_be_bytes(effect), sel)))
    }

    /// Runs one request against the backend and sends its reply.
    async fn execute(self: Arc<Self>, mut req: Request, permit: OwnedSemaphorePermit) {
        // The slot is released when the reply is sent or queued (or the task aborted).
        let _permit = permit;
        struct Running<'a>(&'a AtomicUsize);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.running.fetch_add(1, Ordering::Relaxed);
        let _running = Running(&self.running);
        let backend: &dyn BlockIo = &*self.export.backend;
        let sent = match req.kind {
            CMD_READ => self.read(&mut req).await,
            CMD_WRITE => {
                let flags = WriteFlags {
                    fua: req.flags & CMD_FLAG_FUA != 0,
                };
                let n = req.len as usize;
                let r = backend.write(req.offset, &req.buf[..n], flags).await;
                self.reply_io(&req, r, "writing to file failed").await
            }
            CMD_WRITE_ZEROES => {
                let flags = ZeroFlags {
                    fua: req.flags & CMD_FLAG_FUA != 0,
                    may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                    no_fallback: req.flags & CMD_FLAG_FAST_ZERO != 0,
                };
                let r = backend.write_zeroes(req.offset, req.len, flags).await;
                self.reply_io(&req, r, "writing to file failed").await
            }
            CMD_FLUSH => {
                let r = backend.flush().await;
                self.reply_io(&req, r, "flush failed").await
            }
            CMD_TRIM => {
                let mut r = backend.discard(req.offset, req.len).await;
                if r.is_ok() && req.flags & CMD_FLAG_FUA != 0 {
                    r = backend.flush().await;
                }
                self.reply_io(&req, r, "discard failed").await
            }
            // qsd prefetches with copy-on-read, which only does work for a node
            // with a backing chain; through BlockIo there is nothing to warm up.
            CMD_CACHE => self.reply_io(&req, Ok(()), "request preadv failed").await,
            CMD_BLOCK_STATUS => self.block_status(&req).await,
            kind => {
                let msg = format!("invalid request type ({kind}) received");
                self.reply_generic(req.cookie, req.offset, Err(libc::EINVAL), &msg)
                    .await
            }
        };
        self.put_buf(std::mem::take(&mut req.buf));
        if sent.is_err() {
            self.dead.send_replace(true);
        }
    }

    async fn reply_io(
        &self,
        req: &Request,
        r: Result<(), IoError>,
        msg: &str,
    ) -> std::io::Result<()> {
        self.reply_generic(req.cookie, req.offset, r.map_err(|e| e.errno()), msg)
            .await
    }

    /// qsd's `nbd_send_generic_reply`: errors as an error chunk once structured
    /// replies are negotiated; success as a final NONE chunk with extended
    /// headers, else (even with structured replies) as a simple reply.
    async fn reply_generic(
        &self,
        cookie: u64,
        offset: u64,
        r: Result<(), i32>,
        msg: &str,
    ) -> std::io::Result<()> {
        match r {
            Err(errno) if self.mode >= Mode::Structured => {
                self.send_error(cookie, offset, errno, msg).await
            }
            Ok(()) if self.mode >= Mode::Extended => self.send_done(cookie, offset).await,
            r => {
                let h = simple_reply(cookie, nbd_errno(r.err().unwrap_or(0)));
                self.send(&mut [IoSlice::new(&h)]).await
            }
        }
    }

    /// A final NONE chunk.
    async fn send_done(&self, cookie: u64, offset: u64) -> std::io::Result<()> {
        let mut h = [0u8; CHUNK_HEADER_MAX];
        let n = chunk_header(
            &mut h,
            self.mode >= Mode::Extended,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            cookie,
            offset,
            0,
        );
        self.send(&mut [IoSlice::new(&h[..n])]).await
    }

    /// A final `NBD_REPLY_TYPE_ERROR` chunk.
    async fn send_error(
        &self,
        cookie: u64,
        offset: u64,
        errno: i32,
        msg: &str,
    ) -> std::io::Result<()> {
        // Our messages are short; cut defensively to the 16-bit length field.
        let msg = &msg.as_bytes()[..msg.len().min(4096)];
        let mut h = [0u8; CHUNK_HEADER_MAX];
        let n = chunk_header(
            &mut h,
            self.mode >= Mode::Extended,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            offset,
            6 + msg.len() as u64,
        );
        let mut e = [0u8; 6];
        e[0..4].copy_from_slice(&nbd_errno(errno).to_be_bytes());
        e[4..6].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        self.send(&mut [IoSlice::new(&h[..n]), IoSlice::new(&e), IoSlice::new(msg)])
            .await
    }

    /// Sends one whole reply. A small one is appended to the output buffer; the task
    /// that finds nobody writing the buffer writes it (after letting the other
    /// requests that are ready append theirs). A large one, or one that does not fit,
    /// is written directly under the connection's write lock. Either way a reply's
    /// bytes go out contiguously.
    async fn send(&self, bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total <= COALESCE_MAX {
            let flusher = {
                let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
                if out.bytes.len() + total <= OUT_MAX {
                    for b in bufs.iter() {
                        out.bytes.extend_from_slice(b);
                    }
                    Some(!std::mem::replace(&mut out.flushing, true))
                } else {
                    None
                }
            };
            match flusher {
                Some(true) => return self.flush_out().await,
                Some(false) => return Ok(()),
                None => {}
            }
        }
        let mut w = self.writer.lock().await;
        write_all_vectored(&mut *w, bufs).await
    }

    /// Writes the output buffer until it is empty.
    async fn flush_out(&self) -> std::io::Result<()> {
        if self.running.load(Ordering::Relaxed) > 1 {
            // Other requests may be about to reply (their completions arrived in
            // the same batch): let them run first. Alone in flight, no need to.
            tokio::task::yield_now().await;
        }
        let mut spare = Vec::new();
        loop {
            let mut pending = {
                let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
                if out.bytes.is_empty() {
                    out.flushing = false;
                    return Ok(());
                }
                std::mem::replace(&mut out.bytes, spare)
            };
            let written = {
                let mut w = self.writer.lock().await;
                match w.write_all(&pending).await {
                    Ok(()) => w.flush().await,
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = written {
                // The connection is over (the caller marks it dead); later
                // replies go nowhere.
                self.out.lock().unwrap_or_else(|e| e.into_inner()).flushing = false;
                return Err(e);
            }
            pending.clear();
            spare = pending;
        }
    }

    /// NBD_CMD_READ, as qsd's `nbd_do_cmd_read`.
    async fn read(&self, req: &mut Request) -> std::io::Result<()> {
        let backend: &dyn BlockIo = &*self.export.backend;
        if req.flags & CMD_FLAG_FUA != 0
            && let Err(e) = backend.flush().await
        {
            return self
                .reply_generic(req.cookie, req.offset, Err(e.errno()), "flush failed")
                .await;
        }
        let n = req.len as usize;
        if self.mode >= Mode::Structured && req.flags & CMD_FLAG_DF == 0 && n > 0 {
            return self.sparse_read(req).await;
        }
        if let Err(e) = backend.read(req.offset, &mut req.buf[..n]).await {
            return self
                .reply_generic(
                    req.cookie,
                    req.offset,
                    Err(e.errno()),
                    "reading from file failed",
                )
                .await;
        }
        if self.mode >= Mode::Structured {
            if n == 0 {
                return self.send_done(req.cookie, req.offset).await;
            }
            self.send_data_chunks(
                req,
                &[Run {
                    offset: req.offset,
                    len: req.len,
                    hole: false,
                }],
            )
            .await
        } else {
            let h = simple_reply(req.cookie, 0);
            self.send(&mut [IoSlice::new(&h), IoSlice::new(&req.buf[..n])])
                .await
        }
    }

    /// A structured read that sends holes as OFFSET_HOLE chunks, deciding from
    /// block status like qsd's `nbd_co_send_sparse_read` (zero ranges are holes).
    /// The backend does block status and the data reads together
    /// ([`BlockIo::read_sparse`]): one round trip when the node is in another worker.
    async fn sparse_read(&self, req: &mut Request) -> std::io::Result<()> {
        let backend: &dyn BlockIo = &*self.export.backend;
        let n = req.len as usize;
        let extents = match backend.read_sparse(req.offset, &mut req.buf[..n]).await {
            Ok(e) => e,
            Err(SparseReadError::Status(e)) => {
                let msg = format!("unable to check for holes: {}", strerror(e.errno()));
                return self
                    .send_error(req.cookie, req.offset, e.errno(), &msg)
                    .await;
            }
            Err(SparseReadError::Read(e)) => {
                return self
                    .send_error(
                        req.cookie,
                        req.offset,
                        e.errno(),
                        "reading from file failed",
                    )
                    .await;
            }
        };
        let mut runs: Vec<Run> = Vec::with_capacity(extents.len());
        let mut pos = req.offset;
        for e in &extents {
            match runs.last_mut() {
                Some(last) if last.hole == e.zero => last.len += e.length,
                _ => runs.push(Run {
                    offset: pos,
                    len: e.length,
                    hole: e.zero,
                }),
            }
            pos += e.length;
        }
        if pos != req.offset + req.len {
            // A backend breaking its contract (extents not tiling the request).
            let msg = "unable to check for holes: Input/output error";
            return self
                .send_error(req.cookie, req.offset, libc::EIO, msg)
                .await;
        }
        self.send_data_chunks(req, &runs).await
    }

    /// Sends OFFSET_DATA / OFFSET_HOLE chunks for `runs` (which tile the request),
    /// the last one flagged DONE, in one vectored write.
    async fn send_data_chunks(&self, req: &Request, runs: &[Run]) -> std::io::Result<()> {
        let extended = self.mode >= Mode::Extended;
        if let [run] = runs
            && !run.hole
        {
            // The common case (all data): no allocation, one writev.
            let mut h = [0u8; CHUNK_HEADER_MAX + 8];
            let mut head = [0u8; CHUNK_HEADER_MAX];
            let n = chunk_header(
                &mut head,
                extended,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                req.offset,
                8 + run.len,
            );
            h[..n].copy_from_slice(&head[..n]);
            h[n..n + 8].copy_from_slice(&run.offset.to_be_bytes());
            let data = &req.buf[..run.len as usize];
            return self
                .send(&mut [IoSlice::new(&h[..n + 8]), IoSlice::new(data)])
                .await;
        }
        // Per chunk: header + 8-byte offset (+ 4-byte hole length).
        let mut heads = vec![[0u8; CHUNK_HEADER_MAX + 12]; runs.len()];
        let mut sizes = Vec::with_capacity(runs.len());
        for (i, run) in runs.iter().enumerate() {
            let flags = if i + 1 == runs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let head = &mut heads[i];
            let mut h = [0u8; CHUNK_HEADER_MAX];
            let (kind, payload) = if run.hole {
                (REPLY_TYPE_OFFSET_HOLE, 12)
            } else {
                (REPLY_TYPE_OFFSET_DATA, 8 + run.len)
            };
            let n = chunk_header(
                &mut h, extended, flags, kind, req.cookie, req.offset, payload,
            );
            head[..n].copy_from_slice(&h[..n]);
            head[n..n + 8].copy_from_slice(&run.offset.to_be_bytes());
            let mut size = n + 8;
            if run.hole {
                // Holes lie within one request of at most 32 MiB.
                head[n + 8..n + 12].copy_from_slice(&(run.len as u32).to_be_bytes());
                size += 4;
            }
            sizes.push(size);
        }
        let mut iov = Vec::with_capacity(runs.len() * 2);
        for (i, run) in runs.iter().enumerate() {
            iov.push(IoSlice::new(&heads[i][..sizes[i]]));
            if !run.hole {
                let at = (run.offset - req.offset) as usize;
                iov.push(IoSlice::new(&req.buf[at..at + run.len as usize]));
            }
        }
        self.send(&mut iov).await
    }

    /// NBD_CMD_BLOCK_STATUS: one chunk per selected context, base:allocation
    /// first, as qsd does.
    async fn block_status(&self, req: &Request) -> std::io::Result<()> {
        let sel = req.contexts;
        if sel.count == 0 {
            let msg = if self.contexts.count > 0 {
                "CMD_BLOCK_STATUS payload not valid"
            } else {
                "CMD_BLOCK_STATUS not negotiated"
            };
            return self
                .reply_generic(req.cookie, req.offset, Err(libc::EINVAL), msg)
                .await;
        }
        if req.len == 0 {
            return self
                .reply_generic(
                    req.cookie,
                    req.offset,
                    Err(libc::EINVAL),
                    "need non-zero length",
                )
                .await;
        }
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut remaining = sel.count;
        for (on, id) in [
            (sel.base_allocation, META_ID_BASE_ALLOCATION),
            (sel.allocation_depth, META_ID_ALLOCATION_DEPTH),
        ] {
            if !on {
                continue;
            }
            remaining -= 1;
            let extents = match self.collect_extents(req.offset, req.len, one, id).await {
                Ok(e) => e,
                Err(e) => {
                    return self
                        .send_error(req.cookie, req.offset, e.errno(), "can't get block status")
                        .await;
                }
            };
            self.send_extents(req, id, &extents, remaining == 0).await?;
        }
        Ok(())
    }

    /// Walks block status over `[offset, offset + len)`, merging runs with equal
    /// flags and stopping at qsd's extent cap (1 with REQ_ONE).
    async fn collect_extents(
        &self,
        offset: u64,
        len: u64,
        one: bool,
        id: u32,
    ) -> Result<Vec<(u64, u32)>, IoError> {
        let cap = if one { 1 } else { MAX_BLOCK_STATUS_EXTENTS };
        let backend: &dyn BlockIo = &*self.export.backend;
        let end = offset + len;
        let mut out: Vec<(u64, u32)> = Vec::with_capacity(4);
        let mut pos = offset;
        'outer: while pos < end {
            let extents: Vec<Extent> = backend.block_status(pos, end - pos).await?;
            let before = pos;
            for e in &extents {
                let n = e.length.min(end - pos);
                if n == 0 {
                    break;
                }
                let flags = if id == META_ID_BASE_ALLOCATION {
                    (if e.data { 0 } else { STATE_HOLE }) | (if e.zero { STATE_ZERO } else { 0 })
                } else {
                    e.depth
                };
                let full = out.len() >= cap;
                match out.last_mut() {
                    Some(last) if last.1 == flags => last.0 += n,
                    _ if full => break 'outer,
                    _ => out.push((n, flags)),
                }
                pos += n;
                if pos >= end {
                    break;
                }
            }
            if pos == before {
                return Err(IoError::Os(libc::EIO));
            }
        }
        Ok(out)
    }

    async fn send_extents(
        &self,
        req: &Request,
        id: u32,
        extents: &[(u64, u32)],
        last: bool,
    ) -> std::io::Result<()> {
        let extended = self.mode >= Mode::Extended;
        let mut body = Vec::with_capacity(8 + extents.len() * 16);
        body.extend_from_slice(&id.to_be_bytes());
        if extended {
            body.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for &(len, flags) in extents {
                body.extend_from_slice(&len.to_be_bytes());
                body.extend_from_slice(&u64::from(flags).to_be_bytes());
            }
        } else {
            for &(len, flags) in extents {
                // Compact requests are at most u32::MAX bytes long.
                body.extend_from_slice(&(len.min(u64::from(u32::MAX)) as u32).to_be_bytes());
                body.extend_from_slice(&flags.to_be_bytes());
            }
        }
        let kind = if extended {
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            REPLY_TYPE_BLOCK_STATUS
        };
        let mut h = [0u8; CHUNK_HEADER_MAX];
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        let n = chunk_header(
            &mut h,
            extended,
            flags,
            kind,
            req.cookie,
            req.offset,
            body.len() as u64,
        );
        self.send(&mut [IoSlice::new(&h[..n]), IoSlice::new(&body)])
            .await
    }
}

/// A run of a read reply: data or hole.
#[derive(Clone, Copy)]
struct Run {
    offset: u64,
    len: u64,
    hole: bool,
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
    fn too_long_uses_qsd_text() {
        assert_eq!(
            too_long(33554433),
            "len (33554433) is larger than max len (33554432)"
        );
    }
}
