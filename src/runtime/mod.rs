//! Running a process inside a mounted root: namespaces, pivot_root, a tiny init, a real
//! terminal for `-it`, signal forwarding and the exit code. Knows only a rootfs path.
//!
//! Process tree: the caller (P) forks A, which enters new mount, UTS, IPC, PID (and, unless
//! `--network host`, network; rootless also user) namespaces and forks B. B is PID 1 of the
//! new PID namespace: it sets up the root, pivots into it and forks C, the command; then it
//! forwards signals to C and reaps orphans until C exits, and exits with C's status. A and P
//! pass that status on. With `-t`, C runs on a pseudo-terminal whose master P relays.

pub mod cgroup;
mod error;
pub mod rootfs;
pub mod seccomp;
pub mod syscalls;
mod tty;
pub mod userns;

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::sys::{self, Forked};
pub use error::RuntimeError;

/// A host path bind-mounted into the container.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Host path (must exist).
    pub host: PathBuf,
    /// Absolute path in the container.
    pub container: PathBuf,
    /// Read-only.
    pub ro: bool,
}

/// Everything needed to run one process in a root.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The mounted merged tree.
    pub rootfs: PathBuf,
    /// Host directory for injected files (hosts, hostname, resolv.conf).
    pub rundir: PathBuf,
    /// Command and arguments.
    pub argv: Vec<String>,
    /// Environment (KEY=VALUE).
    pub env: Vec<String>,
    /// Working directory in the container.
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid` ("" = root).
    pub user: String,
    /// Hostname.
    pub hostname: String,
    /// Allocate a pseudo-terminal.
    pub tty: bool,
    /// Keep stdin open.
    pub interactive: bool,
    /// Bind mounts.
    pub volumes: Vec<Volume>,
    /// Share the host's network namespace.
    pub host_network: bool,
    /// Install the default seccomp filter (docker's default profile).
    pub seccomp: bool,
    /// With `seccomp`: the filters of a profile (`--security-opt seccomp=FILE`, compiled by
    /// `seccomp::profile_filters`) instead of the default one.
    pub seccomp_profile: Option<Vec<seccompiler::BpfProgram>>,
    /// Set no_new_privs (setuid binaries and file capabilities grant nothing).
    pub no_new_privs: bool,
    /// Capabilities the command keeps (numbers; `DEFAULT_CAPS` unless changed).
    pub caps: Vec<u32>,
    /// The root file system is read-only (volumes, /dev, /proc and /tmp stubs are not).
    pub read_only: bool,
    /// Resource limits (cgroups).
    pub limits: cgroup::Limits,
}

/// Capability names as docker spells them (without `CAP_`), by number.
pub const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The capability set of `--cap-add`/`--cap-drop` (names with or without `CAP_`, any case,
/// `ALL`) over docker's default set.
pub fn capabilities(add: &[String], drop: &[String]) -> Result<Vec<u32>> {
    let num = |n: &str| -> Result<Option<u32>> {
        let u = n.to_ascii_uppercase();
        let u = u.strip_prefix("CAP_").unwrap_or(&u);
        if u == "ALL" {
            return Ok(None);
        }
        match CAP_NAMES.iter().position(|c| *c == u) {
            Some(i) => Ok(Some(i as u32)),
            None => Err(RuntimeError::UnknownCapability(n.to_string()).into()),
        }
    };
    let mut caps: Vec<u32> = DEFAULT_CAPS.to_vec();
    for d in drop {
        match num(d)? {
            None => caps.clear(),
            Some(c) => caps.retain(|x| *x != c),
        }
    }
    for a in add {
        match num(a)? {
            None => caps = (0..CAP_NAMES.len() as u32).collect(),
            Some(c) if !caps.contains(&c) => caps.push(c),
            Some(_) => {}
        }
    }
    caps.sort_unstable();
    Ok(caps)
}

/// Exit code for an error of strata itself (as docker's 125).
pub const EXIT_RUNTIME: i32 = 125;
/// The command could not be run (not executable).
pub const EXIT_CANNOT_EXEC: i32 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: i32 = 127;

/// Capabilities a container's processes keep: docker's default set. Everything else (module
/// loading, mounting, raw I/O, tracing other processes...) is dropped from the bounding set.
pub const DEFAULT_CAPS: [u32; 14] = [
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    13, // NET_RAW
    18, // SYS_CHROOT
    27, // MKNOD
    29, // AUDIT_WRITE
    31, // SETFCAP
];

const FORWARDED: [i32; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Wait for `pid`, retrying when a signal interrupts; returns its exit code.
fn wait_for(pid: i32) -> i32 {
    loop {
        match sys::wait_child(pid) {
            Ok((_, Some(x))) => return x.code(),
            Ok((_, None)) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return EXIT_RUNTIME,
        }
    }
}

/// Run the process; returns its exit code (128+N when killed by signal N).
pub fn run(spec: &RunSpec) -> Result<i32> {
    rootfs::write_injected(&spec.rundir, &spec.hostname, spec.host_network)?;
    if std::path::Path::new(&spec.cwd).is_relative() {
        return Err(RuntimeError::NotAbsolute {
            what: "working directory",
            path: spec.cwd.clone(),
        }
        .into());
    }
    // With -t, PID 1 sends the pty master back over this socket.
    let pty = if spec.tty {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        Some(rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )?)
    } else {
        None
    };
    let rootless = sys::euid() != 0;
    let (uid, gid) = (sys::euid(), sys::egid());
    // Made before the fork, removed (on drop) after the container ended.
    let group = if spec.limits.any() {
        Some(cgroup::Group::create(&spec.limits)?)
    } else {
        None
    };
    sys::catch_signals(&FORWARDED);
    sys::catch_signals(&[libc::SIGWINCH]);
    let parent = std::process::id() as i32;
    match sys::fork().context("fork")? {
        Forked::Child => {
            die_with_parent(Some(parent));
            let code = match stage_a(
                spec,
                pty.as_ref().map(|p| &p.1),
                rootless,
                uid,
                gid,
                group.as_ref(),
            ) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("strata: error: {e:#}");
                    EXIT_RUNTIME
                }
            };
            std::process::exit(code);
        }
        Forked::Parent(a) => {
            sys::set_forward_pid(a);
            let code = match pty {
                Some((ours, theirs)) => {
                    drop(theirs);
                    let relay = tty::relay(ours, spec.interactive);
                    let c = wait_for(a);
                    if let Err(e) = relay {
                        log::warn!("terminal: {e:#}");
                    }
                    c
                }
                None => wait_for(a),
            };
            sys::set_forward_pid(0);
            Ok(code)
        }
    }
}

/// SIGKILL this process when its parent dies: a killed `strata run` or `build` takes its
/// container with it (PID 1 dying ends the whole PID namespace) instead of leaving it running
/// on a filesystem nobody serves.
fn die_with_parent(parent: Option<i32>) {
    let _ = sys::kill_with_parent();
    // The parent may have died before the line above. (PID 1 of a new namespace sees no
    // parent at all: getppid() is 0 there, so it cannot check.)
    if parent.is_some_and(|p| sys::getppid() != p) {
        std::process::exit(EXIT_RUNTIME);
    }
}

/// A: enter the namespaces and start PID 1.
fn stage_a(
    spec: &RunSpec,
    pty: Option<&OwnedFd>,
    rootless: bool,
    uid: u32,
    gid: u32,
    group: Option<&cgroup::Group>,
) -> Result<i32> {
    // In the limits' group for the fork of PID 1 only: A itself leaves it right after.
    if let Some(g) = group {
        g.join()?;
    }
    let mut flags = sys::Namespaces::CLONE_NEWNS
        | sys::Namespaces::CLONE_NEWUTS
        | sys::Namespaces::CLONE_NEWIPC
        | sys::Namespaces::CLONE_NEWPID;
    if !spec.host_network {
        flags |= sys::Namespaces::CLONE_NEWNET;
    }
    if rootless {
        // The user namespace first: it grants the capabilities for the others.
        sys::unshare(sys::Namespaces::CLONE_NEWUSER).context("creating a user namespace")?;
        std::fs::write("/proc/self/setgroups", "deny").context("setgroups deny")?;
        std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")).context("writing uid_map")?;
        std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")).context("writing gid_map")?;
    }
    sys::unshare(flags).context("creating namespaces")?;
    // Out of the terminal's process group: a Ctrl-C reaches P alone, which forwards it once
    // (otherwise A and B would each get it too and forward it again).
    let _ = sys::setsid();
    match sys::fork().context("fork")? {
        Forked::Child => {
            die_with_parent(None);
            let code = match stage_b(spec, pty, rootless) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("strata: error: {e:#}");
                    EXIT_RUNTIME
                }
            };
            std::process::exit(code);
        }
        Forked::Parent(b) => {
            sys::set_forward_pid(b);
            if let Some(g) = group {
                g.leave()?;
            }
            Ok(wait_for(b))
        }
    }
}

/// B: PID 1. Set up the root, start the command, forward signals, reap.
fn stage_b(spec: &RunSpec, pty_sock: Option<&OwnedFd>, rootless: bool) -> Result<i32> {
    rootfs::setup(spec)?;
    // Docker creates a missing working directory; so do we (as root, before the user switch).
    if !Path::new(&spec.cwd).exists() {
        std::fs::create_dir_all(&spec.cwd)
            .with_context(|| format!("creating working directory '{}'", spec.cwd))?;
    }
    let slave = match pty_sock {
        Some(sock) => {
            let (master, slave) = tty::open_in_container()?;
            sys::send_fd(sock.as_fd(), master.as_fd()).context("handing the terminal over")?;
            Some(slave)
        }
        None => None,
    };
    sys::sethostname(&spec.hostname).context("sethostname")?;
    if !spec.host_network {
        sys::loopback_up().context("bringing up the loopback interface")?;
    }
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()?;
    if argv.is_empty() {
        return Err(RuntimeError::NoCommand.into());
    }
    let ids = resolve_user(&spec.user)?;
    match sys::fork().context("fork")? {
        Forked::Child => {
            sys::reset_for_exec();
            let code = exec(spec, &argv, slave.as_ref(), ids, rootless);
            std::process::exit(code);
        }
        Forked::Parent(c) => {
            sys::set_forward_pid(c);
            // Reap everything; leave when the command itself is done.
            loop {
                match sys::wait_child(-1) {
                    Ok((who, Some(x))) if who == c => return Ok(x.code()),
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(_) => return Ok(EXIT_RUNTIME),
                }
            }
        }
    }
}

/// uid, gid and supplementary groups for `user`, read from the container's /etc files.
fn resolve_user(user: &str) -> Result<(u32, u32, Vec<u32>, Option<String>)> {
    if user.is_empty() {
        return Ok((0, 0, vec![], Some("/root".into())));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let pw = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == u || f[2] == u));
    let uid: u32 = match (u.parse(), &pw) {
        (Ok(n), _) => n,
        (Err(_), Some(f)) => f[2].parse().context("/etc/passwd: bad uid")?,
        (Err(_), None) => return Err(RuntimeError::UnknownUser(u.to_string()).into()),
    };
    let gid: u32 = match g {
        Some(g) => match g.parse() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .with_context(|| format!("unable to find group {g}: no matching entries in /etc/group"))?,
        },
        None => pw.as_ref().and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let name = pw.as_ref().map(|f| f[0].to_string());
    let extra: Vec<u32> = match &name {
        Some(n) => group
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m == n))
            .filter_map(|f| f[2].parse().ok())
            .collect(),
        None => vec![],
    };
    Ok((uid, gid, extra, pw.map(|f| f[5].to_string())))
}

/// Find `cmd` on the container's PATH.
fn lookup(cmd: &str, env: &[String]) -> Option<PathBuf> {
    if cmd.contains('/') {
        return Some(PathBuf::from(cmd));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':').map(|d| Path::new(d).join(cmd)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| {
            m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
        })
    })
}

/// C: become the command. Returns only on failure, with the exit code to use.
fn exec(
    spec: &RunSpec,
    argv: &[CString],
    slave: Option<&OwnedFd>,
    ids: (u32, u32, Vec<u32>, Option<String>),
    rootless: bool,
) -> i32 {
    let fail = |code: i32, msg: String| {
        eprintln!("strata: {msg}");
        code
    };
    let _ = sys::setsid();
    if let Some(p) = slave {
        if let Err(e) = tty::become_controlling(p) {
            return fail(EXIT_RUNTIME, format!("terminal: {e:#}"));
        }
    } else if !spec.interactive {
        if let Ok(n) = std::fs::File::open("/dev/null") {
            let _ = sys::dup_to_stdio(n.as_fd(), true, false, false);
        }
    }
    if spec.no_new_privs {
        if let Err(e) = sys::set_no_new_privs() {
            return fail(EXIT_RUNTIME, format!("no_new_privs: {e}"));
        }
    }
    // While CAP_SYS_ADMIN is still held, so no_new_privs is not required for it.
    if spec.seccomp {
        let filters = match &spec.seccomp_profile {
            Some(p) => Ok(p.clone()),
            None => seccomp::default_filters(),
        };
        if let Err(e) = filters.and_then(|f| seccomp::install(&f)) {
            return fail(EXIT_RUNTIME, format!("{e:#}"));
        }
    }
    // Before the user switch: dropping needs CAP_SETPCAP, which a non-root user lacks.
    if let Err(e) = sys::restrict_capabilities(&spec.caps) {
        return fail(EXIT_RUNTIME, format!("dropping capabilities: {e}"));
    }
    let (uid, gid, groups, home) = ids;
    // A user namespace with setgroups denied (rootless) keeps the groups it has.
    let gs: Vec<u32> = std::iter::once(gid).chain(groups).collect();
    if let Err((what, e)) = sys::set_ids(uid, gid, (!rootless).then_some(&gs[..])) {
        return fail(EXIT_RUNTIME, format!("{what} {uid}:{gid}: {e}"));
    }
    if let Err(e) = std::env::set_current_dir(&spec.cwd) {
        return fail(EXIT_CANNOT_EXEC, format!("working directory '{}': {e}", spec.cwd));
    }
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home.unwrap_or_else(|| "/".into())));
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", spec.hostname));
    }
    if spec.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let cmd = &spec.argv[0];
    let Some(path) = lookup(cmd, &env) else {
        return fail(
            EXIT_NOT_FOUND,
            format!("exec: \"{cmd}\": executable file not found in $PATH"),
        );
    };
    let cpath = match CString::new(path.as_os_str().as_encoded_bytes()) {
        Ok(c) => c,
        Err(_) => return fail(EXIT_NOT_FOUND, "command path contains NUL".into()),
    };
    let cenv: Vec<CString> = env.iter().filter_map(|e| CString::new(e.as_str()).ok()).collect();
    match sys::execve(&cpath, argv, &cenv) {
        rustix::io::Errno::NOENT => fail(
            EXIT_NOT_FOUND,
            format!("exec: \"{cmd}\": no such file or directory"),
        ),
        e => fail(
            EXIT_CANNOT_EXEC,
            format!("exec: \"{cmd}\": {}", std::io::Error::from(e)),
        ),
    }
}
