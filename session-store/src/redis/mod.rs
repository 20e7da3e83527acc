//! The Redis backend (standalone, Sentinel or Cluster): what clustered deployments use so that any proxy
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

mod admission;
mod cluster;
pub mod keys;
mod membership;
mod scripts;
mod sentinel;

pub use membership::{Inbox, Notice, Orphaned, OwedWill, RingChange, RingState, Takeover};

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use serde::{Deserialize, Serialize};

use crate::record::{decode, encode};
use crate::{Delivery, DeliveryState, Error, Op, OpResult, Queued, QueuedMessage, SessionRecord, NEVER_EXPIRES};
use cluster::ClusterConn;
use keys::ClientKeys;
use sentinel::SentinelConn;

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://host:port[/db]`
    Standalone(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
    /// The master Redis Sentinel names, followed across failovers.
    Sentinel(SentinelTarget),
}

/// `redis+sentinel://[user:password@]h1:p1,h2:p2/MASTER[/DB]`: the Sentinels' addresses, the
/// name they monitor the master by, and what to log in to the master with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    pub sentinels: Vec<String>,
    pub master: String,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl SentinelTarget {
    fn parse(url: &str, rest: &str) -> Result<SentinelTarget, String> {
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (username, password) = match auth.map(|a| a.split_once(':').unwrap_or(("", a))) {
            Some((user, password)) => ((!user.is_empty()).then(|| user.to_string()), Some(password.to_string())),
            None => (None, None),
        };
        let mut parts = rest.split('/');
        let sentinels: Vec<String> = parts.next().unwrap_or("").split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        let master = parts.next().unwrap_or("").to_string();
        let db = match parts.next().filter(|d| !d.is_empty()) {
            Some(d) => d.parse().map_err(|_| format!("{url:?}: database {d:?} is not a number"))?,
            None => 0,
        };
        if sentinels.is_empty() || master.is_empty() || parts.next().is_some() {
            return Err(format!("{url:?}: expected redis+sentinel://[user:password@]h1:p1,h2:p2/MASTER[/DB]"));
        }
        Ok(SentinelTarget { sentinels, master, db, username, password })
    }
}

impl RedisTarget {
    /// `redis://h:p`, `rediss://h:p`, `redis+cluster://h1:p1,h2:p2` or
    /// `redis+sentinel://h1:p1,h2:p2/MASTER`.
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            return SentinelTarget::parse(url, rest).map(RedisTarget::Sentinel);
        }
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
        Err(format!("{url:?} is not a Redis URL (redis://host:port, redis+cluster://h1:p1,h2:p2 or redis+sentinel://h1:p1,h2:p2/MASTER)"))
    }
}

/// A connection that reconnects by itself, to one Redis, a Cluster, or the master Sentinel
/// names; with [`RedisLatency`] attached, it times every command it sends.
#[derive(Clone)]
pub struct Conn {
    link: Link,
    latency: Option<RedisLatency>,
}

#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConn),
    Sentinel(SentinelConn),
}

/// Round-trip times of Redis commands, by kind: `script` (the Lua scripts that keep each
/// client's state consistent), `command`, `pipeline`. The histograms belong to a family in the
/// process's metrics registry.
#[derive(Clone, Debug)]
pub struct RedisLatency {
    script: Histogram,
    command: Histogram,
    pipeline: Histogram,
}

/// The label of [`RedisLatency`]'s family.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// A family of latency histograms, one per kind.
pub type LatencyFamily = prometheus_client::metrics::family::Family<KindLabel, Histogram, fn() -> Histogram>;

impl RedisLatency {
    pub fn new(family: &LatencyFamily) -> RedisLatency {
        let h = |kind| family.get_or_create(&KindLabel { kind }).clone();
        RedisLatency { script: h("script"), command: h("command"), pipeline: h("pipeline") }
    }
}

