//! Long operations the supervisor started in workers, and their progress (see
//! `design/processes.md`, "Long operations").
//!
//! A caller (the job runner to come; for now the test-only `x-bulkhead-test-fill`)
//! starts one with [`Core::start_operation`] and gets an [`OpWatch`]: a
//! `tokio::sync::watch` of the operation's state, so it can await the end or look at
//! the latest progress; nothing queues (the newest value replaces the last). Progress
//! and ends arrive from each worker's reader task, which updates [`OpTable`] directly,
//! never through the actor's mailbox: an operation's events cannot pile up behind a
//! long command. Everything a worker reports is checked: only the process that runs
//! an operation may report on it, `done` never exceeds `total`, neither goes back,
//! and an ended operation stays ended. A process that ends fails its operations; its
//! replacement knows nothing of them and cannot report on them.
//!
//! Time limits are about progress, not duration: an operation whose `done` has not
//! grown for its stall limit is failed and cancelled in the worker, however long it
//! has run before.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use bulkhead_ipc::wire::{
    ImageInfo, MAX_OPERATIONS, NodeId, OpId, Operation, ToWorker, WorkerError, WorkerErrorKind,
    WorkerId,
};
use tokio::sync::watch;

use super::graph::Graph;
use super::workers::WorkerCaller;
use super::{Core, QmpError, call_error, errors};

/// Ended operations kept for queries; older ones are forgotten (their watchers keep
/// the last state).
const KEEP_ENDED: usize = 32;

/// How an operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Cancelled on request.
    #[error("cancelled")]
    Cancelled,
    /// The worker failed it (`errno`: what it reported; its detail is logged only).
    #[error("the operation failed: {}", super::strerror(*.0))]
    Failed(i32),
    /// The worker failed it reading the source of its copy (`errno`).
    #[error("reading the source failed: {}", super::strerror(*.0))]
    SourceFailed(i32),
    /// The process running it ended first.
    #[error("the worker process running it ended ({0})")]
    WorkerEnded(String),
    /// `done` did not grow for this long.
    #[error("no progress for {} s", .0.as_secs_f64())]
    Stalled(Duration),
}

/// What a caller sees of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpState {
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
    /// Set once, when it ended.
    pub end: Option<Result<(), OpError>>,
    /// A mirror has had nothing dirty left (set once).
    pub ready: bool,
}

/// A caller's view of one operation.
#[derive(Debug, Clone)]
pub struct OpWatch {
    /// The operation.
    pub op: OpId,
    /// Its state; changes when `done` grows and when it ends.
    pub state: watch::Receiver<OpState>,
}

impl OpWatch {
    /// Waits for the end.
    pub async fn ended(&mut self) -> Result<(), OpError> {
        let end = self.state.wait_for(|s| s.end.is_some()).await;
        match end.map(|s| s.end.clone()) {
            Ok(Some(r)) => r,
            // The table never drops an operation before it ends.
            _ => Err(OpError::WorkerEnded("forgotten".into())),
        }
    }
}

/// One operation in the table.
#[derive(Debug)]
struct Entry {
    /// The instance and the process (pid) running it.
    home: WorkerId,
    pid: u32,
    node: NodeId,
    state: watch::Sender<OpState>,
}

/// What happened to a worker's report (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Taken.
    Accepted,
    /// Ignored: no such operation, or it ended.
    Unknown,
    /// Ignored: another process runs it.
    NotYours,
}

/// Every operation, running and recently ended.
#[derive(Debug, Default)]
pub struct OpTable {
    next: u64,
    ops: BTreeMap<OpId, Entry>,
    ended: VecDeque<OpId>,
}

/// The table, shared by `Core` and the reader tasks, all on the supervisor's thread.
pub type SharedOpTable = Rc<RefCell<OpTable>>;

