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
