//! Unit tests of the command line against qsd's texts and behaviour.

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
        Ok(CliAction::Run(mut options)) if options.len() == 1 => match options.remove(0).parsed {
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
                reconnect_ms: None,
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
fn client_socket_reconnect_is_in_milliseconds_and_zero_means_none() {
    let reconnect = |spec: &str| match single(&["--chardev", spec]) {
        OptionKind::Chardev(ChardevOptions {
            backend: ChardevBackend::Socket(s),
            ..
        }) => s.reconnect_ms,
        other => panic!("{other:?}"),
    };
    assert_eq!(reconnect("socket,id=c0,path=/x,reconnect=2"), Some(2000));
    assert_eq!(
        reconnect("socket,id=c0,path=/x,reconnect-ms=150"),
        Some(150)
    );
    assert_eq!(reconnect("socket,id=c0,path=/x,reconnect=0"), None);
    assert_eq!(reconnect("socket,id=c0,path=/x"), None);
    // qsd 10.0.2 lets `reconnect-ms` through on a listener (and ignores it).
    assert_eq!(
        reconnect("socket,id=c0,path=/x,server=on,wait=off,reconnect-ms=5"),
        Some(5)
    );
    assert_eq!(
        stderr(&["--chardev", "socket,id=c0,path=/x,server=on,reconnect=1"]),
        "bulkhead: --chardev socket,id=c0,path=/x,server=on,reconnect=1: 'reconnect' option is incompatible with socket in server listen mode"
    );
    assert_eq!(
        stderr(&[
            "--chardev",
            "socket,id=c0,path=/x,reconnect=1,reconnect-ms=1"
        ]),
        "bulkhead: --chardev socket,id=c0,path=/x,reconnect=1,reconnect-ms=1: 'reconnect' and 'reconnect-ms' are mutually exclusive"
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
                    nodelay: None,
                    reconnect_ms: None
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
    assert!(help.contains("\n  --pidfile <path>       write process ID to a file after startup\n"));
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
