//! `strata run` and `strata shell`: mount a container's root, run a process in it, clean up.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::image::ImageConfiguration;

use crate::cli::{ProcessArgs, RunArgs, ShellArgs};
use crate::container::Container;
use crate::image::store::Store;
use crate::runtime::{self, RunSpec, Volume, EXIT_RUNTIME};
use crate::sys;

/// Unmounts (and with --rm removes) a container however the run ends.
struct Cleanup<'a> {
    c: &'a Container,
    unmount: bool,
    remove: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.unmount {
            let rootfs = self.c.rootfs();
            if crate::mounts::is_mountpoint(&rootfs) {
                if let Err(e) =
                    super::umount::umount(&rootfs, false).or_else(|_| super::umount::umount(&rootfs, true))
                {
                    eprintln!("strata: error: unmounting '{}': {e:#}", rootfs.display());
                }
            }
            if !crate::mounts::is_mountpoint(&rootfs) {
                self.c.drop_fresh_dirs();
            }
        }
        // Re-read: the run recorded its command meanwhile.
        let mut st = Container::open(
            self.c
                .dir
                .parent()
                .and_then(|p| p.parent())
                .unwrap_or(Path::new("/")),
            &self.c.state.name,
        )
        .unwrap_or_else(|_| self.c.clone());
        st.state.pid = None;
        if self.remove {
            if let Err(e) = super::rm::remove(&st, true) {
                eprintln!("strata: error: removing container '{}': {e:#}", st.state.name);
            }
        } else {
            let _ = st.save();
        }
    }
}

/// Parent directories of every mount target of a run (they may be copied up to hold a stub).
fn target_parents(spec: &RunSpec) -> Vec<PathBuf> {
    let fixed = [
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/proc",
        "/dev",
        "/sys",
    ];
    let mut v: Vec<PathBuf> = Vec::new();
    for t in fixed
        .iter()
        .map(PathBuf::from)
        .chain(spec.volumes.iter().map(|v| v.container.clone()))
    {
        for a in t.ancestors().skip(1) {
            if a != Path::new("/") && !v.iter().any(|x| x == a) {
                v.push(a.to_path_buf());
            }
        }
    }
    v
}

fn parse_volume(v: &str) -> Result<Volume> {
    let parts: Vec<&str> = v.split(':').collect();
    let (host, ctr, ro) = match parts.as_slice() {
        [h, c] => (h, c, false),
        [h, c, "ro"] => (h, c, true),
        [h, c, "rw"] => (h, c, false),
        _ => bail!("volume '{v}': expected HOST:CONTAINER[:ro]"),
    };
    let host = std::fs::canonicalize(host)
        .with_context(|| format!("volume '{v}': host path '{host}' does not exist"))?;
    if !ctr.starts_with('/') {
        bail!("volume '{v}': the container path must be absolute");
    }
    Ok(Volume {
        host,
        container: PathBuf::from(ctr),
        ro,
    })
}

/// What `--security-opt` asks for.
struct Security {
    seccomp: bool,
    /// `seccomp=FILE`: a docker seccomp profile.
    profile: Option<PathBuf>,
    no_new_privs: bool,
}

fn security_opts(opts: &[String]) -> Result<Security> {
    let mut s = Security {
        seccomp: true,
        profile: None,
        no_new_privs: false,
    };
    for o in opts {
        match o.as_str() {
            "seccomp=unconfined" | "seccomp:unconfined" => s.seccomp = false,
            "no-new-privileges" | "no-new-privileges=true" | "no-new-privileges:true" => {
                s.no_new_privs = true
            }
            "no-new-privileges=false" | "no-new-privileges:false" => s.no_new_privs = false,
            o if o.starts_with("seccomp=") || o.starts_with("seccomp:") => {
                s.seccomp = true;
                s.profile = Some(PathBuf::from(&o["seccomp=".len()..]));
            }
            o => bail!("--security-opt {o}: unknown option (seccomp=unconfined, no-new-privileges)"),
        }
    }
    Ok(s)
}

