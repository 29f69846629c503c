//! The NBD server object: the export table, connection limits, listeners and
//! removal of exports.
//!
//! Runs in the NBD export worker process, inside its tokio runtime. The supervisor's
//! commands (`block-export-add`, `block-export-del`, `nbd-server-stop`) arrive at
//! the worker, which calls [`NbdServer::add_export`], [`NbdServer::remove_export`]
//! and [`NbdServer::shutdown`]. Sockets come from listeners the supervisor handed
//! over or as already-accepted streams. This module handles no client bytes itself;
//! each accepted connection is handed to the handshake and transmission code.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bulkhead_block::BlockIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::proto::{
    MAX_STRING_SIZE, TF_CAN_MULTI_CONN, TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_CACHE,
    TF_SEND_FAST_ZERO, TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES,
};

/// Pause after a failed accept, so a persistent failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Server-wide settings, fixed for the server's life (qsd's `nbd-server-start`
/// arguments that matter on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Most simultaneous connections (handshaking or attached); 0 means unlimited.
    /// Like qsd, connections beyond the limit wait in the listen backlog (or, for
    /// handed-in streams, before the greeting) until a slot frees up. A limit of 1
    /// also drops `NBD_FLAG_CAN_MULTI_CONN` from every export.
    pub max_connections: u32,
    /// Seconds a client may take from connect to the end of option negotiation
    /// before it is dropped; 0 means no limit (qsd's `handshake-max-seconds`).
    pub handshake_max_seconds: u32,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 100,
            handshake_max_seconds: 10,
        }
    }
}

/// One export's settings (qsd's `BlockExportOptionsNbd` minus bitmaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// The NBD export name clients ask for (at most 4096 bytes).
    pub name: String,
    /// Free-form description sent in LIST and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Whether clients may write.
    pub writable: bool,
    /// Whether the `qemu:allocation-depth` meta context is offered.
    pub allocation_depth: bool,
}

/// How [`NbdServer::remove_export`] treats connected clients (qsd's
/// `BlockExportRemoveMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while any client is attached to the export.
    Safe,
    /// Drop every attached client at once; their in-flight and later requests fail.
    Hard,
}

/// Why an export could not be added or removed. The texts are qsd's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// Another export already has this NBD name.
    #[error("NBD server already has export named '{0}'")]
    DuplicateName(String),
    /// The name exceeds 4096 bytes.
    #[error("export name '{0}' too long")]
    NameTooLong(String),
    /// The description exceeds 4096 bytes.
    #[error("description '{0}' too long")]
    DescriptionTooLong(String),
    /// A writable export was asked of a read-only node.
    #[error("Cannot export read-only node as writable")]
    ReadOnlyNode,
    /// No export has this name.
    #[error("Export '{0}' is not found")]
    NotFound(String),
    /// Safe removal while clients are attached. qsd names the export by its QMP id
    /// in this text; the caller should substitute the id if it differs.
    #[error("export '{0}' still in use")]
    InUse(String),
    /// The server is shutting down.
    #[error("NBD server is shutting down")]
    ShuttingDown,
}

/// An export as the connections see it. Immutable apart from its counters.
pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    /// Size offered to clients: the node size rounded down to 512, as qsd does.
    pub(crate) size: u64,
    /// Transmission flags before the per-client DF and BLOCK_STAT_PAYLOAD bits.
    pub(crate) flags: u16,
    pub(crate) allocation_depth: bool,
    pub(crate) backend: Arc<dyn BlockIo>,
    /// Number of attached clients; watched by deferred deletes.
    clients: watch::Sender<usize>,
    /// Set once on hard removal (or server shutdown); attached connections stop.
    closing: watch::Sender<bool>,
    /// Bytes of request buffers all its connections may hold at once
    /// ([`EXPORT_BUFFER_BYTES`]): a request waits for its share before its payload is
    /// read, so many clients cannot make the worker allocate without bound.
    pub(crate) memory: Arc<Semaphore>,
}

