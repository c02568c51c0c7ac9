//! Infrastructure for the registry tests (registry.rs): a real distribution
//! registry (`docker-registry`, plain or TLS + htpasswd) on a free loopback
//! port, a test CA made with the openssl CLI, an HTTP/1.1 reverse proxy in
//! front of a plain registry (bearer-token server, blob corruption, dropped
//! connections, slow bodies, error statuses, request counts), a blackhole
//! listener, and OCI layouts built by hand and pushed with skopeo, so images
//! enter a registry without strata.
//!
//! Test crates using it declare `mod common; mod image_common; mod registry_common;`.
//! Every server listens on 127.0.0.1 only and is stopped on drop.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::common::{run_cmd, sha256_hex, CmdOutput};
use crate::image_common::{busybox_rootfs, must, require_tool, tar_dir, RawTar, CMD_TIMEOUT};

/// Something that describes a server's state, printed when a command fails.
pub type Diag = Box<dyn Fn() -> String>;

/// The `service` the bearer proxy names in its challenges.
pub const TOKEN_SERVICE: &str = "strata-test";

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// The last `n` lines of a text file (for panic messages).
pub fn file_tail(p: &Path, n: usize) -> String {
    let text = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// base64 (standard alphabet, padded): auth.json's "auth" and HTTP basic.

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for ch in text.trim().bytes() {
        if ch == b'=' {
            break;
        }
        let v = B64.iter().position(|c| *c == ch)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits & 0xff) as u8);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Peer tools.

/// skopeo with a permissive policy, its temp files in `tmp`, and HOME /
/// XDG_RUNTIME_DIR inside `tmp`, so no auth file of the machine is read.
pub fn skopeo_cmd(tmp: &Path) -> Command {
    let home = tmp.join("skopeo-home");
    let run = tmp.join("skopeo-run");
    for d in [tmp, &home, &run] {
        fs::create_dir_all(d).unwrap();
    }
    let mut c = Command::new(require_tool("skopeo"));
    c.arg("--insecure-policy")
        .env("TMPDIR", tmp)
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &run)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("DOCKER_CONFIG");
    c
}

/// Run skopeo; panics unless it exits 0.
pub fn skopeo(tmp: &Path, args: &[&str]) -> CmdOutput {
    must(skopeo_cmd(tmp).args(args), &format!("skopeo {}", args.join(" ")))
}

/// Run skopeo, returning whatever happened.
pub fn skopeo_run(tmp: &Path, args: &[&str]) -> CmdOutput {
    run_cmd(skopeo_cmd(tmp).args(args), CMD_TIMEOUT)
}

/// `docker`-style platform names of this machine ("amd64", "arm64", ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => panic!("unknown host architecture {other}"),
    }
}

/// An architecture that is not this machine's, among amd64/arm64.
pub fn other_arch() -> &'static str {
    if host_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    }
}

// ---------------------------------------------------------------------------
// Certificates.

/// A test CA and a server certificate for IP 127.0.0.1 / DNS localhost,
/// made with the openssl CLI (P-256 keys).
#[derive(Clone, Debug)]
pub struct Certs {
    /// Everything: ca.crt, ca.key, server.crt, server.key.
    pub dir: PathBuf,
    /// docker's certs.d layout: only ca.crt (what `--cert-dir` takes).
    pub cert_dir: PathBuf,
}

