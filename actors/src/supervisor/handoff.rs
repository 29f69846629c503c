//! One NBD worker per export under `--isolation image`.
//!
//! Runs in the supervisor. qsd semantics keep one listening socket for every export,
//! and a client names its export only while negotiating; so the NBD *listener*
//! instance (`nbd_home`) negotiates for every export against metadata-only exports
//! (name, description, size, flags: no data channel), and each export gets an
//! instance of its own (kind `nbd`, no listener) holding the one data channel to the
//! exported image's worker. A negotiated client travels listener -> supervisor
//! (`WorkerAsk::NbdHandOff`, socket attached, answered in the listener's reader task
//! from the ask table) -> the export's instance (`ToWorker::NbdAdopt`), which sends
//! the final negotiation reply and serves the transmission phase. A compromised
//! export worker then reaches only the image it serves, and the listener none.
//!
//! `max-connections` is enforced by each export's worker, per export: the listener
//! sees a client only until it is handed off (documented in design/nbd.md).

use std::os::fd::AsFd;

use bulkhead_ipc::wire::{NbdExport, ToWorker, WorkerId, WorkerKind};

use super::export::Export;
use super::{Core, Isolation, QmpError, call_error, errors};

impl Core {
    /// Whether every export gets a worker of its own (`--isolation image`).
    pub(super) fn per_export(&self) -> bool {
        self.isolation == Isolation::Image
    }

    /// The export (by QMP id) instance `id` serves, if it is an export's own worker.
    pub(super) fn export_served_by(&self, id: WorkerId) -> Option<String> {
        self.export_homes
            .iter()
            .find(|(_, w)| **w == id)
            .map(|(e, _)| e.clone())
    }

    /// What the listener offers for `export`: metadata only.
    pub(super) fn metadata_export(&self, export: &Export) -> Option<NbdExport> {
        let node = self.graph.get(&export.node)?;
        Some(NbdExport {
            name: export.nbd_name.clone(),
            description: export.description.clone(),
            writable: export.writable,
            allocation_depth: export.allocation_depth,
            node: bulkhead_ipc::wire::NodeRef {
                node: node.id,
                home: node.home,
            },
            metadata_size: Some(node.size),
        })
    }

    /// Starts (or, after a restart, replays) the own worker of export `id`: a
    /// channel to the exported node's instance and an NBD server without a listener
    /// that serves only this export.
    pub(super) async fn start_export_worker(&mut self, id: &str) -> Result<(), QmpError> {
        let Some(export) = self.exports.iter().find(|e| e.id == id).cloned() else {
            return Err(errors::export_not_found(id));
        };
        let Some(server) = &self.nbd else {
            return Err(errors::nbd_server_not_running());
        };
        let (max_connections, handshake_max_seconds) =
            (server.max_connections, server.handshake_max_seconds);
        let Some(target) = self.node_ref(&export.node) else {
            return Err(errors::node_vanished());
        };
        let inst = match self.export_homes.get(id) {
            Some(w) => *w,
            None => {
                let w = self.new_instance(WorkerKind::Nbd);
                self.export_homes.insert(id.to_string(), w);
                w
            }
        };
        self.connect(inst, target.home).await?;
        let start = ToWorker::NbdServerStart {
            max_connections,
            handshake_max_seconds,
            exports: vec![NbdExport {
                name: export.nbd_name.clone(),
                description: export.description.clone(),
                writable: export.writable,
                allocation_depth: export.allocation_depth,
                node: target,
                metadata_size: None,
            }],
            hand_off: false,
        };
        let w = self.worker(inst).await?;
        w.call(start, &[]).await.map_err(call_error)?;
        self.refresh_asks();
        Ok(())
    }

    /// Replays an export's own worker after its restart: its clients are gone, so an
    /// export being removed is finished; any other export is served again.
    pub(super) async fn replay_export_worker(&mut self, inst: WorkerId) -> Result<(), QmpError> {
        let Some(id) = self.export_served_by(inst) else {
            return Ok(());
        };
        if self.exports.iter().any(|e| e.id == id && e.shutting_down) {
            self.finish_export_removal(&id).await;
            return Ok(());
        }
        self.start_export_worker(&id).await
    }

    /// Stops the own worker of export `id` (its removal is complete).
    pub(super) fn retire_export_worker(&mut self, id: &str) {
        if let Some(inst) = self.export_homes.remove(id) {
            self.retire_if_idle(inst);
        }
    }

    /// Stops the NBD server in every export's own worker (each answers once its
    /// clients are gone), as `nbd-server-stop` does in the listener.
    pub(super) async fn stop_export_workers(&mut self) {
        let workers: Vec<WorkerId> = self.export_homes.values().copied().collect();
        for w in workers {
            if let Some(h) = self.running(w) {
                let _ = h.call(ToWorker::NbdServerStop, &[]).await;
            }
        }
    }

    /// Sends the listener its start message (`hand_off` under per-export workers).
    pub(super) async fn start_listener(
        &mut self,
        exports: Vec<NbdExport>,
        listener: std::os::fd::OwnedFd,
    ) -> Result<(), QmpError> {
        let Some(server) = &self.nbd else {
            return Ok(());
        };
        let start = ToWorker::NbdServerStart {
            max_connections: server.max_connections,
            handshake_max_seconds: server.handshake_max_seconds,
            exports,
            hand_off: self.per_export(),
        };
        let nbd = self.nbd_instance();
        let w = self.worker(nbd).await?;
        w.call(start, &[listener.as_fd()])
            .await
            .map_err(call_error)?;
        Ok(())
    }
}
