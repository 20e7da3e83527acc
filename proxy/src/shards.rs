//! This proxy's links to the shards, the ring that chooses among them, and the hand-off of
//! deliveries from links to connections.
//!
//! The set of shards can change at run time (discovery, rebalance), so it is published as an
//! immutable [`Topology`] snapshot: one request takes one snapshot, and a ring and its links
//! always match.

use std::sync::Arc;

use broker_shard::link::client::{Client, DeliverySink};
use broker_shard::link::{Deliver, LinkError, Reply, Request, RequestId};
use futures::future::join_all;
use mqfleet_codec::ByteString;
use parking_lot::RwLock;

use crate::metrics::Metrics;
use crate::registry::{ConnMsg, Registry};
use crate::routing::{Ring, ShardSet};

/// The shards as seen from this proxy, swappable as a whole.
pub struct Shards {
    current: RwLock<Arc<Topology>>,
}

impl Shards {
    pub fn new(t: Topology) -> Shards {
        Shards { current: RwLock::new(Arc::new(t)) }
    }

    /// The topology to use for one request.
    pub fn now(&self) -> Arc<Topology> {
        self.current.read().clone()
    }

    pub fn replace(&self, t: Topology) {
        *self.current.write() = Arc::new(t);
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
