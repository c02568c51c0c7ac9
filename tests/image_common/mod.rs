//! Helpers shared by the image-command tests (image_hostile.rs, image_interop.rs,
//! registry.rs):
//! a temp image store driven through the `strata` CLI, a raw tar writer that
//! can produce archives the `tar` crate refuses to write, JSON accessors for
//! `strata inspect`/`images`, tree/leak checks, peer-tool lookup and a private
//! dockerd.
//!
//! Test crates using it declare both `mod common;` and `mod image_common;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, run_cmd, strata_bin, CmdOutput, MountSpec, Snapshot, StrataMount};

pub const CMD_TIMEOUT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------
// The store.

/// An image store rooted at `root`, driven through the CLI with `--root`
/// (and STRATA_ROOT, in case a verb ignores the global flag). Temp files of
/// strata itself go to `tmp` (TMPDIR), so leftovers can be detected.
#[derive(Clone, Debug)]
pub struct Store {
    pub root: PathBuf,
    pub tmp: PathBuf,
}

impl Store {
    /// A store at `root` (created), with strata's TMPDIR at `tmp` (created).
    pub fn at(root: &Path, tmp: &Path) -> Store {
        fs::create_dir_all(root).unwrap();
        fs::create_dir_all(tmp).unwrap();
        Store {
            root: root.to_path_buf(),
            tmp: tmp.to_path_buf(),
        }
    }

    /// A store inside a test env: `<env>/<name>` with TMPDIR `<env>/<name>-tmp`.
    pub fn in_env(env: &common::TestEnv, name: &str) -> Store {
        Store::at(&env.path().join(name), &env.path().join(format!("{name}-tmp")))
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(strata_bin());
        c.arg("--root")
            .arg(&self.root)
            .env("STRATA_ROOT", &self.root)
            .env("TMPDIR", &self.tmp)
            .env_remove("SOURCE_DATE_EPOCH");
        c
    }

