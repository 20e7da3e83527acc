//! Live measurements: counters every task updates, latency histograms, and a sampler that
//! turns them into a timeline (one point per second) for the progress line, the report and
//! the chart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::procstat::ProcSampler;

/// Latency histograms hold microseconds from 1 µs to 1 hour with 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// A pair of histograms: since the start, and since the last sample.
pub struct Latency {
    total: Histogram<u64>,
    interval: Histogram<u64>,
}

impl Latency {
    fn new() -> Latency {
        Latency { total: histogram(), interval: histogram() }
    }

    pub fn record_us(&mut self, us: u64) {
        let v = us.clamp(1, 3_600_000_000);
        let _ = self.total.record(v);
        let _ = self.interval.record(v);
    }
}

/// Counters shared by every task of a run.
pub struct Stats {
    pub connect_attempts: AtomicU64,
    pub connected: AtomicI64,
    pub connect_failures: AtomicU64,
    pub published: AtomicU64,
    pub acknowledged: AtomicU64,
    pub delivered: AtomicU64,
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// Publish → deliver latency, by publish QoS.
    pub latency: [Mutex<Latency>; 3],
    pub connect_latency: Mutex<Latency>,
    pub timeline: Mutex<Vec<Sample>>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            connect_attempts: AtomicU64::new(0),
            connected: AtomicI64::new(0),
            connect_failures: AtomicU64::new(0),
            published: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            latency: [Mutex::new(Latency::new()), Mutex::new(Latency::new()), Mutex::new(Latency::new())],
            connect_latency: Mutex::new(Latency::new()),
            timeline: Mutex::new(Vec::new()),
        }
    }
}

impl Stats {
    pub fn error(&self, kind: impl Into<String>) {
        *self.errors.lock().entry(kind.into()).or_insert(0) += 1;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.lock().values().sum()
    }

    pub fn record_delivery(&self, qos: u8, latency_us: u64) {
        self.delivered.fetch_add(1, Relaxed);
        self.latency[usize::from(qos.min(2))].lock().record_us(latency_us);
    }

    /// Percentiles since the start, in milliseconds.
    pub fn percentiles(&self, qos: usize) -> Percentiles {
        Percentiles::of(&self.latency[qos].lock().total)
    }

    pub fn connect_percentiles(&self) -> Percentiles {
        Percentiles::of(&self.connect_latency.lock().total)
    }
}

/// Latency summary in milliseconds, named as the report schema names them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles { count: h.len(), p50: ms(0.5), p90: ms(0.9), p99: ms(0.99), p999: ms(0.999), max: h.max() as f64 / 1000.0 }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Seconds since the start.
    pub t: f64,
    pub connected: i64,
    pub published_per_s: f64,
    pub delivered_per_s: f64,
    pub errors: u64,
    /// Delivery latency over this second (all QoS), ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Broker process, when `--broker-pid` is given.
    pub broker_cpu_percent: Option<f64>,
    pub broker_rss_bytes: Option<u64>,
}

/// Takes a sample every second until stopped.
pub async fn sample_forever(stats: std::sync::Arc<Stats>, broker: Option<std::sync::Arc<Mutex<ProcSampler>>>) {
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_pub, mut last_del, mut last_t) = (0u64, 0u64, 0f64);
    loop {
        tick.tick().await;
        let t = start.elapsed().as_secs_f64();
        let (publ, del) = (stats.published.load(Relaxed), stats.delivered.load(Relaxed));
        let dt = (t - last_t).max(1e-3);
        let mut merged = histogram();
        for l in &stats.latency {
            let mut l = l.lock();
            let _ = merged.add(&l.interval);
            l.interval.reset();
        }
        let p = Percentiles::of(&merged);
        let proc = broker.as_ref().and_then(|b| b.lock().sample());
        stats.timeline.lock().push(Sample {
            t,
            connected: stats.connected.load(Relaxed),
            published_per_s: (publ - last_pub) as f64 / dt,
            delivered_per_s: (del - last_del) as f64 / dt,
            errors: stats.error_count(),
            p50_ms: p.p50,
            p99_ms: p.p99,
            max_ms: p.max,
            broker_cpu_percent: proc.map(|s| s.cpu_percent),
            broker_rss_bytes: proc.map(|s| s.rss_bytes),
        });
        (last_pub, last_del, last_t) = (publ, del, t);
    }
}
