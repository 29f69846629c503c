//! `blockdev-add`, `blockdev-del` and `block_resize`.
//!
//! Runs in the supervisor. Options arrive checked against the QAPI schema; this module
//! applies QEMU's semantic rules in QEMU's order (children first, then the node's name,
//! then opening it), opens image files itself and hands descriptors to the workers, and
//! undoes everything it created if any step fails.

use std::os::fd::AsFd;

use bulkhead_block::config::{
    Aio, CommonOptions, DetectZeroes, Discard, DriverConfig, FileConfig, NullConfig, OnOffAuto,
    RawConfig,
};
use bulkhead_block::file::FileKind;
use bulkhead_block::posix;
use bulkhead_ipc::fd;
use bulkhead_ipc::wire::{NodeId, NodeRef, Reply, ToWorker, WorkerId};
use bulkhead_qmp::qapi::id_wellformed;
use bulkhead_qmp::qapi::types::{
    self, BlockdevAioOptions, BlockdevDetectZeroesOptions, BlockdevDiscardOptions,
    BlockdevDriverOptions, BlockdevOptions, BlockdevOptionsFile, BlockdevRef,
};
use serde_json::{Map, Value};

use super::drivers::Resize;
use super::graph::{Driver, Node, Role};
use super::placement::Placement;
use super::{Core, QmpError, call_error, errors};

/// QEMU's limit on node names (`BlockDriverState.node_name[32]`).
const MAX_NODE_NAME: usize = 31;

/// A `file` child: an existing node, or options for a new one.
enum ChildSpec {
    Ref(String),
    Inline(Box<Spec>),
}

enum SpecKind {
    Posix {
        filename: String,
        aio: Aio,
        locking: OnOffAuto,
    },
    Raw {
        offset: Option<u64>,
        size: Option<u64>,
        child: ChildSpec,
    },
    Null {
        size: Option<u64>,
        read_zeroes: bool,
        latency_ns: u64,
    },
}

/// One node's options, parsed from `BlockdevOptions`.
struct Spec {
    name: Option<String>,
    driver: Driver,
    read_only: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    discard: Discard,
    detect_zeroes: DetectZeroes,
    force_share: bool,
    auto_read_only: bool,
    /// `active`: absent means active.
    active: Option<bool>,
    strong: Map<String, Value>,
    /// The options as given, flattened (`cache.direct`); an inline child's become
    /// its node-name once it exists (see `Node::options`).
    given: Map<String, Value>,
    kind: SpecKind,
}

/// QEMU's `qdict_flatten`: nested objects become dotted keys.
pub(super) fn flatten(m: &Map<String, Value>) -> Map<String, Value> {
    fn walk(prefix: &str, m: &Map<String, Value>, out: &mut Map<String, Value>) {
        for (k, v) in m {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Object(inner) => walk(&key, inner, out),
                other => {
                    out.insert(key, other.clone());
                }
            }
        }
    }
    let mut out = Map::new();
    walk("", m, &mut out);
    out
}

/// A QAPI `int` where QEMU parses a size: negatives are refused with
/// `parse_option_size`'s text (qsd aborts there; we answer).
fn size(value: Option<i64>, parameter: &str) -> Result<Option<u64>, QmpError> {
    value
        .map(|n| u64::try_from(n).map_err(|_| errors::out_of_range(n, parameter)))
        .transpose()
}

fn posix_kind(f: &BlockdevOptionsFile) -> SpecKind {
    SpecKind::Posix {
        filename: f.filename.clone(),
        aio: match f.aio {
            Some(BlockdevAioOptions::Native) => Aio::Native,
            Some(BlockdevAioOptions::IoUring) => Aio::IoUring,
            Some(BlockdevAioOptions::Threads) | None => Aio::Threads,
        },
        locking: match f.locking {
            Some(types::OnOffAuto::On) => OnOffAuto::On,
            Some(types::OnOffAuto::Off) => OnOffAuto::Off,
            Some(types::OnOffAuto::Auto) | None => OnOffAuto::Auto,
        },
    }
}

