//! `$SYS` topics: this proxy's statistics, published every `sys_interval_ms` as retained QoS 0
//! messages that expire after three intervals (so a stopped proxy's figures disappear).
//!
//! Single node: `$SYS/broker/…`, the names Mosquitto uses, so existing dashboards and MQTT
//! Explorer find them. Cluster: `$SYS/broker/proxies/{proxy id}/…`, one subtree per proxy.
//! Wildcards at the first level never match `$` topics [MQTT-4.7.2-1], and the ACL grants
//! them only through rules that name them: by default only privileged clients read them.

use std::sync::{Arc, Weak};
use std::time::Duration;

use broker_shard::link::Request;
use broker_shard::{now_ms, Message};
use mqfleet_codec::topic::validate_topic_name;
use mqfleet_codec::{Publish, QoS};
use tokio_util::sync::CancellationToken;

use crate::metrics::QosLabel;
use crate::Context;

/// The `$SYS` subtree of this proxy.
pub fn prefix(ctx: &Context) -> String {
    match &ctx.cluster {
        None => "$SYS/broker".into(),
        Some(c) => format!("$SYS/broker/proxies/{}", c.id),
    }
}

/// (topic suffix, value) pairs, as of now.
fn figures(ctx: &Context) -> Vec<(&'static str, String)> {
    let m = &ctx.metrics;
    let sum = |f: &prometheus_client::metrics::family::Family<QosLabel, prometheus_client::metrics::counter::Counter>| {
        (0..=2u8).map(|qos| f.get_or_create(&QosLabel { qos }).get()).sum::<u64>()
    };
    vec![
        ("version", format!("mqfleet {}", env!("CARGO_PKG_VERSION"))),
        ("uptime", format!("{} seconds", now_ms().saturating_sub(ctx.started_at_ms) / 1000)),
        ("clients/connected", ctx.registry.len().to_string()),
        ("messages/received", sum(&m.messages_received).to_string()),
        ("messages/sent", sum(&m.messages_sent).to_string()),
        ("messages/inflight", m.inflight.get().to_string()),
        ("bytes/received", m.bytes_received.get().to_string()),
        ("bytes/sent", m.bytes_sent.get().to_string()),
        ("subscriptions/count", m.subscriptions.get().to_string()),
    ]
}

/// Publishes the figures every `every` until `stop`.
pub async fn publish_every(ctx: Weak<Context>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some(ctx) = ctx.upgrade() else { return };
        publish_once(&ctx, every).await;
    }
}

async fn publish_once(ctx: &Arc<Context>, every: Duration) {
    let prefix = prefix(ctx);
    let expiry = u32::try_from(every.as_secs().saturating_mul(3).max(1)).unwrap_or(u32::MAX);
    for (suffix, value) in figures(ctx) {
        let topic = format!("{prefix}/{suffix}");
        if let Err(e) = validate_topic_name(&topic, &ctx.limits.topic) {
            tracing::warn!(topic, error = %e, "$SYS topic not published: the proxy id makes it invalid");
            return;
        }
        let mut p = Publish::new(topic.as_str(), QoS::AtMostOnce, value.into_bytes(), None);
        p.retain = true;
        p.properties.message_expiry_interval = Some(expiry);
        let message = Arc::new(Message::from_publish(p, None, now_ms()));
        let _gate = ctx.shards.publish_gate().await;
        let link = ctx.shards.now().owner(&message.topic).clone();
        match link.send(Request::Publish { id: None, message, marker: None }).await {
            Ok(()) => {
                ctx.metrics.sys_published.inc();
            }
            Err(e) => tracing::debug!(topic, error = %e, "$SYS message not published"),
        }
    }
}
