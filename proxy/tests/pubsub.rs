//! Publish/subscribe through real rumqttc clients (3.1.1 and 5.0 APIs) over real sockets.

mod support;

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
use support::*;

#[tokio::test]
async fn v3_qos_0_1_2_round_trip_with_downgrade_mqtt_3_8_4_8() {
    let b = TestBroker::start().await;
    let mut sub = v4::connect(v4::options(b.addr, "sub")).await;
    sub.subscribe("t/2", v4::QoS::ExactlyOnce).await;
    sub.subscribe("t/1", v4::QoS::AtLeastOnce).await;
    let publisher = v4::connect(v4::options(b.addr, "pub")).await;
    for (topic, qos, expected) in [
        ("t/2", v4::QoS::AtMostOnce, v4::QoS::AtMostOnce),
        ("t/2", v4::QoS::AtLeastOnce, v4::QoS::AtLeastOnce),
        ("t/2", v4::QoS::ExactlyOnce, v4::QoS::ExactlyOnce),
        // Delivered at the lower of publish and subscription QoS.
        ("t/1", v4::QoS::ExactlyOnce, v4::QoS::AtLeastOnce),
    ] {
        publisher.client.publish(topic, qos, false, format!("{qos:?}")).await.unwrap();
        let p = sub.next_publish().await;
        assert_eq!(p.topic, topic);
        assert_eq!(p.qos, expected, "{topic} published at {qos:?}");
        assert_eq!(&p.payload[..], format!("{qos:?}").as_bytes());
    }
}

#[tokio::test]
async fn v5_qos_0_1_2_round_trip() {
    let b = TestBroker::start().await;
    let mut sub = v5::connect(v5::options(b.addr, "sub5")).await;
    sub.subscribe("t", v5::QoS::ExactlyOnce).await;
    let publisher = v5::connect(v5::options(b.addr, "pub5")).await;
    for qos in [v5::QoS::AtMostOnce, v5::QoS::AtLeastOnce, v5::QoS::ExactlyOnce] {
        publisher.client.publish("t", qos, false, "x").await.unwrap();
        assert_eq!(sub.next_publish().await.qos, qos);
    }
}

#[tokio::test]
async fn publisher_gets_puback_and_pubcomp() {
    let b = TestBroker::start().await;
    let mut c = v4::connect(v4::options(b.addr, "acker")).await;
    c.client.publish("nobody/listens", v4::QoS::AtLeastOnce, false, "x").await.unwrap();
    loop {
        if let v4::Packet::PubAck(_) = c.next().await {
            break;
        }
    }
    c.client.publish("nobody/listens", v4::QoS::ExactlyOnce, false, "x").await.unwrap();
    loop {
        if let v4::Packet::PubComp(_) = c.next().await {
            break;
        }
    }
}

#[tokio::test]
async fn wildcards_match_per_mqtt_4_7() {
    let b = TestBroker::start().await;
    let mut sub = v4::connect(v4::options(b.addr, "wild")).await;
    sub.subscribe("a/+/c", v4::QoS::AtMostOnce).await;
    sub.subscribe("x/#", v4::QoS::AtMostOnce).await;
    let p = v4::connect(v4::options(b.addr, "p")).await;
    for t in ["a/b/c", "a/b/d", "x", "x/y/z", "a/c"] {
        p.client.publish(t, v4::QoS::AtLeastOnce, false, t).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sub.next_publish().await.topic);
    }
    got.sort();
    assert_eq!(got, ["a/b/c", "x", "x/y/z"]);
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let b = TestBroker::start().await;
    let mut sub = v4::connect(v4::options(b.addr, "u")).await;
    sub.subscribe("t", v4::QoS::AtLeastOnce).await;
    sub.subscribe("marker", v4::QoS::AtLeastOnce).await;
    sub.client.unsubscribe("t").await.unwrap();
    loop {
        if let v4::Packet::UnsubAck(_) = sub.next().await {
            break;
        }
    }
    let p = v4::connect(v4::options(b.addr, "p")).await;
    p.client.publish("t", v4::QoS::AtLeastOnce, false, "gone").await.unwrap();
    p.client.publish("marker", v4::QoS::AtLeastOnce, false, "marker").await.unwrap();
    assert_eq!(&sub.next_publish().await.payload[..], b"marker");
    sub.expect_no_publish().await;
}

