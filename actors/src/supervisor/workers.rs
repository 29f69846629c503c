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
use std::time::Duration;

use bulkhead_ipc::control::{ChannelError, ControlChannel};
use bulkhead_ipc::fd;
use bulkhead_ipc::wire::{
    FromWorker, Reply, Request, ToWorker, WorkerError, WorkerEvent, WorkerId, WorkerKind,
};
use tokio::sync::oneshot;

/// How long a worker may take to say `Ready`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker may take to answer one control request. Control requests do no
/// bulk I/O; anything slower than this is a hung worker.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

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

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    kind: WorkerKind,
    id: WorkerId,
    pid: u32,
    pidfd: Option<OwnedFd>,
    chan: Rc<ControlChannel>,
    pending: Pending,
    next_id: Cell<u64>,
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
}

impl WorkerHandle {
    /// Starts a worker of `kind` for instance `id` and waits for its `Ready`.
    /// `on_death` runs (on this thread) when the process ends, whatever the reason.
    pub async fn spawn(
        kind: WorkerKind,
        id: WorkerId,
        on_event: impl Fn(WorkerId, WorkerEvent) + 'static,
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
        let handle = WorkerHandle {
            kind,
            id,
            pid,
            pidfd,
            chan: Rc::clone(&chan),
            pending: Rc::clone(&pending),
            next_id: Cell::new(1),
            alive: Rc::clone(&alive),
            retired: Rc::clone(&retired),
            sandbox,
        };
        tracing::info!(worker = %kind, %id, pid, "worker started");

        // Reader: routes replies; any protocol violation kills the worker.
        let reader_alive = Rc::clone(&alive);
        let reader_pending = Rc::clone(&pending);
        let kill_pidfd = handle.pidfd.as_ref().and_then(|f| fd::dup(f).ok());
        tokio::task::spawn_local(async move {
            let why = read_replies(kind, id, &chan, &reader_pending, &on_event).await;
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
        });
        // Waiter: reaps the process and reports its end.
        let waiter_alive = Rc::clone(&alive);
        tokio::task::spawn_local(async move {
            let status = match child.wait().await {
                Ok(s) => describe(s),
                Err(e) => format!("wait failed: {e}"),
            };
            waiter_alive.set(false);
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

    /// Whether the process is still running.
    pub fn is_alive(&self) -> bool {
        self.alive.get()
    }

    /// Sends `body` with `fds` and waits for the answer.
    pub async fn call(&self, body: ToWorker, fds: &[BorrowedFd<'_>]) -> Result<Reply, CallError> {
        if !self.is_alive() {
            return Err(CallError::Dead(self.kind));
        }
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(id, tx);
        if let Err(e) = self.chan.send(&Request { id, body }, fds).await {
            self.pending.borrow_mut().remove(&id);
            return Err(e.into());
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
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

    /// Stops a worker that has nothing left to serve (quietly: its end is expected).
    pub fn retire(&self) {
        self.retired.set(true);
        self.kill();
    }

    /// Kills the process (it is reaped and reported by the waiter).
    pub fn kill(&self) {
        if let Some(p) = &self.pidfd {
            let _ = rustix::process::pidfd_send_signal(p, rustix::process::Signal::KILL);
        }
    }

    /// A borrowed pidfd, for callers that want to watch the process themselves.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|f| f.as_fd())
    }
}

/// Reads replies until the channel closes (returns `None`) or the worker breaks the
/// protocol (returns why).
async fn read_replies(
    kind: WorkerKind,
    id: WorkerId,
    chan: &ControlChannel,
    pending: &Pending,
    on_event: &dyn Fn(WorkerId, WorkerEvent),
) -> Option<String> {
    loop {
        match chan.recv::<FromWorker>().await {
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
                match &event {
                    WorkerEvent::ExportGone { name }
                        if kind == WorkerKind::Nbd && name.len() <= 4096 =>
                    {
                        on_event(id, event)
                    }
                    // At most one per threshold the monitor set; the supervisor checks
                    // node, instance and threshold before emitting anything.
                    WorkerEvent::WriteThreshold { .. } if kind.hosts_nodes() => on_event(id, event),
                    _ => return Some("event not expected from this worker".into()),
                }
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
