//! A proxy's part in a cluster (session store in Redis, shards in their own processes):
//! heartbeats, takeover notices from other proxies, settling what dead proxies left, delayed
//! wills that any proxy may fire, and re-sending subscriptions to a shard that relinks.
//!
//! # Exactly-once wills
//! A connection's will is in Redis from CONNECT on. Whoever settles the session takes it out
//! atomically ([`RedisStore::orphan`], [`RedisStore::take_will`]) before publishing, so a will
//! is published by one proxy only — its own proxy at disconnect, the proxy that reaped a dead
//! one, or whichever proxy's timer sees a delayed will come due. A reconnect cancels it (the
//! claim removes it).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use broker_shard::link::client::{Client, DeliverySink, LinkEvents};
use broker_shard::link::tcp::TcpConfig;
use broker_shard::link::{Request, SubscribeItem};
use broker_shard::now_ms;
use broker_shard::ring::{Ring, ShardSet};
use futures::future::join_all;
use mqfleet_codec::topic::parse_shared;
use session_store::{Notice, OwedWill, RedisStore};
use tokio_util::sync::CancellationToken;

use crate::lifecycle::will_from_store;
use crate::registry::ConnMsg;
use crate::shards::Topology;
use crate::Context;

/// Who this proxy is in the cluster, and where the cluster keeps its state.
pub struct Cluster {
    pub id: String,
    pub redis: RedisStore,
    pub heartbeat: Duration,
    pub dead_after: Duration,
    pub redis_timeout: Duration,
    /// `shards = discover`: the ring is read from Redis and followed through changes.
    pub dynamic: bool,
    /// For links made while running (a shard joined).
    pub sink: Arc<dyn DeliverySink>,
    pub links_stop: CancellationToken,
    /// Since when this proxy's heartbeats have reached Redis without a miss; `None` while
    /// they fail. See [`reap`].
    pub redis_up_since: parking_lot::Mutex<Option<tokio::time::Instant>>,
}

/// Shard addresses are looked up among all registered shards, live or not: a link to a shard
/// that is down waits for it.
pub const REGISTERED: Duration = Duration::from_secs(365 * 24 * 3600);

/// A link to shard `key` at `addr`, re-sending this proxy's subscriptions whenever it (re)connects.
pub fn shard_link(id: &str, key: &str, addr: &str, sink: &Arc<dyn DeliverySink>, stop: &CancellationToken) -> (Client, Arc<LinkState>) {
    let state = LinkState::new(key.to_string());
    let client = Client::connect_tcp(TcpConfig::new(addr, id), sink.clone(), state.clone(), stop.clone());
    (client, state)
}

/// Due wills handled per timer turn.
const WILLS_PER_TURN: usize = 256;

impl Cluster {
    /// Starts the background work; it holds the context weakly and ends with `shutdown`
    /// (after the drain: heartbeats go on while sessions are being saved).
    pub fn spawn(ctx: &Arc<Context>, shutdown: &CancellationToken) {
        tokio::spawn(heartbeats(Arc::downgrade(ctx), shutdown.clone()));
        tokio::spawn(takeover_notices(Arc::downgrade(ctx), shutdown.clone()));
        tokio::spawn(settle(Arc::downgrade(ctx), shutdown.clone()));
        if ctx.cluster.as_ref().is_some_and(|c| c.dynamic) {
            tokio::spawn(follow_ring(Arc::downgrade(ctx), shutdown.clone()));
        }
    }
}

fn cluster(ctx: &Context) -> &Cluster {
    ctx.cluster.as_ref().expect("cluster tasks run only in a cluster")
}

/// Tells Redis this proxy is alive.
async fn heartbeats(ctx: Weak<Context>, shutdown: CancellationToken) {
    let Some(every) = ctx.upgrade().map(|c| cluster(&c).heartbeat) else { return };
    let beat = || {
        let ctx = ctx.upgrade()?;
        Some(async move {
            let c = cluster(&ctx);
            let beat = c.redis.proxy_beat(&c.id).await;
            {
                let mut up = c.redis_up_since.lock();
                match &beat {
                    Ok(_) => {
                        up.get_or_insert_with(tokio::time::Instant::now);
                    }
                    Err(_) => *up = None,
                }
            }
            if !beat? {
                fence(&ctx);
            }
            Ok::<(), session_store::Error>(())
        })
    };
    let failed = "cannot send heartbeats to Redis; other proxies will take this one for dead if it lasts";
    mqfleet_ops::outage::repeat(every, shutdown, "heartbeats reach Redis again", failed, beat).await;
}

