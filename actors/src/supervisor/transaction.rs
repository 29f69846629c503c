//! `transaction`: several actions, all or nothing, with qsd's errors.
//!
//! Runs in the supervisor. QEMU prepares every action in order, aborts the prepared
//! ones if one fails, and commits them all otherwise. Here the bitmap actions are
//! checked first against a model of the nodes' bitmaps (names, enabled, busy, size),
//! in order and with the same rules as the commands (a `remove` keeps its bitmap
//! findable but busy until the end, as QEMU's prepare does), so the first failing
//! action is known before anything changes. The actions that need a worker and can
//! fail on the image itself (internal snapshots) run next, those before the first
//! failing action, in order, and are undone (deleted) if one of them fails or a
//! later bitmap action would. Then every bitmap action is applied; having passed
//! the model, none fails short of the machine running out of memory.
//! `blockdev-backup` is checked with the others and started last, after the bitmap
//! actions (a write in between lands in the new bitmap, never in neither);
//! `blockdev-snapshot` actions are checked against the snapshots before them (an
//! overlay or node used twice fails as in QEMU) and taken after the internal
//! snapshots; `blockdev-snapshot-sync` creates its overlays first (all or none), then
//! attaches them with the others; `drive-backup` creates its target in the same
//! step and starts with the backups. With `completion-mode: grouped` the backups
//! run as a group: they complete together, and one failing or cancelled cancels
//! the others.

use std::collections::HashMap;

use bulkhead_qmp::qapi::types::{
    ActionCompletionMode, BlockDirtyBitmapOrStr, TransactionAction, TransactionArgs,
};

use super::{Core, QmpError, errors};

/// A bitmap as the model sees it.
#[derive(Debug, Clone)]
struct Modelled {
    name: String,
    enabled: bool,
    busy: bool,
    size: u64,
}

/// The bitmaps of the nodes the actions touched so far, as they would be after the
/// actions checked so far, and the job ids backups take.
#[derive(Default)]
struct Model {
    nodes: HashMap<String, Vec<Modelled>>,
    jobs: Vec<String>,
    /// External snapshots so far: (node, overlay).
    snapshots: Vec<(String, String)>,
}

