//! Shared harness for strata integration tests: layer builders, mount guards
//! (strata FUSE and kernel overlayfs), an op recorder and tree snapshots.
// Each test crate uses a different subset of the helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Small libc wrappers (std lacks xattrs, mknod, renameat2).

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path with NUL")
}

fn cname(n: &str) -> CString {
    CString::new(n).expect("name with NUL")
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(last_err())
    } else {
        Ok(())
    }
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8], follow: bool) -> io::Result<()> {
    let (p, n) = (cpath(p), cname(name));
    let ptr = value.as_ptr() as *const libc::c_void;
    // SAFETY: valid NUL-terminated strings and a live buffer of value.len() bytes.
    let r = unsafe {
        if follow {
            libc::setxattr(p.as_ptr(), n.as_ptr(), ptr, value.len(), 0)
        } else {
            libc::lsetxattr(p.as_ptr(), n.as_ptr(), ptr, value.len(), 0)
        }
    };
    cvt(r)
}

pub fn get_xattr(p: &Path, name: &str, follow: bool) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), cname(name));
    let mut buf = vec![0u8; 256];
    loop {
        let ptr = buf.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: buffer is valid for buf.len() bytes.
        let r = unsafe {
            if follow {
                libc::getxattr(p.as_ptr(), n.as_ptr(), ptr, buf.len())
            } else {
                libc::lgetxattr(p.as_ptr(), n.as_ptr(), ptr, buf.len())
            }
        };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = last_err();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(e);
    }
}

pub fn list_xattr(p: &Path, follow: bool) -> io::Result<Vec<String>> {
    let p = cpath(p);
    let mut buf = vec![0u8; 1024];
    loop {
        let ptr = buf.as_mut_ptr() as *mut libc::c_char;
        // SAFETY: buffer is valid for buf.len() bytes.
        let r = unsafe {
            if follow {
                libc::listxattr(p.as_ptr(), ptr, buf.len())
            } else {
                libc::llistxattr(p.as_ptr(), ptr, buf.len())
            }
        };
        if r >= 0 {
            buf.truncate(r as usize);
            let mut names: Vec<String> = buf
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            names.sort();
            return Ok(names);
        }
        let e = last_err();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(e);
    }
}

pub fn remove_xattr(p: &Path, name: &str, follow: bool) -> io::Result<()> {
    let (p, n) = (cpath(p), cname(name));
    // SAFETY: valid NUL-terminated strings.
    let r = unsafe {
        if follow {
            libc::removexattr(p.as_ptr(), n.as_ptr())
        } else {
            libc::lremovexattr(p.as_ptr(), n.as_ptr())
        }
    };
    cvt(r)
}

pub fn mknod(p: &Path, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid NUL-terminated path.
    cvt(unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) })
}

pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

pub fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (f, t) = (cpath(from), cpath(to));
    // SAFETY: raw syscall with valid NUL-terminated paths.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(last_err())
    } else {
        Ok(())
    }
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
}

/// utimensat with explicit (sec, nsec) for atime and mtime.
pub fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64), follow: bool) -> io::Result<()> {
    let c = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    // SAFETY: valid path and a 2-element timespec array.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), flags) })
}

/// Raw readdir returning (name, d_type), without "." and "..". std's DirEntry
/// hides DT_UNKNOWN by falling back to lstat; we want the real d_type.
pub fn read_dir_raw(p: &Path) -> io::Result<Vec<(String, u8)>> {
    let c = cpath(p);
    // SAFETY: valid path; the DIR* is closed below on every path.
    let dir = unsafe { libc::opendir(c.as_ptr()) };
    if dir.is_null() {
        return Err(last_err());
    }
    let mut out = Vec::new();
    let res = loop {
        // readdir signals errors only through errno.
        // SAFETY: errno location is thread-local and always valid.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: dir is a valid open DIR*.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let e = last_err();
            break if e.raw_os_error().unwrap_or(0) != 0 {
                Err(e)
            } else {
                Ok(())
            };
        }
        // SAFETY: ent points to a valid dirent64 until the next readdir call.
        let (name, dt) = unsafe {
            let d = &*ent;
            (CStr::from_ptr(d.d_name.as_ptr()).to_bytes().to_vec(), d.d_type)
        };
        if name == b"." || name == b".." {
            continue;
        }
        out.push((String::from_utf8_lossy(&name).into_owned(), dt));
    };
    // SAFETY: dir was returned by opendir and not closed yet.
    unsafe { libc::closedir(dir) };
    res.map(|_| out)
}

// ---------------------------------------------------------------------------
// Seeded randomness for generated tests (the random differential and data tests).

/// splitmix64: tiny, deterministic, good enough for test generation.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Below `n` (0 for an empty range).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }

    pub fn chance(&mut self, pct: usize) -> bool {
        self.below(100) < pct
    }

    /// Up to `max` lowercase letters.
    pub fn data(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| b'a' + self.below(26) as u8).collect()
    }
}

/// A number from the environment (decimal or 0x hex), for seeds and counts; a value that is
/// not one fails the test rather than quietly running the default.
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

// ---------------------------------------------------------------------------
// Temp dirs and layer builders.

/// Owns a temp dir under /tmp; everything for one test lives inside it.
pub struct TestEnv {
    tmp: tempfile::TempDir,
    counter: std::cell::Cell<u32>,
}

impl TestEnv {
    pub fn new(tag: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("strata-{tag}-"))
            .tempdir_in("/tmp")
            .expect("create temp dir in /tmp");
        // Tempdirs are 0700; make them traversable like a normal dir.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        TestEnv {
            tmp,
            counter: std::cell::Cell::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Create (if needed) and return a directory directly inside the env.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// A new, empty, uniquely named directory (fresh workdirs / mountpoints).
    pub fn fresh_dir(&self, prefix: &str) -> PathBuf {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        self.dir(&format!("{prefix}{n}"))
    }

    pub fn layer(&self, name: &str) -> Layer {
        Layer { root: self.dir(name) }
    }
}

/// Builder for a layer's on-disk tree. Panics on error: it is test setup.
/// Missing parent directories are created with mode 0755.
#[derive(Clone, Debug)]
pub struct Layer {
    pub root: PathBuf,
}

impl Layer {
    pub fn path(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn parent(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", parent.display()));
        }
        p
    }

    pub fn file(&self, rel: &str, content: impl AsRef<[u8]>) -> &Self {
        let p = self.parent(rel);
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self
    }

    pub fn file_mode(&self, rel: &str, content: impl AsRef<[u8]>, mode: u32) -> &Self {
        self.file(rel, content).chmod(rel, mode)
    }

    pub fn dir(&self, rel: &str) -> &Self {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", p.display()));
        self
    }

    pub fn dir_mode(&self, rel: &str, mode: u32) -> &Self {
        self.dir(rel).chmod(rel, mode)
    }

    pub fn symlink(&self, rel: &str, target: &str) -> &Self {
        let p = self.parent(rel);
        std::os::unix::fs::symlink(target, &p).unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self
    }

    /// Hard link `rel` to the already existing `existing` (both layer-relative).
    pub fn hardlink(&self, rel: &str, existing: &str) -> &Self {
        let p = self.parent(rel);
        fs::hard_link(self.path(existing), &p).unwrap_or_else(|e| panic!("link {}: {e}", p.display()));
        self
    }

    pub fn fifo(&self, rel: &str) -> &Self {
        let p = self.parent(rel);
        mknod(&p, libc::S_IFIFO | 0o644, 0, 0).unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
        self
    }

