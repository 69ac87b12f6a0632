//! The `rlsgate` command line: `serve`, `check`, `token`, `demo`.

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
        /// Start even when `rlsgate check` finds critical problems in the database.
        #[arg(long)]
        allow_unsafe: bool,
    },
    /// Audit the upstream database's RLS setup as the upstream role. Exit code 0 = fine,
    /// 1 = warnings (with --strict), 2 = critical findings, 3 = the checks could not run.
    Check {
        /// Config file (TOML).
        #[arg(long, env = "RLSGATE_CONFIG")]
        config: PathBuf,
        /// Print the report as JSON (for CI).
        #[arg(long)]
        json: bool,
        /// Exit 1 on warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Mint an HS256 development token.
    Token(token::TokenArgs),
    /// Start a throwaway Postgres with the demo schema and a proxy in front of it.
    Demo(demo::DemoArgs),
}

pub fn init_logging() {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::{Layer, Registry, fmt, prelude::*};
    let spec = std::env::var("RLSGATE_LOG").unwrap_or_else(|_| "info".into());
    // Levels per target (`debug`, `rlsgate=debug,tokio=warn`), the usual case, cost nothing when
    // a client's span is entered and left (every time its task runs); the full filter syntax
    // (span and field directives) takes a lock each time, so it is only used when asked for.
    let filter: Box<dyn Layer<Registry> + Send + Sync> = match spec.parse::<Targets>() {
        Ok(targets) => Box::new(targets),
        Err(_) => Box::new(EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"))),
    };
    // colours only on a terminal: files, journald and container logs get plain text
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let subscriber = tracing_subscriber::registry().with(filter);
    if std::env::var("RLSGATE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        subscriber.with(layer.json()).init();
    } else {
        subscriber.with(layer).init();
    }
}

pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve {
            config,
            allow_unsafe,
        } => serve(config, allow_unsafe),
        Command::Check {
            config,
            json,
            strict,
        } => return check(config, json, strict),
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

/// The runtime. `RLSGATE_WORKER_THREADS` sets the number of worker threads; the default is one
/// per four CPUs, at least one ([`default_worker_threads`]).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let threads = std::env::var("RLSGATE_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(default_worker_threads);
    // (multi-threaded even with one worker: a large classification hands the worker's other
    // clients to another thread first, see guard::classify_large)
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

/// One worker thread per four CPUs, at least one. A proxy's work per message is short and mostly
/// the kernel's; on a shared 2-CPU machine (pgbench, PostgreSQL and rlsgate) one worker used 20 %
/// less CPU per transaction than two and gave 7–10 % more throughput (`scripts/bench.sh`,
/// select_extended and tpcb): fewer cross-thread wake-ups, one event loop. More workers pay off
/// only when one core is not enough.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().div_ceil(4))
        .max(1)
}

fn serve(path: PathBuf, allow_unsafe: bool) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let rt = runtime()?;
    rt.block_on(async {
        crate::doctor::startup_check(&config, allow_unsafe)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let listen = config.server.listen;
        let http_listen = config.server.http_listen;
        let shared = Shared::new(config).await?;
        shared.set_config_path(path.clone());
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let shutdown = CancellationToken::new();
        // /healthz must keep answering while the proxy drains: its own token, cancelled last.
        let http_stop = CancellationToken::new();
        if let Some(addr) = http_listen {
            let http = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (http_listen): {e}"))?;
            tokio::spawn(app::serve_http(
                http,
                Arc::clone(&shared),
                http_stop.clone(),
            ));
        }
        tokio::spawn(stop_on_signal(shutdown.clone()));
        tokio::spawn(reload_on_sighup(Arc::clone(&shared)));
        app::run_on_worker(listener, Arc::clone(&shared), shutdown).await;
        http_stop.cancel();
        Ok(())
    })
}

/// `rlsgate check`: the report on stdout (text or JSON), the exit code from the findings.
fn check(path: PathBuf, json: bool, strict: bool) -> ExitCode {
    use std::io::IsTerminal;
    let result = Config::load(&path)
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(rt.block_on(crate::doctor::run(&config))?)
        });
    match result {
        Ok(report) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.render_text(std::io::stdout().is_terminal()));
            }
            ExitCode::from(report.exit_code(strict))
        }
        Err(e) => {
            eprintln!("rlsgate check: {e:#}");
            ExitCode::from(3)
        }
    }
}

/// SIGHUP → re-read the config (an invalid one is logged and the old one stays).
async fn reload_on_sighup(shared: Arc<Shared>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match shared.reload_from_file().await {
            Ok(notes) => {
                for n in notes {
                    tracing::warn!(note = %n, "reload: not applied live");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the old configuration stays in force")
            }
        }
    }
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
