//! Turning a parsed NBD request into calls of the generic executor
//! (`bulkhead_export::exec`: reads, sparse reads, writes, zeroes, trims, flushes,
//! block status) and choosing its NBD reply, with qsd's error texts.

use super::*;

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
        Ok(())
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