/// Observes the time `fut` takes into `h`, if there is one.
fn timed<'a, T: Send + 'a>(h: Option<&Histogram>, fut: RedisFuture<'a, T>) -> RedisFuture<'a, T> {
    match h {
        None => fut,
        Some(h) => {
            let h = h.clone();
            Box::pin(async move {
                let started = tokio::time::Instant::now();
                let r = fut.await;
                h.observe(started.elapsed().as_secs_f64());
                r
            })
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let script = cmd
            .args_iter()
            .next()
            .is_some_and(|a| matches!(a, redis::Arg::Simple(b) if b.eq_ignore_ascii_case(b"EVALSHA") || b.eq_ignore_ascii_case(b"EVAL")));
        let h = self.latency.as_ref().map(|l| if script { &l.script } else { &l.command });
        let fut = match &mut self.link {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
            Link::Sentinel(c) => c.req_packed_command(cmd),
        };
        timed(h, fut)
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        let h = self.latency.as_ref().map(|l| &l.pipeline);
        let fut = match &mut self.link {
            Link::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Link::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        };
        timed(h, fut)
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
            Link::Sentinel(c) => c.get_db(),
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
                    Ok(Link::Single(m))
                }
                RedisTarget::Cluster(nodes) => {
                    let client = redis::cluster::ClusterClient::builder(nodes.clone())
                        .connection_timeout(timeout)
                        .response_timeout(response_timeout)
                        .build()
                        .map_err(|e| Error::redis("parsing the Redis Cluster nodes", e))?;
                    let c = ClusterConn::connect(client, timeout, response_timeout)
                        .await
                        .map_err(|e| Error::redis("connecting to the cluster", e))?;
                    Ok(Link::Cluster(c))
                }
                RedisTarget::Sentinel(t) => {
                    let c = SentinelConn::connect(t, timeout, response_timeout)
                        .await
                        .map_err(|e| Error::redis("asking the Sentinels for the master", e))?;
                    Ok(Link::Sentinel(c))
                }
            }
        };
        let link = tokio::time::timeout(timeout, fut).await.map_err(|_| Error::Redis {
            doing: "connecting",
            source: std::sync::Arc::new(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))),
        })??;
        Ok(Conn { link, latency: None })
    }

    fn count_replacements(&self, counter: &Counter) {
        if let Link::Cluster(c) = &self.link {
            c.count_replacements(counter.clone());
        }
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
    /// Counts Redis Cluster connections replaced for being wedged (this store's and its inbox's).
    replaced: Option<Counter>,
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
        Ok(RedisStore { conn, max_queue_len, target, replaced: None })
    }

    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Times every command sent from now on (by this store and its clones made afterwards).
    pub fn observe_latency(&mut self, latency: RedisLatency) {
        self.conn.latency = Some(latency);
    }

    /// Counts in `counter` the Redis Cluster connections replaced for being wedged (see
    /// [`cluster`]): this store's and the inboxes it opens from now on.
    pub fn count_cluster_replacements(&mut self, counter: Counter) {
        self.conn.count_replacements(&counter);
        self.replaced = Some(counter);
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
        inv.key(&k.replaced);
        let (previous, epoch, has): (String, u64, u8) =
            inv.arg(proxy).invoke_async(&mut self.conn.clone()).await.map_err(|e| Error::redis("claiming a client id", e))?;
        let previous_owner = (!previous.is_empty()).then_some(previous);
        Ok(Claim { previous_owner, epoch, has_session: has == 1 })
    }

    /// Gives up ownership taken by [`RedisStore::claim`], if still held. `will_discarded`: the
    /// connection ended with a normal DISCONNECT, so its will must never be published.
    pub async fn release(&self, client_id: &str, proxy: &str, epoch: u64, will_discarded: bool) -> Result<bool, Error> {
        let k = ClientKeys::new(client_id);
        let released: u8 = scripts::RELEASE
            .key(&k.session)
            .key(&k.wills_taken)
            .key(&k.replaced)
            .arg(proxy)
            .arg(epoch)
            .arg(u8::from(will_discarded))
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

    /// Applies `ops`. Each op on one client is atomic. Ops on one client apply in the order
    /// given; different clients' ops are issued concurrently (pipelined on the connection).
    ///
    /// Order is kept by construction, not by issuing order: concurrently issued commands do not
    /// keep it (a future that must wait, e.g. for the runtime's cooperative budget, is overtaken).
    /// So each client's ops run one after another, and a run of enqueues goes as one pipeline —
    /// ENQUEUE takes a shard's log position below the last one it queued for a replay, so an
    /// overtaken enqueue would be taken for one and lost.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, Error> {
        let mut results: Vec<OpResult> = Vec::with_capacity(ops.len());
        let mut lanes = Lanes::default();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Enqueue { message, expires_at_ms, to, origin } => {
                    results.push(OpResult::Enqueued(vec![Queued::NoSession; to.len()]));
                    for (client_id, item) in queue_items(i, &message, expires_at_ms, to, origin) {
                        lanes.queue(client_id, item);
                    }
                }
                op => {
                    results.push(OpResult::Done);
                    lanes.apply(i, op);
                }
            }
        }
        let max = self.max_queue_len;
        let runs = lanes.lanes.into_iter().map(|(client_id, steps)| {
            let mut conn = self.conn.clone();
            async move {
                let mut done = Vec::new();
                for step in steps {
                    match step {
                        Step::Queue(items) => {
                            let seqs = enqueue_in_order(&mut conn, &client_id, items, max).await?;
                            done.extend(seqs.into_iter().map(|(op, recipient, seq)| Outcome::Queued { op, recipient, seq }));
                        }
                        Step::Apply(op, o) => done.push(Outcome::Applied(op, apply(&mut conn, o, max).await?)),
                    }
                }
                Ok::<_, Error>(done)
            }
        });
        for lane in join_all(runs).await {
            for outcome in lane? {
                match outcome {
                    Outcome::Queued { op, recipient, seq } => {
                        if let OpResult::Enqueued(seqs) = &mut results[op] {
                            seqs[recipient] = seq;
                        }
                    }
                    Outcome::Applied(op, r) => results[op] = r,
                }
            }
        }
        Ok(results)
    }
}

