//! Merged directory listings.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustix::io::Errno;

use rustix::fs::FileType;

use super::index::{kind_of, LowerIndex};
use super::node::DirFds;
use super::{whiteout, DirEntry, Kind, Overlay, Result};
use crate::sys::{self, XTarget};

impl Overlay {
    /// The merged entries of a directory (without "." and ".."): upper first, then each
    /// lower layer, with whiteouts (and, in lower layers, AUFS markers) hiding names below.
    /// `idx` is the directory's cached lower index; without one the lower layers are read
    /// into a fresh one.
    /// `with_ino` computes d_ino equal to what lookup reports (costlier for copied-up
    /// entries); an emptiness check does not need it.
    pub(crate) fn read_merged(
        &self,
        fds: &DirFds,
        lower_dirs: &[u16],
        idx: Option<&LowerIndex>,
        with_ino: bool,
    ) -> Result<Vec<DirEntry>> {
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut out = Vec::new();
        if let Some(u) = fds.upper() {
            let merged = !lower_dirs.is_empty();
            let impure =
                with_ino && !merged && sys::getxattr(XTarget::Fd(u), &self.ns.name("impure")).is_ok();
            let udev = self.upper.as_ref().map(|x| x.layer.dev).unwrap_or(0);
            for ent in sys::dir_stream(u)? {
                let ent = ent?;
                let nb = ent.file_name().to_bytes();
                if nb == b"." || nb == b".." {
                    continue;
                }
                let name = OsStr::from_bytes(nb);
                if whiteout::is_aufs_marker(name) {
                    // fuse-overlayfs's markers (see `resolve`): never listed; a `.wh.NAME`
                    // hides NAME below. (An opaque marker was seen by the lookup.)
                    if let Some(t) = whiteout::aufs_target(name) {
                        seen.insert(t.as_bytes().to_vec());
                    }
                    continue;
                }
                let mut ft = ent.file_type();
                if ft == FileType::CharacterDevice || ft == FileType::Unknown {
                    let st = sys::stat_at(u, name)?;
                    if whiteout::is_whiteout(&st) {
                        seen.insert(nb.to_vec());
                        continue;
                    }
                    ft = FileType::from_raw_mode(st.st_mode);
                }
                let Some(kind) = kind_of(ft) else { continue };
                let ino = if with_ino {
                    self.upper_entry_ino(u, name, udev, ent.ino(), merged || impure)
                } else {
                    0
                };
                seen.insert(nb.to_vec());
                out.push(DirEntry {
                    off: 0,
                    ino,
                    kind,
                    name: name.to_owned(),
                });
            }
        }
        // The lower part comes from the lower index: the cached one, or one read now (the
        // index is the one owner of the lower merge rules).
        let built;
        let idx = match idx {
            Some(i) => i,
            None if lower_dirs.is_empty() => return Ok(out),
            None => {
                built = self.build_index(fds, lower_dirs)?;
                &built
            }
        };
        for (n, e) in &idx.names {
            if !seen.contains(&**n) {
                out.push(DirEntry {
                    off: 0,
                    ino: if with_ino { e.ino } else { 0 },
                    kind: e.kind,
                    name: OsStr::from_bytes(n).to_owned(),
                });
            }
        }
        Ok(out)
    }

    /// d_ino of an upper entry: its origin's number where it was copied up.
    fn upper_entry_ino(&self, dir: BorrowedFd<'_>, name: &OsStr, dev: u64, ino: u64, check: bool) -> u64 {
        if let Some(v) = self.origins.read().unwrap().get(&(dev, ino)) {
            return *v;
        }
        if check {
            let t = XTarget::At(dir, name);
            if let Ok(xn) = sys::listxattr(t) {
                if let Some(v) = self.origin_ino(t, &xn, dev, ino) {
                    return v;
                }
            }
        }
        self.map_ino(dev, ino)
    }
}

/// The position cookie of a name (see `DirEntry::off`): a fixed-key hash, above the
/// cookies of "." and "..", below 2^62 so it is a valid signed file offset.
fn cookie(name: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    (h.finish() >> 2) + 3
}

