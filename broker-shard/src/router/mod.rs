//! The shard: one task that owns its subscription index, retained messages and session routes.
//!
//! Requests are handled one at a time, in arrival order, so per-topic order is the order in
//! which the shard received the messages. Durable work goes to the [`Pipeline`], whose results
//! leave in request order (see there); meanwhile the router keeps handling requests, so one
//! commit covers everything that arrived during the previous one.
//!
//! # Clustered mode
//! With a shard-local store (`spawn_clustered`) the shard also
//! - logs every QoS 1/2 message before answering, keeps the entry until its copies are queued
//!   and confirmed by the proxies that got them ([`log_book`]), and replays what is left after a
//!   crash — once its proxies have re-sent their subscriptions (or a deadline passed);
//! - recognises a PUBLISH a proxy sends again after losing the reply, by request;
//! - keeps persistent sessions' subscriptions on disk, so it queues for them after a restart
//!   even before their proxies reconnect;
//! - treats a proxy whose link dropped as away for a grace period ([`peers`]).
//!
//! Design: the router never waits for a device. It does not time out sessions (the proxy
//! does).

mod log_book;
mod peers;
mod rebalance;
mod sessions;

pub use rebalance::{Forward, Handover, RingMembers, CLEANUP_AFTER};

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mqfleet_codec::topic::parse_shared;
use mqfleet_codec::{ByteString, QoS, RetainHandling};
use session_store::{Delivery, Op, Store};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::log_book::LogBook;
use self::peers::Peer;
use self::rebalance::RingView;
use self::sessions::Sessions;
use crate::link::local::Inbound;
use crate::link::{
    ConnId, DeliveryOptions, Event, Marker, ProxyId, Recipient, Reply, Request, RequestId, SessionInfo, ShardError, ShardStats,
    SubscribeItem, WillRef,
};
use crate::log::{self, Publisher};
use crate::message::Message;
use crate::metrics::ShardMetrics;
use crate::now_ms;
use crate::pipeline::{Live, Outgoing, Pipeline, Routed};
use crate::restore::{encode_subscription, Restored};
use crate::retained::RetainedIndex;
use crate::topic::{Match, SessionSlot, SubOptions, SubscriptionIndex};

/// Settings of one shard.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// Name used in logs, metrics and the ring.
    pub name: String,
    /// Queue QoS 0 messages for offline persistent sessions too (off by default, as in
    /// Mosquitto: QoS 0 promises nothing, and queueing it costs a durable write).
    pub queue_qos0_offline: bool,
    /// Requests waiting in the shard's inbox before senders wait.
    pub inbox_capacity: usize,
    /// Clustered: how long a proxy whose link dropped keeps its routes here.
    pub proxy_grace: Duration,
    /// Clustered: how long a starting shard waits for the proxies it expects to re-send their
    /// subscriptions before it replays its log and routes messages.
    pub resync_wait: Duration,
    /// Retained messages this shard holds at most, and their payload bytes (0: no limit). A
    /// retained PUBLISH beyond either is refused whole (5.0: PUBACK 0x97), not half-done.
    pub max_retained_messages: usize,
    pub max_retained_bytes: usize,
    /// Clustered: the identity of the shard's log, new with every new disk (see
    /// [`ShardConfig::log_name`]).
    pub log_id: u64,
}

impl ShardConfig {
    pub fn new(name: impl Into<String>) -> ShardConfig {
        ShardConfig {
            name: name.into(),
            queue_qos0_offline: false,
            inbox_capacity: 8192,
            proxy_grace: Duration::from_secs(30),
            resync_wait: Duration::from_secs(10),
            max_retained_messages: 0,
            max_retained_bytes: 0,
            log_id: 0,
        }
    }

    /// What names this shard's log positions in Redis — queue entries' origins and their
    /// replay watermarks, QoS 2 marks, will acceptances: the shard's name and its log's id. A
    /// shard that comes back with the same name on a new disk starts its positions again from
    /// 1; under its name alone, those would be taken for the old log's (a new message for a
    /// replay of one queued and delivered long ago: dropped; RELIABILITY.md, finding 25).
    pub fn log_name(&self) -> String {
        format!("{}~{:x}", self.name, self.log_id)
    }
}

/// The in-process handle of a running shard. The shard stops when every handle and every link
/// client is dropped.
#[derive(Clone)]
pub struct ShardHandle {
    name: Arc<str>,
    pub(crate) tx: mpsc::Sender<Inbound>,
}

