//! The real bulkhead binary serving NBD to real clients (nbdinfo, qemu-img, qemu-io,
//! nbdcopy) and to hand-made bad peers, with qemu-storage-daemon 10.0.2 run with the same
//! command line on an identical image as the oracle.
//!
//! Covered: nbdinfo `--json`/`--list` for several export configurations; block status
//! (qemu-img map, nbdinfo --map for base:allocation and qemu:allocation-depth) on sparse
//! raw, file, raw-with-offset and null exports; qemu-io patterns (FUA, zeroes with and
//! without unmap, discard, flush) checked in the image file; nbdcopy and qemu-img convert
//! round trips; 64 parallel clients; fio verify; bad peers and raw option/command
//! transcripts; block-export-del, nbd-server-stop and quit with clients connected;
//! max-connections=1; SIGKILL of bulkhead's workers under a connected client.
//!
//! Runs in the test process. Each test starts its daemons in fresh temp dirs (removed on
//! drop, with every process the daemon spawned); client tools are waited for or killed.
//! Everything a daemon sends is untrusted: the raw NBD client below bounds every length it
//! reads. `BULKHEAD_DIFF_AGAINST=qsd` runs the same tests against qsd itself.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bulkhead_systests::{Daemon, DaemonKind, QmpConnection, TempDir};
use serde_json::{Value, json};

/// Where both daemons listen for NBD, inside their temp dir.
const NBD_SOCKET: &str = "nbd.sock";

/// How long a raw NBD peer waits for more bytes before it decides the server is silent.
const QUIET: Duration = Duration::from_millis(700);

/// How long the NBD socket gets to appear and a raw peer waits for an expected reply.
const PATIENCE: Duration = Duration::from_secs(20);

/// The package that ships each external tool, for the "missing tool" message.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "qemu-img" | "qemu-io" => "qemu-utils (10.0.2, bookworm-backports)",
        "cmp" => "diffutils",
        "fio" => "fio (with its nbd engine)",
        _ => "the package providing it",
    }
}

/// Runs `program` and returns its output; a missing tool fails the test with the package
/// to install.
fn run(program: &str, args: &[&str]) -> Output {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "{program} is not installed (install {}); these tests need it",
            package_of(program)
        ),
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// Runs `program`, requires success, returns stdout.
fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// qemu-io's output without its timing lines (`64 KiB, 1 ops; 00.00 sec (...)`).
fn without_timings(text: &str) -> String {
    text.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Creates a sparse raw image of `size` bytes in `dir` and applies qemu-io `commands`.
fn make_image(dir: &Path, name: &str, size: u64, commands: &[&str]) -> PathBuf {
    let path = dir.join(name);
    if let Err(e) = File::create(&path).and_then(|f| f.set_len(size)) {
        panic!("cannot create {}: {e}", path.display());
    }
    if !commands.is_empty() {
        let mut args = vec!["-f", "raw"];
        for c in commands {
            args.push("-c");
            args.push(c);
        }
        let p = path.to_string_lossy().into_owned();
        args.push(&p);
        run_ok("qemu-io", &args);
    }
    path
}

/// A daemon with an NBD server on `$DIR/nbd.sock`.
struct Served {
    daemon: Daemon,
}

impl Served {
    /// Starts `kind` with one QMP monitor and `args` (`$DIR` substituted), after `prepare`
    /// made the images in the new temp dir; returns once QMP answers and the NBD socket
    /// exists (qsd processes its whole command line before the monitor runs).
    fn start(kind: DaemonKind, prepare: &dyn Fn(&Path), args: &[&str]) -> Served {
        let dir = match TempDir::new(&format!("bulkhead-nbd-{}", kind.name())) {
            Ok(dir) => dir,
            Err(e) => panic!("{e}"),
        };
        prepare(dir.path());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let daemon = match Daemon::start_in(kind, dir, 1, &args, &[]) {
            Ok(daemon) => daemon,
            Err(e) => panic!("{e}"),
        };
        if let Err(e) = daemon.qmp(0) {
            panic!("{}: {e}\nstderr:\n{}", kind.name(), daemon.stderr());
        }
        let socket = daemon.dir().join(NBD_SOCKET);
        let deadline = Instant::now() + PATIENCE;
        let serves_nbd = args.iter().any(|a| a == "--nbd-server");
        while serves_nbd && !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} did not create {}; stderr:\n{}",
                kind.name(),
                socket.display(),
                daemon.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
        Served { daemon }
    }

    fn socket(&self) -> PathBuf {
        self.daemon.dir().join(NBD_SOCKET)
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    fn file(&self, name: &str) -> PathBuf {
        self.daemon.dir().join(name)
    }

    /// Replaces the daemon's temp dir by `$DIR`.
    fn mask(&self, text: &str) -> String {
        text.replace(&*self.daemon.dir().to_string_lossy(), "$DIR")
    }

    fn qmp(&self) -> QmpConnection {
        match self.daemon.qmp(0) {
            Ok(qmp) => qmp,
            Err(e) => panic!("{e}\nstderr:\n{}", self.daemon.stderr()),
        }
    }

    fn name(&self) -> &'static str {
        self.daemon.kind().name()
    }
}

fn under_test() -> DaemonKind {
    match DaemonKind::under_test() {
        Ok(kind) => kind,
        Err(e) => panic!("{e}"),
    }
}

/// Starts qsd and the daemon under test with the same images and command line.
fn start_pair(prepare: &dyn Fn(&Path), args: &[&str]) -> (Served, Served) {
    let qsd = Served::start(DaemonKind::Qsd, prepare, args);
    let ours = Served::start(under_test(), prepare, args);
    (qsd, ours)
}

