//! Layer tars <-> directories.
//!
//! A layer tar is hostile until checked. Unpacking happens in two passes: the first walks
//! the raw tar headers (refusing giant extension headers and truncated data) and computes
//! the DiffID; the second extracts through directory fds with openat2 (RESOLVE_BENEATH and
//! RESOLVE_NO_SYMLINKS), so no entry can write outside the layer directory, go through a
//! symlink, or replace something already extracted.
//!
//! Packing turns an overlay upper directory into an OCI changeset: 0/0 whiteouts become
//! `.wh.NAME`, opaque directories get `.wh..wh..opq`, hard links become type-1 entries,
//! and xattrs travel as PAX `SCHILY.xattr.*` records (never the overlay-private ones).

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::digest::HashReader;
use crate::overlay::whiteout;
use crate::sys::{self, XTarget};

/// Largest PAX or GNU long-name header we accept.
const MAX_EXT_HEADER: u64 = 1 << 20;

/// Compression of a blob, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Plain tar.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Sniff the magic bytes.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
    /// The OCI layer media type.
    pub fn media_type(self) -> oci_spec::image::MediaType {
        match self {
            Compression::None => oci_spec::image::MediaType::ImageLayer,
            Compression::Gzip => oci_spec::image::MediaType::ImageLayerGzip,
            Compression::Zstd => oci_spec::image::MediaType::ImageLayerZstd,
        }
    }
}

/// A reader of the uncompressed tar inside `r`, whatever its compression.
pub fn decompress<R: Read + 'static>(r: R) -> Result<Box<dyn Read>> {
    let mut br = BufReader::with_capacity(1 << 16, r);
    let head = br.fill_buf()?.to_vec();
    Ok(match Compression::sniff(&head) {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(br)),
        Compression::Zstd => Box::new(zstd::Decoder::with_buffer(br)?),
        Compression::None => Box::new(br),
    })
}

fn parse_num(b: &[u8]) -> Option<u64> {
    if b.first().is_some_and(|c| c & 0x80 != 0) {
        // base-256, big-endian
        let mut v: u64 = (b[0] & 0x7f) as u64;
        for &c in &b[1..] {
            v = v.checked_mul(256)?.checked_add(c as u64)?;
        }
        return Some(v);
    }
    let s: Vec<u8> = b.iter().copied().filter(|c| *c != 0 && *c != b' ').collect();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&s).ok()?, 8).ok()
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The `size` record of a PAX extended header, if any.
fn pax_size(data: &[u8]) -> Option<u64> {
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|c| *c == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > rest.len() {
            return None;
        }
        let rec = &rest[sp + 1..len];
        if let Some(v) = rec.strip_prefix(b"size=") {
            return std::str::from_utf8(v).ok()?.trim_end_matches('\n').parse().ok();
        }
        rest = &rest[len..];
    }
    None
}

/// First pass over an uncompressed layer: check the raw structure and return its DiffID.
/// Entries are framed exactly as the `tar` crate of the second pass frames them (the
/// header's size for every type, overridden by a PAX `size`), so both passes agree on
/// where each header starts; extension headers are capped, and non-files may carry no data.
pub fn check_and_hash<R: Read>(r: R, what: &str) -> Result<String> {
    let mut h = HashReader::new(r);
    let mut block = [0u8; 512];
    let mut off: u64 = 0;
    let mut skip = vec![0u8; 1 << 16];
    let mut next_size: Option<u64> = None;
    loop {
        let n = read_full(&mut h, &mut block)?;
        if n == 0 {
            break;
        }
        if n < 512 {
            bail!("{what}: truncated tar header at offset {off}");
        }
        off += 512;
        if block.iter().all(|c| *c == 0) {
            continue;
        }
        let name =
            String::from_utf8_lossy(block[..100].split(|c| *c == 0).next().unwrap_or(&[])).into_owned();
        let hsize =
            parse_num(&block[124..136]).with_context(|| format!("{what}: entry '{name}': bad size field"))?;
        let kind = block[156];
        let ext = matches!(kind, b'x' | b'g' | b'L' | b'K');
        let size = if ext {
            hsize
        } else {
            next_size.take().unwrap_or(hsize)
        };
        if ext && size > MAX_EXT_HEADER {
            bail!("{what}: entry '{name}': {size}-byte extension header (limit {MAX_EXT_HEADER})");
        }
        if !ext && !matches!(kind, b'0' | 0 | b'7') && size != 0 {
            bail!(
                "{what}: entry '{name}': a non-file entry (type '{}') carrying {size} bytes of data",
                kind as char
            );
        }
        let padded = size.div_ceil(512) * 512;
        if kind == b'x' {
            let mut data = vec![0u8; padded as usize];
            if read_full(&mut h, &mut data)? < data.len() {
                bail!("{what}: entry '{name}' is truncated: it declares {size} bytes but the archive ends");
            }
            off += padded;
            next_size = pax_size(&data[..size as usize]);
            continue;
        }
        let mut left = padded;
        while left > 0 {
            let want = (left as usize).min(skip.len());
            let got = read_full(&mut h, &mut skip[..want])?;
            if got == 0 {
                bail!("{what}: entry '{name}' is truncated: it declares {size} bytes but the archive ends");
            }
            left -= got as u64;
            off += got as u64;
        }
    }
    Ok(h.finish().0)
}

