//! External snapshots: `blockdev-snapshot` (an overlay the monitor added gets the node
//! as its backing and takes over every user of it) and `change-backing-file`.
//!
//! Runs in the supervisor, on the graph-change machinery of `replace.rs`: the overlay
//! is reopened with the node as its `backing` child (in its own worker, over a data
//! channel if the node lives elsewhere), every other user of the node (parents,
//! exports) is re-pointed to the overlay under live I/O, and the node becomes
//! read-only, as QEMU's `external_snapshot_commit` leaves it. Like QEMU, the overlay's
//! header is not touched: its backing file name stays what it was (`change-backing-file`
//! writes one). Everything QEMU refuses is checked before anything changes.

use bulkhead_ipc::wire::{ToWorker, WorkerErrorKind};
use bulkhead_qmp::qapi::types::{BlockdevSnapshotSync, NewImageMode};
use serde_json::{Value, json};

use super::graph::{Node, Role};
use super::workers::CallError;
use super::{Core, QmpError, call_error, errors};

impl Core {
    /// `blockdev-snapshot`: `overlay` goes above `node`.
    pub(super) async fn blockdev_snapshot(
        &mut self,
        node: &str,
        overlay: &str,
    ) -> Result<(), QmpError> {
        let (node, overlay) = self.check_snapshot(node, overlay, &[])?;
        self.take_snapshot(&node, &overlay).await
    }

    /// `blockdev-snapshot`'s checks, in QEMU's order; `earlier`: the (node,
    /// overlay) pairs a transaction's earlier actions snapshot, as if done. Returns
    /// the two names.
    pub(super) fn check_snapshot(
        &self,
        node: &str,
        overlay: &str,
        earlier: &[(String, String)],
    ) -> Result<(String, String), QmpError> {
        let n = self
            .graph
            .get(node)
            .ok_or_else(|| errors::device_not_found(node, node))?;
        if let Some(parent) = self.backing_parent(n) {
            return Err(errors::node_busy_backing(node, &parent));
        }
        if let Some((_, o)) = earlier.iter().find(|(b, _)| *b == n.name) {
            return Err(errors::node_busy_backing(node, o));
        }
        let o = self
            .graph
            .get(overlay)
            .ok_or_else(|| errors::device_not_found(overlay, overlay))?;
        // An overlay an earlier action used took over its node's users, if any.
        let earlier_node = earlier
            .iter()
            .find(|(_, ov)| *ov == o.name)
            .and_then(|(b, _)| self.graph.get(b));
        let took_users = earlier_node
            .is_some_and(|b| b.parents > 0 || self.exports.iter().any(|e| e.node == b.name));
        if o.parents > 0
            || took_users
            || self.exports.iter().any(|e| e.node == o.name)
            || o.name == n.name
        {
            return Err(errors::overlay_in_use());
        }
        if o.child(Role::Backing).is_some() || earlier_node.is_some() {
            return Err(errors::overlay_has_backing());
        }
        if !o
            .driver
            .info()
            .children
            .iter()
            .any(|c| c.role == Role::Backing)
        {
            return Err(errors::overlay_without_backing());
        }
        Ok((n.name.clone(), o.name.clone()))
    }

    /// A checked snapshot: the overlay reads `node`, takes over its users, and
    /// `node` becomes read-only.
    pub(super) async fn take_snapshot(
        &mut self,
        node: &str,
        overlay: &str,
    ) -> Result<(), QmpError> {
        self.attach_backing(overlay, node).await?;
        self.replace_node(node, overlay).await?;
        if let Err(e) = self.make_read_only(node).await {
            // QEMU ignores a failure here too (the snapshot stands).
            tracing::warn!(node, error = %e.desc, "the snapshotted node stays writable");
        }
        Ok(())
    }

    /// `blockdev-snapshot-sync`: creates the overlay image (`mode: absolute-paths`,
    /// the default: a qcow2 file naming the node's filename and format as its
    /// backing, the size of the node) or opens it (`existing`), adds it as
    /// `snapshot-node-name`, and takes the snapshot as `blockdev-snapshot` does.
    /// qsd has no devices, so only `node-name` finds a node.
    pub(super) async fn blockdev_snapshot_sync(
        &mut self,
        a: &BlockdevSnapshotSync,
    ) -> Result<(), QmpError> {
        let (node_name, snap) = self.prepare_snapshot_sync(a).await?;
        let result = self.blockdev_snapshot(&node_name, &snap).await;
        self.drop_if_unused(&snap).await;
        result
    }

