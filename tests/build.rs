//! `strata build`: Dockerfiles built into a temp store holding a runnable busybox image.
//!
//! 1. A table of small Dockerfiles with contexts (`cases()`), each built and checked on the
//!    resulting image's exported tree and config: every instruction, COPY/ADD rules, forms,
//!    escapes, expansion, multi-stage, `--target`, `.dockerignore`, ONBUILD, heredocs.
//! 2. Bad input: failing RUN, parse errors with FILE:LINE, missing and escaping COPY
//!    sources, symlinks pointing out of the context, missing stages and images, Ctrl-C.
//! 3. CLI: step lines, `-q`, `--iidfile`, tags, Dockerfile on stdin, `run --entrypoint`,
//!    `--network`, `--squash`.
//! 4. Remote sources: ADD of a URL from an HTTP server of the test (name, mode, checksum,
//!    errors), FROM an image in a loopback `docker-registry` (pulled when missing) and
//!    `--pull` after the tag moved.
//! 5. Rootless: a build as an unprivileged user created by the test, in that user's store.
//! 6. The layer cache: a rebuild reuses every step, a changed file or build arg rebuilds
//!    from the step that sees it, `--no-cache`, `gc`.
//! 7. A differential test against `docker build` with BuildKit in a private dockerd (see
//!    build_common::DockerBuilder for what docker 20.10 does offline): every table case
//!    docker can build is built by both and the trees, config and layer counts compared;
//!    each case's own expectations are checked on docker's image too, so the table states
//!    docker's behaviour, not only strata's.
//!
//! Docker behaviours the table pins (BuildKit of dockerd 20.10, checked by the
//! differential test): a COPY source that is a symlink is followed, resolved inside the
//! context (`leak -> /etc/passwd` copies CONTEXT/etc/passwd, or fails when there is none);
//! symlinks inside a copied directory stay symlinks; RUN always makes a layer, and so does
//! WORKDIR even when the directory exists; directories WORKDIR creates belong to the
//! current USER; VOLUME creates no directory and RUN changes below a volume are kept;
//! `USER 1000` runs with gid 0; `--chown=1000:1000` also owns the parent directories it
//! creates; ENTRYPOINT resets a CMD inherited from the base; the image Env gets the default
//! PATH when the base has none (FROM scratch too); ENV values in one instruction see the
//! variables as they were before it; a stage the target does not need is not built.
//!
//! Every test owns its store; BuildFx's Drop kills container processes and unmounts what
//! a build left behind, and tests assert that a build leaves nothing (mounts, processes,
//! containers, temp files). Missing tools are a failure: run scripts/install-deps.

mod build_common;
mod common;
mod image_common;
mod registry_common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use build_common::*;
use common::Layer;
use image_common::{must, Store};
use registry_common::{closed_addr, Registry};

const PATH_DEFAULT: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// A RUN whose output differs every time it really runs.
const UUID: &str = "cat /proc/sys/kernel/random/uuid";

// ---------------------------------------------------------------------------
// The table.

struct Parent {
    tag: &'static str,
    dockerfile: String,
    check: Box<dyn Fn(&Built)>,
}

struct Case {
    name: &'static str,
    dockerfile: String,
    /// Context files besides the Dockerfile.
    setup: Box<dyn Fn(&Layer)>,
    /// Extra `build` arguments (the same for strata and docker).
    args: Vec<&'static str>,
    /// Environment of the build command (for `--build-arg NAME` without a value).
    env: Vec<(&'static str, &'static str)>,
    /// An image built first (from Dockerfile.parent in the same context) and tagged.
    parent: Option<Parent>,
    /// Compared with docker build (false: docker 20.10 cannot build it offline).
    docker: bool,
    check: Box<dyn Fn(&Built)>,
}

impl Case {
    fn new(name: &'static str, dockerfile: &str) -> Case {
        Case {
            name,
            dockerfile: dockerfile.to_string(),
            setup: Box::new(|_| {}),
            args: Vec::new(),
            env: Vec::new(),
            parent: None,
            docker: true,
            check: Box::new(|_| {}),
        }
    }

    fn setup(mut self, f: impl Fn(&Layer) + 'static) -> Case {
        self.setup = Box::new(f);
        self
    }

