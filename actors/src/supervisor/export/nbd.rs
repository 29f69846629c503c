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
    ExportSpec, FrontSpec, NbdBitmap, NbdExport, NodeRef, Reply, ToWorker, WorkerErrorKind,
    WorkerId,
};
use bulkhead_qmp::qapi::types::{
    BlockDirtyBitmapOrStr, BlockExportCommon, BlockExportKind, BlockExportOptions,
    BlockExportOptionsNbd, BlockExportRemoveMode, BlockExportType, NbdServerAddArgs,
    NbdServerOptions, NbdServerRemoveArgs, SocketAddress,
};

use super::{Export, Front};
use crate::supervisor::workers::CallError;
use crate::supervisor::{Core, QmpError, call_error, errors};

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

/// The NBD options of an export (qsd's `BlockExportOptionsNbd`).
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// NBD export name.
    pub name: String,
    /// NBD description.
    pub description: Option<String>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// The dirty bitmaps offered, in the option's order, each held busy while the
    /// export exists.
    pub bitmaps: Vec<BitmapRef>,
}

/// A dirty bitmap by its node and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapRef {
    /// The node holding it.
    pub node: String,
    /// Its name.
    pub name: String,
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
            .map_err(|e| errors::socket_create(&crate::supervisor::strerror(e.raw_os_error())))?;
            let sa = rustix::net::SocketAddrUnix::new(path)
                .map_err(|_| errors::unix_path_too_long(path))?;
            rustix::net::bind(&sock, &sa).map_err(|e| {
                errors::unix_bind(path, &crate::supervisor::strerror(e.raw_os_error()))
            })?;
            rustix::net::listen(&sock, backlog).map_err(|e| {
                errors::socket_listen(&crate::supervisor::strerror(e.raw_os_error()))
            })?;
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
                        .map(crate::supervisor::strerror)
                        .unwrap_or_else(|| e.to_string()),
                )
            })?;
            let listener = OwnedFd::from(listener);
            // std listens with its own backlog; a second listen() only resizes it.
            rustix::net::listen(&listener, backlog).map_err(|e| {
                errors::socket_listen(&crate::supervisor::strerror(e.raw_os_error()))
            })?;
            Ok(listener)
        }
        SocketAddress::Vsock(_) => Err(errors::address_type_unsupported("vsock")),
        SocketAddress::Fd(_) => Err(errors::address_type_unsupported("fd")),
    }
}

