//! The NBD export worker: one NBD server, in one of three roles.
//!
//! - `--isolation kind`: one worker listens and serves every export.
//! - `--isolation image`, the listener: negotiates every client against metadata-only
//!   exports (no data channel at all) and hands each negotiated client to the
//!   supervisor ([`WorkerAsk::NbdHandOff`], the socket attached), which passes it on.
//! - `--isolation image`, one export worker per export: no listener; serves the
//!   clients it adopts ([`ToWorker::NbdAdopt`]) over one data channel, to the
//!   exported image's worker.
//!
//! The listening socket comes from the supervisor (which keeps its own copy, so a
//! replacement worker serves the same socket). Exported nodes are reached through data
//! channels to the workers that host them (a format node with its protocol child, so
//! one hop whatever the chain). Clients' bytes are untrusted and handled by
//! `bulkhead-nbd`; this module only wires it to the control plane: the generic
//! export messages ([`ToWorker::ExportAdd`], [`ToWorker::ExportRemove`],
//! [`WorkerEvent::ExportGone`], keyed by [`ExportKey`]) and NBD's own (server start
//! and stop, hand-off and adoption).
//!
//! Each served export's backend is a [`MappedNode`]: its node's worker over the data
//! channel, or, while the supervisor grants a mapping ([`ToWorker::ExportMap`]),
//! reads and plain writes straight on the image descriptor. The data channel side
//! sits in a [`Slot`], so [`ToWorker::ExportRetarget`] moves the export to another
//! node under live I/O (requests in flight finish on the old node, see
//! `design/graph.md`).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bulkhead_block::mapped::MappedFile;
use bulkhead_block::slot::Slot;
use bulkhead_export::{FormatMap, MappedLayer, MappedNode, Mapping};
use bulkhead_ipc::stats::StatsRegion;

use bulkhead_bitmap::DirtyBitmap;
use bulkhead_ipc::bitmap::BitmapWords;
use bulkhead_ipc::control::ControlChannel;
use bulkhead_ipc::wire::{
    ExportKey, ExportMap, ExportSpec, FrontSpec, MAX_SHARED_BITMAPS, NbdBitmap, NbdHandOff,
    NbdMode, Reply, ToWorker, WorkerAsk, WorkerError, WorkerErrorKind,
};
use bulkhead_nbd::server::{
    DirtyRuns, ExportBitmap, ExportConfig, ExportError, NbdServer, RemoveMode, ServerConfig,
};
use bulkhead_nbd::{HandOff, HandOffHook, Mode};
use tokio::sync::Semaphore;

use super::export::{ExportKeys, removal_reply};
use super::link::Link;

/// How long a retarget waits for requests still on the old node (inside the
/// supervisor's call limit, as a reopen's drain).
const RETARGET_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// An export served here: its backend, and the slot holding the node it reaches
/// over the data channel (what a retarget replaces).
struct Backend {
    node: Arc<MappedNode>,
    remote: Arc<Slot>,
}

/// A dirty bitmap an export offers, read from the region the supervisor owns.
struct SharedBitmap(DirtyBitmap<BitmapWords>);

impl DirtyRuns for SharedBitmap {
    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        self.0.runs(offset, len)
    }
}

/// The listener's stand-in for a metadata-only export's bitmap: it only negotiates,
/// so the bits are never asked for.
struct NoRuns;

impl DirtyRuns for NoRuns {
    fn runs(&self, _offset: u64, len: u64) -> Vec<(u64, bool)> {
        vec![(len, false)]
    }
}

/// Hand-offs the listener has asked about and not had answered yet; further
/// negotiated clients wait (counted as connections) until one is answered.
const HAND_OFFS_IN_FLIGHT: usize = 64;

/// Prints a line about an NBD client on stderr the way qsd does (its program name,
/// then the text), as one write so lines from concurrent connections never mix.
fn report(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("bulkhead: {line}\n").as_bytes());
}

fn err(kind: WorkerErrorKind, errno: i32, detail: impl Into<String>) -> WorkerError {
    WorkerError::new(kind, errno, detail)
}

