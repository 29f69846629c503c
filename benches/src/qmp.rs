//! A minimal blocking QMP client for setting up exports and timing round trips.
//!
//! Runs in the benchmark harness only, against daemons the harness started (qsd and
//! bulkhead). Replies are parsed as JSON and checked for `return`/`error`; events
//! between them are skipped. Every read has a timeout so a stuck daemon fails the run
//! instead of hanging it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::procs::{self, ProcError};

/// How long one QMP reply may take before the daemon counts as stuck.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected, read or written.
    #[error("QMP socket {0}")]
    Io(String, #[source] std::io::Error),
    /// The socket did not appear in time.
    #[error("QMP socket {0} did not accept a connection within {1:?}")]
    NotReady(String, Duration),
    /// The daemon closed the connection.
    #[error("QMP connection closed by the daemon")]
    Closed,
    /// A line was not a JSON object.
    #[error("QMP sent something that is not a JSON object: {0}")]
    NotJson(String),
    /// The greeting was not `{"QMP": ...}`.
    #[error("QMP greeting is not a greeting: {0}")]
    BadGreeting(String),
    /// The command failed.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// Command name.
        command: String,
        /// Error class.
        class: String,
        /// Error description.
        desc: String,
    },
    /// The daemon exited while the harness waited for its socket.
    #[error("the daemon exited: {0}")]
    Gone(String),
    /// The run was interrupted.
    #[error(transparent)]
    Proc(#[from] ProcError),
}

/// One QMP connection.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

/// Connects to `path`, retrying until it accepts or `limit` passes. `alive` is asked
/// between attempts so a daemon that died is reported at once instead of after the
/// timeout.
pub fn connect_when_ready(
    path: &Path,
    limit: Duration,
    mut alive: impl FnMut() -> Result<(), QmpError>,
) -> Result<UnixStream, QmpError> {
    let start = Instant::now();
    loop {
        procs::check_interrupted()?;
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(_) if start.elapsed() < limit => {
                alive()?;
                // Short, because start-up time to the greeting is measured with this.
                std::thread::sleep(Duration::from_micros(500));
            }
            Err(_) => return Err(QmpError::NotReady(path.display().to_string(), limit)),
        }
    }
}

impl Qmp {
    /// Wraps a connected stream and reads the greeting; returns it as well.
    pub fn greet(stream: UnixStream) -> Result<(Qmp, Value), QmpError> {
        let io = |e| QmpError::Io("setup".to_owned(), e);
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            line: String::new(),
        };
        let greeting = qmp.read_object()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::BadGreeting(greeting.to_string()));
        }
        Ok((qmp, greeting))
    }

    /// Connects, reads the greeting and negotiates capabilities.
    pub fn open(
        path: &Path,
        limit: Duration,
        alive: impl FnMut() -> Result<(), QmpError>,
    ) -> Result<Qmp, QmpError> {
        let mut alive = alive;
        let mut attempt = 0;
        loop {
            let stream = connect_when_ready(path, limit, &mut alive)?;
            let (mut qmp, _) = Qmp::greet(stream)?;
            match qmp.execute("qmp_capabilities", None) {
                Ok(_) => return Ok(qmp),
                // Seen once from qsd on a connection made the instant its socket
                // appeared ("JSON parse error, expected separator in dict" for a
                // well-formed command): a fresh connection negotiates fine, and one
                // odd reply should not end a run of many minutes.
                Err(QmpError::Command { desc, .. }) if attempt < 2 => {
                    eprintln!(
                        "bulkhead-bench: {}: qmp_capabilities refused ({desc}); reconnecting",
                        path.display()
                    );
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn read_object(&mut self) -> Result<Value, QmpError> {
        self.line.clear();
        let n = self
            .reader
            .read_line(&mut self.line)
            .map_err(|e| QmpError::Io("read".to_owned(), e))?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        match serde_json::from_str::<Value>(&self.line) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(QmpError::NotJson(self.line.trim_end().to_owned())),
        }
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| QmpError::Io("write".to_owned(), e))?;
        loop {
            let mut v = self.read_object()?;
            if let Some(r) = v.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = v.get("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            // Anything else is an event; the benchmark does not need them.
        }
    }
}
