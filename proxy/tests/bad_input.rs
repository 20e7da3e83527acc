//! Groups A–G of BAD-INPUT.md: hostile or broken input as raw bytes on a socket. Each test
//! names its row; the server must answer as the specification says and keep serving others.

mod support;

use std::time::Duration;

use bytes::Bytes;
use mqfleet_codec::{Ack, Connect, Packet, PacketId, Protocol, Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions, Unsubscribe};
use support::*;
use tokio::io::AsyncWriteExt;

fn id(v: u16) -> PacketId {
    PacketId::new(v).unwrap()
}

async fn expect_disconnect(raw: &mut Raw, reason: ReasonCode) {
    match raw.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, reason, "{d:?}"),
        other => panic!("expected DISCONNECT {reason}, got {other:?}"),
    }
}

async fn expect_connack(raw: &mut Raw, reason: ReasonCode) {
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.reason, reason, "{a:?}"),
        other => panic!("expected CONNACK {reason}, got {other:?}"),
    }
    assert_eq!(raw.until_closed().await, None, "closed after the refusal");
}

/// After every test the broker still serves a normal client.
async fn still_serving(b: &TestBroker) {
    let mut c = Raw::v4(b.addr, "healthy").await;
    c.send(Packet::PingReq).await;
    assert_eq!(c.recv().await, Some(Packet::PingResp));
}

fn connect_bytes(name: &[u8], level: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, flags, 0x00, 0x3c]);
    if level == 5 {
        body.push(0x00);
    }
    body.extend_from_slice(payload);
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

// === A. Framing / transport ===

#[tokio::test]
async fn a1_remaining_length_of_five_bytes_is_0x81() {
    let b = TestBroker::start().await;
    let mut c = Raw::v5(b.addr, "a1").await;
    c.send_bytes(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]).await;
    expect_disconnect(&mut c, ReasonCode::MalformedPacket).await;
    still_serving(&b).await;
}

#[tokio::test]
async fn a2_oversize_declared_length_is_refused_from_the_header_alone() {
    let b = TestBroker::with(|c| c.max_packet_size = 1024).await;
    let mut c = Raw::v5(b.addr, "a2").await;
    // Declares 268 MB, sends only the header: refused at once, nothing allocated for it.
    c.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    expect_disconnect(&mut c, ReasonCode::PacketTooLarge).await;
    // Before CONNECT as well.
    let mut c = Raw::connect(b.addr).await;
    c.send_bytes(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    assert_eq!(c.until_closed().await, None);
    still_serving(&b).await;
}

#[tokio::test]
async fn a3_a5_partial_or_absent_connect_is_closed_by_the_connect_timeout() {
    let b = TestBroker::with(|c| c.connect_timeout_ms = 500).await;
    let mut partial = Raw::connect(b.addr).await;
    partial.send_bytes(&[0x10, 0x7F, 0x00, 0x04, b'M']).await;
    let mut silent = Raw::connect(b.addr).await;
    let started = tokio::time::Instant::now();
    assert_eq!(partial.until_closed().await, None);
    assert_eq!(silent.until_closed().await, None);
    assert!(started.elapsed() < Duration::from_secs(3));
    still_serving(&b).await;
}

#[tokio::test]
async fn a3_partial_packet_after_connect_is_closed_by_keepalive() {
    let b = TestBroker::start().await;
    let mut connect = Connect::new(Protocol::V5, "a3");
    connect.keep_alive = 1;
    let (mut c, _) = Raw::session(b.addr, connect).await;
    c.send_bytes(&[0x30, 0x7F, 0x00, 0x01]).await;
    expect_disconnect(&mut c, ReasonCode::KeepAliveTimeout).await;
}

#[tokio::test]
async fn a4_slow_drip_connect_is_cut_by_the_connect_timeout() {
    let b = TestBroker::with(|c| c.connect_timeout_ms = 800).await;
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let bytes = connect_bytes(b"MQTT", 4, 0x02, &[0, 5, b'd', b'r', b'i', b'p', b'!']);
    let mut closed = false;
    for byte in bytes {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if s.write_all(&[byte]).await.is_err() {
            closed = true;
            break;
        }
    }
    if !closed {
        // All bytes were accepted by the kernel; the server must have closed by now anyway.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(PATIENCE, tokio::io::AsyncReadExt::read(&mut s, &mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "connection closed without CONNACK");
    }
}

#[tokio::test]
async fn a5_many_idle_sockets_are_all_closed() {
    let b = TestBroker::with(|c| c.connect_timeout_ms = 300).await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(Raw::connect(b.addr).await);
    }
    for mut c in idle {
        assert_eq!(c.until_closed().await, None);
    }
    eventually("connections gauge back to 0", || b.context().metrics.connections.get() == 0).await;
    still_serving(&b).await;
}

