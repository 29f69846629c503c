//! Control-plane messages between the supervisor and its workers.
//!
//! One enum per direction. Every request carries an id chosen by the supervisor, and
//! every reply names the id it answers, so a failed request comes back to whoever sent
//! it with its error. Worker-sent values are untrusted: the supervisor checks ids
//! against what it asked for and renders every user-visible error text itself.

pub use bulkhead_block::DriverKind;
use bulkhead_block::config::DriverConfig;
use serde::{Deserialize, Serialize};

use crate::ring::RingLayout;

/// The kind (role) of a worker process: what it runs and which seccomp policy it
/// applies. How many workers of a kind exist is the supervisor's placement policy
/// (`--isolation`): one per driver kind, or one per image and per export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WorkerKind {
    /// Driver worker for the nodes of one block driver (`--isolation kind`).
    Driver(DriverKind),
    /// Export worker for NBD.
    Nbd,
    /// Driver worker for one image (`--isolation image`): a top node and the nodes
    /// under it that no other image uses, whatever their drivers.
    Image,
    /// The job runner: block jobs' copies between nodes it reaches only through
    /// data channels (no image descriptor, no socket of its own).
    Jobs,
}

impl WorkerKind {
    /// Every kind, for parsing and listings: one per driver, then the others.
    pub fn all() -> impl Iterator<Item = WorkerKind> {
        DriverKind::ALL
            .iter()
            .map(|&d| WorkerKind::Driver(d))
            .chain([WorkerKind::Nbd, WorkerKind::Image, WorkerKind::Jobs])
    }

    /// The name used on the worker's command line (`bulkhead worker --kind NAME`),
    /// which is the QAPI driver or export type name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerKind::Driver(d) => d.as_str(),
            WorkerKind::Nbd => "nbd",
            WorkerKind::Image => "image",
            WorkerKind::Jobs => "jobs",
        }
    }

    /// Whether a worker of this kind hosts block nodes (as opposed to exports).
    pub fn hosts_nodes(self) -> bool {
        !matches!(self, WorkerKind::Nbd | WorkerKind::Jobs)
    }

    /// Whether a worker of this kind runs long operations (`StartOperation`).
    pub fn runs_operations(self) -> bool {
        !matches!(self, WorkerKind::Nbd)
    }

    /// Whether a worker of this kind starts blocking I/O threads for image files:
    /// the drivers on image files, and the kinds that host a format node together
    /// with its local protocol child.
    pub fn does_file_io(self) -> bool {
        match self {
            WorkerKind::Driver(d) => {
                d.info().is_posix() || (!d.info().protocol && d.info().protocol_child)
            }
            WorkerKind::Nbd | WorkerKind::Jobs => false,
            WorkerKind::Image => true,
        }
    }

    /// Whether a worker of this kind starts format threads: kinds that host a driver
    /// whose code blocks on its children (`DriverInfo::format_threads`).
    pub fn needs_format_threads(self) -> bool {
        match self {
            WorkerKind::Driver(d) => d.info().format_threads,
            WorkerKind::Nbd | WorkerKind::Jobs => false,
            WorkerKind::Image => DriverKind::ALL.iter().any(|d| d.info().format_threads),
        }
    }

    /// Parses a name produced by [`WorkerKind::as_str`].
    pub fn parse(name: &str) -> Option<WorkerKind> {
        WorkerKind::all().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for WorkerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker instance, assigned by the supervisor. It outlives the processes that serve
/// it: a restarted worker keeps its instance's id, and the generation grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub u32);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// A node's identity across processes, assigned by the supervisor. Node names are a
/// QMP concept and stay in the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// Where a node lives: its id and the worker that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef {
    /// The node.
    pub node: NodeId,
    /// The worker instance serving it.
    pub home: WorkerId,
}

/// Everything the supervisor sends a worker: a request, or the answer to one of the
/// worker's questions ([`FromWorker::Ask`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SupervisorMessage {
    /// Do something and reply.
    Request(Request),
    /// The answer to the worker's question `id` (descriptors attached where the
    /// answer says so).
    Answer {
        /// The question's id, chosen by the worker.
        id: u64,
        /// The outcome.
        result: Result<Answer, WorkerError>,
    },
}

/// A request from the supervisor to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the supervisor, echoed in the reply.
    pub id: u64,
    /// What to do.
    pub body: ToWorker,
}

