//! What watches the cluster besides the swarm: clients with wills and the subscriber that
//! counts their wills, a sampler of who is connected where (one live connection per client
//! id), and the probe that measures when full service is back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mqfleet_codec::{Protocol, PublishProperties, QoS, SubscriptionOptions, Will};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cluster::ChaosCluster;
use crate::client::{Client, ConnectOptions, Event};
use crate::transport::Target;

const WILL_TOPIC: &str = "chaos/wills";

fn target(addr: SocketAddr) -> Target {
    format!("mqtt://{addr}").parse().expect("an address is a target")
}

fn options(client_id: &str, clean: bool, will: Option<Will>) -> ConnectOptions {
    ConnectOptions {
        protocol: Protocol::V5,
        client_id: client_id.into(),
        clean_start: clean,
        keep_alive: 10,
        session_expiry: (!clean).then_some(3600),
        username: None,
        password: None,
        will,
        timeout: Duration::from_secs(3),
    }
}

/// The wills the run expects and the ones that arrived.
#[derive(Debug, Default)]
pub struct WillBook {
    /// Connections that ended without DISCONNECT (or were ended by a fault): one will each.
    pub expected: HashSet<String>,
    /// Connections ended by a DISCONNECT the client sent: no will, unless the proxy died before
    /// reading it (then one).
    pub clean: HashSet<String>,
    /// Arrivals by payload.
    pub arrived: HashMap<String, u32>,
    /// Reconnects of the watcher that found its session gone.
    pub watcher_sessions_lost: u32,
    /// QoS 2 packet ids the broker reused towards the watcher before their PUBREL.
    pub reused_ids: u64,
    /// When each will arrived (seconds since the run's start), for the journal.
    pub arrival_times: HashMap<String, Vec<f64>>,
    /// How each connection went (proxy, times since the run's start, how it ended): printed
    /// for a will that is missing or came twice.
    pub journal: HashMap<String, String>,
}

impl WillBook {
    /// Violations: an expected will missing, any will twice (they are QoS 2).
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut missing: Vec<&String> = self.expected.iter().filter(|w| !self.arrived.contains_key(*w)).collect();
        missing.sort();
        if !missing.is_empty() {
            v.push(format!("{} wills never published: {:?}", missing.len(), self.explain(missing.iter().take(10).copied())));
        }
        if self.reused_ids > 0 {
            v.push(format!(
                "the broker reused {} QoS 2 packet ids towards the will watcher before their PUBREL (MQTT-4.3.3-10: dropped)",
                self.reused_ids
            ));
        }
        if self.watcher_sessions_lost > 0 {
            v.push(format!("the will watcher's persistent session was lost {} times", self.watcher_sessions_lost));
        }
        let mut twice: Vec<(&String, &u32)> = self.arrived.iter().filter(|(_, n)| **n > 1).collect();
        twice.sort();
        if !twice.is_empty() {
            v.push(format!("{} wills published more than once: {:?}", twice.len(), self.explain(twice.iter().take(10).map(|(w, _)| *w))));
        }
        v
    }

    fn explain<'a>(&self, wills: impl Iterator<Item = &'a String>) -> Vec<String> {
        wills
            .map(|w| {
                let arrived = self.arrival_times.get(w).map(|t| format!(", arrived at {t:.2?} s")).unwrap_or_default();
                format!("{w}: {}{arrived}", self.journal.get(w).map_or("(no record)", String::as_str))
            })
            .collect()
    }
}

