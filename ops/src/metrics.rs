//! Metric kinds every mqfleet process uses alike.

use std::ops::Deref;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// A latency histogram in seconds, buckets from 50 µs to ~1.6 s, doubling: a loopback round
/// trip and a stalled disk both land in a bucket of their own.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// A family of [`latency_histogram`]s by label; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Latencies<L: Clone + std::hash::Hash + Eq>(pub Family<L, Histogram, fn() -> Histogram>);

impl<L: Clone + std::hash::Hash + Eq> Default for Latencies<L> {
    fn default() -> Self {
        Latencies(Family::new_with_constructor(latency_histogram))
    }
}

impl<L: Clone + std::hash::Hash + Eq + EncodeLabelSet> Deref for Latencies<L> {
    type Target = Family<L, Histogram, fn() -> Histogram>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
