//! Supervisor start-up: carry out the command line strictly in order, like qsd, then
//! serve until `quit` or a termination signal.
//!
//! Stage one (`cli`) parsed argv without touching anything; here each option is
//! executed in turn (bind sockets, start monitors, create nodes, start the NBD server,
//! add exports), and the first failure prints `bulkhead: OPTION: MESSAGE` and exits 1,
//! as qsd does. The pid file is written once every option ran.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;

use actix::Actor;
use bulkhead_actors::events::{EventBus, EventSink};
use bulkhead_actors::front::{self, Chardev, Front, chardev};
use bulkhead_actors::supervisor::actor::{Execute, Shutdown, StartupComplete, SupervisorActor};
use bulkhead_qmp::json::JsonStreamer;
use serde_json::{Map, Value};

use crate::cli::{
    self, ChardevBackend, CliAction, CliOption, MonitorArg, MonitorMode, MonitorOptions, OptionArg,
    OptionKind, SocketChardevAddr,
};

/// Environment variable that tells workers to skip their sandbox (`--sandbox off`).
const SANDBOX_ENV: &str = "BULKHEAD_SANDBOX";

/// Runs the supervisor; returns the process exit code.
pub fn main(args: &[String]) -> ExitCode {
    let opts = match cli::parse_args(args) {
        Ok(CliAction::Help) => {
            print!("{}", cli::help_text());
            return ExitCode::SUCCESS;
        }
        Ok(CliAction::Version) => {
            print!("{}", cli::version_text());
            return ExitCode::SUCCESS;
        }
        Ok(CliAction::Run(opts)) => opts,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let sandbox = opts.iter().rev().find_map(|o| match o.parsed {
        Ok(OptionKind::Sandbox(on)) => Some(on),
        _ => None,
    });
    if sandbox == Some(false) {
        eprintln!(
            "bulkhead: --sandbox off: warning: workers run without a sandbox; use this only for debugging"
        );
        // SAFETY: no other thread exists yet; workers inherit the environment.
        unsafe { std::env::set_var(SANDBOX_ENV, "off") };
    }
    let daemonize = opts
        .iter()
        .any(|o| matches!(o.parsed, Ok(OptionKind::Daemonize)));
    // Fork before any thread exists; the parent waits for the child's start-up result.
    let ready_pipe = if daemonize {
        match daemonize_now() {
            Ok(pipe) => Some(pipe),
            Err(e) => {
                eprintln!("bulkhead: --daemonize: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let sys = actix::System::new();
    let code = sys.block_on(run(opts, ready_pipe, daemonize));
    ExitCode::from(code)
}

/// Forks; the parent waits for one status byte from the child and exits with it. In
/// the child returns the pipe to report on.
fn daemonize_now() -> Result<std::fs::File, String> {
    let (r, w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| e.to_string())?;
    // SAFETY: no other thread exists yet (the runtime has not been built), so the child
    // may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if pid > 0 {
        drop(w);
        let mut status = [1u8];
        let mut f = std::fs::File::from(r);
        let _ = std::io::Read::read(&mut f, &mut status);
        std::process::exit(i32::from(status[0]));
    }
    drop(r);
    let _ = rustix::process::setsid();
    Ok(std::fs::File::from(w))
}

/// Parses a JSON option argument with the QMP parser: exactly one value.
fn parse_json_arg(text: &str) -> Result<Value, String> {
    let mut parser = JsonStreamer::new();
    let items = parser.feed(text.as_bytes());
    let mut values = Vec::new();
    for item in items {
        match item {
            Ok(v) => values.push(v),
            Err(e) => return Err(e.to_string()),
        }
    }
    match values.len() {
        0 => Err("JSON parse error, premature EOI".to_string()),
        1 => Ok(values.remove(0)),
        _ => Err("Expecting at most one JSON value".to_string()),
    }
}

/// Checks an option argument against its QAPI type; returns the normalized arguments.
fn visit(arg: &OptionArg, type_name: &str) -> Result<Map<String, Value>, String> {
    let (value, json) = match arg {
        OptionArg::Keyval(v) => (v.clone(), false),
        OptionArg::Json(text) => (parse_json_arg(text)?, true),
    };
    match bulkhead_actors::dispatch::validate_type(type_name, &value, json) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Ok(Map::new()),
        Err(e) => Err(e.desc),
    }
}

struct Startup {
    supervisor: actix::Addr<SupervisorActor>,
    front: Front,
    chardevs: HashMap<String, Chardev>,
    chardev_ids: HashSet<String>,
    used_chardevs: HashSet<String>,
    stdio_used: bool,
    daemonize: bool,
    /// Monitors start serving only once every option ran: like qsd, a client that
    /// connects during start-up gets its greeting when start-up is complete.
    monitors: Vec<(Chardev, bool, String)>,
}

impl Startup {
    async fn execute(&self, command: &str, args: Map<String, Value>) -> Result<(), String> {
        match self
            .supervisor
            .send(Execute {
                command: command.into(),
                args,
            })
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.desc),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Runs one option; on failure returns the message to print after its location.
    async fn run_option(&mut self, opt: &CliOption) -> Result<(), String> {
        let kind = match &opt.parsed {
            Ok(k) => k,
            Err(e) => return Err(e.to_string()),
        };
        match kind {
            OptionKind::Blockdev(arg) => {
                let args = visit(arg, "BlockdevOptions")?;
                self.execute("blockdev-add", args).await
            }
            OptionKind::NbdServer(arg) => {
                let args = visit(arg, "NbdServerOptions")?;
                self.execute("nbd-server-start", args).await
            }
            OptionKind::Export(arg) => {
                let args = visit(arg, "BlockExportOptions")?;
                self.execute("block-export-add", args).await
            }
            OptionKind::Object(arg) => {
                visit(arg, "ObjectOptions")?;
                Err("bulkhead does not support --object yet".to_string())
            }
            OptionKind::ObjectHelp(_) => Err("bulkhead does not support --object yet".to_string()),
            OptionKind::ChardevHelp { stdout, exit_code } => {
                print!("{stdout}");
                let _ = std::io::stdout().flush();
                std::process::exit(*exit_code);
            }
            OptionKind::Chardev(c) => self.chardev(c).await,
            OptionKind::Monitor(arg) => {
                let options = match arg {
                    MonitorArg::Options(o) => o.clone(),
                    MonitorArg::Json(text) => MonitorOptions::from_json(&parse_json_arg(text)?)
                        .map_err(|e| e.to_string())?,
                };
                self.monitor(options)
            }
            OptionKind::Trace(_)
            | OptionKind::Pidfile(_)
            | OptionKind::Daemonize
            | OptionKind::Sandbox(_)
            | OptionKind::Isolation(_) => Ok(()),
        }
    }

    async fn chardev(&mut self, c: &cli::ChardevOptions) -> Result<(), String> {
        let is_socket = matches!(c.backend, ChardevBackend::Socket(_));
        if self.chardev_ids.contains(&c.id) {
            return Err(if is_socket {
                "duplicate yank instance".to_string()
            } else {
                format!(
                    "attempt to add duplicate property '{}' to object (type 'container')",
                    c.id
                )
            });
        }
        let dev = match &c.backend {
            ChardevBackend::Stdio { .. } => {
                if self.daemonize {
                    return Err("cannot use stdio with -daemonize".to_string());
                }
                if self.stdio_used {
                    return Err("cannot use stdio by multiple character devices".to_string());
                }
                self.stdio_used = true;
                Chardev::Stdio
            }
            ChardevBackend::Socket(s) if s.server => match &s.addr {
                SocketChardevAddr::Unix { path, .. } => {
                    let mut dev = Chardev::bind(PathBuf::from(path)).map_err(|e| {
                        let reason = e.raw_os_error().map(bulkhead_actors::supervisor::strerror);
                        format!(
                            "Failed to bind socket to {path}: {}",
                            reason.unwrap_or_else(|| e.to_string())
                        )
                    })?;
                    if s.wait != Some(false) {
                        // qsd waits for the first client before it goes on with start-up.
                        eprintln!(
                            "bulkhead: --chardev {}: info: QEMU waiting for connection on: disconnected:unix:{path},server=on",
                            c.id
                        );
                        if let Chardev::Socket(listener, _, first) = &mut dev {
                            use interprocess::local_socket::traits::tokio::Listener as _;
                            *first = listener.accept().await.ok();
                        }
                    }
                    dev
                }
                SocketChardevAddr::Fd(fd) => {
                    let fd = cli::parse_fd_number(fd).map_err(|e| e.to_string())?;
                    let not_socket = || format!("File descriptor '{fd}' is not a socket");
                    if fd < 0 {
                        return Err(not_socket());
                    }
                    // SAFETY: the operator passed this descriptor to us for this chardev;
                    // we take ownership once, after checking it is a listening socket.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if rustix::net::getsockname(&owned).is_err() {
                        std::mem::forget(owned);
                        return Err(not_socket());
                    }
                    let std = std::os::unix::net::UnixListener::from(owned);
                    std.set_nonblocking(true).map_err(|e| e.to_string())?;
                    Chardev::Inherited(
                        tokio::net::UnixListener::from_std(std).map_err(|e| e.to_string())?,
                    )
                }
                _ => {
                    return Err("bulkhead supports only Unix socket and stdio chardevs".to_string());
                }
            },
            ChardevBackend::Socket(s) => match &s.addr {
                SocketChardevAddr::Unix { path, .. } => {
                    let path = PathBuf::from(path);
                    let reconnect = s.reconnect_ms.map(std::time::Duration::from_millis);
                    let stream = match tokio::net::UnixStream::connect(&path).await {
                        Ok(stream) => Some(stream),
                        Err(e) if reconnect.is_some() => {
                            // qsd goes on and retries; it reports the first failure only.
                            eprintln!(
                                "bulkhead: Unable to connect character device {}: {}",
                                c.id,
                                chardev::connect_error(&path, &e)
                            );
                            None
                        }
                        Err(e) => return Err(chardev::connect_error(&path, &e)),
                    };
                    Chardev::Client {
                        path,
                        stream,
                        reconnect,
                    }
                }
                _ => {
                    return Err("bulkhead supports only Unix socket client chardevs".to_string());
                }
            },
            ChardevBackend::Other(name) if name == "null" => Chardev::Null,
            ChardevBackend::Other(name) => {
                return Err(format!(
                    "bulkhead does not support chardev backend '{name}'"
                ));
            }
        };
        let kind = match &dev {
            Chardev::Socket(_, path, _) => chardev::Kind::UnixServer(path.clone()),
            // qsd names an inherited listener by its address, like one it bound.
            Chardev::Inherited(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(PathBuf::from))
            {
                Some(path) => chardev::Kind::UnixServer(path),
                None => chardev::Kind::Fd,
            },
            Chardev::Stdio => chardev::Kind::Stdio,
            Chardev::Client { path, .. } => chardev::Kind::UnixClient(path.clone()),
            Chardev::Null => chardev::Kind::Null,
        };
        let mut table = self.front.chardevs.borrow_mut();
        table.insert(&c.id, kind, None);
        if let Chardev::Client {
            stream: Some(_), ..
        } = &dev
        {
            table.set_connected(&c.id, true);
        }
        drop(table);
        self.chardev_ids.insert(c.id.clone());
        self.chardevs.insert(c.id.clone(), dev);
        Ok(())
    }

    fn monitor(&mut self, o: MonitorOptions) -> Result<(), String> {
        if !self.chardev_ids.contains(&o.chardev) {
            return Err(format!("chardev \"{}\" not found", o.chardev));
        }
        if self.used_chardevs.contains(&o.chardev) {
            return Err(format!("chardev '{}' is already in use", o.chardev));
        }
        if o.mode == Some(MonitorMode::Readline) {
            return Err("Only QMP is supported".to_string());
        }
        let Some(dev) = self.chardevs.remove(&o.chardev) else {
            return Err(format!("chardev '{}' is already in use", o.chardev));
        };
        self.front.chardevs.borrow_mut().attach_monitor(&o.chardev);
        self.used_chardevs.insert(o.chardev.clone());
        self.monitors
            .push((dev, o.pretty.unwrap_or(false), o.chardev));
        Ok(())
    }
}

async fn run(opts: Vec<CliOption>, mut ready: Option<std::fs::File>, daemonize: bool) -> u8 {
    let isolation = opts
        .iter()
        .rev()
        .find_map(|o| match o.parsed {
            Ok(OptionKind::Isolation(i)) => Some(i),
            _ => None,
        })
        .unwrap_or_default();
    let bus = EventBus::default().start();
    let supervisor = SupervisorActor::new(EventSink(bus.clone()), isolation).start();
    let (quit_tx, mut quit_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
    let front = Front {
        stopped,
        supervisor: supervisor.clone(),
        bus: bus.clone(),
        quit: Rc::new(move || {
            let _ = quit_tx.send(());
        }),
        chardevs: Rc::default(),
    };
    let mut startup = Startup {
        supervisor: supervisor.clone(),
        front,
        chardevs: HashMap::new(),
        chardev_ids: HashSet::new(),
        used_chardevs: HashSet::new(),
        stdio_used: false,
        daemonize,
        monitors: Vec::new(),
    };
    let mut pidfile = None;
    for opt in &opts {
        for w in &opt.warnings {
            eprintln!("{}", cli::diagnostic(&opt.given, w));
        }
        if let Ok(OptionKind::Pidfile(p)) = &opt.parsed {
            pidfile = Some(PathBuf::from(p));
        }
        if let Some(text) = opt.error_text() {
            eprintln!("{text}");
            return finish(&supervisor, &stopped_tx, 1, &None, ready).await;
        }
        if let Err(msg) = startup.run_option(opt).await {
            eprintln!("{}", cli::diagnostic(&opt.given, &msg));
            return finish(&supervisor, &stopped_tx, 1, &None, ready).await;
        }
    }
    match supervisor.send(StartupComplete).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("bulkhead: {}", e.desc);
            return finish(&supervisor, &stopped_tx, 1, &None, ready).await;
        }
        Err(e) => {
            eprintln!("bulkhead: {e}");
            return finish(&supervisor, &stopped_tx, 1, &None, ready).await;
        }
    }
    if let Some(p) = &pidfile
        && let Err(e) = write_pidfile(p)
    {
        eprintln!("bulkhead: cannot create PID file: {e}");
        return finish(&supervisor, &stopped_tx, 1, &None, ready).await;
    }
    if let Some(mut w) = ready.take() {
        let _ = w.write_all(&[0]);
        detach_stdio();
    }
    for (id, dev) in startup.chardevs.drain() {
        startup.front.chardevs.borrow_mut().hold(&id, Box::new(dev));
    }
    for (dev, pretty, label) in std::mem::take(&mut startup.monitors) {
        let f = startup.front.clone();
        tokio::task::spawn_local(async move { front::run_monitor(dev, pretty, f, label).await });
    }

    let mut term = signal(tokio::signal::unix::SignalKind::terminate());
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt());
    let mut hup = signal(tokio::signal::unix::SignalKind::hangup());
    let quit_by_signal = tokio::select! {
        _ = quit_rx.recv() => false,
        _ = recv(&mut term) => true,
        _ = recv(&mut int) => true,
        _ = recv(&mut hup) => true,
    };
    if quit_by_signal {
        // Like qsd: exports are deleted (with their events) before exiting.
        let _ = supervisor
            .send(Execute {
                command: "quit".into(),
                args: Map::new(),
            })
            .await;
    }
    finish(&supervisor, &stopped_tx, 0, &pidfile, None).await
}

