//! Session state across connections, flow control and per-connection features, checked with a
//! raw client where the exact packets matter and with rumqttc where a real client shows the
//! behaviour.

mod support;

use std::time::Duration;

use bytes::Bytes;
use mqfleet_codec::{Ack, Connect, Packet, PacketId, Protocol, Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions};
use support::*;

fn id(v: u16) -> PacketId {
    PacketId::new(v).unwrap()
}

fn persistent_v5(client_id: &str, expiry: u32) -> Connect {
    let mut c = Connect::new(Protocol::V5, client_id);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(expiry);
    c
}

async fn subscribe(raw: &mut Raw, filter: &str, qos: QoS) {
    raw.send(Packet::Subscribe(Subscribe::new(id(1), vec![(filter.into(), SubscriptionOptions::qos(qos))]))).await;
    match raw.recv().await {
        Some(Packet::SubAck(a)) => assert!(!a.reasons[0].is_error(), "{a:?}"),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Publishes with QoS 1 from a fresh client and waits for the PUBACK.
async fn publish(addr: std::net::SocketAddr, topic: &str, payloads: &[&str]) {
    let mut p = Raw::v5(addr, "publisher").await;
    for (i, payload) in payloads.iter().enumerate() {
        let pkid = id(i as u16 + 1);
        p.send(Packet::Publish(Publish::new(topic, QoS::AtLeastOnce, Bytes::copy_from_slice(payload.as_bytes()), Some(pkid)))).await;
        match p.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.reason, ReasonCode::Success),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

async fn next_publish(raw: &mut Raw) -> Publish {
    loop {
        match raw.recv().await {
            Some(Packet::Publish(p)) => return p,
            Some(_) => continue,
            None => panic!("connection closed while waiting for a PUBLISH"),
        }
    }
}

#[tokio::test]
async fn v3_persistent_session_keeps_subscriptions_and_queues_offline_messages() {
    let b = TestBroker::start().await;
    let mut o = v4::options(b.addr, "keeper");
    o.set_clean_session(false);
    let mut c = v4::connect(o.clone()).await;
    c.subscribe("q", v4::QoS::AtLeastOnce).await;
    c.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    publish(b.addr, "q", &["1", "2", "3"]).await;

    let (client, mut el) = v4::AsyncClient::new(o, 10);
    let mut got = Vec::new();
    let mut present = None;
    while got.len() < 3 {
        match tokio::time::timeout(PATIENCE, el.poll()).await.unwrap().unwrap() {
            v4::Event::Incoming(v4::Packet::ConnAck(a)) => present = Some(a.session_present),
            v4::Event::Incoming(v4::Packet::Publish(p)) => got.push(String::from_utf8(p.payload.to_vec()).unwrap()),
            _ => {}
        }
    }
    assert_eq!(present, Some(true), "Session Present [MQTT-3.2.2-2]");
    assert_eq!(got, ["1", "2", "3"], "queued messages in order");
    drop(client);
}

#[tokio::test]
async fn clean_start_discards_the_previous_session_mqtt_3_1_2_4() {
    let b = TestBroker::start().await;
    let (mut c, ack) = Raw::session(b.addr, persistent_v5("cs", 600)).await;
    assert!(!ack.session_present);
    subscribe(&mut c, "cs/t", QoS::AtLeastOnce).await;
    drop(c);
    publish(b.addr, "cs/t", &["queued"]).await;
    let mut fresh = Connect::new(Protocol::V5, "cs");
    fresh.clean_start = true;
    let (mut c, ack) = Raw::session(b.addr, fresh).await;
    assert!(!ack.session_present, "Session Present is 0 after Clean Start [MQTT-3.2.2-2]");
    c.expect_silence().await;
    // The old subscription is gone too.
    publish(b.addr, "cs/t", &["after"]).await;
    c.expect_silence().await;
}

#[tokio::test]
async fn v5_session_with_expiry_0_ends_with_the_connection() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::session(b.addr, persistent_v5("zero", 0)).await;
    subscribe(&mut c, "z", QoS::AtLeastOnce).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_c, ack) = Raw::session(b.addr, persistent_v5("zero", 0)).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn v5_session_expires_after_its_interval() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::session(b.addr, persistent_v5("brief", 1)).await;
    subscribe(&mut c, "b", QoS::AtLeastOnce).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, ack) = Raw::session(b.addr, persistent_v5("brief", 1)).await;
    assert!(ack.session_present, "still there within the interval");
    drop(c);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_c, ack) = Raw::session(b.addr, persistent_v5("brief", 1)).await;
    assert!(!ack.session_present, "expired");
    let (status, body) = b.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("mqfleet_proxy_sessions_expired_total 1"), "{body}");
}

