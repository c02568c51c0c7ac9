//! `.dockerignore`: which paths of the build context docker leaves out.
//!
//! The rules are those of docker's BuildKit path: the file is read as moby/patternmatcher's
//! `ignorefile.ReadAll` reads it, each pattern is compiled as `patternmatcher` compiles it, and
//! a path is matched the way BuildKit's context walker (tonistiigi/fsutil) matches it while it
//! walks the context from the top:
//!
//! * A line starting with `#` (in its first column) is a comment; other lines are trimmed and
//!   blank ones skipped. A leading `!` makes an exception (a pattern that takes paths back).
//! * A pattern is cleaned like Go's `filepath.Clean` (`./a//b/` is `a/b`, `a/../b` is `b`) and
//!   a leading `/` is dropped: every pattern is relative to the context's top, never floating
//!   (`foo` matches `foo` only, not `dir/foo`; use `**/foo`).
//! * `*` is any run of characters but `/`, `?` one character but `/`, `[...]` a class
//!   (`[^...]` negated; as in Go's `filepath.Match`), `\` makes the next character literal.
//!   `**` matches any number of whole directories (`**/x`, `a/**/x`) and, at the end, anything
//!   (`dir/**` is everything below `dir`, not `dir` itself). A pattern that starts with `**`
//!   and has no other wildcard only compares the end of the path: `**.go` matches `a/x.go`.
//! * A pattern also excludes everything below a directory it matches, and the last pattern
//!   that matches a path or one of its directories decides; as the walker reuses a directory's
//!   results for its entries, a pattern that did not need checking on the directory (an
//!   exception while nothing was excluded yet, say) only ever sees the entries' full paths.
//! * A directory that is excluded but has an included entry below it (through an exception)
//!   still ends up in the context, as the parent of that entry.

/// A compiled `.dockerignore`.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    patterns: Vec<Pattern>,
    /// Whether some pattern is an exception (`!`).
    exceptions: bool,
    /// Whether every exception is a plain path (apart from a trailing `/*` or `/**`): only
    /// then can the walk tell from a directory's name that nothing below it comes back.
    plain_exceptions: bool,
}

/// The per-pattern results for a directory, which BuildKit's walker hands down to the
/// directory's entries (see [`Ignore::check`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirMatch(Vec<bool>);

#[derive(Debug, Clone)]
struct Pattern {
    /// The cleaned pattern, without its `!`.
    text: String,
    exception: bool,
    kind: Kind,
}

