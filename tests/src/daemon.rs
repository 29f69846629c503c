//! Starting qemu-storage-daemon or bulkhead in a fresh temporary directory.
//!
//! Runs in the test process. A [`Daemon`] owns its child process and its directory; dropping
//! it kills the process (SIGKILL), every process it spawned, and removes the directory, so a
//! failing test never leaves a daemon behind.

use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::HarnessError;
use crate::procs;
use crate::qmp::QmpConnection;

/// Where qsd lives unless `QSD_BIN` says otherwise.
pub const QSD_PATH: &str = "/usr/bin/qemu-storage-daemon";

/// Names the daemon a differential or client test runs against, besides qsd.
pub const UNDER_TEST_ENV: &str = "BULKHEAD_DIFF_AGAINST";

/// How long a daemon gets to create its QMP sockets. Generous: the CI box has 2 cores
/// shared with several builds.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Which program a [`Daemon`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonKind {
    /// `/usr/bin/qemu-storage-daemon`, the oracle.
    Qsd,
    /// The bulkhead binary of this workspace.
    Bulkhead,
}

impl DaemonKind {
    /// The daemon to test against qsd: `BULKHEAD_DIFF_AGAINST=qsd` selects qsd itself
    /// (a self-check of the harness and scripts), unset or `bulkhead` selects bulkhead.
    pub fn under_test() -> Result<DaemonKind, HarnessError> {
        match std::env::var(UNDER_TEST_ENV) {
            Err(_) => Ok(DaemonKind::Bulkhead),
            Ok(value) => match value.as_str() {
                "" | "bulkhead" => Ok(DaemonKind::Bulkhead),
                "qsd" => Ok(DaemonKind::Qsd),
                _ => Err(HarnessError::BadDaemonChoice { value }),
            },
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            DaemonKind::Qsd => "qsd",
            DaemonKind::Bulkhead => "bulkhead",
        }
    }

    /// The executable to run.
    pub fn program(self) -> Result<PathBuf, HarnessError> {
        match self {
            DaemonKind::Qsd => qsd_path(),
            DaemonKind::Bulkhead => bulkhead_path(),
        }
    }
}

/// The qsd executable: `QSD_BIN` or [`QSD_PATH`].
pub fn qsd_path() -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os("QSD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(QSD_PATH));
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::QsdMissing { path })
    }
}

/// The bulkhead executable: `BULKHEAD_BIN`, else `target/<profile>/bulkhead` found from the
/// test executable, which cargo puts in `target/<profile>/deps/<test>-<hash>`.
pub fn bulkhead_path() -> Result<PathBuf, HarnessError> {
    let path = match std::env::var_os("BULKHEAD_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| HarnessError::io("finding the test executable", e))?;
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            profile_dir.join("bulkhead")
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::BulkheadMissing { path })
    }
}

