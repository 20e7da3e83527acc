//! The cluster as this proxy sees it, and draining this proxy.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use broker_shard::link::{Reply, Request, ShardStats};
use futures::future::join_all;
use mqfleet_ops::admin::ApiError;
use serde::Serialize;

use super::ANSWER_WITHIN;
use crate::Context;

#[derive(Debug, Serialize)]
pub(super) struct ClusterView {
    /// `single_node` (embedded store, in-process shards) or `cluster`.
    mode: &'static str,
    proxy: ProxyView,
    /// Cluster: every proxy with a recent heartbeat in Redis, this one included.
    proxies: Vec<String>,
    ring: RingView,
    shards: Vec<ShardView>,
}

#[derive(Debug, Serialize)]
struct ProxyView {
    id: String,
    version: &'static str,
    started_at_ms: u64,
    connections: usize,
    draining: bool,
}

#[derive(Debug, Serialize)]
struct RingView {
    /// 0: a fixed list of shards.
    epoch: u64,
    members: Vec<String>,
    /// A change being prepared: its epoch and members (cluster with `shards = discover`).
    next: Option<(u64, Vec<String>)>,
}

#[derive(Debug, Serialize)]
struct ShardView {
    name: String,
    /// Link requests awaiting the shard's reply / queued for it.
    awaiting_reply: usize,
    queued: usize,
    /// What the shard holds; absent if it did not answer.
    stats: Option<StatsView>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct StatsView {
    sessions: u64,
    subscriptions: u64,
    retained_messages: u64,
    retained_bytes: u64,
    log_entries: u64,
    ring_epoch: u64,
}

impl From<ShardStats> for StatsView {
    fn from(s: ShardStats) -> StatsView {
        StatsView {
            sessions: s.sessions,
            subscriptions: s.subscriptions,
            retained_messages: s.retained_messages,
            retained_bytes: s.retained_bytes,
            log_entries: s.log_entries,
            ring_epoch: s.ring_epoch,
        }
    }
}

pub(super) async fn view(State(ctx): State<Arc<Context>>) -> Result<Json<ClusterView>, ApiError> {
    let topology = ctx.shards.now();
    let shards = join_all(topology.keys().iter().zip(topology.links()).map(|(name, link)| async move {
        let answer = tokio::time::timeout(ANSWER_WITHIN, link.call(|id| Request::Stats { id })).await;
        let (stats, error) = match answer {
            Ok(Ok(Reply::Stats(s))) => (Some(StatsView::from(s)), None),
            Ok(Ok(other)) => (None, Some(format!("unexpected reply {other:?}"))),
            Ok(Err(e)) => (None, Some(e.to_string())),
            Err(_) => (None, Some(format!("no answer within {ANSWER_WITHIN:?}"))),
        };
        ShardView { name: name.clone(), awaiting_reply: link.awaiting_reply(), queued: link.queued(), stats, error }
    }))
    .await;
    let (mode, proxies, ring) = match &ctx.cluster {
        None => ("single_node", Vec::new(), RingView { epoch: 0, members: topology.keys().to_vec(), next: None }),
        Some(c) => {
            let unavailable = |e: session_store::Error| ApiError::unavailable(format!("cannot read the cluster's state from Redis: {e}"));
            let proxies = c.redis.live_proxies(c.dead_after).await.map_err(unavailable)?;
            let ring = if c.dynamic {
                let r = c.redis.ring().await.map_err(unavailable)?;
                RingView { epoch: r.epoch, members: r.members, next: r.next.map(|n| (n.epoch, n.members)) }
            } else {
                RingView { epoch: 0, members: topology.keys().to_vec(), next: None }
            };
            ("cluster", proxies, ring)
        }
    };
    Ok(Json(ClusterView {
        mode,
        proxy: ProxyView {
            id: ctx.name().to_string(),
            version: env!("CARGO_PKG_VERSION"),
            started_at_ms: ctx.started_at_ms,
            connections: ctx.registry.len(),
            draining: ctx.draining.load(Ordering::SeqCst),
        },
        proxies,
        ring,
        shards,
    }))
}

#[derive(Debug, Serialize)]
pub(super) struct DrainView {
    draining: bool,
    /// Clients still connected here.
    connections: usize,
    server_reference: Option<String>,
}

fn drain_view(ctx: &Context) -> DrainView {
    DrainView {
        draining: ctx.draining.load(Ordering::SeqCst),
        connections: ctx.registry.len(),
        server_reference: ctx.server_reference().map(|r| r.to_string()),
    }
}

pub(super) async fn drain_state(State(ctx): State<Arc<Context>>) -> Json<DrainView> {
    Json(drain_view(&ctx))
}

/// How long an API drain may take: it ends when every client is gone or it is cancelled.
const API_DRAIN_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Starts moving clients off this proxy, as SIGTERM does, but the process stays: it keeps
/// refusing CONNECTs (0x9C) until `DELETE /drain` or a restart. 202 while it proceeds.
pub(super) async fn drain(State(ctx): State<Arc<Context>>) -> (StatusCode, Json<DrainView>) {
    if !ctx.draining.swap(true, Ordering::SeqCst) {
        tracing::info!("drain requested through the admin API");
        let c = ctx.clone();
        tokio::spawn(async move { c.drain(API_DRAIN_LIMIT).await });
    }
    ctx.ready.store(false, Ordering::SeqCst);
    (StatusCode::ACCEPTED, Json(drain_view(&ctx)))
}

/// Ends a drain: CONNECTs are accepted again and `/readyz` passes.
pub(super) async fn undrain(State(ctx): State<Arc<Context>>) -> Json<DrainView> {
    if ctx.draining.load(Ordering::SeqCst) {
        tracing::info!("drain cancelled through the admin API");
    }
    ctx.undrain();
    Json(drain_view(&ctx))
}
