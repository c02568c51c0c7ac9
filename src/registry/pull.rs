//! `pull`: manifest (a platform's from an index), then the config and the missing layers in
//! parallel, each streamed into the store's tmp/, checked against its size and digest, and
//! moved into blobs/ only when it matches. The image is named only when every blob is in.

use std::fs::File;
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};

use super::client::{self, chain, explain, retry, Session};
use super::{media, sources, Bar, Bars, Options, Platform, RegistryError};
use crate::image::digest;
use crate::image::reference::RemoteRef;
use crate::image::store::{parse_digest, Store};

/// Largest manifest or index accepted (distribution's own limit is 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    /// The manifest digest (of the platform's manifest, as docker prints it for an index).
    pub digest: String,
    /// The digest asked for: the index's when the reference named one, else the manifest's.
    pub ref_digest: String,
    /// Whether anything new was fetched or named.
    pub changed: bool,
    /// Bytes downloaded.
    pub bytes: u64,
}

fn oci_ref(r: &RemoteRef) -> oci_client::Reference {
    match (&r.tag, &r.digest) {
        (_, Some(d)) => oci_client::Reference::with_digest(r.domain.clone(), r.path.clone(), d.clone()),
        (Some(t), None) => oci_client::Reference::with_tag(r.domain.clone(), r.path.clone(), t.clone()),
        (None, None) => oci_client::Reference::with_tag(r.domain.clone(), r.path.clone(), "latest".into()),
    }
}

/// The Authorization header for reading `oref` (a bearer token from oci-client, which also
/// caches it for the blob requests that follow; or basic credentials).
async fn read_auth(
    s: &Session,
    oref: &oci_client::Reference,
) -> Result<Option<reqwest::header::HeaderValue>> {
    let Some(ch) = s.challenge.as_deref() else {
        return Ok(None);
    };
    let (scheme, _) = super::login::parse_challenge(ch);
    let v = match (scheme.as_str(), &s.auth) {
        ("bearer", _) => {
            let what = format!("{}: token", s.domain);
            let tok = retry(&what, || {
                s.client.auth(oref, &s.auth, oci_client::RegistryOperation::Pull)
            })
            .await
            .map_err(|e| explain(e, &what, &s.domain))?;
            tok.map(|t| format!("Bearer {t}"))
        }
        ("basic", oci_client::secrets::RegistryAuth::Basic(u, p)) => {
            use base64::Engine as _;
            Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            ))
        }
        _ => None,
    };
    Ok(v.map(|v| reqwest::header::HeaderValue::from_str(&v))
        .transpose()?)
}

/// Fetch a manifest or index ourselves (oci-client reads a body whole, whatever its size):
/// at most MAX_MANIFEST bytes are read. Verified against `want` when given.
async fn fetch_manifest(
    s: &Session,
    r: &RemoteRef,
    reference: &str,
    auth: Option<&reqwest::header::HeaderValue>,
    want: Option<&str>,
) -> Result<(Vec<u8>, String)> {
    let url = format!("{}/v2/{}/manifests/{reference}", s.base(), r.path);
    let mut failures = 0u32;
    let bytes = loop {
        let mut req = s
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, media::MANIFESTS.join(", "));
        if let Some(a) = auth {
            req = req.header(reqwest::header::AUTHORIZATION, a.clone());
        }
        let res: std::result::Result<Vec<u8>, (bool, anyhow::Error)> = async {
            let resp = req
                .send()
                .await
                .map_err(|e| (!e.is_connect(), anyhow!("{r}: {}", chain(&e))))?;
            let status = resp.status().as_u16();
            if status != 200 {
                let body: Vec<u8> = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                let msg = serde_json::from_slice::<serde_json::Value>(&body[..body.len().min(64 << 10)])
                    .ok()
                    .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let again = status == 429 || status >= 500;
                let e = match status {
                    401 | 403 => RegistryError::Unauthorized {
                        what: r.to_string(),
                        domain: s.domain.clone(),
                    },
                    404 => RegistryError::NotFound {
                        what: r.to_string(),
                        detail: format!(
                            "{} answered: manifest unknown (no such repository, tag or digest){}",
                            s.domain,
                            if msg.is_empty() {
                                String::new()
                            } else {
                                format!(": {msg}")
                            }
                        ),
                    },
                    code => RegistryError::Http {
                        what: r.to_string(),
                        domain: s.domain.clone(),
                        code,
                        message: msg,
                    },
                };
                return Err((again, e.into()));
            }
            if resp.content_length().is_some_and(|n| n > MAX_MANIFEST as u64) {
                return Err((
                    false,
                    RegistryError::TooLarge {
                        what: r.to_string(),
                        detail: format!(
                            "the manifest is {} bytes, more than the {MAX_MANIFEST} accepted",
                            resp.content_length().unwrap_or(0)
                        ),
                    }
                    .into(),
                ));
            }
            let mut out = Vec::new();
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| (true, anyhow!("{r}: reading the manifest: {}", chain(&e))))?;
                if out.len() + chunk.len() > MAX_MANIFEST {
                    return Err((
                        false,
                        RegistryError::TooLarge {
                            what: r.to_string(),
                            detail: format!("the manifest is more than the {MAX_MANIFEST} bytes accepted"),
                        }
                        .into(),
                    ));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        }
        .await;
        match res {
            Ok(b) => break b,
            Err((true, e)) if failures < client::retries() => {
                failures += 1;
                log::info!("{e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(250 << failures)).await;
            }
            Err((_, e)) => return Err(e),
        }
    };
    let d = digest::sha256_of(&bytes);
    if let Some(w) = want {
        if d != w {
            return Err(RegistryError::DigestMismatch {
                what: r.to_string(),
                detail: format!("the registry served a manifest whose digest is {d}, not {w}"),
            }
            .into());
        }
    }
    Ok((bytes, d))
}

