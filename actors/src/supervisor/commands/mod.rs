//! The QMP command registry: every command bulkhead implements, its handler, and
//! whether it changes state. See `design/commands.md`.
//!
//! [`REGISTRY`] is the one list: the supervisor dispatches through it, the front
//! admits commands by it, and `query-commands` and `query-qmp-schema` list it. Its
//! order is qsd's (`query-commands` prints it reversed, as QEMU prints its hash of
//! commands). Each handler lives in the file of its family and takes its arguments as
//! a typed struct (`bulkhead_qmp::qapi::types`, QAPI's member names), decoded here
//! once from what the QAPI visitor (`crate::dispatch`) already checked and normalized.
//!
//! Runs in the supervisor.

mod bitmaps;
mod blockdev;
mod control;
mod export;
mod jobs;
#[cfg(feature = "test-hooks")]
mod ops;
mod query;
mod stats;
mod workers;

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;

use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer};
use serde_json::{Map, Value};

use super::{Core, QmpError, errors};

/// What a registered handler's future resolves to: the `return` value or the error.
pub(crate) type Reply = Result<Value, QmpError>;

/// A command's `return` value: a handler returns `()` for QMP's empty object, a
/// typed struct (serialized in its field order), or a `Value` built by hand.
pub(crate) trait Return {
    /// The `return` member of the reply.
    fn into_return(self) -> Reply;
}

impl Return for Value {
    fn into_return(self) -> Reply {
        Ok(self)
    }
}

impl Return for () {
    fn into_return(self) -> Reply {
        Ok(Value::Object(Map::new()))
    }
}

impl<T: serde::Serialize> Return for Vec<T> {
    fn into_return(self) -> Reply {
        serde_json::to_value(self).map_err(errors::from_error)
    }
}

impl Return for crate::version::VersionInfo {
    fn into_return(self) -> Reply {
        serde_json::to_value(self).map_err(errors::from_error)
    }
}

/// A registered handler: decodes the arguments, then runs the command on `Core`.
type Run =
    for<'a> fn(&'a mut Core, Map<String, Value>) -> Pin<Box<dyn Future<Output = Reply> + 'a>>;

/// What a command does to the supervisor's state, which decides the follow-up work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Reads only: the ask table is left alone (a query flood stays cheap).
    Query,
    /// May change nodes, exports or workers: the ask table is refreshed afterwards.
    Change,
    /// `quit`: the daemon exits after the reply.
    Quit,
}

/// Who serves a command.
#[derive(Debug, Clone, Copy)]
pub enum Served {
    /// The supervisor core, through this handler.
    Core(Effect, Run),
    /// The QMP front, before the core (negotiation, chardevs); listed only.
    Front,
}

/// One registry line.
#[derive(Debug, Clone, Copy)]
pub struct Command {
    /// The QMP name.
    pub name: &'static str,
    /// Who serves it.
    pub served: Served,
}

/// A line for a command the core serves: `$handler(core, args)` is an `async fn`
/// taking `&mut Core` and its typed argument struct, returning
/// `Result<impl Return, QmpError>`.
macro_rules! command {
    ($name:literal, $effect:ident, $handler:path) => {
        Command {
            name: $name,
            served: Served::Core(Effect::$effect, |core, args| {
                Box::pin(async move { $handler(core, decode($name, args)?).await?.into_return() })
            }),
        }
    };
}

/// A line for a command the front serves.
macro_rules! front {
    ($name:literal) => {
        Command {
            name: $name,
            served: Served::Front,
        }
    };
}

