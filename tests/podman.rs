//! strata as containers/storage's `mount_program`, proven by the real podman and buildah
//! (Debian 12: podman 4.3, buildah 1.28), rootful and rootless.
//!
//! Each test makes a private graphroot/runroot/tmpdir, loads a busybox image that `strata
//! save` wrote (no network), and points podman and buildah at strata with
//! `--storage-opt overlay.mount_program=`. Everything it started is removed at the end,
//! and no strata mount may be left behind.

mod common;
mod image_common;
mod registry_common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::Digest;

use common::{run_cmd, strata_bin, CmdOutput, TestEnv, TestUser};
use image_common::{busybox_rootfs, tar_dir, Store};

const T: Duration = Duration::from_secs(300);

/// One private podman/buildah store using strata, run as root or as `user`.
struct Pm {
    dir: PathBuf,
    user: Option<(String, u32)>,
}

impl Pm {
    fn new(dir: &Path, user: Option<&TestUser>) -> Pm {
        for d in ["root", "runroot", "tmp", "xdg", "home"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        // This machine kind refuses rlimits above the hard limit even to root (no
        // CAP_SYS_RESOURCE): podman's defaults (nofile 1048576) would fail every run.
        fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{0}/root\"\nrunroot = \"{0}/runroot\"\n\
                 [storage.options.overlay]\nmount_program = \"{1}\"\n",
                dir.display(),
                strata_bin().display()
            ),
        )
        .unwrap();
        let user = user.map(|u| (u.name.clone(), u.uid));
        if let Some((_, uid)) = &user {
            chown_tree(dir, *uid);
            fs::set_permissions(dir.join("xdg"), fs::Permissions::from_mode(0o700)).unwrap();
        }
        let pm = Pm {
            dir: dir.to_path_buf(),
            user,
        };
        // podman really uses strata (a config it ignored would test the kernel's overlay).
        let info = pm.podman(&["info", "--format", "{{json .Store.GraphOptions}}"]);
        assert!(
            info.contains(&format!("\"Executable\":\"{}\"", strata_bin().display())),
            "podman's mount program is not strata: {info}"
        );
        pm
    }

    fn cmd(&self, prog: &str, args: &[&str]) -> Command {
        let d = &self.dir;
        let env = [
            ("CONTAINERS_STORAGE_CONF", d.join("storage.conf")),
            ("CONTAINERS_CONF", d.join("containers.conf")),
            ("TMPDIR", d.join("tmp")),
            ("XDG_RUNTIME_DIR", d.join("xdg")),
            ("HOME", d.join("home")),
        ];
        let mut c = match &self.user {
            None => Command::new(prog),
            Some((name, _)) => {
                let mut c = Command::new("runuser");
                c.args(["-u", name, "--", prog]);
                c
            }
        };
        for (k, v) in env {
            c.env(k, v);
        }
        c.args(args).current_dir(d);
        c
    }

    fn run(&self, prog: &str, args: &[&str]) -> CmdOutput {
        run_cmd(&mut self.cmd(prog, args), T)
    }

    fn ok(&self, prog: &str, args: &[&str]) -> String {
        let out = self.run(prog, args);
        assert!(out.ok(), "`{prog} {}` failed: {out}", args.join(" "));
        out.stdout
    }

    fn podman(&self, args: &[&str]) -> String {
        self.ok("podman", args)
    }

    /// strata daemons serving a mount of this store (pid, command line).
    fn daemons(&self) -> Vec<(u32, String)> {
        let mut v = Vec::new();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&*strata_bin().to_string_lossy()) && cmd.contains(self.dir.to_str().unwrap()) {
                v.push((pid, cmd));
            }
        }
        v
    }

    /// Remove what podman and buildah made, stop the rootless pause process, and check
    /// that no strata mount is left.
    fn teardown(&self) {
        let left = self.clean();
        assert!(
            left.is_empty(),
            "mounts left under {}: {left:?}",
            self.dir.display()
        );
    }

    /// The cleanup itself (also on drop, when a test failed): the mounts it had to remove.
    fn clean(&self) -> Vec<String> {
        let _ = self.run("buildah", &["rm", "--all"]);
        let _ = self.run("podman", &["rm", "-af", "-t", "0"]);
        let _ = self.run("podman", &["rmi", "-af"]);
        if self.user.is_some() {
            // The user namespace podman keeps alive between commands.
            let _ = self.run("podman", &["system", "migrate"]);
        }
        let left: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(self.dir.to_str().unwrap()))
            .map(str::to_string)
            .collect();
        for l in &left {
            if let Some(p) = l.split(' ').nth(4) {
                let _ = run_cmd(Command::new("umount").args(["-l", p]), T);
            }
        }
        left
    }
}

