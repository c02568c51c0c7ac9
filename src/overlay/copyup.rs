//! Copy-up: make a lower object writable by copying it into the upper layer.
//!
//! Parents first; each object is built under `workdir/work` with its data, owner, mode,
//! times and xattrs, then renamed into place, so a crash never leaves a half-copied file
//! visible. Data goes by reflink where possible, else copy_file_range, else read/write.
//! The upper copy records its origin (the kernel's file-handle format) so that st_ino stays
//! the same before and after copy-up and across remounts.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::node::DirFds;
use super::staging::Staged;
use super::{Found, Kind, LinkIndex, Overlay, Result, ROOT};
use crate::sys::{self, FileHandle, XTarget};

/// Encode an origin xattr value in the kernel's `struct ovl_fb` layout.
pub(crate) fn encode_origin(uuid: &[u8; 16], fh: &FileHandle) -> Vec<u8> {
    let len = 21 + fh.bytes.len();
    let mut v = Vec::with_capacity(len);
    // version 0, magic 0xfb, total length, flags (0: little-endian handle), handle type.
    let flags = if cfg!(target_endian = "big") { 1 } else { 0 };
    v.extend_from_slice(&[0, 0xfb, len as u8, flags, fh.kind as u8]);
    v.extend_from_slice(uuid);
    v.extend_from_slice(&fh.bytes);
    v
}

/// Decode an origin xattr value written by the kernel or by us.
pub(crate) fn decode_origin(raw: &[u8]) -> Option<([u8; 16], FileHandle)> {
    if raw.len() < 21 || raw[0] != 0 || raw[1] != 0xfb {
        return None;
    }
    let len = raw[2] as usize;
    if len < 21 || len > raw.len() {
        return None;
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&raw[5..21]);
    Some((
        uuid,
        FileHandle {
            kind: raw[4] as i32,
            bytes: raw[21..len].to_vec(),
        },
    ))
}