/// State of the NBD worker.
pub(crate) struct NbdWorker {
    server: Option<Arc<NbdServer>>,
    /// The NBD name of each export the server has, by the supervisor's key.
    names: ExportKeys<String>,
    /// The backend of each export served here (not the listener's metadata-only
    /// ones), for mapping grants.
    backends: HashMap<ExportKey, Backend>,
    peers: super::Peers,
    control: Arc<ControlChannel>,
    link: Arc<Link>,
    /// Dirty-bitmap regions shared for exports still to be added, by id.
    shared: HashMap<u64, OwnedFd>,
}

impl NbdWorker {
    pub(crate) fn new(control: Arc<ControlChannel>, link: Arc<Link>) -> NbdWorker {
        NbdWorker {
            server: None,
            names: ExportKeys::new(),
            backends: HashMap::new(),
            peers: super::Peers::default(),
            control,
            link,
            shared: HashMap::new(),
        }
    }

    async fn add_export(
        &mut self,
        server: &NbdServer,
        export: ExportSpec,
    ) -> Result<(), WorkerError> {
        let FrontSpec::Nbd(nbd) = export.front;
        self.names.check_free(export.key)?;
        let bitmaps = nbd
            .bitmaps
            .into_iter()
            .map(|b| self.export_bitmap(b))
            .collect::<Result<Vec<_>, _>>()?;
        let config = ExportConfig {
            name: nbd.name.clone(),
            description: nbd.description,
            writable: export.writable,
            allocation_depth: nbd.allocation_depth,
            bitmaps,
        };
        match nbd.metadata_size {
            Some(size) => server.add_metadata_export(config, size),
            None => {
                let remote = self.peers.open(export.node, "exported node").await?;
                let remote = Arc::new(Slot::new(remote));
                let backend = Arc::new(MappedNode::new(Arc::clone(&remote) as _));
                let entry = Backend {
                    node: Arc::clone(&backend),
                    remote,
                };
                self.backends.insert(export.key, entry);
                server.add_export(config, backend)
            }
        }
        .map_err(|e| {
            self.backends.remove(&export.key);
            export_error(e)
        })?;
        self.names.insert(export.key, nbd.name);
        Ok(())
    }

    /// The bits behind an export's `qemu:dirty-bitmap:NAME`: the region shared
    /// for it, mapped read-only (a metadata-only export has none and never reads).
    fn export_bitmap(&mut self, b: NbdBitmap) -> Result<ExportBitmap, WorkerError> {
        let invalid = |detail: String| err(WorkerErrorKind::Invalid, libc::EINVAL, detail);
        let source: Arc<dyn DirtyRuns> = match b.region {
            None => Arc::new(NoRuns),
            Some(id) => {
                let fd = self
                    .shared
                    .remove(&id)
                    .ok_or_else(|| invalid(format!("bitmap region {id} was not shared")))?;
                bulkhead_bitmap::check_granularity(b.granularity)
                    .map_err(|e| invalid(e.to_string()))?;
                let words = bulkhead_bitmap::words_for(b.size, b.granularity);
                let mapped = BitmapWords::map_read_only(fd.as_fd(), words)
                    .map_err(|e| invalid(e.to_string()))?;
                let bits = DirtyBitmap::on(mapped, b.size, b.granularity)
                    .map_err(|e| invalid(e.to_string()))?;
                Arc::new(SharedBitmap(bits))
            }
        };
        Ok(ExportBitmap {
            name: b.name,
            source,
        })
    }

