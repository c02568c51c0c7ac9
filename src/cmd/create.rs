//! `strata create`.

use std::path::Path;

use anyhow::Result;

use crate::cli::CreateArgs;
use crate::container::Container;
use crate::image::progress::Progress;
use crate::image::store::Store;

/// `strata create [--name N] IMAGE`: prints the container name.
pub fn run(a: CreateArgs, root: &Path) -> Result<()> {
    let store = Store::open(root, true)?;
    let img = store.resolve(&a.image)?;
    // Unpack now, so mounting it later is quick.
    store.unpacked_layers(&img, &Progress::new())?;
    let c = Container::create(root, a.name.as_deref(), &a.image, &img.id)?;
    super::say!("{}", c.state.name);
    Ok(())
}
