//! `strata check`: is the store what it says it is? Every image the index names (and every
//! state the build cache names) must have its manifest, config and layer blobs, each with
//! the digest and size its descriptor gives; with `layers`, every layer blob must also
//! decompress to its config's DiffID and its unpacked directory (if any) must hold what a
//! fresh unpack gives. `repair` removes what cannot be trusted: corrupt blobs, index entries
//! and cache entries of incomplete images, unpacked layers that differ; then collects garbage.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use oci_spec::image::{ImageConfiguration, ImageManifest};

use super::digest;
use super::layer;
use super::store::{make_writable_and_remove, Store};

/// One thing wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// What it concerns (`blob sha256:…`, `image name:tag`, `layer sha256:…`).
    pub what: String,
    /// What is wrong.
    pub why: String,
}

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Images looked at (index entries and cache states).
    pub images: usize,
    /// Blobs verified.
    pub blobs: usize,
    /// Unpacked layers compared (with `layers`).
    pub layers: usize,
    /// Problems, sorted.
    pub problems: Vec<Problem>,
    /// Bad blobs (digest or size), to remove on repair.
    bad_blobs: BTreeSet<String>,
    /// Index references (name, or manifest digest for untagged) of incomplete images.
    bad_refs: BTreeSet<String>,
    /// Manifests of incomplete images.
    bad_manifests: BTreeSet<String>,
    /// Unpacked layer directories that differ from their blob.
    bad_layers: BTreeSet<String>,
}

/// Hash a blob file: (digest, size).
fn hash_file(p: &Path) -> std::io::Result<(String, u64)> {
    digest::sha256_reader(File::open(p)?)
}

struct Checker<'a> {
    store: &'a Store,
    layers: bool,
    verified: BTreeMap<String, Result<u64, String>>,
    r: Report,
}

