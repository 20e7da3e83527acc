//! One task per connection: framed I/O, the session state machines of `crate::session`, and
//! the links to the shards.
//!
//! # Order of work
//! 1. [`handshake`]: the first packet must be a CONNECT within the connect timeout; the
//!    session is negotiated, a previous connection of the client id is taken over, the session
//!    is resumed or created, CONNACK is sent.
//! 2. [`Connection::run`]: one `select!` over shutdown, completed shard operations, the
//!    mailbox (deliveries, takeover), socket input, socket output and the keep-alive deadline.
//! 3. [`Connection::finish`]: tell the client why (5.0), publish or schedule the will, save or
//!    end the session, release the client id.
//!
//! Acknowledgements leave in the order their packets arrived: every operation that waits on a
//! shard or the store is a future in one ordered queue (`ops`).

mod backlog;
mod deliver;
mod end;
mod handshake;
mod inbound;
mod io;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use broker_shard::link::{ConnId, DeliveryOptions, LinkError};
use broker_shard::Message;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use mqfleet_codec::{ByteString, Disconnect, Packet, PacketId, Protocol, Publish, QoS, ReasonCode};
use session_store::{Op, StoredSubscription};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::{IpSlot, TokenBucket};
use crate::auth::cert::CertNames;
use crate::auth::Identity;
use crate::registry::{ConnMsg, ConnectionView};
use crate::session::alias::{InboundAliases, OutboundAliases};
use crate::session::connect::WillSpec;
use crate::session::inbound::Inbound;
use crate::session::outbound::Outbound;
use crate::Context;

pub use io::Io;

/// Who is at the other end, as the transport tells.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: std::net::SocketAddr,
    /// The listener it came through (`mqtt`, `mqtts`, `ws`, `wss`).
    pub listener: &'static str,
    /// Names from a verified client certificate.
    pub cert: Option<CertNames>,
}

/// How long delivery acknowledgements are retried while the store does not take them.
const ACK_PATIENCE: Duration = Duration::from_secs(60);

/// Serves one accepted connection until it ends.
pub async fn serve<R, W>(ctx: Arc<Context>, reader: R, writer: W, peer: Peer, shutdown: CancellationToken)
where
    R: AsyncRead + io::Readiness + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = ctx.registry.next_conn_id();
    let span = tracing::debug_span!("conn", conn = conn.0, peer = %peer.addr, client_id = tracing::field::Empty);
    async move {
        ctx.metrics.connections.inc();
        let io = Io::new(reader, writer, ctx.limits.max_packet_size as usize);
        let admitted = ctx.admission.admit(peer.addr.ip(), peer.listener);
        // Memory: this task lives as long as the connection, and an async fn's state is as
        // large as its largest await. The handshake and the end (auth, Redis, store and shard
        // round trips) are boxed, and so is the `Connection` (moved values keep their space in
        // an async state), so an established connection's task holds little more than its
        // main loop's state (see docs/BENCHMARKS.md, memory per idle connection).
        // (Each box is made in its own statement: a temporary in the awaiting statement keeps
        // its space in this state even after being moved into the box.)
        let handshake = Box::pin(handshake::run(ctx.clone(), io, conn, peer, admitted, shutdown));
        if let Some(connection) = handshake.await {
            let mut connection = connection;
            let end = connection.run().await;
            let finish = Box::pin((*connection).finish(end));
            finish.await;
        }
        ctx.metrics.connections.dec();
    }
    .instrument(span)
    .await
}

/// Why a connection ends.
#[derive(Debug)]
pub(crate) enum End {
    /// The client sent DISCONNECT; `will` is true for reason 0x04.
    Client {
        will: bool,
    },
    /// The client broke the protocol.
    Protocol {
        reason: ReasonCode,
        detail: String,
    },
    KeepAliveTimeout,
    /// The socket closed or failed.
    Network(Option<std::io::Error>),
    TakenOver,
    Shutdown,
    /// The server ends the connection for a reason of its own.
    Server {
        reason: ReasonCode,
        detail: String,
    },
}

impl End {
    fn label(&self) -> &'static str {
        match self {
            End::Client { .. } => "client_disconnect",
            End::Protocol { .. } => "protocol_error",
            End::KeepAliveTimeout => "keepalive_timeout",
            End::Network(_) => "network",
            End::TakenOver => "taken_over",
            End::Shutdown => "shutdown",
            End::Server { .. } => "server",
        }
    }
}

fn protocol_error(reason: ReasonCode, detail: impl Into<String>) -> End {
    End::Protocol { reason, detail: detail.into() }
}

