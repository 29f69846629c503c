//! Against qsd 10.0.2 as the oracle: the same writes give the same `count` and the same
//! `x-debug-block-dirty-bitmap-sha256`, and bad granularities the same texts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_bitmap::{DirtyBitmap, check_granularity};
use serde_json::{Value, json};

const SIZE: u64 = (64 << 20) + 1000;

struct Qsd {
    child: Child,
    dir: PathBuf,
    qmp: BufReader<UnixStream>,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(path: &Path) {
    let until = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < until, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Qsd {
    /// qsd with a null-co node (writes dirty bitmaps like any other) exported writable.
    fn start(tag: &str) -> Option<Qsd> {
        if Command::new("qemu-storage-daemon")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: no qemu-storage-daemon");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("bitmap-qsd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch");
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=null-co,node-name=n,size={SIZE}"))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .arg("--export")
            .arg("type=nbd,id=e,node-name=n,writable=on")
            .arg("--chardev")
            .arg(format!(
                "socket,id=m,path={},server=on,wait=off",
                qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=m")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qsd");
        wait_for(&qmp);
        wait_for(&nbd);
        let stream = UnixStream::connect(&qmp).expect("connect");
        let mut q = Qsd {
            child,
            dir,
            qmp: BufReader::new(stream),
        };
        q.line();
        q.call("qmp_capabilities", json!({}));
        Some(q)
    }

    fn line(&mut self) -> Value {
        let mut s = String::new();
        self.qmp.read_line(&mut s).expect("read");
        serde_json::from_str(&s).expect("json")
    }

    /// The command's `return`, or its `error`; events are skipped.
    fn call(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.qmp.get_mut(), "{msg}").expect("write");
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                return json!({"error": e["desc"]});
            }
        }
    }

    fn write(&self, offset: u64, len: u64) {
        let uri = format!(
            "nbd+unix:///n?socket={}",
            self.dir.join("nbd.sock").display()
        );
        let out = Command::new("qemu-io")
            .args(["-f", "raw", &uri, "-c", &format!("write {offset} {len}")])
            .output()
            .expect("qemu-io");
        assert!(out.status.success(), "{out:?}");
    }

    fn count(&mut self, name: &str) -> u64 {
        let nodes = self.call("query-named-block-nodes", json!({}));
        nodes[0]["dirty-bitmaps"]
            .as_array()
            .and_then(|a| a.iter().find(|b| b["name"] == name))
            .and_then(|b| b["count"].as_u64())
            .expect("count")
    }

    fn sha256(&mut self, name: &str) -> String {
        let r = self.call(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "n", "name": name}),
        );
        r["sha256"].as_str().expect("sha256").to_owned()
    }
}

#[test]
fn the_same_writes_give_qsds_counts_and_hashes() {
    let Some(mut qsd) = Qsd::start("hash") else {
        return;
    };
    let grans = [512u64, 4096, 65536, 1 << 20];
    let ours: Vec<DirtyBitmap> = grans
        .iter()
        .map(|&g| DirtyBitmap::new(SIZE, g).expect("bitmap"))
        .collect();
    for g in grans {
        let r = qsd.call(
            "block-dirty-bitmap-add",
            json!({"node": "n", "name": format!("g{g}"), "granularity": g}),
        );
        assert_eq!(r, json!({}));
    }
    // Unaligned, crossing words and chunks, and the node's partial last chunk.
    let writes = [
        (0u64, 1u64),
        (4095, 2),
        (100_000, 70_000),
        (3 << 20, 5 << 20),
        ((64 << 20) - 512, 1512),
        ((40 << 20) + 12345, 512),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        qsd.write(off, len);
        for b in &ours {
            b.set(off, len);
        }
        if i == 0 || i + 1 == writes.len() {
            if i > 0 {
                merges_widen_and_narrow_as_qsds(&mut qsd, &ours, &grans);
            }
            for (g, b) in grans.iter().zip(&ours) {
                let name = format!("g{g}");
                assert_eq!(qsd.count(&name), b.count(), "count of {name} after {i}");
                assert_eq!(qsd.sha256(&name), b.sha256(), "hash of {name} after {i}");
            }
        }
    }
}

#[test]
fn bad_granularities_get_qsds_texts() {
    let Some(mut qsd) = Qsd::start("gran") else {
        return;
    };
    for g in [256u64, 3 * 4096, 1 << 31] {
        let r = qsd.call(
            "block-dirty-bitmap-add",
            json!({"node": "n", "name": format!("x{g}"), "granularity": g}),
        );
        let ours = match check_granularity(g) {
            Ok(()) => json!({}),
            Err(e) => json!({"error": e.to_string()}),
        };
        assert_eq!(r, ours, "granularity {g}");
    }
}

/// Merges across granularities (a fine source into a coarse bitmap and back), and
/// the default granularity of a node without clusters.
fn merges_widen_and_narrow_as_qsds(qsd: &mut Qsd, ours: &[DirtyBitmap], grans: &[u64]) {
    for (name, g, from) in [("m-coarse", 1u64 << 20, 0usize), ("m-fine", 512, 3)] {
        let r = qsd.call(
            "block-dirty-bitmap-add",
            json!({"node": "n", "name": name, "granularity": g, "disabled": true}),
        );
        assert_eq!(r, json!({}));
        let src = format!("g{}", grans[from]);
        let r = qsd.call(
            "block-dirty-bitmap-merge",
            json!({"node": "n", "target": name, "bitmaps": [src]}),
        );
        assert_eq!(r, json!({}));
        let b = DirtyBitmap::new(SIZE, g).expect("bitmap");
        b.merge_from(&ours[from]).expect("merge");
        assert_eq!(qsd.sha256(name), b.sha256(), "{name}");
    }
    let r = qsd.call(
        "block-dirty-bitmap-add",
        json!({"node": "n", "name": "dflt"}),
    );
    assert_eq!(r, json!({}));
    let nodes = qsd.call("query-named-block-nodes", json!({}));
    let g = nodes[0]["dirty-bitmaps"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["name"] == "dflt"))
        .and_then(|b| b["granularity"].as_u64());
    assert_eq!(g, Some(bulkhead_bitmap::default_granularity(None)));
}
