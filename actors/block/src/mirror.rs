//! The `mirror_top` filter (the node QEMU's `block/mirror.c` puts above a mirror
//! job's source): guest I/O passes through to its `file` child (the source), and
//! every guest write, write-zeroes or discard marks the chunks it touched dirty. A
//! mirror job's copy ([`BlockIo::mirror`]) marks what its sync mode takes first
//! (a scan), then copies dirty chunks to the `target` child until none is left, and
//! keeps doing so for as long as the job runs.
//!
//! Two copy modes, as QEMU's `copy-mode`:
//! - background: a guest write completes once the source has it, and marks its
//!   chunks after it completed; the copy clears a chunk's bit before it reads the
//!   source, so a write racing with a copy leaves the chunk dirty and it is copied
//!   again. A chunk is never copied by two copies at once (a claim), so an older
//!   copy never lands after a newer one.
//! - write-blocking: a guest write claims its chunks (waiting for a copy of them)
//!   and completes once both the source and the target have it; so once nothing is
//!   dirty the target stays equal to the source. Switching to it waits for the
//!   background writes in flight, so none marks late. A job's completion switches
//!   to it, copies what is left and ends: from then on target and source are equal
//!   until the job swaps them in the graph.
//!
//! Runs in a driver worker; both children may live in other processes (reached
//! through [`BlockIo`]). The dirty map lives here: if this process dies, the job's
//! next copy scans again (see `design/jobs.md`). No untrusted bytes are parsed here.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::config::CommonOptions;
use crate::driver::{
    BlockDriver, ChildRole, ChildSlot, Children, DriverInfo, OpenFuture, ParseError, Parsed,
    Resize, decode, opened,
};
use crate::io::{BlockIo, Extent, IoError, IoFuture, SparseFuture, WriteFlags, ZeroFlags};

/// The dirty chunk size when the job names none (QEMU's default for a target
/// without a cluster size).
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Most bytes one read (and one write) of a copy carries: 2 MiB runs copy faster
/// than 8 MiB ones (a run is still in the CPU caches when it is written; 15
/// alternating runs each against qsd, design/jobs.md).
const MAX_RUN: u64 = 2 << 20;
/// The writes a failed piece is retried in, so that progress is kept to this
/// granularity (a target that fills up keeps all that fitted, as qsd's 1 MiB
/// requests do).
const FINE_WRITE: usize = 1 << 20;
/// Copy buffers a mirror keeps between copies: two steps at once, each with a run
/// being read and one being written.
const POOLED_BUFFERS: usize = 4;

/// A run's bytes between its read and its write: in the target's data-channel
/// pool when the target is in another process and the pool has room (the target's
/// worker writes straight from it: no copy into the channel), else a pooled `Vec`.
enum CopyBuf {
    Local(Vec<u8>),
    Shared(crate::io::IoBuffer),
}

impl std::ops::Deref for CopyBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            CopyBuf::Local(v) => v,
            CopyBuf::Shared(b) => b,
        }
    }
}

impl std::ops::DerefMut for CopyBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            CopyBuf::Local(v) => v,
            CopyBuf::Shared(b) => b,
        }
    }
}

/// A piece of a run being copied: data, or zeroes the target writes as such.
#[derive(Debug, Clone, Copy)]
struct Piece {
    offset: u64,
    len: u64,
    zero: bool,
}

fn pieces_len(pieces: &[Piece]) -> u64 {
    pieces.iter().map(|p| p.len).sum()
}

/// What a mirror job's copy asks its filter ([`BlockIo::mirror`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorRequest {
    /// Marks dirty, from where the scan stands, at most `max` bytes' worth of what
    /// the sync mode copies: every byte (`layers` 0), or what the `layers` topmost
    /// layers of the source hold.
    Scan { layers: u32, max: u64 },
    /// Copies dirty chunks, at most `max` bytes, to the target.
    Copy { max: u64 },
    /// Guest writes reach the target before they complete from now on; answers once
    /// no write started before is in flight.
    WriteBlocking,
    /// Answers once something is dirty.
    WaitDirty,
}

/// Where a mirror stands, after a [`MirrorRequest`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MirrorStatus {
    /// Bytes the request copied (a copy).
    pub copied: u64,
    /// Dirty bytes left.
    pub dirty: u64,
    /// The scan has reached the end of the source.
    pub scanned: bool,
    /// Background writes in flight (each marks when it completes).
    pub background: u64,
    /// Bytes write-blocking guest writes brought to the target since the last
    /// request (QEMU counts them as the job's progress).
    pub synced: u64,
}

