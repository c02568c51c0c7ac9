//! Several threads change one mount at once: creates, writes, appends, truncates,
//! unlinks, mkdir and rmdir, renames of files and of directories (lower ones included,
//! which write redirects), hard links, symlinks, chmod, xattrs and whole reads, on a small
//! pool of names over two lower layers, so that they collide; others list and stat the
//! same directories. Every call must succeed or fail with an errno a race explains
//! (ENOENT, EEXIST, ENOTEMPTY, ..., see `expected`); an EIO, EINVAL or any other errno
//! fails the test, and so does a listing that shows a name twice. Four configurations:
//! io_uring, /dev/fuse, `passthrough=all` and `passthrough=off`.
//!
//! What it checks, since the end state of the shared names depends on the interleaving:
//! - each thread also works in a directory of its own, with a model of what it must hold,
//!   which must match at the end (so the operations did what they should, not only agree);
//! - the upper strata leaves is read by the kernel's overlayfs exactly as strata showed it
//!   (cross-mounted: same names, types, modes, owners, sizes, data, link targets and
//!   xattrs), and by strata again after a remount;
//! - the work directory holds nothing but whiteouts after the unmount.
//!
//! Run longer: STRATA_CONC_SEED=N STRATA_CONC_OPS=N cargo test --test concurrent
//! (STRATA_CONC_LOG=DIR keeps each daemon's log there; RUST_LOG sets its level).

mod common;

use common::*;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Directories whose entries the threads fight over (some may be renamed away or removed).
const DIRS: [&str; 8] = ["a", "a/s", "b", "b/s", "c", "c/d1", "n0", "a/n1"];
/// Names of files, links and symlinks in them.
const FILES: [&str; 5] = ["f0", "f1", "f2", "f3", "f4"];
/// Names of directories made, removed and renamed in them.
const SUBDIRS: [&str; 3] = ["d0", "d1", "d2"];
const THREADS: usize = 4;

/// errnos a race between the threads can explain. ELOOP: symlinks are renamed too, and
/// `f3 -> f3` is a loop. ESTALE: a call reached an object another thread removed after the
/// kernel's path walk found it; strata answers ESTALE (it has nothing left of a removed
/// file nobody holds open) and the kernel walks the path again, once, so the caller sees
/// it only when the name is removed again meanwhile (docs/design.md, "Inode numbers").
fn expected(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOENT
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::ELOOP
                | libc::ESTALE
        )
    )
}

struct Worker {
    root: PathBuf,
    rng: Rng,
    id: usize,
    /// What this thread's own directory must hold: name -> data.
    model: BTreeMap<String, Vec<u8>>,
    done: usize,
    /// passthrough=all: a reader of a lower file keeps writers out with ETXTBSY
    /// (docs/design.md), so a write open racing another thread's read may get it.
    busy_ok: bool,
}

impl Worker {
    fn pool_file(&mut self) -> PathBuf {
        let d = *self.rng.pick(&DIRS);
        let f = *self.rng.pick(&FILES);
        self.root.join(d).join(f)
    }

    fn pool_dir(&mut self) -> PathBuf {
        let d = *self.rng.pick(&DIRS);
        let s = *self.rng.pick(&SUBDIRS);
        self.root.join(d).join(s)
    }

    /// Run one call: Ok, or an errno a race explains; anything else fails the test.
    fn check(&mut self, what: &str, p: &Path, r: std::io::Result<()>, also: &[i32]) {
        match r {
            Ok(()) => self.done += 1,
            Err(e) if expected(&e) || e.raw_os_error().is_some_and(|n| also.contains(&n)) => {}
            Err(e) if self.busy_ok && e.raw_os_error() == Some(libc::ETXTBSY) => {}
            Err(e) => {
                // What the path and its parents are now: whether the failure lasts.
                let mut now = String::new();
                let mut q = p.to_path_buf();
                while q != self.root {
                    let st = fs::symlink_metadata(&q).map(|m| (m.ino(), m.file_type()));
                    now.push_str(&format!("\n  now {}: {st:?}", q.display()));
                    if !q.pop() {
                        break;
                    }
                }
                panic!("thread {}: {what} {}: {e}{now}", self.id, p.display())
            }
        }
    }

