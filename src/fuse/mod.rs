//! The FUSE adapter: the only module that names fuser. Each method converts its arguments,
//! calls the overlay core and replies; no overlay logic lives here.

pub mod mount;
mod plus;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use crate::overlay::{self, Attr, Caller, Kind, Overlay, SetAttr, TimeSet};

/// How long the kernel may cache entries and attributes. strata is the only writer of the
/// upper layer while mounted (the same contract as kernel overlayfs), so long is safe.
const TTL: Duration = Duration::from_secs(3600);

/// The filesystem served to the kernel.
#[derive(Debug)]
pub struct FuseFs {
    ov: Arc<Overlay>,
    /// Set once the session exists: tells the kernel of attributes that changed behind
    /// its back (see `flush_stale`).
    pub(crate) notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// Ask the kernel to check POSIX ACLs (not with `noacl`).
    acl: bool,
    /// Ask for FUSE_OVER_IO_URING (not with `uring=off`).
    uring: bool,
    /// Passthrough allowed by the mount options.
    want_passthrough: bool,
    /// Every lower file opened for reading may be passed through, not only executables.
    lower_reads: bool,
    /// The kernel does reads and writes of upper files itself (FUSE passthrough).
    passthrough: AtomicBool,
    io: Mutex<IoTable>,
    /// Which READDIRPLUS entries carry attributes (see `plus.rs`).
    plus: plus::PlusPolicy,
}

impl FuseFs {
    /// A copy-up of a directory made by this request (of a child, say) changed the
    /// directory's attributes (its link count) though the kernel did not ask about it:
    /// drop the kernel's cached attributes of those directories before replying, so the
    /// next stat asks again. Attributes only (offset -1): no page locks, no deadlock.
    fn flush_stale(&self) {
        let stale = self.ov.take_stale_attrs();
        if let Some(n) = self.notifier.get() {
            for ino in stale {
                let _ = n.inval_inode(INodeNo(ino), -1, 0);
            }
        }
    }

    /// Serve `ov`; `passthrough` says which files may be passed through.
    pub fn new(ov: Arc<Overlay>, passthrough: mount::Passthrough, acl: bool, uring: bool) -> FuseFs {
        FuseFs {
            ov,
            notifier: Arc::new(std::sync::OnceLock::new()),
            acl,
            uring,
            want_passthrough: passthrough != mount::Passthrough::Off,
            lower_reads: passthrough == mount::Passthrough::All,
            passthrough: AtomicBool::new(false),
            io: Mutex::new(IoTable::default()),
            plus: plus::PlusPolicy::new(),
        }
    }
}

/// How the open handles of one inode do their I/O. The kernel wants one mode per inode at
/// a time: every handle through one backing file, or none.
#[derive(Debug, Default)]
struct InodeIo {
    /// Handles served by read/write requests.
    cached: u32,
    /// The backing file registered for passthrough.
    backing: Option<Backing>,
}

#[derive(Debug)]
struct Backing {
    id: Arc<BackingId>,
    /// Handles using it.
    handles: u32,
    /// It is the lower file (opened read-only before any copy-up).
    lower: bool,
}

#[derive(Debug, Default)]
struct IoTable {
    inodes: HashMap<u64, InodeIo>,
    /// Handle -> (inode, passthrough?).
    handles: HashMap<u64, (u64, bool)>,
    /// Inodes an upper backing was released for since their last plain open: the kernel
    /// wrote them behind the page cache, so their next plain open must drop it.
    pt_written: std::collections::HashSet<u64>,
    /// Inodes with a write open or truncate in flight (their data may change): no lower
    /// backing may be registered for them meanwhile.
    changing: HashMap<u64, u32>,
}

/// A data change in flight on an inode (see `FuseFs::begin_change`).
struct Changing<'a>(&'a FuseFs, u64);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        let mut t = self.0.io.lock().unwrap();
        if let Some(n) = t.changing.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                t.changing.remove(&self.1);
            }
        }
    }
}

/// The kernel's `__FMODE_EXEC` in open flags: the file is opened to be executed.
const FMODE_EXEC: i32 = 0x20;

/// An open that needs a lower file's data to change while passthrough handles read that
/// lower file: the kernel cannot move them to the copy-up, so it is refused, as writing a
/// running binary is.
const BUSY: Errno = Errno::ETXTBSY;