impl Drop for Pm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let left = self.clean();
            if !left.is_empty() {
                eprintln!("podman test: removed mounts {left:?}");
            }
        }
    }
}

fn chown_tree(p: &Path, uid: u32) {
    let out = run_cmd(
        Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(p),
        T,
    );
    assert!(out.ok(), "chown: {out}");
}

/// The busybox test image, written by `strata save` (docker-archive).
fn busybox_archive(env: &TestEnv) -> (Store, PathBuf) {
    let rootfs = env.dir("busybox-rootfs");
    busybox_rootfs(&rootfs);
    let tar = env.path().join("busybox-rootfs.tar");
    tar_dir(&rootfs, &tar);
    let store = Store::in_env(env, "strata-store");
    let s = |args: &[&str]| {
        let out = run_cmd(store.cmd().args(args), T);
        assert!(out.ok(), "strata {}: {out}", args.join(" "));
        out.stdout
    };
    s(&["import", tar.to_str().unwrap(), "busybox:latest"]);
    let save = env.path().join("busybox-save.tar");
    s(&["save", "-o", save.to_str().unwrap(), "busybox:latest"]);
    fs::set_permissions(&save, fs::Permissions::from_mode(0o644)).unwrap();
    (store, save)
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect()
}

/// Regular files and symlinks of an exported tar: path -> content (or target), without
/// what a runtime adds to a container's root.
fn tar_files(p: &Path) -> BTreeMap<String, String> {
    let mut a = tar::Archive::new(fs::File::open(p).unwrap());
    let mut m = BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if [
            "etc/mtab",
            "run/.containerenv",
            "etc/hosts",
            "etc/hostname",
            "etc/resolv.conf",
        ]
        .contains(&path.as_str())
        {
            continue;
        }
        let v = match e.header().entry_type() {
            tar::EntryType::Regular => {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut b).unwrap();
                format!(
                    "file {:o} {}",
                    e.header().mode().unwrap() & 0o7777,
                    sha2::Sha256::digest(&b)
                        .iter()
                        .map(|x| format!("{x:02x}"))
                        .collect::<String>()
                )
            }
            tar::EntryType::Symlink => format!("link {:?}", e.link_name().unwrap()),
            tar::EntryType::Link => format!("hardlink {:?}", e.link_name().unwrap()),
            _ => continue,
        };
        m.insert(path, v);
    }
    m
}

