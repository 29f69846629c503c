//! Long operations in a driver worker ([`ToWorker::StartOperation`]): each runs in a
//! task of its own, so the control loop keeps answering (the heartbeat among them)
//! however long the work takes. Progress goes to the supervisor at most every
//! [`PROGRESS_EVERY`] per operation (the newest value at that moment: nothing queues),
//! then one `OperationEnded`. See `design/processes.md`, "Long operations".
//!
//! [`ToWorker::StartOperation`]: bulkhead_ipc::wire::ToWorker::StartOperation

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_block::{BlockIo, WriteFlags};
use bulkhead_ipc::control::ControlChannel;
use bulkhead_ipc::wire::{
    FromWorker, MAX_OPERATIONS, NodeId, OpId, Operation, WorkerError, WorkerErrorKind, WorkerEvent,
};
use tokio::sync::watch;

/// Least time between two progress events of one operation.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Largest write of a fill.
const CHUNK: u64 = 1 << 20;

/// One running operation: its node and the flag that cancels it.
struct Running {
    node: NodeId,
    cancel: watch::Sender<bool>,
}

/// The operations a worker runs.
pub(crate) struct Operations {
    running: Arc<Mutex<HashMap<OpId, Running>>>,
    chan: Arc<ControlChannel>,
}

fn err(kind: WorkerErrorKind, errno: i32, detail: impl Into<String>) -> WorkerError {
    WorkerError::new(kind, errno, detail)
}

impl Operations {
    pub(crate) fn new(chan: Arc<ControlChannel>) -> Operations {
        Operations {
            running: Arc::default(),
            chan,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OpId, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `operation` on `node` (the worker's own, looked up by the caller) in a
    /// task of its own; refused beyond [`MAX_OPERATIONS`], for an id that runs, or
    /// for a range or node the operation cannot work on.
    pub(crate) fn start(
        &self,
        op: OpId,
        operation: Operation,
        node: Arc<dyn BlockIo>,
    ) -> Result<(), WorkerError> {
        let mut running = self.lock();
        if running.contains_key(&op) {
            return Err(err(
                WorkerErrorKind::Invalid,
                libc::EEXIST,
                "operation runs",
            ));
        }
        if running.len() >= MAX_OPERATIONS {
            return Err(err(
                WorkerErrorKind::Busy,
                libc::EBUSY,
                "too many operations",
            ));
        }
        let Operation::Fill {
            node: id,
            offset,
            len,
            ..
        } = &operation;
        if offset.checked_add(*len).is_none_or(|end| end > node.size()) {
            return Err(err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "range beyond the node",
            ));
        }
        if node.read_only() {
            return Err(err(WorkerErrorKind::Invalid, libc::EROFS, "read-only node"));
        }
        let (cancel, cancelled) = watch::channel(false);
        running.insert(op, Running { node: *id, cancel });
        let table = Arc::clone(&self.running);
        let mut report = Reporter {
            op,
            chan: Arc::clone(&self.chan),
            last: None,
        };
        tokio::spawn(async move {
            let result = run(operation, node, cancelled, &mut report).await;
            // Out of the table before the end is reported: the supervisor may start
            // another at once.
            table.lock().unwrap_or_else(|p| p.into_inner()).remove(&op);
            let ended = WorkerEvent::OperationEnded { op, result };
            if let Err(e) = report.chan.send(&FromWorker::Event(ended), &[]).await {
                tracing::warn!(%op, error = %e, "could not report the end of an operation");
            }
        });
        Ok(())
    }

    /// Asks `op` to stop; its end is reported as usual.
    pub(crate) fn cancel(&self, op: OpId) -> Result<(), WorkerError> {
        match self.lock().get(&op) {
            Some(r) => {
                r.cancel.send_replace(true);
                Ok(())
            }
            None => Err(err(
                WorkerErrorKind::NotFound,
                libc::ENOENT,
                "no such operation",
            )),
        }
    }

    /// Cancels every operation on `node` (it is being closed).
    pub(crate) fn cancel_node(&self, node: NodeId) {
        for r in self.lock().values().filter(|r| r.node == node) {
            r.cancel.send_replace(true);
        }
    }
}

/// Sends one operation's progress, at most every [`PROGRESS_EVERY`].
struct Reporter {
    op: OpId,
    chan: Arc<ControlChannel>,
    last: Option<Instant>,
}

impl Reporter {
    async fn progress(&mut self, done: u64, total: u64) {
        if self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let event = WorkerEvent::Progress {
            op: self.op,
            done,
            total,
        };
        if let Err(e) = self.chan.send(&FromWorker::Event(event), &[]).await {
            tracing::warn!(op = %self.op, error = %e, "could not report progress");
        }
    }
}

fn cancelled() -> WorkerError {
    err(WorkerErrorKind::Cancelled, libc::ECANCELED, "cancelled")
}

async fn run(
    operation: Operation,
    node: Arc<dyn BlockIo>,
    mut cancel: watch::Receiver<bool>,
    report: &mut Reporter,
) -> Result<(), WorkerError> {
    let Operation::Fill {
        offset,
        len,
        pattern,
        speed,
        ..
    } = operation;
    // About ten writes a second at the speed limit, so progress and cancelling stay
    // prompt.
    let chunk = match speed {
        0 => CHUNK,
        s => (s / 10).clamp(512, CHUNK),
    };
    let buf = vec![pattern; usize::try_from(chunk).unwrap_or(1 << 20)];
    let start = tokio::time::Instant::now();
    let mut done = 0u64;
    report.progress(0, len).await;
    while done < len {
        // A write is never abandoned half-way: cancelling takes effect between chunks.
        if *cancel.borrow() {
            return Err(cancelled());
        }
        let n = chunk.min(len - done);
        let slice = &buf[..usize::try_from(n).unwrap_or(buf.len())];
        node.write(offset + done, slice, WriteFlags::default())
            .await
            .map_err(|e| err(WorkerErrorKind::Io, e.errno(), e.to_string()))?;
        done += n;
        report.progress(done, len).await;
        if speed > 0 {
            let due = start + Duration::from_secs_f64(done as f64 / speed as f64);
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                _ = cancel.wait_for(|c| *c) => return Err(cancelled()),
            }
        }
    }
    node.flush()
        .await
        .map_err(|e| err(WorkerErrorKind::Io, e.errno(), e.to_string()))
}
