//! Inside the new mount namespace: /proc, a minimal /dev, read-only /sys, injected files,
//! volumes, then pivot_root into the merged tree.
//!
//! Every mount target is resolved inside the rootfs with openat2(RESOLVE_IN_ROOT) and the
//! mount is made on `/proc/self/fd/N`, so an image whose `/proc` or `/etc/hosts` is a
//! symlink to a host path cannot redirect a mount outside its root.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use super::{RunSpec, Volume};

/// What to create at a mount target that does not exist yet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stub {
    Dir,
    File,
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// An O_PATH fd of `path` (cleaned) resolved inside the rootfs as the container sees it.
fn open_in_root(root: BorrowedFd<'_>, path: &Path) -> rustix::io::Result<OwnedFd> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    crate::sys::open_in_root(root, path, OFlags::PATH, Mode::empty())
}

/// A target path given for the container (`-v`, `--tmpfs`, a runtime file), relative to its
/// root by the one rule of `paths`.
fn in_root(path: &Path) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let c = crate::paths::components(path.as_os_str().as_bytes())
        .map_err(|e| anyhow::anyhow!("'{}': {e}", path.display()))?;
    Ok(PathBuf::from(crate::paths::join(&c)))
}

/// Resolve (creating if missing) a mount target inside the rootfs. Returns an O_PATH fd of
/// it and the paths it had to create (stubs to remove after the run).
fn target(root: BorrowedFd<'_>, path: &Path, stub: Stub) -> Result<(OwnedFd, Vec<PathBuf>)> {
    let rel = in_root(path)?;
    if let Ok(fd) = open_in_root(root, &rel) {
        return Ok((fd, vec![]));
    }
    let mut made = Vec::new();
    // Create the parents (inside the root) and the stub.
    let mut cur = PathBuf::new();
    let comps: Vec<_> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        if open_in_root(root, &cur).is_ok() {
            continue;
        }
        let parent = open_in_root(root, cur.parent().unwrap_or(Path::new("")))
            .with_context(|| format!("resolving '{}' in the container", cur.display()))?;
        let name = c.as_os_str();
        let last = i + 1 == comps.len();
        let dir = rustix::fs::openat(
            &parent,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| {
            format!(
                "'{}' in the container is not a directory",
                cur.parent().unwrap().display()
            )
        })?;
        if last && stub == Stub::File {
            // Created through RESOLVE_IN_ROOT: a dangling symlink the image put there is
            // followed inside the root, never to a host path (we have not pivoted yet).
            crate::sys::open_in_root(
                root,
                &cur,
                OFlags::CREATE | OFlags::WRONLY,
                Mode::from_raw_mode(0o644),
            )
            .with_context(|| format!("creating '{}' in the container", cur.display()))?;
        } else {
            rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755))
                .with_context(|| format!("creating '{}' in the container", cur.display()))?;
        }
        made.push(Path::new("/").join(&cur));
    }
    Ok((open_in_root(root, &rel)?, made))
}

fn mount_at(
    src: Option<&str>,
    dst: &OwnedFd,
    fstype: Option<&str>,
    flags: MountFlags,
    data: Option<&str>,
    what: &str,
) -> Result<()> {
    let data = data.map(|d| std::ffi::CString::new(d).expect("no NUL"));
    rustix::mount::mount(
        src.unwrap_or("none"),
        fd_path(dst),
        fstype.unwrap_or(""),
        flags,
        data.as_deref(),
    )
    .with_context(|| format!("mounting {what}"))
}

fn bind(src: &Path, dst: &OwnedFd, what: &str) -> Result<()> {
    rustix::mount::mount_bind_recursive(src, fd_path(dst)).with_context(|| format!("bind-mounting {what}"))
}

/// Make the bind mount now at `path` read-only. `path` is resolved again: an fd taken
/// before the mount names the directory underneath it.
fn remount_ro(root: BorrowedFd<'_>, path: &Path, what: &str) -> Result<()> {
    let rel = in_root(path)?;
    let fd = open_in_root(root, &rel).with_context(|| format!("resolving {what}"))?;
    remount_ro_path(&fd_path(&fd)).with_context(|| format!("making {what} read-only"))?;
    // And every mount below it (a bind is recursive; the remount above is not).
    let fd = open_in_root(root, &rel).with_context(|| format!("resolving {what}"))?;
    match crate::sys::readonly_recursive(fd.as_fd()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOSYS) => {
            log::warn!("{what}: this kernel has no mount_setattr; mounts inside it stay writable");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("making the mounts inside {what} read-only")),
    }
}

