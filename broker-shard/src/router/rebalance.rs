//! A shard's side of a ring change (clustered mode).
//!
//! # Procedure
//! 1. **Prepare** (the ring in Redis has a `next`): the shard computes what leaves it under the
//!    next ring — retained messages of topics another shard will own, persistent sessions'
//!    subscriptions to those topics, and every persistent wildcard subscription for shards
//!    that join — and its process hands them to their next owners ([`Handover`]). From then
//!    on, every retained change this shard still receives for a topic it will not own is
//!    forwarded to the next owner, in order ([`Forward`]). Proxies meanwhile subscribe their
//!    connections at the next owners too, so nothing routed after the switch misses a
//!    subscriber.
//! 2. **Commit**: the ring's members become `next`. Each proxy drains its requests to the old
//!    owners (a `Flush` barrier) before it routes to the new ones, so per-topic order holds.
//! 3. **Clean up**, a grace period after the commit: the shard drops what it no longer owns.
//!    Until then, late look-ups from proxies that have not switched still find it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mqfleet_codec::topic::has_wildcard;
use mqfleet_codec::ByteString;
use session_store::Op;
use tokio::time::Instant;

use super::{split_filter, Router};
use crate::link::{SessionInfo, SubscribeItem};
use crate::message::Message;
use crate::restore::encode_subscription;
use crate::ring::Ring;

/// How long after a committed change the shard keeps what it no longer owns.
pub const CLEANUP_AFTER: Duration = Duration::from_secs(60);

/// What this shard knows of the ring: rings with their epochs.
pub(super) struct RingView {
    pub me: String,
    pub current: Option<(u64, Ring)>,
    pub next: Option<(u64, Ring)>,
    /// When to drop what the current ring gives to others.
    pub cleanup_at: Option<Instant>,
}

impl RingView {
    /// The shard that owns (or is about to own) `topic`, if not this one.
    fn elsewhere(&self, topic: &str) -> Option<&str> {
        let (_, ring) = self.next.as_ref().or(self.current.as_ref())?;
        let owner = ring.owner_name(topic);
        (owner != self.me).then_some(owner)
    }
}

/// A ring as the shard's process reports it: its epoch and members.
pub type RingMembers = (u64, Vec<String>);

/// What leaves this shard under the next ring, by receiving shard.
#[derive(Debug, Default)]
pub struct Handover {
    pub retained: HashMap<String, Vec<Arc<Message>>>,
    pub subscriptions: HashMap<String, Vec<(ByteString, SubscribeItem)>>,
}

/// A retained change for a topic another shard owns or is about to own.
#[derive(Debug, Clone)]
pub struct Forward {
    pub to: String,
    pub topic: ByteString,
    /// The new retained message; `None` deletes it.
    pub message: Option<Arc<Message>>,
}

impl Router {
    pub(super) fn on_ring(&mut self, me: String, current: Option<RingMembers>, next: Option<RingMembers>) {
        let known = self.ring.as_ref().and_then(|r| r.current.as_ref().map(|(e, _)| *e));
        let view = self.ring.get_or_insert_with(|| RingView { me: me.clone(), current: None, next: None, cleanup_at: None });
        view.me = me;
        view.next = next.map(|(e, n)| (e, Ring::new(&n)));
        if current.as_ref().map(|(e, _)| *e) != known {
            if known.is_some() {
                view.cleanup_at = Some(Instant::now() + CLEANUP_AFTER);
            }
            self.metrics.ring_epoch.set(current.as_ref().map_or(0, |(e, _)| *e as i64));
            view.current = current.map(|(e, c)| (e, Ring::new(&c)));
        }
    }

    /// Whether this shard answers for `topic` under the ring of `epoch` (retained look-ups).
    /// Without a ring (single node, fixed shard list) every topic here is its own.
    pub(super) fn owns(&self, topic: &str, epoch: u64) -> bool {
        let Some(view) = &self.ring else { return true };
        let ring = match (&view.next, &view.current) {
            (Some((e, r)), _) if *e == epoch => r,
            (_, Some((_, r))) => r,
            _ => return true,
        };
        ring.owner_name(topic) == view.me
    }

    /// Computes the hand-over to `next` and starts forwarding retained changes for topics
    /// that leave.
    pub(super) fn on_handover(&mut self, (epoch, next): RingMembers) -> Handover {
        let Some(view) = &mut self.ring else { return Handover::default() };
        let next = Ring::new(&next);
        let me = view.me.clone();
        let joining: Vec<String> =
            next.names().iter().filter(|n| **n != me && !view.current.as_ref().is_some_and(|(_, c)| c.contains(n))).cloned().collect();
        let mut h = Handover::default();
        for m in self.retained.all() {
            let owner = next.owner_name(&m.topic);
            if owner != me {
                h.retained.entry(owner.to_string()).or_default().push(m);
            }
        }
        for slot in self.sessions.slots() {
            let e = self.sessions.get(slot);
            if !e.persistent {
                continue; // proxies re-send clean sessions' subscriptions themselves
            }
            for item in &e.subscriptions {
                let (_, inner) = split_filter(&item.filter);
                if has_wildcard(inner) {
                    for j in &joining {
                        h.subscriptions.entry(j.clone()).or_default().push((e.client_id.clone(), item.clone()));
                    }
                } else {
                    let owner = next.owner_name(inner);
                    if owner != me {
                        h.subscriptions.entry(owner.to_string()).or_default().push((e.client_id.clone(), item.clone()));
                    }
                }
            }
        }
        view.next = Some((epoch, next));
        h
    }

