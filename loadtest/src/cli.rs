//! Command line and scenario files. One [`Options`] struct serves both: each flag
//! (`--payload-size`) is also a scenario-file key (`payload_size`), at the top of the file
//! (defaults for every stage) or in a `[[stage]]`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use mqfleet_codec::{Protocol, QoS};

use crate::accounting::QosMix;
use crate::payload::Shape;
use crate::scenario::build::{self, Names};
use crate::scenario::{Pace, Plan, Settings};
use crate::transport::{Scheme, Target, TlsFiles};

#[derive(Debug, clap::Parser)]
#[command(name = "mqfleet-loadtest", version, about = "Simulate device swarms against any MQTT broker and account for every message")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Connect storm: devices connect at --connect-rate with at most --connect-inflight handshakes in flight.
    Conn(Options),
    /// Hold --devices connections open with keep-alive for --duration seconds.
    Idle(Options),
    /// Devices publish every 1/--rate s to devices/%i/telemetry; --subscribers backends receive (a shared group with --shared).
    Telemetry(Options),
    /// Backends publish to each device's own topic devices/%i/cmd.
    Command(Options),
    /// One publisher, --devices subscribers of one topic.
    Broadcast(Options),
    /// --devices publisher/subscriber pairs, each on its own topic (1:1 throughput).
    Pairs(Options),
    /// MQTT 5 request/response: Response Topic + Correlation Data, echoed by --subscribers responders.
    Reqresp(Options),
    /// Persistent devices get commands while --drop-percent of them drop every --drop-every s and come back.
    Reconnect(Options),
    /// Fault injection: start a local cluster (proxies, shards, Redis) from the built binaries,
    /// run a swarm of persistent QoS 0/1/2 clients and clients with wills while a seeded
    /// nemesis kills, pauses and cuts its parts, then check every message and will.
    Chaos(crate::chaos::ChaosOptions),
    /// Run the stages of a scenario file (TOML) in order.
    Run {
        /// The scenario file.
        scenario: PathBuf,
        #[command(flatten)]
        options: Options,
    },
}

/// Every setting of a run. Unset values take the scenario's default.
#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Broker: host:port, mqtt://, mqtts://, ws://host:port/path or wss://; repeat to round-robin.
    #[arg(long = "target", short = 't')]
    #[serde(alias = "target")]
    pub targets: Vec<String>,
    /// MQTT version: 3.1.1 or 5.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Simulated devices (publishers, subscribers or pairs, by scenario).
    #[arg(long, short = 'n')]
    pub devices: Option<usize>,
    /// Messages per second per device and stream (open loop, latency from the intended send time).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Closed loop instead: publish as fast as possible, at most this many messages per publisher not yet delivered.
    #[arg(long)]
    pub window: Option<usize>,
    /// QoS: 0, 1, 2, or a mix like 0:50,1:40,2:10.
    #[arg(long)]
    pub qos: Option<String>,
    /// Seconds of publishing (or of holding connections).
    #[arg(long, short = 'd')]
    pub duration: Option<f64>,
    /// Payload bytes (at least 26, the accounting header).
    #[arg(long)]
    pub payload_size: Option<usize>,
    #[arg(long, value_enum)]
    pub payload_shape: Option<Shape>,
    /// Connects per second for the swarm (0 = as fast as handshakes allow).
    #[arg(long)]
    pub connect_rate: Option<f64>,
    /// Connection handshakes in flight at once.
    #[arg(long)]
    pub connect_inflight: Option<usize>,
    /// Seconds to wait for CONNACK.
    #[arg(long)]
    pub connect_timeout: Option<f64>,
    /// Keep-alive seconds.
    #[arg(long)]
    pub keepalive: Option<u16>,
    /// Persistent sessions for every client (Clean Start 0, Session Expiry 1 h): the broker
    /// then queues QoS 1/2 messages durably for subscribers. Default: clean sessions, except the
    /// reconnect storm, which is about persistent sessions.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub persistent: Option<bool>,
    /// Client id template: %i = index, %r = run id, %s = role.
    #[arg(long)]
    pub client_id: Option<String>,
    /// User name template (%i, %r).
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
    /// Topic template (%i, %r); defaults per scenario.
    #[arg(long)]
    pub topic: Option<String>,
    /// Backend subscribers (telemetry) or responders (reqresp).
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Backend publishers (command, reconnect).
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Telemetry backends form this shared subscription group.
    #[arg(long)]
    pub shared: Option<String>,
    /// Telemetry backends' filter.
    #[arg(long)]
    pub filter: Option<String>,
    /// Reconnect storm: percent of devices dropped per round.
    #[arg(long)]
    pub drop_percent: Option<f64>,
    /// Reconnect storm: seconds between rounds.
    #[arg(long)]
    pub drop_every: Option<f64>,
    /// Reconnect storm: seconds a dropped device stays away.
    #[arg(long)]
    pub offline: Option<f64>,
    /// Longest wait, in seconds, for in-flight messages after publishing stops.
    #[arg(long)]
    pub drain: Option<f64>,
    /// Seed of the QoS mix and storm choices, for replay.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Source addresses to connect from, e.g. 127.0.0.2-127.0.0.9 (past the ephemeral-port limit).
    #[arg(long)]
    pub source: Vec<String>,
    /// CA certificate (PEM) for mqtts:// and wss:// targets.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Do not verify the broker's certificate.
    #[arg(long)]
    pub insecure: bool,
    /// Sample this process's CPU and memory (the broker under test).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Write the JSON report here, and the chart next to it (same name, .svg).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// A scenario file: top-level keys are defaults for every stage.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    #[serde(flatten)]
    pub defaults: Options,
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// conn, idle, telemetry, command, broadcast, pairs, reqresp or reconnect.
    pub scenario: String,
    #[serde(flatten)]
    pub options: Options,
}

