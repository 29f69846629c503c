//! The I/O threads that run blocking file syscalls for the async drivers.
//!
//! Runs in driver workers. `pread`, `pwrite`, `fdatasync`, `fallocate` and `lseek` block,
//! so they must not run on the tokio executor. We use a fixed set of plain OS threads
//! created once, at worker start-up ([`start_io_threads`]), rather than tokio's
//! `spawn_blocking`: `spawn_blocking` creates threads on demand, and once the worker's
//! seccomp filter is in place thread creation (`clone3`/`clone`) should be forbidden.
//! Requests reach the threads over a channel; each returns its result through a tokio
//! oneshot, so an async caller awaits without blocking the executor.
//!
//! Most jobs own their data (`'static`). Reads and writes instead work on the caller's
//! buffer in place ([`run_on_buffer`]), so a payload is never copied between the
//! caller (possibly a slot of a shared-memory pool) and `pread`/`pwrite`. A cancelled
//! (dropped) future must not leave a thread writing into memory the caller has
//! already reused: dropping such a future before its job finished blocks until it
//! has. No untrusted bytes are parsed here.

use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use crate::io::{IoError, IoResult};

/// Threads started when nothing called [`start_io_threads`] before the first request.
pub const DEFAULT_IO_THREADS: usize = 4;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A worker-wide pool of threads.
struct IoThreads {
    // `Sender` is `Sync`, so requests from any executor thread queue here without a lock.
    queue: Sender<Job>,
}

/// The file syscalls' threads: they only ever run syscalls, never wait for another job.
static POOL: OnceLock<IoThreads> = OnceLock::new();
/// The format engines' threads (qcow2): an engine blocks on its children's I/O, which
/// runs on [`POOL`] (or, for a node in another worker, on the executor), never here,
/// so a full format pool cannot starve the requests it waits for. A format node over
/// another format node in the same worker (a backing chain) runs the lower engine
/// inline on the same thread.
static FORMAT_POOL: OnceLock<IoThreads> = OnceLock::new();
// Serialises pool creation so that two racing first users do not both spawn threads.
static START: Mutex<()> = Mutex::new(());

thread_local! {
    static ON_FORMAT_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Format threads started when nothing called [`start_format_threads`] first.
pub const DEFAULT_FORMAT_THREADS: usize = 4;

fn start(
    pool: &'static OnceLock<IoThreads>,
    name: &str,
    format: bool,
    count: usize,
) -> std::io::Result<()> {
    let _guard = START
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if pool.get().is_some() {
        return Ok(());
    }
    let (queue, jobs) = channel::<Job>();
    let jobs = Arc::new(Mutex::new(jobs));
    for index in 0..count.max(1) {
        let jobs = Arc::clone(&jobs);
        std::thread::Builder::new()
            .name(format!("{name}{index}"))
            .spawn(move || {
                ON_FORMAT_THREAD.with(|f| f.set(format));
                run_jobs(&jobs)
            })?;
    }
    // Only this function sets a pool, under START, after checking it is empty.
    let _ = pool.set(IoThreads { queue });
    Ok(())
}

/// Starts `count` I/O threads (at least one) for this process. Call it at worker start-up,
/// before the seccomp filter forbids creating threads. Later calls do nothing.
pub fn start_io_threads(count: usize) -> std::io::Result<()> {
    start(&POOL, "bulkhead-io", false, count)
}

/// Starts `count` format threads (at least one), as [`start_io_threads`] does.
pub fn start_format_threads(count: usize) -> std::io::Result<()> {
    start(&FORMAT_POOL, "bulkhead-fmt", true, count)
}

/// Whether the caller is a format thread (a nested format request runs inline).
pub fn on_format_thread() -> bool {
    ON_FORMAT_THREAD.with(|f| f.get())
}

fn run_jobs(jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let queue = jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            queue.recv()
        };
        match job {
            // A panicking job must not take the thread down with it; its caller sees the
            // dropped oneshot as EIO.
            Ok(job) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
            Err(_) => return,
        }
    }
}

/// Runs `work` on an I/O thread and waits for its result without blocking the executor.
pub(crate) async fn run<T, F>(work: F) -> IoResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> IoResult<T> + Send + 'static,
{
    let pool = pool()?;
    let (done, result) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = done.send(work());
    });
    pool.queue.send(job).map_err(|_| IoError::Os(libc::EIO))?;
    result.await.unwrap_or(Err(IoError::Os(libc::EIO)))
}

