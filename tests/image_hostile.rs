//! Hostile layer tars fed to `strata import`: path traversal, absolute names,
//! writes through symlinks, escaping hard links, duplicates, truncated data,
//! absurd sizes, bad whiteouts. Each must be refused (non-zero exit, message
//! naming the entry), leave no image behind and write nothing outside the
//! store. The archives are written with a raw ustar writer
//! (image_common::RawTar) because the `tar` crate refuses most of them.
//!
//! Layout of each case's temp dir (so relative escapes land where we look):
//!   T/sentinel/...          files that must not change
//!   T/input.tar             the hostile archive
//!   T/a/b/c/d/store         the store root
//!   T/a/b/c/d/store-tmp     strata's TMPDIR
//!   T/out/                  export output (when import wrongly succeeds)

mod common;
mod image_common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use image_common::*;

/// Names a successful escape would create (files planted by the archives).
const PLANTED: &[&str] = &["evil", "escape", "pwned"];

/// Host files a successful escape could touch.
const HOST_FILES: &[&str] = &["/etc/passwd", "/etc/hostname"];
const HOST_MUST_NOT_EXIST: &[&str] = &[
    "/etc/evil",
    "/evil",
    "/escape",
    "/tmp/escape",
    "/tmp/evil",
    "/pwned",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Import must fail with a message naming one of the needles.
    Reject,
    /// Must import (the entry is legal); the exported tree is checked.
    Accept,
}

struct Case {
    name: &'static str,
    tar: Vec<u8>,
    /// At least one of these must appear in stderr when the import fails.
    needles: Vec<&'static str>,
    expect: Expect,
    /// Feed the archive on stdin (`import - NAME`) instead of by path.
    stdin: bool,
    /// Feed the archive to `strata load -i` instead of `import`.
    load: bool,
}

impl Case {
    fn new(name: &'static str, tar: Vec<u8>, needles: &[&'static str]) -> Case {
        Case {
            name,
            tar,
            needles: needles.to_vec(),
            expect: Expect::Reject,
            stdin: false,
            load: false,
        }
    }
}

/// Outcome of one case, for the failure message.
struct Outcome {
    import: CmdOutput,
    export: Option<CmdOutput>,
    export_names: Vec<String>,
}

fn leaks(t: &Path, store: &Store) -> Vec<String> {
    let mut found = Vec::new();
    for p in walk_names(t, std::slice::from_ref(&store.root)) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if PLANTED.contains(&name.as_str()) {
            let full = t.join(&p);
            let where_ = if full.starts_with(&store.tmp) {
                "strata's TMPDIR (leftover extraction?)"
            } else {
                "outside the store"
            };
            found.push(format!("{} ({where_})", full.display()));
        }
    }
    found
}

type HostState = Vec<(String, Option<(String, u64, u64)>)>;

fn host_state() -> HostState {
    HOST_FILES
        .iter()
        .map(|p| (p.to_string(), host_file_state(Path::new(p))))
        .collect()
}

