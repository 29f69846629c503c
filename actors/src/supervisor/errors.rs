//! Every error text the supervisor answers QMP with, one constructor each.
//!
//! The texts under "qsd's texts" are byte for byte what qsd 10.0.2 says in the same
//! situation (the differential tests compare them); the QEMU function that produces
//! each is named where it helps to find it. The texts under "bulkhead's own" have no
//! qsd counterpart (sandbox and worker failures, features bulkhead lacks) and may be
//! worded freely. Texts that lower layers produce (`bulkhead_block`'s typed errors,
//! the QAPI visitor) keep their own `Display` and go through [`from_error`].

use std::fmt::Display;

use bulkhead_ipc::wire::{WorkerId, WorkerKind};
use bulkhead_qmp::request::ErrorClass;

use super::QmpError;

fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc)
}

/// A lower layer's error whose `Display` already is the text to show (qsd's, where
/// qsd has one): `bulkhead_block` config, open, window and lock errors, `strerror`.
pub fn from_error<E: Display>(e: E) -> QmpError {
    generic(e.to_string())
}

// ---------------------------------------------------------------- qsd's texts: dispatch

/// A command qsd does not know (`qmp_dispatch`).
pub fn command_not_found(command: &str) -> QmpError {
    QmpError {
        class: ErrorClass::CommandNotFound,
        desc: format!("The command {command} has not been found"),
    }
}

/// A command before `qmp_capabilities`.
pub fn negotiation_expected() -> QmpError {
    QmpError {
        class: ErrorClass::CommandNotFound,
        desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
    }
}

/// `qmp_capabilities` after negotiation.
pub fn negotiation_complete() -> QmpError {
    QmpError {
        class: ErrorClass::CommandNotFound,
        desc: "Capabilities negotiation is already complete, command ignored".into(),
    }
}

/// `exec-oob` of a command without OOB support (none has it here).
pub fn oob_unsupported(command: &str) -> QmpError {
    generic(format!("The command {command} does not support OOB"))
}

/// An integer option below zero where QEMU parses a size (`parse_option_size`).
pub fn out_of_range(value: i64, parameter: &str) -> QmpError {
    generic(format!(
        "Value '{value}' is out of range for parameter '{parameter}'"
    ))
}

// ---------------------------------------------------------------- qsd's texts: nodes

/// `bdrv_lookup_bs` found neither a BlockBackend nor a node.
pub fn device_not_found(device: &str, node_name: &str) -> QmpError {
    generic(format!(
        "Cannot find device='{device}' nor node-name='{node_name}'"
    ))
}

/// `bdrv_find_node` found nothing (`blockdev-del`, `blockdev-reopen`,
/// `blockdev-set-active`).
pub fn node_not_found(name: &str) -> QmpError {
    generic(format!("Failed to find node with node-name='{name}'"))
}

/// `block-set-write-threshold` on an unknown node.
pub fn device_not_found_short(name: &str) -> QmpError {
    generic(format!("Device '{name}' not found"))
}

/// `blockdev-add` without a top-level `node-name`.
pub fn root_node_name_missing() -> QmpError {
    generic("'node-name' must be specified for the root node")
}

/// A node-name that is not a well-formed QEMU id.
pub fn invalid_node_name(name: &str) -> QmpError {
    generic(format!("Invalid node-name: '{name}'"))
}

/// A node-name longer than QEMU's 31 characters.
pub fn node_name_too_long() -> QmpError {
    generic("Node name too long")
}

/// A node-name that is taken.
pub fn duplicate_node_name(name: &str) -> QmpError {
    generic(format!("Duplicate nodes with node-name='{name}'"))
}

/// `blockdev-del` of a node an export uses.
pub fn node_in_use(name: &str) -> QmpError {
    generic(format!("Node {name} is in use"))
}

/// `blockdev-del` of a node the monitor did not create.
pub fn node_not_monitor_owned(name: &str) -> QmpError {
    generic(format!("Node {name} is not owned by the monitor"))
}

/// `blockdev-del` of a node another node uses.
pub fn block_device_in_use(name: &str) -> QmpError {
    generic(format!("Block device {name} is in use"))
}

// ---------------------------------------------------------------- qsd's texts: block_resize

/// `block_resize` to a negative size.
pub fn resize_negative_size() -> QmpError {
    generic("Parameter 'size' expects a >0 size")
}

