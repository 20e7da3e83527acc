//! The shard router through its in-process link, with a real embedded store.

use std::sync::Arc;
use std::time::Duration;

use broker_shard::link::client::{Client, DeliverySink};
use broker_shard::link::{ConnId, Deliver, Marker, ProxyId, Reply, Request, SessionInfo, SubscribeItem};
use broker_shard::{spawn, Message, ShardConfig, ShardMetrics};
use bytes::Bytes;
use mqfleet_codec::{ByteString, PublishProperties, QoS, RetainHandling, SubscriptionOptions};
use parking_lot::Mutex;
use session_store::{EmbeddedConfig, EmbeddedStore, Op, SessionRecord, Store};
use tokio::sync::mpsc;

struct Sink(mpsc::UnboundedSender<Deliver>);

impl DeliverySink for Sink {
    fn deliver(&self, d: Deliver) {
        let _ = self.0.send(d);
    }
}

struct Harness {
    client: Client,
    deliveries: mpsc::UnboundedReceiver<Deliver>,
    store: Store,
    metrics: ShardMetrics,
    _dir: tempfile::TempDir,
}

async fn harness(max_queue_len: u32) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.max_queue_len = max_queue_len;
    let store = Store::Embedded(EmbeddedStore::open(config).unwrap());
    let metrics = ShardMetrics::default();
    let (handle, _task) = spawn(ShardConfig::new("shard-0"), store.clone(), Vec::new(), metrics.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let client = Client::connect_local(&handle, ProxyId(0), Arc::new(Sink(tx))).await.unwrap();
    Harness { client, deliveries: rx, store, metrics, _dir: dir }
}

fn msg(topic: &str, qos: QoS, retain: bool, payload: &'static [u8], origin: Option<&str>) -> Arc<Message> {
    Arc::new(Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos,
        retain,
        properties: PublishProperties::default(),
        expires_at_ms: None,
        origin: origin.map(ByteString::from),
    })
}

fn session(id: &str, conn: Option<u64>, persistent: bool) -> SessionInfo {
    SessionInfo { client_id: id.into(), conn: conn.map(ConnId), persistent }
}

fn item(filter: &str, qos: QoS) -> SubscribeItem {
    SubscribeItem { filter: filter.into(), options: SubscriptionOptions::qos(qos), id: None }
}

impl Harness {
    async fn subscribe(&self, s: SessionInfo, items: Vec<SubscribeItem>) -> Reply {
        self.client.call(|id| Request::Subscribe { id, session: s, items, deliver_retained: Some(0) }).await.unwrap()
    }

    async fn publish(&self, m: Arc<Message>) {
        let r = self.client.call(|id| Request::Publish { id: Some(id), message: m, marker: None }).await.unwrap();
        assert_eq!(r, Reply::Done);
    }

    async fn next(&mut self) -> Deliver {
        tokio::time::timeout(Duration::from_secs(5), self.deliveries.recv()).await.expect("a delivery").unwrap()
    }

    fn nothing_delivered(&mut self) {
        assert!(self.deliveries.try_recv().is_err(), "unexpected delivery");
    }

    async fn persist(&self, id: &str) {
        let record = SessionRecord {
            client_id: id.into(),
            protocol_level: 5,
            expiry_interval: 3600,
            subscriptions: vec![],
            will: None,
            epoch: 1,
            connected: false,
            disconnected_at_ms: 0,
        };
        self.store.write(vec![Op::PutSession(record)]).await.unwrap();
    }
}

#[tokio::test]
async fn one_copy_per_proxy_with_all_local_recipients() {
    let mut h = harness(10).await;
    for i in 0..3 {
        h.subscribe(session(&format!("c{i}"), Some(i), false), vec![item("a/+", QoS::AtLeastOnce)]).await;
    }
    h.publish(msg("a/b", QoS::AtLeastOnce, false, b"x", None)).await;
    let d = h.next().await;
    let mut conns: Vec<u64> = d.recipients.iter().map(|r| r.conn.0).collect();
    conns.sort();
    assert_eq!(conns, [0, 1, 2]);
    h.nothing_delivered();
}

