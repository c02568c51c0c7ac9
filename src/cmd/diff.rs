//! `strata diff`.

use std::path::Path;

use anyhow::{bail, Result};

use crate::cli::{DiffArgs, Format};
use crate::image::diff::{diff_trees, diff_upper, Change};
use crate::image::progress::Progress;
use crate::image::store::Store;
use crate::image::tree::Tree;

fn tree(store: &Store, image: Option<&str>) -> Result<Tree> {
    match image {
        None => Tree::open(vec![]),
        Some(i) => {
            let img = store.resolve(i)?;
            Tree::open(store.unpacked_layers(&img, &Progress::new())?)
        }
    }
}

/// Print changes in docker's A/C/D form or as JSON.
pub fn print(changes: &[Change], format: Format) -> Result<()> {
    match format {
        Format::Json => super::print_json(&changes),
        Format::Table => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for c in changes {
                writeln!(out, "{} {}", c.kind, c.path)?;
            }
            Ok(())
        }
    }
}

/// `strata diff`.
pub fn run(a: DiffArgs, root: &Path) -> Result<()> {
    let store = Store::open(root, true)?;
    let changes = match (&a.upper, a.images.as_slice()) {
        (Some(u), []) => diff_upper(u, &tree(&store, a.base.as_deref())?)?,
        (None, [c]) => {
            let c = crate::container::Container::open(root, c)?;
            let base = a.base.clone().unwrap_or(c.state.image_id.clone());
            let stubs = std::fs::read_to_string(c.rundir().join("stubs")).unwrap_or_default();
            diff_upper(&c.upper(), &tree(&store, Some(&base))?)?
                .into_iter()
                .filter(|ch| !stubs.lines().any(|s| s == ch.path))
                .collect()
        }
        (None, [x, y]) => diff_trees(&tree(&store, Some(x))?, &tree(&store, Some(y))?)?,
        _ => bail!("give --upper DIR [--base IMAGE], a container, or two images"),
    };
    print(&changes, a.format)
}
