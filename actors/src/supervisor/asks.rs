//! Questions from workers ([`WorkerAsk`]) and the policy that answers them.
//!
//! Runs in the supervisor, in each worker's reader task, not in the actor: a worker may
//! ask in the middle of a request the supervisor is waiting for (a format driver
//! opening its backing file during `AddNode`), so waiting for the actor would
//! deadlock. The reader answers from [`AskTable`], a snapshot of what each worker owns
//! that `Core` refreshes after every change. Everything a worker asks is untrusted:
//! a worker may ask only about its own nodes, names are bounded, and questions are
//! rate-limited (a worker that floods is killed).

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use bulkhead_block::file::FileKind;
use bulkhead_block::posix;
use bulkhead_ipc::wire::{
    Answer, NbdHandOff, NodeId, WorkerAsk, WorkerError, WorkerErrorKind, WorkerId,
};

use super::workers::WorkerCaller;

/// Longest file name a worker may ask about (QEMU's PATH_MAX-sized buffers).
const MAX_NAME: usize = 4096;
/// Questions a worker may ask in a burst, and per second after that.
const BURST: f64 = 64.0;
const PER_SECOND: f64 = 32.0;

/// What the reader tasks need to know to answer: who hosts each node, and the
/// directory of the image under it.
#[derive(Debug, Default)]
pub struct AskTable {
    nodes: HashMap<NodeId, (WorkerId, Option<PathBuf>)>,
    /// The image files nodes have open (canonical paths) and the instances hosting
    /// those nodes: a worker may never be handed another instance's image.
    images: Vec<(PathBuf, WorkerId)>,
    /// The NBD listener of `--isolation image`, the only worker that hands off.
    listener: Option<WorkerId>,
    /// Each export's own worker, by NBD export name (exports being removed left out).
    exporters: HashMap<String, WorkerCaller>,
}

/// The table, shared by `Core` (writer) and the reader tasks (readers), all on the
/// supervisor's thread.
pub type SharedAskTable = Rc<RefCell<AskTable>>;

impl AskTable {
    /// Replaces the table's contents.
    pub fn set(&mut self, nodes: impl IntoIterator<Item = (NodeId, WorkerId, Option<PathBuf>)>) {
        self.nodes = nodes.into_iter().map(|(n, w, d)| (n, (w, d))).collect();
    }

    /// Replaces the list of open images (path as the node was given it, and the
    /// instance hosting the node).
    pub fn set_images(&mut self, images: impl IntoIterator<Item = (String, WorkerId)>) {
        self.images = images
            .into_iter()
            .filter_map(|(p, w)| std::fs::canonicalize(p).ok().map(|c| (c, w)))
            .collect();
    }

    /// Replaces what NBD hand-offs are answered from.
    pub fn set_exports(
        &mut self,
        listener: Option<WorkerId>,
        exporters: impl IntoIterator<Item = (String, WorkerCaller)>,
    ) {
        self.listener = listener;
        self.exporters = exporters.into_iter().collect();
    }

    /// Where the listener's negotiated client for `hand.export` goes. `Err(None)`: the
    /// asker is not the listener (a protocol violation); `Err(Some(_))`: refused.
    pub fn hand_off_target(
        &self,
        asker: WorkerId,
        hand: &NbdHandOff,
    ) -> Result<WorkerCaller, Option<WorkerError>> {
        if self.listener != Some(asker) {
            return Err(None);
        }
        // What one negotiation can produce (NBD_MAX_STRING_SIZE, the final reply,
        // the listener's 4 KiB negotiation buffer).
        if hand.export.len() > 4096 || hand.reply.len() > 134 || hand.leftover.len() > 4096 {
            return Err(None);
        }
        self.exporters.get(&hand.export).cloned().ok_or_else(|| {
            Some(refuse(
                WorkerErrorKind::NotFound,
                libc::ENOENT,
                "no such export",
            ))
        })
    }

    /// Adds one node (being opened: it may ask before it is in the graph).
    pub fn insert(&mut self, node: NodeId, home: WorkerId, dir: Option<PathBuf>) {
        self.nodes.insert(node, (home, dir));
    }

