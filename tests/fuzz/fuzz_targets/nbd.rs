//! An NBD client sending arbitrary bytes: handshake (option haggling, LIST, INFO,
//! GO, meta contexts, structured/extended replies) and then the transmission phase,
//! against a server with two in-memory exports: "" (writable, with
//! `qemu:allocation-depth`, a size that is not a multiple of 512, and two dirty
//! bitmaps "b0" and "b1" with some dirty runs) and "ro" (read-only, with a
//! description).
//!
//! Input: the bytes the client writes, then it closes its sending side; the server's
//! replies are read and dropped. Checks: no panic, and the connection ends once the
//! client's bytes end (no hang).
#![no_main]

use std::sync::Arc;

use bulkhead_nbd::testing::{MemBackend, MemBitmap};
use bulkhead_nbd::{ExportBitmap, ExportConfig, NbdServer, ServerConfig};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let server = NbdServer::new(ServerConfig {
            max_connections: 0,
            handshake_max_seconds: 0,
        });
        // The second bitmap is finer and ends before the export does (a bitmap
        // shorter than the node: the rest reads as clean).
        let b0 = MemBitmap::new(65536 + 1000, 4096);
        b0.dirty(0, 4096);
        b0.dirty(16384, 20000);
        let b1 = MemBitmap::new(60000, 512);
        b1.dirty(1000, 3000);
        b1.dirty(40000, 1);
        let bitmap = |name: &str, source: Arc<MemBitmap>| ExportBitmap {
            name: name.into(),
            source,
        };
        let rw = ExportConfig {
            name: String::new(),
            description: None,
            writable: true,
            allocation_depth: true,
            bitmaps: vec![bitmap("b0", b0), bitmap("b1", b1)],
        };
        let ro = ExportConfig {
            name: "ro".into(),
            description: Some("read-only".into()),
            writable: false,
            allocation_depth: false,
            bitmaps: Vec::new(),
        };
        if server
            .add_export(rw, MemBackend::new(65536 + 1000))
            .is_err()
            || server.add_export(ro, MemBackend::read_only(8192)).is_err()
        {
            panic!("exports refused");
        }
        let (client, conn) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async move {
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
        };
        let drain = async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(from_server.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::join!(server.serve_stream(conn), send, drain);
    });
});
