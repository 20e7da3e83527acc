//! The proxies a shard talks to, and the logged events each has not confirmed yet.
//!
//! A proxy whose link drops is *away*, not gone: its routes stay, and logged events for it
//! (QoS 1/2 deliveries and replies) are kept and sent again, in their original order, when it
//! links again — so a link blip loses nothing. Only after the grace period does the shard
//! consider its connections gone. A proxy that comes back with a new incarnation restarted: its
//! connections are gone at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::link::{Event, LogRef, Reply};

struct Pending {
    order: u64,
    position: u64,
    event: Event,
}

pub(super) struct Peer {
    pub name: Arc<str>,
    pub incarnation: u64,
    events: Option<mpsc::Sender<Event>>,
    away_since: Option<Instant>,
    /// Per lane (accepted, queued): sent, not confirmed; positions increase within a lane.
    unconfirmed: [VecDeque<Pending>; 2],
    next_order: u64,
}

/// The log reference an event carries, if it is logged.
pub(super) fn log_ref(event: &Event) -> Option<LogRef> {
    match event {
        Event::Deliver(d) => d.log,
        Event::Reply { result: Ok(Reply::Accepted { position }), .. } => Some(LogRef { position: *position, queued: false }),
        Event::Reply { .. } => None,
    }
}

impl Peer {
    pub fn new(name: Arc<str>, incarnation: u64, events: mpsc::Sender<Event>) -> Peer {
        Peer { name, incarnation, events: Some(events), away_since: None, unconfirmed: Default::default(), next_order: 0 }
    }

    /// Sends an event, keeping a logged one until confirmed. While away, only logged events
    /// are kept; the rest answer requests the proxy sends again after relinking.
    pub async fn send(&mut self, event: Event) {
        if let Some(r) = log_ref(&event) {
            self.next_order += 1;
            self.unconfirmed[usize::from(r.queued)].push_back(Pending {
                order: self.next_order,
                position: r.position,
                event: event.clone(),
            });
        }
        if let Some(tx) = &self.events {
            if tx.send(event).await.is_err() {
                // The link ended; its disconnect is on the way.
                self.events = None;
            }
        }
    }

    /// The proxy received everything up to these positions; `on` is called per confirmed send.
    pub fn confirm(&mut self, accepted: u64, queued: u64, mut on: impl FnMut(u64)) {
        for (lane, upto) in [(0, accepted), (1, queued)] {
            let q = &mut self.unconfirmed[lane];
            while q.front().is_some_and(|p| p.position <= upto) {
                let p = q.pop_front().expect("checked");
                on(p.position);
            }
        }
    }

    /// Forgets every unconfirmed send (the proxy is gone); `on` per send.
    pub fn release_all(&mut self, mut on: impl FnMut(u64)) {
        for q in &mut self.unconfirmed {
            for p in q.drain(..) {
                on(p.position);
            }
        }
    }

    pub fn went_away(&mut self, now: Instant) {
        self.events = None;
        self.away_since.get_or_insert(now);
    }

    pub fn away_longer_than(&self, grace: Duration, now: Instant) -> bool {
        self.away_since.is_some_and(|t| now.duration_since(t) > grace)
    }

    /// The proxy linked again: events it has not confirmed, in the order first sent.
    pub fn relink(&mut self, events: mpsc::Sender<Event>) -> Vec<Event> {
        self.events = Some(events);
        self.away_since = None;
        let mut all: Vec<&Pending> = self.unconfirmed.iter().flatten().collect();
        all.sort_by_key(|p| p.order);
        all.into_iter().map(|p| p.event.clone()).collect()
    }

    /// Sends without tracking (events re-sent after a relink are tracked already).
    pub async fn resend(&mut self, event: Event) {
        if let Some(tx) = &self.events {
            if tx.send(event).await.is_err() {
                self.events = None;
            }
        }
    }
}