impl FuseFs {
    /// Start a change of inode `ino`'s data (a write open, a truncate): refused with
    /// ETXTBSY while passthrough handles read its lower file, and until the guard drops no
    /// such handle may appear.
    fn begin_change(&self, ino: u64) -> Result<Changing<'_>, Errno> {
        let mut t = self.io.lock().unwrap();
        let lower = t
            .inodes
            .get(&ino)
            .and_then(|s| s.backing.as_ref())
            .is_some_and(|b| b.lower);
        if lower {
            return Err(BUSY);
        }
        *t.changing.entry(ino).or_default() += 1;
        Ok(Changing(self, ino))
    }

    /// Decide how handle `fh` of inode `ino` does its I/O: Ok(Some(id)) for a passthrough
    /// reply, Ok(None) for plain requests, Err(BUSY) for a write handle that a lower
    /// backing rules out. `eligible`: the file may be passed through (see
    /// `Overlay::passthrough_safe`); `lower`: it is the lower file; `register` makes a
    /// backing id.
    ///
    /// A lower file is passed through for reading only. Until its last such handle
    /// closes, a copy-up that keeps the data (chmod, chown, xattrs, link, rename) lets
    /// new read handles share the lower backing (same bytes), and anything that would
    /// change the data (a write open, a truncate) is refused with ETXTBSY.
    fn choose_io(
        &self,
        ino: u64,
        fh: u64,
        eligible: bool,
        lower: bool,
        write: bool,
        register: impl FnOnce(&std::os::fd::OwnedFd) -> std::io::Result<BackingId>,
    ) -> Result<Option<Arc<BackingId>>, Errno> {
        let mut t = self.io.lock().unwrap();
        let changing = t.changing.contains_key(&ino);
        let st = t.inodes.entry(ino).or_default();
        let id = if let Some(b) = &mut st.backing {
            if b.lower && write {
                if st.cached == 0 && b.handles == 0 {
                    t.inodes.remove(&ino);
                }
                return Err(BUSY);
            }
            b.handles += 1;
            Some(b.id.clone())
        } else if st.cached == 0
            && eligible
            && self.passthrough.load(Ordering::Relaxed)
            // A lower file only while its data cannot change under the backing: no change
            // in flight, not copied up since this handle was opened.
            && !(lower && (changing || self.ov.is_upper(ino)))
        {
            match self
                .ov
                .file_fd(fh)
                .map_err(std::io::Error::from)
                .and_then(|fd| register(&fd))
            {
                Ok(b) => {
                    let id = Arc::new(b);
                    st.backing = Some(Backing {
                        id: id.clone(),
                        handles: 1,
                        lower,
                    });
                    Some(id)
                }
                Err(e) => {
                    if e.raw_os_error() == Some(libc::EPERM) {
                        // Not allowed (unprivileged): plain requests from now on.
                        log::info!(
                            "FUSE passthrough not permitted ({e}); reads and writes go through strata"
                        );
                        self.passthrough.store(false, Ordering::Relaxed);
                    } else {
                        // E.g. a layer on a stacked filesystem: this file goes without.
                        log::debug!("FUSE passthrough refused for inode {ino}: {e}");
                    }
                    None
                }
            }
        } else {
            None
        };
        if id.is_none() {
            st.cached += 1;
        }
        t.handles.insert(fh, (ino, id.is_some()));
        Ok(id)
    }

    /// Reply to a CREATE or TMPFILE with the new file's entry and handle.
    fn created(&self, r: overlay::Result<(Attr, u64)>, reply: ReplyCreate) {
        self.flush_stale();
        match r {
            Ok((a, fh)) => {
                // A new file goes through strata: most are small and written once (tar x,
                // package installs), where registering a backing file costs more than
                // the WRITE it saves (untar of 20k files: 2.82 s with, 2.51 s without;
                // again at 4fcf941: 2.62-2.74 s with, 2.15-2.26 s without). The kernel
                // still asks for security.capability before a passthrough write, so the
                // WRITE is the only round trip saved. Later opens are passed through.
                match self.choose_io(a.ino, fh, false, false, true, |fd| reply.open_backing(fd)) {
                    Ok(Some(b)) => reply.created_passthrough_as(
                        INodeNo(a.ino),
                        &TTL,
                        &attr(&a),
                        GEN,
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &b,
                    ),
                    _ => reply.created_as(
                        INodeNo(a.ino),
                        &TTL,
                        &attr(&a),
                        GEN,
                        FileHandle(fh),
                        FopenFlags::FOPEN_KEEP_CACHE,
                    ),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Handle `fh` is closed.
    fn release_io(&self, fh: u64) {
        let mut t = self.io.lock().unwrap();
        let Some((ino, pt)) = t.handles.remove(&fh) else {
            return;
        };
        let mut written = false;
        if let Some(st) = t.inodes.get_mut(&ino) {
            if pt {
                if let Some(b) = &mut st.backing {
                    b.handles -= 1;
                    if b.handles == 0 {
                        written = !b.lower;
                        st.backing = None;
                    }
                }
            } else {
                st.cached = st.cached.saturating_sub(1);
            }
            if st.cached == 0 && st.backing.is_none() {
                t.inodes.remove(&ino);
            }
        }
        if written {
            t.pt_written.insert(ino);
        }
    }

    /// May a plain open of `ino` keep the kernel's cached pages? Not once the kernel has
    /// written the file through a passthrough handle since they were read.
    fn plain_keeps_cache(&self, ino: u64) -> bool {
        !self.io.lock().unwrap().pt_written.remove(&ino)
    }
}

/// The generation of every node: node ids are never reused while the kernel may hold
/// them (a new object under a number the kernel may still hold takes a stand-in id, see
/// `Overlay::remember`), so none is needed to tell objects apart.
const GEN: Generation = Generation(0);

/// Attributes sent with a negative entry (the kernel looks only at the node id 0).
const NEGATIVE: Attr = Attr {
    st_ino: 0,
    ino: 0,
    size: 0,
    blocks: 0,
    atime: (0, 0),
    mtime: (0, 0),
    ctime: (0, 0),
    kind: Kind::File,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
};

fn errno(e: overlay::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
    }
}

fn time((s, n): (i64, u32)) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, n)
    } else {
        UNIX_EPOCH - Duration::new(s.unsigned_abs(), 0) + Duration::new(0, n)
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        // The number `stat` shows; replies that name a node pass its id apart.
        ino: INodeNo(a.st_ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.ctime),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn timeset(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSet::At(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                TimeSet::At(
                    -(d.as_secs() as i64) - (d.subsec_nanos() > 0) as i64,
                    (1_000_000_000 - d.subsec_nanos()) % 1_000_000_000,
                )
            }
        },
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn entry(reply: ReplyEntry, r: overlay::Result<Attr>) {
    match r {
        Ok(a) => reply.entry_as(INodeNo(a.ino), &TTL, &attr(&a), GEN),
        Err(e) => reply.error(errno(e)),
    }
}

fn empty(reply: ReplyEmpty, r: overlay::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, r: overlay::Result<Vec<u8>>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Optional capabilities: ask for each alone so one the kernel lacks costs nothing.
        for cap in [
            // The kernel then hands O_TRUNC to open instead of a separate truncate, so a
            // truncating open of a lower file copies no data.
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_MAX_PAGES,
            // The kernel then asks for security.capability (a round trip) only before the
            // first write of each inode, not before every write (it sets SB_NOSEC), and
            // tells us with FUSE_WRITE_KILL_SUIDGID when a write must drop setuid/setgid.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // The kernel then checks POSIX ACLs itself (as overlayfs does) and caches them:
            // `ls -l` asks for system.posix_acl_access on every file, which now costs no
            // round trip after the first.
            InitFlags::FUSE_POSIX_ACL,
            // Requests come through per-CPU io_uring queues, served on the caller's CPU
            // (the kernel offers it only with the fuse module's enable_uring on).
            InitFlags::FUSE_OVER_IO_URING,
        ] {
            if (cap == InitFlags::FUSE_POSIX_ACL && !self.acl)
                || (cap == InitFlags::FUSE_OVER_IO_URING && !self.uring)
            {
                continue;
            }
            let _ = config.add_capabilities(cap);
        }
        // Passthrough: the kernel reads and writes upper files directly. It needs
        // CAP_SYS_ADMIN (registering a backing file fails otherwise, and strata falls back
        // to plain requests) and a stacking depth of 1, which still lets overlayfs stack
        // on top of this mount.
        if self.want_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.store(true, Ordering::Relaxed);
        }
        let _ = config.set_max_readahead(1 << 20);
        // The kernel sends at most max_pages_limit pages (256 by default) per request anyway;
        // fuser's 16 MiB default would size every io_uring payload buffer at 16 MiB.
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.plus.looked_up(parent.0);
        match self.ov.lookup(parent.0, name) {
            Ok(a) => reply.entry_as(INodeNo(a.ino), &TTL, &attr(&a), GEN),
            // A negative entry (node id 0) the kernel may cache: PATH and library searches
            // in a container ask for the same missing names again and again. Names only
            // appear through this mount, which turns the kernel's dentry positive itself.
            Err(e) if e == overlay::Errno::NOENT => {
                let mut a = attr(&NEGATIVE);
                a.ino = INodeNo(0);
                reply.entry(&TTL, &a, Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.ov.forget(ino.0, nlookup);
        if !self.ov.is_known(ino.0) {
            // The kernel dropped the inode, and its pages with it.
            self.io.lock().unwrap().pt_written.remove(&ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ov.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&TTL, &attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // A truncate would change data that passthrough handles read from the lower file.
        let _changing = match size.map(|_| self.begin_change(ino.0)) {
            Some(Err(e)) => return reply.error(e),
            Some(Ok(g)) => Some(g),
            None => None,
        };
        let sa = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(timeset),
            mtime: mtime.map(timeset),
            fh: fh.map(|f| f.0),
        };
        let r = self.ov.setattr(ino.0, &sa);
        self.flush_stale();
        match r {
            Ok(a) => reply.attr(&TTL, &attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.ov.readlink(ino.0) {
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        {
            let r = self
                .ov
                .mknod(parent.0, name, mode & !umask, rdev as u64, caller(req));
            self.flush_stale();
            entry(reply, r)
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        {
            let r = self.ov.mkdir(parent.0, name, mode & !umask, caller(req));
            self.flush_stale();
            entry(reply, r)
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        {
            let r = self.ov.unlink(parent.0, name);
            self.flush_stale();
            empty(reply, r)
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        {
            let r = self.ov.rmdir(parent.0, name);
            self.flush_stale();
            empty(reply, r)
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        {
            let r = self
                .ov
                .symlink(parent.0, link_name, target.as_os_str(), caller(req));
            self.flush_stale();
            entry(reply, r)
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        {
            let r = self.ov.rename(parent.0, name, newparent.0, newname, flags.bits());
            self.flush_stale();
            empty(reply, r)
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        {
            let r = self.ov.link(ino.0, newparent.0, newname);
            self.flush_stale();
            entry(reply, r)
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let _changing = match write.then(|| self.begin_change(ino.0)) {
            Some(Err(e)) => return reply.error(e),
            Some(Ok(g)) => Some(g),
            None => None,
        };
        let r = self.ov.open_file(ino.0, flags.0);
        self.flush_stale();
        match r {
            Ok((fh, upper)) => {
                // A lower file is never written through its handle, and by default only
                // one opened for exec (its writers get ETXTBSY from the kernel anyway, as
                // on overlayfs); an upper one only if the kernel's direct writes keep its
                // privileges right.
                let exec = flags.0 & FMODE_EXEC != 0;
                let eligible = if upper {
                    self.ov.passthrough_safe(fh)
                } else {
                    exec || self.lower_reads
                };
                match self.choose_io(ino.0, fh, eligible, !upper, write, |fd| reply.open_backing(fd)) {
                    Ok(Some(b)) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b),
                    // strata is the only writer, so the kernel may keep cached pages
                    // across opens; not where passthrough writes may have bypassed them.
                    Ok(None) if self.plain_keeps_cache(ino.0) => {
                        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
                    }
                    Ok(None) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                    Err(e) => {
                        self.ov.release(fh);
                        reply.error(e)
                    }
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Read straight into the reply's buffer: through io_uring that is the ring entry the
        // kernel copies from, one copy of the data fewer than a buffer of our own.
        reply.data_with(size as usize, |buf| {
            self.ov.read_into(fh.0, offset, buf).map_err(errno)
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.ov.write(fh.0, offset, data, kill) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is buffered here and locks are the kernel's: ENOSYS tells the kernel to
        // stop sending FLUSH, one round trip less for every close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_io(fh.0);
        self.ov.release(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.ov.fsync(fh.0, datasync))
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // ENOSYS: the kernel then never sends OPENDIR/RELEASEDIR again (two round trips
        // less per directory) and reads with handle 0, caching the listing in its page
        // cache (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE is its default then). That is safe:
        // every change to a directory goes through this mount, and the kernel drops its
        // cached listing when it sees one. Listings are served by cookie (see
        // `overlay::DirEntry::off`), so no per-open state is needed.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.ov.listing(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        let start = entries.partition_point(|e| e.off <= offset);
        let mut full = false;
        for e in &entries[start..] {
            if reply.add(INodeNo(e.ino), e.off, kind(e.kind), &e.name) {
                full = true;
                break;
            }
        }
        if !full {
            self.ov.listing_done(ino.0);
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.ov.listing(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        let start = entries.partition_point(|e| e.off <= offset);
        let files = entries[start..]
            .iter()
            .filter(|e| e.kind != Kind::Dir)
            .take(plus::PROBE_MIN as usize)
            .count();
        let names_only = self.plus.names_only(ino.0, offset, files);
        let mut bare = 0;
        let mut full = false;
        for e in &entries[start..] {
            if names_only && e.kind != Kind::Dir {
                // No attributes, no node: the kernel lists the name and makes nothing.
                if reply.add_name_only(INodeNo(e.ino), e.off, kind(e.kind), &e.name) {
                    full = true;
                    break;
                }
                bare += 1;
                continue;
            }
            let name = e.name.as_bytes();
            if name == b"." || name == b".." {
                // No lookup for these: the kernel does not count references for them.
                let a = match self.ov.getattr(if name == b"." { ino.0 } else { e.ino }, None) {
                    Ok(a) => a,
                    Err(_) => continue,
                };
                let mut fa = attr(&a);
                fa.ino = INodeNo(e.ino);
                if reply.add(
                    INodeNo(e.ino),
                    e.off,
                    &e.name,
                    &Duration::ZERO,
                    &fa,
                    Generation(0),
                ) {
                    full = true;
                    break;
                }
                continue;
            }
            // An entry that vanished since the listing was taken is skipped, as a
            // concurrent unlink would.
            let Ok(a) = self.ov.lookup(ino.0, &e.name) else {
                continue;
            };
            if reply.add(INodeNo(a.ino), e.off, &e.name, &TTL, &attr(&a), GEN) {
                // Did not fit: the kernel never saw this reference.
                self.ov.forget(a.ino, 1);
                full = true;
                break;
            }
        }
        if names_only {
            self.plus.sent(ino.0, bare);
        }
        if !full {
            self.ov.listing_done(ino.0);
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.ov.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.ov.fsyncdir(ino.0))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.ov.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        {
            let r = self.ov.setxattr(ino.0, name, value, flags);
            self.flush_stale();
            empty(reply, r)
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, size, self.ov.getxattr(ino.0, name))
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(reply, size, self.ov.listxattr(ino.0))
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        {
            let r = self.ov.removexattr(ino.0, name);
            self.flush_stale();
            empty(reply, r)
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        empty(reply, self.ov.access(ino.0, mask.bits(), caller(req)))
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.ov.create(parent.0, name, mode & !umask, flags, caller(req));
        self.created(r, reply);
    }

    fn tmpfile(&self, req: &Request, parent: INodeNo, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        let r = self.ov.tmpfile(parent.0, mode & !umask, flags, caller(req));
        self.created(r, reply);
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // Only the inode-flags ioctls reach a FUSE filesystem that is not CUSE: the kernel
        // sends them from the handle it opens for chattr, lsattr and FS_IOC_* on any fd.
        let Some(op) = overlay::FileAttrIoctl::from_cmd(cmd) else {
            return reply.error(Errno::ENOTTY);
        };
        let r = self.ov.fileattr(ino.0, Some(fh.0), op, in_data);
        // A set may have copied the object up.
        self.flush_stale();
        match r {
            Ok(v) => reply.ioctl(0, &v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.ov.fallocate(fh.0, offset, length, mode))
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.ov.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .ov
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }
}