/// Every command, in qsd's `query-commands` order reversed.
pub static REGISTRY: &[Command] = &[
    front!("qmp_capabilities"),
    command!("job-pause", Change, jobs::job_pause),
    command!("job-resume", Change, jobs::job_resume),
    command!("job-cancel", Change, jobs::job_cancel),
    command!("job-complete", Change, jobs::job_complete),
    command!("job-dismiss", Change, jobs::job_dismiss),
    command!("job-finalize", Change, jobs::job_finalize),
    command!("query-jobs", Query, jobs::query_jobs),
    command!("query-block-jobs", Query, jobs::query_block_jobs),
    command!("block-commit", Change, jobs::block_commit),
    command!("blockdev-backup", Change, jobs::blockdev_backup),
    command!("drive-backup", Change, jobs::drive_backup),
    command!("drive-mirror", Change, jobs::drive_mirror),
    command!("blockdev-create", Change, jobs::blockdev_create),
    command!("x-blockdev-amend", Change, jobs::x_blockdev_amend),
    command!("blockdev-mirror", Change, jobs::blockdev_mirror),
    command!("block-stream", Change, jobs::block_stream),
    command!("block-job-set-speed", Change, jobs::block_job_set_speed),
    command!("block-job-cancel", Change, jobs::block_job_cancel),
    command!("block-job-pause", Change, jobs::block_job_pause),
    command!("block-job-resume", Change, jobs::block_job_resume),
    command!("block-job-complete", Change, jobs::block_job_complete),
    command!("block-job-dismiss", Change, jobs::block_job_dismiss),
    command!("block-job-finalize", Change, jobs::block_job_finalize),
    command!("block-job-change", Change, jobs::block_job_change),
    command!("query-version", Query, control::query_version),
    command!("query-commands", Query, control::query_commands),
    command!("quit", Quit, control::quit),
    command!("query-qmp-schema", Query, control::query_qmp_schema),
    command!("blockdev-add", Change, blockdev::blockdev_add),
    command!("blockdev-del", Change, blockdev::blockdev_del),
    command!("blockdev-reopen", Change, blockdev::blockdev_reopen),
    command!("blockdev-set-active", Change, blockdev::blockdev_set_active),
    command!(
        "query-named-block-nodes",
        Query,
        query::query_named_block_nodes
    ),
    command!("query-block", Query, query::query_block),
    command!(
        "x-debug-query-block-graph",
        Query,
        query::x_debug_query_block_graph
    ),
    command!(
        "block-dirty-bitmap-add",
        Change,
        bitmaps::block_dirty_bitmap_add
    ),
    command!(
        "block-dirty-bitmap-remove",
        Change,
        bitmaps::block_dirty_bitmap_remove
    ),
    command!(
        "block-dirty-bitmap-clear",
        Change,
        bitmaps::block_dirty_bitmap_clear
    ),
    command!(
        "block-dirty-bitmap-enable",
        Change,
        bitmaps::block_dirty_bitmap_enable
    ),
    command!(
        "block-dirty-bitmap-disable",
        Change,
        bitmaps::block_dirty_bitmap_disable
    ),
    command!(
        "block-dirty-bitmap-merge",
        Change,
        bitmaps::block_dirty_bitmap_merge
    ),
    command!(
        "x-debug-block-dirty-bitmap-sha256",
        Change,
        bitmaps::x_debug_block_dirty_bitmap_sha256
    ),
    command!("block_resize", Change, blockdev::block_resize),
    command!(
        "blockdev-snapshot-sync",
        Change,
        blockdev::blockdev_snapshot_sync
    ),
    command!("blockdev-snapshot", Change, blockdev::blockdev_snapshot),
    command!("change-backing-file", Change, blockdev::change_backing_file),
    command!(
        "blockdev-snapshot-internal-sync",
        Change,
        blockdev::blockdev_snapshot_internal_sync
    ),
    command!(
        "blockdev-snapshot-delete-internal-sync",
        Change,
        blockdev::blockdev_snapshot_delete_internal_sync
    ),
    command!("nbd-server-start", Change, export::nbd_server_start),
    command!("nbd-server-stop", Change, export::nbd_server_stop),
    command!("nbd-server-add", Change, export::nbd_server_add),
    command!("nbd-server-remove", Change, export::nbd_server_remove),
    command!("block-export-add", Change, export::block_export_add),
    command!("block-export-del", Change, export::block_export_del),
    command!("query-block-exports", Query, export::query_block_exports),
    command!("query-blockstats", Query, stats::query_blockstats),
    command!(
        "block-set-write-threshold",
        Change,
        stats::block_set_write_threshold
    ),
    command!(
        "x-bulkhead-query-workers",
        Query,
        workers::x_bulkhead_query_workers
    ),
    // Long operations, for tests until the job runner exists.
    #[cfg(feature = "test-hooks")]
    command!(
        "x-bulkhead-query-operations",
        Query,
        ops::x_bulkhead_query_operations
    ),
    #[cfg(feature = "test-hooks")]
    command!(
        "x-bulkhead-operation-cancel",
        Change,
        ops::x_bulkhead_operation_cancel
    ),
    #[cfg(feature = "test-hooks")]
    command!("x-bulkhead-test-fill", Change, ops::x_bulkhead_test_fill),
    // Test hooks: graph changes under live I/O before any public command uses them.
    #[cfg(feature = "test-hooks")]
    command!(
        "x-bulkhead-replace-node",
        Change,
        blockdev::x_bulkhead_replace_node
    ),
    #[cfg(feature = "test-hooks")]
    command!(
        "x-bulkhead-insert-filter",
        Change,
        blockdev::x_bulkhead_insert_filter
    ),
    #[cfg(feature = "test-hooks")]
    command!(
        "x-bulkhead-remove-filter",
        Change,
        blockdev::x_bulkhead_remove_filter
    ),
    // Served by the QMP front (`front::chardev`), never sent to the core.
    front!("query-chardev"),
    front!("chardev-add"),
    front!("chardev-remove"),
    command!("transaction", Change, bitmaps::transaction),
];

