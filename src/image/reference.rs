//! Image references: `name[:tag]`, `name@sha256:...`, or an image id (prefix).

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

#[cfg(test)]
mod tests {
    use super::*;

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