#[tokio::test]
async fn a6_coalesced_and_byte_split_packets_behave_the_same() {
    let b = TestBroker::start().await;
    // CONNECT + SUBSCRIBE + PINGREQ in one segment.
    let mut all = connect_bytes(b"MQTT", 4, 0x02, &[0, 2, b'a', b'6']);
    all.extend_from_slice(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00, 0xC0, 0x00]);
    let mut c = Raw::connect(b.addr).await;
    c.protocol = Protocol::V3_1_1;
    c.send_bytes(&all).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(replies(&mut c).await, ["PINGRESP", "SUBACK"]);
    // The same bytes one at a time.
    let mut s = Raw::connect(b.addr).await;
    s.protocol = Protocol::V3_1_1;
    for byte in all.iter().map(|b| if *b == b'6' { b'7' } else { *b }) {
        s.send_bytes(&[byte]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(matches!(s.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(replies(&mut s).await, ["PINGRESP", "SUBACK"]);
}

/// The next two packets' types, sorted: PINGRESP may overtake a SUBACK still waiting for the
/// shards (the specification orders only acknowledgements of the same kind).
async fn replies(c: &mut Raw) -> Vec<String> {
    let mut r = vec![c.recv().await.unwrap().packet_type().to_string(), c.recv().await.unwrap().packet_type().to_string()];
    r.sort();
    r
}

// === B. First packet / packet types ===

#[tokio::test]
async fn b10_first_packet_other_than_connect_is_closed_without_reply_mqtt_3_1_0_1() {
    let b = TestBroker::start().await;
    let first_packets: [&[u8]; 15] = [
        &[0x00, 0x00],
        &[0x20, 0x02, 0x00, 0x00],
        &[0x30, 0x03, 0x00, 0x01, b't'],
        &[0x40, 0x02, 0x00, 0x01],
        &[0x50, 0x02, 0x00, 0x01],
        &[0x62, 0x02, 0x00, 0x01],
        &[0x70, 0x02, 0x00, 0x01],
        &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00],
        &[0x90, 0x03, 0x00, 0x01, 0x00],
        &[0xA2, 0x05, 0x00, 0x01, 0x00, 0x01, b't'],
        &[0xB0, 0x02, 0x00, 0x01],
        &[0xC0, 0x00],
        &[0xD0, 0x00],
        &[0xE0, 0x00],
        &[0xF0, 0x00],
    ];
    for bytes in first_packets {
        let mut c = Raw::connect(b.addr).await;
        c.send_bytes(bytes).await;
        assert_eq!(c.until_closed().await, None, "first packet {bytes:02x?}");
    }
    still_serving(&b).await;
}

#[tokio::test]
async fn b11_second_connect_is_0x82_mqtt_3_1_0_2() {
    let b = TestBroker::start().await;
    let mut c = Raw::v5(b.addr, "b11").await;
    c.send(Packet::Connect(Box::new(Connect::new(Protocol::V5, "b11")))).await;
    expect_disconnect(&mut c, ReasonCode::ProtocolError).await;
}

#[tokio::test]
async fn b12_server_packets_from_a_client_are_0x82() {
    let b = TestBroker::start().await;
    for bytes in
        [&[0x20u8, 0x03, 0x00, 0x00, 0x00][..], &[0x90, 0x04, 0x00, 0x01, 0x00, 0x00], &[0xB0, 0x04, 0x00, 0x01, 0x00, 0x00], &[0xD0, 0x00]]
    {
        let mut c = Raw::v5(b.addr, "b12").await;
        c.send_bytes(bytes).await;
        expect_disconnect(&mut c, ReasonCode::ProtocolError).await;
    }
    // AUTH does not exist in 3.1.1.
    let mut c = Raw::v4(b.addr, "b12v3").await;
    c.send_bytes(&[0xF0, 0x00]).await;
    assert_eq!(c.until_closed().await, None);
    still_serving(&b).await;
}

#[tokio::test]
async fn b13_b14_reserved_flags_and_type_0_are_0x81_mqtt_2_1_3_1() {
    let b = TestBroker::start().await;
    for bytes in [&[0x80u8, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00][..], &[0x60, 0x02, 0x00, 0x01], &[0xC1, 0x00], &[0x00, 0x00]] {
        let mut c = Raw::v5(b.addr, "b13").await;
        c.send_bytes(bytes).await;
        expect_disconnect(&mut c, ReasonCode::MalformedPacket).await;
    }
}

// === C. CONNECT ===

#[tokio::test]
async fn c15_wrong_protocol_name_closes_and_name_level_mismatch_is_refused() {
    let b = TestBroker::start().await;
    for name in [&b"MQTX"[..], b"", b"MQ", b"MQTTMQTTMQTT"] {
        let mut c = Raw::connect(b.addr).await;
        c.send_bytes(&connect_bytes(name, 4, 0x02, &[0, 1, b'a'])).await;
        assert_eq!(c.until_closed().await, None, "name {name:?}");
    }
    let mut c = Raw::connect(b.addr).await;
    c.protocol = Protocol::V3_1_1;
    c.send_bytes(&connect_bytes(b"MQIsdp", 4, 0x02, &[0, 1, b'a'])).await;
    expect_connack(&mut c, ReasonCode::UnsupportedProtocolVersion).await;
}

#[tokio::test]
async fn c16_unsupported_protocol_level_gets_connack_0x84_mqtt_3_1_2_2() {
    let b = TestBroker::start().await;
    for (level, protocol) in [(2u8, Protocol::V3_1_1), (6, Protocol::V5), (255, Protocol::V5)] {
        let mut c = Raw::connect(b.addr).await;
        c.protocol = protocol;
        c.send_bytes(&connect_bytes(b"MQTT", level, 0x02, &[0, 1, b'a'])).await;
        expect_connack(&mut c, ReasonCode::UnsupportedProtocolVersion).await;
    }
}

#[tokio::test]
async fn c17_c18_c20_malformed_connect_flags_close_the_connection() {
    let b = TestBroker::start().await;
    for (flags, payload) in [
        (0x03u8, &[0u8, 1, b'a'][..]),           // reserved bit [MQTT-3.1.2-3]
        (0x0A, &[0, 1, b'a']),                   // will QoS without will flag
        (0x22, &[0, 1, b'a']),                   // will retain without will flag
        (0x1E, &[0, 1, b'a', 0, 1, b't', 0, 0]), // will QoS 3
        (0x06, &[0, 1, b'a']),                   // will flag without topic/payload
        (0x42, &[0, 1, b'a', 0, 1, b'p']),       // password without user name (3.1.1)
        (0x82, &[0, 1, b'a']),                   // user name flag, no user name
    ] {
        let mut c = Raw::connect(b.addr).await;
        c.send_bytes(&connect_bytes(b"MQTT", 4, flags, payload)).await;
        assert_eq!(c.until_closed().await, None, "flags {flags:#04x}");
    }
    still_serving(&b).await;
}

#[tokio::test]
async fn c19_will_topic_with_wildcard_or_reserved_prefix_is_refused() {
    let b = TestBroker::start().await;
    let mut c = Raw::connect(b.addr).await;
    c.protocol = Protocol::V5;
    c.send_bytes(&connect_bytes(b"MQTT", 5, 0x06, &[0, 1, b'a', 0, 0, 3, b'a', b'/', b'#', 0, 0])).await;
    expect_connack(&mut c, ReasonCode::TopicNameInvalid).await;
    let mut c = Raw::connect(b.addr).await;
    c.protocol = Protocol::V5;
    c.send_bytes(&connect_bytes(b"MQTT", 5, 0x06, &[0, 1, b'a', 0, 0, 5, b'$', b'S', b'Y', b'S', b'x', 0, 0])).await;
    expect_connack(&mut c, ReasonCode::NotAuthorized).await;
}

#[tokio::test]
async fn c21_empty_client_id() {
    let b = TestBroker::start().await;
    let mut c = Raw::connect(b.addr).await;
    c.protocol = Protocol::V3_1_1;
    c.send_bytes(&connect_bytes(b"MQTT", 4, 0x00, &[0, 0])).await;
    expect_connack(&mut c, ReasonCode::ClientIdentifierNotValid).await;
    let (_c, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "")).await;
    assert!(ack.properties.assigned_client_identifier.is_some());
}

#[tokio::test]
async fn c22_bad_characters_in_client_id_are_malformed() {
    let b = TestBroker::start().await;
    for bad in [&b"a\x00b"[..], b"\xED\xA0\x80", b"a\x01b", b"\xEF\xBF\xBF", b"\xC2\x85", b"\xC3"] {
        let mut payload = vec![0, bad.len() as u8];
        payload.extend_from_slice(bad);
        let mut c = Raw::connect(b.addr).await;
        c.send_bytes(&connect_bytes(b"MQTT", 4, 0x02, &payload)).await;
        assert_eq!(c.until_closed().await, None, "3.1.1 id {bad:02x?}");
        let mut c = Raw::connect(b.addr).await;
        c.protocol = Protocol::V5;
        c.send_bytes(&connect_bytes(b"MQTT", 5, 0x02, &payload)).await;
        expect_connack(&mut c, ReasonCode::MalformedPacket).await;
    }
    still_serving(&b).await;
}

#[tokio::test]
async fn c23_client_id_with_topic_and_slot_characters_is_just_an_id() {
    let b = TestBroker::start().await;
    let mut c = Raw::v4(b.addr, "dev+#/{slot}").await;
    c.send(Packet::Subscribe(Subscribe::new(id(1), vec![("c23".into(), SubscriptionOptions::qos(QoS::AtMostOnce))]))).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    c.send(Packet::Publish(Publish::new("c23", QoS::AtMostOnce, Bytes::from_static(b"x"), None))).await;
    assert!(matches!(c.recv().await, Some(Packet::Publish(_))));
}

#[tokio::test]
async fn c24_client_id_at_and_above_the_length_limit() {
    let b = TestBroker::with(|c| c.max_client_id_length = 100).await;
    let _ok = Raw::v5(b.addr, &"x".repeat(100)).await;
    let (_c, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "y".repeat(101))).await;
    assert_eq!(ack.reason, ReasonCode::ClientIdentifierNotValid);
}

