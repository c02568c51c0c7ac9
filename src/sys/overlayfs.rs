//! Mounting the kernel's overlayfs over strata's layers (`strata build --overlay kernel`):
//! the layers and uppers are in the kernel's format, so the kernel can serve them directly.

use std::path::Path;

use rustix::fs::CWD;
use rustix::io::Errno;
use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, FsMountFlags, FsOpenFlags,
    MountAttrFlags, MountFlags, MoveMountFlags,
};

/// Does this kernel have overlayfs (built in or loadable)?
pub fn available() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| s.lines().any(|l| l.ends_with("\toverlay")))
        || fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).is_ok()
}

/// Mount overlayfs at `mnt`: `lowers` top first, `rw` = (upper, work) or read-only. No
/// index, metacopy or redirects (what strata's commit reads, and what docker's overlay2
/// writes); `volatile` skips the sync of the upper at unmount.
pub fn mount(lowers: &[&Path], rw: Option<(&Path, &Path)>, mnt: &Path, volatile: bool) -> Result<(), Errno> {
    // overlayfs wants two lowers without an upper: one layer read-only is a bind mount.
    if let ([one], None) = (lowers, rw) {
        rustix::mount::mount_bind(*one, mnt)?;
        return rustix::mount::mount_remount(
            mnt,
            MountFlags::BIND | MountFlags::RDONLY | MountFlags::NODEV,
            "",
        )
        .inspect_err(|_| {
            let _ = unmount(mnt);
        });
    }
    // The new mount API takes one lower per `lowerdir+` (kernel 6.8+): no length limit and
    // no escaping. Older kernels get the one-string form.
    match mount_fsconfig(lowers, rw, mnt, volatile) {
        Err(Errno::INVAL) | Err(Errno::NOSYS) => mount_string(lowers, rw, mnt, volatile),
        r => r,
    }
}

fn options(volatile: bool, rw: bool) -> Vec<(&'static str, &'static str)> {
    let mut o = vec![("index", "off"), ("metacopy", "off"), ("redirect_dir", "off")];
    if volatile && rw {
        o.push(("volatile", ""));
    }
    o
}

fn mount_fsconfig(
    lowers: &[&Path],
    rw: Option<(&Path, &Path)>,
    mnt: &Path,
    volatile: bool,
) -> Result<(), Errno> {
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "source", "strata")?;
    for l in lowers {
        fsconfig_set_string(&fs, "lowerdir+", *l)?;
    }
    if let Some((u, w)) = rw {
        fsconfig_set_string(&fs, "upperdir", u)?;
        fsconfig_set_string(&fs, "workdir", w)?;
    }
    for (k, v) in options(volatile, rw.is_some()) {
        if v.is_empty() {
            rustix::mount::fsconfig_set_flag(&fs, k)?;
        } else {
            fsconfig_set_string(&fs, k, v)?;
        }
    }
    fsconfig_create(&fs)?;
    let attrs = if rw.is_none() {
        MountAttrFlags::MOUNT_ATTR_RDONLY
    } else {
        MountAttrFlags::empty()
    };
    let m = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        attrs | MountAttrFlags::MOUNT_ATTR_NODEV,
    )?;
    move_mount(&m, "", CWD, mnt, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
}

fn mount_string(
    lowers: &[&Path],
    rw: Option<(&Path, &Path)>,
    mnt: &Path,
    volatile: bool,
) -> Result<(), Errno> {
    let esc = |p: &Path| {
        p.display()
            .to_string()
            .replace('\\', "\\\\")
            .replace(':', "\\:")
            .replace(',', "\\,")
    };
    let mut data = format!(
        "lowerdir={}",
        lowers.iter().map(|l| esc(l)).collect::<Vec<_>>().join(":")
    );
    if let Some((u, w)) = rw {
        data.push_str(&format!(",upperdir={},workdir={}", esc(u), esc(w)));
    }
    for (k, v) in options(volatile, rw.is_some()) {
        data.push(',');
        data.push_str(k);
        if !v.is_empty() {
            data.push('=');
            data.push_str(v);
        }
    }
    // The kernel copies at most one page of options.
    if data.len() >= 4096 {
        return Err(Errno::TOOBIG);
    }
    let mut flags = MountFlags::NODEV;
    if rw.is_none() {
        flags |= MountFlags::RDONLY;
    }
    let c = std::ffi::CString::new(data).map_err(|_| Errno::INVAL)?;
    rustix::mount::mount("strata", mnt, "overlay", flags, Some(c.as_c_str()))
}

/// Unmount what `mount` mounted.
pub fn unmount(mnt: &Path) -> Result<(), Errno> {
    rustix::mount::unmount(mnt, rustix::mount::UnmountFlags::empty())
}
