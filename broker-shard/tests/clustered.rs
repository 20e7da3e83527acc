//! A clustered shard (own disk for its log, Redis for sessions' queues) behind real TCP links:
//! what it accepted survives a crash, reaches proxies that were away, and is never delivered or
//! accepted twice. Redis is a real `redis-server`; link failures come from a relay that cuts
//! the connection.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use broker_shard::link::client::{Client, DeliverySink, LinkEvents};
use broker_shard::link::frame::{decode_next, encode, Frame, MIN_VERSION, VERSION};
use broker_shard::link::server::{serve, ServerConfig};
use broker_shard::link::tcp::TcpConfig;
use broker_shard::link::{ConnId, Deliver, Event, Marker, Reply, Request, RequestId, SessionInfo, SubscribeItem, WillRef};
use broker_shard::restore::Restored;
use broker_shard::{spawn_clustered, Clustered, Message, ShardConfig, ShardMetrics};
use bytes::{Bytes, BytesMut};
use mqfleet_codec::{PublishProperties, QoS, SubscriptionOptions};
use session_store::{EmbeddedConfig, EmbeddedStore, Op, RedisStore, RedisTarget, SessionRecord, Store, StoredWill};
use testkit::relay::Relay;
use testkit::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct ShardProc {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
    metrics: ShardMetrics,
    /// Milliseconds every commit of the shard's own store waits (a slow disk).
    disk_delay: Arc<AtomicU64>,
}

impl ShardProc {
    /// Stops it the way `kill -9` would: pending work is dropped, nothing is flushed.
    async fn crash(self) -> SocketAddr {
        self.stop.cancel();
        self.task.abort();
        let _ = self.task.await;
        self.addr
    }
}

async fn open_local(dir: &Path, disk_delay: &Arc<AtomicU64>) -> EmbeddedStore {
    let mut config = EmbeddedConfig::new(dir);
    config.commit_delay = Some(disk_delay.clone());
    // A crashed shard's store closes once its last handle is gone.
    for _ in 0..100 {
        if let Ok(s) = EmbeddedStore::open(config.clone()) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the shard's store stayed locked");
}

async fn sessions_store(url: &str) -> Store {
    Store::Redis(RedisStore::connect(RedisTarget::parse(url).unwrap(), 100, Duration::from_secs(2)).await.unwrap())
}

async fn start_shard(dir: &Path, redis: &RedisServer, addr: Option<SocketAddr>, expected: &[&str]) -> ShardProc {
    start_shard_on(dir, &redis.url(), addr, expected).await
}

/// As [`start_shard`], its sessions' store at `url`.
async fn start_shard_on(dir: &Path, url: &str, addr: Option<SocketAddr>, expected: &[&str]) -> ShardProc {
    let disk_delay = Arc::new(AtomicU64::new(0));
    let local = open_local(dir, &disk_delay).await;
    let restored = Restored::load(&local).await.unwrap();
    let metrics = ShardMetrics::default();
    let mut config = ShardConfig::new("shard-a");
    config.resync_wait = Duration::from_secs(10);
    config.log_id = broker_shard::node::log_id(dir).unwrap();
    let clustered = Clustered {
        sessions: sessions_store(url).await,
        local: Store::Embedded(local),
        restored,
        expected_proxies: expected.iter().map(|s| s.to_string()).collect(),
        forward: None,
    };
    let (handle, task) = spawn_clustered(config, clustered, metrics.clone());
    let listener = TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let mut server = ServerConfig::new("shard-a");
    server.log_id = 42;
    tokio::spawn(serve(listener, handle, server, Arc::new(AtomicU64::new(0)), stop.clone()));
    ShardProc { addr, stop, task, metrics, disk_delay }
}

struct Sink(mpsc::UnboundedSender<Deliver>);

impl DeliverySink for Sink {
    fn deliver(&self, d: Deliver) {
        let _ = self.0.send(d);
    }
}

struct Resync(Vec<Request>);

impl LinkEvents for Resync {
    fn resync(&self) -> Vec<Request> {
        self.0.clone()
    }
    fn linked(&self, _again: bool) {}
}

struct Proxy {
    client: Client,
    deliveries: mpsc::UnboundedReceiver<Deliver>,
}

fn subscribe(client: &str, conn: u64, persistent: bool, filter: &str) -> Request {
    Request::Subscribe {
        id: RequestId(0),
        session: SessionInfo { client_id: client.into(), conn: Some(ConnId(conn)), persistent },
        items: vec![SubscribeItem { filter: filter.into(), options: SubscriptionOptions::qos(QoS::AtLeastOnce), id: None }],
        deliver_retained: None,
    }
}

/// A proxy's link named `name`, re-sending `resync` after every (re)connect.
async fn proxy(addr: SocketAddr, name: &str, resync: Vec<Request>) -> Proxy {
    let (tx, deliveries) = mpsc::unbounded_channel();
    let client = Client::connect_tcp(
        TcpConfig::new(addr.to_string(), name),
        Arc::new(Sink(tx)),
        Arc::new(Resync(resync.clone())),
        CancellationToken::new(),
    );
    for r in resync {
        client.call(|id| with_id(r, id)).await.unwrap();
    }
    Proxy { client, deliveries }
}

fn with_id(r: Request, id: RequestId) -> Request {
    match r {
        Request::Subscribe { session, items, deliver_retained, .. } => Request::Subscribe { id, session, items, deliver_retained },
        other => other,
    }
}

fn msg(topic: &str, payload: Vec<u8>) -> Arc<Message> {
    Arc::new(Message {
        topic: topic.into(),
        payload: Bytes::from(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: PublishProperties::default(),
        expires_at_ms: None,
        origin: None,
    })
}

async fn publish(p: &Proxy, topic: &str, n: u32) -> Reply {
    let m = msg(topic, n.to_be_bytes().to_vec());
    tokio::time::timeout(Duration::from_secs(20), p.client.call(|id| Request::Publish { id: Some(id), message: m, marker: None }))
        .await
        .expect("a reply in time")
        .unwrap()
}

/// The payload numbers delivered to `p` until `n` have come (or a deadline).
async fn received(p: &mut Proxy, n: usize) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(20), p.deliveries.recv()).await {
            Ok(Some(d)) => got.push(u32::from_be_bytes(d.message.payload[..4].try_into().unwrap())),
            _ => break,
        }
    }
    got
}

