//! Regression tests for what the fault-injection soak (`mqfleet-loadtest chaos`,
//! docs/RELIABILITY.md) found, each reduced to its fault: real redis-server, shard and proxy
//! processes, signals sent to them.
//!
//! - A proxy paused past `dead_after` is taken for dead and its sessions settled (wills
//!   published); when it resumes it must close its connections and must not publish those
//!   wills again.
//! - A proxy killed and restarted faster than the others notice, whose clients came back on
//!   another proxy first: the wills of its dead connections are still due, once.
//! - A will whose shard is away must not hold up the client's reconnect: the takeover waits
//!   for the previous connection to finish, and that finish used to wait for the shard.
//! - A proxy that dies after taking a will and before a shard accepted it: the proxy that
//!   settles it publishes the will, once.
//! - A delivery acknowledgement the store refuses is applied once it takes writes again, not
//!   left to fill the session's queue.

mod support;

use std::time::Duration;

use bytes::Bytes;
use mqfleet_codec::{Connect, Packet, Protocol, QoS, ReasonCode, Will};
use support::{metric_of, Raw};
use testkit::local_cluster::{LocalCluster, RedisKind};

fn signal(pid: u32, sig: &str) {
    assert!(pid > 0);
    std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
}

fn with_will(client_id: &str) -> Connect {
    let mut c = Connect::new(Protocol::V5, client_id);
    c.will = Some(Will {
        topic: format!("wills/{client_id}").into(),
        payload: Bytes::from(format!("{client_id} is gone")),
        qos: QoS::ExactlyOnce,
        retain: false,
        properties: Default::default(),
    });
    c
}

/// Subscribes to every will with QoS 2 on `addr`.
async fn will_watcher(addr: std::net::SocketAddr) -> Raw {
    let mut w = Raw::v5(addr, "watcher").await;
    subscribe_to_wills(&mut w).await;
    w
}

async fn subscribe_to_wills(w: &mut Raw) {
    let opts = mqfleet_codec::SubscriptionOptions { qos: QoS::ExactlyOnce, ..Default::default() };
    w.send(Packet::Subscribe(mqfleet_codec::Subscribe::new(mqfleet_codec::PacketId::new(1).unwrap(), vec![("wills/#".into(), opts)])))
        .await;
    assert!(matches!(w.recv().await, Some(Packet::SubAck(_))));
}

/// A persistent will watcher ("watcher-p", expiry 10 min) on `addr`; `Session Present` told.
async fn persistent_watcher(addr: std::net::SocketAddr) -> (Raw, bool) {
    let mut connect = Connect::new(Protocol::V5, "watcher-p");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(600);
    let (mut w, ack) = Raw::session(addr, connect).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    if !ack.session_present {
        subscribe_to_wills(&mut w).await;
    }
    (w, ack.session_present)
}

