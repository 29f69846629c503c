//! The pre-init pass: qsd's `getopt_long` over argv (long-option prefixes, `--opt=value`
//! and `--opt value`, `-h`/`-V`/`-T`), and the stage-one dispatch of each option to its
//! parser. See the parent module for the two passes.

use super::*;

/// How a long option takes its argument.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum HasArg {
    No,
    Required,
}

/// The long options, qsd's plus `sandbox` and `isolation`, in alphabetical order like qsd's table.
pub(super) const LONG_OPTIONS: &[(&str, HasArg)] = &[
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

pub(super) fn simple(given: String, kind: OptionKind) -> CliOption {
    CliOption {
        given,
        warnings: Vec::new(),
        parsed: Ok(kind),
    }
}

/// glibc's long option lookup: an exact name wins, else a unique prefix.
pub(super) fn match_long_option(
    arg: &str,
    written: &str,
) -> Result<(&'static str, HasArg), CliError> {
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
pub(super) fn parse_option(name: &str, given: String, value: &str) -> CliOption {
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
pub(super) fn visitor_arg(
    value: &str,
    implied_key: Option<&str>,
) -> Result<OptionArg, OptionError> {
    if value.starts_with('{') {
        Ok(OptionArg::Json(value.to_owned()))
    } else {
        Ok(OptionArg::Keyval(keyval::parse(value, implied_key)?))
    }
}

pub(super) fn parse_monitor(value: &str) -> Result<OptionKind, OptionError> {
    match visitor_arg(value, Some("chardev"))? {
        OptionArg::Json(text) => Ok(OptionKind::Monitor(MonitorArg::Json(text))),
        OptionArg::Keyval(tree) => Ok(OptionKind::Monitor(MonitorArg::Options(
            MonitorOptions::from_keyval(&tree)?,
        ))),
    }
}

/// `user_creatable_parse_str`: JSON, or keyval with help allowed.
pub(super) fn parse_object(value: &str) -> Result<OptionKind, OptionError> {
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
pub(super) fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}