/// Parses one node's options; `given` is the object they were decoded from (an inline
/// child's is its `file` member).
fn parse_spec(options: &BlockdevOptions, given: &Map<String, Value>) -> Result<Spec, QmpError> {
    let base = &options.base;
    let mut strong = Map::new();
    let (driver, kind) = match &options.driver {
        BlockdevDriverOptions::File(f) => (Driver::File, posix_kind(f)),
        BlockdevDriverOptions::HostDevice(f) => (Driver::HostDevice, posix_kind(f)),
        BlockdevDriverOptions::Raw(raw) => {
            let offset = size(raw.offset, "offset")?;
            let size = size(raw.size, "size")?;
            if let Some(o) = offset {
                strong.insert("offset".into(), o.into());
            }
            if let Some(s) = size {
                strong.insert("size".into(), s.into());
            }
            let child = match &raw.file {
                BlockdevRef::Reference(name) => ChildSpec::Ref(name.clone()),
                BlockdevRef::Definition(inline) => {
                    let inline_given = given
                        .get("file")
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default();
                    ChildSpec::Inline(Box::new(parse_spec(inline, &inline_given)?))
                }
            };
            let kind = SpecKind::Raw {
                offset,
                size,
                child,
            };
            (Driver::Raw, kind)
        }
        BlockdevDriverOptions::NullCo(null) | BlockdevDriverOptions::NullAio(null) => {
            let size = size(null.size, "size")?;
            // QEMU's null driver reports `size` and `read-zeroes` as given (its strong
            // options); `latency-ns` does not show in the filename.
            if let Some(s) = size {
                strong.insert("size".into(), s.into());
            }
            if let Some(z) = null.read_zeroes {
                strong.insert("read-zeroes".into(), z.into());
            }
            let driver = match options.driver {
                BlockdevDriverOptions::NullAio(_) => Driver::NullAio,
                _ => Driver::NullCo,
            };
            let kind = SpecKind::Null {
                size,
                read_zeroes: null.read_zeroes.unwrap_or(false),
                latency_ns: null.latency_ns.unwrap_or(0),
            };
            (driver, kind)
        }
        BlockdevDriverOptions::Other(_) => {
            let name = given.get("driver").and_then(Value::as_str).unwrap_or("");
            return Err(errors::driver_unsupported(name));
        }
    };
    let cache = base.cache.as_ref();
    Ok(Spec {
        name: base.node_name.clone(),
        driver,
        read_only: base.read_only,
        direct: cache.and_then(|c| c.direct),
        no_flush: cache.and_then(|c| c.no_flush),
        discard: match base.discard {
            Some(BlockdevDiscardOptions::Unmap) => Discard::Unmap,
            Some(BlockdevDiscardOptions::Ignore) | None => Discard::Ignore,
        },
        detect_zeroes: match base.detect_zeroes {
            Some(BlockdevDetectZeroesOptions::On) => DetectZeroes::On,
            Some(BlockdevDetectZeroesOptions::Unmap) => DetectZeroes::Unmap,
            Some(BlockdevDetectZeroesOptions::Off) | None => DetectZeroes::Off,
        },
        force_share: base.force_share.unwrap_or(false),
        auto_read_only: base.auto_read_only.unwrap_or(false),
        active: base.active,
        strong,
        given: {
            let mut top = given.clone();
            top.remove("file");
            flatten(&top)
        },
        kind,
    })
}

/// Options a parent passes down to an inline child unless the child sets them.
#[derive(Clone, Copy, Default)]
struct Inherited {
    read_only: bool,
    direct: bool,
    no_flush: bool,
}

impl Core {
    /// `blockdev-add` of `options`, decoded from `given`.
    pub(super) async fn blockdev_add(
        &mut self,
        options: &BlockdevOptions,
        given: &Map<String, Value>,
    ) -> Result<(), QmpError> {
        let spec = parse_spec(options, given)?;
        if spec.name.is_none() {
            return Err(errors::root_node_name_missing());
        }
        let mut created = Vec::new();
        match Box::pin(self.create(spec, Inherited::default(), true, None, &mut created)).await {
            Ok(_) => Ok(()),
            Err(e) => {
                for name in created.into_iter().rev() {
                    self.destroy(&name).await;
                }
                Err(e)
            }
        }
    }

