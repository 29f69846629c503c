//! Long operations in a driver worker or the job runner
//! ([`ToWorker::StartOperation`]): each runs in a task of its own, so the control loop keeps answering (the heartbeat among them)
//! however long the work takes. Progress goes to the supervisor at most every
//! [`PROGRESS_EVERY`] per operation (the newest value at that moment: nothing queues),
//! then one `OperationEnded`. See `design/processes.md`, "Long operations".
//!
//! [`ToWorker::StartOperation`]: bulkhead_ipc::wire::ToWorker::StartOperation

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_block::mirror::{MirrorRequest, MirrorStatus};
use bulkhead_block::{BlockIo, WriteFlags};
use bulkhead_ipc::control::ControlChannel;
use bulkhead_ipc::wire::{
    FromWorker, MAX_OPERATIONS, NodeId, OpId, Operation, Steer, WorkerError, WorkerErrorKind,
    WorkerEvent,
};
use tokio::sync::watch;

/// Least time between two progress events of one operation.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Largest write of a fill.
const CHUNK: u64 = 1 << 20;

/// A frozen dirty bitmap, mapped read-only from the supervisor's region.
pub(crate) type FrozenBitmap = bulkhead_bitmap::DirtyBitmap<bulkhead_ipc::bitmap::BitmapWords>;

/// One running operation: its node, the flag that cancels it, its speed limit and
/// (a mirror) how it is steered.
struct Running {
    node: NodeId,
    cancel: watch::Sender<bool>,
    speed: watch::Sender<u64>,
    write_blocking: watch::Sender<bool>,
    complete: watch::Sender<bool>,
}

/// The nodes an operation works on, opened by the caller: the worker's own node
/// (a fill), or two nodes reached over data channels (a commit's top and base).
pub(crate) enum Nodes {
    /// The node written.
    One(Arc<dyn BlockIo>),
    /// The node read, then the node written.
    Two(Arc<dyn BlockIo>, Arc<dyn BlockIo>),
}

/// The operations a worker runs.
pub(crate) struct Operations {
    running: Arc<Mutex<HashMap<OpId, Running>>>,
    chan: Arc<ControlChannel>,
}

fn err(kind: WorkerErrorKind, errno: i32, detail: impl Into<String>) -> WorkerError {
    WorkerError::new(kind, errno, detail)
}

