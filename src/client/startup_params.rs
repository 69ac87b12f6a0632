//! Startup parameters: refuse protected settings set at login, directly or through `options`.

use crate::guard::protected::ProtectedSet;

/// Settings a client tries to set at login: direct parameters plus `-c name=value` /
/// `--name=value` inside `options`.
pub fn requested_settings(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => out.extend(parse_options(v)),
            _ => out.push((k.clone(), v.clone())),
        }
    }
    out
}

/// Split `options` like the server does (whitespace separated, backslash escapes) and collect
/// `-c name=value`, `-cname=value` and `--name=value`.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                cur.push(n);
                in_word = true;
            }
        } else if c.is_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut cur));
                in_word = false;
            }
        } else {
            cur.push(c);
            in_word = true;
        }
    }
    if in_word {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut iter = words.into_iter();
    while let Some(w) = iter.next() {
        let assignment = if w == "-c" {
            iter.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_string())
        } else {
            w.strip_prefix("-c").map(str::to_string)
        };
        match assignment {
            Some(a) => {
                let (name, value) = a.split_once('=').unwrap_or((a.as_str(), ""));
                // The server treats '-' in option names as '_'.
                out.push((name.trim().replace('-', "_"), value.to_string()));
            }
            None => out.push((w, String::new())),
        }
    }
    out
}

/// The first requested setting a client may not set at login, if any.
pub fn forbidden_setting(params: &[(String, String)], protected: &ProtectedSet) -> Option<String> {
    requested_settings(params)
        .into_iter()
        .map(|(name, _)| name)
        .find(|name| {
            let lower = name.to_ascii_lowercase();
            protected.is_protected(&lower)
                || matches!(lower.as_str(), "role" | "session_authorization")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn finds_protected_settings_in_every_spelling() {
        let prot = ProtectedSet::new(&["app.*".into()]);
        assert_eq!(
            forbidden_setting(&p(&[("app.current_store_id", "x")]), &prot).as_deref(),
            Some("app.current_store_id")
        );
        assert!(
            forbidden_setting(&p(&[("options", "-c app.current_store_id=x")]), &prot).is_some()
        );
        assert!(forbidden_setting(&p(&[("options", "-capp.current_store_id=x")]), &prot).is_some());
        assert!(forbidden_setting(&p(&[("options", "--APP.current-store-id=x")]), &prot).is_some());
        // an escaped space keeps "-c app.x=1" one word; still refused
        assert!(
            forbidden_setting(&p(&[("options", "-c search_path=a -c\\ app.x=1")]), &prot).is_some()
        );
        assert!(forbidden_setting(&p(&[("options", "-c role=admin")]), &prot).is_some());
        assert!(
            forbidden_setting(
                &p(&[
                    ("options", "-c search_path=public"),
                    ("application_name", "x")
                ]),
                &prot
            )
            .is_none()
        );
    }
}
