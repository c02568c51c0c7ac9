//! The layer stack: validation of the directories a mount is built from, and their fds.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use super::whiteout;
use super::xattr::XattrNs;
use crate::sys;

/// The most lower layers one mount takes (the kernel's limit is 500 as well).
pub const MAX_LOWERS: usize = 500;

/// What a mount is built from.
#[derive(Debug, Clone, Default)]
pub struct OverlayConfig {
    /// Lower layers, top first.
    pub lowers: Vec<PathBuf>,
    /// Writable upper layer; None for a read-only mount.
    pub upper: Option<PathBuf>,
    /// Work directory on the upper's filesystem.
    pub work: Option<PathBuf>,
    /// Skip every fsync (the kernel's `volatile`).
    pub volatile: bool,
    /// Force `user.overlay.*` xattrs (the kernel's `userxattr`); default: by privilege.
    pub userxattr: bool,
    /// When lookups use a directory's lower index (see `index`).
    pub lookup_index: LookupIndex,
    /// Whether directory renames write redirects, and whether they are followed.
    pub redirect_dir: RedirectDir,
    /// Owners translated between the layers and the mount (`uidmapping=`...).
    pub ids: super::idmap::IdMap,
    /// Directories report one link (fuse-overlayfs's `static_nlink`).
    pub static_nlink: bool,
    /// The host has no SELinux: a `security.selinux` a file does not have is EOPNOTSUPP
    /// ("no labels on this file system") instead of ENODATA (see `Overlay::getxattr`).
    pub no_selinux: bool,
}

/// The kernel's `redirect_dir=` option.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RedirectDir {
    /// Any directory can be renamed (a redirect xattr records where its lower content is);
    /// redirects are followed.
    #[default]
    On,
    /// Redirects are followed, never written: renaming a directory with lower content
    /// fails with EXDEV. (The kernel's `off` means this too with its default
    /// `redirect_always_follow`.)
    Follow,
    /// Neither written nor followed: a lookup that meets a redirect fails with EPERM.
    NoFollow,
}

/// When a lookup builds the lower index of its directory (listings always do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LookupIndex {
    /// Once the layer probes of lookups in the directory cost about what building does.
    #[default]
    Auto,
    /// At the first lookup (what tests use to exercise the index everywhere).
    Always,
    /// Never: every lookup probes the layers.
    Off,
}

/// Why a mount cannot be set up. Each names the path or option at fault.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No lower layer was given.
    #[error("lowerdir: at least one lower directory is needed")]
    NoLower,
    /// Too many lower layers.
    #[error("lowerdir: {0} layers given, at most {MAX_LOWERS} are supported")]
    TooManyLowers(usize),
    /// Upper without work or the other way round.
    #[error("upperdir and workdir must be given together")]
    UpperWithoutWork,
    /// A layer path is missing, unreadable or not a directory.
    #[error("{what} '{path}': {err}")]
    BadDir {
        /// Which option.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong.
        err: String,
    },
    /// Two of the directories overlap.
    #[error("{0}")]
    Overlap(String),
    /// Upper and work are on different filesystems.
    #[error("workdir '{work}' is not on the same filesystem as upperdir '{upper}'")]
    WorkOtherFs {
        /// upper path
        upper: PathBuf,
        /// work path
        work: PathBuf,
    },
    /// The upper carries metadata strata does not implement.
    #[error("upperdir '{path}': '{entry}' carries {xattr}; strata does not implement metacopy (mount it with the kernel using metacopy=on, or copy the files up first)")]
    UnsupportedUpper {
        /// upper path
        path: PathBuf,
        /// offending entry, relative to the upper
        entry: PathBuf,
        /// which xattr
        xattr: String,
    },
}

/// One directory of the stack.
#[derive(Debug)]
pub struct Layer {
    /// Directory fd (O_RDONLY|O_DIRECTORY).
    pub fd: Arc<OwnedFd>,
    /// As given (canonical).
    pub path: PathBuf,
    /// st_dev of the layer root.
    pub dev: u64,
    /// Filesystem UUID (zeros if unknown), for origin file handles.
    pub uuid: [u8; 16],
    /// The xattr holding the owner and mode of this layer's files and directories, when
    /// the layer root carries one (see `override_stat`).
    pub override_stat: Option<&'static str>,
}

/// The xattrs containers/storage and fuse-overlayfs keep "uid:gid:mode" in, for layers
/// written by a user who could not chown; the first one the layer root carries applies to
/// the whole layer, as in fuse-overlayfs.
pub const OVERRIDE_STAT: [&str; 3] = [
    "security.fuseoverlayfs.override_stat",
    "user.containers.override_stat",
    "user.fuseoverlayfs.override_stat",
];

