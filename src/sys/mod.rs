//! The few raw syscall helpers, fd-typed. Everything that needs `unsafe` lives here.

#![allow(unsafe_code)]

pub mod overlayfs;
mod process;
pub use process::*;

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// Result of the raw helpers: a plain errno, as the overlay core wants it.
pub type SysResult<T> = Result<T, Errno>;

/// Resolution rules for every open inside a layer (see docs/design.md): the path must stay
/// beneath the directory fd and may not traverse any symlink, magic link included.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// `openat2(dir, path, flags, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`, retrying on EAGAIN
/// (the kernel returns it when a concurrent rename raced the walk).
pub fn open_beneath<P: AsRef<OsStr>>(
    dir: BorrowedFd<'_>,
    path: P,
    flags: OFlags,
    mode: Mode,
) -> SysResult<OwnedFd> {
    let path = path.as_ref();
    let path = if path.is_empty() { OsStr::new(".") } else { path };
    loop {
        match rustix::fs::openat2(dir, path, flags | OFlags::CLOEXEC, mode, RESOLVE) {
            Err(Errno::AGAIN) | Err(Errno::INTR) => continue,
            r => return r,
        }
    }
}

/// Open a directory beneath `dir` for reading its entries and xattrs.
pub fn open_dir_beneath<P: AsRef<OsStr>>(dir: BorrowedFd<'_>, path: P) -> SysResult<OwnedFd> {
    match open_beneath(
        dir,
        path.as_ref(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
        Mode::empty(),
    ) {
        // A directory we may not read can still be walked through with O_PATH.
        Err(Errno::ACCESS) => open_beneath(
            dir,
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            Mode::empty(),
        ),
        r => r,
    }
}

/// A stream of the entries of directory `dir`, read through a new open file so that
/// threads listing the same directory never share a position. One syscall fewer than
/// `Dir::read_from`, which asks for the fd's flags first.
pub fn dir_stream(dir: BorrowedFd<'_>) -> SysResult<rustix::fs::Dir> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::fs::Dir::new(fd)
}

/// Start reading `len` bytes at `off` of `fd` into the page cache, without waiting
/// (`POSIX_FADV_WILLNEED`). Only a hint: errors are ignored.
pub fn will_need(fd: BorrowedFd<'_>, off: u64, len: u64) {
    let _ = rustix::fs::fadvise(
        fd,
        off,
        std::num::NonZeroU64::new(len),
        rustix::fs::Advice::WillNeed,
    );
}

/// How many of the pages of `len` bytes at `off` of `fd` are in the page cache, asked
/// without reading anything (`cachestat`, Linux 6.5+). None where the kernel cannot tell.
pub fn cached_pages(fd: BorrowedFd<'_>, off: u64, len: u64) -> Option<u64> {
    // The syscall number is the same on every architecture (the unified table of new
    // calls); libc does not name it for x86_64 yet.
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range { off, len };
    let mut st = CacheStat::default();
    // SAFETY: both structs are the kernel's layout and outlive the call; flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &range as *const Range,
            &mut st as *mut CacheStat,
            0u32,
        )
    };
    (r == 0).then_some(st.nr_cache)
}

/// A second open file of what `fd` is open on, read-only with O_DIRECT: reads through it
/// go from the disk straight into the caller's buffer, past the page cache. Through
/// /proc/self/fd, which reopens the very file (not a path that may have changed).
///
/// Refused (EOPNOTSUPP) on a file system stacked on others (overlayfs, FUSE), whose own
/// page cache is not where the data are cached: `cached_pages` would find nothing there
/// and every read would go to the disk, however warm the real file is.
pub fn reopen_direct(fd: BorrowedFd<'_>) -> SysResult<OwnedFd> {
    const OVERLAYFS_SUPER_MAGIC: u64 = 0x794c_7630;
    const FUSE_SUPER_MAGIC: u64 = 0x6573_5546;
    let kind = rustix::fs::fstatfs(fd)?.f_type as u64;
    if kind == OVERLAYFS_SUPER_MAGIC || kind == FUSE_SUPER_MAGIC {
        return Err(Errno::OPNOTSUPP);
    }
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::open(
        path.as_str(),
        OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
}

/// lstat of one name in a directory.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<rustix::fs::Stat> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
}

/// A path that names `name` inside the directory `dir` without following a final symlink,
/// for the xattr calls that have no *at() form: `/proc/self/fd/N/name`. The name is one
/// component handed over by the kernel, so it can contain no slash.
pub fn proc_path(dir: BorrowedFd<'_>, name: Option<&OsStr>) -> CString {
    let mut v = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    if let Some(n) = name {
        v.push(b'/');
        v.extend_from_slice(n.as_bytes());
    }
    CString::new(v).expect("names from the kernel contain no NUL")
}