/// A directory removed (with its contents) on drop, unless `BULKHEAD_KEEP_TMP` is set.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a new empty directory under `/tmp` (short, because Unix socket paths are
    /// limited to 107 bytes), or under `BULKHEAD_TEST_TMPDIR` if set (the whole suite
    /// can run with its images in memory, `/dev/shm`, where exports move data on the
    /// image descriptor themselves).
    pub fn new(prefix: &str) -> Result<TempDir, HarnessError> {
        let base = std::env::var_os("BULKHEAD_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        TempDir::new_in(&base, prefix)
    }

    /// Creates a new empty directory under `base`.
    pub fn new_in(base: &Path, prefix: &str) -> Result<TempDir, HarnessError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = base.to_path_buf();
        loop {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{prefix}-{}-{n}-{nanos:x}", std::process::id()));
            // create_dir fails on an existing path, so two tests never share a directory.
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(HarnessError::TempDir { base, source }),
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BULKHEAD_KEEP_TMP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Replaces `$DIR` and the given `$NAME` variables in `text`.
pub fn substitute(text: &str, dir: &Path, vars: &[(String, String)]) -> String {
    let mut out = text.replace("$DIR", &dir.to_string_lossy());
    for (name, value) in vars {
        out = out.replace(&format!("${name}"), value);
    }
    out
}

/// A running qsd or bulkhead with `monitors` QMP sockets `$DIR/qmp<i>.sock`.
#[derive(Debug)]
pub struct Daemon {
    kind: DaemonKind,
    program: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
    sockets: Vec<PathBuf>,
    // Declared last so the directory outlives the process during drop.
    dir: TempDir,
}

impl Daemon {
    /// Starts `kind` in a new temporary directory; see [`Daemon::start_in`].
    pub fn start(kind: DaemonKind, monitors: usize, args: &[&str]) -> Result<Daemon, HarnessError> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Daemon::start_in(kind, TempDir::new("bulkhead-st")?, monitors, &args, &[])
    }

    /// Starts `kind` in `dir` with `monitors` QMP monitors first on the command line
    /// (`--chardev socket,path=$DIR/qmp<i>.sock,server=on,wait=off,id=qmp<i> --monitor
    /// chardev=qmp<i>`), then `args` with `$DIR` and `vars` substituted, and waits until every
    /// socket exists. stdout and stderr go to `$DIR/stdout.log` and `$DIR/stderr.log`.
    ///
    /// The daemon runs in its own process group and gets PR_SET_PDEATHSIG(SIGKILL), which
    /// the kernel ties to the *thread* that spawned it: keep a `Daemon` on the thread that
    /// started it (a test's own thread), or it dies when that thread ends.
    pub fn start_in(
        kind: DaemonKind,
        dir: TempDir,
        monitors: usize,
        args: &[String],
        vars: &[(String, String)],
    ) -> Result<Daemon, HarnessError> {
        let program = kind.program()?;
        let mut argv: Vec<String> = Vec::new();
        let mut sockets = Vec::new();
        for i in 0..monitors {
            let socket = dir.path().join(format!("qmp{i}.sock"));
            argv.push("--chardev".into());
            argv.push(format!(
                "socket,path={},server=on,wait=off,id=qmp{i}",
                socket.display()
            ));
            argv.push("--monitor".into());
            argv.push(format!("chardev=qmp{i}"));
            sockets.push(socket);
        }
        argv.extend(args.iter().map(|a| substitute(a, dir.path(), vars)));

        let stdout = File::create(dir.path().join("stdout.log"))
            .map_err(|e| HarnessError::io("creating stdout.log", e))?;
        let stderr = File::create(dir.path().join("stderr.log"))
            .map_err(|e| HarnessError::io("creating stderr.log", e))?;
        let mut command = Command::new(&program);
        command
            .args(&argv)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Own process group: drop can kill the daemon and everything it forked at once.
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec. It only calls prctl,
        // which is async-signal-safe and touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                // If the test process dies without running destructors (SIGKILL by a test
                // runner timeout), the daemon goes with it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| HarnessError::Spawn {
            program: program.clone(),
            source,
        })?;
        let mut daemon = Daemon {
            kind,
            program,
            child,
            exit: None,
            sockets,
            dir,
        };
        daemon.wait_for_sockets()?;
        Ok(daemon)
    }

    fn wait_for_sockets(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for socket in self.sockets.clone() {
            while !socket.exists() {
                if let Some(status) = self.try_wait()? {
                    return Err(HarnessError::ExitedEarly {
                        daemon: self.describe(),
                        socket,
                        status: status.to_string(),
                        stderr: self.stderr(),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(HarnessError::SocketTimeout {
                        daemon: self.describe(),
                        socket,
                        timeout: STARTUP_TIMEOUT,
                        stderr: self.stderr(),
                    });
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.kind.name(), self.program.display())
    }

    /// Which program runs.
    pub fn kind(&self) -> DaemonKind {
        self.kind
    }

    /// The executable that was started.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The daemon's temporary directory (its working directory, `$DIR` in arguments).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The path of QMP socket `i`.
    pub fn qmp_socket(&self, i: usize) -> Option<&Path> {
        self.sockets.get(i).map(PathBuf::as_path)
    }

    /// Connects to QMP socket `i` (no bytes are read or sent).
    pub fn connect(&self, i: usize) -> Result<QmpConnection, HarnessError> {
        let socket = self.qmp_socket(i).ok_or_else(|| HarnessError::Connect {
            socket: self.dir().join(format!("qmp{i}.sock")),
            source: io::Error::new(io::ErrorKind::NotFound, "no such monitor"),
        })?;
        QmpConnection::connect(socket)
    }

    /// Connects to QMP socket `i`, reads the greeting and negotiates capabilities.
    pub fn qmp(&self, i: usize) -> Result<QmpConnection, HarnessError> {
        let mut qmp = self.connect(i)?;
        qmp.negotiate()?;
        Ok(qmp)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read(self.dir().join("stderr.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status, if the daemon has exited (non-blocking).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, HarnessError> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .map_err(|e| HarnessError::io("waiting for the daemon", e))?;
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the daemon process only (not to its process group).
    pub fn signal(&self, signal: i32) -> Result<(), HarnessError> {
        procs::send_signal(self.pid(), signal)
            .map_err(|e| HarnessError::io(format!("sending signal {signal}"), e))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.pid();
        // Collect descendants first: once the daemon is dead they are reparented and can no
        // longer be found by parent pid.
        let descendants = procs::descendants(pid);
        if !matches!(self.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Ok(pgid) = i32::try_from(pid) {
            // The group id stays reserved while any member lives, so this cannot hit a
            // stranger.
            let _ = procs::send_signal_to_group(pgid, libc::SIGKILL);
        }
        for process in descendants {
            if procs::is_alive(&process) {
                let _ = procs::send_signal(process.pid, libc::SIGKILL);
            }
        }
    }
}

/// Runs `program` with `args` to completion and returns its stdout, or a [`HarnessError::Tool`]
/// with its stderr.
pub fn run_tool(program: &str, args: &[&str]) -> Result<String, HarnessError> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HarnessError::Spawn {
            program: PathBuf::from(program),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HarnessError::Tool {
            program: program.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

/// How a daemon run that was expected to end (a rejected command line) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    /// `exit status: N`, `signal: N (...)`, or `still running after ...` (then it was killed).
    pub status: String,
    /// stdout, with the temp dir as `$DIR` and the program name as `<prog>`.
    pub stdout: String,
    /// stderr, masked like stdout.
    pub stderr: String,
}

/// Replaces the temp dir by `$DIR` and, at line starts, the program path or its file name
/// followed by `": "` by `"<prog>: "` (getopt prints argv[0], QEMU's error_report the
/// short name; bulkhead prints its own name).
pub fn mask_program_output(text: &str, dir: &Path, program: &Path) -> String {
    let text = text.replace(&*dir.to_string_lossy(), "$DIR");
    let full = format!("{}: ", program.display());
    let short = format!(
        "{}: ",
        program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    text.split_inclusive('\n')
        .map(|line| {
            if let Some(rest) = line.strip_prefix(&full) {
                format!("<prog>: {rest}")
            } else if let Some(rest) = line.strip_prefix(&short) {
                format!("<prog>: {rest}")
            } else {
                line.to_string()
            }
        })
        .collect()
}

/// Runs `kind` with exactly `args` (`$DIR` substituted) in a new temp dir and waits up to
/// `timeout` for it to exit, for command lines it must reject.
pub fn run_to_exit(
    kind: DaemonKind,
    args: &[String],
    timeout: Duration,
) -> Result<Exited, HarnessError> {
    let program = kind.program()?;
    let dir = TempDir::new(&format!("bulkhead-cli-{}", kind.name()))?;
    let argv: Vec<String> = args
        .iter()
        .map(|a| substitute(a, dir.path(), &[]))
        .collect();
    let stdout = File::create(dir.path().join("stdout.log"))
        .map_err(|e| HarnessError::io("creating stdout.log", e))?;
    let stderr = File::create(dir.path().join("stderr.log"))
        .map_err(|e| HarnessError::io("creating stderr.log", e))?;
    let mut child = Command::new(&program)
        .args(&argv)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            program: program.clone(),
            source,
        })?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.to_string(),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break format!("still running after {timeout:?}");
            }
            Err(e) => return Err(HarnessError::io("waiting for the daemon", e)),
        }
    };
    if let Ok(pgid) = i32::try_from(child.id()) {
        let _ = procs::send_signal_to_group(pgid, libc::SIGKILL);
    }
    let read = |name: &str| {
        let raw = fs::read(dir.path().join(name)).unwrap_or_default();
        mask_program_output(&String::from_utf8_lossy(&raw), dir.path(), &program)
    };
    Ok(Exited {
        status,
        stdout: read("stdout.log"),
        stderr: read("stderr.log"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names_at_line_starts_and_the_temp_dir_are_masked() {
        let text = "/usr/bin/qemu-storage-daemon: unrecognized option '--x'\n\
                    qemu-storage-daemon: --blockdev filename=/tmp/d1/x: Could not open '/tmp/d1/x'\n\
                    not qemu-storage-daemon: here\n";
        assert_eq!(
            mask_program_output(
                text,
                Path::new("/tmp/d1"),
                Path::new("/usr/bin/qemu-storage-daemon")
            ),
            "<prog>: unrecognized option '--x'\n\
             <prog>: --blockdev filename=$DIR/x: Could not open '$DIR/x'\n\
             not qemu-storage-daemon: here\n"
        );
    }

    #[test]
    fn substitute_replaces_dir_and_named_variables() {
        let vars = vec![("LOOP".to_string(), "/dev/loop3".to_string())];
        assert_eq!(
            substitute("$DIR/a $LOOP", Path::new("/tmp/x"), &vars),
            "/tmp/x/a /dev/loop3"
        );
    }
}
