//! Node statistics and write thresholds: `query-blockstats`,
//! `block-set-write-threshold` (the work is in `supervisor::stats`).

use bulkhead_qmp::qapi::types::{BlockSetWriteThresholdArgs, QueryBlockstatsArgs};

use super::{Reply, empty};
use crate::supervisor::Core;

pub(super) async fn query_blockstats(core: &mut Core, args: QueryBlockstatsArgs) -> Reply {
    Ok(core.query_blockstats(args.query_nodes == Some(true)))
}

pub(super) async fn block_set_write_threshold(
    core: &mut Core,
    args: BlockSetWriteThresholdArgs,
) -> Reply {
    core.block_set_write_threshold(&args.node_name, args.write_threshold)?;
    Ok(empty())
}
