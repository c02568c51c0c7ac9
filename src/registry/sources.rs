//! Which repositories a blob was pulled from or pushed to (`ROOT/sources.json`), so a push to
//! another repository of the same registry can mount it instead of uploading it again.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::image::store::{write_atomic, Store};

/// Repositories kept per blob.
const KEEP: usize = 8;

fn load(store: &Store) -> BTreeMap<String, Vec<String>> {
    std::fs::read(store.root().join("sources.json"))
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default()
}

/// Record that `digests` are in repository `name` (`host/path`).
pub fn record(store: &Store, name: &str, digests: &[String]) -> Result<()> {
    let mut m = load(store);
    let before = m.clone();
    for d in digests {
        let v = m.entry(d.clone()).or_default();
        v.retain(|n| n != name);
        v.insert(0, name.to_string());
        v.truncate(KEEP);
    }
    // Forget blobs the store no longer has.
    m.retain(|d, _| store.blob_path(d).is_ok_and(|p| p.exists()));
    if m == before {
        return Ok(());
    }
    write_atomic(&store.root().join("sources.json"), &serde_json::to_vec(&m)?)
}

/// Repositories of `domain` other than `name` known to hold `digest`.
pub fn on_registry(store: &Store, domain: &str, name: &str, digest: &str) -> Vec<String> {
    load(store)
        .remove(digest)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n != name && n.strip_prefix(domain).is_some_and(|r| r.starts_with('/')))
        .map(|n| n[domain.len() + 1..].to_string())
        .collect()
}
