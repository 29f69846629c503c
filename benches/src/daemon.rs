//! Starting the servers under test (qsd, bulkhead, nbdkit) on a backing, and proving
//! each one serves before anything is measured.
//!
//! Runs in the benchmark harness only. qsd and bulkhead get the same command line
//! (one QMP monitor) and the same QMP set-up (`blockdev-add`, `nbd-server-start`,
//! `block-export-add`), so the harness works whether or not bulkhead already accepts
//! `--blockdev/--export` on its command line. nbdkit gets its `null` or `file` plugin.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::procs::{self, Guarded, ProcError};
use crate::qmp::{self, Qmp, QmpError};

/// How long a daemon may take to open its QMP or NBD socket.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a readiness probe (nbdinfo, qemu-io) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// The export and node name every server uses, so URIs differ only in the socket.
pub const EXPORT: &str = "disk";

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Server {
    /// qemu-storage-daemon, the oracle.
    Qsd,
    /// bulkhead, the system under test.
    Bulkhead,
    /// nbdkit, a reference NBD server.
    Nbdkit,
}

impl Server {
    /// Short name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Server::Qsd => "qsd",
            Server::Bulkhead => "bulkhead",
            Server::Nbdkit => "nbdkit",
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the exported node sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backing {
    /// `null-co` with `read-zeroes=off`; nbdkit's `null` plugin.
    Null,
    /// `raw` over `file` on the /dev/shm image; nbdkit's `file` plugin.
    RawFile,
    /// `file` alone on the /dev/shm image; nbdkit's `file` plugin.
    File,
    /// `qcow2` over `file`: every cluster allocated (the raw image converted), so reads
    /// and writes are plain lookups and data I/O.
    Qcow2Full,
    /// `qcow2` over `file` on a fresh, empty image ([`FRESH_SCALE`] times the export
    /// size) made anew for every job, so every write allocates.
    Qcow2Fresh,
    /// `qcow2` over `file`, the top of a three-image chain (empty top and middle, the
    /// data in a fully allocated base), opened from the names inside the images; reads
    /// only.
    Qcow2Chain,
}

/// How many times the export size a fresh qcow2 image is, so that random writes
/// aligned to clusters rarely meet a cluster twice (see [`crate::images`]).
pub const FRESH_SCALE: u64 = 16;

/// What the readiness probe checks through the export, besides its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A read succeeds (null: nothing is stored).
    Read,
    /// A written pattern reads back.
    WriteRead,
    /// The base image's fill pattern reads back (through the whole chain).
    ReadFill,
}

impl Backing {
    /// Every backing, in table order.
    pub const ALL: [Backing; 6] = [
        Backing::Null,
        Backing::RawFile,
        Backing::File,
        Backing::Qcow2Full,
        Backing::Qcow2Fresh,
        Backing::Qcow2Chain,
    ];