/// Supervisor → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    /// Serve I/O for this worker's nodes to `peer` on the attached data channel: four
    /// descriptors in the order of [`crate::data::ChannelFds`] (liveness socket, sealed
    /// region memfd, submission doorbell, completion doorbell).
    ServeDataChannel {
        /// The worker at the other end.
        peer: WorkerId,
        /// Geometry of the region.
        layout: RingLayout,
    },
    /// Reach the nodes of `peer` through the attached data channel (same four
    /// descriptors). `generation` numbers the serving worker's incarnation: requests
    /// that were pending on an older one are resubmitted here.
    ConnectDataChannel {
        /// The worker serving the nodes.
        peer: WorkerId,
        /// Incarnation of that worker (grows with every restart).
        generation: u64,
        /// Geometry of the region.
        layout: RingLayout,
    },
    /// Open a node. The first attached descriptor is the node's statistics region
    /// ([`crate::stats`]), then one region per entry of `bitmaps`; a
    /// `file`/`host_device` node's image descriptor comes last. A node with children
    /// names each one's role and where it lives.
    AddNode {
        /// The new node.
        node: NodeId,
        /// Its node-name, for logs only.
        name: String,
        /// Driver options.
        config: DriverConfig,
        /// Its children by role (at most one per role); the worker refuses a role
        /// the driver does not take.
        children: Vec<(ChildRole, NodeRef)>,
        /// The dirty bitmaps its writes mark from the first request on (a restarted
        /// worker gets them here, so no resubmitted write goes unmarked).
        bitmaps: Vec<BitmapSpec>,
    },
    /// Replace the dirty bitmaps a node's writes mark (one region attached per
    /// entry, in order): the enabled bitmaps, after any was added, removed, enabled,
    /// disabled or resized. Requests that complete after the reply mark the new set.
    SetBitmaps {
        /// The node.
        node: NodeId,
        /// The bitmaps.
        bitmaps: Vec<BitmapSpec>,
    },
    /// Hand persistent bitmaps of a node's image over to the daemon (qcow2): one
    /// region attached per entry, in order, which the worker fills with the bits of
    /// the loaded bitmap of that name; the image stops tracking them. The reply comes
    /// once every region is filled.
    TakeBitmaps {
        /// The node.
        node: NodeId,
        /// The bitmaps by name, with their regions' specs.
        bitmaps: Vec<(String, BitmapSpec)>,
    },
    /// Store persistent bitmaps in a node's image (qcow2), each from the region
    /// attached in order (read-only); each replaces the stored one of its name.
    StoreBitmaps {
        /// The node.
        node: NodeId,
        /// The bitmaps.
        bitmaps: Vec<StoredBitmapSpec>,
    },
    /// Drop a persistent bitmap from a node's image now (qcow2).
    RemoveStoredBitmap {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
    },
    /// Replace an open node's implementation (`blockdev-reopen`, `blockdev-set-active`):
    /// new options, the child it now uses, and for `file`/`host_device` the image
    /// descriptor attached (the supervisor reopens the image when the access mode
    /// changes). Requests in flight finish on the old implementation; the reply comes
    /// once they have.
    ReopenNode {
        /// The node.
        node: NodeId,
        /// Its node-name, for logs only.
        name: String,
        /// The new driver options (same driver).
        config: DriverConfig,
        /// Its children by role after the reopen.
        children: Vec<(ChildRole, NodeRef)>,
    },
    /// Close a node.
    RemoveNode {
        /// The node.
        node: NodeId,
    },
    /// Create an internal snapshot of a node's image (qcow2). Errors carry QEMU's
    /// text (`WorkerErrorKind::Image`).
    SnapshotCreate {
        /// The node.
        node: NodeId,
        /// What the snapshot records.
        request: bulkhead_block::SnapshotRequest,
    },
    /// Write a new qcow2 image onto `node` (`blockdev-create`): the node is emptied
    /// first. Errors carry QEMU's text (`WorkerErrorKind::Image`).
    CreateQcow2 {
        /// The node holding the image file.
        node: NodeId,
        /// What to create.
        image: Qcow2Create,
    },
    /// Write a backing file name and format into a node's image header
    /// (`change-backing-file`). Errors carry the reason's text
    /// (`WorkerErrorKind::Image`).
    SetBackingFile {
        /// The node.
        node: NodeId,
        /// The name to record.
        name: String,
        /// The backing node's format.
        format: String,
    },
    /// Delete an internal snapshot matching `id` and/or `name`; the reply is
    /// [`Reply::Snapshot`] with what it was.
    SnapshotDelete {
        /// The node.
        node: NodeId,
        /// The snapshot's id.
        id: Option<String>,
        /// The snapshot's name.
        name: Option<String>,
    },
    /// Change a node's size.
    ResizeNode {
        /// The node.
        node: NodeId,
        /// New size in bytes.
        size: u64,
    },
    /// Answer at once: the heartbeat. A worker's control loop must never be busy for
    /// long (long work runs in tasks of its own), so a ping that goes unanswered
    /// means the worker hangs.
    Ping,
    /// Report a node's current state.
    QueryNode {
        /// The node.
        node: NodeId,
    },
    /// NBD worker: serve NBD on the attached listening socket (unix or TCP).
    /// Starting and stopping a front's server are per front; adding and removing
    /// exports ([`ToWorker::ExportAdd`], [`ToWorker::ExportRemove`]) are not.
    NbdServerStart {
        /// Most simultaneous clients; 0 = unlimited.
        max_connections: u32,
        /// Seconds a client may take to finish the handshake; 0 = no limit.
        handshake_max_seconds: u32,
        /// Exports to add before the first client is accepted (a restarted worker gets
        /// all of them here, so a reconnecting client never finds its export missing).
        exports: Vec<ExportSpec>,
        /// The listener of `--isolation image`: negotiate only, and hand every
        /// negotiated client to the supervisor ([`WorkerAsk::NbdHandOff`]). Without a
        /// listening socket attached, the worker serves only adopted clients.
        hand_off: bool,
    },
    /// NBD worker: stop listening and drop every export and client.
    NbdServerStop,
    /// Export worker: export a node through its front. The supervisor has already
    /// checked names, sizes and permissions; the worker only refuses what it alone
    /// can know.
    ExportAdd(ExportSpec),
    /// Export worker: remove an export. Safe mode fails with `InUse` while clients
    /// are attached; hard mode drops them and reports `ExportRemoved { deferred: true
    /// }` if any were, followed later by `WorkerEvent::ExportGone`.
    ExportRemove {
        /// The export.
        export: ExportKey,
        /// Drop attached clients.
        hard: bool,
    },
    /// NBD export worker: serve a client the listener negotiated (its socket is
    /// attached).
    NbdAdopt(NbdHandOff),
    /// Export worker: dirty-bitmap regions (one read-only descriptor attached per
    /// id, at most `MAX_FDS_PER_MESSAGE`) that the next exports added name in their
    /// bitmaps ([`NbdBitmap::region`]); each export takes its own. Sent before the
    /// `ExportAdd` or `NbdServerStart` that names them, so a start with many exports
    /// needs no more descriptors than one message carries.
    ShareBitmaps {
        /// The regions' ids, chosen by the supervisor, never reused.
        regions: Vec<u64>,
    },
    /// Export worker: move the bytes of an export's node straight on its image
    /// descriptor (`Some`: the image descriptor is attached, then one statistics
    /// region per [`ExportMap::layers`] entry), or stop doing so (`None`: the reply
    /// comes once no request uses the old mapping).
    ExportMap {
        /// The export.
        export: ExportKey,
        /// The mapping, or none.
        map: Option<ExportMap>,
    },
    /// Export worker: serve an export from another node from now on (the supervisor
    /// re-points users of a node: filters inserted or removed, a node replaced).
    /// The supervisor has connected the worker to `node`'s instance and revoked any
    /// mapping. New requests go to `node` at once; requests in flight finish on the
    /// old node, and the reply comes once they have.
    ExportRetarget {
        /// The export.
        export: ExportKey,
        /// The node it serves from now on.
        node: NodeRef,
    },
    /// Driver worker: start a long operation in a task of its own and answer at once
    /// (`Done`: it runs). The control loop stays free; progress and the end come as
    /// [`WorkerEvent::Progress`] and [`WorkerEvent::OperationEnded`]. Refused when the
    /// worker already runs [`MAX_OPERATIONS`] or `op` is running.
    StartOperation {
        /// Chosen by the supervisor, never reused.
        op: OpId,
        /// What to do.
        operation: Operation,
    },
    /// Driver worker: stop operation `op`; its `OperationEnded` follows (cancelled,
    /// or its real end if it finished first). `NotFound` if it is not running.
    CancelOperation {
        /// The operation.
        op: OpId,
    },
    /// Change a running operation's speed limit (bytes per second, 0: none), from its
    /// next chunk on. `NotFound` if it is not running.
    SetOperationSpeed {
        /// The operation.
        op: OpId,
        /// The new limit.
        speed: u64,
    },
    /// Steer a running mirror operation (see [`Steer`]). `NotFound` if it is not
    /// running.
    SteerOperation {
        /// The operation.
        op: OpId,
        /// What it is to do.
        steer: Steer,
    },
}

