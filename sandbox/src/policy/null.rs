//! System calls of the `null-co` and `null-aio` driver workers beyond the common list:
//! none. `latency-ns` sleeps on a tokio timer, which the runtime's epoll timeout and
//! futexes (common list) implement.
//!
//! Part of the seccomp policy (see the parent module).

use super::Table;

/// The lines of the `null-co` and `null-aio` workers.
pub fn table() -> Table {
    Ok(Vec::new())
}