fn run_case(case: Case) {
    let env = TestEnv::new(&format!("hostile-{}", case.name));
    let t = env.path().to_path_buf();
    // Sentinels at several depths: an escape with N `..` lands near one.
    for d in ["sentinel", "a/sentinel", "a/b/c/sentinel", "a/b/c/d/sentinel"] {
        let p = t.join(d);
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("keep"), "keep").unwrap();
    }
    let store = Store::at(&t.join("a/b/c/d/store"), &t.join("a/b/c/d/store-tmp"));
    let input = t.join("input.tar");
    fs::write(&input, &case.tar).unwrap();
    let host_missing_before: Vec<&str> = HOST_MUST_NOT_EXIST
        .iter()
        .copied()
        .filter(|p| fs::symlink_metadata(p).is_err())
        .collect();
    let host_before = host_state();
    let before = outside_store_snapshot(&t, &store);

    // Precondition: the store commands work at all, so a refusal below is
    // about the archive and not, say, an unknown verb or option.
    let pre = store.run(&["images"]);
    assert!(
        pre.ok(),
        "hostile case {}: `strata images` fails on a fresh store, cannot test import: {pre}",
        case.name
    );

    let image = format!("hostile-{}", case.name.replace('_', "-"));
    let start = Instant::now();
    let import = if case.load {
        store.run(&["load", "-i", &input.display().to_string()])
    } else if case.stdin {
        store.import_stdin(&input, &image)
    } else {
        store.import(&input, &image)
    };
    let took = start.elapsed();

    let mut problems = Vec::new();
    if import.timed_out {
        problems.push(format!("import timed out after {took:?}"));
    }
    if took > Duration::from_secs(60) {
        problems.push(format!("import took {took:?} (expected to fail fast)"));
    }

    // If the import was accepted, see what the hostile layer does on export.
    let mut outcome = Outcome {
        import,
        export: None,
        export_names: Vec::new(),
    };
    let out_dir = t.join("out");
    fs::create_dir_all(&out_dir).unwrap();
    if outcome.import.ok() && !case.load {
        let out_tar = out_dir.join("export.tar");
        let ex = store.export(&image, &out_tar);
        if ex.ok() {
            outcome.export_names = tar_names(&out_tar);
        }
        outcome.export = Some(ex);
    }

    // Store state: `images` must still work and (if refused) not list the image.
    let images = store.run(&["images"]);
    if !images.ok() {
        problems.push(format!("`strata images` fails after the import: {images}"));
    }
    let listed = if case.load {
        // A refused load must leave the store empty.
        images.ok() && !store.images().is_empty()
    } else {
        images.stdout.contains(&image)
    };

    match (case.expect, outcome.import.ok()) {
        (Expect::Reject, true) => problems.push(format!(
            "import ACCEPTED the hostile archive; export afterwards: {}{}",
            match &outcome.export {
                Some(e) if e.ok() => format!("succeeded, entries {:?}", outcome.export_names),
                Some(e) => format!("failed ({e})"),
                None => "not run".into(),
            },
            if listed {
                "; image is listed by `strata images`"
            } else {
                ""
            }
        )),
        (Expect::Accept, false) => {
            problems.push(format!("import of a legal archive FAILED: {}", outcome.import))
        }
        (_, false) => {
            let err = outcome.import.stderr.to_string();
            if !case.needles.iter().any(|n| err.contains(n)) {
                problems.push(format!(
                    "error message does not name the entry (one of {:?}): {:?}",
                    case.needles,
                    err.trim()
                ));
            }
            if listed {
                problems.push(format!(
                    "`strata images` lists {image} after a failed import:\n{}",
                    images.stdout
                ));
            }
            if err.contains("Usage:") {
                problems.push(format!(
                    "import failed with a usage error, not a refusal: {err:?}"
                ));
            }
            if outcome.import.status.is_none() && !outcome.import.timed_out {
                problems.push(format!("import was killed by a signal: {}", outcome.import));
            }
        }
        (_, true) => {
            if let Some(ex) = &outcome.export {
                if !ex.ok() {
                    problems.push(format!("imported, but export fails: {ex}"));
                } else if case.expect == Expect::Accept
                    && !case
                        .needles
                        .iter()
                        .all(|n| outcome.export_names.contains(&norm_name(n)))
                {
                    problems.push(format!(
                        "exported tree lacks {:?}: {:?}",
                        case.needles, outcome.export_names
                    ));
                }
            }
        }
    }

    // Nothing written outside the store (the export output dir excepted).
    let mut after = outside_store_snapshot(&t, &store);
    after.retain(|p, _| !p.starts_with("out"));
    let mut before_cmp = before.clone();
    before_cmp.retain(|p, _| !p.starts_with("out"));
    let d = diff_snapshots(&before_cmp, &after, "before", "after");
    if !d.is_empty() {
        problems.push(format_diffs("files outside the store changed", &d));
    }
    let l = leaks(&t, &store);
    if !l.is_empty() {
        problems.push(format!("planted files found: {l:?}"));
    }
    for p in host_missing_before {
        if fs::symlink_metadata(p).is_ok() {
            problems.push(format!("host file {p} was CREATED"));
        }
    }
    let host_after = host_state();
    if host_after != host_before {
        problems.push(format!("host files changed: {host_before:?} -> {host_after:?}"));
    }
    // Whatever happened, strata's temp dir should be cleaned up.
    let tmp_left = walk_names(&store.tmp, &[]);
    if !tmp_left.is_empty() {
        problems.push(format!(
            "strata left files in its TMPDIR {}: {:?}",
            store.tmp.display(),
            tmp_left.iter().take(10).collect::<Vec<_>>()
        ));
    }

    let verdict = if outcome.import.ok() {
        match &outcome.export {
            Some(e) if e.ok() => "accepted at import and export",
            Some(_) => "accepted at import, refused at export",
            None => "accepted at import",
        }
    } else {
        "refused at import"
    };
    eprintln!(
        "case {}: {verdict}; stderr: {}",
        case.name,
        outcome.import.stderr.trim()
    );
    assert!(
        problems.is_empty(),
        "hostile case {} ({verdict}):\n  - {}\nimport: {}",
        case.name,
        problems.join("\n  - "),
        outcome.import
    );
}