impl Certs {
    pub fn make(dir: &Path) -> Certs {
        let openssl = require_tool("openssl");
        fs::create_dir_all(dir).unwrap();
        let cnf = dir.join("openssl.cnf");
        fs::write(
            &cnf,
            "[req]\n\
             distinguished_name = dn\n\
             prompt = no\n\
             [dn]\n\
             CN = strata test CA\n\
             [server_dn]\n\
             CN = 127.0.0.1\n\
             [v3_ca]\n\
             basicConstraints = critical,CA:TRUE\n\
             keyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n\
             [v3_server]\n\
             basicConstraints = critical,CA:FALSE\n\
             keyUsage = critical,digitalSignature\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = IP:127.0.0.1,DNS:localhost\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid,issuer\n",
        )
        .unwrap();
        let p = |n: &str| s(&dir.join(n));
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        must(
            Command::new(&openssl)
                .args(["req", "-x509", "-new", "-config", &p("openssl.cnf")])
                .args(["-extensions", "v3_ca", "-days", "3"])
                .args(ec)
                .args(["-keyout", &p("ca.key"), "-out", &p("ca.crt")]),
            "openssl: test CA",
        );
        must(
            Command::new(&openssl)
                .args([
                    "req",
                    "-new",
                    "-config",
                    &p("openssl.cnf"),
                    "-subj",
                    "/CN=127.0.0.1",
                ])
                .args(ec)
                .args(["-keyout", &p("server.key"), "-out", &p("server.csr")]),
            "openssl: server key and CSR",
        );
        must(
            Command::new(&openssl)
                .args(["x509", "-req", "-in", &p("server.csr"), "-CA", &p("ca.crt")])
                .args(["-CAkey", &p("ca.key"), "-CAcreateserial", "-days", "3"])
                .args(["-extfile", &p("openssl.cnf"), "-extensions", "v3_server"])
                .args(["-out", &p("server.crt")]),
            "openssl: sign the server certificate",
        );
        let cert_dir = dir.join("certs.d");
        fs::create_dir_all(&cert_dir).unwrap();
        fs::copy(dir.join("ca.crt"), cert_dir.join("ca.crt")).unwrap();
        Certs {
            dir: dir.to_path_buf(),
            cert_dir,
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

// ---------------------------------------------------------------------------
// The registry.

/// A `docker-registry serve` (distribution v2) on 127.0.0.1:PORT with its own
/// config and storage in a temp dir; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Registry {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    certs: Option<Certs>,
    auth: Option<(String, String)>,
}

impl Registry {
    /// Plain HTTP, anonymous.
    pub fn plain() -> Registry {
        Registry::start(false, None)
    }

    /// HTTPS with a test CA (see cert_dir()), anonymous.
    pub fn tls() -> Registry {
        Registry::start(true, None)
    }

    /// HTTPS with a test CA and htpasswd basic auth for one user.
    pub fn tls_basic(user: &str, pass: &str) -> Registry {
        Registry::start(true, Some((user, pass)))
    }

    pub fn start(tls: bool, auth: Option<(&str, &str)>) -> Registry {
        let mut last_err = String::new();
        // The free port can be taken between the probe and the registry's bind.
        for _attempt in 0..5 {
            match Registry::try_start(tls, auth) {
                Ok(r) => return r,
                Err((e, retry)) => {
                    last_err = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("docker-registry did not start: {last_err}");
    }

    fn try_start(tls: bool, auth: Option<(&str, &str)>) -> Result<Registry, (String, bool)> {
        let bin = require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("strata-registry-")
            .tempdir_in("/tmp")
            .expect("registry temp dir");
        let d = dir.path().to_path_buf();
        fs::create_dir_all(d.join("storage")).unwrap();
        let certs = tls.then(|| Certs::make(&d.join("certs")));
        let auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        if let Some((u, p)) = &auth {
            let out = must(
                Command::new(require_tool("htpasswd")).args(["-Bbn", u, p]),
                "htpasswd -Bbn",
            );
            let line = out
                .stdout
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            assert!(line.starts_with(&format!("{u}:$2")), "htpasswd output: {out}");
            fs::write(d.join("htpasswd"), format!("{line}\n")).unwrap();
        }
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\n\
             log:\n  level: info\n  fields:\n    service: registry\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: strata-test-secret\n  \
             headers:\n    X-Content-Type-Options: [nosniff]\n",
            s(&d.join("storage"))
        );
        if let Some(c) = &certs {
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                s(&c.dir.join("server.crt")),
                s(&c.dir.join("server.key"))
            ));
        }
        if auth.is_some() {
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
                s(&d.join("htpasswd"))
            ));
        }
        fs::write(d.join("config.yml"), &cfg).unwrap();
        let log = fs::File::create(d.join("registry.log")).unwrap();
        let mut cmd = Command::new(&bin);
        // REGISTRY_<SECTION>_<KEY> variables override the config file.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut reg = Registry {
            dir,
            child: Some(child),
            port,
            certs,
            auth,
        };
        match reg.wait_ready() {
            Ok(()) => Ok(reg),
            Err(e) => {
                let log = reg.log_tail(30);
                reg.stop();
                let retry = log.contains("address already in use");
                Err((format!("{e}\n--- registry.log (tail) ---\n{log}"), retry))
            }
        }
    }

    /// Poll GET /v2/ until it answers 200 or 401.
    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("docker-registry exited: {st}"));
            }
            let out = run_cmd(
                self.curl_cmd(false)
                    .args(["-o", "/dev/null", "-w", "%{http_code}"])
                    .arg(self.url("/v2/")),
                Duration::from_secs(10),
            );
            let code = out.stdout.trim();
            if code == "200" || code == "401" {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!("GET /v2/ never answered 200/401 (last curl: {out})"));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_tls(&self) -> bool {
        self.certs.is_some()
    }

    pub fn creds(&self) -> Option<(String, String)> {
        self.auth.clone()
    }

    /// `http(s)://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr())
    }

    /// A directory holding the CA as `ca.crt` (docker's certs.d layout).
    pub fn cert_dir(&self) -> PathBuf {
        self.certs
            .as_ref()
            .expect("cert_dir() of a plain-HTTP registry")
            .cert_dir
            .clone()
    }

    pub fn certs(&self) -> Option<&Certs> {
        self.certs.as_ref()
    }

    /// The storage root (distribution's filesystem driver rootdirectory).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps a blob's bytes.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    pub fn log_tail(&self, n: usize) -> String {
        file_tail(&self.log_path(), n)
    }

    /// A closure printing the log's tail, for a test client's failure messages.
    pub fn diag(&self) -> Diag {
        let p = self.log_path();
        let addr = self.addr();
        Box::new(move || format!("registry {addr} log (tail):\n{}", file_tail(&p, 25)))
    }

    /// curl with this registry's CA and credentials (when it has them).
    pub fn curl_cmd(&self, with_creds: bool) -> Command {
        let mut c = Command::new(require_tool("curl"));
        c.args(["-sS", "--max-time", "30", "--noproxy", "*"]);
        if let Some(certs) = &self.certs {
            c.arg("--cacert").arg(certs.ca());
        }
        if with_creds {
            if let Some((u, p)) = &self.auth {
                c.arg("-u").arg(format!("{u}:{p}"));
            }
        }
        c
    }

    /// The registry's digest for `repo:reference` (HEAD of the manifest with
    /// every manifest media type accepted), or None on 404.
    pub fn manifest_digest(&self, repo: &str, reference: &str) -> Option<String> {
        let out = must(
            self.curl_cmd(true)
                .args(["-I", "-H", ACCEPT_ALL_MANIFESTS])
                .arg(self.url(&format!("/v2/{repo}/manifests/{reference}"))),
            "curl HEAD manifest",
        );
        let status = out.stdout.lines().next().unwrap_or_default().to_string();
        if status.contains(" 404") {
            return None;
        }
        assert!(status.contains(" 200"), "HEAD manifest {repo}:{reference}: {out}");
        out.stdout.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("docker-content-digest")
                .then(|| v.trim().to_string())
        })
    }

    /// The manifest bytes as stored (GET with every manifest type accepted).
    pub fn manifest(&self, repo: &str, reference: &str) -> Vec<u8> {
        let out = must(
            self.curl_cmd(true)
                .args(["-f", "-H", ACCEPT_ALL_MANIFESTS])
                .arg(self.url(&format!("/v2/{repo}/manifests/{reference}"))),
            "curl GET manifest",
        );
        out.stdout.into_bytes()
    }

    /// Tags of a repository per the registry (empty when it is unknown).
    pub fn tags(&self, repo: &str) -> Vec<String> {
        let out = run_cmd(
            self.curl_cmd(true)
                .arg(self.url(&format!("/v2/{repo}/tags/list"))),
            Duration::from_secs(60),
        );
        let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        v["tags"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// skopeo's flags for this registry as a source or destination
    /// (`prefix` = "src" or "dest"), or for inspect (`prefix` = "").
    pub fn skopeo_flags(&self, prefix: &str) -> Vec<String> {
        let dash = if prefix.is_empty() {
            "--".to_string()
        } else {
            format!("--{prefix}-")
        };
        let mut v = Vec::new();
        match &self.certs {
            Some(c) => v.push(format!("{dash}cert-dir={}", s(&c.cert_dir))),
            None => v.push(format!("{dash}tls-verify=false")),
        }
        if let Some((u, p)) = &self.auth {
            v.push(format!("{dash}creds={u}:{p}"));
        }
        v
    }

    /// `skopeo copy [--all] oci:LAYOUT:TAG docker://ADDR/DEST`; returns the
    /// manifest digest the registry then reports for DEST.
    pub fn push_layout(&self, tmp: &Path, layout: &Path, tag: &str, dest: &str, all: bool) -> String {
        let src = format!("oci:{}:{tag}", s(layout));
        let dst = format!("docker://{}/{dest}", self.addr());
        let flags = self.skopeo_flags("dest");
        let mut args: Vec<&str> = vec!["copy", "--preserve-digests"];
        if all {
            args.push("--all");
        }
        args.extend(flags.iter().map(String::as_str));
        args.extend([src.as_str(), dst.as_str()]);
        skopeo(tmp, &args);
        let (repo, reference) = split_repo_ref(dest);
        self.manifest_digest(repo, reference)
            .unwrap_or_else(|| panic!("{dest} not in the registry after skopeo copy"))
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) of the registry process we spawned.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Registry({}, tls={}, auth={})",
            self.addr(),
            self.is_tls(),
            self.auth.is_some()
        )
    }
}

