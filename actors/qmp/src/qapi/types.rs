//! Typed argument structs for the commands and command-line options bulkhead handles.
//!
//! Each struct mirrors a QAPI type in `schema/` with QAPI's wire names; a handler
//! deserializes the value [`super::Schema::check_command_args`] (or
//! [`super::Schema::check_type`]) returned, so a struct only ever sees arguments the
//! visitor already accepted, and deserialization cannot fail for them. Structs deny
//! unknown fields and the unit tests feed them samples holding every schema member, so
//! a schema change that a struct does not follow fails the build's tests instead of
//! silently dropping a member.
//!
//! Flat unions (`BlockdevOptions`, `BlockExportOptions`) are a base struct plus an enum
//! of per-discriminator members; serde cannot combine `flatten` with
//! `deny_unknown_fields`, so they split the object by the base's member names first.
//!
//! Runs in the supervisor on already-validated arguments.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Arguments of commands that take none (`query-version`, `quit`, `query-block`,
/// `x-debug-query-block-graph`, `nbd-server-stop`, `query-block-exports`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// `QMPCapability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QmpCapability {
    /// Out-of-band execution.
    Oob,
}

/// `qmp_capabilities`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QmpCapabilitiesArgs {
    /// Capabilities to enable.
    pub enable: Option<Vec<QmpCapability>>,
}

/// `blockdev-del`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevDelArgs {
    /// Node to delete.
    pub node_name: String,
}

/// `x-bulkhead-replace-node` (a test hook).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XBulkheadReplaceNodeArgs {
    /// The node whose users move.
    pub old: String,
    /// The node they use from now on.
    pub new: String,
}

/// `x-bulkhead-insert-filter` (a test hook).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XBulkheadInsertFilterArgs {
    /// The node the filter goes above.
    pub node: String,
    /// The filter.
    pub filter: String,
}

/// `x-bulkhead-remove-filter` (a test hook).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XBulkheadRemoveFilterArgs {
    /// The filter.
    pub filter: String,
}

/// `query-named-block-nodes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QueryNamedBlockNodesArgs {
    /// Omit nested `backing-image` information.
    pub flat: Option<bool>,
}

/// `query-blockstats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QueryBlockstatsArgs {
    /// List every node (not only named BlockBackends).
    pub query_nodes: Option<bool>,
}

/// `block_resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockResizeArgs {
    /// BlockBackend name (qsd has none; kept for the error text).
    pub device: Option<String>,
    /// Node to resize.
    pub node_name: Option<String>,
    /// New size in bytes (QAPI `int`: negative values pass the visitor).
    pub size: i64,
}

// ---------------------------------------------------------------- sockets

/// `InetSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InetSocketAddress {
    /// Host name or address.
    pub host: String,
    /// Port number or service name.
    pub port: String,
    /// Host and port are numeric, skip name resolution.
    pub numeric: Option<bool>,
    /// Try ports up to this one.
    pub to: Option<u16>,
    /// Restrict to IPv4.
    pub ipv4: Option<bool>,
    /// Restrict to IPv6.
    pub ipv6: Option<bool>,
    /// Enable TCP keep-alive.
    pub keep_alive: Option<bool>,
    /// Use MPTCP.
    pub mptcp: Option<bool>,
}

/// `UnixSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UnixSocketAddress {
    /// Filesystem path (or abstract name).
    pub path: String,
    /// Linux abstract socket namespace.
    #[serde(rename = "abstract")]
    pub is_abstract: Option<bool>,
    /// Abstract address length is the name's length.
    pub tight: Option<bool>,
}

/// `VsockSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VsockSocketAddress {
    /// Context id.
    pub cid: String,
    /// Port.
    pub port: String,
}

/// `FdSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FdSocketAddress {
    /// A file descriptor number or name passed with `getfd`.
    #[serde(rename = "str")]
    pub fd: String,
}

/// `SocketAddress` (flat: `{"type": "unix", "path": ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SocketAddress {
    /// TCP.
    Inet(InetSocketAddress),
    /// Unix domain socket.
    Unix(UnixSocketAddress),
    /// AF_VSOCK.
    Vsock(VsockSocketAddress),
    /// An inherited file descriptor.
    Fd(FdSocketAddress),
}

/// `SocketAddressLegacy` (`{"type": "unix", "data": {"path": ...}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    content = "data",
    rename_all = "kebab-case",
    deny_unknown_fields
)]
pub enum SocketAddressLegacy {
    /// TCP.
    Inet(InetSocketAddress),
    /// Unix domain socket.
    Unix(UnixSocketAddress),
    /// AF_VSOCK.
    Vsock(VsockSocketAddress),
    /// An inherited file descriptor.
    Fd(FdSocketAddress),
}

impl From<SocketAddressLegacy> for SocketAddress {
    fn from(a: SocketAddressLegacy) -> Self {
        match a {
            SocketAddressLegacy::Inet(x) => SocketAddress::Inet(x),
            SocketAddressLegacy::Unix(x) => SocketAddress::Unix(x),
            SocketAddressLegacy::Vsock(x) => SocketAddress::Vsock(x),
            SocketAddressLegacy::Fd(x) => SocketAddress::Fd(x),
        }
    }
}

// ---------------------------------------------------------------- NBD server

/// `nbd-server-start` (`NbdServerOptionsLegacy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NbdServerStartArgs {
    /// Seconds a client may take for the handshake (default 10, 0 = no limit).
    pub handshake_max_seconds: Option<u32>,
    /// `tls-creds-*` object id.
    pub tls_creds: Option<String>,
    /// `authz-*` object id.
    pub tls_authz: Option<String>,
    /// Client limit (default 100, 0 = unlimited).
    pub max_connections: Option<u32>,
    /// Listening address.
    pub addr: SocketAddressLegacy,
}