fn times_of(st: &rustix::fs::Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// Copy xattrs from `src` to `dst`; the mount's own overlay bookkeeping never travels (other
/// namespaces are ordinary data to it, as to the kernel).
fn copy_xattrs(src: XTarget<'_>, dst: XTarget<'_>, ns: super::xattr::XattrNs) -> Result<()> {
    let names = match sys::listxattr(src) {
        Ok(n) => n,
        Err(Errno::OPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for n in names {
        if ns.is_private(&n) {
            continue;
        }
        let name = OsStr::from_bytes(&n);
        let v = match sys::getxattr(src, name) {
            Ok(v) => v,
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(e),
        };
        if let Err(e) = sys::setxattr(dst, name, &v, 0) {
            // Like the kernel, security labels the upper filesystem refuses are skipped.
            if n.starts_with(b"user.") || n.starts_with(b"trusted.") {
                return Err(e);
            }
            log::warn!("copy-up: xattr {} not copied: {e}", name.to_string_lossy());
        }
    }
    Ok(())
}

/// Work left after copying up one name of a lower hard-link set.
struct LinkSetJob {
    layer: u16,
    lower_ino: u64,
    parent: u64,
    name: OsString,
}

impl Overlay {
    /// Copy a node (and its parents) up, with all its data.
    pub(crate) fn copy_up(&self, ino: u64) -> Result<()> {
        self.copy_up_limited(ino, None)
    }

    /// Make sure the object a resolve found is in the table, then copy it up.
    pub(crate) fn copy_up_ino(&self, parent: u64, name: &OsStr, f: &Found) -> Result<()> {
        if f.upper {
            return Ok(());
        }
        if self.with_node(f.ino, |_| ()).is_err() {
            let _ns = self.ns_lock.read().unwrap();
            let again = self.resolve(parent, name)?;
            self.remember(parent, name, again, false);
        }
        self.copy_up(f.ino)
    }

    /// Copy up, copying only the first `limit` bytes of a regular file (Some(0) for an
    /// O_TRUNC open or a truncate to zero: no data at all).
    pub(crate) fn copy_up_limited(&self, ino: u64, limit: Option<u64>) -> Result<()> {
        let (upper, kind, parent) = self.with_node(ino, |n| (n.upper, n.kind, n.parent))?;
        if upper {
            return Ok(());
        }
        self.upper()?;
        let parent = if kind == Kind::Dir {
            parent
        } else {
            self.loc(ino)?.parent
        };
        if ino != ROOT {
            self.copy_up(parent)?;
        }
        let job = {
            let _g = self.stripe(ino);
            if self.with_node(ino, |n| n.upper)? {
                return Ok(());
            }
            if kind == Kind::Dir {
                return self.copy_up_dir(ino);
            }
            self.copy_up_other(ino, limit)?
        };
        if let Some(j) = job {
            // Keep POSIX semantics: every visible name of the lower link set follows.
            if let Err(e) = self.copy_up_link_set(ino, j.layer, j.lower_ino, j.parent, &j.name) {
                log::warn!("copy-up of the other links of {}: {e}", j.name.to_string_lossy());
            }
        }
        Ok(())
    }

    /// Put a staged copy in place as `name` in the upper directory `pu` (node `parent`),
    /// keeping that directory's times as they were: a copy-up is no change to the merged
    /// directory, and overlayfs keeps its mtime too. Its ctime moves, as there; the kernel
    /// is told to ask for the attributes again. (Without this, every copy-up set the
    /// parent's mtime to now, which a commit then carried into the layer.)
    fn place_copy(
        &self,
        staged: &mut Staged<'_>,
        pu: BorrowedFd<'_>,
        name: &OsStr,
        parent: u64,
    ) -> Result<()> {
        let before = rustix::fs::fstat(pu).ok();
        staged.place(pu, name, RenameFlags::NOREPLACE)?;
        if let Some(st) = before {
            // (best effort: an O_PATH fd of a directory the daemon may not read refuses it)
            let _ = rustix::fs::futimens(pu, &times_of(&st));
        }
        self.attrs_went_stale(parent);
        Ok(())
    }

    fn origin_value(&self, dir: rustix::fd::BorrowedFd<'_>, name: &OsStr, layer: u16) -> Option<Vec<u8>> {
        let fh = sys::name_to_handle(dir, name).ok()?;
        Some(encode_origin(&self.lowers[layer as usize].uuid, &fh))
    }

    fn copy_up_dir(&self, ino: u64) -> Result<()> {
        self.upper()?;
        let (parent, name) = self.with_node(ino, |n| (n.parent, n.name.to_os_string()))?;
        let fds = self.dir_fds(ino)?;
        let (l0, src) = fds
            .lowers
            .first()
            .map(|(l, f)| (*l, f.clone()))
            .ok_or(Errno::IO)?;
        let pfds = self.dir_fds(parent)?;
        let pu = pfds.upper().ok_or(Errno::IO)?;
        let mut st = rustix::fs::fstat(&*src)?;
        self.lower_stat(l0, XTarget::Fd(src.as_fd()), &mut st);
        let mut staged = self.stage()?;
        let (work, tmp) = (staged.dir(), staged.name().to_owned());
        rustix::fs::mkdirat(work, &tmp, Mode::from_raw_mode(0o700))?;
        let d = {
            let d = sys::open_dir_beneath(work, &tmp)?;
            // Owner first: chown drops security.capability, which must survive.
            rustix::fs::fchown(
                &d,
                Some(rustix::fs::Uid::from_raw(st.st_uid)),
                Some(rustix::fs::Gid::from_raw(st.st_gid)),
            )?;
            copy_xattrs(XTarget::Fd(src.as_fd()), XTarget::Fd(d.as_fd()), self.ns)?;
            if let Some(v) = pfds.lower(l0).and_then(|pl| self.origin_value(pl, &name, l0)) {
                sys::setxattr(XTarget::Fd(d.as_fd()), &self.ns.name("origin"), &v, 0)?;
            }
            rustix::fs::fchmod(&d, Mode::from_raw_mode(st.st_mode & 0o7777))?;
            rustix::fs::futimens(&d, &times_of(&st))?;
            self.place_copy(&mut staged, pu, &name, parent)?;
            d
        };
        if let Ok(ust) = rustix::fs::fstat(&d) {
            self.origins
                .write()
                .unwrap()
                .insert((ust.st_dev, ust.st_ino), ino);
        }
        let new = DirFds {
            upper: Some(Arc::new(d)),
            lowers: fds.lowers.clone(),
        };
        let mut nodes = self.nodes.write().unwrap();
        if let Some(n) = nodes.get_mut(&ino) {
            n.upper = true;
            n.no_xattrs = false;
            self.xattr_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n.fds.is_some() {
                // The old set lacked the upper fd.
                self.cache_fds(&mut nodes, ino, Arc::new(new));
            }
        }
        drop(nodes);
        // Now merged: it reports one link, as the kernel's merged directories do.
        self.attrs_went_stale(ino);
        Ok(())
    }

    fn copy_up_other(&self, ino: u64, limit: Option<u64>) -> Result<Option<LinkSetJob>> {
        self.upper()?;
        let loc = self.loc(ino)?;
        let l = loc.lower.ok_or(Errno::IO)?;
        let src_dir = loc.pfds.lower(l).ok_or(Errno::IO)?;
        // The parent was just copied up: take its fds afresh, with the upper one.
        let pfds = self.dir_fds(loc.parent)?;
        let pu = pfds.upper().ok_or(Errno::IO)?;
        let name = &loc.name;
        let mut st = sys::stat_at(src_dir, name)?;
        self.lower_stat(l, XTarget::At(src_dir, name), &mut st);
        let mut staged = self.stage()?;
        let (work, tmp) = (staged.dir(), staged.name().to_owned());
        let origin = self.origin_value(src_dir, name, l);
        let oname = self.ns.name("origin");
        let owner = (
            Some(rustix::fs::Uid::from_raw(st.st_uid)),
            Some(rustix::fs::Gid::from_raw(st.st_gid)),
        );
        // A regular file's copy, for the read handles opened on the lower file.
        let mut copy: Option<OwnedFd> = None;
        {
            match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => {
                    let src =
                        sys::open_beneath(src_dir, name, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty())?;
                    let dst = sys::open_beneath(
                        work,
                        &tmp,
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                        Mode::from_raw_mode(0o600),
                    )?;
                    let size = st.st_size as u64;
                    let n = limit.map_or(size, |lim| lim.min(size));
                    let how = sys::copy_data(src.as_fd(), dst.as_fd(), n, n == size)?;
                    log::debug!("copy-up {} ({n} bytes, {how})", name.to_string_lossy());
                    // Owner before xattrs (chown drops security.capability), mode after chown
                    // (chown clears setuid).
                    rustix::fs::fchown(&dst, owner.0, owner.1)?;
                    copy_xattrs(XTarget::Fd(src.as_fd()), XTarget::Fd(dst.as_fd()), self.ns)?;
                    if let Some(v) = &origin {
                        sys::setxattr(XTarget::Fd(dst.as_fd()), &oname, v, 0)?;
                    }
                    rustix::fs::fchmod(&dst, Mode::from_raw_mode(st.st_mode & 0o7777))?;
                    rustix::fs::futimens(&dst, &times_of(&st))?;
                    if !self.volatile && n > 0 {
                        rustix::fs::fsync(&dst)?;
                    }
                    copy = Some(dst);
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(src_dir, name, Vec::new())?;
                    rustix::fs::symlinkat(target.as_c_str(), work, &tmp)?;
                    rustix::fs::chownat(work, &tmp, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)?;
                    copy_xattrs(XTarget::At(src_dir, name), XTarget::At(work, &tmp), self.ns)?;
                    if let Some(v) = &origin {
                        // user.* xattrs are not allowed on symlinks: rootless copies of
                        // symlinks go without an origin.
                        let _ = sys::setxattr(XTarget::At(work, &tmp), &oname, v, 0);
                    }
                    rustix::fs::utimensat(work, &tmp, &times_of(&st), AtFlags::SYMLINK_NOFOLLOW)?;
                }
                ft => {
                    rustix::fs::mknodat(
                        work,
                        &tmp,
                        ft,
                        Mode::from_raw_mode(st.st_mode & 0o7777),
                        st.st_rdev,
                    )?;
                    rustix::fs::chownat(work, &tmp, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)?;
                    copy_xattrs(XTarget::At(src_dir, name), XTarget::At(work, &tmp), self.ns)?;
                    if let Some(v) = &origin {
                        sys::setxattr(XTarget::At(work, &tmp), &oname, v, 0)?;
                    }
                    rustix::fs::chmodat(
                        work,
                        &tmp,
                        Mode::from_raw_mode(st.st_mode & 0o7777),
                        AtFlags::empty(),
                    )?;
                    rustix::fs::utimensat(work, &tmp, &times_of(&st), AtFlags::SYMLINK_NOFOLLOW)?;
                }
            }
            self.place_copy(&mut staged, pu, name, loc.parent)?;
        }
        if let Ok(ust) = sys::stat_at(pu, name) {
            self.origins
                .write()
                .unwrap()
                .insert((ust.st_dev, ust.st_ino), ino);
        }
        {
            let mut nodes = self.nodes.write().unwrap();
            if let Some(n) = nodes.get_mut(&ino) {
                n.upper = true;
                n.set_lower(None);
                n.no_xattrs = false;
                self.xattr_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Make the name we copied up the primary one.
                n.set_primary(loc.parent, name, true);
            }
        }
        if let Some(c) = copy {
            self.handles_follow_copy_up(ino, c.as_fd());
        }
        // The copy is a new inode: its ctime is now's (the kernel cached the lower one's).
        self.attrs_went_stale(ino);
        if loc.kind == Kind::File && st.st_nlink > 1 {
            // The caller links the rest of the lower link set, after releasing the stripe
            // lock (that work copies up other directories, whose stripes may be this one).
            return Ok(Some(LinkSetJob {
                layer: l,
                lower_ino: st.st_ino,
                parent: loc.parent,
                name: name.clone(),
            }));
        }
        Ok(None)
    }

    /// All paths in lower layer `l` of regular files with more than one link.
    fn link_index(&self, l: u16) -> Arc<LinkIndex> {
        let mut cache = self.link_index.lock().unwrap();
        if let Some(v) = cache.get(&l) {
            return v.clone();
        }
        let mut idx: LinkIndex = HashMap::new();
        let root = self.lowers[l as usize].fd.as_fd();
        let mut stack: Vec<(Option<OwnedFd>, PathBuf)> =
            vec![(sys::open_dir_beneath(root, ".").ok(), PathBuf::new())];
        while let Some((d, rel)) = stack.pop() {
            let Some(d) = d else {
                log::warn!("link index of layer {l}: cannot open '{}'", rel.display());
                continue;
            };
            let Ok(rd) = rustix::fs::Dir::read_from(&d) else {
                continue;
            };
            for ent in rd.flatten() {
                let nb = ent.file_name().to_bytes();
                if nb == b"." || nb == b".." {
                    continue;
                }
                let name = OsStr::from_bytes(nb);
                match ent.file_type() {
                    FileType::Directory => {
                        stack.push((sys::open_dir_beneath(d.as_fd(), name).ok(), rel.join(name)))
                    }
                    FileType::RegularFile | FileType::Unknown => {
                        if let Ok(st) = sys::stat_at(d.as_fd(), name) {
                            if st.st_nlink > 1 && FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                            {
                                idx.entry(st.st_ino).or_default().push(rel.join(name));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        log::debug!("link index of layer {l}: {} multiply-linked files", idx.len());
        let idx = Arc::new(idx);
        cache.insert(l, idx.clone());
        idx
    }

    /// After copying up one name of a lower hard-link set, link every other name of the set
    /// that is still visible through the merged tree to the same upper file.
    fn copy_up_link_set(
        &self,
        ino: u64,
        l: u16,
        lower_ino: u64,
        done_parent: u64,
        done_name: &OsStr,
    ) -> Result<()> {
        let idx = self.link_index(l);
        let Some(paths) = idx.get(&lower_ino) else {
            return Ok(());
        };
        let src_dir = self.dir_fds(done_parent)?;
        let src = src_dir.upper().ok_or(Errno::IO)?;
        // Directories the walk had to enter that the kernel never looked up: nobody will
        // FORGET them, so they leave the table when this is done (the names of the set
        // below them are learned again by the lookups that reach them).
        let mut fresh = Vec::new();
        let r = self.link_names(ino, l, lower_ino, done_parent, done_name, paths, src, &mut fresh);
        let drop: Vec<(u64, u64)> = fresh.iter().rev().map(|i| (*i, 0)).collect();
        self.forget_many(&drop);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn link_names(
        &self,
        ino: u64,
        l: u16,
        lower_ino: u64,
        done_parent: u64,
        done_name: &OsStr,
        paths: &[std::path::PathBuf],
        src: std::os::fd::BorrowedFd<'_>,
        fresh: &mut Vec<u64>,
    ) -> Result<()> {
        for p in paths {
            let Some(base) = p.file_name() else { continue };
            let Some(parent) = self.walk_dirs(p.parent().unwrap_or(Path::new("")), fresh) else {
                continue;
            };
            if parent == done_parent && base == done_name {
                continue;
            }
            let Ok(f) = self.resolve(parent, base) else {
                continue;
            };
            if f.upper || f.lower != Some(l) || f.st.st_ino != lower_ino {
                continue;
            }
            self.copy_up(parent)?;
            let pf = self.dir_fds(parent)?;
            let pu = pf.upper().ok_or(Errno::IO)?;
            rustix::fs::linkat(src, done_name, pu, base, AtFlags::empty())?;
            if fresh.contains(&parent) {
                continue;
            }
            let mut nodes = self.nodes.write().unwrap();
            if let Some(n) = nodes.get_mut(&ino) {
                if !n.name.links().iter().any(|x| x.0 == parent && x.1 == base) {
                    n.name.push_link((parent, base.to_owned()));
                }
            }
        }
        Ok(())
    }

    /// The directory node at a relative merged path, entering it into the table if needed.
    fn walk_dirs(&self, rel: &Path, fresh: &mut Vec<u64>) -> Option<u64> {
        let mut cur = ROOT;
        for comp in rel.components() {
            let name: OsString = comp.as_os_str().to_owned();
            // Resolve and record under one read lock, as a lookup does.
            let _ns = self.ns_lock.read().unwrap();
            let f = self.resolve(cur, &name).ok()?;
            if f.kind != Kind::Dir {
                return None;
            }
            let ino = f.ino;
            if self.nodes.read().unwrap().get(&ino).is_none() {
                fresh.push(ino);
            }
            self.remember(cur, &name, f, false);
            cur = ino;
        }
        Some(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_roundtrip() {
        let fh = FileHandle {
            kind: 1,
            bytes: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        let uuid = [7u8; 16];
        let v = encode_origin(&uuid, &fh);
        assert_eq!(v.len(), 29);
        assert_eq!(&v[..5], &[0, 0xfb, 29, 0, 1]);
        assert_eq!(decode_origin(&v), Some((uuid, fh)));
        assert_eq!(decode_origin(&v[..20]), None);
        let mut bad = v.clone();
        bad[1] = 0;
        assert_eq!(decode_origin(&bad), None);
    }
}
