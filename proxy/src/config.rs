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
use std::sync::Arc;
use std::time::Duration;

use mqfleet_ops::config::{parse_addr, parse_optional_addr, require_positive, Problems};
pub use mqfleet_ops::config::{ConfigError, ConfigErrors};
use session_store::{RedisTarget, SyncPolicy};

use crate::auth::cert::{IdentitySource, IdentityUse};
use crate::auth::jwt::{JwtVerifier, KeySource};
use crate::auth::{Auth, AuthConfig};
use crate::proxy_protocol::Trusted;
use crate::tls::{ClientAuth, TlsFiles, TlsReloader};

mqfleet_ops::settings! {
    /// MQTT over TCP listener address; port 0 picks a free port (the bound address is logged).
    mqtt: String = "127.0.0.1:1883".into(), env "MQFLEET_PROXY_MQTT";
    /// HTTP listener for /livez, /readyz and /metrics; empty disables it.
    http: String = "127.0.0.1:18083".into(), env "MQFLEET_PROXY_HTTP";
    /// MQTT over TLS listener address (e.g. `0.0.0.0:8883`); empty disables it. Needs
    /// `tls_cert` and `tls_key`.
    mqtts: String = String::new(), env "MQFLEET_PROXY_MQTTS";
    /// MQTT over WebSocket listener address (e.g. `0.0.0.0:8083`, any path, subprotocol `mqtt`);
    /// empty disables it.
    ws: String = String::new(), env "MQFLEET_PROXY_WS";
    /// MQTT over secure WebSocket listener address (e.g. `0.0.0.0:8084`); empty disables it.
    /// Needs `tls_cert` and `tls_key`.
    wss: String = String::new(), env "MQFLEET_PROXY_WSS";
    /// PEM file with the server certificate chain (leaf first) for `mqtts` and `wss`.
    tls_cert: String = String::new(), env "MQFLEET_PROXY_TLS_CERT";
    /// PEM file with the private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1).
    tls_key: String = String::new(), env "MQFLEET_PROXY_TLS_KEY";
    /// Client certificates on `mqtts` and `wss`: `none`, `optional` (verified when presented)
    /// or `required`.
    tls_client_auth: String = "none".into(), env "MQFLEET_PROXY_TLS_CLIENT_AUTH";
    /// PEM bundle of the CAs that sign client certificates (with `tls_client_auth` optional or
    /// required).
    tls_client_ca: String = String::new(), env "MQFLEET_PROXY_TLS_CLIENT_CA";
    /// PEM file of certificate revocation lists checked against client certificates.
    tls_crl: String = String::new(), env "MQFLEET_PROXY_TLS_CRL";
    /// How often the TLS files are checked for changes (and reloaded), in ms; 0 disables (SIGHUP
    /// still reloads).
    tls_reload_ms: u64 = 10_000, env "MQFLEET_PROXY_TLS_RELOAD_MS";
    /// Which client-certificate field names the client: `none`, `cn` (subject common name) or
    /// `san` (first DNS, e-mail or URI subject alternative name). A named, verified certificate
    /// authenticates its client.
    tls_identity: String = "none".into(), env "MQFLEET_PROXY_TLS_IDENTITY";
    /// What the certificate identity becomes: `username`, `client_id` or `both`.
    tls_identity_as: String = "username".into(), env "MQFLEET_PROXY_TLS_IDENTITY_AS";
    /// Clients without credentials: `auto` (allowed while every listener is on a loopback
    /// address), `true` or `false`.
    allow_anonymous: String = "auto".into(), env "MQFLEET_PROXY_ALLOW_ANONYMOUS";
    /// Password file (`username:argon2id-hash` lines, edited with `mqfleet-proxy passwd`);
    /// empty disables. Re-read on SIGHUP.
    password_file: String = String::new(), env "MQFLEET_PROXY_PASSWORD_FILE";
    /// ACL file (TOML `[[rule]]` list, first match wins, default deny); empty: every topic open.
    /// Re-read on SIGHUP; existing subscriptions are checked again.
    acl_file: String = String::new(), env "MQFLEET_PROXY_ACL_FILE";
    /// Users (`mqfleet-proxy passwd redis://… USER`) and ACL rules (`mqfleet-proxy acl
    /// redis://… FILE`) also from the session store's Redis, shared by every proxy; the ACL is
    /// re-read every 5 s. Needs `store` in Redis.
    auth_redis: bool = false, env "MQFLEET_PROXY_AUTH_REDIS";
    /// Fleet-wide PUBLISH packets per second one client may send across all proxies (a bucket
    /// in Redis, leased in chunks); a faster client is throttled. 0: no limit. Needs Redis.
    fleet_publish_rate: u32 = 0, env "MQFLEET_PROXY_FLEET_PUBLISH_RATE";
    /// Fleet-wide PUBLISH packets per second of all clients of one verified username (a tenant
    /// account shared by many devices) across all proxies; throttled like
    /// `fleet_publish_rate`. 0: no limit. Needs Redis.
    fleet_tenant_publish_rate: u32 = 0, env "MQFLEET_PROXY_FLEET_TENANT_PUBLISH_RATE";
    /// Password hashes verified at once, at most (each takes one core for ~20 ms); 0 = one per core.
    auth_concurrency: usize = 0, env "MQFLEET_PROXY_AUTH_CONCURRENCY";
    /// File with the HS256 secret (at least 32 bytes) for JSON Web Tokens in the password field.
    jwt_secret_file: String = String::new(), env "MQFLEET_PROXY_JWT_SECRET_FILE";
    /// PEM public key (RSA for RS256, P-256 for ES256) for JSON Web Tokens in the password field.
    jwt_public_key_file: String = String::new(), env "MQFLEET_PROXY_JWT_PUBLIC_KEY_FILE";
    /// Required `iss` of tokens; empty: not checked.
    jwt_issuer: String = String::new(), env "MQFLEET_PROXY_JWT_ISSUER";
    /// Required `aud` of tokens; empty: not checked.
    jwt_audience: String = String::new(), env "MQFLEET_PROXY_JWT_AUDIENCE";
    /// Listeners that expect a PROXY protocol (v1 or v2) header from a load balancer: any of
    /// `mqtt`, `mqtts`, `ws`, `wss`, comma-separated; empty: none.
    proxy_protocol: String = String::new(), env "MQFLEET_PROXY_PROXY_PROTOCOL";
    /// Networks allowed to send PROXY headers (the load balancers), e.g. `10.0.0.0/8`;
    /// connections from elsewhere to a PROXY listener are closed. Required with `proxy_protocol`.
    proxy_protocol_from: String = String::new(), env "MQFLEET_PROXY_PROXY_PROTOCOL_FROM";
    /// Session store: `embedded:DIR` (single node), or Redis for a cluster of proxies:
    /// `redis://HOST:PORT[/DB]`, `rediss://…` (TLS), `redis+cluster://H1:P1,H2:P2,…`,
    /// `redis+sentinel://H1:P1,H2:P2,…/MASTER` (the master Sentinel names, followed across failovers).
    store: String = "embedded:./mqfleet-data".into(), env "MQFLEET_PROXY_STORE";
    /// When durable writes reach the disk (embedded store): `batch` (fsync every commit,
    /// nothing acknowledged is lost), `group:MS` (collect MS then fsync) or `interval:MS`
    /// (acknowledge before the fsync, which follows at least every MS).
    store_sync: String = "batch".into(), env "MQFLEET_PROXY_STORE_SYNC";
    /// Shards: `local:N` runs N shards in this process, `local` one per CPU core (embedded
    /// store); with Redis, `HOST:PORT,HOST:PORT,…` (the shards' link addresses) or `discover`
    /// (the live shards registered in Redis).
    shards: String = "local".into(), env "MQFLEET_PROXY_SHARDS";
    /// This proxy's name in a cluster (unique per proxy; shards and Redis know it by it).
    /// Empty: the host name and the MQTT port.
    id: String = String::new(), env "MQFLEET_PROXY_ID";
    /// Longest wait for Redis before an operation fails (a CONNECT is then refused), in ms.
    redis_timeout_ms: u64 = 2_000, env "MQFLEET_PROXY_REDIS_TIMEOUT_MS";
    /// How often this proxy tells Redis it is alive, in ms.
    heartbeat_ms: u64 = 1_000, env "MQFLEET_PROXY_HEARTBEAT_MS";
    /// Silence after which other proxies take a proxy for dead and publish its clients'
    /// wills, in ms.
    dead_after_ms: u64 = 5_000, env "MQFLEET_PROXY_DEAD_AFTER_MS";
    /// Log format: `text` or `json`. The level comes from RUST_LOG, else `log_level`.
    log_format: String = "text".into(), env "MQFLEET_PROXY_LOG_FORMAT";
    /// Log level filter when RUST_LOG is not set (tracing EnvFilter syntax).
    log_level: String = "info".into(), env "MQFLEET_PROXY_LOG_LEVEL";
    /// Most simultaneous MQTT connections; further ones are refused at accept.
    max_connections: usize = 100_000, env "MQFLEET_PROXY_MAX_CONNECTIONS";
    /// Most simultaneous connections from one source address (the PROXY header's when the
    /// listener reads one); further CONNECTs get 0x97 Quota exceeded. 0: no limit.
    max_connections_per_ip: usize = 0, env "MQFLEET_PROXY_MAX_CONNECTIONS_PER_IP";
    /// CONNECTs per second from one source address (burst: one second's worth); further ones
    /// get 0x9F Connection rate exceeded. 0: no limit.
    max_connect_rate_per_ip: u32 = 0, env "MQFLEET_PROXY_MAX_CONNECT_RATE_PER_IP";
    /// CONNECTs per second on each listener from everyone; further ones get 0x9F. 0: no limit.
    max_connect_rate: u32 = 0, env "MQFLEET_PROXY_MAX_CONNECT_RATE";
    /// PUBLISH packets per second one client may send; a faster client is throttled (its socket
    /// is not read until it is back within the rate). 0: no limit.
    max_publish_rate: u32 = 0, env "MQFLEET_PROXY_MAX_PUBLISH_RATE";
    /// PUBLISH payload bytes per second one client may send; throttled like `max_publish_rate`.
    /// 0: no limit.
    max_publish_bytes_rate: u32 = 0, env "MQFLEET_PROXY_MAX_PUBLISH_BYTES_RATE";
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
    /// Messages waiting for a client beyond its in-flight window; further ones are dropped and
    /// counted. A persistent session's durable queue holds `max_inflight` plus this many (in
    /// flight and waiting, or all waiting while it is offline).
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
    /// Retained messages each in-process shard holds at most (single node; shard processes
    /// have their own setting); a retained PUBLISH for a new topic beyond it is refused (5.0:
    /// PUBACK 0x97). 0: no limit.
    max_retained_messages: usize = 0, env "MQFLEET_PROXY_MAX_RETAINED_MESSAGES";
    /// Payload bytes of retained messages each in-process shard holds at most; 0: no limit.
    max_retained_bytes: usize = 0, env "MQFLEET_PROXY_MAX_RETAINED_BYTES";
    /// Also queue QoS 0 messages for offline persistent sessions.
    queue_qos0_offline: bool = false, env "MQFLEET_PROXY_QUEUE_QOS0_OFFLINE";
    /// Where 5.0 clients are sent when this proxy drains (MQTT Server Reference, e.g. the
    /// Service's DNS name); empty: drained clients get 0x9C without a reference.
    server_reference: String = String::new(), env "MQFLEET_PROXY_SERVER_REFERENCE";
    /// Clients disconnected per second while draining (SIGTERM), so that a fleet reconnects
    /// elsewhere gradually instead of all at once; the rest go when `shutdown_grace_ms` ends.
    drain_rate: u32 = 500, env "MQFLEET_PROXY_DRAIN_RATE";
    /// On SIGTERM, time given to connections to be told and their sessions saved, in ms.
    shutdown_grace_ms: u64 = 10_000, env "MQFLEET_PROXY_SHUTDOWN_GRACE_MS";
    /// File holding the bearer token of the admin API (`/api/v1/…` on the `http` listener; at
    /// least 32 characters, e.g. `openssl rand -hex 32`); re-read on SIGHUP. Empty: the admin
    /// API is off.
    admin_token_file: String = String::new(), env "MQFLEET_PROXY_ADMIN_TOKEN_FILE";
    /// Publish this proxy's statistics under `$SYS/broker/…` every this many ms (retained,
    /// expiring after three intervals); 0: off. Only ACL rules that name `$SYS` topics grant
    /// them.
    sys_interval_ms: u64 = 0, env "MQFLEET_PROXY_SYS_INTERVAL_MS";
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
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Tools besides running the broker.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Adds a user or changes its password (read as one line from standard input), or removes
    /// it with --delete, in a password file (created, mode 0600, if missing; SIGHUP the proxies
    /// to apply) or in Redis (a `redis://…` URL: proxies with auth_redis see it at once).
    Passwd {
        /// The password file (the `password_file` setting) or the store's Redis URL.
        target: String,
        username: String,
        /// Remove the user.
        #[arg(long, short = 'D')]
        delete: bool,
    },
    /// Checks an ACL file and stores it in Redis as the fleet's ACL (proxies with auth_redis
    /// apply it within 5 s).
    Acl {
        /// The store's Redis URL.
        store: String,
        file: PathBuf,
    },
}

