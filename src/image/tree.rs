//! A merged tree of image layers, read through the overlay core (no mount): the same
//! lookup and whiteout rules as a mount, for export, squash and diff.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::layer::{EntryKind, Meta, TarOut};
use crate::overlay::{Attr, Kind, Overlay, OverlayConfig, ROOT};

/// A read-only merged view of layer directories.
#[derive(Debug)]
pub struct Tree {
    ov: Overlay,
    /// An empty directory made for an image-less tree, removed on drop.
    scratch: Option<PathBuf>,
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Some(d) = &self.scratch {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// One object found by a walk.
#[derive(Debug, Clone)]
pub struct Node {
    /// Path relative to the root, without a leading slash.
    pub path: String,
    /// Attributes.
    pub attr: Attr,
}

impl Tree {
    /// Merge `lowers` (top first).
    pub fn open(lowers: Vec<PathBuf>) -> Result<Tree> {
        if lowers.is_empty() {
            let empty = std::env::temp_dir().join(format!("strata-empty-{}", std::process::id()));
            std::fs::create_dir_all(&empty)?;
            let ov = Overlay::new(&OverlayConfig {
                lowers: vec![empty.clone()],
                ..Default::default()
            })?;
            return Ok(Tree {
                ov,
                scratch: Some(empty),
            });
        }
        let ov = Overlay::new(&OverlayConfig {
            lowers,
            ..Default::default()
        })?;
        Ok(Tree { ov, scratch: None })
    }

    /// The attributes at `path` ("a/b"), if it exists.
    pub fn lookup(&self, path: &str) -> Option<Attr> {
        let mut cur = ROOT;
        let mut attr = self.ov.getattr(ROOT, None).ok()?;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            attr = self.ov.lookup(cur, OsStr::new(c)).ok()?;
            cur = attr.ino;
        }
        Some(attr)
    }

    /// Names directly inside the directory at `path`.
    pub fn children(&self, path: &str) -> Result<Vec<String>> {
        let a = self.lookup(path).context("no such directory")?;
        let fh = self.ov.opendir(a.ino)?;
        let names = self
            .ov
            .readdir(fh)?
            .iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        self.ov.releasedir(fh);
        Ok(names)
    }

    /// Every object under the root, parents before children, names sorted.
    pub fn walk(&self, f: &mut dyn FnMut(&Node) -> Result<()>) -> Result<()> {
        self.walk_dir(ROOT, "", f)
    }

    /// Every object below the directory at `path` ("a/b"; not the directory itself).
    pub fn walk_under(&self, path: &str, f: &mut dyn FnMut(&Node) -> Result<()>) -> Result<()> {
        let a = self
            .lookup(path)
            .with_context(|| format!("'/{path}' is not in the merged tree"))?;
        self.walk_dir(a.ino, &format!("{path}/"), f)
    }

    fn walk_dir(&self, ino: u64, prefix: &str, f: &mut dyn FnMut(&Node) -> Result<()>) -> Result<()> {
        let fh = self.ov.opendir(ino)?;
        let mut names: Vec<Vec<u8>> = self
            .ov
            .readdir(fh)?
            .iter()
            .map(|e| e.name.as_bytes().to_vec())
            .filter(|n| n != b"." && n != b"..")
            .collect();
        self.ov.releasedir(fh);
        names.sort();
        for n in names {
            let attr = self.ov.lookup(ino, OsStr::from_bytes(&n))?;
            let path = format!("{prefix}{}", String::from_utf8_lossy(&n));
            f(&Node {
                path: path.clone(),
                attr,
            })?;
            if attr.kind == Kind::Dir {
                self.walk_dir(attr.ino, &format!("{path}/"), f)?;
            }
        }
        Ok(())
    }

    /// Contents of a regular file.
    pub fn reader(&self, ino: u64) -> Result<TreeFile<'_>> {
        Ok(TreeFile {
            ov: &self.ov,
            fh: self.ov.open(ino, libc::O_RDONLY)?,
            off: 0,
        })
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        Ok(self.ov.readlink(ino)?)
    }

