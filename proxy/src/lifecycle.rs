//! What happens to sessions without a connection: delayed wills and session expiry
//! (MQTT 5 §3.1.2.5, §3.1.2.11.2).
//!
//! One task owns the timers. A reconnect cancels both timers of its client id [MQTT-3.1.3-9];
//! an expiring session publishes its pending will first ("the will is published when the delay
//! elapses or the session ends, whichever happens first").

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use broker_shard::link::{Marker, Request, WillRef};
use broker_shard::now_ms;
use futures::StreamExt;
use mqfleet_codec::ByteString;
use session_store::{Op, StoredWill};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

use crate::session::connect::WillSpec;
use crate::Context;
use broker_shard::ring::ShardSet;

enum Cmd {
    Will {
        client_id: ByteString,
        will: Box<WillSpec>,
        after: Duration,
        persistent: bool,
    },
    Expire {
        client_id: ByteString,
        at_ms: u64,
    },
    Cancel {
        client_id: ByteString,
    },
    /// End an offline session now (admin API), its pending will first.
    EndNow {
        client_id: ByteString,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Timer {
    Will(ByteString),
    Expire(ByteString),
}

/// Handle to the lifecycle task. Commands are applied in the order sent.
#[derive(Clone)]
pub struct Lifecycle {
    tx: mpsc::UnboundedSender<Cmd>,
}

/// The receiving end, until the task is started with the context it needs.
pub struct LifecycleTask {
    rx: mpsc::UnboundedReceiver<Cmd>,
}

impl Lifecycle {
    pub fn new() -> (Lifecycle, LifecycleTask) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Lifecycle { tx }, LifecycleTask { rx })
    }

    pub fn schedule_will(&self, client_id: &ByteString, will: WillSpec, after: Duration, persistent: bool) {
        let _ = self.tx.send(Cmd::Will { client_id: client_id.clone(), will: Box::new(will), after, persistent });
    }

    pub fn schedule_expiry(&self, client_id: &ByteString, at_ms: u64) {
        let _ = self.tx.send(Cmd::Expire { client_id: client_id.clone(), at_ms });
    }

    /// Ends an offline session now, as if it expired (admin API): its pending will is
    /// published, then the session removed.
    pub fn end_now(&self, client_id: &ByteString) {
        let _ = self.tx.send(Cmd::EndNow { client_id: client_id.clone() });
    }

    /// A connection for this client id exists again: no will, no expiry.
    pub fn cancel(&self, client_id: &ByteString) {
        let _ = self.tx.send(Cmd::Cancel { client_id: client_id.clone() });
    }
}

impl LifecycleTask {
    /// Runs until `shutdown`. Holds the context weakly: the task never keeps the broker alive.
    pub async fn run(mut self, ctx: Weak<Context>, shutdown: CancellationToken) {
        let mut queue: DelayQueue<Timer> = DelayQueue::new();
        let mut keys: HashMap<Timer, delay_queue::Key> = HashMap::new();
        let mut wills: HashMap<ByteString, (WillSpec, bool)> = HashMap::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    match cmd {
                        Cmd::Will { client_id, will, after, persistent } => {
                            let t = Timer::Will(client_id.clone());
                            if let Some(k) = keys.remove(&t) { queue.remove(&k); }
                            keys.insert(t.clone(), queue.insert(t, after));
                            wills.insert(client_id, (*will, persistent));
                        }
                        Cmd::Expire { client_id, at_ms } => {
                            let t = Timer::Expire(client_id);
                            if let Some(k) = keys.remove(&t) { queue.remove(&k); }
                            let after = Duration::from_millis(at_ms.saturating_sub(now_ms()));
                            keys.insert(t.clone(), queue.insert(t, after));
                        }
                        Cmd::Cancel { client_id } => {
                            for t in [Timer::Will(client_id.clone()), Timer::Expire(client_id.clone())] {
                                if let Some(k) = keys.remove(&t) { queue.remove(&k); }
                            }
                            wills.remove(&client_id);
                        }
                        Cmd::EndNow { client_id } => {
                            for t in [Timer::Will(client_id.clone()), Timer::Expire(client_id.clone())] {
                                if let Some(k) = keys.remove(&t) { queue.remove(&k); }
                            }
                            let will = wills.remove(&client_id).map(|(w, _)| w);
                            let Some(ctx) = ctx.upgrade() else { return };
                            expire(&ctx, &client_id, will, true).await;
                        }
                    }
                }
                Some(expired) = queue.next(), if !queue.is_empty() => {
                    let timer = expired.into_inner();
                    keys.remove(&timer);
                    let Some(ctx) = ctx.upgrade() else { return };
                    match timer {
                        Timer::Will(client_id) => {
                            if let Some((will, persistent)) = wills.remove(&client_id) {
                                fire_will(&ctx, &client_id, will, persistent).await;
                            }
                        }
                        Timer::Expire(client_id) => {
                            let will = wills.remove(&client_id).map(|(w, _)| w);
                            if let Some(k) = keys.remove(&Timer::Will(client_id.clone())) { queue.remove(&k); }
                            expire(&ctx, &client_id, will, false).await;
                        }
                    }
                }
            }
        }
    }
}

