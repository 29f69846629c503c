//! Fixed-newstyle option negotiation, answering every option the way qsd 10.0.2
//! does (reply types, error texts, which mistakes drop the connection).
//!
//! Runs in the NBD export worker, once per connection, before transmission.
//! Handles untrusted bytes: every length a client sends is checked against
//! qsd's limits (32 MiB per option, 4096 bytes per string) before it is used, and
//! option payloads are read only as fast as the client sends them, so a client
//! announcing a large option cannot make the server allocate it up front.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::*;
use crate::server::{Export, ExportClient, MAX_EXPORT_BITMAPS, Shared};

/// Reply format negotiated for the transmission phase, in increasing order of
/// capability (qsd's `NBDMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Old (non-fixed) newstyle client: only EXPORT_NAME, simple replies.
    ExportName,
    /// Fixed newstyle, simple replies.
    Simple,
    /// Structured replies negotiated.
    Structured,
    /// Extended headers negotiated (64-bit lengths, implies structured replies).
    Extended,
}

/// Meta contexts selected with SET_META_CONTEXT.
#[derive(Clone, Default)]
pub(crate) struct Contexts {
    /// The export the selection was made for.
    pub(crate) export: Option<Arc<Export>>,
    pub(crate) base_allocation: bool,
    pub(crate) allocation_depth: bool,
    /// Indexes into the export's bitmaps (`qemu:dirty-bitmap:NAME`).
    pub(crate) bitmaps: BitmapSet,
    pub(crate) count: u32,
}

/// A set of indexes of an export's bitmaps (below [`MAX_EXPORT_BITMAPS`]), of
/// fixed size so that taking a request's copy of the selection allocates nothing.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(crate) struct BitmapSet([u64; MAX_EXPORT_BITMAPS / 64]);

impl BitmapSet {
    /// The first `n` indexes (`n` at most [`MAX_EXPORT_BITMAPS`], as
    /// `add_export` ensures).
    pub(crate) fn first(n: usize) -> BitmapSet {
        let mut s = BitmapSet::default();
        for i in 0..n.min(MAX_EXPORT_BITMAPS) {
            s.insert(i);
        }
        s
    }

    /// Adds `i`; indexes past the limit cannot be an export's and are ignored.
    pub(crate) fn insert(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    pub(crate) fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    pub(crate) fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// The indexes, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_EXPORT_BITMAPS).filter(|&i| self.contains(i))
    }
}

impl Contexts {
    fn is_for(&self, export: &Arc<Export>) -> bool {
        self.export.as_ref().is_some_and(|e| Arc::ptr_eq(e, export))
    }
}

/// What a successful negotiation hands to the transmission phase.
pub(crate) struct Session {
    pub(crate) client: ExportClient,
    pub(crate) mode: Mode,
    pub(crate) contexts: Contexts,
    /// The final reply (GO's ACK, or EXPORT_NAME's export data), not yet sent: it
    /// goes out once the client holds a `max-connections` slot.
    pub(crate) pending: Vec<u8>,
}

