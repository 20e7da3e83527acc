//! The shard: one task that owns its subscription index, retained messages and session routes.
//!
//! Requests are handled one at a time, in arrival order, so per-topic order is the order in
//! which the shard received the messages. Anything that needs durable work (queueing copies for
//! persistent sessions, storing a retained message) is sent to the session store at once, and
//! its outcome joins an ordered pipeline of outgoing events: events leave in request order, and
//! none leaves before the durable work of an earlier request is committed. Meanwhile the router
//! keeps handling requests, so one fsync covers everything that arrived during the previous one.
//!
//! Design: the router never waits for a proxy or a device. It does not retry failed writes
//! (the publisher is told and retries), and it does not time out sessions (the proxy does).

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::{ready, BoxFuture, FutureExt};
use futures::stream::{FuturesOrdered, StreamExt};
use mqfleet_codec::topic::parse_shared;
use mqfleet_codec::{ByteString, QoS, RetainHandling};
use session_store::{Delivery, Op, OpResult, Store};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::link::local::Inbound;
use crate::link::{
    ConnId, Deliver, DeliveryOptions, Event, ProxyId, Recipient, Reply, Request, RequestId, SessionInfo, ShardError, SubscribeItem,
};
use crate::message::Message;
use crate::metrics::ShardMetrics;
use crate::now_ms;
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
}

impl ShardConfig {
    pub fn new(name: impl Into<String>) -> ShardConfig {
        ShardConfig { name: name.into(), queue_qos0_offline: false, inbox_capacity: 8192 }
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
}

/// Starts a shard with the retained messages it owns.
pub fn spawn(config: ShardConfig, store: Store, retained: Vec<Arc<Message>>, metrics: ShardMetrics) -> (ShardHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.inbox_capacity);
    let name: Arc<str> = config.name.as_str().into();
    let mut index = RetainedIndex::new();
    for m in retained {
        index.set(m);
    }
    metrics.retained_messages.inc_by(index.len() as i64);
    let router = Router {
        name: name.clone(),
        config,
        index: SubscriptionIndex::new(),
        retained: index,
        sessions: Sessions::default(),
        proxies: HashMap::new(),
        store,
        metrics,
        pending: FuturesOrdered::new(),
    };
    let task = tokio::spawn(router.run(rx));
    (ShardHandle { name, tx }, task)
}

/// Events ready to leave, in order.
type Outgoing = Vec<(ProxyId, Event)>;

struct Router {
    name: Arc<str>,
    config: ShardConfig,
    index: SubscriptionIndex,
    retained: RetainedIndex,
    sessions: Sessions,
    /// Where each connected proxy receives events. Entries are removed when the proxy
    /// disconnects; sends to a proxy whose receiver is gone are dropped.
    proxies: HashMap<ProxyId, mpsc::Sender<Event>>,
    store: Store,
    metrics: ShardMetrics,
    /// Outgoing events waiting for earlier durable work, in request order.
    pending: FuturesOrdered<BoxFuture<'static, Outgoing>>,
}

