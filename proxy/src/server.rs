//! Accepting connections: permit, accept, spawn — nothing else. Handshakes (TLS, WebSocket,
//! then MQTT) happen inside the spawned task so one slow client cannot stall accepts.

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use crate::auth::cert::CertNames;
use crate::connection::Peer;
use crate::proxy_protocol::Trusted;
use crate::tls::TlsReloader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::websocket::{Reader, Writer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::ReasonLabel;
use crate::Context;

/// Pause after an accept error such as EMFILE, so a full fd table does not spin the loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// What a listener speaks below MQTT.
#[derive(Clone)]
pub enum Transport {
    Tcp,
    Tls(Arc<TlsReloader>),
    WebSocket,
    SecureWebSocket(Arc<TlsReloader>),
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "MQTT",
            Transport::Tls(_) => "MQTT over TLS",
            Transport::WebSocket => "MQTT over WebSocket",
            Transport::SecureWebSocket(_) => "MQTT over secure WebSocket",
        }
    }
}

/// How a listener takes its connections.
pub struct Accept {
    /// The listener's name (`mqtt`, `mqtts`, `ws`, `wss`), for per-listener limits.
    pub name: &'static str,
    pub transport: Transport,
    /// Read a PROXY header first, from these networks only.
    pub proxy_protocol: Option<Arc<Trusted>>,
    /// One connection budget shared by every listener.
    pub permits: Arc<Semaphore>,
}

/// Accepts MQTT connections until `shutdown`.
///
/// A connection beyond `max_connections` is closed at once and counted: refusing fast keeps
/// the process responsive when a fleet reconnects all at once.
pub async fn accept_loop(listener: TcpListener, accept: Accept, ctx: Arc<Context>, shutdown: CancellationToken, tracker: TaskTracker) {
    let Accept { name, transport, proxy_protocol, permits } = accept;
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
        let (ctx, shutdown, transport, proxy_protocol) = (ctx.clone(), shutdown.clone(), transport.clone(), proxy_protocol.clone());
        tracker.spawn(async move {
            let mut stream = stream;
            let peer = match proxy_protocol {
                None => peer,
                Some(trusted) => match proxied_peer(&ctx, &trusted, &mut stream, peer).await {
                    Some(p) => p,
                    None => return,
                },
            };
            if let Transport::Tcp = transport {
                // The common case keeps its concrete socket halves: no boxing on the hot path.
                let (reader, writer) = stream.into_split();
                crate::connection::serve(ctx, reader, writer, Peer { addr: peer, listener: name, cert: None }, shutdown).await;
            } else {
                // Boxed: the TLS and WebSocket handshakes are large futures, and this task's
                // state is as large as its largest branch — plain TCP connections must not pay
                // for them.
                Box::pin(async move {
                    if let Some((reader, writer, cert)) = open(&ctx, transport, stream, peer).await {
                        crate::connection::serve(ctx, reader, writer, Peer { addr: peer, listener: name, cert }, shutdown).await;
                    }
                })
                .await;
            }
            drop(permit);
        });
    }
}

/// The handshakes below MQTT (TLS, WebSocket upgrade), together bounded by the CONNECT
/// timeout: a client that opens a connection and says nothing, or garbage, holds a permit no
/// longer than one that never sends CONNECT. Failures are counted by the layer that failed.
async fn open(
    ctx: &Context,
    transport: Transport,
    stream: TcpStream,
    peer: std::net::SocketAddr,
) -> Option<(Reader, Writer, Option<CertNames>)> {
    let max_packet = ctx.settings.raw.max_packet_size as usize;
    let handshakes = async {
        match transport {
            Transport::Tcp => {
                let (r, w) = stream.into_split();
                Ok((Box::pin(r) as Reader, Box::pin(w) as Writer, None))
            }
            Transport::Tls(tls) => {
                let s = tls.acceptor().accept(stream).await.map_err(|e| ("tls_handshake", e.to_string()))?;
                let cert = client_certificate(s.get_ref().1)?;
                let (r, w) = tokio::io::split(s);
                Ok((Box::pin(r) as Reader, Box::pin(w) as Writer, cert))
            }
            Transport::WebSocket => {
                let (r, w) = crate::websocket::accept(stream, max_packet).await.map_err(|e| ("websocket_handshake", e))?;
                Ok((r, w, None))
            }
            Transport::SecureWebSocket(tls) => {
                let s = tls.acceptor().accept(stream).await.map_err(|e| ("tls_handshake", e.to_string()))?;
                let cert = client_certificate(s.get_ref().1)?;
                let (r, w) = crate::websocket::accept(s, max_packet).await.map_err(|e| ("websocket_handshake", e))?;
                Ok((r, w, cert))
            }
        }
    };
    let (reason, detail) = match tokio::time::timeout(ctx.settings.connect_timeout, handshakes).await {
        Ok(Ok(io)) => return Some(io),
        Ok(Err(failed)) => failed,
        Err(_) => ("handshake_timeout", "no TLS/WebSocket handshake within the CONNECT timeout".to_string()),
    };
    tracing::debug!(%peer, reason, detail, "connection refused before MQTT");
    ctx.metrics.disconnects.get_or_create(&ReasonLabel { reason }).inc();
    None
}

/// The client's address from the PROXY header; `None` (counted, logged) when the connection
/// is not from a trusted balancer or its header is missing or bad.
async fn proxied_peer(ctx: &Context, trusted: &Trusted, stream: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    if !trusted.contains(peer.ip()) {
        ctx.metrics.disconnects.get_or_create(&ReasonLabel { reason: "proxy_untrusted" }).inc();
        tracing::warn!(%peer, "connection to a PROXY-protocol listener from outside proxy_protocol_from; closed");
        return None;
    }
    match tokio::time::timeout(ctx.settings.connect_timeout, crate::proxy_protocol::read_header(stream)).await {
        Ok(Ok(source)) => Some(source.unwrap_or(peer)),
        Ok(Err(e)) => {
            ctx.metrics.disconnects.get_or_create(&ReasonLabel { reason: "proxy_header" }).inc();
            tracing::debug!(%peer, error = %e, "bad PROXY header; closed");
            None
        }
        Err(_) => {
            ctx.metrics.disconnects.get_or_create(&ReasonLabel { reason: "handshake_timeout" }).inc();
            None
        }
    }
}

/// The names in the client's certificate, if it presented one (rustls has verified it).
fn client_certificate(tls: &rustls::ServerConnection) -> Result<Option<CertNames>, (&'static str, String)> {
    match tls.peer_certificates().and_then(|chain| chain.first()) {
        None => Ok(None),
        Some(leaf) => CertNames::read(leaf).map(Some).map_err(|e| ("tls_client_certificate", e)),
    }
}