    pub fn chmod(&self, rel: &str, mode: u32) -> &Self {
        let p = self.path(rel);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        self
    }

    pub fn chown(&self, rel: &str, uid: u32, gid: u32) -> &Self {
        let p = self.path(rel);
        lchown(&p, uid, gid).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        self
    }

    pub fn xattr(&self, rel: &str, name: &str, value: impl AsRef<[u8]>) -> &Self {
        let p = self.path(rel);
        set_xattr(&p, name, value.as_ref(), false)
            .unwrap_or_else(|e| panic!("setxattr {name} {}: {e}", p.display()));
        self
    }

    /// Native overlayfs whiteout: char device 0/0.
    pub fn whiteout(&self, rel: &str) -> &Self {
        let p = self.parent(rel);
        mknod(&p, libc::S_IFCHR, 0, 0).unwrap_or_else(|e| panic!("whiteout {}: {e}", p.display()));
        self
    }

    /// Native opaque dir: trusted.overlay.opaque=y.
    pub fn opaque(&self, rel: &str) -> &Self {
        self.dir(rel).xattr(rel, "trusted.overlay.opaque", b"y")
    }

    /// AUFS/OCI whiteout: empty regular file `.wh.NAME` next to NAME.
    pub fn aufs_whiteout(&self, rel: &str) -> &Self {
        let p = Path::new(rel);
        let name = p.file_name().expect("whiteout needs a name").to_string_lossy();
        let wh = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => format!("{}/.wh.{name}", d.display()),
            _ => format!(".wh.{name}"),
        };
        self.file(&wh, b"")
    }

    /// AUFS/OCI opaque dir: directory containing `.wh..wh..opq`.
    pub fn aufs_opaque(&self, rel: &str) -> &Self {
        self.dir(rel).file(&format!("{rel}/.wh..wh..opq"), b"")
    }
}

/// One overlay stack's dirs: lowers (index 0 = top), upper, work, mountpoint.
pub struct LayerSet {
    pub env: TestEnv,
    pub lowers: Vec<Layer>,
    pub upper: Layer,
    pub work: PathBuf,
    pub mnt: PathBuf,
}

impl LayerSet {
    pub fn new(tag: &str, nlower: usize) -> Self {
        let env = TestEnv::new(tag);
        let lowers = (0..nlower).map(|i| env.layer(&format!("lower{i}"))).collect();
        let upper = env.layer("upper");
        let work = env.dir("work");
        let mnt = env.dir("mnt");
        LayerSet {
            env,
            lowers,
            upper,
            work,
            mnt,
        }
    }

    /// Lower layer `i`, 0 = top-most.
    pub fn lower(&self, i: usize) -> &Layer {
        &self.lowers[i]
    }

    pub fn lower_paths(&self) -> Vec<PathBuf> {
        self.lowers.iter().map(|l| l.root.clone()).collect()
    }

    pub fn spec(&self) -> MountSpec {
        MountSpec {
            lowers: self.lower_paths(),
            upper: self.upper.root.clone(),
            work: self.work.clone(),
            mnt: self.mnt.clone(),
        }
    }

    /// Same layers, new empty workdir and mountpoint (for remounts).
    pub fn fresh_spec(&self) -> MountSpec {
        MountSpec {
            lowers: self.lower_paths(),
            upper: self.upper.root.clone(),
            work: self.env.fresh_dir("work-"),
            mnt: self.env.fresh_dir("mnt-"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct MountSpec {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub mnt: PathBuf,
}

impl MountSpec {
    pub fn options(&self) -> String {
        let lower: Vec<String> = self.lowers.iter().map(|p| p.display().to_string()).collect();
        format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            self.upper.display(),
            self.work.display()
        )
    }
}

// ---------------------------------------------------------------------------
// Mount guards.

pub fn strata_bin() -> PathBuf {
    // STRATA_BIN lets the harness itself be exercised against another binary.
    match std::env::var_os("STRATA_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_strata")),
    }
}

/// These tests are the point of the suite: a missing /dev/fuse is a failure.
/// Turn on the fuse module's `enable_uring` (Linux 6.14+), so new mounts take requests
/// through io_uring. Idempotent and global: scripts/test puts back the value it found.
pub fn enable_uring() {
    let param = Path::new("/sys/module/fuse/parameters/enable_uring");
    assert!(
        param.exists(),
        "{} missing: this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)",
        param.display()
    );
    if fs::read_to_string(param).unwrap().trim() != "Y" {
        fs::write(param, "Y").unwrap();
    }
}

/// `strata mount` arguments for `spec` with `extra` mount options appended (e.g.
/// "uring=off"); turns `enable_uring` on unless `extra` asks for /dev/fuse.
pub fn mount_args(spec: &MountSpec, extra: &str) -> Vec<String> {
    if !extra.contains("uring=off") {
        enable_uring();
    }
    let mut opts = spec.options();
    if !extra.is_empty() {
        opts.push(',');
        opts.push_str(extra);
    }
    vec![
        "mount".to_string(),
        "-o".to_string(),
        opts,
        spec.mnt.display().to_string(),
    ]
}

pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse does not exist: FUSE tests cannot run on this machine (load the fuse module / run with --device /dev/fuse)"
    );
}

pub struct CmdOutput {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl CmdOutput {
    pub fn ok(&self) -> bool {
        self.status == Some(0) && !self.timed_out
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status={:?} timed_out={} stdout={:?} stderr={:?}",
            self.status,
            self.timed_out,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// Run a command with a timeout. Output goes to temp files, not pipes: a
/// daemon forked by `strata mount` inherits them and would keep a pipe open.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let mut out = tempfile::tempfile().unwrap();
    let mut err = tempfile::tempfile().unwrap();
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return CmdOutput {
                status: None,
                stdout: String::new(),
                stderr: format!("spawn {cmd:?}: {e}"),
                timed_out: false,
            }
        }
    };
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.code(),
            Ok(None) if start.elapsed() > timeout => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok().and_then(|s| s.code());
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    let read = |f: &mut File| {
        let mut s = String::new();
        let _ = f.rewind();
        let _ = f.read_to_string(&mut s);
        s
    };
    CmdOutput {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
        timed_out,
    }
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
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

/// Filesystem type of the mount whose mountpoint is exactly `p`, if any.
pub fn mount_fstype(p: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = p.display().to_string();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 || unescape_mountinfo(fields[4]) != want {
            continue;
        }
        if let Some(sep) = fields.iter().position(|f| *f == "-") {
            // The last matching line is the top of the mount stack.
            found = fields.get(sep + 1).map(|s| s.to_string());
        }
    }
    found
}

/// PIDs of strata processes whose command line names this mountpoint.
pub fn strata_daemon_pids(mnt: &Path) -> Vec<i32> {
    let want = mnt.as_os_str().as_bytes();
    let bin = strata_bin();
    let bin_name = bin.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_strata = args
            .first()
            .map(|a| a.ends_with(&bin_name) && !bin_name.is_empty())
            .unwrap_or(false);
        if is_strata && args.contains(&want) {
            pids.push(pid);
        }
    }
    pids
}

