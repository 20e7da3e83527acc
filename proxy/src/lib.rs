//! The device-facing tier of mqfleet, and — run with in-process shards — the single-node broker.
//!
//! # Layout
//! - [`config`]: settings from defaults, file, environment and flags.
//! - [`server`]: accept loops (connection limit, spawn) and graceful drain; [`tls`],
//!   [`websocket`], [`proxy_protocol`]: what listeners speak below MQTT; [`reload`]: TLS,
//!   password and ACL files followed while running.
//! - [`admission`]: limits by source address, listener and client rate; [`auth`]:
//!   authentication chain and ACLs.
//! - [`connection`]: one task per connection; [`session`]: the MQTT logic it drives, without I/O.
//! - [`registry`]: which connection owns which client id; mailboxes for deliveries.
//! - [`shards`]: the links to the shards and the consistent-hash ring (`broker_shard::ring`) that chooses among them.
//! - [`lifecycle`]: delayed wills and session expiry for sessions without a connection (single
//!   node; in a cluster Redis keeps both, see [`cluster`]).
//! - [`cluster`]: heartbeats, takeover notices, dead proxies, delayed wills, link resync.
//! - HTTP `/livez`, `/readyz`, `/metrics`: `mqfleet_ops::http`; the admin API under
//!   `/api/v1`: [`admin`]; [`metrics`]; `$SYS` topics: [`sys`].
//!
//! # Two deployments, one code path
//! Single node: the embedded store and shards in this process, over in-process links.
//! Cluster: sessions in Redis, shards in `mqfleet-shard` processes over TCP links. Connections
//! do not know which: they talk to a [`Store`] and to links.
//!
//! # Path of a PUBLISH
//! The connection decodes it, resolves its topic alias and checks it, then sends it over the link
//! to the shard owning its topic (`broker_shard::ring`). For QoS 1/2 it waits — without blocking other
//! packets — for the shard's reply, which comes once the message is durable, and only then
//! sends PUBACK/PUBREC. The shard fans the message out; deliveries for this proxy come back on
//! the link as one batch per message, and the dispatcher puts each into its connection's mailbox.
//!
//! Start reading at [`start`].

pub mod admin;
pub mod admission;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod lifecycle;
pub mod mailbox;
pub mod metrics;
pub mod proxy_protocol;
pub mod registry;
pub mod reload;
pub mod server;
pub mod session;
pub mod shards;
pub mod sys;
pub mod tls;
pub mod websocket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker_shard::link::client::{Client, DeliverySink};
use broker_shard::link::{ProxyId, Request, SessionInfo, SubscribeItem};
use broker_shard::{now_ms, Message, ShardConfig, ShardMetrics};
use mqfleet_codec::{ByteString, QoS, RetainHandling, SubscriptionOptions};
use session_store::{EmbeddedConfig, EmbeddedStore, Op, RedisLatency, RedisStore, RedisTarget, SessionRecord, Store, StoredSubscription};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{Cluster, LinkState};
use crate::config::{Settings, ShardSpec, StoreSpec};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::server::Transport;
use crate::session::Limits;
use crate::shards::{Dispatcher, Shards, Topology};
use broker_shard::ring::Ring;

/// Everything connections share.
pub struct Context {
    pub settings: Settings,
    pub limits: Limits,
    pub store: Store,
    pub shards: Shards,
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    pub lifecycle: Lifecycle,
    /// Connection limits by source address and rate.
    pub admission: Arc<admission::Admission>,
    /// Draining: new CONNECTs are sent elsewhere (0x9C), connected clients are moved off.
    pub draining: AtomicBool,
    /// What `/readyz` answers.
    pub ready: Arc<AtomicBool>,
    /// Unix ms at start.
    pub started_at_ms: u64,
    /// Set when the proxy is part of a cluster.
    pub cluster: Option<Cluster>,
    /// Work a graceful shutdown waits for: connections, and wills being published after
    /// their connection ended.
    pub tasks: TaskTracker,
}

impl Context {
    /// This proxy's name: its cluster id, or `local` for a single node.
    pub fn name(&self) -> &str {
        self.cluster.as_ref().map_or("local", |c| c.id.as_str())
    }

