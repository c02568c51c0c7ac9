//! save / load / import: image archives in and out of the store.
//!
//! `save` writes an OCI image layout as a tar plus a docker `manifest.json` pointing into
//! `blobs/sha256/`, which docker (old and new), podman, skopeo (both transports) and umoci
//! read. `load` reads that, plain OCI archives (nested indexes too), docker legacy
//! archives and skopeo docker-archives (layer.tar symlinks). Foreign blobs are stored byte
//! for byte and every digest is verified; an image is tagged only once all its blobs are
//! in and its layers unpacked, so a failed load leaves nothing listed.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use super::config;
use super::digest::{self, HashReader};
use super::layer::{self, Compression};
use super::progress::Progress;
use super::reference::Reference;
use super::store::{self, parse_digest, Image, Store, CONTAINERD_NAME, REF_NAME};
use crate::sys;

/// docker's manifest.json entry.
#[derive(Debug, Serialize, Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn tar_header(path: &str, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).expect("short archive paths");
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

/// Write `images` (with the reference each was asked for) as one archive to `out`.
pub fn save<W: Write>(
    store: &Store,
    images: &[(Image, Option<String>)],
    out: W,
    progress: &Progress,
) -> Result<W> {
    let mut b = tar::Builder::new(out);
    let mut dir = tar::Header::new_ustar();
    dir.set_path("blobs/sha256/")?;
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_cksum();
    b.append(&dir, io::empty())?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    b.append(&tar_header("oci-layout", layout.len() as u64, 0o644), &layout[..])?;
    let mut written: HashSet<String> = HashSet::new();
    let mut manifests = Vec::new();
    let mut docker = Vec::new();
    for (img, asked) in images {
        let mut blobs = vec![img.manifest_digest.clone(), img.id.clone()];
        blobs.extend(img.manifest.layers().iter().map(|l| l.digest().to_string()));
        for d in &blobs {
            if !written.insert(d.clone()) {
                continue;
            }
            let p = store.blob_path(d)?;
            let f = File::open(&p).with_context(|| format!("blob {d} is missing from the store"))?;
            let size = f.metadata()?.len();
            let h = tar_header(
                &format!("blobs/sha256/{}", digest::hex_part(d).unwrap()),
                size,
                0o644,
            );
            let r = progress.reader(f, &format!("saving {}", store::short_id(d)), Some(size));
            b.append(&h, r)?;
        }
        let tags: Vec<String> = match asked {
            Some(r) => vec![r.clone()],
            None => img.refs.clone(),
        };
        let msize = fs::metadata(store.blob_path(&img.manifest_digest)?)?.len();
        for t in tags.iter().map(Some).chain(tags.is_empty().then_some(None)) {
            let mut d = Descriptor::new(
                MediaType::ImageManifest,
                msize,
                parse_digest(&img.manifest_digest)?,
            );
            if let Some(t) = t {
                let mut ann = HashMap::new();
                ann.insert(REF_NAME.to_string(), t.clone());
                ann.insert(CONTAINERD_NAME.to_string(), t.clone());
                d.set_annotations(Some(ann));
            }
            manifests.push(d);
        }
        docker.push(DockerManifest {
            config: format!("blobs/sha256/{}", digest::hex_part(&img.id).unwrap()),
            repo_tags: Some(tags),
            layers: img
                .manifest
                .layers()
                .iter()
                .map(|l| format!("blobs/sha256/{}", l.digest().digest()))
                .collect(),
        });
    }
    let idx = oci_spec::image::ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()?;
    let idx = serde_json::to_vec(&idx)?;
    b.append(&tar_header("index.json", idx.len() as u64, 0o644), &idx[..])?;
    let dm = serde_json::to_vec(&docker)?;
    b.append(&tar_header("manifest.json", dm.len() as u64, 0o644), &dm[..])?;
    Ok(b.into_inner()?)
}

