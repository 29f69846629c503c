//! System calls of the `raw` driver worker beyond the common list: none. A raw node
//! only shifts and bounds requests and passes them to its child, which lives in another
//! worker and is reached over a data channel (covered by the common list).
//!
//! Part of the seccomp policy (see the parent module).

use super::Table;

/// The lines of the `raw` worker.
pub fn table() -> Table {
    Ok(Vec::new())
}
