//! Scenarios: who connects, who subscribes to what, who publishes where — and the runner that
//! plays them.
//!
//! Every scenario is a list of [`DeviceSpec`]s plus the sinks that must receive each stream.
//! The runner connects first-phase clients (subscribers), waits until all are subscribed,
//! then starts the second phase (publishers) and lets them publish for the duration; then it
//! waits for in-flight messages to drain, stops everyone, and tallies.

pub mod build;
pub mod device;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use mqfleet_codec::Protocol;
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::accounting::{tally, Ledger, QosMix, Sink, Tracker};
use crate::payload::{now_ns, Shape};
use crate::procstat::ProcSampler;
use crate::report::{qos_map, BrokerUsage, Connections, Report, Throughput};
use crate::stats::{sample_forever, Stats};
use crate::transport::Target;

pub use device::DeviceSpec;

/// How publishers pace themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// Open loop: this many messages per second per stream, on a fixed schedule.
    Rate(f64),
    /// Closed loop: as fast as possible with at most this many messages not yet delivered.
    Window(usize),
}

/// A sink: the clients whose arrivals count together, and the streams they must receive.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    pub name: String,
    /// Indices into the device list; several for a shared subscription group.
    pub members: Vec<usize>,
    pub expects: Vec<u32>,
}

/// A scenario ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub devices: Vec<DeviceSpec>,
    pub sinks: Vec<SinkSpec>,
    /// Number of streams (ids are 0..streams).
    pub streams: usize,
    /// Copies each message must produce (for the closed-loop window).
    pub copies_per_message: u64,
    /// Drop and reconnect this share of the ramped devices every `storm_every` (reconnect storm).
    pub storm: Option<Storm>,
    /// Hold connections this long without publishing (conn and idle scenarios).
    pub hold: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Storm {
    pub percent: f64,
    pub every: Duration,
}

/// Settings shared by every scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    pub targets: Vec<Target>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub sources: Vec<IpAddr>,
    pub protocol: Protocol,
    pub keep_alive: u16,
    pub connect_timeout: Duration,
    pub password: Option<String>,
    /// Connects per second of ramped devices; 0 = no pacing.
    pub connect_rate: f64,
    /// Connection handshakes in flight at once.
    pub connect_inflight: usize,
    pub qos: QosMix,
    pub payload_size: usize,
    pub shape: Shape,
    pub pace: Pace,
    pub duration: Duration,
    /// Longest wait for in-flight messages after publishing stops.
    pub drain: Duration,
    pub offline: Duration,
    pub broker_pid: Option<u32>,
    pub progress: bool,
    /// Devices that cannot connect keep trying (the next target each time) until the run
    /// stops, instead of giving up (fault injection).
    pub retry_connect: bool,
}

/// A one-way gate: clients wait at it until it opens.
#[derive(Default)]
pub struct Gate {
    open: Notify,
    is_open: std::sync::atomic::AtomicBool,
}

impl Gate {
    pub async fn wait(&self) {
        loop {
            let notified = self.open.notified();
            if self.is_open.load(Relaxed) {
                return;
            }
            notified.await;
        }
    }

    fn open(&self) {
        self.is_open.store(true, Relaxed);
        self.open.notify_waiters();
    }
}

/// Counts clients that are ready (or gave up).
#[derive(Default)]
pub struct Barrier {
    arrived: AtomicUsize,
    changed: Notify,
}

impl Barrier {
    pub fn arrive(&self) {
        self.arrived.fetch_add(1, Relaxed);
        self.changed.notify_waiters();
    }

