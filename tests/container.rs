//! Container tests: `strata create/ps/rm/mount/umount/run/shell/commit/diff/history` over a
//! busybox image imported into a temp store. Covers isolation (mount, pid, uts, net
//! namespaces), exit codes, process options (-e -w -u -v), an interactive shell on a real
//! pseudo-terminal (echo, tty, Ctrl-C, exit code), the run -> diff -> commit -> history ->
//! run workflow, rootless runs, a dying filesystem daemon, and rm/rmi refusals.
//!
//! Every test owns its store; `Fixture`'s Drop kills leftover container processes,
//! unmounts leftover container roots and removes the containers, so a failing test leaves
//! no mount or process behind.

mod common;
mod image_common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{mount_fstype, run_cmd, strata_bin, CmdOutput, TestEnv};
use image_common::{busybox_rootfs, parse_diff_lines, tar_dir, Store};

const TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// The fixture: a store holding busybox:latest, cleaned up on drop.

/// The busybox rootfs the image is made of: image_common's tree plus every applet, a
/// passwd with nobody, a group file and the usual empty top-level directories.
fn build_busybox_tar(env: &TestEnv) -> (PathBuf, PathBuf) {
    let dir = env.dir("busybox-rootfs");
    busybox_rootfs(&dir);
    // The host's copy: exec of the fresh copy can fail with ETXTBSY while another test
    // thread forks with its write fd still open.
    let list = run_cmd(
        Command::new(if Path::new("/bin/busybox").exists() {
            "/bin/busybox"
        } else {
            "/usr/bin/busybox"
        })
        .arg("--list"),
        Duration::from_secs(30),
    );
    assert!(list.ok(), "busybox --list: {list}");
    for applet in list.stdout.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let l = dir.join("bin").join(applet);
        if fs::symlink_metadata(&l).is_err() {
            std::os::unix::fs::symlink("busybox", &l).unwrap();
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    for (d, mode) in [("proc", 0o755), ("sys", 0o755), ("dev", 0o755), ("root", 0o700)] {
        fs::create_dir_all(dir.join(d)).unwrap();
        fs::set_permissions(dir.join(d), fs::Permissions::from_mode(mode)).unwrap();
    }
    let tar = env.path().join("busybox.tar");
    tar_dir(&dir, &tar);
    fs::set_permissions(&tar, fs::Permissions::from_mode(0o644)).unwrap();
    (dir, tar)
}

struct Fixture {
    store: Store,
    /// The rootfs the image was imported from (to compare `ls /` with).
    rootfs: PathBuf,
    // Last: the temp dir goes after the cleanup in Drop.
    env: TestEnv,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        common::require_fuse();
        let env = TestEnv::new(&format!("ctr-{tag}"));
        let (rootfs, tar) = build_busybox_tar(&env);
        let store = Store::in_env(&env, "store");
        let fx = Fixture { store, rootfs, env };
        fx.ok(&[
            "import",
            &tar.display().to_string(),
            "busybox:latest",
            "-c",
            r#"CMD ["/bin/sh"]"#,
        ]);
        fx
    }

    fn strata(&self, args: &[&str]) -> CmdOutput {
        run_cmd(self.store.cmd().args(args), TIMEOUT)
    }

    fn ok(&self, args: &[&str]) -> CmdOutput {
        let out = self.strata(args);
        assert!(out.ok(), "`strata {}` failed: {out}", args.join(" "));
        out
    }

    /// `strata run --rm busybox sh -c SCRIPT` (plus `opts` before the image).
    fn sh(&self, opts: &[&str], script: &str) -> CmdOutput {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["busybox", "sh", "-c", script]);
        self.strata(&args)
    }

    fn sh_ok(&self, opts: &[&str], script: &str) -> String {
        let out = self.sh(opts, script);
        assert!(
            out.ok(),
            "`strata run --rm {} busybox sh -c {script:?}` failed: {out}",
            opts.join(" ")
        );
        out.stdout
    }

    fn containers_dir(&self) -> PathBuf {
        self.store.root.join("containers")
    }

    fn rootfs_of(&self, name: &str) -> PathBuf {
        self.containers_dir().join(name).join("rootfs")
    }

    /// `strata ps --format json`: name -> status.
    fn ps(&self) -> BTreeMap<String, String> {
        let out = self.ok(&["ps", "--format", "json"]);
        let v: Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("`strata ps --format json` printed invalid JSON ({e}): {out}"));
        v.as_array()
            .unwrap_or_else(|| panic!("`strata ps --format json` is not an array: {v}"))
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or_default().to_string(),
                    r["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// Mounts (as seen from the host) at or under the store.
    fn mounts_left(&self) -> Vec<String> {
        mounts_under(&self.store.root)
    }

    fn assert_clean(&self, ctx: &str) {
        let m = self.mounts_left();
        assert!(m.is_empty(), "{ctx}: mounts left under the store: {m:#?}");
        let p = processes_rooted_under(&self.store.root);
        assert!(p.is_empty(), "{ctx}: container processes left: {p:?}");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        cleanup_store(&self.store, &[runtime_dir_root()]);
    }
}

/// The root-owned pid-file directory of strata mounts.
fn runtime_dir_root() -> PathBuf {
    PathBuf::from("/run/strata")
}

/// Kill container processes, unmount container roots and remove containers of a store.
/// `pid_dirs`: where the daemons' pid files are (root: /run/strata).
fn cleanup_store(store: &Store, pid_dirs: &[PathBuf]) {
    let root = &store.root;
    // Processes whose root directory is inside the store: the commands of runs.
    for pid in processes_rooted_under(root) {
        // SAFETY: kill(2) of a container process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let names: Vec<String> = fs::read_dir(root.join("containers"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for name in &names {
        let rootfs = root.join("containers").join(name).join("rootfs");
        if mount_fstype(&rootfs).is_some() {
            let _ = run_cmd(store.cmd().args(["umount", name]), Duration::from_secs(30));
        }
    }
    for m in mounts_under(root).into_iter().rev() {
        let _ = run_cmd(Command::new("umount").arg("-l").arg(&m), Duration::from_secs(20));
        if mounts_under(Path::new(&m)).contains(&m) {
            let _ = run_cmd(
                Command::new("fusermount3").args(["-u", "-z"]).arg(&m),
                Duration::from_secs(20),
            );
        }
    }
    for (pid, _) in daemons_under(root, pid_dirs) {
        // SAFETY: kill(2) of a strata daemon serving this test's store.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for name in &names {
        let _ = run_cmd(store.cmd().args(["rm", "-f", name]), Duration::from_secs(30));
    }
    let left = mounts_under(root);
    if !left.is_empty() {
        eprintln!("WARNING: mounts left under {}: {left:?}", root.display());
    }
}

/// Mountpoints at or under `dir`, from /proc/self/mountinfo (innermost last).
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_octal)
        .filter(|m| m == &d || m.starts_with(&format!("{d}/")))
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
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

