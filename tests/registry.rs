//! Registries: `strata pull`, `push`, `login`, `logout` against a real
//! distribution registry (`docker-registry`) started on a free loopback port,
//! plain HTTP and anonymous, or TLS (a test CA through `--cert-dir`) with
//! htpasswd basic auth; a bearer-token server and fault injection (corrupt,
//! truncated, oversize, slow and failing blob responses) through a proxy
//! written in the test (registry_common). Interop: images made by hand and
//! pushed with skopeo, or imported and pushed by a private dockerd, are
//! pulled and run by strata; images pushed by strata are read by skopeo,
//! umoci and docker with the same digests.
//!
//! Every test owns its store, and HOME / XDG_RUNTIME_DIR of every strata
//! command are temp dirs, so auth files never touch the machine. The
//! `harness_*` tests check the infrastructure itself (no strata registry verb).
//! Missing tools are a failure: run scripts/install-deps.

mod common;
mod image_common;
mod registry_common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{require_fuse, run_cmd, sha256_hex, CmdOutput, TestEnv};
use image_common::{
    docker_or_skip, inspect_config, inspect_diff_ids, inspect_id, must, require_tool, run_with_stdin,
    tar_dir, tar_member, tree, Store, CMD_TIMEOUT,
};
use registry_common::*;

const USER: &str = "strata-tester";
const PASS: &str = "S3cret-Pass-71b4e";
const WRONG: &str = "Wr0ng-Pass-93c2a";

/// Blobs larger than this are the tampering targets: the busybox and noise
/// layers of test_image(), never its config or small layer.
const BIG: usize = 100_000;

fn s(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------
// The strata client of a test.

/// strata with its own store, HOME and XDG_RUNTIME_DIR (so auth.json and
/// ~/.docker/config.json are the test's), and diagnostics of the servers in
/// play printed when a command does not do what was expected.
struct Client {
    store: Store,
    home: PathBuf,
    xdg: PathBuf,
    inputs: PathBuf,
    diags: RefCell<Vec<Diag>>,
}

impl Client {
    /// A client with a store `<env>/<name>` and fresh HOME / XDG_RUNTIME_DIR.
    fn new(env: &TestEnv, name: &str) -> Client {
        let home = env.dir(&format!("{name}-home"));
        let xdg = env.dir(&format!("{name}-run"));
        fs::set_permissions(&xdg, fs::Permissions::from_mode(0o700)).unwrap();
        Client {
            store: Store::in_env(env, name),
            home,
            xdg,
            inputs: env.dir(&format!("{name}-inputs")),
            diags: RefCell::new(Vec::new()),
        }
    }

    /// Another store, sharing this client's HOME and XDG_RUNTIME_DIR (its logins).
    fn with_store(&self, env: &TestEnv, name: &str) -> Client {
        Client {
            store: Store::in_env(env, name),
            home: self.home.clone(),
            xdg: self.xdg.clone(),
            inputs: env.dir(&format!("{name}-inputs")),
            diags: RefCell::new(Vec::new()),
        }
    }

    /// Print `d` with every failure of this client.
    fn watch(&self, d: Diag) {
        self.diags.borrow_mut().push(d);
    }

    fn diagnostics(&self) -> String {
        self.diags
            .borrow()
            .iter()
            .map(|d| d())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn auth_file(&self) -> PathBuf {
        self.xdg.join("containers/auth.json")
    }

    fn cmd(&self) -> Command {
        let mut c = self.store.cmd();
        c.env("HOME", &self.home).env("XDG_RUNTIME_DIR", &self.xdg);
        for v in [
            "REGISTRY_AUTH_FILE",
            "DOCKER_CONFIG",
            "RUST_LOG",
            "STRATA_REGISTRY_TIMEOUT",
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
        ] {
            c.env_remove(v);
        }
        c
    }

    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
        let mut c = self.cmd();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        run_cmd(&mut c, CMD_TIMEOUT)
    }

    fn run(&self, args: &[&str]) -> CmdOutput {
        self.run_env(args, &[])
    }

    /// Run with `input` on standard input (e.g. --password-stdin).
    fn run_stdin(&self, args: &[&str], input: &str, env: &[(&str, &str)]) -> CmdOutput {
        let f = self.inputs.join("stdin");
        fs::write(&f, input).unwrap();
        let mut c = self.cmd();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = run_with_stdin(&mut c, &f, CMD_TIMEOUT);
        fs::remove_file(&f).unwrap();
        out
    }

    fn check(&self, out: CmdOutput, args: &[&str], want_ok: bool) -> CmdOutput {
        if out.ok() != want_ok || out.timed_out {
            panic!(
                "`strata {}` {}: {out}\n{}",
                args.join(" "),
                if want_ok {
                    "failed"
                } else {
                    "succeeded, expected a failure"
                },
                self.diagnostics()
            );
        }
        out
    }

    fn ok(&self, args: &[&str]) -> CmdOutput {
        let out = self.run(args);
        self.check(out, args, true)
    }

    fn ok_env(&self, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
        let out = self.run_env(args, env);
        self.check(out, args, true)
    }

    /// Run and require a failure (non-zero exit, not a hang).
    fn fails(&self, args: &[&str]) -> CmdOutput {
        let out = self.run(args);
        self.check(out, args, false)
    }

    fn fails_env(&self, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
        let out = self.run_env(args, env);
        self.check(out, args, false)
    }

    /// `strata login -u USER --password-stdin [extra...] REGISTRY`.
    fn login(
        &self,
        registry: &str,
        user: &str,
        pass: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> CmdOutput {
        let mut args = vec!["login", "-u", user, "--password-stdin"];
        args.extend_from_slice(extra);
        args.push(registry);
        self.run_stdin(&args, pass, env)
    }

    /// All tags of all images in the store.
    fn tags(&self) -> Vec<String> {
        self.store.images().into_iter().flat_map(|(_, t)| t).collect()
    }

    /// `reference` is neither listed by `images` nor resolvable by `inspect`.
    fn assert_absent(&self, reference: &str, ctx: &str) {
        let (repo, _) = split_repo_ref(reference);
        let tags = self.tags();
        assert!(
            !tags.iter().any(|t| t.starts_with(repo)),
            "{ctx}: `strata images` lists {repo}: {tags:?}"
        );
        let out = self.run(&["inspect", reference]);
        assert!(!out.ok(), "{ctx}: `strata inspect {reference}` resolves: {out}");
    }

    /// Every file in STORE/blobs/sha256 holds the bytes its name is the
    /// digest of (no partial or corrupt blob); returns their digests.
    fn valid_blobs(&self, ctx: &str) -> BTreeSet<String> {
        let dir = self.store.root.join("blobs/sha256");
        let mut out = BTreeSet::new();
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let data = fs::read(e.path()).unwrap();
            let got = sha256_hex(&data);
            assert_eq!(
                got,
                name,
                "{ctx}: STORE/blobs/sha256/{name} holds {} bytes of sha256:{got} (partial or corrupt blob kept)",
                data.len()
            );
            out.insert(format!("sha256:{name}"));
        }
        out
    }

    /// Nothing is left in STORE/tmp nor in strata's TMPDIR.
    fn assert_no_temp_files(&self, ctx: &str) {
        for d in [self.store.root.join("tmp"), self.store.tmp.clone()] {
            let left: Vec<String> = fs::read_dir(&d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert!(left.is_empty(), "{ctx}: files left in {}: {left:?}", d.display());
        }
    }

    /// `strata export IMAGE` and read one member.
    fn exported_file(&self, image: &str, member: &str) -> Vec<u8> {
        let tar = self.inputs.join("export.tar");
        self.ok(&["export", "-o", &s(&tar), image]);
        let data =
            tar_member(&tar, member).unwrap_or_else(|| panic!("{member} not in `strata export {image}`"));
        fs::remove_file(&tar).unwrap();
        data
    }
}

impl Drop for Client {
    /// Lazily unmount whatever a failed `run` left under the store.
    fn drop(&mut self) {
        let root = s(&self.store.root);
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut mine: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&root))
            .collect();
        mine.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mine {
            let _ = run_cmd(Command::new("umount").arg("-l").arg(m), Duration::from_secs(20));
        }
    }
}

// ---------------------------------------------------------------------------
// Output formats.