/// The will payloads `w` receives within `within` (completing each QoS 2 flow).
async fn wills_within(w: &mut Raw, within: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(Some(p))) = tokio::time::timeout_at(deadline, async { w.recv_within(within).await }).await {
        match p {
            Packet::Publish(p) => {
                got.push(String::from_utf8_lossy(&p.payload).to_string());
                if let Some(id) = p.pkid {
                    w.send(Packet::PubRec(mqfleet_codec::Ack::new(id))).await;
                }
            }
            Packet::PubRel(a) => w.send(Packet::PubComp(mqfleet_codec::Ack::new(a.pkid))).await,
            _ => {}
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_proxy_taken_for_dead_closes_its_connections_and_publishes_no_will_twice() {
    let c = tokio::task::spawn_blocking(|| LocalCluster::start(RedisKind::Standalone, 1, 2)).await.unwrap();
    let mut watcher = will_watcher(c.proxy(0)).await;
    let (mut client, ack) = Raw::session(c.proxy(1), with_will("paused-1")).await;
    assert_eq!(ack.reason, ReasonCode::Success);

    // Paused three times longer than the others wait: proxy 0 settles proxy 1's sessions.
    let pid = c.proxies[1].service.pid();
    signal(pid, "STOP");
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    signal(pid, "CONT");
    // The will went out once, from the settlement; proxy 1, back, closes the connection (0x8E:
    // the cluster took the session over) without publishing it again.
    match tokio::time::timeout(Duration::from_secs(10), client.until_closed()).await.expect("closed in time") {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::SessionTakenOver),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert_eq!(wills_within(&mut watcher, Duration::from_secs(3)).await, ["paused-1 is gone"], "{}", c.logs());
    let fenced = tokio::task::spawn_blocking(move || metric_of(&c.proxies[1].service, "mqfleet_proxy_fenced_total")).await.unwrap();
    assert_eq!(fenced, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_back_elsewhere_before_its_dead_proxy_was_settled_still_gets_its_will_once() {
    let mut c = tokio::task::spawn_blocking(|| LocalCluster::start(RedisKind::Standalone, 1, 2)).await.unwrap();
    let mut watcher = will_watcher(c.proxy(0)).await;
    let (_gone, _) = Raw::session(c.proxy(1), with_will("moved-1")).await;
    // Proxy 1 dies; its client is back on proxy 0 at once, then proxy 1 restarts — all faster
    // than anyone takes proxy 1 for dead.
    tokio::task::block_in_place(|| c.proxies[1].service.kill9());
    let (_back, ack) = Raw::session(c.proxy(0), Connect::new(Protocol::V5, "moved-1")).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    tokio::task::block_in_place(|| c.restart_proxy(1));
    // The connection that died with proxy 1 owed its will (no delay: due when it ended).
    assert_eq!(wills_within(&mut watcher, Duration::from_secs(5)).await, ["moved-1 is gone"], "{}", c.logs());
}

/// The same, with the will watcher's persistent session on the proxy that dies: it moves to the
/// survivor, and the will the restarted proxy owes (its settlement of its previous run) still
/// reaches it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_owed_by_a_restarted_proxy_reaches_a_watcher_that_moved_away_from_it() {
    let mut c = tokio::task::spawn_blocking(|| LocalCluster::start(RedisKind::Standalone, 1, 2)).await.unwrap();
    let (watcher, present) = persistent_watcher(c.proxy(1)).await;
    assert!(!present);
    let (_gone, _) = Raw::session(c.proxy(1), with_will("moved-2")).await;
    tokio::task::block_in_place(|| c.proxies[1].service.kill9());
    drop(watcher);
    let (mut watcher, present) = persistent_watcher(c.proxy(0)).await;
    assert!(present, "the watcher's session survived its proxy");
    let (_back, ack) = Raw::session(c.proxy(0), Connect::new(Protocol::V5, "moved-2")).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    tokio::task::block_in_place(|| c.restart_proxy(1));
    assert_eq!(wills_within(&mut watcher, Duration::from_secs(5)).await, ["moved-2 is gone"], "{}", c.logs());
}

/// The packets `c` receives until its connection ends, which must be in time and with
/// DISCONNECT 0x89 (the session store could not record what the flow needed).
async fn ends_busy(c: &mut Raw) -> Vec<Packet> {
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(p) = c.recv().await {
            seen.push(p);
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection ends in time: {seen:?}");
    assert!(matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::ServerBusy), "{seen:?}");
    seen
}

/// A persistent session's PUBREL leaves only once the store recorded the PUBREC: were it sent
/// first and the write lost, the resumed session would send the PUBLISH again and the client,
/// done with that packet id, would take it for a new message (found by the soak as QoS 2
/// messages delivered twice). With Redis gone the connection ends instead (DISCONNECT 0x89).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pubrel_before_the_pubrec_is_durable() {
    let mut c = tokio::task::spawn_blocking(|| LocalCluster::start(RedisKind::Standalone, 1, 1)).await.unwrap();
    let mut connect = Connect::new(Protocol::V5, "durable-2");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(600);
    let (mut sub, _) = Raw::session(c.proxy(0), connect).await;
    let opts = mqfleet_codec::SubscriptionOptions { qos: QoS::ExactlyOnce, ..Default::default() };
    sub.send(Packet::Subscribe(mqfleet_codec::Subscribe::new(mqfleet_codec::PacketId::new(1).unwrap(), vec![("q2".into(), opts)]))).await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    let mut publisher = Raw::v5(c.proxy(0), "pub-2").await;
    publisher.send(Packet::Publish(mqfleet_codec::Publish::new("q2", QoS::ExactlyOnce, "two", mqfleet_codec::PacketId::new(2)))).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubRec(_))));
    publisher.send(Packet::PubRel(mqfleet_codec::Ack::new(mqfleet_codec::PacketId::new(2).unwrap()))).await;
    let pkid = match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(&p.payload[..], b"two");
            p.pkid.expect("QoS 2 delivery has an id")
        }
        other => panic!("{other:?}"),
    };
    // Redis goes away between the client's PUBLISH and its PUBREC.
    tokio::task::block_in_place(|| match &mut c.redis {
        testkit::local_cluster::Redis::Standalone(r) => r.kill(),
        _ => unreachable!("standalone"),
    });
    sub.send(Packet::PubRec(mqfleet_codec::Ack::new(pkid))).await;
    let seen = ends_busy(&mut sub).await;
    assert!(!seen.iter().any(|p| matches!(p, Packet::PubRel(_))), "PUBREL before the PUBREC was recorded: {seen:?}");
}