/// `block_resize` of an inactive node.
pub fn resize_inactive() -> QmpError {
    generic("Permission 'resize' unavailable on inactive node")
}

/// `block_resize` of an exported node (the export unshares `resize`).
pub fn resize_conflict_export(node: &str) -> QmpError {
    generic(format!(
        "Permission conflict on node '{node}': permissions 'resize' are both required by an unnamed block device (uses node '{node}' as 'root' child) and unshared by an unnamed block device (uses node '{node}' as 'root' child)."
    ))
}

/// `block_resize` of a node a raw window sits on (the window unshares `resize`).
pub fn resize_conflict_window(node: &str, parent: &str) -> QmpError {
    generic(format!(
        "Permission conflict on node '{node}': permissions 'resize' are both required by an unnamed block device (uses node '{node}' as 'root' child) and unshared by node '{parent}' (uses node '{node}' as 'file' child)."
    ))
}

/// `block_resize` of a read-only node.
pub fn image_read_only() -> QmpError {
    generic("Image is read-only")
}

/// `block_resize` of a raw node with a `size`.
pub fn resize_fixed_raw() -> QmpError {
    generic("Cannot resize fixed-size raw disks")
}

/// `block_resize` of a raw node whose offset plus the new size overflows.
pub fn resize_offset_overflow() -> QmpError {
    generic("Disk size too large for the chosen offset")
}

/// `block_resize` of a driver that cannot resize.
pub fn resize_unsupported() -> QmpError {
    generic("Image format driver does not support resize")
}

// ---------------------------------------------------------------- qsd's texts: reopen, activation

/// A `blockdev-reopen` entry without `node-name`.
pub fn reopen_node_name_missing() -> QmpError {
    generic("node-name not specified")
}

/// `blockdev-reopen` leaving out an option the node was opened with.
pub fn option_reset(option: &str) -> QmpError {
    generic(format!(
        "Option '{option}' cannot be reset to its default value"
    ))
}

/// `blockdev-reopen` changing an option the driver cannot change.
pub fn option_change(option: &str) -> QmpError {
    generic(format!("Cannot change the option '{option}'"))
}

/// `blockdev-reopen` of a node whose options name a backing, without it.
pub fn backing_missing(name: &str) -> QmpError {
    generic(format!("backing is missing for '{name}'"))
}

/// `blockdev-reopen` with a negative raw `offset` or `size` (`blockdev-add` answers
/// [`out_of_range`] instead).
pub fn expected_integer(parameter: &str) -> QmpError {
    generic(format!(
        "Invalid parameter type for '{parameter}', expected: integer"
    ))
}

/// `blockdev-reopen` making a node its own descendant.
pub fn reopen_cycle(child: &str, parent: &str) -> QmpError {
    generic(format!(
        "Making '{child}' a file child of '{parent}' would create a cycle"
    ))
}

/// `blockdev-reopen` making a node read-only under a writer.
pub fn read_only_with_writers(node: &str) -> QmpError {
    generic(format!(
        "Read-only block node '{node}' cannot support read-write users"
    ))
}

/// Activating a read-only node under a writer.
pub fn block_node_read_only() -> QmpError {
    generic("Block node is read-only")
}

/// Inactivating a named node that an active parent uses.
pub fn active_parent() -> QmpError {
    generic("Node has active parent node")
}

/// Inactivating a node a writable export uses.
pub fn inactivate_refused() -> QmpError {
    generic("Failed to inactivate node: Operation not permitted")
}

/// Whether `e` is [`inactivate_refused`] (`blockdev-set-active` without a node
/// rewords it as [`inactivate_all_refused`]).
pub fn is_inactivate_refused(e: &QmpError) -> bool {
    e.desc.starts_with("Failed to inactivate node")
}

/// Inactivating every node, one refused.
pub fn inactivate_all_refused() -> QmpError {
    generic("Failed to inactivate all nodes: Operation not permitted")
}

// ---------------------------------------------------------------- qsd's texts: NBD and exports

/// `nbd-server-start` while one runs.
pub fn nbd_server_running() -> QmpError {
    generic("NBD server already running")
}

/// An NBD command without a server.
pub fn nbd_server_not_running() -> QmpError {
    generic("NBD server not running")
}

/// `tls-creds` naming no object.
pub fn no_tls_creds(id: &str) -> QmpError {
    generic(format!("No TLS credentials with id '{id}'"))
}

