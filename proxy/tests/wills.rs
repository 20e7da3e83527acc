//! Will messages (MQTT 5 §3.1.2.5, §3.1.3.2): when they are published, delayed, cancelled.

mod support;

use std::time::Duration;

use mqfleet_codec::{Connect, Disconnect, Packet, Protocol, ReasonCode};
use support::*;

async fn watcher(b: &TestBroker) -> v5::Client {
    let mut w = v5::connect(v5::options(b.addr, "watcher")).await;
    w.subscribe("wills/#", v5::QoS::AtLeastOnce).await;
    w
}

#[tokio::test]
async fn will_is_published_when_the_network_connection_is_lost_mqtt_3_1_2_8() {
    let b = TestBroker::start().await;
    let mut w = watcher(&b).await;
    let (c, _) = Raw::session(b.addr, with_will(Protocol::V3_1_1, "lost", None, None)).await;
    drop(c);
    assert_eq!(&w.next_publish().await.payload[..], b"lost is gone");
}

#[tokio::test]
async fn will_is_not_published_after_a_normal_disconnect_mqtt_3_1_2_10() {
    let b = TestBroker::start().await;
    let mut w = watcher(&b).await;
    let (mut c, _) = Raw::session(b.addr, with_will(Protocol::V5, "polite", None, None)).await;
    c.send(Packet::Disconnect(Disconnect::new(ReasonCode::Success))).await;
    assert_eq!(c.until_closed().await, None);
    w.expect_no_publish().await;
}

#[tokio::test]
async fn will_is_published_on_disconnect_with_reason_0x04() {
    let b = TestBroker::start().await;
    let mut w = watcher(&b).await;
    let (mut c, _) = Raw::session(b.addr, with_will(Protocol::V5, "asks", None, None)).await;
    c.send(Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWill))).await;
    assert_eq!(&w.next_publish().await.payload[..], b"asks is gone");
}

#[tokio::test]
async fn will_is_published_on_keepalive_timeout() {
    let b = TestBroker::start().await;
    let mut w = watcher(&b).await;
    let mut connect = with_will(Protocol::V3_1_1, "silent", None, None);
    connect.keep_alive = 1;
    let (_c, _) = Raw::session(b.addr, connect).await;
    assert_eq!(&w.next_publish().await.payload[..], b"silent is gone");
}

#[tokio::test]
async fn will_is_published_on_protocol_error() {
    let b = TestBroker::start().await;
    let mut w = watcher(&b).await;
    let (mut c, _) = Raw::session(b.addr, with_will(Protocol::V5, "rude", None, None)).await;
    c.send_bytes(&[0xC1, 0x00]).await; // PINGREQ with reserved flags
    assert_eq!(&w.next_publish().await.payload[..], b"rude is gone");
}

#[tokio::test]
async fn delayed_will_is_cancelled_by_a_reconnect_within_the_delay_mqtt_3_1_3_9() {
    let b = TestBroker::start().await;
    let mut w = watcher(&b).await;
    let (c, _) = Raw::session(b.addr, with_will(Protocol::V5, "blip", Some(2), Some(60))).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_c, ack) = Raw::session(b.addr, with_will(Protocol::V5, "blip", Some(2), Some(60))).await;
    assert!(ack.session_present);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    w.expect_no_publish().await;
}

#[tokio::test]
async fn delayed_will_is_published_after_its_delay() {
    let b = TestBroker::start().await;
    let mut w = watcher(&b).await;
    let (c, _) = Raw::session(b.addr, with_will(Protocol::V5, "late", Some(1), Some(60))).await;
    let dropped = tokio::time::Instant::now();
    drop(c);
    assert_eq!(&w.next_publish().await.payload[..], b"late is gone");
    assert!(dropped.elapsed() >= Duration::from_millis(900), "published too early: {:?}", dropped.elapsed());
}

#[tokio::test]
async fn will_is_published_when_the_session_ends_before_the_delay() {
    let b = TestBroker::start().await;
    let mut w = watcher(&b).await;
    // Session expiry 1 s, will delay 30 s: the session ends first.
    let (c, _) = Raw::session(b.addr, with_will(Protocol::V5, "ends", Some(30), Some(1))).await;
    drop(c);
    let started = tokio::time::Instant::now();
    assert_eq!(&w.next_publish().await.payload[..], b"ends is gone");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn retained_will_is_retained() {
    let b = TestBroker::start().await;
    let mut connect = with_will(Protocol::V3_1_1, "ret", None, None);
    connect.will.as_mut().unwrap().retain = true;
    let (c, _) = Raw::session(b.addr, connect).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut late = v4::connect(v4::options(b.addr, "late-reader")).await;
    late.subscribe("wills/x", v4::QoS::AtLeastOnce).await;
    let m = late.next_publish().await;
    assert!(m.retain);
    assert_eq!(&m.payload[..], b"ret is gone");
}

#[tokio::test]
async fn will_without_delay_is_published_on_takeover() {
    let b = TestBroker::start().await;
    let mut w = watcher(&b).await;
    let (_old, _) = Raw::session(b.addr, with_will(Protocol::V5, "twin", None, None)).await;
    let (_new, _) = Raw::session(b.addr, Connect::new(Protocol::V5, "twin")).await;
    assert_eq!(&w.next_publish().await.payload[..], b"twin is gone");
}
