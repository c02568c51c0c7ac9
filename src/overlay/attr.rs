//! Attributes: setattr (chmod, chown, truncate, utimens), access, statfs.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, Timestamps};
use rustix::io::Errno;

use super::*;
use crate::sys::{self};

impl Overlay {
    // ----- attributes ----------------------------------------------------------------

    /// The upper object of a node as (directory fd, name); the root is (its fd, ".").
    pub(crate) fn upper_at(&self, ino: u64) -> Result<(Arc<OwnedFd>, OsString)> {
        if ino == ROOT {
            let f = self.dir_fds(ROOT)?;
            return Ok((f.upper.clone().ok_or(Errno::ROFS)?, OsString::from(".")));
        }
        let (kind, parent, name, orphan) =
            self.with_node(ino, |n| (n.kind, n.parent, n.name.to_os_string(), n.orphan))?;
        if orphan {
            return Err(Errno::STALE);
        }
        if kind == Kind::Dir {
            let pf = self.dir_fds(parent)?;
            return Ok((pf.upper.clone().ok_or(Errno::IO)?, name));
        }
        let loc = self.loc(ino)?;
        Ok((loc.pfds.upper.clone().ok_or(Errno::IO)?, loc.name))
    }

    /// setattr: chmod, chown, truncate, utimens. Copies up first (a truncation copies only
    /// the bytes that survive it).
    pub fn setattr(&self, ino: u64, sa: &SetAttr) -> Result<Attr> {
        self.upper()?;
        // Owners as stored in the layers (ID mapping).
        let mapped;
        let sa = if self.ids.is_identity() {
            sa
        } else {
            mapped = SetAttr {
                uid: sa.uid.map(|u| self.ids.stored_uid(u)),
                gid: sa.gid.map(|g| self.ids.stored_gid(g)),
                ..*sa
            };
            &mapped
        };
        let (orphan, in_upper) = self.with_node(ino, |n| (n.orphan, n.upper))?;
        if orphan && !in_upper {
            // Unlinked while open for reading from a lower layer: nothing to copy up from a
            // name any more, and the lower file must never change. The kernel answers EEXIST.
            return Err(Errno::EXIST);
        }
        if orphan {
            // A removed upper directory or special file still held: its own inode changes,
            // as on overlayfs.
            if let Some(top) = self.gone_upper(ino) {
                if sa.size.is_some() {
                    // (the kernel refuses to truncate a directory or special file first)
                    return Err(Errno::INVAL);
                }
                let owner = (sa.uid.is_some() || sa.gid.is_some()).then_some((sa.uid, sa.gid));
                let times = (sa.atime.is_some() || sa.mtime.is_some()).then(|| Timestamps {
                    last_access: sa.atime_spec(),
                    last_modification: sa.mtime_spec(),
                });
                sys::setattr_by_fd_path(top.as_fd(), owner, sa.mode, times.as_ref())?;
                return self.gone_attr(ino).unwrap_or(Err(Errno::STALE));
            }
            // Unlinked but open: only the open file itself can be changed.
            let fd = sa
                .fh
                .and_then(|fh| self.file(fh).ok())
                .or_else(|| self.any_open_fd(ino))
                .ok_or(Errno::STALE)?;
            return self.setattr_fd(ino, &fd, sa);
        }
        let (kind, upper) = self.with_node(ino, |n| (n.kind, n.upper))?;
        if !upper {
            let only_size = sa.mode.is_none()
                && sa.uid.is_none()
                && sa.gid.is_none()
                && sa.atime.is_none()
                && sa.mtime.is_none();
            match (only_size, sa.size) {
                (true, Some(s)) if kind == Kind::File => self.copy_up_limited(ino, Some(s))?,
                _ => self.copy_up(ino)?,
            }
        }
        // No `xattrs_changed` here: chown and truncate can only drop security.capability
        // and chmod only rewrites an ACL that exists, so an object known to have no xattrs
        // keeps having none (a copy-up above clears that knowledge itself). tar's
        // utimens, chown and chmod of each file it writes then cost no xattr syscall for
        // the kernel's security.capability check before the chown.
        // By name, under the read lock (see `getattr`): a chmod must never reach an object
        // a rename put in this one's place meanwhile.
        let ns = self.ns_lock.read().unwrap();
        let (dfd, name) = self.upper_at(ino)?;
        let d = dfd.as_fd();
        if sa.uid.is_some() || sa.gid.is_some() {
            let r = rustix::fs::chownat(
                d,
                &name,
                sa.uid.map(rustix::fs::Uid::from_raw),
                sa.gid.map(rustix::fs::Gid::from_raw),
                AtFlags::SYMLINK_NOFOLLOW,
            );
            // Squashed, what shows does not change: fuse-overlayfs drops chown errors then.
            if !self.ids.squashing() {
                r?;
            }
        }
        if let Some(m) = sa.mode {
            if kind == Kind::Symlink {
                return Err(Errno::OPNOTSUPP);
            }
            rustix::fs::chmodat(d, &name, Mode::from_raw_mode(m & 0o7777), AtFlags::empty())?;
        }
        if let Some(s) = sa.size {
            if kind == Kind::Dir {
                return Err(Errno::ISDIR);
            }
            let via_fh = sa.fh.and_then(|fh| self.file(fh).ok());
            match via_fh.map(|fd| rustix::fs::ftruncate(&*fd, s)) {
                Some(Ok(())) => {}
                _ => {
                    let fd = sys::open_beneath(d, &name, OFlags::WRONLY | OFlags::NOFOLLOW, Mode::empty())?;
                    rustix::fs::ftruncate(&fd, s)?;
                }
            }
        }
        if sa.atime.is_some() || sa.mtime.is_some() {
            let times = Timestamps {
                last_access: sa.atime_spec(),
                last_modification: sa.mtime_spec(),
            };
            rustix::fs::utimensat(d, &name, &times, AtFlags::SYMLINK_NOFOLLOW)?;
        }
        drop(ns);
        self.getattr(ino, None)
    }

