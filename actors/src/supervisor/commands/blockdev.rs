//! Block node commands: `blockdev-add`, `blockdev-del`, `blockdev-reopen`,
//! `blockdev-set-active`, `block_resize` (the work is in `supervisor::blockdev` and
//! `supervisor::reopen`).

use bulkhead_qmp::qapi::types::{
    BlockResizeArgs, BlockdevDelArgs, BlockdevOptions, BlockdevSetActiveArgs,
};
use serde::Deserialize;

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
