//! What bulkhead says about its version (QMP greeting and `query-version`).
//!
//! The `qemu` triple is the QEMU release whose QMP behaviour bulkhead reproduces, so
//! management tools that gate features on the QEMU version keep working; `package`
//! names bulkhead itself.

use serde_json::{Value, json};

/// The QEMU version bulkhead is compatible with.
pub const QEMU_COMPAT: (u32, u32, u32) = (10, 0, 2);

/// `package` in the version info.
pub fn package() -> String {
    format!("bulkhead {}", env!("CARGO_PKG_VERSION"))
}

/// The `query-version` return value (VersionInfo, members in schema order).
pub fn query_version() -> Value {
    let (major, minor, micro) = QEMU_COMPAT;
    json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": package()})
}

/// The QMP greeting.
pub fn greeting() -> Value {
    json!({"QMP": {"version": query_version(), "capabilities": ["oob"]}})
}
