//! The single writer of the embedded store.
//!
//! One thread owns every write transaction. It takes the first waiting request, then everything
//! else already queued (up to [`MAX_BATCH_OPS`]), applies it all in one transaction and commits
//! once: under load, one fsync acknowledges many publishers (group commit); when idle, a lone
//! request is committed at once.
//!
//! # Invariants
//! - `State::queue_len[c]` equals the number of `queue` rows of client `c` after every commit.
//! - A body's `refs` equals the number of `queue` rows referencing it; a body with 0 refs is
//!   deleted in the same transaction.
//! - `next_id` only grows, so queue positions of a session increase with enqueue order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, WriteTransaction};
use tokio::sync::oneshot;

use super::{SyncPolicy, BODIES, INBOUND, LOG, LOG_POSITION, META, QUEUE, RETAINED, SESSIONS, SUBSCRIPTIONS};
use crate::record::{decode, encode, StoredBody, StoredEntry, StoredRetained};
use crate::{Error, Op, OpResult, Queued};

/// Upper bound of operations per transaction, so that one commit stays short and the latency
/// of the requests behind it bounded.
const MAX_BATCH_OPS: usize = 4096;

pub(super) enum Request {
    Write { ops: Vec<Op>, done: oneshot::Sender<Result<Vec<OpResult>, Error>> },
    Flush { done: oneshot::Sender<Result<(), Error>> },
}

impl Request {
    fn len(&self) -> usize {
        match self {
            Request::Write { ops, .. } => ops.len(),
            Request::Flush { .. } => 1,
        }
    }
}

/// Sender side of the writer's queue. The thread ends when every handle is dropped.
#[derive(Clone)]
pub(super) struct Handle {
    tx: mpsc::Sender<Request>,
}

impl Handle {
    pub fn send(&self, r: Request) -> Result<(), Error> {
        self.tx.send(r).map_err(|_| Error::Closed)
    }
}

pub(super) struct State {
    next_id: u64,
    queue_len: HashMap<String, u32>,
    max_queue_len: u32,
    /// Follows the total of `queue_len`, for the metrics.
    queued_gauge: Option<Gauge>,
    db: Arc<Database>,
}

impl State {
    /// Creates missing tables and rebuilds the counters from the file.
    pub fn load(db: &Arc<Database>, max_queue_len: u32, queued_gauge: Option<Gauge>) -> Result<State, Error> {
        let doing = "opening tables";
        let txn = db.begin_write().map_err(|e| Error::storage(doing, e))?;
        let mut next_id = 1;
        {
            txn.open_table(SESSIONS).map_err(|e| Error::storage(doing, e))?;
            txn.open_table(BODIES).map_err(|e| Error::storage(doing, e))?;
            txn.open_table(RETAINED).map_err(|e| Error::storage(doing, e))?;
            txn.open_table(QUEUE).map_err(|e| Error::storage(doing, e))?;
            txn.open_table(INBOUND).map_err(|e| Error::storage(doing, e))?;
            txn.open_table(LOG).map_err(|e| Error::storage(doing, e))?;
            txn.open_table(SUBSCRIPTIONS).map_err(|e| Error::storage(doing, e))?;
            let meta = txn.open_table(META).map_err(|e| Error::storage(doing, e))?;
            let stored = meta.get("next_id").map_err(|e| Error::storage(doing, e))?.map(|v| v.value());
            if let Some(v) = stored {
                next_id = v;
            }
        }
        txn.commit().map_err(|e| Error::storage(doing, e))?;

        let mut queue_len = HashMap::new();
        let txn = db.begin_read().map_err(|e| Error::storage(doing, e))?;
        let queue = txn.open_table(QUEUE).map_err(|e| Error::storage(doing, e))?;
        for item in queue.iter().map_err(|e| Error::storage(doing, e))? {
            let (k, _) = item.map_err(|e| Error::storage(doing, e))?;
            *queue_len.entry(k.value().0.to_owned()).or_insert(0u32) += 1;
        }
        if let Some(g) = &queued_gauge {
            g.set(queue_len.values().map(|n| i64::from(*n)).sum());
        }
        Ok(State { next_id, queue_len, max_queue_len, queued_gauge, db: db.clone() })
    }