/// Request buffer memory one export's connections may hold together.
pub const EXPORT_BUFFER_BYTES: usize = 256 * 1024 * 1024;

impl Export {
    pub(crate) fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }
}

/// A client's hold on an export: counted from a successful GO/EXPORT_NAME until
/// the connection and all its requests are finished.
pub(crate) struct ExportClient {
    pub(crate) export: Arc<Export>,
}

impl ExportClient {
    fn new(export: Arc<Export>) -> ExportClient {
        export.clients.send_modify(|n| *n += 1);
        ExportClient { export }
    }
}

impl Drop for ExportClient {
    fn drop(&mut self) {
        self.export
            .clients
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resolves once the last client of a removed export has gone, so a deferred
/// delete (qsd's `BLOCK_EXPORT_DELETED` after a hard `block-export-del`) can
/// complete and the node can be released.
#[derive(Debug)]
pub struct ExportRemoval {
    clients: watch::Receiver<usize>,
}

impl ExportRemoval {
    /// Whether no client is attached any more.
    pub fn is_finished(&self) -> bool {
        *self.clients.borrow() == 0
    }

    /// Waits until no client is attached any more (at once if none was).
    pub async fn finished(mut self) {
        // An error means the export's sender is gone, i.e. the export and all
        // its clients were dropped: also finished.
        let _ = self.clients.wait_for(|n| *n == 0).await;
    }
}

/// State shared by the server handle, the listeners and every connection.
/// Receives the lines qsd prints on stderr about clients (failed negotiations,
/// disconnects), without the program name.
pub type Reporter = Arc<dyn Fn(&str) + Send + Sync>;

pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    report: Option<Reporter>,
    exports: Mutex<Vec<Arc<Export>>>,
    conn_limit: Option<Arc<Semaphore>>,
    connections: watch::Sender<usize>,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    /// Reports one line about a client, if the server was asked to.
    pub(crate) fn report(&self, line: &str) {
        if let Some(report) = &self.report {
            report(line);
        }
    }

    fn exports(&self) -> MutexGuard<'_, Vec<Arc<Export>>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn find(&self, name: &[u8]) -> Option<Arc<Export>> {
        self.exports()
            .iter()
            .find(|e| e.name.as_bytes() == name)
            .cloned()
    }

    /// Finds an export and attaches a client to it under the table lock, so that a
    /// concurrent safe removal either sees the client or the client sees no export.
    pub(crate) fn attach(&self, name: &[u8]) -> Option<ExportClient> {
        let table = self.exports();
        let export = table.iter().find(|e| e.name.as_bytes() == name)?;
        Some(ExportClient::new(export.clone()))
    }

    /// (name, description) of every export, oldest first, for NBD_OPT_LIST.
    pub(crate) fn list(&self) -> Vec<(String, Option<String>)> {
        self.exports()
            .iter()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn handshake_limit(&self) -> Option<Duration> {
        match self.config.handshake_max_seconds {
            0 => None,
            s => Some(Duration::from_secs(u64::from(s))),
        }
    }
}

/// Counts a live connection for [`NbdServer::shutdown`] and holds its slot under
/// `max_connections`.
pub(crate) struct ConnectionSlot {
    shared: Arc<Shared>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shared
            .connections
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The NBD server. Cheap to clone; all clones are the same server.
#[derive(Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// Creates a server with no exports and no listeners.
    pub fn new(config: ServerConfig) -> NbdServer {
        NbdServer::build(config, None)
    }

    /// A server that reports client failures as qsd does on stderr, through `report`.
    pub fn reporting(config: ServerConfig, report: Reporter) -> NbdServer {
        NbdServer::build(config, Some(report))
    }

