//! Reading a request off the socket and checking it as qsd's
//! `nbd_co_receive_request` does: header, flags, lengths, payloads, the buffer budgets.

use super::*;

impl<W: AsyncWrite + Unpin + Send + 'static> Conn<W> {
    /// Reads one request and validates it as qsd's `nbd_co_receive_request` does.
    pub(super) async fn receive<R: AsyncRead + Unpin>(&self, r: &mut BufReader<R>) -> Received {
        let extended = self.mode >= Mode::Extended;
        let mut raw = [0u8; EXTENDED_REQUEST_SIZE];
        let size = if extended {
            EXTENDED_REQUEST_SIZE
        } else {
            REQUEST_SIZE
        };
        // A clean EOF between requests is a client going away; let in-flight
        // requests finish their replies (they may still be read).
        match read_exact_or_eof(r, &mut raw[..size]).await {
            Ok(true) => {}
            Ok(false) => return Received::gone(true),
            Err(_) => return Received::gone(false),
        }
        let h = RequestHeader::decode(&raw, extended);
        let expect = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if h.magic != expect {
            // qsd 10.0.2 still answers (with the garbage header's cookie) before
            // it drops the connection.
            return Received::Fail {
                cookie: h.cookie,
                offset: h.offset,
                msg: format!("invalid magic (got 0x{:x}, expected 0x{expect:x})", h.magic),
                fatal: true,
            };
        }
        if h.kind == CMD_DISC {
            return Received::gone(true);
        }
        let fail = |msg: String, fatal: bool| Received::Fail {
            cookie: h.cookie,
            offset: h.offset,
            msg,
            fatal,
        };
        let ext_payload = extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        let mut valid = CMD_FLAG_FUA;
        let mut payload_len = if ext_payload { h.len } else { 0 };
        let mut check_length = ext_payload;
        let mut alloc = false;
        let mut check_ro = false;
        let mut len = h.len;
        let mut selected = Selected {
            base_allocation: self.contexts.base_allocation,
            allocation_depth: self.contexts.allocation_depth,
            bitmaps: self.contexts.bitmaps,
            count: self.contexts.count,
        };
        match h.kind {
            CMD_READ => {
                if self.mode >= Mode::Structured {
                    valid |= CMD_FLAG_DF;
                }
                check_length = true;
                alloc = true;
            }
            CMD_WRITE => {
                if extended {
                    valid |= CMD_FLAG_PAYLOAD_LEN;
                }
                payload_len = h.len;
                check_length = true;
                alloc = true;
                check_ro = true;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                check_ro = true;
                if h.kind == CMD_WRITE_ZEROES {
                    valid |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO;
                }
            }
            CMD_CACHE => check_length = true,
            CMD_BLOCK_STATUS => {
                valid |= CMD_FLAG_REQ_ONE;
                if ext_payload {
                    valid |= CMD_FLAG_PAYLOAD_LEN;
                    if h.len > u64::from(MAX_BUFFER_SIZE) {
                        return fail(too_long(h.len), true);
                    }
                    match self.block_status_payload(r, h.len).await {
                        Ok(Some((effect, sel))) => {
                            len = effect;
                            selected = sel;
                        }
                        Ok(None) => {
                            len = 0;
                            selected = Selected::default();
                        }
                        Err(_) => {
                            return Received::gone(false);
                        }
                    }
                    payload_len = 0;
                    check_length = false;
                }
            }
            _ => {}
        }
        if check_length && h.len > u64::from(MAX_BUFFER_SIZE) {
            // An unread WRITE payload leaves the stream unusable: reply, then drop.
            return fail(too_long(h.len), payload_len != 0);
        }
        // Lengths of READ/WRITE/CACHE and payloads are now at most 32 MiB.
        let mut buf = Buf::default();
        let mut memory = None;
        if payload_len != 0 && !alloc {
            // A payload on a command that takes none: skip it, then let the flag
            // check below refuse the request.
            if skip(r, payload_len).await.is_err() {
                return Received::gone(false);
            }
        } else if alloc {
            memory = match self.reserve(h.len).await {
                Some(m) => Some(m),
                None => return Received::gone(false),
            };
            buf = self.take_buf(h.len as usize);
            if payload_len != 0
                && let Err(e) = r.read_exact(&mut buf[..h.len as usize]).await
            {
                let why = (h.kind == CMD_WRITE)
                    .then(|| format!("Failed to read CMD_WRITE data: {}", io_text(&e)));
                return Received::Disconnect { drain: false, why };
            }
        }
        if let Some(msg) = self.sanity(&h, len, check_ro, valid) {
            self.put_buf(buf);
            return fail(msg, false);
        }
        Received::Run(Request {
            kind: h.kind,
            flags: h.flags,
            cookie: h.cookie,
            offset: h.offset,
            len,
            buf,
            contexts: selected,
            _memory: memory,
        })
    }

    /// Waits for `len` bytes of the connection's, then the export's, buffer budget.
    pub(super) async fn reserve(&self, len: u64) -> Option<Reservation> {
        self.bounds.reserve(&self.export.life, len).await
    }

    /// qsd's final checks, in its order: read-only, bounds, flags. (qsd computes
    /// EROFS/ENOSPC here but the client always sees EINVAL.)
    pub(super) fn sanity(
        &self,
        h: &RequestHeader,
        len: u64,
        check_ro: bool,
        valid: u16,
    ) -> Option<String> {
        let export = &self.export;
        if check_ro && export.read_only() {
            return Some("Export is read-only".to_owned());
        }
        if h.offset > export.size || len > export.size - h.offset {
            return Some(format!(
                "operation past EOF; From: {}, Len: {}, Size: {}",
                h.offset, len, export.size
            ));
        }
        if h.flags & !valid != 0 {
            return Some(format!(
                "unsupported flags for command {} (got 0x{:x})",
                cmd_name(h.kind),
                h.flags
            ));
        }
        None
    }

    /// Reads an extended BLOCK_STATUS payload (effect length + context ids) as
    /// qsd's `nbd_co_block_status_payload_read`; `None` means the payload was
    /// unusable and the request will be refused.
    pub(super) async fn block_status_payload<R: AsyncRead + Unpin>(
        &self,
        r: &mut BufReader<R>,
        len: u64,
    ) -> std::io::Result<Option<(u64, Selected)>> {
        let negotiated = u64::from(self.contexts.count);
        if !len.is_multiple_of(4) || len < 8 || len > 8 + 4 * negotiated {
            skip(r, len).await?;
            return Ok(None);
        }
        // At most 8 bytes and an id for each context: base:allocation,
        // qemu:allocation-depth and every bitmap.
        let mut buf = [0u8; 8 + 4 * (2 + MAX_EXPORT_BITMAPS)];
        let body = &mut buf[..len as usize];
        r.read_exact(body).await?;
        let mut effect = [0u8; 8];
        effect.copy_from_slice(&body[..8]);
        let mut sel = Selected::default();
        for id in body[8..].chunks_exact(4) {
            match u32::from_be_bytes([id[0], id[1], id[2], id[3]]) {
                META_ID_BASE_ALLOCATION
                    if self.contexts.base_allocation && !sel.base_allocation =>
                {
                    sel.base_allocation = true;
                }
                META_ID_ALLOCATION_DEPTH
                    if self.contexts.allocation_depth && !sel.allocation_depth =>
                {
                    sel.allocation_depth = true;
                }
                id => {
                    // Ids from 2 on are bitmaps: only a negotiated one, and only once.
                    let Some(i) = id.checked_sub(META_ID_DIRTY_BITMAP) else {
                        return Ok(None);
                    };
                    let i = i as usize;
                    if !self.contexts.bitmaps.contains(i) || sel.bitmaps.contains(i) {
                        return Ok(None);
                    }
                    sel.bitmaps.insert(i);
                }
            }
            sel.count += 1;
        }
        Ok(Some((u64::from_be_bytes(effect), sel)))
    }
}
