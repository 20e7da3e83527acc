//! The run's result: a JSON report (`--report FILE`) and the table printed at the end.
//!
//! Schema (stable names; see `tests/report_schema.json`): counts per QoS are `delivered`,
//! `lost`, `duplicated`, `reordered`; latency percentiles are `p50`, `p90`, `p99`, `p999`, `max`
//! (milliseconds).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::accounting::{LostCopy, LostRun, QosCounts, Reorder, Tally};
use crate::stats::{Percentiles, Sample};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Report format version.
    pub schema: u32,
    pub scenario: String,
    pub targets: Vec<String>,
    /// Settings of the run, as given.
    pub settings: BTreeMap<String, serde_json::Value>,
    pub duration_s: f64,
    pub connections: Connections,
    /// Counts by publish QoS: keys `qos0`, `qos1`, `qos2`.
    pub messages: BTreeMap<String, QosCounts>,
    /// Publish → deliver latency by publish QoS, from the intended send time.
    pub latency_ms: BTreeMap<String, Percentiles>,
    pub throughput: Throughput,
    pub errors: BTreeMap<String, u64>,
    pub lost_examples: Vec<LostCopy>,
    #[serde(default)]
    pub reorder_examples: Vec<Reorder>,
    #[serde(default)]
    pub lost_runs: Vec<LostRun>,
    pub broker: Option<BrokerUsage>,
    pub timeline: Vec<Sample>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Connections {
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    pub connect_latency_ms: Percentiles,
    /// Successful connects per second over the connect phase.
    pub rate_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Throughput {
    pub published_per_s: f64,
    pub delivered_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct BrokerUsage {
    pub pid: u32,
    pub cpu_seconds: f64,
    /// CPU time per delivered message, µs.
    pub cpu_us_per_delivery: Option<f64>,
    pub rss_max_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Verdict {
    pub ok: bool,
    pub lost_qos12: u64,
    pub reasons: Vec<String>,
}

pub fn qos_map<T: Clone>(v: &[T; 3]) -> BTreeMap<String, T> {
    (0..3).map(|q| (format!("qos{q}"), v[q].clone())).collect()
}

impl Report {
    /// The verdict: QoS 1/2 loss fails the run; so does a run where nothing connected.
    pub fn judge(tally: &Tally, connections: &Connections, duplicates_fail_qos2: bool) -> Verdict {
        let mut reasons = Vec::new();
        let lost = tally.lost_qos12();
        if lost > 0 {
            reasons.push(format!("{lost} acknowledged QoS 1/2 messages were lost"));
        }
        if duplicates_fail_qos2 && tally.by_qos[2].duplicated > 0 {
            reasons.push(format!("{} QoS 2 messages were delivered more than once", tally.by_qos[2].duplicated));
        }
        if connections.attempted > 0 && connections.connected == 0 {
            reasons.push("no connection succeeded".into());
        }
        Verdict { ok: reasons.is_empty(), lost_qos12: lost, reasons }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "\n{} against {} — {:.1} s", self.scenario, self.targets.join(", "), self.duration_s);
        let c = &self.connections;
        let _ = writeln!(
            s,
            "connections: {} connected of {} ({} failed), {:.0}/s, connect latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
            c.connected, c.attempted, c.failed, c.rate_per_s, c.connect_latency_ms.p50, c.connect_latency_ms.p99, c.connect_latency_ms.max
        );
        let _ = writeln!(
            s,
            "\n{:<5} {:>11} {:>11} {:>11} {:>11} {:>8} {:>10} {:>10} {:>11}",
            "QoS", "published", "expected", "delivered", "lost", "dup", "reordered", "unconf.", "p99 ms"
        );
        for q in 0..3 {
            let key = format!("qos{q}");
            let m = &self.messages[&key];
            if m.published == 0 && m.delivered == 0 {
                continue;
            }
            let l = &self.latency_ms[&key];
            let _ = writeln!(
                s,
                "{:<5} {:>11} {:>11} {:>11} {:>11} {:>8} {:>10} {:>10} {:>11.2}",
                q, m.published, m.expected, m.delivered, m.lost, m.duplicated, m.reordered, m.unconfirmed, l.p99
            );
        }
        let _ = writeln!(s, "\nlatency (ms, from intended send time)   p50      p90      p99    p99.9      max");
        for q in 0..3 {
            let l = &self.latency_ms[&format!("qos{q}")];
            if l.count > 0 {
                let _ = writeln!(
                    s,
                    "  QoS {q} ({:>9} samples)        {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                    l.count, l.p50, l.p90, l.p99, l.p999, l.max
                );
            }
        }
        let _ = writeln!(
            s,
            "\nthroughput: {:.0} published/s, {:.0} delivered/s",
            self.throughput.published_per_s, self.throughput.delivered_per_s
        );
        if let Some(b) = &self.broker {
            let per = b.cpu_us_per_delivery.map(|u| format!(", {u:.2} µs CPU per delivery")).unwrap_or_default();
            let _ =
                writeln!(s, "broker pid {}: {:.2} CPU s{per}, max RSS {:.1} MiB", b.pid, b.cpu_seconds, b.rss_max_bytes as f64 / 1048576.0);
        }
        if !self.errors.is_empty() {
            let e: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = writeln!(s, "errors: {}", e.join(", "));
        }
        for l in self.lost_examples.iter().take(5) {
            let _ = writeln!(s, "lost: stream {} seq {} (QoS {}) at {}", l.stream, l.seq, l.qos, l.sink);
        }
        let _ = writeln!(
            s,
            "\nverdict: {}",
            if self.verdict.ok { "OK".to_string() } else { format!("FAILED — {}", self.verdict.reasons.join("; ")) }
        );
        s
    }
}
