//! Temporary stand-in (serde_json based) until the QEMU-compatible parser lands.
use serde_json::Value;

/// Parse error (display = QMP desc).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON parse error, {0}")]
pub struct JsonError(String);

/// Streaming parser.
#[derive(Debug, Default)]
pub struct JsonStreamer {
    buf: Vec<u8>,
}

impl JsonStreamer {
    /// New parser.
    pub fn new() -> Self {
        Self::default()
    }
    /// Feeds bytes.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, JsonError>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        loop {
            match it.next() {
                Some(Ok(v)) => {
                    consumed = it.byte_offset();
                    out.push(Ok(v));
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    out.push(Err(JsonError(e.to_string())));
                    consumed = self.buf.len();
                    break;
                }
                None => {
                    consumed = self.buf.len();
                    break;
                }
            }
        }
        self.buf.drain(..consumed);
        out
    }
}

/// Compact QMP output.
pub fn to_string(v: &Value) -> String {
    let mut s = String::new();
    write(v, &mut s);
    s
}

/// Pretty QMP output.
pub fn to_string_pretty(v: &Value) -> String {
    to_string(v)
}

fn write(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            out.push('{');
            for (i, (k, v)) in crate::qdict::iteration_order(m.iter())
                .into_iter()
                .enumerate()
            {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write(v, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}