pub const ACCEPT_ALL_MANIFESTS: &str = "Accept: application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// "a/b:tag" -> ("a/b", "tag"); "a/b@sha256:x" -> ("a/b", "sha256:x").
pub fn split_repo_ref(r: &str) -> (&str, &str) {
    if let Some((repo, d)) = r.split_once('@') {
        return (repo, d);
    }
    match r.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (r, "latest"),
    }
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client and message parsing (shared with the proxy).

#[derive(Clone, Debug, Default)]
pub struct HttpResponse {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One CRLF- (or LF-) terminated line without its terminator; None at EOF.
fn read_line(r: &mut impl BufRead, limit: u64) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.take(limit).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with(b"\n") {
        return Err(invalid("header line truncated or too long"));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn read_headers(r: &mut impl BufRead) -> io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, 64 * 1024)?.ok_or_else(|| invalid("EOF in headers"))?;
        if line.is_empty() {
            return Ok(headers);
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header {line:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
        if headers.len() > 200 {
            return Err(invalid("too many headers"));
        }
    }
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r, 1024)?.ok_or_else(|| invalid("EOF in chunk size"))?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while let Some(l) = read_line(r, 64 * 1024)? {
                if l.is_empty() {
                    break;
                }
            }
            return Ok(body);
        }
        let at = body.len();
        body.resize(at + size, 0);
        r.read_exact(&mut body[at..])?;
        let end = read_line(r, 16)?.ok_or_else(|| invalid("EOF after chunk"))?;
        if !end.is_empty() {
            return Err(invalid("chunk not followed by CRLF"));
        }
    }
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    header(headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(headers: &[(String, String)]) -> io::Result<Option<usize>> {
    match header(headers, "content-length") {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| invalid(format!("bad Content-Length {v:?}"))),
    }
}

/// Parse a whole response (read to EOF); `head_request`: no body follows.
pub fn parse_response(raw: &[u8], head_request: bool) -> io::Result<HttpResponse> {
    let mut c = Cursor::new(raw);
    let line = read_line(&mut c, 8192)?.ok_or_else(|| invalid("empty response"))?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("bad status line {line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {line:?}")))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let headers = read_headers(&mut c)?;
    let body = if head_request || status / 100 == 1 || status == 204 || status == 304 {
        Vec::new()
    } else if is_chunked(&headers) {
        read_chunked(&mut c)?
    } else if let Some(n) = content_length(&headers)? {
        let mut b = vec![0; n];
        c.read_exact(&mut b)
            .map_err(|_| invalid("response body shorter than Content-Length"))?;
        b
    } else {
        let mut b = Vec::new();
        c.read_to_end(&mut b)?;
        b
    };
    Ok(HttpResponse {
        status,
        reason,
        headers,
        body,
    })
}

/// One request over a fresh connection (`Connection: close`, read to EOF).
pub fn http_request(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let sa: SocketAddr = addr.parse().map_err(|_| invalid(format!("bad address {addr}")))?;
    let mut conn = TcpStream::connect_timeout(&sa, Duration::from_secs(10))?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD")
}

/// Percent-decoding of a query component ('+' is a space).
pub fn url_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(x) => {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query string -> (key, value) pairs, decoded.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The proxy.

/// What a request path is, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `/v2/`
    Base,
    Manifest,
    /// `/v2/<name>/blobs/<digest>`
    Blob,
    /// `/v2/<name>/blobs/uploads/...`
    Upload,
    Tags,
    /// The bearer proxy's own `/token`.
    Token,
    Other,
}

impl Kind {
    pub fn of(path: &str) -> Kind {
        if path == "/v2/" || path == "/v2" {
            return Kind::Base;
        }
        if path == "/token" {
            return Kind::Token;
        }
        match route(path) {
            Some((_, k)) => k,
            None => Kind::Other,
        }
    }
}

/// (repository name, kind) of a distribution API path.
fn route(path: &str) -> Option<(String, Kind)> {
    let rest = path.strip_prefix("/v2/")?;
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name = |end: usize| -> Option<String> {
        let nm = segs[..end].join("/");
        (!nm.is_empty()).then_some(nm)
    };
    if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads" {
        return Some((name(n - 2)?, Kind::Upload));
    }
    if n >= 4 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        return Some((name(n - 3)?, Kind::Upload));
    }
    if n >= 3 {
        let k = match segs[n - 2] {
            "manifests" => Kind::Manifest,
            "blobs" => Kind::Blob,
            "tags" => Kind::Tags,
            _ => return None,
        };
        return Some((name(n - 2)?, k));
    }
    None
}

/// The repository a distribution API path names.
pub fn repo_of(path: &str) -> Option<String> {
    route(path).map(|(n, _)| n)
}

