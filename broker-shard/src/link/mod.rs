//! The proxy <-> shard link: what crosses it, independent of how.
//!
//! A proxy holds one link per shard, carrying the traffic of all its devices. Requests flow
//! proxy → shard; replies and deliveries flow back as [`Event`]s. The shard emits events in the
//! order it received the requests, and a reply or delivery that depends on durable work (a QoS 1/2
//! message queued for a persistent session, a retained message) is emitted only after that work
//! is committed: so a PUBACK released on [`Reply::Done`] means "durable".
//!
//! Transports: [`local`] (in-process channels, single-node mode). The TCP transport of the
//! distributed mode carries the same enums as length-delimited frames.
//!
//! A message matching many subscribers on one proxy crosses the link once, as one [`Deliver`]
//! with the list of local recipients.

pub mod client;
pub mod frame;
pub mod local;
pub mod server;
pub mod tcp;

use std::fmt;
use std::sync::Arc;

use mqfleet_codec::{ByteString, QoS, SubscriptionOptions};

use crate::message::Message;

/// Identifies a proxy on the shard side of its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyId(pub u32);

/// A live connection, as numbered by its proxy. The shard hands it back in deliveries so the
/// proxy reaches the connection without a look-up by client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Correlates a request with its reply; unique per link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn-{}", self.0)
    }
}

/// A session as a shard needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub client_id: ByteString,
    /// `None` for a persistent session without a connection (restored at start-up).
    pub conn: Option<ConnId>,
    /// Outlives its connection: QoS 1/2 messages are queued durably for it.
    pub persistent: bool,
}

/// One filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeItem {
    /// As the client wrote it, including any `$share/{group}/` prefix; already validated.
    pub filter: ByteString,
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
}

/// What a published message is, beyond its content, for the store to record with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// A QoS 2 PUBLISH of a persistent session: its packet id is stored in the same commit as
    /// the message (see `session_store::Op::MarkInbound`).
    Qos2 { client_id: ByteString, pkid: u16 },
    /// A will: published only if the cluster says it is to be, once whoever sends it how often
    /// (see `session_store::Op::AcceptWill`).
    Will(WillRef),
}

/// Which will a message is: the connection it belongs to (`client_id`, `epoch`) and the proxy
/// publishing it (its id in the cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillRef {
    pub client_id: ByteString,
    pub epoch: u64,
    pub proxy: ByteString,
}

/// Proxy → shard.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Route a message. With an id, the shard replies once the message is durably accepted.
    Publish {
        id: Option<RequestId>,
        message: Arc<Message>,
        marker: Option<Marker>,
    },
    /// Add or replace subscriptions; the reply says which existed and carries the retained
    /// messages to send: with `deliver_retained`, those of the topics this shard owns under the
    /// ring of that epoch (0: a fixed ring), so that during a ring change exactly one shard
    /// answers for each topic.
    Subscribe {
        id: RequestId,
        session: SessionInfo,
        items: Vec<SubscribeItem>,
        deliver_retained: Option<u64>,
    },
    Unsubscribe {
        id: RequestId,
        client_id: ByteString,
        filters: Vec<ByteString>,
    },
    /// The session now has a connection: deliver to it instead of queueing.
    Attach {
        id: RequestId,
        session: SessionInfo,
    },
    /// The connection `conn` of a persistent session ended: queue for it from now on. Ignored
    /// if the session has another connection by now (it was taken over).
    Detach {
        client_id: ByteString,
        conn: ConnId,
    },
    /// The session ended: drop all its subscriptions. With `conn`, only if still on that
    /// connection.
    Forget {
        client_id: ByteString,
        conn: Option<ConnId>,
    },
    /// A member of a shared subscription left with this message unacknowledged: give it to
    /// another member of `share_filter`, not to `exclude`.
    Redispatch {
        message: Arc<Message>,
        share_filter: ByteString,
        exclude: ByteString,
    },
    /// After (re)connecting, the proxy has re-sent every subscription of its sessions on this
    /// shard. A restarted shard replays its log once its proxies are resynchronised.
    ResyncDone,
    /// The proxy has received every logged delivery up to these positions, per lane (see
    /// [`LogRef`]): the shard may forget them, and trims its log entries once every proxy that
    /// got a copy has said so.
    Received {
        accepted: u64,
        queued: u64,
    },
    /// Replies once everything requested before it is done, queueing for persistent sessions
    /// included (a barrier: a rebalance drains the old owner of a topic with it).
    Flush {
        id: RequestId,
    },
    /// Retained messages of topics this shard takes over in a ring change, from their previous
    /// owner: each replaces what this shard has for its topic, and `removed` topics lose
    /// theirs. The previous owner sends its whole set when the change is prepared, then every
    /// change it still receives for those topics, in order. Replies once durable.
    AdoptRetained {
        id: RequestId,
        messages: Vec<Arc<Message>>,
        removed: Vec<ByteString>,
    },
    /// What the shard holds (admin API): replies with [`Reply::Stats`] at once.
    Stats {
        id: RequestId,
    },
    /// Subscriptions of persistent sessions for topics this shard takes over, from their
    /// previous owner. A session this shard already knows keeps its route. Replies once durable.
    AdoptSubscriptions {
        id: RequestId,
        items: Vec<(ByteString, SubscribeItem)>,
    },
}

