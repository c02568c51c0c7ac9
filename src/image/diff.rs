//! Changes between an upper directory and its base, or between two images.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{FileType, Mode, OFlags};
use serde::Serialize;

use super::tree::Tree;
use crate::overlay::{whiteout, Attr, Kind};
use crate::sys::{self, XTarget};

/// One change, as `docker diff` prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Change {
    /// Absolute path.
    pub path: String,
    /// 'A' added, 'C' changed, 'D' deleted.
    pub kind: char,
}

/// Changes an upper directory makes to `base`, the tree of `lowers` (top first; what
/// the upper was mounted over, needed for the content of renamed directories).
pub fn diff_upper(upper: &Path, base: &Tree, lowers: &[PathBuf]) -> Result<Vec<Change>> {
    let root = rustix::fs::open(
        upper,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("upper directory '{}'", upper.display()))?;
    let mut out = Vec::new();
    let mut merged = None;
    let mut w = Walk {
        upper,
        lowers,
        base,
        merged: &mut merged,
    };
    walk_upper(root.as_fd(), "", &mut w, &mut out)?;
    out.sort();
    out.dedup();
    Ok(out)
}

struct Walk<'a> {
    upper: &'a Path,
    lowers: &'a [PathBuf],
    base: &'a Tree,
    /// The upper over `lowers`, opened at the first renamed directory.
    merged: &'a mut Option<Tree>,
}

fn walk_upper(dir: BorrowedFd<'_>, rel: &str, w: &mut Walk<'_>, out: &mut Vec<Change>) -> Result<()> {
    let base = w.base;
    for ent in rustix::fs::Dir::read_from(dir)? {
        let ent = ent?;
        let nb = ent.file_name().to_bytes();
        if nb == b"." || nb == b".." {
            continue;
        }
        let name = OsStr::from_bytes(nb);
        if whiteout::is_aufs_marker(name) {
            // fuse-overlayfs's markers, read as the overlay reads them: the opaque one is
            // seen with its directory; `.wh.NAME` deletes NAME unless the upper has it again.
            if let Some(t) = whiteout::aufs_target(name) {
                if sys::stat_at(dir, t).is_err() {
                    out.push(Change {
                        path: format!("/{rel}{}", t.to_string_lossy()),
                        kind: 'D',
                    });
                }
            }
            continue;
        }
        let path = format!("{rel}{}", name.to_string_lossy());
        let st = sys::stat_at(dir, name)?;
        if whiteout::is_whiteout(&st) {
            out.push(Change {
                path: format!("/{path}"),
                kind: 'D',
            });
            continue;
        }
        let in_base = base.lookup(&path);
        let kind = if in_base.is_some() { 'C' } else { 'A' };
        out.push(Change {
            path: format!("/{path}"),
            kind,
        });
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let d = sys::open_dir_beneath(dir, name)?;
            let t = XTarget::Fd(d.as_fd());
            let xnames = sys::listxattr(t).unwrap_or_default();
            let opaque = whiteout::upper_is_opaque(t, &xnames) || whiteout::has_opaque_marker(d.as_fd());
            if !opaque && super::layer::upper_redirect(t, &xnames)?.is_some() {
                // Renamed here: as docker's full-tree diff reports it, everything now
                // below it is added (or changed where the base had the same path), and
                // what the base had there and is gone is deleted.
                if w.merged.is_none() {
                    let mut layers = vec![w.upper.to_path_buf()];
                    layers.extend(w.lowers.iter().cloned());
                    *w.merged = Some(Tree::open(layers)?);
                }
                let merged = w.merged.as_ref().expect("just opened");
                let mut now = HashSet::new();
                merged.walk_under(&path, &mut |n| {
                    now.insert(n.path.clone());
                    let kind = if base.lookup(&n.path).is_some() { 'C' } else { 'A' };
                    out.push(Change {
                        path: format!("/{}", n.path),
                        kind,
                    });
                    Ok(())
                })?;
                if in_base.is_some_and(|a| a.kind == Kind::Dir) {
                    base.walk_under(&path, &mut |n| {
                        if !now.contains(&n.path) {
                            out.push(Change {
                                path: format!("/{}", n.path),
                                kind: 'D',
                            });
                        }
                        Ok(())
                    })?;
                }
                continue;
            }
            if opaque && in_base.is_some_and(|a| a.kind == Kind::Dir) {
                // Everything the base had there is gone, unless the upper has it again.
                let mine: HashSet<Vec<u8>> = rustix::fs::Dir::read_from(&d)?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_bytes().to_vec())
                    .collect();
                for c in base.children(&path)? {
                    if !mine.contains(c.as_bytes()) {
                        out.push(Change {
                            path: format!("/{path}/{c}"),
                            kind: 'D',
                        });
                    }
                }
            }
            walk_upper(d.as_fd(), &format!("{path}/"), w, out)?;
        }
    }
    Ok(())
}

fn same(a: &Attr, b: &Attr) -> bool {
    a.kind == b.kind
        && a.perm == b.perm
        && a.uid == b.uid
        && a.gid == b.gid
        && a.rdev == b.rdev
        && (a.kind == Kind::Dir || (a.size == b.size && a.mtime == b.mtime))
}

/// Changes that turn image tree `a` into `b`.
pub fn diff_trees(a: &Tree, b: &Tree) -> Result<Vec<Change>> {
    let mut left: BTreeMap<String, Attr> = BTreeMap::new();
    a.walk(&mut |n| {
        left.insert(n.path.clone(), n.attr);
        Ok(())
    })?;
    let mut out = Vec::new();
    b.walk(&mut |n| {
        match left.remove(&n.path) {
            None => out.push(Change {
                path: format!("/{}", n.path),
                kind: 'A',
            }),
            Some(old) => {
                let link_differs =
                    n.attr.kind == Kind::Symlink && a.readlink(old.ino).ok() != b.readlink(n.attr.ino).ok();
                if !same(&old, &n.attr) || link_differs {
                    out.push(Change {
                        path: format!("/{}", n.path),
                        kind: 'C',
                    });
                }
            }
        }
        Ok(())
    })?;
    out.extend(left.into_keys().map(|p| Change {
        path: format!("/{p}"),
        kind: 'D',
    }));
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fuse-overlayfs's markers in an upper read as the mount reads them: a `.wh.NAME`
    /// deletes NAME unless the upper has it again, a marker file makes its directory
    /// opaque, and markers that name nothing a layer can hold are ignored.
    #[test]
    fn fuse_overlayfs_markers_in_an_upper() {
        let t = tempfile::tempdir().unwrap();
        let (l, u) = (t.path().join("l"), t.path().join("u"));
        for d in [l.join("opq"), u.join("opq")] {
            std::fs::create_dir_all(d).unwrap();
        }
        for f in ["gone", "again", "opq/hidden"] {
            std::fs::write(l.join(f), "lower").unwrap();
        }
        for f in [
            ".wh.gone",
            ".wh.again",
            "again",
            "opq/.wh..wh..opq",
            "opq/mine",
            ".wh..",
            ".wh..wh.x",
        ] {
            std::fs::write(u.join(f), "").unwrap();
        }
        let base = Tree::open(vec![l.clone()]).unwrap();
        let got: Vec<String> = diff_upper(&u, &base, &[l])
            .unwrap()
            .iter()
            .map(|c| format!("{} {}", c.kind, c.path))
            .collect();
        assert_eq!(
            got,
            ["C /again", "D /gone", "C /opq", "D /opq/hidden", "A /opq/mine"],
            "{got:?}"
        );
    }
}
