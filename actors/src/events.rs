//! The event bus: fans QMP events out to every negotiated monitor session.
//!
//! Runs in the supervisor. Ordering matters: an event a command causes must reach the
//! client before that command's reply. The supervisor awaits the bus's handling of the
//! event before it returns, and the bus pushes the event into each session's output
//! queue synchronously, so the reply (queued later) always follows it.
//!
//! Each session's queue is bounded (`front::output`): a session that leaves more than
//! `HARD_LIMIT` bytes unread is closed rather than buffered without end. Events QEMU
//! rate-limits ([`throttle_period`]) are limited here the same way.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use serde_json::Value;

use crate::front::output::OutQueue;

/// The events bulkhead emits, as `query-qmp-schema` lists them (each must be defined
/// in the QAPI schema files).
pub const EVENTS: &[&str] = &[
    "JOB_STATUS_CHANGE",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_PENDING",
    "BLOCK_EXPORT_DELETED",
    "BLOCK_IMAGE_CORRUPTED",
    "BLOCK_WRITE_THRESHOLD",
];

/// The events QEMU rate-limits (`monitor_qapi_event_conf` in `monitor/monitor.c`,
/// 10.0.2), with their period. Of these, a storage daemon can raise the quorum ones;
/// bulkhead emits none of them yet, but any it ever emits is limited like qsd's.
pub fn throttle_period(event: &str) -> Option<Duration> {
    match event {
        "RTC_CHANGE"
        | "WATCHDOG"
        | "BALLOON_CHANGE"
        | "QUORUM_REPORT_BAD"
        | "QUORUM_FAILURE"
        | "VSERPORT_CHANGE"
        | "MEMORY_DEVICE_SIZE_CHANGE"
        | "HV_BALLOON_STATUS_REPORT" => Some(Duration::from_secs(1)),
        _ => None,
    }
}

/// What QEMU throttles an event by: its name, plus the member that tells instances
/// apart for the events QEMU keys (`qapi_event_throttle_equal`).
fn throttle_key(event: &str, data: Option<&Value>) -> (String, Option<String>) {
    let member = match event {
        "VSERPORT_CHANGE" => Some("id"),
        "QUORUM_REPORT_BAD" => Some("node-name"),
        "MEMORY_DEVICE_SIZE_CHANGE" => Some("qom-path"),
        _ => None,
    };
    let instance = member.and_then(|m| {
        data.and_then(|d| d.get(m))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    (event.to_owned(), instance)
}

/// A throttled event's state while its period runs: the latest event held back.
#[derive(Debug, Default)]
struct Throttled {
    pending: Option<Option<Value>>,
}

/// The event bus actor.
#[derive(Debug, Default)]
pub struct EventBus {
    sessions: HashMap<u64, (OutQueue, bool)>,
    /// Rate-limited events whose period is running (bounded by the number of event
    /// names times their instances, each holding at most one event).
    throttled: HashMap<(String, Option<String>), Throttled>,
}

impl EventBus {
    /// Sends an event to every negotiated session now.
    fn broadcast(&mut self, name: &str, data: Option<Value>) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let (secs, micros) = match now {
            Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_micros())),
            Err(_) => (-1, -1),
        };
        let event = bulkhead_qmp::request::event_message(name, data, secs, micros);
        let (compact, pretty) = (
            crate::front::render(&event, false),
            crate::front::render(&event, true),
        );
        self.sessions.retain(|_, (out, is_pretty)| {
            out.event(if *is_pretty {
                pretty.clone()
            } else {
                compact.clone()
            })
        });
    }

    /// Runs when a throttled event's period ends: sends the held-back event (and
    /// starts a new period), or ends the throttling.
    fn period_over(&mut self, key: (String, Option<String>), ctx: &mut Context<Self>) {
        let Some(state) = self.throttled.get_mut(&key) else {
            return;
        };
        match state.pending.take() {
            Some(data) => {
                self.broadcast(&key.0, data);
                if let Some(period) = throttle_period(&key.0) {
                    ctx.run_later(period, move |bus, ctx| bus.period_over(key, ctx));
                }
            }
            None => {
                self.throttled.remove(&key);
            }
        }
    }
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
    pub out: OutQueue,
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
    fn handle(&mut self, msg: Emit, ctx: &mut Context<Self>) {
        let Some(period) = throttle_period(&msg.name) else {
            self.broadcast(&msg.name, msg.data);
            return;
        };
        // Like `monitor_qapi_event_queue_no_reenter`: the first event of a period goes
        // out now; later ones replace each other until the period ends.
        let key = throttle_key(&msg.name, msg.data.as_ref());
        if let Some(state) = self.throttled.get_mut(&key) {
            state.pending = Some(msg.data);
            return;
        }
        self.broadcast(&msg.name, msg.data);
        self.throttled.insert(key.clone(), Throttled::default());
        ctx.run_later(period, move |bus, ctx| bus.period_over(key, ctx));
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::AsyncBufReadExt;

    async fn next_event(
        lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::DuplexStream>>,
    ) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        match line {
            Ok(Ok(Some(l))) => serde_json::from_str(&l).unwrap_or(Value::Null),
            other => panic!("no event: {other:?}"),
        }
    }

    #[actix::test]
    async fn rate_limited_events_send_the_first_and_the_last_of_a_period_like_qemu() {
        let bus = EventBus::default().start();
        let (out, writer) = OutQueue::new();
        let (client, server) = tokio::io::duplex(1 << 16);
        actix_rt::spawn(OutQueue::write_loop(server, writer));
        let _ = bus
            .send(Subscribe {
                session: 1,
                out,
                pretty: false,
            })
            .await;
        let emit = |name: &str, data: Value| Emit {
            name: name.to_owned(),
            data: Some(data),
        };
        for i in 0..3 {
            let data = json!({"reference": format!("r{i}"), "sector-num": 0, "sectors-count": 1});
            let _ = bus.send(emit("QUORUM_FAILURE", data)).await;
        }
        // Keyed per node: another node's report is not held back by the first one's.
        let _ = bus
            .send(emit("QUORUM_REPORT_BAD", json!({"node-name": "a"})))
            .await;
        let _ = bus
            .send(emit("QUORUM_REPORT_BAD", json!({"node-name": "b"})))
            .await;
        let _ = bus
            .send(emit("BLOCK_EXPORT_DELETED", json!({"id": "e"})))
            .await;
        let mut lines = tokio::io::BufReader::new(client).lines();
        let mut got = Vec::new();
        for _ in 0..5 {
            let e = next_event(&mut lines).await;
            got.push((e["event"].clone(), e["data"].clone()));
        }
        assert_eq!(
            got,
            vec![
                (
                    json!("QUORUM_FAILURE"),
                    json!({"reference": "r0", "sector-num": 0, "sectors-count": 1})
                ),
                (json!("QUORUM_REPORT_BAD"), json!({"node-name": "a"})),
                (json!("QUORUM_REPORT_BAD"), json!({"node-name": "b"})),
                (json!("BLOCK_EXPORT_DELETED"), json!({"id": "e"})),
                // r1 was replaced by r2, which goes out when the period ends.
                (
                    json!("QUORUM_FAILURE"),
                    json!({"reference": "r2", "sector-num": 0, "sectors-count": 1})
                ),
            ]
        );
    }
}
