//! The serving end of a data channel against a hostile client: arbitrary submission
//! descriptors, ring indices and control-page words written into the shared region,
//! doorbells rung at will, completions consumed or left to pile up.
//!
//! The server (`bulkhead_ipc::data::serve`) runs on in-memory nodes 1 (writable) and
//! 2 (read-only). Checks: no panic or memory error, and the server ends (cleanly or
//! with a protocol violation) once the client end goes away.
#![no_main]

use std::os::fd::AsFd;

use arbitrary::Arbitrary;
use bulkhead_fuzz::{LAYOUT, Nodes, channel, map, no_spinning, poke, ring, write_pool};
use bulkhead_ipc::ring::Sqe;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Step {
    /// A descriptor with small fields, so offsets and lengths often fit the pool.
    Submit {
        tag: u64,
        node: u8,
        op: u8,
        flags: u8,
        offset: u32,
        len: u32,
        buf_off: u32,
        /// `None`: the buffer is as long as the request (as an honest client sends).
        buf_len: Option<u32>,
        aux_off: u32,
    },
    /// A descriptor with any field values.
    SubmitRaw {
        tag: u64,
        node: u64,
        op: u8,
        flags: u8,
        offset: u64,
        len: u64,
        buf_off: u64,
        buf_len: u64,
        aux_off: u64,
    },
    /// Publish the pushed descriptors and ring the server's doorbell.
    Publish,
    /// Ring the doorbell without publishing.
    Bell,
    /// Consume the completions posted so far.
    Reap,
    /// Overwrite a word of the control page or the rings.
    Poke { at: u32, value: u32 },
    /// Write into the buffer pool.
    Pool { at: u32, bytes: Vec<u8> },
    /// Let the server run.
    Run(u8),
}

fuzz_target!(|steps: Vec<Step>| {
    no_spinning();
    let Some((server_end, client_end)) = channel() else {
        return;
    };
    let Some(region) = map(&client_end) else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async move {
        let server = tokio::spawn(bulkhead_ipc::data::serve(server_end, LAYOUT, Nodes::new()));
        let mut sq = region.sq_producer();
        let mut cq = region.cq_consumer();
        let mut completions = Vec::new();
        let pool = LAYOUT.pool_bytes + 4096;
        for step in steps {
            match step {
                Step::Submit {
                    tag,
                    node,
                    op,
                    flags,
                    offset,
                    len,
                    buf_off,
                    buf_len,
                    aux_off,
                } => {
                    let len = u64::from(len) % pool;
                    let buf_len = buf_len.map_or(len, |l| u64::from(l) % pool);
                    let sqe = Sqe::new(
                        tag,
                        u64::from(node % 4),
                        op % 10,
                        flags % 16,
                        u64::from(offset),
                        len,
                        u64::from(buf_off) % pool,
                        buf_len,
                    )
                    .with_aux(u64::from(aux_off) % pool);
                    let _ = sq.push(sqe);
                }
                Step::SubmitRaw {
                    tag,
                    node,
                    op,
                    flags,
                    offset,
                    len,
                    buf_off,
                    buf_len,
                    aux_off,
                } => {
                    let sqe = Sqe::new(tag, node, op, flags, offset, len, buf_off, buf_len)
                        .with_aux(aux_off);
                    let _ = sq.push(sqe);
                }
                Step::Publish => {
                    let _ = sq.publish();
                    ring(client_end.sq_bell.as_fd());
                }
                Step::Bell => ring(client_end.sq_bell.as_fd()),
                Step::Reap => {
                    completions.clear();
                    let _ = cq.drain(&mut completions);
                }
                Step::Poke { at, value } => poke(&region, at, value),
                Step::Pool { at, bytes } => write_pool(&region, u64::from(at), &bytes),
                Step::Run(n) => {
                    for _ in 0..=n % 8 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
        // The client goes away: the server must notice and end.
        drop(client_end);
        let _verdict = server.await;
    });
});
