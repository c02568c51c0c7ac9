//! `strata mount`: options -> validated configuration -> daemon.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::cli::MountArgs;
use crate::fuse::mount::{serve, MountOpts, Passthrough, DEFAULT_THREADS};
use crate::mounts::{is_mountpoint, write_pid_file, MountRecord};
use crate::overlay::idmap::IdRanges;
use crate::overlay::{LookupIndex, Overlay, OverlayConfig, RedirectDir};

/// Everything a mount needs, after parsing and before validation of the directories.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// Layer configuration for the core.
    pub overlay: OverlayConfig,
    /// Kernel-side options.
    pub opts: MountOpts,
    /// The image whose layers are the lowers, if mounted by image name.
    pub image: Option<String>,
    /// The store's lock, held from unpacking the image's layers until the mount record
    /// naming them exists, so no `gc` can remove them in between.
    pub hold: Option<Arc<std::fs::File>>,
}

/// Split a `lowerdir=` value on ':' where `\:` is a literal colon (and `\\` a backslash).
pub fn split_lowerdir(s: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => cur.push(n),
                None => cur.push('\\'),
            },
            ':' => out.push(PathBuf::from(std::mem::take(&mut cur))),
            c => cur.push(c),
        }
    }
    out.push(PathBuf::from(cur));
    out
}