/// How a pattern compares paths, as patternmatcher decides it: plain patterns (and those
/// whose only wildcard is a leading or trailing `**`) are string comparisons.
#[derive(Debug, Clone)]
enum Kind {
    /// The path is the pattern.
    Exact,
    /// The path starts with this (a pattern ending in `**`).
    Prefix(String),
    /// The path ends with this, or is it without its leading `/` (a pattern starting `**`).
    Suffix(String),
    /// Anything else.
    Glob(Vec<Tok>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `*`: any run of characters but `/`.
    Star,
    /// `?`: one character but `/`.
    One,
    /// `**` (with its `/`) before more pattern: nothing, or anything ending in `/`.
    Dirs,
    /// `**` at the end (after other wildcards): anything.
    Rest,
    /// `[...]`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// A `^` outside a class: patternmatcher hands it to Go's regexp unescaped, where it only
    /// matches at the start of the path.
    Caret,
}

impl Ignore {
    /// Parse a `.dockerignore` text (a UTF-8 byte order mark first is skipped). Errors name
    /// the line: a lone `!`, or a pattern `filepath.Match` rejects (an unclosed `[`, a
    /// trailing `\`, ...).
    pub fn parse(text: &str) -> Result<Ignore, String> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut lines = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let p = line.trim();
            if p.is_empty() {
                continue;
            }
            let (exception, p) = match p.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, p),
            };
            let mut p = if p.is_empty() { String::new() } else { clean(p) };
            if p.len() > 1 && p.starts_with('/') {
                p.remove(0);
            }
            lines.push((n + 1, if exception { format!("!{p}") } else { p }));
        }
        let mut ig = Ignore::default();
        for (n, p) in lines {
            ig.add(&p).map_err(|e| format!("line {n}: {e}"))?;
        }
        Ok(ig)
    }

    /// Compile patterns already read from a file (as moby/patternmatcher's `New` does: each
    /// is trimmed and cleaned, `!` makes an exception).
    pub fn from_patterns<S: AsRef<str>>(patterns: &[S]) -> Result<Ignore, String> {
        let mut ig = Ignore::default();
        for p in patterns {
            ig.add(p.as_ref())?;
        }
        Ok(ig)
    }

    fn add(&mut self, p: &str) -> Result<(), String> {
        let p = p.trim();
        if p.is_empty() {
            return Ok(());
        }
        let p = clean(p);
        let (exception, text) = match p.strip_prefix('!') {
            Some("") => return Err("illegal exclusion pattern: \"!\"".into()),
            Some(rest) => (true, rest),
            None => (false, p.as_str()),
        };
        let kind = compile(text).map_err(|e| format!("pattern {text:?}: {e}"))?;
        if exception {
            if self.patterns.iter().all(|p| !p.exception) {
                self.plain_exceptions = true;
            }
            self.exceptions = true;
            let plain = without_trailing_glob(text);
            if plain.contains(['*', '[', ']', '?', '^', '\\']) {
                self.plain_exceptions = false;
            }
        }
        self.patterns.push(Pattern {
            text: text.to_string(),
            exception,
            kind,
        });
        Ok(())
    }

    /// Whether there are no patterns at all.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The cleaned patterns, exceptions with their `!` (e.g. for a cache key).
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| {
                if p.exception {
                    format!("!{}", p.text)
                } else {
                    p.text.clone()
                }
            })
            .collect()
    }

    /// Whether the context path `rel` (relative to the context's top, components separated by
    /// `/`; a leading `./` or `/` is tolerated) is left out of the context. The top itself
    /// never is. Checks each of `rel`'s directories on the way down, as the walker does;
    /// [`Ignore::check`] lets a walk reuse a directory's results instead.
    pub fn excluded(&self, rel: &str) -> bool {
        let Some(rel) = normalize(rel) else { return false };
        if self.patterns.is_empty() {
            return false;
        }
        let mut parent: Option<DirMatch> = None;
        for (i, _) in rel.match_indices('/') {
            let (_, m) = self.check(&rel[..i], parent.as_ref());
            parent = Some(m);
        }
        self.check(&rel, parent.as_ref()).0
    }

    /// One step of a walk from the top: whether `rel` is excluded, given the results of its
    /// directory (`None` for an entry at the top, or when unknown: the directories are then
    /// checked by name). The returned [`DirMatch`] is what to pass for `rel`'s own entries
    /// when `rel` is a directory. `rel` must be clean (no `.`, `..` or empty components).
    pub fn check(&self, rel: &str, parent: Option<&DirMatch>) -> (bool, DirMatch) {
        let parent = parent
            .map(|p| p.0.as_slice())
            .filter(|p| !p.is_empty() && p.len() == self.patterns.len());
        let mut excluded = false;
        let mut results = vec![false; self.patterns.len()];
        for (i, p) in self.patterns.iter().enumerate() {
            let mut m = parent.is_some_and(|r| r[i]);
            if !m {
                // A pattern that cannot change the verdict is not looked at (and so is not
                // recorded for the entries below, which is where this differs from checking
                // every pattern against every directory).
                if p.exception != excluded {
                    continue;
                }
                m = p.matches(rel)
                    || (parent.is_none() && rel.match_indices('/').any(|(j, _)| p.matches(&rel[..j])));
            }
            results[i] = m;
            if m {
                excluded = !p.exception;
            }
        }
        (excluded, DirMatch(results))
    }

    /// Whether a walk may skip the whole directory `rel`: it is excluded, and no exception
    /// could take anything below it back. Decided as BuildKit's walker decides it, by name:
    /// with an exception that has wildcards the walk always goes in.
    pub fn skip_dir(&self, rel: &str) -> bool {
        self.excluded(rel) && self.nothing_comes_back_below(rel)
    }

    /// The second half of [`Ignore::skip_dir`], for a walk that already knows `rel` is an
    /// excluded directory (from [`Ignore::check`]).
    pub fn nothing_comes_back_below(&self, rel: &str) -> bool {
        if !self.exceptions {
            return true;
        }
        if !self.plain_exceptions {
            return false;
        }
        let Some(rel) = normalize(rel) else { return false };
        let dir = format!("{rel}/");
        !self
            .patterns
            .iter()
            .filter(|p| p.exception)
            .any(|p| format!("{}/", without_trailing_glob(&p.text)).starts_with(&dir))
    }
}

