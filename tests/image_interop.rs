//! Image commands against real peer tools: skopeo, umoci and a private
//! dockerd (all installed by scripts/install-deps), plus mount -> commit
//! round trips and reproducibility.
//!
//! Missing tools are a failure (run scripts/install-deps). A dockerd that
//! cannot start fails the docker test under CI (CI env var set) and is
//! reported and skipped elsewhere.

mod common;
mod image_common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use common::*;
use image_common::*;

const EPOCH: &str = "1700000000";
const EPOCH_RFC3339: &str = "2023-11-14T22:13:20";

// ---------------------------------------------------------------------------
// Peer tools.

/// skopeo with a permissive policy (no /etc/containers/policy.json needed)
/// and its temp files inside the test dir.
fn skopeo(tmp: &Path, args: &[&str]) -> CmdOutput {
    fs::create_dir_all(tmp).unwrap();
    must(
        Command::new(require_tool("skopeo"))
            .arg("--insecure-policy")
            .args(args)
            .env("TMPDIR", tmp),
        &format!("skopeo {}", args.join(" ")),
    )
}

fn umoci(args: &[&str]) -> CmdOutput {
    must(
        Command::new(require_tool("umoci")).args(args),
        &format!("umoci {}", args.join(" ")),
    )
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// diff_ids of an OCI layout image, per `umoci stat --json`.
fn umoci_diff_ids(layout: &Path, tag: &str) -> Vec<String> {
    let out = umoci(&["stat", "--image", &format!("{}:{tag}", s(layout)), "--json"]);
    let v: Value = serde_json::from_str(&out.stdout).expect("umoci stat json");
    v["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| !h["empty_layer"].as_bool().unwrap_or(false))
        .map(|h| h["diff_id"].as_str().unwrap().to_string())
        .collect()
}

/// diff_ids per `skopeo inspect --config`.
fn skopeo_diff_ids(tmp: &Path, reference: &str) -> Vec<String> {
    let out = skopeo(tmp, &["inspect", "--config", reference]);
    let v: Value = serde_json::from_str(&out.stdout).expect("skopeo inspect --config json");
    v["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// Config digest of `tag` in an OCI layout dir (= the image ID).
fn layout_config_digest(layout: &Path, tag: &str) -> String {
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))
        .unwrap_or_else(|| panic!("tag {tag} not in {}", layout.display()));
    let mdig = desc["digest"].as_str().unwrap();
    let m: Value = serde_json::from_slice(&fs::read(blob_path(layout, mdig)).unwrap()).unwrap();
    m["config"]["digest"].as_str().unwrap().to_string()
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap();
    layout.join("blobs").join(alg).join(hex)
}

/// sha256 of the config member named by a docker-archive's manifest.json.
fn docker_archive_config_digest(archive: &Path) -> String {
    let m = tar_member(archive, "manifest.json").expect("docker archive has manifest.json");
    let v: Value = serde_json::from_slice(&m).unwrap();
    let cfg = v[0]["Config"].as_str().unwrap();
    let bytes = tar_member(archive, cfg).unwrap_or_else(|| panic!("{cfg} missing in {}", archive.display()));
    format!("sha256:{}", sha256_hex(&bytes))
}

fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    umoci(&["unpack", "--image", &format!("{}:{tag}", s(layout)), &s(bundle)]);
    bundle.join("rootfs")
}

fn assert_trees(a: &Snapshot, b: &Snapshot, an: &str, bn: &str, ctx: &str) {
    assert_snapshots_eq(a, b, an, bn, ctx);
}

// ---------------------------------------------------------------------------
// Fixtures.

struct Fixture {
    env: TestEnv,
    store: Store,
    rootfs: PathBuf,
    base_tar: PathBuf,
}

/// A busybox rootfs imported as `base:1`.
fn fixture(tag: &str) -> Fixture {
    require_fuse();
    let env = TestEnv::new(tag);
    let rootfs = env.dir("rootfs");
    busybox_rootfs(&rootfs);
    let base_tar = env.path().join("base.tar");
    tar_dir(&rootfs, &base_tar);
    let store = Store::in_env(&env, "store");
    store.ok(&["import", &s(&base_tar), "base:1"]);
    Fixture {
        env,
        store,
        rootfs,
        base_tar,
    }
}

/// An overlay upper dir (kernel encoding) with every kind of change on top of
/// busybox_rootfs(): new/modified files, whiteouts (file and dir), an opaque
/// dir, hard links, xattrs, symlink, fifo.
fn app_upper(dir: &Path) {
    let l = Layer {
        root: dir.to_path_buf(),
    };
    l.file("etc/new-file", "new\n")
        .xattr("etc/new-file", "user.k", "v")
        .whiteout("etc/remove-me")
        .whiteout("usr/share/doc")
        .opaque("opt/old")
        .file("opt/old/fresh", "fresh")
        .symlink("bin/app-link", "busybox")
        .file("var/lib/app/data", "modified")
        .chown("var/lib/app/data", 1000, 1000)
        .file("srv/x", "hard")
        .hardlink("srv/x2", "srv/x")
        .chown("srv/x", 1234, 5678)
        .fifo("srv/fifo")
        .file_mode("srv/secret", "s", 0o600)
        .dir_mode("srv/sticky", 0o1777);
    set_times(&dir.join("srv/x"), (1_600_000_000, 0), (1_600_000_000, 0), false).unwrap();
    // Parent dirs of changes: keep their modes like the lower's.
    for d in [
        "etc",
        "usr",
        "usr/share",
        "opt",
        "bin",
        "var",
        "var/lib",
        "var/lib/app",
        "srv",
    ] {
        fs::set_permissions(dir.join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// The merged tree of base + app_upper per kernel overlayfs (read-only).
fn reference_tree(f: &Fixture, upper: &Path) -> Snapshot {
    let ov = RoOverlay::new(&[upper, &f.rootfs], &f.env.path().join("ref-mnt"));
    let t = tree(&ov.mnt);
    ov.umount();
    t
}

fn commit(store: &Store, upper: &Path, base: &str, name: &str, extra: &[&str], env: &[(&str, &str)]) {
    let mut args = vec!["commit", "--upper"];
    let up = s(upper);
    args.push(&up);
    args.extend(["--base", base]);
    args.extend(extra);
    args.push(name);
    store.ok_env(&args, env);
}

fn mounted_tree(store: &Store, image: &str, base: &Path) -> Snapshot {
    let m = store.mount_image(image, base);
    let t = tree(m.root());
    m.umount().unwrap_or_else(|e| panic!("{e}"));
    t
}

fn exported_tree(store: &Store, image: &str, base: &Path) -> Snapshot {
    let tar = base.with_extension("tar");
    let ov = tar_overlay_xattrs_after_export(store, image, &tar, base);
    assert!(
        ov.is_empty(),
        "export of {image} leaks overlay-private xattrs: {ov:?}"
    );
    tree(base)
}

fn tar_overlay_xattrs_after_export(
    store: &Store,
    image: &str,
    tar: &Path,
    dir: &Path,
) -> Vec<(String, String)> {
    store.export_tree(image, tar, dir);
    let names = tar_names(tar);
    let wh: Vec<&String> = names
        .iter()
        .filter(|n| n.rsplit('/').next().unwrap_or("").starts_with(".wh."))
        .collect();
    assert!(wh.is_empty(), "export of {image} contains whiteouts: {wh:?}");
    tar_overlay_xattrs(tar)
}

// ---------------------------------------------------------------------------
// (a) our save -> skopeo -> umoci.

#[test]
fn save_is_read_by_skopeo_and_umoci() {
    let f = fixture("interop-save");
    let st = &f.store;
    let upper = f.env.dir("app-upper");
    app_upper(&upper);
    commit(st, &upper, "base:1", "app:1", &["-m", "app layer"], &[]);
    let reference = reference_tree(&f, &upper);

    let ours = st.inspect("app:1");
    let our_id = inspect_id(&ours);
    let our_diff_ids = inspect_diff_ids(&ours);
    assert_eq!(
        our_diff_ids.len(),
        2,
        "base + one committed layer: {our_diff_ids:?}"
    );
    assert_eq!(our_diff_ids[0], sha256_file(&f.base_tar), "base layer DiffID");
    // The committed layer must not carry overlay-private xattrs.
    let tmp = f.env.dir("skopeo-tmp");

    // Strata's own views agree with kernel overlayfs.
    let exp = exported_tree(st, "app:1", &f.env.path().join("export"));
    assert_trees(
        &reference,
        &exp,
        "kernel",
        "export",
        "strata export app:1 vs kernel overlay",
    );
    let mnt = mounted_tree(st, "app:1", &f.env.dir("m1"));
    assert_trees(
        &reference,
        &mnt,
        "kernel",
        "mount",
        "strata mount app:1 vs kernel overlay",
    );

    let save = f.env.path().join("save.tar");
    st.ok(&["save", "-o", &s(&save), "app:1"]);
    let names = tar_names(&save);
    for want in ["oci-layout", "index.json", "manifest.json"] {
        assert!(
            names.iter().any(|n| n == want),
            "save archive lacks {want}: {names:?}"
        );
    }

    let layout = f.env.path().join("oci");
    skopeo(
        &tmp,
        &[
            "copy",
            &format!("oci-archive:{}", s(&save)),
            &format!("oci:{}:fromoci", s(&layout)),
        ],
    );
    skopeo(
        &tmp,
        &[
            "copy",
            &format!("docker-archive:{}", s(&save)),
            &format!("oci:{}:fromdocker", s(&layout)),
        ],
    );

    for tag in ["fromoci", "fromdocker"] {
        let r = format!("oci:{}:{tag}", s(&layout));
        assert_eq!(
            skopeo_diff_ids(&tmp, &r),
            our_diff_ids,
            "skopeo inspect --config {tag} diff_ids"
        );
        assert_eq!(
            umoci_diff_ids(&layout, tag),
            our_diff_ids,
            "umoci stat {tag} diff_ids"
        );
        let rootfs = umoci_unpack(&layout, tag, &f.env.path().join(format!("bundle-{tag}")));
        assert_trees(
            &reference,
            &tree(&rootfs),
            "kernel",
            "umoci",
            &format!("umoci unpack of {tag}"),
        );
    }
    // oci-archive -> oci copies the config bytes: same image ID.
    assert_eq!(
        layout_config_digest(&layout, "fromoci"),
        our_id,
        "config digest after skopeo copy oci-archive: differs from strata's image Id"
    );
}

// ---------------------------------------------------------------------------
// (b) an image made by umoci -> skopeo archives -> our load.

#[test]
fn umoci_image_loads_from_oci_and_docker_archives() {
    require_fuse();
    let env = TestEnv::new("interop-umoci");
    let tmp = env.dir("skopeo-tmp");
    let layout = env.path().join("img");
    let lay = s(&layout);
    umoci(&["init", "--layout", &lay]);
    umoci(&["new", "--image", &format!("{lay}:base")]);
    let b1 = env.path().join("bundle1");
    umoci(&["unpack", "--image", &format!("{lay}:base"), &s(&b1)]);
    let r1 = b1.join("rootfs");
    busybox_rootfs(&r1);
    fs::create_dir_all(r1.join("srv")).unwrap();
    mknod(&r1.join("srv/fifo"), libc::S_IFIFO | 0o640, 0, 0).unwrap();
    umoci(&[
        "repack",
        "--image",
        &format!("{lay}:v1"),
        "--history.comment",
        "add busybox",
        "--history.created_by",
        "manual",
        &s(&b1),
    ]);
    // Second layer: delete a file and a dir, replace a dir's contents, add files.
    let b2 = env.path().join("bundle2");
    umoci(&["unpack", "--image", &format!("{lay}:v1"), &s(&b2)]);
    let r2 = b2.join("rootfs");
    fs::remove_file(r2.join("etc/remove-me")).unwrap();
    fs::remove_dir_all(r2.join("usr/share/doc")).unwrap();
    fs::remove_dir_all(r2.join("opt/old")).unwrap();
    fs::create_dir_all(r2.join("opt/old")).unwrap();
    fs::write(r2.join("opt/old/fresh"), "fresh").unwrap();
    fs::write(r2.join("etc/added"), "added").unwrap();
    set_xattr(&r2.join("etc/added"), "user.k", b"v", false).unwrap();
    umoci(&["repack", "--image", &format!("{lay}:v2"), &s(&b2)]);
    umoci(&[
        "config",
        "--image",
        &format!("{lay}:v2"),
        "--tag",
        "v2",
        "--config.cmd",
        "/bin/sh",
        "--config.env",
        "FOO=bar",
        "--config.workingdir",
        "/etc",
        "--config.label",
        "a=b",
    ]);
    let want_diff_ids = umoci_diff_ids(&layout, "v2");
    assert_eq!(want_diff_ids.len(), 2);
    let want_rootfs = umoci_unpack(&layout, "v2", &env.path().join("bundle-ref"));
    let want_tree = tree(&want_rootfs);

    let x = env.path().join("x-oci.tar");
    let y = env.path().join("y-docker.tar");
    skopeo(
        &tmp,
        &[
            "copy",
            &format!("oci:{lay}:v2"),
            &format!("oci-archive:{}:v2", s(&x)),
        ],
    );
    skopeo(
        &tmp,
        &[
            "copy",
            &format!("oci:{lay}:v2"),
            &format!("docker-archive:{}:example/x:v2", s(&y)),
        ],
    );

    let cases = [
        ("oci-archive", &x, layout_config_digest(&layout, "v2")),
        ("docker-archive", &y, docker_archive_config_digest(&y)),
    ];
    let mut failures = Vec::new();
    for (what, archive, want_id) in cases {
        let st = Store::in_env(&env, &format!("store-{what}"));
        let out = st.run(&["load", "-i", &s(archive)]);
        if !out.ok() {
            failures.push(format!("`strata load -i` {what} failed: {out}"));
            continue;
        }
        let img = st.only_image();
        let v = st.inspect(&img);
        let got_ids = inspect_diff_ids(&v);
        if got_ids != want_diff_ids {
            failures.push(format!(
                "{what}: diff_ids {got_ids:?} != umoci's {want_diff_ids:?}"
            ));
        }
        let id = inspect_id(&v);
        if id != want_id {
            failures.push(format!(
                "{what}: image Id {id} != sha256 of the archive's config bytes {want_id} (config re-serialised?)"
            ));
        }
        let cfg = inspect_config(&v);
        if cfg.pointer("/config/Cmd") != Some(&serde_json::json!(["/bin/sh"])) {
            failures.push(format!("{what}: config.Cmd lost: {cfg}"));
        }
        let t = mounted_tree(&st, &img, &env.dir(&format!("m-{what}")));
        let d = diff_snapshots(&want_tree, &t, "umoci", "strata");
        if !d.is_empty() {
            failures.push(format_diffs(&format!("{what}: strata mount vs umoci unpack"), &d));
        }
        let e = exported_tree(&st, &img, &env.path().join(format!("export-{what}")));
        let d = diff_snapshots(&want_tree, &e, "umoci", "export");
        if !d.is_empty() {
            failures.push(format_diffs(
                &format!("{what}: strata export vs umoci unpack"),
                &d,
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// (c) docker.

fn loaded_ref(out: &CmdOutput) -> String {
    for l in out.stdout.lines() {
        if let Some(r) = l.strip_prefix("Loaded image: ") {
            return r.trim().to_string();
        }
        if let Some(r) = l.strip_prefix("Loaded image ID: ") {
            return r.trim().to_string();
        }
    }
    panic!("cannot find the loaded image in docker load output: {out}");
}

#[test]
fn docker_loads_our_save_and_we_load_docker_save() {
    let f = fixture("interop-docker");
    let st = &f.store;
    let upper = f.env.dir("app-upper");
    app_upper(&upper);
    commit(
        st,
        &upper,
        "base:1",
        "app:1",
        &["-m", "app layer", "-c", "CMD [\"/bin/sh\"]"],
        &[],
    );
    let our_id = st.image_id("app:1");
    let our_ids = st.diff_ids("app:1");
    let save = f.env.path().join("save.tar");
    st.ok(&["save", "-o", &s(&save), "app:1"]);
    let our_tree = exported_tree(st, "app:1", &f.env.path().join("export-ours"));

    let Some(dk) = docker_or_skip() else { return };
    let out = dk.ok(&["load", "-i", &s(&save)]);
    let r = loaded_ref(&out);
    let insp = dk.ok(&["image", "inspect", &r]);
    let v: Value = serde_json::from_str(&insp.stdout).unwrap();
    let layers: Vec<String> = v[0]["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        layers, our_ids,
        "docker image inspect RootFS.Layers vs strata diff_ids"
    );
    assert_eq!(
        v[0]["Id"].as_str().unwrap(),
        our_id,
        "docker image Id vs strata Id"
    );
    assert_eq!(
        v[0]["Config"]["Cmd"],
        serde_json::json!(["/bin/sh"]),
        "CMD from commit -c"
    );
    let hist = dk.ok(&["history", "--no-trunc", "--format", "{{.ID}}\t{{.Comment}}", &r]);
    let first = hist.stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&our_id),
        "docker history top row {first:?} is not image {our_id}"
    );
    assert!(
        hist.stdout.contains("app layer"),
        "docker history lacks the commit message: {}",
        hist.stdout
    );

    // docker save of that image -> strata load in a fresh store.
    let dsave = f.env.path().join("docker-save.tar");
    dk.ok(&["save", "-o", &s(&dsave), &r]);
    let st2 = Store::in_env(&f.env, "store-from-docker");
    st2.ok(&["load", "-i", &s(&dsave)]);
    let img = st2.only_image();
    assert_eq!(
        st2.diff_ids(&img),
        our_ids,
        "diff_ids after docker save -> strata load"
    );
    assert_eq!(
        st2.image_id(&img),
        our_id,
        "image Id after docker save -> strata load"
    );
    let back = exported_tree(&st2, &img, &f.env.path().join("export-back"));
    assert_trees(
        &our_tree,
        &back,
        "ours",
        "via docker",
        "export after docker round trip",
    );

    // A docker-native image (docker import) -> docker save -> strata load.
    dk.ok(&["import", "-m", "flat", &s(&f.base_tar), "flat:1"]);
    let fsave = f.env.path().join("docker-flat.tar");
    dk.ok(&["save", "-o", &s(&fsave), "flat:1"]);
    let st3 = Store::in_env(&f.env, "store-flat");
    st3.ok(&["load", "-i", &s(&fsave)]);
    let img = st3.only_image();
    assert_eq!(
        st3.diff_ids(&img),
        vec![sha256_file(&f.base_tar)],
        "docker import -> save -> strata load: DiffID must be sha256 of the flat tar"
    );
    assert_eq!(st3.image_id(&img), docker_archive_config_digest(&fsave));
    let t = mounted_tree(&st3, &img, &f.env.dir("m-flat"));
    let base_tree = tree(&f.rootfs);
    assert_trees(
        &base_tree,
        &t,
        "rootfs",
        "strata",
        "docker-imported image mounted by strata",
    );
    drop(dk);
}

// ---------------------------------------------------------------------------
// (d) mount -> change -> umount -> commit -> mount the new image.

#[test]
fn mount_commit_round_trip() {
    let f = fixture("roundtrip");
    let st = &f.store;
    let upper = f.env.dir("upper");
    let work = f.env.dir("work");
    let mnt = f.env.dir("mnt");
    let m = st.mount_image_with("base:1", &upper, &work, &mnt);
    let r = m.root().to_path_buf();
    // The base as mounted equals the rootfs it was imported from.
    assert_trees(&tree(&f.rootfs), &tree(&r), "rootfs", "mount", "base:1 mounted");
    // Deletes: a file and a directory tree.
    fs::remove_file(r.join("etc/remove-me")).unwrap();
    fs::remove_dir_all(r.join("usr/share/doc")).unwrap();
    // Opaque: remove a dir and recreate it with new content.
    fs::remove_dir_all(r.join("opt/old")).unwrap();
    fs::create_dir(r.join("opt/old")).unwrap();
    fs::write(r.join("opt/old/fresh"), "fresh").unwrap();
    // Hard links: a new pair, and a new name for a lower file.
    fs::create_dir(r.join("srv")).unwrap();
    fs::write(r.join("srv/new"), "new").unwrap();
    fs::hard_link(r.join("srv/new"), r.join("srv/new-link")).unwrap();
    fs::hard_link(r.join("bin/busybox"), r.join("srv/busybox-link")).unwrap();
    // xattrs on a new file and on a copied-up lower file.
    set_xattr(&r.join("srv/new"), "user.k", b"v", false).unwrap();
    set_xattr(&r.join("var/lib/app/data"), "user.lower", b"up", false).unwrap();
    // fifo, symlink, owner and mode changes, a modified file.
    mknod(&r.join("srv/fifo"), libc::S_IFIFO | 0o640, 0, 0).unwrap();
    std::os::unix::fs::symlink("../etc/hello", r.join("srv/sym")).unwrap();
    lchown(&r.join("srv/new"), 1234, 5678).unwrap();
    fs::set_permissions(r.join("etc/passwd"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(r.join("var/lib/app/data"), "rewritten").unwrap();
    let merged = tree(&r);
    // Sanity: the merged view shows what we did.
    assert!(fs::metadata(r.join("srv/fifo")).unwrap().file_type().is_fifo());
    assert_eq!(fs::metadata(r.join("srv/new")).unwrap().nlink(), 2);
    m.umount().unwrap_or_else(|e| panic!("{e}"));

    // strata diff --upper: A/C/D lines.
    let out = st.ok(&["diff", "--upper", &s(&upper), "--base", "base:1"]);
    let d = parse_diff_lines(&out.stdout);
    let mut problems = Vec::new();
    for (p, k) in [
        ("/etc/remove-me", "D"),
        ("/usr/share/doc", "D"),
        ("/srv", "A"),
        ("/srv/new", "A"),
        ("/srv/fifo", "A"),
        ("/srv/sym", "A"),
        ("/etc/passwd", "C"),
        ("/var/lib/app/data", "C"),
    ] {
        if d.get(p).map(String::as_str) != Some(k) {
            problems.push(format!("expected `{k} {p}`, got {:?}", d.get(p)));
        }
    }
    if !d.contains_key("/opt/old") && !d.contains_key("/opt/old/fresh") {
        problems.push("no line for the recreated /opt/old".into());
    }
    if d.contains_key("/usr/share/doc/README") {
        problems.push("children of a deleted dir listed (docker lists only the dir)".into());
    }
    assert!(
        problems.is_empty(),
        "strata diff --upper:\n{}\n{problems:#?}",
        out.stdout
    );
    let js = st.ok(&[
        "diff",
        "--upper",
        &s(&upper),
        "--base",
        "base:1",
        "--format",
        "json",
    ]);
    let _: Value = serde_json::from_str(js.stdout.trim())
        .unwrap_or_else(|e| panic!("diff --format json is not JSON ({e}): {}", js.stdout));

    commit(
        st,
        &upper,
        "base:1",
        "rt:1",
        &["-m", "round trip", "-a", "Tester <t@example.com>"],
        &[],
    );
    let ids = st.diff_ids("rt:1");
    assert_eq!(ids.len(), 2, "rt:1 layers: {ids:?}");
    assert_eq!(ids[0], sha256_file(&f.base_tar));

    // The new image, mounted with a fresh upper, equals the merged view.
    let again = mounted_tree(st, "rt:1", &f.env.dir("m2"));
    assert_trees(
        &merged,
        &again,
        "merged",
        "rt:1",
        "committed image vs merged tree before umount",
    );
    let exp = exported_tree(st, "rt:1", &f.env.path().join("export"));
    assert_trees(&merged, &exp, "merged", "export", "export of rt:1 vs merged tree");

    // Image-to-image diff names the same paths.
    let out = st.ok(&["diff", "base:1", "rt:1"]);
    let d2 = parse_diff_lines(&out.stdout);
    for p in ["/etc/remove-me", "/usr/share/doc", "/srv/new", "/etc/passwd"] {
        assert_eq!(
            d.get(p),
            d2.get(p),
            "diff base:1 rt:1 vs diff --upper for {p}:\n{}",
            out.stdout
        );
    }

    // History: the commit message and author are recorded.
    let h = st.ok(&["history", "--no-trunc", "rt:1"]);
    assert!(
        h.stdout.contains("round trip"),
        "history lacks the message:\n{}",
        h.stdout
    );
    let cfg = st.config("rt:1");
    assert_eq!(
        cfg["author"].as_str(),
        Some("Tester <t@example.com>"),
        "config author"
    );
}

// ---------------------------------------------------------------------------
// (e) reproducibility.

#[test]
fn commit_is_reproducible_with_source_date_epoch() {
    let f = fixture("repro");
    let upper = f.env.dir("app-upper");
    app_upper(&upper);
    let env = [("SOURCE_DATE_EPOCH", EPOCH)];
    let st = &f.store;
    commit(st, &upper, "base:1", "repro:1", &["-m", "m"], &env);
    thread::sleep(Duration::from_millis(1100));
    commit(st, &upper, "base:1", "repro:2", &["-m", "m"], &env);
    let (a, b) = (st.image_id("repro:1"), st.image_id("repro:2"));
    assert_eq!(a, b, "same upper + SOURCE_DATE_EPOCH must give the same image id");
    // A second store holding the same base (moved over with save/load) agrees. A fresh
    // import would be a different base: its config records when it was imported.
    let st2 = Store::in_env(&f.env, "store2");
    let moved = f.env.path().join("base-moved.tar");
    st.ok(&["save", "-o", &s(&moved), "base:1"]);
    st2.ok(&["load", "-i", &s(&moved)]);
    commit(&st2, &upper, "base:1", "other:9", &["-m", "m"], &env);
    assert_eq!(st2.image_id("other:9"), a, "image id differs between stores");
    let cfg = st.config("repro:1");
    let created = cfg["created"].as_str().unwrap_or_default();
    assert!(
        created.starts_with(EPOCH_RFC3339),
        "config.created {created:?} does not honour SOURCE_DATE_EPOCH={EPOCH}"
    );
    // Compressed variants: same DiffID as the uncompressed layer.
    let want = st.diff_ids("repro:1");
    for c in ["none", "gzip", "zstd"] {
        let name = format!("repro-{c}:1");
        commit(st, &upper, "base:1", &name, &["-m", "m", "--compress", c], &env);
        assert_eq!(
            st.diff_ids(&name),
            want,
            "--compress {c}: DiffIDs must not depend on compression"
        );
        let name2 = format!("repro-{c}:2");
        commit(st, &upper, "base:1", &name2, &["-m", "m", "--compress", c], &env);
        assert_eq!(
            st.image_id(&name),
            st.image_id(&name2),
            "--compress {c} not reproducible"
        );
    }
}

/// The docker harness itself: the private daemon starts, answers, and
/// leaves no process, mount or state dir behind.
#[test]
fn private_dockerd_starts_and_stops_cleanly() {
    let Some(dk) = docker_or_skip() else { return };
    let info = dk.ok(&["info", "--format", "{{.Driver}} {{.ServerVersion}}"]);
    eprintln!("private dockerd: {}", info.stdout.trim());
    let dir = dk.dir.path().to_path_buf();
    let mut dk = dk;
    dk.stop();
    assert!(
        dk.our_pids().is_empty(),
        "dockerd/containerd still running: {:?}",
        dk.our_pids()
    );
    drop(dk);
    assert!(!dir.exists(), "dockerd state dir {} not removed", dir.display());
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "mounts left under {}",
        dir.display()
    );
}

// ---------------------------------------------------------------------------
// commit --squash / --exclude, and the tag / rmi / gc life cycle.

#[test]
fn squash_exclude_and_image_lifecycle() {
    let f = fixture("squash");
    let st = &f.store;
    let upper = f.env.dir("app-upper");
    app_upper(&upper);
    let reference = reference_tree(&f, &upper);

    // --squash: one layer holding the whole merged tree.
    commit(st, &upper, "base:1", "sq:1", &["--squash"], &[]);
    assert_eq!(
        st.diff_ids("sq:1").len(),
        1,
        "--squash must give a one-layer image"
    );
    let t = exported_tree(st, "sq:1", &f.env.path().join("export-sq"));
    assert_trees(&reference, &t, "kernel", "squashed", "commit --squash");
    let t = mounted_tree(st, "sq:1", &f.env.dir("m-sq"));
    assert_trees(
        &reference,
        &t,
        "kernel",
        "squashed mount",
        "commit --squash, mounted",
    );

    // --exclude: the matching paths (and everything under a matching dir) are left out.
    commit(
        st,
        &upper,
        "base:1",
        "ex:1",
        &["--exclude", "/srv/secret", "--exclude", "srv/sticky"],
        &[],
    );
    let t = exported_tree(st, "ex:1", &f.env.path().join("export-ex"));
    let mut want = reference.clone();
    want.remove(Path::new("srv/secret"));
    want.remove(Path::new("srv/sticky"));
    assert_trees(&want, &t, "expected", "excluded", "commit --exclude");

    // tag / images / rmi / gc.
    st.ok(&["tag", "sq:1", "sq:alias"]);
    assert_eq!(st.image_id("sq:alias"), st.image_id("sq:1"));
    let listed = st.images();
    let sq_id = st.image_id("sq:1");
    let entry = listed
        .iter()
        .find(|(id, _)| normalize_digest(id).starts_with(&sq_id[..19]) || sq_id.contains(id.as_str()))
        .unwrap_or_else(|| panic!("images --format json lacks {sq_id}: {listed:?}"));
    assert!(
        entry.1.iter().any(|t| t.ends_with("sq:1")) && entry.1.iter().any(|t| t.ends_with("sq:alias")),
        "images lists tags {:?} for {sq_id}",
        entry.1
    );
    st.ok(&["rmi", "sq:alias"]);
    assert!(
        st.run(&["inspect", "sq:alias"]).status != Some(0),
        "sq:alias still resolves after rmi"
    );
    assert_eq!(st.image_id("sq:1"), sq_id, "rmi of one tag removed the image");
    st.ok(&["rmi", "sq:1"]);
    let gone = st.run(&["inspect", "sq:1"]);
    assert!(!gone.ok(), "sq:1 still resolves after rmi");
    assert!(
        gone.stderr.contains("sq"),
        "error does not name the reference: {gone}"
    );
    st.ok(&["gc"]);
    // Images that remain are intact after gc.
    for img in ["base:1", "ex:1"] {
        let t = exported_tree(
            st,
            img,
            &f.env.path().join(format!("after-gc-{}", img.replace(':', "-"))),
        );
        assert!(!t.is_empty(), "{img} empty after gc");
    }
}

#[test]
fn import_with_changes_and_message() {
    let env = TestEnv::new("import-changes");
    let rootfs = env.dir("rootfs");
    busybox_rootfs(&rootfs);
    let tar = env.path().join("flat.tar");
    tar_dir(&rootfs, &tar);
    let st = Store::in_env(&env, "store");
    st.ok(&[
        "import",
        &s(&tar),
        "flat:1",
        "-c",
        "CMD [\"/bin/sh\"]",
        "-c",
        "ENV A=1",
        "-c",
        "WORKDIR /etc",
        "-m",
        "imported for a test",
    ]);
    let v = st.inspect("flat:1");
    assert_eq!(
        inspect_diff_ids(&v),
        vec![sha256_file(&tar)],
        "DiffID = sha256 of the input"
    );
    let cfg = inspect_config(&v);
    assert_eq!(
        cfg.pointer("/config/Cmd"),
        Some(&serde_json::json!(["/bin/sh"])),
        "{cfg}"
    );
    let env_list = cfg
        .pointer("/config/Env")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    assert!(
        env_list.contains(&serde_json::json!("A=1")),
        "Env lacks A=1: {cfg}"
    );
    assert_eq!(
        cfg.pointer("/config/WorkingDir"),
        Some(&serde_json::json!("/etc")),
        "{cfg}"
    );
    let h = st.ok(&["history", "--no-trunc", "flat:1"]);
    assert!(
        h.stdout.contains("imported for a test"),
        "history lacks -m: {}",
        h.stdout
    );
    let hj = st.ok(&["history", "--format", "json", "flat:1"]);
    let _: Value = serde_json::from_str(hj.stdout.trim()).expect("history --format json");
    let bad = st.run(&["import", &s(&tar), "flat:2", "-c", "FROBNICATE x"]);
    assert!(!bad.ok(), "unknown -c instruction accepted: {bad}");
    assert!(
        bad.stderr.contains("FROBNICATE"),
        "error does not name the instruction: {bad}"
    );
}
