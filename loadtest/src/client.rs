//! The lean MQTT client of the swarm: one struct per connection, no task and no channel of
//! its own — the simulated device's task drives it. It keeps only what the protocol needs
//! (packet ids in flight, QoS 2 ids awaiting PUBREL) plus a read and a write buffer that stay
//! small while the connection is idle.
//!
//! rumqttc is the reference client for correctness (the proxy's tests use it); for swarms its
//! event loop task, request channel and state per connection cost far more memory than this
//! (figures in docs/BENCHMARKS.md).
//!
//! # Cancel safety
//! [`ReadSide::read`] and [`WriteSide::write_some`] keep their state in the struct, so a
//! device races them in one `select!` (through the `rx` and `tx` fields) and handles what was
//! read with [`Client::poll_event`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use mqfleet_codec::{
    decode_packet, Ack, ByteString, ConnAck, Connect, Disconnect, Packet, PacketId, Protocol, Publish, PublishProperties, QoS, ReasonCode,
    SubAck, Subscribe, SubscriptionOptions, Will,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::transport::{self, Reader, Target, Writer};

/// How a device connects.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub protocol: Protocol,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    /// MQTT 5 Session Expiry Interval.
    pub session_expiry: Option<u32>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    pub timeout: Duration,
}

/// What went wrong, with the categories the report counts.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("no CONNACK within {0:?}")]
    Timeout(Duration),
    #[error("CONNACK refused: {0}")]
    Refused(ReasonCode),
    #[error("broker sent DISCONNECT {0}")]
    Disconnected(ReasonCode),
    #[error("connection closed by the broker")]
    Closed,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("broker sent an invalid packet: {0}")]
    Decode(#[from] mqfleet_codec::DecodeError),
    #[error("broker broke the protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Short label for the report's error counts.
    pub fn kind(&self) -> String {
        match self {
            ClientError::Connect(_) => "connect_failed".into(),
            ClientError::Timeout(_) => "connect_timeout".into(),
            ClientError::Refused(r) => format!("connack_0x{:02x}", *r as u8),
            ClientError::Disconnected(r) => format!("disconnect_0x{:02x}", *r as u8),
            ClientError::Closed => "closed_by_broker".into(),
            ClientError::Io(_) => "io".into(),
            ClientError::Decode(_) => "invalid_packet".into(),
            ClientError::Protocol(_) => "protocol".into(),
        }
    }
}

/// A QoS 1/2 PUBLISH of ours the broker has not completed yet; `tag` is the caller's.
#[derive(Debug, Clone)]
pub struct Pending {
    pub qos: QoS,
    pub tag: (u32, u64),
    pub released: bool,
    /// The PUBLISH as sent, to send again (DUP) on the next connection of a persistent session.
    pub packet: Publish,
}

/// What a persistent session keeps from one connection to the next on the client's side
/// (MQTT 5 §4.1): our QoS 1/2 PUBLISHes not completed — sent again with their packet ids, or
/// their PUBREL — and the QoS 2 ids we received and have not seen released.
#[derive(Debug, Default)]
pub struct SessionState {
    inflight: HashMap<u16, Pending>,
    next_id: u16,
    awaiting_rel: HashSet<u16>,
}

/// What the broker sent that the device cares about.
#[derive(Debug)]
pub enum Event {
    Publish(Publish),
    /// Our QoS 1/2 PUBLISH completed (PUBACK / PUBCOMP); `refused` carries a 5.0 error reason.
    Acked {
        pending: Pending,
        refused: Option<ReasonCode>,
    },
    SubAck(SubAck),
    UnsubAck,
    Pong,
}

/// The reading half: bytes from the broker.
pub struct ReadSide {
    reader: Reader,
    buf: BytesMut,
    /// Reservation size: starts small (an idle device receives only PINGRESP) and doubles when
    /// a read fills what was free, up to 64 KiB.
    chunk: usize,
}

/// The writing half: packets waiting to be written.
pub struct WriteSide {
    writer: Writer,
    buf: BytesMut,
    last_write: Instant,
    /// Written but not flushed: TLS and WebSocket streams buffer until flushed.
    unflushed: bool,
}

impl ReadSide {
    /// Reads what the socket has; `Err(Closed)` at end of stream.
    pub async fn read(&mut self) -> Result<(), ClientError> {
        if self.buf.capacity() - self.buf.len() < 64 {
            self.buf.reserve(self.chunk);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = self.reader.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        if n == spare {
            self.chunk = (self.chunk * 2).min(64 * 1024);
        }
        Ok(())
    }
}

impl WriteSide {
    pub fn has_output(&self) -> bool {
        !self.buf.is_empty() || self.unflushed
    }

    /// One write of what is queued, or the flush that follows the last write.
    pub async fn write_some(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            self.writer.flush().await?;
            self.unflushed = false;
            return Ok(());
        }
        let n = self.writer.write(&self.buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.buf.advance(n);
        self.unflushed = true;
        self.last_write = Instant::now();
        if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
            self.buf = BytesMut::new();
        }
        Ok(())
    }
}

