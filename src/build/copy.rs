//! COPY and ADD: which files a step copies (globs, .dockerignore, the context's boundary),
//! a content hash of exactly those files for the cache, and the copy into the mounted tree.
//!
//! Both sides are walked through directory fds. Source paths are resolved with
//! RESOLVE_IN_ROOT against the context (or the `--from` tree), so a symlink or `..` can never
//! name a file outside it; inside a copied directory, symlinks are copied as symlinks.
//! Destinations are resolved the same way against the mounted root: an absolute symlink in an
//! image leads to the image's own path, never the host's.

use super::BuildError;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use sha2::{Digest as _, Sha256};

use super::dockerfile::Src;
use super::ignore::Ignore;
use crate::image::digest;
use crate::sys;

/// One source of a COPY/ADD.
#[derive(Debug, Clone)]
pub enum Item {
    /// A path below the source root (relative, cleaned), resolved in root.
    Path {
        /// Relative path.
        rel: String,
        /// Last component, the name it gets in a directory destination.
        name: String,
    },
    /// Inline content (heredoc or downloaded URL).
    Data {
        /// File name in a directory destination.
        name: String,
        /// Content.
        data: Vec<u8>,
        /// Mode.
        mode: u32,
    },
}

/// What a COPY/ADD will copy.
#[derive(Debug)]
pub struct Plan {
    /// The sources, in order.
    pub items: Vec<Item>,
    /// sha256 over names, types, modes, sizes and contents of everything copied.
    pub hash: String,
    /// The sources as given (for history).
    pub shown: Vec<String>,
    /// The source root, open.
    root: Option<OwnedFd>,
    /// .dockerignore of the context.
    ignore: Option<Ignore>,
    /// ADD: unpack archives.
    add: bool,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Go's filepath.Match for one path component.
pub fn match_component(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let (mut star_p, mut star_n) = (usize::MAX, 0);
    while n < name.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    star_p = p;
                    star_n = n;
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    n += 1;
                    continue;
                }
                b'[' => {
                    if let Some((ok, len)) = class(&pat[p..], name[n]) {
                        if ok {
                            p += len;
                            n += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pat.len() && pat[p + 1] == name[n] => {
                    p += 2;
                    n += 1;
                    continue;
                }
                b'\\' if p + 1 < pat.len() => {}
                c if c == name[n] => {
                    p += 1;
                    n += 1;
                    continue;
                }
                _ => {}
            }
        }
        if star_p != usize::MAX {
            p = star_p + 1;
            star_n += 1;
            n = star_n;
            continue;
        }
        return false;
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

/// A `[...]` class at the start of `pat`: (matches `c`, its length).
fn class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let neg = i < pat.len() && (pat[i] == b'^' || pat[i] == b'!');
    if neg {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    while i < pat.len() && (pat[i] != b']' || first) {
        first = false;
        let mut lo = pat[i];
        if lo == b'\\' && i + 1 < pat.len() {
            i += 1;
            lo = pat[i];
        }
        let mut hi = lo;
        if i + 2 < pat.len() && pat[i + 1] == b'-' && pat[i + 2] != b']' {
            hi = pat[i + 2];
            i += 2;
        }
        if lo <= c && c <= hi {
            hit = true;
        }
        i += 1;
    }
    if i >= pat.len() {
        return None;
    }
    Some((hit != neg, i + 1))
}

/// Clean a source path by the one rule (`paths`): relative to the context root.
fn clean_rel(p: &str) -> Result<String> {
    crate::paths::clean(p).map_err(|_| BuildError::OutsideContext(p.to_string()).into())
}

fn open_root(p: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening '{}'", p.display()))
}

fn resolve(root: BorrowedFd<'_>, rel: &str) -> rustix::io::Result<OwnedFd> {
    let p = if rel.is_empty() { "." } else { rel };
    sys::open_in_root(root, p, OFlags::PATH, Mode::empty())
}

fn list_dir(fd: BorrowedFd<'_>) -> Result<Vec<OsString>> {
    let d = sys::open_in_root(fd, ".", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(&d)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsString::from_vec(n.to_vec()));
        }
    }
    names.sort();
    Ok(names)
}

