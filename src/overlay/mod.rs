//! The overlay core: layers, inode table, lookup, copy-up, whiteouts, readdir.
//!
//! No FUSE types here: every operation takes plain values and returns `Result<_, Errno>`, so
//! the core is tested on temporary directories without mounting. All methods take `&self`
//! and may run concurrently from the FUSE worker threads; the inode table lock is never held
//! across I/O, and copy-ups of different files do not wait for each other.

mod copyup;
mod dir;
pub mod layers;
mod node;
pub mod whiteout;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps};
pub use rustix::io::Errno;

use layers::{Layer, Stack, Upper};
pub use layers::{OverlayConfig, SetupError};
use node::{DirFds, Node};
use whiteout::XattrNs;

use crate::sys::{self, XTarget};

/// Paths of the multiply-linked regular files of one layer, by inode number.
type LinkIndex = HashMap<u64, Vec<std::path::PathBuf>>;

/// Result of a core operation: a value or the errno to hand back to the caller.
pub type Result<T> = std::result::Result<T, Errno>;

/// Inode number of the root directory (FUSE's FUSE_ROOT_ID).
pub const ROOT: u64 = 1;
/// The number reported for an object whose own number would collide with ROOT.
const ROOT_ALIAS: u64 = u64::MAX - 1;

/// File type of a merged object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// FIFO.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device.
    Char,
    /// Block device.
    Block,
}

impl Kind {
    /// From st_mode.
    pub fn from_mode(mode: u32) -> Kind {
        match FileType::from_raw_mode(mode) {
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::Char,
            FileType::BlockDevice => Kind::Block,
            _ => Kind::File,
        }
    }
}

/// Attributes of a merged object, as reported to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Stable inode number (also the FUSE node id).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, u32),
    /// Modification time.
    pub mtime: (i64, u32),
    /// Status change time.
    pub ctime: (i64, u32),
    /// Type.
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

/// A time to set.
#[derive(Debug, Clone, Copy)]
pub enum TimeSet {
    /// The current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, u32),
}

/// What a setattr changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSet>,
    /// New modification time.
    pub mtime: Option<TimeSet>,
    /// Open handle the change came through, if any.
    pub fh: Option<u64>,
}

impl SetAttr {
    fn spec(t: Option<TimeSet>) -> Timespec {
        match t {
            None => Timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Some(TimeSet::Now) => Timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Some(TimeSet::At(s, n)) => Timespec {
                tv_sec: s,
                tv_nsec: n as _,
            },
        }
    }
    /// The access time for utimensat (UTIME_OMIT when unchanged).
    fn atime_spec(&self) -> Timespec {
        Self::spec(self.atime)
    }
    /// The modification time for utimensat (UTIME_OMIT when unchanged).
    fn mtime_spec(&self) -> Timespec {
        Self::spec(self.mtime)
    }
}

/// Who asks: the caller's credentials, for the owner of new objects.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// uid
    pub uid: u32,
    /// gid
    pub gid: u32,
}

/// One entry of a merged directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Inode number, equal to what lookup reports as st_ino.
    pub ino: u64,
    /// Type.
    pub kind: Kind,
    /// Name.
    pub name: OsString,
}

/// Filesystem statistics.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Blocks available to unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Maximum name length.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

/// What one lookup found across the layers.
#[derive(Debug)]
pub(crate) struct Found {
    kind: Kind,
    upper: bool,
    /// For non-directories not in the upper: the layer it comes from.
    lower: Option<u16>,
    /// For directories: the lower layers merged into it, top first.
    lower_dirs: Vec<u16>,
    /// lstat of the topmost real object.
    st: rustix::fs::Stat,
    ino: u64,
    /// For directories: fds of every real directory merged into it.
    fds: Option<DirFds>,
}

/// Where a non-directory lives: the real directory that holds it and its name there.
pub(crate) struct Loc {
    parent: u64,
    pfds: Arc<DirFds>,
    name: OsString,
    upper: bool,
    lower: Option<u16>,
    kind: Kind,
}

impl Loc {
    /// The real directory holding the object (upper if it is there, else its lower layer).
    fn dir(&self) -> Result<BorrowedFd<'_>> {
        if self.upper {
            self.pfds.upper().ok_or(Errno::IO)
        } else {
            self.lower.and_then(|l| self.pfds.lower(l)).ok_or(Errno::IO)
        }
    }
}

/// The merged filesystem.
#[derive(Debug)]
pub struct Overlay {
    lowers: Vec<Layer>,
    upper: Option<Upper>,
    ns: XattrNs,
    volatile: bool,
    nodes: RwLock<HashMap<u64, Node>>,
    files: RwLock<HashMap<u64, Arc<OwnedFd>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    tmp_seq: AtomicU64,
    stripes: Vec<Mutex<()>>,
    /// Some(dev) when every layer is on one filesystem: inode numbers pass through.
    single_dev: Option<u64>,
    devs: RwLock<Vec<u64>>,
    /// (upper dev, upper ino) -> reported ino, for upper objects already checked for an
    /// origin (and for overlay xattrs we do not support), or made by us.
    origins: RwLock<HashMap<(u64, u64), u64>>,
    /// How many more directory fds may be kept open.
    fd_budget: AtomicI64,
    /// Per lower layer: inode -> paths, for files with several links (built on demand).
    link_index: Mutex<HashMap<u16, Arc<LinkIndex>>>,
}

