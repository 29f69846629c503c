//! The supervisor and the worker runtimes.
//!
//! # Layout
//! - [`supervisor`]: the block graph, workers and command implementations (`Core`),
//!   and the actor that serializes commands.
//! - [`front`]: QMP monitors and client sessions.
//! - [`dispatch`]: QAPI argument checks between a session and the supervisor.
//! - [`events`]: the event bus that fans events out to sessions.
//! - [`version`]: the version bulkhead reports.
//! - [`worker`]: what runs inside a worker process (`bulkhead worker --kind KIND`).
pub mod dispatch;
pub mod events;
pub mod front;
pub mod supervisor;
pub mod version;
pub mod worker;
