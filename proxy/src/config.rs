//! Configuration of `mqfleet-proxy`.
//!
//! Layers, lowest to highest: built-in defaults, a TOML file (`--config`), environment
//! variables (`MQFLEET_PROXY_…`), command-line flags. Every setting is declared once, in
//! [`settings!`] below, which gives it its file key, its variable and its flag.
//!
//! [`Config::validate`] checks everything at once and reports every problem with the key that
//! caused it; the process then exits with status 64 (EX_USAGE).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use session_store::SyncPolicy;

macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $key:ident : $ty:ty = $default:expr, env $env:literal; )*) => {
        /// Settings as read from defaults, file, environment and flags; see [`Config::validate`].
        #[derive(Debug, Clone, PartialEq, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $key: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $key: $default, )* }
            }
        }

        /// Command-line flags and environment variables; each overrides its file key.
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct Overrides {
            $( $(#[doc = $doc])* #[arg(long, env = $env, value_name = stringify!($ty))] pub $key: Option<$ty>, )*
        }

        impl Config {
            fn apply(&mut self, o: Overrides) {
                $( if let Some(v) = o.$key { self.$key = v; } )*
            }

            /// Every setting: (file key, environment variable, default, description), for the
            /// documentation tables.
            pub fn reference() -> Vec<(&'static str, &'static str, String, String)> {
                let d = Config::default();
                vec![ $( (stringify!($key), $env, format!("{:?}", d.$key), [$($doc.trim()),*].join(" ")), )* ]
            }
        }
    };
}

settings! {
    /// MQTT over TCP listener address; port 0 picks a free port (the bound address is logged).
    mqtt: String = "127.0.0.1:1883".into(), env "MQFLEET_PROXY_MQTT";
    /// HTTP listener for /livez, /readyz and /metrics; empty disables it.
    http: String = "127.0.0.1:18083".into(), env "MQFLEET_PROXY_HTTP";
    /// Session store: `embedded:DIR` (single node).
    store: String = "embedded:./mqfleet-data".into(), env "MQFLEET_PROXY_STORE";
    /// When durable writes reach the disk: `batch` (fsync every group commit, nothing
    /// acknowledged is lost) or `interval:MS` (fsync at least every MS milliseconds).
    store_sync: String = "batch".into(), env "MQFLEET_PROXY_STORE_SYNC";
    /// Shards: `local:N` runs N shards in this process; `local` runs one per CPU core.
    shards: String = "local".into(), env "MQFLEET_PROXY_SHARDS";
    /// Log format: `text` or `json`. The level comes from RUST_LOG, else `log_level`.
    log_format: String = "text".into(), env "MQFLEET_PROXY_LOG_FORMAT";
    /// Log level filter when RUST_LOG is not set (tracing EnvFilter syntax).
    log_level: String = "info".into(), env "MQFLEET_PROXY_LOG_LEVEL";
    /// Most simultaneous MQTT connections; further ones are refused at accept.
    max_connections: usize = 100_000, env "MQFLEET_PROXY_MAX_CONNECTIONS";
    /// Largest packet accepted from a client, in bytes (announced as Maximum Packet Size).
    max_packet_size: u32 = 1024 * 1024, env "MQFLEET_PROXY_MAX_PACKET_SIZE";
    /// Time a new connection has to send a complete CONNECT, in ms.
    connect_timeout_ms: u64 = 10_000, env "MQFLEET_PROXY_CONNECT_TIMEOUT_MS";
    /// Largest keep-alive accepted, in seconds. 3.1.1 clients asking more are refused; 5.0
    /// clients are told this value (Server Keep Alive).
    max_keepalive_secs: u16 = 3600, env "MQFLEET_PROXY_MAX_KEEPALIVE_SECS";
    /// QoS 1/2 PUBLISHes a client may have unacknowledged (announced as Receive Maximum).
    receive_maximum: u16 = 1024, env "MQFLEET_PROXY_RECEIVE_MAXIMUM";
    /// QoS 1/2 messages sent to a client and not yet acknowledged, at most (also bounded by
    /// the client's Receive Maximum).
    max_inflight: u16 = 1024, env "MQFLEET_PROXY_MAX_INFLIGHT";
    /// Messages waiting for a client beyond its in-flight window, and queued for an offline
    /// persistent session; further ones are dropped and counted.
    max_queued_messages: u32 = 1000, env "MQFLEET_PROXY_MAX_QUEUED_MESSAGES";
    /// Bytes waiting to be written to a client's socket beyond which QoS 0 messages for it are
    /// dropped (slow consumer).
    max_write_buffer: usize = 1024 * 1024, env "MQFLEET_PROXY_MAX_WRITE_BUFFER";
    /// Topic aliases a 5.0 client may use (announced as Topic Alias Maximum).
    topic_alias_maximum: u16 = 64, env "MQFLEET_PROXY_TOPIC_ALIAS_MAXIMUM";
    /// Most levels in a topic name or filter.
    max_topic_levels: usize = 128, env "MQFLEET_PROXY_MAX_TOPIC_LEVELS";
    /// Longest topic name or filter, in bytes.
    max_topic_length: usize = 65_535, env "MQFLEET_PROXY_MAX_TOPIC_LENGTH";
    /// Most subscriptions per client; further ones get SUBACK 0x97 Quota exceeded.
    max_subscriptions: usize = 10_000, env "MQFLEET_PROXY_MAX_SUBSCRIPTIONS";
    /// Longest client identifier, in bytes; longer ones get CONNACK 0x85.
    max_client_id_length: usize = 256, env "MQFLEET_PROXY_MAX_CLIENT_ID_LENGTH";
    /// Upper bound of a session's expiry, in seconds; also the expiry of 3.1.1 persistent
    /// sessions. 0 means no bound (3.1.1 persistent sessions then never expire).
    max_session_expiry_secs: u32 = 7 * 24 * 3600, env "MQFLEET_PROXY_MAX_SESSION_EXPIRY_SECS";
    /// Also queue QoS 0 messages for offline persistent sessions.
    queue_qos0_offline: bool = false, env "MQFLEET_PROXY_QUEUE_QOS0_OFFLINE";
    /// On SIGTERM, time given to connections to be told and their sessions saved, in ms.
    shutdown_grace_ms: u64 = 10_000, env "MQFLEET_PROXY_SHUTDOWN_GRACE_MS";
}

