//! Clients: list and search, detail (connection and stored session), kick, subscriptions.
//!
//! Lists cover the clients connected to this proxy (each proxy answers for its own); detail
//! and kick find a client anywhere in the cluster through the session store.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use broker_shard::now_ms;
use mqfleet_codec::{ByteString, Protocol};
use mqfleet_ops::admin::ApiError;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{SubscriptionView, ANSWER_WITHIN};
use crate::registry::{ClientInfo, ConnMsg, ConnectionView};
use crate::Context;

/// Most entries one page returns.
const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Substring of the client id.
    #[serde(rename = "match")]
    pattern: Option<String>,
    username: Option<String>,
    /// Page size.
    limit: Option<usize>,
    /// The last client id of the previous page.
    after: Option<String>,
}

/// A connected client as lists show it.
#[derive(Debug, Serialize)]
pub(super) struct ClientSummary {
    client_id: String,
    username: Option<String>,
    protocol: &'static str,
    peer: String,
    listener: &'static str,
    connected_at_ms: u64,
    keep_alive: u16,
    clean_start: bool,
    session_expiry: u32,
}

impl ClientSummary {
    fn new(c: &ClientInfo) -> ClientSummary {
        ClientSummary {
            client_id: c.client_id.to_string(),
            username: c.username.clone(),
            protocol: protocol_name(c.protocol),
            peer: c.peer.to_string(),
            listener: c.listener,
            connected_at_ms: c.connected_at_ms,
            keep_alive: c.keep_alive,
            clean_start: c.clean_start,
            session_expiry: c.session_expiry,
        }
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::V3_1 => "3.1",
        Protocol::V3_1_1 => "3.1.1",
        Protocol::V5 => "5.0",
    }
}

#[derive(Debug, Serialize)]
pub(super) struct ClientPage {
    clients: Vec<ClientSummary>,
    /// Clients matching the query on this proxy.
    total: usize,
    /// Pass as `after` for the next page; absent on the last one.
    next: Option<String>,
}

fn limit(l: Option<usize>) -> Result<usize, ApiError> {
    match l.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ApiError::bad_request("limit must be at least 1")),
        n if n > MAX_LIMIT => Err(ApiError::bad_request(format!("limit must be at most {MAX_LIMIT}"))),
        n => Ok(n),
    }
}

/// Connected clients matching the query, sorted by client id.
fn matching(ctx: &Context, pattern: Option<&str>, username: Option<&str>) -> Vec<Arc<ClientInfo>> {
    let mut clients: Vec<Arc<ClientInfo>> = ctx
        .registry
        .clients()
        .into_iter()
        .filter(|c| pattern.is_none_or(|p| c.client_id.contains(p)))
        .filter(|c| username.is_none_or(|u| c.username.as_deref() == Some(u)))
        .collect();
    clients.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
    clients
}

/// One page of `items` (sorted by `key`) after the cursor.
fn page<T>(items: Vec<T>, key: impl Fn(&T) -> &str, after: Option<&str>, limit: usize) -> (Vec<T>, Option<String>) {
    let start = after.map_or(0, |a| items.partition_point(|i| key(i) <= a));
    let mut rest: Vec<T> = items.into_iter().skip(start).take(limit + 1).collect();
    let next = (rest.len() > limit).then(|| {
        rest.truncate(limit);
        rest.last().map(|i| key(i).to_string())
    });
    (rest, next.flatten())
}