/// Where sessions are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Embedded(PathBuf),
    Redis(RedisTarget),
}

/// Where the shards are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardSpec {
    /// This many shards in this process.
    Local(usize),
    /// Shard processes at these link addresses.
    Static(Vec<String>),
    /// The live shards registered in Redis.
    Discover,
}

/// A listener address with the TLS configuration it serves.
pub type TlsListener = (SocketAddr, Arc<TlsReloader>);

/// A checked configuration: what the broker runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mqtt: SocketAddr,
    /// The MQTT over TLS listener.
    pub mqtts: Option<TlsListener>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<TlsListener>,
    pub http: Option<SocketAddr>,
    /// Guards the admin API; none: the API is off.
    pub admin_token: Option<mqfleet_ops::admin::AdminToken>,
    pub store: StoreSpec,
    pub store_sync: SyncPolicy,
    pub shards: ShardSpec,
    pub json_logs: bool,
    pub connect_timeout: Duration,
    pub shutdown_grace: Duration,
    /// This proxy's name in a cluster; empty until resolved at start (see [`Settings::proxy_id`]).
    pub id: String,
    pub redis_timeout: Duration,
    pub heartbeat: Duration,
    pub dead_after: Duration,
    /// Authentication chain and ACL.
    pub auth: Arc<Auth>,
    /// Listeners (by name) that read a PROXY header, and from whom.
    pub proxy_protocol: Option<(Vec<String>, Arc<Trusted>)>,
    /// Everything else, as configured.
    pub raw: Config,
}

