//! Block node commands: `blockdev-add`, `blockdev-del`, `blockdev-reopen`,
//! `blockdev-set-active`, `block_resize` (the work is in `supervisor::blockdev` and
//! `supervisor::reopen`).

use bulkhead_qmp::qapi::types::{
    BlockResizeArgs, BlockdevDelArgs, BlockdevOptions, BlockdevSetActiveArgs,
};
use serde::Deserialize;

use super::{Reply, WithGiven, empty};
use crate::supervisor::Core;

/// `blockdev-add`: the options, and the object they came from (recorded as the node's
/// options, which later reopens compare against).
pub(super) async fn blockdev_add(core: &mut Core, args: WithGiven<BlockdevOptions>) -> Reply {
    core.blockdev_add(&args.typed, &args.given).await?;
    Ok(empty())
}

pub(super) async fn blockdev_del(core: &mut Core, args: BlockdevDelArgs) -> Reply {
    core.blockdev_del(&args.node_name).await?;
    Ok(empty())
}

/// `blockdev-reopen` (`BlockdevReopenArgs`, each entry with the object it came from:
/// a reopen compares the options as given, key order included).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::supervisor) struct BlockdevReopenArgs {
    /// New options, one per node.
    pub options: Vec<WithGiven<BlockdevOptions>>,
}

pub(super) async fn blockdev_reopen(core: &mut Core, args: BlockdevReopenArgs) -> Reply {
    core.blockdev_reopen(&args.options).await?;
    Ok(empty())
}

pub(super) async fn blockdev_set_active(core: &mut Core, args: BlockdevSetActiveArgs) -> Reply {
    core.blockdev_set_active(args.node_name.as_deref(), args.active)
        .await?;
    Ok(empty())
}

pub(super) async fn block_resize(core: &mut Core, args: BlockResizeArgs) -> Reply {
    core.block_resize(args.device.as_deref(), args.node_name.as_deref(), args.size)
        .await?;
    Ok(empty())
}
