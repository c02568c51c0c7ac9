//! `strata inspect`.

use std::path::Path;

use anyhow::Result;

use crate::cli::InspectArgs;
use crate::image::store::Store;

/// `strata inspect`: the manifest and config as stored (config with all its fields).
pub fn run(a: InspectArgs, root: &Path) -> Result<()> {
    let store = Store::open(root, false)?;
    let img = store.resolve(&a.image)?;
    let config: serde_json::Value = serde_json::from_slice(&store.read_blob(&img.id)?)?;
    let manifest: serde_json::Value = serde_json::from_slice(&store.read_blob(&img.manifest_digest)?)?;
    let v = serde_json::json!({
        "Id": img.id,
        "Digest": img.manifest_digest,
        "RepoTags": img.refs,
        "Manifest": manifest,
        "Config": config,
    });
    super::print_json(&v)
}
