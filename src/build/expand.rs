//! TEMPORARY minimal expansion (replaced by the full implementation).
use std::collections::BTreeMap;

/// Variables.
pub trait Lookup {
    /// Value.
    fn get(&self, name: &str) -> Option<String>;
}
impl Lookup for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}
/// Expand.
pub fn expand_word(s: &str, vars: &dyn Lookup, _escape: char) -> Result<String, String> {
    let mut out = String::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        if b[i] == '$' && i + 1 < b.len() {
            if b[i + 1] == '{' {
                let end = b[i..].iter().position(|c| *c == '}').ok_or("unterminated ${")? + i;
                let name: String = b[i + 2..end].iter().collect();
                out.push_str(&vars.get(&name).unwrap_or_default());
                i = end + 1;
                continue;
            }
            let mut j = i + 1;
            while j < b.len() && (b[j].is_alphanumeric() || b[j] == '_') {
                j += 1;
            }
            let name: String = b[i + 1..j].iter().collect();
            out.push_str(&vars.get(&name).unwrap_or_default());
            i = j;
            continue;
        }
        if b[i] != '"' {
            out.push(b[i]);
        }
        i += 1;
    }
    Ok(out)
}
/// Words.
pub fn expand_words(s: &str, vars: &dyn Lookup, escape: char) -> Result<Vec<String>, String> {
    s.split_whitespace()
        .map(|w| expand_word(w, vars, escape))
        .collect()
}
/// Pairs.
pub fn parse_kv(
    s: &str,
    vars: &dyn Lookup,
    escape: char,
    _legacy_ok: bool,
) -> Result<Vec<(String, String)>, String> {
    if !s.split_whitespace().next().unwrap_or("").contains('=') {
        let (k, v) = s.trim().split_once(char::is_whitespace).ok_or("want KEY VALUE")?;
        return Ok(vec![(k.to_string(), expand_word(v.trim(), vars, escape)?)]);
    }
    s.split_whitespace()
        .map(|w| {
            let (k, v) = w.split_once('=').ok_or("want KEY=VALUE")?;
            Ok((k.to_string(), expand_word(v, vars, escape)?))
        })
        .collect()
}
/// Args.
pub fn parse_args(s: &str, vars: &dyn Lookup, escape: char) -> Result<Vec<(String, Option<String>)>, String> {
    s.split_whitespace()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), Some(expand_word(v, vars, escape)?))),
            None => Ok((w.to_string(), None)),
        })
        .collect()
}