    fn args(mut self, a: &[&'static str]) -> Case {
        self.args = a.to_vec();
        self
    }

    fn env(mut self, e: &[(&'static str, &'static str)]) -> Case {
        self.env = e.to_vec();
        self
    }

    fn check(mut self, f: impl Fn(&Built) + 'static) -> Case {
        self.check = Box::new(f);
        self
    }

    fn no_docker(mut self) -> Case {
        self.docker = false;
        self
    }

    fn parent(mut self, tag: &'static str, dockerfile: &str, check: impl Fn(&Built) + 'static) -> Case {
        self.parent = Some(Parent {
            tag,
            dockerfile: dockerfile.to_string(),
            check: Box::new(check),
        });
        self
    }

    /// The context directory, Dockerfile included.
    fn make_ctx(&self, fx: &BuildFx) -> Layer {
        let ctx = fx.ctx(self.name);
        ctx.file_mode("Dockerfile", &self.dockerfile, 0o644);
        if let Some(p) = &self.parent {
            ctx.file_mode("Dockerfile.parent", &p.dockerfile, 0o644);
        }
        (self.setup)(&ctx);
        ctx
    }

    fn tag(&self, who: &str) -> String {
        format!("case-{}:{who}", self.name.replace('_', "-"))
    }

    /// Build with strata (the parent first), check the build left nothing behind and
    /// that the printed id is the tagged image's, and return the image.
    fn build_strata(&self, fx: &BuildFx, ctx: &Layer) -> Built {
        self.build_strata_with(fx, ctx, "strata", &[])
    }

    /// The same with `extra` build arguments (for the parent too), tagged for `who`.
    fn build_strata_with(&self, fx: &BuildFx, ctx: &Layer, who: &str, extra: &[&str]) -> Built {
        let env: Vec<(&str, &str)> = self.env.clone();
        if let Some(p) = &self.parent {
            let f = s(&ctx.path("Dockerfile.parent"));
            let mut a = vec!["-t", p.tag, "-f", &f];
            a.extend_from_slice(extra);
            fx.build_ok_env(&ctx.root, &a, &env);
            (p.check)(&fx.built(p.tag));
        }
        let tag = self.tag(who);
        let mut args = vec!["-t", tag.as_str()];
        args.extend_from_slice(extra);
        args.extend(self.args.iter().copied());
        let out = fx.build_ok_env(&ctx.root, &args, &env);
        fx.assert_clean(&format!("after building case {}", self.name));
        let b = fx.built(&tag);
        assert_eq!(
            b.id, out.id,
            "case {}: the id printed by build is not the tagged image's",
            self.name
        );
        b
    }
}

fn bb_file(l: &Layer, rel: &str, content: &str) {
    l.file_mode(rel, content, 0o644);
}

/// A gzip and a plain tar of `t/` (dir 0755, `inner` 0640, `ln -> inner`), owned
/// 1234:5678 in the archive, as `arch.tar.gz` and `arch.tar` in the context.
fn make_archives(l: &Layer) {
    let src = l.root.parent().unwrap().join(format!(
        "{}-tarsrc",
        l.root.file_name().unwrap().to_string_lossy()
    ));
    let t = Layer { root: src.clone() };
    t.dir_mode("t", 0o755);
    t.file_mode("t/inner", "inner\n", 0o640);
    t.symlink("t/ln", "inner");
    for (name, z) in [("arch.tar.gz", true), ("arch.tar", false)] {
        let mut c = Command::new("tar");
        c.arg("-C").arg(&src).args([
            "--owner=1234",
            "--group=5678",
            "--numeric-owner",
            "--mtime=@1700000000",
            "--sort=name",
        ]);
        c.arg(if z { "-czf" } else { "-cf" }).arg(l.path(name)).arg("t");
        must(&mut c, "tar -c (ADD archive)");
        l.chmod(name, 0o644);
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case::new(
            "scratch_copy",
            "FROM scratch\nCOPY hello.txt /hello.txt\nCOPY tree/ /tree/\n",
        )
        .setup(|l| {
            bb_file(l, "hello.txt", "hello\n");
            bb_file(l, "tree/a", "a\n");
            l.file_mode("tree/sub/b", "b\n", 0o600);
            l.file_mode("tree/exe", "#!/bin/sh\n", 0o755);
            l.symlink("tree/link", "a");
            l.chmod("tree/sub", 0o750);
        })
        .check(|b| {
            b.assert_names_under(
                "",
                &["hello.txt", "tree", "tree/a", "tree/exe", "tree/link", "tree/sub", "tree/sub/b"],
            );
            b.assert_file("hello.txt", "hello\n", 0o644, (0, 0));
            b.assert_file("tree/sub/b", "b\n", 0o600, (0, 0));
            b.assert_file("tree/exe", "#!/bin/sh\n", 0o755, (0, 0));
            b.assert_symlink("tree/link", "a");
            b.assert_dir("tree/sub", 0o750, (0, 0));
            b.assert_cfg("Cmd", Value::Null);
            b.assert_cfg("Entrypoint", Value::Null);
            // docker gives a scratch image the default PATH.
            b.assert_env("PATH", PATH_DEFAULT);
            assert_eq!(b.diff_ids().len(), 2, "{}: one layer per COPY", b.who);
        }),
        Case::new(
            "copy_rules",
            r#"FROM busybox
COPY a.txt /f1
COPY a.txt /d1/
COPY dir /d2
COPY dir/ /d3/
COPY *.txt /d4/
COPY a.txt b.txt /d5/
COPY a.txt /tmp
COPY dir /opt/old
COPY ["name with space.txt", "/spaced dest"]
COPY modes /modes
COPY rel-link /copied-link
WORKDIR /w
COPY a.txt rel
COPY b.txt ./sub/
COPY a.txt .
"#,
        )
        .setup(|l| {
            bb_file(l, "a.txt", "a\n");
            bb_file(l, "b.txt", "b\n");
            bb_file(l, "c.md", "c\n");
            bb_file(l, "dir/d", "d\n");
            bb_file(l, "dir/sub/s", "s\n");
            l.symlink("dir/l", "d");
            bb_file(l, "name with space.txt", "sp\n");
            l.file_mode("modes/exe", "x\n", 0o755);
            l.file_mode("modes/priv", "p\n", 0o600);
            l.chown("modes/priv", 1234, 1234);
            l.file_mode("modes/d700/f", "f\n", 0o644);
            l.chmod("modes/d700", 0o700);
            l.symlink("rel-link", "a.txt");
        })
        .check(|b| {
            // A file to a name; to `dir/` (created).
            b.assert_file("f1", "a\n", 0o644, (0, 0));
            b.assert_dir("d1", 0o755, (0, 0));
            b.assert_names_under("d1", &["a.txt"]);
            // A directory source copies its contents, with or without a slash.
            for d in ["d2", "d3"] {
                b.assert_dir(d, 0o755, (0, 0));
                b.assert_names_under(d, &["d", "l", "sub", "sub/s"]);
                b.assert_file(&format!("{d}/sub/s"), "s\n", 0o644, (0, 0));
                // A symlink inside a copied directory stays a symlink.
                b.assert_symlink(&format!("{d}/l"), "d");
            }
            b.assert_names_under("d4", &["a.txt", "b.txt", "name with space.txt"]);
            b.assert_names_under("d5", &["a.txt", "b.txt"]);
            // An existing directory as the destination (no slash): into it, and it keeps
            // its own mode.
            b.assert_file("tmp/a.txt", "a\n", 0o644, (0, 0));
            b.assert_dir("tmp", 0o1777, (0, 0));
            b.assert_names_under("opt/old", &["a", "d", "l", "sub", "sub/b", "sub/s"]);
            b.assert_file("spaced dest", "sp\n", 0o644, (0, 0));
            // Modes come from the context; owners do not (root).
            b.assert_file("modes/exe", "x\n", 0o755, (0, 0));
            b.assert_file("modes/priv", "p\n", 0o600, (0, 0));
            b.assert_dir("modes/d700", 0o700, (0, 0));
            b.assert_file("modes/d700/f", "f\n", 0o644, (0, 0));
            // A symlink named as the source is followed (inside the context).
            b.assert_file("copied-link", "a\n", 0o644, (0, 0));
            // Relative destinations are under WORKDIR.
            b.assert_file("w/rel", "a\n", 0o644, (0, 0));
            b.assert_file("w/sub/b.txt", "b\n", 0o644, (0, 0));
            b.assert_file("w/a.txt", "a\n", 0o644, (0, 0));
            b.assert_names_under("w", &["a.txt", "rel", "sub", "sub/b.txt"]);
            b.assert_absent("c.md");
            b.assert_absent("d4/c.md");
            b.assert_cfg("WorkingDir", json!("/w"));
            b.assert_cfg("Cmd", json!(["/bin/sh"]));
        }),
        Case::new(
            "copy_chown_chmod",
            r#"FROM busybox
COPY --chown=1000:1000 dir /own
COPY --chown=1000:1000 a.txt /p1/p2/f
COPY --chown=nobody:nogroup a.txt /named
COPY --chown=1000 a.txt /uid-only
COPY --chown=nobody a.txt /name-only
COPY --chmod=0750 a.txt /m
COPY --chmod=0750 dir /cm/
"#,
        )
        .setup(|l| {
            bb_file(l, "a.txt", "a\n");
            bb_file(l, "dir/d", "d\n");
            bb_file(l, "dir/sub/s", "s\n");
        })
        .check(|b| {
            b.assert_dir("own", 0o755, (1000, 1000));
            b.assert_file("own/d", "d\n", 0o644, (1000, 1000));
            b.assert_dir("own/sub", 0o755, (1000, 1000));
            b.assert_file("own/sub/s", "s\n", 0o644, (1000, 1000));
            b.assert_file("p1/p2/f", "a\n", 0o644, (1000, 1000));
            // BuildKit owns the parents it creates for the destination too.
            b.assert_dir("p1", 0o755, (1000, 1000));
            b.assert_dir("p1/p2", 0o755, (1000, 1000));
            // Names resolve through the image's /etc/passwd and /etc/group; a uid or a
            // user alone also sets the group (same number, or the user's group).
            b.assert_file("named", "a\n", 0o644, (65534, 65534));
            b.assert_file("uid-only", "a\n", 0o644, (1000, 1000));
            b.assert_file("name-only", "a\n", 0o644, (65534, 65534));
            b.assert_file("m", "a\n", 0o750, (0, 0));
            b.assert_file("cm/d", "d\n", 0o750, (0, 0));
            b.assert_dir("cm/sub", 0o750, (0, 0));
            b.assert_file("cm/sub/s", "s\n", 0o750, (0, 0));
        }),
        Case::new(
            "add_archive",
            r#"FROM busybox
ADD arch.tar.gz /unpacked/
ADD arch.tar.gz /unpacked2
ADD arch.tar /fromtar/
ADD plain.txt /plain.txt
COPY arch.tar.gz /copied/
"#,
        )
        .setup(|l| {
            make_archives(l);
            bb_file(l, "plain.txt", "plain\n");
        })
        .check(|b| {
            for d in ["unpacked", "unpacked2", "fromtar"] {
                b.assert_dir(d, 0o755, (0, 0));
                b.assert_names_under(d, &["t", "t/inner", "t/ln"]);
                // Owners and modes come from the archive.
                b.assert_dir(&format!("{d}/t"), 0o755, (1234, 5678));
                b.assert_file(&format!("{d}/t/inner"), "inner\n", 0o640, (1234, 5678));
                b.assert_symlink(&format!("{d}/t/ln"), "inner");
            }
            b.assert_file("plain.txt", "plain\n", 0o644, (0, 0));
            // COPY does not unpack.
            let e = b.entry("copied/arch.tar.gz");
            assert_eq!(e.kind, common::Kind::File, "{}: COPY of a tar.gz", b.who);
            assert!(
                e.size.unwrap_or(0) > 0 && e.sha256.is_some(),
                "{}: copied archive {e}",
                b.who
            );
        }),
        Case::new(
            "run_forms",
            r#"FROM busybox
RUN echo shell > /shell-form
RUN ["/bin/sh", "-c", "echo exec > /exec-form"]
RUN echo one \
    two \
# a comment inside a continuation is dropped
    three > /continued
ENV V=val
RUN ["/bin/sh", "-c", "echo \"$V\" > /exec-env"]
RUN echo 'single $V' "double $V" > /quotes
"#,
        )
        .check(|b| {
            b.assert_file("shell-form", "shell\n", 0o644, (0, 0));
            b.assert_file("exec-form", "exec\n", 0o644, (0, 0));
            b.assert_file("continued", "one two three\n", 0o644, (0, 0));
            b.assert_file("exec-env", "val\n", 0o644, (0, 0));
            // RUN is not expanded by the builder: the shell does it.
            b.assert_file("quotes", "single $V double val\n", 0o644, (0, 0));
            b.assert_env("V", "val");
        }),
        Case::new(
            "escape_directive",
            "# escape=`\nFROM busybox\nRUN echo one `\n    two > /continued\nENV WIN=C:\\dir\\file\nRUN printf '%s\\n' \"$WIN\" > /win\n",
        )
        .check(|b| {
            b.assert_file("continued", "one two\n", 0o644, (0, 0));
            // With ` as the escape, a backslash is an ordinary character.
            b.assert_env("WIN", "C:\\dir\\file");
            b.assert_file("win", "C:\\dir\\file\n", 0o644, (0, 0));
        }),
        Case::new(
            "metadata",
            r#"FROM busybox
LABEL a=b "with space"="x y"
LABEL multi.one=1 \
      multi.two=2
EXPOSE 80 443/udp 8080/tcp
STOPSIGNAL SIGUSR1
VOLUME /vol
VOLUME ["/vol2", "/vol3"]
RUN mkdir -p /vol && echo v > /vol/after-volume
HEALTHCHECK --interval=5s --timeout=3s --retries=2 CMD wget -q localhost || exit 1
ENTRYPOINT ["/bin/echo", "ep"]
CMD ["cmd-arg"]
"#,
        )
        .args(&["--label", "from-cli=yes"])
        .check(|b| {
            b.assert_cfg(
                "Labels",
                json!({"a": "b", "with space": "x y", "multi.one": "1", "multi.two": "2", "from-cli": "yes"}),
            );
            b.assert_cfg("ExposedPorts", json!({"80/tcp": {}, "443/udp": {}, "8080/tcp": {}}));
            b.assert_cfg("StopSignal", json!("SIGUSR1"));
            b.assert_cfg("Volumes", json!({"/vol": {}, "/vol2": {}, "/vol3": {}}));
            // BuildKit keeps what a RUN writes below a VOLUME, and VOLUME makes no directory.
            b.assert_file("vol/after-volume", "v\n", 0o644, (0, 0));
            b.assert_absent("vol2");
            b.assert_absent("vol3");
            b.assert_cfg(
                "Healthcheck",
                json!({
                    "Test": ["CMD-SHELL", "wget -q localhost || exit 1"],
                    "Interval": 5_000_000_000u64,
                    "Timeout": 3_000_000_000u64,
                    "Retries": 2
                }),
            );
            b.assert_cfg("Entrypoint", json!(["/bin/echo", "ep"]));
            b.assert_cfg("Cmd", json!(["cmd-arg"]));
        }),
        Case::new(
            "shell_form_cmd_entrypoint",
            "FROM busybox\nENTRYPOINT echo ep\nCMD echo cmd $HOME\n",
        )
        .check(|b| {
            b.assert_cfg("Entrypoint", json!(["/bin/sh", "-c", "echo ep"]));
            // Not expanded by the builder.
            b.assert_cfg("Cmd", json!(["/bin/sh", "-c", "echo cmd $HOME"]));
        }),
        Case::new(
            "entrypoint_resets_cmd",
            "FROM busybox\nENTRYPOINT [\"/bin/echo\"]\n",
        )
        .check(|b| {
            b.assert_cfg("Entrypoint", json!(["/bin/echo"]));
            // busybox's CMD ["/bin/sh"] is dropped by an ENTRYPOINT in the child.
            b.assert_cfg("Cmd", Value::Null);
        }),
        Case::new(
            "env_arg",
            r#"ARG BASE=busybox
ARG GLOBAL=g1
ARG GLOBAL_ONLY=go
FROM ${BASE}
ARG GLOBAL
ARG LOCAL=l1
ARG UNSET
ARG FROMENV
ENV EARLY=[${LATE}]
ARG LATE=late
ENV E1=${LOCAL:-x} E2=${UNSET:-dflt} E3=${LOCAL:+alt} E4=${UNSET:+alt} E5=\$LOCAL E6='$LOCAL' E7="$GLOBAL" E8=[${GLOBAL_ONLY}]
ENV OLD old
ENV OLD=new SAME=$OLD
ENV SPACED two words
ENV BS=C:\dir\file
RUN echo "$LOCAL|$GLOBAL|$UNSET|$LATE|$GLOBAL_ONLY|$OLD|$SAME|$FROMENV" > /seen
WORKDIR /data/${LOCAL}
"#,
        )
        .args(&[
            "--build-arg",
            "LOCAL=over",
            "--build-arg",
            "FROMENV",
            "--build-arg",
            "UNDECLARED=1",
        ])
        .env(&[("FROMENV", "envval")])
        .check(|b| {
            // ARGs are not in the image's Env; an ARG used before its declaration is
            // empty; one ENV instruction sees the values from before it.
            b.assert_cfg(
                "Env",
                json!([
                    format!("PATH={PATH_DEFAULT}"),
                    "EARLY=[]",
                    "E1=over",
                    "E2=dflt",
                    "E3=alt",
                    "E4=",
                    "E5=$LOCAL",
                    "E6=$LOCAL",
                    "E7=g1",
                    "E8=[]",
                    "OLD=new",
                    "SAME=old",
                    "SPACED=two words",
                    "BS=C:dirfile"
                ]),
            );
            // RUN sees the args (global ones only where redeclared).
            b.assert_file("seen", "over|g1||late||new|old|envval\n", 0o644, (0, 0));
            b.assert_cfg("WorkingDir", json!("/data/over"));
            b.assert_dir("data/over", 0o755, (0, 0));
        }),
        Case::new(
            "expansion_in_instructions",
            r#"FROM busybox
ARG SRC=a.txt
ENV DEST=/dest PORT=8080 SIG=SIGINT WHO=1000
COPY ${SRC} $DEST/
EXPOSE ${PORT}
LABEL port=$PORT
STOPSIGNAL $SIG
VOLUME $DEST/vol
USER ${WHO}
RUN id -u > /tmp/uid && id -g > /tmp/gid
CMD ["echo", "$PORT"]
"#,
        )
        .setup(|l| bb_file(l, "a.txt", "a\n"))
        .check(|b| {
            b.assert_file("dest/a.txt", "a\n", 0o644, (0, 0));
            b.assert_cfg("ExposedPorts", json!({"8080/tcp": {}}));
            b.assert_cfg("Labels", json!({"port": "8080"}));
            b.assert_cfg("StopSignal", json!("SIGINT"));
            b.assert_cfg("Volumes", json!({"/dest/vol": {}}));
            b.assert_cfg("User", json!("1000"));
            // A uid with no passwd entry and no group runs with gid 0.
            b.assert_file("tmp/uid", "1000\n", 0o644, (1000, 0));
            b.assert_file("tmp/gid", "0\n", 0o644, (1000, 0));
            // Exec form is not expanded.
            b.assert_cfg("Cmd", json!(["echo", "$PORT"]));
        }),
        Case::new(
            "workdir_user",
            r#"FROM busybox
WORKDIR /a
WORKDIR b
WORKDIR c
RUN pwd > /pwd
USER 1000:1000
RUN id -u > /tmp/uid && id -g > /tmp/gid && touch /tmp/by-user
WORKDIR /home/u
RUN touch file-in-workdir
USER nobody
RUN id -un > /tmp/name && echo "$HOME" > /tmp/home
"#,
        )
        .check(|b| {
            b.assert_dir("a/b/c", 0o755, (0, 0));
            b.assert_file("pwd", "/a/b/c\n", 0o644, (0, 0));
            b.assert_file("tmp/uid", "1000\n", 0o644, (1000, 1000));
            b.assert_file("tmp/gid", "1000\n", 0o644, (1000, 1000));
            b.assert_file("tmp/by-user", "", 0o644, (1000, 1000));
            // BuildKit: WORKDIR creates its directory as the current USER.
            b.assert_dir("home/u", 0o755, (1000, 1000));
            b.assert_file("home/u/file-in-workdir", "", 0o644, (1000, 1000));
            b.assert_file("tmp/name", "nobody\n", 0o644, (65534, 65534));
            // HOME is the user's, from /etc/passwd.
            b.assert_file("tmp/home", "/nonexistent\n", 0o644, (65534, 65534));
            b.assert_cfg("User", json!("nobody"));
            b.assert_cfg("WorkingDir", json!("/home/u"));
        }),
        Case::new(
            "run_environment",
            r#"FROM busybox
ARG A1=x
ENV E=1
RUN env | grep -v '^HOSTNAME=' | sort > /env; pwd > /pwd; umask > /umask; id -u > /uid
RUN tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' > /ifaces
"#,
        )
        .check(|b| {
            b.assert_file(
                "env",
                &format!("A1=x\nE=1\nHOME=/root\nPATH={PATH_DEFAULT}\nPWD=/\nSHLVL=1\n"),
                0o644,
                (0, 0),
            );
            b.assert_file("pwd", "/\n", 0o644, (0, 0));
            b.assert_file("umask", "0022\n", 0o644, (0, 0));
            b.assert_file("uid", "0\n", 0o644, (0, 0));
            // RUN has no network but loopback by default.
            b.assert_file("ifaces", "lo\n", 0o644, (0, 0));
            b.assert_absent("etc/hostname");
            b.assert_absent("etc/resolv.conf");
        }),
        Case::new(
            "shell_instruction",
            r#"FROM busybox
SHELL ["/bin/sh", "-c", "echo \"$0\" >> /shell-log; eval \"$0\""]
RUN echo hi > /hi
CMD echo from-cmd
"#,
        )
        .check(|b| {
            let shell = "echo \"$0\" >> /shell-log; eval \"$0\"";
            // The command is one more argument after the SHELL array.
            b.assert_file("shell-log", "echo hi > /hi\n", 0o644, (0, 0));
            b.assert_file("hi", "hi\n", 0o644, (0, 0));
            b.assert_cfg("Shell", json!(["/bin/sh", "-c", shell]));
            b.assert_cfg("Cmd", json!(["/bin/sh", "-c", shell, "echo from-cmd"]));
        }),
        Case::new(
            "multistage",
            r#"FROM busybox AS builder
RUN echo built > /artifact
FROM busybox AS other
RUN echo other > /o
FROM busybox AS unused
RUN exit 5
FROM scratch
COPY --from=builder /artifact /artifact
COPY --from=1 /o /o
COPY --from=busybox /etc/hello /hello
"#,
        )
        .check(|b| {
            // The unused (failing) stage is not built; only copied files end up in scratch.
            b.assert_names_under("", &["artifact", "hello", "o"]);
            b.assert_file("artifact", "built\n", 0o644, (0, 0));
            b.assert_file("o", "other\n", 0o644, (0, 0));
            b.assert_file("hello", "hello\n", 0o644, (0, 0));
            assert_eq!(b.diff_ids().len(), 3, "{}: one layer per COPY", b.who);
        }),
        Case::new(
            "target",
            r#"FROM busybox AS base
RUN echo base > /b
FROM base AS good
RUN echo good > /g
FROM good AS broken
RUN exit 9
"#,
        )
        .args(&["--target", "good"])
        .check(|b| {
            b.assert_file("b", "base\n", 0o644, (0, 0));
            b.assert_file("g", "good\n", 0o644, (0, 0));
            assert_eq!(b.new_layers(), 2, "{}: layers of base and good", b.who);
        }),
        Case::new("dockerignore", "FROM busybox\nCOPY . /ctx/\n")
            .setup(|l| {
                bb_file(l, "a/b/c/x.log", "1\n");
                bb_file(l, "a/y.log", "2\n");
                bb_file(l, "top.log", "3\n");
                bb_file(l, "keep/important.log", "4\n");
                bb_file(l, "keep/other.txt", "5\n");
                bb_file(l, "logs/l", "6\n");
                bb_file(l, "secret", "7\n");
                bb_file(l, "nested/secret", "8\n");
                bb_file(l, ".dockerignore", "# comment\n**/*.log\n!keep/important.log\nsecret\nlogs\n");
            })
            .check(|b| {
                b.assert_names_under(
                    "ctx",
                    &[
                        ".dockerignore",
                        "Dockerfile",
                        "a",
                        "a/b",
                        "a/b/c",
                        "keep",
                        "keep/important.log",
                        "keep/other.txt",
                        "nested",
                        "nested/secret",
                    ],
                );
                b.assert_file("ctx/keep/important.log", "4\n", 0o644, (0, 0));
            }),
        Case::new("onbuild", "FROM onbuild-parent:1\nRUN cat /trig /x > /both\n")
            .parent(
                "onbuild-parent:1",
                "FROM busybox\nONBUILD RUN echo trig > /trig\nONBUILD COPY x /x\n",
                |p| {
                    p.assert_cfg("OnBuild", json!(["RUN echo trig > /trig", "COPY x /x"]));
                    p.assert_absent("trig");
                    p.assert_absent("x");
                },
            )
            .setup(|l| bb_file(l, "x", "xx\n"))
            .check(|b| {
                // The triggers ran before the child's first instruction, and are not inherited.
                b.assert_file("trig", "trig\n", 0o644, (0, 0));
                b.assert_file("x", "xx\n", 0o644, (0, 0));
                b.assert_file("both", "trig\nxx\n", 0o644, (0, 0));
                b.assert_cfg("OnBuild", Value::Null);
            }),
        // The empty layers are one layer directory, so the last RUN's stack names it three
        // times (the kernel's overlayfs refuses a repeated lower: --overlay kernel drops
        // the lower copies).
        Case::new(
            "run_without_changes",
            "FROM busybox\nRUN true\nWORKDIR /tmp\nRUN true\nRUN echo x > /after\n",
        )
        .check(|b| {
            // docker makes a layer for every RUN and WORKDIR, even when nothing changed.
            assert_eq!(
                b.new_layers(),
                4,
                "{}: layers of RUN true, WORKDIR /tmp, RUN true and RUN echo: {:?}",
                b.who,
                history_lines(b)
            );
            b.assert_file("after", "x\n", 0o644, (0, 0));
            b.assert_dir("tmp", 0o1777, (0, 0));
            b.assert_cfg("WorkingDir", json!("/tmp"));
        }),
        // Directories renamed by a RUN (a redirect in the step's upper) become a layer that
        // deletes the old path and holds the whole directory at the new one; the next step
        // runs on it.
        Case::new(
            "rename_dirs",
            "FROM busybox\nRUN mv /usr/share/doc /doc && mv /var/lib /var/lib2 && mv /opt/old/sub /opt/sub\nRUN echo x > /doc/after && ls /var/lib2/app > /listing && mv /doc /usr/doc\n",
        )
        .check(|b| {
            b.assert_file("usr/doc/README", "docs\n", 0o644, (0, 0));
            b.assert_file("usr/doc/after", "x\n", 0o644, (0, 0));
            b.assert_file("listing", "data\n", 0o644, (0, 0));
            b.assert_file("opt/sub/b", "b", 0o644, (0, 0));
            for gone in ["doc", "usr/share/doc", "var/lib", "opt/old/sub"] {
                b.assert_absent(gone);
            }
        }),
        // docker 20.10's built-in frontend has no heredocs (and `# syntax` needs the network).
        Case::new(
            "heredoc",
            "FROM busybox\nENV NAME=world\nRUN <<EOF\necho line1 > /h\necho \"hello $NAME\" >> /h\nEOF\nRUN cat > /h3 <<EOF\nstdin $NAME\nEOF\nCOPY <<EOF /greeting\nhi ${NAME}\nEOF\nCOPY <<\"EOF\" /raw\nhi ${NAME}\nEOF\nCOPY <<-EOF /tabs\n\tindented\nEOF\nRUN echo after > /after\n",
        )
        .no_docker()
        .check(|b| {
            b.assert_file("h", "line1\nhello world\n", 0o644, (0, 0));
            b.assert_file("h3", "stdin world\n", 0o644, (0, 0));
            // COPY heredocs expand unless the delimiter is quoted; <<- strips leading tabs.
            b.assert_file("greeting", "hi world\n", 0o644, (0, 0));
            b.assert_file("raw", "hi ${NAME}\n", 0o644, (0, 0));
            b.assert_file("tabs", "indented\n", 0o644, (0, 0));
            // The heredoc body is not taken for instructions.
            b.assert_file("after", "after\n", 0o644, (0, 0));
            b.assert_absent("EOF");
        }),
    ]
}

fn case(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn run_case(name: &str) {
    let c = case(name);
    let fx = BuildFx::new(name);
    let ctx = c.make_ctx(&fx);
    let b = c.build_strata(&fx, &ctx);
    (c.check)(&b);
}

macro_rules! table_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_case(stringify!($name));
            }
        )*

        #[test]
        fn table_lists_every_case() {
            let tested: BTreeSet<&str> = [$(stringify!($name)),*].into_iter().collect();
            let all: BTreeSet<&str> = cases().iter().map(|c| c.name).collect();
            assert_eq!(tested, all, "every case of cases() has its own test");
        }
    };
}

