//! Waiting for a queue-depth-1 client's next request by polling instead of sleeping.
//!
//! A client with one request at a time sends the next one microseconds after our
//! reply. Going to sleep in `epoll_wait` in between costs a full wake-up of the
//! worker per request (on this kind of VM 30 µs or more, and a third of QD1
//! throughput). So after a lone request the connection keeps polling its socket for
//! a short budget: the task re-queues itself instead of sleeping, and the runtime
//! checks readiness between its polls, so other tasks still run. Deeper queues send
//! requests in bursts and never arm it: there the CPU is better left to the client.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

/// How long to poll for the next request after a lone one: `BULKHEAD_NBD_SPIN_US`
/// if set (0 disables it, at most 1000), else 60 µs, the data channel server's
/// budget for the same situation (see `design/data-path.md`).
pub(crate) fn budget() -> Duration {
    static BUDGET: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let us = std::env::var("BULKHEAD_NBD_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60u64)
            .min(1000);
        Duration::from_micros(us)
    })
}

/// A reader that, once armed, answers "not yet" by re-queueing its task instead
/// of sleeping, until its deadline or its next bytes.
pub(crate) struct Spin<R> {
    inner: R,
    until: Option<Instant>,
}

impl<R> Spin<R> {
    pub(crate) fn new(inner: R) -> Spin<R> {
        Spin { inner, until: None }
    }

    /// Polls instead of sleeping for `budget` from now (nothing if zero).
    pub(crate) fn arm(&mut self, budget: Duration) {
        if !budget.is_zero() {
            self.until = Some(Instant::now() + budget);
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Spin<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if let Some(until) = self.until {
                    if Instant::now() < until {
                        // Deferred, as `yield_now` does: the runtime runs the other
                        // tasks, checks the sockets (`epoll_wait` without sleeping),
                        // then polls us again.
                        let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                    } else {
                        self.until = None;
                    }
                }
                Poll::Pending
            }
            ready => {
                self.until = None;
                ready
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn an_armed_reader_still_reads_what_arrives_and_disarms() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = Spin::new(b);
        r.arm(Duration::from_millis(50));
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tokio::io::AsyncWriteExt::write_all(&mut a, b"next").await
        });
        let mut got = [0u8; 4];
        r.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"next");
        assert!(r.until.is_none());
        writer.await.expect("join").expect("write");
    }

    #[tokio::test]
    async fn a_spent_budget_sleeps_like_a_plain_reader() {
        let (_a, b) = tokio::io::duplex(64);
        let mut r = Spin::new(b);
        r.arm(Duration::from_millis(1));
        let mut got = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(30), r.read(&mut got)).await;
        assert!(waited.is_err(), "nothing was sent");
        assert!(r.until.is_none(), "disarmed after its budget");
    }
}
