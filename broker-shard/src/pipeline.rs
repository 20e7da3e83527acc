//! The durable work behind a routed message, and the order in which its results leave.
//!
//! # Two lanes
//! - **A (acceptance)**: what must be durable before the publisher is answered — the message
//!   in the shard's log with a retained message, then (once that is durable) a QoS 2 marker —
//!   then the copies for sessions that are not persistent, then the reply.
//! - **B (queueing)**: copies for persistent sessions written to the sessions' store (Redis in
//!   clustered mode), then their live delivery carrying their queue positions.
//!
//! Lane A runs its writes concurrently and emits in request order. Lane B starts a message
//! only after its lane A succeeded, and runs strictly in order, in batches: one batch of
//! enqueues is in flight at a time, carrying everything that became ready meanwhile (group
//! commit against Redis), so each session's queue receives one shard's messages in order. A
//! persistent session's copies all travel lane B, a clean session's all lane A, so each
//! subscriber still sees one publisher's topic in order, while a slow sessions' store never
//! delays acknowledgements or clean deliveries. Replies that promise "everything before this is
//! queued" (Attach, Flush) travel lane B.
//!
//! In single-node mode there is one store for everything: lane A does all of it in one commit
//! and lane B is unused.
//!
//! # A refusal and what was in flight behind it (clustered)
//! Lane A's writes for a publisher's messages run concurrently, so a later message can succeed
//! where an earlier one failed (a QoS 2 marker that timed out while a Redis node restarted, and
//! the next QoS 2 message's, written once the node was back). The publisher sends the refused
//! one again (a 3.1.1 client is disconnected; any client whose connection ended before the
//! refusal reached it), after the later one was delivered: its order broken. So lane A decides
//! in order, as each message leaves ([`Pipeline::settle`]): once a message is refused, the
//! messages of its flow — same publisher, topic and QoS, the unit of order (MQTT-4.6.0-6) —
//! dispatched before that moment (in flight with it, sent before the publisher could know) are
//! refused too, whatever their writes did. A refused acceptance's QoS 2 mark may
//! have been written all the same; it is given back ([`Op::UnmarkInbound`], retried until Redis
//! takes it, the refused log entry kept until then: [`Outgoing::held`]), and until then a
//! resend of that packet id takes the mark over (`replacing`) or, if it was dispatched before
//! the refusal, is refused as well: a mark left by a refused copy must
//! never make the resend look like a duplicate of an accepted message (a loss).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{ready, BoxFuture, FutureExt};
use futures::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use mqfleet_codec::ByteString;
use parking_lot::Mutex;
use session_store::{Delivery, Op, OpResult, Queued as Placed, Store};

use crate::link::{Deliver, Event, LogRef, ProxyId, Recipient, Reply, RequestId, ShardError};
use crate::message::Message;
use crate::metrics::ShardMetrics;

/// What leaves the pipeline at one step, in order.
#[derive(Default)]
pub(crate) struct Outgoing {
    pub events: Vec<(ProxyId, Event)>,
    /// Log positions whose lane B is complete (queued for every persistent session).
    pub queued: Vec<u64>,
    /// Log positions to delete at once, never to be delivered: lane A refused them (their entry
    /// may be in the log all the same), or they were resends of a message already accepted.
    pub dropped: Vec<u64>,
    /// Log positions lane A refused whose entry must stay until the QoS 2 mark it may hold is
    /// given back (they come later as `dropped`): deleted first, a crash in between would leave
    /// a mark naming no entry, and the publisher's resend would be taken for a duplicate (a
    /// loss). Their publish requests are forgotten now, so that a resend is decided afresh.
    pub held: Vec<u64>,
}

impl Outgoing {
    pub fn events(events: Vec<(ProxyId, Event)>) -> Outgoing {
        Outgoing { events, ..Outgoing::default() }
    }
}

/// A live copy of a routed message.
pub(crate) struct Live {
    pub proxy: ProxyId,
    /// Index of this session's durable copy in [`Routed::durable`]: its queue position becomes
    /// the recipient's `seq`.
    pub durable_idx: Option<usize>,
    pub recipient: Recipient,
}

