//! The overlay core: layers, inode table, lookup, copy-up, whiteouts, readdir.
//!
//! No FUSE types here: every operation takes plain values and returns `Result<_, Errno>`, so
//! the core is tested on temporary directories without mounting. All methods take `&self`
//! and may run concurrently from the FUSE worker threads; the inode table lock is never held
//! across I/O, and copy-ups of different files do not wait for each other.

mod attr;
mod copyup;
mod create;
mod dir;
mod file;
mod fileattr;
pub mod idmap;
mod index;
mod inodes;
pub mod layers;
mod lookup;
mod node;
mod redirect;
mod remove;
mod rename;
mod staging;
mod types;
pub mod whiteout;
pub mod xattr;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

pub use rustix::io::Errno;

use layers::{Layer, Stack, Upper};
pub use layers::{LookupIndex, OverlayConfig, RedirectDir, SetupError};
use node::{DirFds, FdBudget, Node, NodeTable};
use xattr::XattrNs;

use crate::sys::{self};

/// Paths of the multiply-linked regular files of one layer, by inode number.
type LinkIndex = HashMap<u64, Vec<std::path::PathBuf>>;

/// Result of a core operation: a value or the errno to hand back to the caller.
pub type Result<T> = std::result::Result<T, Errno>;

/// How many lower-index entries are kept in memory at most (about 90 bytes each).
const INDEX_ENTRIES: usize = 8192;

/// Inode number of the root directory (FUSE's FUSE_ROOT_ID).
pub const ROOT: u64 = 1;
/// The number reported for an object whose own number would collide with ROOT.
const ROOT_ALIAS: u64 = u64::MAX - 1;

pub use crate::sys::FileAttrIoctl;
pub use types::{Attr, Caller, DirEntry, Kind, SetAttr, StatFs, TimeSet};

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
    /// A directory whose lower directories were found through a redirect (so they cannot
    /// be reopened by name from its parent's).
    redirected: bool,
}

impl Found {
    /// An object that exists only in the upper layer, with no merged lower directories.
    fn upper_only(st: rustix::fs::Stat, ino: u64) -> Found {
        Found {
            kind: Kind::from_mode(st.st_mode),
            upper: true,
            lower: None,
            lower_dirs: vec![],
            st,
            ino,
            fds: None,
            redirected: false,
        }
    }
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

/// An open handle.
#[derive(Debug)]
struct OpenFile {
    /// Its node.
    ino: u64,
    /// The real file.
    fd: Arc<OwnedFd>,
    /// Where its last big READ ended (0 for none; see `read_plan`).
    end: AtomicU64,
    /// Whether the real file is the upper one (a handle opened before a copy-up moves to
    /// the copy then, see `handles_follow_copy_up`; it keeps the lower file only if that
    /// reopen failed).
    upper: bool,
    /// The lower file opened again with O_DIRECT, once a big READ found its pages
    /// uncached; None inside if that open or a read through it failed (see `read_plan`).
    direct: std::sync::OnceLock<Option<Arc<OwnedFd>>>,
}

/// A removed node the kernel still holds: its topmost real object (the upper one, removed
/// too, or a lower one, which stays), whether that is a lower layer's (which one), and
/// whether it was a merged directory.
#[derive(Debug)]
struct Gone {
    top: Arc<OwnedFd>,
    lower: Option<u16>,
    merged: bool,
}

/// The merged filesystem.
#[derive(Debug)]
pub struct Overlay {
    lowers: Vec<Layer>,
    upper: Option<Upper>,
    ns: XattrNs,
    volatile: bool,
    lookup_index: LookupIndex,
    redirect_dir: RedirectDir,
    ids: idmap::IdMap,
    static_nlink: bool,
    no_selinux: bool,
    /// Some lower layer keeps owners and modes in an override_stat xattr.
    override_stat: bool,
    nodes: RwLock<NodeTable>,
    /// Orders lookups (read: resolve + record) against renames and removals (write: the
    /// change on disk + the table's update), so a lookup racing a rename never records the
    /// old name. Held only around those short sections (never across a copy-up).
    ns_lock: RwLock<()>,
    /// Open files by handle.
    files: RwLock<HashMap<u64, OpenFile>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    listings: Mutex<dir::Listings>,
    next_fh: AtomicU64,
    tmp_seq: AtomicU64,
    /// Bumped by every xattr change (see `xattrs_changed`).
    xattr_epoch: AtomicU64,
    stripes: Vec<Mutex<()>>,
    /// Some(dev) when every layer is on one filesystem: inode numbers pass through.
    single_dev: Option<u64>,
    devs: RwLock<Vec<u64>>,
    /// (upper dev, upper ino) -> reported ino, for upper objects already checked for an
    /// origin (and for overlay xattrs we do not support), or made by us.
    origins: RwLock<HashMap<(u64, u64), u64>>,
    /// Removed directories and special files the kernel still holds (an open fd, a cwd),
    /// for fstat and fchmod (see `object_gone`).
    gone: Mutex<HashMap<u64, Gone>>,
    /// How many more directory fds may be kept open.
    fd_budget: FdBudget,
    /// Nodes with cached fds, oldest first (see `cache_fds`).
    fd_lru: Mutex<std::collections::VecDeque<u64>>,
    /// Per lower layer: inode -> paths, for files with several links (built on demand).
    link_index: Mutex<HashMap<u16, Arc<LinkIndex>>>,
    /// The shared lower-directory sets of `lower_set`.
    no_lowers: node::LowerSet,
    all_lowers: node::LowerSet,
    /// Lower indexes of merged directories.
    indexes: Mutex<index::IndexCache>,
    /// Directories whose attributes changed without a request about them (a copy-up
    /// made for a child): the adapter tells the kernel (`take_stale_attrs`).
    stale_attrs: Mutex<Vec<u64>>,
    any_stale: std::sync::atomic::AtomicBool,
    /// The whiteout that new whiteouts link to (see `put_whiteout`).
    shared_whiteout: Mutex<remove::SharedWhiteout>,
    /// Stand-in node ids (see `remember`). Taken after `nodes` when both are held.
    aliases: RwLock<inodes::Aliases>,
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
        let lowers_len = lowers.len();
        let override_stat = lowers.iter().any(|l| l.override_stat.is_some());
        let ov = Overlay {
            lowers,
            upper,
            ns,
            volatile: cfg.volatile,
            lookup_index: cfg.lookup_index,
            redirect_dir: cfg.redirect_dir,
            ids: cfg.ids.clone(),
            static_nlink: cfg.static_nlink,
            no_selinux: cfg.no_selinux,
            override_stat,
            nodes: RwLock::new(NodeTable::default()),
            ns_lock: RwLock::new(()),
            files: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            listings: Mutex::new(dir::Listings::default()),
            next_fh: AtomicU64::new(1),
            tmp_seq: AtomicU64::new(0),
            xattr_epoch: AtomicU64::new(0),
            stripes: (0..64).map(|_| Mutex::new(())).collect(),
            single_dev,
            devs: RwLock::new(devs),
            origins: RwLock::new(HashMap::new()),
            gone: Mutex::new(HashMap::new()),
            shared_whiteout: Mutex::new(remove::SharedWhiteout::default()),
            // Beyond the layers' own fds and a few more, half the fd limit goes to cached
            // directory fds and half stays for open files and directories opened for one
            // operation.
            fd_budget: FdBudget::new(((limit - lowers_len as i64 - 40) / 2).max(64)),
            fd_lru: Mutex::new(std::collections::VecDeque::new()),
            link_index: Mutex::new(HashMap::new()),
            indexes: Mutex::new(index::IndexCache::new(INDEX_ENTRIES)),
            stale_attrs: Mutex::new(Vec::new()),
            any_stale: std::sync::atomic::AtomicBool::new(false),
            aliases: RwLock::new(inodes::Aliases::default()),
            no_lowers: Arc::new(Box::new([])),
            all_lowers: Arc::new((0..lowers_len as u16).collect()),
        };
        // The root's fds are the layers' own (shared, not duplicated: one fd per layer).
        let root_fds = DirFds {
            upper: ov.upper.as_ref().map(|u| u.layer.fd.clone()),
            lowers: ov
                .lowers
                .iter()
                .enumerate()
                .map(|(i, l)| (i as u16, l.fd.clone()))
                .collect(),
        };
        let mut root = Node::new(
            ROOT,
            OsStr::new(""),
            Kind::Dir,
            ov.upper.is_some(),
            None,
            ov.all_lowers.clone(),
        );
        root.nlookup = 1;
        root.fds = Some(Arc::new(root_fds));
        ov.nodes.write().unwrap().insert(ROOT, root);
        Ok(ov)
    }

