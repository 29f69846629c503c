//! The event bus: fans QMP events out to every negotiated monitor session.
//!
//! Runs in the supervisor. Ordering matters: an event a command causes must reach the
//! client before that command's reply. The supervisor awaits the bus's handling of the
//! event before it returns, and the bus pushes the event into each session's output
//! queue synchronously, so the reply (queued later) always follows it.

use std::collections::HashMap;

use actix::prelude::*;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

/// The events bulkhead emits, as `query-qmp-schema` lists them (each must be defined
/// in the QAPI schema files).
pub const EVENTS: &[&str] = &["BLOCK_EXPORT_DELETED", "BLOCK_WRITE_THRESHOLD"];

/// One queued output item of a session.
#[derive(Debug)]
pub enum Output {
    /// Bytes to write (a full message with its CRLF).
    Bytes(Vec<u8>),
    /// Completes once everything queued before it has been written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The event bus actor.
#[derive(Debug, Default)]
pub struct EventBus {
    sessions: HashMap<u64, (UnboundedSender<Output>, bool)>,
}

impl Actor for EventBus {
    type Context = Context<Self>;
}

/// Start delivering events to a session (after its capabilities negotiation).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    /// Session id.
    pub session: u64,
    /// Its output queue.
    pub out: UnboundedSender<Output>,
    /// Whether it prints pretty JSON.
    pub pretty: bool,
}

/// Stop delivering events to a session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Unsubscribe(pub u64);

/// Deliver an event now.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Emit {
    /// Event name.
    pub name: String,
    /// Event data.
    pub data: Option<Value>,
}

impl Handler<Subscribe> for EventBus {
    type Result = ();
    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) {
        self.sessions.insert(msg.session, (msg.out, msg.pretty));
    }
}

impl Handler<Unsubscribe> for EventBus {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        self.sessions.remove(&msg.0);
    }
}

impl Handler<Emit> for EventBus {
    type Result = ();
    fn handle(&mut self, msg: Emit, _: &mut Context<Self>) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let (secs, micros) = match now {
            Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_micros())),
            Err(_) => (-1, -1),
        };
        let event = bulkhead_qmp::request::event_message(&msg.name, msg.data, secs, micros);
        self.sessions.retain(|_, (out, pretty)| {
            out.send(Output::Bytes(crate::front::render(&event, *pretty)))
                .is_ok()
        });
    }
}

/// A cheap handle for emitting events.
#[derive(Debug, Clone)]
pub struct EventSink(pub Addr<EventBus>);

impl EventSink {
    /// Emits an event and waits until every session has it queued.
    pub async fn emit(&self, name: &str, data: Option<Value>) {
        let _ = self
            .0
            .send(Emit {
                name: name.to_string(),
                data,
            })
            .await;
    }
}
