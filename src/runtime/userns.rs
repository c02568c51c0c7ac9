//! Rootless with subordinate IDs, as podman does: a command that touches files of several
//! owners (run, build, commit, unpacking layers...) re-executes itself as root of a user
//! namespace that maps the user to 0 and the user's `/etc/subuid` and `/etc/subgid` ranges
//! to 1.., set up by the setuid `newuidmap`/`newgidmap` (package uidmap). Inside, strata is
//! root there: it mounts its FUSE filesystem itself (in a mount namespace of its own, so
//! the mount is seen only by this command and its container), chowns to any mapped ID, and
//! the container shares the namespace. Files owned by container user 1000 are owned by the
//! range's start + 999 on the host, as with podman.
//!
//! Without ranges or without newuidmap, strata keeps the single mapping (the user is root
//! and no other owner exists) and says so once (a marker in the store).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::sys::{self, Forked};

/// Set in the re-executed command: it is already inside.
const INSIDE: &str = "_STRATA_USERNS";

/// The first range of `name` (or of `uid`) in a subordinate-ID file.
pub fn subid_range(file: &Path, name: &str, uid: u32) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let who = f.next()?;
        if who != name && who != uid.to_string() {
            return None;
        }
        let start = f.next()?.parse().ok()?;
        let count: u32 = f.next()?.parse().ok()?;
        (count > 0).then_some((start, count))
    })
}

fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
    })
}

fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// For an unprivileged user with subordinate ranges: run this command again inside the user
/// namespace and return its exit code. None: go on here (root, already inside, or no
/// ranges, after saying so once).
pub fn reexec_inside(args: &[OsString], store: &Path) -> Result<Option<i32>> {
    if sys::euid() == 0 || std::env::var_os(INSIDE).is_some() {
        return Ok(None);
    }
    let (uid, gid) = (sys::euid(), sys::egid());
    let name = user_name(uid).unwrap_or_else(|| uid.to_string());
    let ranges = (
        subid_range(Path::new("/etc/subuid"), &name, uid),
        subid_range(Path::new("/etc/subgid"), &name, uid),
    );
    let tools = (find_tool("newuidmap"), find_tool("newgidmap"));
    let ((Some(ur), Some(gr)), (Some(nu), Some(ng))) = (ranges, tools) else {
        let marker = store.join(".single-id-notice");
        if !marker.exists() {
            eprintln!(
                "strata: no /etc/subuid and /etc/subgid ranges for '{name}' (or no newuidmap): \
                 rootless containers have one user, root, and chown to others fails"
            );
            let _ = std::fs::create_dir_all(store);
            let _ = std::fs::write(&marker, "");
        }
        return Ok(None);
    };
    let (ready_r, ready_w) = sys::pipe_cloexec()?;
    let (go_r, go_w) = sys::pipe_cloexec()?;
    let exe = std::fs::read_link("/proc/self/exe").context("finding strata's own executable")?;
    match sys::fork().context("fork")? {
        Forked::Child => {
            drop((ready_r, go_w));
            let code = (|| -> Result<i32> {
                // The caller's death takes this command with it, as a signal it can clean up on
                // (a run passes it to its container and unmounts).
                let _ = sys::signal_with_parent(libc::SIGTERM);
                sys::unshare(sys::Namespaces::CLONE_NEWUSER | sys::Namespaces::CLONE_NEWNS)
                    .context("creating a user namespace")?;
                std::fs::File::from(ready_w).write_all(b"1")?;
                let mut b = [0u8; 1];
                if std::fs::File::from(go_r).read(&mut b)? != 1 {
                    return Err(
                        super::RuntimeError::UserNamespace("the ID mapping was not set up".into()).into(),
                    );
                }
                // Mounts made in here stay in here.
                sys::make_mounts_private().context("making mounts private")?;
                let err = sys::exec_self(&exe, args, &[(INSIDE, "1")]);
                bail!("re-executing {}: {err}", exe.display())
            })();
            match code {
                Ok(c) => std::process::exit(c),
                Err(e) => {
                    eprintln!("strata: error: {e:#}");
                    std::process::exit(crate::runtime::EXIT_RUNTIME)
                }
            }
        }
        Forked::Parent(child) => {
            drop((ready_w, go_r));
            let mut b = [0u8; 1];
            if std::fs::File::from(ready_r).read(&mut b)? != 1 {
                return Ok(Some(wait(child)));
            }
            let map = |tool: &Path, id: u32, (start, count): (u32, u32)| -> Result<()> {
                let out = Command::new(tool)
                    .arg(child.to_string())
                    .args([
                        "0",
                        &id.to_string(),
                        "1",
                        "1",
                        &start.to_string(),
                        &count.to_string(),
                    ])
                    .output()
                    .with_context(|| format!("running {}", tool.display()))?;
                if !out.status.success() {
                    bail!(
                        "{} failed: {}",
                        tool.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Ok(())
            };
            if let Err(e) = map(&nu, uid, ur).and_then(|()| map(&ng, gid, gr)) {
                let _ = sys::kill(child, libc::SIGKILL);
                wait(child);
                return Err(e);
            }
            std::fs::File::from(go_w).write_all(b"1")?;
            Ok(Some(wait(child)))
        }
    }
}

/// Wait for the inner command, passing on the signals this process gets (but SIGINT, which
/// the terminal sends the inner one as well).
fn wait(child: i32) -> i32 {
    sys::catch_signals(&[
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ]);
    sys::ignore_signal(libc::SIGINT);
    sys::set_forward_pid(child);
    let code = loop {
        match sys::wait_child(child) {
            Ok((_, Some(x))) => break x.code(),
            Ok((_, None)) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => break crate::runtime::EXIT_RUNTIME,
        }
    };
    sys::set_forward_pid(0);
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("subuid");
        std::fs::write(&f, "alice:100000:65536\n1001:200000:1000\nbob:300000:0\n").unwrap();
        assert_eq!(subid_range(&f, "alice", 1000), Some((100000, 65536)));
        assert_eq!(subid_range(&f, "carol", 1001), Some((200000, 1000)));
        assert_eq!(subid_range(&f, "bob", 1002), None);
        assert_eq!(subid_range(&f, "dave", 1003), None);
    }
}
