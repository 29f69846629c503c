//! Block exports, whatever their front: `block-export-add/del`,
//! `query-block-exports`, the `BLOCK_EXPORT_DELETED` event, removal (safe and hard,
//! deferred until the last client is gone), exports that go with a node or a worker
//! given up on, and replay after a worker restart.
//!
//! Runs in the supervisor. The generic part (this file and `table.rs`) keeps the
//! export table and the lifecycle; a front (today only NBD: `nbd.rs`, with its
//! per-export workers in `nbd_handoff.rs`) provides, through the [`Front`] enum,
//! what only it knows: its options and their checks, the server it runs (NBD's
//! listening socket and `nbd-server-*` commands), how an export is placed on a
//! worker and attached there, and how it is detached. The workers report an export
//! gone by its [`ExportKey`], whatever the front.

mod mapped;
mod nbd;
mod nbd_handoff;
mod table;

use bulkhead_ipc::wire::{ExportKey, Reply, WorkerErrorKind, WorkerId};
use bulkhead_qmp::qapi::types::{
    BlockExportDelArgs, BlockExportKind, BlockExportOptions, BlockExportRemoveMode,
};
use serde_json::{Value, json};

pub use nbd::{NbdOptions, NbdServer};
pub use table::{Export, ExportTable, Front};

use super::workers::CallError;
use super::{Core, QmpError, call_error, errors};
use bulkhead_qmp::qapi::id_wellformed;