/// `tls-authz` without `tls-creds`.
pub fn tls_authz_without_creds() -> QmpError {
    generic("'tls-authz' is only valid with 'tls-creds'")
}

/// `socket()` failed.
pub fn socket_create(errno_text: &str) -> QmpError {
    generic(format!("Failed to create socket: {errno_text}"))
}

/// A Unix socket path beyond `sun_path`.
pub fn unix_path_too_long(path: &str) -> QmpError {
    generic(format!("UNIX socket path '{path}' is too long"))
}

/// `bind()` of a Unix socket failed.
pub fn unix_bind(path: &str, errno_text: &str) -> QmpError {
    generic(format!("Failed to bind socket to {path}: {errno_text}"))
}

/// `bind()` of an inet socket failed.
pub fn inet_bind(errno_text: &str) -> QmpError {
    generic(format!("Failed to bind socket: {errno_text}"))
}

/// `listen()` failed.
pub fn socket_listen(errno_text: &str) -> QmpError {
    generic(format!("Failed to listen on socket: {errno_text}"))
}

/// An export id that is not a well-formed QEMU id.
pub fn invalid_export_id() -> QmpError {
    generic("Invalid block export id")
}

/// An export id that is taken.
pub fn export_id_in_use(id: &str) -> QmpError {
    generic(format!("Block export id '{id}' is already in use"))
}

/// An `iothread` naming no object.
pub fn iothread_not_found(id: &str) -> QmpError {
    generic(format!("iothread \"{id}\" not found"))
}

/// A writable export of a read-only node.
pub fn export_read_only_writable() -> QmpError {
    generic("Cannot export read-only node as writable")
}

/// An NBD export name beyond NBD_MAX_STRING_SIZE.
pub fn export_name_too_long(name: &str) -> QmpError {
    generic(format!("export name '{name}' too long"))
}

/// An NBD description beyond NBD_MAX_STRING_SIZE.
pub fn export_description_too_long(description: &str) -> QmpError {
    generic(format!("description '{description}' too long"))
}

/// An NBD export name that is taken.
pub fn export_name_in_use(name: &str) -> QmpError {
    generic(format!("NBD server already has export named '{name}'"))
}

/// An NBD export's bitmap that the node and the nodes under it do not have.
pub fn export_bitmap_not_found(name: &str) -> QmpError {
    generic(format!("Bitmap '{name}' is not found"))
}

/// An NBD export offering, read-only, a bitmap that records the writes of a node
/// that takes writes.
pub fn enabled_bitmap_read_only_export(name: &str) -> QmpError {
    generic(format!(
        "Enabled bitmap '{name}' incompatible with readonly export"
    ))
}

/// Removing an export that does not exist.
pub fn export_not_found(id: &str) -> QmpError {
    generic(format!("Export '{id}' is not found"))
}

/// A safe removal of an export with clients.
pub fn export_in_use(id: &str) -> QmpError {
    generic(format!("export '{id}' still in use"))
}

// ---------------------------------------------------------------- qsd's texts: dirty bitmaps

/// `block_dirty_bitmap_lookup` found no node of that name.
pub fn bitmap_node_not_found(node: &str) -> QmpError {
    generic(format!("Node '{node}' not found"))
}

/// `block_dirty_bitmap_lookup` found no bitmap of that name on the node.
pub fn bitmap_not_found(name: &str) -> QmpError {
    generic(format!("Dirty bitmap '{name}' not found"))
}

/// `block-dirty-bitmap-add` with an empty name.
pub fn bitmap_name_empty() -> QmpError {
    generic("Bitmap name cannot be empty")
}

/// `block-dirty-bitmap-add` with a name past `BDRV_BITMAP_MAX_NAME_SIZE`.
pub fn bitmap_name_too_long(name: &str) -> QmpError {
    generic(format!("Bitmap name too long: {name}"))
}

/// `bdrv_create_dirty_bitmap`: the node has a bitmap of that name.
pub fn bitmap_exists(name: &str) -> QmpError {
    generic(format!("Bitmap already exists: {name}"))
}

/// `bdrv_dirty_bitmap_check`: an export (or a job) holds the bitmap.
pub fn bitmap_busy(name: &str) -> QmpError {
    generic(format!(
        "Bitmap '{name}' is currently in use by another operation and cannot be used"
    ))
}

