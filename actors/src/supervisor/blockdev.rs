//! `blockdev-add`, `blockdev-del` and `block_resize`.
//!
//! Runs in the supervisor. Options arrive checked against the QAPI schema; this module
//! applies QEMU's semantic rules in QEMU's order (children first, then the node's name,
//! then opening it), opens image files itself and hands descriptors to the workers, and
//! undoes everything it created if any step fails.

use std::os::fd::{AsFd, OwnedFd};

use bulkhead_block::config::{
    CommonConfig, DetectZeroes, DriverConfig, FileConfig, NullConfig, RawConfig,
};
use bulkhead_ipc::fd;
use bulkhead_ipc::wire::{NodeRef, Reply, ToWorker};
use serde_json::{Map, Value, json};

use super::graph::{Driver, Node};
use super::{Core, QmpError, call_error, strerror};

/// QEMU's limit on node names (`BlockDriverState.node_name[32]`).
const MAX_NODE_NAME: usize = 31;

/// null-co's default size: 1 GiB.
const NULL_DEFAULT_SIZE: u64 = 1 << 30;

/// A `file` child: an existing node, or options for a new one.
enum ChildSpec {
    Ref(String),
    Inline(Box<Spec>),
}

enum SpecKind {
    Posix {
        filename: String,
        aio_native: bool,
    },
    Raw {
        offset: Option<u64>,
        size: Option<u64>,
        child: ChildSpec,
    },
    Null {
        size: u64,
        read_zeroes: bool,
        latency_ns: u64,
    },
}

/// One node's options, parsed from BlockdevOptions.
struct Spec {
    name: Option<String>,
    driver: Driver,
    read_only: Option<bool>,
    direct: Option<bool>,
    no_flush: Option<bool>,
    discard_unmap: bool,
    detect_zeroes: DetectZeroes,
    strong: Map<String, Value>,
    kind: SpecKind,
}

fn get<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k)
}

fn get_bool(m: &Map<String, Value>, k: &str) -> Option<bool> {
    get(m, k).and_then(Value::as_bool)
}

fn get_str<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    get(m, k).and_then(Value::as_str)
}

/// A non-negative integer option; QEMU's size parser rejects negatives with this text.
fn get_size(m: &Map<String, Value>, k: &str) -> Result<Option<u64>, QmpError> {
    match get(m, k) {
        None => Ok(None),
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(n), _) => Ok(Some(n)),
            (None, Some(n)) => Err(QmpError::generic(format!(
                "Value '{n}' is out of range for parameter '{k}'"
            ))),
            _ => Err(QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: integer"
            ))),
        },
    }
}