/// Why an image archive (`load`) or a rootfs tar (`import`) is refused, for callers that
/// tell the cases apart (inside `anyhow::Error`: `e.downcast_ref::<ArchiveError>()`).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// One member is refused: its name and why.
    #[error("archive entry '{name}': {reason}")]
    Entry {
        /// The member's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Neither an OCI layout nor a docker archive.
    #[error("not an image archive: neither an OCI layout (index.json, oci-layout) nor a docker archive (manifest.json)")]
    NotAnImageArchive,
    /// An archive that names no image.
    #[error("{0} lists no image")]
    NoImage(&'static str),
    /// A layer whose content is not what the config says.
    #[error("layer '{layer}': its content is {got}, but the config says {want}")]
    DiffIdMismatch {
        /// The layer's member name.
        layer: String,
        /// Its DiffID as read.
        got: String,
        /// The config's.
        want: String,
    },
    /// An empty input where a tar was expected.
    #[error("the input is empty, not a tar archive")]
    Empty,
}

/// An archive extracted into a staging directory of the store.
struct Extracted {
    dir: PathBuf,
    /// Symlinks in the archive: path -> cleaned target path (inside the archive).
    links: HashMap<String, String>,
}

impl Extracted {
    fn resolve(&self, p: &str) -> Result<PathBuf> {
        let mut cur = crate::paths::clean(p).map_err(|e| anyhow!("archive path '{p}': {e}"))?;
        for _ in 0..16 {
            match self.links.get(&cur) {
                Some(t) => cur = t.clone(),
                None => return Ok(self.dir.join(&cur)),
            }
        }
        bail!("archive path '{p}': too many symlinks")
    }
}

fn extract_archive<R: Read>(r: R, dir: &Path) -> Result<Extracted> {
    let root = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut ar = tar::Archive::new(r);
    let mut links = HashMap::new();
    let mut seen = HashSet::new();
    for e in ar.entries().context("reading archive")? {
        let mut e = e.context("reading archive entry")?;
        let raw = e.path_bytes().into_owned();
        let name = String::from_utf8(raw).map_err(|_| anyhow!("archive entry with a non-UTF-8 name"))?;
        let fail = |m: &str| -> anyhow::Error {
            ArchiveError::Entry {
                name: name.clone(),
                reason: m.to_string(),
            }
            .into()
        };
        let path = crate::paths::entry(name.as_bytes()).map_err(|e| fail(&e.to_string()))?;
        let path = crate::paths::join(&path).to_string_lossy().into_owned();
        if path.is_empty() {
            continue;
        }
        if !seen.insert(path.clone()) {
            return Err(fail("duplicate entry"));
        }
        let (parent, base) = match path.rsplit_once('/') {
            Some((p, b)) => (p.to_string(), b.to_string()),
            None => (String::new(), path.clone()),
        };
        match e.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(dir.join(&path)).map_err(|x| fail(&x.to_string()))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                fs::create_dir_all(dir.join(&parent)).map_err(|x| fail(&x.to_string()))?;
                let pd = sys::open_dir_beneath(root.as_fd(), &parent).map_err(|x| fail(&x.to_string()))?;
                let fd = sys::open_beneath(
                    pd.as_fd(),
                    &base,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|x| fail(&x.to_string()))?;
                let want = e.size();
                let n = io::copy(&mut e, &mut File::from(fd))
                    .map_err(|x| fail(&format!("truncated archive ({x})")))?;
                if n != want {
                    return Err(fail("truncated archive"));
                }
            }
            tar::EntryType::Symlink => {
                let t = e
                    .link_name_bytes()
                    .ok_or_else(|| fail("symlink without target"))?;
                let t = String::from_utf8_lossy(&t).into_owned();
                if t.starts_with('/') {
                    return Err(fail("absolute symlink in an image archive"));
                }
                let joined = if parent.is_empty() {
                    t.clone()
                } else {
                    format!("{parent}/{t}")
                };
                let target =
                    crate::paths::clean(&joined).map_err(|e| fail(&format!("symlink target: {e}")))?;
                links.insert(path, target);
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(fail(&format!(
                    "unexpected entry type {other:?} in an image archive"
                )))
            }
        }
    }
    Ok(Extracted {
        dir: dir.to_path_buf(),
        links,
    })
}

/// Copy a file into the store as a blob, verifying it against `expect` when given.
fn blob_from_file(
    store: &Store,
    p: &Path,
    expect: Option<(&str, u64)>,
    progress: &Progress,
) -> Result<(String, u64)> {
    let f = File::open(p).with_context(|| format!("archive member {}", p.display()))?;
    let size = f.metadata()?.len();
    store.put_blob_reader(progress.reader(f, "loading", Some(size)), expect)
}