/// `bdrv_can_store_new_dirty_bitmap` on a node whose driver stores no bitmaps.
pub fn bitmap_persistence_unsupported(node: &str) -> QmpError {
    generic(format!(
        "Can't store persistent bitmaps to {node}: Operation not supported"
    ))
}

/// `block-dirty-bitmap-add` with `persistent` that the image cannot store
/// (`qcow2_co_can_store_new_dirty_bitmap`'s reason, prefixed as QEMU prefixes it).
pub fn bitmap_cannot_persist(name: &str, node: &str, why: &str) -> QmpError {
    generic(format!(
        "Can't make bitmap '{name}' persistent in '{node}': {why}"
    ))
}

/// `bdrv_dirty_bitmap_check`: a bitmap loaded from a read-only image.
pub fn bitmap_readonly(name: &str) -> QmpError {
    generic(format!(
        "Bitmap '{name}' is readonly and cannot be modified"
    ))
}

/// A persistent bitmap could not be dropped from its image.
pub fn bitmap_unstore_failed(name: &str, e: &dyn Display) -> QmpError {
    generic(format!(
        "Failed to remove bitmap '{name}' from the image: {e}"
    ))
}

/// `blockdev-snapshot` of a node that is some node's backing (QEMU's op blocker).
pub fn node_busy_backing(node: &str, parent: &str) -> QmpError {
    generic(format!(
        "Node '{node}' is busy: node is used as backing hd of '{parent}'"
    ))
}

/// `change-backing-file` of an image without a backing node.
pub fn backing_file_change_without_backing() -> QmpError {
    generic("not allowing backing file change on an image without a backing file")
}

/// `change-backing-file` of an image outside the device's chain.
pub fn not_in_same_chain(device: &str) -> QmpError {
    generic(format!(
        "'{device}' and image file are not in the same chain"
    ))
}

/// `change-backing-file` whose header write failed (`reason`: the worker's text,
/// a short strerror or the engine's limit).
pub fn backing_file_change_failed(name: &str, reason: &str) -> QmpError {
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    generic(format!(
        "Could not change backing file to '{name}': {reason}"
    ))
}

/// `blockdev-snapshot-sync` without `snapshot-node-name`.
pub fn overlay_name_missing() -> QmpError {
    generic("New overlay node-name missing")
}

/// `blockdev-snapshot-sync` naming a node that exists.
pub fn overlay_name_in_use() -> QmpError {
    generic("New overlay node-name already in use")
}

/// `blockdev-snapshot-sync` with a format other than qcow2.
pub fn snapshot_format_unsupported() -> QmpError {
    generic("bulkhead creates only qcow2 overlays so far")
}

/// An image file that cannot be opened.
pub fn could_not_open(path: &str, errno: i32) -> QmpError {
    generic(format!(
        "Could not open '{path}': {}",
        super::strerror(errno)
    ))
}

/// `blockdev-snapshot` with an overlay something uses already.
pub fn overlay_in_use() -> QmpError {
    generic("The overlay is already in use")
}

/// `blockdev-snapshot` with an overlay that has a backing node.
pub fn overlay_has_backing() -> QmpError {
    generic("The overlay already has a backing image")
}

/// `blockdev-snapshot` with an overlay whose driver takes no backing.
pub fn overlay_without_backing() -> QmpError {
    generic("The overlay does not support backing images")
}

// ---------------------------------------------------------------- qsd's texts: jobs

/// `job-*` of an unknown job.
pub fn job_not_found() -> QmpError {
    generic("Job not found")
}

/// `block-job-*` of an unknown job.
pub fn block_job_not_found(id: &str) -> QmpError {
    QmpError {
        class: ErrorClass::DeviceNotActive,
        desc: format!("Block job '{id}' not found"),
    }
}

/// A verb the job's status does not take (`job_apply_verb`).
pub fn job_verb(id: &str, status: &str, verb: &str) -> QmpError {
    generic(format!(
        "Job '{id}' in state '{status}' cannot accept command verb '{verb}'"
    ))
}

/// Two options that name the same thing.
pub fn mutually_exclusive(a: &str, b: &str) -> QmpError {
    generic(format!("'{a}' and '{b}' are mutually exclusive"))
}

/// A node outside the device's backing chain.
pub fn not_in_chain(node: &str) -> QmpError {
    generic(format!("'{node}' is not in this backing file chain"))
}

