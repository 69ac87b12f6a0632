//! Real client programs through the proxy: psql and pgbench, pool smaller than the client count.

mod support;

use support::*;

fn pgbench_init(db: &str) {
    let out = pg()
        .client_command("pgbench")
        .args(["-i", "-q", "-s", "1", "-d", db])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    admin_sql(
        db,
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO rlsgate_app",
    );
}

fn failed_transactions(out: &str) -> Option<u64> {
    out.lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn processed(out: &str) -> Option<u64> {
    out.lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_with_zero_failures_in_every_query_mode() {
    let proxy = start_proxy(2).await;
    pgbench_init(&proxy.db);
    let script = std::env::temp_dir().join(format!("rlsgate-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\nSELECT count(*) FROM customers;\nSELECT current_setting('app.current_store_id');\n",
    )
    .unwrap();
    let tok = token("north");
    for mode in ["simple", "extended", "prepared"] {
        let out = run_client(
            &proxy,
            "pgbench",
            &tok,
            &[
                "-n",
                "-c",
                "10",
                "-j",
                "2",
                "-t",
                "50",
                "-M",
                mode,
                "-f",
                script.to_str().unwrap(),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "pgbench -M {mode}: {}\n{text}",
            stderr(&out)
        );
        assert_eq!(processed(&text), Some(500), "-M {mode}: {text}");
        assert_eq!(
            failed_transactions(&text).unwrap_or(0),
            0,
            "-M {mode}: {text}"
        );
    }
    // the TPC-B-like script: explicit BEGIN/END, updates and inserts
    for mode in ["simple", "extended", "prepared"] {
        let out = run_client(
            &proxy,
            "pgbench",
            &tok,
            &["-n", "-c", "10", "-j", "2", "-t", "20", "-M", mode],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "pgbench tpcb -M {mode}: {}\n{text}",
            stderr(&out)
        );
        assert_eq!(processed(&text), Some(200), "{text}");
    }
    assert_eq!(
        admin_sql(&proxy.db, "SELECT count(*) FROM pgbench_history"),
        "600"
    );
    let _ = std::fs::remove_file(script);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scripts_behave_as_against_postgres() {
    let proxy = start_proxy(1).await;
    let out = psql(
        &proxy,
        &token("south"),
        "SELECT count(*) FROM customers; SELECT name FROM stores",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "2\nSouth Store".replace(
            "South Store",
            &admin_sql(&proxy.db, "SELECT name FROM stores WHERE store_id='south'")
        )
    );

    let script = "BEGIN;\nINSERT INTO products (store_id, name, price) VALUES ('south', 'Widget', 9.99);\nSELECT count(*) FROM products;\nROLLBACK;\nSELECT count(*) FROM products;\n";
    let out = run_client(
        &proxy,
        "psql",
        &token("south"),
        &["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", script],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "BEGIN\nINSERT 0 1\n4\nROLLBACK\n3");

    // an error is reported like Postgres reports it and the session goes on
    let out = run_client(
        &proxy,
        "psql",
        &token("south"),
        &[
            "-X",
            "-At",
            "-c",
            "SELECT 1/0",
            "-c",
            "SELECT count(*) FROM customers",
        ],
    );
    assert!(
        stderr(&out).contains("division by zero"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "2");

    // \copy goes through COPY TO STDOUT
    let out = run_client(
        &proxy,
        "psql",
        &token("north"),
        &[
            "-X",
            "-At",
            "-c",
            "\\copy (SELECT store_id FROM customers) TO STDOUT",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "north\nnorth\nnorth");
    proxy.stop().await;
}
