//! The Redis backend (standalone or Cluster): what clustered deployments use so that any proxy
//! can serve any client.
//!
//! Key schema: [`keys`]. Consistency: every operation on one client's state is one Lua script
//! on one slot ([`scripts`]); operations on different clients are independent (they live on
//! different Cluster nodes). Commands issued together are pipelined by the multiplexed
//! connection, so a fan-out to a thousand persistent sessions costs one round of round trips,
//! not a thousand.
//!
//! What stays out of Redis: retained messages and the message log live with the shards; QoS 0
//! traffic never touches Redis.

pub mod keys;
mod membership;
mod scripts;

pub use membership::{Inbox, Orphaned, RingChange, RingState, Takeover};

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use serde::{Deserialize, Serialize};

use crate::record::{decode, encode};
use crate::{Delivery, DeliveryState, Error, Op, OpResult, QueuedMessage, SessionRecord, NEVER_EXPIRES};
use keys::ClientKeys;

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://host:port[/db]`
    Standalone(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// `redis://h:p`, `rediss://h:p`, or `redis+cluster://h1:p1,h2:p2`.
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = rest.split(',').filter(|s| !s.is_empty()).map(|n| format!("redis://{n}")).collect();
            if nodes.is_empty() {
                return Err(format!("{url:?}: no cluster nodes"));
            }
            return Ok(RedisTarget::Cluster(nodes));
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            return Ok(RedisTarget::Standalone(url.to_string()));
        }
        Err(format!("{url:?} is not a Redis URL (redis://host:port or redis+cluster://h1:p1,h2:p2)"))
    }
}

/// A connection that reconnects by itself, to one Redis or a Cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Connects; fails if Redis cannot be reached within `timeout`, which also bounds every
    /// command.
    pub async fn connect(target: &RedisTarget, timeout: Duration) -> Result<Conn, Error> {
        Conn::connect_with(target, timeout, timeout).await
    }

    /// Connects within `timeout`; commands may take up to `response_timeout` (blocking reads).
    pub async fn connect_with(target: &RedisTarget, timeout: Duration, response_timeout: Duration) -> Result<Conn, Error> {
        let fut = async {
            match target {
                RedisTarget::Standalone(url) => {
                    let client = redis::Client::open(url.as_str()).map_err(|e| Error::redis("parsing the Redis URL", e))?;
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(response_timeout))
                        .set_number_of_retries(2);
                    let m = client.get_connection_manager_with_config(config).await.map_err(|e| Error::redis("connecting", e))?;
                    Ok(Conn::Single(m))
                }
                RedisTarget::Cluster(nodes) => {
                    let client = redis::cluster::ClusterClient::builder(nodes.clone())
                        .connection_timeout(timeout)
                        .response_timeout(response_timeout)
                        .build()
                        .map_err(|e| Error::redis("parsing the Redis Cluster nodes", e))?;
                    let c = client.get_async_connection().await.map_err(|e| Error::redis("connecting to the cluster", e))?;
                    Ok(Conn::Cluster(c))
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| Error::Redis {
            doing: "connecting",
            source: std::sync::Arc::new(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))),
        })?
    }
}

/// A hash's fields as (queue position, value).
type Fields = Vec<(u64, Vec<u8>)>;

/// A queue entry as Redis holds it: the message travels with each copy (copies of one message
/// live in different slots, so they cannot share a body).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    message: Vec<u8>,
    delivery: Delivery,
    expires_at_ms: Option<u64>,
}

/// A queue entry's value: its origin (`shard@position`, empty without one), a newline, then the
/// entry. The origin is readable by the ENQUEUE script, which looks replays up by it. Shard names
/// cannot contain a newline (checked by the shard's configuration).
fn queue_value(origin: &str, entry: &Entry) -> Vec<u8> {
    let mut v = Vec::with_capacity(origin.len() + 1 + entry.message.len() + 16);
    v.extend_from_slice(origin.as_bytes());
    v.push(b'\n');
    v.extend(encode(entry));
    v
}

/// The entry part of a queue value.
fn entry_body(value: &[u8]) -> &[u8] {
    match value.iter().position(|b| *b == b'\n') {
        Some(i) => &value[i + 1..],
        None => value,
    }
}

/// The session store on Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    max_queue_len: u32,
    target: RedisTarget,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("target", &self.target).finish()
    }
}

/// Who owns a client id after a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The proxy that owned it before, if another connection did.
    pub previous_owner: Option<String>,
    /// The epoch of the new connection: writes of older epochs are refused.
    pub epoch: u64,
    /// A persistent session record exists.
    pub has_session: bool,
}