impl ShardHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the shard the ring: its own name, the current ring (`None`: not known yet) and a
    /// change being prepared.
    pub async fn set_ring(&self, me: String, current: Option<RingMembers>, next: Option<RingMembers>) {
        let _ = self.tx.send(Inbound::Ring { me, current, next }).await;
    }

    /// What leaves this shard under the ring `next`; from now on its retained changes for
    /// those topics are forwarded (see `Clustered::forward`).
    pub async fn handover(&self, next: RingMembers) -> Option<Handover> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Inbound::Handover { next, reply }).await.ok()?;
        rx.await.ok()
    }
}

/// Starts a shard of a single-node broker, with the retained messages it owns; `store` holds
/// everything durable.
pub fn spawn(config: ShardConfig, store: Store, retained: Vec<Arc<Message>>, metrics: ShardMetrics) -> (ShardHandle, JoinHandle<()>) {
    let pipeline = Pipeline::new(config.name.as_str().into(), config.log_name().into(), store, None, metrics.clone());
    let restored = Restored { retained, ..Restored::default() };
    start(config, pipeline, restored, None, None, metrics)
}

/// What a clustered shard needs besides its settings.
pub struct Clustered {
    /// Where sessions' queues and QoS 2 markers live (Redis).
    pub sessions: Store,
    /// The shard's own disk: log, retained messages, persistent sessions' subscriptions.
    pub local: Store,
    /// What `local` held at start.
    pub restored: Restored,
    /// Proxies that were alive when the shard started: it waits for them to re-send their
    /// subscriptions (up to `resync_wait`) before replaying its log.
    pub expected_proxies: Vec<String>,
    /// Where retained changes for topics owned elsewhere go (to be sent to their owner).
    pub forward: Option<mpsc::UnboundedSender<Forward>>,
}

/// Starts a shard of a clustered deployment.
pub fn spawn_clustered(config: ShardConfig, c: Clustered, metrics: ShardMetrics) -> (ShardHandle, JoinHandle<()>) {
    let pipeline = Pipeline::new(config.name.as_str().into(), config.log_name().into(), c.sessions, Some(c.local), metrics.clone());
    let hold =
        Hold { deadline: Instant::now() + config.resync_wait, waiting_for: c.expected_proxies.into_iter().collect(), stash: Vec::new() };
    start(config, pipeline, c.restored, Some(hold), c.forward, metrics)
}

fn start(
    config: ShardConfig,
    pipeline: Pipeline,
    restored: Restored,
    hold: Option<Hold>,
    forward: Option<mpsc::UnboundedSender<Forward>>,
    metrics: ShardMetrics,
) -> (ShardHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.inbox_capacity);
    let name: Arc<str> = config.name.as_str().into();
    let Restored { retained, subscriptions, log, last_position } = restored;
    let mut index = RetainedIndex::new();
    for m in retained {
        index.set(m);
    }
    metrics.retained_messages.inc_by(index.len() as i64);
    let clustered = pipeline.is_clustered();
    let mut router = Router {
        name: name.clone(),
        config,
        index: SubscriptionIndex::new(),
        retained: index,
        sessions: Sessions::default(),
        peers: HashMap::new(),
        pipeline,
        metrics,
        book: clustered.then(|| LogBook::new(last_position)),
        hold,
        replay: log,
        ring: None,
        forward,
    };
    for (client_id, item) in subscriptions {
        let session = SessionInfo { client_id, conn: None, persistent: true };
        router.subscribe_items(&session, NO_PROXY, vec![item], None);
    }
    if router.hold.as_ref().is_some_and(|h| h.waiting_for.is_empty()) {
        router.end_hold("no proxies to wait for");
    }
    let task = tokio::spawn(router.run(rx));
    (ShardHandle { name, tx }, task)
}

/// A starting clustered shard holds messages until its proxies have re-sent their
/// subscriptions, so nothing is routed by an incomplete index.
struct Hold {
    deadline: Instant,
    /// Names of expected proxies that have not finished their resync.
    waiting_for: HashSet<String>,
    /// Requests held meanwhile, in arrival order.
    stash: Vec<(ProxyId, Request)>,
}

/// The route of sessions known from disk, without a proxy (their route is `None` anyway).
const NO_PROXY: ProxyId = ProxyId(u32::MAX);