fn pool() -> IoResult<&'static IoThreads> {
    match POOL.get() {
        Some(pool) => Ok(pool),
        None => {
            start_io_threads(DEFAULT_IO_THREADS)?;
            POOL.get().ok_or(IoError::Os(libc::EAGAIN))
        }
    }
}

fn format_pool() -> IoResult<&'static IoThreads> {
    match FORMAT_POOL.get() {
        Some(pool) => Ok(pool),
        None => {
            start_format_threads(DEFAULT_FORMAT_THREADS)?;
            FORMAT_POOL.get().ok_or(IoError::Os(libc::EAGAIN))
        }
    }
}

/// Which pool a buffer job runs on.
#[derive(Clone, Copy)]
enum Which {
    Io,
    Format,
}

/// A borrowed buffer's address, sent to an I/O thread.
#[derive(Clone, Copy)]
struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the address is only dereferenced by the job while the borrow it came from
// is still alive (see `BufferJob`'s drop).
unsafe impl Send for RawBuf {}

/// State shared by a buffer job and the future awaiting it.
struct JobState<T> {
    slot: Mutex<JobSlot<T>>,
    finished: Condvar,
}

struct JobSlot<T> {
    result: Option<IoResult<T>>,
    waker: Option<Waker>,
    done: bool,
}

/// The future of [`run_on_buffer`]. Holds the caller's borrow until the job is done.
struct BufferJob<'a, T> {
    state: Arc<JobState<T>>,
    _borrow: std::marker::PhantomData<&'a mut [u8]>,
}

impl<T> Future for BufferJob<'_, T> {
    type Output = IoResult<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoResult<T>> {
        let mut slot = self
            .state
            .slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.done {
            return Poll::Ready(slot.result.take().unwrap_or(Err(IoError::Os(libc::EIO))));
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> Drop for BufferJob<'_, T> {
    fn drop(&mut self) {
        // Cancelled while the thread may still use the buffer: wait for it, so the
        // borrow never ends under a running pread/pwrite. Only cancellation blocks.
        let mut slot = self
            .state
            .slot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while !slot.done {
            slot = self
                .state
                .finished
                .wait(slot)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// Runs `work` on an I/O thread on the caller's buffer, without copying it. `work`
/// gets the buffer's address and length and must only use them as one slice of
/// `buf` (reading, or writing if `buf` came in mutable).
fn run_raw<'a, T, F>(which: Which, buf: RawBuf, work: F) -> IoResult<BufferJob<'a, T>>
where
    T: Send + 'static,
    F: FnOnce(RawBuf) -> IoResult<T> + Send + 'static,
{
    let pool = match which {
        Which::Io => pool()?,
        Which::Format => format_pool()?,
    };
    let state = Arc::new(JobState {
        slot: Mutex::new(JobSlot {
            result: None,
            waker: None,
            done: false,
        }),
        finished: Condvar::new(),
    });
    let job_state = Arc::clone(&state);
    let job: Job = Box::new(move || {
        // A panic in `work` still marks the job done (as EIO), so nobody waits forever.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(buf)))
            .unwrap_or(Err(IoError::Os(libc::EIO)));
        let waker = {
            let mut slot = job_state
                .slot
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            slot.result = Some(result);
            slot.done = true;
            slot.waker.take()
        };
        job_state.finished.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    });
    pool.queue.send(job).map_err(|_| IoError::Os(libc::EIO))?;
    Ok(BufferJob {
        state,
        _borrow: std::marker::PhantomData,
    })
}

/// Runs `work` on an I/O thread, filling the caller's `buf` in place.
pub(crate) async fn run_on_buffer<T, F>(buf: &mut [u8], work: F) -> IoResult<T>
where
    T: Send + 'static,
    F: FnOnce(&mut [u8]) -> IoResult<T> + Send + 'static,
{
    let raw = RawBuf {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    };
    run_raw(Which::Io, raw, move |b| {
        // SAFETY: `b` is `buf`, exclusively borrowed until the job is done (the
        // returned future holds the borrow and waits for the job if dropped early).
        work(unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) })
    })?
    .await
}

/// Runs `work` on a format thread (inline when already on one), filling the caller's
/// `buf` in place.
pub async fn run_format_on_buffer<T, F>(buf: &mut [u8], work: F) -> IoResult<T>
where
    T: Send + 'static,
    F: FnOnce(&mut [u8]) -> IoResult<T> + Send + 'static,
{
    if on_format_thread() {
        return work(buf);
    }
    let raw = RawBuf {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    };
    run_raw(Which::Format, raw, move |b| {
        // SAFETY: as in `run_on_buffer`.
        work(unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) })
    })?
    .await
}

