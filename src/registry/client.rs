//! One registry session: the transport chosen for a host (HTTPS, or plain HTTP where that is
//! allowed), its certificates, credentials and timeouts, an `oci-client` client driven by a
//! small tokio runtime, and the retry and error rules every request shares.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::token_cache::RegistryTokenType;
use oci_client::{Client, RegistryOperation};

use super::auth::{self, Credentials};
use super::Options;
use super::RegistryError;

/// Blobs up to this size are uploaded in one streamed request, larger ones in chunks of
/// oci-client's 4 MiB (some fronting proxies cap a request body near 100 MB).
pub const MONOLITHIC_MAX: u64 = 64 << 20;

/// Connect and read timeout: `STRATA_REGISTRY_TIMEOUT` seconds, 30 by default.
pub fn timeout() -> Duration {
    let secs = std::env::var("STRATA_REGISTRY_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

/// Retries after a failed request (`STRATA_REGISTRY_RETRIES`, 3 by default).
pub fn retries() -> u32 {
    std::env::var("STRATA_REGISTRY_RETRIES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(3)
}

/// Attempts per request.
fn attempts() -> u32 {
    retries() + 1
}

/// The host part of `host[:port]` (IPv6 in brackets).
fn host_only(domain: &str) -> &str {
    if let Some(rest) = domain.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    domain.split(':').next().unwrap_or(domain)
}

/// Loopback registries may speak plain HTTP, as docker allows for 127.0.0.0/8.
pub fn is_loopback(domain: &str) -> bool {
    let h = host_only(domain);
    h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The certificate directory: `--cert-dir`, else docker's and podman's per-host ones.
fn cert_dir(domain: &str, opt: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = opt {
        return Some(d.to_path_buf());
    }
    ["/etc/containers/certs.d", "/etc/docker/certs.d"]
        .iter()
        .map(|b| Path::new(b).join(domain))
        .find(|d| d.is_dir())
}

/// The CA certificates (`*.crt`) of a certs.d directory.
fn load_certs(dir: &Path) -> Result<Vec<Certificate>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).with_context(|| format!("--cert-dir '{}'", dir.display()))?;
    let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    names.sort();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => {
                let data = std::fs::read(&p).with_context(|| format!("reading '{}'", p.display()))?;
                // Fail here, naming the file, rather than at the first request.
                reqwest::Certificate::from_pem(&data)
                    .with_context(|| format!("'{}' is not a PEM certificate", p.display()))?;
                out.push(Certificate {
                    encoding: CertificateEncoding::Pem,
                    data,
                });
            }
            Some("cert") | Some("key") => {
                return Err(RegistryError::Unsupported(format!(
                    "'{}': client certificates are not supported by strata's registry client (oci-client \
                     takes no client identity); only CA certificates (*.crt) are",
                    p.display()
                ))
                .into())
            }
            _ => {}
        }
    }
    Ok(out)
}

