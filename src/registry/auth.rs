//! Credentials in the files podman, skopeo, buildah and docker share.
//!
//! Read, in order: `--authfile` (or `$REGISTRY_AUTH_FILE`) alone when given; else
//! `${XDG_RUNTIME_DIR}/containers/auth.json` (`/run/containers/<uid>/auth.json` without it),
//! `~/.config/containers/auth.json`, `~/.docker/config.json`. Written: the first of them.
//! Entries are `{"auths": {"HOST[/PATH]": {"auth": base64("user:pass")}}}`; every other key of
//! the file is kept as it was. Files are written atomically with mode 0600.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::{Map, Value};

/// A user name and its password (or token), never printed.
#[derive(Clone)]
pub struct Credentials {
    /// The user.
    pub user: String,
    /// The secret.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.user)
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/".into())
}

/// The file `login` writes to.
pub fn default_file(authfile: Option<&Path>) -> PathBuf {
    if let Some(f) = authfile {
        return f.to_path_buf();
    }
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()) {
        return PathBuf::from(f);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("containers/auth.json"),
        None => PathBuf::from(format!("/run/containers/{}/auth.json", crate::sys::euid())),
    }
}

/// The files read, in order of precedence.
pub fn read_files(authfile: Option<&Path>) -> Vec<PathBuf> {
    let first = default_file(authfile);
    if authfile.is_some() || std::env::var_os("REGISTRY_AUTH_FILE").is_some_and(|v| !v.is_empty()) {
        return vec![first];
    }
    let docker = match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("config.json"),
        None => home().join(".docker/config.json"),
    };
    vec![first, home().join(".config/containers/auth.json"), docker]
}

/// A key of `auths` in the form it is compared: no scheme, no `/v1/` suffix, no slash at
/// the end (docker writes `https://index.docker.io/v1/` for Docker Hub).
fn normalize_key(k: &str) -> String {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let k = k.trim_end_matches('/');
    let k = k
        .strip_suffix("/v1")
        .or_else(|| k.strip_suffix("/v2"))
        .unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        _ => k.to_string(),
    }
}

