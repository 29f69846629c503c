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
//! Jobs own their data (`'static`): the threads never see a caller's borrowed buffer,
//! because a cancelled (dropped) future must not leave a thread writing into memory
//! the caller has already reused. The price is one copy per read and per write.
//! No untrusted bytes are parsed here.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};

use crate::io::{IoError, IoResult};

/// Threads started when nothing called [`start_io_threads`] before the first request.
pub const DEFAULT_IO_THREADS: usize = 4;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The worker-wide pool of I/O threads.
struct IoThreads {
    // `Sender` is `Sync`, so requests from any executor thread queue here without a lock.
    queue: Sender<Job>,
}

static POOL: OnceLock<IoThreads> = OnceLock::new();
// Serialises pool creation so that two racing first users do not both spawn threads.
static START: Mutex<()> = Mutex::new(());

/// Starts `count` I/O threads (at least one) for this process. Call it at worker start-up,
/// before the seccomp filter forbids creating threads. Later calls do nothing.
pub fn start_io_threads(count: usize) -> std::io::Result<()> {
    let _guard = START
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if POOL.get().is_some() {
        return Ok(());
    }
    let (queue, jobs) = channel::<Job>();
    let jobs = Arc::new(Mutex::new(jobs));
    for index in 0..count.max(1) {
        let jobs = Arc::clone(&jobs);
        std::thread::Builder::new()
            .name(format!("bulkhead-io{index}"))
            .spawn(move || run_jobs(&jobs))?;
    }
    // Only this function sets POOL, under START, after checking it is empty.
    let _ = POOL.set(IoThreads { queue });
    Ok(())
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
    let pool = match POOL.get() {
        Some(pool) => pool,
        None => {
            start_io_threads(DEFAULT_IO_THREADS)?;
            POOL.get().ok_or(IoError::Os(libc::EAGAIN))?
        }
    };
    let (done, result) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = done.send(work());
    });
    pool.queue.send(job).map_err(|_| IoError::Os(libc::EIO))?;
    result.await.unwrap_or(Err(IoError::Os(libc::EIO)))
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
}