async fn nothing_more(p: &mut Proxy) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(700), p.deliveries.recv()).await {
        panic!("delivered again: {:?}", d.message.payload);
    }
}

/// A shard, a subscriber's proxy linked through a relay that can cut it, a publisher's proxy.
struct Setup {
    redis: RedisServer,
    dir: tempfile::TempDir,
    shard: ShardProc,
    relay: Relay,
    sub: Proxy,
    publisher: Proxy,
}

async fn setup() -> Setup {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let shard = start_shard(dir.path(), &redis, None, &[]).await;
    let relay = Relay::start(shard.addr).await;
    let sub = proxy(relay.addr, "proxy-sub", vec![subscribe("c", 7, false, "t/#")]).await;
    let publisher = proxy(shard.addr, "proxy-pub", vec![]).await;
    Setup { redis, dir, shard, relay, sub, publisher }
}

#[tokio::test]
async fn a_link_cut_loses_nothing_and_duplicates_nothing() {
    let Setup { redis: _redis, dir: _dir, shard, relay, mut sub, publisher } = setup().await;

    for n in 1..=3 {
        assert!(matches!(publish(&publisher, "t/a", n).await, Reply::Accepted { .. }));
    }
    assert_eq!(received(&mut sub, 3).await, [1, 2, 3]);
    relay.cut();
    for n in 4..=8 {
        assert!(matches!(publish(&publisher, "t/a", n).await, Reply::Accepted { .. }), "accepted while a subscriber's proxy is away");
    }
    relay.restore();
    assert_eq!(received(&mut sub, 5).await, [4, 5, 6, 7, 8], "what the shard kept for the away proxy, in order");
    nothing_more(&mut sub).await;

    // Everything confirmed: the log empties.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while shard.metrics.log_entries.get() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "log still holds {} entries", shard.metrics.log_entries.get());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn accepted_messages_survive_a_crash_and_reach_a_proxy_that_was_away() {
    let Setup { redis, dir, shard, relay, mut sub, publisher } = setup().await;

    for n in 1..=5 {
        publish(&publisher, "t/a", n).await;
    }
    assert_eq!(received(&mut sub, 5).await, [1, 2, 3, 4, 5]);
    relay.cut();
    for n in 6..=10 {
        assert!(matches!(publish(&publisher, "t/a", n).await, Reply::Accepted { .. }));
    }
    // The shard dies with 6..10 acknowledged but never sent to the subscriber's proxy.
    let addr = shard.crash().await;
    let shard = start_shard(dir.path(), &redis, Some(addr), &["proxy-sub", "proxy-pub"]).await;
    relay.restore();
    assert_eq!(received(&mut sub, 5).await, [6, 7, 8, 9, 10], "replayed from the log once the proxies resynchronised");
    publish(&publisher, "t/a", 11).await;
    assert_eq!(received(&mut sub, 1).await, [11]);
    nothing_more(&mut sub).await;
    drop(shard);
}