impl Options {
    /// `self` where set, else `base`.
    pub fn over(self, base: &Options) -> Options {
        macro_rules! pick {
            ($($f:ident),*) => { Options { $( $f: self.$f.or_else(|| base.$f.clone()), )* targets: if self.targets.is_empty() { base.targets.clone() } else { self.targets }, source: if self.source.is_empty() { base.source.clone() } else { self.source }, insecure: self.insecure || base.insecure, quiet: self.quiet || base.quiet } };
        }
        pick!(
            protocol,
            devices,
            rate,
            window,
            qos,
            duration,
            payload_size,
            payload_shape,
            connect_rate,
            connect_inflight,
            connect_timeout,
            keepalive,
            persistent,
            client_id,
            username,
            password,
            topic,
            subscribers,
            publishers,
            shared,
            filter,
            drop_percent,
            drop_every,
            offline,
            drain,
            seed,
            ca,
            cert,
            key,
            broker_pid,
            report
        )
    }
}

/// A scenario with its settings, checked.
pub struct Prepared {
    pub plan: Plan,
    pub settings: Settings,
    pub echo: BTreeMap<String, serde_json::Value>,
}

fn secs(v: f64, key: &str) -> Result<Duration, String> {
    if v.is_finite() && v >= 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("--{key}: {v} is not a number of seconds"))
    }
}

/// Parses `a.b.c.d` or `a.b.c.d-a.b.c.e` (a range in the last octet).
pub fn parse_sources(items: &[String]) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for item in items {
        match item.split_once('-') {
            None => out.push(item.parse().map_err(|_| format!("--source {item:?} is not an IP address"))?),
            Some((a, b)) => {
                let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (
                    a.parse().map_err(|_| format!("--source {a:?} is not an IPv4 address"))?,
                    b.parse().map_err(|_| format!("--source {b:?} is not an IPv4 address"))?,
                );
                let (oa, ob) = (a.octets(), b.octets());
                if oa[..3] != ob[..3] || oa[3] > ob[3] {
                    return Err(format!("--source {item:?}: a range varies only the last octet, low to high"));
                }
                out.extend((oa[3]..=ob[3]).map(|x| IpAddr::from([oa[0], oa[1], oa[2], x])));
            }
        }
    }
    Ok(out)
}

