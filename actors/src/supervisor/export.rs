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
use bulkhead_qmp::qapi::id_wellformed;
use bulkhead_qmp::qapi::types::{
    BlockDirtyBitmapOrStr, BlockExportCommon, BlockExportDelArgs, BlockExportKind,
    BlockExportOptions, BlockExportOptionsNbd, BlockExportRemoveMode, BlockExportType,
    NbdServerAddArgs, NbdServerOptions, NbdServerRemoveArgs, SocketAddress,
};
use serde_json::{Value, json};

use super::workers::CallError;
use super::{Core, QmpError, call_error, errors};

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
    /// `allow-inactive`: the export neither activates its node nor stops it from
    /// being inactivated.
    pub allow_inactive: bool,
}

/// Binds the listening socket `addr`.
/// The backlog is SOMAXCONN whatever max-connections says, as in qsd: clients the
/// NBD worker has not accepted yet (out of descriptors, or restarting) wait there,
/// and a small backlog would refuse them instead.
fn listen(addr: &SocketAddress) -> Result<OwnedFd, QmpError> {
    let backlog = libc::SOMAXCONN;
    match addr {
        SocketAddress::Unix(unix) => {
            let path = unix.path.as_str();
            // QEMU replaces a stale socket file.
            let _ = std::fs::remove_file(path);
            let sock = rustix::net::socket_with(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::STREAM,
                rustix::net::SocketFlags::CLOEXEC,
                None,
            )
            .map_err(|e| errors::socket_create(&super::strerror(e.raw_os_error())))?;
            let sa = rustix::net::SocketAddrUnix::new(path)
                .map_err(|_| errors::unix_path_too_long(path))?;
            rustix::net::bind(&sock, &sa)
                .map_err(|e| errors::unix_bind(path, &super::strerror(e.raw_os_error())))?;
            rustix::net::listen(&sock, backlog)
                .map_err(|e| errors::socket_listen(&super::strerror(e.raw_os_error())))?;
            Ok(sock)
        }
        SocketAddress::Inet(inet) => {
            let (host, port) = (inet.host.as_str(), inet.port.as_str());
            let target = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let listener = std::net::TcpListener::bind(&target).map_err(|e| {
                errors::inet_bind(
                    &e.raw_os_error()
                        .map(super::strerror)
                        .unwrap_or_else(|| e.to_string()),
                )
            })?;
            let listener = OwnedFd::from(listener);
            // std listens with its own backlog; a second listen() only resizes it.
            rustix::net::listen(&listener, backlog)
                .map_err(|e| errors::socket_listen(&super::strerror(e.raw_os_error())))?;
            Ok(listener)
        }
        SocketAddress::Vsock(_) => Err(errors::address_type_unsupported("vsock")),
        SocketAddress::Fd(_) => Err(errors::address_type_unsupported("fd")),
    }
}

