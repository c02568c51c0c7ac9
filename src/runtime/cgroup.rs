//! Resource limits (`--memory`, `--pids-limit`, `--cpus`) through cgroups: the unified
//! hierarchy (v2) when `/sys/fs/cgroup` is one, else the v1 controllers mounted under
//! `/sys/fs/cgroup/{memory,pids,cpu}`. A group `strata-<pid>-<n>` is made per run, the
//! container's PID 1 is put in it before it starts anything (its setup process joins, forks
//! PID 1, and leaves again), and the group is removed after the run.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What to limit (None: no limit).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Bytes of memory.
    pub memory: Option<u64>,
    /// Number of processes and threads.
    pub pids: Option<u64>,
    /// CPUs (fractional).
    pub cpus: Option<f64>,
}

impl Limits {
    /// Anything to limit?
    pub fn any(&self) -> bool {
        self.memory.is_some() || self.pids.is_some() || self.cpus.is_some()
    }
}

/// docker's memory sizes: `512m`, `1g`, `100000` (bytes), `64k`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .with_context(|| format!("--memory '{s}': want a size such as 512m or 1g"))?;
    if n.is_nan() || n <= 0.0 {
        return Err(super::RuntimeError::BadOption {
            option: "--memory".into(),
            value: s.into(),
            reason: "must be more than 0".into(),
        }
        .into());
    }
    Ok((n * mult as f64) as u64)
}

/// The groups of one run; removed on drop.
#[derive(Debug)]
pub struct Group {
    /// Directories to join (one per v1 controller, or the v2 group).
    dirs: Vec<PathBuf>,
}

fn write(p: &Path, v: &str) -> Result<()> {
    std::fs::write(p, v).with_context(|| format!("writing '{v}' to {}", p.display()))
}

impl Group {
    /// Make the group(s) for `l` and set the limits.
    pub fn create(l: &Limits) -> Result<Group> {
        if !crate::sys::host_root() {
            return Err(super::RuntimeError::Cgroup(
                "--memory, --pids-limit and --cpus need root (rootless cgroup delegation is not supported)"
                    .into(),
            )
            .into());
        }
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "strata-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let root = Path::new("/sys/fs/cgroup");
        let mut g = Group { dirs: Vec::new() };
        if root.join("cgroup.controllers").exists() {
            // v2: the controllers must be enabled for the root's children.
            let wanted: Vec<&str> = [
                ("memory", l.memory.is_some()),
                ("pids", l.pids.is_some()),
                ("cpu", l.cpus.is_some()),
            ]
            .iter()
            .filter(|(_, w)| *w)
            .map(|(c, _)| *c)
            .collect();
            let avail = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            for c in &wanted {
                if !avail.split_whitespace().any(|a| a == *c) {
                    return Err(super::RuntimeError::Cgroup(format!(
                        "cgroup v2: the {c} controller is not available"
                    ))
                    .into());
                }
                let _ = write(&root.join("cgroup.subtree_control"), &format!("+{c}"));
            }
            let d = root.join(&name);
            std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
            g.dirs.push(d.clone());
            if let Some(m) = l.memory {
                write(&d.join("memory.max"), &m.to_string())?;
                // No swap beyond the limit, as docker's --memory with --memory-swap unset.
                let _ = write(&d.join("memory.swap.max"), "0");
            }
            if let Some(p) = l.pids {
                write(&d.join("pids.max"), &p.to_string())?;
            }
            if let Some(c) = l.cpus {
                write(&d.join("cpu.max"), &format!("{} 100000", (c * 100000.0) as u64))?;
            }
        } else {
            let mut v1 = |ctrl: &str, files: &[(&str, String)]| -> Result<()> {
                let base = root.join(ctrl);
                if !base.join("cgroup.procs").exists() {
                    return Err(super::RuntimeError::Cgroup(format!(
                        "cgroup v1: the {ctrl} controller is not mounted at {}",
                        base.display()
                    ))
                    .into());
                }
                let d = base.join(&name);
                std::fs::create_dir(&d).with_context(|| format!("creating {}", d.display()))?;
                g.dirs.push(d.clone());
                for (f, v) in files {
                    write(&d.join(f), v)?;
                }
                Ok(())
            };
            if let Some(m) = l.memory {
                v1("memory", &[("memory.limit_in_bytes", m.to_string())])?;
            }
            if let Some(p) = l.pids {
                v1("pids", &[("pids.max", p.to_string())])?;
            }
            if let Some(c) = l.cpus {
                v1(
                    "cpu",
                    &[
                        ("cpu.cfs_period_us", "100000".into()),
                        ("cpu.cfs_quota_us", ((c * 100000.0) as u64).to_string()),
                    ],
                )?;
            }
        }
        Ok(g)
    }

    /// Put the calling process in the group (before it forks PID 1).
    pub fn join(&self) -> Result<()> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), "0")?;
        }
        Ok(())
    }

    /// Take the calling process back out (to its parent group), leaving its children in.
    pub fn leave(&self) -> Result<()> {
        for d in &self.dirs {
            if let Some(parent) = d.parent() {
                write(&parent.join("cgroup.procs"), "0")?;
            }
        }
        Ok(())
    }

    /// Which hierarchy, for messages and docs.
    pub fn version() -> &'static str {
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            "v2"
        } else {
            "v1"
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for d in &self.dirs {
            // The group empties when the container ends; a straggler being reaped may keep it
            // busy for a moment.
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1g").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("64K").unwrap(), 64 << 10);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert_eq!(parse_bytes("1.5g").unwrap(), 3 << 29);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("0").is_err());
    }

    #[test]
    fn typed_errors() {
        use super::super::RuntimeError;
        let e = parse_bytes("0").unwrap_err();
        assert!(
            matches!(e.downcast_ref::<RuntimeError>(), Some(RuntimeError::BadOption { option, .. }) if option == "--memory"),
            "{e:#}"
        );
        assert_eq!(e.to_string(), "--memory '0': must be more than 0");
        let e = super::super::capabilities(&["NOT_A_CAP".into()], &[]).unwrap_err();
        assert!(
            matches!(e.downcast_ref::<RuntimeError>(), Some(RuntimeError::UnknownCapability(c)) if c == "NOT_A_CAP"),
            "{e:#}"
        );
        let e = super::super::seccomp::profile_filters(
            br#"{"defaultAction": "SCMP_ACT_NOPE", "syscalls": []}"#,
            &[],
        )
        .unwrap_err();
        assert!(
            e.chain()
                .any(|c| matches!(c.downcast_ref::<RuntimeError>(), Some(RuntimeError::Seccomp(_)))),
            "{e:#}"
        );
    }
}