/// `--nbd-server` on the command line (`NbdServerOptions`, flat `SocketAddress`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NbdServerOptions {
    /// Seconds a client may take for the handshake (default 10, 0 = no limit).
    pub handshake_max_seconds: Option<u32>,
    /// `tls-creds-*` object id.
    pub tls_creds: Option<String>,
    /// `authz-*` object id.
    pub tls_authz: Option<String>,
    /// Client limit (default 100, 0 = unlimited).
    pub max_connections: Option<u32>,
    /// Listening address.
    pub addr: SocketAddress,
}

/// `nbd-server-add` (deprecated; `NbdServerAddOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NbdServerAddArgs {
    /// Export name (default: the device).
    pub name: Option<String>,
    /// Free-form description.
    pub description: Option<String>,
    /// Node name to export.
    pub device: String,
    /// Allow writes.
    pub writable: Option<bool>,
    /// Dirty bitmap to expose.
    pub bitmap: Option<String>,
}

/// `BlockExportRemoveMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportRemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Disconnect clients.
    Hard,
}

/// `nbd-server-remove` (deprecated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NbdServerRemoveArgs {
    /// Export name.
    pub name: String,
    /// Removal mode (default safe).
    pub mode: Option<BlockExportRemoveMode>,
}

// ---------------------------------------------------------------- exports

/// `BlockDirtyBitmap`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockDirtyBitmap {
    /// Node holding the bitmap.
    pub node: String,
    /// Bitmap name.
    pub name: String,
}

/// `BlockDirtyBitmapOrStr`: a bitmap on the exported node, or on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BlockDirtyBitmapOrStr {
    /// Bitmap name on the same node.
    Local(String),
    /// Bitmap on a named node.
    External(BlockDirtyBitmap),
}

/// `BlockExportType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportType {
    /// NBD.
    Nbd,
    /// vhost-user-blk.
    VhostUserBlk,
    /// FUSE.
    Fuse,
    /// VDUSE.
    VduseBlk,
}

/// `BlockExportOptions`' common members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockExportCommon {
    /// Export type (the discriminator).
    #[serde(rename = "type")]
    pub export_type: BlockExportType,
    /// Export id.
    pub id: String,
    /// Fail instead of moving the node to another iothread.
    pub fixed_iothread: Option<bool>,
    /// Iothread to run in.
    pub iothread: Option<String>,
    /// Node to export.
    pub node_name: String,
    /// Allow writes.
    pub writable: Option<bool>,
    /// Flush after every write.
    pub writethrough: Option<bool>,
    /// Allow exporting an inactive node.
    pub allow_inactive: Option<bool>,
}

/// `BlockExportOptionsNbd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockExportOptionsNbd {
    /// Export name (default: the node name).
    pub name: Option<String>,
    /// Free-form description.
    pub description: Option<String>,
    /// Bitmaps to expose as `qemu:dirty-bitmap:<name>`.
    pub bitmaps: Option<Vec<BlockDirtyBitmapOrStr>>,
    /// Expose `qemu:allocation-depth`.
    pub allocation_depth: Option<bool>,
}

/// `BlockExportOptionsVhostUserBlk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockExportOptionsVhostUserBlk {
    /// Listening socket.
    pub addr: SocketAddress,
    /// Logical block size (QAPI `size`).
    pub logical_block_size: Option<u64>,
    /// Number of virtqueues.
    pub num_queues: Option<u16>,
}

/// `FuseExportAllowOther`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FuseExportAllowOther {
    /// Only the owner.
    Off,
    /// Everyone.
    On,
    /// Try on, fall back to off.
    Auto,
}

/// `BlockExportOptionsFuse`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockExportOptionsFuse {
    /// Regular file to mount over.
    pub mountpoint: String,
    /// Writes past the end grow the export.
    pub growable: Option<bool>,
    /// `allow_other` mount option.
    pub allow_other: Option<FuseExportAllowOther>,
}

/// `BlockExportOptionsVduseBlk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockExportOptionsVduseBlk {
    /// VDUSE device name.
    pub name: String,
    /// Number of virtqueues.
    pub num_queues: Option<u16>,
    /// Virtqueue size.
    pub queue_size: Option<u16>,
    /// Logical block size (QAPI `size`).
    pub logical_block_size: Option<u64>,
    /// Serial number.
    pub serial: Option<String>,
}

/// The type-specific members of `BlockExportOptions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockExportKind {
    /// `type: nbd`.
    Nbd(BlockExportOptionsNbd),
    /// `type: vhost-user-blk`.
    VhostUserBlk(BlockExportOptionsVhostUserBlk),
    /// `type: fuse`.
    Fuse(BlockExportOptionsFuse),
    /// `type: vduse-blk`.
    VduseBlk(BlockExportOptionsVduseBlk),
}

/// `block-export-add` and `--export` (`BlockExportOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockExportOptions {
    /// Members every export type has.
    pub common: BlockExportCommon,
    /// Members of the selected type.
    pub kind: BlockExportKind,
}

const EXPORT_BASE: &[&str] = &[
    "type",
    "id",
    "fixed-iothread",
    "iothread",
    "node-name",
    "writable",
    "writethrough",
    "allow-inactive",
];

/// Splits a flat union's object into (base members, the rest).
fn split(map: Map<String, Value>, base: &[&str]) -> (Map<String, Value>, Map<String, Value>) {
    map.into_iter()
        .partition(|(k, _)| base.contains(&k.as_str()))
}

fn from_map<T: DeserializeOwned, E: serde::de::Error>(m: Map<String, Value>) -> Result<T, E> {
    serde_json::from_value(Value::Object(m)).map_err(E::custom)
}

