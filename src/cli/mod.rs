//! The `rlsgate` command line: `serve`, `token`, `demo`.

mod demo;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{self, Shared};
use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "rlsgate",
    version,
    about = "PostgreSQL proxy that applies the tenant from a JWT to every transaction"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// Config file (TOML).
        #[arg(long, env = "RLSGATE_CONFIG")]
        config: PathBuf,
    },
    /// Mint an HS256 development token.
    Token(token::TokenArgs),
    /// Start a throwaway Postgres with the demo schema and a proxy in front of it.
    Demo(demo::DemoArgs),
}

pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RLSGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("RLSGATE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Token(args) => token::run(args),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rlsgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime; `RLSGATE_WORKER_THREADS` sets the number of worker threads (default: one per CPU).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let threads = std::env::var("RLSGATE_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = threads.filter(|n| *n > 0) {
        builder.worker_threads(n);
    }
    Ok(builder.enable_all().build()?)
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let rt = runtime()?;
    rt.block_on(async {
        let listen = config.server.listen;
        let shared = Shared::new(config).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        app::run(listener, Arc::clone(&shared), shutdown).await;
        Ok(())
    })
}

/// SIGTERM / SIGINT → stop accepting and drain.
pub(crate) async fn stop_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    token.cancel();
}