/// Snapshot of everything in the temp dir except the store and its TMPDIR.
fn outside_store_snapshot(t: &Path, store: &Store) -> Snapshot {
    let mut s = snapshot(t);
    let st = store.root.strip_prefix(t).unwrap().to_path_buf();
    let tmp = store.tmp.strip_prefix(t).unwrap().to_path_buf();
    s.retain(|p: &PathBuf, _| !p.starts_with(&st) && !p.starts_with(&tmp));
    // Directory nlink and the d-dir's entry change when the store is created.
    for (p, e) in s.iter_mut() {
        if e.kind == Kind::Dir {
            e.nlink = None;
        }
        let _ = p;
    }
    s
}

// ---------------------------------------------------------------------------
// The corpus.

fn base() -> RawTar {
    let mut t = RawTar::new();
    t.dir("etc/").file("etc/ok", b"fine\n");
    t
}

#[test]
fn control_benign_archive_imports() {
    // Same writer, nothing hostile: must import, with DiffID = sha256(input).
    let mut t = base();
    t.dir("bin/")
        .file("bin/tool", b"#!/bin/sh\n")
        .symlink("bin/abs-link", "/etc/ok")
        .symlink("rootlink", "/")
        .hardlink("etc/ok-link", "etc/ok")
        .pax("etc/PaxHeaders/x", &[("SCHILY.xattr.user.k", b"v")])
        .file("etc/with-xattr", b"x")
        .fifo("etc/fifo");
    let tar = t.finish();
    let env = TestEnv::new("hostile-control");
    // Our writer must produce archives GNU tar accepts.
    let input = env.path().join("in.tar");
    fs::write(&input, &tar).unwrap();
    must(
        std::process::Command::new("tar").arg("-tvf").arg(&input),
        "GNU tar listing of the control archive",
    );
    let store = Store::in_env(&env, "store");
    let out = store.import(&input, "control:1");
    assert!(out.ok(), "import of a benign archive failed: {out}");
    let v = store.inspect("control:1");
    assert_eq!(
        inspect_diff_ids(&v),
        vec![sha256_file(&input)],
        "import must store the tar verbatim (DiffID = sha256 of the input)"
    );
    assert!(
        store.images_text().contains("control"),
        "images does not list control:1"
    );
    let dir = env.path().join("x");
    store.export_tree("control:1", &env.path().join("e.tar"), &dir);
    assert_eq!(fs::read_link(dir.join("rootlink")).unwrap(), Path::new("/"));
    assert_eq!(
        fs::read_link(dir.join("bin/abs-link")).unwrap(),
        Path::new("/etc/ok")
    );
    assert_eq!(fs::read(dir.join("etc/ok-link")).unwrap(), b"fine\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(dir.join("etc/ok")).unwrap().ino(),
        fs::metadata(dir.join("etc/ok-link")).unwrap().ino(),
        "hard link not preserved by export"
    );
    assert_eq!(
        get_xattr(&dir.join("etc/with-xattr"), "user.k", false).unwrap(),
        b"v"
    );
    // Import from stdin gives the same layer.
    let out = store.import_stdin(&input, "control:stdin");
    assert!(out.ok(), "import - (stdin) failed: {out}");
    assert_eq!(store.diff_ids("control:stdin"), vec![sha256_file(&input)]);
}

#[test]
fn dotdot_entry() {
    let mut t = base();
    t.file("../escape", b"escaped");
    run_case(Case::new("dotdot", t.finish(), &["../escape"]));
}

