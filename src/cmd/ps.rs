//! `strata ps`.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::cli::{Format, PsArgs};
use crate::container::Container;

#[derive(Serialize)]
struct Row {
    name: String,
    image: String,
    image_id: String,
    status: String,
    upper_size: u64,
    created: String,
}

/// `strata ps`.
pub fn run(a: PsArgs, root: &Path) -> Result<()> {
    let rows: Vec<Row> = Container::list(root)
        .into_iter()
        .map(|c| {
            let status = match c.mounted() {
                Err(_) => "broken (filesystem daemon died)".to_string(),
                Ok(_) if c.running() => "running".into(),
                Ok(true) => "mounted".into(),
                Ok(false) => "not mounted".into(),
            };
            Row {
                name: c.state.name.clone(),
                image: c.state.image.clone(),
                image_id: c.state.image_id.clone(),
                status,
                upper_size: c.upper_size(),
                created: c.state.created.clone(),
            }
        })
        .collect();
    if a.format == Format::Json {
        return super::print_json(&rows);
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<20} {:<25} {:<32} {:>10}  CREATED",
        "NAME", "IMAGE", "STATUS", "SIZE"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<20} {:<25} {:<32} {:>10}  {}",
            r.name,
            r.image,
            r.status,
            super::human_size(r.upper_size),
            super::ago(Some(&r.created))
        )?;
    }
    Ok(())
}
