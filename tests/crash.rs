//! Crash safety of the store, proven by SIGKILL: `import`, `load`, `commit`, `save` and
//! `rmi`+`gc` are killed at pseudo-random points, many times; after each kill `strata check`
//! (the oracle) must find every listed image complete with every blob matching its digest,
//! the interrupted command must then succeed, and `gc` must leave nothing unreferenced.
//!
//! The same for `pull` and `push` against a registry on 127.0.0.1, and for `build` (whose
//! mounts, FUSE or the kernel's overlayfs, and scratch directories the next build must
//! reclaim).
//!
//! `rmi -f` killed while a mount reads the image must leave the mount whole.
//!
//! STRATA_CRASH_ITERS=N sets the number of kills of the store commands (default 200, spread over
//! the commands; the daemon and rmi-while-mounted tests kill N/4, default 10).

mod common;
mod image_common;
mod registry_common;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use image_common::*;

/// A deterministic pseudo-random sequence (no dependency, reproducible runs).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// A rootfs tar of `files` files of `kib` KiB each (pseudo-random, so compression and
/// hashing take real time).
fn rootfs_tar(path: &Path, files: usize, kib: usize, seed: u64) {
    let mut r = Lcg(seed);
    let mut t = RawTar::new();
    t.dir("data/");
    for i in 0..files {
        let data: Vec<u8> = (0..kib * 1024).map(|_| r.next() as u8).collect();
        t.file(&format!("data/f{i}"), &data);
    }
    fs::write(path, t.finish()).unwrap();
}