/// A message with its recipients, ready for durable work.
pub(crate) struct Routed {
    /// The publisher's proxy and request, answered after lane A.
    pub publisher: Option<(ProxyId, Option<RequestId>)>,
    pub message: Arc<Message>,
    pub live: Vec<Live>,
    /// Copies for persistent sessions, online or not.
    pub durable: Vec<(String, Delivery)>,
    /// Retained-message operations.
    pub retained_ops: Vec<Op>,
    /// A QoS 2 marker to commit with the message.
    pub marker: Option<Op>,
    /// The message's log position (clustered mode, QoS 1/2).
    pub position: Option<u64>,
    /// The encoded log entry to append; `None` when the entry is already in the log (replay).
    pub log_entry: Option<bytes::Bytes>,
}

/// What one lane A item produced, in order.
struct Step {
    out: Outgoing,
    then: Option<Queued>,
    decision: Option<Decision>,
}

impl Step {
    fn new(out: Outgoing, then: Option<Queued>) -> Step {
        Step { out, then, decision: None }
    }
}

/// How lane A's writes went for a publisher's QoS 1/2 message (clustered): the input of the
/// in-order decision taken as it leaves ([`Pipeline::settle`]).
struct Decision {
    /// The ordered flow it belongs to: its publisher, topic and QoS (MQTT-4.6.0-6); `None` for
    /// messages of the system itself.
    flow: Option<Flow>,
    reply_to: Option<(ProxyId, RequestId)>,
    position: Option<u64>,
    mark: Option<Mark>,
    outcome: Outcome,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    /// The packet id was marked by another acceptance: answered, not routed.
    Resend,
    Refused,
}

/// The QoS 2 mark an acceptance wrote or tried to.
struct Mark {
    client_id: String,
    pkid: u16,
    by: String,
    /// It may hold the mark now: written, or the write's outcome is unknown (an error).
    maybe_ours: bool,
}

/// A publisher's messages on one topic at one QoS: what must stay in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Flow {
    publisher: ByteString,
    topic: ByteString,
    qos: u8,
}

impl Flow {
    fn of(message: &Message) -> Option<Flow> {
        message.origin.clone().map(|publisher| Flow { publisher, topic: message.topic.clone(), qos: message.qos as u8 })
    }
}

/// Refused acceptances' marks being given back, by (client id, packet id).
type GivingBack = Arc<Mutex<HashMap<(String, u16), Vec<String>>>>;

/// Lane B work, in order.
enum Queued {
    /// `replayed`: from the log at start-up (its copies were counted the first time).
    Copies {
        position: Option<u64>,
        message: Arc<Message>,
        durable: Vec<(String, Delivery)>,
        live: Vec<Live>,
        replayed: bool,
    },
    Emit(Vec<(ProxyId, Event)>),
}

/// Enqueues per lane B batch: bounds one Redis round's size.
const MAX_BATCH: usize = 512;
/// How long lane A waits for the sessions' store to say whether to publish a will: long enough
/// to ride out a Redis failover or a Cluster node restart.
const STORE_PATIENCE: Duration = Duration::from_secs(5);

pub(crate) struct Pipeline {
    shard: Arc<str>,
    /// Names this shard's log positions in the sessions' store ([`crate::ShardConfig::log_name`]).
    log_name: Arc<str>,
    sessions: Store,
    /// The shard's own store (log, retained, subscriptions) in clustered mode; `None` when
    /// `sessions` holds everything.
    local: Option<Store>,
    metrics: ShardMetrics,
    a: FuturesOrdered<BoxFuture<'static, Step>>,
    b_ready: VecDeque<Queued>,
    b_inflight: Option<BoxFuture<'static, Outgoing>>,
    /// Lane A items pushed so far, and emitted so far: the n-th emitted is the n-th pushed.
    dispatched: u64,
    emitted: u64,
    /// Flows one of whose messages was refused, with `dispatched` at that moment: their
    /// messages emitted before that count were in flight with it and are refused too.
    poisoned: HashMap<Flow, u64>,
    giving_back: GivingBack,
    /// Give-backs under way, each yielding the refused entry's position once done. Polled with
    /// the lanes (not spawned) so that the entry is deleted only after its mark is gone; not
    /// waited for at shutdown: the entry then stays, and a restart delivers it under its mark.
    give_backs: FuturesUnordered<BoxFuture<'static, Option<u64>>>,
}

