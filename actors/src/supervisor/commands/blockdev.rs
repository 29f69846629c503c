//! Block node commands: `blockdev-add`, `blockdev-del`, `blockdev-reopen`,
//! `blockdev-set-active`, `block_resize`, and the internal snapshot commands (the
//! work is in `supervisor::blockdev`, `supervisor::reopen` and
//! `supervisor::snapshot`).

use bulkhead_qmp::qapi::types::{
    BlockResizeArgs, BlockdevDelArgs, BlockdevOptions, BlockdevSetActiveArgs, BlockdevSnapshot,
    BlockdevSnapshotDeleteInternalArgs, BlockdevSnapshotInternal, BlockdevSnapshotSync,
    ChangeBackingFileArgs,
};
#[cfg(feature = "test-hooks")]
use bulkhead_qmp::qapi::types::{
    XBulkheadInsertFilterArgs, XBulkheadRemoveFilterArgs, XBulkheadReplaceNodeArgs,
};
use serde::Deserialize;
use serde_json::Value;

use super::WithGiven;
use crate::supervisor::{Core, QmpError};

/// `blockdev-add`: the options, and the object they came from (recorded as the node's
/// options, which later reopens compare against).
pub(super) async fn blockdev_add(
    core: &mut Core,
    args: WithGiven<BlockdevOptions>,
) -> Result<(), QmpError> {
    core.blockdev_add(&args.typed, &args.given).await
}

pub(super) async fn blockdev_del(core: &mut Core, args: BlockdevDelArgs) -> Result<(), QmpError> {
    core.blockdev_del(&args.node_name).await
}

/// `blockdev-reopen` (`BlockdevReopenArgs`, each entry with the object it came from:
/// a reopen compares the options as given, key order included).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BlockdevReopenArgs {
    /// New options, one per node.
    pub options: Vec<WithGiven<BlockdevOptions>>,
}

pub(super) async fn blockdev_reopen(
    core: &mut Core,
    args: BlockdevReopenArgs,
) -> Result<(), QmpError> {
    core.blockdev_reopen(&args.options).await
}

pub(super) async fn blockdev_set_active(
    core: &mut Core,
    args: BlockdevSetActiveArgs,
) -> Result<(), QmpError> {
    core.blockdev_set_active(args.node_name.as_deref(), args.active)
        .await
}

pub(super) async fn block_resize(core: &mut Core, args: BlockResizeArgs) -> Result<(), QmpError> {
    core.block_resize(args.device.as_deref(), args.node_name.as_deref(), args.size)
        .await
}

pub(super) async fn blockdev_snapshot_internal_sync(
    core: &mut Core,
    args: BlockdevSnapshotInternal,
) -> Result<(), QmpError> {
    core.snapshot_internal_sync(&args.device, &args.name).await
}

pub(super) async fn blockdev_snapshot_delete_internal_sync(
    core: &mut Core,
    args: BlockdevSnapshotDeleteInternalArgs,
) -> Result<Value, QmpError> {
    core.snapshot_delete_internal_sync(&args.device, args.id.as_deref(), args.name.as_deref())
        .await
}

/// `blockdev-snapshot`: `overlay` takes `node` as its backing and its users.
pub(super) async fn blockdev_snapshot(
    core: &mut Core,
    args: BlockdevSnapshot,
) -> Result<(), QmpError> {
    core.blockdev_snapshot(&args.node, &args.overlay).await
}

/// `blockdev-snapshot-sync`.
pub(super) async fn blockdev_snapshot_sync(
    core: &mut Core,
    args: BlockdevSnapshotSync,
) -> Result<(), QmpError> {
    core.blockdev_snapshot_sync(&args).await
}

/// `change-backing-file`.
pub(super) async fn change_backing_file(
    core: &mut Core,
    args: ChangeBackingFileArgs,
) -> Result<(), QmpError> {
    core.change_backing_file(&args.device, &args.image_node_name, &args.backing_file)
        .await
}

/// `x-bulkhead-replace-node` (test hook): every user of `old` uses `new`.
#[cfg(feature = "test-hooks")]
pub(super) async fn x_bulkhead_replace_node(
    core: &mut Core,
    args: XBulkheadReplaceNodeArgs,
) -> Result<(), QmpError> {
    core.replace_node(&args.old, &args.new).await
}

/// `x-bulkhead-insert-filter` (test hook).
#[cfg(feature = "test-hooks")]
pub(super) async fn x_bulkhead_insert_filter(
    core: &mut Core,
    args: XBulkheadInsertFilterArgs,
) -> Result<(), QmpError> {
    core.insert_filter(&args.node, &args.filter).await
}

/// `x-bulkhead-remove-filter` (test hook).
#[cfg(feature = "test-hooks")]
pub(super) async fn x_bulkhead_remove_filter(
    core: &mut Core,
    args: XBulkheadRemoveFilterArgs,
) -> Result<(), QmpError> {
    core.remove_filter(&args.filter).await
}