/// A raw link speaking frames, so the test controls exactly what is confirmed and resent.
struct RawLink {
    stream: TcpStream,
    rbuf: BytesMut,
}

impl RawLink {
    async fn connect(addr: SocketAddr) -> RawLink {
        let (link, welcome) = RawLink::hello(addr, VERSION).await;
        assert!(matches!(welcome, Frame::Welcome { .. }));
        link
    }

    /// Says Hello in `version`; the shard's answer.
    async fn hello(addr: SocketAddr, version: u16) -> (RawLink, Frame) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut out = BytesMut::new();
        encode(&Frame::Hello { version, proxy: "raw".into(), incarnation: 5, ring_epoch: 0, credit: 1000 }, &mut out);
        stream.write_all(&out).await.unwrap();
        let mut link = RawLink { stream, rbuf: BytesMut::new() };
        let answer = link.frame().await;
        (link, answer)
    }

    async fn send(&mut self, r: Request) {
        let mut out = BytesMut::new();
        encode(&Frame::Request(r), &mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn frame(&mut self) -> Frame {
        loop {
            if let Some(f) = decode_next(&mut self.rbuf).unwrap() {
                return f;
            }
            let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read_buf(&mut self.rbuf)).await.expect("a frame").unwrap();
            assert!(n > 0, "link closed");
        }
    }

    async fn reply(&mut self, id: u64) -> Reply {
        self.result(id).await.unwrap()
    }

    async fn result(&mut self, id: u64) -> Result<Reply, broker_shard::link::ShardError> {
        loop {
            if let Frame::Event(Event::Reply { id: got, result }) = self.frame().await {
                if got.0 == id {
                    return result;
                }
            }
        }
    }
}

#[tokio::test]
async fn a_publish_sent_again_after_a_crash_is_answered_not_accepted_twice() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let shard = start_shard(dir.path(), &redis, None, &[]).await;
    let mut sub = proxy(shard.addr, "proxy-sub", vec![subscribe("c", 7, false, "t/#")]).await;
    let mut raw = RawLink::connect(shard.addr).await;
    raw.send(Request::Publish { id: Some(RequestId(1)), message: msg("t/x", 1u32.to_be_bytes().to_vec()), marker: None }).await;
    assert!(matches!(raw.reply(1).await, Reply::Accepted { .. }));
    assert_eq!(received(&mut sub, 1).await, [1]);

    // The shard dies before the publisher's proxy confirmed the reply; the proxy, not knowing
    // whether it arrived, sends the PUBLISH again after relinking.
    let addr = shard.crash().await;
    let _shard = start_shard(dir.path(), &redis, Some(addr), &["proxy-sub", "raw"]).await;
    let mut raw = RawLink::connect(addr).await;
    raw.send(Request::ResyncDone).await;
    raw.send(Request::Publish { id: Some(RequestId(1)), message: msg("t/x", 1u32.to_be_bytes().to_vec()), marker: None }).await;
    assert_eq!(raw.reply(1).await, Reply::Done, "recognised as accepted before");
    raw.send(Request::Publish { id: Some(RequestId(2)), message: msg("t/x", 2u32.to_be_bytes().to_vec()), marker: None }).await;
    assert!(matches!(raw.reply(2).await, Reply::Accepted { .. }));
    assert_eq!(received(&mut sub, 1).await, [2], "message 1 is not delivered a second time");
    nothing_more(&mut sub).await;
}

