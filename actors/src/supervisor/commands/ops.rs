//! Long operations, test builds only: `x-bulkhead-test-fill` starts one,
//! `x-bulkhead-query-operations` lists them, `x-bulkhead-operation-cancel` stops one
//! (the work is in `supervisor::ops`). The job runner will report through QMP's job
//! commands instead.

use std::time::Duration;

use bulkhead_ipc::wire::{OpId, Operation};
use bulkhead_qmp::qapi::types::{NoArgs, XBulkheadOperationCancelArgs, XBulkheadTestFillArgs};
use serde_json::{Value, json};

use crate::supervisor::ops::OpInfo;
use crate::supervisor::{Core, QmpError, errors};

/// How long a test fill may go without progress, unless told.
const STALL: Duration = Duration::from_secs(30);

pub(super) async fn x_bulkhead_test_fill(
    core: &mut Core,
    args: XBulkheadTestFillArgs,
) -> Result<Value, QmpError> {
    let node = core
        .graph
        .get(&args.node_name)
        .map(|n| n.id)
        .ok_or_else(|| errors::node_not_found(&args.node_name))?;
    let operation = Operation::Fill {
        node,
        offset: args.offset,
        len: args.length,
        pattern: args.pattern,
        speed: args.speed.unwrap_or(0),
    };
    let stall = args.stall_ms.map_or(STALL, Duration::from_millis);
    let watch = core.start_operation(operation, stall).await?;
    Ok(json!({ "id": watch.op.0 }))
}

pub(super) async fn x_bulkhead_query_operations(
    core: &mut Core,
    _: NoArgs,
) -> Result<Vec<OpInfo>, QmpError> {
    Ok(core.query_operations())
}

pub(super) async fn x_bulkhead_operation_cancel(
    core: &mut Core,
    args: XBulkheadOperationCancelArgs,
) -> Result<(), QmpError> {
    core.cancel_operation(OpId(args.id)).await
}
