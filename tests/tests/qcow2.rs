//! qcow2 nodes: blockdev-add of images made by qemu-img with its options, backing
//! chains opened from the names inside images, queries and errors, compared with qsd
//! byte for byte; then I/O through NBD exports in both placements, checked with
//! qemu-io, qemu-img compare and qemu-img check on the files afterwards.

use std::path::Path;
use std::process::Command;

use bulkhead_systests::writes::{nbd_image_opts, qemu_io};
use bulkhead_systests::{Daemon, DaemonKind, Script, Step, TempDir, differential};

/// Runs qemu-img (or qemu-io) and fails the setup if it fails.
fn tool(program: &str, args: &[&str]) -> std::io::Result<()> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn img(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// Images in every qemu-img flavour the script opens. No data is written into them:
/// `actual-size` of a freshly written file can differ by a block between two runs on
/// ext4, and the data path is tested below.
fn make_images(dir: &Path) -> std::io::Result<()> {
    let create = |name: &str, opts: &str, size: &str| {
        let path = img(dir, name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([path.as_str(), size]);
        tool("qemu-img", &args)
    };
    create("plain.qcow2", "", "64M")?;
    create("v2.qcow2", "compat=0.10", "16M")?;
    // Opened by nothing else, so that option checks are what fails.
    create("opts-small.qcow2", "cluster_size=4096", "16M")?;
    create("opts-v2.qcow2", "compat=0.10", "16M")?;
    // Persistent bitmaps, one recording and one not, with writes recorded.
    create("bitmaps.qcow2", "", "8M")?;
    let bitmaps = img(dir, "bitmaps.qcow2");
    tool(
        "qemu-img",
        &["bitmap", "--add", "-g", "65536", bitmaps.as_str(), "b1"],
    )?;
    tool(
        "qemu-img",
        &["bitmap", "--add", "--disable", bitmaps.as_str(), "b2"],
    )?;
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write 0 100k",
            "-c",
            "write 5M 1k",
            bitmaps.as_str(),
        ],
    )?;
    create("cache.qcow2", "", "16M")?;
    create("small.qcow2", "cluster_size=4096,refcount_bits=1", "16M")?;
    create("lazy.qcow2", "lazy_refcounts=on", "16M")?;
    create("extl2.qcow2", "extended_l2=on", "16M")?;
    create(
        "zstd.qcow2",
        "compression_type=zstd,refcount_bits=64",
        "16M",
    )?;
    create("base.qcow2", "", "32M")?;
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &img(dir, "top.qcow2"),
        ],
    )?;
    tool(
        "qemu-img",
        &["snapshot", "-c", "snap1", &img(dir, "top.qcow2")],
    )?;
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &img(dir, "nob.qcow2"),
        ],
    )?;
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &img(dir, "reo.qcow2"),
        ],
    )?;
    std::fs::File::create(dir.join("rawbase.img"))?.set_len(8 << 20)?;
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "rawbase.img",
            "-F",
            "raw",
            &img(dir, "overraw.qcow2"),
        ],
    )?;
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nothere.qcow2",
            "-F",
            "qcow2",
            &img(dir, "missing.qcow2"),
            "16M",
        ],
    )?;
    std::fs::write(dir.join("notqcow2.img"), vec![0x42u8; 65536])?;
    // Version 4: the header's version field patched.
    create("v4.qcow2", "", "16M")?;
    let mut bytes = std::fs::read(dir.join("v4.qcow2"))?;
    bytes[4..8].copy_from_slice(&4u32.to_be_bytes());
    std::fs::write(dir.join("v4.qcow2"), bytes)?;
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pass",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            &img(dir, "enc.qcow2"),
            "16M",
        ],
    )?;
    create("grow.qcow2", "", "16M")?;
    // An external data file named relative to the working directory, as QEMU opens
    // it (both daemons run in `$DIR`).
    let made = Command::new("qemu-img")
        .current_dir(dir)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.raw",
            "df.qcow2",
            "16M",
        ])
        .output()?;
    if !made.status.success() {
        return Err(std::io::Error::other("qemu-img create with a data file"));
    }
    // Written back before a daemon looks: `actual-size` (st_blocks) of a file with
    // delayed allocation can still change until then.
    tool("sync", &[])
}

fn add(id: &str, node: &str, file: &str, extra: &str) -> Step {
    Step::line(&format!(
        r#"{{"execute": "blockdev-add", "arguments": {{"driver": "qcow2", "node-name": "{node}", "file": {{"driver": "file", "filename": "$DIR/{file}"}}{extra}}}, "id": "{id}"}}"#
    ))
    .note(&format!("blockdev-add {file}"))
}

