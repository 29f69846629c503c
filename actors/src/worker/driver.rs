//! The driver worker: hosts the block nodes the supervisor placed on this instance
//! (every node of one driver kind, or one image; a format node's local protocol child
//! always lives with it).
//!
//! Nodes are opened from configs and descriptors the supervisor sends; a node's child
//! is found either in this worker or, through a data channel, in the worker instance
//! that serves it. Other workers reach this worker's nodes through data channels it
//! serves.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, RwLock};

use bulkhead_block::BlockIo;
use bulkhead_block::config::DriverConfig;
use bulkhead_block::slot::Slot;
use bulkhead_block::stats::{Accounting, SinkFuture, ThresholdSink, WriteNotifier};
use bulkhead_ipc::control::ControlChannel;
use bulkhead_ipc::data::{self, ChannelFds, NodeLookup};
use bulkhead_ipc::stats::StatsRegion;
use bulkhead_ipc::wire::Operation;
use bulkhead_ipc::wire::{
    ChildRole, FromWorker, NodeId, NodeRef, Reply, ToWorker, WorkerError, WorkerErrorKind,
    WorkerEvent, WorkerId, WorkerKind,
};

use super::bitmaps::NodeBitmaps;

/// The nodes this worker serves, shared with its data channel servers. Each sits in a
/// [`Slot`], which parents and channels hold, so a reopen replaces it under them.
#[derive(Default)]
struct Nodes(RwLock<HashMap<NodeId, Arc<Slot>>>);

/// How long a reopen waits for requests on the old implementation: well inside the
/// supervisor's 30 s control-call limit.
const REOPEN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

impl NodeLookup for Nodes {
    fn lookup(&self, node: NodeId) -> Option<Arc<dyn BlockIo>> {
        self.slot(node).map(|s| s as Arc<dyn BlockIo>)
    }
}

impl Nodes {
    fn slot(&self, node: NodeId) -> Option<Arc<Slot>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .cloned()
    }

    /// Adds a node; `exclusive` for drivers that own their image's metadata, whose
    /// reopens must not overlap with requests (`Slot::gated`).
    fn insert(&self, id: NodeId, node: Arc<dyn BlockIo>, exclusive: bool) {
        let slot = if exclusive {
            Slot::gated(node)
        } else {
            Slot::new(node)
        };
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::new(slot));
    }

    fn remove(&self, id: NodeId) -> Option<Arc<Slot>> {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }
}

/// State of a driver worker.
pub(crate) struct DriverWorker {
    kind: WorkerKind,
    id: WorkerId,

    nodes: Arc<Nodes>,
    peers: super::Peers,
    /// The control channel, for events the nodes report (write thresholds).
    chan: Arc<ControlChannel>,
    /// Long operations running in tasks of their own.
    ops: super::ops::Operations,
    /// What each format node was last opened with, to open it again as it was when a
    /// reopen closed its engine and the new one cannot open.
    opened_as: HashMap<NodeId, (DriverConfig, Vec<(ChildRole, NodeRef)>)>,
    /// The dirty bitmaps each node marks (kept across reopens).
    bitmaps: HashMap<NodeId, Arc<NodeBitmaps>>,
}

/// Reports one node's write-threshold crossings to the supervisor. The node awaits the
/// send, so the event is on the control socket before the write completes.
struct ThresholdEvents {
    node: NodeId,
    chan: Arc<ControlChannel>,
    /// The worker's executor, where reports from a driver's own threads are sent.
    handle: tokio::runtime::Handle,
}

impl bulkhead_block::stats::ImageEvents for ThresholdEvents {
    fn corrupted(&self, msg: &str, offset: Option<u64>, size: Option<u64>, fatal: bool) {
        let event = WorkerEvent::ImageCorrupted {
            node: self.node,
            msg: msg.chars().take(512).collect(),
            offset,
            size,
            fatal,
        };
        let chan = Arc::clone(&self.chan);
        self.handle.spawn(async move {
            if let Err(e) = chan.send(&FromWorker::Event(event), &[]).await {
                tracing::warn!(error = %e, "could not report an image corruption");
            }
        });
    }
}