table_tests!(
    scratch_copy,
    copy_rules,
    copy_chown_chmod,
    add_archive,
    run_forms,
    escape_directive,
    metadata,
    shell_form_cmd_entrypoint,
    entrypoint_resets_cmd,
    env_arg,
    expansion_in_instructions,
    workdir_user,
    run_environment,
    shell_instruction,
    multistage,
    target,
    dockerignore,
    onbuild,
    run_without_changes,
    rename_dirs,
    heredoc,
);

// ---------------------------------------------------------------------------
// Bad input.

fn combined(out: &common::CmdOutput) -> String {
    format!("{}\n{}", out.stdout, out.stderr)
}

/// True when `msg` states exit code `code` in one of the usual ways.
fn mentions_exit_code(msg: &str, code: i32) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        format!("exit code: {code}"),
        format!("exit code {code}"),
        format!("exit status {code}"),
        format!("exit status: {code}"),
        format!("exited with {code}"),
        format!("exited with code {code}"),
        format!("exited with status {code}"),
        format!("returned {code}"),
        format!("code {code}"),
        format!("code: {code}"),
        format!("status {code}"),
    ]
    .iter()
    .any(|p| m.contains(p.as_str()))
}

#[test]
fn failing_run_stops_the_build_and_tags_nothing() {
    let fx = BuildFx::new("failrun");
    let ctx = fx.ctx("failrun");
    let df = format!("FROM busybox\nRUN {UUID} > /before\nRUN exit 3\nRUN echo never > /never\n");
    ctx.file("Dockerfile", &df);
    let out = fx.build_fails(&ctx.root, &["-t", "failed:1"], Some("failed:1"));
    assert_eq!(out.status, Some(1), "a failing RUN exits 1: {out}");
    let msg = combined(&out);
    assert!(
        msg.contains("exit 3"),
        "the error should name the command `exit 3`: {out}"
    );
    assert!(
        mentions_exit_code(&out.stderr, 3),
        "the error should give the exit code 3: {out}"
    );
    assert!(
        !out.stdout.contains("STEP 4/4"),
        "steps after the failing RUN must not run: {}",
        out.stdout
    );
    // The step before stays cached: with the failing RUN fixed, step 2 is reused.
    ctx.file("Dockerfile", df.replace("RUN exit 3", "RUN true"));
    let b = fx.build_ok(&ctx.root, &["-t", "failed:1"]);
    b.assert_cached_exactly(&[2], "rebuild after fixing the failing RUN");
    let img = fx.built("failed:1");
    img.assert_file("never", "never\n", 0o644, (0, 0));
}