#[test]
fn dotdot_deep_entry() {
    // Enough `..` to reach / from anywhere under /tmp, then into /tmp.
    let mut t = base();
    let name = format!("{}tmp/escape", "../".repeat(16));
    t.file(&name, b"escaped");
    run_case(Case::new("dotdot_deep", t.finish(), &["../../", "tmp/escape"]));
}

#[test]
fn dotdot_in_the_middle() {
    let mut t = base();
    t.file("etc/../../escape", b"escaped");
    run_case(Case::new(
        "dotdot_middle",
        t.finish(),
        &["etc/../../escape", "../escape"],
    ));
}

#[test]
fn dotdot_from_stdin() {
    let mut t = base();
    t.file("../escape", b"escaped");
    let mut c = Case::new("dotdot_stdin", t.finish(), &["../escape"]);
    c.stdin = true;
    run_case(c);
}

#[test]
fn absolute_entry() {
    let mut t = base();
    t.file("/etc/evil", b"evil");
    run_case(Case::new("absolute", t.finish(), &["/etc/evil", "etc/evil"]));
}

#[test]
fn write_through_symlink_to_root() {
    let mut t = base();
    t.symlink("link", "/").file("link/evil", b"evil");
    run_case(Case::new("symlink_root", t.finish(), &["link/evil"]));
}

#[test]
fn write_through_symlink_dir_chain() {
    // The symlink is deeper and the entry goes through it into a subdir.
    let mut t = base();
    t.dir("a/").symlink("a/l", "/tmp").file("a/l/evil", b"evil");
    run_case(Case::new("symlink_chain", t.finish(), &["a/l/evil"]));
}

#[test]
fn write_through_relative_escaping_symlink() {
    let mut t = base();
    let up = "../".repeat(16);
    t.symlink("up", up.trim_end_matches('/'))
        .file("up/tmp/escape", b"escaped");
    // The symlink itself is data (docker takes it); the write through it is refused.
    run_case(Case::new("symlink_dotdot", t.finish(), &["up/tmp/escape"]));
}

#[test]
fn escaping_symlink_alone() {
    // A symlink whose target leaves the root is legal layer content (it is resolved
    // inside the container, where ".." stops at the root): stored verbatim, as docker
    // does, and nothing is created through it.
    let mut t = base();
    t.symlink("etc/up", "../../../../../../etc/passwd");
    let mut c = Case::new("symlink_alone", t.finish(), &["etc/up"]);
    c.expect = Expect::Accept;
    run_case(c);
}

#[test]
fn hardlink_escaping() {
    let mut t = base();
    t.hardlink("pw", "../../etc/passwd");
    run_case(Case::new(
        "hardlink_dotdot",
        t.finish(),
        &["pw", "../../etc/passwd"],
    ));
}

#[test]
fn hardlink_absolute_outside_archive() {
    let mut t = base();
    t.hardlink("pw", "/etc/passwd");
    run_case(Case::new("hardlink_abs", t.finish(), &["pw", "/etc/passwd"]));
}

#[test]
fn hardlink_to_missing_target() {
    let mut t = base();
    t.hardlink("etc/dangling", "etc/nothere");
    run_case(Case::new(
        "hardlink_missing",
        t.finish(),
        &["etc/dangling", "etc/nothere"],
    ));
}

#[test]
fn hardlink_through_symlink() {
    let mut t = base();
    t.symlink("link", "/").hardlink("pwned", "link/etc/passwd");
    run_case(Case::new(
        "hardlink_via_symlink",
        t.finish(),
        &["pwned", "link/etc/passwd"],
    ));
}

#[test]
fn hardlink_to_directory() {
    let mut t = base();
    t.hardlink("etcdir", "etc");
    run_case(Case::new("hardlink_dir", t.finish(), &["etcdir"]));
}

#[test]
fn duplicate_entries() {
    let mut t = base();
    t.file("etc/dup", b"first").file("etc/dup", b"second");
    run_case(Case::new("duplicate", t.finish(), &["etc/dup"]));
}

#[test]
fn truncated_file_data() {
    let mut t = base();
    let mut e = RawEntry::new("etc/big", b'0');
    e.size_field = 1 << 20;
    e.data = b"0123456789".to_vec();
    e.pad = false;
    t.entry(e);
    run_case(Case::new(
        "truncated",
        t.unfinished(),
        &["etc/big", "truncat", "unexpected end"],
    ));
}