/// Why negotiation ended without a session. These are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A named protocol field could not be read (qsd's `nbd_read` with a
    /// description: "Failed to read opts magic: ...").
    #[error("Failed to read {0}: {1}")]
    Read(&'static str, std::io::Error),
    /// The client left before sending its flags (a port probe); qsd reports nothing.
    #[error("client left before sending its flags")]
    Probe,
    #[error("Unknown client flags 0x{0:x} received")]
    UnknownClientFlags(u32),
    #[error("Bad magic received")]
    BadMagic,
    #[error("len ({0}) is larger than max len ({MAX_BUFFER_SIZE})")]
    OptionTooLong(u32),
    #[error("Unsupported option {0} ({1})")]
    NotFixedNewstyle(u32, &'static str),
    #[error("Extended headers already negotiated")]
    ExportNameAfterExtended,
    #[error("Bad length received")]
    BadExportNameLength,
    #[error("export not found")]
    ExportNotFound,
    #[error("option '{0}' left unparsed bytes")]
    TrailingBytes(&'static str),
    #[error("client aborted")]
    Aborted,
}

/// Reads an option's payload and parses it; a short read of a field is the
/// client's fault and produces qsd's "Inconsistent lengths" reply.
struct Payload<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// An option ended in an error reply of this type and text.
struct OptErr(u32, String);

impl<'a> Payload<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize, opt: u32) -> Result<&'a [u8], OptErr> {
        if n > self.remaining() {
            return Err(inconsistent(opt));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self, opt: u32) -> Result<u16, OptErr> {
        let b = self.bytes(2, opt)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, opt: u32) -> Result<u32, OptErr> {
        let b = self.bytes(4, opt)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string without NUL bytes.
    fn string(&mut self, n: usize, opt: u32) -> Result<&'a [u8], OptErr> {
        let s = self.bytes(n, opt)?;
        if s.contains(&0) {
            return Err(OptErr(
                REP_ERR_INVALID,
                format!("Unexpected embedded NUL in option {}", opt_name(opt)),
            ));
        }
        Ok(s)
    }

    /// qsd's `nbd_opt_read_name`: a 32-bit length and at most 4096 bytes.
    fn name(&mut self, opt: u32) -> Result<&'a [u8], OptErr> {
        let len = self.u32(opt)?;
        if len as usize > MAX_STRING_SIZE {
            return Err(OptErr(
                REP_ERR_INVALID,
                format!("Invalid name length: {len}"),
            ));
        }
        self.string(len as usize, opt)
    }
}

fn inconsistent(opt: u32) -> OptErr {
    OptErr(
        REP_ERR_INVALID,
        format!("Inconsistent lengths in option {}", opt_name(opt)),
    )
}

fn unexpected_length(opt: u32) -> OptErr {
    OptErr(
        REP_ERR_INVALID,
        format!("option '{}' has unexpected length", opt_name(opt)),
    )
}

/// Awaits the read of a named field, naming it in the error.
async fn read_field<T>(
    read: impl std::future::Future<Output = std::io::Result<T>>,
    what: &'static str,
) -> Result<T, HandshakeError> {
    read.await.map_err(|e| HandshakeError::Read(what, e))
}

/// Negotiation state of one connection.
struct Negotiation<'a, R, W> {
    shared: &'a Shared,
    r: &'a mut R,
    w: &'a mut W,
    mode: Mode,
    contexts: Contexts,
}

/// Runs the handshake from the greeting to GO or EXPORT_NAME.
pub(crate) async fn negotiate<R, W>(
    shared: &Shared,
    r: &mut R,
    w: &mut W,
) -> Result<Session, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&OPTS_MAGIC.to_be_bytes());
    greeting[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    // A client gone before the greeting is a probe as well.
    w.write_all(&greeting)
        .await
        .map_err(|_| HandshakeError::Probe)?;

    // Like qsd, a failure to read the very first field is not an error worth
    // reporting: that is a port probe, not a client.
    let flags = r.read_u32().await.map_err(|_| HandshakeError::Probe)?;
    let fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    let unknown = flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if unknown != 0 {
        return Err(HandshakeError::UnknownClientFlags(unknown));
    }
    let mut n = Negotiation {
        shared,
        r,
        w,
        mode: if fixed {
            Mode::Simple
        } else {
            Mode::ExportName
        },
        contexts: Contexts::default(),
    };
    let mut payload = Vec::new();
    loop {
        // Three reads, so an early end names the field it cut, as qsd does.
        let magic = read_field(n.r.read_u64(), "opts magic").await?;
        let opt = read_field(n.r.read_u32(), "option").await?;
        let len = read_field(n.r.read_u32(), "option length").await?;
        if magic != OPTS_MAGIC {
            return Err(HandshakeError::BadMagic);
        }
        if len > MAX_BUFFER_SIZE {
            return Err(HandshakeError::OptionTooLong(len));
        }
        if !fixed && opt != OPT_EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(opt, opt_name(opt)));
        }
        match opt {
            OPT_EXPORT_NAME => return n.export_name(len, no_zeroes).await,
            OPT_ABORT => {
                // The client may hang up without reading the ACK.
                let _ = n.reply(opt, REP_ACK, &[]).await;
                return Err(HandshakeError::Aborted);
            }
            _ => {}
        }
        // Read only as much as the client actually sends (bounded by `len`).
        payload.clear();
        let got = (&mut *n.r)
            .take(u64::from(len))
            .read_to_end(&mut payload)
            .await?;
        if got != len as usize {
            return Err(HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let mut p = Payload {
            buf: &payload,
            pos: 0,
        };
        match n.option(opt, &mut p).await {
            Ok(Some(session)) => return Ok(session),
            Ok(None) => {}
            Err(OptFail::Reply(OptErr(kind, text))) => n.reply(opt, kind, text.as_bytes()).await?,
            Err(OptFail::Io(e)) => return Err(HandshakeError::Io(e)),
            Err(OptFail::Fatal(e)) => return Err(e),
        }
    }
}

