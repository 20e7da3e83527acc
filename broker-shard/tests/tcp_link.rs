//! The proxy<->shard link over real TCP: traffic, reconnect with resync and resend, refusal
//! and flow-control behaviour when the shard is away.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use broker_shard::link::client::{Client, DeliverySink, LinkEvents};
use broker_shard::link::frame::{decode_next, encode, Frame, VERSION};
use broker_shard::link::server::{serve, ServerConfig};
use broker_shard::link::tcp::TcpConfig;
use broker_shard::link::{ConnId, Deliver, LinkError, Reply, Request, RequestId, SessionInfo, SubscribeItem};
use broker_shard::{spawn, Message, ShardConfig, ShardMetrics};
use bytes::{Bytes, BytesMut};
use mqfleet_codec::{PublishProperties, QoS, SubscriptionOptions};
use parking_lot::Mutex;
use session_store::{EmbeddedConfig, EmbeddedStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Sink(mpsc::UnboundedSender<Deliver>);

impl DeliverySink for Sink {
    fn deliver(&self, d: Deliver) {
        let _ = self.0.send(d);
    }
}

/// Resyncs one subscription and counts (re)links.
struct Events {
    subscription: Mutex<Option<Request>>,
    linked: mpsc::UnboundedSender<bool>,
}

impl LinkEvents for Events {
    fn resync(&self) -> Vec<Request> {
        self.subscription.lock().iter().cloned().collect()
    }
    fn linked(&self, again: bool) {
        let _ = self.linked.send(again);
    }
}

/// A shard behind a TCP link listener on `addr` (or a fresh port).
async fn shard(addr: Option<std::net::SocketAddr>, dir: &std::path::Path) -> (std::net::SocketAddr, CancellationToken) {
    let store = Store::Embedded(EmbeddedStore::open(EmbeddedConfig::new(dir)).unwrap());
    let (handle, _) = spawn(ShardConfig::new("shard-a"), store, vec![], ShardMetrics::default());
    let listener = TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())).await.unwrap();
    let bound = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, handle, ServerConfig::new("shard-a"), Arc::new(AtomicU64::new(0)), stop.clone()));
    (bound, stop)
}

fn msg(topic: &str, qos: QoS, payload: &'static [u8]) -> Arc<Message> {
    Arc::new(Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        properties: PublishProperties::default(),
        expires_at_ms: None,
        origin: None,
    })
}

fn subscribe(id: u64) -> Request {
    Request::Subscribe {
        id: RequestId(id),
        session: SessionInfo { client_id: "c".into(), conn: Some(ConnId(7)), persistent: false },
        items: vec![SubscribeItem { filter: "t/#".into(), options: SubscriptionOptions::qos(QoS::AtLeastOnce), id: None }],
        deliver_retained: Some(0),
    }
}

struct Proxy {
    client: Client,
    deliveries: mpsc::UnboundedReceiver<Deliver>,
    linked: mpsc::UnboundedReceiver<bool>,
    events: Arc<Events>,
}

fn proxy(addr: std::net::SocketAddr, tweak: impl FnOnce(&mut TcpConfig)) -> Proxy {
    let (tx, deliveries) = mpsc::unbounded_channel();
    let (ltx, linked) = mpsc::unbounded_channel();
    let events = Arc::new(Events { subscription: Mutex::new(None), linked: ltx });
    let mut config = TcpConfig::new(addr.to_string(), "proxy-1");
    tweak(&mut config);
    let client = Client::connect_tcp(config, Arc::new(Sink(tx)), events.clone(), CancellationToken::new());
    Proxy { client, deliveries, linked, events }
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("in time").unwrap()
}

