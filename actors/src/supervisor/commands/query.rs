//! Queries of the block graph: `query-named-block-nodes`, `query-block`,
//! `x-debug-query-block-graph`.

use bulkhead_qmp::qapi::types::{NoArgs, QueryNamedBlockNodesArgs};
use serde_json::json;

use super::Reply;
use crate::supervisor::Core;

/// `flat` only drops `backing-image`, which no bulkhead node has.
pub(super) async fn query_named_block_nodes(core: &mut Core, _: QueryNamedBlockNodesArgs) -> Reply {
    Ok(core.graph.query_named_block_nodes())
}

/// qsd has no named BlockBackends (exports' are anonymous): always empty.
pub(super) async fn query_block(_: &mut Core, _: NoArgs) -> Reply {
    Ok(json!([]))
}

pub(super) async fn x_debug_query_block_graph(core: &mut Core, _: NoArgs) -> Reply {
    Ok(core.graph.debug_graph())
}
