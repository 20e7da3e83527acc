//! From accepted socket to CONNACK: the first packet, negotiation, takeover, session resume.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use broker_shard::link::{ConnId, Reply, Request, SessionInfo};
use broker_shard::now_ms;
use futures::stream::FuturesOrdered;
use mqfleet_codec::ByteString;
use mqfleet_codec::{ConnAck, Connect, DecodeError, Packet, Protocol, ReasonCode};
use session_store::{Op, QueuedMessage, SessionRecord};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Connection, Io, Peer, SessionState};
use crate::admission::{IpSlot, Refused, TokenBucket};
use crate::auth::acl::Action;
use crate::auth::{Identity, Login};
use crate::metrics::{Metrics, ReasonLabel};
use crate::registry::{wait_exited, ClientInfo, ConnMsg};
use crate::session::alias::{InboundAliases, OutboundAliases};
use crate::session::connect::{negotiate, Negotiated, Refusal};
use crate::session::inbound::Inbound;
use crate::session::outbound::Outbound;
use crate::Context;

/// How long a new connection waits for the one it takes over to save its session.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Runs the handshake; `None` when the connection ends before it is established (every such
/// path has answered the client where the protocol allows, and counted the cause).
pub(super) async fn run<R, W>(
    ctx: Arc<Context>,
    mut io: Io<R, W>,
    conn: ConnId,
    peer: Peer,
    admitted: Result<Option<IpSlot>, Refused>,
    shutdown: CancellationToken,
) -> Option<Box<Connection<R, W>>>
where
    R: AsyncRead + super::io::Readiness + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let connect = first_packet(&ctx, &mut io, &shutdown).await?;
    let protocol = connect.protocol;
    if ctx.draining.load(std::sync::atomic::Ordering::SeqCst) {
        let refusal = Refusal { reason: ReasonCode::UseAnotherServer, detail: "this server is draining; connect to another".into() };
        refuse(&ctx, &mut io, protocol, refusal).await;
        return None;
    }
    let slot = match admitted {
        Ok(slot) => slot,
        Err(refused) => {
            // Refused before any authentication, store or shard work.
            ctx.metrics.limited.get_or_create(&ReasonLabel { reason: refused.cause }).inc();
            let detail = format!("{} limit reached for {}", refused.cause, peer.addr.ip());
            refuse(&ctx, &mut io, protocol, Refusal { reason: refused.reason, detail }).await;
            return None;
        }
    };
    let admitted = negotiate(&connect, &ctx.limits, || format!("mqfleet-{}", random_id()));
    let admitted = match admitted {
        Ok(n) => admit(&ctx, &connect, n, &peer).await,
        Err(refusal) => Err(refusal),
    };
    let (negotiated, identity) = match admitted {
        Ok(a) => a,
        Err(refusal) => {
            refuse(&ctx, &mut io, protocol, refusal).await;
            return None;
        }
    };
    tracing::Span::current().record("client_id", tracing::field::display(&negotiated.client_id));

    // Take over: the previous connection of this client id saves its session and exits first,
    // so what follows sees its final state [MQTT-3.1.4-3].
    let (mailbox_tx, mailbox) = crate::mailbox::mailbox();
    let own_mailbox = mailbox_tx.clone();
    let (exit, exited) = watch::channel(());
    let info = ClientInfo {
        client_id: negotiated.client_id.clone(),
        username: identity.username.clone(),
        protocol,
        peer: peer.addr,
        listener: peer.listener,
        connected_at_ms: now_ms(),
        keep_alive: negotiated.keep_alive,
        clean_start: negotiated.clean_start,
        session_expiry: negotiated.session_expiry,
        established: Default::default(),
        closing: Default::default(),
    };
    let info = Arc::new(info);
    if let Some(prev) = ctx.registry.claim(info.clone(), conn, mailbox_tx, exited) {
        tracing::debug!(previous = %prev.conn, "taking over the session from another connection");
        let _ = prev.mailbox.send(ConnMsg::TakenOver);
        if tokio::time::timeout(TAKEOVER_WAIT, wait_exited(prev.exited)).await.is_err() {
            tracing::warn!(previous = %prev.conn, "previous connection did not finish within {TAKEOVER_WAIT:?}; continuing");
        }
    }
    ctx.lifecycle.cancel(&negotiated.client_id);

    let claimed = claim(&ctx, &negotiated.client_id, conn).await;
    let resumed = match claimed {
        Ok(ref c) => resume(&ctx, &negotiated, conn, c.as_ref()).await,
        Err(ref e) => Err(e.clone()),
    };
    let resumed = match resumed {
        Ok(r) => r,
        Err(detail) => {
            ctx.registry.release(&negotiated.client_id, conn);
            tracing::error!(error = %detail, "session store unavailable; connection refused");
            refuse(&ctx, &mut io, protocol, Refusal { reason: ReasonCode::ServerUnavailable, detail }).await;
            return None;
        }
    };

    let mut connack = ConnAck::new(ReasonCode::Success, resumed.session_present);
    connack.properties = negotiated.connack.clone();
    io.output.queue(&Packet::ConnAck(connack), protocol);
    info.established.store(true, std::sync::atomic::Ordering::Relaxed);
    ctx.metrics.connects.get_or_create(&Metrics::code(ReasonCode::Success)).inc();
    tracing::debug!(protocol = %protocol, session_present = resumed.session_present, persistent = resumed.state.persistent(), "connected");

    let keep_alive = (negotiated.keep_alive > 0).then(|| Duration::from_millis(u64::from(negotiated.keep_alive) * 1500));
    let window = negotiated.client_receive_maximum.min(ctx.limits.max_inflight);
    let mut connection = Connection {
        io,
        conn,
        protocol,
        client_id: negotiated.client_id.clone(),
        identity,
        _slot: slot,
        rates: rates(&ctx),
        session: resumed.state,
        keep_alive,
        deadline: Instant::now() + keep_alive.unwrap_or(Duration::ZERO),
        outbound: Outbound::new(window, ctx.limits.max_queued_messages as usize),
        inbound: Inbound::with_awaiting(resumed.inbound, ctx.cluster.is_some()),
        aliases_in: InboundAliases::new(ctx.limits.topic_alias_maximum),
        aliases_out: OutboundAliases::new(if protocol.is_v5() { negotiated.client_topic_alias_maximum } else { 0 }),
        client_max_packet_size: negotiated.client_max_packet_size as usize,
        ops: FuturesOrdered::new(),
        mailbox,
        resume_floor: 0,
        held: VecDeque::new(),
        backlog: None,
        store_ops: Vec::new(),
        reported: Default::default(),
        publish_latency: ctx.metrics.publish_latency_by_qos(),
        shutdown,
        _exit: exit,
        ctx,
    };
    connection.restore(resumed.queue);
    if claimed.ok().flatten().is_some_and(|c| c.taken_over) {
        // A newer connection on another proxy claimed the client while this one was still
        // claiming: it ends at once, as if taken over.
        let _ = own_mailbox.send(ConnMsg::TakenOver);
    }
    Some(Box::new(connection))
}

