//! qsd's command line, differentially: lines qsd rejects at start-up must be rejected by
//! the daemon under test with the same exit status and the same stderr (program name and
//! temp dir masked); spellings qsd accepts must build the same nodes, compared through
//! `query-named-block-nodes` byte for byte. Options are processed strictly in order, so the
//! error names the first bad option.

use std::fmt::Write as _;
use std::time::Duration;

use bulkhead_systests::daemon::run_to_exit;
use bulkhead_systests::{DaemonKind, Script, Step, differential};

/// How long a rejected command line may take to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// Command lines qsd 10.0.2 rejects (exit 1). Not listed: `size=-5`, which makes qsd abort
/// (a QEMU bug bulkhead need not copy).
const REJECTED: &[&[&str]] = &[
    &["foo"],
    &["--bogus"],
    &["-x"],
    &["--blockdev"],
    &["--monitor"],
    &["--pidfile"],
    &["--blockdev", "driver=null-co,node-name=n,size=1M"],
    &["--blockdev", "driver=null-co,node-name=n,read-zeroes=maybe"],
    &["--blockdev", "driver=null-co,node-name=n,bogus=1"],
    &["--blockdev", "driver=null-co"],
    &["--blockdev", "driver=nosuch,node-name=n"],
    &["--blockdev", "node-name=n,null-co"],
    &["--blockdev", "driver=null-co,,node-name=n"],
    &[
        "--blockdev",
        r#"{"driver":"null-co","node-name":"n","size":"x"}"#,
    ],
    &[
        "--blockdev",
        "driver=null-co,node-name=n",
        "--blockdev",
        "driver=null-co,node-name=n",
    ],
    &[
        "--blockdev",
        "driver=file,node-name=f,filename=$DIR/nonexistent.img",
    ],
    &[
        "--blockdev",
        "driver=raw,node-name=r,file.driver=file,file.filename=$DIR/nonexistent.img",
    ],
    &["--blockdev", "driver=raw,node-name=r,file=nosuch"],
    &["--monitor", "chardev=c0"],
    &[
        "--chardev",
        "socket,path=$DIR/q.sock,server=on,wait=off,id=c0",
        "--monitor",
        "chardev=c0,mode=readline",
    ],
    &[
        "--chardev",
        "socket,path=$DIR/q.sock,server=on,wait=off,id=c0",
        "--chardev",
        "socket,path=$DIR/q2.sock,server=on,wait=off,id=c0",
    ],
    &["--export", "type=nbd,id=e,node-name=n"],
    &[
        "--blockdev",
        "driver=null-co,node-name=n",
        "--export",
        "type=nbd,id=e,node-name=n",
    ],
    &["--nbd-server", "addr.type=unix"],
    // Client-mode chardevs: nobody listens; option clashes.
    &[
        "--chardev",
        "socket,path=$DIR/nobody.sock,id=c0",
        "--monitor",
        "c0",
    ],
    &[
        "--chardev",
        "socket,path=$DIR/nobody.sock,id=c0,reconnect=1,reconnect-ms=100",
    ],
    &[
        "--chardev",
        "socket,path=$DIR/x.sock,id=c0,server=on,wait=off,reconnect=1",
    ],
    &[
        "--chardev",
        "socket,path=$DIR/nobody.sock,id=c0,reconnect=0",
        "--monitor",
        "c0",
    ],
    &["--object", "iothread"],
];

#[test]
fn command_lines_qsd_rejects_fail_with_the_same_status_and_stderr() {
    let tested_kind = match DaemonKind::under_test() {
        Ok(kind) => kind,
        Err(e) => panic!("{e}"),
    };
    let mut report = String::new();
    for (i, case) in REJECTED.iter().enumerate() {
        let args: Vec<String> = case.iter().map(|a| a.to_string()).collect();
        let reference = match run_to_exit(DaemonKind::Qsd, &args, EXIT_WITHIN) {
            Ok(exited) => exited,
            Err(e) => panic!("case {i} {case:?}: qsd: {e}"),
        };
        assert_eq!(
            reference.status, "exit status: 1",
            "case {i} {case:?} is not rejected by qsd: {reference:?}"
        );
        let tested = match run_to_exit(tested_kind, &args, EXIT_WITHIN) {
            Ok(exited) => exited,
            Err(e) => panic!("case {i} {case:?}: {}: {e}", tested_kind.name()),
        };
        if tested != reference {
            let _ = writeln!(
                report,
                "case {i}: {case:?}\n  qsd: {}\n    stderr: {:?}\n    stdout: {:?}\n  {}: {}\n    stderr: {:?}\n    stdout: {:?}",
                reference.status,
                reference.stderr,
                reference.stdout,
                tested_kind.name(),
                tested.status,
                tested.stderr,
                tested.stdout
            );
        }
    }
    assert!(
        report.is_empty(),
        "rejected command lines differ:\n{report}"
    );
}

/// Spellings qsd accepts: keyval booleans beyond on/off, hex sizes, a repeated key (the last
/// wins), the implied `driver` key, JSON syntax, dotted inline children.
const ACCEPTED: &[&[&str]] = &[
    &[
        "--blockdev",
        "driver=null-co,node-name=n,read-zeroes=y,size=0x10000",
    ],
    &[
        "--blockdev",
        "driver=null-co,node-name=n,read-zeroes=yes,size=1024,size=2048",
    ],
    &["--blockdev", "null-co,node-name=n,read-zeroes=off"],
    &[
        "--blockdev",
        r#"{"driver": "null-aio", "node-name": "n", "size": 4096, "latency-ns": 5}"#,
    ],
    &[
        "--blockdev",
        "driver=raw,node-name=r,file.driver=null-co,file.size=8192,file.node-name=c",
    ],
    &[
        "--blockdev",
        "driver=null-co,node-name=n,cache.direct=off,cache.no-flush=on,discard=unmap,detect-zeroes=unmap",
    ],
    &[
        "--blockdev",
        "driver=null-co,node-name=a",
        "--blockdev",
        "driver=raw,node-name=b,file=a,read-only=on",
    ],
];

#[test]
fn command_line_spellings_qsd_accepts_build_the_same_nodes() {
    let mut report = String::new();
    for (i, case) in ACCEPTED.iter().enumerate() {
        let script = Script {
            name: format!("cli-accepted-{i}"),
            monitors: 1,
            args: case.iter().map(|a| a.to_string()).collect(),
            vars: Vec::new(),
            setup: None,
            steps: vec![
                Step::line(r#"{"execute": "qmp_capabilities", "id": 1}"#).note("negotiate"),
                Step::line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}, "id": 2}"#)
                    .note("the nodes the command line built"),
                Step::line(r#"{"execute": "quit", "id": 3}"#).until_eof().note("quit"),
            ],
        };
        if let Err(e) = differential(&script) {
            let _ = writeln!(report, "case {i}: {case:?}\n{e}");
        }
    }
    assert!(report.is_empty(), "{report}");
}