/// A Redis with a persistent session `client_id` in it, and a store on it.
async fn redis_with_session(client_id: &str) -> (RedisServer, Store) {
    let redis = RedisServer::start();
    let sessions = sessions_store(&redis.url()).await;
    let record = SessionRecord {
        client_id: client_id.into(),
        protocol_level: 5,
        expiry_interval: 3600,
        subscriptions: vec![],
        will: None,
        epoch: 1,
        // Never expires while marked connected (an offline record would count its expiry from
        // `disconnected_at_ms`).
        connected: true,
        disconnected_at_ms: 0,
    };
    sessions.write(vec![Op::PutSession(record)]).await.unwrap();
    (redis, sessions)
}

/// Proxy "proxy-a", on which persistent session "ps" subscribed to `q/#` and went offline.
async fn offline_subscriber(shard: SocketAddr) -> Proxy {
    let p = proxy(shard, "proxy-a", vec![]).await;
    p.client.call(|id| with_id(subscribe("ps", 1, true, "q/#"), id)).await.unwrap();
    p.client.send(Request::Detach { client_id: "ps".into(), conn: ConnId(1) }).await.unwrap();
    p
}

#[tokio::test]
async fn persistent_sessions_subscriptions_are_kept_on_the_shards_disk() {
    let (redis, sessions) = redis_with_session("ps").await;
    let dir = tempfile::tempdir().unwrap();
    let shard = start_shard(dir.path(), &redis, None, &[]).await;
    let p = offline_subscriber(shard.addr).await;
    p.client.call(|id| Request::Flush { id }).await.unwrap();

    // Restarted, with no proxy to tell it about "ps": it still queues for it.
    let addr = shard.crash().await;
    let _shard = start_shard(dir.path(), &redis, Some(addr), &[]).await;
    let publisher = proxy(addr, "proxy-b", vec![]).await;
    publish(&publisher, "q/1", 1).await;
    publisher.client.call(|id| Request::Flush { id }).await.unwrap();
    let queue = sessions.load_queue("ps", 0).await.unwrap();
    assert_eq!(queue.len(), 1, "queued in Redis for the offline persistent session");
    assert_eq!(&Message::decode(&queue[0].message).unwrap().topic[..], "q/1");
}

/// A shard back under its name on a new disk (a replaced volume) starts its log positions
/// again from 1. Its new messages must not be taken for replays of the old log's copies, which
/// the sessions' store remembers by position: they were dropped, never queued for persistent
/// sessions (RELIABILITY.md, finding 25). The log's id is part of the positions' name.
#[tokio::test]
async fn a_shard_on_a_new_disk_queues_its_messages_for_persistent_sessions() {
    let (redis, sessions) = redis_with_session("ps").await;
    let old_disk = tempfile::tempdir().unwrap();
    let shard = start_shard(old_disk.path(), &redis, None, &[]).await;
    let p = offline_subscriber(shard.addr).await;
    for n in 1..=3 {
        publish(&p, "q/1", n).await;
    }
    p.client.call(|id| Request::Flush { id }).await.unwrap();
    assert_eq!(sessions.load_queue("ps", 0).await.unwrap().len(), 3);

    // The volume is replaced: same name, empty disk. The subscription comes back with the
    // session's proxy.
    let addr = shard.crash().await;
    let new_disk = tempfile::tempdir().unwrap();
    let _shard = start_shard(new_disk.path(), &redis, Some(addr), &[]).await;
    let p = proxy(addr, "proxy-b", vec![subscribe("ps", 1, true, "q/#")]).await;
    p.client.send(Request::Detach { client_id: "ps".into(), conn: ConnId(1) }).await.unwrap();
    for n in 4..=5 {
        publish(&p, "q/1", n).await;
    }
    p.client.call(|id| Request::Flush { id }).await.unwrap();
    let queued: Vec<u32> = sessions
        .load_queue("ps", 0)
        .await
        .unwrap()
        .iter()
        .map(|q| u32::from_be_bytes(Message::decode(&q.message).unwrap().payload[..4].try_into().unwrap()))
        .collect();
    assert_eq!(queued, [1, 2, 3, 4, 5], "the new log's messages are queued after the old log's");
}