    pub fn session_ids(&self) -> Result<HashSet<String>, Error> {
        let doing = "listing sessions";
        let txn = self.db.begin_read().map_err(|e| Error::storage(doing, e))?;
        let table = txn.open_table(SESSIONS).map_err(|e| Error::storage(doing, e))?;
        let mut out = HashSet::new();
        for item in table.iter().map_err(|e| Error::storage(doing, e))? {
            let (k, _) = item.map_err(|e| Error::storage(doing, e))?;
            out.insert(k.value().to_owned());
        }
        Ok(out)
    }
}

pub(super) fn spawn(
    db: Arc<Database>,
    state: State,
    known: Arc<RwLock<HashSet<String>>>,
    sync: SyncPolicy,
    commit_latency: Option<Histogram>,
    commit_delay: Option<Arc<AtomicU64>>,
) -> Result<(Handle, std::thread::JoinHandle<()>), Error> {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || run(db, state, known, sync, rx, commit_latency, commit_delay))
        .map_err(|e| Error::Open { path: "store-writer thread".into(), source: std::sync::Arc::new(e) })?;
    Ok((Handle { tx }, thread))
}

// The writer is an OS thread, not a tokio task: its group-commit window is wall-clock time,
// which a paused tokio clock must not stretch.
#[allow(clippy::disallowed_types)]
fn run(
    db: Arc<Database>,
    mut state: State,
    known: Arc<RwLock<HashSet<String>>>,
    sync: SyncPolicy,
    rx: mpsc::Receiver<Request>,
    commit_latency: Option<Histogram>,
    commit_delay: Option<Arc<AtomicU64>>,
) {
    let mut dirty = false; // committed without fsync since the last durable commit
    loop {
        let first = match (sync, dirty) {
            (SyncPolicy::Interval(every), true) => match rx.recv_timeout(every) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = commit_durable(&db) {
                        tracing::error!(error = %e, "periodic fsync of the embedded store failed");
                    }
                    dirty = false;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
            _ => match rx.recv() {
                Ok(r) => r,
                Err(_) => break,
            },
        };
        let mut batch = vec![first];
        let mut n = batch[0].len();
        let window_ends = match sync {
            SyncPolicy::Window(w) => Some(std::time::Instant::now() + w),
            _ => None,
        };
        while n < MAX_BATCH_OPS {
            let next = match window_ends {
                Some(end) => match end.checked_duration_since(std::time::Instant::now()) {
                    Some(left) => rx.recv_timeout(left).ok(),
                    None => rx.try_recv().ok(),
                },
                None => rx.try_recv().ok(),
            };
            match next {
                Some(r) => {
                    n += r.len();
                    batch.push(r);
                }
                None => break,
            }
        }
        let force_sync = batch.iter().any(|r| matches!(r, Request::Flush { .. }));
        let durable = force_sync || matches!(sync, SyncPolicy::Batch | SyncPolicy::Window(_));
        let started = std::time::Instant::now();
        if let Some(ms) = commit_delay.as_ref().map(|d| d.load(Ordering::Relaxed)).filter(|ms| *ms > 0 && durable) {
            std::thread::sleep(Duration::from_millis(ms)); // injected: a slow fsync
        }
        let outcome = apply_batch(&db, &mut state, &known, &batch, durable);
        if let Some(h) = &commit_latency {
            h.observe(started.elapsed().as_secs_f64());
        }
        dirty = !durable && outcome.is_ok();
        respond(batch, outcome);
    }
    if dirty {
        let _ = commit_durable(&db);
    }
}

/// Results of a batch: per write request, its op results; or the error that failed them all.
type BatchOutcome = Result<Vec<Vec<OpResult>>, Error>;

