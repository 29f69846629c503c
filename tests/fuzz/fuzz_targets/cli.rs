//! The command line: qsd's getopt passes, long-option abbreviations and every
//! option's stage-one parsing (keyval, QemuOpts for --chardev/-T, --monitor,
//! --object), then the diagnostics printed for each error.
//!
//! The parser lives in the `bulkhead` binary crate (`bin/src/cli/`), which a fuzz
//! crate cannot depend on; the file is compiled into this target as is. It depends
//! only on `bulkhead-qmp`, `serde_json` and `thiserror`.
//!
//! Input: argv after the program name, elements separated by NUL bytes (which argv
//! cannot contain), each as UTF-8 (lossy).
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../../bin/src/cli/mod.rs"]
mod cli;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args: Vec<String> = data
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    match cli::parse_args(&args) {
        Ok(cli::CliAction::Run(options)) => {
            for o in &options {
                for w in &o.warnings {
                    let _ = cli::diagnostic(&o.given, w);
                }
                if let Err(e) = &o.parsed {
                    let _ = cli::diagnostic(&o.given, e);
                }
            }
        }
        Ok(_) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