    /// Grants or revokes export `key`'s mapping.
    async fn map_export(
        &mut self,
        key: ExportKey,
        map: Option<ExportMap>,
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, WorkerError> {
        let backend = &self.backend(key)?.node;
        match map {
            None => {
                if !backend.revoke().await {
                    return Err(err(
                        WorkerErrorKind::Io,
                        libc::EBUSY,
                        "a request still uses the mapping",
                    ));
                }
            }
            Some(map) => backend.grant(mapping(map, fds)?),
        }
        Ok(Reply::Done)
    }

    fn backend(&self, key: ExportKey) -> Result<&Backend, WorkerError> {
        self.backends.get(&key).ok_or_else(|| {
            err(
                WorkerErrorKind::NotFound,
                libc::ENOENT,
                format!("{key} is not served here"),
            )
        })
    }

    /// Points export `key` at `node` (reached over a channel the supervisor has
    /// connected): new requests go there at once; the reply comes once no request
    /// is left on the old node. The supervisor has revoked any mapping first.
    async fn retarget(
        &mut self,
        key: ExportKey,
        node: bulkhead_ipc::wire::NodeRef,
    ) -> Result<Reply, WorkerError> {
        let backend = self.backend(key)?;
        // Mapped requests would still reach the old node's image.
        if backend.node.is_mapped() {
            return Err(err(
                WorkerErrorKind::Invalid,
                libc::EBUSY,
                format!("{key} is mapped: revoke the mapping first"),
            ));
        }
        let slot = Arc::clone(&backend.remote);
        let remote = self.peers.open(node, "new export target").await?;
        if let Err(e) = slot.replace(remote, RETARGET_DRAIN).await {
            // The new node is in place; stragglers finish on the old one.
            tracing::warn!(%key, error = %e, "export retarget drain");
        }
        Ok(Reply::Done)
    }

    fn server(&self) -> Result<&Arc<NbdServer>, WorkerError> {
        self.server.as_ref().ok_or_else(|| {
            err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "NBD server not running",
            )
        })
    }

    pub(crate) async fn handle(
        &mut self,
        req: ToWorker,
        mut fds: Vec<OwnedFd>,
    ) -> Result<Reply, WorkerError> {
        match req {
            ToWorker::ConnectDataChannel {
                peer,
                generation,
                layout,
            } => {
                self.peers.connect(peer, generation, layout, fds)?;
                Ok(Reply::Done)
            }
            ToWorker::NbdServerStart {
                max_connections,
                handshake_max_seconds,
                exports,
                hand_off,
            } => {
                if self.server.is_some() {
                    return Err(err(
                        WorkerErrorKind::Invalid,
                        libc::EBUSY,
                        "NBD server already running",
                    ));
                }
                // No listening socket: an export worker, serving adopted clients only.
                let listener = match fds.len() {
                    0 => None,
                    _ => Some(single(std::mem::take(&mut fds))?),
                };
                let config = ServerConfig {
                    max_connections,
                    handshake_max_seconds,
                };
                let server = Arc::new(NbdServer::reporting(config, Arc::new(report)));
                if hand_off {
                    server.set_hand_off(hand_off_hook(Arc::clone(&self.link)));
                }
                // Every export exists before the first client is accepted.
                self.names.clear();
                self.backends.clear();
                for export in exports {
                    self.add_export(&server, export).await?;
                }
                if let Some(listener) = listener {
                    spawn_listener(Arc::clone(&server), listener)?;
                }
                self.server = Some(server);
                Ok(Reply::Done)
            }
            ToWorker::NbdServerStop => {
                // Answer once every client is gone, so the supervisor can report their
                // exports deleted before its reply (the disconnects are immediate).
                self.names.clear();
                self.backends.clear();
                if let Some(server) = self.server.take() {
                    server.shutdown().await;
                }
                Ok(Reply::Done)
            }
            ToWorker::ExportAdd(export) => {
                let server = Arc::clone(self.server()?);
                self.add_export(&server, export).await?;
                Ok(Reply::Done)
            }
            ToWorker::ExportRemove { export, hard } => {
                let server = Arc::clone(self.server()?);
                let name = self.names.get(export)?;
                let mode = if hard {
                    RemoveMode::Hard
                } else {
                    RemoveMode::Safe
                };
                let had_clients = server.client_count(&name).unwrap_or(0) > 0;
                let removal = server.remove_export(&name, mode).map_err(export_error)?;
                self.names.remove(export);
                self.backends.remove(&export);
                Ok(removal_reply(&self.control, export, had_clients, removal))
            }
            ToWorker::NbdAdopt(hand) => {
                let server = self.server()?;
                let socket = single(std::mem::take(&mut fds))?;
                adopt(server, socket, from_wire(hand))?;
                Ok(Reply::Done)
            }
            ToWorker::ShareBitmaps { regions } => {
                if regions.len() != fds.len()
                    || self.shared.len() + regions.len() > MAX_SHARED_BITMAPS
                {
                    return Err(err(
                        WorkerErrorKind::Invalid,
                        libc::EINVAL,
                        "bitmap regions and descriptors do not match, or too many",
                    ));
                }
                self.shared.extend(regions.into_iter().zip(fds));
                Ok(Reply::Done)
            }
            ToWorker::ExportMap { export, map } => self.map_export(export, map, fds).await,
            ToWorker::ExportRetarget { export, node } => self.retarget(export, node).await,
            ToWorker::Ping => Ok(Reply::Done),
            _ => Err(err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "not a driver worker",
            )),
        }
    }
}

