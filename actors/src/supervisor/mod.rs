//! The supervisor: owns the block graph, the image descriptors and the workers, and
//! carries out QMP commands one at a time.
//!
//! Runs in the supervisor process on the actix System thread. [`Core`] is plain async
//! code; [`actor`] wraps it so that commands from every monitor are serialized (one
//! command at a time, as QEMU does under its big lock) and worker deaths arrive between
//! commands. Commands reach `Core` already checked against the QAPI schema.

pub mod actor;
pub mod blockdev;
pub mod export;
pub mod graph;
pub mod workers;

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bulkhead_ipc::data::NewChannel;
use bulkhead_ipc::ring::RingLayout;
use bulkhead_ipc::wire::{ToWorker, WorkerEvent, WorkerKind};
use bulkhead_qmp::request::ErrorClass;
use serde_json::{Map, Value, json};

use crate::events::EventSink;
use graph::Graph;
use workers::{CallError, WorkerDied, WorkerHandle};

/// A QMP error: class and the exact `desc` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The description shown to the client.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
}

/// The commands bulkhead implements, as `query-commands` lists them.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
    "query-block",
    "x-debug-query-block-graph",
    "block_resize",
    "nbd-server-start",
    "nbd-server-stop",
    "nbd-server-add",
    "nbd-server-remove",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "x-bulkhead-query-workers",
    // Served by the QMP front (`front::chardev`), never sent to the core.
    "query-chardev",
    "chardev-add",
    "chardev-remove",
];

/// Most restarts of one worker kind within [`RESTART_WINDOW`].
pub const RESTART_BUDGET: usize = 5;
/// The window of the restart budget.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The restart budget: [`RESTART_BUDGET`], or `BULKHEAD_RESTART_BUDGET` from the
/// environment (kill-loop tests and operators with flaky hardware raise it).
fn restart_budget() -> usize {
    std::env::var("BULKHEAD_RESTART_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RESTART_BUDGET)
}

/// What the session must do after sending a command's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Nothing.
    Continue,
    /// Exit the daemon (after `quit`).
    Quit,
}

/// The supervisor's state and command implementations.
pub struct Core {
    graph: Graph,
    workers: HashMap<WorkerKind, WorkerHandle>,
    channels: HashSet<(WorkerKind, WorkerKind)>,
    events: EventSink,
    on_death: Rc<dyn Fn(WorkerDied)>,
    on_event: Rc<dyn Fn(WorkerKind, WorkerEvent)>,
    generated_names: u64,
    nbd: Option<export::NbdServer>,
    exports: Vec<export::Export>,
    /// Incarnation number of each worker kind (grows with every spawn).
    generations: HashMap<WorkerKind, u64>,
    /// Recent restart times per kind, for the restart budget.
    restarts: HashMap<WorkerKind, VecDeque<Instant>>,
    /// Restarts so far per kind, for `x-bulkhead-query-workers`.
    restart_counts: HashMap<WorkerKind, u64>,
    /// Set once the daemon is exiting: dying workers are not replaced.
    stopping: bool,
    /// Start-up (the command line) is complete; until then the NBD server accepts no
    /// client.
    started: bool,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("workers", &self.workers.keys())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A supervisor with no nodes. `on_death` is told when a worker process ends.
    pub fn new(
        events: EventSink,
        on_event: Rc<dyn Fn(WorkerKind, WorkerEvent)>,
        on_death: Rc<dyn Fn(WorkerDied)>,
    ) -> Core {
        Core {
            graph: Graph::default(),
            workers: HashMap::new(),
            channels: HashSet::new(),
            events,
            on_death,
            on_event,
            generated_names: 0,
            nbd: None,
            exports: Vec::new(),
            generations: HashMap::new(),
            restarts: HashMap::new(),
            restart_counts: HashMap::new(),
            stopping: false,
            started: false,
        }
    }