impl Checker<'_> {
    /// Verify blob `d` (once); Err says why it cannot be trusted.
    fn blob(&mut self, d: &str, size: Option<u64>) -> Result<(), String> {
        let got = match self.verified.get(d) {
            Some(v) => v.clone(),
            None => {
                let v = match self.store.blob_path(d) {
                    Err(e) => Err(format!("{e:#}")),
                    Ok(p) => match hash_file(&p) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("missing".to_string()),
                        Err(e) => Err(format!("unreadable: {e}")),
                        Ok((got, _)) if got != d => {
                            self.r.bad_blobs.insert(d.to_string());
                            Err(format!("content does not match the digest (it is {got})"))
                        }
                        Ok((_, n)) => Ok(n),
                    },
                };
                self.r.blobs += 1;
                if let Err(why) = &v {
                    self.r.problems.push(Problem {
                        what: format!("blob {d}"),
                        why: why.clone(),
                    });
                }
                self.verified.insert(d.to_string(), v.clone());
                v
            }
        };
        match (got, size) {
            (Ok(n), Some(want)) if want > 0 && n != want => {
                Err(format!("{n} bytes, the descriptor says {want}"))
            }
            (Ok(_), _) => Ok(()),
            (Err(e), _) => Err(e),
        }
    }

    /// Check one image; returns whether it is complete and sound.
    fn image(&mut self, label: &str, md: &str, msize: u64) -> bool {
        self.r.images += 1;
        let mut ok = true;
        let fail = |r: &mut Report, why: String| {
            r.problems.push(Problem {
                what: label.to_string(),
                why,
            });
        };
        if let Err(e) = self.blob(md, Some(msize)) {
            fail(&mut self.r, format!("manifest {md}: {e}"));
            return false;
        }
        let manifest: ImageManifest = match self
            .store
            .blob_path(md)
            .ok()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(m) => m,
            None => {
                fail(&mut self.r, format!("manifest {md} does not parse"));
                return false;
            }
        };
        let cfg = manifest.config();
        let cd = cfg.digest().to_string();
        let config: Option<ImageConfiguration> = match self.blob(&cd, Some(cfg.size())) {
            Err(e) => {
                fail(&mut self.r, format!("config {cd}: {e}"));
                ok = false;
                None
            }
            Ok(()) => self
                .store
                .blob_path(&cd)
                .ok()
                .and_then(|p| std::fs::read(p).ok())
                .and_then(|b| serde_json::from_slice(&b).ok()),
        };
        if ok && config.is_none() {
            fail(&mut self.r, format!("config {cd} does not parse"));
            ok = false;
        }
        let diff_ids: Vec<String> = config
            .as_ref()
            .map(|c| c.rootfs().diff_ids().clone())
            .unwrap_or_default();
        if config.is_some() && diff_ids.len() != manifest.layers().len() {
            fail(
                &mut self.r,
                format!(
                    "{} layers but {} diff_ids",
                    manifest.layers().len(),
                    diff_ids.len()
                ),
            );
            ok = false;
        }
        for (i, l) in manifest.layers().iter().enumerate() {
            let ld = l.digest().to_string();
            if let Err(e) = self.blob(&ld, Some(l.size())) {
                fail(&mut self.r, format!("layer {ld}: {e}"));
                ok = false;
                continue;
            }
            if let (true, Some(di)) = (self.layers, diff_ids.get(i)) {
                if let Err((image_bad, e)) = self.layer(&ld, di) {
                    fail(&mut self.r, format!("layer {ld}: {e}"));
                    // A differing unpacked copy is only a cache; a blob that does not
                    // give its DiffID makes the image untrustworthy.
                    ok &= !image_bad;
                }
            }
        }
        ok
    }

    /// `--layers`: the blob decompresses to `diff_id`, and an unpacked directory holds what
    /// a fresh unpack gives.
    fn layer(&mut self, blob: &str, diff_id: &str) -> Result<(), (bool, String)> {
        let p = self.store.blob_path(blob).map_err(|e| (true, format!("{e:#}")))?;
        let f = File::open(&p).map_err(|e| (true, e.to_string()))?;
        let r = layer::decompress(f).map_err(|e| (true, format!("{e:#}")))?;
        let (got, _) = digest::sha256_reader(r).map_err(|e| (true, format!("decompressing: {e}")))?;
        if got != diff_id {
            return Err((
                true,
                format!("uncompressed content is {got}, the config says {diff_id}"),
            ));
        }
        self.unpacked(&p, diff_id).map_err(|e| (false, e))
    }

    /// An unpacked layer directory holds what a fresh unpack of its blob gives.
    fn unpacked(&mut self, p: &Path, diff_id: &str) -> Result<(), String> {
        let dir = self.store.layer_dir(diff_id).map_err(|e| format!("{e:#}"))?;
        if !dir.exists() {
            return Ok(());
        }
        self.r.layers += 1;
        let fresh = self.store.tmp_path("check");
        std::fs::create_dir(&fresh).map_err(|e| e.to_string())?;
        let res = (|| -> Result<(), String> {
            let f = File::open(p).map_err(|e| e.to_string())?;
            layer::unpack(layer::decompress(f).map_err(|e| format!("{e:#}"))?, &fresh)
                .map_err(|e| format!("{e:#}"))?;
            let a = snapshot(&dir).map_err(|e| format!("{e:#}"))?;
            let b = snapshot(&fresh).map_err(|e| format!("{e:#}"))?;
            if a != b {
                let diff: Vec<String> = a
                    .iter()
                    .filter(|(k, v)| b.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                    .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
                    .take(3)
                    .collect();
                self.r.bad_layers.insert(diff_id.to_string());
                return Err(format!(
                    "unpacked directory {} differs from its blob (e.g. {})",
                    dir.display(),
                    diff.join(", ")
                ));
            }
            Ok(())
        })();
        let _ = make_writable_and_remove(&fresh);
        res
    }
}