impl Core {
    pub(in crate::supervisor) async fn nbd_server_start(
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

    pub(in crate::supervisor) async fn nbd_server_stop(&mut self) -> Result<(), QmpError> {
        if self.nbd.is_none() {
            return Err(errors::nbd_server_not_running());
        }
        // Every export is an NBD export so far.
        self.delete_all_exports().await;
        self.nbd = None;
        Ok(())
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
        args: &NbdServerAddArgs,
    ) -> Result<(), QmpError> {
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

    pub(in crate::supervisor) async fn nbd_server_remove(
        &mut self,
        args: &NbdServerRemoveArgs,
    ) -> Result<(), QmpError> {
        if self.nbd.is_none() {
            return Err(errors::nbd_server_not_running());
        }
        let hard = args.mode == Some(BlockExportRemoveMode::Hard);
        self.remove_export(&args.name, hard, true).await
    }

    /// The NBD options of `block-export-add`, checked in qsd's order after the
    /// generic ones.
    pub(super) fn nbd_options(
        &self,
        nbd: &BlockExportOptionsNbd,
        node_name: &str,
        writable: bool,
    ) -> Result<NbdOptions, QmpError> {
        if self.nbd.is_none() {
            return Err(errors::nbd_server_not_running());
        }
        let name = nbd.name.clone().unwrap_or_else(|| node_name.to_string());
        if name.len() > NBD_MAX_STRING {
            return Err(errors::export_name_too_long(&name));
        }
        let description = nbd.description.clone();
        if let Some(d) = &description
            && d.len() > NBD_MAX_STRING
        {
            return Err(errors::export_description_too_long(d));
        }
        if self.nbd_export_named(&name).is_some() {
            return Err(errors::export_name_in_use(&name));
        }
        let bitmaps = nbd
            .bitmaps
            .iter()
            .flatten()
            .map(|b| self.export_bitmap(b, node_name, writable))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NbdOptions {
            name,
            description,
            allocation_depth: nbd.allocation_depth.unwrap_or(false),
            bitmaps,
        })
    }

    /// One entry of an NBD export's `bitmaps`, as `nbd_export_create` finds it: a
    /// name is looked for on the exported node, then down its filtered or backing
    /// child; `{node, name}` names it exactly. A bitmap that still records writes
    /// cannot be offered read-only over a node that takes writes (its bits would
    /// change under the client); a busy one not at all.
    fn export_bitmap(
        &self,
        b: &BlockDirtyBitmapOrStr,
        node_name: &str,
        writable: bool,
    ) -> Result<BitmapRef, QmpError> {
        let (node, bitmap) = match b {
            BlockDirtyBitmapOrStr::Local(name) => {
                let mut cur = self.graph.get(node_name);
                let found = loop {
                    let Some(n) = cur else {
                        break None;
                    };
                    if let Some(b) = n.bitmaps.iter().find(|b| &b.name == name) {
                        break Some((n, b));
                    }
                    let below = if n.driver.info().filter {
                        n.file()
                    } else {
                        n.child(crate::supervisor::graph::Role::Backing)
                    };
                    cur = below.and_then(|c| self.graph.get(c));
                };
                let (n, b) = found.ok_or_else(|| errors::export_bitmap_not_found(name))?;
                if !writable && !n.read_only && n.active && b.enabled {
                    return Err(errors::enabled_bitmap_read_only_export(name));
                }
                (n, b)
            }
            BlockDirtyBitmapOrStr::External(e) => {
                let n = self
                    .graph
                    .get(&e.node)
                    .ok_or_else(|| errors::bitmap_node_not_found(&e.node))?;
                let b = n
                    .bitmaps
                    .iter()
                    .find(|b| b.name == e.name)
                    .ok_or_else(|| errors::bitmap_not_found(&e.name))?;
                (n, b)
            }
        };
        if bitmap.busy() {
            return Err(errors::bitmap_busy(&bitmap.name));
        }
        Ok(BitmapRef {
            node: node.name.clone(),
            name: bitmap.name.clone(),
        })
    }

    /// Marks the bitmaps an export offers busy (`hold`), or releases them.
    pub(super) fn hold_bitmaps(&mut self, refs: &[BitmapRef], hold: bool) {
        for r in refs {
            if let Some(b) = self
                .graph
                .get_mut(&r.node)
                .and_then(|n| n.bitmaps.iter_mut().find(|b| b.name == r.name))
            {
                b.users = if hold {
                    b.users.saturating_add(1)
                } else {
                    b.users.saturating_sub(1)
                };
            }
        }
    }

    /// The bitmaps of export `e` as an NBD worker gets them (no regions yet).
    fn nbd_bitmaps(&self, e: &Export) -> Vec<NbdBitmap> {
        let Front::Nbd(o) = &e.front;
        o.bitmaps
            .iter()
            .filter_map(|r| {
                let b = self
                    .graph
                    .get(&r.node)?
                    .bitmaps
                    .iter()
                    .find(|b| b.name == r.name)?;
                Some(NbdBitmap {
                    name: b.name.clone(),
                    size: b.bits().size(),
                    granularity: b.bits().granularity(),
                    region: None,
                })
            })
            .collect()
    }

    /// Gives worker `w` read-only copies of the regions of `spec`'s bitmaps (of
    /// export `e`), in messages of at most `MAX_FDS_PER_MESSAGE` descriptors, and
    /// names them in the spec.
    pub(super) async fn share_bitmaps(
        &mut self,
        w: WorkerId,
        e: &Export,
        spec: &mut ExportSpec,
    ) -> Result<(), QmpError> {
        let Front::Nbd(o) = &e.front;
        let FrontSpec::Nbd(nbd) = &mut spec.front;
        let mut copies = Vec::with_capacity(o.bitmaps.len());
        for (r, b) in o.bitmaps.iter().zip(nbd.bitmaps.iter_mut()) {
            let region = self
                .graph
                .get(&r.node)
                .and_then(|n| n.bitmaps.iter().find(|b| b.name == r.name))
                .ok_or_else(errors::node_vanished)?;
            let copy = bulkhead_ipc::shm::read_only_copy(region.fd().as_fd())
                .map_err(errors::bitmap_region)?;
            self.next_region += 1;
            b.region = Some(self.next_region);
            copies.push((self.next_region, copy));
        }
        for batch in copies.chunks(bulkhead_ipc::fd::MAX_FDS_PER_MESSAGE) {
            let (regions, fds): (Vec<u64>, Vec<_>) =
                batch.iter().map(|(id, fd)| (*id, fd.as_fd())).unzip();
            let worker = self.worker(w).await?;
            worker
                .call(ToWorker::ShareBitmaps { regions }, &fds)
                .await
                .map_err(call_error)?;
        }
        Ok(())
    }

    /// The export whose NBD name is `name`.
    pub(in crate::supervisor) fn nbd_export_named(&self, name: &str) -> Option<&Export> {
        self.exports
            .iter()
            .find(|e| matches!(&e.front, Front::Nbd(o) if o.name == name))
    }

    /// What an NBD worker gets for export `e` on `target` (`metadata_size`: the
    /// listener's metadata-only copy).
    pub(super) fn nbd_spec(
        &self,
        e: &Export,
        target: NodeRef,
        metadata_size: Option<u64>,
    ) -> ExportSpec {
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
                bitmaps: self.nbd_bitmaps(e),
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
        let export = self
            .exports
            .get(id)
            .cloned()
            .ok_or_else(errors::node_vanished)?;
        let mut spec = self
            .node_ref(&export.node)
            .map(|target| self.nbd_spec(&export, target, None))
            .ok_or_else(errors::node_vanished)?;
        let nbd = self.nbd_instance();
        self.connect(nbd, spec.node.home).await?;
        self.share_bitmaps(nbd, &export, &mut spec).await?;
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
            .ok_or_else(errors::node_vanished)?;
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
        let listener = bulkhead_ipc::fd::dup(&server.listener).map_err(errors::from_error)?;
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
        let specs: Vec<(Export, ExportSpec)> = self
            .exports
            .iter()
            .rev()
            .filter_map(|e| Some((e.clone(), self.nbd_spec(e, self.node_ref(&e.node)?, None))))
            .collect();
        for (e, mut spec) in specs {
            self.connect(nbd, spec.node.home).await?;
            self.share_bitmaps(nbd, &e, &mut spec).await?;
            exports.push(spec);
        }
        self.start_listener(exports, listener).await
    }
}
