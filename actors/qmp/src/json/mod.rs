//! QEMU's JSON dialect as qemu-storage-daemon 10.0.2 speaks it on a QMP monitor.
//!
//! Runs in the supervisor, on untrusted bytes from QMP clients. [`JsonStreamer`]
//! reproduces QEMU's json-lexer, json-streamer and json-parser: the input is a stream of
//! JSON values in arbitrary chunks (not lines), single-quoted strings and `\'` are
//! accepted, every error has qsd's exact text ([`JsonError`]), and after an error the
//! stream resynchronises exactly as qsd's does, so a client sees the same number of error
//! replies for the same garbage. Memory stays bounded by QEMU's limits: 64 MiB per
//! token and per message, 2 Mi tokens per message, nesting depth 1024.
//!
//! [`to_string`] and [`to_string_pretty`] reproduce QEMU's json-writer: members in QDict
//! order ([`crate::qdict`]), ASCII-only output, numbers as QEMU prints them.
//!
//! # Contract on objects
//! A `serde_json::Map` in this crate always holds members in *insertion order* (the
//! order in which QEMU would have `qdict_put` them, or the order a client sent them);
//! only the writer turns that into QDict order. Never feed a writer-ordered map back in.
//!
//! # Known divergence
//! QEMU parses numbers too large for a double (`1e400`) to infinity and prints `inf`,
//! which is not JSON. `serde_json::Value` cannot hold infinity, so such numbers become
//! `±f64::MAX` (printed `1.7976931348623157e+308`).

mod parser;
mod streamer;
mod utf8;
mod writer;

pub use streamer::JsonStreamer;
pub use writer::{to_string, to_string_pretty};

/// A JSON input error. `Display` is exactly the `desc` qsd puts in the error reply
/// (class `GenericError`, no `id`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// The lexer met a byte that cannot continue the current token. Carries the
    /// token so far, including that byte, as QEMU prints it (cut at a NUL byte,
    /// invalid UTF-8 shown as U+FFFD).
    #[error("JSON parse error, stray '{0}'")]
    Stray(String),
    /// A grammar error found by the parser once a complete message arrived.
    #[error("JSON parse error, {0}")]
    Syntax(SyntaxError),
    /// The tokens of one message add up to more than 64 MiB, or one token does.
    #[error("JSON token size limit exceeded")]
    TokenSizeLimit,
    /// One message has more than 2 Mi tokens.
    #[error("JSON token count limit exceeded")]
    TokenCountLimit,
    /// Brackets and braces are nested more than 1024 deep.
    #[error("JSON nesting depth limit exceeded")]
    NestingDepthLimit,
}

/// The parser's error texts (json-parser.c), shown after "JSON parse error, ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    /// A value was needed but another token came (or a stray closing token).
    #[error("expecting value")]
    ExpectingValue,
    /// The message ended inside a value.
    #[error("premature EOI")]
    PrematureEoi,
    /// A lower-case word other than `true`, `false` or `null`.
    #[error("invalid keyword '{0}'")]
    InvalidKeyword(String),
    /// An object key is followed by something other than `:`.
    #[error("missing : in object pair")]
    MissingColon,
    /// An object key is not a string.
    #[error("key is not a string in object")]
    KeyNotString,
    /// An object member is followed by something other than `,` or `}`.
    #[error("expected separator in dict")]
    ExpectedDictSeparator,
    /// An array element is followed by something other than `,` or `]`.
    #[error("expected separator in list")]
    ExpectedListSeparator,
    /// The same key appears twice in one object.
    #[error("duplicate key")]
    DuplicateKey,
    /// A backslash followed by something other than `"'\/bfnrtu`.
    #[error("invalid escape sequence in string")]
    InvalidEscape,
    /// A `\u` escape (or surrogate pair) that is not a valid character; carries the
    /// escape text as written.
    #[error("{0} is not a valid Unicode character")]
    InvalidUnicode(String),
    /// Raw string bytes that are not valid modified UTF-8.
    #[error("invalid UTF-8 sequence in string")]
    InvalidUtf8,
}

#[cfg(test)]
mod tests {
    //! Transcripts captured from qsd 10.0.2 with a raw-socket probe: each case is a
    //! fresh connection; `chunks` were sent as separate writes and `replies` are qsd's
    //! bytes split at "\r\n".

    use super::*;
    use crate::request::{ErrorClass, error_response, parse_request, success_response};
    use serde_json::{Map, Value, json};

