//! The registry of live strata mounts: one pid file per mountpoint in the runtime
//! directory, saying which daemon serves it, its upper directory and image.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// One live mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRecord {
    /// Daemon pid.
    pub pid: i32,
    /// Canonical mountpoint.
    pub mountpoint: PathBuf,
    /// Canonical upper directory, if writable.
    pub upper: Option<PathBuf>,
    /// Image id the lowers come from, if any.
    pub image: Option<String>,
    /// The lower layer directories (top first), so `gc` keeps what a live mount reads.
    pub lowers: Vec<PathBuf>,
}

/// Directory holding the daemons' pid files.
pub fn runtime_dir() -> PathBuf {
    if crate::sys::host_root() {
        PathBuf::from("/run/strata")
    } else if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(x).join("strata")
    } else {
        PathBuf::from(format!("/tmp/strata-{}", crate::sys::euid()))
    }
}

/// The pid file of the daemon serving `mountpoint`.
pub fn pid_file(mountpoint: &Path) -> PathBuf {
    // FNV-1a: a short stable name for any path.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in mountpoint.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    runtime_dir().join(format!("{h:016x}.pid"))
}

/// Record a live mount.
pub fn write_pid_file(r: &MountRecord) -> anyhow::Result<PathBuf> {
    let f = pid_file(&r.mountpoint);
    std::fs::create_dir_all(runtime_dir())
        .with_context(|| format!("creating {}", runtime_dir().display()))?;
    let body = format!(
        "{}\n{}\n{}\n{}\n",
        r.pid,
        r.mountpoint.display(),
        r.upper
            .as_ref()
            .map(|u| u.display().to_string())
            .unwrap_or_default(),
        r.image.clone().unwrap_or_default()
    ) + &r
        .lowers
        .iter()
        .map(|l| format!("{}\n", l.display()))
        .collect::<String>();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut fh = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&f)
        .with_context(|| format!("writing {}", f.display()))?;
    fh.write_all(body.as_bytes())
        .with_context(|| format!("writing {}", f.display()))?;
    Ok(f)
}

/// Is the process running? A zombie (exited, not yet reaped) counts as gone.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// Every live strata mount (pid files of dead daemons are ignored).
pub fn active() -> Vec<MountRecord> {
    let Ok(rd) = std::fs::read_dir(runtime_dir()) else {
        return vec![];
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let mut l = s.lines();
        let Some(pid) = l.next().and_then(|p| p.trim().parse().ok()) else {
            continue;
        };
        let mountpoint = PathBuf::from(l.next().unwrap_or(""));
        let upper = l.next().filter(|x| !x.is_empty()).map(PathBuf::from);
        let image = l.next().filter(|x| !x.is_empty()).map(String::from);
        let lowers = l.filter(|x| !x.is_empty()).map(PathBuf::from).collect();
        if pid_alive(pid) {
            out.push(MountRecord {
                pid,
                mountpoint,
                upper,
                image,
                lowers,
            });
        }
    }
    out
}

/// Unescape the octal escapes of /proc/self/mountinfo.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Is `p` (absolute, canonical) a mount point?
pub fn is_mountpoint(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&unescape_mountinfo(m)) == p)
}

/// Where `upper` is in use as the upper directory of a live mount (strata's or the
/// kernel's), if anywhere.
pub fn upper_in_use(upper: &Path) -> Option<PathBuf> {
    let canon = std::fs::canonicalize(upper).ok()?;
    if let Some(r) = active().into_iter().find(|r| r.upper.as_deref() == Some(&canon)) {
        return Some(r.mountpoint);
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = format!("upperdir={}", canon.display());
    info.lines()
        .find(|l| {
            l.split(' ')
                .next_back()
                .is_some_and(|o| o.split(',').any(|x| unescape_mountinfo(x) == want))
        })
        .and_then(|l| l.split(' ').nth(4).map(|m| PathBuf::from(unescape_mountinfo(m))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