impl Pipeline {
    pub fn new(shard: Arc<str>, log_name: Arc<str>, sessions: Store, local: Option<Store>, metrics: ShardMetrics) -> Pipeline {
        Pipeline {
            shard,
            log_name,
            sessions,
            local,
            metrics,
            a: FuturesOrdered::new(),
            b_ready: VecDeque::new(),
            b_inflight: None,
            dispatched: 0,
            emitted: 0,
            poisoned: HashMap::new(),
            giving_back: GivingBack::default(),
            give_backs: FuturesUnordered::new(),
        }
    }

    fn push(&mut self, step: BoxFuture<'static, Step>) {
        self.dispatched += 1;
        self.a.push_back(step);
    }

    /// What names this shard's log positions in the sessions' store.
    pub fn log_name(&self) -> &Arc<str> {
        &self.log_name
    }

    /// The shard's own store, in clustered mode.
    pub fn local(&self) -> Option<Store> {
        self.local.clone()
    }

    pub fn is_clustered(&self) -> bool {
        self.local.is_some()
    }

    /// Both lanes are done (give-backs may still be under way: see [`Pipeline::is_idle`]).
    pub fn is_empty(&self) -> bool {
        self.a.is_empty() && self.b_ready.is_empty() && self.b_inflight.is_none()
    }

    /// Nothing at all under way, give-backs included.
    pub fn is_idle(&self) -> bool {
        self.is_empty() && self.give_backs.is_empty()
    }

    /// Lane B work waiting or in flight (backpressure: the router stops reading when the
    /// sessions' store falls far behind).
    pub fn backlog(&self) -> usize {
        self.b_ready.len() + self.a.len()
    }

    /// The next step's output, from either lane. Cancel-safe: all state lives in `self`.
    pub async fn next(&mut self) -> Option<Outgoing> {
        if self.b_inflight.is_none() && !self.b_ready.is_empty() {
            self.start_batch();
        }
        let Pipeline { a, b_inflight, give_backs, .. } = self;
        let step = tokio::select! {
            biased;
            Some(step) = a.next(), if !a.is_empty() => step,
            out = async { b_inflight.as_mut().expect("checked").await }, if b_inflight.is_some() => {
                *b_inflight = None;
                return Some(out);
            }
            Some(position) = give_backs.next(), if !give_backs.is_empty() => {
                return Some(Outgoing { dropped: position.into_iter().collect(), ..Outgoing::default() });
            }
            else => return None,
        };
        let (out, then) = self.settle(step);
        self.b_ready.extend(then);
        Some(out)
    }

    /// Decides, in lane A order, what a publisher's message that lane A has finished becomes
    /// (see the module's "A refusal and what was in flight behind it").
    fn settle(&mut self, step: Step) -> (Outgoing, Option<Queued>) {
        let seq = self.emitted;
        self.emitted += 1;
        let Step { out, then, decision } = step;
        let settled = match decision {
            None => (out, then),
            Some(d) => {
                let behind_refusal = d.flow.as_ref().and_then(|f| self.poisoned.get(f)).is_some_and(|&until| seq < until);
                let mark_given_back = d.outcome == Outcome::Resend && d.mark.as_ref().is_some_and(|m| self.is_given_back(m));
                let detail = match (d.outcome, behind_refusal, mark_given_back) {
                    (Outcome::Refused, ..) => None,
                    (_, true, _) => Some("an earlier message of this publisher, in flight with this one, was refused: refused too, to keep the publisher's order"),
                    (_, _, true) => Some("this packet id is marked by a refused copy of the message, being given back: send it again"),
                    _ => None,
                };
                match (d.outcome, detail) {
                    (Outcome::Refused, _) => (self.refused(d, out), None),
                    (_, Some(detail)) => {
                        self.metrics.refused_in_order.inc();
                        tracing::debug!(shard = %self.shard, flow = ?d.flow, position = ?d.position, detail, "message refused");
                        let out = refusal(&self.shard, d.reply_to, d.position, detail.to_string());
                        (self.refused(d, out), None)
                    }
                    (_, None) => (out, then),
                }
            }
        };
        if !self.poisoned.is_empty() {
            self.poisoned.retain(|_, until| *until > seq + 1);
        }
        settled
    }