/// What a running mirror is told ([`ToWorker::SteerOperation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Steer {
    /// Guest writes reach the target before they complete (`copy-mode:
    /// write-blocking`).
    WriteBlocking,
    /// Copy what is left with guest writes blocking, then end.
    Complete,
}

/// A dirty bitmap's region as a node's worker maps it (`crate::bitmap`): the bytes
/// of the node it covers and the bytes per bit; the region holds
/// `bulkhead_bitmap::words_for(size, granularity)` words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapSpec {
    /// Bytes of the node covered.
    pub size: u64,
    /// Bytes per bit (a power of two, at least 512).
    pub granularity: u64,
}

/// A persistent bitmap to store ([`ToWorker::StoreBitmaps`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBitmapSpec {
    /// Its name.
    pub name: String,
    /// Stored as recording (`auto`).
    pub enabled: bool,
    /// Its region.
    pub spec: BitmapSpec,
}

/// A qcow2 image `blockdev-create` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qcow2Create {
    /// Virtual size.
    pub size: u64,
    /// Cluster size.
    pub cluster_size: u64,
    /// Backing file name to record.
    pub backing_file: Option<String>,
    /// Its format.
    pub backing_format: Option<String>,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
}

/// Most dirty bitmaps one node records into at once: each travels as a descriptor,
/// and `AddNode` carries them with the node's other descriptors in one message.
pub const MAX_RECORDING_BITMAPS: usize = 24;

