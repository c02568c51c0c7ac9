//! rename, with RENAME_NOREPLACE and RENAME_EXCHANGE.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;

use rustix::fs::{AtFlags, FileType, RenameFlags};
use rustix::io::Errno;

use super::*;
use crate::sys::{self, XTarget};

impl Overlay {
    /// rename, with RENAME_NOREPLACE and RENAME_EXCHANGE. A directory that has lower
    /// content moves with a redirect (see `redirect`), or fails with EXDEV when
    /// redirect_dir is not `on`, as the kernel's does.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let _changed = (self.changing(parent), self.changing(newparent));
        self.upper()?;
        let rf = RenameFlags::from_bits(flags).ok_or(Errno::INVAL)?;
        if rf.intersects(!(RenameFlags::NOREPLACE | RenameFlags::EXCHANGE))
            || rf.contains(RenameFlags::NOREPLACE | RenameFlags::EXCHANGE)
        {
            return Err(Errno::INVAL);
        }
        let exchange = rf.contains(RenameFlags::EXCHANGE);
        if whiteout::is_aufs_marker(newname) {
            // Not a name a user can make (see `create_with`).
            return Err(Errno::INVAL);
        }
        let src = self.resolve(parent, name)?;
        let dst = match self.resolve(newparent, newname) {
            Ok(f) => Some(f),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(e),
        };
        if parent == newparent && name == newname {
            return Ok(());
        }
        // A directory with lower content (merged, or still only in a lower layer).
        let has_lower = |f: &Found| f.kind == Kind::Dir && !(f.upper && f.lower_dirs.is_empty());
        let redirects = self.redirect_dir == RedirectDir::On;
        let movable = |f: &Found| redirects || !has_lower(f);
        match &dst {
            None if exchange => return Err(Errno::NOENT),
            Some(_) if rf.contains(RenameFlags::NOREPLACE) => return Err(Errno::EXIST),
            Some(d) if d.ino == src.ino && !exchange && src.kind != Kind::Dir => return Ok(()),
            _ => {}
        }
        if !movable(&src) {
            return Err(Errno::XDEV);
        }
        if let Some(d) = &dst {
            if exchange && !movable(d) {
                return Err(Errno::XDEV);
            }
            if !exchange {
                match (src.kind == Kind::Dir, d.kind == Kind::Dir) {
                    (true, false) => return Err(Errno::NOTDIR),
                    (false, true) => return Err(Errno::ISDIR),
                    // A pure-upper directory is left to the rename itself to refuse (after
                    // the copy-up and redirect, as the kernel's order leaves them).
                    (true, true) if d.upper && d.lower_dirs.is_empty() => {}
                    (true, true) => {
                        let fds = d.fds.as_ref().ok_or(Errno::IO)?;
                        if !self
                            .read_merged(
                                fds,
                                &d.lower_dirs,
                                self.cached_index(d.ino, &d.lower_dirs).as_deref(),
                                false,
                            )?
                            .is_empty()
                        {
                            return Err(Errno::NOTEMPTY);
                        }
                    }
                    _ => {}
                }
            }
        }
        // A directory must not move into its own subtree.
        if src.kind == Kind::Dir && self.is_ancestor(src.ino, newparent)? {
            return Err(Errno::INVAL);
        }
        self.copy_up(parent)?;
        self.copy_up(newparent)?;
        self.copy_up_ino(parent, name, &src)?;
        if exchange {
            if let Some(d) = &dst {
                self.copy_up_ino(newparent, newname, d)?;
            }
        }
        // From the first change of a name to the node table's update: no lookup may
        // resolve in between and record the old name (see `ns_lock`).
        let _ns = self.ns_lock.write().unwrap();
        let ofds = self.dir_fds(parent)?;
        let nfds = self.dir_fds(newparent)?;
        let ofd = ofds.upper().ok_or(Errno::IO)?;
        let nfd = nfds.upper().ok_or(Errno::IO)?;
        let src_lower = self.lower_positive(parent, name)?;
        let dst_lower = self.lower_positive(newparent, newname)?;
        let dst_special = match &dst {
            Some(d) if !exchange => self.special_fd(d, &nfds, newname),
            _ => None,
        };
        let old_merged = !self.with_node(parent, |n| n.lower_dirs.is_empty())?;
        let new_merged = !self.with_node(newparent, |n| n.lower_dirs.is_empty())?;
        // A directory with lower content takes a redirect to it before it moves (so a
        // crash in between leaves at worst a redirect to where it still is).
        let samedir = parent == newparent;
        let src_redirect = has_lower(&src);
        let dst_redirect = exchange && dst.as_ref().is_some_and(has_lower);
        if src_redirect {
            self.write_redirect(parent, ofd, name, samedir)?;
        }
        if dst_redirect {
            self.write_redirect(newparent, nfd, newname, samedir)?;
        }
        if exchange {
            rustix::fs::renameat_with(ofd, name, nfd, newname, RenameFlags::EXCHANGE)?;
            // As the kernel: a pure-upper directory moved into a merged directory becomes
            // opaque, so lower content that appears there later stays hidden.
            if src.kind == Kind::Dir && !src_redirect && (dst_lower || new_merged) {
                whiteout::set_opaque(XTarget::At(nfd, newname), self.ns)?;
            }
            if dst.as_ref().is_some_and(|d| d.kind == Kind::Dir) && !dst_redirect && (src_lower || old_merged)
            {
                whiteout::set_opaque(XTarget::At(ofd, name), self.ns)?;
            }
        } else {
            match sys::stat_at(nfd, newname) {
                Ok(st) if whiteout::is_whiteout(&st) && src.kind == Kind::Dir => {
                    // A directory cannot replace a character device: drop the whiteout;
                    // the moved directory becomes opaque below.
                    rustix::fs::unlinkat(nfd, newname, AtFlags::empty())?;
                }
                Ok(st)
                    if FileType::from_raw_mode(st.st_mode) == FileType::Directory
                        && dst.as_ref().is_some_and(|d| !d.lower_dirs.is_empty()) =>
                {
                    // Merged-empty: only whiteouts remain inside, which must go first.
                    let d = sys::open_dir_beneath(nfd, newname)?;
                    layers::remove_children(&d)?;
                }
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory && dst.is_some() => {
                    // Nothing below it, but fuse-overlayfs's markers may be all it holds (it
                    // leaves `.wh..wh..opq` in every directory it made opaque): they go
                    // first. Anything else is left to the rename to refuse.
                    let d = sys::open_dir_beneath(nfd, newname)?;
                    let mut only_markers = true;
                    for ent in sys::dir_stream(std::os::fd::AsFd::as_fd(&d))? {
                        let nb = ent?.file_name().to_bytes().to_vec();
                        if nb != b"." && nb != b".." && !nb.starts_with(whiteout::WH_PREFIX) {
                            only_markers = false;
                            break;
                        }
                    }
                    if only_markers {
                        layers::remove_children(&d)?;
                    }
                }
                _ => {}
            }
            let wf = if src_lower {
                RenameFlags::WHITEOUT
            } else {
                RenameFlags::empty()
            };
            match rustix::fs::renameat_with(ofd, name, nfd, newname, wf) {
                Ok(()) => {}
                Err(Errno::INVAL) | Err(Errno::PERM) | Err(Errno::OPNOTSUPP) if src_lower => {
                    rustix::fs::renameat(ofd, name, nfd, newname)?;
                    self.put_whiteout(ofd, name)?;
                }
                Err(e) => return Err(e),
            }
            if src.kind == Kind::Dir && !src_redirect && (dst_lower || new_merged) {
                whiteout::set_opaque(XTarget::At(nfd, newname), self.ns)?;
            }
        }
        // Tell the kernel's future mounts that this pure-upper directory now holds an entry
        // with an origin, so its readdir fixes up d_ino (the kernel's "impure" marker).
        if self
            .with_node(newparent, |n| n.lower_dirs.is_empty())
            .unwrap_or(false)
            && newparent != ROOT
        {
            let _ = sys::setxattr(XTarget::Fd(nfd), &self.ns.name("impure"), b"y", 0);
        }
        // Table: move the source's name; the destination loses (or swaps) its name.
        if let Some(d) = &dst {
            if exchange {
                self.rename_node(d.ino, newparent, newname, parent, name);
            } else {
                self.drop_cached(d);
                self.forget_name(d.ino, newparent, newname);
                self.object_gone(d, dst_special);
            }
        }
        self.rename_node(src.ino, parent, name, newparent, newname);
        if src_redirect {
            self.set_redirected(src.ino);
        }
        if let Some(d) = dst.as_ref().filter(|_| dst_redirect) {
            self.set_redirected(d.ino);
        }
        // A moved directory's ".." changed.
        self.dir_changed(src.ino);
        if let Some(d) = &dst {
            self.dir_changed(d.ino);
        }
        Ok(())
    }

    /// Give the upper directory `name` in `pfd` the redirect its move needs. A layer that
    /// cannot store it makes the rename fail with EXDEV (the caller copies instead), as the
    /// kernel's does.
    fn write_redirect(&self, parent: u64, pfd: BorrowedFd<'_>, name: &OsStr, samedir: bool) -> Result<()> {
        if let Some(v) = self.redirect_for_move(parent, pfd, name, samedir)? {
            whiteout::set_redirect(XTarget::At(pfd, name), self.ns, &v).map_err(|e| {
                log::warn!("cannot store a redirect on '{}': {e}", name.to_string_lossy());
                Errno::XDEV
            })?;
        }
        Ok(())
    }
}