fn queries_script() -> Script {
    let mut steps = vec![Step::line(
        r#"{"execute": "qmp_capabilities", "id": "cap"}"#,
    )];
    for (i, (node, file)) in [
        ("plain", "plain.qcow2"),
        ("v2", "v2.qcow2"),
        ("small", "small.qcow2"),
        ("lazy", "lazy.qcow2"),
        ("extl2", "extl2.qcow2"),
        ("zstd", "zstd.qcow2"),
    ]
    .iter()
    .enumerate()
    {
        steps.push(add(&format!("a{i}"), node, file, ""));
    }
    steps.extend([
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "q1"}"#).note("formats"),
        add("top", "top", "top.qcow2", "").note("a chain opened from the image's name"),
        add("overraw", "overraw", "overraw.qcow2", "").note("raw backing"),
        add(
            "nob",
            "nob",
            "nob.qcow2",
            r#", "read-only": true, "backing": null"#,
        )
        .note("backing: null"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "q2"}"#).note("chains"),
        Step::line(
            r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "flat"}"#,
        )
        .note("flat: no backing-image"),
        Step::line(r#"{"execute": "x-debug-query-block-graph", "id": "g"}"#).note("graph"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "freo", "filename": "$DIR/reo.qcow2"}, "id": "freo"}"#),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "reo", "file": "freo"}, "id": "reo"}"#)
            .note("an overlay over a named file node"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "reo", "file": "freo", "read-only": true}]}, "id": "r1"}"#)
            .note("reopen read-only: the implicit backing may go unnamed once"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "reo", "file": "freo", "read-only": false}]}, "id": "r2"}"#)
            .note("then it must be named"),
        Step::line(r#"{"execute": "blockdev-set-active", "arguments": {"node-name": "reo", "active": false}, "id": "inact"}"#),
        Step::line(r#"{"execute": "blockdev-set-active", "arguments": {"node-name": "reo", "active": true}, "id": "act"}"#),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "reo"}, "id": "del-reo"}"#),
        add("missing", "missing", "missing.qcow2", "").note("missing backing file"),
        add("notq", "notq", "notqcow2.img", "").note("not qcow2"),
        add("v4", "v4", "v4.qcow2", "").note("version 4"),
        add(
            "c1",
            "c1",
            "cache.qcow2",
            r#", "cache-size": 1024, "l2-cache-size": 512, "refcount-cache-size": 512"#,
        )
        .note("three cache sizes"),
        add(
            "c2",
            "c2",
            "cache.qcow2",
            r#", "cache-size": 1024, "l2-cache-size": 4096"#,
        )
        .note("l2 cache above cache-size"),
        add(
            "e1",
            "e1",
            "opts-small.qcow2",
            r#", "read-only": true, "l2-cache-entry-size": 8192"#,
        )
        .note("an L2 cache entry above the cluster size"),
        add(
            "e2",
            "e2",
            "cache.qcow2",
            r#", "read-only": true, "cache-clean-interval": -1"#,
        )
        .note("a negative cache clean interval is a huge one"),
        add(
            "e3",
            "e3",
            "opts-v2.qcow2",
            r#", "read-only": true, "lazy-refcounts": true"#,
        )
        .note("lazy refcounts on a version 2 image"),
        add(
            "e4",
            "e4",
            "cache.qcow2",
            r#", "encrypt": {"format": "aes"}"#,
        )
        .note("encryption options for an unencrypted image"),
        add("enc", "enc", "enc.qcow2", "").note("LUKS-encrypted, no key: refused"),
        add("e5", "e5", "enc.qcow2", r#", "encrypt": {"format": "aes"}"#)
            .note("another encryption format than the header's"),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "rc-file", "filename": "$DIR/cache.qcow2"}, "id": "rc-file"}"#),
        Step::line(r#"{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "rc", "file": "rc-file", "l2-cache-size": 65536}, "id": "rc"}"#),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "rc", "file": "rc-file", "cache-size": 1024, "l2-cache-size": 4096}]}, "id": "rc1"}"#)
            .note("a reopen with cache sizes QEMU refuses"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "rc", "file": "rc-file", "l2-cache-size": 4096, "overlap-check": {"template": "all"}, "discard-no-unref": true}]}, "id": "rc2"}"#)
            .note("runtime options change on reopen"),
        Step::line(r#"{"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "qcow2", "node-name": "rc", "file": "rc-file", "encrypt": {"format": "luks", "key-secret": "s"}}]}, "id": "rc3"}"#)
            .note("encryption options on reopen"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "q-rc"}"#),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "rc"}, "id": "del-rc"}"#),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "rc-file"}, "id": "del-rc-file"}"#),
        add("df", "df", "df.qcow2", "").note("the data file named inside the image"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "q-df"}"#)
            .note("the data file node after its format node"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "df"}, "id": "del-df"}"#),
        add("bm", "bm", "bitmaps.qcow2", "").note("persistent bitmaps"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "q-bm"}"#)
            .note("dirty-bitmaps, and every bitmap in use while open writable"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "bm"}, "id": "del-bm"}"#),
        // Opened again after that close, the bitmaps are the same, but QEMU has
        // written them to new clusters and discarded the old ones, so the file's
        // allocation (actual-size) differs: not compared (design/qcow2.md).
        add("grow", "grow", "grow.qcow2", "").note("to be resized"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "grow", "size": 1073741824}, "id": "grow"}"#)
            .note("grow to 1 GiB (the L1 table grows)"),
        Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "q-grow"}"#)
            .note("the grown L1 table where QEMU puts it: the same file length"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "grow"}, "id": "del-grow"}"#),
        Step::line(
            r#"{"execute": "blockdev-del", "arguments": {"node-name": "top"}, "id": "del"}"#,
        )
        .note("del takes its implicit backing chain along"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "q3"}"#).note("after del"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#)
            .until_eof()
            .note("quit"),
    ]);
    Script {
        name: "qcow2-queries".into(),
        monitors: 1,
        args: Vec::new(),
        vars: Vec::new(),
        setup: Some(make_images),
        steps,
    }
}