    /// Short name used in JSON, file names and `--only`.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Null => "null",
            Backing::RawFile => "raw-file",
            Backing::File => "file",
            Backing::Qcow2Full => "qcow2-full",
            Backing::Qcow2Fresh => "qcow2-fresh",
            Backing::Qcow2Chain => "qcow2-chain",
        }
    }

    /// The backing called `name`.
    pub fn from_name(name: &str) -> Option<Backing> {
        Backing::ALL.into_iter().find(|b| b.name() == name)
    }

    /// Heading for the table section.
    pub fn title(self) -> &'static str {
        match self {
            Backing::Null => "null-co, read-zeroes=off (nbdkit: null plugin)",
            Backing::RawFile => "raw over file on /dev/shm (nbdkit: file plugin, same file)",
            Backing::File => "file on /dev/shm (nbdkit: file plugin, same file)",
            Backing::Qcow2Full => {
                "qcow2 over file on /dev/shm, fully allocated (64 KiB clusters; no nbdkit)"
            }
            Backing::Qcow2Fresh => {
                "qcow2 over file on /dev/shm, fresh sparse image per job: every write allocates \
                 (random writes cluster-aligned, bounded; see benches/README.md; no nbdkit)"
            }
            Backing::Qcow2Chain => {
                "qcow2 over file on /dev/shm, reads through a three-deep chain \
                 (empty top and middle, allocated base; no nbdkit)"
            }
        }
    }

    /// True for the qcow2 backings.
    pub fn is_qcow2(self) -> bool {
        matches!(
            self,
            Backing::Qcow2Full | Backing::Qcow2Fresh | Backing::Qcow2Chain
        )
    }

    /// What the readiness probe checks.
    pub fn probe(self) -> Probe {
        match self {
            Backing::Null => Probe::Read,
            Backing::RawFile | Backing::File | Backing::Qcow2Full | Backing::Qcow2Fresh => {
                Probe::WriteRead
            }
            Backing::Qcow2Chain => Probe::ReadFill,
        }
    }

    /// True when the jobs that write run on this backing (not on the chain, whose
    /// reads must keep going through all three images).
    pub fn takes_writes(self) -> bool {
        !matches!(self, Backing::Qcow2Chain)
    }

    /// True when `qemu-img bench` runs on this backing. Not on qcow2: the issue asks
    /// for the fio rows there, and the run stays shorter.
    pub fn runs_qemu_img_bench(self) -> bool {
        !self.is_qcow2()
    }

    /// True when every job gets a new image and a new server.
    pub fn fresh_per_job(self) -> bool {
        matches!(self, Backing::Qcow2Fresh)
    }

    /// Size of the export for a run whose `--size` is `size`.
    pub fn export_size(self, size: u64) -> u64 {
        match self {
            Backing::Qcow2Fresh => size.saturating_mul(FRESH_SCALE),
            _ => size,
        }
    }

    /// The nbdkit target measured for this backing: the file plugin serves both file
    /// backings, so it is measured once under [`Backing::File`]; nothing for qcow2.
    pub fn nbdkit_twin(self) -> Option<Backing> {
        match self {
            Backing::Null => Some(Backing::Null),
            Backing::RawFile | Backing::File => Some(Backing::File),
            Backing::Qcow2Full | Backing::Qcow2Fresh | Backing::Qcow2Chain => None,
        }
    }

    /// The `blockdev-add` arguments of the exported node on `image` (the raw image,
    /// or this backing's qcow2 image). A chain's backing images are not named: both
    /// daemons open them from the names inside the images.
    pub fn blockdev(self, image: &Path, size: u64) -> Value {
        let filename = image.display().to_string();
        match self {
            Backing::Null => json!({
                "driver": "null-co", "node-name": EXPORT, "size": size, "read-zeroes": false
            }),
            Backing::RawFile => json!({
                "driver": "raw", "node-name": EXPORT,
                "file": { "driver": "file", "node-name": "proto", "filename": filename }
            }),
            Backing::File => json!({
                "driver": "file", "node-name": EXPORT, "filename": filename
            }),
            Backing::Qcow2Full | Backing::Qcow2Fresh | Backing::Qcow2Chain => json!({
                "driver": "qcow2", "node-name": EXPORT,
                "file": { "driver": "file", "node-name": "proto", "filename": filename }
            }),
        }
    }
}

/// Why a server could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Starting or waiting failed.
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// The QMP set-up failed.
    #[error("{server}: {source}\n--- {server} log tail ---\n{log}")]
    Qmp {
        /// Server.
        server: Server,
        /// What went wrong.
        #[source]
        source: QmpError,
        /// Last lines the server printed.
        log: String,
    },
    /// The server exited while it should be serving.
    #[error("{server} exited early ({status})\n--- {server} log tail ---\n{log}")]
    Died {
        /// Server.
        server: Server,
        /// Exit status.
        status: String,
        /// Last lines the server printed.
        log: String,
    },
    /// A readiness probe showed the server does not serve the export correctly.
    #[error("{server} on {backing} does not serve: {what}\n{output}")]
    NotServing {
        /// Server.
        server: Server,
        /// Backing name.
        backing: &'static str,
        /// Which check failed.
        what: String,
        /// The probe's output.
        output: String,
    },
}

/// Paths the servers need.
#[derive(Debug, Clone)]
pub struct Programs {
    /// qemu-storage-daemon.
    pub qsd: PathBuf,
    /// bulkhead (release build).
    pub bulkhead: PathBuf,
    /// nbdkit.
    pub nbdkit: PathBuf,
}

