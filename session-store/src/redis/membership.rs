//! The cluster's moving parts in Redis: which proxies and shards are alive, what a dead proxy
//! leaves behind (its clients' sessions and wills), delayed wills any proxy can fire, and the
//! notices by which one proxy tells another that a client moved.
//!
//! Liveness is judged by Redis's clock ([`scripts::BEAT`]); "exactly once" comes from Lua
//! scripts that remove what they hand out in the same step ([`scripts::MEMBERS`] for dead
//! proxies, [`scripts::ORPHAN`] and [`scripts::TAKE_WILL`] for wills).

use std::time::Duration;

use super::keys::{self, ClientKeys};
use super::{scripts, Conn, RedisStore};
use crate::record::{decode, encode};
use crate::{Error, StoredWill};

/// What a dead proxy left of one client id (see `scripts::ORPHAN`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Orphaned {
    /// The dead proxy held the session's current connection: the session is offline now.
    pub went_offline: bool,
    /// That connection's will was left in the session for the will timer, due after this.
    pub delayed_will: Option<Duration>,
    /// Wills due now, each handed to the settling proxy to publish (its intent).
    pub owed: Vec<OwedWill>,
}

/// A will this proxy has taken to publish: the connection it belongs to (its client id and
/// epoch) identifies it to the shard that accepts it (see `scripts::ACCEPT_WILL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedWill {
    pub epoch: u64,
    pub will: StoredWill,
}

/// How long a proxy's record of the wills it took is kept: as long as the wills-taken hash.
const INTENTS_KEPT: Duration = Duration::from_secs(600);

/// A connection of ours was taken over by a newer one elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub client_id: String,
    /// The epoch of the new connection: ours is older.
    pub epoch: u64,
}

/// The ring as Redis holds it: the shard names topics are placed on, and a change under way.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RingState {
    pub epoch: u64,
    /// Sorted shard names.
    pub members: Vec<String>,
    /// A change being prepared: its epoch, its members, and since when (Redis clock, seconds).
    pub next: Option<RingChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingChange {
    pub epoch: u64,
    pub members: Vec<String>,
    pub since_secs: u64,
}

fn names(csv: &str) -> Vec<String> {
    csv.split(',').filter(|s| !s.is_empty()).map(String::from).collect()
}

/// How long an unread takeover notice is kept (its proxy may be dead).
const NOTICE_TTL_MS: u64 = 60_000;

