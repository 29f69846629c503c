//! The NBD server object: the export table, connection limits, listeners and
//! removal of exports.
//!
//! Runs in the NBD export worker process, inside its tokio runtime. The supervisor's
//! commands (`block-export-add`, `block-export-del`, `nbd-server-stop`) arrive at
//! the worker, which calls [`NbdServer::add_export`], [`NbdServer::remove_export`]
//! and [`NbdServer::shutdown`]. Sockets come from listeners the supervisor handed
//! over or as already-accepted streams. This module handles no client bytes itself;
//! each accepted connection is handed to the handshake and transmission code.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bulkhead_block::BlockIo;
use bulkhead_export::{Attachment, Lifecycle, Removal};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use crate::handoff::{HandOff, HandOffHook, MetadataOnly};
use crate::handshake::{BitmapSet, Contexts, Session};
use crate::proto::{
    MAX_STRING_SIZE, TF_CAN_MULTI_CONN, TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_CACHE,
    TF_SEND_FAST_ZERO, TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES,
};

/// Pause after a failed accept, so a persistent failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Most clients negotiating (or waiting for a `max-connections` slot) at once.
pub const NEGOTIATING_MAX: usize = 1024;
/// How long the accept loop waits for a client it dropped to make room for a
/// descriptor to close before it tries again.
const EVICTION_WAIT: Duration = Duration::from_secs(1);
/// Out of descriptors, only a negotiating client idle this long is dropped for a
/// new one. accept(2) fails with EMFILE whether or not a client is pending, so a
/// fresh client (a real one, mid-negotiation) must not be dropped on a guess.
const EVICTABLE_IDLE_MS: u64 = 1000;

/// Server-wide settings, fixed for the server's life (qsd's `nbd-server-start`
/// arguments that matter on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Most clients past negotiation at once; 0 means unlimited. Unlike qsd, clients
    /// still negotiating take no slot (they have their own bound, see
    /// [`NEGOTIATING_MAX`]): a client that finishes negotiation while every slot is
    /// taken waits before the final reply until one frees up. A limit of 1 also
    /// drops `NBD_FLAG_CAN_MULTI_CONN` from every export.
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

/// Most dirty bitmaps one export offers. qsd has no limit of its own; ours keeps
/// a request's selection a fixed-size set (no allocation per request) and bounds
/// what a hand-off may carry. Far beyond what anyone exports.
pub const MAX_EXPORT_BITMAPS: usize = 256;

/// Longest bitmap name (QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`): the context name,
/// `qemu:dirty-bitmap:` and this, stays well within an NBD string.
pub const MAX_BITMAP_NAME: usize = 1023;

/// A dirty bitmap an export offers as `qemu:dirty-bitmap:NAME`.
pub trait DirtyRuns: Send + Sync {
    /// `[offset, offset + len)` clipped to the bitmap's size, as runs `(length, dirty)`
    /// that tile it, adjacent runs of the same kind merged.
    ///
    /// Called from the connection's task for every BLOCK_STATUS chunk of this
    /// bitmap, on windows of at most [`BITMAP_WINDOW`] bytes (so one call's vector
    /// stays small whatever the request's length); must not block for long.
    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)>;
}

/// Most bytes of a bitmap asked of [`DirtyRuns::runs`] at once: even at the
/// finest granularity (512 bytes) that is at most 128 Ki runs (2 MiB).
pub const BITMAP_WINDOW: u64 = 64 << 20;

/// One bitmap of an export: its name (without the `qemu:dirty-bitmap:` prefix)
/// and where its bits are read.
#[derive(Clone)]
pub struct ExportBitmap {
    /// The bitmap's name, at most [`MAX_BITMAP_NAME`] bytes.
    pub name: String,
    /// The bits.
    pub source: Arc<dyn DirtyRuns>,
}

impl std::fmt::Debug for ExportBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportBitmap")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Same name and the same bits (the same source object).
impl PartialEq for ExportBitmap {
    fn eq(&self, other: &ExportBitmap) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.source, &other.source)
    }
}