    /// Creates `spec` and its inline children; records every created name in `created`
    /// so a failure can undo them. `hint` is the instance the parent chose for an
    /// inline child (see `placement`).
    async fn create(
        &mut self,
        spec: Spec,
        inherited: Inherited,
        root: bool,
        hint: Option<WorkerId>,
        created: &mut Vec<String>,
    ) -> Result<String, QmpError> {
        let read_only = spec.read_only.unwrap_or(inherited.read_only);
        let direct = spec.direct.unwrap_or(inherited.direct);
        let no_flush = spec.no_flush.unwrap_or(inherited.no_flush);
        let common = CommonOptions {
            read_only,
            detect_zeroes: spec.detect_zeroes,
            discard: spec.discard,
            no_flush,
            force_share: spec.force_share,
            inactive: spec.active == Some(false),
        };
        let active = spec.active != Some(false);

        // Children first: QEMU opens a format node's file child before it names the node.
        let (mut config, child, filename) = match spec.kind {
            SpecKind::Raw {
                offset,
                size,
                child,
            } => {
                let name = match child {
                    ChildSpec::Ref(name) => {
                        if !self.graph.contains(&name) {
                            return Err(errors::device_not_found(&name, &name));
                        }
                        name
                    }
                    ChildSpec::Inline(s) => {
                        let inherit = Inherited {
                            read_only,
                            direct,
                            no_flush,
                        };
                        let child_hint = self.inline_child_hint(spec.driver);
                        Box::pin(self.create(*s, inherit, false, child_hint, created)).await?
                    }
                };
                if let Some(c) = self.graph.get(&name)
                    && active
                    && !c.active
                {
                    return Err(errors::inactive_file_child(
                        &name,
                        spec.name.as_deref().unwrap_or(""),
                    ));
                }
                let cfg = RawConfig {
                    common,
                    offset: offset.unwrap_or(0),
                    size,
                };
                (DriverConfig::Raw(cfg), Some(name), None)
            }
            SpecKind::Posix {
                filename,
                aio,
                locking,
            } => {
                let cfg = FileConfig {
                    common,
                    aio,
                    locking,
                    direct,
                };
                let cfg = match spec.driver {
                    Driver::HostDevice => DriverConfig::HostDevice(cfg),
                    _ => DriverConfig::File(cfg),
                };
                (cfg, None, Some(filename))
            }
            SpecKind::Null {
                size,
                read_zeroes,
                latency_ns,
            } => {
                let cfg = NullConfig {
                    common,
                    size: size.unwrap_or(bulkhead_block::config::NULL_DEFAULT_SIZE),
                    read_zeroes,
                    latency_ns,
                };
                let cfg = match spec.driver {
                    Driver::NullAio => DriverConfig::NullAio(cfg),
                    _ => DriverConfig::NullCo(cfg),
                };
                (cfg, None, None)
            }
        };

        let name = match spec.name {
            Some(n) => {
                if !id_wellformed(&n) {
                    return Err(errors::invalid_node_name(&n));
                }
                if n.len() > MAX_NODE_NAME {
                    return Err(errors::node_name_too_long());
                }
                if self.graph.contains(&n) {
                    return Err(errors::duplicate_node_name(&n));
                }
                n
            }
            None => self.generate_name(),
        };
        config.validate().map_err(errors::from_error)?;

        // The supervisor opens the image; the worker only ever sees the descriptor.
        let image = match &filename {
            Some(path) => {
                let kind = spec.driver.image().unwrap_or(FileKind::File);
                match posix::open_image(path, kind, read_only, direct) {
                    Ok(fd) => Some(fd),
                    // auto-read-only: a writable open refused for permission reasons
                    // falls back to read-only, as in QEMU. The node still reports
                    // `ro: false` (QEMU would reopen it writable for a writer), but
                    // the worker refuses writes.
                    Err(posix::OpenImageError::Open { errno, .. })
                        if spec.auto_read_only
                            && !read_only
                            && matches!(errno, libc::EACCES | libc::EPERM | libc::EROFS) =>
                    {
                        let fd = posix::open_image(path, kind, true, direct)
                            .map_err(errors::from_error)?;
                        if let DriverConfig::File(c) | DriverConfig::HostDevice(c) = &mut config {
                            c.common.read_only = true;
                        }
                        Some(fd)
                    }
                    Err(e) => return Err(errors::from_error(e)),
                }
            }
            None => None,
        };

        if let (DriverConfig::Raw(raw), Some(c)) = (&config, child.as_deref()) {
            let csize = self.graph.get(c).map_or(0, |n| n.size);
            bulkhead_block::raw::check_window(raw, csize).map_err(errors::from_error)?;
        }
        let home = match self.place(spec.driver, child.as_deref(), hint) {
            Placement::On(home) => home,
            Placement::SharingChild(home, c) => {
                if let Err(e) = self.isolate_shared(&c).await {
                    self.retire_if_idle(home);
                    return Err(e);
                }
                home
            }
            Placement::WithChild(home, c) => {
                self.move_node(&c, home).await?;
                home
            }
        };
        let child_ref = match child.as_deref().and_then(|c| self.node_ref(c)) {
            Some(r) => {
                if let Err(e) = self.connect(home, r.home).await {
                    self.retire_if_idle(home);
                    return Err(e);
                }
                Some(r)
            }
            None => None,
        };
        let worker_fd = match &image {
            Some(f) => Some(fd::dup(f).map_err(errors::from_error)?),
            None => None,
        };
        let lock = match (&image, &config) {
            (Some(f), DriverConfig::File(c) | DriverConfig::HostDevice(c)) => {
                let copy = fd::dup(f).map_err(errors::from_error)?;
                let path = filename.as_deref().unwrap_or("");
                Some(bulkhead_block::lock::ImageLock::new(copy, path, c.locking))
            }
            _ => None,
        };
        let id = self.graph.allocate_id();
        let fixed_window =
            matches!(&config, DriverConfig::Raw(r) if r.offset > 0 || r.size.is_some());
        let saved_config = config;
        // Its image's directory: its own file, or the file at the bottom of its child.
        let image_path = filename.clone().or_else(|| {
            child
                .as_deref()
                .and_then(|c| self.graph.chain(c).last().and_then(|b| b.path.clone()))
        });
        let dir = image_path.as_deref().map(super::asks::image_dir);
        self.asks.borrow_mut().insert(id, home, dir);
        let stats = super::stats::NodeStats::create()?;
        let opened = self
            .open_on(
                home,
                id,
                &name,
                config,
                child_ref.map(|c| (Role::File, c)).into_iter().collect(),
                stats.fd(),
                worker_fd.as_ref(),
            )
            .await;
        let size = match opened {
            Ok(size) => size,
            Err(e) => {
                self.retire_if_idle(home);
                return Err(e);
            }
        };
        let mut options = spec.given;
        options.insert("node-name".into(), name.clone().into());
        if let Some(c) = &child {
            options.insert("file".into(), c.clone().into());
        }
        self.graph.insert(Node {
            active,
            options,
            id,
            home,
            name: name.clone(),
            driver: spec.driver,
            children: child.into_iter().map(|c| (Role::File, c)).collect(),
            parents: 0,
            monitor_owned: root,
            read_only,
            direct,
            no_flush,
            detect_zeroes: match spec.detect_zeroes {
                DetectZeroes::Off => "off",
                DetectZeroes::On => "on",
                DetectZeroes::Unmap => "unmap",
            },
            size,
            strong_options: spec.strong,
            path: filename,
            lock,
            image,
            fixed_window,
            exported: false,
            config: saved_config,
            stats,
        });
        created.push(name.clone());
        if fixed_window {
            // A raw window refuses to share `resize` of the image below it.
            self.refresh_locks()?;
        }
        Ok(name)
    }