/// The ops of one `write`, split into lanes that must keep their order: one per client, one per
/// op that names no client.
#[derive(Default)]
struct Lanes {
    lanes: Vec<(String, Vec<Step>)>,
    by_client: std::collections::HashMap<String, usize>,
}

enum Step {
    /// Consecutive enqueues for the lane's client: one pipeline.
    Queue(Vec<QueueItem>),
    Apply(usize, Op),
}

enum Outcome {
    Queued { op: usize, recipient: usize, seq: Queued },
    Applied(usize, OpResult),
}

/// One copy to queue: which op and recipient it answers, and the ENQUEUE arguments.
struct QueueItem {
    op: usize,
    recipient: usize,
    entry: Vec<u8>,
    shard: String,
    position: u64,
}

impl Lanes {
    fn lane(&mut self, client_id: Option<String>) -> &mut Vec<Step> {
        let slot = match client_id {
            Some(id) => *self.by_client.entry(id.clone()).or_insert_with(|| {
                self.lanes.push((id, Vec::new()));
                self.lanes.len() - 1
            }),
            None => {
                self.lanes.push((String::new(), Vec::new()));
                self.lanes.len() - 1
            }
        };
        &mut self.lanes[slot].1
    }

    fn queue(&mut self, client_id: String, item: QueueItem) {
        let steps = self.lane(Some(client_id));
        match steps.last_mut() {
            Some(Step::Queue(items)) => items.push(item),
            _ => steps.push(Step::Queue(vec![item])),
        }
    }

    fn apply(&mut self, i: usize, op: Op) {
        let client = match &op {
            Op::PutSession(r) => Some(r.client_id.clone()),
            Op::RemoveSession { client_id, .. }
            | Op::SetState { client_id, .. }
            | Op::Ack { client_id, .. }
            | Op::MarkInbound { client_id, .. }
            | Op::UnmarkInbound { client_id, .. }
            | Op::AcceptWill { client_id, .. }
            | Op::ClearInbound { client_id, .. }
            | Op::PutSubscription { client_id, .. }
            | Op::RemoveSubscription { client_id, .. } => Some(client_id.clone()),
            Op::Enqueue { .. } | Op::PutRetained { .. } | Op::RemoveRetained { .. } | Op::AppendLog { .. } | Op::TrimLog { .. } => None,
        };
        self.lane(client).push(Step::Apply(i, op));
    }
}

/// The copies of enqueue op `op`, one per recipient, with their ENQUEUE arguments.
fn queue_items(
    op: usize,
    message: &Bytes,
    expires_at_ms: Option<u64>,
    to: Vec<(String, Delivery)>,
    origin: Option<(String, u64)>,
) -> impl Iterator<Item = (String, QueueItem)> {
    let origin_tag = origin.as_ref().map(|(s, p)| format!("{s}@{p}")).unwrap_or_default();
    let (shard, position) = origin.unwrap_or_default();
    let message = message.clone();
    to.into_iter().enumerate().map(move |(recipient, (client_id, delivery))| {
        let entry = queue_value(&origin_tag, &Entry { message: message.to_vec(), delivery, expires_at_ms });
        (client_id, QueueItem { op, recipient, entry, shard: shard.clone(), position })
    })
}

/// Queues `items` for one client, in order, in one round trip: (op, recipient, queue position
/// or `None` when not queued).
async fn enqueue_in_order(
    conn: &mut Conn,
    client_id: &str,
    items: Vec<QueueItem>,
    max_queue_len: u32,
) -> Result<Vec<(usize, usize, Queued)>, Error> {
    let k = ClientKeys::new(client_id);
    let mut pipe = redis::pipe();
    for item in &items {
        pipe.cmd("EVALSHA")
            .arg(scripts::ENQUEUE.get_hash())
            .arg(4)
            .arg(&k.session)
            .arg(&k.queue)
            .arg(&k.counter)
            .arg(&k.watermark)
            .arg(max_queue_len)
            .arg(&item.entry)
            .arg(&item.shard)
            .arg(item.position);
    }
    let seqs: Vec<i64> = match pipe.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            // A restarted or failed-over Redis has no scripts: load and send again. Whatever the
            // first attempt queued is recognised by its origin (ENQUEUE is idempotent per shard
            // and position).
            scripts::ENQUEUE.load_async(conn).await.map_err(|e| Error::redis("loading the queueing script", e))?;
            pipe.query_async(conn).await
        }
        r => r,
    }
    .map_err(|e| Error::redis("queueing a message", e))?;
    Ok(items.iter().zip(seqs).map(|(item, seq)| (item.op, item.recipient, queued(seq))).collect())
}

