//! The lower index of a merged directory: what its lower layers hold, read once.
//!
//! Lower layers never change while mounted, so one pass over each lower directory answers
//! every later question about it: a lookup is one hash probe (a miss costs no syscall, a
//! hit one `stat` of the layer that holds the name) instead of a probe of every layer, and
//! a listing reads only the upper again. The upper is never indexed: it changes, and a
//! lookup checks it first anyway.
//!
//! Indexes are built lazily (on a listing, or once lookups in a directory have probed
//! enough layers to pay for one), live in a cache bounded by the number of entries held,
//! and go when their directory is forgotten.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::FileType;

use super::node::DirFds;
use super::{whiteout, Kind, LookupIndex, Overlay, Result};
use crate::sys;

/// Build an index once the layer probes of lookups in a directory cost about what
/// building it does (some five syscalls per layer, plus a base).
const BUILD_LAYER_COST: u32 = 5;
const BUILD_BASE_COST: u32 = 32;
// (probes saturate at 65535, above any threshold for the 500 layers allowed)

/// `Node::probes` of a directory whose index cannot be built (probe it instead).
const NO_INDEX: u16 = u16::MAX;

/// One visible name of the lower layers.
#[derive(Debug)]
pub(crate) struct LowerEnt {
    /// Topmost lower layer holding it.
    pub layer: u16,
    /// Its type there.
    pub kind: Kind,
    /// d_ino as reported (already mapped).
    pub ino: u64,
    /// For a directory: the lower layers below `layer` that hold a directory of the same
    /// name, down to the first whiteout or non-directory. Whether one of them is opaque
    /// (which ends the merge early) is checked at lookup, on the directory itself.
    pub below: Box<[u16]>,
}

/// The visible names of a directory's lower layers.
#[derive(Debug)]
pub(crate) struct LowerIndex {
    /// The layers it was built from (top first).
    pub lower_dirs: Arc<[u16]>,
    pub names: HashMap<Box<[u8]>, LowerEnt>,
}

pub(crate) fn kind_of(ft: FileType) -> Option<Kind> {
    Some(match ft {
        FileType::Directory => Kind::Dir,
        FileType::RegularFile => Kind::File,
        FileType::Symlink => Kind::Symlink,
        FileType::Fifo => Kind::Fifo,
        FileType::Socket => Kind::Socket,
        FileType::BlockDevice => Kind::Block,
        FileType::CharacterDevice => Kind::Char,
        _ => return None,
    })
}

impl LowerIndex {
    /// The layers to look at for `name`, top first, each with whether it holds a
    /// directory there: empty when no lower layer shows it.
    pub fn candidates(&self, name: &OsStr) -> Vec<(u16, bool)> {
        match self.names.get(name.as_bytes()) {
            None => Vec::new(),
            Some(e) => {
                let mut v = Vec::with_capacity(1 + e.below.len());
                v.push((e.layer, e.kind == Kind::Dir));
                v.extend(e.below.iter().map(|&l| (l, true)));
                v
            }
        }
    }
}

/// Indexes by directory inode, bounded by the total number of entries they hold; the
/// oldest go first.
#[derive(Debug, Default)]
pub(crate) struct IndexCache {
    map: HashMap<u64, Arc<LowerIndex>>,
    order: VecDeque<u64>,
    entries: usize,
    limit: usize,
}

impl IndexCache {
    pub fn new(limit: usize) -> IndexCache {
        IndexCache {
            limit,
            ..Default::default()
        }
    }
    fn get(&self, ino: u64, lower_dirs: &[u16]) -> Option<Arc<LowerIndex>> {
        self.map
            .get(&ino)
            .filter(|i| &*i.lower_dirs == lower_dirs)
            .cloned()
    }
    fn insert(&mut self, ino: u64, idx: Arc<LowerIndex>) {
        self.remove(ino);
        self.entries += idx.names.len();
        self.map.insert(ino, idx);
        self.order.push_back(ino);
        while self.entries > self.limit {
            let Some(old) = self.order.pop_front() else { break };
            if old == ino && self.map.len() == 1 {
                // One directory larger than the limit: keep it while it is in use.
                self.order.push_back(old);
                break;
            }
            if let Some(i) = self.map.remove(&old) {
                self.entries -= i.names.len();
            }
        }
        if self.order.len() > 2 * self.map.len() + 64 {
            // Drop the stale inode numbers `remove` left behind.
            let map = &self.map;
            self.order.retain(|i| map.contains_key(i));
        }
    }
    pub fn remove(&mut self, ino: u64) {
        if let Some(i) = self.map.remove(&ino) {
            self.entries -= i.names.len();
        }
    }
}