    /// `blockdev-snapshot-sync`'s checks and its overlay, created (or opened) and
    /// added, not attached yet: the node's name and the overlay's.
    pub(super) async fn prepare_snapshot_sync(
        &mut self,
        a: &BlockdevSnapshotSync,
    ) -> Result<(String, String), QmpError> {
        self.check_snapshot_sync(a, &[])?;
        let node_name = a.node_name.clone().unwrap_or_default();
        let Some(node) = a.node_name.as_deref().and_then(|n| self.graph.get(n)) else {
            return Err(errors::device_not_found(
                a.device.as_deref().unwrap_or(""),
                &node_name,
            ));
        };
        let Some(snap) = a.snapshot_node_name.clone() else {
            return Err(errors::overlay_name_missing());
        };
        if self.graph.contains(&snap) {
            return Err(errors::overlay_name_in_use());
        }
        if a.format.as_deref().is_some_and(|f| f != "qcow2") {
            return Err(errors::snapshot_format_unsupported());
        }
        let path = a.snapshot_file.clone();
        let (size, backing_file, backing_format) = (
            node.size,
            self.graph.filename(node),
            node.driver.as_str().to_string(),
        );
        let create = a.mode != Some(NewImageMode::Existing);
        if create {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
                .map_err(|e| errors::could_not_open(&path, e.raw_os_error().unwrap_or(0)))?;
        } else if let Err(e) = std::fs::metadata(&path) {
            return Err(errors::could_not_open(&path, e.raw_os_error().unwrap_or(0)));
        }
        let file_options = json!({"driver": "file", "filename": path});
        let file = self.add_internal(&file_options).await?;
        if create {
            let Some(r) = self.node_ref(&file) else {
                return Err(errors::node_vanished());
            };
            let image = bulkhead_ipc::wire::Qcow2Create {
                size,
                cluster_size: 65536,
                backing_file: Some(backing_file.clone()),
                backing_format: Some(backing_format.clone()),
                lazy_refcounts: false,
            };
            let w = self.worker(r.home).await?;
            if let Err(e) = w
                .call(
                    ToWorker::CreateQcow2 {
                        node: r.node,
                        image,
                    },
                    &[],
                )
                .await
            {
                self.destroy(&file).await;
                return Err(call_error(e));
            }
            // qsd says so on its standard output, as qemu-img does.
            println!(
                "Formatting '{path}', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size={size} backing_file={backing_file} backing_fmt={backing_format} lazy_refcounts=off refcount_bits=16"
            );
        }
        // Opened without the backing its header names: the snapshot gives it one.
        let overlay = json!({"driver": "qcow2", "node-name": snap, "file": file, "backing": null});
        let Value::Object(given) = overlay else {
            return Err(errors::node_vanished());
        };
        let typed: bulkhead_qmp::qapi::types::BlockdevOptions =
            serde_json::from_value(Value::Object(given.clone())).map_err(errors::from_error)?;
        if let Err(e) = self.blockdev_add(&typed, &given).await {
            self.destroy(&file).await;
            return Err(e);
        }
        // Like QEMU's, the overlay belongs to its users, not to the monitor: it goes
        // with the last of them (at once if the node had none).
        if let Some(n) = self.graph.get_mut(&snap) {
            n.monitor_owned = false;
        }
        Ok((node_name, snap))
    }

    /// What `blockdev-snapshot-sync` checks before it creates anything; `names`:
    /// overlay names a transaction's earlier actions take.
    pub(super) fn check_snapshot_sync(
        &self,
        a: &BlockdevSnapshotSync,
        names: &[String],
    ) -> Result<(), QmpError> {
        let node_name = a.node_name.clone().unwrap_or_default();
        if a.node_name
            .as_deref()
            .and_then(|n| self.graph.get(n))
            .is_none()
        {
            return Err(errors::device_not_found(
                a.device.as_deref().unwrap_or(""),
                &node_name,
            ));
        }
        let Some(snap) = a.snapshot_node_name.as_ref() else {
            return Err(errors::overlay_name_missing());
        };
        if self.graph.contains(snap) || names.contains(snap) {
            return Err(errors::overlay_name_in_use());
        }
        if a.format.as_deref().is_some_and(|f| f != "qcow2") {
            return Err(errors::snapshot_format_unsupported());
        }
        Ok(())
    }

