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
/// writes); `volatile` skips the sync of the upper at unmount. `empty` is an empty directory
/// the caller owns: overlayfs wants two lowers without an upper, so a single read-only layer
/// gets it below (a bind mount would show the layer's raw whiteouts, and would be writable
/// until it is remounted).
pub fn mount(
    lowers: &[&Path],
    rw: Option<(&Path, &Path)>,
    mnt: &Path,
    volatile: bool,
    empty: &Path,
) -> Result<(), Errno> {
    // A layer may come twice (every unchanged build step is the same empty layer), which
    // the kernel refuses (ELOOP). The lower copy adds nothing the upper copy does not show.
    let mut ls: Vec<&Path> = Vec::new();
    for l in lowers {
        if !ls.contains(l) {
            ls.push(l);
        }
    }
    if ls.is_empty() {
        return Err(Errno::INVAL);
    }
    if ls.len() == 1 && rw.is_none() {
        ls.push(empty);
    }
    // overlayfs unescapes `\` in some of its path options and not in others: refuse it
    // rather than guess (strata's store paths have none).
    let mut all = ls.iter().copied().chain(rw.into_iter().flat_map(|(u, w)| [u, w]));
    if all.any(|p| p.as_os_str().as_encoded_bytes().contains(&b'\\')) {
        return Err(Errno::INVAL);
    }
    // The new mount API takes one lower per `lowerdir+` (kernel 6.8+): no length limit.
    // Older kernels refuse that key, and get the one-string form.
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    match fsconfig_set_string(&fs, "lowerdir+", ls[0]) {
        Err(Errno::INVAL) => return mount_string(&ls, rw, mnt, volatile),
        r => r?,
    }
    mount_fsconfig(fs, &ls[1..], rw, mnt, volatile)
}

fn options(volatile: bool, rw: bool) -> Vec<(&'static str, &'static str)> {
    let mut o = vec![("index", "off"), ("metacopy", "off"), ("redirect_dir", "off")];
    if volatile && rw {
        o.push(("volatile", ""));
    }
    o
}

/// The rest of the configuration of `fs`, whose first lower is set.
fn mount_fsconfig(
    fs: std::os::fd::OwnedFd,
    lowers: &[&Path],
    rw: Option<(&Path, &Path)>,
    mnt: &Path,
    volatile: bool,
) -> Result<(), Errno> {
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
