//! Processes, signals, namespaces and credentials: the calls the runtime, the mount daemon
//! and `rm` make, so that no module outside `sys/` names `nix`. Errors are `rustix`'s
//! `Errno`, like the rest of `sys`.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};

use super::{Errno, SysResult};

fn e(x: nix::errno::Errno) -> Errno {
    Errno::from_raw_os_error(x as i32)
}

/// Send signal `sig` to process `pid`.
pub fn kill(pid: i32, sig: i32) -> SysResult<()> {
    let s = Signal::try_from(sig).map_err(e)?;
    nix::sys::signal::kill(Pid::from_raw(pid), s).map_err(e)
}

/// This process's id.
pub fn getpid() -> i32 {
    nix::unistd::getpid().as_raw()
}

/// The parent's id (0 for PID 1 of a namespace).
pub fn getppid() -> i32 {
    nix::unistd::getppid().as_raw()
}

/// Start a new session (and leave the terminal's process group).
pub fn setsid() -> SysResult<()> {
    nix::unistd::setsid().map(|_| ()).map_err(e)
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe_cloexec() -> SysResult<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(e)
}

/// Make `fd` this process's standard input, output and/or error.
pub fn dup_to_stdio(fd: BorrowedFd<'_>, stdin: bool, stdout: bool, stderr: bool) -> SysResult<()> {
    if stdin {
        nix::unistd::dup2_stdin(fd).map_err(e)?;
    }
    if stdout {
        nix::unistd::dup2_stdout(fd).map_err(e)?;
    }
    if stderr {
        nix::unistd::dup2_stderr(fd).map_err(e)?;
    }
    Ok(())
}

/// SIGKILL this process when its parent dies.
pub fn kill_with_parent() -> SysResult<()> {
    signal_with_parent(libc::SIGKILL)
}

/// Send this process `sig` when its parent dies.
pub fn signal_with_parent(sig: i32) -> SysResult<()> {
    nix::sys::prctl::set_pdeathsig(Signal::try_from(sig).map_err(e)?).map_err(e)
}

/// Set no_new_privs: setuid binaries and file capabilities grant nothing from now on.
pub fn set_no_new_privs() -> SysResult<()> {
    nix::sys::prctl::set_no_new_privs().map_err(e)
}

/// Namespaces to enter (`CLONE_NEW*` bits).
pub type Namespaces = nix::sched::CloneFlags;

/// unshare(2) of the namespaces in `flags`.
pub fn unshare(flags: Namespaces) -> SysResult<()> {
    nix::sched::unshare(flags).map_err(e)
}

/// Set the hostname (of the UTS namespace this process is in).
pub fn sethostname(name: &str) -> SysResult<()> {
    nix::unistd::sethostname(name).map_err(e)
}

/// Become `uid`/`gid` with supplementary `groups` (None: leave them, as a user namespace
/// with setgroups denied requires), process-wide.
pub fn set_ids(uid: u32, gid: u32, groups: Option<&[u32]>) -> Result<(), (&'static str, Errno)> {
    if let Some(g) = groups {
        let gs: Vec<Gid> = g.iter().map(|x| Gid::from_raw(*x)).collect();
        nix::unistd::setgroups(&gs).map_err(|x| ("setgroups", e(x)))?;
    }
    nix::unistd::setgid(Gid::from_raw(gid)).map_err(|x| ("setgid", e(x)))?;
    nix::unistd::setuid(Uid::from_raw(uid)).map_err(|x| ("setuid", e(x)))
}

/// execve(2); returns only on failure, with its errno.
pub fn execve(path: &CStr, argv: &[CString], env: &[CString]) -> Errno {
    match nix::unistd::execve(path, argv, env) {
        Err(x) => e(x),
        Ok(never) => match never {},
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// exit(code).
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// The shell's convention: the code, or 128+N for signal N.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Wait for child `pid` (-1: any child). Ok(None) for a stop or continue; EINTR is returned
/// for the caller to retry.
pub fn wait_child(pid: i32) -> SysResult<(i32, Option<Exit>)> {
    let s = waitpid(Pid::from_raw(pid), None).map_err(e)?;
    let who = s.pid().map(|p| p.as_raw()).unwrap_or(0);
    Ok(match s {
        WaitStatus::Exited(_, c) => (who, Some(Exit::Code(c))),
        WaitStatus::Signaled(_, sig, _) => (who, Some(Exit::Signal(sig as i32))),
        _ => (who, None),
    })
}

/// Signals blocked in this thread (and the threads it starts), to be taken with `wait`.
pub struct BlockedSignals(SigSet);

impl BlockedSignals {
    /// Block `sigs` (numbers) in the calling thread.
    pub fn block(sigs: &[i32]) -> SysResult<BlockedSignals> {
        let mut s = SigSet::empty();
        for &n in sigs {
            s.add(Signal::try_from(n).map_err(e)?);
        }
        s.thread_block().map_err(e)?;
        Ok(BlockedSignals(s))
    }

    /// Wait for one of them; returns its number.
    pub fn wait(&self) -> SysResult<i32> {
        self.0.wait().map(|s| s as i32).map_err(e)
    }
}

/// poll(2) for readability of `fds` for up to `ms` milliseconds; returns, per fd, whether
/// it is readable and whether it hung up (or failed).
pub fn poll_in(fds: &[BorrowedFd<'_>], ms: u16) -> SysResult<Vec<(bool, bool)>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut p: Vec<PollFd<'_>> = fds
        .iter()
        .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
        .collect();
    nix::poll::poll(&mut p, PollTimeout::from(ms)).map_err(e)?;
    Ok(p.iter()
        .map(|x| {
            let r = x.revents().unwrap_or(PollFlags::empty());
            (
                r.contains(PollFlags::POLLIN),
                r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL),
            )
        })
        .collect())
}

/// Ignore signal `sig` in this process.
pub fn ignore_signal(sig: i32) {
    if let Ok(s) = Signal::try_from(sig) {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigIgn) };
    }
}

/// Make every mount of this (new) mount namespace private, so nothing mounted here shows
/// in the namespace it was copied from (or the other way round).
pub fn make_mounts_private() -> SysResult<()> {
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )
}

/// Execute `exe` with this process's arguments `args` (argv[0] included) and environment,
/// plus `extra`; returns only on failure.
pub fn exec_self(exe: &std::path::Path, args: &[std::ffi::OsString], extra: &[(&str, &str)]) -> Errno {
    use std::os::unix::ffi::OsStrExt;
    let c = |b: &[u8]| CString::new(b).map_err(|_| Errno::INVAL);
    let run = || -> SysResult<Errno> {
        let path = c(exe.as_os_str().as_bytes())?;
        let argv: Vec<CString> = args.iter().map(|a| c(a.as_bytes())).collect::<SysResult<_>>()?;
        let mut env: Vec<CString> = std::env::vars_os()
            .map(|(k, v)| {
                let mut b = k.as_bytes().to_vec();
                b.push(b'=');
                b.extend_from_slice(v.as_bytes());
                c(&b)
            })
            .collect::<SysResult<_>>()?;
        for (k, v) in extra {
            env.push(c(format!("{k}={v}").as_bytes())?);
        }
        Ok(execve(&path, &argv, &env))
    };
    run().unwrap_or_else(|e| e)
}
