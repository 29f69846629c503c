//! The actix face of the supervisor: one actor owning [`Core`], so commands from all
//! monitors run one at a time and worker deaths are handled between commands.
//!
//! Handlers stay thin: they hand the message to `Core` and return its answer. A command
//! takes `Core` out of the actor for its duration (`AtomicResponse` guarantees no other
//! message is handled meanwhile) and puts it back when done.

use std::rc::Rc;

use actix::prelude::*;
use serde_json::{Map, Value};

use bulkhead_ipc::wire::{OpId, WorkerEvent, WorkerId};

use super::workers::{EventTicket, WorkerDied};
use super::{After, Core, Isolation, QmpError};
use crate::events::EventSink;

/// The supervisor actor.
#[derive(Debug)]
pub struct SupervisorActor {
    core: Option<Core>,
    events: EventSink,
    isolation: Isolation,
}

impl SupervisorActor {
    /// Creates the actor; `Core` is built in `started` so it can address the actor.
    pub fn new(events: EventSink, isolation: Isolation) -> SupervisorActor {
        SupervisorActor {
            core: None,
            events,
            isolation,
        }
    }

    /// Runs `work` on `Core` with nothing else handled meanwhile: `Core` leaves the
    /// actor for the duration and comes back with the result. (`busy` answers in the
    /// impossible case that `Core` is already out.)
    fn on_core<R, F, Fut>(&mut self, busy: R, work: F) -> AtomicResponse<Self, R>
    where
        R: 'static,
        F: FnOnce(Core) -> Fut,
        Fut: std::future::Future<Output = (Core, R)> + 'static,
    {
        let Some(core) = self.core.take() else {
            return AtomicResponse::new(Box::pin(actix::fut::ready(busy)));
        };
        AtomicResponse::new(Box::pin(work(core).into_actor(self).map(
            |(core, r), act, _| {
                act.core = Some(core);
                r
            },
        )))
    }
}

impl Actor for SupervisorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let me = ctx.address();
        let on_death: Rc<dyn Fn(WorkerDied)> = Rc::new(move |d| me.do_send(d));
        let me = ctx.address();
        let on_event: Rc<dyn Fn(WorkerId, WorkerEvent, EventTicket)> =
            Rc::new(move |id, e, ticket| me.do_send(FromWorkerEvent(id, e, ticket)));
        let me = ctx.address();
        let on_job: Rc<dyn Fn(String, OpId)> = Rc::new(move |id, op| me.do_send(JobStep(id, op)));
        self.core = Some(Core::new(
            self.events.clone(),
            self.isolation,
            on_event,
            on_death,
            on_job,
        ));
    }
}

impl Message for WorkerDied {
    type Result = ();
}

impl Handler<WorkerDied> for SupervisorActor {
    type Result = AtomicResponse<Self, ()>;

    /// Restarting (and replaying state) runs like a command: nothing else is handled
    /// meanwhile, so no command sees a half-restored worker.
    fn handle(&mut self, msg: WorkerDied, _: &mut Context<Self>) -> Self::Result {
        self.on_core((), |mut core| async move {
            core.worker_died(&msg).await;
            (core, ())
        })
    }
}

/// A job's copy ended: the job takes its next step, between commands.
#[derive(Debug)]
pub struct JobStep(pub String, pub OpId);

impl Message for JobStep {
    type Result = ();
}

impl Handler<JobStep> for SupervisorActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: JobStep, _: &mut Context<Self>) -> Self::Result {
        self.on_core((), |mut core| async move {
            core.job_step(&msg.0, msg.1).await;
            (core, ())
        })
    }
}

/// An unsolicited worker event, handled between commands.
#[derive(Debug)]
pub struct FromWorkerEvent(pub WorkerId, pub WorkerEvent, pub EventTicket);

impl Message for FromWorkerEvent {
    type Result = ();
}

impl Handler<FromWorkerEvent> for SupervisorActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: FromWorkerEvent, _: &mut Context<Self>) -> Self::Result {
        self.on_core((), |mut core| async move {
            let FromWorkerEvent(from, event, _ticket) = msg;
            core.worker_event(from, event).await;
            (core, ())
        })
    }
}

/// Run one QMP command (arguments already validated).
#[derive(Debug)]
pub struct Execute {
    /// Command name.
    pub command: String,
    /// Arguments.
    pub args: Map<String, Value>,
}

impl Message for Execute {
    type Result = Result<(Value, After), QmpError>;
}

impl Handler<Execute> for SupervisorActor {
    type Result = AtomicResponse<Self, Result<(Value, After), QmpError>>;

    fn handle(&mut self, msg: Execute, _: &mut Context<Self>) -> Self::Result {
        let busy = Err(super::errors::supervisor_busy());
        self.on_core(busy, |mut core| async move {
            let r = core.execute(&msg.command, msg.args).await;
            (core, r)
        })
    }
}

/// The command line has run; start serving.
#[derive(Debug)]
pub struct StartupComplete;

impl Message for StartupComplete {
    type Result = Result<(), QmpError>;
}

impl Handler<StartupComplete> for SupervisorActor {
    type Result = AtomicResponse<Self, Result<(), QmpError>>;

    fn handle(&mut self, _: StartupComplete, _: &mut Context<Self>) -> Self::Result {
        let busy = Err(super::errors::supervisor_busy());
        self.on_core(busy, |mut core| async move {
            let r = core.startup_complete().await;
            (core, r)
        })
    }
}

/// Shut down: stop every worker. Sent once, when the daemon exits.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for SupervisorActor {
    type Result = AtomicResponse<Self, ()>;
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.on_core((), |mut core| async move {
            // Exports go first, then nodes close (a format writes back what a clean
            // close writes, as qsd's quit does), within a bound; then every worker goes.
            // Stopped on purpose: reaped quietly (no "worker process ended" warning).
            for w in core.workers().filter(|w| !w.kind().hosts_nodes()) {
                w.retire();
            }
            core.close_all_nodes().await;
            core.stop();
            for w in core.workers() {
                w.retire();
            }
            // Gone (reaped) before the daemon exits: their descriptors, and with them
            // the images' locks, are released by then, as when qsd exits.
            let until = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            while core.workers().any(|w| w.is_alive()) && tokio::time::Instant::now() < until {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            (core, ())
        })
    }
}
