//! The shard's end of TCP links: accepts proxies, checks their `Hello`, and bridges frames to
//! the router's inbox and the router's events back to the socket, with credit-based flow
//! control in both directions.
//!
//! A proxy keeps its [`ProxyId`] across reconnects (by its name), so routes the router holds stay
//! valid; a link's end is reported to the router only if no newer link of the same proxy
//! replaced it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::frame::{decode_next, encode, Frame, MIN_VERSION, VERSION};
use super::local::{Inbound, EVENT_CHANNEL_CAPACITY};
use super::{ProxyId, Request};
use crate::ShardHandle;

/// Settings of the link listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub shard_name: String,
    /// Identifies this shard's log (see `Frame::Welcome`).
    pub log_id: u64,
    /// Frames a proxy may send before waiting for credit: bounds what one proxy can queue in
    /// this shard.
    pub credit: u32,
    /// Time a new link has to say `Hello`.
    pub handshake_timeout: Duration,
}

impl ServerConfig {
    pub fn new(shard_name: impl Into<String>) -> ServerConfig {
        ServerConfig { shard_name: shard_name.into(), log_id: 0, credit: 1024, handshake_timeout: Duration::from_secs(10) }
    }
}

/// Proxy identities: stable per name for the life of the shard, with the generation of each
/// proxy's current link.
#[derive(Default)]
struct Proxies {
    by_name: Mutex<HashMap<String, (ProxyId, u64)>>,
    next_generation: AtomicU64,
}

impl Proxies {
    /// The proxy's id and a new generation for this link.
    fn link(&self, name: &str) -> (ProxyId, u64) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let mut m = self.by_name.lock();
        let next_id = ProxyId(m.len() as u32 + 1);
        let e = m.entry(name.to_string()).or_insert((next_id, 0));
        e.1 = generation;
        (e.0, generation)
    }

    fn is_current(&self, name: &str, generation: u64) -> bool {
        self.by_name.lock().get(name).is_some_and(|e| e.1 == generation)
    }
}

/// Serves proxy links until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    shard: ShardHandle,
    config: ServerConfig,
    ring_epoch: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let proxies = Arc::new(Proxies::default());
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "link accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let (shard, config, proxies, ring_epoch, shutdown) =
            (shard.clone(), config.clone(), proxies.clone(), ring_epoch.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = link(stream, shard, config, proxies, ring_epoch, shutdown).await {
                tracing::info!(%peer, error = %e, "proxy link ended");
            }
        });
    }
}

async fn link(
    mut stream: TcpStream,
    shard: ShardHandle,
    config: ServerConfig,
    proxies: Arc<Proxies>,
    ring_epoch: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let hello = tokio::time::timeout(config.handshake_timeout, async {
        loop {
            if let Some(f) = decode_next(&mut rbuf).map_err(|e| e.to_string())? {
                return Ok::<_, String>(f);
            }
            if stream.read_buf(&mut rbuf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed before Hello".into());
            }
        }
    })
    .await
    .map_err(|_| "no Hello in time".to_string())??;
    let (proxy_name, incarnation, mut event_credit, version) = match hello {
        // An older proxy (a rolling upgrade) is answered in its own version: it never sends
        // what it does not know.
        Frame::Hello { version, proxy, incarnation, credit, .. } if (MIN_VERSION..=VERSION).contains(&version) => {
            (proxy, incarnation, credit, version)
        }
        Frame::Hello { version, .. } => {
            let reason = format!("link version {version} is not supported (this shard speaks {MIN_VERSION} to {VERSION})");
            encode(&Frame::Refused { reason }, &mut wbuf);
            let _ = stream.write_all(&wbuf).await;
            return Err(format!("refused link version {version}"));
        }
        other => return Err(format!("first frame is not Hello: {other:?}")),
    };
    let (proxy, generation) = proxies.link(&proxy_name);
    let (events_tx, mut events) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let name: Arc<str> = proxy_name.as_str().into();
    shard.tx.send(Inbound::Connect { proxy, name, incarnation, events: events_tx }).await.map_err(|_| "shard stopped".to_string())?;
    encode(
        &Frame::Welcome {
            version,
            shard: config.shard_name.clone(),
            log_id: config.log_id,
            ring_epoch: ring_epoch.load(Ordering::Relaxed),
            credit: config.credit,
        },
        &mut wbuf,
    );
    tracing::info!(proxy = %proxy_name, id = proxy.0, "proxy linked");

    let (mut reader, mut writer) = stream.into_split();
    let mut processed: u32 = 0;
    let result: Result<(), String> = loop {
        // Give back credit in halves, so the proxy never idles waiting for it.
        if processed >= config.credit / 2 {
            encode(&Frame::Credit(processed), &mut wbuf);
            processed = 0;
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                encode(&Frame::Refused { reason: "shard shutting down".into() }, &mut wbuf);
                let _ = writer.write_all(&wbuf).await;
                break Ok(());
            }
            r = writer.write_all(&wbuf), if !wbuf.is_empty() => {
                if let Err(e) = r {
                    break Err(e.to_string());
                }
                wbuf.clear();
            }
            ev = events.recv(), if event_credit > 0 => {
                let Some(ev) = ev else { break Ok(()) }; // replaced by a newer link
                encode(&Frame::Event(ev), &mut wbuf);
                event_credit -= 1;
                // Batch: everything already waiting goes out in the same write.
                while event_credit > 0 && wbuf.len() < 1 << 20 {
                    match events.try_recv() {
                        Ok(ev) => {
                            encode(&Frame::Event(ev), &mut wbuf);
                            event_credit -= 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            r = reader.read_buf(&mut rbuf) => {
                match r {
                    Ok(0) => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(e.to_string()),
                }
                if let Err(e) = handle_frames(&mut rbuf, &mut wbuf, &shard, proxy, &mut processed, &mut event_credit).await {
                    break Err(e);
                }
            }
        }
    };
    if proxies.is_current(&proxy_name, generation) {
        let _ = shard.tx.send(Inbound::Disconnect { proxy }).await;
    }
    tracing::info!(proxy = %proxy_name, "proxy link closed");
    result
}

/// Handles every complete frame in `rbuf`.
async fn handle_frames(
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    shard: &ShardHandle,
    proxy: ProxyId,
    processed: &mut u32,
    event_credit: &mut u32,
) -> Result<(), String> {
    loop {
        match decode_next(rbuf).map_err(|e| e.to_string())? {
            Some(Frame::Request(request)) => {
                // Confirmations are control traffic, sent outside the credit window.
                let counted = !matches!(request, Request::Received { .. });
                shard.tx.send(Inbound::Request { proxy, request }).await.map_err(|_| "shard stopped".to_string())?;
                *processed += u32::from(counted);
            }
            Some(Frame::Credit(n)) => *event_credit = event_credit.saturating_add(n),
            Some(Frame::Ping) => encode(&Frame::Pong, wbuf),
            Some(Frame::Pong) => {}
            Some(other) => return Err(format!("unexpected frame from proxy: {other:?}")),
            None => return Ok(()),
        }
    }
}