    /// Deletes `name` if the monitor does not own it and nothing uses it.
    pub(super) async fn drop_if_unused(&mut self, name: &str) {
        let exported = self.exports.iter().any(|e| e.node == name);
        if self
            .graph
            .get(name)
            .is_some_and(|n| !n.monitor_owned && n.parents == 0 && !exported)
        {
            self.destroy(name).await;
        }
    }

    /// Adds a node the supervisor needs from `options` (see `add_internal_node`).
    pub(super) async fn add_internal(&mut self, options: &Value) -> Result<String, QmpError> {
        self.add_internal_on(options, None).await
    }

    /// [`Core::add_internal`] on instance `on` (a job's filter goes where the node
    /// it copies lives: its copies then need no hop, and it parses nothing
    /// untrusted).
    pub(super) async fn add_internal_on(
        &mut self,
        options: &Value,
        on: Option<bulkhead_ipc::wire::WorkerId>,
    ) -> Result<String, QmpError> {
        let Value::Object(given) = options.clone() else {
            return Err(errors::node_vanished());
        };
        let typed: bulkhead_qmp::qapi::types::BlockdevOptions =
            serde_json::from_value(Value::Object(given.clone())).map_err(errors::from_error)?;
        self.add_internal_node(&typed, &given, on).await
    }

    /// `change-backing-file`: writes `backing_file` (and the backing node's format)
    /// into the header of `image`, a node with a backing in `device`'s chain. A
    /// read-only image is made writable for the write and read-only again, as QEMU
    /// does.
    pub(super) async fn change_backing_file(
        &mut self,
        device: &str,
        image: &str,
        backing_file: &str,
    ) -> Result<(), QmpError> {
        let root = self
            .graph
            .get(device)
            .ok_or_else(|| errors::device_not_found(device, device))?;
        if root.parents > 0 {
            return Err(errors::need_root_node());
        }
        let img = self
            .graph
            .get(image)
            .ok_or_else(|| errors::device_not_found("", image))?;
        let Some(format) = img
            .child(Role::Backing)
            .and_then(|b| self.graph.get(b))
            .map(|b| b.driver.as_str())
        else {
            return Err(errors::backing_file_change_without_backing());
        };
        // `image` must be in `device`'s chain (backing links, and filters' files).
        let mut cur = Some(root);
        let mut found = false;
        while let Some(n) = cur {
            if n.name == img.name {
                found = true;
                break;
            }
            let below = if n.driver.info().filter {
                n.file()
            } else {
                n.child(Role::Backing)
            };
            cur = below.and_then(|c| self.graph.get(c));
        }
        if !found {
            return Err(errors::not_in_same_chain(device));
        }
        let (image, format, ro) = (img.name.clone(), format.to_string(), img.read_only);
        if ro {
            self.set_mode(&image, false).await?;
        }
        let result = match self.node_ref(&image) {
            Some(r) => {
                let w = self.worker(r.home).await?;
                let body = ToWorker::SetBackingFile {
                    node: r.node,
                    name: backing_file.to_string(),
                    format,
                };
                w.call(body, &[]).await.map_err(|e| match e {
                    CallError::Worker(w) if w.kind == WorkerErrorKind::Image => {
                        errors::backing_file_change_failed(backing_file, &w.detail)
                    }
                    other => call_error(other),
                })
            }
            None => Err(errors::node_vanished()),
        };
        if ro {
            self.set_mode(&image, true).await?;
        }
        self.refresh_format_info().await;
        result.map(|_| ())
    }

    /// The parent using `n` as its backing child, if any (QEMU's op blocker:
    /// "node is used as backing hd of ...").
    pub(super) fn backing_parent(&self, n: &Node) -> Option<String> {
        self.graph
            .iter()
            .find(|p| p.child(Role::Backing) == Some(n.name.as_str()))
            .map(|p| p.name.clone())
    }

