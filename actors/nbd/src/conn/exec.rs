//! Turning a parsed NBD request into calls of the generic executor
//! (`bulkhead_export::exec`: reads, sparse reads, writes, zeroes, trims, flushes,
//! block status) and choosing its NBD reply, with qsd's error texts.

use super::*;
use crate::server::{BITMAP_WINDOW, DirtyRuns};

/// A request counted in [`Conn::running`] (see [`Conn::start`]).
pub(super) struct Running<W: AsyncWrite + Unpin + Send + 'static>(Arc<Conn<W>>);

impl<W: AsyncWrite + Unpin + Send + 'static> Drop for Running<W> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Conn<W> {
    /// Counts a request as running from now until the returned guard is dropped
    /// (with its task, whether or not the task ever ran).
    pub(super) fn start(self: &Arc<Self>) -> Running<W> {
        self.running.fetch_add(1, Ordering::Relaxed);
        Running(Arc::clone(self))
    }

    /// Runs one request through the executor and sends its reply.
    pub(super) async fn execute(
        running: Running<W>,
        mut req: Request,
        permit: OwnedSemaphorePermit,
    ) {
        // The slot is released when the reply is sent or queued (or the task aborted).
        let _permit = permit;
        let this = &running.0;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let op = match req.kind {
            CMD_READ => None,
            CMD_WRITE => Some(Op::Write { fua }),
            CMD_WRITE_ZEROES => Some(Op::WriteZeroes(ZeroFlags {
                fua,
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                no_fallback: req.flags & CMD_FLAG_FAST_ZERO != 0,
            })),
            CMD_FLUSH => Some(Op::Flush),
            CMD_TRIM => Some(Op::Discard { fua }),
            _ => None,
        };
        let sent = match (req.kind, op) {
            (_, Some(op)) => {
                // Only a WRITE has a payload (the other kinds get no buffer).
                let n = if req.kind == CMD_WRITE {
                    req.len as usize
                } else {
                    0
                };
                let backend = &*this.export.backend;
                let r = executor::run(backend, op, req.offset, req.len, &req.buf[..n]).await;
                this.reply_done(&req, r).await
            }
            (CMD_READ, None) => this.read(&mut req).await,
            // qsd prefetches with copy-on-read, which only does work for a node
            // with a backing chain; through BlockIo there is nothing to warm up.
            (CMD_CACHE, None) => this.reply_done(&req, Ok(())).await,
            (CMD_BLOCK_STATUS, None) => this.block_status(&req).await,
            (kind, None) => {
                let msg = format!("invalid request type ({kind}) received");
                this.reply_generic(req.cookie, req.offset, Err(libc::EINVAL), &msg)
                    .await
            }
        };
        this.put_buf(std::mem::take(&mut req.buf));
        if sent.is_err() {
            this.dead.send_replace(true);
        }
    }

    /// NBD_CMD_READ, as qsd's `nbd_do_cmd_read`: a structured read without DF skips
    /// holes (OFFSET_HOLE chunks, as qsd's `nbd_co_send_sparse_read`, zero ranges
    /// being holes); the backend does block status and the data reads together
    /// ([`bulkhead_block::BlockIo::read_sparse`]): one round trip when the node is in
    /// another worker.
    pub(super) async fn read(&self, req: &mut Request) -> std::io::Result<()> {
        let backend = &*self.export.backend;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let n = req.len as usize;
        if self.mode >= Mode::Structured && req.flags & CMD_FLAG_DF == 0 && n > 0 {
            return match executor::read_sparse(backend, req.offset, &mut req.buf[..n], fua).await {
                Ok(runs) => self.send_data_chunks(req, &runs).await,
                Err(f) => self.reply_failure(req.cookie, req.offset, f).await,
            };
        }
        if let Err(f) = executor::read(backend, req.offset, &mut req.buf[..n], fua).await {
            return self.reply_failure(req.cookie, req.offset, f).await;
        }
        if self.mode >= Mode::Structured {
            if n == 0 {
                return self.send_done(req.cookie, req.offset).await;
            }
            self.send_data_chunks(
                req,
                &[Run {
                    offset: req.offset,
                    len: req.len,
                    hole: false,
                }],
            )
            .await
        } else {
            let h = simple_reply(req.cookie, 0);
            self.send(&mut [IoSlice::new(&h), IoSlice::new(&req.buf[..n])])
                .await
        }
    }

    /// NBD_CMD_BLOCK_STATUS: one chunk per selected context, base:allocation
    /// first, then qemu:allocation-depth, then the bitmaps, as qsd does; the last
    /// chunk is flagged DONE.
    pub(super) async fn block_status(&self, req: &Request) -> std::io::Result<()> {
        let sel = req.contexts;
        if sel.count == 0 {
            let msg = if self.contexts.count > 0 {
                "CMD_BLOCK_STATUS payload not valid"
            } else {
                "CMD_BLOCK_STATUS not negotiated"
            };
            return self
                .reply_generic(req.cookie, req.offset, Err(libc::EINVAL), msg)
                .await;
        }
        if req.len == 0 {
            return self
                .reply_generic(
                    req.cookie,
                    req.offset,
                    Err(libc::EINVAL),
                    "need non-zero length",
                )
                .await;
        }
        let cap = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_BLOCK_STATUS_EXTENTS
        };
        let backend = &*self.export.backend;
        let mut remaining = sel.count;
        for (on, id) in [
            (sel.base_allocation, META_ID_BASE_ALLOCATION),
            (sel.allocation_depth, META_ID_ALLOCATION_DEPTH),
        ] {
            if !on {
                continue;
            }
            remaining -= 1;
            let flags = |e: &bulkhead_block::Extent| {
                if id == META_ID_BASE_ALLOCATION {
                    (if e.data { 0 } else { STATE_HOLE }) | (if e.zero { STATE_ZERO } else { 0 })
                } else {
                    e.depth
                }
            };
            let extents =
                match executor::block_status(backend, req.offset, req.len, cap, flags).await {
                    Ok(e) => e,
                    Err(f) => return self.reply_failure(req.cookie, req.offset, f).await,
                };
            self.send_extents(req, id, &extents, remaining == 0).await?;
        }
        // Then the bitmaps, in the export's order. The selection was made for this
        // export (`Contexts::is_for`), so every index names one of its bitmaps.
        let extended = self.mode >= Mode::Extended;
        for i in sel.bitmaps.iter() {
            let Some(bitmap) = self.export.bitmaps.get(i) else {
                continue;
            };
            remaining -= 1;
            let extents = bitmap_extents(&*bitmap.source, req.offset, req.len, cap, extended);
            // i < MAX_EXPORT_BITMAPS (256): the id fits.
            let id = META_ID_DIRTY_BITMAP + i as u32;
            self.send_extents(req, id, &extents, remaining == 0).await?;
        }
        Ok(())
    }
}

