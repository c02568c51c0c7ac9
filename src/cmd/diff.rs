//! `strata diff`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::cli::{DiffArgs, Format};
use crate::image::diff::{diff_trees, diff_upper, Change};
use crate::image::progress::Progress;
use crate::image::store::Store;
use crate::image::tree::Tree;

/// The layer directories of `image` (none without one).
fn layers(store: &Store, image: Option<&str>) -> Result<Vec<PathBuf>> {
    match image {
        None => Ok(vec![]),
        Some(i) => {
            let img = store.resolve(i)?;
            store.unpacked_layers(&img, &Progress::new())
        }
    }
}

fn tree(store: &Store, image: Option<&str>) -> Result<Tree> {
    Tree::open(layers(store, image)?)
}

/// Changes of `upper` over `image`.
fn upper_changes(store: &Store, upper: &Path, image: Option<&str>) -> Result<Vec<Change>> {
    let l = layers(store, image)?;
    diff_upper(upper, &Tree::open(l.clone())?, &l)
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
        (Some(u), []) => upper_changes(&store, u, a.base.as_deref())?,
        (None, [c]) => {
            let c = crate::container::Container::open(root, c)?;
            let base = a.base.clone().unwrap_or(c.state.image_id.clone());
            let stubs = std::fs::read_to_string(c.rundir().join("stubs")).unwrap_or_default();
            upper_changes(&store, &c.upper(), Some(&base))?
                .into_iter()
                .filter(|ch| !stubs.lines().any(|s| s == ch.path))
                .collect()
        }
        (None, [x, y]) => diff_trees(&tree(&store, Some(x))?, &tree(&store, Some(y))?)?,
        _ => bail!("give --upper DIR [--base IMAGE], a container, or two images"),
    };
    print(&changes, a.format)
}