    /// Passes a retained change on to the topic's (next) owner, if that is another shard.
    pub(super) fn forward_retained(&self, topic: &ByteString, message: Option<Arc<Message>>) {
        let (Some(view), Some(tx)) = (&self.ring, &self.forward) else { return };
        if let Some(to) = view.elsewhere(topic) {
            let _ = tx.send(Forward { to: to.to_string(), topic: topic.clone(), message });
        }
    }

    /// Takes over retained messages (replacing what is here); returns the writes.
    pub(super) fn adopt_retained(&mut self, messages: Vec<Arc<Message>>, removed: Vec<ByteString>) -> Vec<Op> {
        let mut ops = Vec::new();
        let before = self.retained.len() as i64;
        for m in messages {
            ops.push(Op::PutRetained { topic: m.topic.to_string(), message: m.encode(), expires_at_ms: m.expires_at_ms });
            self.retained.set(m);
        }
        for t in removed {
            self.retained.remove(&t);
            ops.push(Op::RemoveRetained { topic: t.to_string() });
        }
        self.metrics.retained_messages.inc_by(self.retained.len() as i64 - before);
        ops
    }

    /// Takes over persistent sessions' subscriptions; a session known here keeps its route.
    pub(super) fn adopt_subscriptions(&mut self, items: Vec<(ByteString, SubscribeItem)>) -> Vec<Op> {
        let mut ops = Vec::new();
        for (client_id, item) in items {
            let slot = match self.sessions.find(&client_id) {
                Some(slot) => slot,
                None => {
                    self.sessions.upsert(&SessionInfo { client_id: client_id.clone(), conn: None, persistent: true }, super::NO_PROXY).0
                }
            };
            self.add_subscription(slot, &item);
            ops.push(Op::PutSubscription {
                client_id: client_id.to_string(),
                filter: item.filter.to_string(),
                entry: encode_subscription(&item),
            });
        }
        ops
    }

    /// Drops what the current ring gives to other shards, once the grace period is over and
    /// no further change is being prepared. Returns the writes.
    pub(super) fn clean_up_if_due(&mut self, now: Instant) -> Vec<Op> {
        let Some(view) = &mut self.ring else { return Vec::new() };
        if view.next.is_some() || view.cleanup_at.is_none_or(|t| now < t) {
            return Vec::new();
        }
        view.cleanup_at = None;
        let Some((_, current)) = &view.current else { return Vec::new() };
        if !current.contains(&view.me) {
            return Vec::new(); // not a member: nothing here is served by the ring
        }
        let me = view.me.clone();
        let mut ops = Vec::new();
        let gone: Vec<Arc<Message>> = self.retained.all().into_iter().filter(|m| current.owner_name(&m.topic) != me).collect();
        for m in &gone {
            self.retained.remove(&m.topic);
            ops.push(Op::RemoveRetained { topic: m.topic.to_string() });
        }
        self.metrics.retained_messages.dec_by(gone.len() as i64);
        let slots: Vec<_> = self.sessions.slots().collect();
        let mut dropped = 0usize;
        for slot in slots {
            let e = self.sessions.get(slot);
            let moved: Vec<SubscribeItem> = e
                .subscriptions
                .iter()
                .filter(|i| {
                    let (_, inner) = split_filter(&i.filter);
                    !has_wildcard(inner) && current.owner_name(inner) != me
                })
                .cloned()
                .collect();
            let (persistent, client_id) = (e.persistent, e.client_id.clone());
            for item in moved {
                let (group, inner) = split_filter(&item.filter);
                if self.index.remove(inner, group, slot) {
                    self.metrics.subscriptions.dec();
                }
                self.sessions.get_mut(slot).subscriptions.retain(|s| s.filter != item.filter);
                if persistent {
                    ops.push(Op::RemoveSubscription { client_id: client_id.to_string(), filter: Some(item.filter.to_string()) });
                }
                dropped += 1;
            }
            let e = self.sessions.get(slot);
            if e.subscriptions.is_empty() && e.route.is_none() {
                self.sessions.remove(slot);
            }
        }
        tracing::info!(shard = %me, retained = gone.len(), subscriptions = dropped, "dropped what moved to other shards");
        ops
    }
}