impl Eq for ExportBitmap {}

/// One export's settings (qsd's `BlockExportOptionsNbd`).
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
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts, in the order
    /// of the export's `bitmaps` option (the order of replies and context ids);
    /// at most [`MAX_EXPORT_BITMAPS`].
    pub bitmaps: Vec<ExportBitmap>,
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
    /// A handed-over connection's state is not one negotiation can produce for the
    /// export (oversized, or a context the export does not offer).
    #[error("invalid hand-off for export '{0}'")]
    BadHandOff(String),
    /// More bitmaps than [`MAX_EXPORT_BITMAPS`] (a limit of ours, not qsd's).
    #[error("export '{0}' has more than {MAX_EXPORT_BITMAPS} bitmaps")]
    TooManyBitmaps(String),
    /// A bitmap name over [`MAX_BITMAP_NAME`] bytes (qsd's text for such a name).
    #[error("Bitmap name too long: {0}")]
    BitmapNameTooLong(String),
}

/// An export as the connections see it: the NBD part (name, description, flags,
/// contexts) and the part every front shares ([`Lifecycle`]: attached clients,
/// closing flag, buffer budget).
pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    /// Size offered to clients: the node size rounded down to 512, as qsd does.
    pub(crate) size: u64,
    /// Transmission flags before the per-client DF and BLOCK_STAT_PAYLOAD bits.
    pub(crate) flags: u16,
    pub(crate) allocation_depth: bool,
    /// Offered as `qemu:dirty-bitmap:NAME`, context id 2 + index.
    pub(crate) bitmaps: Vec<ExportBitmap>,
    pub(crate) backend: Arc<dyn BlockIo>,
    pub(crate) life: Lifecycle,
}

/// Request buffer memory one export's connections may hold together.
pub use bulkhead_export::EXPORT_BUFFER_BYTES;

impl AsRef<Lifecycle> for Export {
    fn as_ref(&self) -> &Lifecycle {
        &self.life
    }
}

impl Export {
    pub(crate) fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.life.closing()
    }
}

/// A client's hold on an export: counted from a successful GO/EXPORT_NAME until
/// the connection and all its requests are finished.
pub(crate) type ExportClient = Attachment<Export>;

/// Resolves once the last client of a removed export has gone (the generic
/// [`Removal`]).
pub type ExportRemoval = Removal;

/// State shared by the server handle, the listeners and every connection.
/// Receives the lines qsd prints on stderr about clients (failed negotiations,
/// disconnects), without the program name.
pub type Reporter = Arc<dyn Fn(&str) + Send + Sync>;

pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    report: Option<Reporter>,
    exports: Mutex<Vec<Arc<Export>>>,
    conn_limit: Option<Arc<Semaphore>>,
    negotiating: Mutex<Negotiating>,
    /// Zero point of [`Negotiator::last_active`].
    epoch: Instant,
    connections: watch::Sender<usize>,
    shutdown: watch::Sender<bool>,
    /// Set on a listener that only negotiates: where negotiated clients go.
    hand_off: OnceLock<HandOffHook>,
}

/// Clients from accept until they hold a `max-connections` slot, bounded: when full,
/// a new client makes room by dropping the one idle longest, so a flood of sockets
/// that never negotiate cannot lock out a real client.
struct Negotiating {
    limit: usize,
    next_id: u64,
    clients: HashMap<u64, Arc<Negotiator>>,
}

