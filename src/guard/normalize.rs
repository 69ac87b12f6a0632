//! The shape of a statement: its text with every plain literal replaced by a parameter (`$1`,
//! `$2`, … in order), so that statements differing only in inline values share one verdict.
//!
//! Why a shape may stand for its texts: the guard never sees extended-protocol bind values, so
//! whatever it allows for a text with `$n` it already allows for every value bound there. A
//! text that differs from its shape only by a literal where the shape has `$n` is one such
//! binding. Where Postgres' grammar wants a literal and not an expression (COPY options,
//! function bodies, `DO`, `LOAD`, …) `$n` does not parse, so those shapes never vouch for
//! anything (see [`super::shape`]).
//!
//! libpg_query's grammar is wider than Postgres' here (it parses its own normalized output):
//! it reads `$n` in a few places that take only a literal. SET values, `SET ROLE`/`SCHEMA`/
//! `SESSION AUTHORIZATION`, `SET TIME ZONE` and passwords are statements no shape vouches for
//! (they are denied, change settings or depend on the transaction block). Typed literals
//! (`date $1`, `interval $1 day`, `numeric(10,2) $1`) and `EXTRACT($1 FROM …)` give the tree a
//! client gets from `$1::date` or `pg_catalog.extract($1, …)`, but there a *number* is a syntax
//! error while the shape parses. The shape therefore also records each literal's token kind
//! (string, integer, other number): texts whose literals are of the same kinds in the same
//! places are the same token sequence to the parser, so one of them parsing as the shape's
//! template says every other one does.
//!
//! The lexer is deliberately small and conservative: it only replaces plain `'…'` strings and
//! plain decimal numbers, and gives up (`None`, "take the full parse") on anything it does not
//! fully understand. Giving up is always safe; replacing a token that is not a plain literal,
//! or missing one that is, is not.

/// Longer texts are not normalized: they rarely share a shape, and the fast path is for the
/// short statements applications send by the thousand.
pub const MAX_TEXT: usize = 8 * 1024;

/// A statement's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The key, then a NUL (which no normalized text contains) and one [`LiteralKind`] letter
    /// per literal: what shapes are cached by.
    shape: String,
    /// Where the key ends in `shape`.
    key_len: usize,
    /// How many literals were replaced (at least one).
    pub literals: usize,
    /// Byte offset of the first literal: the same in the text and in the key, since everything
    /// before it is copied unchanged.
    pub first_literal: usize,
}

impl Normalized {
    /// The text with each literal replaced by `$1`, `$2`, … in order.
    pub fn key(&self) -> &str {
        &self.shape[..self.key_len]
    }

    /// The key and the kinds of its literals.
    pub fn shape(&self) -> &str {
        &self.shape
    }

    /// The kinds of the literals, one letter each, in order.
    #[cfg(test)]
    fn kinds(&self) -> &str {
        &self.shape[self.key_len + 1..]
    }
}

/// The token a literal is to the parser (Postgres' lexer: a string, an integer that fits in
/// 32 bits, or any other number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LiteralKind {
    String,
    Integer,
    OtherNumber,
}

impl LiteralKind {
    fn letter(self) -> char {
        match self {
            LiteralKind::String => 's',
            LiteralKind::Integer => 'i',
            LiteralKind::OtherNumber => 'f',
        }
    }
}