/// Keep a rootful container from reaching the host through /proc, as runc does: the
/// kernel tunables and triggers become read-only, files that leak host state are masked.
fn mask_proc(proc_: &Path) -> Result<()> {
    for d in ["sys", "sysrq-trigger", "irq", "bus"] {
        let p = proc_.join(d);
        if p.exists() {
            rustix::mount::mount_bind(&p, &p).with_context(|| format!("protecting /proc/{d}"))?;
            remount_ro_path(&p).with_context(|| format!("making /proc/{d} read-only"))?;
        }
    }
    for f in [
        "kcore",
        "keys",
        "timer_list",
        "sched_debug",
        "latency_stats",
        "kallsyms",
    ] {
        let p = proc_.join(f);
        if p.is_file() {
            rustix::mount::mount_bind("/dev/null", &p).with_context(|| format!("masking /proc/{f}"))?;
        }
    }
    for d in ["acpi", "scsi"] {
        let p = proc_.join(d);
        if p.is_dir() {
            rustix::mount::mount("tmpfs", &p, "tmpfs", MountFlags::RDONLY, None)
                .with_context(|| format!("masking /proc/{d}"))?;
        }
    }
    Ok(())
}

/// Remount the bind mount at `p` read-only, keeping the flags it has (a user namespace
/// may not clear locked nosuid/nodev/noexec).
fn remount_ro_path(p: &Path) -> rustix::io::Result<()> {
    let mut flags = MountFlags::BIND | MountFlags::RDONLY;
    if let Ok(sv) = rustix::fs::statvfs(p) {
        use rustix::fs::StatVfsMountFlags as F;
        for (have, f) in [
            (F::NOSUID, MountFlags::NOSUID),
            (F::NODEV, MountFlags::NODEV),
            (F::NOEXEC, MountFlags::NOEXEC),
            (F::NOATIME, MountFlags::NOATIME),
            (F::NODIRATIME, MountFlags::NODIRATIME),
            (F::RELATIME, MountFlags::RELATIME),
        ] {
            if sv.f_flag.contains(have) {
                flags |= f;
            }
        }
    }
    rustix::mount::mount_remount(p, flags, "")
}

/// Set up the container's filesystem and pivot into it. Mount targets that had to be
/// created are listed in `rundir/stubs`, to be removed after the run so they never reach
/// a commit.
pub fn setup(spec: &RunSpec) -> Result<()> {
    rustix::mount::mount_change("/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)
        .context("making mounts private")?;
    // A mount of our own namespace as the new root: pivot_root refuses one that was copied
    // from a more privileged namespace (the rootless case).
    rustix::mount::mount_bind_recursive(&spec.rootfs, &spec.rootfs).context("bind-mounting the rootfs")?;
    let root = rustix::fs::open(
        &spec.rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("rootfs '{}'", spec.rootfs.display()))?;
    let r = root.as_fd();
    let mut stubs = Vec::new();
    let mut t = |p: &str, s: Stub| -> Result<OwnedFd> {
        let (fd, made) = target(r, Path::new(p), s)?;
        stubs.extend(made);
        Ok(fd)
    };
    let nosuid = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount_at(
        Some("proc"),
        &t("/proc", Stub::Dir)?,
        Some("proc"),
        nosuid,
        None,
        "/proc",
    )?;
    // The fresh proc (resolved again: the old fd names the directory underneath) holds no
    // image content, so paths inside it are the kernel's.
    mask_proc(&fd_path(&t("/proc", Stub::Dir)?))?;
    let dev = t("/dev", Stub::Dir)?;
    // nodev: a device node a container makes (it keeps CAP_MKNOD, as in docker) or an image
    // ships cannot be opened; the bind-mounted null, zero... are mounts of their own.
    mount_at(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        nosuid,
        Some("mode=755,size=65536k"),
        "/dev",
    )?;
    // The fd still names the directory under the new mount: resolve again to get the
    // tmpfs. Inside it nothing can be a symlink yet, so plain paths are safe.
    let dev = t("/dev", Stub::Dir)?;
    let devp = fd_path(&dev);
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        let p = devp.join(d);
        std::fs::File::create(&p).with_context(|| format!("/dev/{d}"))?;
        rustix::mount::mount_bind(Path::new("/dev").join(d), &p)
            .with_context(|| format!("bind-mounting /dev/{d}"))?;
    }
    std::fs::create_dir(devp.join("pts"))?;
    rustix::mount::mount(
        "devpts",
        devp.join("pts"),
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        Some(c"newinstance,ptmxmode=0666,mode=0620"),
    )
    .context("mounting /dev/pts")?;
    std::os::unix::fs::symlink("pts/ptmx", devp.join("ptmx"))?;
    std::fs::create_dir(devp.join("shm"))?;
    rustix::mount::mount(
        "shm",
        devp.join("shm"),
        "tmpfs",
        nosuid,
        Some(c"mode=1777,size=65536k"),
    )
    .context("mounting /dev/shm")?;
    for (l, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, devp.join(l))?;
    }
    let sys = t("/sys", Stub::Dir)?;
    if mount_at(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        nosuid | MountFlags::RDONLY,
        None,
        "/sys",
    )
    .is_err()
    {
        // Without a network namespace of our own (or in a user namespace) sysfs cannot be
        // mounted fresh: show the host's, read-only.
        bind(Path::new("/sys"), &sys, "/sys")?;
        remount_ro(r, Path::new("/sys"), "/sys")?;
    }
    for (name, path) in [
        ("hosts", "/etc/hosts"),
        ("hostname", "/etc/hostname"),
        ("resolv.conf", "/etc/resolv.conf"),
    ] {
        let dst = t(path, Stub::File)?;
        bind(&spec.rundir.join(name), &dst, path)?;
    }
    for v in &spec.volumes {
        add_volume(v, &mut t)?;
        if v.ro {
            remount_ro(r, &v.container, &format!("volume '{}'", v.host.display()))?;
        }
    }
    // The caller removes these after the run, from outside.
    let list: String = stubs.iter().map(|p| format!("{}\n", p.display())).collect();
    std::fs::write(spec.rundir.join("stubs"), list).context("recording mount stubs")?;
    if spec.read_only {
        // Only the root's own mount: /dev, /proc, volumes and the /etc stubs stay as they are.
        remount_ro_path(&spec.rootfs).context("making the root read-only")?;
    }
    rustix::process::chdir(&spec.rootfs).context("entering the rootfs")?;
    rustix::process::pivot_root(".", ".").context("pivot_root")?;
    rustix::mount::unmount(".", UnmountFlags::DETACH).context("detaching the old root")?;
    rustix::process::chdir("/")?;
    Ok(())
}