    /// Answers `asker`'s question; descriptors to attach come with the answer.
    pub fn answer(
        &self,
        asker: WorkerId,
        body: &WorkerAsk,
    ) -> Result<(Answer, Vec<OwnedFd>), WorkerError> {
        match body {
            WorkerAsk::OpenFile {
                node,
                filename,
                writable,
            } => {
                let dir = self.own_image_dir(asker, *node)?;
                if *writable {
                    // Backing and data files are read; what may write them (a commit
                    // job) will come with a policy of its own.
                    return Err(refuse(
                        WorkerErrorKind::Unsupported,
                        libc::EACCES,
                        "named files are opened read-only",
                    ));
                }
                let fd = open_named(&dir, filename, false, |path| {
                    self.images.iter().any(|(p, w)| p == path && *w != asker)
                })?;
                Ok((Answer::File, vec![fd]))
            }
            // Carries a descriptor: handled by the reader itself (`workers.rs`).
            WorkerAsk::NbdHandOff(_) => Err(refuse(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "a hand-off carries the client's socket",
            )),
        }
    }

    fn own_image_dir(&self, asker: WorkerId, node: NodeId) -> Result<PathBuf, WorkerError> {
        match self.nodes.get(&node) {
            Some((home, Some(dir))) if *home == asker => Ok(dir.clone()),
            Some((home, None)) if *home == asker => Err(refuse(
                WorkerErrorKind::Unsupported,
                libc::ENOENT,
                "the node has no image file to resolve names against",
            )),
            _ => Err(refuse(
                WorkerErrorKind::NotFound,
                libc::EPERM,
                "not a node of this worker",
            )),
        }
    }
}

fn refuse(kind: WorkerErrorKind, errno: i32, why: &str) -> WorkerError {
    WorkerError::new(kind, errno, why)
}

/// The directory names inside the image at `path` are resolved against.
pub fn image_dir(path: &str) -> PathBuf {
    match Path::new(path).parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Opens `name` as an image names it: relative to the image's directory `dir`. The
/// policy: the file must resolve (symlinks followed) to a place inside `dir`, so an
/// image cannot make the supervisor open arbitrary host files for it.
fn open_named(
    dir: &Path,
    name: &str,
    writable: bool,
    foreign: impl Fn(&Path) -> bool,
) -> Result<OwnedFd, WorkerError> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('\0') {
        return Err(refuse(
            WorkerErrorKind::Invalid,
            libc::EINVAL,
            "bad file name",
        ));
    }
    let root = std::fs::canonicalize(dir).map_err(|e| {
        refuse(
            WorkerErrorKind::Io,
            e.raw_os_error().unwrap_or(libc::EIO),
            "image directory",
        )
    })?;
    let path = std::fs::canonicalize(root.join(name)).map_err(|e| {
        refuse(
            WorkerErrorKind::Io,
            e.raw_os_error().unwrap_or(libc::EIO),
            "no such file",
        )
    })?;
    if !path.starts_with(&root) {
        return Err(refuse(
            WorkerErrorKind::Invalid,
            libc::EACCES,
            "the file is outside the image's directory",
        ));
    }
    if foreign(&path) {
        // Another image's file (another tenant's, under `--isolation image`): an
        // image naming it must not get a worker at its bytes.
        return Err(refuse(
            WorkerErrorKind::Invalid,
            libc::EACCES,
            "the file is an image another worker serves",
        ));
    }
    let path = path.to_string_lossy();
    posix::open_image(&path, FileKind::File, !writable, false).map_err(|e| match e {
        posix::OpenImageError::Open { errno, .. } => {
            refuse(WorkerErrorKind::Io, errno, "cannot open the file")
        }
        other => refuse(WorkerErrorKind::Invalid, libc::EINVAL, &other.to_string()),
    })
}

/// A token bucket: [`BURST`] questions, refilled at [`PER_SECOND`].
#[derive(Debug)]
pub struct AskRate {
    tokens: f64,
    last: Instant,
    burst: f64,
    per_second: f64,
}

impl Default for AskRate {
    fn default() -> AskRate {
        AskRate::new(BURST, PER_SECOND)
    }
}

impl AskRate {
    /// A bucket of `burst` tokens refilled at `per_second`.
    pub fn new(burst: f64, per_second: f64) -> AskRate {
        AskRate {
            tokens: burst,
            last: Instant::now(),
            burst,
            per_second,
        }
    }

