//! `strata build`: options -> build::Options; mounts for the builder through the FUSE adapter.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::build::{self, Mounter};
use crate::cli::{BuildArgs, BuildOverlay};
use crate::fuse::mount::{MountOpts, Passthrough};
use crate::image::reference::Reference;
use crate::overlay::OverlayConfig;

/// A mount (strata's or the kernel's overlayfs) that is unmounted when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if crate::mounts::is_mountpoint(&self.0) {
            if let Err(e) =
                super::umount::umount(&self.0, false).or_else(|_| super::umount::umount(&self.0, true))
            {
                eprintln!("strata: error: unmounting '{}': {e:#}", self.0.display());
            }
        }
    }
}

struct FuseMounter;

impl Mounter for FuseMounter {
    fn mount(
        &self,
        lowers: Vec<PathBuf>,
        rw: Option<(&Path, &Path)>,
        mnt: &Path,
    ) -> Result<Box<dyn std::any::Any>> {
        let root = crate::sys::euid() == 0;
        let mut spec = super::mount::MountSpec {
            overlay: OverlayConfig {
                lowers,
                upper: rw.map(|(u, _)| u.to_path_buf()),
                work: rw.map(|(_, w)| w.to_path_buf()),
                // No fsync per copy-up: a step's upper is synced once, when it is adopted as
                // the step's unpacked layer, and a build that dies is discarded whole.
                volatile: rw.is_some(),
                ..Default::default()
            },
            opts: MountOpts {
                mountpoint: mnt.to_path_buf(),
                allow_other: root,
                dev: false,
                suid: root,
                exec: true,
                ro: rw.is_none(),
                fsname: "strata:build".into(),
                threads: crate::fuse::mount::DEFAULT_THREADS,
                passthrough: Passthrough::On,
                acl: true,
                uring: true,
                uring_yield: true,
            },
            image: None,
            hold: None,
        };
        super::mount::mount_spec(&mut spec, false, None)?;
        Ok(Box::new(Mounted(spec.opts.mountpoint)))
    }

    fn unmount(&self, mnt: &Path) -> Result<()> {
        super::umount::umount(mnt, false).or_else(|_| super::umount::umount(mnt, true))
    }
}

/// The kernel's overlayfs over the same layers (`--overlay kernel`; `auto` tries it first).
struct KernelMounter {
    /// Asked for by name: errors suggest `--overlay fuse`.
    explicit: bool,
}

impl Mounter for KernelMounter {
    fn mount(
        &self,
        lowers: Vec<PathBuf>,
        rw: Option<(&Path, &Path)>,
        mnt: &Path,
    ) -> Result<Box<dyn std::any::Any>> {
        let ls: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
        // Below a single read-only layer (overlayfs wants two lowers without an upper).
        let empty = mnt.with_file_name("empty-lower");
        std::fs::create_dir_all(&empty).with_context(|| format!("creating {}", empty.display()))?;
        // volatile: the mount's own sync at unmount is redundant; the step's blob is fsynced and
        // the upper is synced when it is adopted as the unpacked layer (docs/design.md).
        crate::sys::overlayfs::mount(&ls, rw, mnt, true, &empty).map_err(|e| {
            anyhow::anyhow!(
                "mounting the kernel's overlayfs of {} layers on '{}': {e}{}",
                ls.len(),
                mnt.display(),
                match (e, self.explicit) {
                    (rustix::io::Errno::TOOBIG, true) =>
                        " (too many layers for one mount's options on this kernel; use --overlay fuse)",
                    (rustix::io::Errno::INVAL, true) => " (a path with a backslash, or a file system overlayfs cannot use; use --overlay fuse)",
                    (rustix::io::Errno::TOOBIG, false) => " (too many layers for one mount's options on this kernel)",
                    (rustix::io::Errno::INVAL, false) => " (a path with a backslash, or a file system overlayfs cannot use)",
                    _ => "",
                }
            )
        })?;
        // Unmounted as a FUSE mount is: `strata umount` takes any mount point.
        Ok(Box::new(Mounted(mnt.to_path_buf())))
    }

    fn unmount(&self, mnt: &Path) -> Result<()> {
        FuseMounter.unmount(mnt)
    }
}

/// The default (`--overlay auto`): the kernel's overlayfs where strata may mount it (root in
/// the initial user namespace, overlayfs in the kernel), strata's FUSE overlay otherwise and
/// for the rest of a build once the kernel refuses a mount (say, a store on a file system
/// overlayfs cannot use as its upper).
struct AutoMounter {
    kernel: std::sync::atomic::AtomicBool,
}

impl AutoMounter {
    fn new() -> Self {
        let kernel = crate::sys::host_root() && crate::sys::overlayfs::available();
        AutoMounter {
            kernel: kernel.into(),
        }
    }
}