/// How the proxy treats traffic. Tampering modes touch only
/// `GET /v2/<name>/blobs/<digest>` responses whose body is larger than
/// `min_size`, and at most `times` of them (usize::MAX: every one).
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    /// Plain forwarding.
    Pass,
    /// A bearer-token server in front of the (anonymous) registry: `/v2/...`
    /// needs `Authorization: Bearer` with a token from `/token` whose scope
    /// covers the repository and action; `/token` takes HTTP basic
    /// credentials (`user`/`pass`; none: a pull-only anonymous token).
    Bearer { user: String, pass: String },
    /// Flip one byte in the middle of the body (length kept).
    CorruptBlob { min_size: usize, times: usize },
    /// Send the headers and half the body, then close the connection.
    DropHalfway { min_size: usize, times: usize },
    /// Send blob bodies 64 KiB at a time, sleeping before each piece.
    Slow { per_64k: Duration },
    /// Answer blob GETs with this status (no forwarding), `times` times.
    ErrorStatus { status: u16, times: usize },
    /// Append `extra` bytes to the body (Content-Length grows with it).
    Oversize {
        min_size: usize,
        extra: usize,
        times: usize,
    },
    /// Append `extra` bytes of JSON whitespace to every manifest GET answer.
    HugeManifest { extra: usize },
}

/// One request the proxy handled (appended when its answer was sent).
#[derive(Clone, Debug)]
pub struct Record {
    pub method: String,
    /// Path and query as received.
    pub target: String,
    pub kind: Kind,
    pub status: u16,
    /// Bytes of request body received.
    pub req_body: usize,
    /// Bytes of response body sent.
    pub resp_body: usize,
    pub range: Option<String>,
    /// What the mode did to this response, if anything.
    pub tampered: Option<&'static str>,
}

impl Record {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The digest of a blob or manifest-by-digest request.
    pub fn digest(&self) -> Option<&str> {
        let last = self.path().rsplit('/').next()?;
        last.starts_with("sha256:").then_some(last)
    }
}

/// One call of the bearer proxy's `/token`.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    pub service: Option<String>,
    pub scopes: Vec<String>,
    /// The user of the credentials presented (None: anonymous).
    pub user: Option<String>,
    /// Whether a token was issued.
    pub ok: bool,
    /// Scopes granted ("repository:NAME:pull,push").
    pub granted: Vec<String>,
}

#[derive(Clone, Debug)]
struct Grant {
    repo: String,
    actions: Vec<String>,
}

struct Shared {
    addr: String,
    upstream: String,
    mode: Mutex<Mode>,
    /// Tampering slots used in the current mode.
    used: AtomicUsize,
    records: Mutex<Vec<Record>>,
    tokens: Mutex<Vec<TokenRequest>>,
    issued: Mutex<BTreeMap<String, Vec<Grant>>>,
    seq: AtomicU64,
    blob_gets_started: AtomicUsize,
    stop: AtomicBool,
}

/// A reverse proxy on 127.0.0.1:PORT in front of a plain-HTTP registry.
/// One request per connection (answers carry `Connection: close`); the Host
/// header goes upstream unchanged, so the registry's Location headers point
/// back at the proxy. Stopped on drop.
pub struct Proxy {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy forwarding to `upstream` ("127.0.0.1:PORT", plain HTTP).
    pub fn start(upstream: &str, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            addr,
            upstream: upstream.to_string(),
            mode: Mutex::new(mode),
            used: AtomicUsize::new(0),
            records: Mutex::new(Vec::new()),
            tokens: Mutex::new(Vec::new()),
            issued: Mutex::new(BTreeMap::new()),
            seq: AtomicU64::new(1),
            blob_gets_started: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    let sh = sh.clone();
                    thread::spawn(move || serve(c, &sh));
                }
            }
        });
        Proxy {
            shared,
            accept: Some(accept),
        }
    }

    /// A proxy in front of a plain registry.
    pub fn front(reg: &Registry, mode: Mode) -> Proxy {
        assert!(!reg.is_tls(), "the proxy speaks plain HTTP to its upstream");
        Proxy::start(&reg.addr(), mode)
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        self.shared.addr.clone()
    }

    pub fn mode(&self) -> Mode {
        lock(&self.shared.mode).clone()
    }

    /// Change the mode (its tampering budget starts afresh).
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
        self.shared.used.store(0, Ordering::SeqCst);
    }

    /// Forget the recorded requests and token calls (issued tokens stay valid).
    pub fn clear(&self) {
        lock(&self.shared.records).clear();
        lock(&self.shared.tokens).clear();
        self.shared.blob_gets_started.store(0, Ordering::SeqCst);
    }

    pub fn records(&self) -> Vec<Record> {
        lock(&self.shared.records).clone()
    }

    /// Requests of this method ("*": any) and kind answered so far.
    pub fn count(&self, method: &str, kind: Kind) -> usize {
        lock(&self.shared.records)
            .iter()
            .filter(|r| (method == "*" || r.method == method) && r.kind == kind)
            .count()
    }

    /// Digests of the blob GETs answered so far, in order.
    pub fn blob_gets(&self) -> Vec<String> {
        lock(&self.shared.records)
            .iter()
            .filter(|r| r.method == "GET" && r.kind == Kind::Blob)
            .filter_map(|r| r.digest().map(str::to_string))
            .collect()
    }

    /// Request body bytes received on upload URLs (POST/PATCH/PUT).
    pub fn upload_bytes(&self) -> usize {
        lock(&self.shared.records)
            .iter()
            .filter(|r| r.kind == Kind::Upload)
            .map(|r| r.req_body)
            .sum()
    }

    /// Blob GETs received so far (counted when they arrive, before answering).
    pub fn blob_gets_started(&self) -> usize {
        self.shared.blob_gets_started.load(Ordering::SeqCst)
    }

    /// Responses the current mode tampered with.
    pub fn tampered(&self) -> usize {
        lock(&self.shared.records)
            .iter()
            .filter(|r| r.tampered.is_some())
            .count()
    }

    pub fn token_log(&self) -> Vec<TokenRequest> {
        lock(&self.shared.tokens).clone()
    }

    /// Calls of `/token` (since the last clear()).
    pub fn token_requests(&self) -> usize {
        lock(&self.shared.tokens).len()
    }

    /// Every scope asked for at `/token`, in order.
    pub fn scopes_asked(&self) -> Vec<String> {
        lock(&self.shared.tokens)
            .iter()
            .flat_map(|t| t.scopes.clone())
            .collect()
    }

    /// Every token issued (to check none is ever printed).
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.shared.issued).keys().cloned().collect()
    }

    /// Counts per method and kind, then the last 40 requests: for panics.
    pub fn summary(&self) -> String {
        summary(&self.shared)
    }

    /// A closure printing summary(), for a test client's failure messages.
    pub fn diag(&self) -> Diag {
        let sh = self.shared.clone();
        Box::new(move || summary(&sh))
    }
}

