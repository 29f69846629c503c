//! Processes and scratch files the harness owns, and how they are always cleaned up.
//!
//! Runs in the benchmark harness only. Every daemon and tool is a [`Guarded`] child: its
//! `Drop` terminates it (SIGTERM, then SIGKILL after a grace period) together with any
//! descendants it had, e.g. bulkhead's worker processes. A helper thread turns SIGINT,
//! SIGTERM and SIGHUP into a flag plus SIGTERM to every live child, so the main thread's
//! blocking wait returns, the error path unwinds and the guards run. [`ScratchDir`] removes
//! its directory on drop. Reads `/proc`, which is trusted here.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// Set once a termination signal arrived; every wait loop checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Process ids of the children alive right now, for the signal thread.
static LIVE: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// How long a child gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

/// Process and file errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A program could not be started.
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    /// Waiting for or signalling a child failed.
    #[error("cannot wait for {0}")]
    Wait(String, #[source] std::io::Error),
    /// A program ran longer than its limit and was killed.
    #[error("{0} did not finish within {1:?} and was killed")]
    Timeout(String, Duration),
    /// A termination signal arrived; the run stops and cleans up.
    #[error("interrupted by a signal")]
    Interrupted,
    /// A scratch file could not be made.
    #[error("cannot create {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    /// The signal thread could not be set up.
    #[error("cannot install the signal handler thread: {0}")]
    Signals(String),
}

/// True once SIGINT, SIGTERM or SIGHUP arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once a termination signal arrived.
pub fn check_interrupted() -> Result<(), ProcError> {
    if interrupted() {
        Err(ProcError::Interrupted)
    } else {
        Ok(())
    }
}

/// Starts the thread that turns termination signals into [`interrupted`] plus SIGTERM
/// to every live child. Returns once the handlers are installed, so no signal can
/// arrive in a window where it would kill the harness without cleanup.
pub fn install_signal_thread() -> Result<(), ProcError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || signal_thread(&ready_tx))
        .map_err(|e| ProcError::Signals(e.to_string()))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ProcError::Signals(e)),
        Err(e) => Err(ProcError::Signals(e.to_string())),
    }
}

fn signal_thread(ready: &std::sync::mpsc::Sender<Result<(), String>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    rt.block_on(async {
        let streams = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        );
        let (mut int, mut term, mut hup) = match streams {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("bulkhead-bench: signal received, stopping and cleaning up");
        let pids: Vec<i32> = LIVE
            .lock()
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default();
        for pid in pids {
            signal_pid(pid, Signal::TERM);
        }
    });
}

fn signal_pid(pid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        // The process may be gone already; that is the goal, not an error.
        let _ = kill_process(pid, sig);
    }
}

/// A child process that is terminated, with its descendants, when dropped.
#[derive(Debug)]
pub struct Guarded {
    name: String,
    child: Option<Child>,
}