#[test]
fn run_of_a_missing_command_fails() {
    let fx = BuildFx::new("notfound");
    let ctx = fx.ctx("notfound");
    ctx.file("Dockerfile", "FROM busybox\nRUN [\"/no/such/binary\"]\n");
    let out = fx.build_fails(&ctx.root, &["-t", "nf:1"], Some("nf:1"));
    assert!(
        combined(&out).contains("/no/such/binary"),
        "the error should name the command: {out}"
    );
}

/// Dockerfiles that do not parse: exit 1, `Dockerfile:LINE` in the message.
#[test]
fn parse_errors_name_file_and_line() {
    let fx = BuildFx::new("parse");
    let bad: &[(&str, &str, usize, &str)] = &[
        (
            "unknown",
            "FROM busybox\nRUN true\nFROBNICATE x\n",
            3,
            "frobnicate",
        ),
        (
            "copy-one-arg",
            "FROM busybox\n\n# comment\nCOPY onlyone\n",
            4,
            "copy",
        ),
        (
            "bad-duration",
            "FROM busybox\nRUN true\nHEALTHCHECK --interval=zz CMD true\n",
            3,
            "zz",
        ),
        ("before-from", "RUN true\nFROM busybox\n", 1, "from"),
        (
            "continued",
            "FROM busybox\nRUN echo a \\\n  b\nBOGUS\n",
            4,
            "bogus",
        ),
    ];
    let mut failures = Vec::new();
    for (name, df, line, word) in bad {
        let ctx = fx.ctx(name);
        ctx.file("Dockerfile", df);
        let tag = format!("parse-{name}:1");
        let out = fx.build(&ctx.root, &["-t", &tag]);
        let r = catch_unwind(AssertUnwindSafe(|| {
            fx.check_failed(&out, name, Some(&tag));
            assert_eq!(out.status, Some(1), "{name}: exit status: {out}");
            assert!(
                out.stderr.contains(&format!("Dockerfile:{line}")),
                "{name}: the error should say Dockerfile:{line}: {out}"
            );
            assert!(
                out.stderr.to_ascii_lowercase().contains(word),
                "{name}: the error should mention {word:?}: {out}"
            );
            // docker checks the whole file before it runs anything.
            assert!(
                !out.stdout.contains("STEP 2/"),
                "{name}: nothing should run before the whole file parses: {}",
                out.stdout
            );
        }));
        if let Err(e) = r {
            failures.push(panic_msg(&e));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // With -f, the file named is the one given.
    let ctx = fx.ctx("named");
    ctx.file("build.df", "FROM busybox\nNOPE\n");
    let out = fx.build_fails(&ctx.root, &["-f", &s(&ctx.path("build.df"))], None);
    assert!(out.stderr.contains("build.df:2"), "-f file: {out}");
}

#[test]
fn copy_errors() {
    let fx = BuildFx::new("copyerr");
    let outside = fx.env.path().join("outside.txt");
    fs::write(&outside, "OUTSIDE-SECRET\n").unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("missing", "COPY nope.txt /x", "nope.txt"),
        ("dotdot", "COPY ../outside.txt /x", "outside.txt"),
        ("dotdot-deep", "COPY sub/../../outside.txt /x", "outside.txt"),
        // docker's documented rule (the legacy builder enforces it; BuildKit 20.10 copies
        // both onto one file, the last winning).
        ("multi-to-file", "COPY a.txt b.txt /notdir", "/notdir"),
        ("excluded", "COPY secret /x", "secret"),
        ("missing-stage", "COPY --from=missingstage /x /x", "missingstage"),
    ];
    for (name, line, word) in cases {
        let ctx = fx.ctx(name);
        ctx.file("Dockerfile", format!("FROM busybox\n{line}\n"));
        bb_file(&ctx, "a.txt", "a\n");
        bb_file(&ctx, "b.txt", "b\n");
        bb_file(&ctx, "sub/f", "f\n");
        bb_file(&ctx, "secret", "s\n");
        bb_file(&ctx, ".dockerignore", "secret\n");
        let tag = format!("copyerr-{name}:1");
        let mut c = fx.store.cmd();
        c.args(["build", "-t", &tag])
            .arg(&ctx.root)
            .env("STRATA_REGISTRY_RETRIES", "0")
            .env("STRATA_REGISTRY_TIMEOUT", "5");
        let out = common::run_cmd(&mut c, BUILD_TIMEOUT);
        fx.check_failed(&out, &format!("COPY case {name}"), Some(&tag));
        assert!(
            combined(&out).contains(word),
            "{name}: the error should name {word:?}: {out}"
        );
        assert!(
            !combined(&out).contains("OUTSIDE-SECRET"),
            "{name}: content from outside the context in the output: {out}"
        );
    }
}

/// Symlinks in the context that point outside it. docker (BuildKit and the legacy builder)
/// follows a symlink named as a COPY source but resolves it inside the context: `leak ->
/// /etc/passwd` copies CONTEXT/etc/passwd, or fails when the context has none; it never
/// reads the host's file. Symlinks inside a copied directory are copied as symlinks.
/// strata may refuse instead (the issue allows it): both are accepted, host content never.
#[test]
fn context_symlinks_never_read_the_host() {
    let fx = BuildFx::new("symleak");
    let host_passwd = fs::read_to_string("/etc/passwd").unwrap();
    let host_first = host_passwd.lines().next().unwrap_or("root:").to_string();
    let no_host = |what: &str, out: &common::CmdOutput| {
        assert!(
            !combined(out).contains(&host_first),
            "{what}: the host's /etc/passwd appears in the output: {out}"
        );
    };

    // No etc/passwd in the context: the COPY fails (docker: "/etc/passwd" not found).
    for (name, target) in [("abs", "/etc/passwd"), ("up", "../../../../../../../etc/passwd")] {
        let ctx = fx.ctx(name);
        ctx.file("Dockerfile", "FROM busybox\nCOPY leak /x\n");
        ctx.symlink("leak", target);
        let tag = format!("leak-{name}:1");
        let out = fx.build_fails(&ctx.root, &["-t", &tag], Some(&tag));
        no_host(name, &out);
    }
    // A directory symlink in the source path.
    let ctx = fx.ctx("dirlink");
    ctx.file("Dockerfile", "FROM busybox\nCOPY etcdir/passwd /x\n");
    ctx.symlink("etcdir", "/etc");
    let out = fx.build_fails(&ctx.root, &["-t", "leak-dir:1"], Some("leak-dir:1"));
    no_host("dirlink", &out);

    // With CONTEXT/etc/passwd: docker copies that one; refusing is accepted too.
    let ctx = fx.ctx("scoped");
    ctx.file(
        "Dockerfile",
        "FROM busybox\nCOPY leak /x\nCOPY etcdir/passwd /y\n",
    );
    ctx.symlink("leak", "/etc/passwd");
    ctx.symlink("etcdir", "/etc");
    bb_file(&ctx, "etc/passwd", "context-passwd\n");
    let out = fx.build(&ctx.root, &["-t", "leak-scoped:1"]);
    no_host("scoped", &out);
    if out.ok() {
        let b = fx.built("leak-scoped:1");
        b.assert_file("x", "context-passwd\n", 0o644, (0, 0));
        b.assert_file("y", "context-passwd\n", 0o644, (0, 0));
    } else {
        fx.check_failed(&out, "scoped symlink COPY (refused)", Some("leak-scoped:1"));
        eprintln!("note: strata refuses `COPY leak` with leak -> /etc/passwd where docker copies CONTEXT/etc/passwd: {out}");
    }

    // The whole context: links are copied as links, never followed.
    let ctx = fx.ctx("whole");
    ctx.file("Dockerfile", "FROM busybox\nCOPY . /ctx/\n");
    ctx.symlink("leak", "/etc/passwd");
    ctx.symlink("etcdir", "/etc");
    let out = fx.build_ok(&ctx.root, &["-t", "leak-whole:1"]);
    no_host("whole", &out.out);
    let b = fx.built("leak-whole:1");
    b.assert_names_under("ctx", &["Dockerfile", "etcdir", "leak"]);
    b.assert_symlink("ctx/leak", "/etc/passwd");
    b.assert_symlink("ctx/etcdir", "/etc");
    // And the image's own /etc/passwd is busybox's, not the host's.
    assert!(
        b.read("etc/passwd").contains("nobody:x:65534"),
        "image /etc/passwd changed"
    );
}

#[test]
fn missing_base_image_fails() {
    let fx = BuildFx::new("nobase");
    let ctx = fx.ctx("nobase");
    // A loopback registry nobody listens on: no internet needed for the failure.
    ctx.file("Dockerfile", "FROM 127.0.0.1:9/nope/missing:1\nRUN true\n");
    let mut c = fx.store.cmd();
    c.args(["build", "-t", "nobase:1"])
        .arg(&ctx.root)
        .env("STRATA_REGISTRY_RETRIES", "0")
        .env("STRATA_REGISTRY_TIMEOUT", "5");
    let out = common::run_cmd(&mut c, BUILD_TIMEOUT);
    fx.check_failed(&out, "FROM a missing image", Some("nobase:1"));
    assert!(
        combined(&out).contains("127.0.0.1:9/nope/missing"),
        "the error should name the image: {out}"
    );
}

/// Ctrl-C during a RUN: the build stops, leaves no container, mount or temp file, and
/// tags nothing; the store is usable afterwards.
#[test]
fn interrupt_cleans_up() {
    let fx = BuildFx::new("sigint");
    let ctx = fx.ctx("sigint");
    ctx.file(
        "Dockerfile",
        "FROM busybox\nRUN echo first > /first\nRUN echo started-sleeping && sleep 120\n",
    );
    let out_path = fx.env.path().join("sigint.out");
    let err_path = fx.env.path().join("sigint.err");
    let mut c = fx.store.cmd();
    c.args(["build", "-t", "sigint:1"])
        .arg(&ctx.root)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .process_group(0);
    let mut child = c.spawn().expect("spawn strata build");
    let start = Instant::now();
    let mut seen = false;
    while start.elapsed() < Duration::from_secs(120) {
        if fs::read_to_string(&out_path)
            .unwrap_or_default()
            .contains("started-sleeping")
        {
            seen = true;
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "build ended before the sleep ({st}): {}\n{}",
                fs::read_to_string(&out_path).unwrap_or_default(),
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    if !seen {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the RUN output `started-sleeping` never appeared on stdout (is RUN output streamed?): {}",
            fs::read_to_string(&out_path).unwrap_or_default()
        );
    }
    // Ctrl-C: SIGINT to the foreground process group.
    // SAFETY: kill(2) of the process group of the child we spawned.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(60) {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("strata build did not stop within 60 s of SIGINT");
    };
    assert!(
        !status.success(),
        "an interrupted build must not succeed: {status}"
    );
    let mut err = String::new();
    fs::File::open(&err_path)
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let out = common::CmdOutput {
        status: status.code().or(Some(128 + libc::SIGINT)),
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: err,
        timed_out: false,
    };
    fx.check_failed(&out, "interrupted build", Some("sigint:1"));
    // The store still works, and the first RUN was kept in the cache.
    ctx.file(
        "Dockerfile",
        "FROM busybox\nRUN echo first > /first\nRUN echo second > /second\n",
    );
    let b = fx.build_ok(&ctx.root, &["-t", "sigint:1"]);
    b.assert_cached_exactly(&[2], "rebuild after the interrupt");
}

// ---------------------------------------------------------------------------
// CLI.

#[test]
fn output_steps_quiet_iidfile_tags_history() {
    let fx = BuildFx::new("output");
    let ctx = fx.ctx("output");
    ctx.file(
        "Dockerfile",
        "FROM busybox\nRUN echo marker-from-run | tee /marker\nCMD [\"x\"]\n",
    );
    let iid = fx.env.path().join("iid");
    let b = fx.build_ok(
        &ctx.root,
        &["-t", "out:1", "-t", "other/name:two", "--iidfile", &s(&iid)],
    );
    let texts: Vec<String> = b
        .steps
        .iter()
        .map(|st| format!("STEP {}/{}: {}", st.n, st.total, st.text))
        .collect();
    assert_eq!(
        texts,
        vec![
            "STEP 1/3: FROM busybox",
            "STEP 2/3: RUN echo marker-from-run | tee /marker",
            "STEP 3/3: CMD [\"x\"]"
        ],
        "step lines: {}",
        b.out.stdout
    );
    assert!(
        b.step(2).body.iter().any(|l| l.trim() == "marker-from-run"),
        "RUN output should be printed under its step: {}",
        b.out.stdout
    );
    assert!(
        b.cached().is_empty(),
        "first build: nothing CACHED: {}",
        b.out.stdout
    );
    assert_eq!(
        fs::read_to_string(&iid).unwrap().trim(),
        b.id,
        "--iidfile content"
    );
    assert_eq!(fx.store.image_id("out:1"), b.id, "-t out:1");
    assert_eq!(fx.store.image_id("other/name:two"), b.id, "-t other/name:two");
    // History: one entry per step after FROM, on top of busybox's.
    let img = fx.built("out:1");
    let h = history_lines(&img);
    assert_eq!(h.len(), 3, "history: {h:?}");
    assert!(
        h[1].contains("echo marker-from-run") && !h[1].starts_with("(empty)"),
        "{h:?}"
    );
    assert!(h[2].starts_with("(empty)") && h[2].contains("CMD"), "{h:?}");
    assert_eq!(
        img.nonempty_history(),
        img.diff_ids().len(),
        "history vs layers: {h:?}"
    );
    let hist = fx.store.ok(&["history", "out:1"]);
    assert!(
        hist.stdout.contains("echo marker-from-run"),
        "strata history: {}",
        hist.stdout
    );

    // -q: only the id.
    ctx.file("Dockerfile", "FROM busybox\nRUN echo quiet-marker > /q\n");
    let out = fx.build(&ctx.root, &["-q", "-t", "quiet:1"]);
    assert!(out.ok(), "build -q: {out}");
    assert_eq!(
        out.stdout.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "-q prints only the id: {out}"
    );
    assert!(is_image_id(out.stdout.trim()), "-q output: {out}");
    assert_eq!(fx.store.image_id("quiet:1"), out.stdout.trim());
    assert!(!out.stdout.contains("quiet-marker"), "-q hides RUN output: {out}");
    fx.assert_clean("after the output builds");
}

#[test]
fn dockerfile_from_stdin() {
    let fx = BuildFx::new("stdin");
    // -f - with a context directory.
    let ctx = fx.ctx("stdin");
    bb_file(&ctx, "a.txt", "from-context\n");
    let df = fx.env.path().join("stdin.Dockerfile");
    fs::write(&df, "FROM busybox\nCOPY a.txt /a\nRUN echo ran > /ran\n").unwrap();
    let out = fx.build_stdin(&["-t", "stdin:1", "-f", "-"], &s(&ctx.root), &df);
    assert!(out.ok(), "build -f - CONTEXT: {out}");
    let b = fx.built("stdin:1");
    b.assert_file("a", "from-context\n", 0o644, (0, 0));
    b.assert_file("ran", "ran\n", 0o644, (0, 0));

    // `-` as the context: a Dockerfile on stdin and no context at all.
    fs::write(&df, "FROM busybox\nRUN echo no-context > /n\nLABEL k=v\n").unwrap();
    let out = fx.build_stdin(&["-t", "nocontext:1"], "-", &df);
    assert!(out.ok(), "build -: {out}");
    let b = fx.built("nocontext:1");
    b.assert_file("n", "no-context\n", 0o644, (0, 0));
    b.assert_cfg("Labels", json!({"k": "v"}));
    // ...where COPY has nothing to copy.
    fs::write(&df, "FROM busybox\nCOPY a.txt /a\n").unwrap();
    let out = fx.build_stdin(&["-t", "nocontext:2"], "-", &df);
    fx.check_failed(&out, "COPY with no context", Some("nocontext:2"));
}

#[test]
fn run_entrypoint_override() {
    let fx = BuildFx::new("entrypoint");
    let ctx = fx.ctx("ep");
    ctx.file(
        "Dockerfile",
        "FROM busybox\nENTRYPOINT [\"/bin/echo\", \"ep\"]\nCMD [\"cmd\"]\n",
    );
    fx.build_ok(&ctx.root, &["-t", "ep:1"]);
    assert_eq!(fx.run_ok(&["ep:1"]), "ep cmd\n", "entrypoint + cmd");
    assert_eq!(fx.run_ok(&["ep:1", "args"]), "ep args\n", "arguments replace CMD");
    assert_eq!(
        fx.run_ok(&["--entrypoint", "/bin/cat", "ep:1", "/etc/hello"]),
        "hello\n",
        "--entrypoint with arguments"
    );
    // As docker: --entrypoint also drops the image's CMD.
    assert_eq!(
        fx.run_ok(&["--entrypoint", "/bin/echo", "ep:1"]),
        "\n",
        "--entrypoint without arguments does not use the image's CMD"
    );
    assert_eq!(
        fx.run_ok(&["--entrypoint", "", "ep:1", "sh", "-c", "echo plain"]),
        "plain\n",
        "--entrypoint '' clears the entrypoint"
    );
}

fn host_ifaces() -> BTreeSet<String> {
    fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn network_modes() {
    let fx = BuildFx::new("network");
    let ctx = fx.ctx("net");
    ctx.file(
        "Dockerfile",
        "FROM busybox\nRUN tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort > /ifaces\n",
    );
    fx.build_ok(&ctx.root, &["-t", "net:none"]);
    fx.built("net:none").assert_file("ifaces", "lo\n", 0o644, (0, 0));
    fx.build_ok(&ctx.root, &["-t", "net:none2", "--network", "none"]);
    fx.built("net:none2").assert_file("ifaces", "lo\n", 0o644, (0, 0));
    // --network host sees the host's interfaces (and is not served from none's cache).
    fx.build_ok(&ctx.root, &["-t", "net:host", "--network", "host"]);
    let got: BTreeSet<String> = fx
        .built("net:host")
        .read("ifaces")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(got, host_ifaces(), "--network host: interfaces seen by RUN");
}

#[test]
fn squash_makes_one_layer() {
    let fx = BuildFx::new("squash");
    let ctx = fx.ctx("squash");
    ctx.file(
        "Dockerfile",
        "FROM busybox\nRUN echo 1 > /one\nCOPY a.txt /a\nRUN rm /etc/remove-me && echo 2 > /two\nCMD [\"sq\"]\n",
    );
    bb_file(&ctx, "a.txt", "a\n");
    fx.build_ok(&ctx.root, &["-t", "sq:plain"]);
    fx.build_ok(&ctx.root, &["-t", "sq:squashed", "--squash"]);
    let plain = fx.built("sq:plain");
    let sq = fx.built("sq:squashed");
    assert_eq!(plain.new_layers(), 3, "unsquashed: one layer per RUN/COPY");
    assert!(
        sq.diff_ids().len() <= 2 && !sq.diff_ids().is_empty(),
        "--squash: the new steps in one layer (docker) or everything in one (podman); got {} layers",
        sq.diff_ids().len()
    );
    common::assert_snapshots_eq(&plain.tree, &sq.tree, "plain", "squashed", "--squash tree");
    sq.assert_absent("etc/remove-me");
    sq.assert_cfg("Cmd", json!(["sq"]));
}

// ---------------------------------------------------------------------------
// Remote sources: ADD of a URL, FROM an image in a registry, --pull.

/// ADD of an http URL from a server of the test: the file name comes from the URL, the
/// mode is 0600 and the owner root (docker's rules), a right `--checksum` passes, a
/// changed download is a changed step, and a wrong checksum, a 404 or a closed port fail
/// naming what went wrong and tag nothing.
#[test]
fn add_from_a_url() {
    let fx = BuildFx::new("add-url");
    let srv = FileServer::start(&[("file.txt", b"from-http\n"), ("data.bin", b"checked data\n")]);
    let sum = format!("sha256:{}", common::sha256_hex(b"checked data\n"));
    let wrong = format!("sha256:{}", "0".repeat(64));
    let good = format!(
        "FROM busybox\nADD {} /dst/\nADD --checksum={sum} {} /f\n",
        srv.url("file.txt"),
        srv.url("data.bin")
    );
    let ctx = fx.ctx("url");
    ctx.file("Dockerfile", &good);
    let first = build_ok_in(&fx.store, &ctx.root, &["-t", "url:1"], &[]);
    fx.assert_clean("after ADD of URLs");
    let reqs = srv.requests();
    for want in ["GET /file.txt", "GET /data.bin"] {
        assert!(reqs.iter().any(|r| r == want), "{want} not requested: {reqs:?}");
    }
    let b = fx.built("url:1");
    b.assert_dir("dst", 0o755, (0, 0));
    b.assert_names_under("dst", &["file.txt"]);
    b.assert_file("dst/file.txt", "from-http\n", 0o600, (0, 0));
    b.assert_file("f", "checked data\n", 0o600, (0, 0));
    assert_eq!(b.new_layers(), 2, "one layer per ADD: {:?}", history_lines(&b));

    // Same downloads: every step from the cache. A changed download: that step and the
    // ones after it again.
    let again = build_ok_in(&fx.store, &ctx.root, &["-t", "url:2"], &[]);
    again.assert_all_cached("rebuild with the same downloads");
    assert_eq!(again.id, first.id);
    srv.set("file.txt", b"changed on the server\n");
    let changed = build_ok_in(&fx.store, &ctx.root, &["-t", "url:3"], &[]);
    changed.assert_cached_exactly(&[], "after the URL's content changed");
    fx.built("url:3")
        .assert_file("dst/file.txt", "changed on the server\n", 0o600, (0, 0));

    let fails = |name: &str, df: String, line: usize, tag: &str, words: &[&str]| {
        let c = fx.ctx(name);
        c.file("Dockerfile", df);
        let out = build_in(&fx.store, &c.root, &["-t", tag], &[]);
        fx.check_failed(&out, name, Some(tag));
        let msg = combined(&out);
        for w in words {
            assert!(
                msg.to_lowercase().contains(&w.to_lowercase()),
                "{name}: the error should mention {w:?}: {out}"
            );
        }
        assert!(
            out.stderr.contains(&format!("Dockerfile:{line}")),
            "{name}: the error should name Dockerfile:{line}: {out}"
        );
    };
    // A checksum that does not match the download.
    fails(
        "bad-checksum",
        format!(
            "FROM busybox\nADD --checksum={wrong} {} /g\n",
            srv.url("data.bin")
        ),
        2,
        "url-bad-sum:1",
        &["checksum", &wrong],
    );
    // Nothing at that URL.
    let missing = srv.url("missing.txt");
    fails(
        "not-found",
        format!("FROM busybox\nADD {missing} /m\n"),
        2,
        "url-404:1",
        &[&missing, "404"],
    );
    // Nobody listening.
    let closed = format!("http://{}/x.txt", closed_addr());
    fails(
        "closed-port",
        format!("FROM busybox\nADD {closed} /x\n"),
        2,
        "url-closed:1",
        &[&closed],
    );
    // A wrong checksum on a step the cache holds with the right one still fails: the
    // checksum is checked on every build (BuildKit verifies it on every download).
    srv.set("file.txt", b"from-http\n");
    fails(
        "bad-checksum-cached",
        good.replace(&sum, &wrong),
        3,
        "url-bad-sum:2",
        &["checksum", &wrong],
    );
}

/// FROM an image in a registry (a `docker-registry` on loopback, as tests/registry.rs
/// starts it): a store without it pulls it, `images` lists it under the registry's name;
/// with the tag moved to a new image, a build without --pull keeps the store's copy and
/// `--pull` fetches the new one (a file only the new base has, the RUN run again).
#[test]
fn from_a_registry_image_and_pull() {
    let fx = BuildFx::new("pull");
    let reg = Registry::plain();
    let base = format!("{}/lib/busybox:1", reg.addr());
    // Auth files of the test's own, never the machine's.
    let home = fx.env.dir("pull-home");
    let xdg = fx.env.dir("pull-run");
    fs::set_permissions(&xdg, fs::Permissions::from_mode(0o700)).unwrap();
    let env = [("HOME", s(&home)), ("XDG_RUNTIME_DIR", s(&xdg))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    fx.store.ok_env(&["push", "busybox:latest", &base], &env);
    let v1 = fx.store.image_id("busybox:latest");

    let fresh = Store::in_env(&fx.env, "fresh");
    assert!(fresh.images().is_empty(), "the fresh store is not empty");
    let ctx = fx.ctx("pull");
    ctx.file(
        "Dockerfile",
        format!("FROM {base}\nRUN {UUID} > /stamp && cat /etc/hello > /hello-copy\nCMD [\"cat\", \"/hello-copy\"]\n"),
    );
    let first = build_ok_in(&fresh, &ctx.root, &["-t", "from-reg:1"], &env);
    let listed = fresh.images();
    assert!(
        listed.iter().any(|(_, tags)| tags.contains(&base)),
        "`strata images` should list the pulled base {base}: {listed:?}\n{}",
        fresh.images_text()
    );
    assert_eq!(fresh.image_id(&base), v1, "the pulled base is the pushed busybox");
    let b1 = Built::of(&fresh, "from-reg:1", &fx.env.fresh_dir("export-"), "strata");
    b1.assert_file("hello-copy", "hello\n", 0o644, (0, 0));
    b1.assert_absent("only-in-v2");
    b1.assert_cfg("Cmd", json!(["cat", "/hello-copy"]));
    assert_eq!(b1.diff_ids().len(), 2, "busybox's layer and the RUN's");
    assert_eq!(
        fresh.run(&["run", "--rm", "from-reg:1"]).stdout,
        "hello\n",
        "run of the image built on the pulled base"
    );

    // A new image under the same tag.
    let v2ctx = fx.ctx("v2");
    v2ctx.file("Dockerfile", "FROM busybox\nRUN echo v2 > /only-in-v2\n");
    fx.build_ok(&v2ctx.root, &["-t", "busybox:v2"]);
    let v2 = fx.store.image_id("busybox:v2");
    fx.store.ok_env(&["push", "busybox:v2", &base], &env);

    // Without --pull the base in the store is used: nothing changes.
    let second = build_ok_in(&fresh, &ctx.root, &["-t", "from-reg:2"], &env);
    second.assert_all_cached("rebuild without --pull");
    assert_eq!(second.id, first.id, "without --pull: the same image");
    assert_eq!(
        fresh.image_id(&base),
        v1,
        "without --pull the base is not fetched again"
    );

    // --pull: the new base, and the RUN on it runs again.
    let third = build_ok_in(&fresh, &ctx.root, &["-t", "from-reg:3", "--pull"], &env);
    assert_eq!(fresh.image_id(&base), v2, "--pull moves {base} to the new image");
    assert!(
        !third.step(2).cached(),
        "the RUN on the new base must not come from the cache: {}",
        third.out.stdout
    );
    let b3 = Built::of(&fresh, "from-reg:3", &fx.env.fresh_dir("export-"), "strata");
    b3.assert_file("only-in-v2", "v2\n", 0o644, (0, 0));
    b3.assert_file("hello-copy", "hello\n", 0o644, (0, 0));
    assert_ne!(b3.read("stamp"), b1.read("stamp"), "the RUN ran on the new base");
    assert_eq!(b3.diff_ids().len(), 3, "busybox's layer, v2's RUN and this RUN");
    let m = mounts_under(&fresh.root);
    assert!(m.is_empty(), "mounts left under the fresh store: {m:?}");
}

// ---------------------------------------------------------------------------
// Rootless.

/// A build as an unprivileged user created by the test, in the user's own store (busybox
/// imported by the user): RUN as root of the build's user namespace, COPY of a file and a
/// directory the user owns, WORKDIR creating a directory, metadata steps. The result is
/// what `docker build` makes of the Dockerfile: what root creates in RUN and what COPY
/// writes belongs to 0:0 in the layers, whatever uid the user has on the host. The image is
/// saved by the user and loaded into the fixture's root store to read the layers as they are.
#[test]
fn rootless_build() {
    let fx = BuildFx::new("rootless");
    let user = RootlessUser::create(&fx.env);
    user.ok(&[
        "import",
        &s(&fx.busybox_tar),
        "busybox:latest",
        "-c",
        r#"CMD ["/bin/sh"]"#,
    ]);
    let ctx = fx.ctx("rootless");
    // Rootless, the default `--overlay auto` is strata's FUSE overlay (recorded in the RUN).
    ctx.file(
        "Dockerfile",
        format!(
            "FROM busybox\n\
             RUN echo built-rootless > /built && id -u > /uid-in-run && mkdir -p /made/sub && {ROOT_FSTYPE_CMD}\n\
             COPY a.txt /copied/a.txt\n\
             COPY dir/ /copied/dir/\n\
             ENV ROOTLESS=yes\n\
             WORKDIR /work\n\
             CMD [\"cat\", \"/built\"]\n"
        ),
    );
    bb_file(&ctx, "a.txt", "a\n");
    ctx.file_mode("dir/priv", "p\n", 0o600);
    ctx.file_mode("dir/exe", "x\n", 0o755);
    user.chown_tree(&ctx.root);

    let out = user.ok(&["build", "-t", "rl:1", &s(&ctx.root)]);
    let b = BuildOut::parse(out);
    user.assert_clean("after the rootless build");
    assert_eq!(
        user.ok(&["run", "--rm", "rl:1"]).stdout,
        "built-rootless\n",
        "rootless run of the built image (its CMD)"
    );
    let foreign = user.foreign_files_in_store();
    assert!(
        foreign.is_empty(),
        "files in the rootless store not owned by the user: {foreign:#?}"
    );

    let saved = user.base.join("rl.tar");
    user.ok(&["save", "-o", &s(&saved), "rl:1"]);
    fx.store.ok(&["load", "-i", &s(&saved)]);
    assert_eq!(
        fx.store.image_id("rl:1"),
        b.id,
        "the saved image is the built one"
    );
    let img = fx.built("rl:1");
    img.assert_file("built", "built-rootless\n", 0o644, (0, 0));
    img.assert_file("uid-in-run", "0\n", 0o644, (0, 0));
    img.assert_file("root-fstype", "fuse.strata\n", 0o644, (0, 0));
    img.assert_dir("made/sub", 0o755, (0, 0));
    img.assert_file("copied/a.txt", "a\n", 0o644, (0, 0));
    img.assert_file("copied/dir/priv", "p\n", 0o600, (0, 0));
    img.assert_file("copied/dir/exe", "x\n", 0o755, (0, 0));
    img.assert_dir("work", 0o755, (0, 0));
    // busybox's own files keep their owners (a file of uid 1000 among them).
    img.assert_file("etc/hello", "hello\n", 0o644, (0, 0));
    let data = img.entry("var/lib/app/data");
    assert_eq!(
        (data.uid, data.gid),
        (1000, 1000),
        "busybox's /var/lib/app/data: {data}"
    );
    img.assert_env("ROOTLESS", "yes");
    img.assert_cfg("Cmd", json!(["cat", "/built"]));
    img.assert_cfg("WorkingDir", json!("/work"));
    assert_eq!(
        img.new_layers(),
        4,
        "RUN, two COPYs and WORKDIR: {:?}",
        history_lines(&img)
    );

    // The cache works rootless too.
    let again = BuildOut::parse(user.ok(&["build", "-t", "rl:2", &s(&ctx.root)]));
    again.assert_all_cached("rootless rebuild");
    assert_eq!(again.id, b.id, "rootless cached rebuild");
    user.assert_clean("after the rootless rebuild");
}

// ---------------------------------------------------------------------------
// The cache.

fn cache_ctx(fx: &BuildFx) -> Layer {
    let ctx = fx.ctx("cache");
    ctx.file(
        "Dockerfile",
        format!(
            "FROM busybox\nRUN {UUID} > /s1\nCOPY a.txt /a.txt\nRUN {UUID} > /s2\nCOPY b.txt /b.txt\nRUN {UUID} > /s3\nCMD [\"c\"]\n"
        ),
    );
    bb_file(&ctx, "a.txt", "a1\n");
    bb_file(&ctx, "b.txt", "b1\n");
    ctx
}

#[test]
fn cache_rebuild_reuses_every_step() {
    let fx = BuildFx::new("cache-all");
    let ctx = cache_ctx(&fx);
    let first = fx.build_ok(&ctx.root, &["-t", "c:1"]);
    assert!(first.cached().is_empty(), "cold build: {}", first.out.stdout);
    let b1 = fx.built("c:1");
    let objects = fx.store_objects();

    // In a later second: timestamps of the first build must come from the cache too.
    thread::sleep(Duration::from_millis(1100));
    let second = fx.build_ok(&ctx.root, &["-t", "c:2"]);
    second.assert_all_cached("rebuild with nothing changed");
    assert_eq!(second.id, first.id, "a fully cached rebuild is the same image");
    assert_eq!(
        fx.store_objects(),
        objects,
        "a fully cached rebuild must not add blobs or layers to the store"
    );
    // No RUN ran again: the stamps are the first build's.
    let b2 = fx.built("c:2");
    for f in ["s1", "s2", "s3"] {
        assert_eq!(b2.read(f), b1.read(f), "/{f} after a cached rebuild");
    }
    fx.assert_clean("after the cached rebuild");

    // A new mtime on a copied file is not a change.
    let past = (1_600_000_000, 0);
    common::set_times(&ctx.path("a.txt"), past, past, true).unwrap();
    let third = fx.build_ok(&ctx.root, &["-t", "c:3"]);
    third.assert_all_cached("rebuild after touching a.txt (mtime only)");
    assert_eq!(third.id, first.id, "mtime-only change: same image");
}

#[test]
fn cache_changed_file_rebuilds_from_its_copy() {
    let fx = BuildFx::new("cache-file");
    let ctx = cache_ctx(&fx);
    let first = fx.build_ok(&ctx.root, &["-t", "c:1"]);
    let b1 = fx.built("c:1");

    // Steps: 1 FROM, 2 RUN s1, 3 COPY a, 4 RUN s2, 5 COPY b, 6 RUN s3, 7 CMD.
    bb_file(&ctx, "b.txt", "b2\n");
    let second = fx.build_ok(&ctx.root, &["-t", "c:2"]);
    second.assert_cached_exactly(&[2, 3, 4], "after changing b.txt");
    assert_ne!(second.id, first.id);
    let b2 = fx.built("c:2");
    assert_eq!(b2.read("s1"), b1.read("s1"));
    assert_eq!(b2.read("s2"), b1.read("s2"));
    assert_ne!(
        b2.read("s3"),
        b1.read("s3"),
        "the RUN after the changed COPY ran again"
    );
    b2.assert_file("b.txt", "b2\n", 0o644, (0, 0));

    bb_file(&ctx, "a.txt", "a2\n");
    let third = fx.build_ok(&ctx.root, &["-t", "c:3"]);
    third.assert_cached_exactly(&[2], "after changing a.txt");
    let b3 = fx.built("c:3");
    assert_eq!(b3.read("s1"), b1.read("s1"));
    assert_ne!(b3.read("s2"), b2.read("s2"));
    b3.assert_file("a.txt", "a2\n", 0o644, (0, 0));

    // A mode change is a change.
    ctx.chmod("b.txt", 0o600);
    let fourth = fx.build_ok(&ctx.root, &["-t", "c:4"]);
    fourth.assert_cached_exactly(&[2, 3, 4], "after chmod b.txt");
    fx.built("c:4").assert_file("b.txt", "b2\n", 0o600, (0, 0));

    // Back to the first content: the first build's layers are still in the cache.
    bb_file(&ctx, "a.txt", "a1\n");
    bb_file(&ctx, "b.txt", "b1\n");
    let fifth = fx.build_ok(&ctx.root, &["-t", "c:5"]);
    fifth.assert_all_cached("back to the first context");
    assert_eq!(fifth.id, first.id);
}

#[test]
fn cache_build_arg_invalidates_the_steps_that_see_it() {
    let fx = BuildFx::new("cache-arg");
    let ctx = fx.ctx("arg");
    ctx.file(
        "Dockerfile",
        format!("FROM busybox\nRUN {UUID} > /s0\nCOPY a.txt /a\nARG V=1\nRUN echo $V > /v && {UUID} > /s1\n"),
    );
    bb_file(&ctx, "a.txt", "a\n");
    let first = fx.build_ok(&ctx.root, &["-t", "arg:1"]);
    let b1 = fx.built("arg:1");
    b1.assert_file("v", "1\n", 0o644, (0, 0));

    let second = fx.build_ok(&ctx.root, &["-t", "arg:2", "--build-arg", "V=2"]);
    // RUN and COPY before the ARG are reused; the RUN after it (which sees V) is not.
    for n in [2, 3] {
        assert!(
            second.step(n).cached(),
            "step {n} before the ARG: {}",
            second.out.stdout
        );
    }
    assert!(
        !second.step(5).cached(),
        "the RUN that sees V: {}",
        second.out.stdout
    );
    let b2 = fx.built("arg:2");
    b2.assert_file("v", "2\n", 0o644, (0, 0));
    assert_eq!(b2.read("s0"), b1.read("s0"));
    assert_ne!(b2.read("s1"), b1.read("s1"));

    // The same value as the default: the first build again.
    let third = fx.build_ok(&ctx.root, &["-t", "arg:3", "--build-arg", "V=1"]);
    third.assert_all_cached("--build-arg V=1 (the default)");
    assert_eq!(third.id, first.id);
    // A build arg no instruction declares changes nothing.
    let fourth = fx.build_ok(&ctx.root, &["-t", "arg:4", "--build-arg", "OTHER=x"]);
    fourth.assert_all_cached("an undeclared --build-arg");
    assert_eq!(fourth.id, first.id);
}

#[test]
fn cache_no_cache_rebuilds_everything() {
    let fx = BuildFx::new("cache-none");
    let ctx = cache_ctx(&fx);
    let first = fx.build_ok(&ctx.root, &["-t", "c:1"]);
    let b1 = fx.built("c:1");
    let second = fx.build_ok(&ctx.root, &["-t", "c:2", "--no-cache"]);
    assert!(second.cached().is_empty(), "--no-cache: {}", second.out.stdout);
    assert_ne!(second.id, first.id);
    let b2 = fx.built("c:2");
    for f in ["s1", "s2", "s3"] {
        assert_ne!(b2.read(f), b1.read(f), "/{f} with --no-cache");
    }
}

#[test]
fn cache_survives_gc() {
    let fx = BuildFx::new("cache-gc");
    let ctx = cache_ctx(&fx);
    let first = fx.build_ok(&ctx.root, &["-t", "c:1"]);
    fx.store.ok(&["gc"]);
    thread::sleep(Duration::from_millis(1100));
    let second = fx.build_ok(&ctx.root, &["-t", "c:1"]);
    second.assert_all_cached("rebuild after gc");
    assert_eq!(second.id, first.id);

    // The cache does not depend on the tag: with the image removed and gc run, the steps
    // are still cached (docker keeps its build cache apart from images as well).
    fx.store.ok(&["rmi", "c:1"]);
    fx.store.ok(&["gc"]);
    let third = fx.build_ok(&ctx.root, &["-t", "c:1"]);
    third.assert_all_cached("rebuild after rmi + gc");
    assert_eq!(third.id, first.id);
}

// ---------------------------------------------------------------------------
// Differential: docker build (BuildKit).

#[test]
fn differential_against_docker_build() {
    let fx = BuildFx::new("docker-diff");
    let Some(dkb) = DockerBuilder::start(&fx) else {
        return;
    };
    let mut failures: Vec<String> = Vec::new();
    let mut compared = Vec::new();
    for c in cases().into_iter().filter(|c| c.docker) {
        let ctx = c.make_ctx(&fx);
        let r = catch_unwind(AssertUnwindSafe(|| {
            // docker first: a failure there means the case (not strata) is wrong.
            let env: Vec<(&str, &str)> = c.env.clone();
            if let Some(p) = &c.parent {
                let f = s(&ctx.path("Dockerfile.parent"));
                dkb.build_ok(&ctx.root, p.tag, &["-f", &f], &env);
                (p.check)(&dkb.built(&fx.env, p.tag, &format!("{}-parent", c.name)));
            }
            let dtag = c.tag("docker");
            dkb.build_ok(&ctx.root, &dtag, &c.args, &env);
            let theirs = dkb.built(&fx.env, &dtag, c.name);
            (c.check)(&theirs);
            theirs
        }));
        let theirs = match r {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!(
                    "[{}] docker side (the case's expectation): {}",
                    c.name,
                    panic_msg(&e)
                ));
                continue;
            }
        };
        let r = catch_unwind(AssertUnwindSafe(|| {
            let ours = c.build_strata(&fx, &ctx);
            (c.check)(&ours);
            ours
        }));
        let ours = match r {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("[{}] strata side: {}", c.name, panic_msg(&e)));
                continue;
            }
        };
        let (diffs, skipped) = compare_images(&ours, &theirs);
        if !skipped.is_empty() {
            eprintln!(
                "[{}] runtime paths that differ, not compared: {skipped:?}",
                c.name
            );
        }
        if !diffs.is_empty() {
            failures.push(common::format_diffs(
                &format!("[{}] strata vs docker build", c.name),
                &diffs,
            ));
        }
        compared.push(c.name);
    }
    eprintln!("compared with docker build: {compared:?}");
    assert!(
        failures.is_empty(),
        "{} of the docker-comparable cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    drop(dkb);
}