impl RedisStore {
    /// Records a heartbeat; true if the member was registered before it.
    async fn beat(&self, members: &str, member: &str, suffix: &str) -> Result<bool, Error> {
        let known: u8 = scripts::BEAT
            .key(members)
            .arg(member)
            .arg(suffix)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("heartbeat", e))?;
        Ok(known == 1)
    }

    async fn members(&self, members: &str, dead_after: Duration, reap: bool) -> Result<Vec<(String, String)>, Error> {
        let flat: Vec<String> = scripts::MEMBERS
            .key(members)
            .arg(dead_after.as_millis() as u64)
            .arg(if reap { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("reading cluster members", e))?;
        Ok(flat.chunks_exact(2).map(|c| (c[0].clone(), c[1].clone())).collect())
    }

    /// This proxy is alive. Returns false if it was not registered: at its first beat, or when
    /// another proxy took it for dead since its last one (its sessions were settled then).
    pub async fn proxy_beat(&self, proxy: &str) -> Result<bool, Error> {
        self.beat(keys::PROXIES, proxy, "").await
    }

    /// Proxies that beat within `dead_after`.
    pub async fn live_proxies(&self, dead_after: Duration) -> Result<Vec<String>, Error> {
        Ok(self.members(keys::PROXIES, dead_after, false).await?.into_iter().map(|(p, _)| p).collect())
    }

    /// Proxies silent for longer than `dead_after`, removed from the membership: each dead
    /// proxy is returned to exactly one caller, which then settles what it left.
    pub async fn reap_dead_proxies(&self, dead_after: Duration) -> Result<Vec<String>, Error> {
        Ok(self.members(keys::PROXIES, dead_after, true).await?.into_iter().map(|(p, _)| p).collect())
    }

    /// A dead proxy whose settlement failed half-way (Redis went away) goes back on the
    /// membership as long dead, so that the next reaper settles the rest.
    pub async fn reap_again(&self, proxy: &str) -> Result<(), Error> {
        redis::cmd("HSETNX")
            .arg(keys::PROXIES)
            .arg(proxy)
            .arg("0|")
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| Error::redis("putting a dead proxy back for settlement", e))
    }

    /// A proxy leaves the cluster (graceful shutdown, after its sessions are saved).
    pub async fn proxy_leave(&self, proxy: &str) -> Result<(), Error> {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(keys::PROXIES).arg(proxy).ignore();
        pipe.query_async::<()>(&mut self.conn()).await.map_err(|e| Error::redis("leaving the cluster", e))?;
        self.forget_proxy(proxy).await
    }

    /// This shard is alive and takes links at `addr`.
    pub async fn shard_beat(&self, shard: &str, addr: &str) -> Result<(), Error> {
        self.beat(keys::SHARDS, shard, addr).await.map(|_| ())
    }

    /// Live shards: (name, link address), by name.
    pub async fn live_shards(&self, dead_after: Duration) -> Result<Vec<(String, String)>, Error> {
        let mut v = self.members(keys::SHARDS, dead_after, false).await?;
        v.sort();
        Ok(v)
    }

    pub async fn shard_leave(&self, shard: &str) -> Result<(), Error> {
        redis::cmd("HDEL")
            .arg(keys::SHARDS)
            .arg(shard)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| Error::redis("leaving the cluster", e))
    }

    /// Client ids `proxy` claimed.
    pub async fn claimed_by(&self, proxy: &str) -> Result<Vec<String>, Error> {
        redis::cmd("SMEMBERS")
            .arg(keys::proxy_clients(proxy))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("listing claims", e))
    }

    /// Settles what `dead_proxy` held of `client_id`: the session's connection, if it was
    /// there, and wills it owed, which become `settler`'s to publish; `None` if there is
    /// nothing to do. The settler records the client among its intents first
    /// ([`RedisStore::owe_wills`]).
    pub async fn orphan(&self, client_id: &str, dead_proxy: &str, settler: &str) -> Result<Option<Orphaned>, Error> {
        let k = ClientKeys::new(client_id);
        let mut inv = scripts::ORPHAN.prepare_invoke();
        for key in k.all() {
            inv.key(key);
        }
        inv.key(&k.wills_taken);
        inv.key(&k.replaced);
        let reply: Vec<redis::Value> = inv
            .arg(dead_proxy)
            .arg(settler)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("settling a dead proxy's session", e))?;
        let malformed = || Error::Corrupt { what: "settlement reply from Redis", detail: format!("{reply:?}") };
        let int = |v: &redis::Value| redis::from_redis_value::<i64>(v.clone()).map_err(|_| malformed());
        match reply.as_slice() {
            [status] if int(status)? < 0 => Ok(None),
            [status, delay, owed @ ..] if owed.len() % 2 == 0 => Ok(Some(Orphaned {
                went_offline: int(status)? == 1,
                delayed_will: (int(delay)? > 0).then(|| Duration::from_millis(int(delay).unwrap_or(0) as u64)),
                owed: owed.chunks(2).map(|p| owed_will(&p[0], &p[1]).unwrap_or_else(|| Err(malformed()))).collect::<Result<_, _>>()?,
            })),
            _ => Err(malformed()),
        }
    }

    /// Records that `proxy` is taking wills of `client_id` to publish, before it takes them: a
    /// settlement of `proxy` looks there for intents it left unpublished. Entries older than
    /// the intents themselves are dropped on the way.
    pub async fn owe_wills(&self, proxy: &str, client_id: &str) -> Result<(), Error> {
        let key = keys::proxy_wills(proxy);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        redis::pipe()
            .cmd("ZADD")
            .arg(&key)
            .arg(now)
            .arg(client_id)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now.saturating_sub(INTENTS_KEPT.as_millis() as u64))
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| Error::redis("recording a will to publish", e))
    }

    /// Client ids whose wills `proxy` took to publish within the last ten minutes.
    pub async fn wills_owed_by(&self, proxy: &str) -> Result<Vec<String>, Error> {
        redis::cmd("ZRANGE")
            .arg(keys::proxy_wills(proxy))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("listing wills to publish", e))
    }

    /// Removes what is left of a proxy that is gone: its claims and its takeover notices.
    pub async fn forget_proxy(&self, proxy: &str) -> Result<(), Error> {
        redis::cmd("DEL")
            .arg(keys::proxy_clients(proxy))
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| Error::redis("forgetting a proxy", e))?;
        redis::cmd("DEL")
            .arg(keys::proxy_wills(proxy))
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| Error::redis("forgetting a proxy", e))?;
        redis::cmd("DEL")
            .arg(keys::proxy_inbox(proxy))
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| Error::redis("forgetting a proxy", e))
    }

    /// Records (or, with `None`, removes) the will of the connection with `epoch`, so that any
    /// proxy can publish it if this one dies. False if a newer connection owns the session.
    pub async fn set_will(&self, client_id: &str, epoch: u64, will: Option<&StoredWill>) -> Result<bool, Error> {
        let k = ClientKeys::new(client_id);
        let (blob, delay) = match will {
            Some(w) => (encode(w), u64::from(w.delay_interval) * 1000),
            None => (Vec::new(), 0),
        };
        let done: u8 = scripts::SET_WILL
            .key(&k.session)
            .arg(epoch)
            .arg(blob)
            .arg(delay)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("recording a will", e))?;
        Ok(done == 1)
    }

    /// The connection with `epoch` ended and `proxy` would publish its will: false if a
    /// dead-proxy settlement took that will first (its proxy was paused or cut off, not dead),
    /// else true, and the will is `proxy`'s intent (see `scripts::WITHDRAW_WILL`). The caller
    /// records the client among its intents first ([`RedisStore::owe_wills`]).
    pub async fn withdraw_will(&self, client_id: &str, epoch: u64, proxy: &str, will: &StoredWill) -> Result<bool, Error> {
        let k = ClientKeys::new(client_id);
        let taken: u8 = scripts::WITHDRAW_WILL
            .key(&k.session)
            .key(&k.wills_taken)
            .key(&k.replaced)
            .arg(epoch)
            .arg(proxy)
            .arg(encode(will))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("withdrawing a will", e))?;
        Ok(taken == 1)
    }

    /// The will of `client_id` is due at `due_ms` (Unix ms) unless the client comes back.
    pub async fn schedule_will(&self, client_id: &str, due_ms: u64) -> Result<(), Error> {
        redis::cmd("ZADD")
            .arg(keys::WILLS)
            .arg(due_ms)
            .arg(client_id)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| Error::redis("scheduling a will", e))
    }

    /// Client ids whose will is due by `now_ms`, oldest first.
    pub async fn due_wills(&self, now_ms: u64, limit: usize) -> Result<Vec<String>, Error> {
        redis::cmd("ZRANGE")
            .arg(keys::WILLS)
            .arg("-inf")
            .arg(now_ms)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("reading due wills", e))
    }

    /// Takes a due will, exactly once across all proxies, as `taker`'s intent; `None` if the
    /// client came back or another proxy took it. The schedule entry is removed either way.
    /// The taker records the client among its intents first ([`RedisStore::owe_wills`]).
    pub async fn take_will(&self, client_id: &str, taker: &str) -> Result<Option<OwedWill>, Error> {
        let k = ClientKeys::new(client_id);
        let reply: Option<(redis::Value, redis::Value)> = scripts::TAKE_WILL
            .key(&k.session)
            .key(&k.wills_taken)
            .arg(taker)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("taking a will", e))?;
        redis::cmd("ZREM")
            .arg(keys::WILLS)
            .arg(client_id)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| Error::redis("taking a will", e))?;
        reply
            .map(|(epoch, will)| {
                owed_will(&epoch, &will)
                    .unwrap_or_else(|| Err(Error::Corrupt { what: "will taken from Redis", detail: format!("{will:?}") }))
            })
            .transpose()
    }

    /// The ring and any change under way.
    pub async fn ring(&self) -> Result<RingState, Error> {
        let fields: std::collections::HashMap<String, String> =
            redis::cmd("HGETALL").arg(keys::RING).query_async(&mut self.conn()).await.map_err(|e| Error::redis("reading the ring", e))?;
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let next = fields.get("next").map(|n| RingChange { epoch: num("next_epoch"), members: names(n), since_secs: num("next_since") });
        Ok(RingState { epoch: num("epoch"), members: fields.get("members").map(|m| names(m)).unwrap_or_default(), next })
    }

    /// Proposes `members` as the next ring; the epoch of the change, or `None` if the ring is
    /// not at `seen_epoch` or a change is already under way.
    pub async fn propose_ring(&self, seen_epoch: u64, members: &[String]) -> Result<Option<u64>, Error> {
        let mut sorted = members.to_vec();
        sorted.sort();
        sorted.dedup();
        let e: u64 = scripts::RING_PROPOSE
            .key(keys::RING)
            .arg(seen_epoch)
            .arg(sorted.join(","))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("proposing a ring change", e))?;
        Ok((e > 0).then_some(e))
    }

    /// `participant` (`proxy:<id>` or `shard:<name>`) has prepared for the change to `epoch`.
    pub async fn ring_ready(&self, epoch: u64, participant: &str) -> Result<(), Error> {
        let key = keys::ring_ready(epoch);
        let mut pipe = redis::pipe();
        pipe.cmd("SADD").arg(&key).arg(participant).ignore();
        pipe.cmd("EXPIRE").arg(&key).arg(3600).ignore();
        pipe.query_async::<()>(&mut self.conn()).await.map_err(|e| Error::redis("acknowledging a ring change", e))
    }

    /// Who has prepared for the change to `epoch`.
    pub async fn ring_ready_set(&self, epoch: u64) -> Result<Vec<String>, Error> {
        redis::cmd("SMEMBERS")
            .arg(keys::ring_ready(epoch))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("reading ring acknowledgements", e))
    }

    /// Commits (or aborts) the change to `epoch`; false if it is not the one under way.
    pub async fn end_ring_change(&self, epoch: u64, commit: bool) -> Result<bool, Error> {
        let done: u8 = scripts::RING_END
            .key(keys::RING)
            .arg(epoch)
            .arg(if commit { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("ending a ring change", e))?;
        Ok(done == 1)
    }

    /// Tells `proxy` that its connection of `client_id` was taken over by the connection with
    /// `epoch`.
    pub async fn notify_takeover(&self, proxy: &str, client_id: &str, epoch: u64) -> Result<(), Error> {
        let key = keys::proxy_inbox(proxy);
        let mut pipe = redis::pipe();
        pipe.cmd("RPUSH").arg(&key).arg(format!("{epoch}\n{client_id}")).ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(NOTICE_TTL_MS).ignore();
        pipe.query_async::<()>(&mut self.conn()).await.map_err(|e| Error::redis("notifying a takeover", e))
    }

    /// Asks `proxy` to disconnect its connection of `client_id` (admin API; DISCONNECT 0x98),
    /// ending the session too with `discard_session`.
    pub async fn notify_kick(&self, proxy: &str, client_id: &str, discard_session: bool) -> Result<(), Error> {
        let key = keys::proxy_inbox(proxy);
        let kind = if discard_session { KICK_DISCARD } else { KICK_KEEP };
        let mut pipe = redis::pipe();
        pipe.cmd("RPUSH").arg(&key).arg(format!("{kind}\n{client_id}")).ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(NOTICE_TTL_MS).ignore();
        pipe.query_async::<()>(&mut self.conn()).await.map_err(|e| Error::redis("asking a proxy to disconnect a client", e))
    }

    /// A dedicated connection on which `proxy` waits for takeover notices (a blocking read
    /// must not hold up the shared connection).
    pub async fn inbox(&self, proxy: &str, timeout: Duration) -> Result<Inbox, Error> {
        let conn = Conn::connect_with(self.target(), timeout, timeout + INBOX_WAIT).await?;
        if let Some(c) = &self.replaced {
            conn.count_replacements(c);
        }
        Ok(Inbox { conn, key: keys::proxy_inbox(proxy) })
    }
}

