//! The NBD server and block exports: `nbd-server-start/stop`, `block-export-add/del`,
//! the deprecated `nbd-server-add/remove`, `query-block-exports`, and the
//! `BLOCK_EXPORT_DELETED` event.
//!
//! Runs in the supervisor. The supervisor owns the listening socket (so a restarted NBD
//! worker keeps serving the same socket) and checks everything it can know itself, in
//! qsd's order, with qsd's texts; the NBD worker reports only what it alone knows
//! (whether clients are still attached).

use std::os::fd::{AsFd, OwnedFd};

use bulkhead_ipc::wire::{NbdExport, NodeRef, Reply, ToWorker, WorkerErrorKind};
use serde_json::{Map, Value, json};

use super::workers::CallError;
use super::{Core, QmpError, call_error, get_str};
use bulkhead_qmp::qapi::id_wellformed;

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

/// One block export.
#[derive(Debug, Clone)]
pub struct Export {
    /// QMP id.
    pub id: String,
    /// Exported node.
    pub node: String,
    /// NBD export name.
    pub nbd_name: String,
    /// Removal requested, clients still attached.
    pub shutting_down: bool,
    /// Clients may write.
    pub writable: bool,
    /// NBD description.
    pub description: Option<String>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
}

/// Binds the listening socket `addr` (SocketAddressLegacy or flat SocketAddress).
/// The backlog is SOMAXCONN whatever max-connections says, as in qsd: clients
/// beyond the limit wait there, and a small backlog would refuse them instead.
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
                    super::strerror(e.raw_os_error())
                ))
            })?;
            let sa = rustix::net::SocketAddrUnix::new(path)
                .map_err(|_| QmpError::generic(format!("UNIX socket path '{path}' is too long")))?;
            rustix::net::bind(&sock, &sa).map_err(|e| {
                QmpError::generic(format!(
                    "Failed to bind socket to {path}: {}",
                    super::strerror(e.raw_os_error())
                ))
            })?;
            rustix::net::listen(&sock, backlog).map_err(|e| {
                QmpError::generic(format!(
                    "Failed to listen on socket: {}",
                    super::strerror(e.raw_os_error())
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
                        .map(super::strerror)
                        .unwrap_or_else(|| e.to_string())
                ))
            })?;
            let listener = OwnedFd::from(listener);
            // std listens with its own backlog; a second listen() only resizes it.
            rustix::net::listen(&listener, backlog).map_err(|e| {
                QmpError::generic(format!(
                    "Failed to listen on socket: {}",
                    super::strerror(e.raw_os_error())
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
    pub(super) async fn nbd_server_start(
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
            let w = self.worker(nbd).await?;
            w.call(
                ToWorker::NbdServerStart {
                    max_connections,
                    handshake_max_seconds: handshake,
                    exports: Vec::new(),
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

    pub(super) async fn nbd_server_stop(&mut self) -> Result<Value, QmpError> {
        if self.nbd.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        self.delete_all_exports().await;
        self.nbd = None;
        Ok(json!({}))
    }

    /// Deletes every export and stops the NBD server (nbd-server-stop, quit), one
    /// BLOCK_EXPORT_DELETED each, all before the command's reply. Like qsd, exports
    /// without clients go first (newest first); then the server stops, which waits for
    /// the clients it disconnects, and the exports they held go last.
    pub(super) async fn delete_all_exports(&mut self) {
        let ids: Vec<String> = self.exports.iter().map(|e| e.id.clone()).collect();
        for id in ids {
            let _ = self.remove_export(&id, true, false).await;
        }
        if let Some(w) = self.nbd_home.and_then(|id| self.running(id)) {
            let _ = w.call(ToWorker::NbdServerStop, &[]).await;
        }
        let deferred: Vec<String> = self.exports.iter().map(|e| e.id.clone()).collect();
        for id in deferred {
            self.finish_export_removal(&id).await;
        }
    }

    pub(super) async fn block_export_add(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let id = get_str(args, "id").unwrap_or("").to_string();
        if !id_wellformed(&id) {
            return Err(QmpError::generic("Invalid block export id"));
        }
        if self.exports.iter().any(|e| e.id == id) {
            return Err(QmpError::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        match get_str(args, "type") {
            Some("nbd") => {}
            _ => {
                return Err(QmpError::generic(
                    "bulkhead supports only NBD exports so far",
                ));
            }
        }
        let node_name = get_str(args, "node-name").unwrap_or("").to_string();
        let Some(node) = self.graph.get(&node_name) else {
            return Err(QmpError::generic(format!(
                "Cannot find device='' nor node-name='{node_name}'"
            )));
        };
        if let Some(t) = get_str(args, "iothread") {
            return Err(QmpError::generic(format!("iothread \"{t}\" not found")));
        }
        let writable = args
            .get("writable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if writable && node.read_only {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
        if self.nbd.is_none() {
            return Err(QmpError::generic("NBD server not running"));
        }
        let name = get_str(args, "name").unwrap_or(&node_name).to_string();
        if name.len() > NBD_MAX_STRING {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        let description = get_str(args, "description").map(str::to_string);
        if let Some(d) = &description
            && d.len() > NBD_MAX_STRING
        {
            return Err(QmpError::generic(format!("description '{d}' too long")));
        }
        if self.exports.iter().any(|e| e.nbd_name == name) {
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
        let target = NodeRef {
            node: node.id,
            home: node.home,
        };
        // The image locks come first: a conflict with another process (qemu-io, qsd)
        // refuses the export before any worker is involved.
        self.exports.insert(
            0,
            Export {
                id: id.clone(),
                node: node_name.clone(),
                nbd_name: name.clone(),
                shutting_down: false,
                writable,
                description: description.clone(),
                allocation_depth,
            },
        );
        if let Err(e) = self.refresh_locks() {
            self.exports.remove(0);
            let _ = self.refresh_locks();
            return Err(e);
        }
        let added = self
            .add_export_to_worker(&name, &description, writable, allocation_depth, target)
            .await;
        if let Err(e) = added {
            self.exports.remove(0);
            let _ = self.refresh_locks();
            return Err(e);
        }
        if let Some(n) = self.graph.get_mut(&node_name) {
            n.exported = true;
        }
        Ok(json!({}))
    }

    async fn add_export_to_worker(
        &mut self,
        name: &str,
        description: &Option<String>,
        writable: bool,
        allocation_depth: bool,
        target: NodeRef,
    ) -> Result<(), QmpError> {
        if self.started {
            let nbd = self.nbd_instance();
            self.connect(nbd, target.home).await?;
            let w = self.worker(nbd).await?;
            w.call(
                ToWorker::NbdExportAdd(NbdExport {
                    name: name.to_string(),
                    description: description.clone(),
                    writable,
                    allocation_depth,
                    node: target,
                }),
                &[],
            )
            .await
            .map_err(call_error)?;
        }
        Ok(())
    }

    pub(super) async fn block_export_del(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let id = get_str(args, "id").unwrap_or("").to_string();
        let hard = get_str(args, "mode") == Some("hard");
        self.remove_export(&id, hard, true).await?;
        Ok(json!({}))
    }

    pub(super) async fn nbd_server_add(
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

    pub(super) async fn nbd_server_remove(
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

    pub(super) fn query_block_exports(&self) -> Value {
        Value::Array(
            self.exports
                .iter()
                .map(|e| json!({"id": e.id, "type": "nbd", "node-name": e.node, "shutting-down": e.shutting_down}))
                .collect(),
        )
    }

    /// Removes export `id`. The event comes now if no client was attached, else once
    /// the worker reports the last client gone.
    async fn remove_export(&mut self, id: &str, hard: bool, user: bool) -> Result<(), QmpError> {
        let Some(pos) = self.exports.iter().position(|e| e.id == id) else {
            return Err(QmpError::generic(format!("Export '{id}' is not found")));
        };
        if self.exports[pos].shutting_down {
            if user && !hard {
                return Err(QmpError::generic(format!("export '{id}' still in use")));
            }
            return Ok(());
        }
        let name = self.exports[pos].nbd_name.clone();
        let reply = match self.nbd_home.and_then(|id| self.running(id)) {
            Some(w) => w.call(ToWorker::NbdExportRemove { name, hard }, &[]).await,
            None => Ok(Reply::ExportRemoved { deferred: false }),
        };
        match reply {
            Ok(Reply::ExportRemoved { deferred: true }) => {
                self.exports[pos].shutting_down = true;
                Ok(())
            }
            Ok(_) | Err(CallError::Dead(_)) => {
                self.finish_export_removal(id).await;
                Ok(())
            }
            Err(CallError::Worker(e)) if e.kind == WorkerErrorKind::InUse => {
                Err(QmpError::generic(format!("export '{id}' still in use")))
            }
            Err(CallError::Worker(e)) if e.kind == WorkerErrorKind::NotFound => {
                self.finish_export_removal(id).await;
                Ok(())
            }
            Err(e) => Err(call_error(e)),
        }
    }

    /// Forgets export `id` and emits BLOCK_EXPORT_DELETED.
    pub(super) async fn finish_export_removal(&mut self, id: &str) {
        let Some(pos) = self.exports.iter().position(|e| e.id == id) else {
            return;
        };
        let export = self.exports.remove(pos);
        let _ = self.refresh_locks();
        if !self.exports.iter().any(|e| e.node == export.node)
            && let Some(n) = self.graph.get_mut(&export.node)
        {
            n.exported = false;
        }
        self.emit("BLOCK_EXPORT_DELETED", Some(json!({"id": export.id})))
            .await;
    }

    /// Replays the NBD server into a restarted NBD worker: the same listening socket
    /// (clients reconnect to it) and every export that is not being removed; exports
    /// whose removal was waiting for clients are finished, since those clients are gone.
    pub(super) async fn replay_nbd(&mut self) -> Result<(), QmpError> {
        let Some(server) = &self.nbd else {
            return Ok(());
        };
        let listener = bulkhead_ipc::fd::dup(&server.listener)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        let (max_connections, handshake_max_seconds) =
            (server.max_connections, server.handshake_max_seconds);
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
        for e in self.exports.clone().into_iter().rev() {
            let Some(target) = self.node_ref(&e.node) else {
                continue;
            };
            self.connect(nbd, target.home).await?;
            exports.push(NbdExport {
                name: e.nbd_name.clone(),
                description: e.description.clone(),
                writable: e.writable,
                allocation_depth: e.allocation_depth,
                node: target,
            });
        }
        let start = ToWorker::NbdServerStart {
            max_connections,
            handshake_max_seconds,
            exports,
        };
        let w = self.worker(nbd).await?;
        w.call(start, &[listener.as_fd()])
            .await
            .map_err(call_error)?;
        Ok(())
    }

    /// The NBD worker reports the last client of export `nbd_name` gone.
    pub async fn export_gone(&mut self, nbd_name: &str) {
        let id = self
            .exports
            .iter()
            .find(|e| e.nbd_name == nbd_name && e.shutting_down)
            .map(|e| e.id.clone());
        if let Some(id) = id {
            self.finish_export_removal(&id).await;
        }
    }
}