/// One line of `x-bulkhead-query-operations`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpInfo {
    /// The operation's number.
    pub id: u64,
    /// The instance running it.
    pub worker: u32,
    /// `running`, `done`, `failed` or `cancelled`.
    pub status: &'static str,
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl OpTable {
    /// A new operation on `node` run by process `pid` of `home`.
    pub fn register(&mut self, home: WorkerId, pid: u32, node: NodeId, total: u64) -> OpWatch {
        self.next += 1;
        let op = OpId(self.next);
        let (state, rx) = watch::channel(OpState {
            done: 0,
            total,
            end: None,
            ready: false,
        });
        self.ops.insert(
            op,
            Entry {
                home,
                pid,
                node,
                state,
            },
        );
        OpWatch { op, state: rx }
    }

    /// The running entry of `op`, if process `pid` of `from` runs it.
    fn running(&self, from: WorkerId, pid: u32, op: OpId) -> Result<&Entry, Verdict> {
        let e = self.ops.get(&op).ok_or(Verdict::Unknown)?;
        if e.state.borrow().end.is_some() {
            return Err(Verdict::Unknown);
        }
        if e.home != from || e.pid != pid {
            return Err(Verdict::NotYours);
        }
        Ok(e)
    }

    /// `Progress` from process `pid` of `from`: `done` is clamped to `total`, and
    /// neither goes back (a smaller value keeps the old one).
    pub fn progress(&self, from: WorkerId, pid: u32, op: OpId, done: u64, total: u64) -> Verdict {
        let e = match self.running(from, pid, op) {
            Ok(e) => e,
            Err(v) => return v,
        };
        e.state.send_if_modified(|s| {
            let total = total.max(s.total);
            let done = done.min(total).max(s.done);
            // Only growth wakes watchers: the stall limit is about `done`.
            let grew = done > s.done;
            s.total = total;
            s.done = done;
            grew
        });
        Verdict::Accepted
    }

    /// `OperationReady` from process `pid` of `from`: wakes the watchers once.
    pub fn ready(&self, from: WorkerId, pid: u32, op: OpId) -> Verdict {
        let e = match self.running(from, pid, op) {
            Ok(e) => e,
            Err(v) => return v,
        };
        e.state
            .send_if_modified(|s| !std::mem::replace(&mut s.ready, true));
        Verdict::Accepted
    }

    /// `OperationEnded` from process `pid` of `from`.
    pub fn ended(
        &mut self,
        from: WorkerId,
        pid: u32,
        op: OpId,
        result: Result<(), WorkerError>,
    ) -> Verdict {
        if let Err(v) = self.running(from, pid, op) {
            return v;
        }
        let end = result.map_err(|e| match e.kind {
            WorkerErrorKind::Cancelled => OpError::Cancelled,
            WorkerErrorKind::SourceIo => {
                tracing::warn!(%op, error = %e, "operation failed reading its source");
                OpError::SourceFailed(if e.errno > 0 { e.errno } else { libc::EIO })
            }
            _ => {
                tracing::warn!(%op, error = %e, "operation failed in its worker");
                OpError::Failed(if e.errno > 0 { e.errno } else { libc::EIO })
            }
        });
        self.finish(op, end);
        Verdict::Accepted
    }

    /// Ends `op` with `end` if it is running (the first end stays).
    pub fn finish(&mut self, op: OpId, end: Result<(), OpError>) {
        let Some(e) = self.ops.get(&op) else {
            return;
        };
        let ended = e.state.send_if_modified(|s| {
            if s.end.is_some() {
                return false;
            }
            if end.is_ok() {
                s.done = s.total;
            }
            s.end = Some(end);
            true
        });
        if ended {
            self.ended.push_back(op);
            while self.ended.len() > KEEP_ENDED {
                if let Some(old) = self.ended.pop_front() {
                    self.ops.remove(&old);
                }
            }
        }
    }

    /// Process `pid` of `home` ended (`why`: how): its operations fail.
    pub fn process_ended(&mut self, home: WorkerId, pid: u32, why: &str) {
        let ops: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, e)| e.home == home && e.pid == pid)
            .map(|(op, _)| *op)
            .collect();
        for op in ops {
            self.finish(op, Err(OpError::WorkerEnded(why.to_string())));
        }
    }

    /// How many operations instance `home` runs.
    pub fn running_on(&self, home: WorkerId) -> usize {
        self.ops
            .values()
            .filter(|e| e.home == home && e.state.borrow().end.is_none())
            .count()
    }

    /// Where `op` runs, while it runs.
    pub fn home(&self, op: OpId) -> Option<(WorkerId, NodeId)> {
        self.ops
            .get(&op)
            .filter(|e| e.state.borrow().end.is_none())
            .map(|e| (e.home, e.node))
    }

    /// Every operation in the table, oldest first.
    pub fn list(&self) -> Vec<OpInfo> {
        self.ops
            .iter()
            .map(|(op, e)| {
                let s = e.state.borrow();
                let (status, error) = match &s.end {
                    None => ("running", None),
                    Some(Ok(())) => ("done", None),
                    Some(Err(OpError::Cancelled)) => ("cancelled", None),
                    Some(Err(e)) => ("failed", Some(e.to_string())),
                };
                OpInfo {
                    id: op.0,
                    worker: e.home.0,
                    status,
                    done: s.done,
                    total: s.total,
                    error,
                }
            })
            .collect()
    }
}