impl<'de> Deserialize<'de> for BlockExportOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Map::deserialize(d)?;
        let (base, rest) = split(map, EXPORT_BASE);
        let common: BlockExportCommon = from_map(base)?;
        let kind = match common.export_type {
            BlockExportType::Nbd => BlockExportKind::Nbd(from_map(rest)?),
            BlockExportType::VhostUserBlk => BlockExportKind::VhostUserBlk(from_map(rest)?),
            BlockExportType::Fuse => BlockExportKind::Fuse(from_map(rest)?),
            BlockExportType::VduseBlk => BlockExportKind::VduseBlk(from_map(rest)?),
        };
        Ok(BlockExportOptions { common, kind })
    }
}

/// `block-export-del`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockExportDelArgs {
    /// Export id.
    pub id: String,
    /// Removal mode (default safe).
    pub mode: Option<BlockExportRemoveMode>,
}

// ---------------------------------------------------------------- blockdev-add

/// `BlockdevDriver`: every driver name qsd 10.0.2 accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum BlockdevDriver {
    #[serde(rename = "blkdebug")]
    Blkdebug,
    #[serde(rename = "blklogwrites")]
    Blklogwrites,
    #[serde(rename = "blkreplay")]
    Blkreplay,
    #[serde(rename = "blkverify")]
    Blkverify,
    #[serde(rename = "bochs")]
    Bochs,
    #[serde(rename = "cloop")]
    Cloop,
    #[serde(rename = "compress")]
    Compress,
    #[serde(rename = "copy-before-write")]
    CopyBeforeWrite,
    #[serde(rename = "copy-on-read")]
    CopyOnRead,
    #[serde(rename = "dmg")]
    Dmg,
    #[serde(rename = "file")]
    File,
    #[serde(rename = "snapshot-access")]
    SnapshotAccess,
    #[serde(rename = "ftp")]
    Ftp,
    #[serde(rename = "ftps")]
    Ftps,
    #[serde(rename = "gluster")]
    Gluster,
    #[serde(rename = "host_cdrom")]
    HostCdrom,
    #[serde(rename = "host_device")]
    HostDevice,
    #[serde(rename = "http")]
    Http,
    #[serde(rename = "https")]
    Https,
    #[serde(rename = "iscsi")]
    Iscsi,
    #[serde(rename = "luks")]
    Luks,
    #[serde(rename = "nbd")]
    Nbd,
    #[serde(rename = "nfs")]
    Nfs,
    #[serde(rename = "null-aio")]
    NullAio,
    #[serde(rename = "null-co")]
    NullCo,
    #[serde(rename = "nvme")]
    Nvme,
    #[serde(rename = "parallels")]
    Parallels,
    #[serde(rename = "preallocate")]
    Preallocate,
    #[serde(rename = "qcow")]
    Qcow,
    #[serde(rename = "qcow2")]
    Qcow2,
    #[serde(rename = "qed")]
    Qed,
    #[serde(rename = "quorum")]
    Quorum,
    #[serde(rename = "raw")]
    Raw,
    #[serde(rename = "rbd")]
    Rbd,
    #[serde(rename = "replication")]
    Replication,
    #[serde(rename = "ssh")]
    Ssh,
    #[serde(rename = "throttle")]
    Throttle,
    #[serde(rename = "vdi")]
    Vdi,
    #[serde(rename = "vhdx")]
    Vhdx,
    #[serde(rename = "vmdk")]
    Vmdk,
    #[serde(rename = "vpc")]
    Vpc,
    #[serde(rename = "vvfat")]
    Vvfat,
}

/// `BlockdevDiscardOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDiscardOptions {
    /// Ignore discard requests.
    Ignore,
    /// Forward them.
    Unmap,
}

/// `BlockdevDetectZeroesOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevDetectZeroesOptions {
    /// No detection.
    Off,
    /// Turn zero writes into write-zeroes.
    On,
    /// ... with unmap when discard=unmap.
    Unmap,
}

/// `BlockdevCacheOptions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevCacheOptions {
    /// O_DIRECT.
    pub direct: Option<bool>,
    /// Ignore flushes.
    pub no_flush: Option<bool>,
}

/// `BlockdevOptions`' base members (shared by every driver).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevOptionsBase {
    /// Driver (the discriminator).
    pub driver: BlockdevDriver,
    /// Node name.
    pub node_name: Option<String>,
    /// Discard handling.
    pub discard: Option<BlockdevDiscardOptions>,
    /// Cache modes.
    pub cache: Option<BlockdevCacheOptions>,
    /// Start active (10.0).
    pub active: Option<bool>,
    /// Open read-only.
    pub read_only: Option<bool>,
    /// Fall back to read-only if read-write fails.
    pub auto_read_only: Option<bool>,
    /// Override image locking.
    pub force_share: Option<bool>,
    /// Zero-write detection.
    pub detect_zeroes: Option<BlockdevDetectZeroesOptions>,
}

const BLOCKDEV_BASE: &[&str] = &[
    "driver",
    "node-name",
    "discard",
    "cache",
    "active",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
];

/// `BlockdevRef`: an inline node definition or a node name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum BlockdevRef {
    /// An inline child node.
    Definition(Box<BlockdevOptions>),
    /// An existing node's name.
    Reference(String),
}

/// `BlockdevRefOrNull`: like [`BlockdevRef`], or `null` for "no backing file".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum BlockdevRefOrNull {
    /// An inline child node.
    Definition(Box<BlockdevOptions>),
    /// An existing node's name (`""` also means none).
    Reference(String),
    /// Explicitly no node.
    Null,
}

/// `blockdev-add` and `--blockdev` (`BlockdevOptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockdevOptions {
    /// Members every driver has.
    pub base: BlockdevOptionsBase,
    /// Members of the selected driver, as checked (normalized) by the visitor. Each
    /// driver decodes its own (`bulkhead_block::driver::BlockDriver::parse`); the
    /// supervisor resolves the children among them (`file`, `backing`, ...), which
    /// decode as [`BlockdevRef`] or [`BlockdevRefOrNull`].
    pub members: Map<String, Value>,
}