/// Apply one `-o` string (comma-separated) to `spec`. Unknown options only warn: container
/// tools pass options meant for other mount programs.
pub fn apply_options(spec: &mut MountSpec, s: &str) -> anyhow::Result<()> {
    for opt in s.split(',') {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (k, v) {
            ("", None) => {}
            ("lowerdir", Some(v)) => {
                let l = split_lowerdir(v);
                if l.iter().any(|p| p.as_os_str().is_empty()) {
                    bail!("lowerdir: empty layer path in '{v}'");
                }
                spec.overlay.lowers.extend(l);
            }
            ("upperdir", Some(v)) => spec.overlay.upper = Some(PathBuf::from(v)),
            ("workdir", Some(v)) => spec.overlay.work = Some(PathBuf::from(v)),
            ("volatile", None) | ("fsync", Some("0")) => spec.overlay.volatile = true,
            ("fsync", Some(_)) => {}
            ("userxattr", None) => spec.overlay.userxattr = true,
            ("lookup_index", Some("auto")) => spec.overlay.lookup_index = LookupIndex::Auto,
            ("lookup_index", Some("always")) => spec.overlay.lookup_index = LookupIndex::Always,
            ("lookup_index", Some("off")) => spec.overlay.lookup_index = LookupIndex::Off,
            ("lookup_index", Some(v)) => bail!("lookup_index={v}: expected auto, always or off"),
            ("passthrough", Some("on")) => spec.opts.passthrough = Passthrough::On,
            ("passthrough", Some("off")) => spec.opts.passthrough = Passthrough::Off,
            ("passthrough", Some("all")) => spec.opts.passthrough = Passthrough::All,
            ("passthrough", Some(v)) => bail!("passthrough={v}: expected on, off or all"),
            ("ro", None) => spec.opts.ro = true,
            ("rw", None) => spec.opts.ro = false,
            ("dev", None) => spec.opts.dev = true,
            ("nodev", None) => spec.opts.dev = false,
            ("suid", None) => spec.opts.suid = true,
            ("nosuid", None) => spec.opts.suid = false,
            ("exec", None) => spec.opts.exec = true,
            ("noexec", None) => spec.opts.exec = false,
            ("allow_other", None) | ("allow_root", None) => spec.opts.allow_other = true,
            ("fsname", Some(v)) => spec.opts.fsname = v.to_string(),
            ("default_permissions", None) | ("noatime", None) | ("relatime", None) | ("atime", None) => {}
            ("redirect_dir", Some("on")) => spec.overlay.redirect_dir = RedirectDir::On,
            // As the kernel with its default redirect_always_follow: `off` follows.
            ("redirect_dir", Some("follow" | "off")) => spec.overlay.redirect_dir = RedirectDir::Follow,
            ("redirect_dir", Some("nofollow")) => spec.overlay.redirect_dir = RedirectDir::NoFollow,
            ("redirect_dir", Some(v)) => bail!("redirect_dir={v}: expected on, follow, nofollow or off"),
            ("metacopy", Some("off")) | ("index", Some("off")) => {}
            ("xino", Some(_)) | ("context", Some(_)) | ("fscontext", Some(_)) | ("defcontext", Some(_)) => {
                log::info!("option {opt} accepted and has no effect")
            }
            ("metacopy", Some(_)) | ("index", Some(_)) => {
                bail!("option '{opt}' is not supported: strata writes no metacopy or index")
            }
            // fuse-overlayfs's options, as containers/storage passes them.
            ("uidmapping", Some(v)) => {
                spec.overlay.ids.uids = IdRanges::parse(v).map_err(|e| anyhow::anyhow!("uidmapping={e}"))?
            }
            ("gidmapping", Some(v)) => {
                spec.overlay.ids.gids = IdRanges::parse(v).map_err(|e| anyhow::anyhow!("gidmapping={e}"))?
            }
            ("squash_to_root", None) => {
                // squash_to_uid/gid win over it, whatever the order.
                let ids = &mut spec.overlay.ids;
                ids.squash_uid.get_or_insert(0);
                ids.squash_gid.get_or_insert(0);
            }
            ("squash_to_uid", Some(v)) => {
                spec.overlay.ids.squash_uid = Some(v.parse().map_err(|_| anyhow::anyhow!("squash_to_uid={v}: not an ID"))?)
            }
            ("squash_to_gid", Some(v)) => {
                spec.overlay.ids.squash_gid = Some(v.parse().map_err(|_| anyhow::anyhow!("squash_to_gid={v}: not an ID"))?)
            }
            ("static_nlink", None) => spec.overlay.static_nlink = true,
            ("noacl", None) => spec.opts.acl = false,
            ("uring", Some("on")) => spec.opts.uring = true,
            ("uring", Some("off")) => spec.opts.uring = false,
            ("uring", Some(v)) => bail!("uring={v}: expected on or off"),
            ("uring_yield", Some("on")) => spec.opts.uring_yield = true,
            ("uring_yield", Some("off")) => spec.opts.uring_yield = false,
            ("uring_yield", Some(v)) => bail!("uring_yield={v}: expected on or off"),
            ("xattr_permissions", Some("0")) => {}
            ("xattr_permissions", Some(v)) => bail!(
                "xattr_permissions={v}: strata keeps owners and modes in the files themselves (only 0 is supported)"
            ),
            ("threaded", Some(v)) => {
                let n: usize = v.parse().map_err(|_| anyhow::anyhow!("threaded={v}: not a number"))?;
                // fuse-overlayfs: 0 is one thread; strata's workers otherwise.
                if n == 0 {
                    spec.opts.threads = 1;
                }
            }
            ("max_write", Some(v)) => {
                v.parse::<u32>().map_err(|_| anyhow::anyhow!("max_write={v}: not a number"))?;
                log::info!("option {opt} accepted: strata negotiates the largest write the kernel allows")
            }
            ("plugins", Some(_)) => bail!("option '{opt}': strata has no lower-layer plugins"),
            _ => log::warn!("unknown mount option '{opt}' ignored"),
        }
    }
    Ok(())
}

/// The mountpoint must be an existing directory that nothing is mounted on.
fn check_mountpoint(p: &Path) -> anyhow::Result<PathBuf> {
    let canon = std::fs::canonicalize(p).with_context(|| format!("mountpoint '{}'", p.display()))?;
    if !canon.is_dir() {
        bail!("mountpoint '{}': not a directory", p.display());
    }
    if is_mountpoint(&canon) {
        bail!(
            "mountpoint '{}' is busy: something is already mounted there",
            p.display()
        );
    }
    Ok(canon)
}