    fn shared_op(&mut self) {
        match self.rng.below(16) {
            0 | 1 => {
                let p = self.pool_file();
                let data = self.rng.data(3000);
                match fs::File::create(&p) {
                    Ok(mut f) => {
                        let r = f.write_all(&data);
                        self.check("write", &p, r, &[]);
                    }
                    Err(e) => self.check("create", &p, Err(e), &[]),
                }
            }
            2 => {
                let p = self.pool_file();
                let data = self.rng.data(500);
                let r = fs::OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .and_then(|mut f| f.write_all(&data));
                // A symlink in the pool may point nowhere or at a directory.
                self.check("append", &p, r, &[]);
            }
            3 => {
                let p = self.pool_file();
                let r = fs::remove_file(&p);
                // The name may be a directory by now.
                self.check("unlink", &p, r, &[libc::EPERM]);
            }
            4 => {
                let p = self.pool_dir();
                let r = fs::create_dir(&p);
                self.check("mkdir", &p, r, &[]);
            }
            5 => {
                let p = self.pool_dir();
                let r = fs::remove_dir(&p);
                self.check("rmdir", &p, r, &[]);
            }
            6 | 7 => {
                let (a, b) = (self.pool_file(), self.pool_file());
                let r = fs::rename(&a, &b);
                self.check("rename", &a, r, &[]);
            }
            8 => {
                // Directories, lower ones too: with redirect_dir=on (strata's default)
                // they move with their content. Into itself or its own subdirectory is
                // EINVAL.
                if self.rng.chance(50) {
                    let (a, b) = (self.pool_dir(), self.pool_dir());
                    let r = fs::rename(&a, &b);
                    self.check("rename dir", &a, r, &[libc::EINVAL]);
                } else {
                    // One of the pool's own directories goes away and comes back (a
                    // redirect written, then dropped or rewritten); it stays away only
                    // if its parent went away meanwhile.
                    let a = self.root.join(self.rng.pick(&DIRS));
                    let b = self.root.join(format!("away{}", self.id));
                    let r = fs::rename(&a, &b);
                    self.check("rename dir away", &a, r, &[libc::EINVAL]);
                    if b.exists() {
                        let r = fs::rename(&b, &a);
                        self.check("rename dir back", &b, r, &[]);
                    }
                }
            }
            9 => {
                let p = self.pool_file();
                let mode = *self.rng.pick(&[0o600, 0o644, 0o755, 0o640]);
                let r = fs::set_permissions(&p, fs::Permissions::from_mode(mode));
                self.check("chmod", &p, r, &[]);
            }
            10 => {
                let p = self.pool_file();
                let len = self.rng.below(4000) as u64;
                match fs::OpenOptions::new().write(true).open(&p) {
                    Ok(f) => {
                        let r = f.set_len(len);
                        self.check("ftruncate", &p, r, &[]);
                    }
                    Err(e) => self.check("open to truncate", &p, Err(e), &[]),
                }
            }
            11 => {
                let (a, b) = (self.pool_file(), self.pool_file());
                let r = fs::hard_link(&a, &b);
                // A link to a directory is EPERM.
                self.check("link", &a, r, &[libc::EPERM]);
            }
            12 => {
                let p = self.pool_file();
                let t = format!("../{}", self.rng.pick(&FILES));
                let r = std::os::unix::fs::symlink(&t, &p);
                self.check("symlink", &p, r, &[]);
            }
            13 => {
                let p = self.pool_file();
                let v = self.rng.data(40);
                // A symlink's user xattr is EPERM (as on any file system).
                let r = set_xattr(&p, "user.t", &v, false);
                self.check("setxattr", &p, r, &[libc::EPERM]);
            }
            14 => {
                // A whole read: opens, READs (or a passed-through read) and releases racing
                // the writes, renames and copy-ups of the others.
                let p = self.pool_file();
                let r = fs::read(&p).map(|_| ());
                self.check("read", &p, r, &[]);
            }
            _ => {
                let d = self.root.join(self.rng.pick(&DIRS));
                match read_dir_raw(&d) {
                    Ok(names) => {
                        let set: HashSet<&String> = names.iter().map(|(n, _)| n).collect();
                        assert_eq!(
                            set.len(),
                            names.len(),
                            "{}: a name listed twice: {names:?}",
                            d.display()
                        );
                        for (n, _) in &names {
                            match fs::symlink_metadata(d.join(n)) {
                                Ok(_) => {}
                                Err(e) if expected(&e) => {}
                                Err(e) => panic!("thread {}: stat {}/{n}: {e}", self.id, d.display()),
                            }
                        }
                        self.done += 1;
                    }
                    Err(e) if expected(&e) => {}
                    Err(e) => panic!("thread {}: readdir {}: {e}", self.id, d.display()),
                }
            }
        }
    }

