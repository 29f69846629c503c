//! The QMP front: monitors (one per `--monitor`), their client sessions, and how
//! requests reach the supervisor.
//!
//! Runs in the supervisor and handles untrusted bytes from QMP clients. Each monitor
//! serves one client at a time, like a qsd chardev socket: a second client waits for
//! the first to leave, then gets a fresh greeting. A session parses the byte stream
//! with QEMU's JSON rules, checks the envelope and the negotiation state, validates
//! arguments against the QAPI schema, and only then asks the supervisor to act.

pub mod chardev;
pub mod gate;
pub mod output;
pub mod session;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::Addr;
use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use serde_json::Value;

use crate::events::EventBus;
use crate::supervisor::actor::SupervisorActor;

/// Renders one outgoing message as qsd writes it: compact or pretty JSON (whose line
/// breaks are already CRLF, as QEMU's monitor turns every LF into CRLF), then CRLF.
pub fn render(v: &Value, pretty: bool) -> Vec<u8> {
    let text = if pretty {
        bulkhead_qmp::json::to_string_pretty(v)
    } else {
        bulkhead_qmp::json::to_string(v)
    };
    let mut out = text.into_bytes();
    out.extend_from_slice(b"\r\n");
    out
}

/// Where a monitor talks to its clients.
#[derive(Debug)]
pub enum Chardev {
    /// A listening Unix socket we created at this path, with the first client if start-up
    /// already waited for it (`wait=on`).
    Socket(
        interprocess::local_socket::tokio::Listener,
        PathBuf,
        Option<interprocess::local_socket::tokio::Stream>,
    ),
    /// A listening Unix socket inherited as a descriptor (`fd=N`).
    Inherited(tokio::net::UnixListener),
    /// The daemon's standard input and output.
    Stdio,
    /// A Unix socket we connect to (`server=off`): the QMP client listens. `stream` is
    /// the connection start-up made; without one, connect every `reconnect` until it
    /// works. Like qsd, a client chardev serves one session: once the peer leaves, the
    /// monitor stays disconnected.
    Client {
        /// The socket path.
        path: PathBuf,
        /// The connection, if start-up made it.
        stream: Option<tokio::net::UnixStream>,
        /// The retry period while no connection is up.
        reconnect: Option<std::time::Duration>,
    },
    /// `null`: output goes nowhere, input never comes.
    Null,
}

impl Chardev {
    /// Binds a Unix socket server at `path`, replacing a stale socket file like QEMU.
    pub fn bind(path: PathBuf) -> std::io::Result<Chardev> {
        let name = path.as_path().to_fs_name::<GenericFilePath>()?;
        let listener = ListenerOptions::new()
            .name(name)
            .try_overwrite(true)
            .create_tokio()?;
        Ok(Chardev::Socket(listener, path, None))
    }
}

/// Everything a session needs to reach the rest of the supervisor.
#[derive(Clone)]
pub struct Front {
    /// The supervisor.
    pub supervisor: Addr<SupervisorActor>,
    /// The event bus.
    pub bus: Addr<EventBus>,
    /// Called after `quit` has been answered.
    pub quit: std::rc::Rc<dyn Fn()>,
    /// Becomes true once the workers are gone as the daemon exits: the connection
    /// that sent `quit` closes only then, as qsd's closes when its process exits, so
    /// a client that uses the images right after sees their locks released.
    pub stopped: tokio::sync::watch::Receiver<bool>,
    /// Every chardev, for `query-chardev`, `chardev-add` and `chardev-remove`.
    pub chardevs: std::rc::Rc<std::cell::RefCell<chardev::ChardevTable>>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front").finish_non_exhaustive()
    }
}

/// A client connection shared by a session's reader and its writer task.
/// (`&Stream` does the I/O, so sharing needs no lock.)
struct Shared(std::rc::Rc<interprocess::local_socket::tokio::Stream>);

impl tokio::io::AsyncRead for Shared {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Shared {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut &*self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut &*self.0).poll_shutdown(cx)
    }
}

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// Runs a monitor until its chardev closes: serves one client after another.
/// `label` is the chardev's id (its `query-chardev` entry shows the connection).
pub async fn run_monitor(chardev: Chardev, pretty: bool, front: Front, label: String) {
    let connected = |up: bool| front.chardevs.borrow_mut().set_connected(&label, up);
    match chardev {
        Chardev::Socket(listener, path, mut first) => loop {
            let next = match first.take() {
                Some(stream) => Ok(stream),
                None => listener.accept().await,
            };
            match next {
                Ok(stream) => {
                    let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
                    let stream = std::rc::Rc::new(stream);
                    let (r, w) = (Shared(std::rc::Rc::clone(&stream)), Shared(stream));
                    connected(true);
                    session::run(id, r, w, pretty, &front).await;
                    connected(false);
                }
                Err(e) => {
                    tracing::error!(socket = %path.display(), error = %e, "monitor accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        },
        Chardev::Inherited(listener) => loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
                    let (r, w) = stream.into_split();
                    connected(true);
                    session::run(id, r, w, pretty, &front).await;
                    connected(false);
                }
                Err(e) => {
                    tracing::error!(error = %e, "monitor accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        },
        Chardev::Stdio => {
            let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
            session::run(id, tokio::io::stdin(), tokio::io::stdout(), pretty, &front).await;
        }
        Chardev::Client {
            path,
            mut stream,
            reconnect,
        } => {
            let stream = loop {
                if let Some(s) = stream.take() {
                    break s;
                }
                let Some(period) = reconnect else { return };
                tokio::time::sleep(period).await;
                // Later failures are quiet: qsd reports only the first.
                stream = tokio::net::UnixStream::connect(&path).await.ok();
            };
            let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
            let (r, w) = stream.into_split();
            connected(true);
            session::run(id, r, w, pretty, &front).await;
            connected(false);
        }
        // The greeting goes nowhere and no request ever comes.
        Chardev::Null => {}
    }
}

#[cfg(test)]
mod tests {
    use super::render;
    use serde_json::json;

    #[test]
    fn pretty_messages_end_every_line_with_one_crlf_like_qsd() {
        let out = render(&json!({"return": {}}), true);
        assert_eq!(out, b"{\r\n    \"return\": {\r\n    }\r\n}\r\n");
        assert_eq!(
            render(&json!({"return": {}}), false),
            b"{\"return\": {}}\r\n"
        );
    }
}
