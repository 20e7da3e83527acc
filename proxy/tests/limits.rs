//! Admission limits and the PROXY protocol: the real source address from a v1/v2 header feeds
//! the per-address limits; untrusted senders, missing and garbage headers are closed; CONNECT
//! rates answer 0x9F; a client over its publish rate is slowed down, not cut off.

mod support;

use std::net::SocketAddr;

use mqfleet_codec::{Connect, Packet, PacketId, Protocol, Publish, QoS, ReasonCode};
use support::*;

fn v2_header(source: &str) -> Vec<u8> {
    let addrs: ppp::v2::Addresses = (source.parse::<SocketAddr>().unwrap(), "10.0.0.1:1883".parse::<SocketAddr>().unwrap()).into();
    ppp::v2::Builder::with_addresses(ppp::v2::Version::Two | ppp::v2::Command::Proxy, ppp::v2::Protocol::Stream, addrs).build().unwrap()
}

/// Sends `header` and a 5.0 CONNECT; the CONNACK's reason, or `None` if the server closed.
async fn connect_behind(addr: SocketAddr, header: &[u8], client_id: &str) -> (Raw, Option<ReasonCode>) {
    let mut raw = Raw::connect(addr).await;
    let mut bytes = bytes::BytesMut::from(header);
    Packet::Connect(Box::new(Connect::new(Protocol::V5, client_id))).encode(Protocol::V5, &mut bytes).unwrap();
    // One write, tolerant of the server having closed already (a refused header).
    raw.send_bytes(&bytes).await;
    let reason = match raw.recv().await {
        Some(Packet::ConnAck(a)) => Some(a.reason),
        None => None,
        other => panic!("expected CONNACK or close, got {other:?}"),
    };
    (raw, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_header_source_feeds_the_per_address_limit_bad_input_a8() {
    let b = TestBroker::with(|c| {
        c.proxy_protocol = "mqtt".into();
        c.proxy_protocol_from = "127.0.0.0/8".into();
        c.max_connections_per_ip = 1;
    })
    .await;
    let (_a, reason) = connect_behind(b.addr, &v2_header("203.0.113.1:40000"), "a").await;
    assert_eq!(reason, Some(ReasonCode::Success));
    let (_b, reason) = connect_behind(b.addr, b"PROXY TCP4 203.0.113.2 10.0.0.1 40001 1883\r\n", "b").await;
    assert_eq!(reason, Some(ReasonCode::Success), "another device behind the same balancer");
    let (_c, reason) = connect_behind(b.addr, &v2_header("203.0.113.1:40002"), "c").await;
    assert_eq!(reason, Some(ReasonCode::QuotaExceeded), "a second connection from 203.0.113.1");
    assert_eq!(metric(&b, "mqfleet_proxy_limited_total{reason=\"max_connections_per_ip\"}").await, 1);

    // A header split across many reads is read whole.
    let mut split = Raw::connect(b.addr).await;
    for byte in v2_header("203.0.113.4:40003") {
        split.send_bytes(&[byte]).await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    split.send(Packet::Connect(Box::new(Connect::new(Protocol::V5, "split")))).await;
    assert!(matches!(split.recv().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success));

    // No header, a garbage header, a TLV running past the header: closed without a CONNACK.
    let mut bad_tlv = v2_header("203.0.113.3:1");
    bad_tlv[15] += 3;
    bad_tlv.extend_from_slice(&[0x04, 0x00, 0x09]);
    for header in [&b""[..], b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n", &bad_tlv] {
        let (_x, reason) = connect_behind(b.addr, header, "x").await;
        assert_eq!(reason, None, "header {:?}", String::from_utf8_lossy(header));
    }
    assert_eq!(metric(&b, "mqfleet_proxy_disconnects_total{reason=\"proxy_header\"}").await, 3);

    // From outside the trusted networks, even a well-formed header is refused.
    let strict = TestBroker::with(|c| {
        c.proxy_protocol = "mqtt".into();
        c.proxy_protocol_from = "10.0.0.0/8".into();
    })
    .await;
    let (_y, reason) = connect_behind(strict.addr, &v2_header("203.0.113.9:1"), "y").await;
    assert_eq!(reason, None);
    assert_eq!(metric(&strict, "mqfleet_proxy_disconnects_total{reason=\"proxy_untrusted\"}").await, 1);

    // A listener not configured for PROXY takes a header for a malformed packet.
    let plain = TestBroker::start().await;
    let (_z, reason) = connect_behind(plain.addr, &v2_header("203.0.113.9:1"), "z").await;
    assert_eq!(reason, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rates_are_refused_with_0x9f_in_both_versions_bad_input_61() {
    let b = TestBroker::with(|c| c.max_connect_rate_per_ip = 3).await;
    for i in 0..3 {
        Raw::v5(b.addr, &format!("ok-{i}")).await;
    }
    let (_r, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "too-fast")).await;
    assert_eq!(ack.reason, ReasonCode::ConnectionRateExceeded);
    let (_r, ack) = Raw::session(b.addr, Connect::new(Protocol::V3_1_1, "too-fast-4")).await;
    assert_eq!(ack.reason, ReasonCode::ServerUnavailable, "3.1.1 return code 3");
    assert_eq!(metric(&b, "mqfleet_proxy_limited_total{reason=\"connect_rate_per_ip\"}").await, 2);
    // The bucket refills (3 per second).
    let mut again = None;
    for _ in 0..50 {
        let (_r, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "later")).await;
        if ack.reason == ReasonCode::Success {
            again = Some(ack);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "the rate never let a client in again");

    let total = TestBroker::with(|c| c.max_connect_rate = 2).await;
    Raw::v5(total.addr, "t1").await;
    Raw::v5(total.addr, "t2").await;
    let (_r, ack) = Raw::session(total.addr, Connect::new(Protocol::V5, "t3")).await;
    assert_eq!(ack.reason, ReasonCode::ConnectionRateExceeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_publish_rate_is_throttled_and_loses_nothing() {
    let b = TestBroker::with(|c| c.max_publish_rate = 20).await;
    let mut sub = Raw::v5(b.addr, "sub").await;
    sub.send(Packet::Subscribe(mqfleet_codec::Subscribe::new(
        PacketId::new(1).unwrap(),
        vec![("rate/t".into(), mqfleet_codec::SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() })],
    )))
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    // 60 QoS 1 messages written at once: 20 may pass at once, the rest at 20 per second.
    let mut publisher = Raw::v5(b.addr, "fast").await;
    let mut burst = bytes::BytesMut::new();
    for i in 1..=60u16 {
        Packet::Publish(Publish::new("rate/t", QoS::AtLeastOnce, i.to_be_bytes().to_vec(), PacketId::new(i)))
            .encode(Protocol::V5, &mut burst)
            .unwrap();
    }
    publisher.send_bytes(&burst).await;
    let mut got = Vec::new();
    while got.len() < 60 {
        match sub.recv().await {
            Some(Packet::Publish(p)) => got.push(u16::from_be_bytes([p.payload[0], p.payload[1]])),
            other => panic!("expected the next message, got {other:?}"),
        }
    }
    assert_eq!(got, (1..=60).collect::<Vec<_>>(), "every message, in order");
    assert!(metric(&b, "mqfleet_proxy_limited_total{reason=\"publish_rate\"}").await >= 1, "the client was throttled");
    let mut acks = 0;
    while acks < 60 {
        if let Some(Packet::PubAck(a)) = publisher.recv().await {
            assert_eq!(a.reason, ReasonCode::Success);
            acks += 1;
        }
    }
}

async fn retain(c: &mut Raw, pkid: u16, topic: &str, payload: &[u8]) -> ReasonCode {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec(), PacketId::new(pkid));
    p.retain = true;
    c.send(Packet::Publish(p)).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => a.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_quotas_refuse_new_retained_messages_with_0x97_bad_input_63() {
    // One in-process shard, so the quota is the broker's.
    let b = TestBroker::with(|c| {
        c.shards = "local:1".into();
        c.max_retained_messages = 2;
        c.max_retained_bytes = 12;
    })
    .await;
    let mut c = Raw::v5(b.addr, "retainer").await;
    assert_eq!(retain(&mut c, 1, "r/1", b"aaaa").await, ReasonCode::Success);
    assert_eq!(retain(&mut c, 2, "r/2", b"bbbb").await, ReasonCode::Success);
    assert_eq!(retain(&mut c, 3, "r/3", b"cccc").await, ReasonCode::QuotaExceeded, "a third retained topic");
    assert_eq!(retain(&mut c, 4, "r/1", b"AAAAAAAA").await, ReasonCode::Success, "replacing within the byte quota");
    assert_eq!(retain(&mut c, 5, "r/2", b"BBBBBBBBB").await, ReasonCode::QuotaExceeded, "8 + 9 bytes exceed 12");
    assert_eq!(retain(&mut c, 6, "r/2", b"").await, ReasonCode::Success, "deleting is always allowed");
    assert_eq!(retain(&mut c, 7, "r/3", b"cccc").await, ReasonCode::Success, "room again");

    // A 3.1.1 client over quota is acknowledged (it has no refusal code) but nothing is kept.
    let mut old = Raw::v4(b.addr, "retainer-4").await;
    assert_eq!(retain(&mut old, 1, "r/4", b"dd").await, ReasonCode::Success);
    let mut sub = Raw::v5(b.addr, "reader").await;
    sub.send(Packet::Subscribe(mqfleet_codec::Subscribe::new(
        PacketId::new(1).unwrap(),
        vec![("r/#".into(), mqfleet_codec::SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() })],
    )))
    .await;
    let mut topics = Vec::new();
    loop {
        match sub.recv_within(std::time::Duration::from_millis(500)).await {
            Ok(Some(Packet::Publish(p))) => topics.push(p.topic.to_string()),
            Ok(Some(Packet::SubAck(_))) => {}
            _ => break,
        }
    }
    topics.sort();
    assert_eq!(topics, ["r/1", "r/3"]);
    assert_eq!(metric(&b, "mqfleet_proxy_dropped_messages_total{reason=\"retained_quota\"}").await, 3);
    assert_eq!(metric(&b, "mqfleet_shard_retained_refused_total").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_loses_qos0_not_the_publisher_bad_input_65() {
    let b = TestBroker::with(|c| c.max_write_buffer = 64 * 1024).await;
    // A subscriber that subscribes and then never reads its socket again.
    let mut stuck = Raw::v5(b.addr, "stuck").await;
    stuck
        .send(Packet::Subscribe(mqfleet_codec::Subscribe::new(
            PacketId::new(1).unwrap(),
            vec![("fire/#".into(), mqfleet_codec::SubscriptionOptions::default())],
        )))
        .await;
    assert!(matches!(stuck.recv().await, Some(Packet::SubAck(_))));
    let mut publisher = Raw::v5(b.addr, "hose").await;
    let payload = vec![7u8; 1024];
    let mut burst = bytes::BytesMut::new();
    for _ in 0..20_000 {
        Packet::Publish(Publish::new("fire/hose", QoS::AtMostOnce, payload.clone(), None)).encode(Protocol::V5, &mut burst).unwrap();
    }
    publisher.send_bytes(&burst).await;
    // The publisher is not held back by the stuck reader: its next QoS 1 is acknowledged.
    publisher.send(Packet::Publish(Publish::new("other", QoS::AtLeastOnce, &b"x"[..], PacketId::new(1)))).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.reason == ReasonCode::Success));
    assert!(metric(&b, "mqfleet_proxy_dropped_messages_total{reason=\"slow_consumer\"}").await > 0);
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_authenticated_connections_are_bounded_by_the_connection_limits_bad_input_62() {
    // Memory per idle connection is measured by bench/compare (docs/BENCHMARKS.md); what
    // bounds their number is checked here (the per-address bound in the PROXY test above).
    let b = TestBroker::with(|c| c.max_connections = 250).await;
    let mut idle = Vec::new();
    for i in 0..250 {
        let mut connect = Connect::new(Protocol::V5, format!("idle-{i}"));
        connect.keep_alive = 0;
        let (c, ack) = Raw::session(b.addr, connect).await;
        assert_eq!(ack.reason, ReasonCode::Success);
        idle.push(c);
    }
    let mut extra = Raw::connect(b.addr).await;
    extra
        .send_bytes(&{
            let mut buf = bytes::BytesMut::new();
            Packet::Connect(Box::new(Connect::new(Protocol::V5, "one-too-many"))).encode(Protocol::V5, &mut buf).unwrap();
            buf
        })
        .await;
    assert_eq!(extra.recv().await, None, "closed at accept, beyond max_connections");
    assert_eq!(metric(&b, "mqfleet_proxy_disconnects_total{reason=\"max_connections\"}").await, 1);
    assert_eq!(b.context().metrics.connections.get(), 250);
    drop(idle);
    eventually("idle connections closed", || b.context().metrics.connections.get() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_tree_explosion_is_capped_per_client_and_matching_stays_right_bad_input_64() {
    let b = TestBroker::with(|c| c.max_subscriptions = 2000).await;
    let mut sub = Raw::v5(b.addr, "exploder").await;
    let opts = mqfleet_codec::SubscriptionOptions::default();
    // 2000 distinct wildcard filters in batches of 100, then one more.
    for batch in 0..20u16 {
        let filters = (0..100).map(|i| (format!("x/{batch}/{i}/+/+/#").into(), opts)).collect();
        sub.send(Packet::Subscribe(mqfleet_codec::Subscribe::new(PacketId::new(batch + 1).unwrap(), filters))).await;
        assert!(matches!(sub.recv().await, Some(Packet::SubAck(a)) if a.reasons.iter().all(|r| *r == ReasonCode::Success)));
    }
    sub.send(Packet::Subscribe(mqfleet_codec::Subscribe::new(PacketId::new(99).unwrap(), vec![("x/+/+/+/+/+/#".into(), opts)]))).await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(a)) if a.reasons == [ReasonCode::QuotaExceeded]));
    assert_eq!(metric(&b, "mqfleet_proxy_limited_total{reason=\"max_subscriptions\"}").await, 1);
    // Matching through the big tree still finds exactly the one matching filter.
    let mut publisher = Raw::v5(b.addr, "pub").await;
    publisher.send(Packet::Publish(Publish::new("x/7/42/a/b/c", QoS::AtMostOnce, &b"hit"[..], None))).await;
    publisher.send(Packet::Publish(Publish::new("x/7/100/a/b", QoS::AtMostOnce, &b"miss"[..], None))).await;
    assert!(matches!(sub.recv().await, Some(Packet::Publish(p)) if &p.payload[..] == b"hit"));
    sub.expect_silence().await;
}
