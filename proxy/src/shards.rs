//! This proxy's links to the shards, the ring that chooses among them, and the hand-off of
//! deliveries from links to connections.

use std::sync::Arc;

use broker_shard::link::client::{Client, DeliverySink};
use broker_shard::link::{Deliver, LinkError, Reply, Request, RequestId};
use futures::future::join_all;

use crate::metrics::Metrics;
use crate::registry::{ConnMsg, Registry};
use crate::routing::{Ring, ShardSet};

/// The shards as seen from this proxy.
pub struct Shards {
    links: Vec<Client>,
    ring: Ring,
}

impl Shards {
    pub fn new(links: Vec<Client>, ring: Ring) -> Shards {
        Shards { links, ring }
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

    pub async fn close(&self) {
        for l in &self.links {
            l.close().await;
        }
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
