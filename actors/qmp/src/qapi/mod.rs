//! The QAPI layer: commands' argument types as data, and QEMU's input visitor that
//! checks a request's arguments against them with qsd 10.0.2's exact error texts.
//!
//! The schema lives in `schema/*.json`, written in QAPI syntax like QEMU's
//! `qapi/*.json` and embedded in the binary; [`Schema::get`] parses it once.
//! [`Schema::check_command_args`] walks a QMP command's arguments the way QEMU's
//! generated marshaller does (start struct, members in schema order, union variant,
//! unexpected-member check) and returns a normalized JSON value for
//! `serde_json::from_value` into the typed structs in [`types`]. [`Schema::check_type`]
//! does the same for one type, in either [`Flavour`]: JSON, or keyval for the command
//! line (`--blockdev`, `--export`, `--nbd-server`), where leaves are strings the
//! visitor parses.
//!
//! Checking happens before any side effect: a command handler only ever sees
//! arguments that passed. Adding a command is: its QAPI definition in `schema/`, a
//! serde struct in [`types`], and a handler.
//!
//! Runs in the supervisor, on untrusted input from QMP clients and the command line.
//!
//! # Adding a command
//! 1. Put its definition in `schema/*.json` in QAPI syntax (QEMU's `qapi/*.json` is the
//!    model; where QEMU's sources and qsd 10.0.2 differ, qsd wins).
//! 2. Run `python3 actors/qmp/src/qapi/schema/compare_with_qsd.py`: it checks member
//!    names, order, optionality, enums, variants and alternates against a live qsd's
//!    `query-qmp-schema` (integer widths it cannot see; take them from QEMU).
//! 3. Add its serde struct to [`types`] and a line to the drift test there.
//! 4. Write the handler; it receives only arguments the visitor accepted.
//! 5. Give it its `returns` type (and define any event it emits, adding the event to
//!    `EVENTS` in the actors crate) so that `query-qmp-schema` ([`introspect`]) lists it
//!    as qsd does; the system test `qmp_schema` compares them with a live qsd.
//!
//! Command-line options that qsd visits this way: `--blockdev` (`BlockdevOptions`,
//! implied key `driver`), `--export` (`BlockExportOptions`, `type`), `--nbd-server`
//! (`NbdServerOptions`), `--object` (`ObjectOptions`, `qom-type`) and `--monitor`
//! (`MonitorOptions`, `chardev`); an option starting with `{` is JSON flavour. `--chardev`
//! is not QAPI-visited in qsd (QemuOpts: `Invalid parameter 'foo'`), so it is not here.
//! Deprecated/unstable features are accepted, as qsd's default compatibility policy does.

pub mod ghash;
pub mod introspect;
pub mod schema;
mod strtox;
pub mod types;
mod visit;

/// QEMU's `id_wellformed`: a letter, then letters, digits, '-', '.' and '_'. The rule
/// for node names, export ids, chardev ids and object ids alike.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

use std::sync::OnceLock;

use serde_json::{Map, Value};

pub use schema::{CommandDef, TypeDef, TypeRef};
pub use visit::Flavour;

use schema::{FILES, ObjectDef, SchemaData};

/// Why arguments were refused. `Display` is qsd's exact `desc`; every variant is
/// class `GenericError` except [`QapiError::UnknownCommand`] (see [`QapiError::class`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QapiError {
    /// A required member is absent (`QERR_MISSING_PARAMETER`), full path.
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    /// The JSON type is wrong (`QERR_INVALID_PARAMETER_TYPE`).
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidType {
        /// Full path, or the bare name for alternates.
        name: String,
        /// `integer`, `string`, `boolean`, `array`, `object`, `number`, `null`, or an
        /// alternate's type name.
        expected: String,
    },
    /// The value does not fit (`QERR_INVALID_PARAMETER_VALUE`): `uint64`, `int32_t`,
    /// keyval `integer`/`size`/`'on' or 'off'`.
    #[error("Parameter '{name}' expects {expected}")]
    InvalidValue {
        /// Full path, or the bare name for integer range errors.
        name: String,
        /// What was expected.
        expected: String,
    },
    /// A member no schema member claimed.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// Keyval: a scalar member was given sub-keys (`size.x=1`).
    #[error("Parameters '{0}.*' are unexpected")]
    UnexpectedChildren(String),
    /// Keyval input that is neither string nor container (cannot come from the keyval
    /// parser; QEMU's text for it).
    #[error("Internal error: parameter {0} invalid")]
    KeyvalNotString(String),
    /// An enum value not in the enum; bare member name, `null` for list elements.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    BadEnumValue {
        /// Bare member name.
        name: String,
        /// The value given.
        value: String,
    },
    /// The command is not in the schema (class `CommandNotFound`).
    #[error("The command {0} has not been found")]
    UnknownCommand(String),
    /// Containers nested deeper than bulkhead's limit (qsd has none; bulkhead's
    /// own text, see `visit::MAX_DEPTH`).
    #[error("Parameter '{0}' is nested too deeply")]
    TooDeep(String),
    /// A caller asked for a type the schema does not define (a bulkhead bug).
    #[error("QAPI type '{0}' is not defined")]
    UndefinedType(String),
}

impl QapiError {
    /// The QMP error class this error is reported with.
    pub fn class(&self) -> &'static str {
        match self {
            QapiError::UnknownCommand(_) => "CommandNotFound",
            _ => "GenericError",
        }
    }
}

/// The parsed schema. Obtain it with [`Schema::get`].
#[derive(Debug)]
pub struct Schema {
    data: SchemaData,
    empty: ObjectDef,
}

static SCHEMA: OnceLock<Schema> = OnceLock::new();

impl Schema {
    /// Parses the embedded schema files.
    pub fn load() -> Result<Schema, schema::SchemaError> {
        Ok(Schema {
            data: SchemaData::load(FILES)?,
            empty: ObjectDef {
                name: "q_empty".to_owned(),
                base: None,
                members: Vec::new(),
                union: None,
                features: Vec::new(),
            },
        })
    }