#[test]
fn truncated_header() {
    let mut t = base();
    let mut tar = t.finish();
    tar.truncate(BLOCK + 100); // in the middle of the second header
    run_case(Case::new(
        "truncated_header",
        tar,
        &["etc/ok", "truncat", "unexpected end", "corrupt"],
    ));
}

#[test]
fn giant_pax_header() {
    // A PAX extended header whose size field claims 8 GiB; only a few bytes follow.
    let mut t = base();
    let mut e = RawEntry::new("etc/PaxHeaders/huge", b'x');
    e.size_field = 8 << 30;
    e.data = pax_records(&[("path", b"etc/huge")]);
    e.pad = true;
    t.entry(e);
    t.file("etc/huge", b"x");
    run_case(Case::new(
        "giant_pax",
        t.finish(),
        &["huge", "PaxHeaders", "pax", "PAX"],
    ));
}

#[test]
fn pax_size_record_lies() {
    // A sane PAX header that says the next file is 8 GiB (data: 10 bytes).
    let mut t = base();
    t.pax("etc/PaxHeaders/liar", &[("size", b"8589934592")]);
    let mut e = RawEntry::new("etc/liar", b'0');
    e.size_field = 10;
    e.data = b"0123456789".to_vec();
    t.entry(e);
    run_case(Case::new(
        "pax_size",
        t.finish(),
        &["etc/liar", "truncat", "unexpected end"],
    ));
}

#[test]
fn char_device_entry() {
    let mut t = base();
    t.dir("dev/").chardev("dev/null2", 1, 3);
    let mut c = Case::new("chardev", t.finish(), &["dev/null2"]);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    c.expect = if root { Expect::Accept } else { Expect::Reject };
    run_case(c);
}

#[test]
fn whiteout_without_name() {
    let mut t = base();
    t.file("etc/.wh.", b"");
    run_case(Case::new("wh_alone", t.finish(), &["etc/.wh.", ".wh."]));
}

#[test]
fn whiteout_with_dotdot_name() {
    // `.wh...` would whiteout `..`: a deletion outside the directory.
    let mut t = base();
    t.file("etc/.wh...", b"");
    run_case(Case::new("wh_dotdot", t.finish(), &[".wh..."]));
}

#[test]
fn not_a_tar() {
    let run =
        |name: &'static str, data: Vec<u8>| run_case(Case::new(name, data, &["tar", "archive", "header"]));
    run("garbage", b"this is not a tar archive, just text\n".repeat(40));
}

// ---------------------------------------------------------------------------
// Hostile archives for `strata load`: the same checks, one level up.

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// How to spoil an otherwise valid OCI archive.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Spoil {
    None,
    /// Layer bytes changed after the digest was computed.
    LayerBytes,
    /// Config diff_ids do not match the layer.
    DiffId,
    /// The manifest names a blob that is not in the archive.
    MissingBlob,
}

/// An OCI archive (oci-layout, index.json, blobs) holding one image with `layer`.
fn oci_archive(layer: &[u8], spoil: Spoil) -> Vec<u8> {
    let layer_digest = digest(layer);
    let diff_id = if spoil == Spoil::DiffId {
        digest(b"something else")
    } else {
        layer_digest.clone()
    };
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "hostile-load:1"},
        }],
    })
    .to_string()
    .into_bytes();
    let mut t = RawTar::new();
    t.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .file("index.json", &index)
        .dir("blobs/")
        .dir("blobs/sha256/");
    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    t.file(&blob(&digest(&config)), &config)
        .file(&blob(&digest(&manifest)), &manifest);
    match spoil {
        Spoil::MissingBlob => {}
        Spoil::LayerBytes => {
            let mut bad = layer.to_vec();
            let n = bad.len();
            bad[n / 3] ^= 0xff;
            t.file(&blob(&digest(layer)), &bad);
        }
        _ => {
            t.file(&blob(&digest(layer)), layer);
        }
    }
    t.finish()
}

fn benign_layer() -> Vec<u8> {
    let mut t = base();
    t.file("etc/hello", b"hello\n");
    t.finish()
}

fn load_case(name: &'static str, tar: Vec<u8>, needles: &[&'static str]) -> Case {
    let mut c = Case::new(name, tar, needles);
    c.load = true;
    c
}

