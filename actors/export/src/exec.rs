//! Running one request against the exported node.
//!
//! A front decodes its wire's request into one of these calls and encodes the
//! outcome in its wire's reply. The rules that are not wire specifics live here:
//! FUA on a read or a discard means a flush (before the read, after the discard),
//! write-zeroes flags pass through, a sparse read's extents must tile the request,
//! a block status walk that makes no progress is EIO, and the errno a client sees for
//! a failed node call ([`bulkhead_block::IoError::errno`]). A failure names the step
//! that failed ([`Failed`]), so the front can pick its wire's text for it.

use bulkhead_block::{BlockIo, Extent, IoError, SparseReadError, WriteFlags, ZeroFlags};

/// A request whose outcome is success or an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write the request's buffer; `fua`: durable before the reply.
    Write {
        /// Force unit access.
        fua: bool,
    },
    /// Make the range read as zeroes.
    WriteZeroes(ZeroFlags),
    /// Discard the range; `fua`: flush afterwards (a failed flush is a failed
    /// discard).
    Discard {
        /// Force unit access.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
}

/// The step of a request that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Reading data.
    Read,
    /// Writing data.
    Write,
    /// Writing zeroes.
    WriteZeroes,
    /// Discarding.
    Discard,
    /// Flushing (a flush request, or the flush FUA asks for).
    Flush,
    /// Asking for block status on behalf of a sparse read.
    HoleCheck,
    /// Asking for block status.
    BlockStatus,
}

/// A failed request: the step and the errno the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// What failed.
    pub failed: Failed,
    /// The errno the client sees.
    pub errno: i32,
}

impl Failure {
    fn new(failed: Failed, e: &IoError) -> Failure {
        Failure {
            failed,
            errno: e.errno(),
        }
    }
}

/// A run of a sparse read: data (in the buffer) or a hole (reads as zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Offset on the node.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The range reads as zeroes and was not read.
    pub hole: bool,
}

