//! Argument validation before any side effect: every request's arguments are checked
//! against the command's QAPI definition (data in `bulkhead_qmp::qapi`) and normalized,
//! with qsd's exact error texts.

use bulkhead_qmp::qapi::{Flavour, Schema};
use bulkhead_qmp::request::ErrorClass;
use serde_json::{Map, Value};

use crate::supervisor::QmpError;

fn error(e: bulkhead_qmp::qapi::QapiError) -> QmpError {
    let class = if e.class() == "CommandNotFound" {
        ErrorClass::CommandNotFound
    } else {
        ErrorClass::GenericError
    };
    QmpError {
        class,
        desc: e.to_string(),
    }
}

/// Checks `args` against `command`'s QAPI definition and returns them normalized.
pub fn validate(command: &str, args: &Map<String, Value>) -> Result<Map<String, Value>, QmpError> {
    match Schema::get()
        .check_command_args(command, args)
        .map_err(error)?
    {
        Value::Object(m) => Ok(m),
        // Commands without arguments normalize to nothing.
        _ => Ok(Map::new()),
    }
}

/// Checks a command-line option value (`--blockdev`, `--export`, `--nbd-server`, ...)
/// against its QAPI type: keyval trees of strings, or JSON when the option started `{`.
pub fn validate_type(type_name: &str, v: &Value, json: bool) -> Result<Value, QmpError> {
    let flavour = if json { Flavour::Json } else { Flavour::Keyval };
    Schema::get()
        .check_type(type_name, v, flavour)
        .map_err(error)
}