#[test]
fn load_control_valid_oci_archive() {
    // The archive builder itself is sound: unspoiled, it loads.
    let mut c = load_case("load_ok", oci_archive(&benign_layer(), Spoil::None), &[]);
    c.expect = Expect::Accept;
    run_case(c);
}

#[test]
fn load_layer_with_dotdot_entry() {
    let mut t = base();
    t.file("../escape", b"escaped");
    run_case(load_case(
        "load_dotdot",
        oci_archive(&t.finish(), Spoil::None),
        &["../escape"],
    ));
}

#[test]
fn load_layer_writing_through_symlink() {
    let mut t = base();
    t.symlink("link", "/").file("link/evil", b"evil");
    run_case(load_case(
        "load_symlink",
        oci_archive(&t.finish(), Spoil::None),
        &["link/evil"],
    ));
}

#[test]
fn load_layer_digest_mismatch() {
    let layer = benign_layer();
    let hex = digest(&layer).trim_start_matches("sha256:")[..12].to_string();
    let tar = oci_archive(&layer, Spoil::LayerBytes);
    let needles: &'static [&'static str] =
        Box::leak(vec![&*Box::leak(hex.into_boxed_str()), "digest"].into_boxed_slice());
    run_case(load_case("load_bad_digest", tar, needles));
}

#[test]
fn load_config_diff_id_mismatch() {
    run_case(load_case(
        "load_bad_diffid",
        oci_archive(&benign_layer(), Spoil::DiffId),
        &["diff", "DiffID", "diff_id"],
    ));
}

#[test]
fn load_missing_blob() {
    let layer = benign_layer();
    let hex = digest(&layer).trim_start_matches("sha256:")[..12].to_string();
    let needles: &'static [&'static str] =
        Box::leak(vec![&*Box::leak(hex.into_boxed_str()), "missing"].into_boxed_slice());
    run_case(load_case(
        "load_missing_blob",
        oci_archive(&layer, Spoil::MissingBlob),
        needles,
    ));
}

#[test]
fn load_docker_manifest_path_traversal() {
    // A docker-archive manifest.json whose paths leave the archive.
    let manifest = br#"[{"Config":"../../../../../../etc/passwd","RepoTags":["hostile-load:1"],"Layers":["../../../../../../etc/hostname"]}]"#;
    let mut t = RawTar::new();
    t.file("manifest.json", manifest);
    run_case(load_case(
        "load_manifest_dotdot",
        t.finish(),
        &["../", "etc/passwd", "etc/hostname"],
    ));
}

#[test]
fn load_docker_archive_with_escaping_layer_symlink() {
    // skopeo-style docker archive whose layer.tar is a symlink out of the archive.
    let layer = benign_layer();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]},
    })
    .to_string()
    .into_bytes();
    let cfg_name = format!("{}.json", digest(&config).trim_start_matches("sha256:"));
    let manifest = serde_json::json!([{
        "Config": cfg_name, "RepoTags": ["hostile-load:1"], "Layers": ["v1/layer.tar"],
    }])
    .to_string()
    .into_bytes();
    let mut t = RawTar::new();
    t.file("manifest.json", &manifest)
        .file(&cfg_name, &config)
        .dir("v1/")
        .symlink("v1/layer.tar", "/etc/passwd");
    run_case(load_case(
        "load_layer_symlink_out",
        t.finish(),
        &["v1/layer.tar", "/etc/passwd"],
    ));
}

/// Regular files in the store other than the layout skeleton.
fn store_files(store: &Store) -> Vec<String> {
    snapshot(&store.root)
        .into_iter()
        .filter(|(p, e)| {
            e.kind != Kind::Dir
                && !["index.json", "oci-layout", "lock"]
                    .iter()
                    .any(|k| p == Path::new(k))
        })
        .map(|(p, _)| p.display().to_string())
        .collect()
}

