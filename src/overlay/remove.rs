//! Removing objects: unlink and rmdir, with whiteouts where lower content must stay hidden.

use std::ffi::OsStr;

use rustix::fs::{AtFlags, RenameFlags};
use rustix::io::Errno;

use super::*;
use crate::sys::{self};

impl Overlay {
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
                whiteout::make_whiteout(s.dir(), s.name())?;
                s.place(ufd, name, RenameFlags::empty())?;
            } else {
                rustix::fs::unlinkat(ufd, name, AtFlags::empty())?;
            }
        } else {
            whiteout::make_whiteout(ufd, name)?;
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
                whiteout::make_whiteout(s.dir(), s.name())?;
                s.place(ufd, name, RenameFlags::EXCHANGE)?;
                s.discard()?;
            } else {
                let d = sys::open_dir_beneath(ufd, name)?;
                layers::remove_children(&d)?;
                rustix::fs::unlinkat(ufd, name, AtFlags::REMOVEDIR)?;
            }
        } else {
            whiteout::make_whiteout(ufd, name)?;
        }
        self.drop_cached(&found);
        self.dir_changed(found.ino);
        self.forget_name(found.ino, parent, name);
        self.object_gone(&found, None);
        Ok(())
    }
}