fn install_crypto() {
    // reqwest is built without a default provider; ring is the smaller one to build.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A connection to one registry.
pub struct Session {
    /// Drives the async client.
    pub rt: tokio::runtime::Runtime,
    /// Client for everything but small uploads (chunked pushes).
    pub client: Client,
    /// Same registry, monolithic uploads; shares the token cache of `client`.
    pub mono: Client,
    /// Plain reqwest client with the same TLS setup (probe, login).
    pub http: reqwest::Client,
    /// Credentials sent to the registry.
    pub auth: RegistryAuth,
    /// `host[:port]`, as named.
    pub domain: String,
    /// `host[:port]` requests go to.
    pub endpoint: String,
    /// `https` or `http`.
    pub scheme: &'static str,
    /// The `WWW-Authenticate` challenge of `GET /v2/`, if any.
    pub challenge: Option<String>,
}

/// What the first `GET /v2/` answered.
pub struct Probe {
    /// HTTP status.
    pub status: u16,
    /// The `WWW-Authenticate` header, if any.
    pub challenge: Option<String>,
}

impl Session {
    /// Open a session to `domain` for repository `name` (credentials are looked up for it
    /// unless `creds` is given). Decides the scheme with one `GET /v2/`.
    pub fn open(
        domain: &str,
        name: &str,
        opts: &Options,
        creds: Option<Credentials>,
    ) -> Result<(Session, Probe)> {
        install_crypto();
        let certs = match cert_dir(domain, opts.cert_dir.as_deref()) {
            Some(d) => load_certs(&d)?,
            None => Vec::new(),
        };
        let creds = match creds {
            Some(c) => Some(c),
            None => auth::lookup(domain, name, opts.authfile.as_deref())?,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the I/O runtime")?;
        let insecure = !opts.tls_verify;
        let mut b = reqwest::Client::builder()
            .connect_timeout(timeout())
            .read_timeout(timeout())
            .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(insecure);
        if !certs.is_empty() {
            let rc: Vec<reqwest::Certificate> = certs
                .iter()
                .map(|c| reqwest::Certificate::from_pem(&c.data))
                .collect::<Result<_, _>>()?;
            b = b.tls_certs_merge(rc);
        }
        let http = b.build().context("building the HTTP client")?;
        let plain_ok = insecure || is_loopback(domain);
        // Docker Hub's API lives on another host than its name (oci-client maps it too).
        let endpoint = if domain == crate::image::reference::DOCKER_HUB {
            "index.docker.io"
        } else {
            domain
        };
        let (scheme, probe) = rt.block_on(probe(&http, endpoint, plain_ok))?;
        let mk = |mono: bool| {
            Client::new(ClientConfig {
                protocol: if scheme == "http" {
                    ClientProtocol::Http
                } else {
                    ClientProtocol::Https
                },
                accept_invalid_certificates: insecure,
                use_monolithic_push: mono,
                extra_root_certificates: certs.clone(),
                platform_resolver: None,
                max_concurrent_download: 4,
                max_concurrent_upload: 4,
                read_timeout: Some(timeout()),
                connect_timeout: Some(timeout()),
                user_agent: concat!("strata/", env!("CARGO_PKG_VERSION")),
                ..Default::default()
            })
        };
        let client = mk(false);
        let mut mono = mk(true);
        mono.tokens = client.tokens.clone();
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.user, c.password),
            None => RegistryAuth::Anonymous,
        };
        // Calls that take no credentials (blob HEAD, mounts, blob GETs) use these.
        let key = oci_client::Reference::with_tag(domain.to_string(), "x".into(), "latest".into());
        rt.block_on(async {
            client.store_auth_if_needed(key.resolve_registry(), &auth).await;
            mono.store_auth_if_needed(key.resolve_registry(), &auth).await;
        });
        Ok((
            Session {
                rt,
                client,
                mono,
                http,
                auth,
                domain: domain.to_string(),
                endpoint: endpoint.to_string(),
                scheme,
                challenge: probe.challenge.clone(),
            },
            probe,
        ))
    }

    /// For a registry that asked for no authentication, tell oci-client so for `r`'s
    /// repository: with anonymous access it otherwise sends `GET /v2/` before every request
    /// (it caches tokens, not the absence of a challenge). The cached "token" is the
    /// credentials, or an empty basic pair that an open registry ignores.
    pub async fn prime(&self, r: &oci_client::Reference) {
        if self.challenge.is_some() {
            return;
        }
        let (u, p) = self.basic().unwrap_or(("", ""));
        for c in [&self.client, &self.mono] {
            for op in [RegistryOperation::Pull, RegistryOperation::Push] {
                c.tokens
                    .insert(r, op, RegistryTokenType::Basic(u.to_string(), p.to_string()))
                    .await;
            }
        }
    }

    /// `scheme://domain`.
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.endpoint)
    }

    /// The user and password, when there are credentials.
    fn basic(&self) -> Option<(&str, &str)> {
        match &self.auth {
            RegistryAuth::Basic(u, p) => Some((u, p)),
            _ => None,
        }
    }

    /// Add this registry's authorization for `scopes` to a request of our own: a bearer
    /// token asked for all the scopes at once (what a cross-repository mount needs, and
    /// oci-client asks for one repository only), or basic credentials.
    pub async fn authorize(
        &self,
        req: reqwest::RequestBuilder,
        scopes: &[String],
    ) -> Result<reqwest::RequestBuilder> {
        let Some(ch) = self.challenge.as_deref() else {
            return Ok(req);
        };
        let (scheme, params) = super::login::parse_challenge(ch);
        match scheme.as_str() {
            "basic" => Ok(match self.basic() {
                Some((u, p)) => req.basic_auth(u, Some(p)),
                None => req,
            }),
            "bearer" => {
                let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
                let realm = get("realm")
                    .with_context(|| format!("{}: bearer challenge without realm", self.domain))?;
                let mut q: Vec<(&str, String)> = Vec::new();
                if let Some(sv) = get("service") {
                    q.push(("service", sv));
                }
                q.extend(scopes.iter().map(|sc| ("scope", sc.clone())));
                let url = reqwest::Url::parse_with_params(&realm, &q)
                    .with_context(|| format!("{}: bad token realm '{realm}'", self.domain))?;
                let mut t = self.http.get(url);
                if let Some((u, p)) = self.basic() {
                    t = t.basic_auth(u, Some(p));
                }
                let resp = t.send().await.map_err(|e| RegistryError::Other {
                    what: self.domain.clone(),
                    detail: format!("token service: {}", root_cause(&e)),
                })?;
                let code = resp.status().as_u16();
                if !(200..300).contains(&code) {
                    return Err(RegistryError::TokenService {
                        domain: self.domain.clone(),
                        code,
                    }
                    .into());
                }
                let v: serde_json::Value = resp.json().await.context("token service answer")?;
                let tok = v
                    .get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .with_context(|| {
                        format!("{}: the token service answered without a token", self.domain)
                    })?;
                Ok(req.bearer_auth(tok))
            }
            _ => Ok(req),
        }
    }
}

