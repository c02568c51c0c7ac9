//! Docker's word processing for Dockerfile instructions: quote removal, escapes and `$VAR`
//! expansion, with the rules of BuildKit's Dockerfile frontend (docker's default builder), so
//! that a Dockerfile means the same thing to strata as to `docker build`.
//!
//! The rules, as BuildKit applies them (its `shell` lexer, `instructions` parser and
//! `dockerfile2llb` dispatcher were the reference):
//!
//! * Outside quotes the escape character (`\`, or `` ` `` after `# escape=`) makes the next
//!   character literal and disappears; a trailing escape is dropped.
//! * `'...'` is literal (nothing can be escaped inside, not even `'`).
//! * `"..."` expands variables; the escape character only escapes `"`, `$` and itself there,
//!   before anything else it stays (`"a\tb"` is `a\tb`).
//! * `$NAME`, `${NAME}`: letters, digits and `_`; a name starting with a digit takes only the
//!   digits (`$1x` is `$1` then `x`); the shell's special parameters `$@ $* $# $? $- $$ $! $0`
//!   are names of one character, normally unset, so `$$` expands to nothing, not to `$`.
//!   A `$` followed by anything else (or nothing) stays a `$`. Unset variables expand to "".
//! * `${V:-w}` `${V-w}` (default), `${V:+w}` `${V+w}` (alternative), `${V:?w}` `${V?w}` (error
//!   when unset, or also when empty with `:`), `${V#p}` `${V##p}` `${V%p}` `${V%%p}` (remove the
//!   shortest/longest prefix/suffix matching the shell pattern `p`: `*`, `?`, `\` escapes),
//!   `${V/p/r}` `${V//p/r}` (replace the first/every match of `p`, longest at the leftmost
//!   place). The word `w` is itself expanded (quotes and nested `${...}` allowed). `${V:=w}`,
//!   `${V=w}` and other modifiers are errors, as are `${}`, `${:x}`, `${{x}` and a missing `}`.
//!
//! Which instruction uses what (BuildKit's behaviour):
//!
//! * ENV, LABEL: [`parse_kv`] (`K=V ...`, or the legacy `K V...`); each key and value is
//!   expanded with [`expand_word`], all against the variables from *before* the instruction:
//!   in `ENV a=1 b=$a`, `b` gets the old `a`.
//! * ARG: [`parse_args_raw`] (`N` or `N=default`, several). The name is never expanded; a
//!   default is expanded with [`expand_word`] against the variables including the earlier
//!   ARGs of the same instruction, and only when no `--build-arg` overrides it (build-arg
//!   values are taken literally). [`parse_args`] does this when no build-arg is involved.
//! * FROM: [`split_fields`]; the image and `--platform` with [`expand_word`] against the
//!   global ARGs (those before the first FROM) only.
//! * COPY, ADD: JSON array or [`split_fields`]; every source and the destination with
//!   [`expand_word`] (in the JSON form too), `--chown` and ADD's `--checksum` likewise.
//!   `--from` never: BuildKit refuses a `--from` that contains a variable. `--chmod` is not
//!   expanded in the BuildKit sources read.
//! * WORKDIR, USER, STOPSIGNAL: the whole argument with [`expand_word`].
//! * VOLUME: JSON array or [`split_fields`]; each item with [`expand_word`] (one item stays
//!   one path, even if a variable holds spaces).
//! * EXPOSE: [`split_fields`]; each field with [`expand_words`] (one field may become several
//!   ports).
//! * COPY/ADD heredoc with an unquoted delimiter: the body with [`expand_heredoc`].
//! * RUN, CMD, ENTRYPOINT, HEALTHCHECK, SHELL, ONBUILD, MAINTAINER: nothing; the shell (or
//!   nobody, in exec form) expands at run time. RUN heredoc bodies are not expanded either.
//!
//! BuildKit also shows a RUN step's name with set variables expanded but quotes kept and unset
//! references left as written; [`expand_for_display`] does that.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;

/// Variables visible to expansion (build args in scope and ENV), in order of precedence
/// already resolved by the caller.
pub trait Lookup {
    /// The value of `name`, or None when it is not set (set but empty is `Some("")`: the
    /// `:-`/`-` modifiers tell the two apart).
    fn get(&self, name: &str) -> Option<String>;
}

impl<S: BuildHasher> Lookup for HashMap<String, String, S> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Lookup for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

/// A closure as a [`Lookup`] (e.g. layered scopes without building a map).
pub struct FnLookup<F: Fn(&str) -> Option<String>>(pub F);

impl<F: Fn(&str) -> Option<String>> Lookup for FnLookup<F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }
}

/// The lexer's switches; [`Lex::new`] gives docker's normal processing, the other fields are
/// the variants BuildKit uses in a few places (heredoc bodies, step names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lex {
    /// The escape character: `\`, or `` ` `` when the Dockerfile starts with that `# escape`
    /// directive.
    pub escape: char,
    /// Keep the quote characters in the result (they still group and protect).
    pub raw_quotes: bool,
    /// Keep escape characters in the result (the escaped character is still taken literally).
    pub raw_escapes: bool,
    /// Treat `'` and `"` as ordinary characters (heredoc bodies).
    pub skip_quotes: bool,
    /// Leave references to unset variables as written instead of expanding them to "".
    pub skip_unset: bool,
}

/// What [`Lex::process`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processed {
    /// The word with quotes removed and variables expanded (BuildKit's ProcessWord).
    pub word: String,
    /// The same split into words at unquoted, unescaped whitespace, where whitespace that
    /// comes out of a variable also splits (BuildKit's ProcessWords). Empty words vanish.
    pub words: Vec<String>,
    /// Names looked up and found.
    pub matched: BTreeSet<String>,
    /// Names looked up and not set.
    pub unmatched: BTreeSet<String>,
}

impl Lex {
    /// Docker's normal processing with escape character `escape`.
    pub fn new(escape: char) -> Lex {
        Lex {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_quotes: false,
            skip_unset: false,
        }
    }

