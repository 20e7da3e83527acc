//! `kill -9` and restart of the real `mqfleet-proxy` on the same data directory: what was
//! acknowledged is still there.

mod support;

use std::time::Duration;

use bytes::Bytes;
use mqfleet_codec::{Ack, Connect, Packet, PacketId, Protocol, Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions, Will};
use support::*;

fn id(v: u16) -> PacketId {
    PacketId::new(v).unwrap()
}

fn persistent(client_id: &str) -> Connect {
    let mut c = Connect::new(Protocol::V5, client_id);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(3600);
    c
}

async fn subscribe(raw: &mut Raw, filter: &str, qos: QoS) {
    raw.send(Packet::Subscribe(Subscribe::new(id(1), vec![(filter.into(), SubscriptionOptions::qos(qos))]))).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
}

async fn publish_acked(addr: std::net::SocketAddr, topic: &str, payload: &'static [u8], retain: bool) {
    let mut p = Raw::v5(addr, "pub").await;
    let mut m = Publish::new(topic, QoS::AtLeastOnce, Bytes::from_static(payload), Some(id(1)));
    m.retain = retain;
    p.send(Packet::Publish(m)).await;
    match p.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason, ReasonCode::Success),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn persistent_session_with_queued_qos1_and_retained_message_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = ProxyProcess::start(dir.path(), &[]);
    let (mut c, _) = Raw::session(broker.addr, persistent("survivor")).await;
    subscribe(&mut c, "r/q", QoS::AtLeastOnce).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish_acked(broker.addr, "r/q", b"queued before the crash", false).await;
    publish_acked(broker.addr, "r/retained", b"retained before the crash", true).await;

    broker.kill9();
    let broker = ProxyProcess::start(dir.path(), &[]);

    let (mut c, ack) = Raw::session(broker.addr, persistent("survivor")).await;
    assert!(ack.session_present, "session survived");
    match c.recv().await {
        Some(Packet::Publish(m)) => assert_eq!(&m.payload[..], b"queued before the crash"),
        other => panic!("expected the queued message, got {other:?}"),
    }
    let mut r = Raw::v5(broker.addr, "reader").await;
    subscribe(&mut r, "r/retained", QoS::AtLeastOnce).await;
    match r.recv().await {
        Some(Packet::Publish(m)) => {
            assert_eq!(&m.payload[..], b"retained before the crash");
            assert!(m.retain);
        }
        other => panic!("expected the retained message, got {other:?}"),
    }
    // The subscription itself survived: a new message reaches the session live.
    publish_acked(broker.addr, "r/q", b"after", false).await;
    match c.recv().await {
        Some(Packet::Publish(m)) => assert_eq!(&m.payload[..], b"after"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn wills_of_clients_connected_at_the_crash_are_published_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = ProxyProcess::start(dir.path(), &[]);
    let mut connect = persistent("doomed");
    connect.will = Some(Will {
        topic: "crash/will".into(),
        payload: Bytes::from_static(b"doomed lost"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Default::default(),
    });
    let (_c, _) = Raw::session(broker.addr, connect).await;
    broker.kill9();
    let broker = ProxyProcess::start(dir.path(), &[]);
    let mut w = Raw::v5(broker.addr, "watcher").await;
    subscribe(&mut w, "crash/will", QoS::AtLeastOnce).await;
    match w.recv().await {
        Some(Packet::Publish(m)) => assert_eq!(&m.payload[..], b"doomed lost"),
        other => panic!("expected the will, got {other:?}"),
    }
}

#[tokio::test]
async fn qos2_exactly_once_holds_across_kill_9_in_the_middle_of_the_flow() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = ProxyProcess::start(dir.path(), &[]);
    let (mut s, _) = Raw::session(broker.addr, persistent("eo-sub")).await;
    subscribe(&mut s, "eo", QoS::ExactlyOnce).await;
    drop(s);
    let (mut p, _) = Raw::session(broker.addr, persistent("eo-pub")).await;
    let mut m = Publish::new("eo", QoS::ExactlyOnce, Bytes::from_static(b"once"), Some(id(9)));
    p.send(Packet::Publish(m.clone())).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));

    broker.kill9();
    let broker = ProxyProcess::start(dir.path(), &[]);

    let (mut p, ack) = Raw::session(broker.addr, persistent("eo-pub")).await;
    assert!(ack.session_present);
    m.dup = true;
    p.send(Packet::Publish(m)).await; // the client did not see PUBREC... or did; it resends
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    p.send(Packet::PubRel(Ack::new(id(9)))).await;
    assert!(matches!(p.recv().await, Some(Packet::PubComp(a)) if a.reason == ReasonCode::Success));

    let (mut s, _) = Raw::session(broker.addr, persistent("eo-sub")).await;
    let Some(Packet::Publish(got)) = s.recv().await else { panic!("expected the message") };
    assert_eq!(&got.payload[..], b"once");
    s.send(Packet::PubRec(Ack::new(got.pkid.unwrap()))).await;
    assert!(matches!(s.recv().await, Some(Packet::PubRel(_))));
    s.send(Packet::PubComp(Ack::new(got.pkid.unwrap()))).await;
    s.expect_silence().await;
}