    /// A refused message, leaving as `out`: what its publisher has in flight behind it is
    /// refused too, and a mark it may hold is given back before its log entry goes.
    fn refused(&mut self, d: Decision, mut out: Outgoing) -> Outgoing {
        if let Some(f) = d.flow {
            self.poisoned.insert(f, self.dispatched);
        }
        if let Some(m) = d.mark.filter(|m| m.maybe_ours) {
            if let Some(p) = d.position {
                out.dropped.retain(|&q| q != p);
                out.held.push(p);
            }
            self.give_back(m, d.position);
        }
        out
    }

    fn is_given_back(&self, m: &Mark) -> bool {
        self.giving_back.lock().get(&(m.client_id.clone(), m.pkid)).is_some_and(|by| !by.is_empty())
    }

    /// Unmarks `m`'s packet id if its acceptance holds it, retried until the sessions' store
    /// takes it, then lets the refused entry at `position` go; meanwhile resends of that id
    /// take the mark over (see `dispatch_clustered`).
    fn give_back(&mut self, m: Mark, position: Option<u64>) {
        let key = (m.client_id.clone(), m.pkid);
        self.giving_back.lock().entry(key.clone()).or_default().push(m.by.clone());
        let (sessions, table, shard) = (self.sessions.clone(), self.giving_back.clone(), self.shard.clone());
        self.give_backs.push(
            async move {
                let op = Op::UnmarkInbound { client_id: m.client_id, pkid: m.pkid, by: m.by.clone() };
                write_until_done(&sessions, vec![op], &shard, "giving back a refused QoS 2 mark", false).await;
                let mut table = table.lock();
                if let Some(by) = table.get_mut(&key) {
                    by.retain(|b| *b != m.by);
                    if by.is_empty() {
                        table.remove(&key);
                    }
                }
                position
            }
            .boxed(),
        );
    }

    /// Events that depend on nothing durable, in lane A order.
    pub fn emit(&mut self, events: Vec<(ProxyId, Event)>) {
        self.push(ready(Step::new(Outgoing::events(events), None)).boxed());
    }

    /// Answers a publish request sent again (its first answer was lost) whose first copy is in
    /// the log: `Done`, in lane A order — unless its first copy, or one before it in its flow,
    /// turns out refused (see `settle`): then it is refused as well, since the publisher must not
    /// take a refused message for accepted.
    pub fn answer_again(&mut self, proxy: ProxyId, id: RequestId, message: &Message) {
        let out = Outgoing::events(vec![(proxy, Event::Reply { id, result: Ok(Reply::Done) })]);
        let decision =
            Decision { flow: Flow::of(message), reply_to: Some((proxy, id)), position: None, mark: None, outcome: Outcome::Accepted };
        self.push(ready(Step { out, then: None, decision: Some(decision) }).boxed());
    }

    /// Events that must follow every earlier queueing (lane B order). In single-node mode
    /// lane A is the only lane.
    pub fn emit_after_queueing(&mut self, events: Vec<(ProxyId, Event)>) {
        if self.is_clustered() {
            self.push(ready(Step::new(Outgoing::default(), Some(Queued::Emit(events)))).boxed());
        } else {
            self.emit(events);
        }
    }

