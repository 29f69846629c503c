//! The chardevs: what `--chardev` and `chardev-add` created, for `query-chardev`,
//! `chardev-add`, `chardev-remove` and the monitors' state.
//!
//! Runs in the supervisor on ids and addresses a QMP client sent. QEMU keeps chardevs
//! as children of a QOM container, so `query-chardev` lists them in the reverse
//! iteration order of a GLib hash table; [`KeySet`] reproduces that order.
//! bulkhead implements the `null` and Unix `socket` backends (server and client);
//! the other backends qsd has are refused with a message of ours, those it lacks with
//! qsd's text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bulkhead_qmp::qapi::ghash::KeySet;
use serde_json::{Map, Value, json};

use crate::supervisor::{QmpError, errors};

/// What a chardev is, as far as `query-chardev`'s `filename` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `null`.
    Null,
    /// `stdio`.
    Stdio,
    /// A Unix socket we listen on.
    UnixServer(PathBuf),
    /// A Unix socket we connect to.
    UnixClient(PathBuf),
    /// A listening socket inherited by descriptor.
    Fd,
}

/// Resources a chardev holds while nothing serves it (a `chardev-add`ed socket).
#[derive(Debug)]
pub enum Held {
    /// A listening socket (bound path removed with the chardev).
    Listener(std::os::unix::net::UnixListener),
    /// A connection.
    Stream(std::os::unix::net::UnixStream),
    /// A command-line chardev no monitor took (its listener or connection).
    Unused(Box<dyn std::fmt::Debug>),
}

#[derive(Debug)]
struct Entry {
    kind: Kind,
    /// A monitor is attached (`frontend-open`; `chardev-remove` says busy).
    monitor: bool,
    /// A peer is connected.
    connected: bool,
    _held: Option<Held>,
    /// Dropped with the entry: stops the task serving a `chardev-add`ed socket.
    _cancel: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Entry {
    fn filename(&self) -> String {
        let prefix = if self.connected { "" } else { "disconnected:" };
        match &self.kind {
            Kind::Null => "null".into(),
            Kind::Stdio => "stdio".into(),
            Kind::UnixServer(p) => format!("{prefix}unix:{},server=on", p.display()),
            Kind::UnixClient(p) => format!("{prefix}unix:{}", p.display()),
            Kind::Fd => format!("{prefix}fd,server=on"),
        }
    }
}

/// All chardevs.
#[derive(Debug, Default)]
pub struct ChardevTable {
    order: KeySet<String>,
    devs: HashMap<String, Entry>,
}

/// Backends qsd 10.0.2 has that bulkhead does not implement.
const QSD_ONLY: &[&str] = &[
    "file", "serial", "parallel", "pipe", "udp", "pty", "mux", "hub", "ringbuf", "memory",
];

fn strerror(e: &std::io::Error) -> String {
    e.raw_os_error()
        .map(crate::supervisor::strerror)
        .unwrap_or_else(|| e.to_string())
}

/// qsd's text when connecting a client socket fails.
pub fn connect_error(path: &Path, e: &std::io::Error) -> String {
    format!("Failed to connect to '{}': {}", path.display(), strerror(e))
}

/// qsd's text when binding a server socket fails.
pub fn bind_error(path: &Path, e: &std::io::Error) -> String {
    format!(
        "Failed to bind socket to {}: {}",
        path.display(),
        strerror(e)
    )
}

impl ChardevTable {
    /// Whether `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.devs.contains_key(id)
    }

    /// Adds a chardev (the caller checked the id is free).
    pub fn insert(&mut self, id: &str, kind: Kind, held: Option<Held>) {
        let connected =
            matches!(kind, Kind::Null | Kind::Stdio) || matches!(held, Some(Held::Stream(_)));
        self.order.insert(id.to_owned());
        self.devs.insert(
            id.to_owned(),
            Entry {
                kind,
                monitor: false,
                connected,
                _held: held,
                _cancel: None,
            },
        );
    }

    /// Gives `id` the resources of a command-line chardev no monitor took, so that
    /// `chardev-remove` releases them.
    pub fn hold(&mut self, id: &str, held: Box<dyn std::fmt::Debug>) {
        if let Some(e) = self.devs.get_mut(id) {
            e._held = Some(Held::Unused(held));
        }
    }

    /// Marks `id` as served by a monitor.
    pub fn attach_monitor(&mut self, id: &str) {
        if let Some(e) = self.devs.get_mut(id) {
            e.monitor = true;
        }
    }