fn link_down(e: LinkError) -> End {
    End::Server { reason: ReasonCode::ServerUnavailable, detail: e.to_string() }
}

/// Why a shard did not take a QoS 1/2 message.
#[derive(Debug)]
pub(crate) enum PublishFailed {
    /// A quota refused it (retained messages): the client is told, the connection stays.
    Quota(String),
    /// The shard or its store failed.
    Failed(String),
}

impl From<LinkError> for PublishFailed {
    fn from(e: LinkError) -> PublishFailed {
        match e {
            LinkError::Shard(broker_shard::link::ShardError::QuotaExceeded { .. }) => PublishFailed::Quota(e.to_string()),
            other => PublishFailed::Failed(other.to_string()),
        }
    }
}

/// A shard or store operation finished; its acknowledgement can go out.
pub(crate) enum OpDone {
    Published {
        pkid: PacketId,
        qos: QoS,
        result: Result<(), PublishFailed>,
    },
    Subscribed {
        pkid: PacketId,
        reasons: Vec<ReasonCode>,
        retained: Vec<(Arc<Message>, DeliveryOptions)>,
        failed: Option<String>,
    },
    Unsubscribed {
        pkid: PacketId,
        reasons: Vec<ReasonCode>,
        failed: Option<String>,
    },
    /// A QoS 2 delivery's packet id is durable: its PUBLISH may leave. `failed`: it could not
    /// be recorded, so it must not leave (see `deliver::send_new`).
    Marked {
        pkid: u16,
        failed: Option<String>,
    },
    /// A QoS 2 delivery's PUBREC is recorded: its PUBREL may leave (`failed`: it is not, see
    /// `deliver::on_pubrec`).
    Released {
        pkid: PacketId,
        failed: Option<String>,
    },
    /// An incoming QoS 2 packet id's PUBREL is recorded (the id is free again in the store):
    /// its PUBCOMP may leave (`failed`: it is not, see `inbound::on_pubrel`).
    Cleared {
        pkid: PacketId,
        failed: Option<String>,
    },
    /// Subscriptions the ACL no longer allows are gone from the shards and the store.
    Revoked {
        failed: Option<String>,
    },
}

/// Session state of this connection.
pub(crate) struct SessionState {
    /// Seconds the session outlives the connection; 0 ends it with the connection.
    pub expiry: u32,
    /// Expiry requested at CONNECT was 0 (then DISCONNECT may not raise it, MQTT 5 §3.14.2.2.2).
    pub expiry_zero_at_connect: bool,
    /// By filter as written by the client (with any `$share/…` prefix).
    pub subscriptions: BTreeMap<ByteString, StoredSubscription>,
    /// Boxed: a will is a whole message (about 280 bytes inline) that most connections of a
    /// fleet hold for their whole life without touching it.
    pub will: Option<Box<WillSpec>>,
    pub epoch: u64,
}

impl SessionState {
    pub fn persistent(&self) -> bool {
        self.expiry > 0
    }
}

/// Counts a connection adds to the proxy's gauges.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Reported {
    inflight: i64,
    queued: i64,
    subscriptions: i64,
    /// Socket bytes already added to the counters.
    bytes_in: u64,
    bytes_out: u64,
}

/// A connection's publish rate limits and where they stand.
#[derive(Default)]
pub(crate) struct Rates {
    /// Local limits: messages, bytes.
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    /// Tokens leased from the fleet-wide buckets in Redis (client, tenant), not yet spent.
    fleet_tokens: [u64; 2],
    /// The socket is not read before this.
    throttled_until: Option<Instant>,
}

