//! `strata check`.

use std::path::Path;

use anyhow::Result;

use crate::cli::CheckArgs;
use crate::image::check;
use crate::image::store::Store;

/// `strata check [--layers] [--repair]`: exit 0 when the store is sound (or was repaired),
/// 1 when problems remain.
pub fn run(a: CheckArgs, root: &Path) -> Result<i32> {
    let store = Store::open(root, a.repair)?;
    let r = check::check(&store, a.layers)?;
    for p in &r.problems {
        super::say!("{}: {}", p.what, p.why);
    }
    super::say!(
        "checked {} images, {} blobs{}: {} problems",
        r.images,
        r.blobs,
        if a.layers {
            format!(", {} unpacked layers", r.layers)
        } else {
            String::new()
        },
        r.problems.len()
    );
    if r.problems.is_empty() {
        return Ok(0);
    }
    if !a.repair {
        return Ok(1);
    }
    for d in check::repair(&store, &r)? {
        super::say!("{d}");
    }
    let again = check::check(&store, a.layers)?;
    super::say!("after repair: {} problems", again.problems.len());
    Ok(if again.problems.is_empty() { 0 } else { 1 })
}
