//! Paths from untrusted sources: entries of layer tars and image archives, symlink targets
//! inside an archive, COPY/ADD sources, volume targets and mount-point stubs of a
//! container. The rule is here and nowhere else:
//!
//! A path is split on `/`; empty and `.` components are dropped; `..` removes the component
//! before it. At the top, `..` of an absolute path stays at the root (`/..` is `/`, as in a
//! container), and `..` of a relative path is an error: it would leave the root it is
//! relative to. The result is a list of plain names below that root.
//!
//! Entries of layer tars and image archives are stricter ([`entry`]): they may not be
//! absolute or contain `..` at all (no legitimate archive needs either, and these are
//! unpacked as root).
//!
//! A cleaned path is never opened by string: `sys::open_beneath` (RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS, for trees strata writes itself) and `sys::open_in_root`
//! (RESOLVE_IN_ROOT, for trees whose symlinks are resolved as the container sees them) are
//! the only openat2 callers, and retry EAGAIN.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// Why a path from an untrusted source was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A relative path whose `..` climbs above its root.
    #[error("it leaves its root ('..' above the top)")]
    Escapes,
    /// An archive entry that is absolute.
    #[error("absolute path")]
    Absolute,
    /// An archive entry with a `..` component.
    #[error("path contains '..'")]
    DotDot,
}

/// The plain names of `raw` below its root, by the rule above.
pub fn components(raw: &[u8]) -> Result<Vec<OsString>, PathError> {
    let absolute = raw.first() == Some(&b'/');
    let mut out: Vec<OsString> = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() && !absolute {
                    return Err(PathError::Escapes);
                }
            }
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Ok(out)
}

/// [`components`] joined with `/` (empty for the root).
pub fn clean(raw: &str) -> Result<String, PathError> {
    Ok(join(&components(raw.as_bytes())?).to_string_lossy().into_owned())
}

/// The names of an entry of a layer tar or image archive: relative, no `..`, then cleaned.
pub fn entry(raw: &[u8]) -> Result<Vec<OsString>, PathError> {
    if raw.first() == Some(&b'/') {
        return Err(PathError::Absolute);
    }
    if raw.split(|b| *b == b'/').any(|c| c == b"..") {
        return Err(PathError::DotDot);
    }
    components(raw)
}

/// Names joined with `/`.
pub fn join(c: &[OsString]) -> OsString {
    let mut v = Vec::new();
    for (i, p) in c.iter().enumerate() {
        if i > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(p.as_bytes());
    }
    OsString::from_vec(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[OsString]) -> Vec<&str> {
        v.iter().map(|c| c.to_str().unwrap()).collect()
    }

    #[test]
    fn one_rule() {
        assert_eq!(s(&components(b"./a//b/").unwrap()), ["a", "b"]);
        assert_eq!(s(&components(b"a/../b").unwrap()), ["b"]);
        assert_eq!(s(&components(b"/a/../b").unwrap()), ["b"]);
        // The root's parent is the root for an absolute path...
        assert_eq!(s(&components(b"/../../etc").unwrap()), ["etc"]);
        // ...and an escape for a relative one.
        assert_eq!(components(b"../x"), Err(PathError::Escapes));
        assert_eq!(components(b"a/../../b"), Err(PathError::Escapes));
        assert!(components(b"./").unwrap().is_empty());
        assert_eq!(clean("./a/../b/").unwrap(), "b");
        assert_eq!(clean("/").unwrap(), "");
    }

    #[test]
    fn archive_entries() {
        assert_eq!(s(&entry(b"./a//b/").unwrap()), ["a", "b"]);
        assert_eq!(entry(b"/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(entry(b"a/../b"), Err(PathError::DotDot));
        assert!(entry(b"./").unwrap().is_empty());
    }
}
