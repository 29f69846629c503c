//! The server driven by real NBD clients (nbdinfo, qemu-io, qemu-img, nbdcopy),
//! with qemu-storage-daemon 10.0.2 serving the same image as the oracle.

mod common;

use bulkhead_nbd::ServerConfig;
use common::*;

/// nbdinfo's JSON with the socket path (which differs) normalised away.
fn nbdinfo(args: &[&str], sock: &std::path::Path) -> String {
    run("nbdinfo", args).replace(sock.to_str().unwrap(), "SOCK")
}

fn compare_nbdinfo(
    export_opts: &str,
    server_opts: &str,
    writable: bool,
    desc: Option<&str>,
    depth: bool,
    max_conn: u32,
) {
    let ours = Server::start(ServerConfig {
        max_connections: max_conn,
        ..ServerConfig::default()
    });
    let img = ours.dir.path("img");
    make_image(&img, 4 << 20, &["write -P 0x5a 1M 64k"]);
    ours.export("exp", &img, writable, desc, depth);
    let qsd = Qsd::start(&ours.dir, &img, export_opts, server_opts);
    for args in [
        vec!["--json", &ours.uri("exp")],
        vec!["--list", "--json", &ours.uri("")],
    ] {
        let ours_out = nbdinfo(&args, &ours.sock);
        let qsd_args: Vec<String> = args
            .iter()
            .map(|a| a.replace(ours.sock.to_str().unwrap(), qsd.sock.to_str().unwrap()))
            .collect();
        let qsd_args: Vec<&str> = qsd_args.iter().map(String::as_str).collect();
        let qsd_out = nbdinfo(&qsd_args, &qsd.sock);
        assert_eq!(ours_out, qsd_out, "nbdinfo {args:?} differs from qsd");
    }
}

#[test]
fn nbdinfo_json_matches_qsd_for_a_writable_export_with_description_and_depth() {
    compare_nbdinfo(
        "name=exp,writable=on,description=hello world,allocation-depth=on",
        "",
        true,
        Some("hello world"),
        true,
        100,
    );
}

#[test]
fn nbdinfo_json_matches_qsd_for_a_read_only_export() {
    compare_nbdinfo("name=exp", "", false, None, false, 100);
}

#[test]
fn nbdinfo_json_matches_qsd_with_one_connection_allowed() {
    compare_nbdinfo(
        "name=exp,writable=on",
        "max-connections=1",
        true,
        None,
        false,
        1,
    );
}

#[test]
fn qemu_io_writes_and_reads_patterns_with_fua_zero_discard_and_flush() {
    let s = Server::start(ServerConfig::default());
    let img = s.dir.path("img");
    make_image(&img, 8 << 20, &[]);
    s.export("exp", &img, true, None, false);
    let uri = s.uri("exp");
    let io = |cmds: &[&str]| {
        let mut args = vec!["-f", "raw"];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(&uri);
        let out = run("qemu-io", &args);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert!(!out.contains("failed"), "{out}");
        out
    };
    io(&[
        "write -P 0x11 0 64k",
        "write -f -P 0x22 64k 64k",
        "write -z 128k 64k",
        "write -z -u -f 4M 1M",
        "write -P 0x33 192k 1M",
        "discard 256k 64k",
        "flush",
    ]);
    io(&[
        "read -P 0x11 0 64k",
        "read -P 0x22 64k 64k",
        "read -P 0 128k 64k",
        "read -P 0x33 320k 896k",
        "read -P 0 256k 64k",
        "read -P 0 4M 1M",
    ]);
    // The data really reached the file.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x22 64k 64k",
            img.to_str().unwrap(),
        ],
    );
    assert!(out.contains("read 65536/65536 bytes"), "{out}");
    // A write beyond the end fails cleanly and the connection stays usable.
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 1 8M 4k",
            "-c",
            "read -P 0x11 0 4k",
            &uri,
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("read 4096/4096 bytes"), "{text}");
}

