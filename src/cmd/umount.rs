//! `strata umount`: unmount and wait for the daemon to end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::UmountArgs;
use crate::mounts::{is_mountpoint, pid_file};

/// The absolute mountpoint path, even when the daemon died and the path cannot be
/// resolved any more ("transport endpoint is not connected").
fn mountpoint_path(p: &Path) -> anyhow::Result<PathBuf> {
    match std::fs::canonicalize(p) {
        Ok(c) => Ok(c),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let parent = p
                .parent()
                .filter(|x| !x.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let parent =
                std::fs::canonicalize(parent).with_context(|| format!("mountpoint '{}'", p.display()))?;
            Ok(parent.join(p.file_name().context("mountpoint has no name")?))
        }
        Err(e) => Err(e).with_context(|| format!("mountpoint '{}'", p.display())),
    }
}

fn read_pid(pf: &Path) -> Option<i32> {
    std::fs::read_to_string(pf)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Unmount `p`; with `lazy`, detach even if busy. Waits for the daemon to exit.
pub fn umount(p: &Path, lazy: bool) -> anyhow::Result<()> {
    let mp = mountpoint_path(p)?;
    let pf = pid_file(&mp);
    if !is_mountpoint(&mp) {
        let _ = std::fs::remove_file(&pf);
        bail!("'{}' is not mounted", p.display());
    }
    let pid = read_pid(&pf);
    let flags = if lazy {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    match rustix::mount::unmount(&mp, flags) {
        Ok(()) => {}
        Err(rustix::io::Errno::BUSY) => {
            bail!(
                "'{}' is busy: a process still uses it (close it, or use --lazy)",
                p.display()
            )
        }
        Err(rustix::io::Errno::PERM) => {
            // Unprivileged: the setuid helper may unmount what this user mounted.
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            let st = cmd.arg(&mp).status().context("running fusermount3")?;
            if !st.success() {
                bail!("fusermount3 -u '{}' failed", p.display());
            }
        }
        Err(e) => {
            return Err(std::io::Error::from(e)).with_context(|| format!("unmounting '{}'", p.display()))
        }
    }
    if let Some(pid) = pid.filter(|_| !lazy) {
        let start = Instant::now();
        let limit = Duration::from_secs(30);
        // Woken the moment it exits where pidfds work, else polled.
        let _ = crate::sys::wait_exit(pid, limit);
        while crate::mounts::pid_alive(pid) {
            if start.elapsed() > limit {
                bail!(
                    "the daemon (pid {pid}) of '{}' did not exit within 30 s",
                    p.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if !lazy {
        let _ = std::fs::remove_file(&pf);
    }
    Ok(())
}

/// Where a container is mounted, if anywhere.
pub fn container_mountpoint(c: &crate::container::Container) -> Option<PathBuf> {
    let upper = std::fs::canonicalize(c.upper()).ok()?;
    crate::mounts::active()
        .into_iter()
        .find(|m| m.upper.as_deref() == Some(upper.as_path()))
        .map(|m| m.mountpoint)
        .or_else(|| (c.mounted() != Ok(false)).then(|| c.rootfs()))
}

/// `strata umount`: a mountpoint or a container name.
pub fn run(a: UmountArgs, store_root: &Path) -> anyhow::Result<()> {
    let s = a.mountpoint.to_string_lossy();
    if !s.contains('/') && crate::container::Container::exists(store_root, &s) && !a.mountpoint.is_dir() {
        let c = crate::container::Container::open(store_root, &s)?;
        let mp = container_mountpoint(&c).with_context(|| format!("container '{s}' is not mounted"))?;
        if let Err(m) = c.mounted() {
            eprintln!("strata: {m}; cleaning up");
        }
        umount(&mp, a.lazy)?;
        c.drop_fresh_dirs();
        return Ok(());
    }
    umount(&a.mountpoint, a.lazy)
}