/// Expand a glob (relative, cleaned) against the root; matches sorted.
fn glob(root: BorrowedFd<'_>, pat: &str, ignore: Option<&Ignore>) -> Result<Vec<String>> {
    let comps: Vec<&str> = pat.split('/').collect();
    let mut cur = vec![String::new()];
    for (i, c) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let mut next = Vec::new();
        for base in &cur {
            let join = |n: &str| {
                if base.is_empty() {
                    n.to_string()
                } else {
                    format!("{base}/{n}")
                }
            };
            if !has_glob(c) {
                let p = join(c);
                if resolve(root, &p).is_ok() {
                    next.push(p);
                }
                continue;
            }
            let Ok(fd) = resolve(root, base) else { continue };
            let Ok(names) = list_dir(fd.as_fd()) else { continue };
            for n in names {
                if match_component(c.as_bytes(), n.as_bytes()) {
                    let p = join(&n.to_string_lossy());
                    if !last || ignore.is_none_or(|ig| !ig.excluded(&p)) {
                        next.push(p);
                    }
                }
            }
        }
        cur = next;
    }
    cur.sort();
    Ok(cur)
}

/// Fetch an ADD URL (blocking the builder; no thread outlives it).
fn fetch(url: &str) -> Result<Vec<u8>> {
    std::thread::scope(|sc| {
        sc.spawn(|| -> Result<Vec<u8>> {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(async {
                let c = reqwest::Client::builder()
                    .connect_timeout(std::time::Duration::from_secs(30))
                    .read_timeout(std::time::Duration::from_secs(60))
                    .build()?;
                let resp = c.get(url).send().await?.error_for_status()?;
                Ok::<_, reqwest::Error>(resp.bytes().await?.to_vec())
            });
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
            r.with_context(|| format!("fetching {url}"))
        })
        .join()
        .map_err(|_| anyhow!("fetching {url}: the download thread panicked"))?
    })
}

/// Decide what a COPY/ADD copies and hash it.
pub fn plan(
    srcs: &[Src],
    root: Option<&Path>,
    ignore: Option<&Ignore>,
    add: bool,
    expand: &dyn Fn(&str) -> std::result::Result<String, String>,
    expand_doc: &dyn Fn(&str) -> std::result::Result<String, String>,
) -> Result<Plan> {
    let rootfd = root.map(open_root).transpose()?;
    let mut items = Vec::new();
    let mut shown = Vec::new();
    for s in srcs {
        match s {
            Src::Inline {
                name,
                body,
                expand: ex,
            } => {
                let body = if *ex {
                    expand_doc(body).map_err(|e| anyhow!(e))?
                } else {
                    body.clone()
                };
                shown.push(format!("<<{name}"));
                items.push(Item::Data {
                    name: name.clone(),
                    data: body.into_bytes(),
                    mode: 0o644,
                });
            }
            Src::Path(p) => {
                let p = expand(p).map_err(|e| anyhow!(e))?;
                shown.push(p.clone());
                if add && (p.starts_with("http://") || p.starts_with("https://")) {
                    let name = p
                        .split(['?', '#'])
                        .next()
                        .and_then(|u| u.rsplit('/').next())
                        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
                        .unwrap_or("download")
                        .to_string();
                    items.push(Item::Data {
                        name,
                        data: fetch(&p)?,
                        mode: 0o600,
                    });
                    continue;
                }
                let Some(rfd) = rootfd.as_ref() else {
                    return Err(BuildError::NoContext(p.to_string()).into());
                };
                let rel = clean_rel(&p)?;
                let rels = if has_glob(&rel) {
                    let m = glob(rfd.as_fd(), &rel, ignore)?;
                    if m.is_empty() {
                        return Err(BuildError::NoMatch(p.to_string()).into());
                    }
                    m
                } else {
                    if ignore.is_some_and(|ig| !rel.is_empty() && ig.excluded(&rel)) {
                        return Err(BuildError::Excluded(p.to_string()).into());
                    }
                    resolve(rfd.as_fd(), &rel).map_err(|e| match e {
                        rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR => {
                            BuildError::SourceNotFound(p.to_string()).into()
                        }
                        e => anyhow!("'{p}': {e}"),
                    })?;
                    vec![rel]
                };
                for r in rels {
                    let name = r.rsplit('/').next().unwrap_or("").to_string();
                    items.push(Item::Path { rel: r, name });
                }
            }
        }
    }
    let mut plan = Plan {
        items,
        hash: String::new(),
        shown,
        root: rootfd,
        ignore: ignore.cloned(),
        add,
    };
    plan.hash = plan.content_hash()?;
    Ok(plan)
}