fn process_spec(
    c: &Container,
    cfg: &ImageConfiguration,
    p: &ProcessArgs,
    command: &[String],
    default_cmd: Option<&[String]>,
    entrypoint: Option<&str>,
) -> Result<RunSpec> {
    let ic = cfg.config().clone().unwrap_or_default();
    // docker's --entrypoint: one program ('' none), and the image's CMD no longer applies.
    let (entry, image_cmd) = match entrypoint {
        Some("") => (Vec::new(), Vec::new()),
        Some(e) => (vec![e.to_string()], Vec::new()),
        None => (
            ic.entrypoint().clone().unwrap_or_default(),
            ic.cmd().clone().unwrap_or_default(),
        ),
    };
    let argv: Vec<String> = if !command.is_empty() {
        entry.into_iter().chain(command.iter().cloned()).collect()
    } else if let Some(d) = default_cmd {
        d.to_vec()
    } else {
        entry.into_iter().chain(image_cmd).collect()
    };
    if argv.is_empty() {
        bail!("no command given and the image has neither Entrypoint nor Cmd");
    }
    let sec = security_opts(&p.security_opt)?;
    let mut env = ic.env().clone().unwrap_or_default();
    for e in &p.env {
        let kv = if e.contains('=') {
            e.clone()
        } else {
            match std::env::var(e) {
                Ok(v) => format!("{e}={v}"),
                Err(_) => continue,
            }
        };
        let k = kv.split('=').next().unwrap_or("").to_string();
        env.retain(|x| x.split('=').next() != Some(&k));
        env.push(kv);
    }
    let hostname: String = p
        .hostname
        .clone()
        .unwrap_or_else(|| c.state.name.clone())
        .chars()
        .take(63)
        .collect();
    let caps = if p.privileged {
        (0..runtime::CAP_NAMES.len() as u32).collect()
    } else {
        runtime::capabilities(&p.cap_add, &p.cap_drop)?
    };
    // Compiled here, so a bad profile is an error before anything starts.
    let seccomp_profile = match (&sec.profile, p.privileged) {
        (Some(f), false) => {
            let json = std::fs::read(f).with_context(|| format!("--security-opt seccomp={}", f.display()))?;
            let names: Vec<String> = caps
                .iter()
                .filter_map(|c| runtime::CAP_NAMES.get(*c as usize))
                .map(|n| format!("CAP_{n}"))
                .collect();
            Some(
                runtime::seccomp::profile_filters(&json, &names)
                    .with_context(|| format!("seccomp profile '{}'", f.display()))?,
            )
        }
        _ => None,
    };
    Ok(RunSpec {
        rootfs: c.rootfs(),
        rundir: c.rundir(),
        argv,
        env,
        cwd: p
            .workdir
            .clone()
            .or(ic.working_dir().clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: p.user.clone().or(ic.user().clone()).unwrap_or_default(),
        hostname,
        tty: p.tty,
        interactive: p.interactive || p.tty,
        volumes: p.volume.iter().map(|v| parse_volume(v)).collect::<Result<_>>()?,
        host_network: p.network == "host",
        seccomp: sec.seccomp && !p.privileged,
        seccomp_profile,
        no_new_privs: sec.no_new_privs,
        caps,
        read_only: p.read_only,
        limits: runtime::cgroup::Limits {
            memory: p
                .memory
                .as_deref()
                .map(runtime::cgroup::parse_bytes)
                .transpose()?,
            pids: match p.pids_limit {
                Some(0) => bail!("--pids-limit 0: must be at least 1"),
                n => n,
            },
            cpus: match p.cpus {
                Some(c) if c.is_nan() || c <= 0.0 => bail!("--cpus {c}: must be more than 0"),
                c => c,
            },
        },
    })
}

fn interrupted() -> Result<()> {
    if let Some(s) = sys::take_signal() {
        bail!("interrupted by signal {s}");
    }
    Ok(())
}

/// Run `spec` in the (mounted) container and report a dead filesystem daemon.
fn execute(root: &Path, c: &mut Container, spec: &RunSpec) -> Result<i32> {
    c.note_fresh_dirs(&target_parents(spec));
    c.state.last_command = Some(spec.argv.clone());
    c.state.pid = Some(std::process::id() as i32);
    c.save()?;
    let _ = root;
    let code = runtime::run(spec)?;
    if let Err(m) = c.mounted() {
        // The command could not have worked: say so instead of passing its code on.
        eprintln!("strata: error: {m}; the container has been unmounted");
        return Ok(EXIT_RUNTIME);
    }
    let stubs: Vec<PathBuf> = std::fs::read_to_string(spec.rundir.join("stubs"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect();
    runtime::rootfs::remove_stubs(&c.rootfs(), &stubs);
    let _ = std::fs::remove_file(spec.rundir.join("stubs"));
    Ok(code)
}

/// `strata run`: returns the command's exit code.
pub fn run(a: RunArgs, root: &Path) -> Result<i32> {
    // Ctrl-C during setup must not leave a mount behind: catch it and check between steps.
    sys::catch_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    // Bad volumes are refused before anything is created.
    for v in &a.process.volume {
        parse_volume(v)?;
    }
    let (mut c, cfg) = {
        let store = Store::open(root, true)?;
        let img = store.resolve(&a.image)?;
        store.unpacked_layers(&img, &crate::image::progress::Progress::new())?;
        (
            Container::create(root, a.name.as_deref(), &a.image, &img.id)?,
            img.config,
        )
    };
    let snapshot = c.clone();
    let mut guard = Cleanup {
        c: &snapshot,
        unmount: false,
        remove: a.rm,
    };
    interrupted()?;
    let spec = process_spec(&c, &cfg, &a.process, &a.command, None, a.entrypoint.as_deref())?;
    super::mount::mount_container(root, &c, None)?;
    guard.unmount = true;
    interrupted()?;
    let code = execute(root, &mut c, &spec)?;
    drop(guard);
    Ok(code)
}

/// `strata shell`: a command (default /bin/sh) in an existing container.
pub fn shell(a: ShellArgs, root: &Path) -> Result<i32> {
    sys::catch_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    let mut c = Container::open(root, &a.container)?;
    if c.running() {
        log::info!(
            "container '{}' already runs a process; starting another",
            c.state.name
        );
    }
    let cfg = {
        let store = Store::open(root, false)?;
        store.resolve(&c.state.image_id)?.config
    };
    let mut p = a.process.clone();
    if a.command.is_empty() && std::io::stdin().is_terminal() && !p.tty && !p.interactive {
        p.tty = true;
        p.interactive = true;
    }
    let sh = ["/bin/sh".to_string()];
    let spec = process_spec(
        &c,
        &cfg,
        &p,
        &a.command,
        a.command.is_empty().then_some(&sh[..]),
        None,
    )?;
    let was_mounted = match c.mounted() {
        Ok(m) => m,
        Err(m) => bail!("{m}; run 'strata umount {}' to clean up", c.state.name),
    };
    let snapshot = c.clone();
    let mut guard = Cleanup {
        c: &snapshot,
        unmount: false,
        remove: false,
    };
    if !was_mounted {
        super::mount::mount_container(root, &c, None)?;
        guard.unmount = true;
    }
    interrupted()?;
    let code = execute(root, &mut c, &spec)?;
    drop(guard);
    Ok(code)
}
