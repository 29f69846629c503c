//! NBD wire constants and fixed-size header codecs.
//!
//! Runs in the NBD export worker. The decoders here take untrusted bytes from a
//! client but only ever read fixed-size arrays, so they cannot fail; the callers
//! validate the decoded fields. Values follow the NetworkBlockDevice `doc/proto.md`
//! and QEMU's `include/block/nbd.h` names.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, also the magic of every client option.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Server handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may skip the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding after the EXPORT_NAME reply.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;
pub const TF_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// Info types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply chunk flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// base:allocation extent flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:` extent flag.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Meta context ids as qsd assigns them.
pub const META_ID_BASE_ALLOCATION: u32 = 0;
pub const META_ID_ALLOCATION_DEPTH: u32 = 1;
/// The export's bitmap `i` is `META_ID_DIRTY_BITMAP + i`.
pub const META_ID_DIRTY_BITMAP: u32 = 2;
/// A bitmap's context name is this prefix and the bitmap's name.
pub const BITMAP_CONTEXT_PREFIX: &str = "qemu:dirty-bitmap:";

/// NBD errno values (the protocol's own numbering, which matches Linux).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Largest option payload, READ/WRITE/CACHE length and block-size maximum (QEMU's
/// `NBD_MAX_BUFFER_SIZE`).
pub const MAX_BUFFER_SIZE: u32 = 32 * 1024 * 1024;
/// Longest export name, description or context query (QEMU's `NBD_MAX_STRING_SIZE`).
pub const MAX_STRING_SIZE: usize = 4096;
/// Most extents in one BLOCK_STATUS chunk (QEMU's `NBD_MAX_BLOCK_STATUS_EXTENTS`).
pub const MAX_BLOCK_STATUS_EXTENTS: usize = 1024 * 1024 / 8;
/// Most requests one client may have in flight (QEMU's `MAX_NBD_REQUESTS`; the
/// bound every export front shares).
pub const MAX_REQUESTS: usize = bulkhead_export::MAX_IN_FLIGHT;
// The executor's buffer budgets are sized for NBD's largest request.
const _: () = assert!(MAX_BUFFER_SIZE == bulkhead_export::MAX_REQUEST_BYTES);
/// Size of a compact request header.
pub const REQUEST_SIZE: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_SIZE: usize = 32;

/// Maps an operating-system errno to the NBD errno the client sees, as qsd's
/// `system_errno_to_nbd_errno` does.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        0 => 0,
        libc::EPERM | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EDQUOT | libc::EFBIG | libc::ENOSPC => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EINVAL,
    }
}

/// qsd's `nbd_opt_lookup`: the option name used in error texts (qsd has no name
/// for PEEK_EXPORT; live it reports `Unsupported option 4 (<unknown>)`).
pub fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// qsd's `nbd_cmd_lookup`: the command name used in error texts.
pub fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write zeroes",
        CMD_BLOCK_STATUS => "block status",
        _ => "<unknown>",
    }
}

/// A decoded request header (compact or extended; `len` is widened to 64 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl RequestHeader {
    /// Decodes a header of `REQUEST_SIZE` or `EXTENDED_REQUEST_SIZE` bytes; the
    /// length field is 32 bits in the first form and 64 bits in the second.
    pub fn decode(buf: &[u8; EXTENDED_REQUEST_SIZE], extended: bool) -> RequestHeader {
        RequestHeader {
            magic: be32(buf, 0),
            flags: be16(buf, 4),
            kind: be16(buf, 6),
            cookie: be64(buf, 8),
            offset: be64(buf, 16),
            len: if extended {
                be64(buf, 24)
            } else {
                u64::from(be32(buf, 24))
            },
        }
    }
}

/// Encodes an option reply header.
pub fn option_reply(opt: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..8].copy_from_slice(&REP_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&kind.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    h
}

/// Encodes a simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h
}

/// Largest chunk header (extended form).
pub const CHUNK_HEADER_MAX: usize = 32;

/// Encodes a structured (20-byte) or extended (32-byte) reply chunk header into
/// `out` and returns the number of bytes used. The extended form carries the
/// request's offset, as qsd's `set_be_chunk` does.
pub fn chunk_header(
    out: &mut [u8; CHUNK_HEADER_MAX],
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) -> usize {
    if extended {
        out[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&kind.to_be_bytes());
        out[8..16].copy_from_slice(&cookie.to_be_bytes());
        out[16..24].copy_from_slice(&offset.to_be_bytes());
        out[24..32].copy_from_slice(&payload_len.to_be_bytes());
        32
    } else {
        out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&kind.to_be_bytes());
        out[8..16].copy_from_slice(&cookie.to_be_bytes());
        // Structured chunks only ever carry payloads below 32 MiB plus a header.
        let len32 = u32::try_from(payload_len).unwrap_or(u32::MAX);
        out[16..20].copy_from_slice(&len32.to_be_bytes());
        20
    }
}

/// Truncates a client-supplied name for an error reply, as qsd's
/// `nbd_sanitize_name` does: names of 80 bytes or more become their first 80
/// bytes followed by `...`.
pub fn sanitize_name(name: &[u8]) -> String {
    if name.len() < 80 {
        String::from_utf8_lossy(name).into_owned()
    } else {
        format!("{}...", String::from_utf8_lossy(&name[..80]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_request_length_is_widened_from_32_bits() {
        let mut b = [0u8; EXTENDED_REQUEST_SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&1u16.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0x1122u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
        b[28..32].copy_from_slice(&[9, 9, 9, 9]);
        let h = RequestHeader::decode(&b, false);
        assert_eq!(
            h,
            RequestHeader {
                magic: REQUEST_MAGIC,
                flags: 1,
                kind: CMD_WRITE,
                cookie: 0x1122,
                offset: 4096,
                len: 0xffff_ffff
            }
        );
    }

    #[test]
    fn extended_request_length_is_64_bits() {
        let mut b = [0u8; EXTENDED_REQUEST_SIZE];
        b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(RequestHeader::decode(&b, true).len, 1 << 40);
    }

    #[test]
    fn errno_mapping_follows_qsd() {
        assert_eq!(nbd_errno(libc::EROFS), NBD_EPERM);
        assert_eq!(nbd_errno(libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(nbd_errno(libc::EFBIG), NBD_ENOSPC);
        assert_eq!(nbd_errno(libc::ENOENT), NBD_EINVAL);
        assert_eq!(nbd_errno(libc::ESHUTDOWN), NBD_ESHUTDOWN);
        assert_eq!(nbd_errno(libc::ENOTSUP), NBD_ENOTSUP);
    }

    #[test]
    fn long_names_are_cut_at_80_bytes_with_an_ellipsis() {
        let name = vec![b'a'; 81];
        assert_eq!(sanitize_name(&name), format!("{}...", "a".repeat(80)));
        assert_eq!(sanitize_name(b"short"), "short");
        assert_eq!(sanitize_name(&[b'b'; 79]), "b".repeat(79));
    }

    #[test]
    fn chunk_headers_have_the_right_sizes_and_magics() {
        let mut out = [0u8; CHUNK_HEADER_MAX];
        assert_eq!(chunk_header(&mut out, false, 1, 2, 3, 4, 5), 20);
        assert_eq!(&out[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[16..20], &5u32.to_be_bytes());
        assert_eq!(chunk_header(&mut out, true, 1, 2, 3, 4, 5), 32);
        assert_eq!(&out[0..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[16..24], &4u64.to_be_bytes());
        assert_eq!(&out[24..32], &5u64.to_be_bytes());
    }
}