/// Parse an override_stat value: `uid:gid:mode` (mode in octal; fuse-overlayfs also writes
/// the file-type bits, which are ignored, and newer writers a `:type` suffix).
pub fn parse_override_stat(v: &[u8]) -> Option<(u32, u32, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim_end_matches('\0');
    let mut it = s.split(':');
    let uid = it.next()?.parse().ok()?;
    let gid = it.next()?.parse().ok()?;
    let mode = u32::from_str_radix(it.next()?, 8).ok()?;
    Some((uid, gid, mode & 0o7777))
}

/// Upper layer and its staging directory `workdir/work`.
#[derive(Debug)]
pub struct Upper {
    /// The upper directory.
    pub layer: Layer,
    /// `workdir/work`, where copy-ups and new objects are staged.
    pub work: OwnedFd,
    /// Whether the upper held any `.wh.` name at mount (fuse-overlayfs's whiteout files
    /// and opaque markers), or could not be read whole. strata never makes one, so
    /// without any, lookups skip looking for them.
    pub wh_files: bool,
}

fn bad(what: &'static str, path: &Path, err: impl ToString) -> SetupError {
    SetupError::BadDir {
        what,
        path: path.to_path_buf(),
        err: err.to_string(),
    }
}

fn open_layer(what: &'static str, path: &Path) -> Result<Layer, SetupError> {
    let canon = std::fs::canonicalize(path).map_err(|e| bad(what, path, e))?;
    let md = std::fs::metadata(&canon).map_err(|e| bad(what, path, e))?;
    if !md.is_dir() {
        return Err(bad(what, path, "not a directory"));
    }
    let fd = rustix::fs::open(
        &canon,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| bad(what, path, std::io::Error::from(e)))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| bad(what, path, std::io::Error::from(e)))?;
    let uuid = sys::fs_uuid(fd.as_fd());
    let names = sys::listxattr(sys::XTarget::Fd(fd.as_fd())).unwrap_or_default();
    let override_stat = OVERRIDE_STAT
        .into_iter()
        .find(|n| names.iter().any(|x| x.as_slice() == n.as_bytes()));
    Ok(Layer {
        fd: Arc::new(fd),
        path: canon,
        dev: st.st_dev,
        uuid,
        override_stat,
    })
}

