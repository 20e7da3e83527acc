//! The durable work behind a routed message, and the order in which its results leave.
//!
//! # Two lanes
//! - **A (acceptance)**: what must be durable before the publisher is answered — the message
//!   in the shard's log, a retained message, a QoS 2 marker — then the copies for sessions that
//!   are not persistent, then the reply.
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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{ready, BoxFuture, FutureExt};
use futures::stream::{FuturesOrdered, StreamExt};
use session_store::{Delivery, Op, OpResult, Store};

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

/// Lane B work, in order.
enum Queued {
    Copies { position: Option<u64>, message: Arc<Message>, durable: Vec<(String, Delivery)>, live: Vec<Live> },
    Emit(Vec<(ProxyId, Event)>),
}

/// Enqueues per lane B batch: bounds one Redis round's size.
const MAX_BATCH: usize = 512;
/// How long lane A waits for the sessions' store to say whether to publish a will: long enough
/// to ride out a Redis failover or a Cluster node restart.
const STORE_PATIENCE: Duration = Duration::from_secs(5);
/// Longest pause between retries of a failing sessions' store.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(2);

pub(crate) struct Pipeline {
    shard: Arc<str>,
    sessions: Store,
    /// The shard's own store (log, retained, subscriptions) in clustered mode; `None` when
    /// `sessions` holds everything.
    local: Option<Store>,
    metrics: ShardMetrics,
    a: FuturesOrdered<BoxFuture<'static, (Outgoing, Option<Queued>)>>,
    b_ready: VecDeque<Queued>,
    b_inflight: Option<BoxFuture<'static, Outgoing>>,
}

impl Pipeline {
    pub fn new(shard: Arc<str>, sessions: Store, local: Option<Store>, metrics: ShardMetrics) -> Pipeline {
        Pipeline { shard, sessions, local, metrics, a: FuturesOrdered::new(), b_ready: VecDeque::new(), b_inflight: None }
    }

    /// The shard's own store, in clustered mode.
    pub fn local(&self) -> Option<Store> {
        self.local.clone()
    }

    pub fn is_clustered(&self) -> bool {
        self.local.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.a.is_empty() && self.b_ready.is_empty() && self.b_inflight.is_none()
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
        let Pipeline { a, b_ready, b_inflight, .. } = self;
        tokio::select! {
            biased;
            Some((out, then)) = a.next(), if !a.is_empty() => {
                b_ready.extend(then);
                Some(out)
            }
            out = async { b_inflight.as_mut().expect("checked").await }, if b_inflight.is_some() => {
                *b_inflight = None;
                Some(out)
            }
            else => None,
        }
    }

    /// Events that depend on nothing durable, in lane A order.
    pub fn emit(&mut self, events: Vec<(ProxyId, Event)>) {
        self.a.push_back(ready((Outgoing::events(events), None)).boxed());
    }