impl Plan {
    /// Left out by .dockerignore: an excluded file, or an excluded directory below which
    /// no exception can bring anything back (else it is walked, as BuildKit does).
    fn skipped(&self, rel: &str, t: FileType) -> bool {
        self.ignore.as_ref().is_some_and(|ig| {
            if t == FileType::Directory {
                ig.excluded(rel) && ig.skip_dir(rel)
            } else {
                ig.excluded(rel)
            }
        })
    }

    fn content_hash(&self) -> Result<String> {
        let mut h = Sha256::new();
        for it in &self.items {
            match it {
                Item::Data { name, data, mode } => {
                    h.update(format!("data {name} {mode:o} {}\0", data.len()));
                    h.update(data);
                }
                Item::Path { rel, .. } => {
                    let root = self.root.as_ref().context("no source root")?;
                    let fd = sys::open_in_root(
                        root.as_fd(),
                        if rel.is_empty() { "." } else { rel },
                        OFlags::RDONLY,
                        Mode::empty(),
                    )
                    .or_else(|_| resolve(root.as_fd(), rel))
                    .with_context(|| format!("opening '{rel}'"))?;
                    h.update(format!("path {rel}\0"));
                    self.hash_entry(&mut h, fd.as_fd(), rel, "")?;
                }
            }
        }
        Ok(digest::hex(&h.finalize()))
    }

