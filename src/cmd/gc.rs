//! `strata gc`.

use std::path::Path;

use anyhow::Result;

use crate::image::store::Store;

/// `strata gc`.
pub fn run(root: &Path) -> Result<()> {
    let store = Store::open(root, true)?;
    let (b, l) = store.gc(&[])?;
    super::say!("removed {b} blobs and {l} unpacked layers");
    Ok(())
}
