//! The qcow2 engine on a hostile image held in memory: open (header, extensions,
//! snapshot table, bitmap directory, L1 and refcount tables, dirty-image repair), then
//! reads, writes (some in place under an engine lease, as the node driver does),
//! zero-writes, discards, block status, compressed writes, resize,
//! internal snapshot creation and deletion, persistent bitmaps taken and stored back,
//! stored anew or removed, derived from the input, then a clean close
//! and a second open of what was written.
//!
//! Input: byte 0 flags (bit 0 writable, bit 1 backing node, bit 2 no overlap checks,
//! bit 3 discard-no-unref), bytes 1..41: ten operations of 4 bytes, then the image.
//!
//! Speed (see design/fuzzing.md): the image lives in a sparse in-memory file (pages
//! only where written, 64 MiB cap), and L1/refcount tables declared larger than
//! 256 KiB (but within QEMU's limits) are shrunk to 256 KiB before opening.
#![no_main]

use std::sync::Arc;

use bulkhead_qcow2::{
    Backing, NewSnapshot, OpenOptions, OverlapCheck, Qcow2, Storage, StoreBitmap,
};
use libfuzzer_sys::fuzz_target;

/// Images may grow to this in memory (a write past it fails with ENOSPC).
const CAP: u64 = 64 << 20;
const OPS: usize = 10;
/// Page of [`Sparse`]: what a write far past the end costs.
const PAGE: u64 = 64 << 10;

/// `MemStorage`'s semantics (bytes past the end and never written read as zeroes,
/// writes past `CAP` fail with ENOSPC, `set_len` truncates or extends) on pages that
/// exist only where something was written: a hostile image that makes the engine
/// write at 60 MiB costs one page, not a 60 MiB memset (and another 60 MiB copy for
/// the reopen), which made such inputs 30 to 100 times slower than the rest.
#[derive(Clone, Default)]
struct Sparse {
    pages: std::collections::BTreeMap<u64, Box<[u8]>>,
    len: u64,
}

fn enospc() -> std::io::Error {
    std::io::Error::from_raw_os_error(28)
}

impl Sparse {
    fn new(image: &[u8]) -> Sparse {
        let mut s = Sparse::default();
        s.write(image, 0);
        s
    }
    fn write(&mut self, buf: &[u8], off: u64) {
        let mut done = 0;
        while done < buf.len() {
            let at = off + done as u64;
            let (page, within) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - within).min(buf.len() - done);
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        self.len = self.len.max(off + buf.len() as u64);
    }
    fn read(&self, buf: &mut [u8], off: u64) {
        let mut done = 0;
        while done < buf.len() {
            let at = off.saturating_add(done as u64);
            let (page, within) = (at / PAGE, (at % PAGE) as usize);
            let n = (PAGE as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.pages.get(&page) {
                Some(p) if at < self.len => out.copy_from_slice(&p[within..within + n]),
                _ => out.fill(0),
            }
            done += n;
        }
    }
    fn set_len(&mut self, len: u64) {
        if len < self.len {
            // What was cut off reads as zeroes if the file grows again.
            self.pages.retain(|&p, _| p * PAGE < len);
            if let Some(p) = self.pages.get_mut(&(len / PAGE)) {
                p[(len % PAGE) as usize..].fill(0);
            }
        }
        self.len = len;
    }
}

struct SparseStorage(std::sync::Mutex<Sparse>);

impl SparseStorage {
    fn new(s: Sparse) -> SparseStorage {
        SparseStorage(std::sync::Mutex::new(s))
    }
    fn get(&self) -> std::sync::MutexGuard<'_, Sparse> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for SparseStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.get().read(buf, off);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        off.checked_add(buf.len() as u64)
            .filter(|&e| e <= CAP)
            .ok_or_else(enospc)?;
        self.get().write(buf, off);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.get().len)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > CAP {
            return Err(enospc());
        }
        self.get().set_len(len);
        Ok(())
    }
}

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