fn respond(batch: Vec<Request>, outcome: BatchOutcome) {
    match outcome {
        Ok(results) => {
            let mut results = results.into_iter();
            for r in batch {
                match r {
                    Request::Write { done, .. } => {
                        let _ = done.send(Ok(results.next().unwrap_or_default()));
                    }
                    Request::Flush { done } => {
                        let _ = done.send(Ok(()));
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "embedded store commit failed; the operations of this batch are refused");
            for r in batch {
                match r {
                    Request::Write { done, .. } => {
                        let _ = done.send(Err(e.clone()));
                    }
                    Request::Flush { done } => {
                        let _ = done.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

fn commit_durable(db: &Database) -> Result<(), Error> {
    let txn = db.begin_write().map_err(|e| Error::storage("syncing", e))?;
    txn.commit().map_err(|e| Error::storage("syncing", e))
}

fn apply_batch(db: &Database, state: &mut State, known: &RwLock<HashSet<String>>, batch: &[Request], durable: bool) -> BatchOutcome {
    let mut txn = db.begin_write().map_err(|e| Error::storage("starting a write", e))?;
    if !durable {
        txn.set_durability(Durability::None).map_err(|e| Error::storage("setting durability", e))?;
    }
    // Counters change only if the commit succeeds: work on copies.
    let mut next_id = state.next_id;
    let mut queue_len = QueueLenDelta::default();
    let mut sessions_added = Vec::new();
    let mut sessions_removed = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    for r in batch {
        if let Request::Write { ops, .. } = r {
            let mut out = Vec::with_capacity(ops.len());
            for op in ops {
                out.push(apply(&mut txn, op, &mut next_id, &mut queue_len, state, &mut sessions_added, &mut sessions_removed, known)?);
            }
            results.push(out);
        }
    }
    {
        let mut meta = txn.open_table(META).map_err(|e| Error::storage("writing counters", e))?;
        meta.insert("next_id", next_id).map_err(|e| Error::storage("writing counters", e))?;
    }
    txn.commit().map_err(|e| Error::storage("committing", e))?;
    state.next_id = next_id;
    let queued = queue_len.apply_to(&mut state.queue_len);
    if let Some(g) = &state.queued_gauge {
        g.inc_by(queued);
    }
    let mut k = known.write();
    for id in sessions_removed {
        k.remove(&id);
    }
    for id in sessions_added {
        k.insert(id);
    }
    Ok(results)
}

/// Queue lengths changed by the current transaction, applied to the real counters on commit.
#[derive(Default)]
struct QueueLenDelta(HashMap<String, i64>);

impl QueueLenDelta {
    fn current(&self, base: &HashMap<String, u32>, client: &str) -> i64 {
        i64::from(base.get(client).copied().unwrap_or(0)) + self.0.get(client).copied().unwrap_or(0)
    }

    fn add(&mut self, client: &str, d: i64) {
        *self.0.entry(client.to_owned()).or_insert(0) += d;
    }

    /// Applies the changes; returns how much the total of all queues changed.
    fn apply_to(self, base: &mut HashMap<String, u32>) -> i64 {
        let mut total = 0;
        for (client, d) in self.0 {
            let before = i64::from(base.get(&client).copied().unwrap_or(0));
            let v = before + d;
            if v <= 0 {
                base.remove(&client);
                total -= before;
            } else {
                base.insert(client, v as u32);
                total += v - before;
            }
        }
        total
    }
}

#[allow(clippy::too_many_arguments)]
fn apply(
    txn: &mut WriteTransaction,
    op: &Op,
    next_id: &mut u64,
    queue_len: &mut QueueLenDelta,
    state: &State,
    added: &mut Vec<String>,
    removed: &mut Vec<String>,
    known: &RwLock<HashSet<String>>,
) -> Result<OpResult, Error> {
    let doing = "writing";
    let err = |e: redb::Error| Error::storage(doing, e);
    match op {
        Op::PutSession(record) => {
            let mut t = txn.open_table(SESSIONS).map_err(|e| err(e.into()))?;
            t.insert(record.client_id.as_str(), encode(record).as_slice()).map_err(|e| err(e.into()))?;
            removed.retain(|c| c != &record.client_id);
            added.push(record.client_id.clone());
        }
        // One process owns the embedded store: its connections are ordered without epochs.
        Op::RemoveSession { client_id, epoch: _ } => {
            let mut t = txn.open_table(SESSIONS).map_err(|e| err(e.into()))?;
            t.remove(client_id.as_str()).map_err(|e| err(e.into()))?;
            drop(t);
            let seqs = queue_seqs(txn, client_id)?;
            for seq in seqs {
                remove_entry(txn, client_id, seq, queue_len)?;
            }
            let mut inbound = txn.open_table(INBOUND).map_err(|e| err(e.into()))?;
            inbound.retain_in((client_id.as_str(), 0)..=(client_id.as_str(), u16::MAX), |_, _| false).map_err(|e| err(e.into()))?;
            added.retain(|c| c != client_id);
            removed.push(client_id.clone());
        }
        // Single node has no log to replay: `origin` is not needed here.
        Op::Enqueue { message, expires_at_ms, to, origin: _ } => {
            let message_id = *next_id;
            *next_id += 1;
            let mut seqs = Vec::with_capacity(to.len());
            let mut refs = 0u32;
            {
                let mut q = txn.open_table(QUEUE).map_err(|e| err(e.into()))?;
                for (client, delivery) in to {
                    let exists = added.contains(client) || (known.read().contains(client) && !removed.contains(client));
                    if !exists {
                        seqs.push(Queued::NoSession);
                        continue;
                    }
                    if queue_len.current(&state.queue_len, client) >= i64::from(state.max_queue_len) {
                        seqs.push(Queued::Full);
                        continue;
                    }
                    let seq = *next_id;
                    *next_id += 1;
                    let entry =
                        StoredEntry { message_id, delivery: delivery.clone(), expires_at_ms: *expires_at_ms, state: Default::default() };
                    q.insert((client.as_str(), seq), encode(&entry).as_slice()).map_err(|e| err(e.into()))?;
                    queue_len.add(client, 1);
                    refs += 1;
                    seqs.push(Queued::At(seq));
                }
            }
            if refs > 0 {
                let mut b = txn.open_table(BODIES).map_err(|e| err(e.into()))?;
                let body = StoredBody { refs, bytes: message.to_vec() };
                b.insert(message_id, encode(&body).as_slice()).map_err(|e| err(e.into()))?;
            }
            return Ok(OpResult::Enqueued(seqs));
        }
        Op::SetState { client_id, seq, state: new_state } => {
            let mut q = txn.open_table(QUEUE).map_err(|e| err(e.into()))?;
            let current = match q.get((client_id.as_str(), *seq)).map_err(|e| err(e.into()))? {
                Some(v) => Some(decode::<StoredEntry>("queue entry", v.value())?),
                None => None,
            };
            // The entry may have been acknowledged or expired meanwhile: nothing to record.
            if let Some(mut entry) = current {
                entry.state = *new_state;
                q.insert((client_id.as_str(), *seq), encode(&entry).as_slice()).map_err(|e| err(e.into()))?;
            }
        }
        Op::Ack { client_id, seq } => remove_entry(txn, client_id, *seq, queue_len)?,
        Op::PutRetained { topic, message, expires_at_ms } => {
            let mut t = txn.open_table(RETAINED).map_err(|e| err(e.into()))?;
            let r = StoredRetained { message: message.to_vec(), expires_at_ms: *expires_at_ms };
            t.insert(topic.as_str(), encode(&r).as_slice()).map_err(|e| err(e.into()))?;
        }
        Op::RemoveRetained { topic } => {
            let mut t = txn.open_table(RETAINED).map_err(|e| err(e.into()))?;
            t.remove(topic.as_str()).map_err(|e| err(e.into()))?;
        }
        // One commit holds the message and its mark: a retried write is the same transaction.
        Op::MarkInbound { client_id, pkid, .. } => {
            let mut t = txn.open_table(INBOUND).map_err(|e| err(e.into()))?;
            let before = t.insert((client_id.as_str(), *pkid), ()).map_err(|e| err(e.into()))?;
            return Ok(OpResult::Marked(before.is_none()));
        }
        // A single node commits a message and its mark together: a refused acceptance leaves
        // no mark, so none is ever given back (the ids keep no acceptance names here).
        Op::UnmarkInbound { .. } => {}
        // One process publishes every will of a single node, each once: nothing to decide.
        Op::AcceptWill { .. } => return Ok(OpResult::WillAccepted(true)),
        Op::ClearInbound { client_id, pkid } => {
            let mut t = txn.open_table(INBOUND).map_err(|e| err(e.into()))?;
            t.remove((client_id.as_str(), *pkid)).map_err(|e| err(e.into()))?;
        }
        Op::AppendLog { position, entry } => {
            let mut t = txn.open_table(LOG).map_err(|e| err(e.into()))?;
            t.insert(*position, entry.as_ref()).map_err(|e| err(e.into()))?;
            // The high-water mark outlives trimming: positions are never given out twice, so
            // proxies can tell a replayed entry from a new one.
            let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
            let last = meta.get(LOG_POSITION).map_err(|e| err(e.into()))?.map_or(0, |v| v.value());
            if *position > last {
                meta.insert(LOG_POSITION, *position).map_err(|e| err(e.into()))?;
            }
        }
        Op::TrimLog { position } => {
            let mut t = txn.open_table(LOG).map_err(|e| err(e.into()))?;
            t.remove(*position).map_err(|e| err(e.into()))?;
        }
        Op::PutSubscription { client_id, filter, entry } => {
            let mut t = txn.open_table(SUBSCRIPTIONS).map_err(|e| err(e.into()))?;
            t.insert((client_id.as_str(), filter.as_str()), entry.as_ref()).map_err(|e| err(e.into()))?;
        }
        Op::RemoveSubscription { client_id, filter } => {
            let mut t = txn.open_table(SUBSCRIPTIONS).map_err(|e| err(e.into()))?;
            match filter {
                Some(f) => {
                    t.remove((client_id.as_str(), f.as_str())).map_err(|e| err(e.into()))?;
                }
                None => {
                    t.retain_in((client_id.as_str(), "")..(client_id.as_str(), "\u{10FFFF}"), |_, _| false).map_err(|e| err(e.into()))?;
                }
            }
        }
    }
    Ok(OpResult::Done)
}

fn queue_seqs(txn: &WriteTransaction, client_id: &str) -> Result<Vec<u64>, Error> {
    let doing = "removing a session queue";
    let q = txn.open_table(QUEUE).map_err(|e| Error::storage(doing, e))?;
    let mut seqs = Vec::new();
    for item in q.range((client_id, 0)..=(client_id, u64::MAX)).map_err(|e| Error::storage(doing, e))? {
        let (k, _) = item.map_err(|e| Error::storage(doing, e))?;
        seqs.push(k.value().1);
    }
    Ok(seqs)
}

/// Removes one queue entry and releases its reference on the message body.
fn remove_entry(txn: &mut WriteTransaction, client_id: &str, seq: u64, queue_len: &mut QueueLenDelta) -> Result<(), Error> {
    let doing = "removing a queue entry";
    let entry = {
        let mut q = txn.open_table(QUEUE).map_err(|e| Error::storage(doing, e))?;
        let removed = q.remove((client_id, seq)).map_err(|e| Error::storage(doing, e))?;
        match removed {
            Some(v) => decode::<StoredEntry>("queue entry", v.value())?,
            None => return Ok(()), // acknowledged twice: harmless
        }
    };
    queue_len.add(client_id, -1);
    let mut b = txn.open_table(BODIES).map_err(|e| Error::storage(doing, e))?;
    let body = match b.get(entry.message_id).map_err(|e| Error::storage(doing, e))? {
        Some(v) => Some(decode::<StoredBody>("message body", v.value())?),
        None => None,
    };
    if let Some(mut body) = body {
        body.refs = body.refs.saturating_sub(1);
        if body.refs == 0 {
            b.remove(entry.message_id).map_err(|e| Error::storage(doing, e))?;
        } else {
            b.insert(entry.message_id, encode(&body).as_slice()).map_err(|e| Error::storage(doing, e))?;
        }
    }
    Ok(())
}
