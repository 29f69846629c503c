//! Where the engine's bytes live: the image file, an external data file, a backing node.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// Positioned I/O on the image file or on an external data file. Implementations must
/// allow concurrent calls from several threads.
pub trait Storage: Send + Sync {
    /// Fills `buf` from `off`. Bytes past the end of the file read as zeroes.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `buf` at `off`, growing the file if needed.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates a range (a hint: the default does nothing).
    fn discard(&self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// The backing node, read for unallocated clusters and copy-on-write.
pub trait Backing: Send + Sync {
    /// Fills `buf` from `off`; the engine never reads past [`Backing::len`].
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// The backing node's size in bytes (it may be shorter than the image: the rest
    /// reads as zeroes).
    fn len(&self) -> io::Result<u64>;
    /// Whether the backing node is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// [`Storage`] over an owned descriptor (pread/pwrite/fdatasync): the worker receives
/// descriptors and never opens paths.
#[derive(Debug)]
pub struct FdStorage {
    fd: OwnedFd,
}

impl FdStorage {
    pub fn new(fd: OwnedFd) -> FdStorage {
        FdStorage { fd }
    }
}

impl From<std::fs::File> for FdStorage {
    fn from(f: std::fs::File) -> FdStorage {
        FdStorage { fd: f.into() }
    }
}

fn file_of(fd: &OwnedFd) -> std::mem::ManuallyDrop<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: the File borrows the descriptor for the duration of one call and is never
    // dropped (ManuallyDrop), so the descriptor stays owned by `fd`.
    std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd.as_fd().as_raw_fd()) })
}

fn pread_full(f: &std::fs::File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    while !buf.is_empty() {
        match f.read_at(buf, off) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Storage for FdStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        pread_full(&file_of(&self.fd), buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        file_of(&self.fd).write_all_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        file_of(&self.fd).sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(file_of(&self.fd).metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        file_of(&self.fd).set_len(len)
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        // A hint: file systems without hole punching just keep the bytes.
        let _ = r;
        Ok(())
    }
}

impl Backing for FdStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        Storage::read_at(self, buf, off)
    }
    fn len(&self) -> io::Result<u64> {
        Storage::len(self)
    }
}

/// An image held in memory (tests, fuzzing). Writes past the end grow it, up to a cap
/// so that a hostile image cannot make it allocate without bound.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: std::sync::RwLock<Vec<u8>>,
    cap: u64,
}

impl MemStorage {
    /// `cap`: the largest length a write may grow the buffer to (writes beyond fail
    /// with ENOSPC).
    pub fn new(data: Vec<u8>, cap: u64) -> MemStorage {
        MemStorage {
            data: std::sync::RwLock::new(data),
            cap,
        }
    }
    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        let len = d.len() as u64;
        let start = off.min(len) as usize;
        let avail = (len - start as u64).min(buf.len() as u64) as usize;
        buf[..avail].copy_from_slice(&d[start..start + avail]);
        buf[avail..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.cap)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        if (d.len() as u64) < end {
            d.resize(end as usize, 0);
        }
        d[off as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.cap {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }
}