fn ts(sec: i64, nsec: u64) -> (i64, u32) {
    (sec, nsec as u32)
}

impl Overlay {
    /// Validate the configuration, open the layers and prepare the work directory.
    pub fn new(cfg: &OverlayConfig) -> std::result::Result<Overlay, SetupError> {
        let Stack { lowers, upper, ns } = Stack::open(cfg)?;
        let mut devs: Vec<u64> = Vec::new();
        for d in upper
            .iter()
            .map(|u| u.layer.dev)
            .chain(lowers.iter().map(|l| l.dev))
        {
            if !devs.contains(&d) {
                devs.push(d);
            }
        }
        let single_dev = if devs.len() == 1 { Some(devs[0]) } else { None };
        let limit = sys::raise_nofile() as i64;
        let ov = Overlay {
            lowers,
            upper,
            ns,
            volatile: cfg.volatile,
            nodes: RwLock::new(HashMap::new()),
            files: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            tmp_seq: AtomicU64::new(0),
            stripes: (0..64).map(|_| Mutex::new(())).collect(),
            single_dev,
            devs: RwLock::new(devs),
            origins: RwLock::new(HashMap::new()),
            fd_budget: AtomicI64::new((limit - 1024).max(64) / 2),
            link_index: Mutex::new(HashMap::new()),
        };
        let dup = |fd: &OwnedFd| fd.try_clone().map(Arc::new);
        let root_fds = DirFds {
            upper: match &ov.upper {
                Some(u) => Some(dup(&u.layer.fd).map_err(|e| SetupError::BadDir {
                    what: "upperdir",
                    path: u.layer.path.clone(),
                    err: e.to_string(),
                })?),
                None => None,
            },
            lowers: ov
                .lowers
                .iter()
                .enumerate()
                .map(|(i, l)| dup(&l.fd).map(|f| (i as u16, f)))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| SetupError::BadDir {
                    what: "lowerdir",
                    path: ov.lowers[0].path.clone(),
                    err: e.to_string(),
                })?,
        };
        let root = Node {
            parent: ROOT,
            name: OsString::new(),
            links: Vec::new(),
            kind: Kind::Dir,
            upper: ov.upper.is_some(),
            lower: None,
            lower_dirs: (0..ov.lowers.len() as u16).collect::<Vec<_>>().into(),
            nlookup: 1,
            fds: Some(Arc::new(root_fds)),
            orphan: false,
        };
        ov.nodes.write().unwrap().insert(ROOT, root);
        Ok(ov)
    }

    /// Is there a writable upper layer?
    pub fn writable(&self) -> bool {
        self.upper.is_some()
    }

    fn upper(&self) -> Result<&Upper> {
        self.upper.as_ref().ok_or(Errno::ROFS)
    }

    /// Map a real (dev, ino) to the number we report. One filesystem: the real number
    /// (persistent, equal to the kernel's); several: the layer's index in the high bits.
    fn map_ino(&self, dev: u64, ino: u64) -> u64 {
        let v = if Some(dev) == self.single_dev {
            ino
        } else {
            let idx = {
                let devs = self.devs.read().unwrap();
                devs.iter().position(|d| *d == dev)
            };
            let idx = idx.unwrap_or_else(|| {
                let mut devs = self.devs.write().unwrap();
                devs.iter().position(|d| *d == dev).unwrap_or_else(|| {
                    devs.push(dev);
                    devs.len() - 1
                })
            });
            ((idx as u64 + 1) << 48) | (ino & ((1 << 48) - 1))
        };
        if v == ROOT || v == 0 {
            ROOT_ALIAS - v
        } else {
            v
        }
    }

    fn attr_of(&self, st: &rustix::fs::Stat, ino: u64, merged_dir: bool) -> Attr {
        let kind = Kind::from_mode(st.st_mode);
        Attr {
            ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: ts(st.st_atime, st.st_atime_nsec),
            mtime: ts(st.st_mtime, st.st_mtime_nsec),
            ctime: ts(st.st_ctime, st.st_ctime_nsec),
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            // As the kernel does: a merged directory reports 1, which `find` and friends
            // take as "count unknown".
            nlink: if merged_dir { 1 } else { st.st_nlink as u32 },
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }

    fn tmp_name(&self) -> OsString {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        OsString::from(format!("#strata-{}-{n}", std::process::id()))
    }

    fn stripe(&self, ino: u64) -> std::sync::MutexGuard<'_, ()> {
        self.stripes[(ino % self.stripes.len() as u64) as usize]
            .lock()
            .unwrap()
    }

    // ----- inode table -------------------------------------------------------------

    fn with_node<T>(&self, ino: u64, f: impl FnOnce(&Node) -> T) -> Result<T> {
        let nodes = self.nodes.read().unwrap();
        nodes.get(&ino).map(f).ok_or(Errno::NOENT)
    }

    /// The directory fds of a directory node, opened from its parent's when not cached.
    fn dir_fds(&self, ino: u64) -> Result<Arc<DirFds>> {
        let (cached, parent, name, upper, lower_dirs, kind) = self.with_node(ino, |n| {
            (
                n.fds.clone(),
                n.parent,
                n.name.clone(),
                n.upper,
                n.lower_dirs.clone(),
                n.kind,
            )
        })?;
        if let Some(f) = cached {
            return Ok(f);
        }
        if kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let pf = self.dir_fds(parent)?;
        let fds = DirFds::open_child(&pf, &name, upper, &lower_dirs)?;
        Ok(self.maybe_cache(ino, fds))
    }

    /// Keep `fds` on the node if the fd budget allows; returns them either way.
    fn maybe_cache(&self, ino: u64, fds: DirFds) -> Arc<DirFds> {
        let fds = Arc::new(fds);
        let cost = fds.count() as i64;
        if self.fd_budget.fetch_sub(cost, Ordering::Relaxed) >= cost {
            let mut nodes = self.nodes.write().unwrap();
            if let Some(n) = nodes.get_mut(&ino) {
                if let Some(old) = n.fds.replace(fds.clone()) {
                    self.fd_budget.fetch_add(old.count() as i64, Ordering::Relaxed);
                }
                return fds;
            }
        }
        self.fd_budget.fetch_add(cost, Ordering::Relaxed);
        fds
    }

    /// Where a non-directory lives now (trying each of its names, for hard links).
    fn loc(&self, ino: u64) -> Result<Loc> {
        if self.with_node(ino, |n| n.orphan)? {
            return Err(Errno::STALE);
        }
        let (names, upper, lower, kind) = self.with_node(ino, |n| {
            let mut v = vec![(n.parent, n.name.clone())];
            v.extend(n.links.iter().cloned());
            (v, n.upper, n.lower, n.kind)
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
    fn with_target<T>(&self, ino: u64, f: impl FnOnce(XTarget<'_>) -> Result<T>) -> Result<T> {
        let kind = self.with_node(ino, |n| n.kind)?;
        if kind == Kind::Dir {
            let fds = self.dir_fds(ino)?;
            f(XTarget::Fd(fds.top().ok_or(Errno::IO)?))
        } else {
            let loc = self.loc(ino)?;
            f(XTarget::At(loc.dir()?, &loc.name))
        }
    }

    /// Record a lookup result in the table and return its attributes.
    fn remember(&self, parent: u64, name: &OsStr, found: Found, count: bool) -> Attr {
        let merged = found.kind == Kind::Dir
            && ((found.upper && !found.lower_dirs.is_empty())
                || (!found.upper && found.lower_dirs.len() > 1));
        let attr = self.attr_of(&found.st, found.ino, merged);
        let fds = found.fds.map(Arc::new);
        let mut nodes = self.nodes.write().unwrap();
        let ino = found.ino;
        match nodes.get_mut(&ino) {
            Some(n) if n.upper && !found.upper && !n.orphan => {
                // Resolved before a concurrent copy-up finished: what the table knows is
                // newer. (An object never goes back from the upper to a lower layer.)
                if count {
                    n.nlookup += 1;
                }
            }
            Some(n) => {
                n.orphan = false;
                if n.parent != parent || n.name != name {
                    let old = (
                        std::mem::replace(&mut n.parent, parent),
                        std::mem::replace(&mut n.name, name.to_owned()),
                    );
                    n.links.retain(|l| !(l.0 == parent && l.1 == name));
                    if n.kind != Kind::Dir && !n.links.contains(&old) {
                        n.links.push(old);
                    }
                }
                n.kind = found.kind;
                n.upper = found.upper;
                n.lower = found.lower;
                n.lower_dirs = found.lower_dirs.into();
                if let Some(f) = fds {
                    let cost = f.count() as i64;
                    if self.fd_budget.fetch_sub(cost, Ordering::Relaxed) >= cost {
                        if let Some(old) = n.fds.replace(f) {
                            self.fd_budget.fetch_add(old.count() as i64, Ordering::Relaxed);
                        }
                    } else {
                        self.fd_budget.fetch_add(cost, Ordering::Relaxed);
                        if let Some(old) = n.fds.take() {
                            self.fd_budget.fetch_add(old.count() as i64, Ordering::Relaxed);
                        }
                    }
                }
                if count {
                    n.nlookup += 1;
                }
            }
            None => {
                let fds = fds.and_then(|f| {
                    let cost = f.count() as i64;
                    if self.fd_budget.fetch_sub(cost, Ordering::Relaxed) >= cost {
                        Some(f)
                    } else {
                        self.fd_budget.fetch_add(cost, Ordering::Relaxed);
                        None
                    }
                });
                nodes.insert(
                    ino,
                    Node {
                        parent,
                        name: name.to_owned(),
                        links: Vec::new(),
                        kind: found.kind,
                        upper: found.upper,
                        lower: found.lower,
                        lower_dirs: found.lower_dirs.into(),
                        nlookup: count as u64,
                        fds,
                        orphan: false,
                    },
                );
            }
        }
        attr
    }

    /// The upper object `f` lost a name: once its last link is gone its inode number may be
    /// reused by the filesystem, so the cached number must go.
    fn drop_cached(&self, f: &Found) {
        if f.upper && (f.kind == Kind::Dir || f.st.st_nlink <= 1) {
            self.origins.write().unwrap().remove(&(f.st.st_dev, f.st.st_ino));
        }
    }

    /// A name went away (unlink, rmdir, rename over it).
    fn forget_name(&self, ino: u64, parent: u64, name: &OsStr) {
        let mut nodes = self.nodes.write().unwrap();
        if let Some(n) = nodes.get_mut(&ino) {
            if n.parent == parent && n.name == name {
                match n.links.pop() {
                    Some(next) => {
                        n.parent = next.0;
                        n.name = next.1;
                    }
                    None => n.orphan = true,
                }
            } else {
                n.links.retain(|l| !(l.0 == parent && l.1 == name));
            }
        }
    }

    // ----- lookup --------------------------------------------------------------------

    /// Resolve `name` in directory `parent` across the layers, without touching the table.
    pub(crate) fn resolve(&self, parent: u64, name: &OsStr) -> Result<Found> {
        if name.as_bytes().contains(&b'/') || name.is_empty() {
            return Err(Errno::INVAL);
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
                    let kind = Kind::from_mode(st.st_mode);
                    return Ok(Found {
                        kind,
                        upper: true,
                        lower: None,
                        lower_dirs: vec![],
                        st,
                        ino,
                        fds: None,
                    });
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
                        return Ok(Found {
                            kind,
                            upper: true,
                            lower: None,
                            lower_dirs: vec![],
                            st,
                            ino,
                            fds: None,
                        });
                    }
                    let opaque = whiteout::upper_is_opaque_in(t, &xnames, self.ns);
                    let ufd_child = sys::open_dir_beneath(ufd, name)?;
                    let f = Found {
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
                    };
                    if opaque {
                        return Ok(f);
                    }
                    found = Some(f);
                }
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
        }
        // AUFS markers in lower layers are bookkeeping, never visible names.
        if !whiteout::is_aufs_marker(name) {
            for &l in lower_dirs.iter() {
                let Some(dfd) = pfds.lower(l) else { continue };
                match sys::stat_at(dfd, name) {
                    Ok(st) if whiteout::is_whiteout(&st) => break,
                    Ok(st) => {
                        let kind = Kind::from_mode(st.st_mode);
                        match &mut found {
                            None if kind != Kind::Dir => {
                                let ino = self.map_ino(st.st_dev, st.st_ino);
                                found = Some(Found {
                                    kind,
                                    upper: false,
                                    lower: Some(l),
                                    lower_dirs: vec![],
                                    st,
                                    ino,
                                    fds: None,
                                });
                                break;
                            }
                            None => {
                                let cfd = sys::open_dir_beneath(dfd, name)?;
                                let opaque = whiteout::lower_is_opaque(cfd.as_fd());
                                let ino = self.map_ino(st.st_dev, st.st_ino);
                                found = Some(Found {
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
                                });
                                if opaque {
                                    break;
                                }
                            }
                            Some(f) => {
                                // Below a directory only directories merge; anything else ends it.
                                if kind != Kind::Dir {
                                    break;
                                }
                                let cfd = sys::open_dir_beneath(dfd, name)?;
                                let opaque = whiteout::lower_is_opaque(cfd.as_fd());
                                f.lower_dirs.push(l);
                                if let Some(fds) = &mut f.fds {
                                    fds.lowers.push((l, Arc::new(cfd)));
                                }
                                if opaque {
                                    break;
                                }
                            }
                        }
                    }
                    Err(Errno::NOENT) => {
                        if sys::stat_at(dfd, &whiteout::aufs_name(name)).is_ok() {
                            break;
                        }
                    }
                    Err(Errno::NAMETOOLONG) if found.is_none() => return Err(Errno::NAMETOOLONG),
                    Err(Errno::NAMETOOLONG) => break,
                    Err(e) => return Err(e),
                }
            }
        }
        found.ok_or(Errno::NOENT)
    }

    fn check_supported(&self, xnames: &[Vec<u8>], name: &OsStr) -> Result<()> {
        for x in xnames {
            if *x == self.ns.name("redirect").as_bytes() || *x == self.ns.name("metacopy").as_bytes() {
                log::error!(
                    "'{}' in the upper carries {}: strata follows neither redirects nor metacopy",
                    name.to_string_lossy(),
                    String::from_utf8_lossy(x)
                );
                return Err(Errno::IO);
            }
        }
        Ok(())
    }

    /// The reported inode number of an upper object with an origin xattr: its origin's.
    fn origin_ino(&self, t: XTarget<'_>, xnames: &[Vec<u8>], dev: u64, ino: u64) -> Option<u64> {
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
        let found = self.resolve(parent, name)?;
        Ok(self.remember(parent, name, found, true))
    }

    /// The caller drops `n` references.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut nodes = self.nodes.write().unwrap();
        if let Some(node) = nodes.get_mut(&ino) {
            node.nlookup = node.nlookup.saturating_sub(n);
            if node.nlookup == 0 {
                if let Some(old) = nodes.remove(&ino).and_then(|n| n.fds) {
                    self.fd_budget.fetch_add(old.count() as i64, Ordering::Relaxed);
                }
            }
        }
    }

    /// Attributes of a node (through an open handle when given, which also works after the
    /// last name is gone).
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr> {
        if let Some(fh) = fh {
            if let Some(fd) = self.files.read().unwrap().get(&fh).cloned() {
                let st = rustix::fs::fstat(&fd)?;
                return Ok(self.attr_of(&st, ino, false));
            }
        }
        let (kind, upper, nlower) = self.with_node(ino, |n| (n.kind, n.upper, n.lower_dirs.len()))?;
        if kind == Kind::Dir {
            let fds = self.dir_fds(ino)?;
            let st = rustix::fs::fstat(fds.top().ok_or(Errno::IO)?)?;
            let merged = (upper && nlower > 0) || (!upper && nlower > 1);
            return Ok(self.attr_of(&st, ino, merged));
        }
        let loc = self.loc(ino)?;
        let st = sys::stat_at(loc.dir()?, &loc.name)?;
        Ok(self.attr_of(&st, ino, false))
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let loc = self.loc(ino)?;
        if loc.kind != Kind::Symlink {
            return Err(Errno::INVAL);
        }
        Ok(rustix::fs::readlinkat(loc.dir()?, &loc.name, Vec::new())?.into_bytes())
    }

    // ----- creating ------------------------------------------------------------------

    /// Is there something in a lower layer at `name` that a deletion must keep hidden?
    fn lower_positive(&self, parent: u64, name: &OsStr) -> Result<bool> {
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

    /// Owner and mode of a new object: the caller owns it; a setgid parent gives its group.
    fn own(
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
    fn own_new(
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
    fn remember_new(&self, parent: u64, name: &OsStr, st: rustix::fs::Stat) -> Attr {
        let ino = self.map_ino(st.st_dev, st.st_ino);
        self.origins.write().unwrap().insert((st.st_dev, st.st_ino), ino);
        let found = Found {
            kind: Kind::from_mode(st.st_mode),
            upper: true,
            lower: None,
            lower_dirs: vec![],
            st,
            ino,
            fds: None,
        };
        self.remember(parent, name, found, true)
    }

    /// Create a new object `name` in `parent` with `make(dir, name)`, replacing an upper
    /// whiteout atomically, and making a new directory opaque where lower content exists.
    fn create_with(
        &self,
        parent: u64,
        name: &OsStr,
        who: Caller,
        kind: Kind,
        mode: u32,
        make: impl Fn(BorrowedFd<'_>, &OsStr) -> Result<Option<OwnedFd>>,
    ) -> Result<(Attr, Option<OwnedFd>)> {
        let up = self.upper()?;
        if name.as_bytes().contains(&b'/') {
            return Err(Errno::INVAL);
        }
        self.copy_up(parent)?;
        let pfds = self.dir_fds(parent)?;
        let ufd = pfds.upper().ok_or(Errno::IO)?;
        let opaque = kind == Kind::Dir && self.lower_positive(parent, name)?;
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
                            let _ = layers::remove_tree_at(&pfds.upper.clone().unwrap(), name);
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
        let work = up.work.as_fd();
        let tmp = self.tmp_name();
        let fd = make(work, &tmp)?;
        let placed = (|| {
            if opaque {
                let d = sys::open_dir_beneath(work, &tmp)?;
                whiteout::set_opaque(XTarget::Fd(d.as_fd()), self.ns)?;
            }
            self.own(work, &tmp, who, &pst, Some(mode))?;
            if over_whiteout {
                if kind == Kind::Dir {
                    rustix::fs::renameat_with(work, &tmp, ufd, name, RenameFlags::EXCHANGE)?;
                    rustix::fs::unlinkat(work, &tmp, AtFlags::empty())?;
                } else {
                    rustix::fs::renameat(work, &tmp, ufd, name)?;
                }
            } else {
                rustix::fs::renameat_with(work, &tmp, ufd, name, RenameFlags::NOREPLACE)?;
            }
            Ok(())
        })();
        if let Err(e) = placed {
            let _ = layers::remove_tree_at(&up.work, &tmp);
            return Err(e);
        }
        let attr = self.lookup(parent, name)?;
        Ok((attr, fd))
    }

    /// mknod: regular files, FIFOs, sockets and device nodes.
    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u64, who: Caller) -> Result<Attr> {
        let ft = FileType::from_raw_mode(mode);
        let kind = Kind::from_mode(mode);
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
        Ok((attr, self.add_file(fd)))
    }

    /// link: a new name for an existing object.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        let up = self.upper()?;
        if self.with_node(ino, |n| n.kind)? == Kind::Dir {
            return Err(Errno::PERM);
        }
        self.copy_up(ino)?;
        self.copy_up(newparent)?;
        let loc = self.loc(ino)?;
        let src = loc.pfds.upper().ok_or(Errno::IO)?;
        let npfds = self.dir_fds(newparent)?;
        let nfd = npfds.upper().ok_or(Errno::IO)?;
        match sys::stat_at(nfd, newname) {
            Ok(st) if whiteout::is_whiteout(&st) => {
                let tmp = self.tmp_name();
                rustix::fs::linkat(src, &loc.name, &up.work, &tmp, AtFlags::empty())?;
                if let Err(e) = rustix::fs::renameat(&up.work, &tmp, nfd, newname) {
                    let _ = rustix::fs::unlinkat(&up.work, &tmp, AtFlags::empty());
                    return Err(e);
                }
            }
            Ok(_) => return Err(Errno::EXIST),
            Err(Errno::NOENT) => rustix::fs::linkat(src, &loc.name, nfd, newname, AtFlags::empty())?,
            Err(e) => return Err(e),
        }
        self.lookup(newparent, newname)
    }

    // ----- removing ------------------------------------------------------------------

    /// unlink: remove a non-directory. A lower object gets a whiteout and is never copied up.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let up = self.upper()?;
        let found = self.resolve(parent, name)?;
        if found.kind == Kind::Dir {
            return Err(Errno::ISDIR);
        }
        self.copy_up(parent)?;
        let pfds = self.dir_fds(parent)?;
        let ufd = pfds.upper().ok_or(Errno::IO)?;
        if found.upper {
            if self.lower_positive(parent, name)? {
                let tmp = self.tmp_name();
                whiteout::make_whiteout(up.work.as_fd(), &tmp)?;
                if let Err(e) = rustix::fs::renameat(&up.work, &tmp, ufd, name) {
                    let _ = rustix::fs::unlinkat(&up.work, &tmp, AtFlags::empty());
                    return Err(e);
                }
            } else {
                rustix::fs::unlinkat(ufd, name, AtFlags::empty())?;
            }
        } else {
            whiteout::make_whiteout(ufd, name)?;
        }
        self.drop_cached(&found);
        self.forget_name(found.ino, parent, name);
        Ok(())
    }

    /// rmdir: the merged directory must be empty; whiteouts inside the upper go with it.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let up = self.upper()?;
        let found = self.resolve(parent, name)?;
        if found.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        {
            let fds = found.fds.as_ref().ok_or(Errno::IO)?;
            if !self.read_merged(fds, &found.lower_dirs, false)?.is_empty() {
                return Err(Errno::NOTEMPTY);
            }
        }
        self.copy_up(parent)?;
        let pfds = self.dir_fds(parent)?;
        let ufd = pfds.upper().ok_or(Errno::IO)?;
        if found.upper {
            if self.lower_positive(parent, name)? {
                let tmp = self.tmp_name();
                whiteout::make_whiteout(up.work.as_fd(), &tmp)?;
                if let Err(e) = rustix::fs::renameat_with(&up.work, &tmp, ufd, name, RenameFlags::EXCHANGE) {
                    let _ = rustix::fs::unlinkat(&up.work, &tmp, AtFlags::empty());
                    return Err(e);
                }
                layers::remove_tree_at(&up.work, &tmp)?;
            } else {
                let d = sys::open_dir_beneath(ufd, name)?;
                layers::remove_children(&d)?;
                rustix::fs::unlinkat(ufd, name, AtFlags::REMOVEDIR)?;
            }
        } else {
            whiteout::make_whiteout(ufd, name)?;
        }
        self.drop_cached(&found);
        self.forget_name(found.ino, parent, name);
        Ok(())
    }

    /// rename, with RENAME_NOREPLACE and RENAME_EXCHANGE. A directory that has lower
    /// content cannot move (EXDEV, as the kernel without redirect_dir).
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        self.upper()?;
        let rf = RenameFlags::from_bits(flags).ok_or(Errno::INVAL)?;
        if rf.intersects(!(RenameFlags::NOREPLACE | RenameFlags::EXCHANGE))
            || rf.contains(RenameFlags::NOREPLACE | RenameFlags::EXCHANGE)
        {
            return Err(Errno::INVAL);
        }
        let exchange = rf.contains(RenameFlags::EXCHANGE);
        let src = self.resolve(parent, name)?;
        let dst = match self.resolve(newparent, newname) {
            Ok(f) => Some(f),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(e),
        };
        if parent == newparent && name == newname {
            return Ok(());
        }
        let movable = |f: &Found| f.kind != Kind::Dir || (f.upper && f.lower_dirs.is_empty());
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
                    (true, true) => {
                        let fds = d.fds.as_ref().ok_or(Errno::IO)?;
                        if !self.read_merged(fds, &d.lower_dirs, false)?.is_empty() {
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
        let ofds = self.dir_fds(parent)?;
        let nfds = self.dir_fds(newparent)?;
        let ofd = ofds.upper().ok_or(Errno::IO)?;
        let nfd = nfds.upper().ok_or(Errno::IO)?;
        let src_lower = self.lower_positive(parent, name)?;
        let dst_lower = self.lower_positive(newparent, newname)?;
        let old_merged = !self.with_node(parent, |n| n.lower_dirs.is_empty())?;
        let new_merged = !self.with_node(newparent, |n| n.lower_dirs.is_empty())?;
        if exchange {
            rustix::fs::renameat_with(ofd, name, nfd, newname, RenameFlags::EXCHANGE)?;
            // As the kernel: a pure-upper directory moved into a merged directory becomes
            // opaque, so lower content that appears there later stays hidden.
            if src.kind == Kind::Dir && (dst_lower || new_merged) {
                whiteout::set_opaque(XTarget::At(nfd, newname), self.ns)?;
            }
            if dst.as_ref().is_some_and(|d| d.kind == Kind::Dir) && (src_lower || old_merged) {
                whiteout::set_opaque(XTarget::At(ofd, name), self.ns)?;
            }
        } else {
            match sys::stat_at(nfd, newname) {
                Ok(st) if whiteout::is_whiteout(&st) && src.kind == Kind::Dir => {
                    // A directory cannot replace a character device: drop the whiteout;
                    // the moved directory becomes opaque below.
                    rustix::fs::unlinkat(nfd, newname, AtFlags::empty())?;
                }
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                    // Merged-empty: only whiteouts remain inside, which must go first.
                    let d = sys::open_dir_beneath(nfd, newname)?;
                    layers::remove_children(&d)?;
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
                    whiteout::make_whiteout(ofd, name)?;
                }
                Err(e) => return Err(e),
            }
            if src.kind == Kind::Dir && (dst_lower || new_merged) {
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
            }
        }
        self.rename_node(src.ino, parent, name, newparent, newname);
        Ok(())
    }

    fn is_ancestor(&self, anc: u64, mut ino: u64) -> Result<bool> {
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

    fn rename_node(&self, ino: u64, op: u64, on: &OsStr, np: u64, nn: &OsStr) {
        let mut nodes = self.nodes.write().unwrap();
        if let Some(n) = nodes.get_mut(&ino) {
            if n.parent == op && n.name == on {
                n.parent = np;
                n.name = nn.to_owned();
            } else {
                n.links.retain(|l| !(l.0 == op && l.1 == on));
                n.links.push((np, nn.to_owned()));
            }
        }
    }

    // ----- attributes ----------------------------------------------------------------

    /// The upper object of a node as (directory fd, name); the root is (its fd, ".").
    fn upper_at(&self, ino: u64) -> Result<(Arc<OwnedFd>, OsString)> {
        if ino == ROOT {
            let f = self.dir_fds(ROOT)?;
            return Ok((f.upper.clone().ok_or(Errno::ROFS)?, OsString::from(".")));
        }
        let (kind, parent, name, orphan) =
            self.with_node(ino, |n| (n.kind, n.parent, n.name.clone(), n.orphan))?;
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
        if self.with_node(ino, |n| n.orphan)? {
            // Unlinked but open: only the open file itself can be changed.
            let fd = sa
                .fh
                .and_then(|fh| self.files.read().unwrap().get(&fh).cloned())
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
        let (dfd, name) = self.upper_at(ino)?;
        let d = dfd.as_fd();
        if sa.uid.is_some() || sa.gid.is_some() {
            rustix::fs::chownat(
                d,
                &name,
                sa.uid.map(rustix::fs::Uid::from_raw),
                sa.gid.map(rustix::fs::Gid::from_raw),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
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
            let via_fh = sa.fh.and_then(|fh| self.files.read().unwrap().get(&fh).cloned());
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
        self.getattr(ino, None)
    }

    fn setattr_fd(&self, ino: u64, fd: &OwnedFd, sa: &SetAttr) -> Result<Attr> {
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

    // ----- files ---------------------------------------------------------------------

    fn add_file(&self, fd: OwnedFd) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.write().unwrap().insert(fh, Arc::new(fd));
        fh
    }

    fn file(&self, fh: u64) -> Result<Arc<OwnedFd>> {
        self.files.read().unwrap().get(&fh).cloned().ok_or(Errno::BADF)
    }

    /// open: a write (or O_TRUNC) open copies up first; O_TRUNC copies no data.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        let acc = flags & libc::O_ACCMODE;
        let trunc = flags & libc::O_TRUNC != 0;
        let write = acc != libc::O_RDONLY || trunc;
        let kind = self.with_node(ino, |n| n.kind)?;
        if kind == Kind::Dir {
            return Err(Errno::ISDIR);
        }
        if write {
            self.upper()?;
            if trunc {
                self.copy_up_limited(ino, Some(0))?;
            } else {
                self.copy_up(ino)?;
            }
        }
        let loc = self.loc(ino)?;
        let fd = sys::open_beneath(
            loc.dir()?,
            &loc.name,
            open_flags(flags) | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        Ok(self.add_file(fd))
    }

    /// read from an open file.
    pub fn read(&self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let fd = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match rustix::io::pread(&*fd, &mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// write to an open file. With `kill_suidgid` (an unprivileged writer, as the kernel
    /// judged) setuid and group-executable setgid bits go, as a local write would drop them;
    /// strata writes as root, which the underlying filesystem would let keep them.
    pub fn write(&self, fh: u64, off: u64, data: &[u8], kill_suidgid: bool) -> Result<u32> {
        let fd = self.file(fh)?;
        if kill_suidgid {
            let st = rustix::fs::fstat(&*fd)?;
            let mut m = st.st_mode & 0o7777;
            m &= !libc::S_ISUID;
            if m & libc::S_IXGRP != 0 {
                m &= !libc::S_ISGID;
            }
            if m != st.st_mode & 0o7777 {
                rustix::fs::fchmod(&*fd, Mode::from_raw_mode(m))?;
            }
        }
        sys::write_all_at(fd.as_fd(), data, off)?;
        Ok(data.len() as u32)
    }

    /// Close an open file.
    pub fn release(&self, fh: u64) {
        self.files.write().unwrap().remove(&fh);
    }

    /// fsync / fdatasync (no-ops on a volatile mount).
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let fd = self.file(fh)?;
        if self.volatile {
            return Ok(());
        }
        if datasync {
            rustix::fs::fdatasync(&*fd)
        } else {
            rustix::fs::fsync(&*fd)
        }
    }

    /// fsync of a directory: only the upper holds changes.
    pub fn fsyncdir(&self, ino: u64) -> Result<()> {
        if self.volatile || self.upper.is_none() {
            return Ok(());
        }
        let fds = self.dir_fds(ino)?;
        match fds.upper() {
            Some(u) => match sys::open_dir_beneath(u, ".") {
                Ok(d) => rustix::fs::fsync(&d),
                Err(e) => Err(e),
            },
            None => Ok(()),
        }
    }

    /// fallocate on an open file.
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        let fd = self.file(fh)?;
        rustix::fs::fallocate(
            &*fd,
            rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
            off,
            len,
        )
    }

    /// lseek (SEEK_DATA / SEEK_HOLE reach the filesystem; the rest the kernel does itself).
    pub fn lseek(&self, fh: u64, off: i64, whence: i32) -> Result<i64> {
        let fd = self.file(fh)?;
        let pos = match whence {
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(off as u64),
            libc::SEEK_CUR => rustix::fs::SeekFrom::Current(off),
            libc::SEEK_END => rustix::fs::SeekFrom::End(off),
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(off as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(off as u64),
            _ => return Err(Errno::INVAL),
        };
        rustix::fs::seek(&*fd, pos).map(|p| p as i64)
    }

    /// copy_file_range between two open files, done by the underlying filesystem.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u32> {
        let (a, b) = (self.file(fh_in)?, self.file(fh_out)?);
        let (mut oi, mut oo) = (off_in, off_out);
        let n =
            rustix::fs::copy_file_range(&*a, Some(&mut oi), &*b, Some(&mut oo), len.min(1 << 30) as usize)?;
        Ok(n as u32)
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

    // ----- xattrs --------------------------------------------------------------------

    /// The name an xattr is stored under. Like the kernel since 6.7, names in the private
    /// namespace are escaped (`trusted.overlay.X` is kept as `trusted.overlay.overlay.X`),
    /// so an overlay can be the lower layer of another one.
    fn stored_xattr_name(&self, name: &OsStr) -> OsString {
        let p = self.ns.prefix().as_bytes();
        match name.as_bytes().strip_prefix(p) {
            Some(rest) => {
                let mut v = p.to_vec();
                v.extend_from_slice(b"overlay.");
                v.extend_from_slice(rest);
                OsString::from_vec(v)
            }
            None => name.to_owned(),
        }
    }

    /// getxattr.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>> {
        let real = self.stored_xattr_name(name);
        self.with_target(ino, |t| sys::getxattr(t, &real))
    }

    /// listxattr: overlay bookkeeping hidden, escaped names shown unescaped.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let names = self.with_target(ino, sys::listxattr)?;
        let p = self.ns.prefix().as_bytes();
        let mut out = Vec::new();
        for n in names {
            match n.strip_prefix(p) {
                Some(rest) => match rest.strip_prefix(b"overlay.") {
                    Some(user) => {
                        out.extend_from_slice(p);
                        out.extend_from_slice(user);
                    }
                    None => continue,
                },
                None => out.extend_from_slice(&n),
            }
            out.push(0);
        }
        Ok(out)
    }

    /// setxattr: copies up first.
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.upper()?;
        let real = self.stored_xattr_name(name);
        self.copy_up(ino)?;
        self.with_target(ino, |t| sys::setxattr(t, &real, value, flags))
    }

    /// removexattr: copies up first, unless the attribute does not exist at all.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        self.upper()?;
        let real = self.stored_xattr_name(name);
        if !self.with_node(ino, |n| n.upper)? {
            self.with_target(ino, |t| sys::getxattr(t, &real))?;
            self.copy_up(ino)?;
        }
        self.with_target(ino, |t| sys::removexattr(t, &real))
    }

    // ----- directories ---------------------------------------------------------------

    /// opendir: take a snapshot of the merged listing, so offsets stay stable.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let (kind, parent, lower_dirs) = self.with_node(ino, |n| (n.kind, n.parent, n.lower_dirs.clone()))?;
        if kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let fds = self.dir_fds(ino)?;
        let mut entries = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: parent,
                kind: Kind::Dir,
                name: "..".into(),
            },
        ];
        entries.extend(self.read_merged(&fds, &lower_dirs, true)?);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().unwrap().insert(fh, Arc::new(entries));
        Ok(fh)
    }

    /// The snapshot behind a directory handle.
    pub fn readdir(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>> {
        self.dirs.lock().unwrap().get(&fh).cloned().ok_or(Errno::BADF)
    }

    /// Close a directory handle.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().unwrap().remove(&fh);
    }
}

/// Flags for opening the real file on behalf of the user. O_APPEND is dropped because the
/// kernel passes explicit offsets; O_DIRECT would need aligned buffers; creation flags are
/// handled by the caller.
fn open_flags(flags: i32) -> OFlags {
    let keep = libc::O_ACCMODE | libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC | libc::O_LARGEFILE;
    OFlags::from_bits_retain((flags & keep) as u32)
}
