//! The block graph as the supervisor sees it: node names, drivers, parent/child links,
//! and what `query-named-block-nodes` and `x-debug-query-block-graph` report.
//!
//! Runs in the supervisor. The graph is the source of truth for names and links;
//! workers only know node ids. Everything here is built from options the supervisor
//! validated itself, never from worker replies (sizes aside, which are bounded).

use std::os::fd::OwnedFd;

use bulkhead_ipc::wire::{NodeId, WorkerId};
use serde_json::{Map, Value, json};

pub use bulkhead_block::DriverKind as Driver;

/// A child's role for its parent; it travels in `AddNode`/`ReopenNode`, so it lives
/// in the wire crate.
pub use bulkhead_ipc::wire::ChildRole as Role;

/// One node.
#[derive(Debug)]
pub struct Node {
    /// Cross-process id; also the number `x-debug-query-block-graph` shows (qsd numbers
    /// nodes in creation order, children before their parents).
    pub id: NodeId,
    /// node-name (given or generated).
    pub name: String,
    /// The worker instance hosting it.
    pub home: WorkerId,
    /// Driver.
    pub driver: Driver,
    /// Its children by role, in the order QEMU attaches them.
    pub children: Vec<(Role, String)>,
    /// Number of parents.
    pub parents: usize,
    /// Created by blockdev-add as a root (may be deleted by blockdev-del).
    pub monitor_owned: bool,
    /// read-only.
    pub read_only: bool,
    /// cache.direct.
    pub direct: bool,
    /// cache.no-flush.
    pub no_flush: bool,
    /// detect-zeroes as its QAPI name.
    pub detect_zeroes: &'static str,
    /// Size in bytes as last reported.
    pub size: u64,
    /// The driver's strong options, in the order QEMU adds them, for `json:` filenames.
    pub strong_options: Map<String, Value>,
    /// Image path (file drivers).
    pub path: Option<String>,
    /// Our copy of the image descriptor (file drivers): keeps the OFD locks and lets
    /// us fstat for `actual-size` without asking the worker.
    pub image: Option<OwnedFd>,
    /// QEMU-style OFD locks on the image (file drivers), on a duplicate of `image`.
    pub lock: Option<bulkhead_block::lock::ImageLock>,
    /// raw's window makes the child unshare `resize`.
    pub fixed_window: bool,
    /// Whether an export uses the node.
    pub exported: bool,
    /// What the worker was told to open, replayed into a restarted worker.
    pub config: bulkhead_block::config::DriverConfig,
    /// Not inactivated (`active=off`, `blockdev-set-active`). An inactive node
    /// refuses writes and needs no permissions of its image (it holds no lock).
    pub active: bool,
    /// The options the node was opened (or last reopened) with, flattened to QEMU's
    /// dotted keys (`cache.direct`), a child given by its node-name: what
    /// `blockdev-reopen` compares against (QEMU's `bs->options`).
    pub options: Map<String, Value>,
    /// Its statistics region and write threshold (passed again on every replay).
    pub stats: super::stats::NodeStats,
    /// What its format driver read from its image, as last reported (untrusted).
    pub format: Option<Box<bulkhead_block::FormatInfo>>,
    /// Its backing child was opened from the name inside its image, not given in its
    /// options (it then does not show in the node's `json:` filename).
    pub implicit_backing: bool,
    /// Its data file was opened from the name inside its image, not given in its
    /// options (like an implicit backing, it does not show in the `json:` name).
    pub implicit_data_file: bool,
    /// Its driver found the image corrupt and marked it so (`BLOCK_IMAGE_CORRUPTED`
    /// with `fatal`): like QEMU's node without a driver, it is "ejected" and
    /// queries of it fail.
    pub ejected: bool,
    /// Its dirty bitmaps, oldest first (see `supervisor::bitmaps`).
    pub bitmaps: Vec<super::bitmaps::Bitmap>,
}

impl Node {
    /// Whether its child in `role` was opened from a name inside its image.
    pub fn is_implicit(&self, role: Role) -> bool {
        match role {
            Role::Backing => self.implicit_backing,
            Role::DataFile => self.implicit_data_file,
            _ => false,
        }
    }

