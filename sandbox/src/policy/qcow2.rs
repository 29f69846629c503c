//! System calls of the `qcow2` driver beyond the common list: none. The engine parses
//! the image and moves its bytes through its children (the file child, a protocol node
//! in the same worker, whose lines the format kinds add; see `table` in the parent
//! module), and (de)compresses clusters in memory. Its format threads are started
//! before the filter.
//!
//! Part of the seccomp policy (see the parent module).

use super::Table;

/// The lines of the `qcow2` worker.
pub fn table() -> Table {
    Ok(Vec::new())
}