/// Held requests beyond which the shard stops waiting for late proxies.
const MAX_STASH: usize = 100_000;
/// Durable work queued in the pipeline beyond which the router stops reading requests (the
/// links then stop granting credit, and proxies buffer or refuse).
const MAX_BACKLOG: usize = 65_536;
/// Log trims collected before they are written (also written at every tick).
const TRIM_BATCH: usize = 256;
const TICK: Duration = Duration::from_millis(100);

struct Router {
    name: Arc<str>,
    config: ShardConfig,
    index: SubscriptionIndex,
    retained: RetainedIndex,
    sessions: Sessions,
    peers: HashMap<ProxyId, Peer>,
    pipeline: Pipeline,
    metrics: ShardMetrics,
    /// Clustered mode only.
    book: Option<LogBook>,
    hold: Option<Hold>,
    /// Log entries to replay when the hold ends.
    replay: Vec<(u64, log::Entry)>,
    /// Clustered: the ring, once the shard's process told it.
    ring: Option<RingView>,
    forward: Option<mpsc::UnboundedSender<Forward>>,
}

impl Router {
    async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) {
        tracing::debug!(shard = %self.name, "shard started");
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepting = self.pipeline.backlog() < MAX_BACKLOG;
            tokio::select! {
                inbound = rx.recv(), if accepting => match inbound {
                    Some(i) => self.handle(i).await,
                    None => break,
                },
                Some(out) = self.pipeline.next(), if !self.pipeline.is_idle() => self.send(out).await,
                _ = tick.tick() => self.on_tick(),
            }
        }
        // Give-backs of refused QoS 2 marks are not waited for (Redis may be what is gone):
        // their entries stay in the log and a restart delivers them under their marks.
        while !self.pipeline.is_empty() {
            let Some(out) = self.pipeline.next().await else { break };
            self.send(out).await;
        }
        self.write_trims();
        tracing::debug!(shard = %self.name, "shard stopped");
    }

    async fn send(&mut self, out: Outgoing) {
        for (proxy, event) in out.events {
            let Some(peer) = self.peers.get_mut(&proxy) else { continue };
            if let (Some(book), Some(r)) = (&mut self.book, peers::log_ref(&event)) {
                book.sent(r.position);
            }
            peer.send(event).await;
        }
        if let Some(book) = &mut self.book {
            for p in out.queued {
                book.queued(p);
            }
            for p in out.held {
                book.forget_request(p);
            }
            let dropped = !out.dropped.is_empty();
            for p in out.dropped {
                book.dropped(p);
            }
            // A dropped entry goes at once: a restart before its trim would deliver it.
            if dropped || book.pending_trims() >= TRIM_BATCH {
                self.write_trims();
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self.hold.as_ref().is_some_and(|h| now >= h.deadline) {
            let late: Vec<String> = self.hold.as_ref().map(|h| h.waiting_for.iter().cloned().collect()).unwrap_or_default();
            tracing::warn!(shard = %self.name, late = ?late, "proxies did not re-send their subscriptions in time; serving anyway");
            self.end_hold("deadline");
        }
        let gone: Vec<ProxyId> =
            self.peers.iter().filter(|(_, p)| p.away_longer_than(self.config.proxy_grace, now)).map(|(id, _)| *id).collect();
        for proxy in gone {
            tracing::info!(shard = %self.name, proxy = %self.peers[&proxy].name, "proxy away longer than the grace period; its connections are gone");
            self.drop_peer(proxy);
        }
        let ops = self.clean_up_if_due(now);
        if !ops.is_empty() {
            self.pipeline.write_local_then_emit(ops, Vec::new());
        }
        self.write_trims();
    }

    fn write_trims(&mut self) {
        let (Some(book), Some(local)) = (&mut self.book, self.pipeline.local()) else { return };
        self.metrics.log_entries.set(book.len() as i64);
        let trims = book.take_trims();
        if trims.is_empty() {
            return;
        }
        let ops = trims.into_iter().map(|position| Op::TrimLog { position }).collect();
        let shard = self.name.clone();
        // A trim lost in a crash only replays entries the proxies will recognise.
        tokio::spawn(async move {
            if let Err(e) = local.write(ops).await {
                tracing::warn!(shard = %shard, error = %e, "could not trim the message log");
            }
        });
    }

    async fn handle(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Connect { proxy, name, incarnation, events } => self.on_proxy_linked(proxy, name, incarnation, events).await,
            Inbound::Disconnect { proxy } => self.on_proxy_unlinked(proxy),
            Inbound::Request { proxy, request } => self.on_request(proxy, request),
            Inbound::Ring { me, current, next } => self.on_ring(me, current, next),
            Inbound::Handover { next, reply } => {
                let _ = reply.send(self.on_handover(next));
            }
        }
    }

    fn on_request(&mut self, proxy: ProxyId, request: Request) {
        if let Some(hold) = &mut self.hold {
            if matches!(request, Request::Publish { .. } | Request::Redispatch { .. } | Request::Flush { .. }) {
                hold.stash.push((proxy, request));
                if hold.stash.len() >= MAX_STASH {
                    tracing::warn!(shard = %self.name, "too many messages held while waiting for proxies; serving now");
                    self.end_hold("stash full");
                }
                return;
            }
        }
        match request {
            Request::Publish { id, message, marker } => self.on_publish(proxy, id, message, marker),
            Request::Subscribe { id, session, items, deliver_retained } => {
                let (reply, ops) = self.subscribe_items(&session, proxy, items, deliver_retained);
                self.pipeline.write_local_then_emit(ops, vec![(proxy, Event::Reply { id, result: Ok(reply) })]);
            }
            Request::Unsubscribe { id, client_id, filters } => {
                let (reply, ops) = self.on_unsubscribe(&client_id, &filters);
                self.pipeline.write_local_then_emit(ops, vec![(proxy, Event::Reply { id, result: Ok(reply) })]);
            }
            Request::Attach { id, session } => {
                let (_, was_persistent) = self.sessions.upsert(&session, proxy);
                let mut ops = Vec::new();
                if was_persistent && !session.persistent {
                    ops.push(Op::RemoveSubscription { client_id: session.client_id.to_string(), filter: None });
                }
                if !ops.is_empty() {
                    self.pipeline.write_local_then_emit(ops, Vec::new());
                }
                // After every earlier queueing: the proxy reads the session's queue next.
                self.pipeline.emit_after_queueing(vec![(proxy, Event::Reply { id, result: Ok(Reply::Done) })]);
            }
            Request::Detach { client_id, conn } => self.on_detach(&client_id, proxy, conn),
            Request::Forget { client_id, conn } => self.on_forget(&client_id, conn.map(|c| (proxy, c))),
            Request::Redispatch { message, share_filter, exclude } => self.on_redispatch(message, &share_filter, &exclude),
            Request::ResyncDone => self.on_resync_done(proxy),
            Request::Received { accepted, queued } => {
                let (Some(book), Some(peer)) = (&mut self.book, self.peers.get_mut(&proxy)) else { return };
                peer.confirm(accepted, queued, |p| book.confirmed(p));
            }
            Request::Flush { id } => self.pipeline.emit_after_queueing(vec![(proxy, Event::Reply { id, result: Ok(Reply::Done) })]),
            Request::Stats { id } => {
                let stats = ShardStats {
                    sessions: self.sessions.slots().count() as u64,
                    subscriptions: self.index.len() as u64,
                    retained_messages: self.retained.len() as u64,
                    retained_bytes: self.retained.bytes() as u64,
                    log_entries: self.book.as_ref().map_or(0, |b| b.len() as u64),
                    ring_epoch: self.ring.as_ref().and_then(|r| r.current.as_ref()).map_or(0, |(epoch, _)| *epoch),
                };
                self.pipeline.emit(vec![(proxy, Event::Reply { id, result: Ok(Reply::Stats(stats)) })]);
            }
            Request::AdoptRetained { id, messages, removed } => {
                let ops = self.adopt_retained(messages, removed);
                self.pipeline.write_local_then_reply(ops, (proxy, id));
            }
            Request::AdoptSubscriptions { id, items } => {
                let ops = self.adopt_subscriptions(items);
                self.pipeline.write_local_then_reply(ops, (proxy, id));
            }
        }
    }

    // === proxies ===

    async fn on_proxy_linked(&mut self, proxy: ProxyId, name: Arc<str>, incarnation: u64, events: mpsc::Sender<Event>) {
        if self.peers.get(&proxy).is_some_and(|p| p.incarnation != incarnation) {
            tracing::info!(shard = %self.name, proxy = %name, "proxy restarted; its previous connections are gone");
            self.drop_peer(proxy);
        }
        match self.peers.get_mut(&proxy) {
            Some(peer) => {
                // Unconfirmed events go first, before anything newer, so each lane reaches the
                // proxy in position order (the proxy recognises repeats by position).
                let resend = peer.relink(events);
                tracing::debug!(shard = %self.name, proxy = %name, resent = resend.len(), "proxy linked again");
                for event in resend {
                    peer.resend(event).await;
                }
            }
            None => {
                tracing::debug!(shard = %self.name, proxy = %name, "proxy linked");
                self.peers.insert(proxy, Peer::new(name, incarnation, events));
            }
        }
    }

    fn on_proxy_unlinked(&mut self, proxy: ProxyId) {
        if self.book.is_none() {
            // In-process links end only when the proxy does.
            self.drop_peer(proxy);
        } else if let Some(peer) = self.peers.get_mut(&proxy) {
            peer.went_away(Instant::now());
        }
    }

    /// The proxy is gone for good: its clean sessions end, its persistent ones are offline.
    fn drop_peer(&mut self, proxy: ProxyId) {
        if let Some(mut peer) = self.peers.remove(&proxy) {
            if let Some(book) = &mut self.book {
                peer.release_all(|p| book.confirmed(p));
            }
            if let Some(hold) = &mut self.hold {
                hold.stash.retain(|(p, _)| *p != proxy);
            }
        }
        let slots: Vec<SessionSlot> = self.sessions.routed_to(proxy).collect();
        for slot in slots {
            if self.sessions.get(slot).persistent {
                self.sessions.get_mut(slot).route = None;
            } else {
                self.forget(slot);
            }
        }
    }

    fn on_resync_done(&mut self, proxy: ProxyId) {
        let Some(peer) = self.peers.get(&proxy) else { return };
        let Some(hold) = &mut self.hold else { return };
        hold.waiting_for.remove(&*peer.name);
        if hold.waiting_for.is_empty() {
            self.end_hold("every expected proxy resynchronised");
        }
    }

    /// Replays the log, then serves what was held, in order.
    fn end_hold(&mut self, why: &str) {
        let Some(hold) = self.hold.take() else { return };
        let replay = std::mem::take(&mut self.replay);
        tracing::info!(shard = %self.name, why, replayed = replay.len(), held = hold.stash.len(), "shard serving");
        for (position, entry) in replay {
            if let Some(book) = &mut self.book {
                book.restore(position, entry.publisher);
            }
            let message = Arc::new(entry.message);
            let targets = if message.is_expired(now_ms()) { Vec::new() } else { self.match_targets(&message) };
            let plan = self.plan(targets);
            // A will asks again: the crash may have come before the cluster said to publish it.
            let marker = entry.will.map(|w| accept_will(w, format!("{}@{position}", self.pipeline.log_name())));
            self.dispatch(None, message, Vec::new(), marker, plan, Some((position, None)));
        }
        for (proxy, request) in hold.stash {
            self.on_request(proxy, request);
        }
    }

    // === sessions ===

    fn on_detach(&mut self, client_id: &str, proxy: ProxyId, conn: ConnId) {
        let Some(slot) = self.sessions.find(client_id) else { return };
        let entry = self.sessions.get_mut(slot);
        if entry.route != Some((proxy, conn)) {
            return; // taken over meanwhile: the new connection owns the route
        }
        if entry.persistent {
            entry.route = None;
        } else {
            self.forget(slot);
        }
    }

    /// `route`: forget only if the session is still there. `None`: only if it is offline.
    fn on_forget(&mut self, client_id: &str, route: Option<(ProxyId, ConnId)>) {
        let Some(slot) = self.sessions.find(client_id) else { return };
        if self.sessions.get(slot).route == route {
            if self.sessions.get(slot).persistent {
                let op = Op::RemoveSubscription { client_id: client_id.to_string(), filter: None };
                self.pipeline.write_local_then_emit(vec![op], Vec::new());
            }
            self.forget(slot);
        }
    }

    fn forget(&mut self, slot: SessionSlot) {
        let entry = self.sessions.remove(slot);
        for item in &entry.subscriptions {
            let (group, f) = split_filter(&item.filter);
            if self.index.remove(f, group, slot) {
                self.metrics.subscriptions.dec();
            }
        }
    }

    // === subscriptions ===

    /// Adds or replaces one subscription of the session in `slot`: in the index and in the
    /// session's own list (what a resync or a hand-over sends on). True if it existed.
    fn add_subscription(&mut self, slot: SessionSlot, item: &SubscribeItem) -> bool {
        let (group, filter) = split_filter(&item.filter);
        let existed = self.index.insert(filter, group, slot, SubOptions { options: item.options, id: item.id });
        let subs = &mut self.sessions.get_mut(slot).subscriptions;
        match subs.iter_mut().find(|s| s.filter == item.filter) {
            Some(s) => *s = item.clone(),
            None => {
                subs.push(item.clone());
                self.metrics.subscriptions.inc();
            }
        }
        existed
    }

    /// Adds or replaces subscriptions; returns the reply and, for a persistent session in
    /// clustered mode, what to write to the shard's disk.
    fn subscribe_items(
        &mut self,
        session: &SessionInfo,
        proxy: ProxyId,
        items: Vec<SubscribeItem>,
        deliver_retained: Option<u64>,
    ) -> (Reply, Vec<Op>) {
        let (slot, was_persistent) = self.sessions.upsert(session, proxy);
        let clustered = self.book.is_some();
        let mut ops = Vec::new();
        if clustered && was_persistent && !session.persistent {
            ops.push(Op::RemoveSubscription { client_id: session.client_id.to_string(), filter: None });
        }
        let now = now_ms();
        let mut existed = Vec::with_capacity(items.len());
        let mut retained = Vec::new();
        for item in items {
            let was = self.add_subscription(slot, &item);
            existed.push(was);
            let (group, filter) = split_filter(&item.filter);
            // A resync re-sends what the shard has: write only what a client changed.
            if clustered && session.persistent && (deliver_retained.is_some() || !was) {
                ops.push(Op::PutSubscription {
                    client_id: session.client_id.to_string(),
                    filter: item.filter.to_string(),
                    entry: encode_subscription(&item),
                });
            }
            // Retained messages are not sent for shared subscriptions (MQTT 5 §4.8.2).
            let send = match item.options.retain_handling {
                RetainHandling::OnSubscribe => true,
                RetainHandling::OnNewSubscription => !was,
                RetainHandling::Never => false,
            };
            if let (Some(epoch), true, None, Some(_)) = (deliver_retained, send, group, session.conn) {
                for m in self.retained.matching(filter) {
                    if m.is_expired(now) || !self.owns(&m.topic, epoch) {
                        continue;
                    }
                    let delivery = DeliveryOptions {
                        qos: m.qos.min(item.options.qos),
                        // [MQTT-3.3.1-9]: RETAIN is 1 for messages sent because of a new subscription.
                        retain: true,
                        subscription_ids: item.id.into_iter().collect(),
                    };
                    retained.push((m, delivery));
                }
            }
        }
        (Reply::Subscribed { existed, retained }, ops)
    }

    fn on_unsubscribe(&mut self, client_id: &str, filters: &[ByteString]) -> (Reply, Vec<Op>) {
        let Some(slot) = self.sessions.find(client_id) else {
            return (Reply::Unsubscribed { existed: vec![false; filters.len()] }, Vec::new());
        };
        let persist = self.book.is_some() && self.sessions.get(slot).persistent;
        let mut existed = Vec::with_capacity(filters.len());
        let mut ops = Vec::new();
        for full in filters {
            let (group, filter) = split_filter(full);
            let removed = self.index.remove(filter, group, slot);
            if removed {
                self.metrics.subscriptions.dec();
                self.sessions.get_mut(slot).subscriptions.retain(|s| s.filter != *full);
                if persist {
                    ops.push(Op::RemoveSubscription { client_id: client_id.to_string(), filter: Some(full.to_string()) });
                }
            }
            existed.push(removed);
        }
        (Reply::Unsubscribed { existed }, ops)
    }

    // === publish ===

    fn on_publish(&mut self, proxy: ProxyId, id: Option<RequestId>, message: Arc<Message>, marker: Option<Marker>) {
        // Logged: QoS 1/2 in clustered mode. Its request identifies it if the proxy sends it
        // again because the reply was lost.
        let logged = self.book.is_some() && message.qos != QoS::AtMostOnce;
        let publisher = match (logged, id, self.peers.get(&proxy)) {
            (true, Some(id), Some(peer)) => Some(Publisher { proxy: peer.name.to_string(), incarnation: peer.incarnation, request: id.0 }),
            _ => None,
        };
        if let (Some(p), Some(book), Some(id)) = (&publisher, &self.book, id) {
            if book.accepted(p).is_some() {
                // Accepted before: answer again (after the first answer, in order), route nothing.
                self.pipeline.answer_again(proxy, id, &message);
                return;
            }
        }
        if let Some(why) = self.retained_quota_exceeded(&message) {
            // BAD-INPUT 63: refused before anything is stored or routed.
            self.metrics.retained_refused.inc();
            if let Some(id) = id {
                let error = ShardError::QuotaExceeded { shard: self.config.name.clone(), detail: why };
                self.pipeline.emit(vec![(proxy, Event::Reply { id, result: Err(error) })]);
            }
            return;
        }
        self.metrics.messages.inc();
        let now = now_ms();
        let mut retained_ops = Vec::new();
        if message.retain {
            let topic = message.topic.to_string();
            let before = self.retained.len() as i64;
            if message.payload.is_empty() {
                self.retained.remove(&topic);
                retained_ops.push(Op::RemoveRetained { topic });
                self.forward_retained(&message.topic, None);
            } else {
                self.retained.set(message.clone());
                retained_ops.push(Op::PutRetained { topic, message: message.encode(), expires_at_ms: message.expires_at_ms });
                self.forward_retained(&message.topic, Some(message.clone()));
            }
            self.metrics.retained_messages.inc_by(self.retained.len() as i64 - before);
        }
        let targets = if message.is_expired(now) { Vec::new() } else { self.match_targets(&message) };
        let plan = self.plan(targets);
        let will = match &marker {
            Some(Marker::Will(w)) => Some(w.clone()),
            _ => None,
        };
        let log = match &mut self.book {
            Some(book) if logged => {
                let entry = log::encode(publisher.as_ref(), will.as_ref(), &message);
                Some((book.append(publisher), Some(entry)))
            }
            _ => None,
        };
        // Names this acceptance: its log position, or (a QoS 0 will is not logged, so never
        // replayed) the request, which is never sent twice.
        let log_name = self.pipeline.log_name();
        let acceptance = || match (&log, self.peers.get(&proxy)) {
            (Some((position, _)), _) => format!("{log_name}@{position}"),
            (None, Some(peer)) => format!("{log_name}@{}/{}/{}", peer.name, peer.incarnation, id.map_or(0, |i| i.0)),
            (None, None) => format!("{log_name}@-"),
        };
        let marker = marker.map(|m| match m {
            Marker::Qos2 { client_id, pkid } => {
                Op::MarkInbound { client_id: client_id.to_string(), pkid, by: acceptance(), replacing: Vec::new() }
            }
            Marker::Will(w) => accept_will(w, acceptance()),
        });
        self.dispatch(Some((proxy, id)), message, retained_ops, marker, plan, log);
    }

    /// Would retaining `message` go beyond the shard's retained quotas? (Replacing or deleting a
    /// retained message is always allowed when it does not grow beyond them.)
    fn retained_quota_exceeded(&self, message: &Message) -> Option<String> {
        let (max_n, max_bytes) = (self.config.max_retained_messages, self.config.max_retained_bytes);
        if !message.retain || message.payload.is_empty() || (max_n == 0 && max_bytes == 0) {
            return None;
        }
        let old = self.retained.get(&message.topic).map(|m| m.payload.len());
        if max_n > 0 && old.is_none() && self.retained.len() >= max_n {
            return Some(format!("this shard holds its maximum of {max_n} retained messages"));
        }
        let bytes = self.retained.bytes() - old.unwrap_or(0) + message.payload.len();
        if max_bytes > 0 && bytes > max_bytes {
            return Some(format!("retained messages on this shard would exceed {max_bytes} bytes"));
        }
        None
    }

    /// Every session that gets a copy, with its merged options: one copy per session for its
    /// ordinary subscriptions [MQTT-3.3.4-4], plus one per shared group that picked it.
    fn match_targets(&mut self, message: &Message) -> Vec<Target> {
        let Router { index, sessions, .. } = self;
        let mut direct: Vec<(SessionSlot, SubOptions)> = Vec::new();
        let mut shared: Vec<Target> = Vec::new();
        index.for_each_match(&message.topic, |m| match m {
            Match::Direct(slot, opts) => {
                // No Local: not to the publisher's own subscriptions [MQTT-3.8.3-3].
                if opts.options.no_local && message.origin.as_ref() == Some(&sessions.get(slot).client_id) {
                    return;
                }
                direct.push((slot, opts));
            }
            Match::Shared(group) => {
                if let Some((slot, opts)) = group.pick(|s| sessions.get(s).route.is_some(), None) {
                    shared.push(Target {
                        slot,
                        delivery: delivery_for(message, &opts),
                        share_filter: Some(ByteString::from(&*group.share_filter)),
                    });
                }
            }
        });
        direct.sort_by_key(|(slot, _)| *slot);
        let mut targets: Vec<Target> = Vec::with_capacity(direct.len() + shared.len());
        for (slot, opts) in direct {
            let d = delivery_for(message, &opts);
            match targets.last_mut() {
                Some(t) if t.slot == slot => {
                    t.delivery.qos = t.delivery.qos.max(d.qos);
                    t.delivery.retain |= d.retain;
                    t.delivery.subscription_ids.extend(d.subscription_ids);
                }
                _ => targets.push(Target { slot, delivery: d, share_filter: None }),
            }
        }
        targets.extend(shared);
        targets
    }

    /// Splits targets into live deliveries per proxy and durable copies for persistent sessions.
    fn plan(&self, targets: Vec<Target>) -> Plan {
        let mut plan = Plan::default();
        for t in targets {
            let entry = self.sessions.get(t.slot);
            let qos0 = t.delivery.qos == QoS::AtMostOnce;
            let durable = entry.persistent && (!qos0 || (entry.route.is_none() && self.config.queue_qos0_offline));
            let durable_idx = durable.then(|| {
                plan.durable.push((
                    entry.client_id.to_string(),
                    Delivery {
                        qos: t.delivery.qos as u8,
                        retain: t.delivery.retain,
                        subscription_ids: t.delivery.subscription_ids.clone(),
                    },
                ));
                plan.durable.len() - 1
            });
            match entry.route {
                Some((proxy, conn)) => plan.live.push(Live {
                    proxy,
                    durable_idx,
                    recipient: Recipient { conn, delivery: t.delivery, seq: None, share_filter: t.share_filter },
                }),
                None if durable => {}
                None => plan.not_queued += 1,
            }
        }
        plan
    }

    /// Hands a routed message to the pipeline. `log`: its position, and the entry to append
    /// (`None` when replaying an entry already in the log).
    fn dispatch(
        &mut self,
        publisher: Option<(ProxyId, Option<RequestId>)>,
        message: Arc<Message>,
        retained_ops: Vec<Op>,
        marker: Option<Op>,
        plan: Plan,
        log: Option<(u64, Option<bytes::Bytes>)>,
    ) {
        let Plan { live, durable, not_queued } = plan;
        self.metrics.drop_copies("qos0_offline", not_queued);
        let (position, log_entry) = match log {
            Some((p, e)) => (Some(p), e),
            None => (None, None),
        };
        self.pipeline.dispatch(Routed { publisher, message, live, durable, retained_ops, marker, position, log_entry });
    }

    fn on_redispatch(&mut self, message: Arc<Message>, share_filter: &str, exclude: &str) {
        let (Some(group), filter) = split_filter(share_filter) else { return };
        let excluded = self.sessions.find(exclude);
        let Router { index, sessions, .. } = self;
        let picked = index.group_mut(filter, group).and_then(|g| g.pick(|s| sessions.get(s).route.is_some(), excluded));
        let Some((slot, opts)) = picked else {
            self.metrics.drop_copies("no_shared_subscriber", 1);
            return;
        };
        let target = Target { slot, delivery: delivery_for(&message, &opts), share_filter: Some(share_filter.into()) };
        let plan = self.plan(vec![target]);
        self.dispatch(None, message, Vec::new(), None, plan, None);
    }
}

