//! TEMPORARY minimal .dockerignore (replaced by the full implementation).
/// Patterns.
#[derive(Debug, Clone)]
pub struct Ignore(Vec<(bool, String)>);
impl Ignore {
    /// Parse.
    pub fn parse(text: &str) -> Result<Ignore, String> {
        Ok(Ignore(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| match l.strip_prefix('!') {
                    Some(p) => (true, p.trim_start_matches('/').to_string()),
                    None => (false, l.trim_start_matches('/').to_string()),
                })
                .collect(),
        ))
    }
    /// Excluded?
    pub fn excluded(&self, rel: &str) -> bool {
        let mut ex = false;
        for (neg, p) in &self.0 {
            if rel == p || rel.starts_with(&format!("{p}/")) {
                ex = !neg;
            }
        }
        ex
    }
}
