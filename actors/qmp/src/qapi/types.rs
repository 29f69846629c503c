//! Typed argument structs (placeholder while written).
