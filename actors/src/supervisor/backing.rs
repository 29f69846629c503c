//! Backing files named inside images: the policy that decides what the supervisor
//! opens for them, and the implicit backing nodes (`#blockNNN`) it creates, as QEMU
//! does when a format node's options do not name its backing.
//!
//! Runs in the supervisor. The name and format come from image bytes, through the
//! image's worker (`FormatInfo`): untrusted. The policy (`design/sandbox.md`):
//! - the name is resolved as QEMU resolves it: an absolute path as it is, a relative
//!   one against the directory of the image that names it (refused when that image
//!   has no plain file name, as QEMU refuses it for `json:` names);
//! - names with a protocol prefix (`nbd:`, `http://`, ...) are refused: a backing
//!   file is a local file here;
//! - the file must be a regular file or a block device, and is opened read-only;
//! - the format is the one the image names, or probed from the file's first bytes
//!   (qcow2's magic, else raw) as QEMU probes;
//! - an image that is already open in the chain below the new node is refused, as
//!   QEMU's image locks refuse it (a loop would never end);
//! - a worker never receives the path, only the descriptor.

use std::io::Read;
use std::path::{Path, PathBuf};

use bulkhead_qmp::qapi::types::BlockdevOptions;
use serde_json::{Map, Value, json};

use super::graph::{Driver, Role};
use super::{Core, QmpError, errors};

/// How deep a chain of implicitly opened backing files may go.
const MAX_DEPTH: usize = 32;

/// QEMU's `path_has_protocol`: a `:` before any `/`.
fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name[..colon].contains('/'),
        None => false,
    }
}

/// Resolves `name` against the image file `image` names it in (QEMU's
/// `bdrv_get_full_backing_filename`).
pub(super) fn resolve(name: &str, image: &str) -> Result<PathBuf, String> {
    if name.is_empty() || name.len() > 4096 || name.contains('\0') {
        return Err(format!("Could not open '{name}': Invalid argument"));
    }
    if has_protocol(name) {
        return Err(format!(
            "Could not open '{name}': backing files with a protocol are not supported by bulkhead"
        ));
    }
    if Path::new(name).is_absolute() {
        return Ok(PathBuf::from(name));
    }
    if image.starts_with("json:") || image.is_empty() {
        return Err(format!(
            "Cannot use relative backing file names for '{image}'"
        ));
    }
    Ok(super::asks::image_dir(image).join(name))
}

/// QEMU's format probe, for the formats bulkhead has: qcow2's magic and a version
/// of at least 2, else raw.
fn probe(path: &Path) -> Result<&'static str, String> {
    let mut head = [0u8; 8];
    let mut f = std::fs::File::open(path)
        .map_err(|e| format!("Could not open '{}': {}", path.display(), errno_text(&e)))?;
    let n = f.read(&mut head).unwrap_or(0);
    let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    Ok(if n == 8 && head[..4] == *b"QFI\xfb" && version >= 2 {
        "qcow2"
    } else {
        "raw"
    })
}

