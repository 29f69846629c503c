//! qemu-storage-daemon 10.0.2's command line, stage one: argv to typed options, with qsd's
//! exact error texts, touching no files, sockets or processes.
//!
//! Runs in the supervisor before anything else. The command line comes from the operator,
//! so it is trusted to mean what it says but not to be well formed: nothing here panics.
//!
//! # How qsd reads its command line (and so how bulkhead must)
//! qsd runs `getopt_long(argc, argv, "-hT:V", ...)` twice:
//! 1. A pre-init pass acts only on getopt errors, `-h`, `-V`, `--pidfile` and
//!    `--daemonize`, in argv order: the first of an error, `-h` or `-V` decides, even when
//!    it comes after a broken `--blockdev`. [`parse_args`] is this pass: it returns
//!    [`CliAction::Help`], [`CliAction::Version`] or a [`CliError`] (printed as is, exit 1).
//!    bulkhead's own `--sandbox on|off` is checked in this pass too.
//! 2. A second pass executes every other option strictly in order, each one fully
//!    (parse, check, create) before the next is even parsed. So a syntax error in the
//!    third option is only reported if the first two succeed. [`parse_args`] therefore
//!    does not fail on a bad option: it records the error in that option's
//!    [`CliOption::parsed`], and the lead reports it when execution reaches it.
//!
//! Long options may be abbreviated to any unique prefix (`--blo`), and take their
//! argument as `--opt=value` or `--opt value` (the next argv element, even if it starts
//! with `-`). Everything after `--` is ignored, silently. Any other argument that does
//! not start with `-` (and a lone `-`) is reported in the second pass as
//! `<arg>: Unexpected argument`.
//!
//! # Message format and exit status
//! Every startup error is one line `bulkhead: <option as given>: <message>` on stderr,
//! then exit status 1 (see [`diagnostic`]). "As given" is the argv elements the option
//! took, joined by one space: `--blockdev x`, `--blockdev=x`, `-Tfoo`, `--blo x`, and
//! `--chardev ` (trailing space) for an empty argument. Some messages carry a hint on
//! further lines with no prefix (see [`OptionError`]). Warnings and infos use the same
//! prefix (`bulkhead: <given>: warning: ...`). getopt's own errors have no location and
//! use glibc's words ([`CliError`]); qsd prints its `argv[0]` there, bulkhead prints
//! `bulkhead`. `-h` and `-V` print to stdout and exit 0.
//!
//! # Stage two: texts observed from qsd 10.0.2 while executing options
//! These errors need state (existing nodes, chardevs, servers) or system calls, so the
//! lead raises them while executing; all are printed as `bulkhead: <given>: <text>` and
//! exit 1 unless noted. `<x>` marks a value taken from the option.
//!
//! | option | situation | text |
//! |---|---|---|
//! | `--monitor` | chardev `<c>` not (yet) defined | `chardev "<c>" not found` |
//! | `--monitor` | chardev already used by a monitor | `chardev '<c>' is already in use` |
//! | `--monitor` | `mode=readline` (checked after the chardev lookup) | `Only QMP is supported` |
//! | `--export` | `node-name` unknown (checked before the NBD server) | `Cannot find device='' nor node-name='<n>'` |
//! | `--export` | type nbd, no `--nbd-server` before it | `NBD server not running` |
//! | `--export` | duplicate id | `Block export id '<id>' is already in use` |
//! | `--export` | `bitmap=` (as the help text suggests) | `Parameter 'bitmap' is unexpected` (QAPI visitor) |
//! | `--nbd-server` | second one | `NBD server already running` |
//! | `--nbd-server` | bind fails | `Failed to bind socket to <path>: No such file or directory` |
//! | `--blockdev` | duplicate node-name | `Duplicate nodes with node-name='<n>'` |
//! | `--blockdev` | no node-name | `'node-name' must be specified for the root node` |
//! | `--blockdev` | `driver=file,,x` (keyval gives `file,x`) | `Parameter 'driver' does not accept value 'file,x'` |
//! | `--blockdev` | `driver=null-co,driver=file` (last wins) | `Parameter 'filename' is missing` |
//! | `--blockdev` | JSON form errors | `JSON parse error, premature EOI`, `Expecting at most one JSON value` |
//! | `--object` | no id | `Parameter 'id' is missing` |
//! | `--object` | unknown type | `Parameter 'qom-type' does not accept value '<t>'` |
//! | `--object` | duplicate id | `attempt to add duplicate property '<id>' to object (type 'container')` |
//! | `--object help` / `<type>,help` | lists types / properties on stdout | exit 0 |
//! | `--chardev` | socket chardev with an id already used by a socket | `duplicate yank instance` |
//! | `--chardev` | other duplicate id | `attempt to add duplicate property '<id>' to object (type 'container')` |
//! | `--chardev` | socket, no path/host/fd, or a bad `fd=` (after the duplicate check) | `Unable to parse FD number <fd>` (empty `<fd>` leaves a trailing space); see [`parse_fd_number`] |
//! | `--chardev` | socket `server=on` with no path, host or fd | qsd 10.0.2 accepts it and runs (prints the waiting info with `disconnected:fd:,server=on` unless `wait=off`); bulkhead may refuse it |
//! | `--chardev` | `fd=N` not a socket (also `-1`) | `File descriptor '<N>' is not a socket` |
//! | `--chardev` | server socket, bind fails | `Failed to bind socket to <path>: <strerror>` |
//! | `--chardev` | client socket, connect fails | `Failed to connect to '<path>': <strerror>` |
//! | `--chardev` | client socket with `reconnect`/`reconnect-ms`, connect fails | not an error: `bulkhead: Unable to connect character device <id>: Failed to connect to '<path>': <strerror>` (no location), start-up goes on and the monitor retries |
//! | `--chardev` | both `reconnect` and `reconnect-ms` | `'reconnect' and 'reconnect-ms' are mutually exclusive` |
//! | `--chardev` | `server=on` with `reconnect` (`reconnect-ms` is accepted) | `'reconnect' option is incompatible with socket in server listen mode` |
//! | `--chardev` | `tls-creds=<x>` unknown | `No TLS credentials with id '<x>'` |
//! | `--chardev` | second `stdio` | `cannot use stdio by multiple character devices` |
//! | `--chardev` | `stdio` with `--daemonize` (anywhere on the line) | `cannot use stdio with -daemonize` |
//! | `--chardev` | server with `wait=on` (the default) | not an error: `bulkhead: <given>: info: QEMU waiting for connection on: disconnected:unix:<path>,server=on`, then blocks until a client connects |
//! | `-T` | pattern matching no event | warning, continues: `bulkhead: -T <p>: warning: trace event '<p>' does not exist` |
//! | `-T` | `events=<file>` unreadable | `bulkhead:<file>: No such file or directory` (no location, no space after the colon), exit 1 |
//! | `-T help` | lists trace events on stdout | exit 0 |
//! | `--pidfile` | cannot create (after all options ran) | `bulkhead: cannot create PID file: Could not create '<path>': No such file or directory` (no location) |
//!
//! | `--daemonize` | startup finished | the parent exits 0 once every option ran and the pid file exists; a startup error exits 1 with the text above |
//!
//! qsd exits 0 on `quit`, SIGINT, SIGHUP and SIGTERM once running.

