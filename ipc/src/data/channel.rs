//! A channel's descriptors: creating them (the supervisor) and waiting on them (both
//! ends).
//!
//! The supervisor alone creates channels, so it can fence a restarted worker by
//! handing out a new memfd per incarnation; a worker only ever receives the four
//! descriptors of its end. The doorbells and the liveness socket carry no data: a
//! doorbell says "look at the ring", the socket's EOF says "the other process is gone",
//! which no amount of ring traffic from a stuck or dead peer could tell us.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;

use super::DataError;
use crate::ring::{self, RingError, RingLayout};

/// The descriptors of one end of a channel, in the order they travel with
/// `ServeDataChannel`/`ConnectDataChannel`: liveness socket, region memfd, submission
/// doorbell, completion doorbell.
#[derive(Debug)]
pub struct ChannelFds {
    /// This end of the socket pair; it carries no data, its EOF means the peer is gone.
    pub liveness: OwnedFd,
    /// The region memfd.
    pub region: OwnedFd,
    /// Eventfd the client writes when the server sleeps.
    pub sq_bell: OwnedFd,
    /// Eventfd the server writes when the client sleeps.
    pub cq_bell: OwnedFd,
}

impl ChannelFds {
    /// Descriptors per channel message.
    pub const COUNT: usize = 4;

    /// Takes the descriptors received with a channel message.
    pub fn from_vec(fds: Vec<OwnedFd>) -> Result<ChannelFds, DataError> {
        let got = fds.len();
        let mut it = fds.into_iter();
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some(liveness), Some(region), Some(sq_bell), Some(cq_bell), None) => Ok(ChannelFds {
                liveness,
                region,
                sq_bell,
                cq_bell,
            }),
            _ => Err(DataError::Descriptors {
                expected: ChannelFds::COUNT,
                got,
            }),
        }
    }
}

/// A new channel, created by the supervisor: both ends' descriptors.
#[derive(Debug)]
pub struct NewChannel {
    /// The geometry both ends must be told.
    pub layout: RingLayout,
    server_sock: OwnedFd,
    client_sock: OwnedFd,
    region: OwnedFd,
    sq_bell: OwnedFd,
    cq_bell: OwnedFd,
}

impl NewChannel {
    /// Creates the region (sealed memfd), both doorbells and the liveness socket pair.
    pub fn create(layout: RingLayout) -> Result<NewChannel, DataError> {
        let region = ring::create_region(layout)?;
        let bell = || {
            rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .map_err(RingError::from)
        };
        let (server_sock, client_sock) =
            crate::fd::stream_pair().map_err(|e| DataError::Io(std::io::Error::other(e)))?;
        Ok(NewChannel {
            layout,
            server_sock,
            client_sock,
            region,
            sq_bell: bell()?,
            cq_bell: bell()?,
        })
    }

    /// The descriptors for `ServeDataChannel`.
    pub fn server_fds(&self) -> [BorrowedFd<'_>; ChannelFds::COUNT] {
        [
            self.server_sock.as_fd(),
            self.region.as_fd(),
            self.sq_bell.as_fd(),
            self.cq_bell.as_fd(),
        ]
    }

    /// The descriptors for `ConnectDataChannel`.
    pub fn client_fds(&self) -> [BorrowedFd<'_>; ChannelFds::COUNT] {
        [
            self.client_sock.as_fd(),
            self.region.as_fd(),
            self.sq_bell.as_fd(),
            self.cq_bell.as_fd(),
        ]
    }

    /// Splits into the two ends, duplicating the shared descriptors (tests and
    /// single-process use).
    pub fn into_ends(self) -> Result<(ChannelFds, ChannelFds), DataError> {
        let dup =
            |fd: &OwnedFd| crate::fd::dup(fd).map_err(|e| DataError::Io(std::io::Error::other(e)));
        let client = ChannelFds {
            liveness: self.client_sock,
            region: dup(&self.region)?,
            sq_bell: dup(&self.sq_bell)?,
            cq_bell: dup(&self.cq_bell)?,
        };
        let server = ChannelFds {
            liveness: self.server_sock,
            region: self.region,
            sq_bell: self.sq_bell,
            cq_bell: self.cq_bell,
        };
        Ok((server, client))
    }
}

/// Rings a doorbell. A full counter (EAGAIN) already means "wake up".
pub(super) fn ring_bell(fd: BorrowedFd<'_>) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Waits until a doorbell rang, and resets it.
pub(super) async fn wait_bell(bell: &AsyncFd<OwnedFd>) -> std::io::Result<()> {
    let mut guard = bell.readable().await?;
    let mut buf = [0u8; 8];
    match rustix::io::read(bell.get_ref(), &mut buf) {
        Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
        Err(e) => return Err(e.into()),
    }
    // The counter is 0 now; a later write makes the eventfd readable again, which
    // the reactor reports as a new event.
    guard.clear_ready();
    Ok(())
}

/// Waits until the peer closes its end of the liveness socket (or sends anything,
/// which it never should).
pub(super) async fn wait_gone(sock: &UnixStream) {
    let mut buf = [0u8; 16];
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        match sock.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => return,
        }
    }
}

pub(super) fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    crate::fd::set_nonblocking(fd.as_fd()).map_err(std::io::Error::other)?;
    // SAFETY: an OwnedFd always returns the same open descriptor from `as_raw_fd`,
    // and the AsyncFd owns it until dropped.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))
}

pub(super) fn stream(fd: OwnedFd) -> std::io::Result<UnixStream> {
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    UnixStream::from_std(std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_channel_message_needs_exactly_four_descriptors() {
        let (a, _b) = crate::fd::stream_pair().unwrap();
        assert!(matches!(
            ChannelFds::from_vec(vec![a]),
            Err(DataError::Descriptors {
                expected: 4,
                got: 1
            })
        ));
    }
}
