//! bulkhead's own worker introspection: `x-bulkhead-query-workers`.

use bulkhead_qmp::qapi::types::NoArgs;

use super::Reply;
use crate::supervisor::Core;

pub(super) async fn x_bulkhead_query_workers(core: &mut Core, _: NoArgs) -> Reply {
    Ok(core.query_workers())
}
