//! What the channel tests share: an in-memory node, a lookup serving it as node 1, and
//! a channel served end to end in one process.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bulkhead_block::{BlockIo, Extent, IoError, IoFuture, WriteFlags, ZeroFlags};

use super::{ChannelFds, DataClient, DataError, NewChannel, NodeLookup, Peer, RemoteNode, serve};
use crate::ring::{CHUNK, RingLayout};
use crate::wire::NodeId;

/// A tiny in-memory node for channel tests. Reads at `STUCK` never complete.
pub(super) struct Mem(pub(super) Mutex<Vec<u8>>);

pub(super) const STUCK: u64 = 1 << 40;

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

pub(super) struct One(pub(super) Arc<dyn BlockIo>);
impl NodeLookup for One {
    fn lookup(&self, node: NodeId) -> Option<Arc<dyn BlockIo>> {
        (node == NodeId(1)).then(|| Arc::clone(&self.0))
    }
}

pub(super) fn small() -> RingLayout {
    RingLayout {
        entries: 8,
        pool_bytes: 4 * CHUNK as u64,
    }
}

pub(super) fn ends(layout: RingLayout) -> (ChannelFds, ChannelFds) {
    NewChannel::create(layout).unwrap().into_ends().unwrap()
}

pub(super) fn mem(size: usize) -> Arc<dyn BlockIo> {
    Arc::new(Mem(Mutex::new(vec![0; size])))
}

/// A served channel: the server task and a peer attached at generation 1.
pub(super) fn served(
    layout: RingLayout,
    node: Arc<dyn BlockIo>,
) -> (Arc<Peer>, tokio::task::JoinHandle<Result<(), DataError>>) {
    let (s, c) = ends(layout);
    let server = tokio::spawn(serve(s, layout, Arc::new(One(node))));
    let peer = Peer::new();
    peer.attach(1, DataClient::spawn(c, layout).unwrap());
    (peer, server)
}

pub(super) fn remote(peer: &Arc<Peer>, size: u64) -> RemoteNode {
    RemoteNode {
        peer: Arc::clone(peer),
        node: NodeId(1),
        size: AtomicU64::new(size),
        read_only: false,
    }
}

pub(super) fn client_of(peer: &Peer) -> Arc<DataClient> {
    peer.state.borrow().as_ref().unwrap().1.clone()
}
