//! Mapped I/O grants: which exports may move their node's bytes straight on the
//! image descriptor, and keeping each export worker's grant in step with the graph.
//!
//! Runs in the supervisor. An export's requests normally cross one data channel to
//! the worker hosting its node. Where the node is plain data on a regular file (a
//! `file` node, or `raw` over the whole of one) and nothing else has to see a write
//! on the way, the supervisor grants the serving worker a mapping (`ExportMap`): the
//! image descriptor (read-only unless writes may go through it) and the nodes'
//! statistics regions, so that worker reads and writes the file itself and keeps
//! the counters the node layer would have kept. See `design/data-path.md`, "Mapped
//! I/O", for the data side and the conditions.
//!
//! Every command that changes anything revokes every grant before it runs
//! ([`Core::revoke_mappings`]: the worker answers once no request uses the old
//! mapping) and [`Core::sync_mappings`] grants what the graph allows afterwards, so
//! no request takes the shortcut while a node becomes read-only, inactive, resized
//! or re-pointed. A restarted export worker has no mapping; its new generation
//! makes the next sync grant it again.

use std::os::fd::{AsFd, OwnedFd};

use bulkhead_ipc::wire::{ExportKey, ExportMap, ToWorker, WorkerId};

use super::super::Core;
use super::super::graph::Driver;
use super::super::graph::{Node, Role};
use super::super::workers::CallError;

/// Most layers of a backing chain one format mapping reads (the export worker takes
/// at most 8 layers).
const MAX_FORMAT_LAYERS: usize = 4;

/// A mapping an export worker holds, as granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// The instance serving the export, and its generation then.
    pub worker: WorkerId,
    pub generation: u64,
    /// What was granted.
    pub map: ExportMap,
}

impl Core {
    /// What export `key` may map now: the grant, the nodes whose counters it uses
    /// (a format mapping: the format nodes of the chain), and the image nodes whose
    /// files it reads (a plain mapping: one; a format mapping: one per layer).
    fn desired_mapping(&self, key: ExportKey) -> Option<(ExportMap, Vec<&Node>, Vec<&Node>)> {
        let e = self.exports.by_key(key)?;
        if e.shutting_down {
            return None;
        }
        let top = self.graph.get(&e.node)?;
        if top.driver == Driver::Qcow2 {
            return self.desired_format_mapping(top);
        }
        // The nodes a request passes, and the image under them.
        let layers: Vec<&Node> = match top.driver {
            Driver::File => vec![top],
            Driver::Raw => {
                // The whole file only: a window would let the export worker reach
                // bytes its clients cannot.
                let bulkhead_block::DriverConfig::Raw(raw) = &top.config else {
                    return None;
                };
                if raw.offset != 0 || raw.size.is_some() {
                    return None;
                }
                let file = self.graph.get(top.file()?)?;
                vec![top, file]
            }
            _ => return None,
        };
        let image = *layers.last()?;
        if !Self::mappable_image(image) || layers.iter().any(|n| !n.active) {
            return None;
        }
        // Plain writes skip the node layer's driver-side work: only where there is
        // none (no detect-zeroes, no enabled dirty bitmap to mark) and the node takes
        // writes.
        let writable = e.writable
            && layers.iter().all(|n| {
                !n.read_only && n.detect_zeroes == "off" && !n.bitmaps.iter().any(|b| b.enabled)
            });
        let map = ExportMap {
            base: 0,
            size: top.size,
            writable,
            layers: vec![0; layers.len()],
            format: false,
        };
        Some((map, layers, vec![image]))
    }

    /// A file node the export worker may read itself: a regular file without
    /// O_DIRECT, open.
    fn mappable_image(image: &Node) -> bool {
        image.driver == Driver::File && !image.direct && image.image.is_some()
    }