    /// Records whether `id` has a peer.
    pub fn set_connected(&mut self, id: &str, connected: bool) {
        if let Some(e) = self.devs.get_mut(id) {
            e.connected = connected;
        }
    }

    /// `query-chardev`.
    pub fn query(&self) -> Value {
        let list: Vec<Value> = self
            .order
            .iter_order()
            .iter()
            .rev()
            .filter_map(|id| {
                self.devs.get(id.as_str()).map(
                    |e| json!({"frontend-open": e.monitor, "filename": e.filename(), "label": id}),
                )
            })
            .collect();
        Value::Array(list)
    }

    /// `chardev-remove`.
    pub fn remove(&mut self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
        let Some(entry) = self.devs.get(id) else {
            return Err(errors::chardev_not_found(id));
        };
        if entry.monitor {
            return Err(errors::chardev_busy(id));
        }
        if let Some(e) = self.devs.remove(id) {
            // QEMU unlinks a listening Unix socket's path when the chardev goes.
            if let Kind::UnixServer(p) = &e.kind
                && (e._held.is_some() || e._cancel.is_some())
            {
                let _ = std::fs::remove_file(p);
            }
        }
        self.order.remove(id);
        Ok(json!({}))
    }

    /// `chardev-add` (arguments already checked against the schema). A socket comes
    /// back as a [`Background`] for [`serve_unattached`] to run.
    pub fn add(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<(Value, Option<Background>), QmpError> {
        let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
        if self.contains(id) {
            return Err(errors::chardev_exists(id));
        }
        let failed = |why: String| errors::chardev_add_failed(id, &why);
        let backend = args.get("backend").cloned().unwrap_or(Value::Null);
        let kind = backend
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let data = backend.get("data").cloned().unwrap_or(Value::Null);
        if data.get("logfile").is_some() {
            return Err(failed("bulkhead does not support chardev log files".into()));
        }
        let (kind, held) = match kind {
            "null" => (Kind::Null, None),
            "socket" => add_socket(id, &data).map_err(failed)?,
            k if QSD_ONLY.contains(&k) || k == "stdio" => {
                return Err(failed(format!(
                    "bulkhead does not support chardev backend '{k}' in chardev-add"
                )));
            }
            k => {
                return Err(failed(format!("'{k}' is not a valid char driver name")));
            }
        };
        let connected = matches!(held, Some(Held::Stream(_)));
        self.insert(id, kind, None);
        self.set_connected(id, connected);
        let background = held.map(|held| {
            let (cancel, cancelled) = tokio::sync::oneshot::channel();
            if let Some(e) = self.devs.get_mut(id) {
                e._cancel = Some(cancel);
            }
            Background {
                id: id.to_owned(),
                held,
                cancelled,
            }
        });
        Ok((json!({}), background))
    }
}

fn add_socket(id: &str, data: &Value) -> Result<(Kind, Option<Held>), String> {
    let flag = |name: &str| data.get(name).and_then(Value::as_bool);
    // In QMP (unlike the command line) a socket listens unless told otherwise.
    let server = flag("server").unwrap_or(true);
    let reconnect = data.get("reconnect").and_then(Value::as_i64);
    let reconnect_ms = data.get("reconnect-ms").and_then(Value::as_i64);
    // qmp_chardev_validate_socket, in QEMU's order.
    if reconnect.is_some() && reconnect_ms.is_some() {
        return Err("'reconnect' and 'reconnect-ms' are mutually exclusive".into());
    }
    let addr = data.get("addr").cloned().unwrap_or(Value::Null);
    let addr_type = addr.get("type").and_then(Value::as_str).unwrap_or_default();
    if server {
        // qsd 10.0.2 checks only the deprecated `reconnect` here: a listener with
        // `reconnect-ms` is accepted (and the option ignored).
        if reconnect.is_some() {
            return Err(
                "'reconnect' option is incompatible with socket in server listen mode".into(),
            );
        }
    } else {
        if flag("websocket") == Some(true) {
            return Err(
                "'websocket' option is incompatible with socket in client connect mode".into(),
            );
        }
        if flag("wait").is_some() {
            return Err("'wait' option is incompatible with socket in client connect mode".into());
        }
    }
    if addr_type == "fd" {
        return Err("only QEMU supports file descriptor passing".into());
    }
    if addr_type != "unix" {
        return Err(format!(
            "bulkhead supports only Unix sockets for chardev-add, not '{addr_type}'"
        ));
    }
    let path = addr
        .get("data")
        .and_then(|d| d.get("path"))
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .unwrap_or_default();
    if server {
        if flag("wait") == Some(true) {
            // qsd would block all of QMP until a client connects.
            return Err("bulkhead does not support 'wait' in chardev-add".into());
        }
        // Replace a stale socket file, like QEMU.
        let _ = std::fs::remove_file(&path);
        let listener =
            std::os::unix::net::UnixListener::bind(&path).map_err(|e| bind_error(&path, &e))?;
        Ok((Kind::UnixServer(path), Some(Held::Listener(listener))))
    } else {
        match connect_nonblocking(&path) {
            Ok(s) => Ok((Kind::UnixClient(path), Some(Held::Stream(s)))),
            Err(e) if reconnect.unwrap_or(0) > 0 || reconnect_ms.unwrap_or(0) > 0 => {
                eprintln!(
                    "bulkhead: Unable to connect character device {id}: {}",
                    connect_error(&path, &e)
                );
                Ok((Kind::UnixClient(path), None))
            }
            Err(e) => Err(connect_error(&path, &e)),
        }
    }
}

/// A `chardev-add`ed socket no monitor uses, to be served by [`serve_unattached`].
#[derive(Debug)]
pub struct Background {
    id: String,
    held: Held,
    cancelled: tokio::sync::oneshot::Receiver<()>,
}

/// Keeps a `chardev-add`ed socket alive as qsd does for a chardev without a frontend:
/// a listener accepts one peer at a time, and `query-chardev` shows whether one is
/// connected. Whatever a peer sends is discarded. Ends when the chardev is removed.
pub async fn serve_unattached(
    table: std::rc::Rc<std::cell::RefCell<ChardevTable>>,
    bg: Background,
) {
    let Background {
        id,
        held,
        mut cancelled,
    } = bg;
    let set = |up: bool| table.borrow_mut().set_connected(&id, up);
    match held {
        Held::Listener(std) => {
            let listener = match std
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(std))
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(chardev = %id, error = %e, "cannot serve chardev");
                    return;
                }
            };
            loop {
                let stream = tokio::select! {
                    biased;
                    _ = &mut cancelled => return,
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                set(true);
                tokio::select! {
                    biased;
                    _ = &mut cancelled => return,
                    () = drain(stream) => {}
                }
                set(false);
            }
        }
        Held::Stream(std) => {
            let Ok(stream) = std
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(std))
            else {
                return;
            };
            tokio::select! {
                biased;
                _ = &mut cancelled => return,
                () = drain(stream) => {}
            }
            set(false);
        }
        Held::Unused(_) => {}
    }
}

