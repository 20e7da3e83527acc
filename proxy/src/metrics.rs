//! Proxy metrics (Prometheus text format on `/metrics`). Client ids never appear in labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
    pub protocol_errors: Family<CodeLabel, Counter>,
    pub persistent_sessions: Gauge,
    pub wills_published: Counter,
    pub sessions_expired: Counter,
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub acl_denied: Family<ReasonLabel, Counter>,
    pub limited: Family<ReasonLabel, Counter>,
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
        r.register(
            "acl_denied",
            "Actions refused by the ACL: publish, subscribe, will, revoked (subscriptions removed on reload)",
            self.acl_denied.clone(),
        );
    }

    pub fn drop(&self, reason: &'static str) {
        self.dropped.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn code(code: mqfleet_codec::ReasonCode) -> CodeLabel {
        CodeLabel { code: format!("0x{:02X}", code as u8) }
    }
}