#[tokio::test]
async fn retained_message_delivered_on_subscribe_and_deleted_by_empty_payload() {
    let b = TestBroker::start().await;
    let p = v4::connect(v4::options(b.addr, "p")).await;
    p.client.publish("r/1", v4::QoS::AtLeastOnce, true, "kept").await.unwrap();
    p.client.publish("r/2", v4::QoS::AtLeastOnce, true, "also").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = v4::connect(v4::options(b.addr, "s")).await;
    s.subscribe("r/#", v4::QoS::AtLeastOnce).await;
    let mut got = [s.next_publish().await, s.next_publish().await];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    // [MQTT-3.3.1-8] (3.1.1): RETAIN is 1 on messages sent for a new subscription.
    assert!(got.iter().all(|m| m.retain));
    assert_eq!(&got[0].payload[..], b"kept");

    // Live messages to an established subscription carry RETAIN 0 [MQTT-3.3.1-9].
    p.client.publish("r/1", v4::QoS::AtLeastOnce, true, "live").await.unwrap();
    let live = s.next_publish().await;
    assert_eq!(&live.payload[..], b"live");
    assert!(!live.retain);

    // An empty retained payload deletes [MQTT-3.3.1-10].
    p.client.publish("r/1", v4::QoS::AtLeastOnce, true, "").await.unwrap();
    p.client.publish("r/2", v4::QoS::AtLeastOnce, true, "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s2 = v4::connect(v4::options(b.addr, "s2")).await;
    s2.subscribe("r/#", v4::QoS::AtLeastOnce).await;
    p.client.publish("r/marker", v4::QoS::AtLeastOnce, false, "m").await.unwrap();
    assert_eq!(s2.next_publish().await.topic, "r/marker", "no retained message left");
}

#[tokio::test]
async fn v5_retain_handling_and_retain_as_published() {
    let b = TestBroker::start().await;
    let p = v5::connect(v5::options(b.addr, "p")).await;
    p.client.publish("r", v5::QoS::AtLeastOnce, true, "v").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut s = v5::connect(v5::options(b.addr, "s")).await;
    let sub = |rule, rap| {
        let mut f = Filter::new("r", v5::QoS::AtLeastOnce);
        f.retain_forward_rule = rule;
        f.preserve_retain = rap;
        f
    };
    async fn suback(s: &mut v5::Client) {
        loop {
            if let v5::Packet::SubAck(_) = s.next().await {
                return;
            }
        }
    }
    // Retain Handling 2: nothing at subscribe.
    s.client.subscribe_many(vec![sub(RetainForwardRule::Never, false)]).await.unwrap();
    suback(&mut s).await;
    // Retain Handling 1 on an existing subscription: nothing either.
    s.client.subscribe_many(vec![sub(RetainForwardRule::OnNewSubscribe, true)]).await.unwrap();
    suback(&mut s).await;
    // Retain Handling 0: sent again.
    s.client.subscribe_many(vec![sub(RetainForwardRule::OnEverySubscribe, true)]).await.unwrap();
    suback(&mut s).await;
    let m = s.next_publish().await;
    assert_eq!(&m.payload[..], b"v");
    assert!(m.retain);
    // Retain As Published: a live retained message keeps RETAIN 1 [MQTT-3.3.1-12].
    p.client.publish("r", v5::QoS::AtLeastOnce, true, "live").await.unwrap();
    let m = s.next_publish().await;
    assert_eq!(&m.payload[..], b"live");
    assert!(m.retain, "retain as published");
}

#[tokio::test]
async fn v5_no_local_mqtt_3_8_3_3() {
    let b = TestBroker::start().await;
    let mut c = v5::connect(v5::options(b.addr, "self")).await;
    let mut f = Filter::new("nl/#", v5::QoS::AtLeastOnce);
    f.nolocal = true;
    c.client.subscribe_many(vec![f]).await.unwrap();
    c.client.subscribe("echo", v5::QoS::AtLeastOnce).await.unwrap();
    c.client.publish("nl/x", v5::QoS::AtLeastOnce, false, "mine").await.unwrap();
    c.client.publish("echo", v5::QoS::AtLeastOnce, false, "echoed").await.unwrap();
    let m = c.next_publish().await;
    assert_eq!(&m.payload[..], b"echoed", "own message on the No Local subscription must not come back");
    let mut other = v5::connect(v5::options(b.addr, "other")).await;
    other.client.publish("nl/x", v5::QoS::AtLeastOnce, false, "theirs").await.unwrap();
    assert_eq!(&c.next_publish().await.payload[..], b"theirs");
    let _ = other.next().await;
}

#[tokio::test]
async fn v5_subscription_identifiers_of_every_matching_subscription_mqtt_3_3_4_4() {
    let b = TestBroker::start().await;
    let mut c = v5::connect(v5::options(b.addr, "ids")).await;
    for (filter, id) in [("s/#", 7), ("s/+", 9)] {
        let props = v5::SubscribeProperties { id: Some(id), user_properties: vec![] };
        c.client.subscribe_with_properties(filter, v5::QoS::AtLeastOnce, props).await.unwrap();
    }
    let p = v5::connect(v5::options(b.addr, "p")).await;
    p.client.publish("s/x", v5::QoS::AtLeastOnce, false, "x").await.unwrap();
    let m = c.next_publish().await;
    let mut ids = m.properties.unwrap().subscription_identifiers;
    ids.sort();
    assert_eq!(ids, [7, 9]);
}

#[tokio::test]
async fn v5_user_properties_content_type_and_request_response_pass_through() {
    let b = TestBroker::start().await;
    let mut responder = v5::connect(v5::options(b.addr, "responder")).await;
    responder.subscribe("req", v5::QoS::AtLeastOnce).await;
    let mut requester = v5::connect(v5::options(b.addr, "requester")).await;
    requester.subscribe("resp/requester", v5::QoS::AtLeastOnce).await;
    let props = v5::PublishProperties {
        response_topic: Some("resp/requester".into()),
        correlation_data: Some(Bytes::from_static(b"id-42")),
        content_type: Some("application/json".into()),
        user_properties: vec![("k1".into(), "v1".into()), ("k1".into(), "v2".into())],
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    requester.client.publish_with_properties("req", v5::QoS::AtLeastOnce, false, "{}", props).await.unwrap();
    let req = responder.next_publish().await;
    let rp = req.properties.unwrap();
    assert_eq!(rp.content_type.as_deref(), Some("application/json"));
    assert_eq!(rp.payload_format_indicator, Some(1));
    // User properties keep their order, duplicates included [MQTT-3.3.2-18].
    assert_eq!(rp.user_properties, vec![("k1".to_string(), "v1".to_string()), ("k1".to_string(), "v2".to_string())]);
    let reply = v5::PublishProperties { correlation_data: rp.correlation_data.clone(), ..Default::default() };
    let topic = rp.response_topic.unwrap();
    responder.client.publish_with_properties(topic, v5::QoS::AtLeastOnce, false, "ok", reply).await.unwrap();
    let resp = requester.next_publish().await;
    assert_eq!(resp.properties.unwrap().correlation_data.as_deref(), Some(&b"id-42"[..]));
}

#[tokio::test]
async fn v5_message_expiry_is_decremented_when_forwarded_mqtt_3_3_2_6() {
    let b = TestBroker::start().await;
    let p = v5::connect(v5::options(b.addr, "p")).await;
    let props = v5::PublishProperties { message_expiry_interval: Some(60), ..Default::default() };
    p.client.publish_with_properties("exp", v5::QoS::AtLeastOnce, true, "x", props).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut s = v5::connect(v5::options(b.addr, "s")).await;
    s.subscribe("exp", v5::QoS::AtLeastOnce).await;
    let m = s.next_publish().await;
    let left = m.properties.unwrap().message_expiry_interval.unwrap();
    assert!((55..60).contains(&left), "expiry left {left}");
}

#[tokio::test]
async fn v5_expired_retained_message_is_not_delivered_bad_input_e44() {
    let b = TestBroker::start().await;
    let p = v5::connect(v5::options(b.addr, "p")).await;
    let props = v5::PublishProperties { message_expiry_interval: Some(1), ..Default::default() };
    p.client.publish_with_properties("gone", v5::QoS::AtLeastOnce, true, "x", props).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut s = v5::connect(v5::options(b.addr, "s")).await;
    s.subscribe("gone", v5::QoS::AtLeastOnce).await;
    p.client.publish("gone", v5::QoS::AtLeastOnce, false, "fresh").await.unwrap();
    assert_eq!(&s.next_publish().await.payload[..], b"fresh");
}