impl Overlay {
    /// Read the lower directories of a merged directory into an index.
    pub(crate) fn build_index(&self, fds: &DirFds, lower_dirs: &[u16]) -> Result<LowerIndex> {
        let mut names: HashMap<Box<[u8]>, LowerEnt> = HashMap::new();
        // Names whose merge has ended: hidden by a whiteout, or a non-directory was found.
        let mut closed: HashSet<Box<[u8]>> = HashSet::new();
        for &l in lower_dirs.iter() {
            let Some(d) = fds.lower(l) else { continue };
            let dev = self.lowers[l as usize].dev;
            // Whiteouts hide names in the layers below this one only.
            let mut hide: Vec<Box<[u8]>> = Vec::new();
            let mut below: Vec<(Box<[u8]>, bool)> = Vec::new();
            for ent in sys::dir_stream(d)? {
                let ent = ent?;
                let nb = ent.file_name().to_bytes();
                if nb == b"." || nb == b".." || nb == whiteout::OPAQUE_MARKER.as_bytes() {
                    continue;
                }
                let name = OsStr::from_bytes(nb);
                if let Some(t) = whiteout::aufs_target(name) {
                    hide.push(t.as_bytes().into());
                    continue;
                }
                if whiteout::is_aufs_marker(name) || closed.contains(nb) {
                    continue;
                }
                let mut ft = ent.file_type();
                if ft == FileType::CharacterDevice || ft == FileType::Unknown {
                    let st = sys::stat_at(d, name)?;
                    if whiteout::is_whiteout(&st) {
                        hide.push(nb.into());
                        continue;
                    }
                    ft = FileType::from_raw_mode(st.st_mode);
                }
                let Some(kind) = kind_of(ft) else { continue };
                if names.contains_key(nb) {
                    // Seen above, still open: only a directory is.
                    below.push((nb.into(), kind == Kind::Dir));
                } else {
                    names.insert(
                        nb.into(),
                        LowerEnt {
                            layer: l,
                            kind,
                            ino: self.map_ino(dev, ent.ino()),
                            below: Box::new([]),
                        },
                    );
                    if kind != Kind::Dir {
                        closed.insert(nb.into());
                    }
                }
            }
            for (n, dir) in below {
                if dir {
                    if let Some(e) = names.get_mut(&n) {
                        let mut v = std::mem::take(&mut e.below).into_vec();
                        v.push(l);
                        e.below = v.into_boxed_slice();
                    }
                } else {
                    closed.insert(n);
                }
            }
            closed.extend(hide);
        }
        names.shrink_to_fit();
        Ok(LowerIndex {
            lower_dirs: lower_dirs.into(),
            names,
        })
    }

    /// The lower index of directory `ino`, from the cache, or built now when `build`.
    pub(crate) fn lower_index(
        &self,
        ino: u64,
        fds: &DirFds,
        lower_dirs: &super::node::LowerSet,
        build: bool,
    ) -> Result<Option<Arc<LowerIndex>>> {
        if lower_dirs.is_empty() {
            return Ok(None);
        }
        if let Some(i) = self.indexes.lock().unwrap().get(ino, lower_dirs) {
            return Ok(Some(i));
        }
        if !build {
            return Ok(None);
        }
        let idx = match self.build_index(fds, lower_dirs) {
            Ok(i) => Arc::new(i),
            Err(e) => {
                // E.g. a lower directory the daemon may search but not read (an O_PATH
                // fd): lookups probe the layers, which works there, and listings fail
                // as they would have anyway.
                log::debug!("lower index of {ino}: {e}");
                return Err(e);
            }
        };
        log::trace!("lower index of {ino}: {} names", idx.names.len());
        self.indexes.lock().unwrap().insert(ino, idx.clone());
        Ok(Some(idx))
    }

    /// For a lookup in `parent`: its index if it has one, or if the layer probes of the
    /// lookups so far have reached the point where building one pays.
    pub(crate) fn index_for_lookup(
        &self,
        parent: u64,
        fds: &DirFds,
        lower_dirs: &super::node::LowerSet,
    ) -> Result<Option<Arc<LowerIndex>>> {
        if lower_dirs.is_empty() {
            return Ok(None);
        }
        if let Some(i) = self.indexes.lock().unwrap().get(parent, lower_dirs) {
            return Ok(Some(i));
        }
        let threshold = match self.lookup_index {
            LookupIndex::Always => 0,
            LookupIndex::Off => return Ok(None),
            LookupIndex::Auto => BUILD_BASE_COST + BUILD_LAYER_COST * lower_dirs.len() as u32,
        };
        let probes = {
            let mut nodes = self.nodes.write().unwrap();
            match nodes.get_mut(&parent) {
                Some(n) if n.probes == NO_INDEX => return Ok(None),
                Some(n) => {
                    let add = lower_dirs.len().min(u16::MAX as usize) as u16;
                    n.probes = n.probes.saturating_add(add).min(NO_INDEX - 1);
                    n.probes as u32
                }
                None => 0,
            }
        };
        match self.lower_index(parent, fds, lower_dirs, probes >= threshold) {
            Ok(i) => Ok(i),
            Err(_) => {
                // Not readable: probe from now on, without trying again.
                if let Some(n) = self.nodes.write().unwrap().get_mut(&parent) {
                    n.probes = NO_INDEX;
                }
                Ok(None)
            }
        }
    }

    /// The cached index of directory `ino`, if any (never builds one).
    pub(crate) fn cached_index(&self, ino: u64, lower_dirs: &[u16]) -> Option<Arc<LowerIndex>> {
        self.indexes.lock().unwrap().get(ino, lower_dirs)
    }

    /// Directory `ino` is gone from the table: its index goes too.
    pub(crate) fn drop_index(&self, ino: u64) {
        self.indexes.lock().unwrap().remove(ino);
    }
}