#[tokio::test]
async fn v5_disconnect_may_not_raise_expiry_from_zero() {
    let b = TestBroker::start().await;
    let mut c = Raw::v5(b.addr, "raise").await;
    let mut d = mqfleet_codec::Disconnect::new(ReasonCode::Success);
    d.properties.session_expiry_interval = Some(60);
    c.send(Packet::Disconnect(d)).await;
    match c.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::ProtocolError),
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
}

#[tokio::test]
async fn unacknowledged_qos1_is_resent_with_dup_and_same_id_on_resume_mqtt_4_4_0_1() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::session(b.addr, persistent_v5("dup", 600)).await;
    subscribe(&mut c, "d", QoS::AtLeastOnce).await;
    publish(b.addr, "d", &["m"]).await;
    let first = next_publish(&mut c).await;
    assert!(!first.dup);
    drop(c); // no PUBACK
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut c, ack) = Raw::session(b.addr, persistent_v5("dup", 600)).await;
    assert!(ack.session_present);
    let again = next_publish(&mut c).await;
    assert!(again.dup, "DUP set on redelivery");
    assert_eq!(again.pkid, first.pkid, "same packet identifier");
    assert_eq!(&again.payload[..], b"m");
    c.send(Packet::PubAck(Ack::new(again.pkid.unwrap()))).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut c, _) = Raw::session(b.addr, persistent_v5("dup", 600)).await;
    c.expect_silence().await;
}

#[tokio::test]
async fn qos2_resent_publish_is_delivered_once_even_across_reconnect_bad_input_f47_f51() {
    let b = TestBroker::start().await;
    let mut sub = v5::connect(v5::options(b.addr, "once-sub")).await;
    sub.subscribe("once", v5::QoS::ExactlyOnce).await;

    let (mut p, _) = Raw::session(b.addr, persistent_v5("once-pub", 600)).await;
    let mut msg = Publish::new("once", QoS::ExactlyOnce, Bytes::from_static(b"exactly"), Some(id(5)));
    p.send(Packet::Publish(msg.clone())).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(a)) if a.pkid == id(5)));
    msg.dup = true;
    p.send(Packet::Publish(msg.clone())).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(a)) if a.pkid == id(5)));
    drop(p);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut p, ack) = Raw::session(b.addr, persistent_v5("once-pub", 600)).await;
    assert!(ack.session_present);
    p.send(Packet::Publish(msg)).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(a)) if a.pkid == id(5)));
    p.send(Packet::PubRel(Ack::new(id(5)))).await;
    assert!(matches!(p.recv().await, Some(Packet::PubComp(a)) if a.reason == ReasonCode::Success));

    assert_eq!(&sub.next_publish().await.payload[..], b"exactly");
    sub.expect_no_publish().await;
}

#[tokio::test]
async fn pubrel_for_unknown_id_gets_0x92_bad_input_f48() {
    let b = TestBroker::start().await;
    let mut c = Raw::v5(b.addr, "rel").await;
    c.send(Packet::PubRel(Ack::new(id(77)))).await;
    match c.recv().await {
        Some(Packet::PubComp(a)) => assert_eq!(a.reason, ReasonCode::PacketIdentifierNotFound),
        other => panic!("expected PUBCOMP 0x92, got {other:?}"),
    }
    // Unknown PUBACK/PUBREC/PUBCOMP are ignored; the connection lives.
    c.send(Packet::PubAck(Ack::new(id(78)))).await;
    c.send(Packet::PubComp(Ack::new(id(79)))).await;
    c.send(Packet::PingReq).await;
    assert_eq!(c.recv().await, Some(Packet::PingResp));
}

