//! `strata build`: a Dockerfile and a context become an image in the store, one layer per
//! RUN/COPY/ADD step, without a daemon.
//!
//! Each layer step mounts the stage's current image through strata's overlay with a fresh
//! upper directory, does its work in the mount (a container for RUN, file copies for COPY and
//! ADD), unmounts, and turns the upper into the layer with the same code as `commit`: the cost
//! is the size of the change, never a diff of the whole tree. Metadata steps only change the
//! config. Every step extends a cache key; a layer step whose key is in the build cache
//! (`cache.rs`) is not run again.
//!
//! The builder stays single-threaded: mounting and running fork.

pub mod cache;
mod copy;
pub mod dockerfile;
mod error;
pub mod expand;
pub mod ignore;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use oci_spec::image::{Descriptor, ImageManifest, MediaType};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use crate::image::commit::write_layer;
use crate::image::config;
use crate::image::digest;
use crate::image::layer::{self, Compression, PackOpts};
use crate::image::progress::Progress;
use crate::image::reference::Reference;
use crate::image::store::{parse_digest, Store};
use dockerfile::{Cmd, Dockerfile, Kind, Src, Step};

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The context directory (None: `-`, no context).
    pub context: Option<PathBuf>,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// Its name in messages.
    pub dockerfile_name: String,
    /// Names to tag the result with.
    pub tags: Vec<Reference>,
    /// `--build-arg K=V` (None: take K from the environment).
    pub build_args: BTreeMap<String, Option<String>>,
    /// Stop after this stage.
    pub target: Option<String>,
    /// Ignore the cache.
    pub no_cache: bool,
    /// Pull FROM images even when present.
    pub pull: bool,
    /// RUN with the host's network.
    pub network_host: bool,
    /// `--label K=V` on the result.
    pub labels: Vec<(String, String)>,
    /// Print only the image id.
    pub quiet: bool,
    /// One layer of the whole result.
    pub squash: bool,
    /// Compression of the layers written.
    pub compress: Compression,
    /// Registry options for pulls.
    pub registry: crate::registry::Options,
}

pub use error::BuildError;

/// Mounting is the CLI's business (it owns the FUSE adapter); the builder asks for it.
pub trait Mounter {
    /// Mount `lowers` (top first) at `mnt`, with `rw` = (upper, work) or read-only; the
    /// returned value unmounts when dropped.
    fn mount(
        &self,
        lowers: Vec<PathBuf>,
        rw: Option<(&Path, &Path)>,
        mnt: &Path,
    ) -> Result<Box<dyn std::any::Any>>;
    /// Unmount a mount left behind by a build that died.
    fn unmount(&self, mnt: &Path) -> Result<()>;
}

/// Remove the scratch directories of builds whose process is gone (killed before it could
/// clean up), unmounting what they left mounted.
fn reap_dead_builds(root: &Path, mounter: &dyn Mounter) {
    let Ok(rd) = std::fs::read_dir(root.join("build")) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if crate::mounts::pid_alive(pid) {
            continue;
        }
        let dir = e.path();
        let mut busy = false;
        for m in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let mp = m.path().join("rootfs");
            if crate::mounts::is_mountpoint(&mp) {
                if let Err(err) = mounter.unmount(&mp) {
                    log::warn!("leftover build mount {}: {err:#}", mp.display());
                    busy = true;
                }
            }
        }
        if !busy {
            log::info!("removing {} (its build {pid} is gone)", dir.display());
            let _ = crate::image::store::make_writable_and_remove(&dir);
        }
    }
}

/// The state of a stage between steps.
#[derive(Debug, Clone)]
struct State {
    /// Manifest layers.
    layers: Vec<Descriptor>,
    /// The image config, as JSON (docker's fields such as OnBuild and Healthcheck kept).
    config: Value,
    /// Cache key so far.
    key: String,
    /// ARGs in scope (None: declared without a value).
    args: BTreeMap<String, Option<String>>,
    /// Every layer step of the stage so far came from the cache (for `--> CACHED`).
    all_cached: bool,
}

fn sha(s: &str) -> String {
    digest::hex(&Sha256::digest(s.as_bytes()))
}

fn cfg(v: &mut Value) -> &mut Map<String, Value> {
    if !v.get("config").is_some_and(Value::is_object) {
        v["config"] = json!({});
    }
    v["config"].as_object_mut().expect("just made an object")
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

impl State {
    fn scratch() -> Result<State> {
        let c = serde_json::to_value(config::new_config()?)?;
        Ok(State {
            layers: Vec::new(),
            config: c,
            key: sha("scratch"),
            args: BTreeMap::new(),
            all_cached: true,
        })
    }

    fn env(&self) -> Vec<String> {
        str_list(self.config.get("config").and_then(|c| c.get("Env")))
    }

    fn set_env(&mut self, k: &str, val: &str) {
        let mut env = self.env();
        env.retain(|e| e.split('=').next() != Some(k));
        env.push(format!("{k}={val}"));
        cfg(&mut self.config).insert("Env".into(), json!(env));
    }

    /// Variables for expansion: args in scope, ENV over them (docker's precedence).
    fn vars(&self) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = self
            .args
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
            .collect();
        for e in self.env() {
            if let Some((k, v)) = e.split_once('=') {
                m.insert(k.to_string(), v.to_string());
            }
        }
        m
    }

    fn workdir(&self) -> String {
        self.config
            .get("config")
            .and_then(|c| c.get("WorkingDir"))
            .and_then(Value::as_str)
            .filter(|w| !w.is_empty())
            .unwrap_or("/")
            .to_string()
    }

    fn user(&self) -> String {
        self.config
            .get("config")
            .and_then(|c| c.get("User"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    }

    fn shell(&self) -> Vec<String> {
        let s = str_list(self.config.get("config").and_then(|c| c.get("Shell")));
        if s.is_empty() {
            vec!["/bin/sh".into(), "-c".into()]
        } else {
            s
        }
    }

    /// Add a history entry. A layer step is stamped now; a metadata step gets the time of
    /// the state it changes (the last layer's, or the base's), so a rebuild whose layer
    /// steps all come from the cache gives the same config, hence the same image id.
    fn history(&mut self, created_by: &str, empty: bool) -> Result<()> {
        let t = match self.config.get("created").and_then(Value::as_str) {
            Some(c) if empty => c.to_string(),
            _ => config::rfc3339(config::now_or_epoch()?),
        };
        let mut h = json!({"created": t, "created_by": created_by, "comment": "buildkit.dockerfile.v0"});
        if empty {
            h["empty_layer"] = json!(true);
        }
        let obj = self
            .config
            .as_object_mut()
            .context("image config is not an object")?;
        obj.entry("history").or_insert_with(|| json!([]));
        if let Some(a) = obj.get_mut("history").and_then(Value::as_array_mut) {
            a.push(h);
        }
        obj.insert("created".into(), json!(t));
        Ok(())
    }

    fn extend_key(&mut self, what: &str) {
        self.key = sha(&format!("{}\n{what}", self.key));
    }
}

/// Store a state as config + manifest blobs (named by nothing); returns the manifest digest.
fn save_state(store: &Store, st: &State) -> Result<(String, u64)> {
    let cbytes = serde_json::to_vec(&st.config)?;
    let cd = store.put_blob(&cbytes)?;
    let m = oci_spec::image::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            cbytes.len() as u64,
            parse_digest(&cd)?,
        ))
        .layers(st.layers.clone())
        .build()?;
    let mbytes = serde_json::to_vec(&m)?;
    Ok((store.put_blob(&mbytes)?, mbytes.len() as u64))
}

