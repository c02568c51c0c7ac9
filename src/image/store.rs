//! The local image store: an OCI image layout plus a cache of unpacked layers.
//!
//! ```text
//! ROOT/oci-layout, index.json      OCI layout; tags are descriptors in index.json with
//!                                  org.opencontainers.image.ref.name = "name:tag"
//! ROOT/blobs/sha256/<hex>          content-addressed blobs, written to tmp/, fsynced, renamed
//! ROOT/layers/<diffid-hex>/        unpacked layers, shared read-only by every mount
//! ROOT/containers/<name>/          containers (upper, work, state.json)
//! ROOT/tmp/                        staging; emptied when the store is opened under the lock
//! ROOT/build-cache.json           build step cache key -> manifest (kept by gc)
//! ROOT/build/                      working dirs of running builds
//! ROOT/sources.json                repositories a blob came from or went to (registry/)
//! ROOT/lock                        flock: shared for readers, exclusive for writers
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};

use super::digest::{self, HashReader};
use super::layer;
use super::reference::Reference;

/// Annotation holding the tag in index.json.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation docker >= 25 and containerd use for the full image name.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    _lock: File,
}

/// An image resolved from the store.
#[derive(Debug, Clone)]
pub struct Image {
    /// Digest of the manifest blob.
    pub manifest_digest: String,
    /// The manifest.
    pub manifest: ImageManifest,
    /// Parsed config.
    pub config: ImageConfiguration,
    /// Config digest: the image id.
    pub id: String,
    /// The references that name it.
    pub refs: Vec<String>,
}