fn lines(out: &CmdOutput) -> Vec<&str> {
    out.stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

fn is_digest(d: &str) -> bool {
    d.len() == 71
        && d.starts_with("sha256:")
        && d[7..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Check `strata pull` output (docker's last lines: `Digest: ...`, `Status:
/// Downloaded newer image for REF` or `Status: Image is up to date for REF`,
/// then REF) and return the digest.
fn pulled(out: &CmdOutput, full: &str, fresh: bool) -> String {
    let l = lines(out);
    assert!(l.len() >= 3, "pull output too short: {out}");
    let n = l.len();
    assert_eq!(
        l[n - 1],
        full,
        "last line of pull output is not the full reference: {out}"
    );
    let want = if fresh {
        format!("Status: Downloaded newer image for {full}")
    } else {
        format!("Status: Image is up to date for {full}")
    };
    assert_eq!(l[n - 2], want, "pull status line: {out}");
    let d = l[n - 3]
        .strip_prefix("Digest: ")
        .unwrap_or_else(|| panic!("no `Digest: ` line before the status line: {out}"));
    assert!(is_digest(d), "bad digest {d:?} in pull output: {out}");
    d.to_string()
}

/// Parse `strata push` output's last line `TAG: digest: sha256:HEX size: N`.
fn pushed(out: &CmdOutput, tag: &str) -> (String, usize) {
    let l = lines(out);
    let last = l.last().copied().unwrap_or_default();
    let rest = last
        .strip_prefix(&format!("{tag}: digest: "))
        .unwrap_or_else(|| panic!("push output does not end with `{tag}: digest: ...`: {out}"));
    let (d, size) = rest
        .split_once(" size: ")
        .unwrap_or_else(|| panic!("no ` size: ` in the push line: {out}"));
    assert!(is_digest(d), "bad digest {d:?} in push output: {out}");
    (
        d.to_string(),
        size.parse().unwrap_or_else(|_| panic!("bad size in {out}")),
    )
}

fn lower(out: &CmdOutput) -> String {
    format!("{}\n{}", out.stdout, out.stderr).to_lowercase()
}

/// The output says something about authentication being refused.
fn says_unauthorized(out: &CmdOutput) -> bool {
    let t = lower(out);
    [
        "unauthorized",
        "authentication",
        "credentials",
        "password",
        "denied",
        "401",
    ]
    .iter()
    .any(|w| t.contains(w))
}

/// Neither `secrets` (nor the base64 of USER:secret) appear in any output.
fn assert_no_secrets(outs: &[&CmdOutput], secrets: &[String]) {
    for o in outs {
        for sec in secrets {
            let b64 = base64_encode(format!("{USER}:{sec}").as_bytes());
            for (what, text) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
                assert!(
                    !text.contains(sec.as_str()) && !text.contains(&b64),
                    "a secret ({}...) appears in strata's {what}:\n{text}",
                    &sec[..4]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Fixtures.

/// A flat busybox tar imported as `name` (with CMD) into the client's store.
fn import_local(env: &TestEnv, c: &Client, name: &str) -> PathBuf {
    let rootfs = env.path().join("local-rootfs");
    if !rootfs.exists() {
        image_common::busybox_rootfs(&rootfs);
    }
    let tar = env.path().join("local.tar");
    if !tar.exists() {
        tar_dir(&rootfs, &tar);
    }
    c.ok(&["import", &s(&tar), name, "-c", "CMD [\"/bin/sh\"]"]);
    rootfs
}

/// test_image() in a layout under `env`, pushed with skopeo as `dest`.
fn push_test_image(env: &TestEnv, reg: &Registry, dest: &str) -> BuiltImage {
    let layout = OciLayout::create(
        &env.path()
            .join(format!("layout-{}", dest.replace(['/', ':'], "-"))),
    );
    let img = test_image(&layout, env.path(), "v1");
    let d = reg.push_layout(&env.dir("skopeo-tmp"), &layout.dir, "v1", dest, false);
    assert_eq!(
        d, img.manifest_digest,
        "skopeo changed the manifest while pushing {dest}"
    );
    img
}

fn assert_is_test_image(c: &Client, full: &str, img: &BuiltImage) {
    let v = c.store.inspect(full);
    assert_eq!(
        inspect_id(&v),
        img.config_digest,
        "image Id of {full} is not its config digest"
    );
    assert_eq!(inspect_diff_ids(&v), img.diff_ids, "diff_ids of {full}");
    assert_eq!(
        c.exported_file(full, "srv/msg"),
        TEST_MESSAGE.as_bytes(),
        "/srv/msg of {full}"
    );
}

// ---------------------------------------------------------------------------
// Harness self-tests.

/// The registry starts, skopeo pushes through the Pass proxy with the
/// manifest kept, the proxy counts, and each fault mode does what it says.
#[test]
fn harness_registry_proxy_and_fault_modes() {
    let env = TestEnv::new("reg-harness");
    let tmp = env.dir("skopeo-tmp");
    let reg = Registry::plain();
    let px = Proxy::front(&reg, Mode::Pass);
    let layout = OciLayout::create(&env.path().join("layout"));
    let img = test_image(&layout, env.path(), "v1");
    assert_eq!(img.layers.len(), 3);
    let (big, big_size) = img.largest_layer();
    assert!(big_size > 1_000_000, "noise layer too small: {big_size}");

    // skopeo -> proxy -> registry.
    let dst = format!("docker://{}/harness/img:v1", px.addr());
    skopeo(
        &tmp,
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", s(&layout.dir)),
            &dst,
        ],
    );
    assert_eq!(
        reg.manifest_digest("harness/img", "v1").as_deref(),
        Some(img.manifest_digest.as_str())
    );
    assert!(px.upload_bytes() >= big_size, "{}", px.summary());
    assert_eq!(px.count("PUT", Kind::Manifest), 1, "{}", px.summary());
    let raw = reg.manifest("harness/img", "v1");
    assert_eq!(format!("sha256:{}", sha256_hex(&raw)), img.manifest_digest);

    // skopeo reads it back through the proxy: one GET per blob.
    px.clear();
    let back = env.path().join("back");
    skopeo(
        &tmp,
        &[
            "copy",
            "--src-tls-verify=false",
            &dst,
            &format!("oci:{}:x", s(&back)),
        ],
    );
    let mut got = px.blob_gets();
    got.sort();
    let mut want = img.blobs();
    want.sort();
    assert_eq!(got, want, "{}", px.summary());

    let path = format!("/v2/harness/img/blobs/{big}");
    let get = |range: Option<&str>| {
        let h: Vec<(&str, &str)> = range.map(|r| vec![("Range", r)]).unwrap_or_default();
        http_request(&px.addr(), "GET", &path, &h, b"")
    };
    let good = get(None).unwrap();
    assert_eq!(good.status, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&good.body)), big);

    px.set_mode(Mode::CorruptBlob {
        min_size: BIG,
        times: 1,
    });
    let bad = get(None).unwrap();
    assert_eq!(bad.body.len(), big_size, "corruption keeps the length");
    assert_ne!(
        format!("sha256:{}", sha256_hex(&bad.body)),
        big,
        "corrupt mode did not corrupt"
    );
    assert_eq!(
        get(None).unwrap().body,
        good.body,
        "corrupt mode with times=1 corrupted twice"
    );

    px.set_mode(Mode::DropHalfway {
        min_size: BIG,
        times: 1,
    });
    let cut = get(None);
    assert!(
        cut.is_err(),
        "drop-halfway response parsed whole: {:?}",
        cut.map(|r| r.body.len())
    );
    let ranged = get(Some("bytes=1000-")).unwrap();
    assert_eq!(ranged.status, 206, "registry answers a Range request with 206");
    assert_eq!(ranged.body, good.body[1000..], "ranged body");

    px.set_mode(Mode::Oversize {
        min_size: BIG,
        extra: 10,
        times: 1,
    });
    assert_eq!(get(None).unwrap().body.len(), big_size + 10);

    px.set_mode(Mode::ErrorStatus {
        status: 503,
        times: 1,
    });
    assert_eq!(get(None).unwrap().status, 503);
    assert_eq!(get(None).unwrap().status, 200);

    px.set_mode(Mode::Slow {
        per_64k: Duration::from_millis(10),
    });
    let t0 = Instant::now();
    assert_eq!(get(None).unwrap().body, good.body);
    let pieces = big_size.div_ceil(64 * 1024) as u32;
    assert!(
        t0.elapsed() >= Duration::from_millis(10) * pieces,
        "slow mode was not slow"
    );

    // A blob whose data was removed from the storage: the registry says 404.
    px.set_mode(Mode::Pass);
    let data = reg.blob_data_path(&big);
    assert!(data.exists(), "{} missing", data.display());
    fs::remove_file(&data).unwrap();
    let gone = get(None).unwrap();
    assert_eq!(
        gone.status,
        404,
        "GET of a blob without data: {} {}",
        gone.status,
        gone.text()
    );
    assert_eq!(
        reg.manifest_digest("harness/img", "v1").as_deref(),
        Some(img.manifest_digest.as_str()),
        "the manifest still resolves"
    );

    // A multi-arch index pushed with skopeo --all keeps its digest.
    let ml = OciLayout::create(&env.path().join("multi"));
    let (idx, amd, arm) = multiarch_index(&ml, "m");
    let d = reg.push_layout(&tmp, &ml.dir, "m", "harness/multi:1", true);
    assert_eq!(d, idx);
    let v: Value = serde_json::from_slice(&reg.manifest("harness/multi", "1")).unwrap();
    assert_eq!(v["mediaType"], OCI_INDEX);
    let archs: Vec<&str> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    for i in [&amd, &arm] {
        assert_eq!(
            reg.manifest_digest("harness/multi", &i.manifest_digest)
                .as_deref(),
            Some(i.manifest_digest.as_str())
        );
    }
    drop(px);
    let mut reg = reg;
    reg.stop();
    assert!(!reg.is_running());
}

/// The bearer proxy: challenge, token endpoint (basic, anonymous, wrong
/// password), scope checks, and skopeo speaking the whole flow through it.
#[test]
fn harness_bearer_proxy_token_flow() {
    let env = TestEnv::new("reg-harness-bearer");
    let tmp = env.dir("skopeo-tmp");
    let reg = Registry::plain();
    let px = Proxy::front(
        &reg,
        Mode::Bearer {
            user: USER.into(),
            pass: PASS.into(),
        },
    );
    let a = px.addr();
    let r = http_request(&a, "GET", "/v2/", &[], b"").unwrap();
    assert_eq!(r.status, 401);
    let chal = r.header("www-authenticate").unwrap().to_string();
    assert_eq!(
        chal,
        format!("Bearer realm=\"http://{a}/token\",service=\"{TOKEN_SERVICE}\"")
    );
    let r = http_request(&a, "HEAD", "/v2/x/y/manifests/1", &[], b"").unwrap();
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .ends_with(",scope=\"repository:x/y:pull\""),
        "{:?}",
        r.headers
    );
    let r = http_request(&a, "POST", "/v2/x/y/blobs/uploads/", &[], b"").unwrap();
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .ends_with(",scope=\"repository:x/y:pull,push\""));

    let basic = |u: &str, p: &str| format!("Basic {}", base64_encode(format!("{u}:{p}").as_bytes()));
    let q = "/token?service=strata-test&scope=repository%3Ax%2Fy%3Apull%2Cpush";
    let wrong = http_request(&a, "GET", q, &[("Authorization", &basic(USER, WRONG))], b"").unwrap();
    assert_eq!(wrong.status, 401);
    let anon: Value = serde_json::from_slice(&http_request(&a, "GET", q, &[], b"").unwrap().body).unwrap();
    let good: Value = serde_json::from_slice(
        &http_request(&a, "GET", q, &[("Authorization", &basic(USER, PASS))], b"")
            .unwrap()
            .body,
    )
    .unwrap();
    let log = px.token_log();
    assert_eq!(log.len(), 3);
    assert_eq!(log[1].granted, ["repository:x/y:pull"], "anonymous: pull only");
    assert_eq!(log[2].granted, ["repository:x/y:pull,push"]);
    assert_eq!(log[2].service.as_deref(), Some(TOKEN_SERVICE));
    let bearer = |v: &Value| format!("Bearer {}", v["token"].as_str().unwrap());
    assert_eq!(good["token"], good["access_token"]);
    let r = http_request(&a, "GET", "/v2/", &[("Authorization", &bearer(&anon))], b"").unwrap();
    assert_eq!(r.status, 200, "any valid token opens /v2/");
    let r = http_request(
        &a,
        "POST",
        "/v2/x/y/blobs/uploads/",
        &[("Authorization", &bearer(&anon))],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 401, "anonymous token pushes");
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("insufficient_scope"));
    let r = http_request(
        &a,
        "POST",
        "/v2/x/y/blobs/uploads/",
        &[("Authorization", &bearer(&good))],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 202, "push token cannot start an upload: {}", r.text());
    let loc = r.header("location").unwrap();
    assert!(
        loc.contains(&a) || loc.starts_with("/v2/"),
        "Location does not lead back to the proxy: {loc}"
    );
    let r = http_request(
        &a,
        "GET",
        "/v2/other/repo/tags/list",
        &[("Authorization", &bearer(&good))],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 401, "token for x/y opens other/repo");

    // skopeo through the whole flow: push with credentials, anonymous read.
    let layout = OciLayout::create(&env.path().join("layout"));
    let (idx, amd, _) = multiarch_index(&layout, "m");
    px.clear();
    skopeo(
        &tmp,
        &[
            "copy",
            "--all",
            "--dest-tls-verify=false",
            &format!("--dest-creds={USER}:{PASS}"),
            &format!("oci:{}:m", s(&layout.dir)),
            &format!("docker://{a}/bearer/multi:1"),
        ],
    );
    assert!(px.token_requests() >= 1, "{}", px.summary());
    assert_eq!(
        reg.manifest_digest("bearer/multi", "1").as_deref(),
        Some(idx.as_str())
    );
    let out = skopeo(
        &tmp,
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{a}/bearer/multi:1"),
        ],
    );
    assert_eq!(format!("sha256:{}", sha256_hex(out.stdout.as_bytes())), idx);
    let denied = skopeo_run(
        &tmp,
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:m", s(&layout.dir)),
            &format!("docker://{a}/bearer/anon:1"),
        ],
    );
    assert!(
        !denied.ok(),
        "anonymous push through the bearer proxy succeeded: {denied}"
    );

    // Cross-repository mount: honoured only when the token may pull `from`.
    let layer = &amd.layers[0].0;
    let mount = format!("/v2/x/y/blobs/uploads/?mount={layer}&from=bearer%2Fmulti");
    let r = http_request(&a, "POST", &mount, &[("Authorization", &bearer(&good))], b"").unwrap();
    assert_eq!(r.status, 202, "mount without pull on the source: {}", r.text());
    let q2 = "/token?service=strata-test&scope=repository%3Ax%2Fy%3Apull%2Cpush&scope=repository%3Abearer%2Fmulti%3Apull";
    let both: Value = serde_json::from_slice(
        &http_request(&a, "GET", q2, &[("Authorization", &basic(USER, PASS))], b"")
            .unwrap()
            .body,
    )
    .unwrap();
    let r = http_request(&a, "POST", &mount, &[("Authorization", &bearer(&both))], b"").unwrap();
    assert_eq!(r.status, 201, "mount with pull on the source: {}", r.text());
}