/// Pids of processes whose root directory (after pivot_root) is under `dir`.
fn processes_rooted_under(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(r) = fs::read_link(e.path().join("root")) {
            if r.starts_with(dir) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Live daemons (pid, mountpoint) from strata's pid files whose mountpoint is under `dir`.
/// A pid file holds: pid, mountpoint, upper, image (one a line).
fn daemons_under(dir: &Path, pid_dirs: &[PathBuf]) -> Vec<(i32, PathBuf)> {
    let mut out = Vec::new();
    for pd in pid_dirs {
        let Ok(rd) = fs::read_dir(pd) else { continue };
        for e in rd.flatten() {
            let Ok(s) = fs::read_to_string(e.path()) else {
                continue;
            };
            let mut l = s.lines();
            let Some(pid) = l.next().and_then(|p| p.trim().parse::<i32>().ok()) else {
                continue;
            };
            let mp = PathBuf::from(l.next().unwrap_or(""));
            if mp.starts_with(dir) && Path::new(&format!("/proc/{pid}")).exists() {
                out.push((pid, mp));
            }
        }
    }
    out
}

/// The daemon serving `rootfs`, waiting up to `wait` for its pid file.
fn daemon_of(rootfs: &Path, wait: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        let d = daemons_under(rootfs, &[runtime_dir_root()]);
        if let Some((pid, _)) = d.into_iter().find(|(_, m)| m == rootfs) {
            return Some(pid);
        }
        if start.elapsed() > wait {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A background process, killed (SIGTERM, then SIGKILL) on drop if still running.
struct Bg {
    child: Child,
    out: File,
    err: File,
}

impl Bg {
    fn spawn(cmd: &mut Command) -> Bg {
        let out = tempfile::tempfile().unwrap();
        let err = tempfile::tempfile().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(err.try_clone().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Bg { child, out, err }
    }

    /// Wait up to `t`; None on timeout (the process is left running).
    fn wait(&mut self, t: Duration) -> Option<Option<i32>> {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s.code());
            }
            if start.elapsed() > t {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&mut self) -> (String, String) {
        let read = |f: &mut File| {
            let mut s = String::new();
            let _ = std::io::Seek::rewind(f);
            let _ = f.read_to_string(&mut s);
            s
        };
        (read(&mut self.out), read(&mut self.err))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

// ---------------------------------------------------------------------------
// 1. strata run: isolation, exit codes, process options.

#[test]
fn run_sees_image_files_only() {
    let fx = Fixture::new("iso");
    // A host file the container must not see (/tmp of the host vs /tmp of the image).
    let marker = PathBuf::from(format!("/tmp/strata-ctr-host-marker-{}", std::process::id()));
    fs::write(&marker, "host\n").unwrap();
    struct RmOnDrop(PathBuf);
    impl Drop for RmOnDrop {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let _m = RmOnDrop(marker.clone());

    let out = fx.sh_ok(
        &[],
        &format!(
            "cat /etc/passwd; echo ---; if [ -e {m} ]; then echo HOST-VISIBLE; else echo host-absent; fi; \
             echo ---; ls -a /; echo ---; ls /tmp",
            m = marker.display()
        ),
    );
    let parts: Vec<&str> = out.split("---\n").collect();
    assert_eq!(parts.len(), 4, "unexpected output: {out:?}");
    assert!(
        parts[0].contains("root:x:0:0:root:/root:/bin/sh") && parts[0].contains("nobody:x:65534:65534"),
        "container /etc/passwd is not the image's: {:?}",
        parts[0]
    );
    assert_eq!(
        parts[1].trim(),
        "host-absent",
        "host file {} visible in the container",
        marker.display()
    );
    let seen: BTreeSet<String> = lines(parts[2])
        .into_iter()
        .filter(|n| *n != "." && *n != "..")
        .map(String::from)
        .collect();
    let want: BTreeSet<String> = fs::read_dir(&fx.rootfs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        seen, want,
        "`ls -a /` in the container is not the image's top level"
    );
    assert!(
        lines(parts[3]).is_empty(),
        "container /tmp is not the image's (empty) /tmp: {:?}",
        parts[3]
    );
    fx.assert_clean("after run --rm");
    assert!(fx.ps().is_empty(), "run --rm left a container: {:?}", fx.ps());
}

#[test]
fn run_pid_namespace() {
    let fx = Fixture::new("pid");
    let out = fx.sh_ok(&[], "echo $$; echo ---; ps -o pid,comm");
    let (pid, ps) = out
        .split_once("---\n")
        .unwrap_or_else(|| panic!("unexpected output {out:?}"));
    let pid: i32 = pid
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("echo $$ printed {pid:?}: {e}"));
    assert!(
        (1..=5).contains(&pid),
        "the command is pid {pid}: not in a new pid namespace"
    );
    let rows: Vec<&str> = lines(ps).into_iter().skip(1).collect();
    assert!(
        !rows.is_empty() && rows.len() <= 4,
        "ps in the container shows {} processes (expected a handful):\n{ps}",
        rows.len()
    );
    assert!(
        rows.iter().any(|r| r.split_whitespace().next() == Some("1")),
        "no pid 1 in the container's ps:\n{ps}"
    );
}

#[test]
fn run_hostname_and_hosts() {
    let fx = Fixture::new("uts");
    let name = format!("hn-{}", std::process::id());
    let script = "hostname; echo ---; cat /etc/hostname; echo ---; cat /etc/hosts";
    let out = fx.sh_ok(&["--name", &name], script);
    let p: Vec<&str> = out.split("---\n").collect();
    assert_eq!(p.len(), 3, "unexpected output {out:?}");
    assert_eq!(p[0].trim(), name, "hostname is not the container name");
    assert_eq!(p[1].trim(), name, "/etc/hostname is not the container name");
    assert!(
        p[2].contains(&name),
        "/etc/hosts does not name the host {name}: {:?}",
        p[2]
    );
    assert!(
        p[2].contains("localhost"),
        "/etc/hosts has no localhost: {:?}",
        p[2]
    );

    let out = fx.sh_ok(
        &["--name", &format!("{name}-b"), "--hostname", "custom-host"],
        script,
    );
    let p: Vec<&str> = out.split("---\n").collect();
    assert_eq!(p.len(), 3, "unexpected output {out:?}");
    assert_eq!(p[0].trim(), "custom-host", "--hostname not applied");
    assert_eq!(
        p[1].trim(),
        "custom-host",
        "/etc/hostname does not follow --hostname"
    );
    assert!(
        p[2].contains("custom-host"),
        "/etc/hosts does not name custom-host: {:?}",
        p[2]
    );

    // The host's hostname did not change.
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_ne!(host.trim(), "custom-host", "the host's hostname was changed");
    assert_ne!(host.trim(), name, "the host's hostname was changed");
}

/// Interface names from /proc/net/dev text.
fn ifaces(dev: &str) -> BTreeSet<String> {
    dev.lines()
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .filter(|n| !n.is_empty() && !n.contains('|'))
        .collect()
}

#[test]
fn run_network_none_and_host() {
    let fx = Fixture::new("net");
    let out = fx.sh_ok(&[], "cat /proc/net/dev; echo ---; ip -o link 2>&1 || true");
    let (dev, iplink) = out.split_once("---\n").unwrap();
    let want: BTreeSet<String> = ["lo".to_string()].into();
    assert_eq!(
        ifaces(dev),
        want,
        "network none: interfaces other than lo:\n{dev}"
    );
    assert!(
        iplink.contains("lo") && iplink.contains("UP"),
        "loopback is not up: {iplink}"
    );

    let out = fx.sh_ok(&["--network", "host"], "cat /proc/net/dev");
    let host = ifaces(&fs::read_to_string("/proc/net/dev").unwrap());
    assert_eq!(
        ifaces(&out),
        host,
        "--network host does not show the host's interfaces"
    );
}

#[test]
fn run_exit_codes() {
    let fx = Fixture::new("exit");
    let out = fx.sh(&[], "exit 7");
    assert_eq!(out.status, Some(7), "exit 7: {out}");
    let out = fx.sh(&[], "kill -TERM $$");
    assert_eq!(out.status, Some(128 + libc::SIGTERM), "killed by SIGTERM: {out}");

    let out = fx.strata(&["run", "--rm", "busybox", "no-such-command-xyz"]);
    assert_eq!(out.status, Some(127), "missing command: {out}");
    assert!(
        out.stderr
            .contains(r#"exec: "no-such-command-xyz": executable file not found in $PATH"#),
        "missing command message: {out}"
    );
    let out = fx.strata(&["run", "--rm", "busybox", "/no/such/path"]);
    assert_eq!(out.status, Some(127), "missing absolute command: {out}");

    // Not executable: a plain file.
    let out = fx.strata(&["run", "--rm", "busybox", "/etc/passwd"]);
    assert_eq!(out.status, Some(126), "non-executable command: {out}");
    assert!(
        out.stderr.contains("/etc/passwd"),
        "message does not name the command: {out}"
    );

    // A strata error (no such image) is 125.
    let out = fx.strata(&["run", "--rm", "no-such-image:latest", "true"]);
    assert_eq!(out.status, Some(125), "unknown image: {out}");

    fx.assert_clean("after failed runs");
    assert!(fx.ps().is_empty(), "--rm runs left containers: {:?}", fx.ps());
}

#[test]
fn run_env_workdir_user() {
    let fx = Fixture::new("opts");
    let out = fx.sh_ok(
        &["-e", "FOO=bar baz", "-e", "EMPTY=", "-w", "/usr/share"],
        "echo \"$FOO\"; echo \"[$EMPTY]\"; pwd; id -u; echo $HOSTNAME",
    );
    let l = lines(&out);
    assert_eq!(&l[..4], &["bar baz", "[]", "/usr/share", "0"], "output: {out:?}");

    let out = fx.sh_ok(
        &["-u", "nobody"],
        "id -u; id -g; touch /root/x 2>/dev/null && echo WROTE || echo denied",
    );
    assert_eq!(lines(&out), ["65534", "65534", "denied"], "-u nobody: {out:?}");
    let out = fx.sh_ok(&["-u", "1234:4321"], "id -u; id -g");
    assert_eq!(lines(&out), ["1234", "4321"], "-u 1234:4321: {out:?}");
    let out = fx.sh(&["-u", "no-such-user"], "true");
    assert!(!out.ok(), "-u no-such-user succeeded: {out}");
    assert!(
        out.stderr.contains("no-such-user"),
        "message does not name the user: {out}"
    );
    fx.assert_clean("after -u failure");
}

/// Docker creates a -w directory missing from the image; strata should too.
#[test]
fn run_workdir_missing_is_created() {
    let fx = Fixture::new("wdir");
    let out = fx.sh(&["-w", "/new/work/dir"], "pwd");
    assert!(
        out.ok() && out.stdout.trim() == "/new/work/dir",
        "-w to a directory missing from the image: {out}"
    );
    fx.assert_clean("after -w");
}

#[test]
fn run_volumes() {
    let fx = Fixture::new("vol");
    let host = fx.env.dir("vol-host");
    fs::write(host.join("in.txt"), "from host\n").unwrap();
    // /opt exists in the image, /opt/data does not.
    let rw = format!("{}:/opt/data", host.display());
    let out = fx.sh_ok(
        &["-v", &rw],
        "cat /opt/data/in.txt; echo from-ctr > /opt/data/out.txt",
    );
    assert_eq!(out.trim(), "from host");
    assert_eq!(
        fs::read_to_string(host.join("out.txt")).unwrap_or_default(),
        "from-ctr\n",
        "a write to a rw volume did not reach the host"
    );

    // A file volume over an existing image file.
    let f = fx.env.path().join("single-file");
    fs::write(&f, "one file\n").unwrap();
    let fv = format!("{}:/etc/hello", f.display());
    let out = fx.sh_ok(&["-v", &fv], "cat /etc/hello");
    assert_eq!(out.trim(), "one file");

    // Missing source: a clear error, nothing left behind, with and without --rm.
    for rm in [true, false] {
        let name = format!("vol-missing-{}-{rm}", std::process::id());
        let missing = format!("/nonexistent-strata-vol-{}", std::process::id());
        let mut args = vec!["run"];
        if rm {
            args.push("--rm");
        }
        let spec = format!("{missing}:/opt/data");
        args.extend_from_slice(&["--name", &name, "-v", &spec, "busybox", "true"]);
        let out = fx.strata(&args);
        assert!(!out.ok(), "run with a missing volume source succeeded: {out}");
        assert!(
            out.stderr.contains(&missing),
            "the error does not name the missing source: {out}"
        );
        fx.assert_clean("after a missing volume");
        assert!(
            !fx.ps().contains_key(&name),
            "run {} with a missing volume left container {name} behind: {:?}",
            if rm { "--rm" } else { "(no --rm)" },
            fx.ps()
        );
    }
}

#[test]
fn run_volume_read_only() {
    let fx = Fixture::new("volro");
    let host = fx.env.dir("vol-host");
    fs::write(host.join("in.txt"), "from host\n").unwrap();

    let ro = format!("{}:/opt/data:ro", host.display());
    let out = fx.sh(
        &["-v", &ro],
        "cat /opt/data/in.txt; echo x > /opt/data/ro-write.txt",
    );
    assert_ne!(out.status, Some(0), "writing to a :ro volume succeeded: {out}");
    assert!(
        out.stdout.contains("from host"),
        "a :ro volume is not readable: {out}"
    );
    assert!(
        out.stderr.to_lowercase().contains("read-only"),
        "writing to a :ro volume: expected a read-only error: {out}"
    );
    assert!(
        !host.join("ro-write.txt").exists(),
        "a write through a :ro volume reached the host"
    );
    fx.assert_clean("after a :ro volume");
}

/// Mount targets made for volumes (here /opt/data in the image's /opt, and a file
/// volume over /etc/hello) must not show up as changes of the container.
#[test]
fn run_volume_targets_leave_no_changes() {
    let fx = Fixture::new("voldiff");
    let host = fx.env.dir("vol-host");
    let rw = format!("{}:/opt/data", host.display());
    let f = fx.env.path().join("single-file");
    fs::write(&f, "one file\n").unwrap();
    let fv = format!("{}:/etc/hello", f.display());
    // Volume mount targets never show in the container's changes.
    let name = format!("vol-diff-{}", std::process::id());
    let out = fx.strata(&["run", "--name", &name, "-v", &rw, "-v", &fv, "busybox", "true"]);
    assert!(out.ok(), "run with volumes: {out}");
    let diff = fx.ok(&["diff", &name]);
    assert!(
        diff.stdout.trim().is_empty(),
        "volume stubs show in `strata diff`: {:?}",
        diff.stdout
    );
    fx.ok(&["rm", &name]);

    fx.assert_clean("after volumes");
}

/// Volume targets whose top-level directory is missing from the image (`/data`,
/// `/mnt/deep/f.txt`): the runtime creates the stubs, and removes them after.
#[test]
fn run_volume_new_top_level_target() {
    let fx = Fixture::new("vol2");
    let host = fx.env.dir("vol-host");
    fs::write(host.join("in.txt"), "from host\n").unwrap();
    let f = fx.env.path().join("single-file");
    fs::write(&f, "one file\n").unwrap();
    let dv = format!("{}:/data", host.display());
    let fv = format!("{}:/mnt/deep/f.txt", f.display());
    let name = format!("vol-top-{}", std::process::id());
    let out = fx.strata(&[
        "run",
        "--name",
        &name,
        "-v",
        &dv,
        "-v",
        &fv,
        "busybox",
        "sh",
        "-c",
        "cat /data/in.txt /mnt/deep/f.txt",
    ]);
    assert!(out.ok(), "volumes at /data and /mnt/deep/f.txt: {out}");
    assert_eq!(lines(&out.stdout), ["from host", "one file"]);
    let diff = fx.ok(&["diff", &name]);
    assert!(
        diff.stdout.trim().is_empty(),
        "volume stubs show in `strata diff`: {:?}",
        diff.stdout
    );
    fx.ok(&["rm", &name]);
    fx.assert_clean("after top-level volumes");
}

#[test]
fn run_devices_and_mounts() {
    let fx = Fixture::new("dev");
    let out = fx.sh_ok(
        &[],
        "for d in null zero full random urandom tty; do [ -c /dev/$d ] && echo $d; done; \
         [ -d /dev/pts ] && echo pts; [ -d /dev/shm ] && echo shm; \
         echo x > /dev/null && echo null-ok; head -c 4 /dev/zero | od -An -tx1; \
         touch /sys/x 2>/dev/null && echo SYS-WRITABLE || echo sys-ro; \
         grep -c . /proc/self/status >/dev/null && echo proc-ok; \
         [ -e /dev/console ] && echo CONSOLE || echo no-console",
    );
    let l = lines(&out);
    for want in [
        "null",
        "zero",
        "full",
        "random",
        "urandom",
        "tty",
        "pts",
        "shm",
        "null-ok",
        "00 00 00 00",
        "sys-ro",
        "proc-ok",
        "no-console",
    ] {
        assert!(
            l.contains(&want),
            "missing {want:?} in container device checks: {out:?}"
        );
    }
}

#[test]
fn run_wall_time_info() {
    let fx = Fixture::new("time");
    fx.ok(&["run", "--rm", "busybox", "true"]); // warm the unpacked layers
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let out = fx.strata(&["run", "--rm", "busybox", "true"]);
        times.push(t.elapsed());
        assert!(out.ok(), "run --rm busybox true: {out}");
    }
    times.sort();
    eprintln!(
        "INFO: `strata run --rm busybox true` wall time: median {:?} (all: {times:?})",
        times[2]
    );
}

// ---------------------------------------------------------------------------
// 2. Interactive: a real pseudo-terminal.

/// The test side of a pty with a child on the slave as its controlling terminal.
struct PtyChild {
    master: File,
    child: Child,
    /// Everything read so far that no expect() consumed.
    buf: Vec<u8>,
    /// Everything read, for error messages.
    transcript: Vec<u8>,
}

impl PtyChild {
    fn spawn(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> PtyChild {
        // SAFETY: plain libc pty calls; every return value is checked.
        let mfd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(mfd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        // SAFETY: mfd is a fresh fd we own.
        let master = unsafe { File::from_raw_fd(mfd) };
        // SAFETY: valid master fd.
        unsafe {
            assert_eq!(libc::grantpt(mfd), 0, "grantpt");
            assert_eq!(libc::unlockpt(mfd), 0, "unlockpt");
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: buffer of the given length.
        let r = unsafe { libc::ptsname_r(mfd, name.as_mut_ptr(), name.len()) };
        assert_eq!(r, 0, "ptsname_r");
        // SAFETY: ptsname_r wrote a NUL-terminated string.
        let sname = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&sname)
            .unwrap_or_else(|e| panic!("open {sname}: {e}"));
        let ws = libc::winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ with a valid winsize.
        unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        let child = {
            let mut cmd = Command::new(program);
            cmd.args(args)
                .stdin(Stdio::from(slave.try_clone().unwrap()))
                .stdout(Stdio::from(slave.try_clone().unwrap()))
                .stderr(Stdio::from(slave.try_clone().unwrap()));
            for (k, v) in envs {
                cmd.env(k, v);
            }
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {} in a pty: {e}", program.display()))
            // cmd (holding slave fds) dropped here
        };
        drop(slave);
        // SAFETY: fcntl on our fd.
        unsafe {
            let fl = libc::fcntl(mfd, libc::F_GETFL);
            libc::fcntl(mfd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        PtyChild {
            master,
            child,
            buf: Vec::new(),
            transcript: Vec::new(),
        }
    }

    fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.transcript).into_owned()
    }

    /// Read what is available, waiting up to `t` for something. false on EOF/EIO.
    fn fill(&mut self, t: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = t.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r <= 0 {
            return true;
        }
        let mut b = [0u8; 4096];
        match self.master.read(&mut b) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                self.transcript.extend_from_slice(&b[..n]);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(_) => false, // EIO: the slave side is closed
        }
    }

    /// Wait until `pat` appears in the output; consumes up to its end.
    fn expect(&mut self, pat: &str, t: Duration) -> Result<String, String> {
        let start = Instant::now();
        loop {
            if let Some(i) = find(&self.buf, pat.as_bytes()) {
                let end = i + pat.len();
                let got: Vec<u8> = self.buf.drain(..end).collect();
                return Ok(String::from_utf8_lossy(&got).into_owned());
            }
            let left = t.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "timed out after {t:?} waiting for {pat:?}; terminal transcript:\n{}",
                    self.transcript()
                ));
            }
            if !self.fill(left.min(Duration::from_millis(200))) && find(&self.buf, pat.as_bytes()).is_none() {
                return Err(format!(
                    "terminal closed while waiting for {pat:?}; transcript:\n{}",
                    self.transcript()
                ));
            }
        }
    }

    fn send(&mut self, s: &str) {
        self.master
            .write_all(s.as_bytes())
            .expect("write to the pty master");
    }

    /// Wait for the child to exit (draining the terminal meanwhile).
    fn wait(&mut self, t: Duration) -> Result<Option<i32>, String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Ok(s.code());
            }
            if start.elapsed() > t {
                return Err(format!(
                    "the process did not exit within {t:?}; transcript:\n{}",
                    self.transcript()
                ));
            }
            if !self.fill(Duration::from_millis(50)) {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for PtyChild {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn must<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

const PROMPT: &str = "ctr-ready> ";
const STEP: Duration = Duration::from_secs(30);

fn interactive_shell(fx: &Fixture, name: &str) -> PtyChild {
    let root = fx.store.root.display().to_string();
    let ps1 = format!("PS1={PROMPT}");
    PtyChild::spawn(
        &strata_bin(),
        &[
            "--root", &root, "run", "-it", "--rm", "--name", name, "-e", &ps1, "busybox", "sh",
        ],
        &[("TERM", "dumb")],
    )
}

#[test]
fn interactive_tty_echo_and_exit_code() {
    let fx = Fixture::new("tty");
    let name = format!("tty-{}", std::process::id());
    let mut p = interactive_shell(&fx, &name);
    must(p.expect(PROMPT, STEP));
    p.send("echo hello-$((6*7))\n");
    must(p.expect("hello-42", STEP));
    must(p.expect(PROMPT, STEP));
    p.send("tty; echo tty-done-$((1+1))\n");
    // Checked at the end, so the rest of the session is tested either way.
    let tty_out = must(p.expect("tty-done-2", STEP));
    must(p.expect(PROMPT, STEP));
    // stdin, stdout and stderr are all the terminal; /dev/console exists with -t.
    p.send("[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && [ -e /dev/console ] && echo all-$((2+2))\n");
    must(p.expect("all-4", STEP));
    must(p.expect(PROMPT, STEP));
    p.send("exit 5\n");
    let code = p.wait(STEP).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        code,
        Some(5),
        "exit 5 in the interactive shell; transcript:\n{}",
        p.transcript()
    );
    drop(p);
    fx.assert_clean("after the interactive run");
    assert!(!fx.ps().contains_key(&name), "--rm container left: {:?}", fx.ps());
    assert!(
        !tty_out.contains("not a tty"),
        "`tty` says not a tty: {tty_out:?}"
    );
    assert!(
        tty_out.contains("/dev/pts/"),
        "`tty` in `run -it` did not print /dev/pts/N (the command's terminal should be a pty of \
         the container's own devpts, as in docker): {tty_out:?}"
    );
}

#[test]
fn interactive_ctrl_c_reaches_foreground_job() {
    let fx = Fixture::new("ctrlc");
    let name = format!("ctrlc-{}", std::process::id());
    let mut p = interactive_shell(&fx, &name);
    if let Err(e) = p.expect(PROMPT, STEP) {
        panic!("no prompt: {e}");
    }
    p.send("sleep 100\n");
    // Let sleep start (and the shell hand it the terminal).
    thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    p.send("\x03");
    if let Err(e) = p.expect(PROMPT, Duration::from_secs(15)) {
        panic!("Ctrl-C did not interrupt `sleep 100`: {e}");
    }
    assert!(t.elapsed() < Duration::from_secs(15));
    p.send("echo af''ter\n");
    if let Err(e) = p.expect("after", STEP) {
        panic!("the shell did not survive Ctrl-C: {e}");
    }
    let r = p.expect(PROMPT, STEP);
    r.unwrap_or_else(|e| panic!("{e}"));
    p.send("exit\n");
    let code = p.wait(STEP).unwrap_or_else(|e| panic!("{e}"));
    // `exit` without a number: the status of the last command (echo: 0).
    assert_eq!(
        code,
        Some(0),
        "exit code after Ctrl-C; transcript:\n{}",
        p.transcript()
    );
    drop(p);
    fx.assert_clean("after the Ctrl-C run");
}

// ---------------------------------------------------------------------------
// 3. run -> diff -> commit -> history -> run.

const WORKFLOW: &str = "set -e; \
    echo new > /etc/newfile; \
    echo 'extra:x:1000:' >> /etc/group; \
    echo more-docs >> /usr/share/doc/README; \
    rm /etc/remove-me; \
    rm -r /opt/old; \
    echo added > /var/lib/app/new.txt; \
    mkdir -p /srv/data; echo x > /srv/data/x; \
    cat /etc/hostname > /dev/null";

fn layer_names(blob: &[u8]) -> Vec<String> {
    let data: Vec<u8> = if blob.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(blob)
            .read_to_end(&mut v)
            .expect("gunzip layer");
        v
    } else if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::decode_all(blob).expect("unzstd layer")
    } else {
        blob.to_vec()
    };
    let mut a = tar::Archive::new(&data[..]);
    a.entries()
        .expect("layer tar")
        .map(|e| {
            let e = e.expect("layer entry");
            image_common::norm_name(&String::from_utf8_lossy(&e.path_bytes()))
        })
        .collect()
}

fn is_runtime_path(p: &str) -> bool {
    let p = p.trim_start_matches('/');
    ["etc/hosts", "etc/hostname", "etc/resolv.conf"].contains(&p)
        || ["proc", "dev", "sys"]
            .iter()
            .any(|d| p == *d || p.starts_with(&format!("{d}/")))
}

#[test]
fn workflow_run_diff_commit_history() {
    let fx = Fixture::new("wf");
    let name = format!("wf-{}", std::process::id());

    // A run that changes nothing leaves no changes (no stubs of mount targets).
    let clean = format!("{name}-clean");
    fx.ok(&[
        "run",
        "--name",
        &clean,
        "busybox",
        "sh",
        "-c",
        "cat /etc/hosts /etc/resolv.conf >/dev/null",
    ]);
    let d = fx.ok(&["diff", &clean]);
    assert!(
        d.stdout.trim().is_empty(),
        "a run that changes nothing has a diff:\n{}",
        d.stdout
    );
    fx.ok(&["rm", &clean]);

    let out = fx.strata(&["run", "--name", &name, "busybox", "sh", "-c", WORKFLOW]);
    assert!(out.ok(), "workflow run: {out}");
    assert!(
        fx.ps().get(&name).is_some_and(|s| s == "not mounted"),
        "ps after the run: {:?}",
        fx.ps()
    );
    fx.assert_clean("after the named run");

    let diff = fx.ok(&["diff", &name]);
    let got = parse_diff_lines(&diff.stdout);
    let want: BTreeMap<String, String> = [
        ("/etc", "C"),
        ("/etc/newfile", "A"),
        ("/etc/group", "C"),
        ("/etc/remove-me", "D"),
        ("/usr", "C"),
        ("/usr/share", "C"),
        ("/usr/share/doc", "C"),
        ("/usr/share/doc/README", "C"),
        ("/opt", "C"),
        ("/opt/old", "D"),
        ("/var", "C"),
        ("/var/lib", "C"),
        ("/var/lib/app", "C"),
        ("/var/lib/app/new.txt", "A"),
        ("/srv", "A"),
        ("/srv/data", "A"),
        ("/srv/data/x", "A"),
    ]
    .into_iter()
    .map(|(p, k)| (p.to_string(), k.to_string()))
    .collect();
    let runtime: Vec<&String> = got.keys().filter(|p| is_runtime_path(p)).collect();
    assert!(
        runtime.is_empty(),
        "`strata diff` shows runtime paths {runtime:?}:\n{}",
        diff.stdout
    );
    assert_eq!(got, want, "`strata diff {name}`:\n{}", diff.stdout);

    fx.ok(&["commit", "-m", "workflow message", &name, "new:1"]);

    let hist = fx.ok(&["history", "--no-trunc", "new:1"]);
    assert!(
        hist.stdout.contains(WORKFLOW),
        "`history --no-trunc` does not show the full command:\n{}",
        hist.stdout
    );
    assert!(
        hist.stdout.contains("workflow message"),
        "history lacks the message:\n{}",
        hist.stdout
    );
    let hj = fx.ok(&["history", "--format", "json", "new:1"]);
    let hv: Value = serde_json::from_str(hj.stdout.trim()).expect("history json");
    let top = &hv[0];
    assert_eq!(
        top["created_by"].as_str(),
        Some(format!("sh -c {WORKFLOW}").as_str()),
        "created_by of the committed layer: {top}"
    );
    assert_eq!(
        top["comment"].as_str(),
        Some("workflow message"),
        "comment: {top}"
    );

    let out2 = fx.strata(&[
        "run",
        "--rm",
        "new:1",
        "sh",
        "-c",
        "cat /etc/newfile; tail -n1 /etc/group; tail -n1 /usr/share/doc/README; \
         [ -e /etc/remove-me ] && echo STILL || echo removed; \
         [ -e /opt/old ] && echo STILL || echo dir-removed; \
         cat /var/lib/app/new.txt /srv/data/x; cat /etc/hello",
    ]);
    assert!(out2.ok(), "run --rm new:1: {out2}");
    assert_eq!(
        lines(&out2.stdout),
        [
            "new",
            "extra:x:1000:",
            "more-docs",
            "removed",
            "dir-removed",
            "added",
            "x",
            "hello"
        ],
        "the committed image does not show the changes"
    );

    // The committed layer (from `strata save`) holds the changes and nothing injected.
    let save = fx.env.path().join("save.tar");
    fx.ok(&["save", "-o", &save.display().to_string(), "new:1"]);
    let manifest = image_common::tar_member(&save, "manifest.json").expect("manifest.json in the save");
    let m: Value = serde_json::from_slice(&manifest).expect("manifest.json");
    let layers = m[0]["Layers"].as_array().expect("Layers").clone();
    assert_eq!(layers.len(), 2, "new:1 should have 2 layers: {m}");
    let top_path = layers[1].as_str().unwrap();
    let blob = image_common::tar_member(&save, top_path).expect("top layer blob");
    let names = layer_names(&blob);
    let bad: Vec<&String> = names.iter().filter(|n| is_runtime_path(n)).collect();
    assert!(
        bad.is_empty(),
        "committed layer holds runtime files {bad:?}; all: {names:?}"
    );
    for want in [
        "etc/newfile",
        "etc/.wh.remove-me",
        "opt/.wh.old",
        "var/lib/app/new.txt",
        "srv/data/x",
        "usr/share/doc/README",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "committed layer lacks {want}: {names:?}"
        );
    }

    // The flattened image has no runtime files either.
    let export = fx.env.path().join("export.tar");
    fx.ok(&["export", "new:1", "-o", &export.display().to_string()]);
    let flat = image_common::tar_names(&export);
    let bad: Vec<&String> = flat
        .iter()
        .filter(|n| ["etc/hosts", "etc/hostname", "etc/resolv.conf"].contains(&n.as_str()))
        .collect();
    assert!(bad.is_empty(), "exported image holds runtime files {bad:?}");
    assert!(
        flat.iter().any(|n| n == "etc/newfile"),
        "export lacks etc/newfile"
    );
    assert!(
        !flat.iter().any(|n| n.starts_with("opt/old")),
        "export still has opt/old"
    );

    fx.ok(&["rm", &name]);
    assert!(!fx.ps().contains_key(&name), "container still listed after rm");
    assert!(
        !fx.containers_dir().join(&name).exists(),
        "container directory left after rm"
    );
    fx.assert_clean("after rm");
}

/// Directories renamed in a container (redirects in its upper) survive diff, commit,
/// save, load, export and run: OCI layers have no redirects, so the committed layer
/// deletes the old path and carries the whole directory at the new one.
#[test]
fn renamed_dirs_commit_save_load_run() {
    let fx = Fixture::new("rdir");
    let name = format!("rdir-{}", std::process::id());
    fx.ok(&[
        "run",
        "--name",
        &name,
        "busybox",
        "sh",
        "-c",
        "set -e; ln /var/lib/app/data /datalink; mv /var/lib /var/lib2; \
         echo n > /var/lib2/app/added; \
         mv /opt/old/sub /sub-moved; mv /usr/share/doc /doc; \
         mkdir /usr/share/doc; echo fresh > /usr/share/doc/new",
    ]);
    const CHECK: &str = "cat /doc/README /var/lib2/app/added; wc -c < /var/lib2/app/data; \
        ls /sub-moved; ls /usr/share/doc; ls /opt/old; \
        for p in /var/lib /opt/old/sub /usr/share/doc/README; do \
        [ -e $p ] && echo STILL $p || echo gone $p; done; \
        [ /datalink -ef /var/lib2/app/data ] && echo linked || echo NOT-LINKED";
    let want = [
        "docs",
        "n",
        "70000",
        "b",
        "new",
        "a",
        "gone /var/lib",
        "gone /opt/old/sub",
        "gone /usr/share/doc/README",
        // A hard link into the renamed directory stays one in the committed layer.
        "linked",
    ];

    let diff = fx.ok(&["diff", &name]);
    let got = parse_diff_lines(&diff.stdout);
    for (p, k) in [
        ("/var/lib", "D"),
        ("/var/lib2", "A"),
        ("/var/lib2/app", "A"),
        ("/var/lib2/app/data", "A"),
        ("/var/lib2/app/added", "A"),
        ("/doc/README", "A"),
        ("/usr/share/doc/README", "D"),
        ("/opt/old/sub", "D"),
        ("/sub-moved/b", "A"),
    ] {
        assert_eq!(
            got.get(p).map(String::as_str),
            Some(k),
            "{p} in `strata diff`:\n{}",
            diff.stdout
        );
    }

    fx.ok(&["commit", &name, "renamed:1"]);
    let save = fx.env.path().join("renamed.tar");
    fx.ok(&["save", "-o", &save.display().to_string(), "renamed:1"]);
    let manifest = image_common::tar_member(&save, "manifest.json").expect("manifest.json");
    let m: Value = serde_json::from_slice(&manifest).expect("manifest.json");
    let layers = m[0]["Layers"].as_array().expect("Layers").clone();
    let blob = image_common::tar_member(&save, layers.last().unwrap().as_str().unwrap()).expect("top layer");
    let names = layer_names(&blob);
    for want in [
        "var/.wh.lib",
        "var/lib2/.wh..wh..opq",
        "var/lib2/app/data",
        "var/lib2/app/added",
        "doc/.wh..wh..opq",
        "doc/README",
        "sub-moved/b",
        "opt/old/.wh.sub",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "committed layer lacks {want}: {names:?}"
        );
    }
    fx.ok(&["rm", &name]);
    fx.ok(&["rmi", "renamed:1"]);
    fx.ok(&["load", "-i", &save.display().to_string()]);
    let out = fx.strata(&["run", "--rm", "renamed:1", "sh", "-c", CHECK]);
    assert!(out.ok(), "run of the loaded image: {out}");
    assert_eq!(lines(&out.stdout), want, "the loaded image's tree");
    let export = fx.env.path().join("renamed-export.tar");
    fx.ok(&["export", "renamed:1", "-o", &export.display().to_string()]);
    let flat = image_common::tar_names(&export);
    assert!(flat.iter().any(|n| n == "var/lib2/app/data"), "{flat:?}");
    assert!(!flat.iter().any(|n| n.starts_with("var/lib/")), "{flat:?}");
    fx.ok(&["rmi", "renamed:1"]);
    fx.assert_clean("after the renamed-directories round trip");
}

#[test]
fn shell_in_existing_container() {
    let fx = Fixture::new("shell");
    let name = format!("sh-{}", std::process::id());
    fx.ok(&["create", "--name", &name, "busybox"]);
    assert_eq!(fx.ps().get(&name).map(String::as_str), Some("not mounted"));
    let out = fx.ok(&["shell", &name, "sh", "-c", "echo state > /root/f; hostname"]);
    assert_eq!(out.stdout.trim(), name);
    assert!(
        fx.mounts_left().is_empty(),
        "shell left its mount: {:?}",
        fx.mounts_left()
    );
    let d1 = fx.ok(&["diff", &name]).stdout;
    // Mounted beforehand: stays mounted after.
    let mp = fx.ok(&["mount", &name]);
    assert_eq!(
        Path::new(mp.stdout.trim()),
        fx.rootfs_of(&name),
        "mount printed {:?}",
        mp.stdout
    );
    let out = fx.ok(&["shell", &name, "cat", "/root/f"]);
    assert_eq!(out.stdout.trim(), "state");
    assert!(
        mount_fstype(&fx.rootfs_of(&name)).is_some(),
        "shell unmounted a container it did not mount"
    );
    assert_eq!(fx.ps().get(&name).map(String::as_str), Some("mounted"));
    let out = fx.strata(&["shell", &name, "sh", "-c", "exit 3"]);
    assert_eq!(out.status, Some(3), "shell exit code: {out}");
    fx.ok(&["umount", &name]);
    let d2 = fx.ok(&["diff", &name]).stdout;
    fx.ok(&["rm", &name]);
    fx.assert_clean("after shell");
    let want: BTreeMap<String, String> = [("/root", "C"), ("/root/f", "A")]
        .into_iter()
        .map(|(p, k)| (p.to_string(), k.to_string()))
        .collect();
    assert_eq!(
        parse_diff_lines(&d1),
        want,
        "diff after a shell that mounted the container itself:\n{d1}"
    );
    assert_eq!(
        parse_diff_lines(&d2),
        want,
        "diff after shells in a container mounted by `strata mount` (runtime mount stubs must not \
         leave traces):\n{d2}"
    );
}

// ---------------------------------------------------------------------------
// 4. Rootless.

#[test]
fn rootless_run() {
    common::require_fuse();
    assert!(
        run_cmd(
            Command::new("fusermount3").arg("--version"),
            Duration::from_secs(10)
        )
        .status
        .is_some(),
        "fusermount3 is not installed (scripts/install-deps installs fuse3)"
    );
    let env = TestEnv::new("ctr-rootless");
    let (_rootfs, tar) = build_busybox_tar(&env);
    let base = env.dir("user");
    let home = base.join("home");
    let user = common::TestUser::create(&home);
    let uid = user.uid;
    let gid = fs::metadata(&home).map(|m| m.gid()).unwrap_or(uid);
    let store_root = base.join("store");
    let tmp = base.join("tmp");
    let xdg_data = base.join("data");
    let xdg_run = base.join("run");
    for d in [&store_root, &tmp, &xdg_data, &xdg_run] {
        fs::create_dir_all(d).unwrap();
        common::lchown(d, uid, gid).unwrap();
    }
    common::lchown(&base, uid, gid).unwrap();
    fs::set_permissions(&xdg_run, fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        fs::metadata(&store_root).unwrap().uid(),
        uid,
        "the store must belong to the user"
    );

    let store = Store {
        root: store_root.clone(),
        tmp: tmp.clone(),
    };
    // Cleanup as root, before the user goes: kill, unmount, remove containers.
    struct Cleanup(Store, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            cleanup_store(&self.0, &[self.1.join("strata"), runtime_dir_root()]);
        }
    }
    let _cleanup = Cleanup(store.clone(), xdg_run.clone());

    let as_user = |args: &[&str]| -> CmdOutput {
        let mut c = Command::new("runuser");
        c.args(["-u", &user.name, "--", "/usr/bin/env", "-i"])
            .arg(format!("HOME={}", home.display()))
            .arg(format!("USER={}", user.name))
            .arg(format!("LOGNAME={}", user.name))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg(format!("XDG_DATA_HOME={}", xdg_data.display()))
            .arg(format!("XDG_RUNTIME_DIR={}", xdg_run.display()))
            .arg(format!("TMPDIR={}", tmp.display()))
            .arg(strata_bin())
            .arg("--root")
            .arg(&store_root)
            .args(args)
            .current_dir(&base);
        run_cmd(&mut c, TIMEOUT)
    };
    let who = run_cmd(
        Command::new("runuser").args(["-u", &user.name, "--", "/usr/bin/id", "-u"]),
        Duration::from_secs(10),
    );
    assert_eq!(
        who.stdout.trim(),
        uid.to_string(),
        "runuser does not switch user: {who}"
    );

    let out = as_user(&[
        "import",
        &tar.display().to_string(),
        "busybox:latest",
        "-c",
        r#"CMD ["/bin/sh"]"#,
    ]);
    assert!(
        out.ok(),
        "rootless `strata import` failed:\n  status: {:?}\n  stdout:\n{}\n  stderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let out = as_user(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "id -u; echo ok > /tmp/x; cat /tmp/x",
    ]);
    assert!(
        out.ok(),
        "rootless `strata run --rm busybox sh -c ...` failed:\n  status: {:?}\n  stdout:\n{}\n  stderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert_eq!(
        lines(&out.stdout),
        ["0", "ok"],
        "rootless run output; stderr:\n{}",
        out.stderr
    );
    // Several owners inside (the user's /etc/subuid range, through newuidmap): kept by a
    // commit, and on the host they are the range's IDs, as with podman.
    let sub = fs::read_to_string("/etc/subuid").unwrap_or_default();
    let (start, count): (u32, u32) = sub
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() == 3 && f[0] == user.name).then(|| (f[1].parse().unwrap(), f[2].parse().unwrap()))
        })
        .unwrap_or_else(|| panic!("useradd gave {} no /etc/subuid range:\n{sub}", user.name));
    let owners = "chown 1000:1000 /f1000 && chown 65534:65534 /f65534 && ls -n /f1000 /f65534";
    let out = as_user(&[
        "run",
        "--name",
        "owners",
        "busybox",
        "sh",
        "-c",
        &format!("touch /f1000 /f65534 && {owners}"),
    ]);
    assert!(out.ok(), "rootless chown in a container: {out}");
    let l = lines(&out.stdout);
    assert!(l[0].contains(" 1000 ") && l[1].contains(" 65534 "), "{out}");
    let out = as_user(&["commit", "owners", "owners:1"]);
    assert!(out.ok(), "rootless commit: {out}");
    let out = as_user(&["run", "--rm", "owners:1", "sh", "-c", "ls -n /f1000 /f65534"]);
    let l = lines(&out.stdout);
    assert!(
        out.ok() && l[0].contains(" 1000 ") && l[1].contains(" 65534 "),
        "{out}"
    );
    assert!(as_user(&["rm", "owners"]).ok());
    // Nothing in the store belongs to root: the user, or IDs of its range.
    let mut seen_sub = false;
    let mut stack = vec![store_root.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let md = fs::symlink_metadata(e.path()).unwrap();
            let ok = md.uid() == uid || (md.uid() >= start && md.uid() - start < count);
            assert!(
                ok,
                "{} in the rootless store belongs to {}",
                e.path().display(),
                md.uid()
            );
            if e.file_name() == "f1000" {
                assert_eq!(md.uid(), start + 999, "{}", e.path().display());
                seen_sub = true;
            }
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    assert!(seen_sub, "the committed layer's f1000 was not found in the store");
    let m = mounts_under(&store_root);
    assert!(m.is_empty(), "rootless run left mounts: {m:?}");
    let ps = as_user(&["ps", "--format", "json"]);
    assert!(ps.ok(), "rootless ps: {ps}");
    assert_eq!(
        ps.stdout
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim(),
        "",
        "ps: {ps}"
    );
}