impl Model {
    /// The node's bitmaps, loaded from the graph on first use.
    fn node<'a>(&'a mut self, core: &Core, node: &str) -> Option<&'a mut Vec<Modelled>> {
        if !self.nodes.contains_key(node) {
            let n = core.graph.get(node)?;
            let list = n
                .bitmaps
                .iter()
                .map(|b| Modelled {
                    name: b.name.clone(),
                    enabled: b.enabled,
                    busy: b.busy(),
                    size: b.bits().size(),
                })
                .collect();
            self.nodes.insert(node.to_string(), list);
        }
        self.nodes.get_mut(node)
    }

    /// `block_dirty_bitmap_lookup`.
    fn find<'a>(
        &'a mut self,
        core: &Core,
        node: &str,
        name: &str,
    ) -> Result<&'a mut Modelled, QmpError> {
        let list = self
            .node(core, node)
            .ok_or_else(|| errors::bitmap_node_not_found(node))?;
        list.iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| errors::bitmap_not_found(name))
    }

    /// Checks one action and applies it to the model.
    fn check(&mut self, core: &Core, action: &TransactionAction) -> Result<(), QmpError> {
        match action {
            TransactionAction::Abort(_) => Err(errors::transaction_aborted()),
            TransactionAction::BlockDirtyBitmapAdd(a) => {
                let recording = core.check_bitmap_add(
                    &a.node,
                    &a.name,
                    a.granularity,
                    a.persistent.unwrap_or(false),
                )?;
                let size = recording.size;
                let list = self
                    .node(core, &a.node)
                    .ok_or_else(|| errors::device_not_found(&a.node, &a.node))?;
                if list.iter().any(|b| b.name == a.name) {
                    return Err(errors::bitmap_exists(&a.name));
                }
                let enabled = !a.disabled.unwrap_or(false);
                if enabled && list.iter().filter(|b| b.enabled).count() >= MAX {
                    return Err(errors::too_many_recording_bitmaps(MAX));
                }
                list.push(Modelled {
                    name: a.name.clone(),
                    enabled,
                    busy: false,
                    size,
                });
                Ok(())
            }
            TransactionAction::BlockDirtyBitmapRemove(b) => {
                let m = self.find(core, &b.node, &b.name)?;
                if m.busy {
                    return Err(errors::bitmap_busy(&m.name));
                }
                // QEMU's prepare hides it from every later action: busy until commit.
                m.busy = true;
                Ok(())
            }
            TransactionAction::BlockDirtyBitmapClear(b) => {
                let m = self.find(core, &b.node, &b.name)?;
                if m.busy {
                    return Err(errors::bitmap_busy(&m.name));
                }
                Ok(())
            }
            TransactionAction::BlockDirtyBitmapEnable(b)
            | TransactionAction::BlockDirtyBitmapDisable(b) => {
                let enable = matches!(action, TransactionAction::BlockDirtyBitmapEnable(_));
                let m = self.find(core, &b.node, &b.name)?;
                if m.busy {
                    return Err(errors::bitmap_busy(&m.name));
                }
                let was = m.enabled;
                m.enabled = enable;
                if enable && !was {
                    let recording = self
                        .node(core, &b.node)
                        .map_or(0, |l| l.iter().filter(|b| b.enabled).count());
                    if recording > MAX {
                        return Err(errors::too_many_recording_bitmaps(MAX));
                    }
                }
                Ok(())
            }
            TransactionAction::BlockDirtyBitmapMerge(m) => {
                let size = self.find(core, &m.node, &m.target)?.size;
                for s in &m.bitmaps {
                    let (node, name) = match s {
                        BlockDirtyBitmapOrStr::Local(name) => (m.node.as_str(), name.as_str()),
                        BlockDirtyBitmapOrStr::External(e) => (e.node.as_str(), e.name.as_str()),
                    };
                    let found = match s {
                        BlockDirtyBitmapOrStr::Local(_) => self
                            .node(core, node)
                            .and_then(|l| l.iter().find(|b| b.name == name))
                            .ok_or_else(|| errors::bitmap_not_found(name))?,
                        BlockDirtyBitmapOrStr::External(_) => self.find(core, node, name)?,
                    };
                    if found.size != size {
                        return Err(errors::from_error(
                            bulkhead_bitmap::BitmapError::Incompatible {
                                destination: size,
                                from: found.size,
                            },
                        ));
                    }
                }
                let t = self.find(core, &m.node, &m.target)?;
                if t.busy {
                    return Err(errors::bitmap_busy(&t.name));
                }
                Ok(())
            }
            // Checked when it runs (by the worker holding the image).
            TransactionAction::BlockdevSnapshotInternalSync(_) => Ok(()),
            TransactionAction::BlockdevSnapshot(a) => {
                let pair = core.check_snapshot(&a.node, &a.overlay, &self.snapshots)?;
                self.snapshots.push(pair);
                Ok(())
            }
            TransactionAction::BlockdevSnapshotSync(a) => {
                let names: Vec<String> = self.snapshots.iter().map(|(_, o)| o.clone()).collect();
                core.check_snapshot_sync(a, &names)?;
                let node = a.node_name.clone().unwrap_or_default();
                if let Some((_, o)) = self.snapshots.iter().find(|(b, _)| *b == node) {
                    return Err(errors::node_busy_backing(&node, o));
                }
                if let Some(n) = core.graph.get(&node)
                    && let Some(parent) = core.backing_parent(n)
                {
                    return Err(errors::node_busy_backing(&node, &parent));
                }
                let snap = a.snapshot_node_name.clone().unwrap_or_default();
                self.snapshots.push((node, snap));
                Ok(())
            }
            TransactionAction::BlockdevBackup(b) => {
                core.check_backup(b, &self.jobs)?;
                self.jobs.push(b.job_id.clone().unwrap_or_default());
                Ok(())
            }
            // The device here; the rest once its target exists (created first, with
            // the snapshot overlays).
            TransactionAction::DriveBackup(m) => {
                let device = m.get("device").and_then(|v| v.as_str()).unwrap_or("");
                if core.graph.get(device).is_none() {
                    return Err(errors::device_not_found(device, device));
                }
                let job = m.get("job-id").and_then(|v| v.as_str()).unwrap_or("");
                self.jobs.push(job.to_string());
                Ok(())
            }
        }
    }
}

