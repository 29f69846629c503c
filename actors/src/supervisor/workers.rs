//! Starting, calling and watching worker processes (supervisor side).
//!
//! A worker is the same binary re-executed (`exec`, never a bare fork of our
//! multi-threaded process) with its control socket on descriptor 3. Everything it sends
//! is untrusted: replies must answer an id we asked, anything else (garbage, an
//! unexpected message, a reply to an unknown id) gets the worker killed. No call waits
//! on a worker without a deadline, so a hung worker cannot stall QMP.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::Stdio;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bulkhead_ipc::control::{ChannelError, ControlChannel};
use bulkhead_ipc::fd;
use bulkhead_ipc::wire::{
    Answer, FromWorker, Reply, Request, SupervisorMessage, ToWorker, WorkerAsk, WorkerError,
    WorkerErrorKind, WorkerEvent, WorkerId, WorkerKind,
};
use tokio::sync::oneshot;

use super::asks::{AskRate, SharedAskTable};
use super::ops::{SharedOpTable, Verdict};

/// How long a worker may take to say `Ready`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Most events from one worker the supervisor has not handled yet. A worker that
/// sends faster than the supervisor handles is flooding it and is killed, so a peer
/// cannot grow the supervisor's mailbox without bound.
pub const MAX_PENDING_EVENTS: usize = 64;

/// One event of a worker in the supervisor's mailbox; dropping it (once the event is
/// handled) frees its place under [`MAX_PENDING_EVENTS`].
#[derive(Debug)]
pub struct EventTicket(Arc<AtomicUsize>);