/// This proxy was taken for dead (it was paused, or cut off from Redis, for longer than
/// `dead_after`) and another proxy settled its sessions: their wills are published and their
/// claims gone. Its connections must not go on as if nothing happened — a client would then
/// have a live connection here and a settled session elsewhere — so all of them are closed
/// (5.0: DISCONNECT 0x8E, the session was taken over by the cluster); their wills are not
/// published again (`withdraw_will` finds them settled). Clients reconnect and resume.
fn fence(ctx: &Context) {
    let mailboxes = ctx.registry.all();
    tracing::warn!(
        connections = mailboxes.len(),
        "this proxy was taken for dead by the cluster (paused or cut off from Redis too long) and its sessions settled elsewhere; closing its connections"
    );
    ctx.metrics.fenced.inc();
    for m in mailboxes {
        let _ = m.send(ConnMsg::Close(mqfleet_codec::ReasonCode::SessionTakenOver));
    }
}

/// Closes our connections that a newer connection on another proxy took over (5.0:
/// DISCONNECT 0x8E).
async fn takeover_notices(ctx: Weak<Context>, shutdown: CancellationToken) {
    let mut inbox = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let Some(ctx) = ctx.upgrade() else { return };
        let c = cluster(&ctx);
        if inbox.is_none() {
            match c.redis.inbox(&c.id, c.redis_timeout).await {
                Ok(i) => inbox = Some(i),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the takeover inbox; retrying");
                    drop(ctx);
                    pause(&shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some(i) = inbox.as_mut() else { continue };
        let next = tokio::select! {
            r = i.next() => r,
            () = shutdown.cancelled() => return,
        };
        match next {
            Ok(Some(Notice::Takeover(t))) => {
                if let Some(mailbox) = ctx.registry.taken_over_elsewhere(&t.client_id, t.epoch) {
                    tracing::debug!(client_id = %t.client_id, epoch = t.epoch, "connection taken over on another proxy");
                    let _ = mailbox.send(ConnMsg::TakenOver);
                }
            }
            Ok(Some(Notice::Kick { client_id, discard_session })) => {
                if let Some((_, mailbox)) = ctx.registry.client(&client_id) {
                    tracing::info!(client_id = %client_id, discard_session, "disconnecting a client as asked by an operator on another proxy");
                    let _ = mailbox.send(ConnMsg::Kick { discard_session });
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading takeover notices failed; reconnecting");
                inbox = None;
                drop(ctx);
                pause(&shutdown, Duration::from_secs(1)).await;
            }
        }
    }
}

async fn pause(shutdown: &CancellationToken, d: Duration) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = shutdown.cancelled() => {}
    }
}

/// Every heartbeat: settle proxies that died, fire delayed wills that came due.
async fn settle(ctx: Weak<Context>, shutdown: CancellationToken) {
    let Some(every) = ctx.upgrade().map(|c| cluster(&c).heartbeat) else { return };
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(ctx) = ctx.upgrade() else { return };
        if let Err(e) = reap(&ctx).await {
            tracing::warn!(error = %e, "settling dead proxies failed; retrying");
        }
        if let Err(e) = due_wills(&ctx).await {
            tracing::warn!(error = %e, "firing delayed wills failed; retrying");
        }
    }
}

/// Settles every proxy that stopped beating: its sessions lose their connection (persistent
/// ones go offline and start expiring, so shards queue for them), its clients' wills are
/// published or scheduled.
///
/// Only once this proxy's own heartbeats have reached Redis for `dead_after` in a row: after
/// Redis was away (restarted, failed over, cut off from us), every proxy's last beat is old,
/// and judging them then would take the whole live cluster for dead.
async fn reap(ctx: &Arc<Context>) -> Result<(), session_store::Error> {
    let c = cluster(ctx);
    let settled_view = c.redis_up_since.lock().is_some_and(|t| t.elapsed() >= c.dead_after);
    if !settled_view {
        return Ok(());
    }
    for dead in c.redis.reap_dead_proxies(c.dead_after).await? {
        tracing::warn!(proxy = %dead, "proxy stopped beating; settling its sessions");
        match settle_proxy(ctx, &dead).await {
            Ok((sessions, wills)) => tracing::info!(proxy = %dead, sessions, wills_published = wills, "dead proxy settled"),
            Err(e) => {
                // Settling is idempotent (each session and will once): the next round redoes it.
                let _ = c.redis.reap_again(&dead).await;
                return Err(e);
            }
        }
    }
    Ok(())
}

