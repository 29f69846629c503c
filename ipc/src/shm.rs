//! Sealed shared-memory regions: a memfd the supervisor creates at a fixed size and
//! seals against resizing, so that a worker cannot truncate it under the supervisor's
//! mapping (which would `SIGBUS` it); both ends check size and seals before mapping.
//! The statistics regions and dirty bitmaps live in such regions.

use std::ffi::CStr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;

/// Why a region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// A system call failed.
    #[error("shared memory region: {0}")]
    Os(#[from] rustix::io::Errno),
    /// The memfd handed in is not a sealed region of the expected size.
    #[error("shared memory region refused: {0}")]
    Refused(&'static str),
}

/// Creates a zeroed region of `len` bytes, sealed against shrinking and growing.
pub fn create_sealed(name: &CStr, len: usize) -> Result<OwnedFd, ShmError> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    let fd = match rustix::fs::memfd_create(name, flags | MemfdFlags::NOEXEC_SEAL) {
        Ok(fd) => fd,
        // Kernels before 6.3 do not know MFD_NOEXEC_SEAL.
        Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(name, flags)?,
        Err(e) => return Err(e.into()),
    };
    rustix::fs::ftruncate(&fd, len as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// Maps a region read-write after checking it has exactly `len` bytes and cannot be
/// resized any more. The caller unmaps it ([`unmap`]) when done.
pub fn map_sealed(fd: BorrowedFd<'_>, len: usize) -> Result<NonNull<u8>, ShmError> {
    map_checked(fd, len, true)
}

/// [`map_sealed`], read-only (for a descriptor opened read-only: a store faults).
pub fn map_sealed_read_only(fd: BorrowedFd<'_>, len: usize) -> Result<NonNull<u8>, ShmError> {
    map_checked(fd, len, false)
}

/// A read-only descriptor of the region `fd` (a new open file description, through
/// `/proc/self/fd`): whoever gets it can map the region only for reading (a
/// sandboxed worker opens no file, so it cannot reopen the region through `/proc`).
pub fn read_only_copy(fd: BorrowedFd<'_>) -> Result<OwnedFd, ShmError> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

fn map_checked(fd: BorrowedFd<'_>, len: usize, write: bool) -> Result<NonNull<u8>, ShmError> {
    use rustix::fs::SealFlags;
    let st = rustix::fs::fstat(fd)?;
    if u64::try_from(st.st_size).ok() != Some(len as u64) || len == 0 {
        return Err(ShmError::Refused("wrong size"));
    }
    let seals = rustix::fs::fcntl_get_seals(fd)?;
    if !seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL) {
        return Err(ShmError::Refused("not sealed against resizing"));
    }
    // SAFETY: a fresh shared mapping of a sealed memfd of exactly this size, with no
    // address hint, so nothing existing is replaced.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            if write {
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE
            } else {
                rustix::mm::ProtFlags::READ
            },
            rustix::mm::MapFlags::SHARED,
            fd,
            0,
        )?
    };
    NonNull::new(ptr.cast::<u8>()).ok_or(ShmError::Refused("null"))
}

/// Unmaps what [`map_sealed`] returned.
///
/// # Safety
/// `base` and `len` are a mapping [`map_sealed`] returned, and nothing refers into it
/// any more.
pub unsafe fn unmap(base: NonNull<u8>, len: usize) {
    // SAFETY: as the caller promises.
    let _ = unsafe { rustix::mm::munmap(base.as_ptr().cast(), len) };
}
