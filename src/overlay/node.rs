//! Inode table entries and the directory fds they may hold.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use rustix::io::Errno;

use super::Kind;
use crate::sys;

/// Open fds of every real directory merged into one directory: the upper one (if it exists
/// there) and each contributing lower layer's. They follow renames of the upper directory,
/// so a cached set never goes stale.
#[derive(Debug, Default, Clone)]
pub(crate) struct DirFds {
    pub upper: Option<Arc<OwnedFd>>,
    pub lowers: Vec<(u16, Arc<OwnedFd>)>,
}

impl DirFds {
    pub fn upper(&self) -> Option<BorrowedFd<'_>> {
        self.upper.as_ref().map(|f| f.as_fd())
    }
    pub fn lower(&self, l: u16) -> Option<BorrowedFd<'_>> {
        self.lowers.iter().find(|(i, _)| *i == l).map(|(_, f)| f.as_fd())
    }
    /// The topmost real directory: whose attributes the merged directory shows.
    pub fn top(&self) -> Option<BorrowedFd<'_>> {
        self.upper()
            .or_else(|| self.lowers.first().map(|(_, f)| f.as_fd()))
    }
    pub fn count(&self) -> usize {
        self.upper.is_some() as usize + self.lowers.len()
    }
    /// Open the fds of child directory `name` from its parent's.
    pub fn open_child(
        parent: &DirFds,
        name: &OsStr,
        upper: bool,
        lower_dirs: &[u16],
    ) -> Result<DirFds, Errno> {
        let upper = if upper {
            let p = parent.upper().ok_or(Errno::IO)?;
            Some(Arc::new(sys::open_dir_beneath(p, name)?))
        } else {
            None
        };
        let mut lowers = Vec::with_capacity(lower_dirs.len());
        for &l in lower_dirs {
            let p = parent.lower(l).ok_or(Errno::IO)?;
            lowers.push((l, Arc::new(sys::open_dir_beneath(p, name)?)));
        }
        Ok(DirFds { upper, lowers })
    }
}

/// One merged object the kernel knows about. Keyed in the table by its inode number.
#[derive(Debug)]
pub(crate) struct Node {
    /// Directory it was last seen in, and its name there.
    pub parent: u64,
    pub name: Name,
    /// Further names of a hard-linked object.
    pub links: Links,
    pub kind: Kind,
    /// Exists in the upper layer.
    pub upper: bool,
    /// Non-directory still in a lower layer: which one.
    pub lower: Option<u16>,
    /// Directory: the lower layers merged into it, top first.
    pub lower_dirs: Arc<[u16]>,
    /// References the kernel holds (FUSE lookup count; the kernel's count is 64-bit,
    /// but four billion lookups without a forget do not happen).
    pub nlookup: u32,
    /// Cached directory fds (within the fd budget).
    pub fds: Option<Arc<DirFds>>,
    /// Its last name is gone (unlinked while open): operations by name must not touch
    /// whatever takes that name next.
    pub orphan: bool,
    /// The object is known to carry no xattrs at all, so getxattr answers ENODATA without
    /// a syscall (`ls -l` asks two or three names per file). Cleared by anything that may
    /// add one: setxattr, setattr, copy-up, a new resolve.
    pub no_xattrs: bool,
    /// Directory: layer probes its lookups have cost without an index (see `index`).
    pub probes: u16,
    /// Directory whose lower directories were found through a redirect: its fds are
    /// reopened by resolving it again, not by name from its parent's.
    pub redirected: bool,
}

/// How many more directory fds the table may keep open: half of what RLIMIT_NOFILE leaves
/// after a reserve for open files. Every cached `DirFds` is paid for here.
#[derive(Debug)]
pub(crate) struct FdBudget(AtomicI64, i64);

impl FdBudget {
    pub fn new(n: i64) -> FdBudget {
        FdBudget(AtomicI64::new(n), n)
    }
    /// Could `n` fds ever fit?
    pub fn could_hold(&self, n: usize) -> bool {
        n as i64 <= self.1
    }
    pub fn take(&self, n: usize) -> bool {
        let n = n as i64;
        if self.0.fetch_sub(n, Ordering::Relaxed) >= n {
            true
        } else {
            self.0.fetch_add(n, Ordering::Relaxed);
            false
        }
    }
    fn give(&self, n: usize) {
        self.0.fetch_add(n as i64, Ordering::Relaxed);
    }
    /// Empty `slot`, paying its fds back.
    pub fn clear(&self, slot: &mut Option<Arc<DirFds>>) {
        if let Some(old) = slot.take() {
            self.give(old.count());
        }
    }
}