    /// Reads of a qcow2 node: the export asks the node's worker where guest bytes
    /// lie (`BlockIo::map`) and reads the files itself, so the qcow2 parser stays in
    /// the image's worker. Each layer of the backing chain that is qcow2 over a
    /// mappable file, with its data in that file, is granted its file; the first
    /// that is not ends the chain (its runs go to the worker).
    fn desired_format_mapping<'a>(
        &'a self,
        top: &'a Node,
    ) -> Option<(ExportMap, Vec<&'a Node>, Vec<&'a Node>)> {
        let mut layers = Vec::new();
        let mut images = Vec::new();
        let mut node = Some(top);
        while let Some(n) = node {
            if n.driver != Driver::Qcow2
                || n.child(Role::DataFile).is_some()
                || !n.active
                || layers.len() >= MAX_FORMAT_LAYERS
            {
                break;
            }
            let Some(file) = n.file().and_then(|f| self.graph.get(f)) else {
                break;
            };
            if !Self::mappable_image(file) || !file.active {
                break;
            }
            layers.push(n);
            images.push(file);
            node = n.child(Role::Backing).and_then(|b| self.graph.get(b));
        }
        if layers.is_empty() {
            return None;
        }
        let map = ExportMap {
            base: 0,
            size: top.size,
            writable: false,
            layers: vec![0; layers.len()],
            format: true,
        };
        Some((map, layers, images))
    }

    /// The descriptors of a grant: the images (writable only if the grant is, else a
    /// fresh read-only open of the same file), then each layer's statistics region.
    fn mapping_fds(map: &ExportMap, layers: &[&Node], images: &[&Node]) -> Option<Vec<OwnedFd>> {
        let mut fds = Vec::with_capacity(images.len() + layers.len());
        for node in images {
            let image = node.image.as_ref()?;
            let file = if map.writable {
                let mode = rustix::fs::fcntl_getfl(image).ok()?;
                if !mode.contains(rustix::fs::OFlags::RDWR) {
                    return None;
                }
                bulkhead_ipc::fd::dup(image).ok()?
            } else {
                // Same inode, not the same path (which could have been replaced).
                let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(image));
                rustix::fs::open(
                    path.as_str(),
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .ok()?
            };
            fds.push(file);
        }
        for n in layers {
            fds.push(bulkhead_ipc::fd::dup(n.stats.fd()).ok()?);
        }
        Some(fds)
    }

    /// The instance serving export `key` and its generation, if it runs.
    fn mapping_server(&self, key: ExportKey) -> Option<(WorkerId, u64)> {
        let e = self.exports.by_key(key)?;
        let id = self.export_server(e)?;
        self.running(id)?;
        Some((id, self.instances.get(&id)?.generation))
    }

    /// Takes back every grant, each once no request uses it. A worker that cannot
    /// confirm it (a request stuck on the mapping, or a refusal) is killed: the
    /// command about to run may make mapped writes wrong (an inactivated node), and
    /// a dead worker moves nothing; its restart brings the export back unmapped. A
    /// call that timed out has killed the worker already.
    pub(in crate::supervisor) async fn revoke_mappings(&mut self) {
        let granted: Vec<(ExportKey, Granted)> = self
            .exports
            .iter_mut()
            .filter_map(|e| e.mapped.take().map(|g| (e.key, g)))
            .collect();
        for (key, g) in granted {
            if self.mapping_server(key) != Some((g.worker, g.generation)) {
                continue;
            }
            let Some(w) = self.running(g.worker) else {
                continue;
            };
            let revoke = ToWorker::ExportMap {
                export: key,
                map: None,
            };
            match w.call(revoke, &[]).await {
                Ok(_) | Err(CallError::Dead(_) | CallError::Timeout(_)) => {}
                Err(e) => {
                    tracing::error!(%key, worker = %g.worker, error = %e, "mapping not revoked: killing the export worker");
                    w.kill();
                }
            }
        }
    }

    /// Grants each export what the graph allows now, where the serving worker does
    /// not hold exactly that already.
    pub(in crate::supervisor) async fn sync_mappings(&mut self) {
        let keys: Vec<ExportKey> = self.exports.iter().map(|e| e.key).collect();
        for key in keys {
            let server = self.mapping_server(key);
            let desired = self.desired_mapping(key);
            let current = self.exports.by_key(key).and_then(|e| e.mapped.clone());
            let up_to_date = match (&current, &desired, server) {
                (Some(g), Some((map, _, _)), Some((w, gen_))) => {
                    g.worker == w && g.generation == gen_ && g.map == *map
                }
                (None, None, _) => true,
                _ => false,
            };
            if up_to_date {
                continue;
            }
            let Some((worker, generation)) = server else {
                self.set_granted(key, None);
                continue;
            };
            let grant = desired.and_then(|(map, layers, images)| {
                let fds = Self::mapping_fds(&map, &layers, &images)?;
                Some((map, fds))
            });
            let Some(w) = self.running(worker) else {
                continue;
            };
            let (msg, fds, granted) = match grant {
                Some((map, fds)) => (
                    ToWorker::ExportMap {
                        export: key,
                        map: Some(map.clone()),
                    },
                    fds,
                    Some(Granted {
                        worker,
                        generation,
                        map,
                    }),
                ),
                None => (
                    ToWorker::ExportMap {
                        export: key,
                        map: None,
                    },
                    Vec::new(),
                    None,
                ),
            };
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            match w.call(msg, &borrowed).await {
                Ok(_) => self.set_granted(key, granted),
                Err(e) => {
                    tracing::debug!(%key, error = %e, "mapping not changed");
                    self.set_granted(key, None);
                }
            }
        }
    }

    fn set_granted(&mut self, key: ExportKey, granted: Option<Granted>) {
        if let Some(e) = self.exports.by_key_mut(key) {
            e.mapped = granted;
        }
    }
}
