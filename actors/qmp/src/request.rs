//! The QMP request envelope and the reply, error and event envelopes, as qsd 10.0.2
//! checks and builds them (qapi/qmp-dispatch.c, qapi/qmp-event.c).
//!
//! Runs in the supervisor on untrusted parsed input. [`parse_request`] does the checks
//! of `qmp_dispatch_check_obj`; command lookup and argument checking come later, in the
//! session. The reply builders insert members in the order QEMU does, so that
//! [`crate::json::to_string`] prints qsd's exact bytes.
//!
//! # Order of checks in a session (qsd 10.0.2, checked live)
//! 1. JSON errors ([`crate::json::JsonError`]): `GenericError`, never an `id`.
//! 2. [`parse_request`]: not an object → no `id`; otherwise the `id` member (any JSON
//!    value, `null` included) is echoed from here on. Members are checked in QDict order
//!    ([`crate::qdict`]), so with several bad members the reported one is the first in
//!    that order, not in the client's: `{"execute": 1, "bogus": 2}` reports `'bogus'`,
//!    `{"arguments": 1, "execute": 1}` reports `'execute'`.
//! 3. Command lookup: `CommandNotFound` "The command X has not been found"; then
//!    "The command X has been disabled for this instance"; then, for `exec-oob`
//!    ([`Request::oob`]), "The command X does not support OOB" (`GenericError`; no qsd
//!    command allows OOB).
//! 4. Argument checking, then the command.
//!
//! # Capabilities negotiation
//! Before `qmp_capabilities`, qsd replaces the `desc` of every `CommandNotFound` error
//! with "Expecting capabilities negotiation with 'qmp_capabilities'" (class kept). All
//! envelope errors of this module are `GenericError` and keep their own text in that
//! mode; `exec-oob` is reported as an unexpected member there, since OOB cannot be
//! enabled before negotiation.

use serde_json::{Map, Value};

/// QMP error classes (qapi/error.json `QapiErrorClass`), a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Almost every error.
    GenericError,
    /// Unknown command, or any command but `qmp_capabilities` before negotiation.
    CommandNotFound,
    /// A block job lookup failed (`block-job-*`).
    DeviceNotActive,
    /// A device lookup failed (e.g. `block-commit` with an unknown device).
    DeviceNotFound,
    /// A KVM capability is missing (never raised by qsd).
    KVMMissingCap,
}

impl ErrorClass {
    /// The wire name, used as the `class` member.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request that passed the envelope checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command name, from `execute` or `exec-oob`.
    pub command: String,
    /// `arguments`, or an empty object when absent; members in the client's order.
    pub arguments: Map<String, Value>,
    /// The `id` member, echoed verbatim in the reply. `Some(Value::Null)` for
    /// `"id": null`, which is echoed as `null`; `None` when absent.
    pub id: Option<Value>,
    /// The command came as `exec-oob`. The session must still answer "The command X
    /// does not support OOB" after a successful lookup of a command without OOB
    /// support.
    pub oob: bool,
}

/// A request the envelope checks rejected; reply with [`RequestError::to_response`].
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    /// The request's `id`, if the input was an object with one.
    pub id: Option<Value>,
    /// The error class.
    pub class: ErrorClass,
    /// qsd's exact text.
    pub desc: String,
}

impl RequestError {
    fn generic(id: Option<Value>, desc: String) -> Self {
        Self {
            id,
            class: ErrorClass::GenericError,
            desc,
        }
    }

