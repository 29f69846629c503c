//! The engine's error type. Open errors carry QEMU's (and so qsd's) texts verbatim.

use std::io;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image cannot be opened (as asked). `message` is QEMU's text for the same
    /// condition; `errno` what QEMU returns with it (for `error_setg_errno`-style callers).
    #[error("{message}")]
    Open { message: String, errno: i32 },
    /// I/O on the image file, the data file or the backing node failed.
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    /// A metadata inconsistency found at run time: what QEMU's `BLOCK_IMAGE_CORRUPTED`
    /// event reports. `fatal` is true when the image was writable: it is now marked
    /// corrupt in its header and every later request fails with [`Error::Dead`].
    #[error("{message}")]
    Corrupt {
        message: String,
        offset: Option<u64>,
        size: Option<u64>,
        fatal: bool,
    },
    /// A fatal corruption was found earlier; the image takes no more requests.
    #[error("Image is corrupt; no further I/O is possible")]
    Dead,
    /// A request after [`crate::Qcow2::close`].
    #[error("Image is closed")]
    Closed,
    /// A write on an image opened read-only.
    #[error("Image is read-only")]
    ReadOnly,
    /// A request past the end of the image.
    #[error("Request out of range: offset {offset}, length {len}, image size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A request the engine does not do (with QEMU's text where it has one).
    #[error("{0}")]
    Unsupported(String),
    /// A table would outgrow QEMU's limits, or offsets the format cannot express.
    #[error("{0}")]
    TooLarge(String),
    /// Invalid argument (e.g. a compressed write that is not one whole cluster).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The errno QEMU would return for the same failure (positive).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Open { errno, .. } => *errno,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Corrupt { .. } => libc::EIO,
            Error::Dead | Error::Closed => libc::ENOMEDIUM,
            Error::ReadOnly => libc::EPERM,
            Error::OutOfRange { .. } => libc::EIO,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::TooLarge(_) => libc::EFBIG,
            Error::Invalid(_) => libc::EINVAL,
        }
    }

    pub(crate) fn open(errno: i32, message: impl Into<String>) -> Error {
        Error::Open {
            message: message.into(),
            errno,
        }
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `%#x` as C prints it (QEMU's messages): "0" for zero, else "0x…".
pub(crate) fn hx(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