/// The listener's hook: every negotiated client goes to the supervisor with its
/// socket; whatever the answer, our copy of the socket is closed afterwards (a
/// refused client sees its connection end and reconnects).
fn hand_off_hook(link: Arc<Link>) -> HandOffHook {
    let in_flight = Arc::new(Semaphore::new(HAND_OFFS_IN_FLIGHT));
    Arc::new(move |hand: HandOff, socket: OwnedFd| {
        let link = Arc::clone(&link);
        let in_flight = Arc::clone(&in_flight);
        Box::pin(async move {
            let Ok(_permit) = in_flight.acquire().await else {
                return;
            };
            let ask = WorkerAsk::NbdHandOff(to_wire(hand));
            if let Err(e) = link.ask(ask, &[socket.as_fd()]).await {
                tracing::debug!(error = %e, "NBD hand-off refused");
            }
        })
    })
}

/// Serves a client the listener negotiated, on its unix or TCP socket.
fn adopt(server: &NbdServer, socket: OwnedFd, hand: HandOff) -> Result<(), WorkerError> {
    let family = rustix::net::getsockname(socket.as_fd())
        .map(|a| a.address_family())
        .map_err(|e| err(WorkerErrorKind::Invalid, e.raw_os_error(), "not a socket"))?;
    let io = |e: std::io::Error| {
        err(
            WorkerErrorKind::Io,
            e.raw_os_error().unwrap_or(0),
            e.to_string(),
        )
    };
    if family == rustix::net::AddressFamily::UNIX {
        let std = std::os::unix::net::UnixStream::from(socket);
        std.set_nonblocking(true).map_err(io)?;
        let stream = tokio::net::UnixStream::from_std(std).map_err(io)?;
        server.adopt_unix(stream, hand).map_err(export_error)
    } else {
        let std = std::net::TcpStream::from(socket);
        std.set_nonblocking(true).map_err(io)?;
        let stream = tokio::net::TcpStream::from_std(std).map_err(io)?;
        server.adopt_tcp(stream, hand).map_err(export_error)
    }
}

fn to_wire(h: HandOff) -> NbdHandOff {
    NbdHandOff {
        export: h.export,
        mode: match h.mode {
            Mode::ExportName => NbdMode::ExportName,
            Mode::Simple => NbdMode::Simple,
            Mode::Structured => NbdMode::Structured,
            Mode::Extended => NbdMode::Extended,
        },
        base_allocation: h.base_allocation,
        allocation_depth: h.allocation_depth,
        bitmaps: h.bitmaps,
        reply: h.reply,
        leftover: h.leftover,
    }
}

fn from_wire(h: NbdHandOff) -> HandOff {
    HandOff {
        export: h.export,
        mode: match h.mode {
            NbdMode::ExportName => Mode::ExportName,
            NbdMode::Simple => Mode::Simple,
            NbdMode::Structured => Mode::Structured,
            NbdMode::Extended => Mode::Extended,
        },
        base_allocation: h.base_allocation,
        allocation_depth: h.allocation_depth,
        bitmaps: h.bitmaps,
        reply: h.reply,
        leftover: h.leftover,
    }
}

