//! Extended attributes: the one owner of the rules for overlay-private names (which
//! namespace the mount writes, what is bookkeeping, and the kernel's escaping of user data
//! in the private namespace).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use std::sync::atomic::Ordering;

use super::*;
use crate::sys::{self, XTarget};

/// Which namespace the overlay-private xattrs live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrNs {
    /// `trusted.overlay.*` (privileged, the kernel default).
    Trusted,
    /// `user.overlay.*` (the kernel's `userxattr` mode, for rootless use).
    User,
}

impl XattrNs {
    /// The prefix, with the trailing dot.
    pub fn prefix(self) -> &'static str {
        match self {
            XattrNs::Trusted => "trusted.overlay.",
            XattrNs::User => "user.overlay.",
        }
    }
    /// Full name of a private xattr such as "opaque" or "origin".
    pub fn name(self, what: &str) -> OsString {
        OsString::from(format!("{}{}", self.prefix(), what))
    }
}

/// Every xattr name that is overlay bookkeeping, never user data: hidden from listings,
/// never copied up, never exported into a layer.
/// Escaped names (`trusted.overlay.overlay.*`) are user data of a nested overlay.
pub fn is_private_xattr(name: &[u8]) -> bool {
    if name.starts_with(b"trusted.overlay.overlay.") || name.starts_with(b"user.overlay.overlay.") {
        return false;
    }
    name.starts_with(b"trusted.overlay.")
        || name.starts_with(b"user.overlay.")
        || name.starts_with(b"user.fuseoverlayfs.")
}

impl XattrNs {
    /// The namespace a mount made by this process uses without `userxattr`: trusted for
    /// the host's root, user otherwise (also root of a user namespace, where trusted.* is
    /// refused). Uppers strata wrote are read back by it (commit, diff).
    pub fn by_privilege() -> XattrNs {
        if crate::sys::host_root() {
            XattrNs::Trusted
        } else {
            XattrNs::User
        }
    }

    /// Overlay bookkeeping of this namespace (escaped names are user data): what copy-up
    /// leaves behind, as the kernel does.
    pub fn is_private(self, name: &[u8]) -> bool {
        let p = self.prefix().as_bytes();
        name.starts_with(p) && !name[p.len()..].starts_with(b"overlay.")
    }
}

impl Overlay {
    // ----- xattrs --------------------------------------------------------------------

    /// The name an xattr is stored under. Like the kernel since 6.7, names in the private
    /// namespace are escaped (`trusted.overlay.X` is kept as `trusted.overlay.overlay.X`),
    /// so an overlay can be the lower layer of another one.
    pub(crate) fn stored_xattr_name(&self, name: &OsStr) -> OsString {
        let p = self.ns.prefix().as_bytes();
        match name.as_bytes().strip_prefix(p) {
            Some(rest) => {
                let mut v = p.to_vec();
                v.extend_from_slice(b"overlay.");
                v.extend_from_slice(rest);
                OsString::from_vec(v)
            }
            None => name.to_owned(),
        }
    }

    /// The node may have changed its xattrs: forget that it had none. The epoch tells a
    /// getxattr that listed the names meanwhile that its answer may be stale.
    pub(crate) fn xattrs_changed(&self, ino: u64) {
        self.xattr_epoch.fetch_add(1, Ordering::SeqCst);
        if self.with_node(ino, |n| n.no_xattrs).unwrap_or(false) {
            if let Some(n) = self.nodes.write().unwrap().get_mut(&ino) {
                n.no_xattrs = false;
            }
        }
    }

    /// A file just made, through its open `fd`: if it carries no xattrs (no ACL inherited
    /// from the parent, no LSM label), say so now, so the kernel's `security.capability`
    /// check before its first write costs no syscall (rather than a getxattr and a
    /// listxattr by path).
    pub(crate) fn note_fresh_xattrs(&self, ino: u64, fd: BorrowedFd<'_>) {
        let epoch = self.xattr_epoch.load(Ordering::SeqCst);
        if sys::listxattr(XTarget::Fd(fd)).is_ok_and(|l| l.is_empty()) {
            if let Some(n) = self.nodes.write().unwrap().get_mut(&ino) {
                if self.xattr_epoch.load(Ordering::SeqCst) == epoch {
                    n.no_xattrs = true;
                }
            }
        }
    }

    /// getxattr. A miss lists the names once, so later misses on an object without xattrs
    /// (the common case) cost no syscall.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>> {
        let r = self.getxattr_stored(ino, name);
        // Without SELinux on the host, `ls -l` and friends ask every file for its label, and
        // FUSE caches no xattr: one round trip per file. EOPNOTSUPP is what a file system
        // without labels answers, and they stop asking for the whole device (coreutils
        // remembers it per st_dev). A label a file does carry is still returned. With
        // SELinux on, the LSM answers for security.selinux itself, and ENODATA is kept.
        match r {
            Err(Errno::NODATA) if self.no_selinux && name.as_bytes() == b"security.selinux" => {
                Err(Errno::OPNOTSUPP)
            }
            r => r,
        }
    }

    fn getxattr_stored(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>> {
        if self.with_node(ino, |n| n.no_xattrs)? {
            return Err(Errno::NODATA);
        }
        let real = self.stored_xattr_name(name);
        let epoch = self.xattr_epoch.load(Ordering::SeqCst);
        self.with_target(ino, |t| match sys::getxattr(t, &real) {
            Err(Errno::NODATA) => {
                if sys::listxattr(t).is_ok_and(|l| l.is_empty()) {
                    // Under the table lock, so a change cannot slip between check and set.
                    if let Some(n) = self.nodes.write().unwrap().get_mut(&ino) {
                        if self.xattr_epoch.load(Ordering::SeqCst) == epoch {
                            n.no_xattrs = true;
                        }
                    }
                }
                Err(Errno::NODATA)
            }
            r => r,
        })
    }

    /// listxattr: overlay bookkeeping hidden, escaped names shown unescaped.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let names = self.with_target(ino, sys::listxattr)?;
        let p = self.ns.prefix().as_bytes();
        let mut out = Vec::new();
        for n in names {
            match n.strip_prefix(p) {
                Some(rest) => match rest.strip_prefix(b"overlay.") {
                    Some(user) => {
                        out.extend_from_slice(p);
                        out.extend_from_slice(user);
                    }
                    None => continue,
                },
                None => out.extend_from_slice(&n),
            }
            out.push(0);
        }
        Ok(out)
    }

    /// setxattr: copies up first.
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.upper()?;
        let real = self.stored_xattr_name(name);
        self.copy_up(ino)?;
        self.xattrs_changed(ino);
        let r = self.with_target(ino, |t| sys::setxattr(t, &real, value, flags));
        self.xattrs_changed(ino);
        r
    }

    /// removexattr: copies up first, unless the attribute does not exist at all.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<()> {
        self.upper()?;
        let real = self.stored_xattr_name(name);
        if !self.with_node(ino, |n| n.upper)? {
            self.with_target(ino, |t| sys::getxattr(t, &real))?;
            self.copy_up(ino)?;
        }
        let r = self.with_target(ino, |t| sys::removexattr(t, &real));
        self.xattrs_changed(ino);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_names() {
        assert!(is_private_xattr(b"trusted.overlay.opaque"));
        assert!(is_private_xattr(b"user.overlay.origin"));
        assert!(is_private_xattr(b"user.fuseoverlayfs.opaque"));
        assert!(!is_private_xattr(b"user.overlayfoo"));
        assert!(!is_private_xattr(b"security.capability"));
        assert!(!is_private_xattr(b"trusted.overlay.overlay.opaque"));
    }
}