/// A node's name: inline up to 22 bytes (nearly every name), else on the heap. 24 bytes
/// either way, and no allocation per node in the common case.
pub(crate) enum Name {
    Inline { len: u8, buf: [u8; 22] },
    Heap(Box<[u8]>),
}

impl std::ops::Deref for Name {
    type Target = OsStr;
    fn deref(&self) -> &OsStr {
        match self {
            Name::Inline { len, buf } => OsStr::from_bytes(&buf[..*len as usize]),
            Name::Heap(b) => OsStr::from_bytes(b),
        }
    }
}

impl From<&OsStr> for Name {
    fn from(s: &OsStr) -> Name {
        let b = s.as_bytes();
        if b.len() <= 22 {
            let mut buf = [0u8; 22];
            buf[..b.len()].copy_from_slice(b);
            Name::Inline {
                len: b.len() as u8,
                buf,
            }
        } else {
            Name::Heap(b.into())
        }
    }
}

impl From<OsString> for Name {
    fn from(s: OsString) -> Name {
        Name::from(s.as_os_str())
    }
}

impl Name {
    pub fn into_os_string(self) -> OsString {
        self.to_os_string()
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// The further names of a hard-linked object: almost always none, so one pointer wide.
// Boxed on purpose: the common case (no further names) then costs one pointer, not three.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
pub(crate) struct Links(Option<Box<Vec<(u64, OsString)>>>);

impl Links {
    pub fn push(&mut self, l: (u64, OsString)) {
        self.0.get_or_insert_with(Default::default).push(l);
    }
    pub fn pop(&mut self) -> Option<(u64, OsString)> {
        let v = self.0.as_mut()?;
        let r = v.pop();
        if v.is_empty() {
            self.0 = None;
        }
        r
    }
    pub fn retain(&mut self, f: impl FnMut(&(u64, OsString)) -> bool) {
        if let Some(v) = &mut self.0 {
            v.retain(f);
            if v.is_empty() {
                self.0 = None;
            }
        }
    }
    pub fn contains(&self, l: &(u64, OsString)) -> bool {
        self.iter().any(|x| x == l)
    }
    pub fn iter(&self) -> std::slice::Iter<'_, (u64, OsString)> {
        self.0.as_deref().map(|v| v.iter()).unwrap_or_default()
    }
}

/// Nodes per slab chunk.
const CHUNK: usize = 1024;

/// The inode table: nodes in fixed-size chunks that never move, found through a small
/// map of inode number -> slot. A plain `HashMap<u64, Node>` would hold 88-byte buckets
/// and, while growing, its old and new tables at once; here growth copies only the
/// 16-byte index buckets.
#[derive(Debug, Default)]
pub(crate) struct NodeTable {
    index: HashMap<u64, u32>,
    chunks: Vec<Vec<Option<Node>>>,
    free: Vec<u32>,
}

impl NodeTable {
    fn slot(&self, i: u32) -> &Option<Node> {
        &self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }
    fn slot_mut(&mut self, i: u32) -> &mut Option<Node> {
        &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }
    pub fn get(&self, ino: &u64) -> Option<&Node> {
        let i = *self.index.get(ino)?;
        self.slot(i).as_ref()
    }
    pub fn get_mut(&mut self, ino: &u64) -> Option<&mut Node> {
        let i = *self.index.get(ino)?;
        self.slot_mut(i).as_mut()
    }
    pub fn insert(&mut self, ino: u64, n: Node) -> Option<Node> {
        if let Some(&i) = self.index.get(&ino) {
            return self.slot_mut(i).replace(n);
        }
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                let used = self.chunks.last().map_or(CHUNK, |c| c.len());
                if used == CHUNK {
                    self.chunks.push(Vec::with_capacity(CHUNK));
                }
                let last = self.chunks.len() - 1;
                self.chunks[last].push(None);
                (last * CHUNK + self.chunks[last].len() - 1) as u32
            }
        };
        *self.slot_mut(i) = Some(n);
        self.index.insert(ino, i);
        None
    }
    pub fn len(&self) -> usize {
        self.index.len()
    }
    pub fn remove(&mut self, ino: &u64) -> Option<Node> {
        let i = self.index.remove(ino)?;
        let n = self.slot_mut(i).take();
        self.free.push(i);
        n
    }
}