/// Default store location: /var/lib/strata for root, $XDG_DATA_HOME/strata otherwise.
pub fn default_root() -> PathBuf {
    if let Some(r) = std::env::var_os("STRATA_ROOT") {
        return PathBuf::from(r);
    }
    if crate::sys::host_root() {
        return PathBuf::from("/var/lib/strata");
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(x) => PathBuf::from(x).join("strata"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/share/strata"),
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// What can go wrong with the store that a caller may want to tell apart (the library's
/// functions return them inside `anyhow::Error`: `e.downcast_ref::<StoreError>()`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No image by that name, id or digest.
    #[error("image '{name}' not found in store '{}'", store.display())]
    NotFound {
        /// As asked.
        name: String,
        /// The store's root.
        store: PathBuf,
    },
    /// An id prefix that more than one image has.
    #[error("image id '{id}' is ambiguous ({matches} images match)")]
    Ambiguous {
        /// As asked.
        id: String,
        /// How many images it matches.
        matches: usize,
    },
    /// Neither a reference nor an id.
    #[error("'{0}' is not a valid image reference or id")]
    BadName(String),
    /// A blob whose bytes do not hash to its name.
    #[error("blob {0} is corrupt (its content does not match its digest)")]
    CorruptBlob(String),
    /// Bytes that do not match the descriptor they came with.
    #[error("blob {digest}: content does not match its descriptor (got {got_size} bytes, {got_digest}; want {want_size} bytes)")]
    Mismatch {
        /// Expected digest.
        digest: String,
        /// What arrived.
        got_size: u64,
        /// Its digest.
        got_digest: String,
        /// Expected size.
        want_size: u64,
    },
}

/// fsync a directory so a rename into it survives a crash.
fn sync_dir(p: &Path) -> io::Result<()> {
    File::open(p)?.sync_all()
}

/// Write `data` to `path` atomically (tmp + fsync + rename + fsync of the directory).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, 0o666)
}

/// `write_atomic` creating the file with `mode` (before the umask), e.g. 0o600 for
/// credentials. The one atomic-write helper: the store's files, index.json, container
/// state and auth files go through it. A failure removes the temporary file.
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().context("path without parent")?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let r = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
        sync_dir(dir)?;
        Ok(())
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

impl Store {
    /// Open (creating if needed) the store at `root`, holding the lock: exclusive when
    /// `write` is set, else shared.
    pub fn open(root: &Path, write: bool) -> Result<Store> {
        for d in ["blobs/sha256", "layers", "tmp", "containers"] {
            fs::create_dir_all(root.join(d)).with_context(|| format!("store '{}'", root.display()))?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(root.join("lock"))
            .with_context(|| format!("store '{}': lock file", root.display()))?;
        let how = if write {
            rustix::fs::FlockOperation::LockExclusive
        } else {
            rustix::fs::FlockOperation::LockShared
        };
        rustix::fs::flock(&lock, how).with_context(|| format!("locking store '{}'", root.display()))?;
        let s = Store {
            root: root.to_path_buf(),
            _lock: lock,
        };
        if write {
            if !root.join("oci-layout").exists() {
                write_atomic(&root.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            }
            if !root.join("index.json").exists() {
                s.write_index(&empty_index())?;
            }
            // Leftovers of an interrupted writer: nothing refers to them.
            for e in fs::read_dir(root.join("tmp"))?.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
            for e in fs::read_dir(root.join("layers"))?.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = make_writable_and_remove(&e.path());
                }
            }
        }
        Ok(s)
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let h = digest::hex_part(digest).with_context(|| format!("invalid digest '{digest}'"))?;
        Ok(self.root.join("blobs/sha256").join(h))
    }

    /// A fresh staging path under tmp/.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        self.root.join("tmp").join(format!(
            "{what}-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Move a finished, fsynced staging file into blobs/ under its digest.
    pub fn commit_blob(&self, tmp: &Path, digest: &str) -> Result<()> {
        let dst = self.blob_path(digest)?;
        if dst.exists() {
            fs::remove_file(tmp).ok();
            return Ok(());
        }
        fs::rename(tmp, &dst).with_context(|| format!("storing blob {digest}"))?;
        sync_dir(dst.parent().unwrap())?;
        Ok(())
    }

    /// Store bytes as a blob; returns its digest.
    pub fn put_blob(&self, data: &[u8]) -> Result<String> {
        let d = digest::sha256_of(data);
        if !self.blob_path(&d)?.exists() {
            let tmp = self.tmp_path("blob");
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            self.commit_blob(&tmp, &d)?;
        }
        Ok(d)
    }

    /// Copy a stream into the store, verifying `expect` (digest, size) when given.
    pub fn put_blob_reader<R: Read>(&self, r: R, expect: Option<(&str, u64)>) -> Result<(String, u64)> {
        let tmp = self.tmp_path("blob");
        let mut f = File::create(&tmp)?;
        let mut h = HashReader::new(r);
        let copied = io::copy(&mut h, &mut f);
        let (d, n) = h.finish();
        if let Err(e) = copied {
            fs::remove_file(&tmp).ok();
            return Err(e).context("copying blob");
        }
        if let Some((ed, es)) = expect {
            if n != es || d != ed {
                fs::remove_file(&tmp).ok();
                return Err(StoreError::Mismatch {
                    digest: ed.to_string(),
                    got_size: n,
                    got_digest: d,
                    want_size: es,
                }
                .into());
            }
        }
        f.sync_all()?;
        self.commit_blob(&tmp, &d)?;
        Ok((d, n))
    }

    /// Read a (small) blob, verifying its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest)?;
        let data = fs::read(&p).with_context(|| format!("blob {digest} is missing from the store"))?;
        if digest::sha256_of(&data) != digest {
            return Err(StoreError::CorruptBlob(digest.to_string()).into());
        }
        Ok(data)
    }

    /// The index.
    pub fn index(&self) -> Result<ImageIndex> {
        let p = self.root.join("index.json");
        let data = match fs::read(&p) {
            Ok(d) => d,
            // A store nothing was written to yet: readers see it empty.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(empty_index()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        serde_json::from_slice(&data).with_context(|| format!("parsing {}", p.display()))
    }

    /// Replace the index atomically.
    pub fn write_index(&self, idx: &ImageIndex) -> Result<()> {
        let data = serde_json::to_vec_pretty(idx)?;
        write_atomic(&self.root.join("index.json"), &data)
    }

    /// (reference, manifest descriptor) of every tagged image, plus untagged ones as "".
    pub fn list(&self) -> Result<Vec<(String, Descriptor)>> {
        Ok(self
            .index()?
            .manifests()
            .iter()
            .map(|d| {
                let r = d
                    .annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .cloned()
                    .unwrap_or_default();
                (r, d.clone())
            })
            .collect())
    }

    /// Load an image by manifest descriptor.
    pub fn load_image(&self, desc: &Descriptor) -> Result<Image> {
        let md = desc.digest().to_string();
        let manifest: ImageManifest =
            serde_json::from_slice(&self.read_blob(&md)?).with_context(|| format!("manifest {md}"))?;
        let id = manifest.config().digest().to_string();
        let config: ImageConfiguration =
            serde_json::from_slice(&self.read_blob(&id)?).with_context(|| format!("config {id}"))?;
        let refs = self
            .list()?
            .into_iter()
            .filter(|(r, d)| !r.is_empty() && d.digest().to_string() == md)
            .map(|(r, _)| r)
            .collect();
        Ok(Image {
            manifest_digest: md,
            manifest,
            config,
            id,
            refs,
        })
    }

    /// Find an image by `name[:tag]`, by id (`sha256:...` or a unique hex prefix of at
    /// least 4 digits), or by manifest digest.
    pub fn resolve(&self, s: &str) -> Result<Image> {
        let list = self.list()?;
        if let Ok(r) = Reference::parse(s) {
            let want = r.to_string();
            if let Some((_, d)) = list.iter().find(|(n, _)| *n == want) {
                return self.load_image(d);
            }
        }
        // docker's short and long forms name the same image: `alpine` finds
        // `docker.io/library/alpine:latest` (pulled) and the other way round.
        if let Some(want) = super::reference::normalized(s) {
            let found = list
                .iter()
                .find(|(n, _)| !n.is_empty() && super::reference::normalized(n).as_deref() == Some(&want));
            if let Some((_, d)) = found {
                return self.load_image(d);
            }
        }
        // name@sha256:...: the manifest the digest names, if the store has it.
        if let Some((_, dg)) = s.split_once('@') {
            super::reference::RemoteRef::parse(s).map_err(anyhow::Error::msg)?;
            if let Some((_, d)) = list.iter().find(|(_, d)| d.digest().to_string() == dg) {
                return self.load_image(d);
            }
            return Err(self.not_found(s));
        }
        let hexs = s.strip_prefix("sha256:").unwrap_or(s);
        if hexs.len() >= 4 && hexs.bytes().all(|c| c.is_ascii_hexdigit()) {
            let mut found: Vec<Image> = Vec::new();
            for (_, d) in &list {
                if found.iter().any(|i| i.manifest_digest == d.digest().to_string()) {
                    continue;
                }
                let img = self.load_image(d)?;
                let idh = img.id.trim_start_matches("sha256:");
                let mdh = img.manifest_digest.trim_start_matches("sha256:");
                if idh.starts_with(hexs) || mdh.starts_with(hexs) {
                    found.push(img);
                }
            }
            match found.len() {
                1 => return Ok(found.pop().unwrap()),
                n if n > 1 => {
                    return Err(StoreError::Ambiguous {
                        id: s.to_string(),
                        matches: n,
                    }
                    .into())
                }
                _ => {}
            }
        }
        if Reference::parse(s).is_err() && !(hexs.len() >= 4 && hexs.bytes().all(|c| c.is_ascii_hexdigit())) {
            return Err(StoreError::BadName(s.to_string()).into());
        }
        Err(self.not_found(s))
    }

    fn not_found(&self, name: &str) -> anyhow::Error {
        StoreError::NotFound {
            name: name.to_string(),
            store: self.root.clone(),
        }
        .into()
    }

    /// Point `r` at a manifest (replacing what it named before).
    pub fn set_tag(&self, r: &Reference, manifest: &Descriptor) -> Result<()> {
        let mut idx = self.index()?;
        let name = r.to_string();
        let mut ms: Vec<Descriptor> = idx
            .manifests()
            .iter()
            .filter(|d| d.annotations().as_ref().and_then(|a| a.get(REF_NAME)) != Some(&name))
            .cloned()
            .collect();
        // The media type stays the manifest's own (docker schema2 for pulled docker images).
        let mut d = Descriptor::new(
            manifest.media_type().clone(),
            manifest.size(),
            manifest.digest().clone(),
        );
        let mut ann = std::collections::HashMap::new();
        ann.insert(REF_NAME.to_string(), name);
        d.set_annotations(Some(ann));
        ms.push(d);
        idx.set_manifests(ms);
        self.write_index(&idx)
    }

    /// List a manifest without a name (it stays reachable by id until `rmi`).
    pub fn add_untagged(&self, manifest: &Descriptor) -> Result<()> {
        let mut idx = self.index()?;
        if idx.manifests().iter().any(|d| d.digest() == manifest.digest()) {
            return Ok(());
        }
        let mut ms = idx.manifests().clone();
        ms.push(Descriptor::new(
            manifest.media_type().clone(),
            manifest.size(),
            manifest.digest().clone(),
        ));
        idx.set_manifests(ms);
        self.write_index(&idx)
    }

    /// Remove a tag. Returns whether it existed.
    pub fn remove_tag(&self, name: &str) -> Result<bool> {
        let mut idx = self.index()?;
        let before = idx.manifests().len();
        let ms: Vec<Descriptor> = idx
            .manifests()
            .iter()
            .filter(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .map(|s| s.as_str())
                    != Some(name)
            })
            .cloned()
            .collect();
        let changed = ms.len() != before;
        idx.set_manifests(ms);
        self.write_index(&idx)?;
        Ok(changed)
    }

    /// Drop every name of a manifest but keep it in the index, untagged (docker's
    /// `<none>`), so what uses it keeps its layers.
    pub fn untag_all(&self, manifest_digest: &str) -> Result<()> {
        let mut idx = self.index()?;
        let mut kept: Option<Descriptor> = None;
        let mut ms: Vec<Descriptor> = Vec::new();
        for d in idx.manifests() {
            if d.digest().to_string() != manifest_digest {
                ms.push(d.clone());
            } else if kept.is_none() {
                let mut u = d.clone();
                let mut a = u.annotations().clone().unwrap_or_default();
                a.remove(REF_NAME);
                u.set_annotations((!a.is_empty()).then_some(a));
                kept = Some(u);
            }
        }
        ms.extend(kept);
        idx.set_manifests(ms);
        self.write_index(&idx)
    }

    /// Remove every index entry of a manifest (untagged ones included).
    pub fn remove_manifest(&self, manifest_digest: &str) -> Result<()> {
        let mut idx = self.index()?;
        let ms: Vec<Descriptor> = idx
            .manifests()
            .iter()
            .filter(|d| d.digest().to_string() != manifest_digest)
            .cloned()
            .collect();
        idx.set_manifests(ms);
        self.write_index(&idx)
    }

    /// Store a config and manifest for `layers` and tag the result.
    pub fn add_image(
        &self,
        config: &ImageConfiguration,
        layers: Vec<Descriptor>,
        tag: &Reference,
    ) -> Result<Image> {
        let cfg_bytes = serde_json::to_vec(config)?;
        let cfg_digest = self.put_blob(&cfg_bytes)?;
        let cfg_desc = Descriptor::new(
            MediaType::ImageConfig,
            cfg_bytes.len() as u64,
            parse_digest(&cfg_digest)?,
        );
        self.add_manifest(cfg_desc, layers, tag)
    }

    /// Store a manifest over an already stored config and tag it.
    pub fn add_manifest(
        &self,
        cfg_desc: Descriptor,
        layers: Vec<Descriptor>,
        tag: &Reference,
    ) -> Result<Image> {
        let manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(cfg_desc)
            .layers(layers)
            .build()?;
        let mbytes = serde_json::to_vec(&manifest)?;
        let md = self.put_blob(&mbytes)?;
        let mdesc = Descriptor::new(MediaType::ImageManifest, mbytes.len() as u64, parse_digest(&md)?);
        self.set_tag(tag, &mdesc)?;
        self.load_image(&mdesc)
    }

    /// The directory a layer is unpacked into.
    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf> {
        let h = digest::hex_part(diff_id).with_context(|| format!("invalid diff_id '{diff_id}'"))?;
        Ok(self.root.join("layers").join(h))
    }

    /// Unpack the layers of an image (once per diff_id) and return their directories,
    /// top layer first, as the lower stack of a mount.
    pub fn unpacked_layers(&self, img: &Image, progress: &super::progress::Progress) -> Result<Vec<PathBuf>> {
        let diff_ids = img.config.rootfs().diff_ids();
        let layers = img.manifest.layers();
        if diff_ids.len() != layers.len() {
            bail!(
                "image {}: {} layers but {} diff_ids in its config",
                short_id(&img.id),
                layers.len(),
                diff_ids.len()
            );
        }
        let mut out = Vec::with_capacity(layers.len());
        for (desc, diff_id) in layers.iter().zip(diff_ids) {
            let dir = self.layer_dir(diff_id)?;
            if !dir.exists() {
                let blob = self.blob_path(desc.digest().as_ref())?;
                let tmp = self
                    .root
                    .join("layers")
                    .join(format!(".tmp-{}", digest::hex_part(diff_id).unwrap()));
                let _ = make_writable_and_remove(&tmp);
                fs::create_dir(&tmp)?;
                let r = (|| -> Result<()> {
                    let f = File::open(&blob)
                        .with_context(|| format!("layer blob {} is missing", desc.digest()))?;
                    let got =
                        layer::check_and_hash(layer::decompress(f)?, &format!("layer {}", desc.digest()))?;
                    if got != *diff_id {
                        bail!(
                            "layer {}: uncompressed content is {got}, but the config says {diff_id}",
                            desc.digest()
                        );
                    }
                    let f = File::open(&blob)?;
                    let tr = progress.reader(
                        layer::decompress(f)?,
                        &format!("unpacking {}", short_id(diff_id)),
                        None,
                    );
                    layer::unpack(tr, &tmp)
                })();
                if let Err(e) = r {
                    let _ = make_writable_and_remove(&tmp);
                    return Err(e);
                }
                // Everything unpacked must be on disk before the name says it is complete.
                let d = File::open(&tmp)?;
                rustix::fs::syncfs(&d)?;
                fs::rename(&tmp, &dir)?;
                sync_dir(&self.root.join("layers"))?;
            }
            out.push(dir);
        }
        out.reverse();
        Ok(out)
    }

    /// Remove blobs and unpacked layers nothing refers to. Returns (blobs, layers) removed.
    pub fn gc(&self, keep_images: &[String]) -> Result<(usize, usize)> {
        let mut blobs: HashSet<String> = HashSet::new();
        let mut diff_ids: HashSet<String> = HashSet::new();
        let mut descs: Vec<Descriptor> = self.list()?.into_iter().map(|(_, d)| d).collect();
        // The build cache's image states are kept like named images.
        let cached: std::collections::BTreeMap<String, String> = fs::read(self.root.join("build-cache.json"))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default();
        for md in cached.values() {
            if let Ok(d) = parse_digest(md) {
                descs.push(Descriptor::new(MediaType::ImageManifest, 0, d));
            }
        }
        let mut seen = HashSet::new();
        while let Some(d) = descs.pop() {
            let dg = d.digest().to_string();
            if !seen.insert(dg.clone()) {
                continue;
            }
            blobs.insert(dg.clone());
            if let Ok(img) = self.load_image(&d) {
                blobs.insert(img.id.clone());
                for l in img.manifest.layers() {
                    blobs.insert(l.digest().to_string());
                }
                diff_ids.extend(img.config.rootfs().diff_ids().iter().cloned());
            }
        }
        for k in keep_images {
            if let Ok(img) = self.resolve(k) {
                blobs.insert(img.manifest_digest.clone());
                blobs.insert(img.id.clone());
                blobs.extend(img.manifest.layers().iter().map(|l| l.digest().to_string()));
                diff_ids.extend(img.config.rootfs().diff_ids().iter().cloned());
            }
        }
        // What a container or a live mount uses stays, even when no name reaches it any
        // more (an image removed from the index by an older strata, or by hand).
        let (in_use_ids, in_use_layers) = self.in_use();
        for id in in_use_ids {
            if let Ok(cfg) = self
                .read_blob(&id)
                .and_then(|b| Ok(serde_json::from_slice::<ImageConfiguration>(&b)?))
            {
                diff_ids.extend(cfg.rootfs().diff_ids().iter().cloned());
            }
            blobs.insert(id);
        }
        diff_ids.extend(in_use_layers);
        // A running build's blobs and layers are named only when its steps finish: keep
        // everything written since the oldest live build started.
        let since = self.live_builds_since();
        let recent = |e: &fs::DirEntry| {
            since.is_some_and(|t| e.metadata().and_then(|m| m.modified()).is_ok_and(|m| m >= t))
        };
        let mut nb = 0;
        for e in fs::read_dir(self.root.join("blobs/sha256"))?.flatten() {
            let d = format!("sha256:{}", e.file_name().to_string_lossy());
            if !blobs.contains(&d) && !recent(&e) {
                fs::remove_file(e.path())?;
                nb += 1;
            }
        }
        let mut nl = 0;
        for e in fs::read_dir(self.root.join("layers"))?.flatten() {
            let d = format!("sha256:{}", e.file_name().to_string_lossy());
            if !diff_ids.contains(&d) && !recent(&e) {
                make_writable_and_remove(&e.path())?;
                nl += 1;
            }
        }
        Ok((nb, nl))
    }

    /// Give up the store but keep its lock (shared or exclusive, as opened) in the file
    /// returned: the lock lasts until every copy of that fd is closed, across fork too.
    pub fn into_lock(self) -> File {
        self._lock
    }

    /// Image ids of this store's containers and of live mounts, and the store layers
    /// (as `sha256:HEX` diff ids) that live mounts have as lowers.
    fn in_use(&self) -> (Vec<String>, Vec<String>) {
        let mut ids: Vec<String> = fs::read_dir(self.root.join("containers"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| fs::read(e.path().join("state.json")).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter_map(|v| v.get("image_id")?.as_str().map(String::from))
            .collect();
        let layers_dir =
            fs::canonicalize(self.root.join("layers")).unwrap_or_else(|_| self.root.join("layers"));
        let mut layers = Vec::new();
        for m in crate::mounts::active() {
            ids.extend(m.image);
            for l in m.lowers {
                if let Ok(rest) = l.strip_prefix(&layers_dir) {
                    if let Some(hex) = rest.iter().next() {
                        layers.push(format!("sha256:{}", hex.to_string_lossy()));
                    }
                }
            }
        }
        (ids, layers)
    }

    /// When the oldest build still running on this store started (`build/<pid>-<secs>`).
    fn live_builds_since(&self) -> Option<std::time::SystemTime> {
        fs::read_dir(self.root.join("build"))
            .ok()?
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let (pid, secs) = n.split_once('-')?;
                let (pid, secs) = (pid.parse::<i32>().ok()?, secs.parse::<u64>().ok()?);
                crate::mounts::pid_alive(pid)
                    .then(|| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.saturating_sub(1)))
            })
            .min()
    }
}