fn summary(sh: &Shared) -> String {
    let recs = lock(&sh.records).clone();
    let mut counts: BTreeMap<(String, Kind), usize> = BTreeMap::new();
    for r in &recs {
        *counts.entry((r.method.clone(), r.kind)).or_default() += 1;
    }
    let mut out = format!("proxy {} ({:?}) counts:", sh.addr, lock(&sh.mode));
    for ((m, k), n) in counts {
        out.push_str(&format!(" {m} {k:?}={n}"));
    }
    out.push_str(&format!("; {} token requests\n", lock(&sh.tokens).len()));
    for t in lock(&sh.tokens).iter() {
        out.push_str(&format!(
            "  token: {} service={:?} scopes={:?} user={:?} ok={} granted={:?}\n",
            t.method, t.service, t.scopes, t.user, t.ok, t.granted
        ));
    }
    for r in &recs[recs.len().saturating_sub(40)..] {
        out.push_str(&format!(
            "  {} {} -> {} (req {} B, resp {} B{}{})\n",
            r.method,
            r.target,
            r.status,
            r.req_body,
            r.resp_body,
            r.range
                .as_ref()
                .map(|x| format!(", Range {x}"))
                .unwrap_or_default(),
            r.tampered.map(|t| format!(", {t}")).unwrap_or_default()
        ));
    }
    out
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        if let Ok(sa) = self.shared.addr.parse::<SocketAddr>() {
            let _ = TcpStream::connect_timeout(&sa, Duration::from_secs(2));
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>, w: &mut TcpStream) -> io::Result<Option<Request>> {
    let Some(line) = read_line(r, 16 * 1024)? else {
        return Ok(None);
    };
    let parts: Vec<&str> = line.split(' ').collect();
    if parts.len() != 3 || !parts[2].starts_with("HTTP/1.") {
        return Err(invalid(format!("bad request line {line:?}")));
    }
    let headers = read_headers(r)?;
    if header(&headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let body = if is_chunked(&headers) {
        read_chunked(r)?
    } else if let Some(n) = content_length(&headers)? {
        let mut b = vec![0; n];
        r.read_exact(&mut b)?;
        b
    } else {
        Vec::new()
    };
    Ok(Some(Request {
        method: parts[0].to_string(),
        target: parts[1].to_string(),
        headers,
        body,
    }))
}

/// Headers that describe one hop, never forwarded.
fn hop_by_hop(k: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "content-length",
    ]
    .iter()
    .any(|h| k.eq_ignore_ascii_case(h))
}

fn forward(sh: &Shared, req: &Request, target: &str, strip_auth: bool) -> io::Result<HttpResponse> {
    let sa: SocketAddr = sh.upstream.parse().map_err(|_| invalid("bad upstream"))?;
    let mut up = TcpStream::connect_timeout(&sa, Duration::from_secs(10))?;
    up.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut head = format!("{} {target} HTTP/1.1\r\n", req.method);
    for (k, v) in &req.headers {
        if hop_by_hop(k) || (strip_auth && k.eq_ignore_ascii_case("authorization")) {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !req.body.is_empty() || matches!(req.method.as_str(), "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("Content-Length: {}\r\n", req.body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    up.write_all(&req.body)?;
    let mut raw = Vec::new();
    up.read_to_end(&mut raw)?;
    parse_response(&raw, req.method == "HEAD")
}

/// The response head: upstream headers minus hop-by-hop ones, the body
/// length (for HEAD: upstream's Content-Length as it was), Connection: close.
fn response_head(resp: &HttpResponse, head_request: bool, body_len: usize) -> Vec<u8> {
    let reason = if resp.reason.is_empty() {
        "Status"
    } else {
        resp.reason.as_str()
    };
    let mut h = format!("HTTP/1.1 {} {reason}\r\n", resp.status);
    for (k, v) in &resp.headers {
        if hop_by_hop(k) {
            continue;
        }
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    if head_request {
        if let Some(cl) = resp.header("content-length") {
            h.push_str(&format!("Content-Length: {cl}\r\n"));
        }
    } else {
        h.push_str(&format!("Content-Length: {body_len}\r\n"));
    }
    h.push_str("Connection: close\r\n\r\n");
    h.into_bytes()
}

fn json_response(status: u16, reason: &str, extra: Vec<(String, String)>, body: Value) -> HttpResponse {
    let mut headers = vec![
        ("Content-Type".to_string(), "application/json".to_string()),
        (
            "Docker-Distribution-Api-Version".to_string(),
            "registry/2.0".to_string(),
        ),
    ];
    headers.extend(extra);
    HttpResponse {
        status,
        reason: reason.to_string(),
        headers,
        body: serde_json::to_vec(&body).unwrap(),
    }
}

fn error_body(code: &str, message: &str) -> Value {
    json!({"errors": [{"code": code, "message": message, "detail": null}]})
}

/// Take one tampering slot of the current mode.
fn take_slot(sh: &Shared, times: usize) -> bool {
    sh.used
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < times).then_some(n + 1)
        })
        .is_ok()
}

fn serve(stream: TcpStream, sh: &Shared) {
    if sh.stop.load(Ordering::SeqCst) {
        return;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(120)));
    let Ok(mut w) = stream.try_clone() else { return };
    let mut r = BufReader::new(stream);
    let req = match read_request(&mut r, &mut w) {
        Ok(Some(req)) => req,
        _ => return,
    };
    let mode = lock(&sh.mode).clone();
    let (path, query) = match req.target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (req.target.clone(), String::new()),
    };
    let kind = Kind::of(&path);
    let head_req = req.method == "HEAD";
    let is_blob_get = req.method == "GET" && kind == Kind::Blob;
    if is_blob_get {
        sh.blob_gets_started.fetch_add(1, Ordering::SeqCst);
    }
    let mut record = Record {
        method: req.method.clone(),
        target: req.target.clone(),
        kind,
        status: 0,
        req_body: req.body.len(),
        resp_body: 0,
        range: header(&req.headers, "range").map(str::to_string),
        tampered: None,
    };

    let mut target = req.target.clone();
    let mut strip_auth = false;
    if let Mode::Bearer { user, pass } = &mode {
        if kind == Kind::Token {
            let resp = token_endpoint(sh, &req, &query, user, pass);
            finish(sh, &mut w, &resp, &resp.body, false, record);
            return;
        }
        match authorize(sh, &req, &path, &query) {
            Ok(t) => target = t,
            Err(resp) => {
                finish(sh, &mut w, &resp, &resp.body, head_req, record);
                return;
            }
        }
        strip_auth = true;
    }
    if let Mode::ErrorStatus { status, times } = mode {
        if is_blob_get && take_slot(sh, times) {
            let mut extra = Vec::new();
            if status == 429 || status == 503 {
                extra.push(("Retry-After".to_string(), "1".to_string()));
            }
            let resp = json_response(
                status,
                "Injected",
                extra,
                // What distribution and Docker Hub send with each status.
                error_body(
                    if status == 429 {
                        "TOOMANYREQUESTS"
                    } else {
                        "UNAVAILABLE"
                    },
                    "injected by the test proxy",
                ),
            );
            record.tampered = Some("error status");
            finish(sh, &mut w, &resp, &resp.body, false, record);
            return;
        }
    }
    let mut resp = match forward(sh, &req, &target, strip_auth) {
        Ok(resp) => resp,
        Err(e) => {
            let resp = json_response(
                502,
                "Bad Gateway",
                Vec::new(),
                error_body("UNKNOWN", &format!("test proxy: upstream: {e}")),
            );
            finish(sh, &mut w, &resp, &resp.body, false, record);
            return;
        }
    };
    let tamperable = |min: usize| is_blob_get && matches!(resp.status, 200 | 206) && resp.body.len() > min;
    match mode {
        Mode::CorruptBlob { min_size, times } if tamperable(min_size) && take_slot(sh, times) => {
            let i = resp.body.len() / 2;
            resp.body[i] ^= 0xff;
            record.tampered = Some("corrupted");
        }
        Mode::Oversize {
            min_size,
            extra,
            times,
        } if tamperable(min_size) && take_slot(sh, times) => {
            resp.body.extend(std::iter::repeat_n(0x5a, extra));
            record.tampered = Some("oversize");
        }
        Mode::HugeManifest { extra }
            if req.method == "GET" && kind == Kind::Manifest && resp.status == 200 =>
        {
            resp.body.extend(std::iter::repeat_n(b' ', extra));
            record.tampered = Some("huge manifest");
        }
        Mode::DropHalfway { min_size, times } if tamperable(min_size) && take_slot(sh, times) => {
            let half = resp.body.len() / 2;
            record.status = resp.status;
            record.tampered = Some("dropped halfway");
            let _ = w.write_all(&response_head(&resp, false, resp.body.len()));
            let _ = w.write_all(&resp.body[..half]);
            let _ = w.flush();
            record.resp_body = half;
            let _ = w.shutdown(Shutdown::Both);
            lock(&sh.records).push(record);
            return;
        }
        Mode::Slow { per_64k } if is_blob_get => {
            record.status = resp.status;
            record.tampered = Some("slow");
            if w.write_all(&response_head(&resp, false, resp.body.len())).is_ok() {
                for piece in resp.body.chunks(64 * 1024) {
                    thread::sleep(per_64k);
                    if sh.stop.load(Ordering::SeqCst) || w.write_all(piece).is_err() {
                        break;
                    }
                    record.resp_body += piece.len();
                }
            }
            let _ = w.flush();
            let _ = w.shutdown(Shutdown::Both);
            lock(&sh.records).push(record);
            return;
        }
        _ => {}
    }
    let body = std::mem::take(&mut resp.body);
    finish(sh, &mut w, &resp, &body, head_req, record);
}