#[tokio::test]
async fn c27_reconnect_storm_of_one_client_id_leaves_one_connection() {
    let b = TestBroker::start().await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let addr = b.addr;
        tasks.push(tokio::spawn(async move {
            let (c, ack) = Raw::session(addr, Connect::new(Protocol::V5, "storm")).await;
            assert_eq!(ack.reason, ReasonCode::Success);
            c
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    let mut open = 0;
    for mut c in conns {
        c.send(Packet::PingReq).await;
        match c.recv().await {
            Some(Packet::PingResp) => open += 1,
            Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::SessionTakenOver),
            _ => {}
        }
    }
    assert_eq!(open, 1, "exactly one connection owns the client id");
    assert!(b.context().registry.is_connected("storm"));
}

// === D. MQTT 5 properties ===

fn v5_publish_with_props(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01, b't'];
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

#[tokio::test]
async fn d28_d29_d30_property_errors() {
    let b = TestBroker::start().await;
    for (props, reason) in [
        (&[0x02u8, 0, 0, 0, 1, 0x02, 0, 0, 0, 2][..], ReasonCode::ProtocolError), // duplicate
        (&[0x7F, 0], ReasonCode::MalformedPacket),                                // unknown
        (&[0x11, 0, 0, 0, 1], ReasonCode::MalformedPacket),                       // not a PUBLISH property
    ] {
        let mut c = Raw::v5(b.addr, "d28").await;
        c.send_bytes(&v5_publish_with_props(props)).await;
        expect_disconnect(&mut c, reason).await;
    }
    let mut c = Raw::v5(b.addr, "d30").await;
    c.send_bytes(&[0x30, 0x05, 0x00, 0x01, b't', 0x40, 0x00]).await; // property length beyond the packet
    expect_disconnect(&mut c, ReasonCode::MalformedPacket).await;
}

#[tokio::test]
async fn d31_receive_maximum_zero_in_connect_is_0x82() {
    let b = TestBroker::start().await;
    let mut connect = Connect::new(Protocol::V5, "d31");
    connect.properties.receive_maximum = Some(0);
    let mut c = Raw::connect(b.addr).await;
    c.send(Packet::Connect(Box::new(connect))).await;
    expect_connack(&mut c, ReasonCode::ProtocolError).await;
}

#[tokio::test]
async fn d32_user_property_flood_is_survived() {
    let b = TestBroker::start().await;
    let mut sub = Raw::v5(b.addr, "d32sub").await;
    sub.send(Packet::Subscribe(Subscribe::new(id(1), vec![("flood".into(), SubscriptionOptions::qos(QoS::AtMostOnce))]))).await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    let mut c = Raw::v5(b.addr, "d32").await;
    let mut p = Publish::new("flood", QoS::AtMostOnce, Bytes::new(), None);
    p.properties.user_properties = (0..50_000).map(|_| ("k".into(), "v".into())).collect();
    c.send(Packet::Publish(p)).await;
    match sub.recv().await {
        Some(Packet::Publish(m)) => assert_eq!(m.properties.user_properties.len(), 50_000),
        other => panic!("{other:?}"),
    }
    still_serving(&b).await;
}

#[tokio::test]
async fn d33_authentication_method_is_0x8c_and_stray_auth_is_0x82() {
    let b = TestBroker::start().await;
    let mut connect = Connect::new(Protocol::V5, "d33");
    connect.properties.authentication_method = Some("SCRAM-SHA-256".into());
    let mut c = Raw::connect(b.addr).await;
    c.send(Packet::Connect(Box::new(connect))).await;
    expect_connack(&mut c, ReasonCode::BadAuthenticationMethod).await;
    let mut c = Raw::v5(b.addr, "d33b").await;
    c.send_bytes(&[0xF0, 0x00]).await;
    expect_disconnect(&mut c, ReasonCode::ProtocolError).await;
}

#[tokio::test]
async fn d34_payload_not_matching_its_format_indicator_is_0x99() {
    let b = TestBroker::start().await;
    let mut c = Raw::v5(b.addr, "d34").await;
    let mut p = Publish::new("t", QoS::AtLeastOnce, Bytes::from_static(b"\xff\xfe"), Some(id(1)));
    p.properties.payload_format_indicator = Some(true);
    c.send(Packet::Publish(p.clone())).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason, ReasonCode::PayloadFormatInvalid),
        other => panic!("expected PUBACK 0x99, got {other:?}"),
    }
    p.qos = QoS::AtMostOnce;
    p.pkid = None;
    c.send(Packet::Publish(p)).await;
    expect_disconnect(&mut c, ReasonCode::PayloadFormatInvalid).await;
}