/// Delivery options of `message` through one subscription.
fn delivery_for(message: &Message, opts: &SubOptions) -> DeliveryOptions {
    DeliveryOptions {
        qos: message.qos.min(opts.options.qos),
        retain: opts.options.retain_as_published && message.retain,
        subscription_ids: opts.id.into_iter().collect(),
    }
}

/// `$share/{group}/{filter}` → `(Some(group), filter)`; anything else → `(None, filter)`.
/// Filters reaching the shard were validated by the proxy.
fn split_filter(full: &str) -> (Option<&str>, &str) {
    match parse_shared(full) {
        Ok(Some(s)) => (Some(s.group), s.filter),
        _ => (None, full),
    }
}

struct Target {
    slot: SessionSlot,
    delivery: DeliveryOptions,
    share_filter: Option<ByteString>,
}

#[derive(Default)]
struct Plan {
    live: Vec<Live>,
    /// Copies for persistent sessions, online or not.
    durable: Vec<(String, Delivery)>,
    /// Copies for offline sessions that are not queued (QoS 0).
    not_queued: u64,
}

fn accept_will(w: WillRef, acceptance: String) -> Op {
    Op::AcceptWill { client_id: w.client_id.to_string(), epoch: w.epoch, proxy: w.proxy.to_string(), acceptance }
}