/// A merged listing, ordered by cookie.
type Listing = Arc<Vec<DirEntry>>;

/// Cached listings of directories being read, by directory inode. A listing being computed
/// holds a `Pending` slot with a token no one else has; a change to the directory removes
/// the slot, so a listing computed meanwhile finds its token gone and is not kept.
#[derive(Debug, Default)]
pub(crate) struct Listings {
    slots: HashMap<u64, Slot>,
    next_token: u64,
}

#[derive(Debug)]
enum Slot {
    Pending(u64),
    Ready(Listing),
}

/// See `Overlay::changing`.
pub(crate) struct DirChange<'a>(&'a Overlay, u64);

impl Drop for DirChange<'_> {
    fn drop(&mut self) {
        self.0.dir_changed(self.1);
    }
}

/// Listings kept at most (directories being read at the same time).
const MAX_LISTINGS: usize = 256;

impl Overlay {
    // ----- directories ---------------------------------------------------------------

    /// The merged listing of directory `ino` with "." and "..", ordered by cookie. It is
    /// cached until the directory changes or `listing_done`, so a directory read in many
    /// chunks is merged once.
    pub fn listing(&self, ino: u64) -> Result<Arc<Vec<DirEntry>>> {
        let token = {
            let mut l = self.listings.lock().unwrap();
            if let Some(Slot::Ready(v)) = l.slots.get(&ino) {
                return Ok(v.clone());
            }
            if l.slots.len() >= MAX_LISTINGS {
                // Readers that never reached the end: start over (only caching is lost).
                l.slots.clear();
            }
            l.next_token += 1;
            let t = l.next_token;
            l.slots.insert(ino, Slot::Pending(t));
            t
        };
        let (kind, parent, lower_dirs) = self.with_node(ino, |n| (n.kind, n.parent, n.lower_dirs.clone()))?;
        if kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let fds = self.dir_fds(ino)?;
        // Without an index (it could not be built) the layers are read one by one.
        let idx = self.lower_index(ino, &fds, &lower_dirs, true).unwrap_or(None);
        let mut entries = self.read_merged(&fds, &lower_dirs, idx.as_deref(), true)?;
        for e in entries.iter_mut() {
            e.off = cookie(e.name.as_bytes());
        }
        entries.sort_unstable_by(|a, b| (a.off, &a.name).cmp(&(b.off, &b.name)));
        let mut all = Vec::with_capacity(entries.len() + 2);
        all.push(DirEntry {
            ino,
            off: 1,
            kind: Kind::Dir,
            name: ".".into(),
        });
        all.push(DirEntry {
            ino: parent,
            off: 2,
            kind: Kind::Dir,
            name: "..".into(),
        });
        all.extend(entries);
        let all = Arc::new(all);
        let mut l = self.listings.lock().unwrap();
        if let Some(slot) = l.slots.get_mut(&ino) {
            if matches!(slot, Slot::Pending(t) if *t == token) {
                *slot = Slot::Ready(all.clone());
            }
        }
        Ok(all)
    }

    /// The reader got to the end of the listing of `ino`: it need not be kept.
    pub fn listing_done(&self, ino: u64) {
        let mut l = self.listings.lock().unwrap();
        if let Some(Slot::Ready(_)) = l.slots.get(&ino) {
            l.slots.remove(&ino);
        }
    }

    /// Names in directory `ino` changed (or it is gone): a cached listing, or one being
    /// computed, is stale.
    pub(crate) fn dir_changed(&self, ino: u64) {
        self.listings.lock().unwrap().slots.remove(&ino);
    }

    /// A guard that marks directory `ino` changed when the operation ends, whatever its
    /// outcome (so a listing computed meanwhile is not kept).
    pub(crate) fn changing(&self, ino: u64) -> DirChange<'_> {
        DirChange(self, ino)
    }

    /// opendir: take a snapshot of the merged listing, so offsets stay stable.
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let entries = self.listing(ino)?;
        self.listing_done(ino);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().unwrap().insert(fh, entries);
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