fn err_at(e: Errno) -> String {
    match e {
        Errno::LOOP | Errno::XDEV => "path goes through a symlink".into(),
        Errno::NOTDIR => "path goes through a non-directory".into(),
        e => io::Error::from(e).to_string(),
    }
}

/// Open (creating missing ones) the directory `comps` beneath `root`.
fn ensure_dirs(root: BorrowedFd<'_>, comps: &[OsString]) -> std::result::Result<OwnedFd, Errno> {
    let mut cur = sys::open_dir_beneath(root, ".")?;
    for c in comps {
        cur = match sys::open_dir_beneath(cur.as_fd(), c) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                rustix::fs::mkdirat(&cur, c.as_os_str(), Mode::from_raw_mode(0o755))?;
                sys::open_dir_beneath(cur.as_fd(), c)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(cur)
}

struct DirAttrs {
    path: Vec<OsString>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

fn times(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Extract a layer tar into the empty directory `dest`. Whiteouts become 0/0 character
/// devices and opaque markers `trusted.overlay.opaque` (or, without the privilege for
/// them, stay as AUFS `.wh.` files, which the overlay also honours in lower layers).
pub fn unpack<R: Read>(r: R, dest: &Path) -> Result<()> {
    let root_fd = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", dest.display()))?;
    let root = root_fd.as_fd();
    let privileged = sys::euid() == 0;
    // Root of a user namespace (rootless with subordinate IDs) can give only the IDs it
    // maps: an owner outside them stays root's, as podman's unpack does.
    let in_userns = privileged && !sys::in_initial_userns();
    let owned = |r: rustix::io::Result<()>| match r {
        Err(Errno::INVAL) if in_userns => {
            log::warn!("an owner outside this user namespace's ID ranges: kept as root");
            Ok(())
        }
        r => r,
    };
    let mut ar = tar::Archive::new(r);
    let mut explicit: HashSet<OsString> = HashSet::new();
    let mut kinds: HashMap<OsString, bool> = HashMap::new(); // path -> is_dir
    let mut dirs: Vec<DirAttrs> = Vec::new();
    for entry in ar.entries().context("reading layer")? {
        let mut entry = entry.context("reading layer entry")?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let fail = |m: &dyn std::fmt::Display| -> anyhow::Error {
            LayerError::Entry {
                path: shown.to_string(),
                reason: m.to_string(),
            }
            .into()
        };
        let comps = crate::paths::entry(&raw).map_err(|m| fail(&m.to_string()))?;
        let hdr = entry.header().clone();
        let kind = hdr.entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            continue;
        }
        let mode = hdr.mode().map_err(|e| fail(&e))? & 0o7777;
        let uid = hdr.uid().map_err(|e| fail(&e))? as u32;
        let gid = hdr.gid().map_err(|e| fail(&e))? as u32;
        let mtime = hdr.mtime().map_err(|e| fail(&e))? as i64;
        let xattrs: Vec<(OsString, Vec<u8>)> = match entry.pax_extensions() {
            Ok(Some(exts)) => exts
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let k = e.key_bytes().strip_prefix(b"SCHILY.xattr.")?.to_vec();
                    (!crate::overlay::xattr::is_private_xattr(&k))
                        .then(|| (OsString::from_vec(k), e.value_bytes().to_vec()))
                })
                .collect(),
            _ => vec![],
        };
        if comps.is_empty() {
            if kind.is_dir() {
                dirs.push(DirAttrs {
                    path: vec![],
                    mode,
                    uid,
                    gid,
                    mtime,
                });
                continue;
            }
            return Err(fail(&"the layer root must be a directory"));
        }
        let path = crate::paths::join(&comps);
        if !explicit.insert(path.clone()) {
            return Err(fail(&"duplicate entry"));
        }
        let (name, parent) = comps.split_last().unwrap();
        let pfd = ensure_dirs(root, parent).map_err(|e| fail(&err_at(e)))?;
        let p = pfd.as_fd();
        if name.as_bytes() == whiteout::OPAQUE_MARKER.as_bytes() {
            if whiteout::set_opaque(XTarget::Fd(p), crate::overlay::xattr::XattrNs::Trusted).is_err() {
                File::create(dest.join(&path)).map_err(|e| fail(&e))?;
            }
            continue;
        }
        if whiteout::is_aufs_marker(name) {
            let target = whiteout::aufs_target(name).ok_or_else(|| fail(&"a whiteout of no plain name"))?;
            match whiteout::make_whiteout(p, target) {
                Ok(()) => {}
                Err(Errno::EXIST) => return Err(fail(&"whiteout of an entry of the same layer")),
                Err(_) => {
                    sys::open_beneath(
                        p,
                        name,
                        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                        Mode::empty(),
                    )
                    .map_err(|e| fail(&err_at(e)))?;
                }
            }
            continue;
        }
        let exists = |e: Errno| {
            if e == Errno::EXIST {
                fail(&"duplicate entry")
            } else {
                fail(&err_at(e))
            }
        };
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let f = sys::open_beneath(
                    p,
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(exists)?;
                let mut file = File::from(f);
                let want = entry.size();
                let n = io::copy(&mut entry, &mut file).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        fail(&"truncated: the archive ends inside this file")
                    } else {
                        fail(&e)
                    }
                })?;
                if n != want {
                    return Err(fail(&format!("truncated: {n} of {want} bytes")));
                }
                if privileged {
                    owned(rustix::fs::fchown(
                        &file,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    ))
                    .map_err(|e| fail(&io::Error::from(e)))?;
                }
                for (k, v) in &xattrs {
                    set_xattr(XTarget::Fd(file.as_fd()), k, v).map_err(|e| fail(&e))?;
                }
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))
                    .map_err(|e| fail(&io::Error::from(e)))?;
                rustix::fs::futimens(&file, &times(mtime)).map_err(|e| fail(&io::Error::from(e)))?;
                kinds.insert(path, false);
                continue;
            }
            tar::EntryType::Directory => {
                match rustix::fs::mkdirat(p, name.as_os_str(), Mode::from_raw_mode(0o700)) {
                    Ok(()) => {}
                    Err(Errno::EXIST)
                        if sys::stat_at(p, name)
                            .map(|s| s.st_mode & libc::S_IFMT == libc::S_IFDIR)
                            .unwrap_or(false) => {}
                    Err(e) => return Err(exists(e)),
                }
                if !xattrs.is_empty() {
                    let d = sys::open_dir_beneath(p, name).map_err(|e| fail(&err_at(e)))?;
                    for (k, v) in &xattrs {
                        set_xattr(XTarget::Fd(d.as_fd()), k, v).map_err(|e| fail(&e))?;
                    }
                }
                dirs.push(DirAttrs {
                    path: comps.clone(),
                    mode,
                    uid,
                    gid,
                    mtime,
                });
                kinds.insert(path, true);
                continue;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| fail(&"symlink without target"))?
                    .into_owned();
                // The target is data, whatever it says (docker stores `../../..` too): no
                // extraction ever follows a symlink (every path is resolved beneath the
                // root without symlinks), and inside a container ".." stops at the root.
                rustix::fs::symlinkat(OsStr::from_bytes(&target), p, name.as_os_str()).map_err(exists)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| fail(&"hard link without target"))?
                    .into_owned();
                let tcomps =
                    crate::paths::entry(&target).map_err(|m| fail(&format!("hard link target: {m}")))?;
                let tpath = crate::paths::join(&tcomps);
                match kinds.get(&tpath) {
                    Some(false) => {}
                    Some(true) => return Err(fail(&"hard link to a directory")),
                    None => {
                        return Err(fail(&format!(
                            "hard link target '{}' is not an earlier entry of this layer",
                            String::from_utf8_lossy(&target)
                        )))
                    }
                }
                let (tname, tparent) = tcomps.split_last().unwrap();
                let tp =
                    sys::open_dir_beneath(root, crate::paths::join(tparent)).map_err(|e| fail(&err_at(e)))?;
                rustix::fs::linkat(&tp, tname.as_os_str(), p, name.as_os_str(), AtFlags::empty())
                    .map_err(exists)?;
                kinds.insert(path, false);
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let ft = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev = if ft == FileType::Fifo {
                    0
                } else {
                    if !privileged {
                        return Err(fail(&"device nodes can only be created by root"));
                    }
                    let ma = hdr.device_major().ok().flatten().unwrap_or(0);
                    let mi = hdr.device_minor().ok().flatten().unwrap_or(0);
                    rustix::fs::makedev(ma, mi)
                };
                rustix::fs::mknodat(p, name.as_os_str(), ft, Mode::from_raw_mode(mode), dev)
                    .map_err(exists)?;
                rustix::fs::chmodat(p, name.as_os_str(), Mode::from_raw_mode(mode), AtFlags::empty())
                    .map_err(|e| fail(&io::Error::from(e)))?;
            }
            other => return Err(fail(&format!("unsupported entry type {other:?}"))),
        }
        // Symlinks and special files: owner, xattrs, times by name.
        if privileged {
            owned(rustix::fs::chownat(
                p,
                name.as_os_str(),
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            ))
            .map_err(|e| fail(&io::Error::from(e)))?;
        }
        for (k, v) in &xattrs {
            set_xattr(XTarget::At(p, name), k, v).map_err(|e| fail(&e))?;
        }
        if kind != tar::EntryType::Symlink && mode & 0o7000 != 0 {
            rustix::fs::chmodat(p, name.as_os_str(), Mode::from_raw_mode(mode), AtFlags::empty())
                .map_err(|e| fail(&io::Error::from(e)))?;
        }
        rustix::fs::utimensat(p, name.as_os_str(), &times(mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| fail(&io::Error::from(e)))?;
        kinds.insert(path, false);
    }
    // Directory attributes last, deepest first: adding children changed their mtimes.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.path.len()));
    for d in dirs {
        let fd = if d.path.is_empty() {
            root_fd.try_clone()?
        } else {
            sys::open_dir_beneath(root, crate::paths::join(&d.path)).map_err(|e| {
                anyhow!(
                    "directory '{}': {}",
                    crate::paths::join(&d.path).to_string_lossy(),
                    err_at(e)
                )
            })?
        };
        if privileged {
            owned(rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(d.uid)),
                Some(rustix::fs::Gid::from_raw(d.gid)),
            ))?;
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(d.mode))?;
        rustix::fs::futimens(&fd, &times(d.mtime))?;
    }
    Ok(())
}

