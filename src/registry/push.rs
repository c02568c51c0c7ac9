//! `push`: each blob is HEADed first and skipped when the registry has it, mounted from
//! another repository of the same registry when strata knows one that holds it, else
//! uploaded (one request up to 32 MiB, chunks above). The manifest goes last, byte for byte
//! as stored, under its own media type, so its digest is the same on both sides.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;

use anyhow::{bail, Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use oci_client::RegistryOperation;

use super::client::{explain, retry, Session, MONOLITHIC_MAX};
use super::{media, sources, Bar, Bars, Options};
use crate::image::digest;
use crate::image::reference::RemoteRef;
use crate::image::store::{Image, Store};

/// What a push did.
#[derive(Debug)]
pub struct Pushed {
    /// Manifest digest.
    pub digest: String,
    /// Manifest size.
    pub size: u64,
    /// Blobs uploaded, mounted from another repository, and already present.
    pub uploaded: usize,
    /// See `uploaded`.
    pub mounted: usize,
    /// See `uploaded`.
    pub present: usize,
}

enum Outcome {
    Uploaded,
    Mounted,
    Present,
}

fn oref(r: &RemoteRef) -> oci_client::Reference {
    match (&r.tag, &r.digest) {
        (Some(t), _) => oci_client::Reference::with_tag(r.domain.clone(), r.path.clone(), t.clone()),
        (None, Some(d)) => oci_client::Reference::with_digest(r.domain.clone(), r.path.clone(), d.clone()),
        (None, None) => oci_client::Reference::with_tag(r.domain.clone(), r.path.clone(), "latest".into()),
    }
}

/// Push `img` to `dest`.
pub fn push(store: &Store, img: &Image, dest: &RemoteRef, opts: &Options) -> Result<Pushed> {
    let mbytes = store.read_blob(&img.manifest_digest)?;
    let mt = media::kind(&mbytes).context("the stored manifest")?;
    if let Some(d) = &dest.digest {
        if *d != img.manifest_digest {
            bail!(
                "{dest}: the image's manifest digest is {}, not {d}",
                img.manifest_digest
            );
        }
    }
    let mut blobs: Vec<(String, u64)> = img
        .manifest
        .layers()
        .iter()
        .map(|l| (l.digest().to_string(), l.size()))
        .collect();
    let cfg = img.manifest.config();
    blobs.push((cfg.digest().to_string(), cfg.size()));
    blobs.dedup_by(|a, b| a.0 == b.0);
    for (d, _) in &blobs {
        if !store.blob_path(d)?.exists() {
            bail!("blob {d} of the image is missing from the store; cannot push");
        }
    }
    let (s, _) = Session::open(&dest.domain, &dest.name(), opts, None)?;
    let bars = Bars::new(opts.quiet);
    let r = oref(dest);
    let mounts: Mounts = Default::default();
    let ctx = Ctx {
        s: &s,
        store,
        dest,
        r: &r,
        bars: &bars,
        tokens: &mounts,
    };
    let outcomes: Vec<Outcome> = s.rt.block_on(async {
        s.prime(&r).await;
        // One token per operation, asked for before the blobs go in parallel (each would
        // otherwise miss the cache and ask for its own).
        for op in [RegistryOperation::Pull, RegistryOperation::Push] {
            if s.challenge.is_none() {
                break;
            }
            s.client
                .auth(&r, &s.auth, op)
                .await
                .map_err(|e| explain(e, &dest.to_string(), &s.domain))?;
        }
        futures_util::stream::iter(blobs.iter().map(|(d, n)| push_blob(&ctx, d, *n)))
            .buffer_unordered(4)
            .try_collect()
            .await
    })?;
    let ct = reqwest::header::HeaderValue::from_static(mt);
    let what = format!("{dest}: manifest");
    s.rt.block_on(retry(&what, || {
        s.client.push_manifest_raw(&r, mbytes.clone(), ct.clone())
    }))
    .map_err(|e| explain(e, &what, &s.domain))?;
    let digests: Vec<String> = blobs.iter().map(|(d, _)| d.clone()).collect();
    if let Err(e) = sources::record(store, &dest.name(), &digests) {
        log::warn!("recording blob sources: {e:#}");
    }
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    Ok(Pushed {
        digest: img.manifest_digest.clone(),
        size: mbytes.len() as u64,
        uploaded: count(|o| matches!(o, Outcome::Uploaded)),
        mounted: count(|o| matches!(o, Outcome::Mounted)),
        present: count(|o| matches!(o, Outcome::Present)),
    })
}

/// Authorized mount requests per source repository, so that one token serves every blob
/// mounted from it.
type Mounts = tokio::sync::Mutex<HashMap<String, reqwest::RequestBuilder>>;

/// `POST /v2/DEST/blobs/uploads/?mount=D&from=SRC`: true when the registry mounted it (201).
/// A 202 means it opened an upload instead; that session is cancelled.
async fn mount(s: &Session, dest: &RemoteRef, from: &str, d: &str, tokens: &Mounts) -> Result<bool> {
    let url = reqwest::Url::parse_with_params(
        &format!("{}/v2/{}/blobs/uploads/", s.base(), dest.path),
        &[("mount", d), ("from", from)],
    )?;
    let auth = {
        let mut cache = tokens.lock().await;
        match cache.get(from).and_then(|t| t.try_clone()) {
            Some(t) => t,
            None => {
                let scopes = [
                    format!("repository:{}:pull,push", dest.path),
                    format!("repository:{from}:pull"),
                ];
                let t = s.authorize(s.http.post(url.clone()), &scopes).await?;
                if let Some(c) = t.try_clone() {
                    cache.insert(from.to_string(), c);
                }
                t
            }
        }
    }
    .build()?
    .headers()
    .get(reqwest::header::AUTHORIZATION)
    .cloned();
    let mut post = s.http.post(url).header(reqwest::header::CONTENT_LENGTH, "0");
    if let Some(a) = &auth {
        post = post.header(reqwest::header::AUTHORIZATION, a.clone());
    }
    let resp = post.send().await?;
    match resp.status().as_u16() {
        201 => Ok(true),
        202 => {
            let loc = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok());
            if let Some(u) = loc.and_then(|l| reqwest::Url::parse(&s.base()).and_then(|b| b.join(l)).ok()) {
                let mut del = s.http.delete(u);
                if let Some(a) = &auth {
                    del = del.header(reqwest::header::AUTHORIZATION, a.clone());
                }
                let _ = del.send().await;
            }
            Ok(false)
        }
        c => bail!("HTTP {c}"),
    }
}