    /// The child in `role`, if any.
    pub fn child(&self, role: Role) -> Option<&str> {
        self.children
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, c)| c.as_str())
    }

    /// The `file` child.
    pub fn file(&self) -> Option<&str> {
        self.child(Role::File)
    }

    /// The roles in which `child` is a child of this node.
    pub fn roles_of<'a>(&'a self, child: &'a str) -> impl Iterator<Item = Role> + 'a {
        self.children
            .iter()
            .filter(move |(_, c)| c == child)
            .map(|(r, _)| *r)
    }
}

/// All nodes, in creation order.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: Vec<Node>,
    next_id: u64,
}

impl Graph {
    /// Allocates the next node id.
    pub fn allocate_id(&mut self) -> NodeId {
        self.next_id += 1;
        NodeId(self.next_id)
    }

    /// Looks a node up by name.
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Looks a node up by name, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// Adds a node (its children's parent counts are bumped).
    pub fn insert(&mut self, node: Node) {
        for (_, child) in &node.children {
            if let Some(c) = self.nodes.iter_mut().find(|n| &n.name == child) {
                c.parents += 1;
            }
        }
        self.nodes.push(node);
    }

    /// Moves node `name` after every other (the order queries list nodes in).
    pub fn move_to_end(&mut self, name: &str) {
        if let Some(at) = self.nodes.iter().position(|n| n.name == name) {
            let node = self.nodes.remove(at);
            self.nodes.push(node);
        }
    }

    /// Removes a node (its child's parent count drops).
    pub fn remove(&mut self, name: &str) -> Option<Node> {
        let pos = self.nodes.iter().position(|n| n.name == name)?;
        let node = self.nodes.remove(pos);
        for (_, child) in &node.children {
            if let Some(c) = self.nodes.iter_mut().find(|n| &n.name == child) {
                c.parents = c.parents.saturating_sub(1);
            }
        }
        Some(node)
    }

    /// Points `name`'s child in `role` at `child`, or detaches it (parent counts
    /// follow).
    pub fn set_child(&mut self, name: &str, role: Role, child: Option<String>) {
        let Some(node) = self.get_mut(name) else {
            return;
        };
        let old = node
            .children
            .iter()
            .position(|(r, _)| *r == role)
            .map(|i| node.children.remove(i).1);
        if let Some(c) = &child {
            node.children.push((role, c.clone()));
        }
        if let Some(c) = old.and_then(|o| self.get_mut(&o)) {
            c.parents = c.parents.saturating_sub(1);
        }
        if let Some(c) = child.and_then(|c| self.get_mut(&c)) {
            c.parents += 1;
        }
    }