// ---------------------------------------------------------------------------
// 5. The filesystem daemon dies.

fn assert_daemon_death_reported(ctx: &str, stderr: &str) {
    let s = stderr.to_lowercase();
    assert!(
        s.contains("transport endpoint is not connected") || s.contains("daemon died"),
        "{ctx}: stderr does not report the filesystem daemon's death:\n{stderr}"
    );
}

#[test]
fn daemon_death_during_run() {
    let fx = Fixture::new("death");
    let name = format!("dd-{}", std::process::id());
    let rootfs = fx.rootfs_of(&name);
    let mut bg =
        Bg::spawn(
            fx.store
                .cmd()
                .args(["run", "--name", &name, "busybox", "sh", "-c", "sleep 3; ls /"]),
        );
    let daemon = daemon_of(&rootfs, Duration::from_secs(30));
    let Some(daemon) = daemon else {
        let st = bg.wait(Duration::from_secs(1));
        let (o, e) = bg.output();
        panic!(
            "no daemon pid file for {} (run status {st:?}, stdout {o:?}, stderr {e:?})",
            rootfs.display()
        );
    };
    // Let the command start, then kill the daemon.
    thread::sleep(Duration::from_millis(800));
    // SAFETY: kill(2) of the strata daemon of this test's container.
    assert_eq!(
        unsafe { libc::kill(daemon, libc::SIGKILL) },
        0,
        "kill daemon {daemon}"
    );
    let status = bg.wait(Duration::from_secs(60));
    let (out, err) = bg.output();
    let Some(status) = status else {
        panic!("`strata run` did not end within 60s after its daemon died (stdout {out:?}, stderr {err:?})");
    };
    eprintln!("run after daemon death: status {status:?}\nstdout: {out}\nstderr: {err}");
    assert_ne!(status, Some(0), "run succeeded although its daemon died");
    let ps = fx.ps();
    let st = ps.get(&name).cloned().unwrap_or_default();
    assert!(
        st.starts_with("broken") || st == "not mounted",
        "ps status after the daemon died: {st:?} ({ps:?})"
    );
    let um = fx.strata(&["umount", &name]);
    let rm = fx.strata(&["rm", "-f", &name]);
    assert!(rm.ok(), "rm -f after the daemon died: {rm} (umount: {um})");
    assert!(mount_fstype(&rootfs).is_none(), "mount left after umount/rm -f");
    fx.assert_clean("after daemon death");
    // Last, so the cleanup checks above run even when this fails.
    assert_daemon_death_reported(&format!("run (status {status:?})"), &err);
}

