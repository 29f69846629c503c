//! Control commands: `query-version`, `query-commands`, `quit`, `query-qmp-schema`
//! (`qmp_capabilities` is the front's).

use bulkhead_qmp::qapi::types::NoArgs;
use serde_json::{Value, json};

use super::names;
use crate::supervisor::{Core, QmpError, errors};
use crate::version::VersionInfo;

pub(super) async fn query_version(_: &mut Core, _: NoArgs) -> Result<VersionInfo, QmpError> {
    Ok(crate::version::query_version())
}

/// The registry, newest first (QEMU lists its command table in reverse).
pub(super) async fn query_commands(_: &mut Core, _: NoArgs) -> Result<Value, QmpError> {
    Ok(Value::Array(
        names().iter().rev().map(|c| json!({"name": c})).collect(),
    ))
}

/// Every export goes (with its event) before the reply; the session then exits.
pub(super) async fn quit(core: &mut Core, _: NoArgs) -> Result<(), QmpError> {
    core.delete_all_exports().await;
    core.cancel_all_jobs().await;
    Ok(())
}

pub(super) async fn query_qmp_schema(_: &mut Core, _: NoArgs) -> Result<Value, QmpError> {
    bulkhead_qmp::qapi::Schema::get()
        .introspect(names(), crate::events::EVENTS)
        .map_err(errors::from_error)
}