/// A full per-client bucket for a rate (one second's burst), or none for 0.
/// The connection's local rate limits, if any are set (fleet-wide ones get their state at first
/// use).
fn rates(ctx: &Context) -> Option<Box<super::Rates>> {
    let (messages, bytes) = (bucket(ctx.limits.max_publish_rate), bucket(ctx.limits.max_publish_bytes_rate));
    (messages.is_some() || bytes.is_some()).then(|| Box::new(super::Rates { messages, bytes, ..super::Rates::default() }))
}

fn bucket(rate: u32) -> Option<TokenBucket> {
    (rate > 0).then(|| TokenBucket::new(f64::from(rate), f64::from(rate), Instant::now()))
}

/// Authentication (the chain of `crate::auth`, bounded by the CONNECT timeout so that a queue
/// of password checks cannot hold connections forever), the client id a certificate imposes,
/// and the will's topic against the ACL.
async fn admit(ctx: &Context, connect: &Connect, mut n: Negotiated, peer: &Peer) -> Result<(Negotiated, Identity), Refusal> {
    let auth = &ctx.settings.auth;
    let login = Login {
        client_id: &n.client_id,
        username: connect.username.as_deref(),
        password: connect.password.as_deref(),
        cert: peer.cert.as_ref(),
    };
    let identity = match tokio::time::timeout(ctx.settings.connect_timeout, auth.authenticate(login)).await {
        Ok(Ok(identity)) => identity,
        Ok(Err(denied)) => {
            ctx.metrics.auth_failures.get_or_create(&ReasonLabel { reason: denied.cause }).inc();
            tracing::info!(peer = %peer.addr, cause = denied.cause, detail = %denied.detail, "authentication failed");
            return Err(Refusal { reason: denied.reason, detail: denied.detail });
        }
        Err(_) => {
            ctx.metrics.auth_failures.get_or_create(&ReasonLabel { reason: "timeout" }).inc();
            return Err(Refusal { reason: ReasonCode::ServerBusy, detail: "authentication took too long; try again".into() });
        }
    };
    if let Some(id) = identity.client_id.as_deref().filter(|id| **id != *n.client_id) {
        // The certificate names the client; a 5.0 client learns the id it got.
        n.client_id = id.into();
        if connect.protocol.is_v5() {
            n.connack.assigned_client_identifier = Some(id.into());
        }
    }
    if let Some(will) = &n.will {
        if !auth.allows(&identity, &n.client_id, Action::Publish, &will.message.topic) {
            ctx.metrics.acl_denied.get_or_create(&ReasonLabel { reason: "will" }).inc();
            return Err(Refusal {
                reason: ReasonCode::NotAuthorized,
                detail: format!("not allowed to publish the will to {}", will.message.topic),
            });
        }
    }
    tracing::debug!(method = identity.method, username = identity.username.as_deref().unwrap_or(""), "authenticated");
    Ok((n, identity))
}