#[test]
fn daemon_death_while_mounted() {
    let fx = Fixture::new("death2");
    let name = format!("dm-{}", std::process::id());
    let rootfs = fx.rootfs_of(&name);
    fx.ok(&["create", "--name", &name, "busybox"]);
    fx.ok(&["mount", &name]);
    let daemon = daemon_of(&rootfs, Duration::from_secs(10)).expect("daemon pid file");
    // SAFETY: kill(2) of the strata daemon of this test's container.
    unsafe { libc::kill(daemon, libc::SIGKILL) };
    thread::sleep(Duration::from_millis(300));
    let st = fx.ps().get(&name).cloned().unwrap_or_default();
    assert!(st.starts_with("broken"), "ps status with a dead daemon: {st:?}");
    let sh = fx.strata(&["shell", &name, "true"]);
    assert!(
        !sh.ok(),
        "shell in a container with a dead daemon succeeded: {sh}"
    );
    assert_daemon_death_reported("shell", &sh.stderr);
    let rm = fx.strata(&["rm", &name]);
    assert!(!rm.ok(), "rm without -f of a broken container succeeded: {rm}");
    let um = fx.strata(&["umount", &name]);
    assert!(um.ok(), "umount of a container with a dead daemon: {um}");
    assert!(mount_fstype(&rootfs).is_none(), "still mounted after umount");
    assert_eq!(fx.ps().get(&name).map(String::as_str), Some("not mounted"));
    // It can be used again.
    let out = fx.ok(&["shell", &name, "echo", "alive"]);
    assert_eq!(out.stdout.trim(), "alive");
    fx.ok(&["rm", &name]);
    fx.assert_clean("after a dead daemon");
}

