//! System calls of the NBD export worker: accepting clients on the listening socket the
//! supervisor bound (unix or TCP) and tuning the accepted connections, and mapped
//! I/O: reads, writes and extent queries on image descriptors the supervisor granted
//! (`bulkhead_block::mapped`). No socket is ever created, bound or connected here,
//! and no file opened, resized, synced or punched.
//!
//! Part of the seccomp policy (see the parent module).

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::{Table, arg_in, sys};

/// The lines of the `nbd` worker.
pub fn table() -> Table {
    Ok(vec![
        sys!(
            SYS_accept4,
            "nbd::server: accepting a client on the inherited listener"
        ),
        sys!(
            SYS_getsockname,
            "worker::nbd: telling a unix listener from a TCP one"
        ),
        sys!(
            SYS_getpeername,
            "std/tokio: peer address of an accepted client"
        ),
        sys!(SYS_setsockopt if vec![SeccompRule::new(vec![
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::IPPROTO_TCP as u64)?,
            SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::TCP_NODELAY as u64)?,
        ])?], "nbd::server: TCP_NODELAY on an accepted TCP client"),
        sys!(
            SYS_pread64,
            "block::mapped: mapped reads of an image in memory"
        ),
        sys!(
            SYS_pwrite64,
            "block::mapped: mapped writes of an image in memory"
        ),
        sys!(SYS_preadv2 if arg_in(5, &[libc::RWF_NOWAIT as u64])?, "block::mapped: mapped reads of page-cache hits (RWF_NOWAIT only); flags are the sixth argument after pos_l, pos_h"),
        sys!(
            SYS_lseek,
            "block::mapped: SEEK_DATA/SEEK_HOLE block status of a sparse read"
        ),
        sys!(
            SYS_fstatfs,
            "block::mapped: at grant, whether the image lives in memory (tmpfs)"
        ),
        sys!(
            SYS_statx,
            "block::mapped: at grant, the image's type through statx on newer C libraries"
        ),
        sys!(
            SYS_newfstatat,
            "block::mapped: at grant, the image's type through fstatat(AT_EMPTY_PATH)"
        ),
    ])
}
