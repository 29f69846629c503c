//! Control commands: `query-version`, `query-commands`, `quit`, `query-qmp-schema`
//! (`qmp_capabilities` is the front's).

use bulkhead_qmp::qapi::types::NoArgs;
use serde_json::{Value, json};

use super::{Reply, empty, names};
use crate::supervisor::{Core, errors};

pub(super) async fn query_version(_: &mut Core, _: NoArgs) -> Reply {
    Ok(crate::version::query_version())
}

/// The registry, newest first (QEMU lists its command table in reverse).
pub(super) async fn query_commands(_: &mut Core, _: NoArgs) -> Reply {
    Ok(Value::Array(
        names().iter().rev().map(|c| json!({"name": c})).collect(),
    ))
}

/// Every export goes (with its event) before the reply; the session then exits.
pub(super) async fn quit(core: &mut Core, _: NoArgs) -> Reply {
    core.delete_all_exports().await;
    Ok(empty())
}

pub(super) async fn query_qmp_schema(_: &mut Core, _: NoArgs) -> Reply {
    bulkhead_qmp::qapi::Schema::get()
        .introspect(names(), crate::events::EVENTS)
        .map_err(errors::from_error)
}