/// Notice kinds besides takeovers (whose first line is an epoch). A proxy of an older version
/// finds no epoch there and ignores the notice.
const KICK_KEEP: &str = "kick";
const KICK_DISCARD: &str = "kick-discard";

/// What a proxy is told through its inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Takeover(Takeover),
    /// An operator disconnects this client (see [`RedisStore::notify_kick`]).
    Kick {
        client_id: String,
        discard_session: bool,
    },
}

/// How long one blocking read of the inbox waits.
const INBOX_WAIT: Duration = Duration::from_secs(1);

/// Takeover notices for one proxy.
pub struct Inbox {
    conn: Conn,
    key: String,
}

impl Inbox {
    /// The next notice, waiting up to a second; `None` if there was none.
    pub async fn next(&mut self) -> Result<Option<Notice>, Error> {
        let r: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&self.key)
            .arg(INBOX_WAIT.as_secs_f64())
            .query_async(&mut self.conn)
            .await
            .map_err(|e| Error::redis("reading takeover notices", e))?;
        Ok(r.and_then(|(_, v)| {
            let (kind, client_id) = v.split_once('\n')?;
            let client_id = client_id.to_string();
            match kind {
                KICK_KEEP => Some(Notice::Kick { client_id, discard_session: false }),
                KICK_DISCARD => Some(Notice::Kick { client_id, discard_session: true }),
                epoch => Some(Notice::Takeover(Takeover { client_id, epoch: epoch.parse().ok()? })),
            }
        }))
    }
}

/// An (epoch, encoded will) pair of a script's reply; `None` if it is not one.
fn owed_will(epoch: &redis::Value, will: &redis::Value) -> Option<Result<OwedWill, Error>> {
    let epoch: u64 = redis::from_redis_value::<String>(epoch.clone()).ok()?.parse().ok()?;
    let blob: Vec<u8> = redis::from_redis_value(will.clone()).ok()?;
    Some(decode("will", &blob).map(|will| OwedWill { epoch, will }))
}