    /// Run `strata --root R ARGS...`.
    pub fn run(&self, args: &[&str]) -> CmdOutput {
        run_cmd(self.cmd().args(args), CMD_TIMEOUT)
    }

    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
        let mut c = self.cmd();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        run_cmd(&mut c, CMD_TIMEOUT)
    }

    /// Run and panic with the full output unless it exits 0.
    pub fn ok(&self, args: &[&str]) -> CmdOutput {
        let out = self.run(args);
        assert!(out.ok(), "`strata {}` failed: {out}", args.join(" "));
        out
    }

    pub fn ok_env(&self, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
        let out = self.run_env(args, env);
        assert!(
            out.ok(),
            "`strata {}` (env {env:?}) failed: {out}",
            args.join(" ")
        );
        out
    }

    /// `strata import FILE NAME`.
    pub fn import(&self, tar: &Path, name: &str) -> CmdOutput {
        self.run(&["import", &tar.display().to_string(), name])
    }

    /// `strata import - NAME < FILE` (stdin form).
    pub fn import_stdin(&self, tar: &Path, name: &str) -> CmdOutput {
        let mut c = self.cmd();
        c.args(["import", "-", name]);
        run_with_stdin(&mut c, tar, CMD_TIMEOUT)
    }

    /// `strata inspect IMAGE` parsed; panics on failure.
    pub fn inspect(&self, image: &str) -> Value {
        let out = self.ok(&["inspect", image]);
        let v: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "`strata inspect {image}` printed invalid JSON ({e}): {}",
                out.stdout
            )
        });
        match v {
            Value::Array(mut a) if !a.is_empty() => a.remove(0),
            v => v,
        }
    }

    pub fn image_id(&self, image: &str) -> String {
        inspect_id(&self.inspect(image))
    }

    pub fn diff_ids(&self, image: &str) -> Vec<String> {
        inspect_diff_ids(&self.inspect(image))
    }

    /// The image's config JSON (the "Config" member of inspect).
    pub fn config(&self, image: &str) -> Value {
        inspect_config(&self.inspect(image))
    }

    /// `strata images` text output (panics if the command fails).
    pub fn images_text(&self) -> String {
        self.ok(&["images"]).stdout
    }

    /// `strata images --format json`, as (id, tags) pairs. Accepts a JSON
    /// array or JSON lines, with Docker-ish or lower-case keys.
    pub fn images(&self) -> Vec<(String, Vec<String>)> {
        let out = self.ok(&["images", "--format", "json"]);
        parse_images_json(&out.stdout)
    }

    /// The single image of a store that holds exactly one (e.g. after `load`
    /// into a fresh store): a reference usable with inspect/mount/export.
    pub fn only_image(&self) -> String {
        let imgs = self.images();
        assert_eq!(
            imgs.len(),
            1,
            "expected exactly one image in {}: {imgs:?}",
            self.root.display()
        );
        let (id, tags) = &imgs[0];
        tags.first().cloned().unwrap_or_else(|| id.clone())
    }

    /// `strata export IMAGE -o FILE`.
    pub fn export(&self, image: &str, out: &Path) -> CmdOutput {
        self.run(&["export", image, "-o", &out.display().to_string()])
    }

    /// Export and extract into `dir` with GNU tar (numeric owners, xattrs).
    pub fn export_tree(&self, image: &str, tar: &Path, dir: &Path) {
        let out = self.export(image, tar);
        assert!(out.ok(), "`strata export {image}` failed: {out}");
        extract_tar(tar, dir);
    }

    /// `strata mount IMAGE --upper U --work W MNT` with fresh dirs under `base`.
    pub fn mount_image(&self, image: &str, base: &Path) -> StrataMount {
        let upper = base.join("upper");
        let work = base.join("work");
        let mnt = base.join("mnt");
        for d in [&upper, &work, &mnt] {
            fs::create_dir_all(d).unwrap();
        }
        self.mount_image_with(image, &upper, &work, &mnt)
    }

    pub fn mount_image_with(&self, image: &str, upper: &Path, work: &Path, mnt: &Path) -> StrataMount {
        let spec = MountSpec {
            lowers: Vec::new(),
            upper: upper.to_path_buf(),
            work: work.to_path_buf(),
            mnt: mnt.to_path_buf(),
        };
        let args: Vec<String> = vec![
            "--root".into(),
            self.root.display().to_string(),
            "mount".into(),
            image.into(),
            "--upper".into(),
            upper.display().to_string(),
            "--work".into(),
            work.display().to_string(),
            mnt.display().to_string(),
        ];
        StrataMount::with_args(&spec, &args).unwrap_or_else(|e| panic!("mounting image {image}: {e}"))
    }
}

/// Run a command with stdin from a file (common::run_cmd uses /dev/null).
pub fn run_with_stdin(cmd: &mut Command, input: &Path, timeout: Duration) -> CmdOutput {
    // run_cmd() sets stdin to null; go through sh to redirect.
    let prog = cmd.get_program().to_os_string();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_os_string()).collect();
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("f=$1; shift; exec \"$@\" < \"$f\"")
        .arg("sh")
        .arg(input)
        .arg(prog)
        .args(args);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    run_cmd(&mut sh, timeout)
}

/// Run any command with a timeout, panicking unless it exits 0.
pub fn must(cmd: &mut Command, what: &str) -> CmdOutput {
    let out = run_cmd(cmd, CMD_TIMEOUT);
    assert!(out.ok(), "{what} failed: {out}\n  command: {cmd:?}");
    out
}

pub fn extract_tar(tar: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    must(
        Command::new("tar").arg("-xpf").arg(tar).arg("-C").arg(dir).args([
            "--numeric-owner",
            "--same-owner",
            "--xattrs",
            "--xattrs-include=*",
        ]),
        &format!("tar -x {}", tar.display()),
    );
}

// ---------------------------------------------------------------------------
// JSON accessors. The inspect format is only fixed to have "Id", "RepoTags",
// "Manifest" and "Config"; accept reasonable variants of the rest.

