//! `--chardev` and `-T`: their QemuOpts turned into typed options, with qsd's checks in
//! `qemu_chr_new_from_opts` order.

use super::*;

/// What qsd prints for `--chardev <backend>,help` (`qemu_opts_print_help`).
pub(super) fn chardev_options_help() -> String {
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
pub(super) fn parse_chardev(
    value: &str,
    warnings: &mut Vec<CliWarning>,
) -> Result<OptionKind, OptionError> {
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
pub(super) fn parse_socket_chardev(opts: &QemuOpts) -> Result<SocketChardev, OptionError> {
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
    if server && opts.get("reconnect").is_some() {
        return Err(OptionError::SocketReconnectServer);
    }
    if !server {
        if opts.get_bool("websocket", false) {
            return Err(OptionError::SocketWebsocketClient);
        }
        if wait.is_some() {
            return Err(OptionError::SocketWaitInClientMode);
        }
    }
    let reconnect_ms = match (opts.get("reconnect"), opts.get("reconnect-ms")) {
        (Some(_), Some(_)) => return Err(OptionError::SocketReconnectConflict),
        (Some(secs), None) => secs.parse::<u64>().ok().map(|s| s.saturating_mul(1000)),
        (None, Some(ms)) => ms.parse::<u64>().ok(),
        (None, None) => None,
    }
    .filter(|&ms| ms > 0);
    Ok(SocketChardev {
        reconnect_ms,
        addr,
        server,
        wait,
        nodelay,
    })
}

/// `-T`: `trace_opt_parse`'s QemuOpts (implied `enable`).
pub(super) fn parse_trace(
    value: &str,
    warnings: &mut Vec<CliWarning>,
) -> Result<OptionKind, OptionError> {
    let opts = qemu_opts_parse(value, "enable", TRACE_OPTS, warnings)?;
    Ok(OptionKind::Trace(TraceOptions {
        enable: opts.get("enable").map(str::to_owned),
        events: opts.get("events").map(str::to_owned),
        file: opts.get("file").map(str::to_owned),
    }))
}