/// Pull `r` into the store.
pub fn pull(store: &Store, r: &RemoteRef, platform: Option<&Platform>, opts: &Options) -> Result<Pulled> {
    let (s, _) = Session::open(&r.domain, &r.name(), opts, None)?;
    let bars = Bars::new(opts.quiet);
    let host = Platform::host();
    let platform = platform.unwrap_or(&host);
    let oref = oci_ref(r);
    s.rt.block_on(async {
        s.prime(&oref).await;
        let auth = read_auth(&s, &oref).await?;
        let (mut bytes, mut md) =
            fetch_manifest(&s, r, r.wire_ref(), auth.as_ref(), r.digest.as_deref()).await?;
        let ref_digest = md.clone();
        let mut mt = media::kind(&bytes).with_context(|| format!("{r}: manifest"))?;
        if mt == media::OCI_INDEX || mt == media::DOCKER_LIST {
            let idx: ImageIndex =
                serde_json::from_slice(&bytes).with_context(|| format!("{r}: parsing the image index"))?;
            let pick = platform.choose(&idx).ok_or_else(|| {
                let have: Vec<String> = idx
                    .manifests()
                    .iter()
                    .filter_map(|m| m.platform().as_ref())
                    .map(|p| Platform::of(p).to_string())
                    .collect();
                RegistryError::NoPlatform {
                    what: r.to_string(),
                    platform: platform.to_string(),
                    have: have.join(", "),
                }
            })?;
            let (b, d) = fetch_manifest(&s, r, &pick, auth.as_ref(), Some(&pick)).await?;
            bytes = b;
            md = d;
            mt = media::kind(&bytes).with_context(|| format!("{r}: manifest {md}"))?;
            if mt != media::OCI_MANIFEST && mt != media::DOCKER_MANIFEST {
                bail!("{r}: the index entry {md} is not an image manifest ({mt})");
            }
        }
        let m: ImageManifest =
            serde_json::from_slice(&bytes).with_context(|| format!("{r}: parsing manifest {md}"))?;
        media::check_manifest(&m).with_context(|| format!("{r}: manifest {md}"))?;

        // Everything the store lacks, config first.
        let mut wants: Vec<&Descriptor> = Vec::new();
        for d in std::iter::once(m.config()).chain(m.layers().iter()) {
            let dg = d.digest().to_string();
            if !store.blob_path(&dg)?.exists() && !wants.iter().any(|w| w.digest() == d.digest()) {
                wants.push(d);
            }
        }
        if !opts.quiet {
            let short = r.to_string();
            bars.line(&format!(
                "{short}: {} of {} blobs to fetch",
                wants.len(),
                m.layers().len() + 1
            ));
        }
        let results: Vec<u64> =
            futures_util::stream::iter(wants.iter().map(|d| fetch_blob(&s, store, r, d, &bars)))
                .buffer_unordered(4)
                .try_collect()
                .await?;
        let fetched: u64 = results.iter().sum();

        // The config must parse and agree with the layers before the image gets a name.
        let cfg_digest = m.config().digest().to_string();
        let config: ImageConfiguration = serde_json::from_slice(&store.read_blob(&cfg_digest)?)
            .with_context(|| format!("{r}: parsing config {cfg_digest}"))?;
        if config.rootfs().diff_ids().len() != m.layers().len() {
            bail!(
                "{r}: the manifest lists {} layers but its config {} diff_ids",
                m.layers().len(),
                config.rootfs().diff_ids().len()
            );
        }
        let before = store.list()?;
        let had = before.iter().any(|(_, d)| d.digest().to_string() == md);
        let stored = store.put_blob(&bytes)?;
        debug_assert_eq!(stored, md);
        let mtype = if mt == media::OCI_MANIFEST {
            MediaType::ImageManifest
        } else {
            MediaType::Other(mt.to_string())
        };
        let desc = Descriptor::new(mtype, bytes.len() as u64, parse_digest(&md)?);
        let mut changed = fetched > 0 || !had;
        match r.local() {
            Some(tag) => {
                let name = tag.to_string();
                let same = before
                    .iter()
                    .any(|(n, d)| *n == name && d.digest().to_string() == md);
                if !same {
                    store.set_tag(&tag, &desc)?;
                    changed = true;
                }
            }
            None => store.add_untagged(&desc)?,
        }
        let digests: Vec<String> = std::iter::once(cfg_digest)
            .chain(m.layers().iter().map(|l| l.digest().to_string()))
            .collect();
        // Where blobs came from lets a later push to another repository mount them.
        if let Err(e) = sources::record(store, &r.name(), &digests) {
            log::warn!("recording blob sources: {e:#}");
        }
        Ok(Pulled {
            digest: md,
            ref_digest,
            changed,
            bytes: fetched,
        })
    })
}