/// `mirror_top` configuration, set by the supervisor (users cannot add this node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorConfig {
    /// The generic node options.
    pub common: CommonOptions,
    /// The dirty chunk size (a power of two, 512 B to 64 MiB).
    pub granularity: u64,
    /// `copy-mode: write-blocking` from the start.
    pub write_blocking: bool,
}

/// The options the supervisor gives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MirrorOptions {
    granularity: Option<u64>,
    write_blocking: Option<bool>,
}

/// The `mirror_top` driver.
pub struct MirrorTop;

impl BlockDriver for MirrorTop {
    type Config = MirrorConfig;
    const INFO: DriverInfo = DriverInfo {
        name: "mirror_top",
        image: None,
        protocol: false,
        children: &[
            ChildSlot {
                key: "file",
                role: ChildRole::File,
                required: true,
            },
            ChildSlot {
                key: "target",
                role: ChildRole::Target,
                required: true,
            },
        ],
        reopen_options: &[],
        resize: Resize::Unsupported,
        caps: crate::node::Capabilities {
            write_zeroes: true,
            discard: true,
            discard_stats: false,
        },
        // A filter calls nothing beyond what `raw`'s window does.
        policy: "raw",
        format_threads: false,
        filter: true,
        protocol_child: false,
    };

    fn parse(members: &Map<String, Value>) -> Result<Parsed<MirrorConfig>, ParseError> {
        let o: MirrorOptions = decode(members)?;
        let granularity = o.granularity.unwrap_or(DEFAULT_GRANULARITY);
        if !granularity.is_power_of_two() || !(512..=64 << 20).contains(&granularity) {
            return Err(ParseError::Decode(format!(
                "mirror granularity {granularity} is not a power of 2 from 512 B to 64 MiB"
            )));
        }
        Ok(Parsed {
            config: MirrorConfig {
                granularity,
                write_blocking: o.write_blocking.unwrap_or(false),
                ..MirrorConfig::default()
            },
            image: None,
            strong: Map::new(),
        })
    }

    fn common(config: &MirrorConfig) -> &CommonOptions {
        &config.common
    }

    fn common_mut(config: &mut MirrorConfig) -> &mut CommonOptions {
        &mut config.common
    }

    fn open(config: &MirrorConfig, _: Option<OwnedFd>, mut children: Children) -> OpenFuture {
        let (source, target) = (
            children.take(ChildRole::File),
            children.take(ChildRole::Target),
        );
        let config = *config;
        opened(match (source, target) {
            (Some(source), Some(target)) => {
                Ok(Arc::new(MirrorDriver::new(source, target, &config)) as Arc<dyn BlockIo>)
            }
            _ => Err(crate::OpenError::MissingChild),
        })
    }
}

/// The dirty map and the claims.
#[derive(Debug, Default)]
struct State {
    /// One bit per chunk.
    dirty: Vec<u64>,
    /// Set bits in `dirty`.
    count: u64,
    /// Chunks a copy or a write-blocking guest write holds.
    claimed: HashSet<u64>,
    /// Background guest writes in flight.
    background: u64,
    write_blocking: bool,
    /// How far the scan has marked.
    scanned: u64,
    /// Where the next copy starts looking (chunks), so copies sweep the source.
    cursor: u64,
    /// Bytes write-blocking guest writes synced, not reported yet.
    synced: u64,
}

impl State {
    fn is_dirty(&self, c: u64) -> bool {
        usize::try_from(c / 64)
            .ok()
            .and_then(|i| self.dirty.get(i))
            .is_some_and(|w| w >> (c % 64) & 1 != 0)
    }

    fn set(&mut self, c: u64) {
        if let Ok(i) = usize::try_from(c / 64)
            && let Some(w) = self.dirty.get_mut(i)
            && *w >> (c % 64) & 1 == 0
        {
            *w |= 1 << (c % 64);
            self.count += 1;
        }
    }

    fn clear(&mut self, c: u64) {
        if let Ok(i) = usize::try_from(c / 64)
            && let Some(w) = self.dirty.get_mut(i)
            && *w >> (c % 64) & 1 != 0
        {
            *w &= !(1 << (c % 64));
            self.count -= 1;
        }
    }