/// Name to give an image loaded from an index descriptor's annotations.
fn name_from_annotations(d: &Descriptor) -> Option<Reference> {
    let ann = d.annotations().as_ref()?;
    if let Some(n) = ann.get(CONTAINERD_NAME) {
        if let Ok(r) = Reference::parse(strip_docker_io(n)) {
            return Some(r);
        }
    }
    let r = ann.get(REF_NAME)?;
    if r.contains(':') || r.contains('/') {
        Reference::parse(strip_docker_io(r)).ok()
    } else {
        // A bare tag names no repository: call the image by it.
        Reference::parse(&format!("{r}:latest")).ok()
    }
}

fn strip_docker_io(s: &str) -> &str {
    s.strip_prefix("docker.io/library/")
        .or_else(|| s.strip_prefix("docker.io/"))
        .unwrap_or(s)
}

/// The result of a load: the images with the names they got.
#[derive(Debug)]
pub struct Loaded {
    /// (image, names).
    pub images: Vec<(Image, Vec<String>)>,
}

/// Load every image of an archive into the store.
pub fn load<R: Read + 'static>(store: &Store, r: R, progress: &Progress) -> Result<Loaded> {
    let tmp = store.tmp_path("load");
    fs::create_dir_all(&tmp)?;
    let res = (|| {
        let ex = extract_archive(layer::decompress(r)?, &tmp)?;
        if tmp.join("index.json").is_file() && tmp.join("oci-layout").is_file() {
            load_oci(store, &ex, progress)
        } else if ex.resolve("manifest.json").map(|p| p.is_file()).unwrap_or(false) {
            load_docker(store, &ex, progress)
        } else {
            Err(ArchiveError::NotAnImageArchive.into())
        }
    })();
    let _ = store::make_writable_and_remove(&tmp);
    if res.is_err() {
        // Nothing of a failed load stays: blobs it added are referenced by no image.
        let _ = store.gc(&[]);
    }
    res
}

fn platform_ok(d: &Descriptor) -> bool {
    let Some(p) = d.platform() else { return true };
    let want = config::new_config()
        .map(|c| c.architecture().to_string())
        .unwrap_or_default();
    p.os().to_string() == "linux" && p.architecture().to_string() == want
}

fn load_oci(store: &Store, ex: &Extracted, progress: &Progress) -> Result<Loaded> {
    let idx: ImageIndex = serde_json::from_slice(&fs::read(ex.dir.join("index.json"))?)
        .context("index.json is not an OCI image index")?;
    let mut todo: Vec<(Descriptor, Option<Reference>)> = idx
        .manifests()
        .iter()
        .map(|d| (d.clone(), name_from_annotations(d)))
        .collect();
    let mut out = Vec::new();
    let blob = |d: &str| -> Result<PathBuf> {
        let h = digest::hex_part(d).with_context(|| format!("invalid digest '{d}'"))?;
        ex.resolve(&format!("blobs/sha256/{h}"))
    };
    let mut guard = 0;
    while let Some((d, name)) = todo.pop() {
        guard += 1;
        if guard > 1000 {
            bail!("index.json: too many (or cyclic) nested indexes");
        }
        let dg = d.digest().to_string();
        let mt = d.media_type().to_string();
        let p = blob(&dg)?;
        let data = fs::read(&p)
            .with_context(|| format!("blob {dg} named in the index is missing from the archive"))?;
        if digest::sha256_of(&data) != dg || data.len() as u64 != d.size() {
            bail!("blob {dg}: content does not match its descriptor");
        }
        if mt.contains("image.index") || mt.contains("manifest.list") {
            let nested: ImageIndex =
                serde_json::from_slice(&data).with_context(|| format!("nested index {dg}"))?;
            let pick: Vec<Descriptor> = nested
                .manifests()
                .iter()
                .filter(|m| platform_ok(m))
                .cloned()
                .collect();
            let first = pick
                .into_iter()
                .next()
                .or_else(|| nested.manifests().first().cloned());
            if let Some(m) = first {
                todo.push((m, name.clone()));
            }
            continue;
        }
        let m: ImageManifest = serde_json::from_slice(&data).with_context(|| format!("manifest {dg}"))?;
        let cfg_d = m.config().digest().to_string();
        let (cd, _) = blob_from_file(store, &blob(&cfg_d)?, Some((&cfg_d, m.config().size())), progress)?;
        let cfg: ImageConfiguration =
            serde_json::from_slice(&store.read_blob(&cd)?).context("image config")?;
        for l in m.layers() {
            let ld = l.digest().to_string();
            blob_from_file(store, &blob(&ld)?, Some((&ld, l.size())), progress)?;
        }
        store.put_blob(&data)?;
        let mdesc = Descriptor::new(MediaType::ImageManifest, data.len() as u64, parse_digest(&dg)?);
        let img = Image {
            manifest_digest: dg.clone(),
            manifest: m,
            config: cfg,
            id: cd,
            refs: vec![],
        };
        // Every layer must unpack cleanly (and match its diff_id) before the image is listed.
        store.unpacked_layers(&img, progress)?;
        out.push((mdesc, name.into_iter().collect()));
    }
    if out.is_empty() {
        return Err(ArchiveError::NoImage("the archive's index.json").into());
    }
    name_loaded(store, out)
}