/// Reads and discards until the peer leaves.
async fn drain(mut stream: tokio::net::UnixStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Connects to a Unix socket without ever blocking the supervisor (a full backlog
/// fails with EAGAIN instead of waiting).
pub fn connect_nonblocking(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = SocketAddrUnix::new(path)?;
    rustix::net::connect(&fd, &addr)?;
    Ok(std::os::unix::net::UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn add_remove_and_query_like_qsd() {
        let mut t = ChardevTable::default();
        t.insert("c0", Kind::UnixClient("/s".into()), None);
        t.attach_monitor("c0");
        t.set_connected("c0", true);
        let null = |id: &str| args(json!({"id": id, "backend": {"type": "null", "data": {}}}));
        assert!(t.add(&null("n0")).is_ok());
        assert_eq!(
            t.add(&null("c0")).map(|r| r.0).map_err(|e| e.desc),
            Err("Chardev with id 'c0' already exists".to_owned())
        );
        assert_eq!(
            t.add(&args(
                json!({"id": "v", "backend": {"type": "vc", "data": {}}})
            ))
            .map(|r| r.0)
            .map_err(|e| e.desc),
            Err("Failed to add chardev 'v': 'vc' is not a valid char driver name".to_owned())
        );
        assert_eq!(
            t.query(),
            json!([
                {"frontend-open": true, "filename": "unix:/s", "label": "c0"},
                {"frontend-open": false, "filename": "null", "label": "n0"},
            ])
        );
        assert_eq!(
            t.remove(&args(json!({"id": "c0"}))).map_err(|e| e.desc),
            Err("Chardev 'c0' is busy".to_owned())
        );
        assert_eq!(
            t.remove(&args(json!({"id": "zz"}))).map_err(|e| e.desc),
            Err("Chardev 'zz' not found".to_owned())
        );
        assert!(t.remove(&args(json!({"id": "n0"}))).is_ok());
        assert!(!t.contains("n0"));
    }
}
