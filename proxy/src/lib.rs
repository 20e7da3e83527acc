//! The device-facing tier of mqfleet, and — run with in-process shards — the single-node broker.
//!
//! # Layout
//! - [`config`]: settings from defaults, file, environment and flags.
//! - [`server`]: accept loops (connection limit, spawn) and graceful drain.
//! - [`connection`]: one task per connection; [`session`]: the MQTT logic it drives, without I/O.
//! - [`registry`]: which connection owns which client id; mailboxes for deliveries.
//! - [`routing`] and [`shards`]: the consistent-hash ring and the links to the shards.
//! - [`lifecycle`]: delayed wills and session expiry for sessions without a connection.
//! - [`admin`]: `/livez`, `/readyz`, `/metrics`.
//!
//! # Path of a PUBLISH
//! The connection decodes it, resolves its topic alias and checks it, then sends it over the link
//! to the shard owning its topic (`routing`). For QoS 1/2 it waits — without blocking other
//! packets — for the shard's reply, which comes once the message is durable, and only then
//! sends PUBACK/PUBREC. The shard fans the message out; deliveries for this proxy come back on
//! the link as one batch per message, and the dispatcher puts each into its connection's mailbox.
//!
//! Start reading at [`start`].

pub mod admin;
pub mod config;
pub mod connection;
pub mod lifecycle;
pub mod metrics;
pub mod registry;
pub mod routing;
pub mod server;
pub mod session;
pub mod shards;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use broker_shard::link::client::Client;
use broker_shard::link::{ProxyId, Request, SessionInfo, SubscribeItem};
use broker_shard::{now_ms, Message, ShardConfig, ShardMetrics};
use mqfleet_codec::{ByteString, QoS, RetainHandling, SubscriptionOptions};
use session_store::{EmbeddedConfig, EmbeddedStore, Op, SessionRecord, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Settings, StoreSpec};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::routing::{Ring, ShardSet};
use crate::session::Limits;
use crate::shards::{Dispatcher, Shards};

/// Everything connections share.
pub struct Context {
    pub settings: Settings,
    pub limits: Limits,
    pub store: Store,
    pub shards: Shards,
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    pub lifecycle: Lifecycle,
}

impl Context {
    /// The shards holding subscriptions with these filters.
    pub fn shard_set<'a>(&self, filters: impl Iterator<Item = &'a ByteString>) -> ShardSet {
        let mut one = None;
        for f in filters {
            let inner = match mqfleet_codec::topic::parse_shared(f) {
                Ok(Some(s)) => s.filter,
                _ => f,
            };
            match (self.shards.ring().shards_for_filter(inner), one) {
                (ShardSet::All, _) => return ShardSet::All,
                (ShardSet::One(i), None) => one = Some(i),
                (ShardSet::One(i), Some(j)) if i != j => return ShardSet::All,
                _ => {}
            }
        }
        one.map_or(ShardSet::All, ShardSet::One)
    }
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("session store: {0}")]
    Store(#[from] session_store::Error),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("shards: {0}")]
    Link(#[from] broker_shard::link::LinkError),
}

/// A running broker.
pub struct Broker {
    /// Where MQTT clients connect (the bound address: port 0 resolved).
    pub mqtt_addr: SocketAddr,
    /// Where `/livez`, `/readyz`, `/metrics` are served, if enabled.
    pub http_addr: Option<SocketAddr>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    ready: Arc<AtomicBool>,
}

/// Starts the broker: opens the store, starts the shards with their retained messages,
/// restores persistent sessions, then listens.
pub async fn start(settings: Settings) -> Result<Broker, StartError> {
    let limits = Limits::from_settings(&settings);
    let StoreSpec::Embedded(dir) = &settings.store;
    let mut store_config = EmbeddedConfig::new(dir);
    store_config.sync = settings.store_sync;
    store_config.max_queue_len = limits.max_queued_messages;
    let store = Store::Embedded(EmbeddedStore::open(store_config)?);
    tracing::info!(dir = %dir.display(), "session store opened");

    let shard_metrics = ShardMetrics::default();
    let metrics = Metrics::default();
    let mut prometheus = prometheus_client::registry::Registry::default();
    metrics.register(&mut prometheus);
    shard_metrics.register(&mut prometheus);

    // Shards, each with the retained messages of the topics it owns.
    let names: Vec<String> = (0..settings.shards).map(|i| format!("shard-{i}")).collect();
    let ring = Ring::new(&names);
    let mut retained: Vec<Vec<Arc<Message>>> = vec![Vec::new(); names.len()];
    let now = now_ms();
    for r in store.retained().await? {
        match Message::decode(&r.message) {
            Ok(m) if !m.is_expired(now) => retained[ring.owner(&r.topic)].push(Arc::new(m)),
            Ok(_) => {}
            Err(e) => tracing::error!(topic = %r.topic, error = %e, "unreadable retained message skipped"),
        }
    }
    let registry = Arc::new(Registry::default());
    let sink = Arc::new(Dispatcher { registry: registry.clone(), metrics: metrics.clone() });
    let mut links = Vec::with_capacity(names.len());
    for (name, retained) in names.iter().zip(retained) {
        let mut config = ShardConfig::new(name.clone());
        config.queue_qos0_offline = settings.raw.queue_qos0_offline;
        let (handle, _task) = broker_shard::spawn(config, store.clone(), retained, shard_metrics.clone());
        links.push(Client::connect_local(&handle, ProxyId(0), sink.clone()).await?);
    }

    let (lifecycle, lifecycle_task) = Lifecycle::new();
    let ctx =
        Arc::new(Context { settings: settings.clone(), limits, store, shards: Shards::new(links, ring), registry, metrics, lifecycle });
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(lifecycle_task.run(Arc::downgrade(&ctx), shutdown.clone()));

    restore_sessions(&ctx).await?;

    let listener =
        TcpListener::bind(settings.mqtt).await.map_err(|source| StartError::Bind { what: "mqtt", addr: settings.mqtt, source })?;
    let mqtt_addr = listener.local_addr().map_err(|source| StartError::Bind { what: "mqtt", addr: settings.mqtt, source })?;
    tracing::info!(address = %mqtt_addr, "MQTT listener bound");
    tracker.spawn(server::accept_loop(listener, ctx.clone(), shutdown.clone(), tracker.clone()));

    let ready = Arc::new(AtomicBool::new(false));
    let http_addr = match settings.http {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what: "http", addr, source })?;
            let bound = l.local_addr().map_err(|source| StartError::Bind { what: "http", addr, source })?;
            tracing::info!(address = %bound, "HTTP listener bound");
            let state = admin::AdminState { ready: ready.clone(), prometheus: Arc::new(prometheus) };
            tracker.spawn(admin::serve(l, state, shutdown.clone()));
            Some(bound)
        }
        None => None,
    };
    ready.store(true, Ordering::SeqCst);
    Ok(Broker { mqtt_addr, http_addr, ctx, shutdown, tracker, ready })
}

