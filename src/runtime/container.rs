//! Container directories in the store.

use std::path::Path;

/// Names of containers whose image is `image_id`.
pub fn using_image(root: &Path, image_id: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(root.join("containers")) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let s = std::fs::read_to_string(e.path().join("state.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&s).ok()?;
            (v.get("image_id")?.as_str()? == image_id).then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect()
}