    fn build(config: ServerConfig, report: Option<Reporter>) -> NbdServer {
        let conn_limit = match config.max_connections {
            0 => None,
            n => Some(Arc::new(Semaphore::new(n as usize))),
        };
        NbdServer {
            shared: Arc::new(Shared {
                config,
                report,
                exports: Mutex::new(Vec::new()),
                conn_limit,
                connections: watch::Sender::new(0),
                shutdown: watch::Sender::new(false),
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn shared_for_tests(&self) -> &Shared {
        &self.shared
    }

    /// The configuration the server was created with.
    pub fn config(&self) -> ServerConfig {
        self.shared.config
    }

    /// Adds an export. Its size is taken from `backend` now (qsd forbids resizing an
    /// exported node) and rounded down to a multiple of 512.
    pub fn add_export(
        &self,
        config: ExportConfig,
        backend: Arc<dyn BlockIo>,
    ) -> Result<(), ExportError> {
        if *self.shared.shutdown.borrow() {
            return Err(ExportError::ShuttingDown);
        }
        if config.name.len() > MAX_STRING_SIZE {
            return Err(ExportError::NameTooLong(config.name));
        }
        if let Some(d) = &config.description
            && d.len() > MAX_STRING_SIZE
        {
            return Err(ExportError::DescriptionTooLong(d.clone()));
        }
        if config.writable && backend.read_only() {
            return Err(ExportError::ReadOnlyNode);
        }
        let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
        if self.shared.config.max_connections != 1 {
            flags |= TF_CAN_MULTI_CONN;
        }
        if config.writable {
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        } else {
            flags |= TF_READ_ONLY;
        }
        let export = Arc::new(Export {
            size: backend.size() & !511,
            name: config.name,
            description: config.description,
            flags,
            allocation_depth: config.allocation_depth,
            backend,
            clients: watch::Sender::new(0),
            closing: watch::Sender::new(false),
            memory: Arc::new(Semaphore::new(EXPORT_BUFFER_BYTES)),
        });
        let mut table = self.shared.exports();
        if table.iter().any(|e| e.name == export.name) {
            return Err(ExportError::DuplicateName(export.name.clone()));
        }
        table.push(export);
        Ok(())
    }

    /// Removes an export so that no new client can reach it. In [`RemoveMode::Safe`]
    /// this fails with [`ExportError::InUse`] while clients are attached (the export
    /// then stays). In [`RemoveMode::Hard`] attached clients are disconnected; the
    /// returned [`ExportRemoval`] resolves once they and their requests are gone.
    pub fn remove_export(
        &self,
        name: &str,
        mode: RemoveMode,
    ) -> Result<ExportRemoval, ExportError> {
        let mut table = self.shared.exports();
        let pos = table
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| ExportError::NotFound(name.to_owned()))?;
        if mode == RemoveMode::Safe && *table[pos].clients.borrow() > 0 {
            return Err(ExportError::InUse(name.to_owned()));
        }
        let export = table.remove(pos);
        drop(table);
        export.closing.send_replace(true);
        Ok(ExportRemoval {
            clients: export.clients.subscribe(),
        })
    }

    /// Names of the exports, oldest first.
    pub fn export_names(&self) -> Vec<String> {
        self.shared
            .exports()
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// Number of clients attached to an export, or `None` if there is no such export.
    pub fn client_count(&self, name: &str) -> Option<usize> {
        self.shared
            .exports()
            .iter()
            .find(|e| e.name == name)
            .map(|e| *e.clients.borrow())
    }

    /// Number of open connections (handshaking or attached).
    pub fn connection_count(&self) -> usize {
        *self.shared.connections.borrow()
    }

    /// Waits for room under `max_connections`; `None` once the server shuts
    /// down. The permit is taken before accepting, so that (like qsd) excess
    /// clients wait in the listen backlog.
    async fn permit(&self) -> Option<Option<OwnedSemaphorePermit>> {
        let mut shutdown = self.shared.shutdown_signal();
        if *shutdown.borrow() {
            return None;
        }
        match &self.shared.conn_limit {
            None => Some(None),
            Some(sem) => tokio::select! {
                _ = signalled(&mut shutdown) => None,
                p = sem.clone().acquire_owned() => Some(Some(p.ok()?)),
            },
        }
    }

    /// Counts an accepted connection.
    fn slot(&self, permit: Option<OwnedSemaphorePermit>) -> ConnectionSlot {
        self.shared.connections.send_modify(|n| *n += 1);
        ConnectionSlot {
            shared: self.shared.clone(),
            _permit: permit,
        }
    }

    /// Accepts and serves connections from a Unix listener until
    /// [`NbdServer::shutdown`]. Like qsd, it stops accepting while
    /// `max_connections` connections are open. Accept failures (for example
    /// running out of descriptors) are logged and retried after a pause.
    pub async fn serve_unix_listener(&self, listener: UnixListener) {
        self.accept_loop(|| listener.accept(), |(stream, _)| stream.into_split())
            .await;
    }

    /// Accepts and serves connections from a TCP listener until
    /// [`NbdServer::shutdown`]; see [`NbdServer::serve_unix_listener`].
    pub async fn serve_tcp_listener(&self, listener: TcpListener) {
        self.accept_loop(
            || listener.accept(),
            |(stream, _)| {
                // Small replies must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                stream.into_split()
            },
        )
        .await;
    }

    /// The accept loop of both listener kinds: `accept` yields a connection, `split`
    /// turns it into the halves a connection task reads and writes.
    async fn accept_loop<C, Fut, R, W>(
        &self,
        mut accept: impl FnMut() -> Fut,
        split: impl Fn(C) -> (R, W),
    ) where
        Fut: std::future::Future<Output = std::io::Result<C>>,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut shutdown = self.shared.shutdown_signal();
        // Accept failures in a row. Out of descriptors (EMFILE), the pending client
        // stays in the backlog and the listener stays readable: retrying at once
        // would spin, so we pause, and log once per run of failures.
        let mut failures: u64 = 0;
        loop {
            let Some(permit) = self.permit().await else {
                return;
            };
            let conn = tokio::select! {
                _ = signalled(&mut shutdown) => return,
                r = accept() => match r {
                    Ok(conn) => conn,
                    Err(e) => {
                        if failures == 0 {
                            tracing::warn!("NBD accept failed, retrying every {ACCEPT_RETRY:?}: {e}");
                        }
                        failures += 1;
                        drop(permit);
                        tokio::select! {
                            _ = signalled(&mut shutdown) => return,
                            _ = tokio::time::sleep(ACCEPT_RETRY) => {}
                        }
                        continue;
                    }
                },
            };
            if failures > 0 {
                tracing::warn!("NBD accept works again after {failures} failed attempts");
                failures = 0;
            }
            let slot = self.slot(permit);
            let (r, w) = split(conn);
            tokio::spawn(crate::conn::run(self.shared.clone(), slot, r, w));
        }
    }

    /// Serves one already-accepted Unix connection; returns when it ends.
    pub async fn serve_unix_stream(&self, stream: UnixStream) {
        let Some(permit) = self.permit().await else {
            return;
        };
        let slot = self.slot(permit);
        let (r, w) = stream.into_split();
        crate::conn::run(self.shared.clone(), slot, r, w).await;
    }

    /// Serves one already-accepted TCP connection; returns when it ends.
    pub async fn serve_tcp_stream(&self, stream: TcpStream) {
        let Some(permit) = self.permit().await else {
            return;
        };
        let slot = self.slot(permit);
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        crate::conn::run(self.shared.clone(), slot, r, w).await;
    }

    /// Serves one connection over any byte stream (for example a TLS session or a
    /// test pipe); returns when it ends.
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let Some(permit) = self.permit().await else {
            return;
        };
        let slot = self.slot(permit);
        let (r, w) = tokio::io::split(stream);
        crate::conn::run(self.shared.clone(), slot, r, w).await;
    }

    /// Stops the listeners, drops every export and connection (like a hard removal
    /// of each export), and waits until all connections have ended.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let exports: Vec<Arc<Export>> = std::mem::take(&mut *self.shared.exports());
        for e in &exports {
            e.closing.send_replace(true);
        }
        let mut conns = self.shared.connections.subscribe();
        let _ = conns.wait_for(|n| *n == 0).await;
    }
}

/// Waits until a stop flag is set (or its sender is gone). Returns `()` so that
/// no `!Send` watch guard lives on in a `select!` arm.
pub(crate) async fn signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemBackend;