#[tokio::test]
async fn qos2_outbound_past_pubrec_gets_only_pubrel_on_resume() {
    let b = TestBroker::start().await;
    let (mut c, _) = Raw::session(b.addr, persistent_v5("rel2", 600)).await;
    subscribe(&mut c, "r2", QoS::ExactlyOnce).await;
    let p = v5::connect(v5::options(b.addr, "p")).await;
    p.client.publish("r2", v5::QoS::ExactlyOnce, false, "two").await.unwrap();
    let m = next_publish(&mut c).await;
    let pkid = m.pkid.unwrap();
    c.send(Packet::PubRec(Ack::new(pkid))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRel(a)) if a.pkid == pkid));
    drop(c); // no PUBCOMP
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut c, _) = Raw::session(b.addr, persistent_v5("rel2", 600)).await;
    match c.recv().await {
        Some(Packet::PubRel(a)) => assert_eq!(a.pkid, pkid),
        other => panic!("expected PUBREL again, got {other:?}"),
    }
    c.send(Packet::PubComp(Ack::new(pkid))).await;
    c.expect_silence().await;
}

#[tokio::test]
async fn takeover_closes_the_old_connection_with_0x8e_mqtt_3_1_4_3() {
    let b = TestBroker::start().await;
    let mut old = Raw::v5(b.addr, "twin").await;
    let _new = Raw::v5(b.addr, "twin").await;
    match old.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::SessionTakenOver),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    // 3.1.1: the old connection is closed.
    let mut old = Raw::v4(b.addr, "twin3").await;
    let _new = Raw::v4(b.addr, "twin3").await;
    assert_eq!(old.until_closed().await, None);
}

#[tokio::test]
async fn takeover_keeps_the_persistent_session_and_its_subscriptions() {
    let b = TestBroker::start().await;
    let (mut old, _) = Raw::session(b.addr, persistent_v5("move", 600)).await;
    subscribe(&mut old, "mv", QoS::AtLeastOnce).await;
    let (mut new, ack) = Raw::session(b.addr, persistent_v5("move", 600)).await;
    assert!(ack.session_present);
    assert!(matches!(old.until_closed().await, Some(Packet::Disconnect(_))));
    publish(b.addr, "mv", &["here"]).await;
    assert_eq!(&next_publish(&mut new).await.payload[..], b"here");
}

/// A broker whose sessions hold 2 messages in flight and 3 waiting.
async fn tight_queue() -> TestBroker {
    TestBroker::with(|c| {
        c.max_queued_messages = 3;
        c.max_inflight = 2;
    })
    .await
}