    /// Writes shard-local state (subscriptions), then emits `events` in lane A order. Without a
    /// local store there is nothing to write.
    pub fn write_local_then_emit(&mut self, ops: Vec<Op>, events: Vec<(ProxyId, Event)>) {
        match (&self.local, ops.is_empty()) {
            (Some(local), false) => {
                let local = local.clone();
                let shard = self.shard.clone();
                self.push(
                    async move {
                        if let Err(e) = local.write(ops).await {
                            tracing::error!(shard = %shard, error = %e, "could not persist subscriptions");
                        }
                        Step::new(Outgoing::events(events), None)
                    }
                    .boxed(),
                );
            }
            _ => self.emit(events),
        }
    }

    /// Writes shard-local state, then replies to `to` with `Done` or the error.
    pub fn write_local_then_reply(&mut self, ops: Vec<Op>, to: (ProxyId, RequestId)) {
        let (Some(local), false) = (self.local.clone(), ops.is_empty()) else {
            self.emit(vec![(to.0, Event::Reply { id: to.1, result: Ok(Reply::Done) })]);
            return;
        };
        let shard = self.shard.clone();
        self.push(
            async move {
                let result = local
                    .write(ops)
                    .await
                    .map(|_| Reply::Done)
                    .map_err(|e| ShardError::Store { shard: shard.to_string(), detail: e.to_string() });
                Step::new(Outgoing::events(vec![(to.0, Event::Reply { id: to.1, result })]), None)
            }
            .boxed(),
        );
    }

    pub fn dispatch(&mut self, r: Routed) {
        match self.local.clone() {
            None => self.dispatch_single(r),
            Some(local) => self.dispatch_clustered(r, local),
        }
    }

    /// One store: everything in one commit, then everything leaves.
    fn dispatch_single(&mut self, r: Routed) {
        let Routed { publisher, message, live, durable, mut retained_ops, marker, .. } = r;
        let mut ops = std::mem::take(&mut retained_ops);
        ops.extend(marker);
        let enqueue_at = (!durable.is_empty()).then(|| {
            ops.push(Op::Enqueue { message: message.encode(), expires_at_ms: message.expires_at_ms, to: durable, origin: None });
            ops.len() - 1
        });
        let (store, metrics, shard) = (self.sessions.clone(), self.metrics.clone(), self.shard.clone());
        self.push(
            async move {
                let result = if ops.is_empty() { Ok(Vec::new()) } else { store.write(ops).await };
                let out = match result {
                    Err(e) => refused(&metrics, &shard, &message, publisher, None, &e),
                    Ok(results) => {
                        let seqs = enqueued(&results, enqueue_at);
                        let mut events = deliveries(&metrics, &message, live, &seqs, None, true);
                        answer(&mut events, publisher, None);
                        Outgoing::events(events)
                    }
                };
                Step::new(out, None)
            }
            .boxed(),
        );
    }