    /// Process `s` against `vars`. Errors name the input, as BuildKit's do.
    pub fn process(&self, s: &str, vars: &dyn Lookup) -> Result<Processed, String> {
        let mut sc = Scanner {
            chars: s.chars().collect(),
            pos: 0,
            lex: *self,
            vars,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        let (word, words) = sc
            .until(None, self.raw_escapes)
            .map_err(|e| format!("failed to process {s:?}: {e}"))?;
        Ok(Processed {
            word,
            words,
            matched: sc.matched,
            unmatched: sc.unmatched,
        })
    }

    /// The processed word (see [`Processed::word`]).
    pub fn word(&self, s: &str, vars: &dyn Lookup) -> Result<String, String> {
        Ok(self.process(s, vars)?.word)
    }

    /// The processed words (see [`Processed::words`]).
    pub fn words(&self, s: &str, vars: &dyn Lookup) -> Result<Vec<String>, String> {
        Ok(self.process(s, vars)?.words)
    }
}

/// Expand one word as docker's ProcessWord does: quotes removed, escapes applied, variables
/// expanded (whitespace, even from a variable, stays inside the one word).
pub fn expand_word(s: &str, vars: &dyn Lookup, escape: char) -> Result<String, String> {
    Lex::new(escape).word(s, vars)
}

/// Split and expand like docker's ProcessWords (EXPOSE): whitespace separates words except
/// inside quotes or when escaped; whitespace coming out of an unquoted variable also
/// separates. Empty words (`""`, an empty variable) vanish.
pub fn expand_words(s: &str, vars: &dyn Lookup, escape: char) -> Result<Vec<String>, String> {
    Lex::new(escape).words(s, vars)
}

/// Expand the body of a heredoc whose delimiter is unquoted (`COPY <<EOF /f`): variables and
/// escapes are processed, quotes are ordinary characters. BuildKit always uses `\` as the
/// escape character here, whatever the `# escape=` directive says, and does remove it:
/// `\$x` gives `$x`, `a\b` gives `ab`.
pub fn expand_heredoc(s: &str, vars: &dyn Lookup) -> Result<String, String> {
    Lex {
        skip_quotes: true,
        ..Lex::new('\\')
    }
    .word(s, vars)
}

/// The text BuildKit shows for a step: set variables expanded, quotes kept, unset references
/// left as written. On an error the text is returned unchanged, as BuildKit does.
pub fn expand_for_display(s: &str, vars: &dyn Lookup, escape: char) -> String {
    Lex {
        raw_quotes: true,
        skip_unset: true,
        ..Lex::new(escape)
    }
    .word(s, vars)
    .unwrap_or_else(|_| s.to_string())
}

/// Split an instruction's argument text into words as the Dockerfile parser does for ENV,
/// LABEL and ARG: at unquoted, unescaped whitespace, keeping the quotes and escape characters
/// in the words (expansion removes them later). An escape character at the very end is
/// dropped; an unterminated quote runs to the end.
pub fn split_words(s: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Space,
        Word,
        Quote(char),
    }
    let chars: Vec<char> = s.chars().collect();
    let mut words = Vec::new();
    let mut cur = String::new();
    // A word that had quotes is kept even when empty (`A=""` is a word, `""` alone too).
    let mut keep_empty = false;
    let mut phase = Phase::Space;
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        match phase {
            Phase::Space if ch.is_whitespace() => {}
            Phase::Space | Phase::Word => {
                if ch.is_whitespace() {
                    if keep_empty || !cur.is_empty() {
                        words.push(std::mem::take(&mut cur));
                    }
                    keep_empty = false;
                    phase = Phase::Space;
                } else if ch == escape {
                    // Escape plus the next character stay together, even a quote or a space.
                    if let Some(&next) = chars.get(i + 1) {
                        cur.push(ch);
                        cur.push(next);
                        i += 1;
                    }
                    phase = Phase::Word;
                } else {
                    if ch == '\'' || ch == '"' {
                        keep_empty = true;
                        phase = Phase::Quote(ch);
                    } else {
                        phase = Phase::Word;
                    }
                    cur.push(ch);
                }
            }
            Phase::Quote(q) => {
                if ch == q {
                    phase = Phase::Word;
                    cur.push(ch);
                } else if ch == escape && q != '\'' {
                    match chars.get(i + 1) {
                        Some(&next) => {
                            cur.push(ch);
                            cur.push(next);
                            i += 1;
                        }
                        None => phase = Phase::Word,
                    }
                } else {
                    cur.push(ch);
                }
            }
        }
        i += 1;
    }
    if phase != Phase::Space && (keep_empty || !cur.is_empty()) {
        words.push(cur);
    }
    words
}

/// Split at runs of spaces, tabs, `\v`, `\f` and `\r`, with no regard to quotes: how the
/// Dockerfile parser splits FROM, EXPOSE and the non-JSON forms of COPY, ADD and VOLUME.
pub fn split_fields(s: &str) -> Vec<String> {
    s.split(is_field_space)
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

fn is_field_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\x0b' | '\x0c' | '\r')
}

/// Parse the arguments of ENV or LABEL into expanded (key, value) pairs.
///
/// `KEY=VALUE ...`: the text is split with [`split_words`], each word at its first `=`, and
/// key and value are each expanded with [`expand_word`] against `vars`: the variables from
/// before the instruction, so a later pair does not see an earlier one (`ENV a=1 b=$a` gives
/// `b` the previous `a`, as docker documents). When the first word has no `=` and
/// `legacy_ok`, the legacy form `KEY value with spaces` gives one pair: the key is the text up
/// to the first run of blanks and the value all the rest (expanded as one word, inner
/// whitespace kept).
pub fn parse_kv(
    s: &str,
    vars: &dyn Lookup,
    escape: char,
    legacy_ok: bool,
) -> Result<Vec<(String, String)>, String> {
    let s = s.trim();
    let words = split_words(s, escape);
    let Some(first) = words.first() else {
        return Err("requires at least one argument".into());
    };
    if !first.contains('=') && legacy_ok {
        let Some((key, value)) = s.split_once(is_field_space) else {
            return Err("must have two arguments (KEY VALUE, or KEY=VALUE ...)".into());
        };
        let value = value.trim_start_matches(is_field_space);
        return Ok(vec![(
            expand_word(key, vars, escape)?,
            expand_word(value, vars, escape)?,
        )]);
    }
    let mut pairs = Vec::with_capacity(words.len());
    for w in &words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!(
                "syntax error: can't find = in {w:?}; must be of the form name=value"
            ));
        };
        if k.is_empty() {
            return Err("names can not be blank".into());
        }
        pairs.push((expand_word(k, vars, escape)?, expand_word(v, vars, escape)?));
    }
    Ok(pairs)
}

/// Parse the arguments of ARG: `NAME` or `NAME=default`, several allowed. Names and defaults
/// are returned as written (quotes included): BuildKit never expands an ARG's name, and
/// expands a default only when no `--build-arg` overrides it, against the variables that
/// include the earlier ARGs of the same instruction (`ARG a=1 b=$a` gives `b` = 1, or the
/// build-arg value of `a`). So the caller does, for each pair in order:
/// `value = build_arg(name).or(default.map(|d| expand_word(d, scope)))`, then adds `name` to
/// the scope before the next pair.
pub fn parse_args_raw(s: &str, escape: char) -> Result<Vec<(String, Option<String>)>, String> {
    let words = split_words(s.trim(), escape);
    if words.is_empty() {
        return Err("requires at least one argument".into());
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some(("", _)) => Err("names can not be blank".to_string()),
            Some((k, v)) => Ok((k.to_string(), Some(v.to_string()))),
            None => Ok((w, None)),
        })
        .collect()
}

