//! QemuOpts, the older option syntax `--chardev` and `-T` use: `key=value` items with an
//! implied first key, typed values, qsd's checks and texts.

use super::*;

/// The type of a QemuOpts option.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum OptType {
    Str,
    Bool,
    Number,
    Size,
}

/// `qemu_chardev_opts` as qsd 10.0.2 lists it (`--chardev socket,help`).
pub(super) const CHARDEV_OPTS: &[(&str, OptType)] = &[
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
pub(super) const CHARDEV_BACKENDS: &[&str] = &[
    "pty", "file", "udp", "memory", "stdio", "socket", "ringbuf", "null", "parallel", "pipe",
    "mux", "serial", "hub",
];

/// `qemu_trace_opts`.
pub(super) const TRACE_OPTS: &[(&str, OptType)] = &[
    ("enable", OptType::Str),
    ("events", OptType::Str),
    ("file", OptType::Str),
];

/// The result of QemuOpts parsing.
pub(super) struct QemuOpts {
    pub(super) id: Option<String>,
    pub(super) opts: Vec<(String, String)>,
    pub(super) help: bool,
}

impl QemuOpts {
    /// `qemu_opt_get`: the last value given.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `qemu_opt_get_bool` on a validated option.
    pub(super) fn get_bool(&self, name: &str, default: bool) -> bool {
        self.get(name).and_then(parse_bool).unwrap_or(default)
    }
}

/// One item of QemuOpts syntax.
pub(super) struct OptItem {
    pub(super) name: String,
    pub(super) value: String,
    pub(super) help: bool,
    pub(super) warning: Option<CliWarning>,
}

/// `get_opt_value`: a value up to an unescaped `,` (`,,` is a comma). Returns the value
/// and the byte offset of the terminating `,` or the end.
pub(super) fn opt_value(params: &str, start: usize) -> (String, usize) {
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
pub(super) fn opt_item(params: &str, pos: usize, firstname: Option<&str>) -> (OptItem, usize) {
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
pub(super) fn is_number(value: &str) -> bool {
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
pub(super) fn is_size(value: &str) -> bool {
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
pub(super) fn qemu_opts_parse(
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