/// A will as a proxy sends it: `proxy` holds the intent to publish it in Redis (or not).
async fn publish_will(p: &Proxy, epoch: u64, proxy: &str, n: u32) -> Reply {
    let m = msg("t/will", n.to_be_bytes().to_vec());
    let marker = Some(Marker::Will(WillRef { client_id: "dev".into(), epoch, proxy: proxy.into() }));
    tokio::time::timeout(Duration::from_secs(20), p.client.call(|id| Request::Publish { id: Some(id), message: m, marker }))
        .await
        .expect("a reply in time")
        .unwrap()
}

async fn intend(redis: &RedisServer, epoch: u64, proxy: &str) {
    let r = RedisStore::connect(RedisTarget::parse(&redis.url()).unwrap(), 100, Duration::from_secs(2)).await.unwrap();
    let will = StoredWill { message: b"w".to_vec(), delay_interval: 0, message_expiry_interval: None };
    assert!(r.withdraw_will("dev", epoch, proxy, &will).await.unwrap());
}

/// Each will once (MQTT-3.1.2-8, in a cluster): the shard routes a will only if Redis says it
/// is the sender's to publish and no other copy went out — a late copy from a proxy that was
/// taken for dead, or a second copy, is answered (the sender stops) and withheld.
#[tokio::test]
async fn a_will_is_routed_once_and_only_from_the_proxy_whose_it_is() {
    let Setup { redis, dir: _dir, shard, relay: _relay, mut sub, publisher } = setup().await;
    intend(&redis, 7, "proxy-b").await;
    assert!(matches!(publish_will(&publisher, 7, "proxy-a", 1).await, Reply::Accepted { .. }), "answered");
    assert!(matches!(publish_will(&publisher, 7, "proxy-b", 2).await, Reply::Accepted { .. }));
    assert!(matches!(publish_will(&publisher, 7, "proxy-b", 3).await, Reply::Accepted { .. }));
    assert_eq!(received(&mut sub, 1).await, [2], "only the copy of the proxy whose will it is");
    nothing_more(&mut sub).await;
    assert_eq!(shard.metrics.wills_withheld.get(), 2);
}

/// A will the shard accepted and crashed before delivering is asked about again when the log
/// is replayed — and, being the same acceptance, published then, not withheld as a copy.
#[tokio::test]
async fn a_will_accepted_before_a_crash_is_delivered_by_the_replay() {
    let Setup { redis, dir, shard, relay, mut sub, publisher } = setup().await;
    intend(&redis, 9, "proxy-pub").await;
    relay.cut();
    assert!(matches!(publish_will(&publisher, 9, "proxy-pub", 1).await, Reply::Accepted { .. }));
    let addr = shard.crash().await;
    let shard = start_shard(dir.path(), &redis, Some(addr), &["proxy-sub", "proxy-pub"]).await;
    relay.restore();
    assert_eq!(received(&mut sub, 1).await, [1], "replayed once the proxies resynchronised");
    nothing_more(&mut sub).await;
    assert_eq!(shard.metrics.wills_withheld.get(), 0);
}

/// A rolling upgrade links proxies and shards of neighbouring releases: a shard answers an
/// older proxy in that proxy's version, and refuses one it cannot speak, saying why.
#[tokio::test]
async fn a_shard_speaks_the_link_version_of_an_older_proxy() {
    let Setup { shard, .. } = setup().await;
    let (_old, welcome) = RawLink::hello(shard.addr, MIN_VERSION).await;
    assert!(matches!(welcome, Frame::Welcome { version, .. } if version == MIN_VERSION), "{welcome:?}");
    let (_ancient, refused) = RawLink::hello(shard.addr, MIN_VERSION - 1).await;
    assert!(matches!(&refused, Frame::Refused { reason } if reason.contains("not supported")), "{refused:?}");
}

/// Publishes payload `n` on `t/a` as a QoS 2 PUBLISH of persistent client "pub" with packet id
/// `pkid` (so the shard writes its marker); the shard's answer.
async fn publish_qos2(p: &Proxy, n: u32, pkid: u16) -> Result<Reply, broker_shard::link::LinkError> {
    publish_qos2_marked(p, n, "pub", pkid).await
}