/// One bitmap's extents over `[offset, offset + len)`, as qsd's
/// `bitmap_to_extents` builds them: clean (0) and dirty ([`STATE_DIRTY`]) runs in
/// order, at most `cap` extents (the range is cut after the last one that fits),
/// and whatever lies past the bitmap's end reported clean. The bitmap is read in
/// windows of [`BITMAP_WINDOW`] bytes, and no more once `cap` extents are full.
pub(super) fn bitmap_extents(
    source: &dyn DirtyRuns,
    offset: u64,
    len: u64,
    cap: usize,
    extended: bool,
) -> Vec<(u64, u32)> {
    let mut out = Extents {
        list: Vec::new(),
        cap,
        extended,
    };
    // The request lies within the export, so this does not overflow.
    let end = offset.saturating_add(len);
    let mut pos = offset;
    while pos < end {
        let window = (end - pos).min(BITMAP_WINDOW);
        let mut covered = 0;
        for (n, dirty) in source.runs(pos, window) {
            // Runs past the window would be a source breaking its contract.
            let n = n.min(window - covered);
            if !out.add(n, if dirty { STATE_DIRTY } else { 0 }) {
                return out.list;
            }
            covered += n;
        }
        if covered < window {
            // The bitmap ends here; qsd reports the rest of the range clean.
            out.add(end - pos - covered, 0);
            return out.list;
        }
        pos += window;
    }
    out.list
}

/// qsd's `NBDExtentArray`: extents of the same flags merge (in a compact reply
/// only while the sum fits 32 bits), at most `cap` of them.
struct Extents {
    list: Vec<(u64, u32)>,
    cap: usize,
    extended: bool,
}