/// What workers reported about their nodes' images ([`WorkerEvent::ImageInfo`]), by
/// node, with the instance that reported it.
///
/// [`WorkerEvent::ImageInfo`]: bulkhead_ipc::wire::WorkerEvent::ImageInfo
#[derive(Debug, Default)]
pub struct ImageInfoCache(HashMap<NodeId, (WorkerId, ImageInfo)>);

impl ImageInfoCache {
    /// `ImageInfo` from instance `from`: kept only for a node it hosts (a worker
    /// speaks only for its own nodes). Returns whether it was kept.
    pub fn report(&mut self, graph: &Graph, from: WorkerId, node: NodeId, info: ImageInfo) -> bool {
        if !graph.iter().any(|n| n.id == node && n.home == from) {
            tracing::warn!(worker = %from, ?node, "image information about a node it does not host ignored");
            return false;
        }
        self.0.insert(node, (from, info));
        true
    }

    /// What the worker hosting `node` last reported about its image.
    pub fn get(&self, node: NodeId) -> Option<ImageInfo> {
        self.0.get(&node).map(|(_, i)| *i)
    }

    /// Forgets nodes deleted or moved to another instance since they reported.
    pub fn prune(&mut self, graph: &Graph) {
        self.0
            .retain(|node, (home, _)| graph.iter().any(|n| n.id == *node && n.home == *home));
    }
}

/// Fails `op` when its `done` has not grown for `stall`, and asks its worker to stop
/// it. Ends with the operation.
async fn watch_stall(
    table: SharedOpTable,
    mut watch: OpWatch,
    stall: Duration,
    caller: Option<WorkerCaller>,
) {
    loop {
        match tokio::time::timeout(stall, watch.state.changed()).await {
            Ok(Ok(())) if watch.state.borrow().end.is_none() => {}
            Ok(_) => return,
            Err(_) => {
                tracing::warn!(op = %watch.op, ?stall, "operation made no progress; cancelling it");
                table
                    .borrow_mut()
                    .finish(watch.op, Err(OpError::Stalled(stall)));
                if let Some(c) = caller {
                    let _ = c
                        .call(ToWorker::CancelOperation { op: watch.op }, &[])
                        .await;
                }
                return;
            }
        }
    }
}

impl Core {
    /// Starts `operation` in the worker hosting its node and returns a watch of it.
    /// `stall`: how long `done` may stay the same before the operation is failed.
    pub async fn start_operation(
        &mut self,
        operation: Operation,
        stall: Duration,
    ) -> Result<OpWatch, QmpError> {
        self.start_operation_with(operation, stall, &[]).await
    }

