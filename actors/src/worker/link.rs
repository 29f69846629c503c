//! The worker's side of the control channel: requests from the supervisor go to the
//! worker's handler one at a time, while answers to the worker's own questions
//! ([`FromWorker::Ask`]) are routed to whoever asked, so a handler may ask the
//! supervisor something (open a backing file) in the middle of a request.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use bulkhead_ipc::control::{ChannelError, ControlChannel};
use bulkhead_ipc::wire::{
    Answer, FromWorker, Request, SupervisorMessage, WorkerAsk, WorkerError, WorkerErrorKind,
};
use tokio::sync::{mpsc, oneshot};

/// Requests read ahead of the handler. The supervisor sends one at a time; a few more
/// (never more than this) wait here.
const REQUEST_QUEUE: usize = 16;

type Waiting = Mutex<HashMap<u64, oneshot::Sender<(Result<Answer, WorkerError>, Vec<OwnedFd>)>>>;

/// Asking the supervisor, from any task of the worker.
pub(crate) struct Link {
    chan: Arc<ControlChannel>,
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    next: Mutex<u64>,
    waiting: Waiting,
}

impl Link {
    /// Starts reading `chan`: returns the link and the queue of the supervisor's
    /// requests (closed when the supervisor goes away or breaks the protocol).
    pub(crate) fn start(
        chan: Arc<ControlChannel>,
    ) -> (Arc<Link>, mpsc::Receiver<(Request, Vec<OwnedFd>)>) {
        let link = Arc::new(Link {
            chan: Arc::clone(&chan),
            next: Mutex::new(1),
            waiting: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let reader = Arc::clone(&link);
        tokio::spawn(async move {
            if let Err(e) = reader.read(tx).await {
                tracing::warn!(error = %e, "control channel ended");
            }
            // Nobody answers any more: wake every asker with an error.
            reader
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        });
        (link, rx)
    }

    async fn read(&self, tx: mpsc::Sender<(Request, Vec<OwnedFd>)>) -> Result<(), ChannelError> {
        loop {
            match self.chan.recv::<SupervisorMessage>().await {
                Ok((SupervisorMessage::Request(req), fds)) => {
                    if tx.send((req, fds)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok((SupervisorMessage::Answer { id, result }, fds)) => {
                    let waiter = self
                        .waiting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    if let Some(w) = waiter {
                        let _ = w.send((result, fds));
                    }
                }
                Err(e) if e.is_closed() => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks the supervisor `body` and waits for the answer and its descriptors.
    /// (Format drivers with backing files will ask; today only the test hooks do.)
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    pub(crate) async fn ask(&self, body: WorkerAsk) -> Result<(Answer, Vec<OwnedFd>), WorkerError> {
        let id = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let gone = || WorkerError::new(WorkerErrorKind::Io, libc::EPIPE, "supervisor gone");
        if self
            .chan
            .send(&FromWorker::Ask { id, body }, &[])
            .await
            .is_err()
        {
            self.waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(gone());
        }
        match rx.await {
            Ok((Ok(answer), fds)) => Ok((answer, fds)),
            Ok((Err(e), _)) => Err(e),
            Err(_) => Err(gone()),
        }
    }

    /// Sends a message that is not an answer to anything (a reply, an event).
    pub(crate) async fn send(
        &self,
        msg: &FromWorker,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        self.chan.send(msg, fds).await
    }
}
