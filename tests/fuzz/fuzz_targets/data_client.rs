//! The client end of a data channel (`RemoteNode` over `DataClient`) against a
//! hostile server: completions with any tag, status, value and extent count, extent
//! lists written into the pool, ring indices and control-page words overwritten,
//! doorbells rung at will, all while the client has requests of every kind in flight
//! (copy-through-pool and in-place buffers).
//!
//! Checks: no panic or memory error. At the end the server end goes away and the
//! run stops; requests still waiting are dropped (cancellation is a path too).
#![no_main]

use std::os::fd::AsFd;
use std::sync::Arc;

use arbitrary::Arbitrary;
use bulkhead_block::{BlockIo, WriteFlags, ZeroFlags};
use bulkhead_fuzz::{LAYOUT, channel, map, no_spinning, poke, ring, write_pool};
use bulkhead_ipc::data::{DataClient, Peer};
use bulkhead_ipc::ring::{Cqe, EXTENT_BYTES, Sqe, op, status};
use bulkhead_ipc::wire::NodeId;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Call {
    Read {
        offset: u32,
        len: u16,
        in_pool: bool,
    },
    ReadSparse {
        offset: u32,
        len: u16,
        in_pool: bool,
    },
    Write {
        offset: u32,
        len: u16,
        fua: bool,
        in_pool: bool,
    },
    WriteZeroes {
        offset: u32,
        len: u32,
        flags: u8,
    },
    Discard {
        offset: u32,
        len: u32,
    },
    Flush,
    BlockStatus {
        offset: u32,
        len: u32,
    },
    Refresh,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// The client starts a request.
    Call(Call),
    /// Take the submissions published so far.
    Take,
    /// Answer a taken submission the way an honest server would (success; extents
    /// that cover the range).
    Honest { which: u8 },
    /// Answer a taken submission with any status, value and aux.
    Complete {
        which: u8,
        status: u8,
        value: u64,
        aux: u32,
    },
    /// A completion with any tag.
    CompleteRaw {
        tag: u64,
        status: u32,
        value: u64,
        aux: u32,
    },
    /// Write extents (length, flags, depth) where a taken submission expects them.
    Extents {
        which: u8,
        extents: Vec<(u64, u32, u32)>,
    },
    /// Publish the completions and ring the client's doorbell.
    Publish,
    /// Ring the doorbell without publishing.
    Bell,
    /// Overwrite a word of the control page or the rings.
    Poke { at: u32, value: u32 },
    /// Write into the buffer pool.
    Pool { at: u32, bytes: Vec<u8> },
    /// Let the client run.
    Run(u8),
}

const SIZE: u64 = 1 << 20;

async fn call(node: Arc<dyn BlockIo>, c: Call) {
    match c {
        Call::Read {
            offset,
            len,
            in_pool,
        } => {
            let len = usize::from(len);
            match node.alloc_buffer(len).filter(|_| in_pool) {
                Some(mut b) => {
                    let _ = node.read(u64::from(offset), &mut b[..len]).await;
                }
                None => {
                    let _ = node.read(u64::from(offset), &mut vec![0; len]).await;
                }
            }
        }
        Call::ReadSparse {
            offset,
            len,
            in_pool,
        } => {
            let len = usize::from(len);
            match node.alloc_buffer(len).filter(|_| in_pool) {
                Some(mut b) => {
                    let _ = node.read_sparse(u64::from(offset), &mut b[..len]).await;
                }
                None => {
                    let _ = node.read_sparse(u64::from(offset), &mut vec![0; len]).await;
                }
            }
        }
        Call::Write {
            offset,
            len,
            fua,
            in_pool,
        } => {
            let len = usize::from(len);
            let flags = WriteFlags {
                fua,
                ..WriteFlags::default()
            };
            match node.alloc_buffer(len).filter(|_| in_pool) {
                Some(b) => {
                    let _ = node.write(u64::from(offset), &b[..len], flags).await;
                }
                None => {
                    let _ = node.write(u64::from(offset), &vec![7; len], flags).await;
                }
            }
        }
        Call::WriteZeroes { offset, len, flags } => {
            let flags = ZeroFlags {
                fua: flags & 1 != 0,
                may_unmap: flags & 2 != 0,
                no_fallback: flags & 4 != 0,
            };
            let _ = node
                .write_zeroes(u64::from(offset), u64::from(len), flags)
                .await;
        }
        Call::Discard { offset, len } => {
            let _ = node.discard(u64::from(offset), u64::from(len)).await;
        }
        Call::Flush => {
            let _ = node.flush().await;
        }
        Call::BlockStatus { offset, len } => {
            let _ = node.block_status(u64::from(offset), u64::from(len)).await;
        }
        Call::Refresh => {
            let _ = node.refresh().await;
        }
    }
}

