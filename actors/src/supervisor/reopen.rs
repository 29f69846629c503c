//! `blockdev-reopen` and `blockdev-set-active`: changing open nodes while exports keep
//! serving.
//!
//! Runs in the supervisor. A reopen is checked whole before anything changes (QEMU's
//! rules and texts: which options may change, which may not be reset, permissions,
//! cycles), then new image descriptors are opened (the supervisor reopens the image
//! when a node's access mode changes; workers never open paths), then each node's
//! worker gets `ReopenNode` with the node's new config and child, and swaps the node
//! under its users (requests in flight finish on the old implementation; see
//! `bulkhead_block::slot`). The graph, which restarts replay, is updated as each
//! worker confirms. Activation state travels in the same config (`inactive`).

use std::os::fd::{AsFd, OwnedFd};

use bulkhead_block::config::{DetectZeroes, Discard, DriverConfig};
use bulkhead_block::file::FileKind;
use bulkhead_block::posix;
use bulkhead_ipc::fd;
use bulkhead_ipc::wire::ToWorker;
use bulkhead_qmp::qapi::types::{
    BlockdevDetectZeroesOptions, BlockdevDiscardOptions, BlockdevOptions,
};
use serde_json::{Map, Value};

use super::blockdev::flatten;
use super::commands::WithGiven;
use super::graph::Role;
use super::{Core, QmpError, call_error, errors};

/// Options every driver takes that a reopen applies itself (QEMU's
/// `bdrv_runtime_opts` and `active`); the rest must stay as they are.
const GENERIC: &[&str] = &[
    "node-name",
    "driver",
    "read-only",
    "auto-read-only",
    "detect-zeroes",
    "discard",
    "cache.direct",
    "cache.no-flush",
    "active",
];

/// One node's new state, checked and ready to apply.
struct Plan {
    name: String,
    config: DriverConfig,
    read_only: bool,
    direct: bool,
    no_flush: bool,
    detect_zeroes: &'static str,
    active: bool,
    child: Option<String>,
    strong: Map<String, Value>,
    options: Map<String, Value>,
    fixed_window: bool,
    /// A new image descriptor (access mode or O_DIRECT changed).
    image: Option<OwnedFd>,
}

impl Core {
    /// `blockdev-reopen` of `entries`, each with the object it was decoded from.
    pub(super) async fn blockdev_reopen(
        &mut self,
        entries: &[WithGiven<BlockdevOptions>],
    ) -> Result<(), QmpError> {
        // qsd 10.0.2 aborts on an empty list (an assertion); an empty reopen does
        // nothing here.
        let mut plans = Vec::new();
        for entry in entries {
            plans.push(self.plan_reopen(entry, &plans)?);
        }
        self.check_reopen_perms(&plans)?;
        // Descriptors first: a refused open changes nothing.
        for plan in &mut plans {
            plan.image = self.reopen_image(plan)?;
        }
        let mut touched = Vec::new();
        let mut result = Ok(());
        for plan in plans {
            touched.push(plan.name.clone());
            let old_child = self
                .graph
                .get(&plan.name)
                .and_then(|n| n.file().map(str::to_string));
            // A worker that fails part-way leaves the nodes before it reopened (the
            // graph records what each worker confirmed); sizes and locks follow below.
            if let Err(e) = self.apply_plan(plan).await {
                result = Err(e);
                break;
            }
            if let Some(old) = old_child
                && self
                    .graph
                    .get(&old)
                    .is_some_and(|c| c.parents == 0 && !c.monitor_owned)
            {
                // An implicitly created child nobody uses any more goes, as in QEMU.
                self.destroy(&old).await;
            }
        }
        for name in &touched {
            self.refresh_sizes(std::slice::from_ref(name)).await;
        }
        let locks = self.refresh_locks();
        result.and(locks)
    }

