//! Data-driven QMP sessions and the differential comparison of two daemons.
//!
//! Runs in the test process. A [`Script`] is a daemon command line plus a list of [`Step`]s
//! (bytes to send on one monitor, an optional hook run first, how to know the step's output
//! is complete, how to compare it). [`run_script`] plays it against one daemon and records
//! every line each monitor received, masked by [`crate::mask::Masker`]; [`compare`] checks
//! two recordings byte for byte; [`differential`] does both against qsd and the daemon
//! chosen by `BULKHEAD_DIFF_AGAINST`.
//!
//! A step's output is delimited by a sync request sent to every monitor after the step:
//! an unknown command with a unique id, whose reply ends the step. Events a step causes on
//! another monitor are therefore attributed to that step, and no step needs to say how many
//! lines it expects. Replies to sync requests are not recorded.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, DaemonKind, TempDir, substitute};
use crate::error::HarnessError;
use crate::mask::Masker;
use crate::qmp::{QmpConnection, printable};

/// How long after `quit` (or the last EOF) the daemon gets to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Where `BULKHEAD_DIFF_DUMP` names a directory, both transcripts of every differential run
/// are written there as `<script>.<daemon>.txt`.
pub const DUMP_ENV: &str = "BULKHEAD_DIFF_DUMP";

/// A hook run before a step's bytes are sent (start or stop a client, make a file, ...).
pub type HookFn = dyn Fn(&mut HookContext<'_>) -> Result<(), HarnessError> + Send + Sync;

/// A custom comparison `(reference output, tested output)`, for replies that are not
/// compared byte for byte.
pub type CheckFn = fn(&StepOutput, &StepOutput) -> Result<(), String>;

/// What a hook may touch.
#[derive(Debug)]
pub struct HookContext<'a> {
    /// The daemon the script runs against.
    pub kind: DaemonKind,
    /// The daemon's directory (`$DIR`).
    pub dir: &'a Path,
    /// The script's variables.
    pub vars: &'a [(String, String)],
    clients: &'a mut Vec<(String, Child)>,
}

impl HookContext<'_> {
    /// Substitutes `$DIR` and the script variables in `text`.
    pub fn substitute(&self, text: &str) -> String {
        substitute(text, self.dir, self.vars)
    }

    /// Starts a client program (arguments substituted) and keeps it running until
    /// [`HookContext::stop_client`] or the end of the session. Its stdin is an open pipe, so
    /// interactive clients such as `qemu-io` wait for input; stdout and stderr go to
    /// `$DIR/<name>.out` and `$DIR/<name>.err`.
    pub fn spawn_client(
        &mut self,
        name: &str,
        program: &str,
        args: &[&str],
    ) -> Result<(), HarnessError> {
        let args: Vec<String> = args.iter().map(|a| self.substitute(a)).collect();
        let stdout = File::create(self.dir.join(format!("{name}.out")))
            .map_err(|e| HarnessError::io(format!("creating {name}.out"), e))?;
        let stderr = File::create(self.dir.join(format!("{name}.err")))
            .map_err(|e| HarnessError::io(format!("creating {name}.err"), e))?;
        let child = Command::new(program)
            .args(&args)
            .current_dir(self.dir)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                program: program.into(),
                source,
            })?;
        self.clients.push((name.to_string(), child));
        Ok(())
    }

    /// Writes `bytes` to the stdin of client `name`.
    pub fn write_client(&mut self, name: &str, bytes: &[u8]) -> Result<(), HarnessError> {
        use std::io::Write as _;
        let child = self
            .clients
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .ok_or_else(|| no_client(name))?;
        let stdin = child.stdin.as_mut().ok_or_else(|| no_client(name))?;
        stdin
            .write_all(bytes)
            .and_then(|()| stdin.flush())
            .map_err(|e| HarnessError::io(format!("writing to client {name}"), e))
    }

    /// Waits until client `name`'s stdout (`$DIR/<name>.out`) contains `needle`.
    pub fn wait_client_output(
        &self,
        name: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let path = self.dir.join(format!("{name}.out"));
        let deadline = Instant::now() + timeout;
        loop {
            let out = fs::read_to_string(&path).unwrap_or_default();
            if out.contains(needle) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let err =
                    fs::read_to_string(self.dir.join(format!("{name}.err"))).unwrap_or_default();
                return Err(HarnessError::Tool {
                    program: name.into(),
                    args: Vec::new(),
                    detail: format!(
                        "no {needle:?} on stdout within {timeout:?}; stdout {out:?}, stderr {err:?}"
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills client `name` and waits for it.
    pub fn stop_client(&mut self, name: &str) -> Result<(), HarnessError> {
        let index = self
            .clients
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| no_client(name))?;
        let (_, mut child) = self.clients.remove(index);
        let _ = child.kill();
        child
            .wait()
            .map_err(|e| HarnessError::io(format!("waiting for client {name}"), e))?;
        Ok(())
    }
}

fn no_client(name: &str) -> HarnessError {
    HarnessError::io(
        format!("using client {name}"),
        io::Error::new(io::ErrorKind::NotFound, "no such client"),
    )
}

/// How the harness knows a step's output is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// Sync every open monitor (the default).
    Sync,
    /// Read the step's monitor until this event has arrived this many times, then sync
    /// every monitor. For events that may come after the reply.
    Event(String, usize),
    /// Read every monitor until the daemon closes it (`quit`), then wait for the exit.
    Eof,
}

/// How a step's outputs are compared.
#[derive(Clone)]
pub enum Compare {
    /// Masked bytes must be equal on every monitor.
    Exact,
    /// A custom check (the step's reply is, say, a list bulkhead only partly implements).
    Check(CheckFn),
}

impl std::fmt::Debug for Compare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compare::Exact => f.write_str("Exact"),
            Compare::Check(_) => f.write_str("Check(..)"),
        }
    }
}