    /// The names of the nodes `keep` selects, every child before its parents (creation
    /// order otherwise). A reopen can give an old node a younger child, so creation
    /// order alone is not enough for replay.
    pub fn children_first(&self, keep: impl Fn(&Node) -> bool) -> Vec<String> {
        fn visit<'a>(
            graph: &'a Graph,
            node: &'a Node,
            keep: &dyn Fn(&Node) -> bool,
            out: &mut Vec<String>,
            depth: usize,
        ) {
            if depth > 64 || out.iter().any(|n| n == &node.name) {
                return;
            }
            for (_, c) in &node.children {
                if let Some(c) = graph.get(c) {
                    visit(graph, c, keep, out, depth + 1);
                }
            }
            if keep(node) && !out.iter().any(|n| n == &node.name) {
                out.push(node.name.clone());
            }
        }
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| keep(n)) {
            visit(self, n, &keep, &mut out, 0);
        }
        out
    }

    /// The nodes that have `name` as a child, in any role.
    pub fn parents_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes
            .iter()
            .filter(move |n| n.children.iter().any(|(_, c)| c == name))
    }

    /// Whether any node has this name.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Nodes in creation order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Node> {
        self.nodes.iter()
    }

    /// `name` and every node below it, through children of any role, each once
    /// (parents before their children; bounded, though the graph has no cycles).
    pub fn subtree(&self, name: &str) -> Vec<&Node> {
        let mut out: Vec<&Node> = Vec::new();
        let mut todo: Vec<&str> = vec![name];
        while let Some(n) = todo.pop() {
            if out.len() > 4096 || out.iter().any(|o| o.name == n) {
                continue;
            }
            let Some(node) = self.get(n) else {
                continue;
            };
            out.push(node);
            todo.extend(node.children.iter().rev().map(|(_, c)| c.as_str()));
        }
        out
    }

    /// Whether `from` reaches `to` through children of any role (a node reaches
    /// itself): making `from` a child of `to` would create a cycle.
    pub fn reaches(&self, from: &str, to: &str) -> bool {
        self.subtree(from).iter().any(|n| n.name == to)
    }

    /// The node at the bottom of `name`'s chain.
    fn bottom(&self, name: &str) -> Option<&Node> {
        let mut n = self.get(name)?;
        for _ in 0..64 {
            match n.file().and_then(|c| self.get(c)) {
                Some(c) => n = c,
                None => return Some(n),
            }
        }
        Some(n)
    }

    /// The nodes from `name` down its `file` chain, top first: the nodes an export's
    /// data passes (a filter's or format node's protocol child). Other roles
    /// (`backing`, `data-file`, quorum's children) get their permissions from the
    /// drivers that will use them.
    pub fn chain(&self, name: &str) -> Vec<&Node> {
        let mut out = Vec::new();
        let mut cur = self.get(name);
        while let Some(n) = cur {
            if out.len() > 64 {
                break;
            }
            out.push(n);
            cur = n.file().and_then(|c| self.get(c));
        }
        out
    }

    /// Every node, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Node> {
        self.nodes.iter_mut()
    }

    /// Whether `node`'s child in `role` is left out of its `json:` filename: one
    /// opened from the name inside the image, or (a backing) one whose filename is
    /// what the image's header names (QEMU's `bdrv_backing_overridden` is false:
    /// after `change-backing-file`, say).
    fn hides(&self, node: &Node, role: Role) -> bool {
        node.is_implicit(role) || (role == Role::Backing && self.backing_named_in_image(node))
    }

    /// The backing child's filename is the header's backing file name as written
    /// (QEMU compares `auto_backing_file`, the header's string, unresolved: a
    /// relative name never matches an opened node's filename).
    fn backing_named_in_image(&self, node: &Node) -> bool {
        let (Some(f), Some(b)) = (
            node.format.as_ref(),
            node.child(Role::Backing).and_then(|b| self.get(b)),
        ) else {
            return false;
        };
        let Some(name) = f.backing_file.as_ref().filter(|n| !n.is_empty()) else {
            return false;
        };
        *name == self.filename(b)
    }

    /// `name`, then every node below it along backing links (a filter's file
    /// standing in for a backing), top first: a backing chain as QEMU walks it
    /// (`bdrv_filter_or_cow_bs`).
    pub fn chain_names(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = self.get(name);
        while let Some(n) = cur {
            if out.contains(&n.name) {
                break;
            }
            out.push(n.name.clone());
            let below = if n.driver.info().filter {
                n.file()
            } else {
                n.child(Role::Backing)
            };
            cur = below.and_then(|c| self.get(c));
        }
        out
    }

    /// QEMU's full open options of a node: driver, strong options, children.
    fn full_options(&self, node: &Node) -> Value {
        let mut m = Map::new();
        if let Some(path) = &node.path {
            m.insert("driver".into(), node.driver.as_str().into());
            m.insert("filename".into(), path.clone().into());
            return Value::Object(m);
        }
        for (k, v) in &node.strong_options {
            m.insert(k.clone(), v.clone());
        }
        m.insert("driver".into(), node.driver.as_str().into());
        // Quorum's children go as one list `children` in index order (QEMU's
        // quorum_gather_child_options); every other child under its role's name.
        let mut quorum: Vec<(u32, Value)> = Vec::new();
        for (role, c) in &node.children {
            if self.hides(node, *role) {
                continue;
            }
            if let Some(c) = self.get(c) {
                match role {
                    Role::Child(i) => quorum.push((*i, self.full_options(c))),
                    _ => {
                        m.insert(role.name().into_owned(), self.full_options(c));
                    }
                }
            }
        }
        if !quorum.is_empty() {
            quorum.sort_by_key(|(i, _)| *i);
            m.insert(
                "children".into(),
                Value::Array(quorum.into_iter().map(|(_, v)| v).collect()),
            );
        }
        Value::Object(m)
    }

    /// The `filename` QEMU reports (bdrv_refresh_filename): a plain name when the
    /// options say nothing beyond it, else `json:{...}`.
    pub fn filename(&self, node: &Node) -> String {
        if let Some(path) = &node.path {
            return path.clone();
        }
        // Only a node whose sole child is its `file` takes the child's name (a backing
        // opened from the name inside the image does not count).
        let only_file = node
            .children
            .iter()
            .all(|(r, _)| *r == Role::File || self.hides(node, *r));
        if node.strong_options.is_empty() && only_file && !node.driver.is_filter() {
            match node.file().and_then(|c| self.get(c)) {
                None => return format!("{}://", node.driver.as_str()),
                Some(c) => {
                    let f = self.filename(c);
                    if !f.starts_with("json:") {
                        return f;
                    }
                }
            }
        }
        format!(
            "json:{}",
            bulkhead_qmp::json::to_string(&self.full_options(node))
        )
    }

    /// Allocated bytes on disk: st_blocks * 512 of a node's own image, or the sum over
    /// the children that hold its data or metadata (not its backing), as QEMU's
    /// `bdrv_sum_allocated_file_size` counts them.
    fn actual_size(&self, node: &Node) -> u64 {
        self.actual_size_at(node, 0)
    }

    fn actual_size_at(&self, node: &Node, depth: usize) -> u64 {
        if let Some(fd) = &node.image {
            return rustix::fs::fstat(fd)
                .map(|st| (st.st_blocks as u64).saturating_mul(512))
                .unwrap_or(0);
        }
        if depth > 64 {
            return 0;
        }
        node.children
            .iter()
            .filter(|(r, _)| *r != Role::Backing)
            .filter_map(|(_, c)| self.get(c))
            .map(|c| self.actual_size_at(c, depth + 1))
            .fold(0u64, u64::saturating_add)
    }

    /// `ImageInfo` of `node` (its `backing-image` recursively, bounded by the chain's
    /// length), members in the order QEMU fills them.
    fn image_info(&self, node: &Node, depth: usize, flat: bool) -> Map<String, Value> {
        let filename = self.filename(node);
        let bottom_posix = self.bottom(&node.name).is_some_and(|b| b.driver.is_posix());
        let format = node.format.as_deref();
        // A filter's cluster size is its child's (QEMU's get_info passes through).
        let filtered = node
            .driver
            .is_filter()
            .then(|| node.file().and_then(|c| self.get(c)))
            .flatten()
            .and_then(|c| c.format.as_deref());
        let mut image = Map::new();
        image.insert("filename".into(), filename.into());
        image.insert("format".into(), node.driver.as_str().into());
        match format {
            Some(f) => {
                image.insert("dirty-flag".into(), f.dirty.into());
            }
            None if bottom_posix => {
                image.insert("dirty-flag".into(), false.into());
            }
            None => {}
        }
        image.insert("actual-size".into(), self.actual_size(node).into());
        image.insert("virtual-size".into(), node.size.into());
        if let Some(f) = filtered {
            image.insert("cluster-size".into(), f.cluster_size.into());
        }
        let backing = node.child(Role::Backing).and_then(|b| self.get(b));
        if let Some(f) = format {
            image.insert("cluster-size".into(), f.cluster_size.into());
            if let Some(name) = &f.backing_file {
                image.insert("backing-filename".into(), name.clone().into());
                let full = match backing {
                    Some(b) if node.implicit_backing => self.filename(b),
                    // Not opened (or given otherwise): the name resolved as QEMU
                    // resolves it against the image's own file.
                    _ => {
                        let image = self.chain(&node.name).last().and_then(|b| b.path.clone());
                        image
                            .and_then(|i| super::backing::resolve(name, &i).ok())
                            .map_or_else(|| name.clone(), |p| p.to_string_lossy().into_owned())
                    }
                };
                image.insert("full-backing-filename".into(), full.into());
                if let Some(fmt) = &f.backing_format {
                    image.insert("backing-filename-format".into(), fmt.clone().into());
                }
            }
            if !f.snapshots.is_empty() {
                let list: Vec<Value> = f.snapshots.iter().map(snapshot_info).collect();
                image.insert("snapshots".into(), Value::Array(list));
            }
            image.insert("format-specific".into(), qcow2_specific(f));
        } else if node.driver.is_posix() {
            image.insert(
                "format-specific".into(),
                json!({"type": "file", "data": {}}),
            );
        }
        if let Some(b) = backing
            && depth < 64
            && !flat
        {
            image.insert(
                "backing-image".into(),
                Value::Object(self.image_info(b, depth + 1, flat)),
            );
        }
        image
    }

    /// How many backing layers lie below `node` (`backing_file_depth`).
    fn backing_depth(&self, node: &Node) -> usize {
        let mut depth = 0;
        let mut cur = node.child(Role::Backing).and_then(|b| self.get(b));
        while let Some(n) = cur {
            depth += 1;
            if depth > 64 {
                break;
            }
            cur = n.child(Role::Backing).and_then(|b| self.get(b));
        }
        depth
    }

    /// One element of `query-named-block-nodes` (BlockDeviceInfo), members in the order
    /// QEMU fills them so the writer's QDict ordering matches qsd.
    pub fn device_info(&self, node: &Node, flat: bool) -> Value {
        let filename = self.filename(node);
        let image = self.image_info(node, 0, flat);
        let backing = node.child(Role::Backing).and_then(|b| self.get(b));
        let mut m = Map::new();
        m.insert("file".into(), filename.into());
        m.insert("node-name".into(), node.name.clone().into());
        m.insert("ro".into(), node.read_only.into());
        m.insert("drv".into(), node.driver.as_str().into());
        if let Some(b) = backing {
            m.insert("backing_file".into(), self.filename(b).into());
        }
        // QEMU counts the depth along `backing-image`, which `flat` leaves out.
        let depth = if flat { 0 } else { self.backing_depth(node) };
        m.insert("backing_file_depth".into(), depth.into());
        m.insert("active".into(), node.active.into());
        m.insert("encrypted".into(), false.into());
        m.insert("detect_zeroes".into(), node.detect_zeroes.into());
        for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
            m.insert(k.into(), 0.into());
        }
        m.insert("image".into(), Value::Object(image));
        m.insert(
            "cache".into(),
            json!({"writeback": true, "direct": node.direct, "no-flush": node.no_flush}),
        );
        m.insert(
            "write_threshold".into(),
            node.stats.write_threshold().into(),
        );
        // QEMU lists a node's bitmaps newest first: those added since, then the
        // image's directory reversed.
        let mut list = super::bitmaps::dirty_bitmaps(node);
        if let Some(f) = node.format.as_ref() {
            // A restarted worker's engine sees the bitmaps the supervisor holds as
            // in use: the supervisor's are the real ones.
            list.extend(
                f.dirty_bitmaps
                    .iter()
                    .rev()
                    .filter(|d| !node.bitmaps.iter().any(|b| b.name == d.name))
                    .map(dirty_info),
            );
        }
        if !list.is_empty() {
            m.insert("dirty-bitmaps".into(), Value::Array(list));
        }
        Value::Object(m)
    }

    /// The nodes in the order QEMU allocated them: as they were named (children
    /// first), except that a backing node opened from the name inside an image comes
    /// before its own file (QEMU allocates it before it opens the file by name).
    fn creation_order(&self) -> Vec<&str> {
        let implicit: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.implicit_backing)
            .filter_map(|n| n.child(Role::Backing))
            .collect();
        let mut order: Vec<&str> = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            if order.contains(&n.name.as_str()) {
                continue;
            }
            if let Some(parent) = self.nodes.iter().find(|p| {
                implicit.contains(&p.name.as_str())
                    && p.file() == Some(n.name.as_str())
                    && !order.contains(&p.name.as_str())
            }) {
                order.push(&parent.name);
            }
            order.push(&n.name);
        }
        order
    }

    /// `query-named-block-nodes`: newest first, like qsd. Without backing chains the
    /// `flat` flag changes nothing.
    pub fn query_named_block_nodes(&self, flat: bool) -> Value {
        Value::Array(
            self.nodes
                .iter()
                .rev()
                .map(|n| self.device_info(n, flat))
                .collect(),
        )
    }

    /// `x-debug-query-block-graph`. qsd numbers the nodes that exist at query time
    /// 1..N, oldest first.
    pub fn debug_graph(&self) -> Value {
        let order = self.creation_order();
        let number = |name: &str| order.iter().position(|n| *n == name).map_or(0, |i| i + 1);
        // Listed newest-named first (as query-named-block-nodes), numbered in
        // allocation order.
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .rev()
            .map(|n| json!({"id": number(&n.name), "type": "block-driver", "name": n.name}))
            .collect();
        let mut edges = Vec::new();
        for n in self.nodes.iter().rev() {
            for (role, c) in &n.children {
                let Some(c) = self.get(c) else {
                    continue;
                };
                let (perm, shared) = edge_perms(n, *role);
                edges.push(json!({
                    "parent": number(&n.name), "child": number(&c.name), "name": role.name(),
                    "perm": perm, "shared-perm": shared,
                }));
            }
        }
        json!({"nodes": nodes, "edges": edges})
    }
}

