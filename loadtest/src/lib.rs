//! `mqfleet-loadtest`: simulates device swarms against any MQTT 3.1.1/5.0 broker and proves
//! what was delivered.
//!
//! # Layout
//! - [`cli`]: flags and scenario files → [`scenario::Plan`] + [`scenario::Settings`].
//! - [`scenario`]: the scenarios ([`scenario::build`]), the simulated client
//!   ([`scenario::device`]) and the runner (phases, publishing window, drain, tally).
//! - [`client`]: a lean MQTT client over [`transport`] (TCP, TLS, WebSocket).
//! - [`payload`]: the accounting header every message carries; [`accounting`]: the verdict
//!   per message (delivered, lost, duplicated, reordered).
//! - [`stats`], [`procstat`], [`progress`]: live measurements; [`report`], [`chart`]: output.
//! - [`chaos`]: a local cluster under the swarm while a seeded nemesis injects faults.

pub mod accounting;
pub mod chaos;
pub mod chart;
pub mod cli;
pub mod client;
pub mod payload;
pub mod procstat;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod transport;

use std::path::Path;

/// Writes the JSON report and its SVG chart (same path, `.svg`).
pub fn write_report(report: &report::Report, path: &Path) -> std::io::Result<std::path::PathBuf> {
    std::fs::write(path, serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?)?;
    let chart = path.with_extension("svg");
    std::fs::write(&chart, chart::svg(report))?;
    Ok(chart)
}

/// Raises the open-file limit as far as allowed; returns (limit, whether it was raised).
pub fn raise_fd_limit() -> (u64, bool) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => (now, now > before),
        Err(_) => (before, false),
    }
}