#[test]
fn rootful_podman_and_buildah() {
    common::require_fuse();
    let env = TestEnv::new("podman");
    let (store, save) = busybox_archive(&env);
    let pm = Pm::new(&env.dir("pm"), None);
    pm.podman(&["load", "-i", save.to_str().unwrap()]);

    // Run: read, write and delete lower files.
    let out = pm.podman(&[
        "run",
        "--name",
        "c1",
        "--net",
        "none",
        "busybox",
        "sh",
        "-c",
        "cat /etc/hello; echo new > /etc/newfile; rm /etc/remove-me; \
         echo more >> /usr/share/doc/README; mkdir /d; chown 1000:1001 /d; mv /opt/old /opt/moved",
    ]);
    assert_eq!(lines(&out), ["hello"]);
    // Commit, and run the new image.
    pm.podman(&["commit", "c1", "committed:1"]);
    let out = pm.podman(&[
        "run",
        "--rm",
        "--net",
        "none",
        "committed:1",
        "sh",
        "-c",
        "cat /etc/newfile /usr/share/doc/README /opt/moved/a; echo; [ -e /etc/remove-me ] || echo removed; \
         [ -e /opt/old ] || echo moved; ls -dn /d",
    ]);
    let l = lines(&out);
    assert_eq!(&l[..5], ["new", "docs", "more", "a", "removed"], "{out}");
    assert_eq!(l[5], "moved", "{out}");
    assert!(l[6].contains(" 1000 ") && l[6].contains(" 1001 "), "{out}");

    // Build: several steps, COPY from the context, a RUN on the layers before.
    let ctx = env.dir("ctx");
    fs::write(ctx.join("f"), "from the context\n").unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo a > /a\nCOPY f /f\nRUN mv /usr/share/doc /doc && rm /etc/hello && cat /a >> /f\n",
    )
    .unwrap();
    pm.podman(&[
        "build",
        "--network",
        "none",
        "-t",
        "built:1",
        ctx.to_str().unwrap(),
    ]);
    let out = pm.podman(&[
        "run",
        "--rm",
        "--net",
        "none",
        "built:1",
        "sh",
        "-c",
        "cat /a /f /doc/README; [ -e /etc/hello ] || echo gone",
    ]);
    assert_eq!(lines(&out), ["a", "from the context", "a", "docs", "gone"]);

    // Export: podman's view of the image's root is strata's.
    pm.podman(&["create", "--name", "c2", "busybox", "true"]);
    let px = env.path().join("podman-export.tar");
    pm.podman(&["export", "-o", px.to_str().unwrap(), "c2"]);
    let sx = env.path().join("strata-export.tar");
    let o = run_cmd(
        store
            .cmd()
            .args(["export", "busybox:latest", "-o", sx.to_str().unwrap()]),
        T,
    );
    assert!(o.ok(), "strata export: {o}");
    let (pf, sf) = (tar_files(&px), tar_files(&sx));
    assert!(
        sf.contains_key("etc/hello") && sf.contains_key("bin/busybox"),
        "{sf:?}"
    );
    assert_eq!(pf, sf, "podman export (left) and strata export (right) differ");

    // buildah: from, run, commit; podman runs the result.
    let ctr = pm.ok("buildah", &["from", "--pull-never", "busybox"]);
    let ctr = ctr.trim();
    pm.ok(
        "buildah",
        &[
            "run",
            "--network",
            "none",
            ctr,
            "--",
            "sh",
            "-c",
            "echo b > /b; rm /etc/hello",
        ],
    );
    pm.ok("buildah", &["commit", ctr, "bimg:1"]);
    let out = pm.podman(&[
        "run",
        "--rm",
        "--net",
        "none",
        "bimg:1",
        "sh",
        "-c",
        "cat /b; [ -e /etc/hello ] || echo gone",
    ]);
    assert_eq!(lines(&out), ["b", "gone"]);

    // A container killed, then removed by force: its strata daemon and mount go with it.
    pm.podman(&[
        "run",
        "-d",
        "--name",
        "k",
        "--net",
        "none",
        "busybox",
        "sh",
        "-c",
        "busybox sleep 300",
    ]);
    assert!(
        !pm.daemons().is_empty(),
        "no strata daemon serves the running container"
    );
    pm.podman(&["kill", "k"]);
    pm.podman(&["rm", "-f", "k"]);
    let start = std::time::Instant::now();
    while !pm.daemons().is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        pm.daemons().is_empty(),
        "strata daemons left after podman kill + rm -f: {:?}",
        pm.daemons()
    );
    pm.teardown();
}

