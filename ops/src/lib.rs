//! What every mqfleet process offers an operator, in one place so the proxy and the shard
//! behave alike:
//! - [`config`]: settings declared once ([`settings!`]) with a TOML key, an environment
//!   variable and a flag each; validation that reports every problem with its key;
//! - [`logging`]: `tracing` as text or JSON, level from `RUST_LOG` or the configuration;
//! - [`signals`]: SIGTERM / SIGINT;
//! - [`http`]: `/livez`, `/readyz`, `/metrics`, and a process's admin API under `/api/v1`;
//! - [`admin`]: the admin API's bearer token and JSON errors; [`metrics`]: latency histograms;
//! - [`outage::Outage`]: one warning per outage of a recurring operation, not one per attempt.

pub mod admin;
pub mod config;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod outage;
pub mod signals;

/// EX_USAGE: the configuration is invalid.
pub const EXIT_CONFIG: u8 = 64;
/// The process could not start (port in use, store locked or unreadable, Redis unreachable).
pub const EXIT_START: u8 = 1;