    /// Hash what is at `fd` (already open, followed) and, for a directory, below it.
    fn hash_entry(&self, h: &mut Sha256, fd: BorrowedFd<'_>, rel: &str, sub: &str) -> Result<()> {
        let st = rustix::fs::fstat(fd)?;
        let ft = FileType::from_raw_mode(st.st_mode);
        h.update(format!("{sub}\0{:o}\0", st.st_mode & 0o7777));
        match ft {
            FileType::RegularFile => {
                h.update(format!("f{}\0", st.st_size));
                let mut f = std::fs::File::from(rustix::io::fcntl_dupfd_cloexec(fd, 3)?);
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
            FileType::Directory => {
                h.update("d\0");
                for n in list_dir(fd)? {
                    let child_rel = join_rel(rel, &n);
                    let cst = rustix::fs::statat(fd, &n, AtFlags::SYMLINK_NOFOLLOW)?;
                    if self.skipped(&child_rel, FileType::from_raw_mode(cst.st_mode)) {
                        continue;
                    }
                    let child_sub = join_rel(sub, &n);
                    match FileType::from_raw_mode(cst.st_mode) {
                        FileType::Symlink => {
                            let t = rustix::fs::readlinkat(fd, &n, Vec::new())?;
                            h.update(format!("{child_sub}\0l\0"));
                            h.update(t.as_bytes());
                            h.update("\0");
                        }
                        FileType::RegularFile | FileType::Directory => {
                            let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                            let c = rustix::fs::openat(fd, &n, flags, Mode::empty())?;
                            self.hash_entry(h, c.as_fd(), &child_rel, &child_sub)?;
                        }
                        _ => h.update(format!("{child_sub}\0special\0")),
                    }
                }
            }
            _ => h.update("special\0"),
        }
        Ok(())
    }
}

fn join_rel(a: &str, n: &OsStr) -> String {
    if a.is_empty() {
        n.to_string_lossy().into_owned()
    } else {
        format!("{a}/{}", n.to_string_lossy())
    }
}

type Ids = (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>);

/// The ids a file meant for (uid, gid) in the image gets on disk. As root, those. Rootless,
/// the builder's own ids stand for root (the container's root is the building user, and
/// layers are packed with the user's ids mapped back to 0); other owners cannot be stored
/// without subordinate id ranges: an error when `strict` (an explicit `--chown`), else the
/// user's ids (an archive's owners, as a rootless unpack of a layer does).
fn disk_ids(uid: u32, gid: u32, strict: bool) -> Result<Ids> {
    let (eu, eg) = (sys::euid(), sys::egid());
    let (u, g) = if eu == 0 {
        (uid, gid)
    } else if (uid, gid) == (0, 0) || !strict {
        (eu, eg)
    } else {
        bail!("a rootless build cannot give files the owner {uid}:{gid} (only root, which is you)");
    };
    Ok((
        Some(rustix::fs::Uid::from_raw(u)),
        Some(rustix::fs::Gid::from_raw(g)),
    ))
}

/// Owner of copied files: `--chown=user[:group]`, names looked up in the image's
/// /etc/passwd and /etc/group (read without following symlinks out of the tree).
pub fn resolve_owner(mnt: &Path, spec: &str) -> Result<(u32, u32)> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let root = open_root(mnt)?;
    let read = |f: &str| -> String {
        sys::open_in_root(root.as_fd(), f, OFlags::RDONLY, Mode::empty())
            .ok()
            .and_then(|fd| {
                let mut s = String::new();
                std::fs::File::from(fd).read_to_string(&mut s).ok().map(|_| s)
            })
            .unwrap_or_default()
    };
    let find = |file: &str, name: &str| -> Option<(u32, u32)> {
        read(file).lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4 && f[0] == name {
                f[2].parse::<u32>().ok().zip(f[3].parse::<u32>().ok())
            } else {
                None
            }
        })
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (n, None),
        Err(_) => {
            let (id, gid) = find("/etc/passwd", u)
                .ok_or_else(|| anyhow!("--chown: no user '{u}' in the image's /etc/passwd"))?;
            (id, Some(gid))
        }
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => read("/etc/group")
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[0] == g)
                        .then(|| f[2].parse::<u32>().ok())
                        .flatten()
                })
                .ok_or_else(|| anyhow!("--chown: no group '{g}' in the image's /etc/group"))?,
        },
        None => primary.unwrap_or(uid),
    };
    Ok((uid, gid))
}

/// The uid and gid a `USER` value runs as: a name or id from the image's /etc/passwd (its
/// primary group), `user:group`, or a bare number (group 0, as docker).
pub fn user_ids(mnt: &Path, user: &str) -> Result<(u32, u32)> {
    if !user.contains(':') {
        if let Ok(n) = user.parse::<u32>() {
            return Ok((n, 0));
        }
    }
    resolve_owner(mnt, user).with_context(|| format!("USER {user}"))
}

/// Create `abs` and its missing parents in the mounted tree (mode 0755, `owner` or root).
pub fn mkdir_p(mnt: &Path, abs: &str, owner: Option<(u32, u32)>) -> Result<OwnedFd> {
    let root = open_root(mnt)?;
    mkdir_p_at(root.as_fd(), abs, owner)
}

fn mkdir_p_at(root: BorrowedFd<'_>, abs: &str, owner: Option<(u32, u32)>) -> Result<OwnedFd> {
    let mut cur = sys::open_in_root(root, ".", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    for c in abs.split('/').filter(|c| !c.is_empty() && *c != ".") {
        let next = match sys::open_in_root(cur.as_fd(), c, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
        {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                rustix::fs::mkdirat(cur.as_fd(), c, Mode::from_raw_mode(0o755))
                    .with_context(|| format!("creating '{abs}'"))?;
                let fd = rustix::fs::openat(
                    cur.as_fd(),
                    c,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                // umask must not narrow it.
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))?;
                let (u, g) = owner.unwrap_or((0, 0));
                let (u, g) = disk_ids(u, g, true)?;
                rustix::fs::fchown(&fd, u, g)?;
                fd
            }
            Err(e) => return Err(anyhow!("'{abs}': {e} (a component is not a directory?)")),
        };
        // Symlinks in the path were resolved inside the tree (IN_ROOT from the root), so the
        // next lookup goes on from the real directory.
        cur = next;
    }
    Ok(cur)
}