pub struct Client {
    pub rx: ReadSide,
    pub tx: WriteSide,
    pub protocol: Protocol,
    next_id: u16,
    inflight: HashMap<u16, Pending>,
    awaiting_rel: HashSet<u16>,
    /// Topic aliases the broker defined for us.
    aliases: HashMap<u16, ByteString>,
    keep_alive: Option<Duration>,
    /// New QoS 2 PUBLISHes (DUP 0) whose packet id still awaited its PUBREL: the broker reused
    /// an id before the exchange completed [MQTT-4.3.3-10 makes us drop them: a loss the
    /// broker caused]. Counted so that a run can tell.
    pub reused_ids: u64,
}

impl Client {
    /// Connects and completes the CONNECT/CONNACK exchange.
    pub async fn connect(
        target: &Target,
        tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
        source: Option<std::net::IpAddr>,
        o: &ConnectOptions,
    ) -> Result<(Client, ConnAck), ClientError> {
        let fut = async {
            let (reader, writer) = transport::connect(target, tls, source).await.map_err(ClientError::Connect)?;
            let mut c = Client {
                rx: ReadSide { reader, buf: BytesMut::new(), chunk: 256 },
                tx: WriteSide { writer, buf: BytesMut::new(), last_write: Instant::now(), unflushed: false },
                protocol: o.protocol,
                next_id: 1,
                inflight: HashMap::new(),
                awaiting_rel: HashSet::new(),
                aliases: HashMap::new(),
                reused_ids: 0,
                keep_alive: (o.keep_alive > 0).then(|| Duration::from_secs(u64::from(o.keep_alive))),
            };
            let mut connect = Connect::new(o.protocol, o.client_id.as_str());
            connect.clean_start = o.clean_start;
            connect.keep_alive = o.keep_alive;
            connect.username = o.username.as_deref().map(Into::into);
            connect.password = o.password.clone().map(Bytes::from);
            connect.will = o.will.clone();
            if o.protocol.is_v5() {
                connect.properties.session_expiry_interval = o.session_expiry;
                connect.properties.topic_alias_maximum = Some(16);
            }
            c.queue(&Packet::Connect(Box::new(connect)));
            c.flush().await?;
            match c.read_packet().await? {
                Packet::ConnAck(a) if a.reason == ReasonCode::Success => Ok((c, a)),
                Packet::ConnAck(a) => Err(ClientError::Refused(a.reason)),
                other => Err(ClientError::Protocol(format!("{} before CONNACK", other.packet_type()))),
            }
        };
        tokio::time::timeout(o.timeout, fut).await.map_err(|_| ClientError::Timeout(o.timeout))?
    }

    fn queue(&mut self, p: &Packet) {
        // Our own packets are built from valid parts.
        let _ = p.encode(self.protocol, &mut self.tx.buf);
    }

