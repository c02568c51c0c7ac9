//! Media types of the distribution API and what a pulled manifest may contain.

use anyhow::{bail, Result};
use oci_spec::image::{ImageManifest, MediaType};

use super::RegistryError;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// docker schema2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What a pull accepts.
pub const MANIFESTS: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Largest image config accepted (it is read into memory).
const MAX_CONFIG: u64 = 64 << 20;

/// The media type of a manifest document: its `mediaType`, else what its fields say.
pub fn kind(bytes: &[u8]) -> Result<&'static str> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    if v.get("schemaVersion").and_then(|x| x.as_i64()) == Some(1) {
        return Err(RegistryError::Unsupported(
            "docker schema 1 manifests are not supported (deprecated since 2017)".into(),
        )
        .into());
    }
    match v.get("mediaType").and_then(|x| x.as_str()) {
        Some(t) => match MANIFESTS.iter().find(|m| **m == t) {
            Some(m) => Ok(m),
            None => Err(RegistryError::Unsupported(format!("unsupported manifest media type '{t}'")).into()),
        },
        None if v.get("manifests").is_some() => Ok(OCI_INDEX),
        None if v.get("layers").is_some() => Ok(OCI_MANIFEST),
        None => bail!("not an image manifest or index"),
    }
}

/// The manifest names a container image whose layers strata can unpack.
pub fn check_manifest(m: &ImageManifest) -> Result<()> {
    let c = m.config();
    match c.media_type() {
        MediaType::ImageConfig => {}
        MediaType::Other(t) if t == "application/vnd.docker.container.image.v1+json" => {}
        t => {
            return Err(RegistryError::Unsupported(format!(
                "not a container image: its config has media type '{t}'"
            ))
            .into())
        }
    }
    if c.size() > MAX_CONFIG {
        bail!(
            "config of {} bytes is larger than the {MAX_CONFIG} accepted",
            c.size()
        );
    }
    for l in m.layers() {
        let t = l.media_type().to_string();
        let ok = matches!(
            l.media_type(),
            MediaType::ImageLayer | MediaType::ImageLayerGzip | MediaType::ImageLayerZstd
        ) || t == "application/vnd.docker.image.rootfs.diff.tar.gzip"
            || t == "application/vnd.docker.image.rootfs.diff.tar";
        if !ok {
            return Err(RegistryError::Unsupported(format!(
                "layer {} has media type '{t}', which strata cannot unpack",
                l.digest()
            ))
            .into());
        }
    }
    Ok(())
}
