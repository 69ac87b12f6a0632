//! `rlsgate demo`: a throwaway Postgres with `sql/demo.sql`, rlsgate in front of it, and
//! ready-to-paste psql commands for two stores. Ctrl-C stops everything and removes the cluster.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Shared};
use crate::config::Config;
use crate::embedded_pg::{EmbeddedOptions, EmbeddedPg};

const DEMO_SQL: &str = include_str!("../../sql/demo.sql");
const UPSTREAM_PASSWORD: &str = "demo-upstream-password";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Port for the proxy (0 = any free port).
    #[arg(long, default_value_t = 6432)]
    pub port: u16,
    /// Exit after printing the commands (for smoke tests).
    #[arg(long, hide = true)]
    pub exit_after_start: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    eprintln!("rlsgate demo: starting a throwaway PostgreSQL…");
    let pg = EmbeddedPg::start(EmbeddedOptions::default()).context("starting PostgreSQL")?;
    pg.create_database("app")?;
    pg.psql("app", DEMO_SQL).context("loading sql/demo.sql")?;
    pg.psql(
        "app",
        &format!("ALTER ROLE rlsgate_app PASSWORD '{UPSTREAM_PASSWORD}'"),
    )?;

    let secret = format!("demo-{:032x}", rand::random::<u128>());
    let config = Config::from_toml(&format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_timeout = "5s"
[upstream]
host = "127.0.0.1"
port = {pg_port}
database = "app"
user = "rlsgate_app"
password = "{UPSTREAM_PASSWORD}"
sslmode = "disable"
pool_size = 5
[auth]
hs_secret = "{secret}"
tenant_claim = "store_id"
[context]
"app.current_store_id" = "store_id"
"#,
        port = args.port,
        pg_port = pg.port(),
    ))?;
    let mint = |store: &str| {
        super::token::mint(
            &secret,
            &[format!("store_id={store}"), "sub=demo-user".into()],
            Duration::from_secs(8 * 3600),
        )
    };
    let (north, south) = (mint("north")?, mint("south")?);

    let rt = super::runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {} (try --port 0)", config.server.listen))?;
        let addr = listener.local_addr()?;
        let shared = Shared::new(config).await?;
        println!(
            "\nrlsgate demo is ready: proxy on {addr}, upstream PostgreSQL on port {}.\n",
            pg.port()
        );
        for (store, token) in [("north", &north), ("south", &south)] {
            println!("# store {store}: try  SELECT * FROM customers;  (no WHERE clause needed)");
            println!(
                "psql \"host=127.0.0.1 port={} dbname=app user=demo password={token}\"\n",
                addr.port()
            );
        }
        println!("Press Ctrl-C to stop (the throwaway cluster is removed).");
        let shutdown = CancellationToken::new();
        if args.exit_after_start {
            shutdown.cancel();
        } else {
            tokio::spawn(super::stop_on_signal(shutdown.clone()));
        }
        app::run_on_worker(listener, Arc::clone(&shared), shutdown).await;
        drop(pg);
        anyhow::Ok(())
    })
}