/// The same client command against both daemons (`{URI:<export>}` stands for the export's
/// URI); returns (qsd's, ours) stdout with the temp dir masked. Both must succeed.
fn both(qsd: &Served, ours: &Served, program: &str, args: &[&str]) -> (String, String) {
    let one = |s: &Served| {
        let args: Vec<String> = args
            .iter()
            .map(|a| match a.strip_prefix("{URI:") {
                Some(rest) => s.uri(rest.trim_end_matches('}')),
                None => a.to_string(),
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = run(program, &args);
        assert!(
            output.status.success(),
            "{program} {args:?} against {} failed ({}): {}\ndaemon stderr:\n{}",
            s.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            s.daemon.stderr()
        );
        s.mask(&String::from_utf8_lossy(&output.stdout))
    };
    (one(qsd), one(ours))
}

// ---------------------------------------------------------------------------------------
// nbdinfo

/// The command line of the nbdinfo tests: a 4 MiB raw-over-file node, a null-co node, an
/// NBD server with `server_extra`, and one export.
fn nbdinfo_args(server_extra: &str, export: &str) -> Vec<String> {
    vec![
        "--blockdev".into(),
        "driver=file,node-name=file0,filename=$DIR/disk.img".into(),
        "--blockdev".into(),
        "driver=raw,node-name=raw0,file=file0".into(),
        "--blockdev".into(),
        "driver=null-co,node-name=null0,size=8388608".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path=$DIR/{NBD_SOCKET}{server_extra}"),
        "--export".into(),
        export.into(),
    ]
}

fn disk_with_data(dir: &Path) {
    make_image(dir, "disk.img", 4 << 20, &["write -P 0x5a 1M 64k"]);
}

/// Runs `nbdinfo --json URI` and `nbdinfo --list --json` against both daemons, requires
/// them equal, and returns ours parsed.
fn compare_nbdinfo(server_extra: &str, export: &str) -> (Value, Value) {
    let args = nbdinfo_args(server_extra, export);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (qsd, ours) = start_pair(&disk_with_data, &args);
    let (theirs, mine) = both(&qsd, &ours, "nbdinfo", &["--json", "{URI:exp}"]);
    assert_eq!(mine, theirs, "nbdinfo --json for {export}");
    let (theirs_list, mine_list) = both(&qsd, &ours, "nbdinfo", &["--list", "--json", "{URI:}"]);
    assert_eq!(mine_list, theirs_list, "nbdinfo --list --json for {export}");
    let parse = |text: &str| match serde_json::from_str::<Value>(text) {
        Ok(v) => v,
        Err(e) => panic!("nbdinfo printed no JSON ({e}): {text}"),
    };
    (parse(&mine), parse(&mine_list))
}

/// The one export of an nbdinfo JSON document.
fn only_export(doc: &Value) -> &Value {
    match doc
        .get("exports")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        Some([export]) => export,
        _ => panic!("expected exactly one export: {doc}"),
    }
}

#[test]
fn nbdinfo_json_equals_qsd_for_a_writable_raw_export_with_description_and_depth() {
    let (info, list) = compare_nbdinfo(
        "",
        "type=nbd,id=e0,node-name=raw0,name=exp,writable=on,description=hello world,allocation-depth=on",
    );
    for doc in [&info, &list] {
        let export = only_export(doc);
        assert_eq!(export["export-name"], json!("exp"));
        assert_eq!(export["description"], json!("hello world"));
        assert_eq!(export["is_read_only"], json!(false));
        assert_eq!(export["export-size"], json!(4194304));
        assert_eq!(export["can_multi_conn"], json!(true));
        assert_eq!(
            export["contexts"],
            json!(["base:allocation", "qemu:allocation-depth"])
        );
    }
}

#[test]
fn nbdinfo_json_equals_qsd_for_a_read_only_export() {
    let (info, _) = compare_nbdinfo("", "type=nbd,id=e0,node-name=raw0,name=exp");
    let export = only_export(&info);
    assert_eq!(export["is_read_only"], json!(true));
    assert_eq!(export["contexts"], json!(["base:allocation"]));
    assert_eq!(export.get("description"), None);
}

#[test]
fn nbdinfo_json_equals_qsd_for_a_null_co_export() {
    let (info, _) = compare_nbdinfo("", "type=nbd,id=e0,node-name=null0,name=exp,writable=on");
    let export = only_export(&info);
    assert_eq!(export["export-size"], json!(8388608));
    assert_eq!(export["is_read_only"], json!(false));
}

#[test]
fn nbdinfo_json_equals_qsd_with_max_connections_one() {
    let (info, _) = compare_nbdinfo(
        ",max-connections=1",
        "type=nbd,id=e0,node-name=raw0,name=exp,writable=on",
    );
    assert_eq!(only_export(&info)["can_multi_conn"], json!(false));
}

// ---------------------------------------------------------------------------------------
// Block status

#[test]
fn qemu_img_map_and_nbdinfo_map_equal_qsd_on_sparse_raw_file_and_null_exports() {
    let prepare = |dir: &Path| {
        make_image(
            dir,
            "sparse.img",
            16 << 20,
            &[
                "write -P 1 0 64k",
                "write -P 2 1M 3M",
                "write -z 2M 64k",
                "write -P 3 15M 512k",
            ],
        );
    };
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/sparse.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--blockdev",
        "driver=raw,node-name=off0,file=file0,offset=1048576,size=8388608",
        "--blockdev",
        "driver=null-co,node-name=null0,size=8388608",
        "--blockdev",
        "driver=null-aio,node-name=zero0,size=3145728,read-zeroes=on",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=efile,node-name=file0,name=file,allocation-depth=on",
        "--export",
        "type=nbd,id=enull,node-name=null0,name=null,allocation-depth=on",
        "--export",
        "type=nbd,id=ezero,node-name=zero0,name=zero,allocation-depth=on",
        "--export",
        "type=nbd,id=eraw,node-name=raw0,name=raw,allocation-depth=on",
        "--export",
        "type=nbd,id=eoff,node-name=off0,name=off,allocation-depth=on",
    ];
    let (qsd, ours) = start_pair(&prepare, &args);
    for export in ["file", "raw", "off", "null", "zero"] {
        let uri = format!("{{URI:{export}}}");
        let (theirs, mine) = both(
            &qsd,
            &ours,
            "qemu-img",
            &["map", "--output=json", "-f", "raw", &uri],
        );
        assert_eq!(mine, theirs, "qemu-img map of export {export}");
        let (theirs, mine) = both(
            &qsd,
            &ours,
            "qemu-img",
            &[
                "map",
                "--output=json",
                "--start-offset=1M",
                "--max-length=2M",
                "-f",
                "raw",
                &uri,
            ],
        );
        assert_eq!(mine, theirs, "qemu-img map of a window of export {export}");
        for context in ["base:allocation", "qemu:allocation-depth"] {
            let map = format!("--map={context}");
            let (theirs, mine) = both(&qsd, &ours, "nbdinfo", &[&map, &uri]);
            assert_eq!(mine, theirs, "nbdinfo {map} of export {export}");
        }
    }
    let (_, offset_map) = both(
        &qsd,
        &ours,
        "nbdinfo",
        &["--map=base:allocation", "{URI:off}"],
    );
    assert_eq!(offset_map, OFFSET_BASE_ALLOCATION, "raw with offset=1M");
    let (_, null_map) = both(
        &qsd,
        &ours,
        "nbdinfo",
        &["--map=qemu:allocation-depth", "{URI:null}"],
    );
    assert_eq!(
        null_map, "         0     8388608    0  absent\n",
        "null-co depth"
    );
}

/// `nbdinfo --map=base:allocation` of the 8 MiB window at 1 MiB of the sparse image.
const OFFSET_BASE_ALLOCATION: &str = "         0     1048576    0  data
   1048576       65536    3  hole,zero
   1114112     2031616    0  data
   3145728     5242880    3  hole,zero
";

// ---------------------------------------------------------------------------------------
// qemu-io patterns

#[test]
fn qemu_io_patterns_through_raw_over_file_reach_the_file_like_qsd() {
    qemu_io_patterns_through_raw_over_file(false);
}

/// The same on an image in tmpfs, which the file worker reads and writes on its own
/// thread instead of its I/O threads (and under its seccomp filter).
#[test]
fn qemu_io_patterns_reach_an_image_on_tmpfs_like_qsd() {
    qemu_io_patterns_through_raw_over_file(true);
}

/// Where an image on tmpfs lives for the daemon whose temp dir is `dir`.
fn tmpfs_image(dir: &Path) -> PathBuf {
    let tag = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    PathBuf::from(format!("/dev/shm/{tag}-disk.img"))
}

/// Removes the tmpfs images of the daemons when the test ends, even by a panic.
struct TmpfsImages(Vec<PathBuf>);

impl Drop for TmpfsImages {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

fn qemu_io_patterns_through_raw_over_file(on_tmpfs: bool) {
    let prepare = |dir: &Path| {
        make_image(dir, "disk.img", 8 << 20, &["write -P 0xee 0 8M"]);
        if on_tmpfs {
            // The daemons open $DIR/disk.img, a link to the copy in /dev/shm.
            let target = tmpfs_image(dir);
            let moved = fs::copy(dir.join("disk.img"), &target)
                .and_then(|_| fs::remove_file(dir.join("disk.img")))
                .and_then(|_| std::os::unix::fs::symlink(&target, dir.join("disk.img")));
            if let Err(e) = moved {
                let _ = fs::remove_file(&target);
                panic!("cannot put the image on tmpfs at {}: {e}", target.display());
            }
        }
    };
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=raw0,name=exp,writable=on",
    ];
    let (qsd, ours) = start_pair(&prepare, &args);
    let _tmpfs = TmpfsImages(match on_tmpfs {
        true => vec![
            tmpfs_image(qsd.daemon.dir()),
            tmpfs_image(ours.daemon.dir()),
        ],
        false => Vec::new(),
    });
    let writes = [
        "write -P 0x11 0 64k",
        "write -f -P 0x22 64k 64k",
        "write -z 128k 64k",
        "write -z -u 192k 64k",
        "write -z -f 256k 4k",
        "write -z -u -f 4M 1M",
        "write -P 0x33 1M 1M",
        "discard 1536k 64k",
        "flush",
        "write -P 0x44 7M 512",
        "aio_write -P 0x55 6M 4k",
        "aio_flush",
    ];
    let mut io_args = vec!["-f", "raw"];
    for c in &writes {
        io_args.push("-c");
        io_args.push(c);
    }
    io_args.push("{URI:exp}");
    let (theirs, mine) = both(&qsd, &ours, "qemu-io", &io_args);
    let (theirs, mine) = (without_timings(&theirs), without_timings(&mine));
    assert_eq!(mine, theirs, "qemu-io writes through the export");
    assert_eq!(mine, EXPECTED_WRITES);

    let checks = [
        "read -P 0x11 0 64k",
        "read -P 0x22 64k 64k",
        "read -P 0 128k 132k",
        "read -P 0xee 260k 764k",
        "read -P 0x33 1M 1M",
        "read -P 0xee 2M 2M",
        "read -P 0 4M 1M",
        "read -P 0xee 5M 1M",
        "read -P 0x55 6M 4k",
        "read -P 0x44 7M 512",
        "read -P 0xee 7340544 1048064",
    ];
    let mut read_args = vec!["-f", "raw", "-r", "-U"];
    for c in &checks {
        read_args.push("-c");
        read_args.push(c);
    }
    let file = ours.file("disk.img").to_string_lossy().into_owned();
    read_args.push(&file);
    let direct = without_timings(&run_ok("qemu-io", &read_args));
    assert_eq!(direct, EXPECTED_READS, "reading {file} directly");

    let a = fs::read(qsd.file("disk.img"));
    let b = fs::read(ours.file("disk.img"));
    match (a, b) {
        (Ok(a), Ok(b)) => assert!(a == b, "the image files of qsd and {} differ", ours.name()),
        (a, b) => panic!("cannot read the images: {:?} {:?}", a.err(), b.err()),
    }
}

