//! The one place that knows how deletions and opaque directories are encoded on disk.
//!
//! Written (upper): a whiteout is a character device 0/0; an opaque directory carries
//! `<prefix>opaque = "y"` where prefix is `trusted.overlay.` (or `user.overlay.` in userxattr
//! mode). Read additionally, in every layer: AUFS/OCI `.wh.NAME` files and the
//! `.wh..wh..opq` marker file, since container tools extract layers that way and
//! fuse-overlayfs writes them into uppers; in lower layers also the
//! `user.fuseoverlayfs.opaque` xattr. Names starting with `.wh.` are never user data.

use std::ffi::{OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use rustix::fs::{FileType, Mode};
use rustix::io::Errno;

use super::xattr::XattrNs;
use crate::sys::{self, XTarget};

/// Prefix of AUFS/OCI whiteout files.
pub const WH_PREFIX: &[u8] = b".wh.";
/// Name of the AUFS/OCI opaque marker file.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Is this stat a whiteout (character device 0/0)?
pub fn is_whiteout(st: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Is this a whiteout by mode/rdev?
pub fn is_whiteout_mode(mode: u32, rdev: u64) -> bool {
    FileType::from_raw_mode(mode) == FileType::CharacterDevice && rdev == 0
}

/// For an AUFS whiteout file name `.wh.NAME`, the NAME it hides: a plain name, so not for
/// the opaque marker, nor `.wh..`, `.wh...` or `.wh..wh.X` (which hide nothing a layer can
/// hold, and would be hostile in an OCI layer).
pub fn aufs_target(name: &OsStr) -> Option<&OsStr> {
    let t = name.as_bytes().strip_prefix(WH_PREFIX)?;
    (!t.is_empty() && t != b"." && t != b".." && !t.starts_with(WH_PREFIX)).then(|| OsStr::from_bytes(t))
}

/// Is this name an AUFS marker (a `.wh.` file or the opaque marker)?
pub fn is_aufs_marker(name: &OsStr) -> bool {
    name.as_bytes().starts_with(WH_PREFIX)
}

/// Does directory `dir` hold the `.wh..wh..opq` marker (fuse-overlayfs puts one in every
/// directory it makes opaque, and relies on it alone where it cannot set xattrs)?
pub fn has_opaque_marker(dir: BorrowedFd<'_>) -> bool {
    sys::stat_at(dir, OsStr::new(OPAQUE_MARKER)).is_ok()
}

/// `.wh.NAME`.
pub fn aufs_name(name: &OsStr) -> OsString {
    let mut v = WH_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// Create a whiteout named `name` in `dir`.
pub fn make_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    rustix::fs::mknodat(dir, name, FileType::CharacterDevice, Mode::empty(), 0)
}

/// Mark the upper directory `dir` opaque.
pub fn set_opaque(t: XTarget<'_>, ns: XattrNs) -> Result<(), Errno> {
    sys::setxattr(t, &ns.name("opaque"), b"y", 0)
}

fn xattr_says_opaque(t: XTarget<'_>, names: &[Vec<u8>], accepted: &[&str]) -> bool {
    for want in accepted {
        if names.iter().any(|n| n.as_slice() == want.as_bytes()) {
            if let Ok(v) = sys::getxattr(t, OsStr::new(want)) {
                if v == b"y" || v == b"Y" {
                    return true;
                }
            }
        }
    }
    false
}

/// Is the upper directory opaque, in either namespace? For reading uppers offline (commit,
/// diff), when which mode wrote them is not known. `names` is its xattr list.
pub fn upper_is_opaque(t: XTarget<'_>, names: &[Vec<u8>]) -> bool {
    xattr_says_opaque(t, names, &["trusted.overlay.opaque", "user.overlay.opaque"])
}

/// Is the upper directory opaque for a mount in namespace `ns`? Like the kernel, only that
/// namespace counts, so a user setting `user.overlay.opaque` on a trusted-mode mount hides
/// nothing.
pub fn upper_is_opaque_in(t: XTarget<'_>, names: &[Vec<u8>], ns: XattrNs) -> bool {
    let n = ns.name("opaque");
    xattr_says_opaque(t, names, &[n.to_str().expect("ASCII")])
}

/// The kernel's redirect xattr of an upper directory (`<prefix>redirect`), if it has one.
/// A value that is neither one name nor an absolute path of plain names is an error (EIO),
/// as for the kernel: it could otherwise lead a lookup outside the layer.
pub fn upper_redirect(t: XTarget<'_>, names: &[Vec<u8>], ns: XattrNs) -> Result<Option<Vec<u8>>, Errno> {
    let n = ns.name("redirect");
    if !names.iter().any(|x| x.as_slice() == n.as_bytes()) {
        return Ok(None);
    }
    let v = sys::getxattr(t, &n)?;
    check_redirect(&v)?;
    Ok(Some(v))
}

/// Is `v` a redirect the kernel would follow: `name`, or `/a/b/c` with no empty, `.` or
/// `..` component?
pub fn check_redirect(v: &[u8]) -> Result<(), Errno> {
    let bad = |c: &[u8]| c.is_empty() || c == b"." || c == b".." || c.contains(&0);
    let ok = match v.strip_prefix(b"/") {
        Some(rest) => !rest.split(|&b| b == b'/').any(bad),
        None => !v.contains(&b'/') && !bad(v),
    };
    if ok {
        Ok(())
    } else {
        log::error!("invalid redirect xattr {:?}", String::from_utf8_lossy(v));
        Err(Errno::IO)
    }
}

/// Set the redirect xattr of an upper directory.
pub fn set_redirect(t: XTarget<'_>, ns: XattrNs, v: &[u8]) -> Result<(), Errno> {
    sys::setxattr(t, &ns.name("redirect"), v, 0)
}

/// What a lower directory says about the layers below it: whether it is opaque (by any of
/// the markers container tools use), and the redirect it carries (kernel format, in the
/// mount's namespace `ns` only, as the kernel reads it: in the other one it is user data).
/// One listxattr for the common directory that has neither.
pub fn lower_dir_marks(dir: BorrowedFd<'_>, ns: XattrNs) -> Result<(bool, Option<Vec<u8>>), Errno> {
    let t = XTarget::Fd(dir);
    let names = sys::listxattr(t).unwrap_or_default();
    if !names.is_empty() {
        if xattr_says_opaque(
            t,
            &names,
            &[
                "trusted.overlay.opaque",
                "user.overlay.opaque",
                "user.fuseoverlayfs.opaque",
            ],
        ) {
            return Ok((true, None));
        }
        if let Some(r) = upper_redirect(t, &names, ns)? {
            return Ok((false, Some(r)));
        }
    }
    Ok((sys::stat_at(dir, OsStr::new(OPAQUE_MARKER)).is_ok(), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aufs_names() {
        assert_eq!(aufs_target(OsStr::new(".wh.foo")), Some(OsStr::new("foo")));
        assert_eq!(aufs_target(OsStr::new(".wh..wh..opq")), None);
        assert_eq!(aufs_target(OsStr::new(".wh.")), None);
        assert_eq!(aufs_target(OsStr::new("foo")), None);
        assert_eq!(aufs_name(OsStr::new("a b")), OsString::from(".wh.a b"));
        assert!(is_aufs_marker(OsStr::new(".wh..wh..opq")));
    }

    #[test]
    fn redirect_values() {
        for ok in [&b"a"[..], b"/a", b"/a/b c/d", b".hidden"] {
            assert!(check_redirect(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            &b""[..],
            b"/",
            b"a/b",
            b"/a//b",
            b"/a/",
            b"/a/../b",
            b"..",
            b".",
            b"/a/./b",
        ] {
            assert_eq!(check_redirect(bad), Err(Errno::IO), "{bad:?}");
        }
    }

    #[test]
    fn whiteout_mode() {
        assert!(is_whiteout_mode(libc::S_IFCHR, 0));
        assert!(!is_whiteout_mode(libc::S_IFCHR, 0x0101));
        assert!(!is_whiteout_mode(libc::S_IFREG, 0));
    }
}