    /// User-visible xattrs, sorted.
    pub fn xattrs(&self, ino: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
        let list = self.ov.listxattr(ino).unwrap_or_default();
        let mut v: Vec<_> = list
            .split(|c| *c == 0)
            .filter(|n| !n.is_empty())
            .filter(|n| !crate::overlay::xattr::is_private_xattr(n))
            .filter_map(|n| {
                self.ov
                    .getxattr(ino, OsStr::from_bytes(n))
                    .ok()
                    .map(|v| (n.to_vec(), v))
            })
            .collect();
        v.sort();
        v
    }

    /// Write the whole merged tree as one tar (no whiteouts), hard links kept.
    pub fn export<W: Write>(&self, out: &mut TarOut<W>) -> Result<()> {
        self.export_except(out, &|_| false)
    }

    /// `export`, leaving out every path (and subtree) for which `skip("/path")` holds.
    pub fn export_except<W: Write>(&self, out: &mut TarOut<W>, skip: &dyn Fn(&str) -> bool) -> Result<()> {
        self.export_from(None, out, skip, &mut HashMap::new())
    }

    /// `export_except` of what is below the directory at `path` only (None: everything).
    /// `links` maps the real (st_dev, st_ino) of multiply-linked files already written to
    /// their first path, so a caller writing other parts of the same layer keeps hard links
    /// across them.
    pub fn export_from<W: Write>(
        &self,
        path: Option<&str>,
        out: &mut TarOut<W>,
        skip: &dyn Fn(&str) -> bool,
        links: &mut HashMap<(u64, u64), String>,
    ) -> Result<()> {
        let mut skipped: Vec<String> = Vec::new();
        let mut each = |n: &Node| -> Result<()> {
            if skipped.iter().any(|p| n.path.starts_with(&format!("{p}/"))) {
                return Ok(());
            }
            if skip(&format!("/{}", n.path)) {
                skipped.push(n.path.clone());
                return Ok(());
            }
            let a = &n.attr;
            let m = Meta {
                mode: a.perm as u32,
                uid: a.uid,
                gid: a.gid,
                mtime: a.mtime.0,
            };
            let xs = self.xattrs(a.ino);
            match a.kind {
                Kind::Dir => out.append(&n.path, EntryKind::Dir, m, &xs, &mut io::empty()),
                Kind::File => {
                    if a.nlink > 1 {
                        let id = self.ov.backing_id(a.ino)?;
                        if let Some(first) = links.get(&id) {
                            let first = first.clone();
                            return out.append(&n.path, EntryKind::Link(&first), m, &[], &mut io::empty());
                        }
                        links.insert(id, n.path.clone());
                    }
                    let mut r = self.reader(a.ino)?;
                    out.append(&n.path, EntryKind::File(a.size), m, &xs, &mut r)
                }
                Kind::Symlink => {
                    let t = self.readlink(a.ino)?;
                    out.append(&n.path, EntryKind::Symlink(&t), m, &xs, &mut io::empty())
                }
                Kind::Char | Kind::Block => {
                    let (ma, mi) = (rustix::fs::major(a.rdev as u64), rustix::fs::minor(a.rdev as u64));
                    let k = if a.kind == Kind::Char {
                        EntryKind::Char(ma, mi)
                    } else {
                        EntryKind::Block(ma, mi)
                    };
                    out.append(&n.path, k, m, &xs, &mut io::empty())
                }
                Kind::Fifo => out.append(&n.path, EntryKind::Fifo, m, &xs, &mut io::empty()),
                Kind::Socket => Ok(()),
            }
        };
        match path {
            None => self.walk(&mut each),
            Some(p) => self.walk_under(p, &mut each),
        }
    }
}

/// A regular file of a tree, as a reader.
pub struct TreeFile<'a> {
    ov: &'a Overlay,
    fh: u64,
    off: u64,
}

impl Read for TreeFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(1 << 20) as u32;
        let data = self.ov.read(self.fh, self.off, want).map_err(io::Error::from)?;
        buf[..data.len()].copy_from_slice(&data);
        self.off += data.len() as u64;
        Ok(data.len())
    }
}

impl Drop for TreeFile<'_> {
    fn drop(&mut self) {
        self.ov.release(self.fh);
    }
}