/// The cluster's claim of a client id for this connection.
struct Claimed {
    epoch: u64,
    has_session: bool,
    /// A newer connection elsewhere won while this one was claiming.
    taken_over: bool,
}

/// Cluster: takes the client id in Redis (bumping its connection epoch) and tells the proxy
/// that had it to close its connection. `None` on a single node.
async fn claim(ctx: &Context, client_id: &ByteString, conn: ConnId) -> Result<Option<Claimed>, String> {
    let Some(c) = &ctx.cluster else { return Ok(None) };
    let claim = c.redis.claim(client_id, &c.id).await.map_err(|e| e.to_string())?;
    if let Some(previous) = claim.previous_owner.as_deref().filter(|p| *p != c.id) {
        tracing::debug!(previous_proxy = previous, "taking over the session from another proxy");
        if let Err(e) = c.redis.notify_takeover(previous, client_id, claim.epoch).await {
            tracing::warn!(previous_proxy = previous, error = %e, "could not tell the previous proxy; its connection ends at its next keep-alive");
        }
    }
    let taken_over = !ctx.registry.set_epoch(client_id, conn, claim.epoch);
    Ok(Some(Claimed { epoch: claim.epoch, has_session: claim.has_session, taken_over }))
}

/// Reads until a complete first packet, which must be CONNECT [MQTT-3.1.0-1].
async fn first_packet<R, W>(ctx: &Context, io: &mut Io<R, W>, shutdown: &CancellationToken) -> Option<Box<mqfleet_codec::Connect>>
where
    R: AsyncRead + super::io::Readiness + Unpin,
    W: AsyncWrite + Unpin,
{
    let deadline = Instant::now() + ctx.settings.connect_timeout;
    loop {
        let level = io.input.peek_connect_level();
        match io.input.next_packet(Protocol::V3_1_1) {
            Ok(Some(Packet::Connect(c))) => return Some(c),
            Ok(Some(other)) => {
                count_error(ctx, ReasonCode::ProtocolError);
                tracing::debug!(packet = %other.packet_type(), "first packet is not CONNECT (MQTT-3.1.0-1); closing");
                return None;
            }
            Ok(None) => {}
            Err(e) => {
                answer_bad_connect(ctx, io, &e, level).await;
                return None;
            }
        }
        tokio::select! {
            r = io.input.read() => match r {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
            () = tokio::time::sleep_until(deadline) => {
                ctx.metrics.disconnects.get_or_create(&crate::metrics::ReasonLabel { reason: "connect_timeout" }).inc();
                tracing::debug!(timeout = ?ctx.settings.connect_timeout, "no complete CONNECT in time; closing");
                return None;
            }
            () = shutdown.cancelled() => return None,
        }
    }
}

/// A first packet that cannot be decoded: answer with CONNACK where the version is known.
async fn answer_bad_connect<R, W>(ctx: &Context, io: &mut Io<R, W>, e: &DecodeError, level: Option<u8>)
where
    R: AsyncRead + super::io::Readiness + Unpin,
    W: AsyncWrite + Unpin,
{
    count_error(ctx, e.reason_code());
    tracing::debug!(error = %e, "invalid CONNECT; closing");
    let protocol = match (e, level) {
        // [MQTT-3.1.2-2]: unsupported level → 0x84 (5.0 format above 5, 3.1.1's 0x01 below).
        (DecodeError::UnsupportedProtocol { level, .. }, _) => {
            if *level > 5 {
                Protocol::V5
            } else {
                Protocol::V3_1_1
            }
        }
        (_, Some(5)) => Protocol::V5,
        // A malformed 3.1.1 CONNECT has no CONNACK code to describe it: close.
        _ => return,
    };
    let mut ack = ConnAck::new(e.reason_code(), false);
    if protocol.is_v5() {
        ack.properties.reason_string = Some(e.to_string().into());
    }
    io.output.queue(&Packet::ConnAck(ack), protocol);
    let _ = tokio::time::timeout(Duration::from_secs(1), io.output.flush_all()).await;
    io.output.shutdown().await;
}

async fn refuse<R, W>(ctx: &Context, io: &mut Io<R, W>, protocol: Protocol, refusal: Refusal)
where
    R: AsyncRead + super::io::Readiness + Unpin,
    W: AsyncWrite + Unpin,
{
    ctx.metrics.connects.get_or_create(&Metrics::code(refusal.reason)).inc();
    tracing::debug!(reason = %refusal.reason, detail = %refusal.detail, "CONNECT refused");
    let mut ack = ConnAck::new(refusal.reason, false);
    if protocol.is_v5() {
        ack.properties.reason_string = Some(refusal.detail.into());
        if refusal.reason == ReasonCode::UseAnotherServer {
            ack.properties.server_reference = ctx.server_reference();
        }
    }
    io.output.queue(&Packet::ConnAck(ack), protocol);
    let _ = tokio::time::timeout(Duration::from_secs(1), io.output.flush_all()).await;
    io.output.shutdown().await;
}

fn count_error(ctx: &Context, code: ReasonCode) {
    ctx.metrics.protocol_errors.get_or_create(&Metrics::code(code)).inc();
}

fn random_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..16).map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)])).collect()
}