/// Writes through an exported raw window (offset and size) land at the window's
/// offset in the file and leave the rest alone, as with qsd.
#[test]
fn writes_through_a_raw_window_land_at_its_offset_in_the_file() {
    let prepare = |dir: &Path| {
        make_image(dir, "disk.img", 8 << 20, &["write -P 0xee 0 8M"]);
    };
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=win0,file=file0,offset=1048576,size=2097152",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=win0,name=win,writable=on",
    ];
    let (qsd, ours) = start_pair(&prepare, &args);
    let io = [
        "-f",
        "raw",
        "-c",
        "write -P 0x66 0 64k",
        "-c",
        "write -P 0x77 2093056 4k",
        "-c",
        "write -z 64k 4k",
        "-c",
        "read -P 0x66 0 64k",
        "-c",
        "read -P 0 64k 4k",
        "{URI:win}",
    ];
    let (theirs, mine) = both(&qsd, &ours, "qemu-io", &io);
    assert_eq!(without_timings(&mine), without_timings(&theirs));
    let checks = [
        "read -P 0xee 0 1M",
        "read -P 0x66 1M 64k",
        "read -P 0 1114112 4k",
        "read -P 0xee 1118208 1044480",
        "read -P 0x77 3141632 4k",
        "read -P 0xee 3M 5M",
    ];
    for served in [&qsd, &ours] {
        let file = served.file("disk.img").to_string_lossy().into_owned();
        let mut read_args = vec!["-f", "raw", "-r", "-U"];
        for c in &checks {
            read_args.push("-c");
            read_args.push(c);
        }
        read_args.push(&file);
        let out = without_timings(&run_ok("qemu-io", &read_args));
        assert!(
            !out.contains("Pattern verification failed"),
            "{}: {out}",
            served.name()
        );
        assert_eq!(
            out.lines().count(),
            checks.len(),
            "{}: {out}",
            served.name()
        );
    }
}

/// qemu-io's report of the writes (timing lines dropped).
const EXPECTED_WRITES: &str = "wrote 65536/65536 bytes at offset 0
wrote 65536/65536 bytes at offset 65536
wrote 65536/65536 bytes at offset 131072
wrote 65536/65536 bytes at offset 196608
wrote 4096/4096 bytes at offset 262144
wrote 1048576/1048576 bytes at offset 4194304
wrote 1048576/1048576 bytes at offset 1048576
discard 65536/65536 bytes at offset 1572864
wrote 512/512 bytes at offset 7340032
wrote 4096/4096 bytes at offset 6291456
";
/// The direct reads of the image file: every pattern verified. Discard leaves the data
/// because `discard=ignore` is the blockdev default.
const EXPECTED_READS: &str = "read 65536/65536 bytes at offset 0
read 65536/65536 bytes at offset 65536
read 135168/135168 bytes at offset 131072
read 782336/782336 bytes at offset 266240
read 1048576/1048576 bytes at offset 1048576
read 2097152/2097152 bytes at offset 2097152
read 1048576/1048576 bytes at offset 4194304
read 1048576/1048576 bytes at offset 5242880
read 4096/4096 bytes at offset 6291456
read 512/512 bytes at offset 7340032
read 1048064/1048064 bytes at offset 7340544
";

// ---------------------------------------------------------------------------------------
// Copies

/// Compares two files with cmp(1): equal contents and length, or the test fails with cmp's
/// report.
fn assert_same_file(a: &Path, b: &Path, what: &str) {
    let (a, b) = (a.to_string_lossy(), b.to_string_lossy());
    let output = run("cmp", &[&a, &b]);
    assert!(
        output.status.success(),
        "{what}: cmp {a} {b} ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn nbdcopy_and_qemu_img_convert_round_trips_are_byte_for_byte() {
    let prepare = |dir: &Path| {
        make_image(
            dir,
            "src.img",
            32 << 20,
            &[
                "write -P 0xa5 0 1M",
                "write -P 0x3c 5M 7M",
                "write -P 0x01 31M 1M",
            ],
        );
        make_image(dir, "dst.img", 32 << 20, &["write -P 0xff 0 32M"]);
    };
    let args = [
        "--blockdev",
        "driver=file,node-name=fsrc,filename=$DIR/src.img",
        "--blockdev",
        "driver=raw,node-name=src,file=fsrc",
        "--blockdev",
        "driver=file,node-name=fdst,filename=$DIR/dst.img",
        "--blockdev",
        "driver=raw,node-name=dst,file=fdst",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=esrc,node-name=src,name=src",
        "--export",
        "type=nbd,id=edst,node-name=dst,name=dst,writable=on",
    ];
    let s = Served::start(under_test(), &prepare, &args);
    let (src, dst) = (s.file("src.img"), s.file("dst.img"));
    let path = |p: &Path| p.to_string_lossy().into_owned();

    let out1 = s.file("out1.img");
    run_ok("nbdcopy", &[&s.uri("src"), &path(&out1)]);
    assert_same_file(&src, &out1, "nbdcopy export -> file");
    let out2 = s.file("out2.img");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri("src"),
            &path(&out2),
        ],
    );
    assert_same_file(&src, &out2, "qemu-img convert export -> file");

    run_ok("nbdcopy", &[&path(&src), &s.uri("dst")]);
    assert_same_file(&src, &dst, "nbdcopy file -> export over 0xff");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 32M", &s.uri("dst")],
    );
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &path(&src),
            &s.uri("dst"),
        ],
    );
    assert_same_file(&src, &dst, "qemu-img convert -n file -> export over 0x77");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 32M", &s.uri("dst")],
    );
    run_ok(
        "nbdcopy",
        &["--connections=4", &s.uri("src"), &s.uri("dst")],
    );
    assert_same_file(&src, &dst, "nbdcopy export -> export, 4 connections");
}

// ---------------------------------------------------------------------------------------
// Many clients
#[test]
fn fio_random_writes_with_32_in_flight_per_connection_verify() {
    let prepare = |dir: &Path| {
        make_image(dir, "disk.img", 64 << 20, &[]);
    };
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=raw0,name=exp,writable=on",
    ];
    let s = Served::start(under_test(), &prepare, &args);
    let uri = format!("--uri={}", s.uri("exp"));
    // Two jobs, two connections, each on its own 32 MiB; fio checks every block it wrote.
    let output = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bsrange=512-256k",
            "--size=32M",
            "--offset_increment=32M",
            "--numjobs=2",
            "--iodepth=32",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // Otherwise fio leaves *-verify.state files in the working directory.
            "--verify_state_save=0",
            "--output-format=terse",
            "--terse-version=3",
        ],
    );
    // Terse v3: field 5 (index 4) is the job's error number, one line per job.
    let errors: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("3;"))
        .map(|l| l.split(';').nth(4).unwrap_or("missing"))
        .collect();
    assert_eq!(errors, vec!["0", "0"], "fio output:\n{output}");
}