/// Most long operations one worker runs at once.
pub const MAX_OPERATIONS: usize = 4;

/// A long operation, as the supervisor numbers it: assigned at start, never reused,
/// so a late event about an ended one cannot touch a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OpId(pub u64);

impl std::fmt::Display for OpId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "op#{}", self.0)
    }
}

/// Long work a driver worker runs on its own nodes (see `design/processes.md`,
/// "Long operations").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    /// Write `len` bytes of `pattern` at `offset` of `node`, at most `speed` bytes per
    /// second (0: as fast as the node goes), like a block job's `speed`.
    Fill {
        /// One of the worker's nodes.
        node: NodeId,
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// The byte written.
        pattern: u8,
        /// Bytes per second, 0 for no limit.
        speed: u64,
    },
    /// A backup's copy, in the worker hosting its `copy-before-write` filter `node`
    /// (the filter's claims keep the copy and guest writes apart): every cluster of
    /// `[offset, len)` not saved yet goes to the filter's target; with `top_only`,
    /// only the ranges allocated in the source's top layer (`sync: top`).
    Backup {
        /// The filter.
        node: NodeId,
        /// Where to start.
        offset: u64,
        /// The end: the source's size.
        len: u64,
        /// Only what the top layer holds.
        top_only: bool,
        /// Bytes per second, 0 for no limit.
        speed: u64,
        /// `sync: bitmap`: only the clusters this frozen bitmap holds (its region
        /// comes with the request); progress counts its dirty bytes.
        bitmap: Option<BackupBitmap>,
    },
    /// A stream's copy, in the worker hosting its `copy-on-read` filter `node`:
    /// what the `layers` layers below the filter's child's top layer hold of
    /// `[offset, len)` (0: every layer) goes into that top layer, under the filter's
    /// claims.
    Stream {
        /// The filter.
        node: NodeId,
        /// Where to start.
        offset: u64,
        /// The end: the top's size.
        len: u64,
        /// The layers whose data moves (0: all).
        layers: u32,
        /// Bytes per second, 0 for no limit.
        speed: u64,
    },
    /// A mirror's copy, in the worker hosting its `mirror_top` filter `node`: the
    /// scan (`scan`: every byte when 0, or what the `scan` topmost layers of the
    /// source hold; none when `None`), then dirty chunks to the target until none
    /// is left ([`WorkerEvent::OperationReady`] the first time), then whatever
    /// guest writes dirty, until cancelled or told to complete ([`Steer`]).
    /// Progress counts copied bytes from `offset`; the total is that plus what is
    /// dirty.
    Mirror {
        /// The filter.
        node: NodeId,
        /// Bytes copied by earlier runs of the job.
        offset: u64,
        /// What the scan marks.
        scan: Option<u32>,
        /// Guest writes block from the start (`copy-mode: write-blocking`).
        write_blocking: bool,
        /// Complete as soon as nothing is dirty.
        complete: bool,
        /// Bytes per second, 0 for no limit.
        speed: u64,
    },
    /// The job runner's part of `block-commit` (an intermediate layer into its
    /// base): for `[offset, len)` of `top`, every range allocated in one of the
    /// `layers` topmost layers of its chain (allocation depth 1..=layers) is read
    /// from `top` and written to `base`. Progress counts every byte passed,
    /// copied or not, from `offset` on.
    Commit {
        /// The node read (the commit's top), reached over a data channel.
        top: NodeRef,
        /// The node written (the commit's base).
        base: NodeRef,
        /// The layers from `top` down whose data moves (those above `base`).
        layers: u32,
        /// Where to start (0, or where an earlier run of the job stopped).
        offset: u64,
        /// The end: `top`'s size.
        len: u64,
        /// Bytes per second, 0 for no limit.
        speed: u64,
    },
}

