//! The real `qemu.qmp` Python client library against the daemon under test
//! (bulkhead, or qsd with `BULKHEAD_DIFF_AGAINST=qsd`): runs
//! `python3 tests/python/test_qemu_qmp.py <socket>` and asserts it succeeds and the daemon
//! exits 0 after its `quit`. And `tests/python/test_qmp_server_mode.py`: `QMPClient` in
//! server mode (`start_server`, `accept`), the daemon connecting out to it through a
//! client-mode monitor.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bulkhead_systests::{Daemon, DaemonKind};

#[test]
fn qemu_qmp_library_negotiates_queries_adds_a_node_gets_exact_errors_and_quits() {
    let kind = match DaemonKind::under_test() {
        Ok(kind) => kind,
        Err(e) => panic!("{e}"),
    };
    let mut daemon = match Daemon::start(kind, 1, &[]) {
        Ok(daemon) => daemon,
        Err(e) => panic!("{e}"),
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_qemu_qmp.py");
    let socket = daemon
        .qmp_socket(0)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let output = Command::new("python3").arg(&script).arg(&socket).output();
    let output = match output {
        Ok(output) => output,
        Err(e) => panic!("cannot run python3 {}: {e}", script.display()),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} against {}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}\ndaemon stderr:\n{}",
        script.display(),
        kind.name(),
        output.status,
        daemon.stderr()
    );
    assert_eq!(stdout, "qemu.qmp checks passed\n");
    let exit = daemon.wait_exit(Duration::from_secs(20));
    assert_eq!(
        exit.ok().flatten().map(|s| s.code()),
        Some(Some(0)),
        "{} did not exit 0 after quit",
        kind.name()
    );
}

#[test]
fn qemu_qmp_server_mode_accepts_the_daemon_connecting_out() {
    let kind = match DaemonKind::under_test() {
        Ok(kind) => kind,
        Err(e) => panic!("{e}"),
    };
    let program = match kind.program() {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let dir = match bulkhead_systests::TempDir::new("bulkhead-py") {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/test_qmp_server_mode.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(&program)
        .arg(dir.path())
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) => panic!("cannot run python3 {}: {e}", script.display()),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} against {}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        script.display(),
        kind.name(),
        output.status,
    );
    assert_eq!(stdout, "qemu.qmp server-mode checks passed\n");
}