fn test_timeout() -> Duration {
    let secs = std::env::var("STRATA_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Kill a hung FUSE mount so the test fails instead of blocking forever:
/// abort the connection through fusectl when mounted, else kill the daemon.
fn abort_fuse(mnt: &Path, conn: Option<u64>) {
    if let Some(c) = conn {
        let abort = PathBuf::from(format!("/sys/fs/fuse/connections/{c}/abort"));
        if abort.exists() {
            let _ = fs::write(abort, b"1");
        }
    }
    for pid in strata_daemon_pids(mnt) {
        // SAFETY: plain kill(2) of a daemon this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// A live strata mount; unmounted on drop (with lazy fallbacks) so a failing
/// test never leaves a stale mount behind.
pub struct StrataMount {
    pub spec: MountSpec,
    done: bool,
    watchdog: Option<mpsc::Sender<()>>,
}

impl StrataMount {
    pub fn new(spec: &MountSpec) -> Self {
        Self::try_new(spec).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_new(spec: &MountSpec) -> Result<Self, String> {
        let args = vec![
            "mount".to_string(),
            "-o".to_string(),
            spec.options(),
            spec.mnt.display().to_string(),
        ];
        Self::with_args(spec, &args)
    }

    /// Mount with arbitrary CLI arguments (e.g. the --lower/--upper form).
    pub fn with_args(spec: &MountSpec, args: &[String]) -> Result<Self, String> {
        let mut cmd = Command::new(strata_bin());
        cmd.args(args);
        Self::with_command(spec, cmd, args)
    }

    /// Mount with a prepared `strata` command (`args` name it in messages).
    pub fn with_command(spec: &MountSpec, mut cmd: Command, args: &[String]) -> Result<Self, String> {
        require_fuse();
        let out = run_cmd(&mut cmd, Duration::from_secs(60));
        let fstype = mount_fstype(&spec.mnt);
        let mut guard = StrataMount {
            spec: spec.clone(),
            done: false,
            watchdog: None,
        };
        if !out.ok() {
            return Err(format!(
                "`strata {}` failed: {out} (mounted now: {fstype:?})",
                args.join(" ")
            ));
        }
        match fstype {
            Some(t) if t.starts_with("fuse") => {}
            // Harness self-test: STRATA_BIN may be a script mounting the
            // kernel overlay, to check the harness with kernel vs kernel.
            Some(_) if std::env::var_os("STRATA_HARNESS_SELFTEST").is_some() => {}
            other => {
                return Err(format!(
                    "`strata {}` exited 0 but {} is not a fuse mount (found {other:?}); output: {out}",
                    args.join(" "),
                    spec.mnt.display()
                ))
            }
        }
        let conn = fs::metadata(&spec.mnt).ok().map(|m| libc::minor(m.dev()) as u64);
        let (tx, rx) = mpsc::channel::<()>();
        let mnt = spec.mnt.clone();
        let limit = test_timeout();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "watchdog: strata mount {} alive for more than {limit:?}; aborting the FUSE connection",
                    mnt.display()
                );
                abort_fuse(&mnt, conn);
            }
        });
        guard.watchdog = Some(tx);
        Ok(guard)
    }

    /// Guard for a strata mount made elsewhere (e.g. a `-f` child), so it is
    /// unmounted on drop.
    pub fn adopt(spec: &MountSpec) -> Self {
        StrataMount {
            spec: spec.clone(),
            done: false,
            watchdog: None,
        }
    }

    pub fn root(&self) -> &Path {
        &self.spec.mnt
    }

    /// `strata umount`, and check the mount and daemon are gone. On failure
    /// the guard still cleans up (lazy unmount) and the error is returned.
    pub fn umount(mut self) -> Result<(), String> {
        self.do_umount()
    }

    fn do_umount(&mut self) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mnt = self.spec.mnt.clone();
        let out = run_cmd(
            Command::new(strata_bin()).arg("umount").arg(&mnt),
            Duration::from_secs(30),
        );
        let mut err = None;
        if !out.ok() {
            err = Some(format!("`strata umount {}` failed: {out}", mnt.display()));
        } else if let Some(t) = mount_fstype(&mnt) {
            err = Some(format!(
                "`strata umount` exited 0 but {} is still mounted ({t})",
                mnt.display()
            ));
        } else {
            // The contract says umount waits for the daemon; give it a moment
            // for the process table to settle before calling it a bug.
            let start = Instant::now();
            while !strata_daemon_pids(&mnt).is_empty() && start.elapsed() < Duration::from_millis(500) {
                thread::sleep(Duration::from_millis(20));
            }
            let left = strata_daemon_pids(&mnt);
            if !left.is_empty() {
                err = Some(format!(
                    "daemon(s) {left:?} still running after `strata umount {}`",
                    mnt.display()
                ));
            }
        }
        if let Some(tx) = self.watchdog.take() {
            let _ = tx.send(());
        }
        if err.is_some() {
            force_unmount_fuse(&mnt);
        }
        match err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn force_unmount_fuse(mnt: &Path) {
    if mount_fstype(mnt).is_some() {
        let _ = run_cmd(Command::new("umount").arg("-l").arg(mnt), Duration::from_secs(20));
    }
    if mount_fstype(mnt).is_some() {
        let _ = run_cmd(
            Command::new("fusermount3").arg("-u").arg("-z").arg(mnt),
            Duration::from_secs(20),
        );
    }
    let start = Instant::now();
    while !strata_daemon_pids(mnt).is_empty() && start.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(50));
    }
    for pid in strata_daemon_pids(mnt) {
        // SAFETY: plain kill(2) of a daemon this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Some(t) = mount_fstype(mnt) {
        eprintln!("WARNING: could not unmount {} ({t})", mnt.display());
    }
}

impl Drop for StrataMount {
    fn drop(&mut self) {
        if let Err(e) = self.do_umount() {
            eprintln!("StrataMount drop: {e}");
        }
    }
}

/// Kernel overlayfs mount; unmounted on drop.
pub struct KernelMount {
    pub spec: MountSpec,
    done: bool,
}

impl KernelMount {
    pub fn new(spec: &MountSpec) -> Self {
        Self::try_new(spec).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_new(spec: &MountSpec) -> Result<Self, String> {
        Self::try_new_redirect(spec, false)
    }

    /// With `redirect_dir=on` (directory renames write redirects) or `off`.
    pub fn try_new_redirect(spec: &MountSpec, redirect: bool) -> Result<Self, String> {
        // Pin the features whose defaults are module parameters, so the
        // reference semantics (EXDEV on dir rename or redirects, no index) are stable.
        let rd = if redirect { "on" } else { "off" };
        let opts = format!("{},redirect_dir={rd},index=off,metacopy=off", spec.options());
        let out = run_cmd(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(&opts)
                .arg(&spec.mnt),
            Duration::from_secs(30),
        );
        if !out.ok() {
            return Err(format!(
                "kernel overlay mount of {} ({opts}) failed: {out}",
                spec.mnt.display()
            ));
        }
        Ok(KernelMount {
            spec: spec.clone(),
            done: false,
        })
    }

    pub fn root(&self) -> &Path {
        &self.spec.mnt
    }

    pub fn umount(mut self) -> Result<(), String> {
        self.do_umount()
    }

    fn do_umount(&mut self) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let out = run_cmd(
            Command::new("umount").arg(&self.spec.mnt),
            Duration::from_secs(30),
        );
        if out.ok() {
            return Ok(());
        }
        let _ = run_cmd(
            Command::new("umount").arg("-l").arg(&self.spec.mnt),
            Duration::from_secs(30),
        );
        Err(format!("umount {} failed: {out}", self.spec.mnt.display()))
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        if let Err(e) = self.do_umount() {
            eprintln!("KernelMount drop: {e}");
        }
    }
}

// ---------------------------------------------------------------------------
// Snapshots.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Char,
    Block,
    /// Only in upper snapshots: char device 0/0.
    Whiteout,
    Unknown,
}

