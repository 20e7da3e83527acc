//! One simulated device (or backend client): connect, subscribe, publish on a schedule,
//! account for what arrives, and — in the reconnect storm — drop and come back.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqfleet_codec::{PublishProperties, QoS, SubscriptionOptions};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Pace, RunCtx};
use crate::accounting::{Ledger, Tracker};
use crate::client::{Client, ClientError, ConnectOptions, Event};
use crate::payload::{now_ns, Header};

/// How long after the publishing window an open-loop publisher may still send messages that
/// were due inside it.
pub const LATE_GRACE: Duration = Duration::from_secs(1);

/// What one simulated client does.
#[derive(Debug, Clone, Default)]
pub struct DeviceSpec {
    pub index: usize,
    pub client_id: String,
    pub username: Option<String>,
    /// Persistent session: clean start off, long session expiry.
    pub persistent: bool,
    pub subscribe: Vec<(String, SubscriptionOptions)>,
    /// Streams this client publishes: (stream id, topic).
    pub publish: Vec<(u32, String)>,
    /// Request/response: publish with this Response Topic; as responder: echo to it.
    pub response_topic: Option<String>,
    pub responder: bool,
    /// Connect in the first phase (subscribers) or the second (publishers).
    pub first_phase: bool,
    /// Connect paced by the ramp (swarm devices) or at once (backend clients).
    pub ramped: bool,
}

/// What a client brings back.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ledger: Ledger,
    pub tracker: Tracker,
    pub connected: bool,
}