fn errno_text(e: &std::io::Error) -> String {
    super::strerror(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Core {
    /// Opens the backing file node `parent`'s image names, when its options named
    /// none, and attaches it. `created` collects new nodes for the caller's undo.
    pub(super) async fn open_implicit_backing(
        &mut self,
        parent: &str,
        created: &mut Vec<String>,
    ) -> Result<(), QmpError> {
        let Some(node) = self.graph.get(parent) else {
            return Err(errors::node_vanished());
        };
        let Some(format) = node.format.as_deref() else {
            return Ok(());
        };
        let Some(name) = format.backing_file.clone() else {
            return Ok(());
        };
        let named_format = format.backing_format.clone();
        let (home, id, direct, no_flush) = (node.home, node.id, node.direct, node.no_flush);
        let fail = |text: String| errors::backing_open_failed(&text);
        // The file the parent's image lives in names the directory.
        let image = self
            .graph
            .chain(parent)
            .last()
            .and_then(|b| b.path.clone())
            .unwrap_or_default();
        let path = resolve(&name, &image).map_err(fail)?;
        let path_str = path.to_string_lossy().into_owned();
        // The images below and above: the new node must not be one of them.
        let canonical = std::fs::canonicalize(&path).ok();
        let depth = self.backing_depth(parent);
        if depth >= MAX_DEPTH {
            return Err(fail("Backing chain too deep".to_string()));
        }
        if canonical.is_some() && self.chain_images(parent).contains(&canonical) {
            return Err(fail("Failed to get shared \"write\" lock".to_string()));
        }
        let fmt = match named_format.as_deref() {
            Some(f) => f.to_string(),
            None => probe(&path).map_err(fail)?.to_string(),
        };
        if Driver::by_name(&fmt).is_none() {
            return Err(fail(format!("Driver '{fmt}' is not supported by bulkhead")));
        }
        // A backing file is opened read-only, with its parent's cache options, its
        // protocol node a plain file (or block device, which the open checks).
        let mut options = Map::new();
        options.insert("driver".into(), fmt.clone().into());
        let file = json!({"driver": "file", "filename": path_str});
        options.insert("file".into(), file);
        let typed: BlockdevOptions = serde_json::from_value(Value::Object(options.clone()))
            .map_err(|e| fail(e.to_string()))?;
        let spec = super::blockdev::parse_spec(&typed, &options).map_err(|e| fail(e.desc))?;
        let hint = match self.isolation {
            super::placement::Isolation::Image => Some(home),
            super::placement::Isolation::Kind => None,
        };
        let inherit = super::blockdev::Inherited {
            read_only: true,
            direct,
            no_flush,
        };
        let backing = Box::pin(self.create(spec, inherit, false, hint, created))
            .await
            .map_err(|e| fail(e.desc))?;
        // Attach it: the parent is opened again with its backing child.
        let Some(bref) = self.node_ref(&backing) else {
            return Err(errors::node_vanished());
        };
        self.connect(home, bref.home).await?;
        let children = self.child_refs(parent, Some((Role::Backing, Some(bref))));
        let (config, image_fd) = match self.graph.get(parent) {
            Some(n) => (
                n.config.clone(),
                match &n.image {
                    Some(f) => Some(bulkhead_ipc::fd::dup(f).map_err(errors::from_error)?),
                    None => None,
                },
            ),
            None => return Err(errors::node_vanished()),
        };
        self.reopen_on(home, id, parent, config, children, image_fd)
            .await?;
        self.graph
            .set_child(parent, Role::Backing, Some(backing.clone()));
        if let Some(n) = self.graph.get_mut(parent) {
            n.implicit_backing = true;
        }
        Ok(())
    }

    /// Opens the external data file an image names (`name`, untrusted) as a `file`
    /// node for the format node being opened on instance `home`. QEMU opens it by
    /// that name as it stands: a relative name is relative to the daemon's working
    /// directory (not the image's), and so it is here. Policy: no protocol prefix, a
    /// regular file (the `file` node refuses anything else), the format node's access
    /// mode and cache options; the worker gets the descriptor only.
    pub(super) async fn open_implicit_data_file(
        &mut self,
        name: &str,
        inherit: super::blockdev::Inherited,
        home: super::WorkerId,
        created: &mut Vec<String>,
    ) -> Result<(String, bulkhead_ipc::wire::NodeRef), QmpError> {
        if name.is_empty() || name.len() > 4096 || name.contains('\0') {
            return Err(errors::from_error(format!(
                "Could not open '{name}': Invalid argument"
            )));
        }
        if has_protocol(name) {
            return Err(errors::from_error(format!(
                "Could not open '{name}': data files with a protocol are not supported by bulkhead"
            )));
        }
        let mut options = Map::new();
        options.insert("driver".into(), "file".into());
        options.insert("filename".into(), name.into());
        let typed: BlockdevOptions = serde_json::from_value(Value::Object(options.clone()))
            .map_err(|e| errors::from_error(e.to_string()))?;
        let spec = super::blockdev::parse_spec(&typed, &options)?;
        // The data file is the format node's local protocol child: its worker.
        let data = Box::pin(self.create(spec, inherit, false, Some(home), created)).await?;
        let Some(dref) = self.node_ref(&data) else {
            return Err(errors::node_vanished());
        };
        Ok((data, dref))
    }

    /// How many overlays sit above `name` through backing links (the depth of the
    /// chain being built).
    fn backing_depth(&self, name: &str) -> usize {
        let mut depth = 0;
        let mut cur = name.to_string();
        while let Some(p) = self.graph.iter().find(|p| {
            p.children
                .iter()
                .any(|(r, c)| *r == Role::Backing && *c == cur)
        }) {
            depth += 1;
            if depth > MAX_DEPTH {
                break;
            }
            cur = p.name.clone();
        }
        depth
    }

    /// The canonical image paths of `name`'s file and of every overlay above it.
    fn chain_images(&self, name: &str) -> Vec<Option<PathBuf>> {
        let mut out = Vec::new();
        let mut cur = Some(name.to_string());
        let mut steps = 0;
        while let Some(n) = cur.take() {
            steps += 1;
            if steps > MAX_DEPTH + 1 {
                break;
            }
            if let Some(path) = self.graph.chain(&n).last().and_then(|b| b.path.clone()) {
                out.push(std::fs::canonicalize(path).ok());
            }
            cur = self
                .graph
                .iter()
                .find(|p| {
                    p.children
                        .iter()
                        .any(|(r, c)| *r == Role::Backing && *c == n)
                })
                .map(|p| p.name.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_as_qemu_resolves_them() {
        assert_eq!(
            resolve("base.qcow2", "/img/top.qcow2"),
            Ok(PathBuf::from("/img/base.qcow2"))
        );
        assert_eq!(
            resolve("/abs/base.qcow2", "/img/top.qcow2"),
            Ok(PathBuf::from("/abs/base.qcow2"))
        );
        assert_eq!(
            resolve("../b/base.qcow2", "/img/top.qcow2"),
            Ok(PathBuf::from("/img/../b/base.qcow2"))
        );
        assert!(resolve("nbd:localhost:10809", "/img/top.qcow2").is_err());
        assert!(resolve("http://h/x", "/img/top.qcow2").is_err());
        assert!(resolve("base.qcow2", "json:{}").is_err());
        assert!(resolve("", "/img/top.qcow2").is_err());
        assert!(!has_protocol("/a:b/c"));
        assert!(has_protocol("file:x"));
    }
}