impl ThresholdSink for ThresholdEvents {
    fn crossed(&self, threshold: u64, end: u64) -> SinkFuture<'_> {
        Box::pin(async move {
            let event = WorkerEvent::WriteThreshold {
                node: self.node,
                threshold,
                end,
            };
            if let Err(e) = self.chan.send(&FromWorker::Event(event), &[]).await {
                tracing::warn!(error = %e, "could not report a write threshold crossing");
            }
        })
    }
}

fn err(kind: WorkerErrorKind, errno: i32, detail: impl Into<String>) -> WorkerError {
    WorkerError::new(kind, errno, detail)
}

fn one_fd(mut fds: Vec<OwnedFd>, what: &str) -> Result<OwnedFd, WorkerError> {
    if fds.len() != 1 {
        return Err(err(
            WorkerErrorKind::Invalid,
            libc::EINVAL,
            format!("{what} needs exactly one descriptor"),
        ));
    }
    fds.pop()
        .ok_or_else(|| err(WorkerErrorKind::Invalid, libc::EINVAL, "no descriptor"))
}

/// The four descriptors of a data channel message.
pub(crate) fn channel_fds(fds: Vec<OwnedFd>) -> Result<ChannelFds, WorkerError> {
    ChannelFds::from_vec(fds).map_err(channel_error)
}

/// A data channel that could not be set up (bad descriptors or region).
pub(crate) fn channel_error(e: data::DataError) -> WorkerError {
    let errno = match &e {
        data::DataError::Io(io) => io.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EINVAL,
    };
    err(WorkerErrorKind::Invalid, errno, e.to_string())
}

impl DriverWorker {
    pub(crate) fn new(kind: WorkerKind, id: WorkerId, chan: Arc<ControlChannel>) -> DriverWorker {
        DriverWorker {
            kind,
            id,
            nodes: Arc::new(Nodes::default()),
            peers: super::Peers::default(),
            ops: super::ops::Operations::new(Arc::clone(&chan)),
            opened_as: HashMap::new(),
            bitmaps: HashMap::new(),
            chan,
        }
    }

    async fn child(&self, child: NodeRef) -> Result<Arc<dyn BlockIo>, WorkerError> {
        if child.home == self.id {
            return self.nodes.lookup(child.node).ok_or_else(|| {
                err(
                    WorkerErrorKind::NotFound,
                    libc::ENOENT,
                    "child node not in this worker",
                )
            });
        }
        self.peers.open(child, "child node").await
    }

    /// Opens the implementation of `node` for AddNode/ReopenNode: its child (here or
    /// over a channel; never the node itself), then its statistics region and image
    /// from `fds`.
    async fn open_node(
        &mut self,
        node: NodeId,
        name: &str,
        config: DriverConfig,
        children: Vec<(ChildRole, NodeRef)>,
        fds: Vec<OwnedFd>,
    ) -> Result<Arc<dyn BlockIo>, WorkerError> {
        // The roles are checked against the driver's slots before anything opens.
        let roles: Vec<ChildRole> = children.iter().map(|(r, _)| *r).collect();
        bulkhead_block::driver::check_roles(config.kind().info(), &roles)
            .map_err(|e| err(WorkerErrorKind::Invalid, libc::EINVAL, e.to_string()))?;
        let mut opened = Vec::with_capacity(children.len());
        for (role, c) in children {
            if c.node == node && c.home == self.id {
                return Err(err(
                    WorkerErrorKind::Invalid,
                    libc::EINVAL,
                    "node is its own child",
                ));
            }
            opened.push((role, self.child(c).await?));
        }
        let (accounting, fd) = self.accounting(node, name, fds)?;
        let accounting = Accounting {
            notifiers: vec![self.marks(node) as Arc<dyn WriteNotifier>],
            ..accounting
        };
        bulkhead_block::open_with(config, fd, opened, accounting)
            .await
            .map_err(|e| match e {
                bulkhead_block::OpenError::Image(text) => {
                    err(WorkerErrorKind::Image, libc::EINVAL, text)
                }
                bulkhead_block::OpenError::NeedsDataFile(name) => {
                    err(WorkerErrorKind::NeedsDataFile, libc::EINVAL, name)
                }
                other => err(
                    WorkerErrorKind::Invalid,
                    libc::EINVAL,
                    format!("{name}: {other}"),
                ),
            })
    }