/// TLS + htpasswd registry: the certificate verifies with the test CA (and
/// only with it), basic auth is enforced, skopeo pushes with cert-dir + creds.
#[test]
fn harness_tls_basic_registry() {
    let env = TestEnv::new("reg-harness-tls");
    let reg = Registry::tls_basic(USER, PASS);
    let code = |c: &mut Command| {
        run_cmd(
            c.args(["-o", "/dev/null", "-w", "%{http_code}"]),
            Duration::from_secs(30),
        )
    };
    let anon = code(reg.curl_cmd(false).arg(reg.url("/v2/")));
    assert_eq!(anon.stdout.trim(), "401", "{anon}");
    let authed = code(reg.curl_cmd(true).arg(reg.url("/v2/")));
    assert_eq!(authed.stdout.trim(), "200", "{authed}");
    let wrong = code(
        reg.curl_cmd(false)
            .args(["-u", &format!("{USER}:{WRONG}")])
            .arg(reg.url("/v2/")),
    );
    assert_eq!(wrong.stdout.trim(), "401", "{wrong}");
    let local = code(
        reg.curl_cmd(true)
            .arg(format!("https://localhost:{}/v2/", reg.port())),
    );
    assert_eq!(
        local.stdout.trim(),
        "200",
        "certificate for DNS:localhost: {local}"
    );
    let untrusted = run_cmd(
        Command::new(require_tool("curl"))
            .args(["-sS", "--noproxy", "*"])
            .arg(reg.url("/v2/")),
        Duration::from_secs(30),
    );
    assert!(
        !untrusted.ok(),
        "curl trusts the test CA without --cacert: {untrusted}"
    );
    let text = must(
        Command::new(require_tool("openssl"))
            .args(["x509", "-noout", "-text", "-in"])
            .arg(reg.certs().unwrap().dir.join("server.crt")),
        "openssl x509 -text",
    );
    assert!(
        text.stdout.contains("IP Address:127.0.0.1") && text.stdout.contains("DNS:localhost"),
        "{}",
        text.stdout
    );
    assert!(reg.cert_dir().join("ca.crt").exists());
    let img = push_test_image(&env, &reg, "secure/img:v1");
    assert_eq!(reg.tags("secure/img"), ["v1"]);
    assert!(
        reg.log_tail(50).contains("secure/img"),
        "registry log does not show the push"
    );
    let _ = img;
}

