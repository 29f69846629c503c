//! `blockdev-add`, `blockdev-del` and `block_resize`.
//!
//! Runs in the supervisor. Options arrive checked against the QAPI schema; this module
//! applies QEMU's semantic rules in QEMU's order (children first, then the node's name,
//! then opening it), opens image files itself and hands descriptors to the workers, and
//! undoes everything it created if any step fails.

use std::os::fd::{AsFd, OwnedFd};

use bulkhead_block::FormatInfo;
use bulkhead_block::config::{CommonOptions, DetectZeroes, Discard, DriverConfig};
use bulkhead_block::driver::{ParseError, Parsed, Resize};
use bulkhead_block::file::FileKind;
use bulkhead_block::posix;
use bulkhead_ipc::fd;
use bulkhead_ipc::wire::{NodeId, NodeRef, Reply, ToWorker, WorkerId};
use bulkhead_qmp::qapi::id_wellformed;
use bulkhead_qmp::qapi::types::{
    self, BlockdevDetectZeroesOptions, BlockdevDiscardOptions, BlockdevOptions, BlockdevRefOrNull,
};
use serde_json::{Map, Value};

use super::graph::{Driver, Node, Role};
use super::placement::Placement;
use super::{Core, QmpError, call_error, errors};

/// How long the nodes may take to close when the daemon exits.
const CLOSE_ALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// QEMU's limit on node names (`BlockDriverState.node_name[32]`).
const MAX_NODE_NAME: usize = 31;

/// A child named in a node's options: an existing node, or options for a new one.
enum ChildSpec {
    Ref(String),
    Inline(Box<Spec>),
}

/// One node's options, parsed from `BlockdevOptions`.
pub(super) struct Spec {
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
    /// The driver's own options, parsed by its module (generic options still the
    /// defaults).
    parsed: Parsed<DriverConfig>,
    /// Its children by role, as named in its options.
    children: Vec<(Role, ChildSpec)>,
    /// Its options name its backing (a node, options, or `null` for none): the
    /// backing file its image names is then not opened.
    backing_given: bool,
    /// `backing: null`: kept among its options as QEMU keeps it (it shows in the
    /// node's `json:` filename).
    backing_null: bool,
    /// The options as given, flattened (`cache.direct`), without the children
    /// (which become their node-names once they exist, see `Node::options`).
    given: Map<String, Value>,
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

/// The driver bulkhead implements for a QAPI `BlockdevDriver`, if any.
pub(super) fn driver_of(qapi: types::BlockdevDriver) -> Option<Driver> {
    match serde_json::to_value(qapi) {
        Ok(Value::String(name)) => Driver::by_name(&name),
        _ => None,
    }
}

/// Parses one node's options; `given` is the object they were decoded from (an inline
/// child's is its member in its parent's).
pub(super) fn parse_spec(
    options: &BlockdevOptions,
    given: &Map<String, Value>,
) -> Result<Spec, QmpError> {
    let base = &options.base;
    let Some(driver) = driver_of(base.driver) else {
        let name = given.get("driver").and_then(Value::as_str).unwrap_or("");
        return Err(errors::driver_unsupported(name));
    };
    let mut members = options.members.clone();
    let mut given_top = given.clone();
    let mut children = Vec::new();
    let backing_given = members.contains_key("backing");
    let mut backing_null = false;
    for slot in driver.info().children {
        given_top.remove(slot.key);
        let Some(member) = members.remove(slot.key) else {
            continue;
        };
        let child = match serde_json::from_value::<BlockdevRefOrNull>(member) {
            Ok(BlockdevRefOrNull::Reference(name)) => ChildSpec::Ref(name),
            Ok(BlockdevRefOrNull::Definition(inline)) => {
                let inline_given = given
                    .get(slot.key)
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                ChildSpec::Inline(Box::new(parse_spec(&inline, &inline_given)?))
            }
            // `null`: explicitly none (`backing: null`).
            Ok(BlockdevRefOrNull::Null) => {
                backing_null |= slot.role == Role::Backing;
                continue;
            }
            Err(e) => return Err(errors::from_error(ParseError::Decode(e.to_string()))),
        };
        children.push((slot.role, child));
    }
    let parsed = driver.parse(&members).map_err(errors::from_error)?;
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
        parsed,
        children,
        backing_given,
        backing_null,
        given: flatten(&given_top),
    })
}