/// At start, before this proxy claims anything: settles what an earlier process of the same
/// name left (it was killed and restarted faster than the others take a proxy for dead, so
/// nobody reaped it) — otherwise its clients' wills would never fire and their sessions would
/// stay owned by a connection that no longer exists.
pub async fn settle_previous_run(ctx: &Arc<Context>) -> Result<(), session_store::Error> {
    let c = cluster(ctx);
    let (sessions, wills) = settle_proxy(ctx, &c.id).await?;
    if sessions > 0 {
        tracing::warn!(sessions, wills_published = wills, "settled the sessions of this proxy's previous run (it did not stop cleanly)");
    }
    Ok(())
}

/// Orphans the sessions `proxy` claimed (each exactly once across the cluster: `ORPHAN` is
/// atomic per client) and publishes or schedules the wills it owed, including those it had
/// taken and not seen accepted. Returns (sessions, wills).
async fn settle_proxy(ctx: &Arc<Context>, proxy: &str) -> Result<(usize, usize), session_store::Error> {
    let c = cluster(ctx);
    let mut clients = c.redis.claimed_by(proxy).await?;
    clients.extend(c.redis.wills_owed_by(proxy).await?);
    clients.sort_unstable();
    clients.dedup();
    let (mut wills, mut offline) = (0usize, 0usize);
    for client_id in &clients {
        // The wills become ours to publish: recorded first, so that if this proxy dies in turn
        // its own settlement finds them.
        c.redis.owe_wills(&c.id, client_id).await?;
        let Some(orphaned) = c.redis.orphan(client_id, proxy, &c.id).await? else { continue };
        offline += usize::from(orphaned.went_offline);
        if let Some(delay) = orphaned.delayed_will {
            c.redis.schedule_will(client_id, now_ms() + delay.as_millis() as u64).await?;
        }
        wills += publish_owed(ctx, client_id, orphaned.owed).await;
    }
    // The claims stay listed: a process restarted under the same name may be claiming the same
    // client ids again right now, and removing them would hide those connections from the next
    // settlement. A settled entry costs one no-op ORPHAN there; a graceful leave clears the list.
    Ok((offline, wills))
}

/// Publishes wills of `client_id` this proxy took in Redis; returns how many.
async fn publish_owed(ctx: &Context, client_id: &str, owed: Vec<OwedWill>) -> usize {
    let mut published = 0;
    for o in owed {
        if let Some(w) = will_from_store(&o.will) {
            ctx.publish_will(w, Some((client_id, o.epoch))).await;
            published += 1;
        }
    }
    published
}

/// Takes the delayed will of an offline session and publishes it, unless the client came back
/// or another proxy took it. Returns whether there was one.
pub async fn take_and_publish_will(ctx: &Context, client_id: &str) -> Result<bool, session_store::Error> {
    let c = cluster(ctx);
    c.redis.owe_wills(&c.id, client_id).await?;
    let owed = c.redis.take_will(client_id, &c.id).await?;
    let taken = owed.is_some();
    publish_owed(ctx, client_id, owed.into_iter().collect()).await;
    Ok(taken)
}

async fn due_wills(ctx: &Arc<Context>) -> Result<(), session_store::Error> {
    let c = cluster(ctx);
    for client_id in c.redis.due_wills(now_ms(), WILLS_PER_TURN).await? {
        take_and_publish_will(ctx, &client_id).await?;
    }
    Ok(())
}

/// Discover mode: follows the ring in Redis — prepares for a change (links to joining shards,
/// subscriptions at the next owners), acknowledges it, and switches once it is committed.
async fn follow_ring(ctx: Weak<Context>, shutdown: CancellationToken) {
    let Some(every) = ctx.upgrade().map(|c| cluster(&c).heartbeat) else { return };
    let mut tick = tokio::time::interval(every);
    let mut prepared = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(ctx) = ctx.upgrade() else { return };
        if let Err(e) = ring_turn(&ctx, &mut prepared).await {
            tracing::warn!(error = %e, "following the ring failed; retrying");
        }
    }
}