/// Name the images of an archive, once every one of them is stored and checked: a
/// multi-image archive is loaded all or nothing.
fn name_loaded(store: &Store, all: Vec<(Descriptor, Vec<Reference>)>) -> Result<Loaded> {
    let mut images = Vec::new();
    for (mdesc, names) in all {
        let names = tag_loaded(store, &mdesc, names)?;
        images.push((store.load_image(&mdesc)?, names));
    }
    Ok(Loaded { images })
}

fn tag_loaded(store: &Store, mdesc: &Descriptor, names: Vec<Reference>) -> Result<Vec<String>> {
    if names.is_empty() {
        store.add_untagged(mdesc)?;
        return Ok(vec![]);
    }
    for n in &names {
        store.set_tag(n, mdesc)?;
    }
    Ok(names.iter().map(|n| n.to_string()).collect())
}

fn load_docker(store: &Store, ex: &Extracted, progress: &Progress) -> Result<Loaded> {
    let list: Vec<DockerManifest> = serde_json::from_slice(&fs::read(ex.resolve("manifest.json")?)?)
        .context("manifest.json of a docker archive")?;
    let mut out = Vec::new();
    for dm in list {
        let cfg_bytes = fs::read(ex.resolve(&dm.config)?)
            .with_context(|| format!("config '{}' missing from the archive", dm.config))?;
        let cfg: ImageConfiguration = serde_json::from_slice(&cfg_bytes)
            .with_context(|| format!("config '{}' is not an image config", dm.config))?;
        let cd = store.put_blob(&cfg_bytes)?;
        let diff_ids = cfg.rootfs().diff_ids();
        if diff_ids.len() != dm.layers.len() {
            bail!(
                "config '{}' lists {} diff_ids for {} layers",
                dm.config,
                diff_ids.len(),
                dm.layers.len()
            );
        }
        let mut descs = Vec::new();
        for (lp, want) in dm.layers.iter().zip(diff_ids) {
            let p = ex.resolve(lp)?;
            let f = File::open(&p).with_context(|| format!("layer '{lp}' missing from the archive"))?;
            let mut head = [0u8; 4];
            let n = File::open(&p)?.read(&mut head)?;
            let comp = Compression::sniff(&head[..n]);
            let got = layer::check_and_hash(layer::decompress(f)?, &format!("layer '{lp}'"))?;
            if got != *want {
                return Err(ArchiveError::DiffIdMismatch {
                    layer: lp.clone(),
                    got,
                    want: want.to_string(),
                }
                .into());
            }
            let (ld, size) = blob_from_file(store, &p, None, progress)?;
            descs.push(Descriptor::new(comp.media_type(), size, parse_digest(&ld)?));
        }
        let cdesc = Descriptor::new(MediaType::ImageConfig, cfg_bytes.len() as u64, parse_digest(&cd)?);
        let manifest = oci_spec::image::ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(cdesc)
            .layers(descs)
            .build()?;
        let mbytes = serde_json::to_vec(&manifest)?;
        let md = store.put_blob(&mbytes)?;
        let img = Image {
            manifest_digest: md.clone(),
            manifest,
            config: cfg,
            id: cd,
            refs: vec![],
        };
        store.unpacked_layers(&img, progress)?;
        let mdesc = Descriptor::new(MediaType::ImageManifest, mbytes.len() as u64, parse_digest(&md)?);
        let names = dm
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| Reference::parse(strip_docker_io(t)).map_err(|e| anyhow!("RepoTags: {e}")))
            .collect::<Result<Vec<_>>>()?;
        out.push((mdesc, names));
    }
    if out.is_empty() {
        return Err(ArchiveError::NoImage("manifest.json").into());
    }
    name_loaded(store, out)
}