/// Build the mount description from the command line. An image argument puts the image's
/// (unpacked) layers under any --lower layers.
pub fn spec_from_args(a: &MountArgs, store_root: &Path) -> anyhow::Result<MountSpec> {
    let (image, mountpoint) = match a.targets.as_slice() {
        [m] => (None, PathBuf::from(m)),
        [i, m] => (Some(i.clone()), PathBuf::from(m)),
        _ => bail!("usage: strata mount [OPTIONS] [IMAGE] MOUNTPOINT"),
    };
    let root = crate::sys::euid() == 0;
    let mut spec = MountSpec {
        overlay: OverlayConfig::default(),
        opts: MountOpts {
            mountpoint,
            allow_other: root,
            dev: root,
            suid: root,
            exec: true,
            ro: false,
            fsname: "strata".into(),
            threads: a.threads,
            passthrough: Passthrough::On,
            acl: true,
            uring: true,
            uring_yield: true,
        },
        image: None,
        hold: None,
    };
    for o in &a.options {
        apply_options(&mut spec, o)?;
    }
    spec.overlay.lowers.extend(a.lower.iter().cloned());
    if a.upper.is_some() {
        spec.overlay.upper = a.upper.clone();
    }
    if a.work.is_some() {
        spec.overlay.work = a.work.clone();
    }
    if let Some(i) = image {
        let store = crate::image::store::Store::open(store_root, true)?;
        let img = store.resolve(&i)?;
        let layers = store.unpacked_layers(&img, &crate::image::progress::Progress::new())?;
        if layers.is_empty() {
            bail!("image '{i}' has no layers");
        }
        spec.overlay.lowers.extend(layers);
        spec.image = Some(img.id.clone());
        spec.hold = Some(Arc::new(store.into_lock()));
    }
    Ok(spec)
}

fn record(spec: &MountSpec) -> MountRecord {
    MountRecord {
        pid: std::process::id() as i32,
        mountpoint: spec.opts.mountpoint.clone(),
        upper: spec
            .overlay
            .upper
            .as_ref()
            .and_then(|u| std::fs::canonicalize(u).ok()),
        image: spec.image.clone(),
        lowers: spec
            .overlay
            .lowers
            .iter()
            .map(|l| std::fs::canonicalize(l).unwrap_or_else(|_| l.clone()))
            .collect(),
    }
}

/// Mount a container's rootfs (at its own rootfs directory unless `at` is given) and
/// return the mountpoint.
pub fn mount_container(
    store_root: &Path,
    c: &crate::container::Container,
    at: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    if let Err(m) = c.mounted() {
        bail!("{m}; run 'strata umount {}' to clean up", c.state.name);
    }
    let mp = at.map(Path::to_path_buf).unwrap_or_else(|| c.rootfs());
    let lowers = {
        let store = crate::image::store::Store::open(store_root, true)?;
        let img = store
            .resolve(&c.state.image_id)
            .with_context(|| format!("image of container '{}'", c.state.name))?;
        store.unpacked_layers(&img, &crate::image::progress::Progress::new())?
    };
    let root = crate::sys::euid() == 0;
    let mut spec = MountSpec {
        overlay: OverlayConfig {
            lowers,
            upper: Some(c.upper()),
            work: Some(c.work()),
            ..Default::default()
        },
        opts: MountOpts {
            mountpoint: mp,
            allow_other: root,
            // A container root never honours device nodes: an image shipping one (say the
            // host's disk, mode 0666) must not open the device (/dev is a tmpfs of its own).
            dev: false,
            suid: root,
            exec: true,
            ro: false,
            fsname: format!("strata:{}", c.state.name),
            threads: DEFAULT_THREADS,
            passthrough: Passthrough::On,
            acl: true,
            uring: true,
            uring_yield: true,
        },
        image: Some(c.state.image_id.clone()),
        hold: None,
    };
    mount_spec(&mut spec, false, None)?;
    Ok(spec.opts.mountpoint)
}

/// `strata mount`.
pub fn run(a: MountArgs, store_root: &Path) -> anyhow::Result<()> {
    // A container name (no slash) mounts that container.
    if let Some(first) = a
        .targets
        .first()
        .filter(|t| !t.contains('/') && crate::container::Container::exists(store_root, t))
    {
        let c = crate::container::Container::open(store_root, first)?;
        let at = a.targets.get(1).map(PathBuf::from);
        let mp = mount_container(store_root, &c, at.as_deref())?;
        super::say!("{}", mp.display());
        return Ok(());
    }
    let mut spec = spec_from_args(&a, store_root)?;
    mount_spec(&mut spec, a.foreground, a.log_file.as_deref())
}