    /// The first run of dirty chunks nobody holds, from the cursor on (wrapping),
    /// at most `max_chunks` long.
    fn next_run(&self, chunks: u64, max_chunks: u64) -> Option<(u64, u64)> {
        if self.count == 0 || chunks == 0 {
            return None;
        }
        let free = |c: u64| self.is_dirty(c) && !self.claimed.contains(&c);
        let start = self.cursor % chunks;
        let first = (start..chunks).chain(0..start).find(|&c| free(c))?;
        let mut n = 1;
        while n < max_chunks && first + n < chunks && free(first + n) {
            n += 1;
        }
        Some((first, n))
    }
}

/// A change a guest makes, applied to the source and (write-blocking) the target.
#[derive(Clone, Copy)]
enum Change<'a> {
    Write(&'a [u8], WriteFlags),
    Zeroes(ZeroFlags),
    Discard,
}

async fn apply(
    node: &dyn BlockIo,
    offset: u64,
    len: u64,
    change: Change<'_>,
) -> Result<(), IoError> {
    match change {
        Change::Write(buf, flags) => node.write(offset, buf, flags).await,
        Change::Zeroes(flags) => node.write_zeroes(offset, len, flags).await,
        Change::Discard => node.discard(offset, len).await,
    }
}

/// A `mirror_top` node.
pub struct MirrorDriver {
    source: Arc<dyn BlockIo>,
    target: Arc<dyn BlockIo>,
    granularity: u64,
    /// Chunks in the source at open (a mirror's source does not resize).
    chunks: u64,
    state: Mutex<State>,
    /// Woken when a claim or a background write ends.
    released: Notify,
    /// Woken when a chunk becomes dirty.
    dirtied: Notify,
    /// Copy buffers kept between copies.
    buffers: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for MirrorDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorDriver")
            .field("granularity", &self.granularity)
            .finish_non_exhaustive()
    }
}