/// Shard → proxy answer to a request with an id.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Done,
    /// A QoS 1/2 message accepted into the shard's log at this position (clustered mode): as
    /// good as `Done` for the publisher; the position lets the proxy confirm it received the
    /// reply (see [`Request::Received`]).
    Accepted {
        position: u64,
    },
    Subscribed {
        existed: Vec<bool>,
        retained: Vec<(Arc<Message>, DeliveryOptions)>,
    },
    Unsubscribed {
        existed: Vec<bool>,
    },
    Stats(ShardStats),
}

/// What a shard holds, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShardStats {
    /// Sessions with a subscription here (connected or not).
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained_messages: u64,
    pub retained_bytes: u64,
    /// Accepted QoS 1/2 messages still in the log (clustered).
    pub log_entries: u64,
    /// Epoch of the ring this shard routes by (0: a fixed ring).
    pub ring_epoch: u64,
}

/// How one message is delivered to one session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeliveryOptions {
    /// The lower of the message's QoS and the subscription's [MQTT-3.8.4-8].
    pub qos: QoS,
    /// RETAIN flag to send: as published with Retain As Published, else 0 [MQTT-3.3.1-12].
    pub retain: bool,
    /// Identifiers of every matching subscription that has one [MQTT-3.3.4-4].
    pub subscription_ids: Vec<u32>,
}

/// One recipient of a [`Deliver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub conn: ConnId,
    pub delivery: DeliveryOptions,
    /// Position in the session's durable queue; the proxy acknowledges it there when the
    /// client acknowledges the message. `None` for deliveries nobody waits for on restart.
    pub seq: Option<u64>,
    /// Set when delivered through a shared subscription, for redispatch if not acknowledged.
    pub share_filter: Option<ByteString>,
}

/// A message for some connections of one proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Deliver {
    pub message: Arc<Message>,
    pub recipients: Vec<Recipient>,
    /// Where the message is in the shard's log (QoS 1/2 in clustered mode): the proxy confirms
    /// it with [`Request::Received`] and recognises it if the shard sends it again.
    pub log: Option<LogRef>,
}

/// A logged delivery's position and lane. A shard emits the deliveries of each lane in position
/// order, so one watermark per lane says what a proxy has received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRef {
    pub position: u64,
    /// `false`: a copy for sessions that are not persistent, sent once the message was accepted.
    /// `true`: copies for persistent sessions, sent once queued for them (every recipient has a
    /// `seq`).
    pub queued: bool,
}

/// Shard → proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Reply { id: RequestId, result: Result<Reply, ShardError> },
    Deliver(Deliver),
}

/// Why a shard refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("shard {shard} could not make the message durable: {detail}")]
    Store { shard: String, detail: String },
    #[error("shard {shard} refused the message: {detail}")]
    QuotaExceeded { shard: String, detail: String },
}

/// Why a request did not get a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("link to shard {shard} is down")]
    Down { shard: String },
    #[error("link to shard {shard} has {buffered} requests waiting; refusing more until it drains")]
    Busy { shard: String, buffered: usize },
    #[error("shard {shard} did not answer within {seconds} s")]
    Timeout { shard: String, seconds: u64 },
    #[error(transparent)]
    Shard(#[from] ShardError),
}