    /// One deterministic step in this thread's own directory, mirrored in the model.
    fn own_op(&mut self, step: usize) {
        let dir = self.root.join(format!("own{}", self.id));
        let name = format!("k{}", self.rng.below(6));
        match self.rng.below(4) {
            0 | 1 => {
                let data = format!("{}-{step}-", self.id)
                    .into_bytes()
                    .repeat(1 + self.rng.below(200));
                fs::write(dir.join(&name), &data).unwrap();
                self.model.insert(name, data);
            }
            2 => {
                let to = format!("k{}", self.rng.below(6));
                match self.model.remove(&name) {
                    Some(data) => {
                        fs::rename(dir.join(&name), dir.join(&to)).unwrap();
                        self.model.insert(to, data);
                    }
                    None => {
                        let e = fs::rename(dir.join(&name), dir.join(&to)).unwrap_err();
                        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "rename of missing own file");
                    }
                }
            }
            _ => match self.model.remove(&name) {
                Some(_) => fs::remove_file(dir.join(&name)).unwrap(),
                None => {
                    let e = fs::remove_file(dir.join(&name)).unwrap_err();
                    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "unlink of missing own file");
                }
            },
        }
    }
}

fn build_layers(ls: &LayerSet) {
    ls.lower(1)
        .file("a/f0", "lower1 a/f0")
        .file("a/f1", "lower1 a/f1")
        .file("a/s/f0", "lower1 a/s/f0")
        .file("a/d0/f0", "lower1 a/d0/f0")
        .file("b/f0", "lower1 b/f0")
        .dir("b/s")
        .file("b/s/f4", "hidden by the opaque b/s above")
        .file("c/f2", "whited out above")
        .file("c/d1/f1", "lower1 c/d1/f1")
        .file("c/d1/d2/f3", "deep")
        .hardlink("c/f3", "a/f1");
    ls.lower(0)
        .file("a/f2", "lower0 a/f2")
        .file("a/s/f1", "lower0 a/s/f1")
        .file("b/s/f3", "lower0 b/s/f3")
        .opaque("b/s")
        .file("b/d0/f0", "lower0 b/d0/f0")
        .whiteout("c/f2")
        .symlink("c/f4", "f3")
        .dir("n0");
}