    /// Moves clients off this proxy: `/readyz` fails, new CONNECTs are refused with 0x9C Use
    /// another server (with `server_reference`), and connected clients are disconnected the
    /// same way at `drain_rate` per second, each session saved as it goes (in a cluster the
    /// clients resume on other proxies). Returns when all are gone, `within` has passed, or
    /// the drain was cancelled ([`Context::undrain`]).
    pub async fn drain(&self, within: Duration) {
        self.ready.store(false, Ordering::SeqCst);
        self.draining.store(true, Ordering::SeqCst);
        let rate = f64::from(self.settings.raw.drain_rate.max(1));
        let deadline = tokio::time::Instant::now() + within;
        let mailboxes = self.registry.all();
        tracing::info!(clients = mailboxes.len(), rate, "draining: moving clients to other proxies");
        let started = tokio::time::Instant::now();
        for (i, mailbox) in mailboxes.into_iter().enumerate() {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            if due >= deadline {
                break;
            }
            tokio::time::sleep_until(due).await;
            if !self.draining.load(Ordering::SeqCst) {
                tracing::info!("drain cancelled");
                return;
            }
            let _ = mailbox.send(registry::ConnMsg::Close(mqfleet_codec::ReasonCode::UseAnotherServer));
        }
        while !self.registry.is_empty() && tokio::time::Instant::now() < deadline && self.draining.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends a drain started by the admin API: CONNECTs are welcome again, `/readyz` passes.
    pub fn undrain(&self) {
        self.draining.store(false, Ordering::SeqCst);
        self.ready.store(true, Ordering::SeqCst);
    }

    /// The Server Reference draining clients are given, if configured.
    pub fn server_reference(&self) -> Option<ByteString> {
        Some(self.settings.raw.server_reference.as_str()).filter(|r| !r.is_empty()).map(ByteString::from)
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
    #[error("no shard registered in Redis within {0:?} (shards = discover): start mqfleet-shard processes with the same store")]
    NoShards(Duration),
}

/// A running broker.
pub struct Broker {
    /// Where MQTT clients connect (the bound address: port 0 resolved).
    pub mqtt_addr: SocketAddr,
    /// Where MQTT over TLS clients connect, if configured.
    pub mqtts_addr: Option<SocketAddr>,
    /// Where MQTT over WebSocket (plain, secure) clients connect, if configured.
    pub ws_addr: Option<SocketAddr>,
    pub wss_addr: Option<SocketAddr>,
    /// Where `/livez`, `/readyz`, `/metrics` are served, if enabled.
    pub http_addr: Option<SocketAddr>,
    ctx: Arc<Context>,
    /// Ends the listeners and connections (drain).
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Ends what must outlive the drain: shard links, cluster heartbeats.
    background: CancellationToken,
}

/// Starts the broker: opens the store, reaches the shards, restores what needs restoring,
/// then listens.
pub async fn start(settings: Settings) -> Result<Broker, StartError> {
    let limits = Limits::from_settings(&settings);
    let shard_metrics = ShardMetrics::default();
    let metrics = Metrics::default();
    let mut prometheus = prometheus_client::registry::Registry::default();
    metrics.register(&mut prometheus);
    shard_metrics.register(&mut prometheus);

    // Bound first: the cluster name of this proxy may include the port.
    let listener =
        TcpListener::bind(settings.mqtt).await.map_err(|source| StartError::Bind { what: "mqtt", addr: settings.mqtt, source })?;
    let mqtt_addr = listener.local_addr().map_err(|source| StartError::Bind { what: "mqtt", addr: settings.mqtt, source })?;
    let mut extra_listeners = Vec::new();
    let listeners = [
        ("mqtts", settings.mqtts.as_ref().map(|(a, c)| (*a, Transport::Tls(c.clone())))),
        ("ws", settings.ws.map(|a| (a, Transport::WebSocket))),
        ("wss", settings.wss.as_ref().map(|(a, c)| (*a, Transport::SecureWebSocket(c.clone())))),
    ];
    for (what, listener) in listeners {
        if let Some((addr, transport)) = listener {
            let l = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what, addr, source })?;
            let bound = l.local_addr().map_err(|source| StartError::Bind { what, addr, source })?;
            extra_listeners.push((what, l, bound, transport));
        }
    }
    let registry = Arc::new(Registry::default());
    let sink: Arc<dyn DeliverySink> = Arc::new(Dispatcher { registry: registry.clone(), metrics: metrics.clone() });
    let background = CancellationToken::new();
    let (store, topology, cluster, link_states) = match &settings.store {
        StoreSpec::Embedded(dir) => {
            let (store, topology) = single_node(&settings, &limits, dir, &sink, &shard_metrics, &metrics).await?;
            (store, topology, None, Vec::new())
        }
        StoreSpec::Redis(target) => {
            let id = settings.proxy_id(mqtt_addr.port());
            let (cluster, topology, states) = join_cluster(&settings, &limits, target, id, &sink, &background, &metrics).await?;
            (Store::Redis(cluster.redis.clone()), topology, Some(cluster), states)
        }
    };

