//! Configuration of `mqfleet-shard`: defaults, a TOML file (`--config`), environment variables
//! (`MQFLEET_SHARD_…`), flags — each setting declared once below.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mqfleet_ops::config::{parse_addr, parse_optional_addr, require_positive, Problems};
pub use mqfleet_ops::config::{ConfigError, ConfigErrors};
use session_store::{RedisTarget, SyncPolicy};

mqfleet_ops::settings! {
    /// This shard's name: its place on the ring, so it must stay the same across restarts
    /// (a StatefulSet pod name). Empty: the host name.
    name: String = String::new(), env "MQFLEET_SHARD_NAME";
    /// Where proxies open their links.
    link: String = "127.0.0.1:7883".into(), env "MQFLEET_SHARD_LINK";
    /// The link address proxies are told (in Redis) when `link` listens on all interfaces.
    /// Empty: the bound `link` address.
    advertise: String = String::new(), env "MQFLEET_SHARD_ADVERTISE";
    /// HTTP listener for /livez, /readyz and /metrics; empty disables it.
    http: String = "127.0.0.1:18084".into(), env "MQFLEET_SHARD_HTTP";
    /// Directory of the shard's own store: message log, retained messages, persistent
    /// sessions' subscriptions.
    data_dir: String = "./mqfleet-shard-data".into(), env "MQFLEET_SHARD_DATA_DIR";
    /// When the log reaches the disk: `batch` (fsync per commit), `group:MS` (collect MS, then
    /// one fsync; acknowledged only after it) or `interval:MS` (acknowledged before the fsync,
    /// which follows at least every MS: a machine crash can lose that much).
    fsync: String = "group:2".into(), env "MQFLEET_SHARD_FSYNC";
    /// The sessions' store shared with the proxies: `redis://HOST:PORT[/DB]`, `rediss://…`,
    /// `redis+cluster://H1:P1,H2:P2,…` or `redis+sentinel://H1:P1,H2:P2,…/MASTER`. Required.
    store: String = String::new(), env "MQFLEET_SHARD_STORE";
    /// Longest wait for Redis before an operation fails, in ms.
    redis_timeout_ms: u64 = 2_000, env "MQFLEET_SHARD_REDIS_TIMEOUT_MS";
    /// How often this shard tells Redis it is alive, in ms.
    heartbeat_ms: u64 = 1_000, env "MQFLEET_SHARD_HEARTBEAT_MS";
    /// Silence after which a proxy counts as dead (a starting shard waits only for live ones).
    proxy_dead_after_ms: u64 = 5_000, env "MQFLEET_SHARD_PROXY_DEAD_AFTER_MS";
    /// At start, longest wait for the live proxies to re-send their subscriptions before the
    /// shard replays its log and routes messages, in ms.
    resync_wait_ms: u64 = 10_000, env "MQFLEET_SHARD_RESYNC_WAIT_MS";
    /// How long a proxy whose link dropped keeps its routes here (its logged deliveries are
    /// kept for it), in ms.
    proxy_grace_ms: u64 = 30_000, env "MQFLEET_SHARD_PROXY_GRACE_MS";
    /// Messages queued per persistent session beyond its in-flight window: the durable queue
    /// holds `max_inflight` plus this many (the proxies' settings of the same names should
    /// match).
    max_queued_messages: u32 = 1000, env "MQFLEET_SHARD_MAX_QUEUED_MESSAGES";
    /// The proxies' `max_inflight`: QoS 1/2 messages a client may have unacknowledged.
    max_inflight: u16 = 1024, env "MQFLEET_SHARD_MAX_INFLIGHT";
    /// Also queue QoS 0 messages for offline persistent sessions.
    queue_qos0_offline: bool = false, env "MQFLEET_SHARD_QUEUE_QOS0_OFFLINE";
    /// Retained messages this shard holds at most; a retained PUBLISH for a new topic beyond
    /// it is refused (5.0: PUBACK 0x97). 0: no limit.
    max_retained_messages: usize = 0, env "MQFLEET_SHARD_MAX_RETAINED_MESSAGES";
    /// Payload bytes of the retained messages this shard holds at most; 0: no limit.
    max_retained_bytes: usize = 0, env "MQFLEET_SHARD_MAX_RETAINED_BYTES";
    /// Fault injection, for tests and the soak only: a file holding a number of milliseconds
    /// that every durable commit of the store waits, as on a disk whose fsync is slow. Read
    /// every 100 ms; a missing or empty file means no delay. Empty: off.
    fault_slow_disk_file: String = String::new(), env "MQFLEET_SHARD_FAULT_SLOW_DISK_FILE";
    /// Log format: `text` or `json`. The level comes from RUST_LOG, else `log_level`.
    log_format: String = "text".into(), env "MQFLEET_SHARD_LOG_FORMAT";
    /// Log level filter when RUST_LOG is not set (tracing EnvFilter syntax).
    log_level: String = "info".into(), env "MQFLEET_SHARD_LOG_LEVEL";
    /// On SIGTERM, time given to finish accepted work and close the store, in ms.
    shutdown_grace_ms: u64 = 10_000, env "MQFLEET_SHARD_SHUTDOWN_GRACE_MS";
    /// On SIGTERM, leave the ring first (a scale-down): hand this shard's topics, retained
    /// messages and subscriptions to the others, then stop. Leave it off for restarts and
    /// rolling upgrades, which keep the shard's topics.
    leave_on_shutdown: bool = false, env "MQFLEET_SHARD_LEAVE_ON_SHUTDOWN";
    /// File holding the bearer token of the admin API (`/api/v1/…` on the `http` listener; at
    /// least 32 characters, e.g. `openssl rand -hex 32`); read at start. Empty: the admin API
    /// is off.
    admin_token_file: String = String::new(), env "MQFLEET_SHARD_ADMIN_TOKEN_FILE";
}

