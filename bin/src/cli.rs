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

/// qsd's `--help` text, adapted: bulkhead's name, the `--sandbox` option, no QEMU
/// bug-report footer. (The `bitmap=` in the NBD line is qsd's own wording; 10.0.2
/// actually wants `bitmaps.0=`.)
pub fn help_text() -> String {
    format!(
        "Usage: {PROGRAM} [options]
QEMU storage daemon (bulkhead, compatible with qemu-storage-daemon {QSD_COMPATIBLE_VERSION})

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (see the qemu(1) man page for possible options)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
                         export the specified block node over FUSE

  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over UNIX domain socket
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=fd,addr.str=<fd>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
                         export the specified block node as a
                         vhost-user-blk device over file descriptor

  --export [type=]vduse-blk,id=<id>,node-name=<node-name>
           ,name=<vduse-name>[,writable=on|off]
           [,num-queues=<num-queues>][,queue-size=<queue-size>]
           [,logical-block-size=<logical-block-size>]
           [,serial=<serial-number>]
                         export the specified block node as a
                         vduse-blk device

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.
                         See the qemu(1) man page for documentation of the
                         objects that can be added.

  --pidfile <path>       write process ID to a file after startup

  --sandbox on|off       run block drivers and exports in sandboxed,
                         restartable worker processes (default: on)

  --isolation kind|image how nodes are spread over worker processes:
                         kind: one worker per block driver and one per
                         export type (default); image: one worker per
                         image (a top node and the nodes only it uses),
                         so a compromised worker reaches only its image
"
    )
}

/// `--version`'s text: bulkhead's version and the qsd it is compatible with.
pub fn version_text() -> String {
    format!(
        "{PROGRAM} version {}\nCompatible with qemu-storage-daemon version {QSD_COMPATIBLE_VERSION} (command line and QMP)\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// How a long option takes its argument.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HasArg {
    No,
    Required,
}

/// The long options, qsd's plus `sandbox` and `isolation`, in alphabetical order like qsd's table.
const LONG_OPTIONS: &[(&str, HasArg)] = &[
    ("blockdev", HasArg::Required),
    ("chardev", HasArg::Required),
    ("daemonize", HasArg::No),
    ("export", HasArg::Required),
    ("help", HasArg::No),
    ("isolation", HasArg::Required),
    ("monitor", HasArg::Required),
    ("nbd-server", HasArg::Required),
    ("object", HasArg::Required),
    ("pidfile", HasArg::Required),
    ("sandbox", HasArg::Required),
    ("trace", HasArg::Required),
    ("version", HasArg::No),
];

/// Parses argv after the program name (`std::env::args().skip(1)`): the pre-init pass
/// and stage-one parsing of every option. See the module docs for what fails here and
/// what is deferred into [`CliOption::parsed`].
pub fn parse_args(args: &[String]) -> Result<CliAction, CliError> {
    let mut options = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let start = i;
        i += 1;
        if arg == "--" {
            // getopt stops here; qsd never looks at the rest.
            break;
        }
        let (name, value) = if let Some(long) = arg.strip_prefix("--") {
            let (written, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            let (name, has_arg) = match_long_option(arg, written)?;
            let value = match (has_arg, inline) {
                (HasArg::No, Some(_)) => return Err(CliError::OptionTakesNoArgument(name)),
                (HasArg::No, None) => None,
                (HasArg::Required, Some(v)) => Some(v.to_owned()),
                (HasArg::Required, None) => match args.get(i) {
                    Some(next) => {
                        i += 1;
                        Some(next.clone())
                    }
                    None => return Err(CliError::LongOptionRequiresArgument(name)),
                },
            };
            (name, value)
        } else if arg.len() > 1 && arg.starts_with('-') {
            // Only -h, -V and -T exist: -h and -V end everything, -T takes the rest of
            // the cluster, so only the first letter ever matters.
            let mut chars = arg[1..].chars();
            match chars.next() {
                Some('h') => return Ok(CliAction::Help),
                Some('V') => return Ok(CliAction::Version),
                Some('T') => {
                    let rest = chars.as_str();
                    if !rest.is_empty() {
                        ("trace", Some(rest.to_owned()))
                    } else if let Some(next) = args.get(i) {
                        i += 1;
                        ("trace", Some(next.clone()))
                    } else {
                        return Err(CliError::ShortOptionRequiresArgument('T'));
                    }
                }
                Some(c) => return Err(CliError::InvalidOption(c)),
                None => return Err(CliError::InvalidOption('-')),
            }
        } else {
            options.push(CliOption {
                given: arg.clone(),
                warnings: Vec::new(),
                parsed: Err(OptionError::UnexpectedArgument),
            });
            continue;
        };
        let given = args[start..i].join(" ");
        match name {
            "help" => return Ok(CliAction::Help),
            "version" => return Ok(CliAction::Version),
            _ => {}
        }
        let value = value.unwrap_or_default();
        let option = match name {
            "sandbox" => match parse_bool(&value) {
                Some(on) => simple(given, OptionKind::Sandbox(on)),
                None => {
                    return Err(CliError::Option {
                        given,
                        error: OptionError::ExpectsOnOff("sandbox".to_owned()),
                    });
                }
            },
            "isolation" => match Isolation::parse(&value) {
                Some(i) => simple(given, OptionKind::Isolation(i)),
                None => {
                    return Err(CliError::Option {
                        given,
                        error: OptionError::IsolationValue(value),
                    });
                }
            },
            "daemonize" => simple(given, OptionKind::Daemonize),
            "pidfile" => simple(given, OptionKind::Pidfile(value)),
            _ => parse_option(name, given, &value),
        };
        options.push(option);
    }
    Ok(CliAction::Run(options))
}

fn simple(given: String, kind: OptionKind) -> CliOption {
    CliOption {
        given,
        warnings: Vec::new(),
        parsed: Ok(kind),
    }
}

/// glibc's long option lookup: an exact name wins, else a unique prefix.
fn match_long_option(arg: &str, written: &str) -> Result<(&'static str, HasArg), CliError> {
    if let Some(&(name, has_arg)) = LONG_OPTIONS.iter().find(|(n, _)| *n == written) {
        return Ok((name, has_arg));
    }
    let candidates: Vec<&(&str, HasArg)> = LONG_OPTIONS
        .iter()
        .filter(|(n, _)| n.starts_with(written))
        .collect();
    match candidates.as_slice() {
        [] => Err(CliError::UnrecognizedOption(arg.to_owned())),
        [(name, has_arg)] => Ok((name, *has_arg)),
        many => Err(CliError::AmbiguousOption {
            given: arg.to_owned(),
            candidates: many.iter().map(|(n, _)| format!(" '--{n}'")).collect(),
        }),
    }
}

/// Stage one of one second-pass option.
fn parse_option(name: &str, given: String, value: &str) -> CliOption {
    let mut warnings = Vec::new();
    let parsed = match name {
        "blockdev" => visitor_arg(value, Some("driver")).map(OptionKind::Blockdev),
        "export" => visitor_arg(value, Some("type")).map(OptionKind::Export),
        "nbd-server" => visitor_arg(value, None).map(OptionKind::NbdServer),
        "monitor" => parse_monitor(value),
        "object" => parse_object(value),
        "chardev" => parse_chardev(value, &mut warnings),
        "trace" => parse_trace(value, &mut warnings),
        _ => Err(OptionError::UnexpectedArgument),
    };
    CliOption {
        given,
        warnings,
        parsed,
    }
}

/// `qobject_input_visitor_new_str`: JSON if the first byte is `{`, else keyval.
fn visitor_arg(value: &str, implied_key: Option<&str>) -> Result<OptionArg, OptionError> {
    if value.starts_with('{') {
        Ok(OptionArg::Json(value.to_owned()))
    } else {
        Ok(OptionArg::Keyval(keyval::parse(value, implied_key)?))
    }
}

fn parse_monitor(value: &str) -> Result<OptionKind, OptionError> {
    match visitor_arg(value, Some("chardev"))? {
        OptionArg::Json(text) => Ok(OptionKind::Monitor(MonitorArg::Json(text))),
        OptionArg::Keyval(tree) => Ok(OptionKind::Monitor(MonitorArg::Options(
            MonitorOptions::from_keyval(&tree)?,
        ))),
    }
}

/// `user_creatable_parse_str`: JSON, or keyval with help allowed.
fn parse_object(value: &str) -> Result<OptionKind, OptionError> {
    if value.starts_with('{') {
        return Ok(OptionKind::Object(OptionArg::Json(value.to_owned())));
    }
    let (tree, help) = keyval::parse_with_help(value, Some("qom-type"))?;
    if help {
        return Ok(OptionKind::ObjectHelp(tree));
    }
    Ok(OptionKind::Object(OptionArg::Keyval(tree)))
}

/// QEMU's `qapi_bool_parse`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Which QAPI input visitor flavour to mimic.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Keyval,
    Json,
}