/// The registry's names, in its order (what `query-commands` and `query-qmp-schema`
/// list).
pub fn names() -> &'static [&'static str] {
    static NAMES: LazyLock<Vec<&'static str>> =
        LazyLock::new(|| REGISTRY.iter().map(|c| c.name).collect());
    &NAMES
}

/// The registry line of `name`.
pub fn find(name: &str) -> Option<&'static Command> {
    REGISTRY.iter().find(|c| c.name == name)
}

/// Decodes a command's normalized arguments into its typed struct. The visitor already
/// accepted them, so a failure means the struct and the schema disagree: an internal
/// error, answered rather than panicked on.
fn decode<A: DeserializeOwned>(command: &str, args: Map<String, Value>) -> Result<A, QmpError> {
    serde_json::from_value(Value::Object(args)).map_err(|e| {
        tracing::error!(command, error = %e, "checked arguments do not fit the handler");
        errors::arguments_mismatch(command, e)
    })
}

/// Typed options together with the object they were decoded from, for handlers that
/// must also keep the options exactly as given, key order included (`blockdev-add`
/// records them for later reopens, `blockdev-reopen` compares against them).
#[derive(Debug, Clone)]
pub(crate) struct WithGiven<T> {
    /// The decoded options.
    pub typed: T,
    /// The normalized object they came from.
    pub given: Map<String, Value>,
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for WithGiven<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let given = Map::deserialize(d)?;
        let typed = serde_json::from_value(Value::Object(given.clone()))
            .map_err(serde::de::Error::custom)?;
        Ok(WithGiven { typed, given })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_only_queries_skip_the_ask_table_refresh() {
        for c in REGISTRY {
            let looks_like_query = c.name.starts_with("query-") || c.name.contains("-query-");
            if let Served::Core(effect, _) = c.served {
                assert_eq!(
                    effect == Effect::Query,
                    looks_like_query,
                    "{} is registered as {effect:?}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn every_registered_command_is_in_the_schema_once() {
        let schema = bulkhead_qmp::qapi::Schema::get();
        for (i, c) in REGISTRY.iter().enumerate() {
            assert!(
                schema.command(c.name).is_some(),
                "{} not in the schema",
                c.name
            );
            assert!(
                REGISTRY[..i].iter().all(|o| o.name != c.name),
                "{} registered twice",
                c.name
            );
        }
        assert_eq!(names().len(), REGISTRY.len());
    }

    #[test]
    fn arguments_that_do_not_fit_are_an_error_not_a_panic() {
        let mut args = Map::new();
        args.insert("node-name".into(), 5.into());
        let r: Result<bulkhead_qmp::qapi::types::BlockdevDelArgs, _> = decode("blockdev-del", args);
        let e = r.err().map(|e| e.desc).unwrap_or_default();
        assert!(
            e.starts_with("Internal error: the arguments of blockdev-del"),
            "{e}"
        );
    }

    #[test]
    fn typed_returns_print_like_the_json_they_replace() {
        assert_eq!(().into_return().ok(), Some(serde_json::json!({})));
        let info = crate::supervisor::WorkerInfo {
            id: 1,
            kind: "raw",
            role: "driver",
            reaches: vec![2],
            pid: 10,
            generation: 1,
            restarts: 0,
            nodes: vec!["n".into()],
            exports: Vec::new(),
            mapped: Vec::new(),
            sandbox: vec!["seccomp".into()],
        };
        let text = vec![info]
            .into_return()
            .map(|v| v.to_string())
            .unwrap_or_default();
        assert_eq!(
            text,
            r#"[{"id":1,"kind":"raw","role":"driver","reaches":[2],"pid":10,"generation":1,"restarts":0,"nodes":["n"],"exports":[],"mapped":[],"sandbox":["seccomp"]}]"#
        );
        let version = crate::version::query_version()
            .into_return()
            .map(|v| v.to_string());
        assert!(
            version
                .unwrap_or_default()
                .starts_with(r#"{"qemu":{"major":10,"minor":0,"micro":2},"package":"bulkhead "#)
        );
    }

    #[test]
    fn with_given_keeps_the_object_in_its_order() {
        let v = serde_json::json!({"node-name": "n", "driver": "null-co", "size": 5});
        let w: WithGiven<bulkhead_qmp::qapi::types::BlockdevOptions> =
            serde_json::from_value(v).expect("fits");
        let keys: Vec<&str> = w.given.keys().map(String::as_str).collect();
        assert_eq!(keys, ["node-name", "driver", "size"]);
        assert_eq!(w.typed.base.node_name.as_deref(), Some("n"));
    }
}
