//! System calls of the `raw` driver beyond the common list: none. A raw node only
//! shifts and bounds requests and passes them to its child. The child, a protocol node,
//! usually lives in the same worker, so the `raw` and `image` worker kinds add the
//! protocol drivers' lines (see `table` in the parent module).
//!
//! Part of the seccomp policy (see the parent module).

use super::Table;

/// The lines of the `raw` worker.
pub fn table() -> Table {
    Ok(Vec::new())
}