/// The options of a node the supervisor makes for a job with a driver no user adds
/// (`mirror_top`): the driver's own `members`, the generic options at their
/// defaults, children by node name.
pub(super) fn internal_spec(
    driver: Driver,
    name: Option<String>,
    members: Map<String, Value>,
    children: Vec<(Role, String)>,
) -> Result<Spec, QmpError> {
    let parsed = driver.parse(&members).map_err(errors::from_error)?;
    let mut given = members;
    given.insert("driver".into(), driver.as_str().into());
    Ok(Spec {
        name,
        driver,
        read_only: None,
        direct: None,
        no_flush: None,
        discard: Discard::Ignore,
        detect_zeroes: DetectZeroes::Off,
        force_share: false,
        auto_read_only: false,
        active: None,
        parsed,
        children: children
            .into_iter()
            .map(|(role, n)| (role, ChildSpec::Ref(n)))
            .collect(),
        backing_given: false,
        backing_null: false,
        given,
    })
}

/// Why a worker did not open a node.
enum OpenFailed {
    /// Before the worker was asked.
    Qmp(QmpError),
    /// The worker's answer.
    Call(super::workers::CallError),
}

/// Options a parent passes down to an inline child unless the child sets them.
#[derive(Clone, Copy, Default)]
pub(super) struct Inherited {
    pub(super) read_only: bool,
    pub(super) direct: bool,
    pub(super) no_flush: bool,
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

    /// Adds a node the supervisor itself needs (a backup's filter): no node-name is
    /// given, so it gets a generated one, and the monitor does not own it (it goes
    /// once nothing uses it). Returns its name.
    pub(super) async fn add_internal_node(
        &mut self,
        options: &BlockdevOptions,
        given: &Map<String, Value>,
        on: Option<WorkerId>,
    ) -> Result<String, QmpError> {
        self.add_spec(parse_spec(options, given)?, on).await
    }

    /// Creates the node `spec` describes (and its inline children), owned by no
    /// monitor, on instance `on` if given; nothing is left behind if it fails.
    pub(super) async fn add_spec(
        &mut self,
        spec: Spec,
        on: Option<WorkerId>,
    ) -> Result<String, QmpError> {
        let mut created = Vec::new();
        match Box::pin(self.create(spec, Inherited::default(), false, on, &mut created)).await {
            Ok(name) => Ok(name),
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
    pub(super) async fn create(
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
            direct,
        };
        let active = spec.active != Some(false);

        // Children first: QEMU opens a format node's children before it names the node.
        let mut children: Vec<(Role, String)> = Vec::new();
        for (role, child) in spec.children {
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
                    // The local protocol child starts where its parent will live.
                    let child_hint = match role {
                        Role::File | Role::DataFile => {
                            hint.or_else(|| self.inline_child_hint(spec.driver))
                        }
                        _ => None,
                    };
                    Box::pin(self.create(*s, inherit, false, child_hint, created)).await?
                }
            };
            if let Some(c) = self.graph.get(&name)
                && active
                && !c.active
            {
                return Err(errors::inactive_child(
                    &name,
                    &role.name(),
                    spec.name.as_deref().unwrap_or(""),
                ));
            }
            children.push((role, name));
        }
        let Parsed {
            mut config,
            image: image_spec,
            mut strong,
        } = spec.parsed;
        if spec.backing_null {
            strong.insert("backing".into(), Value::Null);
        }
        *config.common_mut() = common;

        let name = match spec.name {
            Some(n) => {
                self.check_new_node_name(&n)?;
                n
            }
            None => self.generate_name(),
        };
        config.validate().map_err(errors::from_error)?;