fn run_ops(q: &Qcow2, file: &dyn Storage, ops: &[u8]) {
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
                // Bit 5: an overwrite in place outside the engine where it leases one
                // (as the node driver writes without FUA), else the engine's write.
                match (op[0] & 32 != 0)
                    .then(|| q.try_in_place(off, len))
                    .transpose()
                {
                    Ok(Some(Some(lease))) => {
                        // The storage's only error is ENOSPC past its cap.
                        let _ = file.write_at(b, lease.host());
                        Ok(())
                    }
                    Ok(_) => q.write(b, off, op[0] & 16 != 0),
                    Err(e) => Err(e),
                }
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
            13 => {
                // The daemon's persistent-bitmap round trip: every loaded bitmap
                // taken, then stored back (a new directory from hostile entries).
                let names: Vec<String> = q.info().bitmaps.iter().map(|b| b.name.clone()).collect();
                let taken = q.take_bitmaps(&names);
                let list: Vec<StoreBitmap<'_>> = taken
                    .iter()
                    .map(|t| StoreBitmap {
                        name: &t.name,
                        granularity: t.granularity,
                        enabled: t.enabled,
                        bits: &t.bits,
                    })
                    .collect();
                q.store_bitmaps(&list)
            }
            14 => {
                if op[0] & 16 != 0 {
                    let first = q.info().bitmaps.first().map(|b| b.name.clone());
                    q.remove_bitmap(first.as_deref().unwrap_or("f0"))
                } else {
                    b.fill(op[3]);
                    q.store_bitmaps(&[StoreBitmap {
                        name: &format!("f{}", op[3] % 4),
                        granularity: 512 << (op[3] % 8),
                        enabled: op[3] & 1 != 0,
                        bits: b,
                    }])
                }
            }
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

/// Largest L1 and refcount tables the target opens (256 KiB: 32 768 entries).
const TABLE_LIMIT: u64 = 256 << 10;

/// Shrinks an L1 or refcount table the header declares larger than [`TABLE_LIMIT`]
/// but within QEMU's limits (32 MiB, 8 MiB), which the engine would accept, to that
/// limit (L1: the image may then be refused as "L1 table too small"). Every pass over
/// such a table (open, reopen, snapshot creation's refcount walk and L1 copy) visits
/// each entry, up to 4 M of them: images with a 5 MiB L1 made most of the run time
/// at ~100 executions per second. Sizes past QEMU's limits are left as they are (the
/// header parser refuses them before reading anything). The rest of such an input
/// (operations, other header fields, the tables' contents) keeps its meaning.
fn clamp_tables(image: &mut [u8]) {
    let be32 = |image: &[u8], at: usize| {
        image
            .get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap_or([0; 4])))
    };
    if image.len() < 60 || image[..4] != *b"QFI\xfb" {
        return;
    }
    let cluster_bits = be32(image, 20);
    if !(9..=21).contains(&cluster_bits) {
        return;
    }
    let l1 = u64::from(be32(image, 36)) * 8;
    if TABLE_LIMIT < l1 && l1 <= 32 << 20 {
        image[36..40].copy_from_slice(&((TABLE_LIMIT / 8) as u32).to_be_bytes());
    }
    let reftable = u64::from(be32(image, 56)) << cluster_bits;
    if TABLE_LIMIT < reftable && reftable <= 8 << 20 {
        let clusters = (TABLE_LIMIT >> cluster_bits).max(1) as u32;
        image[56..60].copy_from_slice(&clusters.to_be_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 1 + 4 * OPS {
        return;
    }
    let flags = data[0];
    let ops = &data[1..1 + 4 * OPS];
    let mut image = data[1 + 4 * OPS..].to_vec();
    clamp_tables(&mut image);
    let storage = Arc::new(SparseStorage::new(Sparse::new(&image)));
    let Ok(q) = Qcow2::open(storage.clone() as Arc<dyn Storage>, options(flags)) else {
        return;
    };
    let _ = q.info();
    run_ops(&q, storage.as_ref(), ops);
    let _ = q.close();
    drop(q);
    // What the engine wrote opens again (or is refused cleanly).
    let again = Arc::new(SparseStorage::new(storage.get().clone()));
    if let Ok(q) = Qcow2::open(again as Arc<dyn Storage>, options(flags & !1)) {
        let mut b = vec![0u8; 4096.min(q.size()) as usize];
        let _ = q.read(&mut b, 0);
    }
});
