//! Opening image files the way QEMU's file-posix does, for the supervisor.
//!
//! Runs in the supervisor, which is the only process allowed to open paths; the fd it
//! gets here is then passed to a `file` or `host_device` worker. Paths come from QMP
//! clients or the command line (trusted as much as the supervisor trusts its monitor);
//! they are only handed to `open(2)`, never parsed. Error texts are qsd 10.0.2's.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::file::FileKind;
use crate::io::{IoError, IoResult};

/// Why an image could not be opened; `Display` is qsd's error `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenImageError {
    /// An empty filename.
    #[error("The '{driver}' block driver requires a file name")]
    NoFilename {
        /// `file` or `host_device`.
        driver: &'static str,
    },
    /// `open(2)` failed.
    #[error("Could not open '{path}': {reason}")]
    Open {
        /// The path as the user gave it.
        path: String,
        /// `strerror` of the errno.
        reason: String,
        /// The raw errno.
        errno: i32,
    },
    /// `cache.direct=on` on a filesystem without `O_DIRECT`.
    #[error("Could not open '{path}': filesystem does not support O_DIRECT")]
    NoDirect {
        /// The path as the user gave it.
        path: String,
    },
    /// `driver=file` on something that is not a regular file.
    #[error("'file' driver requires '{path}' to be a regular file")]
    NotRegular {
        /// The path as the user gave it.
        path: String,
    },
    /// `driver=host_device` on something that is not a device.
    #[error("'host_device' driver requires '{path}' to be either a character or block device")]
    NotDevice {
        /// The path as the user gave it.
        path: String,
    },
    /// `fstat` on the freshly opened fd failed.
    #[error("Could not stat '{path}': {reason}")]
    Stat {
        /// The path as the user gave it.
        path: String,
        /// `strerror` of the errno.
        reason: String,
    },
}

/// `strerror` text of an errno, as glibc (and so QEMU) prints it.
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    // std appends " (os error N)"; QEMU prints the bare strerror text.
    match text.rfind(" (os error ") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

/// Opens an image for a `file` (`kind = File`) or `host_device` node as QEMU does:
/// `O_RDONLY` or `O_RDWR`, plus `O_DIRECT` for `cache.direct=on`, close-on-exec, then a
/// type check on the opened fd.
pub fn open_image(
    path: &str,
    kind: FileKind,
    read_only: bool,
    direct: bool,
) -> Result<OwnedFd, OpenImageError> {
    let driver = match kind {
        FileKind::File => "file",
        FileKind::HostDevice => "host_device",
    };
    if path.is_empty() {
        return Err(OpenImageError::NoFilename { driver });
    }
    let open_failed = |e: Errno| OpenImageError::Open {
        path: path.to_string(),
        reason: strerror(e.raw_os_error()),
        errno: e.raw_os_error(),
    };
    // An interior NUL cannot name a file; the kernel would see a shorter path.
    let c_path = CString::new(path).map_err(|_| open_failed(Errno::NOENT))?;
    let access = if read_only {
        OFlags::RDONLY
    } else {
        OFlags::RDWR
    };
    let flags = access
        | OFlags::CLOEXEC
        | if direct {
            OFlags::DIRECT
        } else {
            OFlags::empty()
        };
    let fd = match rustix::fs::open(c_path.as_c_str(), flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if e == Errno::INVAL && direct => {
            // QEMU retries without O_DIRECT to tell a bad flag from a bad path.
            if rustix::fs::open(c_path.as_c_str(), access | OFlags::CLOEXEC, Mode::empty()).is_ok()
            {
                return Err(OpenImageError::NoDirect {
                    path: path.to_string(),
                });
            }
            return Err(open_failed(e));
        }
        Err(e) => return Err(open_failed(e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| OpenImageError::Stat {
        path: path.to_string(),
        reason: strerror(e.raw_os_error()),
    })?;
    match (kind, FileType::from_raw_mode(st.st_mode)) {
        (FileKind::File, FileType::RegularFile) => Ok(fd),
        (FileKind::File, _) => Err(OpenImageError::NotRegular {
            path: path.to_string(),
        }),
        (FileKind::HostDevice, FileType::BlockDevice | FileType::CharacterDevice) => Ok(fd),
        (FileKind::HostDevice, _) => Err(OpenImageError::NotDevice {
            path: path.to_string(),
        }),
    }
}

/// Allocated bytes of an image (`actual-size`): `st_blocks * 512`, as QEMU computes it.
pub fn actual_size(fd: BorrowedFd<'_>) -> IoResult<u64> {
    let st = rustix::fs::fstat(fd).map_err(|e| IoError::Os(e.raw_os_error()))?;
    Ok(u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512))
}

/// What query-named-block-nodes shows for a `file`/`host_device` node's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageFileInfo {
    /// `virtual-size`: the length rounded up to 512 (QEMU counts whole sectors).
    pub virtual_size: u64,
    /// `actual-size`: allocated bytes.
    pub actual_size: u64,
}

/// Size information of an open image, for query-named-block-nodes.
pub fn image_file_info(fd: BorrowedFd<'_>) -> IoResult<ImageFileInfo> {
    let st = rustix::fs::fstat(fd).map_err(|e| IoError::Os(e.raw_os_error()))?;
    let length = match FileType::from_raw_mode(st.st_mode) {
        FileType::BlockDevice => crate::file::block_device_size(fd)?,
        FileType::CharacterDevice => rustix::fs::seek(fd.as_fd(), rustix::fs::SeekFrom::End(0))
            .map_err(|e| IoError::Os(e.raw_os_error()))?,
        _ => u64::try_from(st.st_size).unwrap_or(0),
    };
    Ok(ImageFileInfo {
        virtual_size: length.div_ceil(512).saturating_mul(512),
        actual_size: u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_text(path: &str, kind: FileKind, read_only: bool) -> String {
        match open_image(path, kind, read_only, false) {
            Ok(_) => "opened".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn open_errors_carry_qsd_texts() {
        assert_eq!(
            err_text("/nonexistent/x", FileKind::File, false),
            "Could not open '/nonexistent/x': No such file or directory"
        );
        assert_eq!(
            err_text("/", FileKind::File, false),
            "Could not open '/': Is a directory"
        );
        assert_eq!(
            err_text("/", FileKind::File, true),
            "'file' driver requires '/' to be a regular file"
        );
        assert_eq!(
            err_text("/dev/null", FileKind::File, false),
            "'file' driver requires '/dev/null' to be a regular file"
        );
        assert_eq!(
            err_text("", FileKind::File, false),
            "The 'file' block driver requires a file name"
        );
        assert_eq!(err_text("/dev/null", FileKind::HostDevice, false), "opened");
    }

    #[test]
    fn strerror_matches_glibc_texts() {
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
        assert_eq!(strerror(libc::EACCES), "Permission denied");
    }
}