/// A server that is up and exporting [`EXPORT`].
#[derive(Debug)]
pub struct Running {
    /// Which server.
    pub server: Server,
    /// On which backing.
    pub backing: Backing,
    /// NBD URI of the export.
    pub uri: String,
    /// The server process (dropped last, after the QMP connection).
    pub process: Guarded,
    qmp: Option<Qmp>,
    log: PathBuf,
}

/// The last `n` lines of a log file.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The qsd-style command line bulkhead and qsd share: one QMP monitor on `qmp_sock`.
pub fn monitor_args(qmp_sock: &Path) -> Vec<String> {
    vec![
        "--chardev".to_owned(),
        format!(
            "socket,path={},server=on,wait=off,id=m0",
            qmp_sock.display()
        ),
        "--monitor".to_owned(),
        "chardev=m0".to_owned(),
    ]
}

/// Starts a QMP daemon (qsd or bulkhead) with nothing configured and returns it
/// with the path of its QMP socket.
pub fn spawn_qmp_daemon(
    programs: &Programs,
    server: Server,
    dir: &Path,
    tag: &str,
) -> Result<(Guarded, PathBuf, PathBuf), DaemonError> {
    let program = match server {
        Server::Qsd => &programs.qsd,
        Server::Bulkhead => &programs.bulkhead,
        Server::Nbdkit => &programs.nbdkit,
    };
    let qmp_sock = dir.join(format!("{tag}-qmp.sock"));
    let log = dir.join(format!("{tag}.log"));
    let _ = std::fs::remove_file(&qmp_sock);
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(program);
    cmd.args(monitor_args(&qmp_sock));
    let child = Guarded::spawn(server.name(), &mut cmd, &log)?;
    Ok((child, qmp_sock, log))
}

/// The qemu-io commands of a readiness probe.
pub fn probe_commands(probe: Probe) -> Vec<&'static str> {
    match probe {
        Probe::Read => vec!["-c", "read 1M 64k"],
        Probe::WriteRead => vec!["-c", "write -P 0xa5 1M 64k", "-c", "read -P 0xa5 1M 64k"],
        Probe::ReadFill => vec!["-c", "read -P 0x5a 1M 64k"],
    }
}

/// Whether qemu-io's output shows the probe passed (qemu-io exits 0 even when a
/// request or a pattern check fails, so the text decides).
pub fn probe_passed(probe: Probe, out: &str) -> bool {
    let wrote = probe != Probe::WriteRead || out.contains("wrote 65536/65536 bytes");
    wrote && out.contains("read 65536/65536 bytes") && !out.contains("failed")
}

/// Fails with the log tail if `child` has exited.
pub fn check_alive(child: &mut Guarded, server: Server, log: &Path) -> Result<(), DaemonError> {
    match child.try_status()? {
        Some(status) => Err(DaemonError::Died {
            server,
            status: status.to_string(),
            log: log_tail(log, 20),
        }),
        None => Ok(()),
    }
}

impl Running {
    /// Starts `server` exporting `backing` writable as [`EXPORT`] and checks that it
    /// serves.
    pub fn start(
        programs: &Programs,
        server: Server,
        backing: Backing,
        image: &Path,
        size: u64,
        dir: &Path,
    ) -> Result<Running, DaemonError> {
        let tag = format!("{}-{}", server.name(), backing.name());
        let nbd_sock = dir.join(format!("{tag}-nbd.sock"));
        let _ = std::fs::remove_file(&nbd_sock);
        let uri = format!("nbd+unix:///{EXPORT}?socket={}", nbd_sock.display());
        let running = match server {
            Server::Qsd | Server::Bulkhead => {
                let (mut child, qmp_sock, log) = spawn_qmp_daemon(programs, server, dir, &tag)?;
                let qmp = Self::setup_over_qmp(
                    &mut child, server, backing, image, size, &qmp_sock, &nbd_sock, &log,
                )?;
                Running {
                    server,
                    backing,
                    uri,
                    process: child,
                    qmp: Some(qmp),
                    log,
                }
            }
            Server::Nbdkit => {
                let log = dir.join(format!("{tag}.log"));
                let _ = std::fs::remove_file(&log);
                let mut cmd = Command::new(&programs.nbdkit);
                // --exit-with-parent: nbdkit goes away even if the harness is SIGKILLed.
                cmd.args(["--foreground", "--exit-with-parent", "--unix"])
                    .arg(&nbd_sock);
                match backing {
                    Backing::Null => cmd.args(["null", &format!("size={size}")]),
                    _ => cmd.arg("file").arg(format!("file={}", image.display())),
                };
                let mut child = Guarded::spawn(server.name(), &mut cmd, &log)?;
                let ready = qmp::connect_when_ready(&nbd_sock, READY_TIMEOUT, || {
                    check_alive(&mut child, server, &log).map_err(|e| QmpError::Gone(e.to_string()))
                });
                if let Err(source) = ready {
                    return Err(DaemonError::Qmp {
                        server,
                        source,
                        log: log_tail(&log, 20),
                    });
                }
                Running {
                    server,
                    backing,
                    uri,
                    process: child,
                    qmp: None,
                    log,
                }
            }
        };
        running.check_serving(size, dir)?;
        Ok(running)
    }