/// The frozen bitmap a `sync: bitmap` backup copies ([`Operation::Backup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupBitmap {
    /// Its region's layout.
    pub spec: BitmapSpec,
    /// Its dirty bytes: the backup's total.
    pub total: u64,
}

impl Operation {
    /// The node the operation works on (for a commit: its top).
    pub fn node(&self) -> NodeId {
        match self {
            Operation::Fill { node, .. }
            | Operation::Backup { node, .. }
            | Operation::Stream { node, .. }
            | Operation::Mirror { node, .. } => *node,
            Operation::Commit { top, .. } => top.node,
        }
    }

    /// Units in all.
    pub fn total(&self) -> u64 {
        match self {
            Operation::Backup {
                bitmap: Some(b), ..
            } => b.total,
            Operation::Fill { len, .. }
            | Operation::Commit { len, .. }
            | Operation::Backup { len, .. }
            | Operation::Stream { len, .. } => *len,
            // Grows as the scan marks.
            Operation::Mirror { offset, .. } => *offset,
        }
    }
}

/// What a worker learned about an image it hosts (qcow2's header: what
/// `query-named-block-nodes` and `qemu-img info` report), cached by the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The image was not closed cleanly (qcow2 lazy refcounts: `dirty-flag`).
    pub dirty: bool,
    /// The image is marked corrupt and may only be opened read-only.
    pub corrupt: bool,
    /// Bytes the image takes on its storage (`actual-size`).
    pub actual_size: u64,
}

/// The role a child plays for its parent (QEMU's child names: `file`, `backing`,
/// `data-file`, `children.N` of quorum); defined with the drivers, which declare the
/// roles they take.
pub use bulkhead_block::driver::ChildRole;

/// A mapping of an exported node onto its image file (see `design/data-path.md`,
/// "Mapped I/O"): guest offset `o` is file offset `base + o`, for `o < size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportMap {
    /// File offset of guest offset 0.
    pub base: u64,
    /// Guest bytes covered.
    pub size: u64,
    /// Plain writes may go through the descriptor (it is then open for writing).
    pub writable: bool,
    /// For each node a request passes, top first: that node's offset of guest
    /// offset 0. Its statistics region comes in the same order.
    pub layers: Vec<u64>,
    /// The top node is a format node: guest offsets lie where its worker says
    /// (`base` unused), reads only.
    pub format: bool,
}

/// A negotiated NBD client, as the listener hands it over (`--isolation image`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdHandOff {
    /// The NBD export name it chose.
    pub export: String,
    /// Reply format negotiated.
    pub mode: NbdMode,
    /// `base:allocation` selected.
    pub base_allocation: bool,
    /// `qemu:allocation-depth` selected.
    pub allocation_depth: bool,
    /// The export's bitmaps selected, as ascending indexes into its list.
    pub bitmaps: Vec<u32>,
    /// The final negotiation reply, still to be sent (at most 134 bytes).
    pub reply: Vec<u8>,
    /// Bytes the client sent after it that the listener read (at most 4 KiB).
    pub leftover: Vec<u8>,
}

