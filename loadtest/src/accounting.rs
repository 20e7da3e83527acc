//! Proof of delivery: what publishers sent and had acknowledged, what each sink received, and
//! the verdict per message — delivered, lost, duplicated, reordered.
//!
//! # Model
//! - A **stream** is one publisher's sequence of messages on one topic, numbered from 0.
//! - A **sink** is where a stream's messages must all arrive: one subscriber, or one shared
//!   subscription group (a message must reach exactly one member).
//! - A message is **expected** at a sink when it was sent with QoS 0, or acknowledged by the
//!   broker (PUBACK/PUBCOMP) with QoS 1/2. An expected message that never arrives is **lost**;
//!   for QoS 1/2 that is a broken promise and fails the run. A QoS 1/2 message the broker never
//!   acknowledged is **unconfirmed** unless it arrived.
//! - An arrival of a sequence number already received is a **duplicate** (allowed for QoS 1);
//!   an arrival below the highest already received in its stream is **reordered**.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::payload::Header;

/// A growable bitset indexed by sequence number.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; returns whether it was already set.
    pub fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        was
    }

    pub fn get(&self, i: u64) -> bool {
        self.0.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Bits set in both.
    pub fn overlap(&self, other: &Bits) -> u64 {
        self.0.iter().zip(&other.0).map(|(a, b)| u64::from((a & b).count_ones())).sum()
    }

    pub fn union(&mut self, other: &Bits) {
        if other.0.len() > self.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
}

/// Which QoS each message is published with: a weighted mix, decided by a hash of
/// (seed, stream, seq) so that every party computes the same answer without sharing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosMix {
    /// Relative weights of QoS 0, 1, 2.
    pub weights: [u32; 3],
    pub seed: u64,
}

impl QosMix {
    pub fn single(qos: u8) -> QosMix {
        let mut weights = [0; 3];
        weights[usize::from(qos.min(2))] = 1;
        QosMix { weights, seed: 0 }
    }

    /// Parses `1` or a mix like `0:50,1:40,2:10`.
    pub fn parse(s: &str, seed: u64) -> Result<QosMix, String> {
        if let Ok(q) = s.parse::<u8>() {
            return if q <= 2 { Ok(QosMix::single(q)) } else { Err(format!("QoS {q} does not exist")) };
        }
        let mut weights = [0u32; 3];
        for part in s.split(',') {
            let (q, w) = part.split_once(':').ok_or_else(|| format!("{part:?}: expected QOS:WEIGHT"))?;
            let q: usize = q.trim().parse().ok().filter(|q| *q <= 2).ok_or_else(|| format!("{q:?} is not a QoS"))?;
            weights[q] = w.trim().parse().map_err(|_| format!("{w:?} is not a weight"))?;
        }
        if weights.iter().all(|w| *w == 0) {
            return Err("every weight is 0".into());
        }
        Ok(QosMix { weights, seed })
    }

    pub fn qos_for(&self, stream: u32, seq: u64) -> u8 {
        let total: u32 = self.weights.iter().sum();
        let nonzero = self.weights.iter().filter(|w| **w > 0).count();
        if nonzero == 1 {
            return self.weights.iter().position(|w| *w > 0).unwrap_or(0) as u8;
        }
        // splitmix64 of the triple.
        let mut x = self.seed ^ (u64::from(stream) << 40) ^ seq;
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let mut pick = (x % u64::from(total)) as u32;
        for (q, w) in self.weights.iter().enumerate() {
            if pick < *w {
                return q as u8;
            }
            pick -= w;
        }
        2
    }
}

/// What one publisher did on one stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamLedger {
    /// Messages sent: sequence numbers `0..sent`.
    pub sent: u64,
    /// Sequence numbers the broker acknowledged (QoS 1/2).
    pub acked: Bits,
    /// The send time (ns) of every [`CLOCK_EVERY`]-th sequence number, in order: when a lost
    /// message left, about, to set it against the fault timeline.
    #[serde(default)]
    pub clock: Vec<(u64, u64)>,
}