fn parse_spec(v: &Value) -> Result<Spec, QmpError> {
    let Value::Object(m) = v else {
        return Err(QmpError::generic(
            "Invalid parameter type for 'options', expected: object",
        ));
    };
    let driver_name =
        get_str(m, "driver").ok_or_else(|| QmpError::generic("Parameter 'driver' is missing"))?;
    let driver = match driver_name {
        "file" => Driver::File,
        "host_device" => Driver::HostDevice,
        "raw" => Driver::Raw,
        "null-co" => Driver::NullCo,
        "null-aio" => Driver::NullAio,
        other => {
            return Err(QmpError::generic(format!(
                "Driver '{other}' is not supported by bulkhead"
            )));
        }
    };
    let cache = get(m, "cache").and_then(Value::as_object);
    let discard_unmap = get_str(m, "discard") == Some("unmap");
    let detect_zeroes = match get_str(m, "detect-zeroes") {
        Some("on") => DetectZeroes::On,
        Some("unmap") => DetectZeroes::Unmap,
        _ => DetectZeroes::Off,
    };
    if detect_zeroes == DetectZeroes::Unmap && !discard_unmap {
        return Err(QmpError::generic(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
        ));
    }
    let mut strong = Map::new();
    let kind = match driver {
        Driver::File | Driver::HostDevice => SpecKind::Posix {
            filename: get_str(m, "filename")
                .ok_or_else(|| QmpError::generic("Parameter 'filename' is missing"))?
                .to_string(),
            aio_native: get_str(m, "aio") == Some("native"),
        },
        Driver::Raw => {
            let offset = get_size(m, "offset")?;
            let size = get_size(m, "size")?;
            if let Some(o) = offset {
                strong.insert("offset".into(), o.into());
            }
            if let Some(s) = size {
                strong.insert("size".into(), s.into());
            }
            let child = match get(m, "file") {
                Some(Value::String(name)) => ChildSpec::Ref(name.clone()),
                Some(inline @ Value::Object(_)) => ChildSpec::Inline(Box::new(parse_spec(inline)?)),
                _ => return Err(QmpError::generic("Parameter 'file' is missing")),
            };
            SpecKind::Raw {
                offset,
                size,
                child,
            }
        }
        Driver::NullCo | Driver::NullAio => {
            let size = get_size(m, "size")?;
            let latency = get_size(m, "latency-ns")?;
            let read_zeroes = get_bool(m, "read-zeroes");
            // QEMU's null driver records exactly the options given, in this order.
            if let Some(l) = latency {
                strong.insert("latency-ns".into(), l.into());
            }
            if let Some(s) = size {
                strong.insert("size".into(), s.into());
            }
            if let Some(z) = read_zeroes {
                strong.insert("read-zeroes".into(), z.into());
            }
            SpecKind::Null {
                size: size.unwrap_or(NULL_DEFAULT_SIZE),
                read_zeroes: read_zeroes.unwrap_or(false),
                latency_ns: latency.unwrap_or(0),
            }
        }
    };
    if let SpecKind::Posix {
        aio_native: true, ..
    } = kind
        && cache.and_then(|c| get_bool(c, "direct")) != Some(true)
    {
        return Err(QmpError::generic(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ));
    }
    Ok(Spec {
        name: get_str(m, "node-name").map(str::to_string),
        driver,
        read_only: get_bool(m, "read-only"),
        direct: cache.and_then(|c| get_bool(c, "direct")),
        no_flush: cache.and_then(|c| get_bool(c, "no-flush")),
        discard_unmap,
        detect_zeroes,
        strong,
        kind,
    })
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, '-', '.', '_'.
fn well_formed(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Options a parent passes down to an inline child unless the child sets them.
#[derive(Clone, Copy, Default)]
struct Inherited {
    read_only: bool,
    direct: bool,
    no_flush: bool,
}

fn open_image(path: &str, read_only: bool, direct: bool) -> Result<OwnedFd, QmpError> {
    use rustix::fs::{Mode, OFlags};
    let mut flags = OFlags::CLOEXEC
        | if read_only {
            OFlags::RDONLY
        } else {
            OFlags::RDWR
        };
    if direct {
        flags |= OFlags::DIRECT;
    }
    rustix::fs::open(path, flags, Mode::empty()).map_err(|e| {
        QmpError::generic(format!(
            "Could not open '{path}': {}",
            strerror(e.raw_os_error())
        ))
    })
}

impl Core {
    pub(super) async fn blockdev_add(&mut self, options: Value) -> Result<Value, QmpError> {
        let spec = parse_spec(&options)?;
        if spec.name.is_none() {
            return Err(QmpError::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let mut created = Vec::new();
        match Box::pin(self.create(spec, Inherited::default(), true, &mut created)).await {
            Ok(_) => Ok(json!({})),
            Err(e) => {
                for name in created.into_iter().rev() {
                    self.destroy(&name).await;
                }
                Err(e)
            }
        }
    }

    /// Creates `spec` and its inline children; records every created name in `created`
    /// so a failure can undo them.
    async fn create(
        &mut self,
        spec: Spec,
        inherited: Inherited,
        root: bool,
        created: &mut Vec<String>,
    ) -> Result<String, QmpError> {
        let read_only = spec.read_only.unwrap_or(inherited.read_only);
        let direct = spec.direct.unwrap_or(inherited.direct);
        let no_flush = spec.no_flush.unwrap_or(inherited.no_flush);
        let common = CommonConfig {
            read_only,
            discard_unmap: spec.discard_unmap,
            detect_zeroes: spec.detect_zeroes,
            no_flush,
            direct,
        };

        let mut posix_or_null = None;
        // Children first: QEMU opens a format node's file child before it names the node.
        let mut child = None;
        let mut raw_window = None;
        let kind_spec = match spec.kind {
            SpecKind::Raw {
                child: c,
                offset,
                size,
            } => {
                raw_window = Some((offset, size));
                Some(c)
            }
            other => {
                posix_or_null = Some(other);
                None
            }
        };
        if let Some(c) = kind_spec {
            let name = match c {
                ChildSpec::Ref(name) => {
                    if !self.graph.contains(&name) {
                        return Err(QmpError::generic(format!(
                            "Cannot find device='{name}' nor node-name='{name}'"
                        )));
                    }
                    name
                }
                ChildSpec::Inline(s) => {
                    let inherit = Inherited {
                        read_only,
                        direct,
                        no_flush,
                    };
                    Box::pin(self.create(*s, inherit, false, created)).await?
                }
            };
            child = Some(name);
        }

        let name = match spec.name {
            Some(n) => {
                if !well_formed(&n) {
                    return Err(QmpError::generic(format!("Invalid node-name: '{n}'")));
                }
                if n.len() > MAX_NODE_NAME {
                    return Err(QmpError::generic("Node name too long"));
                }
                if self.graph.contains(&n) {
                    return Err(QmpError::generic(format!(
                        "Duplicate nodes with node-name='{n}'"
                    )));
                }
                n
            }
            None => self.generate_name(),
        };

        let id = self.graph.allocate_id();
        let kind = spec.driver.worker();
        let (config, image, path) = match posix_or_null {
            Some(SpecKind::Posix { filename, .. }) => {
                let fd = open_image(&filename, read_only, direct)?;
                let cfg = FileConfig { common };
                let cfg = if spec.driver == Driver::File {
                    DriverConfig::File(cfg)
                } else {
                    DriverConfig::HostDevice(cfg)
                };
                (cfg, Some(fd), Some(filename))
            }
            Some(SpecKind::Null {
                size,
                read_zeroes,
                latency_ns,
            }) => {
                let cfg = NullConfig {
                    common,
                    size,
                    read_zeroes,
                    latency_ns,
                };
                let cfg = if spec.driver == Driver::NullCo {
                    DriverConfig::NullCo(cfg)
                } else {
                    DriverConfig::NullAio(cfg)
                };
                (cfg, None, None)
            }
            Some(SpecKind::Raw { .. }) | None => {
                let (offset, size) = raw_window.unwrap_or((None, None));
                (
                    DriverConfig::Raw(RawConfig {
                        common,
                        offset: offset.unwrap_or(0),
                        size,
                    }),
                    None,
                    None,
                )
            }
        };

        let child_ref = match &child {
            Some(c) => {
                let cnode = self
                    .graph
                    .get(c)
                    .ok_or_else(|| QmpError::generic("child vanished"))?;
                let home = cnode.driver.worker();
                let r = NodeRef {
                    node: cnode.id,
                    home,
                };
                self.connect(kind, home).await?;
                Some(r)
            }
            None => None,
        };
        let worker_fd = match &image {
            Some(f) => Some(fd::dup(f).map_err(|e| QmpError::generic(e.to_string()))?),
            None => None,
        };
        let worker = self.worker(kind).await?;
        let fds: Vec<_> = worker_fd.iter().map(|f| f.as_fd()).collect();
        worker
            .call(
                ToWorker::AddNode {
                    node: id,
                    name: name.clone(),
                    config,
                    child: child_ref,
                },
                &fds,
            )
            .await
            .map_err(|e| {
                tracing::warn!(node = %name, error = %e, "node could not be opened");
                call_error(e)
            })?;
        let size = match worker.call(ToWorker::QueryNode { node: id }, &[]).await {
            Ok(Reply::NodeInfo { size }) => size,
            _ => 0,
        };
        let fixed_window = matches!(raw_window, Some((Some(o), _)) if o > 0)
            || matches!(raw_window, Some((_, Some(_))));
        self.graph.insert(Node {
            id,
            name: name.clone(),
            driver: spec.driver,
            child,
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
            path,
            image,
            fixed_window,
            exported: false,
        });
        created.push(name.clone());
        Ok(name)
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
    async fn destroy(&mut self, name: &str) {
        let Some(node) = self.graph.remove(name) else {
            return;
        };
        if let Some(w) = self.workers.get(&node.driver.worker())
            && let Err(e) = w.call(ToWorker::RemoveNode { node: node.id }, &[]).await
        {
            tracing::warn!(node = name, error = %e, "worker could not close node");
        }
        if let Some(child) = node.child
            && self
                .graph
                .get(&child)
                .is_some_and(|c| c.parents == 0 && !c.monitor_owned)
        {
            Box::pin(self.destroy(&child)).await;
        }
    }

    pub(super) async fn blockdev_del(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let name = get_str(args, "node-name").unwrap_or_default().to_string();
        let node = self.graph.get(&name).ok_or_else(|| {
            QmpError::generic(format!("Failed to find node with node-name='{name}'"))
        })?;
        if node.exported {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        if !node.monitor_owned {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if node.parents > 0 {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        self.destroy(&name).await;
        Ok(json!({}))
    }

    pub(super) async fn block_resize(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let device = get_str(args, "device");
        let node_name = get_str(args, "node-name");
        let found = node_name.and_then(|n| self.graph.get(n));
        let Some(node) = found else {
            return Err(QmpError::generic(format!(
                "Cannot find device='{}' nor node-name='{}'",
                device.unwrap_or(""),
                node_name.unwrap_or("")
            )));
        };
        let size = match args.get("size").and_then(Value::as_i64) {
            Some(s) if s >= 0 => s as u64,
            _ => return Err(QmpError::generic("Parameter 'size' expects a >0 size")),
        };
        // Permission check: a parent with a fixed window does not share `resize`.
        if let Some(parent) = self
            .graph
            .iter()
            .find(|p| p.child.as_deref() == Some(&node.name) && p.fixed_window)
        {
            return Err(QmpError::generic(format!(
                "Permission conflict on node '{0}': permissions 'resize' are both required by an unnamed block device (uses node '{0}' as 'root' child) and unshared by node '{1}' (uses node '{0}' as 'file' child).",
                node.name, parent.name
            )));
        }
        if node.read_only {
            return Err(QmpError::generic("Block node is read-only".to_string()));
        }
        // Resizing goes down the chain to the node that stores the data.
        let chain = self.chain_of(&node.name);
        let Some(bottom) = chain.last().and_then(|n| self.graph.get(n)) else {
            return Err(QmpError::generic(
                "Image format driver does not support resize",
            ));
        };
        if !matches!(bottom.driver, Driver::File)
            || chain
                .iter()
                .any(|n| self.graph.get(n).is_some_and(|x| x.fixed_window))
        {
            return Err(QmpError::generic(
                "Image format driver does not support resize",
            ));
        }
        let (bottom_id, kind) = (bottom.id, bottom.driver.worker());
        let w = self.worker(kind).await?;
        w.call(
            ToWorker::ResizeNode {
                node: bottom_id,
                size,
            },
            &[],
        )
        .await
        .map_err(call_error)?;
        self.refresh_sizes().await;
        Ok(json!({}))
    }

    /// `name` and the nodes below it, top first.
    fn chain_of(&self, name: &str) -> Vec<String> {
        let mut out = vec![name.to_string()];
        let mut cur = self.graph.get(name).and_then(|n| n.child.clone());
        while let Some(c) = cur {
            if out.contains(&c) || out.len() > 64 {
                break;
            }
            cur = self.graph.get(&c).and_then(|n| n.child.clone());
            out.push(c);
        }
        out
    }

    /// Asks every node's worker for its current size (after a resize below it).
    async fn refresh_sizes(&mut self) {
        let nodes: Vec<_> = self
            .graph
            .iter()
            .map(|n| (n.name.clone(), n.id, n.driver.worker()))
            .collect();
        for (name, id, kind) in nodes {
            let Some(w) = self.workers.get(&kind) else {
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
