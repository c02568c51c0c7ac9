//! Registries: `pull`, `push`, `login` and `logout` over the OCI distribution API.
//!
//! The wire protocol (token flow, chunked and monolithic uploads, cross-repository mounts) is
//! `oci-client`'s, driven from sync code by a two-thread tokio runtime per command. strata
//! owns what is around it: the transport choice, credentials files, retries and resume,
//! verification while streaming, and the rule that the store names an image only when all of
//! it is in.

pub mod auth;
mod client;
mod error;
mod login;
mod media;
mod pull;
mod push;
mod sources;

use std::fmt;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_spec::image::{Arch, ImageIndex, Os};

pub use client::is_loopback;
pub use error::RegistryError;
pub use login::{login, logout};
pub use pull::{pull, Pulled};
pub use push::{push, Pushed};

/// Options every registry command takes.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Credentials file (else the default ones).
    pub authfile: Option<PathBuf>,
    /// CA certificates directory (docker's certs.d layout).
    pub cert_dir: Option<PathBuf>,
    /// Verify TLS certificates, and use HTTPS for non-loopback hosts.
    pub tls_verify: bool,
    /// No progress.
    pub quiet: bool,
}

/// An `os/arch[/variant]` platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// GOARCH spelling, e.g. `amd64`.
    pub arch: String,
    /// e.g. `v8`.
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// Parse `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        };
        match parts[..] {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => bail!("--platform '{s}': want os/arch[/variant], e.g. linux/arm64"),
        }
    }

    /// The machine's platform, in GOARCH names.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            a => a,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            arch: arch.to_string(),
            variant: None,
        }
    }

    /// An index entry's platform.
    pub fn of(p: &oci_spec::image::Platform) -> Platform {
        Platform {
            os: p.os().to_string(),
            arch: p.architecture().to_string(),
            variant: p.variant().clone(),
        }
    }

    /// The digest of the index entry for this platform. Without a variant, an entry without
    /// one (or arm64's default `v8`) wins over other variants.
    pub fn choose(&self, idx: &ImageIndex) -> Option<String> {
        let mut best: Option<(u8, String)> = None;
        for m in idx.manifests() {
            let Some(p) = m.platform() else { continue };
            if p.os() != &Os::from(self.os.as_str()) || p.architecture() != &Arch::from(self.arch.as_str()) {
                continue;
            }
            let rank = match (&self.variant, p.variant()) {
                (Some(w), Some(v)) if w == v => 0,
                (Some(_), _) => continue,
                (None, None) => 0,
                (None, Some(v)) if v == "v8" && self.arch == "arm64" => 0,
                (None, Some(_)) => 1,
            };
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                best = Some((rank, m.digest().to_string()));
            }
        }
        best.map(|(_, d)| d)
    }
}

/// Per-blob progress: bars on a terminal, one line per finished blob otherwise, nothing
/// when quiet.
pub struct Bars {
    mp: Option<MultiProgress>,
    quiet: bool,
}