/// Copy everything of `plan` into the mounted tree at `mnt`.
pub fn execute(
    plan: &Plan,
    mnt: &Path,
    dest: &str,
    dir_dest: bool,
    owner: Option<(u32, u32)>,
    mode: Option<u32>,
    checksum: Option<&str>,
) -> Result<()> {
    let root = open_root(mnt)?;
    let cp = Copier { owner, mode, plan };
    for it in &plan.items {
        match it {
            Item::Data { name, data, mode: m } => {
                if let Some(c) = checksum {
                    let got = digest::sha256_of(data);
                    if got != c {
                        bail!("--checksum={c}: the content is {got}");
                    }
                }
                let (dir, fname) = cp.target(root.as_fd(), dest, dir_dest, name)?;
                cp.write_file(dir.as_fd(), &fname, &mut &data[..], *m, None)?;
            }
            Item::Path { rel, name } => {
                let src_root = plan.root.as_ref().context("no source root")?;
                let src = sys::open_in_root(
                    src_root.as_fd(),
                    if rel.is_empty() { "." } else { rel },
                    OFlags::RDONLY,
                    Mode::empty(),
                )
                .with_context(|| format!("opening '{rel}'"))?;
                let st = rustix::fs::fstat(&src)?;
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => {
                        // The contents go to the destination, not the directory itself.
                        let d = mkdir_p_at(root.as_fd(), dest, owner)?;
                        cp.copy_dir(src.as_fd(), rel, d.as_fd())?;
                    }
                    FileType::RegularFile => {
                        if plan.add && checksum.is_none() && is_archive(src.as_fd())? {
                            let d = mkdir_p_at(root.as_fd(), dest, owner)?;
                            cp.unpack(src.as_fd(), d.as_fd(), rel)?;
                            continue;
                        }
                        let (dir, fname) = cp.target(root.as_fd(), dest, dir_dest, name)?;
                        let mut f = std::fs::File::from(rustix::io::fcntl_dupfd_cloexec(&src, 3)?);
                        cp.write_file(dir.as_fd(), &fname, &mut f, st.st_mode & 0o7777, Some(&st))?;
                    }
                    _ => bail!("'{rel}' is neither a file nor a directory"),
                }
            }
        }
    }
    Ok(())
}

/// gzip or plain tar (what ADD unpacks without external tools).
fn is_archive(fd: BorrowedFd<'_>) -> Result<bool> {
    let mut head = [0u8; 512];
    let n = rustix::io::pread(fd, &mut head, 0)?;
    if n >= 2 && head[0] == 0x1f && head[1] == 0x8b {
        return Ok(true);
    }
    Ok(n >= 262 && &head[257..262] == b"ustar")
}

struct Copier<'a> {
    owner: Option<(u32, u32)>,
    mode: Option<u32>,
    plan: &'a Plan,
}