    /// Reopens a node whose engine owns its image's metadata: two engines must never
    /// have it open at once, so requests wait while the old one drains and closes,
    /// then the new one opens. If the new one cannot, the old configuration opens
    /// again before requests go on, and the reopen fails.
    async fn reopen_exclusive(
        &mut self,
        slot: &Slot,
        node: NodeId,
        name: &str,
        config: DriverConfig,
        children: Vec<(ChildRole, NodeRef)>,
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, WorkerError> {
        let hold = tokio::time::timeout(REOPEN_DRAIN, slot.exclusive())
            .await
            .map_err(|_| {
                err(
                    WorkerErrorKind::Busy,
                    libc::EBUSY,
                    "requests did not drain for the reopen",
                )
            })?;
        // The statistics region again, for a reopen as it was.
        let region = match fds.first() {
            Some(f) => Some(
                bulkhead_ipc::fd::dup(f)
                    .map_err(|e| err(WorkerErrorKind::Io, libc::EMFILE, e.to_string()))?,
            ),
            None => None,
        };
        if let Err(e) = slot.close().await {
            tracing::warn!(worker = %self.kind, node = %name, error = %e, "closing before a reopen");
        }
        let as_given = (config.clone(), children.clone());
        let failure = match self.open_node(node, name, config, children, fds).await {
            Ok(opened) => {
                slot.set(opened);
                self.opened_as.insert(node, as_given);
                tracing::debug!(worker = %self.kind, node = %name, "node reopened");
                return Ok(Reply::Done);
            }
            Err(e) => e,
        };
        let old = self.opened_as.get(&node).cloned();
        match (old, region) {
            (Some((config, children)), Some(region)) => {
                match self
                    .open_node(node, name, config, children, vec![region])
                    .await
                {
                    Ok(opened) => {
                        slot.set(opened);
                        tracing::info!(worker = %self.kind, node = %name, "reopen failed; node open as it was");
                    }
                    Err(e) => {
                        tracing::warn!(worker = %self.kind, node = %name, error = %e, "node could not be opened again as it was")
                    }
                }
            }
            _ => {
                tracing::warn!(worker = %self.kind, node = %name, "no earlier configuration to open again")
            }
        }
        drop(hold);
        Err(failure)
    }

    /// The bitmaps `node` marks (an empty set for a node that has none yet).
    fn marks(&mut self, node: NodeId) -> Arc<NodeBitmaps> {
        Arc::clone(self.bitmaps.entry(node).or_default())
    }

    /// A node's accounting from the descriptors of AddNode/ReopenNode: its statistics
    /// region first, then (file nodes) its image, returned apart.
    fn accounting(
        &self,
        node: NodeId,
        name: &str,
        fds: Vec<OwnedFd>,
    ) -> Result<(Accounting, Option<OwnedFd>), WorkerError> {
        let mut fds = fds.into_iter();
        let region = fds.next().ok_or_else(|| {
            err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "a node without its statistics region",
            )
        })?;
        let region = StatsRegion::map(region.as_fd()).map_err(|e| {
            err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                format!("{name}: {e}"),
            )
        })?;
        let rest: Vec<OwnedFd> = fds.collect();
        let fd = match rest.len() {
            0 => None,
            _ => Some(one_fd(rest, "node image")?),
        };
        let events = Arc::new(ThresholdEvents {
            node,
            chan: Arc::clone(&self.chan),
            handle: tokio::runtime::Handle::current(),
        });
        let accounting = Accounting {
            counters: Arc::new(region).into_counters_ref(),
            threshold_sink: Some(Arc::clone(&events) as Arc<dyn ThresholdSink>),
            image_events: Some(events),
            notifiers: Vec::new(),
        };
        Ok((accounting, fd))
    }

    pub(crate) async fn handle(
        &mut self,
        req: ToWorker,
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, WorkerError> {
        match req {
            ToWorker::ServeDataChannel { peer, layout } => {
                let fds = channel_fds(fds)?;
                let nodes: Arc<dyn NodeLookup> = self.nodes.clone();
                let me = self.kind;
                tokio::spawn(async move {
                    if let Err(e) = data::serve(fds, layout, nodes).await {
                        tracing::warn!(worker = %me, %peer, error = %e, "data channel ended");
                    }
                });
                Ok(Reply::Done)
            }
            ToWorker::ConnectDataChannel {
                peer,
                generation,
                layout,
            } => {
                self.peers.connect(peer, generation, layout, fds)?;
                Ok(Reply::Done)
            }
            ToWorker::AddNode {
                node,
                name,
                config,
                children,
                bitmaps,
            } => {
                if self.nodes.lookup(node).is_some() {
                    return Err(err(
                        WorkerErrorKind::Invalid,
                        libc::EEXIST,
                        format!("node {name} exists"),
                    ));
                }
                // The statistics region, the bitmaps' regions, then the image.
                let mut fds = fds;
                if fds.len() < 1 + bitmaps.len() {
                    return Err(err(
                        WorkerErrorKind::Invalid,
                        libc::EINVAL,
                        "fewer descriptors than regions",
                    ));
                }
                let regions: Vec<OwnedFd> = fds.drain(1..1 + bitmaps.len()).collect();
                let maps = super::bitmaps::map_all(&bitmaps, &regions)?;
                let marks = Arc::new(NodeBitmaps::default());
                marks.replace(maps);
                self.bitmaps.insert(node, marks);
                let exclusive = config.kind().info().format_threads;
                let as_given = exclusive.then(|| (config.clone(), children.clone()));
                let opened = match self.open_node(node, &name, config, children, fds).await {
                    Ok(o) => o,
                    Err(e) => {
                        self.bitmaps.remove(&node);
                        return Err(e);
                    }
                };
                tracing::debug!(worker = %self.kind, node = %name, "node opened");
                self.nodes.insert(node, opened, exclusive);
                if let Some(a) = as_given {
                    self.opened_as.insert(node, a);
                }
                Ok(Reply::Done)
            }
            ToWorker::ReopenNode {
                node,
                name,
                config,
                children,
            } => {
                let slot = self
                    .nodes
                    .slot(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                // The same statistics region as before comes with it, so counters
                // and the write threshold carry over.
                if config.kind().info().format_threads {
                    return self
                        .reopen_exclusive(&slot, node, &name, config, children, fds)
                        .await;
                }
                let opened = self.open_node(node, &name, config, children, fds).await?;
                if let Err(e) = slot.replace(opened, REOPEN_DRAIN).await {
                    // The new implementation is in place; stragglers finish on the old.
                    tracing::warn!(worker = %self.kind, node = %name, error = %e, "reopen drain");
                }
                tracing::debug!(worker = %self.kind, node = %name, "node reopened");
                Ok(Reply::Done)
            }
            ToWorker::SetBitmaps { node, bitmaps } => {
                let marks = self
                    .bitmaps
                    .get(&node)
                    .filter(|_| self.nodes.lookup(node).is_some())
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                marks.replace(super::bitmaps::map_all(&bitmaps, &fds)?);
                Ok(Reply::Done)
            }
            ToWorker::TakeBitmaps { node, bitmaps } => {
                let n = self
                    .nodes
                    .lookup(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                let maps =
                    super::bitmaps::map_regions(bitmaps.iter().map(|(_, s)| *s), &fds, false)?;
                let names: Vec<String> = bitmaps.iter().map(|(n, _)| n.clone()).collect();
                let taken = n
                    .stored_bitmaps(bulkhead_block::StoredBitmaps::Take(names))
                    .await
                    .map_err(|text| err(WorkerErrorKind::Image, libc::EINVAL, text))?;
                super::bitmaps::fill_taken(&bitmaps, &maps, &taken)?;
                Ok(Reply::Done)
            }
            ToWorker::StoreBitmaps { node, bitmaps } => {
                let n = self
                    .nodes
                    .lookup(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                let maps = super::bitmaps::map_regions(bitmaps.iter().map(|b| b.spec), &fds, true)?;
                let list = bitmaps
                    .iter()
                    .zip(&maps)
                    .map(|(b, m)| bulkhead_block::StoredBitmap {
                        name: b.name.clone(),
                        granularity: b.spec.granularity,
                        enabled: b.enabled,
                        bits: m.to_bytes(),
                    })
                    .collect();
                n.stored_bitmaps(bulkhead_block::StoredBitmaps::Store(list))
                    .await
                    .map_err(|text| err(WorkerErrorKind::Image, libc::EIO, text))?;
                Ok(Reply::Done)
            }
            ToWorker::RemoveStoredBitmap { node, name } => {
                let n = self
                    .nodes
                    .lookup(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                n.stored_bitmaps(bulkhead_block::StoredBitmaps::Remove(name))
                    .await
                    .map_err(|text| err(WorkerErrorKind::Image, libc::EIO, text))?;
                Ok(Reply::Done)
            }
            ToWorker::RemoveNode { node } => match self.nodes.remove(node) {
                Some(slot) => {
                    self.opened_as.remove(&node);
                    self.bitmaps.remove(&node);
                    self.ops.cancel_node(node);
                    // A format engine writes back what a clean close writes.
                    if let Err(e) = slot.close().await {
                        tracing::warn!(worker = %self.kind, error = %e, "closing a removed node");
                    }
                    Ok(Reply::Done)
                }
                None => Err(err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node")),
            },
            ToWorker::SnapshotCreate { node, request } => {
                let n = self
                    .nodes
                    .lookup(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                n.snapshot_create(request)
                    .await
                    .map_err(|text| err(WorkerErrorKind::Image, libc::EINVAL, text))?;
                Ok(Reply::Done)
            }
            ToWorker::CreateQcow2 { node, image } => {
                let n = self
                    .nodes
                    .lookup(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                let writes = bulkhead_qcow2::create_layout(&bulkhead_qcow2::CreateOptions {
                    size: image.size,
                    cluster_size: image.cluster_size,
                    backing_file: image.backing_file,
                    backing_format: image.backing_format,
                    lazy_refcounts: image.lazy_refcounts,
                })
                .map_err(|e| err(WorkerErrorKind::Image, libc::EINVAL, e.to_string()))?;
                let io = |e: bulkhead_block::IoError| {
                    err(
                        WorkerErrorKind::Image,
                        e.errno(),
                        bulkhead_block::posix::strerror(e.errno()),
                    )
                };
                n.resize(0).await.map_err(io)?;
                let grow = bulkhead_block::WriteFlags {
                    extend: true,
                    ..Default::default()
                };
                for (off, bytes) in writes {
                    n.write(off, &bytes, grow).await.map_err(io)?;
                }
                n.flush().await.map_err(io)?;
                Ok(Reply::Done)
            }
            ToWorker::SetBackingFile { node, name, format } => {
                let n = self
                    .nodes
                    .lookup(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                // An empty name clears the backing file (a stream into the top).
                let format = if name.is_empty() {
                    String::new()
                } else {
                    format
                };
                n.set_backing_file(name, format)
                    .await
                    .map_err(|text| err(WorkerErrorKind::Image, libc::EINVAL, text))?;
                Ok(Reply::Done)
            }
            ToWorker::SnapshotDelete { node, id, name } => {
                let n = self
                    .nodes
                    .lookup(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                let snapshot = n
                    .snapshot_delete(id, name)
                    .await
                    .map_err(|text| err(WorkerErrorKind::Image, libc::EINVAL, text))?;
                Ok(Reply::Snapshot { snapshot })
            }
            ToWorker::ResizeNode { node, size } => {
                let n = self
                    .nodes
                    .lookup(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                n.resize(size).await.map_err(|e| match e {
                    bulkhead_block::IoError::Unsupported => {
                        err(WorkerErrorKind::Unsupported, e.errno(), e.to_string())
                    }
                    _ => err(WorkerErrorKind::Io, e.errno(), e.to_string()),
                })?;
                Ok(Reply::NodeInfo {
                    size: n.size(),
                    format: None,
                })
            }
            ToWorker::Ping => Ok(Reply::Done),
            ToWorker::StartOperation { op, operation } => {
                let lookup = |id| {
                    self.nodes
                        .lookup(id)
                        .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))
                };
                // A commit between two of this worker's nodes runs here, without a
                // hop through the job runner.
                if let Operation::Commit { top, base, .. } = &operation {
                    if !fds.is_empty() {
                        return Err(err(
                            WorkerErrorKind::Invalid,
                            libc::EINVAL,
                            "descriptors with an operation that takes none",
                        ));
                    }
                    let nodes = super::ops::Nodes::Two(lookup(top.node)?, lookup(base.node)?);
                    self.ops.start(op, operation, nodes, None)?;
                    return Ok(Reply::Done);
                }
                let node = lookup(operation.node())?;
                // A bitmap backup's frozen bitmap, mapped from the region that came.
                let bitmap = match &operation {
                    Operation::Backup {
                        bitmap: Some(b), ..
                    } => super::bitmaps::map_all(&[b.spec], &fds)?.pop(),
                    _ if !fds.is_empty() => {
                        return Err(err(
                            WorkerErrorKind::Invalid,
                            libc::EINVAL,
                            "descriptors with an operation that takes none",
                        ));
                    }
                    _ => None,
                };
                self.ops
                    .start(op, operation, super::ops::Nodes::One(node), bitmap)?;
                Ok(Reply::Done)
            }
            ToWorker::CancelOperation { op } => {
                self.ops.cancel(op)?;
                Ok(Reply::Done)
            }
            ToWorker::SetOperationSpeed { op, speed } => {
                self.ops.set_speed(op, speed)?;
                Ok(Reply::Done)
            }
            ToWorker::SteerOperation { op, steer } => {
                self.ops.steer(op, steer)?;
                Ok(Reply::Done)
            }
            ToWorker::NbdServerStart { .. }
            | ToWorker::NbdServerStop
            | ToWorker::ExportAdd { .. }
            | ToWorker::ExportRemove { .. }
            | ToWorker::ExportMap { .. }
            | ToWorker::ExportRetarget { .. }
            | ToWorker::NbdAdopt(_)
            | ToWorker::ShareBitmaps { .. } => Err(err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "not an export worker",
            )),
            ToWorker::QueryNode { node } => {
                let n = self
                    .nodes
                    .lookup(node)
                    .ok_or_else(|| err(WorkerErrorKind::NotFound, libc::ENOENT, "no such node"))?;
                if let Err(e) = n.refresh().await {
                    tracing::warn!(error = %e, "could not refresh node size");
                }
                Ok(Reply::NodeInfo {
                    size: n.size(),
                    format: n.format_info().map(Box::new),
                })
            }
        }
    }
}