impl Config {
    /// Reads the file (if any) and applies the overrides on top.
    pub fn load(cli: Cli) -> Result<Config, ConfigErrors> {
        mqfleet_ops::config::check_env("MQFLEET_PROXY_", &Config::reference(), &["MQFLEET_PROXY_CONFIG"])?;
        let mut config: Config = mqfleet_ops::config::load_file(cli.config.as_deref())?;
        config.apply(cli.overrides);
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        mqfleet_ops::config::from_toml(text)
    }

    /// Checks every setting; returns all problems, not just the first.
    pub fn validate(self) -> Result<Settings, ConfigErrors> {
        let mut p = Problems::default();
        let mqtt = p.check("mqtt", parse_addr(&self.mqtt));
        let http = p.check("http", parse_optional_addr(&self.http));
        let admin_token = p.check("admin_token_file", mqfleet_ops::admin::token_setting(&self.admin_token_file)).flatten();
        let ws = p.check("ws", parse_optional_addr(&self.ws)).flatten();
        let (mqtts, wss) = self.tls(&mut p);
        let store = p.check("store", parse_store(&self.store));
        let store_sync = p.check("store_sync", self.store_sync.parse::<SyncPolicy>());
        let shards = p.check("shards", parse_shards(&self.shards));
        let loopback_only =
            [mqtt, ws, mqtts.as_ref().map(|l| l.0), wss.as_ref().map(|l| l.0)].into_iter().flatten().all(|a| a.ip().is_loopback());
        let auth = self.auth(&mut p, loopback_only);
        let proxy_protocol = self.proxy_protocol(&mut p);
        if !matches!(store, Some(StoreSpec::Redis(_))) {
            if self.auth_redis {
                p.add("auth_redis", "users and ACL rules in Redis need the session store in Redis (store = redis://…)");
            }
            if self.fleet_publish_rate > 0 || self.fleet_tenant_publish_rate > 0 {
                p.add("fleet_publish_rate", "fleet-wide rates are shared through Redis: set store = redis://…");
            }
        }
        match (&store, &shards) {
            (Some(StoreSpec::Embedded(_)), Some(ShardSpec::Static(_) | ShardSpec::Discover)) => {
                p.add("shards", "shard processes need the session store in Redis (store = redis://…): proxies share sessions through it")
            }
            (Some(StoreSpec::Redis(_)), Some(ShardSpec::Local(_))) => p.add(
                "shards",
                "with the session store in Redis, name the shard processes (HOST:PORT,…) or use discover; in-process shards are for a single node",
            ),
            _ => {}
        }
        if self.id.contains(|c: char| c.is_control() || c == '|') {
            p.add("id", format!("{:?} contains a control character or '|'", self.id));
        }
        let json_logs = p.check("log_format", mqfleet_ops::logging::parse_format(&self.log_format)).unwrap_or(false);
        p.check("log_level", mqfleet_ops::logging::check_level(&self.log_level));
        require_positive(
            &mut p,
            &[
                ("max_connections", self.max_connections as u64),
                ("max_packet_size", u64::from(self.max_packet_size)),
                ("connect_timeout_ms", self.connect_timeout_ms),
                ("receive_maximum", u64::from(self.receive_maximum)),
                ("max_inflight", u64::from(self.max_inflight)),
                ("max_queued_messages", u64::from(self.max_queued_messages)),
                ("max_topic_levels", self.max_topic_levels as u64),
                ("max_topic_length", self.max_topic_length as u64),
                ("max_client_id_length", self.max_client_id_length as u64),
                ("redis_timeout_ms", self.redis_timeout_ms),
                ("heartbeat_ms", self.heartbeat_ms),
                ("drain_rate", u64::from(self.drain_rate)),
            ],
        );
        if self.max_packet_size < 64 {
            p.add("max_packet_size", format!("{} bytes cannot hold a CONNECT; use at least 64", self.max_packet_size));
        }
        if self.max_packet_size > mqfleet_codec::MAX_REMAINING_LENGTH as u32 {
            p.add(
                "max_packet_size",
                format!("{} exceeds the MQTT maximum of {}", self.max_packet_size, mqfleet_codec::MAX_REMAINING_LENGTH),
            );
        }
        if self.max_topic_length > 65_535 {
            p.add("max_topic_length", "cannot exceed 65535, the longest MQTT string");
        }
        if self.dead_after_ms < 3 * self.heartbeat_ms {
            p.add(
                "dead_after_ms",
                format!(
                    "{} ms is less than three heartbeats ({} ms): a live proxy would be taken for dead",
                    self.dead_after_ms,
                    3 * self.heartbeat_ms
                ),
            );
        }
        p.into_result()?;
        // Every `None` above recorded a problem, so all are `Some` here.
        let (Some(mqtt), Some(http), Some(store), Some(store_sync), Some(shards), Some(auth)) =
            (mqtt, http, store, store_sync, shards, auth)
        else {
            return Err(ConfigErrors::single("config", "internal: unreported invalid setting".into()));
        };
        Ok(Settings {
            mqtt,
            mqtts,
            ws,
            wss,
            http,
            admin_token,
            store,
            store_sync,
            shards,
            json_logs,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            id: self.id.clone(),
            redis_timeout: Duration::from_millis(self.redis_timeout_ms),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            dead_after: Duration::from_millis(self.dead_after_ms),
            auth: Arc::new(auth),
            proxy_protocol,
            raw: self,
        })
    }
}