// === E. PUBLISH ===

#[tokio::test]
async fn e36_e37_e39_e40_invalid_publish_headers() {
    let b = TestBroker::start().await;
    for (bytes, reason) in [
        (&[0x30u8, 0x05, 0x00, 0x03, b'a', b'/', b'+', 0x00][..], ReasonCode::TopicNameInvalid), // wildcard [MQTT-3.3.2-2]
        (&[0x30, 0x03, 0x00, 0x00, 0x00], ReasonCode::TopicNameInvalid),                         // empty, no alias
        (&[0x36, 0x06, 0x00, 0x01, b't', 0x00, 0x01, 0x00], ReasonCode::MalformedPacket),        // QoS 3 [MQTT-3.3.1-4]
        (&[0x38, 0x04, 0x00, 0x01, b't', 0x00], ReasonCode::MalformedPacket),                    // DUP on QoS 0 [MQTT-3.3.1-2]
        (&[0x32, 0x06, 0x00, 0x01, b't', 0x00, 0x00, 0x00], ReasonCode::ProtocolError),          // packet id 0
    ] {
        let mut c = Raw::v5(b.addr, "e36").await;
        c.send_bytes(bytes).await;
        expect_disconnect(&mut c, reason).await;
    }
    // 3.1.1: the same is closed without DISCONNECT.
    let mut c = Raw::v4(b.addr, "e36v3").await;
    c.send_bytes(&[0x30, 0x02, 0x00, 0x00]).await;
    assert_eq!(c.until_closed().await, None);
}

