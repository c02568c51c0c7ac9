//! Creating objects: mknod, mkdir, symlink, create, link.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::file::open_flags;
use super::*;
use crate::sys::{self, XTarget};

impl Overlay {
    /// Owner and mode of a new object: the caller owns it; a setgid parent gives its group.
    pub(crate) fn own(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        who: Caller,
        parent_st: &rustix::fs::Stat,
        mode: Option<u32>,
    ) -> Result<()> {
        let setgid_parent = parent_st.st_mode & libc::S_ISGID != 0;
        let gid = if setgid_parent { parent_st.st_gid } else { who.gid };
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(who.uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if let Some(m) = mode {
            // chown clears setuid/setgid, and a directory in a setgid directory inherits it.
            let m = if setgid_parent && FileType::from_raw_mode(m) == FileType::Directory {
                m | libc::S_ISGID
            } else {
                m
            };
            if m & 0o7000 != 0 {
                rustix::fs::chmodat(dir, name, Mode::from_raw_mode(m & 0o7777), AtFlags::empty())?;
            }
        }
        Ok(())
    }

    /// Owner of an object just created directly in its upper directory: the caller, with
    /// the group a setgid parent gave it. Returns whether anything changed.
    pub(crate) fn own_new(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        who: Caller,
        st: &rustix::fs::Stat,
        kind: Kind,
        mode: u32,
    ) -> Result<bool> {
        // A group other than ours and the caller's came from a setgid parent: keep it.
        let gid = if st.st_gid != who.gid && st.st_gid != sys::egid() {
            st.st_gid
        } else {
            who.gid
        };
        if st.st_uid == who.uid && st.st_gid == gid {
            return Ok(false);
        }
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(who.uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if kind != Kind::Symlink && mode & 0o7000 != 0 {
            // chown cleared setuid/setgid: put them back.
            let keep = if kind == Kind::Dir {
                st.st_mode & libc::S_ISGID
            } else {
                0
            };
            rustix::fs::chmodat(
                dir,
                name,
                Mode::from_raw_mode((mode & 0o7777) | keep),
                AtFlags::empty(),
            )?;
        }
        Ok(true)
    }

    /// Enter an object we just created in the upper into the table, without re-reading it.
    /// The caller holds `ns_lock` for reading from making it (see `create_with`).
    pub(crate) fn remember_new(&self, parent: u64, name: &OsStr, st: rustix::fs::Stat) -> Attr {
        let ino = self.map_ino(st.st_dev, st.st_ino);
        self.origins.write().unwrap().insert((st.st_dev, st.st_ino), ino);
        self.remember(parent, name, Found::upper_only(st, ino), true)
    }

    /// For making an object in `parent`: the caller as stored in the layer (ID mapping),
    /// and the parent's fds once it is copied up.
    fn upper_parent(&self, parent: u64, who: Caller) -> Result<(Caller, Arc<DirFds>)> {
        let who = Caller {
            uid: self.ids.stored_uid(who.uid),
            gid: self.ids.stored_gid(who.gid),
        };
        self.copy_up(parent)?;
        Ok((who, self.dir_fds(parent)?))
    }

    /// Create a new object `name` in `parent` with `make(dir, name)`, replacing an upper
    /// whiteout atomically, and making a new directory opaque where lower content exists.
    pub(crate) fn create_with(
        &self,
        parent: u64,
        name: &OsStr,
        who: Caller,
        kind: Kind,
        mode: u32,
        make: impl Fn(BorrowedFd<'_>, &OsStr) -> Result<Option<OwnedFd>>,
    ) -> Result<(Attr, Option<OwnedFd>)> {
        let _changed = self.changing(parent);
        self.upper()?;
        if name.as_bytes().contains(&b'/') || whiteout::is_aufs_marker(name) {
            // `.wh.` names are whiteouts in every layer (and cannot go into an OCI layer):
            // refused as fuse-overlayfs refuses them.
            return Err(Errno::INVAL);
        }
        let (who, pfds) = self.upper_parent(parent, who)?;
        let ufd = pfds.upper().ok_or(Errno::IO)?;
        let opaque = kind == Kind::Dir && self.lower_positive(parent, name)?;
        // From making the object to recording it, under the read lock: a rename over the
        // new name (write lock) comes wholly after, so the attributes answered are the new
        // object's and its recorded name is right. (A MKDIR answered with a symlink a
        // rename had just put there made the kernel fail the mkdir with EIO; an unlink
        // that freed the number has marked its node an orphan by then, see `remember`.)
        let _ns = self.ns_lock.read().unwrap();
        if !opaque {
            // Common case: create in place; only a name already taken needs a closer look.
            match make(ufd, name) {
                Ok(fd) => {
                    let stat = |fd: &Option<OwnedFd>| match fd {
                        Some(f) => rustix::fs::fstat(f),
                        None => sys::stat_at(ufd, name),
                    };
                    let done = stat(&fd).and_then(|st| {
                        let changed = self.own_new(ufd, name, who, &st, kind, mode)?;
                        if changed {
                            stat(&fd)
                        } else {
                            Ok(st)
                        }
                    });
                    return match done {
                        Ok(st) => Ok((self.remember_new(parent, name, st), fd)),
                        Err(e) => {
                            drop(fd);
                            let _ = layers::remove_tree_at(ufd, name);
                            Err(e)
                        }
                    };
                }
                Err(Errno::EXIST) => {}
                Err(e) => return Err(e),
            }
        }
        let over_whiteout = match sys::stat_at(ufd, name) {
            Ok(st) if whiteout::is_whiteout(&st) => true,
            Ok(_) => return Err(Errno::EXIST),
            Err(Errno::NOENT) => false,
            Err(e) => return Err(e),
        };
        let opaque = opaque || (kind == Kind::Dir && over_whiteout);
        let pst = rustix::fs::fstat(ufd)?;
        // Build it in the work dir, then move it into place in one step.
        let mut st = self.stage()?;
        let (work, tmp) = (st.dir(), st.name().to_owned());
        let fd = make(work, &tmp)?;
        if opaque {
            let d = sys::open_dir_beneath(work, &tmp)?;
            whiteout::set_opaque(XTarget::Fd(d.as_fd()), self.ns)?;
        }
        self.own(work, &tmp, who, &pst, Some(mode))?;
        match (over_whiteout, kind == Kind::Dir) {
            // A directory cannot replace a whiteout by rename: swap, then drop the whiteout.
            (true, true) => {
                st.place(ufd, name, RenameFlags::EXCHANGE)?;
                st.discard()?;
            }
            (true, false) => st.place(ufd, name, RenameFlags::empty())?,
            (false, _) => st.place(ufd, name, RenameFlags::NOREPLACE)?,
        }
        // As on the direct path, its inode number may be a deleted object's (see `remember`).
        let found = self.resolve(parent, name)?;
        Ok((self.remember(parent, name, found, true), fd))
    }

    /// mknod: regular files, FIFOs, sockets and device nodes.
    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u64, who: Caller) -> Result<Attr> {
        let ft = FileType::from_raw_mode(mode);
        let kind = Kind::from_mode(mode);
        // A character device 0:0 is a whiteout: made through the mount it would hide the
        // name (and a lower object of that name). overlayfs refuses it the same way.
        if kind == Kind::Char && rdev == 0 {
            return Err(Errno::PERM);
        }
        let perm = Mode::from_raw_mode(mode & 0o7777);
        self.create_with(parent, name, who, kind, mode, |d, n| {
            rustix::fs::mknodat(d, n, ft, perm, rdev)?;
            Ok(None)
        })
        .map(|r| r.0)
    }

    /// mkdir.
    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, who: Caller) -> Result<Attr> {
        let perm = Mode::from_raw_mode(mode & 0o7777);
        self.create_with(parent, name, who, Kind::Dir, mode | libc::S_IFDIR, |d, n| {
            rustix::fs::mkdirat(d, n, perm)?;
            Ok(None)
        })
        .map(|r| r.0)
    }

    /// symlink.
    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, who: Caller) -> Result<Attr> {
        self.create_with(parent, name, who, Kind::Symlink, libc::S_IFLNK | 0o777, |d, n| {
            rustix::fs::symlinkat(target, d, n)?;
            Ok(None)
        })
        .map(|r| r.0)
    }

