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
//! Known differences from qsd: the `--monitor` option goes through QEMU's QemuOpts
//! visitor, not this one, and `--chardev` is not QAPI-visited in qsd at all; neither is
//! modelled here. Deprecated/unstable features are accepted as qsd's default
//! compatibility policy does.

mod ghash;
pub mod schema;
mod strtox;
pub mod types;
mod visit;

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