/// The shape of `sql`, or `None` when the text has no literal or anything the lexer does not
/// fully understand.
pub fn normalize(sql: &str) -> Option<Normalized> {
    let b = sql.as_bytes();
    if b.len() > MAX_TEXT {
        return None;
    }
    let mut key = String::with_capacity(b.len() + 16);
    // (the kinds of the first literals on the stack: one allocation per statement, not two)
    let mut kinds_first = [0u8; 16];
    let mut kinds_more = String::new();
    let mut copied = 0; // `sql[..copied]` is in the key already (or replaced)
    let mut literals = 0;
    let mut first_literal = None;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b';' {
            // one `;` at the very end (psql, pgbench and many drivers send one): still one
            // statement; anything after it but whitespace is another statement
            if b[i + 1..].iter().all(|&c| class(c) == Class::Space) {
                break;
            }
            return None;
        }
        let (literal_end, kind) = match class(b[i]) {
            Class::Space | Class::Operator | Class::Other => {
                i += 1;
                continue;
            }
            Class::Dash if b.get(i + 1) == Some(&b'-') => {
                i = line_comment_end(b, i)?;
                continue;
            }
            Class::Slash if b.get(i + 1) == Some(&b'*') => {
                i = block_comment_end(b, i)?;
                continue;
            }
            Class::Dash | Class::Slash => {
                i += 1;
                continue;
            }
            Class::DoubleQuote => {
                i = quoted_end(b, i, b'"')?;
                continue;
            }
            Class::Letter => {
                i = word_end(b, i);
                continue;
            }
            Class::Quote => (quoted_end(b, i, b'\'')?, LiteralKind::String),
            Class::Digit => number_end(b, i)?,
            Class::Dot if b.get(i + 1).is_some_and(u8::is_ascii_digit) => number_end(b, i)?,
            Class::Dot => {
                i += 1;
                continue;
            }
            // Non-ASCII outside quotes and comments: identifiers in other scripts, or
            // whitespace Postgres does not count as such.
            Class::NonAscii | Class::Refused => return None,
        };
        if !literal_may_start_after(i.checked_sub(1).map(|p| b[p]))
            || !literal_may_end_before(b, literal_end)
        {
            return None;
        }
        key.push_str(sql.get(copied..i)?);
        match kinds_first.get_mut(literals) {
            Some(k) => *k = kind.letter() as u8,
            None => kinds_more.push(kind.letter()),
        }
        literals += 1;
        first_literal.get_or_insert(i);
        push_parameter(&mut key, literals);
        copied = literal_end;
        i = literal_end;
    }
    let first_literal = first_literal?;
    key.push_str(sql.get(copied..)?);
    let key_len = key.len();
    key.push('\0');
    for &k in &kinds_first[..literals.min(kinds_first.len())] {
        key.push(char::from(k));
    }
    key.push_str(&kinds_more);
    Some(Normalized {
        shape: key,
        key_len,
        literals,
        first_literal,
    })
}

/// Where the one statement of a text the lexer accepted ends, as the parser reports it: at a
/// final `;` (only whitespace after it), or at the end of the text.
pub(super) fn statement_end(text: &str) -> usize {
    let b = text.as_bytes();
    let mut end = b.len();
    while end > 0 && class(b[end - 1]) == Class::Space {
        end -= 1;
    }
    match end.checked_sub(1) {
        Some(semicolon) if b[semicolon] == b';' => semicolon,
        _ => b.len(),
    }
}