    /// Directories whose cached attributes went stale since the last call (see
    /// `stale_attrs`); cheap when there are none.
    pub fn take_stale_attrs(&self) -> Vec<u64> {
        // A load first: the common case (nothing stale) writes no shared cache line.
        if !self.any_stale.load(Ordering::Acquire) || !self.any_stale.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.stale_attrs.lock().unwrap())
    }

    pub(crate) fn attrs_went_stale(&self, ino: u64) {
        self.stale_attrs.lock().unwrap().push(ino);
        self.any_stale.store(true, Ordering::Release);
    }

    /// Does some lower layer keep owners and modes in an override_stat xattr?
    pub(crate) fn any_override_stat(&self) -> bool {
        self.override_stat
    }

    /// The owner and mode a file or directory of lower layer `l` has there: from its
    /// override_stat xattr when the layer keeps them so (`Layer::override_stat`).
    pub(crate) fn lower_stat(&self, l: u16, t: sys::XTarget<'_>, st: &mut rustix::fs::Stat) {
        let Some(name) = self.lowers.get(l as usize).and_then(|x| x.override_stat) else {
            return;
        };
        let ft = st.st_mode & libc::S_IFMT;
        if ft != libc::S_IFREG && ft != libc::S_IFDIR {
            return;
        }
        if let Some((u, g, m)) = sys::getxattr(t, OsStr::new(name))
            .ok()
            .and_then(|v| layers::parse_override_stat(&v))
        {
            st.st_uid = u;
            st.st_gid = g;
            st.st_mode = ft | m;
        }
    }

    /// Is there a writable upper layer?
    pub fn writable(&self) -> bool {
        self.upper.is_some()
    }

    fn upper(&self) -> Result<&Upper> {
        self.upper.as_ref().ok_or(Errno::ROFS)
    }

    /// Whether the upper may hold `.wh.` files (see `Upper::wh_files`).
    fn upper_wh_files(&self) -> bool {
        self.upper.as_ref().is_some_and(|u| u.wh_files)
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
        let (uid, gid) = self.ids.shown(st.st_uid, st.st_gid);
        let merged_dir = merged_dir || (self.static_nlink && kind == Kind::Dir);
        Attr {
            ino,
            st_ino: self.shown_ino(ino),
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
            uid,
            gid,
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
}
