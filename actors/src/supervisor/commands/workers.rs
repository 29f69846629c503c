//! bulkhead's own worker introspection: `x-bulkhead-query-workers`.

use bulkhead_qmp::qapi::types::NoArgs;

use crate::supervisor::{Core, QmpError, WorkerInfo};

pub(super) async fn x_bulkhead_query_workers(
    core: &mut Core,
    _: NoArgs,
) -> Result<Vec<WorkerInfo>, QmpError> {
    Ok(core.query_workers())
}