/// Remove a tree whose directories may be read-only (unpacked layers keep image modes).
pub fn make_writable_and_remove(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let mut stack = vec![p.to_path_buf()];
            while let Some(d) = stack.pop() {
                use std::os::unix::fs::PermissionsExt;
                if let Ok(m) = fs::symlink_metadata(&d) {
                    if m.is_dir() {
                        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o700));
                        if let Ok(rd) = fs::read_dir(&d) {
                            stack.extend(rd.flatten().map(|e| e.path()));
                        }
                    }
                }
            }
            fs::remove_dir_all(p)
        }
    }
}

fn empty_index() -> ImageIndex {
    oci_spec::image::ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(Vec::<Descriptor>::new())
        .build()
        .expect("a valid empty index")
}

/// Parse `sha256:<hex>` into the oci-spec type.
pub fn parse_digest(s: &str) -> Result<oci_spec::image::Digest> {
    s.parse().with_context(|| format!("invalid digest '{s}'"))
}

/// The 12-digit short form of an id.
pub fn short_id(d: &str) -> String {
    d.trim_start_matches("sha256:").chars().take(12).collect()
}

/// Size of a layer blob set, for listings.
pub fn total_size(m: &ImageManifest) -> u64 {
    m.layers().iter().map(|l| l.size()).sum::<u64>() + m.config().size()
}

