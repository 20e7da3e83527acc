//! What the store keeps, and its versioned encoding.
//!
//! Every value is written as one version byte followed by its postcard encoding. Decoding a
//! value of an unknown version is an [`Error::Corrupt`], never a panic.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::Error;

/// Session expiry interval meaning "never expires" (MQTT 5 §3.1.2.11.2).
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// A persistent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub client_id: String,
    /// 3, 4 or 5.
    pub protocol_level: u8,
    /// Seconds the session outlives its connection; [`NEVER_EXPIRES`] for ever.
    pub expiry_interval: u32,
    pub subscriptions: Vec<StoredSubscription>,
    pub will: Option<StoredWill>,
    /// Incremented at every connection; fences writes of a connection that was taken over.
    pub epoch: u64,
    /// True while a connection owns the session. Still true after a crash: the will is then
    /// due at start-up.
    pub connected: bool,
    /// Unix time in ms when the session lost its connection; expiry counts from here.
    pub disconnected_at_ms: u64,
}

impl SessionRecord {
    /// Unix ms at which the session expires, or `None` for never / while connected.
    pub fn expires_at_ms(&self) -> Option<u64> {
        if self.connected || self.expiry_interval == NEVER_EXPIRES {
            return None;
        }
        Some(self.disconnected_at_ms + u64::from(self.expiry_interval) * 1000)
    }
}

/// A subscription of a persistent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    /// As subscribed, including a `$share/{group}/` prefix.
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// A will message waiting for its connection to end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredWill {
    /// The will as an encoded message (see `broker_shard::message`).
    pub message: Vec<u8>,
    /// Seconds between the end of the connection and the publication.
    pub delay_interval: u32,
    /// Message Expiry Interval of the will, counted from its publication.
    pub message_expiry_interval: Option<u32>,
}

/// How one queued message is delivered to one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Delivery {
    /// QoS of the delivery: the lower of the message's and the subscription's.
    pub qos: u8,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
}

/// Where a queued message is in its QoS flow with the subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DeliveryState {
    /// Not sent yet on the current or any earlier connection that we know of.
    #[default]
    Queued,
    /// Sent with this packet id; resent with DUP and the same id on resume [MQTT-4.4.0-1].
    Sent { pkid: u16 },
    /// QoS 2: PUBREC received, PUBREL sent; only PUBREL is resent on resume.
    Released { pkid: u16 },
}

/// An entry of a session queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Position in the session's queue; increases with every enqueue.
    pub seq: u64,
    /// The encoded message, shared by every session it was queued for.
    pub message: Bytes,
    pub delivery: Delivery,
    pub expires_at_ms: Option<u64>,
    pub state: DeliveryState,
}

/// A retained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRecord {
    pub topic: String,
    pub message: Bytes,
    pub expires_at_ms: Option<u64>,
}

