//! `mqfleet-loadtest chaos`: a local cluster (proxies, shards behind fault-injecting relays,
//! Redis) under a swarm of persistent QoS 0/1/2 publisher/subscriber pairs and clients with
//! wills, while a seeded nemesis kills, pauses and cuts its parts; afterwards every message and
//! will is accounted for (docs/RELIABILITY.md).
//!
//! Checked on the history: no acknowledged QoS 1/2 message lost, no QoS 2 message twice, per
//! publisher order kept, persistent sessions resumed (Session Present), one live connection
//! per client id (sampled through the admin API), every will exactly once, and full service
//! within [`RECOVERY_LIMIT`] of the last fault. Any violation fails the run (exit 1) and is
//! printed with the fault timeline.

pub mod cluster;
pub mod nemesis;
pub mod observers;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqfleet_codec::{Protocol, QoS};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::accounting::QosCounts;
use crate::accounting::QosMix;
use crate::payload::Shape;
use crate::report::Report;
use crate::scenario::build::{self, Names};
use crate::scenario::{Pace, Settings};
use cluster::ChaosCluster;
use nemesis::{Happened, Kind};
use observers::{ConnectionBook, WillBook};
use testkit::local_cluster::RedisKind;

/// The longest the cluster may take to serve every proxy again after the last fault healed.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileName {
    /// About five minutes: what the test command runs.
    Short,
    /// An hour or more: run before a release.
    Long,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosOptions {
    #[arg(long, value_enum, default_value = "short")]
    pub profile: ProfileName,
    /// Seed of the fault schedule and of the will clients: the same seed replays the same faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Where mqfleet-proxy and mqfleet-shard are (default: next to this program).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Publishing window in seconds, overriding the profile's.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Only these faults (comma-separated; default: all), e.g. to replay one kind.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<Kind>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Write every process's whole log into this directory at the end (one file per process).
    #[arg(long)]
    pub logs: Option<PathBuf>,
    /// Redis to keep sessions in: one server, or a Cluster of three masters (no replicas; the
    /// nemesis kills one node at a time). Every server keeps an AOF with `appendfsync always`.
    #[arg(long, value_enum, default_value = "standalone")]
    pub redis: RedisChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisChoice {
    Standalone,
    Cluster,
}

/// The size and pace of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: ProfileName,
    pub proxies: usize,
    pub shards: usize,
    /// Publisher/subscriber pairs, persistent sessions.
    pub pairs: usize,
    /// Messages per second per pair.
    pub rate: f64,
    pub qos_mix: String,
    pub will_clients: usize,
    pub window_s: u64,
    /// Faults begin after this and end this long before the window closes.
    pub lead_s: u64,
    pub tail_s: u64,
    /// Pause between faults, ms.
    pub gap_ms: (u64, u64),
}

impl Profile {
    pub fn new(name: ProfileName, duration: Option<u64>) -> Profile {
        let mut p = match name {
            ProfileName::Short => Profile {
                name,
                proxies: 2,
                shards: 3,
                pairs: 12,
                rate: 20.0,
                qos_mix: "0:20,1:40,2:40".into(),
                will_clients: 6,
                window_s: 210,
                lead_s: 5,
                tail_s: 40,
                gap_ms: (2_000, 6_000),
            },
            ProfileName::Long => Profile {
                name,
                proxies: 3,
                shards: 3,
                pairs: 30,
                rate: 20.0,
                qos_mix: "0:20,1:40,2:40".into(),
                will_clients: 10,
                window_s: 3_660,
                lead_s: 10,
                tail_s: 60,
                gap_ms: (3_000, 12_000),
            },
        };
        if let Some(d) = duration {
            p.window_s = d.max(p.lead_s + p.tail_s + 10);
        }
        p
    }
}

