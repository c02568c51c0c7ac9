//! `strata history`.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::cli::{Format, HistoryArgs};
use crate::image::store::{short_id, Store};

#[derive(Serialize)]
struct Row {
    /// Layer digest, or "<empty>" for a history entry without a layer.
    layer: String,
    diff_id: Option<String>,
    created: Option<String>,
    created_by: String,
    author: Option<String>,
    size: u64,
    comment: String,
    empty_layer: bool,
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() > n {
        s.chars().take(n - 3).collect::<String>() + "..."
    } else {
        s.to_string()
    }
}

/// `strata history`: newest layer first.
pub fn run(a: HistoryArgs, root: &Path) -> Result<()> {
    let store = Store::open(root, false)?;
    let img = store.resolve(&a.image)?;
    let layers = img.manifest.layers();
    let diff_ids = img.config.rootfs().diff_ids();
    let hist = img.config.history().clone().unwrap_or_default();
    let mut rows = Vec::new();
    let mut li = 0;
    for h in &hist {
        let empty = h.empty_layer().unwrap_or(false);
        let (layer, diff_id, size) = if empty || li >= layers.len() {
            ("<empty>".to_string(), None, 0)
        } else {
            let l = &layers[li];
            li += 1;
            (l.digest().to_string(), diff_ids.get(li - 1).cloned(), l.size())
        };
        rows.push(Row {
            layer,
            diff_id,
            created: h.created().clone(),
            created_by: h.created_by().clone().unwrap_or_default(),
            author: h.author().clone(),
            size,
            comment: h.comment().clone().unwrap_or_default(),
            empty_layer: empty,
        });
    }
    // Layers without history entries (some tools write none) still show.
    for (i, l) in layers.iter().enumerate().skip(li) {
        rows.push(Row {
            layer: l.digest().to_string(),
            diff_id: diff_ids.get(i).cloned(),
            created: None,
            created_by: String::new(),
            author: None,
            size: l.size(),
            comment: String::new(),
            empty_layer: false,
        });
    }
    rows.reverse();
    if a.format == Format::Json {
        return super::print_json(&rows);
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<14} {:<16} {:<47} {:>10}  COMMENT",
        "LAYER", "CREATED", "CREATED BY", "SIZE"
    )?;
    for r in rows {
        let id = if a.no_trunc || r.empty_layer {
            r.layer.clone()
        } else {
            short_id(&r.layer)
        };
        let by = if a.no_trunc {
            r.created_by.clone()
        } else {
            trunc(&r.created_by, 45)
        };
        writeln!(
            out,
            "{:<14} {:<16} {:<47} {:>10}  {}",
            id,
            super::ago(r.created.as_deref()),
            by,
            super::human_size(r.size),
            r.comment
        )?;
    }
    Ok(())
}
