//! Directory redirects, in the kernel's format (overlayfs.rst, "Redirect dir").
//!
//! A directory renamed away from where its lower content lives carries
//! `<prefix>redirect`: one name (its old name in the same parent) or an absolute path from
//! the layers' root. A lookup that meets one continues in the layers below at that place
//! instead of at the directory's own name; a lower directory can carry one too (an old
//! upper moved into the stack), which redirects the layers below it.
//!
//! Written only on rename, and as the kernel writes them: a rename within one directory
//! records the old name, a move to another directory the absolute path of the lower
//! content, and a redirect already there is kept when it still holds (a relative one on a
//! rename within the same directory, an absolute one always).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;

use rustix::fs::FileType;
use rustix::io::Errno;

use super::node::DirFds;
use super::*;
use crate::sys::{self, XTarget};

/// The longest redirect written (the kernel builds them in a PATH_MAX buffer and answers
/// EXDEV beyond it).
const REDIRECT_MAX: usize = 4095;

/// Where the layers below are searched: a name in the parent's lower directories, or a
/// path from each layer's root.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Rel(OsString),
    Abs(Vec<OsString>),
}

impl Target {
    /// From a value `whiteout::check_redirect` accepted.
    fn parse(v: &[u8]) -> Target {
        match v.strip_prefix(b"/") {
            Some(rest) => Target::Abs(
                rest.split(|&b| b == b'/')
                    .map(|c| OsString::from_vec(c.to_vec()))
                    .collect(),
            ),
            None => Target::Rel(OsString::from_vec(v.to_vec())),
        }
    }

    fn components(&self) -> Vec<OsString> {
        match self {
            Target::Rel(n) => vec![n.clone()],
            Target::Abs(c) => c.clone(),
        }
    }

    /// The target after the component `after` places from the end of `self` turned out to
    /// carry redirect `r`: a relative one replaces that component, an absolute one
    /// everything up to it (the kernel counts from the end for the same reason: the prefix
    /// can change length).
    fn redirected(&self, after: usize, r: &[u8]) -> Target {
        let comps = self.components();
        let tail = &comps[comps.len() - after..];
        match Target::parse(r) {
            Target::Abs(mut c) => {
                c.extend_from_slice(tail);
                Target::Abs(c)
            }
            Target::Rel(n) => match self {
                Target::Rel(_) => Target::Rel(n),
                Target::Abs(_) => {
                    let mut c = comps[..comps.len() - after - 1].to_vec();
                    c.push(n);
                    c.extend_from_slice(tail);
                    Target::Abs(c)
                }
            },
        }
    }
}

