//! Image references: `name[:tag]`, `name@sha256:...`, or an image id (prefix).
//!
//! [`Reference`] is a name in the local store. [`RemoteRef`] is docker's reference to an image
//! in a registry, normalized as docker does: `alpine` is `docker.io/library/alpine:latest`.

use std::fmt;

/// A parsed `name:tag` reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Repository name, e.g. `busybox` or `example.com/team/app`.
    pub name: String,
    /// Tag, `latest` when not given.
    pub tag: String,
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

fn valid_component(c: &str) -> bool {
    // Lower-case alphanumerics separated by '.', '_', '__' or '-' runs (the distribution
    // grammar, slightly relaxed), never starting or ending with a separator.
    let b = c.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-'))
}

impl Reference {
    /// Parse `name[:tag]`. A registry host may carry a port (`host:5000/name:tag`).
    pub fn parse(s: &str) -> Result<Reference, String> {
        if s.is_empty() {
            return Err("empty image reference".into());
        }
        if s.contains('@') {
            return Err(format!("'{s}': digest references cannot be tagged; use name:tag"));
        }
        let (name, tag) = match s.rfind(':') {
            Some(i) if !s[i + 1..].contains('/') => (&s[..i], &s[i + 1..]),
            _ => (s, "latest"),
        };
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.as_bytes()[0] != b'.'
            && tag.as_bytes()[0] != b'-'
            && tag
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !tag_ok {
            return Err(format!("'{s}': invalid tag '{tag}'"));
        }
        let mut comps = name.split('/').peekable();
        let mut first = true;
        while let Some(c) = comps.next() {
            // The first component may be a registry host with a port.
            let host_like =
                first && comps.peek().is_some() && (c.contains('.') || c.contains(':') || c == "localhost");
            let ok = if host_like {
                c.split(':').next().is_some_and(|h| {
                    !h.is_empty()
                        && h.bytes()
                            .all(|x| x.is_ascii_alphanumeric() || x == b'.' || x == b'-')
                }) && c
                    .split(':')
                    .nth(1)
                    .is_none_or(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_digit()))
            } else {
                valid_component(c)
            };
            if !ok {
                return Err(format!(
                    "'{s}': invalid repository name '{name}' (lower-case letters, digits and . _ - / only)"
                ));
            }
            first = false;
        }
        if name.len() > 255 {
            return Err(format!("'{s}': repository name too long"));
        }
        Ok(Reference {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }
}

/// docker's default registry and the name it is stored under.
pub const DOCKER_HUB: &str = "docker.io";

/// A registry reference, normalized: `domain/path` plus a tag, a digest, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRef {
    /// Registry host, with its port when given (`docker.io`, `127.0.0.1:5000`).
    pub domain: String,
    /// Repository path inside the registry (`library/alpine`).
    pub path: String,
    /// Tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>` when the reference pins a manifest.
    pub digest: Option<String>,
}

impl RemoteRef {
    /// Parse docker's syntax: `name[:tag]`, `name@sha256:...`, `host[:port]/path/name:tag`.
    pub fn parse(s: &str) -> Result<RemoteRef, String> {
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if super::digest::hex_part(d).is_none() {
                    return Err(format!(
                        "'{s}': invalid digest '{d}' (want sha256:<64 hex digits>)"
                    ));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let has_tag = rest.rfind(':').is_some_and(|i| !rest[i + 1..].contains('/'));
        // The name grammar is Reference's; a digest-only reference has no tag.
        let local = Reference::parse(rest).map_err(|e| e.replace(rest, s))?;
        let tag = (has_tag || digest.is_none()).then_some(local.tag);
        let (domain, path) = match local.name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), local.name.clone()),
        };
        let domain = match domain.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => domain,
        };
        let path = if domain == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        Ok(RemoteRef {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `domain/path`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The store name for a tagged reference (`docker.io/library/alpine:latest`).
    pub fn local(&self) -> Option<Reference> {
        self.tag.as_ref().map(|t| Reference {
            name: self.name(),
            tag: t.clone(),
        })
    }

    /// What the registry is asked for: the digest when pinned, else the tag.
    pub fn wire_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }
}

impl fmt::Display for RemoteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The normalized form of a store name, so `alpine` finds `docker.io/library/alpine:latest`
/// and the other way round.
pub fn normalized(s: &str) -> Option<String> {
    RemoteRef::parse(s)
        .ok()
        .and_then(|r| r.local())
        .map(|r| r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote() {
        let r = RemoteRef::parse("alpine").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        let r = RemoteRef::parse("user/app:1").unwrap();
        assert_eq!(r.to_string(), "docker.io/user/app:1");
        let r = RemoteRef::parse("127.0.0.1:5000/a/b:t").unwrap();
        assert_eq!((r.domain.as_str(), r.path.as_str()), ("127.0.0.1:5000", "a/b"));
        assert_eq!(r.wire_ref(), "t");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = RemoteRef::parse(&format!("localhost/x@{d}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.wire_ref()), (None, d.as_str()));
        assert_eq!(r.to_string(), format!("localhost/x@{d}"));
        assert_eq!(
            RemoteRef::parse("index.docker.io/busybox").unwrap().to_string(),
            "docker.io/library/busybox:latest"
        );
        for bad in ["", "UPPER/x", "a@sha256:12", "a:b@md5:00", "-x", "h:99999x/y"] {
            assert!(RemoteRef::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            normalized("busybox:1").as_deref(),
            Some("docker.io/library/busybox:1")
        );
    }

    #[test]
    fn parse() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "busybox:latest");
        assert_eq!(Reference::parse("a/b:v1.2").unwrap().tag, "v1.2");
        let r = Reference::parse("localhost:5000/x/y:z").unwrap();
        assert_eq!((r.name.as_str(), r.tag.as_str()), ("localhost:5000/x/y", "z"));
        assert_eq!(Reference::parse("host:5000/x").unwrap().tag, "latest");
        for bad in [
            "",
            "UPPER",
            "a:",
            "a:-x",
            "a//b",
            "-a",
            "a@sha256:00",
            "a:b:c/d e",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