pub(super) async fn list(
    State(ctx): State<Arc<Context>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ClientPage>, ApiError> {
    let Query(q) = q?;
    let limit = limit(q.limit)?;
    let clients = matching(&ctx, q.pattern.as_deref(), q.username.as_deref());
    let total = clients.len();
    let (clients, next) = page(clients, |c| &c.client_id, q.after.as_deref(), limit);
    Ok(Json(ClientPage { clients: clients.iter().map(|c| ClientSummary::new(c)).collect(), total, next }))
}

/// A connection's live state.
#[derive(Debug, Serialize)]
struct LiveView {
    inflight: usize,
    queued: usize,
    awaiting_release: usize,
    session_expiry: u32,
    has_will: bool,
    subscriptions: Vec<SubscriptionView>,
}

/// A session as the store holds it.
#[derive(Debug, Serialize)]
struct StoredView {
    protocol_level: u8,
    expiry_interval: u32,
    connected: bool,
    disconnected_at_ms: Option<u64>,
    expires_at_ms: Option<u64>,
    has_will: bool,
    /// Messages waiting in the store for the client (in-flight ones included).
    queued_messages: usize,
    subscriptions: Vec<SubscriptionView>,
}

#[derive(Debug, Serialize)]
pub(super) struct ClientDetail {
    client_id: String,
    /// Cluster: the proxy holding the client's connection, if any.
    proxy: Option<String>,
    /// Its connection, if it is connected to this proxy.
    connection: Option<ClientSummary>,
    live: Option<LiveView>,
    /// Its persistent session, if it has one.
    session: Option<StoredView>,
}

/// Asks a connection for its state; `None` if it ended or did not answer in time.
async fn inspect(mailbox: &crate::registry::Mailbox) -> Option<ConnectionView> {
    let (tx, rx) = oneshot::channel();
    mailbox.send(ConnMsg::Inspect(tx)).ok()?;
    tokio::time::timeout(ANSWER_WITHIN, rx).await.ok()?.ok()
}

/// Cluster: the proxy that holds `client_id`'s connection.
async fn owner_proxy(ctx: &Context, client_id: &str) -> Result<Option<String>, ApiError> {
    let Some(c) = &ctx.cluster else { return Ok(None) };
    let (owner, _) =
        c.redis.owner(client_id).await.map_err(|e| ApiError::unavailable(format!("cannot ask Redis who holds the client: {e}")))?;
    Ok(owner)
}

pub(super) async fn detail(
    State(ctx): State<Arc<Context>>,
    client_id: Result<Path<String>, PathRejection>,
) -> Result<Json<ClientDetail>, ApiError> {
    let Path(client_id) = client_id?;
    let here = ctx.registry.client(&client_id);
    let live = match &here {
        Some((_, mailbox)) => inspect(mailbox).await,
        None => None,
    };
    let record =
        ctx.store.load_session(&client_id).await.map_err(|e| ApiError::unavailable(format!("cannot read the session store: {e}")))?;
    let session = match record {
        Some(r) => {
            let queued = ctx
                .store
                .load_queue(&client_id, now_ms())
                .await
                .map_err(|e| ApiError::unavailable(format!("cannot read the session's queue: {e}")))?;
            Some(StoredView {
                protocol_level: r.protocol_level,
                expiry_interval: r.expiry_interval,
                connected: r.connected,
                disconnected_at_ms: (!r.connected).then_some(r.disconnected_at_ms),
                expires_at_ms: r.expires_at_ms(),
                has_will: r.will.is_some(),
                queued_messages: queued.len(),
                subscriptions: r.subscriptions.iter().map(|s| SubscriptionView::new(&client_id, s)).collect(),
            })
        }
        None => None,
    };
    let proxy = owner_proxy(&ctx, &client_id).await?;
    if here.is_none() && session.is_none() && proxy.is_none() {
        return Err(ApiError::not_found(format!("no client {client_id:?}: not connected and no stored session")));
    }
    Ok(Json(ClientDetail {
        connection: here.as_ref().map(|(info, _)| ClientSummary::new(info)),
        live: live.map(|v| LiveView {
            inflight: v.inflight,
            queued: v.queued,
            awaiting_release: v.awaiting_release,
            session_expiry: v.session_expiry,
            has_will: v.has_will,
            subscriptions: v.subscriptions.iter().map(|s| SubscriptionView::new(&client_id, s)).collect(),
        }),
        client_id,
        proxy,
        session,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KickQuery {
    /// End the client's session too (its will is published) instead of keeping it for a
    /// reconnect.
    #[serde(default)]
    discard_session: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct Kicked {
    /// `disconnected` (here), `requested` (asked of the proxy holding it), `session_discarded`
    /// (it was offline: its stored session ended).
    outcome: &'static str,
    proxy: Option<String>,
}

/// Disconnects a client with DISCONNECT 0x98 Administrative action, wherever it is connected.
pub(super) async fn kick(
    State(ctx): State<Arc<Context>>,
    client_id: Result<Path<String>, PathRejection>,
    q: Result<Query<KickQuery>, QueryRejection>,
) -> Result<(StatusCode, Json<Kicked>), ApiError> {
    let Path(client_id) = client_id?;
    let Query(q) = q?;
    let me = ctx.cluster.as_ref().map(|c| c.id.clone());
    if let Some((_, mailbox)) = ctx.registry.client(&client_id) {
        tracing::info!(client_id = %client_id, discard_session = q.discard_session, "disconnecting a client as asked by an operator");
        let _ = mailbox.send(ConnMsg::Kick { discard_session: q.discard_session });
        // Answer once it is gone, so that a list right after no longer shows it.
        let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
        while ctx.registry.client(&client_id).is_some() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        return Ok((StatusCode::OK, Json(Kicked { outcome: "disconnected", proxy: me })));
    }
    if let (Some(c), Some(owner)) = (&ctx.cluster, owner_proxy(&ctx, &client_id).await?) {
        if owner != c.id {
            c.redis
                .notify_kick(&owner, &client_id, q.discard_session)
                .await
                .map_err(|e| ApiError::unavailable(format!("cannot reach the proxy holding the client through Redis: {e}")))?;
            return Ok((StatusCode::ACCEPTED, Json(Kicked { outcome: "requested", proxy: Some(owner) })));
        }
    }
    if q.discard_session {
        discard_offline(&ctx, &client_id).await?;
        return Ok((StatusCode::OK, Json(Kicked { outcome: "session_discarded", proxy: me })));
    }
    Err(ApiError::not_found(format!("client {client_id:?} is not connected")))
}

/// Ends an offline session now, as if it expired: its pending will is published first.
async fn discard_offline(ctx: &Context, client_id: &str) -> Result<(), ApiError> {
    let unavailable = |e: session_store::Error| ApiError::unavailable(format!("session store: {e}"));
    let Some(record) = ctx.store.load_session(client_id).await.map_err(unavailable)? else {
        return Err(ApiError::not_found(format!("client {client_id:?} is not connected and has no stored session")));
    };
    let id = ByteString::from(client_id);
    match &ctx.cluster {
        // The lifecycle task owns the session's timers and its pending will.
        None => ctx.lifecycle.end_now(&id),
        Some(_) => {
            crate::cluster::take_and_publish_will(ctx, client_id).await.map_err(unavailable)?;
            ctx.end_stored_session(&id, Some(record.epoch)).await.map_err(unavailable)?;
        }
    }
    tracing::info!(client_id, "offline session discarded by an operator");
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubscriptionQuery {
    client_id: Option<String>,
    /// Exact filter, as subscribed (with any `$share/…` prefix).
    filter: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
pub(super) struct SubscriptionPage {
    subscriptions: Vec<SubscriptionView>,
    /// More matched than `limit`.
    truncated: bool,
}

/// Subscriptions of the clients connected to this proxy, by client id then filter. Each
/// connection is asked in turn: with many clients, narrow by `client_id`.
pub(super) async fn subscriptions(
    State(ctx): State<Arc<Context>>,
    q: Result<Query<SubscriptionQuery>, QueryRejection>,
) -> Result<Json<SubscriptionPage>, ApiError> {
    let Query(q) = q?;
    let limit = limit(q.limit)?;
    let clients: Vec<Arc<ClientInfo>> = match &q.client_id {
        Some(id) => ctx.registry.client(id).map(|(c, _)| c).into_iter().collect(),
        None => matching(&ctx, None, None),
    };
    let mut out = Vec::new();
    for c in clients {
        let Some((_, mailbox)) = ctx.registry.client(&c.client_id) else { continue };
        let Some(view) = inspect(&mailbox).await else { continue };
        for s in view.subscriptions.iter().filter(|s| q.filter.as_ref().is_none_or(|f| *f == s.filter)) {
            if out.len() == limit {
                return Ok(Json(SubscriptionPage { subscriptions: out, truncated: true }));
            }
            out.push(SubscriptionView::new(&c.client_id, s));
        }
    }
    Ok(Json(SubscriptionPage { subscriptions: out, truncated: false }))
}

#[cfg(test)]
mod tests {
    use super::page;

    #[test]
    fn pages_follow_the_cursor_without_gaps_or_repeats() {
        let items: Vec<String> = (0..7).map(|i| format!("c{i}")).collect();
        let (first, next) = page(items.clone(), |s| s, None, 3);
        assert_eq!(first, ["c0", "c1", "c2"]);
        assert_eq!(next.as_deref(), Some("c2"));
        let (second, next) = page(items.clone(), |s| s, next.as_deref(), 3);
        assert_eq!(second, ["c3", "c4", "c5"]);
        let (last, next) = page(items.clone(), |s| s, next.as_deref(), 3);
        assert_eq!(last, ["c6"]);
        assert_eq!(next, None);
        let (exact, next) = page(items, |s| s, None, 7);
        assert_eq!(exact.len(), 7);
        assert_eq!(next, None, "no empty last page");
    }
}
