//! Durable state of mqfleet sessions.
//!
//! # What is stored
//! - **Session records** ([`SessionRecord`]): protocol, expiry, subscriptions, the will, the
//!   connection epoch, and whether the session was connected when last written (so that wills
//!   of clients connected at a crash are published after restart).
//! - **Inbound QoS 2 markers**: packet ids of accepted QoS 2 PUBLISHes awaiting PUBREL, written
//!   atomically with the message, so a resent PUBLISH is never delivered twice.
//! - **Session queues** ([`QueuedMessage`]): every QoS 1/2 message bound for a persistent
//!   session, from the moment its shard accepts it until the client acknowledges it. The same
//!   entry serves as offline inbox and as the outbound in-flight record, so a message is never
//!   in two places. Bounded per session; what does not fit is reported as dropped.
//! - **Retained messages**, by topic.
//!
//! Messages are opaque bytes here: their encoding belongs to the shard tier
//! (`broker_shard::message`), which also decides delivery options.
//!
//! # Backends
//! [`Store`] is the handle every tier uses. [`embedded`] keeps everything in one redb file under
//! the data directory, with a single writer thread that commits whatever has queued up in one
//! transaction (group commit): one fsync serves every operation of the batch. The Redis backend
//! of the distributed mode implements the same operations.
//!
//! # Durability contract
//! [`Store::write`] returns only after the operations are durable according to the configured
//! [`SyncPolicy`]. Callers acknowledge to MQTT clients only after that.

pub mod embedded;
mod error;
mod record;
pub mod redis;

pub use self::redis::{
    Claim, Inbox, KindLabel, LatencyFamily, Notice, Orphaned, OwedWill, RedisLatency, RedisStore, RedisTarget, RingChange, RingState,
    Takeover,
};
pub use embedded::{EmbeddedConfig, EmbeddedStore, SyncPolicy};
pub use error::Error;
pub use record::*;

/// The session store of a deployment.
///
/// Cloning is cheap: clones share one backend.
#[derive(Clone, Debug)]
pub enum Store {
    Embedded(EmbeddedStore),
    Redis(RedisStore),
}

impl Store {
    /// Loads a session record.
    pub async fn load_session(&self, client_id: &str) -> Result<Option<SessionRecord>, Error> {
        match self {
            Store::Embedded(s) => s.load_session(client_id).await,
            Store::Redis(s) => s.load_session(client_id).await,
        }
    }

    /// False only if no session for `client_id` can exist, so that connecting a new clean
    /// session costs no I/O.
    pub fn may_have_session(&self, client_id: &str) -> bool {
        match self {
            Store::Embedded(s) => s.may_have_session(client_id),
            // No local knowledge: the claim at CONNECT tells (see `RedisStore::claim`).
            Store::Redis(_) => true,
        }
    }

    /// Applies `ops` atomically and durably; one result per op, in order.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, Error> {
        match self {
            Store::Embedded(s) => s.write(ops).await,
            Store::Redis(s) => s.write(ops).await,
        }
    }

    /// Queue of a session, oldest first, without expired messages.
    pub async fn load_queue(&self, client_id: &str, now_ms: u64) -> Result<Vec<QueuedMessage>, Error> {
        match self {
            Store::Embedded(s) => s.load_queue(client_id, now_ms).await,
            Store::Redis(s) => s.load_queue(client_id, now_ms).await,
        }
    }

    /// Packet ids of QoS 2 messages of this session accepted and awaiting PUBREL.
    pub async fn load_inbound(&self, client_id: &str) -> Result<Vec<u16>, Error> {
        match self {
            Store::Embedded(s) => s.load_inbound(client_id).await,
            Store::Redis(s) => s.load_inbound(client_id).await,
        }
    }

    /// Every stored session (start-up: rebuild subscriptions, publish pending wills, expire).
    pub async fn sessions(&self) -> Result<Vec<SessionRecord>, Error> {
        match self {
            Store::Embedded(s) => s.sessions().await,
            // Listing millions of sessions is not a start-up step in clustered mode: shards keep
            // their own subscriptions and proxies find sessions by client id.
            Store::Redis(_) => Ok(Vec::new()),
        }
    }

    /// Every retained message (start-up of the shards).
    pub async fn retained(&self) -> Result<Vec<RetainedRecord>, Error> {
        match self {
            Store::Embedded(s) => s.retained().await,
            Store::Redis(_) => Err(Error::Unsupported { what: "retained messages (they live with the shards)", backend: "Redis" }),
        }
    }

    /// Makes everything written so far durable, whatever the sync policy (shutdown).
    pub async fn flush(&self) -> Result<(), Error> {
        match self {
            Store::Embedded(s) => s.flush().await,
            // Redis acknowledges writes once applied; its own persistence settings decide the rest.
            Store::Redis(_) => Ok(()),
        }
    }
}
