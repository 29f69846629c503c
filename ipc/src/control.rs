//! The async control channel: one `SOCK_SEQPACKET` socket between the supervisor and a
//! worker, carrying bounded bincode messages with descriptors attached.
//!
//! Sends and receives take `&self`, so one task can wait for messages while others
//! send; a seqpacket message is atomic, so concurrent senders never interleave.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::codec::{self, CodecError, MAX_CONTROL_MESSAGE};
use crate::fd::{self, FdError};

/// Control channel errors.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Socket-level failure, including the peer closing.
    #[error(transparent)]
    Fd(#[from] FdError),
    /// The message could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Registering with the reactor failed.
    #[error("cannot register socket: {0}")]
    Register(std::io::Error),
}

impl ChannelError {
    /// Whether the peer is gone (as opposed to one bad message). A peer killed with
    /// messages unread shows as a reset connection, not a protocol error.
    pub fn is_closed(&self) -> bool {
        matches!(
            self,
            ChannelError::Fd(FdError::Closed)
                | ChannelError::Fd(FdError::Os(rustix::io::Errno::CONNRESET))
                | ChannelError::Fd(FdError::Os(rustix::io::Errno::PIPE))
        )
    }
}

/// One end of a control channel.
#[derive(Debug)]
pub struct ControlChannel {
    fd: AsyncFd<OwnedFd>,
}

impl ControlChannel {
    /// Wraps a connected seqpacket socket. Must be called inside a tokio runtime.
    pub fn new(sock: OwnedFd) -> Result<ControlChannel, ChannelError> {
        fd::set_nonblocking(sock.as_fd())?;
        // SAFETY: `sock` is an OwnedFd moved into the AsyncFd, so the descriptor stays
        // open and refers to the same socket for the AsyncFd's whole lifetime.
        let fd = unsafe {
            AsyncFd::register_with_interest(sock, Interest::READABLE | Interest::WRITABLE)
        }
        .map_err(|e| ChannelError::Register(e.into_parts().1))?;
        Ok(ControlChannel { fd })
    }

    /// Sends `msg` with `fds` attached.
    pub async fn send<T: Serialize>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        let bytes = codec::encode(msg)?;
        loop {
            let mut guard = self
                .fd
                .writable()
                .await
                .map_err(|e| ChannelError::Fd(FdError::from_io(e)))?;
            match guard.try_io(|inner| {
                fd::send_with_fds(inner.get_ref().as_fd(), &bytes, fds).map_err(FdError::into_io)
            }) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(ChannelError::Fd(FdError::from_io(e))),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends `bytes` as one message, unencoded. Only tests use it, to play a peer that
    /// breaks the protocol; a real peer could send any bytes anyway.
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), ChannelError> {
        loop {
            let mut guard = self
                .fd
                .writable()
                .await
                .map_err(|e| ChannelError::Fd(FdError::from_io(e)))?;
            match guard.try_io(|inner| {
                fd::send_with_fds(inner.get_ref().as_fd(), bytes, &[]).map_err(FdError::into_io)
            }) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(ChannelError::Fd(FdError::from_io(e))),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one message and the descriptors that came with it.
    pub async fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let mut buf = vec![0u8; MAX_CONTROL_MESSAGE];
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| ChannelError::Fd(FdError::from_io(e)))?;
            match guard.try_io(|inner| {
                fd::recv_with_fds(inner.get_ref().as_fd(), &mut buf).map_err(FdError::into_io)
            }) {
                Ok(Ok((n, fds))) => {
                    let msg = codec::decode(&buf[..n])?;
                    return Ok((msg, fds));
                }
                Ok(Err(e)) => return Err(ChannelError::Fd(FdError::from_io(e))),
                Err(_would_block) => continue,
            }
        }
    }
}

impl FdError {
    /// Carries an `FdError` through `std::io::Error` (tokio's `try_io` wants one).
    fn into_io(self) -> std::io::Error {
        match self {
            FdError::Os(e) => std::io::Error::from(e),
            other => std::io::Error::other(other),
        }
    }

    /// The inverse of [`FdError::into_io`].
    fn from_io(e: std::io::Error) -> FdError {
        if let Some(errno) = e.raw_os_error() {
            return FdError::Os(rustix::io::Errno::from_raw_os_error(errno));
        }
        match e.into_inner().map(|inner| inner.downcast::<FdError>()) {
            Some(Ok(fd_error)) => *fd_error,
            _ => FdError::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FromWorker, Reply};

    #[tokio::test]
    async fn messages_and_descriptors_cross_the_channel() {
        let (a, b) = fd::seqpacket_pair().unwrap();
        let (a, b) = (
            ControlChannel::new(a).unwrap(),
            ControlChannel::new(b).unwrap(),
        );
        let (x, _y) = fd::stream_pair().unwrap();
        a.send(
            &FromWorker::Reply {
                id: 1,
                result: Ok(Reply::Done),
            },
            &[x.as_fd()],
        )
        .await
        .unwrap();
        let (msg, fds): (FromWorker, _) = b.recv().await.unwrap();
        assert!(matches!(
            msg,
            FromWorker::Reply {
                id: 1,
                result: Ok(Reply::Done)
            }
        ));
        assert_eq!(fds.len(), 1);
    }

    #[tokio::test]
    async fn garbage_is_a_decode_error_and_eof_is_closed() {
        let (a, b) = fd::seqpacket_pair().unwrap();
        fd::send_with_fds(a.as_fd(), &[0xFF; 40], &[]).unwrap();
        let b = ControlChannel::new(b).unwrap();
        assert!(matches!(
            b.recv::<FromWorker>().await,
            Err(ChannelError::Codec(_))
        ));
        drop(a);
        assert!(b.recv::<FromWorker>().await.unwrap_err().is_closed());
    }
}