/// The state of an accepted connection.
pub(crate) struct Connection<R, W> {
    ctx: Arc<Context>,
    io: Io<R, W>,
    conn: ConnId,
    protocol: Protocol,
    client_id: ByteString,
    /// Who authenticated, for ACL checks.
    identity: Identity,
    /// Counts this connection against its source address's limit.
    _slot: Option<IpSlot>,
    /// Publish rate limits, if any apply (boxed: most deployments set none).
    rates: Option<Box<Rates>>,
    session: SessionState,
    keep_alive: Option<Duration>,
    deadline: Instant,
    outbound: Outbound,
    inbound: Inbound,
    aliases_in: InboundAliases,
    aliases_out: OutboundAliases,
    client_max_packet_size: usize,
    /// Shard and store operations in the order their packets arrived.
    ops: FuturesOrdered<BoxFuture<'static, OpDone>>,
    /// Deliveries and control messages. Its senders live in the registry until `finish`
    /// releases this connection.
    mailbox: crate::mailbox::Receiver<ConnMsg>,
    /// Queue positions up to this one were loaded from the store at resume; live copies of
    /// them are duplicates.
    resume_floor: u64,
    /// PUBLISHes held back behind a QoS 2 delivery whose packet id is being made durable, so
    /// that order is kept; `Some(pkid)` marks the ones still waiting for their own mark.
    held: VecDeque<(Publish, Option<u16>)>,
    /// A persistent session's copies that did not fit `outbound`, waiting in its store queue
    /// (boxed: few connections ever have one).
    backlog: Option<Box<backlog::Backlog>>,
    /// Store writes nobody waits for (delivery acknowledgements), flushed once per loop turn.
    store_ops: Vec<Op>,
    /// This connection's share of the proxy-wide gauges, as last added to them.
    reported: Reported,
    /// `mqfleet_proxy_publish_seconds` by QoS.
    publish_latency: [prometheus_client::metrics::histogram::Histogram; 3],
    shutdown: CancellationToken,
    /// Dropped when this connection is completely finished; a connection taking over the
    /// client id waits for that.
    _exit: watch::Sender<()>,
}