#[tokio::test]
async fn requests_and_deliveries_cross_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = shard(None, dir.path()).await;
    let mut p = proxy(addr, |_| {});
    assert!(!next(&mut p.linked).await, "first link");
    assert_eq!(&*p.client.shard(), "shard-a", "name learned from Welcome");
    let reply = p.client.call(|id| match subscribe(0) {
        Request::Subscribe { session, items, deliver_retained, .. } => Request::Subscribe { id, session, items, deliver_retained },
        _ => unreachable!(),
    });
    assert!(matches!(reply.await.unwrap(), Reply::Subscribed { .. }));
    for i in 0..100u8 {
        let m = msg("t/x", QoS::AtLeastOnce, if i % 2 == 0 { b"even" } else { b"odd" });
        assert_eq!(p.client.call(|id| Request::Publish { id: Some(id), message: m, marker: None }).await.unwrap(), Reply::Done);
    }
    for i in 0..100u8 {
        let d = next(&mut p.deliveries).await;
        assert_eq!(d.recipients[0].conn, ConnId(7));
        assert_eq!(&d.message.payload[..], if i % 2 == 0 { &b"even"[..] } else { b"odd" }, "in order");
    }
}

#[tokio::test]
async fn a_restarted_shard_gets_the_resync_and_the_unanswered_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop) = shard(None, dir.path()).await;
    let mut p = proxy(addr, |_| {});
    next(&mut p.linked).await;
    *p.events.subscription.lock() = Some(subscribe(0));
    p.client
        .call(|id| match subscribe(0) {
            Request::Subscribe { session, items, deliver_retained, .. } => Request::Subscribe { id, session, items, deliver_retained },
            _ => unreachable!(),
        })
        .await
        .unwrap();

    // The shard goes away; a publish waits for it instead of failing.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = msg("t/y", QoS::AtLeastOnce, b"while away");
    let pending = p.client.start(|id| Request::Publish { id: Some(id), message: m, marker: None }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A new shard process on the same address: the proxy relinks, resyncs its subscription,
    // and the publish goes through.
    let dir2 = tempfile::tempdir().unwrap();
    let (_, _stop2) = shard(Some(addr), dir2.path()).await;
    assert!(next(&mut p.linked).await, "relinked");
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), pending).await.unwrap().unwrap(), Reply::Done);
    let d = next(&mut p.deliveries).await;
    assert_eq!(&d.message.payload[..], b"while away", "delivered through the resynced subscription");
}

#[tokio::test]
async fn requests_are_refused_when_the_buffer_is_full_and_time_out_when_unanswered() {
    let port = testkit_free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = proxy(addr, |c| {
        c.max_buffered = 2;
        c.request_timeout = Duration::from_millis(300);
    });
    // Nobody listens: the link task never takes requests from its queue.
    let m = msg("t", QoS::AtMostOnce, b"x");
    p.client.send(Request::Publish { id: None, message: m.clone(), marker: None }).await.unwrap();
    p.client.send(Request::Publish { id: None, message: m.clone(), marker: None }).await.unwrap();
    let err = p.client.send(Request::Publish { id: None, message: m, marker: None }).await.unwrap_err();
    assert!(matches!(err, LinkError::Busy { buffered: 2, .. }), "{err}");
    assert!(err.to_string().contains("refusing more until it drains"));
}

#[tokio::test]
async fn unanswered_requests_time_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A "shard" that welcomes and then never answers.
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        while decode_next(&mut buf).unwrap().is_none() {
            s.read_buf(&mut buf).await.unwrap();
        }
        let mut out = BytesMut::new();
        encode(&Frame::Welcome { version: VERSION, shard: "mute".into(), log_id: 1, ring_epoch: 0, credit: 100 }, &mut out);
        s.write_all(&out).await.unwrap();
        loop {
            if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
    });
    let mut p = proxy(addr, |c| c.request_timeout = Duration::from_millis(500));
    next(&mut p.linked).await;
    let m = msg("t", QoS::AtLeastOnce, b"x");
    let err = p.client.call(|id| Request::Publish { id: Some(id), message: m, marker: None }).await.unwrap_err();
    assert!(matches!(err, LinkError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn a_link_of_another_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _stop) = shard(None, dir.path()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    encode(&Frame::Hello { version: 99, proxy: "old".into(), incarnation: 1, ring_epoch: 0, credit: 10 }, &mut out);
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let frame = loop {
        if let Some(f) = decode_next(&mut buf).unwrap() {
            break f;
        }
        assert!(s.read_buf(&mut buf).await.unwrap() > 0, "closed without a reason");
    };
    match frame {
        Frame::Refused { reason } => assert!(reason.contains("version 99"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

fn testkit_free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
