//! Helpers shared by the integration tests: scratch directories and image files.

#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use bulkhead_block::file::FileKind;
use bulkhead_block::posix::open_image;

/// A scratch directory removed when dropped.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("bulkhead-block-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("cannot create {}: {e}", dir.display());
        }
        Scratch { dir }
    }

    /// A sparse file of `len` bytes.
    pub fn sparse(&self, name: &str, len: u64) -> PathBuf {
        let path = self.dir.join(name);
        let file = match std::fs::File::create(&path) {
            Ok(f) => f,
            Err(e) => panic!("cannot create {}: {e}", path.display()),
        };
        if let Err(e) = file.set_len(len) {
            panic!("cannot size {}: {e}", path.display());
        }
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn path_str(path: &Path) -> &str {
    match path.to_str() {
        Some(s) => s,
        None => panic!("non-UTF-8 scratch path"),
    }
}

pub fn open(path: &Path, read_only: bool, direct: bool) -> OwnedFd {
    match open_image(path_str(path), FileKind::File, read_only, direct) {
        Ok(fd) => fd,
        Err(e) => panic!("open_image failed: {e}"),
    }
}

pub fn read_back(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    match std::fs::read(path) {
        Ok(data) => {
            let mut out = vec![0u8; len];
            let end = data.len().min(offset + len);
            if offset < end {
                out[..end - offset].copy_from_slice(&data[offset..end]);
            }
            out
        }
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}