/// NBD reply format negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NbdMode {
    /// Old-style EXPORT_NAME, simple replies.
    ExportName,
    /// Simple replies.
    Simple,
    /// Structured replies.
    Structured,
    /// Extended headers.
    Extended,
}

/// A block export as the supervisor numbers it: assigned at `block-export-add`,
/// never reused, so a late report about an old export cannot hit a new one of the
/// same name. Workers key their exports by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExportKey(pub u64);

impl std::fmt::Display for ExportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "export#{}", self.0)
    }
}

/// One export as an export worker needs it: what every front has, and the front's
/// own options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSpec {
    /// The export.
    pub key: ExportKey,
    /// The exported node. A format node and its local protocol child share a worker,
    /// so a request crosses one process boundary whatever the chain.
    pub node: NodeRef,
    /// Clients may write.
    pub writable: bool,
    /// The front's options.
    pub front: FrontSpec,
}

/// The front an export is served through, with its options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrontSpec {
    /// NBD.
    Nbd(NbdExport),
}

/// The NBD options of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdExport {
    /// The NBD export name.
    pub name: String,
    /// Its description.
    pub description: Option<String>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// For the listener of `--isolation image`: the node's size, and the export is
    /// metadata only (negotiation, no data channel; `node` is not opened).
    pub metadata_size: Option<u64>,
    /// The dirty bitmaps offered as `qemu:dirty-bitmap:NAME`, in the option's order.
    pub bitmaps: Vec<NbdBitmap>,
}

/// A dirty bitmap an NBD export offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdBitmap {
    /// Its name.
    pub name: String,
    /// Bytes of its node it covers.
    pub size: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// The region shared earlier with [`ToWorker::ShareBitmaps`] (taken by this
    /// export); `None` for a metadata-only export, which never reads the bits.
    pub region: Option<u64>,
}

/// Most dirty-bitmap regions an export worker holds shared and not yet taken by an
/// export.
pub const MAX_SHARED_BITMAPS: usize = 1024;

/// A message from a worker to the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    /// Sent once, before anything else: the worker is up and reports its sandbox.
    Ready {
        /// Sandbox layers the worker applied to itself.
        sandbox: Vec<String>,
    },
    /// Something happened that the supervisor did not ask about just now.
    Event(WorkerEvent),
    /// The answer to request `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// Its outcome.
        result: Result<Reply, WorkerError>,
    },
    /// A question for the supervisor (answered with [`SupervisorMessage::Answer`]).
    /// A worker may ask only about its own nodes, with few questions outstanding and
    /// at a bounded rate; the supervisor checks every one against its policy.
    Ask {
        /// Chosen by the worker, echoed in the answer.
        id: u64,
        /// The question.
        body: WorkerAsk,
    },
}

/// What a worker can ask the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerAsk {
    /// Open a file named inside the image of `node` (a backing file, an external data
    /// file). Workers never open paths: the supervisor resolves the name (relative to
    /// the image's directory), applies its policy and answers [`Answer::File`] with the
    /// descriptor attached.
    OpenFile {
        /// The asking worker's node whose image names the file.
        node: NodeId,
        /// The name as the image spells it.
        filename: String,
        /// Open for writing too.
        writable: bool,
    },
    /// The NBD listener (`--isolation image`) negotiated a client: pass its socket
    /// (attached: the only question that carries a descriptor, and only from the
    /// listener) to the export's own worker. Answered [`Answer::HandedOff`].
    NbdHandOff(NbdHandOff),
}

/// A successful answer to a [`WorkerAsk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The file is open; its descriptor is attached.
    File,
    /// The export's worker took the client over.
    HandedOff,
}