#[test]
fn qemu_img_map_matches_qsd_on_a_sparse_file() {
    let s = Server::start(ServerConfig::default());
    let img = s.dir.path("img");
    make_image(
        &img,
        16 << 20,
        &[
            "write -P 1 0 64k",
            "write -P 2 1M 3M",
            "write -P 3 15M 512k",
        ],
    );
    s.export("exp", &img, false, None, true);
    let qsd = Qsd::start(&s.dir, &img, "name=exp,allocation-depth=on", "");
    let ours = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &s.uri("exp")],
    );
    let theirs = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &qsd.uri("exp")],
    );
    assert_eq!(ours, theirs);
    assert!(ours.contains("\"data\": true"), "{ours}");
    for ctx in ["base:allocation", "qemu:allocation-depth"] {
        let m = format!("--map={ctx}");
        let ours = run("nbdinfo", &[&m, &s.uri("exp")]);
        let theirs = run("nbdinfo", &[&m, &qsd.uri("exp")]);
        assert_eq!(ours, theirs, "{ctx}");
    }
    // REQ_ONE (nbdinfo --map --totals would not use it; qemu-img map with
    // a small start/length uses block status windows).
    let ours = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--start-offset=1M",
            "--max-length=2M",
            "-f",
            "raw",
            &s.uri("exp"),
        ],
    );
    let theirs = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "--start-offset=1M",
            "--max-length=2M",
            "-f",
            "raw",
            &qsd.uri("exp"),
        ],
    );
    assert_eq!(ours, theirs);
}

fn same_file(a: &std::path::Path, b: &std::path::Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(x.len(), y.len());
    assert!(x == y, "contents differ");
}

#[test]
fn nbdcopy_and_qemu_img_convert_round_trip_byte_for_byte() {
    let s = Server::start(ServerConfig::default());
    let src = s.dir.path("src");
    make_image(
        &src,
        32 << 20,
        &[
            "write -P 0xa5 0 1M",
            "write -P 0x3c 5M 7M",
            "write -P 0x01 31M 1M",
        ],
    );
    let dst = s.dir.path("dst");
    make_image(&dst, 32 << 20, &["write -P 0xff 0 32M"]);
    s.export("src", &src, false, None, false);
    s.export("dst", &dst, true, None, false);

    // Out of the server.
    let out1 = s.dir.path("out1");
    run("nbdcopy", &[&s.uri("src"), out1.to_str().unwrap()]);
    same_file(&src, &out1);
    let out2 = s.dir.path("out2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri("src"),
            out2.to_str().unwrap(),
        ],
    );
    same_file(&src, &out2);

    // Into the server, over data that must be replaced (zeroes included).
    run("nbdcopy", &[src.to_str().unwrap(), &s.uri("dst")]);
    same_file(&src, &dst);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 32M", &s.uri("dst")],
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &s.uri("dst"),
        ],
    );
    same_file(&src, &dst);
    // Server to server.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 32M", &s.uri("dst")],
    );
    run(
        "nbdcopy",
        &["--connections=4", &s.uri("src"), &s.uri("dst")],
    );
    same_file(&src, &dst);
}

#[test]
fn sixty_four_concurrent_clients_each_see_their_own_data() {
    let s = Server::start(ServerConfig::default());
    let img = s.dir.path("img");
    make_image(&img, 64 << 20, &[]);
    s.export("exp", &img, true, None, false);
    let uri = s.uri("exp");
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let off = format!("{}M", i);
                let p = (i + 1).to_string();
                let w = format!("write -P {p} {off} 1M");
                let r = format!("read -P {p} {off} 1M");
                let out = run("qemu-io", &["-f", "raw", "-c", &w, "-c", &r, &uri]);
                assert!(!out.contains("failed"), "{out}");
                assert!(out.contains("read 1048576/1048576 bytes"), "{out}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for i in 0..64u8 {
        let off = format!("{}M", i);
        let r = format!("read -P {} {off} 1M", i + 1);
        let out = run("qemu-io", &["-f", "raw", "-c", &r, img.to_str().unwrap()]);
        assert!(!out.contains("failed"), "{out}");
    }
}