#[tokio::test]
async fn qos_is_downgraded_to_the_subscription_maximum_mqtt_3_8_4_8() {
    let mut h = harness(10).await;
    h.subscribe(session("c", Some(1), false), vec![item("t", QoS::AtMostOnce)]).await;
    h.publish(msg("t", QoS::ExactlyOnce, false, b"x", None)).await;
    assert_eq!(h.next().await.recipients[0].delivery.qos, QoS::AtMostOnce);
}

#[tokio::test]
async fn overlapping_subscriptions_give_one_copy_with_every_subscription_id_mqtt_3_3_4_4() {
    let mut h = harness(10).await;
    let mut a = item("a/#", QoS::AtMostOnce);
    a.id = Some(1);
    let mut b = item("a/+", QoS::AtLeastOnce);
    b.id = Some(2);
    h.subscribe(session("c", Some(1), false), vec![a, b]).await;
    h.publish(msg("a/x", QoS::AtLeastOnce, false, b"x", None)).await;
    let d = h.next().await;
    assert_eq!(d.recipients.len(), 1);
    let mut ids = d.recipients[0].delivery.subscription_ids.clone();
    ids.sort();
    assert_eq!(ids, [1, 2]);
    assert_eq!(d.recipients[0].delivery.qos, QoS::AtLeastOnce);
}

#[tokio::test]
async fn no_local_skips_the_publishers_own_subscription_mqtt_3_8_3_3() {
    let mut h = harness(10).await;
    let mut nl = item("t", QoS::AtMostOnce);
    nl.options.no_local = true;
    h.subscribe(session("me", Some(1), false), vec![nl]).await;
    h.subscribe(session("other", Some(2), false), vec![item("t", QoS::AtMostOnce)]).await;
    h.publish(msg("t", QoS::AtMostOnce, false, b"x", Some("me"))).await;
    let d = h.next().await;
    assert_eq!(d.recipients.iter().map(|r| r.conn.0).collect::<Vec<_>>(), [2]);
}

#[tokio::test]
async fn retain_handling_controls_retained_delivery_on_subscribe() {
    let h = harness(10).await;
    h.publish(msg("r/1", QoS::AtLeastOnce, true, b"v", None)).await;
    let retained_count = |r: Reply| match r {
        Reply::Subscribed { retained, .. } => retained.len(),
        other => panic!("{other:?}"),
    };
    let with = |rh| {
        let mut i = item("r/#", QoS::AtLeastOnce);
        i.options.retain_handling = rh;
        i
    };
    let s = || session("c", Some(1), false);
    assert_eq!(retained_count(h.subscribe(s(), vec![with(RetainHandling::OnSubscribe)]).await), 1);
    // Existing subscription: 1 sends nothing, 0 sends again.
    assert_eq!(retained_count(h.subscribe(s(), vec![with(RetainHandling::OnNewSubscription)]).await), 0);
    assert_eq!(retained_count(h.subscribe(s(), vec![with(RetainHandling::OnSubscribe)]).await), 1);
    assert_eq!(retained_count(h.subscribe(s(), vec![with(RetainHandling::Never)]).await), 0);
    // Retained messages are not sent to shared subscriptions.
    assert_eq!(retained_count(h.subscribe(session("d", Some(2), false), vec![item("$share/g/r/#", QoS::AtLeastOnce)]).await), 0);
    // An empty retained payload deletes it.
    h.publish(msg("r/1", QoS::AtLeastOnce, true, b"", None)).await;
    assert_eq!(retained_count(h.subscribe(session("e", Some(3), false), vec![item("r/#", QoS::AtLeastOnce)]).await), 0);
    assert!(h.store.retained().await.unwrap().is_empty());
}

