//! One QMP client session: greeting, negotiation, requests, replies and events.

use bulkhead_qmp::json::JsonStreamer;
use bulkhead_qmp::request::{self, ErrorClass};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::gate::{Admission, Gate};
use super::{Front, render};
use crate::events::{Output, Subscribe, Unsubscribe};
use crate::supervisor::actor::Execute;
use crate::supervisor::{After, QmpError};

/// Serves one client until it disconnects (or asks the daemon to quit).
pub async fn run<R, W>(id: u64, mut reader: R, writer: W, pretty: bool, front: &Front)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    let (out, rx) = mpsc::unbounded_channel::<Output>();
    let writer_task = tokio::task::spawn_local(write_loop(writer, rx));
    let mut session = Session {
        id,
        pretty,
        out: out.clone(),
        gate: Gate::default(),
        front: front.clone(),
    };
    session.send(&crate::version::greeting());

    let mut parser = JsonStreamer::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut quit = false;
    'read: loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for item in parser.feed(&buf[..n]) {
            let reply = match item {
                Err(e) => Some(request::error_response(
                    ErrorClass::GenericError,
                    &e.to_string(),
                    None,
                )),
                Ok(v) => match session.handle(v).await {
                    (reply, After::Quit) => {
                        session.send(&reply);
                        quit = true;
                        break 'read;
                    }
                    (reply, After::Continue) => Some(reply),
                },
            };
            if let Some(r) = reply {
                session.send(&r);
            }
        }
    }
    front.bus.do_send(Unsubscribe(id));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let _ = out.send(Output::Flush(done_tx));
    let _ = done_rx.await;
    drop(out);
    drop(session);
    let _ = writer_task.await;
    if quit {
        (front.quit)();
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::UnboundedReceiver<Output>) {
    while let Some(item) = rx.recv().await {
        match item {
            Output::Bytes(b) => {
                if w.write_all(&b).await.is_err() {
                    break;
                }
                // Flush only when nothing else is queued, so bursts go out together.
                if rx.is_empty() && w.flush().await.is_err() {
                    break;
                }
            }
            Output::Flush(done) => {
                let _ = w.flush().await;
                let _ = done.send(());
            }
        }
    }
}

struct Session {
    id: u64,
    pretty: bool,
    out: mpsc::UnboundedSender<Output>,
    gate: Gate,
    front: Front,
}

impl Session {
    fn send(&self, v: &Value) {
        let _ = self.out.send(Output::Bytes(render(v, self.pretty)));
    }

    fn error(e: QmpError, id: Option<Value>) -> (Value, After) {
        (
            request::error_response(e.class, &e.desc, id),
            After::Continue,
        )
    }

    /// Handles one parsed JSON value; returns the reply to send.
    async fn handle(&mut self, v: Value) -> (Value, After) {
        match self.gate.admit(v) {
            Admission::Reply(reply) => (reply, After::Continue),
            Admission::Negotiated(reply) => {
                self.front.bus.do_send(Subscribe {
                    session: self.id,
                    out: self.out.clone(),
                    pretty: self.pretty,
                });
                (reply, After::Continue)
            }
            Admission::Execute { command, args, id } => {
                match self.front.supervisor.send(Execute { command, args }).await {
                    Ok(Ok((ret, after))) => (request::success_response(ret, id), after),
                    Ok(Err(e)) => Self::error(e, id),
                    Err(_) => Self::error(QmpError::generic("The supervisor is not running"), id),
                }
            }
        }
    }
}