    /// Recomputes the permissions every image's users need and applies them as
    /// QEMU-compatible OFD locks, so bulkhead, qsd, qemu-img and qemu-io exclude each
    /// other as QEMU processes do. A node nobody uses holds no lock (as in qsd). An NBD
    /// export needs consistent read (and write when writable) and refuses to share
    /// resize; a raw window refuses to share resize.
    pub(super) fn refresh_locks(&mut self) -> Result<(), QmpError> {
        use bulkhead_block::lock::perm;
        let mut wanted: Vec<(String, u64, u64)> = Vec::new();
        let mut add =
            |name: &str, p: u64, unshare: u64| match wanted.iter_mut().find(|w| w.0 == name) {
                Some(w) => {
                    w.1 |= p;
                    w.2 &= !unshare;
                }
                None => wanted.push((name.to_string(), p, perm::ALL & !unshare)),
            };
        for e in &self.exports {
            if e.shutting_down {
                continue;
            }
            let p = perm::CONSISTENT_READ | if e.writable { perm::WRITE } else { 0 };
            let chain = self.graph.chain(&e.node);
            // An inactive node passes no permission down (QEMU drops them when it
            // inactivates a node, which is what lets another process take over).
            if chain.iter().any(|n| !n.active) {
                continue;
            }
            if let Some(bottom) = chain.last() {
                add(&bottom.name, p, perm::RESIZE);
            }
        }
        for n in self.graph.iter().filter(|n| n.fixed_window) {
            let chain = self.graph.chain(&n.name);
            if chain.iter().any(|n| !n.active) {
                continue;
            }
            if let Some(bottom) = chain.last() {
                add(&bottom.name, 0, perm::RESIZE);
            }
        }
        let mut result = Ok(());
        for node in self.graph.iter_mut() {
            let Some(lock) = node.lock.as_mut() else {
                continue;
            };
            let (p, shared) = wanted
                .iter()
                .find(|w| w.0 == node.name)
                .map_or((0, perm::ALL), |w| (w.1, w.2));
            if let Err(e) = lock.set_perm(p, shared)
                && result.is_ok()
            {
                result = Err(errors::from_error(e));
            }
        }
        result
    }

