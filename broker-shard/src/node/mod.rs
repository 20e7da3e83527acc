//! The `mqfleet-shard` process: its disk, its link listener, its place in the cluster (heartbeats,
//! the ring: [`ring`]), its HTTP endpoint, and an orderly stop.

mod admin;
mod peers;
mod ring;
mod slow_disk;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use session_store::{EmbeddedConfig, EmbeddedStore, RedisLatency, RedisStore, Store};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::link::server::{serve, ServerConfig};
use crate::restore::Restored;
use crate::{spawn_clustered, Clustered, ShardConfig, ShardMetrics};

/// Why the shard could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("shard store in {dir}: {source}")]
    Store { dir: PathBuf, source: session_store::Error },
    #[error("log id file {path}: {source}")]
    LogId { path: PathBuf, source: std::io::Error },
    #[error("sessions' store (Redis): {0}")]
    Redis(session_store::Error),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// A running shard.
pub struct Node {
    /// Where proxies link (port 0 resolved).
    pub link_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub name: String,
    shutdown: CancellationToken,
    peers_stop: CancellationToken,
    tracker: TaskTracker,
    ready: Arc<AtomicBool>,
    router: JoinHandle<()>,
    local: EmbeddedStore,
    grace: Duration,
    leave: Arc<Leave>,
    leave_on_shutdown: bool,
}

/// Leaving the ring (scale-down): on SIGTERM with `leave_on_shutdown`, or by the admin API.
pub(crate) struct Leave {
    name: String,
    redis: RedisStore,
    /// Read by the ring watch: while set, it asks the ring to drop this shard, never to add it.
    leaving: Arc<AtomicBool>,
    metrics: ShardMetrics,
    heartbeat: Duration,
    state: parking_lot::Mutex<LeaveState>,
}

/// Where a shard stands with respect to the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveState {
    Serving,
    Leaving,
    /// Out of the ring, everything handed over: safe to stop.
    Left,
    /// The last shard of the ring cannot leave it, or the ring change did not commit in time.
    Failed,
}