    /// Checks one entry against its node as QEMU's `bdrv_reopen_prepare` does.
    /// `earlier` holds the plans of the entries before it.
    fn plan_reopen(
        &self,
        entry: &WithGiven<BlockdevOptions>,
        earlier: &[Plan],
    ) -> Result<Plan, QmpError> {
        let base = &entry.typed.base;
        let Some(name) = base.node_name.as_deref() else {
            return Err(errors::reopen_node_name_missing());
        };
        let Some(node) = self.graph.get(name) else {
            return Err(errors::node_not_found(name));
        };
        let old = earlier
            .iter()
            .rev()
            .find(|p| p.name == name)
            .map_or(&node.options, |p| &p.options);
        let new = flatten(&entry.given);
        // The generic options are parsed first (bdrv_reopen_prepare).
        if base.detect_zeroes == Some(BlockdevDetectZeroesOptions::Unmap)
            && base.discard != Some(BlockdevDiscardOptions::Unmap)
        {
            return Err(errors::from_error(
                bulkhead_block::config::ConfigError::DetectZeroesUnmapNeedsDiscard,
            ));
        }
        // What the driver's own reopen takes: raw's window and child.
        let consumed = node.driver.reopen_options();
        let takes_backing = node
            .driver
            .info()
            .children
            .iter()
            .any(|s| s.role == Role::Backing);
        let applied = |k: &str| {
            GENERIC.contains(&k)
                || consumed.contains(&k)
                // Members of a struct option (`overlap-check.template`); a child's
                // inline members are not its driver's to apply.
                || consumed.iter().any(|c| {
                    !node.driver.info().children.iter().any(|s| s.key == *c)
                        && k.strip_prefix(c).is_some_and(|r| r.starts_with('.'))
                })
                || (takes_backing && k == "backing")
        };
        // `active` is taken out of the new options before this check, so once a node
        // has it, no reopen can pass (qsd 10.0.2 behaves so).
        if old.contains_key("active") {
            return Err(errors::option_reset("active"));
        }
        // blockdev-reopen must name the backing of a node that has one, or whose
        // image names one (QEMU's `backing_missing`); naming another is not
        // supported yet.
        if takes_backing {
            let has_backing = node.child(Role::Backing).is_some()
                || node
                    .format
                    .as_ref()
                    .is_some_and(|f| f.backing_file.is_some());
            match new.get("backing") {
                None if has_backing => return Err(errors::backing_missing(name)),
                None => {}
                Some(Value::String(b)) if node.child(Role::Backing) == Some(b.as_str()) => {}
                Some(Value::Null) if node.child(Role::Backing).is_none() => {}
                Some(_) => return Err(errors::option_change("backing")),
            }
        }
        for k in old.keys() {
            if !applied(k) && !new.contains_key(k) {
                return Err(errors::option_reset(k));
            }
        }
        if super::blockdev::driver_of(base.driver) != Some(node.driver) {
            return Err(errors::option_change("driver"));
        }
        for (k, v) in &new {
            if node
                .driver
                .info()
                .children
                .iter()
                .any(|s| k.starts_with(s.key) && k[s.key.len()..].starts_with('.'))
            {
                // An inline child where the node already has one.
                return Err(errors::option_change(k));
            }
            // qsd keeps `force-share` in a form no new value equals: giving it at
            // all is a change.
            if !applied(k) && (old.get(k) != Some(v) || k == "force-share") {
                return Err(errors::option_change(k));
            }
        }

        let cache = base.cache.as_ref();
        let read_only = base.read_only.unwrap_or(false);
        let direct = cache.and_then(|c| c.direct).unwrap_or(false);
        let no_flush = cache.and_then(|c| c.no_flush).unwrap_or(false);
        let active = base.active.unwrap_or(node.active);
        let discard = match base.discard {
            Some(BlockdevDiscardOptions::Unmap) => Discard::Unmap,
            Some(BlockdevDiscardOptions::Ignore) | None => Discard::Ignore,
        };
        let (detect_zeroes, detect_name) = match base.detect_zeroes {
            Some(BlockdevDetectZeroesOptions::On) => (DetectZeroes::On, "on"),
            Some(BlockdevDetectZeroesOptions::Unmap) => (DetectZeroes::Unmap, "unmap"),
            Some(BlockdevDetectZeroesOptions::Off) | None => (DetectZeroes::Off, "off"),
        };
        let mut config = node.config.clone();
        {
            let common = config.common_mut();
            common.read_only = read_only;
            common.discard = discard;
            common.detect_zeroes = detect_zeroes;
            common.no_flush = no_flush;
            common.inactive = !active;
            common.direct = direct;
        }
        let mut strong = node.strong_options.clone();
        let mut child = node.file().map(str::to_string);
        // The driver's own options, without its children (resolved below).
        let mut members = entry.typed.members.clone();
        let slots = node.driver.info().children;
        for slot in slots {
            members.remove(slot.key);
        }
        if let Some(new_strong) = config.reopen(&members).map_err(errors::from_error)? {
            strong = new_strong;
        }
        // A child the driver's reopen takes is named anew (an inline one was refused
        // above); the others must stay as they are (checked with the options).
        for slot in slots
            .iter()
            .filter(|s| s.role == Role::File && consumed.contains(&s.key))
        {
            let c = entry
                .typed
                .members
                .get(slot.key)
                .and_then(Value::as_str)
                .unwrap_or("");
            let Some(cnode) = self.graph.get(c) else {
                return Err(errors::device_not_found("", c));
            };
            if self.graph.reaches(c, name) {
                return Err(errors::reopen_cycle(c, name));
            }
            if active && !cnode.active {
                return Err(errors::inactive_child(c, &slot.role.name(), name));
            }
            child = Some(c.to_string());
        }
        let sizes: Vec<(Role, u64)> = child
            .iter()
            .map(|c| (Role::File, self.graph.get(c).map_or(0, |n| n.size)))
            .collect();
        config.check_children(&sizes).map_err(errors::from_error)?;
        let drivers: Vec<(Role, &str)> = child
            .iter()
            .filter_map(|c| self.graph.get(c))
            .map(|n| (Role::File, n.driver.as_str()))
            .collect();
        config
            .check_child_drivers(&drivers)
            .map_err(errors::from_error)?;
        config.validate().map_err(errors::from_error)?;
        let fixed_window = config.holds_size();
        Ok(Plan {
            name: name.to_string(),
            config,
            read_only,
            direct,
            no_flush,
            detect_zeroes: detect_name,
            active,
            child,
            strong,
            options: new,
            fixed_window,
            image: None,
        })
    }