    /// Events that must follow every earlier queueing (lane B order). In single-node mode
    /// lane A is the only lane.
    pub fn emit_after_queueing(&mut self, events: Vec<(ProxyId, Event)>) {
        if self.is_clustered() {
            self.a.push_back(ready((Outgoing::default(), Some(Queued::Emit(events)))).boxed());
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
                self.a.push_back(
                    async move {
                        if let Err(e) = local.write(ops).await {
                            tracing::error!(shard = %shard, error = %e, "could not persist subscriptions");
                        }
                        (Outgoing::events(events), None)
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
        self.a.push_back(
            async move {
                let result = local
                    .write(ops)
                    .await
                    .map(|_| Reply::Done)
                    .map_err(|e| ShardError::Store { shard: shard.to_string(), detail: e.to_string() });
                (Outgoing::events(vec![(to.0, Event::Reply { id: to.1, result })]), None)
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
        self.a.push_back(
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
                (out, None)
            }
            .boxed(),
        );
    }

    fn dispatch_clustered(&mut self, r: Routed, local: Store) {
        let Routed { publisher, message, mut live, mut durable, retained_ops, marker, position, log_entry } = r;
        let replayed = position.is_some() && log_entry.is_none();
        let mut local_ops = retained_ops;
        if let (Some(p), Some(entry)) = (position, log_entry) {
            local_ops.push(Op::AppendLog { position: p, entry });
        }
        let (sessions, metrics, shard) = (self.sessions.clone(), self.metrics.clone(), self.shard.clone());
        self.a.push_back(
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
                        // Written once: retrying here (up to 5 s) kept more first copies waiting
                        // while their clients reconnected and resent them, and the soak then
                        // found QoS 2 order broken on standalone Redis too (RELIABILITY.md,
                        // finding 19).
                        let marker_write = async {
                            match marker {
                                Some(op) => sessions.write(vec![op]).await,
                                None => Ok(Vec::new()),
                            }
                        };
                        let (l, m) = tokio::join!(local_write, marker_write);
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
                                return (Outgoing { events, queued: Vec::new(), dropped: position.into_iter().collect() }, None);
                            }
                            r => r.map(|_| ()),
                        }
                    }
                };
                if let Err(e) = written {
                    return (refused(&metrics, &shard, &message, publisher, position, &e), None);
                }
                let (persistent_live, clean_live): (Vec<Live>, Vec<Live>) = live.into_iter().partition(|l| l.durable_idx.is_some());
                let log = position.map(|position| LogRef { position, queued: false });
                let mut events = deliveries(&metrics, &message, clean_live, &[], log, !replayed);
                answer(&mut events, publisher, position);
                let then = Queued::Copies { position, message, durable, live: persistent_live };
                (Outgoing::events(events), Some(then))
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
        let (sessions, metrics, shard) = (self.sessions.clone(), self.metrics.clone(), self.shard.clone());
        self.b_inflight = Some(
            async move {
                let mut ops = Vec::with_capacity(enqueues);
                for w in &batch {
                    if let Queued::Copies { position, message, durable, .. } = w {
                        if !durable.is_empty() {
                            let origin = position.map(|p| (shard.to_string(), p));
                            ops.push(Op::Enqueue {
                                message: message.encode(),
                                expires_at_ms: message.expires_at_ms,
                                to: durable.clone(),
                                origin,
                            });
                        }
                    }
                }
                let mut results = if ops.is_empty() { Vec::new() } else { write_until_done(&sessions, ops, &shard).await }.into_iter();
                let mut out = Outgoing::default();
                for w in batch {
                    match w {
                        Queued::Emit(events) => out.events.extend(events),
                        Queued::Copies { position, message, durable, live } => {
                            let seqs = if durable.is_empty() {
                                Vec::new()
                            } else {
                                enqueued(&results.next().into_iter().collect::<Vec<_>>(), Some(0))
                            };
                            let log = position.map(|position| LogRef { position, queued: true });
                            out.events.extend(deliveries(&metrics, &message, live, &seqs, log, true));
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
async fn write_until_done(sessions: &Store, ops: Vec<Op>, shard: &str) -> Vec<OpResult> {
    let mut wait = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        match sessions.write(ops.clone()).await {
            Ok(r) => {
                if failures > 0 {
                    tracing::info!(shard, failures, "sessions' store is back; queueing resumed");
                }
                return r;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(shard, error = %e, failures, "queueing for persistent sessions failed; retrying");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_RETRY_WAIT);
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

fn enqueued(results: &[OpResult], at: Option<usize>) -> Vec<Option<u64>> {
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
    seqs: &[Option<u64>],
    log: Option<LogRef>,
    count: bool,
) -> Vec<(ProxyId, Event)> {
    if count {
        let full = seqs.iter().filter(|s| s.is_none()).count() as u64;
        metrics.drop_copies("queue_full", full);
        // A live copy for a persistent session is its queue entry: count it once.
        let live_only = live.iter().filter(|l| l.durable_idx.is_none()).count() as u64;
        metrics.deliveries.inc_by(seqs.len() as u64 - full + live_only);
    }
    let mut by_proxy: HashMap<ProxyId, Vec<Recipient>> = HashMap::new();
    for mut l in live {
        if let Some(i) = l.durable_idx {
            match seqs.get(i).copied().flatten() {
                Some(seq) => l.recipient.seq = Some(seq),
                None => continue, // its queue is full (dropped, counted above) or it was delivered
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
    let events = match publisher {
        Some((proxy, Some(id))) => {
            vec![(proxy, Event::Reply { id, result: Err(ShardError::Store { shard: shard.to_string(), detail: e.to_string() }) })]
        }
        _ => Vec::new(),
    };
    Outgoing { events, queued: Vec::new(), dropped: position.into_iter().collect() }
}