/// One write operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// Creates or replaces a session record.
    PutSession(SessionRecord),
    /// Deletes a session with its queue. With `epoch` (Redis), only if no newer connection
    /// owns it, and the ownership itself stays.
    RemoveSession {
        client_id: String,
        epoch: Option<u64>,
    },
    /// Queues one message for several sessions; the message body is stored once.
    ///
    /// `origin` (shard name, log position) makes the enqueue idempotent per session when a
    /// shard replays its log after a crash: a position already queued for a session is not
    /// queued again.
    Enqueue {
        message: Bytes,
        expires_at_ms: Option<u64>,
        to: Vec<(String, Delivery)>,
        origin: Option<(String, u64)>,
    },
    /// Records progress of a delivery.
    SetState {
        client_id: String,
        seq: u64,
        state: DeliveryState,
    },
    /// Removes a delivered (or expired) entry.
    Ack {
        client_id: String,
        seq: u64,
    },
    /// Sets or replaces the retained message of a topic.
    PutRetained {
        topic: String,
        message: Bytes,
        expires_at_ms: Option<u64>,
    },
    RemoveRetained {
        topic: String,
    },
    /// A QoS 2 PUBLISH with this packet id was accepted; until [`Op::ClearInbound`], a resent
    /// PUBLISH with the id is a duplicate. Written by the shard in the same transaction as the
    /// message (single node), or before routing it ([`OpResult::Marked`] tells a resend).
    MarkInbound {
        client_id: String,
        pkid: u16,
        /// Who marks: the accepting log entry (`shard@position`), so that a retried write of
        /// this same mark is told apart from another copy's (a resend).
        by: String,
        /// Marks of refused acceptances being given back ([`Op::UnmarkInbound`]): a mark held by
        /// one of them is taken over, as if the id were new (that copy was never accepted).
        replacing: Vec<String>,
    },
    /// A refused acceptance gives its mark back: the packet id is unmarked if `by` holds it
    /// (and left alone if another acceptance does).
    UnmarkInbound {
        client_id: String,
        pkid: u16,
        by: String,
    },
    /// A shard holds in its log the will of connection `epoch` of `client_id`, sent by
    /// `proxy`, and asks whether to publish it ([`OpResult::WillAccepted`]): in a cluster each
    /// will is published once whoever sends it how often (see `RedisStore::accept_will`).
    /// `acceptance` names this acceptance (`<shard>@<log position>`).
    AcceptWill {
        client_id: String,
        epoch: u64,
        proxy: String,
        acceptance: String,
    },
    /// PUBREL received for this packet id.
    ClearInbound {
        client_id: String,
        pkid: u16,
    },
    /// Shard-local: a message accepted at this log position, kept until queued and delivered.
    AppendLog {
        position: u64,
        entry: Bytes,
    },
    /// Shard-local: the entry at this log position is done.
    TrimLog {
        position: u64,
    },
    /// Shard-local: a persistent session's subscription held by this shard.
    PutSubscription {
        client_id: String,
        filter: String,
        entry: Bytes,
    },
    /// Shard-local: one subscription of a session, or all of them (`filter: None`).
    RemoveSubscription {
        client_id: String,
        filter: Option<String>,
    },
}

/// Where one recipient's copy of an enqueued message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// In the session's queue at this position (for a replay: where the first time put it).
    At(u64),
    /// Not queued: the session does not exist (any more).
    NoSession,
    /// Not queued: the session's queue is at its bound.
    Full,
    /// Not queued: a replayed log entry whose copy was queued the first time and has been
    /// delivered and acknowledged since (clustered mode).
    Delivered,
}

impl Queued {
    /// The queue position, if the copy is queued.
    pub fn seq(self) -> Option<u64> {
        match self {
            Queued::At(seq) => Some(seq),
            _ => None,
        }
    }

    /// The drop reason a copy not queued is counted under (`dropped_messages_total`).
    pub fn drop_reason(self) -> Option<&'static str> {
        match self {
            Queued::At(_) => None,
            Queued::NoSession => Some("no_session"),
            Queued::Full => Some("queue_full"),
            Queued::Delivered => Some("delivered_before"),
        }
    }
}

/// Result of one [`Op`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Done,
    /// For [`Op::Enqueue`]: per recipient, where its copy went.
    Enqueued(Vec<Queued>),
    /// For [`Op::AcceptWill`]: publish it (true) or not (it was published already, or is
    /// another proxy's to publish now).
    WillAccepted(bool),
    /// For [`Op::MarkInbound`]: whether the packet id was new (false: a copy with this id was
    /// accepted already — this one is a resend, to be answered but not routed).
    Marked(bool),
}

// === encoding ===

const VERSION: u8 = 1;

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Serializing these plain structs into a Vec cannot fail.
    out.extend(postcard::to_stdvec(value).unwrap_or_default());
    out
}

pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, Error> {
    match bytes.split_first() {
        Some((&VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| Error::Corrupt { what, detail: e.to_string() }),
        Some((v, _)) => Err(Error::Corrupt { what, detail: format!("unknown format version {v}") }),
        None => Err(Error::Corrupt { what, detail: "empty value".into() }),
    }
}

/// A queue entry as stored: the message is referenced by id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredEntry {
    pub message_id: u64,
    pub delivery: Delivery,
    pub expires_at_ms: Option<u64>,
    pub state: DeliveryState,
}

/// A message body with the number of queue entries that reference it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredBody {
    pub refs: u32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredRetained {
    pub message: Vec<u8>,
    pub expires_at_ms: Option<u64>,
}