        // The supervisor opens the image; the worker only ever sees the descriptor.
        let image = match &image_spec {
            Some(spec_image) => {
                let path = &spec_image.filename;
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
                        config.common_mut().read_only = true;
                        Some(fd)
                    }
                    Err(e) => return Err(errors::from_error(e)),
                }
            }
            None => None,
        };
        let filename = image_spec.as_ref().map(|i| i.filename.clone());

        let sizes: Vec<(Role, u64)> = children
            .iter()
            .map(|(role, c)| (*role, self.graph.get(c).map_or(0, |n| n.size)))
            .collect();
        config.check_children(&sizes).map_err(errors::from_error)?;
        let drivers: Vec<(Role, &str)> = children
            .iter()
            .filter_map(|(role, c)| self.graph.get(c).map(|n| (*role, n.driver.as_str())))
            .collect();
        config
            .check_child_drivers(&drivers)
            .map_err(errors::from_error)?;
        let file_child = children
            .iter()
            .find(|(r, _)| *r == Role::File)
            .map(|(_, c)| c.clone());
        let home = match self.place(spec.driver, file_child.as_deref(), hint) {
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
        let mut child_refs = Vec::new();
        for (role, c) in &children {
            let Some(r) = self.node_ref(c) else {
                continue;
            };
            if let Err(e) = self.connect(home, r.home).await {
                self.retire_if_idle(home);
                return Err(e);
            }
            child_refs.push((*role, r));
        }
        let worker_fd = match &image {
            Some(f) => Some(fd::dup(f).map_err(errors::from_error)?),
            None => None,
        };
        let lock = match (&image, &image_spec) {
            (Some(f), Some(spec_image)) => {
                let copy = fd::dup(f).map_err(errors::from_error)?;
                Some(bulkhead_block::lock::ImageLock::new(
                    copy,
                    &spec_image.filename,
                    spec_image.locking,
                ))
            }
            _ => None,
        };
        let id = self.graph.allocate_id();
        let fixed_window = config.holds_size();
        // Its image's directory: its own file, or the file at the bottom of its child.
        let image_path = filename.clone().or_else(|| {
            file_child
                .as_deref()
                .and_then(|c| self.graph.chain(c).last().and_then(|b| b.path.clone()))
        });
        let dir = image_path.as_deref().map(super::asks::image_dir);
        self.asks.borrow_mut().insert(id, home, dir);
        let stats = super::stats::NodeStats::create()?;
        let mut implicit_data_file = false;
        let (size, format) = loop {
            let opened = self
                .open_on_call(
                    home,
                    id,
                    &name,
                    config.clone(),
                    child_refs.clone(),
                    stats.fd(),
                    worker_fd.as_ref(),
                )
                .await;
            let e = match opened {
                Ok(opened) => break opened,
                Err(OpenFailed::Call(super::workers::CallError::Worker(w)))
                    if w.kind == bulkhead_ipc::wire::WorkerErrorKind::NeedsDataFile
                        && !implicit_data_file
                        && !children.iter().any(|(r, _)| *r == Role::DataFile) =>
                {
                    // QEMU opens the data file the image names while it opens the
                    // image; here the supervisor does, then asks again.
                    implicit_data_file = true;
                    let inherit = Inherited {
                        read_only: config.common().read_only,
                        direct,
                        no_flush,
                    };
                    match Box::pin(self.open_implicit_data_file(&w.detail, inherit, home, created))
                        .await
                    {
                        Ok((dname, dref)) => {
                            children.push((Role::DataFile, dname));
                            child_refs.push((Role::DataFile, dref));
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Err(OpenFailed::Qmp(e)) => e,
                Err(OpenFailed::Call(e)) => call_error(e),
            };
            self.retire_if_idle(home);
            return Err(e);
        };
        let mut options = spec.given;
        options.insert("node-name".into(), name.clone().into());
        for (role, c) in &children {
            if *role == Role::DataFile && implicit_data_file {
                continue;
            }
            options.insert(role.name().into_owned(), c.clone().into());
        }
        self.graph.insert(Node {
            active,
            options,
            id,
            home,
            name: name.clone(),
            driver: spec.driver,
            children,
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
            strong_options: strong,
            path: filename,
            lock,
            image,
            fixed_window,
            exported: false,
            config,
            stats,
            format,
            implicit_backing: false,
            implicit_data_file,
            ejected: false,
            bitmaps: Vec::new(),
        });
        if implicit_data_file
            && let Some((_, d)) = self
                .graph
                .get(&name)
                .and_then(|n| n.children.iter().find(|(r, _)| *r == Role::DataFile))
                .cloned()
        {
            // QEMU names it while it opens the node, after the node's own name.
            self.graph.move_to_end(&d);
        }
        created.push(name.clone());
        if self.graph.get(&name).is_some_and(|n| n.format.is_some()) {
            // A format node holds its image's lock bytes from the start.
            self.refresh_locks()?;
        }
        let takes_backing = spec
            .driver
            .info()
            .children
            .iter()
            .any(|s| s.role == Role::Backing);
        if takes_backing && !spec.backing_given {
            // QEMU opens the backing file its image names once the node is open.
            Box::pin(self.open_implicit_backing(&name, created)).await?;
        }
        if fixed_window {
            // A raw window refuses to share `resize` of the image below it.
            self.refresh_locks()?;
        }
        self.adopt_image_bitmaps(&name).await;
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
        // A format node with metadata reads (and, writable, writes and resizes) its
        // file whether or not anyone uses it, and shares neither writing nor
        // resizing: qemu-img cannot write an image a qcow2 node has open.
        for n in self.graph.iter().filter(|n| n.format.is_some() && n.active) {
            let Some(file) = n.file() else {
                continue;
            };
            let chain = self.graph.chain(file);
            if chain.iter().any(|c| !c.active) {
                continue;
            }
            if let Some(bottom) = chain.last() {
                let p = perm::CONSISTENT_READ
                    | if n.read_only {
                        0
                    } else {
                        perm::WRITE | perm::RESIZE
                    };
                add(&bottom.name, p, perm::WRITE | perm::RESIZE);
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
    /// returns its size and what its format driver read from its image.
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
    ) -> Result<(u64, Option<Box<FormatInfo>>), QmpError> {
        match self
            .open_on_call(home, id, name, config, children, stats, image)
            .await
        {
            Ok(opened) => Ok(opened),
            Err(OpenFailed::Qmp(e)) => Err(e),
            Err(OpenFailed::Call(e)) => Err(call_error(e)),
        }
    }

    /// [`Core::open_on`], with the worker's own error kept for the caller to act on
    /// (a format node that needs its data file opened first).
    #[allow(clippy::too_many_arguments)]
    async fn open_on_call(
        &mut self,
        home: WorkerId,
        id: NodeId,
        name: &str,
        config: DriverConfig,
        children: Vec<(Role, NodeRef)>,
        stats: &std::os::fd::OwnedFd,
        image: Option<&std::os::fd::OwnedFd>,
    ) -> Result<(u64, Option<Box<FormatInfo>>), OpenFailed> {
        // A node opened again (a restarted worker) marks its bitmaps from the first
        // request on.
        let (bitmaps, regions) = match self.graph.iter().find(|n| n.id == id) {
            Some(n) => {
                let (specs, fds) = super::bitmaps::recording_regions(n);
                let fds: Result<Vec<OwnedFd>, _> = fds.into_iter().map(fd::dup).collect();
                (
                    specs,
                    fds.map_err(|e| OpenFailed::Qmp(errors::from_error(e)))?,
                )
            }
            None => Default::default(),
        };
        let worker = self.worker(home).await.map_err(OpenFailed::Qmp)?;
        let fds: Vec<_> = std::iter::once(stats)
            .chain(regions.iter())
            .chain(image)
            .map(|f| f.as_fd())
            .collect();
        let body = ToWorker::AddNode {
            node: id,
            name: name.to_string(),
            config,
            children,
            bitmaps,
        };
        worker.call(body, &fds).await.map_err(|e| {
            tracing::warn!(node = %name, error = %e, "node could not be opened");
            OpenFailed::Call(e)
        })?;
        Ok(
            match worker.call(ToWorker::QueryNode { node: id }, &[]).await {
                Ok(Reply::NodeInfo { size, format }) => (size, format),
                _ => (0, None),
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
        node.stats.invalidate_maps();
        let (id, home, config) = (node.id, node.home, node.config.clone());
        for (_, c) in &children {
            self.connect(home, c.home).await?;
        }
        self.open_on(home, id, name, config, children, &stats, fd.as_ref())
            .await
            .map(|_| ())
    }

    /// QEMU's generated names: `#block`, a counter, two random digits.
    /// Checks a name a new node is to get: well formed, not too long, not taken.
    pub(super) fn check_new_node_name(&self, n: &str) -> Result<(), QmpError> {
        if !id_wellformed(n) {
            return Err(errors::invalid_node_name(n));
        }
        if n.len() > MAX_NODE_NAME {
            return Err(errors::node_name_too_long());
        }
        if self.graph.contains(n) {
            return Err(errors::duplicate_node_name(n));
        }
        Ok(())
    }

    pub(super) fn generate_name(&mut self) -> String {
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
        self.store_persistent_bitmaps(name).await;
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

    /// Closes every node in its worker, parents before children, as the daemon exits:
    /// a format node writes back what a clean close writes (qcow2's leaked
    /// reservations and dirty bit). Bounded: a worker that does not answer in time is
    /// killed with the rest.
    pub(super) async fn close_all_nodes(&mut self) {
        let mut order = self.graph.children_first(|_| true);
        order.reverse();
        let close = async {
            for name in order {
                self.store_persistent_bitmaps(&name).await;
                let Some(node) = self.graph.get(&name) else {
                    continue;
                };
                let (id, home) = (node.id, node.home);
                if let Some(w) = self.running(home) {
                    let _ = w.call(ToWorker::RemoveNode { node: id }, &[]).await;
                }
            }
        };
        if tokio::time::timeout(CLOSE_ALL_TIMEOUT, close)
            .await
            .is_err()
        {
            tracing::warn!("closing the nodes at exit timed out");
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
        // A job holds its nodes through block backends of its own (QEMU's
        // `bdrv_has_blk`).
        if self.job_using(name).is_some() {
            return Err(errors::node_in_use(name));
        }
        // QEMU's op blocker on a backing node comes before the other checks.
        if let Some(parent) = self
            .graph
            .iter()
            .find(|p| p.child(Role::Backing) == Some(name))
        {
            return Err(errors::node_busy_backing(name, &parent.name));
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
        let (bottom_id, home, config) = (cur.id, cur.home, cur.config.clone());
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
                return Err(errors::from_error(bulkhead_block::node::resize_error_text(
                    &config, &io,
                )));
            }
            Err(e) => return Err(call_error(e)),
        }
        self.refresh_sizes(&chain).await;
        self.resize_bitmaps().await;
        Ok(())
    }

    /// Asks the workers of format nodes what their images say now (the dirty flag
    /// and bitmap flags change as the image is written), for queries. A worker that
    /// does not answer leaves the last report.
    pub(super) async fn refresh_format_info(&mut self) {
        // Format nodes, and their files, which grow as the format allocates.
        let formats: Vec<&str> = self
            .graph
            .iter()
            .filter(|n| n.format.is_some())
            .map(|n| n.name.as_str())
            .collect();
        let nodes: Vec<_> =
            self.graph
                .iter()
                .filter(|n| {
                    n.format.is_some()
                        || self.graph.iter().any(|p| {
                            formats.contains(&p.name.as_str()) && p.file() == Some(&n.name)
                        })
                })
                .map(|n| (n.name.clone(), n.id, n.home))
                .collect();
        for (name, id, home) in nodes {
            let Some(w) = self.running(home) else {
                continue;
            };
            if let Ok(Reply::NodeInfo { size, format }) =
                w.call(ToWorker::QueryNode { node: id }, &[]).await
                && let Some(n) = self.graph.get_mut(&name)
            {
                n.size = size;
                if format.is_some() {
                    n.format = format;
                }
            }
        }
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
            if let Ok(Reply::NodeInfo { size, .. }) =
                w.call(ToWorker::QueryNode { node: id }, &[]).await
                && let Some(n) = self.graph.get_mut(&name)
            {
                n.size = size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_qmp::qapi::types::samples;

    use super::*;

    #[test]
    fn every_implemented_driver_decodes_every_schema_member() {
        // `mirror_top` is the supervisor's own: no user adds it.
        for &driver in Driver::ALL.iter().filter(|&&d| d != Driver::MirrorTop) {
            let args = match samples::command_args("blockdev-add", driver.as_str()) {
                Ok(Value::Object(m)) => m,
                other => panic!("{driver:?}: no sample: {other:?}"),
            };
            let options: BlockdevOptions = match serde_json::from_value(Value::Object(args.clone()))
            {
                Ok(o) => o,
                Err(e) => panic!("{driver:?}: {e}"),
            };
            assert_eq!(driver_of(options.base.driver), Some(driver));
            // Every member the schema has reaches the driver's options struct (which
            // refuses unknown ones) or its child slots.
            match parse_spec(&options, &args) {
                Ok(spec) => assert_eq!(spec.driver, driver),
                Err(e) => panic!("{driver:?}: {}", e.desc),
            }
        }
    }

    #[test]
    fn a_driver_bulkhead_lacks_is_refused_by_name() {
        let args = match samples::command_args("blockdev-add", "vhdx") {
            Ok(Value::Object(m)) => m,
            other => panic!("no sample: {other:?}"),
        };
        let options: BlockdevOptions = match serde_json::from_value(Value::Object(args.clone())) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        let e = parse_spec(&options, &args).err().map(|e| e.desc);
        assert_eq!(
            e.as_deref(),
            Some("Driver 'vhdx' is not supported by bulkhead")
        );
    }
}
