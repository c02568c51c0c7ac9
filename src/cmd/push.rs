//! `strata push`.

use std::path::Path;

use anyhow::{bail, Result};

use crate::cli::{PushArgs, RegistryArgs};
use crate::image::reference::{normalized, RemoteRef};
use crate::image::store::Store;
use crate::registry::{self, Options};

/// The registry options of a command line.
pub fn options(a: &RegistryArgs, quiet: bool) -> Options {
    Options {
        authfile: a.authfile.clone(),
        cert_dir: a.cert_dir.clone(),
        tls_verify: a.tls_verify,
        quiet,
    }
}

/// `strata push IMAGE [DEST]`: prints docker's `TAG: digest: D size: N` line.
pub fn run(a: PushArgs, root: &Path) -> Result<()> {
    let store = Store::open(root, true)?;
    let img = store.resolve(&a.image)?;
    let dest = match &a.destination {
        Some(d) => RemoteRef::parse(d).map_err(anyhow::Error::msg)?,
        None => {
            // Only a name the image carries says where it goes, never an id.
            let named = normalized(&a.image)
                .is_some_and(|n| img.refs.iter().any(|r| normalized(r).as_deref() == Some(&n)));
            if !named {
                bail!(
                    "'{}' names no repository; give a destination: strata push IMAGE HOST/REPO:TAG",
                    a.image
                );
            }
            RemoteRef::parse(&a.image).map_err(anyhow::Error::msg)?
        }
    };
    let p = registry::push(&store, &img, &dest, &options(&a.registry, a.quiet))?;
    log::info!(
        "{dest}: {} blobs uploaded, {} mounted, {} already present",
        p.uploaded,
        p.mounted,
        p.present
    );
    super::say!("{}: digest: {} size: {}", dest.wire_ref(), p.digest, p.size);
    Ok(())
}