#[test]
fn rootless_podman_keeps_owners() {
    common::require_fuse();
    let env = TestEnv::new("podman-rl");
    let (_store, save) = busybox_archive(&env);
    let home = env.path().join("user-home");
    let user = TestUser::create_named(&home, &format!("strata-pm-{}", std::process::id()));
    let subuid = fs::read_to_string("/etc/subuid").unwrap_or_default();
    assert!(
        subuid.lines().any(|l| l.starts_with(&format!("{}:", user.name))),
        "useradd gave {} no /etc/subuid range (rootless podman needs one)",
        user.name
    );
    let pm = Pm::new(&env.dir("pm"), Some(&user));
    fs::copy(&save, pm.dir.join("busybox.tar")).unwrap();
    chown_tree(&pm.dir.join("busybox.tar"), user.uid);
    pm.podman(&["load", "-i", "busybox.tar"]);

    // Several owners inside the container: they map to the user's subordinate IDs.
    let script = "set -e; cat /etc/hello; echo x > /x; touch /u1000 /u65534; \
                  chown 1000:1000 /u1000; chown 65534:65534 /u65534; rm /etc/remove-me; \
                  mkdir -p /var/lib/app/sub; chown -R 1000:1000 /var/lib/app; ls -n /u1000 /u65534";
    let out = pm.podman(&[
        "run", "--name", "r1", "--net", "none", "busybox", "sh", "-c", script,
    ]);
    let l = lines(&out);
    assert_eq!(l[0], "hello", "{out}");
    assert!(l[1].contains(" 1000 ") && l[1].ends_with("/u1000"), "{out}");
    assert!(l[2].contains(" 65534 ") && l[2].ends_with("/u65534"), "{out}");
    pm.podman(&["commit", "r1", "rl:1"]);
    let check =
        "ls -n /u1000 /u65534; ls -dn /var/lib/app/sub; cat /x; [ -e /etc/remove-me ] || echo removed";
    let out = pm.podman(&["run", "--rm", "--net", "none", "rl:1", "sh", "-c", check]);
    let l = lines(&out);
    assert!(l[0].contains(" 1000 ") && l[1].contains(" 65534 "), "{out}");
    assert!(l[2].contains(" 1000 "), "{out}");
    assert_eq!(&l[3..], ["x", "removed"], "{out}");

    // Containers with their own ID ranges (containers/storage passes uidmapping= then).
    for (opts, id) in [
        (&["--uidmap", "0:1:5000", "--gidmap", "0:1:5000"][..], "1000"),
        (&["--userns=auto"][..], "42"),
    ] {
        let mut args = vec!["run", "--rm", "--net", "none"];
        args.extend_from_slice(opts);
        let script = format!("echo x > /m; chown {id}:{id} /m; ls -n /m; cat /etc/hello");
        args.extend_from_slice(&["busybox", "sh", "-c", &script]);
        let out = pm.podman(&args);
        let l = lines(&out);
        assert!(
            l[0].contains(&format!(" {id} ")) && l[1] == "hello",
            "{opts:?}: {out}"
        );
    }

    // The owners are in the layer itself: in `podman save`'s, and in the one `podman push`
    // sends to a registry (a private one on 127.0.0.1, read back from its storage).
    pm.podman(&["save", "-o", "rl.tar", "rl:1"]);
    let owners = top_layer_owners(&pm.dir.join("rl.tar"));
    assert_eq!(owners.get("u1000"), Some(&(1000, 1000)), "{owners:?}");
    assert_eq!(owners.get("u65534"), Some(&(65534, 65534)), "{owners:?}");
    assert_eq!(owners.get("x"), Some(&(0, 0)), "{owners:?}");
    let reg = registry_common::Registry::plain();
    let dest = format!("docker://{}/rl:1", reg.addr());
    pm.podman(&["push", "--tls-verify=false", "--format", "v2s2", "rl:1", &dest]);
    let raw = registry_common::skopeo(
        &env.dir("skopeo"),
        &["inspect", "--raw", "--tls-verify=false", &dest],
    );
    let m: serde_json::Value = serde_json::from_str(&raw.stdout).expect("pushed manifest");
    let top = m["layers"]
        .as_array()
        .and_then(|l| l.last())
        .expect("pushed layers")["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = fs::read(reg.blob_data_path(&top)).expect("pushed layer blob");
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut tar).expect("gzip layer");
    let pushed = tar_owners(&tar);
    assert_eq!(pushed.get("u1000"), Some(&(1000, 1000)), "pushed: {pushed:?}");
    assert_eq!(pushed.get("u65534"), Some(&(65534, 65534)), "pushed: {pushed:?}");

    // A rootless build with a chown in a RUN.
    let ctx = pm.dir.join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo a > /a && chown 1000:1000 /a\nRUN cat /a > /b\n",
    )
    .unwrap();
    chown_tree(&ctx, user.uid);
    pm.podman(&["build", "--network", "none", "-t", "rlb:1", "ctx"]);
    let out = pm.podman(&[
        "run",
        "--rm",
        "--net",
        "none",
        "rlb:1",
        "sh",
        "-c",
        "ls -n /a; cat /b",
    ]);
    let l = lines(&out);
    assert!(l[0].contains(" 1000 "), "{out}");
    assert_eq!(l[1], "a");
    // Files in the store belong to the user or its subordinate range, never to root.
    let md = fs::metadata(pm.dir.join("root")).unwrap();
    assert_eq!(md.uid(), user.uid);
    pm.teardown();
    drop(user);
}

/// (uid, gid) of each entry of the last layer of a docker-archive.
fn top_layer_owners(archive: &Path) -> BTreeMap<String, (u64, u64)> {
    let manifest = image_common::tar_member(archive, "manifest.json").expect("manifest.json");
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layers = m[0]["Layers"].as_array().expect("Layers");
    let blob = image_common::tar_member(archive, layers.last().unwrap().as_str().unwrap()).expect("layer");
    tar_owners(&blob)
}

/// (uid, gid) of each entry of a layer tar.
fn tar_owners(blob: &[u8]) -> BTreeMap<String, (u64, u64)> {
    let mut a = tar::Archive::new(blob);
    let mut out = BTreeMap::new();
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        let p = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        out.insert(p, (e.header().uid().unwrap(), e.header().gid().unwrap()));
    }
    out
}