/// The permissions `parent` takes on its child in `role`, and what it shares, as
/// `x-debug-query-block-graph` names them (most significant first). A format node
/// with metadata (qcow2) reads its file always and writes and resizes it when
/// writable, sharing neither (QEMU's `bdrv_default_perms_for_storage`); every other
/// edge passes its parents' needs through (none without an export), and a fixed raw
/// window refuses to share `resize`.
pub fn edge_perms(parent: &Node, role: Role) -> (Vec<&'static str>, Vec<&'static str>) {
    if parent.format.is_some() && role == Role::File && parent.active {
        let mut perm = Vec::new();
        if !parent.read_only {
            perm.extend(["resize", "write"]);
        }
        perm.push("consistent-read");
        return (perm, vec!["write-unchanged", "consistent-read"]);
    }
    let mut shared = Vec::new();
    if !parent.fixed_window {
        shared.push("resize");
    }
    shared.extend(["write-unchanged", "write", "consistent-read"]);
    (Vec::new(), shared)
}

/// `BlockDirtyInfo` of one persistent bitmap a format node loaded.
fn dirty_info(b: &bulkhead_block::DirtyBitmap) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), b.name.clone().into());
    m.insert("count".into(), b.count.into());
    m.insert("granularity".into(), b.granularity.into());
    m.insert("recording".into(), b.recording.into());
    m.insert("busy".into(), false.into());
    m.insert("persistent".into(), true.into());
    if b.inconsistent {
        m.insert("inconsistent".into(), true.into());
    }
    Value::Object(m)
}

