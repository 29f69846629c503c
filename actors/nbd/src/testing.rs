//! In-memory `BlockIo` for unit tests and the fuzzer: a byte vector plus a
//! per-sector allocation map, so block status has real holes; and an in-memory
//! dirty bitmap ([`MemBitmap`]). Test-only (never in the daemon: feature
//! `testing`); handles no untrusted bytes.

use std::sync::{Arc, Mutex};

use bulkhead_block::{BlockIo, Extent, IoError, IoFuture, WriteFlags, ZeroFlags};

use crate::server::DirtyRuns;

const SECTOR: u64 = 512;

/// An in-memory node.
pub struct MemBackend {
    state: Mutex<(Vec<u8>, Vec<bool>)>,
    read_only: bool,
}

impl MemBackend {
    /// A writable node of `size` bytes, all unallocated zeroes.
    pub fn new(size: u64) -> Arc<MemBackend> {
        Self::build(size, false)
    }

    /// A read-only node of `size` bytes.
    pub fn read_only(size: u64) -> Arc<MemBackend> {
        Self::build(size, true)
    }

    fn build(size: u64, read_only: bool) -> Arc<MemBackend> {
        let sectors = size.div_ceil(SECTOR) as usize;
        Arc::new(MemBackend {
            state: Mutex::new((vec![0; size as usize], vec![false; sectors])),
            read_only,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let size = self.size();
        if offset > size || len > size - offset {
            return Err(IoError::OutOfRange);
        }
        Ok(())
    }

    fn mark(&self, offset: u64, len: u64, allocated: bool) {
        let mut st = self.state.lock().unwrap();
        let (first, last) = if allocated {
            (offset / SECTOR, (offset + len).div_ceil(SECTOR))
        } else {
            (offset.div_ceil(SECTOR), (offset + len) / SECTOR)
        };
        for s in first..last {
            st.1[s as usize] = allocated;
        }
    }
}

impl BlockIo for MemBackend {
    fn size(&self) -> u64 {
        self.state.lock().unwrap().0.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check(offset, buf.len() as u64)?;
            let st = self.state.lock().unwrap();
            buf.copy_from_slice(&st.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], _flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check(offset, buf.len() as u64)?;
            self.state.lock().unwrap().0[offset as usize..offset as usize + buf.len()]
                .copy_from_slice(buf);
            self.mark(offset, buf.len() as u64, true);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, len)?;
            self.state.lock().unwrap().0[offset as usize..(offset + len) as usize].fill(0);
            self.mark(offset, len, !flags.may_unmap);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check(offset, len)?;
            let mut st = self.state.lock().unwrap();
            let (first, last) = (offset.div_ceil(SECTOR), (offset + len) / SECTOR);
            for s in first..last {
                st.1[s as usize] = false;
                let a = (s * SECTOR) as usize;
                st.0[a..a + SECTOR as usize].fill(0);
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            self.check(offset, len)?;
            let st = self.state.lock().unwrap();
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let alloc = st.1[(pos / SECTOR) as usize];
                let next = ((pos / SECTOR + 1) * SECTOR).min(end);
                let n = next - pos;
                match out.last_mut() {
                    Some(e) if e.data == alloc => e.length += n,
                    _ => out.push(Extent {
                        length: n,
                        data: alloc,
                        zero: !alloc,
                        depth: u32::from(alloc),
                    }),
                }
                pos = next;
            }
            Ok(out)
        })
    }
}

/// An in-memory dirty bitmap of fixed size: a bit per `granularity` bytes.
pub struct MemBitmap {
    size: u64,
    granularity: u64,
    bits: Mutex<Vec<bool>>,
}

impl MemBitmap {
    /// A clean bitmap covering `size` bytes, a bit per `granularity` bytes (> 0).
    pub fn new(size: u64, granularity: u64) -> Arc<MemBitmap> {
        let granularity = granularity.max(1);
        Arc::new(MemBitmap {
            size,
            granularity,
            bits: Mutex::new(vec![false; size.div_ceil(granularity) as usize]),
        })
    }

    /// Marks `[offset, offset + len)` dirty (whole granules, clipped to the size).
    pub fn dirty(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let mut bits = self.bits.lock().unwrap();
        for g in offset / self.granularity..end.div_ceil(self.granularity) {
            bits[g as usize] = true;
        }
    }
}

impl DirtyRuns for MemBitmap {
    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.size);
        let bits = self.bits.lock().unwrap();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let g = pos / self.granularity;
            let next = ((g + 1) * self.granularity).min(end);
            let dirty = bits[g as usize];
            match out.last_mut() {
                Some(r) if r.1 == dirty => r.0 += next - pos,
                _ => out.push((next - pos, dirty)),
            }
            pos = next;
        }
        out
    }
}