/// Runs `op` on `[offset, offset + len)`; `data` is a write's payload (`len` bytes).
pub async fn run(
    backend: &dyn BlockIo,
    op: Op,
    offset: u64,
    len: u64,
    data: &[u8],
) -> Result<(), Failure> {
    match op {
        Op::Write { fua } => backend
            .write(
                offset,
                data,
                WriteFlags {
                    fua,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Failure::new(Failed::Write, &e)),
        Op::WriteZeroes(flags) => backend
            .write_zeroes(offset, len, flags)
            .await
            .map_err(|e| Failure::new(Failed::WriteZeroes, &e)),
        Op::Discard { fua } => {
            let mut r = backend.discard(offset, len).await;
            if r.is_ok() && fua {
                r = backend.flush().await;
            }
            // Like qsd, a failed FUA flush is a failed discard.
            r.map_err(|e| Failure::new(Failed::Discard, &e))
        }
        Op::Flush => flush(backend).await,
    }
}

async fn flush(backend: &dyn BlockIo) -> Result<(), Failure> {
    backend
        .flush()
        .await
        .map_err(|e| Failure::new(Failed::Flush, &e))
}

/// Reads `buf.len()` bytes at `offset`; `fua` flushes first (as qsd does).
pub async fn read(
    backend: &dyn BlockIo,
    offset: u64,
    buf: &mut [u8],
    fua: bool,
) -> Result<(), Failure> {
    if fua {
        flush(backend).await?;
    }
    backend
        .read(offset, buf)
        .await
        .map_err(|e| Failure::new(Failed::Read, &e))
}

/// Reads `buf.len()` bytes at `offset` for a reader that skips holes: the data runs
/// are read into `buf`, zero ranges are not. Returns runs that tile the request,
/// adjacent ones of the same kind merged. `fua` flushes first.
pub async fn read_sparse(
    backend: &dyn BlockIo,
    offset: u64,
    buf: &mut [u8],
    fua: bool,
) -> Result<Vec<Run>, Failure> {
    if fua {
        flush(backend).await?;
    }
    let len = buf.len() as u64;
    let extents = backend
        .read_sparse(offset, buf)
        .await
        .map_err(|e| match e {
            SparseReadError::Status(e) => Failure::new(Failed::HoleCheck, &e),
            SparseReadError::Read(e) => Failure::new(Failed::Read, &e),
        })?;
    let mut runs: Vec<Run> = Vec::with_capacity(extents.len());
    let mut pos = offset;
    for e in &extents {
        match runs.last_mut() {
            Some(last) if last.hole == e.zero => last.len += e.length,
            _ => runs.push(Run {
                offset: pos,
                len: e.length,
                hole: e.zero,
            }),
        }
        pos += e.length;
    }
    if pos != offset + len {
        // A backend breaking its contract (extents not tiling the request).
        return Err(Failure {
            failed: Failed::HoleCheck,
            errno: libc::EIO,
        });
    }
    Ok(runs)
}

/// Walks block status over `[offset, offset + len)` as `(length, flags)` runs, where
/// `flags` maps an extent to the front's value for it; adjacent runs with equal
/// flags are merged and at most `cap` runs are returned (the walk stops there).
pub async fn block_status(
    backend: &dyn BlockIo,
    offset: u64,
    len: u64,
    cap: usize,
    flags: impl Fn(&Extent) -> u32,
) -> Result<Vec<(u64, u32)>, Failure> {
    let end = offset + len;
    let mut out: Vec<(u64, u32)> = Vec::with_capacity(4);
    let mut pos = offset;
    'outer: while pos < end {
        let extents: Vec<Extent> = backend
            .block_status(pos, end - pos)
            .await
            .map_err(|e| Failure::new(Failed::BlockStatus, &e))?;
        let before = pos;
        for e in &extents {
            let n = e.length.min(end - pos);
            if n == 0 {
                break;
            }
            let f = flags(e);
            let full = out.len() >= cap;
            match out.last_mut() {
                Some(last) if last.1 == f => last.0 += n,
                _ if full => break 'outer,
                _ => out.push((n, f)),
            }
            pos += n;
            if pos >= end {
                break;
            }
        }
        if pos == before {
            // No progress: a backend breaking its contract.
            return Err(Failure {
                failed: Failed::BlockStatus,
                errno: libc::EIO,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_block::IoFuture;

    /// A node whose calls fail as configured, with fixed block status.
    #[derive(Default)]
    struct Node {
        fail_discard: bool,
        fail_flush: bool,
        /// `block_status` answers these (at most `len` of them is used by callers).
        extents: Vec<Extent>,
        /// `read_sparse` answers these.
        sparse: Vec<Extent>,
    }

    fn os(fail: bool, errno: i32) -> Result<(), IoError> {
        if fail {
            Err(IoError::Os(errno))
        } else {
            Ok(())
        }
    }

    impl BlockIo for Node {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read<'a>(&'a self, _: u64, _: &'a mut [u8]) -> IoFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn write<'a>(&'a self, _: u64, _: &'a [u8], _: WriteFlags) -> IoFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_, ()> {
            Box::pin(async { Err(IoError::Os(libc::ENOSPC)) })
        }
        fn discard(&self, _: u64, _: u64) -> IoFuture<'_, ()> {
            Box::pin(async move { os(self.fail_discard, libc::EIO) })
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            Box::pin(async move { os(self.fail_flush, libc::EIO) })
        }
        fn block_status(&self, _: u64, _: u64) -> IoFuture<'_, Vec<Extent>> {
            Box::pin(async move { Ok(self.extents.clone()) })
        }
        fn read_sparse<'a>(&'a self, _: u64, _: &'a mut [u8]) -> bulkhead_block::SparseFuture<'a> {
            Box::pin(async move { Ok(self.sparse.clone()) })
        }
    }

    fn extent(length: u64, zero: bool) -> Extent {
        Extent {
            length,
            data: !zero,
            zero,
            depth: u32::from(!zero),
        }
    }

    #[tokio::test]
    async fn a_failed_fua_flush_after_a_discard_is_a_failed_discard() {
        let node = Node {
            fail_flush: true,
            ..Node::default()
        };
        let r = run(&node, Op::Discard { fua: false }, 0, 512, &[]).await;
        assert_eq!(r, Ok(()));
        let r = run(&node, Op::Discard { fua: true }, 0, 512, &[]).await;
        assert_eq!(
            r,
            Err(Failure {
                failed: Failed::Discard,
                errno: libc::EIO
            })
        );
        let r = run(&node, Op::Flush, 0, 0, &[]).await;
        assert_eq!(r.map_err(|f| f.failed), Err(Failed::Flush));
    }

    #[tokio::test]
    async fn a_fua_read_flushes_first_and_reports_the_flush() {
        let node = Node {
            fail_flush: true,
            ..Node::default()
        };
        let mut buf = [0u8; 512];
        assert_eq!(read(&node, 0, &mut buf, false).await, Ok(()));
        let r = read(&node, 0, &mut buf, true).await;
        assert_eq!(r.map_err(|f| f.failed), Err(Failed::Flush));
        let r = read_sparse(&node, 0, &mut buf, true).await;
        assert_eq!(r.map_err(|f| f.failed), Err(Failed::Flush));
    }

    #[tokio::test]
    async fn errnos_pass_through_with_the_failed_step() {
        let node = Node {
            fail_discard: true,
            ..Node::default()
        };
        let zero = ZeroFlags {
            fua: false,
            may_unmap: true,
            no_fallback: false,
        };
        let r = run(&node, Op::WriteZeroes(zero), 0, 512, &[]).await;
        assert_eq!(
            r,
            Err(Failure {
                failed: Failed::WriteZeroes,
                errno: libc::ENOSPC
            })
        );
        let r = run(&node, Op::Discard { fua: true }, 0, 512, &[]).await;
        assert_eq!(r.map_err(|f| f.failed), Err(Failed::Discard));
    }

    #[tokio::test]
    async fn sparse_runs_merge_and_must_tile_the_request() {
        let mut node = Node {
            sparse: vec![extent(512, false), extent(512, true), extent(1024, true)],
            ..Node::default()
        };
        let mut buf = vec![0u8; 2048];
        let runs = read_sparse(&node, 4096, &mut buf, false).await;
        assert_eq!(
            runs,
            Ok(vec![
                Run {
                    offset: 4096,
                    len: 512,
                    hole: false
                },
                Run {
                    offset: 4608,
                    len: 1536,
                    hole: true
                },
            ])
        );
        node.sparse.pop();
        let r = read_sparse(&node, 4096, &mut buf, false).await;
        assert_eq!(
            r,
            Err(Failure {
                failed: Failed::HoleCheck,
                errno: libc::EIO
            })
        );
    }

    #[tokio::test]
    async fn block_status_merges_caps_and_fails_without_progress() {
        let node = Node {
            extents: vec![extent(512, false), extent(512, false), extent(1024, true)],
            ..Node::default()
        };
        let zero = |e: &Extent| u32::from(e.zero);
        let runs = block_status(&node, 0, 2048, 8, zero).await;
        assert_eq!(runs, Ok(vec![(1024, 0), (1024, 1)]));
        let one = block_status(&node, 0, 2048, 1, zero).await;
        assert_eq!(one, Ok(vec![(1024, 0)]));
        let stuck = Node::default();
        let r = block_status(&stuck, 0, 2048, 8, zero).await;
        assert_eq!(
            r,
            Err(Failure {
                failed: Failed::BlockStatus,
                errno: libc::EIO
            })
        );
    }
}