/// Closed port: refused at once; blackhole: connects, then nothing.
#[test]
fn harness_blackhole_and_closed_port() {
    let bh = Blackhole::start();
    let t0 = Instant::now();
    let out = run_cmd(
        Command::new(require_tool("curl"))
            .args(["-sS", "--max-time", "2", "--noproxy", "*"])
            .arg(format!("http://{}/v2/", bh.addr())),
        Duration::from_secs(30),
    );
    assert!(
        !out.ok() && t0.elapsed() >= Duration::from_secs(2),
        "blackhole answered: {out}"
    );
    assert_eq!(bh.accepted(), 1);
    let closed = closed_addr();
    let t0 = Instant::now();
    let r = http_request(&closed, "GET", "/v2/", &[], b"");
    assert!(
        r.is_err() && t0.elapsed() < Duration::from_secs(2),
        "closed port answered"
    );
}

/// The private dockerd pulls from and pushes to a plain loopback registry.
#[test]
fn harness_dockerd_and_registry() {
    let env = TestEnv::new("reg-harness-docker");
    let reg = Registry::plain();
    let img = push_test_image(&env, &reg, "harness/docker:v1");
    let Some(dk) = docker_or_skip() else { return };
    let r = format!("{}/harness/docker:v1", reg.addr());
    dk.ok(&["pull", &r]);
    let v: Value = serde_json::from_str(&dk.ok(&["image", "inspect", &r]).stdout).unwrap();
    assert_eq!(v[0]["Id"].as_str(), Some(img.config_digest.as_str()));
    let digests = v[0]["RepoDigests"].to_string();
    assert!(digests.contains(&img.manifest_digest), "{digests}");
    let again = format!("{}/harness/from-docker:1", reg.addr());
    dk.ok(&["tag", &r, &again]);
    let out = dk.ok(&["push", &again]);
    assert!(out.stdout.contains("digest: sha256:"), "{out}");
    assert_eq!(reg.tags("harness/from-docker"), ["1"]);
}

// ---------------------------------------------------------------------------
// Plain anonymous registry.

/// skopeo pushes a 3-layer image; strata pulls it (through a counting proxy),
/// lists it under its full name, runs it, pulls it again without fetching a
/// blob, and pulls it by digest.
#[test]
fn pull_skopeo_pushed_image_and_run_it() {
    require_fuse();
    let env = TestEnv::new("reg-pull");
    let c = Client::new(&env, "store");
    let reg = Registry::plain();
    let px = Proxy::front(&reg, Mode::Pass);
    c.watch(reg.diag());
    c.watch(px.diag());
    let img = push_test_image(&env, &reg, "test/busybox:v1");
    let full = format!("{}/test/busybox:v1", px.addr());

    let out = c.ok(&["pull", &full]);
    assert_eq!(
        pulled(&out, &full, true),
        img.manifest_digest,
        "pulled digest: {out}"
    );
    let mut gets = px.blob_gets();
    gets.sort();
    let mut want = img.blobs();
    want.sort();
    assert_eq!(gets, want, "a clean pull GETs each blob once\n{}", px.summary());
    assert_is_test_image(&c, &full, &img);
    let tags = c.tags();
    assert!(
        tags.contains(&full),
        "`strata images` does not list {full}: {tags:?}"
    );
    let text = c.store.images_text();
    assert!(
        text.contains(&format!("{}/test/busybox", px.addr())),
        "images:\n{text}"
    );
    let blobs = c.valid_blobs("after pull");
    for b in img.blobs() {
        assert!(blobs.contains(&b), "blob {b} not in STORE/blobs");
    }
    c.assert_no_temp_files("after pull");

    let out = c.ok(&["run", "--rm", &full, "/bin/sh", "-c", "cat /srv/msg"]);
    assert_eq!(out.stdout, TEST_MESSAGE, "run of the pulled image");
    let out = c.ok(&["run", "--rm", &full]);
    assert_eq!(out.stdout, TEST_MESSAGE, "run with the pulled image's CMD");

    // Everything present: no blob fetched, same digest, "up to date".
    px.clear();
    let t0 = Instant::now();
    let out = c.ok(&["pull", &full]);
    let second = t0.elapsed();
    assert_eq!(pulled(&out, &full, false), img.manifest_digest);
    assert_eq!(
        px.count("GET", Kind::Blob),
        0,
        "second pull fetched blobs\n{}",
        px.summary()
    );
    assert!(
        px.count("*", Kind::Manifest) <= 2,
        "second pull: {}",
        px.summary()
    );
    eprintln!("INFO: second pull of {full} took {second:?}");

    let out = c.ok(&["pull", "-q", &full]);
    assert_eq!(out.stdout.trim(), full, "pull -q prints only the reference");

    // By digest, into a fresh store.
    let c2 = Client::new(&env, "store2");
    c2.watch(reg.diag());
    let by_digest = format!("{}/test/busybox@{}", reg.addr(), img.manifest_digest);
    let out = c2.ok(&["pull", &by_digest]);
    assert_eq!(pulled(&out, &by_digest, true), img.manifest_digest);
    assert_eq!(c2.store.image_id(&by_digest), img.config_digest);
    assert_eq!(inspect_diff_ids(&c2.store.inspect(&by_digest)), img.diff_ids);
    // A wrong digest is refused.
    let wrong = format!("{}/test/busybox@sha256:{}", reg.addr(), "0".repeat(64));
    let out = c2.fails(&["pull", &wrong]);
    assert!(
        out.stderr.contains("test/busybox"),
        "error does not name the reference: {out}"
    );
}

/// docker imports and pushes a (docker schema2) image; strata pulls it with
/// docker's digest and image Id, and runs it.
#[test]
fn pull_docker_pushed_image() {
    require_fuse();
    let env = TestEnv::new("reg-docker-push");
    let c = Client::new(&env, "store");
    let reg = Registry::plain();
    c.watch(reg.diag());
    let tar = env.path().join("bb.tar");
    fs::write(&tar, busybox_tar(env.path())).unwrap();
    let Some(dk) = docker_or_skip() else { return };
    let full = format!("{}/from-docker/bb:1", reg.addr());
    dk.ok(&[
        "import",
        "-c",
        "CMD [\"/bin/cat\", \"/etc/hello\"]",
        &s(&tar),
        &full,
    ]);
    let out = dk.ok(&["push", &full]);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("1: digest: "))
        .unwrap_or_else(|| panic!("no digest line in docker push output: {out}"))
        .to_string();
    let (dd, _) = pushed(
        &CmdOutput {
            status: Some(0),
            stdout: line,
            stderr: String::new(),
            timed_out: false,
        },
        "1",
    );
    let v: Value = serde_json::from_str(&dk.ok(&["image", "inspect", &full]).stdout).unwrap();
    let docker_id = v[0]["Id"].as_str().unwrap().to_string();
    let layers = v[0]["RootFS"]["Layers"].clone();
    let m: Value = serde_json::from_slice(&reg.manifest("from-docker/bb", "1")).unwrap();
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    let out = c.ok(&["pull", &full]);
    assert_eq!(pulled(&out, &full, true), dd, "strata's digest vs docker push's");
    let v = c.store.inspect(&full);
    assert_eq!(inspect_id(&v), docker_id, "image Id vs docker's");
    assert_eq!(
        json!(inspect_diff_ids(&v)),
        layers,
        "diff_ids vs docker's RootFS.Layers"
    );
    let out = c.ok(&["run", "--rm", &full]);
    assert_eq!(out.stdout, "hello\n", "run of the docker-pushed image (its CMD)");
}

