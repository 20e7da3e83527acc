//! `mqfleet-shard`: one shard of a clustered mqfleet (see `mqfleet-shard --help`).

use std::process::ExitCode;

use broker_shard::config::{Cli, Config};
use clap::Parser;
use mqfleet_ops::{EXIT_CONFIG, EXIT_START};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Config::load(cli).and_then(Config::validate) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mqfleet-shard: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    mqfleet_ops::logging::init(settings.json_logs, &settings.raw.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqfleet-shard: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    runtime.block_on(async move {
        let node = match broker_shard::node::start(settings).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::from(EXIT_START);
            }
        };
        let signal = mqfleet_ops::signals::terminated().await;
        tracing::info!(signal, "shutting down");
        node.shutdown().await;
        ExitCode::SUCCESS
    })
}