// ---------------------------------------------------------------------------
// 6. rm and rmi refusals.

#[test]
fn rm_and_rmi_refuse_in_use() {
    let fx = Fixture::new("rm");
    let name = format!("rm-{}", std::process::id());
    let out = fx.ok(&["create", "--name", &name, "busybox"]);
    assert_eq!(out.stdout.trim(), name, "create prints the name");
    let dup = fx.strata(&["create", "--name", &name, "busybox"]);
    assert!(!dup.ok(), "a second container with the same name: {dup}");
    let gen = fx.ok(&["create", "busybox"]);
    let gen_name = gen.stdout.trim().to_string();
    assert!(
        fx.ps().contains_key(&gen_name),
        "generated name {gen_name:?} not in ps"
    );
    fx.ok(&["rm", &gen_name]);

    fx.ok(&["mount", &name]);
    assert!(mount_fstype(&fx.rootfs_of(&name)).is_some());
    let rm = fx.strata(&["rm", &name]);
    assert!(!rm.ok(), "rm of a mounted container succeeded: {rm}");
    assert!(rm.stderr.contains("mounted"), "rm refusal message: {rm}");
    assert!(fx.ps().contains_key(&name), "rm without -f removed it anyway");
    assert!(
        mount_fstype(&fx.rootfs_of(&name)).is_some(),
        "rm without -f unmounted it"
    );

    let rmi = fx.strata(&["rmi", "busybox"]);
    assert!(
        !rmi.ok(),
        "rmi of an image a mounted container uses succeeded: {rmi}"
    );
    assert!(
        rmi.stderr.contains(&name),
        "rmi refusal does not name the container: {rmi}"
    );
    fx.ok(&["umount", &name]);
    let rmi = fx.strata(&["rmi", "busybox"]);
    assert!(!rmi.ok(), "rmi of an image a container uses succeeded: {rmi}");
    assert!(
        rmi.stderr.contains(&name),
        "rmi refusal does not name the container: {rmi}"
    );
    fx.ok(&["inspect", "busybox"]);

    fx.ok(&["mount", &name]);
    fx.ok(&["rm", "-f", &name]);
    assert!(
        mount_fstype(&fx.rootfs_of(&name)).is_none(),
        "rm -f left the mount"
    );
    assert!(!fx.ps().contains_key(&name));
    fx.ok(&["rmi", "busybox"]);
    fx.assert_clean("after rm/rmi");
}