impl<R, W> Negotiation<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Handles one option whose payload has been read.
    async fn option(&mut self, opt: u32, p: &mut Payload<'_>) -> Result<Option<Session>, OptFail> {
        match opt {
            OPT_LIST => self.list(p).await.map(|()| None),
            OPT_STARTTLS => {
                if p.remaining() > 0 {
                    Err(unexpected_length(opt).into())
                } else {
                    Err(OptErr(REP_ERR_POLICY, "TLS not configured".to_owned()).into())
                }
            }
            OPT_INFO | OPT_GO => self.info(opt, p).await,
            OPT_STRUCTURED_REPLY => {
                if p.remaining() > 0 {
                    Err(unexpected_length(opt).into())
                } else if self.mode >= Mode::Extended {
                    Err(OptErr(
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated".to_owned(),
                    )
                    .into())
                } else if self.mode >= Mode::Structured {
                    Err(OptErr(
                        REP_ERR_INVALID,
                        "structured reply already negotiated".to_owned(),
                    )
                    .into())
                } else {
                    self.mode = Mode::Structured;
                    self.reply(opt, REP_ACK, &[]).await?;
                    Ok(None)
                }
            }
            OPT_EXTENDED_HEADERS => {
                if p.remaining() > 0 {
                    Err(unexpected_length(opt).into())
                } else if self.mode >= Mode::Extended {
                    Err(OptErr(
                        REP_ERR_INVALID,
                        "extended headers already negotiated".to_owned(),
                    )
                    .into())
                } else {
                    self.mode = Mode::Extended;
                    self.reply(opt, REP_ACK, &[]).await?;
                    Ok(None)
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta(opt, p).await.map(|()| None),
            _ => Err(OptErr(
                REP_ERR_UNSUP,
                format!("Unsupported option {opt} ({})", opt_name(opt)),
            )
            .into()),
        }
    }

    async fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
        // Replies are small (at most a 4096-byte string plus a few words).
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let head = option_reply(opt, kind, len);
        if data.is_empty() {
            self.w.write_all(&head).await
        } else {
            let mut msg = Vec::with_capacity(head.len() + data.len());
            msg.extend_from_slice(&head);
            msg.extend_from_slice(data);
            self.w.write_all(&msg).await
        }
    }

    fn flags_for(&self, export: &Arc<Export>, opt: u32) -> u16 {
        let mut flags = export.flags;
        if self.mode >= Mode::Structured {
            flags |= TF_SEND_DF;
        }
        // Observed on qsd 10.0.2: INFO always shows BLOCK_STAT_PAYLOAD with
        // extended headers, GO only once meta contexts are selected.
        if self.mode >= Mode::Extended
            && (opt == OPT_INFO || (self.contexts.count > 0 && self.contexts.is_for(export)))
        {
            flags |= TF_BLOCK_STAT_PAYLOAD;
        }
        flags
    }

    async fn export_name(&mut self, len: u32, no_zeroes: bool) -> Result<Session, HandshakeError> {
        if self.mode >= Mode::Extended {
            return Err(HandshakeError::ExportNameAfterExtended);
        }
        if len as usize > MAX_STRING_SIZE {
            return Err(HandshakeError::BadExportNameLength);
        }
        let mut name = vec![0u8; len as usize];
        read_field(self.r.read_exact(&mut name), "export name").await?;
        let client = self
            .shared
            .attach(&name)
            .ok_or(HandshakeError::ExportNotFound)?;
        let flags = self.flags_for(&client.export, OPT_EXPORT_NAME);
        let mut buf = [0u8; 10 + 124];
        buf[0..8].copy_from_slice(&client.export.size.to_be_bytes());
        buf[8..10].copy_from_slice(&flags.to_be_bytes());
        let n = if no_zeroes { 10 } else { buf.len() };
        Ok(self.session(client, buf[..n].to_vec()))
    }

    fn session(&mut self, client: ExportClient, pending: Vec<u8>) -> Session {
        let mut contexts = std::mem::take(&mut self.contexts);
        if !contexts.is_for(&client.export) {
            contexts = Contexts::default();
        }
        Session {
            client,
            mode: self.mode,
            contexts,
            pending,
        }
    }

    async fn list(&mut self, p: &Payload<'_>) -> Result<(), OptFail> {
        if p.remaining() > 0 {
            return Err(unexpected_length(OPT_LIST).into());
        }
        for (name, desc) in self.shared.list() {
            let desc = desc.unwrap_or_default();
            let mut data = Vec::with_capacity(4 + name.len() + desc.len());
            // Names are at most 4096 bytes (checked in add_export).
            data.extend_from_slice(&(name.len() as u32).to_be_bytes());
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(desc.as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &data).await?;
        }
        self.reply(OPT_LIST, REP_ACK, &[]).await?;
        Ok(())
    }

    async fn info_reply(&mut self, opt: u32, info: u16, data: &[u8]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(2 + data.len());
        buf.extend_from_slice(&info.to_be_bytes());
        buf.extend_from_slice(data);
        self.reply(opt, REP_INFO, &buf).await
    }

    /// INFO and GO; `Some` moves to transmission.
    async fn info(&mut self, opt: u32, p: &mut Payload<'_>) -> Result<Option<Session>, OptFail> {
        let name = p.name(opt)?;
        let requests = p.u16(opt)?;
        let mut send_name = false;
        for _ in 0..requests {
            // NBD_INFO_BLOCK_SIZE requests change nothing here: every node is
            // byte-addressable through BlockIo, so the minimum stays 1.
            if p.u16(opt)? == INFO_NAME {
                send_name = true;
            }
        }
        if p.remaining() > 0 {
            return Err(unexpected_length(opt).into());
        }
        let (client, export) = if opt == OPT_GO {
            let c = self.shared.attach(name).ok_or_else(|| not_present(name))?;
            let e = c.export.clone();
            (Some(c), e)
        } else {
            (
                None,
                self.shared.find(name).ok_or_else(|| not_present(name))?,
            )
        };
        if send_name {
            self.info_reply(opt, INFO_NAME, name).await?;
        }
        if let Some(desc) = &export.description {
            self.info_reply(opt, INFO_DESCRIPTION, desc.as_bytes())
                .await?;
        }
        let mut sizes = [0u8; 12];
        sizes[0..4].copy_from_slice(&1u32.to_be_bytes());
        sizes[4..8].copy_from_slice(&4096u32.to_be_bytes());
        sizes[8..12].copy_from_slice(&MAX_BUFFER_SIZE.to_be_bytes());
        self.info_reply(opt, INFO_BLOCK_SIZE, &sizes).await?;
        let mut ex = [0u8; 10];
        ex[0..8].copy_from_slice(&export.size.to_be_bytes());
        ex[8..10].copy_from_slice(&self.flags_for(&export, opt).to_be_bytes());
        self.info_reply(opt, INFO_EXPORT, &ex).await?;
        match client {
            // GO's ACK waits for a `max-connections` slot.
            Some(c) => Ok(Some(
                self.session(c, option_reply(opt, REP_ACK, 0).to_vec()),
            )),
            None => {
                self.reply(opt, REP_ACK, &[]).await?;
                Ok(None)
            }
        }
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT.
    async fn meta(&mut self, opt: u32, p: &mut Payload<'_>) -> Result<(), OptFail> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set && self.mode < Mode::Structured {
            return Err(OptErr(
                REP_ERR_INVALID,
                format!(
                    "request option '{}' when structured reply is not negotiated",
                    opt_name(opt)
                ),
            )
            .into());
        }
        if set {
            // qsd clears the previous selection before parsing, so a failed SET
            // leaves nothing selected.
            self.contexts = Contexts::default();
        }
        let mut sel = Contexts::default();
        let parsed = (|| -> Result<Contexts, OptErr> {
            let name = p.name(opt)?;
            let export = self.shared.find(name).ok_or_else(|| not_present(name))?;
            let queries = p.u32(opt)?;
            sel.export = Some(export.clone());
            if !set && queries == 0 {
                sel.base_allocation = true;
                sel.allocation_depth = export.allocation_depth;
                sel.bitmaps = BitmapSet::first(export.bitmaps.len());
            }
            for _ in 0..queries {
                let len = p.u32(opt)? as usize;
                if len > MAX_STRING_SIZE {
                    p.bytes(len, opt)?;
                    continue;
                }
                let q = p.string(len, opt)?;
                query(&mut sel, &export, q, set);
            }
            Ok(sel)
        })();
        let mut sel = parsed?;
        if p.remaining() > 0 {
            // qsd leaves such bytes in the stream, where they are then read as the
            // next option's magic and the connection drops; drop it here too.
            return Err(OptFail::Fatal(HandshakeError::TrailingBytes(opt_name(opt))));
        }
        let mut count = 0;
        // qsd's order: base:allocation, qemu:allocation-depth, then the bitmaps
        // in the export's order. LIST answers id 0 for every context.
        let export = sel.export.clone();
        let fixed = [
            (
                sel.base_allocation,
                "base:allocation",
                META_ID_BASE_ALLOCATION,
            ),
            (
                sel.allocation_depth,
                "qemu:allocation-depth",
                META_ID_ALLOCATION_DEPTH,
            ),
        ];
        let fixed = fixed
            .into_iter()
            .filter(|(on, _, _)| *on)
            .map(|(_, name, id)| (std::borrow::Cow::Borrowed(name), id));
        let bitmaps = export.iter().flat_map(|e| {
            sel.bitmaps.iter().filter_map(|i| {
                let b = e.bitmaps.get(i)?;
                // Names are at most 1023 bytes (checked in add_export), so the
                // ids (2 + index < 2 + 256) and the names fit.
                Some((
                    format!("{BITMAP_CONTEXT_PREFIX}{}", b.name).into(),
                    META_ID_DIRTY_BITMAP + i as u32,
                ))
            })
        });
        for (name, id) in fixed.chain(bitmaps) {
            let id = if set { id } else { 0 };
            let mut data = Vec::with_capacity(4 + name.len());
            data.extend_from_slice(&id.to_be_bytes());
            data.extend_from_slice(name.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &data).await?;
            count += 1;
        }
        self.reply(opt, REP_ACK, &[]).await?;
        if set {
            sel.count = count;
            self.contexts = sel;
        }
        Ok(())
    }
}