fn read_json(p: &Path) -> Result<Option<Value>> {
    match fs::read(p) {
        Ok(d) if d.iter().all(|c| c.is_ascii_whitespace()) => Ok(Some(Value::Object(Map::new()))),
        Ok(d) => Ok(Some(serde_json::from_slice(&d).with_context(|| {
            format!("auth file '{}' is not valid JSON", p.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading auth file '{}'", p.display())),
    }
}

fn decode(entry: &Value, key: &str, file: &Path) -> Result<Option<Credentials>> {
    if let Some(a) = entry
        .get("auth")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
    {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .with_context(|| format!("auth file '{}': entry '{key}' is not base64", file.display()))?;
        let s = String::from_utf8(raw)
            .with_context(|| format!("auth file '{}': entry '{key}' is not UTF-8", file.display()))?;
        let Some((u, p)) = s.split_once(':') else {
            bail!(
                "auth file '{}': entry '{key}' is not user:password",
                file.display()
            );
        };
        return Ok(Some(Credentials {
            user: u.to_string(),
            password: p.to_string(),
        }));
    }
    Ok(None)
}

/// The credentials for repository `name` (`host/path`) on `host`: the longest matching key
/// of the first file that has one (podman matches `host/namespace` keys too).
pub fn lookup(host: &str, name: &str, authfile: Option<&Path>) -> Result<Option<Credentials>> {
    for f in read_files(authfile) {
        let Some(v) = read_json(&f)? else { continue };
        let Some(auths) = v.get("auths").and_then(Value::as_object) else {
            helper_note(&v, host, &f);
            continue;
        };
        let mut best: Option<(usize, &String, &Value)> = None;
        for (k, e) in auths {
            let nk = normalize_key(k);
            let hit = nk == host || (name.starts_with(&nk) && name[nk.len()..].starts_with('/'));
            if hit && best.is_none_or(|(l, _, _)| nk.len() > l) {
                best = Some((nk.len(), k, e));
            }
        }
        if let Some((_, k, e)) = best {
            if let Some(c) = decode(e, k, &f)? {
                log::debug!("credentials for {host} from {}", f.display());
                return Ok(Some(c));
            }
        }
        helper_note(&v, host, &f);
    }
    Ok(None)
}

/// Credential helpers (`credsStore`, `credHelpers`) are not run: say so instead of failing
/// later with a puzzling "unauthorized".
fn helper_note(v: &Value, host: &str, f: &Path) {
    let named = v
        .get("credHelpers")
        .and_then(Value::as_object)
        .is_some_and(|m| m.keys().any(|k| normalize_key(k) == host));
    if named || v.get("credsStore").is_some() {
        log::warn!(
            "{}: credential helpers are not supported; credentials for {host} stored by a helper are not used",
            f.display()
        );
    }
}

fn write_json(p: &Path, v: &Value) -> Result<()> {
    let dir = p.parent().context("auth file path without a directory")?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating '{}'", dir.display()))?;
    let mut data = serde_json::to_vec_pretty(v)?;
    data.push(b'\n');
    crate::image::store::write_atomic_mode(p, &data, 0o600)
        .with_context(|| format!("writing auth file '{}'", p.display()))
}

/// Store credentials for `host` in the auth file; returns the file.
pub fn store(host: &str, c: &Credentials, authfile: Option<&Path>) -> Result<PathBuf> {
    let p = default_file(authfile);
    let mut v = read_json(&p)?.unwrap_or_else(|| Value::Object(Map::new()));
    let Some(obj) = v.as_object_mut() else {
        bail!("auth file '{}' is not a JSON object", p.display());
    };
    let auths = obj.entry("auths").or_insert_with(|| Value::Object(Map::new()));
    let Some(auths) = auths.as_object_mut() else {
        bail!("auth file '{}': \"auths\" is not an object", p.display());
    };
    // One entry per registry: drop other spellings of the same host.
    auths.retain(|k, _| normalize_key(k) != host);
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password));
    let mut e = Map::new();
    e.insert("auth".into(), Value::String(b64));
    auths.insert(host.to_string(), Value::Object(e));
    write_json(&p, &v)?;
    Ok(p)
}

/// Remove the credentials of `host` from every file that has them; returns the files changed.
pub fn remove(host: &str, authfile: Option<&Path>) -> Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for f in read_files(authfile) {
        let Some(mut v) = read_json(&f)? else { continue };
        let Some(auths) = v.get_mut("auths").and_then(Value::as_object_mut) else {
            continue;
        };
        let before = auths.len();
        auths.retain(|k, _| normalize_key(k) != host);
        if auths.len() != before {
            write_json(&f, &v)?;
            changed.push(f);
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(normalize_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_key("quay.io"), "quay.io");
        assert_eq!(normalize_key("http://127.0.0.1:5000/"), "127.0.0.1:5000");
    }

    #[test]
    fn store_lookup_remove() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("sub/auth.json");
        fs::create_dir_all(d.path().join("sub")).unwrap();
        fs::write(&f, r#"{"auths":{"other.io":{"auth":"eDp5"}},"keep":1}"#).unwrap();
        let c = Credentials {
            user: "u".into(),
            password: "p:w".into(),
        };
        store("127.0.0.1:5000", &c, Some(&f)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        let got = lookup("127.0.0.1:5000", "127.0.0.1:5000/a/b", Some(&f))
            .unwrap()
            .unwrap();
        assert_eq!((got.user.as_str(), got.password.as_str()), ("u", "p:w"));
        let other = lookup("other.io", "other.io/x", Some(&f)).unwrap().unwrap();
        assert_eq!((other.user.as_str(), other.password.as_str()), ("x", "y"));
        let v: Value = serde_json::from_slice(&fs::read(&f).unwrap()).unwrap();
        assert_eq!(v["keep"], 1);
        assert_eq!(remove("127.0.0.1:5000", Some(&f)).unwrap(), vec![f.clone()]);
        assert!(lookup("127.0.0.1:5000", "127.0.0.1:5000/a", Some(&f))
            .unwrap()
            .is_none());
        assert!(lookup("other.io", "other.io/x", Some(&f)).unwrap().is_some());
    }
}
