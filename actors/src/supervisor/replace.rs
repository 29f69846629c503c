//! Changing the graph's shape under live I/O: re-pointing every user of a node to
//! another node, and on it inserting a filter above a node and removing one.
//!
//! Runs in the supervisor. The users of a node are its parents (any role) and the
//! exports serving it. Each parent gets `ReopenNode` with its current config and the
//! new child, each export's serving worker `ExportRetarget`; both swap under their
//! requests with a drain (requests in flight finish on the old node, new ones go to
//! the new node, the reply comes once the old one is idle), so nothing is lost or
//! sent twice. Everything QEMU would refuse is checked before anything changes.
//! Mirror and commit completion, snapshots and backup filters are meant to build on
//! this; today the `x-bulkhead-*` test commands reach it. See `design/graph.md`.

use bulkhead_ipc::fd;
use bulkhead_ipc::wire::{ExportKey, ToWorker};

use super::graph::Role;
use super::{Core, QmpError, call_error, errors};

/// What re-pointing `old`'s users to `new` changes, checked.
struct Replacement {
    /// Parents and the role `old` plays for each.
    parents: Vec<(String, Role)>,
    /// Exports serving `old` (not being removed: those keep their old node until
    /// their last client is gone).
    exports: Vec<ExportKey>,
}

impl Core {
    /// Re-points every user of `old` to `new`: parents that have `old` as a child
    /// get `new` in the same role, exports serving `old` serve `new`. A parent that
    /// `new` itself reaches keeps `old` (re-pointing it would make a cycle: this is
    /// what leaves a just inserted filter above `old`, as QEMU's
    /// `should_update_child`). `old` stays unless nothing holds it any more and the
    /// monitor does not own it.
    pub(super) async fn replace_node(&mut self, old: &str, new: &str) -> Result<(), QmpError> {
        let plan = self.plan_replacement(old, new)?;
        let result = self.apply_replacement(old, new, plan).await;
        let exported = |core: &Core, n: &str| core.exports.iter().any(|e| e.node == n);
        for n in [old, new] {
            let e = exported(self, n);
            if let Some(node) = self.graph.get_mut(n) {
                node.exported = e;
            }
        }
        if self
            .graph
            .get(old)
            .is_some_and(|n| n.parents == 0 && !n.monitor_owned && !n.exported)
        {
            // An implicitly created node nobody uses any more goes, as in QEMU.
            self.destroy(old).await;
        }
        let locks = self.refresh_locks();
        result.and(locks)
    }

    /// Inserts `filter`, whose `file` child is `node` and which nothing uses yet,
    /// above `node`: every other user of `node` uses `filter` from now on.
    pub(super) async fn insert_filter(&mut self, node: &str, filter: &str) -> Result<(), QmpError> {
        let Some(f) = self.graph.get(filter) else {
            return Err(errors::node_not_found(filter));
        };
        if !self.graph.contains(node) {
            return Err(errors::node_not_found(node));
        }
        if f.file() != Some(node) {
            return Err(errors::filter_not_above(filter, node));
        }
        if f.parents > 0 || self.exports.iter().any(|e| e.node == filter) {
            return Err(errors::filter_in_use(filter));
        }
        self.replace_node(node, filter).await
    }

    /// Removes `filter` from above its `file` child: its users use the child from
    /// now on. Like QEMU, the filter node itself stays until `blockdev-del` (if the
    /// monitor owns it).
    pub(super) async fn remove_filter(&mut self, filter: &str) -> Result<(), QmpError> {
        let Some(f) = self.graph.get(filter) else {
            return Err(errors::node_not_found(filter));
        };
        let Some(child) = f.file().map(str::to_string) else {
            return Err(errors::not_a_filter(filter));
        };
        self.replace_node(filter, &child).await
    }