#[tokio::test]
async fn e38_undefined_topic_alias_is_0x82() {
    let b = TestBroker::start().await;
    let mut c = Raw::v5(b.addr, "e38").await;
    c.send_bytes(&[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x05]).await;
    expect_disconnect(&mut c, ReasonCode::ProtocolError).await;
}

#[tokio::test]
async fn e41_publishing_to_reserved_topics_is_refused() {
    let b = TestBroker::start().await;
    let mut c = Raw::v5(b.addr, "e41").await;
    c.send(Packet::Publish(Publish::new("$SYS/x", QoS::AtLeastOnce, Bytes::new(), Some(id(1))))).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason, ReasonCode::NotAuthorized),
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    // 3.1.1: acknowledged and dropped (no way to refuse), the connection stays.
    let mut c = Raw::v4(b.addr, "e41v3").await;
    c.send(Packet::Publish(Publish::new("$SYS/x", QoS::AtLeastOnce, Bytes::new(), Some(id(1))))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
}

#[tokio::test]
async fn e42_topic_beyond_level_or_length_limits_is_0x90() {
    let b = TestBroker::with(|c| {
        c.max_topic_levels = 4;
        c.max_topic_length = 32
    })
    .await;
    for topic in ["a/b/c/d/e", &"x".repeat(33)] {
        let mut c = Raw::v5(b.addr, "e42").await;
        c.send(Packet::Publish(Publish::new(topic, QoS::AtMostOnce, Bytes::new(), None))).await;
        expect_disconnect(&mut c, ReasonCode::TopicNameInvalid).await;
    }
    let mut c = Raw::v5(b.addr, "e42sub").await;
    c.send(Packet::Subscribe(Subscribe::new(id(1), vec![("a/b/c/d/#".into(), SubscriptionOptions::default())]))).await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(a.reasons, [ReasonCode::TopicFilterInvalid]),
        other => panic!("{other:?}"),
    }
}