/// One client in [`Negotiating`].
pub(crate) struct Negotiator {
    id: u64,
    /// When the client last sent a byte, in milliseconds after `Shared::epoch`.
    last_active: AtomicU64,
    /// Negotiation is over; the client waits for a `max-connections` slot. Such
    /// clients are dropped for room only when nobody is still negotiating.
    waiting: AtomicBool,
    /// Notified when the client is dropped for room.
    evict: Notify,
    /// Notified when its connection has ended and its descriptor is closed.
    gone: Notify,
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
        Some(Attachment::new(export.clone()))
    }

    /// (name, description) of every export, oldest first, for NBD_OPT_LIST.
    pub(crate) fn list(&self) -> Vec<(String, Option<String>)> {
        self.exports()
            .iter()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }

    /// Whether negotiated clients are handed off instead of served here.
    pub(crate) fn hands_off(&self) -> bool {
        self.hand_off.get().is_some()
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Milliseconds since the server started.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn negotiating(&self) -> MutexGuard<'_, Negotiating> {
        // Every update leaves the map consistent, even one cut short by a panic.
        self.negotiating.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a `max-connections` slot; `None` once the server shuts down.
    pub(crate) async fn admission(&self) -> Option<Option<OwnedSemaphorePermit>> {
        let mut shutdown = self.shutdown_signal();
        if *shutdown.borrow() {
            return None;
        }
        match &self.conn_limit {
            None => Some(None),
            Some(sem) => tokio::select! {
                _ = signalled(&mut shutdown) => None,
                p = sem.clone().acquire_owned() => Some(Some(p.ok()?)),
            },
        }
    }

    pub(crate) fn handshake_limit(&self) -> Option<Duration> {
        match self.config.handshake_max_seconds {
            0 => None,
            s => Some(Duration::from_secs(u64::from(s))),
        }
    }
}