/// A persistent session's PUBCOMP leaves only once the store forgot the packet id: sent first
/// with the write lost, the resumed session held the id as awaiting a PUBREL the client never
/// sends again, and enough such ids filled its Receive Maximum — the soak on a Redis Cluster saw
/// clients disconnected with 0x93 on every reconnect. With Redis gone the connection ends
/// (0x89), and the client's PUBREL over its next connection completes the flow (MQTT-4.4.0-1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pubcomp_before_the_pubrel_is_durable() {
    let c = tokio::task::spawn_blocking(|| LocalCluster::start(RedisKind::Standalone, 1, 1)).await.unwrap();
    let persistent = || {
        let mut connect = Connect::new(Protocol::V5, "sender-2");
        connect.clean_start = false;
        connect.properties.session_expiry_interval = Some(600);
        connect
    };
    let (mut publisher, _) = Raw::session(c.proxy(0), persistent()).await;
    let id = mqfleet_codec::PacketId::new(7).unwrap();
    publisher.send(Packet::Publish(mqfleet_codec::Publish::new("q2", QoS::ExactlyOnce, "seven", Some(id)))).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubRec(_))));
    // Redis stops taking writes (its data stays): the PUBREL cannot be recorded.
    tokio::task::block_in_place(|| c.redis.cli(&["CLIENT", "PAUSE", "30000", "WRITE"]));
    publisher.send(Packet::PubRel(mqfleet_codec::Ack::new(id))).await;
    let seen = ends_busy(&mut publisher).await;
    assert!(!seen.iter().any(|p| matches!(p, Packet::PubComp(_))), "PUBCOMP before the PUBREL was recorded: {seen:?}");

    tokio::task::block_in_place(|| c.redis.cli(&["CLIENT", "UNPAUSE"]));
    let back = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (publisher, ack) = Raw::session(c.proxy(0), persistent()).await;
            if ack.reason == ReasonCode::Success {
                return (publisher, ack);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let (mut publisher, ack) = back.unwrap_or_else(|_| panic!("no session after Redis came back: {}", c.logs()));
    assert!(ack.session_present);
    publisher.send(Packet::PubRel(mqfleet_codec::Ack::new(id))).await;
    // Either ends the flow: the paused write that timed out may have been applied when Redis
    // took writes again (the id is gone: 0x92), or not (the id was still awaiting its PUBREL).
    match publisher.recv().await {
        Some(Packet::PubComp(a)) => {
            assert_eq!(a.pkid, id);
            assert!(matches!(a.reason, ReasonCode::Success | ReasonCode::PacketIdentifierNotFound), "{:?}", a.reason);
        }
        other => panic!("{other:?}"),
    }
}

/// The soak saw a client's reconnect wait five seconds (the takeover bound) and its client give
/// up, because the previous connection was still publishing its will to a shard that was
/// unreachable. The will's right is taken in Redis at once; the publication itself goes on in
/// the background and arrives, once, when the shard is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_does_not_wait_for_the_previous_connections_will_to_reach_its_shard() {
    let c = tokio::task::spawn_blocking(|| LocalCluster::start(RedisKind::Standalone, 1, 1)).await.unwrap();
    let mut watcher = will_watcher(c.proxy(0)).await;
    let (gone, ack) = Raw::session(c.proxy(0), with_will("stalled-1")).await;
    assert_eq!(ack.reason, ReasonCode::Success);

    let shard = c.shards[0].service.pid();
    signal(shard, "STOP");
    drop(gone); // ends without DISCONNECT: the will is due, and its shard does not answer
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A client library waiting three seconds for CONNACK gets it (the takeover bound is five).
    let back = tokio::time::timeout(Duration::from_secs(3), Raw::session(c.proxy(0), Connect::new(Protocol::V5, "stalled-1"))).await;
    signal(shard, "CONT");
    let (_back, ack) = back.unwrap_or_else(|_| panic!("the reconnect waited for the will's shard: {}", c.logs()));
    assert_eq!(ack.reason, ReasonCode::Success);
    assert_eq!(wills_within(&mut watcher, Duration::from_secs(10)).await, ["stalled-1 is gone"], "{}", c.logs());
}