/// `block-commit` with the same top and base.
pub fn commit_into_itself() -> QmpError {
    generic("cannot commit an image into itself")
}

/// `block-commit` of the active layer with `backing-file`.
pub fn backing_file_active_commit() -> QmpError {
    generic("'backing-file' specified, but 'top' is the active layer")
}

/// `blockdev-backup` onto its own source.
pub fn backup_same_node() -> QmpError {
    generic("Source and target cannot be the same")
}

/// `blockdev-backup` to a target of another size.
pub fn backup_sizes_differ() -> QmpError {
    generic("Source and target image have different sizes")
}

/// A mirror onto its own source (`mirror_start_job`).
pub fn mirror_into_itself() -> QmpError {
    generic("Can't mirror node into itself")
}

/// A mirror `sync` mode that needs a bitmap (`mirror_start`).
pub fn mirror_sync_unsupported(mode: &str) -> QmpError {
    generic(format!("Sync mode '{mode}' not supported"))
}

/// A mirror `granularity` outside 512 B..64 MiB.
pub fn mirror_granularity_range() -> QmpError {
    generic("Parameter 'granularity' expects a value in range [512B, 64MB]")
}

/// A mirror `granularity` that is not a power of two.
pub fn mirror_granularity_power() -> QmpError {
    generic("Parameter 'granularity' expects a power of 2")
}

/// A negative mirror `buf-size`.
pub fn mirror_buf_size() -> QmpError {
    generic("Invalid parameter 'buf-size'")
}

/// A mirror `replaces` that names no node (`check_to_replace_node`).
pub fn replaces_not_found(name: &str) -> QmpError {
    generic(format!("Failed to find node with node-name='{name}'"))
}

/// A mirror `replaces` that is not the source.
pub fn replaces_not_source(name: &str, source: &str) -> QmpError {
    generic(format!(
        "Cannot replace '{name}' by a node mirrored from '{source}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data"
    ))
}

/// `block-job-change` to a copy mode a mirror cannot go back to.
pub fn copy_mode_change(mode: &str) -> QmpError {
    generic(format!("Change to copy mode '{mode}' is not implemented"))
}

/// A backup `sync` that needs a bitmap, without one (`do_backup_common`).
pub fn backup_bitmap_missing(sync: &str) -> QmpError {
    generic(format!(
        "must provide a valid bitmap name for '{sync}' sync mode"
    ))
}