    /// create + open.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        who: Caller,
    ) -> Result<(Attr, u64)> {
        let oflags = open_flags(flags) | OFlags::CREATE | OFlags::EXCL;
        let perm = Mode::from_raw_mode(mode & 0o7777);
        let (attr, fd) = self.create_with(parent, name, who, Kind::File, mode | libc::S_IFREG, |d, n| {
            Ok(Some(sys::open_beneath(d, n, oflags, perm)?))
        })?;
        let fd = fd.ok_or(Errno::IO)?;
        self.note_fresh_xattrs(attr.ino, fd.as_fd());
        Ok((attr, self.add_file(attr.ino, fd, true)))
    }

    /// An unnamed file in `parent` (O_TMPFILE), open with `flags`: made in the upper
    /// directory as overlayfs makes it, owned by the caller (or the group of a setgid
    /// parent). Until a `link` names it, it is a node without a name, like an unlinked
    /// file that is still open.
    pub fn tmpfile(&self, parent: u64, mode: u32, flags: i32, who: Caller) -> Result<(Attr, u64)> {
        let _changed = self.changing(parent);
        self.upper()?;
        let (who, pfds) = self.upper_parent(parent, who)?;
        let ufd = pfds.upper().ok_or(Errno::IO)?;
        let fd = sys::open_tmpfile(ufd, open_flags(flags), Mode::from_raw_mode(mode & 0o7777))?;
        let pst = rustix::fs::fstat(ufd)?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            who.gid
        };
        let mut st = rustix::fs::fstat(&fd)?;
        if st.st_uid != who.uid || st.st_gid != gid {
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(who.uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )?;
            if mode & 0o7000 != 0 {
                // chown cleared setuid/setgid: put them back.
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))?;
            }
            st = rustix::fs::fstat(&fd)?;
        }
        // Its number is its own: drop any cached one an earlier object of the same real
        // inode left (nothing is left behind if it is never named).
        let ino = self.map_ino(st.st_dev, st.st_ino);
        self.origins.write().unwrap().remove(&(st.st_dev, st.st_ino));
        let attr = {
            let _ns = self.ns_lock.read().unwrap();
            self.remember(parent, OsStr::new(""), Found::upper_only(st, ino), true)
        };
        // No name: what acts by name fails (ESTALE) and the rest goes through the handle.
        self.forget_name(ino, parent, OsStr::new(""));
        Ok((attr, self.add_file(ino, fd, true)))
    }

    /// link: a new name for an existing object.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        let _changed = self.changing(newparent);
        self.upper()?;
        if whiteout::is_aufs_marker(newname) {
            return Err(Errno::INVAL);
        }
        if self.with_node(ino, |n| n.kind)? == Kind::Dir {
            return Err(Errno::PERM);
        }
        self.copy_up(ino)?;
        self.copy_up(newparent)?;
        // A node without a name (an O_TMPFILE file; for an unlinked one the filesystem
        // answers ENOENT) is linked from the file an open handle holds. By name, under the
        // read lock (see `getattr`) until the new name is recorded: never a link to an
        // object a rename put in this one's place, nor an answer with another object's
        // attributes (the kernel fails a LINK answered with another type with EIO).
        let _ns = self.ns_lock.read().unwrap();
        let (loc, held) = match self.loc(ino) {
            Ok(loc) => (Some(loc), None),
            Err(Errno::STALE) => (None, Some(self.any_open_fd(ino).ok_or(Errno::STALE)?)),
            Err(e) => return Err(e),
        };
        let link_to = |dir: BorrowedFd<'_>, name: &OsStr| -> Result<()> {
            match (&loc, &held) {
                (Some(loc), _) => {
                    let src = loc.pfds.upper().ok_or(Errno::IO)?;
                    Ok(rustix::fs::linkat(src, &loc.name, dir, name, AtFlags::empty())?)
                }
                (None, Some(fd)) => Ok(sys::link_open_file(fd.as_fd(), dir, name)?),
                (None, None) => Err(Errno::STALE),
            }
        };
        let npfds = self.dir_fds(newparent)?;
        let nfd = npfds.upper().ok_or(Errno::IO)?;
        match sys::stat_at(nfd, newname) {
            Ok(st) if whiteout::is_whiteout(&st) => {
                let mut s = self.stage()?;
                link_to(s.dir(), s.name())?;
                s.place(nfd, newname, RenameFlags::empty())?;
            }
            Ok(_) => return Err(Errno::EXIST),
            Err(Errno::NOENT) => link_to(nfd, newname)?,
            Err(e) => return Err(e),
        }
        // A copied-up object keeps its lower inode number (its origin). A pure-upper
        // directory is listed with the upper numbers unless it is marked impure, as the
        // kernel marks it when such an object is linked in (rename does the same).
        if newparent != ROOT
            && self
                .with_node(newparent, |n| n.lower_dirs.is_empty())
                .unwrap_or(false)
            && sys::getxattr(XTarget::At(nfd, newname), &self.ns.name("origin")).is_ok()
        {
            let _ = sys::setxattr(XTarget::Fd(nfd), &self.ns.name("impure"), b"y", 0);
        }
        let found = self.resolve(newparent, newname)?;
        Ok(self.remember(newparent, newname, found, true))
    }
}