const MAX: usize = bulkhead_ipc::wire::MAX_RECORDING_BITMAPS;

/// The action's QAPI type name.
fn action_name(action: &TransactionAction) -> &'static str {
    match action {
        TransactionAction::Abort(_) => "abort",
        TransactionAction::BlockDirtyBitmapAdd(_) => "block-dirty-bitmap-add",
        TransactionAction::BlockDirtyBitmapRemove(_) => "block-dirty-bitmap-remove",
        TransactionAction::BlockDirtyBitmapClear(_) => "block-dirty-bitmap-clear",
        TransactionAction::BlockDirtyBitmapEnable(_) => "block-dirty-bitmap-enable",
        TransactionAction::BlockDirtyBitmapDisable(_) => "block-dirty-bitmap-disable",
        TransactionAction::BlockDirtyBitmapMerge(_) => "block-dirty-bitmap-merge",
        TransactionAction::BlockdevBackup(_) => "blockdev-backup",
        TransactionAction::BlockdevSnapshot(_) => "blockdev-snapshot",
        TransactionAction::BlockdevSnapshotInternalSync(_) => "blockdev-snapshot-internal-sync",
        TransactionAction::BlockdevSnapshotSync(_) => "blockdev-snapshot-sync",
        TransactionAction::DriveBackup(_) => "drive-backup",
    }
}

