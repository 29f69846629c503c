//! Supervisor start-up: carry out the command line strictly in order, like qsd, then
//! serve until `quit` or a termination signal.
//!
//! Stage one (parsing) touches nothing; stage two (here) binds sockets, starts
//! monitors and creates nodes, and any failure prints `bulkhead: OPTION: MESSAGE` and
//! exits 1, as qsd does.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;

use actix::Actor;
use bulkhead_actors::events::{EventBus, EventSink};
use bulkhead_actors::front::{self, Chardev, Front};
use bulkhead_actors::supervisor::actor::{Execute, Shutdown, SupervisorActor};
use serde_json::{Map, Value};

/// One start-up option, in command-line order.
#[derive(Debug)]
enum Opt {
    Chardev {
        id: String,
        backend: ChardevBackend,
        given: String,
    },
    Monitor {
        chardev: String,
        pretty: bool,
        given: String,
    },
    Blockdev {
        options: Value,
        given: String,
    },
    Pidfile(PathBuf),
    Daemonize,
}

#[derive(Debug)]
enum ChardevBackend {
    Socket(PathBuf),
    Stdio,
}

/// Minimal argv parsing (to be replaced by the full qsd command line parser).
fn parse(args: &[String]) -> Result<Vec<Opt>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("option '{name}' requires an argument"))
        };
        match name.as_str() {
            "--chardev" => {
                let v = value()?;
                let kv = keyval(&v, "backend");
                let id = kv.get("id").cloned().unwrap_or_default();
                let backend = match kv.get("backend").map(String::as_str) {
                    Some("socket") => ChardevBackend::Socket(PathBuf::from(
                        kv.get("path").cloned().unwrap_or_default(),
                    )),
                    Some("stdio") => ChardevBackend::Stdio,
                    other => return Err(format!("--chardev {v}: unsupported backend {other:?}")),
                };
                out.push(Opt::Chardev {
                    id,
                    backend,
                    given: v,
                });
            }
            "--monitor" => {
                let v = value()?;
                let kv = keyval(&v, "chardev");
                out.push(Opt::Monitor {
                    chardev: kv.get("chardev").cloned().unwrap_or_default(),
                    pretty: kv.get("pretty").map(String::as_str) == Some("on"),
                    given: v,
                });
            }
            "--blockdev" => {
                let v = value()?;
                let options = if v.starts_with('{') {
                    serde_json::from_str(&v).map_err(|e| format!("--blockdev {v}: {e}"))?
                } else {
                    nested(&v)
                };
                out.push(Opt::Blockdev { options, given: v });
            }
            "--pidfile" => out.push(Opt::Pidfile(PathBuf::from(value()?))),
            "--daemonize" => out.push(Opt::Daemonize),
            other => return Err(format!("{other}: Unexpected argument")),
        }
    }
    Ok(out)
}

fn keyval(s: &str, implied: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for (i, part) in s.split(',').enumerate() {
        match part.split_once('=') {
            Some((k, v)) => m.insert(k.to_string(), v.to_string()),
            None if i == 0 => m.insert(implied.to_string(), part.to_string()),
            None => m.insert(part.to_string(), "on".to_string()),
        };
    }
    m
}

fn nested(s: &str) -> Value {
    let mut root = Map::new();
    for (k, v) in keyval(s, "driver") {
        let leaf = if let Ok(n) = v.parse::<u64>() {
            Value::from(n)
        } else if v == "on" || v == "off" {
            Value::Bool(v == "on")
        } else {
            Value::String(v)
        };
        let mut cur = &mut root;
        let parts: Vec<&str> = k.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            let e = cur
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !e.is_object() {
                *e = Value::Object(Map::new());
            }
            let Value::Object(next) = e else {
                unreachable!()
            };
            cur = next;
        }
        cur.insert(parts[parts.len() - 1].to_string(), leaf);
    }
    Value::Object(root)
}