impl<R, W> Connection<R, W>
where
    R: AsyncRead + io::Readiness + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    fn v5(&self) -> bool {
        self.protocol.is_v5()
    }

    fn send(&mut self, packet: Packet) {
        self.io.output.queue(&packet, self.protocol);
    }

    fn touch(&mut self) {
        if let Some(k) = self.keep_alive {
            self.deadline = Instant::now() + k;
        }
    }

    /// The main loop; returns why the connection ends.
    ///
    /// Input is read only while the write buffer is below the slow-consumer bound and fewer
    /// operations than our Receive Maximum are pending: a client that does not read, or floods
    /// us, is slowed down by TCP instead of growing our memory.
    async fn run(&mut self) -> End {
        // A resumed session's subscriptions meet the ACL as it is now (it may have changed
        // while the client was away, BAD-INPUT 70).
        if self.ctx.settings.auth.restricts(&self.identity) {
            if let Err(end) = Box::pin(self.recheck_subscriptions()).await {
                return end;
            }
        }
        // Packets pipelined behind CONNECT may already be buffered: handle them before waiting.
        if let Err(end) = Box::pin(self.on_input()).await {
            return end;
        }
        loop {
            self.flush_store_ops();
            self.report();
            if self.throttled_until().is_some_and(|t| t <= Instant::now()) {
                // Back within its rate (its timer fired, or the time passed while something
                // else was handled): packets already buffered go first — the socket may hold
                // nothing more to wake the read for them.
                if let Some(r) = &mut self.rates {
                    r.throttled_until = None;
                }
                if let Err(end) = Box::pin(self.on_input()).await {
                    return end;
                }
            }
            let throttled = self.throttled_until();
            let input_open = self.io.output.pending() < self.ctx.limits.max_write_buffer
                && self.ops.len() < usize::from(self.ctx.limits.receive_maximum)
                && throttled.is_none();
            // One timer for both the keep-alive deadline and the end of a throttle (each is a
            // timer entry in the state of every idle connection's task).
            let keepalive = self.keep_alive.map(|_| self.deadline);
            let wake = match (keepalive, throttled) {
                (Some(k), Some(t)) => Some(k.min(t)),
                (k, t) => k.or(t),
            };
            let backlog_read = self.backlog.as_mut().and_then(|b| b.reading.as_mut());
            let result = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => Err(End::Shutdown),
                Some(done) = self.ops.next(), if !self.ops.is_empty() => self.on_op_done(done),
                Some(msg) = self.mailbox.recv() => self.on_mailbox(msg).await,
                Some(queue) = futures::future::OptionFuture::from(backlog_read) => {
                    self.on_backlog_read(queue);
                    Ok(())
                }
                r = self.io.input.read(), if input_open => match r {
                    Ok(0) => Err(End::Network(None)),
                    // Boxed, one allocation per socket read (not per packet): awaited inline,
                    // handling a PUBLISH (a shard round trip's futures) would make this loop's
                    // state — what every idle connection holds for its whole life — about
                    // 3 KiB larger.
                    Ok(_) => Box::pin(self.on_input()).await,
                    Err(e) => Err(End::Network(Some(e))),
                },
                r = self.io.output.write_some(), if self.io.output.has_work() => r.map_err(|e| End::Network(Some(e))),
                // A throttle's end is handled at the top of the loop (a throttle moves the
                // keep-alive deadline past its own end).
                () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    if keepalive.is_some_and(|d| d <= Instant::now()) {
                        Err(End::KeepAliveTimeout)
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// Handles every complete packet in the read buffer.
    async fn on_input(&mut self) -> Result<(), End> {
        loop {
            if self.throttled_until().is_some() {
                return Ok(()); // the rest waits in the buffer until the client is back within its rate
            }
            match self.io.input.next_packet(self.protocol) {
                Ok(Some(p)) => {
                    self.touch();
                    self.on_packet(p).await?;
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(protocol_error(e.reason_code(), e.to_string())),
            }
        }
    }

    /// Charges a PUBLISH to the client's rate limits; over them, the socket rests until the
    /// buckets are out of debt (and the keep-alive deadline moves with it: the wait is ours).
    fn charge_publish(&mut self, payload_len: usize) {
        let Some(r) = &mut self.rates else { return };
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        if let Some(b) = &mut r.messages {
            wait = wait.max(b.take(1.0, now));
        }
        if let Some(b) = &mut r.bytes {
            wait = wait.max(b.take(payload_len as f64, now));
        }
        self.throttle(wait, "publish_rate");
    }

    fn throttled_until(&self) -> Option<Instant> {
        self.rates.as_ref().and_then(|r| r.throttled_until)
    }

    /// Charges a PUBLISH to the fleet-wide rates (buckets in Redis shared by every proxy): the
    /// client's own (`fleet_publish_rate`) and its tenant's — every client of its verified
    /// username (`fleet_tenant_publish_rate`). Tokens are leased a tenth of a second's worth at
    /// a time; when a bucket is empty the client is throttled like a local limit. If Redis
    /// cannot answer, the client is let through (a rate limit is not worth an outage) and the
    /// failure logged.
    fn fleet_rates_apply(&self) -> bool {
        let raw = &self.ctx.settings.raw;
        (raw.fleet_publish_rate > 0 || raw.fleet_tenant_publish_rate > 0) && self.ctx.cluster.is_some()
    }

    /// Takes one PUBLISH from the fleet-wide buckets. Only when [`Self::fleet_rates_apply`]
    /// (the caller checks, keeping the common case free of this future).
    async fn charge_fleet_publish(&mut self) {
        let raw = &self.ctx.settings.raw;
        let rates = [u64::from(raw.fleet_publish_rate), u64::from(raw.fleet_tenant_publish_rate)];
        for (lease, rate) in rates.into_iter().enumerate() {
            if rate == 0 {
                continue;
            }
            if self.rates.as_ref().is_none_or(|r| r.fleet_tokens[lease] == 0) {
                // Only here, about ten times a second at the rate, are keys built and Redis asked.
                let (key, limit) = match lease {
                    0 => (self.client_id.to_string(), "fleet_publish_rate"),
                    _ => match &self.identity.username {
                        Some(u) => (format!("tenant:{u}"), "fleet_tenant_publish_rate"),
                        None => continue,
                    },
                };
                let chunk = rate.div_ceil(10);
                let ctx = self.ctx.clone();
                let Some(cluster) = &ctx.cluster else { return };
                match cluster.redis.take_tokens(&key, "publish", rate, rate, chunk).await {
                    Ok(0) => self.throttle(Duration::from_secs_f64(chunk as f64 / rate as f64), limit),
                    Ok(n) => self.lease(lease, n),
                    Err(e) => {
                        tracing::warn!(error = %e, limit, "fleet-wide rate not checked: Redis did not answer");
                        self.lease(lease, chunk);
                    }
                }
            }
            if let Some(r) = &mut self.rates {
                r.fleet_tokens[lease] = r.fleet_tokens[lease].saturating_sub(1);
            }
        }
    }

    fn lease(&mut self, lease: usize, tokens: u64) {
        self.rates.get_or_insert_default().fleet_tokens[lease] = tokens;
    }

    /// Stops reading the socket for `wait` (nothing is dropped: TCP slows the client down).
    fn throttle(&mut self, wait: Duration, limit: &'static str) {
        if wait.is_zero() {
            return;
        }
        self.ctx.metrics.limited.get_or_create(&crate::metrics::ReasonLabel { reason: limit }).inc();
        let until = Instant::now() + wait;
        let r = self.rates.get_or_insert_default();
        r.throttled_until = Some(r.throttled_until.map_or(until, |t| t.max(until)));
        if let Some(k) = self.keep_alive {
            self.deadline = self.deadline.max(until + k);
        }
    }

    async fn on_mailbox(&mut self, msg: ConnMsg) -> Result<(), End> {
        match msg {
            ConnMsg::Deliver(message, recipient) => {
                self.on_deliver(message, recipient);
                Ok(())
            }
            ConnMsg::AclChanged => Box::pin(self.recheck_subscriptions()).await,
            ConnMsg::Inspect(reply) => {
                let _ = reply.send(ConnectionView {
                    subscriptions: self.session.subscriptions.values().cloned().collect(),
                    inflight: self.outbound.inflight_len(),
                    queued: self.outbound.pending_len(),
                    awaiting_release: self.inbound.unacknowledged(),
                    session_expiry: self.session.expiry,
                    has_will: self.session.will.is_some(),
                });
                Ok(())
            }
            ConnMsg::Kick { discard_session } => {
                if discard_session {
                    self.session.expiry = 0;
                }
                Err(End::Server { reason: ReasonCode::AdministrativeAction, detail: "disconnected by an operator".into() })
            }
            ConnMsg::TakenOver => Err(End::TakenOver),
            ConnMsg::Close(ReasonCode::UseAnotherServer) => {
                Err(End::Server { reason: ReasonCode::UseAnotherServer, detail: "this server is draining; connect to another".into() })
            }
            ConnMsg::Close(reason) => Err(End::Server { reason, detail: "closed by the server".into() }),
        }
    }

    /// Brings the proxy-wide gauges up to date with this connection's counts: a few compares
    /// per loop turn, an atomic add only when a count changed.
    fn report(&mut self) {
        let now = Reported {
            inflight: self.outbound.inflight_len() as i64,
            queued: self.outbound.pending_len() as i64,
            subscriptions: self.session.subscriptions.len() as i64,
            bytes_in: self.io.input.bytes,
            bytes_out: self.io.output.bytes,
        };
        let m = &self.ctx.metrics;
        let before = std::mem::replace(&mut self.reported, now);
        for (counter, was, is) in [(&m.bytes_received, before.bytes_in, now.bytes_in), (&m.bytes_sent, before.bytes_out, now.bytes_out)] {
            if is > was {
                counter.inc_by(is - was);
            }
        }
        for (gauge, was, is) in [
            (&m.inflight, before.inflight, now.inflight),
            (&m.queued, before.queued, now.queued),
            (&m.subscriptions, before.subscriptions, now.subscriptions),
        ] {
            if was != is {
                gauge.inc_by(is - was);
            }
        }
    }

    /// Takes this connection's counts out of the gauges (it ends), after adding its last bytes.
    fn unreport(&mut self) {
        self.report();
        let r = std::mem::take(&mut self.reported);
        let m = &self.ctx.metrics;
        m.inflight.dec_by(r.inflight);
        m.queued.dec_by(r.queued);
        m.subscriptions.dec_by(r.subscriptions);
    }

    fn flush_store_ops(&mut self) {
        if self.store_ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.store_ops);
        let store = self.ctx.store.clone();
        tokio::spawn(async move {
            // Retried through an outage: an acknowledgement the store never applies leaves a
            // delivered message in the session's queue, where it counts against the queue's
            // bound for as long as the connection lasts (found by the soak, finding 23: with a
            // Redis node down a quarter of the time, a connected subscriber's queue filled with
            // them and newer messages were refused as `queue_full`). Applying one twice, or
            // late, is harmless: positions are never reused (`scripts::ENQUEUE`).
            let mut backoff = mqfleet_ops::outage::Backoff::within(ACK_PATIENCE);
            loop {
                match store.write(ops.clone()).await {
                    Ok(_) => return,
                    Err(e) if !backoff.pause().await => {
                        // Then they only cause a redelivery at the next resume (QoS 1) or a
                        // resent PUBREL (QoS 2).
                        tracing::warn!(error = %e, "could not record delivery acknowledgements");
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "recording delivery acknowledgements failed; retrying"),
                }
            }
        });
    }

    fn disconnect_packet(&self, reason: ReasonCode, detail: &str) -> Packet {
        let mut d = Disconnect::new(reason);
        if !detail.is_empty() {
            d.properties.reason_string = Some(detail.into());
        }
        if reason == ReasonCode::UseAnotherServer {
            d.properties.server_reference = self.ctx.server_reference();
        }
        Packet::Disconnect(d)
    }
}

#[cfg(test)]
mod tests {
    /// Every connection of a fleet holds this for its whole life (docs/BENCHMARKS.md, "Memory
    /// per idle connection"): what only some connections need — a will, rate limits, alias
    /// maps — is boxed where it is used. Grows only on purpose.
    #[test]
    fn a_connection_stays_small() {
        type C = super::Connection<tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf>;
        let size = std::mem::size_of::<C>();
        assert!(size <= 832, "Connection is {size} bytes");
    }
}
