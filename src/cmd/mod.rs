//! One file per verb; this module dispatches and owns the single error printer.

/// Print a line on stdout; a closed pipe (`strata images | head`) ends the program quietly
/// instead of panicking as `println!` would.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}
pub(crate) use say;

pub mod build;
pub mod check;
pub mod commit;
pub mod create;
pub mod diff;
pub mod export;
pub mod gc;
pub mod history;
pub mod images;
pub mod import;
pub mod inspect;
pub mod load;
pub mod login;
pub mod mount;
pub mod ps;
pub mod pull;
pub mod push;
pub mod rm;
pub mod rmi;
pub mod run;
pub mod save;
pub mod tag;
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
    // rustls-platform-verifier logs certificate failures at error level; strata reports
    // them itself, naming the registry.
    let level = format!("{level},rustls_platform_verifier=off");
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
    // fuse-overlayfs's calling convention (`PROG -o OPTIONS MOUNTPOINT`), used by
    // containers/storage's mount_program: the same as `strata mount -o ...`.
    let mut args = args;
    if args
        .get(1)
        .is_some_and(|a| a == "-o" || a.to_string_lossy().starts_with("-o"))
    {
        args.insert(1, OsString::from("mount"));
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
    let root = cli.root.clone().unwrap_or_else(crate::image::store::default_root);
    // Rootless: the commands that create, read or remove files of a container's users run
    // as root of a user namespace with the user's subordinate IDs (see runtime::userns).
    // mount/umount/ps stay outside, so a `strata mount` is seen by the user's shell.
    let touches_owners = !matches!(
        cli.command,
        Command::Mount(_)
            | Command::Umount(_)
            | Command::Ps(_)
            | Command::Login(_)
            | Command::Logout(_)
            | Command::Images(_)
            | Command::History(_)
            | Command::Inspect(_)
            | Command::Tag(_)
            | Command::Push(_)
    );
    if touches_owners {
        match crate::runtime::userns::reexec_inside(&args, &root) {
            Ok(Some(code)) => return code,
            Ok(None) => {}
            Err(e) => {
                print_error(&e);
                return exit::FAILURE;
            }
        }
    }
    // run and shell pass the command's exit code on; their own failures exit 125.
    let r = match cli.command {
        Command::Run(a) => return finish(run::run(a, &root), crate::runtime::EXIT_RUNTIME),
        Command::Shell(a) => return finish(run::shell(a, &root), crate::runtime::EXIT_RUNTIME),
        Command::Mount(a) => mount::run(a, &root),
        Command::Umount(a) => umount::run(a, &root),
        Command::Create(a) => create::run(a, &root),
        Command::Ps(a) => ps::run(a, &root),
        Command::Rm(a) => rm::run(a, &root),
        Command::Commit(a) => commit::run(a, &root),
        Command::Diff(a) => diff::run(a, &root),
        Command::History(a) => history::run(a, &root),
        Command::Images(a) => images::run(a, &root),
        Command::Tag(a) => tag::run(a, &root),
        Command::Rmi(a) => rmi::run(a, &root),
        Command::Inspect(a) => inspect::run(a, &root),
        Command::Gc => gc::run(&root),
        Command::Check(a) => return finish(check::run(a, &root), exit::FAILURE),
        Command::Save(a) => save::run(a, &root),
        Command::Load(a) => load::run(a, &root),
        Command::Import(a) => import::run(a, &root),
        Command::Export(a) => export::run(a, &root),
        Command::Build(a) => return finish(build::run(a, &root), exit::FAILURE),
        Command::Pull(a) => pull::run(a, &root),
        Command::Push(a) => push::run(a, &root),
        Command::Login(a) => login::run(a),
        Command::Logout(a) => login::logout(a),
    };
    finish(r.map(|()| exit::OK), exit::FAILURE)
}

/// Turn a verb's result into an exit code, printing the error once.
fn finish(r: anyhow::Result<i32>, failure: i32) -> i32 {
    match r {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`strata images | head`) is not an error.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                    || c.downcast_ref::<serde_json::Error>()
                        .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
            }) {
                return exit::OK;
            }
            print_error(&e);
            failure
        }
    }
}

/// Print a JSON value on stdout.
pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Write `data`'s bytes to `path` atomically via a temporary file beside it, so a failure
/// leaves no half-written output.
pub fn with_output_file(
    path: &std::path::Path,
    f: impl FnOnce(std::fs::File) -> anyhow::Result<std::fs::File>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    // A device, fifo or socket (`-o /dev/null`, `-o /dev/stdout`) is written in place:
    // renaming a file over it would replace the device node itself.
    if let Ok(md) = std::fs::metadata(path) {
        if !md.is_file() && !md.is_dir() {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening '{}'", path.display()))?;
            // Devices and pipes may not sync; what was written is written.
            let _ = f(file)?.sync_all();
            return Ok(());
        }
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("output '{}' names no file", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.strata-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = std::fs::File::create(&tmp).with_context(|| format!("creating '{}'", path.display()))?;
    match f(file).and_then(|f| f.sync_all().map_err(Into::into)) {
        Ok(()) => std::fs::rename(&tmp, path).with_context(|| format!("writing '{}'", path.display())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A compact age: "3 minutes ago".
pub fn ago(rfc3339: Option<&str>) -> String {
    let Some(t) = rfc3339.and_then(parse_rfc3339) else {
        return "N/A".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let d = (now - t).max(0);
    let (n, u) = match d {
        0..=59 => (d, "second"),
        60..=3599 => (d / 60, "minute"),
        3600..=86399 => (d / 3600, "hour"),
        86400..=2591999 => (d / 86400, "day"),
        2592000..=31535999 => (d / 2592000, "month"),
        _ => (d / 31536000, "year"),
    };
    format!("{n} {u}{} ago", if n == 1 { "" } else { "s" })
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS...`.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (n(0..4)?, n(5..7)?, n(8..10)?, n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from civil (Howard Hinnant).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146097 + doe - 719468) * 86400 + h * 3600 + mi * 60 + se)
}

/// Human size: "1.5MB" (decimal, like docker).
pub fn human_size(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + units[i]
    }
}