#[tokio::test]
async fn retained_message_is_durable_before_the_publisher_is_answered() {
    let h = harness(10).await;
    h.publish(msg("r", QoS::AtLeastOnce, true, b"v", None)).await;
    let stored = h.store.retained().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(&Message::decode(&stored[0].message).unwrap().payload[..], b"v");
}

#[tokio::test]
async fn offline_persistent_session_gets_qos1_queued_durably_not_qos0() {
    let mut h = harness(10).await;
    h.persist("p").await;
    h.subscribe(session("p", None, true), vec![item("t", QoS::AtLeastOnce)]).await;
    h.publish(msg("t", QoS::AtLeastOnce, false, b"one", None)).await;
    h.publish(msg("t", QoS::AtMostOnce, false, b"zero", None)).await;
    let q = h.store.load_queue("p", 0).await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(&Message::decode(&q[0].message).unwrap().payload[..], b"one");
    h.nothing_delivered();
}

#[tokio::test]
async fn online_persistent_session_gets_live_copy_with_its_queue_position() {
    let mut h = harness(10).await;
    h.persist("p").await;
    h.subscribe(session("p", Some(7), true), vec![item("t", QoS::AtLeastOnce)]).await;
    h.publish(msg("t", QoS::AtLeastOnce, false, b"x", None)).await;
    let d = h.next().await;
    let seq = d.recipients[0].seq.expect("queued durably");
    assert_eq!(h.store.load_queue("p", 0).await.unwrap()[0].seq, seq);
}

#[tokio::test]
async fn full_queue_drops_and_counts() {
    let h = harness(1).await;
    h.persist("p").await;
    h.subscribe(session("p", None, true), vec![item("t", QoS::AtLeastOnce)]).await;
    h.publish(msg("t", QoS::AtLeastOnce, false, b"1", None)).await;
    h.publish(msg("t", QoS::AtLeastOnce, false, b"2", None)).await;
    assert_eq!(h.store.load_queue("p", 0).await.unwrap().len(), 1);
    let dropped = h.metrics.dropped.get_or_create(&broker_shard::metrics::ReasonLabel { reason: "queue_full" }).get();
    assert_eq!(dropped, 1);
}

/// A copy for a session the store no longer has is counted as such, not as a full queue: the
/// three reasons a copy is not queued are told apart (RELIABILITY.md, finding 24).
#[tokio::test]
async fn a_copy_for_a_session_gone_from_the_store_is_counted_apart() {
    let h = harness(10).await;
    h.subscribe(session("gone", None, true), vec![item("t", QoS::AtLeastOnce)]).await;
    h.publish(msg("t", QoS::AtLeastOnce, false, b"1", None)).await;
    let count = |reason| h.metrics.dropped.get_or_create(&broker_shard::metrics::ReasonLabel { reason }).get();
    assert_eq!((count("no_session"), count("queue_full")), (1, 0));
}

#[tokio::test]
async fn detach_then_attach_switches_between_queueing_and_live_delivery() {
    let mut h = harness(10).await;
    h.persist("p").await;
    h.subscribe(session("p", Some(1), true), vec![item("t", QoS::AtLeastOnce)]).await;
    h.client.send(Request::Detach { client_id: "p".into(), conn: ConnId(1) }).await.unwrap();
    h.publish(msg("t", QoS::AtLeastOnce, false, b"offline", None)).await;
    h.nothing_delivered();
    h.client.call(|id| Request::Attach { id, session: session("p", Some(2), true) }).await.unwrap();
    h.publish(msg("t", QoS::AtLeastOnce, false, b"online", None)).await;
    assert_eq!(h.next().await.recipients[0].conn, ConnId(2));
    assert_eq!(h.store.load_queue("p", 0).await.unwrap().len(), 2);
}