impl MonitorOptions {
    /// Visits a keyval tree (`--monitor chardev=c0,...`) like qsd's keyval visitor.
    pub fn from_keyval(tree: &Value) -> Result<Self, OptionError> {
        Self::visit(tree, Flavour::Keyval)
    }

    /// Visits a parsed JSON object (`--monitor {"chardev":"c0"}`) like qsd's strict
    /// visitor.
    pub fn from_json(tree: &Value) -> Result<Self, OptionError> {
        Self::visit(tree, Flavour::Json)
    }

    fn visit(tree: &Value, flavour: Flavour) -> Result<Self, OptionError> {
        let Value::Object(map) = tree else {
            return Err(OptionError::InvalidType("null".to_owned(), "object"));
        };
        let get_str = |name: &str| -> Result<Option<String>, OptionError> {
            match (map.get(name), flavour) {
                (None, _) => Ok(None),
                (Some(Value::String(s)), _) => Ok(Some(s.clone())),
                (Some(Value::Object(_) | Value::Array(_)), Flavour::Keyval) => {
                    Err(OptionError::ParametersUnexpected(name.to_owned()))
                }
                (Some(_), _) => Err(OptionError::InvalidType(name.to_owned(), "string")),
            }
        };
        // Members in QAPI declaration order: id, mode, pretty, chardev.
        let id = get_str("id")?;
        let mode = match get_str("mode")? {
            None => None,
            Some(m) => Some(match m.as_str() {
                "readline" => MonitorMode::Readline,
                "control" => MonitorMode::Control,
                _ => return Err(OptionError::InvalidEnumValue("mode".to_owned(), m)),
            }),
        };
        let pretty = match (flavour, map.get("pretty")) {
            (_, None) => None,
            (Flavour::Json, Some(Value::Bool(b))) => Some(*b),
            (Flavour::Json, Some(_)) => {
                return Err(OptionError::InvalidType("pretty".to_owned(), "boolean"));
            }
            (Flavour::Keyval, Some(_)) => {
                let text = get_str("pretty")?.unwrap_or_default();
                Some(
                    parse_bool(&text)
                        .ok_or_else(|| OptionError::ExpectsOnOff("pretty".to_owned()))?,
                )
            }
        };
        let chardev = get_str("chardev")?
            .ok_or_else(|| OptionError::ParameterMissing("chardev".to_owned()))?;
        let visited = ["id", "mode", "pretty", "chardev"];
        if let Some(extra) = first_unvisited(map.keys().map(String::as_str), &visited) {
            return Err(OptionError::ParameterUnexpected(extra));
        }
        Ok(MonitorOptions {
            id,
            mode,
            pretty,
            chardev,
        })
    }
}

/// The member QEMU's `qobject_input_check_struct` reports: the first key left in a GLib
/// `GHashTable` that was filled in QDict order, iterated in slot order.
///
/// Growth follows GLib 2.7x's relocation; shrinking (only after removing most members,
/// which a four-member struct cannot do to a table that grew) is not modelled.
fn first_unvisited<'a>(
    keys_in_insertion_order: impl Iterator<Item = &'a str>,
    visited: &[&str],
) -> Option<String> {
    let ordered: Vec<&str> = qdict::iteration_order(keys_in_insertion_order.map(|k| (k, ())))
        .into_iter()
        .map(|(k, ())| k)
        .collect();
    let mut table = GHashOrder::new();
    for key in &ordered {
        table.insert(key);
    }
    table
        .slots()
        .find(|k| !visited.contains(k))
        .map(str::to_owned)
}

/// Just enough of GLib's open-addressing hash table to know its iteration order.
struct GHashOrder<'a> {
    slots: Vec<Option<(&'a str, u32)>>,
    shift: u32,
    nnodes: usize,
}

/// GLib's `prime_mod` table, indexed by the table's shift.
const GHASH_PRIME_MOD: [u32; 25] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213,
];

impl<'a> GHashOrder<'a> {
    fn new() -> Self {
        GHashOrder {
            slots: vec![None; 8],
            shift: 3,
            nnodes: 0,
        }
    }

    /// `g_str_hash` (djb2 over signed chars), with GLib's reserved values 0 and 1 moved.
    fn hash(key: &str) -> u32 {
        let mut h: u32 = 5381;
        for &b in key.as_bytes() {
            // GLib reads the bytes as `signed char`.
            let signed = i32::from(b as i8);
            h = h.wrapping_mul(33).wrapping_add(signed as u32);
        }
        if h < 2 { 2 } else { h }
    }

    fn place(&mut self, key: &'a str, hash: u32) {
        let modulus = GHASH_PRIME_MOD
            .get(self.shift as usize)
            .copied()
            .unwrap_or(65521);
        let mask = self.slots.len() - 1;
        let mut index = (hash.wrapping_mul(11) % modulus) as usize;
        let mut step = 0;
        while self.slots[index].is_some() {
            step += 1;
            index = (index + step) & mask;
        }
        self.slots[index] = Some((key, hash));
    }

    fn insert(&mut self, key: &'a str) {
        if self.slots.iter().flatten().any(|(k, _)| *k == key) {
            return;
        }
        if self.nnodes >= self.slots.len() {
            // Unreachable with GLib's growth rule; keeps probing from spinning forever.
            self.nnodes += 1;
            self.resize();
            self.nnodes -= 1;
        }
        self.place(key, Self::hash(key));
        self.nnodes += 1;
        let size = self.slots.len();
        if size <= self.nnodes + self.nnodes / 16 {
            self.resize();
        }
    }

