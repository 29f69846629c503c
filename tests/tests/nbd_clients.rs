//! The real bulkhead binary serving NBD to real clients (nbdinfo, qemu-img, qemu-io,
//! nbdcopy) and to hand-made bad peers, with qemu-storage-daemon 10.0.2 run with the same
//! command line on an identical image as the oracle.
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
        while !socket.exists() {
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
fn qemu_img_map_and_nbdinfo_map_equal_qsd_on_a_sparse_image() {
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
        "--nbd-server",
        "addr.type=unix,addr.path=$DIR/nbd.sock",
        "--export",
        "type=nbd,id=efile,node-name=file0,name=file,allocation-depth=on",
        "--export",
        "type=nbd,id=eraw,node-name=raw0,name=raw,allocation-depth=on",
        "--export",
        "type=nbd,id=eoff,node-name=off0,name=off,allocation-depth=on",
    ];
    let (qsd, ours) = start_pair(&prepare, &args);
    for export in ["file", "raw", "off"] {
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
    let prepare = |dir: &Path| {
        make_image(dir, "disk.img", 8 << 20, &["write -P 0xee 0 8M"]);
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