/// Kills for the slower tests (a mount per kill): STRATA_CRASH_ITERS/4, at least 4; 10 by
/// default.
fn quarter_iters() -> u64 {
    std::env::var("STRATA_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| (n / 4).max(4))
        .unwrap_or(10)
}

/// Run `args`, SIGKILL it after `delay` unless it finished first; true if it was killed.
fn kill_after(st: &Store, args: &[&str], delay: Duration) -> bool {
    kill_cmd(st.cmd().args(args), delay)
}

/// Spawn `c` (output discarded) and SIGKILL it after `delay` unless it finished first.
fn kill_cmd(c: &mut std::process::Command, delay: Duration) -> bool {
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = c.spawn().expect("spawn strata");
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if start.elapsed() >= delay {
            let _ = child.kill();
            let _ = child.wait();
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// The oracle: the store is sound, and lists only images that are whole.
fn assert_sound(st: &Store, ctx: &str) {
    let out = st.run(&["check"]);
    assert!(
        out.ok() && out.stdout.contains(" 0 problems"),
        "{ctx}: strata check after the kill: {out}"
    );
    // Every listed image can be read to the end (export reads every layer).
    let sink = st.tmp.join("export.tar");
    for (_, names) in st.images() {
        for n in names {
            let out = st.run(&["export", "-o", &sink.display().to_string(), &n]);
            assert!(out.ok(), "{ctx}: listed image {n} cannot be exported: {out}");
        }
    }
}

#[test]
fn sigkill_during_store_writes_leaves_a_sound_store() {
    let iters: u64 = std::env::var("STRATA_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let env = TestEnv::new("crash");
    let st = Store::in_env(&env, "store");
    let big = env.path().join("big.tar");
    rootfs_tar(&big, 12, 512, 7);
    assert!(st.import(&big, "base:1").ok());
    let saved = env.path().join("saved.tar");
    assert!(st
        .run(&["save", "-o", &saved.display().to_string(), "base:1"])
        .ok());
    let upper = env.path().join("upper");
    fs::create_dir_all(upper.join("data")).unwrap();
    fs::write(upper.join("data/new"), vec![7u8; 4 << 20]).unwrap();
    let out_tar = env.path().join("out.tar");

    // How long each command takes when left alone: kills land inside that span.
    let ops: Vec<(&str, Vec<String>)> = vec![
        (
            "import",
            vec!["import".into(), big.display().to_string(), "imp:1".into()],
        ),
        (
            "load",
            vec!["load".into(), "-i".into(), saved.display().to_string()],
        ),
        (
            "commit",
            vec![
                "commit".into(),
                "--upper".into(),
                upper.display().to_string(),
                "--base".into(),
                "base:1".into(),
                "com:1".into(),
            ],
        ),
        (
            "save",
            vec![
                "save".into(),
                "-o".into(),
                out_tar.display().to_string(),
                "base:1".into(),
            ],
        ),
        ("rmi", vec!["rmi".into(), "imp:1".into()]),
        // After an rmi (or a killed import), gc has unreferenced blobs and layers to remove.
        ("gc", vec!["gc".into()]),
    ];
    let mut spans = Vec::new();
    for (name, args) in &ops {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        let out = st.run(&a);
        assert!(out.ok(), "{name} alone: {out}");
        spans.push(t.elapsed().max(Duration::from_millis(5)));
    }
    let mut r = Lcg(42);
    let mut killed = 0;
    for i in 0..iters {
        let k = (i as usize) % ops.len();
        let (name, args) = &ops[k];
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        // Before rmi, make sure there is something to remove.
        if *name == "rmi"
            && !st
                .images()
                .iter()
                .any(|(_, n)| n.iter().any(|x| x.starts_with("imp")))
        {
            assert!(st.import(&big, "imp:1").ok());
        }
        let delay = Duration::from_micros(r.next() % (spans[k].as_micros() as u64 + 1));
        let ctx = format!("iteration {i}: {name} killed after {delay:?}");
        if kill_after(&st, &a, delay) {
            killed += 1;
        }
        assert_sound(&st, &ctx);
        // The save output is whole or absent: never a partial archive under its name.
        if *name == "save" && out_tar.exists() {
            let out = st.run(&["load", "-i", &out_tar.display().to_string()]);
            assert!(out.ok(), "{ctx}: the archive save left is not whole: {out}");
        }
        // The command then works, and the store is sound again.
        if *name != "rmi" {
            let out = st.run(&a);
            assert!(out.ok(), "{ctx}: {name} after the kill: {out}");
        }
    }
    assert!(
        killed * 2 >= iters,
        "only {killed} of {iters} commands were killed before they ended"
    );
    let out = st.run(&["gc"]);
    assert!(out.ok(), "gc: {out}");
    assert_sound(&st, "after gc");
    // Nothing is left in the staging area once a writer opened the store.
    let tmp: Vec<_> = fs::read_dir(st.root.join("tmp")).unwrap().flatten().collect();
    assert!(
        tmp.is_empty(),
        "staging files left: {:?}",
        tmp.iter().map(|e| e.path()).collect::<Vec<_>>()
    );
}

/// `rmi -f` (and the `gc` it runs) killed at random points while a mount reads the image:
/// the mount keeps every file whole, the store stays sound, the image stays (untagged once
/// the rmi got that far) while it is mounted, and after the umount it can be removed and
/// its layers reclaimed.
#[test]
fn sigkill_of_rmi_while_the_image_is_mounted() {
    require_fuse();
    let iters = quarter_iters();
    let env = TestEnv::new("crash-rmi");
    let st = Store::in_env(&env, "store");
    let tar = env.path().join("base.tar");
    rootfs_tar(&tar, 12, 256, 11);
    let want: Vec<Vec<u8>> = {
        let dir = env.dir("want");
        extract_tar(&tar, &dir);
        (0..12)
            .map(|i| fs::read(dir.join(format!("data/f{i}"))).unwrap())
            .collect()
    };
    let mut r = Lcg(99);
    let mut killed = 0;
    for i in 0..iters {
        assert!(st.import(&tar, "inuse:1").ok());
        let id = st.image_id("inuse:1");
        let m = st.mount_image("inuse:1", &env.fresh_dir("m"));
        let t = Instant::now();
        let out = st.run(&["rmi", "inuse:1"]);
        assert!(!out.ok(), "rmi without -f of a mounted image succeeded: {out}");
        // Odd iterations spread the kill over three times what the refused rmi took; even
        // ones kill within its first quarter, so that some kills surely land (with only
        // the wide spread, all 10 rmi -f could finish first: it happened in CI).
        let span = t.elapsed().max(Duration::from_millis(5));
        let span = if i % 2 == 0 { span / 4 } else { span * 3 };
        let delay = Duration::from_micros(r.next() % (span.as_micros() as u64 + 1));
        let ctx = format!("iteration {i}: rmi -f killed after {delay:?}");
        if kill_after(&st, &["rmi", "-f", "inuse:1"], delay) {
            killed += 1;
        }
        assert_sound(&st, &ctx);
        // Finish the job, then collect garbage: the mounted image must survive both.
        let out = st.run(&["rmi", "-f", "inuse:1"]);
        let gone_name = !st.images().iter().any(|(_, n)| n.iter().any(|x| x == "inuse:1"));
        assert!(out.ok() || gone_name, "{ctx}: rmi -f after the kill: {out}");
        assert!(gone_name, "{ctx}: the name survived rmi -f");
        assert!(st.run(&["gc"]).ok());
        for (k, w) in want.iter().enumerate() {
            let got = fs::read(m.root().join(format!("data/f{k}")))
                .unwrap_or_else(|e| panic!("{ctx}: data/f{k} in the mount: {e}"));
            assert!(&got == w, "{ctx}: data/f{k} changed under the mount");
        }
        assert!(
            st.images()
                .iter()
                .any(|(i2, _)| id.contains(i2.as_str()) || i2.contains(&id)),
            "{ctx}: the mounted image {id} is not listed (untagged) any more:\n{}",
            st.images_text()
        );
        assert_sound(&st, &ctx);
        m.umount().unwrap_or_else(|e| panic!("{ctx}: umount: {e}"));
        let out = st.run(&["rmi", &id]);
        assert!(out.ok(), "{ctx}: rmi of the unmounted image: {out}");
        assert!(st.images().is_empty(), "{ctx}: {}", st.images_text());
        let layers = fs::read_dir(st.root.join("layers")).unwrap().count();
        assert_eq!(layers, 0, "{ctx}: unpacked layers left after the last rmi");
    }
    assert!(killed > 0, "no rmi -f was killed before it ended");
}

/// Two commands on one store at once (commit + gc, load + rmi, import + gc): no
/// corruption, and no image that a command reported as made is lost.
#[test]
fn concurrent_commands_keep_the_store_sound() {
    let env = TestEnv::new("concurrent");
    let st = Store::in_env(&env, "store");
    let big = env.path().join("big.tar");
    rootfs_tar(&big, 6, 256, 11);
    assert!(st.import(&big, "base:1").ok());
    let saved = env.path().join("saved.tar");
    assert!(st
        .run(&["save", "-o", &saved.display().to_string(), "base:1"])
        .ok());
    let upper = env.path().join("upper");
    fs::create_dir_all(upper.join("data")).unwrap();
    fs::write(upper.join("data/new"), vec![3u8; 1 << 20]).unwrap();
    let (b, s, u) = (
        big.display().to_string(),
        saved.display().to_string(),
        upper.display().to_string(),
    );
    for round in 0..6 {
        let tag = format!("r{round}:1");
        let pairs: Vec<(Vec<&str>, Vec<&str>)> = vec![
            (
                vec!["commit", "--upper", &u, "--base", "base:1", &tag],
                vec!["gc"],
            ),
            (vec!["load", "-i", &s], vec!["rmi", "base:1"]),
            (vec!["import", &b, &tag], vec!["gc"]),
        ];
        for (first, second) in pairs {
            let spawn = |args: &[&str]| {
                let mut c = st.cmd();
                c.args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                c.spawn().expect("spawn strata")
            };
            let a = spawn(&first);
            let z = spawn(&second);
            let (ao, zo) = (a.wait_with_output().unwrap(), z.wait_with_output().unwrap());
            let ctx = format!("round {round}: `{}` with `{}`", first.join(" "), second.join(" "));
            assert!(
                ao.status.success(),
                "{ctx}: {}",
                String::from_utf8_lossy(&ao.stderr)
            );
            // rmi may find base:1 already gone or in use; gc always succeeds.
            if second[0] == "gc" {
                assert!(
                    zo.status.success(),
                    "{ctx}: {}",
                    String::from_utf8_lossy(&zo.stderr)
                );
            }
            assert_sound(&st, &ctx);
            let listed: Vec<String> = st.images().into_iter().flat_map(|(_, n)| n).collect();
            if first[0] == "load" {
                // Either order is right (load then rmi leaves no base:1); put it back.
                assert!(st.run(&["load", "-i", &s]).ok(), "{ctx}: reload");
            } else {
                // What the first command made is there, and whole (assert_sound).
                assert!(listed.contains(&tag), "{ctx}: {tag} lost: {listed:?}");
            }
        }
    }
}

/// Kill `strata` commands as they run, with HOME and XDG_RUNTIME_DIR kept in the test.
fn kill_after_env(st: &Store, env: &TestEnv, args: &[&str], delay: Duration) -> bool {
    kill_cmd(
        st.cmd()
            .args(args)
            .env("HOME", env.path())
            .env("XDG_RUNTIME_DIR", env.path()),
        delay,
    )
}

/// SIGKILL during `pull` (into an empty store each time) and `push`: the store lists no
/// partial image and passes `check`, the next pull or push completes, and the pushed image
/// pulls back with the same digest.
#[test]
fn sigkill_during_pull_and_push() {
    let env = TestEnv::new("crash-reg");
    let reg = registry_common::Registry::plain();
    let st = Store::in_env(&env, "store");
    let big = env.path().join("big.tar");
    rootfs_tar(&big, 8, 512, 3);
    assert!(st.import(&big, "base:1").ok());
    let ok = |st: &Store, args: &[&str]| {
        let out = st.run_env(
            args,
            &[
                ("HOME", &env.path().display().to_string()),
                ("XDG_RUNTIME_DIR", &env.path().display().to_string()),
            ],
        );
        assert!(out.ok(), "{args:?}: {out}");
        out
    };
    let remote = format!("{}/crash/base:1", reg.addr());
    let t = Instant::now();
    ok(&st, &["push", "base:1", &remote]);
    let push_span = t.elapsed().max(Duration::from_millis(5));
    let mut r = Lcg(9);
    for i in 0..6 {
        // Push to a new repository each time, so there is something to upload.
        let dest = format!("{}/crash/p{i}:1", reg.addr());
        let delay = Duration::from_micros(r.next() % (push_span.as_micros() as u64 + 1));
        kill_after_env(&st, &env, &["push", "base:1", &dest], delay);
        assert_sound(&st, &format!("push {i} killed after {delay:?}"));
        ok(&st, &["push", "base:1", &dest]);
    }
    let pst = Store::in_env(&env, "pulled");
    let t = Instant::now();
    let out = ok(&pst, &["pull", &remote]);
    let pull_span = t.elapsed().max(Duration::from_millis(5));
    let digest = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Digest: "))
        .unwrap_or("")
        .to_string();
    assert!(digest.starts_with("sha256:"), "{out}");
    let mut killed = 0;
    for i in 0..8 {
        let fresh = Store::in_env(&env, &format!("pulled{i}"));
        let delay = Duration::from_micros(r.next() % (pull_span.as_micros() as u64 + 1));
        if kill_after_env(&fresh, &env, &["pull", &remote], delay) {
            killed += 1;
        }
        let ctx = format!("pull {i} killed after {delay:?}");
        assert_sound(&fresh, &ctx);
        let out = ok(&fresh, &["pull", &remote]);
        assert!(out.stdout.contains(&digest), "{ctx}: the next pull: {out}");
    }
    assert!(
        killed >= 4,
        "only {killed} of 8 pulls were killed before they ended"
    );
    // Every pushed copy is whole: it pulls back with the same digest.
    for i in 0..6 {
        let out = ok(&pst, &["pull", &format!("{}/crash/p{i}:1", reg.addr())]);
        assert!(out.stdout.contains(&digest), "pushed copy {i}: {out}");
    }
}

/// SIGKILL during `build`: the store stays sound, the build's mounts and scratch directory
/// are reclaimed by the next build, which succeeds.
#[test]
fn sigkill_during_build() {
    let env = TestEnv::new("crash-build");
    let st = Store::in_env(&env, "store");
    let big = env.path().join("big.tar");
    rootfs_tar(&big, 4, 256, 5);
    assert!(st.import(&big, "base:1").ok());
    let ctx = env.path().join("ctx");
    fs::create_dir_all(ctx.join("data")).unwrap();
    let mut r = Lcg(21);
    for i in 0..8 {
        let data: Vec<u8> = (0..1 << 20).map(|_| r.next() as u8).collect();
        fs::write(ctx.join(format!("data/f{i}")), data).unwrap();
    }
    fs::write(
        ctx.join("Dockerfile"),
        "FROM base:1\nCOPY data /copied/\nWORKDIR /w\nCOPY data/f1 /one\n",
    )
    .unwrap();
    let c = ctx.display().to_string();
    // Half the kills hit a build on the kernel's overlayfs (`--overlay kernel`), and the
    // next build, on the other kind of mount, must clean up after it.
    let mut spans = Vec::new();
    for overlay in ["fuse", "kernel"] {
        let t = Instant::now();
        let out = st.run(&["build", "--overlay", overlay, "--no-cache", "-t", "built:1", &c]);
        assert!(out.ok(), "build alone (--overlay {overlay}): {out}");
        spans.push(t.elapsed().max(Duration::from_millis(5)));
    }
    let mounts = || -> usize {
        fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&st.root.display().to_string()))
            .count()
    };
    let mut killed = 0;
    for i in 0..8 {
        let (overlay, next) = if i % 2 == 0 {
            ("fuse", "kernel")
        } else {
            ("kernel", "fuse")
        };
        let span = spans[i % 2];
        let delay = Duration::from_micros(r.next() % (span.as_micros() as u64 + 1));
        let ctxs = format!("build {i} (--overlay {overlay}) killed after {delay:?}");
        let tag = format!("b{i}:1");
        if kill_after(
            &st,
            &["build", "--overlay", overlay, "--no-cache", "-t", &tag, &c],
            delay,
        ) {
            killed += 1;
        }
        assert_sound(&st, &ctxs);
        let out = st.run(&["build", "--overlay", next, "-t", &tag, &c]);
        assert!(out.ok(), "{ctxs}: the next build: {out}");
        assert_eq!(
            mounts(),
            0,
            "{ctxs}: mounts of the killed build left after the next one"
        );
        let left = fs::read_dir(st.root.join("build"))
            .map(|d| d.flatten().count())
            .unwrap_or(0);
        assert_eq!(left, 0, "{ctxs}: build scratch directories left");
    }
    assert!(
        killed >= 4,
        "only {killed} of 8 builds were killed before they ended"
    );
}

/// SIGKILL of the FUSE daemon while copy-ups, creates, renames, unlinks, mkdirs and an
/// opaque-directory swap (a lower directory removed and made again) run through the mount: `strata umount` recovers the dead mount; the copied-up big file shows
/// its old or its new content, never a partial copy; the next mount empties `work/work`;
/// and the kernel mounts the upper and shows the same tree as strata.
#[test]
fn sigkill_of_the_filesystem_daemon_leaves_a_consistent_upper() {
    require_fuse();
    let iters = quarter_iters();
    let big: String = (0..(16 << 20)).map(|k| (b'a' + (k % 26) as u8) as char).collect();
    let mut r = Lcg(77);
    let mut killed_mid = 0;
    for i in 0..iters {
        let ls = LayerSet::new(&format!("crash-fs{i}"), 1);
        ls.lower(0)
            .file("big", &big)
            .file("a", "a\n")
            .file("b", "b\n")
            .dir("d")
            .file("d/x", "x\n");
        let m = StrataMount::new(&ls.spec());
        let mnt = m.root().to_path_buf();
        // `set -e`: once the filesystem is gone the script stops, so "done" means it finished.
        let script =
            "set -e; for j in $(seq 300); do echo $j > n$j; if [ $j = 150 ]; then echo X >> big; fi; done; \
                      mv a a2; rm b; mkdir nd; echo y > nd/y; rm -r d; mkdir d; echo z > d/z; echo done";
        let worker = std::process::Command::new("busybox")
            .args(["sh", "-c", script])
            .current_dir(&mnt)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("busybox sh");
        thread::sleep(Duration::from_micros(r.next() % 120_000));
        let pids = strata_daemon_pids(&mnt);
        assert!(!pids.is_empty(), "no daemon for {}", mnt.display());
        for p in &pids {
            // SAFETY: kill(2) of the daemon of our own test mount.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        let out = worker.wait_with_output().unwrap();
        if !String::from_utf8_lossy(&out.stdout).contains("done") {
            killed_mid += 1;
        }
        // The mount is dead; `strata umount` must clean it up.
        let res = m.umount();
        assert!(
            res.is_ok(),
            "iteration {i}: strata umount of a dead mount: {res:?}"
        );
        let upper = ls.upper.path("");
        if let Ok(got) = fs::read(upper.join("big")) {
            let grown = format!("{big}X\n");
            assert!(
                got == big.as_bytes() || got == grown.as_bytes(),
                "iteration {i}: the copied-up file is partial ({} bytes)",
                got.len()
            );
        }
        // Mount again: staging leftovers in work/work go; strata and the kernel agree.
        let m = StrataMount::new(&ls.spec());
        let work_left: Vec<_> = fs::read_dir(ls.work.join("work"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            work_left.is_empty(),
            "iteration {i}: work/work after the remount: {work_left:?}"
        );
        let s = snapshot(m.root());
        m.umount().expect("strata umount");
        let k = KernelMount::new(&ls.spec());
        let ks = snapshot(k.root());
        k.umount().expect("kernel umount");
        assert_snapshots_eq(
            &ks,
            &s,
            "kernel",
            "strata",
            &format!("iteration {i}: after the daemon was killed"),
        );
    }
    assert!(
        killed_mid >= 1,
        "the daemon was never killed before the operations ended"
    );
}
