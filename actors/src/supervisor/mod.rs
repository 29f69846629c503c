//! The supervisor: owns the block graph, the image descriptors and the workers, and
//! carries out QMP commands one at a time.
//!
//! Runs in the supervisor process on the actix System thread. [`Core`] is plain async
//! code; [`actor`] wraps it so that commands from every monitor are serialized (one
//! command at a time, as QEMU does under its big lock) and worker deaths arrive between
//! commands. Commands reach `Core` already checked against the QAPI schema, and run
//! through their line in the [`commands`] registry; every error text comes from
//! [`errors`].

pub mod actor;
pub mod asks;
mod backing;
pub mod bitmaps;
pub mod blockdev;
pub mod commands;
pub mod errors;
pub mod export;
pub mod graph;
mod jobs;
pub mod ops;
mod overlay;
pub mod placement;
mod reopen;
mod replace;
mod restart;
mod snapshot;
pub mod stats;
mod transaction;
pub mod workers;

use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

use bulkhead_ipc::data::NewChannel;
use bulkhead_ipc::ring::RingLayout;
use bulkhead_ipc::wire::{ImageInfo, NodeId, ToWorker, WorkerEvent, WorkerId, WorkerKind};
use bulkhead_qmp::request::ErrorClass;
use serde_json::{Map, Value};

use crate::events::EventSink;
use graph::Graph;
use placement::Instance;
pub use placement::Isolation;
pub use restart::{RESTART_BUDGET, RESTART_WINDOW};
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
    /// A `GenericError` (the constructors in [`errors`] hold the texts).
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
}