impl Overlay {
    /// Continue the lookup of directory `f` below layer `after` (None: below the upper) at
    /// the place `redirect` names, adding each lower directory found there to `f`.
    /// `pfds`/`parent_lowers` are the parent's, for a relative redirect.
    pub(crate) fn follow_redirect(
        &self,
        pfds: &DirFds,
        parent_lowers: &[u16],
        after: Option<u16>,
        redirect: &[u8],
        f: &mut Found,
    ) -> Result<()> {
        let below = |l: u16| after.is_none_or(|a| l > a);
        let mut target = Target::parse(redirect);
        let mut layers: Vec<u16> = match target {
            Target::Abs(_) => (0..self.lowers.len() as u16).filter(|&l| below(l)).collect(),
            Target::Rel(_) => parent_lowers.iter().copied().filter(|&l| below(l)).collect(),
        };
        if layers.is_empty() {
            return Ok(());
        }
        if self.redirect_dir == RedirectDir::NoFollow {
            log::warn!(
                "refusing to follow redirect {:?} (redirect_dir=nofollow)",
                String::from_utf8_lossy(redirect)
            );
            return Err(Errno::PERM);
        }
        f.redirected = true;
        let bottom = self.lowers.len() as u16 - 1;
        let mut i = 0;
        while i < layers.len() {
            let l = layers[i];
            i += 1;
            let base: BorrowedFd<'_> = match &target {
                Target::Rel(_) => match pfds.lower(l) {
                    Some(b) => b,
                    None => continue,
                },
                Target::Abs(_) => self.lowers[l as usize].fd.as_fd(),
            };
            let comps = target.components();
            let mut cur: Option<OwnedFd> = None;
            let mut hit: Option<OwnedFd> = None;
            let mut stop = false;
            let mut next: Option<Target> = None;
            for (k, c) in comps.iter().enumerate() {
                let last = k + 1 == comps.len();
                let dir = cur.as_ref().map_or(base, |d| d.as_fd());
                match sys::stat_at(dir, c) {
                    Ok(st) if whiteout::is_whiteout(&st) => {
                        stop = true;
                        break;
                    }
                    Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
                        // Only a directory continues a directory (or a path through one).
                        stop = true;
                        break;
                    }
                    Ok(_) => {
                        let fd = sys::open_dir_beneath(dir, c)?;
                        // The bottom layer's marks matter to no layer below it.
                        if l != bottom {
                            let (opaque, r) = whiteout::lower_dir_marks(fd.as_fd(), self.ns)?;
                            if opaque {
                                // An opaque directory on the way ends the search after
                                // this layer, as the kernel's does.
                                stop = true;
                            } else if let Some(r) = r {
                                // An absolute redirect starts the search afresh, past an
                                // opaque directory met before it (ovl_check_redirect).
                                if r.starts_with(b"/") {
                                    stop = false;
                                }
                                let t = next.as_ref().unwrap_or(&target);
                                next = Some(t.redirected(comps.len() - k - 1, &r));
                            }
                        }
                        if last {
                            hit = Some(fd);
                        } else {
                            cur = Some(fd);
                        }
                    }
                    Err(Errno::NOENT) => {
                        if sys::stat_at(dir, &whiteout::aufs_name(c)).is_ok() {
                            stop = true;
                        }
                        break;
                    }
                    Err(Errno::NAMETOOLONG) => break,
                    Err(e) => return Err(e),
                }
            }
            if let Some(fd) = hit {
                f.lower_dirs.push(l);
                f.fds
                    .get_or_insert_with(Default::default)
                    .lowers
                    .push((l, Arc::new(fd)));
            }
            if stop {
                break;
            }
            if let Some(t) = next {
                if matches!(t, Target::Abs(_)) && !matches!(target, Target::Abs(_)) {
                    // From the root's layers now, not the parent's.
                    layers = (l + 1..=bottom).collect();
                    i = 0;
                }
                target = t;
            }
        }
        Ok(())
    }

    /// The redirect an upper directory `name` in `pfd` (child of node `parent`) needs
    /// before it is renamed: None when what it carries already holds.
    pub(crate) fn redirect_for_move(
        &self,
        parent: u64,
        pfd: BorrowedFd<'_>,
        name: &OsStr,
        samedir: bool,
    ) -> Result<Option<Vec<u8>>> {
        let own = self.upper_redirect_at(XTarget::At(pfd, name))?;
        match &own {
            Some(o) if samedir || o.starts_with(b"/") => return Ok(None),
            None if samedir => return Ok(Some(name.as_bytes().to_vec())),
            _ => {}
        }
        // Absolute: the path of the lower content from the root, through the redirects of
        // the directories on the way (an absolute one ends the walk).
        let mut parts: Vec<Vec<u8>> = vec![own.unwrap_or_else(|| name.as_bytes().to_vec())];
        let mut cur = parent;
        while cur != ROOT {
            let (p, n, upper) = self.with_node(cur, |n| (n.parent, n.name.to_os_string(), n.upper))?;
            let r = if upper {
                let fds = self.dir_fds(cur)?;
                self.upper_redirect_at(XTarget::Fd(fds.upper().ok_or(Errno::IO)?))?
            } else {
                None
            };
            match r {
                Some(r) if r.starts_with(b"/") => {
                    parts.push(r[1..].to_vec());
                    break;
                }
                Some(r) => parts.push(r),
                None => parts.push(n.into_vec()),
            }
            cur = p;
        }
        let mut v = Vec::new();
        for p in parts.iter().rev() {
            v.push(b'/');
            v.extend_from_slice(p);
        }
        if v.len() > REDIRECT_MAX {
            return Err(Errno::XDEV);
        }
        Ok(Some(v))
    }

    fn upper_redirect_at(&self, t: XTarget<'_>) -> Result<Option<Vec<u8>>> {
        let names = sys::listxattr(t)?;
        whiteout::upper_redirect(t, &names, self.ns)
    }

    /// Record that directory `ino` is now found through a redirect.
    pub(crate) fn set_redirected(&self, ino: u64) {
        if let Some(n) = self.nodes.write().unwrap().get_mut(&ino) {
            n.redirected = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abs(v: &[&str]) -> Target {
        Target::Abs(v.iter().map(OsString::from).collect())
    }

    #[test]
    fn targets() {
        assert_eq!(Target::parse(b"a"), Target::Rel("a".into()));
        assert_eq!(Target::parse(b"/a/b"), abs(&["a", "b"]));
        // A relative redirect met on the way replaces that component.
        assert_eq!(abs(&["a", "b", "c"]).redirected(1, b"x"), abs(&["a", "x", "c"]));
        assert_eq!(abs(&["a", "b", "c"]).redirected(0, b"x"), abs(&["a", "b", "x"]));
        // An absolute one replaces everything up to it.
        assert_eq!(
            abs(&["a", "b", "c"]).redirected(1, b"/y/z"),
            abs(&["y", "z", "c"])
        );
        assert_eq!(
            Target::Rel("a".into()).redirected(0, b"b"),
            Target::Rel("b".into())
        );
        assert_eq!(Target::Rel("a".into()).redirected(0, b"/q"), abs(&["q"]));
    }
}