impl Router {
    async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) {
        tracing::debug!(shard = %self.name, "shard started");
        loop {
            tokio::select! {
                inbound = rx.recv() => match inbound {
                    Some(i) => self.handle(i),
                    None => break,
                },
                Some(out) = self.pending.next(), if !self.pending.is_empty() => self.send(out).await,
            }
        }
        while let Some(out) = self.pending.next().await {
            self.send(out).await;
        }
        tracing::debug!(shard = %self.name, "shard stopped");
    }

    async fn send(&mut self, out: Outgoing) {
        for (proxy, event) in out {
            if let Some(tx) = self.proxies.get(&proxy) {
                // A closed receiver means the proxy left; its disconnect is on the way.
                let _ = tx.send(event).await;
            }
        }
    }

    fn emit(&mut self, out: Outgoing) {
        self.pending.push_back(ready(out).boxed());
    }

    fn reply(&mut self, proxy: ProxyId, id: RequestId, reply: Reply) {
        self.emit(vec![(proxy, Event::Reply { id, result: Ok(reply) })]);
    }

    fn handle(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Connect { proxy, events } => {
                tracing::debug!(shard = %self.name, proxy = proxy.0, "proxy linked");
                self.proxies.insert(proxy, events);
            }
            Inbound::Disconnect { proxy } => self.on_proxy_gone(proxy),
            Inbound::Request { proxy, request } => match request {
                Request::Publish { id, message, qos2_marker } => self.on_publish(proxy, id, message, qos2_marker),
                Request::Subscribe { id, session, items, deliver_retained } => {
                    let reply = self.on_subscribe(proxy, session, items, deliver_retained);
                    self.reply(proxy, id, reply);
                }
                Request::Unsubscribe { id, client_id, filters } => {
                    let reply = self.on_unsubscribe(&client_id, &filters);
                    self.reply(proxy, id, reply);
                }
                Request::Attach { id, session } => {
                    self.sessions.upsert(&session, proxy);
                    self.reply(proxy, id, Reply::Done);
                }
                Request::Detach { client_id, conn } => self.on_detach(&client_id, proxy, conn),
                Request::Forget { client_id, conn } => self.on_forget(&client_id, conn.map(|c| (proxy, c))),
                Request::Redispatch { message, share_filter, exclude } => self.on_redispatch(message, &share_filter, &exclude),
                Request::ResyncDone => {}
            },
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
            self.forget(slot);
        }
    }

    fn forget(&mut self, slot: SessionSlot) {
        let entry = self.sessions.remove(slot);
        for filter in &entry.filters {
            let (group, f) = split_filter(filter);
            if self.index.remove(f, group, slot) {
                self.metrics.subscriptions.dec();
            }
        }
    }

    fn on_proxy_gone(&mut self, proxy: ProxyId) {
        self.proxies.remove(&proxy);
        let slots: Vec<SessionSlot> = self.sessions.routed_to(proxy).collect();
        for slot in slots {
            if self.sessions.get(slot).persistent {
                self.sessions.get_mut(slot).route = None;
            } else {
                self.forget(slot);
            }
        }
    }

    // === subscriptions ===

    fn on_subscribe(&mut self, proxy: ProxyId, session: SessionInfo, items: Vec<SubscribeItem>, deliver_retained: bool) -> Reply {
        let slot = self.sessions.upsert(&session, proxy);
        let now = now_ms();
        let mut existed = Vec::with_capacity(items.len());
        let mut retained = Vec::new();
        for item in items {
            let (group, filter) = split_filter(&item.filter);
            let opts = SubOptions { options: item.options, id: item.id };
            let was = self.index.insert(filter, group, slot, opts);
            if !was {
                self.sessions.get_mut(slot).filters.push(item.filter.clone());
                self.metrics.subscriptions.inc();
            }
            existed.push(was);
            // Retained messages are not sent for shared subscriptions (MQTT 5 §4.8.2).
            let send = match item.options.retain_handling {
                RetainHandling::OnSubscribe => true,
                RetainHandling::OnNewSubscription => !was,
                RetainHandling::Never => false,
            };
            if deliver_retained && send && group.is_none() && session.conn.is_some() {
                for m in self.retained.matching(filter) {
                    if m.is_expired(now) {
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
        Reply::Subscribed { existed, retained }
    }

    fn on_unsubscribe(&mut self, client_id: &str, filters: &[ByteString]) -> Reply {
        let Some(slot) = self.sessions.find(client_id) else {
            return Reply::Unsubscribed { existed: vec![false; filters.len()] };
        };
        let mut existed = Vec::with_capacity(filters.len());
        for full in filters {
            let (group, filter) = split_filter(full);
            let removed = self.index.remove(filter, group, slot);
            if removed {
                self.metrics.subscriptions.dec();
                self.sessions.get_mut(slot).filters.retain(|f| f != full);
            }
            existed.push(removed);
        }
        Reply::Unsubscribed { existed }
    }

    // === publish ===

    fn on_publish(&mut self, proxy: ProxyId, id: Option<RequestId>, message: Arc<Message>, qos2_marker: Option<(ByteString, u16)>) {
        self.metrics.messages.inc();
        let now = now_ms();
        let mut ops = Vec::new();
        if let Some((client, pkid)) = qos2_marker {
            ops.push(Op::MarkInbound { client_id: client.to_string(), pkid });
        }
        if message.retain {
            let topic = message.topic.to_string();
            let before = self.retained.len() as i64;
            if message.payload.is_empty() {
                self.retained.remove(&topic);
                ops.push(Op::RemoveRetained { topic });
            } else {
                self.retained.set(message.clone());
                ops.push(Op::PutRetained { topic, message: message.encode(), expires_at_ms: message.expires_at_ms });
            }
            self.metrics.retained_messages.inc_by(self.retained.len() as i64 - before);
        }
        let targets = if message.is_expired(now) { Vec::new() } else { self.match_targets(&message) };
        let plan = self.plan(targets);
        self.dispatch(Some((proxy, id)), message, ops, plan);
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

    /// Queues `ops` plus the durable copies of `plan`, then (in order, once durable) replies to
    /// the publisher and sends the live copies.
    fn dispatch(&mut self, publisher: Option<(ProxyId, Option<RequestId>)>, message: Arc<Message>, mut ops: Vec<Op>, plan: Plan) {
        let Plan { live, durable, not_queued } = plan;
        self.metrics.drop_copies("qos0_offline", not_queued);
        let enqueue_at = (!durable.is_empty()).then(|| {
            ops.push(Op::Enqueue { message: message.encode(), expires_at_ms: message.expires_at_ms, to: durable, origin: None });
            ops.len() - 1
        });
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let shard = self.name.clone();
        let fut = async move {
            let result = if ops.is_empty() { Ok(Vec::new()) } else { store.write(ops).await };
            let mut out: Outgoing = Vec::new();
            let seqs: Vec<Option<u64>> = match (&result, enqueue_at) {
                (Ok(results), Some(i)) => match results.get(i) {
                    Some(OpResult::Enqueued(seqs)) => seqs.clone(),
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            match result {
                Err(e) => {
                    metrics.store_errors.inc();
                    tracing::error!(shard = %shard, topic = %message.topic, error = %e, "message refused: durable write failed");
                    if let Some((proxy, Some(id))) = publisher {
                        let err = ShardError::Store { shard: shard.to_string(), detail: e.to_string() };
                        out.push((proxy, Event::Reply { id, result: Err(err) }));
                    }
                }
                Ok(_) => {
                    let full = seqs.iter().filter(|s| s.is_none()).count() as u64;
                    metrics.drop_copies("queue_full", full);
                    // A live copy for a persistent session is its queue entry: count it once.
                    let live_only = live.iter().filter(|l| l.durable_idx.is_none()).count() as u64;
                    metrics.deliveries.inc_by(seqs.len() as u64 - full + live_only);
                    let mut by_proxy: HashMap<ProxyId, Vec<Recipient>> = HashMap::new();
                    for mut l in live {
                        if let Some(i) = l.durable_idx {
                            match seqs.get(i).copied().flatten() {
                                Some(seq) => l.recipient.seq = Some(seq),
                                None => continue, // its queue is full: dropped, counted above
                            }
                        }
                        by_proxy.entry(l.proxy).or_default().push(l.recipient);
                    }
                    for (proxy, recipients) in by_proxy {
                        out.push((proxy, Event::Deliver(Deliver { message: message.clone(), recipients })));
                    }
                    // Deliveries first: when the publisher's proxy sees the reply, its own local
                    // recipients already have their copy.
                    if let Some((proxy, Some(id))) = publisher {
                        out.push((proxy, Event::Reply { id, result: Ok(Reply::Done) }));
                    }
                }
            }
            out
        };
        self.pending.push_back(fut.boxed());
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
        self.dispatch(None, message, Vec::new(), plan);
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

struct Live {
    proxy: ProxyId,
    /// Index of this session's durable copy in `Plan::durable`: its queue seq becomes the
    /// recipient's `seq`.
    durable_idx: Option<usize>,
    recipient: Recipient,
}

#[derive(Default)]
struct Plan {
    live: Vec<Live>,
    /// Copies for persistent sessions, online or not.
    durable: Vec<(String, Delivery)>,
    /// Copies for offline sessions that are not queued (QoS 0).
    not_queued: u64,
}

// === sessions table ===

struct SessionEntry {
    client_id: ByteString,
    persistent: bool,
    /// Where the session's connection is; `None` while it has none.
    route: Option<(ProxyId, ConnId)>,
    /// Its subscriptions on this shard, as written by the client.
    filters: Vec<ByteString>,
}

/// Sessions known to this shard, in slots so the trie stores a `u32` per subscriber.
///
/// # Invariants
/// `by_client[c] == s` iff `entries[s]` is `Some` with client id `c`; free slots are `None`.
#[derive(Default)]
struct Sessions {
    entries: Vec<Option<SessionEntry>>,
    free: Vec<u32>,
    by_client: HashMap<ByteString, SessionSlot>,
}

impl Sessions {
    fn find(&self, client_id: &str) -> Option<SessionSlot> {
        self.by_client.get(client_id).copied()
    }

    /// The entry of a live slot. Slots come from the trie or `by_client`, which only hold
    /// live slots (see the invariant), so this cannot fail.
    fn get(&self, slot: SessionSlot) -> &SessionEntry {
        self.entries[slot.0 as usize].as_ref().expect("slot in use")
    }

    fn get_mut(&mut self, slot: SessionSlot) -> &mut SessionEntry {
        self.entries[slot.0 as usize].as_mut().expect("slot in use")
    }

    fn upsert(&mut self, info: &SessionInfo, proxy: ProxyId) -> SessionSlot {
        let route = info.conn.map(|c| (proxy, c));
        if let Some(slot) = self.find(&info.client_id) {
            let e = self.get_mut(slot);
            e.persistent = info.persistent;
            e.route = route;
            return slot;
        }
        let entry = SessionEntry { client_id: info.client_id.clone(), persistent: info.persistent, route, filters: Vec::new() };
        let slot = match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = Some(entry);
                SessionSlot(i)
            }
            None => {
                self.entries.push(Some(entry));
                SessionSlot((self.entries.len() - 1) as u32)
            }
        };
        self.by_client.insert(info.client_id.clone(), slot);
        slot
    }

    fn remove(&mut self, slot: SessionSlot) -> SessionEntry {
        let entry = self.entries[slot.0 as usize].take().expect("slot in use");
        self.by_client.remove(&entry.client_id);
        self.free.push(slot.0);
        entry
    }

    fn routed_to(&self, proxy: ProxyId) -> impl Iterator<Item = SessionSlot> + '_ {
        self.entries.iter().enumerate().filter_map(move |(i, e)| match e {
            Some(e) if e.route.is_some_and(|(p, _)| p == proxy) => Some(SessionSlot(i as u32)),
            _ => None,
        })
    }
}
