//! What bulkhead says about its version (QMP greeting and `query-version`).
//!
//! The `qemu` triple is the QEMU release whose QMP behaviour bulkhead reproduces, so
//! management tools that gate features on the QEMU version keep working; `package`
//! names bulkhead itself.

use serde::Serialize;
use serde_json::{Value, json};

/// The QEMU version bulkhead is compatible with.
pub const QEMU_COMPAT: (u32, u32, u32) = (10, 0, 2);

/// `package` in the version info.
pub fn package() -> String {
    format!("bulkhead {}", env!("CARGO_PKG_VERSION"))
}

/// `VersionTriple`.
#[derive(Debug, Clone, Serialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// `VersionInfo`, the `query-version` return value (members in schema order, which
/// is the order they are printed in).
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// The QEMU version bulkhead answers like.
    pub qemu: VersionTriple,
    /// bulkhead's own name and version.
    pub package: String,
}

/// The `query-version` return value.
pub fn query_version() -> VersionInfo {
    let (major, minor, micro) = QEMU_COMPAT;
    VersionInfo {
        qemu: VersionTriple {
            major,
            minor,
            micro,
        },
        package: package(),
    }
}

/// The QMP greeting.
pub fn greeting() -> Value {
    // Serializing these plain structs cannot fail.
    json!({"QMP": {"version": query_version(), "capabilities": ["oob"]}})
}