    fn cfg(name: &str, writable: bool) -> ExportConfig {
        ExportConfig {
            name: name.to_owned(),
            description: None,
            writable,
            allocation_depth: false,
        }
    }

    #[tokio::test]
    async fn export_flags_match_qsd_for_writable_and_read_only_exports() {
        let s = NbdServer::new(ServerConfig::default());
        s.add_export(cfg("w", true), MemBackend::new(4096)).unwrap();
        s.add_export(cfg("r", false), MemBackend::new(4096))
            .unwrap();
        // qsd advertises 0x1ded / 0x158f with DF and BLOCK_STAT_PAYLOAD added per
        // client; without them the bases are 0xd6d and 0x50f.
        assert_eq!(s.shared.find(b"w").unwrap().flags, 0x0d6d);
        assert_eq!(s.shared.find(b"r").unwrap().flags, 0x050f);
    }

    #[tokio::test]
    async fn one_connection_limit_drops_multi_conn() {
        let s = NbdServer::new(ServerConfig {
            max_connections: 1,
            handshake_max_seconds: 10,
        });
        s.add_export(cfg("w", true), MemBackend::new(4096)).unwrap();
        assert_eq!(s.shared.find(b"w").unwrap().flags, 0x0c6d);
    }

    #[tokio::test]
    async fn export_size_is_rounded_down_to_512() {
        let s = NbdServer::new(ServerConfig::default());
        s.add_export(cfg("w", true), MemBackend::new(1000)).unwrap();
        assert_eq!(s.shared.find(b"w").unwrap().size, 512);
    }

