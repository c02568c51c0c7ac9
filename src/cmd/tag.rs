//! `strata tag`.

use std::path::Path;

use anyhow::Result;
use oci_spec::image::{Descriptor, MediaType};

use crate::cli::TagArgs;
use crate::image::reference::Reference;
use crate::image::store::{parse_digest, Store};

/// `strata tag SRC DST`.
pub fn run(a: TagArgs, root: &Path) -> Result<()> {
    let dst = Reference::parse(&a.target).map_err(anyhow::Error::msg)?;
    let store = Store::open(root, true)?;
    let img = store.resolve(&a.source)?;
    let size = std::fs::metadata(store.blob_path(&img.manifest_digest)?)?.len();
    store.set_tag(
        &dst,
        &Descriptor::new(
            MediaType::ImageManifest,
            size,
            parse_digest(&img.manifest_digest)?,
        ),
    )
}