    #[allow(clippy::too_many_arguments)]
    fn setup_over_qmp(
        child: &mut Guarded,
        server: Server,
        backing: Backing,
        image: &Path,
        size: u64,
        qmp_sock: &Path,
        nbd_sock: &Path,
        log: &Path,
    ) -> Result<Qmp, DaemonError> {
        let wrap = |source: QmpError| DaemonError::Qmp {
            server,
            source,
            log: log_tail(log, 20),
        };
        let mut qmp = Qmp::open(qmp_sock, READY_TIMEOUT, || {
            check_alive(child, server, log).map_err(|e| QmpError::Gone(e.to_string()))
        })
        .map_err(wrap)?;
        let steps = [
            ("blockdev-add", backing.blockdev(image, size)),
            (
                "nbd-server-start",
                json!({ "addr": { "type": "unix", "data": { "path": nbd_sock.display().to_string() } } }),
            ),
            (
                "block-export-add",
                json!({ "type": "nbd", "id": "e0", "node-name": EXPORT, "name": EXPORT, "writable": true }),
            ),
        ];
        for (command, args) in steps {
            qmp.execute(command, Some(args)).map_err(wrap)?;
        }
        Ok(qmp)
    }

    /// Proves the export serves: nbdinfo sees the right size, and qemu-io reads (and,
    /// where data is stored, writes a pattern and reads it back).
    fn check_serving(&self, size: u64, dir: &Path) -> Result<(), DaemonError> {
        let not_serving = |what: String, output: String| DaemonError::NotServing {
            server: self.server,
            backing: self.backing.name(),
            what,
            output,
        };
        let log = dir.join("probe.log");
        let (status, out) = procs::run_logged(
            "nbdinfo",
            Command::new("nbdinfo").args(["--json", &self.uri]),
            &log,
            PROBE_TIMEOUT,
        )?;
        if !status.success() {
            return Err(not_serving(format!("nbdinfo exited {status}"), out));
        }
        let reported = out
            .find('{')
            .and_then(|at| serde_json::from_str::<Value>(&out[at..]).ok())
            .and_then(|v| v["exports"][0]["export-size"].as_u64());
        if reported != Some(size) {
            return Err(not_serving(
                format!("nbdinfo reports size {reported:?}, expected {size}"),
                out,
            ));
        }
        let mut io = Command::new("qemu-io");
        io.args(["-f", "raw"]);
        let probe = self.backing.probe();
        io.args(probe_commands(probe));
        io.arg(&self.uri);
        let (status, out) = procs::run_logged("qemu-io", &mut io, &log, PROBE_TIMEOUT)?;
        if !status.success() || !probe_passed(probe, &out) {
            return Err(not_serving(format!("qemu-io check exited {status}"), out));
        }
        Ok(())
    }

    /// Fails if the server has exited.
    pub fn check_alive(&mut self) -> Result<(), DaemonError> {
        check_alive(&mut self.process, self.server, &self.log)
    }

    /// Summed RSS (KiB) of the server and its descendants, and the process count.
    pub fn rss(&self) -> Option<(u64, usize)> {
        procs::tree_rss_kib(self.process.pid())
    }

