//! Queries of the block graph: `query-named-block-nodes`, `query-block`,
//! `x-debug-query-block-graph` (built by `supervisor::graph`).

use bulkhead_qmp::qapi::types::{NoArgs, QueryNamedBlockNodesArgs};
use serde_json::Value;

use crate::supervisor::{Core, QmpError};

/// `flat` only drops `backing-image`, which no bulkhead node has.
pub(super) async fn query_named_block_nodes(
    core: &mut Core,
    _: QueryNamedBlockNodesArgs,
) -> Result<Value, QmpError> {
    core.refresh_format_info().await;
    Ok(core.graph.query_named_block_nodes())
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
