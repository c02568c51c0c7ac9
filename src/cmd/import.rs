//! `strata import`.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cli::ImportArgs;
use crate::image::archive;
use crate::image::progress::Progress;
use crate::image::reference::Reference;
use crate::image::store::Store;

/// `strata import FILE|- NAME[:TAG]`: prints the new image id.
pub fn run(a: ImportArgs, root: &Path) -> Result<()> {
    let tag = Reference::parse(&a.name).map_err(anyhow::Error::msg)?;
    let input: Box<dyn std::io::Read> = if a.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(&a.file).with_context(|| format!("input '{}'", a.file.display()))?)
    };
    let store = Store::open(root, true)?;
    let img = archive::import(
        &store,
        input,
        &tag,
        &a.change,
        a.message.as_deref(),
        &Progress::new(),
    )
    .with_context(|| format!("importing '{}'", a.file.display()))?;
    super::say!("{}", img.id);
    Ok(())
}