fn finish(
    sh: &Shared,
    w: &mut TcpStream,
    resp: &HttpResponse,
    body: &[u8],
    head_req: bool,
    mut record: Record,
) {
    record.status = resp.status;
    let mut out = response_head(resp, head_req, body.len());
    if !head_req {
        out.extend_from_slice(body);
        record.resp_body = body.len();
    }
    let _ = w.write_all(&out);
    let _ = w.flush();
    let _ = w.shutdown(Shutdown::Write);
    lock(&sh.records).push(record);
}

/// Check the bearer token of a registry request. Ok: the target to forward
/// (a cross-repository mount the token may not read from is turned into a
/// plain upload, as distribution does); Err: the 401 to answer.
fn authorize(sh: &Shared, req: &Request, path: &str, query: &str) -> Result<String, HttpResponse> {
    let token = header(&req.headers, "authorization").and_then(|a| {
        let (scheme, rest) = a.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim().to_string())
    });
    let grants = token.as_ref().and_then(|t| lock(&sh.issued).get(t).cloned());
    let write = !matches!(req.method.as_str(), "GET" | "HEAD");
    let repo = repo_of(path);
    let allowed = |g: &[Grant], repo: &str, action: &str| {
        g.iter()
            .any(|x| x.repo == repo && x.actions.iter().any(|a| a == action || a == "*"))
    };
    let ok = match (&grants, &repo) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(g), Some(r)) => allowed(g, r, if write { "push" } else { "pull" }),
    };
    if !ok {
        let mut chal = format!(
            "Bearer realm=\"http://{}/token\",service=\"{TOKEN_SERVICE}\"",
            sh.addr
        );
        if let Some(r) = &repo {
            let actions = if write { "pull,push" } else { "pull" };
            chal.push_str(&format!(",scope=\"repository:{r}:{actions}\""));
        }
        if token.is_some() {
            let e = if grants.is_some() {
                "insufficient_scope"
            } else {
                "invalid_token"
            };
            chal.push_str(&format!(",error=\"{e}\""));
        }
        return Err(json_response(
            401,
            "Unauthorized",
            vec![("WWW-Authenticate".to_string(), chal)],
            error_body("UNAUTHORIZED", "authentication required"),
        ));
    }
    // Cross-repository mount: only from a repository the token may pull.
    let params = parse_query(query);
    if req.method == "POST" && Kind::of(path) == Kind::Upload {
        if let Some((_, from)) = params.iter().find(|(k, _)| k == "from") {
            if !allowed(grants.as_deref().unwrap_or(&[]), from, "pull") {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| !kv.starts_with("mount=") && !kv.starts_with("from="))
                    .collect();
                return Ok(if kept.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}?{}", kept.join("&"))
                });
            }
        }
    }
    Ok(req.target.clone())
}