impl<'de> Deserialize<'de> for BlockdevOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Map::deserialize(d)?;
        if !map.contains_key("driver") {
            return Err(D::Error::missing_field("driver"));
        }
        let (base, rest) = split(map, BLOCKDEV_BASE);
        let base: BlockdevOptionsBase = from_map(base)?;
        Ok(BlockdevOptions {
            base,
            members: rest,
        })
    }
}

// ---------------------------------------------------------------- bitmaps

/// `block-dirty-bitmap-add` (`BlockDirtyBitmapAdd`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockDirtyBitmapAdd {
    /// Node to track.
    pub node: String,
    /// Bitmap name.
    pub name: String,
    /// Bytes per bit (power of two, default from the cluster size).
    pub granularity: Option<u32>,
    /// Store in the image on close.
    pub persistent: Option<bool>,
    /// Create disabled.
    pub disabled: Option<bool>,
}

/// `block-dirty-bitmap-merge` (`BlockDirtyBitmapMerge`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockDirtyBitmapMerge {
    /// Node of the target bitmap.
    pub node: String,
    /// Target bitmap.
    pub target: String,
    /// Sources.
    pub bitmaps: Vec<BlockDirtyBitmapOrStr>,
}

// ---------------------------------------------------------------- jobs

/// `BlockdevOnError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockdevOnError {
    /// Report the error (fail the request or job).
    Report,
    /// Ignore it.
    Ignore,
    /// Stop on ENOSPC, report otherwise.
    Enospc,
    /// Pause the job.
    Stop,
    /// Inherit from the device.
    Auto,
}

/// `MirrorSyncMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorSyncMode {
    /// Only the top image's allocated data.
    Top,
    /// Everything.
    Full,
    /// Only new writes.
    None,
    /// Bitmap-driven (older spelling).
    Incremental,
    /// Bitmap-driven.
    Bitmap,
}

/// `BitmapSyncMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapSyncMode {
    /// Clear the bitmap when the job succeeds.
    OnSuccess,
    /// Never clear.
    Never,
    /// Always clear what was copied.
    Always,
}

/// `MirrorCopyMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorCopyMode {
    /// Copy in the background.
    Background,
    /// Also mirror guest writes synchronously.
    WriteBlocking,
}

/// `NewImageMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewImageMode {
    /// Use an existing image.
    Existing,
    /// Create it with absolute backing paths.
    AbsolutePaths,
}

/// `BackupPerf`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BackupPerf {
    /// Use copy_range.
    pub use_copy_range: Option<bool>,
    /// Parallel requests.
    pub max_workers: Option<i64>,
    /// Largest request.
    pub max_chunk: Option<i64>,
    /// Smallest copy unit (QAPI `size`).
    pub min_cluster_size: Option<u64>,
}

/// `blockdev-backup` (`BlockdevBackup` = `BackupCommon` + target node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevBackupArgs {
    /// Job id.
    pub job_id: Option<String>,
    /// Source node.
    pub device: String,
    /// What to copy.
    pub sync: MirrorSyncMode,
    /// Rate limit, bytes/s.
    pub speed: Option<i64>,
    /// Bitmap for `bitmap`/`incremental` sync.
    pub bitmap: Option<String>,
    /// When to clear the bitmap.
    pub bitmap_mode: Option<BitmapSyncMode>,
    /// Compress the target.
    pub compress: Option<bool>,
    /// Read error policy.
    pub on_source_error: Option<BlockdevOnError>,
    /// Write error policy.
    pub on_target_error: Option<BlockdevOnError>,
    /// Finalize without `job-finalize`.
    pub auto_finalize: Option<bool>,
    /// Dismiss without `job-dismiss`.
    pub auto_dismiss: Option<bool>,
    /// Name of the inserted filter node.
    pub filter_node_name: Option<String>,
    /// Discard copied source data.
    pub discard_source: Option<bool>,
    /// Performance tuning.
    pub x_perf: Option<BackupPerf>,
    /// Target node.
    pub target: String,
}

/// `blockdev-mirror`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevMirrorArgs {
    /// Job id.
    pub job_id: Option<String>,
    /// Source node.
    pub device: String,
    /// Target node.
    pub target: String,
    /// Node to replace on completion.
    pub replaces: Option<String>,
    /// What to copy.
    pub sync: MirrorSyncMode,
    /// Rate limit, bytes/s.
    pub speed: Option<i64>,
    /// Dirty tracking granularity.
    pub granularity: Option<u32>,
    /// Copy buffer size.
    pub buf_size: Option<i64>,
    /// Read error policy.
    pub on_source_error: Option<BlockdevOnError>,
    /// Write error policy.
    pub on_target_error: Option<BlockdevOnError>,
    /// Name of the inserted filter node.
    pub filter_node_name: Option<String>,
    /// Background or write-blocking.
    pub copy_mode: Option<MirrorCopyMode>,
    /// Finalize without `job-finalize`.
    pub auto_finalize: Option<bool>,
    /// Dismiss without `job-dismiss`.
    pub auto_dismiss: Option<bool>,
}

/// `block-stream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockStreamArgs {
    /// Job id.
    pub job_id: Option<String>,
    /// Top node.
    pub device: String,
    /// Base by file name.
    pub base: Option<String>,
    /// Base by node name.
    pub base_node: Option<String>,
    /// Backing file string to write.
    pub backing_file: Option<String>,
    /// Strip the protocol prefix from it.
    pub backing_mask_protocol: Option<bool>,
    /// Bottom node (exclusive of base).
    pub bottom: Option<String>,
    /// Rate limit, bytes/s.
    pub speed: Option<i64>,
    /// Error policy.
    pub on_error: Option<BlockdevOnError>,
    /// Name of the inserted filter node.
    pub filter_node_name: Option<String>,
    /// Finalize without `job-finalize`.
    pub auto_finalize: Option<bool>,
    /// Dismiss without `job-dismiss`.
    pub auto_dismiss: Option<bool>,
}