/// `SnapshotInfo` of one internal snapshot.
pub fn snapshot_info(sn: &bulkhead_block::SnapshotEntry) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), sn.id.clone().into());
    m.insert("name".into(), sn.name.clone().into());
    m.insert("vm-state-size".into(), sn.vm_state_size.into());
    m.insert("date-sec".into(), sn.date_sec.into());
    m.insert("date-nsec".into(), sn.date_nsec.into());
    m.insert("vm-clock-sec".into(), sn.vm_clock_sec.into());
    m.insert("vm-clock-nsec".into(), sn.vm_clock_nsec.into());
    if let Some(i) = sn.icount {
        m.insert("icount".into(), i.into());
    }
    Value::Object(m)
}

/// `ImageInfoSpecific` of a qcow2 image (QEMU's `qcow2_get_specific_info`).
fn qcow2_specific(f: &bulkhead_block::FormatInfo) -> Value {
    let mut d = Map::new();
    d.insert("compat".into(), f.compat.clone().into());
    if f.compat != "0.10" {
        if let Some(df) = &f.data_file {
            d.insert("data-file".into(), df.clone().into());
            d.insert("data-file-raw".into(), f.data_file_raw.into());
        }
        d.insert("extended-l2".into(), f.extended_l2.into());
        d.insert("lazy-refcounts".into(), f.lazy_refcounts.into());
        d.insert("corrupt".into(), f.corrupt.into());
    }
    d.insert("refcount-bits".into(), f.refcount_bits.into());
    if let Some(bitmaps) = f.bitmaps.as_ref().filter(|b| !b.is_empty()) {
        let list: Vec<Value> = bitmaps
            .iter()
            .map(|b| {
                let mut flags = Vec::new();
                if b.in_use {
                    flags.push(Value::from("in-use"));
                }
                if b.auto {
                    flags.push(Value::from("auto"));
                }
                let mut m = Map::new();
                m.insert("name".into(), b.name.clone().into());
                m.insert("granularity".into(), b.granularity.into());
                m.insert("flags".into(), Value::Array(flags));
                Value::Object(m)
            })
            .collect();
        d.insert("bitmaps".into(), Value::Array(list));
    }
    d.insert("compression-type".into(), f.compression_type.clone().into());
    json!({"type": "qcow2", "data": d})
}

