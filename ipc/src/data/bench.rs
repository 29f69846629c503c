use std::sync::Arc;

use bulkhead_block::{BlockIo, Extent, IoFuture, WriteFlags, ZeroFlags};

use super::{DataClient, NewChannel, NodeLookup, Peer, serve};
use crate::ring::RingLayout;
use crate::wire::NodeId;

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
