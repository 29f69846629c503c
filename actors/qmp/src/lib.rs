//! The QMP wire format and QAPI argument checking, as qemu-storage-daemon does them.
//!
//! This crate is pure: no I/O, no actors, no processes. It runs in the supervisor and
//! handles untrusted bytes from QMP clients and the command line.
//!
//! # Layout
//! - [`json`]: QEMU's JSON dialect: a streaming lexer/parser with QEMU's error texts and
//!   recovery, and a writer that emits members in QDict hash order, ASCII-only.
//! - [`request`]: the request envelope (`execute`, `arguments`, `id`, `exec-oob`) checks.
//! - [`qapi`]: the QAPI schema as data and the input visitor that checks arguments
//!   against it (QMP JSON and command-line keyval flavours), with qsd's error texts.
//! - [`keyval`]: QEMU's `key=value,a.b=c` command-line syntax.
//! - [`qdict`]: QEMU's QDict member order, which every object qsd prints follows.

pub mod json;
pub mod keyval;
pub mod qdict;
pub mod qapi;
pub mod request;