/// A context path made clean and relative; None for the top itself or a path outside it.
fn normalize(rel: &str) -> Option<String> {
    let c = clean(rel);
    let c = c.trim_start_matches('/');
    if c.is_empty() || c == "." || c == ".." || c.starts_with("../") {
        return None;
    }
    Some(c.to_string())
}

/// A pattern without a trailing `/**` and then a trailing `/*` (fsutil's
/// patternWithoutTrailingGlob).
fn without_trailing_glob(p: &str) -> &str {
    let p = p.strip_suffix("/**").unwrap_or(p);
    p.strip_suffix("/*").unwrap_or(p)
}

/// Go's `filepath.Clean` on Unix: one `/` between elements, no `.` elements, `..` removing
/// the element before it (and dropped right after the root), no trailing `/`; "" is ".".
pub fn clean(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for e in p.split('/') {
        match e {
            "" | "." => {}
            ".." => match out.last() {
                Some(&l) if l != ".." => {
                    out.pop();
                }
                _ if rooted => {}
                _ => out.push(".."),
            },
            e => out.push(e),
        }
    }
    let joined = out.join("/");
    if rooted {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => path == self.text,
            Kind::Prefix(pre) => path.starts_with(pre.as_str()),
            Kind::Suffix(suf) => path.ends_with(suf.as_str()) || suf.strip_prefix('/') == Some(path),
            Kind::Glob(toks) => glob_match(toks, path),
        }
    }
}

/// Check the syntax as Go's `filepath.Match` does, then decide the kind of comparison and
/// compile the wildcards, as patternmatcher does.
fn compile(p: &str) -> Result<Kind, String> {
    let chars: Vec<char> = p.chars().collect();
    check_syntax(&chars)?;
    let mut kind = Kind::Exact;
    let mut toks = Vec::new();
    let mut i = 0;
    let mut first = true;
    while let Some(&c) = chars.get(i) {
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i >= chars.len() {
                    kind = match kind {
                        Kind::Exact => Kind::Prefix(chars[..chars.len().saturating_sub(2)].iter().collect()),
                        _ => {
                            toks.push(Tok::Rest);
                            Kind::Glob(Vec::new())
                        }
                    };
                } else {
                    toks.push(Tok::Dirs);
                    kind = Kind::Glob(Vec::new());
                }
                if first {
                    kind = Kind::Suffix(chars.get(2..).unwrap_or_default().iter().collect());
                }
            }
            '*' => {
                toks.push(Tok::Star);
                kind = Kind::Glob(Vec::new());
            }
            '?' => {
                toks.push(Tok::One);
                kind = Kind::Glob(Vec::new());
            }
            '\\' => match chars.get(i) {
                Some(&n) => {
                    i += 1;
                    toks.push(Tok::Lit(n));
                    kind = Kind::Glob(Vec::new());
                }
                None => toks.push(Tok::Lit('\\')),
            },
            '[' => {
                let (tok, next) = class(&chars, i)?;
                i = next;
                toks.push(tok);
                kind = Kind::Glob(Vec::new());
            }
            ']' => {
                toks.push(Tok::Lit(']'));
                kind = Kind::Glob(Vec::new());
            }
            '^' => toks.push(Tok::Caret),
            c => toks.push(Tok::Lit(c)),
        }
        first = false;
    }
    Ok(match kind {
        Kind::Glob(_) => Kind::Glob(toks),
        k => k,
    })
}

/// The class whose text starts at `chars[i]` (just after `[`), and the index after its `]`.
/// The syntax was checked already; a range whose ends are reversed is refused, as Go's
/// regexp (which patternmatcher compiles to) refuses it.
fn class(chars: &[char], mut i: usize) -> Result<(Tok, usize), String> {
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let one = |i: &mut usize| -> Option<char> {
        if chars.get(*i) == Some(&'\\') {
            *i += 1;
        }
        let c = chars.get(*i).copied();
        *i += 1;
        c
    };
    loop {
        match chars.get(i) {
            Some(']') if !ranges.is_empty() => return Ok((Tok::Class { negated, ranges }, i + 1)),
            None => return Err("unterminated [".into()),
            Some(_) => {}
        }
        let lo = one(&mut i).ok_or("unterminated [")?;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') {
            i += 1;
            hi = one(&mut i).ok_or("unterminated [")?;
        }
        if hi < lo {
            return Err(format!("invalid character class range {lo}-{hi}"));
        }
        ranges.push((lo, hi));
    }
}

