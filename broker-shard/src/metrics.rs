//! Shard metrics (Prometheus). Shared by every shard of a process: counters add up, gauges move
//! by deltas.

use mqfleet_ops::metrics::{latency_histogram, Latencies};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use session_store::KindLabel;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone)]
pub struct ShardMetrics {
    /// Messages routed by shards.
    pub messages: Counter,
    /// Copies handed to subscribers (live or queued).
    pub deliveries: Counter,
    /// Copies not delivered, by reason.
    pub dropped: Family<ReasonLabel, Counter>,
    pub subscriptions: Gauge,
    pub retained_messages: Gauge,
    pub retained_refused: Counter,
    /// Durable writes that failed (disk full, I/O error); the publishers were refused.
    pub store_errors: Counter,
    /// Clustered: wills received and not published, because the cluster said another copy of
    /// the same will was published or is another proxy's to publish (each will once).
    pub wills_withheld: Counter,
    /// Clustered: QoS 2 PUBLISHes answered but not routed, because a copy with the same packet
    /// id was accepted already (a resend over a new connection).
    pub qos2_resends: Counter,
    /// Clustered: QoS 1/2 PUBLISHes refused although their own writes succeeded: an earlier
    /// message of the same publisher, in flight with them, was refused (its order), or their
    /// packet id's mark belongs to a refused copy still being given back.
    pub refused_in_order: Counter,
    /// Clustered: accepted QoS 1/2 messages still in the shard's log (not yet queued for every
    /// persistent session or not yet confirmed by every proxy that got them).
    pub log_entries: Gauge,
    /// Clustered: epoch of the ring this shard routes by.
    pub ring_epoch: Gauge,
    /// Durable commits of the shard's own store (message log, retained, subscriptions).
    pub commit_latency: Histogram,
    /// Clustered: round trips to Redis (queueing for persistent sessions, membership).
    pub redis_latency: Latencies<KindLabel>,
    /// Clustered: Redis Cluster connections replaced because their commands had only timed out.
    pub redis_cluster_replaced: Counter,
}

impl Default for ShardMetrics {
    fn default() -> ShardMetrics {
        ShardMetrics {
            messages: Counter::default(),
            deliveries: Counter::default(),
            dropped: Family::default(),
            subscriptions: Gauge::default(),
            retained_messages: Gauge::default(),
            retained_refused: Counter::default(),
            store_errors: Counter::default(),
            wills_withheld: Counter::default(),
            qos2_resends: Counter::default(),
            refused_in_order: Counter::default(),
            log_entries: Gauge::default(),
            ring_epoch: Gauge::default(),
            commit_latency: latency_histogram(),
            redis_latency: Latencies::default(),
            redis_cluster_replaced: Counter::default(),
        }
    }
}

impl ShardMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mqfleet_shard");
        r.register("messages", "Messages routed by the shards", self.messages.clone());
        r.register("deliveries", "Message copies handed to subscribers, live or queued", self.deliveries.clone());
        r.register("dropped_messages", "Message copies not delivered, by reason", self.dropped.clone());
        r.register("subscriptions", "Subscriptions held by the shards", self.subscriptions.clone());
        r.register("retained_messages", "Retained messages held by the shards", self.retained_messages.clone());
        r.register(
            "retained_refused",
            "Retained PUBLISHes refused by max_retained_messages or max_retained_bytes",
            self.retained_refused.clone(),
        );
        r.register("store_errors", "Durable writes that failed; their publishers were refused", self.store_errors.clone());
        r.register(
            "wills_withheld",
            "Wills received and not published: the same will was published already, or is another proxy's to publish",
            self.wills_withheld.clone(),
        );
        r.register(
            "qos2_resends",
            "QoS 2 PUBLISHes answered but not routed: a copy with the same packet id was accepted already",
            self.qos2_resends.clone(),
        );
        r.register(
            "refused_in_order",
            "QoS 1/2 PUBLISHes refused behind a refused message of the same publisher (its order), or for a mark being given back",
            self.refused_in_order.clone(),
        );
        r.register("log_entries", "Accepted QoS 1/2 messages still in the shard's log", self.log_entries.clone());
        r.register("ring_epoch", "Epoch of the ring the shard routes by (clustered)", self.ring_epoch.clone());
        r.register("commit_seconds", "Durable commits of the shard's store (group commit), seconds", self.commit_latency.clone());
        r.register(
            "redis_command_seconds",
            "Round trips to Redis by kind (script, command, pipeline), seconds",
            self.redis_latency.0.clone(),
        );
        r.register(
            "redis_cluster_connections_replaced",
            "Redis Cluster connections replaced because their commands had only timed out (a wedged client, or every node unreachable)",
            self.redis_cluster_replaced.clone(),
        );
    }

    pub fn drop_copies(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.dropped.get_or_create(&ReasonLabel { reason }).inc_by(n);
        }
    }
}