/// Applies one meta context query, as qsd's `nbd_meta_base_query` and
/// `nbd_meta_qemu_query` do. Unknown queries are silently skipped; the
/// wildcards (`base:`, `qemu:`, `qemu:dirty-bitmap:`) count for LIST only.
fn query(sel: &mut Contexts, export: &Export, q: &[u8], set: bool) {
    if let Some(rest) = q.strip_prefix(b"base:") {
        if (rest.is_empty() && !set) || rest == b"allocation" {
            sel.base_allocation = true;
        }
    } else if let Some(rest) = q.strip_prefix(b"qemu:") {
        if rest.is_empty() {
            if !set {
                sel.allocation_depth = export.allocation_depth;
                sel.bitmaps = BitmapSet::first(export.bitmaps.len());
            }
        } else if rest == b"allocation-depth" {
            sel.allocation_depth = export.allocation_depth;
        } else if let Some(name) = rest.strip_prefix(b"dirty-bitmap:") {
            if name.is_empty() {
                if !set {
                    sel.bitmaps = BitmapSet::first(export.bitmaps.len());
                }
            } else if let Some(i) = export
                .bitmaps
                .iter()
                .position(|b| b.name.as_bytes() == name)
            {
                // The first bitmap of that name, as qsd looks it up.
                sel.bitmaps.insert(i);
            }
        }
    }
}

