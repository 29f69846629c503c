//! A session's output queue, bounded in bytes.
//!
//! Replies are only produced while the session reads requests, so the reader waits
//! (stops reading, as qsd suspends a monitor) while more than [`SOFT_LIMIT`] bytes are
//! unwritten: a client that sends without reading fills its own socket buffers, not
//! our memory. Events arrive whether or not the client reads; once a session has more
//! than [`HARD_LIMIT`] bytes of events unwritten, the next event closes it instead of
//! growing the queue (only events count: a large reply to a client that reads must not
//! close it; qsd's buffer would grow without bound; we drop the connection, and the
//! monitor serves the next client).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};

/// Unwritten bytes above which a session stops reading requests.
pub const SOFT_LIMIT: usize = 64 * 1024;
/// Unwritten event bytes above which an event closes the session.
pub const HARD_LIMIT: usize = 1024 * 1024;

/// One queued output item of a session.
#[derive(Debug)]
enum Output {
    /// Bytes to write (a full message with its CRLF), and whether they are an event.
    Bytes(Vec<u8>, bool),
    /// Completes once everything queued before it has been written.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct State {
    /// Bytes queued and not yet written.
    queued: AtomicUsize,
    /// The part of `queued` that is events.
    events: AtomicUsize,
    /// The connection failed, or the queue overflowed: nothing more is written.
    closed: AtomicBool,
    /// Woken whenever `queued` shrinks or `closed` is set.
    changed: Notify,
}

impl State {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Waits until `ready()` holds or the queue is closed; true if `ready()`.
    async fn wait(&self, ready: impl Fn(&State) -> bool) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register before checking, so a wake-up between check and await is kept.
            notified.as_mut().enable();
            if self.is_closed() {
                return false;
            }
            if ready(self) {
                return true;
            }
            notified.await;
        }
    }
}

/// The sending side of a session's output queue (cheap to clone; `Send`, so the
/// event bus can hold it).
#[derive(Debug, Clone)]
pub struct OutQueue {
    tx: mpsc::UnboundedSender<Output>,
    state: Arc<State>,
}

/// The writing side: hand it to [`OutQueue::write_loop`].
#[derive(Debug)]
pub struct OutWriter {
    rx: mpsc::UnboundedReceiver<Output>,
    state: Arc<State>,
}

impl OutQueue {
    /// A new, empty queue.
    pub fn new() -> (OutQueue, OutWriter) {
        // Unbounded channel, bounded by the byte accounting in `state`.
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State::default());
        (
            OutQueue {
                tx,
                state: Arc::clone(&state),
            },
            OutWriter { rx, state },
        )
    }

    fn push(&self, bytes: Vec<u8>, event: bool) {
        self.state.queued.fetch_add(bytes.len(), Ordering::AcqRel);
        if event {
            self.state.events.fetch_add(bytes.len(), Ordering::AcqRel);
        }
        if self.tx.send(Output::Bytes(bytes, event)).is_err() {
            self.state.close();
        }
    }

    /// Queues a reply or the greeting. Bounded because the reader waits in
    /// [`OutQueue::writable`] before each request.
    pub fn reply(&self, bytes: Vec<u8>) {
        self.push(bytes, false);
    }

    /// Queues an event; false (and the session is closed) if the client has left
    /// [`HARD_LIMIT`] bytes unread.
    pub fn event(&self, bytes: Vec<u8>) -> bool {
        if self.state.is_closed() {
            return false;
        }
        if self.state.events.load(Ordering::Acquire) + bytes.len() > HARD_LIMIT {
            tracing::warn!(
                limit = HARD_LIMIT,
                "QMP client does not read its output: closing the session"
            );
            self.state.close();
            return false;
        }
        self.push(bytes, true);
        true
    }

    /// Waits until the client has read enough for the next request to be handled;
    /// false if the session is closed.
    pub async fn writable(&self) -> bool {
        self.state
            .wait(|s| s.queued.load(Ordering::Acquire) <= SOFT_LIMIT)
            .await
    }

    /// Completes when the session is closed (write error or overflow).
    pub async fn closed(&self) {
        self.state.wait(|_| false).await;
    }

    /// Waits until everything queued so far has been written (or writing failed).
    pub async fn flush(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Output::Flush(done_tx)).is_ok() {
            let _ = done_rx.await;
        }
    }

    /// Writes queued items until every sender is gone or the session is closed.
    pub async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, mut out: OutWriter) {
        let state = Arc::clone(&out.state);
        let closed = state.wait(|_| false);
        tokio::pin!(closed);
        loop {
            let item = tokio::select! {
                item = out.rx.recv() => item,
                _ = &mut closed => break,
            };
            let Some(item) = item else { break };
            match item {
                Output::Bytes(b, event) => {
                    let ok = tokio::select! {
                        r = w.write_all(&b) => r.is_ok(),
                        _ = &mut closed => false,
                    };
                    state.queued.fetch_sub(b.len(), Ordering::AcqRel);
                    if event {
                        state.events.fetch_sub(b.len(), Ordering::AcqRel);
                    }
                    state.changed.notify_waiters();
                    if !ok {
                        break;
                    }
                    // Flush only when nothing else is queued, so bursts go out together.
                    if out.rx.is_empty() && w.flush().await.is_err() {
                        break;
                    }
                }
                Output::Flush(done) => {
                    let _ = w.flush().await;
                    let _ = done.send(());
                }
            }
        }
        state.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unread_session_stops_taking_requests_and_overflowing_events_close_it() {
        let (q, writer) = OutQueue::new();
        // A writer that never completes: the client does not read.
        let (_keep, stalled) = tokio::io::duplex(16);
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                tokio::task::spawn_local(OutQueue::write_loop(stalled, writer));
                q.reply(vec![b'x'; SOFT_LIMIT + 1]);
                let waited =
                    tokio::time::timeout(std::time::Duration::from_millis(50), q.writable()).await;
                assert!(waited.is_err(), "reader must wait while the queue is full");
                let mut sent = 0;
                while q.event(vec![b'e'; 1000]) {
                    sent += 1;
                    assert!(sent < HARD_LIMIT, "events must stop at the hard limit");
                }
                assert!(!q.writable().await, "the session is closed");
                assert!(!q.event(b"late".to_vec()));
            })
            .await;
    }

    #[tokio::test]
    async fn a_large_unwritten_reply_does_not_count_against_events() {
        let (q, _writer) = OutQueue::new();
        q.reply(vec![b'r'; 2 * HARD_LIMIT]);
        assert!(q.event(b"e\r\n".to_vec()));
    }

    #[tokio::test]
    async fn a_reading_client_gets_everything_in_order() {
        let (q, writer) = OutQueue::new();
        let (mut client, server) = tokio::io::duplex(64);
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let task = tokio::task::spawn_local(OutQueue::write_loop(server, writer));
                q.reply(b"one\r\n".to_vec());
                assert!(q.event(b"two\r\n".to_vec()));
                q.flush().await;
                drop(q);
                let _ = task.await;
                let mut got = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
                    .await
                    .ok();
                assert_eq!(got, b"one\r\ntwo\r\n");
            })
            .await;
    }
}
