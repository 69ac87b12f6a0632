//! The `SET` statement that gives a setting a value exactly as `set_config(name, value, false)`
//! or a startup parameter would, for rlsgate's replay of a client's settings on another server
//! connection.
//!
//! For most settings `SET name TO '<value>'` is that statement. List settings whose elements are
//! identifiers (`search_path`, `temp_tablespaces`, the `*_preload_libraries`; Postgres' flag
//! GUC_LIST_QUOTE) differ: `SET` quotes each argument as one element, so `'a, b'` would become
//! the single schema `"a, b"`, while `set_config` and startup parameters parse the text as a
//! list. For those the value is split as Postgres splits it (`SplitIdentifierString`) and each
//! element is written as a quoted identifier.

use postgres_protocol::escape::{escape_identifier, escape_literal};

/// Settings whose value is a list of identifiers (GUC_LIST_QUOTE in Postgres 15).
const IDENTIFIER_LISTS: &[&str] = &[
    "search_path",
    "temp_tablespaces",
    "local_preload_libraries",
    "session_preload_libraries",
    "shared_preload_libraries",
];

/// Longest identifier Postgres keeps (NAMEDATALEN - 1); longer ones are truncated.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// `SET <name> TO …` for a lower-case setting `name` and the `value` text as `set_config` takes it.
pub fn set_statement(name: &str, value: &str) -> String {
    let target = escape_identifier(name);
    if IDENTIFIER_LISTS.contains(&name)
        && let Some(elements) = split_identifiers(value)
        && !elements.is_empty()
    {
        let list: Vec<String> = elements.iter().map(|e| escape_identifier(e)).collect();
        return format!("SET {target} TO {}", list.join(", "));
    }
    // Anything else (also an empty list or text Postgres would refuse as a list) as one
    // literal: the server reads it as before.
    format!("SET {target} TO {}", escape_literal(value))
}

/// Postgres' `SplitIdentifierString(value, ',')`: elements separated by commas, whitespace around
/// them ignored, double-quoted ones taken as written (`""` is a quote), others lower-cased;
/// both truncated to 63 bytes. `None` where Postgres reports invalid list syntax.
pub fn split_identifiers(value: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = value.trim_start_matches(is_space);
    if rest.is_empty() {
        return Some(out);
    }
    loop {
        let element = if let Some(quoted) = rest.strip_prefix('"') {
            let mut name = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                let (i, c) = chars.next()?; // no closing quote
                if c == '"' {
                    if quoted[i + 1..].starts_with('"') {
                        name.push('"');
                        chars.next();
                        continue;
                    }
                    break i + 1;
                }
                name.push(c);
            };
            rest = &quoted[end..];
            name
        } else {
            let end = rest
                .find(|c: char| c == ',' || is_space(c))
                .unwrap_or(rest.len());
            if end == 0 {
                return None; // empty unquoted name
            }
            let name = rest[..end].to_ascii_lowercase();
            rest = &rest[end..];
            name
        };
        out.push(truncate(element));
        rest = rest.trim_start_matches(is_space);
        match rest.strip_prefix(',') {
            Some(after) => rest = after.trim_start_matches(is_space),
            None if rest.is_empty() => return Some(out),
            None => return None, // junk after a name
        }
    }
}

/// Postgres' `scanner_isspace`.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c')
}

fn truncate(mut name: String) -> String {
    if name.len() > MAX_IDENTIFIER_BYTES {
        let mut end = MAX_IDENTIFIER_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_as_postgres_does() {
        assert_eq!(split_identifiers("a,b").unwrap(), ["a", "b"]);
        assert_eq!(
            split_identifiers(" A , \"B c\" ,$user").unwrap(),
            ["a", "B c", "$user"]
        );
        assert_eq!(split_identifiers("\"x\"\"y\"").unwrap(), ["x\"y"]);
        assert_eq!(split_identifiers("").unwrap(), Vec::<String>::new());
        assert_eq!(split_identifiers("   ").unwrap(), Vec::<String>::new());
        assert!(split_identifiers("a,,b").is_none());
        assert!(split_identifiers("a b").is_none());
        assert!(split_identifiers("\"open").is_none());
        assert!(split_identifiers("a,").is_none());
        let long = "x".repeat(70);
        assert_eq!(split_identifiers(&long).unwrap()[0].len(), 63);
    }

    #[test]
    fn list_settings_become_identifier_lists() {
        assert_eq!(
            set_statement("search_path", "a, b"),
            r#"SET "search_path" TO "a", "b""#
        );
        assert_eq!(
            set_statement("search_path", r#""$user", public"#),
            r#"SET "search_path" TO "$user", "public""#
        );
        // quotes inside names cannot break out
        assert_eq!(
            set_statement("search_path", r#""a"";DROP TABLE t;--""#),
            r#"SET "search_path" TO "a"";DROP TABLE t;--""#
        );
        assert_eq!(
            set_statement("search_path", ""),
            r#"SET "search_path" TO ''"#
        );
        assert_eq!(
            set_statement("datestyle", "ISO, MDY"),
            r#"SET "datestyle" TO 'ISO, MDY'"#
        );
        assert_eq!(
            set_statement("statement_timeout", "5s"),
            r#"SET "statement_timeout" TO '5s'"#
        );
    }
}