    fn allocate(&mut self) -> PacketId {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return PacketId::new(id).expect("ids skip 0");
            }
        }
    }

    /// The session state this connection leaves for the next one (see [`SessionState`]).
    pub fn take_session(&mut self) -> SessionState {
        SessionState {
            inflight: std::mem::take(&mut self.inflight),
            next_id: self.next_id,
            awaiting_rel: std::mem::take(&mut self.awaiting_rel),
        }
    }

    /// Resumes a session the broker kept (CONNACK Session Present): incomplete PUBLISHes go
    /// again with their ids and DUP, released ones get their PUBREL again [MQTT-4.4.0-1]; a
    /// received QoS 2 id not yet released stays known, so its resend is not delivered twice.
    /// Without Session Present the state is simply dropped.
    pub fn resume_session(&mut self, s: SessionState) {
        let mut ids: Vec<u16> = s.inflight.keys().copied().collect();
        ids.sort_unstable();
        for id in &ids {
            let p = &s.inflight[id];
            if p.released {
                self.queue(&Packet::PubRel(Ack::new(PacketId::new(*id).expect("ids skip 0"))));
            } else {
                let mut again = p.packet.clone();
                again.dup = true;
                self.queue(&Packet::Publish(again));
            }
        }
        self.inflight = s.inflight;
        self.next_id = s.next_id.max(1);
        self.awaiting_rel = s.awaiting_rel;
    }

    /// Our QoS 1/2 PUBLISHes not completed yet.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Queues a PUBLISH; `tag` comes back in [`Event::Acked`].
    pub fn publish(&mut self, topic: &str, qos: QoS, payload: Bytes, retain: bool, properties: PublishProperties, tag: (u32, u64)) {
        let pkid = (qos != QoS::AtMostOnce).then(|| self.allocate());
        let mut p = Publish::new(topic, qos, payload, pkid);
        p.retain = retain;
        p.properties = properties;
        self.queue(&Packet::Publish(p.clone()));
        if let Some(id) = pkid {
            self.inflight.insert(id.get(), Pending { qos, tag, released: false, packet: p });
        }
    }

    pub fn subscribe(&mut self, filters: Vec<(String, SubscriptionOptions)>, id: Option<u32>) {
        let pkid = self.allocate();
        let mut s = Subscribe::new(pkid, filters.into_iter().map(|(f, o)| (ByteString::from(f), o)).collect());
        if self.protocol.is_v5() {
            s.properties = mqfleet_codec::SubscribeProperties::with_id(id);
        }
        self.queue(&Packet::Subscribe(s));
    }

    pub fn has_output(&self) -> bool {
        self.tx.has_output()
    }

    pub async fn write_some(&mut self) -> std::io::Result<()> {
        self.tx.write_some().await
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        while self.tx.has_output() {
            self.tx.write_some().await?;
        }
        Ok(())
    }

    /// When a PINGREQ is due (keep-alive without other traffic), if ever.
    pub fn ping_at(&self) -> Option<Instant> {
        self.keep_alive.map(|k| self.tx.last_write + k * 3 / 4)
    }

    pub fn ping(&mut self) {
        self.queue(&Packet::PingReq);
        // Counts as traffic, so the next ping is a full interval away even before the write.
        self.tx.last_write = Instant::now();
    }

    /// Reads until one packet is complete.
    async fn read_packet(&mut self) -> Result<Packet, ClientError> {
        loop {
            if let Some(p) = decode_packet(&mut self.rx.buf, self.protocol, usize::MAX)? {
                return Ok(p);
            }
            self.rx.read().await?;
        }
    }

    /// The next event; waits for the broker as needed.
    pub async fn next(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(e) = self.poll_event()? {
                return Ok(e);
            }
            self.rx.read().await?;
        }
    }

    /// The next event from bytes already read, without waiting. Answers the broker's QoS
    /// flows and pings by itself.
    pub fn poll_event(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            let Some(p) = decode_packet(&mut self.rx.buf, self.protocol, usize::MAX)? else {
                if self.rx.buf.is_empty() && self.rx.buf.capacity() > 64 * 1024 {
                    self.rx.buf = BytesMut::new();
                }
                return Ok(None);
            };
            if let Some(e) = self.handle(p)? {
                return Ok(Some(e));
            }
        }
    }

    fn handle(&mut self, p: Packet) -> Result<Option<Event>, ClientError> {
        match p {
            Packet::Publish(mut p) => {
                if let Some(alias) = p.properties.topic_alias {
                    if p.topic.is_empty() {
                        p.topic = self
                            .aliases
                            .get(&alias)
                            .cloned()
                            .ok_or_else(|| ClientError::Protocol(format!("unknown topic alias {alias}")))?;
                    } else {
                        self.aliases.insert(alias, p.topic.clone());
                    }
                }
                match (p.qos, p.pkid) {
                    (QoS::AtLeastOnce, Some(id)) => self.queue(&Packet::PubAck(Ack::new(id))),
                    (QoS::ExactlyOnce, Some(id)) => {
                        self.queue(&Packet::PubRec(Ack::new(id)));
                        // Method B (MQTT 5 §4.3.3): deliver once, remember the id until PUBREL.
                        if !self.awaiting_rel.insert(id.get()) {
                            if !p.dup {
                                self.reused_ids += 1;
                            }
                            return Ok(None);
                        }
                    }
                    _ => {}
                }
                Ok(Some(Event::Publish(p)))
            }
            Packet::PubAck(a) => Ok(self
                .inflight
                .remove(&a.pkid.get())
                .map(|pending| Event::Acked { pending, refused: a.reason.is_error().then_some(a.reason) })),
            Packet::PubRec(a) => {
                if a.reason.is_error() {
                    return Ok(self.inflight.remove(&a.pkid.get()).map(|pending| Event::Acked { pending, refused: Some(a.reason) }));
                }
                if let Some(p) = self.inflight.get_mut(&a.pkid.get()) {
                    p.released = true;
                }
                self.queue(&Packet::PubRel(Ack::new(a.pkid)));
                Ok(None)
            }
            Packet::PubComp(a) => Ok(self.inflight.remove(&a.pkid.get()).map(|pending| Event::Acked { pending, refused: None })),
            Packet::PubRel(a) => {
                self.awaiting_rel.remove(&a.pkid.get());
                self.queue(&Packet::PubComp(Ack::new(a.pkid)));
                Ok(None)
            }
            Packet::SubAck(s) => Ok(Some(Event::SubAck(s))),
            Packet::UnsubAck(_) => Ok(Some(Event::UnsubAck)),
            Packet::PingResp => Ok(Some(Event::Pong)),
            Packet::Disconnect(d) => Err(ClientError::Disconnected(d.reason)),
            other => Err(ClientError::Protocol(format!("unexpected {}", other.packet_type()))),
        }
    }

    /// Sends DISCONNECT and closes.
    pub async fn disconnect(mut self) {
        self.queue(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
        let _ = self.tx.writer.shutdown().await;
    }

    /// Closes the socket without DISCONNECT, as a device losing its network would.
    pub async fn drop_connection(mut self) {
        let _ = self.tx.writer.shutdown().await;
    }
}