/// `$n`, written without the formatting machinery (this runs for every statement).
fn push_parameter(key: &mut String, n: usize) {
    let mut text = [0u8; 21];
    let mut at = text.len();
    let mut rest = n;
    loop {
        at -= 1;
        text[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    at -= 1;
    text[at] = b'$';
    for &c in &text[at..] {
        key.push(char::from(c));
    }
}

/// What a byte is to the lexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The whitespace both the guard's parser and older servers agree on (not `\v`).
    Space,
    /// `A`–`Z`, `a`–`z`, `_`: starts a word.
    Letter,
    Digit,
    Quote,
    DoubleQuote,
    /// `-` and `/`: operators, or the start of a comment.
    Dash,
    Slash,
    Dot,
    /// Operators, brackets and commas a literal may follow.
    Operator,
    /// Any other ASCII punctuation (`)`, `]`, `&`, `{`, …).
    Other,
    NonAscii,
    /// Bytes the lexer never reads past, even in quotes and comments: `$` (dollar quotes,
    /// parameters, identifiers with `$`), backslashes, `;` (more than one statement), control
    /// characters other than [`Class::Space`].
    Refused,
}

const CLASSES: [Class; 256] = {
    let mut table = [Class::Other; 256];
    let mut c = 0;
    while c < 256 {
        table[c] = match c as u8 {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => Class::Space,
            b'A'..=b'Z' | b'a'..=b'z' | b'_' => Class::Letter,
            b'0'..=b'9' => Class::Digit,
            b'\'' => Class::Quote,
            b'"' => Class::DoubleQuote,
            b'-' => Class::Dash,
            b'/' => Class::Slash,
            b'.' => Class::Dot,
            b'(' | b'[' | b',' | b'=' | b'<' | b'>' | b'+' | b'*' | b'%' | b'^' | b'|' | b':'
            | b'~' | b'!' | b'@' | b'#' | b'?' => Class::Operator,
            b'$' | b'\\' | b';' | 0x00..=0x1f | 0x7f => Class::Refused,
            0x80.. => Class::NonAscii,
            _ => Class::Other,
        };
        c += 1;
    }
    table
};

fn class(c: u8) -> Class {
    CLASSES[usize::from(c)]
}

/// What may stand right before a literal: nothing, whitespace, an operator, a bracket or a
/// comma. Not a word character: `E'…'`, `B'…'`, `X'…'`, `N'…'`, `date'…'` are other tokens,
/// and `$n` after one would be part of a word. Not `&` (`U&'…'`), `'` or `"` (adjacent
/// quotes), `.` (`t.5`), `)` or `]`.
fn literal_may_start_after(previous: Option<u8>) -> bool {
    previous.is_none_or(|c| {
        matches!(
            class(c),
            Class::Space | Class::Operator | Class::Dash | Class::Slash
        )
    })
}

/// What may follow a literal. Right after it: no word character, digit, `.` or non-ASCII
/// byte (`'a'x`, `1e`, `0x1f`, `1_000`, `1.` would become or join another token). Next after
/// whitespace and comments: not `'` (`'a'` newline `'b'` is one literal to Postgres), `[` or
/// `.` (a parameter takes subscripts and field selection, a literal does not: the shape would
/// parse where the text does not).
fn literal_may_end_before(b: &[u8], end: usize) -> bool {
    if b.get(end).is_some_and(|&c| {
        matches!(
            class(c),
            Class::Letter | Class::Digit | Class::Dot | Class::NonAscii
        )
    }) {
        return false;
    }
    let mut i = end;
    loop {
        let next = match b.get(i) {
            Some(b'-') if b.get(i + 1) == Some(&b'-') => line_comment_end(b, i),
            Some(b'/') if b.get(i + 1) == Some(&b'*') => block_comment_end(b, i),
            Some(&c) if class(c) == Class::Space => Some(i + 1),
            Some(b'\'' | b'[' | b'.') => None,
            _ => return true,
        };
        match next {
            Some(n) => i = n,
            None => return false,
        }
    }
}

/// `-- …` up to (not including) the end of the line; `None` at a refused byte.
fn line_comment_end(b: &[u8], start: usize) -> Option<usize> {
    let end = b[start..]
        .iter()
        .position(|&c| c == b'\n' || c == b'\r' || class(c) == Class::Refused)
        .map_or(b.len(), |p| start + p);
    b.get(end)
        .is_none_or(|&c| class(c) != Class::Refused)
        .then_some(end)
}

/// `/* … */`; `None` when unterminated, nested (Postgres nests block comments) or at a
/// refused byte.
fn block_comment_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 2;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'*', b'/') => return Some(i + 2),
            (b'/', b'*') => return None,
            (c, _) if class(c) == Class::Refused => return None,
            _ => i += 1,
        }
    }
    None
}

/// A `'…'` string or `"…"` identifier: `quote` doubled stands for itself (no backslash
/// escapes: standard_conforming_strings, and backslashes are refused anyway). `None` when
/// unterminated or at a refused byte.
fn quoted_end(b: &[u8], start: usize, quote: u8) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let p = b
            .get(i..)?
            .iter()
            .position(|&c| c == quote || class(c) == Class::Refused)?;
        i += p;
        if b[i] != quote {
            return None;
        }
        i += 1;
        if b.get(i) == Some(&quote) {
            i += 1; // doubled: part of the content
        } else {
            return Some(i);
        }
    }
}

/// An unquoted word (keyword or identifier); digits in it are not numbers.
fn word_end(b: &[u8], start: usize) -> usize {
    b[start..]
        .iter()
        .position(|&c| !matches!(class(c), Class::Letter | Class::Digit))
        .map_or(b.len(), |p| start + p)
}

