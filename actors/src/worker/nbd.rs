//! The NBD export worker: one NBD server for every NBD export.
//!
//! The listening socket comes from the supervisor (which keeps its own copy, so a
//! replacement worker serves the same socket). Exported nodes are reached through data
//! channels to the workers that host them (a format node with its protocol child, so
//! one hop whatever the chain). Clients' bytes are untrusted and handled by
//! `bulkhead-nbd`; this module only wires it to the control plane.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bulkhead_ipc::control::ControlChannel;
use bulkhead_ipc::wire::{
    FromWorker, NbdExport, Reply, ToWorker, WorkerError, WorkerErrorKind, WorkerEvent,
};
use bulkhead_nbd::server::{ExportConfig, ExportError, NbdServer, RemoveMode, ServerConfig};

/// Prints a line about an NBD client on stderr the way qsd does (its program name,
/// then the text), as one write so lines from concurrent connections never mix.
fn report(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("bulkhead: {line}\n").as_bytes());
}

fn err(kind: WorkerErrorKind, errno: i32, detail: impl Into<String>) -> WorkerError {
    WorkerError::new(kind, errno, detail)
}

/// State of the NBD worker.
pub(crate) struct NbdWorker {
    server: Option<Arc<NbdServer>>,
    peers: super::Peers,
    control: Arc<ControlChannel>,
}

impl NbdWorker {
    pub(crate) fn new(control: Arc<ControlChannel>) -> NbdWorker {
        NbdWorker {
            server: None,
            peers: super::Peers::default(),
            control,
        }
    }

    async fn add_export(&self, server: &NbdServer, export: NbdExport) -> Result<(), WorkerError> {
        let backend = self.peers.open(export.node, "exported node").await?;
        let config = ExportConfig {
            name: export.name,
            description: export.description,
            writable: export.writable,
            allocation_depth: export.allocation_depth,
        };
        server.add_export(config, backend).map_err(export_error)
    }

    fn server(&self) -> Result<&Arc<NbdServer>, WorkerError> {
        self.server.as_ref().ok_or_else(|| {
            err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "NBD server not running",
            )
        })
    }

    pub(crate) async fn handle(
        &mut self,
        req: ToWorker,
        mut fds: Vec<OwnedFd>,
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
            ToWorker::NbdServerStart {
                max_connections,
                handshake_max_seconds,
                exports,
            } => {
                if self.server.is_some() {
                    return Err(err(
                        WorkerErrorKind::Invalid,
                        libc::EBUSY,
                        "NBD server already running",
                    ));
                }
                let listener = single(std::mem::take(&mut fds))?;
                let config = ServerConfig {
                    max_connections,
                    handshake_max_seconds,
                };
                let server = Arc::new(NbdServer::reporting(config, Arc::new(report)));
                // Every export exists before the first client is accepted.
                for export in exports {
                    self.add_export(&server, export).await?;
                }
                spawn_listener(Arc::clone(&server), listener)?;
                self.server = Some(server);
                Ok(Reply::Done)
            }
            ToWorker::NbdServerStop => {
                // Answer once every client is gone, so the supervisor can report their
                // exports deleted before its reply (the disconnects are immediate).
                if let Some(server) = self.server.take() {
                    server.shutdown().await;
                }
                Ok(Reply::Done)
            }
            ToWorker::NbdExportAdd(export) => {
                let server = Arc::clone(self.server()?);
                self.add_export(&server, export).await?;
                Ok(Reply::Done)
            }
            ToWorker::NbdExportRemove { name, hard } => {
                let server = self.server()?;
                let mode = if hard {
                    RemoveMode::Hard
                } else {
                    RemoveMode::Safe
                };
                // Like qsd, an export whose clients had to be disconnected is deleted
                // after the command's reply, however fast the disconnect is.
                let had_clients = server.client_count(&name).unwrap_or(0) > 0;
                let removal = server.remove_export(&name, mode).map_err(export_error)?;
                if !had_clients {
                    return Ok(Reply::ExportRemoved { deferred: false });
                }
                let control = Arc::clone(&self.control);
                tokio::spawn(async move {
                    removal.finished().await;
                    let event = FromWorker::Event(WorkerEvent::ExportGone { name });
                    if let Err(e) = control.send(&event, &[]).await {
                        tracing::warn!(error = %e, "cannot report a finished export removal");
                    }
                });
                Ok(Reply::ExportRemoved { deferred: true })
            }
            ToWorker::Ping => Ok(Reply::Done),
            _ => Err(err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "not a driver worker",
            )),
        }
    }
}

fn single(mut fds: Vec<OwnedFd>) -> Result<OwnedFd, WorkerError> {
    match (fds.pop(), fds.is_empty()) {
        (Some(fd), true) => Ok(fd),
        _ => Err(err(
            WorkerErrorKind::Invalid,
            libc::EINVAL,
            "expected exactly one descriptor",
        )),
    }
}

fn export_error(e: ExportError) -> WorkerError {
    match e {
        ExportError::InUse(_) => err(WorkerErrorKind::InUse, libc::EBUSY, e.to_string()),
        ExportError::NotFound(_) => err(WorkerErrorKind::NotFound, libc::ENOENT, e.to_string()),
        other => err(WorkerErrorKind::Invalid, libc::EINVAL, other.to_string()),
    }
}

/// Serves the handed-in listening socket, unix or TCP, until the server shuts down.
fn spawn_listener(server: Arc<NbdServer>, listener: OwnedFd) -> Result<(), WorkerError> {
    let family = rustix::net::getsockname(listener.as_fd())
        .map(|a| a.address_family())
        .map_err(|e| {
            err(
                WorkerErrorKind::Invalid,
                e.raw_os_error(),
                "listener is not a socket",
            )
        })?;
    let io = |e: std::io::Error| {
        err(
            WorkerErrorKind::Io,
            e.raw_os_error().unwrap_or(0),
            e.to_string(),
        )
    };
    if family == rustix::net::AddressFamily::UNIX {
        let std = std::os::unix::net::UnixListener::from(listener);
        std.set_nonblocking(true).map_err(io)?;
        let l = tokio::net::UnixListener::from_std(std).map_err(io)?;
        tokio::spawn(async move { server.serve_unix_listener(l).await });
    } else {
        let std = std::net::TcpListener::from(listener);
        std.set_nonblocking(true).map_err(io)?;
        let l = tokio::net::TcpListener::from_std(std).map_err(io)?;
        tokio::spawn(async move { server.serve_tcp_listener(l).await });
    }
    Ok(())
}