/// Clients that connect with a will (QoS 2, a payload naming the connection), hold a while,
/// and leave either politely or by dropping the connection; round robin over the proxies.
pub async fn will_clients(
    proxies: Vec<SocketAddr>,
    n: usize,
    seed: u64,
    clock: Instant,
    book: Arc<Mutex<WillBook>>,
    stop: CancellationToken,
) {
    let tasks: Vec<_> = (0..n)
        .map(|k| {
            let (proxies, book, stop) = (proxies.clone(), book.clone(), stop.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let id = format!("chaos-will-{k}");
                for incarnation in 0u64.. {
                    if stop.is_cancelled() {
                        return;
                    }
                    let payload = format!("{id}#{incarnation}");
                    let will = Will {
                        topic: format!("{WILL_TOPIC}/{k}").into(),
                        payload: Bytes::from(payload.clone()),
                        qos: QoS::ExactlyOnce,
                        retain: false,
                        properties: Default::default(),
                    };
                    let proxy = (k + incarnation as usize) % proxies.len();
                    let asked = clock.elapsed().as_secs_f64();
                    let Ok((mut c, _)) = Client::connect(&target(proxies[proxy]), None, None, &options(&id, true, Some(will))).await else {
                        // Perhaps the broker got the CONNECT: its will may come, and is not checked.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    };
                    let hold = Duration::from_millis(rng.random_range(300..3_000));
                    let polite = rng.random_bool(0.5);
                    let connected = clock.elapsed().as_secs_f64();
                    let ended_by_broker = tokio::select! {
                        r = async { loop { c.next().await?; } } => {
                            let r: Result<(), crate::client::ClientError> = r;
                            Some(r.err().map_or_else(String::new, |e| e.to_string()))
                        }
                        () = tokio::time::sleep(hold) => None,
                        () = stop.cancelled() => None,
                    };
                    let will_due = ended_by_broker.is_some() || !polite;
                    {
                        let mut b = book.lock().expect("will book");
                        let how = match &ended_by_broker {
                            Some(e) => format!("ended by the broker ({e})"),
                            None if polite => "DISCONNECT".to_string(),
                            None => "dropped".to_string(),
                        };
                        let line = format!(
                            "proxy-{proxy}, CONNECT at {asked:.2} s, CONNACK at {connected:.2} s, {how} at {:.2} s",
                            clock.elapsed().as_secs_f64()
                        );
                        b.journal.insert(payload.clone(), line);
                        if will_due {
                            b.expected.insert(payload);
                        } else {
                            b.clean.insert(payload);
                        }
                    }
                    if will_due {
                        c.drop_connection().await;
                    } else {
                        c.disconnect().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// A persistent QoS 2 subscriber to every will; follows the proxies round robin when one fails,
/// carrying its QoS 2 state across connections so that nothing counts twice by its own doing.
pub async fn will_watcher(
    proxies: Vec<SocketAddr>,
    clock: Instant,
    book: Arc<Mutex<WillBook>>,
    subscribed: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let mut state = None;
    let mut first = true;
    for attempt in 0usize.. {
        if stop.is_cancelled() {
            return;
        }
        let addr = proxies[attempt % proxies.len()];
        let Ok((mut c, ack)) = Client::connect(&target(addr), None, None, &options("chaos-will-watcher", false, None)).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match state.take() {
            Some(s) if ack.session_present => c.resume_session(s),
            Some(_) => {
                book.lock().expect("will book").watcher_sessions_lost += 1;
                first = true;
            }
            None => {}
        }
        if first {
            c.subscribe(vec![(format!("{WILL_TOPIC}/#"), SubscriptionOptions::qos(QoS::ExactlyOnce))], None);
            if c.flush().await.is_err() {
                continue;
            }
        }
        let r: Result<(), crate::client::ClientError> = async {
            loop {
                while let Some(e) = c.poll_event()? {
                    match e {
                        Event::Publish(p) => {
                            let payload = String::from_utf8_lossy(&p.payload).to_string();
                            let mut b = book.lock().expect("will book");
                            b.arrival_times.entry(payload.clone()).or_default().push(clock.elapsed().as_secs_f64());
                            *b.arrived.entry(payload).or_insert(0) += 1;
                        }
                        Event::SubAck(_) => {
                            first = false;
                            subscribed.notify_one();
                        }
                        _ => {}
                    }
                }
                let ping_at = c.ping_at().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                let has_output = c.tx.has_output();
                tokio::select! {
                    r = c.rx.read() => r?,
                    r = c.tx.write_some(), if has_output => r?,
                    () = tokio::time::sleep_until(ping_at) => c.ping(),
                    () = stop.cancelled() => return Ok(()),
                }
            }
        }
        .await;
        book.lock().expect("will book").reused_ids += std::mem::take(&mut c.reused_ids);
        state = Some(c.take_session());
        if r.is_ok() {
            c.disconnect().await;
            return;
        }
        c.drop_connection().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Client ids seen on two proxies at once, in two samples in a row (a takeover in progress may
/// show in one).
#[derive(Debug, Default)]
pub struct ConnectionBook {
    pub samples: u64,
    pub violations: Vec<String>,
}

/// Every `every`, lists each proxy's clients through its admin API.
pub async fn sample_connections(
    cluster: Arc<Mutex<ChaosCluster>>,
    token: String,
    every: Duration,
    clock: Instant,
    book: Arc<Mutex<ConnectionBook>>,
    stop: CancellationToken,
) {
    let mut previous: BTreeMap<String, Vec<(String, String, u64)>> = BTreeMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        // The nemesis may hold the cluster while it restarts a process: skip this round then.
        let Ok(addrs) = cluster.try_lock().map(|c| c.proxy_http()) else { continue };
        // Client id → (proxy, peer address, connected at) for every listing of it.
        let mut holders: BTreeMap<String, Vec<(String, String, u64)>> = BTreeMap::new();
        for (name, http) in addrs {
            let Some(http) = http else { continue };
            // A paused or dead proxy does not answer: it holds no live connection.
            let Ok(Some(ids)) = tokio::time::timeout(Duration::from_millis(800), list_clients(http, &token)).await else { continue };
            for (id, peer, since) in ids {
                holders.entry(id).or_default().push((name.clone(), peer, since));
            }
        }
        let doubled: HashSet<String> = holders.iter().filter(|(_, p)| p.len() > 1).map(|(id, _)| id.clone()).collect();
        let mut b = book.lock().expect("connection book");
        b.samples += 1;
        for id in doubled.iter().filter(|id| previous.contains_key(*id)) {
            b.violations.push(format!(
                "{:.1} s: client {id} connected to {:?} in two samples in a row (before: {:?})",
                clock.elapsed().as_secs_f64(),
                holders[id],
                previous[id]
            ));
        }
        previous = holders.into_iter().filter(|(_, p)| p.len() > 1).collect();
    }
}

/// The clients a proxy lists (every page): id, peer address, connected at (ms).
async fn list_clients(http: SocketAddr, token: &str) -> Option<Vec<(String, String, u64)>> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/clients?limit=10000&after={}", percent(a)),
            None => "/api/v1/clients?limit=10000".to_string(),
        };
        let body = http_get(http, &path, token).await?;
        let page: serde_json::Value = serde_json::from_str(&body).ok()?;
        for c in page["clients"].as_array()? {
            ids.push((c["client_id"].as_str()?.to_string(), c["peer"].as_str()?.to_string(), c["connected_at_ms"].as_u64()?));
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Some(ids),
        }
    }
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

async fn http_get(addr: SocketAddr, path: &str, token: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Seconds from now until a QoS 1 message published through each proxy reaches a subscriber
/// on the same proxy; `None` if that did not happen within `limit`.
pub async fn recovery(proxies: &[SocketAddr], limit: Duration) -> Option<f64> {
    let started = Instant::now();
    let mut pending: Vec<SocketAddr> = proxies.to_vec();
    let mut round = 0u64;
    while !pending.is_empty() {
        if started.elapsed() > limit {
            return None;
        }
        round += 1;
        let mut still = Vec::new();
        for addr in pending {
            if !probe(addr, round).await {
                still.push(addr);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Some(started.elapsed().as_secs_f64())
}

async fn probe(addr: SocketAddr, round: u64) -> bool {
    let topic = format!("chaos/probe/{}/{round}", addr.port());
    let attempt = async {
        let (mut c, _) =
            Client::connect(&target(addr), None, None, &options(&format!("chaos-probe-{}", addr.port()), true, None)).await.ok()?;
        c.subscribe(vec![(topic.clone(), SubscriptionOptions::qos(QoS::AtLeastOnce))], None);
        c.flush().await.ok()?;
        loop {
            if let Event::SubAck(_) = c.next().await.ok()? {
                break;
            }
        }
        c.publish(&topic, QoS::AtLeastOnce, Bytes::from_static(b"probe"), false, PublishProperties::default(), (u32::MAX, round));
        c.flush().await.ok()?;
        loop {
            match c.next().await.ok()? {
                Event::Publish(p) if p.topic == topic => {
                    c.flush().await.ok()?;
                    c.disconnect().await;
                    return Some(());
                }
                _ => c.flush().await.ok()?,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), attempt).await.ok().flatten().is_some()
}
