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

/// Client encodings in which a multibyte character can end in a byte that is `\\` or `'` in
/// ASCII: text lexed in one of them could hide a statement from the guard.
const UNSAFE_ENCODINGS: &[&str] = &["sjis", "shiftjis", "big5", "gbk", "uhc", "gb18030", "johab"];

/// The first requested setting a client may not set at login, if any: protected settings,
/// role changes, and settings that change how the server reads SQL text (unless set to the
/// value the guard assumes). `client_encoding` is never applied upstream (rlsgate talks UTF-8);
/// the encodings that could change how quotes are read are refused outright.
pub fn forbidden_setting(params: &[(String, String)], protected: &ProtectedSet) -> Option<String> {
    requested_settings(params)
        .into_iter()
        .find(|(name, value)| {
            let lower = name.to_ascii_lowercase();
            let unsafe_encoding = lower == "client_encoding" && {
                let v = value.trim().to_ascii_lowercase().replace(['_', '-'], "");
                UNSAFE_ENCODINGS.contains(&v.as_str())
            };
            // new objects would be created in the temporary schema, out of the pool's sight
            let temp_path = lower == "search_path"
                && value
                    .split(',')
                    .any(|s| crate::guard::policy::is_temp_schema(s.trim().trim_matches('"')));
            protected.is_protected(&lower)
                || crate::guard::policy::ROLE_SETTINGS.contains(&lower.as_str())
                || lower == "seed"
                || lower == "idle_session_timeout"
                || temp_path
                || unsafe_encoding
                || (lower != "client_encoding"
                    && crate::guard::policy::lexer_setting(&lower)
                    && !crate::guard::policy::lexer_value_ok(&lower, value))
        })
        .map(|(name, _)| name)
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
        // settings that change how SQL text is read
        for bad in [
            "-c standard_conforming_strings=off",
            "--standard-conforming-strings=off",
            "-c backslash_quote=on",
            "-c client_encoding=SJIS",
            "-cclient_encoding=Shift_JIS",
        ] {
            assert!(
                forbidden_setting(&p(&[("options", bad)]), &prot).is_some(),
                "{bad}"
            );
        }
        assert!(forbidden_setting(&p(&[("standard_conforming_strings", "off")]), &prot).is_some());
        assert!(forbidden_setting(&p(&[("search_path", "pg_temp")]), &prot).is_some());
        assert!(
            forbidden_setting(&p(&[("options", "--search_path=public,PG_TEMP_3")]), &prot)
                .is_some()
        );
        assert!(forbidden_setting(&p(&[("options", "-c seed=0.5")]), &prot).is_some());
        assert!(forbidden_setting(&p(&[("search_path", "public, app")]), &prot).is_none());
        assert!(forbidden_setting(&p(&[("client_encoding", "GBK")]), &prot).is_some());
        assert!(forbidden_setting(&p(&[("client_encoding", "UTF8")]), &prot).is_none());
        assert!(forbidden_setting(&p(&[("client_encoding", "SQL_ASCII")]), &prot).is_none());
        assert!(
            forbidden_setting(
                &p(&[("options", "-c standard_conforming_strings=on")]),
                &prot
            )
            .is_none()
        );
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
