//! The build cache: `ROOT/build-cache.json` maps a step's cache key to the manifest of the
//! image state after it. The manifests are blobs that no tag names; `gc` keeps them (and
//! their config and layers) while the cache lists them.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::image::store::{write_atomic, Store};

const FILE: &str = "build-cache.json";

/// The cache entries: key -> manifest digest.
pub fn load(store: &Store) -> BTreeMap<String, String> {
    std::fs::read(store.root().join(FILE))
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default()
}

/// Record `key` -> `manifest`.
pub fn put(store: &Store, key: &str, manifest: &str) -> Result<()> {
    let mut m = load(store);
    if m.get(key).map(String::as_str) == Some(manifest) {
        return Ok(());
    }
    m.insert(key.to_string(), manifest.to_string());
    write_atomic(&store.root().join(FILE), &serde_json::to_vec(&m)?)
}

/// The manifest for `key`, if it and everything it names are still in the store.
pub fn get(store: &Store, key: &str) -> Option<String> {
    let md = load(store).remove(key)?;
    store.blob_path(&md).ok().filter(|p| p.exists())?;
    Some(md)
}