impl Core {
    pub(super) async fn nbd_server_start(
        &mut self,
        args: &NbdServerOptions,
    ) -> Result<(), QmpError> {
        if self.nbd.is_some() {
            return Err(errors::nbd_server_running());
        }
        if let Some(creds) = &args.tls_creds {
            // No --object support yet, so no credentials object can exist.
            return Err(errors::no_tls_creds(creds));
        }
        if args.tls_authz.is_some() {
            return Err(errors::tls_authz_without_creds());
        }
        let max_connections = args.max_connections.unwrap_or(100);
        let handshake = args.handshake_max_seconds.unwrap_or(10);
        let listener = listen(&args.addr)?;
        // During start-up the server only records itself: like qsd, no client is served
        // before the whole command line ran (its `--export`s included).
        if self.started {
            let copy = bulkhead_ipc::fd::dup(&listener).map_err(errors::from_error)?;
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
        Ok(())
    }

    pub(super) async fn nbd_server_stop(&mut self) -> Result<(), QmpError> {
        if self.nbd.is_none() {
            return Err(errors::nbd_server_not_running());
        }
        self.delete_all_exports().await;
        self.nbd = None;
        Ok(())
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
        self.stop_export_workers().await;
        let deferred: Vec<String> = self.exports.iter().map(|e| e.id.clone()).collect();
        for id in deferred {
            self.finish_export_removal(&id).await;
        }
    }

    pub(super) async fn block_export_add(
        &mut self,
        options: &BlockExportOptions,
    ) -> Result<(), QmpError> {
        let common = &options.common;
        let id = common.id.clone();
        if !id_wellformed(&id) {
            return Err(errors::invalid_export_id());
        }
        if self.exports.iter().any(|e| e.id == id) {
            return Err(errors::export_id_in_use(&id));
        }
        let BlockExportKind::Nbd(nbd) = &options.kind else {
            return Err(errors::export_type_unsupported());
        };
        let node_name = common.node_name.clone();
        let Some(node) = self.graph.get(&node_name) else {
            return Err(errors::device_not_found("", &node_name));
        };
        if let Some(t) = &common.iothread {
            return Err(errors::iothread_not_found(t));
        }
        let writable = common.writable.unwrap_or(false);
        if writable && node.read_only {
            return Err(errors::export_read_only_writable());
        }
        if self.nbd.is_none() {
            return Err(errors::nbd_server_not_running());
        }
        let name = nbd.name.clone().unwrap_or_else(|| node_name.clone());
        if name.len() > NBD_MAX_STRING {
            return Err(errors::export_name_too_long(&name));
        }
        let description = nbd.description.clone();
        if let Some(d) = &description
            && d.len() > NBD_MAX_STRING
        {
            return Err(errors::export_description_too_long(d));
        }
        if self.exports.iter().any(|e| e.nbd_name == name) {
            return Err(errors::export_name_in_use(&name));
        }
        if let Some(first) = nbd.bitmaps.as_ref().and_then(|b| b.first()) {
            // No node has dirty bitmaps yet, so any named bitmap is missing.
            let bm = match first {
                BlockDirtyBitmapOrStr::Local(name) => name.as_str(),
                BlockDirtyBitmapOrStr::External(_) => "",
            };
            return Err(errors::bitmap_not_found(bm));
        }
        let allocation_depth = nbd.allocation_depth.unwrap_or(false);
        let target = NodeRef {
            node: node.id,
            home: node.home,
        };
        let allow_inactive = common.allow_inactive.unwrap_or(false);
        // Like qsd, an export that does not allow an inactive node activates it.
        if !allow_inactive && !node.active {
            self.set_active(&node_name, true).await?;
        }
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
                allow_inactive,
            },
        );
        if let Err(e) = self.refresh_locks() {
            self.exports.remove(0);
            let _ = self.refresh_locks();
            return Err(e);
        }
        let added = if self.per_export() {
            self.add_export_workers(&id).await
        } else {
            self.add_export_to_worker(&name, &description, writable, allocation_depth, target)
                .await
        };
        if let Err(e) = added {
            self.exports.remove(0);
            let _ = self.refresh_locks();
            return Err(e);
        }
        if let Some(n) = self.graph.get_mut(&node_name) {
            n.exported = true;
        }
        Ok(())
    }

    /// Under `--isolation image`: the export's own worker first (so a client the
    /// listener negotiates always has somewhere to go), then the listener's
    /// metadata-only export.
    async fn add_export_workers(&mut self, id: &str) -> Result<(), QmpError> {
        if !self.started {
            return Ok(());
        }
        let result = async {
            self.start_export_worker(id).await?;
            let export = self
                .exports
                .iter()
                .find(|e| e.id == id)
                .and_then(|e| self.metadata_export(e))
                .ok_or_else(errors::node_vanished)?;
            let nbd = self.nbd_instance();
            let w = self.worker(nbd).await?;
            w.call(ToWorker::NbdExportAdd(export), &[])
                .await
                .map_err(call_error)?;
            Ok(())
        }
        .await;
        if result.is_err() {
            self.retire_export_worker(id);
        }
        result
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
                    metadata_size: None,
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
        args: &BlockExportDelArgs,
    ) -> Result<(), QmpError> {
        let hard = args.mode == Some(BlockExportRemoveMode::Hard);
        self.remove_export(&args.id, hard, true).await
    }

    pub(super) async fn nbd_server_add(&mut self, args: &NbdServerAddArgs) -> Result<(), QmpError> {
        if self.nbd.is_none() {
            return Err(errors::nbd_server_not_running());
        }
        let device = args.device.clone();
        let Some(node) = self.graph.get(&device) else {
            return Err(errors::device_not_found(&device, &device));
        };
        // nbd-server-add downgrades a writable export of a read-only node silently.
        let writable = args.writable.unwrap_or(false) && !node.read_only;
        let name = args.name.clone().unwrap_or_else(|| device.clone());
        let options = BlockExportOptions {
            common: BlockExportCommon {
                export_type: BlockExportType::Nbd,
                id: name.clone(),
                fixed_iothread: None,
                iothread: None,
                node_name: device,
                writable: Some(writable),
                writethrough: None,
                allow_inactive: None,
            },
            kind: BlockExportKind::Nbd(BlockExportOptionsNbd {
                name: Some(name),
                description: args.description.clone(),
                bitmaps: args
                    .bitmap
                    .clone()
                    .map(|b| vec![BlockDirtyBitmapOrStr::Local(b)]),
                allocation_depth: None,
            }),
        };
        self.block_export_add(&options).await
    }

    pub(super) async fn nbd_server_remove(
        &mut self,
        args: &NbdServerRemoveArgs,
    ) -> Result<(), QmpError> {
        if self.nbd.is_none() {
            return Err(errors::nbd_server_not_running());
        }
        let hard = args.mode == Some(BlockExportRemoveMode::Hard);
        self.remove_export(&args.name, hard, true).await
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
            return Err(errors::export_not_found(id));
        };
        if self.exports[pos].shutting_down {
            if user && !hard {
                return Err(errors::export_in_use(id));
            }
            return Ok(());
        }
        let name = self.exports[pos].nbd_name.clone();
        // Under per-export workers the clients live in the export's own worker; the
        // listener holds only negotiating ones, dropped at once (after the export's
        // worker agreed, so a refused safe removal leaves the export offered).
        let serving = if self.per_export() {
            self.export_homes.get(id).copied()
        } else {
            self.nbd_home
        };
        let remove = ToWorker::NbdExportRemove {
            name: name.clone(),
            hard,
        };
        let reply = match serving.and_then(|id| self.running(id)) {
            Some(w) => w.call(remove, &[]).await,
            None => Ok(Reply::ExportRemoved { deferred: false }),
        };
        let in_use =
            matches!(&reply, Err(CallError::Worker(e)) if e.kind == WorkerErrorKind::InUse);
        if self.per_export()
            && !in_use
            && let Some(w) = self.nbd_home.and_then(|id| self.running(id))
        {
            let remove = ToWorker::NbdExportRemove { name, hard: true };
            if let Err(e) = w.call(remove, &[]).await {
                tracing::debug!(error = %e, "the NBD listener did not offer the export");
            }
        }
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
                Err(errors::export_in_use(id))
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
        self.retire_export_worker(&export.id);
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
    /// Under `--isolation image` this is the listener (metadata-only exports; the
    /// clients live in the exports' own workers, which are started first if they do
    /// not run yet, e.g. for exports of the command line).
    pub(super) async fn replay_nbd(&mut self) -> Result<(), QmpError> {
        let Some(server) = &self.nbd else {
            return Ok(());
        };
        let listener = bulkhead_ipc::fd::dup(&server.listener).map_err(errors::from_error)?;
        if self.per_export() {
            let missing: Vec<String> = self
                .exports
                .iter()
                .filter(|e| !e.shutting_down && !self.export_homes.contains_key(&e.id))
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
                metadata_size: None,
            });
        }
        self.start_listener(exports, listener).await
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
