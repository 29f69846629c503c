//! System calls of the `file` and `host_device` driver workers: positioned I/O,
//! syncing, hole punching and extent queries on image descriptors the supervisor
//! opened, and the block-device ioctls QEMU's file-posix driver uses.
//!
//! Part of the seccomp policy (see the parent module). The calls run on the I/O
//! threads (`bulkhead_block::threads`) started before the filter.

use super::{Table, arg_in, sys};

/// `BLKGETSIZE64`: size of a block device.
pub const BLKGETSIZE64: u64 = 0x8008_1272;
/// `BLKDISCARD`: discard a range of a block device.
pub const BLKDISCARD: u64 = 0x1277;
/// `BLKZEROOUT`: zero a range of a block device.
pub const BLKZEROOUT: u64 = 0x127f;

/// The lines of the `file` and `host_device` workers.
pub fn table() -> Table {
    Ok(vec![
        sys!(SYS_pread64, "block::file: reads (pread_full)"),
        sys!(SYS_pwrite64, "block::file: writes (pwrite_full)"),
        sys!(SYS_preadv2 if arg_in(5, &[libc::RWF_NOWAIT as u64])?, "block::file: a read tried inline first with RWF_NOWAIT (page-cache hits only); flags are the sixth argument after pos_l, pos_h"),
        sys!(
            SYS_fstatfs,
            "block::file: at open, whether the image lives in memory (tmpfs)"
        ),
        sys!(SYS_fdatasync, "block::file: flush, FUA writes"),
        sys!(
            SYS_fsync,
            "block::file: flush where fdatasync is not enough"
        ),
        sys!(
            SYS_fallocate,
            "block::file: write-zeroes and discard (punch hole, zero range)"
        ),
        sys!(
            SYS_lseek,
            "block::file: SEEK_DATA/SEEK_HOLE block status; character device size"
        ),
        sys!(SYS_ftruncate, "block::file: block_resize of a regular file"),
        #[cfg(target_arch = "x86_64")]
        sys!(
            SYS_fstat,
            "block::file: size and type of an image at open and resize"
        ),
        sys!(
            SYS_statx,
            "block::file: fstat through statx (AT_EMPTY_PATH) on newer C libraries"
        ),
        sys!(
            SYS_newfstatat,
            "block::file: fstat through fstatat(AT_EMPTY_PATH)"
        ),
        sys!(SYS_ioctl if arg_in(1, &[BLKGETSIZE64, BLKDISCARD, BLKZEROOUT])?, "block::file: host_device size, discard, write-zeroes"),
    ])
}