#[tokio::test]
async fn offline_queue_is_bounded_and_drops_are_counted() {
    // Offline, a session holds its in-flight window plus the waiting queue: 2 + 3.
    let b = tight_queue().await;
    let (mut c, _) = Raw::session(b.addr, persistent_v5("bounded", 600)).await;
    subscribe(&mut c, "bq", QoS::AtLeastOnce).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(b.addr, "bq", &["1", "2", "3", "4", "5", "6", "7"]).await;
    let (mut c, _) = Raw::session(b.addr, persistent_v5("bounded", 600)).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let m = next_publish(&mut c).await;
        c.send(Packet::PubAck(Ack::new(m.pkid.unwrap()))).await;
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(got, ["1", "2", "3", "4", "5"]);
    c.expect_silence().await;
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(metrics.contains(r#"mqfleet_shard_dropped_messages_total{reason="queue_full"} 2"#), "{metrics}");
}

#[tokio::test]
async fn a_connected_client_with_a_full_window_still_gets_its_whole_queue() {
    // 2 in flight (unacknowledged) and 3 waiting behind them: nothing is dropped, although the
    // durable queue then holds 5 copies and max_queued_messages is 3.
    let b = tight_queue().await;
    let (mut c, _) = Raw::session(b.addr, persistent_v5("busy", 600)).await;
    subscribe(&mut c, "full", QoS::AtLeastOnce).await;
    publish(b.addr, "full", &["1", "2", "3", "4", "5"]).await;
    let mut window = std::collections::VecDeque::from([next_publish(&mut c).await, next_publish(&mut c).await]);
    c.expect_silence().await; // the window is full: the other three wait
    let mut got = Vec::new();
    while let Some(m) = window.pop_front() {
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
        c.send(Packet::PubAck(Ack::new(m.pkid.unwrap()))).await;
        if got.len() + window.len() < 5 {
            window.push_back(next_publish(&mut c).await);
        }
    }
    assert_eq!(got, ["1", "2", "3", "4", "5"]);
    let (_, metrics) = b.http_get("/metrics").await;
    let dropped = metrics.lines().find_map(|l| l.strip_prefix(r#"mqfleet_shard_dropped_messages_total{reason="queue_full"} "#));
    assert!(dropped.is_none_or(|n| n == "0"), "{metrics}");
}

/// A persistent session of a client whose Receive Maximum is 1, on a broker whose sessions
/// hold 2 + 3 (`tight_queue`): its connection holds 1 in flight and 3 waiting, while the store
/// queue takes 5.
fn window_of_one(client_id: &str) -> Connect {
    let mut connect = persistent_v5(client_id, 600);
    connect.properties.receive_maximum = Some(1);
    connect
}

/// Receives and acknowledges `n` QoS 1 messages, one at a time, on one connection.
async fn take_one_by_one(c: &mut Raw, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        let m = next_publish(c).await;
        c.send(Packet::PubAck(Ack::new(m.pkid.unwrap()))).await;
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    got
}

/// Finding 23 of the soak (docs/RELIABILITY.md): copies that outran a persistent session's
/// connection queue stayed in the store until the client's next connection — never delivered
/// to a client that stayed connected. They are read back from the store, in order
/// [MQTT-4.6.0-6], once there is room.
#[tokio::test]
async fn messages_that_outrun_a_connected_persistent_sessions_queue_are_read_back_from_the_store_in_order() {
    let b = tight_queue().await;
    let (mut c, _) = Raw::session(b.addr, window_of_one("outrun")).await;
    subscribe(&mut c, "burst", QoS::AtLeastOnce).await;
    publish(b.addr, "burst", &["1", "2", "3", "4", "5"]).await;
    assert_eq!(take_one_by_one(&mut c, 5).await, ["1", "2", "3", "4", "5"]);
    c.expect_silence().await;
    assert_eq!(metric(&b, "mqfleet_proxy_store_backlogs_total").await, 1);
    // Caught up, later messages come live again.
    publish(b.addr, "burst", &["6"]).await;
    assert_eq!(take_one_by_one(&mut c, 1).await, ["6"]);
}

/// The same at resume: a stored queue larger than the connection's is taken in order, all of
/// it, without another reconnect.
#[tokio::test]
async fn a_resumed_queue_larger_than_the_connections_is_delivered_whole() {
    let b = tight_queue().await;
    let (mut c, _) = Raw::session(b.addr, window_of_one("resumer")).await;
    subscribe(&mut c, "stored", QoS::AtLeastOnce).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(b.addr, "stored", &["1", "2", "3", "4", "5"]).await;
    let (mut c, _) = Raw::session(b.addr, window_of_one("resumer")).await;
    assert_eq!(take_one_by_one(&mut c, 5).await, ["1", "2", "3", "4", "5"]);
    c.expect_silence().await;
}

#[tokio::test]
async fn client_receive_maximum_limits_messages_in_flight() {
    let b = TestBroker::start().await;
    let mut connect = Connect::new(Protocol::V5, "slow");
    connect.properties.receive_maximum = Some(2);
    let (mut c, _) = Raw::session(b.addr, connect).await;
    subscribe(&mut c, "rm", QoS::AtLeastOnce).await;
    publish(b.addr, "rm", &["1", "2", "3", "4"]).await;
    let a = next_publish(&mut c).await;
    let _b = next_publish(&mut c).await;
    c.expect_silence().await;
    c.send(Packet::PubAck(Ack::new(a.pkid.unwrap()))).await;
    assert_eq!(&next_publish(&mut c).await.payload[..], b"3");
    c.expect_silence().await;
}

#[tokio::test]
async fn exceeding_server_receive_maximum_is_0x93_bad_input_f49() {
    let b = TestBroker::with(|c| c.receive_maximum = 2).await;
    let (mut c, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "flood")).await;
    assert_eq!(ack.properties.receive_maximum, Some(2));
    for i in 1..=2 {
        c.send(Packet::Publish(Publish::new("f", QoS::ExactlyOnce, Bytes::new(), Some(id(i))))).await;
        assert!(matches!(c.recv().await, Some(Packet::PubRec(_))));
    }
    c.send(Packet::Publish(Publish::new("f", QoS::ExactlyOnce, Bytes::new(), Some(id(3))))).await;
    match c.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::ReceiveMaximumExceeded),
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
}

#[tokio::test]
async fn packet_larger_than_server_maximum_is_0x95_bad_input_a2() {
    let b = TestBroker::with(|c| c.max_packet_size = 128).await;
    let (mut c, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "big")).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(128));
    c.send(Packet::Publish(Publish::new("t", QoS::AtMostOnce, Bytes::from(vec![0u8; 200]), None))).await;
    match c.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::PacketTooLarge),
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
}

