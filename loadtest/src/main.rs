//! `mqfleet-loadtest` — exit status: 0 all promises kept, 1 a QoS 1/2 message was lost (or
//! another invariant broken), 2 usage error, 3 the run could not be carried out.

use std::process::ExitCode;

use clap::Parser;
use loadtest::cli::{prepare, Cli, Command, Options, ScenarioFile};
use loadtest::report::Report;

const EXIT_VIOLATION: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CANNOT_RUN: u8 = 3;

/// File descriptors this process needs beside its connections.
const FD_MARGIN: u64 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stages: Vec<(String, Options)> = match cli.command {
        Command::Run { scenario, options } => {
            let text = match std::fs::read_to_string(&scenario) {
                Ok(t) => t,
                Err(e) => return usage(&format!("{}: {e}", scenario.display())),
            };
            let file: ScenarioFile = match toml::from_str(&text) {
                Ok(f) => f,
                Err(e) => return usage(&format!("{}: {e}", scenario.display())),
            };
            let defaults = options.over(&file.defaults);
            file.stages.into_iter().map(|s| (s.scenario, s.options.over(&defaults))).collect()
        }
        Command::Conn(o) => vec![("conn".into(), o)],
        Command::Idle(o) => vec![("idle".into(), o)],
        Command::Telemetry(o) => vec![("telemetry".into(), o)],
        Command::Command(o) => vec![("command".into(), o)],
        Command::Broadcast(o) => vec![("broadcast".into(), o)],
        Command::Pairs(o) => vec![("pairs".into(), o)],
        Command::Reqresp(o) => vec![("reqresp".into(), o)],
        Command::Reconnect(o) => vec![("reconnect".into(), o)],
        Command::Chaos(o) => return chaos(o),
    };
    let mut prepared = Vec::new();
    for (name, o) in &stages {
        match prepare(name, o) {
            Ok(p) => prepared.push((p, o.report.clone())),
            Err(e) => return usage(&format!("{name}: {e}")),
        }
    }

    let needed = prepared.iter().map(|(p, _)| p.plan.devices.len() as u64).max().unwrap_or(0) + FD_MARGIN;
    let (limit, raised) = loadtest::raise_fd_limit();
    if raised {
        eprintln!("mqfleet-loadtest: raised the open-file limit to {limit}");
    }
    if needed > limit {
        eprintln!(
            "mqfleet-loadtest: {} connections need about {needed} open files, but this process may open only {limit} \
             (the hard limit; raising it needs a higher `ulimit -Hn`). Split the swarm over several mqfleet-loadtest processes.",
            needed - FD_MARGIN
        );
        return ExitCode::from(EXIT_CANNOT_RUN);
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqfleet-loadtest: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_CANNOT_RUN);
        }
    };
    let mut ok = true;
    let multi = prepared.len() > 1;
    for (i, (p, report_path)) in prepared.into_iter().enumerate() {
        let report: Report = runtime.block_on(loadtest::scenario::run(p.plan, p.settings, p.echo));
        print!("{}", report.table());
        ok &= report.verdict.ok;
        if let Some(path) = report_path {
            let path = if multi {
                path.with_file_name(format!("{}.stage{}.json", path.file_stem().unwrap_or_default().to_string_lossy(), i + 1))
            } else {
                path
            };
            match loadtest::write_report(&report, &path) {
                Ok(chart) => eprintln!("report: {} (chart: {})", path.display(), chart.display()),
                Err(e) => {
                    eprintln!("mqfleet-loadtest: cannot write {}: {e}", path.display());
                    return ExitCode::from(EXIT_CANNOT_RUN);
                }
            }
        }
        if report.connections.connected == 0 {
            return ExitCode::from(EXIT_CANNOT_RUN);
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VIOLATION)
    }
}

fn chaos(o: loadtest::chaos::ChaosOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqfleet-loadtest: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_CANNOT_RUN);
        }
    };
    let report_path = o.report.clone();
    let report = match runtime.block_on(loadtest::chaos::run(o)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqfleet-loadtest chaos: {e}");
            return ExitCode::from(EXIT_CANNOT_RUN);
        }
    };
    print!("{}", report.summary());
    if let Some(path) = report_path {
        let written = serde_json::to_vec_pretty(&report).map_err(std::io::Error::other).and_then(|j| std::fs::write(&path, j));
        match written {
            Ok(()) => eprintln!("report: {}", path.display()),
            Err(e) => {
                eprintln!("mqfleet-loadtest: cannot write {}: {e}", path.display());
                return ExitCode::from(EXIT_CANNOT_RUN);
            }
        }
    }
    // The cluster's processes and relays end with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VIOLATION)
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("mqfleet-loadtest: {msg}");
    ExitCode::from(EXIT_USAGE)
}