impl Extents {
    /// Adds a run; `false` once an extent did not fit (the list is then final).
    fn add(&mut self, mut n: u64, flags: u32) -> bool {
        // qsd asks its bitmap for dirty areas of at most 2^31 - 1 bytes in a
        // compact reply; the pieces merge again below while they fit 32 bits.
        let piece_max = if self.extended {
            u64::MAX
        } else {
            i32::MAX as u64
        };
        while n > 0 {
            let piece = n.min(piece_max);
            if !self.push(piece, flags) {
                return false;
            }
            n -= piece;
        }
        true
    }

    fn push(&mut self, n: u64, flags: u32) -> bool {
        if let Some(last) = self.list.last_mut()
            && last.1 == flags
        {
            let sum = last.0.saturating_add(n);
            if self.extended || sum <= u64::from(u32::MAX) {
                last.0 = sum;
                return true;
            }
        }
        if self.list.len() >= self.cap {
            return false;
        }
        self.list.push((n, flags));
        true
    }
}

/// qsd's text for a failed step of a request (the NBD error chunk's message).
pub(super) fn failure_text(f: Failure) -> std::borrow::Cow<'static, str> {
    match f.failed {
        Failed::Read => "reading from file failed".into(),
        Failed::Write | Failed::WriteZeroes => "writing to file failed".into(),
        Failed::Discard => "discard failed".into(),
        Failed::Flush => "flush failed".into(),
        Failed::HoleCheck => format!("unable to check for holes: {}", strerror(f.errno)).into(),
        Failed::BlockStatus => "can't get block status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemBitmap;

    const G: u64 = 64 << 10;

    #[test]
    fn bitmap_extents_cover_the_range_and_stop_at_the_cap() {
        let b = MemBitmap::new(16 * G, G);
        b.dirty(G, G);
        b.dirty(4 * G, 2 * G);
        b.dirty(10 * G, G);
        let all = bitmap_extents(&*b, 0, 16 * G, 100, false);
        assert_eq!(
            all,
            [
                (G, 0),
                (G, STATE_DIRTY),
                (2 * G, 0),
                (2 * G, STATE_DIRTY),
                (4 * G, 0),
                (G, STATE_DIRTY),
                (5 * G, 0)
            ]
        );
        // The cap cuts the range after the last extent that fits.
        assert_eq!(
            bitmap_extents(&*b, 0, 16 * G, 3, true),
            [(G, 0), (G, STATE_DIRTY), (2 * G, 0)]
        );
        assert_eq!(
            bitmap_extents(&*b, G + 5, 100, 1, false),
            [(100, STATE_DIRTY)]
        );
    }

    #[test]
    fn a_bitmap_shorter_than_the_range_reads_clean_past_its_end() {
        let b = MemBitmap::new(3 * G, G);
        b.dirty(2 * G, G);
        assert_eq!(
            bitmap_extents(&*b, G, 4 * G, 10, false),
            [(G, 0), (G, STATE_DIRTY), (2 * G, 0)]
        );
    }

    /// A bitmap of `.0` bytes, dirty everywhere.
    struct AllDirty(u64);

    impl DirtyRuns for AllDirty {
        fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
            assert!(len <= BITMAP_WINDOW, "asked for more than a window");
            let end = (offset + len).min(self.0);
            if offset >= end {
                return Vec::new();
            }
            vec![(end - offset, true)]
        }
    }

    #[test]
    fn long_runs_are_read_in_windows_and_merge_within_32_bits_when_compact() {
        let b = AllDirty(1 << 40);
        // Compact: a request is at most 4 GiB - 1, one extent.
        let max = u64::from(u32::MAX);
        assert_eq!(bitmap_extents(&b, 0, max, 10, false), [(max, STATE_DIRTY)]);
        // Extended: one extent however long.
        assert_eq!(
            bitmap_extents(&b, 5, (1 << 33) + 7, 10, true),
            [((1 << 33) + 7, STATE_DIRTY)]
        );
        // Past 32 bits a compact list splits where qsd's does.
        let e = bitmap_extents(&b, 0, 1 << 33, 10, false);
        assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), 1 << 33);
        assert!(e.iter().all(|x| x.0 <= max));
    }
}
