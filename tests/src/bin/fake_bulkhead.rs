//! A stand-in for bulkhead's process layout, used only to check the system tests
//! themselves (`BULKHEAD_BIN=target/debug/fake_bulkhead`) before bulkhead works.
//!
//! As a supervisor it re-executes itself as `<exe> worker --kind <driver>` once per
//! `driver=` named in its `--blockdev` arguments (first key only, no QMP-added nodes), then
//! execs qemu-storage-daemon with its own arguments: the pid stays the same, so the workers
//! remain its children and QMP is qsd's. As a worker it sets PR_SET_PDEATHSIG and sleeps.
//! Handles only arguments from the test harness; not part of bulkhead.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::Duration;

use rustix::process::{Signal, set_parent_process_death_signal};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("worker") {
        if let Err(e) = set_parent_process_death_signal(Some(Signal::KILL)) {
            eprintln!("fake worker: prctl: {e}");
            return ExitCode::FAILURE;
        }
        loop {
            thread::sleep(Duration::from_secs(3600));
        }
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("fake supervisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut kinds: Vec<String> = Vec::new();
    for pair in args.windows(2) {
        if pair[0] == "--blockdev" {
            for option in pair[1].split(',') {
                if let Some(driver) = option.strip_prefix("driver=")
                    && !kinds.iter().any(|k| k == driver)
                {
                    kinds.push(driver.to_string());
                }
            }
        }
    }
    for kind in &kinds {
        if let Err(e) = Command::new(&exe).args(["worker", "--kind", kind]).spawn() {
            eprintln!("fake supervisor: spawning the {kind} worker: {e}");
            return ExitCode::FAILURE;
        }
    }
    let qsd = std::env::var("QSD_BIN").unwrap_or_else(|_| "/usr/bin/qemu-storage-daemon".into());
    let e = Command::new(qsd).args(&args).exec();
    eprintln!("fake supervisor: exec qsd: {e}");
    ExitCode::FAILURE
}