impl Drop for EventTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Hand-offs of one NBD listener being passed on at once (the listener itself waits
/// beyond 64; more means it misbehaves).
const MAX_HAND_OFFS: usize = 64;

/// How long a worker may take to answer one control request. Control requests do no
/// bulk I/O; anything slower than this is a hung worker.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an idle worker is pinged (`BULKHEAD_HEARTBEAT_MS` overrides it, for
/// tests); a ping unanswered for [`CALL_TIMEOUT`] gets the worker killed as hung, even
/// when no command is waiting for it.
const HEARTBEAT: Duration = Duration::from_secs(5);

fn heartbeat_interval() -> Duration {
    std::env::var("BULKHEAD_HEARTBEAT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(HEARTBEAT, Duration::from_millis)
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Creating the socket failed.
    #[error("cannot create control socket: {0}")]
    Socket(#[from] fd::FdError),
    /// exec failed.
    #[error("cannot start worker process: {0}")]
    Exec(std::io::Error),
    /// The worker did not come up properly.
    #[error("worker did not start: {0}")]
    Handshake(String),
}

/// Why a call to a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The worker is dead (or died during the call).
    #[error("worker {0} is not running")]
    Dead(WorkerKind),
    /// The worker did not answer in time; it has been killed.
    #[error("worker {0} did not answer in time")]
    Timeout(WorkerKind),
    /// The worker answered with an error.
    #[error("worker error: {0}")]
    Worker(WorkerError),
    /// Sending failed.
    #[error("cannot send to worker: {0}")]
    Channel(#[from] ChannelError),
}

type Pending = Rc<RefCell<HashMap<u64, oneshot::Sender<Result<Reply, WorkerError>>>>>;

/// What sending a request and waiting for its reply needs; shared by the handle and
/// the heartbeat task.
#[derive(Debug)]
struct Caller {
    kind: WorkerKind,
    chan: Rc<ControlChannel>,
    pending: Pending,
    next_id: Cell<u64>,
    alive: Rc<Cell<bool>>,
    pidfd: Option<OwnedFd>,
}

impl Caller {
    async fn call(
        &self,
        body: ToWorker,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        if !self.alive.get() {
            return Err(CallError::Dead(self.kind));
        }
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(id, tx);
        let msg = SupervisorMessage::Request(Request { id, body });
        if let Err(e) = self.chan.send(&msg, fds).await {
            self.pending.borrow_mut().remove(&id);
            return Err(e.into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(e))) => Err(CallError::Worker(e)),
            Ok(Err(_)) => Err(CallError::Dead(self.kind)),
            Err(_) => {
                self.pending.borrow_mut().remove(&id);
                self.kill();
                Err(CallError::Timeout(self.kind))
            }
        }
    }

    fn kill(&self) {
        if let Some(p) = &self.pidfd {
            let _ = rustix::process::pidfd_send_signal(p, rustix::process::Signal::KILL);
        }
    }
}

/// Calls to one worker process, for tasks that outlive a borrow of `Core` (the
/// reader task passing an NBD client on to its export's worker).
#[derive(Debug, Clone)]
pub struct WorkerCaller(Rc<Caller>);

impl WorkerCaller {
    /// Sends `body` with `fds` and waits for the answer.
    pub async fn call(&self, body: ToWorker, fds: &[BorrowedFd<'_>]) -> Result<Reply, CallError> {
        self.0.call(body, fds, CALL_TIMEOUT).await
    }
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    kind: WorkerKind,
    id: WorkerId,
    pid: u32,
    caller: Rc<Caller>,
    alive: Rc<Cell<bool>>,
    /// Stopped on purpose (nothing left to serve): its end is not news.
    retired: Rc<Cell<bool>>,
    sandbox: Vec<String>,
}

/// Reported when a worker process ends.
#[derive(Debug, Clone)]
pub struct WorkerDied {
    /// The instance it served.
    pub id: WorkerId,
    /// Its kind.
    pub kind: WorkerKind,
    /// Its pid.
    pub pid: u32,
    /// How it ended, for logs.
    pub status: String,
    /// The report comes back after the restart backoff (the restart is already
    /// counted against the budget).
    pub backed_off: bool,
}

impl WorkerHandle {
    /// Starts a worker of `kind` for instance `id` and waits for its `Ready`.
    /// `on_death` runs (on this thread) when the process ends, whatever the reason.
    pub async fn spawn(
        kind: WorkerKind,
        id: WorkerId,
        asks: SharedAskTable,
        ops: SharedOpTable,
        on_event: impl Fn(WorkerId, WorkerEvent, EventTicket) + 'static,
        on_death: impl FnOnce(WorkerDied) + 'static,
    ) -> Result<WorkerHandle, SpawnError> {
        let (ours, theirs) = fd::seqpacket_pair()?;
        let exe = std::env::current_exe().map_err(SpawnError::Exec)?;
        // /proc/self/exe keeps working if the binary on disk is replaced while we run;
        // argv[0] still names the real path for ps and the tests.
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg0(&exe)
            .arg("worker")
            .arg("--kind")
            .arg(kind.as_str())
            .arg("--id")
            .arg(id.0.to_string());
        // A process group of its own: a terminal's ^C or a signal to the daemon's group
        // reaches only the supervisor, which shuts workers down itself (PDEATHSIG still
        // takes them if the supervisor dies).
        cmd.process_group(0);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        let child_fd = theirs.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (dup2, fcntl) on a descriptor we own.
        unsafe {
            cmd.pre_exec(move || {
                if child_fd == crate::worker::CONTROL_FD {
                    // dup2 onto itself would keep close-on-exec set; clear it instead.
                    if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(child_fd, crate::worker::CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(SpawnError::Exec)?;
        drop(theirs);
        let pid = child
            .id()
            .ok_or_else(|| SpawnError::Handshake("exited at once".into()))?;
        let pidfd = rustix::process::Pid::from_raw(pid as i32).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });

        let chan =
            Rc::new(ControlChannel::new(ours).map_err(|e| SpawnError::Handshake(e.to_string()))?);
        let hello = tokio::time::timeout(START_TIMEOUT, chan.recv::<FromWorker>()).await;
        let sandbox = match hello {
            Ok(Ok((FromWorker::Ready { sandbox }, fds)))
                if fds.is_empty() && sandbox.len() <= 32 =>
            {
                sandbox
            }
            Ok(Ok(_)) => return Err(abandon(kind, child, "unexpected first message".into()).await),
            Ok(Err(e)) => return Err(abandon(kind, child, e.to_string()).await),
            Err(_) => return Err(abandon(kind, child, "no Ready in time".into()).await),
        };

        let pending: Pending = Rc::new(RefCell::new(HashMap::new()));
        let alive = Rc::new(Cell::new(true));
        let retired = Rc::new(Cell::new(false));
        let kill_pidfd = pidfd.as_ref().and_then(|f| fd::dup(f).ok());
        let caller = Rc::new(Caller {
            kind,
            chan: Rc::clone(&chan),
            pending: Rc::clone(&pending),
            next_id: Cell::new(1),
            alive: Rc::clone(&alive),
            pidfd,
        });
        let handle = WorkerHandle {
            kind,
            id,
            pid,
            caller: Rc::clone(&caller),
            alive: Rc::clone(&alive),
            retired: Rc::clone(&retired),
            sandbox,
        };
        tracing::info!(worker = %kind, %id, pid, "worker started");

        // Reader: routes replies; any protocol violation kills the worker.
        let reader_alive = Rc::clone(&alive);
        let reader_pending = Rc::clone(&pending);
        let reader_ops = Rc::clone(&ops);
        let (reader_done, reader_ended) = oneshot::channel::<()>();
        tokio::task::spawn_local(async move {
            let from = Process { kind, id, pid };
            let why =
                read_replies(from, &chan, &reader_pending, &asks, &reader_ops, &on_event).await;
            if let Some(why) = why {
                tracing::error!(worker = %kind, pid, reason = %why, "killing misbehaving worker");
                if let Some(p) = &kill_pidfd {
                    let _ = rustix::process::pidfd_send_signal(p, rustix::process::Signal::KILL);
                }
            }
            reader_alive.set(false);
            for (_, tx) in reader_pending.borrow_mut().drain() {
                drop(tx);
            }
            drop(reader_done);
        });
        // Heartbeat: a worker whose control loop stops answering is killed even when
        // no command is waiting for it (the restart path then replaces it).
        let interval = heartbeat_interval();
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(interval).await;
                if !caller.alive.get() {
                    return;
                }
                match caller
                    .call(ToWorker::Ping, &[], CALL_TIMEOUT.min(interval * 6))
                    .await
                {
                    Ok(_) => {}
                    Err(CallError::Timeout(_)) => {
                        tracing::error!(worker = %kind, pid, "killing hung worker (no heartbeat)");
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
        // Waiter: reaps the process and reports its end.
        let waiter_alive = Rc::clone(&alive);
        tokio::task::spawn_local(async move {
            let status = match child.wait().await {
                Ok(s) => describe(s),
                Err(e) => format!("wait failed: {e}"),
            };
            waiter_alive.set(false);
            // Whatever the process reported before it ended counts (the reader reads
            // to the end of the channel, which closed with the process); then its
            // operations that did not end fail.
            let _ = reader_ended.await;
            ops.borrow_mut().process_ended(id, pid, &status);
            if retired.get() {
                tracing::debug!(worker = %kind, pid, %status, "idle worker stopped");
            } else {
                tracing::warn!(worker = %kind, pid, %status, "worker process ended");
            }
            on_death(WorkerDied {
                id,
                kind,
                pid,
                status,
                backed_off: false,
            });
        });
        Ok(handle)
    }

    /// The worker's kind.
    pub fn kind(&self) -> WorkerKind {
        self.kind
    }

    /// The instance it serves.
    pub fn id(&self) -> WorkerId {
        self.id
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sandbox layers the worker reported.
    pub fn sandbox(&self) -> &[String] {
        &self.sandbox
    }

    /// The flag [`WorkerHandle::is_alive`] reads, for watching the process while the
    /// supervisor is busy elsewhere.
    pub fn alive_flag(&self) -> Rc<Cell<bool>> {
        Rc::clone(&self.alive)
    }

    /// Whether the process is still running.
    pub fn is_alive(&self) -> bool {
        self.alive.get()
    }

    /// Sends `body` with `fds` and waits for the answer.
    pub async fn call(&self, body: ToWorker, fds: &[BorrowedFd<'_>]) -> Result<Reply, CallError> {
        self.caller.call(body, fds, CALL_TIMEOUT).await
    }

    /// A handle for calls from tasks of their own.
    pub fn caller(&self) -> WorkerCaller {
        WorkerCaller(Rc::clone(&self.caller))
    }

    /// Stops a worker that has nothing left to serve (quietly: its end is expected).
    pub fn retire(&self) {
        self.retired.set(true);
        self.kill();
    }

    /// Kills the process (it is reaped and reported by the waiter).
    pub fn kill(&self) {
        self.caller.kill();
    }

    /// A borrowed pidfd, for callers that want to watch the process themselves.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.caller.pidfd.as_ref().map(|f| f.as_fd())
    }
}

/// The process a reader reads.
#[derive(Debug, Clone, Copy)]
struct Process {
    kind: WorkerKind,
    id: WorkerId,
    pid: u32,
}

/// Reads replies until the channel closes (returns `None`) or the worker breaks the
/// protocol (returns why).
async fn read_replies(
    from: Process,
    chan: &Rc<ControlChannel>,
    pending: &Pending,
    asks: &SharedAskTable,
    ops: &SharedOpTable,
    on_event: &dyn Fn(WorkerId, WorkerEvent, EventTicket),
) -> Option<String> {
    let Process { kind, id, pid } = from;
    let pending_events = Arc::new(AtomicUsize::new(0));
    let mut rate = AskRate::default();
    // Progress of at most MAX_OPERATIONS operations, one event per 100 ms each, and
    // their ends: a worker that sends faster floods.
    let mut op_rate = AskRate::new(64.0, 64.0);
    let hand_offs = Rc::new(Cell::new(0usize));
    loop {
        match chan.recv::<FromWorker>().await {
            Ok((
                FromWorker::Ask {
                    id: question,
                    body: WorkerAsk::NbdHandOff(hand),
                },
                fds,
            )) => {
                // Only the NBD listener asks this, one socket attached, with few
                // outstanding (it waits for answers beyond MAX_HAND_OFFS).
                let Ok([socket]) = <[OwnedFd; 1]>::try_from(fds) else {
                    return Some("hand-off without exactly one descriptor".into());
                };
                if hand_offs.get() >= MAX_HAND_OFFS {
                    return Some("hand-off flood".into());
                }
                let target = asks.borrow().hand_off_target(id, &hand);
                let target = match target {
                    Ok(t) => t,
                    Err(None) => return Some("hand-off from a worker that is no listener".into()),
                    Err(Some(e)) => {
                        tracing::debug!(worker = %id, error = %e, "hand-off refused");
                        let msg = SupervisorMessage::Answer {
                            id: question,
                            result: Err(e),
                        };
                        if let Err(e) = chan.send(&msg, &[]).await {
                            return (!e.is_closed()).then(|| e.to_string());
                        }
                        continue;
                    }
                };
                // Answered in a task of its own: the export's worker may take a
                // moment, and the listener's other messages must not wait for it.
                hand_offs.set(hand_offs.get() + 1);
                let (chan, count) = (Rc::clone(chan), Rc::clone(&hand_offs));
                tokio::task::spawn_local(async move {
                    let adopted = target
                        .call(ToWorker::NbdAdopt(hand), &[socket.as_fd()])
                        .await;
                    drop(socket);
                    let result = match adopted {
                        Ok(_) => Ok(Answer::HandedOff),
                        Err(CallError::Worker(e)) => Err(e),
                        Err(e) => Err(WorkerError::new(
                            WorkerErrorKind::Io,
                            libc::EPIPE,
                            e.to_string(),
                        )),
                    };
                    count.set(count.get().saturating_sub(1));
                    let msg = SupervisorMessage::Answer {
                        id: question,
                        result,
                    };
                    let _ = chan.send(&msg, &[]).await;
                });
            }
            Ok((FromWorker::Ask { id: question, body }, fds)) => {
                if !fds.is_empty() {
                    return Some("question carried descriptors".into());
                }
                if !rate.take() {
                    return Some("question flood".into());
                }
                // Answered here, not by the actor, which may be waiting for this very
                // worker (see `asks`).
                let answer = asks.borrow().answer(id, &body);
                if let Err(e) = &answer {
                    tracing::warn!(worker = %id, ?body, error = %e, "question refused");
                }
                let (result, fds) = match answer {
                    Ok((a, fds)) => (Ok(a), fds),
                    Err(e) => (Err(e), Vec::new()),
                };
                let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                let msg = SupervisorMessage::Answer {
                    id: question,
                    result,
                };
                if let Err(e) = chan.send(&msg, &borrowed).await {
                    return (!e.is_closed()).then(|| e.to_string());
                }
            }
            Ok((FromWorker::Reply { id, result }, fds)) => {
                if !fds.is_empty() {
                    return Some("reply carried descriptors".into());
                }
                let Some(tx) = pending.borrow_mut().remove(&id) else {
                    return Some(format!("reply to unknown request {id}"));
                };
                let _ = tx.send(result);
            }
            Ok((FromWorker::Ready { .. }, _)) => return Some("second Ready".into()),
            Ok((FromWorker::Event(event), fds)) => {
                if !fds.is_empty() {
                    return Some("event carried descriptors".into());
                }
                let expected = match &event {
                    // Export workers only; the supervisor checks the instance
                    // serves the export.
                    WorkerEvent::ExportGone { .. } => !kind.hosts_nodes(),
                    // The supervisor checks node, instance and threshold before it
                    // emits anything (at most one per threshold the monitor set).
                    WorkerEvent::WriteThreshold { .. } | WorkerEvent::ImageCorrupted { .. } => {
                        kind.hosts_nodes()
                    }
                    // Driver workers run operations and open images; the operation
                    // table checks who runs the op, the image cache who hosts the node.
                    WorkerEvent::Progress { .. }
                    | WorkerEvent::OperationReady { .. }
                    | WorkerEvent::OperationEnded { .. } => kind.runs_operations(),
                    WorkerEvent::ImageInfo { .. } => kind.hosts_nodes(),
                };
                if !expected {
                    return Some("event not expected from this worker".into());
                }
                // Operations are handled here, never queued in the actor's mailbox:
                // the table keeps only the latest state (see `ops`).
                let about_op = matches!(
                    event,
                    WorkerEvent::Progress { .. }
                        | WorkerEvent::OperationReady { .. }
                        | WorkerEvent::OperationEnded { .. }
                );
                if about_op && !op_rate.take() {
                    return Some("operation event flood".into());
                }
                let verdict = match event {
                    WorkerEvent::Progress { op, done, total } => {
                        Some((op, ops.borrow().progress(id, pid, op, done, total)))
                    }
                    WorkerEvent::OperationReady { op } => {
                        Some((op, ops.borrow().ready(id, pid, op)))
                    }
                    WorkerEvent::OperationEnded { op, ref result } => {
                        Some((op, ops.borrow_mut().ended(id, pid, op, result.clone())))
                    }
                    _ => None,
                };
                if let Some((op, verdict)) = verdict {
                    if verdict != Verdict::Accepted {
                        tracing::debug!(worker = %id, %op, ?verdict, "operation event ignored");
                    }
                    continue;
                }
                if pending_events.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_EVENTS {
                    return Some("event flood".into());
                }
                on_event(id, event, EventTicket(Arc::clone(&pending_events)))
            }
            Err(e) if e.is_closed() => return None,
            Err(e) => return Some(e.to_string()),
        }
    }
}

/// Kills a worker that failed its start-up handshake, reaps it and logs how it ended
/// (a worker killed by its own seccomp filter shows up here as signal 31).
async fn abandon(kind: WorkerKind, mut child: tokio::process::Child, why: String) -> SpawnError {
    let _ = child.start_kill();
    let status = match tokio::time::timeout(START_TIMEOUT, child.wait()).await {
        Ok(Ok(s)) => describe(s),
        _ => "unknown".to_string(),
    };
    tracing::error!(worker = %kind, %status, reason = %why, "worker failed to start");
    SpawnError::Handshake(why)
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown".into(),
    }
}
