//! An NBD client sending arbitrary bytes: handshake (option haggling, LIST, INFO,
//! GO, meta contexts, structured/extended replies) and then the transmission phase,
//! against a server with two in-memory exports: "" (writable, with
//! `qemu:allocation-depth`, a size that is not a multiple of 512) and "ro"
//! (read-only, with a description).
//!
//! Input: the bytes the client writes, then it closes its sending side; the server's
//! replies are read and dropped. Checks: no panic, and the connection ends once the
//! client's bytes end (no hang).
#![no_main]

use bulkhead_nbd::testing::MemBackend;
use bulkhead_nbd::{ExportConfig, NbdServer, ServerConfig};
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
        let rw = ExportConfig {
            name: String::new(),
            description: None,
            writable: true,
            allocation_depth: true,
        };
        let ro = ExportConfig {
            name: "ro".into(),
            description: Some("read-only".into()),
            writable: false,
            allocation_depth: false,
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