/// As [`publish_qos2`], the marker written under `marker_client`'s session.
async fn publish_qos2_marked(p: &Proxy, n: u32, marker_client: &str, pkid: u16) -> Result<Reply, broker_shard::link::LinkError> {
    let marker = Marker::Qos2 { client_id: marker_client.into(), pkid };
    let mut m = msg("t/a", n.to_be_bytes().to_vec());
    let m_mut = Arc::make_mut(&mut m);
    m_mut.origin = Some("pub".into());
    m_mut.qos = QoS::ExactlyOnce;
    let call = p.client.call(|id| Request::Publish { id: Some(id), message: m, marker: Some(marker) });
    tokio::time::timeout(Duration::from_secs(20), call).await.expect("a reply in time")
}

#[tokio::test]
async fn a_message_refused_for_its_qos2_marker_is_not_replayed_after_a_crash() {
    let Setup { redis, dir, shard, relay: _relay, mut sub, publisher } = setup().await;
    // Redis holds writes (scripts included) past the store's 2 s timeout: the QoS 2 marker
    // cannot be written, while the shard's own log append can.
    redis.cli(&["CLIENT", "PAUSE", "4000", "WRITE"]);
    let refused = publish_qos2(&publisher, 1, 1).await;
    assert!(refused.is_err(), "the marker could not be written, so the message is refused: {refused:?}");
    redis.cli(&["CLIENT", "UNPAUSE"]);

    // A crash before the log is trimmed the usual way: the refused message must not come back
    // from the log (its publisher was told it was refused).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let addr = shard.crash().await;
    let _shard = start_shard(dir.path(), &redis, Some(addr), &["proxy-sub", "proxy-pub"]).await;
    publish(&publisher, "t/a", 2).await;
    assert_eq!(received(&mut sub, 1).await, [2], "the refused message 1 is never delivered");
    nothing_more(&mut sub).await;
}

#[tokio::test]
async fn a_qos2_resend_whose_packet_id_is_marked_is_answered_not_routed() {
    let Setup { redis: _redis, dir: _dir, shard, relay: _relay, mut sub, publisher } = setup().await;
    assert!(matches!(publish_qos2(&publisher, 1, 5).await, Ok(Reply::Accepted { .. })));
    assert_eq!(received(&mut sub, 1).await, [1]);
    // The client resends packet id 5 over a new connection (another request, perhaps another
    // proxy) before PUBREL: the new connection could not know the first copy got through
    // (MQTT-4.3.3: exactly once).
    assert!(publish_qos2(&publisher, 1, 5).await.is_ok(), "the resend is answered");
    nothing_more(&mut sub).await;
    assert_eq!(shard.metrics.qos2_resends.get(), 1);
}

/// MQTT-4.6.0-6 (order per topic and QoS) across a refusal: a publisher's QoS 2 message refused
/// for its marker (a Redis node restarting), and the messages of the same flow it had in flight
/// behind it, whose own writes succeeded. Were those accepted, the client's resend of the refused one would come
/// after them (RELIABILITY.md, finding 19). They are refused too; their marks, written all the
/// same, are given back, so their resends are routed, not taken for duplicates (a loss).
#[tokio::test]
async fn messages_in_flight_behind_a_refused_one_are_refused_too_and_their_marks_given_back() {
    let Setup { redis, dir: _dir, shard, relay: _relay, mut sub, publisher } = setup().await;
    // Stands for a marker write that fails (a Redis node restarting): the key it writes holds
    // the wrong type.
    redis.cli(&["SET", &session_store::redis::keys::ClientKeys::new("broken").inbound, "x"]);
    // A slow disk keeps the first message in lane A while the next two arrive behind it.
    shard.disk_delay.store(300, std::sync::atomic::Ordering::Relaxed);
    let (first, second, third) =
        tokio::join!(publish_qos2_marked(&publisher, 1, "broken", 1), publish_qos2(&publisher, 2, 2), publish_qos2(&publisher, 3, 3));
    assert!(first.is_err(), "its marker could not be written: {first:?}");
    assert!(second.is_err() && third.is_err(), "in flight behind a refused message of the same publisher: {second:?} {third:?}");
    assert_eq!(shard.metrics.refused_in_order.get(), 2);
    nothing_more(&mut sub).await;

    // The client sends all three again, in order (MQTT-4.4.0-1); packet ids 2 and 3 were marked
    // by the refused acceptances, so only the mark's give-back tells these are not duplicates.
    shard.disk_delay.store(0, std::sync::atomic::Ordering::Relaxed);
    for (n, pkid) in [(1, 1), (2, 2), (3, 3)] {
        assert!(matches!(publish_qos2(&publisher, n, pkid).await, Ok(Reply::Accepted { .. })), "resend of {n}");
    }
    assert_eq!(received(&mut sub, 3).await, [1, 2, 3], "each once, in the order published");
    nothing_more(&mut sub).await;
    assert_eq!(shard.metrics.qos2_resends.get(), 0);
}

