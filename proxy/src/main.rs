//! `mqfleet-proxy`: with no arguments, a complete single-node MQTT broker on 127.0.0.1:1883.

use std::process::ExitCode;

use clap::Parser;
use mqfleet_ops::{EXIT_CONFIG, EXIT_START};
use std::io::IsTerminal;

use proxy::config::{Cli, Command, Config};

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Some(command) = cli.command.take() {
        return tool(command);
    }
    let settings = match Config::load(cli).and_then(Config::validate) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mqfleet-proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    mqfleet_ops::logging::init(settings.json_logs, &settings.raw.log_level);
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
        let signal = mqfleet_ops::signals::terminated().await;
        tracing::info!(signal, "shutting down");
        broker.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// Runs an operator command (`passwd`, `acl`).
fn tool(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqfleet-proxy: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    let (name, result) = match command {
        Command::Passwd { target, username, delete } => {
            if !delete && std::io::stdin().is_terminal() {
                eprint!("password for {username} (shown as typed; pipe it in to hide it): ");
            }
            let mut input = std::io::stdin().lock();
            ("passwd", runtime.block_on(proxy::auth::cli::passwd_command(&target, &username, delete, &mut input)))
        }
        Command::Acl { store, file } => ("acl", runtime.block_on(proxy::auth::cli::acl_command(&store, &file))),
    };
    match result {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqfleet-proxy {name}: {e}");
            ExitCode::FAILURE
        }
    }
}
