//! Compressed clusters: raw deflate with a 4 KiB window (what QEMU writes) or zstd,
//! chosen by the header's compression type. Output is bounded by the cluster size.

use crate::header::CompressionType;

/// Inflates `src` into `dst` (one cluster); fails unless `dst` is filled completely.
pub fn decompress(kind: CompressionType, src: &[u8], dst: &mut [u8]) -> Result<(), ()> {
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new_with_window_bits(false, 12);
            // One call into the whole cluster buffer, as QEMU does: matches may reach back
            // further than the window into the output already produced.
            let r = d.decompress(src, dst, flate2::FlushDecompress::Finish);
            match r {
                Ok(_) if d.total_out() == dst.len() as u64 => Ok(()),
                _ => Err(()),
            }
        }
        CompressionType::Zstd => {
            // The compressed span is sector-rounded: trailing bytes after the frame are
            // ignored. The frame must produce exactly one cluster.
            let mut dec = zstd::bulk::Decompressor::new().map_err(|_| ())?;
            // Streaming decode bounded by dst: `decompress_to_buffer` fails if the
            // frame wants more room than the cluster.
            let n = match dec.decompress_to_buffer(src, dst) {
                Ok(n) => n,
                Err(_) => {
                    // A span with trailing garbage after the frame: find the frame's own
                    // length and retry on exactly that.
                    let flen = zstd::zstd_safe::find_frame_compressed_size(src).map_err(|_| ())?;
                    let frame = src.get(..flen).ok_or(())?;
                    dec.decompress_to_buffer(frame, dst).map_err(|_| ())?
                }
            };
            if n == dst.len() { Ok(()) } else { Err(()) }
        }
    }
}

/// Compresses one cluster; `None` when it does not get smaller than `max` bytes.
pub fn compress(kind: CompressionType, src: &[u8], max: usize) -> Option<Vec<u8>> {
    match kind {
        CompressionType::Zlib => {
            let mut c =
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(max);
            match c.compress_vec(src, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() < max => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(src, 0).ok()?;
            (out.len() < max).then_some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_hostile() {
        let mut src = vec![0u8; 65536];
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i % 251) as u8 ^ (i / 4096) as u8;
        }
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &src, src.len()).expect("compressible");
            let mut out = vec![0u8; 65536];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, src);
            // Trailing bytes after the stream are harmless.
            let mut padded = c.clone();
            padded.extend_from_slice(&[0xaa; 300]);
            decompress(kind, &padded, &mut out).unwrap();
            assert_eq!(out, src);
            // Too small an output buffer, truncated input, garbage: errors.
            // An output that fills before the stream ends: QEMU accepts it for zlib
            // (Z_BUF_ERROR with no room left), zstd refuses.
            let mut small = vec![0u8; 4096];
            assert_eq!(
                decompress(kind, &c, &mut small).is_err(),
                kind == CompressionType::Zstd
            );
            assert!(decompress(kind, &c[..c.len() / 2], &mut out).is_err());
            assert!(decompress(kind, &[0xff; 100], &mut out).is_err());
        }
    }
}
