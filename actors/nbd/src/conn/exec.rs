//! Running a request against the export's `BlockIo` (reads, sparse reads, writes,
//! zeroes, trims, flushes, block status) and choosing its reply.

use super::*;

impl<W: AsyncWrite + Unpin + Send + 'static> Conn<W> {
    /// Runs one request against the backend and sends its reply.
    pub(super) async fn execute(self: Arc<Self>, mut req: Request, permit: OwnedSemaphorePermit) {
        // The slot is released when the reply is sent or queued (or the task aborted).
        let _permit = permit;
        struct Running<'a>(&'a AtomicUsize);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.running.fetch_add(1, Ordering::Relaxed);
        let _running = Running(&self.running);
        let backend: &dyn BlockIo = &*self.export.backend;
        let sent = match req.kind {
            CMD_READ => self.read(&mut req).await,
            CMD_WRITE => {
                let flags = WriteFlags {
                    fua: req.flags & CMD_FLAG_FUA != 0,
                };
                let n = req.len as usize;
                let r = backend.write(req.offset, &req.buf[..n], flags).await;
                self.reply_io(&req, r, "writing to file failed").await
            }
            CMD_WRITE_ZEROES => {
                let flags = ZeroFlags {
                    fua: req.flags & CMD_FLAG_FUA != 0,
                    may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                    no_fallback: req.flags & CMD_FLAG_FAST_ZERO != 0,
                };
                let r = backend.write_zeroes(req.offset, req.len, flags).await;
                self.reply_io(&req, r, "writing to file failed").await
            }
            CMD_FLUSH => {
                let r = backend.flush().await;
                self.reply_io(&req, r, "flush failed").await
            }
            CMD_TRIM => {
                let mut r = backend.discard(req.offset, req.len).await;
                if r.is_ok() && req.flags & CMD_FLAG_FUA != 0 {
                    r = backend.flush().await;
                }
                self.reply_io(&req, r, "discard failed").await
            }
            // qsd prefetches with copy-on-read, which only does work for a node
            // with a backing chain; through BlockIo there is nothing to warm up.
            CMD_CACHE => self.reply_io(&req, Ok(()), "request preadv failed").await,
            CMD_BLOCK_STATUS => self.block_status(&req).await,
            kind => {
                let msg = format!("invalid request type ({kind}) received");
                self.reply_generic(req.cookie, req.offset, Err(libc::EINVAL), &msg)
                    .await
            }
        };
        self.put_buf(std::mem::take(&mut req.buf));
        if sent.is_err() {
            self.dead.send_replace(true);
        }
    }

    /// NBD_CMD_READ, as qsd's `nbd_do_cmd_read`.
    pub(super) async fn read(&self, req: &mut Request) -> std::io::Result<()> {
        let backend: &dyn BlockIo = &*self.export.backend;
        if req.flags & CMD_FLAG_FUA != 0
            && let Err(e) = backend.flush().await
        {
            return self
                .reply_generic(req.cookie, req.offset, Err(e.errno()), "flush failed")
                .await;
        }
        let n = req.len as usize;
        if self.mode >= Mode::Structured && req.flags & CMD_FLAG_DF == 0 && n > 0 {
            return self.sparse_read(req).await;
        }
        if let Err(e) = backend.read(req.offset, &mut req.buf[..n]).await {
            return self
                .reply_generic(
                    req.cookie,
                    req.offset,
                    Err(e.errno()),
                    "reading from file failed",
                )
                .await;
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

    /// A structured read that sends holes as OFFSET_HOLE chunks, deciding from
    /// block status like qsd's `nbd_co_send_sparse_read` (zero ranges are holes).
    /// The backend does block status and the data reads together
    /// ([`BlockIo::read_sparse`]): one round trip when the node is in another worker.
    pub(super) async fn sparse_read(&self, req: &mut Request) -> std::io::Result<()> {
        let backend: &dyn BlockIo = &*self.export.backend;
        let n = req.len as usize;
        let extents = match backend.read_sparse(req.offset, &mut req.buf[..n]).await {
            Ok(e) => e,
            Err(SparseReadError::Status(e)) => {
                let msg = format!("unable to check for holes: {}", strerror(e.errno()));
                return self
                    .send_error(req.cookie, req.offset, e.errno(), &msg)
                    .await;
            }
            Err(SparseReadError::Read(e)) => {
                return self
                    .send_error(
                        req.cookie,
                        req.offset,
                        e.errno(),
                        "reading from file failed",
                    )
                    .await;
            }
        };
        let mut runs: Vec<Run> = Vec::with_capacity(extents.len());
        let mut pos = req.offset;
        for e in &extents {
            match runs.last_mut() {
                Some(last) if last.hole == e.zero => last.len += e.length,
                _ => runs.push(Run {
                    offset: pos,
                    len: e.length,
                    hole: e.zero,
                }),
            }
            pos += e.length;
        }
        if pos != req.offset + req.len {
            // A backend breaking its contract (extents not tiling the request).
            let msg = "unable to check for holes: Input/output error";
            return self
                .send_error(req.cookie, req.offset, libc::EIO, msg)
                .await;
        }
        self.send_data_chunks(req, &runs).await
    }

    /// NBD_CMD_BLOCK_STATUS: one chunk per selected context, base:allocation
    /// first, as qsd does.
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
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut remaining = sel.count;
        for (on, id) in [
            (sel.base_allocation, META_ID_BASE_ALLOCATION),
            (sel.allocation_depth, META_ID_ALLOCATION_DEPTH),
        ] {
            if !on {
                continue;
            }
            remaining -= 1;
            let extents = match self.collect_extents(req.offset, req.len, one, id).await {
                Ok(e) => e,
                Err(e) => {
                    return self
                        .send_error(req.cookie, req.offset, e.errno(), "can't get block status")
                        .await;
                }
            };
            self.send_extents(req, id, &extents, remaining == 0).await?;
        }
        Ok(())
    }

    /// Walks block status over `[offset, offset + len)`, merging runs with equal
    /// flags and stopping at qsd's extent cap (1 with REQ_ONE).
    pub(super) async fn collect_extents(
        &self,
        offset: u64,
        len: u64,
        one: bool,
        id: u32,
    ) -> Result<Vec<(u64, u32)>, IoError> {
        let cap = if one { 1 } else { MAX_BLOCK_STATUS_EXTENTS };
        let backend: &dyn BlockIo = &*self.export.backend;
        let end = offset + len;
        let mut out: Vec<(u64, u32)> = Vec::with_capacity(4);
        let mut pos = offset;
        'outer: while pos < end {
            let extents: Vec<Extent> = backend.block_status(pos, end - pos).await?;
            let before = pos;
            for e in &extents {
                let n = e.length.min(end - pos);
                if n == 0 {
                    break;
                }
                let flags = if id == META_ID_BASE_ALLOCATION {
                    (if e.data { 0 } else { STATE_HOLE }) | (if e.zero { STATE_ZERO } else { 0 })
                } else {
                    e.depth
                };
                let full = out.len() >= cap;
                match out.last_mut() {
                    Some(last) if last.1 == flags => last.0 += n,
                    _ if full => break 'outer,
                    _ => out.push((n, flags)),
                }
                pos += n;
                if pos >= end {
                    break;
                }
            }
            if pos == before {
                return Err(IoError::Os(libc::EIO));
            }
        }
        Ok(out)
    }
}