    fn dispatch_clustered(&mut self, r: Routed, local: Store) {
        let Routed { publisher, message, mut live, mut durable, retained_ops, mut marker, position, log_entry } = r;
        let replayed = position.is_some() && log_entry.is_none();
        let mut local_ops = retained_ops;
        if let (Some(p), Some(entry)) = (position, log_entry) {
            local_ops.push(Op::AppendLog { position: p, entry });
        }
        let mut mark = None;
        if let Some(Op::MarkInbound { client_id, pkid, by, replacing }) = &mut marker {
            // A refused copy's mark, still being given back, is this copy's to take over.
            *replacing = self.giving_back.lock().get(&(client_id.clone(), *pkid)).cloned().unwrap_or_default();
            mark = Some(Mark { client_id: client_id.clone(), pkid: *pkid, by: by.clone(), maybe_ours: true });
        }
        // Decided in order as it leaves (a will is not: its connection is gone).
        let reply_to = match publisher {
            Some((proxy, Some(id))) if !matches!(marker, Some(Op::AcceptWill { .. })) => Some((proxy, id)),
            _ => None,
        };
        let flow = Flow::of(&message);
        let decide = move |outcome: Outcome, mark: Option<Mark>| {
            reply_to.map(|reply_to| Decision { flow, reply_to: Some(reply_to), position, mark, outcome })
        };
        let (sessions, metrics, shard) = (self.sessions.clone(), self.metrics.clone(), self.shard.clone());
        self.push(
            async move {
                let local_write = async {
                    if local_ops.is_empty() {
                        Ok(Vec::new())
                    } else {
                        local.write(local_ops).await
                    }
                };
                let written = match marker {
                    // A will is in the log before the cluster is asked whether to publish it: a
                    // crash in between replays it and asks again (the same acceptance), so it is
                    // neither lost nor published twice.
                    Some(ask @ Op::AcceptWill { .. }) => match local_write.await {
                        Ok(_) => match accept_will(&sessions, ask, &shard).await {
                            Ok(true) => Ok(()),
                            Ok(false) => {
                                metrics.wills_withheld.inc();
                                tracing::info!(shard = %shard, topic = %message.topic, "will not published: the cluster says it went out already or is another proxy's");
                                live.clear();
                                durable.clear();
                                Ok(())
                            }
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    },
                    marker => {
                        // The mark names this acceptance's log entry, so it is written only once
                        // the entry is durable. Written beside the append, a mark could outlive
                        // an entry a crash lost: the client's resend of the message, finding its
                        // packet id marked, was taken for a duplicate of an accepted message and
                        // dropped (RELIABILITY.md, finding 24). Written once: retrying here (up
                        // to 5 s) kept more first copies waiting while their clients reconnected
                        // and resent them (finding 19); a refusal is settled in order instead
                        // (`settle`).
                        let l = local_write.await;
                        let m = match (&l, marker) {
                            (Ok(_), Some(op)) => sessions.write(vec![op]).await,
                            _ => Ok(Vec::new()),
                        };
                        if let Some(mark) = &mut mark {
                            mark.maybe_ours = l.is_ok() && !matches!(m.as_deref(), Ok([OpResult::Marked(false), ..]));
                        }
                        match l.and(m) {
                            // The packet id was marked already: a copy of this message was
                            // accepted (its client resent it over a new connection before the
                            // first copy's marker was written, so that connection could not
                            // tell). Answered, not routed: exactly once. (A retried write of
                            // this same mark finds it its own: the mark names its acceptance.)
                            Ok(r) if matches!(r.first(), Some(OpResult::Marked(false))) => {
                                metrics.qos2_resends.inc();
                                let mut events = Vec::new();
                                answer(&mut events, publisher, None);
                                let out = Outgoing { events, dropped: position.into_iter().collect(), ..Outgoing::default() };
                                return Step { out, then: None, decision: decide(Outcome::Resend, mark) };
                            }
                            r => r.map(|_| ()),
                        }
                    }
                };
                if let Err(e) = written {
                    let out = refused(&metrics, &shard, &message, publisher, position, &e);
                    return Step { out, then: None, decision: decide(Outcome::Refused, mark) };
                }
                let (persistent_live, clean_live): (Vec<Live>, Vec<Live>) = live.into_iter().partition(|l| l.durable_idx.is_some());
                let log = position.map(|position| LogRef { position, queued: false });
                let mut events = deliveries(&metrics, &message, clean_live, &[], log, !replayed);
                answer(&mut events, publisher, position);
                let decision = decide(Outcome::Accepted, mark);
                let then = Queued::Copies { position, message, durable, live: persistent_live, replayed };
                Step { out: Outgoing::events(events), then: Some(then), decision }
            }
            .boxed(),
        );
    }

    /// Starts one lane B batch with everything ready, in order.
    fn start_batch(&mut self) {
        let mut batch = Vec::new();
        let mut enqueues = 0;
        while let Some(w) = self.b_ready.front() {
            if matches!(w, Queued::Copies { durable, .. } if !durable.is_empty()) {
                if enqueues == MAX_BATCH {
                    break;
                }
                enqueues += 1;
            }
            batch.extend(self.b_ready.pop_front());
        }
        let (sessions, metrics, shard, log_name) = (self.sessions.clone(), self.metrics.clone(), self.shard.clone(), self.log_name.clone());
        self.b_inflight = Some(
            async move {
                let mut ops = Vec::with_capacity(enqueues);
                for w in &batch {
                    if let Queued::Copies { position, message, durable, .. } = w {
                        if !durable.is_empty() {
                            let origin = position.map(|p| (log_name.to_string(), p));
                            ops.push(Op::Enqueue {
                                message: message.encode(),
                                expires_at_ms: message.expires_at_ms,
                                to: durable.clone(),
                                origin,
                            });
                        }
                    }
                }
                let mut results = if ops.is_empty() {
                    Vec::new()
                } else {
                    write_until_done(&sessions, ops, &shard, "queueing for persistent sessions", true).await
                }
                .into_iter();
                let mut out = Outgoing::default();
                for w in batch {
                    match w {
                        Queued::Emit(events) => out.events.extend(events),
                        Queued::Copies { position, message, durable, live, replayed } => {
                            let seqs = if durable.is_empty() {
                                Vec::new()
                            } else {
                                enqueued(&results.next().into_iter().collect::<Vec<_>>(), Some(0))
                            };
                            if !replayed && seqs.contains(&Placed::Delivered) {
                                // Positions never repeat within one log: a first copy taken for
                                // a replay means the sessions' store knows this position from
                                // another log under this log's name.
                                tracing::error!(shard = %shard, log = %log_name, position = ?position, topic = %message.topic, "a new message's copies were taken for a replay of copies delivered before: not queued");
                            }
                            let log = position.map(|position| LogRef { position, queued: true });
                            out.events.extend(deliveries(&metrics, &message, live, &seqs, log, !replayed));
                            out.queued.extend(position);
                        }
                    }
                }
                out
            }
            .boxed(),
        );
    }
}

/// Writes idempotent enqueues until the sessions' store takes them: the messages were
/// acknowledged, so giving up would lose them (they would only come back from the log at the
/// next restart). Meanwhile lane B waits, and the router stops reading once its backlog is
/// full, so the publishers slow down instead of memory growing.
///
/// `loud`: failures are logged as warnings (the give-back of a mark, one per refused message,
/// logs them at debug: the refusal said it already).
async fn write_until_done(sessions: &Store, ops: Vec<Op>, shard: &str, what: &'static str, loud: bool) -> Vec<OpResult> {
    let mut backoff = mqfleet_ops::outage::Backoff::forever();
    let mut failures = 0u32;
    loop {
        match sessions.write(ops.clone()).await {
            Ok(r) => {
                if failures > 0 && loud {
                    tracing::info!(shard, failures, what, "sessions' store is back");
                }
                return r;
            }
            Err(e) => {
                failures += 1;
                if loud && (failures == 1 || failures.is_power_of_two()) {
                    tracing::warn!(shard, error = %e, failures, what, "a write to the sessions' store failed; retrying");
                } else {
                    tracing::debug!(shard, error = %e, failures, what, "a write to the sessions' store failed; retrying");
                }
                backoff.pause().await;
            }
        }
    }
}

/// Asks the sessions' store whether to publish a logged will (patiently: see
/// [`write_patiently`]). Past that the publisher is refused and sends it again; the entry stays
/// in the log and is asked about again at the next start.
async fn accept_will(sessions: &Store, ask: Op, shard: &str) -> Result<bool, session_store::Error> {
    let r = write_patiently(sessions, ask, shard).await?;
    Ok(matches!(r.first(), Some(OpResult::WillAccepted(true))))
}

/// Writes one idempotent op of lane A (a will's acceptance), again while the sessions' store
/// does not answer, for up to [`STORE_PATIENCE`]: the same write twice is harmless (it names
/// its acceptance), and lane A waits meanwhile.
async fn write_patiently(sessions: &Store, op: Op, shard: &str) -> Result<Vec<OpResult>, session_store::Error> {
    let mut backoff = mqfleet_ops::outage::Backoff::within(STORE_PATIENCE);
    loop {
        match sessions.write(vec![op.clone()]).await {
            Ok(r) => return Ok(r),
            Err(e) => {
                tracing::warn!(shard, error = %e, "the sessions' store did not take a write the publisher waits for; retrying");
                if !backoff.pause().await {
                    return Err(e);
                }
            }
        }
    }
}

fn enqueued(results: &[OpResult], at: Option<usize>) -> Vec<Placed> {
    match at.and_then(|i| results.get(i)) {
        Some(OpResult::Enqueued(seqs)) => seqs.clone(),
        _ => Vec::new(),
    }
}

/// One `Deliver` per proxy for `live`, taking queue positions from `seqs`; counts deliveries and
/// drops (not for replays: they were counted the first time).
fn deliveries(
    metrics: &ShardMetrics,
    message: &Arc<Message>,
    live: Vec<Live>,
    seqs: &[Placed],
    log: Option<LogRef>,
    count: bool,
) -> Vec<(ProxyId, Event)> {
    if count {
        let mut unqueued = 0;
        for reason in seqs.iter().filter_map(|c| c.drop_reason()) {
            metrics.drop_copies(reason, 1);
            unqueued += 1;
        }
        // A live copy for a persistent session is its queue entry: count it once.
        let live_only = live.iter().filter(|l| l.durable_idx.is_none()).count() as u64;
        metrics.deliveries.inc_by(seqs.len() as u64 - unqueued + live_only);
    }
    let mut by_proxy: HashMap<ProxyId, Vec<Recipient>> = HashMap::new();
    for mut l in live {
        if let Some(i) = l.durable_idx {
            match seqs.get(i).and_then(|c| c.seq()) {
                Some(seq) => l.recipient.seq = Some(seq),
                None => continue, // not queued (counted above), or a replay's copy delivered before
            }
        }
        by_proxy.entry(l.proxy).or_default().push(l.recipient);
    }
    let mut out: Vec<(ProxyId, Event)> = by_proxy
        .into_iter()
        .map(|(proxy, recipients)| (proxy, Event::Deliver(Deliver { message: message.clone(), recipients, log })))
        .collect();
    out.sort_by_key(|(p, _)| *p);
    out
}

/// Deliveries first, then the reply: when the publisher's proxy sees the reply, its own local
/// recipients already have their copy.
fn answer(events: &mut Vec<(ProxyId, Event)>, publisher: Option<(ProxyId, Option<RequestId>)>, position: Option<u64>) {
    if let Some((proxy, Some(id))) = publisher {
        let reply = match position {
            Some(position) => Reply::Accepted { position },
            None => Reply::Done,
        };
        events.push((proxy, Event::Reply { id, result: Ok(reply) }));
    }
}

fn refused(
    metrics: &ShardMetrics,
    shard: &str,
    message: &Message,
    publisher: Option<(ProxyId, Option<RequestId>)>,
    position: Option<u64>,
    e: &session_store::Error,
) -> Outgoing {
    metrics.store_errors.inc();
    tracing::error!(shard, topic = %message.topic, error = %e, "message refused: durable write failed");
    let reply_to = publisher.and_then(|(proxy, id)| id.map(|id| (proxy, id)));
    refusal(shard, reply_to, position, e.to_string())
}

/// The refusal of a message: its publisher told (if it waits for an answer), its log entry
/// deleted.
fn refusal(shard: &str, reply_to: Option<(ProxyId, RequestId)>, position: Option<u64>, detail: String) -> Outgoing {
    let events = reply_to
        .map(|(proxy, id)| (proxy, Event::Reply { id, result: Err(ShardError::Store { shard: shard.to_string(), detail }) }))
        .into_iter()
        .collect();
    Outgoing { events, dropped: position.into_iter().collect(), ..Outgoing::default() }
}