/// strata pushes an imported image: the registry, skopeo, umoci and docker
/// read it with strata's digest, config and tree; `push REF` after `tag`
/// gives the same manifest.
#[test]
fn push_is_read_by_skopeo_umoci_and_docker() {
    let env = TestEnv::new("reg-push");
    let c = Client::new(&env, "store");
    let reg = Registry::plain();
    c.watch(reg.diag());
    let rootfs = import_local(&env, &c, "local:1");
    let id = c.store.image_id("local:1");
    let diff_ids = c.store.diff_ids("local:1");

    let dest = format!("{}/pushed/img:v1", reg.addr());
    let out = c.ok(&["push", "local:1", &dest]);
    let (digest, size) = pushed(&out, "v1");
    assert_eq!(
        reg.manifest_digest("pushed/img", "v1").as_deref(),
        Some(digest.as_str())
    );
    let raw = reg.manifest("pushed/img", "v1");
    assert_eq!(raw.len(), size, "pushed size vs the manifest's length");
    assert_eq!(format!("sha256:{}", sha256_hex(&raw)), digest);
    let m: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        m["config"]["digest"].as_str(),
        Some(id.as_str()),
        "manifest config vs image Id"
    );
    assert_eq!(m["layers"].as_array().map(Vec::len), Some(diff_ids.len()));

    let tmp = env.dir("skopeo-tmp");
    let src = format!("docker://{dest}");
    let raw = skopeo(&tmp, &["inspect", "--raw", "--tls-verify=false", &src]);
    assert_eq!(
        format!("sha256:{}", sha256_hex(raw.stdout.as_bytes())),
        digest,
        "skopeo inspect --raw"
    );
    let cfg = skopeo(
        &tmp,
        &["inspect", "--config", "--raw", "--tls-verify=false", &src],
    );
    assert_eq!(
        format!("sha256:{}", sha256_hex(cfg.stdout.as_bytes())),
        id,
        "config bytes per skopeo"
    );
    let cfg: Value = serde_json::from_str(&cfg.stdout).unwrap();
    assert_eq!(cfg["rootfs"]["diff_ids"], json!(diff_ids));
    assert_eq!(cfg["config"]["Cmd"], json!(["/bin/sh"]));

    let layout = env.path().join("oci");
    skopeo(
        &tmp,
        &[
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            &src,
            &format!("oci:{}:t", s(&layout)),
        ],
    );
    let idx: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        idx["manifests"][0]["digest"].as_str(),
        Some(digest.as_str()),
        "skopeo copy --preserve-digests: manifest digest in the layout"
    );
    let bundle = env.path().join("bundle");
    must(
        Command::new(require_tool("umoci")).args([
            "unpack",
            "--image",
            &format!("{}:t", s(&layout)),
            &s(&bundle),
        ]),
        "umoci unpack",
    );
    common::assert_snapshots_eq(
        &tree(&rootfs),
        &tree(&bundle.join("rootfs")),
        "imported rootfs",
        "umoci unpack",
        "strata push -> skopeo copy -> umoci unpack",
    );

    // `tag` then `push REF`: the same manifest under another tag.
    let dest2 = format!("{}/pushed/img:v2", reg.addr());
    c.ok(&["tag", "local:1", &dest2]);
    let out = c.ok(&["push", &dest2]);
    assert_eq!(
        pushed(&out, "v2"),
        (digest.clone(), size),
        "push of the same image under v2"
    );
    let mut tags = reg.tags("pushed/img");
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);

    let Some(dk) = docker_or_skip() else { return };
    dk.ok(&["pull", &dest]);
    let v: Value = serde_json::from_str(&dk.ok(&["image", "inspect", &dest]).stdout).unwrap();
    let repo_digests = v[0]["RepoDigests"].to_string();
    assert!(
        repo_digests.contains(&format!("{}/pushed/img@{digest}", reg.addr())),
        "docker RepoDigests {repo_digests} lack {digest}"
    );
    assert_eq!(v[0]["Id"].as_str(), Some(id.as_str()), "docker image Id");
    assert_eq!(v[0]["RootFS"]["Layers"], json!(diff_ids), "docker RootFS.Layers");
}

/// A second push uploads nothing (HEAD finds every blob); a push to another
/// repository of the same registry mounts the blobs instead of uploading.
#[test]
fn push_skips_present_blobs_and_mounts_across_repositories() {
    let env = TestEnv::new("reg-push-skip");
    let c = Client::new(&env, "store");
    let reg = Registry::plain();
    let px = Proxy::front(&reg, Mode::Pass);
    c.watch(reg.diag());
    c.watch(px.diag());
    import_local(&env, &c, "local:1");
    let a = px.addr();
    let out = c.ok(&["push", "local:1", &format!("{a}/first/img:1")]);
    let (digest, _) = pushed(&out, "1");
    let blob_bytes: usize = c.store.diff_ids("local:1").len();
    assert!(blob_bytes > 0);
    assert!(
        px.upload_bytes() > 0,
        "first push uploaded nothing\n{}",
        px.summary()
    );
    assert_eq!(px.count("PUT", Kind::Manifest), 1, "{}", px.summary());

    px.clear();
    let out = c.ok(&["push", "local:1", &format!("{a}/first/img:2")]);
    assert_eq!(pushed(&out, "2").0, digest);
    assert_eq!(
        px.upload_bytes(),
        0,
        "second push to the same repository uploaded blobs\n{}",
        px.summary()
    );
    assert_eq!(
        px.count("POST", Kind::Upload),
        0,
        "second push started uploads\n{}",
        px.summary()
    );
    assert_eq!(px.count("PUT", Kind::Manifest), 1, "{}", px.summary());

    px.clear();
    let out = c.ok(&["push", "local:1", &format!("{a}/second/img:1")]);
    assert_eq!(pushed(&out, "1").0, digest);
    assert_eq!(
        px.upload_bytes(),
        0,
        "push to another repository of the same registry uploaded blob data instead of mounting\n{}",
        px.summary()
    );
    let mounts = px
        .records()
        .iter()
        .filter(|r| {
            r.method == "POST" && r.kind == Kind::Upload && r.target.contains("mount=") && r.status == 201
        })
        .count();
    assert!(mounts >= 1, "no cross-repository mount\n{}", px.summary());
    assert_eq!(
        reg.manifest_digest("second/img", "1").as_deref(),
        Some(digest.as_str())
    );
}

// ---------------------------------------------------------------------------
// TLS + htpasswd.