fn add_volume(v: &Volume, t: &mut dyn FnMut(&str, Stub) -> Result<OwnedFd>) -> Result<()> {
    let md = std::fs::metadata(&v.host).with_context(|| format!("volume source '{}'", v.host.display()))?;
    if !v.container.is_absolute() {
        return Err(super::RuntimeError::NotAbsolute {
            what: "volume target",
            path: v.container.display().to_string(),
        }
        .into());
    }
    let stub = if md.is_dir() { Stub::Dir } else { Stub::File };
    let ctr = v.container.to_string_lossy().into_owned();
    let dst = t(&ctr, stub)?;
    bind(&v.host, &dst, &format!("volume '{}'", v.host.display()))
}

/// Write the files the runtime injects (bind-mounted, never part of the rootfs).
pub fn write_injected(rundir: &Path, hostname: &str, host_network: bool) -> Result<()> {
    std::fs::create_dir_all(rundir)?;
    std::fs::write(rundir.join("hostname"), format!("{hostname}\n"))?;
    std::fs::write(
        rundir.join("hosts"),
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
    )?;
    let resolv = if host_network {
        std::fs::read("/etc/resolv.conf").unwrap_or_default()
    } else {
        b"# no network (strata run --network none)\n".to_vec()
    };
    std::fs::write(rundir.join("resolv.conf"), resolv)?;
    Ok(())
}

/// Remove stubs created for mount targets, deepest first, if they are still empty. Walks
/// with RESOLVE_BENEATH|NO_SYMLINKS: the container may have replaced a directory on the way
/// with a symlink to a host path.
pub fn remove_stubs(rootfs: &Path, stubs: &[PathBuf]) {
    let Ok(root) = rustix::fs::open(
        rootfs,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let mut s: Vec<&PathBuf> = stubs.iter().collect();
    s.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in s {
        if !remove_empty_beneath(root.as_fd(), p) {
            log::debug!("stub {} kept", p.display());
        }
    }
}

/// Remove `path` (relative to `root`; `..` and symlinks refused) if it is an empty directory
/// or an empty regular file. Returns whether it went.
pub fn remove_empty_beneath(root: BorrowedFd<'_>, path: &Path) -> bool {
    let comps: Vec<_> = path
        .components()
        .filter(|c| !matches!(c, Component::RootDir))
        .collect();
    if comps.is_empty() || comps.iter().any(|c| !matches!(c, Component::Normal(_))) {
        return false;
    }
    let rel: PathBuf = comps.iter().collect();
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return false;
    };
    let Ok(pd) = crate::sys::open_dir_beneath(root, parent) else {
        return false;
    };
    match crate::sys::stat_at(pd.as_fd(), name) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
            rustix::fs::unlinkat(&pd, name, rustix::fs::AtFlags::REMOVEDIR).is_ok()
        }
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0 => {
            rustix::fs::unlinkat(&pd, name, rustix::fs::AtFlags::empty()).is_ok()
        }
        _ => false,
    }
}
