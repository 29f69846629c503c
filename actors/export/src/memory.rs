//! What one peer can make an export worker hold: requests in flight per connection,
//! request buffer bytes per connection and per export, and the buffers themselves
//! (lent by the node's transport when it can, else pooled per connection).

use std::sync::{Arc, Mutex};

use bulkhead_block::{BlockIo, IoBuffer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::lifecycle::Lifecycle;

/// Most requests one connection may have in flight (QEMU's `MAX_NBD_REQUESTS`).
pub const MAX_IN_FLIGHT: usize = 16;
/// Largest request payload (QEMU's `NBD_MAX_BUFFER_SIZE`; also the data channel's).
pub const MAX_REQUEST_BYTES: u32 = 32 * 1024 * 1024;
/// Request buffer memory one connection may hold at once: two requests of the
/// largest size. QEMU allows 16 requests of 32 MiB per connection (512 MiB); past
/// this bound a request waits for its share before its payload is read, which
/// pushes back on the client through the socket.
pub const CONN_BUFFER_BYTES: usize = 2 * MAX_REQUEST_BYTES as usize;
/// Request buffer memory one export's connections may hold together.
pub const EXPORT_BUFFER_BYTES: usize = 256 * 1024 * 1024;
/// Pooled buffers above this size are freed after use instead.
const POOL_MAX_BUF: usize = 4 * 1024 * 1024;

/// A request buffer's share of its connection's and its export's budgets, given back
/// when dropped (when the request's reply is out).
#[derive(Debug)]
pub struct Reservation {
    _conn: OwnedSemaphorePermit,
    _export: OwnedSemaphorePermit,
}

/// A request's data buffer: lent by the backend when it has memory it can use without
/// copying (the shared-memory pool of a node in another worker, so the payload goes
/// from the socket to the node's worker and back with no copy in between), else one
/// of the connection's pooled vectors.
pub enum Buf {
    /// A pooled vector.
    Local(Vec<u8>),
    /// Memory the backend lent.
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

/// One connection's bounds: its in-flight slots, its byte budget and its buffer pool.
#[derive(Debug)]
pub struct ConnBounds {
    slots: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    pool: Mutex<Vec<Vec<u8>>>,
}

impl Default for ConnBounds {
    fn default() -> ConnBounds {
        ConnBounds::new()
    }
}

impl ConnBounds {
    /// [`MAX_IN_FLIGHT`] slots, [`CONN_BUFFER_BYTES`] of budget, an empty pool.
    pub fn new() -> ConnBounds {
        ConnBounds {
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            budget: Arc::new(Semaphore::new(CONN_BUFFER_BYTES)),
            pool: Mutex::new(Vec::new()),
        }
    }

    /// Waits for one of the connection's in-flight slots, held until the request's
    /// reply is sent (`None` never happens: the semaphore is never closed).
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    /// Waits for `len` bytes of the connection's, then the export's, buffer budget
    /// (always in that order, and released together, so waits cannot form a cycle).
    /// `None` if `len` exceeds any budget or a semaphore was closed (never, today).
    pub async fn reserve(&self, export: &Lifecycle, len: u64) -> Option<Reservation> {
        let n = u32::try_from(len.max(1)).ok()?;
        let conn = self.budget.clone().acquire_many_owned(n).await.ok()?;
        let export = export.memory().clone().acquire_many_owned(n).await.ok()?;
        Some(Reservation {
            _conn: conn,
            _export: export,
        })
    }

    /// A buffer of at least `len` bytes: the backend's if it lends one, else pooled.
    pub fn take(&self, backend: &dyn BlockIo, len: usize) -> Buf {
        if len > 0
            && let Some(b) = backend.alloc_buffer(len)
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

    /// Gives a buffer back: a pooled one is kept for reuse (up to [`MAX_IN_FLIGHT`]
    /// of at most 4 MiB); backend memory goes back to its owner when dropped.
    pub fn put(&self, buf: Buf) {
        let Buf::Local(buf) = buf else {
            return;
        };
        if buf.capacity() == 0 || buf.capacity() > POOL_MAX_BUF {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_IN_FLIGHT {
            pool.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_cannot_reserve_more_than_its_budget() {
        let conn = ConnBounds::new();
        let export = Lifecycle::new();
        let a = conn.reserve(&export, u64::from(MAX_REQUEST_BYTES)).await;
        let b = conn.reserve(&export, u64::from(MAX_REQUEST_BYTES)).await;
        assert!(a.is_some() && b.is_some());
        let third = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            conn.reserve(&export, 1),
        )
        .await;
        assert!(third.is_err(), "the budget is spent");
        drop(a);
        assert!(conn.reserve(&export, 1).await.is_some());
    }

    #[test]
    fn pooled_buffers_are_reused_and_bounded() {
        struct NoLend;
        impl BlockIo for NoLend {
            fn size(&self) -> u64 {
                0
            }
            fn read_only(&self) -> bool {
                true
            }
            fn read<'a>(&'a self, _: u64, _: &'a mut [u8]) -> bulkhead_block::IoFuture<'a, ()> {
                Box::pin(async { Ok(()) })
            }
            fn write<'a>(
                &'a self,
                _: u64,
                _: &'a [u8],
                _: bulkhead_block::WriteFlags,
            ) -> bulkhead_block::IoFuture<'a, ()> {
                Box::pin(async { Ok(()) })
            }
            fn write_zeroes(
                &self,
                _: u64,
                _: u64,
                _: bulkhead_block::ZeroFlags,
            ) -> bulkhead_block::IoFuture<'_, ()> {
                Box::pin(async { Ok(()) })
            }
            fn discard(&self, _: u64, _: u64) -> bulkhead_block::IoFuture<'_, ()> {
                Box::pin(async { Ok(()) })
            }
            fn flush(&self) -> bulkhead_block::IoFuture<'_, ()> {
                Box::pin(async { Ok(()) })
            }
            fn block_status(
                &self,
                _: u64,
                _: u64,
            ) -> bulkhead_block::IoFuture<'_, Vec<bulkhead_block::Extent>> {
                Box::pin(async { Ok(Vec::new()) })
            }
        }
        let conn = ConnBounds::new();
        let buf = conn.take(&NoLend, 4096);
        let ptr = buf.as_ptr();
        conn.put(buf);
        assert_eq!(conn.take(&NoLend, 100).as_ptr(), ptr);
        conn.put(Buf::Local(vec![0; POOL_MAX_BUF + 1]));
        assert!(conn.pool.lock().unwrap().is_empty());
    }
}
