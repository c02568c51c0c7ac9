//! `strata export`.

use std::path::Path;

use anyhow::Result;

use crate::cli::ExportArgs;
use crate::image::layer::TarOut;
use crate::image::progress::Progress;
use crate::image::store::Store;
use crate::image::tree::Tree;

/// `strata export IMAGE -o FILE`: the merged tree, no whiteouts.
pub fn run(a: ExportArgs, root: &Path) -> Result<()> {
    let store = Store::open(root, true)?;
    let img = store.resolve(&a.image)?;
    let tree = Tree::open(store.unpacked_layers(&img, &Progress::new())?)?;
    drop(store);
    super::with_output_file(&a.output, |f| {
        let mut t = TarOut::new(
            Progress::new().writer(std::io::BufWriter::new(f), "exporting", None),
            None,
        );
        tree.export(&mut t)?;
        let w = t.finish()?.into_inner();
        Ok(w.into_inner().map_err(|e| e.into_error())?)
    })
}
