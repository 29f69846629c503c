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

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::rc::Rc;

use bulkhead_ipc::fd;
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
];

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
            other => {
                return Err(QmpError {
                    class: ErrorClass::CommandNotFound,
                    desc: format!("The command {other} has not been found"),
                });
            }
        };
        Ok((ret, After::Continue))
    }

    /// Called when a worker process ended: forget it and its channels, so the next
    /// use starts a fresh one (restart with state replay comes with the restart work).
    pub fn worker_died(&mut self, died: &WorkerDied) {
        if self
            .workers
            .get(&died.kind)
            .is_some_and(|w| w.pid() == died.pid)
        {
            self.workers.remove(&died.kind);
            self.channels
                .retain(|(a, b)| *a != died.kind && *b != died.kind);
        }
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
            self.channels.retain(|(a, b)| *a != kind && *b != kind);
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
        let (a, b) = fd::stream_pair()
            .map_err(|e| QmpError::generic(format!("Could not create a data channel: {e}")))?;
        self.worker(server).await?;
        self.worker(client).await?;
        let call = |k: WorkerKind| self.workers.get(&k);
        let (Some(s), Some(c)) = (call(server), call(client)) else {
            return Err(QmpError::generic("worker vanished"));
        };
        s.call(ToWorker::ServeDataChannel { peer: client }, &[a.as_fd()])
            .await
            .map_err(call_error)?;
        c.call(ToWorker::ConnectDataChannel { peer: server }, &[b.as_fd()])
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
