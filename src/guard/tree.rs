//! Helpers over libpg_query's parse tree in its serde (JSON) form, shared by the guard and
//! `rlsgate check`: nodes are `{"node": {"Kind": body}}`.

use std::borrow::Cow;

use serde_json::Value;

/// `{"node": {"Kind": body}}` → `("Kind", body)`.
pub(crate) fn unwrap_node(v: &Value) -> Option<(&str, &Value)> {
    let inner = v.get("node")?.as_object()?;
    inner.iter().next().map(|(k, v)| (k.as_str(), v))
}

/// Lower-cased last element of a FuncCall's `funcname` (the function, without schema); borrowed
/// when the parser already folded it (unquoted names), so the guard's walk does not allocate.
pub(crate) fn func_name(call: &Value) -> Option<Cow<'_, str>> {
    let last = call.get("funcname")?.as_array()?.last()?;
    let s = last.get("node")?.get("String")?.get("sval")?.as_str()?;
    Some(folded(s))
}

/// `name` in lower case, borrowed when it already is (the parser folds unquoted names).
pub(crate) fn folded(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// A boolean as PostgreSQL reads one (`parse_bool`): any prefix of true/false/yes/no, on/off
/// (at least two letters), 1/0; case-insensitive, surrounding whitespace ignored.
pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    let v = text.trim().to_ascii_lowercase();
    let prefix_of = |word: &str| !v.is_empty() && word.starts_with(v.as_str());
    if prefix_of("true") || prefix_of("yes") || v == "on" || v == "1" {
        Some(true)
    } else if prefix_of("false")
        || prefix_of("no")
        || (v.len() >= 2 && prefix_of("off"))
        || v == "0"
    {
        Some(false)
    } else {
        None
    }
}

/// A string constant, possibly behind casts (`'x'::text`).
pub(crate) fn const_string(v: &Value) -> Option<String> {
    match unwrap_node(v)? {
        ("AConst", c) => c
            .get("val")?
            .get("Sval")?
            .get("sval")?
            .as_str()
            .map(str::to_string),
        ("TypeCast", t) => const_string(t.get("arg")?),
        _ => None,
    }
}
