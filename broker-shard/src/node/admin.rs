//! The shard's admin API (docs/ADMIN.md): what it holds, where it stands in the ring, and a
//! drain that hands its topics to the other shards before the process is stopped (scale-in
//! without `leave_on_shutdown`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use mqfleet_ops::admin::ApiError;
use serde::Serialize;

use super::{Leave, LeaveState};

#[derive(Clone)]
pub(crate) struct AdminState {
    pub leave: Arc<Leave>,
    pub ready: Arc<AtomicBool>,
    pub link_addr: SocketAddr,
    pub advertise: String,
}

pub(crate) fn router(state: AdminState) -> Router {
    Router::new().route("/shard", get(shard)).route("/drain", get(drain_state).post(drain).delete(undrain)).with_state(state)
}

#[derive(Serialize)]
struct ShardView {
    name: String,
    link_address: String,
    advertised_address: String,
    drain: LeaveState,
    ring: RingView,
    subscriptions: i64,
    retained_messages: i64,
    log_entries: i64,
}

#[derive(Serialize)]
struct RingView {
    epoch: u64,
    members: Vec<String>,
    member: bool,
    /// A change being prepared: its epoch and members.
    next: Option<(u64, Vec<String>)>,
}

async fn shard(State(s): State<AdminState>) -> Result<Json<ShardView>, ApiError> {
    let l = &s.leave;
    let ring = l.redis.ring().await.map_err(|e| ApiError::unavailable(format!("cannot read the ring from Redis: {e}")))?;
    Ok(Json(ShardView {
        name: l.name.clone(),
        link_address: s.link_addr.to_string(),
        advertised_address: s.advertise.clone(),
        drain: l.state(),
        ring: RingView {
            epoch: ring.epoch,
            member: ring.members.contains(&l.name),
            members: ring.members,
            next: ring.next.map(|n| (n.epoch, n.members)),
        },
        subscriptions: l.metrics.subscriptions.get(),
        retained_messages: l.metrics.retained_messages.get(),
        log_entries: l.metrics.log_entries.get(),
    }))
}

#[derive(Serialize)]
struct DrainView {
    state: LeaveState,
}

async fn drain_state(State(s): State<AdminState>) -> Json<DrainView> {
    Json(DrainView { state: s.leave.state() })
}

/// Starts leaving the ring; 202 while it proceeds (`GET /drain` follows it to `left`).
async fn drain(State(s): State<AdminState>) -> (StatusCode, Json<DrainView>) {
    if matches!(s.leave.state(), LeaveState::Serving | LeaveState::Failed) {
        s.ready.store(false, Ordering::SeqCst);
        let leave = s.leave.clone();
        // The drain outlives the request.
        tokio::spawn(async move { leave.run().await });
        // The task has marked nothing yet: say what it is doing.
        return (StatusCode::ACCEPTED, Json(DrainView { state: LeaveState::Leaving }));
    }
    (StatusCode::ACCEPTED, Json(DrainView { state: s.leave.state() }))
}

/// Cancels a drain: the shard asks to be in the ring again.
async fn undrain(State(s): State<AdminState>) -> Result<Json<DrainView>, ApiError> {
    if s.leave.state() == LeaveState::Leaving {
        return Err(ApiError::new(StatusCode::CONFLICT, "a drain is in progress; cancel it once it has finished (left)"));
    }
    s.leave.rejoin();
    s.ready.store(true, Ordering::SeqCst);
    Ok(Json(DrainView { state: LeaveState::Serving }))
}