impl MirrorDriver {
    fn new(source: Arc<dyn BlockIo>, target: Arc<dyn BlockIo>, config: &MirrorConfig) -> Self {
        let granularity = config.granularity.max(512);
        let chunks = source.size().div_ceil(granularity);
        let words = usize::try_from(chunks.div_ceil(64)).unwrap_or(0);
        MirrorDriver {
            source,
            target,
            granularity,
            chunks,
            state: Mutex::new(State {
                dirty: vec![0; words],
                write_blocking: config.write_blocking,
                ..State::default()
            }),
            released: Notify::new(),
            dirtied: Notify::new(),
            buffers: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunks `[offset, offset + len)` touches (`len` > 0).
    fn chunks_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        offset / self.granularity..=offset.saturating_add(len - 1) / self.granularity
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        {
            let mut s = self.lock();
            for c in self.chunks_of(offset, len) {
                s.set(c);
            }
        }
        self.dirtied.notify_waiters();
    }

    /// Where the mirror stands; hands over the synced bytes not reported yet.
    fn status(&self, copied: u64) -> MirrorStatus {
        let size = self.source.size();
        let mut s = self.lock();
        // The last chunk may reach past the end: count only the bytes it has.
        let overhang = self
            .chunks
            .saturating_mul(self.granularity)
            .saturating_sub(size);
        let last_dirty = self.chunks > 0 && s.is_dirty(self.chunks - 1);
        MirrorStatus {
            copied,
            dirty: s
                .count
                .saturating_mul(self.granularity)
                .saturating_sub(if last_dirty { overhang } else { 0 }),
            scanned: s.scanned >= size,
            background: s.background,
            synced: std::mem::take(&mut s.synced),
        }
    }

    /// A guest change: through to the source, and in write-blocking mode to the
    /// target too under claims on its chunks; marked dirty where the target may
    /// not have it.
    async fn guest(&self, offset: u64, len: u64, change: Change<'_>) -> Result<(), IoError> {
        if len == 0 {
            return apply(&*self.source, offset, len, change).await;
        }
        let chunks = self.chunks_of(offset, len);
        let blocking = loop {
            // Registered before the claims are looked at, so a release meanwhile
            // wakes it.
            let released = self.released.notified();
            {
                let mut s = self.lock();
                if !s.write_blocking {
                    s.background += 1;
                    break false;
                }
                if chunks.clone().all(|c| !s.claimed.contains(&c)) {
                    s.claimed.extend(chunks.clone());
                    break true;
                }
            }
            released.await;
        };
        // Released however this ends, a dropped request included (its chunks are
        // then dirty: the source may or may not have the change).
        let mut held = GuestHold {
            mirror: self,
            chunks,
            blocking,
            synced: None,
        };
        let result = apply(&*self.source, offset, len, change).await;
        // The target takes the same change, but a discard leaves undefined data
        // behind: the copy brings the chunk over instead.
        let synced = blocking
            && result.is_ok()
            && !matches!(change, Change::Discard)
            && apply(&*self.target, offset, len, change).await.is_ok();
        held.synced = synced.then_some(len);
        drop(held);
        result
    }

    /// One scan step (see [`MirrorRequest::Scan`]).
    async fn scan(&self, layers: u32, max: u64) -> Result<MirrorStatus, IoError> {
        let size = self.source.size();
        let pos = self.lock().scanned;
        if pos >= size {
            return Ok(self.status(0));
        }
        let n = max.max(1).min(size - pos);
        let mut at = pos;
        if layers == 0 {
            self.mark(pos, n);
            at = pos + n;
        } else {
            for e in self.source.block_status(pos, n).await? {
                let end = at.saturating_add(e.length).min(pos + n);
                if end <= at {
                    break;
                }
                if (1..=layers).contains(&e.depth) {
                    self.mark(at, end - at);
                }
                at = end;
            }
            // A status covering nothing is the source's protocol error: never
            // loop on it.
            if at == pos {
                return Err(IoError::Invalid);
            }
        }
        {
            let mut s = self.lock();
            s.scanned = s.scanned.max(at);
        }
        Ok(self.status(0))
    }

    /// Claims the next run of dirty chunks nobody holds (at most `max_chunks`),
    /// clearing them: its byte range and its hold.
    fn claim(&self, max_chunks: u64) -> Option<(u64, u64, CopyHold<'_>)> {
        let (first, n) = {
            let mut s = self.lock();
            let (first, n) = s.next_run(self.chunks, max_chunks)?;
            for c in first..first + n {
                s.clear(c);
                s.claimed.insert(c);
            }
            s.cursor = first + n;
            (first, n)
        };
        let size = self.source.size();
        let start = first.saturating_mul(self.granularity).min(size);
        let len = n.saturating_mul(self.granularity).min(size - start);
        let hold = CopyHold {
            mirror: self,
            chunks: first..first + n,
            copied: false,
            reached: start,
        };
        Some((start, len, hold))
    }

    /// One copy step (see [`MirrorRequest::Copy`]): runs of dirty chunks nobody
    /// holds, up to `max` bytes, each at most [`MAX_RUN`], are claimed and cleared,
    /// read from the source and written to the target, the next run's read
    /// overlapping the last one's write (writes stay in order, so the target's
    /// clusters are allocated in order); a run whose copy fails is dirty again.
    async fn copy(&self, max: u64) -> Result<MirrorStatus, IoError> {
        let max_chunks = (MAX_RUN / self.granularity).max(1);
        let mut runs = Vec::new();
        let mut claimed = 0u64;
        while claimed < max.max(1) {
            match self.claim(max_chunks) {
                Some(run) => {
                    claimed += run.1;
                    runs.push(run);
                }
                None => break,
            }
        }
        if runs.is_empty() {
            return Ok(self.status(0));
        }
        let mut copied = 0u64;
        let mut writing: Option<(Vec<Piece>, CopyBuf, CopyHold<'_>)> = None;
        for (start, len, hold) in runs {
            let read = self.read_run(start, len);
            let (pieces, buf) = match writing.take() {
                Some((pieces, wbuf, mut whold)) => {
                    let (written, read) =
                        tokio::join!(self.write_run(&pieces, &wbuf, &mut whold), read);
                    self.give_buffer(wbuf);
                    written?;
                    whold.copied = true;
                    copied += pieces_len(&pieces);
                    read?
                }
                None => read.await?,
            };
            writing = Some((pieces, buf, hold));
        }
        if let Some((pieces, buf, mut hold)) = writing {
            let written = self.write_run(&pieces, &buf, &mut hold).await;
            self.give_buffer(buf);
            written?;
            hold.copied = true;
            copied += pieces_len(&pieces);
        }
        Ok(self.status(copied))
    }

    /// Reads `[start, start + len)` of the source: its pieces (zeroes are not
    /// read) and the buffer holding the data ones, back to back.
    async fn read_run(&self, start: u64, len: u64) -> Result<(Vec<Piece>, CopyBuf), IoError> {
        let end = start + len;
        let mut pieces = Vec::new();
        let mut at = start;
        while at < end {
            let before = at;
            let status = self.source.block_status(at, end - at).await;
            for e in status.map_err(IoError::in_source)? {
                let stop = at.saturating_add(e.length).min(end);
                if stop <= at {
                    break;
                }
                pieces.push(Piece {
                    offset: at,
                    len: stop - at,
                    zero: e.zero && !e.data,
                });
                at = stop;
            }
            // A status covering nothing is the source's protocol error: never loop.
            if at == before {
                return Err(IoError::Invalid);
            }
        }
        let data: u64 = pieces.iter().filter(|p| !p.zero).map(|p| p.len).sum();
        let data = usize::try_from(data).map_err(|_| IoError::Invalid)?;
        let mut buf = match self.target.alloc_buffer(data) {
            Some(shared) => CopyBuf::Shared(shared),
            None => {
                let mut v = self.take_buffer();
                v.resize(data, 0);
                CopyBuf::Local(v)
            }
        };
        let mut filled = 0usize;
        for p in pieces.iter().filter(|p| !p.zero) {
            let n = usize::try_from(p.len).map_err(|_| IoError::Invalid)?;
            self.source
                .read(p.offset, &mut buf[filled..filled + n])
                .await
                .map_err(IoError::in_source)?;
            filled += n;
        }
        Ok((pieces, buf))
    }

    /// Writes what [`MirrorDriver::read_run`] read to the target (zeroes as
    /// write-zeroes, not unmapped: a target with a backing would read that).
    /// One write per piece, recording in `hold` how far they reached; a failed piece
    /// is retried in [`FINE_WRITE`]s, so that a run failing half-way (a full
    /// target) keeps what fitted.
    async fn write_run(
        &self,
        pieces: &[Piece],
        buf: &[u8],
        hold: &mut CopyHold<'_>,
    ) -> Result<(), IoError> {
        let mut used = 0usize;
        for p in pieces {
            if p.zero {
                self.target
                    .write_zeroes(p.offset, p.len, ZeroFlags::default())
                    .await?;
                hold.reached = p.offset + p.len;
                continue;
            }
            let len = usize::try_from(p.len).map_err(|_| IoError::Invalid)?;
            let data = buf.get(used..used + len).ok_or(IoError::Invalid)?;
            if self
                .target
                .write(p.offset, data, WriteFlags::default())
                .await
                .is_err()
            {
                // Written again in small writes, so that `reached` gets as far as
                // the target takes (a full target: what fits); their first failure
                // is the copy's.
                self.write_fine(p.offset, data, hold).await?;
            }
            used += len;
            hold.reached = p.offset + p.len;
        }
        Ok(())
    }

    /// Writes `data` at `offset` in pieces of [`FINE_WRITE`], moving `hold.reached`
    /// with each; the first failure ends it.
    async fn write_fine(
        &self,
        offset: u64,
        data: &[u8],
        hold: &mut CopyHold<'_>,
    ) -> Result<(), IoError> {
        let mut at = offset;
        for piece in data.chunks(FINE_WRITE) {
            self.target.write(at, piece, WriteFlags::default()).await?;
            at += piece.len() as u64;
            hold.reached = at;
        }
        Ok(())
    }

    /// A copy buffer from the pool (kept warm: fresh buffers cost page
    /// faults and zeroing on every run).
    fn take_buffer(&self) -> Vec<u8> {
        self.buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    fn give_buffer(&self, buf: CopyBuf) {
        // A shared buffer goes back to its channel's pool as it drops.
        let CopyBuf::Local(buf) = buf else {
            return;
        };
        let mut pool = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOLED_BUFFERS {
            pool.push(buf);
        }
    }

    /// Switches to write-blocking and waits for the background writes in flight.
    async fn write_blocking(&self) -> MirrorStatus {
        loop {
            let released = self.released.notified();
            {
                let mut s = self.lock();
                s.write_blocking = true;
                if s.background == 0 {
                    break;
                }
            }
            released.await;
        }
        self.status(0)
    }

    async fn wait_dirty(&self) -> MirrorStatus {
        let dirtied = self.dirtied.notified();
        if self.lock().count == 0 {
            dirtied.await;
        }
        self.status(0)
    }
}

/// A guest change's hold on the mirror: its claims (write-blocking) or its count
/// as a background write, given back on drop with the chunks marked unless the
/// target got the change (`synced`: its bytes, progress to report).
struct GuestHold<'a> {
    mirror: &'a MirrorDriver,
    chunks: std::ops::RangeInclusive<u64>,
    blocking: bool,
    synced: Option<u64>,
}

impl Drop for GuestHold<'_> {
    fn drop(&mut self) {
        let m = self.mirror;
        {
            let mut s = m.lock();
            match self.synced {
                Some(n) => s.synced += n,
                None => self.chunks.clone().for_each(|c| s.set(c)),
            }
            if self.blocking {
                for c in self.chunks.clone() {
                    s.claimed.remove(&c);
                }
            } else {
                s.background = s.background.saturating_sub(1);
            }
        }
        // Marked chunks and synced bytes both wake the copy.
        if self.blocking || self.synced.is_none() {
            m.dirtied.notify_waiters();
        }
        m.released.notify_waiters();
    }
}

/// A copy's claim on a run of chunks, given back on drop: dirty again unless the
/// copy completed.
struct CopyHold<'a> {
    mirror: &'a MirrorDriver,
    chunks: std::ops::Range<u64>,
    copied: bool,
    /// How far the writes reached: chunks wholly below stay clean either way.
    reached: u64,
}