fn buf_loop<F: FnMut(&mut [u8]) -> SysResult<usize>>(mut f: F) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match f(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => {
                let n = buf.len() * 4;
                if n > 1 << 20 {
                    return Err(Errno::RANGE);
                }
                buf.resize(n, 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The object an xattr call addresses: an fd of the object itself, or a name in a directory.
#[derive(Debug, Clone, Copy)]
pub enum XTarget<'a> {
    /// A directory opened O_RDONLY (f*xattr works on it).
    Fd(BorrowedFd<'a>),
    /// `name` inside `dir`, not following a final symlink.
    At(BorrowedFd<'a>, &'a OsStr),
}

/// The xattr calls on a name in a directory (`getxattrat` and friends, Linux 6.13): the
/// kernel resolves the name from the directory fd, where the older calls need a path
/// through /proc/self/fd, a procfs walk that cost 2 us per call here (17 us with its
/// dentries cold). Where they are missing (before 6.13, or refused by a seccomp filter),
/// /proc paths are used.
mod xattrat {
    use std::ffi::{CStr, CString, OsStr};
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::{AtomicU8, Ordering};

    use rustix::io::Errno;

    use super::SysResult;

    // The numbers of the common syscall table, which these architectures use (alpha and
    // MIPS number them differently; elsewhere the /proc path is always taken).
    const SETXATTRAT: libc::c_long = 463;
    const GETXATTRAT: libc::c_long = 464;
    const LISTXATTRAT: libc::c_long = 465;
    const REMOVEXATTRAT: libc::c_long = 466;
    const COMMON_TABLE: bool = cfg!(any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "powerpc64",
        target_arch = "s390x"
    ));

    const UNKNOWN: u8 = 0;
    const PRESENT: u8 = 1;
    const MISSING: u8 = 2;
    static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

    /// Whether the calls can be used, probed once: a `getxattrat` of an unused name on `/`.
    /// ENOSYS (a kernel before 6.13) and EPERM (a seccomp filter older than the calls, as
    /// docker's default profile is) both mean no; any other answer means the call ran.
    pub fn present() -> bool {
        match STATE.load(Ordering::Relaxed) {
            PRESENT => true,
            MISSING => false,
            _ => {
                let ok = COMMON_TABLE && {
                    let mut buf = [0u8; 1];
                    let r = get_raw(libc::AT_FDCWD, c"/", c"user.strata.probe", &mut buf);
                    !matches!(r, Err(Errno::NOSYS | Errno::PERM))
                };
                STATE.store(if ok { PRESENT } else { MISSING }, Ordering::Relaxed);
                if !ok {
                    log::debug!(
                        "no getxattrat (kernel before 6.13 or a seccomp filter): xattrs by /proc path"
                    );
                }
                ok
            }
        }
    }

    /// Tests: take the /proc path as a kernel before 6.13 would (false: probe again).
    #[cfg(test)]
    pub fn force_missing(v: bool) {
        STATE.store(if v { MISSING } else { UNKNOWN }, Ordering::Relaxed);
    }

    #[repr(C)]
    struct XattrArgs {
        value: u64,
        size: u32,
        flags: u32,
    }

    fn last_errno() -> Errno {
        Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    fn get_raw(dir: i32, path: &CStr, name: &CStr, buf: &mut [u8]) -> SysResult<usize> {
        let mut args = XattrArgs {
            value: buf.as_mut_ptr() as u64,
            size: buf.len().min(u32::MAX as usize) as u32,
            flags: 0,
        };
        // SAFETY: valid NUL-terminated strings and an args struct whose buffer is `buf`,
        // all alive for the call; the kernel writes at most `size` bytes.
        let r = unsafe {
            libc::syscall(
                GETXATTRAT,
                dir,
                path.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
                name.as_ptr(),
                &mut args as *mut XattrArgs,
                std::mem::size_of::<XattrArgs>(),
            )
        };
        result(r)
    }

    /// `name` in `dir`, no final symlink followed.
    pub struct At<'a> {
        dir: BorrowedFd<'a>,
        path: CString,
    }

    /// None where the calls cannot serve: the kernel (or a seccomp filter) lacks them, or
    /// there is no name (they refuse an O_PATH fd with AT_EMPTY_PATH, EBADF).
    pub fn at<'a>(dir: BorrowedFd<'a>, name: Option<&OsStr>) -> Option<At<'a>> {
        if !present() {
            return None;
        }
        Some(At {
            dir,
            path: CString::new(name?.as_bytes()).ok()?,
        })
    }

    fn result(r: libc::c_long) -> SysResult<usize> {
        if r < 0 {
            Err(last_errno())
        } else {
            Ok(r as usize)
        }
    }

    fn cname(name: &OsStr) -> SysResult<CString> {
        CString::new(name.as_bytes()).map_err(|_| Errno::INVAL)
    }

    impl At<'_> {
        pub fn get(&self, name: &OsStr, buf: &mut [u8]) -> SysResult<usize> {
            get_raw(self.dir.as_raw_fd(), &self.path, &cname(name)?, buf)
        }

        pub fn list(&self, buf: &mut [u8]) -> SysResult<usize> {
            // SAFETY: a valid path string and a writable buffer of the given length.
            let r = unsafe {
                libc::syscall(
                    LISTXATTRAT,
                    self.dir.as_raw_fd(),
                    self.path.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            result(r)
        }

        pub fn set(&self, name: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
            let name = cname(name)?;
            let args = XattrArgs {
                value: value.as_ptr() as u64,
                size: value.len().min(u32::MAX as usize) as u32,
                flags: flags as u32,
            };
            // SAFETY: valid strings and an args struct pointing at `value`, which the
            // kernel only reads.
            let r = unsafe {
                libc::syscall(
                    SETXATTRAT,
                    self.dir.as_raw_fd(),
                    self.path.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
                    name.as_ptr(),
                    &args as *const XattrArgs,
                    std::mem::size_of::<XattrArgs>(),
                )
            };
            result(r).map(|_| ())
        }

        pub fn remove(&self, name: &OsStr) -> SysResult<()> {
            let name = cname(name)?;
            // SAFETY: valid NUL-terminated strings alive for the call.
            let r = unsafe {
                libc::syscall(
                    REMOVEXATTRAT,
                    self.dir.as_raw_fd(),
                    self.path.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
                    name.as_ptr(),
                )
            };
            result(r).map(|_| ())
        }
    }
}

/// The xattr call for a name in a directory: the *xattrat syscall where the kernel has it,
/// else `old` on the object's /proc path (always so for an O_PATH fd, `name` None).
fn xattr_at<T>(
    dir: BorrowedFd<'_>,
    name: Option<&OsStr>,
    new: impl FnOnce(&xattrat::At) -> SysResult<T>,
    old: impl FnOnce(CString) -> SysResult<T>,
) -> SysResult<T> {
    if let Some(a) = xattrat::at(dir, name) {
        return new(&a);
    }
    old(proc_path(dir, name))
}

/// getxattr without following symlinks.
pub fn getxattr(t: XTarget<'_>, name: &OsStr) -> SysResult<Vec<u8>> {
    let (d, n) = match t {
        XTarget::Fd(fd) => match buf_loop(|b| rustix::fs::fgetxattr(fd, name, b)) {
            // An O_PATH fd cannot do f*xattr.
            Err(Errno::BADF) => (fd, None),
            r => return r,
        },
        XTarget::At(d, n) => (d, Some(n)),
    };
    buf_loop(|b| {
        if let Some(a) = xattrat::at(d, n) {
            return a.get(name, b);
        }
        let p = proc_path(d, n);
        match n {
            Some(_) => rustix::fs::lgetxattr(p, name, b),
            None => rustix::fs::getxattr(p, name, b),
        }
    })
}

/// listxattr without following symlinks; returns the NUL-separated list split up.
pub fn listxattr(t: XTarget<'_>) -> SysResult<Vec<Vec<u8>>> {
    let (d, n) = match t {
        XTarget::Fd(fd) => match buf_loop(|b| rustix::fs::flistxattr(fd, b)) {
            Err(Errno::BADF) => (fd, None),
            r => return Ok(split_names(r?)),
        },
        XTarget::At(d, n) => (d, Some(n)),
    };
    let raw = buf_loop(|b| {
        if let Some(a) = xattrat::at(d, n) {
            return a.list(b);
        }
        let p = proc_path(d, n);
        match n {
            Some(_) => rustix::fs::llistxattr(p, b),
            None => rustix::fs::listxattr(p, b),
        }
    })?;
    Ok(split_names(raw))
}

fn split_names(raw: Vec<u8>) -> Vec<Vec<u8>> {
    raw.split(|c| *c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect()
}

/// setxattr without following symlinks. `flags` are XATTR_CREATE / XATTR_REPLACE.
pub fn setxattr(t: XTarget<'_>, name: &OsStr, value: &[u8], flags: i32) -> SysResult<()> {
    let fl = rustix::fs::XattrFlags::from_bits_retain(flags as u32);
    let (d, n) = match t {
        XTarget::Fd(fd) => match rustix::fs::fsetxattr(fd, name, value, fl) {
            Err(Errno::BADF) => (fd, None),
            r => return r,
        },
        XTarget::At(d, n) => (d, Some(n)),
    };
    xattr_at(
        d,
        n,
        |a| a.set(name, value, flags),
        |p| match n {
            Some(_) => rustix::fs::lsetxattr(p, name, value, fl),
            None => rustix::fs::setxattr(p, name, value, fl),
        },
    )
}

/// removexattr without following symlinks.
pub fn removexattr(t: XTarget<'_>, name: &OsStr) -> SysResult<()> {
    let (d, n) = match t {
        XTarget::Fd(fd) => match rustix::fs::fremovexattr(fd, name) {
            Err(Errno::BADF) => (fd, None),
            r => return r,
        },
        XTarget::At(d, n) => (d, Some(n)),
    };
    xattr_at(
        d,
        n,
        |a| a.remove(name),
        |p| match n {
            Some(_) => rustix::fs::lremovexattr(p, name),
            None => rustix::fs::removexattr(p, name),
        },
    )
}

/// `pread` into `buf` until it is full or the file ends; the count read. With `direct`
/// (an O_DIRECT file, offset and buffer page-aligned), a read that ends off a page
/// boundary ended at the end of the file, and the next one, at an unaligned offset, would
/// be refused: it stops there.
pub fn pread_into(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64, direct: bool) -> SysResult<usize> {
    let mut have = 0;
    while have < buf.len() {
        match rustix::io::pread(fd, &mut buf[have..], off + have as u64) {
            Ok(0) => break,
            Ok(n) => {
                have += n;
                if direct && n % 4096 != 0 {
                    break;
                }
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(have)
}

/// Read up to `len` bytes at `off`, fewer only at end of file, into a new buffer that is
/// not zeroed first (a FUSE read asks for up to a megabyte at a time).
pub fn pread_full(fd: BorrowedFd<'_>, len: usize, off: u64) -> SysResult<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let have = buf.len();
        let spare = &mut buf.spare_capacity_mut()[..len - have];
        match rustix::io::pread(fd, spare, off + have as u64) {
            Ok(([], _)) => break,
            Ok((done, _)) => {
                let n = done.len();
                // SAFETY: pread initialised the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(have + n) };
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// Limit the allocator to two arenas. The FUSE workers would otherwise each get one, and
/// a long-lived daemon's small, scattered allocations fragment across them.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before worker threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Wait until process `pid` (any process, not only a child) has exited, at most `timeout`,
/// through a pidfd. Err when pidfds are unavailable; Ok(false) on timeout.
pub fn wait_exit(pid: i32, timeout: std::time::Duration) -> SysResult<bool> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    // SAFETY: the fd was just returned by the kernel and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let mut p = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd, owned above for the duration of the call.
        let r = unsafe { libc::poll(p.as_mut_ptr(), 1, ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        if e != Errno::INTR {
            return Err(e);
        }
    }
}

/// Copy `len` bytes from `src` to `dst` (both at offset 0): a reflink where the filesystem
/// can, else copy_file_range, else read/write. Returns the method used, for logging.
pub fn copy_data(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, len: u64, whole: bool) -> SysResult<&'static str> {
    if len == 0 {
        return Ok("none");
    }
    if whole && rustix::fs::ioctl_ficlone(dst, src).is_ok() {
        return Ok("reflink");
    }
    let (mut off_in, mut off_out) = (0u64, 0u64);
    let mut method = "copy_file_range";
    while off_in < len {
        let chunk = (len - off_in).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk) {
            Ok(0) => break, // source shorter than expected: copy what is there
            Ok(_) => {}
            Err(Errno::INTR) => {}
            Err(Errno::XDEV) | Err(Errno::NOSYS) | Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) => {
                method = "read/write";
                let mut buf = vec![0u8; 1 << 20];
                while off_in < len {
                    let want = ((len - off_in) as usize).min(buf.len());
                    let n = rustix::io::pread(src, &mut buf[..want], off_in)?;
                    if n == 0 {
                        break;
                    }
                    write_all_at(dst, &buf[..n], off_out)?;
                    off_in += n as u64;
                    off_out += n as u64;
                }
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(method)
}

/// pwrite all of `data` at `off`.
pub fn write_all_at(fd: BorrowedFd<'_>, mut data: &[u8], mut off: u64) -> SysResult<()> {
    while !data.is_empty() {
        match rustix::io::pwrite(fd, data, off) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => {
                data = &data[n..];
                off += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A kernel file handle (`name_to_handle_at`), as stored in the overlay origin xattr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHandle {
    /// `handle_type` from the kernel.
    pub kind: i32,
    /// The opaque handle bytes.
    pub bytes: Vec<u8>,
}

const MAX_HANDLE_SZ: usize = 128;

#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// `name_to_handle_at(dir, name, ..., 0)`: the handle of `name` (not following symlinks).
pub fn name_to_handle(dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<FileHandle> {
    let cname = CString::new(name.as_bytes()).map_err(|_| Errno::INVAL)?;
    let mut h = RawHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `h` is a file_handle header followed by MAX_HANDLE_SZ bytes, as announced in
    // handle_bytes; the name is a valid C string; mount_id is a valid out pointer.
    let r = unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            cname.as_ptr(),
            (&mut h as *mut RawHandle).cast(),
            &mut mount_id,
            0,
        )
    };
    if r != 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    let n = (h.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok(FileHandle {
        kind: h.handle_type,
        bytes: h.f_handle[..n].to_vec(),
    })
}

/// `open_by_handle_at(mount_fd, handle, O_PATH)`. Needs CAP_DAC_READ_SEARCH.
pub fn open_by_handle(mount_fd: BorrowedFd<'_>, fh: &FileHandle) -> SysResult<OwnedFd> {
    if fh.bytes.len() > MAX_HANDLE_SZ {
        return Err(Errno::INVAL);
    }
    let mut h = RawHandle {
        handle_bytes: fh.bytes.len() as u32,
        handle_type: fh.kind,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    h.f_handle[..fh.bytes.len()].copy_from_slice(&fh.bytes);
    // SAFETY: `h` is a valid file_handle with handle_bytes within its buffer.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            (&mut h as *mut RawHandle).cast(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    // SAFETY: the kernel just gave us this fd and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The filesystem UUID (`FS_IOC_GETFSUUID`), or zeros where the filesystem has none.
pub fn fs_uuid(fd: BorrowedFd<'_>) -> [u8; 16] {
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    // _IOR(0x15, 0, struct fsuuid2), from linux/fs.h.
    const FS_IOC_GETFSUUID: libc::c_ulong =
        (2 << 30) | ((std::mem::size_of::<FsUuid2>() as libc::c_ulong) << 16) | (0x15 << 8);
    let mut u = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    // Opening "." gives a real fd even when `fd` is O_PATH (ioctl refuses O_PATH fds).
    let Ok(real) = open_beneath(fd, ".", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) else {
        return [0; 16];
    };
    // SAFETY: FS_IOC_GETFSUUID writes at most sizeof(struct fsuuid2) bytes into `u`.
    let r = unsafe { libc::ioctl(real.as_raw_fd(), FS_IOC_GETFSUUID as _, &mut u as *mut FsUuid2) };
    if r == 0 && u.len as usize == 16 {
        u.uuid
    } else {
        [0; 16]
    }
}

/// Raise the soft open-file limit to the hard limit: each cached directory holds fds.
pub fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
    rl.rlim_cur
}

/// Grow this process's fd table to `n` slots now. The kernel doubles the table as fds
/// are opened, and once the process has threads every doubling waits for an RCU grace
/// period (about 10 ms on this kind of VM): the first lookup in a 200-layer directory paid
/// that when its fds passed 256, and a big walk pays it at every power of two up to its fd
/// budget. Called before the daemon starts its threads, when growing is cheap.
pub fn reserve_fd_table(n: u32) {
    let Ok(root) = rustix::fs::open("/", OFlags::PATH | OFlags::CLOEXEC, Mode::empty()) else {
        return;
    };
    if n > 1 {
        // The lowest free fd >= n-1 makes the table at least n long; closing it keeps the size.
        drop(rustix::io::fcntl_dupfd_cloexec(&root, (n - 1) as i32));
    }
}

/// Is this process in the initial user namespace (the whole uid range mapped onto itself)?
/// Root in any other one (podman's rootless namespace) may not set `trusted.*` xattrs.
pub fn in_initial_userns() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
        let f: Vec<&str> = m.split_whitespace().collect();
        f == ["0", "0", "4294967295"]
    })
}

/// Root of the initial user namespace: the host's root, not a namespace's (not even the
/// one a rootless strata runs in).
pub fn host_root() -> bool {
    euid() == 0 && in_initial_userns()
}

/// SELinux is on: its file system is mounted (libselinux's test).
pub fn selinux_enabled() -> bool {
    rustix::fs::statfs("/sys/fs/selinux").is_ok_and(|s| s.f_type == 0xf97c_ff8c)
}

/// The calling process's effective uid.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The calling process's effective gid.
pub fn egid() -> u32 {
    rustix::process::getegid().as_raw()
}

/// Set the process umask, returning the old one.
pub fn set_umask(m: u32) -> u32 {
    rustix::process::umask(Mode::from_raw_mode(m)).bits()
}

/// Borrow helper for `Option<Arc<OwnedFd>>`-style holders.
pub fn bfd<F: AsFd>(f: &F) -> BorrowedFd<'_> {
    f.as_fd()
}

/// What `fork` returned.
#[derive(Debug, Clone, Copy)]
pub enum Forked {
    /// In the parent, with the child's pid.
    Parent(i32),
    /// In the child.
    Child,
}

/// fork(2). Callers must be single-threaded (strata forks from its main thread before any
/// worker thread starts), so the child may keep running ordinary Rust code.
pub fn fork() -> SysResult<Forked> {
    // SAFETY: see above; the caller guarantees there is no other thread whose locks or
    // state the child could inherit half-way.
    match unsafe { libc::fork() } {
        -1 => Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

static FORWARD_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
static SIGNALLED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
static WINCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGWINCH {
        WINCH.store(true, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    SIGNALLED.store(sig, std::sync::atomic::Ordering::Relaxed);
    let pid = FORWARD_TO.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Catch `sigs`: each is recorded (see `take_signal`) and, once `set_forward_pid` named a
/// process, passed on to it. Handlers do not restart syscalls, so a blocking poll/wait
/// returns EINTR and the caller can look.
pub fn catch_signals(sigs: &[i32]) {
    for &s in sigs {
        // SAFETY: a zeroed sigaction with a handler that only touches atomics and calls
        // kill(2), both async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(s, &sa, std::ptr::null_mut());
        }
    }
}

/// Restore the default action of `sigs` (in a child about to exec).
pub fn default_signals(sigs: &[i32]) {
    for &s in sigs {
        // SAFETY: installing SIG_DFL.
        unsafe {
            libc::signal(s, libc::SIG_DFL);
        }
    }
}

/// Pass caught signals on to `pid` from now on; one caught before (and not yet taken) is
/// passed on at once, so a Ctrl-C during setup still reaches the process.
pub fn set_forward_pid(pid: i32) {
    FORWARD_TO.store(pid, std::sync::atomic::Ordering::Relaxed);
    let pending = SIGNALLED.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 && pending != 0 {
        // SAFETY: kill(2) of the child the caller just started.
        unsafe { libc::kill(pid, pending) };
    }
}

/// The last signal caught (and forget it), if any.
pub fn take_signal() -> Option<i32> {
    match SIGNALLED.swap(0, std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        s => Some(s),
    }
}

/// Was SIGWINCH caught since the last call?
pub fn take_winch() -> bool {
    WINCH.swap(false, std::sync::atomic::Ordering::Relaxed)
}

/// Bring the loopback interface of the current network namespace up.
pub fn loopback_up() -> SysResult<()> {
    // SAFETY: a datagram socket and a zeroed ifreq carrying the name "lo"; the fd is closed
    // by OwnedFd.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
        }
        let _sock = OwnedFd::from_raw_fd(s);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, c) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *c as libc::c_char;
        }
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
        }
    }
    Ok(())
}

/// Send one fd over a unix socket (SCM_RIGHTS).
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> SysResult<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let fds = [fd];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    cmsg.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(
        sock,
        &[std::io::IoSlice::new(b"F")],
        &mut cmsg,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// Receive one fd sent with `send_fd`; None when the peer closed without sending.
pub fn recv_fd(sock: BorrowedFd<'_>) -> SysResult<Option<OwnedFd>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut buf = [0u8; 1];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    loop {
        match rustix::net::recvmsg(
            sock,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut cmsg,
            RecvFlags::empty(),
        ) {
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = m {
            return Ok(fds.next());
        }
    }
    Ok(None)
}

/// Remove every capability not in `keep` from the bounding set, so a process exec'd as root
/// afterwards gets only those (docker's default set, for containers).
pub fn restrict_capabilities(keep: &[u32]) -> SysResult<()> {
    clear_inheritable()?;
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl(PR_CAPBSET_DROP, cap) takes plain integers.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let e = Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO);
            // EINVAL: a capability this kernel does not know.
            if e != Errno::INVAL {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Empty the inheritable capability set: for root, exec grants inheritable | bounding, so
/// an inheritable capability outside the bounding set would survive the drop.
fn clear_inheritable() -> SysResult<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // _LINUX_CAPABILITY_VERSION_3: two 32-bit words.
    let mut h = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and room for the two words v3 uses.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) != 0 {
            return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
        }
        d[0].inheritable = 0;
        d[1].inheritable = 0;
        if libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) != 0 {
            return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
        }
    }
    Ok(())
}

/// Before exec in a container: every signal back to its default action (Rust ignores
/// SIGPIPE, which exec would pass on), an empty signal mask, and no ambient capabilities.
pub fn reset_for_exec() {
    // SAFETY: signal(2) with SIG_DFL and sigprocmask with an empty set; prctl with integers.
    unsafe {
        for s in 1..libc::SIGRTMAX() {
            if s != libc::SIGKILL && s != libc::SIGSTOP {
                libc::signal(s, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    // A signal caught before the handlers were reset (or handed down as pending by the
    // parent) would be lost: take its default action now.
    let pending = SIGNALLED.swap(0, std::sync::atomic::Ordering::Relaxed);
    if pending != 0 {
        // SAFETY: raise(3) of a signal whose action is now the default.
        unsafe { libc::raise(pending) };
    }
}

/// `openat2(dir, path, flags, RESOLVE_IN_ROOT)`: `path` resolved as if `dir` were `/`, so
/// absolute symlinks and `..` inside a container tree never reach the host. Retries EAGAIN.
pub fn open_in_root<P: AsRef<OsStr>>(
    dir: BorrowedFd<'_>,
    path: P,
    flags: OFlags,
    mode: Mode,
) -> SysResult<OwnedFd> {
    let how = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);
    loop {
        match rustix::fs::openat2(dir, path.as_ref(), flags | OFlags::CLOEXEC, mode, how) {
            Err(Errno::AGAIN) => continue,
            r => return r,
        }
    }
}

/// Saved standard output and error, for `restore_stdio`.
pub struct SavedStdio(OwnedFd, OwnedFd);

/// Point stdout and stderr at /dev/null (children inherit that); returns the old ones.
pub fn silence_stdio() -> SysResult<SavedStdio> {
    let out = rustix::io::fcntl_dupfd_cloexec(std::io::stdout().as_fd(), 3)?;
    let err = rustix::io::fcntl_dupfd_cloexec(std::io::stderr().as_fd(), 3)?;
    let null = rustix::fs::open("/dev/null", OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
    rustix::stdio::dup2_stdout(&null)?;
    rustix::stdio::dup2_stderr(&null)?;
    Ok(SavedStdio(out, err))
}

/// Undo `silence_stdio`.
pub fn restore_stdio(s: SavedStdio) {
    let _ = rustix::stdio::dup2_stdout(&s.0);
    let _ = rustix::stdio::dup2_stderr(&s.1);
}

/// Install a compiled seccomp program (classic BPF) in this thread, without setting
/// no_new_privs: the caller must hold CAP_SYS_ADMIN in its user namespace (docker leaves
/// no_new_privs off by default, so setuid programs in a container still work).
pub fn install_seccomp(prog: &[seccompiler::sock_filter]) -> SysResult<()> {
    let filters: Vec<libc::sock_filter> = prog
        .iter()
        .map(|f| libc::sock_filter {
            code: f.code,
            jt: f.jt,
            jf: f.jf,
            k: f.k,
        })
        .collect();
    let len = u16::try_from(filters.len()).map_err(|_| Errno::INVAL)?;
    let fprog = libc::sock_fprog {
        len,
        filter: filters.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp(2) copies the program from `fprog`, which points at `filters`, alive
    // for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    Ok(())
}

/// Make the mount at `fd` and every mount below it read-only (mount_setattr(2) with
/// AT_RECURSIVE, Linux 5.12+): a read-only volume must not have writable submounts.
pub fn readonly_recursive(fd: BorrowedFd<'_>) -> SysResult<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) reads `attr` (of the size passed) and the empty path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The xattr calls on a name in a directory and on an O_PATH fd, through the *xattrat
    /// syscalls and through /proc paths (what a kernel before 6.13 gets).
    #[test]
    fn xattr_calls_by_name_and_by_o_path_fd() {
        let t = std::env::temp_dir().join(format!("strata-xattrat-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(t.join("f"), "x").unwrap();
        let dir = rustix::fs::open(&t, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let opath = rustix::fs::open(t.join("sub"), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        std::os::unix::fs::symlink("f", t.join("link")).unwrap();
        let n = OsStr::new("user.strata.test");
        // On 6.13 and later the first pass must take the new calls.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|x| x.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        for old in [false, true] {
            xattrat::force_missing(old);
            if !old && (major, minor) >= (6, 13) {
                assert!(xattrat::present(), "kernel {release}: getxattrat not used");
            }
            for target in [
                XTarget::At(dir.as_fd(), OsStr::new("f")),
                XTarget::Fd(opath.as_fd()),
            ] {
                assert_eq!(getxattr(target, n), Err(Errno::NODATA), "old={old} {target:?}");
                setxattr(target, n, b"value", 0).unwrap();
                assert_eq!(getxattr(target, n).unwrap(), b"value");
                assert_eq!(setxattr(target, n, b"v", libc::XATTR_CREATE), Err(Errno::EXIST));
                assert!(listxattr(target).unwrap().iter().any(|x| x == n.as_bytes()));
                removexattr(target, n).unwrap();
                assert_eq!(removexattr(target, n), Err(Errno::NODATA));
                assert!(!listxattr(target).unwrap().iter().any(|x| x == n.as_bytes()));
            }
            // A long value takes the buffer-growing path.
            let big = vec![7u8; 3000];
            let f = XTarget::At(dir.as_fd(), OsStr::new("f"));
            setxattr(f, n, &big, 0).unwrap();
            assert_eq!(getxattr(f, n).unwrap(), big);
            removexattr(f, n).unwrap();
            assert_eq!(
                getxattr(XTarget::At(dir.as_fd(), OsStr::new("missing")), n),
                Err(Errno::NOENT)
            );
            // A final symlink is not followed (trusted.*: user.* is refused on symlinks).
            if rustix::process::geteuid().is_root() {
                let tn = OsStr::new("trusted.strata.test");
                let link = XTarget::At(dir.as_fd(), OsStr::new("link"));
                setxattr(link, tn, b"on-link", 0).unwrap();
                assert_eq!(getxattr(link, tn).unwrap(), b"on-link");
                assert_eq!(getxattr(f, tn), Err(Errno::NODATA), "followed the symlink");
                assert!(listxattr(link).unwrap().iter().any(|x| x == tn.as_bytes()));
                removexattr(link, tn).unwrap();
                assert_eq!(getxattr(link, tn), Err(Errno::NODATA));
            }
        }
        xattrat::force_missing(false);
        std::fs::remove_dir_all(&t).unwrap();
    }
}

/// The inode-flags ioctls (chattr, lsattr, xfs_io): which one, and its argument's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAttrIoctl {
    /// FS_IOC_GETFLAGS: an int of FS_*_FL flags.
    GetFlags,
    /// FS_IOC_SETFLAGS.
    SetFlags,
    /// FS_IOC_FSGETXATTR: a struct fsxattr (28 bytes).
    GetXattr,
    /// FS_IOC_FSSETXATTR.
    SetXattr,
}

/// struct fsxattr's size.
const FSXATTR_SIZE: usize = 28;

impl FileAttrIoctl {
    /// The ioctl a FUSE request names by its command number.
    pub fn from_cmd(cmd: u32) -> Option<FileAttrIoctl> {
        [
            FileAttrIoctl::GetFlags,
            FileAttrIoctl::SetFlags,
            FileAttrIoctl::GetXattr,
            FileAttrIoctl::SetXattr,
        ]
        .into_iter()
        .find(|op| op.request() as u32 == cmd)
    }

    pub fn sets(self) -> bool {
        matches!(self, FileAttrIoctl::SetFlags | FileAttrIoctl::SetXattr)
    }

    /// The argument's size (the flags are an int, whatever the command's encoded size says).
    pub fn arg_size(self) -> usize {
        match self {
            FileAttrIoctl::GetFlags | FileAttrIoctl::SetFlags => 4,
            FileAttrIoctl::GetXattr | FileAttrIoctl::SetXattr => FSXATTR_SIZE,
        }
    }

    fn request(self) -> libc::Ioctl {
        match self {
            FileAttrIoctl::GetFlags => libc::FS_IOC_GETFLAGS,
            FileAttrIoctl::SetFlags => libc::FS_IOC_SETFLAGS,
            // _IOR('X', 31, struct fsxattr) and _IOW('X', 32, ...); libc names neither.
            FileAttrIoctl::GetXattr => libc::_IOR::<[u8; FSXATTR_SIZE]>(b'X' as u32, 31),
            FileAttrIoctl::SetXattr => libc::_IOW::<[u8; FSXATTR_SIZE]>(b'X' as u32, 32),
        }
    }
}

/// Run inode-flags ioctl `op` on `fd` with `arg` (`op.arg_size()` bytes: read for a set,
/// filled for a get).
pub fn fileattr_ioctl(fd: BorrowedFd<'_>, op: FileAttrIoctl, arg: &mut [u8]) -> SysResult<()> {
    assert_eq!(arg.len(), op.arg_size(), "fileattr_ioctl argument size");
    // The flags word is an int however FS_IOC_GETFLAGS is encoded (the kernel reads and
    // writes 4 bytes); an aligned buffer of 8 covers both forms.
    let mut buf = [0u64; FSXATTR_SIZE.div_ceil(8)];
    // SAFETY: `buf` is 32 aligned bytes, at least the argument size; reinterpreting u64s as
    // bytes is always valid.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), 32) };
    bytes[..arg.len()].copy_from_slice(arg);
    // SAFETY: the request takes a pointer to an int or a struct fsxattr, both within the
    // 32 bytes behind `bytes`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), op.request(), bytes.as_mut_ptr()) };
    if r < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    arg.copy_from_slice(&bytes[..arg.len()]);
    Ok(())
}

/// Open the file behind `fd` again, as a new open file description with `flags`: a file
/// whose last name is gone can still be opened this way (through /proc/self/fd).
pub fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> SysResult<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::open(path.as_str(), flags | OFlags::CLOEXEC, Mode::empty())
}

/// chown, chmod and utimes of the object `fd` is open on (O_PATH too, which the f* calls
/// refuse), through /proc/self/fd. Owner first: chown clears setuid.
pub fn setattr_by_fd_path(
    fd: BorrowedFd<'_>,
    owner: Option<(Option<u32>, Option<u32>)>,
    mode: Option<u32>,
    times: Option<&rustix::fs::Timestamps>,
) -> SysResult<()> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    if let Some((uid, gid)) = owner {
        rustix::fs::chown(
            path.as_str(),
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
        )?;
    }
    if let Some(m) = mode {
        rustix::fs::chmod(path.as_str(), Mode::from_raw_mode(m & 0o7777))?;
    }
    if let Some(t) = times {
        rustix::fs::utimensat(rustix::fs::CWD, path.as_str(), t, AtFlags::empty())?;
    }
    Ok(())
}

/// An unnamed file in directory `dir` (O_TMPFILE), open with `flags` (which must write).
pub fn open_tmpfile(dir: BorrowedFd<'_>, flags: OFlags, mode: Mode) -> SysResult<OwnedFd> {
    rustix::fs::openat(dir, ".", flags | OFlags::TMPFILE | OFlags::CLOEXEC, mode)
}

/// Give the open file `fd` the name `name` in `dir`: through /proc/self/fd, which needs no
/// CAP_DAC_READ_SEARCH (AT_EMPTY_PATH does). The filesystem refuses a file whose links are
/// gone unless it is an O_TMPFILE file opened without O_EXCL.
pub fn link_open_file(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> SysResult<()> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::linkat(rustix::fs::CWD, path.as_str(), dir, name, AtFlags::SYMLINK_FOLLOW)
}
