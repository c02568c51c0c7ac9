//! `strata login` and `strata logout`.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Context, Result};

use crate::cli::{LoginArgs, LogoutArgs};
use crate::registry::{self, auth::Credentials};

/// Read one line from a terminal, without echo when `secret`.
fn prompt(what: &str, secret: bool) -> Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("no {what} given and standard input is not a terminal (use -u and --password-stdin)");
    }
    eprint!("{what}: ");
    std::io::stderr().flush()?;
    let saved = if secret {
        let t = rustix::termios::tcgetattr(&stdin).context("reading terminal settings")?;
        let mut quiet = t.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet)?;
        Some(t)
    } else {
        None
    };
    let mut line = String::new();
    let r = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &t);
        eprintln!();
    }
    r?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// `strata login [-u USER] [-p PASS | --password-stdin] SERVER`.
pub fn run(a: LoginArgs) -> Result<()> {
    if a.password.is_some() && a.password_stdin {
        bail!("--password and --password-stdin are mutually exclusive");
    }
    let user = match a.username {
        Some(u) => u,
        None => prompt("Username", false)?,
    };
    if user.is_empty() {
        bail!("empty user name");
    }
    let password = if a.password_stdin {
        let mut s = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut s)
            .context("reading the password from standard input")?;
        s.trim_end_matches(['\n', '\r']).to_string()
    } else if let Some(p) = a.password {
        eprintln!("WARNING! Using --password via the CLI is insecure. Use --password-stdin.");
        p
    } else {
        prompt("Password", true)?
    };
    if password.is_empty() {
        bail!("empty password");
    }
    let opts = super::push::options(&a.registry, true);
    let file = registry::login(&a.server, Credentials { user, password }, &opts)?;
    log::info!("credentials stored in {}", file.display());
    super::say!("Login Succeeded");
    Ok(())
}

/// `strata logout SERVER`.
pub fn logout(a: LogoutArgs) -> Result<()> {
    let host = registry::logout(&a.server, a.authfile.as_deref())?;
    super::say!("Removed login credentials for {host}");
    Ok(())
}