// === F. QoS flows ===

#[tokio::test]
async fn f52_pubrec_with_error_ends_the_flow_without_pubrel() {
    let b = TestBroker::start().await;
    let mut c = Raw::v5(b.addr, "f52").await;
    c.send(Packet::Subscribe(Subscribe::new(id(1), vec![("f52".into(), SubscriptionOptions::qos(QoS::ExactlyOnce))]))).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let p = v5::connect(v5::options(b.addr, "p")).await;
    p.client.publish("f52", v5::QoS::ExactlyOnce, false, "1").await.unwrap();
    let Some(Packet::Publish(m)) = c.recv().await else { panic!() };
    c.send(Packet::PubRec(Ack::with_reason(m.pkid.unwrap(), ReasonCode::UnspecifiedError))).await;
    p.client.publish("f52", v5::QoS::ExactlyOnce, false, "2").await.unwrap();
    match c.recv().await {
        Some(Packet::Publish(m2)) => assert_eq!(&m2.payload[..], b"2", "no PUBREL for the refused one"),
        other => panic!("expected the next PUBLISH, got {other:?}"),
    }
}

// === G. SUBSCRIBE / UNSUBSCRIBE ===

#[tokio::test]
async fn g53_subscribe_or_unsubscribe_without_filters_is_0x82() {
    let b = TestBroker::start().await;
    for bytes in [&[0x82u8, 0x03, 0x00, 0x01, 0x00][..], &[0xA2, 0x03, 0x00, 0x01, 0x00]] {
        let mut c = Raw::v5(b.addr, "g53").await;
        c.send_bytes(bytes).await;
        expect_disconnect(&mut c, ReasonCode::ProtocolError).await;
    }
}