    /// The state of the probed connection.
    #[derive(Clone, Copy)]
    enum Mode {
        /// No `qmp_capabilities` sent yet.
        Negotiating,
        /// `qmp_capabilities` without arguments.
        Negotiated,
        /// `qmp_capabilities` with `"enable": ["oob"]`.
        NegotiatedOob,
    }

    /// One captured exchange.
    struct Probe {
        name: &'static str,
        mode: Mode,
        chunks: &'static [&'static [u8]],
        replies: &'static [&'static str],
    }

    /// query-version's return value, members inserted as QEMU's visitor does.
    fn version() -> Value {
        let mut qemu = Map::new();
        qemu.insert("major".into(), json!(10));
        qemu.insert("minor".into(), json!(0));
        qemu.insert("micro".into(), json!(2));
        let mut v = Map::new();
        v.insert("qemu".into(), Value::Object(qemu));
        v.insert(
            "package".into(),
            json!("Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"),
        );
        Value::Object(v)
    }

    /// What a qsd session answers to one parsed message, for the two commands the
    /// probes use.
    fn reply(result: Result<Value, JsonError>, mode: Mode) -> Value {
        let v = match result {
            Err(e) => return error_response(ErrorClass::GenericError, &e.to_string(), None),
            Ok(v) => v,
        };
        let req = match parse_request(v, matches!(mode, Mode::NegotiatedOob)) {
            Err(e) => return e.to_response(),
            Ok(req) => req,
        };
        let not_found = ErrorClass::CommandNotFound;
        match (mode, req.command.as_str()) {
            (Mode::Negotiating, "qmp_capabilities") => success_response(json!({}), req.id),
            (Mode::Negotiating, _) => error_response(
                not_found,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                req.id,
            ),
            (_, "query-version") if req.oob => error_response(
                ErrorClass::GenericError,
                "The command query-version does not support OOB",
                req.id,
            ),
            (_, "query-version") => success_response(version(), req.id),
            (_, "qmp_capabilities") => error_response(
                not_found,
                "Capabilities negotiation is already complete, command ignored",
                req.id,
            ),
            (_, other) => error_response(
                not_found,
                &format!("The command {other} has not been found"),
                req.id,
            ),
        }
    }

    fn session<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, mode: Mode) -> Vec<Value> {
        let mut s = JsonStreamer::new();
        chunks
            .into_iter()
            .flat_map(|c| s.feed(c))
            .map(|r| reply(r, mode))
            .collect()
    }

    fn compact(replies: Vec<Value>) -> Vec<String> {
        replies.iter().map(to_string).collect()
    }

    const PROBES: &[Probe] = &[
        Probe {
            name: r#"expecting value"#,
            mode: Mode::Negotiated,
            chunks: &[b"{ \"execute\": }"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"invalid keyword"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": foo}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'foo'"}}"#,
            ],
        },
        Probe {
            name: r#"trailing comma"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"x\",}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"missing colon"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"a\" 1}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, missing : in object pair"}}"#,
            ],
        },
        Probe {
            name: r#"key not string"#,
            mode: Mode::Negotiated,
            chunks: &[b"{1: 2}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, key is not a string in object"}}"#,
            ],
        },
        Probe {
            name: r#"missing comma"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"a\": 1 \"b\": 2}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}"#,
            ],
        },
        Probe {
            name: r#"dup key"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"a\", \"execute\": \"b\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#,
            ],
        },
        Probe {
            name: r#"bad escape"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"\\x\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid escape sequence in string"}}"#,
            ],
        },
        Probe {
            name: r#"lone surrogate"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"\\ud800\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\ud800 is not a valid Unicode character"}}"#,
            ],
        },
        Probe {
            name: r#"lone surrogate upper then A"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"\\uD800\\u0041\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uD800 is not a valid Unicode character"}}"#,
            ],
        },
        Probe {
            name: r#"low surrogate"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"\\udc00\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\udc00 is not a valid Unicode character"}}"#,
            ],
        },
        Probe {
            name: r#"short hex"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"\\u00e\"}{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\u00e\" is not a valid Unicode character"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"noncharacter esc"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"\\uFFFE\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uFFFE is not a valid Unicode character"}}"#,
            ],
        },
        Probe {
            name: r#"pair nonchar"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"\\uD83F\\uDFFE\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uD83F\\uDFFE is not a valid Unicode character"}}"#,
            ],
        },
        Probe {
            name: r#"leading zero"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": 01}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '01'"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"ctrl 01"#,
            mode: Mode::Negotiated,
            chunks: &[b"\x01"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u0001'"}}"#,
            ],
        },
        Probe {
            name: r#"ctrl 01 in string"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"ab\x01cd\"}{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"ab\u0001'"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"nul in string"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"ab\x00cd\"}{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"ab'"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"nul at start"#,
            mode: Mode::Negotiated,
            chunks: &[b"\x00{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray ''"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"ff"#,
            mode: Mode::Negotiated,
            chunks: &[b"\xff"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
            ],
        },
        Probe {
            name: r#"fe then good"#,
            mode: Mode::Negotiated,
            chunks: &[b"\xfe{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"minus brace"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"id\": -}{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '-}'"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"at sign"#,
            mode: Mode::Negotiated,
            chunks: &[b"@abc def {\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"percent"#,
            mode: Mode::Negotiated,
            chunks: &[b"%d"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '%'"}}"#,
            ],
        },
        Probe {
            name: r#"u0000 echo"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"a\\u0000b\"}"],
            replies: &[
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "a\u0000b"}"#,
            ],
        },
        Probe {
            name: r#"c080 echo"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"a\xc0\x80b\"}"],
            replies: &[
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "a\u0000b"}"#,
            ],
        },
        Probe {
            name: r#"bad utf8 in string"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"a\xc3b\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
            ],
        },
        Probe {
            name: r#"overlong utf8"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"a\xc1\x81b\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
            ],
        },
        Probe {
            name: r#"nonchar utf8 FDD0"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"a\xef\xb7\x90b\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
            ],
        },
        Probe {
            name: r#"esc then hibyte"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"a\\\xc3\xa9b\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid escape sequence in string"}}"#,
            ],
        },
        Probe {
            name: r#"u then hibyte"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"a\\u\xc3\xa9\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\u\u00E9\" is not a valid Unicode character"}}"#,
            ],
        },
        Probe {
            name: r#"single quoted"#,
            mode: Mode::Negotiated,
            chunks: &[b"{'execute': 'query-version', 'id': 'it\\'s \"q\"'}"],
            replies: &[
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "it's \"q\""}"#,
            ],
        },
        Probe {
            name: r#"escapes echo"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u0001 \\u001f \\u007f \\u0080 \\u00e9 \\ud83d\\ude00 / ~\"}"],
            replies: &[
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "\" \\ / \b \f \n \r \t \u0001 \u001F \u007F \u0080 \u00E9 \uD83D\uDE00 / ~"}"#,
            ],
        },
        Probe {
            name: r#"raw utf8 echo"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"\xc3\xa9\xf0\x9f\x98\x80\"}"],
            replies: &[
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "\u00E9\uD83D\uDE00"}"#,
            ],
        },
        Probe {
            name: r#"two in one"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"ok\"}{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"split"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"exec", b"ute\":\"query-ve", b"rsion\",\"id\":1", b"2}"],
            replies: &[
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": 12}"#,
            ],
        },
        Probe {
            name: r#"array top"#,
            mode: Mode::Negotiated,
            chunks: &[b"[1,2,3]"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ],
        },
        Probe {
            name: r#"string top"#,
            mode: Mode::Negotiated,
            chunks: &[b"\"hello\""],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ],
        },
        Probe {
            name: r#"number top"#,
            mode: Mode::Negotiated,
            chunks: &[b"42"],
            replies: &[],
        },
        Probe {
            name: r#"stray close"#,
            mode: Mode::Negotiated,
            chunks: &[b"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"stray close sq"#,
            mode: Mode::Negotiated,
            chunks: &[b"]"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"array brace"#,
            mode: Mode::Negotiated,
            chunks: &[b"[}]"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"obj bracket"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"a\":1]"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}"#,
            ],
        },
        Probe {
            name: r#"true keyword top"#,
            mode: Mode::Negotiated,
            chunks: &[b"true false null"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ],
        },
        Probe {
            name: r#"bad keyword top"#,
            mode: Mode::Negotiated,
            chunks: &[b"nul"],
            replies: &[],
        },
        Probe {
            name: r#"upper keyword"#,
            mode: Mode::Negotiated,
            chunks: &[b"True"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray 'T'"}}"#,
            ],
        },
        Probe {
            name: r#"empty obj"#,
            mode: Mode::Negotiated,
            chunks: &[b"{}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#,
            ],
        },
        Probe {
            name: r#"id only"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"id\": 9}"],
            replies: &[
                r#"{"id": 9, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#,
            ],
        },
        Probe {
            name: r#"exec not string"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": 1, \"id\": 10}"],
            replies: &[
                r#"{"id": 10, "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#,
            ],
        },
        Probe {
            name: r#"exec 1 bogus"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": 1, \"bogus\": 2}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}"#,
            ],
        },
        Probe {
            name: r#"bogus exec 1"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"bogus\": 2, \"execute\": 1}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}"#,
            ],
        },
        Probe {
            name: r#"args list"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"arguments\": [], \"execute\": \"x\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#,
            ],
        },
        Probe {
            name: r#"args null"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"x\", \"arguments\": null, \"id\": 5}"],
            replies: &[
                r#"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#,
            ],
        },
        Probe {
            name: r#"extra"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"query-version\", \"bogus\": 1, \"id\": \"e\"}"],
            replies: &[
                r#"{"id": "e", "error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}"#,
            ],
        },
        Probe {
            name: r#"clash"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"query-version\", \"exec-oob\": \"query-version\", \"id\": \"c\"}"],
            replies: &[
                r#"{"id": "c", "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#,
            ],
        },
        Probe {
            name: r#"execoob noncap"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"exec-oob\": \"query-version\", \"id\": \"o\"}"],
            replies: &[
                r#"{"id": "o", "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#,
            ],
        },
        Probe {
            name: r#"unknown cmd"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"no-such-command\", \"id\": 3}"],
            replies: &[
                r#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"id null"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"no-such-command\", \"id\": null}"],
            replies: &[
                r#"{"id": null, "error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"id types"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": {\"z\": [true, false, null, 1, \"s\"], \"a\": {}}}"],
            replies: &[
                r#"{"id": {"a": {}, "z": [true, false, null, 1, "s"]}, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num -0"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": -0}"],
            replies: &[
                r#"{"id": 0, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num -0.0"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": -0.0}"],
            replies: &[
                r#"{"id": -0, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1.0"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1.0}"],
            replies: &[
                r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1.5e3"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1.5e3}"],
            replies: &[
                r#"{"id": 1500, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 0.1"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 0.1}"],
            replies: &[
                r#"{"id": 0.10000000000000001, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num u64"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 12345678901234567890}"],
            replies: &[
                r#"{"id": 12345678901234567890, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num > u64"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 123456789012345678901}"],
            replies: &[
                r#"{"id": 1.2345678901234568e+20, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num < i64"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": -9223372036854775809}"],
            replies: &[
                r#"{"id": -9.2233720368547758e+18, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1e400 (qsd prints the invalid `inf`; we saturate)"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1e400}"],
            replies: &[
                r#"{"id": 1.7976931348623157e+308, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1e-400"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1e-400}"],
            replies: &[
                r#"{"id": 0, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1e22"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1e22}"],
            replies: &[
                r#"{"id": 1e+22, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1e16"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1e16}"],
            replies: &[
                r#"{"id": 10000000000000000, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1e17"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1e17}"],
            replies: &[
                r#"{"id": 1e+17, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1e-5"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1e-5}"],
            replies: &[
                r#"{"id": 1.0000000000000001e-05, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 0.0001"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 0.0001}"],
            replies: &[
                r#"{"id": 0.0001, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num tie"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1234567890123456.75}"],
            replies: &[
                r#"{"id": 1234567890123456.8, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1E+2"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1E+2}"],
            replies: &[
                r#"{"id": 100, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"num 1."#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1.}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '1.}'"}}"#,
            ],
        },
        Probe {
            name: r#"num .5"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": .5}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '.'"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"num 1e"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1e}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '1e}'"}}"#,
            ],
        },
        Probe {
            name: r#"num -"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": -a}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '-a'"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"num 1a"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\": \"nope\", \"id\": 1a}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in dict"}}"#,
            ],
        },
        Probe {
            name: r#"tab recovery"#,
            mode: Mode::Negotiated,
            chunks: &[b"@\x09x{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"clash"#,
            mode: Mode::NegotiatedOob,
            chunks: &[b"{\"execute\": \"query-version\", \"exec-oob\": \"query-version\", \"id\": \"c\"}"],
            replies: &[
                r#"{"id": "c", "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#,
            ],
        },
        Probe {
            name: r#"clash rev"#,
            mode: Mode::NegotiatedOob,
            chunks: &[b"{\"exec-oob\": \"query-version\", \"execute\": \"query-version\", \"id\": \"c\"}"],
            replies: &[
                r#"{"id": "c", "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#,
            ],
        },
        Probe {
            name: r#"execoob"#,
            mode: Mode::NegotiatedOob,
            chunks: &[b"{\"exec-oob\": \"query-version\", \"id\": \"o\"}"],
            replies: &[
                r#"{"id": "o", "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}"#,
            ],
        },
        Probe {
            name: r#"execoob unknown"#,
            mode: Mode::NegotiatedOob,
            chunks: &[b"{\"exec-oob\": \"nope\", \"id\": \"o\"}"],
            replies: &[
                r#"{"id": "o", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"execoob int"#,
            mode: Mode::NegotiatedOob,
            chunks: &[b"{\"exec-oob\": 1, \"id\": \"o\"}"],
            replies: &[
                r#"{"id": "o", "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' must be a string"}}"#,
            ],
        },
        Probe {
            name: r#"execoob int + execute int"#,
            mode: Mode::NegotiatedOob,
            chunks: &[b"{\"exec-oob\": 1, \"execute\": 2}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' must be a string"}}"#,
            ],
        },
        Probe {
            name: r#"exec args bogus"#,
            mode: Mode::NegotiatedOob,
            chunks: &[b"{\"execute\": 1, \"arguments\": 1, \"bogus\": 1, \"id\": 2}"],
            replies: &[
                r#"{"id": 2, "error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}"#,
            ],
        },
        Probe {
            name: r#"args exec"#,
            mode: Mode::NegotiatedOob,
            chunks: &[b"{\"arguments\": 1, \"execute\": 1}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#,
            ],
        },
        Probe {
            name: r#"neg unknown"#,
            mode: Mode::Negotiating,
            chunks: &[b"{\"execute\": \"query-version\", \"arguments\": {\"x\": 1}, \"id\": \"pre\"}"],
            replies: &[
                r#"{"id": "pre", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
            ],
        },
        Probe {
            name: r#"neg exec int"#,
            mode: Mode::Negotiating,
            chunks: &[b"{\"execute\": 1, \"id\": 1}"],
            replies: &[
                r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#,
            ],
        },
        Probe {
            name: r#"neg lacks"#,
            mode: Mode::Negotiating,
            chunks: &[b"{\"id\": 1}"],
            replies: &[
                r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#,
            ],
        },
        Probe {
            name: r#"neg nonobj"#,
            mode: Mode::Negotiating,
            chunks: &[b"[1]"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ],
        },
        Probe {
            name: r#"neg parse"#,
            mode: Mode::Negotiating,
            chunks: &[b"{\"a\" 1}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, missing : in object pair"}}"#,
            ],
        },
        Probe {
            name: r#"neg extra"#,
            mode: Mode::Negotiating,
            chunks: &[b"{\"execute\": \"qmp_capabilities\", \"foo\": 1}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}"#,
            ],
        },
        Probe {
            name: r#"neg execoob"#,
            mode: Mode::Negotiating,
            chunks: &[b"{\"exec-oob\": \"qmp_capabilities\", \"id\": 7}"],
            replies: &[
                r#"{"id": 7, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#,
            ],
        },
        Probe {
            name: r#"neg args null"#,
            mode: Mode::Negotiating,
            chunks: &[b"{\"execute\": \"qmp_capabilities\", \"arguments\": null}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#,
            ],
        },
        Probe {
            name: r#"list separator"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":[1 2]}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expected separator in list"}}"#,
            ],
        },
        Probe {
            name: r#"object as key"#,
            mode: Mode::Negotiated,
            chunks: &[b"{{\"a\":1}: 2}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, key is not a string in object"}}"#,
            ],
        },
        Probe {
            name: r#"bad object as key"#,
            mode: Mode::Negotiated,
            chunks: &[b"{{\"a\" 1}: 2}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, missing : in object pair"}}"#,
            ],
        },
        Probe {
            name: r#"bad keyword in array"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":[tru]}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'tru'"}}"#,
            ],
        },
        Probe {
            name: r#"three closers"#,
            mode: Mode::Negotiated,
            chunks: &[b"}}}{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"object then closer"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":\"ok\"}}"],
            replies: &[
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"empty array top"#,
            mode: Mode::Negotiated,
            chunks: &[b"[]"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ],
        },
        Probe {
            name: r#"whitespace variants"#,
            mode: Mode::Negotiated,
            chunks: &[b"\x09{\x0d\x0a\"execute\"\x09:\x0d\"nope\" , \"id\"\x0a:\x091}\x0d\x0a"],
            replies: &[
                r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"sq escapes"#,
            mode: Mode::Negotiated,
            chunks: &[b"{'execute':'nope','id':'a\\\"b\"c\\'d'}"],
            replies: &[
                r#"{"id": "a\"b\"c'd", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"dq apostrophe escape"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":\"x\\'y\"}"],
            replies: &[
                r#"{"id": "x'y", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"u0041"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":\"\\u0041\\u00e9\"}"],
            replies: &[
                r#"{"id": "A\u00E9", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"dup key nested"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":{\"a\":1,\"a\":2}}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#,
            ],
        },
        Probe {
            name: r#"value error beats dup"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"execute\":foo}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'foo'"}}"#,
            ],
        },
        Probe {
            name: r#"error inside string at depth"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":[\"\\q\"]}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid escape sequence in string"}}"#,
            ],
        },
        Probe {
            name: r#"negative exp"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":[1e-2, -1.5E+3, 0.5e1, -0, 0]}"],
            replies: &[
                r#"{"id": [0.01, -1500, 5, 0, 0], "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"stray in array then resync"#,
            mode: Mode::Negotiated,
            chunks: &[b"[1, @, 2]{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"colon top"#,
            mode: Mode::Negotiated,
            chunks: &[b":"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"comma top"#,
            mode: Mode::Negotiated,
            chunks: &[b","],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ],
        },
        Probe {
            name: r#"string top then object"#,
            mode: Mode::Negotiated,
            chunks: &[b"\"a\"{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"keyword followed by object"#,
            mode: Mode::Negotiated,
            chunks: &[b"true{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"number then object"#,
            mode: Mode::Negotiated,
            chunks: &[b"12{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"ctrl in recovery gives another error"#,
            mode: Mode::Negotiated,
            chunks: &[b"@\x01{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u0001'"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"ff in recovery"#,
            mode: Mode::Negotiated,
            chunks: &[b"@\xff{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"high bytes in recovery skipped"#,
            mode: Mode::Negotiated,
            chunks: &[b"@\xc3\xa9 x{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"stray utf8 lead"#,
            mode: Mode::Negotiated,
            chunks: &[b"\xc3\xa9{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"del char"#,
            mode: Mode::Negotiated,
            chunks: &[b"\x7f{\"execute\":\"query-version\",\"id\":\"ok\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u007F'"}}"#,
                r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#,
            ],
        },
        Probe {
            name: r#"del in string"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":\"a\x7fb\"}"],
            replies: &[
                r#"{"id": "a\u007Fb", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"lone continuation in string"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":\"a\x80b\"}"],
            replies: &[
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
            ],
        },
        Probe {
            name: r#"4byte utf8 in string"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":\"\xf0\x90\x80\x80\"}"],
            replies: &[
                r#"{"id": "\uD800\uDC00", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"pretty-like input"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\x0a    \"execute\": \"nope\",\x0a    \"id\": 5\x0a}\x0a"],
            replies: &[
                r#"{"id": 5, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"id large negative int"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":-9223372036854775808}"],
            replies: &[
                r#"{"id": -9223372036854775808, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"id 2^63"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":9223372036854775808}"],
            replies: &[
                r#"{"id": 9223372036854775808, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"id 2^64"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":18446744073709551616}"],
            replies: &[
                r#"{"id": 1.8446744073709552e+19, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"id 1e308"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":1e308}"],
            replies: &[
                r#"{"id": 1e+308, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"id 123456789.123456789"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":123456789.123456789}"],
            replies: &[
                r#"{"id": 123456789.12345679, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
        Probe {
            name: r#"id 100000000000000000000.0"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\",\"id\":100000000000000000000.0}"],
            replies: &[
                r#"{"id": 1e+20, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            ],
        },
    ];

    /// Captured on a monitor with `pretty=on`.
    const PRETTY_PROBES: &[Probe] = &[
        Probe {
            name: r#"pretty version"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"query-version\",\"id\":[1,{\"a\":[],\"b\":{}},[]]}"],
            replies: &[
                r#"{"#,
                r#"    "return": {"#,
                r#"        "qemu": {"#,
                r#"            "micro": 2,"#,
                r#"            "minor": 0,"#,
                r#"            "major": 10"#,
                r#"        },"#,
                r#"        "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1""#,
                r#"    },"#,
                r#"    "id": ["#,
                r#"        1,"#,
                r#"        {"#,
                r#"            "a": ["#,
                r#"            ],"#,
                r#"            "b": {"#,
                r#"            }"#,
                r#"        },"#,
                r#"        ["#,
                r#"        ]"#,
                r#"    ]"#,
                r#"}"#,
            ],
        },
        Probe {
            name: r#"pretty err"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"nope\"}"],
            replies: &[
                r#"{"#,
                r#"    "error": {"#,
                r#"        "class": "CommandNotFound","#,
                r#"        "desc": "The command nope has not been found""#,
                r#"    }"#,
                r#"}"#,
            ],
        },
        Probe {
            name: r#"pretty empty return"#,
            mode: Mode::Negotiated,
            chunks: &[b"{\"execute\":\"qmp_capabilities\",\"id\":{}}"],
            replies: &[
                r#"{"#,
                r#"    "id": {"#,
                r#"    },"#,
                r#"    "error": {"#,
                r#"        "class": "CommandNotFound","#,
                r#"        "desc": "Capabilities negotiation is already complete, command ignored""#,
                r#"    }"#,
                r#"}"#,
            ],
        },
        Probe {
            name: r#"pretty parse err"#,
            mode: Mode::Negotiated,
            chunks: &[b"}"],
            replies: &[
                r#"{"#,
                r#"    "error": {"#,
                r#"        "class": "GenericError","#,
                r#"        "desc": "JSON parse error, expecting value""#,
                r#"    }"#,
                r#"}"#,
            ],
        },
    ];

    #[test]
    fn every_probe_transcript_is_reproduced_byte_for_byte() {
        for p in PROBES {
            let got = compact(session(p.chunks.iter().copied(), p.mode));
            assert_eq!(got, p.replies, "case {:?}", p.name);
        }
    }

    #[test]
    fn every_probe_gives_the_same_replies_when_fed_one_byte_at_a_time() {
        for p in PROBES {
            let bytes: Vec<u8> = p.chunks.concat();
            let got = compact(session(bytes.chunks(1), p.mode));
            assert_eq!(got, p.replies, "case {:?}", p.name);
        }
    }

    #[test]
    fn pretty_output_matches_a_pretty_monitor_including_crlf_inside_messages() {
        for p in PRETTY_PROBES {
            let got: Vec<String> = session(p.chunks.iter().copied(), p.mode)
                .iter()
                .map(to_string_pretty)
                .collect();
            assert_eq!(
                got.join("\r\n"),
                p.replies.join("\r\n"),
                "case {:?}",
                p.name
            );
        }
    }

    const QV: &[u8] = br#"{"execute":"query-version","id":"ok"}"#;
    const QV_REPLY: &str = r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "id": "ok"}"#;
    const NOT_OBJECT: &str =
        r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#;
    const EXPECTING_VALUE: &str =
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#;
    const NESTING: &str =
        r#"{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}"#;
    const TOKEN_COUNT: &str =
        r#"{"error": {"class": "GenericError", "desc": "JSON token count limit exceeded"}}"#;

    fn negotiated(chunks: &[&[u8]]) -> Vec<String> {
        compact(session(chunks.iter().copied(), Mode::Negotiated))
    }

    #[test]
    fn nesting_of_1024_is_accepted_and_1025_is_refused_then_the_stream_recovers() {
        // qsd 10.0.2 transcripts.
        let ok = [b"[".repeat(1024), b"]".repeat(1024)].concat();
        assert_eq!(negotiated(&[&ok]), [NOT_OBJECT]);
        let deep = [b"[".repeat(1025), QV.to_vec()].concat();
        assert_eq!(negotiated(&[&deep]), [NESTING, QV_REPLY]);
        // Each closer left over after the reset is a message of its own.
        let closers = [b"[".repeat(1025), b"]]".to_vec(), QV.to_vec()].concat();
        assert_eq!(
            negotiated(&[&closers]),
            [NESTING, EXPECTING_VALUE, EXPECTING_VALUE, QV_REPLY]
        );
    }

    #[test]
    fn nesting_counts_braces_and_brackets_together() {
        let ok = [br#"{"a":["#.repeat(512), b"]}".repeat(512)].concat();
        assert_eq!(
            negotiated(&[&ok]),
            [
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'a' is unexpected"}}"#
            ]
        );
        let deep = [br#"{"a":["#.repeat(512), b"{".to_vec(), QV.to_vec()].concat();
        assert_eq!(negotiated(&[&deep]), [NESTING, QV_REPLY]);
    }

    #[test]
    fn a_message_of_more_than_two_mebi_tokens_is_refused() {
        // '[' then 2^20 times "1,": the 2^21 + 1st token is the last ','.
        let many = [b"[".to_vec(), b"1,".repeat(1 << 20)].concat();
        assert_eq!(negotiated(&[&many, QV]), [TOKEN_COUNT, QV_REPLY]);
        // The check also applies to the token that would complete the message.
        let complete = [b"[".to_vec(), b"1,".repeat((1 << 20) - 1), b"1]".to_vec()].concat();
        assert_eq!(negotiated(&[&complete, QV]), [TOKEN_COUNT, QV_REPLY]);
    }

    const TOKEN_SIZE: &str =
        r#"{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}"#;

    /// Replies of a negotiated session whose streamer has a token size limit of
    /// `size` and a token count limit of `count`.
    fn limited(size: usize, count: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut s = JsonStreamer::with_limits(size, count);
        let results = chunks.iter().flat_map(|c| s.feed(c));
        results
            .map(|r| to_string(&reply(r, Mode::Negotiated)))
            .collect()
    }

    fn string(len: usize) -> Vec<u8> {
        [b"\"".to_vec(), b"a".repeat(len - 2), b"\"".to_vec()].concat()
    }

    #[test]
    fn a_top_level_string_of_64_mib_is_refused_after_qsds_one_byte_allowance() {
        // qsd 10.0.2: a string token of 64 MiB - 1 bytes passes, one of 64 MiB does not.
        let m = 64 << 20;
        assert_eq!(negotiated(&[&string(m), QV]), [TOKEN_SIZE, QV_REPLY]);
    }

    #[test]
    fn the_size_limit_counts_every_token_of_the_message_plus_one_byte() {
        // The same three shapes at the real 64 MiB limit gave exactly these replies
        // from qsd 10.0.2 (40 minutes of probing: qsd reads its monitor byte by byte).
        let m = 1000;
        assert_eq!(
            limited(m, 1 << 21, &[&string(m - 1), QV]),
            [NOT_OBJECT, QV_REPLY]
        );
        assert_eq!(
            limited(m, 1 << 21, &[&string(m), QV]),
            [TOKEN_SIZE, QV_REPLY]
        );
        // After '[' the same m - 1 bytes are too many; the ']' is then a stray closer.
        let array = [b"[".to_vec(), string(m - 1), b"]".to_vec(), QV.to_vec()].concat();
        assert_eq!(
            limited(m, 1 << 21, &[&array]),
            [TOKEN_SIZE, EXPECTING_VALUE, QV_REPLY]
        );
    }

    #[test]
    fn the_count_limit_allows_exactly_max_tokens() {
        // '[' + k times "1," + "[]]" is 2k + 4 tokens. qsd 10.0.2 gave these replies
        // with k = 2^20 - 2 at its real limit of 2^21 tokens.
        let msg = |k: usize, tail: &[u8]| [b"[".to_vec(), b"1,".repeat(k), tail.to_vec()].concat();
        assert_eq!(limited(1 << 20, 100, &[&msg(48, b"[]]")]), [NOT_OBJECT]);
        assert_eq!(
            limited(1 << 20, 100, &[&msg(48, b"[1]]"), QV]),
            [TOKEN_COUNT, QV_REPLY]
        );
    }

    #[test]
    fn a_token_longer_than_64_mib_is_cut_and_lexing_restarts_inside_it() {
        const M: usize = 64 << 20;
        // qsd 10.0.2 transcript. The lexer gives up after M + 1 bytes of the string
        // and starts over, so the closing quote opens a new string that the newline
        // then breaks.
        let input = [
            b"\"".to_vec(),
            b"a".repeat(M),
            b"\"\n".to_vec(),
            QV.to_vec(),
        ]
        .concat();
        let stray =
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\n'"}}"#;
        assert_eq!(negotiated(&[&input]), [TOKEN_SIZE, stray, QV_REPLY]);
    }

    #[test]
    fn a_long_token_split_across_many_feeds_is_cut_at_the_same_byte() {
        let mut s = JsonStreamer::with_limits(100, 1 << 21);
        let input = [
            b"\"".to_vec(),
            b"a".repeat(100),
            b"\"\n".to_vec(),
            QV.to_vec(),
        ]
        .concat();
        let got: Vec<String> = input
            .chunks(7)
            .flat_map(|c| s.feed(c))
            .map(|r| to_string(&reply(r, Mode::Negotiated)))
            .collect();
        let stray =
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\n'"}}"#;
        assert_eq!(got, [TOKEN_SIZE, stray, QV_REPLY]);
    }
}