/// `block-commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockCommitArgs {
    /// Job id.
    pub job_id: Option<String>,
    /// Active-layer node.
    pub device: String,
    /// Base by node name.
    pub base_node: Option<String>,
    /// Base by file name.
    pub base: Option<String>,
    /// Top by node name.
    pub top_node: Option<String>,
    /// Top by file name.
    pub top: Option<String>,
    /// Backing file string to write.
    pub backing_file: Option<String>,
    /// Strip the protocol prefix from it.
    pub backing_mask_protocol: Option<bool>,
    /// Rate limit, bytes/s.
    pub speed: Option<i64>,
    /// Error policy.
    pub on_error: Option<BlockdevOnError>,
    /// Name of the inserted filter node.
    pub filter_node_name: Option<String>,
    /// Finalize without `job-finalize`.
    pub auto_finalize: Option<bool>,
    /// Dismiss without `job-dismiss`.
    pub auto_dismiss: Option<bool>,
}

/// `block-job-pause`, `-resume`, `-complete` (`device` is the job id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockJobDeviceArgs {
    /// Job id (historically the device name).
    pub device: String,
}

/// `block-job-cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockJobCancelArgs {
    /// Job id.
    pub device: String,
    /// Cancel even if paused; abandon a ready mirror.
    pub force: Option<bool>,
}

/// `block-job-set-speed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockJobSetSpeedArgs {
    /// Job id.
    pub device: String,
    /// Bytes/s, 0 = unlimited.
    pub speed: i64,
}

/// `job-*` commands and `block-job-dismiss`/`-finalize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JobIdArgs {
    /// Job id.
    pub id: String,
}

/// `block-set-write-threshold`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockSetWriteThresholdArgs {
    /// Node to watch.
    pub node_name: String,
    /// Offset in bytes, 0 disables.
    pub write_threshold: u64,
}

// ---------------------------------------------------------------- snapshots, graph

/// `blockdev-snapshot-sync` (`BlockdevSnapshotSync`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevSnapshotSync {
    /// Device name.
    pub device: Option<String>,
    /// Node name.
    pub node_name: Option<String>,
    /// New overlay file.
    pub snapshot_file: String,
    /// Node name for the overlay.
    pub snapshot_node_name: Option<String>,
    /// Overlay format (default qcow2).
    pub format: Option<String>,
    /// Create or reuse.
    pub mode: Option<NewImageMode>,
}

/// `blockdev-snapshot` (`BlockdevSnapshot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevSnapshot {
    /// Node that becomes the backing file.
    pub node: String,
    /// Node that becomes the new top.
    pub overlay: String,
}

/// `blockdev-snapshot-internal-sync` (`BlockdevSnapshotInternal`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevSnapshotInternal {
    /// Device or node name.
    pub device: String,
    /// Snapshot name.
    pub name: String,
}

/// `blockdev-snapshot-delete-internal-sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevSnapshotDeleteInternalArgs {
    /// Device or node name.
    pub device: String,
    /// Snapshot id.
    pub id: Option<String>,
    /// Snapshot name.
    pub name: Option<String>,
}

/// `change-backing-file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChangeBackingFileArgs {
    /// Device or node name of the active layer.
    pub device: String,
    /// Node whose header is rewritten.
    pub image_node_name: String,
    /// New backing file string.
    pub backing_file: String,
}

/// `blockdev-reopen`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevReopenArgs {
    /// New options, one per node.
    pub options: Vec<BlockdevOptions>,
}

/// `blockdev-set-active`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlockdevSetActiveArgs {
    /// Node (all nodes when absent).
    pub node_name: Option<String>,
    /// Activate or inactivate.
    pub active: bool,
}

/// `object-del`, `chardev-remove`, `chardev-send-break` (an id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IdArgs {
    /// Object or chardev id.
    pub id: String,
}

// ---------------------------------------------------------------- transaction

/// `ActionCompletionMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionCompletionMode {
    /// Each job completes on its own.
    Individual,
    /// All jobs complete or fail together.
    Grouped,
}

/// `TransactionProperties`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TransactionProperties {
    /// Job completion grouping.
    pub completion_mode: Option<ActionCompletionMode>,
}

/// `Abort` (the empty action data).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {}

/// `TransactionAction` (`{"type": ..., "data": {...}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    content = "data",
    rename_all = "kebab-case",
    deny_unknown_fields
)]
pub enum TransactionAction {
    /// Always fails (for testing).
    Abort(Abort),
    /// `block-dirty-bitmap-add`.
    BlockDirtyBitmapAdd(BlockDirtyBitmapAdd),
    /// `block-dirty-bitmap-remove`.
    BlockDirtyBitmapRemove(BlockDirtyBitmap),
    /// `block-dirty-bitmap-clear`.
    BlockDirtyBitmapClear(BlockDirtyBitmap),
    /// `block-dirty-bitmap-enable`.
    BlockDirtyBitmapEnable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-disable`.
    BlockDirtyBitmapDisable(BlockDirtyBitmap),
    /// `block-dirty-bitmap-merge`.
    BlockDirtyBitmapMerge(BlockDirtyBitmapMerge),
    /// `blockdev-backup`.
    BlockdevBackup(BlockdevBackupArgs),
    /// `blockdev-snapshot`.
    BlockdevSnapshot(BlockdevSnapshot),
    /// `blockdev-snapshot-internal-sync`.
    BlockdevSnapshotInternalSync(BlockdevSnapshotInternal),
    /// `blockdev-snapshot-sync`.
    BlockdevSnapshotSync(BlockdevSnapshotSync),
    /// `drive-backup` (deprecated): kept as checked, not typed.
    DriveBackup(Map<String, Value>),
}

/// `transaction`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TransactionArgs {
    /// Actions, applied all-or-nothing.
    pub actions: Vec<TransactionAction>,
    /// Options.
    pub properties: Option<TransactionProperties>,
}

// ---------------------------------------------------------------- command line

/// `MonitorMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MonitorMode {
    /// HMP; qsd refuses it ("Only QMP is supported").
    Readline,
    /// QMP.
    Control,
}

/// `--monitor` on the command line (`MonitorOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MonitorOptions {
    /// Monitor id.
    pub id: Option<String>,
    /// Protocol (default control).
    pub mode: Option<MonitorMode>,
    /// Pretty-print replies.
    pub pretty: Option<bool>,
    /// Chardev id to run on.
    pub chardev: String,
}