/// [`parse_args_raw`] with each default expanded against `vars` plus the defaults of the
/// earlier ARGs of the same instruction. Exact unless a `--build-arg` overrides an earlier
/// ARG of the same instruction (a later default then sees the default, not the build-arg
/// value) or a default that docker would not expand (overridden) has an error: use
/// [`parse_args_raw`] when that matters.
pub fn parse_args(s: &str, vars: &dyn Lookup, escape: char) -> Result<Vec<(String, Option<String>)>, String> {
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for (k, raw) in parse_args_raw(s, escape)? {
        let value = match raw {
            Some(raw) => {
                let scope = FnLookup(|name: &str| {
                    out.iter()
                        .rev()
                        .find(|(k, v)| k == name && v.is_some())
                        .and_then(|(_, v)| v.clone())
                        .or_else(|| vars.get(name))
                });
                Some(expand_word(&raw, &scope, escape)?)
            }
            None => None,
        };
        out.push((k, value));
    }
    Ok(out)
}

/// Words being collected for [`Processed::words`].
#[derive(Default)]
struct Words {
    cur: String,
    done: Vec<String>,
    in_word: bool,
}

impl Words {
    /// An unprotected character: whitespace ends the current word.
    fn plain(&mut self, c: char) {
        if !c.is_whitespace() {
            self.literal(c);
        } else if self.in_word && !self.cur.is_empty() {
            self.done.push(std::mem::take(&mut self.cur));
            self.in_word = false;
        }
    }

    /// A protected (escaped) character.
    fn literal(&mut self, c: char) {
        self.cur.push(c);
        self.in_word = true;
    }

    /// Text from a variable: its whitespace splits.
    fn expanded(&mut self, s: &str) {
        s.chars().for_each(|c| self.plain(c));
    }

    /// Text from quotes: kept whole.
    fn quoted(&mut self, s: &str) {
        self.cur.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.cur.is_empty() {
            self.done.push(self.cur);
        }
        self.done
    }
}