/// The JSON report of a chaos run.
#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub schema: u32,
    pub profile: Profile,
    pub seed: u64,
    pub duration_s: f64,
    /// When the run started (the zero of the timeline), ns since the Unix epoch.
    pub started_at_ns: u64,
    pub cluster: String,
    /// Faults by kind.
    pub faults: BTreeMap<Kind, u64>,
    pub timeline: Vec<Happened>,
    /// The swarm's accounting, by publish QoS.
    pub messages: BTreeMap<String, QosCounts>,
    /// Acknowledged QoS 1/2 copies checked for loss, duplication and order.
    pub messages_checked: u64,
    pub wills_expected: usize,
    pub wills_after_clean_disconnect: usize,
    pub wills_arrived: usize,
    pub connection_samples: u64,
    /// Seconds from the last fault's end until every proxy served a QoS 1 round trip.
    pub recovery_s: Option<f64>,
    pub recovery_limit_s: u64,
    pub client_errors: BTreeMap<String, u64>,
    /// Copies the processes dropped, by process and reason (`dropped_messages_total`), and
    /// times a proxy found itself taken for dead: where to look when something is missing.
    pub process_counters: BTreeMap<String, f64>,
    pub lost_examples: Vec<crate::accounting::LostCopy>,
    pub reorder_examples: Vec<crate::accounting::Reorder>,
    /// QoS 1/2 losses in runs, with about when each was sent.
    pub lost_runs: Vec<crate::accounting::LostRun>,
    pub violations: Vec<String>,
    pub ok: bool,
}