/// Validate, open the layers, then serve in the foreground or from a background daemon that
/// reports back once the mount is live.
pub fn mount_spec(spec: &mut MountSpec, foreground: bool, log_file: Option<&Path>) -> anyhow::Result<()> {
    spec.opts.mountpoint = check_mountpoint(&spec.opts.mountpoint)?;
    // Absolute now: the daemon changes directory to / before recording the mount.
    if let Some(u) = &spec.overlay.upper {
        spec.overlay.upper =
            Some(std::fs::canonicalize(u).with_context(|| format!("upperdir '{}'", u.display()))?);
    }
    // Absolute too, so the mount record names them as `gc` sees them.
    for l in spec.overlay.lowers.iter_mut() {
        if let Ok(c) = std::fs::canonicalize(&*l) {
            *l = c;
        }
    }
    spec.overlay.no_selinux = !crate::sys::selinux_enabled();
    let ov = Arc::new(Overlay::new(&spec.overlay)?);
    let mp = spec.opts.mountpoint.clone();
    if foreground {
        // The daemon creates objects with exactly the mode the caller asked for.
        crate::sys::set_umask(0);
        let pf = write_pid_file(&record(spec))?;
        drop(spec.hold.take());
        let mut failed = None;
        let r = serve(ov, &spec.opts, |r| failed = r.err());
        let _ = std::fs::remove_file(pf);
        if let Some(m) = failed {
            bail!(m);
        }
        return r.with_context(|| format!("serving {}", mp.display()));
    }
    // CLOEXEC: neither end may leak into programs the daemon runs (fusermount3).
    let (rd, wr) = crate::sys::pipe_cloexec().context("pipe")?;
    // No other thread exists yet (the FUSE workers start in the child).
    match crate::sys::fork().context("fork")? {
        crate::sys::Forked::Parent(_) => {
            drop(wr);
            // The daemon's copy of the lock stays until it has written the mount record.
            drop(spec.hold.take());
            let mut msg = String::new();
            std::fs::File::from(rd).read_to_string(&mut msg).ok();
            if msg == "ok" {
                Ok(())
            } else if msg.is_empty() {
                bail!(
                    "the strata daemon for '{}' exited before the mount was ready",
                    mp.display()
                )
            } else {
                bail!(msg)
            }
        }
        crate::sys::Forked::Child => {
            drop(rd);
            let code = daemon(ov, spec, wr, log_file);
            std::process::exit(code);
        }
    }
}

fn daemon(ov: Arc<Overlay>, spec: &mut MountSpec, wr: std::os::fd::OwnedFd, log_file: Option<&Path>) -> i32 {
    // Only here, in the daemon: the caller (e.g. `strata run`) keeps its umask.
    crate::sys::set_umask(0);
    let mut wr = std::fs::File::from(wr);
    let _ = crate::sys::setsid();
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let log = log_file.and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok());
    if let Ok(n) = &devnull {
        use std::os::fd::AsFd;
        let _ = crate::sys::dup_to_stdio(n.as_fd(), true, true, log.is_none());
        if let Some(l) = &log {
            let _ = crate::sys::dup_to_stdio(l.as_fd(), false, false, true);
        }
    }
    let _ = std::env::set_current_dir("/");
    let mp = spec.opts.mountpoint.clone();
    let pf = match write_pid_file(&record(spec)) {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(wr, "{e:#}");
            return 1;
        }
    };
    // The record names the layers now: `gc` may run again.
    drop(spec.hold.take());
    let r = serve(ov, &spec.opts, move |res| {
        let mut wr = wr;
        let _ = match res {
            Ok(()) => wr.write_all(b"ok"),
            Err(m) => wr.write_all(m.as_bytes()),
        };
        // Dropping `wr` closes the pipe: the parent stops waiting.
    });
    let _ = std::fs::remove_file(pf);
    match r {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{}: {e}", mp.display());
            1
        }
    }
}

