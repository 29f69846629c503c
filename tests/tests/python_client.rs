//! The real `qemu.qmp` Python client library against the daemon under test
//! (bulkhead, or qsd with `BULKHEAD_DIFF_AGAINST=qsd`): runs
//! `python3 tests/python/test_qemu_qmp.py <socket>` and asserts it succeeds and the daemon
//! exits 0 after its `quit`.

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
