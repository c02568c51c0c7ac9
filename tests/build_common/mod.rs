//! Helpers of the `strata build` tests (tests/build.rs): a store holding a runnable busybox
//! image, build contexts, the parsed output of a build (steps, CACHED markers, image id),
//! the built image as an extracted tree plus its config, the same build done by a
//! private dockerd with BuildKit for the differential test, an unprivileged user for
//! rootless builds and a small HTTP file server for ADD of a URL.
//!
//! Test crates using it declare `mod common;`, `mod image_common;` and `mod build_common;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::common::{self, run_cmd, CmdOutput, Entry, Kind, Layer, Snapshot, TestEnv};
use crate::image_common::{busybox_rootfs, run_with_stdin, tar_dir, tree, Dockerd, Store, CMD_TIMEOUT};

/// Builds can run several containers: more room than one CLI call.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------
// The base image.

/// The busybox rootfs of the base image (as tests/container.rs makes it): image_common's
/// tree (a hard link, an xattr, a file owned by 1000, /tmp 1777) plus every applet, a
/// passwd with nobody, a group file with nogroup and the usual top-level directories.
/// Returns the tar of it.
pub fn busybox_tar(env: &TestEnv) -> PathBuf {
    let dir = env.dir("busybox-rootfs");
    busybox_rootfs(&dir);
    // List applets with the host's binary: exec of the fresh copy can hit ETXTBSY while
    // another test thread forks with its write fd still open.
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox not installed: run scripts/install-deps");
    let list = run_cmd(Command::new(bb).arg("--list"), Duration::from_secs(30));
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
    tar
}

// ---------------------------------------------------------------------------
// Cleanup: what a build must not leave behind, and what Drop removes if it does.

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

/// Mountpoints at or under `dir` (innermost last).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = s(dir);
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_octal)
        .filter(|m| m == &d || m.starts_with(&format!("{d}/")))
        .collect()
}

/// Processes whose root directory (after pivot_root) is under `dir`: container commands.
pub fn processes_rooted_under(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
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

/// strata processes (mount daemons) whose command line names a path under `dir`.
pub fn strata_processes_under(dir: &Path) -> Vec<i32> {
    let want = s(dir);
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(c) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = c
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_strata = args.first().map(|a| a.ends_with("strata")).unwrap_or(false);
        if is_strata && args.iter().any(|a| a.contains(&want)) {
            pids.push(pid);
        }
    }
    pids
}