    #[tokio::test]
    async fn add_export_errors_use_qsd_texts() {
        let s = NbdServer::new(ServerConfig::default());
        s.add_export(cfg("a", true), MemBackend::new(4096)).unwrap();
        let e = s
            .add_export(cfg("a", true), MemBackend::new(4096))
            .unwrap_err();
        assert_eq!(e.to_string(), "NBD server already has export named 'a'");
        let long = "x".repeat(4097);
        let e = s
            .add_export(cfg(&long, true), MemBackend::new(4096))
            .unwrap_err();
        assert_eq!(e.to_string(), format!("export name '{long}' too long"));
        let e = s
            .add_export(cfg("ro", true), MemBackend::read_only(4096))
            .unwrap_err();
        assert_eq!(e.to_string(), "Cannot export read-only node as writable");
    }

    #[tokio::test]
    async fn safe_removal_is_refused_while_a_client_is_attached() {
        let s = NbdServer::new(ServerConfig::default());
        s.add_export(cfg("a", true), MemBackend::new(4096)).unwrap();
        let client = s.shared.attach(b"a").unwrap();
        let e = s.remove_export("a", RemoveMode::Safe).unwrap_err();
        assert_eq!(e.to_string(), "export 'a' still in use");
        assert_eq!(s.export_names(), vec!["a".to_owned()]);
        let removal = s.remove_export("a", RemoveMode::Hard).unwrap();
        assert!(!removal.is_finished());
        assert!(s.shared.find(b"a").is_none());
        drop(client);
        removal.finished().await;
        let e = s.remove_export("a", RemoveMode::Hard).unwrap_err();
        assert_eq!(e.to_string(), "Export 'a' is not found");
    }
}
