//! Containers: named working copies of an image in the store, each with its own upper and
//! work directories, a rootfs mountpoint and a small JSON state file.
//!
//! ```text
//! ROOT/containers/<name>/state.json   {name, image, image_id, created, last_command}
//! ROOT/containers/<name>/upper/       the container's changes (overlay upper)
//! ROOT/containers/<name>/work/        overlay work directory
//! ROOT/containers/<name>/rootfs/      where its merged tree is mounted
//! ROOT/containers/<name>/run/         injected files (hosts, hostname, resolv.conf), pid
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::image::store::write_atomic;

/// What state.json holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Container name.
    pub name: String,
    /// Image reference as given.
    pub image: String,
    /// Image id (config digest).
    pub image_id: String,
    /// Creation time (RFC 3339).
    pub created: String,
    /// The last command run in it (for the commit's created_by).
    #[serde(default)]
    pub last_command: Option<Vec<String>>,
    /// Pid of the running `strata run`/`shell`, if any.
    #[serde(default)]
    pub pid: Option<i32>,
}

/// A container directory.
#[derive(Debug, Clone)]
pub struct Container {
    /// Its directory.
    pub dir: PathBuf,
    /// Its state.
    pub state: State,
}

fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn random_name() -> String {
    let mut b = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("c-{}", crate::image::digest::hex(&b))
}

impl Container {
    /// Where containers live.
    pub fn base(root: &Path) -> PathBuf {
        root.join("containers")
    }

    /// Make a new container of an image.
    pub fn create(root: &Path, name: Option<&str>, image: &str, image_id: &str) -> Result<Container> {
        let name = match name {
            Some(n) if !valid_name(n) => bail!("invalid container name '{n}' (letters, digits, _ . - only)"),
            Some(n) => n.to_string(),
            None => random_name(),
        };
        let dir = Self::base(root).join(&name);
        std::fs::create_dir_all(Self::base(root))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container name '{name}' is already in use")
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
        for d in ["upper", "work", "rootfs", "run"] {
            std::fs::create_dir(dir.join(d))?;
        }
        let state = State {
            name,
            image: image.to_string(),
            image_id: image_id.to_string(),
            created: crate::image::config::rfc3339(crate::image::config::now_or_epoch()?),
            last_command: None,
            pid: None,
        };
        let c = Container { dir, state };
        c.save()?;
        Ok(c)
    }

    /// Open an existing container.
    pub fn open(root: &Path, name: &str) -> Result<Container> {
        if !valid_name(name) {
            bail!("no such container '{name}'");
        }
        let dir = Self::base(root).join(name);
        let s = std::fs::read(dir.join("state.json"))
            .map_err(|_| anyhow::anyhow!("no such container '{name}'"))?;
        let state = serde_json::from_slice(&s).with_context(|| format!("container '{name}': state.json"))?;
        Ok(Container { dir, state })
    }

    /// Does a container of this name exist?
    pub fn exists(root: &Path, name: &str) -> bool {
        valid_name(name) && Self::base(root).join(name).join("state.json").is_file()
    }

    /// Every container, by name.
    pub fn list(root: &Path) -> Vec<Container> {
        let Ok(rd) = std::fs::read_dir(Self::base(root)) else {
            return vec![];
        };
        let mut v: Vec<Container> = rd
            .flatten()
            .filter_map(|e| Self::open(root, &e.file_name().to_string_lossy()).ok())
            .collect();
        v.sort_by(|a, b| a.state.name.cmp(&b.state.name));
        v
    }

    /// Write state.json.
    pub fn save(&self) -> Result<()> {
        write_atomic(
            &self.dir.join("state.json"),
            &serde_json::to_vec_pretty(&self.state)?,
        )
    }

    /// The upper directory.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    /// The work directory.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// The rootfs mountpoint.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    /// Host directory of injected files.
    pub fn rundir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Mount state: Ok(true) mounted, Ok(false) not, Err when the filesystem daemon died
    /// ("transport endpoint is not connected").
    pub fn mounted(&self) -> std::result::Result<bool, String> {
        let r = self.rootfs();
        // statfs always reaches the daemon; stat may be answered from the kernel's cache.
        match rustix::fs::statfs(&r).map_err(std::io::Error::from) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(format!(
                "the filesystem daemon of container '{}' died (transport endpoint is not connected)",
                self.state.name
            )),
            _ => Ok(crate::mounts::is_mountpoint(&r)),
        }
    }

    /// Record upper directories about to be created by copy-up only because a mount target
    /// (a stub) goes inside them: `paths` are container paths; those not yet in the upper
    /// are remembered in run/fresh-dirs.
    pub fn note_fresh_dirs(&self, paths: &[PathBuf]) {
        let mut known: Vec<String> = std::fs::read_to_string(self.rundir().join("fresh-dirs"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        for p in paths {
            let rel = p.strip_prefix("/").unwrap_or(p);
            if rel.as_os_str().is_empty() || self.upper().join(rel).exists() {
                continue;
            }
            let s = rel.to_string_lossy().into_owned();
            if !known.contains(&s) {
                known.push(s);
            }
        }
        let _ = std::fs::write(self.rundir().join("fresh-dirs"), known.join("\n"));
    }

    /// After unmounting: drop from the upper the directories listed by `note_fresh_dirs`
    /// that are still empty and not opaque, so a mount point stub leaves no trace in diff
    /// or commit. (Offline edits of the upper are allowed; an empty non-opaque copied-up
    /// directory carries no change.)
    pub fn drop_fresh_dirs(&self) {
        let f = self.rundir().join("fresh-dirs");
        let list = std::fs::read_to_string(&f).unwrap_or_default();
        let mut dirs: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
        if let Ok(upper) = std::fs::File::open(self.upper()) {
            use std::os::fd::AsFd;
            for d in dirs {
                // Only directories that are not opaque: an opaque one records a change.
                let opaque = crate::sys::open_dir_beneath(upper.as_fd(), d).map_or(true, |fd| {
                    let t = crate::sys::XTarget::Fd(fd.as_fd());
                    ["trusted.overlay.opaque", "user.overlay.opaque"]
                        .iter()
                        .any(|n| crate::sys::getxattr(t, std::ffi::OsStr::new(n)).is_ok())
                });
                if !opaque {
                    crate::runtime::rootfs::remove_empty_beneath(upper.as_fd(), std::path::Path::new(d));
                }
            }
        }
        let _ = std::fs::remove_file(f);
    }

    /// Is a process of it running?
    pub fn running(&self) -> bool {
        self.state.pid.is_some_and(crate::mounts::pid_alive)
    }

    /// Size of the upper directory in bytes (what the container changed).
    pub fn upper_size(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else { return 0 };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.upper())
    }
}

/// Names of containers whose image is `image_id`.
pub fn using_image(root: &Path, image_id: &str) -> Vec<String> {
    Container::list(root)
        .into_iter()
        .filter(|c| c.state.image_id == image_id)
        .map(|c| c.state.name)
        .collect()
}