struct Resumed {
    session_present: bool,
    state: SessionState,
    queue: Vec<QueuedMessage>,
    inbound: Vec<u16>,
}

/// Loads, creates or discards the stored session, and points the shards at this connection.
async fn resume(ctx: &Arc<Context>, n: &Negotiated, conn: ConnId, claimed: Option<&Claimed>) -> Result<Resumed, String> {
    let id = n.client_id.to_string();
    let store = &ctx.store;
    let may_exist = claimed.map_or_else(|| store.may_have_session(&id), |c| c.has_session);
    let mut existing = if may_exist { store.load_session(&id).await.map_err(|e| e.to_string())? } else { None };
    let epoch = claimed.map_or_else(|| existing.as_ref().map_or(1, |r| r.epoch + 1), |c| c.epoch);
    if n.clean_start && existing.take().is_some() {
        ctx.end_stored_session(&n.client_id, Some(epoch)).await.map_err(|e| e.to_string())?;
    }
    let session_present = existing.is_some();
    let subscriptions: BTreeMap<_, _> =
        existing.as_ref().map(|r| r.subscriptions.iter().map(|s| (s.filter.as_str().into(), s.clone())).collect()).unwrap_or_default();
    let state = SessionState {
        expiry: n.session_expiry,
        expiry_zero_at_connect: n.session_expiry == 0,
        subscriptions,
        will: n.will.clone().map(Box::new),
        epoch,
    };
    let persistent = state.persistent();
    if persistent {
        let record = SessionRecord {
            client_id: id.clone(),
            protocol_level: n.protocol.level(),
            expiry_interval: state.expiry,
            subscriptions: state.subscriptions.values().cloned().collect(),
            will: state.will.as_deref().map(crate::lifecycle::stored_will),
            epoch: state.epoch,
            connected: true,
            disconnected_at_ms: 0,
        };
        store.write(vec![Op::PutSession(record)]).await.map_err(|e| e.to_string())?;
        if !session_present {
            ctx.metrics.persistent_sessions.inc();
        }
    }

    // Point the shards at this connection first, then read the queue. A shard replies to
    // Attach only after every earlier message for this session is committed, so the queue read
    // afterwards holds all of them; later ones come live (and, being also in the queue, are
    // recognised by their position: `resume_floor`). The other order loses a message routed
    // between the read and the attach until the next reconnect.
    if !state.subscriptions.is_empty() {
        let session = SessionInfo { client_id: n.client_id.clone(), conn: Some(conn), persistent };
        let calls = ctx.shards.links_for(state.subscriptions.keys()).into_iter().map(|link| {
            let session = session.clone();
            async move { link.call(|id| Request::Attach { id, session }).await }
        });
        let replies = futures::future::join_all(calls).await.into_iter().collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
        debug_assert!(replies.iter().all(|r| *r == Reply::Done));
    }
    let (queue, inbound) = match &existing {
        Some(_) => {
            (store.load_queue(&id, now_ms()).await.map_err(|e| e.to_string())?, store.load_inbound(&id).await.map_err(|e| e.to_string())?)
        }
        None => (Vec::new(), Vec::new()),
    };
    if !persistent && session_present {
        // Resumed with expiry 0: the session now lives only as long as this connection; what
        // it had queued was loaded above.
        ctx.end_stored_session(&n.client_id, Some(epoch)).await.map_err(|e| e.to_string())?;
    }
    if let (Some(c), Some(will)) = (&ctx.cluster, &state.will) {
        // Where any proxy finds it if this one dies: a crash still publishes the will.
        c.redis.set_will(&id, epoch, Some(&crate::lifecycle::stored_will(will))).await.map_err(|e| e.to_string())?;
    }
    if ctx.cluster.is_some() && !state.subscriptions.is_empty() {
        let items = state.subscriptions.values().map(crate::subscribe_item).collect();
        ctx.registry.set_subscriptions(conn, SessionInfo { client_id: n.client_id.clone(), conn: Some(conn), persistent }, items);
    }
    Ok(Resumed { session_present, state, queue, inbound })
}
