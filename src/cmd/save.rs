//! `strata save`.

use std::path::Path;

use anyhow::Result;

use crate::cli::SaveArgs;
use crate::image::archive;
use crate::image::progress::Progress;
use crate::image::reference::{normalized, Reference};
use crate::image::store::Store;

/// `strata save -o FILE IMAGE...`.
pub fn run(a: SaveArgs, root: &Path) -> Result<()> {
    let store = Store::open(root, false)?;
    let mut images = Vec::new();
    for i in &a.images {
        let img = store.resolve(i)?;
        // The stored name the argument means (`alpine` is `docker.io/library/alpine:latest`).
        let asked = Reference::parse(i)
            .ok()
            .map(|r| r.to_string())
            .filter(|r| img.refs.contains(r))
            .or_else(|| {
                let n = normalized(i)?;
                img.refs
                    .iter()
                    .find(|r| normalized(r).as_deref() == Some(&n))
                    .cloned()
            });
        images.push((img, asked));
    }
    super::with_output_file(&a.output, |f| {
        let w = std::io::BufWriter::new(f);
        let w = archive::save(&store, &images, w, &Progress::new())?;
        Ok(w.into_inner().map_err(|e| e.into_error())?)
    })
}