#[cfg(test)]
pub(crate) mod tests {
    use bulkhead_block::config::DriverConfig;
    use bulkhead_block::null::NullConfig;

    use super::*;

    /// Adds a null-co node (a raw one over `child`) hosted by instance 1.
    pub(crate) fn node(graph: &mut Graph, name: &str, child: Option<&str>) {
        let children = child
            .map(|c| (Role::File, c))
            .into_iter()
            .collect::<Vec<_>>();
        node_with(graph, name, &children);
    }

    fn node_with(graph: &mut Graph, name: &str, children: &[(Role, &str)]) {
        let id = graph.allocate_id();
        graph.insert(Node {
            id,
            name: name.to_string(),
            home: WorkerId(1),
            driver: if children.is_empty() {
                Driver::NullCo
            } else {
                Driver::Raw
            },
            children: children.iter().map(|(r, c)| (*r, c.to_string())).collect(),
            parents: 0,
            monitor_owned: true,
            read_only: false,
            direct: false,
            no_flush: false,
            detect_zeroes: "off",
            size: 0,
            strong_options: Map::new(),
            path: None,
            image: None,
            lock: None,
            fixed_window: false,
            exported: false,
            config: DriverConfig::NullCo(NullConfig::default()),
            active: true,
            options: Map::new(),
            stats: match crate::supervisor::stats::NodeStats::create() {
                Ok(s) => s,
                Err(e) => panic!("statistics region: {}", e.desc),
            },
            format: None,
            implicit_backing: false,
            implicit_data_file: false,
            ejected: false,
            bitmaps: Vec::new(),
        });
    }

