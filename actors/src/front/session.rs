//! One QMP client session: greeting, negotiation, requests, replies and events.

use bulkhead_qmp::json::JsonStreamer;
use bulkhead_qmp::request::{self, ErrorClass};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::gate::{Admission, Gate};
use super::output::OutQueue;
use super::{Front, render};
use crate::events::{Subscribe, Unsubscribe};
use crate::supervisor::actor::Execute;
use crate::supervisor::{After, QmpError, errors};

/// Serves one client until it disconnects (or asks the daemon to quit).
pub async fn run<R, W>(id: u64, mut reader: R, writer: W, pretty: bool, front: &Front)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    let (out, rx) = OutQueue::new();
    let writer_task = tokio::task::spawn_local(OutQueue::write_loop(writer, rx));
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
        // A session closed for not reading its output stops reading at once.
        let n = tokio::select! {
            r = reader.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            () = out.closed() => break,
        };
        for item in parser.feed(&buf[..n]) {
            // Backpressure: the next request waits until the client has read enough
            // of the replies so far (qsd suspends reading the same way).
            if !out.writable().await {
                break 'read;
            }
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
    out.flush().await;
    if quit {
        (front.quit)();
        let mut stopped = front.stopped.clone();
        let _ = tokio::time::timeout(QUIT_CLOSE_WAIT, stopped.wait_for(|s| *s)).await;
    }
    drop(out);
    drop(session);
    let _ = writer_task.await;
}

/// Longest a `quit` connection stays open waiting for the workers to go.
const QUIT_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

struct Session {
    id: u64,
    pretty: bool,
    out: OutQueue,
    /// Everything checked before the supervisor acts (see `gate`).
    gate: Gate,
    front: Front,
}

impl Session {
    fn send(&self, v: &Value) {
        self.out.reply(render(v, self.pretty));
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
                if let Some(result) = self.chardev_command(&command, &args) {
                    return match result {
                        Ok(ret) => (request::success_response(ret, id), After::Continue),
                        Err(e) => Self::error(e, id),
                    };
                }
                match self.front.supervisor.send(Execute { command, args }).await {
                    Ok(Ok((ret, after))) => (request::success_response(ret, id), after),
                    Ok(Err(e)) => Self::error(e, id),
                    Err(_) => Self::error(errors::supervisor_not_running(), id),
                }
            }
        }
    }

    /// Chardevs belong to the front (monitors use them), not to the supervisor core.
    fn chardev_command(
        &self,
        command: &str,
        args: &serde_json::Map<String, Value>,
    ) -> Option<Result<Value, QmpError>> {
        match command {
            "query-chardev" => Some(Ok(self.front.chardevs.borrow().query())),
            "chardev-add" => {
                let added = self.front.chardevs.borrow_mut().add(args);
                Some(added.map(|(ret, background)| {
                    if let Some(bg) = background {
                        let table = std::rc::Rc::clone(&self.front.chardevs);
                        tokio::task::spawn_local(super::chardev::serve_unattached(table, bg));
                    }
                    ret
                }))
            }
            "chardev-remove" => Some(self.front.chardevs.borrow_mut().remove(args)),
            _ => None,
        }
    }
}