impl Mounter for AutoMounter {
    fn mount(
        &self,
        lowers: Vec<PathBuf>,
        rw: Option<(&Path, &Path)>,
        mnt: &Path,
    ) -> Result<Box<dyn std::any::Any>> {
        use std::sync::atomic::Ordering;
        if self.kernel.load(Ordering::Relaxed) {
            match (KernelMounter { explicit: false }).mount(lowers.clone(), rw, mnt) {
                Ok(m) => return Ok(m),
                Err(e) => {
                    self.kernel.store(false, Ordering::Relaxed);
                    eprintln!("strata: warning: {e:#}; this build goes on with strata's FUSE overlay");
                    // overlayfs may have set up its work dir (and the volatile marker, which
                    // the FUSE overlay refuses) before it failed: nothing else is in there yet.
                    if let Some((_, w)) = rw {
                        let _ = std::fs::remove_dir_all(w.join("work"));
                    }
                }
            }
        }
        FuseMounter.mount(lowers, rw, mnt)
    }

    fn unmount(&self, mnt: &Path) -> Result<()> {
        FuseMounter.unmount(mnt)
    }
}

fn kv(s: &str, what: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => bail!("{what} '{s}': want KEY=VALUE"),
    }
}

/// `strata build CONTEXT`: exit code 0, or 128 + N when signal N stopped it.
pub fn run(a: BuildArgs, root: &Path) -> Result<i32> {
    match build(a, root) {
        Err(e) => match build::BuildError::cause_of(&e) {
            Some(build::BuildError::Interrupted(sig)) => {
                super::print_error(&e);
                Ok(128 + sig)
            }
            _ => Err(e),
        },
        Ok(()) => Ok(0),
    }
}

fn build(a: BuildArgs, root: &Path) -> Result<()> {
    if a.overlay == BuildOverlay::Kernel {
        if !crate::sys::host_root() {
            bail!("--overlay kernel needs root in the initial user namespace; use --overlay fuse");
        }
        if !crate::sys::overlayfs::available() {
            bail!("--overlay kernel: this kernel has no overlayfs; use --overlay fuse");
        }
    }
    crate::sys::catch_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    if let Some(p) = &a.platform {
        let want = crate::registry::Platform::parse(p)?;
        let host = crate::registry::Platform::host();
        if want.os != host.os || want.arch != host.arch {
            bail!("--platform {p}: strata builds for this machine only ({host})");
        }
    }
    let stdin_context = a.context.as_os_str() == "-";
    let context = if stdin_context {
        None
    } else {
        let c = std::fs::canonicalize(&a.context)
            .with_context(|| format!("build context '{}'", a.context.display()))?;
        if !c.is_dir() {
            bail!("build context '{}' is not a directory", a.context.display());
        }
        Some(c)
    };
    let (text, name) = match (&a.file, &context) {
        (Some(f), _) if f.as_os_str() == "-" => {
            if stdin_context {
                bail!("-f - and a context of - both want standard input");
            }
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the Dockerfile from standard input")?;
            (s, "<stdin>".to_string())
        }
        (Some(f), _) => (
            std::fs::read_to_string(f).with_context(|| format!("Dockerfile '{}'", f.display()))?,
            f.display().to_string(),
        ),
        (None, Some(c)) => {
            let f = c.join("Dockerfile");
            (
                std::fs::read_to_string(&f).with_context(|| format!("Dockerfile '{}'", f.display()))?,
                "Dockerfile".to_string(),
            )
        }
        (None, None) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the Dockerfile from standard input")?;
            (s, "<stdin>".to_string())
        }
    };
    let mut build_args = BTreeMap::new();
    for b in &a.build_args {
        match b.split_once('=') {
            Some((k, v)) => build_args.insert(k.to_string(), Some(v.to_string())),
            None => build_args.insert(b.clone(), None),
        };
    }
    let tags = a
        .tags
        .iter()
        .map(|t| Reference::parse(t).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let labels = a
        .labels
        .iter()
        .map(|l| kv(l, "--label"))
        .collect::<Result<Vec<_>>>()?;
    let o = build::Options {
        context,
        dockerfile: text,
        dockerfile_name: name,
        tags,
        build_args,
        target: a.target.clone(),
        no_cache: a.no_cache,
        pull: a.pull,
        network_host: a.network == "host",
        labels,
        quiet: a.quiet,
        squash: a.squash,
        compress: match a.compress {
            crate::cli::Compress::None => crate::image::layer::Compression::None,
            crate::cli::Compress::Gzip => crate::image::layer::Compression::Gzip,
            crate::cli::Compress::Zstd => crate::image::layer::Compression::Zstd,
        },
        registry: super::push::options(&a.registry, a.quiet),
    };
    let id = match a.overlay {
        BuildOverlay::Fuse => build::build(root, &o, &FuseMounter)?,
        BuildOverlay::Kernel => build::build(root, &o, &KernelMounter { explicit: true })?,
        BuildOverlay::Auto => build::build(root, &o, &AutoMounter::new())?,
    };
    if let Some(f) = &a.iidfile {
        std::fs::write(f, &id).with_context(|| format!("--iidfile '{}'", f.display()))?;
    }
    if !a.quiet {
        for t in &o.tags {
            super::say!("Successfully tagged {t}");
        }
    }
    super::say!("{id}");
    Ok(())
}
