//! `mqfleet-proxy`: with no arguments, a complete single-node MQTT broker on 127.0.0.1:1883.

use std::process::ExitCode;

use clap::Parser;
use proxy::config::{Cli, Config};

/// EX_USAGE: the configuration is invalid.
const EXIT_CONFIG: u8 = 64;
/// The broker could not start (port in use, store locked or unreadable).
const EXIT_START: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Config::load(cli).and_then(Config::validate) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mqfleet-proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(settings.json_logs, &settings.raw.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqfleet-proxy: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    runtime.block_on(async move {
        let broker = match proxy::start(settings).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::from(EXIT_START);
            }
        };
        let signal = wait_for_signal().await;
        tracing::info!(signal, "shutting down");
        broker.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn init_tracing(json: bool, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// SIGTERM (what Kubernetes sends) or SIGINT.
async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
