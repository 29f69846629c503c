//! External snapshots against qsd: `blockdev-snapshot` puts an overlay the monitor
//! added above a node under a writable NBD export (the export follows, writes go to
//! the overlay, reads of what the node held come through it), its errors, the graph
//! and queries afterwards, and the images qemu-img sees, in both placements; and
//! `change-backing-file` on the chain it builds.

use std::io;
use std::path::Path;

use bulkhead_systests::script::run_tool;
use bulkhead_systests::{Script, Step, differential, differential_with};

const NBD_Q: &str = "nbd+unix:///q?socket=$DIR/nbd.sock";

fn make_images(dir: &Path) -> io::Result<()> {
    for name in ["q.qcow2", "o.qcow2", "o2.qcow2"] {
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(dir.join(name))
            .arg("64M")
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
    }
    std::fs::File::create(dir.join("raw.img"))?.set_len(64 << 20)
}

fn qmp(id: &str, command: &str, args: &str) -> Step {
    Step::line(&format!(
        r#"{{"execute": "{command}", "arguments": {args}, "id": "{id}"}}"#
    ))
}

fn snapshot(id: &str, node: &str, overlay: &str) -> Step {
    qmp(
        id,
        "blockdev-snapshot",
        &format!(r#"{{"node": "{node}", "overlay": "{overlay}"}}"#),
    )
}

fn cbf(id: &str, device: &str, image: &str, backing: &str) -> Step {
    qmp(
        id,
        "change-backing-file",
        &format!(
            r#"{{"device": "{device}", "image-node-name": "{image}", "backing-file": "{backing}"}}"#
        ),
    )
}

fn script() -> Script {
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        qmp("a1", "blockdev-add", r#"{"driver": "qcow2", "node-name": "ov", "file": {"driver": "file", "filename": "$DIR/o.qcow2"}}"#)
            .note("the overlay"),
        qmp("a2", "blockdev-add", r#"{"driver": "raw", "node-name": "rw", "file": {"driver": "file", "filename": "$DIR/raw.img"}}"#)
            .note("a raw node"),
        Step::hook(
            "the guest writes the base",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k", NBD_Q], true, "wrote 65536/65536"),
        ),
        snapshot("e1", "nosuch", "ov").note("no such node"),
        snapshot("e2", "q", "nosuch").note("no such overlay"),
        snapshot("e3", "q", "q").note("the node itself"),
        snapshot("e4", "q", "f").note("an overlay in use"),
        snapshot("e5", "q", "rw").note("raw takes no backing"),
        snapshot("s1", "q", "ov").note("the snapshot"),
        Step::line(r#"{"execute": "query-block-exports", "id": "x"}"#).note("the export follows"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "n1"}"#)
            .note("the chain, the node read-only"),
        Step::hook(
            "the guest writes the overlay and reads the base through it",
            run_tool(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 3 64k 64k", "-c", "read -P 1 0 64k", "-c", "read -P 2 1M 64k", "-c", "read -P 3 64k 64k", NBD_Q],
                true,
                "read 65536/65536 bytes at offset 65536",
            ),
        ),
        snapshot("e6", "q", "ov").note("the node is a backing now"),
        qmp("e7", "blockdev-del", r#"{"node-name": "q"}"#).note("and cannot go"),
        qmp("a3", "blockdev-add", r#"{"driver": "qcow2", "node-name": "ov2", "file": {"driver": "file", "filename": "$DIR/o2.qcow2"}}"#)
            .note("a second overlay"),
        snapshot("s2", "ov", "ov2").note("a chain of three"),
        Step::hook(
            "reads through two overlays",
            run_tool(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 4 2M 4k", "-c", "read -P 1 0 64k", "-c", "read -P 3 64k 64k", "-c", "read -P 4 2M 4k", NBD_Q],
                true,
                "read 4096/4096 bytes at offset 2097152",
            ),
        ),
        cbf("c1", "ov2", "ov2", "$DIR/o.qcow2").note("the top's header"),
        cbf("c2", "ov2", "ov", "$DIR/q.qcow2").note("a read-only middle's header"),
        cbf("c3", "ov2", "q", "x").note("the base has no backing"),
        cbf("c4", "ov2", "nosuch", "x").note("no such image"),
        cbf("c5", "ov", "ov", "x").note("not a root"),
        cbf("c6", "rw", "ov", "x").note("not in the chain"),
        cbf("c7", "nosuch", "ov", "x").note("no such device"),
        Step::hook(
            "qemu-img reads the new names",
            run_tool("qemu-img", &["info", "-U", "--output=json", "$DIR/o.qcow2"], true, r#""backing-filename-format": "qcow2""#),
        ),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n2"}"#)
            .note("flat"),
        qmp("d1", "block-export-del", r#"{"id": "e"}"#)
            .until_event("BLOCK_EXPORT_DELETED")
            .note("unexport"),
        qmp("d2", "blockdev-del", r#"{"node-name": "ov2"}"#).note("the top goes"),
        qmp("d3", "blockdev-del", r#"{"node-name": "ov"}"#).note("then the middle"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n3"}"#)
            .note("the base stays read-only"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "external-snapshots".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=f,filename=$DIR/q.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=e,node-name=q,writable=on",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn blockdev_snapshot_matches_qsd() {
    if let Err(report) = differential(&script()) {
        panic!("{report}");
    }
}

#[test]
fn blockdev_snapshot_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// `blockdev-snapshot-sync`: its errors, then an overlay created (its bytes are
/// qsd's: the comparison of the files below) and put above a node under a
/// writable export; writes go to it, reads of the old data come through it.
fn sync_script() -> Script {
    let sync = |id: &str, args: &str| qmp(id, "blockdev-snapshot-sync", args);
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        Step::hook(
            "the guest writes the base",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 1 0 64k", NBD_Q], true, "wrote 65536/65536"),
        ),
        sync("e1", r#"{"node-name": "nosuch", "snapshot-file": "$DIR/ss.qcow2"}"#).note("no node"),
        sync("e2", r#"{"device": "q", "snapshot-file": "$DIR/ss.qcow2"}"#).note("no device"),
        sync("e3", r#"{"node-name": "q", "snapshot-file": "$DIR/ss.qcow2"}"#)
            .note("no overlay name"),
        sync("e4", r#"{"node-name": "q", "snapshot-file": "$DIR/ss.qcow2", "snapshot-node-name": "q"}"#)
            .note("a name in use"),
        sync("e5", r#"{"node-name": "q", "snapshot-file": "$DIR/ss.qcow2", "mode": "existing", "snapshot-node-name": "ov"}"#)
            .note("no existing file"),
        sync("s1", r#"{"node-name": "q", "snapshot-file": "$DIR/ss.qcow2", "snapshot-node-name": "ov"}"#)
            .note("the overlay is made and goes above q"),
        Step::line(r#"{"execute": "query-block-exports", "id": "x"}"#).note("the export follows"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n1"}"#)
            .note("ov over q, q read-only"),
        Step::hook(
            "writes reach the overlay, the base shows through",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 2 64k 64k", "-c", "read -P 1 0 64k", "-c", "read -P 2 64k 64k", NBD_Q], true, "read 65536/65536 bytes at offset 65536"),
        ),
        qmp("d1", "block-export-del", r#"{"id": "e"}"#)
            .until_event("BLOCK_EXPORT_DELETED")
            .note("unexport"),
        qmp("d2", "blockdev-del", r#"{"node-name": "ov"}"#).note("the overlay goes"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
    ];
    Script {
        name: "blockdev-snapshot-sync".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=f,filename=$DIR/q.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=e,node-name=q,writable=on",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn blockdev_snapshot_sync_matches_qsd() {
    if let Err(report) = differential(&sync_script()) {
        panic!("{report}");
    }
}

#[test]
fn blockdev_snapshot_sync_matches_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&sync_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}

/// The nodes' names, drivers, read-only flags and backing depths, as a set.
fn same_graph(
    reference: &bulkhead_systests::script::StepOutput,
    tested: &bulkhead_systests::script::StepOutput,
) -> Result<(), String> {
    let view = |out: &bulkhead_systests::script::StepOutput| -> Vec<String> {
        let mut v: Vec<String> = out
            .monitor(0)
            .iter()
            .filter_map(|l| bulkhead_systests::qmp::parse_line(l).ok())
            .flat_map(|r| r["return"].as_array().cloned().unwrap_or_default())
            .map(|n| {
                format!(
                    "{} {} {} {}",
                    n["node-name"], n["drv"], n["ro"], n["backing_file_depth"]
                )
            })
            .collect();
        v.sort();
        v
    };
    let (a, b) = (view(reference), view(tested));
    if a != b || a.is_empty() {
        return Err(format!("qsd: {a:?}\nbulkhead: {b:?}"));
    }
    Ok(())
}

/// Two disks and their overlays for a transaction.
fn make_transaction_images(dir: &Path) -> io::Result<()> {
    for f in ["d1.qcow2", "d2.qcow2", "o1.qcow2", "o2.qcow2"] {
        bulkhead_systests::run_in(dir, &["qemu-img", "create", "-q", "-f", "qcow2", f, "4M"])?;
    }
    bulkhead_systests::run_in(dir, &["qemu-io", "-c", "write -P 1 0 1M", "d1.qcow2"])?;
    bulkhead_systests::run_in(dir, &["qemu-io", "-c", "write -P 2 0 1M", "d2.qcow2"])
}

/// `blockdev-snapshot` in a `transaction` (libvirt's multi-disk external
/// snapshot): an overlay used twice and a later failing action leave everything
/// as it was; two disks snapshotted with a bitmap on the new overlay in one go; the
/// graph afterwards; a disk snapshotted again is busy.
fn transaction_script() -> Script {
    let tx =
        |id: &str, actions: &str| qmp(id, "transaction", &format!(r#"{{"actions": {actions}}}"#));
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        qmp("a1", "blockdev-add", r#"{"driver": "qcow2", "node-name": "o1", "file": {"driver": "file", "filename": "$DIR/o1.qcow2"}, "backing": null}"#),
        qmp("a2", "blockdev-add", r#"{"driver": "qcow2", "node-name": "o2", "file": {"driver": "file", "filename": "$DIR/o2.qcow2"}, "backing": null}"#),
        tx("t1", r#"[{"type": "blockdev-snapshot", "data": {"node": "d1", "overlay": "o1"}}, {"type": "blockdev-snapshot", "data": {"node": "d2", "overlay": "o1"}}]"#)
            .note("one overlay twice"),
        tx("t2", r#"[{"type": "blockdev-snapshot", "data": {"node": "d1", "overlay": "o1"}}, {"type": "block-dirty-bitmap-add", "data": {"node": "nosuch", "name": "b"}}]"#)
            .note("a later action fails"),
        tx("t3", r#"[{"type": "blockdev-snapshot", "data": {"node": "d1", "overlay": "o1"}}, {"type": "blockdev-snapshot", "data": {"node": "d1", "overlay": "o2"}}]"#)
            .note("one node twice"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n1"}"#)
            .check(same_graph)
            .note("nothing changed (qsd's aborted snapshot drops the overlay's backing: null from its json filename; the graph is what counts)"),
        tx("t4", r#"[{"type": "blockdev-snapshot", "data": {"node": "d1", "overlay": "o1"}}, {"type": "blockdev-snapshot", "data": {"node": "d2", "overlay": "o2"}}, {"type": "block-dirty-bitmap-add", "data": {"node": "o1", "name": "b"}}]"#)
            .note("both disks, and a bitmap on an overlay"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n2"}"#)
            .note("the overlays above the disks"),
        Step::line(r#"{"execute": "query-block-exports", "id": "e"}"#).note("the exports follow"),
        Step::hook(
            "a client writes the first disk's export: the overlay takes it",
            run_tool("qemu-io", &["-f", "raw", "-c", "write -P 9 2M 64k", "-c", "read -P 1 0 1M", "nbd+unix:///d1?socket=$DIR/nbd.sock"], true, "read 1048576/1048576"),
        ),
        tx("t5", r#"[{"type": "blockdev-snapshot", "data": {"node": "d1", "overlay": "o1"}}]"#)
            .note("the disk is a backing now"),
        tx("t6", r#"[{"type": "blockdev-snapshot-sync", "data": {"node-name": "o1", "snapshot-file": "$DIR/s1.qcow2", "snapshot-node-name": "s1"}}, {"type": "blockdev-snapshot-sync", "data": {"node-name": "o2", "snapshot-file": "$DIR/s2.qcow2", "snapshot-node-name": "s1"}}]"#)
            .note("one new name twice"),
        tx("t7", r#"[{"type": "blockdev-snapshot-sync", "data": {"node-name": "o1", "snapshot-file": "$DIR/s1.qcow2", "snapshot-node-name": "s1"}}, {"type": "blockdev-snapshot-sync", "data": {"node-name": "o2", "snapshot-file": "$DIR/s2.qcow2", "snapshot-node-name": "s2"}}]"#)
            .note("both overlays snapshotted again, created by the daemon"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "n3"}"#)
            .check(same_graph)
            .note("the new overlays on top"),
        Step::line(r#"{"execute": "query-block-exports", "id": "e2"}"#).note("the exports follow"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#).until_eof().note("quit"),
        Step::hook("the overlay holds the write", run_tool("qemu-img", &["map", "$DIR/o1.qcow2"], true, "0x200000")),
    ];
    Script {
        name: "transaction with blockdev-snapshot".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=f1,filename=$DIR/d1.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=d1,file=f1",
            "--blockdev",
            "driver=file,node-name=f2,filename=$DIR/d2.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=d2,file=f2",
            "--nbd-server",
            "addr.type=unix,addr.path=$DIR/nbd.sock",
            "--export",
            "type=nbd,id=e1,node-name=d1,writable=on",
            "--export",
            "type=nbd,id=e2,node-name=d2,writable=on",
        ]
        .map(String::from)
        .to_vec(),
        vars: Vec::new(),
        setup: Some(make_transaction_images),
        steps,
    }
}

#[test]
fn snapshot_transactions_match_qsd() {
    if let Err(report) = differential(&transaction_script()) {
        panic!("{report}");
    }
}

#[test]
fn snapshot_transactions_match_qsd_with_a_worker_per_image() {
    if let Err(report) = differential_with(&transaction_script(), &["--isolation", "image"]) {
        panic!("{report}");
    }
}