impl Core {
    /// `transaction`.
    pub(super) async fn transaction(&mut self, args: &TransactionArgs) -> Result<(), QmpError> {
        let grouped = args
            .properties
            .as_ref()
            .and_then(|p| p.completion_mode)
            .is_some_and(|m| m == ActionCompletionMode::Grouped);
        if grouped
            && let Some(a) = args.actions.iter().find(|a| {
                !matches!(
                    a,
                    TransactionAction::BlockdevBackup(_) | TransactionAction::DriveBackup(_)
                )
            })
        {
            return Err(errors::transaction_not_grouped(action_name(a)));
        }

        // The first action that would fail, and why.
        let mut model = Model::default();
        let failed = args
            .actions
            .iter()
            .enumerate()
            .find_map(|(i, a)| model.check(self, a).err().map(|e| (i, e)));
        let upto = failed.as_ref().map_or(args.actions.len(), |(i, _)| *i);
        // The overlays `blockdev-snapshot-sync` creates, first (creating a file can
        // fail): all or none. They are attached with the other external snapshots.
        let mut overlays: Vec<(String, String)> = Vec::new();
        let mut targets: Vec<(bulkhead_qmp::qapi::types::BlockdevBackupArgs, String)> = Vec::new();
        if failed.is_none() {
            let mut ids: Vec<String> = Vec::new();
            for a in &args.actions {
                let prepared = match a {
                    TransactionAction::BlockdevSnapshotSync(s) => self
                        .prepare_snapshot_sync(s)
                        .await
                        .map(|pair| overlays.push(pair)),
                    TransactionAction::DriveBackup(m) => {
                        self.prepare_drive_backup(m, &ids).await.map(|(t, node)| {
                            ids.push(t.job_id.clone().unwrap_or_default());
                            targets.push((t, node));
                        })
                    }
                    TransactionAction::BlockdevBackup(b) => {
                        ids.push(b.job_id.clone().unwrap_or_default());
                        Ok(())
                    }
                    _ => Ok(()),
                };
                if let Err(e) = prepared {
                    for o in overlays
                        .iter()
                        .map(|(_, o)| o)
                        .chain(targets.iter().map(|(_, n)| n))
                    {
                        self.drop_if_unused(o).await;
                    }
                    return Err(e);
                }
            }
        }
        // The image actions before it, undone if one fails or a later one would.
        let mut made: Vec<(String, String)> = Vec::new();
        let mut outcome = Ok(());
        for a in &args.actions[..upto] {
            if let TransactionAction::BlockdevSnapshotInternalSync(s) = a {
                if let Err(e) = self.snapshot_internal_sync(&s.device, &s.name).await {
                    outcome = Err(e);
                    break;
                }
                made.push((s.device.clone(), s.name.clone()));
            }
        }
        if outcome.is_ok()
            && let Some((_, e)) = failed
        {
            outcome = Err(e);
        }
        // External snapshots after the internal ones (which the image itself may
        // refuse): checked against the model, they fail only if the system does.
        if outcome.is_ok() {
            let mut created = overlays.iter();
            for a in &args.actions {
                let pair = match a {
                    TransactionAction::BlockdevSnapshot(s) => (s.node.clone(), s.overlay.clone()),
                    TransactionAction::BlockdevSnapshotSync(_) => match created.next() {
                        Some(p) => p.clone(),
                        None => continue,
                    },
                    _ => continue,
                };
                if let Err(e) = self.blockdev_snapshot(&pair.0, &pair.1).await {
                    tracing::error!(node = pair.0, error = %e.desc, "a checked snapshot failed");
                    outcome = Err(e);
                    break;
                }
            }
        }
        // A created overlay nothing took over (a failure, or a node without users)
        // goes, as in the command.
        for (_, o) in &overlays {
            self.drop_if_unused(o).await;
        }
        if let Err(e) = outcome {
            for (device, name) in made.iter().rev() {
                if let Err(undo) = self
                    .snapshot_delete_internal_sync(device, None, Some(name))
                    .await
                {
                    tracing::warn!(device, name, error = %undo.desc, "a transaction's snapshot could not be undone");
                }
            }
            return Err(e);
        }
        for a in &args.actions {
            let applied = match a {
                TransactionAction::BlockDirtyBitmapAdd(b) => {
                    self.bitmap_add(
                        &b.node,
                        &b.name,
                        b.granularity,
                        b.persistent.unwrap_or(false),
                        b.disabled.unwrap_or(false),
                    )
                    .await
                }
                TransactionAction::BlockDirtyBitmapRemove(b) => {
                    self.bitmap_remove(&b.node, &b.name).await
                }
                TransactionAction::BlockDirtyBitmapClear(b) => {
                    self.bitmap_clear(&b.node, &b.name).await
                }
                TransactionAction::BlockDirtyBitmapEnable(b) => {
                    self.bitmap_set_enabled(&b.node, &b.name, true).await
                }
                TransactionAction::BlockDirtyBitmapDisable(b) => {
                    self.bitmap_set_enabled(&b.node, &b.name, false).await
                }
                TransactionAction::BlockDirtyBitmapMerge(m) => {
                    self.bitmap_merge(&m.node, &m.target, &m.bitmaps).await
                }
                _ => Ok(()),
            };
            if let Err(e) = applied {
                tracing::error!(action = action_name(a), error = %e.desc, "a checked transaction action failed");
                return Err(e);
            }
        }
        // Jobs last: a backup's point in time comes after the bitmaps the same
        // transaction made, so a write in between is in the bitmap (never in
        // neither).
        let mut prepared = targets.iter();
        let mut started: Vec<String> = Vec::new();
        for a in &args.actions {
            let applied = match a {
                TransactionAction::BlockdevBackup(b) => self.blockdev_backup(b).await,
                TransactionAction::DriveBackup(_) => match prepared.next() {
                    Some((t, node)) => self.start_drive_backup(t, node).await,
                    None => Ok(()),
                },
                _ => Ok(()),
            };
            match a {
                TransactionAction::BlockdevBackup(b) => {
                    started.push(b.job_id.clone().unwrap_or_default());
                }
                TransactionAction::DriveBackup(m) => started.push(
                    m.get("job-id")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string(),
                ),
                _ => {}
            }
            if let Err(e) = applied {
                // The model passed it: only a system failure (no memory for a
                // region) gets here, with the actions before it applied.
                tracing::error!(action = action_name(a), error = %e.desc, "a checked transaction action failed");
                return Err(e);
            }
        }
        // Grouped: the jobs complete together (none can have ended yet: job ends
        // reach the supervisor after this command).
        if grouped && started.len() > 1 {
            self.jobs.group(&started);
        }
        Ok(())
    }
}
