//! One file per verb; this module dispatches and owns the single error printer.

pub mod mount;
pub mod umount;

use std::ffi::OsString;
use std::path::Path;

use clap::Parser;

use crate::cli::{Cli, Command};

/// Exit codes.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// The operation failed.
    pub const FAILURE: i32 = 1;
    /// Bad usage.
    pub const USAGE: i32 = 2;
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let env = env_logger::Env::default().default_filter_or(level);
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

/// Print an error chain once, as `strata: error: outer: inner`.
pub fn print_error(e: &anyhow::Error) {
    eprintln!("strata: error: {e:#}");
}

/// Entry point of the binary: returns the process exit code.
pub fn main() -> i32 {
    let args: Vec<OsString> = std::env::args_os().collect();
    let prog = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    // Called by mount(8) as /sbin/mount.fuse.strata SOURCE MOUNTPOINT -o OPTIONS.
    if prog
        .as_deref()
        .is_some_and(|p| p.starts_with("mount.fuse.strata") || p == "mount.strata")
    {
        init_logging(0);
        return match mount::run_helper(&args[1..]) {
            Ok(()) => exit::OK,
            Err(e) => {
                print_error(&e);
                exit::FAILURE
            }
        };
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            return code;
        }
    };
    init_logging(cli.verbose);
    let r = match cli.command {
        Command::Mount(a) => mount::run(a),
        Command::Umount(a) => umount::run(a),
    };
    match r {
        Ok(()) => exit::OK,
        Err(e) => {
            print_error(&e);
            exit::FAILURE
        }
    }
}
