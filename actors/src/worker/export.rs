//! What every export front's worker does the same way: know exports by the
//! supervisor's [`ExportKey`], and answer a removal at once or report it finished
//! later ([`WorkerEvent::ExportGone`]) when clients had to be disconnected.

use std::collections::HashMap;
use std::sync::Arc;

use bulkhead_export::Removal;
use bulkhead_ipc::control::ControlChannel;
use bulkhead_ipc::wire::{ExportKey, FromWorker, Reply, WorkerError, WorkerErrorKind, WorkerEvent};

/// A front's own name for each export (NBD: the export name), by key.
pub(crate) struct ExportKeys<N> {
    names: HashMap<ExportKey, N>,
}

impl<N: Clone> ExportKeys<N> {
    pub(crate) fn new() -> ExportKeys<N> {
        ExportKeys {
            names: HashMap::new(),
        }
    }

    /// Refuses a key already in use (the supervisor never reuses one).
    pub(crate) fn check_free(&self, key: ExportKey) -> Result<(), WorkerError> {
        if self.names.contains_key(&key) {
            return Err(WorkerError::new(
                WorkerErrorKind::Invalid,
                libc::EEXIST,
                format!("{key} already exists"),
            ));
        }
        Ok(())
    }

    pub(crate) fn insert(&mut self, key: ExportKey, name: N) {
        self.names.insert(key, name);
    }

    /// The front's name for `key`, or `NotFound` (the supervisor then finishes the
    /// removal: there is nothing left to wait for).
    pub(crate) fn get(&self, key: ExportKey) -> Result<N, WorkerError> {
        self.names.get(&key).cloned().ok_or_else(|| {
            WorkerError::new(
                WorkerErrorKind::NotFound,
                libc::ENOENT,
                format!("{key} is not found"),
            )
        })
    }

    pub(crate) fn remove(&mut self, key: ExportKey) {
        self.names.remove(&key);
    }

    /// The front's server stopped or restarted: no export is left.
    pub(crate) fn clear(&mut self) {
        self.names.clear();
    }
}

/// The reply to `ExportRemove` for an export the front has just unlisted. Like qsd,
/// an export whose clients had to be disconnected is deleted after the command's
/// reply, however fast the disconnect is: then the reply is deferred and
/// `ExportGone` follows once `removal` finishes.
pub(crate) fn removal_reply(
    control: &Arc<ControlChannel>,
    export: ExportKey,
    had_clients: bool,
    removal: Removal,
) -> Reply {
    if !had_clients {
        return Reply::ExportRemoved { deferred: false };
    }
    let control = Arc::clone(control);
    tokio::spawn(async move {
        removal.finished().await;
        let event = FromWorker::Event(WorkerEvent::ExportGone { export });
        if let Err(e) = control.send(&event, &[]).await {
            tracing::warn!(error = %e, "cannot report a finished export removal");
        }
    });
    Reply::ExportRemoved { deferred: true }
}