async fn fire_will(ctx: &Arc<Context>, client_id: &ByteString, will: WillSpec, persistent: bool) {
    if ctx.registry.is_connected(client_id) {
        return;
    }
    ctx.publish_will(will, None).await;
    if persistent {
        // The will is spent: a restart must not publish it again.
        match ctx.store.load_session(client_id).await {
            Ok(Some(mut record)) if !record.connected => {
                record.will = None;
                if let Err(e) = ctx.store.write(vec![Op::PutSession(record)]).await {
                    tracing::warn!(client_id = %client_id, error = %e, "could not clear a published will");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(client_id = %client_id, error = %e, "could not clear a published will"),
        }
    }
}

/// Ends an offline session whose expiry has come (or at once with `now`).
async fn expire(ctx: &Arc<Context>, client_id: &ByteString, will: Option<WillSpec>, now: bool) {
    if ctx.registry.is_connected(client_id) {
        return;
    }
    let record = match ctx.store.load_session(client_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(client_id = %client_id, error = %e, "cannot expire session now; retrying in a minute");
            ctx.lifecycle.schedule_expiry(client_id, now_ms() + 60_000);
            return;
        }
    };
    if record.connected {
        return;
    }
    if let Some(at) = record.expires_at_ms().filter(|_| !now) {
        if at > now_ms() + 100 {
            ctx.lifecycle.schedule_expiry(client_id, at);
            return;
        }
    }
    if let Some(w) = will {
        ctx.publish_will(w, None).await;
    }
    match ctx.end_stored_session(client_id, None).await {
        Ok(()) => {
            ctx.metrics.sessions_expired.inc();
            tracing::debug!(client_id = %client_id, "session expired");
        }
        Err(e) => tracing::warn!(client_id = %client_id, error = %e, "could not remove expired session"),
    }
}

/// How long a will is retried while the shard owning its topic does not take it.
const WILL_RETRY_FOR: Duration = Duration::from_secs(60);

/// The stored form of a will.
pub fn stored_will(w: &WillSpec) -> StoredWill {
    StoredWill {
        message: w.message.encode().to_vec(),
        delay_interval: w.delay_interval,
        message_expiry_interval: w.message_expiry_interval,
    }
}

/// A will back from its stored form.
pub fn will_from_store(s: &StoredWill) -> Option<WillSpec> {
    let message = broker_shard::Message::decode(&bytes::Bytes::copy_from_slice(&s.message)).ok()?;
    Some(WillSpec { message, delay_interval: s.delay_interval, message_expiry_interval: s.message_expiry_interval })
}

impl Context {
    /// Publishes a will through its topic's shard and waits until it is accepted. In a cluster,
    /// `of` is the connection it belongs to (client id, epoch), whose will this proxy took in
    /// Redis: the shard publishes it only if the cluster says so, once however often it is sent
    /// (see `session_store::Op::AcceptWill`).
    pub async fn publish_will(&self, will: WillSpec, of: Option<(&str, u64)>) {
        let marker = match (&self.cluster, of) {
            (Some(c), Some((client_id, epoch))) => {
                Some(Marker::Will(WillRef { client_id: client_id.into(), epoch, proxy: c.id.as_str().into() }))
            }
            _ => None,
        };
        let mut message = will.message;
        message.expires_at_ms = will.message_expiry_interval.map(|s| now_ms() + u64::from(s) * 1000);
        let topic = message.topic.clone();
        let message = Arc::new(message);
        // The right to publish this will was taken (once, in the cluster): it must go out, so a
        // shard that is away (restarting, cut off) is retried until it takes it.
        let mut backoff = mqfleet_ops::outage::Backoff::within(WILL_RETRY_FOR);
        loop {
            let link = self.shards.now().owner(&topic).clone();
            let message = message.clone();
            match link.call(|id| Request::Publish { id: Some(id), message, marker: marker.clone() }).await {
                Ok(_) => {
                    self.metrics.wills_published.inc();
                    tracing::debug!(topic = %topic, "will published");
                    return;
                }
                Err(e) => {
                    tracing::debug!(topic = %topic, error = %e, "will not taken yet");
                    if !backoff.pause().await {
                        tracing::error!(topic = %topic, error = %e, "will could not be published within {WILL_RETRY_FOR:?}");
                        return;
                    }
                }
            }
        }
    }

    /// Removes a stored session and its subscriptions on every shard. `epoch`: the
    /// connection doing it, so that it cannot end a newer connection's session (cluster).
    pub async fn end_stored_session(&self, client_id: &ByteString, epoch: Option<u64>) -> Result<(), session_store::Error> {
        self.store.write(vec![Op::RemoveSession { client_id: client_id.to_string(), epoch }]).await?;
        self.metrics.persistent_sessions.dec();
        let _ = self.shards.now().send_to(ShardSet::All, || Request::Forget { client_id: client_id.clone(), conn: None }).await;
        Ok(())
    }
}