#[tokio::test]
async fn client_maximum_packet_size_is_never_exceeded_mqtt_3_1_2_24() {
    let b = TestBroker::start().await;
    let mut connect = Connect::new(Protocol::V5, "small");
    connect.properties.maximum_packet_size = Some(64);
    let (mut c, _) = Raw::session(b.addr, connect).await;
    subscribe(&mut c, "mp", QoS::AtLeastOnce).await;
    publish(b.addr, "mp", &[&"x".repeat(100), "fits"]).await;
    assert_eq!(&next_publish(&mut c).await.payload[..], b"fits");
    c.expect_silence().await;
}

#[tokio::test]
async fn topic_aliases_from_the_client_are_resolved() {
    let b = TestBroker::start().await;
    let mut sub = v5::connect(v5::options(b.addr, "alias-sub")).await;
    sub.subscribe("long/topic/name", v5::QoS::AtMostOnce).await;
    let (mut c, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "alias-pub")).await;
    let max = ack.properties.topic_alias_maximum.unwrap();
    assert!(max >= 1);
    let mut define = Publish::new("long/topic/name", QoS::AtMostOnce, Bytes::from_static(b"1"), None);
    define.properties.topic_alias = Some(1);
    c.send(Packet::Publish(define)).await;
    let mut use_alias = Publish::new("", QoS::AtMostOnce, Bytes::from_static(b"2"), None);
    use_alias.properties.topic_alias = Some(1);
    c.send(Packet::Publish(use_alias)).await;
    for expected in ["1", "2"] {
        let m = sub.next_publish().await;
        assert_eq!(m.topic, "long/topic/name");
        assert_eq!(&m.payload[..], expected.as_bytes());
    }
    // An alias above our maximum is 0x94 [MQTT-3.3.2-9].
    let mut bad = Publish::new("x", QoS::AtMostOnce, Bytes::new(), None);
    bad.properties.topic_alias = Some(max + 1);
    c.send(Packet::Publish(bad)).await;
    match c.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::TopicAliasInvalid),
        other => panic!("expected DISCONNECT 0x94, got {other:?}"),
    }
}

#[tokio::test]
async fn topic_aliases_are_assigned_towards_clients_that_accept_them() {
    let b = TestBroker::start().await;
    let mut connect = Connect::new(Protocol::V5, "alias-rx");
    connect.properties.topic_alias_maximum = Some(4);
    let (mut c, _) = Raw::session(b.addr, connect).await;
    subscribe(&mut c, "al/t", QoS::AtMostOnce).await;
    let p = v5::connect(v5::options(b.addr, "p")).await;
    p.client.publish("al/t", v5::QoS::AtMostOnce, false, "1").await.unwrap();
    p.client.publish("al/t", v5::QoS::AtMostOnce, false, "2").await.unwrap();
    let first = next_publish(&mut c).await;
    assert_eq!(&first.topic[..], "al/t");
    let alias = first.properties.topic_alias.expect("alias defined");
    let second = next_publish(&mut c).await;
    assert_eq!(&second.topic[..], "", "topic replaced by its alias");
    assert_eq!(second.properties.topic_alias, Some(alias));
}

#[tokio::test]
async fn keepalive_timeout_closes_with_0x8d_after_one_and_a_half_intervals() {
    let b = TestBroker::start().await;
    let mut connect = Connect::new(Protocol::V5, "sleepy");
    connect.keep_alive = 1;
    let (mut c, _) = Raw::session(b.addr, connect).await;
    let started = tokio::time::Instant::now();
    match c.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::KeepAliveTimeout),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(1400), "closed too early: {:?}", started.elapsed());
}

#[tokio::test]
async fn pingreq_keeps_the_connection_alive() {
    let b = TestBroker::start().await;
    let mut connect = Connect::new(Protocol::V3_1_1, "pinger");
    connect.keep_alive = 1;
    let (mut c, _) = Raw::session(b.addr, connect).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        c.send(Packet::PingReq).await;
        assert_eq!(c.recv().await, Some(Packet::PingResp));
    }
}