/// The two mounts a build can use: every case of the table builds on strata's FUSE overlay
/// (`--overlay fuse`) and on the kernel's overlayfs (`--overlay kernel`), meets its own
/// expectations on both, and both give the same image (trees, config, layer count); no
/// mount is left either way. (The other table tests build with the default, `auto`.)
#[test]
fn kernel_overlay_builds_match_fuse() {
    let fx = BuildFx::new("kernel-overlay");
    let mut failures: Vec<String> = Vec::new();
    let mut compared = Vec::new();
    for c in cases() {
        let ctx = c.make_ctx(&fx);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let fuse = c.build_strata_with(&fx, &ctx, "fuse", &["--overlay", "fuse"]);
            (c.check)(&fuse);
            let kernel = c.build_strata_with(&fx, &ctx, "kernel", &["--overlay", "kernel"]);
            (c.check)(&kernel);
            compare_images(&kernel, &fuse).0
        }));
        match r {
            Ok(diffs) if diffs.is_empty() => compared.push(c.name),
            Ok(diffs) => failures.push(common::format_diffs(
                &format!("[{}] --overlay kernel vs fuse", c.name),
                &diffs,
            )),
            Err(e) => failures.push(format!("[{}]: {}", c.name, panic_msg(&e))),
        }
    }
    eprintln!("kernel overlay matched FUSE on: {compared:?}");
    assert!(
        failures.is_empty(),
        "{} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A value clap does not know is refused, naming the option.
    let out = fx.store.run(&["build", "--overlay", "bogus", "."]);
    assert!(!out.ok() && out.stderr.contains("--overlay"), "{out}");
}