/// Unsolicited news from a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerEvent {
    /// The last client of a removed export has gone.
    ExportGone {
        /// The export.
        export: ExportKey,
    },
    /// A write-type request of `node` ending at `end` crossed its write threshold
    /// `threshold`, which the node has cleared (driver workers; at most one per
    /// threshold the supervisor set).
    WriteThreshold {
        /// The node.
        node: NodeId,
        /// The threshold it crossed.
        threshold: u64,
        /// End offset of the request.
        end: u64,
    },
    /// A format driver found its image's metadata inconsistent (driver workers).
    /// `msg` comes from the worker: untrusted, shown only after the supervisor's
    /// checks.
    ImageCorrupted {
        /// The node.
        node: NodeId,
        /// QEMU's message for the inconsistency.
        msg: String,
        /// Host offset of the access that found it.
        offset: Option<u64>,
        /// Size of that access.
        size: Option<u64>,
        /// The image is now marked corrupt.
        fatal: bool,
    },
    /// Operation `op` has done `done` of `total` units (driver workers; at most one
    /// per 100 ms per operation; the supervisor keeps only the latest).
    Progress {
        /// The operation.
        op: OpId,
        /// Units done.
        done: u64,
        /// Units in all (may grow while it runs).
        total: u64,
    },
    /// Operation `op` (a mirror) has nothing dirty left for the first time: the
    /// target holds what the source does (driver workers; once per operation,
    /// after a `Progress` with its numbers).
    OperationReady {
        /// The operation.
        op: OpId,
    },
    /// Operation `op` ended (driver workers; once per operation).
    OperationEnded {
        /// The operation.
        op: OpId,
        /// How.
        result: Result<(), WorkerError>,
    },
    /// What the worker learned about `node`'s image (driver workers, for their own
    /// nodes; none sends it yet: qcow2 will).
    ImageInfo {
        /// The node.
        node: NodeId,
        /// The information.
        info: ImageInfo,
    },
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The request was carried out.
    Done,
    /// A node's state.
    NodeInfo {
        /// Size in bytes.
        size: u64,
        /// What its format driver read from its image (untrusted: image bytes).
        format: Option<Box<bulkhead_block::FormatInfo>>,
    },
    /// A deleted snapshot (from the image: untrusted strings).
    Snapshot {
        /// What the snapshot table said of it.
        snapshot: bulkhead_block::SnapshotEntry,
    },
    /// An export was removed; `deferred` when clients were still attached and
    /// `ExportGone` will follow once they have gone.
    ExportRemoved {
        /// Clients were attached.
        deferred: bool,
    },
}

/// Why a worker could not carry out a request. The supervisor renders user-visible
/// text from the kind; the detail is for logs only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?} (errno {errno}): {detail}")]
pub struct WorkerError {
    /// Classification.
    pub kind: WorkerErrorKind,
    /// The errno behind it, or 0.
    pub errno: i32,
    /// Detail for logs (bounded by the message size limit, never shown to clients).
    pub detail: String,
}

/// Classification of worker errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerErrorKind {
    /// The request names a node, export or channel the worker does not have.
    NotFound,
    /// The request is not valid for this worker or node.
    Invalid,
    /// The operation is not supported by the driver.
    Unsupported,
    /// The operation failed in the OS.
    Io,
    /// A copy (a long operation) failed reading its source: the job's
    /// `on-source-error` applies.
    SourceIo,
    /// Clients are attached (safe export removal).
    InUse,
    /// The operation was cancelled.
    Cancelled,
    /// The worker runs as many operations as it may.
    Busy,
    /// The image refuses to open (a format's header or tables): `detail` is QEMU's
    /// text for it, which the supervisor shows the client once it has checked it is
    /// short printable text.
    Image,
    /// The image names an external data file its options did not give: `detail` is
    /// the name, from the image (untrusted).
    NeedsDataFile,
}

impl WorkerError {
    /// Builds an error of `kind` with a detail for logs.
    pub fn new(kind: WorkerErrorKind, errno: i32, detail: impl Into<String>) -> WorkerError {
        let mut detail = detail.into();
        // Keep replies well under the message limit whatever the detail says.
        if detail.len() > 1024 {
            let mut cut = 1024;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        WorkerError {
            kind,
            errno,
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn every_worker_kind_name_parses_back() {
        for k in WorkerKind::all() {
            assert_eq!(WorkerKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(WorkerKind::parse("vhdx"), None);
    }

    #[test]
    fn requests_round_trip_through_the_codec() {
        let req = Request {
            id: 7,
            body: ToWorker::AddNode {
                node: NodeId(3),
                name: "disk".into(),
                config: DriverConfig::Raw(bulkhead_block::raw::RawConfig {
                    offset: 512,
                    size: Some(4096),
                    ..Default::default()
                }),
                children: vec![(
                    ChildRole::File,
                    NodeRef {
                        node: NodeId(2),
                        home: WorkerId(1),
                    },
                )],
                bitmaps: Vec::new(),
            },
        };
        let bytes = codec::encode(&req).unwrap();
        let back: Request = codec::decode(&bytes).unwrap();
        assert_eq!(back.id, 7);
        assert!(matches!(
            back.body,
            ToWorker::AddNode {
                node: NodeId(3),
                ..
            }
        ));
    }
}