    pub(crate) fn setattr_fd(&self, ino: u64, fd: &OwnedFd, sa: &SetAttr) -> Result<Attr> {
        if sa.uid.is_some() || sa.gid.is_some() {
            rustix::fs::fchown(
                fd,
                sa.uid.map(rustix::fs::Uid::from_raw),
                sa.gid.map(rustix::fs::Gid::from_raw),
            )?;
        }
        if let Some(m) = sa.mode {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(m & 0o7777))?;
        }
        if let Some(s) = sa.size {
            rustix::fs::ftruncate(fd, s)?;
        }
        if sa.atime.is_some() || sa.mtime.is_some() {
            rustix::fs::futimens(
                fd,
                &Timestamps {
                    last_access: sa.atime_spec(),
                    last_modification: sa.mtime_spec(),
                },
            )?;
        }
        Ok(self.attr_of(&rustix::fs::fstat(fd)?, ino, false))
    }

    /// statfs of the upper (or the top lower when read-only), as the kernel reports it.
    pub fn statfs(&self) -> Result<StatFs> {
        let fd = match &self.upper {
            Some(u) => u.layer.fd.as_fd(),
            None => self.lowers[0].fd.as_fd(),
        };
        let s = rustix::fs::fstatvfs(fd)?;
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
        })
    }

    /// access(2) for callers when the kernel does not check permissions itself.
    pub fn access(&self, ino: u64, mask: i32, who: Caller) -> Result<()> {
        let a = self.getattr(ino, None)?;
        if mask & libc::W_OK != 0 && self.upper.is_none() {
            return Err(Errno::ROFS);
        }
        if mask == libc::F_OK {
            return Ok(());
        }
        let perm = a.perm as i32;
        if who.uid == 0 {
            if mask & libc::X_OK != 0 && a.kind != Kind::Dir && perm & 0o111 == 0 {
                return Err(Errno::ACCESS);
            }
            return Ok(());
        }
        let bits = if who.uid == a.uid {
            (perm >> 6) & 7
        } else if who.gid == a.gid {
            (perm >> 3) & 7
        } else {
            perm & 7
        };
        if bits & mask == mask {
            Ok(())
        } else {
            Err(Errno::ACCESS)
        }
    }
}
