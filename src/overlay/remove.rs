//! Removing objects: unlink and rmdir, with whiteouts where lower content must stay hidden.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{AtFlags, RenameFlags};
use rustix::io::Errno;

use super::*;
use crate::sys::{self};

/// The whiteout in `work/` that whiteouts are hard links to, as the kernel's overlayfs
/// shares one inode among its whiteouts (Linux 5.8+): a `mknod` takes an inode per
/// whiteout (an `rm -rf` of 100k lower files, 100k inodes of the upper file system), a
/// link only a directory entry. Made at the first whiteout; a new one when the old one is
/// full (EMLINK: ext4 allows 65000 links) or gone. The next mount empties `work/` (as the
/// kernel's does); the whiteouts in the upper keep the inode.
#[derive(Debug, Default)]
pub(crate) struct SharedWhiteout {
    /// Its name in `work/`, once made.
    name: Option<OsString>,
    /// Making or linking it failed otherwise: every whiteout gets an inode of its own.
    off: bool,
}

impl Overlay {
    /// Make a whiteout named `name` in `dir` (in the upper or `work/`): a link to the shared
    /// whiteout, or its own `mknod` where linking is refused.
    pub(crate) fn put_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        let work = self.upper()?.work.as_fd();
        // Twice at most: a shared whiteout found full or gone is replaced once.
        for _ in 0..2 {
            let shared = {
                let mut sw = self.shared_whiteout.lock().unwrap();
                if sw.off {
                    break;
                }
                match &sw.name {
                    Some(n) => n.clone(),
                    None => {
                        let n = self.tmp_name();
                        if let Err(e) = whiteout::make_whiteout(work, &n) {
                            log::debug!("no shared whiteout in work/ ({e}): one inode per whiteout");
                            sw.off = true;
                            break;
                        }
                        sw.name = Some(n.clone());
                        n
                    }
                }
            };
            match rustix::fs::linkat(work, &shared, dir, name, AtFlags::empty()) {
                Ok(()) => return Ok(()),
                Err(Errno::EXIST) => return Err(Errno::EXIST),
                Err(Errno::MLINK | Errno::NOENT) => {
                    let mut sw = self.shared_whiteout.lock().unwrap();
                    if sw.name.as_ref() == Some(&shared) {
                        let _ = rustix::fs::unlinkat(work, &shared, AtFlags::empty());
                        sw.name = None;
                    }
                }
                Err(e) => {
                    log::debug!("cannot link the shared whiteout ({e}): one inode per whiteout");
                    self.shared_whiteout.lock().unwrap().off = true;
                    break;
                }
            }
        }
        whiteout::make_whiteout(dir, name)
    }

    // ----- removing ------------------------------------------------------------------

    /// unlink: remove a non-directory. A lower object gets a whiteout and is never copied up.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        let _changed = self.changing(parent);
        self.upper()?;
        let found = self.resolve(parent, name)?;
        if found.kind == Kind::Dir {
            return Err(Errno::ISDIR);
        }
        self.copy_up(parent)?;
        let pfds = self.dir_fds(parent)?;
        let ufd = pfds.upper().ok_or(Errno::IO)?;
        // No lookup may resolve the name before this and record it after (see `ns_lock`).
        let _ns = self.ns_lock.write().unwrap();
        let special = self.special_fd(&found, &pfds, name);
        if found.upper {
            if self.lower_positive(parent, name)? {
                let mut s = self.stage()?;
                self.put_whiteout(s.dir(), s.name())?;
                s.place(ufd, name, RenameFlags::empty())?;
            } else {
                rustix::fs::unlinkat(ufd, name, AtFlags::empty())?;
            }
        } else {
            self.put_whiteout(ufd, name)?;
        }
        self.drop_cached(&found);
        self.forget_name(found.ino, parent, name);
        self.object_gone(&found, special);
        Ok(())
    }

    /// rmdir: the merged directory must be empty; whiteouts inside the upper go with it
    /// (and so does any listing of it still cached).
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        let _changed = self.changing(parent);
        self.upper()?;
        let found = self.resolve(parent, name)?;
        if found.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        {
            let fds = found.fds.as_ref().ok_or(Errno::IO)?;
            if !self
                .read_merged(
                    fds,
                    &found.lower_dirs,
                    self.cached_index(found.ino, &found.lower_dirs).as_deref(),
                    false,
                )?
                .is_empty()
            {
                return Err(Errno::NOTEMPTY);
            }
        }
        self.copy_up(parent)?;
        let pfds = self.dir_fds(parent)?;
        let ufd = pfds.upper().ok_or(Errno::IO)?;
        // No lookup may resolve the name before this and record it after (see `ns_lock`).
        let _ns = self.ns_lock.write().unwrap();
        if found.upper {
            if self.lower_positive(parent, name)? {
                // Swap a whiteout in, then remove the old directory (with the whiteouts
                // it still holds) out of sight.
                let mut s = self.stage()?;
                self.put_whiteout(s.dir(), s.name())?;
                s.place(ufd, name, RenameFlags::EXCHANGE)?;
                s.discard()?;
            } else {
                let d = sys::open_dir_beneath(ufd, name)?;
                layers::remove_children(&d)?;
                rustix::fs::unlinkat(ufd, name, AtFlags::REMOVEDIR)?;
            }
        } else {
            self.put_whiteout(ufd, name)?;
        }
        self.drop_cached(&found);
        self.dir_changed(found.ino);
        self.forget_name(found.ino, parent, name);
        self.object_gone(&found, None);
        Ok(())
    }
}