/// `x-bulkhead-test-fill` (bulkhead's own, test builds only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct XBulkheadTestFillArgs {
    /// The node.
    pub node_name: String,
    /// Start of the range.
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// The byte written.
    pub pattern: u8,
    /// Bytes per second.
    pub speed: Option<u64>,
    /// Milliseconds without progress before the operation fails.
    pub stall_ms: Option<u64>,
}

/// `x-bulkhead-operation-cancel` (bulkhead's own, test builds only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XBulkheadOperationCancelArgs {
    /// The operation.
    pub id: u64,
}

/// Sample values that hold every member a schema type has, for tests here and in the
/// crates that decode QAPI values themselves (the block drivers' options).
#[doc(hidden)]
pub mod samples {
    use serde_json::{Map, Value};

    use crate::qapi::Schema;
    use crate::qapi::schema::{Builtin, TypeDef, TypeRef};

    /// A value holding every member of `name` (optional ones too), picking `choice`
    /// wherever an enum has it (so unions take that variant) and the first value
    /// elsewhere; alternates take their first branch near the top and a string below.
    pub fn sample(schema: &Schema, name: &str, choice: &str, depth: usize) -> Value {
        match schema.type_def(name) {
            Some(TypeDef::Builtin(b)) => match b {
                Builtin::Str => Value::from("s"),
                Builtin::Int { .. } | Builtin::Uint { .. } => Value::from(1),
                Builtin::Size => Value::from(4096),
                Builtin::Bool => Value::from(true),
                Builtin::Number => Value::from(1.5),
                Builtin::Null => Value::Null,
                Builtin::Any => serde_json::json!({"x": 1}),
            },
            Some(TypeDef::Enum(e)) => {
                let v = e.values.iter().find(|v| *v == choice).or(e.values.first());
                Value::from(v.map(String::as_str).unwrap_or(""))
            }
            Some(TypeDef::Alternate(a)) => {
                let scalar = a.branches.iter().find(|(_, t)| {
                    matches!(
                        schema.type_def(t.name()),
                        Some(TypeDef::Builtin(Builtin::Str) | TypeDef::Enum(_))
                    )
                });
                let branch = if depth >= 2 {
                    scalar.or(a.branches.first())
                } else {
                    a.branches.first()
                };
                branch.map_or(Value::Null, |(_, t)| {
                    sample_ref(schema, t, choice, depth + 1)
                })
            }
            Some(TypeDef::Object(o)) => {
                let mut out = Map::new();
                fill(schema, o, choice, depth, &mut out);
                Value::Object(out)
            }
            None => panic!("sample of undefined type {name}"),
        }
    }

    fn sample_ref(schema: &Schema, t: &TypeRef, choice: &str, depth: usize) -> Value {
        match t {
            TypeRef::Named(n) => sample(schema, n, choice, depth),
            TypeRef::List(n) => Value::Array(vec![sample(schema, n, choice, depth)]),
        }
    }

    fn fill(
        schema: &Schema,
        o: &crate::qapi::schema::ObjectDef,
        choice: &str,
        depth: usize,
        out: &mut Map<String, Value>,
    ) {
        if let Some(Some(TypeDef::Object(b))) = o.base.as_deref().map(|b| schema.type_def(b)) {
            fill(schema, b, choice, depth, out);
        }
        for m in &o.members {
            out.insert(m.name.clone(), sample_ref(schema, &m.ty, choice, depth + 1));
        }
        if let Some(u) = &o.union {
            let tag = out
                .get(&u.discriminator)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if let Some((_, v)) = u.variants.iter().find(|(value, _)| *value == tag)
                && let Some(TypeDef::Object(vdef)) = schema.type_def(v)
            {
                fill(schema, vdef, choice, depth, out);
            }
        }
    }

