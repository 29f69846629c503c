//! A raw-bytes QMP client: sends exact bytes, reads replies and events line by line.
//!
//! Runs in the test process; everything it reads comes from the daemon under test and is
//! treated as untrusted (malformed lines become errors, never panics). Lines are returned
//! with their terminator (`\r\n` for QEMU), so byte-exact comparisons see it too.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::HarnessError;

/// How long a read waits for one complete line by default.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`QmpConnection::connect`] retries while the socket is not listening yet.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One QMP connection over a Unix socket.
#[derive(Debug)]
pub struct QmpConnection {
    stream: UnixStream,
    socket: PathBuf,
    pending: Vec<u8>,
    timeout: Duration,
    next_id: u64,
    events: Vec<Value>,
}

/// Renders bytes for a message: printable ASCII as is, everything else escaped (`\r`, `\n`,
/// `\xNN`).
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// Parses one received line (terminator included) as a JSON object.
pub fn parse_line(line: &[u8]) -> Result<Value, HarnessError> {
    let value: Value = serde_json::from_slice(line).map_err(|e| HarnessError::Unexpected {
        line: printable(line),
        reason: format!("not JSON: {e}"),
    })?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(HarnessError::Unexpected {
            line: printable(line),
            reason: "not a JSON object".into(),
        })
    }
}

/// True if the message is an event (as opposed to a reply).
pub fn is_event(message: &Value) -> bool {
    message.get("event").is_some()
}

impl QmpConnection {
    /// Connects to `socket`, retrying for [`CONNECT_TIMEOUT`] while it is not listening yet.
    pub fn connect(socket: &Path) -> Result<QmpConnection, HarnessError> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    return Ok(QmpConnection {
                        stream,
                        socket: socket.to_path_buf(),
                        pending: Vec::new(),
                        timeout: READ_TIMEOUT,
                        next_id: 0,
                        events: Vec::new(),
                    });
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(HarnessError::Connect {
                        socket: socket.to_path_buf(),
                        source,
                    });
                }
            }
        }
    }

    /// The socket this connection goes to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sets the default per-line read timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends exactly `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), HarnessError> {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| HarnessError::io("sending to the QMP socket", e))
    }

    /// Reads one line (terminator included) within the default timeout.
    pub fn read_line(&mut self) -> Result<Vec<u8>, HarnessError> {
        self.read_line_within(self.timeout)
    }

    /// Reads one line (terminator included) within `timeout`.
    pub fn read_line_within(&mut self, timeout: Duration) -> Result<Vec<u8>, HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 65536];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let rest = self.pending.split_off(end + 1);
                return Ok(std::mem::replace(&mut self.pending, rest));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(HarnessError::ReadTimeout {
                    timeout,
                    partial: printable(&self.pending),
                });
            }
            self.stream
                .set_read_timeout(Some(deadline - now))
                .map_err(|e| HarnessError::io("setting the read timeout", e))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(HarnessError::Eof {
                        partial: printable(&self.pending),
                    });
                }
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(HarnessError::Eof {
                        partial: printable(&self.pending),
                    });
                }
                Err(e) => return Err(HarnessError::io("reading from the QMP socket", e)),
            }
        }
    }

    /// Reads lines until the daemon closes the connection. A last line without terminator is
    /// returned as is, so a missing `\r\n` shows up in comparisons.
    pub fn read_to_eof(&mut self, timeout: Duration) -> Result<Vec<Vec<u8>>, HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_line_within(left) {
                Ok(line) => lines.push(line),
                Err(HarnessError::Eof { .. }) => {
                    if !self.pending.is_empty() {
                        lines.push(std::mem::take(&mut self.pending));
                    }
                    return Ok(lines);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one line and parses it as a JSON object.
    pub fn read_message(&mut self) -> Result<Value, HarnessError> {
        let line = self.read_line()?;
        parse_line(&line)
    }

    /// Reads the greeting and checks it has the `QMP` member.
    pub fn read_greeting(&mut self) -> Result<Value, HarnessError> {
        let line = self.read_line()?;
        let greeting = parse_line(&line)?;
        if greeting.get("QMP").is_none() {
            return Err(HarnessError::Unexpected {
                line: printable(&line),
                reason: "expected the QMP greeting".into(),
            });
        }
        Ok(greeting)
    }

    /// Reads the greeting, then runs `qmp_capabilities`; returns the greeting.
    pub fn negotiate(&mut self) -> Result<Value, HarnessError> {
        let greeting = self.read_greeting()?;
        let reply = self.execute("qmp_capabilities", None)?;
        if reply.get("return") != Some(&serde_json::json!({})) {
            return Err(HarnessError::Unexpected {
                line: reply.to_string(),
                reason: "qmp_capabilities did not return {}".into(),
            });
        }
        Ok(greeting)
    }

    /// Sends `{"execute": command, "arguments": arguments, "id": <fresh>}` and returns the
    /// whole reply object (`return` or `error`). Events read meanwhile are kept for
    /// [`QmpConnection::take_events`].
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, HarnessError> {
        self.next_id += 1;
        let id = format!("harness-{}", self.next_id);
        let mut request = serde_json::Map::new();
        request.insert("execute".into(), Value::String(command.into()));
        if let Some(arguments) = arguments {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), Value::String(id.clone()));
        let mut bytes = Value::Object(request).to_string().into_bytes();
        bytes.push(b'\n');
        self.send(&bytes)?;
        loop {
            let message = self.read_message()?;
            if is_event(&message) {
                self.events.push(message);
                continue;
            }
            if message.get("id").and_then(Value::as_str) == Some(id.as_str()) {
                return Ok(message);
            }
            return Err(HarnessError::Unexpected {
                line: message.to_string(),
                reason: format!("expected the reply with id {id:?}"),
            });
        }
    }

    /// Like [`QmpConnection::execute`], but returns the `return` value and turns an `error`
    /// reply into [`HarnessError::Unexpected`].
    pub fn execute_ok(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, HarnessError> {
        let reply = self.execute(command, arguments)?;
        match reply.get("return") {
            Some(value) => Ok(value.clone()),
            None => Err(HarnessError::Unexpected {
                line: reply.to_string(),
                reason: format!("{command} failed"),
            }),
        }
    }

    /// The events received so far by [`QmpConnection::execute`], oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_crlf_and_non_ascii_bytes() {
        assert_eq!(printable(b"{}\r\n\x01\xff"), "{}\\r\\n\\x01\\xff");
    }

    #[test]
    fn parse_line_rejects_a_json_array() {
        assert!(matches!(
            parse_line(b"[1]\r\n"),
            Err(HarnessError::Unexpected { .. })
        ));
    }
}