    /// Takes one token; false when the worker asks faster than allowed.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(dir: &Path) -> AskTable {
        let mut t = AskTable::default();
        t.set([
            (NodeId(1), WorkerId(7), Some(dir.to_path_buf())),
            (NodeId(2), WorkerId(8), Some(dir.to_path_buf())),
            (NodeId(3), WorkerId(7), None),
        ]);
        t
    }

    fn ask(t: &AskTable, asker: u32, node: u64, name: &str) -> Result<usize, WorkerErrorKind> {
        t.answer(
            WorkerId(asker),
            &WorkerAsk::OpenFile {
                node: NodeId(node),
                filename: name.into(),
                writable: false,
            },
        )
        .map(|(_, fds)| fds.len())
        .map_err(|e| e.kind)
    }

    #[test]
    fn a_worker_opens_files_beside_its_own_images_only() {
        let dir = std::env::temp_dir().join(format!("bulkhead-asks-{}", std::process::id()));
        let _ = std::fs::create_dir_all(dir.join("sub"));
        for f in ["base.img", "sub/deeper.img"] {
            std::fs::write(dir.join(f), b"x").unwrap_or_else(|e| panic!("{e}"));
        }
        let t = table(&dir);
        assert_eq!(ask(&t, 7, 1, "base.img"), Ok(1));
        assert_eq!(ask(&t, 7, 1, "sub/deeper.img"), Ok(1));
        let outside = dir.join("..").join("elsewhere.img");
        let _ = std::fs::write(&outside, b"x");
        assert_eq!(
            ask(&t, 7, 1, "../elsewhere.img"),
            Err(WorkerErrorKind::Invalid)
        );
        assert_eq!(ask(&t, 7, 1, "/etc/passwd"), Err(WorkerErrorKind::Invalid));
        // Node 2 belongs to another worker, node 9 to nobody.
        assert_eq!(ask(&t, 7, 2, "base.img"), Err(WorkerErrorKind::NotFound));
        assert_eq!(ask(&t, 7, 9, "base.img"), Err(WorkerErrorKind::NotFound));
        assert_eq!(ask(&t, 7, 3, "base.img"), Err(WorkerErrorKind::Unsupported));
        assert_eq!(ask(&t, 7, 1, ""), Err(WorkerErrorKind::Invalid));
        assert_eq!(ask(&t, 7, 1, "missing.img"), Err(WorkerErrorKind::Io));
        // Another worker's image in the same directory is never handed out; the
        // asker's own is.
        let mut t = table(&dir);
        std::fs::write(dir.join("tenant.img"), b"x").unwrap_or_else(|e| panic!("{e}"));
        t.set_images([
            (dir.join("tenant.img").display().to_string(), WorkerId(8)),
            (dir.join("base.img").display().to_string(), WorkerId(7)),
        ]);
        assert_eq!(ask(&t, 7, 1, "tenant.img"), Err(WorkerErrorKind::Invalid));
        assert_eq!(
            ask(&t, 7, 1, "./sub/../tenant.img"),
            Err(WorkerErrorKind::Invalid)
        );
        assert_eq!(ask(&t, 7, 1, "base.img"), Ok(1));
        // Writable opens are refused outright.
        let writable = t.answer(
            WorkerId(7),
            &WorkerAsk::OpenFile {
                node: NodeId(1),
                filename: "base.img".into(),
                writable: true,
            },
        );
        assert_eq!(
            writable.map(|_| ()).map_err(|e| e.kind),
            Err(WorkerErrorKind::Unsupported)
        );
        let _ = std::fs::remove_file(outside);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_the_listener_hands_off_and_only_to_a_known_export() {
        let hand = |export: &str, leftover: usize| NbdHandOff {
            export: export.into(),
            mode: bulkhead_ipc::wire::NbdMode::Structured,
            base_allocation: false,
            allocation_depth: false,
            bitmaps: Vec::new(),
            reply: vec![0; 20],
            leftover: vec![0; leftover],
        };
        let mut t = AskTable::default();
        // No listener (`--isolation kind`): a hand-off is a protocol violation.
        assert!(matches!(
            t.hand_off_target(WorkerId(3), &hand("e", 0)),
            Err(None)
        ));
        t.set_exports(Some(WorkerId(3)), []);
        assert!(matches!(
            t.hand_off_target(WorkerId(4), &hand("e", 0)),
            Err(None)
        ));
        assert!(matches!(
            t.hand_off_target(WorkerId(3), &hand("e", 4097)),
            Err(None)
        ));
        let refused = t.hand_off_target(WorkerId(3), &hand("e", 4096));
        assert!(
            matches!(&refused, Err(Some(e)) if e.kind == WorkerErrorKind::NotFound),
            "{refused:?}"
        );
    }

    #[test]
    fn the_rate_allows_a_burst_then_refuses() {
        let mut r = AskRate::default();
        let granted = (0..200).filter(|_| r.take()).count();
        assert!((64..70).contains(&granted), "{granted}");
    }
}