impl Core {
    pub(super) async fn block_export_add(
        &mut self,
        options: &BlockExportOptions,
    ) -> Result<(), QmpError> {
        // Generic checks, then the front's, in qsd's order.
        let common = &options.common;
        let id = common.id.clone();
        if !id_wellformed(&id) {
            return Err(errors::invalid_export_id());
        }
        if self.exports.contains(&id) {
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
        let node_active = node.active;
        let front = Front::Nbd(self.nbd_options(nbd, &node_name, writable)?);
        let allow_inactive = common.allow_inactive.unwrap_or(false);
        // Like qsd, an export that does not allow an inactive node activates it.
        if !allow_inactive && !node_active {
            self.set_active(&node_name, true).await?;
        }
        // The image locks come first: a conflict with another process (qemu-io, qsd)
        // refuses the export before any worker is involved.
        let key = self.exports.new_key();
        let Front::Nbd(o) = &front;
        let bitmaps = o.bitmaps.clone();
        self.hold_bitmaps(&bitmaps, true);
        self.exports.insert(Export {
            id: id.clone(),
            key,
            node: node_name.clone(),
            writable,
            allow_inactive,
            shutting_down: false,
            worker: None,
            front,
            mapped: None,
        });
        if let Err(e) = self.refresh_locks() {
            self.exports.remove(&id);
            self.hold_bitmaps(&bitmaps, false);
            let _ = self.refresh_locks();
            return Err(e);
        }
        if let Err(e) = self.attach_export(&id).await {
            self.retire_export_worker(&id);
            self.exports.remove(&id);
            self.hold_bitmaps(&bitmaps, false);
            let _ = self.refresh_locks();
            return Err(e);
        }
        if let Some(n) = self.graph.get_mut(&node_name) {
            n.exported = true;
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

    pub(super) fn query_block_exports(&self) -> Value {
        Value::Array(
            self.exports
                .iter()
                .map(|e| {
                    json!({
                        "id": e.id,
                        "type": e.front.type_name(),
                        "node-name": e.node,
                        "shutting-down": e.shutting_down,
                    })
                })
                .collect(),
        )
    }

    /// Places export `id` on a worker and attaches it there (nothing before
    /// start-up is complete: the command line's exports go with the server start).
    async fn attach_export(&mut self, id: &str) -> Result<(), QmpError> {
        let Some(e) = self.exports.get(id) else {
            return Err(errors::export_not_found(id));
        };
        match &e.front {
            Front::Nbd(_) => self.nbd_attach(id).await,
        }
    }

    /// Removes export `id` (`user`: asked over QMP, where a second safe removal of
    /// an export still in use is an error). The event comes now if no client was
    /// attached, else once the serving worker reports the last client gone.
    pub(super) async fn remove_export(
        &mut self,
        id: &str,
        hard: bool,
        user: bool,
    ) -> Result<(), QmpError> {
        let Some(e) = self.exports.get(id) else {
            return Err(errors::export_not_found(id));
        };
        if e.shutting_down {
            if user && !hard {
                return Err(errors::export_in_use(id));
            }
            return Ok(());
        }
        let reply = match &e.front {
            Front::Nbd(_) => self.nbd_detach(id, hard).await,
        };
        match reply {
            Ok(Reply::ExportRemoved { deferred: true }) => {
                if let Some(e) = self.exports.get_mut(id) {
                    e.shutting_down = true;
                }
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
        self.retire_export_worker(id);
        let Some(export) = self.exports.remove(id) else {
            return;
        };
        let Front::Nbd(o) = &export.front;
        self.hold_bitmaps(&o.bitmaps, false);
        // A node only the export held (an overlay of blockdev-snapshot-sync) goes.
        self.drop_if_unused(&export.node).await;
        let _ = self.refresh_locks();
        if !self.exports.iter().any(|e| e.node == export.node)
            && let Some(n) = self.graph.get_mut(&export.node)
        {
            n.exported = false;
        }
        self.emit("BLOCK_EXPORT_DELETED", Some(json!({"id": export.id})))
            .await;
    }

    /// Deletes every export and stops every front's server (nbd-server-stop, quit),
    /// one BLOCK_EXPORT_DELETED each, all before the command's reply. Like qsd,
    /// exports without clients go first (newest first); then the servers stop, which
    /// waits for the clients they disconnect, and the exports those held go last.
    pub(super) async fn delete_all_exports(&mut self) {
        for id in self.exports.ids() {
            let _ = self.remove_export(&id, true, false).await;
        }
        self.nbd_stop_workers().await;
        for id in self.exports.ids() {
            self.finish_export_removal(&id).await;
        }
    }

    /// The instance that serves export `e`'s clients: its own, or its front's shared
    /// one (`None` if not placed yet).
    pub(super) fn export_server(&self, e: &Export) -> Option<WorkerId> {
        if e.worker.is_some() {
            return e.worker;
        }
        match &e.front {
            Front::Nbd(_) => self.nbd_shared_server(),
        }
    }

    /// A worker reports the last client of removed export `key` gone. Only the
    /// instance serving the export may (under `--isolation image` its own, never the
    /// NBD listener, whose clients are only negotiating).
    pub(super) async fn export_gone(&mut self, from: WorkerId, key: ExportKey) {
        let Some(e) = self.exports.by_key(key) else {
            tracing::debug!(worker = %from, %key, "report about an export already gone");
            return;
        };
        if self.export_server(e) != Some(from) {
            // The NBD listener of per-export workers reports too (its clients were
            // only negotiating): not news. Anyone else is confused.
            if self.front_home(&e.front) != Some(from) {
                tracing::warn!(worker = %from, %key, "export report from a worker that does not serve it");
            }
            return;
        }
        if e.shutting_down {
            let id = e.id.clone();
            self.finish_export_removal(&id).await;
        }
    }

    /// Export ids instance `id` serves or negotiates for, for `x-bulkhead-query-workers`.
    pub(super) fn exports_on(&self, id: WorkerId) -> Vec<&str> {
        self.exports
            .iter()
            .filter(|e| e.worker == Some(id) || self.front_home(&e.front) == Some(id))
            .map(|e| e.id.as_str())
            .collect()
    }

    /// The instance a front runs its server in (NBD: the one worker under
    /// `--isolation kind`, the listener under `image`).
    pub(super) fn front_home(&self, front: &Front) -> Option<WorkerId> {
        match front {
            Front::Nbd(_) => self.nbd_home,
        }
    }

    /// Whether instance `id` holds export state a replacement must get back.
    pub(super) fn has_export_state(&self, id: WorkerId) -> bool {
        self.nbd_has_state(id) || self.exports.iter().any(|e| e.worker == Some(id))
    }

    /// The export (by QMP id) instance `id` serves alone, if it is an export's own
    /// worker.
    pub(super) fn export_served_by(&self, id: WorkerId) -> Option<String> {
        self.exports
            .iter()
            .find(|e| e.worker == Some(id))
            .map(|e| e.id.clone())
    }

    /// Stops the own worker of export `id` (its removal is complete).
    pub(super) fn retire_export_worker(&mut self, id: &str) {
        let Some(inst) = self.exports.get_mut(id).and_then(|e| e.worker.take()) else {
            return;
        };
        self.retire_if_idle(inst);
    }

    /// Replays the exports of restarted instance `id`: a front's server that ran
    /// there, or the export it served alone (whose clients are gone: an export being
    /// removed is finished, any other is served again).
    pub(super) async fn replay_exports(&mut self, id: WorkerId) -> Result<(), QmpError> {
        if self.nbd_home == Some(id) {
            self.replay_nbd().await?;
        }
        let Some(export) = self.export_served_by(id) else {
            return Ok(());
        };
        let Some(e) = self.exports.get(&export) else {
            return Ok(());
        };
        if e.shutting_down {
            self.finish_export_removal(&export).await;
            return Ok(());
        }
        match &e.front {
            Front::Nbd(_) => self.start_export_worker(&export).await,
        }
    }

    /// Instances hosting the nodes that the exports instance `id` serves use.
    pub(super) fn export_dependencies(&self, id: WorkerId) -> Vec<WorkerId> {
        self.exports
            .iter()
            .filter(|e| self.export_server(e) == Some(id))
            .filter_map(|e| self.graph.get(&e.node))
            .map(|n| n.home)
            .collect()
    }

    /// Instance `id` was given up on: every export it serves, negotiates for or
    /// reads through goes (with BLOCK_EXPORT_DELETED), and a front's server that
    /// ran there is forgotten.
    pub(super) async fn give_up_exports(&mut self, id: WorkerId) {
        let doomed: Vec<String> = self
            .exports
            .iter()
            .filter(|e| {
                self.front_home(&e.front) == Some(id)
                    || e.worker == Some(id)
                    || self.chain_uses(&e.node, id)
            })
            .map(|e| e.id.clone())
            .collect();
        for export in doomed {
            tracing::error!(%export, worker = %id, "deleting export: its worker keeps dying");
            self.finish_export_removal(&export).await;
        }
        self.nbd_given_up(id);
    }
}