/// `mqfleet-proxy` command line.
#[derive(Debug, clap::Parser)]
#[command(name = "mqfleet-proxy", version, about = "mqfleet MQTT broker: device-facing proxy (single-node broker by default)")]
pub struct Cli {
    /// TOML configuration file; its keys are the settings below without dashes.
    #[arg(long, env = "MQFLEET_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
}

/// Where sessions are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Embedded(PathBuf),
}

/// One invalid setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

/// Every problem found, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// A checked configuration: what the broker runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mqtt: SocketAddr,
    pub http: Option<SocketAddr>,
    pub store: StoreSpec,
    pub store_sync: SyncPolicy,
    pub shards: usize,
    pub json_logs: bool,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Everything else, as configured.
    pub raw: Config,
}

impl Config {
    /// Reads the file (if any) and applies the overrides on top.
    pub fn load(cli: Cli) -> Result<Config, ConfigErrors> {
        let mut config = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| single("config", format!("cannot read {}: {e}", path.display())))?;
                Config::from_toml(&text).map_err(|e| single("config", format!("{}: {e}", path.display())))?
            }
            None => Config::default(),
        };
        config.apply(cli.overrides);
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every setting; returns all problems, not just the first.
    pub fn validate(self) -> Result<Settings, ConfigErrors> {
        let mut errors = Vec::new();
        let mut err = |key: &str, problem: String| errors.push(ConfigError { key: key.into(), problem });

        let mqtt = parse_addr(&self.mqtt).map_err(|p| err("mqtt", p)).ok();
        let http = if self.http.is_empty() { Some(None) } else { parse_addr(&self.http).map(Some).map_err(|p| err("http", p)).ok() };
        let store = match self.store.split_once(':') {
            Some(("embedded", dir)) if !dir.is_empty() => Some(StoreSpec::Embedded(dir.into())),
            _ => {
                err("store", format!("{:?} is not a store; expected embedded:DIR", self.store));
                None
            }
        };
        let store_sync = match self.store_sync.as_str() {
            "batch" => Some(SyncPolicy::Batch),
            other => match other.strip_prefix("interval:").and_then(|ms| ms.parse::<u64>().ok()) {
                Some(ms) if ms > 0 => Some(SyncPolicy::Interval(Duration::from_millis(ms))),
                _ => {
                    err("store_sync", format!("{other:?} is not a sync policy; expected batch or interval:MS with MS > 0"));
                    None
                }
            },
        };
        let shards = match self.shards.as_str() {
            "local" => Some(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
            other => match other.strip_prefix("local:").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if (1..=1024).contains(&n) => Some(n),
                _ => {
                    err("shards", format!("{other:?} is not a shard set; expected local or local:N with 1 <= N <= 1024"));
                    None
                }
            },
        };
        let json_logs = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                err("log_format", format!("{other:?} is not a log format; expected text or json"));
                false
            }
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            err("log_level", format!("{:?} is not a level filter: {e}", self.log_level));
        }
        let positive = [
            ("max_connections", self.max_connections as u64),
            ("max_packet_size", u64::from(self.max_packet_size)),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("receive_maximum", u64::from(self.receive_maximum)),
            ("max_inflight", u64::from(self.max_inflight)),
            ("max_queued_messages", u64::from(self.max_queued_messages)),
            ("max_topic_levels", self.max_topic_levels as u64),
            ("max_topic_length", self.max_topic_length as u64),
            ("max_client_id_length", self.max_client_id_length as u64),
        ];
        for (key, v) in positive {
            if v == 0 {
                err(key, "must be greater than 0".into());
            }
        }
        if self.max_packet_size < 64 {
            err("max_packet_size", format!("{} bytes cannot hold a CONNECT; use at least 64", self.max_packet_size));
        }
        if self.max_packet_size > mqfleet_codec::MAX_REMAINING_LENGTH as u32 {
            err("max_packet_size", format!("{} exceeds the MQTT maximum of {}", self.max_packet_size, mqfleet_codec::MAX_REMAINING_LENGTH));
        }
        if self.max_topic_length > 65_535 {
            err("max_topic_length", "cannot exceed 65535, the longest MQTT string".into());
        }

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        // Every `None` above pushed an error, so all are `Some` here.
        let (Some(mqtt), Some(http), Some(store), Some(store_sync), Some(shards)) = (mqtt, http, store, store_sync, shards) else {
            return Err(single("config", "internal: unreported invalid setting".into()));
        };
        Ok(Settings {
            mqtt,
            http,
            store,
            store_sync,
            shards,
            json_logs,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            raw: self,
        })
    }
}

