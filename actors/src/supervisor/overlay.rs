//! External snapshots: `blockdev-snapshot` (an overlay the monitor added gets the node
//! as its backing and takes over every user of it).
//!
//! Runs in the supervisor, on the graph-change machinery of `replace.rs`: the overlay
//! is reopened with the node as its `backing` child (in its own worker, over a data
//! channel if the node lives elsewhere), every other user of the node (parents,
//! exports) is re-pointed to the overlay under live I/O, and the node becomes
//! read-only, as QEMU's `external_snapshot_commit` leaves it. Like QEMU, the overlay's
//! header is not touched: its backing file name stays what it was (`change-backing-file`
//! writes one). Everything QEMU refuses is checked before anything changes.

use super::graph::{Node, Role};
use super::{Core, QmpError, errors};

impl Core {
    /// `blockdev-snapshot`: `overlay` goes above `node`.
    pub(super) async fn blockdev_snapshot(
        &mut self,
        node: &str,
        overlay: &str,
    ) -> Result<(), QmpError> {
        let n = self
            .graph
            .get(node)
            .ok_or_else(|| errors::device_not_found(node, node))?;
        if let Some(parent) = self.backing_parent(n) {
            return Err(errors::node_busy_backing(node, &parent));
        }
        let o = self
            .graph
            .get(overlay)
            .ok_or_else(|| errors::device_not_found(overlay, overlay))?;
        if o.parents > 0 || self.exports.iter().any(|e| e.node == o.name) || o.name == n.name {
            return Err(errors::overlay_in_use());
        }
        if o.child(Role::Backing).is_some() {
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
        let (node, overlay) = (n.name.clone(), o.name.clone());
        self.attach_backing(&overlay, &node).await?;
        self.replace_node(&node, &overlay).await?;
        if let Err(e) = self.make_read_only(&node).await {
            // QEMU ignores a failure here too (the snapshot stands).
            tracing::warn!(node, error = %e.desc, "the snapshotted node stays writable");
        }
        Ok(())
    }

    /// The parent using `n` as its backing child, if any (QEMU's op blocker:
    /// "node is used as backing hd of ...").
    fn backing_parent(&self, n: &Node) -> Option<String> {
        self.graph
            .iter()
            .find(|p| p.child(Role::Backing) == Some(n.name.as_str()))
            .map(|p| p.name.clone())
    }

    /// Reopens `overlay` with `backing` as its backing child.
    async fn attach_backing(&mut self, overlay: &str, backing: &str) -> Result<(), QmpError> {
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
        Ok(())
    }

    /// Reopens `name` read-only, and with it the `file` and `data-file` children it
    /// created itself (they inherit its options in QEMU; children the monitor added
    /// keep their mode).
    async fn make_read_only(&mut self, name: &str) -> Result<(), QmpError> {
        let inherit: Vec<String> = self
            .graph
            .get(name)
            .map(|n| {
                n.children
                    .iter()
                    .filter(|(r, _)| matches!(r, Role::File | Role::DataFile))
                    .map(|(_, c)| c.clone())
                    .collect()
            })
            .unwrap_or_default();
        for c in inherit {
            if self.graph.get(&c).is_some_and(|c| !c.monitor_owned) {
                Box::pin(self.make_read_only(&c)).await?;
            }
        }
        self.reopen_read_only(name).await
    }

    /// Reopens one node read-only.
    async fn reopen_read_only(&mut self, name: &str) -> Result<(), QmpError> {
        let Some(n) = self.graph.get(name) else {
            return Err(errors::node_vanished());
        };
        if n.read_only {
            return Ok(());
        }
        let (home, id) = (n.home, n.id);
        let mut config = n.config.clone();
        config.common_mut().read_only = true;
        let image = n
            .image
            .as_ref()
            .map(bulkhead_ipc::fd::dup)
            .transpose()
            .map_err(errors::from_error)?;
        let children = self.child_refs(name, None);
        self.reopen_on(home, id, name, config.clone(), children, image)
            .await?;
        if let Some(n) = self.graph.get_mut(name) {
            n.config = config;
            n.read_only = true;
            n.options.insert("read-only".into(), true.into());
        }
        self.refresh_locks()
    }
}