#[tokio::test]
async fn server_keep_alive_and_assigned_client_identifier() {
    let b = TestBroker::with(|c| c.max_keepalive_secs = 30).await;
    let mut connect = Connect::new(Protocol::V5, "");
    connect.keep_alive = 600;
    let (_c, ack) = Raw::session(b.addr, connect).await;
    assert_eq!(ack.properties.server_keep_alive, Some(30));
    let assigned = ack.properties.assigned_client_identifier.expect("assigned id [MQTT-3.2.2-16]");
    assert!(!assigned.is_empty());
    // 3.1.1 above the maximum: refused (BAD-INPUT C.25).
    let mut connect = Connect::new(Protocol::V3_1_1, "ka");
    connect.keep_alive = 600;
    let (_c, ack) = Raw::session(b.addr, connect).await;
    assert_eq!(ack.reason, ReasonCode::ClientIdentifierNotValid);
}

#[tokio::test]
async fn shared_subscription_round_robins_across_members_of_both_versions() {
    let b = TestBroker::start().await;
    let mut m5 = v5::connect(v5::options(b.addr, "m5")).await;
    m5.subscribe("$share/workers/jobs/+", v5::QoS::AtLeastOnce).await;
    let mut m3 = v4::connect(v4::options(b.addr, "m3")).await;
    m3.subscribe("$share/workers/jobs/+", v4::QoS::AtLeastOnce).await;
    let p = v5::connect(v5::options(b.addr, "boss")).await;
    for i in 0..6 {
        p.client.publish("jobs/a", v5::QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
    }
    let mut count5 = 0;
    let mut count3 = 0;
    for _ in 0..3 {
        m5.next_publish().await;
        count5 += 1;
        m3.next_publish().await;
        count3 += 1;
    }
    m5.expect_no_publish().await;
    m3.expect_no_publish().await;
    assert_eq!((count5, count3), (3, 3), "each member gets half");
}

#[tokio::test]
async fn unacknowledged_shared_message_goes_to_another_member_when_one_leaves() {
    let b = TestBroker::start().await;
    let mut stays = v5::connect(v5::options(b.addr, "stays")).await;
    stays.subscribe("$share/g/w", v5::QoS::AtLeastOnce).await;
    let mut leaves = Raw::v5(b.addr, "leaves").await;
    subscribe(&mut leaves, "$share/g/w", QoS::AtLeastOnce).await;
    let p = v5::connect(v5::options(b.addr, "p")).await;
    // Two messages: one for each member, round robin.
    p.client.publish("w", v5::QoS::AtLeastOnce, false, "a").await.unwrap();
    p.client.publish("w", v5::QoS::AtLeastOnce, false, "b").await.unwrap();
    let unacked = next_publish(&mut leaves).await;
    let first = stays.next_publish().await;
    drop(leaves); // leaves without PUBACK
    let redispatched = stays.next_publish().await;
    assert_eq!(redispatched.payload, unacked.payload);
    assert_ne!(redispatched.payload, first.payload);
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error_bad_input_g55() {
    let b = TestBroker::start().await;
    let mut c = Raw::v5(b.addr, "nlshare").await;
    let opts = SubscriptionOptions { no_local: true, ..SubscriptionOptions::qos(QoS::AtMostOnce) };
    c.send(Packet::Subscribe(Subscribe::new(id(1), vec![("$share/g/x".into(), opts)]))).await;
    match c.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::ProtocolError),
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
}

#[tokio::test]
async fn message_expiring_while_queued_behind_the_window_is_not_sent() {
    let b = TestBroker::start().await;
    let mut connect = Connect::new(Protocol::V5, "window1");
    connect.properties.receive_maximum = Some(1);
    let (mut c, _) = Raw::session(b.addr, connect).await;
    subscribe(&mut c, "ex", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(b.addr, "expirer").await;
    p.send(Packet::Publish(Publish::new("ex", QoS::AtLeastOnce, Bytes::from_static(b"first"), Some(id(1))))).await;
    let mut short = Publish::new("ex", QoS::AtLeastOnce, Bytes::from_static(b"short-lived"), Some(id(2)));
    short.properties.message_expiry_interval = Some(1);
    p.send(Packet::Publish(short)).await;
    p.send(Packet::Publish(Publish::new("ex", QoS::AtLeastOnce, Bytes::from_static(b"last"), Some(id(3))))).await;
    let first = next_publish(&mut c).await;
    assert_eq!(&first.payload[..], b"first");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    c.send(Packet::PubAck(Ack::new(first.pkid.unwrap()))).await;
    assert_eq!(&next_publish(&mut c).await.payload[..], b"last", "the expired message is skipped");
}

/// Found by the fault-injection soak: the store went away just as a QoS 2 flow completed, so
/// the entry's removal was lost; its packet id was then reused for a newer message. On resume
/// the older entry is complete (an id is reused only after its flow ends) and the newer one is
/// resent with its id — not the other way round, which delivered the newer message twice.
/// A persistent session `client` subscribed to `t` at `qos`, offline, with messages "A" and "B"
/// queued in the delivery states `states` (as a lost or late write left them).
async fn offline_with_two_entries(b: &TestBroker, client: &str, qos: QoS, states: [session_store::DeliveryState; 2]) {
    let (mut c, _) = Raw::session(b.addr, persistent_v5(client, 600)).await;
    subscribe(&mut c, "t", qos).await;
    c.send(Packet::Disconnect(mqfleet_codec::Disconnect::new(ReasonCode::Success))).await;
    assert_eq!(c.until_closed().await, None);
    let store = &b.context().store;
    for (payload, state) in ["A", "B"].into_iter().zip(states) {
        let m = broker_shard::Message::from_publish(Publish::new("t", qos, payload, Some(id(1))), None, 0);
        let delivery = session_store::Delivery { qos: qos as u8, retain: false, subscription_ids: Vec::new() };
        let op = session_store::Op::Enqueue { message: m.encode(), expires_at_ms: None, to: vec![(client.into(), delivery)], origin: None };
        let seq = match store.write(vec![op]).await.unwrap().pop() {
            Some(session_store::OpResult::Enqueued(p)) => p[0].seq().expect("queued"),
            other => panic!("{other:?}"),
        };
        store.write(vec![session_store::Op::SetState { client_id: client.into(), seq, state }]).await.unwrap();
    }
}

#[tokio::test]
async fn a_qos1_entry_whose_id_a_newer_entry_recorded_is_sent_again_not_dropped() {
    let b = TestBroker::start().await;
    // A and B both recorded as sent with id 7: A by a connection the client had abandoned (or a
    // write that landed late), so A may never have reached the client.
    let sent = session_store::DeliveryState::Sent { pkid: 7 };
    offline_with_two_entries(&b, "shared-id", QoS::AtLeastOnce, [sent, sent]).await;

    let (mut c, ack) = Raw::session(b.addr, persistent_v5("shared-id", 600)).await;
    assert!(ack.session_present);
    // Both arrive, in order: A under a fresh id (a duplicate is allowed at QoS 1, a loss is
    // not), B with its id and DUP [MQTT-4.4.0-1].
    let mut got = Vec::new();
    for _ in 0..2 {
        match c.recv().await {
            Some(Packet::Publish(p)) => {
                let pkid = p.pkid.expect("QoS 1");
                got.push((String::from_utf8_lossy(&p.payload).to_string(), pkid == id(7), p.dup));
                c.send(Packet::PubAck(Ack::new(pkid))).await;
            }
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(got, [("A".to_string(), false, false), ("B".to_string(), true, true)]);
    c.expect_silence().await;
}

#[tokio::test]
async fn an_entry_whose_completion_was_not_recorded_does_not_push_a_newer_one_onto_a_fresh_id() {
    let b = TestBroker::start().await;
    // The store as the lost write left it: A completed with id 7 (only PUBREL recorded), B
    // then sent with id 7.
    let states = [session_store::DeliveryState::Released { pkid: 7 }, session_store::DeliveryState::Sent { pkid: 7 }];
    offline_with_two_entries(&b, "lossy", QoS::ExactlyOnce, states).await;

    let (mut c, ack) = Raw::session(b.addr, persistent_v5("lossy", 600)).await;
    assert!(ack.session_present);
    // B again with its id and DUP [MQTT-4.4.0-1]; nothing of A.
    match c.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!((&p.payload[..], p.pkid, p.dup), (&b"B"[..], Some(id(7)), true));
        }
        other => panic!("expected B resent, got {other:?}"),
    }
    c.send(Packet::PubRec(Ack::new(id(7)))).await;
    assert_eq!(c.recv().await, Some(Packet::PubRel(Ack::new(id(7)))));
    c.send(Packet::PubComp(Ack::new(id(7)))).await;
    c.expect_silence().await;
}