    let (lifecycle, lifecycle_task) = Lifecycle::new();
    let ctx = Arc::new(Context {
        settings: settings.clone(),
        limits,
        store,
        shards: Shards::new(topology, matches!(settings.shards, ShardSpec::Discover)),
        registry,
        metrics,
        lifecycle,
        draining: AtomicBool::new(false),
        ready: Arc::new(AtomicBool::new(false)),
        started_at_ms: now_ms(),
        admission: Arc::new(admission::Admission::new(
            settings.raw.max_connections_per_ip,
            f64::from(settings.raw.max_connect_rate_per_ip),
            f64::from(settings.raw.max_connect_rate),
        )),
        cluster,
        tasks: TaskTracker::new(),
    });
    for s in &link_states {
        s.attach(&ctx);
    }
    let shutdown = CancellationToken::new();
    let tracker = ctx.tasks.clone();
    tracker.spawn(lifecycle_task.run(Arc::downgrade(&ctx), shutdown.clone()));
    tokio::spawn(metrics::sample(Arc::downgrade(&ctx), background.clone()));
    if ctx.settings.raw.sys_interval_ms > 0 {
        let every = Duration::from_millis(ctx.settings.raw.sys_interval_ms);
        tokio::spawn(sys::publish_every(Arc::downgrade(&ctx), every, shutdown.clone()));
    }
    let tls_poll = (settings.raw.tls_reload_ms > 0).then(|| Duration::from_millis(settings.raw.tls_reload_ms));
    tokio::spawn(reload::watch(Arc::downgrade(&ctx), tls_poll, background.clone()));
    let backends = ctx.settings.auth.backends();
    if backends.is_empty() && !ctx.settings.auth.allows_anonymous() {
        tracing::warn!("a listener is not on loopback and no authentication backend is configured: every client will be refused; set password_file, jwt_*, tls_identity, or allow_anonymous = true");
    } else {
        tracing::info!(?backends, anonymous = ctx.settings.auth.allows_anonymous(), "authentication");
    }
    if let Some(c) = &ctx.cluster {
        ctx.settings.auth.attach_redis(c.redis.clone());
        if let Err(e) = ctx.settings.auth.reload_redis_acl().await {
            tracing::error!(error = %e, "the ACL in Redis is not usable; keeping the configured one");
        }
    }
    match &ctx.cluster {
        None => restore_sessions(&ctx).await?,
        Some(c) => {
            cluster::settle_previous_run(&ctx).await?;
            c.redis.proxy_beat(&c.id).await?;
            Cluster::spawn(&ctx, &background);
            tracing::info!(proxy = %c.id, shards = ctx.shards.now().len(), "joined the cluster");
        }
    }

    // One connection budget for every listener.
    let permits = Arc::new(tokio::sync::Semaphore::new(ctx.settings.raw.max_connections));
    let bound_at = |name: &str| extra_listeners.iter().find(|l| l.0 == name).map(|l| l.2);
    let (mqtts_addr, ws_addr, wss_addr) = (bound_at("mqtts"), bound_at("ws"), bound_at("wss"));
    for (name, l, bound, transport) in std::iter::once(("mqtt", listener, mqtt_addr, Transport::Tcp)).chain(extra_listeners) {
        let proxy = ctx.settings.proxy_protocol.as_ref().filter(|(names, _)| names.iter().any(|n| n == name)).map(|(_, t)| t.clone());
        tracing::info!(address = %bound, proxy_protocol = proxy.is_some(), "{} listener bound", transport.name());
        let accept = server::Accept { name, transport, proxy_protocol: proxy, permits: permits.clone() };
        tracker.spawn(server::accept_loop(l, accept, ctx.clone(), shutdown.clone(), tracker.clone()));
    }