/// A state from a stored manifest (the cache, or an image).
fn load_state(store: &Store, md: &str, key: &str) -> Result<State> {
    let m: ImageManifest =
        serde_json::from_slice(&store.read_blob(md)?).with_context(|| format!("manifest {md}"))?;
    let config: Value = serde_json::from_slice(&store.read_blob(m.config().digest().as_ref())?)
        .with_context(|| format!("config of {md}"))?;
    for l in m.layers() {
        if !store.blob_path(l.digest().as_ref())?.exists() {
            bail!("layer {} of {md} is missing", l.digest());
        }
    }
    Ok(State {
        layers: m.layers().clone(),
        config,
        key: key.to_string(),
        args: BTreeMap::new(),
        all_cached: true,
    })
}

/// Build-wide context.
struct Builder<'a> {
    root: &'a Path,
    o: &'a Options,
    df: &'a Dockerfile,
    mounter: &'a dyn Mounter,
    /// This build's scratch directory, `ROOT/build/<pid>-<n>`.
    dir: PathBuf,
    /// Steps run so far (for numbering).
    step: usize,
    total: usize,
    /// Serial of mounts (directory names).
    seq: usize,
    /// Finished stages (by index).
    done: Vec<Option<State>>,
    /// Global ARGs (before the first FROM).
    global: BTreeMap<String, Option<String>>,
    /// Build args some ARG consumed.
    used_args: BTreeSet<String>,
    ignore: Option<ignore::Ignore>,
    progress: Progress,
}

/// Removes the build's scratch directory at the end (mounts are gone by then).
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = crate::image::store::make_writable_and_remove(&self.0);
    }
}

/// Automatic platform args (BuildKit's), in the global scope.
fn platform_args() -> BTreeMap<String, Option<String>> {
    let p = crate::registry::Platform::host();
    let plat = format!("{}/{}", p.os, p.arch);
    let mut m = BTreeMap::new();
    for (pre, _) in [("TARGET", ()), ("BUILD", ())] {
        m.insert(format!("{pre}PLATFORM"), Some(plat.clone()));
        m.insert(format!("{pre}OS"), Some(p.os.clone()));
        m.insert(format!("{pre}ARCH"), Some(p.arch.clone()));
        m.insert(format!("{pre}VARIANT"), Some(String::new()));
    }
    m
}