/// Path -> (type, mode, owner, size, content hash or link target, xattrs) of a tree.
fn snapshot(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
        let p = root.join(rel);
        let md = std::fs::symlink_metadata(&p).with_context(|| format!("{}", p.display()))?;
        let ft = md.file_type();
        let mut x: Vec<String> = Vec::new();
        if let Ok(f) = File::open(&p).or_else(|_| File::open(root)) {
            use std::os::fd::AsFd;
            if !ft.is_symlink() {
                for n in crate::sys::listxattr(crate::sys::XTarget::Fd(f.as_fd())).unwrap_or_default() {
                    let v = crate::sys::getxattr(
                        crate::sys::XTarget::Fd(f.as_fd()),
                        std::ffi::OsStr::new(&String::from_utf8_lossy(&n).into_owned()),
                    )
                    .unwrap_or_default();
                    x.push(format!(
                        "{}={}",
                        String::from_utf8_lossy(&n),
                        digest::sha256_of(&v)
                    ));
                }
            }
        }
        x.sort();
        let content = if ft.is_file() {
            digest::sha256_reader(File::open(&p)?)?.0
        } else if ft.is_symlink() {
            std::fs::read_link(&p)?.display().to_string()
        } else {
            format!("rdev {}", md.rdev())
        };
        let kind = if ft.is_dir() {
            "d"
        } else if ft.is_file() {
            "f"
        } else if ft.is_symlink() {
            "l"
        } else {
            "o"
        };
        let size = if ft.is_file() { md.size() } else { 0 };
        out.insert(
            rel.display().to_string(),
            format!(
                "{kind} {:o} {}:{} {size} {content} [{}]",
                md.mode() & 0o7777,
                md.uid(),
                md.gid(),
                x.join(",")
            ),
        );
        if ft.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&p)?.flatten().map(|e| e.file_name()).collect();
            names.sort();
            for n in names {
                walk(root, &rel.join(n), out)?;
            }
        }
        Ok(())
    }
    walk(root, Path::new(""), &mut out)?;
    // The root directory's own times and mode are not part of a layer.
    out.remove("");
    Ok(out)
}

/// The build cache's entries (`build/cache.rs` writes them; read here so `image/` does not
/// depend on `build/`).
fn build_cache(store: &Store) -> BTreeMap<String, String> {
    std::fs::read(store.root().join("build-cache.json"))
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default()
}

/// Check the store.
pub fn check(store: &Store, layers: bool) -> Result<Report> {
    let mut c = Checker {
        store,
        layers,
        verified: BTreeMap::new(),
        r: Report::default(),
    };
    for (name, d) in store.list()? {
        let md = d.digest().to_string();
        let label = if name.is_empty() {
            format!("image {md} (untagged)")
        } else {
            format!("image {name}")
        };
        if !c.image(&label, &md, d.size()) {
            c.r.bad_refs
                .insert(if name.is_empty() { md.clone() } else { name });
            c.r.bad_manifests.insert(md);
        }
    }
    for (key, md) in build_cache(store) {
        if !c.image(
            &format!("build cache state {}", &key[..12.min(key.len())]),
            &md,
            0,
        ) {
            c.r.bad_manifests.insert(md);
        }
    }
    c.r.problems.sort();
    c.r.problems.dedup();
    Ok(c.r)
}

/// Remove what `r` found untrustworthy, then collect garbage. Returns what was removed.
pub fn repair(store: &Store, r: &Report) -> Result<Vec<String>> {
    let mut done = Vec::new();
    // Names first, so nothing refers to a blob while it goes.
    let mut idx = store.index()?;
    let before = idx.manifests().len();
    let ms: Vec<_> = idx
        .manifests()
        .iter()
        .filter(|d| !r.bad_manifests.contains(&d.digest().to_string()))
        .cloned()
        .collect();
    if ms.len() != before {
        idx.set_manifests(ms);
        store.write_index(&idx)?;
        for n in &r.bad_refs {
            done.push(format!("removed the index entry {n}"));
        }
    }
    let cache = build_cache(store);
    let kept: BTreeMap<&String, &String> = cache
        .iter()
        .filter(|(_, md)| !r.bad_manifests.contains(*md))
        .collect();
    if kept.len() != cache.len() {
        super::store::write_atomic(
            &store.root().join("build-cache.json"),
            &serde_json::to_vec(&kept)?,
        )?;
        done.push(format!(
            "removed {} build cache entries",
            cache.len() - kept.len()
        ));
    }
    for d in &r.bad_blobs {
        if let Ok(p) = store.blob_path(d) {
            if std::fs::remove_file(&p).is_ok() {
                done.push(format!("removed corrupt blob {d}"));
            }
        }
    }
    for d in &r.bad_layers {
        if let Ok(p) = store.layer_dir(d) {
            make_writable_and_remove(&p).with_context(|| format!("removing {}", p.display()))?;
            done.push(format!(
                "removed unpacked layer {d} (it is unpacked again when needed)"
            ));
        }
    }
    let (b, l) = store.gc(&[])?;
    if b + l > 0 {
        done.push(format!(
            "gc: removed {b} blobs and {l} unpacked layers nothing refers to"
        ));
    }
    Ok(done)
}