/// Builds the plan and settings of `scenario` from `o`, with that scenario's defaults.
pub fn prepare(scenario: &str, o: &Options) -> Result<Prepared, String> {
    let defaults: (usize, f64, f64) = match scenario {
        // (devices, rate, duration)
        "conn" => (1000, 0.0, 1.0),
        "idle" => (1000, 0.0, 10.0),
        "telemetry" => (100, 1.0, 10.0),
        "command" | "reconnect" => (100, 1.0, 10.0),
        "broadcast" => (100, 10.0, 10.0),
        "pairs" => (10, 100.0, 10.0),
        "reqresp" => (50, 5.0, 10.0),
        other => return Err(format!("unknown scenario {other:?}")),
    };
    if o.targets.is_empty() {
        return Err("no --target given (e.g. --target 127.0.0.1:1883)".into());
    }
    let targets: Vec<Target> = o.targets.iter().map(|t| t.parse()).collect::<Result<_, _>>()?;
    let protocol = match o.protocol.as_deref().unwrap_or("5") {
        "3.1.1" | "4" | "311" | "v311" => Protocol::V3_1_1,
        "5" | "5.0" | "v5" => Protocol::V5,
        other => return Err(format!("--protocol {other:?}: use 3.1.1 or 5")),
    };
    if scenario == "reqresp" && protocol != Protocol::V5 {
        return Err("reqresp needs --protocol 5 (Response Topic and Correlation Data are MQTT 5)".into());
    }
    let seed = o.seed.unwrap_or(1);
    let qos = QosMix::parse(o.qos.as_deref().unwrap_or("1"), seed).map_err(|e| format!("--qos: {e}"))?;
    let sub_qos = QoS::from_u8(qos.weights.iter().rposition(|w| *w > 0).unwrap_or(0) as u8).unwrap_or(QoS::AtLeastOnce);
    let n = o.devices.unwrap_or(defaults.0);
    if n == 0 {
        return Err("--devices must be at least 1".into());
    }
    let pace = match (o.window, o.rate) {
        (Some(w), _) if w > 0 => Pace::Window(w),
        (Some(_), _) => return Err("--window must be at least 1".into()),
        (None, r) => {
            let r = r.unwrap_or(defaults.1);
            if !(r.is_finite() && r >= 0.0) {
                return Err(format!("--rate {r} is not a rate"));
            }
            Pace::Rate(r)
        }
    };
    if pace == Pace::Rate(0.0) && !matches!(scenario, "conn" | "idle") {
        return Err("--rate must be above 0 (or use --window for closed loop)".into());
    }
    let duration = secs(o.duration.unwrap_or(defaults.2), "duration")?;
    let secure = targets.iter().any(|t| matches!(t.scheme, Scheme::Tls | Scheme::Wss));
    let tls = if secure {
        Some(TlsFiles { ca: o.ca.clone(), cert: o.cert.clone(), key: o.key.clone(), insecure: o.insecure }.client_config()?)
    } else {
        None
    };
    let run_id: String = {
        use rand::Rng;
        let mut r = rand::rng();
        (0..6).map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[r.random_range(0..36)])).collect()
    };
    let names = Names {
        client_id: o.client_id.clone().unwrap_or_else(|| "lt-%r-%s-%i".into()),
        username: o.username.clone(),
        run_id,
        sub_qos,
        persistent: o.persistent.unwrap_or(false),
    };
    let topic = |default: &str| o.topic.clone().unwrap_or_else(|| default.into());
    let hold = duration;
    let plan = match scenario {
        "conn" => build::conn(&names, n, hold, "conn"),
        "idle" => build::conn(&names, n, hold, "idle"),
        "telemetry" => build::telemetry(
            &names,
            n,
            &topic("devices/%r/%i/telemetry"),
            o.subscribers.unwrap_or(1),
            &names.fill(o.filter.as_deref().unwrap_or("devices/%r/+/telemetry"), 0),
            o.shared.as_deref(),
        ),
        "command" => build::command(&names, n, &topic("devices/%r/%i/cmd"), o.publishers.unwrap_or(1), false, "command"),
        "broadcast" => build::broadcast(&names, n, &topic("broadcast/%r/all")),
        "pairs" => build::pairs(&names, n, &topic("pairs/%r/%i")),
        "reqresp" => build::reqresp(&names, n, o.subscribers.unwrap_or(1)),
        "reconnect" => build::reconnect(
            &names,
            n,
            &topic("devices/%r/%i/cmd"),
            o.publishers.unwrap_or(1),
            o.drop_percent.unwrap_or(20.0),
            secs(o.drop_every.unwrap_or(2.0), "drop-every")?.max(Duration::from_millis(100)),
        ),
        _ => unreachable!("checked above"),
    };
    let sources = parse_sources(&o.source)?;
    let settings = Settings {
        targets,
        tls,
        sources,
        protocol,
        keep_alive: o.keepalive.unwrap_or(30),
        connect_timeout: secs(o.connect_timeout.unwrap_or(10.0), "connect-timeout")?,
        password: o.password.clone(),
        connect_rate: o.connect_rate.unwrap_or(0.0).max(0.0),
        connect_inflight: o.connect_inflight.unwrap_or(100),
        qos,
        payload_size: o.payload_size.unwrap_or(64),
        shape: o.payload_shape.unwrap_or_default(),
        pace,
        duration: if matches!(scenario, "conn" | "idle") { Duration::ZERO } else { duration },
        drain: secs(o.drain.unwrap_or(10.0), "drain")?,
        offline: secs(o.offline.unwrap_or(1.0), "offline")?,
        broker_pid: o.broker_pid,
        progress: !o.quiet,
        retry_connect: false,
    };
    let mut echo = BTreeMap::new();
    let mut put = |k: &str, v: serde_json::Value| {
        echo.insert(k.to_string(), v);
    };
    put("devices", n.into());
    put("protocol", settings.protocol.to_string().into());
    put("qos", o.qos.clone().unwrap_or_else(|| "1".into()).into());
    match pace {
        Pace::Rate(r) => put("rate", r.into()),
        Pace::Window(w) => put("window", w.into()),
    }
    put("duration_s", duration.as_secs_f64().into());
    put("payload_size", settings.payload_size.into());
    put("seed", seed.into());
    put("persistent", (names.persistent || scenario == "reconnect").into());
    put("connect_rate", settings.connect_rate.into());
    put("connect_inflight", settings.connect_inflight.into());
    Ok(Prepared { plan, settings, echo })
}