/// BuildKit's default PATH.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Args docker lets through without an ARG line.
const PROXY_ARGS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Build; returns the image id (config digest).
pub fn build(root: &Path, o: &Options, mounter: &dyn Mounter) -> Result<String> {
    let df = dockerfile::parse(&o.dockerfile, &o.dockerfile_name)?;
    validate(&df, &o.dockerfile_name)?;
    let ignore = match &o.context {
        Some(c) => match std::fs::read_to_string(c.join(".dockerignore")) {
            Ok(t) => {
                Some(ignore::Ignore::parse(&t).map_err(|e| anyhow!("{}/.dockerignore: {e}", c.display()))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("{}/.dockerignore", c.display())),
        },
        None => None,
    };
    reap_dead_builds(root, mounter);
    // `<pid>-<start time>`: gc keeps what live builds wrote since they started.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir = root
        .join("build")
        .join(format!("{}-{started}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _scratch = ScratchDir(dir.clone());
    let mut b = Builder {
        root,
        o,
        df: &df,
        mounter,
        dir,
        step: 0,
        total: 0,
        seq: 0,
        done: vec![None; df.stages.len()],
        global: platform_args(),
        used_args: BTreeSet::new(),
        ignore,
        progress: if o.quiet {
            Progress::quiet()
        } else {
            Progress::new()
        },
    };
    b.global_args()?;
    let target = b.target()?;
    let needed = b.needed(target)?;
    b.total = needed.iter().map(|i| df.stages[*i].len()).sum::<usize>() + df.global_args.len();
    b.step = df.global_args.len();
    for i in 0..=target {
        if needed.contains(&i) {
            let st = b.stage(i)?;
            b.done[i] = Some(st);
        }
    }
    let mut st = b.done[target].take().context("target stage not built")?;
    let unused: Vec<&String> = o
        .build_args
        .keys()
        .filter(|k| !b.used_args.contains(*k) && !PROXY_ARGS.contains(&k.as_str()))
        .collect();
    if !unused.is_empty() {
        eprintln!(
            "strata: warning: build args not consumed by any ARG: {}",
            unused.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if !o.labels.is_empty() {
        let labels = cfg(&mut st.config).entry("Labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        for (k, v) in &o.labels {
            labels[k] = json!(v);
        }
    }
    if o.squash {
        b.squash(&mut st)?;
    }
    let store = Store::open(root, true)?;
    let (md, size) = save_state(&store, &st)?;
    let desc = Descriptor::new(MediaType::ImageManifest, size, parse_digest(&md)?);
    if o.tags.is_empty() {
        store.add_untagged(&desc)?;
    }
    for t in &o.tags {
        store.set_tag(t, &desc)?;
    }
    let img = store.load_image(&desc)?;
    Ok(img.id)
}

impl Builder<'_> {
    fn say(&self, s: &str) {
        if !self.o.quiet {
            crate::cmd::say!("{s}");
        }
    }

    /// `step`'s line as the context of an error that has no type of its own.
    fn err_at(&self, step: &Step, e: impl std::fmt::Display) -> anyhow::Error {
        self.err_in(step, BuildError::Invalid(e.to_string()).into())
    }

    /// `step`'s line as the context of `e` (whose own type stays reachable).
    fn err_in(&self, step: &Step, e: anyhow::Error) -> anyhow::Error {
        e.context(BuildError::At {
            file: self.o.dockerfile_name.clone(),
            line: step.line,
            text: step.text.clone(),
        })
    }

    /// `--squash`: the merged tree as the image's one layer (podman's `--squash-all`; docker
    /// keeps the base image's layers below the squashed one). History entries stay, marked
    /// empty, with one entry for the layer.
    fn squash(&mut self, st: &mut State) -> Result<()> {
        let lowers = self.lowers(st)?;
        let tree = crate::image::tree::Tree::open(lowers)?;
        let store = Store::open(self.root, true)?;
        let epoch = config::source_date_epoch()?;
        let blob = write_layer(
            &store,
            Compression::Gzip,
            epoch,
            &self.progress,
            "writing squashed layer",
            |t| tree.export(t),
        )?;
        let n = st.layers.len();
        st.layers = vec![blob.descriptor()?];
        st.config["rootfs"] = json!({"type": "layers", "diff_ids": [blob.diff_id]});
        if let Some(h) = st.config.get_mut("history").and_then(Value::as_array_mut) {
            for e in h.iter_mut() {
                e["empty_layer"] = json!(true);
            }
        }
        st.history(
            &format!("strata build --squash: {n} layers merged into one"),
            false,
        )
    }

    fn interrupted(&self) -> Result<()> {
        if let Some(s) = crate::sys::take_signal() {
            return Err(BuildError::Interrupted(s).into());
        }
        Ok(())
    }

    fn global_args(&mut self) -> Result<()> {
        for s in &self.df.global_args {
            self.step += 1;
            let Kind::Arg(raw) = &s.kind else { continue };
            let pairs = expand::parse_args_raw(raw, self.df.escape).map_err(|e| self.err_at(s, e))?;
            for (k, raw_default) in pairs {
                // BuildKit: a --build-arg wins, else the default is expanded against the
                // scope so far (earlier pairs of the same line included).
                let v = match self.build_arg(&k) {
                    Some(v) => Some(v),
                    None => match raw_default {
                        Some(d) => Some(
                            expand::expand_word(&d, &flat(&self.global), self.df.escape)
                                .map_err(|e| self.err_at(s, e))?,
                        ),
                        None => None,
                    },
                };
                self.global.insert(k, v);
            }
        }
        Ok(())
    }

    /// The `--build-arg` value of `k`, if given (marking it consumed).
    fn build_arg(&mut self, k: &str) -> Option<String> {
        let v = self.o.build_args.get(k)?;
        self.used_args.insert(k.to_string());
        Some(v.clone().or_else(|| std::env::var(k).ok()).unwrap_or_default())
    }

    fn stage_name(&self, i: usize) -> Option<String> {
        match &self.df.stages[i][0].kind {
            Kind::From { name, .. } => name.as_ref().map(|n| n.to_lowercase()),
            _ => None,
        }
    }

    /// A stage named `s` (name or index) before `before`.
    fn stage_ref(&self, s: &str, before: usize) -> Option<usize> {
        let l = s.to_lowercase();
        if let Some(i) = (0..before)
            .rev()
            .find(|i| self.stage_name(*i).as_deref() == Some(&l))
        {
            return Some(i);
        }
        s.parse::<usize>().ok().filter(|i| *i < before)
    }

    fn target(&self) -> Result<usize> {
        match &self.o.target {
            None => Ok(self.df.stages.len() - 1),
            Some(t) => (0..self.df.stages.len())
                .find(|i| self.stage_name(*i).as_deref() == Some(&t.to_lowercase()))
                .ok_or_else(|| {
                    BuildError::NoStage {
                        name: t.clone(),
                        file: self.o.dockerfile_name.clone(),
                    }
                    .into()
                }),
        }
    }

    fn base_name(&self, i: usize) -> Result<String> {
        let step = &self.df.stages[i][0];
        let Kind::From { image, .. } = &step.kind else {
            bail!("stage {i} does not start with FROM")
        };
        let vars = flat(&self.global);
        expand::expand_word(image, &vars, self.df.escape).map_err(|e| self.err_at(step, e))
    }

    /// Stages `target` depends on (FROM a stage, COPY --from a stage), itself included.
    fn needed(&self, target: usize) -> Result<BTreeSet<usize>> {
        let mut need = BTreeSet::new();
        let mut todo = vec![target];
        while let Some(i) = todo.pop() {
            if !need.insert(i) {
                continue;
            }
            let img = self.base_name(i)?;
            if let Some(j) = self.stage_ref(&img, i) {
                todo.push(j);
            }
            for s in &self.df.stages[i] {
                if let Kind::Copy { flags, .. } = &s.kind {
                    if let Some(Some(f)) = flags.iter().find(|(k, _)| k == "from").map(|(_, v)| v) {
                        if let Some(j) = self.stage_ref(f, i) {
                            todo.push(j);
                        }
                    }
                }
            }
        }
        Ok(need)
    }

    /// An image from the store, pulled when missing (or always with --pull).
    fn image_state(&mut self, name: &str) -> Result<State> {
        let have = {
            let store = Store::open(self.root, false)?;
            store.resolve(name).ok().map(|i| i.manifest_digest)
        };
        let md = match have {
            Some(md) if !self.o.pull => md,
            _ => {
                let r = crate::image::reference::RemoteRef::parse(name)
                    .map_err(|e| anyhow!("image '{name}' is not in the store and {e}"))?;
                let store = Store::open(self.root, true)?;
                let p = crate::registry::pull(&store, &r, None, &self.o.registry)
                    .with_context(|| format!("pulling {r}"))?;
                p.digest
            }
        };
        let store = Store::open(self.root, false)?;
        load_state(&store, &md, &sha(&format!("from {md}")))
    }

    fn stage(&mut self, i: usize) -> Result<State> {
        let steps = self.df.stages[i].clone();
        let from = &steps[0];
        self.step += 1;
        self.say(&format!("STEP {}/{}: {}", self.step, self.total, from.text));
        let img = self.base_name(i)?;
        let mut st = if img.eq_ignore_ascii_case("scratch") {
            State::scratch()?
        } else if let Some(j) = self.stage_ref(&img, i) {
            let mut s = self.done[j]
                .clone()
                .with_context(|| format!("stage {j} was not built"))?;
            s.args.clear();
            s
        } else {
            self.image_state(&img).map_err(|e| self.err_in(from, e))?
        };
        // BuildKit gives every image a PATH (FROM scratch included).
        if !st.env().iter().any(|e| e.starts_with("PATH=")) {
            st.set_env("PATH", DEFAULT_PATH);
        }
        st.all_cached = true;
        // ONBUILD triggers of the base run first, and are not inherited.
        let triggers = str_list(st.config.get("config").and_then(|c| c.get("OnBuild")));
        if !triggers.is_empty() {
            cfg(&mut st.config).insert("OnBuild".into(), Value::Null);
            let tsteps = dockerfile::parse_triggers(&triggers, &format!("{img} ONBUILD"))?;
            for t in &tsteps {
                self.say(&format!("--> ONBUILD {}", t.text));
                self.exec(&mut st, t, i)?;
            }
        }
        for s in &steps[1..] {
            self.interrupted()?;
            self.step += 1;
            self.say(&format!("STEP {}/{}: {}", self.step, self.total, s.text));
            self.exec(&mut st, s, i)?;
        }
        Ok(st)
    }

    fn expand(&self, st: &State, step: &Step, s: &str) -> Result<String> {
        expand::expand_word(s, &st.vars(), self.df.escape).map_err(|e| self.err_at(step, e))
    }

    fn exec(&mut self, st: &mut State, s: &Step, stage: usize) -> Result<()> {
        let esc = self.df.escape;
        match &s.kind {
            Kind::From { .. } => bail!(self.err_at(s, "FROM inside a stage")),
            Kind::Arg(raw) => {
                let pairs = expand::parse_args_raw(raw, esc).map_err(|e| self.err_at(s, e))?;
                for (k, raw_default) in pairs {
                    let v = match self.build_arg(&k) {
                        Some(v) => Some(v),
                        None => match raw_default {
                            Some(d) => Some(
                                expand::expand_word(&d, &st.vars(), esc).map_err(|e| self.err_at(s, e))?,
                            ),
                            // A stage ARG without a default takes the global ARG's value.
                            None => self.global.get(&k).cloned().flatten(),
                        },
                    };
                    st.args.insert(k, v);
                }
                st.extend_key(&format!("ARG {}", serde_json::to_string(&st.args)?));
                if st.all_cached && !self.o.no_cache {
                    self.say("--> CACHED");
                }
                st.history(&format!("ARG {raw}"), true)?;
            }
            Kind::Env(raw) => {
                let pairs = expand::parse_kv(raw, &st.vars(), esc, true).map_err(|e| self.err_at(s, e))?;
                let mut shown = Vec::new();
                for (k, v) in pairs {
                    st.set_env(&k, &v);
                    shown.push(format!("{k}={v}"));
                }
                self.meta(st, &format!("ENV {}", shown.join(" ")))?;
            }
            Kind::Label(raw) => {
                let pairs = expand::parse_kv(raw, &st.vars(), esc, true).map_err(|e| self.err_at(s, e))?;
                let mut shown = Vec::new();
                let labels = cfg(&mut st.config).entry("Labels").or_insert_with(|| json!({}));
                if !labels.is_object() {
                    *labels = json!({});
                }
                for (k, v) in pairs {
                    shown.push(format!("{k}={v}"));
                    labels[&k] = json!(v);
                }
                self.meta(st, &format!("LABEL {}", shown.join(" ")))?;
            }
            Kind::Maintainer(m) => {
                st.config["author"] = json!(m);
                self.meta(st, &format!("MAINTAINER {m}"))?;
            }
            Kind::Cmd(c) => {
                let argv = self.argv(st, c);
                cfg(&mut st.config).insert("Cmd".into(), json!(argv));
                self.meta(st, &format!("CMD {}", serde_json::to_string(&argv)?))?;
            }
            Kind::Entrypoint(c) => {
                let argv = self.argv(st, c);
                let c = cfg(&mut st.config);
                c.insert("Entrypoint".into(), json!(argv));
                // docker: an ENTRYPOINT resets a CMD inherited from the base.
                c.remove("Cmd");
                self.meta(st, &format!("ENTRYPOINT {}", serde_json::to_string(&argv)?))?;
            }
            Kind::Expose(words) => {
                let mut ports = Vec::new();
                for w in words {
                    for p in expand::expand_words(w, &st.vars(), esc).map_err(|e| self.err_at(s, e))? {
                        let p = if p.contains('/') { p } else { format!("{p}/tcp") };
                        let (num, proto) = p.split_once('/').unwrap_or((&p, "tcp"));
                        let ok = !num.is_empty()
                            && num.split('-').all(|n| n.parse::<u16>().is_ok())
                            && matches!(proto.to_lowercase().as_str(), "tcp" | "udp" | "sctp");
                        if !ok {
                            return Err(self.err_at(s, format!("invalid port '{p}'")));
                        }
                        ports.push(format!("{num}/{}", proto.to_lowercase()));
                    }
                }
                let e = cfg(&mut st.config)
                    .entry("ExposedPorts")
                    .or_insert_with(|| json!({}));
                if !e.is_object() {
                    *e = json!({});
                }
                for p in &ports {
                    e[p] = json!({});
                }
                self.meta(
                    st,
                    &format!(
                        "EXPOSE map[{}]",
                        ports
                            .iter()
                            .map(|p| format!("{p}:{{}}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                )?;
            }
            Kind::Volume(paths) => {
                let mut vols = Vec::new();
                for p in paths {
                    // One item is one path, even when a variable in it holds spaces.
                    let v = expand::expand_word(p, &st.vars(), esc).map_err(|e| self.err_at(s, e))?;
                    if v.is_empty() {
                        return Err(self.err_at(s, "VOLUME with an empty path"));
                    }
                    vols.push(v);
                }
                let e = cfg(&mut st.config).entry("Volumes").or_insert_with(|| json!({}));
                if !e.is_object() {
                    *e = json!({});
                }
                for v in &vols {
                    e[v] = json!({});
                }
                self.meta(st, &format!("VOLUME {}", serde_json::to_string(&vols)?))?;
            }
            Kind::User(u) => {
                let u = self.expand(st, s, u)?;
                cfg(&mut st.config).insert("User".into(), json!(u));
                self.meta(st, &format!("USER {u}"))?;
            }
            Kind::Workdir(w) => {
                let w = self.expand(st, s, w)?;
                let abs = if w.starts_with('/') {
                    w.clone()
                } else {
                    format!("{}/{w}", st.workdir().trim_end_matches('/'))
                };
                let abs = clean_abs(&abs);
                cfg(&mut st.config).insert("WorkingDir".into(), json!(abs));
                self.workdir(st, &abs).map_err(|e| self.err_in(s, e))?;
            }
            Kind::Stopsignal(sig) => {
                let sig = self.expand(st, s, sig)?;
                cfg(&mut st.config).insert("StopSignal".into(), json!(sig));
                self.meta(st, &format!("STOPSIGNAL {sig}"))?;
            }
            Kind::Shell(sh) => {
                if sh.is_empty() {
                    return Err(self.err_at(s, "SHELL needs a JSON array with at least one element"));
                }
                cfg(&mut st.config).insert("Shell".into(), json!(sh));
                self.meta(st, &format!("SHELL {}", serde_json::to_string(sh)?))?;
            }
            Kind::Healthcheck(h) => {
                let hc = healthcheck(h).map_err(|e| self.err_at(s, e))?;
                cfg(&mut st.config).insert("Healthcheck".into(), hc);
                self.meta(
                    st,
                    &format!(
                        "HEALTHCHECK {}",
                        s.text
                            .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                            .trim()
                    ),
                )?;
            }
            Kind::Onbuild(t) => {
                let c = cfg(&mut st.config);
                let mut list = str_list(c.get("OnBuild"));
                list.push(t.clone());
                c.insert("OnBuild".into(), json!(list));
                self.meta(st, &format!("ONBUILD {t}"))?;
            }
            Kind::Run { cmd, heredocs, flags } => self.run(st, s, cmd, heredocs, flags)?,
            Kind::Copy {
                add,
                srcs,
                dest,
                flags,
            } => self.copy(st, s, *add, srcs, dest, flags, stage)?,
        }
        Ok(())
    }

    /// A metadata-only step: history entry without a layer, and the cache key moves on.
    fn meta(&mut self, st: &mut State, created_by: &str) -> Result<()> {
        st.extend_key(created_by);
        if st.all_cached && !self.o.no_cache {
            self.say("--> CACHED");
        }
        st.history(created_by, true)
    }

    /// A layer step's result came from the cache.
    fn reuse(&self, st: &mut State, c: State) {
        self.say("--> CACHED");
        let args = std::mem::take(&mut st.args);
        *st = c;
        st.args = args;
        st.all_cached = true;
    }

    fn argv(&self, st: &State, c: &Cmd) -> Vec<String> {
        match c {
            Cmd::Exec(v) => v.clone(),
            Cmd::Shell(t) => {
                let mut a = st.shell();
                a.push(t.clone());
                a
            }
        }
    }

    /// Fresh upper/work/mountpoint directories for one mount.
    fn mount_dirs(&mut self) -> Result<(PathBuf, PathBuf, PathBuf, PathBuf)> {
        self.seq += 1;
        let d = self.dir.join(self.seq.to_string());
        let (u, w, m, r) = (d.join("upper"), d.join("work"), d.join("rootfs"), d.join("run"));
        for p in [&u, &w, &m, &r] {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        Ok((u, w, m, r))
    }

    /// The lower directories of a state (unpacking its layers if needed).
    fn lowers(&self, st: &State) -> Result<Vec<PathBuf>> {
        let store = Store::open(self.root, true)?;
        let (md, size) = save_state(&store, st)?;
        let img = store.load_image(&Descriptor::new(
            MediaType::ImageManifest,
            size,
            parse_digest(&md)?,
        ))?;
        let mut l = store.unpacked_layers(&img, &self.progress)?;
        if l.is_empty() {
            // FROM scratch: an overlay needs a lower, so an empty one.
            let e = self.dir.join("empty");
            std::fs::create_dir_all(&e)?;
            l.push(e);
        }
        Ok(l)
    }

    /// A cached result for `key`, unless --no-cache.
    fn cached(&self, key: &str) -> Result<Option<State>> {
        if self.o.no_cache {
            return Ok(None);
        }
        let store = Store::open(self.root, false)?;
        match cache::get(&store, key) {
            Some(md) => Ok(load_state(&store, &md, key).ok()),
            None => Ok(None),
        }
    }

    /// Commit `upper` as the next layer of `st` (or an empty history entry when nothing
    /// changed), then remember the result under `st.key`.
    fn commit(&mut self, st: &mut State, upper: &Path, created_by: &str) -> Result<()> {
        // What the step ran on (before the store is locked here: `lowers` locks it too).
        let lowers = self.lowers(st)?;
        let store = Store::open(self.root, true)?;
        // docker (BuildKit 20.10) gives every RUN, COPY, ADD and WORKDIR a layer, an empty
        // tar when nothing changed.
        st.all_cached = false;
        {
            let epoch = config::source_date_epoch()?;
            let popts = PackOpts {
                epoch,
                excludes: Vec::new(),
                // Renamed directories are written whole from what the step ran on.
                lowers,
            };
            let blob = write_layer(
                &store,
                self.o.compress,
                epoch,
                &self.progress,
                "writing layer",
                |t| layer::pack_upper(upper, t, &popts),
            )?;
            adopt_upper(&store, upper, &blob.diff_id)?;
            let obj = st.config.as_object_mut().context("config")?;
            let rootfs = obj
                .entry("rootfs")
                .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
            if let Some(a) = rootfs.get_mut("diff_ids").and_then(Value::as_array_mut) {
                a.push(json!(blob.diff_id));
            } else {
                rootfs["diff_ids"] = json!([blob.diff_id]);
            }
            st.layers.push(blob.descriptor()?);
            st.history(created_by, false)?;
        }
        let (md, _) = save_state(&store, st)?;
        cache::put(&store, &st.key, &md)?;
        Ok(())
    }

    /// WORKDIR: a layer holding the directory when the tree lacks it (BuildKit's mkdir),
    /// else only a history entry. The tree is looked up without a mount.
    fn workdir(&mut self, st: &mut State, abs: &str) -> Result<()> {
        let created_by = format!("WORKDIR {abs}");
        st.extend_key(&format!("{created_by} user={}", st.user()));
        if let Some(c) = self.cached(&st.key)? {
            self.reuse(st, c);
            return Ok(());
        }
        let lowers = self.lowers(st)?;
        let exists = crate::image::tree::Tree::open(lowers.clone())?
            .lookup(abs)
            .is_some();
        let (u, w, m, _) = self.mount_dirs()?;
        if !exists {
            let _g = self.mounter.mount(lowers, Some((&u, &w)), &m)?;
            // BuildKit creates it as the current USER (rootless: as root, which is the user).
            let owner = match st.user().as_str() {
                "" => None,
                _ if crate::sys::euid() != 0 => {
                    log::warn!(
                        "WORKDIR {abs}: a rootless build creates it as root, not as USER {}",
                        st.user()
                    );
                    None
                }
                user => Some(copy::user_ids(&m, user)?),
            };
            copy::mkdir_p(&m, abs, owner)?;
        }
        // An existing directory still gets its (empty) layer, as docker does.
        self.commit(st, &u, &created_by)
    }

    fn run(
        &mut self,
        st: &mut State,
        s: &Step,
        c: &Cmd,
        heredocs: &[(String, String)],
        flags: &dockerfile::Flags,
    ) -> Result<()> {
        let mut network_host = self.o.network_host;
        for (k, v) in flags {
            match (k.as_str(), v.as_deref()) {
                ("network", Some("host")) => network_host = true,
                ("network", Some("none" | "default")) => network_host = false,
                ("mount", _) => {
                    return Err(self.err_in(
                        s,
                        BuildError::Unsupported("RUN --mount is not supported".into()).into(),
                    ))
                }
                ("security", Some("sandbox")) => {}
                (k, _) => return Err(self.err_at(s, format!("unknown flag --{k}"))),
            }
        }
        let argv = match c {
            Cmd::Exec(v) => v.clone(),
            Cmd::Shell(t) => {
                let mut a = st.shell();
                // parse-dockerfile takes the leading `<<NAME` off the command line.
                let only_heredoc = heredocs.len() == 1 && t.trim().is_empty();
                let script = if only_heredoc {
                    // `RUN <<EOF`: the document is the script.
                    heredocs[0].1.clone()
                } else {
                    // The shell reads the documents after the command line itself.
                    let mut s = match heredocs.first() {
                        Some((name, _)) => format!("<<{name} {t}"),
                        None => t.clone(),
                    };
                    for (name, body) in heredocs {
                        s.push('\n');
                        s.push_str(body);
                        if !body.ends_with('\n') {
                            s.push('\n');
                        }
                        s.push_str(name);
                    }
                    s
                };
                a.push(script);
                a
            }
        };
        if argv.is_empty() {
            return Err(self.err_at(s, "empty command"));
        }
        // The args in scope reach the command's environment (not the image's config).
        let mut env = st.env();
        for (k, v) in &st.args {
            if let Some(v) = v {
                if !env.iter().any(|e| e.split('=').next() == Some(k)) {
                    env.push(format!("{k}={v}"));
                }
            }
        }
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        let args_seen: Vec<String> = st
            .args
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect();
        let shown = match c {
            Cmd::Exec(v) => format!("RUN {}", serde_json::to_string(v)?),
            Cmd::Shell(_) => format!("RUN {}", argv.join(" ")),
        };
        // BuildKit's form: the build args the command saw, counted, before it.
        let created_by = if args_seen.is_empty() {
            format!("{shown} # buildkit")
        } else {
            format!(
                "RUN |{} {} {} # buildkit",
                args_seen.len(),
                args_seen.join(" "),
                shown.trim_start_matches("RUN ")
            )
        };
        st.extend_key(&format!(
            "RUN {} args={} net={network_host}",
            serde_json::to_string(&argv)?,
            serde_json::to_string(&args_seen)?,
        ));
        if let Some(c) = self.cached(&st.key)? {
            self.reuse(st, c);
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let lowers = self.lowers(st)?;
        let (u, w, m, rundir) = self.mount_dirs()?;
        let cwd = st.workdir();
        let t_run;
        let code = {
            let _g = self.mounter.mount(lowers, Some((&u, &w)), &m)?;
            log::info!("RUN: mounted in {:?}", t0.elapsed());
            t_run = std::time::Instant::now();
            copy::mkdir_p(&m, &cwd, None)?;
            self.interrupted()?;
            let spec = crate::runtime::RunSpec {
                rootfs: m.clone(),
                rundir: rundir.clone(),
                argv: argv.clone(),
                env,
                cwd,
                user: st.user(),
                hostname: "strata-build".into(),
                tty: false,
                interactive: false,
                volumes: Vec::new(),
                host_network: network_host,
                // BuildKit runs RUN steps under docker's default seccomp profile too.
                seccomp: true,
                seccomp_profile: None,
                no_new_privs: false,
                caps: crate::runtime::DEFAULT_CAPS.to_vec(),
                read_only: false,
                limits: Default::default(),
            };
            let code = run_quiet(self.o.quiet, || crate::runtime::run(&spec))?;
            let stubs: Vec<PathBuf> = std::fs::read_to_string(rundir.join("stubs"))
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect();
            crate::runtime::rootfs::remove_stubs(&m, &stubs);
            code
        };
        self.interrupted()?;
        if code != 0 {
            return Err(self.err_in(s, BuildError::RunFailed { code }.into()));
        }
        log::info!("RUN: command and unmount took {:?}", t_run.elapsed());
        drop_fresh(&u);
        let t_commit = std::time::Instant::now();
        let r = self.commit(st, &u, &created_by);
        log::info!("RUN: layer written in {:?}", t_commit.elapsed());
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn copy(
        &mut self,
        st: &mut State,
        s: &Step,
        add: bool,
        srcs: &[Src],
        dest: &str,
        flags: &dockerfile::Flags,
        stage: usize,
    ) -> Result<()> {
        let word = if add { "ADD" } else { "COPY" };
        let mut from = None;
        let mut chown = None;
        let mut chmod = None;
        let mut checksum = None;
        for (k, v) in flags {
            let v = v.as_deref().map(|v| self.expand(st, s, v)).transpose()?;
            match (k.as_str(), v) {
                ("from", Some(v)) if !add => from = Some(v),
                ("chown", Some(v)) => chown = Some(v),
                ("chmod", Some(v)) => chmod = Some(v),
                ("checksum", Some(v)) if add => checksum = Some(v),
                ("link", _) | ("parents", _) | ("keep-git-dir", _) => {}
                ("exclude", _) => {
                    return Err(self.err_in(
                        s,
                        BuildError::Unsupported("--exclude is not supported".into()).into(),
                    ))
                }
                (k, _) => return Err(self.err_at(s, format!("unknown or incomplete flag --{k}"))),
            }
        }
        let dest = self.expand(st, s, dest)?;
        let dest_abs = if dest.starts_with('/') {
            dest.clone()
        } else {
            format!("{}/{dest}", st.workdir().trim_end_matches('/'))
        };
        let dir_dest = dest.ends_with('/') || dest == "." || dest.ends_with("/.");
        let mode = match &chmod {
            Some(m) => Some(
                u32::from_str_radix(m, 8)
                    .map_err(|_| self.err_at(s, format!("--chmod={m}: want an octal mode")))?,
            ),
            None => None,
        };
        if mode.is_some_and(|m| m > 0o7777) {
            return Err(self.err_at(s, "--chmod: mode out of range"));
        }
        // Where sources come from: the context, a stage, or an image (mounted read-only).
        let mut guard: Option<Box<dyn std::any::Any>> = None;
        let (src_root, ignore) = match &from {
            None => match &self.o.context {
                Some(c) => (Some(c.clone()), self.ignore.clone()),
                None => (None, None),
            },
            Some(f) => {
                let fst = match self.stage_ref(f, stage) {
                    Some(j) => self.done[j]
                        .clone()
                        .with_context(|| format!("stage {j} was not built"))?,
                    None => self
                        .image_state(f)
                        .map_err(|e| self.err_in(s, e.context(format!("--from={f}"))))?,
                };
                let lowers = self.lowers(&fst)?;
                let (_, _, m, _) = self.mount_dirs()?;
                guard = Some(self.mounter.mount(lowers, None, &m)?);
                (Some(m), None)
            }
        };
        let vars = st.vars();
        let plan = copy::plan(
            srcs,
            src_root.as_deref(),
            ignore.as_ref(),
            add,
            &|t: &str| expand::expand_word(t, &vars, self.df.escape),
            &|t: &str| expand::expand_heredoc(t, &vars),
        )
        .map_err(|e| self.err_in(s, e))?;
        if plan.items.len() > 1 && !dir_dest {
            return Err(self.err_at(
                s,
                format!(
                    "when copying several sources the destination must be a directory ending in '/': {dest}"
                ),
            ));
        }
        st.extend_key(&format!(
            "{word} {} chown={chown:?} chmod={chmod:?} checksum={checksum:?} dest={dest_abs} dirdest={dir_dest}",
            plan.hash
        ));
        let created_by = format!("{word} {} {dest} # buildkit", plan.shown.join(" "));
        if let Some(c) = self.cached(&st.key)? {
            self.reuse(st, c);
            return Ok(());
        }
        let lowers = self.lowers(st)?;
        let (u, w, m, _) = self.mount_dirs()?;
        {
            let _g = self.mounter.mount(lowers, Some((&u, &w)), &m)?;
            let owner = match &chown {
                Some(c) => Some(copy::resolve_owner(&m, c).map_err(|e| self.err_in(s, e))?),
                None => None,
            };
            copy::execute(&plan, &m, &dest_abs, dir_dest, owner, mode, checksum.as_deref())
                .map_err(|e| self.err_in(s, e))?;
        }
        // The plan holds a directory fd in the source mount: close it before unmounting.
        drop(plan);
        drop(guard);
        self.commit(st, &u, &created_by)
    }
}

/// The config's Healthcheck for a HEALTHCHECK instruction.
fn healthcheck(h: &Option<(dockerfile::Flags, Cmd)>) -> std::result::Result<Value, String> {
    let Some((flags, c)) = h else {
        return Ok(json!({"Test": ["NONE"]}));
    };
    let test = match c {
        Cmd::Exec(v) => std::iter::once("CMD".to_string())
            .chain(v.iter().cloned())
            .collect::<Vec<_>>(),
        Cmd::Shell(t) => vec!["CMD-SHELL".to_string(), t.clone()],
    };
    let mut hc = json!({ "Test": test });
    for (k, v) in flags {
        let v = v.clone().unwrap_or_default();
        let field = match k.as_str() {
            "interval" => "Interval",
            "timeout" => "Timeout",
            "start-period" => "StartPeriod",
            "start-interval" => "StartInterval",
            "retries" => {
                let n: u64 = v.parse().map_err(|_| format!("--retries={v}: not a number"))?;
                hc["Retries"] = json!(n);
                continue;
            }
            other => return Err(format!("unknown flag --{other}")),
        };
        hc[field] = json!(parse_duration(&v).ok_or_else(|| format!("--{k}={v}: not a duration"))?);
    }
    Ok(hc)
}

/// What docker refuses before running anything: flags no instruction knows, bad
/// HEALTHCHECK values, an empty SHELL.
fn validate(df: &Dockerfile, file: &str) -> Result<()> {
    let at = |s: &Step, e: String| {
        anyhow::Error::from(BuildError::Invalid(e)).context(BuildError::At {
            file: file.to_string(),
            line: s.line,
            text: s.text.clone(),
        })
    };
    for s in df.stages.iter().flatten() {
        match &s.kind {
            Kind::Healthcheck(h) => {
                healthcheck(h).map_err(|e| at(s, e))?;
            }
            Kind::Run { flags, .. } => {
                for (k, _) in flags {
                    if !matches!(k.as_str(), "network" | "security" | "mount") {
                        return Err(at(s, format!("unknown flag --{k}")));
                    }
                }
            }
            Kind::Copy { flags, add, .. } => {
                for (k, _) in flags {
                    let known = matches!(k.as_str(), "chown" | "chmod" | "link" | "parents" | "exclude")
                        || (!add && k == "from")
                        || (*add && matches!(k.as_str(), "checksum" | "keep-git-dir"));
                    if !known {
                        return Err(at(s, format!("unknown flag --{k}")));
                    }
                }
            }
            Kind::Shell(v) if v.is_empty() => return Err(at(s, "SHELL needs at least one element".into())),
            _ => {}
        }
    }
    Ok(())
}

/// The upper a layer was just packed from is that layer unpacked (the overlay's upper and
/// an unpacked layer share one format), so it becomes `layers/<diff_id>` instead of the next
/// step unpacking the blob again. strata's own bookkeeping xattrs (`origin`, `impure` on
/// copied-up directories) are not part of a layer and are removed first.
fn adopt_upper(store: &Store, upper: &Path, diff_id: &str) -> Result<()> {
    let dir = store.layer_dir(diff_id)?;
    if dir.exists() {
        return Ok(());
    }
    /// Strip the bookkeeping xattrs; true when a directory carries a redirect.
    fn strip(p: &Path) -> Result<bool> {
        let f = std::fs::File::open(p)?;
        let mut redirect = false;
        {
            use std::os::fd::AsFd;
            let t = crate::sys::XTarget::Fd(f.as_fd());
            let names = crate::sys::listxattr(t).unwrap_or_default();
            redirect |= layer::upper_redirect(t, &names)?.is_some();
            for ns in ["trusted", "user"] {
                for n in ["origin", "impure", "nlink"] {
                    let name = format!("{ns}.overlay.{n}");
                    let _ = crate::sys::removexattr(
                        crate::sys::XTarget::Fd(f.as_fd()),
                        std::ffi::OsStr::new(&name),
                    );
                }
            }
        }
        for e in std::fs::read_dir(p)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                redirect |= strip(&e.path())?;
            }
        }
        Ok(redirect)
    }
    if strip(upper)? {
        // A renamed directory's content is partly in the layers below: the layer's
        // directory is unpacked from its tar instead, when it is needed.
        return Ok(());
    }
    let d = std::fs::File::open(upper)?;
    rustix::fs::syncfs(&d)?;
    match std::fs::rename(upper, &dir) {
        Ok(()) => {}
        // Another build unpacked the same layer meanwhile: keep theirs.
        Err(_) if dir.exists() => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("moving the layer into {}", dir.display())),
    }
    std::fs::File::open(store.root().join("layers"))?.sync_all()?;
    Ok(())
}

/// Run `f` with stdout and stderr sent to /dev/null when quiet (the RUN output).
fn run_quiet<T>(quiet: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !quiet {
        return f();
    }
    let saved = crate::sys::silence_stdio()?;
    let r = f();
    crate::sys::restore_stdio(saved);
    r
}

/// Drop an `etc` the runtime created in the upper only to hold mount-point stubs.
fn drop_fresh(upper: &Path) {
    if let Ok(d) = std::fs::File::open(upper) {
        use std::os::fd::AsFd;
        let etc = upper.join("etc");
        let opaque = ["trusted.overlay.opaque", "user.overlay.opaque"]
            .iter()
            .any(|n| xattr_present(&etc, n));
        if !opaque {
            crate::runtime::rootfs::remove_empty_beneath(d.as_fd(), Path::new("etc"));
        }
    }
}

fn xattr_present(p: &Path, name: &str) -> bool {
    std::fs::File::open(p).is_ok_and(|f| {
        use std::os::fd::AsFd;
        crate::sys::getxattr(crate::sys::XTarget::Fd(f.as_fd()), std::ffi::OsStr::new(name)).is_ok()
    })
}

/// `/a/./b/../c` -> `/a/c`.
fn clean_abs(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    format!("/{}", out.join("/"))
}

/// Go duration (`30s`, `1m30s`, `500ms`) in nanoseconds.
fn parse_duration(s: &str) -> Option<u64> {
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..u] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += num * mult;
        rest = &rest[u..];
    }
    Some(total as u64)
}

fn flat(m: &BTreeMap<String, Option<String>>) -> BTreeMap<String, String> {
    m.iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds that must fail before anything is mounted.
    struct NoMount;
    impl Mounter for NoMount {
        fn mount(
            &self,
            _: Vec<PathBuf>,
            _: Option<(&Path, &Path)>,
            m: &Path,
        ) -> Result<Box<dyn std::any::Any>> {
            panic!("mounted {}", m.display())
        }
        fn unmount(&self, _: &Path) -> Result<()> {
            Ok(())
        }
    }

    fn try_build(ctx: Option<PathBuf>, dockerfile: &str, target: Option<&str>) -> anyhow::Error {
        let root = std::env::temp_dir().join(format!(
            "strata-build-unit-{}-{}",
            std::process::id(),
            sha(dockerfile)
        ));
        let o = Options {
            context: ctx,
            dockerfile: dockerfile.into(),
            dockerfile_name: "Dockerfile".into(),
            tags: vec![],
            build_args: BTreeMap::new(),
            target: target.map(String::from),
            no_cache: true,
            pull: false,
            network_host: false,
            labels: vec![],
            quiet: true,
            squash: false,
            compress: Compression::default(),
            registry: Default::default(),
        };
        let e = build(&root, &o, &NoMount).expect_err("the build should fail");
        let _ = std::fs::remove_dir_all(&root);
        e
    }

    #[test]
    fn typed_errors() {
        let e = try_build(None, "RUN true\n", None);
        assert!(
            matches!(BuildError::cause_of(&e), Some(BuildError::Syntax { line: 1, .. })),
            "{e:#}"
        );
        let e = try_build(None, "FROM scratch AS a\nLABEL x=1\n", Some("nope"));
        assert!(
            matches!(BuildError::cause_of(&e), Some(BuildError::NoStage { name, .. }) if name == "nope"),
            "{e:#}"
        );
        assert_eq!(
            format!("{e:#}"),
            "--target 'nope': no stage of that name in Dockerfile"
        );
        let e = try_build(None, "FROM scratch\nRUN --bogus true\n", None);
        assert!(
            matches!(BuildError::cause_of(&e), Some(BuildError::Invalid(_))),
            "{e:#}"
        );
        assert!(
            matches!(
                e.downcast_ref::<BuildError>(),
                Some(BuildError::At { line: 2, .. })
            ),
            "{e:#}"
        );
        assert_eq!(
            format!("{e:#}"),
            "Dockerfile:2: RUN --bogus true: unknown flag --bogus"
        );
        let ctx = std::env::temp_dir().join(format!("strata-build-unit-ctx-{}", std::process::id()));
        std::fs::create_dir_all(&ctx).unwrap();
        for (src, want) in [
            ("../x", "outside"),
            ("nothere", "notfound"),
            ("*.none", "nomatch"),
        ] {
            let e = try_build(Some(ctx.clone()), &format!("FROM scratch\nCOPY {src} /\n"), None);
            let got = match BuildError::cause_of(&e) {
                Some(BuildError::OutsideContext(_)) => "outside",
                Some(BuildError::SourceNotFound(_)) => "notfound",
                Some(BuildError::NoMatch(_)) => "nomatch",
                _ => "other",
            };
            assert_eq!(got, want, "COPY {src}: {e:#}");
            assert!(format!("{e:#}").starts_with("Dockerfile:2: COPY "), "{e:#}");
        }
        let e = try_build(None, "FROM scratch\nCOPY a /\n", None);
        assert!(
            matches!(BuildError::cause_of(&e), Some(BuildError::NoContext(_))),
            "{e:#}"
        );
        let _ = std::fs::remove_dir_all(&ctx);
    }

    #[test]
    fn durations_and_paths() {
        assert_eq!(parse_duration("30s"), Some(30_000_000_000));
        assert_eq!(parse_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(clean_abs("/a/./b/../c/"), "/a/c");
        assert_eq!(clean_abs("/../x"), "/x");
    }
}
