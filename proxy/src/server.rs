//! Accepting connections: permit, accept, spawn — nothing else. Handshakes happen inside the
//! spawned task so one slow client cannot stall accepts.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::ReasonLabel;
use crate::Context;

/// Pause after an accept error such as EMFILE, so a full fd table does not spin the loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts MQTT/TCP connections until `shutdown`.
///
/// A connection beyond `max_connections` is closed at once and counted: refusing fast keeps
/// the process responsive when a fleet reconnects all at once.
pub async fn accept_loop(listener: TcpListener, ctx: Arc<Context>, shutdown: CancellationToken, tracker: TaskTracker) {
    // One permit per connection; the semaphore is never closed, so acquiring cannot fail.
    let permits = Arc::new(Semaphore::new(ctx.settings.raw.max_connections));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            ctx.metrics.disconnects.get_or_create(&ReasonLabel { reason: "max_connections" }).inc();
            drop(stream);
            continue;
        };
        // Latency over bandwidth: without this, small QoS 0 packets wait for Nagle (p99 of
        // several ms instead of sub-ms on loopback).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let (reader, writer) = stream.into_split();
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            crate::connection::serve(ctx, reader, writer, peer, shutdown).await;
            drop(permit);
        });
    }
}