fn single(key: &str, problem: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError { key: key.into(), problem }])
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("{s:?} is not an address; expected IP:PORT such as 127.0.0.1:1883 (port 0 picks one)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_are_a_local_single_node_broker() {
        let s = Config::default().validate().unwrap();
        assert_eq!(s.mqtt, "127.0.0.1:1883".parse().unwrap());
        assert_eq!(s.store, StoreSpec::Embedded("./mqfleet-data".into()));
        assert!(s.shards >= 1);
    }

    #[test]
    fn file_then_flags_override_defaults() {
        let mut c = Config::from_toml("mqtt = \"127.0.0.1:0\"\nmax_inflight = 7\n").unwrap();
        assert_eq!(c.max_inflight, 7);
        assert_eq!(c.receive_maximum, Config::default().receive_maximum);
        let cli = Cli::parse_from(["mqfleet-proxy", "--max-inflight", "9", "--shards", "local:3"]);
        c.apply(cli.overrides);
        assert_eq!(c.max_inflight, 9);
        assert_eq!(c.mqtt, "127.0.0.1:0");
        assert_eq!(c.validate().unwrap().shards, 3);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let e = Config::from_toml("mqtt_port = 1883\n").unwrap_err();
        assert!(e.contains("unknown field `mqtt_port`"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let c = Config {
            mqtt: "localhost".into(),
            store: "redis".into(),
            shards: "local:0".into(),
            max_packet_size: 10,
            store_sync: "sometimes".into(),
            ..Config::default()
        };
        let errors = c.validate().unwrap_err();
        let keys: Vec<&str> = errors.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["mqtt", "store", "store_sync", "shards", "max_packet_size"]);
        let text = errors.to_string();
        assert!(text.contains("mqtt: \"localhost\" is not an address"), "{text}");
    }

    #[test]
    fn every_setting_has_an_environment_variable_named_after_its_key() {
        for (key, env, _, doc) in Config::reference() {
            assert_eq!(env, format!("MQFLEET_PROXY_{}", key.to_uppercase()));
            assert!(!doc.is_empty(), "{key} has no description");
        }
    }
}
