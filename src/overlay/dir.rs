//! Merged directory listings.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustix::io::Errno;

use rustix::fs::FileType;

use super::node::DirFds;
use super::{whiteout, DirEntry, Kind, Overlay, Result};
use crate::sys::{self, XTarget};

fn kind_of(ft: FileType) -> Option<Kind> {
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

impl Overlay {
    /// The merged entries of a directory (without "." and ".."): upper first, then each
    /// lower layer, with whiteouts (and, in lower layers, AUFS markers) hiding names below.
    /// `with_ino` computes d_ino equal to what lookup reports (costlier for copied-up
    /// entries); an emptiness check does not need it.
    pub(crate) fn read_merged(
        &self,
        fds: &DirFds,
        lower_dirs: &[u16],
        with_ino: bool,
    ) -> Result<Vec<DirEntry>> {
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut out = Vec::new();
        if let Some(u) = fds.upper() {
            let merged = !lower_dirs.is_empty();
            let impure =
                with_ino && !merged && sys::getxattr(XTarget::Fd(u), &self.ns.name("impure")).is_ok();
            let udev = self.upper.as_ref().map(|x| x.layer.dev).unwrap_or(0);
            for ent in rustix::fs::Dir::read_from(u)? {
                let ent = ent?;
                let nb = ent.file_name().to_bytes();
                if nb == b"." || nb == b".." {
                    continue;
                }
                let name = OsStr::from_bytes(nb);
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
                    ino,
                    kind,
                    name: name.to_owned(),
                });
            }
        }
        for &l in lower_dirs {
            let Some(d) = fds.lower(l) else { continue };
            let dev = self.lowers[l as usize].dev;
            let mut here = Vec::new();
            for ent in rustix::fs::Dir::read_from(d)? {
                let ent = ent?;
                let nb = ent.file_name().to_bytes();
                if nb == b"." || nb == b".." || nb == whiteout::OPAQUE_MARKER.as_bytes() {
                    continue;
                }
                let name = OsStr::from_bytes(nb);
                if let Some(t) = whiteout::aufs_target(name) {
                    here.push(t.as_bytes().to_vec());
                    continue;
                }
                if whiteout::is_aufs_marker(name) || seen.contains(nb) {
                    continue;
                }
                let mut ft = ent.file_type();
                if ft == FileType::CharacterDevice || ft == FileType::Unknown {
                    let st = sys::stat_at(d, name)?;
                    if whiteout::is_whiteout(&st) {
                        here.push(nb.to_vec());
                        continue;
                    }
                    ft = FileType::from_raw_mode(st.st_mode);
                }
                let Some(kind) = kind_of(ft) else { continue };
                here.push(nb.to_vec());
                let ino = if with_ino { self.map_ino(dev, ent.ino()) } else { 0 };
                out.push(DirEntry {
                    ino,
                    kind,
                    name: name.to_owned(),
                });
            }
            seen.extend(here);
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

impl Overlay {
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