    /// Runs one command with already validated arguments.
    pub async fn execute(
        &mut self,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<(Value, After), QmpError> {
        let ret = match command {
            "query-version" => crate::version::query_version(),
            "query-commands" => {
                Value::Array(COMMANDS.iter().rev().map(|c| json!({"name": c})).collect())
            }
            "quit" => {
                self.delete_all_exports().await;
                return Ok((json!({}), After::Quit));
            }
            "blockdev-add" => self.blockdev_add(Value::Object(args)).await?,
            "blockdev-del" => self.blockdev_del(&args).await?,
            "query-named-block-nodes" => self.graph.query_named_block_nodes(),
            "query-block" => json!([]),
            "x-debug-query-block-graph" => self.graph.debug_graph(),
            "block_resize" => self.block_resize(&args).await?,
            "nbd-server-start" => self.nbd_server_start(&args).await?,
            "nbd-server-stop" => self.nbd_server_stop().await?,
            "nbd-server-add" => self.nbd_server_add(&args).await?,
            "nbd-server-remove" => self.nbd_server_remove(&args).await?,
            "block-export-add" => self.block_export_add(&args).await?,
            "block-export-del" => self.block_export_del(&args).await?,
            "query-block-exports" => self.query_block_exports(),
            "x-bulkhead-query-workers" => self.query_workers(),
            other => {
                return Err(QmpError {
                    class: ErrorClass::CommandNotFound,
                    desc: format!("The command {other} has not been found"),
                });
            }
        };
        Ok((ret, After::Continue))
    }

    /// Called when a worker process ended (it has been reaped). If nodes or exports
    /// live in it, a replacement is started and their state replayed, within a budget
    /// of [`RESTART_BUDGET`] restarts per [`RESTART_WINDOW`].
    pub async fn worker_died(&mut self, died: &WorkerDied) {
        if self
            .workers
            .get(&died.kind)
            .is_none_or(|w| w.pid() != died.pid)
        {
            return;
        }
        self.workers.remove(&died.kind);
        let kind = died.kind;
        let has_state = self.graph.iter().any(|n| n.driver.worker() == kind)
            || (kind == WorkerKind::Nbd && self.nbd.is_some());
        if self.stopping || !has_state {
            self.channels.retain(|(a, b)| *a != kind && *b != kind);
            return;
        }
        let now = Instant::now();
        let history = self.restarts.entry(kind).or_default();
        history.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if history.len() >= restart_budget() {
            tracing::error!(worker = %kind, status = %died.status, "restart budget exhausted; giving up on this worker");
            self.give_up(kind).await;
            return;
        }
        // Back off a little more for each recent restart: 0, 100, 200, 400, 800 ms.
        let delay = match history.len() {
            0 => Duration::ZERO,
            n => Duration::from_millis(100 << (n - 1).min(4)),
        };
        history.push_back(now);
        *self.restart_counts.entry(kind).or_default() += 1;
        tracing::warn!(worker = %kind, status = %died.status, ?delay, "restarting worker");
        tokio::time::sleep(delay).await;
        if let Err(e) = self.restore(kind).await {
            tracing::error!(worker = %kind, error = %e.desc, "worker could not be restored; giving up");
            if let Some(w) = self.workers.remove(&kind) {
                w.kill();
            }
            self.give_up(kind).await;
        }
    }

    /// Starts a replacement for `kind` and replays its state: the data channels it
    /// uses, its nodes (same ids, same image descriptors), the channels others use to
    /// reach it (whose pending requests are then resubmitted), and for the NBD worker
    /// the same listening socket and every export.
    async fn restore(&mut self, kind: WorkerKind) -> Result<(), QmpError> {
        self.worker(kind).await?;
        let channels: Vec<_> = self
            .channels
            .iter()
            .filter(|(a, b)| *a == kind || *b == kind)
            .copied()
            .collect();
        for c in &channels {
            self.channels.remove(c);
        }
        for (client, server) in channels.iter().filter(|(c, _)| *c == kind) {
            self.connect(*client, *server).await?;
        }
        let nodes: Vec<String> = self
            .graph
            .iter()
            .filter(|n| n.driver.worker() == kind)
            .map(|n| n.name.clone())
            .collect();
        for name in nodes {
            self.replay_node(&name).await?;
        }
        for (client, server) in channels.iter().filter(|(_, s)| *s == kind) {
            self.connect(*client, *server).await?;
        }
        if kind == WorkerKind::Nbd {
            self.replay_nbd().await?;
        }
        tracing::info!(worker = %kind, "worker restored");
        Ok(())
    }

    /// After the restart budget is spent: exports that depend on the worker are
    /// deleted (with BLOCK_EXPORT_DELETED); its nodes stay in the graph but fail I/O.
    async fn give_up(&mut self, kind: WorkerKind) {
        self.channels.retain(|(a, b)| *a != kind && *b != kind);
        let doomed: Vec<String> = self
            .exports
            .iter()
            .filter(|e| kind == WorkerKind::Nbd || self.chain_uses(&e.node, kind))
            .map(|e| e.id.clone())
            .collect();
        for id in doomed {
            tracing::error!(export = %id, worker = %kind, "deleting export: its worker keeps dying");
            self.finish_export_removal(&id).await;
        }
        if kind == WorkerKind::Nbd {
            self.nbd = None;
        }
    }

    /// Whether `name` or a node below it is served by `kind`.
    fn chain_uses(&self, name: &str, kind: WorkerKind) -> bool {
        let mut cur = self.graph.get(name);
        for _ in 0..64 {
            match cur {
                Some(n) if n.driver.worker() == kind => return true,
                Some(n) => cur = n.child.as_deref().and_then(|c| self.graph.get(c)),
                None => return false,
            }
        }
        false
    }

    /// The current incarnation number of `kind`.
    pub(crate) fn generation(&self, kind: WorkerKind) -> u64 {
        self.generations.get(&kind).copied().unwrap_or(0)
    }

    /// Restarts so far of `kind`.
    pub fn restart_count(&self, kind: WorkerKind) -> u64 {
        self.restart_counts.get(&kind).copied().unwrap_or(0)
    }

    /// The command line has run: start serving NBD clients (the server and every
    /// export from the command line go to the NBD worker in one message).
    pub async fn startup_complete(&mut self) -> Result<(), QmpError> {
        self.started = true;
        self.replay_nbd().await
    }

    /// The daemon is exiting: stop replacing workers.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// `x-bulkhead-query-workers`: every running worker, by kind.
    fn query_workers(&self) -> Value {
        let mut kinds: Vec<_> = self.workers.keys().copied().collect();
        kinds.sort();
        let list = kinds
            .into_iter()
            .filter_map(|k| self.workers.get(&k))
            .map(|w| {
                let kind = w.kind();
                let nodes: Vec<&str> = self
                    .graph
                    .iter()
                    .filter(|n| n.driver.worker() == kind)
                    .map(|n| n.name.as_str())
                    .collect();
                let exports: Vec<&str> = if kind == WorkerKind::Nbd {
                    self.exports.iter().map(|e| e.id.as_str()).collect()
                } else {
                    Vec::new()
                };
                json!({
                    "kind": kind.as_str(),
                    "pid": w.pid(),
                    "generation": self.generation(kind),
                    "restarts": self.restart_count(kind),
                    "nodes": nodes,
                    "exports": exports,
                    "sandbox": w.sandbox(),
                })
            })
            .collect();
        Value::Array(list)
    }

    /// A worker reported something unasked.
    pub async fn worker_event(&mut self, event: WorkerEvent) {
        match event {
            WorkerEvent::ExportGone { name } => self.export_gone(&name).await,
        }
    }

    /// Running workers, for tests and `x-bulkhead-query-workers`.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerHandle> {
        self.workers.values()
    }