/// Runs the chaos test; `Err` if it could not be carried out (not a violation).
pub async fn run(o: ChaosOptions) -> Result<ChaosReport, String> {
    let profile = Profile::new(o.profile, o.duration);
    let bins = cluster::binaries(o.bin_dir.as_deref())?;
    let started = Instant::now();
    let started_at_ns = crate::payload::now_ns();
    let handle = tokio::runtime::Handle::current();
    let (proxies, shards) = (profile.proxies, profile.shards);
    let kind = match o.redis {
        RedisChoice::Standalone => RedisKind::Standalone,
        RedisChoice::Cluster => RedisKind::Cluster,
    };
    let cluster = tokio::task::spawn_blocking(move || ChaosCluster::start(&bins, kind, shards, proxies, &handle))
        .await
        .map_err(|e| format!("starting the cluster: {e}"))??;
    let mqtt: Vec<std::net::SocketAddr> = cluster.proxies.iter().map(|p| p.mqtt).collect();
    let token = cluster.token.clone();
    let targets = nemesis::Targets { proxies, shards, redis: cluster.redis.servers() };
    let redis_desc = match o.redis {
        RedisChoice::Standalone => "Redis standalone".to_string(),
        RedisChoice::Cluster => format!("a Redis Cluster of {} masters", targets.redis),
    };
    let cluster = Arc::new(Mutex::new(cluster));
    eprintln!("chaos: {proxies} proxies, {shards} shards, {redis_desc} (AOF always) up in {:.1} s", started.elapsed().as_secs_f64());

    // Observers first: the will watcher must be subscribed before any will can fire.
    let stop_observers = CancellationToken::new();
    let wills = Arc::new(Mutex::new(WillBook::default()));
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let watcher = tokio::spawn(observers::will_watcher(mqtt.clone(), started, wills.clone(), subscribed.clone(), stop_observers.clone()));
    tokio::time::timeout(Duration::from_secs(30), subscribed.notified())
        .await
        .map_err(|_| "the will watcher could not subscribe".to_string())?;
    let stop_wills = CancellationToken::new();
    let will_clients =
        tokio::spawn(observers::will_clients(mqtt.clone(), profile.will_clients, o.seed, started, wills.clone(), stop_wills.clone()));
    let connections = Arc::new(Mutex::new(ConnectionBook::default()));
    let sampler = tokio::spawn(observers::sample_connections(
        cluster.clone(),
        token,
        Duration::from_secs(1),
        started,
        connections.clone(),
        stop_observers.clone(),
    ));

    // The swarm.
    let names = Names {
        client_id: "chaos-%s-%i".into(),
        username: None,
        run_id: format!("{:x}", o.seed),
        sub_qos: QoS::ExactlyOnce,
        persistent: true,
    };
    let plan = build::pairs(&names, profile.pairs, "chaos/pairs/%i");
    let settings = Settings {
        targets: mqtt.iter().map(|a| format!("mqtt://{a}").parse().expect("an address is a target")).collect(),
        tls: None,
        sources: Vec::new(),
        protocol: Protocol::V5,
        keep_alive: 10,
        connect_timeout: Duration::from_secs(3),
        password: None,
        connect_rate: 0.0,
        connect_inflight: 100,
        qos: QosMix::parse(&profile.qos_mix, o.seed)?,
        payload_size: 64,
        shape: Shape::default(),
        pace: Pace::Rate(profile.rate),
        duration: Duration::from_secs(profile.window_s),
        drain: Duration::from_secs(60),
        offline: Duration::from_secs(1),
        broker_pid: None,
        progress: !o.quiet,
        retry_connect: true,
    };
    let mut echo = BTreeMap::new();
    echo.insert("profile".to_string(), serde_json::to_value(&profile).unwrap_or_default());
    let swarm = tokio::spawn(crate::scenario::run(plan, settings, echo));

    // The nemesis, then the time to full service after its last fault.
    let fault_window = Duration::from_secs(profile.window_s - profile.lead_s - profile.tail_s);
    let kinds = if o.faults.is_empty() { Kind::ALL.to_vec() } else { o.faults.clone() };
    let faults = nemesis::plan(o.seed, &kinds, fault_window, profile.gap_ms, targets);
    let faults_start = Instant::now() + Duration::from_secs(profile.lead_s);
    let timeline = nemesis::play(cluster.clone(), faults, faults_start, started, CancellationToken::new()).await;
    let recovery = observers::recovery(&mqtt, RECOVERY_LIMIT).await;
    eprintln!("chaos: faults over; full service again after {recovery:?} s");

    let report: Report = swarm.await.map_err(|e| format!("the swarm failed: {e}"))?;
    stop_wills.cancel();
    let _ = will_clients.await;
    // Wills of connections that just ended: the proxies publish them at once.
    let settle = Instant::now() + Duration::from_secs(20);
    while Instant::now() < settle && !wills.lock().expect("will book").violations().is_empty() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_observers.cancel();
    let _ = tokio::join!(watcher, sampler);

    let mut violations = report.verdict.reasons.clone();
    for q in ["qos1", "qos2"] {
        if let Some(m) = report.messages.get(q) {
            if m.reordered > 0 {
                violations.push(format!("{} {q} messages arrived out of their publisher's order", m.reordered));
            }
        }
    }
    if let Some(n) = report.errors.get("session_lost").filter(|n| **n > 0) {
        violations.push(format!("{n} reconnects of persistent sessions found no session (Session Present 0)"));
    }
    let w = wills.lock().expect("will book");
    violations.extend(w.violations());
    let c = connections.lock().expect("connection book");
    violations.extend(c.violations.iter().cloned());
    if recovery.is_none() {
        violations.push(format!("not every proxy served a QoS 1 round trip within {RECOVERY_LIMIT:?} of the last fault"));
    }
    let mut faults_by_kind = BTreeMap::new();
    for h in &timeline {
        *faults_by_kind.entry(h.kind).or_insert(0) += 1;
    }
    let checked = ["qos1", "qos2"].iter().filter_map(|q| report.messages.get(*q)).map(|m| m.acknowledged).sum();
    let process_counters = cluster.lock().map(|c| c.counters()).unwrap_or_default();
    let ok = violations.is_empty();
    if let Ok(c) = cluster.lock() {
        if !ok {
            eprintln!("{}", c.logs(40));
        }
        if let Some(dir) = &o.logs {
            c.write_logs(dir)?;
        }
    }
    Ok(ChaosReport {
        schema: 1,
        profile,
        seed: o.seed,
        duration_s: started.elapsed().as_secs_f64(),
        started_at_ns,
        cluster: format!("{proxies} proxies, {shards} shards behind relays, {redis_desc} with appendfsync always"),
        faults: faults_by_kind,
        timeline,
        messages: report.messages.clone(),
        messages_checked: checked,
        wills_expected: w.expected.len(),
        wills_after_clean_disconnect: w.clean.iter().filter(|p| w.arrived.contains_key(*p)).count(),
        wills_arrived: w.arrived.len(),
        connection_samples: c.samples,
        recovery_s: recovery,
        recovery_limit_s: RECOVERY_LIMIT.as_secs(),
        client_errors: report.errors.clone(),
        process_counters,
        lost_examples: report.lost_examples.clone(),
        reorder_examples: report.reorder_examples.clone(),
        lost_runs: report.lost_runs.clone(),
        violations,
        ok,
    })
}

