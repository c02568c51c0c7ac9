//! A Dockerfile as strata executes it: `parse-dockerfile` does the grammar (continuations,
//! comments, the `escape` directive, JSON and shell forms, heredocs); this turns its tree into
//! steps that carry their line and text, grouped into stages.

use std::collections::BTreeMap;

use super::BuildError;
use anyhow::{bail, Result};
use parse_dockerfile::{Command, HealthcheckArguments, Instruction, JsonOrStringArray, Source};

/// A command in exec (JSON) or shell form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// `["a", "b"]`: no shell, no expansion.
    Exec(Vec<String>),
    /// Text for the stage's SHELL, continuations removed.
    Shell(String),
}

/// A COPY/ADD source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Src {
    /// A path or glob in the context (or the `--from` tree), or a URL for ADD.
    Path(String),
    /// `COPY <<NAME dest`: a file named NAME with this content.
    Inline {
        /// The delimiter, which is also the file name.
        name: String,
        /// Content.
        body: String,
        /// Whether variables are expanded in it (unquoted delimiter).
        expand: bool,
    },
}

/// A `--flag[=value]`.
pub type Flags = Vec<(String, Option<String>)>;

/// What a step does.
#[derive(Debug, Clone)]
pub enum Kind {
    /// FROM image [AS name].
    From {
        /// Image, stage name or `scratch` (before expansion).
        image: String,
        /// AS name.
        name: Option<String>,
        /// Flags (`--platform`).
        flags: Flags,
    },
    /// RUN.
    Run {
        /// The command.
        cmd: Cmd,
        /// Heredoc bodies, in order, with their delimiters.
        heredocs: Vec<(String, String)>,
        /// Flags (`--network`, `--mount` is refused).
        flags: Flags,
    },
    /// COPY (add = false) or ADD.
    Copy {
        /// ADD.
        add: bool,
        /// Sources.
        srcs: Vec<Src>,
        /// Destination (before expansion).
        dest: String,
        /// Flags (`--from`, `--chown`, `--chmod`, `--link`, `--checksum`).
        flags: Flags,
    },
    /// CMD.
    Cmd(Cmd),
    /// ENTRYPOINT.
    Entrypoint(Cmd),
    /// ENV (raw arguments).
    Env(String),
    /// ARG (raw arguments).
    Arg(String),
    /// LABEL (raw arguments).
    Label(String),
    /// MAINTAINER.
    Maintainer(String),
    /// EXPOSE (raw words).
    Expose(Vec<String>),
    /// VOLUME: paths; raw words when not JSON.
    Volume(Vec<String>),
    /// USER.
    User(String),
    /// WORKDIR.
    Workdir(String),
    /// STOPSIGNAL.
    Stopsignal(String),
    /// SHELL (JSON).
    Shell(Vec<String>),
    /// HEALTHCHECK: None for NONE.
    Healthcheck(Option<(Flags, Cmd)>),
    /// ONBUILD: the trigger's text.
    Onbuild(String),
}

/// One instruction.
#[derive(Debug, Clone)]
pub struct Step {
    /// 1-based line of its keyword.
    pub line: usize,
    /// The instruction as written, continuations joined.
    pub text: String,
    /// What it does.
    pub kind: Kind,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone)]
pub struct Dockerfile {
    /// The escape character.
    pub escape: char,
    /// ARGs before the first FROM.
    pub global_args: Vec<Step>,
    /// Stages: each starts with its FROM.
    pub stages: Vec<Vec<Step>>,
}

fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The logical line starting at `start`: continuations (escape, optional blanks, newline)
/// removed, and comment lines inside a continuation dropped, as docker does.
fn logical_line(text: &str, start: usize, escape: char) -> String {
    let mut out = String::new();
    let lines = text[start..].split('\n');
    let mut first = true;
    for l in lines {
        let l = l.strip_suffix('\r').unwrap_or(l);
        if !first && l.trim_start().starts_with('#') {
            continue;
        }
        first = false;
        let t = l.trim_end();
        match t.strip_suffix(escape) {
            // An escaped escape is not a continuation.
            Some(rest) if !rest.ends_with(escape) => out.push_str(rest),
            _ => {
                out.push_str(l);
                break;
            }
        }
    }
    out.trim().to_string()
}