impl Kind {
    fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::Char,
            libc::S_IFBLK => Kind::Block,
            _ => Kind::Unknown,
        }
    }

    fn from_dtype(dt: u8) -> Kind {
        match dt {
            libc::DT_REG => Kind::File,
            libc::DT_DIR => Kind::Dir,
            libc::DT_LNK => Kind::Symlink,
            libc::DT_FIFO => Kind::Fifo,
            libc::DT_SOCK => Kind::Socket,
            libc::DT_CHR => Kind::Char,
            libc::DT_BLK => Kind::Block,
            _ => Kind::Unknown,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// d_type the parent's readdir reported (None for the root).
    pub dtype: Option<Kind>,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: Option<u64>,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub target: Option<String>,
    pub rdev: Option<(u32, u32)>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Upper snapshots only: value of trusted.overlay.opaque on dirs.
    pub opaque: Option<Vec<u8>>,
    /// Upper snapshots only: value of trusted.overlay.redirect on dirs.
    pub redirect: Option<Vec<u8>>,
    /// errno of a failed lstat/readdir/read/xattr call while snapshotting.
    pub error: Option<String>,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {:04o} {}:{}", self.kind, self.mode, self.uid, self.gid)?;
        if let Some(n) = self.nlink {
            write!(f, " nlink={n}")?;
        }
        if let Some(s) = self.size {
            write!(f, " size={s}")?;
        }
        if let Some(h) = &self.sha256 {
            write!(f, " sha={}", &h[..12.min(h.len())])?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {t:?}")?;
        }
        if let Some((a, b)) = self.rdev {
            write!(f, " rdev={a}:{b}")?;
        }
        if let Some(d) = self.dtype {
            if d != self.kind {
                write!(f, " d_type={d:?}")?;
            }
        }
        if !self.xattrs.is_empty() {
            let xs: Vec<String> = self
                .xattrs
                .iter()
                .map(|(n, v)| format!("{n}={}", show_bytes(v)))
                .collect();
            write!(f, " xattrs[{}]", xs.join(","))?;
        }
        if let Some(r) = &self.redirect {
            write!(f, " redirect={}", show_bytes(r))?;
        }
        if let Some(o) = &self.opaque {
            write!(f, " opaque={}", show_bytes(o))?;
        }
        if let Some(e) = &self.error {
            write!(f, " ERROR({e})")?;
        }
        Ok(())
    }
}

pub fn show_bytes(v: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(v))
}

pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Private overlay xattrs are implementation state, not user data.
fn xattr_hidden(name: &str) -> bool {
    name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.")
}

pub fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EMLINK => "EMLINK",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ESTALE => "ESTALE",
        libc::ETXTBSY => "ETXTBSY",
        libc::EFBIG => "EFBIG",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

/// Type, mode, owner, link count and (but for a directory) size, as the op logs show them.
fn show_meta(m: &fs::Metadata) -> String {
    show_attrs(m.mode(), m.uid(), m.gid(), m.nlink(), m.len())
}

fn show_attrs(mode: u32, uid: u32, gid: u32, nlink: u64, size: u64) -> String {
    let k = Kind::from_mode(mode);
    let size = if k == Kind::Dir {
        String::new()
    } else {
        format!(" size={size}")
    };
    format!("{k:?} {:04o} {uid}:{gid} nlink={nlink}{size}", mode & 0o7777)
}

/// A directory listing as the op logs show it: sorted `name:Kind` pairs.
fn show_listing(r: io::Result<Vec<(String, u8)>>) -> OpResult {
    r.map(|mut v| {
        v.sort();
        v.iter()
            .map(|(n, t)| format!("{n}:{:?}", Kind::from_dtype(*t)))
            .collect::<Vec<_>>()
            .join(",")
    })
    .map_err(|e| io_err(&e))
}

fn io_err(e: &io::Error) -> String {
    errno_name(e.raw_os_error().unwrap_or(-1))
}

#[derive(Clone, Copy, Debug)]
struct SnapOpts {
    upper: bool,
}

/// Merged-view snapshot of `root` (lstat walk, never following symlinks).
pub fn snapshot(root: &Path) -> Snapshot {
    let mut map = BTreeMap::new();
    walk(root, Path::new(""), None, &mut map, SnapOpts { upper: false });
    map
}

/// Structural snapshot of an upper (or lower) layer dir: whiteouts (char
/// 0/0) become Kind::Whiteout and trusted.overlay.opaque is reported.
pub fn upper_snapshot(root: &Path) -> Snapshot {
    let mut map = BTreeMap::new();
    walk(root, Path::new(""), None, &mut map, SnapOpts { upper: true });
    map
}