    /// Opens node `id` on instance `home` with its statistics region `stats` and
    /// returns its size.
    #[allow(clippy::too_many_arguments)]
    async fn open_on(
        &mut self,
        home: WorkerId,
        id: NodeId,
        name: &str,
        config: DriverConfig,
        children: Vec<(Role, NodeRef)>,
        stats: &std::os::fd::OwnedFd,
        image: Option<&std::os::fd::OwnedFd>,
    ) -> Result<u64, QmpError> {
        let worker = self.worker(home).await?;
        let fds: Vec<_> = std::iter::once(stats)
            .chain(image)
            .map(|f| f.as_fd())
            .collect();
        let body = ToWorker::AddNode {
            node: id,
            name: name.to_string(),
            config,
            children,
        };
        worker.call(body, &fds).await.map_err(|e| {
            tracing::warn!(node = %name, error = %e, "node could not be opened");
            call_error(e)
        })?;
        Ok(
            match worker.call(ToWorker::QueryNode { node: id }, &[]).await {
                Ok(Reply::NodeInfo { size }) => size,
                _ => 0,
            },
        )
    }

    /// Opens an existing node again on its instance (a restarted worker, or one it
    /// moved to): same id, same config, the same image (a new descriptor for the same
    /// open file description). A child in another instance is reached over a channel.
    pub(super) async fn replay_node(&mut self, name: &str) -> Result<(), QmpError> {
        let node = self.graph.get(name).ok_or_else(errors::node_vanished)?;
        let children = self.child_refs(name, None);
        let fd = match &node.image {
            Some(f) => Some(fd::dup(f).map_err(errors::from_error)?),
            None => None,
        };
        // The same statistics region: counters and threshold carry over.
        let stats = fd::dup(node.stats.fd()).map_err(errors::from_error)?;
        let (id, home, config) = (node.id, node.home, node.config);
        for (_, c) in &children {
            self.connect(home, c.home).await?;
        }
        self.open_on(home, id, name, config, children, &stats, fd.as_ref())
            .await
            .map(|_| ())
    }

    /// QEMU's generated names: `#block`, a counter, two random digits.
    fn generate_name(&mut self) -> String {
        loop {
            let n = self.generated_names;
            self.generated_names += 1;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let name = format!("#block{n}{:02}", nanos % 100);
            if !self.graph.contains(&name) {
                return name;
            }
        }
    }

    /// Closes a node in its worker and forgets it; children that only it used and
    /// that the monitor does not own go with it.
    pub(super) async fn destroy(&mut self, name: &str) {
        let Some(mut node) = self.graph.remove(name) else {
            return;
        };
        if let Some(lock) = node.lock.as_mut() {
            lock.release();
        }
        let _ = self.refresh_locks();
        if let Some(w) = self.running(node.home)
            && let Err(e) = w.call(ToWorker::RemoveNode { node: node.id }, &[]).await
        {
            tracing::warn!(node = name, error = %e, "worker could not close node");
        }
        self.retire_if_idle(node.home);
        for (_, child) in std::mem::take(&mut node.children) {
            if self
                .graph
                .get(&child)
                .is_some_and(|c| c.parents == 0 && !c.monitor_owned)
            {
                Box::pin(self.destroy(&child)).await;
            }
        }
    }