    async fn until(&self, n: usize, stop: &CancellationToken) {
        loop {
            let changed = self.changed.notified();
            if self.arrived.load(Relaxed) >= n || stop.is_cancelled() {
                return;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// What every client task of a run shares.
pub struct RunCtx {
    pub targets: Vec<Target>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub sources: Vec<IpAddr>,
    pub protocol: Protocol,
    pub keep_alive: u16,
    pub connect_timeout: Duration,
    pub password: Option<String>,
    pub qos: QosMix,
    pub payload_size: usize,
    pub shape: Shape,
    pub pace: Pace,
    /// Length of the publishing window.
    pub duration: Duration,
    pub offline: Duration,
    pub stats: Arc<Stats>,
    /// Bounds handshakes in flight.
    pub handshakes: Semaphore,
    /// Opens when every first-phase client is subscribed.
    pub go: Gate,
    pub go_at: Mutex<Instant>,
    /// End of the publishing window, µs after `start`; set when `go` opens.
    publish_until_offset: AtomicU64,
    /// Ends every client.
    pub stop: CancellationToken,
    /// Copies delivered per stream, for the closed-loop window.
    pub delivered: Vec<AtomicU64>,
    pub copies_per_message: u64,
    /// See [`Settings::retry_connect`].
    pub retry_connect: bool,
    start: (Instant, u64),
}

impl RunCtx {
    /// When publishing stops.
    pub fn publish_until(&self) -> Instant {
        self.start.0 + Duration::from_micros(self.publish_until_offset.load(Relaxed))
    }

    /// Wall-clock nanoseconds of a point on the monotonic clock.
    pub fn wall_of(&self, t: Instant) -> u64 {
        let (i0, w0) = self.start;
        if t >= i0 {
            w0 + (t - i0).as_nanos() as u64
        } else {
            w0 - (i0 - t).as_nanos() as u64
        }
    }
}

/// Plays a plan and produces the report.
pub async fn run(plan: Plan, s: Settings, settings_json: std::collections::BTreeMap<String, serde_json::Value>) -> Report {
    let stats = Arc::new(Stats::default());
    let broker = s.broker_pid.map(|pid| Arc::new(Mutex::new(ProcSampler::new(pid))));
    if let Some(b) = &broker {
        b.lock().sample();
    }
    let sampler = tokio::spawn(sample_forever(stats.clone(), broker.clone()));
    let progress = s.progress.then(|| crate::progress::spawn(stats.clone(), plan.name.clone()));

    let started = Instant::now();
    // The publishing window is set when the go gate opens; until then it is far away.
    let ctx = Arc::new(RunCtx {
        targets: s.targets.clone(),
        tls: s.tls.clone(),
        sources: s.sources.clone(),
        protocol: s.protocol,
        keep_alive: s.keep_alive,
        connect_timeout: s.connect_timeout,
        password: s.password.clone(),
        qos: s.qos,
        payload_size: s.payload_size,
        shape: s.shape,
        pace: s.pace,
        duration: s.duration,
        offline: s.offline,
        stats: stats.clone(),
        handshakes: Semaphore::new(s.connect_inflight.max(1)),
        go: Gate::default(),
        go_at: Mutex::new(started),
        publish_until_offset: AtomicU64::new(u64::MAX / 2),
        stop: CancellationToken::new(),
        delivered: (0..plan.streams).map(|_| AtomicU64::new(0)).collect(),
        copies_per_message: plan.copies_per_message,
        retry_connect: s.retry_connect,
        start: (started, now_ns()),
    });

    // Phase 1: subscribers, then phase 2: publishers. Ramped clients are paced.
    let first_ready = Arc::new(Barrier::default());
    let second_ready = Arc::new(Barrier::default());
    let first_count = plan.devices.iter().filter(|d| d.first_phase).count();
    let second_count = plan.devices.len() - first_count;
    let rate = s.connect_rate;
    let storm = plan.storm.is_some();
    let phase = |first: bool| plan.devices.iter().filter(|d| d.first_phase == first).cloned().collect::<Vec<_>>();
    let connect_phase_start = Instant::now();
    let (mut handles, mut storm_handles) = spawn_phase(&ctx, phase(true), rate, storm, &first_ready).await;
    first_ready.until(first_count, &ctx.stop).await;
    *ctx.go_at.lock() = Instant::now();
    let publish_until = Instant::now() + s.duration;
    ctx.publish_until_offset.store((publish_until - started).as_micros() as u64, Relaxed);
    ctx.go.open();
    let (more, more_storm) = spawn_phase(&ctx, phase(false), rate, storm, &second_ready).await;
    handles.extend(more);
    storm_handles.extend(more_storm);
    second_ready.until(second_count, &ctx.stop).await;
    let connect_elapsed = connect_phase_start.elapsed();

    // The publishing window, with reconnect storms if asked.
    let storm_task = plan.storm.map(|storm| {
        let victims = storm_handles.clone();
        let stop = ctx.stop.clone();
        let until = publish_until;
        tokio::spawn(async move {
            let mut round = 0u64;
            while Instant::now() + storm.every < until {
                tokio::select! { () = tokio::time::sleep(storm.every) => {}, () = stop.cancelled() => return }
                let n = ((victims.len() as f64) * storm.percent / 100.0).ceil() as usize;
                // A different slice each round, deterministic for replay.
                for k in 0..n {
                    // Only devices connected right now: an offline one is not dropped twice.
                    victims[(round as usize * n + k) % victims.len()].notify_waiters();
                }
                round += 1;
            }
        })
    });
    if plan.hold > Duration::ZERO {
        tokio::time::sleep(plan.hold).await;
    } else {
        let late = if matches!(s.pace, Pace::Rate(_)) { device::LATE_GRACE } else { Duration::ZERO };
        tokio::time::sleep_until(publish_until + late).await;
    }
    if let Some(t) = storm_task {
        t.abort();
    }
    drain(&ctx, &s).await;
    ctx.stop.cancel();

    let mut outcomes = std::collections::HashMap::new();
    for (index, h) in handles {
        if let Ok(o) = h.await {
            outcomes.insert(index, o);
        }
    }
    sampler.abort();
    if let Some(p) = progress {
        p.finish();
    }
    let duration = started.elapsed();

    let mut ledger = Ledger::default();
    let mut trackers: std::collections::HashMap<usize, Tracker> = std::collections::HashMap::new();
    let mut connected = 0;
    for (i, o) in outcomes {
        ledger.merge(o.ledger);
        connected += u64::from(o.connected);
        trackers.insert(i, o.tracker);
    }
    let sinks: Vec<Sink> = plan
        .sinks
        .iter()
        .map(|s| {
            let members: Vec<Tracker> = s.members.iter().map(|m| trackers.remove(m).unwrap_or_default()).collect();
            let tracker = if members.len() == 1 { members.into_iter().next().unwrap_or_default() } else { Tracker::merge_group(members) };
            Sink { name: s.name.clone(), tracker, expects: s.expects.clone() }
        })
        .collect();
    let t = tally(&ledger, &sinks, &s.qos);

    let connections = Connections {
        attempted: plan.devices.len() as u64,
        connected,
        failed: plan.devices.len() as u64 - connected,
        connect_latency_ms: stats.connect_percentiles(),
        rate_per_s: connected as f64 / connect_elapsed.as_secs_f64().max(1e-3),
    };
    let publish_secs = s.duration.as_secs_f64().max(1e-3);
    let delivered_total: u64 = t.by_qos.iter().map(|c| c.delivered).sum();
    let broker_usage = broker.map(|b| {
        let b = b.lock();
        let cpu = b.cpu_seconds().unwrap_or(0.0);
        BrokerUsage {
            pid: s.broker_pid.unwrap_or(0),
            cpu_seconds: cpu,
            cpu_us_per_delivery: (delivered_total > 0).then(|| cpu * 1e6 / delivered_total as f64),
            rss_max_bytes: b.max_rss,
        }
    });
    let verdict = Report::judge(&t, &connections, true);
    let timeline = stats.timeline.lock().clone();
    let errors = stats.errors.lock().clone();
    Report {
        schema: 1,
        scenario: plan.name,
        targets: s.targets.iter().map(|t| t.to_string()).collect(),
        settings: settings_json,
        duration_s: duration.as_secs_f64(),
        connections,
        messages: qos_map(&t.by_qos),
        latency_ms: qos_map(&[stats.percentiles(0), stats.percentiles(1), stats.percentiles(2)]),
        throughput: Throughput {
            published_per_s: t.by_qos.iter().map(|c| c.published).sum::<u64>() as f64 / publish_secs,
            delivered_per_s: delivered_total as f64 / publish_secs,
        },
        errors,
        lost_examples: t.lost_examples.clone(),
        reorder_examples: t.reorder_examples.clone(),
        lost_runs: t.lost_runs.clone(),
        broker: broker_usage,
        timeline,
        verdict,
    }
}

type Spawned = (Vec<(usize, tokio::task::JoinHandle<device::Outcome>)>, Vec<Arc<Notify>>);

/// Starts one phase's clients; ramped ones at `rate` connects per second.
async fn spawn_phase(ctx: &Arc<RunCtx>, devices: Vec<DeviceSpec>, rate: f64, storm: bool, barrier: &Arc<Barrier>) -> Spawned {
    let t0 = Instant::now();
    let mut ramped = 0usize;
    let mut handles = Vec::with_capacity(devices.len());
    let mut storm_handles = Vec::new();
    for d in devices {
        if d.ramped && rate > 0.0 {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(ramped as f64 / rate)).await;
            ramped += 1;
        }
        if ctx.stop.is_cancelled() {
            barrier.arrive();
            continue;
        }
        let notify = (storm && d.ramped).then(|| Arc::new(Notify::new()));
        if let Some(n) = &notify {
            storm_handles.push(n.clone());
        }
        let index = d.index;
        handles.push((index, tokio::spawn(device::run(ctx.clone(), d, barrier.clone(), notify))));
    }
    (handles, storm_handles)
}

/// Waits until deliveries stop growing (every in-flight message arrived or is lost), at most
/// `s.drain`.
async fn drain(ctx: &RunCtx, s: &Settings) {
    let deadline = Instant::now() + s.drain;
    let mut last = ctx.stats.delivered.load(Relaxed);
    let mut quiet = 0;
    while Instant::now() < deadline && quiet < 5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = ctx.stats.delivered.load(Relaxed);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
}
