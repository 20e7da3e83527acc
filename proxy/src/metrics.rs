//! Proxy metrics (Prometheus text format on `/metrics`). Client ids never appear in labels.

use mqfleet_ops::metrics::Latencies;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use session_store::KindLabel;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QosLabel {
    pub qos: u8,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// MQTT 5 reason code, e.g. "0x81".
    pub code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: String,
}

#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub connections: Gauge,
    pub connects: Family<CodeLabel, Counter>,
    pub disconnects: Family<ReasonLabel, Counter>,
    pub messages_received: Family<QosLabel, Counter>,
    pub messages_sent: Family<QosLabel, Counter>,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub dropped: Family<ReasonLabel, Counter>,
    /// Persistent sessions whose newer messages had to wait in the store for room in their
    /// connection's queue.
    pub store_backlogs: Counter,
    pub protocol_errors: Family<CodeLabel, Counter>,
    pub persistent_sessions: Gauge,
    pub wills_published: Counter,
    pub sessions_expired: Counter,
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub acl_denied: Family<ReasonLabel, Counter>,
    pub limited: Family<ReasonLabel, Counter>,
    /// Deliveries sent to connected clients and not yet acknowledged.
    pub inflight: Gauge,
    /// Deliveries waiting at connected clients for room in their in-flight window.
    pub queued: Gauge,
    /// Subscriptions of connected clients.
    pub subscriptions: Gauge,
    /// Single node: messages in the stored session queues (offline sessions' and in-flight).
    pub stored_queued: Gauge,
    /// PUBLISH received → PUBACK/PUBREC sent (QoS 1/2: the shard made it durable), or handed
    /// to the shard (QoS 0).
    pub publish_latency: Latencies<QosLabel>,
    /// Round trips of link requests that have a reply, per shard.
    pub link_latency: Latencies<ShardLabel>,
    /// Link requests awaiting their reply, per shard (sampled each second).
    pub link_awaiting: Family<ShardLabel, Gauge>,
    /// Link requests queued and not yet written, per shard (sampled each second).
    pub link_queued: Family<ShardLabel, Gauge>,
    /// Epoch of the ring this proxy routes by (0: a fixed ring).
    pub ring_epoch: Gauge,
    pub redis_latency: Latencies<KindLabel>,
    /// Redis Cluster connections replaced because their commands had only timed out.
    pub redis_cluster_replaced: Counter,
    /// `$SYS` messages published.
    pub sys_published: Counter,
    /// Times this proxy found itself taken for dead and closed its connections.
    pub fenced: Counter,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mqfleet_proxy");
        r.register("connections", "Open MQTT connections", self.connections.clone());
        r.register("connects", "CONNECT attempts by CONNACK reason code", self.connects.clone());
        r.register("disconnects", "Connections ended, by cause", self.disconnects.clone());
        r.register("messages_received", "PUBLISH packets received from clients, by QoS", self.messages_received.clone());
        r.register("messages_sent", "PUBLISH packets sent to clients, by QoS", self.messages_sent.clone());
        r.register("received_bytes", "Bytes read from client sockets", self.bytes_received.clone());
        r.register("sent_bytes", "Bytes written to client sockets", self.bytes_sent.clone());
        r.register("dropped_messages", "Messages not delivered to a client, by reason", self.dropped.clone());
        r.register(
            "store_backlogs",
            "Times a persistent session's messages outran its connection's queue and waited in the session store, read back in order",
            self.store_backlogs.clone(),
        );
        r.register("protocol_errors", "Connections closed for bad input, by MQTT 5 reason code", self.protocol_errors.clone());
        r.register("persistent_sessions", "Sessions that outlive their connection (connected or not)", self.persistent_sessions.clone());
        r.register("wills_published", "Will messages published", self.wills_published.clone());
        r.register("sessions_expired", "Persistent sessions removed by expiry", self.sessions_expired.clone());
        r.register("auth_failures", "CONNECTs refused by authentication, by cause", self.auth_failures.clone());
        r.register(
            "limited",
            "Work refused or slowed by a limit: max_connections_per_ip, connect_rate_per_ip, connect_rate (CONNACK), publish_rate (throttled)",
            self.limited.clone(),
        );
        r.register("inflight_messages", "Deliveries sent to connected clients and not yet acknowledged", self.inflight.clone());
        r.register(
            "queued_messages",
            "Deliveries waiting at connected clients for room in their in-flight window (offline queues are in the store)",
            self.queued.clone(),
        );
        r.register("subscriptions", "Subscriptions of connected clients", self.subscriptions.clone());
        r.register(
            "stored_queued_messages",
            "Single node: messages in the stored session queues (offline sessions and unacknowledged deliveries)",
            self.stored_queued.clone(),
        );
        r.register(
            "publish_seconds",
            "PUBLISH received to PUBACK/PUBREC sent (QoS 1/2, after the shard made it durable) or handed to the shard (QoS 0)",
            self.publish_latency.0.clone(),
        );
        r.register("link_request_seconds", "Round trips of link requests to each shard", self.link_latency.0.clone());
        r.register("link_awaiting_reply", "Link requests awaiting the shard's reply", self.link_awaiting.clone());
        r.register("link_queued", "Link requests queued for a shard and not yet sent", self.link_queued.clone());
        r.register("ring_epoch", "Epoch of the ring the proxy routes by (0: a fixed list of shards)", self.ring_epoch.clone());
        r.register("redis_command_seconds", "Round trips to Redis by kind (script, command, pipeline)", self.redis_latency.0.clone());
        r.register(
            "redis_cluster_connections_replaced",
            "Redis Cluster connections replaced because their commands had only timed out (a wedged client, or every node unreachable)",
            self.redis_cluster_replaced.clone(),
        );
        r.register("sys_messages_published", "$SYS messages published", self.sys_published.clone());
        r.register(
            "fenced",
            "Times this proxy found it was taken for dead (paused or cut off from Redis past dead_after) and closed its connections",
            self.fenced.clone(),
        );
        r.register(
            "acl_denied",
            "Actions refused by the ACL: publish, subscribe, will, revoked (subscriptions removed on reload)",
            self.acl_denied.clone(),
        );
    }

    /// The PUBLISH latency histograms by QoS, for a connection to keep: looking them up in the
    /// family (a lock and a hash) per message is work the hot path need not do.
    pub fn publish_latency_by_qos(&self) -> [Histogram; 3] {
        [0u8, 1, 2].map(|qos| self.publish_latency.get_or_create(&QosLabel { qos }).clone())
    }

    pub fn drop(&self, reason: &'static str) {
        self.dropped.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn code(code: mqfleet_codec::ReasonCode) -> CodeLabel {
        CodeLabel { code: format!("0x{:02X}", code as u8) }
    }
}

/// Every second: the links' queue gauges and the ring epoch, and latency histograms attached
/// to links made since (a shard that joined). Holds the context weakly; ends with `stop`.
pub async fn sample(ctx: std::sync::Weak<crate::Context>, stop: tokio_util::sync::CancellationToken) {
    let mut shown: Vec<ShardLabel> = Vec::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some(ctx) = ctx.upgrade() else { return };
        let m = &ctx.metrics;
        let topology = ctx.shards.now();
        m.ring_epoch.set(topology.epoch as i64);
        let labels: Vec<ShardLabel> = topology.keys().iter().map(|k| ShardLabel { shard: k.clone() }).collect();
        for (label, link) in labels.iter().zip(topology.links()) {
            link.observe_latency(m.link_latency.get_or_create(label).clone());
            m.link_awaiting.get_or_create(label).set(link.awaiting_reply() as i64);
            m.link_queued.get_or_create(label).set(link.queued() as i64);
        }
        for gone in shown.iter().filter(|l| !labels.contains(l)) {
            m.link_awaiting.remove(gone);
            m.link_queued.remove(gone);
        }
        shown = labels;
    }
}
