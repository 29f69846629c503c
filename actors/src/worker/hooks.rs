//! Test hooks, compiled only with the `test-hooks` feature (test builds, never a
//! release): signals that make a worker misbehave on demand, so system tests can check
//! what the supervisor does about it.
//!
//! - SIGUSR1: the worker makes a system call its seccomp filter forbids
//!   (`socket(AF_INET)`): the kernel kills it with SIGSYS.
//! - SIGUSR2: the worker sends the supervisor a control message that breaks the
//!   protocol; `BULKHEAD_TEST_MISBEHAVE` picks it: `garbage` (default), `oversized` (more
//!   than the message limit), `truncated` (the first half of a valid reply),
//!   `event-flood` (valid events, far faster than the supervisor handles them), or
//!   `ask`: not a violation, but the questions in `BULKHEAD_TEST_ASK`
//!   (`node:filename;...`) asked in turn, each outcome logged at warn level as
//!   `test hook asked node=N file=F: ...` (`ask-flood`: one question, far too often),
//!   or `hang`: the worker's only runtime thread blocks for good (a hung worker, for
//!   the supervisor's heartbeat to find).
//!
//! The signal handlers are installed before the seccomp filter (which forbids
//! `rt_sigaction`), the tasks that act on them once the control channel exists.

use std::sync::Arc;

use bulkhead_ipc::codec;
use bulkhead_ipc::control::ControlChannel;
use bulkhead_ipc::wire::{FromWorker, NodeId, Reply, WorkerAsk, WorkerEvent};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The installed signal streams.
pub(crate) struct Hooks {
    forbidden: Signal,
    misbehave: Signal,
}

/// Installs the handlers; call before the seccomp filter.
pub(crate) fn install() -> std::io::Result<Hooks> {
    Ok(Hooks {
        forbidden: signal(SignalKind::user_defined1())?,
        misbehave: signal(SignalKind::user_defined2())?,
    })
}

impl Hooks {
    /// Starts acting on the signals.
    pub(crate) fn spawn(self, chan: Arc<ControlChannel>, link: Arc<super::link::Link>) {
        let Hooks {
            mut forbidden,
            mut misbehave,
        } = self;
        tokio::spawn(async move {
            forbidden.recv().await;
            // SAFETY: a plain system call with constant arguments; the filter kills the
            // process before it returns.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        tokio::spawn(async move {
            misbehave.recv().await;
            match std::env::var("BULKHEAD_TEST_MISBEHAVE").as_deref() {
                Ok("ask") => return ask_listed(&link).await,
                Ok("hang") => loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                },
                Ok("ask-flood") => {
                    for _ in 0..10_000 {
                        let q = WorkerAsk::OpenFile {
                            node: NodeId(1),
                            filename: "x".into(),
                            writable: false,
                        };
                        if let Err(e) = link.ask(q, &[]).await
                            && e.errno == libc::EPIPE
                        {
                            break;
                        }
                    }
                    return;
                }
                _ => {}
            }
            if std::env::var("BULKHEAD_TEST_MISBEHAVE").as_deref() == Ok("event-flood") {
                let event = FromWorker::Event(WorkerEvent::ExportGone {
                    export: bulkhead_ipc::wire::ExportKey(u64::MAX),
                });
                for _ in 0..100_000 {
                    if chan.send(&event, &[]).await.is_err() {
                        break;
                    }
                }
                return;
            }
            let bytes = match std::env::var("BULKHEAD_TEST_MISBEHAVE").as_deref() {
                Ok("oversized") => vec![0x42u8; codec::MAX_CONTROL_MESSAGE + 4096],
                Ok("truncated") => {
                    let reply = FromWorker::Reply {
                        id: 1,
                        result: Ok(Reply::NodeInfo {
                            size: u64::MAX,
                            format: None,
                        }),
                    };
                    let full = codec::encode(&reply).unwrap_or_default();
                    full[..full.len() / 2].to_vec()
                }
                _ => vec![0xFFu8; 64],
            };
            if let Err(e) = chan.send_raw(&bytes).await {
                tracing::warn!(error = %e, "test hook could not misbehave");
            }
        });
    }
}

/// Asks the questions listed in `BULKHEAD_TEST_ASK` and logs each outcome.
async fn ask_listed(link: &super::link::Link) {
    let list = std::env::var("BULKHEAD_TEST_ASK").unwrap_or_default();
    for item in list.split(';').filter(|i| !i.is_empty()) {
        let Some((node, file)) = item.split_once(':') else {
            continue;
        };
        let Ok(node) = node.parse() else { continue };
        let q = WorkerAsk::OpenFile {
            node: NodeId(node),
            filename: file.to_string(),
            writable: false,
        };
        let outcome = match link.ask(q, &[]).await {
            Ok((_, fds)) => match fds.first().map(rustix::fs::fstat) {
                Some(Ok(st)) if fds.len() == 1 => format!("opened, {} bytes", st.st_size),
                other => format!("bad answer: {} descriptors, {other:?}", fds.len()),
            },
            Err(e) => format!("refused: {:?}", e.kind),
        };
        tracing::warn!("test hook asked node={node} file={file}: {outcome}");
    }
}