/// Group references by manifest, for listings.
pub fn refs_by_manifest(list: &[(String, Descriptor)]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (r, d) in list {
        m.entry(d.digest().to_string()).or_default().push(r.clone());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(e: &anyhow::Error) -> &StoreError {
        e.downcast_ref::<StoreError>()
            .unwrap_or_else(|| panic!("not a StoreError: {e:#}"))
    }

    #[test]
    fn typed_errors() {
        let d = tempfile::tempdir().unwrap();
        let st = Store::open(d.path(), true).unwrap();
        let e = st.resolve("nope:1").unwrap_err();
        assert!(matches!(kind(&e), StoreError::NotFound { name, .. } if name == "nope:1"));
        assert!(matches!(
            kind(&st.resolve("Not A Name!").unwrap_err()),
            StoreError::BadName(_)
        ));
        let dg = st.put_blob(b"hello").unwrap();
        assert_eq!(st.read_blob(&dg).unwrap(), b"hello");
        fs::write(st.blob_path(&dg).unwrap(), b"HELLO").unwrap();
        assert!(matches!(kind(&st.read_blob(&dg).unwrap_err()), StoreError::CorruptBlob(x) if *x == dg));
        let want = digest::sha256_of(b"other");
        let e = st.put_blob_reader(&b"bytes"[..], Some((&want, 5))).unwrap_err();
        assert!(matches!(kind(&e), StoreError::Mismatch { got_size: 5, .. }));
    }
}