    /// `blockdev-del`.
    pub(super) async fn blockdev_del(&mut self, name: &str) -> Result<(), QmpError> {
        let node = self
            .graph
            .get(name)
            .ok_or_else(|| errors::node_not_found(name))?;
        if node.exported {
            return Err(errors::node_in_use(name));
        }
        if !node.monitor_owned {
            return Err(errors::node_not_monitor_owned(name));
        }
        if node.parents > 0 {
            return Err(errors::block_device_in_use(name));
        }
        self.destroy(name).await;
        Ok(())
    }

    /// `block_resize` (`device` is only ever named in the error: qsd has no
    /// BlockBackends).
    pub(super) async fn block_resize(
        &mut self,
        device: Option<&str>,
        node_name: Option<&str>,
        size: i64,
    ) -> Result<(), QmpError> {
        let Some(node) = node_name.and_then(|n| self.graph.get(n)) else {
            return Err(errors::device_not_found(
                device.unwrap_or(""),
                node_name.unwrap_or(""),
            ));
        };
        let Ok(size) = u64::try_from(size) else {
            return Err(errors::resize_negative_size());
        };
        // An inactive node holds no permissions, and can take none.
        if !node.active {
            return Err(errors::resize_inactive());
        }
        // Users of the node: a raw parent with a fixed window and an export both
        // refuse to share `resize`.
        if node.exported {
            return Err(errors::resize_conflict_export(&node.name));
        }
        if let Some(parent) = self
            .graph
            .iter()
            .find(|p| p.file() == Some(node.name.as_str()) && p.fixed_window)
        {
            return Err(errors::resize_conflict_window(&node.name, &parent.name));
        }
        if node.read_only {
            return Err(errors::image_read_only());
        }
        // Resizing goes down the chain: each raw window adds its offset, a sized
        // window cannot change, and the bottom node must be able to grow.
        let mut target = size;
        let mut cur = node;
        let mut chain = vec![node.name.clone()];
        loop {
            match cur.driver.resize() {
                Resize::Window => {
                    if cur.strong_options.contains_key("size") {
                        return Err(errors::resize_fixed_raw());
                    }
                    let offset = cur
                        .strong_options
                        .get("offset")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    target = target
                        .checked_add(offset)
                        .ok_or_else(errors::resize_offset_overflow)?;
                    match cur.file().and_then(|c| self.graph.get(c)) {
                        Some(c) => {
                            chain.push(c.name.clone());
                            cur = c;
                        }
                        None => return Err(errors::resize_unsupported()),
                    }
                }
                Resize::Image => break,
                Resize::Unsupported => return Err(errors::resize_unsupported()),
            }
        }
        let (bottom_id, home, image) = (cur.id, cur.home, cur.driver.image());
        let w = self.worker(home).await?;
        match w
            .call(
                ToWorker::ResizeNode {
                    node: bottom_id,
                    size: target,
                },
                &[],
            )
            .await
        {
            Ok(_) => {}
            Err(super::workers::CallError::Worker(e)) => {
                let io = if e.kind == bulkhead_ipc::wire::WorkerErrorKind::Unsupported {
                    bulkhead_block::IoError::Unsupported
                } else if e.errno == libc::EINVAL {
                    bulkhead_block::IoError::Invalid
                } else {
                    bulkhead_block::IoError::Os(e.errno)
                };
                let cfg = match image {
                    Some(FileKind::HostDevice) => DriverConfig::HostDevice(FileConfig::default()),
                    _ => DriverConfig::File(FileConfig::default()),
                };
                return Err(errors::from_error(bulkhead_block::node::resize_error_text(
                    &cfg, &io,
                )));
            }
            Err(e) => return Err(call_error(e)),
        }
        self.refresh_sizes(&chain).await;
        Ok(())
    }

    /// Re-reads the sizes of the nodes a resize went through, bottom first. Like QEMU,
    /// nodes above the resized one keep the size they had (each node caches its own).
    pub(super) async fn refresh_sizes(&mut self, chain: &[String]) {
        let nodes: Vec<_> = chain
            .iter()
            .rev()
            .filter_map(|name| self.graph.get(name))
            .map(|n| (n.name.clone(), n.id, n.home))
            .collect();
        for (name, id, home) in nodes {
            let Some(w) = self.running(home) else {
                continue;
            };
            if let Ok(Reply::NodeInfo { size }) =
                w.call(ToWorker::QueryNode { node: id }, &[]).await
                && let Some(n) = self.graph.get_mut(&name)
            {
                n.size = size;
            }
        }
    }
}