    /// The error reply, as [`error_response`] builds it.
    pub fn to_response(&self) -> Value {
        error_response(self.class, &self.desc, self.id.clone())
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for RequestError {}

/// Checks a parsed message as a QMP request (`qmp_dispatch_check_obj`).
///
/// `oob_enabled` is whether the session negotiated the `oob` capability. Without it
/// `exec-oob` is an unexpected member, as in qsd; with it, `exec-oob` names the command
/// like `execute`, and giving both is an error.
pub fn parse_request(v: Value, oob_enabled: bool) -> Result<Request, RequestError> {
    let Value::Object(mut map) = v else {
        return Err(RequestError::generic(
            None,
            "QMP input must be a JSON object".into(),
        ));
    };
    let id = map.get("id").cloned();
    let mut exec_key: Option<&str> = None;
    for (name, value) in crate::qdict::iteration_order(map.iter()) {
        match name.as_str() {
            "execute" | "exec-oob" if name == "execute" || oob_enabled => {
                if !value.is_string() {
                    let desc = format!("QMP input member '{name}' must be a string");
                    return Err(RequestError::generic(id, desc));
                }
                if let Some(first) = exec_key {
                    let desc = format!("QMP input member '{name}' clashes with '{first}'");
                    return Err(RequestError::generic(id, desc));
                }
                exec_key = Some(name.as_str());
            }
            "arguments" => {
                if !value.is_object() {
                    let desc = "QMP input member 'arguments' must be an object".to_owned();
                    return Err(RequestError::generic(id, desc));
                }
            }
            "id" => {}
            _ => {
                let desc = format!("QMP input member '{name}' is unexpected");
                return Err(RequestError::generic(id, desc));
            }
        }
    }
    let Some(exec_key) = exec_key else {
        return Err(RequestError::generic(
            id,
            "QMP input lacks member 'execute'".into(),
        ));
    };
    let oob = exec_key == "exec-oob";
    let command = match map.remove(if oob { "exec-oob" } else { "execute" }) {
        Some(Value::String(s)) => s,
        // Checked to be a string above.
        _ => String::new(),
    };
    let arguments = match map.remove("arguments") {
        Some(Value::Object(args)) => args,
        _ => Map::new(),
    };
    Ok(Request {
        command,
        arguments,
        id,
        oob,
    })
}

/// `{"return": ret, "id": id}` with QEMU's insertion order (`return` first).
pub fn success_response(ret: Value, id: Option<Value>) -> Value {
    let mut rsp = Map::new();
    rsp.insert("return".into(), ret);
    if let Some(id) = id {
        rsp.insert("id".into(), id);
    }
    Value::Object(rsp)
}

/// `{"error": {"class": …, "desc": …}, "id": id}` with QEMU's insertion order; the
/// writer prints it as `{"id": …, "error": {"class": …, "desc": …}}`.
pub fn error_response(class: ErrorClass, desc: &str, id: Option<Value>) -> Value {
    let mut err = Map::new();
    err.insert("class".into(), Value::from(class.as_str()));
    err.insert("desc".into(), Value::from(desc));
    let mut rsp = Map::new();
    rsp.insert("error".into(), Value::Object(err));
    if let Some(id) = id {
        rsp.insert("id".into(), id);
    }
    Value::Object(rsp)
}

/// An event as `qmp_event_build_dict` plus the generated sender build it:
/// `{"timestamp": {"seconds": s, "microseconds": us}, "event": name, "data": data}`,
/// `data` only for events that have members. qsd uses -1/-1 when the clock fails.
pub fn event_message(name: &str, data: Option<Value>, seconds: i64, micros: i64) -> Value {
    let mut ts = Map::new();
    ts.insert("seconds".into(), Value::from(seconds));
    ts.insert("microseconds".into(), Value::from(micros));
    let mut ev = Map::new();
    ev.insert("timestamp".into(), Value::Object(ts));
    ev.insert("event".into(), Value::from(name));
    if let Some(data) = data {
        ev.insert("data".into(), data);
    }
    Value::Object(ev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::to_string;
    use serde_json::json;

    fn obj(text: &str) -> Value {
        let mut s = crate::json::JsonStreamer::new();
        match s.feed(text.as_bytes()).pop() {
            Some(Ok(v)) => v,
            other => panic!("test input {text:?} did not parse: {other:?}"),
        }
    }

    fn err(text: &str, oob: bool) -> String {
        match parse_request(obj(text), oob) {
            Err(e) => to_string(&e.to_response()),
            Ok(r) => panic!("{text:?} was accepted: {r:?}"),
        }
    }

    #[test]
    fn a_valid_request_yields_command_arguments_in_client_order_and_id() {
        let r = parse_request(
            obj(r#"{"id": [1], "arguments": {"b": 1, "a": 2}, "execute": "x"}"#),
            false,
        );
        let r = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.command, "x");
        assert_eq!(r.arguments.keys().collect::<Vec<_>>(), ["b", "a"]);
        assert_eq!(r.id, Some(json!([1])));
        assert!(!r.oob);
    }

    #[test]
    fn absent_arguments_are_an_empty_object_and_absent_id_is_none() {
        let r = parse_request(obj(r#"{"execute": "x"}"#), false).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.arguments.is_empty());
        assert_eq!(r.id, None);
    }

    #[test]
    fn a_null_id_is_kept_distinct_from_an_absent_one() {
        let r = parse_request(obj(r#"{"execute": "x", "id": null}"#), false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.id, Some(Value::Null));
        assert_eq!(
            to_string(&success_response(json!({}), r.id)),
            r#"{"return": {}, "id": null}"#
        );
    }

    #[test]
    fn exec_oob_names_the_command_only_when_oob_was_negotiated() {
        let r = parse_request(obj(r#"{"exec-oob": "x", "id": 1}"#), true)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.command.as_str(), r.oob), ("x", true));
        assert_eq!(
            err(r#"{"exec-oob": "x", "id": 1}"#, false),
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#
        );
    }

    #[test]
    fn members_are_checked_in_qdict_order_so_the_reported_one_does_not_depend_on_client_order() {
        // Transcripts from qsd 10.0.2.
        let bogus = r#"{"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}"#;
        assert_eq!(err(r#"{"execute": 1, "bogus": 2}"#, false), bogus);
        assert_eq!(err(r#"{"bogus": 2, "execute": 1}"#, false), bogus);
        assert_eq!(
            err(r#"{"arguments": 1, "execute": 1}"#, true),
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#
        );
        assert_eq!(
            err(r#"{"exec-oob": 1, "execute": 2}"#, true),
            r#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' must be a string"}}"#
        );
        let clash = r#"{"id": "c", "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#;
        assert_eq!(
            err(r#"{"execute": "q", "exec-oob": "q", "id": "c"}"#, true),
            clash
        );
        assert_eq!(
            err(r#"{"exec-oob": "q", "execute": "q", "id": "c"}"#, true),
            clash
        );
    }

    #[test]
    fn a_non_object_gets_no_id_and_a_missing_execute_keeps_the_id() {
        assert_eq!(
            err(r#"[{"id": 1}]"#, false),
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#
        );
        assert_eq!(
            err(r#"{"id": 9}"#, false),
            r#"{"id": 9, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#
        );
    }

    #[test]
    fn replies_print_with_qsds_member_order() {
        assert_eq!(
            to_string(&success_response(json!({}), Some(json!(1)))),
            r#"{"return": {}, "id": 1}"#
        );
        assert_eq!(
            to_string(&success_response(json!([]), None)),
            r#"{"return": []}"#
        );
        assert_eq!(
            to_string(&error_response(
                ErrorClass::DeviceNotActive,
                "Block job 'x' not found",
                Some(json!(3))
            )),
            r#"{"id": 3, "error": {"class": "DeviceNotActive", "desc": "Block job 'x' not found"}}"#
        );
    }

    #[test]
    fn events_print_with_timestamp_first_and_data_last() {
        // qsd 10.0.2: BLOCK_EXPORT_DELETED as captured live.
        let ev = event_message(
            "BLOCK_EXPORT_DELETED",
            Some(json!({"id": "exp0"})),
            1795238302,
            746112,
        );
        assert_eq!(
            to_string(&ev),
            r#"{"timestamp": {"seconds": 1795238302, "microseconds": 746112}, "event": "BLOCK_EXPORT_DELETED", "data": {"id": "exp0"}}"#
        );
        assert_eq!(
            to_string(&event_message("X", None, -1, -1)),
            r#"{"timestamp": {"seconds": -1, "microseconds": -1}, "event": "X"}"#
        );
    }

    #[test]
    fn error_classes_have_their_qapi_names() {
        let all = [
            ErrorClass::GenericError,
            ErrorClass::CommandNotFound,
            ErrorClass::DeviceNotActive,
            ErrorClass::DeviceNotFound,
            ErrorClass::KVMMissingCap,
        ];
        let names: Vec<_> = all.iter().map(ErrorClass::as_str).collect();
        assert_eq!(
            names,
            [
                "GenericError",
                "CommandNotFound",
                "DeviceNotActive",
                "DeviceNotFound",
                "KVMMissingCap"
            ]
        );
    }
}