#[tokio::test]
async fn detach_of_a_taken_over_connection_is_ignored() {
    let mut h = harness(10).await;
    h.subscribe(session("c", Some(1), false), vec![item("t", QoS::AtMostOnce)]).await;
    h.client.call(|id| Request::Attach { id, session: session("c", Some(2), false) }).await.unwrap();
    // The old connection's late Detach and Forget must not touch the new one.
    h.client.send(Request::Detach { client_id: "c".into(), conn: ConnId(1) }).await.unwrap();
    h.client.send(Request::Forget { client_id: "c".into(), conn: Some(ConnId(1)) }).await.unwrap();
    h.publish(msg("t", QoS::AtMostOnce, false, b"x", None)).await;
    assert_eq!(h.next().await.recipients[0].conn, ConnId(2));
}

#[tokio::test]
async fn forget_removes_every_subscription() {
    let mut h = harness(10).await;
    h.subscribe(session("c", Some(1), false), vec![item("a", QoS::AtMostOnce), item("b/#", QoS::AtMostOnce)]).await;
    assert_eq!(h.metrics.subscriptions.get(), 2);
    h.client.send(Request::Forget { client_id: "c".into(), conn: Some(ConnId(1)) }).await.unwrap();
    h.publish(msg("a", QoS::AtMostOnce, false, b"x", None)).await;
    h.nothing_delivered();
    assert_eq!(h.metrics.subscriptions.get(), 0);
}

#[tokio::test]
async fn shared_subscription_round_robins_and_redispatches_to_another_member() {
    let mut h = harness(10).await;
    for i in 1..=2 {
        h.subscribe(session(&format!("m{i}"), Some(i), false), vec![item("$share/g/t", QoS::AtLeastOnce)]).await;
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..4 {
        h.publish(msg("t", QoS::AtLeastOnce, false, b"x", None)).await;
        let d = h.next().await;
        assert_eq!(d.recipients.len(), 1);
        assert_eq!(d.recipients[0].share_filter.as_deref(), Some("$share/g/t"));
        seen.lock().push(d.recipients[0].conn.0);
    }
    assert_eq!(*seen.lock(), [1, 2, 1, 2]);
    h.client
        .send(Request::Redispatch {
            message: msg("t", QoS::AtLeastOnce, false, b"again", None),
            share_filter: "$share/g/t".into(),
            exclude: "m1".into(),
        })
        .await
        .unwrap();
    let d = h.next().await;
    assert_eq!(d.recipients[0].conn, ConnId(2));
    assert_eq!(&d.message.payload[..], b"again");
}

#[tokio::test]
async fn dollar_topics_are_not_matched_by_leading_wildcards_mqtt_4_7_2_1() {
    let mut h = harness(10).await;
    h.subscribe(session("c", Some(1), false), vec![item("#", QoS::AtMostOnce), item("+/x", QoS::AtMostOnce)]).await;
    h.publish(msg("$SYS/x", QoS::AtMostOnce, false, b"x", None)).await;
    h.publish(msg("a/x", QoS::AtMostOnce, false, b"x", None)).await;
    assert_eq!(&h.next().await.message.topic[..], "a/x");
}

#[tokio::test]
async fn expired_message_is_not_delivered() {
    let mut h = harness(10).await;
    h.subscribe(session("c", Some(1), false), vec![item("t", QoS::AtMostOnce)]).await;
    let mut m = (*msg("t", QoS::AtMostOnce, false, b"x", None)).clone();
    m.expires_at_ms = Some(1);
    h.publish(Arc::new(m)).await;
    h.nothing_delivered();
}

#[tokio::test]
async fn qos2_marker_is_committed_with_the_message() {
    let h = harness(10).await;
    h.persist("p").await;
    let m = msg("t", QoS::ExactlyOnce, false, b"x", Some("p"));
    h.client
        .call(|id| Request::Publish { id: Some(id), message: m, marker: Some(Marker::Qos2 { client_id: "p".into(), pkid: 42 }) })
        .await
        .unwrap();
    assert_eq!(h.store.load_inbound("p").await.unwrap(), [42]);
}
