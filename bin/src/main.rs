//! `bulkhead`: a qemu-storage-daemon compatible block daemon whose subsystems run in
//! sandboxed worker processes.
//!
//! This binary is glue. Run as `bulkhead [qsd options]` it is the supervisor; run as
//! `bulkhead worker --kind KIND --id N` (only the supervisor does that) it is a worker.

mod cli;
mod startup;

use std::process::ExitCode;

use bulkhead_ipc::wire::{WorkerId, WorkerKind};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    init_logging();
    if args.get(1).map(String::as_str) == Some("worker") {
        let flag = |i: usize| args.get(i).map(String::as_str);
        return match (
            flag(2),
            args.get(3).and_then(|k| WorkerKind::parse(k)),
            flag(4),
            args.get(5).and_then(|n| n.parse().ok()),
        ) {
            (Some("--kind"), Some(kind), Some("--id"), Some(id)) if args.len() == 6 => {
                bulkhead_actors::worker::main(kind, WorkerId(id))
            }
            _ => {
                eprintln!(
                    "bulkhead: worker: expected '--kind KIND --id N' (workers are started by the supervisor)"
                );
                ExitCode::FAILURE
            }
        };
    }
    // The supervisor holds a descriptor per monitor client and per image; its
    // workers set their own limits in the sandbox.
    bulkhead_sandbox::raise_nofile_soft_limit();
    startup::main(&args[1..])
}

/// Logs go to stderr; `BULKHEAD_LOG` takes a tracing filter (default: warnings).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colour only on a terminal: logs redirected to a file stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}
