//! `strata commit`.

use std::path::Path;

use anyhow::Result;

use crate::cli::{CommitArgs, Compress};
use crate::image::commit::{commit, CommitOpts};
use crate::image::layer::Compression;
use crate::image::progress::Progress;
use crate::image::reference::Reference;
use crate::image::store::{short_id, Store};

/// Map the CLI choice onto the layer writer's.
pub fn compression(c: Compress) -> Compression {
    match c {
        Compress::None => Compression::None,
        Compress::Gzip => Compression::Gzip,
        Compress::Zstd => Compression::Zstd,
    }
}

/// `strata commit`: prints the new image id.
pub fn run(a: CommitArgs, root: &Path) -> Result<()> {
    let tag = Reference::parse(&a.name).map_err(anyhow::Error::msg)?;
    let store = Store::open(root, true)?;
    let o = CommitOpts {
        upper: a.upper,
        base: a.base,
        author: a.author,
        message: a.message,
        changes: a.change,
        squash: a.squash,
        excludes: a.exclude,
        compress: compression(a.compress),
        created_by: "strata commit".into(),
        tag,
    };
    let img = commit(&store, &o, &Progress::new())?;
    println!("{}", img.id);
    log::info!("committed {} as {}", short_id(&img.id), o.tag);
    Ok(())
}