/// `GET /v2/` over HTTPS, falling back to plain HTTP where allowed when the server does not
/// speak TLS (docker's rule for insecure registries).
async fn probe(http: &reqwest::Client, domain: &str, plain_ok: bool) -> Result<(&'static str, Probe)> {
    let answer = |r: reqwest::Response| Probe {
        status: r.status().as_u16(),
        challenge: r
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    match http.get(format!("https://{domain}/v2/")).send().await {
        Ok(r) => Ok(("https", answer(r))),
        Err(e) if plain_ok && !e.is_timeout() => {
            match http.get(format!("http://{domain}/v2/")).send().await {
                // A TLS server answers plain HTTP with 400: its certificate was the problem.
                Ok(r) if r.status().as_u16() == 400 => Err(RegistryError::Certificate {
                    domain: domain.into(),
                    reason: root_cause(&e),
                }
                .into()),
                Ok(r) => {
                    log::debug!("{domain}: no TLS ({}); using plain HTTP", root_cause(&e));
                    Ok(("http", answer(r)))
                }
                Err(e2) => Err(RegistryError::Unreachable {
                    domain: domain.into(),
                    detail: format!(": over HTTPS: {}; over HTTP: {}", root_cause(&e), root_cause(&e2)),
                }
                .into()),
            }
        }
        Err(e) if e.is_timeout() => Err(RegistryError::Unreachable {
            domain: domain.into(),
            detail: format!(": no answer within {:?} (STRATA_REGISTRY_TIMEOUT)", timeout()),
        }
        .into()),
        Err(e) => Err(RegistryError::Unreachable {
            domain: domain.into(),
            detail: format!(" over HTTPS: {}", root_cause(&e)),
        }
        .into()),
    }
}

/// The innermost cause of an error (what a user can act on: "Connection refused",
/// "invalid peer certificate: UnknownIssuer").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(c) = cur.source() {
        cur = c;
    }
    cur.to_string()
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Whether a failed request is worth repeating.
pub fn retryable(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) => {
            // A refused connection will be refused again; a dropped one or a stall may not.
            !r.is_connect() && (r.is_timeout() || r.is_request() || r.is_body() || r.is_decode())
                || r.status()
                    .is_some_and(|s| s.as_u16() == 429 || s.is_server_error())
        }
        OciDistributionError::ServerError { code, .. } => *code == 429 || *code >= 500,
        OciDistributionError::RegistryError { envelope, .. } => {
            envelope.errors.iter().any(|x| match &x.code {
                OciErrorCode::Toomanyrequests => true,
                OciErrorCode::Other(c) => c == "UNAVAILABLE",
                _ => false,
            })
        }
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

/// Run `f` until it succeeds, fails for good, or the attempts are used up; backs off
/// 0.25 s, 0.5 s, 1 s... between attempts.
pub async fn retry<T, F, Fut>(what: &str, mut f: F) -> std::result::Result<T, OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, OciDistributionError>>,
{
    let n = attempts();
    let mut i = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if i + 1 < n && retryable(&e) => {
                let wait = Duration::from_millis(250u64 << i.min(4));
                log::info!("{what}: {}; retrying in {:?}", chain(&e), wait);
                tokio::time::sleep(wait).await;
                i += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A registry error in words, naming the reference or host.
pub fn explain(e: OciDistributionError, what: &str, domain: &str) -> anyhow::Error {
    let what_s = what.to_string();
    let err = match &e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            RegistryError::Unauthorized {
                what: what_s,
                domain: domain.into(),
            }
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let mut unknown = true;
            let mut denied = false;
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|x| {
                    let hint = match x.code {
                        OciErrorCode::ManifestUnknown => " (no such tag or digest)",
                        OciErrorCode::NameUnknown => " (no such repository)",
                        OciErrorCode::BlobUnknown => {
                            " (the registry does not have a blob the manifest names)"
                        }
                        OciErrorCode::Unauthorized | OciErrorCode::Denied => {
                            denied = true;
                            " (check `strata login` and the repository name)"
                        }
                        _ => "",
                    };
                    unknown &= matches!(
                        x.code,
                        OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::BlobUnknown
                    );
                    format!("{}{hint}", x.message)
                })
                .collect();
            let detail = format!("{domain} answered: {}", codes.join("; "));
            if denied {
                RegistryError::Denied { what: what_s, detail }
            } else if unknown && !codes.is_empty() {
                RegistryError::NotFound { what: what_s, detail }
            } else {
                RegistryError::Other { what: what_s, detail }
            }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound {
            what: what_s,
            detail: "manifest unknown (no such tag or digest)".into(),
        },
        OciDistributionError::ServerError { code, message, .. } => RegistryError::Http {
            what: what_s,
            domain: domain.into(),
            code: *code,
            message: message.chars().take(200).collect::<String>().trim().to_string(),
        },
        OciDistributionError::RequestError(r) if r.is_timeout() => RegistryError::Timeout {
            what: what_s,
            domain: domain.into(),
            after: timeout(),
        },
        _ => RegistryError::Other {
            what: what_s,
            detail: chain(&e),
        },
    };
    err.into()
}