/// Opens the disk, restores the shard, joins the cluster, listens.
pub async fn start(settings: Settings) -> Result<Node, StartError> {
    let metrics = ShardMetrics::default();
    let metrics_view = metrics.clone();
    let mut prometheus = prometheus_client::registry::Registry::default();
    metrics.register(&mut prometheus);
    let dir = settings.data_dir.clone();
    let mut store_config = EmbeddedConfig::new(&dir);
    store_config.sync = settings.fsync;
    store_config.commit_latency = Some(metrics.commit_latency.clone());
    if !settings.raw.fault_slow_disk_file.is_empty() {
        store_config.commit_delay = Some(slow_disk::follow(settings.raw.fault_slow_disk_file.clone().into()));
    }
    let local = EmbeddedStore::open(store_config).map_err(|source| StartError::Store { dir: dir.clone(), source })?;
    let log_id = log_id(&dir)?;
    // The session queue holds the in-flight window too (see the proxy's `Limits::session_queue_capacity`).
    let capacity = settings.raw.max_queued_messages.saturating_add(u32::from(settings.raw.max_inflight));
    let mut redis = RedisStore::connect(settings.store.clone(), capacity, settings.redis_timeout).await.map_err(StartError::Redis)?;
    redis.observe_latency(RedisLatency::new(&metrics.redis_latency));
    redis.count_cluster_replacements(metrics.redis_cluster_replaced.clone());
    let restored = Restored::load(&local).await.map_err(|source| StartError::Store { dir: dir.clone(), source })?;
    let expected = match redis.live_proxies(settings.proxy_dead_after).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list live proxies; not waiting for any");
            Vec::new()
        }
    };
    tracing::info!(
        shard = %settings.name,
        dir = %dir.display(),
        retained = restored.retained.len(),
        subscriptions = restored.subscriptions.len(),
        log_entries = restored.log.len(),
        expected_proxies = expected.len(),
        "shard store opened"
    );

    let mut config = ShardConfig::new(settings.name.clone());
    config.queue_qos0_offline = settings.raw.queue_qos0_offline;
    config.max_retained_messages = settings.raw.max_retained_messages;
    config.max_retained_bytes = settings.raw.max_retained_bytes;
    config.resync_wait = settings.resync_wait;
    config.proxy_grace = settings.proxy_grace;
    config.log_id = log_id;
    let (forward_tx, forward_rx) = tokio::sync::mpsc::unbounded_channel();
    let clustered = Clustered {
        sessions: Store::Redis(redis.clone()),
        local: Store::Embedded(local.clone()),
        restored,
        expected_proxies: expected,
        forward: Some(forward_tx),
    };
    let (handle, router) = spawn_clustered(config, clustered, metrics);

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Hand-overs outlive the drain of links (a peer may be mid-hand-over); they end with the
    // process.
    let peers_stop = CancellationToken::new();
    let peers = peers::ShardPeers::new(settings.name.clone(), redis.clone(), peers_stop.clone());
    let bind = |what, addr| async move {
        let l = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what, addr, source })?;
        let bound = l.local_addr().map_err(|source| StartError::Bind { what, addr, source })?;
        Ok::<_, StartError>((l, bound))
    };
    let (listener, link_addr) = bind("link", settings.link).await?;
    tracing::info!(address = %link_addr, "link listener bound");
    let mut server = ServerConfig::new(settings.name.clone());
    server.log_id = log_id;
    tracker.spawn(serve(listener, handle.clone(), server, Arc::new(AtomicU64::new(0)), shutdown.clone()));

    let advertise = settings.advertise.clone().unwrap_or_else(|| link_addr.to_string());
    redis.shard_beat(&settings.name, &advertise).await.map_err(StartError::Redis)?;
    tracker.spawn(heartbeat(redis.clone(), settings.name.clone(), advertise.clone(), settings.heartbeat, shutdown.clone()));
    let leaving = Arc::new(AtomicBool::new(false));
    let watch = ring::RingWatch {
        me: settings.name.clone(),
        redis: redis.clone(),
        shard: handle,
        peers: peers.clone(),
        every: settings.heartbeat,
        proxy_dead_after: settings.proxy_dead_after,
        shard_dead_after: settings.proxy_dead_after,
        leaving: leaving.clone(),
    };
    tracker.spawn(watch.run(shutdown.clone()));
    tokio::spawn(ring::forward(forward_rx, peers, peers_stop.clone()));

    let leave = Arc::new(Leave {
        name: settings.name.clone(),
        redis,
        leaving,
        metrics: metrics_view,
        heartbeat: settings.heartbeat,
        state: parking_lot::Mutex::new(LeaveState::Serving),
    });
    let ready = Arc::new(AtomicBool::new(false));
    let http_addr = match settings.http {
        Some(addr) => {
            let (l, bound) = bind("http", addr).await?;
            tracing::info!(address = %bound, "HTTP listener bound");
            let state = mqfleet_ops::http::HttpState { ready: ready.clone(), prometheus: Arc::new(prometheus) };
            let api =
                admin::router(admin::AdminState { leave: leave.clone(), ready: ready.clone(), link_addr, advertise: advertise.clone() });
            tracker.spawn(mqfleet_ops::http::serve(l, state, api, settings.admin_token.clone(), shutdown.clone()));
            Some(bound)
        }
        None => None,
    };
    ready.store(true, Ordering::SeqCst);
    Ok(Node {
        link_addr,
        http_addr,
        name: settings.name,
        shutdown,
        peers_stop,
        tracker,
        ready,
        router,
        local,
        grace: settings.shutdown_grace,
        leave,
        leave_on_shutdown: settings.raw.leave_on_shutdown,
    })
}