/// One `XBulkheadWorkerInfo` of `x-bulkhead-query-workers`. Members in the order
/// they are printed (which is not the schema's: `reaches` comes after `role`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerInfo {
    /// Instance id.
    pub id: u32,
    /// Worker kind (block driver, export type, or `image`).
    pub kind: &'static str,
    /// `driver`, `image`, `export`, or `listener`.
    pub role: &'static str,
    /// The instances it holds data channels to.
    pub reaches: Vec<u32>,
    /// Its process.
    pub pid: u32,
    /// Incarnation number.
    pub generation: u64,
    /// Restarts so far.
    pub restarts: u64,
    /// The nodes it hosts.
    pub nodes: Vec<String>,
    /// The exports it serves.
    pub exports: Vec<String>,
    /// The exports whose mapping it holds (it moves their data on the image
    /// descriptor itself).
    pub mapped: Vec<String>,
    /// The sandbox layers it reported applying.
    pub sandbox: Vec<String>,
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
    /// Worker instances, with the process serving each (if any).
    instances: BTreeMap<WorkerId, Instance>,
    next_worker: u32,
    /// How nodes and exports are placed on instances (`--isolation`).
    isolation: Isolation,
    /// Data channels (client, server) in place.
    channels: HashSet<(WorkerId, WorkerId)>,
    events: EventSink,
    on_death: Rc<dyn Fn(WorkerDied)>,
    on_event: Rc<dyn Fn(WorkerId, WorkerEvent, workers::EventTicket)>,
    generated_names: u64,
    nbd: Option<export::NbdServer>,
    /// The instance serving NBD exports (under `--isolation image`: the listener,
    /// which only negotiates).
    nbd_home: Option<WorkerId>,
    /// Every block export, newest first.
    exports: export::ExportTable,
    /// Set once the daemon is exiting: dying workers are not replaced.
    stopping: bool,
    /// Start-up (the command line) is complete; until then the NBD server accepts no
    /// client.
    started: bool,
    /// Instances being restored right now (a restore that needs another instance
    /// restores it first; this stops a cycle should the graph ever have one).
    restoring: HashSet<WorkerId>,
    /// What workers' questions are answered from (see `asks`).
    asks: asks::SharedAskTable,
    /// Long operations running in workers, and the last ones that ended (see `ops`).
    ops: ops::SharedOpTable,
    /// What workers reported about their nodes' images.
    image_info: ops::ImageInfoCache,
    /// The last id given to a dirty-bitmap region shared with an export worker.
    next_region: u64,
    /// Block jobs.
    jobs: jobs::Jobs,
    /// The job runner's instance, once one was needed.
    jobs_home: Option<WorkerId>,
    /// Told when a job's copy ended (through the actor, like worker events).
    on_job: Rc<dyn Fn(String, bulkhead_ipc::wire::OpId)>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("instances", &self.instances.keys())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A supervisor with no nodes. `on_death` is told when a worker process ends.
    pub fn new(
        events: EventSink,
        isolation: Isolation,
        on_event: Rc<dyn Fn(WorkerId, WorkerEvent, workers::EventTicket)>,
        on_death: Rc<dyn Fn(WorkerDied)>,
        on_job: Rc<dyn Fn(String, bulkhead_ipc::wire::OpId)>,
    ) -> Core {
        Core {
            graph: Graph::default(),
            instances: BTreeMap::new(),
            next_worker: 0,
            isolation,
            channels: HashSet::new(),
            events,
            on_death,
            on_event,
            generated_names: 0,
            nbd: None,
            nbd_home: None,
            exports: export::ExportTable::default(),
            stopping: false,
            started: false,
            restoring: HashSet::new(),
            asks: Rc::default(),
            ops: Rc::default(),
            image_info: ops::ImageInfoCache::default(),
            next_region: 0,
            jobs: jobs::Jobs::default(),
            jobs_home: None,
            on_job,
        }
    }

    /// Brings the table workers' questions are answered from up to date: who hosts
    /// each node and the directory of the image under it.
    fn refresh_asks(&self) {
        let nodes = self.graph.iter().map(|n| {
            let dir = self
                .graph
                .chain(&n.name)
                .last()
                .and_then(|b| b.path.as_deref())
                .map(asks::image_dir);
            (n.id, n.home, dir)
        });
        self.asks.borrow_mut().set(nodes);
        let images = self
            .graph
            .iter()
            .filter_map(|n| n.path.clone().map(|p| (p, n.home)));
        self.asks.borrow_mut().set_images(images);
        let (listener, exporters) = self.nbd_hand_off_table();
        self.asks.borrow_mut().set_exports(listener, exporters);
    }

    /// Runs one command with already validated arguments (through its registry
    /// line, see `commands`).
    pub async fn execute(
        &mut self,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<(Value, After), QmpError> {
        // A top-level entry: no restore is running (see `worker_died`).
        self.restoring.clear();
        let Some(commands::Command {
            served: commands::Served::Core(effect, run),
            ..
        }) = commands::find(command)
        else {
            return Err(errors::command_not_found(command));
        };
        // No export takes the mapped shortcut while a command changes anything
        // (see `export/mapped.rs`); the grants the graph allows come back after it.
        if *effect != commands::Effect::Query {
            self.revoke_mappings().await;
        }
        let ret = run(self, args).await;
        match effect {
            commands::Effect::Quit => return Ok((ret?, After::Quit)),
            // Queries change nothing the ask table holds (it canonicalizes image
            // paths, a few syscalls per node): skip it for them, so a QMP query flood
            // stays cheap. A restore a query set off refreshes the table itself.
            commands::Effect::Query => {}
            commands::Effect::Change => {
                self.refresh_asks();
                self.image_info.prune(&self.graph);
            }
        }
        // Also after a query: one may have restored an export worker.
        self.sync_mappings().await;
        Ok((ret?, After::Continue))
    }

    /// The command line has run: start serving NBD clients (the server and every
    /// export from the command line go to the NBD worker in one message).
    pub async fn startup_complete(&mut self) -> Result<(), QmpError> {
        self.started = true;
        self.replay_nbd().await?;
        self.sync_mappings().await;
        Ok(())
    }

    /// The daemon is exiting: stop replacing workers.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// `x-bulkhead-query-workers`: every instance with a running process, by id.
    fn query_workers(&self) -> Vec<WorkerInfo> {
        self.instances
            .iter()
            .filter_map(|(id, inst)| inst.handle.as_ref().map(|w| (id, inst, w)))
            .map(|(&id, inst, w)| {
                let nodes = self
                    .graph
                    .iter()
                    .filter(|n| n.home == id)
                    .map(|n| n.name.clone())
                    .collect();
                let exports = self
                    .exports_on(id)
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                let mapped = self
                    .exports
                    .iter()
                    .filter(|e| e.mapped.as_ref().is_some_and(|g| g.worker == id))
                    .map(|e| e.id.clone())
                    .collect();
                let role = if self.per_export() && self.nbd_home == Some(id) {
                    "listener"
                } else {
                    inst.role()
                };
                // The instances it holds data channels to.
                let mut reaches: Vec<u32> = self
                    .channels
                    .iter()
                    .filter(|(c, _)| *c == id)
                    .map(|(_, s)| s.0)
                    .collect();
                reaches.sort_unstable();
                WorkerInfo {
                    id: id.0,
                    kind: inst.kind.as_str(),
                    role,
                    reaches,
                    pid: w.pid(),
                    generation: inst.generation,
                    restarts: inst.restart_count,
                    nodes,
                    exports,
                    mapped,
                    sandbox: w.sandbox().to_vec(),
                }
            })
            .collect()
    }

    /// A worker reported something unasked (the reader accepted it from this kind
    /// of worker; `export_gone` checks the worker serves the export).
    pub async fn worker_event(&mut self, from: WorkerId, event: WorkerEvent) {
        match event {
            WorkerEvent::ExportGone { export } => self.export_gone(from, export).await,
            WorkerEvent::WriteThreshold {
                node,
                threshold,
                end,
            } => {
                self.write_threshold_crossed(from, node, threshold, end)
                    .await
            }
            WorkerEvent::ImageInfo { node, info } => {
                self.image_info.report(&self.graph, from, node, info);
            }
            WorkerEvent::ImageCorrupted {
                node,
                msg,
                offset,
                size,
                fatal,
            } => {
                self.image_corrupted(from, node, &msg, offset, size, fatal)
                    .await
            }
            // Handled by the reader (`workers.rs`), which never passes them on.
            WorkerEvent::Progress { .. }
            | WorkerEvent::OperationReady { .. }
            | WorkerEvent::OperationEnded { .. } => {}
        }
    }

    /// `BLOCK_IMAGE_CORRUPTED` for a node the reporting worker hosts, with qsd's
    /// fields (no device: qsd's nodes have no BlockBackend name). The message is the
    /// worker's: shown only as short printable text.
    async fn image_corrupted(
        &mut self,
        from: WorkerId,
        node: NodeId,
        msg: &str,
        offset: Option<u64>,
        size: Option<u64>,
        fatal: bool,
    ) {
        let Some(n) = self
            .graph
            .iter_mut()
            .find(|n| n.id == node && n.home == from)
        else {
            tracing::warn!(worker = %from, "corruption report for a node the worker does not host");
            return;
        };
        if fatal {
            n.ejected = true;
        }
        let printable = msg.len() <= 512 && msg.bytes().all(|b| (0x20..0x7f).contains(&b));
        let msg = if printable {
            msg
        } else {
            "Image metadata is inconsistent"
        };
        let mut data = serde_json::Map::new();
        data.insert("device".into(), "".into());
        data.insert("node-name".into(), n.name.clone().into());
        data.insert("msg".into(), msg.into());
        if let Some(o) = offset.and_then(|o| i64::try_from(o).ok()) {
            data.insert("offset".into(), o.into());
        }
        if let Some(s) = size.and_then(|s| i64::try_from(s).ok()) {
            data.insert("size".into(), s.into());
        }
        data.insert("fatal".into(), fatal.into());
        self.emit(
            "BLOCK_IMAGE_CORRUPTED",
            Some(serde_json::Value::Object(data)),
        )
        .await;
    }

    /// What the worker hosting `node` last reported about its image.
    pub fn image_info(&self, node: NodeId) -> Option<ImageInfo> {
        self.image_info.get(node)
    }

    /// Running workers, for tests and `x-bulkhead-query-workers`.
    pub fn workers(&self) -> impl Iterator<Item = &WorkerHandle> {
        self.instances.values().filter_map(|i| i.handle.as_ref())
    }

    /// Emits an event to every negotiated monitor (before the command's reply).
    pub async fn emit(&self, name: &str, data: Option<Value>) {
        self.events.emit(name, data).await;
    }

    /// Allocates a new instance of `kind` (no process yet: one starts on first use).
    fn new_instance(&mut self, kind: WorkerKind) -> WorkerId {
        self.next_worker += 1;
        let id = WorkerId(self.next_worker);
        self.instances.insert(id, Instance::new(kind));
        id
    }

    /// The instance serving `kind` under the `kind` policy (one per kind), created on
    /// first use. One that was given up on is not reused.
    fn kind_instance(&mut self, kind: WorkerKind) -> WorkerId {
        match self
            .instances
            .iter()
            .find(|(_, i)| i.kind == kind && !i.given_up)
        {
            Some((&id, _)) => id,
            None => self.new_instance(kind),
        }
    }

    /// The instance that serves NBD exports.
    fn nbd_instance(&mut self) -> WorkerId {
        match self.nbd_home {
            Some(id) => id,
            None => {
                let id = self.new_instance(WorkerKind::Nbd);
                self.nbd_home = Some(id);
                id
            }
        }
    }

    /// Whether instance `id` holds state a replacement must get back.
    fn has_state(&self, id: WorkerId) -> bool {
        self.graph.iter().any(|n| n.home == id) || self.has_export_state(id)
    }

    /// A running worker for instance `id`. A process is started on first use; an
    /// instance whose process died with state is restored first (its nodes, channels
    /// and exports replayed), so nothing ever talks to a blank replacement.
    async fn worker(&mut self, id: WorkerId) -> Result<&WorkerHandle, QmpError> {
        let Some(inst) = self.instances.get(&id) else {
            return Err(errors::no_such_worker(id));
        };
        if inst.given_up {
            return Err(errors::worker_given_up(inst.kind));
        }
        let alive = inst.handle.as_ref().is_some_and(WorkerHandle::is_alive);
        if !alive {
            if inst.started && self.has_state(id) {
                Box::pin(self.restore(id)).await?;
            } else {
                self.spawn(id).await?;
            }
        }
        self.instances
            .get(&id)
            .and_then(|i| i.handle.as_ref())
            .ok_or_else(|| errors::worker_not_running(id))
    }

    /// The running worker of `id`, if its process is alive; never starts one.
    fn running(&self, id: WorkerId) -> Option<&WorkerHandle> {
        self.instances
            .get(&id)
            .and_then(|i| i.handle.as_ref())
            .filter(|w| w.is_alive())
    }

    /// Starts a new process for instance `id` (replacing any previous one, which must
    /// be dead or is killed) and bumps its generation.
    async fn spawn(&mut self, id: WorkerId) -> Result<(), QmpError> {
        let kind = self
            .instances
            .get(&id)
            .map(|i| i.kind)
            .ok_or_else(|| errors::no_such_worker(id))?;
        if let Some(old) = self.instances.get_mut(&id).and_then(|i| i.handle.take()) {
            old.kill();
        }
        // Channels to or from the old process died with it.
        self.channels.retain(|(a, b)| *a != id && *b != id);
        let on_death = Rc::clone(&self.on_death);
        let on_event = Rc::clone(&self.on_event);
        // Nodes about to be replayed into this worker may ask already.
        self.refresh_asks();
        let asks = Rc::clone(&self.asks);
        let handle = WorkerHandle::spawn(
            kind,
            id,
            asks,
            Rc::clone(&self.ops),
            move |i, e, t| on_event(i, e, t),
            move |d| on_death(d),
        )
        .await
        .map_err(|e| errors::worker_spawn(kind, e))?;
        if let Some(inst) = self.instances.get_mut(&id) {
            inst.generation += 1;
            inst.handle = Some(handle);
            inst.started = true;
        }
        Ok(())
    }

    /// Stops instance `id` if it holds nothing any more (its last node moved away or
    /// was deleted), so idle processes do not linger.
    fn retire_if_idle(&mut self, id: WorkerId) {
        if self.has_state(id) || self.nbd_home == Some(id) || self.jobs_home == Some(id) {
            return;
        }
        // A peer's channel to it just closes; nothing can be pending on a worker
        // without nodes.
        if let Some(inst) = self.instances.remove(&id)
            && let Some(w) = inst.handle
        {
            w.retire();
        }
        self.channels.retain(|(a, b)| *a != id && *b != id);
    }

    /// Makes sure `client` can reach nodes served by `server`.
    async fn connect(&mut self, client: WorkerId, server: WorkerId) -> Result<(), QmpError> {
        if client == server || self.channels.contains(&(client, server)) {
            return Ok(());
        }
        // A new region per channel, so every incarnation of the server gets its own
        // (the generation fence of `bulkhead_ipc::data::Peer`).
        let layout = RingLayout::default();
        let channel = NewChannel::create(layout).map_err(errors::data_channel)?;
        self.worker(server).await?;
        self.worker(client).await?;
        let generation = self.instances.get(&server).map_or(0, |i| i.generation);
        let (Some(s), Some(c)) = (self.running(server), self.running(client)) else {
            return Err(errors::worker_vanished());
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
                generation,
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
        CallError::Worker(w) if w.kind == bulkhead_ipc::wire::WorkerErrorKind::Image => {
            errors::image_refused(&w.detail)
        }
        CallError::Worker(w) if w.errno != 0 => errors::from_error(strerror(w.errno)),
        CallError::Worker(_) => errors::worker_failed(),
        other => errors::from_error(other),
    }
}

pub use bulkhead_block::posix::strerror;
