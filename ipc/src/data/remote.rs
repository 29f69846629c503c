//! Reaching a node in another worker across that worker's restarts: [`Peer`] and
//! [`RemoteNode`].
//!
//! This is where restart fencing lives. A [`DataClient`] is one channel to one process;
//! a [`Peer`] holds the channel to the serving worker's current incarnation and moves a
//! request that was pending on a dead one to a newer generation only. [`RemoteNode`]
//! is the [`BlockIo`] drivers and exports see, so none of them knows a restart happened.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bulkhead_block::{
    BlockIo, Extent, IoBuffer, IoError, IoFuture, IoResult, MapRun, SparseFuture, SparseReadError,
    WriteFlags, ZeroFlags,
};

use super::client::{DataClient, Done, Req};
use crate::wire::NodeId;

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
    pub(super) state: tokio::sync::watch::Sender<Option<(u64, Arc<DataClient>)>>,
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
    pub(super) peer: Arc<Peer>,
    pub(super) node: NodeId,
    pub(super) size: AtomicU64,
    pub(super) read_only: bool,
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
            compressed: flags.compressed,
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

    fn map(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<MapRun>> {
        Box::pin(async move {
            match self
                .peer
                .call(self.node, &mut Req::Map { offset, len })
                .await?
            {
                Done::Map(runs) => Ok(runs),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::server::serve;
    use crate::data::test_util::*;
    use crate::ring::{CHUNK, Region, op};
    use std::os::fd::AsFd;

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
}
