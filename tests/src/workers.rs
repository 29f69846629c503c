//! Daemons with several images, and what `x-bulkhead-query-workers` says about their
//! worker processes (the placement, hand-off and restart tests share these).

use serde_json::Value;

use crate::writes::sparse_file;
use crate::{Daemon, DaemonKind, QmpConnection, TempDir};

/// bulkhead with `--isolation isolation` and one image per name X in `images`
/// (`disk-X.img` of `size` bytes, `file-X` under `raw-X`), each exported writable as
/// `raw-X` (id `e-X`) on `$DIR/nbd.sock`.
pub fn start_images(prefix: &str, isolation: &str, images: &[&str], size: u64) -> Daemon {
    let dir = match TempDir::new(prefix) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut args: Vec<String> = vec!["--isolation".into(), isolation.into()];
    for x in images {
        sparse_file(&dir.path().join(format!("disk-{x}.img")), size);
        args.extend([
            "--blockdev".to_string(),
            format!("driver=file,node-name=file-{x},filename=$DIR/disk-{x}.img"),
            "--blockdev".to_string(),
            format!("driver=raw,node-name=raw-{x},file=file-{x}"),
        ]);
    }
    args.extend([
        "--nbd-server".to_string(),
        "addr.type=unix,addr.path=$DIR/nbd.sock".to_string(),
    ]);
    for x in images {
        args.extend([
            "--export".to_string(),
            format!("type=nbd,id=e-{x},node-name=raw-{x},writable=on"),
        ]);
    }
    match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

/// `x-bulkhead-query-workers`.
pub fn workers(qmp: &mut QmpConnection) -> Vec<Value> {
    match qmp.execute("x-bulkhead-query-workers", None) {
        Ok(v) => v["return"].as_array().cloned().unwrap_or_default(),
        Err(e) => panic!("QMP stopped answering: {e}"),
    }
}

/// Waits (up to 10 s) until every worker `x-bulkhead-query-workers` lists is a live
/// process: right after a kill, an instance whose restart is backing off still
/// shows its dead process, and a test picking a victim then would pick that one.
pub fn wait_all_running(qmp: &mut QmpConnection) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let all = workers(qmp).iter().all(|w| {
            w["pid"]
                .as_u64()
                .and_then(|p| crate::procs::proc_info(p as u32))
                .is_some_and(|p| crate::procs::is_alive(&p))
        });
        if all {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("workers still not running after 10 s: {:?}", workers(qmp));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The pid of the worker hosting `node`.
pub fn pid_hosting(qmp: &mut QmpConnection, node: &str) -> u32 {
    workers(qmp)
        .iter()
        .find(|w| {
            w["nodes"]
                .as_array()
                .is_some_and(|n| n.iter().any(|x| x == node))
        })
        .and_then(|w| w["pid"].as_u64())
        .map_or_else(|| panic!("no worker hosts {node}"), |p| p as u32)
}

/// The nodes of each `image` worker, each list and the whole sorted.
pub fn image_workers(qmp: &mut QmpConnection) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = workers(qmp)
        .iter()
        .filter(|w| w["kind"] == "image")
        .map(|w| {
            let mut nodes: Vec<String> = w["nodes"]
                .as_array()
                .map(|n| {
                    n.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            nodes.sort();
            nodes
        })
        .collect();
    out.sort();
    out
}
