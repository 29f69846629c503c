//! Node statistics and write thresholds: `query-blockstats`,
//! `block-set-write-threshold` (the work is in `supervisor::stats`).

use bulkhead_qmp::qapi::types::{BlockSetWriteThresholdArgs, QueryBlockstatsArgs};
use serde_json::Value;

use crate::supervisor::{Core, QmpError};

pub(super) async fn query_blockstats(
    core: &mut Core,
    args: QueryBlockstatsArgs,
) -> Result<Value, QmpError> {
    Ok(core.query_blockstats(args.query_nodes == Some(true)))
}

pub(super) async fn block_set_write_threshold(
    core: &mut Core,
    args: BlockSetWriteThresholdArgs,
) -> Result<(), QmpError> {
    core.block_set_write_threshold(&args.node_name, args.write_threshold)
}
