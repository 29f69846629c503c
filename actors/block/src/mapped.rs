//! Mapped I/O: moving a node's bytes on its image descriptor from outside the node's
//! worker, for what completes without waiting.
//!
//! An export worker granted a mapping of a node (see `design/data-path.md`, "Mapped
//! I/O") reads and writes the image through a [`MappedFile`] instead of a round trip
//! to the node's worker. Only what finishes at once runs here: reads and writes of a
//! file that lives in memory (tmpfs, ramfs), reads the page cache holds
//! (`RWF_NOWAIT`), and `SEEK_DATA`/`SEEK_HOLE` block status (inline in the file
//! driver too). Everything else returns `None`, and the caller sends the request to
//! the node's worker as before. No thread, no timer, no state beyond a data-run
//! cache: dropping a `MappedFile` between two requests is always safe.
//!
//! The offsets given here are file offsets, checked by the caller against the
//! mapping it was granted; nothing here parses image bytes.

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::FileType;

use crate::file::{
    DataRunCache, DeviceType, FileOpenError, INLINE_MAX, Inline, cached_seek_extents,
    pwrite_full,
};
use crate::io::{Extent, IoResult};

/// An image descriptor read and written in place of the node's worker.
#[derive(Debug)]
pub struct MappedFile {
    fd: OwnedFd,
    inline: Inline,
    data_run: DataRunCache,
    writable: bool,
}

impl MappedFile {
    /// Wraps `fd`, which must be a regular file opened without `O_DIRECT` (the
    /// supervisor grants mappings only for such nodes); `writable`: the descriptor is
    /// open for writing and writes may go through it.
    pub fn new(fd: OwnedFd, writable: bool) -> Result<MappedFile, FileOpenError> {
        let st = rustix::fs::fstat(&fd).map_err(|e| FileOpenError::Os(e.raw_os_error()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(FileOpenError::WrongType);
        }
        Ok(MappedFile {
            inline: Inline::new(fd.as_fd(), DeviceType::Regular, false),
            data_run: DataRunCache::default(),
            fd,
            writable,
        })
    }

    /// Whether a read or write of `len` bytes may be served here (it still may not
    /// be, if the page cache does not hold it).
    pub fn serves(&self, len: usize) -> bool {
        len <= INLINE_MAX
    }

    /// Whether the file lives in memory, so that writes are served here too.
    pub fn in_memory(&self) -> bool {
        self.inline.memory()
    }

    /// Reads `buf.len()` bytes at file offset `offset` (past end of file: zeroes), or
    /// `None` if that would wait (not in the page cache) or is too large to do inline.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Option<IoResult<()>> {
        match self.inline.read(self.fd.as_fd(), buf, offset) {
            Ok(n) if n == buf.len() && n > 0 => Some(Ok(())),
            // Partly read or not at all: the node's worker does it whole.
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Writes `data` at file offset `offset`, or `None` if this mapping does not
    /// write or the write could wait (a file not in memory, or a large one).
    pub fn write(&self, offset: u64, data: &[u8]) -> Option<IoResult<()>> {
        if !self.writable || data.is_empty() || !self.inline.write(data.len()) {
            return None;
        }
        Some(pwrite_full(self.fd.as_fd(), data, offset))
    }

    /// Block status of `[offset, offset + len)` in file offsets: data runs and
    /// holes (`len` > 0), at most 1024 extents; the caller asks again from where it
    /// stopped.
    pub fn block_status(&self, offset: u64, len: u64) -> IoResult<Vec<Extent>> {
        cached_seek_extents(self.fd.as_fd(), &self.data_run, offset, len)
    }

    /// Reads a whole range the way [`MappedFile::read`] does, zero-filling, for tests.
    #[cfg(test)]
    fn read_all(&self, offset: u64, buf: &mut [u8]) -> IoResult<()> {
        crate::file::pread_full(self.fd.as_fd(), buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn shm_file(name: &str, bytes: &[u8]) -> Option<(std::path::PathBuf, OwnedFd)> {
        let dir = std::path::Path::new("/dev/shm");
        if !dir.is_dir() {
            return None;
        }
        let path = dir.join(format!("bulkhead-mapped-{name}-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .ok()?;
        f.write_all(bytes).ok()?;
        Some((path, OwnedFd::from(f)))
    }

    #[test]
    fn a_file_in_memory_is_read_and_written_in_place() {
        let Some((path, fd)) = shm_file("rw", &[7u8; 8192]) else {
            return;
        };
        let m = MappedFile::new(fd, true).expect("regular file");
        assert!(m.in_memory());
        let mut buf = [0u8; 4096];
        assert_eq!(m.read(4096, &mut buf), Some(Ok(())));
        assert!(buf.iter().all(|b| *b == 7));
        assert_eq!(m.write(0, &[9u8; 512]), Some(Ok(())));
        let mut back = [0u8; 512];
        m.read_all(0, &mut back).expect("read");
        assert!(back.iter().all(|b| *b == 9));
        // Past end of file reads as zeroes, like the file driver.
        let mut tail = [1u8; 1024];
        assert_eq!(m.read(8192 - 512, &mut tail), Some(Ok(())));
        assert!(tail[..512].iter().all(|b| *b == 7));
        assert!(tail[512..].iter().all(|b| *b == 0));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_read_only_mapping_never_writes() {
        let Some((path, fd)) = shm_file("ro", &[7u8; 4096]) else {
            return;
        };
        let m = MappedFile::new(fd, false).expect("regular file");
        assert_eq!(m.write(0, &[9u8; 512]), None);
        let mut back = [0u8; 512];
        m.read_all(0, &mut back).expect("read");
        assert!(back.iter().all(|b| *b == 7));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn block_status_finds_holes_and_data() {
        let Some((path, fd)) = shm_file("holes", &[]) else {
            return;
        };
        rustix::fs::ftruncate(&fd, 1 << 20).expect("truncate");
        let m = MappedFile::new(fd, true).expect("regular file");
        assert_eq!(m.write(65536, &[1u8; 4096]), Some(Ok(())));
        let extents = m.block_status(0, 1 << 20).expect("status");
        let total: u64 = extents.iter().map(|e| e.length).sum();
        assert_eq!(total, 1 << 20);
        assert!(!extents[0].data && extents[0].zero);
        assert!(extents.iter().any(|e| e.data));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn only_regular_files_are_mapped() {
        let dev = std::fs::File::open("/dev/null").expect("/dev/null");
        assert!(matches!(
            MappedFile::new(OwnedFd::from(dev), false),
            Err(FileOpenError::WrongType)
        ));
    }
}
