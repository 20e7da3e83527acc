//! This proxy's links to the shards, the ring that chooses among them, and the hand-off of
//! deliveries from links to connections.
//!
//! The set of shards can change at run time (discovery, rebalance), so it is published as an
//! immutable [`Topology`] snapshot: one request takes one snapshot, and a ring and its links
//! always match.
//!
//! # Ring changes
//! While a change is prepared there is also a *next* topology: subscriptions, attaches and
//! forgets go to the owners under both rings (so the next owners have every subscriber before
//! any message reaches them), publishes only to the current owners. The switch then drains:
//! it closes the publish gate, waits until every request already sent to the current shards
//! is done (a `Flush` barrier per shard), installs the next topology and opens the gate — so a
//! publisher's messages to a moved topic never overtake each other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use broker_shard::link::client::{Client, DeliverySink};
use broker_shard::link::{Deliver, LinkError, Reply, Request, RequestId, SubscribeItem};
use futures::future::join_all;
use mqfleet_codec::topic::parse_shared;
use mqfleet_codec::ByteString;
use parking_lot::RwLock;

use crate::metrics::Metrics;
use crate::registry::{ConnMsg, Registry};
use broker_shard::ring::{Ring, ShardSet};

/// The shards as seen from this proxy, swappable as a whole.
pub struct Shards {
    current: RwLock<Arc<Topology>>,
    next: RwLock<Option<Arc<Topology>>>,
    /// With a ring that can change: publishes hold it shared while handing their request to a
    /// link; a switch holds it exclusively while draining the current shards.
    gate: Option<tokio::sync::RwLock<()>>,
}

/// Longest wait for a shard to confirm it drained before a switch goes ahead without it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to send one subscription request: a link, its items, and whether the shard should
/// answer with retained messages (only the current owner does, for the current ring's epoch).
pub struct Target {
    pub link: Client,
    pub items: Vec<SubscribeItem>,
    pub deliver_retained: Option<u64>,
}

impl Shards {
    /// `dynamic`: the ring may change while running.
    pub fn new(t: Topology, dynamic: bool) -> Shards {
        Shards { current: RwLock::new(Arc::new(t)), next: RwLock::new(None), gate: dynamic.then(|| tokio::sync::RwLock::new(())) }
    }

    /// The topology to use for one request.
    pub fn now(&self) -> Arc<Topology> {
        self.current.read().clone()
    }

    /// The topology being prepared, if a ring change is under way.
    pub fn next(&self) -> Option<Arc<Topology>> {
        self.next.read().clone()
    }

    pub fn set_next(&self, t: Option<Topology>) {
        *self.next.write() = t.map(Arc::new);
    }

    /// Held by a publish while it picks a shard and hands its request to the link.
    pub async fn publish_gate(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        match &self.gate {
            Some(g) => Some(g.read().await),
            None => None,
        }
    }

    /// Installs `t` once every current shard has finished what it was sent (see the module
    /// documentation).
    pub async fn switch(&self, t: Topology) {
        let _closed = match &self.gate {
            Some(g) => Some(g.write().await),
            None => None,
        };
        let old = self.now();
        let drains = old.links.iter().map(|l| async move {
            match tokio::time::timeout(DRAIN_TIMEOUT, l.call(|id| Request::Flush { id })).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(shard = %l.shard(), error = %e, "shard did not drain before the ring switch"),
                Err(_) => tracing::warn!(shard = %l.shard(), "shard did not drain within {DRAIN_TIMEOUT:?}; switching anyway"),
            }
        });
        join_all(drains).await;
        *self.current.write() = Arc::new(t);
        *self.next.write() = None;
    }

    /// The links holding subscriptions with these filters, under the current ring and any
    /// next one, each once.
    pub fn links_for<'a>(&self, filters: impl Iterator<Item = &'a ByteString> + Clone) -> Vec<Client> {
        let mut out: BTreeMap<String, Client> = BTreeMap::new();
        for t in std::iter::once(self.now()).chain(self.next()) {
            for i in t.indices(t.shard_set(filters.clone())) {
                out.entry(t.keys[i].clone()).or_insert_with(|| t.links[i].clone());
            }
        }
        out.into_values().collect()
    }

    /// Groups subscribe items by target shard: the current owners (with retained messages) and,
    /// during a ring change, the next owners (without: the current owner answers for those).
    pub fn subscription_targets(&self, items: &[SubscribeItem]) -> Vec<Target> {
        let mut out: BTreeMap<(String, bool), Target> = BTreeMap::new();
        let (now, next) = (self.now(), self.next());
        for item in items {
            let inner = match parse_shared(&item.filter) {
                Ok(Some(s)) => s.filter,
                _ => &item.filter,
            };
            let current: Vec<usize> = now.indices(now.ring.shards_for_filter(inner));
            for &i in &current {
                let t = out.entry((now.keys[i].clone(), true)).or_insert_with(|| Target {
                    link: now.links[i].clone(),
                    items: Vec::new(),
                    deliver_retained: Some(now.epoch),
                });
                t.items.push(item.clone());
            }
            if let Some(next) = &next {
                for i in next.indices(next.ring.shards_for_filter(inner)) {
                    if current.iter().any(|&c| now.keys[c] == next.keys[i]) {
                        continue;
                    }
                    let t = out.entry((next.keys[i].clone(), false)).or_insert_with(|| Target {
                        link: next.links[i].clone(),
                        items: Vec::new(),
                        deliver_retained: None,
                    });
                    t.items.push(item.clone());
                }
            }
        }
        out.into_values().collect()
    }

    pub async fn close(&self) {
        for l in &self.now().links {
            l.close().await;
        }
    }
}

