//! The pseudo-terminal of `run -t`: the command gets the slave as its controlling
//! terminal; the caller relays between its own terminal (in raw mode) and the master, and
//! passes window-size changes on.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use rustix::fs::{Mode, OFlags};

/// Master and slave of a new pty.
pub struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
    path: PathBuf,
}

fn stdin() -> BorrowedFd<'static> {
    // fd 0 stays open for the life of the process.
    rustix::stdio::stdin()
}

impl Pty {
    /// Allocate one, sized like our terminal when we have one.
    pub fn open() -> Result<Pty> {
        let master = rustix::pty::openpt(
            rustix::pty::OpenptFlags::RDWR
                | rustix::pty::OpenptFlags::NOCTTY
                | rustix::pty::OpenptFlags::CLOEXEC,
        )
        .context("opening a pseudo-terminal")?;
        rustix::pty::grantpt(&master)?;
        rustix::pty::unlockpt(&master)?;
        let name = rustix::pty::ptsname(&master, Vec::new())?;
        let path = PathBuf::from(name.to_string_lossy().into_owned());
        let slave = rustix::fs::open(
            &path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening {}", path.display()))?;
        if let Ok(ws) = rustix::termios::tcgetwinsize(stdin()) {
            let _ = rustix::termios::tcsetwinsize(&master, ws);
        }
        Ok(Pty { master, slave, path })
    }

    /// Path of the slave (for /dev/console).
    pub fn slave_path(&self) -> Result<PathBuf> {
        Ok(self.path.clone())
    }

    /// In the command's process (after setsid): make the slave our controlling terminal
    /// and standard input, output and error.
    pub fn become_controlling(&self) -> Result<()> {
        rustix::process::ioctl_tiocsctty(&self.slave).context("TIOCSCTTY")?;
        nix::unistd::dup2_stdin(&self.slave)?;
        nix::unistd::dup2_stdout(&self.slave)?;
        nix::unistd::dup2_stderr(&self.slave)?;
        Ok(())
    }

    /// Relay until the command side closes the terminal. Our terminal (if stdin is one) is
    /// in raw mode meanwhile, so Ctrl-C and friends reach the command's terminal.
    pub fn relay(self, interactive: bool) -> Result<()> {
        let Pty { master, slave, .. } = self;
        drop(slave);
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
}

fn pump(master: &OwnedFd, interactive: bool) -> Result<()> {
    let mut buf = vec![0u8; 1 << 15];
    let mut stdin_open = interactive;
    let mut out = std::io::stdout();
    let mut mf = std::fs::File::from(master.try_clone()?);
    loop {
        if crate::sys::take_winch() {
            if let Ok(ws) = rustix::termios::tcgetwinsize(stdin()) {
                let _ = rustix::termios::tcsetwinsize(master, ws);
            }
        }
        let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, PollTimeout::from(500u16)) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let m = fds[0].revents().unwrap_or(PollFlags::empty());
        let s = fds.get(1).and_then(|f| f.revents()).unwrap_or(PollFlags::empty());
        if m.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
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
        if s.intersects(PollFlags::POLLIN | PollFlags::POLLHUP) {
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