impl Bars {
    /// For stderr.
    pub fn new(quiet: bool) -> Bars {
        let mp = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5)));
        Bars { mp, quiet }
    }

    /// A status line.
    pub fn line(&self, s: &str) {
        match &self.mp {
            Some(mp) => {
                let _ = mp.println(s);
            }
            None if !self.quiet => eprintln!("{s}"),
            None => {}
        }
    }

    /// A bar for `total` bytes.
    pub fn bar(&self, label: &str, total: u64) -> Bar {
        let pb = self.mp.as_ref().map(|mp| {
            let pb = mp.add(ProgressBar::new(total));
            pb.set_style(
                ProgressStyle::with_template(
                    "{prefix}: {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_prefix(label.to_string());
            pb
        });
        Bar {
            pb,
            label: label.to_string(),
            total,
            start: Instant::now(),
            plain: !self.quiet && self.mp.is_none(),
        }
    }
}

/// One blob's progress.
#[derive(Clone)]
pub struct Bar {
    pb: Option<ProgressBar>,
    label: String,
    total: u64,
    start: Instant,
    plain: bool,
}

impl Bar {
    /// Bytes done so far.
    pub fn set(&self, n: u64) {
        if let Some(pb) = &self.pb {
            pb.set_position(n);
        }
    }
    /// Finished.
    pub fn done(&self) {
        self.finish("done");
    }
    /// Finished with another word.
    pub fn finish(&self, word: &str) {
        if let Some(pb) = &self.pb {
            pb.finish_with_message(word.to_string());
        } else if self.plain {
            let secs = self.start.elapsed().as_secs_f64();
            eprintln!(
                "{}: {word} ({:.1} MiB in {secs:.2} s)",
                self.label,
                self.total as f64 / (1 << 20) as f64
            );
        }
    }
    /// Failed.
    pub fn fail(&self, why: &str) {
        if let Some(pb) = &self.pb {
            pb.abandon_with_message(why.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_errors() {
        use oci_client::errors::OciDistributionError as O;
        let e = client::explain(O::UnauthorizedError { url: "u".into() }, "h/r:1", "h");
        assert!(
            matches!(e.downcast_ref::<RegistryError>(), Some(RegistryError::Unauthorized { domain, .. }) if domain == "h"),
            "{e:#}"
        );
        assert!(format!("{e}").contains("strata login h"), "{e}");
        let e = client::explain(O::ImageManifestNotFoundError("x".into()), "h/r:1", "h");
        assert!(
            matches!(
                e.downcast_ref::<RegistryError>(),
                Some(RegistryError::NotFound { .. })
            ),
            "{e:#}"
        );
        let e = client::explain(
            O::ServerError {
                code: 502,
                url: "u".into(),
                message: "bad gateway".into(),
            },
            "h/r:1",
            "h",
        );
        assert!(
            matches!(
                e.downcast_ref::<RegistryError>(),
                Some(RegistryError::Http { code: 502, .. })
            ),
            "{e:#}"
        );
        assert_eq!(format!("{e}"), "h/r:1: h answered HTTP 502: bad gateway");
        let e = media::kind(br#"{"schemaVersion": 1}"#).unwrap_err();
        assert!(
            matches!(
                e.downcast_ref::<RegistryError>(),
                Some(RegistryError::Unsupported(_))
            ),
            "{e:#}"
        );
        let dir = std::env::temp_dir().join(format!("strata-reg-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("auth.json");
        std::fs::write(&file, "{}").unwrap();
        let e = logout("example.com", Some(&file)).unwrap_err();
        assert!(
            matches!(e.downcast_ref::<RegistryError>(), Some(RegistryError::NotLoggedIn(d)) if d == "example.com"),
            "{e:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn index(entries: &[(&str, &str, Option<&str>, char)]) -> ImageIndex {
        let ms: Vec<serde_json::Value> = entries
            .iter()
            .map(|(os, arch, v, c)| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = v {
                    p["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": media::OCI_MANIFEST,
                    "size": 1,
                    "digest": format!("sha256:{}", c.to_string().repeat(64)),
                    "platform": p,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({"schemaVersion": 2, "manifests": ms})).unwrap()
    }

    #[test]
    fn platform_choice() {
        let idx = index(&[
            ("linux", "arm", Some("v6"), 'a'),
            ("linux", "arm", Some("v7"), 'b'),
            ("linux", "arm64", Some("v8"), 'c'),
            ("linux", "amd64", None, 'd'),
            ("unknown", "unknown", None, 'e'),
        ]);
        let pick = |s: &str| {
            Platform::parse(s)
                .unwrap()
                .choose(&idx)
                .map(|d| d.chars().last().unwrap())
        };
        assert_eq!(pick("linux/amd64"), Some('d'));
        assert_eq!(pick("linux/arm64"), Some('c'));
        assert_eq!(pick("linux/arm/v7"), Some('b'));
        assert_eq!(pick("linux/arm"), Some('a'));
        assert_eq!(pick("linux/s390x"), None);
        assert_eq!(pick("linux/arm/v5"), None);
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/amd64/v1/x").is_err());
        assert_eq!(Platform::host().os, "linux");
    }
}
