//! The NBD front of block exports: `nbd-server-start/stop`, the deprecated
//! `nbd-server-add/remove`, the NBD options of `block-export-add`, and how an NBD
//! export is attached to and detached from the NBD worker(s).
//!
//! Runs in the supervisor. The supervisor owns the listening socket (so a restarted NBD
//! worker keeps serving the same socket) and checks everything it can know itself, in
//! qsd's order, with qsd's texts; the NBD worker reports only what it alone knows
//! (whether clients are still attached). The export table, removal and
//! `BLOCK_EXPORT_DELETED` are the generic part's (`export/mod.rs`).

use std::os::fd::{AsFd, OwnedFd};

use bulkhead_ipc::wire::{
    ExportSpec, FrontSpec, NbdExport, NodeRef, Reply, ToWorker, WorkerErrorKind, WorkerId,
};
use serde_json::{Map, Value, json};

use super::{Export, Front};
use crate::supervisor::workers::CallError;
use crate::supervisor::{Core, QmpError, call_error, get_str};

/// NBD's limit on names and descriptions (NBD_MAX_STRING_SIZE).
const NBD_MAX_STRING: usize = 4096;

/// The running NBD server.
#[derive(Debug)]
pub struct NbdServer {
    /// Our copy of the listening socket.
    pub listener: OwnedFd,
    /// `max-connections`.
    pub max_connections: u32,
    /// `handshake-max-seconds`.
    pub handshake_max_seconds: u32,
}

/// The NBD options of an export (qsd's `BlockExportOptionsNbd`; `bitmaps` are
/// refused while no node has dirty bitmaps).
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// NBD export name.
    pub name: String,
    /// NBD description.
    pub description: Option<String>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
}

/// Binds the listening socket `addr` (SocketAddressLegacy or flat SocketAddress).
/// The backlog is SOMAXCONN whatever max-connections says, as in qsd: clients the
/// NBD worker has not accepted yet (out of descriptors, or restarting) wait there,
/// and a small backlog would refuse them instead.
fn listen(addr: &Value) -> Result<OwnedFd, QmpError> {
    let kind = addr.get("type").and_then(Value::as_str).unwrap_or("");
    // SocketAddressLegacy nests the members under `data`; flat SocketAddress does not.
    let data = addr.get("data").cloned().unwrap_or_else(|| addr.clone());
    let data = data.as_object().cloned().unwrap_or_default();
    let backlog = libc::SOMAXCONN;
    match kind {
        "unix" => {
            let path = get_str(&data, "path").unwrap_or("");
            // QEMU replaces a stale socket file.
            let _ = std::fs::remove_file(path);
            let sock = rustix::net::socket_with(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::STREAM,
                rustix::net::SocketFlags::CLOEXEC,
                None,
            )
            .map_err(|e| {
                QmpError::generic(format!(
                    "Failed to create socket: {}",
                    crate::supervisor::strerror(e.raw_os_error())
                ))
            })?;
            let sa = rustix::net::SocketAddrUnix::new(path)
                .map_err(|_| QmpError::generic(format!("UNIX socket path '{path}' is too long")))?;
            rustix::net::bind(&sock, &sa).map_err(|e| {
                QmpError::generic(format!(
                    "Failed to bind socket to {path}: {}",
                    crate::supervisor::strerror(e.raw_os_error())
                ))
            })?;
            rustix::net::listen(&sock, backlog).map_err(|e| {
                QmpError::generic(format!(
                    "Failed to listen on socket: {}",
                    crate::supervisor::strerror(e.raw_os_error())
                ))
            })?;
            Ok(sock)
        }
        "inet" => {
            let host = get_str(&data, "host").unwrap_or("");
            let port = get_str(&data, "port").unwrap_or("");
            let target = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let listener = std::net::TcpListener::bind(&target).map_err(|e| {
                QmpError::generic(format!(
                    "Failed to bind socket: {}",
                    e.raw_os_error()
                        .map(crate::supervisor::strerror)
                        .unwrap_or_else(|| e.to_string())
                ))
            })?;
            let listener = OwnedFd::from(listener);
            // std listens with its own backlog; a second listen() only resizes it.
            rustix::net::listen(&listener, backlog).map_err(|e| {
                QmpError::generic(format!(
                    "Failed to listen on socket: {}",
                    crate::supervisor::strerror(e.raw_os_error())
                ))
            })?;
            Ok(listener)
        }
        other => Err(QmpError::generic(format!(
            "bulkhead does not support NBD server addresses of type '{other}'"
        ))),
    }
}