fn token_endpoint(sh: &Shared, req: &Request, query: &str, user: &str, pass: &str) -> HttpResponse {
    let mut params = parse_query(query);
    let mut creds: Option<(String, String)> = None;
    if let Some(a) = header(&req.headers, "authorization") {
        if let Some((scheme, rest)) = a.split_once(' ') {
            if scheme.eq_ignore_ascii_case("basic") {
                let dec = base64_decode(rest)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let (u, p) = dec.split_once(':').unwrap_or((&dec, ""));
                creds = Some((u.to_string(), p.to_string()));
            }
        }
    }
    let mut scopes: Vec<String> = Vec::new();
    if req.method == "POST" {
        // OAuth2 password grant (form body).
        let form = parse_query(&String::from_utf8_lossy(&req.body));
        let get = |k: &str| form.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
        match get("grant_type").as_deref() {
            Some("password") => {
                creds = Some((
                    get("username").unwrap_or_default(),
                    get("password").unwrap_or_default(),
                ));
            }
            other => {
                lock(&sh.tokens).push(TokenRequest {
                    method: req.method.clone(),
                    service: get("service"),
                    scopes: Vec::new(),
                    user: None,
                    ok: false,
                    granted: Vec::new(),
                });
                return json_response(
                    400,
                    "Bad Request",
                    Vec::new(),
                    json!({"error": "unsupported_grant_type", "error_description": format!("{other:?}")}),
                );
            }
        }
        params.extend(form);
    }
    let service = params
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.clone());
    for (k, v) in &params {
        if k == "scope" {
            scopes.extend(v.split(' ').filter(|x| !x.is_empty()).map(str::to_string));
        }
    }
    let mut entry = TokenRequest {
        method: req.method.clone(),
        service,
        scopes: scopes.clone(),
        user: creds.as_ref().map(|(u, _)| u.clone()),
        ok: false,
        granted: Vec::new(),
    };
    let authed = match &creds {
        Some((u, p)) if u == user && p == pass => true,
        Some(_) => {
            lock(&sh.tokens).push(entry);
            return json_response(
                401,
                "Unauthorized",
                vec![(
                    "WWW-Authenticate".to_string(),
                    "Basic realm=\"strata-test-token\"".to_string(),
                )],
                error_body("UNAUTHORIZED", "invalid username or password"),
            );
        }
        None => false,
    };
    let mut grants = Vec::new();
    for sc in &scopes {
        let Some(rest) = sc.strip_prefix("repository:") else {
            continue;
        };
        let Some((repo, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        let acts: Vec<String> = actions
            .split(',')
            .filter(|a| authed || *a == "pull")
            .map(str::to_string)
            .collect();
        if acts.is_empty() {
            continue;
        }
        entry
            .granted
            .push(format!("repository:{repo}:{}", acts.join(",")));
        grants.push(Grant {
            repo: repo.to_string(),
            actions: acts,
        });
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let token = format!(
        "stt{:x}x{:08x}",
        sh.seq.fetch_add(1, Ordering::SeqCst),
        (nanos as u64) ^ 0x5eed_5eed
    );
    lock(&sh.issued).insert(token.clone(), grants);
    entry.ok = true;
    lock(&sh.tokens).push(entry);
    json_response(
        200,
        "OK",
        Vec::new(),
        json!({"token": token, "access_token": token, "expires_in": 300}),
    )
}

// ---------------------------------------------------------------------------
// Blackhole: accepts connections and never answers.

pub struct Blackhole {
    addr: String,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Blackhole {
    pub fn start() -> Blackhole {
        let l = TcpListener::bind("127.0.0.1:0").expect("blackhole bind");
        let addr = l.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, st) = (accepted.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut held = Vec::new();
            for c in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = c {
                    a.fetch_add(1, Ordering::SeqCst);
                    held.push(c);
                }
            }
        });
        Blackhole {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(sa) = self.addr.parse::<SocketAddr>() {
            let _ = TcpStream::connect_timeout(&sa, Duration::from_secs(2));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An address on 127.0.0.1 where nothing listens (connection refused).
pub fn closed_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

// ---------------------------------------------------------------------------
// Images built without strata: OCI layouts written by hand.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// gzip with a zero mtime (deterministic).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `len` pseudo-random (incompressible) bytes from `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tar of regular files (mode 0644, root-owned) with their parent
/// directories (0755) listed first.
pub fn files_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut dirs: Vec<String> = Vec::new();
    for (name, _) in files {
        let parts: Vec<&str> = name.split('/').collect();
        for i in 1..parts.len() {
            let d = format!("{}/", parts[..i].join("/"));
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs.sort();
    let mut t = RawTar::new();
    for d in &dirs {
        t.dir(d);
    }
    for (name, data) in files {
        t.file(name, data);
    }
    t.finish()
}

/// The rootfs tar of a runnable busybox image: image_common's busybox tree
/// plus /proc, /sys, /dev, /root and a passwd/group.
pub fn busybox_tar(work: &Path) -> Vec<u8> {
    let dir = work.join("busybox-rootfs");
    let _ = fs::remove_dir_all(&dir);
    busybox_rootfs(&dir);
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    for (d, mode) in [("proc", 0o755), ("sys", 0o755), ("dev", 0o755), ("root", 0o700)] {
        fs::create_dir_all(dir.join(d)).unwrap();
        fs::set_permissions(dir.join(d), fs::Permissions::from_mode(mode)).unwrap();
    }
    let tar = work.join("busybox-rootfs.tar");
    tar_dir(&dir, &tar);
    fs::read(&tar).unwrap()
}

/// An image written into an OCI layout.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub manifest_digest: String,
    pub manifest_size: usize,
    pub config_digest: String,
    pub config: Value,
    pub diff_ids: Vec<String>,
    /// Compressed layer blobs: (digest, size).
    pub layers: Vec<(String, usize)>,
    pub os: String,
    pub arch: String,
}

impl BuiltImage {
    /// The largest layer blob: (digest, size).
    pub fn largest_layer(&self) -> (String, usize) {
        self.layers.iter().max_by_key(|(_, n)| *n).cloned().unwrap()
    }

    /// Every blob of the image: config and layers.
    pub fn blobs(&self) -> Vec<String> {
        let mut v = vec![self.config_digest.clone()];
        v.extend(self.layers.iter().map(|(d, _)| d.clone()));
        v
    }
}

/// An OCI image layout directory, written by hand.
pub struct OciLayout {
    pub dir: PathBuf,
}

impl OciLayout {
    pub fn create(dir: &Path) -> OciLayout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        fs::write(dir.join("index.json"), br#"{"schemaVersion":2,"manifests":[]}"#).unwrap();
        OciLayout {
            dir: dir.to_path_buf(),
        }
    }

    /// Store a blob; (digest, size).
    pub fn put_blob(&self, data: &[u8]) -> (String, usize) {
        let hex = sha256_hex(data);
        fs::write(self.dir.join("blobs/sha256").join(&hex), data).unwrap();
        (format!("sha256:{hex}"), data.len())
    }

    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").unwrap();
        fs::read(self.dir.join("blobs/sha256").join(hex)).unwrap()
    }

    /// An image of `layers` (uncompressed tars, bottom first; stored gzipped).
    pub fn image(&self, layers: &[Vec<u8>], os: &str, arch: &str, cmd: &[&str]) -> BuiltImage {
        let mut diff_ids = Vec::new();
        let mut descs = Vec::new();
        let mut blobs = Vec::new();
        let mut history = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            diff_ids.push(format!("sha256:{}", sha256_hex(l)));
            let (d, n) = self.put_blob(&gzip(l));
            descs.push(json!({"mediaType": OCI_LAYER_GZIP, "digest": d, "size": n}));
            blobs.push((d, n));
            history.push(json!({"created": "2023-11-14T22:13:20Z", "created_by": format!("strata registry test: layer {i}")}));
        }
        let config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": arch,
            "os": os,
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": cmd,
                "Labels": {"org.strata.test.platform": format!("{os}/{arch}")}
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        let (cd, cn) = self.put_blob(&serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": cn},
            "layers": descs,
        });
        let (md, mn) = self.put_blob(&serde_json::to_vec(&manifest).unwrap());
        BuiltImage {
            manifest_digest: md,
            manifest_size: mn,
            config_digest: cd,
            config,
            diff_ids,
            layers: blobs,
            os: os.into(),
            arch: arch.into(),
        }
    }

    /// An image index over `images` (platform from each image); (digest, size).
    pub fn index(&self, images: &[&BuiltImage]) -> (String, usize) {
        let manifests: Vec<Value> = images
            .iter()
            .map(|i| {
                json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": i.manifest_digest,
                    "size": i.manifest_size,
                    "platform": {"architecture": i.arch, "os": i.os},
                })
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        self.put_blob(&serde_json::to_vec(&index).unwrap())
    }

    /// Name a manifest or index `tag` in index.json.
    pub fn tag(&self, media_type: &str, digest: &str, size: usize, tag: &str) {
        let p = self.dir.join("index.json");
        let mut idx: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        let list = idx["manifests"].as_array_mut().unwrap();
        list.retain(|d| d["annotations"]["org.opencontainers.image.ref.name"].as_str() != Some(tag));
        list.push(json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        fs::write(&p, serde_json::to_vec(&idx).unwrap()).unwrap();
    }

    pub fn tag_image(&self, img: &BuiltImage, tag: &str) {
        self.tag(OCI_MANIFEST, &img.manifest_digest, img.manifest_size, tag);
    }
}

/// The contents of /srv/msg in test_image().
pub const TEST_MESSAGE: &str = "hello from the registry\n";

/// A runnable 3-layer image for this machine: busybox (about 1 MiB
/// gzipped), a small layer with /srv/msg, and 1.5 MiB of noise in
/// /srv/noise.bin (incompressible: the largest blob). CMD cats /srv/msg.
pub fn test_image(layout: &OciLayout, work: &Path, tag: &str) -> BuiltImage {
    let layers = vec![
        busybox_tar(work),
        files_tar(&[
            ("srv/msg", TEST_MESSAGE.as_bytes()),
            ("etc/strata-test", tag.as_bytes()),
        ]),
        files_tar(&[("srv/noise.bin", &noise(3 << 19, 7))]),
    ];
    let img = layout.image(&layers, "linux", host_arch(), &["/bin/cat", "/srv/msg"]);
    layout.tag_image(&img, tag);
    img
}

/// A two-platform index (linux/amd64 and linux/arm64) tagged `tag`: each
/// image is one layer with /etc/platform = "linux/ARCH\n" and a different
/// size. Returns (index digest, amd64 image, arm64 image).
pub fn multiarch_index(layout: &OciLayout, tag: &str) -> (String, BuiltImage, BuiltImage) {
    let mk = |arch: &str, pad: usize| {
        let plat = format!("linux/{arch}\n");
        let filler = noise(pad, pad as u64);
        let layer = files_tar(&[("etc/platform", plat.as_bytes()), ("etc/filler", &filler)]);
        layout.image(&[layer], "linux", arch, &["/bin/sh"])
    };
    let amd = mk("amd64", 3000);
    let arm = mk("arm64", 5000);
    let (d, n) = layout.index(&[&amd, &arm]);
    layout.tag(OCI_INDEX, &d, n, tag);
    (d, amd, arm)
}