fn not_present(name: &[u8]) -> OptErr {
    OptErr(
        REP_ERR_UNKNOWN,
        format!("export '{}' not present", sanitize_name(name)),
    )
}

/// How an option ended other than successfully.
enum OptFail {
    /// The socket failed.
    Io(std::io::Error),
    /// Send this error reply and go on negotiating.
    Reply(OptErr),
    /// Drop the connection.
    Fatal(HandshakeError),
}

impl From<std::io::Error> for OptFail {
    fn from(e: std::io::Error) -> OptFail {
        OptFail::Io(e)
    }
}

impl From<OptErr> for OptFail {
    fn from(e: OptErr) -> OptFail {
        OptFail::Reply(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{ExportConfig, NbdServer, ServerConfig};
    use crate::testing::MemBackend;

    fn export(depth: bool) -> Arc<Export> {
        let s = NbdServer::new(ServerConfig::default());
        s.add_export(
            ExportConfig {
                name: "e".to_owned(),
                description: None,
                writable: true,
                allocation_depth: depth,
                bitmaps: Vec::new(),
            },
            MemBackend::new(4096),
        )
        .unwrap();
        s.shared_for_tests().find(b"e").unwrap()
    }

    #[test]
    fn namespace_wildcards_select_contexts_for_list_only() {
        let e = export(true);
        let mut list = Contexts::default();
        query(&mut list, &e, b"base:", false);
        query(&mut list, &e, b"qemu:", false);
        assert!(list.base_allocation && list.allocation_depth);
        let mut set = Contexts::default();
        query(&mut set, &e, b"base:", true);
        query(&mut set, &e, b"qemu:", true);
        assert!(!set.base_allocation && !set.allocation_depth);
    }

    #[test]
    fn allocation_depth_is_offered_only_when_the_export_enables_it() {
        let e = export(false);
        let mut sel = Contexts::default();
        query(&mut sel, &e, b"qemu:allocation-depth", true);
        query(&mut sel, &e, b"base:allocation", true);
        assert!(sel.base_allocation);
        assert!(!sel.allocation_depth);
    }

    #[test]
    fn unknown_and_partial_queries_select_nothing() {
        let e = export(true);
        let mut sel = Contexts::default();
        for q in [
            &b"base:allocationx"[..],
            b"qemu:dirty-bitmap:",
            b"other:x",
            b"base",
            b"",
        ] {
            query(&mut sel, &e, q, false);
        }
        assert!(!sel.base_allocation && !sel.allocation_depth);
    }

    fn export_with_bitmaps(names: &[&str]) -> Arc<Export> {
        let s = NbdServer::new(ServerConfig::default());
        let bitmaps = names
            .iter()
            .map(|n| crate::server::ExportBitmap {
                name: (*n).to_owned(),
                source: crate::testing::MemBitmap::new(4096, 512),
            })
            .collect();
        s.add_export(
            ExportConfig {
                name: "e".to_owned(),
                description: None,
                writable: true,
                allocation_depth: false,
                bitmaps,
            },
            MemBackend::new(4096),
        )
        .unwrap();
        s.shared_for_tests().find(b"e").unwrap()
    }

    fn picked(sel: &Contexts) -> Vec<usize> {
        sel.bitmaps.iter().collect()
    }

    #[test]
    fn bitmap_queries_select_by_name_and_wildcards_only_for_list() {
        let e = export_with_bitmaps(&["a", "b", "a:x", "b"]);
        for q in [&b"qemu:"[..], b"qemu:dirty-bitmap:"] {
            let mut list = Contexts::default();
            query(&mut list, &e, q, false);
            assert_eq!(picked(&list), [0, 1, 2, 3]);
            // Depth is not offered by this export, whatever the wildcard.
            assert!(!list.allocation_depth);
            let mut set = Contexts::default();
            query(&mut set, &e, q, true);
            assert!(set.bitmaps.is_empty());
        }
        let mut sel = Contexts::default();
        for q in [
            &b"qemu:dirty-bitmap:a:x"[..],
            b"qemu:dirty-bitmap:b",
            b"qemu:dirty-bitmap:nosuch",
            b"qemu:dirty-bitmap:A",
            b"qemu:dirty-bitmap",
            b"qemu:dirty-bitmap:a ",
        ] {
            query(&mut sel, &e, q, true);
        }
        // A repeated name selects its first bitmap, as qsd's lookup does.
        assert_eq!(picked(&sel), [1, 2]);
    }

    #[test]
    fn bitmap_sets_hold_every_index_an_export_can_have() {
        let mut s = BitmapSet::default();
        for i in [0, 63, 64, 200, MAX_EXPORT_BITMAPS - 1] {
            s.insert(i);
        }
        s.insert(MAX_EXPORT_BITMAPS);
        assert_eq!(s.len(), 5);
        assert!(!s.contains(MAX_EXPORT_BITMAPS) && !s.contains(1));
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            [0, 63, 64, 200, MAX_EXPORT_BITMAPS - 1]
        );
        assert_eq!(BitmapSet::first(3).iter().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(BitmapSet::first(1000).len() as usize, MAX_EXPORT_BITMAPS);
    }

    #[test]
    fn short_fields_report_inconsistent_lengths_with_the_option_name() {
        let mut p = Payload {
            buf: &[0, 0, 0, 5, b'a'],
            pos: 0,
        };
        let OptErr(kind, text) = p.name(OPT_GO).err().unwrap();
        assert_eq!(kind, REP_ERR_INVALID);
        assert_eq!(text, "Inconsistent lengths in option go");
        let mut p = Payload {
            buf: &[0, 0, 0x10, 0x01],
            pos: 0,
        };
        let OptErr(_, text) = p.name(OPT_INFO).err().unwrap();
        assert_eq!(text, "Invalid name length: 4097");
    }
}