fn set_xattr(t: XTarget<'_>, k: &OsStr, v: &[u8]) -> io::Result<()> {
    match sys::setxattr(t, k, v, 0) {
        Ok(()) => Ok(()),
        // Unprivileged: trusted.* and security.* cannot be set; the rest must.
        Err(Errno::PERM | Errno::OPNOTSUPP) if !k.as_bytes().starts_with(b"user.") => {
            log::warn!("xattr {} not restored", k.to_string_lossy());
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// A layer that cannot be unpacked (inside `anyhow::Error`, for callers that tell it
/// apart: `e.downcast_ref::<LayerError>()`).
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// One entry is refused: its path (as it appears in the tar) and why.
    #[error("layer entry '{path}': {reason}")]
    Entry {
        /// The entry's path.
        path: String,
        /// Why.
        reason: String,
    },
}

// ----- packing ------------------------------------------------------------------------

/// Options for writing a layer.
#[derive(Debug, Clone, Default)]
pub struct PackOpts {
    /// SOURCE_DATE_EPOCH: file times are clamped to it.
    pub epoch: Option<i64>,
    /// Glob patterns (matched against `/path`) of entries to leave out.
    pub excludes: Vec<String>,
    /// The layers the upper was mounted over (top first): a directory that carries a
    /// redirect (it was renamed) is written with its whole merged content, read from them.
    pub lowers: Vec<std::path::PathBuf>,
}

/// Counts of what a pack wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct PackStats {
    /// Entries written.
    pub entries: u64,
    /// Payload bytes.
    pub bytes: u64,
}

/// A tar writer that builds USTAR headers with PAX records where needed.
pub struct TarOut<W: Write> {
    b: tar::Builder<W>,
    epoch: Option<i64>,
    /// Statistics.
    pub stats: PackStats,
}

/// What an entry is.
#[derive(Debug)]
pub enum EntryKind<'a> {
    /// Directory.
    Dir,
    /// Regular file with its size.
    File(u64),
    /// Symlink with target.
    Symlink(&'a [u8]),
    /// Hard link to an earlier path.
    Link(&'a str),
    /// Character device.
    Char(u32, u32),
    /// Block device.
    Block(u32, u32),
    /// FIFO.
    Fifo,
}

/// Metadata of an entry.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: i64,
}

impl<W: Write> TarOut<W> {
    /// Wrap a writer.
    pub fn new(w: W, epoch: Option<i64>) -> Self {
        let mut b = tar::Builder::new(w);
        b.mode(tar::HeaderMode::Complete);
        TarOut {
            b,
            epoch,
            stats: PackStats::default(),
        }
    }

    /// Append one entry; `data` must yield exactly the file size for files.
    pub fn append(
        &mut self,
        path: &str,
        kind: EntryKind<'_>,
        m: Meta,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        data: &mut dyn Read,
    ) -> Result<()> {
        let mut h = tar::Header::new_ustar();
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        let mut path = path.to_string();
        if matches!(kind, EntryKind::Dir) && !path.ends_with('/') {
            path.push('/');
        }
        if h.set_path(&path).is_err() || path.len() > 255 {
            pax.push(("path".into(), path.clone().into_bytes()));
            let short: String = path
                .chars()
                .rev()
                .take(90)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let _ = h.set_path(short.trim_start_matches('/'));
        }
        let (ty, size) = match kind {
            EntryKind::Dir => (tar::EntryType::Directory, 0),
            EntryKind::File(n) => (tar::EntryType::Regular, n),
            EntryKind::Symlink(t) => {
                if t.len() > 100 {
                    pax.push(("linkpath".into(), t.to_vec()));
                } else {
                    h.set_link_name_literal(t).map_err(|e| anyhow!("{path}: {e}"))?;
                }
                (tar::EntryType::Symlink, 0)
            }
            EntryKind::Link(t) => {
                if t.len() > 100 {
                    pax.push(("linkpath".into(), t.as_bytes().to_vec()));
                } else {
                    h.set_link_name_literal(t.as_bytes())
                        .map_err(|e| anyhow!("{path}: {e}"))?;
                }
                (tar::EntryType::Link, 0)
            }
            EntryKind::Char(..) => (tar::EntryType::Char, 0),
            EntryKind::Block(..) => (tar::EntryType::Block, 0),
            EntryKind::Fifo => (tar::EntryType::Fifo, 0),
        };
        h.set_entry_type(ty);
        h.set_size(size);
        if size > 0o77777777777 {
            pax.push(("size".into(), size.to_string().into_bytes()));
        }
        h.set_mode(m.mode & 0o7777);
        for (key, v) in [("uid", m.uid), ("gid", m.gid)] {
            if v > 0o7777777 {
                pax.push((key.into(), v.to_string().into_bytes()));
            }
        }
        h.set_uid(m.uid.min(0o7777777) as u64);
        h.set_gid(m.gid.min(0o7777777) as u64);
        let mtime = match self.epoch {
            Some(e) => m.mtime.min(e),
            None => m.mtime,
        };
        h.set_mtime(mtime.max(0) as u64);
        if let EntryKind::Char(ma, mi) | EntryKind::Block(ma, mi) = kind {
            h.set_device_major(ma)?;
            h.set_device_minor(mi)?;
        }
        for (k, v) in xattrs {
            pax.push((format!("SCHILY.xattr.{}", String::from_utf8_lossy(k)), v.clone()));
        }
        if !pax.is_empty() {
            self.b
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        h.set_cksum();
        let mut limited = data.take(size);
        self.b
            .append(&h, &mut limited)
            .with_context(|| format!("writing '{path}'"))?;
        self.stats.entries += 1;
        self.stats.bytes += size;
        Ok(())
    }

    /// Write the end of the archive and return the writer.
    pub fn finish(self) -> Result<W> {
        Ok(self.b.into_inner()?)
    }
}

/// Copy `r` to `w` in chunks of up to 1 MiB (`size`: what `r` holds, when known). The
/// generic copy goes 8 KiB at a time, which through a FUSE mount is one WRITE request per
/// 8 KiB (a 48 MiB COPY step made 6000 of them).
pub fn copy_data(r: &mut dyn Read, w: &mut dyn Write, size: Option<u64>) -> io::Result<u64> {
    let cap = size.map_or(1 << 20, |s| s.clamp(4096, 1 << 20) as usize);
    let mut buf = vec![0u8; cap];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..k])?;
        n += k as u64;
    }
}