/// A container's root keeps only docker's default capabilities: no mount, no module loading.
#[test]
fn run_capabilities_are_restricted() {
    let fx = Fixture::new("caps");
    let out = fx.sh_ok(
        &[],
        "grep CapBnd /proc/self/status; mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED || echo refused",
    );
    assert!(
        out.contains("00000000a80425fb"),
        "bounding set is not docker's default set:\n{out}"
    );
    assert!(
        out.contains("refused") && !out.contains("MOUNTED"),
        "mount was allowed in the container:\n{out}"
    );
}

/// The host is out of reach from a rootful container: kernel tunables in /proc are
/// read-only, host-state files are masked, device nodes cannot be opened, SIGPIPE and the
/// umask are the caller's defaults, not strata's.
#[test]
fn run_hardening() {
    let fx = Fixture::new("harden");
    let out = fx.sh_ok(
        &[],
        "echo '|/x' > /proc/sys/kernel/core_pattern 2>/dev/null && echo CORE-WRITTEN || echo core-refused; \
         echo s > /proc/sysrq-trigger 2>/dev/null && echo SYSRQ || echo sysrq-refused; \
         head -c 16 /proc/kcore 2>/dev/null | wc -c; \
         mknod /tmp/disk b 8 0 && (head -c 1 /tmp/disk >/dev/null 2>&1 && echo DEVICE-READ || echo device-refused); \
         yes | head -n 1; umask",
    );
    assert!(
        out.contains("core-refused") && !out.contains("CORE-WRITTEN"),
        "{out}"
    );
    assert!(out.contains("sysrq-refused") && !out.contains("SYSRQ\n"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "0"),
        "/proc/kcore is readable:\n{out}"
    );
    assert!(
        out.contains("device-refused") && !out.contains("DEVICE-READ"),
        "{out}"
    );
    assert!(out.lines().any(|l| l == "y"), "yes | head failed:\n{out}");
    let umask = out.lines().last().unwrap_or("");
    assert_ne!(umask, "0000", "the container inherited strata's umask 0:\n{out}");
}

