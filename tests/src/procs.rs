//! Reading the process table from `/proc`: children, argv, liveness, signals.
//!
//! Runs in the test process. Used to check that bulkhead's workers are separate processes
//! and to make sure no daemon outlives its test.

use std::fs;
use std::io;
use std::path::PathBuf;

use rustix::process::{Pid, Signal, kill_process, kill_process_group};

/// One process, as `/proc/<pid>` showed it at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// The state letter from `/proc/<pid>/stat` (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Start time in clock ticks since boot; with the pid it identifies the process even if
    /// the pid is reused later.
    pub start_time: u64,
    /// Its argv (lossily decoded).
    pub argv: Vec<String>,
    /// The target of `/proc/<pid>/exe`, if readable.
    pub exe: Option<PathBuf>,
}

/// Reads `/proc/<pid>`; `None` if the process does not exist (any more).
pub fn proc_info(pid: u32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may itself contain spaces and ')': the fields start after
    // the last ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Field numbers from proc(5): state is 3, ppid 4, starttime 22; fields[0] is field 3.
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    let argv = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|_| !raw.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    // cmdline ends with a NUL, which leaves one empty element after the split.
    let argv = match argv.split_last() {
        Some((last, rest)) if last.is_empty() => rest.to_vec(),
        _ => argv,
    };
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
    Some(ProcInfo {
        pid,
        ppid,
        state,
        start_time,
        argv,
        exe,
    })
}

/// Every process now listed in `/proc`.
pub fn all_processes() -> Vec<ProcInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter_map(proc_info)
        .collect()
}

/// The direct children of `pid`.
pub fn children(pid: u32) -> Vec<ProcInfo> {
    all_processes()
        .into_iter()
        .filter(|p| p.ppid == pid)
        .collect()
}

/// All descendants of `pid` (children, grandchildren, ...).
pub fn descendants(pid: u32) -> Vec<ProcInfo> {
    let all = all_processes();
    let mut found: Vec<ProcInfo> = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for p in all.iter().filter(|p| p.ppid == parent) {
            if !found.iter().any(|f| f.pid == p.pid) {
                frontier.push(p.pid);
                found.push(p.clone());
            }
        }
    }
    found
}

/// True if the process still runs: same pid and start time, and not a zombie.
pub fn is_alive(process: &ProcInfo) -> bool {
    match proc_info(process.pid) {
        Some(now) => now.start_time == process.start_time && now.state != 'Z',
        None => false,
    }
}

fn pid_and_signal(pid: u32, signal: i32) -> io::Result<(Pid, Signal)> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad pid"))?;
    let signal = Signal::from_named_raw(signal)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad signal"))?;
    Ok((pid, signal))
}

/// Sends `signal` to one process.
pub fn send_signal(pid: u32, signal: i32) -> io::Result<()> {
    let (pid, signal) = pid_and_signal(pid, signal)?;
    kill_process(pid, signal).map_err(io::Error::from)
}

/// Sends `signal` to every process of group `pgid`.
pub fn send_signal_to_group(pgid: i32, signal: i32) -> io::Result<()> {
    let (pid, signal) = pid_and_signal(pgid.unsigned_abs(), signal)?;
    kill_process_group(pid, signal).map_err(io::Error::from)
}

/// The pid of `supervisor`'s worker of `kind` (argv `[_, "worker", "--kind", kind]`)
/// other than `not`, waiting up to 20 s for one to appear (a restarted worker takes a
/// moment). Panics with a clear message when none does: for tests only.
pub fn worker_pid(supervisor: u32, kind: &str, not: Option<u32>) -> u32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let found = children(supervisor).into_iter().find(|p| {
            matches!(p.argv.as_slice(), [_, w, f, k, ..] if w == "worker" && f == "--kind" && k == kind)
                && Some(p.pid) != not
        });
        if let Some(p) = found {
            return p.pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no (new) {kind} worker appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_info_of_the_test_process_has_its_own_pid_and_a_parent() {
        let me = std::process::id();
        let info = proc_info(me);
        assert_eq!(info.as_ref().map(|i| i.pid), Some(me));
        assert_eq!(
            info.map(|i| i.ppid),
            Some(std::os::unix::process::parent_id())
        );
    }

    #[test]
    fn a_spawned_child_is_listed_among_children_with_its_exact_argv() {
        let child = std::process::Command::new("sleep").arg("30").spawn();
        let Ok(mut child) = child else {
            panic!("cannot run sleep");
        };
        // Right after fork the child's command line is still empty (it has not
        // exec'd yet): look again until it is set, for a while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let argv = loop {
            let argv = children(std::process::id())
                .iter()
                .find(|p| p.pid == child.id())
                .map(|p| p.argv.clone());
            if argv.as_ref().is_some_and(|a| !a.is_empty()) || std::time::Instant::now() >= deadline
            {
                break argv;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(argv, Some(vec!["sleep".to_string(), "30".to_string()]));
    }
}
