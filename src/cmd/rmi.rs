//! `strata rmi`.

use std::path::Path;

use anyhow::{bail, Result};

use crate::cli::RmiArgs;
use crate::image::reference::Reference;
use crate::image::store::{short_id, Store};

/// Who uses an image: live mounts and containers.
pub fn users(root: &Path, image_id: &str) -> Vec<String> {
    let mut v: Vec<String> = crate::mounts::active()
        .into_iter()
        .filter(|m| m.image.as_deref() == Some(image_id))
        .map(|m| format!("mount {}", m.mountpoint.display()))
        .collect();
    v.extend(
        crate::container::using_image(root, image_id)
            .into_iter()
            .map(|c| format!("container {c}")),
    );
    v
}

/// `strata rmi`: untag; the last name takes the image's unshared data with it.
pub fn run(a: RmiArgs, root: &Path) -> Result<()> {
    let store = Store::open(root, true)?;
    for name in &a.images {
        let img = store.resolve(name)?;
        let by_name = Reference::parse(name)
            .ok()
            .map(|r| r.to_string())
            .filter(|r| img.refs.contains(r));
        let last = by_name.is_none() || img.refs.len() <= 1;
        let u = if last { users(root, &img.id) } else { vec![] };
        if !u.is_empty() && !a.force {
            bail!(
                "image '{name}' ({}) is in use by {}; stop those or use -f",
                short_id(&img.id),
                u.join(", ")
            );
        }
        match by_name {
            Some(r) if img.refs.len() > 1 => {
                store.remove_tag(&r)?;
                super::say!("Untagged: {r}");
            }
            // -f on an image in use: its names go and the image stays, untagged (`<none>`),
            // as docker keeps a running container's layers; `rmi ID` removes it once
            // nothing uses it.
            _ if !u.is_empty() => {
                store.untag_all(&img.manifest_digest)?;
                for r in &img.refs {
                    super::say!("Untagged: {r}");
                }
                log::warn!(
                    "image {} kept untagged: in use by {}",
                    short_id(&img.id),
                    u.join(", ")
                );
            }
            _ => {
                for r in &img.refs {
                    super::say!("Untagged: {r}");
                }
                store.remove_manifest(&img.manifest_digest)?;
                super::say!("Deleted: {}", img.id);
            }
        }
    }
    let (b, l) = store.gc(&[])?;
    log::info!("removed {b} blobs and {l} unpacked layers");
    Ok(())
}
