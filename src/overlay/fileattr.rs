//! Inode flags (chattr and lsattr: FS_IOC_GETFLAGS, FS_IOC_FSGETXATTR and their setters), as
//! overlayfs does them: read from the real object in whichever layer it is, set on the
//! upper object after a copy-up. The kernel checks ownership and CAP_LINUX_IMMUTABLE before
//! it asks.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{Mode, OFlags};

use super::{Errno, Kind, Overlay, Result};
use crate::sys::{self, FileAttrIoctl};

impl Overlay {
    /// Inode-flags ioctl `op` on node `ino`; `fh`: the handle the kernel opened for it (a
    /// file's also works after its last name is gone); `arg`: the new value of a set.
    /// Returns what a get reads.
    pub fn fileattr(&self, ino: u64, fh: Option<u64>, op: FileAttrIoctl, arg: &[u8]) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; op.arg_size()];
        if op.sets() {
            let v = arg.get(..buf.len()).ok_or(Errno::INVAL)?;
            buf.copy_from_slice(v);
            self.upper()?;
            self.copy_up(ino)?;
        }
        let fd = self.fileattr_fd(ino, fh, op.sets())?;
        sys::fileattr_ioctl(fd.as_fd(), op, &mut buf)?;
        Ok(if op.sets() { Vec::new() } else { buf })
    }

    /// An fd of the real object that takes an ioctl (not O_PATH); the upper one for a set.
    fn fileattr_fd(&self, ino: u64, fh: Option<u64>, upper: bool) -> Result<Arc<OwnedFd>> {
        if self.with_node(ino, |n| n.kind)? == Kind::Dir {
            let fds = self.dir_fds(ino)?;
            let d = if upper { fds.upper() } else { fds.top() }.ok_or(Errno::IO)?;
            // The cached fd may be O_PATH (a directory root may not read): open it again.
            return Ok(Arc::new(sys::open_beneath(
                d,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                Mode::empty(),
            )?));
        }
        // By name, as overlayfs takes the object's current real file: a handle may predate
        // a copy-up. Under the read lock an unlink or rename cannot come between the name
        // and the open (see `open_file`). Once the last name is gone (an fd of an unlinked
        // file), the handle the kernel opened is the way.
        let _ns = self.ns_lock.read().unwrap();
        let by_name = self.loc(ino).and_then(|loc| {
            Ok(Arc::new(sys::open_beneath(
                loc.dir()?,
                &loc.name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
                Mode::empty(),
            )?))
        });
        match by_name {
            Err(e @ (Errno::STALE | Errno::NOENT)) => fh.and_then(|h| self.file(h).ok()).ok_or(e),
            r => r,
        }
    }
}