struct Scanner<'a> {
    chars: Vec<char>,
    pos: usize,
    lex: Lex,
    vars: &'a dyn Lookup,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn lookup(&mut self, name: &str) -> Option<String> {
        let v = self.vars.get(name);
        if v.is_some() {
            self.matched.insert(name.to_string());
        } else {
            self.unmatched.insert(name.to_string());
        }
        v
    }

    /// Process up to `stop` (consumed) or the end. `raw` keeps escape characters (inside
    /// `${V#...}`, `${V%...}` and `${V/.../...}`, whose patterns need them).
    fn until(&mut self, stop: Option<char>, raw: bool) -> Result<(String, Vec<String>), String> {
        let mut out = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.pos += 1;
                return Ok((out, words.finish()));
            }
            if ch == '$' {
                let v = self.dollar()?;
                out.push_str(&v);
                words.expanded(&v);
            } else if (ch == '\'' || ch == '"') && !self.lex.skip_quotes {
                let v = if ch == '\'' {
                    self.single_quoted()?
                } else {
                    self.double_quoted(raw)?
                };
                out.push_str(&v);
                words.quoted(&v);
            } else {
                self.pos += 1;
                if ch == self.lex.escape {
                    if raw {
                        out.push(ch);
                        words.literal(ch);
                    }
                    let Some(next) = self.next() else { break };
                    out.push(next);
                    words.literal(next);
                } else {
                    out.push(ch);
                    words.plain(ch);
                }
            }
        }
        match stop {
            Some(c) => Err(format!(
                "unexpected end of statement while looking for matching {c}"
            )),
            None => Ok((out, words.finish())),
        }
    }

    fn single_quoted(&mut self) -> Result<String, String> {
        let mut out = String::new();
        self.pos += 1;
        if self.lex.raw_quotes {
            out.push('\'');
        }
        loop {
            match self.next() {
                None => {
                    return Err("unexpected end of statement while looking for matching single-quote".into());
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        out.push('\'');
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self, raw: bool) -> Result<String, String> {
        let mut out = String::new();
        self.pos += 1;
        if self.lex.raw_quotes {
            out.push('"');
        }
        loop {
            match self.peek() {
                None => {
                    return Err("unexpected end of statement while looking for matching double-quote".into());
                }
                Some('"') => {
                    self.pos += 1;
                    if self.lex.raw_quotes {
                        out.push('"');
                    }
                    return Ok(out);
                }
                Some('$') => {
                    let v = self.dollar()?;
                    out.push_str(&v);
                }
                Some(c) => {
                    self.pos += 1;
                    let mut c = c;
                    if c == self.lex.escape {
                        if raw {
                            out.push(c);
                        }
                        match self.peek() {
                            // A trailing escape vanishes (and the quote is then unterminated).
                            None => continue,
                            // Only these can be escaped; before anything else the escape
                            // character is kept. (In raw mode BuildKit then writes it twice;
                            // kept for fidelity, it only matters inside `${V#"..."}`.)
                            Some(n) if n == '"' || n == '$' || n == self.lex.escape => {
                                self.pos += 1;
                                c = n;
                            }
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    /// A name after `$` or `${`: a run of digits, one special parameter, or letters, digits
    /// and `_`. Empty when none of these follows.
    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && is_digit(c) {
                while let Some(d) = self.peek().filter(|d| is_digit(*d)) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.pos += 1;
                return c.to_string();
            }
            if !(c.is_alphabetic() || is_digit(c) || c == '_') {
                break;
            }
            name.push(c);
            self.pos += 1;
        }
        name
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.lookup(&name) {
                Some(v) => v,
                None if self.lex.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.pos += 1;
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.name();
        let Some(mut op) = self.next() else {
            return Err("syntax error: missing '}'".into());
        };
        let mut shown = op.to_string();
        let mut colon = false;
        match op {
            '}' => {
                return Ok(match self.lookup(&name) {
                    Some(v) => v,
                    None if self.lex.skip_unset => format!("${{{name}}}"),
                    None => String::new(),
                });
            }
            '/' => return self.replace(&name),
            ':' => {
                colon = true;
                op = self.next().ok_or("syntax error: missing '}'")?;
                shown.push(op);
            }
            '+' | '-' | '?' | '#' | '%' => {}
            _ => return Err(format!("unsupported modifier ({shown}) in substitution")),
        }
        let missing = |s: &Self, e: String| {
            if s.peek().is_none() {
                "syntax error: missing '}'".into()
            } else {
                e
            }
        };
        let (word, _) = self
            .until(Some('}'), op == '#' || op == '%')
            .map_err(|e| missing(self, e))?;
        let value = self.lookup(&name);
        if value.is_none() && self.lex.skip_unset {
            return Ok(format!("${{{name}{shown}{word}}}"));
        }
        // With `:`, an empty value counts as unset.
        let unset = value.as_deref().is_none_or(|v| colon && v.is_empty());
        match op {
            '-' => Ok(if unset { word } else { value.unwrap_or_default() }),
            '+' => Ok(if unset { String::new() } else { word }),
            '?' => match value {
                None => Err(format!(
                    "{name}: {}",
                    or_default(word, "is not allowed to be unset")
                )),
                Some(v) if colon && v.is_empty() => Err(format!(
                    "{name}: {}",
                    or_default(word, "is not allowed to be empty")
                )),
                Some(v) => Ok(v),
            },
            '#' | '%' => {
                let value = value.unwrap_or_default();
                let (longest, pat) = match word.strip_prefix(op) {
                    Some(rest) => (true, rest.to_string()),
                    None => (false, word),
                };
                let toks = compile_pattern(&pat)?;
                let v: Vec<char> = value.chars().collect();
                Ok(if op == '#' {
                    match pick(&prefix_ends(&toks, &v, 0), longest) {
                        Some(end) => v[end..].iter().collect(),
                        None => value,
                    }
                } else {
                    let rtoks: Vec<Tok> = toks.into_iter().rev().collect();
                    let rv: Vec<char> = v.iter().rev().copied().collect();
                    match pick(&prefix_ends(&rtoks, &rv, 0), longest) {
                        Some(len) => v[..v.len() - len].iter().collect(),
                        None => value,
                    }
                })
            }
            _ => Err(format!("unsupported modifier ({shown}) in substitution")),
        }
    }

    /// `${V/p/r}` and `${V//p/r}`, after the first `/`.
    fn replace(&mut self, name: &str) -> Result<String, String> {
        let all = self.peek() == Some('/');
        if all {
            self.pos += 1;
        }
        let (pat, _) = self.until(Some('/'), true).map_err(|e| {
            if self.peek().is_none() {
                "syntax error: missing '/' in ${}".to_string()
            } else {
                e
            }
        })?;
        let (rep, _) = self.until(Some('}'), true).map_err(|e| {
            if self.peek().is_none() {
                "syntax error: missing '}'".to_string()
            } else {
                e
            }
        })?;
        let value = self.lookup(name);
        if value.is_none() && self.lex.skip_unset {
            return Ok(format!("${{{name}/{pat}/{rep}}}"));
        }
        // Compiled even for an unset variable: a bad pattern is an error either way.
        let toks = compile_pattern(&pat)?;
        let value = value.unwrap_or_default();
        let v: Vec<char> = value.chars().collect();
        // The leftmost match, as long as possible there (BuildKit's patterns are greedy here).
        let find =
            |from: usize| (from..=v.len()).find_map(|s| prefix_ends(&toks, &v, s).last().map(|e| (s, *e)));
        let mut out = String::new();
        if !all {
            return Ok(match find(0) {
                Some((s, e)) => {
                    out.extend(&v[..s]);
                    out.push_str(&rep);
                    out.extend(&v[e..]);
                    out
                }
                None => value,
            });
        }
        // Replace every match as Go's ReplaceAllString walks: an empty match right after a
        // match is not replaced, and the search always moves on by at least one character.
        let (mut search, mut last_end) = (0, 0);
        while search <= v.len() {
            let Some((s, e)) = find(search) else { break };
            out.extend(&v[last_end..s]);
            if e > last_end || s == 0 {
                out.push_str(&rep);
            }
            last_end = e;
            search = if e > search { e } else { search + 1 };
        }
        out.extend(&v[last_end.min(v.len())..]);
        Ok(out)
    }
}

/// Go's unicode.IsDigit, near enough: ASCII digits and other decimal digits.
fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

fn or_default(word: String, default: &str) -> String {
    if word.is_empty() {
        default.to_string()
    } else {
        word
    }
}

/// One element of a `${V#...}`-style pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `?`: one character (not a newline, as in BuildKit's regular expression).
    One,
    /// `*`: any run of characters without a newline.
    Star,
}

/// Compile a shell pattern of `${V#p}`, `${V%p}`, `${V/p/r}`: `*`, `?`, and `\` before `*`,
/// `?` or `\` for the literal character; `\}` and `\/` are `}` and `/`. Bracket expressions
/// are not supported (`[` is literal), as in BuildKit.
fn compile_pattern(p: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = p.chars().collect();
    let mut toks = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        toks.push(match c {
            '*' => Tok::Star,
            '?' => Tok::One,
            '\\' => match chars.get(i) {
                Some('}' | '/') => continue,
                Some(&n @ ('*' | '?' | '\\')) => {
                    i += 1;
                    Tok::Lit(n)
                }
                Some(n) => {
                    return Err(format!(
                        "invalid pattern ({p}) in substitution: invalid escape '\\{n}'"
                    ));
                }
                None => return Err(format!("invalid pattern ({p}) in substitution: trailing '\\'")),
            },
            c => Tok::Lit(c),
        });
    }
    Ok(toks)
}

/// The ends `e` (ascending) such that `toks` matches `text[start..e]` exactly.
fn prefix_ends(toks: &[Tok], text: &[char], start: usize) -> Vec<usize> {
    // A set of positions in `toks`; a star may match nothing, so it also stands for the
    // position after it.
    let close = |set: &mut Vec<bool>| {
        for i in 0..toks.len() {
            if set[i] && toks[i] == Tok::Star {
                set[i + 1] = true;
            }
        }
    };
    let mut set = vec![false; toks.len() + 1];
    set[0] = true;
    close(&mut set);
    let mut ends = Vec::new();
    let mut pos = start;
    loop {
        if set[toks.len()] {
            ends.push(pos);
        }
        let Some(&c) = text.get(pos) else { break };
        let mut next = vec![false; toks.len() + 1];
        for (i, t) in toks.iter().enumerate() {
            if !set[i] {
                continue;
            }
            match *t {
                Tok::Lit(l) if l == c => next[i + 1] = true,
                Tok::One if c != '\n' => next[i + 1] = true,
                Tok::Star if c != '\n' => next[i] = true,
                _ => {}
            }
        }
        close(&mut next);
        if !next.contains(&true) {
            break;
        }
        set = next;
        pos += 1;
    }
    ends
}

fn pick(ends: &[usize], longest: bool) -> Option<usize> {
    if longest {
        ends.last().copied()
    } else {
        ends.first().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The environment of BuildKit's envVarTest.
    fn test_env() -> BTreeMap<String, String> {
        env(&[
            ("PWD", "/home"),
            ("SHELL", "bash"),
            ("KOREAN", "한국어"),
            ("NULL", ""),
        ])
    }

    /// BuildKit's `shell/envVarTest` cases that apply to Unix (input, expected; None: an
    /// error), with the escape character `\`.
    const ENV_VAR_TEST: &[(&str, Option<&str>)] = &[
        ("hello", Some("hello")),
        ("he'll'o", Some("hello")),
        ("he'llo", None),
        (r"he\'llo", Some("he'llo")),
        (r"he\\'llo", None),
        (r"abc\tdef", Some("abctdef")),
        (r#""abc\tdef""#, Some(r"abc\tdef")),
        (r#""abc\\tdef""#, Some(r"abc\tdef")),
        (r"'abc\tdef'", Some(r"abc\tdef")),
        (r"hello\", Some("hello")),
        (r"hello\\", Some(r"hello\")),
        (r#""hello"#, None),
        (r#""hello\""#, None),
        (r#""hel'lo""#, Some("hel'lo")),
        ("'hello", None),
        (r"'hello\'", Some(r"hello\")),
        (r"'hello\there'", Some(r"hello\there")),
        (r"'hello\\there'", Some(r"hello\\there")),
        (r#""''""#, Some("''")),
        ("$.", Some("$.")),
        ("he$1x", Some("hex")),
        ("he$.x", Some("he$.x")),
        ("he$pwd.", Some("he.")),
        ("he$PWD", Some("he/home")),
        (r"he\$PWD", Some("he$PWD")),
        (r"he\\$PWD", Some(r"he\/home")),
        (r#""he\$PWD""#, Some("he$PWD")),
        (r#""he\\$PWD""#, Some(r"he\/home")),
        (r"\${}", Some("${}")),
        (r"\${}aaa", Some("${}aaa")),
        (r"he\${}", Some("he${}")),
        (r"he\${}xx", Some("he${}xx")),
        ("${}", None),
        ("${}xx", None),
        ("he${}", None),
        ("he${}xx", None),
        ("he${hi}", Some("he")),
        ("he${hi}xx", Some("hexx")),
        ("he${PWD}", Some("he/home")),
        ("he${.}", None),
        ("he${XXX:-000}xx", Some("he000xx")),
        ("he${PWD:-000}xx", Some("he/homexx")),
        ("he${XXX:-$PWD}xx", Some("he/homexx")),
        ("he${XXX:-${PWD:-yyy}}xx", Some("he/homexx")),
        ("he${XXX:-${YYY:-yyy}}xx", Some("heyyyxx")),
        ("he${XXX:YYY}", None),
        ("he${XXX?}", None),
        ("he${XXX:?}", None),
        ("he${PWD?}", Some("he/home")),
        ("he${PWD:?}", Some("he/home")),
        ("he${NULL?}", Some("he")),
        ("he${NULL:?}", None),
        ("he${XXX:+${PWD}}xx", Some("hexx")),
        ("he${PWD:+${XXX}}xx", Some("hexx")),
        ("he${PWD:+${SHELL}}xx", Some("hebashxx")),
        ("he${XXX:+000}xx", Some("hexx")),
        ("he${PWD:+000}xx", Some("he000xx")),
        ("'he${XX}'", Some("he${XX}")),
        (r#""he${PWD}""#, Some("he/home")),
        (r#""he'$PWD'""#, Some("he'/home'")),
        (r#""$PWD""#, Some("/home")),
        ("'$PWD'", Some("$PWD")),
        (r"'\$PWD'", Some(r"\$PWD")),
        (r#"'"hello"'"#, Some(r#""hello""#)),
        (r"'he\$PWD'", Some(r"he\$PWD")),
        ("he${PWD", None),
        ("he${PWD=000}xx", None),
        ("he${PWD:=000}xx", None),
        ("he${PWD+000}xx", Some("he000xx")),
        ("he${PWD-000}xx", Some("he/homexx")),
        ("he${XXX-000}xx", Some("he000xx")),
        ("he${XXX+000}xx", Some("hexx")),
        ("he${NULL-000}xx", Some("hexx")),
        ("he${NULL:-000}xx", Some("he000xx")),
        ("he${NULL+000}xx", Some("he000xx")),
        ("he${NULL:+000}xx", Some("hexx")),
        ("${KOREAN}", Some("한국어")),
        ("한국어${KOREAN}", Some("한국어한국어")),
        ("${PWD#/}", Some("home")),
        ("${PWD#*o}", Some("me")),
        ("${PWD%e}", Some("/hom")),
        ("${PWD%%/*}", Some("")),
        ("${SHELL/a/A}", Some("bAsh")),
        ("${SHELL//[a]/x}", Some("bash")),
    ];

    #[test]
    fn env_var_test_table() {
        let e = test_env();
        for (input, want) in ENV_VAR_TEST {
            let got = expand_word(input, &e, '\\');
            match want {
                Some(w) => assert_eq!(got.as_deref(), Ok(*w), "input {input:?}"),
                None => assert!(got.is_err(), "input {input:?} gave {got:?}, want an error"),
            }
        }
    }

    /// BuildKit's TestProcessWithMatches cases: (input, env, expected; None: an error).
    #[test]
    fn process_with_matches_table() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            ("x", &[("DUMMY", "dummy")], Some("x")),
            ("x ${UNUSED}", &[("DUMMY", "dummy")], Some("x ")),
            ("x ${FOO}", &[("FOO", "y")], Some("x y")),
            (
                "${FOO-aaa} ${BAR-bbb} ${BAZ-ccc}",
                &[("FOO", "xxx"), ("BAR", "")],
                Some("xxx  ccc"),
            ),
            (
                "${FOO:-aaa} ${BAR:-bbb} ${BAZ:-ccc}",
                &[("FOO", "xxx"), ("BAR", "")],
                Some("xxx bbb ccc"),
            ),
            ("${FOO:-}", &[("FOO", "xxx"), ("BAR", "")], Some("xxx")),
            ("${FOO:-}", &[], Some("")),
            (
                "${FOO+aaa} ${BAR+bbb} ${BAZ+ccc}",
                &[("FOO", "xxx"), ("BAR", "")],
                Some("aaa bbb "),
            ),
            (
                "${FOO:+aaa} ${BAR:+bbb} ${BAZ:+ccc}",
                &[("FOO", "xxx"), ("BAR", "")],
                Some("aaa  "),
            ),
            ("${FOO?aaa}", &[("FOO", "xxx"), ("BAR", "")], Some("xxx")),
            ("${BAR?bbb}", &[("FOO", "xxx"), ("BAR", "")], Some("")),
            ("${BAZ?ccc}", &[("FOO", "xxx"), ("BAR", "")], None),
            ("${FOO:?aaa}", &[("FOO", "xxx"), ("BAR", "")], Some("xxx")),
            ("${BAR:?bbb}", &[("FOO", "xxx"), ("BAR", "")], None),
            ("${BAZ:?ccc}", &[("FOO", "xxx"), ("BAR", "")], None),
            ("${BAZ:?}", &[("FOO", "xxx"), ("BAR", "")], None),
            ("${FOO=aaa}", &[("FOO", "xxx"), ("BAR", "")], None),
            ("${FOO=:aaa}", &[("FOO", "xxx"), ("BAR", "")], None),
            ("${FOO=}", &[], None),
            (
                r"${FOO#()[]{\}^$.\*\?|\\}",
                &[("FOO", r"()[]{}^$.*?|\x")],
                Some("x"),
            ),
            (r"${FOO%%\**}", &[("FOO", "xx**")], Some("xx")),
            ("${FOO#*x*y}", &[("FOO", "xxyy")], Some("y")),
            ("${FOO#*}", &[("FOO", "xxyy")], Some("xxyy")),
            ("${FOO#$BAR}", &[("FOO", "xxyy"), ("BAR", "x")], Some("xyy")),
            ("${FOO#$BAR}", &[("FOO", "xxyy"), ("BAR", "")], Some("xxyy")),
            ("${FOO#}", &[("FOO", "xxyy")], Some("xxyy")),
            ("${FOO##*x}", &[("FOO", "xxyy")], Some("yy")),
            ("${FOO##}", &[("FOO", "xxyy")], Some("xxyy")),
            (r"${FOO#?\?}", &[("FOO", "???y")], Some("?y")),
            ("${ABC:-.}${FOO%x}${ABC:-.}", &[("FOO", "xxyy")], Some(".xxyy.")),
            (r"${FOO%%\**\*}", &[("FOO", "a***yy*")], Some("a")),
            ("${FOO%}", &[("FOO", "xxyy")], Some("xxyy")),
            ("${FOO%%$BAR}", &[("FOO", "xxyy"), ("BAR", "")], Some("xxyy")),
            (
                "${FOO/$NEEDLE/.} - ${FOO//$NEEDLE/.}",
                &[("FOO", "/foo*/*/*.txt"), ("NEEDLE", r"\*/")],
                Some("/foo.*/*.txt - /foo..*.txt"),
            ),
            (
                "${FOO/$NEEDLE/} - ${FOO//$NEEDLE/}",
                &[("FOO", "/tmp/tmp/bar.txt"), ("NEEDLE", "/tmp")],
                Some("/tmp/bar.txt - /bar.txt"),
            ),
            (
                "${FOO/$NEEDLE/$REPLACEMENT} - ${FOO//$NEEDLE/$REPLACEMENT}",
                &[("FOO", "/a/foo/b/c.txt"), ("NEEDLE", "/?/"), ("REPLACEMENT", "/")],
                Some("/foo/b/c.txt - /foo/c.txt"),
            ),
            (
                "${FOO/$NEEDLE/$REPLACEMENT}",
                &[
                    ("FOO", "http://google.de"),
                    ("NEEDLE", "http://"),
                    ("REPLACEMENT", "https://"),
                ],
                Some("https://google.de"),
            ),
            (
                r"${FOO//\//\/}",
                &[("FOO", "/tmp/foo.txt")],
                Some(r"\/tmp\/foo.txt"),
            ),
            ("${FOO/$BAR/ww}", &[("FOO", "xxyy"), ("BAR", "")], Some("wwxxyy")),
            ("${FOO//ww}", &[("FOO", "xxyy")], None),
            ("${FOO//}", &[("FOO", "xxyy")], None),
            ("${FOO///}", &[("FOO", "xxyy")], Some("xxyy")),
            ("${FOO///}", &[], Some("")),
        ];
        for (input, vars, want) in cases {
            let got = expand_word(input, &env(vars), '\\');
            match want {
                Some(w) => assert_eq!(got.as_deref(), Ok(*w), "input {input:?}"),
                None => assert!(got.is_err(), "input {input:?} gave {got:?}, want an error"),
            }
        }
    }

    #[test]
    fn matched_and_unmatched_names() {
        let p = Lex::new('\\').process(
            "${FOO-aaa} ${BAR-bbb} ${BAZ-ccc}",
            &env(&[("FOO", "x"), ("BAR", "")]),
        );
        let p = p.unwrap_or_default();
        assert_eq!(p.matched, ["BAR", "FOO"].iter().map(|s| s.to_string()).collect());
        assert_eq!(p.unmatched, ["BAZ"].iter().map(|s| s.to_string()).collect());
    }

    #[test]
    fn mandatory_messages() {
        let set = env(&[("VAR", "plain"), ("ARG", "x")]);
        let empty = env(&[("VAR", ""), ("ARG", "x")]);
        let unset = env(&[("ARG", "x")]);
        let no_empty = "${VAR:?message here$ARG}";
        let no_unset = "${VAR?message here$ARG}";
        assert_eq!(expand_word(no_empty, &set, '\\').as_deref(), Ok("plain"));
        assert!(expand_word(no_empty, &empty, '\\').is_err_and(|e| e.contains("message herex")));
        assert!(expand_word(no_empty, &unset, '\\').is_err_and(|e| e.contains("message herex")));
        assert_eq!(expand_word(no_unset, &set, '\\').as_deref(), Ok("plain"));
        assert_eq!(expand_word(no_unset, &empty, '\\').as_deref(), Ok(""));
        assert!(expand_word(no_unset, &unset, '\\').is_err_and(|e| e.contains("message herex")));
        assert!(
            expand_word("${X?}", &unset, '\\').is_err_and(|e| e.contains("X: is not allowed to be unset"))
        );
        assert!(expand_word("${VAR:?}", &empty, '\\')
            .is_err_and(|e| e.contains("VAR: is not allowed to be empty")));
    }

    #[test]
    fn error_messages_are_clear() {
        let e = env(&[]);
        let err = |s: &str| expand_word(s, &e, '\\').err().unwrap_or_default();
        assert!(err("'abc").contains("single-quote"));
        assert!(err("\"abc").contains("double-quote"));
        assert!(err("${abc").contains("missing '}'"));
        assert!(err("${abc:-x").contains("missing '}'"));
        assert!(err("${}").contains("bad substitution"));
        assert!(err("${a:=b}").contains("unsupported modifier (:=)"));
        assert!(err("${a=b}").contains("unsupported modifier (=)"));
        assert!(err("${a/b").contains("missing '/'"));
        assert!(err("x${}").starts_with("failed to process \"x${}\""));
        assert!(
            expand_word(r"${a#\x}", &env(&[("a", "v")]), '\\').is_err_and(|e| e.contains("invalid escape"))
        );
    }

    #[test]
    fn digits_and_special_parameters() {
        let e = env(&[("1", "one"), ("12", "twelve"), ("$", "pid"), ("0", "zero")]);
        assert_eq!(expand_word("$1x", &e, '\\').as_deref(), Ok("onex"));
        assert_eq!(expand_word("$12x", &e, '\\').as_deref(), Ok("twelvex"));
        assert_eq!(expand_word("$$", &e, '\\').as_deref(), Ok("pid"));
        assert_eq!(expand_word("$0abc", &e, '\\').as_deref(), Ok("zeroabc"));
        let none = env(&[]);
        // `$$` is the unset special parameter `$`, not a literal dollar.
        assert_eq!(expand_word("a$$b", &none, '\\').as_deref(), Ok("ab"));
        assert_eq!(expand_word("$@$*$#$?$-$!", &none, '\\').as_deref(), Ok(""));
        assert_eq!(expand_word("cost: $", &none, '\\').as_deref(), Ok("cost: $"));
        assert_eq!(expand_word("$ x", &none, '\\').as_deref(), Ok("$ x"));
        assert_eq!(expand_word("a$/b", &none, '\\').as_deref(), Ok("a$/b"));
        assert_eq!(expand_word("${1}", &e, '\\').as_deref(), Ok("one"));
        assert_eq!(expand_word("${--x}", &none, '\\').as_deref(), Ok("x"));
    }

    #[test]
    fn names_are_letters_digits_underscore() {
        let e = env(&[("A_1", "v"), ("é", "accent")]);
        assert_eq!(expand_word("$A_1.x", &e, '\\').as_deref(), Ok("v.x"));
        assert_eq!(expand_word("$A_1-x", &e, '\\').as_deref(), Ok("v-x"));
        assert_eq!(expand_word("${é}", &e, '\\').as_deref(), Ok("accent"));
    }

    #[test]
    fn backtick_escape() {
        let e = env(&[("X", "v")]);
        let w = |s: &str| expand_word(s, &e, '`');
        assert_eq!(w(r"C:\path\$X").as_deref(), Ok(r"C:\path\v"));
        assert_eq!(w("a`$X").as_deref(), Ok("a$X"));
        assert_eq!(w("a` b").as_deref(), Ok("a b"));
        assert_eq!(w("\"a`\"b\"").as_deref(), Ok("a\"b"));
        assert_eq!(w("\"a``b\"").as_deref(), Ok("a`b"));
        assert_eq!(w("\"a`tb\"").as_deref(), Ok("a`tb"));
        assert_eq!(w(r#""a\tb""#).as_deref(), Ok(r"a\tb"));
        assert_eq!(w("end`").as_deref(), Ok("end"));
        assert!(w(r#""a\""#).is_ok_and(|s| s == r"a\"));
    }

    #[test]
    fn words_split_like_process_words() {
        let vars = env(&[
            ("hi", "hi"),
            ("space", "abc  def"),
            ("leading", "  ab c"),
            ("trailing", "ab c   "),
            ("empty", ""),
        ]);
        let cases: &[(&str, Option<&[&str]>)] = &[
            ("hello", Some(&["hello"])),
            ("hello${hi}bye", Some(&["hellohibye"])),
            ("hello${space}bye", Some(&["helloabc", "defbye"])),
            ("hello\"${space}\"bye", Some(&["helloabc  defbye"])),
            ("hello \"${space}\"bye", Some(&["hello", "abc  defbye"])),
            ("hello${leading}def", Some(&["hello", "ab", "cdef"])),
            ("hello\"${leading}\" def", Some(&["hello  ab c", "def"])),
            ("hello\"${leading}\"", Some(&["hello  ab c"])),
            ("hello${leading}", Some(&["hello", "ab", "c"])),
            ("hello${trailing}", Some(&["helloab", "c"])),
            ("hello${trailing}d", Some(&["helloab", "c", "d"])),
            ("hello\"${trailing}\"d", Some(&["helloab c   d"])),
            ("hel\"lo${trailing}\"", Some(&["helloab c   "])),
            ("hello\" there  \"", Some(&["hello there  "])),
            ("hello there", Some(&["hello", "there"])),
            ("  hello   there  ", Some(&["hello", "there"])),
            ("hello\\ there", Some(&["hello there"])),
            ("hello\" there", None),
            ("hello\\\" there", Some(&["hello\"", "there"])),
            ("hello\"\\\\there\"", Some(&["hello\\there"])),
            ("hello\"\\there\"", Some(&["hello\\there"])),
            ("hello'\\\\there'", Some(&["hello\\\\there"])),
            ("hello'\\there'", Some(&["hello\\there"])),
            ("hello'$there'", Some(&["hello$there"])),
            ("a \"\" b", Some(&["a", "b"])),
            ("$empty", Some(&[])),
            ("${X:-\"a b\"}", Some(&["a", "b"])),
            ("80 443/udp", Some(&["80", "443/udp"])),
        ];
        for (input, want) in cases {
            let got = expand_words(input, &vars, '\\');
            match want {
                Some(w) => assert_eq!(
                    got,
                    Ok(w.iter().map(|s| s.to_string()).collect()),
                    "input {input:?}"
                ),
                None => assert!(got.is_err(), "input {input:?} gave {got:?}"),
            }
        }
    }

    #[test]
    fn nested_and_quoted_words_in_modifiers() {
        let e = env(&[("a", ""), ("b", "B"), ("sp", "x y")]);
        assert_eq!(expand_word("${a:-${b}}", &e, '\\').as_deref(), Ok("B"));
        assert_eq!(expand_word("${a-${b}}", &e, '\\').as_deref(), Ok(""));
        assert_eq!(expand_word("${u:-'${b}'}", &e, '\\').as_deref(), Ok("${b}"));
        assert_eq!(expand_word("${u:-\"$b c\"}", &e, '\\').as_deref(), Ok("B c"));
        assert_eq!(expand_word(r"${u:-a\}b}", &e, '\\').as_deref(), Ok("a}b"));
        assert_eq!(expand_word("${b:+${u:-${sp}}}", &e, '\\').as_deref(), Ok("x y"));
        assert_eq!(expand_word("${u:-}", &e, '\\').as_deref(), Ok(""));
    }

    #[test]
    fn pattern_trimming() {
        let e = env(&[("P", "/usr/local/bin/tool.tar.gz"), ("N", "a\nb"), ("S", "x*y")]);
        let w = |s: &str| expand_word(s, &e, '\\').unwrap_or_else(|err| panic!("{s}: {err}"));
        assert_eq!(w("${P#*/}"), "usr/local/bin/tool.tar.gz");
        assert_eq!(w("${P##*/}"), "tool.tar.gz");
        assert_eq!(w("${P%.*}"), "/usr/local/bin/tool.tar");
        assert_eq!(w("${P%%.*}"), "/usr/local/bin/tool");
        assert_eq!(w("${P%/*}"), "/usr/local/bin");
        assert_eq!(w("${P#/usr}"), "/local/bin/tool.tar.gz");
        assert_eq!(w("${P#nomatch}"), "/usr/local/bin/tool.tar.gz");
        assert_eq!(w("${P#?}"), "usr/local/bin/tool.tar.gz");
        assert_eq!(w("${P:#/usr}"), "/local/bin/tool.tar.gz");
        assert_eq!(w(r"${S#*\*}"), "y");
        assert_eq!(w("${U#x}"), "");
        // `*` and `?` do not cross a newline (BuildKit's patterns are regular expressions).
        assert_eq!(w("${N#*b}"), "a\nb");
        assert_eq!(w("${N#a?b}"), "a\nb");
    }

    #[test]
    fn replacement() {
        let e = env(&[("V", "aaa"), ("P", "a.b.c"), ("E", "xy")]);
        let w = |s: &str| expand_word(s, &e, '\\').unwrap_or_else(|err| panic!("{s}: {err}"));
        assert_eq!(w("${V/a/b}"), "baa");
        assert_eq!(w("${V//a/b}"), "bbb");
        assert_eq!(w("${P//./-}"), "a-b-c");
        assert_eq!(w("${P/*./X}"), "Xc");
        assert_eq!(w("${V//a*/X}"), "X");
        assert_eq!(w("${V/z/X}"), "aaa");
        assert_eq!(w("${U/a/b}"), "");
        // An empty pattern matches between every character (Go's ReplaceAll).
        assert_eq!(w("${E///-}"), "-x-y-");
        assert_eq!(w("${E//*/-}"), "-");
        assert_eq!(w("${E/x/'q r'}"), "q ry");
    }

    #[test]
    fn skip_unset_and_raw_quotes_for_display() {
        let e = env(&[("A", "1")]);
        assert_eq!(
            expand_for_display("RUN echo \"$A\" $B ${C} ${D:-x}", &e, '\\'),
            "RUN echo \"1\" $B ${C} ${D:-x}"
        );
        assert_eq!(
            expand_for_display("RUN echo '$A' ${E/a/b}", &e, '\\'),
            "RUN echo '$A' ${E/a/b}"
        );
        assert_eq!(
            expand_for_display("RUN echo \"unterminated", &e, '\\'),
            "RUN echo \"unterminated"
        );
    }

    #[test]
    fn heredoc_bodies_keep_quotes() {
        let e = env(&[("A", "1")]);
        assert_eq!(
            expand_heredoc("echo \"$A\" '$A'\nx=${A:-2}\n", &e).as_deref(),
            Ok("echo \"1\" '1'\nx=1\n")
        );
        assert_eq!(expand_heredoc(r"price \$5 a\b", &e).as_deref(), Ok("price $5 ab"));
    }

    #[test]
    fn env_pairs_see_the_environment_before_the_instruction() {
        let before = env(&[("a", "0")]);
        assert_eq!(
            parse_kv("a=1 b=$a", &before, '\\', true),
            Ok(vec![("a".into(), "1".into()), ("b".into(), "0".into())])
        );
        assert_eq!(
            parse_kv("a=1 b=$a", &env(&[]), '\\', true),
            Ok(vec![("a".into(), "1".into()), ("b".into(), "".into())])
        );
    }

    #[test]
    fn env_pairs_quotes_and_escapes() {
        let e = env(&[("K", "name"), ("V", "v a l")]);
        let got = parse_kv(
            r#"A="hello world" B='x $V' C=a\ b D= E="" ${K}=$V F=x=y"#,
            &e,
            '\\',
            true,
        );
        let want: Vec<(String, String)> = [
            ("A", "hello world"),
            ("B", "x $V"),
            ("C", "a b"),
            ("D", ""),
            ("E", ""),
            ("name", "v a l"),
            ("F", "x=y"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, Ok(want));
        assert_eq!(
            parse_kv("A=x` y B=c:\\d", &e, '`', true),
            Ok(vec![("A".into(), "x y".into()), ("B".into(), "c:\\d".into())])
        );
        assert_eq!(
            parse_kv("  A=1   ", &e, '\\', true),
            Ok(vec![("A".into(), "1".into())])
        );
    }

    #[test]
    fn env_legacy_form() {
        let e = env(&[("X", "x")]);
        assert_eq!(
            parse_kv("FOO bar baz  qux", &e, '\\', true),
            Ok(vec![("FOO".into(), "bar baz  qux".into())])
        );
        assert_eq!(
            parse_kv("FOO   \"quoted  value\" $X", &e, '\\', true),
            Ok(vec![("FOO".into(), "quoted  value x".into())])
        );
        assert_eq!(
            parse_kv("PATH\t/a:$X", &e, '\\', true),
            Ok(vec![("PATH".into(), "/a:x".into())])
        );
        assert!(parse_kv("FOO", &e, '\\', true).is_err());
        assert!(parse_kv("FOO bar", &e, '\\', false).is_err());
        // Once the first word has `=`, every word needs one.
        assert!(parse_kv("a=1 b", &e, '\\', true).is_err_and(|m| m.contains("can't find =")));
        assert!(parse_kv("=x", &e, '\\', true).is_err_and(|m| m.contains("blank")));
        assert!(parse_kv("   ", &e, '\\', true).is_err());
        assert!(parse_kv("a=\"x", &e, '\\', true).is_err());
    }

    #[test]
    fn split_words_keeps_quotes_and_escapes() {
        let w = |s: &str, e: char| split_words(s, e);
        assert_eq!(
            w(r#"a="x y" b='p q' c=d\ e"#, '\\'),
            vec![r#"a="x y""#, "b='p q'", r"c=d\ e"]
        );
        assert_eq!(w(r#"a=\"x y"#, '\\'), vec![r#"a=\"x"#, "y"]);
        assert_eq!(w(r#"a="x\" y""#, '\\'), vec![r#"a="x\" y""#]);
        // Nothing is escaped inside '...': the quote ends at the second '.
        assert_eq!(w(r"'it\'s x", '\\'), vec![r"'it\'s", "x"]);
        assert_eq!(w(r#""" x"#, '\\'), vec![r#""""#, "x"]);
        assert_eq!(w("x\\", '\\'), vec!["x"]);
        assert_eq!(w("\"open", '\\'), vec!["\"open"]);
        assert_eq!(w("  ", '\\'), Vec::<String>::new());
        assert_eq!(w("a=x` y", '`'), vec!["a=x` y"]);
    }

    #[test]
    fn split_fields_ignores_quotes() {
        assert_eq!(split_fields("  a \t b\r\"c d\" "), vec!["a", "b", "\"c", "d\""]);
        assert_eq!(split_fields(""), Vec::<String>::new());
    }

    #[test]
    fn arg_raw_pairs() {
        assert_eq!(
            parse_args_raw("A B=2 C= D=\"x y\" E=$A", '\\'),
            Ok(vec![
                ("A".into(), None),
                ("B".into(), Some("2".into())),
                ("C".into(), Some("".into())),
                ("D".into(), Some("\"x y\"".into())),
                ("E".into(), Some("$A".into())),
            ])
        );
        assert!(parse_args_raw("=x", '\\').is_err());
        assert!(parse_args_raw("", '\\').is_err());
    }

    #[test]
    fn arg_defaults_see_earlier_args_of_the_instruction() {
        let e = env(&[("a", "old"), ("z", "Z")]);
        assert_eq!(
            parse_args("a=1 b=$a c d=${z}-\"q r\"", &e, '\\'),
            Ok(vec![
                ("a".into(), Some("1".into())),
                ("b".into(), Some("1".into())),
                ("c".into(), None),
                ("d".into(), Some("Z-q r".into())),
            ])
        );
        // An ARG without a default does not hide the outer value.
        assert_eq!(
            parse_args("a b=$a", &e, '\\'),
            Ok(vec![("a".into(), None), ("b".into(), Some("old".into()))])
        );
    }

    #[test]
    fn lookups() {
        let mut h: HashMap<String, String> = HashMap::new();
        h.insert("A".into(), "h".into());
        assert_eq!(expand_word("$A", &h, '\\').as_deref(), Ok("h"));
        let f = FnLookup(|n: &str| (n == "A").then(|| "f".to_string()));
        assert_eq!(expand_word("$A$B", &f, '\\').as_deref(), Ok("f"));
    }
}