/// A tiny glob: `*` (not across `/`), `**` (across), `?`, literal otherwise.
pub fn glob_match(pat: &str, s: &str) -> bool {
    fn rec(p: &[u8], s: &[u8]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => (0..=s.len()).any(|i| rec(&p[2..], &s[i..])),
            Some(b'*') => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'/')
                .any(|i| rec(&p[1..], &s[i..])),
            Some(b'?') => !s.is_empty() && s[0] != b'/' && rec(&p[1..], &s[1..]),
            Some(c) => s.first() == Some(c) && rec(&p[1..], &s[1..]),
        }
    }
    rec(pat.as_bytes(), s.as_bytes())
}

/// Does an exclude pattern match `/path` (or one of its parents)?
pub fn excluded(opts: &PackOpts, abs: &str) -> bool {
    opts.excludes.iter().any(|p| {
        let p = if p.starts_with('/') {
            p.clone()
        } else {
            format!("/{p}")
        };
        glob_match(&p, abs) || glob_match(&format!("{}/**", p.trim_end_matches('/')), abs)
    })
}

fn meta(st: &rustix::fs::Stat) -> Meta {
    // Rootless, a container's root is the user: its files are root's in the layer.
    let (eu, eg) = (sys::euid(), sys::egid());
    let rootless = eu != 0;
    Meta {
        mode: st.st_mode & 0o7777,
        uid: if rootless && st.st_uid == eu { 0 } else { st.st_uid },
        gid: if rootless && st.st_gid == eg { 0 } else { st.st_gid },
        mtime: st.st_mtime,
    }
}