#[test]
fn qcow2_nodes_chains_queries_and_errors_match_qsd() {
    if let Err(report) = differential(&queries_script()) {
        panic!("{report}");
    }
}

/// An image whose first L1 entry points to an unaligned L2 table.
fn make_corrupt(dir: &Path) -> std::io::Result<()> {
    let path = img(dir, "corrupt.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", &path, "16M"])?;
    tool("qemu-io", &["-f", "qcow2", "-c", "write -P 7 0 64k", &path])?;
    let mut bytes = std::fs::read(&path)?;
    let field = |b: &[u8], at: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(v)
    };
    let l1 = usize::try_from(field(&bytes, 40)).map_err(std::io::Error::other)?;
    let entry = field(&bytes, l1) + 0x200;
    bytes[l1..l1 + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(&path, bytes)
}

fn corruption_script() -> Script {
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        add("c", "c", "corrupt.qcow2", "").note("opens: the L1 table itself is fine"),
        Step::line(
            r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "$DIR/nbd.sock"}}}, "id": "srv"}"#,
        ),
        Step::line(
            r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "c"}, "id": "exp"}"#,
        ),
        Step::hook("a read through the broken L2 table", |ctx| {
            let uri = ctx.substitute("nbd+unix:///c?socket=$DIR/nbd.sock");
            // The read fails (EIO); only the event matters here.
            let _ = Command::new("qemu-io")
                .args(["-r", "-f", "raw", "-c", "read 0 4k", &uri])
                .output();
            Ok(())
        })
        .until_event("BLOCK_IMAGE_CORRUPTED"),
        Step::line(r#"{"execute": "query-named-block-nodes", "id": "q"}"#)
            .note("corrupt: true in the format-specific data"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#)
            .until_eof()
            .note("quit"),
    ];
    Script {
        name: "qcow2-corruption".into(),
        monitors: 1,
        args: Vec::new(),
        vars: Vec::new(),
        setup: Some(make_corrupt),
        steps,
    }
}

#[test]
fn metadata_corruption_found_at_run_time_is_reported_like_qsd() {
    if let Err(report) = differential(&corruption_script()) {
        panic!("{report}");
    }
}

fn make_snapshot_images(dir: &Path) -> std::io::Result<()> {
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img(dir, "s.qcow2"), "16M"],
    )?;
    tool(
        "qemu-img",
        &["snapshot", "-c", "snap1", &img(dir, "s.qcow2")],
    )?;
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img(dir, "ro.qcow2"), "16M"],
    )?;
    std::fs::File::create(dir.join("r.raw"))?.set_len(1 << 20)?;
    tool("sync", &[])
}

