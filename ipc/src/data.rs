//! The data channel, version 1: node I/O between two workers over a stream socket.
//!
//! The supervisor creates one socket pair per (client worker, serving worker) and hands
//! one end to each. The client side is [`RemoteNode`], an implementation of
//! [`BlockIo`], so drivers and exports never know whether a node is local or remote;
//! a shared-memory transport can later replace this module behind the same trait.
//!
//! Frame: `u32` little-endian header length, the bincode header, then the payload
//! (write data in requests, read data in replies). Both ends bound every length before
//! reading it, and the serving side bounds how many requests it runs at once, so a
//! misbehaving peer can cost at most one connection, never memory or other clients.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_block::{BlockIo, Extent, IoError, IoFuture, IoResult, WriteFlags, ZeroFlags};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::codec::{self, MAX_DATA_HEADER};
use crate::wire::NodeId;

/// Largest read or write payload (NBD's 32 MiB request limit).
pub const MAX_IO_PAYLOAD: usize = 32 << 20;

/// Requests the serving side runs at once per channel; more wait in the socket.
const MAX_IN_FLIGHT: usize = 256;

/// One I/O operation on a remote node.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum IoOp {
    /// Read `len` bytes.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length (at most [`MAX_IO_PAYLOAD`]).
        len: u32,
    },
    /// Write the `len` payload bytes that follow the header.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload length (at most [`MAX_IO_PAYLOAD`]).
        len: u32,
        /// FUA.
        flags: WriteFlags,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Flags.
        flags: ZeroFlags,
    },
    /// Discard.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Flush.
    Flush,
    /// Block status.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Size and read-only state.
    Info,
}

/// A request frame header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IoRequest {
    /// Chosen by the client, echoed in the reply.
    pub tag: u64,
    /// The node.
    pub node: NodeId,
    /// The operation.
    pub op: IoOp,
}

/// What a successful operation returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum IoDone {
    /// Completed; nothing to return.
    Done,
    /// Read data of this length follows the header.
    Read {
        /// Payload length.
        len: u32,
    },
    /// Block status.
    Extents(Vec<Extent>),
    /// Node info.
    Info {
        /// Size in bytes.
        size: u64,
        /// Refuses writes.
        read_only: bool,
    },
}

/// A reply frame header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IoReply {
    /// The request's tag.
    pub tag: u64,
    /// Its outcome.
    pub result: Result<IoDone, IoError>,
}

/// Data channel errors (the channel is unusable afterwards).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Socket failure or EOF.
    #[error("data channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something malformed or out of bounds.
    #[error("data channel protocol violation: {0}")]
    Protocol(String),
}

fn into_stream(sock: OwnedFd) -> std::io::Result<UnixStream> {
    let std = std::os::unix::net::UnixStream::from(sock);
    std.set_nonblocking(true)?;
    UnixStream::from_std(std)
}