/// What ENQUEUE's answer means (see `scripts::ENQUEUE`).
fn queued(answer: i64) -> Queued {
    match answer {
        -3 => Queued::Delivered,
        -2 => Queued::Full,
        seq if seq > 0 => Queued::At(seq as u64),
        _ => Queued::NoSession,
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
            // `write` puts enqueues in their clients' lanes; one on its own goes copy by copy.
            let mut seqs = vec![Queued::NoSession; to.len()];
            for (client_id, item) in queue_items(0, &message, expires_at_ms, to, origin) {
                for (_, recipient, seq) in enqueue_in_order(conn, &client_id, vec![item], max_queue_len).await? {
                    seqs[recipient] = seq;
                }
            }
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
        Op::MarkInbound { client_id, pkid, by, replacing } => {
            let k = ClientKeys::new(&client_id);
            let added: i64 = scripts::MARK_INBOUND
                .key(&k.session)
                .key(&k.inbound)
                .key(&k.inbound_by)
                .arg(pkid)
                .arg(by)
                .arg(replacing)
                .invoke_async(conn)
                .await
                .map_err(|e| Error::redis("recording a QoS 2 packet id", e))?;
            Ok(OpResult::Marked(added == 1))
        }
        Op::UnmarkInbound { client_id, pkid, by } => {
            let k = ClientKeys::new(&client_id);
            let _: i64 = scripts::UNMARK_INBOUND
                .key(&k.inbound)
                .key(&k.inbound_by)
                .arg(pkid)
                .arg(by)
                .invoke_async(conn)
                .await
                .map_err(|e| Error::redis("giving back a QoS 2 packet id", e))?;
            Ok(OpResult::Done)
        }
        Op::AcceptWill { client_id, epoch, proxy, acceptance } => {
            let k = ClientKeys::new(&client_id);
            let accepted: u8 = scripts::ACCEPT_WILL
                .key(&k.wills_taken)
                .arg(epoch)
                .arg(proxy)
                .arg(acceptance)
                .invoke_async(conn)
                .await
                .map_err(|e| Error::redis("accepting a will", e))?;
            Ok(OpResult::WillAccepted(accepted == 1))
        }
        Op::ClearInbound { client_id, pkid } => {
            let k = ClientKeys::new(&client_id);
            let _: () = redis::pipe()
                .cmd("SREM")
                .arg(&k.inbound)
                .arg(pkid)
                .ignore()
                .cmd("HDEL")
                .arg(&k.inbound_by)
                .arg(pkid)
                .ignore()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_deployment() {
        assert_eq!(RedisTarget::parse("redis://h:1/2"), Ok(RedisTarget::Standalone("redis://h:1/2".into())));
        assert_eq!(
            RedisTarget::parse("redis+cluster://a:1,b:2"),
            Ok(RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()]))
        );
        let expected = SentinelTarget {
            sentinels: vec!["a:26379".into(), "b:26379".into()],
            master: "mymaster".into(),
            db: 3,
            username: Some("app".into()),
            password: Some("p@ss".into()),
        };
        assert_eq!(RedisTarget::parse("redis+sentinel://app:p@ss@a:26379,b:26379/mymaster/3"), Ok(RedisTarget::Sentinel(expected)));
        let plain = RedisTarget::parse("redis+sentinel://a:26379/m").unwrap();
        assert!(matches!(plain, RedisTarget::Sentinel(SentinelTarget { db: 0, username: None, password: None, .. })));
        let password_only = RedisTarget::parse("redis+sentinel://:secret@a:1/m").unwrap();
        assert!(matches!(password_only, RedisTarget::Sentinel(SentinelTarget { username: None, password: Some(p), .. }) if p == "secret"));
    }

    #[test]
    fn incomplete_sentinel_urls_say_what_is_expected() {
        for bad in ["redis+sentinel://a:1", "redis+sentinel:///m", "redis+sentinel://a:1/m/x", "redis+sentinel://a:1/m/0/extra"] {
            let err = RedisTarget::parse(bad).unwrap_err();
            assert!(err.contains(bad) && (err.contains("MASTER") || err.contains("not a number")), "{bad}: {err}");
        }
        assert!(RedisTarget::parse("http://x").unwrap_err().contains("redis+sentinel://"));
    }
}