/// Shell-form text as docker runs it: continuations removed.
fn shell_text(raw: &str, escape: char) -> String {
    let mut out = String::new();
    let mut it = raw.split('\n').peekable();
    let mut first = true;
    while let Some(l) = it.next() {
        let l = l.strip_suffix('\r').unwrap_or(l);
        if !first && l.trim_start().starts_with('#') {
            continue;
        }
        first = false;
        let t = l.trim_end();
        match t.strip_suffix(escape) {
            Some(rest) if !rest.ends_with(escape) && it.peek().is_some() => out.push_str(rest),
            _ => {
                out.push_str(l);
                if it.peek().is_some() {
                    out.push('\n');
                }
            }
        }
    }
    out
}

fn cmd(c: &Command<'_>, escape: char) -> Cmd {
    match c {
        Command::Exec(v) => Cmd::Exec(v.value.iter().map(|s| s.value.to_string()).collect()),
        Command::Shell(s) => Cmd::Shell(shell_text(s.value, escape)),
        #[allow(unreachable_patterns)]
        _ => Cmd::Shell(String::new()),
    }
}

fn flags(f: &[parse_dockerfile::Flag<'_>]) -> Flags {
    f.iter()
        .map(|f| {
            (
                f.name.value.to_string(),
                f.value.as_ref().map(|v| v.value.to_string()),
            )
        })
        .collect()
}

/// The delimiters of the heredocs an instruction line opens (`<<EOF`, `<<-"EOF"`), in order.
fn heredoc_names(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = line.as_bytes();
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'<' && b[i + 1] == b'<' {
            let mut j = i + 2;
            if j < b.len() && b[j] == b'-' {
                j += 1;
            }
            if j < b.len() && (b[j] == b'"' || b[j] == b'\'') {
                j += 1;
            }
            let s = j;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if j > s {
                out.push(line[s..j].to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

fn convert(ins: &Instruction<'_>, text: &str, escape: char, start: usize) -> Result<Kind> {
    let line = logical_line(text, start, escape);
    Ok(match ins {
        Instruction::From(f) => Kind::From {
            image: f.image.value.to_string(),
            name: f.as_.as_ref().map(|(_, n)| n.value.to_string()),
            flags: flags(&f.options[..]),
        },
        Instruction::Run(r) => {
            let names = heredoc_names(&line);
            Kind::Run {
                cmd: cmd(&r.arguments, escape),
                heredocs: r
                    .here_docs
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        (
                            names.get(i).cloned().unwrap_or_else(|| "EOF".into()),
                            h.value.to_string(),
                        )
                    })
                    .collect(),
                flags: flags(&r.options[..]),
            }
        }
        Instruction::Copy(c) => Kind::Copy {
            add: false,
            srcs: srcs(&c.src, &line),
            dest: c.dest.value.to_string(),
            flags: flags(&c.options[..]),
        },
        Instruction::Add(c) => Kind::Copy {
            add: true,
            srcs: srcs(&c.src, &line),
            dest: c.dest.value.to_string(),
            flags: flags(&c.options[..]),
        },
        Instruction::Cmd(c) => Kind::Cmd(cmd(&c.arguments, escape)),
        Instruction::Entrypoint(c) => Kind::Entrypoint(cmd(&c.arguments, escape)),
        Instruction::Env(e) => Kind::Env(e.arguments.value.to_string()),
        Instruction::Arg(a) => Kind::Arg(a.arguments.value.to_string()),
        Instruction::Label(l) => Kind::Label(l.arguments.value.to_string()),
        Instruction::Maintainer(m) => Kind::Maintainer(m.name.value.to_string()),
        Instruction::Expose(e) => Kind::Expose(e.arguments.iter().map(|a| a.value.to_string()).collect()),
        Instruction::Volume(v) => Kind::Volume(match &v.arguments {
            JsonOrStringArray::Json(j) => j.value.iter().map(|a| a.value.to_string()).collect(),
            JsonOrStringArray::String(s) => s.iter().map(|a| a.value.to_string()).collect(),
        }),
        Instruction::User(u) => Kind::User(u.arguments.value.to_string()),
        Instruction::Workdir(w) => Kind::Workdir(w.arguments.value.to_string()),
        Instruction::Stopsignal(s) => Kind::Stopsignal(s.arguments.value.to_string()),
        Instruction::Shell(s) => Kind::Shell(s.arguments.iter().map(|a| a.value.to_string()).collect()),
        Instruction::Healthcheck(h) => match &h.arguments {
            HealthcheckArguments::Cmd { arguments, .. } => {
                Kind::Healthcheck(Some((flags(&h.options[..]), cmd(arguments, escape))))
            }
            _ => Kind::Healthcheck(None),
        },
        Instruction::Onbuild(_) => {
            let rest = line
                .split_once(char::is_whitespace)
                .map(|(_, r)| r.trim().to_string())
                .unwrap_or_default();
            Kind::Onbuild(rest)
        }
        #[allow(unreachable_patterns)]
        _ => bail!("unsupported instruction: {line}"),
    })
}

fn srcs(src: &[Source<'_>], line: &str) -> Vec<Src> {
    let names = heredoc_names(line);
    let mut k = 0;
    src.iter()
        .map(|s| match s {
            Source::Path(p) => Src::Path(p.value.to_string()),
            Source::HereDoc(h) => {
                let name = names.get(k).cloned().unwrap_or_else(|| "EOF".into());
                k += 1;
                Src::Inline {
                    name,
                    body: h.value.to_string(),
                    expand: h.expand,
                }
            }
            #[allow(unreachable_patterns)]
            _ => Src::Path(String::new()),
        })
        .collect()
}

/// The keyword span start of an instruction (its line).
fn start_of(ins: &Instruction<'_>) -> usize {
    match ins {
        Instruction::Add(i) => i.add.span.start,
        Instruction::Arg(i) => i.arg.span.start,
        Instruction::Cmd(i) => i.cmd.span.start,
        Instruction::Copy(i) => i.copy.span.start,
        Instruction::Entrypoint(i) => i.entrypoint.span.start,
        Instruction::Env(i) => i.env.span.start,
        Instruction::Expose(i) => i.expose.span.start,
        Instruction::From(i) => i.from.span.start,
        Instruction::Healthcheck(i) => i.healthcheck.span.start,
        Instruction::Label(i) => i.label.span.start,
        Instruction::Maintainer(i) => i.maintainer.span.start,
        Instruction::Onbuild(i) => i.onbuild.span.start,
        Instruction::Run(i) => i.run.span.start,
        Instruction::Shell(i) => i.shell.span.start,
        Instruction::Stopsignal(i) => i.stopsignal.span.start,
        Instruction::User(i) => i.user.span.start,
        Instruction::Volume(i) => i.volume.span.start,
        Instruction::Workdir(i) => i.workdir.span.start,
        #[allow(unreachable_patterns)]
        _ => 0,
    }
}

/// The delimiters of heredocs a shell command opens after other text (`cat <<EOF > f`), with
/// whether tabs are stripped. Not inside quotes; `<<<` is a here-string, not a heredoc.
fn inner_heredocs(cmd: &str) -> Vec<(String, bool)> {
    let b = cmd.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut q) = (0, None::<u8>);
    while i < b.len() {
        let c = b[i];
        match q {
            Some(x) if c == x => q = None,
            Some(_) => {}
            None if c == b'\'' || c == b'"' => q = Some(c),
            None if c == b'<' && b.get(i + 1) == Some(&b'<') && b.get(i + 2) != Some(&b'<') => {
                let mut j = i + 2;
                let strip = b.get(j) == Some(&b'-');
                if strip {
                    j += 1;
                }
                while b.get(j) == Some(&b' ') {
                    j += 1;
                }
                let quote = b.get(j).copied().filter(|c| *c == b'"' || *c == b'\'');
                if quote.is_some() {
                    j += 1;
                }
                let st = j;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'-') {
                    j += 1;
                }
                if j > st {
                    out.push((cmd[st..j].to_string(), strip));
                }
                if quote.is_some() && b.get(j) == quote.as_ref() {
                    j += 1;
                }
                i = j;
                continue;
            }
            None => {}
        }
        i += 1;
    }
    out
}

/// parse-dockerfile reads a heredoc only where it opens the RUN line. `RUN cmd <<EOF` is
/// rewritten as a `RUN <<X` script holding the command and its documents, which the shell
/// runs the same way. Returns the text, the original line of each new line, and the original
/// text of each rewritten RUN (by new line).
fn rewrite_run_heredocs(text: &str, escape: char) -> (String, Vec<usize>, BTreeMap<usize, String>) {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out: Vec<(String, usize)> = Vec::new();
    let mut originals = BTreeMap::new();
    let mut i = 0;
    let mut n = 0;
    while i < lines.len() {
        let l = lines[i];
        let is_run = l
            .trim_start()
            .get(..4)
            .is_some_and(|k| k[..3].eq_ignore_ascii_case("run") && k.as_bytes()[3].is_ascii_whitespace());
        if !is_run {
            out.push((l.to_string(), i + 1));
            i += 1;
            continue;
        }
        // The logical line, and where it ends.
        let mut j = i;
        while j + 1 < lines.len() {
            let t = lines[j].trim_end();
            if t.ends_with(escape) && !t[..t.len() - escape.len_utf8()].ends_with(escape) {
                j += 1;
            } else {
                break;
            }
        }
        let logical = logical_line(&lines[i..=j].join("\n"), 0, escape);
        // The command after RUN and its flags.
        let mut args = logical.trim_start()[3..].trim_start();
        let mut flags = String::new();
        while args.starts_with("--") {
            let end = args.find(char::is_whitespace).unwrap_or(args.len());
            flags.push_str(&args[..end]);
            flags.push(' ');
            args = args[end..].trim_start();
        }
        let docs = if args.starts_with("<<") || args.starts_with('[') {
            Vec::new()
        } else {
            inner_heredocs(args)
        };
        // Find every document's end; give up (and let the parser report) if one is missing.
        let mut k = j + 1;
        let mut ok = !docs.is_empty();
        for (d, strip) in &docs {
            while k < lines.len() {
                let body = if *strip {
                    lines[k].trim_start_matches('\t')
                } else {
                    lines[k]
                };
                k += 1;
                if body.trim_end_matches('\r') == d {
                    break;
                }
                if k == lines.len() {
                    ok = false;
                }
            }
        }
        if !ok || k > lines.len() {
            for (m, l) in lines.iter().enumerate().take(j + 1).skip(i) {
                out.push((l.to_string(), m + 1));
            }
            i = j + 1;
            continue;
        }
        n += 1;
        let marker = format!("STRATA_RUN_HEREDOC_{n}");
        originals.insert(out.len() + 1, logical.clone());
        out.push((format!("RUN {flags}<<'{marker}'"), i + 1));
        out.push((args.to_string(), i + 1));
        for (m, l) in lines.iter().enumerate().take(k).skip(j + 1) {
            out.push((l.to_string(), m + 1));
        }
        out.push((marker, k));
        i = k;
    }
    let map = out.iter().map(|(_, o)| *o).collect();
    let text = out.into_iter().map(|(l, _)| l).collect::<Vec<_>>().join("\n");
    (text, map, originals)
}

/// Parse `text` (named `file` in errors).
pub fn parse(text: &str, file: &str) -> Result<Dockerfile> {
    // The escape directive, if any, is needed before parsing to join lines.
    let escape = if text
        .lines()
        .take_while(|l| l.trim_start().starts_with('#'))
        .any(|l| l.replace(' ', "").eq_ignore_ascii_case("#escape=`"))
    {
        '`'
    } else {
        '\\'
    };
    let (rewritten, line_map, originals) = rewrite_run_heredocs(text, escape);
    let orig_line = |l: usize| line_map.get(l.wrapping_sub(1)).copied().unwrap_or(l);
    let text = rewritten.as_str();
    let df = parse_dockerfile::parse(text).map_err(|e| BuildError::Syntax {
        file: file.to_string(),
        line: orig_line(e.line()),
        column: Some(e.column()),
        reason: e.to_string(),
    })?;
    let escape = df
        .parser_directives
        .escape
        .as_ref()
        .map(|d| d.value.value)
        .unwrap_or('\\');
    if let Some(s) = &df.parser_directives.syntax {
        log::warn!(
            "{file}: `# syntax={}` is ignored: strata has its own Dockerfile frontend",
            s.value.value
        );
    }
    let mut global_args = Vec::new();
    let mut stages: Vec<Vec<Step>> = Vec::new();
    for ins in &df.instructions {
        let start = start_of(ins);
        let new_line = line_of(text, start);
        let line = orig_line(new_line);
        let kind = convert(ins, text, escape, start).map_err(|e| BuildError::Syntax {
            file: file.to_string(),
            line,
            column: None,
            reason: format!("{e:#}"),
        })?;
        let step = Step {
            line,
            text: originals
                .get(&new_line)
                .cloned()
                .unwrap_or_else(|| logical_line(text, start, escape)),
            kind,
        };
        match (&step.kind, stages.last_mut()) {
            (Kind::From { .. }, _) => stages.push(vec![step]),
            (Kind::Arg(_), None) => global_args.push(step),
            (_, Some(st)) => st.push(step),
            (_, None) => {
                return Err(BuildError::Syntax {
                    file: file.to_string(),
                    line,
                    column: None,
                    reason: format!("`{}` before the first FROM (only ARG may come first)", step.text),
                }
                .into())
            }
        }
    }
    if stages.is_empty() {
        return Err(BuildError::Syntax {
            file: file.to_string(),
            line: 0,
            column: None,
            reason: "no FROM instruction".into(),
        }
        .into());
    }
    Ok(Dockerfile {
        escape,
        global_args,
        stages,
    })
}

/// Parse ONBUILD triggers (each one instruction's text) as steps of a stage.
pub fn parse_triggers(triggers: &[String], what: &str) -> Result<Vec<Step>> {
    let mut out = Vec::new();
    for t in triggers {
        let text = format!("FROM scratch\n{t}\n");
        let df = parse(&text, what)?;
        let mut st = df.stages.into_iter().next().unwrap_or_default();
        if st.len() != 2 {
            bail!("{what}: ONBUILD trigger '{t}' is not one instruction");
        }
        let mut s = st.remove(1);
        if matches!(s.kind, Kind::From { .. } | Kind::Onbuild(_)) {
            bail!("{what}: ONBUILD trigger '{t}': FROM and ONBUILD are not allowed there");
        }
        s.line = 0;
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_lines_and_continuations() {
        let text = "# escape=\\\nARG V=1\nFROM busybox AS b\nRUN echo a \\\n  # comment\n    b\nRUN [\"echo\", \"x\"]\nCOPY --chown=1:2 a b /d/\nCOPY <<EOF /f\nhello\nEOF\nONBUILD RUN echo trig\n";
        let df = parse(text, "Dockerfile").unwrap();
        assert_eq!(df.global_args.len(), 1);
        let st = &df.stages[0];
        assert!(matches!(&st[0].kind, Kind::From { name: Some(n), .. } if n == "b"));
        assert_eq!(st[1].line, 4);
        match &st[1].kind {
            Kind::Run {
                cmd: Cmd::Shell(s), ..
            } => assert_eq!(s, "echo a     b"),
            k => panic!("{k:?}"),
        }
        assert_eq!(st[1].text, "RUN echo a     b");
        assert!(matches!(&st[2].kind, Kind::Run { cmd: Cmd::Exec(v), .. } if v == &["echo", "x"]));
        match &st[3].kind {
            Kind::Copy {
                srcs,
                dest,
                flags,
                add: false,
            } => {
                assert_eq!(srcs, &[Src::Path("a".into()), Src::Path("b".into())]);
                assert_eq!(dest, "/d/");
                assert_eq!(flags, &[("chown".to_string(), Some("1:2".to_string()))]);
            }
            k => panic!("{k:?}"),
        }
        match &st[4].kind {
            Kind::Copy { srcs, .. } => assert!(
                matches!(&srcs[0], Src::Inline { name, body, expand: true } if name == "EOF" && body == "hello\n")
            ),
            k => panic!("{k:?}"),
        }
        assert!(matches!(&st[5].kind, Kind::Onbuild(t) if t == "RUN echo trig"));
        let e = parse("FROM a\nFROBNICATE x\n", "Df").unwrap_err().to_string();
        assert!(e.starts_with("Df:2"), "{e}");
        let trig = parse_triggers(&["RUN echo hi".into()], "base").unwrap();
        // A heredoc after the command, and the lines after it keep their numbers.
        let df = parse(
            "FROM a\nRUN cat > /f <<EOF && cat <<-'X'\nhi $V\nEOF\n\tthere\nX\nUSER u\n",
            "D",
        )
        .unwrap();
        let st = &df.stages[0];
        assert_eq!(st[1].text, "RUN cat > /f <<EOF && cat <<-'X'");
        match &st[1].kind {
            Kind::Run { heredocs, .. } => {
                assert_eq!(
                    heredocs[0].1,
                    "cat > /f <<EOF && cat <<-'X'\nhi $V\nEOF\n\tthere\nX\n"
                )
            }
            k => panic!("{k:?}"),
        }
        assert_eq!((st[1].line, st[2].line), (2, 7));
        assert!(matches!(&trig[0].kind, Kind::Run { .. }));
    }
}
