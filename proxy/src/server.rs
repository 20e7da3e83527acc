//! Accepting connections: permit, accept, spawn — nothing else. Handshakes (TLS, then MQTT)
//! happen inside the spawned task so one slow client cannot stall accepts.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::ReasonLabel;
use crate::Context;

/// Pause after an accept error such as EMFILE, so a full fd table does not spin the loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts MQTT connections, over TLS when `tls` is given, until `shutdown`.
///
/// A connection beyond `max_connections` (one `permits` budget shared by every listener) is
/// closed at once and counted: refusing fast keeps the process responsive when a fleet
/// reconnects all at once.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    permits: Arc<Semaphore>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
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
        let (ctx, shutdown, tls) = (ctx.clone(), shutdown.clone(), tls.clone());
        tracker.spawn(async move {
            match tls {
                None => {
                    let (reader, writer) = stream.into_split();
                    crate::connection::serve(ctx, reader, writer, peer, shutdown).await;
                }
                Some(acceptor) => {
                    if let Some(stream) = tls_handshake(&ctx, acceptor, stream, peer).await {
                        let (reader, writer) = tokio::io::split(stream);
                        crate::connection::serve(ctx, reader, writer, peer, shutdown).await;
                    }
                }
            }
            drop(permit);
        });
    }
}

/// The TLS handshake, bounded by the CONNECT timeout: a client that opens a connection and
/// says nothing, or garbage, holds a permit no longer than one that never sends CONNECT.
async fn tls_handshake(
    ctx: &Context,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let failed = |detail: String| {
        tracing::debug!(%peer, detail, "TLS handshake failed");
        ctx.metrics.disconnects.get_or_create(&ReasonLabel { reason: "tls_handshake" }).inc();
        None
    };
    match tokio::time::timeout(ctx.settings.connect_timeout, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => failed(e.to_string()),
        Err(_) => failed("timed out".into()),
    }
}
