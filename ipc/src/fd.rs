//! Socket pairs and descriptor passing.
//!
//! Control messages travel on `SOCK_SEQPACKET` sockets so that a message and the
//! descriptors sent with it arrive together and message boundaries need no framing.
//! Received descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`), and a message that
//! carried more descriptors than the receiver allows is refused (`MSG_CTRUNC`), so a
//! misbehaving peer cannot leak descriptors into us or into children we spawn.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// Most descriptors one control message may carry (crosvm's Tube uses 32 too).
pub const MAX_FDS_PER_MESSAGE: usize = 32;

/// Errors of descriptor-passing socket operations.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// The system call failed.
    #[error("socket operation failed: {0}")]
    Os(#[from] rustix::io::Errno),
    /// The peer sent a message longer than the receive buffer.
    #[error("message longer than {0} bytes")]
    Truncated(usize),
    /// The peer sent more descriptors than allowed.
    #[error("too many descriptors in one message")]
    TooManyFds,
    /// The peer closed its end.
    #[error("peer closed the connection")]
    Closed,
}

/// Creates a connected pair of close-on-exec sockets of the given type.
pub fn socket_pair(kind: SocketType) -> Result<(OwnedFd, OwnedFd), FdError> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        kind,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Creates a connected pair of `SOCK_SEQPACKET` sockets (close-on-exec).
pub fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), FdError> {
    socket_pair(SocketType::SEQPACKET)
}

/// Creates a connected pair of `SOCK_STREAM` sockets (close-on-exec).
pub fn stream_pair() -> Result<(OwnedFd, OwnedFd), FdError> {
    socket_pair(SocketType::STREAM)
}

/// Puts `fd` in non-blocking mode (needed before handing it to an async reactor).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), FdError> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Sends one message with `fds` attached. Returns `EAGAIN` as an error on a full
/// non-blocking socket; the caller retries when writable.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<usize, FdError> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(FdError::TooManyFds);
    }
    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(FdError::TooManyFds);
    }
    Ok(rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// Receives one message into `buf`, returning its length and the descriptors that came
/// with it. A message that did not fit `buf`, or whose descriptors were cut off, is an
/// error (its descriptors, if any arrived, are closed).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>), FdError> {
    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::TRUNC) {
        return Err(FdError::Truncated(buf.len()));
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(FdError::TooManyFds);
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Err(FdError::Closed);
    }
    Ok((msg.bytes, fds))
}

/// Duplicates `fd` (close-on-exec), for handing the same open file description to
/// another process while keeping ours.
pub fn dup(fd: impl AsFd) -> Result<OwnedFd, FdError> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, 3)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_message_and_its_descriptors_arrive_together_close_on_exec() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, _y) = stream_pair().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[x.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn an_oversized_message_is_refused_not_cut() {
        let (a, b) = seqpacket_pair().unwrap();
        send_with_fds(a.as_fd(), &[7u8; 100], &[]).unwrap();
        let mut buf = [0u8; 10];
        assert!(matches!(
            recv_with_fds(b.as_fd(), &mut buf),
            Err(FdError::Truncated(10))
        ));
    }

    #[test]
    fn a_closed_peer_reads_as_closed() {
        let (a, b) = seqpacket_pair().unwrap();
        drop(a);
        let mut buf = [0u8; 10];
        assert!(matches!(
            recv_with_fds(b.as_fd(), &mut buf),
            Err(FdError::Closed)
        ));
    }
}