impl ChaosReport {
    /// What a person reads at the end of a run.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "\nchaos ({:?}, seed {}) — {:.0} s, {}", self.profile.name, self.seed, self.duration_s, self.cluster);
        let _ = writeln!(s, "faults: {}", self.faults.iter().map(|(k, n)| format!("{k:?} {n}")).collect::<Vec<_>>().join(", "));
        for (q, m) in &self.messages {
            let _ = writeln!(
                s,
                "{q}: published {} acknowledged {} delivered {} lost {} duplicated {} reordered {}",
                m.published, m.acknowledged, m.delivered, m.lost, m.duplicated, m.reordered
            );
        }
        let _ = writeln!(
            s,
            "wills: {} expected, {} arrived ({} after a clean disconnect whose proxy died); connection samples: {}; recovery: {}",
            self.wills_expected,
            self.wills_arrived,
            self.wills_after_clean_disconnect,
            self.connection_samples,
            self.recovery_s.map_or("none".into(), |r| format!("{r:.1} s"))
        );
        if self.ok {
            let _ = writeln!(s, "no violation: {} acknowledged QoS 1/2 messages checked", self.messages_checked);
        } else {
            let _ = writeln!(s, "VIOLATIONS:");
            for v in &self.violations {
                let _ = writeln!(s, "  - {v}");
            }
            for (k, v) in &self.process_counters {
                let _ = writeln!(s, "  {k} = {v}");
            }
            for l in &self.lost_examples {
                let _ = writeln!(s, "  lost: stream {} seq {} (QoS {}) at {}", l.stream, l.seq, l.qos, l.sink);
            }
            for r in &self.lost_runs {
                let sent = r.sent_at_ns.map_or("?".to_string(), |t| format!("{:.1}", t.saturating_sub(self.started_at_ns) as f64 / 1e9));
                let _ = writeln!(
                    s,
                    "  lost run: stream {} seq {}–{} ({} QoS 1/2 copies) at {}, sent from about {sent} s",
                    r.stream, r.first_seq, r.last_seq, r.copies, r.sink
                );
            }
            for r in &self.reorder_examples {
                let sent_s = r.sent_at_ns.saturating_sub(self.started_at_ns) as f64 / 1e9;
                let arrived_s = r.arrived_at_ns.saturating_sub(self.started_at_ns) as f64 / 1e9;
                let dup = if r.dup { ", a resend" } else { "" };
                let _ = writeln!(
                    s,
                    "  reordered: stream {} seq {} (QoS {}, sent at {sent_s:.1} s, arrived at {arrived_s:.1} s{dup}) after seq {} at {}",
                    r.stream, r.seq, r.qos, r.after, r.sink
                );
            }
            let _ = writeln!(s, "fault timeline:");
            for h in &self.timeline {
                let _ = writeln!(s, "  {:>7.1} s – {:>7.1} s  {:?} {}", h.at_s, h.healed_at_s, h.kind, h.target);
            }
        }
        s
    }
}
