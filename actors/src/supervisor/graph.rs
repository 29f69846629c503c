//! The block graph as the supervisor sees it: node names, drivers, parent/child links,
//! and what `query-named-block-nodes` and `x-debug-query-block-graph` report.
//!
//! Runs in the supervisor. The graph is the source of truth for names and links;
//! workers only know node ids. Everything here is built from options the supervisor
//! validated itself, never from worker replies (sizes aside, which are bounded).

use std::os::fd::OwnedFd;

use bulkhead_ipc::wire::{NodeId, WorkerId, WorkerKind};
use serde_json::{Map, Value, json};

/// A node driver bulkhead implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `file`.
    File,
    /// `host_device`.
    HostDevice,
    /// `raw`.
    Raw,
    /// `null-co`.
    NullCo,
    /// `null-aio`.
    NullAio,
}

impl Driver {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        self.worker().as_str()
    }

    /// The worker kind serving a standalone node of this driver under the `kind`
    /// isolation policy.
    pub fn worker(self) -> WorkerKind {
        match self {
            Driver::File => WorkerKind::File,
            Driver::HostDevice => WorkerKind::HostDevice,
            Driver::Raw => WorkerKind::Raw,
            Driver::NullCo => WorkerKind::NullCo,
            Driver::NullAio => WorkerKind::NullAio,
        }
    }

    /// Whether this is a protocol driver sitting on an image file.
    pub fn is_posix(self) -> bool {
        matches!(self, Driver::File | Driver::HostDevice)
    }

    /// Whether this is a protocol driver (the bottom of a chain, with no child).
    pub fn is_protocol(self) -> bool {
        !matches!(self, Driver::Raw)
    }
}

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
    /// The `file` child's name.
    pub child: Option<String>,
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
    /// Its statistics region and write threshold (passed again on every replay).
    pub stats: super::stats::NodeStats,
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

    /// Adds a node (its child's parent count is bumped).
    pub fn insert(&mut self, node: Node) {
        if let Some(child) = node.child.clone()
            && let Some(c) = self.get_mut(&child)
        {
            c.parents += 1;
        }
        self.nodes.push(node);
    }

    /// Removes a node (its child's parent count drops).
    pub fn remove(&mut self, name: &str) -> Option<Node> {
        let pos = self.nodes.iter().position(|n| n.name == name)?;
        let node = self.nodes.remove(pos);
        if let Some(child) = &node.child
            && let Some(c) = self.get_mut(child)
        {
            c.parents = c.parents.saturating_sub(1);
        }
        Some(node)
    }

    /// Whether any node has this name.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Nodes in creation order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Node> {
        self.nodes.iter()
    }

    /// The node at the bottom of `name`'s chain.
    fn bottom(&self, name: &str) -> Option<&Node> {
        let mut n = self.get(name)?;
        for _ in 0..64 {
            match n.child.as_deref().and_then(|c| self.get(c)) {
                Some(c) => n = c,
                None => return Some(n),
            }
        }
        Some(n)
    }

    /// The nodes from `name` down its chain, top first.
    pub fn chain(&self, name: &str) -> Vec<&Node> {
        let mut out = Vec::new();
        let mut cur = self.get(name);
        while let Some(n) = cur {
            if out.len() > 64 {
                break;
            }
            out.push(n);
            cur = n.child.as_deref().and_then(|c| self.get(c));
        }
        out
    }

    /// Every node, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Node> {
        self.nodes.iter_mut()
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
        if let Some(c) = node.child.as_deref().and_then(|c| self.get(c)) {
            m.insert("file".into(), self.full_options(c));
        }
        Value::Object(m)
    }

    /// The `filename` QEMU reports (bdrv_refresh_filename): a plain name when the
    /// options say nothing beyond it, else `json:{...}`.
    pub fn filename(&self, node: &Node) -> String {
        if let Some(path) = &node.path {
            return path.clone();
        }
        if node.strong_options.is_empty() {
            match node.child.as_deref().and_then(|c| self.get(c)) {
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

    /// Allocated bytes on disk (st_blocks * 512 of the image at the chain's bottom).
    fn actual_size(&self, node: &Node) -> u64 {
        let Some(bottom) = self.bottom(&node.name) else {
            return 0;
        };
        match &bottom.image {
            Some(fd) => rustix::fs::fstat(fd)
                .map(|st| (st.st_blocks as u64).saturating_mul(512))
                .unwrap_or(0),
            None => 0,
        }
    }

    /// One element of `query-named-block-nodes` (BlockDeviceInfo), members in the order
    /// QEMU fills them so the writer's QDict ordering matches qsd.
    pub fn device_info(&self, node: &Node) -> Value {
        let filename = self.filename(node);
        let bottom_posix = self.bottom(&node.name).is_some_and(|b| b.driver.is_posix());
        let mut image = Map::new();
        image.insert("filename".into(), filename.clone().into());
        image.insert("format".into(), node.driver.as_str().into());
        if bottom_posix {
            image.insert("dirty-flag".into(), false.into());
        }
        image.insert("actual-size".into(), self.actual_size(node).into());
        image.insert("virtual-size".into(), node.size.into());
        if node.driver.is_posix() {
            image.insert(
                "format-specific".into(),
                json!({"type": "file", "data": {}}),
            );
        }
        let mut m = Map::new();
        m.insert("file".into(), filename.into());
        m.insert("node-name".into(), node.name.clone().into());
        m.insert("ro".into(), node.read_only.into());
        m.insert("drv".into(), node.driver.as_str().into());
        m.insert("backing_file_depth".into(), 0.into());
        m.insert("active".into(), true.into());
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
        Value::Object(m)
    }

    /// `query-named-block-nodes`: newest first, like qsd. Without backing chains the
    /// `flat` flag changes nothing.
    pub fn query_named_block_nodes(&self) -> Value {
        Value::Array(
            self.nodes
                .iter()
                .rev()
                .map(|n| self.device_info(n))
                .collect(),
        )
    }

    /// `x-debug-query-block-graph`. qsd numbers the nodes that exist at query time
    /// 1..N, oldest first.
    pub fn debug_graph(&self) -> Value {
        let number = |name: &str| {
            self.nodes
                .iter()
                .position(|n| n.name == name)
                .map_or(0, |i| i + 1)
        };
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .enumerate()
            .rev()
            .map(|(i, n)| json!({"id": i + 1, "type": "block-driver", "name": n.name}))
            .collect();
        let mut edges = Vec::new();
        for n in self.nodes.iter().rev() {
            if let Some(c) = n.child.as_deref().and_then(|c| self.get(c)) {
                let mut shared = Vec::new();
                if !n.fixed_window {
                    shared.push("resize");
                }
                shared.extend(["write-unchanged", "write", "consistent-read"]);
                edges.push(json!({
                    "parent": number(&n.name), "child": number(&c.name), "name": "file",
                    "perm": [], "shared-perm": shared,
                }));
            }
        }
        json!({"nodes": nodes, "edges": edges})
    }
}