async fn read_header<T: serde::de::DeserializeOwned>(
    r: &mut OwnedReadHalf,
) -> Result<T, DataError> {
    let len = r.read_u32_le().await? as usize;
    if len > MAX_DATA_HEADER {
        return Err(DataError::Protocol(format!("header of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    codec::decode(&buf).map_err(|e| DataError::Protocol(e.to_string()))
}

async fn write_frame<T: Serialize>(
    w: &mut OwnedWriteHalf,
    header: &T,
    payload: &[u8],
) -> Result<(), DataError> {
    let bytes = codec::encode(header).map_err(|e| DataError::Protocol(e.to_string()))?;
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    frame.extend_from_slice(&bytes);
    if payload.is_empty() {
        w.write_all(&frame).await?;
    } else if payload.len() <= 64 * 1024 {
        // One syscall for small payloads; large ones are not worth the copy.
        frame.extend_from_slice(payload);
        w.write_all(&frame).await?;
    } else {
        w.write_all(&frame).await?;
        w.write_all(payload).await?;
    }
    Ok(())
}

type Completion = oneshot::Sender<Result<(IoDone, Vec<u8>), IoError>>;

/// The client end of a data channel, shared by every [`RemoteNode`] reached through it.
#[derive(Debug)]
pub struct DataClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<HashMap<u64, Completion>>,
    next_tag: AtomicU64,
    closed: AtomicBool,
}

impl DataClient {
    /// Wraps the client end and starts its reply reader on the current runtime.
    pub fn spawn(sock: OwnedFd) -> std::io::Result<Arc<DataClient>> {
        let (r, w) = into_stream(sock)?.into_split();
        let client = Arc::new(DataClient {
            writer: tokio::sync::Mutex::new(w),
            pending: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        let reader = Arc::clone(&client);
        tokio::spawn(async move {
            if let Err(e) = reader.read_replies(r).await {
                tracing::warn!(error = %e, "data channel closed");
            }
            reader.fail_all();
        });
        Ok(client)
    }

    /// Whether the channel is gone (the serving worker died or misbehaved).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Completion>> {
        // A poisoned map only means another task panicked while holding it; the map
        // itself is still consistent (inserts and removes are single operations).
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail_all(&self) {
        self.closed.store(true, Ordering::Release);
        for (_, tx) in self.pending().drain() {
            let _ = tx.send(Err(IoError::Disconnected));
        }
    }

    async fn read_replies(&self, mut r: OwnedReadHalf) -> Result<(), DataError> {
        loop {
            let reply: IoReply = read_header(&mut r).await?;
            let mut payload = Vec::new();
            if let Ok(IoDone::Read { len }) = &reply.result {
                let len = *len as usize;
                if len > MAX_IO_PAYLOAD {
                    return Err(DataError::Protocol(format!("read payload of {len} bytes")));
                }
                payload = vec![0u8; len];
                r.read_exact(&mut payload).await?;
            }
            let Some(tx) = self.pending().remove(&reply.tag) else {
                return Err(DataError::Protocol(format!(
                    "reply for unknown tag {}",
                    reply.tag
                )));
            };
            let _ = tx.send(reply.result.map(|done| (done, payload)));
        }
    }

    /// Sends one request and waits for its reply.
    pub async fn call(
        &self,
        node: NodeId,
        op: IoOp,
        payload: &[u8],
    ) -> Result<(IoDone, Vec<u8>), IoError> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending().insert(tag, tx);
        if self.is_closed() {
            self.pending().remove(&tag);
            return Err(IoError::Disconnected);
        }
        let sent = {
            let mut w = self.writer.lock().await;
            write_frame(&mut w, &IoRequest { tag, node, op }, payload).await
        };
        if sent.is_err() {
            self.pending().remove(&tag);
            return Err(IoError::Disconnected);
        }
        rx.await.unwrap_or(Err(IoError::Disconnected))
    }
}

/// How long a request waits for a replacement of a dead serving worker before it
/// fails. The supervisor restarts a worker within its backoff (at most a few seconds);
/// clients such as QEMU's NBD client with `reconnect-delay` wait about as long.
pub const RESUBMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The connection to one serving worker across its restarts.
///
/// Each incarnation of the serving worker gets a new channel with a higher generation.
/// The supervisor attaches the new channel only after the old process has been reaped,
/// so a request resubmitted on a newer generation can never race a stale copy of it
/// still running in the dead worker: that is the fence.
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

    /// The current channel, waiting (up to [`RESUBMIT_TIMEOUT`]) for one whose
    /// generation is at least `min_generation`.
    async fn client(&self, min_generation: u64) -> IoResult<(u64, Arc<DataClient>)> {
        let mut rx = self.state.subscribe();
        let wait =
            rx.wait_for(|s| matches!(s, Some((g, c)) if *g >= min_generation && !c.is_closed()));
        match tokio::time::timeout(RESUBMIT_TIMEOUT, wait).await {
            Ok(Ok(s)) => s
                .as_ref()
                .map(|(g, c)| (*g, Arc::clone(c)))
                .ok_or(IoError::Disconnected),
            _ => Err(IoError::Disconnected),
        }
    }

    /// Sends a request, resubmitting it to the next incarnation if the serving worker
    /// dies before answering.
    pub async fn call(
        &self,
        node: NodeId,
        op: IoOp,
        payload: &[u8],
    ) -> IoResult<(IoDone, Vec<u8>)> {
        let mut min_generation = 0;
        loop {
            let (generation, client) = self.client(min_generation).await?;
            match client.call(node, op, payload).await {
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
        match self.call(node, IoOp::Info, &[]).await? {
            (IoDone::Info { size, read_only }, _) => Ok(RemoteNode {
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
        match self.peer.call(self.node, IoOp::Info, &[]).await? {
            (IoDone::Info { size, .. }, _) => {
                self.size.store(size, Ordering::Release);
                Ok(size)
            }
            _ => Err(IoError::Invalid),
        }
    }

    async fn expect_done(&self, op: IoOp, payload: &[u8]) -> IoResult<()> {
        match self.peer.call(self.node, op, payload).await? {
            (IoDone::Done, _) => Ok(()),
            _ => Err(IoError::Invalid),
        }
    }
}

fn payload_len(len: usize) -> IoResult<u32> {
    if len > MAX_IO_PAYLOAD {
        return Err(IoError::Invalid);
    }
    u32::try_from(len).map_err(|_| IoError::Invalid)
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
        Box::pin(async move {
            let len = payload_len(buf.len())?;
            match self
                .peer
                .call(self.node, IoOp::Read { offset, len }, &[])
                .await?
            {
                (IoDone::Read { len: got }, data) if got == len && data.len() == buf.len() => {
                    buf.copy_from_slice(&data);
                    Ok(())
                }
                _ => Err(IoError::Invalid),
            }
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let len = payload_len(buf.len())?;
            self.expect_done(IoOp::Write { offset, len, flags }, buf)
                .await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.expect_done(IoOp::WriteZeroes { offset, len, flags }, &[]))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.expect_done(IoOp::Discard { offset, len }, &[]))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.expect_done(IoOp::Flush, &[]))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            match self
                .peer
                .call(self.node, IoOp::BlockStatus { offset, len }, &[])
                .await?
            {
                (IoDone::Extents(e), _) if !e.is_empty() && e.iter().all(|x| x.length > 0) => Ok(e),
                _ => Err(IoError::Invalid),
            }
        })
    }
}

/// How the serving side finds the nodes it serves.
pub trait NodeLookup: Send + Sync + 'static {
    /// The node with this id, if this worker has it.
    fn lookup(&self, node: NodeId) -> Option<Arc<dyn BlockIo>>;
}

/// Serves requests arriving on `sock` until the peer closes it or misbehaves.
pub async fn serve(sock: OwnedFd, nodes: Arc<dyn NodeLookup>) -> Result<(), DataError> {
    let (mut r, mut w) = into_stream(sock)?.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<(IoReply, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((reply, payload)) = rx.recv().await {
            if write_frame(&mut w, &reply, &payload).await.is_err() {
                break;
            }
        }
    });
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let result = loop {
        let req: IoRequest = match read_header(&mut r).await {
            Ok(req) => req,
            Err(DataError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        };
        let mut payload = Vec::new();
        if let IoOp::Write { len, .. } = req.op {
            let len = len as usize;
            if len > MAX_IO_PAYLOAD {
                break Err(DataError::Protocol(format!("write payload of {len} bytes")));
            }
            payload = vec![0u8; len];
            if let Err(e) = r.read_exact(&mut payload).await {
                break Err(e.into());
            }
        }
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break Ok(());
        };
        let node = nodes.lookup(req.node);
        let tx = tx.clone();
        tokio::spawn(async move {
            let (result, data) = match node {
                None => (Err(IoError::Invalid), Vec::new()),
                Some(node) => execute(node.as_ref(), req.op, payload).await,
            };
            let _ = tx.send((
                IoReply {
                    tag: req.tag,
                    result,
                },
                data,
            ));
            drop(permit);
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}

async fn execute(
    node: &dyn BlockIo,
    op: IoOp,
    payload: Vec<u8>,
) -> (Result<IoDone, IoError>, Vec<u8>) {
    match op {
        IoOp::Read { offset, len } => {
            if len as usize > MAX_IO_PAYLOAD {
                return (Err(IoError::Invalid), Vec::new());
            }
            let mut buf = vec![0u8; len as usize];
            match node.read(offset, &mut buf).await {
                Ok(()) => (Ok(IoDone::Read { len }), buf),
                Err(e) => (Err(e), Vec::new()),
            }
        }
        IoOp::Write { offset, flags, .. } => (
            node.write(offset, &payload, flags)
                .await
                .map(|()| IoDone::Done),
            Vec::new(),
        ),
        IoOp::WriteZeroes { offset, len, flags } => (
            node.write_zeroes(offset, len, flags)
                .await
                .map(|()| IoDone::Done),
            Vec::new(),
        ),
        IoOp::Discard { offset, len } => (
            node.discard(offset, len).await.map(|()| IoDone::Done),
            Vec::new(),
        ),
        IoOp::Flush => (node.flush().await.map(|()| IoDone::Done), Vec::new()),
        IoOp::BlockStatus { offset, len } => (
            node.block_status(offset, len).await.map(IoDone::Extents),
            Vec::new(),
        ),
        IoOp::Info => (
            Ok(IoDone::Info {
                size: node.size(),
                read_only: node.read_only(),
            }),
            Vec::new(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fd;

    /// A tiny in-memory node for channel tests.
    struct Mem(Mutex<Vec<u8>>);

    impl BlockIo for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
            Box::pin(async move {
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

    struct One(Arc<dyn BlockIo>);
    impl NodeLookup for One {
        fn lookup(&self, node: NodeId) -> Option<Arc<dyn BlockIo>> {
            (node == NodeId(1)).then(|| Arc::clone(&self.0))
        }
    }

    fn peer_with(generation: u64, sock: OwnedFd) -> Arc<Peer> {
        let peer = Peer::new();
        peer.attach(generation, DataClient::spawn(sock).unwrap());
        peer
    }

    #[tokio::test]
    async fn a_remote_node_reads_back_what_it_wrote_and_reports_errors() {
        let (a, b) = fd::stream_pair().unwrap();
        let mem: Arc<dyn BlockIo> = Arc::new(Mem(Mutex::new(vec![0; 1 << 20])));
        tokio::spawn(serve(b, Arc::new(One(mem))));
        let peer = peer_with(1, a);
        let node = peer.node(NodeId(1)).await.unwrap();
        assert_eq!(node.size(), 1 << 20);
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
        assert!(peer.node(NodeId(2)).await.is_err());
    }

    #[tokio::test]
    async fn a_request_to_a_dead_server_is_resubmitted_to_its_replacement() {
        let mem: Arc<dyn BlockIo> = Arc::new(Mem(Mutex::new(vec![7; 4096])));
        // Generation 1 accepts the request and dies without answering.
        let (a1, b1) = fd::stream_pair().unwrap();
        let peer = peer_with(1, a1);
        let node = RemoteNode {
            peer: Arc::clone(&peer),
            node: NodeId(1),
            size: AtomicU64::new(4096),
            read_only: false,
        };
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16];
            node.read(0, &mut buf).await.map(|()| buf)
        });
        let mut b1 = into_stream(b1).unwrap();
        let mut len = [0u8; 4];
        b1.read_exact(&mut len).await.unwrap();
        drop(b1);
        // An older generation is ignored; generation 2 gets the resubmitted read.
        let (a0, _b0) = fd::stream_pair().unwrap();
        peer.attach(1, DataClient::spawn(a0).unwrap());
        let (a2, b2) = fd::stream_pair().unwrap();
        tokio::spawn(serve(b2, Arc::new(One(mem))));
        peer.attach(2, DataClient::spawn(a2).unwrap());
        assert_eq!(reader.await.unwrap().unwrap(), vec![7u8; 16]);
    }

    #[tokio::test]
    async fn a_server_drops_a_peer_that_sends_an_oversized_header() {
        let (a, b) = fd::stream_pair().unwrap();
        let mem: Arc<dyn BlockIo> = Arc::new(Mem(Mutex::new(vec![0; 16])));
        let server = tokio::spawn(serve(b, Arc::new(One(mem))));
        let mut s = into_stream(a).unwrap();
        s.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(DataError::Protocol(_))));
    }
}