mod chardev;
mod getopt;
mod help;
mod monitor;
mod qemuopts;
#[cfg(test)]
mod tests;

use std::fmt;

use bulkhead_actors::supervisor::Isolation;
use bulkhead_qmp::keyval::{self, KeyvalError};
use bulkhead_qmp::qapi::id_wellformed;
use bulkhead_qmp::qdict;
use serde_json::Value;

/// The name bulkhead prints where qsd prints `qemu-storage-daemon`.
pub const PROGRAM: &str = "bulkhead";

/// The qsd release whose command line and QMP this build reproduces.
pub const QSD_COMPATIBLE_VERSION: &str = "10.0.2";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum CliAction {
    /// Run the daemon: execute these options in order (see the module docs).
    Run(Vec<CliOption>),
    /// Print [`help_text`] to stdout, exit 0.
    Help,
    /// Print [`version_text`] to stdout, exit 0.
    Version,
}

/// One option of the second pass, in argv order.
#[derive(Debug, Clone, PartialEq)]
pub struct CliOption {
    /// The option as qsd names it in messages (argv elements joined by a space).
    pub given: String,
    /// Warnings qsd prints when it reaches this option, before executing it (and before
    /// its error, if any). Print each as [`diagnostic`]`(&given, w)`.
    pub warnings: Vec<CliWarning>,
    /// The parsed option, or the error to report when execution reaches it.
    pub parsed: Result<OptionKind, OptionError>,
}