/// A ring and the links to its shards, in ring order.
pub struct Topology {
    links: Vec<Client>,
    /// The ring member name of each link (a shard name, or its address in a static list).
    keys: Vec<String>,
    ring: Ring,
    /// Ring epoch this topology was built for (0: static).
    pub epoch: u64,
}

impl Topology {
    /// Links in the order of `keys`, the ring's members.
    pub fn new(keys: Vec<String>, links: Vec<Client>, epoch: u64) -> Topology {
        let ring = Ring::new(&keys);
        Topology { links, keys, ring, epoch }
    }

    /// The index of the shard with this ring key.
    pub fn index_of(&self, key: &str) -> Option<usize> {
        self.keys.iter().position(|k| k == key)
    }

    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn link(&self, index: usize) -> &Client {
        &self.links[index]
    }

    pub fn links(&self) -> &[Client] {
        &self.links
    }

    /// The link with this ring key.
    pub fn link_by_key(&self, key: &str) -> Option<&Client> {
        self.index_of(key).map(|i| &self.links[i])
    }

    /// The link to the shard owning `topic`.
    pub fn owner(&self, topic: &str) -> &Client {
        &self.links[self.ring.owner(topic)]
    }

    pub fn indices(&self, set: ShardSet) -> Vec<usize> {
        match set {
            ShardSet::One(i) => vec![i],
            ShardSet::All => (0..self.links.len()).collect(),
        }
    }

    /// The shards holding subscriptions with these filters.
    pub fn shard_set<'a>(&self, filters: impl Iterator<Item = &'a ByteString>) -> ShardSet {
        let mut one = None;
        for f in filters {
            let inner = match mqfleet_codec::topic::parse_shared(f) {
                Ok(Some(s)) => s.filter,
                _ => f,
            };
            match (self.ring.shards_for_filter(inner), one) {
                (ShardSet::All, _) => return ShardSet::All,
                (ShardSet::One(i), None) => one = Some(i),
                (ShardSet::One(i), Some(j)) if i != j => return ShardSet::All,
                _ => {}
            }
        }
        one.map_or(ShardSet::All, ShardSet::One)
    }

    /// Sends a request needing no reply to each shard of `set`.
    pub async fn send_to(&self, set: ShardSet, make: impl Fn() -> Request) -> Result<(), LinkError> {
        for i in self.indices(set) {
            self.links[i].send(make()).await?;
        }
        Ok(())
    }

    /// Calls every shard of `set` concurrently; replies in shard order.
    pub async fn call_each(&self, set: ShardSet, make: impl Fn(RequestId) -> Request) -> Result<Vec<Reply>, LinkError> {
        join_all(self.indices(set).into_iter().map(|i| self.links[i].call(&make))).await.into_iter().collect()
    }
}

/// Hands deliveries from the links to the connections' mailboxes.
pub struct Dispatcher {
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
}

impl DeliverySink for Dispatcher {
    fn deliver(&self, d: Deliver) {
        self.registry.with_conns(|conns| {
            for r in d.recipients {
                match conns.get(&r.conn) {
                    Some(mailbox) => {
                        let _ = mailbox.send(ConnMsg::Deliver(d.message.clone(), r));
                    }
                    // The connection ended while the message was routed. A persistent session
                    // has it in its queue; a clean one is gone with its session.
                    None => self.metrics.drop("connection_gone"),
                }
            }
        });
    }
}
