//! Peak memory and time of classifying one large statement (guard cost per byte).
//! `cargo run --release --example guard_mem -- <kind> <bytes>`; kinds: values, inlist, union.
use rlsgate::config::GuardConfig;
use rlsgate::guard::Guard;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map(String::as_str).unwrap_or("values");
    let bytes: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1 << 20);
    let mut sql = String::new();
    match kind {
        "values" => {
            sql.push_str("INSERT INTO products (name, price) VALUES ");
            let mut i = 0;
            while sql.len() < bytes {
                sql.push_str(&format!("('p{i}', {i}.5),"));
                i += 1;
            }
            sql.pop();
        }
        "inlist" => {
            sql.push_str("SELECT * FROM products WHERE id IN (");
            let mut i = 0;
            while sql.len() < bytes {
                sql.push_str(&format!("{i},"));
                i += 1;
            }
            sql.pop();
            sql.push(')');
        }
        _ => {
            sql.push_str("SELECT 1");
            while sql.len() < bytes {
                sql.push_str(" UNION ALL SELECT 1");
            }
        }
    }
    let guard = Guard::new(&GuardConfig::default());
    let t = std::time::Instant::now();
    let a = guard.analyze_uncached(&sql);
    let rss = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = rss
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("")
        .to_string();
    println!(
        "{kind} {} bytes: {:?} parsed={} denied={} {hwm}",
        sql.len(),
        t.elapsed(),
        a.parsed,
        a.is_denied()
    );
}
