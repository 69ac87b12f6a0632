//! Statements both guard benchmarks classify (`guard.rs` wall clock, `guard_ir.rs` instructions).

pub const CASES: &[(&str, &str)] = &[
    (
        "select",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    ),
    ("set_protected", "SET app.current_store_id = 'south'"),
    (
        "join_186b",
        "SELECT c.name, sum(i.quantity * i.unit_price) AS total FROM customers c \
         JOIN sales_transactions t ON t.customer_id = c.customer_id \
         JOIN sales_items i ON i.transaction_id = t.transaction_id \
         WHERE t.created_at > now() - interval '7 days' GROUP BY c.name ORDER BY total DESC",
    ),
    (
        "query_to_xml",
        "SELECT query_to_xml('select set_config(''app.current_store_id'',''x'',true)', true, true, '')",
    ),
    (
        "long_1kb",
        "INSERT INTO customers (store_id, name, email, note) VALUES \
         ('north', 'a', 'a@example.com', 'first'), ('north', 'b', 'b@example.com', 'second'), \
         ('north', 'c', 'c@example.com', 'third'), ('north', 'd', 'd@example.com', 'fourth'), \
         ('north', 'e', 'e@example.com', 'fifth'), ('north', 'f', 'f@example.com', 'sixth'), \
         ('north', 'g', 'g@example.com', 'seventh'), ('north', 'h', 'h@example.com', 'eighth'), \
         ('north', 'i', 'i@example.com', 'ninth'), ('north', 'j', 'j@example.com', 'tenth'), \
         ('north', 'k', 'k@example.com', 'eleventh'), ('north', 'l', 'l@example.com', 'twelfth'), \
         ('north', 'm', 'm@example.com', 'thirteenth'), ('north', 'n', 'n@example.com', 'fourteenth') \
         ON CONFLICT DO NOTHING RETURNING id, store_id, name, email, note, created_at",
    ),
];

/// Statements an application sends with its values inline: `{}` stands for a number that changes
/// from one statement to the next (so every text is new to a cache keyed by exact text).
pub const LITERAL_CASES: &[(&str, &str)] = &[
    (
        "select_literal",
        "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
    ),
    (
        "orm_literal",
        "SELECT \"users\".\"id\", \"users\".\"email\" FROM \"users\" \
         WHERE \"users\".\"account_id\" = {} AND \"users\".\"state\" = 'active' \
         ORDER BY \"users\".\"id\" DESC LIMIT 20",
    ),
];

/// `template` with its `{}` replaced by `n`.
pub fn with_literal(template: &str, n: usize) -> String {
    template.replacen("{}", &n.to_string(), 1)
}
