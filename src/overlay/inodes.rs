//! The inode table: nodes the kernel knows, their names, and the directory fds they cache.

use std::ffi::OsStr;
use std::sync::Arc;

use rustix::io::Errno;

use super::node::{DirFds, LowerSet, Node, NodeTable};
use super::*;
use crate::sys::XTarget;

impl Overlay {
    // ----- inode table -------------------------------------------------------------

    pub(crate) fn with_node<T>(&self, ino: u64, f: impl FnOnce(&Node) -> T) -> Result<T> {
        let nodes = self.nodes.read().unwrap();
        nodes.get(&ino).map(f).ok_or(Errno::NOENT)
    }

    /// A node's set of lower directories, sharing the two common ones (none, and every
    /// layer) instead of allocating one per node.
    pub(crate) fn lower_set(&self, v: Vec<u16>) -> LowerSet {
        if v.is_empty() {
            self.no_lowers.clone()
        } else if *v == **self.all_lowers {
            self.all_lowers.clone()
        } else {
            Arc::new(v.into_boxed_slice())
        }
    }

    /// The directory fds of a directory node, opened from its parent's when not cached.
    pub(crate) fn dir_fds(&self, ino: u64) -> Result<Arc<DirFds>> {
        let (cached, parent, name, upper, lower_dirs, kind, redirected) = self.with_node(ino, |n| {
            (
                n.fds.clone(),
                n.parent,
                n.name.to_os_string(),
                n.upper,
                n.lower_dirs.clone(),
                n.kind,
                n.redirected,
            )
        })?;
        if let Some(f) = cached {
            return Ok(f);
        }
        if kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let fds = if redirected {
            // Its lower directories are where its redirects say: resolve it again.
            let f = self.resolve(parent, &name)?;
            if f.ino != ino || f.kind != Kind::Dir {
                return Err(Errno::STALE);
            }
            Arc::new(f.fds.ok_or(Errno::IO)?)
        } else {
            let pf = self.dir_fds(parent)?;
            Arc::new(DirFds::open_child(&pf, &name, upper, &lower_dirs)?)
        };
        let mut nodes = self.nodes.write().unwrap();
        // Keep them only if the node is still what they were opened for: a copy-up of the
        // directory meanwhile must not leave a cached set without its upper fd.
        if nodes
            .get(&ino)
            .is_some_and(|n| n.fds.is_none() && n.upper == upper && *n.lower_dirs == *lower_dirs)
        {
            self.cache_fds(&mut nodes, ino, fds.clone());
        }
        Ok(fds)
    }

    /// Cache `fds` on node `ino`, replacing what it had. Over the fd budget, the directories
    /// whose fds were cached longest ago give theirs up (they are reopened from their
    /// parent's when needed), so the directories in use keep theirs: a directory merged from
    /// 200 layers must not reopen 200 fds for every lookup in it.
    pub(crate) fn cache_fds(&self, nodes: &mut NodeTable, ino: u64, fds: Arc<DirFds>) {
        let Some(n) = nodes.get_mut(&ino) else { return };
        if ino == ROOT {
            // Outside the budget: every other directory's fds are reopened from it.
            n.fds = Some(fds);
            return;
        }
        // Each node is in the queue once, from when it first gets fds until they go.
        let queued = n.fds.is_some();
        self.fd_budget.clear(&mut n.fds);
        let mut lru = self.fd_lru.lock().unwrap();
        if !self.fd_budget.could_hold(fds.count()) {
            // Larger than the whole budget: opened per operation, evicting no one.
            return;
        }
        while !self.fd_budget.take(fds.count()) {
            let Some(old) = lru.pop_front() else { return };
            if old != ino {
                if let Some(o) = nodes.get_mut(&old) {
                    self.fd_budget.clear(&mut o.fds);
                }
            }
        }
        if let Some(n) = nodes.get_mut(&ino) {
            n.fds = Some(fds);
        }
        if !queued {
            lru.push_back(ino);
        }
        if lru.len() > 4096 && lru.len() > 2 * nodes.len() {
            // Drop the numbers of nodes that are gone.
            lru.retain(|i| nodes.get(i).is_some_and(|n| n.fds.is_some()));
        }
    }