/// Go's `filepath.Match` syntax: `\` must escape something; a class needs a `]`, at least one
/// item, and its items (and range ends) can't be a bare `-` or `]`.
fn check_syntax(chars: &[char]) -> Result<(), String> {
    // One class item (or range end) at `i`; the index after it.
    let item = |i: usize| -> Option<usize> {
        let mut j = i;
        match chars.get(j) {
            None | Some('-' | ']') => return None,
            Some('\\') => j += 1,
            Some(_) => {}
        }
        chars.get(j)?;
        // Go also wants something after each item (at least the closing `]`).
        chars.get(j + 1).map(|_| j + 1)
    };
    let bad = || Err("syntax error in pattern".to_string());
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        match c {
            '\\' => {
                if i + 1 >= chars.len() {
                    return bad();
                }
                i += 2;
            }
            '[' => {
                i += 1;
                if chars.get(i) == Some(&'^') {
                    i += 1;
                }
                let mut items = 0;
                loop {
                    if chars.get(i) == Some(&']') && items > 0 {
                        i += 1;
                        break;
                    }
                    let Some(next) = item(i) else { return bad() };
                    i = next;
                    if chars.get(i) == Some(&'-') {
                        let Some(next) = item(i + 1) else { return bad() };
                        i = next;
                    }
                    items += 1;
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Whether `toks` match all of `path` (Go regexp semantics: `.` in `**` does not match a
/// newline, classes do).
fn glob_match(toks: &[Tok], path: &str) -> bool {
    let s: Vec<char> = path.chars().collect();
    let n = s.len();
    let w = n + 1;
    // ok[t * w + i]: toks[t..] match s[i..]. Filled from the end.
    let mut ok = vec![false; (toks.len() + 1) * w];
    ok[toks.len() * w + n] = true;
    for t in (0..toks.len()).rev() {
        let (cur, next) = ok.split_at_mut((t + 1) * w);
        let cur = &mut cur[t * w..];
        let next = &next[..w];
        // For Dirs: whether s[i..] starts with a newline-free run ending in `/` after which
        // the rest matches.
        let mut dirs_from = false;
        for i in (0..=n).rev() {
            let c = s.get(i).copied();
            cur[i] = match &toks[t] {
                Tok::Lit(l) => c == Some(*l) && next[i + 1],
                Tok::One => c.is_some_and(|c| c != '/') && next[i + 1],
                Tok::Star => next[i] || (c.is_some_and(|c| c != '/') && cur[i + 1]),
                Tok::Rest => next[i] || (c.is_some_and(|c| c != '\n') && cur[i + 1]),
                Tok::Caret => i == 0 && next[i],
                Tok::Class { negated, ranges } => {
                    c.is_some_and(|c| ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated)
                        && next[i + 1]
                }
                Tok::Dirs => {
                    dirs_from = match c {
                        Some('\n') | None => false,
                        Some('/') => next[i + 1] || dirs_from,
                        Some(_) => dirs_from,
                    };
                    next[i] || dirs_from
                }
            };
        }
    }
    ok[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ig(text: &str) -> Ignore {
        Ignore::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    /// One pattern against one path, with parent-directory matching (patternmatcher's
    /// TestMatches table, MatchesOrParentMatches column: exact or inexact is a match).
    #[test]
    fn patternmatcher_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("**", "file", true),
            ("**", "file/", true),
            ("**/", "file", true),
            ("**/", "file/", true),
            // ("**", "/") and ("**/", "/") match in patternmatcher; here "/" is the
            // context's top, which is never excluded.
            ("**", "dir/file", true),
            ("**/", "dir/file", true),
            ("**", "dir/file/", true),
            ("**/", "dir/file/", true),
            ("**/**", "dir/file", true),
            ("**/**", "dir/file/", true),
            ("dir/**", "dir/file", true),
            ("dir/**", "dir/file/", true),
            ("dir/**", "dir/dir2/file", true),
            ("dir/**", "dir/dir2/file/", true),
            ("**/dir", "dir", true),
            ("**/dir", "dir/file", true),
            ("**/dir2/*", "dir/dir2/file", true),
            ("**/dir2/*", "dir/dir2/file/", true),
            ("**/dir2/**", "dir/dir2/dir3/file", true),
            ("**/dir2/**", "dir/dir2/dir3/file/", true),
            ("**file", "file", true),
            ("**file", "dir/file", true),
            ("**/file", "dir/file", true),
            ("**file", "dir/dir/file", true),
            ("**/file", "dir/dir/file", true),
            ("**/file*", "dir/dir/file", true),
            ("**/file*", "dir/dir/file.txt", true),
            ("**/file*txt", "dir/dir/file.txt", true),
            ("**/file*.txt", "dir/dir/file.txt", true),
            ("**/file*.txt*", "dir/dir/file.txt", true),
            ("**/**/*.txt", "dir/dir/file.txt", true),
            ("**/**/*.txt2", "dir/dir/file.txt", false),
            ("**/*.txt", "file.txt", true),
            ("**/**/*.txt", "file.txt", true),
            ("a**/*.txt", "a/file.txt", true),
            ("a**/*.txt", "a/dir/file.txt", true),
            ("a**/*.txt", "a/dir/dir/file.txt", true),
            ("a/*.txt", "a/dir/file.txt", false),
            ("a/*.txt", "a/file.txt", true),
            ("a/*.txt**", "a/file.txt", true),
            ("a[b-d]e", "ae", false),
            ("a[b-d]e", "ace", true),
            ("a[b-d]e", "aae", false),
            ("a[^b-d]e", "aze", true),
            (".*", ".foo", true),
            (".*", "foo", false),
            ("abc.def", "abcdef", false),
            ("abc.def", "abc.def", true),
            ("abc.def", "abcZdef", false),
            ("abc?def", "abcZdef", true),
            ("abc?def", "abcdef", false),
            ("**/foo/bar", "foo/bar", true),
            ("**/foo/bar", "dir/foo/bar", true),
            ("**/foo/bar", "dir/dir2/foo/bar", true),
            ("abc/**", "abc", false),
            ("abc/**", "abc/def", true),
            ("abc/**", "abc/def/ghi", true),
            ("**/.foo", ".foo", true),
            ("**/.foo", "bar.foo", false),
            ("a(b)c/def", "a(b)c/def", true),
            ("a(b)c/def", "a(b)c/xyz", false),
            ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
            (
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            (
                "dist/*.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            (r"a\\", r"a\", true),
            (r"a\*b", "a*b", true),
        ];
        for (pat, path, want) in cases {
            let m = Ignore::from_patterns(&[pat]).unwrap_or_else(|e| panic!("{pat}: {e}"));
            assert_eq!(m.excluded(path), *want, "pattern {pat:?} path {path:?}");
        }
    }

    /// Go's filepath.Match cases as patternmatcher runs them (a match of the path or a parent).
    #[test]
    fn filepath_match_table() {
        let cases: &[(&str, &str, Option<bool>)] = &[
            ("abc", "abc", Some(true)),
            ("*", "abc", Some(true)),
            ("*c", "abc", Some(true)),
            ("a*", "a", Some(true)),
            ("a*", "abc", Some(true)),
            ("a*", "ab/c", Some(true)),
            ("a*/b", "abc/b", Some(true)),
            ("a*/b", "a/c/b", Some(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Some(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Some(true)),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Some(false)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Some(false)),
            ("a*b?c*x", "abxbbxdbxebxczzx", Some(true)),
            ("a*b?c*x", "abxbbxdbxebxczzy", Some(false)),
            ("ab[c]", "abc", Some(true)),
            ("ab[b-d]", "abc", Some(true)),
            ("ab[e-g]", "abc", Some(false)),
            ("ab[^c]", "abc", Some(false)),
            ("ab[^b-d]", "abc", Some(false)),
            ("ab[^e-g]", "abc", Some(true)),
            ("a\\*b", "a*b", Some(true)),
            ("a\\*b", "ab", Some(false)),
            ("a?b", "a☺b", Some(true)),
            ("a[^a]b", "a☺b", Some(true)),
            ("a???b", "a☺b", Some(false)),
            ("a[^a][^a][^a]b", "a☺b", Some(false)),
            ("[a-ζ]*", "α", Some(true)),
            ("*[a-ζ]", "A", Some(false)),
            ("a?b", "a/b", Some(false)),
            ("a*b", "a/b", Some(false)),
            ("[\\]a]", "]", Some(true)),
            ("[\\-]", "-", Some(true)),
            ("[x\\-]", "x", Some(true)),
            ("[x\\-]", "-", Some(true)),
            ("[x\\-]", "z", Some(false)),
            ("[\\-x]", "x", Some(true)),
            ("[\\-x]", "-", Some(true)),
            ("[\\-x]", "a", Some(false)),
            ("[]a]", "]", None),
            ("[-]", "-", None),
            ("[x-]", "x", None),
            ("[-x]", "x", None),
            ("\\", "a", None),
            ("[a-b-c]", "a", None),
            ("[", "a", None),
            ("[^", "a", None),
            ("[^bc", "a", None),
            ("a[", "a", None),
            ("a[", "ab", None),
            ("*x", "xxx", Some(true)),
            ("[z-a]", "q", None),
        ];
        for (pat, path, want) in cases {
            let m = Ignore::from_patterns(&[pat]);
            match want {
                Some(w) => {
                    let m = m.unwrap_or_else(|e| panic!("{pat}: {e}"));
                    assert_eq!(m.excluded(path), *w, "pattern {pat:?} path {path:?}");
                }
                None => assert!(m.is_err(), "pattern {pat:?} should be refused"),
            }
        }
    }

    #[test]
    fn multi_pattern_table() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["**", "!util/docker/web"], "util/docker/web/foo", false),
            (
                &["**", "!util/docker/web", "util/docker/web/foo"],
                "util/docker/web/foo",
                true,
            ),
            (
                &["**", "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"],
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                false,
            ),
            (
                &["**", "!dist/*.whl"],
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                false,
            ),
            (&["!fileutils.go", "*.go"], "fileutils.go", true),
            (&["*.go", "!fileutils.go"], "fileutils.go", false),
            (&["docs", "!docs/README.md"], "docs/README.md", false),
            (&["docs/", "!docs/README.md"], "docs/README.md", false),
            (&["docs/*", "!docs/README.md"], "docs/README.md", false),
            (&["docs", "!docs/README.md"], "docs/other.md", true),
        ];
        for (pats, path, want) in cases {
            let m = Ignore::from_patterns(pats).unwrap_or_else(|e| panic!("{pats:?}: {e}"));
            assert_eq!(m.excluded(path), *want, "patterns {pats:?} path {path:?}");
        }
    }

    #[test]
    fn docker_documentation_examples() {
        let m = ig("# comment\n*/temp*\n*/*/temp*\ntemp?\n");
        assert!(m.excluded("somedir/temporary.txt"));
        assert!(m.excluded("somedir/temp"));
        assert!(m.excluded("somedir/temp/inside/file"));
        assert!(!m.excluded("temporary.txt"));
        assert!(m.excluded("somedir/subdir/temporary.txt"));
        assert!(!m.excluded("a/b/c/temporary.txt"));
        assert!(m.excluded("tempa"));
        assert!(m.excluded("tempb"));
        assert!(!m.excluded("temp"));
        assert!(!m.excluded("tempab"));
        assert!(!m.excluded("# comment"));

        let m = ig("**/*.go\n");
        assert!(m.excluded("main.go"));
        assert!(m.excluded("a/b/c.go"));
        assert!(!m.excluded("a/b/c.gox"));

        let m = ig("*.md\n!README.md\n");
        assert!(m.excluded("CHANGES.md"));
        assert!(!m.excluded("README.md"));
        assert!(!m.excluded("docs/x.md"));

        let m = ig("*.md\n!README*.md\nREADME-secret.md\n");
        assert!(m.excluded("CHANGES.md"));
        assert!(!m.excluded("README-public.md"));
        assert!(m.excluded("README-secret.md"));
    }

    #[test]
    fn directories_and_their_contents() {
        let m = ig("dir\n");
        assert!(m.excluded("dir"));
        assert!(m.excluded("dir/a"));
        assert!(m.excluded("dir/a/b/c"));
        assert!(!m.excluded("dirx"));
        assert!(!m.excluded("x/dir"));
        assert!(m.skip_dir("dir"));
        assert!(!m.skip_dir("other"));

        let m = ig("dir\n!dir/keep\n");
        assert!(m.excluded("dir"));
        assert!(m.excluded("dir/other"));
        assert!(!m.excluded("dir/keep"));
        assert!(!m.excluded("dir/keep/deep/file"));
        assert!(!m.skip_dir("dir"));
        assert!(m.skip_dir("dir/other"));
        assert!(!m.skip_dir("dir/keep"));
        assert!(m.nothing_comes_back_below("elsewhere"));

        // An exception with a wildcard: the walk has to go into every excluded directory.
        let m = ig("dir\n!dir/*.txt\n");
        assert!(!m.excluded("dir/a.txt"));
        assert!(m.excluded("dir/sub/a.txt"));
        assert!(!m.skip_dir("dir"));
        assert!(!m.skip_dir("dir/sub"));

        // A trailing /* or /** of an exception is ignored for the skip decision.
        let m = ig("*\n!keep/**\n");
        assert!(m.excluded("keep"));
        assert!(!m.excluded("keep/a"));
        assert!(!m.skip_dir("keep"));
        assert!(m.skip_dir("other"));
    }

    #[test]
    fn exceptions_inside_excluded_directories() {
        let m = ig("*\n!src\nsrc/generated\n!src/generated/keep.rs\n");
        assert!(m.excluded("Dockerfile"));
        assert!(!m.excluded("src"));
        assert!(!m.excluded("src/main.rs"));
        assert!(m.excluded("src/generated"));
        assert!(m.excluded("src/generated/x.rs"));
        assert!(!m.excluded("src/generated/keep.rs"));

        // Everything but one deep file.
        let m = ig("**\n!a/b/c.txt\n");
        assert!(m.excluded("a"));
        assert!(m.excluded("a/b"));
        assert!(!m.excluded("a/b/c.txt"));
        assert!(m.excluded("a/b/d.txt"));
        assert!(!m.skip_dir("a"));
        assert!(!m.skip_dir("a/b"));
        assert!(m.skip_dir("x"));
    }

    /// An exception that did not need checking on a directory (nothing was excluded yet
    /// there) is not carried down: BuildKit's walker then only compares it with the full
    /// paths of the directory's entries. So here `a/b` stays out although `!a` comes later.
    #[test]
    fn walker_reuses_directory_results() {
        let m = ig("a/b\n!a\n");
        assert!(!m.excluded("a"));
        assert!(m.excluded("a/b"));
        assert!(m.excluded("a/b/c"));
        assert!(!m.excluded("a/c"));
        // With no directory results (check by name), the exception would apply.
        assert!(!m.check("a/b", None).0);
        let (_, top) = m.check("a", None);
        assert!(m.check("a/b", Some(&top)).0);
    }

    #[test]
    fn incremental_check_agrees_with_excluded() {
        let m = ig("*.log\nbuild\n!build/keep\n**/tmp\n!**/tmp/.keep\n");
        let paths = [
            "x.log",
            "src",
            "src/a.log",
            "build",
            "build/keep",
            "build/keep/x",
            "build/other",
            "src/tmp",
            "src/tmp/.keep",
            "src/tmp/junk",
            "tmp/.keep",
        ];
        for p in paths {
            let mut parent = None;
            let mut verdict = false;
            let mut prefix = String::new();
            for comp in p.split('/') {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(comp);
                let (ex, m2) = m.check(&prefix, parent.as_ref());
                verdict = ex;
                parent = Some(m2);
            }
            assert_eq!(verdict, m.excluded(p), "{p}");
        }
        assert!(m.excluded("x.log"));
        assert!(!m.excluded("src/a.log"));
        assert!(!m.excluded("build/keep/x"));
        assert!(m.excluded("src/tmp/junk"));
        assert!(!m.excluded("src/tmp/.keep"));
        assert!(!m.excluded("tmp/.keep"));
    }

    #[test]
    fn reading_the_file() {
        let m = ig(
            "\u{feff}test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\r\n",
        );
        assert_eq!(
            m.patterns(),
            vec!["test1", "test2", "a/file/here", "lastfile", "!inverted/abs/path"]
        );
        // Only a # in the first column starts a comment.
        let m = ig("  #notcomment\n");
        assert_eq!(m.patterns(), vec!["#notcomment"]);
        assert!(m.excluded("#notcomment"));
        // Whitespace around patterns and after ! is trimmed.
        let m = ig("  foo  \n!   bar \t\n");
        assert_eq!(m.patterns(), vec!["foo", "!bar"]);
        assert!(Ignore::parse("a\n!\n").is_err_and(|e| e.contains("line 2")));
        assert!(Ignore::parse("! \n").is_err());
        assert!(Ignore::parse("ok\n[bad\n").is_err_and(|e| e.contains("line 2")));
        assert!(ig("").is_empty());
        assert!(ig("# only a comment\n\n").is_empty());
        assert!(!ig("").excluded("anything"));
    }

    #[test]
    fn cleaning_patterns() {
        let m = ig("./x\nsub/\n//a//b//\nc/./d/../e\n/\n../up\n");
        assert_eq!(m.patterns(), vec!["x", "sub", "a/b", "c/e", "/", "../up"]);
        assert!(m.excluded("x"));
        assert!(m.excluded("sub/file"));
        assert!(m.excluded("a/b/c"));
        assert!(m.excluded("c/e"));
        assert!(!m.excluded("c/d"));
        // "/" matches nothing relative; the top itself is never excluded.
        let m = ig("/\n");
        assert!(!m.excluded("a"));
        let m = ig("*\n");
        assert!(!m.excluded(""));
        assert!(!m.excluded("."));
        assert!(m.excluded("./a"));
        assert!(m.excluded("/a"));
        assert!(m.excluded("a/"));
        assert_eq!(clean(""), ".");
        assert_eq!(clean("/../a"), "/a");
        assert_eq!(clean("a/../../b"), "../b");
        assert_eq!(clean("**/"), "**");
    }

    #[test]
    fn absolute_and_dot_patterns() {
        let m = ig("/abs\n");
        assert!(m.excluded("abs"));
        assert!(m.excluded("abs/x"));
        assert!(!m.excluded("x/abs"));
        let m = ig("!/abs\n");
        assert_eq!(m.patterns(), vec!["!abs"]);
    }

    #[test]
    fn escapes_and_special_characters() {
        let m = ig("\\*.txt\nfile\\?\nbr\\[x\\]\n");
        assert!(m.excluded("*.txt"));
        assert!(!m.excluded("a.txt"));
        assert!(m.excluded("file?"));
        assert!(!m.excluded("filex"));
        assert!(m.excluded("br[x]"));
        let m = ig("a+b(c)\nx.y\n");
        assert!(m.excluded("a+b(c)"));
        assert!(m.excluded("x.y"));
        assert!(!m.excluded("xzy"));
        // `^` is an anchor in the regular expression patternmatcher builds for a wildcard
        // pattern, and a plain character in a pattern compared as a string.
        let m = ig("^x\n");
        assert!(m.excluded("^x"));
        let m = ig("^x*\n");
        assert!(m.excluded("xyz"));
        assert!(!m.excluded("^xyz"));
        let m = ig("[^x]y\n");
        assert!(m.excluded("ay"));
        assert!(!m.excluded("xy"));
    }

    #[test]
    fn double_star_forms() {
        let m = ig("a/**/b\n");
        assert!(m.excluded("a/b"));
        assert!(m.excluded("a/x/b"));
        assert!(m.excluded("a/x/y/b"));
        assert!(!m.excluded("a/xb"));
        // `**` without a slash is still whole directories when something follows.
        let m = ig("a**b\n");
        assert!(m.excluded("ab"));
        assert!(m.excluded("a/x/b"));
        assert!(!m.excluded("axb"));
        // A leading `**` with no other wildcard compares only the end of the path.
        let m = ig("**.go\n");
        assert!(m.excluded("x.go"));
        assert!(m.excluded("a/b/x.go"));
        let m = ig("**file\n");
        assert!(m.excluded("dir/myfile"));
        // A trailing `**` after other wildcards matches anything, slashes included.
        let m = ig("*/x/**\n");
        assert!(m.excluded("a/x/b/c"));
        assert!(!m.excluded("a/x"));
        // A newline in a name: `**` (a regexp `.`) does not cross it, `*` does.
        let m = ig("a/**/b\n");
        assert!(!m.excluded("a/x\ny/b"));
        let m = ig("x*\n");
        assert!(m.excluded("x\ny"));
    }

    #[test]
    fn trailing_slash_and_dot_slash_paths() {
        let m = ig("logs/\n");
        assert!(m.excluded("logs"));
        assert!(m.excluded("logs/today.log"));
        assert!(m.excluded("./logs/today.log"));
        assert!(!m.excluded("../logs"));
    }
}