/// How often a stream's send time is written down (see [`StreamLedger::clock`]).
pub const CLOCK_EVERY: u64 = 16;

impl StreamLedger {
    /// Notes that `seq` was sent at `sent_at_ns`.
    pub fn sent(&mut self, seq: u64, sent_at_ns: u64) {
        self.sent = self.sent.max(seq + 1);
        if seq.is_multiple_of(CLOCK_EVERY) {
            self.clock.push((seq, sent_at_ns));
        }
    }

    /// About when `seq` was sent: the last clock mark at or before it.
    pub fn sent_at(&self, seq: u64) -> Option<u64> {
        let i = self.clock.partition_point(|&(s, _)| s <= seq);
        i.checked_sub(1).map(|i| self.clock[i].1)
    }
}

/// Everything published, by stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub streams: BTreeMap<u32, StreamLedger>,
}

impl Ledger {
    pub fn merge(&mut self, other: Ledger) {
        for (id, s) in other.streams {
            let e = self.streams.entry(id).or_default();
            e.sent = e.sent.max(s.sent);
            e.acked.union(&s.acked);
            e.clock.extend(s.clock);
            e.clock.sort_unstable();
            e.clock.dedup_by_key(|&mut (seq, _)| seq);
        }
    }
}

/// How an arrival counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    New,
    Duplicate,
    /// New, but below the highest sequence number already received in its stream.
    Reordered,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Received {
    pub bits: Bits,
    /// Highest sequence number received, by publish QoS: MQTT orders messages per topic and
    /// QoS (MQTT-4.6.0-6), so a QoS 1 message may overtake a QoS 0 one and that is no reorder.
    pub max: [Option<u64>; 3],
    /// By publish QoS.
    pub duplicated: [u64; 3],
    pub reordered: [u64; 3],
}

/// Arrivals at one subscriber (or one member of a shared group).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tracker {
    pub streams: HashMap<u32, Received>,
    /// Payloads this tool did not make.
    pub foreign: u64,
    /// The first reordered arrivals (up to [`REORDER_EXAMPLES`]), to find them in the logs.
    #[serde(default)]
    pub reorders: Vec<Reorder>,
}

/// How many reordered arrivals a tracker keeps as examples.
pub const REORDER_EXAMPLES: usize = 20;

/// One arrival below the highest sequence number already received in its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reorder {
    /// The sink's name (filled in by [`tally`]).
    #[serde(default)]
    pub sink: String,
    pub stream: u32,
    pub seq: u64,
    pub qos: u8,
    /// The highest sequence number of the same QoS received before it.
    pub after: u64,
    /// When it was sent (the payload's send time, ns since the Unix epoch).
    pub sent_at_ns: u64,
    /// When it arrived (ns since the Unix epoch; 0 if not recorded).
    #[serde(default)]
    pub arrived_at_ns: u64,
    /// It came as a resend (DUP set): from a session resumed after a lost connection.
    #[serde(default)]
    pub dup: bool,
}

impl Tracker {
    pub fn record(&mut self, h: &Header) -> Arrival {
        self.record_arrival(h, false, 0)
    }

    /// Records an arrival with how it came: `dup` as the PUBLISH's DUP flag, at `arrived_at_ns`.
    pub fn record_arrival(&mut self, h: &Header, dup: bool, arrived_at_ns: u64) -> Arrival {
        let r = self.streams.entry(h.stream).or_default();
        let q = usize::from(h.qos.min(2));
        if r.bits.set(h.seq) {
            r.duplicated[q] += 1;
            return Arrival::Duplicate;
        }
        let after = r.max[q].filter(|m| h.seq < *m);
        r.max[q] = Some(r.max[q].map_or(h.seq, |m| m.max(h.seq)));
        if let Some(after) = after {
            r.reordered[q] += 1;
            if self.reorders.len() < REORDER_EXAMPLES {
                let (stream, seq, qos, sent_at_ns) = (h.stream, h.seq, h.qos, h.sent_at_ns);
                self.reorders.push(Reorder { sink: String::new(), stream, seq, qos, after, sent_at_ns, arrived_at_ns, dup });
            }
            Arrival::Reordered
        } else {
            Arrival::New
        }
    }