/// Counts a live connection for [`NbdServer::shutdown`]; keeps it in the bounded set
/// of negotiating clients until it is admitted, then holds its `max-connections` slot.
/// Dropped after the connection's socket (see `conn::run`).
pub(crate) struct ConnectionSlot {
    shared: Arc<Shared>,
    negotiator: Arc<Negotiator>,
    /// Still in the negotiating set.
    listed: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl ConnectionSlot {
    /// Notes that the client sent something (it is not idle).
    pub(crate) fn touch(&self) {
        self.negotiator
            .last_active
            .store(self.shared.now_ms(), Ordering::Relaxed);
    }

    /// Resolves if the client is dropped to make room for another.
    pub(crate) async fn evicted(&self) {
        self.negotiator.evict.notified().await;
    }

    /// Negotiation is over: the client now waits for a `max-connections` slot.
    pub(crate) fn waiting(&self) {
        self.negotiator.waiting.store(true, Ordering::Relaxed);
        self.touch();
    }

    /// The client got its slot: it leaves the negotiating set.
    pub(crate) fn admitted(&mut self, permit: Option<OwnedSemaphorePermit>) {
        self.leave();
        self._permit = permit;
    }

    fn leave(&mut self) {
        if std::mem::take(&mut self.listed) {
            self.shared
                .negotiating()
                .clients
                .remove(&self.negotiator.id);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.leave();
        self.negotiator.gone.notify_one();
        self.shared
            .connections
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Negotiating {
    /// Takes the client idle longest out of the set and tells it to go: among those
    /// still negotiating, or (if `waiting_too`) among those waiting for a slot when
    /// nobody is negotiating; only one idle since `idle_since` ms or earlier.
    fn evict(&mut self, waiting_too: bool, idle_since: u64) -> Option<Arc<Negotiator>> {
        let victim = self
            .clients
            .values()
            .filter(|n| waiting_too || !n.waiting.load(Ordering::Relaxed))
            .filter(|n| n.last_active.load(Ordering::Relaxed) <= idle_since)
            .min_by_key(|n| {
                (
                    n.waiting.load(Ordering::Relaxed),
                    n.last_active.load(Ordering::Relaxed),
                    n.id,
                )
            })
            .map(|n| n.id)?;
        let victim = self.clients.remove(&victim)?;
        victim.evict.notify_one();
        Some(victim)
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
                negotiating: Mutex::new(Negotiating {
                    limit: NEGOTIATING_MAX,
                    next_id: 0,
                    clients: HashMap::new(),
                }),
                epoch: Instant::now(),
                connections: watch::Sender::new(0),
                shutdown: watch::Sender::new(false),
                hand_off: OnceLock::new(),
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
        if config.bitmaps.len() > MAX_EXPORT_BITMAPS {
            return Err(ExportError::TooManyBitmaps(config.name));
        }
        if let Some(b) = config
            .bitmaps
            .iter()
            .find(|b| b.name.len() > MAX_BITMAP_NAME)
        {
            return Err(ExportError::BitmapNameTooLong(b.name.clone()));
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
            bitmaps: config.bitmaps,
            backend,
            life: Lifecycle::new(),
        });
        let mut table = self.shared.exports();
        if table.iter().any(|e| e.name == export.name) {
            return Err(ExportError::DuplicateName(export.name.clone()));
        }
        table.push(export);
        Ok(())
    }

    /// Adds an export that negotiation can offer but that serves no I/O (a
    /// listener that hands its clients off): `size` and the config are all it has.
    /// Its bitmaps' names are offered; their sources are never read.
    pub fn add_metadata_export(&self, config: ExportConfig, size: u64) -> Result<(), ExportError> {
        let read_only = !config.writable;
        self.add_export(config, Arc::new(MetadataOnly { size, read_only }))
    }

    /// Makes this server a listener that only negotiates: every client that
    /// finishes negotiation goes to `hook` with its socket, instead of being served
    /// here. Must be set before the first client is accepted; set once.
    pub fn set_hand_off(&self, hook: HandOffHook) {
        let _ = self.shared.hand_off.set(hook);
    }

    /// Takes over a Unix connection another server negotiated (see
    /// [`NbdServer::set_hand_off`]) and serves it.
    pub fn adopt_unix(&self, stream: UnixStream, hand: HandOff) -> Result<(), ExportError> {
        let (r, w) = stream.into_split();
        self.adopt(r, w, hand)
    }

    /// Takes over a TCP connection another server negotiated.
    pub fn adopt_tcp(&self, stream: TcpStream, hand: HandOff) -> Result<(), ExportError> {
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        self.adopt(r, w, hand)
    }

    /// Checks `hand` against the export, then serves the connection in a task of
    /// its own: the client waits for a `max-connections` slot here, gets the final
    /// negotiation reply and its requests are served. The state comes from another
    /// process, so it is checked as a client's bytes would be.
    pub fn adopt<R, W>(&self, r: R, w: W, hand: HandOff) -> Result<(), ExportError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        if !hand.is_bounded() {
            return Err(ExportError::BadHandOff(String::new()));
        }
        let client = self
            .shared
            .attach(hand.export.as_bytes())
            .ok_or_else(|| ExportError::NotFound(hand.export.clone()))?;
        let structured = hand.mode >= crate::handoff::Mode::Structured;
        // Bitmap indexes must name bitmaps of this export, each once, ascending
        // (as `conn::run` writes them).
        let mut bitmaps = BitmapSet::default();
        let mut next = 0;
        for &i in &hand.bitmaps {
            let i = i as usize;
            if i < next || i >= client.export.bitmaps.len() {
                return Err(ExportError::BadHandOff(hand.export));
            }
            bitmaps.insert(i);
            next = i + 1;
        }
        let selected = hand.base_allocation || hand.allocation_depth || !bitmaps.is_empty();
        if (selected && !structured) || (hand.allocation_depth && !client.export.allocation_depth) {
            return Err(ExportError::BadHandOff(hand.export));
        }
        let contexts = Contexts {
            export: selected.then(|| client.export.clone()),
            base_allocation: hand.base_allocation,
            allocation_depth: hand.allocation_depth,
            count: u32::from(hand.base_allocation)
                + u32::from(hand.allocation_depth)
                + bitmaps.len(),
            bitmaps,
        };
        let slot = self.slot().ok_or(ExportError::ShuttingDown)?;
        let session = Session {
            client,
            mode: hand.mode,
            contexts,
            pending: hand.reply,
        };
        tokio::spawn(crate::conn::serve_negotiated(
            self.shared.clone(),
            slot,
            session,
            hand.leftover,
            r,
            w,
        ));
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
        if mode == RemoveMode::Safe && table[pos].life.clients() > 0 {
            return Err(ExportError::InUse(name.to_owned()));
        }
        let export = table.remove(pos);
        drop(table);
        export.life.close();
        Ok(export.life.removal())
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
            .map(|e| e.life.clients())
    }

    /// Number of open connections (negotiating, waiting for a slot, or attached).
    pub fn connection_count(&self) -> usize {
        *self.shared.connections.borrow()
    }

    /// How many clients may negotiate at once.
    pub fn negotiating_limit(&self) -> usize {
        self.shared.negotiating().limit
    }

    /// Changes how many clients may negotiate at once (at least one; the default is
    /// [`NEGOTIATING_MAX`]). Clients over a lowered limit go as newer ones arrive.
    pub fn set_negotiating_limit(&self, limit: usize) {
        self.shared.negotiating().limit = limit.max(1);
    }

    /// Counts a new connection and enters it in the negotiating set, dropping the
    /// client idle longest if the set is full; `None` once the server shuts down.
    fn slot(&self) -> Option<ConnectionSlot> {
        if *self.shared.shutdown.borrow() {
            return None;
        }
        let now = self.shared.now_ms();
        let negotiator = {
            let mut set = self.shared.negotiating();
            if set.clients.len() >= set.limit && set.evict(true, u64::MAX).is_some() {
                tracing::debug!(
                    "NBD: {} clients negotiating; dropped the one idle longest",
                    set.limit
                );
            }
            let id = set.next_id;
            set.next_id += 1;
            let n = Arc::new(Negotiator {
                id,
                last_active: AtomicU64::new(now),
                waiting: AtomicBool::new(false),
                evict: Notify::new(),
                gone: Notify::new(),
            });
            set.clients.insert(id, n.clone());
            n
        };
        self.shared.connections.send_modify(|n| *n += 1);
        Some(ConnectionSlot {
            shared: self.shared.clone(),
            negotiator,
            listed: true,
            _permit: None,
        })
    }

    /// Out of descriptors: drops the negotiating client idle longest, if idle for
    /// [`EVICTABLE_IDLE_MS`] (not one that waits for a slot: it has done its part),
    /// and waits until its descriptor is closed. `false` if there was none to drop.
    async fn make_room(&self) -> bool {
        let Some(idle_since) = self.shared.now_ms().checked_sub(EVICTABLE_IDLE_MS) else {
            return false;
        };
        let victim = self.shared.negotiating().evict(false, idle_since);
        let Some(victim) = victim else {
            return false;
        };
        tracing::debug!("NBD: out of descriptors; dropped the negotiating client idle longest");
        let _ = tokio::time::timeout(EVICTION_WAIT, victim.gone.notified()).await;
        true
    }

    /// Accepts and serves connections from a Unix listener until
    /// [`NbdServer::shutdown`]. It never stops accepting for `max_connections`
    /// (clients wait after negotiation instead). Out of descriptors, it drops the
    /// negotiating client idle longest to accept the next; other accept failures
    /// (and running out with nobody negotiating) are logged and retried after a
    /// pause.
    pub async fn serve_unix_listener(&self, listener: UnixListener) {
        self.accept_loop(
            || listener.accept(),
            |(stream, _)| stream.into_split(),
            join_unix,
        )
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
            join_tcp,
        )
        .await;
    }

    /// The accept loop of both listener kinds: `accept` yields a connection, `split`
    /// turns it into the halves a connection task reads and writes, `join` turns
    /// them back into a descriptor to hand off.
    async fn accept_loop<C, Fut, R, W>(
        &self,
        mut accept: impl FnMut() -> Fut,
        split: impl Fn(C) -> (R, W),
        join: fn(R, W) -> Option<OwnedFd>,
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
            let conn = tokio::select! {
                _ = signalled(&mut shutdown) => return,
                r = accept() => match r {
                    Ok(conn) => conn,
                    Err(e) if is_out_of_descriptors(&e) && self.make_room().await => continue,
                    Err(e) => {
                        if failures == 0 {
                            tracing::warn!("NBD accept failed, retrying every {ACCEPT_RETRY:?}: {e}");
                        }
                        failures += 1;
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
            let Some(slot) = self.slot() else {
                return;
            };
            let (r, w) = split(conn);
            tokio::spawn(run_connection(self.shared.clone(), slot, r, w, join));
        }
    }

    /// Serves one already-accepted Unix connection; returns when it ends.
    pub async fn serve_unix_stream(&self, stream: UnixStream) {
        let Some(slot) = self.slot() else {
            return;
        };
        let (r, w) = stream.into_split();
        run_connection(self.shared.clone(), slot, r, w, join_unix).await;
    }

    /// Serves one already-accepted TCP connection; returns when it ends.
    pub async fn serve_tcp_stream(&self, stream: TcpStream) {
        let Some(slot) = self.slot() else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        run_connection(self.shared.clone(), slot, r, w, join_tcp).await;
    }

    /// Serves one connection over any byte stream (for example a TLS session or a
    /// test pipe); returns when it ends.
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let Some(slot) = self.slot() else {
            return;
        };
        let (r, w) = tokio::io::split(stream);
        // Not a socket: it cannot be handed off, and is dropped if it would be.
        run_connection(self.shared.clone(), slot, r, w, |_, _| None).await;
    }

    /// Stops the listeners, drops every export and connection (like a hard removal
    /// of each export), and waits until all connections have ended.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let exports: Vec<Arc<Export>> = std::mem::take(&mut *self.shared.exports());
        for e in &exports {
            e.life.close();
        }
        let mut conns = self.shared.connections.subscribe();
        let _ = conns.wait_for(|n| *n == 0).await;
    }
}

/// Runs one connection; on a listener that hands clients off, passes the negotiated
/// socket to the hook (the connection counts as open until the hook is done, or the
/// server shuts down).
async fn run_connection<R, W>(
    shared: Arc<Shared>,
    slot: ConnectionSlot,
    r: R,
    w: W,
    join: fn(R, W) -> Option<OwnedFd>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Some((hand, r, w, slot)) = crate::conn::run(shared.clone(), slot, r, w).await else {
        return;
    };
    let (Some(hook), Some(fd)) = (shared.hand_off.get(), join(r, w)) else {
        return;
    };
    let mut shutdown = shared.shutdown_signal();
    tokio::select! {
        _ = signalled(&mut shutdown) => {}
        _ = hook(hand, fd) => {}
    }
    drop(slot);
}

fn join_unix(
    r: tokio::net::unix::OwnedReadHalf,
    w: tokio::net::unix::OwnedWriteHalf,
) -> Option<OwnedFd> {
    let stream = r.reunite(w).ok()?.into_std().ok()?;
    Some(OwnedFd::from(stream))
}

fn join_tcp(
    r: tokio::net::tcp::OwnedReadHalf,
    w: tokio::net::tcp::OwnedWriteHalf,
) -> Option<OwnedFd> {
    let stream = r.reunite(w).ok()?.into_std().ok()?;
    Some(OwnedFd::from(stream))
}

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
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
            bitmaps: Vec::new(),
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
        let bitmap = |name: String| ExportBitmap {
            name,
            source: crate::testing::MemBitmap::new(4096, 512),
        };
        let mut c = cfg("b", true);
        c.bitmaps = vec![bitmap("ok".into()), bitmap("x".repeat(1024))];
        let e = s.add_export(c, MemBackend::new(4096)).unwrap_err();
        assert_eq!(e, ExportError::BitmapNameTooLong("x".repeat(1024)));
        let mut c = cfg("b", true);
        c.bitmaps = (0..=MAX_EXPORT_BITMAPS)
            .map(|i| bitmap(format!("b{i}")))
            .collect();
        let e = s.add_export(c.clone(), MemBackend::new(4096)).unwrap_err();
        assert_eq!(e, ExportError::TooManyBitmaps("b".into()));
        c.bitmaps.pop();
        s.add_export(c, MemBackend::new(4096)).unwrap();
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
