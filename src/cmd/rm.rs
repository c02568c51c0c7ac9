//! `strata rm`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::cli::RmArgs;
use crate::container::Container;

/// Stop a container's process, unmount it and delete its directory.
pub fn remove(c: &Container, force: bool) -> Result<()> {
    let name = &c.state.name;
    let mounted = c.mounted();
    let running = c.running();
    if !force {
        if running {
            bail!("container '{name}' is running; stop it or use -f");
        }
        match &mounted {
            Ok(true) => bail!("container '{name}' is mounted; run 'strata umount {name}' first or use -f"),
            Err(m) => bail!("{m}; run 'strata umount {name}' first or use -f"),
            Ok(false) => {}
        }
    }
    if running {
        if let Some(pid) = c.state.pid {
            // The run forwards this to the command and cleans up after it.
            let _ = crate::sys::kill(pid, libc::SIGTERM);
            let start = Instant::now();
            while c.running() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if c.running() {
                let _ = crate::sys::kill(pid, libc::SIGKILL);
            }
        }
    }
    if let Some(mp) = super::umount::container_mountpoint(c) {
        if crate::mounts::is_mountpoint(&mp) {
            super::umount::umount(&mp, false).or_else(|_| super::umount::umount(&mp, true))?;
        }
    }
    crate::image::store::make_writable_and_remove(&c.dir)?;
    Ok(())
}

/// `strata rm [-f] NAME...`.
pub fn run(a: RmArgs, root: &Path) -> Result<()> {
    for n in &a.containers {
        let c = Container::open(root, n)?;
        remove(&c, a.force)?;
        super::say!("{n}");
    }
    Ok(())
}