impl Core {
    pub(in crate::supervisor) async fn nbd_server_start(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        if self.nbd.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        if let Some(creds) = get_str(args, "tls-creds") {
            // No --object support yet, so no credentials object can exist.
            return Err(QmpError::generic(format!(
                "No TLS credentials with id '{creds}'"
            )));
        }
        if get_str(args, "tls-authz").is_some() {
            return Err(QmpError::generic(
                "'tls-authz' is only valid with 'tls-creds'",
            ));
        }
        let max_connections = args
            .get("max-connections")
            .and_then(Value::as_u64)
            .unwrap_or(100) as u32;
        let handshake = args
            .get("handshake-max-seconds")
            .and_then(Value::as_u64)
            .unwrap_or(10) as u32;
        let addr = args.get("addr").cloned().unwrap_or(Value::Null);
        let listener = listen(&addr)?;
        // During start-up the server only records itself: like qsd, no client is served
        // before the whole command line ran (its `--export`s included).
        if self.started {
            let copy =
                bulkhead_ipc::fd::dup(&listener).map_err(|e| QmpError::generic(e.to_string()))?;
            let nbd = self.nbd_instance();
            let hand_off = self.per_export();
            let w = self.worker(nbd).await?;
            w.call(
                ToWorker::NbdServerStart {
                    max_connections,
                    handshake_max_seconds: handshake,
                    exports: Vec::new(),
                    hand_off,
                },
                &[copy.as_fd()],
            )
            .await
            .map_err(call_error)?;
        }
        self.nbd = Some(NbdServer {
            listener,
            max_connections,
            handshake_max_seconds: handshake,
        });
        Ok(json!({}))
    }

    pub(in crate::supervisor) async fn nbd_server_stop(&mut self) -> Result<Value, QmpError> {
        if self.nbd.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        // Every export is an NBD export so far.
        self.delete_all_exports().await;
        self.nbd = None;
        Ok(json!({}))
    }

    /// Stops the NBD server in the NBD worker and in every export's own worker;
    /// each answers once the clients it disconnects are gone.
    pub(super) async fn nbd_stop_workers(&mut self) {
        if let Some(w) = self.nbd_home.and_then(|id| self.running(id)) {
            let _ = w.call(ToWorker::NbdServerStop, &[]).await;
        }
        self.stop_export_workers().await;
    }