    /// Stops the server: `quit` over QMP where there is one, then the process guard.
    pub fn stop(mut self) {
        if let Some(mut q) = self.qmp.take() {
            let _ = q.execute("quit", None);
        }
        let _ = self.process.wait_timeout(Duration::from_secs(5));
        self.process.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_qmp_daemons_get_the_same_monitor_command_line() {
        assert_eq!(
            monitor_args(Path::new("/dev/shm/x/q.sock")),
            [
                "--chardev",
                "socket,path=/dev/shm/x/q.sock,server=on,wait=off,id=m0",
                "--monitor",
                "chardev=m0"
            ]
        );
    }

    #[test]
    fn null_backing_is_null_co_without_read_zeroes() {
        assert_eq!(
            Backing::Null.blockdev(Path::new("/i"), 1 << 30).to_string(),
            r#"{"driver":"null-co","node-name":"disk","size":1073741824,"read-zeroes":false}"#
        );
    }

    #[test]
    fn raw_backing_stacks_raw_on_a_file_node() {
        assert_eq!(
            Backing::RawFile
                .blockdev(Path::new("/dev/shm/i.raw"), 1)
                .to_string(),
            r#"{"driver":"raw","node-name":"disk","file":{"driver":"file","node-name":"proto","filename":"/dev/shm/i.raw"}}"#
        );
    }

    #[test]
    fn nbdkit_file_plugin_stands_in_for_both_file_backings_and_no_qcow2() {
        assert_eq!(Backing::RawFile.nbdkit_twin(), Some(Backing::File));
        assert_eq!(Backing::File.nbdkit_twin(), Some(Backing::File));
        assert_eq!(Backing::Null.nbdkit_twin(), Some(Backing::Null));
        for b in [Backing::Qcow2Full, Backing::Qcow2Fresh, Backing::Qcow2Chain] {
            assert_eq!(b.nbdkit_twin(), None);
        }
    }

    #[test]
    fn qcow2_backings_stack_qcow2_on_a_file_node_and_name_no_backing() {
        let expected = r#"{"driver":"qcow2","node-name":"disk","file":{"driver":"file","node-name":"proto","filename":"/dev/shm/t.qcow2"}}"#;
        for b in [Backing::Qcow2Full, Backing::Qcow2Fresh, Backing::Qcow2Chain] {
            assert_eq!(
                b.blockdev(Path::new("/dev/shm/t.qcow2"), 1).to_string(),
                expected
            );
        }
    }

    #[test]
    fn backing_names_round_trip_and_only_the_fresh_image_is_larger() {
        for b in Backing::ALL {
            assert_eq!(Backing::from_name(b.name()), Some(b));
        }
        assert_eq!(Backing::from_name("qcow2"), None);
        assert_eq!(Backing::Qcow2Fresh.export_size(1 << 30), 16 << 30);
        assert_eq!(Backing::Qcow2Full.export_size(1 << 30), 1 << 30);
        assert!(Backing::Qcow2Fresh.fresh_per_job());
        assert!(!Backing::Qcow2Chain.takes_writes());
        assert!(Backing::Qcow2Full.takes_writes());
        assert!(!Backing::Qcow2Full.runs_qemu_img_bench());
        assert!(Backing::RawFile.runs_qemu_img_bench());
    }

    #[test]
    fn probes_check_what_each_backing_stores() {
        assert_eq!(
            probe_commands(Backing::Qcow2Chain.probe()),
            ["-c", "read -P 0x5a 1M 64k"]
        );
        assert_eq!(Backing::Null.probe(), Probe::Read);
        assert_eq!(Backing::Qcow2Fresh.probe(), Probe::WriteRead);
        let ok_read = "read 65536/65536 bytes at offset 1048576\n";
        let ok_write = "wrote 65536/65536 bytes at offset 1048576\n";
        assert!(probe_passed(Probe::ReadFill, ok_read));
        assert!(!probe_passed(
            Probe::ReadFill,
            "Pattern verification failed at offset 1048576, 65536 bytes\nread 65536/65536 bytes\n"
        ));
        assert!(!probe_passed(Probe::WriteRead, ok_read));
        assert!(probe_passed(
            Probe::WriteRead,
            &format!("{ok_write}{ok_read}")
        ));
    }
}