    /// A node made read-only must not have a writer above it: a writable export on
    /// it or on a node whose chain reaches it (QEMU's permission update).
    fn check_reopen_perms(&self, plans: &[Plan]) -> Result<(), QmpError> {
        for plan in plans.iter().filter(|p| p.read_only) {
            let written = self.writers_of(&plan.name, true);
            if written {
                return Err(errors::read_only_with_writers(&plan.name));
            }
        }
        Ok(())
    }

    /// Whether a writable export reaches `name` through active nodes (an inactive
    /// node passes no permission down); `name` itself must be active too when
    /// `self_active`.
    pub(super) fn writers_of(&self, name: &str, self_active: bool) -> bool {
        self.exports.iter().any(|e| {
            if e.shutting_down || !e.writable {
                return false;
            }
            let chain = self.graph.chain(&e.node);
            let Some(at) = chain.iter().position(|n| n.name == name) else {
                return false;
            };
            chain[..at].iter().all(|n| n.active) && (!self_active || chain[at].active)
        })
    }

    /// Opens the image again when the access mode or O_DIRECT changes.
    fn reopen_image(&self, plan: &Plan) -> Result<Option<OwnedFd>, QmpError> {
        let Some(node) = self.graph.get(&plan.name) else {
            return Ok(None);
        };
        let (Some(path), true) = (&node.path, node.driver.is_posix()) else {
            return Ok(None);
        };
        if node.read_only == plan.read_only && node.direct == plan.direct {
            return Ok(None);
        }
        let kind = node.driver.image().unwrap_or(FileKind::File);
        posix::open_image(path, kind, plan.read_only, plan.direct)
            .map(Some)
            .map_err(errors::from_error)
    }

