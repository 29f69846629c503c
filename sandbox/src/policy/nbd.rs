//! System calls of the NBD export worker: accepting clients on the listening socket the
//! supervisor bound (unix or TCP) and tuning the accepted connections. No socket is
//! ever created, bound or connected here.
//!
//! Part of the seccomp policy (see the parent module).

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::{Table, sys};

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
    ])
}