    /// Emits an event to every negotiated monitor (before the command's reply).
    pub async fn emit(&self, name: &str, data: Option<Value>) {
        self.events.emit(name, data).await;
    }

    async fn worker(&mut self, kind: WorkerKind) -> Result<&WorkerHandle, QmpError> {
        let alive = self.workers.get(&kind).is_some_and(WorkerHandle::is_alive);
        if !alive {
            let on_death = Rc::clone(&self.on_death);
            let on_event = Rc::clone(&self.on_event);
            let handle =
                WorkerHandle::spawn(kind, move |k, e| on_event(k, e), move |d| on_death(d))
                    .await
                    .map_err(|e| {
                        QmpError::generic(format!("Could not start the {kind} worker: {e}"))
                    })?;
            *self.generations.entry(kind).or_default() += 1;
            self.workers.insert(kind, handle);
        }
        self.workers
            .get(&kind)
            .ok_or_else(|| QmpError::generic(format!("The {kind} worker is not running")))
    }

    /// Makes sure `client` can reach nodes served by `server`.
    async fn connect(&mut self, client: WorkerKind, server: WorkerKind) -> Result<(), QmpError> {
        if client == server || self.channels.contains(&(client, server)) {
            return Ok(());
        }
        // A new region per channel, so every incarnation of the server gets its own
        // (the generation fence of `bulkhead_ipc::data::Peer`).
        let layout = RingLayout::default();
        let channel = NewChannel::create(layout)
            .map_err(|e| QmpError::generic(format!("Could not create a data channel: {e}")))?;
        self.worker(server).await?;
        self.worker(client).await?;
        let call = |k: WorkerKind| self.workers.get(&k);
        let (Some(s), Some(c)) = (call(server), call(client)) else {
            return Err(QmpError::generic("worker vanished"));
        };
        s.call(
            ToWorker::ServeDataChannel {
                peer: client,
                layout,
            },
            &channel.server_fds(),
        )
        .await
        .map_err(call_error)?;
        c.call(
            ToWorker::ConnectDataChannel {
                peer: server,
                generation: self.generation(server),
                layout,
            },
            &channel.client_fds(),
        )
        .await
        .map_err(call_error)?;
        self.channels.insert((client, server));
        Ok(())
    }
}

/// Renders a failed worker call for QMP. The worker's own detail text is logged, never
/// shown: worker messages are untrusted.
pub(crate) fn call_error(e: CallError) -> QmpError {
    tracing::warn!(error = %e, "worker call failed");
    match e {
        CallError::Worker(w) if w.errno != 0 => QmpError::generic(strerror(w.errno)),
        CallError::Worker(_) => QmpError::generic("Operation failed in worker"),
        other => QmpError::generic(other.to_string()),
    }
}

/// The C library's text for an errno, as QEMU prints it (no "(os error N)" suffix).
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
