//! Reading claims by dotted path and rendering them as setting values.

use serde_json::Value;

/// Look up `a.b.c` in a JSON object.
pub fn lookup<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(claims, |v, key| v.get(key))
}

/// Render a claim as a setting value: strings as is, numbers and booleans in their JSON form,
/// arrays and objects as compact JSON. `None` for null.
pub fn render_claim(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(_) | Value::Number(_) | Value::Array(_) | Value::Object(_) => {
            Some(v.to_string())
        }
    }
}

/// Tenant ids: `^[A-Za-z0-9_.:@-]{1,128}$`.
pub fn valid_tenant(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_lookup_and_rendering() {
        let c =
            json!({"app_metadata": {"store_id": 42}, "sub": "u1", "roles": ["a", "b"], "ok": true});
        assert_eq!(
            lookup(&c, "app_metadata.store_id")
                .and_then(render_claim)
                .as_deref(),
            Some("42")
        );
        assert_eq!(
            lookup(&c, "sub").and_then(render_claim).as_deref(),
            Some("u1")
        );
        assert_eq!(
            lookup(&c, "roles").and_then(render_claim).as_deref(),
            Some(r#"["a","b"]"#)
        );
        assert_eq!(
            lookup(&c, "ok").and_then(render_claim).as_deref(),
            Some("true")
        );
        assert!(lookup(&c, "app_metadata.nope").is_none());
    }

    #[test]
    fn tenant_format() {
        assert!(valid_tenant("store-1"));
        assert!(valid_tenant("a.b:c@d_e"));
        assert!(!valid_tenant(""));
        assert!(!valid_tenant("x'y"));
        assert!(!valid_tenant(&"a".repeat(129)));
    }
}