#[test]
fn refused_archives_leave_no_blobs() {
    // Separate from the security checks above: a refused import/load should
    // not leave the hostile bytes behind as unreferenced blobs (and if it
    // does, `strata gc` must remove them).
    let env = TestEnv::new("hostile-blobs");
    let store = Store::in_env(&env, "store");
    let mut t = base();
    t.file("../escape", b"escaped");
    let input = env.path().join("in.tar");
    fs::write(&input, t.finish()).unwrap();
    let out = store.import(&input, "x:1");
    assert!(!out.ok(), "hostile import accepted: {out}");
    let after_import = store_files(&store);
    let out = store.run(&["load", "-i", &input.display().to_string()]);
    assert!(!out.ok(), "load of a non-image archive accepted: {out}");
    let after_load = store_files(&store);
    let gc = store.run(&["gc"]);
    let after_gc = store_files(&store);
    if !after_import.is_empty() || !after_load.is_empty() {
        eprintln!(
            "NOTE: refused import/load left unreferenced files in the store (after import \
             {after_import:?}, after load {after_load:?}); `strata gc` must remove them"
        );
    }
    assert!(gc.ok(), "strata gc failed: {gc}");
    assert!(
        after_gc.is_empty(),
        "files of refused archives survive `strata gc`: {after_gc:?} (after import {after_import:?})"
    );
}

// ---------------------------------------------------------------------------
// `strata check`: a damaged store is found and repaired.

#[test]
fn check_finds_and_repairs_a_damaged_store() {
    let env = TestEnv::new("check");
    let st = Store::in_env(&env, "store");
    let tar = env.path().join("rootfs.tar");
    fs::write(&tar, benign_layer()).unwrap();
    assert!(st.import(&tar, "good:1").ok());
    let mut t = RawTar::new();
    t.file("other.txt", b"other image\n");
    fs::write(env.path().join("other.tar"), t.finish()).unwrap();
    assert!(st.import(&env.path().join("other.tar"), "other:1").ok());

    let out = st.run(&["check", "--layers"]);
    assert!(out.ok(), "a sound store: {out}");
    assert!(out.stdout.contains("0 problems"), "{out}");

    // A corrupt config blob of good:1 and a tampered unpacked layer of other:1.
    let id = st.image_id("good:1");
    let blob = st
        .root
        .join("blobs/sha256")
        .join(id.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&blob).unwrap();
    bytes.push(b' ');
    fs::write(&blob, bytes).unwrap();
    let other_diff = st.diff_ids("other:1")[0].clone();
    let layer = st
        .root
        .join("layers")
        .join(other_diff.trim_start_matches("sha256:"));
    fs::write(layer.join("other.txt"), b"tampered\n").unwrap();

    let out = st.run(&["check", "--layers"]);
    assert_eq!(out.status, Some(1), "problems found: {out}");
    assert!(out.stdout.contains("content does not match the digest"), "{out}");
    assert!(out.stdout.contains("differs from its blob"), "{out}");

    let out = st.run(&["check", "--layers", "--repair"]);
    assert!(out.ok(), "repair: {out}");
    assert!(out.stdout.contains("after repair: 0 problems"), "{out}");
    // good:1 could not be trusted and is gone; other:1 only lost its unpacked copy, which
    // is unpacked again (untampered) when needed.
    let names: Vec<String> = st.images().into_iter().flat_map(|(_, n)| n).collect();
    assert!(!names.iter().any(|n| n.starts_with("good")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("other")), "{names:?}");
    assert!(!blob.exists(), "the corrupt blob is still there");
    let tree = env.path().join("other-tree");
    st.export_tree("other:1", &env.path().join("other-out.tar"), &tree);
    assert_eq!(fs::read(tree.join("other.txt")).unwrap(), b"other image\n");
    let out = st.run(&["check", "--layers"]);
    assert!(
        out.ok() && out.stdout.contains("0 problems"),
        "after repair: {out}"
    );
}

/// `-o /dev/null` (or any device) is written in place: the device node must survive (a
/// write-beside-and-rename would replace it with a regular file).
#[test]
fn output_to_a_device_writes_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let env = TestEnv::new("devout");
    let st = Store::in_env(&env, "store");
    let tar = env.path().join("rootfs.tar");
    fs::write(&tar, benign_layer()).unwrap();
    assert!(st.import(&tar, "dev:1").ok());
    for verb in ["export", "save"] {
        let out = st.run(&[verb, "-o", "/dev/null", "dev:1"]);
        assert!(out.ok(), "{verb} -o /dev/null: {out}");
        let md = fs::metadata("/dev/null").unwrap();
        assert!(
            md.file_type().is_char_device(),
            "{verb} -o /dev/null replaced the device node"
        );
    }
}