/// A command that records the type of the file system a RUN step's root is on.
const ROOT_FSTYPE_CMD: &str = r#"awk '$5 == "/" { for (i = 7; i <= NF; i++) if ($i == "-") { print $(i + 1); exit } }' /proc/self/mountinfo > /root-fstype"#;

/// The default `--overlay auto`: as root the steps run on the kernel's overlayfs; where the
/// kernel refuses the mount (a store inside an overlayfs, which overlayfs cannot take as its
/// upper) the build says so once and goes on with strata's FUSE overlay, to the same image.
#[test]
fn default_overlay_is_the_kernels_with_a_fuse_fallback() {
    let fx = BuildFx::new("auto-overlay");
    let ctx = fx.ctx("auto");
    ctx.file(
        "Dockerfile",
        format!("FROM busybox\nRUN {ROOT_FSTYPE_CMD}\nCOPY a.txt /a.txt\nRUN cat /a.txt > /b.txt\n"),
    );
    bb_file(&ctx, "a.txt", "a\n");
    let fstype = |st: &Store, tag: &str| {
        let out = st.ok(&["run", "--rm", tag, "cat", "/root-fstype"]);
        out.stdout.trim().to_string()
    };
    for (args, want) in [
        (&[][..], "overlay"),
        (&["--overlay", "auto"][..], "overlay"),
        (&["--overlay", "kernel"][..], "overlay"),
        (&["--overlay", "fuse"][..], "fuse.strata"),
    ] {
        let mut a = vec!["--no-cache", "-t", "auto:1"];
        a.extend_from_slice(args);
        let out = fx.build_ok(&ctx.root, &a);
        assert!(
            !out.out.stderr.contains("warning"),
            "{args:?}: {}",
            out.out.stderr
        );
        assert_eq!(
            fstype(&fx.store, "auto:1"),
            want,
            "root of the RUN steps with {args:?}"
        );
        let img = fx.built("auto:1");
        img.assert_file("b.txt", "a\n", 0o644, (0, 0));
        assert_eq!(img.new_layers(), 3, "RUN, COPY, RUN with {args:?}");
    }

    // A store inside the kernel's overlayfs: overlayfs refuses it as an upper.
    let base = fx.env.dir("nested");
    let spec = common::MountSpec {
        lowers: vec![fx.env.dir("nested/lower")],
        upper: fx.env.dir("nested/upper"),
        work: fx.env.dir("nested/work"),
        mnt: fx.env.dir("nested/mnt"),
    };
    let outer = common::KernelMount::new(&spec);
    let st = Store::at(&spec.mnt.join("store"), &base.join("tmp"));
    st.ok(&["import", &s(&fx.busybox_tar), "busybox:latest"]);
    let out = st.ok(&["build", "-t", "auto:2", &s(&ctx.root)]);
    assert_eq!(
        out.stderr
            .matches("this build goes on with strata's FUSE overlay")
            .count(),
        1,
        "one warning when the kernel refuses: {out}"
    );
    assert!(out.stderr.contains("overlayfs"), "{out}");
    assert_eq!(fstype(&st, "auto:2"), "fuse.strata", "after the fallback");
    assert_eq!(st.ok(&["run", "--rm", "auto:2", "cat", "/b.txt"]).stdout, "a\n");
    // --overlay kernel does not fall back: it fails, naming the option to use.
    let out = st.run(&[
        "build",
        "--overlay",
        "kernel",
        "--no-cache",
        "-t",
        "auto:3",
        &s(&ctx.root),
    ]);
    assert!(!out.ok() && out.stderr.contains("--overlay fuse"), "{out}");
    let tagged = st.run(&["inspect", "auto:3"]);
    assert!(!tagged.ok(), "nothing tagged by the failed build: {tagged}");
    let left: Vec<_> = fs::read_dir(spec.mnt.join("store/build"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "build scratch left behind: {left:?}");
    drop(st);
    outer.umount().unwrap();
}

fn panic_msg(e: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = e.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "(non-string panic)".into()
    }
}

/// The harness: docker's own build of a table case matches that case's expectations and
/// a docker-built image compares equal to itself (no strata build involved).
#[test]
fn harness_docker_build_and_compare() {
    let fx = BuildFx::new("docker-harness");
    let Some(dkb) = DockerBuilder::start(&fx) else {
        return;
    };
    let c = case("copy_rules");
    let ctx = c.make_ctx(&fx);
    dkb.build_ok(&ctx.root, "harness:1", &c.args, &[]);
    let a = dkb.built(&fx.env, "harness:1", "h1");
    (c.check)(&a);
    let b = dkb.built(&fx.env, "harness:1", "h2");
    let (d, _) = compare_images(&a, &b);
    assert!(d.is_empty(), "{}", common::format_diffs("docker vs itself", &d));
    assert!(a.new_layers() > 0, "docker image layers");
    drop(dkb);
}
