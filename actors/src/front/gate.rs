//! What a session decides about one parsed message before the supervisor sees it:
//! the envelope, the negotiation state, OOB, unknown commands and the QAPI argument
//! checks, with qsd's replies. Pure (no I/O), so the fuzzer can drive it too.
//!
//! Runs in the supervisor on untrusted client input.

use bulkhead_qmp::json::JsonStreamer;
use bulkhead_qmp::request::{self, ErrorClass, Request};
use serde_json::{Map, Value};

use super::render;
use crate::supervisor::{QmpError, commands, errors};

/// The verdict on one message.
#[derive(Debug)]
pub enum Admission {
    /// Answer with this reply; nothing else happens.
    Reply(Value),
    /// `qmp_capabilities` succeeded: send this reply and subscribe to events.
    Negotiated(Value),
    /// A known command with valid (normalized) arguments for the supervisor.
    Execute {
        /// The command name.
        command: String,
        /// The arguments after the QAPI checks.
        args: Map<String, Value>,
        /// The request's `id`, echoed in the reply.
        id: Option<Value>,
    },
}

/// A session's negotiation state.
#[derive(Debug, Default)]
pub struct Gate {
    negotiated: bool,
    /// The client enabled the `oob` capability (then `exec-oob` is a known member).
    oob_enabled: bool,
}

fn refuse(e: QmpError, id: Option<Value>) -> Admission {
    Admission::Reply(request::error_response(e.class, &e.desc, id))
}

impl Gate {
    /// Checks one parsed JSON value in the order qsd does.
    pub fn admit(&mut self, v: Value) -> Admission {
        let req = match request::parse_request(v, self.oob_enabled) {
            Ok(r) => r,
            Err(e) => return Admission::Reply(request::error_response(e.class, &e.desc, e.id)),
        };
        let Request {
            command,
            arguments,
            id,
            oob,
        } = req;
        let known = commands::find(&command).is_some();

        if !self.negotiated {
            if command != "qmp_capabilities" {
                return refuse(errors::negotiation_expected(), id);
            }
            if oob {
                return refuse(errors::oob_unsupported(&command), id);
            }
            if let Err(e) = crate::dispatch::validate(&command, &arguments) {
                return refuse(e, id);
            }
            self.negotiated = true;
            self.oob_enabled = arguments
                .get("enable")
                .and_then(Value::as_array)
                .is_some_and(|caps| caps.iter().any(|c| c == "oob"));
            return Admission::Negotiated(request::success_response(Value::Object(Map::new()), id));
        }

        if !known {
            return refuse(errors::command_not_found(&command), id);
        }
        if oob {
            return refuse(errors::oob_unsupported(&command), id);
        }
        let args = match crate::dispatch::validate(&command, &arguments) {
            Ok(a) => a,
            Err(e) => return refuse(e, id),
        };
        if command == "qmp_capabilities" {
            return refuse(errors::negotiation_complete(), id);
        }
        Admission::Execute { command, args, id }
    }
}

/// Feeds `chunks` (as successive reads) to a session's parser and gate as one client connection, with a
/// stand-in supervisor that answers every admitted command with `{}` (and stops at
/// `quit`, as the session does). Returns what the client would read after the
/// greeting. For the fuzzer and tests: it reaches every check a real session makes
/// before the supervisor, without sockets or actors.
pub fn replay<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, pretty: bool) -> Vec<u8> {
    let mut parser = JsonStreamer::new();
    let mut gate = Gate::default();
    let mut out = Vec::new();
    for item in chunks.into_iter().flat_map(|c| parser.feed(c)) {
        let reply = match item {
            Err(e) => request::error_response(ErrorClass::GenericError, &e.to_string(), None),
            Ok(v) => match gate.admit(v) {
                Admission::Reply(r) | Admission::Negotiated(r) => r,
                Admission::Execute { command, id, .. } => {
                    let r = request::success_response(Value::Object(Map::new()), id);
                    if command == "quit" {
                        out.extend_from_slice(&render(&r, pretty));
                        break;
                    }
                    r
                }
            },
        };
        out.extend_from_slice(&render(&reply, pretty));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::replay;

    #[test]
    fn replay_answers_like_a_session_before_the_supervisor() {
        let out = replay(
            [
                &b"{\"execute\":\"query-version\"}{\"execute\":\"qmp_capabilities\",\"id\":1}\
              {\"execute\":\"nope\"}{\"execute\":\"blockdev-del\",\"arguments\":{}}\
              {\"execute\":\"quit\"}{\"execute\":\"quit\"}"[..],
            ],
            false,
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(
            lines,
            [
                "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}",
                "{\"return\": {}, \"id\": 1}",
                "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'node-name' is missing\"}}",
                "{\"return\": {}}",
                "",
            ]
        );
    }
}