impl RedisStore {
    pub async fn connect(target: RedisTarget, max_queue_len: u32, timeout: Duration) -> Result<RedisStore, Error> {
        let conn = Conn::connect(&target, timeout).await?;
        Ok(RedisStore { conn, max_queue_len, target })
    }

    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// Takes ownership of `client_id` for a new connection on `proxy`.
    ///
    /// The client id joins the proxy's claims first, so a proxy that dies right after the
    /// claim still has the session settled by whoever reaps it.
    pub async fn claim(&self, client_id: &str, proxy: &str) -> Result<Claim, Error> {
        redis::cmd("SADD")
            .arg(keys::proxy_clients(proxy))
            .arg(client_id)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| Error::redis("claiming a client id", e))?;
        let k = ClientKeys::new(client_id);
        let mut inv = scripts::CLAIM.prepare_invoke();
        for key in k.all() {
            inv.key(key);
        }
        let (previous, epoch, has): (String, u64, u8) =
            inv.arg(proxy).invoke_async(&mut self.conn.clone()).await.map_err(|e| Error::redis("claiming a client id", e))?;
        let previous_owner = (!previous.is_empty()).then_some(previous);
        Ok(Claim { previous_owner, epoch, has_session: has == 1 })
    }

    /// Gives up ownership taken by [`RedisStore::claim`], if still held.
    pub async fn release(&self, client_id: &str, proxy: &str, epoch: u64) -> Result<bool, Error> {
        let k = ClientKeys::new(client_id);
        let released: u8 = scripts::RELEASE
            .key(&k.session)
            .arg(proxy)
            .arg(epoch)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| Error::redis("releasing a client id", e))?;
        if released == 1 {
            redis::cmd("SREM")
                .arg(keys::proxy_clients(proxy))
                .arg(client_id)
                .query_async::<()>(&mut self.conn.clone())
                .await
                .map_err(|e| Error::redis("releasing a client id", e))?;
        }
        Ok(released == 1)
    }

    /// The current owner and epoch of a client id.
    pub async fn owner(&self, client_id: &str) -> Result<(Option<String>, u64), Error> {
        let k = ClientKeys::new(client_id);
        let (owner, epoch): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(&k.session)
            .arg("owner")
            .arg("epoch")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| Error::redis("reading an owner", e))?;
        Ok((owner, epoch.unwrap_or(0)))
    }

    pub async fn load_session(&self, client_id: &str) -> Result<Option<SessionRecord>, Error> {
        let k = ClientKeys::new(client_id);
        let rec: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(&k.session)
            .arg("rec")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| Error::redis("reading a session", e))?;
        rec.map(|r| decode("session record", &r)).transpose()
    }

    pub async fn load_queue(&self, client_id: &str, now_ms: u64) -> Result<Vec<QueuedMessage>, Error> {
        let k = ClientKeys::new(client_id);
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(&k.queue).cmd("HGETALL").arg(&k.queue_state);
        let (entries, states): (Fields, Fields) =
            pipe.query_async(&mut self.conn.clone()).await.map_err(|e| Error::redis("reading a session queue", e))?;
        let states: std::collections::HashMap<u64, Vec<u8>> = states.into_iter().collect();
        let mut out = Vec::with_capacity(entries.len());
        for (seq, blob) in entries {
            let e: Entry = decode("queue entry", entry_body(&blob))?;
            if e.expires_at_ms.is_some_and(|t| t <= now_ms) {
                continue;
            }
            let state = match states.get(&seq) {
                Some(s) => decode("delivery state", s)?,
                None => DeliveryState::Queued,
            };
            out.push(QueuedMessage { seq, message: Bytes::from(e.message), delivery: e.delivery, expires_at_ms: e.expires_at_ms, state });
        }
        out.sort_by_key(|m| m.seq);
        Ok(out)
    }

    pub async fn load_inbound(&self, client_id: &str) -> Result<Vec<u16>, Error> {
        let k = ClientKeys::new(client_id);
        let mut ids: Vec<u16> = redis::cmd("SMEMBERS")
            .arg(&k.inbound)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| Error::redis("reading QoS 2 markers", e))?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Applies `ops`. Each op on one client is atomic; ops are issued together and pipelined.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, Error> {
        let futures = ops.into_iter().map(|op| {
            let mut conn = self.conn.clone();
            let max = self.max_queue_len;
            async move { apply(&mut conn, op, max).await }
        });
        join_all(futures).await.into_iter().collect()
    }
}