    let ready = ctx.ready.clone();
    let http_addr = match settings.http {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what: "http", addr, source })?;
            let bound = l.local_addr().map_err(|source| StartError::Bind { what: "http", addr, source })?;
            tracing::info!(address = %bound, "HTTP listener bound");
            let state = mqfleet_ops::http::HttpState { ready: ready.clone(), prometheus: Arc::new(prometheus) };
            // Outlives the drain: /readyz answers 503 while connections close.
            let api = admin::router(ctx.clone());
            tokio::spawn(mqfleet_ops::http::serve(l, state, api, settings.admin_token.clone(), background.clone()));
            Some(bound)
        }
        None => None,
    };
    ready.store(true, Ordering::SeqCst);
    Ok(Broker { mqtt_addr, mqtts_addr, ws_addr, wss_addr, http_addr, ctx, shutdown, tracker, background })
}

/// The embedded store and in-process shards, each with the retained messages it owns.
async fn single_node(
    settings: &Settings,
    limits: &Limits,
    dir: &std::path::Path,
    sink: &Arc<dyn DeliverySink>,
    shard_metrics: &ShardMetrics,
    metrics: &Metrics,
) -> Result<(Store, Topology), StartError> {
    let mut store_config = EmbeddedConfig::new(dir);
    store_config.sync = settings.store_sync;
    store_config.max_queue_len = limits.session_queue_capacity();
    store_config.commit_latency = Some(shard_metrics.commit_latency.clone());
    store_config.queued = Some(metrics.stored_queued.clone());
    let store = Store::Embedded(EmbeddedStore::open(store_config)?);
    tracing::info!(dir = %dir.display(), "session store opened");

    let ShardSpec::Local(n) = settings.shards else { unreachable!("validated: the embedded store runs local shards") };
    let names: Vec<String> = (0..n).map(|i| format!("shard-{i}")).collect();
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
    let mut links = Vec::with_capacity(names.len());
    for (name, retained) in names.iter().zip(retained) {
        let mut config = ShardConfig::new(name.clone());
        config.queue_qos0_offline = settings.raw.queue_qos0_offline;
        config.max_retained_messages = settings.raw.max_retained_messages;
        config.max_retained_bytes = settings.raw.max_retained_bytes;
        let (handle, _task) = broker_shard::spawn(config, store.clone(), retained, shard_metrics.clone());
        links.push(Client::connect_local(&handle, ProxyId(0), sink.clone()).await?);
    }
    Ok((store, Topology::new(names, links, 0)))
}

/// How long a proxy with `shards = discover` waits for the ring to have a first shard.
const FIRST_SHARD_WAIT: Duration = Duration::from_secs(60);

/// Redis and links to the shard processes.
async fn join_cluster(
    settings: &Settings,
    limits: &Limits,
    target: &RedisTarget,
    id: String,
    sink: &Arc<dyn DeliverySink>,
    background: &CancellationToken,
    metrics: &Metrics,
) -> Result<(Cluster, Topology, Vec<Arc<LinkState>>), StartError> {
    let mut redis = RedisStore::connect(target.clone(), limits.session_queue_capacity(), settings.redis_timeout).await?;
    redis.observe_latency(RedisLatency::new(&metrics.redis_latency));
    redis.count_cluster_replacements(metrics.redis_cluster_replaced.clone());
    let dynamic = matches!(settings.shards, ShardSpec::Discover);
    let (shards, epoch): (Vec<(String, String)>, u64) = match &settings.shards {
        ShardSpec::Static(addrs) => (addrs.iter().map(|a| (a.clone(), a.clone())).collect(), 0),
        ShardSpec::Discover => ring_members(&redis).await?,
        ShardSpec::Local(_) => unreachable!("validated: Redis goes with shard processes"),
    };
    let mut keys = Vec::with_capacity(shards.len());
    let mut links = Vec::with_capacity(shards.len());
    let mut states = Vec::with_capacity(shards.len());
    for (key, addr) in shards {
        let (link, state) = cluster::shard_link(&id, &key, &addr, sink, background);
        keys.push(key);
        links.push(link);
        states.push(state);
    }
    let cluster = Cluster {
        id,
        redis,
        heartbeat: settings.heartbeat,
        dead_after: settings.dead_after,
        redis_timeout: settings.redis_timeout,
        dynamic,
        sink: sink.clone(),
        links_stop: background.clone(),
        redis_up_since: parking_lot::Mutex::new(None),
    };
    Ok((cluster, Topology::new(keys, links, epoch), states))
}