impl Node {
    /// Stops taking links, lets the router finish what it accepted, makes the disk durable.
    /// The shard stays in the cluster's membership: a restart (rolling upgrade) keeps its
    /// topics. Returns false if the grace period ran out first.
    pub async fn shutdown(self) -> bool {
        self.ready.store(false, Ordering::SeqCst);
        if self.leave_on_shutdown && self.leave.state() != LeaveState::Left {
            self.leave.run().await;
        }
        self.shutdown.cancel();
        self.tracker.close();
        let finished = tokio::time::timeout(self.grace, async {
            self.tracker.wait().await;
            // The router stops once the last link let go of it, after its pipeline drained.
            let _ = self.router.await;
        })
        .await
        .is_ok();
        if !finished {
            tracing::warn!(grace = ?self.grace, "grace period over with work in flight; the log replays it at the next start");
        }
        if self.leave.state() == LeaveState::Left {
            // After the heartbeats stopped, so nothing registers it again.
            if let Err(e) = self.leave.redis.shard_leave(&self.name).await {
                tracing::warn!(error = %e, "could not deregister");
            }
        }
        self.peers_stop.cancel();
        if let Err(e) = self.local.flush().await {
            tracing::error!(error = %e, "final flush of the shard store failed");
        }
        finished
    }
}

impl Leave {
    pub(crate) fn state(&self) -> LeaveState {
        *self.state.lock()
    }

    /// Scale-down: asks the ring to drop this shard, waits until the change is committed (the
    /// ring watch hands everything over meanwhile), then until the proxies have switched and
    /// every message this shard accepted is delivered or queued.
    pub(crate) async fn run(&self) -> LeaveState {
        self.leaving.store(true, Ordering::SeqCst);
        *self.state.lock() = LeaveState::Leaving;
        tracing::info!(shard = %self.name, "leaving the ring");
        let left = async {
            loop {
                match self.redis.ring().await {
                    Ok(r) if !r.members.contains(&self.name) && r.next.is_none() => break,
                    Ok(r) if r.members == [self.name.clone()] => {
                        tracing::warn!("the last shard of the ring stays in it");
                        return false;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot read the ring; retrying"),
                }
                tokio::time::sleep(self.heartbeat).await;
            }
            // Proxies switch within a heartbeat of the commit, after draining this shard.
            tokio::time::sleep(self.heartbeat * 3).await;
            while self.metrics.log_entries.get() > 0 {
                tokio::time::sleep(self.heartbeat).await;
            }
            true
        };
        let outcome = match tokio::time::timeout(LEAVE_TIMEOUT, left).await {
            Ok(true) => {
                tracing::info!(shard = %self.name, "left the ring");
                LeaveState::Left
            }
            Ok(false) => LeaveState::Failed,
            Err(_) => {
                tracing::warn!(shard = %self.name, timeout = ?LEAVE_TIMEOUT, "could not leave the ring in time; stopping as a member");
                LeaveState::Failed
            }
        };
        if outcome == LeaveState::Failed {
            // Back to serving: the watch must not keep proposing a change that cannot happen.
            self.leaving.store(false, Ordering::SeqCst);
        }
        *self.state.lock() = outcome;
        outcome
    }

    /// Undoes a leave (admin API): the ring watch asks for this shard to be added back.
    pub(crate) fn rejoin(&self) {
        self.leaving.store(false, Ordering::SeqCst);
        *self.state.lock() = LeaveState::Serving;
    }
}

/// Longest wait for a ring change that removes this shard.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Tells Redis this shard is alive (and where), every `every`.
async fn heartbeat(redis: RedisStore, name: String, addr: String, every: Duration, shutdown: CancellationToken) {
    let beat = || {
        let (redis, name, addr) = (redis.clone(), name.clone(), addr.clone());
        Some(async move { redis.shard_beat(&name, &addr).await })
    };
    mqfleet_ops::outage::repeat(every, shutdown, "heartbeats reach Redis again", "cannot send heartbeats to Redis; retrying", beat).await;
}

/// The identity of this shard's log, kept next to it: a new disk gets a new id, and proxies
/// then stop comparing positions with the old log's.
pub fn log_id(dir: &Path) -> Result<u64, StartError> {
    let path = dir.join("log-id");
    let err = |source| StartError::LogId { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map_err(|_| err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{s:?} is not a number")))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Fresh for every new log, also within one process (tests start several).
            let id = crate::link::tcp::unique_now() | 1;
            let tmp = dir.join("log-id.tmp");
            std::fs::write(&tmp, id.to_string()).map_err(err)?;
            std::fs::rename(&tmp, &path).map_err(err)?;
            Ok(id)
        }
        Err(e) => Err(err(e)),
    }
}
