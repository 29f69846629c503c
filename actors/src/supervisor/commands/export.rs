//! The NBD server and block exports: `nbd-server-start`, `nbd-server-stop`,
//! `nbd-server-add`, `nbd-server-remove`, `block-export-add`, `block-export-del`,
//! `query-block-exports` (the work is in `supervisor::export`).

use bulkhead_qmp::qapi::types::{
    BlockExportDelArgs, BlockExportOptions, NbdServerAddArgs, NbdServerOptions,
    NbdServerRemoveArgs, NbdServerStartArgs, NoArgs,
};
use serde::Deserialize;

use serde_json::Value;

use crate::supervisor::{Core, QmpError};

/// `nbd-server-start` from QMP (`SocketAddressLegacy`) or from `--nbd-server` (flat
/// `SocketAddress`), which start-up sends as the same command.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum NbdServerStart {
    /// QMP's `NbdServerOptionsLegacy`.
    Qmp(NbdServerStartArgs),
    /// The command line's `NbdServerOptions`.
    CommandLine(NbdServerOptions),
}

impl From<NbdServerStart> for NbdServerOptions {
    fn from(s: NbdServerStart) -> NbdServerOptions {
        match s {
            NbdServerStart::CommandLine(o) => o,
            NbdServerStart::Qmp(a) => NbdServerOptions {
                handshake_max_seconds: a.handshake_max_seconds,
                tls_creds: a.tls_creds,
                tls_authz: a.tls_authz,
                max_connections: a.max_connections,
                addr: a.addr.into(),
            },
        }
    }
}

pub(super) async fn nbd_server_start(
    core: &mut Core,
    args: NbdServerStart,
) -> Result<(), QmpError> {
    core.nbd_server_start(&args.into()).await
}

pub(super) async fn nbd_server_stop(core: &mut Core, _: NoArgs) -> Result<(), QmpError> {
    core.nbd_server_stop().await
}

/// The deprecated `nbd-server-add` (a `block-export-add` of type `nbd`).
pub(super) async fn nbd_server_add(
    core: &mut Core,
    args: NbdServerAddArgs,
) -> Result<(), QmpError> {
    core.nbd_server_add(&args).await
}

/// The deprecated `nbd-server-remove` (a `block-export-del`).
pub(super) async fn nbd_server_remove(
    core: &mut Core,
    args: NbdServerRemoveArgs,
) -> Result<(), QmpError> {
    core.nbd_server_remove(&args).await
}

pub(super) async fn block_export_add(
    core: &mut Core,
    args: BlockExportOptions,
) -> Result<(), QmpError> {
    core.block_export_add(&args).await
}

pub(super) async fn block_export_del(
    core: &mut Core,
    args: BlockExportDelArgs,
) -> Result<(), QmpError> {
    core.block_export_del(&args).await
}

pub(super) async fn query_block_exports(core: &mut Core, _: NoArgs) -> Result<Value, QmpError> {
    Ok(core.query_block_exports())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_qmp::qapi::types::SocketAddress;

    #[test]
    fn nbd_server_start_takes_the_qmp_and_the_command_line_address_forms() {
        let qmp = serde_json::json!({"addr": {"type": "unix", "data": {"path": "/s"}}});
        let cli = serde_json::json!({"addr": {"type": "unix", "path": "/s"}, "max-connections": 2});
        for (v, max) in [(qmp, None), (cli, Some(2))] {
            let s: NbdServerStart = serde_json::from_value(v).expect("fits");
            let o = NbdServerOptions::from(s);
            assert!(matches!(o.addr, SocketAddress::Unix(ref u) if u.path == "/s"));
            assert_eq!(o.max_connections, max);
        }
    }
}