/// The long soak lost wills of connections that ended just before their proxy was killed: the
/// proxy had taken the will in Redis, so the settlement found nothing owed, and died before
/// its shard had the will. Now the taken will is the proxy's intent until a shard accepts it:
/// here the shard is down when the connection ends, the proxy dies retrying, and the proxy
/// that settles it publishes the will — once (MQTT-3.1.2-8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_its_proxy_died_publishing_is_published_once_by_the_settling_proxy() {
    let mut c = tokio::task::spawn_blocking(|| LocalCluster::start(RedisKind::Standalone, 1, 2)).await.unwrap();
    let mut watcher = will_watcher(c.proxy(1)).await;
    let (gone, ack) = Raw::session(c.proxy(0), with_will("orphan-1")).await;
    assert_eq!(ack.reason, ReasonCode::Success);

    c.shards[0].service.kill9();
    drop(gone); // ends without DISCONNECT: the will is due, and its shard is down
    tokio::time::sleep(Duration::from_millis(500)).await; // proxy-0 took the will and retries it
    c.proxies[0].service.kill9();
    let c = tokio::task::spawn_blocking(move || {
        c.restart_shard(0);
        c
    })
    .await
    .unwrap();
    let got = wills_within(&mut watcher, Duration::from_secs(15)).await;
    assert_eq!(got, ["orphan-1 is gone"], "{}", c.logs());
}

/// Finding 23 of the soak: a delivery acknowledgement the store did not take was given up at
/// once, leaving the delivered message in the session's queue, where it counts against the
/// queue's bound while the connection lasts; with a Redis node down a quarter of the time, a
/// connected subscriber's queue filled with them and newer messages were refused as
/// `queue_full`. Acknowledgements are now retried through an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_the_store_refused_is_applied_once_it_takes_writes_again() {
    let c = tokio::task::spawn_blocking(|| LocalCluster::start(RedisKind::Standalone, 1, 1)).await.unwrap();
    let mut connect = Connect::new(Protocol::V5, "acker");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(600);
    let (mut sub, _) = Raw::session(c.proxy(0), connect).await;
    let opts = mqfleet_codec::SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() };
    sub.send(Packet::Subscribe(mqfleet_codec::Subscribe::new(mqfleet_codec::PacketId::new(1).unwrap(), vec![("acked".into(), opts)])))
        .await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    let mut publisher = Raw::v5(c.proxy(0), "pub-acked").await;
    assert_eq!(publisher.publish_qos1(1, "acked").await, ReasonCode::Success);
    let pkid = match sub.recv().await {
        Some(Packet::Publish(p)) => p.pkid.expect("QoS 1 delivery has an id"),
        other => panic!("{other:?}"),
    };
    let queue = session_store::redis::keys::ClientKeys::new("acker").queue;
    let queued = || c.redis.cli(&["HLEN", &queue]);
    assert_eq!(queued(), "1");

    // Redis refuses every write (no replica can confirm it) while the client acknowledges.
    tokio::task::block_in_place(|| c.redis.cli(&["CONFIG", "SET", "min-replicas-to-write", "1"]));
    sub.send(Packet::PubAck(mqfleet_codec::Ack::new(pkid))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(queued(), "1", "the store refused the acknowledgement");
    tokio::task::block_in_place(|| c.redis.cli(&["CONFIG", "SET", "min-replicas-to-write", "0"]));

    let applied = tokio::task::block_in_place(|| testkit::local_cluster::eventually(Duration::from_secs(10), || queued() == "0"));
    assert!(applied, "the acknowledgement was not applied after Redis took writes again: {}", c.logs());
}
