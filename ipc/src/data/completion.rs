//! What a completion means beyond its tag: the status code of an [`IoError`] and the
//! extent list a block-status or sparse-read completion points to.
//!
//! The server encodes, the client decodes; both directions sit side by side so the two
//! ends cannot drift apart. Decoding trusts nothing: an extent list that is malformed,
//! too long or longer than the request is refused, and the caller closes the channel.

use bulkhead_block::{Extent, IoError};

use crate::ring::{Cqe, EXTENT_BYTES, MAX_EXTENTS, status};

/// Writes `extents` into an extent buffer; returns how many fit.
pub(super) fn encode_extents(extents: &[Extent], buf: &mut [u8]) -> u32 {
    let mut count = 0;
    for (e, out) in extents.iter().zip(buf.chunks_exact_mut(EXTENT_BYTES)) {
        out[..8].copy_from_slice(&e.length.to_le_bytes());
        let flags = u32::from(e.data) | (u32::from(e.zero) << 1);
        out[8..12].copy_from_slice(&flags.to_le_bytes());
        out[12..16].copy_from_slice(&e.depth.to_le_bytes());
        count += 1;
    }
    count
}

/// Reads `count` extents written by the server; `None` if any is malformed or they
/// add up to more than `len` (or, with `exact`, to anything but `len`).
pub(super) fn decode_extents(
    buf: &[u8],
    count: usize,
    len: u64,
    exact: bool,
) -> Option<Vec<Extent>> {
    if count == 0 || count > MAX_EXTENTS || count * EXTENT_BYTES > buf.len() {
        return None;
    }
    let mut extents = Vec::with_capacity(count);
    let mut total = 0u64;
    for raw in buf[..count * EXTENT_BYTES].chunks_exact(EXTENT_BYTES) {
        let mut l = [0u8; 8];
        l.copy_from_slice(&raw[..8]);
        let length = u64::from_le_bytes(l);
        let flags = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let depth = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        total = total.checked_add(length)?;
        if length == 0 || total > len || flags & !3 != 0 {
            return None;
        }
        extents.push(Extent {
            length,
            data: flags & 1 != 0,
            zero: flags & 2 != 0,
            depth,
        });
    }
    (!exact || total == len).then_some(extents)
}

/// The error a completion's status stands for; `None` for a status no server sends.
pub(super) fn error_of(cqe: &Cqe) -> Option<IoError> {
    Some(match cqe.status {
        status::OS => IoError::Os(i32::try_from(cqe.value).unwrap_or(libc::EIO)),
        status::OUT_OF_RANGE => IoError::OutOfRange,
        status::READ_ONLY => IoError::ReadOnly,
        status::UNSUPPORTED => IoError::Unsupported,
        status::DISCONNECTED => IoError::Disconnected,
        status::INVALID => IoError::Invalid,
        _ => return None,
    })
}

/// The status and value a completion carries for `e` (the inverse of [`error_of`]).
pub(super) fn status_of(e: &IoError) -> (u32, u64) {
    match e {
        IoError::Os(errno) => (status::OS, u64::from(errno.unsigned_abs())),
        IoError::OutOfRange => (status::OUT_OF_RANGE, 0),
        IoError::ReadOnly => (status::READ_ONLY, 0),
        IoError::Unsupported => (status::UNSUPPORTED, 0),
        IoError::Disconnected => (status::DISCONNECTED, 0),
        IoError::Invalid => (status::INVALID, 0),
    }
}
