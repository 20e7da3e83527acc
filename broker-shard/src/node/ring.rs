//! This shard's part in ring changes: joining the ring, preparing a change (handing over what
//! leaves it), committing a change once every live participant is ready, and forwarding
//! retained changes for topics that moved. See `router::rebalance` for the procedure.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use session_store::{RedisStore, RingChange, RingState};
use tokio_util::sync::CancellationToken;

use super::peers::ShardPeers;
use crate::link::Request;
use crate::router::Forward;
use crate::ShardHandle;

/// A prepared change not committed within this long is aborted (a participant is stuck); the
/// joining shard proposes it again.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// Items per hand-over request.
const CHUNK: usize = 1000;

pub struct RingWatch {
    pub me: String,
    pub redis: RedisStore,
    pub shard: ShardHandle,
    pub peers: ShardPeers,
    pub every: Duration,
    pub proxy_dead_after: Duration,
    pub shard_dead_after: Duration,
    /// Set when the shard is leaving the ring (scale-down).
    pub leaving: Arc<AtomicBool>,
}

impl RingWatch {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        let mut prepared = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(e) = self.turn(&mut prepared).await {
                tracing::warn!(error = %e, "ring maintenance failed; retrying");
            }
        }
    }

    async fn turn(&self, prepared: &mut u64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let state = self.redis.ring().await?;
        let current = (!state.members.is_empty()).then(|| (state.epoch, state.members.clone()));
        self.shard.set_ring(self.me.clone(), current, state.next.as_ref().map(|n| (n.epoch, n.members.clone()))).await;
        let member = state.members.contains(&self.me);
        let leaving = self.leaving.load(Ordering::SeqCst);
        match &state.next {
            None if !member && !leaving => {
                let mut members = state.members.clone();
                members.push(self.me.clone());
                if let Some(epoch) = self.redis.propose_ring(state.epoch, &members).await? {
                    tracing::info!(shard = %self.me, epoch, "asked to join the ring");
                }
            }
            None if member && leaving => {
                let members: Vec<String> = state.members.iter().filter(|m| **m != self.me).cloned().collect();
                if members.is_empty() {
                    tracing::warn!(shard = %self.me, "the last shard cannot leave the ring");
                } else if let Some(epoch) = self.redis.propose_ring(state.epoch, &members).await? {
                    tracing::info!(shard = %self.me, epoch, "asked to leave the ring");
                }
            }
            None => {}
            Some(next) => {
                let involved = state.members.contains(&self.me) || next.members.contains(&self.me);
                if involved && *prepared != next.epoch {
                    self.prepare(next).await?;
                    self.redis.ring_ready(next.epoch, &format!("shard:{}", self.me)).await?;
                    *prepared = next.epoch;
                    tracing::info!(shard = %self.me, epoch = next.epoch, "prepared for the ring change");
                }
                self.commit_when_ready(&state, next).await?;
            }
        }
        Ok(())
    }

    /// Hands what leaves this shard to its next owners.
    async fn prepare(&self, next: &RingChange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(h) = self.shard.handover((next.epoch, next.members.clone())).await else { return Err("shard stopped".into()) };
        let (mut retained, mut subscriptions) = (0usize, 0usize);
        for (to, messages) in h.retained {
            for chunk in messages.chunks(CHUNK) {
                let messages = chunk.to_vec();
                self.peers.call(&to, |id| Request::AdoptRetained { id, messages, removed: Vec::new() }).await?;
                retained += chunk.len();
            }
        }
        for (to, items) in h.subscriptions {
            for chunk in items.chunks(CHUNK) {
                let items = chunk.to_vec();
                self.peers.call(&to, |id| Request::AdoptSubscriptions { id, items }).await?;
                subscriptions += chunk.len();
            }
        }
        if retained + subscriptions > 0 {
            tracing::info!(shard = %self.me, retained, subscriptions, "handed over to the next owners");
        }
        Ok(())
    }

    /// Commits the change once every live proxy and every live shard involved is ready;
    /// aborts it if that takes too long. Any shard may do this: the commit is one atomic step
    /// on the change's epoch.
    async fn commit_when_ready(&self, state: &RingState, next: &RingChange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let live_shards: BTreeSet<String> = self.redis.live_shards(self.shard_dead_after).await?.into_iter().map(|(n, _)| n).collect();
        let mut needed: BTreeSet<String> =
            self.redis.live_proxies(self.proxy_dead_after).await?.into_iter().map(|p| format!("proxy:{p}")).collect();
        for s in state.members.iter().chain(&next.members) {
            if live_shards.contains(s) {
                needed.insert(format!("shard:{s}"));
            }
        }
        let ready: BTreeSet<String> = self.redis.ring_ready_set(next.epoch).await?.into_iter().collect();
        let missing: Vec<&String> = needed.difference(&ready).collect();
        if missing.is_empty() {
            if self.redis.end_ring_change(next.epoch, true).await? {
                tracing::info!(epoch = next.epoch, members = ?next.members, "ring change committed");
            }
            return Ok(());
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if now.saturating_sub(next.since_secs) > PREPARE_TIMEOUT.as_secs() && self.redis.end_ring_change(next.epoch, false).await? {
            tracing::warn!(epoch = next.epoch, missing = ?missing, "ring change aborted: participants did not prepare in time");
        }
        Ok(())
    }
}

/// Sends retained changes for topics owned elsewhere to their owner, in order; retries until
/// the owner takes them.
pub async fn forward(mut rx: tokio::sync::mpsc::UnboundedReceiver<Forward>, peers: ShardPeers, shutdown: CancellationToken) {
    loop {
        let f = tokio::select! {
            f = rx.recv() => match f {
                Some(f) => f,
                None => return,
            },
            () = shutdown.cancelled() => return,
        };
        loop {
            let (messages, removed) = match &f.message {
                Some(m) => (vec![m.clone()], Vec::new()),
                None => (Vec::new(), vec![f.topic.clone()]),
            };
            match peers.call(&f.to, |id| Request::AdoptRetained { id, messages, removed }).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(to = %f.to, topic = %f.topic, error = %e, "forwarding a retained message failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}