    /// GLib's `g_hash_table_resize` when growing: the arrays are extended in place, then
    /// every old slot's entry is relocated by probing over a "relocated" bitmap, evicting
    /// (and then relocating) whatever still sits in its target slot.
    fn resize(&mut self) {
        // g_hash_table_set_shift_from_size(nnodes * 1.333): a double truncated to gint.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let mut target = (self.nnodes as f64 * 1.333) as usize;
        let mut shift = 0u32;
        while target > 0 {
            target >>= 1;
            shift += 1;
        }
        let shift = shift.clamp(3, 24);
        let old_size = self.slots.len();
        let new_size = 1usize << shift;
        if new_size <= old_size {
            return;
        }
        self.slots.resize(new_size, None);
        self.shift = shift;
        let modulus = GHASH_PRIME_MOD
            .get(shift as usize)
            .copied()
            .unwrap_or(16_777_213);
        let mask = new_size - 1;
        let mut relocated = vec![false; new_size];
        for i in 0..old_size {
            if relocated[i] {
                continue;
            }
            let Some(mut entry) = self.slots[i].take() else {
                continue;
            };
            loop {
                let mut index = (entry.1.wrapping_mul(11) % modulus) as usize;
                let mut step = 0;
                while relocated[index] {
                    step += 1;
                    index = (index + step) & mask;
                }
                relocated[index] = true;
                match self.slots[index].replace(entry) {
                    None => break,
                    Some(evicted) => entry = evicted,
                }
            }
        }
    }

    fn slots(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.slots.iter().flatten().map(|(k, _)| *k)
    }
}

/// The type of a QemuOpts option.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OptType {
    Str,
    Bool,
    Number,
    Size,
}

/// `qemu_chardev_opts` as qsd 10.0.2 lists it (`--chardev socket,help`).
const CHARDEV_OPTS: &[(&str, OptType)] = &[
    ("abstract", OptType::Bool),
    ("append", OptType::Bool),
    ("backend", OptType::Str),
    ("chardev", OptType::Str),
    ("chardevs.0", OptType::Str),
    ("chardevs.1", OptType::Str),
    ("chardevs.2", OptType::Str),
    ("chardevs.3", OptType::Str),
    ("clipboard", OptType::Bool),
    ("cols", OptType::Number),
    ("debug", OptType::Number),
    ("delay", OptType::Bool),
    ("fd", OptType::Str),
    ("height", OptType::Number),
    ("host", OptType::Str),
    ("input-path", OptType::Str),
    ("ipv4", OptType::Bool),
    ("ipv6", OptType::Bool),
    ("localaddr", OptType::Str),
    ("localport", OptType::Str),
    ("logappend", OptType::Bool),
    ("logfile", OptType::Str),
    ("mouse", OptType::Bool),
    ("mux", OptType::Bool),
    ("name", OptType::Str),
    ("nodelay", OptType::Bool),
    ("path", OptType::Str),
    ("port", OptType::Str),
    ("reconnect-ms", OptType::Number),
    ("reconnect", OptType::Number),
    ("rows", OptType::Number),
    ("server", OptType::Bool),
    ("signal", OptType::Bool),
    ("size", OptType::Size),
    ("telnet", OptType::Bool),
    ("tight", OptType::Bool),
    ("tls-authz", OptType::Str),
    ("tls-creds", OptType::Str),
    ("tn3270", OptType::Bool),
    ("to", OptType::Number),
    ("wait", OptType::Bool),
    ("websocket", OptType::Bool),
    ("width", OptType::Number),
];

/// The chardev backends qsd 10.0.2 has, in its `--chardev help` order.
const CHARDEV_BACKENDS: &[&str] = &[
    "pty", "file", "udp", "memory", "stdio", "socket", "ringbuf", "null", "parallel", "pipe",
    "mux", "serial", "hub",
];

/// `qemu_trace_opts`.
const TRACE_OPTS: &[(&str, OptType)] = &[
    ("enable", OptType::Str),
    ("events", OptType::Str),
    ("file", OptType::Str),
];

/// The result of QemuOpts parsing.
struct QemuOpts {
    id: Option<String>,
    opts: Vec<(String, String)>,
    help: bool,
}

impl QemuOpts {
    /// `qemu_opt_get`: the last value given.
    fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `qemu_opt_get_bool` on a validated option.
    fn get_bool(&self, name: &str, default: bool) -> bool {
        self.get(name).and_then(parse_bool).unwrap_or(default)
    }
}

/// One item of QemuOpts syntax.
struct OptItem {
    name: String,
    value: String,
    help: bool,
    warning: Option<CliWarning>,
}

/// `get_opt_value`: a value up to an unescaped `,` (`,,` is a comma). Returns the value
/// and the byte offset of the terminating `,` or the end.
fn opt_value(params: &str, start: usize) -> (String, usize) {
    let mut value = String::new();
    let mut pos = start;
    loop {
        let tail = &params[pos..];
        match tail.find(',') {
            None => {
                value.push_str(tail);
                return (value, params.len());
            }
            Some(i) if tail[i + 1..].starts_with(',') => {
                value.push_str(&tail[..=i]);
                pos += i + 2;
            }
            Some(i) => {
                value.push_str(&tail[..i]);
                return (value, pos + i);
            }
        }
    }
}

/// `get_opt_name_value`: one item starting at `pos`; returns it and where the next starts.
fn opt_item(params: &str, pos: usize, firstname: Option<&str>) -> (OptItem, usize) {
    let rest = &params[pos..];
    let len = rest.find(['=', ',']).unwrap_or(rest.len());
    let (item, end) = if !rest[len..].starts_with('=') {
        if let Some(first) = firstname {
            let (value, end) = opt_value(params, pos);
            (
                OptItem {
                    name: first.to_owned(),
                    value,
                    help: false,
                    warning: None,
                },
                end,
            )
        } else {
            let written = &rest[..len];
            let (name, value, advice_value) = match written.strip_prefix("no") {
                Some(stripped) => (stripped, "off", "off"),
                None => (written, "on", "on"),
            };
            let help = written == "help" || written == "?";
            let warning = (!help).then(|| CliWarning::ShortFormBoolean {
                written: written.to_owned(),
                // 'delay' is spelled as its inverse in the advice.
                advice: if name == "delay" {
                    format!(
                        "nodelay={}",
                        if advice_value == "on" { "off" } else { "on" }
                    )
                } else {
                    format!("{name}={advice_value}")
                },
            });
            (
                OptItem {
                    name: name.to_owned(),
                    value: value.to_owned(),
                    help,
                    warning,
                },
                pos + len,
            )
        }
    } else {
        let (value, end) = opt_value(params, pos + len + 1);
        (
            OptItem {
                name: rest[..len].to_owned(),
                value,
                help: false,
                warning: None,
            },
            end,
        )
    };
    let next = if params[end..].starts_with(',') {
        end + 1
    } else {
        end
    };
    (item, next)
}

/// `qemu_strtou64(value, NULL, 0, ...)` acceptance: optional blanks and sign, then a
/// decimal, `0x` hex or `0` octal number, nothing after, within 64 bits.
fn is_number(value: &str) -> bool {
    let trimmed = value.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let unsigned = trimmed.strip_prefix(['+', '-']).unwrap_or(trimmed);
    let (digits, radix) = if let Some(hex) = unsigned
        .strip_prefix("0x")
        .or_else(|| unsigned.strip_prefix("0X"))
    {
        (hex, 16)
    } else if unsigned.len() > 1 && unsigned.starts_with('0') {
        (&unsigned[1..], 8)
    } else {
        (unsigned, 10)
    };
    !digits.is_empty() && u64::from_str_radix(digits, radix).is_ok()
}

/// A simplified `qemu_strtosz`: a decimal number, optional fraction, optional unit suffix.
fn is_size(value: &str) -> bool {
    let number_end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(number_end);
    let number_ok = !number.is_empty() && number.parse::<f64>().is_ok();
    let suffix_ok = suffix.is_empty() || (suffix.len() == 1 && "bBkKmMgGtTpPeE".contains(suffix));
    number_ok && suffix_ok
}