fn user_xattrs(t: XTarget<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v: Vec<(Vec<u8>, Vec<u8>)> = sys::listxattr(t)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !crate::overlay::xattr::is_private_xattr(n))
        .filter_map(|n| sys::getxattr(t, OsStr::from_bytes(&n)).ok().map(|val| (n, val)))
        .collect();
    v.sort();
    v
}

/// Write the changes recorded in an overlay upper directory as an OCI layer.
pub fn pack_upper<W: Write>(upper: &Path, out: &mut TarOut<W>, opts: &PackOpts) -> Result<()> {
    let root = rustix::fs::open(
        upper,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("upper directory '{}'", upper.display()))?;
    let mut p = Pack {
        upper,
        opts,
        links: HashMap::new(),
        merged: None,
    };
    pack_dir(root.as_fd(), "", out, &mut p)
}

/// State of one `pack_upper`.
struct Pack<'a> {
    upper: &'a Path,
    opts: &'a PackOpts,
    links: HashMap<(u64, u64), String>,
    /// The merged tree (upper over `opts.lowers`), opened at the first redirect.
    merged: Option<super::tree::Tree>,
}

impl Pack<'_> {
    fn merged(&mut self) -> Result<&super::tree::Tree> {
        if self.merged.is_none() {
            let mut layers = vec![self.upper.to_path_buf()];
            layers.extend(self.opts.lowers.iter().cloned());
            self.merged = Some(super::tree::Tree::open(layers)?);
        }
        Ok(self.merged.as_ref().expect("just opened"))
    }
}