impl Operations {
    pub(crate) fn new(chan: Arc<ControlChannel>) -> Operations {
        Operations {
            running: Arc::default(),
            chan,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OpId, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `operation` on `node` (the worker's own, looked up by the caller) in a
    /// task of its own; refused beyond [`MAX_OPERATIONS`], for an id that runs, or
    /// for a range or node the operation cannot work on.
    /// `bitmap`: the frozen bitmap a `sync: bitmap` backup copies.
    pub(crate) fn start(
        &self,
        op: OpId,
        operation: Operation,
        nodes: Nodes,
        bitmap: Option<FrozenBitmap>,
    ) -> Result<(), WorkerError> {
        let mut running = self.lock();
        if running.contains_key(&op) {
            return Err(err(
                WorkerErrorKind::Invalid,
                libc::EEXIST,
                "operation runs",
            ));
        }
        if running.len() >= MAX_OPERATIONS {
            return Err(err(
                WorkerErrorKind::Busy,
                libc::EBUSY,
                "too many operations",
            ));
        }
        let (written, end, speed) = match (&operation, &nodes) {
            (
                Operation::Fill {
                    offset, len, speed, ..
                },
                Nodes::One(node),
            ) => (node, offset.checked_add(*len), *speed),
            (
                Operation::Backup {
                    offset, len, speed, ..
                }
                | Operation::Stream {
                    offset, len, speed, ..
                },
                Nodes::One(node),
            ) => (node, Some(*len).filter(|l| offset <= l), *speed),
            (Operation::Mirror { speed, .. }, Nodes::One(node)) => (node, Some(0), *speed),
            (Operation::Commit { len, speed, .. }, Nodes::Two(top, base)) => {
                if *len > top.size() {
                    return Err(err(
                        WorkerErrorKind::Invalid,
                        libc::EINVAL,
                        "range beyond the top",
                    ));
                }
                (base, Some(*len), *speed)
            }
            _ => {
                return Err(err(
                    WorkerErrorKind::Invalid,
                    libc::EINVAL,
                    "operation and nodes do not match",
                ));
            }
        };
        if end.is_none_or(|end| end > written.size()) {
            return Err(err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "range beyond the node",
            ));
        }
        // A backup or a mirror writes the filter's target, never the source.
        if written.read_only()
            && !matches!(
                operation,
                Operation::Backup { .. } | Operation::Mirror { .. }
            )
        {
            return Err(err(WorkerErrorKind::Invalid, libc::EROFS, "read-only node"));
        }
        let (cancel, cancelled) = watch::channel(false);
        let (speed_tx, speed_rx) = watch::channel(speed);
        let (write_blocking, write_blocking_rx) = watch::channel(false);
        let (complete, complete_rx) = watch::channel(false);
        running.insert(
            op,
            Running {
                node: operation.node(),
                cancel,
                speed: speed_tx,
                write_blocking,
                complete,
            },
        );
        let table = Arc::clone(&self.running);
        let mut report = Reporter {
            op,
            chan: Arc::clone(&self.chan),
            last: None,
        };
        tokio::spawn(async move {
            let control = Control {
                cancel: cancelled,
                speed: speed_rx,
                write_blocking: write_blocking_rx,
                complete: complete_rx,
            };
            let result = match nodes {
                Nodes::One(node) if matches!(operation, Operation::Backup { .. }) => {
                    backup(operation, node, bitmap, control, &mut report).await
                }
                Nodes::One(node) if matches!(operation, Operation::Stream { .. }) => {
                    stream(operation, node, control, &mut report).await
                }
                Nodes::One(node) if matches!(operation, Operation::Mirror { .. }) => {
                    mirror(operation, node, control, &mut report).await
                }
                Nodes::One(node) => fill(operation, node, control, &mut report).await,
                Nodes::Two(top, base) => commit(operation, top, base, control, &mut report).await,
            };
            // Out of the table before the end is reported: the supervisor may start
            // another at once.
            table.lock().unwrap_or_else(|p| p.into_inner()).remove(&op);
            let ended = WorkerEvent::OperationEnded { op, result };
            if let Err(e) = report.chan.send(&FromWorker::Event(ended), &[]).await {
                tracing::warn!(%op, error = %e, "could not report the end of an operation");
            }
        });
        Ok(())
    }

    /// Asks `op` to stop; its end is reported as usual.
    pub(crate) fn cancel(&self, op: OpId) -> Result<(), WorkerError> {
        match self.lock().get(&op) {
            Some(r) => {
                r.cancel.send_replace(true);
                Ok(())
            }
            None => Err(err(
                WorkerErrorKind::NotFound,
                libc::ENOENT,
                "no such operation",
            )),
        }
    }

    /// Changes `op`'s speed limit from its next chunk on.
    pub(crate) fn set_speed(&self, op: OpId, speed: u64) -> Result<(), WorkerError> {
        match self.lock().get(&op) {
            Some(r) => {
                r.speed.send_replace(speed);
                Ok(())
            }
            None => Err(err(
                WorkerErrorKind::NotFound,
                libc::ENOENT,
                "no such operation",
            )),
        }
    }

    /// Steers a running mirror (see [`Steer`]).
    pub(crate) fn steer(&self, op: OpId, steer: Steer) -> Result<(), WorkerError> {
        match self.lock().get(&op) {
            Some(r) => {
                match steer {
                    Steer::WriteBlocking => r.write_blocking.send_replace(true),
                    Steer::Complete => r.complete.send_replace(true),
                };
                Ok(())
            }
            None => Err(err(
                WorkerErrorKind::NotFound,
                libc::ENOENT,
                "no such operation",
            )),
        }
    }

    /// Cancels every operation on `node` (it is being closed).
    pub(crate) fn cancel_node(&self, node: NodeId) {
        for r in self.lock().values().filter(|r| r.node == node) {
            r.cancel.send_replace(true);
        }
    }
}

/// Sends one operation's progress, at most every [`PROGRESS_EVERY`].
struct Reporter {
    op: OpId,
    chan: Arc<ControlChannel>,
    last: Option<Instant>,
}

impl Reporter {
    async fn progress(&mut self, done: u64, total: u64) {
        if self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.send(done, total).await;
    }

    /// Sends `done` and `total` now, whenever the last one went (the numbers an
    /// event about to follow carries).
    async fn send(&mut self, done: u64, total: u64) {
        self.last = Some(Instant::now());
        let event = WorkerEvent::Progress {
            op: self.op,
            done,
            total,
        };
        if let Err(e) = self.chan.send(&FromWorker::Event(event), &[]).await {
            tracing::warn!(op = %self.op, error = %e, "could not report progress");
        }
    }
}

impl Reporter {
    /// Tells the supervisor a mirror has nothing dirty left.
    async fn ready(&mut self) {
        let event = WorkerEvent::OperationReady { op: self.op };
        if let Err(e) = self.chan.send(&FromWorker::Event(event), &[]).await {
            tracing::warn!(op = %self.op, error = %e, "could not report a mirror ready");
        }
    }
}

fn cancelled() -> WorkerError {
    err(WorkerErrorKind::Cancelled, libc::ECANCELED, "cancelled")
}

/// What steers a running operation: its cancel flag, its speed limit and (a
/// mirror) its copy mode and completion.
struct Control {
    cancel: watch::Receiver<bool>,
    speed: watch::Receiver<u64>,
    write_blocking: watch::Receiver<bool>,
    complete: watch::Receiver<bool>,
}

/// The chunk size and rate limiting of a copy or fill: at most `speed` bytes a second
/// (0: no limit), measured from the last change of the limit, about ten chunks a
/// second at the limit so that progress and cancelling stay prompt.
struct Pace {
    speed: u64,
    since: tokio::time::Instant,
    done_since: u64,
}

impl Pace {
    fn new(speed: u64) -> Pace {
        Pace {
            speed,
            since: tokio::time::Instant::now(),
            done_since: 0,
        }
    }

    fn chunk(&self, max: u64) -> u64 {
        match self.speed {
            0 => max,
            s => (s / 10).clamp(512, max),
        }
    }

    /// Accounts `n` bytes and waits until they are due; a new limit restarts the
    /// measure. Returns `Err` when cancelled meanwhile.
    async fn pass(&mut self, n: u64, control: &mut Control) -> Result<(), WorkerError> {
        let now = *control.speed.borrow_and_update();
        if now != self.speed {
            *self = Pace::new(now);
        }
        self.done_since += n;
        if self.speed == 0 {
            return Ok(());
        }
        let due = self.since + Duration::from_secs_f64(self.done_since as f64 / self.speed as f64);
        tokio::select! {
            () = tokio::time::sleep_until(due) => Ok(()),
            _ = control.cancel.wait_for(|c| *c) => Err(cancelled()),
            _ = control.speed.changed() => Ok(()),
        }
    }
}

fn io(e: bulkhead_block::IoError) -> WorkerError {
    let kind = match e {
        bulkhead_block::IoError::Source(_) => WorkerErrorKind::SourceIo,
        _ => WorkerErrorKind::Io,
    };
    err(kind, e.errno(), e.to_string())
}

async fn fill(
    operation: Operation,
    node: Arc<dyn BlockIo>,
    mut control: Control,
    report: &mut Reporter,
) -> Result<(), WorkerError> {
    let Operation::Fill {
        offset,
        len,
        pattern,
        speed,
        ..
    } = operation
    else {
        return Err(err(WorkerErrorKind::Invalid, libc::EINVAL, "not a fill"));
    };
    let mut pace = Pace::new(speed);
    let buf = vec![pattern; usize::try_from(CHUNK).unwrap_or(1 << 20)];
    let mut done = 0u64;
    report.progress(0, len).await;
    while done < len {
        // A write is never abandoned half-way: cancelling takes effect between chunks.
        if *control.cancel.borrow() {
            return Err(cancelled());
        }
        let n = pace.chunk(CHUNK).min(len - done);
        let slice = &buf[..usize::try_from(n).unwrap_or(buf.len())];
        node.write(offset + done, slice, WriteFlags::default())
            .await
            .map_err(io)?;
        done += n;
        report.progress(done, len).await;
        pace.pass(n, &mut control).await?;
    }
    node.flush().await.map_err(io)
}

/// Largest piece a commit copies at once (QEMU's `COMMIT_BUFFER_SIZE` is 512 KiB;
/// a piece may cross two data channels here, so bigger pieces keep the copy from
/// being bound by round trips: `benches -- --jobs`). The next piece's read
/// overlaps the last one's write.
const COMMIT_CHUNK: u64 = 8 << 20;

/// A commit's copy: what the `layers` topmost layers of `top` hold goes to `base`,
/// piece by piece, from `offset` to `len`. Reads go through `top` (its chain
/// supplies the data), writes to `base`; the supervisor has made `base` writable.
async fn commit(
    operation: Operation,
    top: Arc<dyn BlockIo>,
    base: Arc<dyn BlockIo>,
    mut control: Control,
    report: &mut Reporter,
) -> Result<(), WorkerError> {
    let Operation::Commit {
        layers,
        offset,
        len,
        speed,
        ..
    } = operation
    else {
        return Err(err(WorkerErrorKind::Invalid, libc::EINVAL, "not a commit"));
    };
    let mut pace = Pace::new(speed);
    let mut pos = offset;
    let mut pending: Option<ReadPiece> = None;
    let mut spare = Vec::new();
    report.progress(pos, len).await;
    while pos < len || pending.is_some() {
        if *control.cancel.borrow() {
            return Err(cancelled());
        }
        // The next piece's read overlaps the last one's write.
        let n = pace.chunk(COMMIT_CHUNK).min(len - pos);
        let read = async {
            if pos < len {
                Some(read_piece(&*top, pos, n, layers, std::mem::take(&mut spare)).await)
            } else {
                None
            }
        };
        let (read, wrote) = match pending.take() {
            Some((end, runs, buf)) => {
                let (r, w) = tokio::join!(read, write_runs(&*base, &runs, &buf));
                (r, Some((end, w, buf)))
            }
            None => (read.await, None),
        };
        if let Some((end, copied, buf)) = wrote {
            let copied = copied?;
            spare = buf;
            // Progress is where the writes have reached: a new run goes on from
            // there, never past a piece read but not written.
            report.progress(end, len).await;
            // Only what was copied counts against the speed limit (QEMU's commit
            // charges copied bytes only).
            pace.pass(copied, &mut control).await?;
        }
        if let Some(r) = read {
            let (end, runs, buf) = r?;
            pos = end;
            pending = Some((end, runs, buf));
        }
    }
    base.flush().await.map_err(io)
}

/// A commit piece read and not written yet: where it ends, its runs (offset,
/// length) and their bytes back to back.
type ReadPiece = (u64, Vec<(u64, u64)>, Vec<u8>);

/// Reads what the `layers` topmost layers of `top` hold in `[pos, pos + n)`: where
/// the reading stopped (the piece's end, or less if the status covered less), the
/// runs, and their bytes back to back in `buf`.
async fn read_piece(
    top: &dyn BlockIo,
    pos: u64,
    n: u64,
    layers: u32,
    mut buf: Vec<u8>,
) -> Result<ReadPiece, WorkerError> {
    // Failures reading the top are the source's (`on-error` with operation read).
    let src = |e: bulkhead_block::IoError| io(e.in_source());
    let extents = top.block_status(pos, n).await.map_err(src)?;
    let mut at = pos;
    let mut runs = Vec::new();
    for e in extents {
        let end = at.saturating_add(e.length).min(pos + n);
        if end <= at {
            break;
        }
        if (1..=layers).contains(&e.depth) {
            runs.push((at, end - at));
        }
        at = end;
    }
    // A status that does not cover the piece is a protocol error of the node's
    // worker: never loop on it.
    if at == pos {
        return Err(err(
            WorkerErrorKind::Io,
            libc::EIO,
            "block status covered nothing",
        ));
    }
    let total: u64 = runs.iter().map(|r| r.1).sum();
    buf.resize(usize::try_from(total).unwrap_or(0), 0);
    let mut used = 0usize;
    for &(at, l) in &runs {
        let l = usize::try_from(l).unwrap_or(0);
        top.read(at, &mut buf[used..used + l]).await.map_err(src)?;
        used += l;
    }
    Ok((at, runs, buf))
}

/// Writes runs read by [`read_piece`] to `base`; returns the bytes written.
async fn write_runs(
    base: &dyn BlockIo,
    runs: &[(u64, u64)],
    buf: &[u8],
) -> Result<u64, WorkerError> {
    let mut used = 0usize;
    for &(at, l) in runs {
        let n = usize::try_from(l).unwrap_or(0);
        let data = buf
            .get(used..used + n)
            .ok_or_else(|| err(WorkerErrorKind::Io, libc::EIO, "short commit buffer"))?;
        base.write(at, data, WriteFlags::default())
            .await
            .map_err(io)?;
        used += n;
    }
    Ok(runs.iter().map(|r| r.1).sum())
}

/// Largest piece a backup or stream copy takes at once.
const BACKUP_CHUNK: u64 = 8 << 20;

/// A backup's copy: every piece of `[offset, len)` (with `top_only`, those the
/// source's top layer holds) is saved through the filter's claims
/// ([`BlockIo::copy_before_write`]), so a cluster a guest write saved already is
/// skipped and one being saved is waited for.
async fn backup(
    operation: Operation,
    filter: Arc<dyn BlockIo>,
    bitmap: Option<FrozenBitmap>,
    mut control: Control,
    report: &mut Reporter,
) -> Result<(), WorkerError> {
    let Operation::Backup {
        offset,
        len,
        top_only,
        speed,
        bitmap: spec,
        ..
    } = operation
    else {
        return Err(err(WorkerErrorKind::Invalid, libc::EINVAL, "not a backup"));
    };
    match (spec, bitmap) {
        (Some(spec), Some(bitmap)) => {
            return backup_bitmap(filter, &bitmap, spec.total, len, speed, control, report).await;
        }
        (None, None) => {}
        _ => {
            return Err(err(
                WorkerErrorKind::Invalid,
                libc::EINVAL,
                "a bitmap backup without its bitmap",
            ));
        }
    }
    let mut pace = Pace::new(speed);
    let mut pos = offset;
    report.progress(pos, len).await;
    while pos < len {
        if *control.cancel.borrow() {
            return Err(cancelled());
        }
        let n = pace.chunk(BACKUP_CHUNK).min(len - pos);
        let mut copied = 0;
        if top_only {
            let mut at = pos;
            for e in filter.block_status(pos, n).await.map_err(io)? {
                let end = at.saturating_add(e.length).min(pos + n);
                if end <= at {
                    break;
                }
                if e.depth == 1 {
                    filter.copy_before_write(at, end - at).await.map_err(io)?;
                    copied += end - at;
                }
                at = end;
            }
            if at == pos {
                return Err(err(
                    WorkerErrorKind::Io,
                    libc::EIO,
                    "block status covered nothing",
                ));
            }
            pos = at;
        } else {
            filter.copy_before_write(pos, n).await.map_err(io)?;
            copied = n;
            pos += n;
        }
        report.progress(pos, len).await;
        pace.pass(copied, &mut control).await?;
    }
    Ok(())
}

/// A `sync: bitmap` backup's copy: the ranges the frozen bitmap holds, through the
/// filter's claims; progress counts the dirty bytes passed, from 0 (a resumed copy
/// passes over what was saved already without copying it again).
async fn backup_bitmap(
    filter: Arc<dyn BlockIo>,
    bitmap: &FrozenBitmap,
    total: u64,
    len: u64,
    speed: u64,
    mut control: Control,
    report: &mut Reporter,
) -> Result<(), WorkerError> {
    let mut pace = Pace::new(speed);
    let mut done = 0u64;
    report.progress(0, total).await;
    for (start, len) in bitmap.dirty_ranges(0, len.min(bitmap.size())) {
        let mut at = start;
        while at < start + len {
            if *control.cancel.borrow() {
                return Err(cancelled());
            }
            let n = pace.chunk(BACKUP_CHUNK).min(start + len - at);
            filter.copy_before_write(at, n).await.map_err(io)?;
            at += n;
            done = (done + n).min(total);
            report.progress(done, total).await;
            pace.pass(n, &mut control).await?;
        }
    }
    report.send(total, total).await;
    Ok(())
}

/// A stream's copy: every piece of `[offset, len)` through the filter's
/// [`BlockIo::copy_on_read`], which copies what the layers below hold into the top
/// layer under its claims.
async fn stream(
    operation: Operation,
    filter: Arc<dyn BlockIo>,
    mut control: Control,
    report: &mut Reporter,
) -> Result<(), WorkerError> {
    let Operation::Stream {
        offset,
        len,
        layers,
        speed,
        ..
    } = operation
    else {
        return Err(err(WorkerErrorKind::Invalid, libc::EINVAL, "not a stream"));
    };
    let mut pace = Pace::new(speed);
    let mut pos = offset;
    report.progress(pos, len).await;
    while pos < len {
        if *control.cancel.borrow() {
            return Err(cancelled());
        }
        let n = pace.chunk(BACKUP_CHUNK).min(len - pos);
        filter.copy_on_read(pos, n, layers).await.map_err(io)?;
        pos += n;
        report.progress(pos, len).await;
        pace.pass(n, &mut control).await?;
    }
    filter.flush().await.map_err(io)
}

/// Most a mirror copies per step (its filter pipelines runs of 2 MiB), and scans
/// at once.
const MIRROR_CHUNK: u64 = 32 << 20;
const MIRROR_SCAN: u64 = 256 << 20;
/// How long a mirror waits before it looks again at dirty chunks guest writes hold.
const MIRROR_HELD: Duration = Duration::from_millis(5);
/// Copy steps a mirror without a speed limit runs at once: two keep both cores
/// writing (`benches -- --jobs`; four measured slower, their allocations in a qcow2
/// target landing out of order).
const MIRROR_PARALLEL: usize = 2;

/// A mirror's copy (see [`Operation::Mirror`]), through its `mirror_top` filter:
/// the scan, then dirty chunks to the target; ready once nothing is dirty, then it
/// follows guest writes until cancelled, or until told to complete: then guest
/// writes block, what is left is copied, the target flushed, and it ends.
async fn mirror(
    operation: Operation,
    filter: Arc<dyn BlockIo>,
    mut control: Control,
    report: &mut Reporter,
) -> Result<(), WorkerError> {
    let Operation::Mirror {
        offset,
        scan,
        write_blocking,
        complete,
        speed,
        ..
    } = operation
    else {
        return Err(err(WorkerErrorKind::Invalid, libc::EINVAL, "not a mirror"));
    };
    let ask = |r: MirrorRequest| {
        let filter = Arc::clone(&filter);
        async move { filter.mirror(r).await.map_err(io) }
    };
    let mut pace = Pace::new(speed);
    let mut done = offset;
    let mut blocking = false;
    if write_blocking {
        ask(MirrorRequest::WriteBlocking).await?;
        blocking = true;
    }
    if let Some(layers) = scan {
        loop {
            if *control.cancel.borrow() {
                return Err(cancelled());
            }
            let s = ask(MirrorRequest::Scan {
                layers,
                max: MIRROR_SCAN,
            })
            .await?;
            report.progress(done, done + s.dirty).await;
            if s.scanned {
                break;
            }
        }
    }
    let mut completing = false;
    let mut ready = false;
    loop {
        if *control.cancel.borrow() {
            return Err(cancelled());
        }
        if !blocking && *control.write_blocking.borrow() {
            ask(MirrorRequest::WriteBlocking).await?;
            blocking = true;
        }
        if !completing && (complete || *control.complete.borrow()) {
            // Blocking from here on: once nothing is dirty, nothing will be.
            ask(MirrorRequest::WriteBlocking).await?;
            blocking = true;
            completing = true;
        }
        // Unlimited, several runs at once, refilled as each ends: one's reads
        // overlap another's writes, and no copy waits for its slowest sibling.
        let parallel = if pace.speed == 0 { MIRROR_PARALLEL } else { 1 };
        let max = pace.chunk(MIRROR_CHUNK);
        let mut copies = tokio::task::JoinSet::new();
        for _ in 0..parallel {
            copies.spawn(ask(MirrorRequest::Copy { max }));
        }
        // Every copy runs to its end (a claim is given back by its copy).
        let mut s = MirrorStatus::default();
        let mut failed = None;
        while let Some(r) = copies.join_next().await {
            match r {
                Ok(Ok(one)) => {
                    s.copied += one.copied;
                    s.dirty = one.dirty;
                    s.background = one.background;
                    done += one.synced + one.copied;
                    if one.copied == 0 {
                        continue;
                    }
                    report.progress(done, done + one.dirty).await;
                    if let Err(e) = pace.pass(one.copied, &mut control).await {
                        failed = Some(e);
                        continue;
                    }
                    let steady = !*control.cancel.borrow()
                        && (blocking || !*control.write_blocking.borrow())
                        && (completing || !*control.complete.borrow());
                    if failed.is_none() && pace.speed == 0 && steady {
                        copies.spawn(ask(MirrorRequest::Copy { max }));
                    }
                }
                Ok(Err(e)) => failed = Some(e),
                Err(e) => failed = Some(err(WorkerErrorKind::Io, libc::EIO, e.to_string())),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if s.copied > 0 {
            continue;
        }
        if s.dirty > 0 {
            // Every dirty chunk is held by a guest write: look again shortly.
            tokio::select! {
                () = tokio::time::sleep(MIRROR_HELD) => {}
                _ = control.cancel.wait_for(|c| *c) => return Err(cancelled()),
            }
            continue;
        }
        if completing && s.background == 0 {
            report.send(done, done).await;
            return filter.flush().await.map_err(io);
        }
        if !ready {
            report.send(done, done).await;
            report.ready().await;
            ready = true;
        }
        report.progress(done, done).await;
        tokio::select! {
            r = ask(MirrorRequest::WaitDirty) => { done += r?.synced; }
            _ = control.cancel.wait_for(|c| *c) => return Err(cancelled()),
            _ = control.complete.wait_for(|c| *c), if !completing => {}
            _ = control.write_blocking.wait_for(|c| *c), if !blocking => {}
        }
    }
}
