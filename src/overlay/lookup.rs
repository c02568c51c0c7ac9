//! Lookup: resolving a name across the layers, and the attributes of what was found.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::FileType;
use rustix::io::Errno;

use super::node::DirFds;
use super::*;
use crate::sys::{self, XTarget};

/// Longest name the layers' filesystems take (what a probe would answer ENAMETOOLONG to).
const NAME_MAX: usize = 255;

impl Overlay {
    // ----- lookup --------------------------------------------------------------------

    /// Resolve `name` in directory `parent` across the layers, without touching the table.
    /// The object's node id is its stand-in where it has one (see `remember`).
    pub(crate) fn resolve(&self, parent: u64, name: &OsStr) -> Result<Found> {
        let mut f = self.resolve_real(parent, name)?;
        f.ino = self.live_ino(f.ino);
        Ok(f)
    }

    /// `resolve`, with the object's own inode number.
    fn resolve_real(&self, parent: u64, name: &OsStr) -> Result<Found> {
        if name.as_bytes().contains(&b'/') || name.is_empty() {
            return Err(Errno::INVAL);
        }
        // AUFS markers are bookkeeping in every layer, never visible names (as in
        // fuse-overlayfs; the kernel shows one in an upper as a file).
        if whiteout::is_aufs_marker(name) {
            return Err(Errno::NOENT);
        }
        let lower_dirs = self.with_node(parent, |n| {
            if n.kind == Kind::Dir {
                Ok(n.lower_dirs.clone())
            } else {
                Err(Errno::NOTDIR)
            }
        })??;
        let pfds = self.dir_fds(parent)?;
        let mut found: Option<Found> = None;
        if let Some(ufd) = pfds.upper() {
            match sys::stat_at(ufd, name) {
                Ok(st) if whiteout::is_whiteout(&st) => return Err(Errno::NOENT),
                Ok(st)
                    if FileType::from_raw_mode(st.st_mode) != FileType::Directory
                        && self.origins.read().unwrap().contains_key(&(st.st_dev, st.st_ino)) =>
                {
                    // Checked before (or made by us): its number is known, its xattrs too.
                    // One lookup under one lock: an unlink may drop the entry meanwhile.
                    let cached = self.origins.read().unwrap().get(&(st.st_dev, st.st_ino)).copied();
                    let ino = cached.unwrap_or_else(|| self.map_ino(st.st_dev, st.st_ino));
                    return Ok(Found::upper_only(st, ino));
                }
                Ok(st) => {
                    let t = XTarget::At(ufd, name);
                    let xnames = sys::listxattr(t).unwrap_or_default();
                    self.check_supported(&xnames, name)?;
                    let ino = self
                        .origin_ino(t, &xnames, st.st_dev, st.st_ino)
                        .unwrap_or_else(|| self.map_ino(st.st_dev, st.st_ino));
                    let kind = Kind::from_mode(st.st_mode);
                    if kind != Kind::Dir {
                        return Ok(Found::upper_only(st, ino));
                    }
                    let ufd_child = sys::open_dir_beneath(ufd, name)?;
                    let xattr_opaque = whiteout::upper_is_opaque_in(t, &xnames, self.ns);
                    let mut redirect = match xattr_opaque {
                        true => None,
                        false => whiteout::upper_redirect(t, &xnames, self.ns)?,
                    };
                    // An upper written by fuse-overlayfs may mark it with the file alone. Only
                    // asked where something below could merge in (a pure-upper directory's
                    // lookup costs no extra syscall).
                    let opaque = xattr_opaque
                        || ((!lower_dirs.is_empty() || redirect.is_some())
                            && self.upper_wh_files()
                            && whiteout::has_opaque_marker(ufd_child.as_fd()));
                    if opaque {
                        redirect = None;
                    }
                    let mut f = Found {
                        kind,
                        upper: true,
                        lower: None,
                        lower_dirs: vec![],
                        st,
                        ino,
                        fds: Some(DirFds {
                            upper: Some(Arc::new(ufd_child)),
                            lowers: vec![],
                        }),
                        redirected: false,
                    };
                    if opaque {
                        return Ok(f);
                    }
                    if let Some(r) = redirect {
                        self.follow_redirect(&pfds, &lower_dirs, None, &r, &mut f)?;
                        return Ok(f);
                    }
                    found = Some(f);
                }
                // fuse-overlayfs writes `.wh.NAME` files where it cannot make a whiteout
                // device; one in the upper hides the name below as a whiteout does. (An
                // upper that held none at mount never gets one: not looked for then.)
                Err(Errno::NOENT)
                    if !lower_dirs.is_empty()
                        && self.upper_wh_files()
                        && sys::stat_at(ufd, &whiteout::aufs_name(name)).is_ok() =>
                {
                    return Err(Errno::NOENT);
                }
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
        }
        if !lower_dirs.is_empty() {
            // With an index only the layers that hold the name are probed.
            // With an index only the layers holding the name are probed, and where it is
            // known to be a directory below the one found, without a stat.
            let probe: Vec<(u16, bool)> = match self.index_for_lookup(parent, &pfds, &lower_dirs)? {
                Some(idx) => {
                    if name.len() > NAME_MAX && found.is_none() {
                        return Err(Errno::NAMETOOLONG);
                    }
                    idx.candidates(name)
                }
                None => lower_dirs.iter().map(|&l| (l, false)).collect(),
            };
            for &(l, known_dir) in probe.iter() {
                let Some(dfd) = pfds.lower(l) else { continue };
                // Below a directory only directories merge, so opening one is the whole
                // test: a whiteout, file or symlink fails with ENOTDIR or ELOOP and ends
                // the merge, a missing name may be hidden by an AUFS whiteout. (One
                // syscall per layer instead of a stat and an open.)
                if let Some(f) = found.as_mut().filter(|f| f.kind == Kind::Dir) {
                    let cfd = match sys::open_dir_beneath(dfd, name) {
                        Ok(fd) => fd,
                        Err(e) if known_dir => return Err(e),
                        Err(Errno::NOTDIR | Errno::LOOP | Errno::NAMETOOLONG) => break,
                        Err(Errno::NOENT) => {
                            if sys::stat_at(dfd, &whiteout::aufs_name(name)).is_ok() {
                                break;
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let (opaque, redirect) = whiteout::lower_dir_marks(cfd.as_fd(), self.ns)?;
                    f.lower_dirs.push(l);
                    if let Some(fds) = &mut f.fds {
                        fds.lowers.push((l, Arc::new(cfd)));
                    }
                    if opaque {
                        break;
                    }
                    if let Some(r) = redirect {
                        self.follow_redirect(&pfds, &lower_dirs, Some(l), &r, f)?;
                        break;
                    }
                    continue;
                }
                // Nothing found yet (a directory found above was handled there).
                match sys::stat_at(dfd, name) {
                    Ok(st) if whiteout::is_whiteout(&st) => break,
                    Ok(mut st) => {
                        let kind = Kind::from_mode(st.st_mode);
                        // (the number stays the real object's)
                        self.lower_stat(l, XTarget::At(dfd, name), &mut st);
                        let ino = self.map_ino(st.st_dev, st.st_ino);
                        if kind != Kind::Dir {
                            found = Some(Found {
                                kind,
                                upper: false,
                                lower: Some(l),
                                lower_dirs: vec![],
                                st,
                                ino,
                                fds: None,
                                redirected: false,
                            });
                            break;
                        }
                        let cfd = sys::open_dir_beneath(dfd, name)?;
                        let (opaque, redirect) = whiteout::lower_dir_marks(cfd.as_fd(), self.ns)?;
                        let f = found.insert(Found {
                            kind,
                            upper: false,
                            lower: None,
                            lower_dirs: vec![l],
                            st,
                            ino,
                            fds: Some(DirFds {
                                upper: None,
                                lowers: vec![(l, Arc::new(cfd))],
                            }),
                            redirected: false,
                        });
                        if opaque {
                            break;
                        }
                        if let Some(r) = redirect {
                            self.follow_redirect(&pfds, &lower_dirs, Some(l), &r, f)?;
                            break;
                        }
                    }
                    Err(Errno::NOENT) => {
                        if sys::stat_at(dfd, &whiteout::aufs_name(name)).is_ok() {
                            break;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        found.ok_or(Errno::NOENT)
    }

    pub(crate) fn check_supported(&self, xnames: &[Vec<u8>], name: &OsStr) -> Result<()> {
        for x in xnames {
            if *x == self.ns.name("metacopy").as_bytes() {
                log::error!(
                    "'{}' in the upper carries {}: strata does not implement metacopy",
                    name.to_string_lossy(),
                    String::from_utf8_lossy(x)
                );
                return Err(Errno::IO);
            }
        }
        Ok(())
    }

    /// The reported inode number of an upper object with an origin xattr: its origin's.
    pub(crate) fn origin_ino(&self, t: XTarget<'_>, xnames: &[Vec<u8>], dev: u64, ino: u64) -> Option<u64> {
        if let Some(v) = self.origins.read().unwrap().get(&(dev, ino)) {
            return Some(*v);
        }
        let want = self.ns.name("origin");
        if !xnames.iter().any(|x| x.as_slice() == want.as_bytes()) {
            return None;
        }
        let raw = sys::getxattr(t, &want).ok()?;
        let (uuid, fh) = copyup::decode_origin(&raw)?;
        for l in &self.lowers {
            if uuid != [0; 16] && l.uuid != [0; 16] && l.uuid != uuid {
                continue;
            }
            if let Ok(fd) = sys::open_by_handle(l.fd.as_fd(), &fh) {
                if let Ok(ost) = rustix::fs::fstat(&fd) {
                    let v = self.map_ino(ost.st_dev, ost.st_ino);
                    self.origins.write().unwrap().insert((dev, ino), v);
                    return Some(v);
                }
            }
        }
        None
    }

    /// lookup: resolve and count one reference for the caller.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        // Resolve and record under one read lock: a rename or unlink (write lock) happens
        // wholly before or wholly after, so the table never gets a name already gone.
        let _ns = self.ns_lock.read().unwrap();
        let found = self.resolve(parent, name)?;
        Ok(self.remember(parent, name, found, true))
    }

    /// Attributes of a node (through an open handle when given, which also works after the
    /// last name is gone).
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr> {
        // A file still in a lower layer shows that layer's override_stat, also through a
        // handle.
        let through = |fd: &std::os::fd::OwnedFd| -> Result<Attr> {
            let mut st = rustix::fs::fstat(fd)?;
            if self.any_override_stat() {
                if let Ok((false, Some(l))) = self.with_node(ino, |n| (n.upper, n.lower())) {
                    self.lower_stat(l, XTarget::Fd(fd.as_fd()), &mut st);
                }
            }
            Ok(self.attr_of(&st, ino, false))
        };
        if let Some(fh) = fh {
            if let Ok(fd) = self.file(fh) {
                return through(&fd);
            }
        }
        // By name from here: a rename or unlink (write lock) in the same directory happens
        // wholly before or after, so the name reaches this node's object, never one that
        // took the name (whose type could differ: the kernel then marks the inode bad and
        // fails every later call on it with EIO).
        let _ns = self.ns_lock.read().unwrap();
        // Unlinked but open: fstat comes without a handle.
        if self.with_node(ino, |n| n.orphan)? {
            if let Some(r) = self.gone_attr(ino) {
                return r;
            }
            let fd = self.any_open_fd(ino).ok_or(Errno::STALE)?;
            return through(&fd);
        }
        let (kind, upper, nlower) = self.with_node(ino, |n| (n.kind, n.upper, n.lower_dirs.len()))?;
        if kind == Kind::Dir {
            let fds = self.dir_fds(ino)?;
            let top = fds.top().ok_or(Errno::IO)?;
            let mut st = rustix::fs::fstat(top)?;
            if !upper {
                if let Some((l, _)) = fds.lowers.first() {
                    self.lower_stat(*l, XTarget::Fd(top), &mut st);
                }
            }
            let merged = (upper && nlower > 0) || (!upper && nlower > 1);
            return Ok(self.attr_of(&st, ino, merged));
        }
        let loc = self.loc(ino)?;
        let mut st = sys::stat_at(loc.dir()?, &loc.name)?;
        if let (false, Some(l)) = (loc.upper, loc.lower) {
            self.lower_stat(l, XTarget::At(loc.dir()?, &loc.name), &mut st);
        }
        Ok(self.attr_of(&st, ino, false))
    }

    /// (st_dev, st_ino) of the real object a non-directory node is now: what tells hard
    /// links apart across walks of different trees over the same layers.
    pub fn backing_id(&self, ino: u64) -> Result<(u64, u64)> {
        let _ns = self.ns_lock.read().unwrap();
        let loc = self.loc(ino)?;
        let st = sys::stat_at(loc.dir()?, &loc.name)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        // Under the read lock, as getattr: a symlink renamed over must not answer with
        // the name's new object (EINVAL from readlinkat for a file).
        let _ns = self.ns_lock.read().unwrap();
        let loc = match self.loc(ino) {
            // Removed (unlinked, renamed over) while the kernel walked through it: the
            // symlink `object_gone` kept, as overlayfs reads the unlinked one.
            Err(Errno::STALE) => {
                let fd = self
                    .gone
                    .lock()
                    .unwrap()
                    .get(&ino)
                    .map(|g| g.top.clone())
                    .ok_or(Errno::STALE)?;
                return Ok(rustix::fs::readlinkat(&*fd, "", Vec::new())?.into_bytes());
            }
            r => r?,
        };
        if loc.kind != Kind::Symlink {
            return Err(Errno::INVAL);
        }
        Ok(rustix::fs::readlinkat(loc.dir()?, &loc.name, Vec::new())?.into_bytes())
    }

    // ----- creating ------------------------------------------------------------------

    /// Is there something in a lower layer at `name` that a deletion must keep hidden?
    pub(crate) fn lower_positive(&self, parent: u64, name: &OsStr) -> Result<bool> {
        if whiteout::is_aufs_marker(name) {
            return Ok(false);
        }
        let lower_dirs = self.with_node(parent, |n| n.lower_dirs.clone())?;
        if lower_dirs.is_empty() {
            return Ok(false);
        }
        let pfds = self.dir_fds(parent)?;
        for &l in lower_dirs.iter() {
            let Some(d) = pfds.lower(l) else { continue };
            match sys::stat_at(d, name) {
                Ok(st) => return Ok(!whiteout::is_whiteout(&st)),
                Err(Errno::NOENT) => {
                    if sys::stat_at(d, &whiteout::aufs_name(name)).is_ok() {
                        return Ok(false);
                    }
                }
                Err(_) => return Ok(false),
            }
        }
        Ok(false)
    }
}