impl CliOption {
    /// The complete stderr text for this option's stage-one error, if it has one.
    pub fn error_text(&self) -> Option<String> {
        self.parsed
            .as_ref()
            .err()
            .map(|e| diagnostic(&self.given, e))
    }
}

/// A parsed option.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionKind {
    /// `--blockdev`: BlockdevOptions, for the QAPI visitor then blockdev-add.
    Blockdev(OptionArg),
    /// `--chardev`, checked as far as qsd checks it before creating it.
    Chardev(ChardevOptions),
    /// `--chardev help` or `--chardev <backend>,help`: print `stdout`, exit `exit_code`.
    ChardevHelp {
        /// Exactly what qsd prints.
        stdout: String,
        /// qsd exits 0 for the backend list and 1 for the option list.
        exit_code: i32,
    },
    /// `--monitor`.
    Monitor(MonitorArg),
    /// `--nbd-server`: NbdServerOptions (flat SocketAddress `addr.*`).
    NbdServer(OptionArg),
    /// `--export`: BlockExportOptions.
    Export(OptionArg),
    /// `--object`: ObjectOptions (`qom-type` is the implied key).
    Object(OptionArg),
    /// `--object help` (tree `{}`) or `--object <type>,help` (tree holds `qom-type` and
    /// the other items): print the type list or the type's properties, exit 0.
    ObjectHelp(Value),
    /// `-T/--trace`. bulkhead has no QEMU trace events; see the stage-two table.
    Trace(TraceOptions),
    /// `--pidfile` (pre-init: the last one wins; written after all options ran).
    Pidfile(String),
    /// `--daemonize` (pre-init: position does not matter).
    Daemonize,
    /// `--sandbox on|off` (bulkhead's own, pre-init: the last one wins; default on).
    Sandbox(bool),
    /// `--isolation kind|image` (bulkhead's own, pre-init: the last one wins; default
    /// kind).
    Isolation(Isolation),
}

/// The argument of an option qsd reads with `qobject_input_visitor_new_str`.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionArg {
    /// Keyval syntax, parsed: objects, arrays and string leaves (QAPI keyval flavour).
    Keyval(Value),
    /// The argument started with `{`: QMP JSON, unparsed. Run it through the QMP JSON
    /// parser (errors such as `JSON parse error, premature EOI` or `Expecting at most one
    /// JSON value` are reported like any other), then the strict (non-keyval) visitor.
    Json(String),
}

/// `--monitor`'s argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorArg {
    /// Keyval form, already visited.
    Options(MonitorOptions),
    /// JSON form, unparsed: parse it, then [`MonitorOptions::from_json`].
    Json(String),
}

/// QAPI `MonitorMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMode {
    /// HMP; qsd refuses it at execution with `Only QMP is supported`.
    Readline,
    /// QMP.
    Control,
}

/// QAPI `MonitorOptions` (qapi/control.json).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorOptions {
    /// Monitor id (unused by qsd).
    pub id: Option<String>,
    /// Absent means control for qsd.
    pub mode: Option<MonitorMode>,
    /// Pretty-print replies.
    pub pretty: Option<bool>,
    /// The chardev to serve QMP on.
    pub chardev: String,
}

/// `-T`'s QemuOpts (`[enable=]<pattern>,events=<file>,file=<file>`), last value wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceOptions {
    /// Event name pattern; `help` lists events.
    pub enable: Option<String>,
    /// File of event patterns.
    pub events: Option<String>,
    /// Trace output file.
    pub file: Option<String>,
}

