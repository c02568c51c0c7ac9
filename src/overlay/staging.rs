//! Staging: an object is built under `workdir/work` and renamed into place in one step, so
//! a crash never leaves a half-made object visible in the upper. What was not placed (an
//! error on the way, or what an exchange displaced) is removed when the guard drops.

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;

use rustix::fs::RenameFlags;

use super::{layers, Overlay, Result};

/// A name in the work directory that is removed on drop unless it was placed.
pub(crate) struct Staged<'a> {
    work: BorrowedFd<'a>,
    name: OsString,
    placed: bool,
}

impl Overlay {
    /// A fresh staging name; nothing is created yet.
    pub(crate) fn stage(&self) -> Result<Staged<'_>> {
        let up = self.upper()?;
        Ok(Staged {
            work: std::os::fd::AsFd::as_fd(&up.work),
            name: self.tmp_name(),
            placed: false,
        })
    }
}

impl<'a> Staged<'a> {
    /// The work directory.
    pub fn dir(&self) -> BorrowedFd<'a> {
        self.work
    }
    /// The staging name in it.
    pub fn name(&self) -> &OsStr {
        &self.name
    }
    /// Rename the staged object to `name` in `dir`. With RENAME_EXCHANGE the displaced
    /// object takes the staging name and is removed when the guard drops (or by `discard`).
    pub fn place(&mut self, dir: BorrowedFd<'_>, name: &OsStr, flags: RenameFlags) -> Result<()> {
        rustix::fs::renameat_with(self.work, &self.name, dir, name, flags)?;
        if !flags.contains(RenameFlags::EXCHANGE) {
            self.placed = true;
        }
        Ok(())
    }
    /// Remove what is at the staging name now, reporting errors (drop ignores them).
    pub fn discard(mut self) -> Result<()> {
        self.placed = true;
        layers::remove_tree_at(self.work, &self.name)
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.placed {
            let _ = layers::remove_tree_at(self.work, &self.name);
        }
    }
}