fn walk(root: &Path, rel: &Path, dtype: Option<Kind>, map: &mut Snapshot, opts: SnapOpts) {
    let full = if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let mut entry = Entry {
        kind: Kind::Unknown,
        dtype,
        mode: 0,
        uid: 0,
        gid: 0,
        nlink: None,
        size: None,
        sha256: None,
        target: None,
        rdev: None,
        xattrs: Vec::new(),
        opaque: None,
        redirect: None,
        error: None,
    };
    let md = match fs::symlink_metadata(&full) {
        Ok(m) => m,
        Err(e) => {
            entry.error = Some(format!("lstat: {}", io_err(&e)));
            map.insert(rel.to_path_buf(), entry);
            return;
        }
    };
    let mut errors = Vec::new();
    entry.kind = Kind::from_mode(md.mode());
    entry.mode = md.mode() & 0o7777;
    entry.uid = md.uid();
    entry.gid = md.gid();
    entry.nlink = Some(md.nlink());
    let (maj, min) = (libc::major(md.rdev()), libc::minor(md.rdev()));
    let whiteout = opts.upper && entry.kind == Kind::Char && maj == 0 && min == 0;
    match entry.kind {
        Kind::File => {
            entry.size = Some(md.len());
            match fs::read(&full) {
                Ok(data) => entry.sha256 = Some(sha256_hex(&data)),
                Err(e) => errors.push(format!("read: {}", io_err(&e))),
            }
        }
        Kind::Symlink => match fs::read_link(&full) {
            Ok(t) => entry.target = Some(t.display().to_string()),
            Err(e) => errors.push(format!("readlink: {}", io_err(&e))),
        },
        Kind::Char | Kind::Block => entry.rdev = Some((maj, min)),
        _ => {}
    }
    if whiteout {
        // Kernel whiteouts share one inode (nlink>1, mode 0); only the fact
        // that a whiteout is there matters.
        entry.kind = Kind::Whiteout;
        entry.mode = 0;
        entry.uid = 0;
        entry.gid = 0;
        entry.nlink = None;
        entry.rdev = None;
    }
    if !whiteout {
        match list_xattr(&full, false) {
            Ok(names) => {
                for n in names {
                    if opts.upper && (n == "trusted.overlay.opaque" || n == "trusted.overlay.redirect") {
                        match get_xattr(&full, &n, false) {
                            Ok(v) if n.ends_with("opaque") => entry.opaque = Some(v),
                            Ok(v) => entry.redirect = Some(v),
                            Err(e) => errors.push(format!("getxattr {n}: {}", io_err(&e))),
                        }
                        continue;
                    }
                    if xattr_hidden(&n) {
                        continue;
                    }
                    match get_xattr(&full, &n, false) {
                        Ok(v) => entry.xattrs.push((n, v)),
                        Err(e) => errors.push(format!("getxattr {n}: {}", io_err(&e))),
                    }
                }
            }
            // ext4 refuses user xattrs on symlinks etc; listing still works, so
            // anything here is a real error.
            Err(e) => errors.push(format!("listxattr: {}", io_err(&e))),
        }
    }
    let is_dir = entry.kind == Kind::Dir;
    let children = if is_dir {
        match read_dir_raw(&full) {
            Ok(mut c) => {
                c.sort();
                c
            }
            Err(e) => {
                errors.push(format!("readdir: {}", io_err(&e)));
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    if !errors.is_empty() {
        entry.error = Some(errors.join("; "));
    }
    map.insert(rel.to_path_buf(), entry);
    let mut seen = std::collections::BTreeSet::new();
    for (name, dt) in children {
        if !seen.insert(name.clone()) {
            let key = rel.join(format!("{name} <DUPLICATE readdir entry>"));
            map.insert(
                key,
                Entry {
                    kind: Kind::Unknown,
                    dtype: None,
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    nlink: None,
                    size: None,
                    sha256: None,
                    target: None,
                    rdev: None,
                    xattrs: Vec::new(),
                    opaque: None,
                    redirect: None,
                    error: Some("duplicate name in readdir".into()),
                },
            );
            continue;
        }
        walk(root, &rel.join(&name), Some(Kind::from_dtype(dt)), map, opts);
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn show_path(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "/".into()
    } else {
        format!("/{}", p.display())
    }
}

/// Human-readable list of differences between two snapshots.
pub fn diff_snapshots(a: &Snapshot, b: &Snapshot, a_name: &str, b_name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (p, ea) in a {
        match b.get(p) {
            None => out.push(format!("{}: only in {a_name}: {ea}", show_path(p))),
            Some(eb) if ea != eb => out.push(format!(
                "{}:\n    {a_name:>8}: {ea}\n    {b_name:>8}: {eb}",
                show_path(p)
            )),
            _ => {}
        }
    }
    for (p, eb) in b {
        if !a.contains_key(p) {
            out.push(format!("{}: only in {b_name}: {eb}", show_path(p)));
        }
    }
    out
}

pub fn format_diffs(ctx: &str, diffs: &[String]) -> String {
    const MAX: usize = 60;
    let mut s = format!("{ctx}: {} difference(s)\n", diffs.len());
    for d in diffs.iter().take(MAX) {
        s.push_str("  ");
        s.push_str(d);
        s.push('\n');
    }
    if diffs.len() > MAX {
        s.push_str(&format!("  ... and {} more\n", diffs.len() - MAX));
    }
    s
}

pub fn assert_snapshots_eq(a: &Snapshot, b: &Snapshot, a_name: &str, b_name: &str, ctx: &str) {
    let d = diff_snapshots(a, b, a_name, b_name);
    assert!(d.is_empty(), "{}", format_diffs(ctx, &d));
}

pub fn dump_snapshot(s: &Snapshot) -> String {
    s.iter()
        .map(|(p, e)| format!("  {} {e}\n", show_path(p)))
        .collect()
}

// ---------------------------------------------------------------------------
// Operation recorder: every op returns Ok(output) or Err(errno name), and is
// logged so two mounts' sequences can be compared.

pub type OpResult = Result<String, String>;

pub struct Ops {
    pub root: PathBuf,
    pub log: Vec<(String, OpResult)>,
    /// Files held open across operations (`hold`), by slot.
    held: Vec<Option<File>>,
}

/// Slots of `Ops::hold`.
pub const HELD_SLOTS: usize = 4;

fn unit(r: io::Result<()>) -> OpResult {
    r.map(|_| String::new()).map_err(|e| io_err(&e))
}

impl Ops {
    pub fn new(root: &Path) -> Self {
        Ops {
            root: root.to_path_buf(),
            log: Vec::new(),
            held: (0..HELD_SLOTS).map(|_| None).collect(),
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn rec(&mut self, label: String, r: OpResult) {
        self.log.push((label, r));
    }

    /// Result of the most recent op.
    pub fn last(&self) -> Option<&OpResult> {
        self.log.last().map(|(_, r)| r)
    }

    /// O_NONBLOCK everywhere so a fifo never blocks the test.
    fn open(&self, rel: &str, write: bool, flags: i32, create: bool) -> io::Result<File> {
        OpenOptions::new()
            .read(!write)
            .write(write)
            .create(create)
            .custom_flags(flags | libc::O_NONBLOCK)
            .mode(0o644)
            .open(self.p(rel))
    }

    /// open(O_CREAT|O_TRUNC) + write.
    pub fn write(&mut self, rel: &str, data: &[u8]) {
        let r = self
            .open(rel, true, libc::O_TRUNC, true)
            .and_then(|mut f| f.write_all(data));
        self.rec(format!("write {rel} {}", show_bytes(data)), unit(r))
    }

    /// open(O_APPEND) without O_CREAT + write.
    pub fn append(&mut self, rel: &str, data: &[u8]) {
        let r = self
            .open(rel, true, libc::O_APPEND, false)
            .and_then(|mut f| f.write_all(data));
        self.rec(format!("append {rel} {}", show_bytes(data)), unit(r))
    }

    /// pwrite at an offset into an existing file (partial overwrite).
    pub fn write_at(&mut self, rel: &str, off: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let r = self
            .open(rel, true, 0, false)
            .and_then(|f| f.write_all_at(data, off));
        self.rec(format!("write_at {rel} @{off} {}", show_bytes(data)), unit(r))
    }

    pub fn truncate(&mut self, rel: &str, len: u64) {
        let c = cpath(&self.p(rel));
        // SAFETY: valid path.
        let r = cvt(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) });
        self.rec(format!("truncate {rel} {len}"), unit(r))
    }

    /// Truncate through an open fd (ftruncate path, O_WRONLY without O_TRUNC).
    pub fn ftruncate(&mut self, rel: &str, len: u64) {
        let r = self.open(rel, true, 0, false).and_then(|f| f.set_len(len));
        self.rec(format!("ftruncate {rel} {len}"), unit(r))
    }

    pub fn read(&mut self, rel: &str) {
        let r = self.open(rel, false, 0, false).and_then(|mut f| {
            let mut v = Vec::new();
            f.read_to_end(&mut v)?;
            Ok(v)
        });
        let r = r.map(|v| show_bytes(&v)).map_err(|e| io_err(&e));
        self.rec(format!("read {rel}"), r)
    }

    pub fn unlink(&mut self, rel: &str) {
        let r = fs::remove_file(self.p(rel));
        self.rec(format!("unlink {rel}"), unit(r))
    }

    pub fn mkdir(&mut self, rel: &str, mode: u32) {
        let c = cpath(&self.p(rel));
        // SAFETY: valid path.
        let r = cvt(unsafe { libc::mkdir(c.as_ptr(), mode) });
        self.rec(format!("mkdir {rel} {mode:o}"), unit(r))
    }

    pub fn rmdir(&mut self, rel: &str) {
        let r = fs::remove_dir(self.p(rel));
        self.rec(format!("rmdir {rel}"), unit(r))
    }

    /// rm -rf as a single logged op; the first error aborts it.
    pub fn remove_all(&mut self, rel: &str) {
        let r = fs::remove_dir_all(self.p(rel));
        self.rec(format!("rm -rf {rel}"), unit(r))
    }

    pub fn rename(&mut self, from: &str, to: &str) {
        let r = fs::rename(self.p(from), self.p(to));
        self.rec(format!("rename {from} {to}"), unit(r))
    }

    pub fn rename2(&mut self, from: &str, to: &str, flags: u32) {
        let r = renameat2(&self.p(from), &self.p(to), flags);
        let f = match flags {
            RENAME_NOREPLACE => "NOREPLACE",
            RENAME_EXCHANGE => "EXCHANGE",
            _ => "?",
        };
        self.rec(format!("renameat2({f}) {from} {to}"), unit(r))
    }

    pub fn symlink(&mut self, target: &str, rel: &str) {
        let r = std::os::unix::fs::symlink(target, self.p(rel));
        self.rec(format!("symlink {rel} -> {target}"), unit(r))
    }

    pub fn readlink(&mut self, rel: &str) {
        let r = fs::read_link(self.p(rel))
            .map(|t| t.display().to_string())
            .map_err(|e| io_err(&e));
        self.rec(format!("readlink {rel}"), r)
    }

    pub fn link(&mut self, existing: &str, rel: &str) {
        let r = fs::hard_link(self.p(existing), self.p(rel));
        self.rec(format!("link {existing} {rel}"), unit(r))
    }

    pub fn mkfifo(&mut self, rel: &str, mode: u32) {
        let r = mknod(&self.p(rel), libc::S_IFIFO | mode, 0, 0);
        self.rec(format!("mkfifo {rel} {mode:o}"), unit(r))
    }

    /// mknod of a character device.
    pub fn mknod_char(&mut self, rel: &str, major: u32, minor: u32) {
        let r = mknod(&self.p(rel), libc::S_IFCHR | 0o600, major, minor);
        self.rec(format!("mknod_char {rel} {major}:{minor}"), unit(r))
    }

    /// chmod follows symlinks, like chmod(2).
    pub fn chmod(&mut self, rel: &str, mode: u32) {
        let r = fs::set_permissions(self.p(rel), fs::Permissions::from_mode(mode));
        self.rec(format!("chmod {rel} {mode:o}"), unit(r))
    }

    pub fn lchown(&mut self, rel: &str, uid: u32, gid: u32) {
        let r = lchown(&self.p(rel), uid, gid);
        self.rec(format!("lchown {rel} {uid}:{gid}"), unit(r))
    }

    pub fn utimes(&mut self, rel: &str, atime: (i64, i64), mtime: (i64, i64)) {
        let r = set_times(&self.p(rel), atime, mtime, false);
        self.rec(format!("utimensat {rel} {atime:?} {mtime:?}"), unit(r))
    }

    /// atime/mtime only make sense to compare after they were set explicitly.
    pub fn times(&mut self, rel: &str) {
        let r = fs::symlink_metadata(self.p(rel))
            .map(|m| {
                format!(
                    "atime={}.{:09} mtime={}.{:09}",
                    m.atime(),
                    m.atime_nsec(),
                    m.mtime(),
                    m.mtime_nsec()
                )
            })
            .map_err(|e| io_err(&e));
        self.rec(format!("times {rel}"), r)
    }

    /// lstat summary (no times, no inode number, no dir size).
    pub fn stat(&mut self, rel: &str) {
        let r = fs::symlink_metadata(self.p(rel))
            .map(|m| show_meta(&m))
            .map_err(|e| io_err(&e));
        self.rec(format!("stat {rel}"), r)
    }

    /// `op` on the file held in `slot` ("nothing held" if none).
    fn on_held(&self, slot: usize, op: impl FnOnce(&File) -> OpResult) -> OpResult {
        self.held[slot]
            .as_ref()
            .map_or_else(|| Err("nothing held".to_string()), op)
    }

    /// Open `rel` read-only (following symlinks) and keep it in `slot` across later
    /// operations, closing what the slot held.
    pub fn hold(&mut self, slot: usize, rel: &str) {
        self.held[slot] = None;
        let r = self.open(rel, false, 0, false).map(|f| {
            self.held[slot] = Some(f);
        });
        self.rec(format!("hold {slot} {rel}"), unit(r))
    }

    /// Open `rel` read-write (no create: a lower file is copied up) and keep it in `slot`.
    pub fn hold_rw(&mut self, slot: usize, rel: &str) {
        self.held[slot] = None;
        let r = self.open(rel, true, 0, false).map(|f| {
            self.held[slot] = Some(f);
        });
        self.rec(format!("hold_rw {slot} {rel}"), unit(r))
    }

    /// pwrite through the file held in `slot` (EBADF if it was opened read-only).
    pub fn write_held(&mut self, slot: usize, off: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let r = self.on_held(slot, |f| unit(f.write_all_at(data, off)));
        self.rec(format!("write_held {slot} @{off} {}", show_bytes(data)), r)
    }

    /// ftruncate of the file held in `slot`.
    pub fn truncate_held(&mut self, slot: usize, len: u64) {
        let r = self.on_held(slot, |f| unit(f.set_len(len)));
        self.rec(format!("truncate_held {slot} {len}"), r)
    }

    /// fchmod of the file held in `slot`.
    pub fn chmod_held(&mut self, slot: usize, mode: u32) {
        let r = self.on_held(slot, |f| {
            unit(f.set_permissions(fs::Permissions::from_mode(mode)))
        });
        self.rec(format!("chmod_held {slot} {mode:o}"), r)
    }

    /// lstat of `name` relative to the directory held in `slot` (fstatat): what a tree walk
    /// that keeps directory fds (fts, `find`, `rm -rf`) sees after the directory moved.
    pub fn stat_at_held(&mut self, slot: usize, name: &str) {
        use std::os::fd::AsRawFd;
        let r = self.on_held(slot, |f| {
            let c = CString::new(name).unwrap();
            // SAFETY: a zeroed stat is a valid out-buffer; valid fd and path.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::fstatat(f.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
            if rc == 0 {
                Ok(show_attrs(
                    st.st_mode,
                    st.st_uid,
                    st.st_gid,
                    st.st_nlink as u64,
                    st.st_size as u64,
                ))
            } else {
                Err(io_err(&io::Error::last_os_error()))
            }
        });
        self.rec(format!("stat_at_held {slot} {name}"), r)
    }

    /// fgetxattr of `name` through the file held in `slot`.
    pub fn getxattr_held(&mut self, slot: usize, name: &str) {
        use std::os::fd::AsRawFd;
        let r = self.on_held(slot, |f| {
            let c = CString::new(name).unwrap();
            let mut buf = vec![0u8; 256];
            // SAFETY: valid fd, NUL-terminated name, buffer of the given size.
            let n = unsafe { libc::fgetxattr(f.as_raw_fd(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(io_err(&io::Error::last_os_error()))
            } else {
                Ok(show_bytes(&buf[..n as usize]))
            }
        });
        self.rec(format!("getxattr_held {slot} {name}"), r)
    }

    /// List the directory held in `slot` (opened again through /proc/self/fd).
    pub fn readdir_held(&mut self, slot: usize) {
        use std::os::fd::AsRawFd;
        let r = self.on_held(slot, |f| {
            show_listing(read_dir_raw(Path::new(&format!(
                "/proc/self/fd/{}",
                f.as_raw_fd()
            ))))
        });
        self.rec(format!("readdir_held {slot}"), r)
    }

    /// Read what the file held in `slot` holds now, from offset 0 (pread).
    pub fn read_held(&mut self, slot: usize) {
        use std::os::unix::fs::FileExt;
        let r = self.on_held(slot, |f| {
            let mut v = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match f.read_at(&mut buf, v.len() as u64) {
                    Ok(0) => break Ok(show_bytes(&v)),
                    Ok(n) => v.extend_from_slice(&buf[..n]),
                    Err(e) => break Err(io_err(&e)),
                }
            }
        });
        self.rec(format!("read_held {slot}"), r)
    }

    /// fstat of the file held in `slot`.
    pub fn fstat_held(&mut self, slot: usize) {
        let r = self.on_held(slot, |f| {
            f.metadata().map(|m| show_meta(&m)).map_err(|e| io_err(&e))
        });
        self.rec(format!("fstat_held {slot}"), r)
    }

    pub fn setxattr(&mut self, rel: &str, name: &str, value: &[u8]) {
        let r = set_xattr(&self.p(rel), name, value, true);
        self.rec(format!("setxattr {rel} {name}={}", show_bytes(value)), unit(r))
    }

    pub fn getxattr(&mut self, rel: &str, name: &str) {
        let r = get_xattr(&self.p(rel), name, true)
            .map(|v| show_bytes(&v))
            .map_err(|e| io_err(&e));
        self.rec(format!("getxattr {rel} {name}"), r)
    }

    /// Unfiltered on purpose: leaking trusted.overlay.* is a bug.
    pub fn listxattr(&mut self, rel: &str) {
        let r = list_xattr(&self.p(rel), true)
            .map(|v| v.join(","))
            .map_err(|e| io_err(&e));
        self.rec(format!("listxattr {rel}"), r)
    }

    pub fn removexattr(&mut self, rel: &str, name: &str) {
        let r = remove_xattr(&self.p(rel), name, true);
        self.rec(format!("removexattr {rel} {name}"), unit(r))
    }

    /// Sorted names with d_type.
    pub fn readdir(&mut self, rel: &str) {
        let r = show_listing(read_dir_raw(&self.p(rel)));
        self.rec(format!("readdir {rel}"), r)
    }
}

/// First differences between two op logs.
pub fn diff_logs(
    a: &[(String, OpResult)],
    b: &[(String, OpResult)],
    a_name: &str,
    b_name: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    if a.len() != b.len() {
        out.push(format!(
            "op count differs: {a_name}={} {b_name}={}",
            a.len(),
            b.len()
        ));
    }
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        if x != y {
            out.push(format!(
                "op #{i} `{}`:\n    {a_name:>8}: {:?}\n    {b_name:>8}: {:?}{}",
                x.0,
                x.1,
                y.1,
                if x.0 != y.0 {
                    format!(" (label {:?})", y.0)
                } else {
                    String::new()
                }
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Differential runner: identical layers under kernel overlayfs and strata.

pub struct DiffRun {
    // Mounts first: fields drop in order, and the temp dirs must not be
    // removed while still mounted.
    pub kmount: Option<KernelMount>,
    pub smount: Option<StrataMount>,
    pub name: String,
    pub kset: LayerSet,
    pub sset: LayerSet,
    pub klog: Vec<(String, OpResult)>,
    pub slog: Vec<(String, OpResult)>,
    pub failures: Vec<String>,
    /// Extra context printed with failures (e.g. the random seed).
    pub context: String,
    /// Both mounted with redirect_dir=on (strata: its default); else both with off.
    pub redirect: bool,
    /// strata's extra `-o` options (for its remounts too).
    pub extra: String,
}

impl DiffRun {
    /// Build two identical layer sets with `build` and mount kernel + strata.
    pub fn new(name: &str, nlower: usize, build: impl Fn(&LayerSet)) -> Self {
        Self::new_with(name, nlower, build, "")
    }

    /// As `new`, with extra `-o` options for strata.
    pub fn new_with(name: &str, nlower: usize, build: impl Fn(&LayerSet), extra: &str) -> Self {
        Self::new_mode(name, nlower, build, extra, false)
    }

    /// As `new_with`, both mounts with directory redirects on (`redirect`) or off.
    pub fn new_mode(
        name: &str,
        nlower: usize,
        build: impl Fn(&LayerSet),
        extra: &str,
        redirect: bool,
    ) -> Self {
        require_fuse();
        let mut extra = extra.to_string();
        if !redirect {
            // strata's default is on; the reference for these cases is the kernel with off.
            if !extra.is_empty() {
                extra.push(',');
            }
            extra.push_str("redirect_dir=off");
        }
        let kset = LayerSet::new(&format!("{name}-k"), nlower);
        let sset = LayerSet::new(&format!("{name}-s"), nlower);
        build(&kset);
        build(&sset);
        // The builder must be deterministic or nothing below means anything.
        for i in 0..nlower {
            let d = diff_snapshots(
                &upper_snapshot(&kset.lowers[i].root),
                &upper_snapshot(&sset.lowers[i].root),
                "k-lower",
                "s-lower",
            );
            assert!(
                d.is_empty(),
                "{}",
                format_diffs(&format!("{name}: builder not deterministic (lower{i})"), &d)
            );
        }
        let mut run = DiffRun {
            name: name.to_string(),
            kmount: Some(
                KernelMount::try_new_redirect(&kset.spec(), redirect).unwrap_or_else(|e| panic!("{e}")),
            ),
            smount: None,
            kset,
            sset,
            klog: Vec::new(),
            slog: Vec::new(),
            failures: Vec::new(),
            context: String::new(),
            redirect,
            extra,
        };
        let spec = run.sset.spec();
        run.smount = Some(run.strata_mount(&spec).unwrap_or_else(|e| panic!("{e}")));
        run
    }

    /// A strata mount of `spec` with this run's options.
    fn strata_mount(&self, spec: &MountSpec) -> Result<StrataMount, String> {
        if self.extra.is_empty() {
            return StrataMount::try_new(spec);
        }
        let args = vec![
            "mount".to_string(),
            "-o".to_string(),
            format!("{},{}", spec.options(), self.extra),
            spec.mnt.display().to_string(),
        ];
        StrataMount::with_args(spec, &args)
    }

    pub fn kroot(&self) -> PathBuf {
        self.kset.mnt.clone()
    }

    pub fn sroot(&self) -> PathBuf {
        self.sset.mnt.clone()
    }

    /// Run `ops` on the kernel mount, then on strata; compare the new log
    /// entries. Returns false if they differ.
    pub fn apply(&mut self, ops: impl Fn(&mut Ops)) -> bool {
        let mut k = Ops::new(&self.kroot());
        ops(&mut k);
        let mut s = Ops::new(&self.sroot());
        ops(&mut s);
        let base = self.klog.len();
        let d = diff_logs(&k.log, &s.log, "kernel", "strata");
        self.klog.extend(k.log);
        self.slog.extend(s.log);
        if d.is_empty() {
            return true;
        }
        let d: Vec<String> = d
            .into_iter()
            .map(|l| l.replacen("op #", &format!("op #{base}+"), 1))
            .collect();
        self.failures
            .push(format_diffs(&format!("{}: op results differ", self.name), &d));
        false
    }

    /// Compare the merged views now; returns (kernel, strata) snapshots.
    pub fn compare_merged(&mut self, ctx: &str) -> (Snapshot, Snapshot) {
        let ks = snapshot(&self.kroot());
        let ss = snapshot(&self.sroot());
        let d = diff_snapshots(&ks, &ss, "kernel", "strata");
        if !d.is_empty() {
            self.failures.push(format_diffs(
                &format!("{}: merged view differs ({ctx})", self.name),
                &d,
            ));
        }
        (ks, ss)
    }

    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// Final merged compare, unmount, compare uppers, cross-mount both
    /// uppers with the other implementation, then panic on any failure.
    pub fn finish(mut self) {
        let (ks, ss) = self.compare_merged("final");
        if let Some(m) = self.smount.take() {
            if let Err(e) = m.umount() {
                self.failures.push(format!("{}: {e}", self.name));
            }
        }
        if let Some(m) = self.kmount.take() {
            if let Err(e) = m.umount() {
                self.failures.push(format!("{}: {e}", self.name));
            }
        }
        let mut ku = upper_snapshot(&self.kset.upper.root);
        let su = upper_snapshot(&self.sset.upper.root);
        if self.redirect {
            let n = su.values().filter(|e| e.redirect.is_some()).count();
            eprintln!("{}: {n} redirect(s) in strata's upper", self.name);
            // With redirect_dir=on the kernel also marks every directory it creates in a
            // merged parent opaque, as an optimization (ovl_create_upper: offline changes
            // to the lowers are not allowed then). There is nothing below such a directory
            // to hide, so strata does not (and keeps those markers out of its layers).
            // Tolerate exactly that: the merged views and the cross-mounts are compared too.
            let mut tolerated = 0;
            for (p, ke) in ku.iter_mut() {
                if let Some(se) = su.get(p) {
                    if ke.kind == Kind::Dir && ke.opaque.is_some() && se.opaque.is_none() {
                        let mut k2 = ke.clone();
                        k2.opaque = None;
                        if &k2 == se {
                            *ke = k2;
                            tolerated += 1;
                        }
                    }
                }
            }
            if tolerated > 0 {
                eprintln!(
                    "{}: {tolerated} new director(y/ies) opaque in the kernel's upper only (tolerated)",
                    self.name
                );
            }
        }
        let d = diff_snapshots(&ku, &su, "kernel", "strata");
        if !d.is_empty() {
            self.failures
                .push(format_diffs(&format!("{}: upper dirs differ", self.name), &d));
        }
        // strata's upper read back by the kernel.
        {
            let spec = self.sset.fresh_spec();
            match KernelMount::try_new_redirect(&spec, self.redirect) {
                Ok(km) => {
                    let cross = snapshot(&spec.mnt);
                    drop(km);
                    let d = diff_snapshots(&ss, &cross, "strata", "kernel");
                    if !d.is_empty() {
                        self.failures.push(format_diffs(
                            &format!("{}: strata's upper+lowers mounted by the kernel differ from strata's merged view", self.name),
                            &d,
                        ));
                    }
                }
                Err(e) => self
                    .failures
                    .push(format!("{}: kernel mount of strata's upper: {e}\n", self.name)),
            }
        }
        // kernel's upper read back by strata.
        {
            let spec = self.kset.fresh_spec();
            match self.strata_mount(&spec) {
                Ok(sm) => {
                    let cross = snapshot(&spec.mnt);
                    if let Err(e) = sm.umount() {
                        self.failures.push(format!("{}: cross-mount: {e}", self.name));
                    }
                    let d = diff_snapshots(&ks, &cross, "kernel", "strata");
                    if !d.is_empty() {
                        self.failures.push(format_diffs(
                            &format!("{}: kernel's upper+lowers mounted by strata differ from kernel's merged view", self.name),
                            &d,
                        ));
                    }
                }
                Err(e) => self
                    .failures
                    .push(format!("{}: cross-mount of kernel upper: {e}", self.name)),
            }
        }
        // Each upper rotated into the lower stack (the top lower under a new, empty upper),
        // as a commit does: both implementations must show the same merged tree again.
        for (who, merged) in [("kernel", &ks), ("strata", &ss)] {
            let set = if who == "kernel" { &self.kset } else { &self.sset };
            let mut lowers = vec![set.upper.root.clone()];
            lowers.extend(set.lower_paths());
            let spec = MountSpec {
                lowers,
                upper: set.env.fresh_dir("upper-"),
                work: set.env.fresh_dir("work-"),
                mnt: set.env.fresh_dir("mnt-"),
            };
            let kview = KernelMount::try_new_redirect(&spec, self.redirect).map(|km| {
                let v = snapshot(&spec.mnt);
                drop(km);
                v
            });
            let spec2 = MountSpec {
                work: set.env.fresh_dir("work-"),
                mnt: set.env.fresh_dir("mnt-"),
                ..spec.clone()
            };
            let sview = self.strata_mount(&spec2).map(|sm| {
                let v = snapshot(&spec2.mnt);
                if let Err(e) = sm.umount() {
                    eprintln!("rotated mount: {e}");
                }
                v
            });
            for (impl_, view) in [("kernel", kview), ("strata", sview)] {
                match view {
                    Ok(v) => {
                        let d = diff_snapshots(merged, &v, "before", "rotated");
                        if !d.is_empty() {
                            self.failures.push(format_diffs(
                                &format!("{}: {who}'s upper as a lower layer, mounted by {impl_}, differs from {who}'s merged view", self.name),
                                &d,
                            ));
                        }
                    }
                    Err(e) => self.failures.push(format!(
                        "{}: {impl_} mount with {who}'s upper as a lower layer: {e}\n",
                        self.name
                    )),
                }
            }
        }
        self.check();
    }

    /// Panic with every failure collected so far.
    pub fn check(&self) {
        if self.failures.is_empty() {
            return;
        }
        let mut msg = format!("differential case `{}` failed", self.name);
        if !self.context.is_empty() {
            msg.push_str(&format!(" [{}]", self.context));
        }
        msg.push('\n');
        for f in &self.failures {
            msg.push_str(f);
        }
        panic!("{msg}");
    }
}

/// One-shot differential case: build, run ops once, finish.
pub fn run_case(name: &str, nlower: usize, build: impl Fn(&LayerSet), ops: impl Fn(&mut Ops)) {
    let mut run = DiffRun::new(name, nlower, build);
    run.compare_merged("before ops");
    run.apply(ops);
    run.finish();
}

/// `run_case` with redirect_dir=on on both sides; returns strata's op log so the caller
/// can also check what each operation did.
pub fn run_case_redirect(
    name: &str,
    nlower: usize,
    build: impl Fn(&LayerSet),
    ops: impl Fn(&mut Ops),
) -> Vec<(String, OpResult)> {
    let mut run = DiffRun::new_mode(name, nlower, build, "", true);
    run.compare_merged("before ops");
    run.apply(ops);
    let log = run.slog.clone();
    run.finish();
    log
}

// ---------------------------------------------------------------------------
// Unprivileged users.

/// A throwaway unprivileged user (useradd gives it /etc/subuid and /etc/subgid ranges on
/// Debian), deleted with every process it still has on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
}

impl TestUser {
    pub fn create(home: &Path) -> TestUser {
        Self::create_named(home, &format!("strata-rl-{}", std::process::id()))
    }

    pub fn create_named(home: &Path, name: &str) -> TestUser {
        let name = name.to_string();
        let out = run_cmd(
            Command::new("useradd")
                .args(["-m", "-d"])
                .arg(home)
                .args(["-s", "/bin/sh", &name]),
            Duration::from_secs(60),
        );
        assert!(out.ok(), "useradd {name}: {out}");
        let id = run_cmd(Command::new("id").args(["-u", &name]), Duration::from_secs(10));
        let uid = id
            .stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("id -u {name}: {id}"));
        TestUser { name, uid }
    }
}

/// SIGKILL every process of `uid` (a throwaway user a test made: all of them are the
/// test's), a few times over for the ones forked meanwhile.
pub fn kill_user_processes(uid: u32) {
    for _ in 0..3 {
        let mut any = false;
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if fs::metadata(e.path()).is_ok_and(|m| m.uid() == uid) {
                any = true;
                // SAFETY: kill(2) of a process of the test's own throwaway user.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if !any {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        kill_user_processes(self.uid);
        let out = run_cmd(
            Command::new("userdel").args(["-r", &self.name]),
            Duration::from_secs(60),
        );
        if run_cmd(Command::new("id").arg(&self.name), Duration::from_secs(10)).ok() {
            eprintln!("WARNING: could not delete user {}: {out}", self.name);
        }
    }
}
