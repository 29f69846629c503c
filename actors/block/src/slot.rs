//! A node whose implementation can be replaced while requests are in flight.
//!
//! Runs in driver workers: every node a worker hosts sits in a [`Slot`], and parents
//! and data channels hold the slot, never the implementation. `blockdev-reopen` (new
//! options, a new image descriptor, a new child) and `blockdev-set-active` build a new
//! implementation and [`Slot::replace`] it in. Each request takes its own `Arc` of the
//! implementation current when it starts, so requests in flight finish on the old one
//! and new requests go to the new one: nothing is lost or sent twice. `replace`
//! returns once the old implementation has no request left (a drain, as QEMU drains a
//! node before it reopens it), so after a reopen reply nothing touches the old child.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::io::{BlockIo, Extent, IoBuffer, IoFuture, SparseFuture, WriteFlags, ZeroFlags};

/// How long [`Slot::replace`] waits for requests on the old implementation.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A replaceable node.
pub struct Slot {
    current: RwLock<Arc<dyn BlockIo>>,
    /// For nodes whose driver owns its image's metadata (a format engine): every
    /// request holds it shared, and a reopen holds it exclusively while the old
    /// implementation closes and the new one opens, so two engines never run on one
    /// image at once. `None` for the others, which pay nothing for it.
    gate: Option<tokio::sync::RwLock<()>>,
}