/// Entries of a directory (empty when it does not exist).
pub fn dir_entries(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// The fixture.

/// A temp store holding `busybox:latest` (imported with `CMD ["/bin/sh"]`, as
/// tests/container.rs does). Drop kills leftover container processes and unmounts
/// whatever a build left under the test's directory.
pub struct BuildFx {
    pub store: Store,
    pub busybox_tar: PathBuf,
    /// Last: the temp dir goes after the cleanup in Drop.
    pub env: TestEnv,
}

impl BuildFx {
    pub fn new(tag: &str) -> BuildFx {
        common::require_fuse();
        let env = TestEnv::new(&format!("build-{tag}"));
        let busybox_tar = busybox_tar(&env);
        let store = Store::in_env(&env, "store");
        let fx = BuildFx {
            store,
            busybox_tar,
            env,
        };
        fx.store.ok(&[
            "import",
            &s(&fx.busybox_tar),
            "busybox:latest",
            "-c",
            r#"CMD ["/bin/sh"]"#,
        ]);
        fx
    }

    /// A fresh, empty build context directory.
    pub fn ctx(&self, name: &str) -> Layer {
        let root = self.env.fresh_dir(&format!("ctx-{name}-"));
        Layer { root }
    }

    /// `strata build ARGS CONTEXT` (CONTEXT last, as docker takes it).
    pub fn build(&self, ctx: &Path, args: &[&str]) -> CmdOutput {
        self.build_env(ctx, args, &[])
    }

    pub fn build_env(&self, ctx: &Path, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
        let mut c = self.store.cmd();
        c.arg("build").args(args).arg(ctx);
        for (k, v) in env {
            c.env(k, v);
        }
        run_cmd(&mut c, BUILD_TIMEOUT)
    }

    /// `strata build ARGS LAST < stdin_file` (LAST is the context dir or `-`).
    pub fn build_stdin(&self, args: &[&str], last: &str, stdin_file: &Path) -> CmdOutput {
        let mut c = self.store.cmd();
        c.arg("build").args(args).arg(last);
        run_with_stdin(&mut c, stdin_file, BUILD_TIMEOUT)
    }

    /// A build that must succeed: its parsed output.
    pub fn build_ok(&self, ctx: &Path, args: &[&str]) -> BuildOut {
        self.build_ok_env(ctx, args, &[])
    }

    pub fn build_ok_env(&self, ctx: &Path, args: &[&str], env: &[(&str, &str)]) -> BuildOut {
        let out = self.build_env(ctx, args, env);
        assert!(
            out.ok(),
            "`strata build {} {}` failed:\n--- stdout ---\n{}\n--- stderr ---\n{}",
            args.join(" "),
            ctx.display(),
            out.stdout,
            out.stderr
        );
        BuildOut::parse(out)
    }

    /// A build that must fail: the output, after checking it exited non-zero, left no
    /// mount or container process, and tagged nothing (`tag`, when given, must not resolve).
    pub fn build_fails(&self, ctx: &Path, args: &[&str], tag: Option<&str>) -> CmdOutput {
        let out = self.build(ctx, args);
        self.check_failed(
            &out,
            &format!("strata build {} {}", args.join(" "), ctx.display()),
            tag,
        );
        out
    }

    pub fn check_failed(&self, out: &CmdOutput, what: &str, tag: Option<&str>) {
        assert!(
            !out.timed_out,
            "`{what}` timed out after {BUILD_TIMEOUT:?}: {out}"
        );
        assert!(
            out.status.is_some() && out.status != Some(0),
            "`{what}` should have failed: {out}"
        );
        if let Some(t) = tag {
            self.assert_no_image(t);
        }
        self.assert_clean(what);
    }

    pub fn assert_no_image(&self, name: &str) {
        let r = self.store.run(&["inspect", name]);
        assert!(
            !r.ok(),
            "image {name} exists after a failed build (nothing should be tagged): {}",
            r.stdout.chars().take(400).collect::<String>()
        );
    }

    /// No mount, container process or mount daemon left under the test dir, no container
    /// left in the store, and strata's temp dirs empty.
    pub fn assert_clean(&self, ctx: &str) {
        let m = mounts_under(self.env.path());
        assert!(m.is_empty(), "{ctx}: mounts left behind: {m:#?}");
        let p = processes_rooted_under(self.env.path());
        assert!(p.is_empty(), "{ctx}: container processes left behind: {p:?}");
        let d = strata_processes_under(self.env.path());
        assert!(
            d.is_empty(),
            "{ctx}: strata processes (daemons) left behind: {d:?}"
        );
        let c = dir_entries(&self.store.root.join("containers"));
        assert!(
            c.is_empty(),
            "{ctx}: containers left in the store: {c:?} (`strata ps`: {})",
            self.store.run(&["ps"]).stdout.trim()
        );
        let t = dir_entries(&self.store.tmp);
        assert!(t.is_empty(), "{ctx}: files left in strata's TMPDIR: {t:?}");
        let t = dir_entries(&self.store.root.join("tmp"));
        assert!(t.is_empty(), "{ctx}: files left in the store's tmp/: {t:?}");
    }

    /// The image `name` of this store, exported and inspected.
    pub fn built(&self, name: &str) -> Built {
        Built::of(&self.store, name, &self.env.fresh_dir("export-"), "strata")
    }

    /// `strata run --rm ARGS...`, stdout (panics on failure).
    pub fn run_ok(&self, args: &[&str]) -> String {
        let mut a = vec!["run", "--rm"];
        a.extend_from_slice(args);
        let out = run_cmd(self.store.cmd().args(&a), CMD_TIMEOUT);
        assert!(out.ok(), "`strata {}` failed: {out}", a.join(" "));
        out.stdout
    }

    /// Names of blobs and unpacked layers in the store.
    pub fn store_objects(&self) -> BTreeSet<String> {
        let mut v = BTreeSet::new();
        for sub in ["blobs/sha256", "layers"] {
            for n in dir_entries(&self.store.root.join(sub)) {
                v.insert(format!("{sub}/{n}"));
            }
        }
        v
    }
}

impl Drop for BuildFx {
    fn drop(&mut self) {
        let root = self.env.path().to_path_buf();
        for pid in processes_rooted_under(&root) {
            // SAFETY: kill(2) of a container process a build of this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for m in mounts_under(&root).into_iter().rev() {
            let _ = run_cmd(Command::new("umount").arg("-l").arg(&m), Duration::from_secs(20));
            if mounts_under(Path::new(&m)).contains(&m) {
                let _ = run_cmd(
                    Command::new("fusermount3").args(["-u", "-z"]).arg(&m),
                    Duration::from_secs(20),
                );
            }
        }
        for pid in strata_processes_under(&root) {
            // SAFETY: kill(2) of a strata daemon serving this test's files.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

// ---------------------------------------------------------------------------
// Build output.

#[derive(Debug, Clone)]
pub struct Step {
    pub n: usize,
    pub total: usize,
    /// The instruction as printed after `STEP i/n: `.
    pub text: String,
    /// The lines printed between this step line and the next.
    pub body: Vec<String>,
}

impl Step {
    pub fn cached(&self) -> bool {
        self.body.iter().any(|l| l.trim() == "--> CACHED")
    }

    pub fn is_from(&self) -> bool {
        self.text.trim_start().to_ascii_uppercase().starts_with("FROM ")
    }

    pub fn keyword(&self) -> String {
        self.text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase()
    }
}

pub struct BuildOut {
    pub out: CmdOutput,
    pub steps: Vec<Step>,
    /// The last stdout line: `sha256:<64 hex>`.
    pub id: String,
}

pub fn is_image_id(s: &str) -> bool {
    s.len() == 71
        && s.starts_with("sha256:")
        && s[7..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn parse_steps(stdout: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("STEP ") {
            if let Some((frac, text)) = rest.split_once(": ") {
                if let Some((n, total)) = frac.split_once('/') {
                    if let (Ok(n), Ok(total)) = (n.parse(), total.parse()) {
                        steps.push(Step {
                            n,
                            total,
                            text: text.to_string(),
                            body: Vec::new(),
                        });
                        continue;
                    }
                }
            }
        }
        if let Some(s) = steps.last_mut() {
            s.body.push(line.to_string());
        }
    }
    steps
}

impl BuildOut {
    pub fn parse(out: CmdOutput) -> BuildOut {
        let last = out
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .trim()
            .to_string();
        assert!(
            is_image_id(&last),
            "the last stdout line of a build should be the image id sha256:<64 hex>, got {last:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.stdout,
            out.stderr
        );
        let steps = parse_steps(&out.stdout);
        BuildOut { out, steps, id: last }
    }

    pub fn step(&self, n: usize) -> &Step {
        self.steps
            .iter()
            .find(|s| s.n == n)
            .unwrap_or_else(|| panic!("no `STEP {n}/..` line in:\n{}", self.out.stdout))
    }

    /// Step numbers printed with `--> CACHED`.
    pub fn cached(&self) -> Vec<usize> {
        self.steps.iter().filter(|s| s.cached()).map(|s| s.n).collect()
    }

    /// Every step but FROM is CACHED.
    pub fn assert_all_cached(&self, ctx: &str) {
        assert!(
            !self.steps.is_empty(),
            "{ctx}: no STEP lines in:\n{}",
            self.out.stdout
        );
        let not: Vec<String> = self
            .steps
            .iter()
            .filter(|s| !s.is_from() && !s.cached())
            .map(|s| format!("STEP {}/{}: {}", s.n, s.total, s.text))
            .collect();
        assert!(
            not.is_empty(),
            "{ctx}: steps not reused from the cache: {not:#?}\n--- stdout ---\n{}",
            self.out.stdout
        );
    }

    /// Exactly the steps `want` (by number, FROM steps ignored) are CACHED.
    pub fn assert_cached_exactly(&self, want: &[usize], ctx: &str) {
        let got: Vec<usize> = self
            .steps
            .iter()
            .filter(|s| !s.is_from() && s.cached())
            .map(|s| s.n)
            .collect();
        assert_eq!(
            got, want,
            "{ctx}: CACHED steps\n--- stdout ---\n{}",
            self.out.stdout
        );
    }
}

// ---------------------------------------------------------------------------
// A built image: its exported tree and its config.

pub struct Built {
    /// "strata" or "docker": who built it (for messages).
    pub who: String,
    pub name: String,
    pub id: String,
    pub root: PathBuf,
    pub tree: Snapshot,
    /// The image config JSON (config, history, rootfs, ...).
    pub config: Value,
}

impl Built {
    /// Export `name` of `store` into `dir` (extracted) and read its config.
    pub fn of(store: &Store, name: &str, dir: &Path, who: &str) -> Built {
        let tar = dir.with_extension("tar");
        let root = dir.join("rootfs");
        store.export_tree(name, &tar, &root);
        let _ = fs::remove_file(&tar);
        let insp = store.inspect(name);
        let id = crate::image_common::inspect_id(&insp);
        let config = crate::image_common::inspect_config(&insp);
        Built {
            who: who.to_string(),
            name: name.to_string(),
            id,
            tree: tree(&root),
            root,
            config,
        }
    }

    fn ctx(&self, p: &str) -> String {
        format!(
            "{} image {} ({}): /{}",
            self.who,
            self.name,
            self.root.display(),
            p
        )
    }

    pub fn get(&self, p: &str) -> Option<&Entry> {
        self.tree.get(Path::new(p.trim_start_matches('/')))
    }

    pub fn entry(&self, p: &str) -> &Entry {
        self.get(p).unwrap_or_else(|| {
            let parent = Path::new(p.trim_start_matches('/'))
                .parent()
                .map(|x| x.display().to_string())
                .unwrap_or_default();
            panic!(
                "{}: missing; entries under /{parent}: {:?}",
                self.ctx(p),
                self.names_under(&parent)
            )
        })
    }

    pub fn exists(&self, p: &str) -> bool {
        self.get(p).is_some()
    }

    pub fn assert_absent(&self, p: &str) {
        if let Some(e) = self.get(p) {
            panic!("{}: should not exist, found {e}", self.ctx(p));
        }
    }

    /// Content of a regular file.
    pub fn read(&self, p: &str) -> String {
        let e = self.entry(p);
        assert_eq!(e.kind, Kind::File, "{}: not a regular file: {e}", self.ctx(p));
        fs::read_to_string(self.root.join(p.trim_start_matches('/')))
            .unwrap_or_else(|err| panic!("{}: read: {err}", self.ctx(p)))
    }

    pub fn assert_file(&self, p: &str, content: &str, mode: u32, owner: (u32, u32)) {
        let e = self.entry(p).clone();
        assert_eq!(e.kind, Kind::File, "{}: not a regular file: {e}", self.ctx(p));
        assert_eq!(self.read(p), content, "{}: content", self.ctx(p));
        assert_eq!(
            e.mode,
            mode,
            "{}: mode {:04o}, want {mode:04o}",
            self.ctx(p),
            e.mode
        );
        assert_eq!((e.uid, e.gid), owner, "{}: owner", self.ctx(p));
    }

    pub fn assert_dir(&self, p: &str, mode: u32, owner: (u32, u32)) {
        let e = self.entry(p).clone();
        assert_eq!(e.kind, Kind::Dir, "{}: not a directory: {e}", self.ctx(p));
        assert_eq!(
            e.mode,
            mode,
            "{}: mode {:04o}, want {mode:04o}",
            self.ctx(p),
            e.mode
        );
        assert_eq!((e.uid, e.gid), owner, "{}: owner", self.ctx(p));
    }

    pub fn assert_symlink(&self, p: &str, target: &str) {
        let e = self.entry(p).clone();
        assert_eq!(e.kind, Kind::Symlink, "{}: not a symlink: {e}", self.ctx(p));
        assert_eq!(e.target.as_deref(), Some(target), "{}: link target", self.ctx(p));
    }

    /// Paths (relative to `dir`) of everything under `dir`, recursively, sorted.
    pub fn names_under(&self, dir: &str) -> Vec<String> {
        let d = Path::new(dir.trim_start_matches('/'));
        self.tree
            .keys()
            .filter(|k| d.as_os_str().is_empty() || (k.starts_with(d) && *k != d))
            .map(|k| k.strip_prefix(d).unwrap_or(k).display().to_string())
            .collect()
    }

    pub fn assert_names_under(&self, dir: &str, want: &[&str]) {
        let mut w: Vec<String> = want.iter().map(|x| x.to_string()).collect();
        w.sort();
        assert_eq!(self.names_under(dir), w, "{}: entries", self.ctx(dir));
    }

    /// `config.<key>` of the image config (Null when absent).
    pub fn cfg(&self, key: &str) -> Value {
        self.config
            .get("config")
            .and_then(|c| c.get(key))
            .cloned()
            .unwrap_or(Value::Null)
    }

    pub fn env(&self) -> BTreeMap<String, String> {
        self.cfg("Env")
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (k.to_string(), v.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn assert_env(&self, key: &str, value: &str) {
        assert_eq!(
            self.env().get(key).map(String::as_str),
            Some(value),
            "{} image {}: Env {key} (Env = {})",
            self.who,
            self.name,
            self.cfg("Env")
        );
    }

    pub fn assert_cfg(&self, key: &str, want: Value) {
        assert_eq!(
            norm(&self.cfg(key)),
            norm(&want),
            "{} image {}: config {key} (config = {})",
            self.who,
            self.name,
            self.config.get("config").cloned().unwrap_or(Value::Null)
        );
    }

    pub fn diff_ids(&self) -> Vec<String> {
        self.config
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    }

    pub fn history(&self) -> Vec<Value> {
        self.config
            .get("history")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    pub fn nonempty_history(&self) -> usize {
        self.history()
            .iter()
            .filter(|h| !h.get("empty_layer").and_then(Value::as_bool).unwrap_or(false))
            .count()
    }

    /// Layers on top of the busybox base (which has one).
    pub fn new_layers(&self) -> usize {
        self.diff_ids().len().saturating_sub(1)
    }
}

/// Config values that mean "nothing" compare equal: null, "", [], {}.
pub fn norm(v: &Value) -> Value {
    match v {
        Value::String(s) if s.is_empty() => Value::Null,
        Value::Array(a) if a.is_empty() => Value::Null,
        Value::Object(o) if o.is_empty() => Value::Null,
        v => v.clone(),
    }
}

// ---------------------------------------------------------------------------
// docker build (BuildKit) in a private dockerd.

/// A private dockerd with the fixture's busybox loaded (`strata save` -> `docker load`).
///
/// Offline behaviour of dockerd 20.10 (Debian) with BuildKit: `FROM busybox` resolves
/// docker.io/library/busybox:latest in the daemon's own image store without a network
/// lookup, so the loaded base is used as is. RUN needs `--network none`: the private
/// daemon runs with `--bridge=none` and BuildKit's default network fails with "network
/// bridge not found". `# syntax=` cannot be resolved offline and the built-in Dockerfile
/// frontend of 20.10 has no heredocs, so heredoc cases are not compared.
pub struct DockerBuilder {
    pub dk: Dockerd,
}

impl DockerBuilder {
    pub fn start(fx: &BuildFx) -> Option<DockerBuilder> {
        let dk = crate::image_common::docker_or_skip()?;
        let save = fx.env.path().join("busybox-save.tar");
        fx.store.ok(&["save", "-o", &s(&save), "busybox:latest"]);
        let out = dk.ok(&["load", "-i", &s(&save)]);
        assert!(
            out.stdout.contains("busybox:latest"),
            "docker load of strata's busybox save: {out}"
        );
        Some(DockerBuilder { dk })
    }

    /// `DOCKER_BUILDKIT=1 docker build --network none -t TAG ARGS CONTEXT`.
    pub fn build(&self, ctx: &Path, tag: &str, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
        let mut c = self.dk.cmd();
        c.env("DOCKER_BUILDKIT", "1")
            .env("BUILDKIT_PROGRESS", "plain")
            .args(["build", "--network", "none", "-t", tag])
            .args(args)
            .arg(ctx);
        for (k, v) in env {
            c.env(k, v);
        }
        run_cmd(&mut c, BUILD_TIMEOUT)
    }

    pub fn build_ok(&self, ctx: &Path, tag: &str, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
        let out = self.build(ctx, tag, args, env);
        assert!(
            out.ok(),
            "`docker build -t {tag} {} {}` failed:\n{}\n{}",
            args.join(" "),
            ctx.display(),
            out.stdout,
            out.stderr
        );
        out
    }

    /// `docker save TAG` loaded into a fresh strata store under `env`, exported and inspected.
    pub fn built(&self, env: &TestEnv, tag: &str, name: &str) -> Built {
        let save = env.path().join(format!("docker-{name}.tar"));
        self.dk.ok(&["save", "-o", &s(&save), tag]);
        let st = Store::in_env(env, &format!("docker-{name}"));
        st.ok(&["load", "-i", &s(&save)]);
        let img = st.only_image();
        Built::of(
            &st,
            &img,
            &env.fresh_dir(&format!("docker-export-{name}-")),
            "docker",
        )
    }
}

/// Paths that exist only because of how a builder runs commands (bind-mounted files, the
/// docker marker). They are skipped by the comparison when they differ, and reported.
pub const RUNTIME_PATHS: &[&str] = &["etc/hosts", "etc/resolv.conf", "etc/hostname", ".dockerenv"];

/// Config keys the differential compares.
pub const COMPARED_CONFIG: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "StopSignal",
    "Healthcheck",
    "Shell",
    "OnBuild",
];

/// Differences between a strata-built and a docker-built image: trees (names, types,
/// modes, owners, sizes, content, link targets, xattrs), the compared config keys and the
/// number of layers. Returns (differences, runtime paths skipped).
pub fn compare_images(ours: &Built, theirs: &Built) -> (Vec<String>, Vec<String>) {
    let mut diffs = Vec::new();
    let mut skipped = Vec::new();
    let filt = |t: &Snapshot, other: &Snapshot, skipped: &mut Vec<String>| -> Snapshot {
        t.iter()
            .filter(|(p, e)| {
                let runtime = RUNTIME_PATHS.iter().any(|r| p.starts_with(r));
                if runtime && other.get(*p) != Some(*e) {
                    skipped.push(format!("/{}", p.display()));
                    return false;
                }
                true
            })
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    };
    let a = filt(&ours.tree, &theirs.tree, &mut skipped);
    let b = filt(&theirs.tree, &ours.tree, &mut skipped);
    diffs.extend(common::diff_snapshots(&a, &b, "strata", "docker"));
    for k in COMPARED_CONFIG {
        let (mut x, mut y) = (norm(&ours.cfg(k)), norm(&theirs.cfg(k)));
        if *k == "WorkingDir" {
            // "/" and "" both mean the root.
            for v in [&mut x, &mut y] {
                if *v == Value::String("/".into()) {
                    *v = Value::Null;
                }
            }
        }
        if x != y {
            diffs.push(format!("config {k}: strata {x} vs docker {y}"));
        }
    }
    let (lo, lt) = (ours.diff_ids().len(), theirs.diff_ids().len());
    if lo != lt {
        diffs.push(format!(
            "layers: strata {lo} vs docker {lt}; history strata {:?} vs docker {:?}",
            history_lines(ours),
            history_lines(theirs)
        ));
    }
    for b in [ours, theirs] {
        if b.nonempty_history() != b.diff_ids().len() {
            diffs.push(format!(
                "{}: {} non-empty history entries but {} layers: {:?}",
                b.who,
                b.nonempty_history(),
                b.diff_ids().len(),
                history_lines(b)
            ));
        }
    }
    skipped.sort();
    skipped.dedup();
    (diffs, skipped)
}

pub fn history_lines(b: &Built) -> Vec<String> {
    b.history()
        .iter()
        .map(|h| {
            format!(
                "{}{}",
                if h.get("empty_layer").and_then(Value::as_bool).unwrap_or(false) {
                    "(empty) "
                } else {
                    ""
                },
                h.get("created_by").and_then(Value::as_str).unwrap_or("")
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Another store: builds and images outside the fixture's store.

/// `strata build ARGS CONTEXT` in `store`, with `env` set and the proxy variables removed
/// (ADD of a URL and pulls go to loopback servers of the test).
pub fn build_in(store: &Store, ctx: &Path, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
    let mut c = store.cmd();
    c.arg("build").args(args).arg(ctx);
    for v in PROXY_VARS {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    run_cmd(&mut c, BUILD_TIMEOUT)
}

/// A build in `store` that must succeed: its parsed output.
pub fn build_ok_in(store: &Store, ctx: &Path, args: &[&str], env: &[(&str, &str)]) -> BuildOut {
    let out = build_in(store, ctx, args, env);
    assert!(
        out.ok(),
        "`strata --root {} build {} {}` failed:\n--- stdout ---\n{}\n--- stderr ---\n{}",
        store.root.display(),
        args.join(" "),
        ctx.display(),
        out.stdout,
        out.stderr
    );
    BuildOut::parse(out)
}

pub const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

// ---------------------------------------------------------------------------
// Rootless: an unprivileged user created by the test (as tests/container.rs does).

/// A throwaway user with its own HOME, XDG_DATA_HOME, XDG_RUNTIME_DIR, TMPDIR and store,
/// all under `base` (owned by the user). strata runs as that user through `runuser` with a
/// clean environment and `--root STORE`. Drop unmounts what the user left mounted, kills
/// the user's processes and deletes the user.
pub struct RootlessUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub base: PathBuf,
    pub home: PathBuf,
    pub xdg_data: PathBuf,
    pub xdg_run: PathBuf,
    /// The user's store (root `base/store`, TMPDIR `base/tmp`).
    pub store: Store,
}

impl RootlessUser {
    /// Needs root (useradd), fusermount3 and a /dev/fuse the user may open.
    pub fn create(env: &TestEnv) -> RootlessUser {
        common::require_fuse();
        let mode = fs::metadata("/dev/fuse")
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        assert!(
            mode & 0o006 == 0o006,
            "/dev/fuse is mode {:o}: an unprivileged user cannot open it (scripts/install-deps makes it 0666)",
            mode & 0o777
        );
        let fm = run_cmd(
            Command::new("fusermount3").arg("--version"),
            Duration::from_secs(10),
        );
        assert!(
            fm.status.is_some(),
            "fusermount3 is not installed (scripts/install-deps installs fuse3): {fm}"
        );
        let base = env.dir("rootless");
        let home = base.join("home");
        let name = format!("strata-bld-{}", std::process::id());
        let out = run_cmd(
            Command::new("useradd")
                .args(["-m", "-d"])
                .arg(&home)
                .args(["-s", "/bin/sh", &name]),
            Duration::from_secs(60),
        );
        assert!(out.ok(), "useradd {name}: {out}");
        let id = run_cmd(Command::new("id").args(["-u", &name]), Duration::from_secs(10));
        let uid: u32 = id
            .stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("id -u {name}: {id}"));
        let gid = fs::metadata(&home).map(|m| m.gid()).unwrap_or(uid);
        let u = RootlessUser {
            name,
            uid,
            gid,
            xdg_data: base.join("data"),
            xdg_run: base.join("run"),
            store: Store {
                root: base.join("store"),
                tmp: base.join("tmp"),
            },
            home,
            base,
        };
        for d in [&u.store.root, &u.store.tmp, &u.xdg_data, &u.xdg_run] {
            fs::create_dir_all(d).unwrap();
            common::lchown(d, uid, gid).unwrap();
        }
        common::lchown(&u.base, uid, gid).unwrap();
        fs::set_permissions(&u.xdg_run, fs::Permissions::from_mode(0o700)).unwrap();
        let who = run_cmd(
            Command::new("runuser").args(["-u", &u.name, "--", "/usr/bin/id", "-u"]),
            Duration::from_secs(10),
        );
        assert_eq!(
            who.stdout.trim(),
            uid.to_string(),
            "runuser does not switch user: {who}"
        );
        u
    }

    /// `strata --root STORE ARGS...` as the user.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", &self.name, "--", "/usr/bin/env", "-i"])
            .arg(format!("HOME={}", self.home.display()))
            .arg(format!("USER={}", self.name))
            .arg(format!("LOGNAME={}", self.name))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg(format!("XDG_DATA_HOME={}", self.xdg_data.display()))
            .arg(format!("XDG_RUNTIME_DIR={}", self.xdg_run.display()))
            .arg(format!("TMPDIR={}", self.store.tmp.display()))
            .arg(common::strata_bin())
            .arg("--root")
            .arg(&self.store.root)
            .args(args)
            .current_dir(&self.base);
        c
    }

    pub fn run(&self, args: &[&str]) -> CmdOutput {
        run_cmd(&mut self.cmd(args), BUILD_TIMEOUT)
    }

    /// Run as the user; panics with the whole output unless it exits 0.
    pub fn ok(&self, args: &[&str]) -> CmdOutput {
        let out = self.run(args);
        assert!(
            out.ok(),
            "rootless `strata {}` failed:\n  status: {:?}\n  stdout:\n{}\n  stderr:\n{}",
            args.join(" "),
            out.status,
            out.stdout,
            out.stderr
        );
        out
    }

    /// Give `dir` and everything under it to the user (a context the user owns).
    pub fn chown_tree(&self, dir: &Path) {
        common::lchown(dir, self.uid, self.gid).unwrap();
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                self.chown_tree(&p);
            } else {
                common::lchown(&p, self.uid, self.gid).unwrap();
            }
        }
    }

    /// What a rootless build must not leave behind: mounts, container processes or strata
    /// daemons under the user's directories, containers, build scratch or temp files.
    pub fn assert_clean(&self, ctx: &str) {
        let m = mounts_under(&self.base);
        assert!(m.is_empty(), "{ctx}: mounts left behind: {m:#?}");
        let p = processes_rooted_under(&self.base);
        assert!(p.is_empty(), "{ctx}: container processes left behind: {p:?}");
        let d = strata_processes_under(&self.base);
        assert!(
            d.is_empty(),
            "{ctx}: strata processes (daemons) left behind: {d:?}"
        );
        for sub in ["containers", "build", "tmp"] {
            let e = dir_entries(&self.store.root.join(sub));
            assert!(e.is_empty(), "{ctx}: left in the user's store {sub}/: {e:?}");
        }
        let t = dir_entries(&self.store.tmp);
        assert!(t.is_empty(), "{ctx}: files left in the user's TMPDIR: {t:?}");
    }

    /// Paths under the store not owned by the user.
    /// Files in the store owned by anyone but the user and its /etc/subuid range (which
    /// the owners of a rootless container's files map to, as with podman).
    pub fn foreign_files_in_store(&self) -> Vec<String> {
        let sub = fs::read_to_string("/etc/subuid").unwrap_or_default();
        let range = sub.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() == 3 && f[0] == self.name).then(|| (f[1].parse::<u32>().ok(), f[2].parse::<u32>().ok()))
        });
        let in_range = |u: u32| match range {
            Some((Some(s), Some(n))) => u >= s && u - s < n,
            _ => false,
        };
        let mut bad = Vec::new();
        let mut stack = vec![self.store.root.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let Ok(md) = fs::symlink_metadata(e.path()) else {
                    continue;
                };
                if md.uid() != self.uid && !in_range(md.uid()) {
                    bad.push(format!("{} (uid {})", e.path().display(), md.uid()));
                }
                if md.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        bad.sort();
        bad
    }
}

impl Drop for RootlessUser {
    fn drop(&mut self) {
        // Unmount first (the user's daemons still serve), then kill every process of this
        // throwaway user: all of them were started by this test.
        for m in mounts_under(&self.base).into_iter().rev() {
            let _ = run_cmd(Command::new("umount").arg("-l").arg(&m), Duration::from_secs(20));
        }
        common::kill_user_processes(self.uid);
        let out = run_cmd(
            Command::new("userdel").args(["-r", &self.name]),
            Duration::from_secs(60),
        );
        if run_cmd(Command::new("id").arg(&self.name), Duration::from_secs(10)).ok() {
            eprintln!("WARNING: could not delete user {}: {out}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------
// A tiny HTTP server for ADD of a URL.

/// An HTTP/1.0-style file server on 127.0.0.1:free-port: GET (and HEAD) of `/NAME`
/// answers 200 with the file's bytes, anything else 404; every response closes the
/// connection. Files can be changed while it runs. Stopped (and its thread joined) on drop.
pub struct FileServer {
    addr: std::net::SocketAddr,
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// Request lines received ("GET /file.txt"), in order.
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileServer {
    pub fn start(files: &[(&str, &[u8])]) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let files = Arc::new(Mutex::new(
            files
                .iter()
                .map(|(n, d)| (n.trim_start_matches('/').to_string(), d.to_vec()))
                .collect::<BTreeMap<_, _>>(),
        ));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, l, st) = (files.clone(), log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    let _ = serve_one(c, &f, &l);
                }
            }
        });
        FileServer {
            addr,
            files,
            log,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT/NAME`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{}", self.addr, name.trim_start_matches('/'))
    }

    pub fn set(&self, name: &str, data: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(name.trim_start_matches('/').to_string(), data.to_vec());
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn serve_one(
    mut c: TcpStream,
    files: &Mutex<BTreeMap<String, Vec<u8>>>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    c.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(c.try_clone()?);
    let mut first = String::new();
    r.read_line(&mut first)?;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    log.lock().unwrap().push(format!("{method} {target}"));
    let path = target
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_start_matches('/');
    let body = files.lock().unwrap().get(path).cloned();
    let (status, body) = match (method, body) {
        ("GET" | "HEAD", Some(b)) => ("200 OK", b),
        _ => ("404 Not Found", b"not found\n".to_vec()),
    };
    write!(
        c,
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        c.write_all(&body)?;
    }
    c.flush()?;
    let _ = c.shutdown(std::net::Shutdown::Both);
    Ok(())
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