fn snapshots_script() -> Script {
    let snap = |id: &str, args: &str| {
        Step::line(&format!(
            r#"{{"execute": "blockdev-snapshot-internal-sync", "arguments": {{{args}}}, "id": "{id}"}}"#
        ))
    };
    let del = |id: &str, args: &str| {
        Step::line(&format!(
            r#"{{"execute": "blockdev-snapshot-delete-internal-sync", "arguments": {{{args}}}, "id": "{id}"}}"#
        ))
    };
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        snap("c1", r#""device": "q", "name": "s1""#).note("create"),
        snap("c2", r#""device": "q", "name": "s1""#).note("the name is taken"),
        snap("c3", r#""device": "q", "name": """#).note("empty name"),
        snap("c4", r#""device": "nosuch", "name": "x""#).note("no such node"),
        snap("c5", r#""device": "r", "name": "x""#).note("raw has none"),
        snap("c6", r#""device": "ro", "name": "x""#).note("read-only"),
        snap("c7", r#""device": "f", "name": "x""#).note("not a root node"),
        Step::line(
            r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "q1"}"#,
        )
        .note("two snapshots listed"),
        del("d1", r#""device": "q", "name": "s1""#).note("delete by name: its info"),
        del("d2", r#""device": "q", "name": "s1""#).note("gone"),
        del("d3", r#""device": "q""#).note("neither id nor name"),
        del("d4", r#""device": "q", "id": "1""#).note("delete by id: qemu-img's"),
        del("d5", r#""device": "q", "id": "9", "name": "zz""#).note("no such snapshot"),
        del("d6", r#""device": "r", "name": "x""#).note("raw has no list"),
        snap("c8", r#""device": "q", "name": "1""#).note("a numeric name"),
        // After deletions the allocator's choices show in the file's size (not
        // qsd's); the snapshot list is checked by the delete replies above.
        Step::line(r#"{"execute": "quit", "id": "bye"}"#)
            .until_eof()
            .note("quit"),
    ];
    Script {
        name: "qcow2-snapshots".into(),
        monitors: 1,
        args: [
            "--blockdev",
            "driver=file,node-name=f,filename=$DIR/s.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
            "--blockdev",
            "driver=file,node-name=rf,filename=$DIR/r.raw",
            "--blockdev",
            "driver=raw,node-name=r,file=rf",
            "--blockdev",
            "driver=file,node-name=f2,filename=$DIR/ro.qcow2,read-only=on",
            "--blockdev",
            "driver=qcow2,node-name=ro,file=f2,read-only=on",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect(),
        vars: Vec::new(),
        setup: Some(make_snapshot_images),
        steps,
    }
}

#[test]
fn internal_snapshots_match_qsd() {
    if let Err(report) = differential(&snapshots_script()) {
        panic!("{report}");
    }
}

/// A daemon serving `image` (a qcow2 file in `dir`) over NBD as export `q`.
fn serve(isolation: &str, dir: TempDir, image: &str) -> Daemon {
    let args: Vec<String> = [
        "--isolation",
        isolation,
        "--blockdev",
        &format!("driver=file,node-name=f,filename=$DIR/{image}"),
        "--blockdev",
        "driver=qcow2,node-name=q,file=f",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e,node-name=q,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

fn run(program: &str, args: &[String]) -> String {
    let out = match Command::new(program).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("{program}: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}

fn quit(daemon: &mut Daemon) {
    if let Ok(mut qmp) = daemon.qmp(0) {
        let _ = qmp.execute_ok("quit", None);
    }
    match daemon.wait_exit(std::time::Duration::from_secs(20)) {
        Ok(Some(_)) => {}
        other => panic!("bulkhead did not quit: {other:?}"),
    }
}

/// Writes of every shape through an NBD export of a fresh sparse image and of an
/// overlay over a backing file: the same writes on a raw reference file must give the
/// same guest view, and qemu-img check must find the image clean after quit.
#[test]
fn nbd_writes_through_qcow2_match_a_raw_reference_and_leave_a_clean_image() {
    for isolation in ["kind", "image"] {
        for overlay in [false, true] {
            let dir = match TempDir::new("bulkhead-qcow2") {
                Ok(d) => d,
                Err(e) => panic!("{e}"),
            };
            let d = dir.path().to_path_buf();
            let reference = img(&d, "ref.raw");
            if overlay {
                let base = img(&d, "base.qcow2");
                run(
                    "qemu-img",
                    &[
                        "create".into(),
                        "-q".into(),
                        "-f".into(),
                        "qcow2".into(),
                        base.clone(),
                        "8M".into(),
                    ],
                );
                run(
                    "qemu-io",
                    &[
                        "-f".into(),
                        "qcow2".into(),
                        "-c".into(),
                        "write -P 0x33 0 8M".into(),
                        base.clone(),
                    ],
                );
                run(
                    "qemu-img",
                    &[
                        "create".into(),
                        "-q".into(),
                        "-f".into(),
                        "qcow2".into(),
                        "-b".into(),
                        "base.qcow2".into(),
                        "-F".into(),
                        "qcow2".into(),
                        img(&d, "disk.qcow2"),
                    ],
                );
                run(
                    "qemu-img",
                    &[
                        "convert".into(),
                        "-O".into(),
                        "raw".into(),
                        base,
                        reference.clone(),
                    ],
                );
            } else {
                run(
                    "qemu-img",
                    &[
                        "create".into(),
                        "-q".into(),
                        "-f".into(),
                        "qcow2".into(),
                        img(&d, "disk.qcow2"),
                        "8M".into(),
                    ],
                );
                run(
                    "qemu-img",
                    &[
                        "create".into(),
                        "-q".into(),
                        "-f".into(),
                        "raw".into(),
                        reference.clone(),
                        "8M".into(),
                    ],
                );
            }
            let mut daemon = serve(isolation, dir, "disk.qcow2");
            // Unaligned writes, within and across clusters, zero writes and discards.
            let commands = [
                "write -P 0xa1 0 4k",
                "write -P 0xa2 1000 70000",
                "write -P 0xa3 130000 1",
                "write -P 0xa4 2M 1M",
                "write -z 2200k 100k",
                "write -P 0xa5 4194300 200000",
                "discard 64k 64k",
                "write -P 0xa6 7M 1M",
                "write -z -u 7340032 65536",
            ];
            let socket = d.join("nbd.sock");
            let mut args = vec!["--image-opts".to_string(), nbd_image_opts(&socket, "q")];
            for c in commands {
                args.extend(["-c".to_string(), c.to_string()]);
            }
            let out = match qemu_io(&args).output() {
                Ok(o) => o,
                Err(e) => panic!("qemu-io: {e}"),
            };
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !text.contains("failed"),
                "{isolation} {overlay}: {text}"
            );
            // The same on the reference. The node has qsd's default `discard=ignore`,
            // so the discard changes nothing there either.
            let mut ref_args = vec!["-f".to_string(), "raw".to_string()];
            for c in commands.iter().filter(|c| !c.starts_with("discard")) {
                ref_args.extend(["-c".to_string(), c.to_string()]);
            }
            ref_args.push(reference.clone());
            run("qemu-io", &ref_args);
            let nbd = format!("nbd+unix:///q?socket={}", socket.display());
            let dump = img(&d, "dump.raw");
            run(
                "qemu-img",
                &[
                    "convert".into(),
                    "-f".into(),
                    "raw".into(),
                    "-O".into(),
                    "raw".into(),
                    nbd,
                    dump.clone(),
                ],
            );
            let ours = std::fs::read(&dump).unwrap_or_default();
            let want = std::fs::read(&reference).unwrap_or_default();
            assert_eq!(
                ours.len(),
                want.len(),
                "{isolation} overlay={overlay}: sizes"
            );
            let first = ours.iter().zip(&want).position(|(a, b)| a != b);
            assert_eq!(
                first, None,
                "{isolation} overlay={overlay}: first differing byte"
            );
            quit(&mut daemon);
            let check = run("qemu-img", &["check".into(), img(&d, "disk.qcow2")]);
            assert!(
                check.contains("No errors were found"),
                "{isolation} overlay={overlay}: {check}"
            );
            // The image itself, read by QEMU, holds what was written.
            run(
                "qemu-io",
                &[
                    "-f".into(),
                    "qcow2".into(),
                    "-c".into(),
                    "read -P 0xa4 2M 100k".into(),
                    "-c".into(),
                    "read -P 0xa6 7405568 256k".into(),
                    img(&d, "disk.qcow2"),
                ],
            );
        }
    }
}

/// A reopen closes the image's engine before it opens the new one (two engines must
/// never own one image's metadata). One that fails to open leaves the node open as it
/// was: the export goes on reading and writing, and the image stays clean.
#[test]
fn a_failed_reopen_leaves_the_qcow2_node_serving() {
    let dir = match TempDir::new("bulkhead-qcow2") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let d = dir.path().to_path_buf();
    run(
        "qemu-img",
        &[
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            img(&d, "disk.qcow2"),
            "8M".into(),
        ],
    );
    let mut daemon = serve("image", dir, "disk.qcow2");
    let socket = d.join("nbd.sock");
    let io = |commands: &[&str]| {
        let mut args = vec!["--image-opts".to_string(), nbd_image_opts(&socket, "q")];
        for c in commands {
            args.extend(["-c".to_string(), c.to_string()]);
        }
        let out = match qemu_io(&args).output() {
            Ok(o) => o,
            Err(e) => panic!("qemu-io: {e}"),
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.contains("failed") && !text.contains("fail"),
            "{commands:?}: {text}"
        );
    };
    io(&["write -P 0x5a 0 1M"]);
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    // The cache options are checked once the header is read, so this reopen gets as
    // far as opening the image again.
    let bad = serde_json::json!({"options": [{
        "driver": "qcow2", "node-name": "q", "file": "f",
        "cache-size": 1024, "l2-cache-size": 4096
    }]});
    let reply = match qmp.execute("blockdev-reopen", Some(bad)) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        reply.pointer("/error/desc").and_then(|c| c.as_str()),
        Some("l2-cache-size may not exceed cache-size"),
        "{reply}"
    );
    io(&["read -P 0x5a 0 1M", "write -P 0x6b 1M 1M"]);
    // A reopen that works still works afterwards.
    let good = serde_json::json!({"options": [{
        "driver": "qcow2", "node-name": "q", "file": "f", "l2-cache-size": 65536
    }]});
    if let Err(e) = qmp.execute_ok("blockdev-reopen", Some(good)) {
        panic!("{e}");
    }
    io(&[
        "read -P 0x5a 0 1M",
        "read -P 0x6b 1M 1M",
        "write -P 0x7c 2M 64k",
    ]);
    drop(qmp);
    quit(&mut daemon);
    let check = run("qemu-img", &["check".into(), img(&d, "disk.qcow2")]);
    assert!(check.contains("No errors were found"), "{check}");
    run(
        "qemu-io",
        &[
            "-f".into(),
            "qcow2".into(),
            "-c".into(),
            "read -P 0x6b 1M 1M".into(),
            "-c".into(),
            "read -P 0x7c 2M 64k".into(),
            img(&d, "disk.qcow2"),
        ],
    );
}

/// Serves `disk.qcow2` of `dir` (in /dev/shm) writable over NBD with one worker per
/// image, checks that the export holds a mapping, and runs `commands` through one
/// qemu-io client (`-t unsafe`: no FUA), each request after the one before it; then,
/// after quit, `qemu-img check` and qemu-io's `after` on the image file.
fn mapped_session(dir: TempDir, commands: &[&str], after: &[&str]) {
    let d = dir.path().to_path_buf();
    let args: Vec<String> = [
        "--isolation",
        "image",
        "--blockdev",
        "driver=file,node-name=f,filename=$DIR/disk.qcow2",
        "--blockdev",
        "driver=qcow2,node-name=q,file=f,discard=unmap",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e,node-name=q,writable=on",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let mut daemon = match Daemon::start_in(DaemonKind::Bulkhead, dir, 1, &args, &[]) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let mut qmp = match daemon.qmp(0) {
        Ok(q) => q,
        Err(e) => panic!("{e}"),
    };
    let workers = match qmp.execute_ok("x-bulkhead-query-workers", None) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    let mapped: Vec<&str> = workers
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| w["mapped"].as_array().into_iter().flatten())
        .filter_map(|e| e.as_str())
        .collect();
    assert_eq!(mapped, ["e"], "{workers}");
    let socket = d.join("nbd.sock");
    let mut io_args = vec![
        "-t".to_string(),
        "unsafe".to_string(),
        "--image-opts".to_string(),
        nbd_image_opts(&socket, "q"),
    ];
    for c in commands {
        io_args.extend(["-c".to_string(), c.to_string()]);
    }
    let out = match qemu_io(&io_args).output() {
        Ok(o) => o,
        Err(e) => panic!("qemu-io: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("fail"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(qmp);
    quit(&mut daemon);
    let check = run("qemu-img", &["check".into(), img(&d, "disk.qcow2")]);
    assert!(check.contains("No errors were found"), "{check}");
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for c in after {
        args.extend(["-c".to_string(), c.to_string()]);
    }
    args.push(img(&d, "disk.qcow2"));
    run("qemu-io", &args);
}

/// A directory in /dev/shm (mapped reads run where the file is in memory).
fn shm_dir() -> Option<TempDir> {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return None;
    }
    match TempDir::new_in(shm, "bulkhead-qcow2-map") {
        Ok(d) => Some(d),
        Err(e) => panic!("{e}"),
    }
}

/// An NBD export of a qcow2 node reads through its mapping (the export asks the
/// image's worker where guest bytes lie and reads the file itself): every read sees
/// the writes, zero-writes and discards completed before it, which go to the worker
/// and move the node's map epoch.
#[test]
fn a_qcow2_export_reads_through_its_mapping_and_sees_every_completed_write() {
    let Some(dir) = shm_dir() else {
        return;
    };
    let d = dir.path().to_path_buf();
    let disk = img(&d, "disk.qcow2");
    run(
        "qemu-img",
        &[
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            disk.clone(),
            "8M".into(),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f".into(),
            "qcow2".into(),
            "-c".into(),
            "write -P 0x11 0 4M".into(),
            "-c".into(),
            "write -z 5M 64k".into(),
            disk.clone(),
        ],
    );
    mapped_session(
        dir,
        &[
            "read -P 0x11 0 64k",
            "read -P 0 4M 64k",
            "read -P 0 5M 64k",
            "write -P 0x22 4M 64k",
            "read -P 0x22 4M 64k",
            "read -P 0x11 4190208 4096",
            "discard 0 64k",
            "read -P 0 0 64k",
            "write -z 64k 64k",
            "read -P 0 64k 64k",
            "write -P 0x33 0 4k",
            "read -P 0x33 0 4k",
            "read -P 0 4k 60k",
            "write -P 0x44 100k 1k",
            "read -P 0x44 100k 1k",
            "read -P 0x11 200k 1M",
        ],
        &[
            "read -P 0x33 0 4k",
            "read -P 0x22 4M 64k",
            "read -P 0x44 100k 1k",
        ],
    );
}

/// The same through a three-deep chain opened from the names in the images: runs
/// of every layer are read from that layer's file, and a write to the top (which
/// allocates there, copying the rest of the cluster from below) is seen at once.
#[test]
fn a_qcow2_export_reads_through_its_backing_chain() {
    let Some(dir) = shm_dir() else {
        return;
    };
    let d = dir.path().to_path_buf();
    let qemu_img = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        run("qemu-img", &args)
    };
    let qemu_io_on = |image: &str, commands: &[&str]| {
        let mut args = vec!["-f".to_string(), "qcow2".to_string()];
        for c in commands {
            args.extend(["-c".to_string(), c.to_string()]);
        }
        args.push(img(&d, image));
        run("qemu-io", &args)
    };
    qemu_img(&["create", "-q", "-f", "qcow2", &img(&d, "base.qcow2"), "8M"]);
    qemu_io_on("base.qcow2", &["write -P 0x11 0 4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &img(&d, "mid.qcow2"),
    ]);
    qemu_io_on("mid.qcow2", &["write -P 0x22 1M 64k", "write -z 2M 64k"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &img(&d, "disk.qcow2"),
    ]);
    qemu_io_on("disk.qcow2", &["write -P 0x33 3M 4k"]);
    mapped_session(
        dir,
        &[
            "read -P 0x11 0 64k",
            "read -P 0x22 1M 64k",
            "read -P 0x11 1114112 64k",
            "read -P 0 2M 64k",
            "read -P 0x33 3M 4k",
            "read -P 0x11 3149824 60k",
            "read -P 0 4M 1M",
            "write -P 0x44 1M 4k",
            "read -P 0x44 1M 4k",
            "read -P 0x22 1052672 60k",
            "write -P 0x55 5M 4k",
            "read -P 0x55 5M 4k",
            "read -P 0 5246976 60k",
        ],
        &[
            "read -P 0x44 1M 4k",
            "read -P 0x22 1052672 60k",
            "read -P 0x55 5M 4k",
        ],
    );
}

fn make_compress_images(dir: &Path) -> std::io::Result<()> {
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &img(dir, "t.qcow2"), "4M"],
    )?;
    std::fs::File::create(dir.join("r.raw"))?.set_len(4 << 20)?;
    tool("sync", &[])
}

const COMPRESS_ARGS: &[&str] = &[
    "--blockdev",
    "driver=file,node-name=f,filename=$DIR/t.qcow2",
    "--blockdev",
    "driver=qcow2,node-name=q,file=f",
    "--blockdev",
    "driver=file,node-name=rf,filename=$DIR/r.raw",
    "--blockdev",
    "driver=raw,node-name=rr,file=rf",
    "--nbd-server",
    "addr.type=unix,addr.path=$DIR/nbd.sock",
];

/// The `compress` filter: where it may sit, how it shows in queries, as qsd.
fn compress_script() -> Script {
    let add = |id: &str, node: &str, file: &str| {
        Step::line(&format!(
            r#"{{"execute": "blockdev-add", "arguments": {{"driver": "compress", "node-name": "{node}", "file": "{file}"}}, "id": "{id}"}}"#
        ))
    };
    let steps = vec![
        Step::line(r#"{"execute": "qmp_capabilities", "id": "cap"}"#),
        add("a1", "c", "q").note("over qcow2"),
        add("a2", "c2", "rf").note("over a file: refused"),
        add("a3", "c3", "rr").note("over raw: refused"),
        add("a4", "c4", "nosuch").note("no such child"),
        Step::line(
            r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": "q1"}"#,
        )
        .note("a json: filename, the child's cluster size"),
        Step::line(r#"{"execute": "x-debug-query-block-graph", "id": "g1"}"#).note("the edge"),
        Step::line(r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e", "node-name": "c", "writable": true}, "id": "x1"}"#)
            .note("exported"),
        Step::line(r#"{"execute": "block_resize", "arguments": {"node-name": "c", "size": 8388608}, "id": "r1"}"#)
            .note("resize through the filter"),
        Step::line(r#"{"execute": "block-export-del", "arguments": {"id": "e"}, "id": "x2"}"#)
            .until_event("BLOCK_EXPORT_DELETED")
            .note("unexported"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "q"}, "id": "d1"}"#)
            .note("the child is in use"),
        Step::line(r#"{"execute": "blockdev-del", "arguments": {"node-name": "c"}, "id": "d2"}"#)
            .note("the filter goes"),
        Step::line(r#"{"execute": "quit", "id": "bye"}"#)
            .until_eof()
            .note("quit"),
    ];
    Script {
        name: "qcow2-compress".into(),
        monitors: 1,
        args: COMPRESS_ARGS.iter().map(|a| a.to_string()).collect(),
        vars: Vec::new(),
        setup: Some(make_compress_images),
        steps,
    }
}

#[test]
fn the_compress_filter_matches_qsd() {
    if let Err(report) = differential(&compress_script()) {
        panic!("{report}");
    }
}

/// The same writes through a `compress` node of qsd and of bulkhead (both
/// placements): the same answers (an allocated cluster refuses a compressed write
/// with EIO), and images with the same clusters, compressed, that qemu-img finds
/// clean and equal.
#[test]
fn writes_through_the_compress_filter_are_stored_compressed_as_by_qsd() {
    let commands = [
        "write -P 0x11 0 64k",
        "write -P 0x22 70000 1000",
        "write -P 0x33 0 64k",
        "write -P 0x44 196608 200k",
        "read -P 0x11 0 64k",
        "read -P 0x22 70000 1000",
        "read -P 0 65536 4464",
        "read -P 0x44 196608 200k",
    ];
    let mut outcomes: Vec<(String, String, String, String)> = Vec::new();
    for (kind, isolation) in [
        (DaemonKind::Qsd, None),
        (DaemonKind::Bulkhead, Some("kind")),
        (DaemonKind::Bulkhead, Some("image")),
    ] {
        let dir = match TempDir::new("bulkhead-compress") {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        if let Err(e) = make_compress_images(dir.path()) {
            panic!("{e}");
        }
        let d = dir.path().to_path_buf();
        let mut args: Vec<String> = COMPRESS_ARGS.iter().map(|a| a.to_string()).collect();
        args.extend(
            [
                "--blockdev",
                "driver=compress,node-name=c,file=q",
                "--export",
                "type=nbd,id=e,node-name=c,writable=on",
            ]
            .map(String::from),
        );
        if let Some(i) = isolation {
            args.extend(["--isolation".to_string(), i.to_string()]);
        }
        let mut daemon = match Daemon::start_in(kind, dir, 1, &args, &[]) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let socket = d.join("nbd.sock");
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !socket.exists() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let uri = format!("nbd+unix:///c?socket={}", socket.display());
        let mut io_args: Vec<String> = vec!["-f".into(), "raw".into()];
        for c in commands {
            io_args.extend(["-c".to_string(), c.to_string()]);
        }
        io_args.push(uri);
        // Timing lines differ; what was written, refused and read back must not.
        // A failed command makes qemu-io's status non-zero: the text is compared.
        let out = match Command::new("qemu-io").args(&io_args).output() {
            Ok(o) => o,
            Err(e) => panic!("qemu-io: {e}"),
        };
        let said: String = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect();
        if kind == DaemonKind::Qsd {
            if let Ok(mut qmp) = daemon.qmp(0) {
                let _ = qmp.execute_ok("quit", None);
            }
            let _ = daemon.wait_exit(std::time::Duration::from_secs(20));
        } else {
            quit(&mut daemon);
        }
        let image = img(&d, "t.qcow2");
        let check = run("qemu-img", &["check".into(), image.clone()]);
        let map = run(
            "qemu-img",
            &["map".into(), "--output=json".into(), image.clone()],
        );
        let raw = img(&d, "out.raw");
        run(
            "qemu-img",
            &[
                "convert".into(),
                "-O".into(),
                "raw".into(),
                image,
                raw.clone(),
            ],
        );
        let data = std::fs::read(&raw).map(|b| format!("{:x?}", &b[..512 * 1024]));
        outcomes.push((said, check, map, data.unwrap_or_default()));
    }
    let (qsd, ours) = outcomes.split_first().expect("three runs");
    assert!(
        qsd.0.contains("write failed: Input/output error"),
        "{}",
        qsd.0
    );
    assert!(qsd.1.contains("100.00% compressed clusters"), "{}", qsd.1);
    for o in ours {
        assert_eq!(o.0, qsd.0, "qemu-io's answers");
        assert_eq!(o.1, qsd.1, "qemu-img check");
        assert_eq!(o.2, qsd.2, "qemu-img map");
        assert!(o.3 == qsd.3, "the guest data differs");
    }
}