impl Config {
    /// The TLS listeners (`mqtts`, `wss`), if configured; problems go to `p`.
    fn tls(&self, p: &mut Problems) -> (Option<TlsListener>, Option<TlsListener>) {
        let mqtts = p.check("mqtts", parse_optional_addr(&self.mqtts)).flatten();
        let wss = p.check("wss", parse_optional_addr(&self.wss)).flatten();
        if mqtts.is_none() && wss.is_none() {
            return (None, None);
        }
        match self.tls_config(p) {
            Some(config) => (mqtts.map(|a| (a, config.clone())), wss.map(|a| (a, config))),
            None => (None, None),
        }
    }

    fn tls_config(&self, p: &mut Problems) -> Option<Arc<TlsReloader>> {
        let client_auth = p.check("tls_client_auth", self.tls_client_auth.parse::<ClientAuth>())?;
        for (key, value) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
            if value.is_empty() {
                p.add(key, "required with mqtts or wss: a PEM file");
            }
        }
        if self.tls_cert.is_empty() || self.tls_key.is_empty() {
            return None;
        }
        let files = TlsFiles {
            cert: self.tls_cert.clone().into(),
            key: self.tls_key.clone().into(),
            client_ca: optional_path(&self.tls_client_ca),
            crl: optional_path(&self.tls_crl),
            client_auth,
        };
        match TlsReloader::new(files) {
            Ok(config) => Some(Arc::new(config)),
            Err(e) => {
                p.add(e.key, e.message);
                None
            }
        }
    }
}

