//! `strata images`.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::cli::{Format, ImagesArgs};
use crate::image::store::{refs_by_manifest, short_id, total_size, Store};

#[derive(Serialize)]
struct Row {
    repository: String,
    tag: String,
    id: String,
    digest: String,
    created: Option<String>,
    size: u64,
}

/// `strata images`.
pub fn run(a: ImagesArgs, root: &Path) -> Result<()> {
    let store = Store::open(root, false)?;
    let list = store.list()?;
    let mut rows = Vec::new();
    for (md, names) in refs_by_manifest(&list) {
        let desc = list
            .iter()
            .find(|(_, d)| d.digest().to_string() == md)
            .map(|(_, d)| d.clone())
            .unwrap();
        let img = store.load_image(&desc)?;
        let mut names: Vec<String> = names.into_iter().filter(|n| !n.is_empty()).collect();
        if names.is_empty() {
            names.push(String::new());
        }
        for n in names {
            let (repo, tag) = match n.rsplit_once(':') {
                Some((r, t)) if !n.is_empty() => (r.to_string(), t.to_string()),
                _ => ("<none>".into(), "<none>".into()),
            };
            rows.push(Row {
                repository: repo,
                tag,
                id: img.id.clone(),
                digest: md.clone(),
                created: img.config.created().clone(),
                size: total_size(&img.manifest),
            });
        }
    }
    rows.sort_by(|a, b| (&a.repository, &a.tag).cmp(&(&b.repository, &b.tag)));
    if a.format == Format::Json {
        return super::print_json(&rows);
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<30} {:<15} {:<14} {:<16} {:>10}",
        "REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"
    )?;
    for r in rows {
        let id = if a.no_trunc { r.id.clone() } else { short_id(&r.id) };
        writeln!(
            out,
            "{:<30} {:<15} {:<14} {:<16} {:>10}",
            r.repository,
            r.tag,
            id,
            super::ago(r.created.as_deref()),
            super::human_size(r.size)
        )?;
    }
    Ok(())
}