/// `sync: incremental` with another `bitmap-mode` than on-success.
pub fn backup_incremental_mode() -> QmpError {
    generic("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
}

/// A backup `bitmap` the source does not have.
pub fn backup_bitmap_not_found(name: &str) -> QmpError {
    generic(format!("Bitmap '{name}' could not be found"))
}

/// A backup `bitmap` without `bitmap-mode`.
pub fn backup_bitmap_mode_missing() -> QmpError {
    generic("Bitmap sync mode must be given when providing a bitmap")
}

/// A backup `bitmap` with `sync: none`.
pub fn backup_bitmap_sync_none() -> QmpError {
    generic("sync mode 'none' does not produce meaningful bitmap outputs")
}

/// `bitmap-mode: never` with a sync mode that does not read the bitmap.
pub fn backup_bitmap_never_useless(sync: &str) -> QmpError {
    generic(format!(
        "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{sync}'"
    ))
}

/// A backup `bitmap-mode` without a bitmap.
pub fn backup_bitmap_mode_alone() -> QmpError {
    generic("Cannot specify bitmap sync mode without a bitmap")
}

/// `block-stream` over a layer a writable export uses (`bdrv_check_perm`'s text).
pub fn stream_intermediate_conflict(node: &str, job: &str) -> QmpError {
    generic(format!(
        "Permission conflict on node '{node}': permissions 'write' are both required by an unnamed block device (uses node '{node}' as 'root' child) and unshared by stream job '{job}' (uses node '{node}' as 'intermediate node' child)."
    ))
}

/// `x-blockdev-amend` options of another driver than the node's.
pub fn amend_driver_change() -> QmpError {
    generic("x-blockdev-amend doesn't support changing the block driver")
}

/// `x-blockdev-amend` of a node whose driver has no amend.
pub fn amend_unsupported() -> QmpError {
    generic("Driver does not support x-blockdev-amend")
}

/// A new image that cannot be created (`bdrv_img_create`).
pub fn could_not_create(path: &str, errno: i32) -> QmpError {
    generic(format!(
        "Could not create '{path}': {}",
        super::strerror(errno)
    ))
}

/// A `drive-backup`/`drive-mirror` target format bulkhead does not create.
pub fn drive_format_unsupported(format: &str) -> QmpError {
    generic(format!(
        "bulkhead creates only qcow2 and raw targets so far, not '{format}'"
    ))
}

/// A compressed backup to a target that cannot store compressed clusters (QEMU
/// names the target's device, which qsd's nodes do not have).
pub fn backup_compress_unsupported() -> QmpError {
    generic("Compression is not supported for this drive ")
}

/// `x-perf.max-workers` out of range.
pub fn backup_max_workers() -> QmpError {
    generic("max-workers must be between 1 and 2147483647")
}

/// A negative `x-perf.max-chunk`.
pub fn backup_max_chunk_negative() -> QmpError {
    generic("max-chunk must be zero (which means no limit) or positive")
}

/// `x-perf.max-chunk` below the copy cluster.
pub fn backup_max_chunk_small(chunk: i64, cluster: u64) -> QmpError {
    generic(format!(
        "Required max-chunk ({chunk}) is less than backup cluster size ({cluster})"
    ))
}

/// A job's filter node that cannot be created (its name).
pub fn could_not_create_node(why: &str) -> QmpError {
    generic(format!("Could not create node: {why}"))
}

/// A job id that is no well-formed id.
pub fn invalid_job_id(id: &str) -> QmpError {
    generic(format!("Invalid job ID '{id}'"))
}

/// A job id another job has.
pub fn job_id_in_use(id: &str) -> QmpError {
    generic(format!("Job ID '{id}' already in use"))
}

/// A negative `speed`.
pub fn speed_negative() -> QmpError {
    generic("Parameter 'speed' expects a non-negative value")
}

/// `job-pause` of a paused job.
pub fn job_already_paused() -> QmpError {
    generic("Job is already paused")
}

/// `job-resume` of a job the user did not pause.
pub fn job_not_paused() -> QmpError {
    generic("Can't resume a job that was not paused")
}

/// `block-job-cancel` of a paused job without `force`.
pub fn block_job_paused(id: &str) -> QmpError {
    generic(format!(
        "The block job for device '{id}' is currently paused"
    ))
}

/// `job-complete` of a job that cannot complete.
pub fn job_cannot_complete(id: &str) -> QmpError {
    generic(format!("The active block job '{id}' cannot be completed"))
}

/// `transaction` with an `abort` action.
pub fn transaction_aborted() -> QmpError {
    generic("Transaction aborted using Abort action")
}

/// `transaction` with `completion-mode: grouped` and an action that is no job.
pub fn transaction_not_grouped(action: &str) -> QmpError {
    generic(format!(
        "Action '{action}' does not support transaction property completion-mode = grouped"
    ))
}

// ---------------------------------------------------------------- qsd's texts: chardevs (the front's)

/// `chardev-remove` of an unknown chardev.
pub fn chardev_not_found(id: &str) -> QmpError {
    generic(format!("Chardev '{id}' not found"))
}

/// `chardev-remove` of a monitor's chardev.
pub fn chardev_busy(id: &str) -> QmpError {
    generic(format!("Chardev '{id}' is busy"))
}

/// `chardev-add` of a taken id.
pub fn chardev_exists(id: &str) -> QmpError {
    generic(format!("Chardev with id '{id}' already exists"))
}

/// `chardev-add` refused by the backend (`why` is qsd's text, or bulkhead's own for
/// backends it lacks).
pub fn chardev_add_failed(id: &str, why: &str) -> QmpError {
    generic(format!("Failed to add chardev '{id}': {why}"))
}

// ---------------------------------------------------------------- bulkhead's own texts

/// The supervisor actor is gone (the daemon is exiting).
pub fn supervisor_not_running() -> QmpError {
    generic("The supervisor is not running")
}

/// A driver qsd has and bulkhead does not implement.
pub fn driver_unsupported(driver: &str) -> QmpError {
    generic(format!("Driver '{driver}' is not supported by bulkhead"))
}

/// A query of a node whose driver a fatal corruption took away (QEMU's
/// `bdrv_query_image_info` on a node without a driver).
pub fn block_device_ejected(name: &str) -> QmpError {
    generic(format!("Block device {name} is ejected"))
}

/// A command that needs a node no other node uses (`qmp_get_root_bs`).
pub fn need_root_node() -> QmpError {
    generic("Need a root block node")
}

/// An internal snapshot of a read-only node.
pub fn device_read_only(device: &str) -> QmpError {
    generic(format!("Device '{device}' is read only"))
}

/// An internal snapshot of a node whose driver has none.
pub fn snapshots_unsupported(driver: &str, device: &str) -> QmpError {
    generic(format!(
        "Block format '{driver}' used by device '{device}' does not support internal snapshots"
    ))
}

/// An internal snapshot without a name.
pub fn snapshot_name_empty() -> QmpError {
    generic("Name is empty")
}

/// An internal snapshot whose name is taken.
pub fn snapshot_exists(name: &str, device: &str) -> QmpError {
    generic(format!(
        "Snapshot with name '{name}' already exists on device '{device}'"
    ))
}

/// `blockdev-snapshot-delete-internal-sync` with neither id nor name.
pub fn snapshot_name_or_id_missing() -> QmpError {
    generic("Name or id must be provided")
}

/// Deleting a snapshot of a node whose driver has no snapshot list.
pub fn snapshot_list_unsupported() -> QmpError {
    generic("Failed to get a snapshot list: Operation not supported")
}

/// Deleting a snapshot that does not exist (QEMU prints a missing id or name as
/// `null`).
pub fn snapshot_not_found(id: Option<&str>, name: Option<&str>, device: &str) -> QmpError {
    generic(format!(
        "Snapshot with id '{}' and name '{}' does not exist on device '{device}'",
        id.unwrap_or("null"),
        name.unwrap_or("null")
    ))
}

/// A backing file named inside an image could not be opened (QEMU's prefix).
pub fn backing_open_failed(reason: &str) -> QmpError {
    generic(format!("Could not open backing file: {reason}"))
}

/// An image's driver refused to open it, with the text its worker gave (QEMU's text
/// for the condition). The text comes from a worker that parsed untrusted image
/// bytes: anything but short printable ASCII is replaced.
pub fn image_refused(text: &str) -> QmpError {
    let printable =
        !text.is_empty() && text.len() <= 512 && text.bytes().all(|b| (0x20..0x7f).contains(&b));
    if printable {
        generic(text)
    } else {
        generic("Could not open the image: its driver gave no usable reason")
    }
}

/// An export type other than NBD.
pub fn export_type_unsupported() -> QmpError {
    generic("bulkhead supports only NBD exports so far")
}

/// An NBD server address type bulkhead cannot listen on.
pub fn address_type_unsupported(kind: &str) -> QmpError {
    generic(format!(
        "bulkhead does not support NBD server addresses of type '{kind}'"
    ))
}

/// A worker call failed without an errno (its own detail text is never shown).
pub fn worker_failed() -> QmpError {
    generic("Operation failed in worker")
}

/// An instance id that is not (or no longer) in the table.
pub fn no_such_worker(id: WorkerId) -> QmpError {
    generic(format!("worker {id} does not exist"))
}

/// An instance whose restart budget ran out.
pub fn worker_given_up(kind: WorkerKind) -> QmpError {
    generic(format!("The {kind} worker keeps failing and was given up"))
}

/// An instance without a process after starting one.
pub fn worker_not_running(id: WorkerId) -> QmpError {
    generic(format!("The worker {id} is not running"))
}

/// A worker process could not be started.
pub fn worker_spawn<E: Display>(kind: WorkerKind, e: E) -> QmpError {
    generic(format!("Could not start the {kind} worker: {e}"))
}

/// A data channel's shared memory could not be made.
pub fn data_channel<E: Display>(e: E) -> QmpError {
    generic(format!("Could not create a data channel: {e}"))
}

/// A node's statistics region could not be made.
pub fn node_stats<E: Display>(e: E) -> QmpError {
    generic(format!("Could not create node statistics: {e}"))
}

/// A worker process vanished between two steps of one command.
pub fn worker_vanished() -> QmpError {
    generic("worker vanished")
}

/// A dirty bitmap's shared-memory region could not be made or mapped.
pub fn bitmap_region(e: bulkhead_ipc::shm::ShmError) -> QmpError {
    generic(format!("cannot create the dirty bitmap: {e}"))
}

/// `block-stream` with a base outside the top's chain.
pub fn not_a_backing_image(base: &str, top: &str) -> QmpError {
    generic(format!("Node '{base}' is not a backing image of '{top}'"))
}

/// A `block-stream` option bulkhead does not implement yet.
pub fn stream_option_unsupported(what: &str) -> QmpError {
    generic(format!(
        "bulkhead does not support block-stream with '{what}' yet"
    ))
}

/// A `blockdev-backup` option bulkhead does not implement yet.
pub fn backup_option_unsupported(what: &str) -> QmpError {
    generic(format!("bulkhead does not support backup with {what} yet"))
}

/// `top` or `base` named by file name rather than node name.
pub fn by_file_name_unsupported(what: &str, name: &str) -> QmpError {
    generic(format!(
        "bulkhead does not support '{what}' by file name ('{name}') yet: use '{what}-node'"
    ))
}

/// More enabled bitmaps on one node than its worker records into.
pub fn too_many_recording_bitmaps(max: usize) -> QmpError {
    generic(format!(
        "bulkhead records at most {max} enabled dirty bitmaps per node"
    ))
}

/// A node vanished between two steps of one command (should not happen: commands run
/// one at a time).
pub fn node_vanished() -> QmpError {
    generic("node vanished")
}

/// A restore that needs the instance being restored.
pub fn restore_cycle(id: WorkerId) -> QmpError {
    generic(format!("worker {id} depends on itself"))
}

/// A restore given up because an instance it depends on died meanwhile.
pub fn restore_dependency_died() -> QmpError {
    generic("a worker it depends on died during the restore")
}

/// A command arrived while `Core` was out of the actor (cannot happen: commands are
/// serialized).
pub fn supervisor_busy() -> QmpError {
    generic("supervisor is busy")
}

/// A command's arguments passed the QAPI visitor but not its typed struct: the struct
/// and the schema disagree (a bulkhead bug, never the client's).
pub fn arguments_mismatch<E: Display>(command: &str, e: E) -> QmpError {
    generic(format!(
        "Internal error: the arguments of {command} do not fit its handler: {e}"
    ))
}

/// A long operation on a node that is not (or no longer) in the graph.
pub fn operation_node_gone() -> QmpError {
    generic("The operation's node does not exist")
}

/// A long operation that is not running.
pub fn operation_not_found(op: u64) -> QmpError {
    generic(format!("Operation {op} is not running"))
}

/// Re-pointing a node's users to the node itself.
pub fn replace_by_itself(name: &str) -> QmpError {
    generic(format!("Cannot replace node '{name}' by itself"))
}

/// Re-pointing a parent's child in a role no driver takes a new child in yet.
pub fn replace_role_unsupported(parent: &str, role: &str) -> QmpError {
    generic(format!(
        "Cannot change the '{role}' child of '{parent}': no driver supports it yet"
    ))
}

/// An inactive node as the new child of an active parent (QEMU's
/// `bdrv_attach_child_noperm`, whatever the role).
pub fn inactive_child(child: &str, role: &str, parent: &str) -> QmpError {
    generic(format!(
        "Inactive '{child}' can't be a {role} child of active '{parent}'"
    ))
}

/// An inactive node as the new target of an export that does not allow one.
pub fn inactive_export_target(node: &str, export: &str) -> QmpError {
    generic(format!(
        "Inactive '{node}' can't serve export '{export}', which does not allow inactive nodes"
    ))
}

/// An export moved to a node of another size (its clients negotiated the size).
pub fn export_target_size(export: &str, size: u64, node: &str, new_size: u64) -> QmpError {
    generic(format!(
        "Export '{export}' has {size} bytes; '{node}' has {new_size}: its clients would see the size change"
    ))
}

/// A filter to insert whose `file` child is not the node it goes above.
pub fn filter_not_above(filter: &str, node: &str) -> QmpError {
    generic(format!(
        "'{filter}' must have '{node}' as its file child to be inserted above it"
    ))
}

/// A filter to insert that something already uses.
pub fn filter_in_use(filter: &str) -> QmpError {
    generic(format!("'{filter}' already has users"))
}

/// A filter to remove that has no `file` child.
pub fn not_a_filter(name: &str) -> QmpError {
    generic(format!("'{name}' has no file child to give its users"))
}
