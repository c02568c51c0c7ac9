//! `login` checks credentials against the registry the way docker does (`GET /v2/` with
//! basic auth, or a token request to the bearer realm) before it stores them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::auth::{self, Credentials};
use super::client::{chain, Session};
use super::{Options, RegistryError};

/// The registry host of a `login` argument: `https://host:port/...` -> `host:port`;
/// Docker Hub's spellings -> `docker.io`.
pub fn registry_host(s: &str) -> Result<String> {
    let t = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = t.split('/').next().unwrap_or("");
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']'));
    if !ok {
        bail!("'{s}' is not a registry host (want host[:port])");
    }
    Ok(match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        h => h.to_lowercase(),
    })
}

/// The parameters of a `WWW-Authenticate` challenge: (scheme, [(key, value)]).
pub fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            val = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        params.push((key.trim().to_lowercase(), val.trim().to_string()));
    }
    (scheme.to_lowercase(), params)
}

/// Check `creds` against `registry` and store them; returns the file written.
pub fn login(registry: &str, creds: Credentials, opts: &Options) -> Result<PathBuf> {
    let domain = registry_host(registry)?;
    let (s, probe) = Session::open(&domain, &domain, opts, Some(creds.clone()))?;
    let denied = || {
        anyhow::Error::from(RegistryError::LoginRefused {
            domain: domain.clone(),
        })
    };
    s.rt.block_on(async {
        match probe.status {
            200 => {
                log::info!("{domain} does not ask for credentials; storing them anyway");
                Ok(())
            }
            401 => {
                let Some(ch) = probe.challenge.as_deref() else {
                    bail!("{domain} answered 401 without saying how to authenticate");
                };
                let (scheme, params) = parse_challenge(ch);
                let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
                let resp = match scheme.as_str() {
                    "basic" => s
                        .http
                        .get(format!("{}/v2/", s.base()))
                        .basic_auth(&creds.user, Some(&creds.password))
                        .send()
                        .await
                        .with_context(|| format!("login to {domain}"))?,
                    "bearer" => {
                        let realm = get("realm")
                            .with_context(|| format!("{domain}: bearer challenge without realm"))?;
                        let mut q = vec![("account", creds.user.clone())];
                        if let Some(sv) = get("service") {
                            q.push(("service", sv));
                        }
                        let url = reqwest::Url::parse_with_params(&realm, &q)
                            .with_context(|| format!("{domain}: bad token realm '{realm}'"))?;
                        s.http
                            .get(url)
                            .basic_auth(&creds.user, Some(&creds.password))
                            .send()
                            .await
                            .map_err(|e| {
                                anyhow::anyhow!("login to {domain}: token service {realm}: {}", chain(&e))
                            })?
                    }
                    other => {
                        return Err(RegistryError::Unsupported(format!(
                            "{domain} asks for '{other}' authentication, which strata does not speak"
                        ))
                        .into())
                    }
                };
                match resp.status().as_u16() {
                    200 => {
                        if scheme == "bearer" {
                            let v: serde_json::Value = resp.json().await.with_context(|| {
                                format!("login to {domain}: the token service answered no JSON")
                            })?;
                            if v.get("token")
                                .or_else(|| v.get("access_token"))
                                .and_then(|t| t.as_str())
                                .is_none()
                            {
                                bail!("login to {domain}: the token service answered without a token");
                            }
                        }
                        Ok(())
                    }
                    401 | 403 => Err(denied()),
                    c => bail!("login to {domain}: the registry answered HTTP {c}"),
                }
            }
            c => bail!("login to {domain}: GET /v2/ answered HTTP {c}; is it a registry?"),
        }
    })?;
    auth::store(&domain, &creds, opts.authfile.as_deref())
}

/// Remove stored credentials for `registry`; errors when there were none.
pub fn logout(registry: &str, authfile: Option<&std::path::Path>) -> Result<String> {
    let domain = registry_host(registry)?;
    let changed = auth::remove(&domain, authfile)?;
    if changed.is_empty() {
        return Err(RegistryError::NotLoggedIn(domain).into());
    }
    Ok(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://a/token",service="reg, x",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p[0], ("realm".into(), "https://a/token".into()));
        assert_eq!(p[1].1, "reg, x");
        assert_eq!(p[2].1, "repository:a/b:pull,push");
        assert_eq!(parse_challenge(r#"Basic realm="r""#).0, "basic");
        assert_eq!(registry_host("https://Quay.io/v1/").unwrap(), "quay.io");
        assert!(registry_host("a b").is_err());
    }
}
