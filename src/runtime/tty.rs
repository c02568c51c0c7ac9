//! The pseudo-terminal of `run -t`. It is allocated inside the container's own devpts (so
//! `tty` inside says /dev/pts/0), by PID 1 after the pivot; the master goes back to the
//! caller over a socket, and the caller relays between its own terminal (in raw mode) and
//! the master, passing window-size changes on.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags};

use crate::sys;

fn stdin() -> BorrowedFd<'static> {
    // fd 0 stays open for the life of the process.
    rustix::stdio::stdin()
}

/// Inside the container: a new pty from its /dev/ptmx. Returns (master, slave); the slave
/// is also bind-mounted on /dev/console.
pub fn open_in_container() -> Result<(OwnedFd, OwnedFd)> {
    let master = rustix::fs::open(
        "/dev/ptmx",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .context("opening /dev/ptmx in the container")?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let path = std::path::PathBuf::from(name.to_string_lossy().into_owned());
    let slave = rustix::fs::open(
        &path,
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", path.display()))?;
    if std::fs::File::create("/dev/console").is_ok() {
        rustix::mount::mount_bind(&path, "/dev/console").context("bind-mounting /dev/console")?;
    }
    Ok((master, slave))
}

/// In the command's process (after setsid): make the slave the controlling terminal and
/// standard input, output and error.
pub fn become_controlling(slave: &OwnedFd) -> Result<()> {
    rustix::process::ioctl_tiocsctty(slave).context("TIOCSCTTY")?;
    sys::dup_to_stdio(slave.as_fd(), true, true, true).context("terminal as standard I/O")?;
    Ok(())
}

/// In the caller: wait for the master from the container, then relay until the command
/// side closes the terminal. Our terminal (if stdin is one) is in raw mode meanwhile, so
/// Ctrl-C and friends reach the command's terminal.
pub fn relay(sock: OwnedFd, interactive: bool) -> Result<()> {
    let Some(master) = sys::recv_fd(sock.as_fd())? else {
        // The container failed before its terminal existed; its error is on stderr.
        return Ok(());
    };
    drop(sock);
    if let Ok(ws) = rustix::termios::tcgetwinsize(stdin()) {
        let _ = rustix::termios::tcsetwinsize(&master, ws);
    }
    let saved = rustix::termios::tcgetattr(stdin()).ok();
    if let Some(t) = &saved {
        let mut raw = t.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(stdin(), rustix::termios::OptionalActions::Now, &raw);
    }
    let r = pump(&master, interactive);
    if let Some(t) = &saved {
        let _ = rustix::termios::tcsetattr(stdin(), rustix::termios::OptionalActions::Now, t);
    }
    r
}

fn pump(master: &OwnedFd, interactive: bool) -> Result<()> {
    let mut buf = vec![0u8; 1 << 15];
    let mut stdin_open = interactive;
    let mut out = std::io::stdout();
    let mut mf = std::fs::File::from(master.try_clone()?);
    loop {
        if sys::take_winch() {
            if let Ok(ws) = rustix::termios::tcgetwinsize(stdin()) {
                let _ = rustix::termios::tcsetwinsize(master, ws);
            }
        }
        let mut fds = vec![master.as_fd()];
        if stdin_open {
            fds.push(stdin());
        }
        let ready = match sys::poll_in(&fds, 500) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let m = ready[0];
        let s = ready.get(1).copied().unwrap_or((false, false));
        if m.0 || m.1 {
            match mf.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    out.write_all(&buf[..n])?;
                    out.flush()?;
                }
                // EIO: every holder of the slave is gone.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if s.0 || s.1 {
            let n = match std::io::stdin().lock().read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            if n == 0 {
                stdin_open = false;
                // Tell the command's terminal about the end of input (^D at line start).
                let _ = mf.write_all(&[4]);
            } else {
                mf.write_all(&buf[..n])?;
            }
        }
    }
}
