//! Links from this shard to the other shards, for hand-overs in a ring change: the same link
//! protocol proxies use, with this shard as the "proxy" (`shard:<name>`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use session_store::RedisStore;
use tokio_util::sync::CancellationToken;

use crate::link::client::{Client, DeliverySink, LinkEvents};
use crate::link::tcp::TcpConfig;
use crate::link::{Deliver, LinkError, Reply, Request, RequestId};

/// A shard link carries no deliveries to another shard and has nothing to re-send.
struct Quiet;

impl DeliverySink for Quiet {
    fn deliver(&self, _: Deliver) {}
}

impl LinkEvents for Quiet {
    fn resync(&self) -> Vec<Request> {
        Vec::new()
    }
    fn linked(&self, _again: bool) {}
}

/// Why a hand-over request did not get through.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("shard {0} is not registered in Redis")]
    Unknown(String),
    #[error(transparent)]
    Redis(#[from] session_store::Error),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Registered shards are never forgotten by this lookup: a hand-over waits for a shard that is
/// down rather than skipping it.
const REGISTERED: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Clone)]
pub struct ShardPeers {
    me: String,
    redis: RedisStore,
    links: Arc<Mutex<HashMap<String, Client>>>,
    shutdown: CancellationToken,
}

impl ShardPeers {
    pub fn new(me: String, redis: RedisStore, shutdown: CancellationToken) -> ShardPeers {
        ShardPeers { me, redis, links: Arc::default(), shutdown }
    }

    async fn link(&self, shard: &str) -> Result<Client, PeerError> {
        if let Some(c) = self.links.lock().get(shard) {
            return Ok(c.clone());
        }
        let addr = self
            .redis
            .live_shards(REGISTERED)
            .await?
            .into_iter()
            .find(|(name, _)| name == shard)
            .map(|(_, addr)| addr)
            .ok_or_else(|| PeerError::Unknown(shard.to_string()))?;
        let mut config = TcpConfig::new(addr, format!("shard:{}", self.me));
        config.request_timeout = Duration::from_secs(60);
        let client = Client::connect_tcp(config, Arc::new(Quiet), Arc::new(Quiet), self.shutdown.clone());
        Ok(self.links.lock().entry(shard.to_string()).or_insert(client).clone())
    }

    /// Sends a request to another shard and waits for its reply.
    pub async fn call(&self, shard: &str, build: impl FnOnce(RequestId) -> Request) -> Result<Reply, PeerError> {
        Ok(self.link(shard).await?.call(build).await?)
    }
}