impl Config {
    /// The authentication chain and ACL; problems go to `p`.
    fn auth(&self, p: &mut Problems, loopback_only: bool) -> Option<Auth> {
        let allow_anonymous = match self.allow_anonymous.as_str() {
            "auto" => Some(loopback_only),
            "true" => Some(true),
            "false" => Some(false),
            other => {
                p.add("allow_anonymous", format!("{other:?} is not auto, true or false"));
                None
            }
        };
        let cert_source = p.check("tls_identity", self.tls_identity.parse::<IdentitySource>());
        let cert_use = p.check("tls_identity_as", self.tls_identity_as.parse::<IdentityUse>());
        if cert_source.is_some_and(|s| s != IdentitySource::None) && self.tls_client_auth == "none" {
            p.add("tls_identity", "names clients by their certificate, but tls_client_auth = none asks for none");
        }
        let (issuer, audience) = (non_empty(&self.jwt_issuer), non_empty(&self.jwt_audience));
        let jwt = match (optional_path(&self.jwt_secret_file), optional_path(&self.jwt_public_key_file)) {
            (Some(_), Some(_)) => {
                p.add("jwt_public_key_file", "set either jwt_secret_file (HS256) or jwt_public_key_file (RS256/ES256), not both");
                None
            }
            (Some(path), None) => p.check("jwt_secret_file", JwtVerifier::new(KeySource::Secret(&path), issuer, audience)),
            (None, Some(path)) => p.check("jwt_public_key_file", JwtVerifier::new(KeySource::PublicKey(&path), issuer, audience)),
            (None, None) => None,
        };
        let concurrency = match self.auth_concurrency {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let config = AuthConfig {
            allow_anonymous: allow_anonymous?,
            password_file: optional_path(&self.password_file),
            acl_file: optional_path(&self.acl_file),
            jwt,
            cert_source: cert_source?,
            cert_use: cert_use?,
            concurrency,
            redis: self.auth_redis,
        };
        match Auth::new(config) {
            Ok(a) => Some(a),
            Err((key, message)) => {
                p.add(key, message);
                None
            }
        }
    }
}

impl Config {
    fn proxy_protocol(&self, p: &mut Problems) -> Option<(Vec<String>, Arc<Trusted>)> {
        let names: Vec<String> = self.proxy_protocol.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect();
        if names.is_empty() {
            return None;
        }
        for n in &names {
            let configured = match n.as_str() {
                "mqtt" => true,
                "mqtts" => !self.mqtts.is_empty(),
                "ws" => !self.ws.is_empty(),
                "wss" => !self.wss.is_empty(),
                _ => {
                    p.add("proxy_protocol", format!("{n:?} is not a listener (mqtt, mqtts, ws, wss)"));
                    continue;
                }
            };
            if !configured {
                p.add("proxy_protocol", format!("listener {n} is not enabled"));
            }
        }
        let trusted = p.check("proxy_protocol_from", Trusted::parse(&self.proxy_protocol_from))?;
        Some((names, Arc::new(trusted)))
    }
}

fn optional_path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl Settings {
    /// The proxy's cluster name: `id` if set, else the host name and the bound MQTT port.
    pub fn proxy_id(&self, mqtt_port: u16) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "proxy".into());
        format!("{host}:{mqtt_port}")
    }
}

