//! `strata load`.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cli::LoadArgs;
use crate::image::archive;
use crate::image::progress::Progress;
use crate::image::store::Store;

/// `strata load -i FILE`.
pub fn run(a: LoadArgs, root: &Path) -> Result<()> {
    let f = std::fs::File::open(&a.input).with_context(|| format!("archive '{}'", a.input.display()))?;
    let store = Store::open(root, true)?;
    let loaded = archive::load(&store, f, &Progress::new())
        .with_context(|| format!("loading '{}'", a.input.display()))?;
    for (img, names) in loaded.images {
        if names.is_empty() {
            super::say!("Loaded image ID: {}", img.id);
        }
        for n in names {
            super::say!("Loaded image: {n}");
        }
    }
    Ok(())
}