/// Runs `work` on a format thread (inline when already on one), reading the caller's
/// `buf` in place.
pub async fn run_format_on_slice<T, F>(buf: &[u8], work: F) -> IoResult<T>
where
    T: Send + 'static,
    F: FnOnce(&[u8]) -> IoResult<T> + Send + 'static,
{
    if on_format_thread() {
        return work(buf);
    }
    let raw = RawBuf {
        ptr: buf.as_ptr().cast_mut(),
        len: buf.len(),
    };
    run_raw(Which::Format, raw, move |b| {
        // SAFETY: as in `run_on_slice`; only read.
        work(unsafe { std::slice::from_raw_parts(b.ptr.cast_const(), b.len) })
    })?
    .await
}

/// Runs `work` on a format thread (inline when already on one).
pub async fn run_format<T, F>(work: F) -> IoResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> IoResult<T> + Send + 'static,
{
    if on_format_thread() {
        return work();
    }
    let pool = format_pool()?;
    let (done, result) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = done.send(work());
    });
    pool.queue.send(job).map_err(|_| IoError::Os(libc::EIO))?;
    result.await.unwrap_or(Err(IoError::Os(libc::EIO)))
}

/// Runs `work` on an I/O thread, reading the caller's `buf` in place.
pub(crate) async fn run_on_slice<T, F>(buf: &[u8], work: F) -> IoResult<T>
where
    T: Send + 'static,
    F: FnOnce(&[u8]) -> IoResult<T> + Send + 'static,
{
    let raw = RawBuf {
        ptr: buf.as_ptr().cast_mut(),
        len: buf.len(),
    };
    run_raw(Which::Io, raw, move |b| {
        // SAFETY: `b` is `buf`, borrowed until the job is done (as above); it is
        // only read.
        work(unsafe { std::slice::from_raw_parts(b.ptr.cast_const(), b.len) })
    })?
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_result_comes_back_to_the_awaiting_caller() {
        assert_eq!(run(|| Ok(41 + 1)).await, Ok(42));
        assert_eq!(
            run::<(), _>(|| Err(IoError::Os(libc::ENOSPC))).await,
            Err(IoError::Os(libc::ENOSPC))
        );
    }

    #[tokio::test]
    async fn a_panicking_job_reports_eio_and_the_threads_survive() {
        start_io_threads(1).ok();
        let failed = run::<(), _>(|| panic!("job panics")).await;
        assert_eq!(failed, Err(IoError::Os(libc::EIO)));
        assert_eq!(run(|| Ok(7)).await, Ok(7));
    }

    #[tokio::test]
    async fn a_buffer_job_fills_the_callers_buffer_in_place() {
        let mut buf = vec![0u8; 8];
        let n = run_on_buffer(&mut buf, |b| {
            b.copy_from_slice(b"in place");
            Ok(b.len())
        })
        .await;
        assert_eq!(n, Ok(8));
        assert_eq!(&buf, b"in place");
        let sum = run_on_slice(&buf, |b| Ok(b.iter().map(|&x| u32::from(x)).sum::<u32>())).await;
        assert_eq!(sum, Ok(b"in place".iter().map(|&x| u32::from(x)).sum()));
    }

    #[tokio::test]
    async fn dropping_a_buffer_job_waits_until_the_thread_let_go_of_the_buffer() {
        start_io_threads(1).ok();
        let mut buf = vec![0u8; 4];
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        {
            let fut = run_on_buffer(&mut buf, move |b| {
                let _ = started_tx.send(());
                std::thread::sleep(std::time::Duration::from_millis(100));
                b.fill(7);
                Ok(())
            });
            let mut fut = Box::pin(fut);
            // Start the job, then cancel the future while the thread sleeps.
            let waker = Waker::noop();
            let mut cx = Context::from_waker(waker);
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            started_rx.recv().unwrap();
        }
        // The drop above returned only after the job wrote the buffer.
        assert_eq!(buf, vec![7u8; 4]);
    }
}
