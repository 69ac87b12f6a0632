use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = rlsgate::cli::Cli::parse();
    rlsgate::cli::init_logging();
    rlsgate::cli::run(cli)
}