    /// Sends one node's new state to its worker, then records it in the graph.
    async fn apply_plan(&mut self, plan: Plan) -> Result<(), QmpError> {
        let Some(node) = self.graph.get(&plan.name) else {
            return Err(errors::node_vanished());
        };
        let (home, id) = (node.home, node.id);
        let image = match (&plan.image, &node.image) {
            (Some(new), _) => Some(fd::dup(new).map_err(errors::from_error)?),
            (None, Some(old)) => Some(fd::dup(old).map_err(errors::from_error)?),
            (None, None) => None,
        };
        let child_ref = plan.child.as_deref().and_then(|c| self.node_ref(c));
        if let Some(c) = child_ref {
            self.connect(home, c.home).await?;
        }
        let name = plan.name.clone();
        let children = self.child_refs(&name, Some((Role::File, child_ref)));
        self.reopen_on(home, id, &name, plan.config.clone(), children, image)
            .await?;
        self.graph
            .set_child(&plan.name, Role::File, plan.child.clone());
        if let Some(n) = self.graph.get_mut(&plan.name) {
            n.config = plan.config;
            n.read_only = plan.read_only;
            n.direct = plan.direct;
            n.no_flush = plan.no_flush;
            n.detect_zeroes = plan.detect_zeroes;
            n.active = plan.active;
            n.strong_options = plan.strong;
            n.options = plan.options;
            n.fixed_window = plan.fixed_window;
            if let Some(f) = plan.image {
                // The lock keeps its own descriptor (OFD locks belong to that open
                // file description), so it stays as it is.
                n.image = Some(f);
            }
        }
        self.bitmaps_after_reopen(&name).await;
        Ok(())
    }

    pub(super) async fn reopen_on(
        &mut self,
        home: bulkhead_ipc::wire::WorkerId,
        id: bulkhead_ipc::wire::NodeId,
        name: &str,
        config: DriverConfig,
        children: Vec<(Role, bulkhead_ipc::wire::NodeRef)>,
        image: Option<OwnedFd>,
    ) -> Result<(), QmpError> {
        // The engine that closes does not store the bitmaps the supervisor holds:
        // stored here, as QEMU stores them when a node goes read-only or inactive.
        self.store_persistent_bitmaps(name).await;
        // The node keeps its statistics region (counters and write threshold carry
        // over a reopen), sent first as with AddNode.
        let stats = match self.graph.iter().find(|n| n.id == id) {
            Some(n) => bulkhead_ipc::fd::dup(n.stats.fd()).map_err(errors::from_error)?,
            None => return Err(errors::node_vanished()),
        };
        let worker = self.worker(home).await?;
        let fds: Vec<_> = std::iter::once(&stats)
            .chain(image.iter())
            .map(|f| f.as_fd())
            .collect();
        let body = ToWorker::ReopenNode {
            node: id,
            name: name.to_string(),
            config,
            children,
        };
        worker.call(body, &fds).await.map_err(|e| {
            tracing::warn!(node = %name, error = %e, "node could not be reopened");
            call_error(e)
        })?;
        Ok(())
    }