fn concurrent_run(tag: &str, default_seed: u64, extra: &str) {
    let seed = env_u64("STRATA_CONC_SEED").unwrap_or(default_seed);
    let nops = env_u64("STRATA_CONC_OPS").unwrap_or(3000) as usize;
    eprintln!("{tag}: seed {seed}, {nops} operations per thread, {THREADS} threads");
    let ls = LayerSet::new(tag, 2);
    build_layers(&ls);
    let spec = ls.spec();
    let mut args = mount_args(&spec, extra);
    if let Some(dir) = std::env::var_os("STRATA_CONC_LOG") {
        // The daemon's log (RUST_LOG sets its level), for a failure to be looked into.
        let log = Path::new(&dir).join(format!("{tag}.log"));
        args.splice(1..1, ["--log-file".to_string(), log.display().to_string()]);
    }
    let m = StrataMount::with_args(&spec, &args).unwrap_or_else(|e| panic!("{e}"));
    let root = m.root().to_path_buf();
    for t in 0..THREADS {
        fs::create_dir(root.join(format!("own{t}"))).unwrap();
    }
    let results: Vec<(usize, BTreeMap<String, Vec<u8>>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|id| {
                let root = root.clone();
                s.spawn(move || {
                    let mut w = Worker {
                        root,
                        rng: Rng(seed
                            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                            .wrapping_add(id as u64 + 1)),
                        id,
                        model: BTreeMap::new(),
                        done: 0,
                        busy_ok: extra.contains("passthrough=all"),
                    };
                    for step in 0..nops {
                        if w.rng.chance(20) {
                            w.own_op(step);
                        } else {
                            w.shared_op();
                        }
                    }
                    (id, w.model, w.done)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let succeeded: usize = results.iter().map(|r| r.2).sum();
    // The shared names must have seen real work, not only refusals.
    assert!(
        succeeded > THREADS * nops / 4,
        "only {succeeded} of {} shared operations succeeded",
        THREADS * nops
    );

    let seen = snapshot(&root);
    for (id, model, _) in &results {
        let dir = PathBuf::from(format!("own{id}"));
        let got: BTreeMap<String, String> = seen
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir.as_path()))
            .map(|(p, e)| {
                let name = String::from_utf8_lossy(p.file_name().unwrap().as_bytes()).into_owned();
                (name, e.sha256.clone().unwrap_or_default())
            })
            .collect();
        let want: BTreeMap<String, String> = model.iter().map(|(n, d)| (n.clone(), sha256_hex(d))).collect();
        assert_eq!(got, want, "own{id} does not hold what thread {id} wrote");
    }
    let errors: Vec<String> = seen
        .iter()
        .filter(|(_, e)| e.error.is_some())
        .map(|(p, e)| format!("{}: {e}", p.display()))
        .collect();
    assert!(
        errors.is_empty(),
        "errors reading the tree through strata: {errors:#?}"
    );
    m.umount().unwrap();

    // Nothing but whiteouts (the shared one) is left in the work directory.
    let work = spec.work.join("work");
    if work.exists() {
        for e in fs::read_dir(&work).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            assert!(
                md.file_type().is_char_device() && md.rdev() == 0,
                "left in the work directory: {}",
                e.path().display()
            );
        }
    }

    let k = KernelMount::try_new_redirect(&spec, true).unwrap_or_else(|e| panic!("{e}"));
    let kernel = snapshot(k.root());
    k.umount().unwrap();
    assert_snapshots_eq(
        &seen,
        &kernel,
        "strata",
        "kernel",
        &format!("{tag}: the upper under the kernel"),
    );

    let m = StrataMount::with_args(&spec, &args).unwrap_or_else(|e| panic!("{e}"));
    let again = snapshot(m.root());
    m.umount().unwrap();
    assert_snapshots_eq(
        &seen,
        &again,
        "strata",
        "remounted",
        &format!("{tag}: after a remount"),
    );
}

#[test]
fn concurrent_changes_uring() {
    concurrent_run("conc-uring", 0xc0c0_0001, "");
}

#[test]
fn concurrent_changes_devfuse() {
    concurrent_run("conc-devfuse", 0xc0c0_0002, "uring=off");
}

#[test]
fn concurrent_changes_passthrough_all() {
    concurrent_run("conc-ptall", 0xc0c0_0003, "passthrough=all");
}

#[test]
fn concurrent_changes_passthrough_off() {
    concurrent_run("conc-ptoff", 0xc0c0_0004, "passthrough=off");
}