/// gc keeps what a running build wrote (its blobs are named only when its steps finish),
/// and collects it once no build runs.
#[test]
fn gc_keeps_what_a_live_build_wrote() {
    let env = TestEnv::new("gcbuild");
    let st = Store::in_env(&env, "store");
    let tar = env.path().join("rootfs.tar");
    fs::write(&tar, benign_layer()).unwrap();
    assert!(st.import(&tar, "keep:1").ok());
    // An unreferenced blob, as a build step writes before its cache entry names it.
    let data = b"a layer a build just wrote";
    let hex = sha256_hex(data);
    let blob = st.root.join("blobs/sha256").join(&hex);
    fs::write(&blob, data).unwrap();
    // A live build: this test process, started a minute ago.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 60;
    let bdir = st
        .root
        .join("build")
        .join(format!("{}-{started}", std::process::id()));
    fs::create_dir_all(&bdir).unwrap();
    assert!(st.run(&["gc"]).ok());
    assert!(blob.exists(), "gc removed a blob written during a live build");
    fs::remove_dir_all(&bdir).unwrap();
    let out = st.run(&["gc"]);
    assert!(out.ok(), "{out}");
    assert!(
        !blob.exists(),
        "gc kept an unreferenced blob with no build running: {out}"
    );
    assert!(st.run(&["check"]).ok());
}

/// `load` reads standard input (no `-i`, or `-i -`), and an archive of several images
/// is loaded all or nothing: when a later image is broken, the earlier one is not listed.
#[test]
fn load_from_stdin_and_all_or_nothing() {
    let env = TestEnv::new("load-stdin");
    let store = Store::in_env(&env, "store");
    let strata = |args: &[&str], stdin: Option<&Path>| {
        let mut c = store.cmd();
        c.args(args);
        match stdin {
            Some(p) => run_with_stdin(&mut c, p, Duration::from_secs(120)),
            None => run_cmd(&mut c, Duration::from_secs(120)),
        }
    };
    let root = env.dir("rootfs");
    fs::write(root.join("hello"), "hello\n").unwrap();
    let tar = env.path().join("rootfs.tar");
    tar_dir(&root, &tar);
    assert!(strata(&["import", tar.to_str().unwrap(), "one:1"], None).ok());
    let save = env.path().join("one.tar");
    assert!(strata(&["save", "-o", save.to_str().unwrap(), "one:1"], None).ok());
    assert!(strata(&["rmi", "one:1"], None).ok());

    // Standard input, both spellings.
    let out = strata(&["load"], Some(&save));
    assert!(out.ok() && out.stdout.contains("Loaded image: one:1"), "{out}");
    assert!(strata(&["rmi", "one:1"], None).ok());
    let out = strata(&["load", "-i", "-"], Some(&save));
    assert!(out.ok() && out.stdout.contains("Loaded image: one:1"), "{out}");
    assert!(strata(&["rmi", "one:1"], None).ok());

    // The same archive with a second image whose config is missing.
    let manifest = tar_member(&save, "manifest.json").expect("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let mut second = m[0].clone();
    second["Config"] = "missing.json".into();
    second["RepoTags"] = serde_json::json!(["two:1"]);
    m.as_array_mut().unwrap().push(second);
    let two = env.path().join("two.tar");
    {
        let mut a = tar::Archive::new(fs::File::open(&save).unwrap());
        let mut b = tar::Builder::new(fs::File::create(&two).unwrap());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().into_owned();
            let mut h = e.header().clone();
            let name = path.to_string_lossy().trim_start_matches("./").to_string();
            if name == "index.json" || name == "oci-layout" {
                // Docker form only (strata's save writes both; the OCI index wins).
                continue;
            }
            if name == "manifest.json" {
                let data = serde_json::to_vec(&m).unwrap();
                h.set_size(data.len() as u64);
                h.set_cksum();
                b.append(&h, &data[..]).unwrap();
            } else {
                b.append(&h, &mut e).unwrap();
            }
        }
        b.finish().unwrap();
    }
    let out = strata(&["load", "-i", two.to_str().unwrap()], None);
    assert!(!out.ok() && out.stderr.contains("missing.json"), "{out}");
    let images = strata(&["images"], None);
    assert!(
        !images.stdout.contains("one"),
        "a failed multi-image load left the first image listed:\n{}",
        images.stdout
    );
}