/// Where a submission wants its extents: (pool offset, room in bytes).
fn extent_area(sqe: &Sqe) -> Option<(u64, u64)> {
    match sqe.op {
        op::BLOCK_STATUS => Some((sqe.buf_off, sqe.buf_len)),
        op::READ_SPARSE => Some((sqe.aux_off, bulkhead_ipc::ring::EXTENT_BUFFER as u64)),
        _ => None,
    }
}

fn encode(extents: &[(u64, u32, u32)], room: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for &(length, flags, depth) in extents {
        if out.len() as u64 + EXTENT_BYTES as u64 > room {
            break;
        }
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&depth.to_le_bytes());
    }
    out
}

fuzz_target!(|steps: Vec<Step>| {
    no_spinning();
    let Some((server_end, client_end)) = channel() else {
        return;
    };
    let Some(region) = map(&server_end) else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async move {
        let Ok(client) = DataClient::spawn(client_end, LAYOUT) else {
            return;
        };
        let peer = Peer::new();
        peer.attach(1, client);
        // The client's user: opens node 1 (an INFO round trip), then starts calls.
        let (calls, mut queued) = tokio::sync::mpsc::unbounded_channel::<Call>();
        let user_peer = Arc::clone(&peer);
        tokio::spawn(async move {
            let Ok(node) = user_peer.node(NodeId(1)).await else {
                return;
            };
            let node: Arc<dyn BlockIo> = Arc::new(node);
            while let Some(c) = queued.recv().await {
                tokio::spawn(call(Arc::clone(&node), c));
            }
        });
        let mut sq = region.sq_consumer();
        let mut cq = region.cq_producer();
        let mut taken: Vec<Sqe> = Vec::new();
        for step in steps {
            match step {
                Step::Call(c) => {
                    let _ = calls.send(c);
                }
                Step::Take => {
                    let _ = sq.drain(&mut taken);
                }
                Step::Honest { which } => {
                    if taken.is_empty() {
                        continue;
                    }
                    let sqe = taken.remove(usize::from(which) % taken.len());
                    let mut aux = 0;
                    let mut value = 0;
                    if let Some((at, room)) = extent_area(&sqe) {
                        let list = [(sqe.len, 1, 1)];
                        write_pool(&region, at, &encode(&list, room));
                        aux = 1;
                    } else if sqe.op == op::INFO {
                        value = SIZE;
                    }
                    let _ = cq.push(Cqe::new(sqe.tag, status::OK, value, aux));
                }
                Step::Complete {
                    which,
                    status,
                    value,
                    aux,
                } => {
                    if taken.is_empty() {
                        continue;
                    }
                    let sqe = taken.remove(usize::from(which) % taken.len());
                    let _ = cq.push(Cqe::new(sqe.tag, u32::from(status % 8), value, aux));
                }
                Step::CompleteRaw {
                    tag,
                    status,
                    value,
                    aux,
                } => {
                    let _ = cq.push(Cqe::new(tag, status, value, aux));
                }
                Step::Extents { which, extents } => {
                    if taken.is_empty() {
                        continue;
                    }
                    let sqe = taken[usize::from(which) % taken.len()];
                    if let Some((at, room)) = extent_area(&sqe) {
                        write_pool(&region, at, &encode(&extents, room));
                    }
                }
                Step::Publish => {
                    let _ = cq.publish();
                    ring(server_end.cq_bell.as_fd());
                }
                Step::Bell => ring(server_end.cq_bell.as_fd()),
                Step::Poke { at, value } => poke(&region, at, value),
                Step::Pool { at, bytes } => write_pool(&region, u64::from(at), &bytes),
                Step::Run(n) => {
                    for _ in 0..=n % 8 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
        // The server goes away; let the client notice, then stop.
        drop(server_end);
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    });
});
