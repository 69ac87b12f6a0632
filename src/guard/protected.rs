//! Which settings are protected: `[guard] protected`, e.g. `app.*` or an exact name.
//! Setting names are case-insensitive in Postgres, so matching is too.

#[derive(Debug, Clone)]
pub struct ProtectedSet {
    prefixes: Vec<String>,
    exact: Vec<String>,
}

impl ProtectedSet {
    pub fn new(patterns: &[String]) -> Self {
        let mut prefixes = Vec::new();
        let mut exact = Vec::new();
        for p in patterns {
            let p = p.trim().to_ascii_lowercase();
            match p.strip_suffix('*') {
                Some(prefix) => prefixes.push(prefix.to_string()),
                None => exact.push(p),
            }
        }
        ProtectedSet { prefixes, exact }
    }

    pub fn is_protected(&self, name: &str) -> bool {
        let name = name.trim().to_ascii_lowercase();
        self.exact.contains(&name) || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// Whether the text mentions anything that looks like a protected name (for unparsable SQL).
    pub fn mentioned_in(&self, text_lower: &str) -> bool {
        self.prefixes.iter().chain(self.exact.iter()).any(|p| {
            let head = p.split('.').next().unwrap_or(p);
            !head.is_empty() && text_lower.contains(head)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_case_insensitively() {
        let p = ProtectedSet::new(&["app.*".into(), "other.exact".into()]);
        assert!(p.is_protected("app.current_store_id"));
        assert!(p.is_protected("APP.Current_Store_ID"));
        assert!(p.is_protected("other.EXACT"));
        assert!(!p.is_protected("other.exactly"));
        assert!(!p.is_protected("search_path"));
        assert!(!p.is_protected("application_name"));
    }
}