/// Runs one client until the run ends.
///
/// `ready` is notified once connected and subscribed; `go` is awaited before publishing;
/// `drop_now` asks for an abrupt disconnect and reconnect (reconnect storm).
pub async fn run(ctx: Arc<RunCtx>, spec: DeviceSpec, ready: Arc<super::Barrier>, drop_now: Option<Arc<Notify>>) -> Outcome {
    let mut out = Outcome::default();
    let mut seqs: BTreeMap<u32, u64> = BTreeMap::new();
    let mut first = true;
    // A persistent session's client-side state, carried from one connection to the next.
    let mut session_state = None;
    loop {
        let Some((mut client, session_present)) = connect(&ctx, &spec, first).await else {
            if first {
                ready.arrive();
            }
            return out;
        };
        out.connected = true;
        if spec.persistent && !first && !session_present {
            // The broker lost a session it had confirmed: its subscriptions and queue are gone.
            ctx.stats.error("session_lost".to_string());
        }
        if let (Some(state), true) = (session_state.take(), session_present) {
            client.resume_session(state);
        }
        if first || !spec.persistent {
            if let Err(e) = subscribe(&ctx, &spec, &mut client, &mut out).await {
                ctx.stats.error(e.kind());
                ready.arrive();
                return out;
            }
        }
        if first {
            ready.arrive();
        }
        first = false;
        let ended = session(&ctx, &spec, &mut client, &mut out, &mut seqs, drop_now.as_deref()).await;
        if spec.persistent {
            session_state = Some(client.take_session());
        }
        match ended {
            Ended::Finished => {
                ctx.stats.connected.fetch_sub(1, Relaxed);
                client.disconnect().await;
                return out;
            }
            Ended::Dropped => {
                ctx.stats.connected.fetch_sub(1, Relaxed);
                client.drop_connection().await;
                tokio::time::sleep(ctx.offline).await;
                if ctx.stop.is_cancelled() {
                    return out;
                }
            }
            Ended::Failed(e) => {
                ctx.stats.connected.fetch_sub(1, Relaxed);
                ctx.stats.error(e.kind());
                if !spec.persistent || ctx.stop.is_cancelled() {
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Connects to the device's broker; returns the client and CONNACK's Session Present. With
/// `retry_connect` (fault injection) a device that cannot connect tries the next target, as a
/// device behind a load balancer would, until the run stops.
async fn connect(ctx: &RunCtx, spec: &DeviceSpec, first: bool) -> Option<(Client, bool)> {
    let _permit = if spec.ramped && first { Some(ctx.handshakes.acquire().await.ok()?) } else { None };
    let source = (!ctx.sources.is_empty()).then(|| ctx.sources[spec.index % ctx.sources.len()]);
    let options = ConnectOptions {
        protocol: ctx.protocol,
        client_id: spec.client_id.clone(),
        clean_start: !spec.persistent,
        keep_alive: ctx.keep_alive,
        session_expiry: spec.persistent.then_some(3600),
        username: spec.username.clone(),
        password: ctx.password.clone(),
        will: None,
        timeout: ctx.connect_timeout,
    };
    let mut attempt = 0usize;
    loop {
        let target = &ctx.targets[(spec.index + attempt) % ctx.targets.len()];
        ctx.stats.connect_attempts.fetch_add(1, Relaxed);
        let started = Instant::now();
        match Client::connect(target, ctx.tls.as_ref(), source, &options).await {
            Ok((client, ack)) => {
                ctx.stats.connect_latency.lock().record_us(started.elapsed().as_micros() as u64);
                ctx.stats.connected.fetch_add(1, Relaxed);
                return Some((client, ack.session_present));
            }
            Err(e) => {
                ctx.stats.connect_failures.fetch_add(1, Relaxed);
                ctx.stats.error(e.kind());
                if !ctx.retry_connect || ctx.stop.is_cancelled() {
                    return None;
                }
                attempt += 1;
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    () = ctx.stop.cancelled() => return None,
                }
            }
        }
    }
}

/// Subscribes and waits for SUBACK; messages arriving meanwhile are accounted as usual.
async fn subscribe(ctx: &RunCtx, spec: &DeviceSpec, client: &mut Client, out: &mut Outcome) -> Result<(), ClientError> {
    if spec.subscribe.is_empty() {
        return Ok(());
    }
    client.subscribe(spec.subscribe.clone(), None);
    client.flush().await?;
    loop {
        match client.next().await? {
            Event::SubAck(a) => {
                if let Some(r) = a.reasons.iter().find(|r| r.is_error()) {
                    return Err(ClientError::Protocol(format!("SUBACK refused: {r}")));
                }
                return Ok(());
            }
            other => on_event(ctx, spec, client, out, other),
        }
    }
}

/// Handles every packet already in the read buffer: a broker may send queued messages in the
/// same segment as CONNACK or SUBACK, and nothing else may follow them.
fn drain_buffered(ctx: &RunCtx, spec: &DeviceSpec, client: &mut Client, out: &mut Outcome) -> Result<(), ClientError> {
    while let Some(ev) = client.poll_event()? {
        on_event(ctx, spec, client, out, ev);
    }
    Ok(())
}

enum Ended {
    Finished,
    Dropped,
    Failed(ClientError),
}

/// One connection's life: publish on schedule, receive, ping, until the run stops.
async fn session(
    ctx: &RunCtx,
    spec: &DeviceSpec,
    client: &mut Client,
    out: &mut Outcome,
    seqs: &mut BTreeMap<u32, u64>,
    drop_now: Option<&Notify>,
) -> Ended {
    let publishing = !spec.publish.is_empty();
    if let Err(e) = drain_buffered(ctx, spec, client, out) {
        return Ended::Failed(e);
    }
    if publishing {
        ctx.go.wait().await;
    }
    let streams = spec.publish.len().max(1) as u64;
    // Open loop: message k is due at `first + k * period`, computed in integer nanoseconds so
    // that a run of D seconds at R messages/s sends exactly D x R per stream.
    let (first, period_ns, budget) = match ctx.pace {
        Pace::Rate(r) if publishing && r > 0.0 => {
            let period_ns = (1e9 / (r * streams as f64)).round().max(1.0) as u64;
            // Spread devices over the first period so they do not publish in lockstep.
            let offset = Duration::from_nanos(period_ns * (spec.index as u64 % 997) / 997);
            let budget = (ctx.duration.as_secs_f64() * r).round() as u64 * streams;
            (*ctx.go_at.lock() + offset, period_ns, budget)
        }
        _ => (Instant::now(), 0, u64::MAX),
    };
    let mut k: u64 = seqs.values().sum();
    let due = |k: u64| first + Duration::from_nanos(k.saturating_mul(period_ns));
    loop {
        let now = Instant::now();
        // An open-loop publisher that fell behind may finish its due messages a little after
        // the window (they keep their intended send time); a closed-loop one stops on time.
        let publish_until = ctx.publish_until() + if matches!(ctx.pace, Pace::Rate(_)) { LATE_GRACE } else { Duration::ZERO };
        let publish_open = publishing && now < publish_until && k < budget;
        let can_send = publish_open
            && match ctx.pace {
                Pace::Rate(_) => true,
                Pace::Window(w) => in_flight(ctx, spec, seqs) < w,
            };
        let wake = if can_send && matches!(ctx.pace, Pace::Rate(_)) { due(k) } else { now + Duration::from_secs(3600) };
        let ping_at = client.ping_at().unwrap_or(now + Duration::from_secs(3600));
        let window_poll = matches!(ctx.pace, Pace::Window(_)) && publish_open && !can_send;
        tokio::select! {
            biased;
            () = ctx.stop.cancelled() => return Ended::Finished,
            () = async { match drop_now { Some(n) => n.notified().await, None => std::future::pending().await } } => return Ended::Dropped,
            r = client.tx.write_some(), if client.tx.has_output() => if let Err(e) = r { return Ended::Failed(e.into()) },
            r = client.rx.read() => {
                if let Err(e) = r.and_then(|()| drain_buffered(ctx, spec, client, out)) {
                    return Ended::Failed(e);
                }
            },
            () = tokio::time::sleep_until(wake), if can_send => {
                // Open loop: catch up on every message whose time has come, each stamped with
                // its intended time.
                while k < budget && Instant::now() >= due(k) {
                    let sent_at = ctx.wall_of(due(k));
                    publish_one(ctx, spec, client, out, seqs, k, sent_at);
                    k += 1;
                }
            },
            () = std::future::ready(()), if can_send && matches!(ctx.pace, Pace::Window(_)) => {
                publish_one(ctx, spec, client, out, seqs, k, now_ns());
                k += 1;
            },
            () = tokio::time::sleep(Duration::from_millis(1)), if window_poll => {},
            () = tokio::time::sleep_until(ping_at) => client.ping(),
        }
    }
}

/// Messages of this publisher not yet delivered everywhere they must go.
fn in_flight(ctx: &RunCtx, spec: &DeviceSpec, seqs: &BTreeMap<u32, u64>) -> usize {
    spec.publish
        .iter()
        .map(|(id, _)| {
            let sent = seqs.get(id).copied().unwrap_or(0);
            let done = ctx.delivered.get(*id as usize).map_or(0, |d| d.load(Relaxed)) / ctx.copies_per_message.max(1);
            sent.saturating_sub(done) as usize
        })
        .sum()
}

fn publish_one(
    ctx: &RunCtx,
    spec: &DeviceSpec,
    client: &mut Client,
    out: &mut Outcome,
    seqs: &mut BTreeMap<u32, u64>,
    k: u64,
    sent_at_ns: u64,
) {
    let (stream, topic) = &spec.publish[(k % spec.publish.len() as u64) as usize];
    let seq = seqs.entry(*stream).or_insert(0);
    let qos_level = ctx.qos.qos_for(*stream, *seq);
    let qos = QoS::from_u8(qos_level).unwrap_or(QoS::AtMostOnce);
    let payload = Header { qos: qos_level, stream: *stream, seq: *seq, sent_at_ns }.encode(ctx.payload_size, ctx.shape);
    let mut props = PublishProperties::default();
    if let Some(rt) = &spec.response_topic {
        props.response_topic = Some(rt.as_str().into());
        props.correlation_data = Some(Bytes::copy_from_slice(&seq.to_be_bytes()));
    }
    client.publish(topic, qos, payload, false, props, (*stream, *seq));
    out.ledger.streams.entry(*stream).or_default().sent(*seq, sent_at_ns);
    *seq += 1;
    ctx.stats.published.fetch_add(1, Relaxed);
}

fn on_event(ctx: &RunCtx, spec: &DeviceSpec, client: &mut Client, out: &mut Outcome, ev: Event) {
    match ev {
        Event::Publish(p) => {
            let Some(h) = Header::decode(&p.payload) else {
                out.tracker.foreign += 1;
                return;
            };
            if spec.responder {
                if let Some(rt) = p.properties.response_topic.clone() {
                    let props = PublishProperties { correlation_data: p.properties.correlation_data.clone(), ..Default::default() };
                    client.publish(&rt, p.qos, p.payload.clone(), false, props, (u32::MAX, 0));
                }
                return;
            }
            out.tracker.record_arrival(&h, p.dup, now_ns());
            if let Some(d) = ctx.delivered.get(h.stream as usize) {
                d.fetch_add(1, Relaxed);
            }
            let latency_us = now_ns().saturating_sub(h.sent_at_ns) / 1000;
            ctx.stats.record_delivery(h.qos, latency_us);
        }
        Event::Acked { pending, refused } => {
            let (stream, seq) = pending.tag;
            if stream == u32::MAX {
                return; // a responder's reply
            }
            match refused {
                None => {
                    out.ledger.streams.entry(stream).or_default().acked.set(seq);
                    ctx.stats.acknowledged.fetch_add(1, Relaxed);
                }
                Some(r) => ctx.stats.error(format!("publish_refused_0x{:02x}", r as u8)),
            }
        }
        Event::SubAck(_) | Event::UnsubAck | Event::Pong => {}
    }
}
