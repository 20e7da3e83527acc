//! The HTTP endpoint for operators and orchestrators.
//!
//! | path      | answer                                                              |
//! |-----------|---------------------------------------------------------------------|
//! | `/livez`  | 200 while the process serves HTTP at all                            |
//! | `/readyz` | 200 once the process serves; 503 while starting or draining         |
//! | `/metrics`| Prometheus text exposition format                                   |
//! | `/api/v1/…` | the process's admin API, behind a bearer token (see [`crate::admin`]) |

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::admin::{require_token, AdminToken, ApiError};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct HttpState {
    pub ready: Arc<AtomicBool>,
    pub prometheus: Arc<prometheus_client::registry::Registry>,
}

/// Serves the endpoints, and `api` (routes under `/api/v1`, guarded by `token`), until
/// `shutdown`.
pub async fn serve(listener: TcpListener, state: HttpState, api: Router, token: Option<AdminToken>, shutdown: CancellationToken) {
    let api = api.route_layer(axum::middleware::from_fn_with_state(token, require_token));
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .nest("/api/v1", api)
        .fallback(|| async { ApiError::not_found("no such path") });
    let result = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.prometheus) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], format!("cannot encode metrics: {e}\n")),
    }
}