/// Writes our pid to `path`, refusing if another live process holds the file's lock
/// (as qsd does with `qemu_write_pidfile`).
fn write_pidfile(path: &PathBuf) -> Result<(), String> {
    let could_not = |e: std::io::Error| {
        let reason = e
            .raw_os_error()
            .map(bulkhead_actors::supervisor::strerror)
            .unwrap_or_else(|| e.to_string());
        format!("Could not create '{}': {reason}", path.display())
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(could_not)?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        format!(
            "Cannot lock pid file '{}': Resource temporarily unavailable",
            path.display()
        )
    })?;
    f.set_len(0).map_err(could_not)?;
    f.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(could_not)?;
    // The lock lives as long as the descriptor: keep it open until exit.
    std::mem::forget(f);
    Ok(())
}

/// After daemonizing: the parent has exited, so stdio goes to /dev/null.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for target in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which this process owns.
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).ok()
}

async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

async fn finish(
    supervisor: &actix::Addr<SupervisorActor>,
    stopped: &tokio::sync::watch::Sender<bool>,
    code: u8,
    pidfile: &Option<PathBuf>,
    ready: Option<std::fs::File>,
) -> u8 {
    let _ = supervisor.send(Shutdown).await;
    stopped.send_replace(true);
    if let Some(p) = pidfile {
        let _ = std::fs::remove_file(p);
    }
    if let Some(mut w) = ready {
        let _ = w.write_all(&[code]);
    }
    actix::System::current().stop_with_code(i32::from(code));
    code
}