    /// [`Core::start_operation`] with descriptors the operation needs (a bitmap
    /// backup's frozen bitmap).
    pub async fn start_operation_with(
        &mut self,
        operation: Operation,
        stall: Duration,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<OpWatch, QmpError> {
        let node = operation.node();
        let home = match &operation {
            Operation::Fill { .. }
            | Operation::Backup { .. }
            | Operation::Stream { .. }
            | Operation::Mirror { .. } => {
                let Some(home) = self.graph.iter().find(|n| n.id == node).map(|n| n.home) else {
                    return Err(errors::operation_node_gone());
                };
                home
            }
            // A commit between two nodes of one worker runs there (a hop would
            // isolate nothing: that worker reads and writes both anyway); between
            // workers, in the job runner, over channels to both.
            Operation::Commit { top, base, .. } if top.home == base.home => top.home,
            Operation::Commit { top, base, .. } => self.connect_job_runner(&[*top, *base]).await?,
        };
        let total = operation.total();
        // The worker refuses more too; counting here keeps the bound the supervisor's.
        if self.ops.borrow().running_on(home) >= MAX_OPERATIONS {
            return Err(errors::from_error(super::strerror(libc::EBUSY)));
        }
        let w = self.worker(home).await?;
        let (pid, caller) = (w.pid(), w.caller());
        // In the table before the worker hears of it: its first events may come
        // before its reply.
        let watch = self.ops.borrow_mut().register(home, pid, node, total);
        let op = watch.op;
        if let Err(e) = caller
            .call(ToWorker::StartOperation { op, operation }, fds)
            .await
        {
            let errno = match &e {
                super::workers::CallError::Worker(w) if w.errno > 0 => w.errno,
                _ => libc::EIO,
            };
            self.ops
                .borrow_mut()
                .finish(op, Err(OpError::Failed(errno)));
            return Err(call_error(e));
        }
        tokio::task::spawn_local(watch_stall(
            Rc::clone(&self.ops),
            watch.clone(),
            stall,
            Some(caller),
        ));
        Ok(watch)
    }

    /// Asks the worker running `op` to cancel it; the end comes as usual.
    pub async fn cancel_operation(&mut self, op: OpId) -> Result<(), QmpError> {
        let Some((home, _)) = self.ops.borrow().home(op) else {
            return Err(errors::operation_not_found(op.0));
        };
        let Some(w) = self.running(home) else {
            return Err(errors::operation_not_found(op.0));
        };
        match w.call(ToWorker::CancelOperation { op }, &[]).await {
            Ok(_) => Ok(()),
            // It ended meanwhile.
            Err(super::workers::CallError::Worker(e)) if e.kind == WorkerErrorKind::NotFound => {
                Ok(())
            }
            Err(e) => Err(call_error(e)),
        }
    }

    /// Every operation, for `x-bulkhead-query-operations`.
    pub fn query_operations(&self) -> Vec<OpInfo> {
        self.ops.borrow().list()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: WorkerId = WorkerId(3);

    fn state(t: &OpTable, op: OpId) -> OpState {
        t.ops[&op].state.borrow().clone()
    }

    #[test]
    fn progress_is_taken_only_from_the_process_running_the_op() {
        let mut t = OpTable::default();
        let w = t.register(W, 100, NodeId(1), 1000);
        assert_eq!(t.progress(W, 100, w.op, 10, 1000), Verdict::Accepted);
        // Another instance, the same instance's next process, an unknown op.
        assert_eq!(
            t.progress(WorkerId(4), 100, w.op, 20, 1000),
            Verdict::NotYours
        );
        assert_eq!(t.progress(W, 101, w.op, 20, 1000), Verdict::NotYours);
        assert_eq!(t.progress(W, 100, OpId(99), 20, 1000), Verdict::Unknown);
        assert_eq!(state(&t, w.op).done, 10);
        assert_eq!(t.ended(WorkerId(4), 100, w.op, Ok(())), Verdict::NotYours);
        assert_eq!(state(&t, w.op).end, None);
    }

    #[test]
    fn progress_is_clamped_and_never_goes_back() {
        let mut t = OpTable::default();
        let w = t.register(W, 1, NodeId(1), 1000);
        t.progress(W, 1, w.op, 500, 1000);
        t.progress(W, 1, w.op, 200, 1000);
        assert_eq!(state(&t, w.op).done, 500);
        t.progress(W, 1, w.op, u64::MAX, 10);
        let s = state(&t, w.op);
        assert_eq!((s.done, s.total), (1000, 1000));
    }

    #[test]
    fn an_ended_operation_stays_ended() {
        let mut t = OpTable::default();
        let w = t.register(W, 1, NodeId(1), 1000);
        let cancelled = WorkerError::new(WorkerErrorKind::Cancelled, libc::ECANCELED, "x");
        assert_eq!(t.ended(W, 1, w.op, Err(cancelled)), Verdict::Accepted);
        assert_eq!(t.ended(W, 1, w.op, Ok(())), Verdict::Unknown);
        assert_eq!(t.progress(W, 1, w.op, 5, 1000), Verdict::Unknown);
        assert_eq!(state(&t, w.op).end, Some(Err(OpError::Cancelled)));
    }

    #[test]
    fn a_process_that_ends_fails_its_operations_and_only_its() {
        let mut t = OpTable::default();
        let mine = t.register(W, 1, NodeId(1), 10);
        let next = t.register(W, 2, NodeId(1), 10);
        let other = t.register(WorkerId(4), 1, NodeId(2), 10);
        t.process_ended(W, 1, "killed by signal 9");
        assert_eq!(
            state(&t, mine.op).end,
            Some(Err(OpError::WorkerEnded("killed by signal 9".into())))
        );
        assert_eq!(state(&t, next.op).end, None);
        assert_eq!(state(&t, other.op).end, None);
        // The dead process's late report changes nothing.
        assert_eq!(t.ended(W, 1, mine.op, Ok(())), Verdict::Unknown);
    }

    #[test]
    fn ended_operations_are_forgotten_beyond_the_bound() {
        let mut t = OpTable::default();
        for _ in 0..KEEP_ENDED + 5 {
            let w = t.register(W, 1, NodeId(1), 1);
            t.finish(w.op, Ok(()));
        }
        let running = t.register(W, 1, NodeId(1), 1);
        assert_eq!(t.list().len(), KEEP_ENDED + 1);
        assert!(t.home(running.op).is_some());
        assert_eq!((t.running_on(W), t.running_on(WorkerId(4))), (1, 0));
    }

    #[test]
    fn image_information_is_kept_only_from_the_nodes_own_instance() {
        let mut graph = Graph::default();
        crate::supervisor::graph::tests::node(&mut graph, "a", None);
        let id = graph.get("a").map(|n| n.id).expect("node a");
        let info = ImageInfo {
            dirty: true,
            corrupt: false,
            actual_size: 4096,
        };
        let mut cache = ImageInfoCache::default();
        // Instance 1 hosts it; 2 does not, and no one hosts node 99.
        assert!(!cache.report(&graph, WorkerId(2), id, info));
        assert!(!cache.report(&graph, WorkerId(1), NodeId(99), info));
        assert_eq!(cache.get(id), None);
        assert!(cache.report(&graph, WorkerId(1), id, info));
        assert_eq!(cache.get(id), Some(info));
        // Moved to another instance: what the old one said is stale.
        if let Some(n) = graph.get_mut("a") {
            n.home = WorkerId(2);
        }
        cache.prune(&graph);
        assert_eq!(cache.get(id), None);
    }

    #[test]
    fn a_stalled_operation_fails_and_a_progressing_one_does_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let table: SharedOpTable = Rc::default();
            let w = table.borrow_mut().register(W, 1, NodeId(1), 100);
            let stall = Duration::from_millis(150);
            let guard =
                tokio::task::spawn_local(watch_stall(Rc::clone(&table), w.clone(), stall, None));
            // Progress every 50 ms for 400 ms: longer than the limit in all.
            for done in 1..=8 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                table.borrow().progress(W, 1, w.op, done, 100);
            }
            assert_eq!(w.state.borrow().end, None);
            let mut w2 = w.clone();
            assert_eq!(w2.ended().await, Err(OpError::Stalled(stall)));
            let _ = guard.await;
        });
    }
}
