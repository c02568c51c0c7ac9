//! `strata load`.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::cli::LoadArgs;
use crate::image::archive;
use crate::image::progress::Progress;
use crate::image::store::Store;

/// `strata load [-i FILE|-]`.
pub fn run(a: LoadArgs, root: &Path) -> Result<()> {
    use std::io::IsTerminal;
    let input = a.input.filter(|p| p.as_os_str() != "-");
    let (r, what): (Box<dyn std::io::Read>, String) = match &input {
        Some(p) => (
            Box::new(std::fs::File::open(p).with_context(|| format!("archive '{}'", p.display()))?),
            format!("'{}'", p.display()),
        ),
        None => {
            if std::io::stdin().is_terminal() {
                bail!("load: standard input is a terminal; give -i FILE or pipe an archive in");
            }
            (Box::new(std::io::stdin()), "standard input".into())
        }
    };
    let store = Store::open(root, true)?;
    let loaded = archive::load(&store, r, &Progress::new()).with_context(|| format!("loading {what}"))?;
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