/// An image whose /etc/hosts is a dangling symlink to a host path: the mount-point stub is
/// created inside the container root, nothing appears on the host.
#[test]
fn dangling_symlink_mount_target_stays_inside() {
    let fx = Fixture::new("dangling");
    let host_target = format!("/etc/strata-test-dangling-{}", std::process::id());
    let rootfs = fx.env.dir("dangling-rootfs");
    let out = run_cmd(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", fx.rootfs.display()))
            .arg(&rootfs),
        TIMEOUT,
    );
    assert!(out.ok(), "{out}");
    let _ = fs::remove_file(rootfs.join("etc/hosts"));
    std::os::unix::fs::symlink(&host_target, rootfs.join("etc/hosts")).unwrap();
    let tar = fx.env.path().join("dangling.tar");
    tar_dir(&rootfs, &tar);
    fx.ok(&["import", &tar.display().to_string(), "dangling:1"]);
    let run = fx.strata(&["run", "--rm", "dangling:1", "cat", "/etc/hosts"]);
    let on_host = Path::new(&host_target).exists();
    if on_host {
        let _ = fs::remove_file(&host_target);
    }
    assert!(
        !on_host,
        "strata created {host_target} on the host through the image's symlink"
    );
    assert!(run.ok(), "{run}");
    assert!(run.stdout.contains("localhost"), "{run}");
}

