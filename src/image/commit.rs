//! Commit: an overlay upper directory becomes a new layer of an image.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::image::{Descriptor, MediaType};

use super::config;
use super::digest::HashWriter;
use super::layer::{self, Compression, PackOpts, TarOut};
use super::progress::{Meter, Progress};
use super::reference::Reference;
use super::store::{parse_digest, Image, Store};
use super::tree::Tree;

/// A layer blob written to the store.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// Digest of the stored (possibly compressed) bytes.
    pub digest: String,
    /// Stored size.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
    /// OCI media type.
    pub media_type: MediaType,
}

impl LayerBlob {
    /// Its manifest descriptor.
    pub fn descriptor(&self) -> Result<Descriptor> {
        Ok(Descriptor::new(
            self.media_type.clone(),
            self.size,
            parse_digest(&self.digest)?,
        ))
    }
}

/// Where layer bytes go: hashed, metered, buffered to a file.
pub type Sink = HashWriter<Meter<BufWriter<File>>>;

/// The compressor under a layer being written.
pub enum Enc {
    /// No compression.
    Plain(Sink),
    /// gzip.
    Gzip(flate2::write::GzEncoder<Sink>),
    /// zstd.
    Zstd(zstd::Encoder<'static, Sink>),
}

impl Write for Enc {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Enc::Plain(w) => w.write(b),
            Enc::Gzip(w) => w.write(b),
            Enc::Zstd(w) => w.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Enc::Plain(w) => w.flush(),
            Enc::Gzip(w) => w.flush(),
            Enc::Zstd(w) => w.flush(),
        }
    }
}

impl Enc {
    fn finish(self) -> io::Result<Sink> {
        match self {
            Enc::Plain(w) => Ok(w),
            Enc::Gzip(w) => w.finish(),
            Enc::Zstd(w) => w.finish(),
        }
    }
}

/// Write a layer with `fill`, compressing and hashing in one pass, and store it.
pub fn write_layer(
    store: &Store,
    compress: Compression,
    epoch: Option<i64>,
    progress: &Progress,
    label: &str,
    fill: impl FnOnce(&mut TarOut<HashWriter<Enc>>) -> Result<()>,
) -> Result<LayerBlob> {
    let tmp = store.tmp_path("layer");
    let r = (|| -> Result<LayerBlob> {
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let sink = HashWriter::new(progress.writer(BufWriter::with_capacity(1 << 20, f), label, None));
        let enc = match compress {
            Compression::None => Enc::Plain(sink),
            // A fixed level and no timestamp in the gzip header keep output reproducible.
            Compression::Gzip => Enc::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    .write(sink, flate2::Compression::new(6)),
            ),
            Compression::Zstd => Enc::Zstd(zstd::Encoder::new(sink, 3)?),
        };
        let mut tar = TarOut::new(HashWriter::new(enc), epoch);
        fill(&mut tar)?;
        let (diff_id, _, enc) = tar.finish()?.finish();
        let (digest, size, meter) = enc.finish()?.finish();
        let f = meter.into_inner().into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        store.commit_blob(&tmp, &digest)?;
        Ok(LayerBlob {
            digest,
            size,
            diff_id,
            media_type: compress.media_type(),
        })
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// What to commit.
#[derive(Debug, Clone)]
pub struct CommitOpts {
    /// The upper directory (of an unmounted overlay).
    pub upper: PathBuf,
    /// The image the upper was mounted over.
    pub base: Option<String>,
    /// Author for config and history.
    pub author: Option<String>,
    /// Comment for the history entry.
    pub message: Option<String>,
    /// Dockerfile instructions to apply to the config.
    pub changes: Vec<String>,
    /// Make one layer of the whole merged tree.
    pub squash: bool,
    /// Glob patterns to leave out.
    pub excludes: Vec<String>,
    /// Layer compression.
    pub compress: Compression,
    /// History `created_by`.
    pub created_by: String,
    /// The new reference.
    pub tag: Reference,
}

/// Refuse an upper directory that a live mount still writes to.
pub fn check_upper_unmounted(upper: &Path) -> Result<()> {
    let md = std::fs::metadata(upper).with_context(|| format!("upper directory '{}'", upper.display()))?;
    if !md.is_dir() {
        bail!("upper directory '{}' is not a directory", upper.display());
    }
    if let Some(m) = crate::mounts::upper_in_use(upper) {
        bail!(
            "upper directory '{}' is still mounted at '{}': unmount it first",
            upper.display(),
            m.display()
        );
    }
    Ok(())
}

/// Commit `o.upper` as a new layer on top of `o.base`.
pub fn commit(store: &Store, o: &CommitOpts, progress: &Progress) -> Result<Image> {
    check_upper_unmounted(&o.upper)?;
    let base = o.base.as_deref().map(|b| store.resolve(b)).transpose()?;
    let epoch = config::source_date_epoch()?;
    let created = config::now_or_epoch()?;
    let mut cfg = match &base {
        Some(b) => b.config.clone(),
        None => config::new_config()?,
    };
    for c in &o.changes {
        config::apply_change(&mut cfg, c).with_context(|| format!("--change '{c}'"))?;
    }
    let popts = PackOpts {
        epoch,
        excludes: o.excludes.clone(),
        // (already unpacked when the upper was mounted over them)
        lowers: match &base {
            Some(b) => store.unpacked_layers(b, progress)?,
            None => Vec::new(),
        },
    };
    let (blob, mut layers) = if o.squash {
        let mut lowers = vec![o.upper.clone()];
        lowers.extend(popts.lowers.iter().cloned());
        let tree = Tree::open(lowers)?;
        let blob = write_layer(
            store,
            o.compress,
            epoch,
            progress,
            "writing squashed layer",
            |t| tree.export(t),
        )?;
        cfg.rootfs_mut().diff_ids_mut().clear();
        cfg.set_history(None);
        (blob, vec![])
    } else {
        let blob = write_layer(store, o.compress, epoch, progress, "writing layer", |t| {
            layer::pack_upper(&o.upper, t, &popts)
        })?;
        (
            blob,
            base.as_ref()
                .map(|b| b.manifest.layers().clone())
                .unwrap_or_default(),
        )
    };
    config::add_layer(
        &mut cfg,
        &blob.diff_id,
        created,
        o.author.as_deref(),
        &o.created_by,
        o.message.as_deref(),
    )?;
    layers.push(blob.descriptor()?);
    store.add_image(&cfg, layers, &o.tag)
}