/// `qemu_opts_parse_noisily(list, params, permit_abbrev=true)`: the id, then every item,
/// validated against `desc`. Warnings go to `warnings` as they would be printed.
fn qemu_opts_parse(
    params: &str,
    implied: &str,
    desc: &[(&str, OptType)],
    warnings: &mut Vec<CliWarning>,
) -> Result<QemuOpts, OptionError> {
    // opts_parse_id: the first id=, scanning without an implied name and without warning.
    let mut id = None;
    let mut pos = 0;
    while pos < params.len() {
        let (item, next) = opt_item(params, pos, None);
        pos = next;
        if item.name == "id" {
            id = Some(item.value);
            break;
        }
    }
    if let Some(id) = &id
        && !id_wellformed(id)
    {
        return Err(OptionError::IdNotIdentifier);
    }

    let mut opts = Vec::new();
    let mut firstname = Some(implied);
    let mut pos = 0;
    while pos < params.len() {
        let (item, next) = opt_item(params, pos, firstname);
        pos = next;
        firstname = None;
        if let Some(w) = item.warning {
            warnings.push(w);
        }
        if item.help {
            return Ok(QemuOpts {
                id,
                opts,
                help: true,
            });
        }
        if item.name == "id" {
            continue;
        }
        let Some((_, kind)) = desc.iter().find(|(n, _)| *n == item.name) else {
            return Err(OptionError::InvalidParameter(item.name));
        };
        let ok = match kind {
            OptType::Str => true,
            OptType::Bool => parse_bool(&item.value).is_some(),
            OptType::Number => is_number(&item.value),
            OptType::Size => is_size(&item.value),
        };
        if !ok {
            return Err(match kind {
                OptType::Bool => OptionError::ExpectsOnOff(item.name),
                OptType::Number => OptionError::ExpectsNumber(item.name),
                _ => OptionError::ExpectsSize(item.name),
            });
        }
        opts.push((item.name, item.value));
    }
    Ok(QemuOpts {
        id,
        opts,
        help: false,
    })
}

/// What qsd prints for `--chardev <backend>,help` (`qemu_opts_print_help`).
fn chardev_options_help() -> String {
    // qemu_opts_print_help sorts the formatted lines, so "reconnect-ms=" sorts before
    // "reconnect=".
    let mut lines: Vec<String> = CHARDEV_OPTS
        .iter()
        .map(|(name, kind)| {
            let kind = match kind {
                OptType::Str => "str",
                OptType::Bool => "bool (on/off)",
                OptType::Number => "num",
                OptType::Size => "size",
            };
            format!("  {name}=<{kind}>\n")
        })
        .collect();
    lines.sort();
    let mut text = String::from("chardev options:\n");
    text.extend(lines);
    text
}

/// `--chardev`: QemuOpts, then `qemu_chr_new_from_opts` up to (not including) creation.
fn parse_chardev(value: &str, warnings: &mut Vec<CliWarning>) -> Result<OptionKind, OptionError> {
    let opts = qemu_opts_parse(value, "backend", CHARDEV_OPTS, warnings)?;
    if opts.help {
        return Ok(OptionKind::ChardevHelp {
            stdout: chardev_options_help(),
            exit_code: 1,
        });
    }
    let backend_name = opts.get("backend");
    if let Some(name) = backend_name
        && (name == "help" || name == "?")
    {
        let mut stdout = String::from("Available chardev backend types: ");
        for backend in CHARDEV_BACKENDS {
            stdout.push_str("\n  ");
            stdout.push_str(backend);
        }
        stdout.push('\n');
        return Ok(OptionKind::ChardevHelp {
            stdout,
            exit_code: 0,
        });
    }
    let id = opts.id.clone().ok_or(OptionError::ChardevNoId)?;
    let Some(backend_name) = backend_name else {
        return Err(OptionError::ChardevMissingBackend(id));
    };
    if !CHARDEV_BACKENDS.contains(&backend_name) {
        return Err(OptionError::ChardevInvalidBackend(backend_name.to_owned()));
    }
    let backend = match backend_name {
        "socket" => ChardevBackend::Socket(parse_socket_chardev(&opts)?),
        "stdio" => ChardevBackend::Stdio {
            signal: opts.get_bool("signal", true),
        },
        other => ChardevBackend::Other(other.to_owned()),
    };
    Ok(OptionKind::Chardev(ChardevOptions {
        id,
        backend,
        opts: opts.opts,
    }))
}

/// `qemu_chr_parse_socket` and `qmp_chardev_validate_socket`, as far as 10.0.2 checks
/// before opening (observed order).
fn parse_socket_chardev(opts: &QemuOpts) -> Result<SocketChardev, OptionError> {
    let path = opts.get("path");
    let host = opts.get("host");
    let fd = opts.get("fd");
    let given = [path, host, fd].iter().filter(|o| o.is_some()).count();
    if given > 1 {
        return Err(OptionError::SocketAddressConflict);
    }
    if host.is_some() && opts.get("port").is_none() {
        return Err(OptionError::SocketNoPort);
    }
    if opts.get("delay").is_some() && opts.get("nodelay").is_some() {
        return Err(OptionError::SocketDelayConflict);
    }
    let nodelay = (opts.get("delay").is_some() || opts.get("nodelay").is_some())
        .then(|| !opts.get_bool("delay", true) || opts.get_bool("nodelay", false));
    let server = opts.get_bool("server", false);
    let wait = opts.get("wait").and_then(parse_bool);
    let addr = match (path, host) {
        (Some(path), _) => SocketChardevAddr::Unix {
            path: path.to_owned(),
            abstract_ns: opts.get_bool("abstract", false),
            tight: opts.get_bool("tight", true),
        },
        (None, Some(host)) => SocketChardevAddr::Inet {
            host: host.to_owned(),
            port: opts.get("port").unwrap_or_default().to_owned(),
        },
        (None, None) => SocketChardevAddr::Fd(fd.unwrap_or_default().to_owned()),
    };
    if opts.get("tls-authz").is_some() && opts.get("tls-creds").is_none() {
        return Err(OptionError::SocketAuthzWithoutCreds);
    }
    if !server {
        if opts.get_bool("websocket", false) {
            return Err(OptionError::SocketWebsocketClient);
        }
        if wait.is_some() {
            return Err(OptionError::SocketWaitInClientMode);
        }
    }
    Ok(SocketChardev {
        addr,
        server,
        wait,
        nodelay,
    })
}