/// The ring's shards with their link addresses, and its epoch; waits for the first shard.
async fn ring_members(redis: &RedisStore) -> Result<(Vec<(String, String)>, u64), StartError> {
    let deadline = tokio::time::Instant::now() + FIRST_SHARD_WAIT;
    loop {
        let ring = redis.ring().await?;
        if !ring.members.is_empty() {
            let addrs: HashMap<String, String> = redis.live_shards(cluster::REGISTERED).await?.into_iter().collect();
            if let Some(missing) = ring.members.iter().find(|m| !addrs.contains_key(*m)) {
                tracing::warn!(shard = %missing, "shard in the ring is not registered; waiting");
            } else {
                let shards = ring.members.iter().map(|m| (m.clone(), addrs[m].clone())).collect();
                return Ok((shards, ring.epoch));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::NoShards(FIRST_SHARD_WAIT));
        }
        tracing::info!("waiting for a shard to join the ring");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Broker {
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Re-reads the TLS, password and ACL files (what SIGHUP does); returns what failed.
    pub fn reload(&self) -> Vec<String> {
        reload::reload_all(&self.ctx)
    }

    /// `/readyz` answers 503 from now on, so load balancers stop sending new clients here.
    pub fn mark_unready(&self) {
        self.ctx.ready.store(false, Ordering::SeqCst);
    }

    /// See [`Context::drain`].
    pub async fn drain(&self, within: Duration) {
        self.ctx.drain(within).await;
    }

    /// Graceful shutdown: in a cluster, drain (see [`Broker::drain`]) within the grace period;
    /// then tell every remaining client (5.0: DISCONNECT 0x8B — a single node has no other
    /// server to send them to), save every session, make the store durable and leave the
    /// cluster. Returns false if connections were still open when the grace period ran out.
    pub async fn shutdown(self) -> bool {
        if self.ctx.cluster.is_some() {
            // Most of the grace goes to the paced drain; the rest to closing what is left.
            self.drain(self.ctx.settings.shutdown_grace.mul_f64(0.8)).await;
        }
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
        if let (Some(c), true) = (&self.ctx.cluster, drained) {
            // Everything is saved: nothing is left for other proxies to settle.
            if let Err(e) = c.redis.proxy_leave(&c.id).await {
                tracing::warn!(error = %e, "could not leave the cluster; another proxy will settle this one when its heartbeat expires");
            }
        }
        self.ctx.shards.close().await;
        self.background.cancel();
        drained
    }
}

/// A stored subscription as the shards take it.
pub fn subscribe_item(s: &StoredSubscription) -> SubscribeItem {
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
    SubscribeItem { filter: s.filter.as_str().into(), options, id: s.subscription_id }
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
                ctx.publish_will(w, None).await;
            }
            ctx.store.write(vec![Op::RemoveSession { client_id: record.client_id.clone(), epoch: None }]).await?;
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
    let shards = ctx.shards.now();
    let mut per_shard: HashMap<usize, Vec<SubscribeItem>> = HashMap::new();
    for s in &record.subscriptions {
        let item = subscribe_item(s);
        let set = shards.shard_set(std::iter::once(&item.filter));
        for i in shards.indices(set) {
            per_shard.entry(i).or_default().push(item.clone());
        }
    }
    let session = SessionInfo { client_id: client_id.clone(), conn: None, persistent: true };
    for (i, items) in per_shard {
        let session = session.clone();
        shards.link(i).call(|id| Request::Subscribe { id, session, items, deliver_retained: None }).await?;
    }
    Ok(())
}