/// The default seccomp filter (docker's default profile): no new namespaces, no mounts, no
/// key rings; `--security-opt seccomp=unconfined` lifts it (an unprivileged user namespace
/// then works), `no-new-privileges` sets the flag; an unknown option or a profile file is
/// refused before anything runs.
#[test]
fn run_seccomp_and_no_new_privileges() {
    let fx = Fixture::new("seccomp");
    // /proc/1/environ and /proc/1/root need ptrace access to the init (the kernel's
    // ptrace_may_access, as PTRACE_ATTACH does): refused, since the init keeps capabilities
    // the command does not have.
    let script = "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; \
                  unshare -U true 2>/dev/null && echo userns-ok || echo userns-denied; \
                  mount -t tmpfs t /mnt 2>/dev/null && echo MOUNTED || echo mount-denied; \
                  cat /proc/1/environ >/dev/null 2>&1 && echo INIT-READ || echo init-protected; \
                  ls /proc/1/root/ >/dev/null 2>&1 && echo INIT-ROOT || echo init-root-protected";
    let o = fx.sh_ok(&[], script);
    let l = lines(&o);
    for want in [
        "Seccomp:\t2",
        "NoNewPrivs:\t0",
        "userns-denied",
        "mount-denied",
        "init-protected",
        "init-root-protected",
    ] {
        assert!(l.contains(&want), "default: missing {want:?} in {l:?}");
    }
    let o = fx.sh_ok(&["--security-opt", "seccomp=unconfined"], script);
    let l = lines(&o);
    for want in ["Seccomp:\t0", "userns-ok", "mount-denied"] {
        assert!(l.contains(&want), "seccomp=unconfined: missing {want:?} in {l:?}");
    }
    let o = fx.sh_ok(&["--security-opt", "no-new-privileges"], script);
    let l = lines(&o);
    assert!(l.contains(&"NoNewPrivs:\t1"), "no-new-privileges: {l:?}");
    // A docker profile file: everything allowed but mkdir (EACCES, its errnoRet) and the
    // chmod calls (the action's default errno, EPERM); unshare -U works again.
    let prof = fx.env.path().join("profile.json");
    fs::write(
        &prof,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13},
            {"names":["chmod","fchmod","fchmodat","fchmodat2"],"action":"SCMP_ACT_ERRNO"},
            {"names":["no_such_call"],"action":"SCMP_ACT_KILL"}]}"#,
    )
    .unwrap();
    let o = fx.sh_ok(
        &["--security-opt", &format!("seccomp={}", prof.display())],
        "grep '^Seccomp:' /proc/self/status; mkdir /tmp/d 2>&1; chmod 600 /etc/hello 2>&1; \
         unshare -U true 2>/dev/null && echo userns-ok; echo done",
    );
    let l = lines(&o);
    assert!(l.contains(&"Seccomp:\t2"), "profile: {l:?}");
    assert!(
        l.iter().any(|x| x.contains("Permission denied")),
        "mkdir under the profile: {l:?}"
    );
    assert!(
        l.iter().any(|x| x.contains("Operation not permitted")),
        "chmod under the profile: {l:?}"
    );
    assert!(l.contains(&"userns-ok") && l.contains(&"done"), "profile: {l:?}");
    let badprof = fx.env.path().join("bad-profile.json");
    fs::write(&badprof, r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#).unwrap();
    let out = fx.sh(
        &["--security-opt", &format!("seccomp={}", badprof.display())],
        "echo RAN",
    );
    assert!(
        !out.ok() && !out.stdout.contains("RAN") && out.stderr.contains("bad-profile.json"),
        "a bad profile must be refused naming the file: {out}"
    );
    for bad in ["seccomp=/nonexistent.json", "apparmor=x"] {
        let out = fx.sh(&["--security-opt", bad], "echo RAN");
        assert!(
            !out.ok() && !out.stdout.contains("RAN"),
            "--security-opt {bad}: {out}"
        );
        assert!(
            out.stderr.contains(bad),
            "--security-opt {bad}: the error should name it: {out}"
        );
    }
    fx.assert_clean("after the seccomp runs");
}

/// `--cap-drop`/`--cap-add` change docker's default set (the inheritable set is empty),
/// `--privileged` keeps every capability the host has and no seccomp filter, and
/// `--read-only` makes the root read-only while /dev and /etc/hostname still work.
#[test]
fn run_capabilities_privileged_and_read_only() {
    let fx = Fixture::new("caps");
    let eff = |opts: &[&str]| -> u64 {
        let out = fx.sh_ok(opts, "grep CapEff /proc/self/status");
        let hex = out.split_whitespace().last().unwrap_or("0").to_string();
        u64::from_str_radix(&hex, 16).unwrap()
    };
    let default = eff(&[]);
    assert_eq!(default, 0xa80425fb, "docker's default set");
    assert_eq!(
        eff(&["--cap-drop", "ALL", "--cap-add", "CAP_CHOWN"]),
        1,
        "ALL dropped, CHOWN added"
    );
    assert_eq!(
        eff(&["--cap-drop", "net_raw"]),
        default & !(1 << 13),
        "NET_RAW dropped"
    );
    assert_eq!(
        eff(&["--cap-add", "SYS_ADMIN"]),
        default | (1 << 21),
        "SYS_ADMIN added"
    );
    let out = fx.sh_ok(&[], "grep CapInh /proc/self/status");
    assert!(out.contains("0000000000000000"), "inheritable set: {out}");
    // Without CHOWN, root cannot give a file away.
    let out = fx.sh_ok(
        &["--cap-drop", "CHOWN"],
        "touch /tmp/f; chown 5 /tmp/f 2>/dev/null && echo CHOWNED || echo no-chown",
    );
    assert!(out.contains("no-chown"), "{out}");
    let out = fx.sh_ok(
        &["--privileged"],
        "grep -E '^(CapEff|Seccomp):' /proc/self/status",
    );
    let host: String = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("CapBnd"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_string();
    assert!(
        out.contains(&host) && out.contains("Seccomp:\t0"),
        "--privileged: {out} (host bounding set {host})"
    );
    let out = fx.sh_ok(
        &["--read-only"],
        "touch /x 2>/dev/null && echo WROTE || echo ro; echo y > /dev/null && echo dev-ok; cat /etc/hostname >/dev/null && echo etc-ok",
    );
    let l = lines(&out);
    for want in ["ro", "dev-ok", "etc-ok"] {
        assert!(l.contains(&want), "--read-only: missing {want:?} in {l:?}");
    }
    let out = fx.sh(&["--cap-add", "BOGUS"], "echo RAN");
    assert!(
        !out.ok() && out.stderr.contains("BOGUS"),
        "unknown capability: {out}"
    );
    fx.assert_clean("after the capability runs");
}

/// A read-only volume is read-only all the way down: a mount inside its host directory is
/// read-only in the container too (mount_setattr with AT_RECURSIVE).
#[test]
fn read_only_volume_is_recursive() {
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let fx = Fixture::new("rovol");
    let host = fx.env.dir("vol");
    fs::create_dir_all(host.join("sub")).unwrap();
    let st = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "strata-test",
            &host.join("sub").display().to_string(),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs for the test");
    let _guard = Unmount(host.join("sub"));
    let v = format!("{}:/v:ro", host.display());
    let out = fx.sh_ok(
        &["-v", &v],
        "touch /v/a 2>/dev/null && echo TOP-WRITTEN || echo top-ro; \
         touch /v/sub/b 2>/dev/null && echo SUB-WRITTEN || echo sub-ro",
    );
    let l = lines(&out);
    assert!(
        l.contains(&"top-ro") && l.contains(&"sub-ro"),
        "read-only volume: {l:?}"
    );
    assert!(!host.join("sub/b").exists(), "the write reached the submount");
    let v = format!("{}:/v", host.display());
    let out = fx.sh_ok(&["-v", &v], "touch /v/sub/b && echo rw-ok");
    assert!(out.contains("rw-ok"), "read-write volume: {out}");
    assert!(host.join("sub/b").exists());
    fx.assert_clean("after the volume runs");
}

/// `--pids-limit`, `--memory` and `--cpus` go through cgroups (v1 or v2, whichever the
/// machine has): the limits bite inside, nothing is limited outside, and the groups are
/// gone after the run.
#[test]
fn run_resource_limits() {
    let fx = Fixture::new("limits");
    // Groups named strata-*, wherever the hierarchy (v2 or a v1 controller) keeps them.
    let groups = || -> Vec<String> {
        let mut v = Vec::new();
        for base in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/cpu",
        ] {
            for e in fs::read_dir(base).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with("strata-") {
                    v.push(e.path().display().to_string());
                }
            }
        }
        v.sort();
        v
    };
    let before = groups();
    let out = fx.sh(
        &["--pids-limit", "6"],
        "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 3 & done; echo forked-all",
    );
    assert!(
        out.stderr.contains("can't fork") || out.stdout.contains("can't fork"),
        "--pids-limit 6: ten background processes should not all start: {out}"
    );
    let out = fx.sh(
        &["--memory", "32m"],
        "dd if=/dev/zero of=/dev/null bs=64M count=1 && echo COPIED; echo after",
    );
    assert!(
        !out.stdout.contains("COPIED") && out.stdout.contains("after"),
        "--memory 32m: a 64 MiB buffer should be refused or killed: {out}"
    );
    let out = fx.sh_ok(
        &["--memory", "32m"],
        "dd if=/dev/zero of=/dev/null bs=8M count=1 2>/dev/null && echo small-ok",
    );
    assert!(out.contains("small-ok"), "--memory 32m: an 8 MiB buffer: {out}");
    let out = fx.sh_ok(&["--cpus", "0.5"], "cat /proc/self/cgroup");
    assert!(
        out.contains("strata-"),
        "--cpus: the command is not in a strata group: {out}"
    );
    for bad in [
        &["--memory", "lots"][..],
        &["--pids-limit", "0"],
        &["--cpus", "0"],
    ] {
        let out = fx.sh(bad, "echo RAN");
        assert!(!out.ok() && !out.stdout.contains("RAN"), "{bad:?}: {out}");
    }
    assert_eq!(groups(), before, "cgroups left behind");
    fx.assert_clean("after the limited runs");
}
