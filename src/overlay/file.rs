//! Open files: open, read, write, fsync and the other calls on a file handle.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

use super::*;
use crate::sys::{self, XTarget};

/// READs at least this big trigger an asynchronous read of what follows (see `read_plan`).
const READ_AHEAD_FROM: u32 = 512 * 1024;

/// Which open file a READ goes through (see `Overlay::read_plan`).
enum Read {
    /// The handle's own, through the page cache.
    Cached(Arc<OwnedFd>),
    /// The lower file opened again with O_DIRECT.
    Direct(Arc<OwnedFd>),
}

impl Overlay {
    // ----- files ---------------------------------------------------------------------

    /// Register an open real file of `ino`; `upper`: it is the upper layer's.
    pub(crate) fn add_file(&self, ino: u64, fd: OwnedFd, upper: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.write().unwrap().insert(
            fh,
            OpenFile {
                ino,
                fd: Arc::new(fd),
                end: AtomicU64::new(0),
                upper,
                direct: OnceLock::new(),
            },
        );
        fh
    }

    pub(crate) fn file(&self, fh: u64) -> Result<Arc<OwnedFd>> {
        self.files
            .read()
            .unwrap()
            .get(&fh)
            .map(|f| f.fd.clone())
            .ok_or(Errno::BADF)
    }

    /// Some open file of `ino`: how an unlinked-but-open file is reached when the kernel
    /// asks without a handle (fstat, fchmod, fchown send none). A scan, but only orphans
    /// need it. Once the node is upper, only a handle on the upper file: one opened before
    /// the copy-up that could not move to the copy holds the lower file, which must be
    /// neither shown nor changed.
    pub(crate) fn any_open_fd(&self, ino: u64) -> Option<Arc<OwnedFd>> {
        let upper = self.is_upper(ino);
        self.files
            .read()
            .unwrap()
            .values()
            .find(|f| f.ino == ino && (f.upper || !upper))
            .map(|f| f.fd.clone())
    }