/// `-T`: `trace_opt_parse`'s QemuOpts (implied `enable`).
fn parse_trace(value: &str, warnings: &mut Vec<CliWarning>) -> Result<OptionKind, OptionError> {
    let opts = qemu_opts_parse(value, "enable", TRACE_OPTS, warnings)?;
    Ok(OptionKind::Trace(TraceOptions {
        enable: opts.get("enable").map(str::to_owned),
        events: opts.get("events").map(str::to_owned),
        file: opts.get("file").map(str::to_owned),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    /// The stderr qsd prints for this command line (with `bulkhead` for its name), found
    /// the way qsd finds it: pre-init errors first, then the first option in order that
    /// fails stage one (assuming every earlier option would execute fine).
    fn stderr(list: &[&str]) -> String {
        match parse_args(&args(list)) {
            Err(e) => e.to_string(),
            Ok(CliAction::Run(options)) => {
                let mut out = Vec::new();
                for option in &options {
                    for w in &option.warnings {
                        out.push(diagnostic(&option.given, w));
                    }
                    if let Some(text) = option.error_text() {
                        out.push(text);
                        break;
                    }
                }
                out.join("\n")
            }
            Ok(other) => format!("{other:?}"),
        }
    }

    fn single(list: &[&str]) -> OptionKind {
        match parse_args(&args(list)) {
            Ok(CliAction::Run(mut options)) if options.len() == 1 => match options.remove(0).parsed
            {
                Ok(kind) => kind,
                Err(e) => panic!("{list:?}: {e}"),
            },
            other => panic!("{list:?}: {other:?}"),
        }
    }

    // --- getopt (pre-init pass), texts from qsd 10.0.2 with argv[0] replaced ---

    #[test]
    fn unknown_long_options_are_named_with_their_inline_value() {
        assert_eq!(stderr(&["--foo"]), "bulkhead: unrecognized option '--foo'");
        assert_eq!(
            stderr(&["--foo=bar"]),
            "bulkhead: unrecognized option '--foo=bar'"
        );
    }

    #[test]
    fn unknown_short_options_are_named_by_letter() {
        assert_eq!(stderr(&["-x"]), "bulkhead: invalid option -- 'x'");
        assert_eq!(stderr(&["-xh"]), "bulkhead: invalid option -- 'x'");
    }

    #[test]
    fn a_missing_argument_names_the_full_long_option() {
        assert_eq!(
            stderr(&["--blockdev"]),
            "bulkhead: option '--blockdev' requires an argument"
        );
        assert_eq!(
            stderr(&["--blo"]),
            "bulkhead: option '--blockdev' requires an argument"
        );
        assert_eq!(
            stderr(&["--pidfile"]),
            "bulkhead: option '--pidfile' requires an argument"
        );
        assert_eq!(
            stderr(&["-T"]),
            "bulkhead: option requires an argument -- 'T'"
        );
    }

    #[test]
    fn flags_refuse_inline_values() {
        assert_eq!(
            stderr(&["--help=x"]),
            "bulkhead: option '--help' doesn't allow an argument"
        );
        assert_eq!(
            stderr(&["--help="]),
            "bulkhead: option '--help' doesn't allow an argument"
        );
        assert_eq!(
            stderr(&["--version=1"]),
            "bulkhead: option '--version' doesn't allow an argument"
        );
        assert_eq!(
            stderr(&["--daemonize=1"]),
            "bulkhead: option '--daemonize' doesn't allow an argument"
        );
    }

    #[test]
    fn getopt_errors_win_over_earlier_option_errors_but_not_over_earlier_help() {
        assert_eq!(
            stderr(&["--blockdev", "a..b=1", "--foo"]),
            "bulkhead: unrecognized option '--foo'"
        );
        assert_eq!(
            parse_args(&args(&["--blockdev", "a..b=1", "--help"])),
            Ok(CliAction::Help)
        );
        assert_eq!(
            parse_args(&args(&["--blockdev", "a..b=1", "-V"])),
            Ok(CliAction::Version)
        );
        assert_eq!(parse_args(&args(&["-V", "--foo"])), Ok(CliAction::Version));
        assert_eq!(
            stderr(&["--foo", "-V"]),
            "bulkhead: unrecognized option '--foo'"
        );
        assert_eq!(parse_args(&args(&["-hx"])), Ok(CliAction::Help));
        assert_eq!(parse_args(&args(&["-Vh"])), Ok(CliAction::Version));
        assert_eq!(parse_args(&args(&["--h"])), Ok(CliAction::Help));
    }

    #[test]
    fn long_options_take_unique_prefixes_and_both_argument_forms() {
        assert_eq!(
            stderr(&["--blo", "a..b=1"]),
            "bulkhead: --blo a..b=1: Invalid parameter 'a..b'"
        );
        assert_eq!(
            stderr(&["--blockdev=a..b=1"]),
            "bulkhead: --blockdev=a..b=1: Invalid parameter 'a..b'"
        );
        assert_eq!(
            stderr(&["--blockdev==x"]),
            "bulkhead: --blockdev==x: Invalid parameter ''"
        );
        assert_eq!(
            single(&["--e", "nbd,id=e0"]),
            OptionKind::Export(OptionArg::Keyval(json!({"type": "nbd", "id": "e0"})))
        );
    }

    #[test]
    fn an_ambiguous_prefix_lists_every_candidate_and_keeps_the_inline_value() {
        // Only the empty prefix is ambiguous among qsd's options; qsd's list lacks sandbox
        // and isolation.
        assert_eq!(
            stderr(&["--=x"]),
            "bulkhead: option '--=x' is ambiguous; possibilities: '--blockdev' '--chardev' \
             '--daemonize' '--export' '--help' '--isolation' '--monitor' '--nbd-server' '--object' \
             '--pidfile' '--sandbox' '--trace' '--version'"
        );
    }

    #[test]
    fn the_next_argument_is_taken_even_when_it_looks_like_an_option() {
        assert_eq!(
            single(&["--pidfile", "--x"]),
            OptionKind::Pidfile("--x".to_owned())
        );
    }

    #[test]
    fn positional_arguments_fail_in_order_and_after_double_dash_are_ignored() {
        assert_eq!(stderr(&["foo"]), "bulkhead: foo: Unexpected argument");
        assert_eq!(stderr(&["-"]), "bulkhead: -: Unexpected argument");
        assert_eq!(
            stderr(&["foo", "--blockdev", "a..b=1"]),
            "bulkhead: foo: Unexpected argument"
        );
        assert_eq!(
            stderr(&["--blockdev", "a..b=1", "foo"]),
            "bulkhead: --blockdev a..b=1: Invalid parameter 'a..b'"
        );
        assert_eq!(
            parse_args(&args(&["--", "foo", "--bogus"])),
            Ok(CliAction::Run(Vec::new()))
        );
    }

    // --- keyval options ---

    #[test]
    fn blockdev_keyval_errors_are_located_at_the_option() {
        assert_eq!(
            stderr(&["--blockdev", "=x"]),
            "bulkhead: --blockdev =x: Invalid parameter ''"
        );
        assert_eq!(
            stderr(&["--blockdev", "a..b=1"]),
            "bulkhead: --blockdev a..b=1: Invalid parameter 'a..b'"
        );
        assert_eq!(
            stderr(&["--blockdev", "driver=null-co,size"]),
            "bulkhead: --blockdev driver=null-co,size: Expected '=' after parameter 'size'"
        );
        assert_eq!(
            stderr(&["--blockdev", "null-co,,x"]),
            "bulkhead: --blockdev null-co,,x: Invalid parameter ''"
        );
        assert_eq!(
            stderr(&["--blockdev", ","]),
            "bulkhead: --blockdev ,: Invalid parameter ''"
        );
        assert_eq!(
            stderr(&["--blockdev", "help"]),
            "bulkhead: --blockdev help: Help is not available for this option"
        );
        assert_eq!(
            stderr(&["--blockdev", "?"]),
            "bulkhead: --blockdev ?: Help is not available for this option"
        );
        let long = "a".repeat(128);
        assert_eq!(
            stderr(&["--blockdev", &format!("{long}=1")]),
            format!("bulkhead: --blockdev {long}=1: Parameter '{long}' is too long")
        );
    }

    #[test]
    fn blockdev_keyval_uses_driver_as_implied_key_and_keeps_json_raw() {
        assert_eq!(
            single(&["--blockdev", "file,node-name=f0,filename=a,,b"]),
            OptionKind::Blockdev(OptionArg::Keyval(
                json!({"driver": "file", "node-name": "f0", "filename": "a,b"})
            ))
        );
        assert_eq!(
            single(&["--blockdev", "driver=null-co,driver=file"]),
            OptionKind::Blockdev(OptionArg::Keyval(json!({"driver": "file"})))
        );
        assert_eq!(
            single(&["--blockdev", r#"{"driver":"null-co""#]),
            OptionKind::Blockdev(OptionArg::Json(r#"{"driver":"null-co""#.to_owned()))
        );
        // An empty argument is an empty tree; the visitor then misses 'driver'.
        assert_eq!(
            single(&["--blockdev", ""]),
            OptionKind::Blockdev(OptionArg::Keyval(json!({})))
        );
    }

    #[test]
    fn an_empty_argument_shows_as_a_trailing_space() {
        assert_eq!(
            stderr(&["--chardev", ""]),
            "bulkhead: --chardev : chardev: no id specified"
        );
    }

    #[test]
    fn nbd_server_has_no_implied_key_and_arrays_are_checked() {
        assert_eq!(
            stderr(&["--nbd-server", "x"]),
            "bulkhead: --nbd-server x: Expected '=' after parameter 'x'"
        );
        assert_eq!(
            stderr(&["--nbd-server", "a.1=x"]),
            "bulkhead: --nbd-server a.1=x: Parameter 'a.0' missing"
        );
        assert_eq!(
            stderr(&["--nbd-server", "a.0=x,a.b=y"]),
            "bulkhead: --nbd-server a.0=x,a.b=y: Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            single(&["--nbd-server", "addr.type=unix,addr.path=/s"]),
            OptionKind::NbdServer(OptionArg::Keyval(
                json!({"addr": {"type": "unix", "path": "/s"}})
            ))
        );
    }

    #[test]
    fn export_bitmaps_become_a_list() {
        assert_eq!(
            single(&[
                "--export",
                "nbd,id=e0,node-name=n0,bitmaps.0=b0,bitmaps.1=b1"
            ]),
            OptionKind::Export(OptionArg::Keyval(
                json!({"type": "nbd", "id": "e0", "node-name": "n0", "bitmaps": ["b0", "b1"]})
            ))
        );
    }

    #[test]
    fn object_help_is_recognised_and_other_objects_stay_trees() {
        assert_eq!(
            single(&["--object", "help"]),
            OptionKind::ObjectHelp(json!({}))
        );
        assert_eq!(
            single(&["--object", "?"]),
            OptionKind::ObjectHelp(json!({}))
        );
        assert_eq!(
            single(&["--object", "iothread,id=io0,help"]),
            OptionKind::ObjectHelp(json!({"qom-type": "iothread", "id": "io0"}))
        );
        assert_eq!(
            single(&["--object", "iothread,id=io0"]),
            OptionKind::Object(OptionArg::Keyval(
                json!({"qom-type": "iothread", "id": "io0"})
            ))
        );
        assert_eq!(
            stderr(&["--object", "iothread,help,a..b=1"]),
            "bulkhead: --object iothread,help,a..b=1: Invalid parameter 'a..b'"
        );
    }

    // --- monitor ---

    #[test]
    fn monitor_takes_chardev_as_implied_key() {
        assert_eq!(
            single(&["--monitor", "c0"]),
            OptionKind::Monitor(MonitorArg::Options(MonitorOptions {
                id: None,
                mode: None,
                pretty: None,
                chardev: "c0".to_owned()
            }))
        );
        assert_eq!(
            single(&["--monitor", "chardev=c0,mode=control,pretty=on,id=m0"]),
            OptionKind::Monitor(MonitorArg::Options(MonitorOptions {
                id: Some("m0".to_owned()),
                mode: Some(MonitorMode::Control),
                pretty: Some(true),
                chardev: "c0".to_owned()
            }))
        );
        // Leading blank: not JSON, so the whole text is the chardev name.
        assert_eq!(
            single(&["--monitor", r#" {"chardev":"c0"}"#]),
            OptionKind::Monitor(MonitorArg::Options(MonitorOptions {
                id: None,
                mode: None,
                pretty: None,
                chardev: r#" {"chardev":"c0"}"#.to_owned()
            }))
        );
    }

    #[test]
    fn monitor_visitor_errors_match_qsd() {
        assert_eq!(
            stderr(&["--monitor", "chardev=c0,mode=foo"]),
            "bulkhead: --monitor chardev=c0,mode=foo: Parameter 'mode' does not accept value 'foo'"
        );
        assert_eq!(
            stderr(&["--monitor", "chardev=c0,pretty=maybe"]),
            "bulkhead: --monitor chardev=c0,pretty=maybe: Parameter 'pretty' expects 'on' or 'off'"
        );
        assert_eq!(
            stderr(&["--monitor", "mode=control"]),
            "bulkhead: --monitor mode=control: Parameter 'chardev' is missing"
        );
        assert_eq!(
            stderr(&["--monitor", "chardev=c0,x=1"]),
            "bulkhead: --monitor chardev=c0,x=1: Parameter 'x' is unexpected"
        );
        assert_eq!(
            stderr(&["--monitor", "chardev.x=1"]),
            "bulkhead: --monitor chardev.x=1: Parameters 'chardev.*' are unexpected"
        );
        assert_eq!(
            stderr(&["--monitor", "chardev=c0,chardev.x=1"]),
            "bulkhead: --monitor chardev=c0,chardev.x=1: Parameters 'chardev.*' used inconsistently"
        );
    }

    #[test]
    fn the_unexpected_member_reported_follows_glib_hash_order() {
        // Observed on qsd 10.0.2: neither insertion nor QDict order.
        assert_eq!(
            stderr(&["--monitor", "chardev=c0,id=m0,x=1,y=2"]),
            "bulkhead: --monitor chardev=c0,id=m0,x=1,y=2: Parameter 'y' is unexpected"
        );
        assert_eq!(
            stderr(&["--monitor", "chardev=c0,y=1,x=2"]),
            "bulkhead: --monitor chardev=c0,y=1,x=2: Parameter 'y' is unexpected"
        );
        assert_eq!(
            stderr(&["--monitor", "chardev=c0,a=1,b=2,c=3"]),
            "bulkhead: --monitor chardev=c0,a=1,b=2,c=3: Parameter 'b' is unexpected"
        );
        assert_eq!(
            stderr(&["--monitor", "chardev=c0,c=1,b=2,a=3"]),
            "bulkhead: --monitor chardev=c0,c=1,b=2,a=3: Parameter 'b' is unexpected"
        );
        assert_eq!(
            stderr(&["--monitor", "chardev=c0,pretty=n,zz=1,b=2"]),
            "bulkhead: --monitor chardev=c0,pretty=n,zz=1,b=2: Parameter 'b' is unexpected"
        );
    }

    #[test]
    fn the_unexpected_member_reported_follows_glib_hash_order_after_the_table_grows() {
        let line = "v9=1,b9=1,bx=1,z9=1,y=1,t=1,a-y=1,g9=1,chardev=c0,pretty=on,id=m";
        assert_eq!(
            stderr(&["--monitor", line]),
            format!("bulkhead: --monitor {line}: Parameter 'b9' is unexpected")
        );
        let line = "p9=1,ox=1,chardev=c0,hx=1,m=1,y=1,d=1,m9=1,h=1";
        assert_eq!(
            stderr(&["--monitor", line]),
            format!("bulkhead: --monitor {line}: Parameter 'h' is unexpected")
        );
        let line = "ux=1,t9=1,w-y=1,chardev=c0,r=1,xx=1,w9=1,jx=1,w=1,y=1,m9=1,kx=1,x9=1,s-y=1,u=1";
        assert_eq!(
            stderr(&["--monitor", line]),
            format!("bulkhead: --monitor {line}: Parameter 't9' is unexpected")
        );
    }

    #[test]
    fn monitor_json_is_kept_raw_and_visited_strictly() {
        assert_eq!(
            single(&["--monitor", r#"{"chardev":1}"#]),
            OptionKind::Monitor(MonitorArg::Json(r#"{"chardev":1}"#.to_owned()))
        );
        assert_eq!(
            MonitorOptions::from_json(&json!({"chardev": 1})),
            Err(OptionError::InvalidType("chardev".to_owned(), "string"))
        );
        assert_eq!(
            MonitorOptions::from_json(&json!({"chardev": 1})).map_err(|e| e.to_string()),
            Err("Invalid parameter type for 'chardev', expected: string".to_owned())
        );
        assert_eq!(
            MonitorOptions::from_json(&json!({"chardev": "c0", "pretty": "on"}))
                .map_err(|e| e.to_string()),
            Err("Invalid parameter type for 'pretty', expected: boolean".to_owned())
        );
        assert_eq!(
            MonitorOptions::from_json(&json!({"chardev": "c0", "pretty": true})),
            Ok(MonitorOptions {
                id: None,
                mode: None,
                pretty: Some(true),
                chardev: "c0".to_owned()
            })
        );
    }

    // --- chardev ---

    #[test]
    fn chardev_socket_server_parses_into_typed_options() {
        assert_eq!(
            single(&[
                "--chardev",
                "socket,path=qmp.sock,server=on,wait=off,id=char1"
            ]),
            OptionKind::Chardev(ChardevOptions {
                id: "char1".to_owned(),
                backend: ChardevBackend::Socket(SocketChardev {
                    addr: SocketChardevAddr::Unix {
                        path: "qmp.sock".to_owned(),
                        abstract_ns: false,
                        tight: true
                    },
                    server: true,
                    wait: Some(false),
                    nodelay: None,
                }),
                opts: vec![
                    ("backend".to_owned(), "socket".to_owned()),
                    ("path".to_owned(), "qmp.sock".to_owned()),
                    ("server".to_owned(), "on".to_owned()),
                    ("wait".to_owned(), "off".to_owned()),
                ],
            })
        );
        match single(&["--chardev", "socket,fd=3,server=on,id=c"]) {
            OptionKind::Chardev(ChardevOptions {
                backend: ChardevBackend::Socket(s),
                ..
            }) => {
                assert_eq!(s.addr, SocketChardevAddr::Fd("3".to_owned()));
            }
            other => panic!("{other:?}"),
        }
        match single(&["--chardev", "stdio,id=s"]) {
            OptionKind::Chardev(c) => assert_eq!(c.backend, ChardevBackend::Stdio { signal: true }),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chardev_errors_match_qsd() {
        assert_eq!(
            stderr(&["--chardev", "socket"]),
            "bulkhead: --chardev socket: chardev: no id specified"
        );
        assert_eq!(
            stderr(&["--chardev", "id=c0"]),
            "bulkhead: --chardev id=c0: chardev: \"c0\" missing backend"
        );
        assert_eq!(
            stderr(&["--chardev", "foo,id=c0"]),
            "bulkhead: --chardev foo,id=c0: 'foo' is not a valid char driver name"
        );
        assert_eq!(
            stderr(&["--chardev", "unix,id=x"]),
            "bulkhead: --chardev unix,id=x: 'unix' is not a valid char driver name"
        );
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,bogus=1"]),
            "bulkhead: --chardev socket,id=c0,bogus=1: Invalid parameter 'bogus'"
        );
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,path=/x,server=maybe"]),
            "bulkhead: --chardev socket,id=c0,path=/x,server=maybe: Parameter 'server' expects 'on' or 'off'"
        );
        assert_eq!(
            stderr(&["--chardev", "socket,id=0c,path=/x"]),
            "bulkhead: --chardev socket,id=0c,path=/x: Parameter 'id' expects an identifier\n\
             Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
        );
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,path=/x,fd=3"]),
            "bulkhead: --chardev socket,id=c0,path=/x,fd=3: None or one of 'path', 'fd' or 'host' option required."
        );
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,host=localhost"]),
            "bulkhead: --chardev socket,id=c0,host=localhost: chardev: socket: no port given"
        );
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,path=/x,wait=off"]),
            "bulkhead: --chardev socket,id=c0,path=/x,wait=off: 'wait' option is incompatible with socket in client connect mode"
        );
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,path=/x,delay=on,nodelay=on"]),
            "bulkhead: --chardev socket,id=c0,path=/x,delay=on,nodelay=on: 'delay' and 'nodelay' are mutually exclusive"
        );
        assert_eq!(
            stderr(&[
                "--chardev",
                "socket,id=c0,path=/x,tls-authz=x,server=on,wait=off"
            ]),
            "bulkhead: --chardev socket,id=c0,path=/x,tls-authz=x,server=on,wait=off: 'tls_authz' option requires 'tls_creds' option"
        );
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,path=/x,websocket=on"]),
            "bulkhead: --chardev socket,id=c0,path=/x,websocket=on: Websocket client is not implemented"
        );
        assert_eq!(
            stderr(&[
                "--chardev",
                "socket,id=c0,path=/x,server=on,wait=off,cols=x"
            ]),
            "bulkhead: --chardev socket,id=c0,path=/x,server=on,wait=off,cols=x: Parameter 'cols' expects a number"
        );
        assert_eq!(
            stderr(&[
                "--chardev",
                "socket,id=c0,path=/x,server=on,wait=off,size=x"
            ]),
            "bulkhead: --chardev socket,id=c0,path=/x,server=on,wait=off,size=x: Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        );
    }

    #[test]
    fn chardev_comma_escapes_reach_id_and_backend() {
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,,x"]),
            "bulkhead: --chardev socket,id=c0,,x: Parameter 'id' expects an identifier\n\
             Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
        );
        assert_eq!(
            stderr(&["--chardev", "socket,,x,id=c0"]),
            "bulkhead: --chardev socket,,x,id=c0: 'socket,x' is not a valid char driver name"
        );
        assert_eq!(
            stderr(&["--chardev", ",id=c0"]),
            "bulkhead: --chardev ,id=c0: '' is not a valid char driver name"
        );
        assert_eq!(
            stderr(&["--chardev", "socket,=x,id=c0"]),
            "bulkhead: --chardev socket,=x,id=c0: Invalid parameter ''"
        );
        assert_eq!(
            stderr(&["--chardev", "id,path=/x"]),
            "bulkhead: --chardev id,path=/x: 'id' is not a valid char driver name"
        );
        // A doubled comma at the end belongs to the value.
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,path=/x,server=on,wait=off,,"]),
            "bulkhead: --chardev socket,id=c0,path=/x,server=on,wait=off,,: Parameter 'wait' expects 'on' or 'off'"
        );
    }

    #[test]
    fn chardev_first_id_wins_and_missing_address_is_an_empty_fd() {
        match single(&["--chardev", "socket,id=c0,id=0x"]) {
            OptionKind::Chardev(c) => {
                assert_eq!(c.id, "c0");
                assert_eq!(
                    c.backend,
                    ChardevBackend::Socket(SocketChardev {
                        addr: SocketChardevAddr::Fd(String::new()),
                        server: false,
                        wait: None,
                        nodelay: None
                    })
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_fd_number("").map_err(|e| e.to_string()),
            Err("Unable to parse FD number ".to_owned())
        );
        assert_eq!(
            parse_fd_number("abc").map_err(|e| e.to_string()),
            Err("Unable to parse FD number abc".to_owned())
        );
        assert_eq!(parse_fd_number("-1"), Ok(-1));
        assert_eq!(parse_fd_number("99"), Ok(99));
    }

    #[test]
    fn short_form_booleans_warn_before_any_error() {
        let opt = match parse_args(&args(&["--chardev", "socket,id=c0,path=/y,server,nowait"])) {
            Ok(CliAction::Run(mut o)) => o.remove(0),
            other => panic!("{other:?}"),
        };
        let printed: Vec<String> = opt
            .warnings
            .iter()
            .map(|w| diagnostic(&opt.given, w))
            .collect();
        assert_eq!(
            printed,
            [
                "bulkhead: --chardev socket,id=c0,path=/y,server,nowait: warning: short-form boolean option 'server' deprecated\nPlease use server=on instead",
                "bulkhead: --chardev socket,id=c0,path=/y,server,nowait: warning: short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
            ]
        );
        assert!(opt.parsed.is_ok(), "{:?}", opt.parsed);
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,path=/y,server=on,wait=off,delay"]),
            "bulkhead: --chardev socket,id=c0,path=/y,server=on,wait=off,delay: warning: short-form boolean option 'delay' deprecated\nPlease use nodelay=off instead"
        );
        assert_eq!(
            stderr(&[
                "--chardev",
                "socket,id=c0,path=/y,server=on,wait=off,nodelay,nodelay=x"
            ]),
            "bulkhead: --chardev socket,id=c0,path=/y,server=on,wait=off,nodelay,nodelay=x: warning: short-form boolean option 'nodelay' deprecated\nPlease use nodelay=on instead\n\
             bulkhead: --chardev socket,id=c0,path=/y,server=on,wait=off,nodelay,nodelay=x: Parameter 'nodelay' expects 'on' or 'off'"
        );
        assert_eq!(
            stderr(&["--chardev", "id=c0,socket"]),
            "bulkhead: --chardev id=c0,socket: warning: short-form boolean option 'socket' deprecated\nPlease use socket=on instead\n\
             bulkhead: --chardev id=c0,socket: Invalid parameter 'socket'"
        );
        assert_eq!(
            stderr(&["--chardev", "socket,id=c0,nosuch"]),
            "bulkhead: --chardev socket,id=c0,nosuch: warning: short-form boolean option 'nosuch' deprecated\nPlease use such=off instead\n\
             bulkhead: --chardev socket,id=c0,nosuch: Invalid parameter 'such'"
        );
    }

    #[test]
    fn chardev_help_prints_qsd_lists_with_qsd_exit_codes() {
        match single(&["--chardev", "help"]) {
            OptionKind::ChardevHelp { stdout, exit_code } => {
                assert_eq!(exit_code, 0);
                assert_eq!(
                    stdout,
                    "Available chardev backend types: \n  pty\n  file\n  udp\n  memory\n  stdio\n  socket\n  ringbuf\n  null\n  parallel\n  pipe\n  mux\n  serial\n  hub\n"
                );
            }
            other => panic!("{other:?}"),
        }
        match single(&["--chardev", "socket,help"]) {
            OptionKind::ChardevHelp { stdout, exit_code } => {
                assert_eq!(exit_code, 1);
                assert!(stdout.starts_with(
                    "chardev options:\n  abstract=<bool (on/off)>\n  append=<bool (on/off)>\n"
                ));
                assert!(stdout.ends_with("  websocket=<bool (on/off)>\n  width=<num>\n"));
                assert_eq!(stdout.lines().count(), 44);
                // qsd sorts with strcmp: "reconnect-ms" before "reconnect".
                assert!(stdout.contains("  reconnect-ms=<num>\n  reconnect=<num>\n"));
            }
            other => panic!("{other:?}"),
        }
    }

    // --- trace, pidfile, daemonize, sandbox ---

    #[test]
    fn trace_takes_enable_as_implied_key_and_rejects_unknown_keys() {
        assert_eq!(
            single(&["-T", "nbd_*"]),
            OptionKind::Trace(TraceOptions {
                enable: Some("nbd_*".to_owned()),
                events: None,
                file: None
            })
        );
        assert_eq!(
            single(&["-Tfile=/t.log"]),
            OptionKind::Trace(TraceOptions {
                enable: None,
                events: None,
                file: Some("/t.log".to_owned())
            })
        );
        assert_eq!(
            stderr(&["-T", "foo=bar"]),
            "bulkhead: -T foo=bar: Invalid parameter 'foo'"
        );
        assert_eq!(
            stderr(&["-Tfoo=bar"]),
            "bulkhead: -Tfoo=bar: Invalid parameter 'foo'"
        );
        assert_eq!(
            stderr(&["--trace=foo=bar,x"]),
            "bulkhead: --trace=foo=bar,x: Invalid parameter 'foo'"
        );
        assert_eq!(
            stderr(&["-T", "enable=x,bogus=1"]),
            "bulkhead: -T enable=x,bogus=1: Invalid parameter 'bogus'"
        );
    }

    #[test]
    fn process_options_keep_their_place_and_given_text() {
        let parsed = parse_args(&args(&[
            "--daemonize",
            "--pidfile=/p",
            "--sandbox",
            "off",
            "--sandbox=y",
        ]));
        let Ok(CliAction::Run(options)) = parsed else {
            panic!("{parsed:?}")
        };
        let summary: Vec<(String, OptionKind)> = options
            .into_iter()
            .map(|o| (o.given, o.parsed.unwrap_or(OptionKind::Daemonize)))
            .collect();
        assert_eq!(
            summary,
            [
                ("--daemonize".to_owned(), OptionKind::Daemonize),
                (
                    "--pidfile=/p".to_owned(),
                    OptionKind::Pidfile("/p".to_owned())
                ),
                ("--sandbox off".to_owned(), OptionKind::Sandbox(false)),
                ("--sandbox=y".to_owned(), OptionKind::Sandbox(true)),
            ]
        );
    }

    #[test]
    fn a_bad_sandbox_value_fails_the_pre_init_pass() {
        assert_eq!(
            stderr(&["--blockdev", "a..b=1", "--sandbox", "maybe"]),
            "bulkhead: --sandbox maybe: Parameter 'sandbox' expects 'on' or 'off'"
        );
    }

    #[test]
    fn help_and_version_texts_name_bulkhead_and_its_qsd() {
        let help = help_text();
        assert!(help.starts_with("Usage: bulkhead [options]\n"));
        assert!(help.contains("\n  --sandbox on|off       run block drivers"));
        assert!(
            help.contains("\n  --pidfile <path>       write process ID to a file after startup\n")
        );
        assert!(help.contains("(default: on)\n"));
        assert!(help.contains("\n  --isolation kind|image how nodes are spread"));
        assert!(help.ends_with("reaches only its image\n"));
        assert_eq!(
            version_text(),
            format!(
                "bulkhead version {}\nCompatible with qemu-storage-daemon version 10.0.2 (command line and QMP)\n",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn glib_hash_order_survives_growth_without_losing_members() {
        let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
        let mut table = GHashOrder::new();
        for k in &keys {
            table.insert(k);
        }
        let mut seen: Vec<&str> = table.slots().collect();
        seen.sort_unstable();
        let mut expected: Vec<&str> = keys.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(seen, expected);
    }
}
