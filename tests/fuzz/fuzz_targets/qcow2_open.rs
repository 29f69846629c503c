//! The qcow2 engine on a hostile image held in memory: open (header, extensions,
//! snapshot table, bitmap directory, L1 and refcount tables, dirty-image repair), then
//! reads, writes, zero-writes, discards, block status, compressed writes, resize,
//! internal snapshot creation and deletion, derived from the input, then a clean close and a second open of what was written.
//!
//! Input: byte 0 flags (bit 0 writable, bit 1 backing node, bit 2 no overlap checks,
//! bit 3 discard-no-unref), bytes 1..41: ten operations of 4 bytes, then the image.
#![no_main]

use std::sync::Arc;

use bulkhead_qcow2::{
    Backing, MemStorage, NewSnapshot, OpenOptions, OverlapCheck, Qcow2, Storage,
};
use libfuzzer_sys::fuzz_target;

/// Images may grow to this in memory (a write past it fails with ENOSPC).
const CAP: u64 = 64 << 20;
const OPS: usize = 10;

struct Pattern(u64);

impl Backing for Pattern {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((off + i as u64) % 251) as u8;
        }
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0)
    }
}

fn options(flags: u8) -> OpenOptions {
    OpenOptions {
        writable: flags & 1 != 0,
        backing: (flags & 2 != 0).then(|| Arc::new(Pattern(1 << 20)) as Arc<dyn Backing>),
        overlap_check: if flags & 4 != 0 {
            OverlapCheck::None
        } else {
            OverlapCheck::Cached
        },
        discard_no_unref: flags & 8 != 0,
        // Small caches and batches: more evictions and refills per input.
        l2_cache_size: Some(4096),
        refcount_cache_size: Some(4096),
        alloc_batch: Some(3),
        ..OpenOptions::default()
    }
}

fn run_ops(q: &Qcow2, ops: &[u8]) {
    let size = q.size();
    if size == 0 {
        return;
    }
    let cs = q.info().cluster_size;
    let mut buf = vec![0u8; (3 * cs).min(256 << 10) as usize];
    for op in ops.chunks_exact(4) {
        let sel = u16::from_le_bytes([op[1], op[2]]) as u64;
        // Offsets spread over the image: the start, cluster-aligned spots, the end.
        let off = match op[0] >> 6 {
            0 => sel % size.min(1 << 20),
            1 => (sel * cs) % size,
            2 => size.saturating_sub(sel % (2 * cs) + 1),
            _ => (sel.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % size,
        };
        let len = (1 + u64::from(op[3]) * (cs / 64).max(1))
            .min(buf.len() as u64)
            .min(size - off);
        let b = &mut buf[..len as usize];
        let _ = match op[0] & 15 {
            0 | 1 | 12 => q.read(b, off).map(|_| ()),
            2 | 3 => {
                b.fill(op[3]);
                q.write(b, off, op[0] & 16 != 0)
            }
            4 => q.write_zeroes(off, len, op[0] & 16 != 0),
            5 => q.discard(off, len),
            6 => q.block_status(off, len).map(|_| ()),
            7 => {
                let mut c = vec![0u8; cs as usize];
                let n = 64.min(c.len());
                c[..n].fill(op[3]);
                q.write_compressed(&c, off / cs * cs)
            }
            8 => {
                // Grow or shrink by up to a few clusters (bounded work).
                let delta = (u64::from(op[3]) % 8) * cs;
                let new = if op[0] & 16 != 0 {
                    size.saturating_add(delta)
                } else {
                    size.saturating_sub(delta)
                };
                q.resize(new / 512 * 512)
            }
            9 => q
                .snapshot_create(NewSnapshot {
                    name: format!("s{}", op[3] % 4),
                    ..NewSnapshot::default()
                })
                .map(|_| ()),
            10 => q
                .snapshot_delete(None, Some(&format!("s{}", op[3] % 4)))
                .map(|_| ()),
            11 => q.flush(),
            _ => {
                let info = q.info();
                match info.snapshots.first() {
                    Some(s) => q.snapshot_delete(Some(&s.id), None).map(|_| ()),
                    None => Ok(()),
                }
            }
        };
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 1 + 4 * OPS {
        return;
    }
    let flags = data[0];
    let ops = &data[1..1 + 4 * OPS];
    let image = data[1 + 4 * OPS..].to_vec();
    let storage = Arc::new(MemStorage::new(image, CAP));
    let Ok(q) = Qcow2::open(storage.clone() as Arc<dyn Storage>, options(flags)) else {
        return;
    };
    let _ = q.info();
    run_ops(&q, ops);
    let _ = q.close();
    drop(q);
    // What the engine wrote opens again (or is refused cleanly).
    let again = Arc::new(MemStorage::new(storage.contents(), CAP));
    if let Ok(q) = Qcow2::open(again as Arc<dyn Storage>, options(flags & !1)) {
        let mut b = vec![0u8; 4096.min(q.size()) as usize];
        let _ = q.read(&mut b, 0);
    }
});