#[tokio::test]
async fn g54_g56_invalid_filters_get_failure_codes_not_a_close() {
    let b = TestBroker::start().await;
    let bad = ["a/#/b", "a#", "a/+b", "#/a", "", "$share//a", "$share/g+/a", "$share/g", "$share/g/"];
    let mut filters: Vec<_> = bad.iter().map(|f| ((*f).into(), SubscriptionOptions::default())).collect();
    filters.push(("ok/+".into(), SubscriptionOptions::default()));
    let mut c = Raw::v5(b.addr, "g54").await;
    c.send(Packet::Subscribe(Subscribe::new(id(1), filters.clone()))).await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => {
            assert!(a.reasons[..bad.len()].iter().all(|r| *r == ReasonCode::TopicFilterInvalid), "{a:?}");
            assert_eq!(a.reasons[bad.len()], ReasonCode::Success);
        }
        other => panic!("{other:?}"),
    }
    // 3.1.1: 0x80 per invalid filter.
    let mut c = Raw::v4(b.addr, "g54v3").await;
    c.send(Packet::Subscribe(Subscribe::new(id(1), vec![("a/#/b".into(), SubscriptionOptions::default())]))).await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => assert!(a.reasons[0].is_error()),
        other => panic!("{other:?}"),
    }
    // UNSUBSCRIBE of something never subscribed: 0x11.
    let mut c = Raw::v5(b.addr, "g54u").await;
    c.send(Packet::Unsubscribe(Unsubscribe::new(id(2), vec!["never".into()]))).await;
    match c.recv().await {
        Some(Packet::UnsubAck(a)) => assert_eq!(a.reasons, [ReasonCode::NoSubscriptionExisted]),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn g55_g57_g58_bad_subscribe_encodings() {
    let b = TestBroker::start().await;
    for (bytes, reason) in [
        (&[0x82u8, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x03][..], ReasonCode::MalformedPacket), // QoS 3
        (&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0xC0], ReasonCode::MalformedPacket),       // reserved bits
        (&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30], ReasonCode::ProtocolError),         // Retain Handling 3
        (&[0x82, 0x09, 0x00, 0x01, 0x02, 0x0B, 0x00, 0x00, 0x01, b'a', 0x00], ReasonCode::ProtocolError), // sub id 0
        (&[0x82, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a'], ReasonCode::MalformedPacket),             // truncated
    ] {
        let mut c = Raw::v5(b.addr, "g55").await;
        c.send_bytes(bytes).await;
        expect_disconnect(&mut c, reason).await;
    }
    still_serving(&b).await;
}

#[tokio::test]
async fn g59_subscriptions_per_client_are_capped_with_0x97() {
    let b = TestBroker::with(|c| c.max_subscriptions = 3).await;
    let mut c = Raw::v5(b.addr, "g59").await;
    let filters = (0..5).map(|i| (format!("f/{i}").into(), SubscriptionOptions::default())).collect();
    c.send(Packet::Subscribe(Subscribe::new(id(1), filters))).await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(
            a.reasons,
            [ReasonCode::Success, ReasonCode::Success, ReasonCode::Success, ReasonCode::QuotaExceeded, ReasonCode::QuotaExceeded]
        ),
        other => panic!("{other:?}"),
    }
}
