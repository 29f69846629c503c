//! What a completion means beyond its tag: the status code of an [`IoError`] and the
//! extent list a block-status or sparse-read completion points to.
//!
//! The server encodes, the client decodes; both directions sit side by side so the two
//! ends cannot drift apart. Decoding trusts nothing: an extent list that is malformed,
//! too long or longer than the request is refused, and the caller closes the channel.

use bulkhead_block::io::MAX_MAP_RUNS;
use bulkhead_block::{Extent, IoError, MapKind, MapRun};

use crate::ring::{Cqe, EXTENT_BYTES, MAP_RUN_BYTES, MAX_EXTENTS, status};

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

/// Writes map runs into a map buffer; returns how many fit.
pub(super) fn encode_map(runs: &[MapRun], buf: &mut [u8]) -> u32 {
    let mut count = 0;
    for (r, out) in runs.iter().zip(buf.chunks_exact_mut(MAP_RUN_BYTES)) {
        let (host, kind, level) = match r.kind {
            MapKind::Data { host, layer } => (host, 0u32, layer),
            MapKind::Zero { depth } => (0, 1, depth),
            MapKind::Driver => (0, 3, 0),
        };
        out[..8].copy_from_slice(&r.length.to_le_bytes());
        out[8..16].copy_from_slice(&host.to_le_bytes());
        out[16..20].copy_from_slice(&kind.to_le_bytes());
        out[20..24].copy_from_slice(&level.to_le_bytes());
        count += 1;
    }
    count
}

/// Reads `count` map runs written by the server; `None` if any is malformed or they
/// add up to more than `len`.
pub(super) fn decode_map(buf: &[u8], count: usize, len: u64) -> Option<Vec<MapRun>> {
    if count == 0 || count > MAX_MAP_RUNS || count * MAP_RUN_BYTES > buf.len() {
        return None;
    }
    let mut runs = Vec::with_capacity(count);
    let mut total = 0u64;
    for raw in buf[..count * MAP_RUN_BYTES].chunks_exact(MAP_RUN_BYTES) {
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&raw[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let (length, host) = (word(0), word(8));
        let kind = u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]);
        let level = u32::from_le_bytes([raw[20], raw[21], raw[22], raw[23]]);
        total = total.checked_add(length)?;
        if length == 0 || total > len {
            return None;
        }
        let kind = match kind {
            0 => {
                host.checked_add(length)?;
                MapKind::Data { host, layer: level }
            }
            1 => MapKind::Zero { depth: level },
            3 if level == 0 => MapKind::Driver,
            _ => return None,
        };
        runs.push(MapRun { length, kind });
    }
    Some(runs)
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
        IoError::Source(errno) => (status::OS, u64::from(errno.unsigned_abs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_runs_round_trip_and_hostile_ones_are_refused() {
        let runs = [
            MapRun {
                length: 65536,
                kind: MapKind::Data {
                    host: 1 << 20,
                    layer: 2,
                },
            },
            MapRun {
                length: 512,
                kind: MapKind::Zero { depth: 1 },
            },
            MapRun {
                length: 4096,
                kind: MapKind::Zero { depth: 0 },
            },
            MapRun {
                length: 1,
                kind: MapKind::Driver,
            },
        ];
        let mut buf = vec![0u8; 4 * MAP_RUN_BYTES];
        assert_eq!(encode_map(&runs, &mut buf), 4);
        let total: u64 = runs.iter().map(|r| r.length).sum();
        assert_eq!(decode_map(&buf, 4, total).as_deref(), Some(&runs[..]));
        // More than asked for, a zero length, an unknown kind, a host range that
        // wraps, a count past the buffer.
        assert!(decode_map(&buf, 4, total - 1).is_none());
        let mut bad = buf.clone();
        bad[MAP_RUN_BYTES..MAP_RUN_BYTES + 8].fill(0);
        assert!(decode_map(&bad, 4, total).is_none());
        let mut bad = buf.clone();
        bad[16] = 9;
        assert!(decode_map(&bad, 4, total).is_none());
        let mut bad = buf.clone();
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_map(&bad, 4, total).is_none());
        assert!(decode_map(&buf, 5, total).is_none());
        assert!(decode_map(&buf, 0, total).is_none());
    }
}
