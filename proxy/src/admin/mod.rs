//! The proxy's admin API (docs/ADMIN.md, docs/openapi.yaml): under `/api/v1` on the HTTP
//! listener, behind the bearer token of `admin_token_file`.
//!
//! - [`clients`]: list and search connected clients, a client's connection and session, kick
//!   (on any proxy of the cluster), subscriptions;
//! - [`publish`]: publish a message as the system;
//! - [`cluster`]: this proxy, the other proxies, the ring and what each shard holds; drain.
//!
//! Handlers never hold a lock across an await and never wait on a connection without a
//! timeout: a stuck client cannot stall the API.

mod clients;
mod cluster;
mod publish;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

use crate::Context;

/// Longest wait for a connection or a shard to answer an API request.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/clients", get(clients::list))
        .route("/clients/{client_id}", get(clients::detail).delete(clients::kick))
        .route("/subscriptions", get(clients::subscriptions))
        .route("/publish", post(publish::publish))
        .route("/cluster", get(cluster::view))
        .route("/drain", get(cluster::drain_state).post(cluster::drain).delete(cluster::undrain))
        .with_state(ctx)
}

/// A subscription as the API shows it.
#[derive(Debug, Serialize)]
struct SubscriptionView {
    client_id: String,
    filter: String,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    subscription_id: Option<u32>,
}

impl SubscriptionView {
    fn new(client_id: &str, s: &session_store::StoredSubscription) -> SubscriptionView {
        SubscriptionView {
            client_id: client_id.to_string(),
            filter: s.filter.clone(),
            qos: s.qos,
            no_local: s.no_local,
            retain_as_published: s.retain_as_published,
            retain_handling: s.retain_handling,
            subscription_id: s.subscription_id,
        }
    }
}
