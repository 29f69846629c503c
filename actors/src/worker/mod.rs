//! Worker processes: the runtime every worker kind shares.
//!
//! A worker is the `bulkhead` binary re-executed as `bulkhead worker --kind KIND --id N`
//! (N: the instance it serves), with
//! its control socket on descriptor 3 and nothing else inherited. It asks the kernel to
//! kill it when the supervisor dies, says `Ready`, then carries out the supervisor's
//! requests one at a time. Node I/O from other workers arrives on data channels and is
//! served concurrently. A worker holds no state that cannot be rebuilt from the
//! supervisor's requests, so the supervisor can replace it.

mod bitmaps;
mod driver;
mod export;
#[cfg(feature = "test-hooks")]
mod hooks;
mod jobs;
mod link;
mod nbd;
mod ops;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_ipc::control::ControlChannel;
use bulkhead_ipc::wire::{FromWorker, WorkerId, WorkerKind};

/// The descriptor on which a worker finds its control socket.
pub const CONTROL_FD: i32 = 3;

/// Errors that end a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerExit {
    /// The runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    /// The control channel failed.
    #[error("control channel: {0}")]
    Control(#[from] bulkhead_ipc::control::ChannelError),
    /// Setting up the process failed.
    #[error("process setup: {0}")]
    Setup(String),
}

/// Entry point of `bulkhead worker --kind KIND --id N`.
pub fn main(kind: WorkerKind, id: WorkerId) -> ExitCode {
    match run(kind, id) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(worker = %kind, error = %e, "worker exiting");
            ExitCode::FAILURE
        }
    }
}

fn run(kind: WorkerKind, id: WorkerId) -> Result<(), WorkerExit> {
    // First thing: die with the supervisor, so no orphan keeps an image locked. Then
    // re-check the parent, in case it died before the prctl took effect.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| WorkerExit::Setup(format!("PR_SET_PDEATHSIG: {e}")))?;
    if rustix::process::getppid().is_none_or(|p| p.as_raw_nonzero().get() == 1) {
        return Err(WorkerExit::Setup("supervisor already gone".into()));
    }
    // SAFETY: the supervisor placed our control socket on descriptor 3 (and nothing
    // else above stderr); we take sole ownership of it here, exactly once.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };

    // Everything that must hold for every thread comes before the first thread:
    // namespaces, capabilities, no_new_privs and Landlock are inherited by threads
    // started later, and unshare(CLONE_NEWUSER) refuses a multi-threaded process.
    let mut sandbox =
        bulkhead_sandbox::apply_early(kind).map_err(|e| WorkerExit::Setup(e.to_string()))?;

    // File drivers' blocking I/O threads, started now so that no thread needs to be
    // created once the seccomp filter is in (format workers host their file child).
    if kind.does_file_io() {
        bulkhead_block::threads::start_io_threads(bulkhead_block::threads::DEFAULT_IO_THREADS)
            .map_err(|e| WorkerExit::Setup(format!("I/O threads: {e}")))?;
    }
    if kind.needs_format_threads() {
        bulkhead_block::threads::start_format_threads(
            bulkhead_block::threads::DEFAULT_FORMAT_THREADS,
        )
        .map_err(|e| WorkerExit::Setup(format!("format threads: {e}")))?;
    }

    // One thread, like a qsd iothread: every hop of a request (socket, ring, task)
    // stays on it, so no request pays for waking another runtime thread (with two
    // threads, those futex/eventfd wake-ups cost more CPU than the I/O itself; see
    // design/data-path.md). Blocking syscalls run on the driver's I/O threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name(format!("bulkhead-{kind}"))
        .enable_all()
        .build()
        .map_err(WorkerExit::Runtime)?;
    rt.block_on(async move {
        // Every thread of the worker exists now (main, runtime, I/O): the seccomp filter
        // goes onto all of them at once, before the first request is read.
        #[cfg(feature = "test-hooks")]
        let hooks = hooks::install().map_err(|e| WorkerExit::Setup(format!("test hooks: {e}")))?;
        bulkhead_sandbox::apply_late(kind, &mut sandbox)
            .map_err(|e| WorkerExit::Setup(e.to_string()))?;
        let chan = Arc::new(ControlChannel::new(control)?);
        #[cfg(feature = "test-hooks")]
        let chan_for_hooks = Arc::clone(&chan);
        #[cfg(feature = "test-hooks")]
        let on_link = move |link: Arc<link::Link>| hooks.spawn(chan_for_hooks, link);
        #[cfg(not(feature = "test-hooks"))]
        let on_link = |_: Arc<link::Link>| {};
        serve(kind, id, chan, sandbox, on_link).await
    })
}