    /// Merges the trackers of a shared group's members into the group's: a sequence number
    /// received by two members is a duplicate; order is not promised across members.
    pub fn merge_group(members: Vec<Tracker>) -> Tracker {
        let mut group = Tracker::default();
        for m in members {
            group.foreign += m.foreign;
            for (id, r) in m.streams {
                let g = group.streams.entry(id).or_default();
                let both = g.bits.overlap(&r.bits);
                g.duplicated[1] += both; // attributed to QoS 1, the only level allowed to duplicate
                g.bits.union(&r.bits);
                for q in 0..3 {
                    g.duplicated[q] += r.duplicated[q];
                }
                for q in 0..3 {
                    g.max[q] = g.max[q].max(r.max[q]);
                }
            }
        }
        group
    }
}

/// A sink and the streams it must receive.
pub struct Sink {
    pub name: String,
    pub tracker: Tracker,
    pub expects: Vec<u32>,
}

/// Counts for one QoS level, as they appear in the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosCounts {
    pub published: u64,
    pub acknowledged: u64,
    /// Copies that had to arrive (per sink).
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// QoS 1/2 copies neither acknowledged to the publisher nor delivered.
    pub unconfirmed: u64,
}

/// One lost copy, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostCopy {
    pub sink: String,
    pub stream: u32,
    pub seq: u64,
    pub qos: u8,
}

/// Lost QoS 1/2 copies of one stream at one sink, close together: losses come in runs around a
/// fault, and a run is what to look for in the logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRun {
    pub sink: String,
    pub stream: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub copies: u64,
    /// About when its first message was sent (see [`StreamLedger::sent_at`]).
    pub sent_at_ns: Option<u64>,
}

/// Lost copies further apart than this (in sequence numbers) start a new run.
const RUN_GAP: u64 = 20;
/// Runs kept in the tally, the earliest first.
pub const LOST_RUNS: usize = 40;

/// The verdict over everything.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tally {
    pub by_qos: [QosCounts; 3],
    /// Up to 20 lost copies, QoS 1/2 first.
    pub lost_examples: Vec<LostCopy>,
    /// Up to 20 reordered arrivals, QoS 1/2 first.
    pub reorder_examples: Vec<Reorder>,
    /// QoS 1/2 losses in runs, the earliest first (up to [`LOST_RUNS`]).
    pub lost_runs: Vec<LostRun>,
    pub foreign: u64,
}

impl Tally {
    pub fn lost_qos12(&self) -> u64 {
        self.by_qos[1].lost + self.by_qos[2].lost
    }
}