/// A refused QoS 2 message whose mark may have been written keeps its log entry until the mark
/// is given back. Deleted first, a crash in between left a mark naming no entry: the client's
/// resend was taken for a duplicate of an accepted message, answered and never delivered
/// (MQTT-4.3.3; RELIABILITY.md, finding 24's give-back window). Kept, the restart delivers the
/// entry under its mark and the resend is answered as its duplicate: once.
#[tokio::test]
async fn a_refused_qos2_entry_stays_until_its_mark_is_given_back() {
    let redis = RedisServer::start();
    let to_redis = Relay::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://{}", to_redis.addr);
    let shard = start_shard_on(dir.path(), &url, None, &[]).await;
    let mut sub = proxy(shard.addr, "proxy-sub", vec![subscribe("c", 7, false, "t/#")]).await;
    let publisher = proxy(shard.addr, "proxy-pub", vec![]).await;

    // A first QoS 2 message loads the marking script into Redis (a script unknown to Redis
    // would be refused by it, not run).
    assert!(matches!(publish_qos2(&publisher, 100, 9).await, Ok(Reply::Accepted { .. })));
    assert_eq!(received(&mut sub, 1).await, [100]);

    // The mark reaches Redis, its answer does not: the shard refuses the message after the
    // store's 2 s timeout, not knowing the mark is there; by then nothing reaches Redis, so
    // the give-back waits.
    to_redis.blackhole_replies();
    let blackhole = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        to_redis.blackhole();
    };
    let (refused, ()) = tokio::join!(publish_qos2(&publisher, 1, 1), blackhole);
    assert!(refused.is_err(), "the mark's write timed out: {refused:?}");
    let mark = session_store::redis::keys::ClientKeys::new("pub").inbound;
    assert!(redis.cli(&["SMEMBERS", &mark]).lines().any(|id| id == "1"), "the refused acceptance's mark is in Redis");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(shard.metrics.log_entries.get(), 1, "the refused entry is kept while its mark is being given back");

    // The shard dies; what it still had on its way to Redis dies with it.
    let addr = shard.crash().await;
    drop(to_redis);
    let _shard = start_shard(dir.path(), &redis, Some(addr), &["proxy-sub", "proxy-pub"]).await;
    assert_eq!(received(&mut sub, 1).await, [1], "the kept entry is delivered under its mark");
    assert!(publish_qos2(&publisher, 1, 1).await.is_ok(), "the client's resend is answered");
    nothing_more(&mut sub).await;
}

/// A publish request sent again while its first copy is still in lane A (the proxy relinked
/// and resent what was unanswered) is answered after the first copy, as the first copy was: if
/// that one is refused, "accepted before" would be a lie its publisher acts on (a loss).
#[tokio::test]
async fn a_request_sent_again_is_refused_when_its_first_copy_is() {
    let Setup { redis, dir: _dir, shard, relay: _relay, mut sub, publisher: _publisher } = setup().await;
    redis.cli(&["SET", &session_store::redis::keys::ClientKeys::new("broken").inbound, "x"]);
    shard.disk_delay.store(300, std::sync::atomic::Ordering::Relaxed);
    let mut raw = RawLink::connect(shard.addr).await;
    let mut m = msg("t/a", 1u32.to_be_bytes().to_vec());
    Arc::make_mut(&mut m).origin = Some("pub".into());
    let marker = Marker::Qos2 { client_id: "broken".into(), pkid: 1 };
    for _ in 0..2 {
        raw.send(Request::Publish { id: Some(RequestId(1)), message: m.clone(), marker: Some(marker.clone()) }).await;
    }
    assert!(raw.result(1).await.is_err(), "the first copy is refused");
    assert!(raw.result(1).await.is_err(), "and so is the request sent again");
    nothing_more(&mut sub).await;
}