#[test]
fn login_push_pull_with_tls_and_basic_auth() {
    let env = TestEnv::new("reg-tls");
    let c = Client::new(&env, "store");
    let reg = Registry::tls_basic(USER, PASS);
    c.watch(reg.diag());
    let addr = reg.addr();
    let cd = s(&reg.cert_dir());
    let img = push_test_image(&env, &reg, "secure/img:v1");
    let full = format!("{addr}/secure/img:v1");
    let mut outputs: Vec<CmdOutput> = Vec::new();

    // Not logged in: a clear authentication error.
    let out = c.fails(&["pull", "--cert-dir", &cd, &full]);
    assert!(says_unauthorized(&out), "pull without login: {out}");
    c.assert_absent(&full, "pull without login");
    outputs.push(out);

    // Wrong password: exit 1, nothing stored.
    let out = c.login(&addr, USER, WRONG, &["--cert-dir", &cd], &[]);
    assert_eq!(out.status, Some(1), "login with a wrong password: {out}");
    assert!(says_unauthorized(&out), "wrong-password message: {out}");
    let stored = fs::read_to_string(c.auth_file()).unwrap_or_default();
    assert!(!stored.contains(&addr), "wrong password stored: {stored}");
    outputs.push(out);

    // No --cert-dir: the certificate is not trusted.
    let out = c.login(&addr, USER, PASS, &[], &[]);
    assert!(!out.ok(), "login trusted the test CA without --cert-dir: {out}");
    let t = lower(&out);
    assert!(
        t.contains("certificate") || t.contains("x509") || t.contains("unknownissuer"),
        "no certificate error: {out}"
    );
    assert!(
        out.stderr.contains("127.0.0.1"),
        "certificate error does not name the host: {out}"
    );
    outputs.push(out);

    // The right password.
    let out = c.login(&addr, USER, PASS, &["--cert-dir", &cd], &[("RUST_LOG", "trace")]);
    assert!(out.ok(), "login: {out}\n{}", c.diagnostics());
    assert!(out.stdout.contains("Login Succeeded"), "{out}");
    outputs.push(out);
    let af = c.auth_file();
    let mode = fs::metadata(&af)
        .unwrap_or_else(|e| panic!("{}: {e}", af.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode of {}", af.display());
    let v: Value = serde_json::from_slice(&fs::read(&af).unwrap()).unwrap();
    assert_eq!(
        v["auths"][&addr]["auth"].as_str(),
        Some(base64_encode(format!("{USER}:{PASS}").as_bytes()).as_str()),
        "auth.json: {v}"
    );

    // Push and pull with --cert-dir.
    import_local(&env, &c, "local:1");
    let dest = format!("{addr}/secure/pushed:v1");
    let out = c.ok_env(
        &["push", "--cert-dir", &cd, "local:1", &dest],
        &[("RUST_LOG", "trace")],
    );
    let (digest, _) = pushed(&out, "v1");
    assert_eq!(
        reg.manifest_digest("secure/pushed", "v1").as_deref(),
        Some(digest.as_str())
    );
    outputs.push(out);
    let out = c.ok_env(&["pull", "--cert-dir", &cd, &full], &[("RUST_LOG", "trace")]);
    assert_eq!(pulled(&out, &full, true), img.manifest_digest);
    assert_is_test_image(&c, &full, &img);
    outputs.push(out);

    // --tls-verify=false instead of the CA (another store, same login).
    let c2 = c.with_store(&env, "store2");
    c2.watch(reg.diag());
    let out = c2.ok(&["pull", "--tls-verify=false", &dest]);
    assert_eq!(pulled(&out, &dest, true), digest);
    assert_eq!(c2.store.image_id(&dest), c.store.image_id("local:1"));

    // Credentials from ~/.docker/config.json only.
    let c3 = Client::new(&env, "store3");
    c3.watch(reg.diag());
    fs::create_dir_all(c3.home.join(".docker")).unwrap();
    fs::write(
        c3.home.join(".docker/config.json"),
        json!({"auths": {&addr: {"auth": base64_encode(format!("{USER}:{PASS}").as_bytes())}}}).to_string(),
    )
    .unwrap();
    let out = c3.ok(&["pull", "--cert-dir", &cd, &full]);
    assert_eq!(pulled(&out, &full, true), img.manifest_digest);
    assert!(
        !c3.auth_file().exists(),
        "pull wrote {}",
        c3.auth_file().display()
    );

    // REGISTRY_AUTH_FILE and --authfile choose the file.
    let c4 = Client::new(&env, "store4");
    c4.watch(reg.diag());
    let custom = env.path().join("custom-auth.json");
    let ce = [("REGISTRY_AUTH_FILE", custom.to_str().unwrap())];
    let out = c4.login(&addr, USER, PASS, &["--cert-dir", &cd], &ce);
    assert!(out.ok(), "login with REGISTRY_AUTH_FILE: {out}");
    assert!(custom.exists(), "REGISTRY_AUTH_FILE not written");
    assert!(
        !c4.auth_file().exists(),
        "default auth file written despite REGISTRY_AUTH_FILE"
    );
    c4.ok_env(&["pull", "--cert-dir", &cd, &full], &ce);
    let explicit = env.path().join("explicit-auth.json");
    let out = c4.login(
        &addr,
        USER,
        PASS,
        &["--cert-dir", &cd, "--authfile", &s(&explicit)],
        &[],
    );
    assert!(out.ok(), "login --authfile: {out}");
    let v: Value = serde_json::from_slice(&fs::read(&explicit).unwrap()).unwrap();
    assert!(v["auths"][&addr]["auth"].is_string(), "--authfile content: {v}");
    assert_eq!(
        fs::metadata(&explicit).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Logout removes the entry; then pulls are refused again.
    let out = c.ok(&["logout", &addr]);
    assert!(
        out.stdout
            .contains(&format!("Removed login credentials for {addr}")),
        "{out}"
    );
    let v: Value =
        serde_json::from_slice(&fs::read(&af).unwrap_or_else(|_| b"{}".to_vec())).unwrap_or(Value::Null);
    assert!(v["auths"].get(&addr).is_none(), "entry left after logout: {v}");
    let c5 = c.with_store(&env, "store5");
    let out = c5.fails(&["pull", "--cert-dir", &cd, &full]);
    assert!(says_unauthorized(&out), "pull after logout: {out}");

    let refs: Vec<&CmdOutput> = outputs.iter().collect();
    assert_no_secrets(&refs, &[PASS.to_string(), WRONG.to_string()]);
}

// ---------------------------------------------------------------------------
// Bearer tokens.

#[test]
fn bearer_token_flow_login_push_pull() {
    let env = TestEnv::new("reg-bearer");
    let c = Client::new(&env, "store");
    let reg = Registry::plain();
    let px = Proxy::front(
        &reg,
        Mode::Bearer {
            user: USER.into(),
            pass: PASS.into(),
        },
    );
    c.watch(reg.diag());
    c.watch(px.diag());
    let a = px.addr();
    let img = push_test_image(&env, &reg, "bearer/img:v1");
    let full = format!("{a}/bearer/img:v1");
    let mut outputs = Vec::new();

    // Anonymous pull: a pull-only token, reused for the manifest and all 4 blobs.
    let out = c.ok_env(&["pull", &full], &[("RUST_LOG", "trace")]);
    assert_eq!(pulled(&out, &full, true), img.manifest_digest);
    assert_is_test_image(&c, &full, &img);
    outputs.push(out);
    let log = px.token_log();
    assert!(
        (1..=2).contains(&log.len()),
        "pull of a 3-layer image asked for {} tokens (reuse expected)\n{}",
        log.len(),
        px.summary()
    );
    for t in &log {
        assert_eq!(
            t.service.as_deref(),
            Some(TOKEN_SERVICE),
            "token request without the challenge's service: {t:?}"
        );
        assert!(t.user.is_none(), "anonymous pull sent credentials: {t:?}");
    }
    assert!(
        px.scopes_asked()
            .iter()
            .any(|x| x == "repository:bearer/img:pull"),
        "{:?}",
        px.scopes_asked()
    );

    // Anonymous push is refused.
    import_local(&env, &c, "local:1");
    let dest = format!("{a}/bearer/pushed:1");
    let out = c.fails(&["push", "local:1", &dest]);
    assert!(says_unauthorized(&out), "anonymous push: {out}");
    assert!(reg.tags("bearer/pushed").is_empty());

    // Wrong password: the token server says no; nothing stored.
    px.clear();
    let out = c.login(&a, USER, WRONG, &[], &[("RUST_LOG", "trace")]);
    assert_eq!(
        out.status,
        Some(1),
        "login with a wrong password: {out}\n{}",
        px.summary()
    );
    assert!(says_unauthorized(&out), "{out}");
    assert!(
        px.token_log()
            .iter()
            .any(|t| t.user.as_deref() == Some(USER) && !t.ok),
        "login did not check the credentials at the token server\n{}",
        px.summary()
    );
    assert!(!fs::read_to_string(c.auth_file()).unwrap_or_default().contains(&a));
    outputs.push(out);

    let out = c.login(&a, USER, PASS, &[], &[("RUST_LOG", "trace")]);
    assert!(
        out.ok() && out.stdout.contains("Login Succeeded"),
        "login: {out}\n{}",
        px.summary()
    );
    assert!(px
        .token_log()
        .iter()
        .any(|t| t.user.as_deref() == Some(USER) && t.ok));
    outputs.push(out);

    // Push with the stored credentials: the pulled 4-blob image to another
    // repository. One token per blob (or per blob and scope) is not reuse.
    px.clear();
    let out = c.ok_env(&["push", &full, &dest], &[("RUST_LOG", "trace")]);
    let (digest, _) = pushed(&out, "1");
    assert_eq!(
        reg.manifest_digest("bearer/pushed", "1").as_deref(),
        Some(digest.as_str())
    );
    assert_eq!(
        digest, img.manifest_digest,
        "push of a pulled image changed its manifest"
    );
    outputs.push(out);
    let log = px.token_log();
    assert!(
        !log.is_empty() && log.len() <= 3,
        "push of a 4-blob image asked for {} tokens (reuse expected)\n{}",
        log.len(),
        px.summary()
    );
    assert!(
        log.iter().all(|t| t.user.as_deref() == Some(USER)),
        "push without the credentials: {log:?}"
    );
    assert!(
        px.scopes_asked()
            .iter()
            .any(|x| x.starts_with("repository:bearer/pushed:") && x.contains("push")),
        "{:?}",
        px.scopes_asked()
    );
    // The blobs are in bearer/img (pulled from there): mounted, not uploaded,
    // which needs a token that may also pull from bearer/img.
    assert_eq!(
        px.upload_bytes(),
        0,
        "push to bearer/pushed uploaded blobs that bearer/img has (no mount with a pull scope for it)\n{}",
        px.summary()
    );
    // Another tag of the same repository (local:1, 2 blobs).
    let out = c.ok(&["push", "local:1", &format!("{a}/bearer/pushed:2")]);
    assert_eq!(
        reg.manifest_digest("bearer/pushed", "2").as_deref(),
        Some(pushed(&out, "2").0.as_str())
    );

    // Pull into another store with the login: one authenticated token.
    let c2 = c.with_store(&env, "store2");
    c2.watch(px.diag());
    px.clear();
    let out = c2.ok_env(&["pull", &dest], &[("RUST_LOG", "trace")]);
    assert_eq!(pulled(&out, &dest, true), digest);
    outputs.push(out);
    let log = px.token_log();
    assert!((1..=2).contains(&log.len()), "{}", px.summary());

    let mut secrets: Vec<String> = px.issued_tokens();
    secrets.push(PASS.into());
    secrets.push(WRONG.into());
    let refs: Vec<&CmdOutput> = outputs.iter().collect();
    assert_no_secrets(&refs, &secrets);
}

// ---------------------------------------------------------------------------
// Multi-arch.

#[test]
fn multi_arch_index_pulls_the_right_platform() {
    let env = TestEnv::new("reg-multiarch");
    let reg = Registry::plain();
    let layout = OciLayout::create(&env.path().join("layout"));
    let (idx, amd, arm) = multiarch_index(&layout, "m");
    assert_eq!(
        reg.push_layout(&env.dir("skopeo-tmp"), &layout.dir, "m", "multi/img:1", true),
        idx
    );
    let (mine, other) = if host_arch() == "amd64" {
        (&amd, &arm)
    } else {
        (&arm, &amd)
    };
    let full = format!("{}/multi/img:1", reg.addr());

    let c = Client::new(&env, "store");
    c.watch(reg.diag());
    let out = c.ok(&["pull", &full]);
    assert_eq!(pulled(&out, &full, true), idx, "docker prints the index digest");
    let v = c.store.inspect(&full);
    assert_eq!(inspect_config(&v)["architecture"].as_str(), Some(host_arch()));
    assert_eq!(inspect_id(&v), mine.config_digest);
    assert_eq!(
        c.exported_file(&full, "etc/platform"),
        format!("linux/{}\n", host_arch()).as_bytes()
    );
    assert!(
        !c.valid_blobs("default platform").contains(&other.layers[0].0),
        "the other platform's layer was fetched too"
    );

    let c2 = Client::new(&env, "store2");
    c2.watch(reg.diag());
    let plat = format!("linux/{}", other_arch());
    let out = c2.ok(&["pull", "--platform", &plat, &full]);
    pulled(&out, &full, true);
    let v = c2.store.inspect(&full);
    assert_eq!(inspect_config(&v)["architecture"].as_str(), Some(other_arch()));
    assert_eq!(inspect_id(&v), other.config_digest);
    assert_eq!(
        c2.exported_file(&full, "etc/platform"),
        format!("{plat}\n").as_bytes()
    );

    let c3 = Client::new(&env, "store3");
    let out = c3.fails(&["pull", "--platform", "linux/s390x", &full]);
    assert!(
        out.stderr.contains("s390x"),
        "error does not name the missing platform: {out}"
    );
    c3.assert_absent(&full, "pull of a platform the index lacks");
}

// ---------------------------------------------------------------------------
// Bad input.

#[test]
fn unknown_repository_tag_and_local_image() {
    let env = TestEnv::new("reg-unknown");
    let c = Client::new(&env, "store");
    let reg = Registry::plain();
    c.watch(reg.diag());
    push_test_image(&env, &reg, "known/img:v1");
    let a = reg.addr();

    let r = format!("{a}/unknown/repo:v1");
    let out = c.fails(&["pull", &r]);
    assert_eq!(out.status, Some(1), "{out}");
    assert!(
        out.stderr.contains("unknown/repo"),
        "error does not name the repository: {out}"
    );
    c.assert_absent(&r, "unknown repository");

    let r = format!("{a}/known/img:nope");
    let out = c.fails(&["pull", &r]);
    assert_eq!(out.status, Some(1), "{out}");
    assert!(
        out.stderr.contains("known/img") && out.stderr.contains("nope"),
        "error does not name the reference: {out}"
    );
    c.assert_absent(&r, "unknown tag");

    let out = c.fails(&["push", "nosuch:1", &format!("{a}/x/y:1")]);
    assert_eq!(out.status, Some(1), "{out}");
    assert!(
        out.stderr.contains("nosuch"),
        "error does not name the local image: {out}"
    );
    assert!(reg.tags("x/y").is_empty());
    c.assert_no_temp_files("after failed pulls");
}

#[test]
fn unparsable_references_are_refused() {
    let env = TestEnv::new("reg-badref");
    let c = Client::new(&env, "store");
    import_local(&env, &c, "local:1");
    for r in [
        "UPPER/x",
        "127.0.0.1:5000/a/b:bad tag",
        "a/b@sha256:short",
        "a//b",
        "127.0.0.1:notaport/a:1",
    ] {
        let t0 = Instant::now();
        let out = c.fails(&["pull", r]);
        assert!(matches!(out.status, Some(1 | 2)), "pull {r:?}: {out}");
        assert!(out.stderr.contains(r), "error does not name {r:?}: {out}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "pull {r:?} took {:?}",
            t0.elapsed()
        );
    }
    let out = c.fails(&["push", "local:1", "Bad/Name:1"]);
    assert!(
        matches!(out.status, Some(1 | 2)) && out.stderr.contains("Bad/Name"),
        "{out}"
    );
    let out = c.fails(&["login", "-u", "x", "-p", "y", "bad host/x"]);
    assert!(matches!(out.status, Some(1 | 2)), "{out}");
    // Usage errors are clap's.
    let out = c.fails(&["pull"]);
    assert_eq!(out.status, Some(2), "pull without a reference: {out}");
}

#[test]
fn unreachable_registry_fails_naming_the_host() {
    let env = TestEnv::new("reg-unreachable");
    let c = Client::new(&env, "store");
    let closed = closed_addr();
    let r = format!("{closed}/x/y:1");
    let t0 = Instant::now();
    let out = c.fails_env(&["pull", &r], &[("STRATA_REGISTRY_TIMEOUT", "2")]);
    let took = t0.elapsed();
    assert!(
        out.stderr.contains(&closed),
        "error does not name {closed}: {out}"
    );
    assert!(
        took < Duration::from_secs(20),
        "refused connection took {took:?} to report"
    );
    eprintln!("INFO: closed port: failed in {took:?}");

    let bh = Blackhole::start();
    let r = format!("{}/x/y:1", bh.addr());
    let t0 = Instant::now();
    let mut cmd = c.cmd();
    cmd.args(["pull", &r]).env("STRATA_REGISTRY_TIMEOUT", "2");
    let out = run_cmd(&mut cmd, Duration::from_secs(120));
    let took = t0.elapsed();
    assert!(
        !out.timed_out,
        "pull from a blackhole hung for 120 s despite STRATA_REGISTRY_TIMEOUT=2"
    );
    assert!(!out.ok(), "pull from a blackhole succeeded: {out}");
    assert!(bh.accepted() >= 1, "strata never connected to the blackhole");
    assert!(
        out.stderr.contains(&bh.addr()),
        "timeout error does not name {}: {out}",
        bh.addr()
    );
    assert!(
        took < Duration::from_secs(20),
        "timeout of 2 s took {took:?} to report: {out}"
    );
    eprintln!(
        "INFO: blackhole: failed in {took:?} after {} connections",
        bh.accepted()
    );
    c.assert_absent(&r, "blackhole");
    c.assert_no_temp_files("after unreachable registries");
}

/// A blob whose bytes do not match its digest (or that is too long) is
/// refused: nothing registered, no bad blob kept; the same pull through an
/// honest proxy then works.
#[test]
fn corrupt_or_oversize_blob_is_refused() {
    let env = TestEnv::new("reg-corrupt");
    let c = Client::new(&env, "store");
    let reg = Registry::plain();
    let img = push_test_image(&env, &reg, "corrupt/img:v1");
    let px = Proxy::front(
        &reg,
        Mode::CorruptBlob {
            min_size: BIG,
            times: usize::MAX,
        },
    );
    c.watch(reg.diag());
    c.watch(px.diag());
    let full = format!("{}/corrupt/img:v1", px.addr());

    let out = c.fails(&["pull", &full]);
    assert!(px.tampered() >= 1, "no blob was corrupted\n{}", px.summary());
    let t = lower(&out);
    assert!(
        t.contains("digest") && t.contains("match"),
        "error does not say digest mismatch: {out}"
    );
    c.assert_absent(&full, "corrupt blob");
    let kept = c.valid_blobs("after a corrupt blob");
    for (d, _) in img.layers.iter().filter(|(_, n)| *n > BIG) {
        assert!(!kept.contains(d), "corrupted blob {d} kept in the store");
    }

    px.set_mode(Mode::Oversize {
        min_size: BIG,
        extra: 4096,
        times: usize::MAX,
    });
    let out = c.fails(&["pull", &full]);
    assert!(px.tampered() >= 1, "{}", px.summary());
    let t = lower(&out);
    assert!(
        ["size", "digest", "length", "long", "bytes", "more than"]
            .iter()
            .any(|w| t.contains(w)),
        "oversize blob error says nothing about size or digest: {out}"
    );
    c.assert_absent(&full, "oversize blob");
    c.valid_blobs("after an oversize blob");

    // A manifest of 8 MiB: refused by its size (strata reads at most 4 MiB of it).
    px.set_mode(Mode::HugeManifest { extra: 8 << 20 });
    let out = c.fails(&["pull", &full]);
    assert!(px.tampered() >= 1, "{}", px.summary());
    assert!(
        lower(&out).contains("more than"),
        "huge manifest error says nothing about its size: {out}"
    );
    c.assert_absent(&full, "huge manifest");

    px.set_mode(Mode::Pass);
    let out = c.ok(&["pull", &full]);
    assert_eq!(pulled(&out, &full, true), img.manifest_digest);
    assert_is_test_image(&c, &full, &img);
    c.valid_blobs("after the good pull");
    c.assert_no_temp_files("after the good pull");
}

/// 503 and 429 answers are retried.
#[test]
fn server_errors_are_retried() {
    let env = TestEnv::new("reg-retry");
    let reg = Registry::plain();
    let img = push_test_image(&env, &reg, "retry/img:v1");
    let px = Proxy::front(
        &reg,
        Mode::ErrorStatus {
            status: 503,
            times: 2,
        },
    );
    let full = format!("{}/retry/img:v1", px.addr());
    for (status, name) in [(503, "store503"), (429, "store429")] {
        px.set_mode(Mode::ErrorStatus { status, times: 2 });
        px.clear();
        let c = Client::new(&env, name);
        c.watch(px.diag());
        let out = c.ok(&["pull", &full]);
        assert_eq!(pulled(&out, &full, true), img.manifest_digest);
        assert_eq!(px.tampered(), 2, "{}", px.summary());
        assert_is_test_image(&c, &full, &img);
    }
}

/// The connection drops halfway through the largest blob: the pull resumes
/// (or fails and the next pull completes), blobs already verified are not
/// fetched again, nothing partial is ever listed or kept.
#[test]
fn dropped_connection_resumes() {
    let env = TestEnv::new("reg-drop");
    let reg = Registry::plain();
    let img = push_test_image(&env, &reg, "drop/img:v1");
    let (big, _) = img.largest_layer();
    let px = Proxy::front(
        &reg,
        Mode::DropHalfway {
            min_size: BIG,
            times: 1,
        },
    );
    let full = format!("{}/drop/img:v1", px.addr());

    // Once: the pull should get through.
    let c = Client::new(&env, "store");
    c.watch(px.diag());
    let out = c.run(&["pull", &full]);
    assert_eq!(px.tampered(), 1, "{}", px.summary());
    let ranged = px.records().iter().any(|r| r.range.is_some());
    eprintln!(
        "INFO: pull with one dropped connection: {} ({}); Range used: {ranged}",
        if out.ok() { "succeeded" } else { "failed" },
        out.stderr.lines().last().unwrap_or_default()
    );
    if !out.ok() {
        c.assert_absent(&full, "pull with a dropped connection");
        c.valid_blobs("after a dropped connection");
        let out = c.ok(&["pull", &full]);
        pulled(&out, &full, true);
    } else {
        assert_eq!(pulled(&out, &full, true), img.manifest_digest);
    }
    assert_is_test_image(&c, &full, &img);
    assert_eq!(
        c.exported_file(&full, "srv/noise.bin"),
        noise(3 << 19, 7),
        "/srv/noise.bin after the resumed pull"
    );
    c.valid_blobs("after the pull");
    c.assert_no_temp_files("after the pull");

    // Every big response dropped: whatever the first pull does, nothing
    // partial shows, and the next (honest) pull fetches only what is missing.
    px.set_mode(Mode::DropHalfway {
        min_size: BIG,
        times: usize::MAX,
    });
    px.clear();
    let c2 = Client::new(&env, "store2");
    c2.watch(px.diag());
    let out = c2.run(&["pull", &full]);
    eprintln!(
        "INFO: pull with every big response dropped: {} after {} tampered responses",
        if out.ok() { "succeeded" } else { "failed" },
        px.tampered()
    );
    if out.ok() {
        assert_eq!(pulled(&out, &full, true), img.manifest_digest);
        assert_is_test_image(&c2, &full, &img);
        return;
    }
    assert!(
        out.stderr.contains(&big[..19]) || lower(&out).contains("connection") || lower(&out).contains("eof"),
        "error does not say what broke: {out}"
    );
    c2.assert_absent(&full, "every big response dropped");
    let have = c2.valid_blobs("after a failed pull");
    eprintln!("INFO: {} verified blobs kept after the failed pull", have.len());
    px.set_mode(Mode::Pass);
    px.clear();
    let out = c2.ok(&["pull", &full]);
    assert_eq!(pulled(&out, &full, true), img.manifest_digest);
    for d in px.blob_gets() {
        assert!(
            !have.contains(&d),
            "blob {d}, verified by the failed pull, fetched again\n{}",
            px.summary()
        );
    }
    assert_is_test_image(&c2, &full, &img);
}

/// A manifest whose layer blob is gone from the registry: the pull fails,
/// nothing is registered, the other blobs stay valid.
#[test]
fn manifest_with_missing_blob_fails() {
    let env = TestEnv::new("reg-missing-blob");
    let c = Client::new(&env, "store");
    let reg = Registry::plain();
    c.watch(reg.diag());
    let img = push_test_image(&env, &reg, "missing/img:v1");
    let (big, _) = img.largest_layer();
    let data = reg.blob_data_path(&big);
    fs::remove_file(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
    let full = format!("{}/missing/img:v1", reg.addr());
    let out = c.fails(&["pull", &full]);
    assert_eq!(out.status, Some(1), "{out}");
    let t = lower(&out);
    assert!(
        out.stderr.contains(&big[7..19]) || t.contains("blob unknown") || t.contains("not found"),
        "error does not name the missing blob: {out}"
    );
    c.assert_absent(&full, "missing blob");
    assert!(!c.valid_blobs("missing blob").contains(&big));
    c.ok(&["images"]);
    c.assert_no_temp_files("after a pull with a missing blob");
}

/// Ctrl-C while blobs are streaming: non-zero exit, nothing listed, no
/// partial blob; the next pull completes and skips the verified blobs.
#[test]
fn ctrl_c_during_pull_then_resume() {
    let env = TestEnv::new("reg-sigint");
    let c = Client::new(&env, "store");
    let reg = Registry::plain();
    let img = push_test_image(&env, &reg, "slow/img:v1");
    let px = Proxy::front(
        &reg,
        Mode::Slow {
            per_64k: Duration::from_millis(150),
        },
    );
    c.watch(reg.diag());
    c.watch(px.diag());
    let full = format!("{}/slow/img:v1", px.addr());

    let outf = env.path().join("pull.out");
    let errf = env.path().join("pull.err");
    let mut cmd = c.cmd();
    cmd.args(["pull", &full])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&outf).unwrap())
        .stderr(fs::File::create(&errf).unwrap());
    // A Ctrl-C at a terminal finds `strata pull` with SIGINT's default action. The harness
    // itself may run with SIGINT ignored (a background job of a shell without job
    // control), which exec would hand down: the pull then ran to the end and exited 0.
    // SAFETY: signal(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while px.blob_gets_started() == 0 {
        if t0.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "pull never started a blob download: {}\n{}",
                fs::read_to_string(&errf).unwrap_or_default(),
                px.summary()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(900));
    assert!(
        child.try_wait().unwrap().is_none(),
        "pull finished before Ctrl-C (proxy not slow enough?)\n{}",
        px.summary()
    );
    // SAFETY: kill(2) of the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t1 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t1.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pull still running 30 s after SIGINT");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stderr = fs::read_to_string(&errf).unwrap_or_default();
    assert!(!status.success(), "interrupted pull exited 0: {stderr}");
    eprintln!(
        "INFO: interrupted pull: {status} after {:?}; stderr: {}",
        t1.elapsed(),
        stderr.trim()
    );

    c.assert_absent(&full, "interrupted pull");
    let have = c.valid_blobs("after Ctrl-C");
    eprintln!("INFO: {} verified blobs kept after Ctrl-C", have.len());
    c.ok(&["images"]);

    px.set_mode(Mode::Pass);
    px.clear();
    let out = c.ok(&["pull", &full]);
    assert_eq!(pulled(&out, &full, true), img.manifest_digest);
    for d in px.blob_gets() {
        assert!(
            !have.contains(&d),
            "blob {d}, complete before Ctrl-C, fetched again\n{}",
            px.summary()
        );
    }
    assert_is_test_image(&c, &full, &img);
    c.valid_blobs("after the resumed pull");
    c.assert_no_temp_files("after the resumed pull");
}
