//! The job runner: the worker that moves data for block jobs (`block-commit` so
//! far). It hosts no node and holds no image descriptor; it reaches every node
//! through data channels to the workers hosting them, so a job between two images
//! runs in a process that can touch nothing else. Each job's copy is a long
//! operation (`worker::ops`): the supervisor keeps the job's state machine and
//! starts, re-paces, cancels and (after a crash) restarts the copy from the last
//! progress it saw. See `design/jobs.md`.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use bulkhead_ipc::control::ControlChannel;
use bulkhead_ipc::wire::{Operation, Reply, ToWorker, WorkerError, WorkerErrorKind};

use super::ops::{Nodes, Operations};

/// State of the job runner.
pub(crate) struct JobWorker {
    peers: super::Peers,
    ops: Operations,
}

impl JobWorker {
    pub(crate) fn new(chan: Arc<ControlChannel>) -> JobWorker {
        JobWorker {
            peers: super::Peers::default(),
            ops: Operations::new(chan),
        }
    }

    pub(crate) async fn handle(
        &mut self,
        req: ToWorker,
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, WorkerError> {
        match req {
            ToWorker::ConnectDataChannel {
                peer,
                generation,
                layout,
            } => {
                self.peers.connect(peer, generation, layout, fds)?;
                Ok(Reply::Done)
            }
            ToWorker::StartOperation { op, operation } => {
                let nodes = match &operation {
                    Operation::Commit { top, base, .. } => Nodes::Two(
                        self.peers.open(*top, "commit top").await?,
                        self.peers.open(*base, "commit base").await?,
                    ),
                    Operation::Fill { .. }
                    | Operation::Backup { .. }
                    | Operation::Stream { .. }
                    | Operation::Mirror { .. } => {
                        return Err(WorkerError::new(
                            WorkerErrorKind::Invalid,
                            libc::EINVAL,
                            "the job runner hosts no node to fill",
                        ));
                    }
                };
                self.ops.start(op, operation, nodes, None)?;
                Ok(Reply::Done)
            }
            ToWorker::CancelOperation { op } => {
                self.ops.cancel(op)?;
                Ok(Reply::Done)
            }
            ToWorker::SetOperationSpeed { op, speed } => {
                self.ops.set_speed(op, speed)?;
                Ok(Reply::Done)
            }
            ToWorker::Ping => Ok(Reply::Done),
            _ => Err(WorkerError::new(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "not a request for the job runner",
            )),
        }
    }
}