    /// Sets one node's activation and tells its worker (the same node, its
    /// `inactive` option flipped).
    async fn push_active(&mut self, name: &str, active: bool) -> Result<(), QmpError> {
        let Some(node) = self.graph.get(name) else {
            return Ok(());
        };
        if node.active == active {
            return Ok(());
        }
        if active && node.read_only && self.writers_of(name, false) {
            return Err(errors::block_node_read_only());
        }
        let mut config = node.config.clone();
        config.common_mut().inactive = !active;
        let image = match &node.image {
            Some(f) => Some(fd::dup(f).map_err(errors::from_error)?),
            None => None,
        };
        let (home, id) = (node.home, node.id);
        let children = self.child_refs(name, None);
        self.reopen_on(home, id, name, config.clone(), children, image)
            .await?;
        if let Some(n) = self.graph.get_mut(name) {
            n.config = config;
            n.active = active;
        }
        self.bitmaps_after_reopen(name).await;
        Ok(())
    }

    /// A writable export that does not allow inactivation uses `name`.
    fn blocks_inactivation(&self, name: &str) -> bool {
        self.exports
            .iter()
            .any(|e| !e.shutting_down && e.writable && !e.allow_inactive && e.node == name)
    }

    /// Activates (children first, like `bdrv_activate`) or inactivates one node (and
    /// then the children no active parent uses any more, like
    /// `bdrv_inactivate_recurse`).
    pub(super) async fn set_active(&mut self, name: &str, active: bool) -> Result<(), QmpError> {
        self.set_active_from(name, active, true).await
    }

    /// [`Core::set_active`]; `top`: the node was named (an active parent is an error
    /// rather than a reason to leave it alone).
    async fn set_active_from(
        &mut self,
        name: &str,
        active: bool,
        top: bool,
    ) -> Result<(), QmpError> {
        if active {
            let chain: Vec<String> = self
                .graph
                .chain(name)
                .iter()
                .rev()
                .map(|n| n.name.clone())
                .collect();
            for n in chain {
                self.push_active(&n, true).await?;
            }
        } else {
            let mut cur = Some(name.to_string());
            let mut top = top;
            while let Some(n) = cur.take() {
                let Some(node) = self.graph.get(&n) else {
                    break;
                };
                let child = node.file().map(str::to_string);
                if node.active {
                    if self.graph.parents_of(&n).any(|p| p.active) {
                        if top {
                            return Err(errors::active_parent());
                        }
                        break;
                    }
                    if self.blocks_inactivation(&n) {
                        return Err(errors::inactivate_refused());
                    }
                    self.push_active(&n, false).await?;
                }
                top = false;
                cur = child;
            }
        }
        Ok(())
    }

    /// `blockdev-set-active` of `node_name`, or of every node.
    pub(super) async fn blockdev_set_active(
        &mut self,
        node_name: Option<&str>,
        active: bool,
    ) -> Result<(), QmpError> {
        let result = match node_name {
            Some(name) => {
                if !self.graph.contains(name) {
                    return Err(errors::node_not_found(name));
                }
                self.set_active(name, active).await
            }
            None if active => {
                // Exported nodes first, oldest export first, then every node oldest
                // first (the order of qsd's bdrv_next()); the first failure stops it.
                let mut order: Vec<String> =
                    self.exports.iter().rev().map(|e| e.node.clone()).collect();
                order.extend(self.graph.iter().map(|n| n.name.clone()));
                let mut result = Ok(());
                for n in order {
                    result = self.set_active(&n, true).await;
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
            None => {
                // Top-level nodes in qsd's bdrv_next() order, each with the children
                // only it uses; not atomic (qsd stops at the first refusal too).
                let mut order: Vec<String> =
                    self.exports.iter().rev().map(|e| e.node.clone()).collect();
                order.extend(self.graph.iter().map(|n| n.name.clone()));
                let mut result = Ok(());
                for n in order {
                    if self.graph.parents_of(&n).next().is_some() {
                        continue;
                    }
                    if let Err(e) = self.set_active_from(&n, false, false).await {
                        result = Err(if errors::is_inactivate_refused(&e) {
                            errors::inactivate_all_refused()
                        } else {
                            e
                        });
                        break;
                    }
                }
                result
            }
        };
        let locks = self.refresh_locks();
        result.and(locks)
    }
}