/// `mqfleet-shard` command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "mqfleet-shard",
    version,
    about = "mqfleet shard: owns a slice of the topics of a cluster (routing, retained messages, message log)"
)]
pub struct Cli {
    /// TOML configuration file; its keys are the settings below without dashes.
    #[arg(long, env = "MQFLEET_SHARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub link: SocketAddr,
    pub advertise: Option<String>,
    pub http: Option<SocketAddr>,
    /// Guards the admin API; none: the API is off.
    pub admin_token: Option<mqfleet_ops::admin::AdminToken>,
    pub data_dir: PathBuf,
    pub fsync: SyncPolicy,
    pub store: RedisTarget,
    pub json_logs: bool,
    pub redis_timeout: Duration,
    pub heartbeat: Duration,
    pub proxy_dead_after: Duration,
    pub resync_wait: Duration,
    pub proxy_grace: Duration,
    pub shutdown_grace: Duration,
    pub raw: Config,
}

impl Config {
    pub fn load(cli: Cli) -> Result<Config, ConfigErrors> {
        mqfleet_ops::config::check_env("MQFLEET_SHARD_", &Config::reference(), &["MQFLEET_SHARD_CONFIG"])?;
        let mut config: Config = mqfleet_ops::config::load_file(cli.config.as_deref())?;
        config.apply(cli.overrides);
        Ok(config)
    }

    /// Checks every setting; returns all problems, not just the first.
    pub fn validate(self) -> Result<Settings, ConfigErrors> {
        let mut p = Problems::default();
        let name = if self.name.is_empty() { host_name() } else { self.name.clone() };
        if name.is_empty() || name.contains(|c: char| c.is_control() || c == '|' || c == '@' || c == ',') {
            p.add("name", format!("{name:?} is not a shard name: it must be non-empty, without control characters, '|', '@' or ','"));
        }
        let link = p.check("link", parse_addr(&self.link));
        let http = p.check("http", parse_optional_addr(&self.http));
        let admin_token = p.check("admin_token_file", mqfleet_ops::admin::token_setting(&self.admin_token_file)).flatten();
        let fsync = p.check("fsync", self.fsync.parse::<SyncPolicy>());
        let store = if self.store.is_empty() {
            p.add("store", "required: the Redis the proxies use (redis://HOST:PORT, redis+cluster://H1:P1,H2:P2 or redis+sentinel://H1:P1,H2:P2/MASTER)");
            None
        } else {
            p.check("store", RedisTarget::parse(&self.store))
        };
        if self.data_dir.is_empty() {
            p.add("data_dir", "required: the directory of the shard's log");
        }
        let json_logs = p.check("log_format", mqfleet_ops::logging::parse_format(&self.log_format)).unwrap_or(false);
        p.check("log_level", mqfleet_ops::logging::check_level(&self.log_level));
        require_positive(
            &mut p,
            &[
                ("redis_timeout_ms", self.redis_timeout_ms),
                ("heartbeat_ms", self.heartbeat_ms),
                ("proxy_dead_after_ms", self.proxy_dead_after_ms),
                ("proxy_grace_ms", self.proxy_grace_ms),
                ("max_queued_messages", u64::from(self.max_queued_messages)),
                ("max_inflight", u64::from(self.max_inflight)),
            ],
        );
        p.into_result()?;
        let (Some(link), Some(http), Some(fsync), Some(store)) = (link, http, fsync, store) else {
            return Err(ConfigErrors::single("config", "internal: unreported invalid setting".into()));
        };
        Ok(Settings {
            name,
            link,
            advertise: (!self.advertise.is_empty()).then(|| self.advertise.clone()),
            http,
            admin_token,
            data_dir: self.data_dir.clone().into(),
            fsync,
            store,
            json_logs,
            redis_timeout: Duration::from_millis(self.redis_timeout_ms),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            proxy_dead_after: Duration::from_millis(self.proxy_dead_after_ms),
            resync_wait: Duration::from_millis(self.resync_wait_ms),
            proxy_grace: Duration::from_millis(self.proxy_grace_ms),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            raw: self,
        })
    }
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_shard_needs_redis_and_reports_every_problem_with_its_key() {
        let c = Config { name: "a|b".into(), link: "nowhere".into(), fsync: "always".into(), ..Config::default() };
        let errors = c.validate().unwrap_err();
        let keys: Vec<&str> = errors.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["name", "link", "fsync", "store"]);
        assert!(errors.to_string().contains("store: required"), "{errors}");
    }

    #[test]
    fn flags_override_the_file() {
        let mut c: Config = mqfleet_ops::config::from_toml("store = \"redis://r:6379\"\nname = \"s-1\"\n").unwrap();
        c.apply(Cli::parse_from(["mqfleet-shard", "--fsync", "batch", "--link", "0.0.0.0:7000"]).overrides);
        let s = c.validate().unwrap();
        assert_eq!((s.name.as_str(), s.fsync, s.link.port()), ("s-1", SyncPolicy::Batch, 7000));
    }

    #[test]
    fn every_setting_has_an_environment_variable_named_after_its_key() {
        for (key, env, _, doc) in Config::reference() {
            assert_eq!(env, format!("MQFLEET_SHARD_{}", key.to_uppercase()));
            assert!(!doc.is_empty(), "{key} has no description");
        }
    }
}