    /// The schema, parsed on first use.
    ///
    /// # Panics
    /// Only if the schema compiled into the binary is malformed, which the unit test
    /// `the_embedded_schema_loads_and_every_reference_resolves` rules out; no input
    /// from outside can reach this.
    pub fn get() -> &'static Schema {
        SCHEMA.get_or_init(|| match Schema::load() {
            Ok(s) => s,
            Err(e) => panic!("embedded QAPI schema is broken: {e}"),
        })
    }

    /// The definition of a command, if the schema has it.
    pub fn command(&self, name: &str) -> Option<&CommandDef> {
        self.data
            .command_index
            .get(name)
            .and_then(|&i| self.data.commands.get(i))
    }

    /// Every command name, in schema order.
    pub fn command_names(&self) -> impl Iterator<Item = &str> {
        self.data.commands.iter().map(|c| c.name.as_str())
    }

    /// A named type's definition.
    pub fn type_def(&self, name: &str) -> Option<&TypeDef> {
        self.data.types.get(name)
    }

    /// Checks QMP `arguments` of `command` (use an empty map when the request had
    /// none) and returns them normalized, in schema member order.
    pub fn check_command_args(
        &self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Result<Value, QapiError> {
        let cmd = self
            .command(command)
            .ok_or_else(|| QapiError::UnknownCommand(command.to_owned()))?;
        let root = Value::Object(args.clone());
        let mut visitor = visit::Visitor::new(&self.data, Flavour::Json, &root);
        match cmd.arg_type.as_deref() {
            Some(arg_type) => visitor.visit_named(arg_type, None),
            None => visitor.visit_struct(&self.empty, None),
        }
    }

    /// Checks `v` against the named type (a top-level visit with no name, as qsd does
    /// for `--blockdev`, `--export` and `--nbd-server`) and returns it normalized.
    pub fn check_type(
        &self,
        type_name: &str,
        v: &Value,
        flavour: Flavour,
    ) -> Result<Value, QapiError> {
        let mut visitor = visit::Visitor::new(&self.data, flavour, v);
        visitor.visit_named(type_name, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Map<String, Value> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            other => panic!("test input {text} is not an object: {other:?}"),
        }
    }

    #[test]
    fn the_embedded_schema_loads_and_every_reference_resolves() {
        let schema = Schema::load();
        assert!(schema.is_ok(), "{:?}", schema.err());
        let schema = Schema::get();
        // qsd 10.0.2's 76 commands plus bulkhead's own: x-bulkhead-query-workers, and
        // the test builds' x-bulkhead-query-operations, x-bulkhead-operation-cancel,
        // x-bulkhead-test-fill and the three graph hooks.
        assert_eq!(schema.command_names().count(), 83);
        assert!(schema.command("x-bulkhead-query-workers").is_some());
        for name in schema.command_names() {
            let cmd = schema.command(name);
            assert_eq!(cmd.map(|c| c.name.as_str()), Some(name));
        }
    }

    /// `(command, arguments, qsd's desc)`; `None` means qsd's visitor accepted the
    /// arguments (any error qsd gave came from the command itself). Collected from
    /// qsd 10.0.2 over QMP.
    const QMP_CASES: &[(&str, &str, Option<&str>)] = &[
        ("block_resize", r#"{}"#, Some("Parameter 'size' is missing")),
        (
            "block_resize",
            r#"{"node-name":"x","size":"big"}"#,
            Some("Invalid parameter type for 'size', expected: integer"),
        ),
        (
            "block_resize",
            r#"{"size":1,"extra":1}"#,
            Some("Parameter 'extra' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1.5}"#,
            Some("Invalid parameter type for 'size', expected: integer"),
        ),
        (
            "block_resize",
            r#"{"size":18446744073709551615}"#,
            Some("Invalid parameter type for 'size', expected: integer"),
        ),
        (
            "block_resize",
            r#"{"size":true}"#,
            Some("Invalid parameter type for 'size', expected: integer"),
        ),
        (
            "block_resize",
            r#"{"device":5,"size":1}"#,
            Some("Invalid parameter type for 'device', expected: string"),
        ),
        (
            "query-version",
            r#"{"x":1}"#,
            Some("Parameter 'x' is unexpected"),
        ),
        ("quit", r#"{"x":1}"#, Some("Parameter 'x' is unexpected")),
        (
            "query-commands",
            r#"{"x":1}"#,
            Some("Parameter 'x' is unexpected"),
        ),
        (
            "query-block",
            r#"{"a":1}"#,
            Some("Parameter 'a' is unexpected"),
        ),
        (
            "x-debug-query-block-graph",
            r#"{"a":1}"#,
            Some("Parameter 'a' is unexpected"),
        ),
        (
            "nbd-server-stop",
            r#"{"a":1}"#,
            Some("Parameter 'a' is unexpected"),
        ),
        (
            "query-block-exports",
            r#"{"a":1}"#,
            Some("Parameter 'a' is unexpected"),
        ),
        (
            "qmp_capabilities",
            r#"{"enable":["bogus"]}"#,
            Some("Parameter 'null' does not accept value 'bogus'"),
        ),
        (
            "qmp_capabilities",
            r#"{"enable":"oob"}"#,
            Some("Invalid parameter type for 'enable', expected: array"),
        ),
        (
            "qmp_capabilities",
            r#"{"enable":[1]}"#,
            Some("Invalid parameter type for 'enable[0]', expected: string"),
        ),
        (
            "qmp_capabilities",
            r#"{"foo":1}"#,
            Some("Parameter 'foo' is unexpected"),
        ),
        (
            "blockdev-add",
            r#"{}"#,
            Some("Parameter 'driver' is missing"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"nosuch"}"#,
            Some("Parameter 'driver' does not accept value 'nosuch'"),
        ),
        (
            "blockdev-add",
            r#"{"driver":5}"#,
            Some("Invalid parameter type for 'driver', expected: string"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"file"}"#,
            Some("Parameter 'filename' is missing"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"file","x":1}"#,
            Some("Parameter 'filename' is missing"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"raw","file":{"driver":"file"}}"#,
            Some("Parameter 'file.filename' is missing"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"raw","file":5}"#,
            Some("Invalid parameter type for 'file', expected: BlockdevRef"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"raw","file":{"driver":"raw","file":5}}"#,
            Some("Invalid parameter type for 'file', expected: BlockdevRef"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"file","filename":"/x","aio":"bad"}"#,
            Some("Parameter 'aio' does not accept value 'bad'"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"raw","file":{"driver":"file","filename":"x","aio":"bad"}}"#,
            Some("Parameter 'aio' does not accept value 'bad'"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"raw","file":{"driver":"file","filename":"/x","bogus":1}}"#,
            Some("Parameter 'file.bogus' is unexpected"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","size":"1M"}"#,
            Some("Invalid parameter type for 'size', expected: integer"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","latency-ns":1.5}"#,
            Some("Parameter 'latency-ns' expects uint64"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","latency-ns":"x"}"#,
            Some("Parameter 'latency-ns' expects uint64"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","latency-ns":-1,"node-name":"1bad"}"#,
            None,
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","read-only":"on"}"#,
            Some("Invalid parameter type for 'read-only', expected: boolean"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","cache":5}"#,
            Some("Invalid parameter type for 'cache', expected: object"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","cache":{"direct":1}}"#,
            Some("Invalid parameter type for 'cache.direct', expected: boolean"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","cache":{"x":1}}"#,
            Some("Parameter 'cache.x' is unexpected"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","node-name":null}"#,
            Some("Invalid parameter type for 'node-name', expected: string"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","size":"x","node-name":5}"#,
            Some("Invalid parameter type for 'node-name', expected: string"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"null-co","discard":"x","detect-zeroes":"y"}"#,
            Some("Parameter 'discard' does not accept value 'x'"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"nbd","server":{"type":"unix"}}"#,
            Some("Parameter 'server.path' is missing"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"nbd","server":{"type":"inet","host":"h","port":"1","to":70000}}"#,
            Some("Parameter 'to' expects uint16_t"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"nbd","server":{"type":"x"}}"#,
            Some("Parameter 'type' does not accept value 'x'"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"nbd","server":{"type":"inet","host":"h","port":1}}"#,
            Some("Invalid parameter type for 'server.port', expected: string"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"blkdebug","image":"x","max-transfer":2147483648}"#,
            Some("Parameter 'max-transfer' expects int32_t"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"blkdebug","image":"x","inject-error":[{}]}"#,
            Some("Parameter 'inject-error[0].event' is missing"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"blkdebug","image":"x","inject-error":[{"event":"none"},{"event":"bad"}]}"#,
            Some("Parameter 'event' does not accept value 'bad'"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"blkdebug","image":"x","inject-error":[{"event":"none"},{"event":"none","errno":"x"}]}"#,
            Some("Invalid parameter type for 'inject-error[1].errno', expected: integer"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"blkdebug","image":"x","take-child-perms":["bad"]}"#,
            Some("Parameter 'null' does not accept value 'bad'"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"blkdebug","image":"x","take-child-perms":["write",1]}"#,
            Some("Invalid parameter type for 'take-child-perms[1]', expected: string"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"blkdebug","image":"x","inject-error":5}"#,
            Some("Invalid parameter type for 'inject-error', expected: array"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"blkdebug","image":"x","set-state":[{"event":"none","new_state":1,"q":1}]}"#,
            Some("Parameter 'set-state[0].q' is unexpected"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"quorum","children":[5],"vote-threshold":1}"#,
            Some("Invalid parameter type for 'null', expected: BlockdevRef"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"quorum","children":["a",{"driver":"file"}],"vote-threshold":1}"#,
            Some("Parameter 'children[1].filename' is missing"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"qcow2","file":"x","backing":5}"#,
            Some("Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"qcow2","file":"x","overlap-check":5}"#,
            Some("Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"qcow2","file":"x","overlap-check":"bad"}"#,
            Some("Parameter 'overlap-check' does not accept value 'bad'"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"qcow2","file":"x","overlap-check":{"template":"bad"}}"#,
            Some("Parameter 'template' does not accept value 'bad'"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"qcow2","file":"x","encrypt":{"format":"aes","key-secret":5}}"#,
            Some("Invalid parameter type for 'encrypt.key-secret', expected: string"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"ssh","server":{"host":"h","port":"22"},"path":"/","host-key-check":{"mode":"hash"}}"#,
            Some("Parameter 'host-key-check.type' is missing"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"rbd","pool":"p","image":"i","encrypt":{"format":"luks","parent":{"format":"luks2"}}}"#,
            Some("Parameter 'encrypt.parent.key-secret' is missing"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"copy-before-write","file":"a","target":"b","cbw-timeout":-1}"#,
            Some("Parameter 'cbw-timeout' expects uint32_t"),
        ),
        (
            "blockdev-add",
            r#"{"driver":"copy-before-write","file":"a","target":"b","min-cluster-size":-1,"node-name":"1bad"}"#,
            None,
        ),
        (
            "blockdev-add",
            r#"{"driver":"copy-before-write","file":"a","target":"b","min-cluster-size":"64k"}"#,
            Some("Parameter 'min-cluster-size' expects uint64"),
        ),
        (
            "nbd-server-start",
            r#"{}"#,
            Some("Parameter 'addr' is missing"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix"}}"#,
            Some("Parameter 'addr.data' is missing"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","data":{}}}"#,
            Some("Parameter 'addr.data.path' is missing"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","data":{"path":5}}}"#,
            Some("Invalid parameter type for 'addr.data.path', expected: string"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","data":{"path":"/tmp/none.sock"}},"max-connections":-1}"#,
            Some("Parameter 'max-connections' expects uint32_t"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","data":{"path":"/tmp/none.sock"}},"max-connections":"x"}"#,
            Some("Parameter 'max-connections' expects uint64"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","path":"/tmp/none.sock"}}"#,
            Some("Parameter 'addr.data' is missing"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","data":{"path":"/tmp/none.sock"},"extra":1}}"#,
            Some("Parameter 'addr.extra' is unexpected"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","data":{"path":"/tmp/none.sock","x":1}}}"#,
            Some("Parameter 'addr.data.x' is unexpected"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","data":{"path":"/tmp/none.sock"}},"handshake-max-seconds":4294967296}"#,
            Some("Parameter 'handshake-max-seconds' expects uint32_t"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","data":{"path":"/tmp/none.sock"}},"tls-creds":5}"#,
            Some("Invalid parameter type for 'tls-creds', expected: string"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":5}"#,
            Some("Invalid parameter type for 'addr', expected: object"),
        ),
        (
            "block-export-add",
            r#"{}"#,
            Some("Parameter 'type' is missing"),
        ),
        (
            "block-export-add",
            r#"{"type":"nbd"}"#,
            Some("Parameter 'id' is missing"),
        ),
        (
            "block-export-add",
            r#"{"type":"nbd","id":"e"}"#,
            Some("Parameter 'node-name' is missing"),
        ),
        (
            "block-export-add",
            r#"{"type":"bad","id":"e","node-name":"n"}"#,
            Some("Parameter 'type' does not accept value 'bad'"),
        ),
        (
            "block-export-add",
            r#"{"type":"nbd","id":"e","node-name":"n","bitmaps":[5]}"#,
            Some("Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
        ),
        (
            "block-export-add",
            r#"{"type":"nbd","id":"e","node-name":"n","bitmaps":[{"node":"a"}]}"#,
            Some("Parameter 'bitmaps[0].name' is missing"),
        ),
        (
            "block-export-add",
            r#"{"type":"nbd","id":"e","node-name":"n","bitmaps":"b"}"#,
            Some("Invalid parameter type for 'bitmaps', expected: array"),
        ),
        (
            "block-export-add",
            r#"{"type":"fuse","id":"e","node-name":"n"}"#,
            Some("Parameter 'mountpoint' is missing"),
        ),
        (
            "block-export-add",
            r#"{"type":"fuse","id":"e","node-name":"n","mountpoint":"/x","allow-other":"maybe"}"#,
            Some("Parameter 'allow-other' does not accept value 'maybe'"),
        ),
        (
            "block-export-add",
            r#"{"type":"vhost-user-blk","id":"e","node-name":"n","addr":{"type":"unix","path":"/tmp/none.sock"},"num-queues":70000}"#,
            Some("Parameter 'num-queues' expects uint16_t"),
        ),
        (
            "block-export-add",
            r#"{"type":"vhost-user-blk","id":"e","node-name":"n","addr":{"type":"unix","path":"/tmp/none.sock"},"logical-block-size":"4k"}"#,
            Some("Parameter 'logical-block-size' expects uint64"),
        ),
        (
            "block-export-add",
            r#"{"type":"nbd","id":"e","node-name":"n","writable":"yes"}"#,
            Some("Invalid parameter type for 'writable', expected: boolean"),
        ),
        (
            "block-export-add",
            r#"{"type":"nbd","id":"e","node-name":"n","bitmap":"b"}"#,
            Some("Parameter 'bitmap' is unexpected"),
        ),
        (
            "block-export-del",
            r#"{}"#,
            Some("Parameter 'id' is missing"),
        ),
        (
            "block-export-del",
            r#"{"id":"e","mode":"x"}"#,
            Some("Parameter 'mode' does not accept value 'x'"),
        ),
        (
            "nbd-server-add",
            r#"{}"#,
            Some("Parameter 'device' is missing"),
        ),
        (
            "nbd-server-remove",
            r#"{"name":"x","mode":"soft"}"#,
            Some("Parameter 'mode' does not accept value 'soft'"),
        ),
        (
            "blockdev-del",
            r#"{}"#,
            Some("Parameter 'node-name' is missing"),
        ),
        (
            "blockdev-del",
            r#"{"node-name":5}"#,
            Some("Invalid parameter type for 'node-name', expected: string"),
        ),
        (
            "query-named-block-nodes",
            r#"{"flat":"yes"}"#,
            Some("Invalid parameter type for 'flat', expected: boolean"),
        ),
        (
            "query-named-block-nodes",
            r#"{"flat":true,"x":1}"#,
            Some("Parameter 'x' is unexpected"),
        ),
        (
            "blockdev-reopen",
            r#"{"options":[{}]}"#,
            Some("Parameter 'options[0].driver' is missing"),
        ),
        (
            "blockdev-reopen",
            r#"{"options":[{"driver":"raw"}]}"#,
            Some("Parameter 'options[0].file' is missing"),
        ),
        (
            "blockdev-reopen",
            r#"{"options":{}}"#,
            Some("Invalid parameter type for 'options', expected: array"),
        ),
        (
            "block-dirty-bitmap-merge",
            r#"{"node":"a","target":"b","bitmaps":[{"node":"x","name":"y","z":1}]}"#,
            Some("Parameter 'bitmaps[0].z' is unexpected"),
        ),
        (
            "block-dirty-bitmap-add",
            r#"{"node":"a","name":"b","granularity":-1}"#,
            Some("Parameter 'granularity' expects uint32_t"),
        ),
        (
            "block-dirty-bitmap-add",
            r#"{"node":"a","name":"b","granularity":1.5}"#,
            Some("Parameter 'granularity' expects uint64"),
        ),
        (
            "transaction",
            r#"{"actions":[{"type":"abort"}]}"#,
            Some("Parameter 'actions[0].data' is missing"),
        ),
        (
            "transaction",
            r#"{"actions":[{"type":"abort","data":{"x":1}}]}"#,
            Some("Parameter 'actions[0].data.x' is unexpected"),
        ),
        (
            "x-blockdev-set-iothread",
            r#"{"node-name":"n","iothread":5}"#,
            Some("Invalid parameter type for 'iothread', expected: StrOrNull"),
        ),
        (
            "block-job-change",
            r#"{"id":"j","type":"mirror"}"#,
            Some("Parameter 'copy-mode' is missing"),
        ),
        (
            "ringbuf-read",
            r#"{"device":"d","size":"x"}"#,
            Some("Invalid parameter type for 'size', expected: integer"),
        ),
        (
            "block-stream",
            r#"{"device":"d","on-error":"never"}"#,
            Some("Parameter 'on-error' does not accept value 'never'"),
        ),
        (
            "blockdev-mirror",
            r#"{"device":"d","target":"t","sync":"full","granularity":4294967296}"#,
            Some("Parameter 'granularity' expects uint32_t"),
        ),
        (
            "query-version",
            r#"{"node":1,"y":1}"#,
            Some("Parameter 'y' is unexpected"),
        ),
        (
            "query-version",
            r#"{"id":1,"gamma":1,"b":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "query-version",
            r#"{"c":1,"zzz":1,"x":1,"size":1}"#,
            Some("Parameter 'size' is unexpected"),
        ),
        (
            "query-version",
            r#"{"alpha":1,"b":1,"k3":1,"foo":1,"c":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "query-version",
            r#"{"qux":1,"delta":1,"c":1,"bar":1,"beta":1,"gamma":1}"#,
            Some("Parameter 'c' is unexpected"),
        ),
        (
            "query-version",
            r#"{"b":1,"alpha":1,"x":1,"bar":1,"delta":1,"id":1,"zzz":1}"#,
            Some("Parameter 'alpha' is unexpected"),
        ),
        (
            "query-version",
            r#"{"bar":1,"b":1,"zzz":1,"y":1,"extra":1,"qux":1,"alpha":1,"baz":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "query-version",
            r#"{"x":1,"alpha":1,"extra":1,"zzz":1,"z":1,"delta":1,"foo":1,"gamma":1,"b":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "query-version",
            r#"{"zzz":1,"c":1,"alpha":1,"b":1,"foo":1,"k2":1,"qux":1,"id":1,"z":1,"bar":1}"#,
            Some("Parameter 'bar' is unexpected"),
        ),
        (
            "query-version",
            r#"{"alpha":1,"k1":1,"size":1,"extra":1,"bar":1,"z":1,"zzz":1,"b":1,"delta":1,"y":1,"baz":1}"#,
            Some("Parameter 'bar' is unexpected"),
        ),
        (
            "query-version",
            r#"{"k2":1,"node":1,"k1":1,"extra":1,"c":1,"x":1,"qux":1,"zzz":1,"id":1,"z":1,"beta":1,"bar":1}"#,
            Some("Parameter 'bar' is unexpected"),
        ),
        (
            "query-version",
            r#"{"qux":1,"b":1,"c":1,"zzz":1,"node":1,"alpha":1,"size":1,"extra":1,"bar":1,"k1":1,"delta":1,"gamma":1,"k3":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "query-version",
            r#"{"baz":1,"k2":1,"c":1,"b":1,"extra":1,"k1":1,"zzz":1,"size":1,"foo":1,"node":1,"z":1,"a":1,"bar":1,"k3":1}"#,
            Some("Parameter 'bar' is unexpected"),
        ),
        (
            "query-version",
            r#"{"z":1,"beta":1,"x":1,"k2":1,"b":1,"foo":1,"extra":1,"c":1,"size":1,"gamma":1,"k3":1,"qux":1,"bar":1,"zzz":1,"k1":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "query-version",
            r#"{"k1":1,"id":1,"zzz":1,"baz":1,"y":1,"qux":1,"alpha":1,"size":1,"foo":1,"z":1,"node":1,"k3":1,"x":1,"c":1,"b":1,"bar":1}"#,
            Some("Parameter 'foo' is unexpected"),
        ),
        (
            "query-version",
            r#"{"y":1,"bar":1,"gamma":1,"a":1,"k2":1,"z":1,"baz":1,"delta":1,"alpha":1,"c":1,"foo":1,"zzz":1,"k3":1,"extra":1,"id":1,"node":1,"k1":1}"#,
            Some("Parameter 'foo' is unexpected"),
        ),
        (
            "query-version",
            r#"{"beta":1,"gamma":1,"b":1,"k1":1,"zzz":1,"id":1,"k3":1,"foo":1,"alpha":1,"delta":1,"bar":1,"node":1,"qux":1,"a":1,"x":1,"baz":1,"k2":1,"size":1}"#,
            Some("Parameter 'foo' is unexpected"),
        ),
        (
            "query-version",
            r#"{"z":1,"x":1,"node":1,"b":1,"gamma":1,"a":1,"y":1,"baz":1,"alpha":1,"delta":1,"extra":1,"k3":1,"qux":1,"zzz":1,"foo":1,"size":1,"id":1,"c":1,"k2":1}"#,
            Some("Parameter 'size' is unexpected"),
        ),
        (
            "query-version",
            r#"{"beta":1,"size":1,"k2":1,"x":1,"alpha":1,"delta":1,"k1":1,"bar":1,"k3":1,"y":1,"b":1,"c":1,"gamma":1,"z":1,"id":1,"zzz":1,"baz":1,"extra":1,"a":1,"foo":1}"#,
            Some("Parameter 'size' is unexpected"),
        ),
        (
            "query-version",
            r#"{"k3":1,"size":1,"y":1,"zzz":1,"a":1,"delta":1,"extra":1,"node":1,"qux":1,"b":1,"gamma":1,"beta":1,"baz":1,"z":1,"c":1,"bar":1,"id":1,"k1":1,"foo":1,"x":1,"alpha":1}"#,
            Some("Parameter 'size' is unexpected"),
        ),
        (
            "query-version",
            r#"{"beta":1,"foo":1,"bar":1,"id":1,"delta":1,"gamma":1,"k2":1,"z":1,"size":1,"a":1,"alpha":1,"y":1,"zzz":1,"node":1,"x":1,"k1":1,"baz":1,"c":1,"extra":1,"k3":1,"b":1,"qux":1}"#,
            Some("Parameter 'size' is unexpected"),
        ),
        (
            "query-version",
            r#"{"c":1,"bar":1,"x":1,"gamma":1,"k2":1,"foo":1,"node":1,"beta":1,"alpha":1,"extra":1,"id":1,"a":1,"qux":1,"z":1,"b":1,"k3":1,"baz":1,"zzz":1,"k1":1,"delta":1,"y":1,"size":1}"#,
            Some("Parameter 'size' is unexpected"),
        ),
        (
            "query-version",
            r#"{"z":1,"qux":1,"node":1,"c":1,"id":1,"k1":1,"zzz":1,"size":1,"b":1,"k3":1,"alpha":1,"k2":1,"beta":1,"a":1,"extra":1,"y":1,"x":1,"gamma":1,"delta":1,"bar":1}"#,
            Some("Parameter 'size' is unexpected"),
        ),
        (
            "query-version",
            r#"{"size":1,"y":1,"zzz":1,"beta":1,"gamma":1,"a":1,"k3":1,"id":1,"delta":1,"node":1,"b":1,"baz":1,"c":1,"foo":1,"x":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "query-version",
            r#"{"foo":1,"a":1,"baz":1,"delta":1,"extra":1,"k3":1,"bar":1,"id":1,"zzz":1,"z":1,"y":1,"beta":1}"#,
            Some("Parameter 'bar' is unexpected"),
        ),
        (
            "query-version",
            r#"{"qux":1,"y":1,"b":1,"size":1,"k1":1,"k3":1,"delta":1,"k2":1,"baz":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"y":1,"zzz":1,"k3":1}"#,
            Some("Parameter 'k3' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"k3":1,"a":1,"k1":1,"z":1}"#,
            Some("Parameter 'z' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"beta":1,"a":1,"y":1,"z":1,"k2":1}"#,
            Some("Parameter 'z' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"beta":1,"x":1,"zzz":1,"b":1,"node":1,"k3":1}"#,
            Some("Parameter 'zzz' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"k3":1,"zzz":1,"k2":1,"x":1,"gamma":1,"b":1,"bar":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"foo":1,"baz":1,"b":1,"x":1,"k3":1,"k1":1,"a":1,"id":1}"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"c":1,"k1":1,"node":1,"k3":1,"alpha":1,"foo":1,"baz":1,"bar":1,"k2":1}"#,
            Some("Parameter 'bar' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"zzz":1,"k2":1,"k3":1,"bar":1,"beta":1,"baz":1,"foo":1,"qux":1,"alpha":1,"c":1}"#,
            Some("Parameter 'bar' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"qux":1,"x":1,"id":1,"k1":1,"node":1,"c":1,"bar":1,"foo":1,"b":1,"gamma":1,"zzz":1}"#,
            Some("Parameter 'bar' is unexpected"),
        ),
        (
            "object-add",
            r#"{}"#,
            Some("Parameter 'qom-type' is missing"),
        ),
        (
            "object-add",
            r#"{"qom-type":"iothread"}"#,
            Some("Parameter 'id' is missing"),
        ),
        (
            "object-add",
            r#"{"qom-type":"nosuch","id":"x"}"#,
            Some("Parameter 'qom-type' does not accept value 'nosuch'"),
        ),
        (
            "object-add",
            r#"{"qom-type":"iothread","id":"io0","poll-max-ns":"x"}"#,
            Some("Invalid parameter type for 'poll-max-ns', expected: integer"),
        ),
        (
            "object-add",
            r#"{"qom-type":"iothread","id":"io0","bogus":1}"#,
            Some("Parameter 'bogus' is unexpected"),
        ),
        (
            "object-add",
            r#"{"qom-type":"secret","id":"s0","format":"hex"}"#,
            Some("Parameter 'format' does not accept value 'hex'"),
        ),
        (
            "object-add",
            r#"{"qom-type":"memory-backend-ram","id":"m0"}"#,
            Some("Parameter 'size' is missing"),
        ),
        (
            "object-add",
            r#"{"qom-type":"memory-backend-ram","id":"m0","size":"1G"}"#,
            Some("Parameter 'size' expects uint64"),
        ),
        (
            "object-add",
            r#"{"qom-type":"memory-backend-ram","id":"m0","size":1,"host-nodes":[70000]}"#,
            Some("Parameter 'null' expects uint16_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"memory-backend-ram","id":"m0","size":1,"prealloc-threads":-1}"#,
            Some("Parameter 'prealloc-threads' expects uint32_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"throttle-group","id":"t0","limits":{"iops-total":"x"}}"#,
            Some("Invalid parameter type for 'limits.iops-total', expected: integer"),
        ),
        (
            "object-add",
            r#"{"qom-type":"secret_keyring","id":"k","serial":2147483648}"#,
            Some("Parameter 'serial' expects int32_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"colo-compare","id":"c","primary_in":"a","secondary_in":"b","outdev":"o","iothread":"i","expired_scan_cycle":-1}"#,
            Some("Parameter 'expired_scan_cycle' expects uint32_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"cryptodev-backend","id":"c","queues":4294967296}"#,
            Some("Parameter 'queues' expects uint32_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"filter-buffer","id":"f","netdev":"n","interval":-1}"#,
            Some("Parameter 'interval' expects uint32_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"thread-context","id":"t","cpu-affinity":[65536]}"#,
            Some("Parameter 'null' expects uint16_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"acpi-generic-initiator","id":"a","pci-dev":"p","node":-1}"#,
            Some("Parameter 'node' expects uint32_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"sev-guest","id":"s","reduced-phys-bits":1,"policy":4294967296}"#,
            Some("Parameter 'policy' expects uint32_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"sev-snp-guest","id":"s","reduced-phys-bits":1,"policy":4294967296,"cbitpos":4294967296}"#,
            Some("Parameter 'cbitpos' expects uint32_t"),
        ),
        (
            "object-add",
            r#"{"qom-type":"x-vfio-user-server","id":"v","device":"d","socket":{"type":"unix"}}"#,
            Some("Parameter 'socket.path' is missing"),
        ),
        ("chardev-add", r#"{}"#, Some("Parameter 'id' is missing")),
        (
            "chardev-add",
            r#"{"id":"c"}"#,
            Some("Parameter 'backend' is missing"),
        ),
        (
            "chardev-add",
            r#"{"id":"c","backend":{"type":"socket"}}"#,
            Some("Parameter 'backend.data' is missing"),
        ),
        (
            "chardev-add",
            r#"{"id":"c","backend":{"type":"socket","data":{}}}"#,
            Some("Parameter 'backend.data.addr' is missing"),
        ),
        (
            "chardev-add",
            r#"{"id":"c","backend":{"type":"socket","data":{"addr":{"type":"unix","data":{"path":5}}}}}"#,
            Some("Invalid parameter type for 'backend.data.addr.data.path', expected: string"),
        ),
        (
            "chardev-add",
            r#"{"id":"c","backend":{"type":"ringbuf","data":{"size":"x"}}}"#,
            Some("Invalid parameter type for 'backend.data.size', expected: integer"),
        ),
        (
            "chardev-add",
            r#"{"id":"c","backend":{"type":"bogus"}}"#,
            Some("Parameter 'type' does not accept value 'bogus'"),
        ),
        (
            "chardev-change",
            r#"{"id":"c","backend":{"type":"null","data":{"x":1}}}"#,
            Some("Parameter 'backend.data.x' is unexpected"),
        ),
        (
            "blockdev-create",
            r#"{}"#,
            Some("Parameter 'job-id' is missing"),
        ),
        (
            "blockdev-create",
            r#"{"job-id":"j","options":{"driver":"file"}}"#,
            Some("Parameter 'options.filename' is missing"),
        ),
        (
            "blockdev-create",
            r#"{"job-id":"j","options":{"driver":"file","filename":"/x","size":"1M"}}"#,
            Some("Parameter 'options.size' expects uint64"),
        ),
        (
            "blockdev-create",
            r#"{"job-id":"j","options":{"driver":"qcow2","file":"f","size":1,"version":"v4"}}"#,
            Some("Parameter 'version' does not accept value 'v4'"),
        ),
        (
            "blockdev-create",
            r#"{"job-id":"j","options":{"driver":"qcow2","file":"f","size":1,"cluster-size":-1,"refcount-bits":"x"}}"#,
            Some("Invalid parameter type for 'options.refcount-bits', expected: integer"),
        ),
        (
            "blockdev-create",
            r#"{"job-id":"j","options":{"driver":"raw"}}"#,
            None,
        ),
        (
            "blockdev-create",
            r#"{"job-id":"j","options":{"driver":"raw","x":1}}"#,
            Some("Parameter 'options.x' is unexpected"),
        ),
        (
            "blockdev-create",
            r#"{"job-id":"j","options":{"driver":"luks","size":1,"iter-time":"x"}}"#,
            Some("Invalid parameter type for 'options.iter-time', expected: integer"),
        ),
        (
            "x-blockdev-amend",
            r#"{"job-id":"j","node-name":"n","options":{"driver":"luks"}}"#,
            Some("Parameter 'options.state' is missing"),
        ),
        (
            "x-blockdev-amend",
            r#"{"job-id":"j","node-name":"n","options":{"driver":"qcow2","encrypt":{"format":"luks","state":"x"}}}"#,
            Some("Parameter 'state' does not accept value 'x'"),
        ),
        (
            "x-blockdev-amend",
            r#"{"job-id":"j","node-name":"n","options":{"driver":"raw","x":1}}"#,
            Some("Parameter 'options.x' is unexpected"),
        ),
        // Randomized member names (non-ASCII, up to 80 unexpected members): which one
        // qsd names follows GLib's hash table layout.
        (
            "blockdev-del",
            r#"{"node-name":"x","lg_jrphuz79q":1,"tas_0-3":1,"2o9cwl4m":1,"97":1,"lag":1,"q":1,"ta29ovfba":1,"t0":1,"yj":1,"j5yp-j_w":1,"ya1w":1,"2xhre5mbgzu7":1,"pr_":1,"é21":1,"m-":1,"90-4":1,"-r-dlgx":1,"d16g5":1,"cfk":1,"80bu-uv-":1,"qu_flp32":1,"6fvr6u2w7t":1,"wlveg1_10":1,"n_opw1u_-5":1,"é91":1,"0bpcjx9ambs":1,"lmvuv_pm1":1,"o":1,"o0lc1ii15w":1,"bgkihh":1,"9v4wnyf":1,"nhkl7xhh":1,"jvo48":1,"bqr3vau4":1,"x":1,"belo":1,"s01cc5e88fun":1,"5b9g7m":1,"ii-9m":1,"vk-xiwo0":1,"_3tp_fp-l694":1,"ключ93":1,"u":1,"gqvn6aax":1,"tz4":1,"09":1,"ключ48":1,"h88-eg7kckud":1,"4nhz":1,"ysebuu":1,"amrxb":1,"a0_42a4he58":1,"sgx_f9w":1,"6a5vbm":1,"fu7rvta3ldy":1}"#,
            Some("Parameter 'x' is unexpected"),
        ),
        (
            "query-version",
            r#"{"ffp5rzay4yse":1,"é14":1,"oj":1}"#,
            Some("Parameter 'oj' is unexpected"),
        ),
        (
            "query-version",
            r#"{"ctiutsjjc":1,"_3eui":1,"0prih8xd6":1,"uocqb9h5l":1,"f1dem31wr":1,"日本9":1,"f":1,"vm3v848":1,"nq3mw8oua":1,"6rxs7":1,"3ryvdb71u":1,"mp6s2":1,"ü-x51":1,"l60k":1,"t4cpgc0":1,"uzcvzziufnt_":1,"jmn0qa":1,"e6zhsgd1":1,"4faw9z1zp9ij":1,"tm8cej2c":1,"i":1,"v6eailt8gw":1,"sgqdbgtz_bgb":1,"0stqlos790rm":1,"tm8e1f":1,"5vzdy3uui":1,"xuaj0j":1,"g0ltk_gz9":1,"f7l93rxes3ma":1,"fee81s3":1,"-w6101":1,"ключ17":1,"é3":1,"so":1,"é27":1,"850":1,"g8e532s-c9":1,"5m0i13lkmsq":1,"gcv0sb":1,"es8vlc1w5nz5":1,"2ch7qxn":1,"aÿ86":1,"c434t-fnx":1,"oz8iljlffd1h":1,"é7":1,"m2ep4k2l":1,"quvslqzlf":1,"81_o351-u4":1,"ag414cix3":1,"d_a8pi7i8hmy":1,"2":1,"_wjy2m76n4":1,"x4o8ehn":1,"d":1,"34ukji3id":1,"kt":1,"_e88n7ebu":1,"k4_3":1,"aÿ47":1,"90tg2p34":1,"e":1,"a":1,"0am1_rd79l6-":1,"pa39x":1,"日本63":1,"8qz7":1,"uf4_dd1u":1,"mqg3q":1,"rbiexj2q98":1,"9scwavpb50b":1,"8fkp9t":1,"xgj0-5jbq":1,"xi":1,"q0tebwu":1,"tox_":1,"-_5mhw2h0el":1,"si-sicrsy-":1,"r":1,"1":1,"1ypgtkb7ersv":1}"#,
            Some("Parameter 'd' is unexpected"),
        ),
        (
            "blockdev-del",
            r#"{"node-name":"x","z8md7a7nfl":1,"zsv":1,"rf2skq258zcu":1,"_-y8":1,"n":1,"g6tw7":1,"04pkokvduxfc":1,"isxr-ltd098q":1,"ключ26":1,"gk6uyhbap5":1,"qd4j01":1,"6wys-cqwj-":1,"2edfl_evg":1,"g":1,"b8pd87o4te":1,"wyhr6_r-u":1,"wzr":1,"qa1pekn82dkz":1,"4ji":1,"a":1,"w3vl8o2aqdy":1,"ключ72":1,"q9":1,"ü-x94":1,"fon":1,"s":1,"u":1,"yp21":1,"vqfinjr0":1,"dq7epq4vxe4y":1,"gwunb1db2w0":1,"ste":1,"w53i":1,"ключ96":1,"wp8_":1,"bnry":1,"_zps7y9":1,"qne":1,"5jp2k":1,"tbs9oyrzfbp":1,"日本43":1,"aalsl2svjx3e":1,"r":1,"é24":1,"dy4":1,"1kudmuqq7x6":1,"3pl0cc":1,"6y-2j-17":1,"us46aj1tov":1,"0wkjltkmm74s":1,"ü-x79":1,"q7":1,"zi4t1lo2_3c":1,"77":1,"日本53":1}"#,
            Some("Parameter 'bnry' is unexpected"),
        ),
        (
            "nbd-server-start",
            r#"{"addr":{"type":"unix","data":{"path":"/nonexist/x","9_eir":1,"cb8mqe3v":1,"y":1,"fu-3":1,"gai3":1,"hl55kzb4je67":1,"100xgp4z":1,"é65":1,"ou8kjw":1,"_jv55gxuwj":1,"70pn":1,"vf1dgpeh":1,"é27":1,"fchci_r7_1rv":1,"hi6poyar9y":1,"6yr8keva7v7a":1,"ea2rnoufn-":1,"ovay0":1,"u-f":1,"65jwk":1,"mj69ty9":1,"dxljp":1,"hh-h0zz_e":1,"2p6qaiu":1,"0la5j0":1,"w2qa_jo2":1,"zgylhwd":1,"7uj":1,"u_09r":1,"xr6yykbnnn2d":1,"é35":1,"_7w":1,"t":1,"306yaj4ejy":1,"scgxgd3a69":1,"n2w0-zo-":1,"k":1,"rt_9z2":1,"c09fegq2enh5":1,"mftu3gmt8cs":1,"qxuyb":1,"_7dux0y":1,"k4qtla9":1,"wl9y":1,"ulzwy":1,"2q8wh7km":1,"60biwrrldo":1,"rd":1,"--f9gyw6":1,"nq5x46m":1,"5kz8x":1,"lmf":1,"79p60-cxi":1,"9u9rs1t":1,"3beb-oyc":1}}}"#,
            Some("Parameter 'addr.data.6yr8keva7v7a' is unexpected"),
        ),
        (
            "blockdev-del",
            r#"{"node-name":"x","h4nmu7":1,"qk9i":1,"q1-y70lem0":1,"5i8sii":1,"2gfm-u-":1,"tn1n":1,"hv672g6":1,"ctld":1,"x-mws":1,"fce6is-k59":1,"t0s2y_":1,"5sab3odqv":1,"3o":1,"m7m":1,"k_ytvsqiwasv":1,"3a_":1,"pjtmvcn":1,"lz6e92v5a":1,"kl4smn3pf5-":1,"m2":1,"l_":1,"i":1,"29g9j":1,"ü-x54":1,"gqky60mxew":1,"ud3wlqe":1,"omdgxip7t--z":1,"88-1hc":1,"_6f":1,"p92x91y7x0":1,"v6n08ccns":1,"m":1,"日本77":1,"hz93iq":1,"o":1,"qtjymz6-an_t":1,"ci":1,"ld9":1,"2e07":1,"ll18o7h7wi":1,"_4lbsvad9f":1,"d8m":1,"rnts5qxcy3ph":1,"8ymp24lq8af":1,"u118p4xd":1,"eht":1,"-cqd4z3bhg":1,"_c":1,"to":1,"zuq7kcw-js":1,"_8":1,"y0j38hjahnsb":1,"e4sf3xwn":1,"4naha":1,"j5o":1}"#,
            Some("Parameter 'omdgxip7t--z' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"9x":1,"773qg":1,"3_9_":1,"j49_iz739d":1,"8in8bdj":1,"pjmo7-7":1,"7vqbs":1,"i":1,"jd":1,"i1zde":1,"t":1,"f6ec":1,"i4kplafcb455":1,"3e7nbs":1,"eyhuj7emvw6g":1,"s4stj6k":1,"_vr3lroemah":1,"wi9":1,"6bdk9ls5x":1,"r344m0w40r":1,"06p":1,"hkrt7wqa-":1,"y48":1,"8e8x-74hv":1,"zobjpg57mq-":1,"uy49z7ca":1,"nls2onlu7ie":1,"_bmh":1,"nyk":1,"3":1,"09hqkuwzwnr":1,"7wd689":1,"bnwqbxy7mw":1,"ü-x49":1,"owsuaj":1,"fgd-1s2yom":1,"yst5s-5":1,"oa3":1,"kpf":1,"zy6isu":1,"gu":1,"日本22":1,"clvxtg7lv":1,"wxduh":1,"vga2z4w":1,"4a-csl4q":1,"b0b00fxu":1,"vs_o2c":1,"85mhea1pl7hl":1,"oh64_t":1,"k0w5":1,"02udhptb1cyq":1,"7r7":1,"8bx9u":1,"c6bnzi":1,"n22":1,"5qa":1,"qef5-yhhsbpj":1,"wbgy8kb":1,"xum6s":1,"7c0avc6x":1,"ключ28":1,"-q_pen-":1,"arxa":1,"rmh":1,"日本45":1,"mo3bi":1,"f":1,"t6op93lt":1,"lx_tfh8b8lme":1,"rq":1,"sxf2hs7fkn6":1,"qxs":1,"31p":1,"ij5-dy":1,"whd99badq7v":1,"z":1,"qbasqoplptk":1,"f0oyaz-zewrx":1,"s6582":1}"#,
            Some("Parameter 'wxduh' is unexpected"),
        ),
        (
            "blockdev-del",
            r#"{"node-name":"x","é87":1}"#,
            Some("Parameter 'é87' is unexpected"),
        ),
        (
            "query-version",
            r#"{"1j20zta_uru":1,"7v":1,"n":1,"t_y":1,"bes45uxwp3":1,"558346p":1,"4b-xqkr2jrru":1,"v4ufmhfdxei":1,"_a-":1,"é47":1,"x":1,"rja1ej0sh-p_":1,"u8k7":1,"zd54wzbt":1,"qw3ih14f9":1,"p":1,"qhom9b83l":1,"hs":1,"ou":1,"9ve":1,"7-b":1,"chw6sfw":1,"sz_y":1,"aeidgw5cl8b":1,"m":1,"_1tsrg":1,"dudqwmz":1,"wriwn":1,"_jxgy_13lgif":1,"0t-":1,"s6j21":1,"ключ67":1,"_gn6":1,"e677vcq5hist":1,"cmp4ab07":1,"é97":1,"7wt5928rns59":1,"8ugxqt9jfupl":1,"e_7za":1,"4z-i_2ps6o9":1,"enfp9r9pj5":1,"bdvqa0rjwqeo":1,"7x5ppu8djr5":1,"ad9":1,"zbblvgs07j":1,"jozgnpl-9n":1,"3tgqq":1,"日本22":1,"ncoh-6f":1,"j812":1,"80i":1,"p7j2ngm":1,"fhnn0y27o":1,"jecq":1,"zzlmv-di":1}"#,
            Some("Parameter 'x' is unexpected"),
        ),
        (
            "blockdev-del",
            r#"{"node-name":"x","ключ45":1,"qjgkbc9c":1,"7-2qyo4ymqp":1,"77jy2o":1,"0tpbjitzbvv":1,"f3":1,"_hqkblvc2l2a":1,"1k":1,"4ytrx94zr_":1,"b":1,"ddx":1,"5mlkdszq13":1,"7fvn94_wb":1,"x1026t5dmy":1,"hvy":1,"4a5-wfq9s9j":1,"kd1d":1,"s_v1vm":1,"3":1,"sjup_7ibzex2":1,"095rp7rzln":1,"aÿ91":1,"_7buo":1,"f":1,"fhe599d69":1,"kqt_udm_n8":1,"8":1,"a5y":1,"ключ10":1,"é78":1,"8-b6f0bwv":1,"07psoa4iv9":1,"r":1,"é33":1,"97i69ff7l1g":1,"0":1,"n6ighc9vfrt":1,"eaegcvaae":1,"6712u":1,"ü-x3":1,"nfm":1,"gd09ef0":1,"u":1,"w1b07":1,"ko38q":1,"d0s9x-":1,"日本88":1,"1":1,"lv803rjju7":1,"3k8nal_icx":1,"tt9nbz1vxzf":1,"n5":1,"f3e":1,"ü-x77":1,"j9m0":1,"wj7iqlue":1,"91q4":1,"qs2b3j_eehf":1,"pt4vr":1,"x37":1,"8_gewiym":1,"btf":1,"je0iz-t":1,"kuch7xk9e":1,"wneymekogz6":1,"z1z69v":1,"-8r":1,"b93xy2hfg":1,"rqvi":1,"é95":1,"638":1,"日本44":1,"lk":1,"prx":1,"é32":1,"n3z2":1,"t3w_tf_jkohq":1,"4el_2phvm":1,"ev7cq5rnr4":1,"6anc8":1}"#,
            Some("Parameter 'a5y' is unexpected"),
        ),
        (
            "query-version",
            r#"{"2kopx4ml6q":1,"yipe--":1,"日本41":1,"8ys9l":1,"1dg00xfi_und":1}"#,
            Some("Parameter '2kopx4ml6q' is unexpected"),
        ),
        (
            "block_resize",
            r#"{"size":1,"xc3e7hlrn":1,"1c":1,"um66hi1ug-rf":1,"bwyy7t":1,"ir":1,"meb3":1,"loa154jjt8":1,"hksgj":1,"gm_iqfis0rj":1,"l2":1,"f":1,"-wqvy":1,"aorfpaw2ua":1,"zi-r":1,"iekbfh":1,"n5kd9vjtgfw2":1,"mag5hwwf":1,"klx":1,"kdjo":1,"d5dj33s1-d":1,"somsn2arld44":1,"mxitf":1,"h2t3b9":1,"1ksvrzl96t":1,"t9hs":1,"2toef9":1,"ucw_9251k_a0":1,"ключ27":1,"9imqz":1,"miz2s4lfdlv":1,"b":1,"cf5a8":1,"d8s":1,"xaevaw":1,"_ono_":1,"lfhnr9-":1,"i5tdqdrjj":1,"qfj299":1,"dc":1,"d":1,"u5-w3vgf":1,"e5":1,"p7ysyt70":1,"日本38":1,"xpz7e":1,"ü-x96":1,"h":1,"me":1,"do__1ses":1,"0365-ux2du":1,"é92":1,"1f2vfu18_dn":1,"ibv5z6u33m7":1,"gbw86odb3-k":1,"hqcmuxg--z23":1}"#,
            Some("Parameter 'ibv5z6u33m7' is unexpected"),
        ),
    ];

    #[test]
    fn qmp_arguments_fail_with_qsds_exact_first_error() {
        let schema = Schema::get();
        let mut wrong = Vec::new();
        for (cmd, text, want) in QMP_CASES {
            let got = schema
                .check_command_args(cmd, &args(text))
                .err()
                .map(|e| e.to_string());
            if got.as_deref() != *want {
                wrong.push(format!("{cmd} {text}: got {got:?}, qsd {want:?}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} mismatches:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    /// A minimal stand-in for QEMU's keyval parser (no escaping, no help):
    /// dotted keys become nested objects and all-numeric key sets become arrays, in
    /// the order keys first appear. Options starting with `{` are JSON, as in qsd.
    pub(super) fn keyval(text: &str, implied: Option<&str>) -> (Value, Flavour) {
        if text.starts_with('{') {
            return (
                serde_json::from_str(text).unwrap_or(Value::Null),
                Flavour::Json,
            );
        }
        fn insert(map: &mut Map<String, Value>, path: &[&str], value: &str) {
            match path {
                [] => {}
                [last] => {
                    map.insert((*last).to_owned(), Value::String(value.to_owned()));
                }
                [first, rest @ ..] => {
                    let child = map
                        .entry((*first).to_owned())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(m) = child {
                        insert(m, rest, value);
                    }
                }
            }
        }
        fn listify(v: Value) -> Value {
            match v {
                Value::Object(m) => {
                    if !m.is_empty() && m.keys().all(|k| k.bytes().all(|b| b.is_ascii_digit())) {
                        let mut items: Vec<(usize, Value)> = m
                            .into_iter()
                            .map(|(k, v)| (k.parse().unwrap_or(usize::MAX), listify(v)))
                            .collect();
                        items.sort_by_key(|(i, _)| *i);
                        Value::Array(items.into_iter().map(|(_, v)| v).collect())
                    } else {
                        Value::Object(m.into_iter().map(|(k, v)| (k, listify(v))).collect())
                    }
                }
                other => other,
            }
        }
        let mut root = Map::new();
        for (i, item) in text.split(',').enumerate() {
            // QEMU's implied key: a first item without '=' is the value of `implied`.
            if i == 0
                && !item.contains('=')
                && let Some(key) = implied
            {
                root.insert(key.to_owned(), Value::String(item.to_owned()));
                continue;
            }
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let path: Vec<&str> = key.split('.').collect();
            insert(&mut root, &path, value);
        }
        (listify(Value::Object(root)), Flavour::Keyval)
    }

    /// `(type, option text, qsd's desc)` for `--blockdev`, `--nbd-server` and
    /// `--export`, collected from qsd 10.0.2's stderr
    /// (`qemu-storage-daemon: --blockdev <text>: <desc>`); `None` means the visitor
    /// accepted it and a later stage decided.
    const CLI_CASES: &[(&str, &str, Option<&str>)] = &[
        (
            "BlockdevOptions",
            r#"driver=null-co,size=1M"#,
            Some("Parameter 'size' expects integer"),
        ),
        ("BlockdevOptions", r#"driver=null-co,size=-5"#, None),
        (
            "BlockdevOptions",
            r#"driver=null-co,size=0x100000,node-name=n0"#,
            None,
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,size=010,node-name=n0"#,
            None,
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,size= 5,node-name=n0"#,
            None,
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,size=5 ,node-name=n0"#,
            Some("Parameter 'size' expects integer"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,size=,node-name=n0"#,
            Some("Parameter 'size' expects integer"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,size=99999999999999999999"#,
            Some("Parameter 'size' expects integer"),
        ),
        ("BlockdevOptions", r#"driver=null-co,read-only=yes"#, None),
        ("BlockdevOptions", r#"driver=null-co,read-only=true"#, None),
        (
            "BlockdevOptions",
            r#"driver=null-co,read-only=on,node-name=n0"#,
            None,
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,latency-ns=-1,node-name=n0"#,
            None,
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,latency-ns=1k"#,
            Some("Parameter 'latency-ns' expects integer"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,latency-ns=18446744073709551616"#,
            Some("Parameter 'latency-ns' expects integer"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,cache.direct=x"#,
            Some("Parameter 'cache.direct' expects 'on' or 'off'"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,size.x=1"#,
            Some("Parameters 'size.*' are unexpected"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,node-name.x=1"#,
            Some("Parameters 'node-name.*' are unexpected"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,cache=x"#,
            Some("Invalid parameter type for 'cache', expected: object"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,bogus=1"#,
            Some("Parameter 'bogus' is unexpected"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,b=1,a=2,c=3"#,
            Some("Parameter 'b' is unexpected"),
        ),
        (
            "BlockdevOptions",
            r#"driver=nosuch"#,
            Some("Parameter 'driver' does not accept value 'nosuch'"),
        ),
        (
            "BlockdevOptions",
            r#"node-name=x"#,
            Some("Parameter 'driver' is missing"),
        ),
        (
            "BlockdevOptions",
            r#"driver=file"#,
            Some("Parameter 'filename' is missing"),
        ),
        (
            "BlockdevOptions",
            r#"driver=raw,file.driver=file"#,
            Some("Parameter 'file.filename' is missing"),
        ),
        (
            "BlockdevOptions",
            r#"driver=raw,file=x,offset=1k"#,
            Some("Parameter 'offset' expects integer"),
        ),
        (
            "BlockdevOptions",
            r#"driver=raw,file.driver=file,file.filename=/x,file.aio=bad"#,
            Some("Parameter 'aio' does not accept value 'bad'"),
        ),
        (
            "BlockdevOptions",
            r#"driver=blkdebug,image=x,take-child-perms.0=bad"#,
            Some("Parameter 'null' does not accept value 'bad'"),
        ),
        (
            "BlockdevOptions",
            r#"driver=blkdebug,image=x,inject-error.0.state=1"#,
            Some("Parameter 'inject-error.0.event' is missing"),
        ),
        (
            "BlockdevOptions",
            r#"driver=blkdebug,image=x,max-transfer=0x80000000"#,
            Some("Parameter 'max-transfer' expects int32_t"),
        ),
        (
            "BlockdevOptions",
            r#"driver=blkdebug,image=x,inject-error.0.event=none,inject-error.0.errno=abc"#,
            Some("Parameter 'inject-error.0.errno' expects integer"),
        ),
        (
            "BlockdevOptions",
            r#"driver=blkdebug,image=x,inject-error=foo"#,
            Some("Invalid parameter type for 'inject-error', expected: array"),
        ),
        (
            "BlockdevOptions",
            r#"driver=blkdebug,image=x,inject-error.0=foo"#,
            Some("Invalid parameter type for 'inject-error.0', expected: object"),
        ),
        (
            "BlockdevOptions",
            r#"driver=blkdebug,image=x,set-state.0.event=none,set-state.0.new_state=1,set-state.0.q=1"#,
            Some("Parameter 'set-state.0.q' is unexpected"),
        ),
        (
            "BlockdevOptions",
            r#"driver=quorum,children.0.driver=file,vote-threshold=1"#,
            Some("Parameter 'children.0.filename' is missing"),
        ),
        (
            "BlockdevOptions",
            r#"driver=qcow2,file=x,overlap-check=bad"#,
            Some("Parameter 'overlap-check' does not accept value 'bad'"),
        ),
        (
            "BlockdevOptions",
            r#"driver=qcow2,file=x,overlap-check.template=bad"#,
            Some("Parameter 'template' does not accept value 'bad'"),
        ),
        (
            "BlockdevOptions",
            r#"driver=nbd,server.type=inet,server.host=h,server.port=1,server.to=x"#,
            Some("Parameter 'server.to' expects integer"),
        ),
        (
            "BlockdevOptions",
            r#"driver=nbd,server.type=inet,server.host=h,server.port=1,server.to=65536"#,
            Some("Parameter 'to' expects uint16_t"),
        ),
        (
            "BlockdevOptions",
            r#"driver=copy-before-write,file=a,target=b,min-cluster-size=1.5"#,
            Some("Parameter 'min-cluster-size' expects size"),
        ),
        (
            "BlockdevOptions",
            r#"driver=copy-before-write,file=a,target=b,min-cluster-size=-1"#,
            Some("Parameter 'min-cluster-size' expects size"),
        ),
        (
            "BlockdevOptions",
            r#"driver=copy-before-write,file=a,target=b,min-cluster-size=1Q"#,
            Some("Parameter 'min-cluster-size' expects size"),
        ),
        (
            "BlockdevOptions",
            r#"driver=copy-before-write,file=a,target=b,cbw-timeout=-1"#,
            Some("Parameter 'cbw-timeout' expects uint32_t"),
        ),
        (
            "BlockdevOptions",
            r#"driver=copy-before-write,file=a,target=b,cbw-timeout=4294967296"#,
            Some("Parameter 'cbw-timeout' expects uint32_t"),
        ),
        (
            "BlockdevOptions",
            r#"{"driver":"null-co","size":"1M"}"#,
            Some("Invalid parameter type for 'size', expected: integer"),
        ),
        (
            "BlockdevOptions",
            r#"{"driver":"null-co","size":1,"x":1}"#,
            Some("Parameter 'x' is unexpected"),
        ),
        (
            "NbdServerOptions",
            r#"addr.type=unix"#,
            Some("Parameter 'addr.path' is missing"),
        ),
        (
            "NbdServerOptions",
            r#"addr.type=unix,addr.path=/tmp/qp-none.sock,max-connections=-1"#,
            Some("Parameter 'max-connections' expects uint32_t"),
        ),
        (
            "NbdServerOptions",
            r#"addr.type=unix,addr.path=/tmp/qp-none.sock,max-connections=x"#,
            Some("Parameter 'max-connections' expects integer"),
        ),
        (
            "NbdServerOptions",
            r#"addr.type=unix,addr.path=/tmp/qp-none.sock,handshake-max-seconds=4294967296"#,
            Some("Parameter 'handshake-max-seconds' expects uint32_t"),
        ),
        (
            "NbdServerOptions",
            r#"addr.type=inet,addr.host=h,addr.port=1,addr.to=x"#,
            Some("Parameter 'addr.to' expects integer"),
        ),
        (
            "NbdServerOptions",
            r#"addr.type=unix,addr.data.path=/x"#,
            Some("Parameter 'addr.path' is missing"),
        ),
        (
            "NbdServerOptions",
            r#"addr.type=bogus"#,
            Some("Parameter 'type' does not accept value 'bogus'"),
        ),
        (
            "NbdServerOptions",
            r#"addr=x"#,
            Some("Invalid parameter type for 'addr', expected: object"),
        ),
        (
            "NbdServerOptions",
            r#"addr.type=unix,addr.path=/x,bogus=1"#,
            Some("Parameter 'bogus' is unexpected"),
        ),
        (
            "BlockExportOptions",
            r#"type=nbd,id=e"#,
            Some("Parameter 'node-name' is missing"),
        ),
        (
            "BlockExportOptions",
            r#"type=nbd,id=e,node-name=n,bitmap=b"#,
            Some("Parameter 'bitmap' is unexpected"),
        ),
        (
            "BlockExportOptions",
            r#"type=nbd,id=e,node-name=n,bitmaps=b"#,
            Some("Invalid parameter type for 'bitmaps', expected: array"),
        ),
        (
            "BlockExportOptions",
            r#"type=nbd,id=e,node-name=n,bitmaps.0=b"#,
            None,
        ),
        (
            "BlockExportOptions",
            r#"type=nbd,id=e,node-name=n,bitmaps.0.node=b"#,
            Some("Parameter 'bitmaps.0.name' is missing"),
        ),
        (
            "BlockExportOptions",
            r#"type=nbd,id=e,node-name=n,writable=yes"#,
            None,
        ),
        (
            "BlockExportOptions",
            r#"type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,logical-block-size=1x"#,
            Some("Parameter 'logical-block-size' expects size"),
        ),
        (
            "BlockExportOptions",
            r#"type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,num-queues=65536"#,
            Some("Parameter 'num-queues' expects uint16_t"),
        ),
        (
            "BlockExportOptions",
            r#"type=fuse,id=e,node-name=n,mountpoint=/x,allow-other=maybe"#,
            Some("Parameter 'allow-other' does not accept value 'maybe'"),
        ),
        (
            "BlockExportOptions",
            r#"type=bad,id=e,node-name=n"#,
            Some("Parameter 'type' does not accept value 'bad'"),
        ),
        (
            "BlockExportOptions",
            r#"id=e,node-name=n"#,
            Some("Parameter 'type' is missing"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,read-only=y,node-name=n0"#,
            None,
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,read-only=false,node-name=n0"#,
            None,
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,read-only=True"#,
            Some("Parameter 'read-only' expects 'on' or 'off'"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,read-only=1"#,
            Some("Parameter 'read-only' expects 'on' or 'off'"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,read-only="#,
            Some("Parameter 'read-only' expects 'on' or 'off'"),
        ),
        (
            "BlockdevOptions",
            r#"driver=null-co,size=-5,node-name=n0"#,
            None,
        ),
        (
            "BlockdevOptions",
            r#"driver=raw,size=-5,node-name=n0,file.driver=null-co,file.size=1M"#,
            Some("Parameter 'file.size' expects integer"),
        ),
        (
            "ObjectOptions",
            r#"iothread,id=io0,poll-max-ns=x"#,
            Some("Parameter 'poll-max-ns' expects integer"),
        ),
        (
            "ObjectOptions",
            r#"iothread,id=io0,poll-max-ns=1,bogus=1"#,
            Some("Parameter 'bogus' is unexpected"),
        ),
        (
            "ObjectOptions",
            r#"memory-backend-ram,id=m0,size=1x"#,
            Some("Parameter 'size' expects size"),
        ),
        (
            "ObjectOptions",
            r#"memory-backend-ram,id=m0,size=1G,host-nodes.0=70000,prealloc=on"#,
            Some("Parameter 'null' expects uint16_t"),
        ),
        (
            "ObjectOptions",
            r#"nosuch,id=x"#,
            Some("Parameter 'qom-type' does not accept value 'nosuch'"),
        ),
        (
            "ObjectOptions",
            r#"id=x"#,
            Some("Parameter 'qom-type' is missing"),
        ),
        (
            "ObjectOptions",
            r#"secret,id=s0,format=hex"#,
            Some("Parameter 'format' does not accept value 'hex'"),
        ),
        (
            "ObjectOptions",
            r#"throttle-group,id=t0,limits.iops-total=x"#,
            Some("Parameter 'limits.iops-total' expects integer"),
        ),
        (
            "ObjectOptions",
            r#"thread-context,id=t,cpu-affinity.0=x"#,
            Some("Parameter 'cpu-affinity.0' expects integer"),
        ),
        (
            "ObjectOptions",
            r#"secret_keyring,id=k,serial=0x80000000"#,
            Some("Parameter 'serial' expects int32_t"),
        ),
        (
            "ObjectOptions",
            r#"{"qom-type":"iothread","id":"io0","poll-max-ns":"x"}"#,
            Some("Invalid parameter type for 'poll-max-ns', expected: integer"),
        ),
        (
            "MonitorOptions",
            r#"mode=x,pretty=maybe"#,
            Some("Parameter 'mode' does not accept value 'x'"),
        ),
        (
            "MonitorOptions",
            r#"pretty=maybe"#,
            Some("Parameter 'pretty' expects 'on' or 'off'"),
        ),
        (
            "MonitorOptions",
            r#"id.x=1"#,
            Some("Parameters 'id.*' are unexpected"),
        ),
        (
            "MonitorOptions",
            r#"chardev.x=1"#,
            Some("Parameters 'chardev.*' are unexpected"),
        ),
        (
            "MonitorOptions",
            r#"pretty=on"#,
            Some("Parameter 'chardev' is missing"),
        ),
        (
            "MonitorOptions",
            r#"chardev=c0,bogus=1"#,
            Some("Parameter 'bogus' is unexpected"),
        ),
        ("MonitorOptions", r#"c0,pretty=yes"#, None),
        (
            "MonitorOptions",
            r#"chardev=c0,id=m,mode=control,pretty=off"#,
            None,
        ),
        ("MonitorOptions", r#"chardev=c0,mode=readline"#, None),
        (
            "MonitorOptions",
            r#"{"chardev":"c0","pretty":"on"}"#,
            Some("Invalid parameter type for 'pretty', expected: boolean"),
        ),
    ];

    #[test]
    fn command_line_options_fail_with_qsds_exact_first_error() {
        let schema = Schema::get();
        let mut wrong = Vec::new();
        for (ty, text, want) in CLI_CASES {
            let implied = match *ty {
                "ObjectOptions" => Some("qom-type"),
                "BlockdevOptions" => Some("driver"),
                "BlockExportOptions" => Some("type"),
                "MonitorOptions" => Some("chardev"),
                _ => None,
            };
            let (v, flavour) = keyval(text, implied);
            let got = schema
                .check_type(ty, &v, flavour)
                .err()
                .map(|e| e.to_string());
            if got.as_deref() != *want {
                wrong.push(format!("{ty} {text}: got {got:?}, qsd {want:?}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} mismatches:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    #[test]
    fn nesting_beyond_the_depth_limit_is_refused_without_exhausting_a_small_stack() {
        let chain = |levels: usize| {
            let mut v = serde_json::json!({"driver": "null-co"});
            for _ in 0..levels {
                v = serde_json::json!({"driver": "raw", "file": v});
            }
            v
        };
        let deep = chain(1000);
        let ok = chain(visit::MAX_DEPTH - 1);
        // A 512 KiB thread: the limit must hold even in debug builds.
        let worker = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || {
                let schema = Schema::get();
                (
                    schema
                        .check_type("BlockdevOptions", &deep, Flavour::Json)
                        .err(),
                    schema
                        .check_type("BlockdevOptions", &ok, Flavour::Json)
                        .is_ok(),
                )
            });
        let result = worker.ok().and_then(|w| w.join().ok());
        let path = vec!["file"; visit::MAX_DEPTH].join(".");
        assert_eq!(result, Some((Some(QapiError::TooDeep(path)), true)));
    }
}