    /// Reopens `overlay` with `backing` as its backing child.
    pub(super) async fn attach_backing(
        &mut self,
        overlay: &str,
        backing: &str,
    ) -> Result<(), QmpError> {
        let (o, b) = match (self.node_ref(overlay), self.node_ref(backing)) {
            (Some(o), Some(b)) => (o, b),
            _ => return Err(errors::node_vanished()),
        };
        self.connect(o.home, b.home).await?;
        let children = self.child_refs(overlay, Some((Role::Backing, Some(b))));
        let (config, image) = match self.graph.get(overlay) {
            Some(n) => (
                n.config.clone(),
                n.image
                    .as_ref()
                    .map(bulkhead_ipc::fd::dup)
                    .transpose()
                    .map_err(errors::from_error)?,
            ),
            None => return Err(errors::node_vanished()),
        };
        self.reopen_on(o.home, o.node, overlay, config, children, image)
            .await?;
        self.graph
            .set_child(overlay, Role::Backing, Some(backing.to_string()));
        if let Some(n) = self.graph.get_mut(overlay) {
            // A `backing: null` it was opened with no longer holds.
            n.strong_options.remove("backing");
            n.options.insert("backing".into(), backing.into());
        }
        Ok(())
    }

    /// Reopens `overlay` without a backing child.
    pub(super) async fn detach_backing(&mut self, overlay: &str) -> Result<(), QmpError> {
        let Some(o) = self.node_ref(overlay) else {
            return Err(errors::node_vanished());
        };
        let children = self.child_refs(overlay, Some((Role::Backing, None)));
        let (config, image) = match self.graph.get(overlay) {
            Some(n) => (
                n.config.clone(),
                n.image
                    .as_ref()
                    .map(bulkhead_ipc::fd::dup)
                    .transpose()
                    .map_err(errors::from_error)?,
            ),
            None => return Err(errors::node_vanished()),
        };
        self.reopen_on(o.home, o.node, overlay, config, children, image)
            .await?;
        self.graph.set_child(overlay, Role::Backing, None);
        Ok(())
    }

    /// Reopens `name` read-only, and with it the `file` and `data-file` children it
    /// created itself (they inherit its options in QEMU; children the monitor added
    /// keep their mode).
    async fn make_read_only(&mut self, name: &str) -> Result<(), QmpError> {
        self.set_mode(name, true).await
    }

    /// [`Core::make_read_only`] or its reverse: a node made read-only goes before
    /// its inheriting children (no writer above a read-only child), one made
    /// writable after them.
    pub(super) async fn set_mode(&mut self, name: &str, read_only: bool) -> Result<(), QmpError> {
        let inherit: Vec<String> = self
            .graph
            .get(name)
            .map(|n| {
                n.children
                    .iter()
                    .filter(|(r, _)| matches!(r, Role::File | Role::DataFile))
                    .map(|(_, c)| c.clone())
                    .filter(|c| self.graph.get(c).is_some_and(|c| !c.monitor_owned))
                    .collect()
            })
            .unwrap_or_default();
        if read_only {
            self.reopen_mode(name, true).await?;
        }
        for c in &inherit {
            Box::pin(self.set_mode(c, read_only)).await?;
        }
        if !read_only {
            self.reopen_mode(name, false).await?;
        }
        Ok(())
    }

    /// Reopens one node read-only or read-write (an image node on a descriptor
    /// opened again in the new mode).
    async fn reopen_mode(&mut self, name: &str, read_only: bool) -> Result<(), QmpError> {
        let Some(n) = self.graph.get(name) else {
            return Err(errors::node_vanished());
        };
        if n.read_only == read_only {
            return Ok(());
        }
        let (home, id) = (n.home, n.id);
        let mut config = n.config.clone();
        config.common_mut().read_only = read_only;
        let image = match (&n.path, n.driver.is_posix()) {
            (Some(path), true) => {
                let kind = n
                    .driver
                    .image()
                    .unwrap_or(bulkhead_block::file::FileKind::File);
                Some(
                    bulkhead_block::posix::open_image(path, kind, read_only, n.direct)
                        .map_err(errors::from_error)?,
                )
            }
            _ => None,
        };
        let sent = image
            .as_ref()
            .map(bulkhead_ipc::fd::dup)
            .transpose()
            .map_err(errors::from_error)?;
        let children = self.child_refs(name, None);
        self.reopen_on(home, id, name, config.clone(), children, sent)
            .await?;
        if let Some(n) = self.graph.get_mut(name) {
            n.config = config;
            n.read_only = read_only;
            n.options.insert("read-only".into(), read_only.into());
            if let Some(f) = image {
                n.image = Some(f);
            }
        }
        self.refresh_locks()
    }
}