/// A `--chardev` that passed every check qsd makes before creating it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevOptions {
    /// The chardev id (first `id=` wins, checked to be an identifier).
    pub id: String,
    /// The backend and its settings.
    pub backend: ChardevBackend,
    /// Every `name=value` as validated, in order, `id` left out, flags expanded
    /// (`nowait` is `wait=off`). Lets the caller refuse options bulkhead does not do.
    pub opts: Vec<(String, String)>,
}

/// A chardev backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevBackend {
    /// `socket`.
    Socket(SocketChardev),
    /// `stdio` (`signal=` defaults on).
    Stdio {
        /// Whether ^C raises SIGINT.
        signal: bool,
    },
    /// A backend qsd has that bulkhead does not implement (`file`, `pty`, `null`, ...).
    Other(String),
}

/// A `socket` chardev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketChardev {
    /// Where to listen or connect.
    pub addr: SocketChardevAddr,
    /// `server=`, default off (client).
    pub server: bool,
    /// `wait=` if given; qsd's default for servers is to wait for a client.
    pub wait: Option<bool>,
    /// `nodelay=`/`delay=` combined, if either was given.
    pub nodelay: Option<bool>,
    /// `reconnect-ms=`, or `reconnect=` in seconds: a client retries connecting at
    /// start-up instead of failing (0 or absent: no retries).
    pub reconnect_ms: Option<u64>,
}

/// A socket chardev address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketChardevAddr {
    /// `path=` (Unix socket).
    Unix {
        /// Socket path.
        path: String,
        /// `abstract=`, default off.
        abstract_ns: bool,
        /// `tight=`, default on.
        tight: bool,
    },
    /// `host=`, `port=` (TCP).
    Inet {
        /// Host name or address.
        host: String,
        /// Port or service name.
        port: String,
    },
    /// `fd=`, or neither `path` nor `host` (then the string is empty). Parse it with
    /// [`parse_fd_number`] when opening, after the duplicate-id check, like qsd.
    Fd(String),
}

/// A warning qsd prints while reading an option (which still may succeed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliWarning {
    /// A QemuOpts flag without `=` (`server`, `nowait`).
    ShortFormBoolean {
        /// The flag as written (`nowait`).
        written: String,
        /// The replacement advice's `name=value` (`wait=off`).
        advice: String,
    },
}

impl fmt::Display for CliWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliWarning::ShortFormBoolean { written, advice } => write!(
                f,
                "warning: short-form boolean option '{written}' deprecated\nPlease use {advice} instead"
            ),
        }
    }
}

/// Why an option is refused. `Display` is qsd's text; a hint, where qsd prints one,
/// follows on its own line(s).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// Keyval syntax.
    #[error(transparent)]
    Keyval(#[from] KeyvalError),
    /// A positional argument.
    #[error("Unexpected argument")]
    UnexpectedArgument,
    /// QAPI visitor: a required member is absent.
    #[error("Parameter '{0}' is missing")]
    ParameterMissing(String),
    /// QAPI visitor: a member the type does not have.
    #[error("Parameter '{0}' is unexpected")]
    ParameterUnexpected(String),
    /// QAPI keyval visitor: an object or array where a scalar belongs.
    #[error("Parameters '{0}.*' are unexpected")]
    ParametersUnexpected(String),
    /// QAPI JSON visitor: wrong JSON type.
    #[error("Invalid parameter type for '{0}', expected: {1}")]
    InvalidType(String, &'static str),
    /// QAPI visitor: a value outside the enum.
    #[error("Parameter '{0}' does not accept value '{1}'")]
    InvalidEnumValue(String, String),
    /// A boolean that is not on/yes/true/y/off/no/false/n.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    ExpectsOnOff(String),
    /// `--isolation` with a value other than kind or image.
    #[error("Parameter 'isolation' does not accept value '{0}' (expected 'kind' or 'image')")]
    IsolationValue(String),
    /// QemuOpts number.
    #[error("Parameter '{0}' expects a number")]
    ExpectsNumber(String),
    /// QemuOpts size.
    #[error(
        "Parameter '{0}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
    )]
    ExpectsSize(String),
    /// QemuOpts: a name the option list does not have.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// QemuOpts: a malformed `id=`.
    #[error(
        "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter."
    )]
    IdNotIdentifier,
    /// `--chardev` without `id=`.
    #[error("chardev: no id specified")]
    ChardevNoId,
    /// `--chardev` without a backend (`id=c0` alone).
    #[error("chardev: \"{0}\" missing backend")]
    ChardevMissingBackend(String),
    /// `--chardev` with a backend qsd does not have.
    #[error("'{0}' is not a valid char driver name")]
    ChardevInvalidBackend(String),
    /// Socket chardev with two of path, fd, host.
    #[error("None or one of 'path', 'fd' or 'host' option required.")]
    SocketAddressConflict,
    /// Socket chardev with `host=` but no `port=`.
    #[error("chardev: socket: no port given")]
    SocketNoPort,
    /// Socket chardev with both `delay` and `nodelay`.
    #[error("'delay' and 'nodelay' are mutually exclusive")]
    SocketDelayConflict,
    /// Socket chardev: `tls-authz` without `tls-creds`.
    #[error("'tls_authz' option requires 'tls_creds' option")]
    SocketAuthzWithoutCreds,
    /// Client socket chardev with `websocket=on`.
    #[error("Websocket client is not implemented")]
    SocketWebsocketClient,
    /// Client socket chardev with `wait=`.
    #[error("'wait' option is incompatible with socket in client connect mode")]
    SocketWaitInClientMode,
    /// Listening socket chardev with `reconnect` (`reconnect-ms` is let through).
    #[error("'reconnect' option is incompatible with socket in server listen mode")]
    SocketReconnectServer,
    /// Socket chardev with both `reconnect` and `reconnect-ms`.
    #[error("'reconnect' and 'reconnect-ms' are mutually exclusive")]
    SocketReconnectConflict,
    /// A socket chardev's `fd=` that is not a number (see [`parse_fd_number`]).
    #[error("Unable to parse FD number {0}")]
    BadFdNumber(String),
}