/// Most layers a mapping may name (a format node over its protocol node is two).
const MAX_MAPPED_LAYERS: usize = 8;

/// A mapping from the supervisor's grant: the image descriptor (a format mapping:
/// one per layer of the chain, top first), then one statistics region per layer.
fn mapping(map: ExportMap, fds: Vec<OwnedFd>) -> Result<Mapping, WorkerError> {
    let invalid = |what: &str| err(WorkerErrorKind::Invalid, libc::EINVAL, what.to_owned());
    let images = if map.format { map.layers.len() } else { 1 };
    if map.layers.len() > MAX_MAPPED_LAYERS
        || map.layers.is_empty()
        || fds.len() != map.layers.len() + images
    {
        return Err(invalid(
            "a mapping needs its images and one region per layer",
        ));
    }
    let mut fds = fds.into_iter();
    let mut files = Vec::with_capacity(images);
    for _ in 0..images {
        let image = fds.next().ok_or_else(|| invalid("no image descriptor"))?;
        let writable = map.writable && !map.format;
        files.push(
            MappedFile::new(image, writable)
                .map_err(|e| invalid(&format!("image descriptor refused: {e}")))?,
        );
    }
    let mut files = files.into_iter();
    let file = files.next().ok_or_else(|| invalid("no image descriptor"))?;
    let backing_files: Vec<MappedFile> = files.collect();
    let mut layers = Vec::with_capacity(map.layers.len());
    for (shift, fd) in map.layers.iter().zip(fds) {
        let region = StatsRegion::map_owned(&fd)
            .map_err(|e| invalid(&format!("statistics region refused: {e}")))?;
        layers.push(MappedLayer {
            counters: Arc::new(region).into_counters_ref(),
            shift: *shift,
        });
    }
    Ok(Mapping {
        file,
        base: map.base,
        size: map.size,
        // A format mapping moves no written bytes: its worker allocates.
        writable: map.writable && !map.format,
        layers,
        format: map.format.then(|| FormatMap::new(backing_files)),
    })
}

fn single(mut fds: Vec<OwnedFd>) -> Result<OwnedFd, WorkerError> {
    match (fds.pop(), fds.is_empty()) {
        (Some(fd), true) => Ok(fd),
        _ => Err(err(
            WorkerErrorKind::Invalid,
            libc::EINVAL,
            "expected exactly one descriptor",
        )),
    }
}

fn export_error(e: ExportError) -> WorkerError {
    match e {
        ExportError::InUse(_) => err(WorkerErrorKind::InUse, libc::EBUSY, e.to_string()),
        ExportError::NotFound(_) => err(WorkerErrorKind::NotFound, libc::ENOENT, e.to_string()),
        other => err(WorkerErrorKind::Invalid, libc::EINVAL, other.to_string()),
    }
}

/// Serves the handed-in listening socket, unix or TCP, until the server shuts down.
fn spawn_listener(server: Arc<NbdServer>, listener: OwnedFd) -> Result<(), WorkerError> {
    let family = rustix::net::getsockname(listener.as_fd())
        .map(|a| a.address_family())
        .map_err(|e| {
            err(
                WorkerErrorKind::Invalid,
                e.raw_os_error(),
                "listener is not a socket",
            )
        })?;
    let io = |e: std::io::Error| {
        err(
            WorkerErrorKind::Io,
            e.raw_os_error().unwrap_or(0),
            e.to_string(),
        )
    };
    if family == rustix::net::AddressFamily::UNIX {
        let std = std::os::unix::net::UnixListener::from(listener);
        std.set_nonblocking(true).map_err(io)?;
        let l = tokio::net::UnixListener::from_std(std).map_err(io)?;
        tokio::spawn(async move { server.serve_unix_listener(l).await });
    } else {
        let std = std::net::TcpListener::from(listener);
        std.set_nonblocking(true).map_err(io)?;
        let l = tokio::net::TcpListener::from_std(std).map_err(io)?;
        tokio::spawn(async move { server.serve_tcp_listener(l).await });
    }
    Ok(())
}