/// Runs the supervisor; returns the process exit code.
pub fn main(args: &[String]) -> ExitCode {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bulkhead: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemonize = opts.iter().any(|o| matches!(o, Opt::Daemonize));
    // Fork before any thread exists; the parent waits for the child's start-up result.
    let ready_pipe = if daemonize {
        match daemonize_now() {
            Ok(Some(pipe)) => Some(pipe),
            Ok(None) => unreachable_parent(),
            Err(e) => {
                eprintln!("bulkhead: --daemonize: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let sys = actix::System::new();
    let code = sys.block_on(run(opts, ready_pipe));
    ExitCode::from(code)
}

fn unreachable_parent() -> ! {
    std::process::exit(0)
}

/// Forks; the parent waits for one status byte from the child and exits with it. In
/// the child returns the pipe to report on.
fn daemonize_now() -> Result<Option<std::fs::File>, String> {
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
    Ok(Some(std::fs::File::from(w)))
}

async fn run(opts: Vec<Opt>, mut ready: Option<std::fs::File>) -> u8 {
    let bus = EventBus::default().start();
    let supervisor = SupervisorActor::new(EventSink(bus.clone())).start();
    let (quit_tx, mut quit_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let front = Front {
        supervisor: supervisor.clone(),
        bus: bus.clone(),
        quit: Rc::new(move || {
            let _ = quit_tx.send(());
        }),
    };

    let mut chardevs: HashMap<String, Chardev> = HashMap::new();
    let mut pidfile = None;
    let fail = |given: &str, msg: &str| {
        eprintln!("bulkhead: {given}: {msg}");
        1u8
    };
    for opt in opts {
        match opt {
            Opt::Chardev { id, backend, given } => {
                let dev = match backend {
                    ChardevBackend::Stdio => Chardev::Stdio,
                    ChardevBackend::Socket(path) => match Chardev::bind(path.clone()) {
                        Ok(d) => d,
                        Err(e) => {
                            return finish(
                                &supervisor,
                                fail(
                                    &format!("--chardev {given}"),
                                    &format!("Failed to bind socket to {}: {e}", path.display()),
                                ),
                                &pidfile,
                                ready,
                            )
                            .await;
                        }
                    },
                };
                chardevs.insert(id, dev);
            }
            Opt::Monitor {
                chardev,
                pretty,
                given,
            } => {
                let Some(dev) = chardevs.remove(&chardev) else {
                    return finish(
                        &supervisor,
                        fail(
                            &format!("--monitor {given}"),
                            &format!("chardev \"{chardev}\" not found"),
                        ),
                        &pidfile,
                        ready,
                    )
                    .await;
                };
                let f = front.clone();
                tokio::task::spawn_local(async move { front::run_monitor(dev, pretty, f).await });
            }
            Opt::Blockdev { options, given } => {
                let Value::Object(args) = options else {
                    continue;
                };
                let args = match bulkhead_actors::dispatch::validate("blockdev-add", &args) {
                    Ok(a) => a,
                    Err(e) => {
                        return finish(
                            &supervisor,
                            fail(&format!("--blockdev {given}"), &e.desc),
                            &pidfile,
                            ready,
                        )
                        .await;
                    }
                };
                match supervisor
                    .send(Execute {
                        command: "blockdev-add".into(),
                        args,
                    })
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        return finish(
                            &supervisor,
                            fail(&format!("--blockdev {given}"), &e.desc),
                            &pidfile,
                            ready,
                        )
                        .await;
                    }
                    Err(e) => {
                        return finish(
                            &supervisor,
                            fail(&format!("--blockdev {given}"), &e.to_string()),
                            &pidfile,
                            ready,
                        )
                        .await;
                    }
                }
            }
            Opt::Pidfile(p) => pidfile = Some(p),
            Opt::Daemonize => {}
        }
    }
    if let Some(p) = &pidfile
        && let Err(e) = std::fs::write(p, format!("{}\n", std::process::id()))
    {
        return finish(
            &supervisor,
            fail(
                &format!("--pidfile {}", p.display()),
                &format!("Cannot write pid file: {e}"),
            ),
            &None,
            ready,
        )
        .await;
    }
    if let Some(mut w) = ready.take() {
        let _ = w.write_all(&[0]);
        // Detach stdio like a daemon: the parent has exited.
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            use std::os::fd::AsRawFd;
            for target in 0..3 {
                // SAFETY: dup2 onto the standard descriptors, which we own.
                unsafe { libc::dup2(null.as_raw_fd(), target) };
            }
        }
    }

    let mut term = signal(tokio::signal::unix::SignalKind::terminate());
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt());
    let mut hup = signal(tokio::signal::unix::SignalKind::hangup());
    tokio::select! {
        _ = quit_rx.recv() => {}
        _ = recv(&mut term) => {}
        _ = recv(&mut int) => {}
        _ = recv(&mut hup) => {}
    }
    finish(&supervisor, 0, &pidfile, None).await
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
    code: u8,
    pidfile: &Option<PathBuf>,
    ready: Option<std::fs::File>,
) -> u8 {
    let _ = supervisor.send(Shutdown).await;
    if let Some(p) = pidfile {
        let _ = std::fs::remove_file(p);
    }
    if let Some(mut w) = ready {
        let _ = w.write_all(&[code]);
    }
    actix::System::current().stop_with_code(i32::from(code));
    code
}