    /// A copy-up made `copy` the file of node `ino`: its handles opened before, on the
    /// lower file, read the copy from now on, as overlayfs moves an open file to the copy
    /// when it is next used. Without that, what another handle writes would not show
    /// through them wherever the kernel had not cached their pages (an append past them,
    /// say). A handle whose reopen fails keeps the lower file (the same bytes until written).
    pub(crate) fn handles_follow_copy_up(&self, ino: u64, copy: BorrowedFd<'_>) {
        let stale: Vec<u64> = {
            let files = self.files.read().unwrap();
            files
                .iter()
                .filter(|(_, f)| f.ino == ino && !f.upper)
                .map(|(fh, _)| *fh)
                .collect()
        };
        if stale.is_empty() {
            return;
        }
        // One read-only open of the copy serves them all (they only ever read).
        let fd = match sys::reopen(copy, OFlags::RDONLY) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                log::warn!("read handles of inode {ino} keep the lower file after its copy-up: {e}");
                return;
            }
        };
        let mut files = self.files.write().unwrap();
        for fh in stale {
            if let Some(f) = files.get_mut(&fh) {
                f.fd = fd.clone();
                f.upper = true;
                f.direct = OnceLock::new();
            }
        }
    }

    /// open: a write (or O_TRUNC) open copies up first; O_TRUNC copies no data.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64> {
        self.open_file(ino, flags).map(|(fh, _)| fh)
    }

    /// open, also telling whether the handle is on the upper layer's file (which stays the
    /// object's file for good, so the kernel may do the I/O on it directly).
    pub fn open_file(&self, ino: u64, flags: i32) -> Result<(u64, bool)> {
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
        // Name to object and open under one read lock: an unlink or rename (write lock)
        // happens wholly before, and leaves the node without that name, or wholly after. An
        // open by name can then never reach an object that took the name since.
        let _ns = self.ns_lock.read().unwrap();
        let loc = match self.loc(ino) {
            // Its last name is gone, yet the kernel opens it by node: a path resolved just
            // before an unlink, or an inode-flags ioctl on an fd of an unlinked file (the
            // kernel opens a handle of its own). For reading, the file that a live handle
            // holds is opened again, as overlayfs opens the unlinked real file. Not for
            // writing: that handle may predate a copy-up and hold the lower file. ESTALE
            // makes the kernel look the path up again.
            Err(e @ (Errno::STALE | Errno::NOENT)) if !write => {
                let fd = self.any_open_fd(ino).ok_or(e)?;
                let again = sys::reopen(fd.as_fd(), open_flags(flags))?;
                let upper = self.is_upper(ino);
                return Ok((self.add_file(ino, again, upper), upper));
            }
            r => r?,
        };
        let oflags = open_flags(flags) | OFlags::NOFOLLOW;
        let fd = match sys::open_beneath(loc.dir()?, &loc.name, oflags, Mode::empty()) {
            // An append-only (chattr +a) file opens for writing only with O_APPEND, which
            // overlayfs passes on. Not by default: on a plain handle the kernel also
            // writes back shared mmap pages at their offsets, which O_APPEND would move to
            // the end; the kernel gives a user's O_APPEND writes the end offset itself.
            Err(Errno::PERM) if write && flags & libc::O_APPEND != 0 => {
                sys::open_beneath(loc.dir()?, &loc.name, oflags | OFlags::APPEND, Mode::empty())?
            }
            r => r?,
        };
        Ok((self.add_file(ino, fd, loc.upper), loc.upper))
    }

    /// May the kernel write the file behind `fh` directly (FUSE passthrough)? Its writes
    /// run with the daemon's credentials, so they would not drop setuid, setgid or
    /// security.capability when an unprivileged user writes. So: only files that carry none
    /// of these and that no one but the owner may write (a later chmod u+s on a file whose
    /// owner holds it open for writing gives the owner nothing new).
    pub fn passthrough_safe(&self, fh: u64) -> bool {
        let Ok(fd) = self.file(fh) else { return false };
        let Ok(st) = rustix::fs::fstat(&*fd) else {
            return false;
        };
        let m = st.st_mode;
        FileType::from_raw_mode(m) == FileType::RegularFile
            && m & (libc::S_ISUID | libc::S_ISGID | 0o022) == 0
            && sys::getxattr(XTarget::Fd(fd.as_fd()), OsStr::new("security.capability")).is_err()
    }

    /// Is the node in the table (the kernel still holds it)?
    pub fn is_known(&self, ino: u64) -> bool {
        self.with_node(ino, |_| ()).is_ok()
    }

    /// Is the object in the upper layer now?
    pub fn is_upper(&self, ino: u64) -> bool {
        self.with_node(ino, |n| n.upper).unwrap_or(false)
    }

    /// The real file behind a handle.
    pub fn file_fd(&self, fh: u64) -> Result<Arc<OwnedFd>> {
        self.file(fh)
    }

    /// read from an open file.
    pub fn read(&self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let fd = match self.read_plan(fh, off, size, false)? {
            Read::Cached(fd) | Read::Direct(fd) => fd,
        };
        sys::pread_full(fd.as_fd(), size as usize, off)
    }

    /// read from an open file into `buf` (as much as fits); the count read, fewer only at
    /// the end of the file. The FUSE adapter reads into the reply's own buffer this way.
    pub fn read_into(&self, fh: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        let size = u32::try_from(buf.len()).map_err(|_| Errno::INVAL)?;
        // O_DIRECT wants the offset, length and buffer aligned to the disk's blocks; a
        // page covers every block size in use.
        let aligned = (off | size as u64 | buf.as_ptr() as u64) % 4096 == 0;
        match self.read_plan(fh, off, size, aligned)? {
            Read::Cached(fd) => sys::pread_into(fd.as_fd(), buf, off, false),
            Read::Direct(fd) => match sys::pread_into(fd.as_fd(), buf, off, true) {
                Err(Errno::INVAL) => {
                    // The filesystem takes O_DIRECT opens but not these reads: never again
                    // for this handle.
                    let plain = self.file(fh)?;
                    self.no_direct(fh);
                    sys::pread_into(plain.as_fd(), buf, off, false)
                }
                r => r,
            },
        }
    }

    /// Mark handle `fh` as one whose reads never go through O_DIRECT.
    fn no_direct(&self, fh: u64) {
        if let Some(f) = self.files.write().unwrap().get_mut(&fh) {
            f.direct = OnceLock::from(None);
        }
    }

    /// How to serve a READ of `size` bytes at `off` of handle `fh`.
    ///
    /// A big READ is the kernel's readahead of a sequential reader. Of a lower file whose
    /// pages there are not in the page cache, it is read with O_DIRECT (when `direct_ok`):
    /// the disk writes straight into the reply's buffer, and the data are not cached twice,
    /// once for the lower file and once for the FUSE file (the kernel's overlayfs caches
    /// them once). A cold sequential read of 1 GiB took 350-440 ms of daemon CPU instead of
    /// 830-1070 through the page cache. Pages that are cached (another reader of the
    /// layer) are copied from there. Otherwise a sequential big READ has the lower disk
    /// fetch the next ones meanwhile.
    fn read_plan(&self, fh: u64, off: u64, size: u32, direct_ok: bool) -> Result<Read> {
        let size64 = u64::from(size);
        let big = size >= READ_AHEAD_FROM;
        let (fd, sequential, direct) = {
            let files = self.files.read().unwrap();
            let f = files.get(&fh).ok_or(Errno::BADF)?;
            // Does this big READ follow the handle's previous one? Readahead READs can be
            // served out of order by the workers, so "follows" allows a gap of two READs
            // either way. A random big read (or the first) prefetches nothing.
            let seq = big && {
                let prev = f.end.swap(off + size64, Ordering::Relaxed);
                prev != 0 && prev.abs_diff(off) <= 2 * size64
            };
            let direct = if big && direct_ok && !f.upper {
                f.direct.get().cloned()
            } else {
                Some(None)
            };
            (f.fd.clone(), seq, direct)
        };
        if !matches!(direct, Some(None)) && sys::cached_pages(fd.as_fd(), off, size64) == Some(0) {
            if let Some(Some(d)) = direct {
                return Ok(Read::Direct(d));
            }
            // The first such READ of the handle opens the file again, outside the lock.
            let d = sys::reopen_direct(fd.as_fd()).ok().map(Arc::new);
            let files = self.files.read().unwrap();
            if let Some(f) = files.get(&fh) {
                if let Some(d) = f.direct.get_or_init(|| d).clone() {
                    return Ok(Read::Direct(d));
                }
            }
        }
        if sequential {
            // A sequential reader whose kernel readahead grew to big READs: have the
            // lower disk fetch the next ones meanwhile, instead of one synchronous pread
            // at a time.
            sys::will_need(fd.as_fd(), off + size64, size64 * 2);
        }
        Ok(Read::Cached(fd))
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
}

/// Flags for opening the real file on behalf of the user. O_APPEND is dropped because the
/// kernel passes explicit offsets; O_DIRECT would need aligned buffers; creation flags are
/// handled by the caller.
pub(crate) fn open_flags(flags: i32) -> OFlags {
    // No O_APPEND: see `open_file`.
    let keep = libc::O_ACCMODE | libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC | libc::O_LARGEFILE;
    OFlags::from_bits_retain((flags & keep) as u32)
}