/// The redirect an upper directory carries (a renamed directory), in the namespace a mount
/// by this process writes: in the other one the name is a user's data.
pub fn upper_redirect(t: XTarget<'_>, xnames: &[Vec<u8>]) -> Result<Option<Vec<u8>>> {
    let ns = crate::overlay::xattr::XattrNs::by_privilege();
    Ok(whiteout::upper_redirect(t, xnames, ns)?)
}

/// The OCI whiteout (`.wh.NAME`) of `name` in directory `rel`.
fn whiteout_entry<W: Write>(out: &mut TarOut<W>, opts: &PackOpts, rel: &str, name: &OsStr) -> Result<()> {
    if excluded(opts, &format!("/{rel}{}", name.to_string_lossy())) {
        return Ok(());
    }
    let wh = format!("{rel}{}", whiteout::aufs_name(name).to_string_lossy());
    let m = Meta {
        mode: 0,
        uid: 0,
        gid: 0,
        mtime: opts.epoch.unwrap_or(0),
    };
    out.append(&wh, EntryKind::File(0), m, &[], &mut io::empty())?;
    Ok(())
}

fn pack_dir<W: Write>(dir: BorrowedFd<'_>, rel: &str, out: &mut TarOut<W>, p: &mut Pack<'_>) -> Result<()> {
    let opts = p.opts;
    let mut names: Vec<Vec<u8>> = rustix::fs::Dir::read_from(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    names.sort();
    let mut rest = Vec::new();
    // Whiteouts before their siblings, as the OCI spec asks.
    for n in &names {
        let name = OsStr::from_bytes(n);
        if n.as_slice() == whiteout::OPAQUE_MARKER.as_bytes() {
            // fuse-overlayfs's opaque marker: the directory's own entry carries it (below).
            continue;
        }
        let st = match whiteout::aufs_target(name) {
            // fuse-overlayfs's whiteout file, as the overlay reads it: it hides NAME below
            // unless the upper has NAME again, which then replaces it.
            Some(t) => {
                if !names.iter().any(|m| m.as_slice() == t.as_bytes()) {
                    whiteout_entry(out, opts, rel, t)?;
                }
                continue;
            }
            None if whiteout::is_aufs_marker(name) => {
                // `.wh.`, `.wh..`, `.wh..wh.X`: hidden by the mount, naming nothing a layer
                // can hold (and hostile to an unpacker if written).
                log::warn!(
                    "upper '/{rel}{}': a whiteout of nothing, left out",
                    name.to_string_lossy()
                );
                continue;
            }
            None => sys::stat_at(dir, name)?,
        };
        if whiteout::is_whiteout(&st) {
            whiteout_entry(out, opts, rel, name)?;
        } else {
            rest.push((n.clone(), st, format!("{rel}{}", name.to_string_lossy())));
        }
    }
    for (n, st, path) in rest {
        let name = OsStr::from_bytes(&n);
        let abs = format!("/{path}");
        if excluded(opts, &abs) {
            continue;
        }
        let t = XTarget::At(dir, name);
        let m = meta(&st);
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let d = sys::open_dir_beneath(dir, name)?;
                let dt = XTarget::Fd(d.as_fd());
                let xnames = sys::listxattr(dt).unwrap_or_default();
                let opaque = whiteout::upper_is_opaque(dt, &xnames) || whiteout::has_opaque_marker(d.as_fd());
                // Renamed: OCI has no redirects, so the layer hides whatever is below at
                // the new path and carries the directory's whole merged content. (Not when
                // opaque: the mount follows no redirect then.)
                let redirect = !opaque
                    && upper_redirect(dt, &xnames)
                        .with_context(|| format!("upper directory '{abs}'"))?
                        .is_some();
                out.append(&path, EntryKind::Dir, m, &user_xattrs(dt), &mut io::empty())?;
                if opaque || redirect {
                    let mm = Meta {
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: opts.epoch.unwrap_or(0),
                    };
                    out.append(
                        &format!("{path}/{}", whiteout::OPAQUE_MARKER),
                        EntryKind::File(0),
                        mm,
                        &[],
                        &mut io::empty(),
                    )?;
                }
                if redirect {
                    p.merged()?;
                    let (tree, links) = (p.merged.as_ref().expect("opened"), &mut p.links);
                    // One link map with the rest of the upper: a hard link between the
                    // renamed directory and elsewhere stays one.
                    tree.export_from(Some(&path), out, &|a| excluded(opts, a), links)
                        .with_context(|| format!("writing the content of renamed directory '{abs}'"))?;
                } else {
                    pack_dir(d.as_fd(), &format!("{path}/"), out, p)?;
                }
            }
            FileType::RegularFile => {
                if st.st_nlink > 1 {
                    if let Some(first) = p.links.get(&(st.st_dev, st.st_ino)) {
                        let first = first.clone();
                        out.append(&path, EntryKind::Link(&first), m, &[], &mut io::empty())?;
                        continue;
                    }
                    p.links.insert((st.st_dev, st.st_ino), path.clone());
                }
                let f = sys::open_beneath(dir, name, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty())?;
                let xs = user_xattrs(XTarget::Fd(f.as_fd()));
                // Read in big chunks: the tar writer copies 8 KiB at a time.
                let size = st.st_size as u64;
                let mut file =
                    io::BufReader::with_capacity(size.clamp(4096, 1 << 20) as usize, File::from(f));
                out.append(&path, EntryKind::File(size), m, &xs, &mut file)?;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
                out.append(
                    &path,
                    EntryKind::Symlink(target.as_bytes()),
                    m,
                    &user_xattrs(t),
                    &mut io::empty(),
                )?;
            }
            FileType::CharacterDevice | FileType::BlockDevice => {
                let (ma, mi) = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
                let k = if FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice {
                    EntryKind::Char(ma, mi)
                } else {
                    EntryKind::Block(ma, mi)
                };
                out.append(&path, k, m, &user_xattrs(t), &mut io::empty())?;
            }
            FileType::Fifo => out.append(&path, EntryKind::Fifo, m, &user_xattrs(t), &mut io::empty())?,
            _ => log::info!("'{abs}': sockets cannot be stored in a layer; left out"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("/tmp/*", "/tmp/x"));
        assert!(!glob_match("/tmp/*", "/tmp/x/y"));
        assert!(glob_match("/tmp/**", "/tmp/x/y"));
        assert!(glob_match("/var/log/*.log", "/var/log/a.log"));
        assert!(glob_match("/a?c", "/abc"));
        assert!(!glob_match("/a?c", "/a/c"));
        let o = PackOpts {
            excludes: vec!["tmp".into()],
            ..Default::default()
        };
        assert!(excluded(&o, "/tmp"));
        assert!(excluded(&o, "/tmp/sub/file"));
        assert!(!excluded(&o, "/tmpfile"));
    }

    /// An upper fuse-overlayfs wrote (`.wh.NAME` files, a directory opaque by its marker
    /// file alone) becomes the OCI layer the overlay shows: each marker once, none for a
    /// name the upper has again.
    #[test]
    fn fuse_overlayfs_markers_in_an_upper() {
        let d = tempfile::tempdir().unwrap();
        let u = d.path();
        std::fs::write(u.join(".wh.gone"), "").unwrap();
        std::fs::write(u.join(".wh.again"), "").unwrap();
        std::fs::write(u.join("again"), "upper").unwrap();
        std::fs::create_dir(u.join("opq")).unwrap();
        std::fs::write(u.join("opq/.wh..wh..opq"), "").unwrap();
        std::fs::write(u.join("opq/mine"), "").unwrap();
        std::fs::create_dir(u.join("merged")).unwrap();
        // Markers that name nothing a layer can hold: the mount ignores them, and so does
        // the layer (a `.wh..` entry would be hostile to whoever unpacks it).
        std::fs::write(u.join(".wh.."), "").unwrap();
        std::fs::write(u.join("merged/.wh..wh.x"), "").unwrap();
        let mut out = TarOut::new(Vec::new(), None);
        pack_upper(u, &mut out, &PackOpts::default()).unwrap();
        let data = out.finish().unwrap();
        let mut got = Vec::new();
        for e in tar::Archive::new(&data[..]).entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            if path.ends_with(".wh.gone") {
                assert_eq!(
                    (h.mode().unwrap(), h.uid().unwrap(), h.size().unwrap()),
                    (0, 0, 0)
                );
            }
            got.push(path);
        }
        // In writing order: a directory's whiteouts before its other entries, and an opaque
        // directory's marker right after the directory.
        assert_eq!(
            got,
            [
                ".wh.gone",
                "again",
                "merged/",
                "opq/",
                "opq/.wh..wh..opq",
                "opq/mine"
            ],
            "{got:?}"
        );
    }

    #[test]
    fn refused_entries_are_typed() {
        // A ustar header naming "a/../b" (the tar crate refuses to write one itself).
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..6].copy_from_slice(b"a/../b");
        h.set_size(0);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(&[0u8; 1024]);
        let d = tempfile::tempdir().unwrap();
        let e = unpack(&data[..], d.path()).unwrap_err();
        match e.downcast_ref::<LayerError>() {
            Some(LayerError::Entry { path, reason }) => {
                assert_eq!(path, "a/../b");
                assert!(reason.contains(".."), "{reason}");
            }
            None => panic!("not a LayerError: {e:#}"),
        }
    }

    #[test]
    fn pax_records() {
        assert_eq!(pax_size(b"16 size=1234567\n20 path=some/where\n"), Some(1234567));
        assert_eq!(pax_size(b"20 path=some/where\n"), None);
        assert_eq!(pax_size(b"99 size=1\n"), None);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_num(b"0000644\0"), Some(0o644));
        assert_eq!(parse_num(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), Some(1 << 32));
        assert_eq!(parse_num(b"        "), Some(0));
    }
}