/// The blob file as a stream of 4 MiB pieces (oci-client's chunk size).
fn file_stream(
    f: File,
    bar: Bar,
) -> impl futures_util::Stream<Item = oci_client::errors::Result<bytes::Bytes>> + Send + 'static {
    futures_util::stream::try_unfold((f, bar, 0u64), |(mut f, bar, n)| async move {
        let mut buf = vec![0u8; 4 << 20];
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok(None);
        }
        buf.truncate(k);
        bar.set(n + k as u64);
        Ok(Some((bytes::Bytes::from(buf), (f, bar, n + k as u64))))
    })
}

/// What every blob of one push shares.
struct Ctx<'a> {
    s: &'a Session,
    store: &'a Store,
    dest: &'a RemoteRef,
    r: &'a oci_client::Reference,
    bars: &'a Bars,
    tokens: &'a Mounts,
}

async fn push_blob(ctx: &Ctx<'_>, d: &str, size: u64) -> Result<Outcome> {
    let Ctx {
        s,
        store,
        dest,
        r,
        bars,
        tokens,
    } = *ctx;
    let label = digest::hex_part(d).unwrap_or(d)[..12].to_string();
    let what = format!("{dest}: blob {d}");
    let have = retry(&what, || s.client.blob_exists(r, d))
        .await
        .map_err(|e| explain(e, &what, &s.domain))?;
    if have {
        bars.bar(&label, size).finish("already exists");
        return Ok(Outcome::Present);
    }
    for from in sources::on_registry(store, &dest.domain, &dest.name(), d)
        .into_iter()
        .take(2)
    {
        match mount(s, dest, &from, d, tokens).await {
            Ok(true) => {
                bars.bar(&label, size).finish(&format!("mounted from {from}"));
                return Ok(Outcome::Mounted);
            }
            Ok(false) => log::info!("{what}: the registry did not mount it from {from}; uploading"),
            Err(e) => log::info!("{what}: mount from {from}: {e:#}; uploading"),
        }
    }
    let path = store.blob_path(d)?;
    let bar = bars.bar(&label, size);
    retry(&what, || {
        let bar = bar.clone();
        let path = path.clone();
        async move {
            let f = File::open(&path)?;
            let stream = file_stream(f, bar);
            if size <= MONOLITHIC_MAX {
                s.mono.push_blob_stream(r, stream, d, Some(size)).await
            } else {
                s.client.push_blob_stream(r, stream, d, Some(size)).await
            }
        }
    })
    .await
    .map_err(|e| explain(e, &what, &s.domain))?;
    bar.finish("pushed");
    Ok(Outcome::Uploaded)
}