/// Child processes killed (and reaped) on drop, so a failing test leaves none behind.
struct Children(Vec<(usize, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn sixty_four_qemu_io_clients_at_once_write_disjoint_regions_correctly() {
    const CLIENTS: usize = 64;
    let prepare = |dir: &Path| {
        make_image(dir, "disk.img", (CLIENTS as u64) << 20, &[]);
    };
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=raw0,name=exp,writable=on",
    ];
    let s = Served::start(under_test(), &prepare, &args);
    let uri = s.uri("exp");
    let mut children = Children(Vec::new());
    for i in 0..CLIENTS {
        let write = format!("write -P {} {i}M 1M", i + 1);
        let read = format!("read -P {} {i}M 1M", i + 1);
        let child = Command::new("qemu-io")
            .args(["-f", "raw", "-c", &write, "-c", &read, &uri])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match child {
            Ok(child) => children.0.push((i, child)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                panic!(
                    "qemu-io is not installed (install {})",
                    package_of("qemu-io")
                )
            }
            Err(e) => panic!("cannot start qemu-io client {i}: {e}"),
        }
    }
    let mut failures = Vec::new();
    for (i, child) in std::mem::take(&mut children.0) {
        let offset = i << 20;
        let expected = format!(
            "wrote 1048576/1048576 bytes at offset {offset}\nread 1048576/1048576 bytes at offset {offset}\n"
        );
        match child.wait_with_output() {
            Ok(out) => {
                let stdout = without_timings(&String::from_utf8_lossy(&out.stdout));
                if !out.status.success() || stdout != expected || !out.stderr.is_empty() {
                    failures.push(format!(
                        "client {i}: {} stdout {stdout:?} stderr {:?}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            Err(e) => failures.push(format!("client {i}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients failed:\n{}\ndaemon stderr:\n{}",
        failures.len(),
        failures.join("\n"),
        s.daemon.stderr()
    );
    let checks: Vec<String> = (0..CLIENTS)
        .map(|i| format!("read -P {} {i}M 1M", i + 1))
        .collect();
    let mut read_args = vec!["-f", "raw", "-r", "-U"];
    for c in &checks {
        read_args.push("-c");
        read_args.push(c);
    }
    let file = s.file("disk.img").to_string_lossy().into_owned();
    read_args.push(&file);
    let direct = without_timings(&run_ok("qemu-io", &read_args));
    let expected: String = (0..CLIENTS)
        .map(|i| format!("read 1048576/1048576 bytes at offset {}\n", i << 20))
        .collect();
    assert_eq!(direct, expected, "the image file after {CLIENTS} clients");
}

// ---------------------------------------------------------------------------------------
// A raw NBD peer

/// `IHAVEOPT`, the option request magic.
const OPTION_MAGIC: &[u8; 8] = b"IHAVEOPT";
/// The option reply magic.
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Client flags: fixed newstyle, no zeroes.
const CLIENT_FLAGS: u32 = 3;
/// NBD_OPT_ABORT.
const OPT_ABORT: u32 = 2;
/// NBD_OPT_GO.
const OPT_GO: u32 = 7;
/// NBD_REP_ACK.
const REP_ACK: u32 = 1;
/// The compact (not extended) request magic.
const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The simple reply magic (no structured replies are negotiated by [`Peer`]).
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// NBD_CMD_READ.
const CMD_READ: u16 = 0;
/// NBD_CMD_WRITE.
const CMD_WRITE: u16 = 1;
/// The largest option reply payload we accept from a server.
const MAX_REPLY_PAYLOAD: usize = 64 << 10;

/// How a raw peer's reading ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// The server closed the connection (EOF or reset: which one depends on whether the
    /// server read everything we sent, not on the protocol).
    Closed,
    /// Nothing more arrived within [`QUIET`].
    Silent,
}

/// Everything a server sent to a raw peer after the greeting, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Transcript {
    bytes: String,
    ending: Ending,
}

/// A raw NBD connection, with the server's greeting read and the client flags sent.
struct Peer {
    stream: UnixStream,
}

/// An option request: magic, option, length, data.
fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = OPTION_MAGIC.to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A transmission request header.
fn request(command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Peer {
    /// Connects, checks the fixed-newstyle greeting (flags 3) and sends the client flags.
    fn connect(socket: &Path) -> Peer {
        // A socket file can exist a moment before it listens (bind, then listen).
        let deadline = Instant::now() + PATIENCE;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_micros(200));
                }
                Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
            }
        };
        let mut peer = Peer { stream };
        let greeting = match peer.read_exact(18) {
            Ok(g) => g,
            Err(e) => panic!("no NBD greeting from {}: {e}", socket.display()),
        };
        assert_eq!(
            hex(&greeting),
            hex(b"NBDMAGICIHAVEOPT\x00\x03"),
            "fixed-newstyle greeting"
        );
        peer.send(&CLIENT_FLAGS.to_be_bytes());
        peer
    }

    /// Connects and selects `export` with NBD_OPT_GO (no structured replies, so
    /// transmission uses simple replies).
    fn open_export(socket: &Path, export: &str) -> Peer {
        match Peer::try_open_export(socket, export) {
            Ok(peer) => peer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`Peer::open_export`], but a refusal is an error message instead of a panic.
    fn try_open_export(socket: &Path, export: &str) -> Result<Peer, String> {
        let mut peer = Peer::connect(socket);
        peer.send(&option(OPT_GO, &go_data(export, &[])));
        loop {
            let header = peer
                .read_exact(20)
                .map_err(|e| format!("NBD_OPT_GO reply header: {e}"))?;
            if hex(&header[..8]) != format!("{REPLY_MAGIC:016x}") {
                return Err(format!("bad option reply header {}", hex(&header)));
            }
            let kind = be32(&header, 12);
            let length = be32(&header, 16) as usize;
            if length > MAX_REPLY_PAYLOAD {
                return Err(format!("option reply length {length}"));
            }
            let payload = peer
                .read_exact(length)
                .map_err(|e| format!("NBD_OPT_GO reply payload: {e}"))?;
            match kind {
                REP_ACK => return Ok(peer),
                k if k & 0x8000_0000 != 0 => {
                    return Err(format!(
                        "NBD_OPT_GO {export:?} refused: type {k:#x} {:?}",
                        String::from_utf8_lossy(&payload)
                    ));
                }
                _ => {}
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.stream.write_all(bytes) {
            panic!("sending {} bytes: {e}", bytes.len());
        }
    }

    fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        self.stream.set_read_timeout(Some(PATIENCE))?;
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Connects without reading anything.
    fn connect_silently(socket: &Path) -> Peer {
        match UnixStream::connect(socket) {
            Ok(stream) => Peer { stream },
            Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
        }
    }

    /// Reads until the server closes or stays silent for [`QUIET`], for a server that is
    /// expected to wait.
    fn drain(&mut self) -> Transcript {
        self.drain_within(QUIET)
    }

    /// Reads until the server closes or stays silent for [`PATIENCE`], for a server that is
    /// expected to hang up (so a slow machine cannot turn a close into silence).
    fn drain_to_close(&mut self) -> Transcript {
        self.drain_within(PATIENCE)
    }

    fn drain_within(&mut self, silence: Duration) -> Transcript {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        let ending = loop {
            if self.stream.set_read_timeout(Some(silence)).is_err() {
                break Ending::Closed;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => break Ending::Closed,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break Ending::Silent;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Ending::Closed,
            }
        };
        Transcript {
            bytes: hex(&bytes),
            ending,
        }
    }

    /// NBD_CMD_READ with a simple reply: the data, or how it failed (`error N` for an
    /// error reply, `closed` if the connection is gone).
    fn read(&mut self, cookie: u64, offset: u64, length: u32) -> Result<Vec<u8>, String> {
        self.command(request(CMD_READ, cookie, offset, length), length as usize)
    }

    /// Sends a request (header and payload) and reads its simple reply with `data` bytes
    /// of data on success.
    fn command(&mut self, request: Vec<u8>, data: usize) -> Result<Vec<u8>, String> {
        // A server that neither answers nor hangs up is a different failure from one that
        // closed the connection.
        let failure = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("no reply within {PATIENCE:?}")
            }
            _ => "closed".to_string(),
        };
        self.stream.write_all(&request).map_err(failure)?;
        let header = self.read_exact(16).map_err(failure)?;
        if be32(&header, 0) != SIMPLE_REPLY_MAGIC || header[8..16] != request[8..16] {
            return Err(format!("bad reply header {}", hex(&header)));
        }
        match be32(&header, 4) {
            0 => self
                .read_exact(data)
                .map_err(|e| format!("{} in data", failure(e))),
            error => Err(format!("error {error}")),
        }
    }
}

/// One bad peer: what it does, then what the server answered.
type BadPeer = fn(&Path) -> Transcript;

fn wrong_magic(socket: &Path) -> Transcript {
    let mut peer = Peer::connect(socket);
    let mut bytes = b"BADMAGIC".to_vec();
    bytes.extend_from_slice(&option(OPT_GO, b"")[8..]);
    peer.send(&bytes);
    peer.drain_to_close()
}

fn unknown_option_then_abort(socket: &Path) -> Transcript {
    let mut peer = Peer::connect(socket);
    peer.send(&option(0x4242, b""));
    peer.send(&option(OPT_ABORT, b""));
    peer.drain_to_close()
}

fn oversized_option_length(socket: &Path) -> Transcript {
    let mut peer = Peer::connect(socket);
    let mut bytes = option(OPT_GO, b"");
    bytes[12..16].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    peer.send(&bytes);
    // qsd hangs up at the length, so these bytes may meet a closed socket.
    let _ = peer.stream.write_all(&[0u8; 64]);
    peer.drain_to_close()
}

fn truncated_option_then_close(socket: &Path) -> Transcript {
    let mut peer = Peer::connect(socket);
    let mut bytes = option(OPT_GO, &[0u8; 100]);
    bytes.truncate(16 + 10);
    peer.send(&bytes);
    let _ = peer.stream.shutdown(std::net::Shutdown::Write);
    peer.drain_to_close()
}

fn vanish_in_a_write_payload(socket: &Path) -> Transcript {
    let mut peer = Peer::open_export(socket, "exp");
    peer.send(&request(CMD_WRITE, 7, 0, 65536));
    peer.send(&[0xabu8; 1000]);
    Transcript {
        bytes: String::new(),
        ending: Ending::Closed,
    }
}

fn vanish_with_many_requests_in_flight(socket: &Path) -> Transcript {
    let mut peer = Peer::open_export(socket, "exp");
    // 32 writes of 64 KiB into the unused second half, then 32 reads, no reply read.
    for i in 0..32u64 {
        let offset = (2 << 20) + i * 65536;
        let _ = peer.stream.write_all(&with_payload_of(
            request(CMD_WRITE, i, offset, 65536),
            65536,
            0x77,
        ));
    }
    for i in 0..32u64 {
        let _ = peer
            .stream
            .write_all(&request(CMD_READ, 100 + i, 0, 1 << 20));
    }
    Transcript {
        bytes: String::new(),
        ending: Ending::Closed,
    }
}

fn vanish_before_a_read_reply(socket: &Path) -> Transcript {
    let mut peer = Peer::open_export(socket, "exp");
    peer.send(&request(CMD_READ, 8, 0, 32 << 20));
    Transcript {
        bytes: String::new(),
        ending: Ending::Closed,
    }
}

/// qsd's answers to option 0x4242 and then NBD_OPT_ABORT: NBD_REP_ERR_UNSUP with the text
/// "Unsupported option 16962 (<unknown>)", then NBD_REP_ACK for the abort.
const UNKNOWN_OPTION_REPLIES: &str = concat!(
    "0003e889045565a9",
    "00004242",
    "80000001",
    "00000024",
    "556e737570706f72746564206f7074696f6e20313639363220283c756e6b6e6f776e3e29",
    "0003e889045565a9",
    "00000002",
    "00000001",
    "00000000",
);

/// The command line of the raw-peer tests: a writable 4 MiB export `exp` (id `e0`) with
/// 0x5a at 1 MiB.
const RAW_PEER_ARGS: &[&str] = &[
    "--blockdev",
    "driver=file,node-name=file0,filename=$DIR/disk.img",
    "--blockdev",
    "driver=raw,node-name=raw0,file=file0",
    "--nbd-server",
    "addr.type=unix,addr.path=$DIR/nbd.sock",
    "--export",
    "type=nbd,id=e0,node-name=raw0,name=exp,writable=on",
];

#[test]
fn bad_peers_get_qsd_answers_and_the_daemon_keeps_serving_clients_and_qmp() {
    let closed = |bytes: &str| Transcript {
        bytes: bytes.into(),
        ending: Ending::Closed,
    };
    let peers: &[(&str, BadPeer, Transcript)] = &[
        ("wrong magic", wrong_magic, closed("")),
        (
            "unknown option, then abort",
            unknown_option_then_abort,
            closed(UNKNOWN_OPTION_REPLIES),
        ),
        (
            "oversized option length",
            oversized_option_length,
            closed(""),
        ),
        (
            "truncated option, then close",
            truncated_option_then_close,
            closed(""),
        ),
        (
            "vanish in a write payload",
            vanish_in_a_write_payload,
            closed(""),
        ),
        (
            "vanish before a read reply",
            vanish_before_a_read_reply,
            closed(""),
        ),
        (
            "vanish with 64 requests in flight",
            vanish_with_many_requests_in_flight,
            closed(""),
        ),
    ];
    let (qsd, ours) = start_pair(&disk_with_data, RAW_PEER_ARGS);
    let expected_exports = json!([
        {"node-name": "raw0", "shutting-down": false, "type": "nbd", "id": "e0"}
    ]);
    let mut sessions = Vec::new();
    for served in [&qsd, &ours] {
        let steady = Peer::open_export(&served.socket(), "exp");
        sessions.push((served, steady, served.qmp()));
    }
    for (what, bad, expected) in peers {
        let theirs = bad(&qsd.socket());
        let mine = bad(&ours.socket());
        assert_eq!(mine, theirs, "{what}: what the server sent back");
        assert_eq!(&mine, expected, "{what}");
        for (served, steady, qmp) in &mut sessions {
            let exports = qmp.execute_ok("query-block-exports", None);
            assert_eq!(
                exports.ok(),
                Some(expected_exports.clone()),
                "{} after {what}; stderr:\n{}",
                served.name(),
                served.daemon.stderr()
            );
            let data = steady.read(1, 1 << 20, 4096);
            assert_eq!(
                data,
                Ok(vec![0x5au8; 4096]),
                "{}: a client connected before {what} still reads",
                served.name()
            );
            let mut fresh = Peer::open_export(&served.socket(), "exp");
            assert_eq!(
                fresh.read(2, 0, 512),
                Ok(vec![0u8; 512]),
                "{}: a new client after {what}",
                served.name()
            );
        }
    }
    let (theirs, mine) = both(&qsd, &ours, "nbdinfo", &["--json", "{URI:exp}"]);
    assert_eq!(mine, theirs, "nbdinfo after all bad peers");
    let stderr = ours.daemon.stderr();
    assert!(
        !stderr.contains("panicked"),
        "a bad peer made a process of {} panic:\n{stderr}",
        ours.name()
    );
}

#[test]
fn block_export_del_with_a_client_connected_refuses_safe_and_disconnects_hard_like_qsd() {
    let (qsd, ours) = start_pair(&disk_with_data, RAW_PEER_ARGS);
    let mut transcripts = Vec::new();
    for served in [&qsd, &ours] {
        let mut qmp = served.qmp();
        let mut client = Peer::open_export(&served.socket(), "exp");
        let mut log = Vec::new();
        let mut step = |what: &str, value: String| log.push(format!("{what}: {value}"));

        let reply = qmp.execute("block-export-del", Some(json!({"id": "e0"})));
        step(
            "safe del",
            reply.map_or_else(|e| e.to_string(), |r| r["error"].to_string()),
        );
        step("exports", exports_of(&mut qmp));
        step(
            "read",
            format!("{:?}", client.read(1, 1 << 20, 8).map(|d| hex(&d))),
        );
        let reply = qmp.execute_ok(
            "block-export-del",
            Some(json!({"id": "e0", "mode": "hard"})),
        );
        step(
            "hard del",
            reply.map_or_else(|e| e.to_string(), |r| r.to_string()),
        );
        let mut events = qmp.take_events();
        let deadline = Instant::now() + PATIENCE;
        while events.is_empty() && Instant::now() < deadline {
            match qmp.read_message() {
                Ok(message) => events.push(message),
                Err(e) => {
                    step("waiting for the event", e.to_string());
                    break;
                }
            }
        }
        for mut event in events {
            event["timestamp"] = json!("masked");
            step("event", event.to_string());
        }
        step(
            "read",
            format!("{:?}", client.read(2, 0, 8).map(|d| hex(&d))),
        );
        step("exports", exports_of(&mut qmp));
        transcripts.push(log.join("\n"));
    }
    assert_eq!(transcripts[1], transcripts[0], "against qsd");
    assert_eq!(transcripts[1], EXPECTED_DEL);
}

/// query-block-exports, as JSON text or the error.
fn exports_of(qmp: &mut QmpConnection) -> String {
    qmp.execute_ok("query-block-exports", None)
        .map_or_else(|e| e.to_string(), |v| v.to_string())
}

/// What a client and QMP see around `block-export-del` (qsd 10.0.2).
const EXPECTED_DEL: &str = r#"safe del: {"class":"GenericError","desc":"export 'e0' still in use"}
exports: [{"node-name":"raw0","shutting-down":false,"type":"nbd","id":"e0"}]
read: Ok("5a5a5a5a5a5a5a5a")
hard del: {}
event: {"timestamp":"masked","event":"BLOCK_EXPORT_DELETED","data":{"id":"e0"}}
read: Err("closed")
exports: []"#;

/// qsd's stderr after the four deterministic bad peers, program name masked.
const BAD_PEER_STDERR: &str = "<prog>: option negotiation failed: Bad magic received
<prog>: option negotiation failed: len (4294967280) is larger than max len (33554432)
<prog>: option negotiation failed: Unexpected end-of-file before all data were read
<prog>: Disconnect client, due to: Failed to read CMD_WRITE data: Unexpected end-of-file before all data were read
";

#[test]
fn bad_peers_are_reported_on_stderr_with_qsd_texts() {
    let served = Served::start(under_test(), &disk_with_data, RAW_PEER_ARGS);
    let peers: [BadPeer; 4] = [
        wrong_magic,
        oversized_option_length,
        truncated_option_then_close,
        vanish_in_a_write_payload,
    ];
    let mut stderr = String::new();
    for (n, bad) in peers.iter().enumerate() {
        bad(&served.socket());
        // Reported asynchronously: wait for this peer's line before the next peer, so the
        // order is fixed.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            stderr = bulkhead_systests::daemon::mask_program_output(
                &served.daemon.stderr(),
                served.daemon.dir(),
                served.daemon.program(),
            );
            if stderr.lines().count() > n || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(stderr, BAD_PEER_STDERR);
}

// ---------------------------------------------------------------------------------------
// Errors clients see

/// The same client command against both daemons, whatever its exit status; returns
/// (qsd's, ours) as `status` + stdout + stderr with the temp dir masked.
fn both_any(qsd: &Served, ours: &Served, program: &str, args: &[&str]) -> (String, String) {
    let one = |s: &Served| {
        let args: Vec<String> = args
            .iter()
            .map(|a| match a.strip_prefix("{URI:") {
                Some(rest) => s.uri(rest.trim_end_matches('}')),
                None => a.to_string(),
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = run(program, &args);
        s.mask(&format!(
            "{}\n{}{}",
            output.status,
            without_timings(&String::from_utf8_lossy(&output.stdout)),
            String::from_utf8_lossy(&output.stderr)
        ))
        .replace(&*s.socket().to_string_lossy(), "$SOCK")
    };
    (one(qsd), one(ours))
}

#[test]
fn clients_see_qsd_errors_for_read_only_writes_and_requests_past_the_end() {
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=ero,node-name=raw0,name=ro",
        "--export",
        "type=nbd,id=erw,node-name=raw0,name=rw,writable=on",
    ];
    let (qsd, ours) = start_pair(&disk_with_data, &args);
    let cases: &[&[&str]] = &[
        &["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", "{URI:ro}"],
        &["qemu-io", "-f", "raw", "-c", "write -z 0 4k", "{URI:ro}"],
        &["qemu-io", "-f", "raw", "-c", "discard 0 4k", "{URI:ro}"],
        &["qemu-io", "-f", "raw", "-c", "write -P 1 4M 4k", "{URI:rw}"],
        &["qemu-io", "-f", "raw", "-c", "read 4194300 8", "{URI:rw}"],
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -z 4190208 8k",
            "{URI:rw}",
        ],
        &["qemu-img", "info", "--output=json", "{URI:ro}"],
        &["nbdinfo", "--json", "{URI:nosuch}"],
        &["nbdinfo", "--list", "--json", "{URI:}"],
    ];
    for case in cases {
        let (theirs, mine) = both_any(&qsd, &ours, case[0], &case[1..]);
        assert_eq!(mine, theirs, "{case:?}");
    }
}

#[test]
fn raw_requests_that_must_fail_get_qsd_error_codes() {
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=ero,node-name=raw0,name=ro",
        "--export",
        "type=nbd,id=erw,node-name=raw0,name=rw,writable=on",
    ];
    let (qsd, ours) = start_pair(&disk_with_data, &args);
    let with_payload = |mut header: Vec<u8>, payload: usize| {
        header.extend(std::iter::repeat_n(0x61u8, payload));
        header
    };
    // (what, export, request, data bytes expected on success, qsd's outcome and whether
    // the connection still serves a read afterwards)
    let cases: Vec<(&str, &str, Vec<u8>, usize, &str)> = vec![
        (
            "write to a read-only export",
            "ro",
            with_payload(request(CMD_WRITE, 1, 0, 512), 512),
            0,
            r#"Err("error 22") then Ok("0000000000000000")"#,
        ),
        (
            "write zeroes to a read-only export",
            "ro",
            request(6, 2, 0, 512),
            0,
            r#"Err("error 22") then Ok("0000000000000000")"#,
        ),
        (
            "trim on a read-only export",
            "ro",
            request(4, 3, 0, 512),
            0,
            r#"Err("error 22") then Ok("0000000000000000")"#,
        ),
        (
            "read crossing the end",
            "rw",
            request(CMD_READ, 4, 4194300, 8),
            8,
            r#"Err("error 22") then Ok("0000000000000000")"#,
        ),
        (
            "read starting past the end",
            "rw",
            request(CMD_READ, 5, 8 << 20, 8),
            8,
            r#"Err("error 22") then Ok("0000000000000000")"#,
        ),
        (
            "write crossing the end",
            "rw",
            with_payload(request(CMD_WRITE, 6, 4194300, 8), 8),
            0,
            r#"Err("error 22") then Ok("0000000000000000")"#,
        ),
        (
            "zero-length read",
            "rw",
            request(CMD_READ, 7, 0, 0),
            0,
            r#"Ok("") then Ok("0000000000000000")"#,
        ),
        (
            "flush",
            "rw",
            request(3, 8, 0, 0),
            0,
            r#"Ok("") then Ok("0000000000000000")"#,
        ),
        (
            "cache",
            "rw",
            request(5, 9, 0, 4096),
            0,
            r#"Ok("") then Ok("0000000000000000")"#,
        ),
        (
            "block status without a negotiated context",
            "rw",
            request(7, 10, 0, 4096),
            0,
            r#"Err("error 22") then Ok("0000000000000000")"#,
        ),
        (
            "unknown command 99",
            "rw",
            request(99, 11, 0, 512),
            0,
            r#"Err("error 22") then Ok("0000000000000000")"#,
        ),
        (
            "read of 32 MiB + 1",
            "rw",
            request(CMD_READ, 12, 0, (32 << 20) + 1),
            0,
            r#"Err("error 22") then Ok("0000000000000000")"#,
        ),
    ];
    for (what, export, bytes, data, expected) in &cases {
        let outcome = |s: &Served| {
            let mut peer = Peer::open_export(&s.socket(), export);
            let first = peer.command(bytes.clone(), *data).map(|d| hex(&d));
            // Whether the connection survived the request.
            let after = peer.read(100, 0, 8).map(|d| hex(&d));
            format!("{first:?} then {after:?}")
        };
        let (theirs, mine) = (outcome(&qsd), outcome(&ours));
        assert_eq!(mine, theirs, "{what}");
        assert_eq!(&mine, expected, "{what}");
    }
}

// ---------------------------------------------------------------------------------------
// Option haggling

/// Data of NBD_OPT_INFO/GO: export name, then information requests.
fn go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut data = u32::try_from(export.len())
        .unwrap_or(0)
        .to_be_bytes()
        .to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&u16::try_from(infos.len()).unwrap_or(0).to_be_bytes());
    for info in infos {
        data.extend_from_slice(&info.to_be_bytes());
    }
    data
}