async fn serve(
    kind: WorkerKind,
    id: WorkerId,
    chan: Arc<ControlChannel>,
    sandbox: Vec<String>,
    on_link: impl FnOnce(Arc<link::Link>),
) -> Result<(), WorkerExit> {
    tracing::info!(worker = %kind, layers = %sandbox.join(","), "sandbox in place");
    chan.send(&FromWorker::Ready { sandbox }, &[]).await?;
    let (link, mut requests) = link::Link::start(Arc::clone(&chan));
    on_link(Arc::clone(&link));
    let mut state = match kind {
        WorkerKind::Nbd => State::Nbd(nbd::NbdWorker::new(Arc::clone(&chan), Arc::clone(&link))),
        WorkerKind::Jobs => State::Jobs(jobs::JobWorker::new(Arc::clone(&chan))),
        _ => State::Driver(driver::DriverWorker::new(kind, id, Arc::clone(&chan))),
    };
    // Requests one at a time; the link routes answers to questions meanwhile.
    while let Some((req, fds)) = requests.recv().await {
        let result = match &mut state {
            State::Driver(d) => d.handle(req.body, fds).await,
            State::Nbd(n) => n.handle(req.body, fds).await,
            State::Jobs(j) => j.handle(req.body, fds).await,
        };
        link.send(&FromWorker::Reply { id: req.id, result }, &[])
            .await?;
    }
    Ok(())
}

/// What a worker of each kind keeps.
enum State {
    Driver(driver::DriverWorker),
    Nbd(nbd::NbdWorker),
    Jobs(jobs::JobWorker),
}

/// The workers whose nodes this worker reaches, by instance, across their restarts
/// (shared by driver workers, for children, and the NBD worker, for exports).
#[derive(Default)]
pub(crate) struct Peers(std::collections::HashMap<WorkerId, Arc<bulkhead_ipc::data::Peer>>);

impl Peers {
    /// `ConnectDataChannel`: attaches the channel to incarnation `generation` of `peer`.
    pub(crate) fn connect(
        &mut self,
        peer: WorkerId,
        generation: u64,
        layout: bulkhead_ipc::ring::RingLayout,
        fds: Vec<OwnedFd>,
    ) -> Result<(), bulkhead_ipc::wire::WorkerError> {
        let fds = driver::channel_fds(fds)?;
        let client =
            bulkhead_ipc::data::DataClient::spawn(fds, layout).map_err(driver::channel_error)?;
        self.0.entry(peer).or_default().attach(generation, client);
        Ok(())
    }

    /// Opens `node` in the worker that serves it; `what` names it for errors.
    pub(crate) async fn open(
        &self,
        node: bulkhead_ipc::wire::NodeRef,
        what: &str,
    ) -> Result<Arc<dyn bulkhead_block::BlockIo>, bulkhead_ipc::wire::WorkerError> {
        use bulkhead_ipc::wire::{WorkerError, WorkerErrorKind};
        let peer = self.0.get(&node.home).ok_or_else(|| {
            WorkerError::new(
                WorkerErrorKind::NotFound,
                libc::ENOENT,
                format!("no channel to {}", node.home),
            )
        })?;
        let remote = peer.node(node.node).await.map_err(|e| {
            WorkerError::new(WorkerErrorKind::Io, e.errno(), format!("{what}: {e}"))
        })?;
        Ok(Arc::new(remote))
    }
}