impl Guarded {
    /// Starts `cmd` with stdin closed and stdout/stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Guarded, ProcError> {
        check_interrupted()?;
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| ProcError::Scratch(log.to_owned(), e))?;
        let err = out
            .try_clone()
            .map_err(|e| ProcError::Scratch(log.to_owned(), e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // Register under the lock the signal thread takes, so a signal between spawn and
        // registration still reaches this child.
        let mut live = LIVE
            .lock()
            .map_err(|_| ProcError::Signals("child registry poisoned".to_owned()))?;
        let child = cmd
            .spawn()
            .map_err(|e| ProcError::Spawn(name.to_owned(), e))?;
        live.insert(pid_i32(&child));
        drop(live);
        Ok(Guarded {
            name: name.to_owned(),
            child: Some(child),
        })
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, pid_i32)
    }

    /// `Some(status)` if the child has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, ProcError> {
        match self.child.as_mut() {
            Some(c) => c
                .try_wait()
                .map_err(|e| ProcError::Wait(self.name.clone(), e)),
            None => Ok(None),
        }
    }

    /// Waits up to `limit` for the child to exit; kills it (and fails) after that.
    pub fn wait_timeout(&mut self, limit: Duration) -> Result<ExitStatus, ProcError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status()? {
                self.forget();
                return Ok(status);
            }
            if interrupted() {
                self.stop();
                return Err(ProcError::Interrupted);
            }
            if start.elapsed() > limit {
                self.stop();
                return Err(ProcError::Timeout(self.name.clone(), limit));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Terminates the child and its descendants and reaps it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = pid_i32(&child);
        let descendants = descendants(pid);
        signal_pid(pid, Signal::TERM);
        let start = Instant::now();
        while start.elapsed() < GRACE {
            if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
        unregister(pid);
        // bulkhead's workers die with their supervisor (PDEATHSIG); anything that
        // survived anyway is killed, but only if it is still the same process.
        for (dpid, start_time) in descendants {
            if proc_start_time(dpid) == Some(start_time) {
                signal_pid(dpid, Signal::KILL);
            }
        }
    }

    fn forget(&mut self) {
        if let Some(c) = self.child.take() {
            unregister(pid_i32(&c));
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

fn unregister(pid: i32) {
    if let Ok(mut live) = LIVE.lock() {
        live.remove(&pid);
    }
}

fn pid_i32(child: &Child) -> i32 {
    i32::try_from(child.id()).unwrap_or(0)
}

/// Runs `cmd` to completion within `limit`, with its output in `log`; returns the exit
/// status and the log's text.
pub fn run_logged(
    name: &str,
    cmd: &mut Command,
    log: &Path,
    limit: Duration,
) -> Result<(ExitStatus, String), ProcError> {
    let _ = fs::remove_file(log);
    let mut child = Guarded::spawn(name, cmd, log)?;
    let status = child.wait_timeout(limit)?;
    let text = fs::read_to_string(log).unwrap_or_default();
    Ok((status, text))
}

/// A directory removed with everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates a fresh directory under `parent`, named after this process.
    pub fn new(parent: &Path, tag: &str) -> Result<ScratchDir, ProcError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!("{tag}-{}-{nanos:x}", std::process::id()));
        fs::create_dir(&path).map_err(|e| ProcError::Scratch(path.clone(), e))?;
        Ok(ScratchDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("bulkhead-bench: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// Fields of `/proc/PID/stat` after the `(comm)` field, which may itself hold spaces
/// and parentheses; index 0 is field 3 (`state`).
fn stat_fields_after_comm(stat: &str) -> Option<Vec<&str>> {
    let close = stat.rfind(')')?;
    Some(stat[close + 1..].split_whitespace().collect())
}

/// Parent pid and start time (field 22, clock ticks since boot) from a stat line.
pub fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    let f = stat_fields_after_comm(stat)?;
    let ppid = f.get(1)?.parse().ok()?;
    let start = f.get(19)?.parse().ok()?;
    Some((ppid, start))
}

fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, start)| start)
}

/// Every descendant of `root` alive now, with its start time.
pub fn descendants(root: i32) -> Vec<(i32, u64)> {
    let mut table = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Ok(stat) = fs::read_to_string(entry.path().join("stat"))
                && let Some((ppid, start)) = parse_stat(&stat)
            {
                table.push((pid, ppid, start));
            }
        }
    }
    let mut found: Vec<(i32, u64)> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid, start) in &table {
            if ppid == parent && !found.iter().any(|&(p, _)| p == pid) {
                found.push((pid, start));
                frontier.push(pid);
            }
        }
    }
    found
}

/// `VmRSS` in KiB from the text of `/proc/PID/status`.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resident set of `pid` in KiB, `None` if it is gone.
pub fn rss_kib(pid: i32) -> Option<u64> {
    parse_vm_rss_kib(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Summed resident set of `root` and all its descendants in KiB, and how many processes
/// that was.
pub fn tree_rss_kib(root: i32) -> Option<(u64, usize)> {
    let mut total = rss_kib(root)?;
    let mut count = 1;
    for (pid, _) in descendants(root) {
        if let Some(k) = rss_kib(pid) {
            total += k;
            count += 1;
        }
    }
    Some((total, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) 1) S 17 4242 17 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 \
                    3 0 987654 123 45 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((17, 987654)));
    }

    #[test]
    fn vm_rss_is_read_in_kib_from_the_status_text() {
        let status = "Name:\tqemu-storage-d\nVmPeak:\t  300000 kB\nVmRSS:\t   23456 kB\n";
        assert_eq!(parse_vm_rss_kib(status), Some(23456));
        assert_eq!(parse_vm_rss_kib("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn the_harness_itself_has_a_resident_set() {
        let me = i32::try_from(std::process::id()).unwrap_or(0);
        assert!(rss_kib(me).is_some_and(|k| k > 0));
    }
}