impl Drop for CopyHold<'_> {
    fn drop(&mut self) {
        let m = self.mirror;
        {
            let mut s = m.lock();
            for c in self.chunks.clone() {
                s.claimed.remove(&c);
                let written = (c + 1).saturating_mul(m.granularity) <= self.reached;
                if !self.copied && !written {
                    s.set(c);
                }
            }
        }
        m.released.notify_waiters();
    }
}

impl BlockIo for MirrorDriver {
    fn size(&self) -> u64 {
        self.source.size()
    }

    fn read_only(&self) -> bool {
        self.source.read_only()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.source.read(offset, buf)
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(self.guest(offset, buf.len() as u64, Change::Write(buf, flags)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.guest(offset, len, Change::Zeroes(flags)))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.guest(offset, len, Change::Discard))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.lock().write_blocking {
                self.target.flush().await?;
            }
            self.source.flush().await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.source.block_status(offset, len)
    }

    fn read_sparse<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> SparseFuture<'a> {
        self.source.read_sparse(offset, buf)
    }

    fn refresh(&self) -> IoFuture<'_, ()> {
        self.source.refresh()
    }

    fn mirror(&self, request: MirrorRequest) -> IoFuture<'_, MirrorStatus> {
        Box::pin(async move {
            match request {
                MirrorRequest::Scan { layers, max } => self.scan(layers, max).await,
                MirrorRequest::Copy { max } => self.copy(max).await,
                MirrorRequest::WriteBlocking => Ok(self.write_blocking().await),
                MirrorRequest::WaitDirty => Ok(self.wait_dirty().await),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory node; `depth` is what its block status reports.
    struct Mem(Mutex<Vec<u8>>, u32);

    impl Mem {
        fn new(len: usize, fill: u8) -> Arc<Mem> {
            Arc::new(Mem(Mutex::new(vec![fill; len]), 1))
        }
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl BlockIo for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0.lock().unwrap()[o..o + buf.len()]);
            Box::pin(async { Ok(()) })
        }
        fn write<'a>(&'a self, offset: u64, buf: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
            let o = offset as usize;
            self.0.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
            let o = offset as usize;
            self.0.lock().unwrap()[o..o + len as usize].fill(0);
            Box::pin(async { Ok(()) })
        }
        fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
            let depth = self.1;
            Box::pin(async move {
                Ok(vec![Extent {
                    length: len,
                    data: true,
                    zero: false,
                    depth,
                }])
            })
        }
    }

    const G: u64 = DEFAULT_GRANULARITY;

    fn mirror(source: &Arc<Mem>, target: &Arc<Mem>, write_blocking: bool) -> MirrorDriver {
        let config = MirrorConfig {
            granularity: G,
            write_blocking,
            ..MirrorConfig::default()
        };
        MirrorDriver::new(source.clone(), target.clone(), &config)
    }

    async fn drain(m: &MirrorDriver) -> u64 {
        let mut copied = 0;
        loop {
            let s = m.mirror(MirrorRequest::Copy { max: 3 * G }).await.unwrap();
            copied += s.copied;
            if s.copied == 0 {
                assert_eq!(s.dirty, 0);
                return copied;
            }
        }
    }

    #[tokio::test]
    async fn a_full_scan_and_copies_make_the_target_equal() {
        let size = 10 * G as usize + 100;
        let (source, target) = (Mem::new(size, 5), Mem::new(size, 0));
        let m = mirror(&source, &target, false);
        loop {
            let s = m
                .mirror(MirrorRequest::Scan {
                    layers: 0,
                    max: 4 * G,
                })
                .await
                .unwrap();
            if s.scanned {
                assert_eq!(s.dirty, size as u64, "the last chunk counts only its bytes");
                break;
            }
        }
        assert_eq!(drain(&m).await, size as u64);
        assert_eq!(target.bytes(), source.bytes());
        // A guest write marks its chunk; the next copy takes just that chunk.
        m.write(3 * G + 7, &[9; 10], WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(m.status(0).dirty, G);
        assert_eq!(drain(&m).await, G);
        assert_eq!(target.bytes(), source.bytes());
    }

    #[tokio::test]
    async fn a_layered_scan_marks_only_what_the_top_layers_hold() {
        let size = 4 * G as usize;
        let source = Arc::new(Mem(Mutex::new(vec![1; size]), 2));
        let target = Mem::new(size, 0);
        let m = MirrorDriver::new(
            source.clone(),
            target.clone(),
            &MirrorConfig {
                granularity: G,
                ..MirrorConfig::default()
            },
        );
        let s = m
            .mirror(MirrorRequest::Scan {
                layers: 1,
                max: size as u64,
            })
            .await
            .unwrap();
        assert!(s.scanned);
        assert_eq!(s.dirty, 0, "depth 2 is below the top layer");
    }

    #[tokio::test]
    async fn write_blocking_writes_reach_the_target_and_leave_nothing_dirty() {
        let size = 4 * G as usize;
        let (source, target) = (Mem::new(size, 1), Mem::new(size, 1));
        let m = mirror(&source, &target, false);
        m.write(0, &[2; 100], WriteFlags::default()).await.unwrap();
        assert_eq!(m.status(0).dirty, G);
        assert_eq!(target.bytes()[0], 1);
        let s = m.mirror(MirrorRequest::WriteBlocking).await.unwrap();
        assert_eq!(s.background, 0);
        m.write(2 * G, &[3; 100], WriteFlags::default())
            .await
            .unwrap();
        m.write_zeroes(3 * G, 10, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(target.bytes()[2 * G as usize], 3);
        assert_eq!(target.bytes()[3 * G as usize], 0);
        assert_eq!(m.status(0).dirty, G, "only the background write's chunk");
        drain(&m).await;
        assert_eq!(target.bytes(), source.bytes());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn copies_racing_with_guest_writes_converge() {
        let size = 16 * G as usize;
        let (source, target) = (Mem::new(size, 7), Mem::new(size, 0));
        let m = Arc::new(mirror(&source, &target, false));
        m.mirror(MirrorRequest::Scan {
            layers: 0,
            max: size as u64,
        })
        .await
        .unwrap();
        let writers: Vec<_> = (0..8u64)
            .map(|w| {
                let m = Arc::clone(&m);
                tokio::spawn(async move {
                    for i in 0..50u64 {
                        let off = ((w * 7 + i * 13) % 16) * G + i;
                        m.write(off, &[(w * 50 + i) as u8; 300], WriteFlags::default())
                            .await
                            .unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let copier = {
            let m = Arc::clone(&m);
            tokio::spawn(async move {
                for _ in 0..200 {
                    m.mirror(MirrorRequest::Copy { max: 2 * G }).await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        for w in writers {
            w.await.unwrap();
        }
        copier.await.unwrap();
        // What completion does: write-blocking, then copy what is left.
        m.mirror(MirrorRequest::WriteBlocking).await.unwrap();
        drain(&m).await;
        assert_eq!(target.bytes(), source.bytes());
    }
}