    fn parents(graph: &Graph, name: &str) -> usize {
        graph.get(name).map_or(usize::MAX, |n| n.parents)
    }

    #[test]
    fn replacing_a_child_moves_the_parent_count_and_replay_order_follows() {
        let mut g = Graph::default();
        node(&mut g, "f0", None);
        node(&mut g, "r0", Some("f0"));
        node(&mut g, "f1", None);
        node(&mut g, "r2", Some("f1"));
        assert_eq!((parents(&g, "f0"), parents(&g, "f1")), (1, 1));
        // r0 now sits on r2, younger than itself.
        g.set_child("r0", Role::File, Some("r2".into()));
        assert_eq!(
            (parents(&g, "f0"), parents(&g, "r2"), parents(&g, "f1")),
            (0, 1, 1)
        );
        assert_eq!(g.get("r0").and_then(Node::file), Some("r2"));
        assert_eq!(
            g.parents_of("r2")
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            vec!["r0"]
        );
        // Creation order would open r0 before r2; children first puts r2, f1 first.
        assert_eq!(g.children_first(|_| true), vec!["f0", "f1", "r2", "r0"]);
        assert_eq!(
            g.children_first(|n| n.name.starts_with('r')),
            vec!["r2", "r0"]
        );
        let edges = g.debug_graph()["edges"].clone();
        assert_eq!(
            edges
                .as_array()
                .map(|e| e.iter().map(|e| e["name"].clone()).collect::<Vec<_>>()),
            Some(vec![json!("file"), json!("file")])
        );
        // Detaching drops the count; removing a parent does too.
        g.set_child("r0", Role::File, None);
        assert_eq!(parents(&g, "r2"), 0);
        g.remove("r2");
        assert_eq!(parents(&g, "f1"), 0);
    }

