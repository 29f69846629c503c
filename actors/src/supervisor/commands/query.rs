//! Queries of the block graph: `query-named-block-nodes`, `query-block`,
//! `x-debug-query-block-graph` (built by `supervisor::graph`).

use bulkhead_qmp::qapi::types::{NoArgs, QueryNamedBlockNodesArgs};
use serde_json::Value;

use crate::supervisor::{Core, QmpError, errors};

/// `flat` drops `backing-image` from every node's image info.
pub(super) async fn query_named_block_nodes(
    core: &mut Core,
    args: QueryNamedBlockNodesArgs,
) -> Result<Value, QmpError> {
    core.refresh_format_info().await;
    core.resize_bitmaps().await;
    // QEMU's query fails on the first node (newest first) whose driver was taken
    // away by a fatal corruption.
    if let Some(n) = core.graph.iter().rev().find(|n| n.ejected) {
        return Err(errors::block_device_ejected(&n.name));
    }
    Ok(core
        .graph
        .query_named_block_nodes(args.flat.unwrap_or(false)))
}

/// qsd has no named BlockBackends (exports' are anonymous): always empty.
pub(super) async fn query_block(_: &mut Core, _: NoArgs) -> Result<Vec<Value>, QmpError> {
    Ok(Vec::new())
}

pub(super) async fn x_debug_query_block_graph(
    core: &mut Core,
    _: NoArgs,
) -> Result<Value, QmpError> {
    Ok(core.graph.debug_graph())
}