pub fn normalize_digest(s: &str) -> String {
    if s.contains(':') {
        s.to_string()
    } else {
        format!("sha256:{s}")
    }
}

pub fn inspect_id(v: &Value) -> String {
    let id = v
        .get("Id")
        .or_else(|| v.get("ID"))
        .or_else(|| v.get("id"))
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("inspect output has no \"Id\": {v}"));
    normalize_digest(id)
}

pub fn inspect_config(v: &Value) -> Value {
    let c = v
        .get("Config")
        .unwrap_or_else(|| panic!("inspect output has no \"Config\": {v}"));
    match c {
        Value::String(s) => {
            serde_json::from_str(s).unwrap_or_else(|e| panic!("Config string is not JSON: {e}"))
        }
        c => c.clone(),
    }
}

pub fn inspect_manifest(v: &Value) -> Value {
    let m = v
        .get("Manifest")
        .unwrap_or_else(|| panic!("inspect output has no \"Manifest\": {v}"));
    match m {
        Value::String(s) => {
            serde_json::from_str(s).unwrap_or_else(|e| panic!("Manifest string is not JSON: {e}"))
        }
        m => m.clone(),
    }
}

/// rootfs.diff_ids of the image config (searched in Config, then anywhere).
pub fn inspect_diff_ids(v: &Value) -> Vec<String> {
    let cfg = inspect_config(v);
    if let Some(ids) = cfg.pointer("/rootfs/diff_ids").and_then(Value::as_array) {
        return ids
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect();
    }
    if let Some(ids) = find_key(v, "diff_ids").and_then(Value::as_array) {
        return ids
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect();
    }
    panic!("no rootfs.diff_ids in inspect output: {v}");
}

pub fn find_key<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => {
            if let Some(x) = m.get(key) {
                return Some(x);
            }
            m.values().find_map(|x| find_key(x, key))
        }
        Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

fn str_field(o: &Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| o.get(*k).and_then(Value::as_str).map(str::to_string))
}

pub fn parse_images_json(text: &str) -> Vec<(String, Vec<String>)> {
    let t = text.trim();
    let items: Vec<Value> = if t.is_empty() {
        Vec::new()
    } else if let Ok(Value::Array(a)) = serde_json::from_str::<Value>(t) {
        a
    } else if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(t) {
        match v.get("images").or_else(|| v.get("Images")).cloned() {
            Some(Value::Array(a)) => a,
            _ => vec![v],
        }
    } else {
        t.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("images JSON line {l:?}: {e}")))
            .collect()
    };
    // One row per tag (docker style) or per image: merge rows by id.
    let rows: Vec<(String, Vec<String>)> = items
        .iter()
        .map(|o| {
            let id = str_field(o, &["Id", "ID", "id", "ImageId", "image_id"]).unwrap_or_default();
            let mut tags: Vec<String> = Vec::new();
            for k in ["RepoTags", "repo_tags", "Tags", "tags", "Names", "names"] {
                if let Some(a) = o.get(k).and_then(Value::as_array) {
                    tags.extend(a.iter().filter_map(Value::as_str).map(str::to_string));
                }
            }
            if tags.is_empty() {
                if let (Some(r), Some(tag)) = (
                    str_field(o, &["Repository", "repository"]),
                    str_field(o, &["Tag", "tag"]),
                ) {
                    if r != "<none>" {
                        tags.push(format!("{r}:{tag}"));
                    }
                }
            }
            (id, tags)
        })
        .collect();
    let mut merged: Vec<(String, Vec<String>)> = Vec::new();
    for (id, tags) in rows {
        match merged.iter_mut().find(|(i, _)| !id.is_empty() && *i == id) {
            Some((_, t)) => t.extend(tags),
            None => merged.push((id, tags)),
        }
    }
    merged
}