/// Removes a staging file unless it was moved into the store.
struct Staged(Option<PathBuf>);

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Download one blob into the store; returns the bytes fetched. A dropped connection resumes
/// from the bytes already written (a Range request), up to the retry limit.
async fn fetch_blob(s: &Session, store: &Store, r: &RemoteRef, d: &Descriptor, bars: &Bars) -> Result<u64> {
    let dg = d.digest().to_string();
    let size = d.size();
    let label = digest::hex_part(&dg).unwrap_or(&dg)[..12].to_string();
    let bar: Bar = bars.bar(&label, size);
    let oref = oci_ref(r);
    let od = OciDescriptor {
        media_type: d.media_type().to_string(),
        digest: dg.clone(),
        size: size as i64,
        // Foreign URLs from a manifest are never followed: blobs come from this registry.
        urls: None,
        annotations: None,
        artifact_type: None,
    };
    let tmp = store.tmp_path("pull");
    let mut staged = Staged(Some(tmp.clone()));
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut h = Sha256::new();
    let mut n: u64 = 0;
    let mut failures = 0u32;
    let what = format!("{r}: blob {dg}");
    loop {
        let res: std::result::Result<(), oci_client::errors::OciDistributionError> = async {
            let mut stream = if n == 0 {
                s.client.pull_blob_stream(&oref, &od).await?.stream
            } else {
                match s.client.pull_blob_stream_partial(&oref, &od, n, None).await? {
                    BlobResponse::Partial(st) => st.stream,
                    BlobResponse::Full(st) => {
                        // No Range support: start over.
                        f.set_len(0)?;
                        f.rewind()?;
                        h = Sha256::new();
                        bar.set(0);
                        n = 0;
                        st.stream
                    }
                }
            };
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    // oci-client's own digest check fails at the end; ours below says more.
                    Err(_) if n == size => break,
                    Err(e) => return Err(e.into()),
                };
                if n + chunk.len() as u64 > size {
                    return Err(oci_client::errors::OciDistributionError::SpecViolationError(
                        format!("the registry sent more than the {size} bytes the manifest gives"),
                    ));
                }
                f.write_all(&chunk)?;
                h.update(&chunk);
                n += chunk.len() as u64;
                bar.set(n);
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) if n == size => break,
            Ok(()) => {
                // A clean end of stream before the size: a truncated response.
                failures += 1;
                if failures > 3 {
                    return Err(RegistryError::Truncated {
                        what,
                        got: n,
                        want: size,
                    }
                    .into());
                }
                log::info!("{what}: short read ({n} of {size} bytes); resuming");
            }
            Err(e) if client::retryable(&e) && failures < 3 => {
                failures += 1;
                log::info!("{what}: {} after {n} bytes; resuming", chain(&e));
                tokio::time::sleep(Duration::from_millis(250 << failures)).await;
            }
            Err(e) => return Err(explain(e, &what, &s.domain)),
        }
    }
    let got = format!("sha256:{}", digest::hex(&h.finalize()));
    if got != dg {
        bar.fail("digest mismatch");
        return Err(RegistryError::DigestMismatch {
            what,
            detail: format!("the content does not match its digest (got {got}); nothing was stored"),
        }
        .into());
    }
    f.sync_all()?;
    drop(f);
    store.commit_blob(&tmp, &dg)?;
    staged.0 = None;
    bar.done();
    Ok(n)
}