/// Import a flat rootfs tar (plain or compressed) as a one-layer image. The bytes are
/// stored as given, so the DiffID is the digest of the uncompressed input.
pub fn import<R: Read>(
    store: &Store,
    r: R,
    tag: &Reference,
    changes: &[String],
    message: Option<&str>,
    progress: &Progress,
) -> Result<Image> {
    let tmp = store.tmp_path("import");
    let res = (|| {
        let mut f = File::create(&tmp)?;
        let mut h = HashReader::new(progress.reader(r, "importing", None));
        io::copy(&mut h, &mut f).context("reading the input")?;
        f.sync_all()?;
        let (dg, size) = h.finish();
        if size == 0 {
            return Err(ArchiveError::Empty.into());
        }
        let mut head = [0u8; 4];
        let n = File::open(&tmp)?.read(&mut head)?;
        let comp = Compression::sniff(&head[..n]);
        let diff_id = layer::check_and_hash(layer::decompress(File::open(&tmp)?)?, "input")?;
        store.commit_blob(&tmp, &dg)?;
        let mut cfg = config::new_config()?;
        for c in changes {
            config::apply_change(&mut cfg, c).with_context(|| format!("--change '{c}'"))?;
        }
        let created = config::now_or_epoch()?;
        config::add_layer(
            &mut cfg,
            &diff_id,
            created,
            None,
            "strata import",
            Some(message.unwrap_or("imported from tarball")),
        )?;
        let ldesc = Descriptor::new(comp.media_type(), size, parse_digest(&dg)?);
        // Validate by unpacking before anything is tagged.
        let cfg_bytes = serde_json::to_vec(&cfg)?;
        let cd = store.put_blob(&cfg_bytes)?;
        let probe = Image {
            manifest_digest: String::new(),
            manifest: oci_spec::image::ImageManifestBuilder::default()
                .schema_version(2u32)
                .config(Descriptor::new(
                    MediaType::ImageConfig,
                    cfg_bytes.len() as u64,
                    parse_digest(&cd)?,
                ))
                .layers(vec![ldesc.clone()])
                .build()?,
            config: cfg.clone(),
            id: cd,
            refs: vec![],
        };
        store.unpacked_layers(&probe, progress)?;
        store.add_image(&cfg, vec![ldesc], tag)
    })();
    let _ = fs::remove_file(&tmp);
    if res.is_err() {
        let _ = store.gc(&[]);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (n, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, n, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn typed_errors() {
        let d = tempfile::tempdir().unwrap();
        let st = Store::open(d.path(), true).unwrap();
        let kind = |r: Result<Loaded>| match r {
            Ok(_) => panic!("loaded"),
            Err(e) => format!("{:?}", e.downcast_ref::<ArchiveError>().expect("an ArchiveError")),
        };
        let junk = tar_of(&[("hello.txt", b"hi")]);
        assert_eq!(
            kind(load(&st, std::io::Cursor::new(junk), &Progress::quiet())),
            "NotAnImageArchive"
        );
        let none = tar_of(&[("manifest.json", b"[]")]);
        assert_eq!(
            kind(load(&st, std::io::Cursor::new(none), &Progress::quiet())),
            "NoImage(\"manifest.json\")"
        );
        // Nothing stayed in the store.
        assert!(st.list().unwrap().is_empty());
    }
}