/// mount(8) helper form: `mount.fuse.strata SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-v]`.
pub fn run_helper(args: &[OsString]) -> anyhow::Result<()> {
    let mut pos = Vec::new();
    let mut opts = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => opts.push(
                it.next()
                    .context("-o needs a value")?
                    .to_str()
                    .context("options must be UTF-8")?
                    .to_string(),
            ),
            Some(s) if s.starts_with("-o") => opts.push(s[2..].to_string()),
            Some("-n" | "-s" | "-v" | "-f" | "-i") => {}
            _ => pos.push(PathBuf::from(a)),
        }
    }
    let [_source, mountpoint] = <[PathBuf; 2]>::try_from(pos).map_err(|_| {
        anyhow::anyhow!(
            "usage: mount.fuse.strata SOURCE MOUNTPOINT -o lowerdir=...[,upperdir=...,workdir=...]"
        )
    })?;
    let a = MountArgs {
        options: opts,
        lower: vec![],
        upper: None,
        work: None,
        foreground: false,
        log_file: None,
        threads: DEFAULT_THREADS,
        targets: vec![mountpoint.to_string_lossy().into_owned()],
    };
    run(a, &crate::image::store::default_root())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowerdir_escapes() {
        assert_eq!(
            split_lowerdir("a:b:c"),
            vec![PathBuf::from("a"), "b".into(), "c".into()]
        );
        assert_eq!(split_lowerdir(r"a\:b:c"), vec![PathBuf::from("a:b"), "c".into()]);
        assert_eq!(split_lowerdir(r"a\\:b"), vec![PathBuf::from(r"a\"), "b".into()]);
    }

    #[test]
    fn options() {
        let mut s = spec_from_args(
            &MountArgs {
                options: vec![],
                lower: vec![],
                upper: None,
                work: None,
                foreground: false,
                log_file: None,
                threads: 1,
                targets: vec!["/mnt".into()],
            },
            Path::new("/nonexistent"),
        )
        .unwrap();
        apply_options(
            &mut s,
            "lowerdir=/a:/b,upperdir=/u,workdir=/w,volatile,,nodev,weird=1",
        )
        .unwrap();
        assert_eq!(s.overlay.lowers, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(s.overlay.upper, Some(PathBuf::from("/u")));
        assert!(s.overlay.volatile);
        assert!(!s.opts.dev);
        assert!(apply_options(&mut s, "lowerdir=/a::/b").is_err());
        assert!(apply_options(&mut s, "redirect_dir=sideways").is_err());
        assert!(apply_options(&mut s, "metacopy=on").is_err());
        apply_options(&mut s, "redirect_dir=nofollow").unwrap();
        assert_eq!(s.overlay.redirect_dir, RedirectDir::NoFollow);
        apply_options(&mut s, "redirect_dir=off").unwrap();
        assert_eq!(s.overlay.redirect_dir, RedirectDir::Follow);
        apply_options(&mut s, "redirect_dir=on").unwrap();
        assert_eq!(s.overlay.redirect_dir, RedirectDir::On);
        apply_options(
            &mut s,
            "uidmapping=0:100000:65536,gidmapping=0:100000:1:1:200000:10",
        )
        .unwrap();
        assert_eq!(s.overlay.ids.uids.0, vec![(0, 100000, 65536)]);
        assert_eq!(s.overlay.ids.gids.0, vec![(0, 100000, 1), (1, 200000, 10)]);
        assert!(apply_options(&mut s, "uidmapping=0:1").is_err());
        apply_options(&mut s, "squash_to_uid=7,squash_to_root").unwrap();
        assert_eq!(
            (s.overlay.ids.squash_uid, s.overlay.ids.squash_gid),
            (Some(7), Some(0))
        );
        assert!(apply_options(&mut s, "xattr_permissions=2").is_err());
        assert!(apply_options(&mut s, "plugins=/x.so").is_err());
        apply_options(
            &mut s,
            "noacl,static_nlink,threaded=0,max_write=131072,xattr_permissions=0",
        )
        .unwrap();
        assert!(!s.opts.acl && s.overlay.static_nlink && s.opts.threads == 1);
        assert!(s.opts.uring);
        apply_options(&mut s, "uring=off").unwrap();
        assert!(!s.opts.uring);
        let e = apply_options(&mut s, "uring=maybe").unwrap_err().to_string();
        assert!(e.contains("uring=maybe"), "{e}");
        assert!(s.opts.uring_yield);
        apply_options(&mut s, "uring_yield=off").unwrap();
        assert!(!s.opts.uring_yield);
        let e = apply_options(&mut s, "uring_yield=1").unwrap_err().to_string();
        assert!(e.contains("uring_yield=1"), "{e}");
    }
}