// ---------------------------------------------------------------------------
// Raw tar writer (ustar + PAX), able to write any header the tar crate would
// refuse: `..` names, absolute names, bad sizes, truncated data.

pub const BLOCK: usize = 512;

#[derive(Clone, Debug)]
pub struct RawEntry {
    pub name: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Value written in the header's size field (may differ from data.len()).
    pub size_field: u64,
    pub mtime: u64,
    pub typeflag: u8,
    pub linkname: String,
    pub devmajor: u32,
    pub devminor: u32,
    pub data: Vec<u8>,
    /// Pad the data to a block boundary (false for truncated archives).
    pub pad: bool,
}

impl RawEntry {
    pub fn new(name: &str, typeflag: u8) -> RawEntry {
        RawEntry {
            name: name.into(),
            mode: if typeflag == b'5' { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size_field: 0,
            mtime: 1_700_000_000,
            typeflag,
            linkname: String::new(),
            devmajor: 0,
            devminor: 0,
            data: Vec::new(),
            pad: true,
        }
    }
}

fn put_str(h: &mut [u8], off: usize, len: usize, s: &[u8]) {
    assert!(s.len() <= len, "field too long: {:?}", String::from_utf8_lossy(s));
    h[off..off + s.len()].copy_from_slice(s);
}

/// Octal, NUL-terminated, zero-padded; base-256 (GNU) when it does not fit.
fn put_num(h: &mut [u8], off: usize, len: usize, v: u64) {
    let digits = len - 1;
    let s = format!("{v:0digits$o}");
    if s.len() <= digits {
        put_str(h, off, len, s.as_bytes());
        h[off + digits] = 0;
    } else {
        let field = &mut h[off..off + len];
        field.fill(0);
        let be = v.to_be_bytes();
        field[len - 8..].copy_from_slice(&be);
        field[0] |= 0x80;
    }
}

/// One 512-byte ustar header with a correct checksum.
pub fn ustar_header(e: &RawEntry) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let name = e.name.as_bytes();
    if name.len() <= 100 {
        put_str(&mut h, 0, 100, name);
    } else {
        // Split into prefix/name at a '/'.
        let cut = name[..name.len().min(155)]
            .iter()
            .rposition(|b| *b == b'/')
            .expect("long name needs a '/' to split");
        put_str(&mut h, 345, 155, &name[..cut]);
        put_str(&mut h, 0, 100, &name[cut + 1..]);
    }
    put_num(&mut h, 100, 8, e.mode as u64);
    put_num(&mut h, 108, 8, e.uid);
    put_num(&mut h, 116, 8, e.gid);
    put_num(&mut h, 124, 12, e.size_field);
    put_num(&mut h, 136, 12, e.mtime);
    h[156] = e.typeflag;
    put_str(&mut h, 157, 100, e.linkname.as_bytes());
    put_str(&mut h, 257, 6, b"ustar\0");
    put_str(&mut h, 263, 2, b"00");
    put_num(&mut h, 329, 8, e.devmajor as u64);
    put_num(&mut h, 337, 8, e.devminor as u64);
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// PAX extended header records ("LEN key=value\n").
pub fn pax_records(kv: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in kv {
        let body = 1 + k.len() + 1 + v.len() + 1; // ' ' key '=' value '\n'
        let mut len = body + 1;
        while format!("{len}").len() + body != len {
            len += 1;
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

/// Builder for raw archives.
#[derive(Default)]
pub struct RawTar {
    pub buf: Vec<u8>,
}

impl RawTar {
    pub fn new() -> RawTar {
        RawTar::default()
    }

    pub fn entry(&mut self, e: RawEntry) -> &mut Self {
        self.buf.extend_from_slice(&ustar_header(&e));
        self.buf.extend_from_slice(&e.data);
        if e.pad {
            let rem = e.data.len() % BLOCK;
            if rem != 0 {
                self.buf.extend(std::iter::repeat_n(0u8, BLOCK - rem));
            }
        }
        self
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(RawEntry::new(name, b'5'))
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        let mut e = RawEntry::new(name, b'0');
        e.size_field = data.len() as u64;
        e.data = data.to_vec();
        self.entry(e)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut e = RawEntry::new(name, b'2');
        e.mode = 0o777;
        e.linkname = target.into();
        self.entry(e)
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut e = RawEntry::new(name, b'1');
        e.linkname = target.into();
        self.entry(e)
    }

    pub fn chardev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        let mut e = RawEntry::new(name, b'3');
        e.mode = 0o666;
        e.devmajor = major;
        e.devminor = minor;
        self.entry(e)
    }

    pub fn fifo(&mut self, name: &str) -> &mut Self {
        self.entry(RawEntry::new(name, b'6'))
    }

    /// A PAX 'x' header applying `kv` to the next entry.
    pub fn pax(&mut self, name: &str, kv: &[(&str, &[u8])]) -> &mut Self {
        let data = pax_records(kv);
        let mut e = RawEntry::new(name, b'x');
        e.size_field = data.len() as u64;
        e.data = data;
        self.entry(e)
    }

    /// Two zero blocks: the end-of-archive marker.
    pub fn finish(&mut self) -> Vec<u8> {
        self.buf.extend(std::iter::repeat_n(0u8, 2 * BLOCK));
        std::mem::take(&mut self.buf)
    }

    /// The bytes as they are (no end marker): for truncated archives.
    pub fn unfinished(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

// ---------------------------------------------------------------------------
// Trees.

/// Snapshot without the root entry (a rootfs dir's own mode/owner depends on
/// who created it: umoci, tar -C, the mount's upper dir).
pub fn snapshot_no_root(root: &Path) -> Snapshot {
    let mut s = common::snapshot(root);
    s.remove(Path::new(""));
    s
}

/// Build a small busybox rootfs (static busybox from busybox-static) in `dir`.
pub fn busybox_rootfs(dir: &Path) {
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("busybox not installed (scripts/install-deps installs busybox-static)");
    for d in ["bin", "etc", "tmp", "usr/share/doc", "var/lib/app", "opt/old/sub"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::copy(bb, dir.join("bin/busybox")).unwrap();
    for l in ["sh", "ls", "cat"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(l)).unwrap();
    }
    fs::write(dir.join("etc/hello"), "hello\n").unwrap();
    fs::write(dir.join("etc/remove-me"), "bye\n").unwrap();
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(dir.join("usr/share/doc/README"), "docs\n").unwrap();
    fs::write(dir.join("var/lib/app/data"), vec![7u8; 70_000]).unwrap();
    fs::write(dir.join("opt/old/a"), "a").unwrap();
    fs::write(dir.join("opt/old/sub/b"), "b").unwrap();
    fs::hard_link(dir.join("etc/hello"), dir.join("etc/hello-link")).unwrap();
    common::set_xattr(&dir.join("etc/hello"), "user.origin", b"base", false).unwrap();
    common::lchown(&dir.join("var/lib/app/data"), 1000, 1000).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
}

/// GNU tar of a directory's contents (./-relative, numeric owners, xattrs,
/// sorted so the bytes only depend on the tree).
pub fn tar_dir(dir: &Path, out: &Path) {
    must(
        Command::new("tar").arg("-C").arg(dir).arg("-cf").arg(out).args([
            "--numeric-owner",
            "--sort=name",
            "--xattrs",
            "--xattrs-include=user.*",
            "--format=pax",
            "--mtime=@1700000000",
            ".",
        ]),
        &format!("tar -c {}", dir.display()),
    );
}

pub fn sha256_file(p: &Path) -> String {
    format!("sha256:{}", common::sha256_hex(&fs::read(p).unwrap()))
}

/// Entry names of a tar file (normalized: no leading "./" or "/", no trailing "/").
pub fn tar_names(p: &Path) -> Vec<String> {
    let f = fs::File::open(p).unwrap();
    let mut a = tar::Archive::new(f);
    let mut names = Vec::new();
    for e in a.entries().unwrap() {
        let e = e.unwrap_or_else(|err| panic!("reading {}: {err}", p.display()));
        let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        names.push(norm_name(&raw));
    }
    names
}

pub fn norm_name(raw: &str) -> String {
    let s = raw.trim_start_matches("./").trim_start_matches('/');
    s.trim_end_matches('/').to_string()
}

/// Read one member of a tar archive (following nothing: exact name match
/// after normalisation).
pub fn tar_member(p: &Path, name: &str) -> Option<Vec<u8>> {
    let f = fs::File::open(p).unwrap();
    let mut a = tar::Archive::new(f);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let n = norm_name(&String::from_utf8_lossy(&e.path_bytes()));
        if n == norm_name(name) {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            return Some(v);
        }
    }
    None
}

/// All paths under `root` (relative), without following symlinks, skipping
/// the subtrees in `skip` (absolute paths).
pub fn walk_names(root: &Path, skip: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if skip.iter().any(|s| p.starts_with(s)) {
                continue;
            }
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// (hash, nlink, size) of a host file, to detect writes through escapes.
pub fn host_file_state(p: &Path) -> Option<(String, u64, u64)> {
    let md = fs::symlink_metadata(p).ok()?;
    let data = fs::read(p).ok()?;
    Some((common::sha256_hex(&data), md.nlink(), md.len()))
}

/// Lines of `strata diff` output as (kind, path).
pub fn parse_diff_lines(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in text.lines() {
        let l = l.trim_end();
        if l.is_empty() {
            continue;
        }
        let (k, p) = l.split_once(' ').unwrap_or_else(|| panic!("bad diff line {l:?}"));
        m.insert(p.to_string(), k.to_string());
    }
    m
}

/// Read-only kernel overlay of `lowers` (top first): an independent
/// reference for what a stack of layer dirs looks like merged. Unmounted on drop.
pub struct RoOverlay {
    pub mnt: PathBuf,
    done: bool,
}

impl RoOverlay {
    pub fn new(lowers: &[&Path], mnt: &Path) -> RoOverlay {
        fs::create_dir_all(mnt).unwrap();
        let l: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let opts = format!("lowerdir={},redirect_dir=off,index=off,metacopy=off", l.join(":"));
        must(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(mnt),
            "kernel overlay mount (reference tree)",
        );
        RoOverlay {
            mnt: mnt.to_path_buf(),
            done: false,
        }
    }

    pub fn umount(mut self) {
        self.do_umount();
    }

    fn do_umount(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let out = run_cmd(Command::new("umount").arg(&self.mnt), Duration::from_secs(30));
        if !out.ok() {
            let _ = run_cmd(
                Command::new("umount").arg("-l").arg(&self.mnt),
                Duration::from_secs(30),
            );
            eprintln!("umount {} failed: {out}", self.mnt.display());
        }
    }
}

impl Drop for RoOverlay {
    fn drop(&mut self) {
        self.do_umount();
    }
}

/// Tree snapshot for cross-tool comparison: no root entry, and no nlink on
/// directories (kernel overlayfs reports 1 for merged dirs; extracted trees
/// report 2+subdirs).
pub fn tree(root: &Path) -> Snapshot {
    let mut s = snapshot_no_root(root);
    for e in s.values_mut() {
        if e.kind == common::Kind::Dir {
            e.nlink = None;
        }
    }
    s
}

/// (entry, xattr key) of every PAX xattr record naming an overlay-private attribute.
pub fn tar_overlay_xattrs(p: &Path) -> Vec<(String, String)> {
    let f = fs::File::open(p).unwrap();
    let mut a = tar::Archive::new(f);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = norm_name(&String::from_utf8_lossy(&e.path_bytes()));
        if let Ok(Some(exts)) = e.pax_extensions() {
            for x in exts.flatten() {
                let k = x.key().unwrap_or_default().to_string();
                if k.contains("overlay") || k.contains("fuseoverlayfs") {
                    out.push((name.clone(), k));
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Peer tools: lookup and a private dockerd (image_interop.rs, registry.rs).

/// The path of an installed peer tool; panics when it is missing.
pub fn require_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("`{name}` is not installed: run scripts/install-deps (it installs skopeo, umoci, docker.io, docker-registry, ...)");
}

pub fn docker_bin() -> PathBuf {
    // The Debian client matches the daemon (20.10); a newer client in
    // /usr/local/bin also works (API negotiation), as a fallback.
    for p in ["/usr/bin/docker", "/usr/local/bin/docker"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("docker client not installed: run scripts/install-deps");
}

/// A private dockerd: state, exec root and socket under a temp dir, no
/// bridge/iptables. Killed (with its containerd) and cleaned up on drop.
pub struct Dockerd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub sock: PathBuf,
}

impl Dockerd {
    pub fn start() -> Result<Dockerd, String> {
        let dockerd = require_tool("dockerd");
        let dir = tempfile::Builder::new()
            .prefix("strata-dkr-")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let d = dir.path();
        for sub in ["data", "exec", "config"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let sock = d.join("docker.sock");
        let log = fs::File::create(d.join("dockerd.log")).unwrap();
        let child = Command::new(dockerd)
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args([
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--storage-driver",
                "overlay2",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn dockerd: {e}"))?;
        let mut me = Dockerd {
            dir,
            child: Some(child),
            sock,
        };
        let start = Instant::now();
        loop {
            let out = run_cmd(me.cmd().arg("version"), Duration::from_secs(20));
            if out.ok() {
                return Ok(me);
            }
            let exited = me.child.as_mut().unwrap().try_wait().ok().flatten();
            if exited.is_some() || start.elapsed() > Duration::from_secs(60) {
                let log = fs::read_to_string(me.dir.path().join("dockerd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                me.stop();
                return Err(format!(
                    "dockerd did not come up (exit: {exited:?}); last `docker version`: {out}\n--- dockerd.log (tail) ---\n{}",
                    tail.join("\n")
                ));
            }
            thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(docker_bin());
        c.env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .env("DOCKER_CONFIG", self.dir.path().join("config"));
        c
    }

    pub fn run(&self, args: &[&str]) -> CmdOutput {
        run_cmd(self.cmd().args(args), CMD_TIMEOUT)
    }

    pub fn ok(&self, args: &[&str]) -> CmdOutput {
        let out = self.run(args);
        assert!(out.ok(), "`docker {}` failed: {out}", args.join(" "));
        out
    }

    /// PIDs whose command line mentions our temp dir (dockerd's containerd).
    pub fn our_pids(&self) -> Vec<i32> {
        let want = self.dir.path().display().to_string();
        let mut pids = Vec::new();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(c) = fs::read(e.path().join("cmdline")) {
                if String::from_utf8_lossy(&c).contains(&want) && pid != std::process::id() as i32 {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) of the dockerd we spawned.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its containerd normally exits with it; make sure.
        let start = Instant::now();
        while !self.our_pids().is_empty() && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(100));
        }
        for pid in self.our_pids() {
            eprintln!("killing leftover dockerd child {pid}");
            // SAFETY: kill(2) of a process started by our dockerd.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Unmount anything left under the state dir (deepest first).
        let want = self.dir.path().display().to_string();
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut mine: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&want))
            .collect();
        mine.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mine {
            let _ = run_cmd(Command::new("umount").arg("-l").arg(m), Duration::from_secs(20));
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn docker_or_skip() -> Option<Dockerd> {
    match Dockerd::start() {
        Ok(d) => Some(d),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI: cannot start a private dockerd, so the docker interop test cannot run:\n{e}")
        }
        Err(e) => {
            eprintln!("SKIPPED docker interop: cannot start a private dockerd here (set CI=1 to make this fatal):\n{e}");
            None
        }
    }
}
