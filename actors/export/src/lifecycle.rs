//! An export's life in the worker that serves it: clients attach to it, a hard
//! removal (or the front shutting down) closes it, and the removal is complete once
//! the last client, and so the last request touching the node, is gone. That moment
//! is when the worker reports the export gone and the supervisor emits
//! `BLOCK_EXPORT_DELETED`.

use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use crate::memory::EXPORT_BUFFER_BYTES;

/// The state every export has whatever its front: attached clients, the closing
/// flag, and the export's share of request buffer memory. Immutable apart from these.
#[derive(Debug)]
pub struct Lifecycle {
    /// Number of attached clients; watched by removals.
    clients: watch::Sender<usize>,
    /// Set once on hard removal or shutdown; attached connections select on it.
    closing: watch::Sender<bool>,
    /// Bytes of request buffers all the export's connections may hold at once
    /// ([`EXPORT_BUFFER_BYTES`]).
    memory: Arc<Semaphore>,
}

impl Default for Lifecycle {
    fn default() -> Lifecycle {
        Lifecycle::new()
    }
}

impl Lifecycle {
    /// A new export: no client, not closing, its whole buffer budget free.
    pub fn new() -> Lifecycle {
        Lifecycle {
            clients: watch::Sender::new(0),
            closing: watch::Sender::new(false),
            memory: Arc::new(Semaphore::new(EXPORT_BUFFER_BYTES)),
        }
    }

    /// Number of attached clients.
    pub fn clients(&self) -> usize {
        *self.clients.borrow()
    }

    /// Closes the export: every attached connection stops (hard removal, shutdown).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// A receiver whose value turns `true` once the export is closed.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// What a removal waits for: the last client gone.
    pub fn removal(&self) -> Removal {
        Removal {
            clients: self.clients.subscribe(),
        }
    }

    /// The export's request buffer budget (see [`crate::ConnBounds::reserve`]).
    pub(crate) fn memory(&self) -> &Arc<Semaphore> {
        &self.memory
    }
}

/// A client's hold on export `T`: counted from the moment the front accepts the
/// client for this export until the connection and all its requests are finished.
pub struct Attachment<T: AsRef<Lifecycle>> {
    /// The export.
    pub export: Arc<T>,
}

impl<T: AsRef<Lifecycle>> Attachment<T> {
    /// Counts a client on `export`. A front that must not race a safe removal takes
    /// this under the lock of its export table.
    pub fn new(export: Arc<T>) -> Attachment<T> {
        (*export).as_ref().clients.send_modify(|n| *n += 1);
        Attachment { export }
    }
}

impl<T: AsRef<Lifecycle>> Drop for Attachment<T> {
    fn drop(&mut self) {
        (*self.export)
            .as_ref()
            .clients
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resolves once the last client of a removed export has gone, so a deferred
/// delete (qsd's `BLOCK_EXPORT_DELETED` after a hard `block-export-del`) can
/// complete and the node can be released.
#[derive(Debug)]
pub struct Removal {
    clients: watch::Receiver<usize>,
}

impl Removal {
    /// Whether no client is attached any more.
    pub fn is_finished(&self) -> bool {
        *self.clients.borrow() == 0
    }

    /// Waits until no client is attached any more (at once if none was).
    pub async fn finished(mut self) {
        // An error means the export's sender is gone, i.e. the export and all
        // its clients were dropped: also finished.
        let _ = self.clients.wait_for(|n| *n == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Export(Lifecycle);
    impl AsRef<Lifecycle> for Export {
        fn as_ref(&self) -> &Lifecycle {
            &self.0
        }
    }

    #[tokio::test]
    async fn removal_finishes_when_the_last_client_detaches() {
        let export = Arc::new(Export(Lifecycle::new()));
        let a = Attachment::new(export.clone());
        let b = Attachment::new(export.clone());
        assert_eq!(export.0.clients(), 2);
        let mut closing = export.0.closing();
        export.0.close();
        assert!(*closing.borrow_and_update());
        let removal = export.0.removal();
        assert!(!removal.is_finished());
        drop(a);
        assert!(!removal.is_finished());
        drop(b);
        assert!(removal.is_finished());
        removal.finished().await;
    }
}