async fn apply(conn: &mut Conn, op: Op, max_queue_len: u32) -> Result<OpResult, Error> {
    match op {
        Op::PutSession(record) => {
            let k = ClientKeys::new(&record.client_id);
            let ttl_ms = match record.expires_at_ms() {
                None => 0,
                Some(at) => at.saturating_sub(crate_now_ms()).max(1),
            };
            let mut inv = scripts::PUT_SESSION.prepare_invoke();
            for key in k.all() {
                inv.key(key);
            }
            let written: u8 = inv
                .arg(encode(&record))
                .arg(record.epoch)
                .arg(if record.expiry_interval == NEVER_EXPIRES { 0 } else { ttl_ms })
                .arg(if record.expiry_interval == NEVER_EXPIRES { 0 } else { u64::from(record.expiry_interval) * 1000 })
                .invoke_async(conn)
                .await
                .map_err(|e| Error::redis("writing a session", e))?;
            if written == 0 {
                tracing::debug!(client_id = %record.client_id, epoch = record.epoch, "session write refused: a newer connection owns it");
            }
            Ok(OpResult::Done)
        }
        Op::RemoveSession { client_id, epoch } => {
            let k = ClientKeys::new(&client_id);
            match epoch {
                Some(epoch) => {
                    let mut inv = scripts::DROP_SESSION.prepare_invoke();
                    for key in k.all() {
                        inv.key(key);
                    }
                    let _: u8 = inv.arg(epoch).invoke_async(conn).await.map_err(|e| Error::redis("removing a session", e))?;
                }
                None => {
                    let mut cmd = redis::cmd("DEL");
                    for key in k.all() {
                        cmd.arg(key);
                    }
                    let _: () = cmd.query_async(conn).await.map_err(|e| Error::redis("removing a session", e))?;
                }
            }
            Ok(OpResult::Done)
        }
        Op::Enqueue { message, expires_at_ms, to, origin } => {
            let origin_tag = origin.as_ref().map(|(s, p)| format!("{s}@{p}")).unwrap_or_default();
            let (shard, position) = origin.unwrap_or_default();
            let futures = to.into_iter().map(|(client_id, delivery)| {
                let mut conn = conn.clone();
                let entry = queue_value(&origin_tag, &Entry { message: message.to_vec(), delivery, expires_at_ms });
                let shard = shard.clone();
                async move {
                    let k = ClientKeys::new(&client_id);
                    let seq: i64 = scripts::ENQUEUE
                        .key(&k.session)
                        .key(&k.queue)
                        .key(&k.counter)
                        .key(&k.watermark)
                        .arg(max_queue_len)
                        .arg(entry)
                        .arg(shard)
                        .arg(position)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(|e| Error::redis("queueing a message", e))?;
                    Ok::<_, Error>((seq > 0).then_some(seq as u64))
                }
            });
            let seqs = join_all(futures).await.into_iter().collect::<Result<Vec<_>, _>>()?;
            Ok(OpResult::Enqueued(seqs))
        }
        Op::SetState { client_id, seq, state } => {
            let k = ClientKeys::new(&client_id);
            let _: i64 = scripts::SET_STATE
                .key(&k.queue)
                .key(&k.queue_state)
                .arg(seq)
                .arg(encode(&state))
                .invoke_async(conn)
                .await
                .map_err(|e| Error::redis("recording delivery progress", e))?;
            Ok(OpResult::Done)
        }
        Op::Ack { client_id, seq } => {
            let k = ClientKeys::new(&client_id);
            let mut pipe = redis::pipe();
            pipe.atomic().cmd("HDEL").arg(&k.queue).arg(seq).ignore().cmd("HDEL").arg(&k.queue_state).arg(seq).ignore();
            let _: () = pipe.query_async(conn).await.map_err(|e| Error::redis("acknowledging a message", e))?;
            Ok(OpResult::Done)
        }
        Op::MarkInbound { client_id, pkid } => {
            let k = ClientKeys::new(&client_id);
            let _: i64 = scripts::MARK_INBOUND
                .key(&k.session)
                .key(&k.inbound)
                .arg(pkid)
                .invoke_async(conn)
                .await
                .map_err(|e| Error::redis("recording a QoS 2 packet id", e))?;
            Ok(OpResult::Done)
        }
        Op::ClearInbound { client_id, pkid } => {
            let k = ClientKeys::new(&client_id);
            let _: () = redis::cmd("SREM")
                .arg(&k.inbound)
                .arg(pkid)
                .query_async(conn)
                .await
                .map_err(|e| Error::redis("clearing a QoS 2 packet id", e))?;
            Ok(OpResult::Done)
        }
        Op::PutRetained { .. } | Op::RemoveRetained { .. } => {
            Err(Error::Unsupported { what: "retained messages (they live with the shards)", backend: "Redis" })
        }
        Op::AppendLog { .. } | Op::TrimLog { .. } | Op::PutSubscription { .. } | Op::RemoveSubscription { .. } => {
            Err(Error::Unsupported { what: "shard-local state", backend: "Redis" })
        }
    }
}

fn crate_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