    pub(in crate::supervisor) async fn nbd_server_add(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        if self.nbd.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        let device = get_str(args, "device").unwrap_or("").to_string();
        let Some(node) = self.graph.get(&device) else {
            return Err(QmpError::generic(format!(
                "Cannot find device='{device}' nor node-name='{device}'"
            )));
        };
        // nbd-server-add downgrades a writable export of a read-only node silently.
        let writable = args
            .get("writable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            && !node.read_only;
        let name = get_str(args, "name").unwrap_or(&device).to_string();
        let mut m = Map::new();
        m.insert("type".into(), "nbd".into());
        m.insert("id".into(), name.clone().into());
        m.insert("node-name".into(), device.into());
        m.insert("name".into(), name.into());
        m.insert("writable".into(), writable.into());
        if let Some(d) = args.get("description") {
            m.insert("description".into(), d.clone());
        }
        if let Some(b) = get_str(args, "bitmap") {
            m.insert("bitmaps".into(), json!([b]));
        }
        self.block_export_add(&m).await
    }

    pub(in crate::supervisor) async fn nbd_server_remove(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        if self.nbd.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        let name = get_str(args, "name").unwrap_or("").to_string();
        let hard = get_str(args, "mode") == Some("hard");
        self.remove_export(&name, hard, true).await?;
        Ok(json!({}))
    }

    /// The NBD options of `block-export-add`, checked in qsd's order after the
    /// generic ones.
    pub(super) fn nbd_options(
        &self,
        args: &Map<String, Value>,
        node_name: &str,
    ) -> Result<NbdOptions, QmpError> {
        if self.nbd.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        let name = get_str(args, "name").unwrap_or(node_name).to_string();
        if name.len() > NBD_MAX_STRING {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        let description = get_str(args, "description").map(str::to_string);
        if let Some(d) = &description
            && d.len() > NBD_MAX_STRING
        {
            return Err(QmpError::generic(format!("description '{d}' too long")));
        }
        if self.nbd_export_named(&name).is_some() {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        if let Some(Value::Array(bitmaps)) = args.get("bitmaps")
            && let Some(first) = bitmaps.first()
        {
            // No node has dirty bitmaps yet, so any named bitmap is missing.
            let bm = first.as_str().unwrap_or("");
            return Err(QmpError::generic(format!("Bitmap '{bm}' is not found")));
        }
        let allocation_depth = args
            .get("allocation-depth")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(NbdOptions {
            name,
            description,
            allocation_depth,
        })
    }

    /// The export whose NBD name is `name`.
    pub(in crate::supervisor) fn nbd_export_named(&self, name: &str) -> Option<&Export> {
        self.exports
            .iter()
            .find(|e| matches!(&e.front, Front::Nbd(o) if o.name == name))
    }

    /// What an NBD worker gets for export `e` on `target` (`metadata_size`: the
    /// listener's metadata-only copy).
    pub(super) fn nbd_spec(e: &Export, target: NodeRef, metadata_size: Option<u64>) -> ExportSpec {
        let Front::Nbd(o) = &e.front;
        ExportSpec {
            key: e.key,
            node: target,
            writable: e.writable,
            front: FrontSpec::Nbd(NbdExport {
                name: o.name.clone(),
                description: o.description.clone(),
                allocation_depth: o.allocation_depth,
                metadata_size,
            }),
        }
    }

    /// Places export `id` and attaches it: under `--isolation kind` in the one NBD
    /// worker (with a channel to the node's instance); under `image` in a worker of
    /// its own, then as metadata in the listener. Nothing before start-up is
    /// complete (the command line's exports go with the server start).
    pub(super) async fn nbd_attach(&mut self, id: &str) -> Result<(), QmpError> {
        if !self.started {
            return Ok(());
        }
        if self.per_export() {
            return self.add_export_workers(id).await;
        }
        let spec = self
            .exports
            .get(id)
            .and_then(|e| Some(Self::nbd_spec(e, self.node_ref(&e.node)?, None)))
            .ok_or_else(|| QmpError::generic("node vanished"))?;
        let nbd = self.nbd_instance();
        self.connect(nbd, spec.node.home).await?;
        let w = self.worker(nbd).await?;
        w.call(ToWorker::ExportAdd(spec), &[])
            .await
            .map_err(call_error)?;
        Ok(())
    }

    /// Under `--isolation image`: the export's own worker first (so a client the
    /// listener negotiates always has somewhere to go), then the listener's
    /// metadata-only export.
    async fn add_export_workers(&mut self, id: &str) -> Result<(), QmpError> {
        self.start_export_worker(id).await?;
        let export = self
            .exports
            .get(id)
            .and_then(|e| self.metadata_export(e))
            .ok_or_else(|| QmpError::generic("node vanished"))?;
        let nbd = self.nbd_instance();
        let w = self.worker(nbd).await?;
        w.call(ToWorker::ExportAdd(export), &[])
            .await
            .map_err(call_error)?;
        Ok(())
    }

    /// Detaches export `id` from the worker serving its clients; under per-export
    /// workers, once that worker agreed (so a refused safe removal leaves the export
    /// offered), the listener drops it too (hard: its clients are only negotiating).
    pub(super) async fn nbd_detach(&mut self, id: &str, hard: bool) -> Result<Reply, CallError> {
        let Some(e) = self.exports.get(id) else {
            return Ok(Reply::ExportRemoved { deferred: false });
        };
        let key = e.key;
        let remove = ToWorker::ExportRemove { export: key, hard };
        let reply = match self.export_server(e).and_then(|w| self.running(w)) {
            Some(w) => w.call(remove, &[]).await,
            None => Ok(Reply::ExportRemoved { deferred: false }),
        };
        let in_use =
            matches!(&reply, Err(CallError::Worker(e)) if e.kind == WorkerErrorKind::InUse);
        if self.per_export()
            && !in_use
            && let Some(w) = self.nbd_home.and_then(|id| self.running(id))
        {
            let remove = ToWorker::ExportRemove {
                export: key,
                hard: true,
            };
            if let Err(e) = w.call(remove, &[]).await {
                tracing::debug!(error = %e, "the NBD listener did not offer the export");
            }
        }
        reply
    }

    /// The instance serving every NBD export's clients (`--isolation kind`); none
    /// under per-export workers, where the NBD instance only negotiates.
    pub(super) fn nbd_shared_server(&self) -> Option<WorkerId> {
        if self.per_export() {
            None
        } else {
            self.nbd_home
        }
    }

    /// Whether instance `id` runs the NBD server (a replacement gets it back).
    pub(super) fn nbd_has_state(&self, id: WorkerId) -> bool {
        self.nbd_home == Some(id) && self.nbd.is_some()
    }

    /// The NBD instance was given up on: the server is gone with it.
    pub(super) fn nbd_given_up(&mut self, id: WorkerId) {
        if self.nbd_home == Some(id) {
            self.nbd = None;
            self.nbd_home = None;
        }
    }

    /// Replays the NBD server into a restarted NBD worker: the same listening socket
    /// (clients reconnect to it) and every export that is not being removed; exports
    /// whose removal was waiting for clients are finished, since those clients are gone.
    /// Under `--isolation image` this is the listener (metadata-only exports; the
    /// clients live in the exports' own workers, which are started first if they do
    /// not run yet, e.g. for exports of the command line).
    pub(in crate::supervisor) async fn replay_nbd(&mut self) -> Result<(), QmpError> {
        let Some(server) = &self.nbd else {
            return Ok(());
        };
        let listener = bulkhead_ipc::fd::dup(&server.listener)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        if self.per_export() {
            let missing: Vec<String> = self
                .exports
                .iter()
                .filter(|e| !e.shutting_down && e.worker.is_none())
                .map(|e| e.id.clone())
                .collect();
            for id in missing {
                self.start_export_worker(&id).await?;
            }
            let exports = self
                .exports
                .iter()
                .rev()
                .filter(|e| !e.shutting_down)
                .filter_map(|e| self.metadata_export(e))
                .collect();
            return self.start_listener(exports, listener).await;
        }
        let gone: Vec<String> = self
            .exports
            .iter()
            .filter(|e| e.shutting_down)
            .map(|e| e.id.clone())
            .collect();
        for id in gone {
            self.finish_export_removal(&id).await;
        }
        // Every export goes with the start message, so the worker accepts its first
        // (reconnecting) client only once all of them exist.
        let nbd = self.nbd_instance();
        let mut exports = Vec::new();
        let specs: Vec<ExportSpec> = self
            .exports
            .iter()
            .rev()
            .filter_map(|e| Some(Self::nbd_spec(e, self.node_ref(&e.node)?, None)))
            .collect();
        for spec in specs {
            self.connect(nbd, spec.node.home).await?;
            exports.push(spec);
        }
        self.start_listener(exports, listener).await
    }
}