/// One step of a script.
#[derive(Clone)]
pub struct Step {
    /// Index of the monitor the bytes go to.
    pub monitor: usize,
    /// The bytes to send, with `$DIR` and script variables substituted; may be empty for a
    /// hook-only step.
    pub send: Vec<u8>,
    /// When the output is complete.
    pub until: Until,
    /// How it is compared.
    pub compare: Compare,
    /// Run before sending.
    pub before: Option<Arc<HookFn>>,
    /// Close the step's monitor connection and open a new one first (its greeting is part
    /// of the step's output); the daemon must treat it as a new, un-negotiated client.
    pub reconnect: bool,
    /// What the step is about, for failure messages.
    pub note: String,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("monitor", &self.monitor)
            .field("send", &printable(&self.send))
            .field("until", &self.until)
            .field("compare", &self.compare)
            .field("hook", &self.before.is_some())
            .field("reconnect", &self.reconnect)
            .field("note", &self.note)
            .finish()
    }
}

impl Step {
    /// Sends `text` followed by a newline on monitor 0.
    pub fn line(text: &str) -> Step {
        let mut send = text.as_bytes().to_vec();
        send.push(b'\n');
        Step::raw(&send)
    }

    /// Sends exactly `bytes` on monitor 0.
    pub fn raw(bytes: &[u8]) -> Step {
        Step {
            monitor: 0,
            send: bytes.to_vec(),
            until: Until::Sync,
            compare: Compare::Exact,
            before: None,
            reconnect: false,
            note: String::new(),
        }
    }

    /// Closes monitor `monitor`'s connection, connects again and reads the new greeting.
    pub fn reconnect(monitor: usize) -> Step {
        let mut step = Step::raw(b"").on(monitor);
        step.reconnect = true;
        step.note = format!("reconnect monitor {monitor}");
        step
    }