fn parse_store(s: &str) -> Result<StoreSpec, String> {
    match s.split_once(':') {
        Some(("embedded", dir)) if !dir.is_empty() => Ok(StoreSpec::Embedded(dir.into())),
        Some(("redis" | "rediss" | "redis+cluster" | "redis+sentinel", _)) => RedisTarget::parse(s).map(StoreSpec::Redis),
        _ => Err(format!("{s:?} is not a store; expected embedded:DIR, redis://HOST:PORT, redis+cluster://H1:P1,H2:P2 or redis+sentinel://H1:P1,H2:P2/MASTER")),
    }
}

fn parse_shards(s: &str) -> Result<ShardSpec, String> {
    if s == "local" {
        return Ok(ShardSpec::Local(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)));
    }
    if s == "discover" {
        return Ok(ShardSpec::Discover);
    }
    if let Some(n) = s.strip_prefix("local:") {
        return match n.parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(ShardSpec::Local(n)),
            _ => Err(format!("{s:?} is not a shard set; expected local:N with 1 <= N <= 1024")),
        };
    }
    let addrs: Vec<String> = s.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect();
    let well_formed = |a: &String| a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if addrs.is_empty() || !addrs.iter().all(well_formed) {
        return Err(format!("{s:?} is not a shard set; expected local, local:N, discover or HOST:PORT,HOST:PORT,…"));
    }
    Ok(ShardSpec::Static(addrs))
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
        assert!(matches!(s.shards, ShardSpec::Local(n) if n >= 1));
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
        assert_eq!(c.validate().unwrap().shards, ShardSpec::Local(3));
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
    fn a_cluster_proxy_needs_redis_and_shard_processes() {
        let c =
            Config { store: "redis://127.0.0.1:6379".into(), shards: "10.0.0.1:7883, shard-1.mqfleet:7883".into(), ..Config::default() };
        let s = c.validate().unwrap();
        assert!(matches!(s.store, StoreSpec::Redis(_)));
        assert_eq!(s.shards, ShardSpec::Static(vec!["10.0.0.1:7883".into(), "shard-1.mqfleet:7883".into()]));
        let c = Config { store: "redis+cluster://a:1,b:2".into(), shards: "discover".into(), ..Config::default() };
        assert_eq!(c.validate().unwrap().shards, ShardSpec::Discover);

        let mixed = Config { shards: "discover".into(), ..Config::default() }.validate().unwrap_err();
        assert!(mixed.to_string().contains("shards: shard processes need the session store in Redis"), "{mixed}");
        let mixed = Config { store: "redis://r:6379".into(), ..Config::default() }.validate().unwrap_err();
        assert!(mixed.to_string().contains("in-process shards are for a single node"), "{mixed}");
        let bad = Config { store: "redis://r:6379".into(), shards: "shard-1".into(), ..Config::default() }.validate().unwrap_err();
        assert!(bad.to_string().contains("is not a shard set"), "{bad}");
    }

    #[test]
    fn the_proxy_id_defaults_to_host_and_port() {
        let s = Config::default().validate().unwrap();
        assert!(s.proxy_id(1884).ends_with(":1884"));
        let s = Config { id: "edge-7".into(), ..Config::default() }.validate().unwrap();
        assert_eq!(s.proxy_id(1884), "edge-7");
    }

    #[test]
    fn every_setting_has_an_environment_variable_named_after_its_key() {
        for (key, env, _, doc) in Config::reference() {
            assert_eq!(env, format!("MQFLEET_PROXY_{}", key.to_uppercase()));
            assert!(!doc.is_empty(), "{key} has no description");
        }
    }
}