    /// Arguments of `command` holding every member, checked and normalized by the
    /// visitor (`choice` picks union variants, as in [`sample`]).
    pub fn command_args(command: &str, choice: &str) -> Result<Value, crate::qapi::QapiError> {
        let schema = Schema::get();
        let arg_type = schema.command(command).and_then(|c| c.arg_type.clone());
        let args = match arg_type.map(|t| sample(schema, &t, choice, 0)) {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        schema.check_command_args(command, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::samples::sample;
    use super::*;
    use crate::qapi::{Flavour, Schema};

    fn typed<T: DeserializeOwned>(checked: Result<Value, crate::qapi::QapiError>) -> T {
        let v = match checked {
            Ok(v) => v,
            Err(e) => panic!("sample refused by the visitor: {e}"),
        };
        match serde_json::from_value(v.clone()) {
            Ok(t) => t,
            Err(e) => panic!("typed struct refused a checked value: {e}\n{v}"),
        }
    }

    fn full_args<T: DeserializeOwned>(command: &str, choice: &str) -> T {
        let schema = Schema::get();
        let arg_type = schema.command(command).and_then(|c| c.arg_type.clone());
        let args = match arg_type.map(|t| sample(schema, &t, choice, 0)) {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        typed(schema.check_command_args(command, &args))
    }

    fn full_type<T: DeserializeOwned>(type_name: &str, choice: &str) -> T {
        let schema = Schema::get();
        typed(schema.check_type(
            type_name,
            &sample(schema, type_name, choice, 0),
            Flavour::Json,
        ))
    }

    #[test]
    fn every_schema_member_of_the_handled_commands_reaches_the_typed_structs() {
        for cmd in [
            "query-version",
            "query-commands",
            "quit",
            "query-block",
            "x-debug-query-block-graph",
            "nbd-server-stop",
            "query-block-exports",
            "x-bulkhead-query-operations",
        ] {
            let _: NoArgs = full_args(cmd, "");
        }
        let fill: XBulkheadTestFillArgs = full_args("x-bulkhead-test-fill", "");
        assert_eq!((fill.speed, fill.stall_ms), (Some(1), Some(1)));
        let cancel: XBulkheadOperationCancelArgs = full_args("x-bulkhead-operation-cancel", "");
        assert_eq!(cancel.id, 1);
        let caps: QmpCapabilitiesArgs = full_args("qmp_capabilities", "");
        assert_eq!(caps.enable, Some(vec![QmpCapability::Oob]));
        let del: BlockdevDelArgs = full_args("blockdev-del", "");
        assert_eq!(del.node_name, "s");
        let r: XBulkheadReplaceNodeArgs = full_args("x-bulkhead-replace-node", "");
        assert_eq!((r.old.as_str(), r.new.as_str()), ("s", "s"));
        let i: XBulkheadInsertFilterArgs = full_args("x-bulkhead-insert-filter", "");
        assert_eq!((i.node.as_str(), i.filter.as_str()), ("s", "s"));
        let f: XBulkheadRemoveFilterArgs = full_args("x-bulkhead-remove-filter", "");
        assert_eq!(f.filter, "s");
        let nodes: QueryNamedBlockNodesArgs = full_args("query-named-block-nodes", "");
        assert_eq!(nodes.flat, Some(true));
        let resize: BlockResizeArgs = full_args("block_resize", "");
        assert_eq!(
            (
                resize.device.as_deref(),
                resize.node_name.as_deref(),
                resize.size
            ),
            (Some("s"), Some("s"), 1)
        );
        for addr in ["inet", "unix", "vsock", "fd"] {
            let start: NbdServerStartArgs = full_args("nbd-server-start", addr);
            assert_eq!(start.max_connections, Some(1));
            let cli: NbdServerOptions = full_type("NbdServerOptions", addr);
            assert_eq!(SocketAddress::from(start.addr), cli.addr);
        }
        let add: NbdServerAddArgs = full_args("nbd-server-add", "");
        assert_eq!(add.bitmap.as_deref(), Some("s"));
        let remove: NbdServerRemoveArgs = full_args("nbd-server-remove", "hard");
        assert_eq!(remove.mode, Some(BlockExportRemoveMode::Hard));
        let export_del: BlockExportDelArgs = full_args("block-export-del", "safe");
        assert_eq!(export_del.mode, Some(BlockExportRemoveMode::Safe));
        for ty in ["nbd", "vhost-user-blk", "fuse", "vduse-blk"] {
            let e: BlockExportOptions = full_args("block-export-add", ty);
            let cli: BlockExportOptions = full_type("BlockExportOptions", ty);
            assert_eq!(e, cli);
            assert_eq!(
                serde_json::to_value(e.common.export_type).ok(),
                Some(Value::from(ty))
            );
        }
        let _: BlockDirtyBitmapAdd = full_args("block-dirty-bitmap-add", "");
        for cmd in [
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
            "x-debug-block-dirty-bitmap-sha256",
        ] {
            let _: BlockDirtyBitmap = full_args(cmd, "");
        }
        let merge: BlockDirtyBitmapMerge = full_args("block-dirty-bitmap-merge", "");
        assert_eq!(
            merge.bitmaps,
            vec![BlockDirtyBitmapOrStr::Local("s".into())]
        );
        let backup: BlockdevBackupArgs = full_args("blockdev-backup", "incremental");
        assert_eq!(backup.sync, MirrorSyncMode::Incremental);
        assert_eq!(backup.x_perf.and_then(|p| p.min_cluster_size), Some(4096));
        let mirror: BlockdevMirrorArgs = full_args("blockdev-mirror", "write-blocking");
        assert_eq!(mirror.copy_mode, Some(MirrorCopyMode::WriteBlocking));
        let _: BlockStreamArgs = full_args("block-stream", "");
        let _: BlockCommitArgs = full_args("block-commit", "");
        for cmd in ["block-job-pause", "block-job-resume", "block-job-complete"] {
            let _: BlockJobDeviceArgs = full_args(cmd, "");
        }
        let _: BlockJobCancelArgs = full_args("block-job-cancel", "");
        let _: BlockJobSetSpeedArgs = full_args("block-job-set-speed", "");
        for cmd in [
            "job-pause",
            "job-resume",
            "job-cancel",
            "job-complete",
            "job-dismiss",
            "job-finalize",
            "block-job-dismiss",
            "block-job-finalize",
        ] {
            let _: JobIdArgs = full_args(cmd, "");
        }
        let _: BlockSetWriteThresholdArgs = full_args("block-set-write-threshold", "");
        let _: QueryBlockstatsArgs = full_args("query-blockstats", "");
        let _: BlockdevSnapshotSync = full_args("blockdev-snapshot-sync", "");
        let _: BlockdevSnapshot = full_args("blockdev-snapshot", "");
        let _: BlockdevSnapshotInternal = full_args("blockdev-snapshot-internal-sync", "");
        let _: BlockdevSnapshotDeleteInternalArgs =
            full_args("blockdev-snapshot-delete-internal-sync", "");
        let _: ChangeBackingFileArgs = full_args("change-backing-file", "");
        let _: BlockdevReopenArgs = full_args("blockdev-reopen", "raw");
        let _: BlockdevSetActiveArgs = full_args("blockdev-set-active", "");
        for cmd in ["object-del", "chardev-remove", "chardev-send-break"] {
            let _: IdArgs = full_args(cmd, "");
        }
        for kind in [
            "abort",
            "block-dirty-bitmap-add",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
            "block-dirty-bitmap-merge",
            "blockdev-backup",
            "blockdev-snapshot",
            "blockdev-snapshot-internal-sync",
            "blockdev-snapshot-sync",
            "drive-backup",
        ] {
            let t: TransactionArgs = full_args("transaction", kind);
            assert_eq!(
                t.properties.and_then(|p| p.completion_mode),
                Some(ActionCompletionMode::Individual)
            );
            let action = serde_json::to_value(&t.actions[0]).ok();
            assert_eq!(
                action.as_ref().and_then(|a| a.get("type")),
                Some(&Value::from(kind))
            );
        }
        for driver in [
            "file",
            "host_device",
            "host_cdrom",
            "raw",
            "null-co",
            "null-aio",
            "qcow2",
            "nbd",
        ] {
            let o: BlockdevOptions = full_args("blockdev-add", driver);
            assert_eq!(
                serde_json::to_value(o.base.driver).ok(),
                Some(Value::from(driver))
            );
            // The driver's own members stay for the driver to decode (the
            // supervisor checks every implemented driver's struct against them).
            assert!(!o.members.is_empty(), "{driver}");
            assert!(!o.members.contains_key("node-name"), "{driver}");
        }
    }

    #[test]
    fn a_checked_blockdev_add_deserializes_into_nested_typed_options() {
        let args = serde_json::json!({
            "driver": "raw", "node-name": "r", "read-only": true,
            "file": {"driver": "file", "filename": "/img", "aio": "io_uring", "locking": "off"}
        });
        let Value::Object(args) = args else {
            unreachable!()
        };
        let o: BlockdevOptions = typed(Schema::get().check_command_args("blockdev-add", &args));
        assert_eq!(o.base.node_name.as_deref(), Some("r"));
        assert_eq!(o.base.read_only, Some(true));
        let file = o
            .members
            .get("file")
            .cloned()
            .map(serde_json::from_value::<BlockdevRef>);
        let Some(Ok(BlockdevRef::Definition(file))) = file else {
            panic!("not inline: {:?}", o.members)
        };
        assert_eq!(
            Value::Object(file.members),
            serde_json::json!({"filename": "/img", "aio": "io_uring", "locking": "off"})
        );
    }

    #[test]
    fn keyval_blockdev_values_are_converted_per_schema_type() {
        let (v, flavour) = crate::qapi::tests::keyval(
            "driver=null-co,node-name=n0,size=0x100000,read-zeroes=on,latency-ns=-1,cache.direct=off",
            None,
        );
        let o: BlockdevOptions = typed(Schema::get().check_type("BlockdevOptions", &v, flavour));
        assert_eq!(
            o.base.cache,
            Some(BlockdevCacheOptions {
                direct: Some(false),
                no_flush: None
            })
        );
        assert_eq!(
            Value::Object(o.members),
            serde_json::json!({"size": 1 << 20, "read-zeroes": true, "latency-ns": u64::MAX})
        );
    }

    #[test]
    fn a_negative_null_co_size_passes_the_visitor_and_is_left_to_the_driver() {
        // qsd 10.0.2 accepts size=-5 here (QAPI 'int') and then aborts in
        // parse_option_size(); bulkhead's null driver must refuse it instead.
        let Value::Object(args) =
            serde_json::json!({"driver": "null-co", "node-name": "n", "size": -5})
        else {
            unreachable!()
        };
        let o: BlockdevOptions = typed(Schema::get().check_command_args("blockdev-add", &args));
        assert_eq!(Value::Object(o.members), serde_json::json!({"size": -5}));
        let (v, flavour) = crate::qapi::tests::keyval("driver=null-co,size=-5,node-name=n0", None);
        assert!(
            Schema::get()
                .check_type("BlockdevOptions", &v, flavour)
                .is_ok()
        );
    }

    #[test]
    fn command_line_monitor_options_deserialize() {
        let (v, flavour) = crate::qapi::tests::keyval("c0,pretty=on,mode=control", Some("chardev"));
        let m: MonitorOptions = typed(Schema::get().check_type("MonitorOptions", &v, flavour));
        assert_eq!(
            m,
            MonitorOptions {
                id: None,
                mode: Some(MonitorMode::Control),
                pretty: Some(true),
                chardev: "c0".into()
            }
        );
        let _: MonitorOptions = full_type("MonitorOptions", "");
    }

    #[test]
    fn command_line_nbd_server_and_export_options_deserialize() {
        let (v, flavour) = crate::qapi::tests::keyval(
            "addr.type=unix,addr.path=/run/nbd.sock,max-connections=1",
            None,
        );
        let s: NbdServerOptions = typed(Schema::get().check_type("NbdServerOptions", &v, flavour));
        assert_eq!(s.max_connections, Some(1));
        assert_eq!(
            s.addr,
            SocketAddress::Unix(UnixSocketAddress {
                path: "/run/nbd.sock".into(),
                is_abstract: None,
                tight: None
            })
        );
        let (v, flavour) = crate::qapi::tests::keyval(
            "type=nbd,id=e0,node-name=n0,writable=on,bitmaps.0=b0,bitmaps.1.node=n1,bitmaps.1.name=b1",
            None,
        );
        let e: BlockExportOptions =
            typed(Schema::get().check_type("BlockExportOptions", &v, flavour));
        assert_eq!(e.common.writable, Some(true));
        assert_eq!(
            e.kind,
            BlockExportKind::Nbd(BlockExportOptionsNbd {
                name: None,
                description: None,
                bitmaps: Some(vec![
                    BlockDirtyBitmapOrStr::Local("b0".into()),
                    BlockDirtyBitmapOrStr::External(BlockDirtyBitmap {
                        node: "n1".into(),
                        name: "b1".into()
                    }),
                ]),
                allocation_depth: None,
            })
        );
    }
}