/// A plain decimal number: `123`, `1.5`, `.5`, `1e10`, `1.5E-3`, where it ends and its kind.
/// `None` for `1.` (and `1..`), an exponent without digits, and anything else the lexer would
/// have to guess about.
fn number_end(b: &[u8], start: usize) -> Option<(usize, LiteralKind)> {
    let digits = |from: usize| {
        b[from..]
            .iter()
            .position(|c| !c.is_ascii_digit())
            .map_or(b.len(), |p| from + p)
    };
    // the integer part, and its value (for the kind)
    let mut value = 0u64;
    let mut integer_end = start;
    while let Some(d) = b.get(integer_end).filter(|d| d.is_ascii_digit()) {
        value = value.saturating_mul(10).saturating_add(u64::from(d - b'0'));
        integer_end += 1;
    }
    let mut i = integer_end;
    if b.get(i) == Some(&b'.') {
        let fraction = digits(i + 1);
        if fraction == i + 1 {
            return None;
        }
        i = fraction;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let exponent = digits(j);
        if exponent == j {
            return None;
        }
        i = exponent;
    }
    // Postgres' lexer: digits alone are an integer when the value fits in 32 bits
    let kind = if i == integer_end && value <= i32::MAX as u64 {
        LiteralKind::Integer
    } else {
        LiteralKind::OtherNumber
    };
    Some((i, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sql: &str) -> String {
        match normalize(sql) {
            Some(n) => n.key().to_string(),
            None => panic!("not normalized: {sql:?}"),
        }
    }

    fn kinds(sql: &str) -> String {
        match normalize(sql) {
            Some(n) => n.kinds().to_string(),
            None => panic!("not normalized: {sql:?}"),
        }
    }

    #[test]
    fn one_final_semicolon_is_one_statement() {
        assert_eq!(
            key("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"),
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
        );
        assert_eq!(key("SELECT 1 ; \n"), "SELECT $1 ; \n");
        for two in [
            "SELECT 1; SELECT 2",
            "SELECT 1;;",
            "SELECT 1; -- c",
            "SELECT ';'",
        ] {
            assert!(normalize(two).is_none(), "{two:?}");
        }
        assert_eq!(statement_end("SELECT $1"), 9);
        assert_eq!(statement_end("SELECT $1 ;  \n"), 10);
        assert_eq!(statement_end("SELECT $1;"), 9);
    }

    #[test]
    fn plain_literals_become_parameters_in_order() {
        for (sql, want) in [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 12345",
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            ),
            (
                "UPDATE pgbench_accounts SET abalance = abalance + -17 WHERE aid = 3",
                "UPDATE pgbench_accounts SET abalance = abalance + -$1 WHERE aid = $2",
            ),
            (
                "INSERT INTO t (a, b, c) VALUES ('x', 1.5, 'it''s')",
                "INSERT INTO t (a, b, c) VALUES ($1, $2, $3)",
            ),
            ("SELECT .5, 1e10, 1.5E-3, 2e+3", "SELECT $1, $2, $3, $4"),
            ("SELECT ''", "SELECT $1"),
            ("SELECT x FROM t WHERE y=''''", "SELECT x FROM t WHERE y=$1"),
            ("SELECT a[1:2] FROM t", "SELECT a[$1:$2] FROM t"),
            (
                "SELECT 'a'::regclass, x::regclass FROM t1 LIMIT 10 OFFSET 20",
                "SELECT $1::regclass, x::regclass FROM t1 LIMIT $2 OFFSET $3",
            ),
            (
                "SELECT \"it's\", \"a\"\"b\" FROM t WHERE c = 'v'",
                "SELECT \"it's\", \"a\"\"b\" FROM t WHERE c = $1",
            ),
            (
                "/* don't */ SELECT 1 -- it's\n, 'x' /* 'y' */",
                "/* don't */ SELECT $1 -- it's\n, $2 /* 'y' */",
            ),
            ("SELECT 'é', \"ü\" -- ñ", "SELECT $1, \"ü\" -- ñ"),
            ("\t SELECT\r\n  7 \x0c", "\t SELECT\r\n  $1 \x0c"),
            (
                "SELECT col1, t2.c3 FROM t2 WHERE 0<1",
                "SELECT col1, t2.c3 FROM t2 WHERE $1<$2",
            ),
        ] {
            assert_eq!(key(sql), want, "{sql:?}");
        }
        let many = format!("SELECT {}", ["1"; 12].join(", "));
        assert!(key(&many).ends_with("$9, $10, $11, $12"));
        let n = normalize("SELECT x FROM t WHERE a = 'p' AND b = 2").unwrap();
        assert_eq!(n.literals, 2);
        assert_eq!(n.first_literal, 26);
        assert_eq!(n.shape(), "SELECT x FROM t WHERE a = $1 AND b = $2\0si");
    }

    #[test]
    fn literal_kinds_are_the_parser_tokens() {
        assert_eq!(
            kinds("SELECT 'x', '', 0, 2147483647, 0000000000005"),
            "ssiii"
        );
        assert_eq!(
            kinds("SELECT 2147483648, 99999999999999999999, 1.5, .5, 1e3, 10E-2"),
            "ffffff"
        );
        // more literals than the kinds kept on the stack: all of them, in order
        let values: Vec<&str> = (0..40).map(|i| ["'s'", "7", "1.5"][i % 3]).collect();
        let want: String = (0..40).map(|i| ['s', 'i', 'f'][i % 3]).collect();
        assert_eq!(kinds(&format!("SELECT {}", values.join(", "))), want);
        // same key, other kinds: another shape
        let a = normalize("SELECT date '2024-01-01'").unwrap();
        let b = normalize("SELECT date 20240101").unwrap();
        assert_eq!(a.key(), b.key());
        assert_ne!(a.shape(), b.shape());
    }

    #[test]
    fn texts_without_literals_have_no_shape() {
        for sql in [
            "SELECT x FROM t",
            "SHOW search_path",
            "",
            "-- '1'",
            "SELECT t1.c2",
        ] {
            assert_eq!(normalize(sql), None, "{sql:?}");
        }
    }

    #[test]
    fn anything_not_fully_understood_has_no_shape() {
        for sql in [
            // dollar anywhere: dollar quotes, parameters, identifiers, even in a literal
            "SELECT $$x$$",
            "SELECT $1, 2",
            "SELECT a$b, 2",
            "SELECT '$5'",
            "SELECT \"$user\", 1",
            // backslash anywhere
            "SELECT 'a\\', 1",
            // more than one statement (even in a literal)
            "SELECT 1; SELECT 2",
            "SELECT 'a;b'",
            // string prefixes and typed literals written against the quote
            "SELECT E'x'",
            "SELECT e'x'",
            "SELECT B'101'",
            "SELECT X'1f'",
            "SELECT N'x'",
            "SELECT U&'x'",
            "SELECT u&'x'",
            "SELECT date'2024-01-01'",
            "SELECT regclass'pg_authid'",
            "SELECT\"c\"'x'",
            // string continuation and adjacent strings
            "SELECT 'a'\n'b'",
            "SELECT 'a' -- c\n'b'",
            "SELECT 'a' 'b'",
            // a literal followed by something a parameter would take differently
            "SELECT 'a'x",
            "SELECT 'a'[1]",
            "SELECT 'a' [1]",
            "SELECT 'a'.b",
            "SELECT 1.",
            "SELECT 1..2",
            "SELECT 1.e5",
            "SELECT 1e",
            "SELECT 1e+",
            "SELECT 1x",
            "SELECT 0x1f",
            "SELECT 0o17",
            "SELECT 0b101",
            "SELECT 1_000",
            "SELECT 1'a'",
            "SELECT 1.5.2",
            "SELECT t.5",
            // non-ASCII outside quotes and comments
            "SELECT é, 1",
            "SELECté, 1",
            "SELECT 1\u{a0}",
            // control characters
            "SELECT 1\x0b",
            "SELECT '\0'",
            "SELECT '\x01'",
            // unterminated or nested
            "SELECT 'x",
            "SELECT \"x, 1",
            "SELECT 1 /* x",
            "SELECT 1 /* a /* b */ */",
        ] {
            assert_eq!(normalize(sql), None, "{sql:?}");
        }
        assert!(normalize(&format!("SELECT '{}'", "x".repeat(MAX_TEXT))).is_none());
        assert!(normalize(&format!("SELECT '{}'", "x".repeat(MAX_TEXT - 20))).is_some());
    }
}
