//! Inode table entries and the directory fds they may hold.

use std::ffi::{OsStr, OsString};
use std::hash::BuildHasher;
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

/// A directory's lower layers, top first. A thin pointer (the slice behind a box): one word
/// in every node instead of two; most nodes share the "none" or "every layer" set.
pub(crate) type LowerSet = Arc<Box<[u16]>>;

const NO_LOWER: u16 = u16::MAX;

impl Node {
    /// Non-directory still in a lower layer: which one.
    pub fn lower(&self) -> Option<u16> {
        (self.lower != NO_LOWER).then_some(self.lower)
    }

    pub fn set_lower(&mut self, l: Option<u16>) {
        // Layer indexes stay below 500 (the most layers a mount takes).
        self.lower = l.unwrap_or(NO_LOWER);
    }

    /// Make `parent`/`name` the primary name. The one it replaces stays as a further name if
    /// `keep_old` (a hard link's other name), else it is gone.
    pub fn set_primary(&mut self, parent: u64, name: &OsStr, keep_old: bool) {
        if self.parent == parent && *self.name == *name {
            return;
        }
        let old = (
            std::mem::replace(&mut self.parent, parent),
            self.name.to_os_string(),
        );
        self.name.set(name);
        self.name.retain_links(|l| !(l.0 == parent && l.1 == name));
        if keep_old && !self.name.links().contains(&old) {
            self.name.push_link(old);
        }
    }

    /// A node for an object first seen at `parent`/`name`, with no references yet.
    pub fn new(
        parent: u64,
        name: &OsStr,
        kind: Kind,
        upper: bool,
        lower: Option<u16>,
        lower_dirs: LowerSet,
    ) -> Node {
        Node {
            parent,
            name: name.into(),
            kind,
            upper,
            lower: lower.unwrap_or(NO_LOWER),
            lower_dirs,
            nlookup: 0,
            fds: None,
            orphan: false,
            no_xattrs: false,
            probes: 0,
            redirected: false,
        }
    }
}

/// One merged object the kernel knows about. Keyed in the table by its inode number.
#[derive(Debug)]
pub(crate) struct Node {
    /// Directory it was last seen in, and its name there.
    pub parent: u64,
    /// Further names of a hard-linked object ride in `name` (`Name::links`).
    pub name: Name,
    pub kind: Kind,
    /// Exists in the upper layer.
    pub upper: bool,
    /// Non-directory still in a lower layer: which one (`lower()`; NO_LOWER for none, two
    /// bytes where an Option takes four: the node's size is the daemon's memory).
    lower: u16,
    /// Directory: the lower layers merged into it, top first.
    pub lower_dirs: LowerSet,
    /// References the kernel holds (FUSE lookup count; the kernel's count is 64-bit,
    /// but four billion lookups without a forget do not happen).
    pub nlookup: u32,
    /// Cached directory fds (within the fd budget).
    pub fds: Option<Arc<DirFds>>,
    /// Its last name is gone (unlinked while open): operations by name must not touch
    /// whatever takes that name next.
    pub orphan: bool,
    /// The object is known to carry no xattrs at all, so getxattr answers ENODATA without
    /// a syscall (`ls -l` asks two or three names per file). Cleared by anything of strata's
    /// that may add one: setxattr, removexattr, copy-up, a new resolve (setattr only drops
    /// xattrs). Ones the host adds behind strata's back (IMA/EVM labels) are not seen
    /// once it is set.
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

/// A node's names: its primary name, inline up to 22 bytes (nearly every name) or on the
/// heap, and the further names of a hard-linked object, almost always none. 24 bytes in
/// every case, and no allocation per node in the common one: the links ride in the name's
/// heap variant instead of a pointer of their own in every node (8 bytes a node, 0.8 MB of
/// a 100k-entry walk's peak).
pub(crate) enum Name {
    Inline {
        len: u8,
        buf: [u8; 22],
    },
    Heap(Box<[u8]>),
    /// A name (never itself `Linked`) and at least one further (parent, name).
    Linked(Box<(Name, Vec<(u64, OsString)>)>),
}

impl std::ops::Deref for Name {
    type Target = OsStr;
    fn deref(&self) -> &OsStr {
        match self {
            Name::Inline { len, buf } => OsStr::from_bytes(&buf[..*len as usize]),
            Name::Heap(b) => OsStr::from_bytes(b),
            Name::Linked(b) => &b.0,
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
    /// Change the primary name, keeping the further ones.
    pub fn set(&mut self, s: &OsStr) {
        match self {
            Name::Linked(b) => b.0 = Name::from(s),
            _ => *self = Name::from(s),
        }
    }

    /// The further names (parent, name).
    pub fn links(&self) -> &[(u64, OsString)] {
        match self {
            Name::Linked(b) => &b.1,
            _ => &[],
        }
    }

    pub fn push_link(&mut self, l: (u64, OsString)) {
        match self {
            Name::Linked(b) => b.1.push(l),
            _ => {
                let base = std::mem::replace(self, Name::from(OsStr::new("")));
                *self = Name::Linked(Box::new((base, vec![l])));
            }
        }
    }

    pub fn pop_link(&mut self) -> Option<(u64, OsString)> {
        let Name::Linked(b) = self else { return None };
        let r = b.1.pop();
        self.unlink_if_empty();
        r
    }

    pub fn retain_links(&mut self, f: impl FnMut(&(u64, OsString)) -> bool) {
        if let Name::Linked(b) = self {
            b.1.retain(f);
            self.unlink_if_empty();
        }
    }

    /// Back to the plain form once no further name is left.
    fn unlink_if_empty(&mut self) {
        if matches!(self, Name::Linked(b) if b.1.is_empty()) {
            if let Name::Linked(b) = std::mem::replace(self, Name::from(OsStr::new(""))) {
                *self = b.0;
            }
        }
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)?;
        if !self.links().is_empty() {
            write!(f, " (+{:?})", self.links())?;
        }
        Ok(())
    }
}

/// Nodes per slab chunk.
const CHUNK: usize = 1024;

/// A slab slot: the node and its inode number (what the index hashes and compares).
#[derive(Debug)]
struct Slot {
    ino: u64,
    node: Option<Node>,
}

/// The inode table: nodes in fixed-size chunks that never move, found through an index of
/// slot numbers hashed by inode number. An index bucket is 4 bytes (plus a control byte),
/// not the 16 of a `HashMap<u64, u32>` or the 88 of a `HashMap<u64, Node>`, and growing it
/// copies only those: about 1.5 MB less at 100k nodes.
#[derive(Default)]
pub(crate) struct NodeTable {
    index: hashbrown::HashTable<u32>,
    hasher: std::collections::hash_map::RandomState,
    chunks: Vec<Vec<Slot>>,
    free: Vec<u32>,
}

impl std::fmt::Debug for NodeTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeTable({} nodes)", self.index.len())
    }
}