    /// Where a non-directory lives now (trying each of its names, for hard links).
    pub(crate) fn loc(&self, ino: u64) -> Result<Loc> {
        if self.with_node(ino, |n| n.orphan)? {
            return Err(Errno::STALE);
        }
        let (names, upper, lower, kind) = self.with_node(ino, |n| {
            let mut v = vec![(n.parent, n.name.to_os_string())];
            v.extend(n.name.links().iter().cloned());
            (v, n.upper, n.lower(), n.kind)
        })?;
        let mut last = Errno::NOENT;
        for (parent, name) in names {
            match self.dir_fds(parent) {
                Ok(pfds) => {
                    return Ok(Loc {
                        parent,
                        pfds,
                        name,
                        upper,
                        lower,
                        kind,
                    })
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A target for xattr calls and the real object's fd-or-name, for any node.
    pub(crate) fn with_target<T>(&self, ino: u64, f: impl FnOnce(XTarget<'_>) -> Result<T>) -> Result<T> {
        let kind = self.with_node(ino, |n| n.kind)?;
        if kind == Kind::Dir {
            let fds = self.dir_fds(ino)?;
            f(XTarget::Fd(fds.top().ok_or(Errno::IO)?))
        } else {
            // By name, under the read lock (see `getattr`): the xattrs of this node's
            // object, never of one a rename just put in its place.
            let _ns = self.ns_lock.read().unwrap();
            let loc = match self.loc(ino) {
                // Unlinked but open: the xattrs of the file a handle holds, as overlayfs
                // reads them from the unlinked real file; for a fifo, socket or device
                // (which the kernel opens itself) the object `object_gone` kept. A change
                // reaches here only for an upper one: the copy-up before it refuses a
                // removed lower object.
                Err(Errno::STALE) => {
                    let fd = match self.any_open_fd(ino) {
                        Some(fd) => fd,
                        None => self
                            .gone
                            .lock()
                            .unwrap()
                            .get(&ino)
                            .map(|g| g.top.clone())
                            .ok_or(Errno::STALE)?,
                    };
                    return f(XTarget::Fd(std::os::fd::AsFd::as_fd(&*fd)));
                }
                r => r?,
            };
            f(XTarget::At(loc.dir()?, &loc.name))
        }
    }

    /// Does anything of the node's object outlive its names: an open handle, or what
    /// `object_gone` kept? Then the real inode is still allocated and its number cannot
    /// have gone to another object.
    fn held(&self, ino: u64) -> bool {
        self.files.read().unwrap().values().any(|f| f.ino == ino)
            || self.gone.lock().unwrap().contains_key(&ino)
    }

    /// The inode number `stat` shows for node id `ino` (see `remember`).
    pub(crate) fn shown_ino(&self, ino: u64) -> u64 {
        if !Aliases::is_alias(ino) {
            return ino;
        }
        self.aliases
            .read()
            .unwrap()
            .real_of
            .get(&ino)
            .copied()
            .unwrap_or(ino)
    }

    /// The node id of the object whose inode number is `real`: its stand-in if it has one.
    pub(crate) fn live_ino(&self, real: u64) -> u64 {
        let alias = self.aliases.read().unwrap().by_real.get(&real).copied();
        match alias {
            Some(a) if self.nodes.read().unwrap().get(&a).is_some() => a,
            _ => real,
        }
    }

    /// Record a lookup result (or an object just made) in the table and return its
    /// attributes. Callers hold `ns_lock` for reading, so the node's orphan flag is settled.
    ///
    /// A node id is the object's inode number, which the filesystem gives to a new object
    /// once the old one is deleted. The kernel may still hold the old object under that id
    /// (its FORGET not yet here, or a path walk that reached it just before the unlink):
    /// reusing the id would hand it the new object (a chmod or open by that walk would
    /// reach the wrong file), and a new generation instead makes the kernel mark its old
    /// inode bad, failing that walk's next call with EIO. So the new object takes a
    /// stand-in node id, never used before, while `stat` still shows the real number; the
    /// old node keeps its id until the kernel forgets it, and calls on it fail with ESTALE
    /// (which makes a path walk look the name up again) or reach what `object_gone` kept.
    pub(crate) fn remember(&self, parent: u64, name: &OsStr, found: Found, count: bool) -> Attr {
        let merged = found.kind == Kind::Dir
            && ((found.upper && !found.lower_dirs.is_empty())
                || (!found.upper && found.lower_dirs.len() > 1));
        let fds = found.fds.map(Arc::new);
        // A node that was an orphan is another object now: what `object_gone` kept of the
        // old one must not answer for it.
        let mut unorphaned = false;
        let real = self.shown_ino(found.ino);
        // An orphan nothing holds is gone from the disk: its number may now be another
        // object's. (Checked before the table lock: handles and kept objects have their
        // own locks.)
        let before = self.live_ino(real);
        let gone = self.with_node(before, |n| n.orphan).unwrap_or(false) && !self.held(before);
        let mut nodes = self.nodes.write().unwrap();
        let mut ino = match self.aliases.read().unwrap().by_real.get(&real) {
            Some(&a) if nodes.get(&a).is_some() => a,
            _ => real,
        };
        // Another object under the node's number: a removed one's (or a different type
        // shows that it is). Decided under the table lock, so two lookups of the new object
        // agree on one stand-in; an object created through the mount is no different from
        // one a lookup meets first.
        let gone = gone && ino == before;
        if nodes
            .get(&ino)
            .is_some_and(|n| n.kind != found.kind || (n.orphan && gone))
        {
            ino = self.aliases.write().unwrap().take(real);
        }
        let attr = self.attr_of(&found.st, ino, merged);
        match nodes.get_mut(&ino) {
            Some(n) if n.upper && !found.upper && !n.orphan => {
                // Resolved before a concurrent copy-up finished: what the table knows is
                // newer. (An object never goes back from the upper to a lower layer.)
                if count {
                    n.nlookup = n.nlookup.saturating_add(1);
                }
            }
            Some(n) => {
                // An orphan's recorded name is gone (or, for an O_TMPFILE file, never was):
                // not a name to keep.
                let was_orphan = std::mem::replace(&mut n.orphan, false);
                unorphaned |= was_orphan;
                let keep_old = !was_orphan && n.kind != Kind::Dir;
                n.set_primary(parent, name, keep_old);
                if n.upper != found.upper || n.lower() != found.lower {
                    n.no_xattrs = false;
                    self.xattr_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                n.kind = found.kind;
                n.redirected = found.redirected;
                n.upper = found.upper;
                n.set_lower(found.lower);
                n.lower_dirs = self.lower_set(found.lower_dirs);
                if count {
                    n.nlookup = n.nlookup.saturating_add(1);
                }
                // Cached fds follow renames and stay right; replace them only when they
                // lack an upper directory that now exists.
                let stale = n.fds.as_ref().is_none_or(|c| c.upper.is_none() && found.upper);
                if let Some(f) = fds.filter(|_| stale) {
                    self.cache_fds(&mut nodes, ino, f);
                }
            }
            None => {
                let mut n = Node::new(
                    parent,
                    name,
                    found.kind,
                    found.upper,
                    found.lower,
                    self.lower_set(found.lower_dirs),
                );
                n.nlookup = count as u32;
                n.redirected = found.redirected;
                nodes.insert(ino, n);
                if let Some(f) = fds {
                    self.cache_fds(&mut nodes, ino, f);
                }
            }
        }
        drop(nodes);
        if unorphaned {
            self.gone.lock().unwrap().remove(&ino);
        }
        attr
    }

    /// The upper object `f` lost a name: once its last link is gone its inode number may be
    /// reused by the filesystem, so the cached number must go.
    pub(crate) fn drop_cached(&self, f: &Found) {
        if f.upper && (f.kind == Kind::Dir || f.st.st_nlink <= 1) {
            self.origins.write().unwrap().remove(&(f.st.st_dev, f.st.st_ino));
        }
    }

    /// Before removing `f` (named `name` in the directory whose fds are `pfds`): an O_PATH
    /// fd of its real object if it is a fifo, socket, device or symlink the kernel holds.
    /// strata has no open file for those (the kernel opens them itself), so this is what
    /// answers an fstat once the name is gone (see `object_gone`), and for a symlink the
    /// READLINK of a path walk that reached it just before: the kernel caches symlink
    /// targets in pages, and a failed read of that page is EIO to the walker.
    pub(crate) fn special_fd(&self, f: &Found, pfds: &DirFds, name: &OsStr) -> Option<OwnedFd> {
        if !matches!(
            f.kind,
            Kind::Fifo | Kind::Socket | Kind::Char | Kind::Block | Kind::Symlink
        ) || self.with_node(f.ino, |_| ()).is_err()
        {
            return None;
        }
        let dir = if f.upper {
            pfds.upper()?
        } else {
            pfds.lower(f.lower?)?
        };
        crate::sys::open_beneath(
            dir,
            name,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW,
            rustix::fs::Mode::empty(),
        )
        .ok()
    }

    /// `f` lost its last name (unlink, rmdir, a rename over it) while the kernel still holds
    /// it (an fd open on it, a cwd). Keep its topmost real object: fstat shows that, as
    /// overlayfs does (no links for a removed upper one, a lower one as it still is, 1 for
    /// a merged directory), and chmod, chown and utimes through the fd change a removed
    /// upper one. A directory's comes from its fds; a special file's from `special_fd`.
    /// Regular files need none: their open handles answer.
    pub(crate) fn object_gone(&self, f: &Found, special: Option<OwnedFd>) {
        let (top, lower, merged) = if f.kind == Kind::Dir {
            let Some(fds) = f.fds.as_ref() else { return };
            let merged = (f.upper && !f.lower_dirs.is_empty()) || (!f.upper && f.lower_dirs.len() > 1);
            match (&fds.upper, fds.lowers.first()) {
                (Some(u), _) => (u.clone(), None, merged),
                (None, Some((l, fd))) => (fd.clone(), Some(*l), merged),
                (None, None) => return,
            }
        } else {
            let Some(fd) = special else { return };
            (Arc::new(fd), f.lower.filter(|_| !f.upper), false)
        };
        let nodes = self.nodes.read().unwrap();
        if nodes.get(&f.ino).is_some_and(|n| n.orphan) {
            self.gone
                .lock()
                .unwrap()
                .insert(f.ino, super::Gone { top, lower, merged });
        }
    }

    /// The upper object of a removed node the kernel still holds, if that is its topmost
    /// real one (see `object_gone`).
    pub(crate) fn gone_upper(&self, ino: u64) -> Option<Arc<OwnedFd>> {
        let g = self.gone.lock().unwrap();
        g.get(&ino).filter(|d| d.lower.is_none()).map(|d| d.top.clone())
    }

    /// Attributes of a removed node the kernel still holds (see `object_gone`).
    pub(crate) fn gone_attr(&self, ino: u64) -> Option<Result<Attr>> {
        let (top, lower, merged) = {
            let g = self.gone.lock().unwrap();
            let d = g.get(&ino)?;
            (d.top.clone(), d.lower, d.merged)
        };
        Some((|| {
            let mut st = rustix::fs::fstat(&*top)?;
            if let Some(l) = lower {
                self.lower_stat(l, XTarget::Fd(std::os::fd::AsFd::as_fd(&*top)), &mut st);
            }
            Ok(self.attr_of(&st, ino, merged))
        })())
    }

    /// A name went away (unlink, rmdir, rename over it).
    pub(crate) fn forget_name(&self, ino: u64, parent: u64, name: &OsStr) {
        let mut nodes = self.nodes.write().unwrap();
        if let Some(n) = nodes.get_mut(&ino) {
            if n.parent == parent && *n.name == *name {
                match n.name.pop_link() {
                    Some(next) => {
                        n.parent = next.0;
                        n.name.set(&next.1);
                    }
                    None => n.orphan = true,
                }
            } else {
                n.name.retain_links(|l| !(l.0 == parent && l.1 == name));
            }
        }
    }

    /// The caller drops `n` references.
    pub fn forget(&self, ino: u64, n: u64) {
        self.forget_many(&[(ino, n)]);
    }

    /// The (parent, name) the table records for `ino`: what a race test checks against the
    /// tree.
    pub fn recorded_name(&self, ino: u64) -> Option<(u64, std::ffi::OsString)> {
        self.nodes
            .read()
            .unwrap()
            .get(&ino)
            .map(|n| (n.parent, n.name.to_os_string()))
    }

    /// Nodes in the table (ROOT included): what a leak test watches.
    pub fn node_count(&self) -> usize {
        self.nodes.read().unwrap().len()
    }

    /// Drop references to many nodes under one lock (the kernel sends forgets in batches,
    /// tens of thousands at an unmount). Fds and indexes of the nodes that go are
    /// released after the lock.
    pub fn forget_many(&self, items: &[(u64, u64)]) {
        let mut gone = Vec::new();
        {
            let mut nodes = self.nodes.write().unwrap();
            for &(ino, n) in items {
                if ino == ROOT {
                    continue;
                }
                if let Some(node) = nodes.get_mut(&ino) {
                    node.nlookup = node.nlookup.saturating_sub(n.min(u32::MAX as u64) as u32);
                    if node.nlookup == 0 {
                        if Aliases::is_alias(ino) {
                            self.aliases.write().unwrap().drop_node(ino);
                        }
                        if let Some(mut g) = nodes.remove(&ino) {
                            self.fd_budget.clear(&mut g.fds);
                            if g.kind == Kind::Dir {
                                gone.push(ino);
                            }
                        }
                    }
                }
            }
        }
        for ino in gone {
            self.drop_index(ino);
            self.dir_changed(ino);
            self.gone.lock().unwrap().remove(&ino);
        }
    }

    pub(crate) fn is_ancestor(&self, anc: u64, mut ino: u64) -> Result<bool> {
        let nodes = self.nodes.read().unwrap();
        loop {
            if ino == anc {
                return Ok(true);
            }
            if ino == ROOT {
                return Ok(false);
            }
            ino = nodes.get(&ino).map(|n| n.parent).ok_or(Errno::NOENT)?;
        }
    }

    pub(crate) fn rename_node(&self, ino: u64, op: u64, on: &OsStr, np: u64, nn: &OsStr) {
        let mut nodes = self.nodes.write().unwrap();
        if let Some(n) = nodes.get_mut(&ino) {
            if n.parent == op && *n.name == *on {
                n.parent = np;
                n.name.set(nn);
            } else {
                n.name.retain_links(|l| !(l.0 == op && l.1 == on));
                n.name.push_link((np, nn.to_owned()));
            }
        }
    }
}

/// Stand-in node ids (see `Overlay::remember`): a range no inode number reaches (those are
/// below 2^56, and the root's alias sits at the top).
#[derive(Debug, Default)]
pub(crate) struct Aliases {
    /// Inode number -> the stand-in id of the object that has it now.
    by_real: HashMap<u64, u64>,
    /// Stand-in id -> inode number.
    real_of: HashMap<u64, u64>,
    next: u64,
}

const ALIAS_BASE: u64 = 1 << 62;

impl Aliases {
    pub(crate) fn is_alias(id: u64) -> bool {
        (ALIAS_BASE..ALIAS_BASE + (1 << 48)).contains(&id)
    }

    /// A new stand-in id for the object that now has inode number `real`.
    fn take(&mut self, real: u64) -> u64 {
        let a = ALIAS_BASE + self.next;
        self.next += 1;
        self.by_real.insert(real, a);
        self.real_of.insert(a, real);
        a
    }

    /// Node `id` is gone from the table.
    fn drop_node(&mut self, id: u64) {
        if let Some(real) = self.real_of.remove(&id) {
            if self.by_real.get(&real) == Some(&id) {
                self.by_real.remove(&real);
            }
        }
    }
}