impl Copier<'_> {
    /// Directory fd and file name for a single-file source.
    fn target(
        &self,
        root: BorrowedFd<'_>,
        dest: &str,
        dir_dest: bool,
        name: &str,
    ) -> Result<(OwnedFd, OsString)> {
        if dir_dest {
            return Ok((mkdir_p_at(root, dest, self.owner)?, OsString::from(name)));
        }
        // An existing directory at the destination takes the file inside it, as docker.
        if let Ok(fd) = sys::open_in_root(root, dest, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) {
            return Ok((fd, OsString::from(name)));
        }
        let d = dest.trim_end_matches('/');
        let (parent, fname) = d.rsplit_once('/').unwrap_or(("", d));
        if fname.is_empty() {
            bail!("destination '{dest}' names no file");
        }
        Ok((mkdir_p_at(root, parent, self.owner)?, OsString::from(fname)))
    }

    fn own(&self, fd: BorrowedFd<'_>) -> Result<()> {
        let (u, g) = self.owner.unwrap_or((0, 0));
        let (u, g) = disk_ids(u, g, true)?;
        rustix::fs::fchown(fd, u, g)?;
        Ok(())
    }

    /// Remove what is at `name` unless it is a directory we merge into.
    fn clear(&self, dir: BorrowedFd<'_>, name: &OsStr, keep_dir: bool) -> Result<()> {
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                if is_dir && keep_dir {
                    return Ok(());
                }
                if is_dir {
                    let fd = rustix::fs::openat(
                        dir,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    for n in list_dir(fd.as_fd())? {
                        self.clear(fd.as_fd(), &n, false)?;
                    }
                    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
                } else {
                    rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
                }
                Ok(())
            }
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn write_file(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        r: &mut dyn Read,
        mode: u32,
        st: Option<&rustix::fs::Stat>,
    ) -> Result<()> {
        self.clear(dir, name, false)?;
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("creating '{}'", name.to_string_lossy()))?;
        let mut f = std::fs::File::from(fd);
        crate::image::layer::copy_data(r, &mut f, st.map(|s| s.st_size as u64))?;
        f.flush()?;
        self.own(f.as_fd())?;
        rustix::fs::fchmod(&f, Mode::from_raw_mode(self.mode.unwrap_or(mode)))?;
        if let Some(st) = st {
            let t = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: st.st_atime,
                    tv_nsec: st.st_atime_nsec as _,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: st.st_mtime,
                    tv_nsec: st.st_mtime_nsec as _,
                },
            };
            rustix::fs::futimens(&f, &t)?;
        }
        Ok(())
    }

    /// Copy the entries of `src` (context-relative `rel`) into `dst`.
    fn copy_dir(&self, src: BorrowedFd<'_>, rel: &str, dst: BorrowedFd<'_>) -> Result<()> {
        for n in list_dir(src)? {
            let child_rel = join_rel(rel, &n);
            let st = rustix::fs::statat(src, &n, AtFlags::SYMLINK_NOFOLLOW)?;
            if self.plan.skipped(&child_rel, FileType::from_raw_mode(st.st_mode)) {
                continue;
            }
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    self.clear(dst, &n, true)?;
                    if rustix::fs::statat(dst, &n, AtFlags::SYMLINK_NOFOLLOW).is_err() {
                        rustix::fs::mkdirat(dst, &n, Mode::from_raw_mode(0o700))?;
                    }
                    let d = rustix::fs::openat(
                        dst,
                        &n,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    self.own(d.as_fd())?;
                    rustix::fs::fchmod(&d, Mode::from_raw_mode(self.mode.unwrap_or(st.st_mode & 0o7777)))?;
                    let s = rustix::fs::openat(
                        src,
                        &n,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    self.copy_dir(s.as_fd(), &child_rel, d.as_fd())?;
                }
                FileType::RegularFile => {
                    let s = rustix::fs::openat(
                        src,
                        &n,
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    let mut f = std::fs::File::from(s);
                    self.write_file(dst, &n, &mut f, st.st_mode & 0o7777, Some(&st))?;
                }
                FileType::Symlink => {
                    let t = rustix::fs::readlinkat(src, &n, Vec::new())?;
                    self.clear(dst, &n, false)?;
                    rustix::fs::symlinkat(t.as_c_str(), dst, &n)?;
                    let (u, g) = self.owner.unwrap_or((0, 0));
                    let (u, g) = disk_ids(u, g, true)?;
                    rustix::fs::chownat(dst, &n, u, g, AtFlags::SYMLINK_NOFOLLOW)?;
                }
                _ => log::warn!("skipping '{child_rel}': not a file, directory or symlink"),
            }
        }
        Ok(())
    }

    /// ADD of a local archive: its entries go below `dst`. Paths are cleaned and kept
    /// inside `dst`; links may point anywhere (they are links inside the image).
    fn unpack(&self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, rel: &str) -> Result<()> {
        let f = std::fs::File::from(rustix::io::fcntl_dupfd_cloexec(src, 3)?);
        let r = crate::image::layer::decompress(f)?;
        let mut ar = tar::Archive::new(r);
        for e in ar.entries().with_context(|| format!("reading archive '{rel}'"))? {
            let mut e = e.with_context(|| format!("reading archive '{rel}'"))?;
            let path = e.path()?.into_owned();
            let clean = clean_rel(&path.to_string_lossy()).with_context(|| format!("archive '{rel}'"))?;
            if clean.is_empty() {
                continue;
            }
            let (parent, name) = clean.rsplit_once('/').unwrap_or(("", &clean));
            let pd = mkdir_p_at(dst, parent, self.owner)?;
            let name = OsStr::new(name);
            let mode = e.header().mode().unwrap_or(0o644) & 0o7777;
            let (uid, gid) = match self.owner {
                Some(o) => o,
                None => (
                    e.header().uid().unwrap_or(0) as u32,
                    e.header().gid().unwrap_or(0) as u32,
                ),
            };
            let ids = disk_ids(uid, gid, self.owner.is_some())?;
            match e.header().entry_type() {
                tar::EntryType::Directory => {
                    self.clear(pd.as_fd(), name, true)?;
                    if rustix::fs::statat(pd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW).is_err() {
                        rustix::fs::mkdirat(pd.as_fd(), name, Mode::from_raw_mode(0o700))?;
                    }
                    let d = rustix::fs::openat(
                        pd.as_fd(),
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    rustix::fs::fchown(&d, ids.0, ids.1)?;
                    rustix::fs::fchmod(&d, Mode::from_raw_mode(mode))?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    self.clear(pd.as_fd(), name, false)?;
                    let fd = rustix::fs::openat(
                        pd.as_fd(),
                        name,
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )?;
                    let mut f = std::fs::File::from(fd);
                    let size = e.header().size().ok();
                    crate::image::layer::copy_data(&mut e, &mut f, size)?;
                    rustix::fs::fchown(&f, ids.0, ids.1)?;
                    rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))?;
                    if let Ok(m) = e.header().mtime() {
                        let ts = rustix::fs::Timespec {
                            tv_sec: m as i64,
                            tv_nsec: 0,
                        };
                        rustix::fs::futimens(
                            &f,
                            &rustix::fs::Timestamps {
                                last_access: ts,
                                last_modification: ts,
                            },
                        )?;
                    }
                }
                tar::EntryType::Symlink => {
                    let t = e.link_name()?.map(|l| l.into_owned()).unwrap_or_default();
                    self.clear(pd.as_fd(), name, false)?;
                    rustix::fs::symlinkat(t.as_os_str(), pd.as_fd(), name)?;
                    rustix::fs::chownat(pd.as_fd(), name, ids.0, ids.1, AtFlags::SYMLINK_NOFOLLOW)?;
                }
                tar::EntryType::Link => {
                    let t = e.link_name()?.map(|l| l.into_owned()).unwrap_or_default();
                    let tclean = clean_rel(&t.to_string_lossy())?;
                    let (tp, tn) = tclean.rsplit_once('/').unwrap_or(("", &tclean));
                    let tpd = mkdir_p_at(dst, tp, self.owner)?;
                    self.clear(pd.as_fd(), name, false)?;
                    rustix::fs::linkat(tpd.as_fd(), tn, pd.as_fd(), name, AtFlags::empty())
                        .with_context(|| format!("archive '{rel}': hard link {clean} -> {tclean}"))?;
                }
                other => log::warn!("archive '{rel}': skipping {clean} ({other:?})"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components() {
        assert!(match_component(b"*.txt", b"a.txt"));
        assert!(!match_component(b"*.txt", b"a.txt.bak"));
        assert!(match_component(b"a?c", b"abc"));
        assert!(match_component(b"[a-c]x", b"bx"));
        assert!(!match_component(b"[^a-c]x", b"bx"));
        assert!(match_component(b"\\*", b"*"));
        assert!(match_component(b"*", b""));
        assert!(clean_rel("../x").is_err());
        assert_eq!(clean_rel("./a/../b/").unwrap(), "b");
        assert!(clean_rel("a/../../b").is_err());
    }
}