/// A request's (shared) or a reopen's (exclusive) hold on a gated slot.
pub enum Hold<'a> {
    /// The slot has no gate.
    Free,
    /// A request's.
    Shared(tokio::sync::RwLockReadGuard<'a, ()>),
    /// A reopen's: no request runs until it is dropped.
    Exclusive(tokio::sync::RwLockWriteGuard<'a, ()>),
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

/// The old implementation still had requests when the drain gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("requests on the replaced node did not finish within {0:?}")]
pub struct DrainTimeout(pub Duration);

impl Slot {
    /// A slot holding `node`.
    pub fn new(node: Arc<dyn BlockIo>) -> Slot {
        Slot {
            current: RwLock::new(node),
            gate: None,
        }
    }

    /// A slot holding `node`, whose reopens run exclusively (see [`Slot::exclusive`]).
    pub fn gated(node: Arc<dyn BlockIo>) -> Slot {
        Slot {
            current: RwLock::new(node),
            gate: Some(tokio::sync::RwLock::new(())),
        }
    }

    /// Waits until no request runs on the slot and holds new ones back until the
    /// returned hold is dropped (a gated slot; others return at once).
    pub async fn exclusive(&self) -> Hold<'_> {
        match &self.gate {
            Some(g) => Hold::Exclusive(g.write().await),
            None => Hold::Free,
        }
    }

    /// Puts `node` in place at once (under an exclusive hold: nothing runs on the old).
    pub fn set(&self, node: Arc<dyn BlockIo>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = node;
    }

    /// A request's hold, then the implementation to run it on.
    async fn enter(&self) -> (Hold<'_>, Arc<dyn BlockIo>) {
        let hold = match &self.gate {
            Some(g) => Hold::Shared(g.read().await),
            None => Hold::Free,
        };
        (hold, self.current())
    }

    /// The implementation new requests go to.
    pub fn current(&self) -> Arc<dyn BlockIo> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts `node` in place of the current implementation, then waits (up to
    /// `timeout`) until no request holds the old one any more.
    pub async fn replace(
        &self,
        node: Arc<dyn BlockIo>,
        timeout: Duration,
    ) -> Result<(), DrainTimeout> {
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            node,
        );
        let start = Instant::now();
        // Only requests (each holding a clone) keep the old implementation alive now.
        // Their completions run on this same runtime, so yield between checks.
        while Arc::strong_count(&old) > 1 {
            if start.elapsed() > timeout {
                return Err(DrainTimeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

impl BlockIo for Slot {
    fn size(&self) -> u64 {
        self.current().size()
    }

    fn read_only(&self) -> bool {
        self.current().read_only()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.read(offset, buf).await
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.write(offset, buf, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.discard(offset, len).await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.flush().await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.block_status(offset, len).await
        })
    }

    fn refresh(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.refresh().await
        })
    }

    fn map(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<crate::io::MapRun>> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.map(offset, len).await
        })
    }

    fn resize(&self, new_size: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.resize(new_size).await
        })
    }

    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.read_sparse(offset, buf).await
        })
    }

    fn alloc_buffer(&self, len: usize) -> Option<IoBuffer> {
        self.current().alloc_buffer(len)
    }

    fn format_info(&self) -> Option<crate::io::FormatInfo> {
        self.current().format_info()
    }

    fn snapshot_create(
        &self,
        request: crate::io::SnapshotRequest,
    ) -> crate::io::SnapshotFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.snapshot_create(request).await
        })
    }

    fn copy_on_read(&self, offset: u64, len: u64, layers: u32) -> crate::io::IoFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.copy_on_read(offset, len, layers).await
        })
    }

    fn copy_before_write(&self, offset: u64, len: u64) -> crate::io::IoFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.copy_before_write(offset, len).await
        })
    }

    fn mirror(
        &self,
        request: crate::mirror::MirrorRequest,
    ) -> crate::io::IoFuture<'_, crate::mirror::MirrorStatus> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.mirror(request).await
        })
    }

    fn snapshot_read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> crate::io::IoFuture<'a, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.snapshot_read(offset, buf).await
        })
    }

    fn snapshot_block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> crate::io::IoFuture<'_, Vec<crate::io::Extent>> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.snapshot_block_status(offset, len).await
        })
    }

    fn snapshot_discard(&self, offset: u64, len: u64) -> crate::io::IoFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.snapshot_discard(offset, len).await
        })
    }

    fn stored_bitmaps(
        &self,
        request: crate::io::StoredBitmaps,
    ) -> crate::io::SnapshotFuture<'_, Vec<crate::io::StoredBitmap>> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.stored_bitmaps(request).await
        })
    }

    fn set_backing_file(&self, name: String, format: String) -> crate::io::SnapshotFuture<'_, ()> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.set_backing_file(name, format).await
        })
    }

    fn snapshot_delete(
        &self,
        id: Option<String>,
        name: Option<String>,
    ) -> crate::io::SnapshotFuture<'_, crate::io::SnapshotEntry> {
        Box::pin(async move {
            let (_hold, node) = self.enter().await;
            node.snapshot_delete(id, name).await
        })
    }

    fn close(&self) -> IoFuture<'_, ()> {
        // Closing runs under the caller's exclusive hold (a reopen) or when the
        // node is gone (no requests): it takes none itself.
        let node = self.current();
        Box::pin(async move { node.close().await })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Notify;

    use super::*;
    use crate::io::IoError;

    /// A node that records writes and can hold them until released.
    struct Gate {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        open: Arc<Notify>,
        held: Arc<AtomicUsize>,
    }

    /// The test's handles on a gate: it must not keep the node itself alive, or the
    /// drain would wait for the test.
    struct Handles {
        open: Arc<Notify>,
        held: Arc<AtomicUsize>,
    }

    impl Gate {
        fn open(name: &'static str, log: &Arc<Mutex<Vec<String>>>) -> (Arc<dyn BlockIo>, Handles) {
            let open = Arc::new(Notify::new());
            let held = Arc::new(AtomicUsize::new(0));
            let gate = Arc::new(Gate {
                name,
                log: Arc::clone(log),
                open: Arc::clone(&open),
                held: Arc::clone(&held),
            });
            (gate, Handles { open, held })
        }
    }

    impl BlockIo for Gate {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read<'a>(&'a self, _offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
            Box::pin(async move {
                buf.fill(self.name.as_bytes()[0]);
                Ok(())
            })
        }
        fn write<'a>(&'a self, offset: u64, _buf: &'a [u8], _f: WriteFlags) -> IoFuture<'a, ()> {
            Box::pin(async move {
                self.held.fetch_add(1, Ordering::SeqCst);
                self.open.notified().await;
                if let Ok(mut log) = self.log.lock() {
                    log.push(format!("{} {offset}", self.name));
                }
                Ok(())
            })
        }
        fn write_zeroes(&self, _o: u64, _l: u64, _f: ZeroFlags) -> IoFuture<'_, ()> {
            Box::pin(async { Err(IoError::Unsupported) })
        }
        fn discard(&self, _o: u64, _l: u64) -> IoFuture<'_, ()> {
            Box::pin(async { Err(IoError::Unsupported) })
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn block_status(&self, _o: u64, _l: u64) -> IoFuture<'_, Vec<Extent>> {
            Box::pin(async { Err(IoError::Unsupported) })
        }
    }

    #[tokio::test]
    async fn requests_in_flight_finish_on_the_old_node_and_new_ones_reach_the_new_node() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (old_node, old) = Gate::open("old", &log);
        let (new_node, new) = Gate::open("new", &log);
        let slot = Arc::new(Slot::new(old_node));
        // Two writes start on the old node and are held there.
        let mut inflight = Vec::new();
        for offset in [0u64, 512] {
            let slot = Arc::clone(&slot);
            inflight.push(tokio::spawn(async move {
                slot.write(offset, &[1u8; 512], WriteFlags::default()).await
            }));
        }
        while old.held.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        // The swap cannot finish while they are held: it drains.
        let swap = {
            let slot = Arc::clone(&slot);
            tokio::spawn(async move { slot.replace(new_node, DRAIN_TIMEOUT).await })
        };
        tokio::task::yield_now().await;
        assert!(!swap.is_finished());
        // A request started after the swap goes to the new node.
        let later = {
            let slot = Arc::clone(&slot);
            tokio::spawn(async move { slot.write(4096, &[2u8; 512], WriteFlags::default()).await })
        };
        while new.held.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        let mut buf = [0u8; 4];
        assert_eq!(slot.read(0, &mut buf).await, Ok(()));
        assert_eq!(buf, [b'n'; 4], "reads after the swap see the new node");
        // Release the old node's writes: both complete, the drain ends.
        old.open.notify_waiters();
        for t in inflight {
            assert_eq!(t.await.ok(), Some(Ok(())));
        }
        assert_eq!(swap.await.ok(), Some(Ok(())));
        new.open.notify_waiters();
        assert_eq!(later.await.ok(), Some(Ok(())));
        let mut got = log.lock().map(|l| l.clone()).unwrap_or_default();
        got.sort();
        assert_eq!(got, vec!["new 4096", "old 0", "old 512"]);
    }

    #[tokio::test]
    async fn a_drain_that_never_ends_times_out_but_the_swap_stands() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (old_node, old) = Gate::open("old", &log);
        let slot = Arc::new(Slot::new(old_node));
        let stuck = {
            let slot = Arc::clone(&slot);
            tokio::spawn(async move { slot.write(0, &[1u8; 512], WriteFlags::default()).await })
        };
        while old.held.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        let (new_node, _new) = Gate::open("new", &log);
        let r = slot.replace(new_node, Duration::from_millis(20)).await;
        assert_eq!(r, Err(DrainTimeout(Duration::from_millis(20))));
        let mut buf = [0u8; 1];
        assert_eq!(slot.read(0, &mut buf).await, Ok(()));
        assert_eq!(buf, [b'n']);
        old.open.notify_waiters();
        assert_eq!(stuck.await.ok(), Some(Ok(())));
    }
}