pub fn tally(ledger: &Ledger, sinks: &[Sink], mix: &QosMix) -> Tally {
    let mut t = Tally::default();
    for (id, s) in &ledger.streams {
        for seq in 0..s.sent {
            let q = usize::from(mix.qos_for(*id, seq));
            t.by_qos[q].published += 1;
            if q > 0 && s.acked.get(seq) {
                t.by_qos[q].acknowledged += 1;
            }
        }
    }
    let empty = StreamLedger::default();
    let mut lost = Vec::new();
    let mut runs: Vec<LostRun> = Vec::new();
    let mut reorders = Vec::new();
    for sink in sinks {
        t.foreign += sink.tracker.foreign;
        reorders.extend(sink.tracker.reorders.iter().map(|r| Reorder { sink: sink.name.clone(), ..r.clone() }));
        for id in &sink.expects {
            let s = ledger.streams.get(id).unwrap_or(&empty);
            let r = sink.tracker.streams.get(id);
            for seq in 0..s.sent {
                let q = mix.qos_for(*id, seq);
                let c = &mut t.by_qos[usize::from(q)];
                let arrived = r.is_some_and(|r| r.bits.get(seq));
                let promised = q == 0 || s.acked.get(seq);
                match (promised, arrived) {
                    (true, true) | (false, true) => {
                        c.delivered += 1;
                        c.expected += u64::from(promised);
                    }
                    (true, false) => {
                        c.expected += 1;
                        c.lost += 1;
                        lost.push(LostCopy { sink: sink.name.clone(), stream: *id, seq, qos: q });
                        if q > 0 {
                            match runs.last_mut() {
                                Some(r) if r.sink == sink.name && r.stream == *id && seq - r.last_seq <= RUN_GAP => {
                                    r.last_seq = seq;
                                    r.copies += 1;
                                }
                                _ => runs.push(LostRun {
                                    sink: sink.name.clone(),
                                    stream: *id,
                                    first_seq: seq,
                                    last_seq: seq,
                                    copies: 1,
                                    sent_at_ns: s.sent_at(seq),
                                }),
                            }
                        }
                    }
                    (false, false) => c.unconfirmed += 1,
                }
            }
            if let Some(r) = r {
                for q in 0..3 {
                    t.by_qos[q].duplicated += r.duplicated[q];
                    t.by_qos[q].reordered += r.reordered[q];
                }
            }
        }
    }
    lost.sort_by_key(|l| (l.qos == 0, l.stream, l.seq));
    lost.truncate(20);
    t.lost_examples = lost;
    reorders.sort_by_key(|r| (r.qos == 0, r.sent_at_ns));
    reorders.truncate(REORDER_EXAMPLES);
    t.reorder_examples = reorders;
    runs.sort_by_key(|r| (r.sent_at_ns, r.stream, r.first_seq));
    runs.truncate(LOST_RUNS);
    t.lost_runs = runs;
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(stream: u32, seq: u64, qos: u8) -> Header {
        Header { qos, stream, seq, sent_at_ns: 0 }
    }

    fn ledger(stream: u32, sent: u64, acked: &[u64]) -> Ledger {
        let mut s = StreamLedger { sent, ..StreamLedger::default() };
        for a in acked {
            s.acked.set(*a);
        }
        let mut l = Ledger::default();
        l.streams.insert(stream, s);
        l
    }

    #[test]
    fn exact_counts_for_a_clean_run() {
        let mut tr = Tracker::default();
        for seq in 0..5 {
            assert_eq!(tr.record(&header(1, seq, 1)), Arrival::New);
        }
        let sinks = [Sink { name: "s".into(), tracker: tr, expects: vec![1] }];
        let t = tally(&ledger(1, 5, &[0, 1, 2, 3, 4]), &sinks, &QosMix::single(1));
        assert_eq!(t.by_qos[1], QosCounts { published: 5, acknowledged: 5, expected: 5, delivered: 5, ..Default::default() });
        assert_eq!(t.lost_qos12(), 0);
    }

    #[test]
    fn loss_duplicates_and_reordering_are_each_counted() {
        let mut tr = Tracker::default();
        for seq in [0, 2, 1, 2, 4] {
            tr.record(&header(1, seq, 1));
        }
        let sinks = [Sink { name: "s".into(), tracker: tr, expects: vec![1] }];
        let t = tally(&ledger(1, 5, &[0, 1, 2, 3, 4]), &sinks, &QosMix::single(1));
        let c = t.by_qos[1];
        assert_eq!((c.delivered, c.lost, c.duplicated, c.reordered), (4, 1, 1, 1));
        assert_eq!(t.lost_examples, vec![LostCopy { sink: "s".into(), stream: 1, seq: 3, qos: 1 }]);
    }

    #[test]
    fn order_is_judged_within_a_qos_level_as_mqtt_promises_it() {
        let mut tr = Tracker::default();
        // A QoS 1 message overtaking QoS 0 ones is allowed (MQTT-4.6.0-6: per topic and QoS).
        assert_eq!(tr.record(&header(1, 5, 1)), Arrival::New);
        assert_eq!(tr.record(&header(1, 3, 0)), Arrival::New);
        assert_eq!(tr.record(&header(1, 4, 2)), Arrival::New);
        // Within QoS 1 it is a reorder.
        assert_eq!(tr.record(&header(1, 2, 1)), Arrival::Reordered);
        // Kept as an example, with what it came after, and named by its sink in the tally.
        let example = Reorder { sink: String::new(), stream: 1, seq: 2, qos: 1, after: 5, sent_at_ns: 0, arrived_at_ns: 0, dup: false };
        assert_eq!(tr.reorders, vec![example.clone()]);
        let sinks = [Sink { name: "s".into(), tracker: tr, expects: vec![1] }];
        let t = tally(&ledger(1, 6, &[2, 4, 5]), &sinks, &QosMix::single(1));
        assert_eq!(t.reorder_examples, vec![Reorder { sink: "s".into(), ..example }]);
    }

    #[test]
    fn losses_are_grouped_into_runs_with_about_when_they_were_sent() {
        let mut l = Ledger::default();
        let s = l.streams.entry(1).or_default();
        for seq in 0..200 {
            s.sent(seq, 1_000 * seq);
            s.acked.set(seq);
        }
        let mut tr = Tracker::default();
        let lost = |seq: u64| (40..=50).contains(&seq) || seq == 60 || (150..=151).contains(&seq);
        for seq in (0..200).filter(|&s| !lost(s)) {
            tr.record(&header(1, seq, 1));
        }
        let sinks = [Sink { name: "s".into(), tracker: tr, expects: vec![1] }];
        let t = tally(&l, &sinks, &QosMix::single(1));
        let runs: Vec<(u64, u64, u64, Option<u64>)> =
            t.lost_runs.iter().map(|r| (r.first_seq, r.last_seq, r.copies, r.sent_at_ns)).collect();
        // 40..=50 and 60 are within the gap of each other; 150 starts a run. Clock marks every
        // 16th sequence number: 32 and 144.
        assert_eq!(runs, [(40, 60, 12, Some(32_000)), (150, 151, 2, Some(144_000))]);
    }

    #[test]
    fn unacknowledged_qos1_that_never_arrived_is_unconfirmed_not_lost() {
        let sinks = [Sink { name: "s".into(), tracker: Tracker::default(), expects: vec![1] }];
        let t = tally(&ledger(1, 2, &[]), &sinks, &QosMix::single(1));
        assert_eq!((t.by_qos[1].lost, t.by_qos[1].unconfirmed), (0, 2));
    }

    #[test]
    fn qos0_loss_is_reported_but_not_a_broken_promise() {
        let sinks = [Sink { name: "s".into(), tracker: Tracker::default(), expects: vec![1] }];
        let t = tally(&ledger(1, 3, &[]), &sinks, &QosMix::single(0));
        assert_eq!(t.by_qos[0].lost, 3);
        assert_eq!(t.lost_qos12(), 0);
    }

    #[test]
    fn shared_group_counts_a_copy_at_two_members_as_duplicate() {
        let mut a = Tracker::default();
        let mut b = Tracker::default();
        a.record(&header(1, 0, 1));
        b.record(&header(1, 1, 1));
        b.record(&header(1, 0, 1));
        let group = Tracker::merge_group(vec![a, b]);
        let sinks = [Sink { name: "g".into(), tracker: group, expects: vec![1] }];
        let t = tally(&ledger(1, 2, &[0, 1]), &sinks, &QosMix::single(1));
        assert_eq!((t.by_qos[1].delivered, t.by_qos[1].duplicated), (2, 1));
    }

    #[test]
    fn qos_mix_is_deterministic_and_follows_the_weights() {
        let mix = QosMix::parse("0:50,1:40,2:10", 7).unwrap();
        let mut n = [0u32; 3];
        for seq in 0..10_000 {
            let q = mix.qos_for(3, seq);
            assert_eq!(q, mix.qos_for(3, seq));
            n[q as usize] += 1;
        }
        assert!((4500..5500).contains(&n[0]) && (3500..4500).contains(&n[1]) && (700..1300).contains(&n[2]), "{n:?}");
        assert!(QosMix::parse("3", 0).is_err());
        assert!(QosMix::parse("0:0", 0).is_err());
    }
}
