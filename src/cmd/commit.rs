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
    let (container, name) = match a.names.as_slice() {
        [n] => (None, n.clone()),
        [c, n] => (Some(crate::container::Container::open(root, c)?), n.clone()),
        _ => anyhow::bail!("usage: strata commit [--upper DIR | CONTAINER] NAME[:TAG]"),
    };
    let tag = Reference::parse(&name).map_err(anyhow::Error::msg)?;
    let (upper, base, created_by, mut excludes) = match (&container, a.upper) {
        (Some(_), Some(_)) => anyhow::bail!("give either a container or --upper, not both"),
        (None, None) => anyhow::bail!("nothing to commit: give a container or --upper DIR"),
        (None, Some(u)) => (u, a.base, "strata commit".to_string(), vec![]),
        (Some(c), None) => {
            // Mount-point stubs left by an interrupted run are runtime artefacts.
            let stubs: Vec<String> = std::fs::read_to_string(c.rundir().join("stubs"))
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            let by = match &c.state.last_command {
                Some(cmd) => cmd.join(" "),
                None => "strata commit".into(),
            };
            (c.upper(), a.base.or(Some(c.state.image_id.clone())), by, stubs)
        }
    };
    excludes.extend(a.exclude);
    let store = Store::open(root, true)?;
    let o = CommitOpts {
        upper,
        base,
        author: a.author,
        message: a.message,
        changes: a.change,
        squash: a.squash,
        excludes,
        compress: compression(a.compress),
        created_by,
        tag,
    };
    let img = commit(&store, &o, &Progress::new())?;
    super::say!("{}", img.id);
    log::info!("committed {} as {}", short_id(&img.id), o.tag);
    Ok(())
}