fn nested(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The opened, validated stack.
#[derive(Debug)]
pub struct Stack {
    /// Lower layers, top first.
    pub lowers: Vec<Layer>,
    /// Upper and work, if writable.
    pub upper: Option<Upper>,
    /// Namespace of the private xattrs we write.
    pub ns: XattrNs,
}

impl Stack {
    /// Validate the configuration and open every directory. Leftovers of a crash in
    /// `workdir/work` are removed.
    pub fn open(cfg: &OverlayConfig) -> Result<Stack, SetupError> {
        if cfg.lowers.is_empty() {
            return Err(SetupError::NoLower);
        }
        if cfg.lowers.len() > MAX_LOWERS {
            return Err(SetupError::TooManyLowers(cfg.lowers.len()));
        }
        let lowers = cfg
            .lowers
            .iter()
            .map(|p| open_layer("lowerdir", p))
            .collect::<Result<Vec<_>, _>>()?;
        // trusted.* needs real root: root in a user namespace works as the kernel's
        // userxattr mode does.
        if let Some(l) = lowers.iter().find(|l| l.override_stat.is_some()) {
            log::info!(
                "lowerdir '{}': owners and modes from {}",
                l.path.display(),
                l.override_stat.unwrap_or_default()
            );
        }
        let ns = if cfg.userxattr {
            XattrNs::User
        } else {
            XattrNs::by_privilege()
        };
        let upper = match (&cfg.upper, &cfg.work) {
            (None, None) => None,
            (Some(u), Some(w)) => {
                let ul = open_layer("upperdir", u)?;
                let wl = open_layer("workdir", w)?;
                for l in &lowers {
                    if nested(&ul.path, &l.path) {
                        return Err(SetupError::Overlap(format!(
                            "upperdir '{}' and lowerdir '{}' overlap: one is inside the other",
                            u.display(),
                            l.path.display()
                        )));
                    }
                    if nested(&wl.path, &l.path) {
                        return Err(SetupError::Overlap(format!(
                            "workdir '{}' and lowerdir '{}' overlap: one is inside the other",
                            w.display(),
                            l.path.display()
                        )));
                    }
                }
                if nested(&ul.path, &wl.path) {
                    return Err(SetupError::Overlap(format!(
                        "upperdir '{}' and workdir '{}' must be separate directories, neither inside the other",
                        u.display(),
                        w.display()
                    )));
                }
                if ul.dev != wl.dev {
                    return Err(SetupError::WorkOtherFs {
                        upper: u.clone(),
                        work: w.clone(),
                    });
                }
                if wl.path.join("work/incompat/volatile").exists() {
                    return Err(bad(
                        "workdir",
                        w,
                        "holds work/incompat/volatile: it was mounted volatile, so after a crash the upper may be inconsistent (as the kernel, strata refuses; remove that directory to mount anyway)",
                    ));
                }
                let work = prepare_work(&wl).map_err(|e| bad("workdir", w, std::io::Error::from(e)))?;
                if cfg.volatile {
                    // The kernel's marker, so that a later mount (strata's or the kernel's)
                    // knows syncs were skipped.
                    rustix::fs::mkdirat(&work, "incompat", Mode::from_raw_mode(0o700))
                        .and_then(|()| {
                            rustix::fs::mkdirat(&work, "incompat/volatile", Mode::from_raw_mode(0o700))
                        })
                        .map_err(|e| bad("workdir", w, std::io::Error::from(e)))?;
                }
                let wh_files = check_upper(&ul, ns)?;
                Some(Upper {
                    layer: ul,
                    work,
                    wh_files,
                })
            }
            _ => return Err(SetupError::UpperWithoutWork),
        };
        Ok(Stack { lowers, upper, ns })
    }
}

/// Create `workdir/work` if needed and empty it: anything there is a crash leftover.
fn prepare_work(wl: &Layer) -> Result<OwnedFd, Errno> {
    match rustix::fs::mkdirat(&wl.fd, "work", Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    let work = sys::open_dir_beneath(wl.fd.as_fd(), "work")?;
    remove_children(&work)?;
    Ok(work)
}

/// Remove everything inside the directory `dir`.
pub fn remove_children(dir: impl AsFd) -> Result<(), Errno> {
    let dir = dir.as_fd();
    let names: Vec<_> = rustix::fs::Dir::read_from(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for n in names {
        let name = OsStr::from_bytes(n.as_bytes());
        remove_tree_at(dir, name)?;
    }
    Ok(())
}

/// Remove `name` in `dir`, recursively if it is a directory (never following symlinks).
pub fn remove_tree_at(dir: impl AsFd, name: &OsStr) -> Result<(), Errno> {
    let dir = dir.as_fd();
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {
            let sub = sys::open_dir_beneath(dir, name)?;
            remove_children(&sub)?;
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
        }
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Walk the whole upper: refuse one that uses a kernel feature we do not implement
/// (metacopy), and say whether any name in it starts with `.wh.` (or some directory could
/// not be read). The walk reads only the upper, so its cost grows with the changes, not the
/// image.
fn check_upper(ul: &Layer, ns: XattrNs) -> Result<bool, SetupError> {
    let mut wh_files = false;
    let mut stack = vec![(sys::open_dir_beneath(ul.fd.as_fd(), ".").ok(), PathBuf::new())];
    // Only the mount's own namespace counts, as for the kernel.
    let bad_names: Vec<String> = ["metacopy"]
        .iter()
        .map(|w| ns.name(w).to_string_lossy().into_owned())
        .collect();
    while let Some((dfd, rel)) = stack.pop() {
        // One unreadable directory must not end the whole check.
        let Some(dfd) = dfd else {
            log::warn!("upperdir: cannot open '{}' to check it", rel.display());
            wh_files = true;
            continue;
        };
        let Ok(dir) = rustix::fs::Dir::read_from(&dfd) else {
            wh_files = true;
            continue;
        };
        for ent in dir {
            let Ok(ent) = ent else {
                wh_files = true;
                break;
            };
            let nb = ent.file_name().to_bytes();
            if nb == b"." || nb == b".." {
                continue;
            }
            // (a file system without d_type: its subdirectories go unwalked)
            wh_files |=
                nb.starts_with(whiteout::WH_PREFIX) || ent.file_type() == rustix::fs::FileType::Unknown;
            let name = OsStr::from_bytes(nb);
            let t = sys::XTarget::At(dfd.as_fd(), name);
            if let Ok(list) = sys::listxattr(t) {
                for x in &list {
                    if let Some(b) = bad_names.iter().find(|b| b.as_bytes() == x.as_slice()) {
                        return Err(SetupError::UnsupportedUpper {
                            path: ul.path.clone(),
                            entry: rel.join(name),
                            xattr: b.clone(),
                        });
                    }
                }
            }
            if ent.file_type() == rustix::fs::FileType::Directory {
                stack.push((sys::open_dir_beneath(dfd.as_fd(), name).ok(), rel.join(name)));
            }
        }
    }
    Ok(wh_files)
}