    #[test]
    fn roles_print_with_qemus_child_names() {
        let names: Vec<String> = [Role::File, Role::Backing, Role::DataFile, Role::Child(3)]
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(names, ["file", "backing", "data-file", "children.3"]);
    }

    /// A qcow2-like node with `file`, `backing` and `data-file`, and a quorum-like
    /// node with numbered children: every role counts, orders replay and shows.
    #[test]
    fn every_role_counts_as_a_link_and_orders_replay() {
        let mut g = Graph::default();
        node(&mut g, "proto", None);
        node(&mut g, "base", None);
        node(&mut g, "data", None);
        node_with(
            &mut g,
            "top",
            &[
                (Role::File, "proto"),
                (Role::Backing, "base"),
                (Role::DataFile, "data"),
            ],
        );
        node(&mut g, "q1", None);
        node_with(
            &mut g,
            "quorum",
            &[(Role::Child(1), "q1"), (Role::Child(0), "top")],
        );
        for n in ["proto", "base", "data", "q1", "top"] {
            assert_eq!(parents(&g, n), 1, "{n}");
        }
        assert_eq!(
            g.get("top")
                .map(|t| (t.child(Role::Backing), t.child(Role::DataFile))),
            Some((Some("base"), Some("data")))
        );
        assert_eq!(
            g.get("quorum")
                .map(|q| q.roles_of("top").collect::<Vec<_>>()),
            Some(vec![Role::Child(0)])
        );
        // A backing child younger than its parent still opens first.
        node(&mut g, "newbase", None);
        g.set_child("top", Role::Backing, Some("newbase".into()));
        assert_eq!((parents(&g, "base"), parents(&g, "newbase")), (0, 1));
        let order = g.children_first(|_| true);
        let pos = |n: &str| order.iter().position(|o| o == n).unwrap_or(usize::MAX);
        for (child, parent) in [
            ("proto", "top"),
            ("newbase", "top"),
            ("data", "top"),
            ("top", "quorum"),
            ("q1", "quorum"),
        ] {
            assert!(
                pos(child) < pos(parent),
                "{child} before {parent}: {order:?}"
            );
        }
        // Cycles are seen through any role.
        assert!(g.reaches("quorum", "newbase"));
        assert!(g.reaches("top", "data"));
        assert!(!g.reaches("data", "top"));
        assert!(!g.reaches("base", "top"));
        let mut sub: Vec<&str> = g
            .subtree("quorum")
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        sub.sort_unstable();
        assert_eq!(sub, ["data", "newbase", "proto", "q1", "quorum", "top"]);
        assert_eq!(
            g.parents_of("newbase")
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["top"]
        );
        // Removing the parent frees every child, whatever its role.
        g.remove("quorum");
        assert_eq!((parents(&g, "top"), parents(&g, "q1")), (0, 0));
        g.remove("top");
        for n in ["proto", "newbase", "data"] {
            assert_eq!(parents(&g, n), 0, "{n}");
        }
    }

    #[test]
    fn edges_and_json_filenames_use_the_role_names() {
        let mut g = Graph::default();
        node(&mut g, "proto", None);
        node(&mut g, "base", None);
        node_with(
            &mut g,
            "top",
            &[(Role::File, "proto"), (Role::Backing, "base")],
        );
        node(&mut g, "q0", None);
        node_with(
            &mut g,
            "quorum",
            &[(Role::Child(1), "top"), (Role::Child(0), "q0")],
        );
        let edges = g.debug_graph()["edges"].clone();
        let mut names: Vec<String> = edges
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|e| e["name"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default();
        names.sort_unstable();
        assert_eq!(names, ["backing", "children.0", "children.1", "file"]);
        let filename = g.get("quorum").map(|q| g.filename(q)).unwrap_or_default();
        assert_eq!(
            filename,
            concat!(
                r#"json:{"children": [{"driver": "null-co"}, "#,
                r#"{"backing": {"driver": "null-co"}, "driver": "raw", "#,
                r#""file": {"driver": "null-co"}}], "driver": "raw"}"#
            )
        );
    }
}