fn slot_of(chunks: &[Vec<Slot>], i: u32) -> &Slot {
    &chunks[i as usize / CHUNK][i as usize % CHUNK]
}

impl NodeTable {
    fn find(&self, ino: u64) -> Option<u32> {
        self.find_hashed(self.hasher.hash_one(ino), ino)
    }
    fn find_hashed(&self, h: u64, ino: u64) -> Option<u32> {
        self.index
            .find(h, |&i| slot_of(&self.chunks, i).ino == ino)
            .copied()
    }
    fn slot_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }
    pub fn get(&self, ino: &u64) -> Option<&Node> {
        let i = self.find(*ino)?;
        slot_of(&self.chunks, i).node.as_ref()
    }
    pub fn get_mut(&mut self, ino: &u64) -> Option<&mut Node> {
        let i = self.find(*ino)?;
        self.slot_mut(i).node.as_mut()
    }
    pub fn insert(&mut self, ino: u64, n: Node) -> Option<Node> {
        // Hashed once: for the lookup and for the new index entry.
        let h = self.hasher.hash_one(ino);
        if let Some(i) = self.find_hashed(h, ino) {
            return self.slot_mut(i).node.replace(n);
        }
        let slot = Slot { ino, node: Some(n) };
        let i = match self.free.pop() {
            Some(i) => {
                *self.slot_mut(i) = slot;
                i
            }
            None => {
                let used = self.chunks.last().map_or(CHUNK, |c| c.len());
                if used == CHUNK {
                    self.chunks.push(Vec::with_capacity(CHUNK));
                }
                let last = self.chunks.len() - 1;
                self.chunks[last].push(slot);
                (last * CHUNK + self.chunks[last].len() - 1) as u32
            }
        };
        let (chunks, hasher) = (&self.chunks, &self.hasher);
        self.index
            .insert_unique(h, i, |&j| hasher.hash_one(slot_of(chunks, j).ino));
        None
    }
    pub fn len(&self) -> usize {
        self.index.len()
    }
    pub fn remove(&mut self, ino: &u64) -> Option<Node> {
        let h = self.hasher.hash_one(*ino);
        let chunks = &self.chunks;
        let (i, _) = self
            .index
            .find_entry(h, |&i| slot_of(chunks, i).ino == *ino)
            .ok()?
            .remove();
        let n = self.slot_mut(i).node.take();
        self.free.push(i);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(parent: u64) -> Node {
        let mut n = Node::new(
            parent,
            OsStr::new("n"),
            Kind::File,
            false,
            None,
            Arc::new(Box::new([])),
        );
        n.nlookup = 1;
        n
    }

    /// Memory per node is what the daemon's peak RSS is made of (100k nodes in a walk).
    #[test]
    fn node_and_slot_sizes() {
        assert!(
            std::mem::size_of::<Node>() <= 64,
            "{}",
            std::mem::size_of::<Node>()
        );
        assert!(
            std::mem::size_of::<Slot>() <= 72,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }

    /// A name's further names: added, renamed around, removed, and the node back to the
    /// plain form once none is left, for short and long primary names.
    #[test]
    fn names_and_links() {
        for base in ["a", "a-name-longer-than-twenty-two-bytes"] {
            let mut n = node(1);
            n.name = OsStr::new(base).into();
            let is_plain = |n: &Node| !matches!(n.name, Name::Linked(_));
            assert!(is_plain(&n) && n.name.links().is_empty());
            // A second name: the first stays primary.
            n.name.push_link((2, "b".into()));
            assert_eq!(&*n.name, OsStr::new(base));
            assert_eq!(n.name.links(), &[(2, "b".into())]);
            // Make the link primary: the old primary becomes a link, once.
            n.set_primary(2, OsStr::new("b"), true);
            assert_eq!((n.parent, &*n.name), (2, OsStr::new("b")));
            assert_eq!(n.name.links(), &[(1, base.into())]);
            n.set_primary(2, OsStr::new("b"), true);
            assert_eq!(n.name.links().len(), 1);
            // A rename of the primary keeps the link.
            n.name.set(OsStr::new("c"));
            assert_eq!(n.name.links(), &[(1, base.into())]);
            // The primary goes: the link takes its place, and the node is plain again.
            let next = n.name.pop_link().unwrap();
            n.parent = next.0;
            n.name.set(&next.1);
            assert_eq!((n.parent, &*n.name), (1, OsStr::new(base)));
            assert!(is_plain(&n) && n.name.pop_link().is_none());
            // Replacing the primary without keeping it.
            n.name.push_link((3, "d".into()));
            n.set_primary(3, OsStr::new("d"), false);
            assert_eq!(&*n.name, OsStr::new("d"));
            assert!(is_plain(&n), "{:?}", n.name);
            n.name.push_link((4, "e".into()));
            n.name.retain_links(|l| l.0 != 4);
            assert!(is_plain(&n) && &*n.name == OsStr::new("d"));
        }
    }

    /// Inserts, lookups, replacement, removal and slot reuse across index growth, checked
    /// against a plain map.
    #[test]
    fn table_matches_a_map() {
        let mut t = NodeTable::default();
        let mut m = std::collections::HashMap::new();
        // Inode numbers spread like strata's (layer bits high, underlying inode low).
        let ino = |k: u64| (k % 7) << 48 | (k * 2654435761 % 1_000_003);
        for k in 0..5000u64 {
            assert!(t.insert(ino(k), node(k)).is_none());
            m.insert(ino(k), k);
        }
        assert_eq!(t.len(), m.len());
        for k in (0..5000u64).step_by(3) {
            assert_eq!(t.remove(&ino(k)).map(|n| n.parent), Some(k));
            m.remove(&ino(k));
            assert!(t.remove(&ino(k)).is_none(), "removed twice");
        }
        // Replacing keeps one entry; new nodes reuse freed slots.
        assert_eq!(t.insert(ino(1), node(42)).map(|n| n.parent), Some(1));
        m.insert(ino(1), 42);
        for k in 5000..6000u64 {
            t.insert(ino(k), node(k));
            m.insert(ino(k), k);
        }
        assert_eq!(t.len(), m.len());
        // 1667 slots were freed: the 1000 new nodes took freed ones, no chunk grew.
        assert_eq!(t.chunks.iter().map(Vec::len).sum::<usize>(), 5000);
        assert_eq!(t.free.len(), 667);
        for k in 0..6000u64 {
            assert_eq!(
                t.get(&ino(k)).map(|n| n.parent),
                m.get(&ino(k)).copied(),
                "ino of {k}"
            );
        }
        t.get_mut(&ino(2)).unwrap().parent = 7;
        assert_eq!(t.get(&ino(2)).unwrap().parent, 7);
    }
}