/// Data of NBD_OPT_LIST/SET_META_CONTEXT: export name, then queries.
fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = u32::try_from(export.len())
        .unwrap_or(0)
        .to_be_bytes()
        .to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&u32::try_from(queries.len()).unwrap_or(0).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&u32::try_from(query.len()).unwrap_or(0).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}

/// qsd's NBD_OPT_LIST answer for exports `exp` ("hello world") and `null`, then the ACKs
/// of LIST and ABORT.
const LIST_REPLIES: &str = concat!(
    "0003e889045565a9000000030000000200000012",
    "00000003",
    "657870",
    "68656c6c6f20776f726c64",
    "0003e889045565a9000000030000000200000008",
    "00000004",
    "6e756c6c",
    "0003e889045565a9000000030000000100000000",
    "0003e889045565a9000000020000000100000000",
);

#[test]
fn option_haggling_transcripts_equal_qsd() {
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--blockdev",
        "driver=null-co,node-name=null0,size=8388608",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=raw0,name=exp,writable=on,description=hello world,allocation-depth=on",
        "--export",
        "type=nbd,id=e1,node-name=null0,name=null",
    ];
    let (qsd, ours) = start_pair(&disk_with_data, &args);
    const LIST: u32 = 3;
    const STARTTLS: u32 = 5;
    const INFO: u32 = 6;
    const STRUCTURED: u32 = 8;
    const LIST_META: u32 = 9;
    const SET_META: u32 = 10;
    const EXTENDED: u32 = 11;
    let sessions: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("list", vec![option(LIST, b"")]),
        ("list with data", vec![option(LIST, b"abcd")]),
        (
            "info with every request",
            vec![option(INFO, &go_data("exp", &[0, 1, 2, 3]))],
        ),
        (
            "info of the null export",
            vec![option(INFO, &go_data("null", &[1, 2]))],
        ),
        (
            "info of an unknown export",
            vec![option(INFO, &go_data("nosuch", &[]))],
        ),
        (
            "info of the empty name",
            vec![option(INFO, &go_data("", &[]))],
        ),
        (
            "info with a short body",
            vec![option(INFO, b"\x00\x00\x00\x09exp")],
        ),
        (
            "info with an unknown request",
            vec![option(INFO, &go_data("exp", &[77]))],
        ),
        ("starttls without tls", vec![option(STARTTLS, b"")]),
        (
            "structured twice",
            vec![option(STRUCTURED, b""), option(STRUCTURED, b"")],
        ),
        ("structured with data", vec![option(STRUCTURED, b"x")]),
        (
            "extended headers then structured",
            vec![option(EXTENDED, b""), option(STRUCTURED, b"")],
        ),
        (
            "set meta context before structured",
            vec![option(SET_META, &meta_data("exp", &["base:allocation"]))],
        ),
        (
            "list meta contexts, all",
            vec![
                option(STRUCTURED, b""),
                option(LIST_META, &meta_data("exp", &[])),
            ],
        ),
        (
            "list meta contexts by namespace",
            vec![
                option(STRUCTURED, b""),
                option(LIST_META, &meta_data("exp", &["qemu:", "base:", "x:"])),
            ],
        ),
        (
            "set meta contexts, some unknown",
            vec![
                option(STRUCTURED, b""),
                option(
                    SET_META,
                    &meta_data(
                        "exp",
                        &[
                            "base:allocation",
                            "qemu:allocation-depth",
                            "qemu:dirty-bitmap:nosuch",
                            "bogus:thing",
                        ],
                    ),
                ),
            ],
        ),
        (
            "set meta context on the export without depth",
            vec![
                option(EXTENDED, b""),
                option(
                    SET_META,
                    &meta_data("null", &["qemu:allocation-depth", "base:allocation"]),
                ),
            ],
        ),
        (
            "set meta context of an unknown export",
            vec![
                option(STRUCTURED, b""),
                option(SET_META, &meta_data("nosuch", &["base:allocation"])),
            ],
        ),
        ("abort with data", vec![option(OPT_ABORT, b"xy")]),
        (
            "go with name and description requests",
            vec![option(OPT_GO, &go_data("exp", &[1, 2]))],
        ),
        ("export name", vec![option(1, b"exp")]),
    ];
    for (what, options) in &sessions {
        let transcript = |s: &Served| {
            let mut peer = Peer::connect(&s.socket());
            for o in options {
                peer.send(o);
            }
            // Ends the haggling unless an option already did (GO, EXPORT_NAME); then EOF
            // ends transmission, so every session ends with the server hanging up.
            let _ = peer.stream.write_all(&option(OPT_ABORT, b""));
            let _ = peer.stream.shutdown(std::net::Shutdown::Write);
            peer.drain_to_close()
        };
        let (theirs, mine) = (transcript(&qsd), transcript(&ours));
        assert_eq!(mine, theirs, "{what}");
        if *what == "list" {
            assert_eq!(mine.bytes, LIST_REPLIES, "{what}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Server limits and life cycle

#[test]
fn with_max_connections_one_a_second_client_gets_its_go_ack_when_the_first_leaves() {
    let args = nbdinfo_args(
        ",max-connections=1",
        "type=nbd,id=e0,node-name=raw0,name=exp,writable=on",
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (qsd, ours) = start_pair(&disk_with_data, &args);
    let mut results = Vec::new();
    for served in [&qsd, &ours] {
        let first = Peer::open_export(&served.socket(), "exp");
        // The second sends its flags and GO without waiting for the greeting.
        let mut second = Peer::connect_silently(&served.socket());
        let mut go = CLIENT_FLAGS.to_be_bytes().to_vec();
        go.extend_from_slice(&option(OPT_GO, &go_data("exp", &[])));
        second.send(&go);
        let early = second.drain();
        drop(first);
        let late = second.drain();
        let read = second.read(1, 0, 512).map(|d| hex(&d));
        results.push((early, late, read));
    }
    let [(qsd_early, qsd_late, qsd_read), (early, late, read)] = &results[..] else {
        unreachable!("two daemons");
    };
    // qsd leaves the second in the listen backlog: it hears nothing until the
    // first leaves. Here it is greeted and negotiates at once, and only GO's final
    // ACK waits for the slot: the same bytes, in the same order, with the same pause
    // before the ACK (which is the last 20 bytes, 40 hex digits).
    assert_eq!(
        qsd_early.bytes, "",
        "qsd: nothing while the first is attached"
    );
    assert_eq!(qsd_early.ending, Ending::Silent);
    assert_eq!(early.ending, Ending::Silent);
    assert_eq!(late.ending, Ending::Silent);
    assert_eq!(
        format!("{}{}", early.bytes, late.bytes),
        format!("{}{}", qsd_early.bytes, qsd_late.bytes),
        "the same bytes in all"
    );
    assert_eq!(late.bytes.len(), 40, "only the ACK waited: {late:?}");
    assert_eq!(
        late.bytes,
        format!("{REPLY_MAGIC:016x}{OPT_GO:08x}{REP_ACK:08x}00000000")
    );
    assert_eq!(read, qsd_read, "then served alike");
    assert!(read.is_ok(), "{read:?}");
}

/// Waits for the next event (or returns the error text).
fn next_event(qmp: &mut QmpConnection) -> String {
    let mut events = qmp.take_events();
    if events.is_empty() {
        match qmp.read_message() {
            Ok(message) => events.push(message),
            Err(e) => return e.to_string(),
        }
    }
    events
        .into_iter()
        .map(|mut e| {
            e["timestamp"] = json!("masked");
            e.to_string()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn nbd_server_stop_disconnects_clients_and_a_restarted_server_serves_again_like_qsd() {
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
    ];
    let (qsd, ours) = start_pair(&disk_with_data, &args);
    let mut logs = Vec::new();
    for served in [&qsd, &ours] {
        let mut log = Vec::new();
        let mut qmp = served.qmp();
        let socket = served.socket().to_string_lossy().into_owned();
        let start = json!({
            "addr": {"type": "unix", "data": {"path": socket}},
            "handshake-max-seconds": 1
        });
        let add = json!({"type": "nbd", "id": "e0", "node-name": "raw0", "name": "exp"});
        let mut exec = |qmp: &mut QmpConnection, command: &str, arguments: &Value| {
            let reply = qmp.execute(command, Some(arguments.clone()));
            let text = reply.map_or_else(
                |e| e.to_string(),
                |mut r| {
                    if let Some(map) = r.as_object_mut() {
                        map.remove("id");
                    }
                    r.to_string()
                },
            );
            log.push(format!("{command}: {text}"));
        };
        exec(&mut qmp, "nbd-server-start", &start);
        exec(&mut qmp, "block-export-add", &add);
        let mut client = Peer::open_export(&served.socket(), "exp");
        let mut idle = Peer::connect(&served.socket());
        exec(&mut qmp, "nbd-server-stop", &json!({}));
        let event = next_event(&mut qmp);
        let read = client.read(1, 1 << 20, 8).map(|d| hex(&d));
        let idle = idle.drain_to_close();
        exec(&mut qmp, "query-block-exports", &json!({}));
        exec(&mut qmp, "nbd-server-start", &start);
        exec(&mut qmp, "block-export-add", &add);
        let mut again = Peer::open_export(&served.socket(), "exp");
        let read_again = again.read(2, 1 << 20, 8).map(|d| hex(&d));
        // A client that never negotiates is dropped after handshake-max-seconds.
        let mut silent = Peer::connect(&served.socket());
        let started = Instant::now();
        let transcript = silent.drain_within(Duration::from_secs(10));
        let waited = started.elapsed();
        log.push(format!("event: {event}"));
        log.push(format!("read after stop: {read:?}"));
        log.push(format!("handshaking client after stop: {idle:?}"));
        log.push(format!("read after restart: {read_again:?}"));
        log.push(format!("silent client: {transcript:?}"));
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(8),
            "{}: the silent client was dropped after {waited:?}, expected about 1 s",
            served.name()
        );
        logs.push(log.join("\n"));
    }
    assert_eq!(logs[1], logs[0], "against qsd");
    assert_eq!(logs[1], EXPECTED_STOP);
}

/// What QMP and clients see around nbd-server-stop and a restart (qsd 10.0.2).
const EXPECTED_STOP: &str = r#"nbd-server-start: {"return":{}}
block-export-add: {"return":{}}
nbd-server-stop: {"return":{}}
query-block-exports: {"return":[]}
nbd-server-start: {"return":{}}
block-export-add: {"return":{}}
event: {"timestamp":"masked","event":"BLOCK_EXPORT_DELETED","data":{"id":"e0"}}
read after stop: Err("closed")
handshaking client after stop: Transcript { bytes: "", ending: Closed }
read after restart: Ok("5a5a5a5a5a5a5a5a")
silent client: Transcript { bytes: "", ending: Closed }"#;

/// What QMP, a client and the process show when `quit` runs with a client connected.
/// qsd emits BLOCK_EXPORT_DELETED before the reply to `quit`.
const EXPECTED_QUIT: &str = r#"quit: Ok("{}")
then: before the reply: {"timestamp":"masked","event":"BLOCK_EXPORT_DELETED","data":{"id":"e0"}}
read: Err("closed")
exit: Ok(Some("exit status: 0"))"#;

#[test]
fn quit_with_a_client_connected_ends_the_daemon_and_the_connection() {
    let (mut qsd, mut ours) = start_pair(&disk_with_data, RAW_PEER_ARGS);
    let mut logs = Vec::new();
    for served in [&mut qsd, &mut ours] {
        let mut qmp = served.qmp();
        let mut client = Peer::open_export(&served.socket(), "exp");
        let reply = qmp.execute_ok("quit", None).map(|v| v.to_string());
        let mut rest: Vec<String> = qmp
            .take_events()
            .into_iter()
            .map(|mut v| {
                v["timestamp"] = json!("masked");
                format!("before the reply: {v}")
            })
            .collect();
        match qmp.read_to_eof(PATIENCE) {
            Ok(lines) => {
                for line in lines {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    match serde_json::from_str::<Value>(&text) {
                        Ok(mut v) => {
                            v["timestamp"] = json!("masked");
                            rest.push(v.to_string());
                        }
                        Err(_) => rest.push(text),
                    }
                }
            }
            Err(e) => rest.push(e.to_string()),
        }
        let read = client.read(1, 0, 8).map(|d| hex(&d));
        let exit = served
            .daemon
            .wait_exit(PATIENCE)
            .map(|s| s.map(|s| s.to_string()));
        logs.push(format!(
            "quit: {reply:?}\nthen: {}\nread: {read:?}\nexit: {exit:?}",
            rest.join(" ")
        ));
    }
    assert_eq!(logs[1], logs[0], "against qsd");
    assert_eq!(logs[1], EXPECTED_QUIT);
}

// ---------------------------------------------------------------------------------------
// Worker crashes (bulkhead only: qsd has no workers)

/// The pid of the supervisor's `bulkhead worker --kind <kind>` child, waiting up to
/// [`PATIENCE`] for one (a restarted worker needs a moment), other than `not`.
fn worker_pid(supervisor: u32, kind: &str, not: Option<u32>) -> Option<u32> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = bulkhead_systests::procs::children(supervisor)
            .into_iter()
            .find(|p| {
                p.state != 'Z'
                    && Some(p.pid) != not
                    && p.argv
                        .get(1..4)
                        .is_some_and(|a| a == ["worker", "--kind", kind])
            })
            .map(|p| p.pid);
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_of_the_driver_worker_is_invisible_to_a_connected_client_and_of_the_nbd_worker_needs_a_reconnect()
 {
    if under_test() == DaemonKind::Qsd {
        eprintln!("qsd has no worker processes; nothing to test");
        return;
    }
    let s = Served::start(DaemonKind::Bulkhead, &disk_with_data, RAW_PEER_ARGS);
    let supervisor = s.daemon.pid();
    let mut client = Peer::open_export(&s.socket(), "exp");
    let write = with_payload_of(request(CMD_WRITE, 1, 0, 4096), 4096, 0x6b);
    assert_eq!(
        client.command(write, 0),
        Ok(Vec::new()),
        "write before the kill"
    );
    assert_eq!(
        client.command(request(3, 2, 0, 0), 0),
        Ok(Vec::new()),
        "flush"
    );

    let Some(raw) = worker_pid(supervisor, "raw", None) else {
        panic!("no raw worker; stderr:\n{}", s.daemon.stderr());
    };
    if let Err(e) = bulkhead_systests::procs::send_signal(raw, libc::SIGKILL) {
        panic!("cannot kill the raw worker {raw}: {e}");
    }
    let restarted = worker_pid(supervisor, "raw", Some(raw));
    assert!(restarted.is_some(), "the raw worker was restarted");
    assert_eq!(
        client.read(3, 0, 4096),
        Ok(vec![0x6b; 4096]),
        "a client connected across a raw worker restart; stderr:\n{}",
        s.daemon.stderr()
    );
    assert_eq!(
        client.read(4, 1 << 20, 4096),
        Ok(vec![0x5a; 4096]),
        "the second read across a raw worker restart"
    );

    let Some(nbd) = worker_pid(supervisor, "nbd", None) else {
        panic!("no nbd worker; stderr:\n{}", s.daemon.stderr());
    };
    if let Err(e) = bulkhead_systests::procs::send_signal(nbd, libc::SIGKILL) {
        panic!("cannot kill the nbd worker {nbd}: {e}");
    }
    assert_eq!(
        client.read(5, 0, 8),
        Err("closed".to_string()),
        "the connection of a killed nbd worker"
    );
    assert!(
        worker_pid(supervisor, "nbd", Some(nbd)).is_some(),
        "the nbd worker was restarted"
    );
    let mut again = Peer::open_export(&s.socket(), "exp");
    assert_eq!(again.read(6, 0, 4096), Ok(vec![0x6b; 4096]), "a new client");
    let mut qmp = s.qmp();
    assert_eq!(
        qmp.execute_ok("query-block-exports", None).ok(),
        Some(json!([{"node-name": "raw0", "shutting-down": false, "type": "nbd", "id": "e0"}]))
    );
}

/// `header` followed by `length` bytes of `byte`.
fn with_payload_of(mut header: Vec<u8>, length: usize, byte: u8) -> Vec<u8> {
    header.extend(std::iter::repeat_n(byte, length));
    header
}

#[test]
fn fio_verify_passes_while_the_image_worker_is_killed_under_it_twice() {
    if under_test() == DaemonKind::Qsd {
        eprintln!("qsd has no worker processes; nothing to test");
        return;
    }
    let prepare = |dir: &Path| {
        make_image(dir, "disk.img", 64 << 20, &[]);
    };
    let args = [
        "--blockdev",
        "driver=file,node-name=file0,filename=$DIR/disk.img",
        "--blockdev",
        "driver=raw,node-name=raw0,file=file0",
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=e0,node-name=raw0,name=exp,writable=on",
    ];
    let s = Served::start(DaemonKind::Bulkhead, &prepare, &args);
    let supervisor = s.daemon.pid();
    let uri = format!("--uri={}", s.uri("exp"));
    // Rate-limited so that the write phase lasts about 2 s and the kills land inside it.
    let fio = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--size=64M",
            "--rate=32m",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // Otherwise fio leaves *-verify.state files in the working directory.
            "--verify_state_save=0",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut fio = match fio {
        Ok(child) => Children(vec![(0, child)]),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            panic!("fio is not installed (install {})", package_of("fio"))
        }
        Err(e) => panic!("cannot start fio: {e}"),
    };
    // The raw node's file child lives in the raw worker, so that one process holds the
    // whole image; it is killed twice (the second time, its replacement).
    let mut last = None;
    for kind in ["raw", "raw"] {
        thread::sleep(Duration::from_millis(500));
        let Some(pid) = worker_pid(supervisor, kind, last) else {
            panic!("no {kind} worker; stderr:\n{}", s.daemon.stderr());
        };
        let running = fio
            .0
            .first_mut()
            .map(|(_, c)| matches!(c.try_wait(), Ok(None)));
        assert_eq!(
            running,
            Some(true),
            "fio still runs when the {kind} worker is killed"
        );
        if let Err(e) = bulkhead_systests::procs::send_signal(pid, libc::SIGKILL) {
            panic!("cannot kill the {kind} worker {pid}: {e}");
        }
        last = Some(pid);
    }
    let Some((_, child)) = fio.0.pop() else {
        panic!("fio vanished from its guard");
    };
    let output = match child.wait_with_output() {
        Ok(output) => output,
        Err(e) => panic!("waiting for fio: {e}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let errors: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("3;"))
        .map(|l| l.split(';').nth(4).unwrap_or("missing"))
        .collect();
    assert!(
        output.status.success() && errors == ["0"],
        "fio across worker restarts ({}): errors {errors:?}\n{stdout}{}\ndaemon stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        s.daemon.stderr()
    );
}

// ---------------------------------------------------------------------------------------
// Start-up

#[test]
fn a_client_connecting_as_soon_as_the_socket_exists_finds_the_command_line_export() {
    const ROUNDS: usize = 20;
    let kind = under_test();
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let dir = match TempDir::new(&format!("bulkhead-nbd-early-{}", kind.name())) {
            Ok(dir) => dir,
            Err(e) => panic!("{e}"),
        };
        make_image(dir.path(), "disk.img", 4 << 20, &[]);
        let args: Vec<String> = RAW_PEER_ARGS.iter().map(|a| a.to_string()).collect();
        // No monitor: the NBD socket is the first thing the daemon creates.
        let daemon = match Daemon::start_in(kind, dir, 0, &args, &[]) {
            Ok(daemon) => daemon,
            Err(e) => panic!("{e}"),
        };
        let socket = daemon.dir().join(NBD_SOCKET);
        let deadline = Instant::now() + PATIENCE;
        while !socket.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_micros(200));
        }
        // qsd may create the socket before the export, but serves no client before its
        // whole command line has run; the client waits in the listen backlog meanwhile.
        if let Err(e) = Peer::try_open_export(&socket, "exp") {
            failures.push(format!("round {round}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ROUNDS} early clients of {} were refused:\n{}",
        failures.len(),
        kind.name(),
        failures.join("\n")
    );
}