    /// Sends nothing; only runs `hook` (and syncs).
    pub fn hook(
        note: &str,
        hook: impl Fn(&mut HookContext<'_>) -> Result<(), HarnessError> + Send + Sync + 'static,
    ) -> Step {
        Step::raw(b"").before(hook).note(note)
    }

    /// Sends on monitor `monitor` instead.
    pub fn on(mut self, monitor: usize) -> Step {
        self.monitor = monitor;
        self
    }

    /// Waits for `event` on the step's monitor before syncing.
    pub fn until_event(self, event: &str) -> Step {
        self.until_events(event, 1)
    }

    /// Waits for `count` occurrences of `event` on the step's monitor before syncing:
    /// for events a daemon may emit after the step's own action finished (bulkhead's
    /// `BLOCK_WRITE_THRESHOLD` reaches the monitor a moment after the NBD client saw
    /// its write complete, see design/node-state.md), so that syncing cannot overtake
    /// them.
    pub fn until_events(mut self, event: &str, count: usize) -> Step {
        self.until = Until::Event(event.to_string(), count);
        self
    }

    /// Reads every monitor to EOF (the step makes the daemon exit).
    pub fn until_eof(mut self) -> Step {
        self.until = Until::Eof;
        self
    }

    /// Compares with `check` instead of byte for byte.
    pub fn check(mut self, check: CheckFn) -> Step {
        self.compare = Compare::Check(check);
        self
    }

    /// Runs `hook` before sending.
    pub fn before(
        mut self,
        hook: impl Fn(&mut HookContext<'_>) -> Result<(), HarnessError> + Send + Sync + 'static,
    ) -> Step {
        self.before = Some(Arc::new(hook));
        self
    }

    /// Sets the note shown in failure messages.
    pub fn note(mut self, note: &str) -> Step {
        self.note = note.to_string();
        self
    }
}

/// A hook that runs `program` once (arguments substituted) and requires it to succeed
/// (`ok`) or fail, with `needle` in its output either way: the same expectation holds
/// for qsd and bulkhead, so what a client sees is compared too.
pub fn run_tool(
    program: &'static str,
    args: &'static [&'static str],
    ok: bool,
    needle: &'static str,
) -> impl Fn(&mut HookContext<'_>) -> Result<(), HarnessError> + Send + Sync + 'static {
    move |ctx| {
        let args: Vec<String> = args.iter().map(|a| ctx.substitute(a)).collect();
        let out = std::process::Command::new(program)
            .args(&args)
            .current_dir(ctx.dir)
            .output()
            .map_err(|source| HarnessError::Spawn {
                program: program.into(),
                source,
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() != ok || !text.contains(needle) {
            return Err(HarnessError::Tool {
                program: program.into(),
                args,
                detail: format!(
                    "against {:?}: expected success={ok} with {needle:?}, got {}: {text}",
                    ctx.kind, out.status
                ),
            });
        }
        Ok(())
    }
}

/// A daemon command line and a QMP session to play against it.
#[derive(Clone)]
pub struct Script {
    /// Name, used in messages and dump file names.
    pub name: String,
    /// How many QMP monitors (sockets `$DIR/qmp<i>.sock`) the daemon gets; all are
    /// connected, in order, before the first step, and their greetings are step 0.
    pub monitors: usize,
    /// Further daemon arguments (`$DIR` and variables substituted).
    pub args: Vec<String>,
    /// Variables (`$NAME`), the same for both daemons.
    pub vars: Vec<(String, String)>,
    /// Creates files in `$DIR` before the daemon starts.
    pub setup: Option<fn(&Path) -> io::Result<()>>,
    /// The session.
    pub steps: Vec<Step>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("name", &self.name)
            .field("monitors", &self.monitors)
            .field("args", &self.args)
            .field("vars", &self.vars)
            .field("steps", &self.steps.len())
            .finish()
    }
}

/// What every monitor received during one step (masked), indexed by monitor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutput {
    /// `lines[m]` are the lines monitor `m` received, terminators included.
    pub lines: Vec<Vec<Vec<u8>>>,
}

impl StepOutput {
    /// Appends a line for monitor `m`.
    pub fn push(&mut self, m: usize, line: Vec<u8>) {
        if self.lines.len() <= m {
            self.lines.resize(m + 1, Vec::new());
        }
        self.lines[m].push(line);
    }

    /// Lines of monitor `m` (empty if none).
    pub fn monitor(&self, m: usize) -> &[Vec<u8>] {
        self.lines.get(m).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Why a run stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// Index into [`Transcript::outputs`] (0 = greetings, i = script step i).
    pub step: usize,
    /// What went wrong.
    pub reason: String,
}

/// One daemon's recording of a script.
#[derive(Debug, Clone)]
pub struct Transcript {
    /// Which daemon.
    pub daemon: DaemonKind,
    /// `outputs[0]` holds the greetings, `outputs[i]` the output of script step `i`.
    pub outputs: Vec<StepOutput>,
    /// Set if the run stopped early; later steps were not run.
    pub aborted: Option<Abort>,
    /// How the daemon exited after an [`Until::Eof`] step; `None` if it was still running
    /// at the end of the script (then the harness kills it).
    pub exit: Option<String>,
    /// The daemon's stderr.
    pub stderr: String,
}

impl Transcript {
    /// The transcript as text: one block per step with every monitor's lines.
    pub fn render(&self, script: &Script) -> String {
        let mut text = String::new();
        for (i, output) in self.outputs.iter().enumerate() {
            let _ = writeln!(text, "== step {i}: {}", step_title(script, i));
            for (m, lines) in output.lines.iter().enumerate() {
                for line in lines {
                    let _ = writeln!(text, "  [{m}] {}", printable(line));
                }
            }
        }
        if let Some(abort) = &self.aborted {
            let _ = writeln!(text, "== aborted at step {}: {}", abort.step, abort.reason);
        }
        let _ = writeln!(text, "== exit: {:?}", self.exit);
        let _ = writeln!(text, "== stderr:\n{}", self.stderr);
        text
    }
}

fn step_title(script: &Script, index: usize) -> String {
    if index == 0 {
        return "connect every monitor, read the greetings".into();
    }
    match script.steps.get(index - 1) {
        Some(step) => {
            let mut request = printable(&step.send);
            if request.len() > 300 {
                request.truncate(300);
                request.push_str("...");
            }
            format!("[{}] monitor {} <- {request}", step.note, step.monitor)
        }
        None => "(no such step)".into(),
    }
}

struct Session {
    daemon: Daemon,
    masker: Masker,
    conns: Vec<Option<QmpConnection>>,
    clients: Vec<(String, Child)>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for (_, client) in &mut self.clients {
            let _ = client.kill();
            let _ = client.wait();
        }
    }
}

impl Session {
    /// Syncs monitor `first` (the step's own: once its sync reply is in, the step's command
    /// has run to completion and every event it emitted is queued on every monitor), then
    /// every other open monitor.
    fn sync_all(
        &mut self,
        step: usize,
        first: usize,
        output: &mut StepOutput,
    ) -> Result<(), HarnessError> {
        let order: Vec<usize> = std::iter::once(first)
            .chain((0..self.conns.len()).filter(|&m| m != first))
            .collect();
        for m in order {
            let token = format!("bulkhead-sync-{step}-{m}");
            let Some(conn) = self.conns.get_mut(m).and_then(Option::as_mut) else {
                continue;
            };
            let request =
                format!("{{\"execute\": \"x-bulkhead-harness-sync\", \"id\": \"{token}\"}}\n");
            conn.send(request.as_bytes())?;
            let needle = format!("\"{token}\"");
            loop {
                let line = conn.read_line()?;
                if contains(&line, needle.as_bytes()) {
                    break;
                }
                output.push(m, self.masker.mask(&line));
            }
        }
        Ok(())
    }

    fn run_step(
        &mut self,
        index: usize,
        step: &Step,
        vars: &[(String, String)],
        output: &mut StepOutput,
    ) -> Result<(), HarnessError> {
        if let Some(hook) = &step.before {
            let mut context = HookContext {
                kind: self.daemon.kind(),
                dir: self.daemon.dir(),
                vars,
                clients: &mut self.clients,
            };
            hook(&mut context)?;
        }
        if step.reconnect {
            let slot = self.conns.get_mut(step.monitor).ok_or_else(|| {
                HarnessError::io(
                    format!("reconnecting monitor {}", step.monitor),
                    io::Error::new(io::ErrorKind::NotFound, "no such monitor"),
                )
            })?;
            drop(slot.take());
            let mut conn = self.daemon.connect(step.monitor)?;
            let line = conn.read_line()?;
            output.push(step.monitor, self.masker.mask(&line));
            if let Some(slot) = self.conns.get_mut(step.monitor) {
                *slot = Some(conn);
            }
        }
        if !step.send.is_empty() {
            let text = String::from_utf8_lossy(&step.send);
            // Substitution only on valid UTF-8, so raw invalid bytes go out unchanged.
            let bytes = if std::str::from_utf8(&step.send).is_ok() {
                substitute(&text, self.daemon.dir(), vars).into_bytes()
            } else {
                step.send.clone()
            };
            let conn = self
                .conns
                .get_mut(step.monitor)
                .and_then(Option::as_mut)
                .ok_or_else(|| {
                    HarnessError::io(
                        format!("sending on monitor {}", step.monitor),
                        io::Error::new(io::ErrorKind::NotConnected, "monitor not open"),
                    )
                })?;
            conn.send(&bytes)?;
        }
        match &step.until {
            Until::Sync => self.sync_all(index, step.monitor, output),
            Until::Event(event, count) => {
                let needle = format!("\"event\": \"{event}\"");
                if let Some(conn) = self.conns.get_mut(step.monitor).and_then(Option::as_mut) {
                    let mut seen = 0;
                    while seen < *count {
                        let line = conn.read_line()?;
                        if contains(&line, needle.as_bytes()) {
                            seen += 1;
                        }
                        output.push(step.monitor, self.masker.mask(&line));
                    }
                }
                self.sync_all(index, step.monitor, output)
            }
            Until::Eof => {
                let order: Vec<usize> = std::iter::once(step.monitor)
                    .chain((0..self.conns.len()).filter(|&m| m != step.monitor))
                    .collect();
                for m in order {
                    if let Some(mut conn) = self.conns.get_mut(m).and_then(Option::take) {
                        for line in conn.read_to_eof(EXIT_TIMEOUT)? {
                            output.push(m, self.masker.mask(&line));
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Plays `script` against a fresh `kind` daemon. Errors only if the daemon cannot be
/// started; a failure during the session is recorded in [`Transcript::aborted`].
pub fn run_script(kind: DaemonKind, script: &Script) -> Result<Transcript, HarnessError> {
    run_script_with(kind, script, &[])
}

/// [`run_script`], with `bulkhead_args` appended to the command line when `kind` is
/// bulkhead (its own options, such as `--isolation image`, which qsd does not know).
pub fn run_script_with(
    kind: DaemonKind,
    script: &Script,
    bulkhead_args: &[&str],
) -> Result<Transcript, HarnessError> {
    let dir = TempDir::new(&format!("bulkhead-{}", kind.name()))?;
    if let Some(setup) = script.setup {
        setup(dir.path()).map_err(|e| HarnessError::io("running the script setup", e))?;
    }
    let mut args = script.args.clone();
    if kind == DaemonKind::Bulkhead {
        args.extend(bulkhead_args.iter().map(|a| a.to_string()));
    }
    let daemon = Daemon::start_in(kind, dir, script.monitors, &args, &script.vars)?;
    let masker = Masker::new().with_literal(daemon.dir().to_string_lossy().as_bytes(), "$DIR");
    let mut session = Session {
        daemon,
        masker,
        conns: Vec::new(),
        clients: Vec::new(),
    };
    let empty = || StepOutput {
        lines: vec![Vec::new(); script.monitors],
    };
    let mut outputs = Vec::new();
    let mut aborted = None;

    let mut greetings = empty();
    for m in 0..script.monitors {
        let result = session.daemon.connect(m).and_then(|mut conn| {
            let line = conn.read_line()?;
            greetings.push(m, session.masker.mask(&line));
            Ok(conn)
        });
        match result {
            Ok(conn) => session.conns.push(Some(conn)),
            Err(e) => {
                aborted = Some(Abort {
                    step: 0,
                    reason: e.to_string(),
                });
                break;
            }
        }
    }
    outputs.push(greetings);

    let mut saw_eof = false;
    if aborted.is_none() {
        for (i, step) in script.steps.iter().enumerate() {
            let index = i + 1;
            let mut output = empty();
            let result = session.run_step(index, step, &script.vars, &mut output);
            outputs.push(output);
            if let Err(e) = result {
                aborted = Some(Abort {
                    step: index,
                    reason: e.to_string(),
                });
                break;
            }
            if step.until == Until::Eof {
                saw_eof = true;
            }
        }
    }

    let exit = if saw_eof {
        match session.daemon.wait_exit(EXIT_TIMEOUT) {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => Some(format!("still running {EXIT_TIMEOUT:?} after EOF")),
            Err(e) => Some(e.to_string()),
        }
    } else {
        None
    };
    let stderr = session.masker.mask(session.daemon.stderr().as_bytes());
    Ok(Transcript {
        daemon: kind,
        outputs,
        aborted,
        exit,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// One step whose outputs differ.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// Index into the outputs (0 = greetings).
    pub step: usize,
    /// The explanation, with the request and both outputs.
    pub report: String,
}

fn render_output(output: Option<&StepOutput>) -> String {
    let Some(output) = output else {
        return "    (step not run)\n".into();
    };
    let mut text = String::new();
    for (m, lines) in output.lines.iter().enumerate() {
        if lines.is_empty() {
            let _ = writeln!(text, "    [{m}] (nothing)");
        }
        for line in lines {
            let _ = writeln!(text, "    [{m}] {}", printable(line));
        }
    }
    text
}

/// Compares two recordings of `script` step by step; returns one [`Mismatch`] per differing
/// step (and one for a differing exit).
pub fn compare(script: &Script, reference: &Transcript, tested: &Transcript) -> Vec<Mismatch> {
    let mut mismatches = Vec::new();
    let (a, b) = (reference.daemon.name(), tested.daemon.name());
    for index in 0..=script.steps.len() {
        let left = reference.outputs.get(index);
        let right = tested.outputs.get(index);
        if left.is_none() || right.is_none() {
            // One run stopped before this step (its abort was reported at the step where
            // it stopped); one line for the rest instead of one mismatch per step.
            if left.is_some() || right.is_some() {
                let (stopped, other) = if left.is_none() { (a, b) } else { (b, a) };
                mismatches.push(Mismatch {
                    step: index,
                    report: format!(
                        "steps {index}..={} were not run by {stopped} (only by {other})",
                        script.steps.len()
                    ),
                });
            }
            break;
        }
        let verdict = match (left, right) {
            (Some(l), Some(r)) => {
                let compare = match index {
                    0 => Compare::Exact,
                    _ => script
                        .steps
                        .get(index - 1)
                        .map(|s| s.compare.clone())
                        .unwrap_or(Compare::Exact),
                };
                match compare {
                    Compare::Exact if l == r => Ok(()),
                    Compare::Exact => Err("outputs differ".to_string()),
                    Compare::Check(check) => check(l, r),
                }
            }
            _ => Err("one daemon did not run this step".to_string()),
        };
        let abort_note = |t: &Transcript| match &t.aborted {
            Some(abort) if abort.step == index => {
                format!("  {} stopped here: {}\n", t.daemon.name(), abort.reason)
            }
            _ => String::new(),
        };
        let extra = format!("{}{}", abort_note(reference), abort_note(tested));
        if let Err(why) = verdict.and_then(|()| {
            if extra.is_empty() {
                Ok(())
            } else {
                Err("the run stopped".into())
            }
        }) {
            let report = format!(
                "step {index}: {}\n  {why}\n{extra}  {a}:\n{}  {b}:\n{}",
                step_title(script, index),
                render_output(left),
                render_output(right),
            );
            mismatches.push(Mismatch {
                step: index,
                report,
            });
        }
    }
    if reference.exit != tested.exit {
        mismatches.push(Mismatch {
            step: script.steps.len() + 1,
            report: format!(
                "exit differs: {a} {:?}, {b} {:?}",
                reference.exit, tested.exit
            ),
        });
    }
    mismatches
}

/// At most this many mismatches are printed in full.
const MAX_REPORTED: usize = 12;

/// Runs `script` against qsd and against [`DaemonKind::under_test`], and returns a report
/// of every difference (the first [`MAX_REPORTED`] in full) as the error.
pub fn differential(script: &Script) -> Result<(), String> {
    differential_with(script, &[])
}

/// [`differential`], with `bulkhead_args` added to bulkhead's command line only (see
/// [`run_script_with`]).
pub fn differential_with(script: &Script, bulkhead_args: &[&str]) -> Result<(), String> {
    let tested_kind = DaemonKind::under_test().map_err(|e| e.to_string())?;
    let reference = run_script(DaemonKind::Qsd, script)
        .map_err(|e| format!("script {}: cannot run qsd: {e}", script.name))?;
    dump(script, &reference, "qsd");
    if let Some(abort) = &reference.aborted {
        return Err(format!(
            "script {} is broken: qsd itself stopped at step {} ({}): {}\n{}",
            script.name,
            abort.step,
            step_title(script, abort.step),
            abort.reason,
            reference.render(script)
        ));
    }
    let tested = run_script_with(tested_kind, script, bulkhead_args).map_err(|e| {
        format!(
            "script {}: cannot run {}: {e}",
            script.name,
            tested_kind.name()
        )
    })?;
    dump(script, &tested, &format!("{}-tested", tested_kind.name()));
    let mismatches = compare(script, &reference, &tested);
    if mismatches.is_empty() {
        println!(
            "script {}: {} steps, qsd and {} agree byte for byte",
            script.name,
            script.steps.len(),
            tested_kind.name()
        );
        return Ok(());
    }
    let mut report = format!(
        "script {}: {} of {} steps differ between qsd and {} (masked output; [m] = monitor)\n",
        script.name,
        mismatches.len(),
        script.steps.len(),
        tested_kind.name()
    );
    if let Some(abort) = &tested.aborted {
        let _ = writeln!(
            report,
            "{} stopped at step {} ({}): {}",
            tested_kind.name(),
            abort.step,
            step_title(script, abort.step),
            abort.reason
        );
    }
    for mismatch in mismatches.iter().take(MAX_REPORTED) {
        let _ = writeln!(report, "\n{}", mismatch.report);
    }
    if tested.aborted.is_some() || reference.exit != tested.exit {
        let mut stderr = tested.stderr.clone();
        if stderr.len() > 8000 {
            let cut = (0..=8000)
                .rev()
                .find(|&i| stderr.is_char_boundary(i))
                .unwrap_or(0);
            stderr.truncate(cut);
            stderr.push_str("\n[... truncated]");
        }
        let _ = writeln!(report, "\n{} stderr:\n{stderr}", tested_kind.name());
    }
    if mismatches.len() > MAX_REPORTED {
        let _ = writeln!(
            report,
            "\n... and {} more (set {DUMP_ENV}=<dir> to get both transcripts)",
            mismatches.len() - MAX_REPORTED
        );
    }
    Err(report)
}

fn dump(script: &Script, transcript: &Transcript, label: &str) {
    if let Some(dir) = std::env::var_os(DUMP_ENV) {
        let path = Path::new(&dir).join(format!("{}.{label}.txt", script.name));
        if let Err(e) = fs::write(&path, transcript.render(script)) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript(daemon: DaemonKind, reply: &[u8]) -> Transcript {
        Transcript {
            daemon,
            outputs: vec![
                StepOutput {
                    lines: vec![vec![b"{\"QMP\": {}}\r\n".to_vec()]],
                },
                StepOutput {
                    lines: vec![vec![reply.to_vec()]],
                },
            ],
            aborted: None,
            exit: None,
            stderr: String::new(),
        }
    }

    fn one_step_script() -> Script {
        Script {
            name: "t".into(),
            monitors: 1,
            args: Vec::new(),
            vars: Vec::new(),
            setup: None,
            steps: vec![Step::line(r#"{"execute": "query-block", "id": 1}"#).note("qb")],
        }
    }

    #[test]
    fn equal_transcripts_have_no_mismatch() {
        let script = one_step_script();
        let a = transcript(DaemonKind::Qsd, b"{\"return\": [], \"id\": 1}\r\n");
        let b = transcript(DaemonKind::Bulkhead, b"{\"return\": [], \"id\": 1}\r\n");
        assert!(compare(&script, &a, &b).is_empty());
    }

    #[test]
    fn a_missing_carriage_return_is_reported_with_step_request_and_both_outputs() {
        let script = one_step_script();
        let a = transcript(DaemonKind::Qsd, b"{\"return\": [], \"id\": 1}\r\n");
        let b = transcript(DaemonKind::Bulkhead, b"{\"return\": [], \"id\": 1}\n");
        let mismatches = compare(&script, &a, &b);
        assert_eq!(mismatches.len(), 1);
        assert_eq!(mismatches[0].step, 1);
        assert_eq!(
            mismatches[0].report,
            "step 1: [qb] monitor 0 <- {\"execute\": \"query-block\", \"id\": 1}\\n\n  outputs differ\n  \
             qsd:\n    [0] {\"return\": [], \"id\": 1}\\r\\n\n  bulkhead:\n    [0] {\"return\": [], \"id\": 1}\\n\n"
        );
    }

    #[test]
    fn a_run_that_stopped_early_is_a_mismatch_at_the_step_it_stopped() {
        let script = one_step_script();
        let a = transcript(DaemonKind::Qsd, b"{\"return\": [], \"id\": 1}\r\n");
        let mut b = transcript(DaemonKind::Bulkhead, b"");
        b.outputs.truncate(1);
        b.aborted = Some(Abort {
            step: 1,
            reason: "timeout".into(),
        });
        let mismatches = compare(&script, &a, &b);
        let steps: Vec<usize> = mismatches.iter().map(|m| m.step).collect();
        assert_eq!(steps, vec![1]);
        assert_eq!(
            mismatches[0].report,
            "steps 1..=1 were not run by bulkhead (only by qsd)"
        );
    }
}
