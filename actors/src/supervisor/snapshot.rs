//! `blockdev-snapshot-internal-sync` and `blockdev-snapshot-delete-internal-sync`:
//! internal snapshots of a format node's image (qcow2), made by the node's worker.
//!
//! Runs in the supervisor. QEMU's checks come first, in QEMU's order and with its
//! texts (`internal_snapshot_action`, `qmp_blockdev_snapshot_delete_internal_sync`),
//! against the snapshot table the worker last reported; the worker then changes the
//! image and its answer is checked like any worker's.

use bulkhead_ipc::wire::{Reply, ToWorker};
use serde_json::Value;

use super::graph::Node;
use super::{Core, QmpError, call_error, errors};

impl Core {
    /// QEMU's `qmp_get_root_bs`: the node, which no other node may use.
    fn root_node(&self, device: &str) -> Result<&Node, QmpError> {
        let node = self
            .graph
            .get(device)
            .ok_or_else(|| errors::device_not_found(device, device))?;
        if node.parents > 0 {
            return Err(errors::need_root_node());
        }
        Ok(node)
    }

    /// `blockdev-snapshot-internal-sync`.
    pub(super) async fn snapshot_internal_sync(
        &mut self,
        device: &str,
        name: &str,
    ) -> Result<(), QmpError> {
        self.refresh_format_info().await;
        let node = self.root_node(device)?;
        if node.read_only {
            return Err(errors::device_read_only(device));
        }
        let Some(format) = node.format.as_deref() else {
            return Err(errors::snapshots_unsupported(node.driver.as_str(), device));
        };
        if name.is_empty() {
            return Err(errors::snapshot_name_empty());
        }
        if format.snapshots.iter().any(|s| s.name == name) {
            return Err(errors::snapshot_exists(name, device));
        }
        // A storage daemon's VM clock is the host's: qsd records the same instant
        // twice.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let request = bulkhead_block::SnapshotRequest {
            name: name.to_string(),
            date_sec: now.as_secs(),
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
        };
        let (id, home) = (node.id, node.home);
        let worker = self.worker(home).await?;
        let done = worker
            .call(ToWorker::SnapshotCreate { node: id, request }, &[])
            .await;
        self.refresh_format_info().await;
        done.map(|_| ()).map_err(call_error)
    }

    /// `blockdev-snapshot-delete-internal-sync`: the deleted snapshot's
    /// `SnapshotInfo`.
    pub(super) async fn snapshot_delete_internal_sync(
        &mut self,
        device: &str,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<Value, QmpError> {
        self.refresh_format_info().await;
        let node = self.root_node(device)?;
        if id.is_none() && name.is_none() {
            return Err(errors::snapshot_name_or_id_missing());
        }
        let Some(format) = node.format.as_deref() else {
            return Err(errors::snapshot_list_unsupported());
        };
        let found = format
            .snapshots
            .iter()
            .any(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n));
        if !found {
            return Err(errors::snapshot_not_found(id, name, device));
        }
        let (node_id, home) = (node.id, node.home);
        let worker = self.worker(home).await?;
        let gone = worker
            .call(
                ToWorker::SnapshotDelete {
                    node: node_id,
                    id: id.map(str::to_string),
                    name: name.map(str::to_string),
                },
                &[],
            )
            .await;
        self.refresh_format_info().await;
        match gone {
            Ok(Reply::Snapshot { snapshot }) => Ok(super::graph::snapshot_info(&snapshot)),
            Ok(_) => Err(errors::worker_failed()),
            Err(e) => Err(call_error(e)),
        }
    }
}