/// A pre-init pass error: the complete stderr line. Exit status 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// A long option that matches nothing (the whole argument, `=value` included).
    #[error("{PROGRAM}: unrecognized option '{0}'")]
    UnrecognizedOption(String),
    /// A prefix of several long options.
    #[error("{PROGRAM}: option '{given}' is ambiguous; possibilities:{candidates}")]
    AmbiguousOption {
        /// The whole argument, `=value` included.
        given: String,
        /// ` '--a' '--b'`.
        candidates: String,
    },
    /// An unknown short option letter.
    #[error("{PROGRAM}: invalid option -- '{0}'")]
    InvalidOption(char),
    /// A long option at the end of argv without its argument (full option name).
    #[error("{PROGRAM}: option '--{0}' requires an argument")]
    LongOptionRequiresArgument(&'static str),
    /// `-T` at the end of argv.
    #[error("{PROGRAM}: option requires an argument -- '{0}'")]
    ShortOptionRequiresArgument(char),
    /// `--help=x` and the like (full option name).
    #[error("{PROGRAM}: option '--{0}' doesn't allow an argument")]
    OptionTakesNoArgument(&'static str),
    /// A bad `--sandbox` value.
    #[error("{PROGRAM}: {given}: {error}")]
    Option {
        /// The option as given.
        given: String,
        /// What is wrong.
        error: OptionError,
    },
}

/// A located message as qsd prints it: `bulkhead: <given>: <message>` (no newline).
pub fn diagnostic(given: &str, message: &dyn fmt::Display) -> String {
    format!("{PROGRAM}: {given}: {message}")
}

/// Parses a socket chardev's `fd=` like qsd's `socket_get_fd` (`qemu_strtoi`, base 10,
/// leading blanks and a sign allowed, nothing after). Negative numbers parse; qsd then
/// fails with `File descriptor '<fd>' is not a socket`.
pub fn parse_fd_number(fd: &str) -> Result<i32, OptionError> {
    let bad = || OptionError::BadFdNumber(fd.to_owned());
    let trimmed = fd.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let magnitude: i64 = digits.parse().map_err(|_| bad())?;
    let value = if negative { -magnitude } else { magnitude };
    i32::try_from(value).map_err(|_| bad())
}

pub use getopt::parse_args;
pub use help::{help_text, version_text};
// The stage-one parsers call each other across the files below.
use chardev::*;
use getopt::*;
use qemuopts::*;
