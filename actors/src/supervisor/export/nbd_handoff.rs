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

use bulkhead_ipc::wire::{ExportSpec, ToWorker, WorkerId, WorkerKind};

use super::Export;
use crate::supervisor::workers::WorkerCaller;
use crate::supervisor::{Core, Isolation, QmpError, call_error, errors};

impl Core {
    /// Whether every export gets a worker of its own (`--isolation image`).
    pub(in crate::supervisor) fn per_export(&self) -> bool {
        self.isolation == Isolation::Image
    }

    /// What the listener offers for `export`: metadata only.
    pub(super) fn metadata_export(&self, export: &Export) -> Option<ExportSpec> {
        let node = self.graph.get(&export.node)?;
        let target = bulkhead_ipc::wire::NodeRef {
            node: node.id,
            home: node.home,
        };
        Some(self.nbd_spec(export, target, Some(node.size)))
    }

    /// Where the listener's hand-offs go: the listener (under per-export workers)
    /// and each export's own worker by NBD name (exports being removed left out).
    pub(in crate::supervisor) fn nbd_hand_off_table(
        &self,
    ) -> (Option<WorkerId>, Vec<(String, WorkerCaller)>) {
        let listener = self.nbd_home.filter(|_| self.per_export());
        let exporters = self
            .exports
            .iter()
            .filter(|e| !e.shutting_down)
            .filter_map(|e| {
                let super::Front::Nbd(o) = &e.front;
                let w = self.running(e.worker?)?;
                Some((o.name.clone(), w.caller()))
            })
            .collect();
        (listener, exporters)
    }

    /// Starts (or, after a restart, replays) the own worker of export `id`: a
    /// channel to the exported node's instance and an NBD server without a listener
    /// that serves only this export.
    pub(super) async fn start_export_worker(&mut self, id: &str) -> Result<(), QmpError> {
        let Some(export) = self.exports.get(id).cloned() else {
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
        let inst = match export.worker {
            Some(w) => w,
            None => {
                let w = self.new_instance(WorkerKind::Nbd);
                if let Some(e) = self.exports.get_mut(id) {
                    e.worker = Some(w);
                }
                w
            }
        };
        self.connect(inst, target.home).await?;
        let mut spec = self.nbd_spec(&export, target, None);
        self.share_bitmaps(inst, &export, &mut spec).await?;
        let start = ToWorker::NbdServerStart {
            max_connections,
            handshake_max_seconds,
            exports: vec![spec],
            hand_off: false,
        };
        let w = self.worker(inst).await?;
        w.call(start, &[]).await.map_err(call_error)?;
        self.refresh_asks();
        Ok(())
    }

    /// Stops the NBD server in every export's own worker (each answers once its
    /// clients are gone), as `nbd-server-stop` does in the listener.
    pub(super) async fn stop_export_workers(&mut self) {
        let workers: Vec<WorkerId> = self.exports.iter().filter_map(|e| e.worker).collect();
        for w in workers {
            if let Some(h) = self.running(w) {
                let _ = h.call(ToWorker::NbdServerStop, &[]).await;
            }
        }
    }

    /// Sends the listener its start message (`hand_off` under per-export workers).
    pub(super) async fn start_listener(
        &mut self,
        exports: Vec<ExportSpec>,
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