impl Broker {
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// `/readyz` answers 503 from now on, so load balancers stop sending new clients here.
    pub fn mark_unready(&self) {
        self.ready.store(false, Ordering::SeqCst);
    }

    /// Graceful drain: stop accepting, tell every client (5.0: DISCONNECT 0x8B), save every
    /// session, then make the store durable. Returns false if connections were still open when
    /// the grace period ran out.
    pub async fn shutdown(self) -> bool {
        self.mark_unready();
        self.shutdown.cancel();
        self.tracker.close();
        let grace = self.ctx.settings.shutdown_grace;
        let drained = tokio::time::timeout(grace, self.tracker.wait()).await.is_ok();
        if drained {
            tracing::info!("all connections closed and sessions saved");
        } else {
            tracing::warn!(grace = ?grace, open = self.ctx.registry.len(), "grace period over with connections still open");
        }
        if let Err(e) = self.ctx.store.flush().await {
            tracing::error!(error = %e, "final flush of the session store failed");
        }
        self.ctx.shards.close().await;
        drained
    }
}

/// Rebuilds what lives only in memory from the stored sessions: their subscriptions on the
/// shards, their pending wills (including wills of clients that were connected when the
/// process died: their connection is lost, so their will is due) and their expiry.
async fn restore_sessions(ctx: &Arc<Context>) -> Result<(), StartError> {
    let now = now_ms();
    let sessions = ctx.store.sessions().await?;
    let (mut restored, mut expired, mut crashed) = (0usize, 0usize, 0usize);
    for mut record in sessions {
        let client_id: ByteString = record.client_id.as_str().into();
        let will = record.will.as_ref().and_then(lifecycle::will_from_store);
        if record.connected {
            crashed += 1;
            record.connected = false;
            record.disconnected_at_ms = now;
            ctx.store.write(vec![Op::PutSession(record.clone())]).await?;
        }
        if record.expires_at_ms().is_some_and(|t| t <= now) {
            if let Some(w) = will {
                ctx.publish_will(w).await;
            }
            ctx.store.write(vec![Op::RemoveSession { client_id: record.client_id.clone() }]).await?;
            expired += 1;
            continue;
        }
        ctx.metrics.persistent_sessions.inc();
        restore_subscriptions(ctx, &client_id, &record).await?;
        if let Some(w) = will {
            let due = record.disconnected_at_ms + u64::from(w.delay_interval.min(record.expiry_interval)) * 1000;
            let after = std::time::Duration::from_millis(due.saturating_sub(now));
            ctx.lifecycle.schedule_will(&client_id, w, after, true);
        }
        if let Some(at) = record.expires_at_ms() {
            ctx.lifecycle.schedule_expiry(&client_id, at);
        }
        restored += 1;
    }
    if restored + expired > 0 {
        tracing::info!(restored, expired, connected_at_crash = crashed, "persistent sessions restored");
    }
    Ok(())
}

async fn restore_subscriptions(ctx: &Context, client_id: &ByteString, record: &SessionRecord) -> Result<(), StartError> {
    let mut per_shard: HashMap<usize, Vec<SubscribeItem>> = HashMap::new();
    for s in &record.subscriptions {
        let filter: ByteString = s.filter.as_str().into();
        let set = ctx.shard_set(std::iter::once(&filter));
        let options = SubscriptionOptions {
            qos: QoS::from_u8(s.qos).unwrap_or(QoS::AtMostOnce),
            no_local: s.no_local,
            retain_as_published: s.retain_as_published,
            retain_handling: match s.retain_handling {
                1 => RetainHandling::OnNewSubscription,
                2 => RetainHandling::Never,
                _ => RetainHandling::OnSubscribe,
            },
        };
        for i in ctx.shards.indices(set) {
            per_shard.entry(i).or_default().push(SubscribeItem { filter: filter.clone(), options, id: s.subscription_id });
        }
    }
    let session = SessionInfo { client_id: client_id.clone(), conn: None, persistent: true };
    for (i, items) in per_shard {
        let session = session.clone();
        ctx.shards.link(i).call(|id| Request::Subscribe { id, session, items, deliver_retained: false }).await?;
    }
    Ok(())
}