    /// Checks a replacement as QEMU would before anything changes: both nodes exist
    /// and differ, no read-only node under writers, no inactive node under active
    /// users; and what bulkhead cannot do yet (a role no driver re-points, an export
    /// whose size would change under its clients).
    fn plan_replacement(&self, old: &str, new: &str) -> Result<Replacement, QmpError> {
        let Some(old_node) = self.graph.get(old) else {
            return Err(errors::node_not_found(old));
        };
        let Some(new_node) = self.graph.get(new) else {
            return Err(errors::node_not_found(new));
        };
        if old == new {
            return Err(errors::replace_by_itself(old));
        }
        let mut parents = Vec::new();
        for p in self.graph.parents_of(old) {
            if self.graph.reaches(new, &p.name) {
                continue;
            }
            for role in p.roles_of(old) {
                // No driver takes a child in another role yet (its worker would
                // refuse the ReopenNode, part-way through the re-pointing): refuse
                // before anything changes.
                if role != Role::File {
                    return Err(errors::replace_role_unsupported(&p.name, &role.name()));
                }
                if let bulkhead_block::DriverConfig::Raw(raw) = &p.config {
                    bulkhead_block::raw::check_window(raw, new_node.size)
                        .map_err(errors::from_error)?;
                }
                if p.active && !new_node.active {
                    return Err(errors::inactive_child(new, &role.name(), &p.name));
                }
                parents.push((p.name.clone(), role));
            }
        }
        let mut exports = Vec::new();
        for e in self
            .exports
            .iter()
            .filter(|e| e.node == old && !e.shutting_down)
        {
            if !e.allow_inactive && !new_node.active {
                return Err(errors::inactive_export_target(new, &e.id));
            }
            if new_node.size != old_node.size {
                return Err(errors::export_target_size(
                    &e.id,
                    old_node.size,
                    new,
                    new_node.size,
                ));
            }
            exports.push(e.key);
        }
        // A writable export reaching `old` through active nodes writes to `new`
        // from now on (if it went through a re-pointed parent or serves `old`).
        if new_node.read_only && self.writers_of(old, false) {
            return Err(errors::read_only_with_writers(new));
        }
        Ok(Replacement { parents, exports })
    }

    /// Re-points the parents, then the exports; the graph and the export table
    /// record each step as its worker confirms it, so a failure part-way leaves
    /// them true (and a restarted worker gets what the graph says).
    async fn apply_replacement(
        &mut self,
        old: &str,
        new: &str,
        plan: Replacement,
    ) -> Result<(), QmpError> {
        let Some(target) = self.node_ref(new) else {
            return Err(errors::node_vanished());
        };
        for (parent, role) in plan.parents {
            let Some(p) = self.graph.get(&parent) else {
                continue;
            };
            let (home, id, config) = (p.home, p.id, p.config.clone());
            let image = match &p.image {
                Some(f) => Some(fd::dup(f).map_err(errors::from_error)?),
                None => None,
            };
            self.connect(home, target.home).await?;
            let children = self.child_refs(&parent, Some((role, Some(target))));
            self.reopen_on(home, id, &parent, config, children, image)
                .await?;
            self.graph.set_child(&parent, role, Some(new.to_string()));
            tracing::debug!(%parent, %role, from = old, to = new, "child re-pointed");
        }
        for key in plan.exports {
            let Some(e) = self.exports.by_key(key) else {
                continue;
            };
            // A serving worker that is not running gets the new node when it is
            // replayed (from the table, updated below).
            if let Some(server) = self.export_server(e).filter(|w| self.running(*w).is_some()) {
                self.connect(server, target.home).await?;
                let w = self.worker(server).await?;
                w.call(
                    ToWorker::ExportRetarget {
                        export: key,
                        node: target,
                    },
                    &[],
                )
                .await
                .map_err(call_error)?;
            }
            if let Some(e) = self.exports.by_key_mut(key) {
                tracing::debug!(export = %e.id, from = old, to = new, "export re-pointed");
                e.node = new.to_string();
            }
        }
        Ok(())
    }
}