async fn ring_turn(ctx: &Arc<Context>, prepared: &mut u64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let c = cluster(ctx);
    let state = c.redis.ring().await?;
    match &state.next {
        Some(next) if *prepared != next.epoch => {
            ctx.shards.set_next(Some(topology(ctx, &next.members, next.epoch).await?));
            subscribe_at_next_owners(ctx).await?;
            c.redis.ring_ready(next.epoch, &format!("proxy:{}", c.id)).await?;
            *prepared = next.epoch;
            tracing::info!(epoch = next.epoch, members = ?next.members, "prepared for the ring change");
        }
        None if ctx.shards.next().is_some() && state.epoch == ctx.shards.now().epoch => {
            tracing::info!("ring change aborted");
            ctx.shards.set_next(None);
        }
        _ => {}
    }
    if state.epoch != ctx.shards.now().epoch && !state.members.is_empty() {
        let t = topology(ctx, &state.members, state.epoch).await?;
        ctx.shards.switch(t).await;
        tracing::info!(epoch = state.epoch, members = ?state.members, "switched to the new ring");
    }
    Ok(())
}

/// A topology over `members`, reusing this proxy's links and making the missing ones.
async fn topology(ctx: &Arc<Context>, members: &[String], epoch: u64) -> Result<Topology, Box<dyn std::error::Error + Send + Sync>> {
    let c = cluster(ctx);
    let addrs: HashMap<String, String> = c.redis.live_shards(REGISTERED).await?.into_iter().collect();
    let (now, next) = (ctx.shards.now(), ctx.shards.next());
    let mut links = Vec::with_capacity(members.len());
    for key in members {
        let existing = now.link_by_key(key).or_else(|| next.as_ref().and_then(|n| n.link_by_key(key))).cloned();
        let link = match existing {
            Some(l) => l,
            None => {
                let addr = addrs.get(key).ok_or_else(|| format!("shard {key} is in the ring but not registered"))?;
                let (link, state) = shard_link(&c.id, key, addr, &c.sink, &c.links_stop);
                state.attach(ctx);
                link
            }
        };
        links.push(link);
    }
    Ok(Topology::new(members.to_vec(), links, epoch))
}

/// Subscribes this proxy's connections at the shards that own their filters under the next
/// ring but not under the current one.
async fn subscribe_at_next_owners(ctx: &Arc<Context>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (now, Some(next)) = (ctx.shards.now(), ctx.shards.next()) else { return Ok(()) };
    let mut calls = Vec::new();
    for (i, key) in next.keys().iter().enumerate() {
        let new_shard = now.index_of(key).is_none();
        let requests = ctx.registry.resync(|item| {
            let inner = inner_filter(item);
            match next.ring().shards_for_filter(inner) {
                ShardSet::All => new_shard,
                ShardSet::One(owner) => owner == i && now.ring().owner_name(inner) != key,
            }
        });
        for r in requests {
            let link = next.link(i).clone();
            calls.push(async move {
                link.call(|id| match r {
                    Request::Subscribe { session, items, .. } => Request::Subscribe { id, session, items, deliver_retained: None },
                    other => other,
                })
                .await
            });
        }
    }
    let n = calls.len();
    for r in join_all(calls).await {
        r?;
    }
    if n > 0 {
        tracing::info!(connections = n, "subscriptions placed at their next owners");
    }
    Ok(())
}

fn inner_filter(item: &SubscribeItem) -> &str {
    match parse_shared(&item.filter) {
        Ok(Some(s)) => s.filter,
        _ => &item.filter,
    }
}

/// What a link to one shard asks of this proxy: the subscriptions to re-send after a
/// (re)connect.
pub struct LinkState {
    /// The shard's ring key.
    key: String,
    ctx: OnceLock<Weak<Context>>,
}

impl LinkState {
    pub fn new(key: String) -> Arc<LinkState> {
        Arc::new(LinkState { key, ctx: OnceLock::new() })
    }

    /// Called once the context exists (links are made before it).
    pub fn attach(&self, ctx: &Arc<Context>) {
        let _ = self.ctx.set(Arc::downgrade(ctx));
    }
}

impl LinkEvents for LinkState {
    /// Every subscription this shard holds under the current ring or a next one.
    fn resync(&self) -> Vec<Request> {
        let Some(ctx) = self.ctx.get().and_then(Weak::upgrade) else { return Vec::new() };
        let rings: Vec<Arc<Topology>> = std::iter::once(ctx.shards.now()).chain(ctx.shards.next()).collect();
        let holds = |ring: &Ring, item: &SubscribeItem| {
            ring.contains(&self.key)
                && match ring.shards_for_filter(inner_filter(item)) {
                    ShardSet::All => true,
                    ShardSet::One(i) => ring.names()[i] == self.key,
                }
        };
        ctx.registry.resync(|item| rings.iter().any(|t| holds(t.ring(), item)))
    }

    fn linked(&self, again: bool) {
        if again {
            tracing::info!(shard = %self.key, "shard link restored; subscriptions re-sent");
        }
    }
}
