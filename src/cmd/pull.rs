//! `strata pull`.

use std::path::Path;

use anyhow::Result;

use crate::cli::PullArgs;
use crate::image::reference::RemoteRef;
use crate::image::store::Store;
use crate::registry::{self, Platform};

/// `strata pull REF`: prints docker's closing lines and the full name.
pub fn run(a: PullArgs, root: &Path) -> Result<()> {
    let r = RemoteRef::parse(&a.image).map_err(anyhow::Error::msg)?;
    let platform = a.platform.as_deref().map(Platform::parse).transpose()?;
    let opts = super::push::options(&a.registry, a.quiet);
    let store = Store::open(root, true)?;
    let p = registry::pull(&store, &r, platform.as_ref(), &opts)?;
    if !a.quiet {
        super::say!("Digest: {}", p.ref_digest);
        let status = if p.changed {
            "Downloaded newer image"
        } else {
            "Image is up to date"
        };
        super::say!("Status: {status} for {r}");
    }
    super::say!("{r}");
    Ok(())
}
