//! The distributed deployment, for real: `redis-server` (standalone, a 3-master Redis Cluster,
//! and a master with a replica under three Sentinels), `mqfleet-shard` and `mqfleet-proxy`
//! processes on loopback, devices as real MQTT clients (rumqttc, and the raw client where a test
//! must see exact packets). Scenarios that concern Redis run against standalone Redis and a
//! Redis Cluster, some also under Sentinel.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mqfleet_codec::{Connect, Packet, PacketId, Protocol, Publish, QoS as CodecQoS, ReasonCode};
use session_store::redis::keys::ClientKeys;
use support::{v4, Raw, PATIENCE};
use testkit::local_cluster::{LocalCluster, Redis, RedisKind};

/// Runs an async scenario against standalone Redis and a Redis Cluster (and, with a third name,
/// under Sentinel).
macro_rules! on_redis {
    ($scenario:ident: $standalone:ident, $cluster:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $standalone() {
            $scenario(RedisKind::Standalone).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $cluster() {
            $scenario(RedisKind::Cluster).await;
        }
    };
    ($scenario:ident: $standalone:ident, $cluster:ident, $sentinel:ident) => {
        on_redis!($scenario: $standalone, $cluster);

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sentinel() {
            $scenario(RedisKind::Sentinel).await;
        }
    };
}

/// Starts a cluster off the async worker (process starts block).
async fn cluster(kind: RedisKind, shards: usize, proxies: usize) -> LocalCluster {
    tokio::task::spawn_blocking(move || LocalCluster::start(kind, shards, proxies)).await.unwrap()
}

fn persistent(addr: std::net::SocketAddr, id: &str) -> rumqttc::MqttOptions {
    let mut o = v4::options(addr, id);
    o.set_clean_session(false);
    o
}

async fn publish_acked(c: &mut v4::Client, topic: &str, payloads: impl IntoIterator<Item = String>) {
    let mut sent = 0;
    for p in payloads {
        c.client.publish(topic, v4::QoS::AtLeastOnce, false, p).await.unwrap();
        sent += 1;
    }
    let mut acked = 0;
    while acked < sent {
        if let v4::Packet::PubAck(_) = c.next().await {
            acked += 1;
        }
    }
}

// === a device's session follows it from proxy to proxy ===

async fn persistent_session_follows_the_device(kind: RedisKind) {
    let c = cluster(kind, 2, 2).await;
    let mut device = v4::connect(persistent(c.proxy(0), "dev-1")).await;
    device.subscribe("cmd/dev-1", v4::QoS::AtLeastOnce).await;
    device.client.disconnect().await.unwrap();
    drop(device);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Published through the other proxy while the device is away.
    let mut backend = v4::connect(v4::options(c.proxy(1), "backend")).await;
    publish_acked(&mut backend, "cmd/dev-1", (0..20).map(|i| format!("m{i}"))).await;

    let mut device = v4::connect(persistent(c.proxy(1), "dev-1")).await;
    assert!(device.session_present, "the session was found through Redis on another proxy");
    for i in 0..20 {
        let p = device.next_publish().await;
        assert_eq!(p.payload, Bytes::from(format!("m{i}")), "queued messages arrive in order");
    }
    device.expect_no_publish().await;
}

on_redis!(
    persistent_session_follows_the_device: a_persistent_session_follows_the_device_to_another_proxy,
    a_persistent_session_follows_the_device_to_another_proxy_on_redis_cluster,
    a_persistent_session_follows_the_device_to_another_proxy_on_redis_sentinel
);

// === Redis fails over under Sentinel ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sentinel_failover_sessions_resume_with_their_queues() {
    let mut c = cluster(RedisKind::Sentinel, 1, 2).await;
    let mut device = v4::connect(persistent(c.proxy(0), "dev-f")).await;
    device.subscribe("cmd/dev-f", v4::QoS::AtLeastOnce).await;
    device.client.disconnect().await.unwrap();
    drop(device);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut backend = v4::connect(v4::options(c.proxy(1), "backend")).await;
    publish_acked(&mut backend, "cmd/dev-f", (0..5).map(|i| format!("m{i}"))).await;
    // Replication is asynchronous; an operator relying on Sentinel waits for it (WAIT), so what
    // is under test is the failover, not the replication lag.
    let Redis::Sentinel(s) = &mut c.redis else { unreachable!() };
    assert_eq!(s.servers[0].cli(&["WAIT", "1", "5000"]), "1");
    tokio::task::block_in_place(|| s.servers[0].kill());

    // CONNECTs are refused while the Sentinels promote the replica, then the session is found.
    let mut k = Connect::new(Protocol::V5, "dev-f");
    k.clean_start = false;
    k.properties.session_expiry_interval = Some(600);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut raw, ack) = loop {
        let (raw, ack) = Raw::session(c.proxy(1), k.clone()).await;
        if ack.reason == ReasonCode::Success {
            break (raw, ack);
        }
        assert!(tokio::time::Instant::now() < deadline, "CONNECT still refused a minute after the failover: {ack:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(ack.session_present, "the session was found on the promoted replica");
    for i in 0..5 {
        let p = loop {
            match raw.recv_within(PATIENCE).await {
                Ok(Some(Packet::Publish(p))) => break p,
                Ok(Some(_)) => continue,
                other => panic!("expected queued message m{i}, got {other:?}"),
            }
        };
        assert_eq!(&p.payload[..], format!("m{i}").as_bytes(), "queued messages arrive in order");
    }
}

// === one owner per client id ===

fn owner_in_redis(redis: &Redis, client_id: &str) -> String {
    redis.cli(&["HGET", &ClientKeys::new(client_id).session, "owner"])
}

/// Waits until the server closes the connection; true if it said DISCONNECT 0x8E first.
async fn taken_over(c: &mut Raw) -> bool {
    matches!(c.until_closed().await, Some(Packet::Disconnect(d)) if d.reason == ReasonCode::SessionTakenOver)
}

/// Whether a raw connection is still served (answers PINGREQ).
async fn alive(c: &mut Raw) -> bool {
    c.send_bytes(&[0xC0, 0x00]).await;
    loop {
        match c.recv_within(Duration::from_secs(3)).await {
            Ok(Some(Packet::PingResp)) => return true,
            Ok(Some(_)) => continue,
            _ => return false,
        }
    }
}

async fn concurrent_connects_leave_one_owner(kind: RedisKind) {
    let c = cluster(kind, 1, 2).await;
    for i in 0..100 {
        let id = format!("twin-{i}");
        let connect = || {
            let mut k = Connect::new(Protocol::V5, id.as_str());
            k.keep_alive = 60; // only a takeover, not the keep-alive, may close the loser
            k
        };
        let ((mut a, ack_a), (mut b, ack_b)) = tokio::join!(Raw::session(c.proxy(0), connect()), Raw::session(c.proxy(1), connect()));
        assert_eq!((ack_a.reason, ack_b.reason), (ReasonCode::Success, ReasonCode::Success));
        // The older of the two is told it was taken over (0x8E) and closed; the other stays.
        let closed = tokio::select! {
            p = taken_over(&mut a) => { assert!(p, "round {i}: proxy 0 closed its connection without 0x8E"); 0 }
            p = taken_over(&mut b) => { assert!(p, "round {i}: proxy 1 closed its connection without 0x8E"); 1 }
            () = tokio::time::sleep(PATIENCE) => panic!("round {i}: both connections survived"),
        };
        let survivor = 1 - closed;
        assert!(alive(if survivor == 0 { &mut a } else { &mut b }).await, "round {i}: the newer connection must survive");
        assert_eq!(owner_in_redis(&c.redis, &id), format!("proxy-{survivor}"), "round {i}: Redis names the surviving proxy");
    }
}

on_redis!(concurrent_connects_leave_one_owner: the_same_client_id_on_two_proxies_leaves_one_owner_100_times, the_same_client_id_on_two_proxies_leaves_one_owner_100_times_on_redis_cluster);

async fn takeover_across_proxies(kind: RedisKind) {
    let c = cluster(kind, 1, 2).await;
    let mut k = Connect::new(Protocol::V5, "roamer");
    k.keep_alive = 600;
    let (mut first, _) = Raw::session(c.proxy(0), k.clone()).await;
    let (mut second, _) = Raw::session(c.proxy(1), k).await;
    // MQTT-3.1.4-3: the existing connection is told (5.0: 0x8E) and closed.
    match first.recv_within(Duration::from_secs(5)).await {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.reason, ReasonCode::SessionTakenOver),
        other => panic!("expected DISCONNECT 0x8E on the first proxy, got {other:?}"),
    }
    assert!(alive(&mut second).await);
}

on_redis!(takeover_across_proxies: a_connect_on_another_proxy_takes_the_session_over_with_0x8e, a_connect_on_another_proxy_takes_the_session_over_with_0x8e_on_redis_cluster);

// === a shard crashes in the middle of a QoS 1 stream ===

fn payload_number(p: &[u8]) -> u32 {
    std::str::from_utf8(p).unwrap().parse().unwrap()
}

async fn shard_crash_loses_nothing_acknowledged(kind: RedisKind) {
    let c = Arc::new(Mutex::new(cluster(kind, 2, 2).await));
    let (p0, p1, shard_keys) = {
        let c = c.lock().unwrap();
        (c.proxy(0), c.proxy(1), c.shard_addrs())
    };
    // A topic owned by shard 0, the one that dies.
    let ring = broker_shard::ring::Ring::new(&shard_keys);
    let topic = (0..).map(|i| format!("stream/{i}")).find(|t| ring.owner(t) == 0).unwrap();

    let mut sub = v4::connect(v4::options(p1, "subscriber")).await;
    sub.subscribe(&topic, v4::QoS::AtLeastOnce).await;
    let mut publisher = Raw::v4(p0, "publisher").await;
    const N: u32 = 300;
    let mut acked = Vec::new();
    for seq in 1..=N {
        if seq == 100 {
            let c = c.clone();
            std::thread::spawn(move || {
                c.lock().unwrap().shards[0].service.kill9();
                std::thread::sleep(Duration::from_millis(700));
                c.lock().unwrap().restart_shard(0);
            });
        }
        let pkid = PacketId::new((seq % 60_000) as u16 + 1);
        publisher.send(Packet::Publish(Publish::new(topic.as_str(), CodecQoS::AtLeastOnce, Bytes::from(seq.to_string()), pkid))).await;
        // The proxy holds the PUBACK while the shard is away; the device stays connected.
        match publisher.recv_within(Duration::from_secs(30)).await {
            Ok(Some(Packet::PubAck(a))) if Some(a.pkid) == pkid => acked.push(seq),
            other => panic!("message {seq}: expected its PUBACK, got {other:?}\n{}", c.lock().unwrap().logs()),
        }
    }
    let mut seen = Vec::new();
    while seen.len() < N as usize {
        let p = tokio::time::timeout(Duration::from_secs(30), sub.next_publish()).await.expect("every acknowledged message arrives");
        let n = payload_number(&p.payload);
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    assert_eq!(seen, acked, "every PUBACKed message delivered, in publishing order");
    assert!(alive(&mut publisher).await, "the publisher was never disconnected");
}

on_redis!(shard_crash_loses_nothing_acknowledged: killing_a_shard_mid_stream_loses_no_acknowledged_message, killing_a_shard_mid_stream_loses_no_acknowledged_message_on_redis_cluster);

// === a proxy crashes ===

async fn dead_proxy_is_settled_by_another(kind: RedisKind) {
    let mut c = cluster(kind, 1, 2).await;
    let mut observer = v4::connect(v4::options(c.proxy(1), "observer")).await;
    observer.subscribe("wills/#", v4::QoS::AtLeastOnce).await;
    let mut o = v4::options(c.proxy(0), "w");
    o.set_last_will(rumqttc::LastWill::new("wills/w", "gone", v4::QoS::AtLeastOnce, false));
    let _w = v4::connect(o).await;
    let mut p = v4::connect(persistent(c.proxy(0), "p")).await;
    p.subscribe("inbox/p", v4::QoS::AtLeastOnce).await;

    tokio::task::block_in_place(|| c.proxies[0].service.kill9());
    let will =
        tokio::time::timeout(Duration::from_secs(10), observer.next_publish()).await.expect("the will of a client of the dead proxy");
    assert_eq!((will.topic.as_str(), &will.payload[..]), ("wills/w", &b"gone"[..]));
    observer.expect_no_publish().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    observer.expect_no_publish().await;

    // The persistent session lives on: what is published meanwhile waits for it.
    let mut backend = v4::connect(v4::options(c.proxy(1), "backend")).await;
    publish_acked(&mut backend, "inbox/p", ["queued".to_string()]).await;
    drop(p);
    let mut p = v4::connect(persistent(c.proxy(1), "p")).await;
    assert!(p.session_present);
    assert_eq!(&p.next_publish().await.payload[..], b"queued");
    assert!(c.proxies[1].service.log_text().contains("dead proxy settled"), "{}", c.logs());
}

on_redis!(
    dead_proxy_is_settled_by_another: a_dead_proxys_wills_fire_once_and_its_sessions_resume_elsewhere,
    a_dead_proxys_wills_fire_once_and_its_sessions_resume_elsewhere_on_redis_cluster,
    a_dead_proxys_wills_fire_once_and_its_sessions_resume_elsewhere_on_redis_sentinel
);

// === Redis goes away ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_connects_are_refused_quickly_and_qos0_keeps_flowing() {
    let mut c = cluster(RedisKind::Standalone, 1, 0).await;
    tokio::task::block_in_place(|| c.add_proxy(&["--redis-timeout-ms", "500"]));
    let addr = c.proxy(0);
    let mut sub = v4::connect(v4::options(addr, "sub")).await;
    sub.subscribe("t", v4::QoS::AtMostOnce).await;
    let publisher = v4::connect(v4::options(addr, "pub")).await;

    let Redis::Standalone(redis) = &mut c.redis else { unreachable!() };
    redis.kill();
    // A new device cannot get a session: refused, not left hanging (5.0 0x88, 3.1.1 0x03).
    let (_, ack) = Raw::session(addr, Connect::new(Protocol::V5, "late-5")).await;
    assert_eq!(ack.reason, ReasonCode::ServerUnavailable);
    let (_, ack) = Raw::session(addr, Connect::new(Protocol::V3_1_1, "late-3")).await;
    assert_eq!(ack.reason, ReasonCode::ServerUnavailable, "encoded as 3.1.1 return code 0x03");
    // Connected devices keep moving QoS 0.
    publisher.client.publish("t", v4::QoS::AtMostOnce, false, "still here").await.unwrap();
    assert_eq!(&sub.next_publish().await.payload[..], b"still here");

    // Redis returns: everything recovers by itself.
    tokio::task::block_in_place(|| redis.restart(&[]));
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let (_, ack) = Raw::session(addr, Connect::new(Protocol::V5, "back")).await;
        if ack.reason == ReasonCode::Success {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "connects still refused after Redis returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// === QoS 2 exactly once across a takeover ===

async fn qos2_exactly_once_across_proxies(kind: RedisKind) {
    let c = cluster(kind, 1, 2).await;
    let mut sub = v4::connect(v4::options(c.proxy(1), "sub2")).await;
    sub.subscribe("q2", v4::QoS::ExactlyOnce).await;
    // A persistent publisher sends a QoS 2 PUBLISH on proxy 0 and loses the connection before
    // PUBREL; it resends the same packet (DUP) through proxy 1.
    let mut k = Connect::new(Protocol::V3_1_1, "pub2");
    k.clean_start = false;
    let (mut a, _) = Raw::session(c.proxy(0), k.clone()).await;
    let mut p = Publish::new("q2", CodecQoS::ExactlyOnce, Bytes::from_static(b"once"), PacketId::new(7));
    a.send(Packet::Publish(p.clone())).await;
    assert!(matches!(a.recv().await, Some(Packet::PubRec(_))));
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut b, ack) = Raw::session(c.proxy(1), k).await;
    assert!(ack.session_present);
    p.dup = true;
    b.send(Packet::Publish(p)).await;
    assert!(matches!(b.recv().await, Some(Packet::PubRec(_))), "the resend is acknowledged");
    b.send(Packet::PubRel(mqfleet_codec::Ack::new(PacketId::new(7).unwrap()))).await;
    assert!(matches!(b.recv().await, Some(Packet::PubComp(_))));
    assert_eq!(&sub.next_publish().await.payload[..], b"once");
    sub.expect_no_publish().await;
}

on_redis!(qos2_exactly_once_across_proxies: a_qos2_message_resent_through_another_proxy_is_delivered_once, a_qos2_message_resent_through_another_proxy_is_delivered_once_on_redis_cluster);

// === a QoS 2 mark never outlives the log entry it names ===

/// A shard killed while a QoS 2 message waits on a slow fsync loses the entry; the mark that
/// says "this packet id was accepted" must not survive it, or the resend of the message is taken
/// for a duplicate and answered without ever being delivered (MQTT-4.3.3: the receiver must not
/// lose a message it will acknowledge with PUBREC; RELIABILITY.md, finding 24). So the mark is
/// written only once the entry is durable.
async fn qos2_mark_waits_for_the_log(kind: RedisKind) {
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("shard-0.slow-disk");
    let flag = slow.display().to_string();
    let mut c = tokio::task::spawn_blocking(move || {
        let mut c = LocalCluster::start(kind, 0, 0);
        c.add_shard_with(&["--fault-slow-disk-file", &flag]);
        c.add_proxy(&[]);
        c
    })
    .await
    .unwrap();
    let mut sub = v4::connect(persistent(c.proxy(0), "marks-sub")).await;
    sub.subscribe("marks", v4::QoS::ExactlyOnce).await;
    let mut k = Connect::new(Protocol::V3_1_1, "marks-pub");
    k.clean_start = false;
    let (mut publisher, _) = Raw::session(c.proxy(0), k.clone()).await;

    // Every commit now waits 3 s; the shard reads the file every 100 ms.
    std::fs::write(&slow, "3000").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut p = Publish::new("marks", CodecQoS::ExactlyOnce, Bytes::from_static(b"exactly"), PacketId::new(3));
    publisher.send(Packet::Publish(p.clone())).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let keys = ClientKeys::new("marks-pub");
    let marked = tokio::task::block_in_place(|| c.redis.cli(&["SMEMBERS", &keys.inbound]));
    assert_eq!(marked.trim(), "", "no mark while the entry it names is not durable\n{}", c.logs());

    // The entry dies with the shard; the proxy resends the request once the shard is back.
    tokio::task::block_in_place(|| {
        c.shards[0].service.kill9();
        std::fs::write(&slow, "0").unwrap();
        c.restart_shard(0);
    });
    let rec = match publisher.recv_within(Duration::from_secs(30)).await {
        Ok(Some(Packet::PubRec(a))) => a,
        // The proxy may have given the device up instead: it reconnects and resends (DUP).
        _ => {
            let (again, ack) = Raw::session(c.proxy(0), k).await;
            assert!(ack.session_present);
            publisher = again;
            p.dup = true;
            publisher.send(Packet::Publish(p)).await;
            match publisher.recv().await {
                Some(Packet::PubRec(a)) => a,
                other => panic!("expected PUBREC for the resend, got {other:?}\n{}", c.logs()),
            }
        }
    };
    assert_eq!(Some(rec.pkid), PacketId::new(3));
    publisher.send(Packet::PubRel(mqfleet_codec::Ack::new(rec.pkid))).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubComp(_))));
    let got = tokio::time::timeout(Duration::from_secs(30), sub.next_publish()).await.expect("the acknowledged message is delivered");
    assert_eq!(&got.payload[..], b"exactly");
    sub.expect_no_publish().await;
}

on_redis!(qos2_mark_waits_for_the_log: a_qos2_mark_is_written_only_once_its_log_entry_is_durable, a_qos2_mark_is_written_only_once_its_log_entry_is_durable_on_redis_cluster);
// === shards join and leave under load ===

/// Publishes `n` retained messages `retained/<i>` through `addr`, acknowledged.
async fn retain_many(addr: std::net::SocketAddr, n: usize) {
    let mut backend = v4::connect(v4::options(addr, "backend")).await;
    for i in 0..n {
        backend.client.publish(format!("retained/{i}"), v4::QoS::AtLeastOnce, true, format!("r{i}")).await.unwrap();
    }
    let mut acked = 0;
    while acked < n {
        if let v4::Packet::PubAck(_) = backend.next().await {
            acked += 1;
        }
    }
}

/// Every retained message is served, each exactly once.
async fn assert_retained_once(addr: std::net::SocketAddr, n: usize) {
    let mut reader = v4::connect(v4::options(addr, "reader")).await;
    reader.client.subscribe("retained/#", v4::QoS::AtMostOnce).await.unwrap();
    let mut topics = std::collections::HashSet::new();
    let mut copies = 0;
    while let Ok(p) = tokio::time::timeout(Duration::from_secs(2), reader.next_publish()).await {
        topics.insert(p.topic.clone());
        copies += 1;
    }
    assert_eq!((topics.len(), copies), (n, n), "every retained message, once");
}

const TOPICS: u32 = 40;

/// Streams QoS 1 messages over `TOPICS` exact topics from proxy 0 to a subscriber on proxy 1;
/// starts `change` after 150 messages and keeps streaming until `done` holds, then 200 more.
/// Asserts every acknowledged message arrived, each topic in publishing order.
async fn stream_across(
    c: Arc<Mutex<LocalCluster>>,
    change: impl FnOnce(&mut LocalCluster) + Send + 'static,
    done: impl Fn(&LocalCluster) -> bool + Send + Sync + 'static,
) {
    let (p0, p1) = {
        let c = c.lock().unwrap();
        (c.proxy(0), c.proxy(1))
    };
    let mut sub = v4::connect(v4::options(p1, "watcher")).await;
    for t in 0..TOPICS {
        sub.subscribe(&format!("load/{t}"), v4::QoS::AtLeastOnce).await;
    }
    let mut publisher = Raw::v4(p0, "streamer").await;
    let mut sent: Vec<(u32, u32)> = Vec::new();
    let (mut seq, mut changed, mut after) = (0u32, false, 0);
    let done = Arc::new(done);
    let mut change = Some(change);
    while after < 200 {
        seq += 1;
        let topic = seq % TOPICS;
        let pkid = PacketId::new((seq % 60_000) as u16 + 1);
        let payload = Bytes::from(format!("{topic}:{seq}"));
        publisher.send(Packet::Publish(Publish::new(format!("load/{topic}").as_str(), CodecQoS::AtLeastOnce, payload, pkid))).await;
        match publisher.recv_within(Duration::from_secs(30)).await {
            Ok(Some(Packet::PubAck(a))) if Some(a.pkid) == pkid => sent.push((topic, seq)),
            other => panic!("message {seq}: expected its PUBACK, got {other:?}"),
        }
        if seq == 150 {
            let (c, change) = (c.clone(), change.take().expect("once"));
            tokio::task::spawn_blocking(move || change(&mut c.lock().unwrap()));
        }
        if !changed && seq > 150 && seq.is_multiple_of(20) {
            let (c, done) = (c.clone(), done.clone());
            // try_lock: the change holds the cluster while it runs.
            changed = tokio::task::spawn_blocking(move || c.try_lock().map(|c| done(&c)).unwrap_or(false)).await.unwrap();
        }
        if changed {
            after += 1;
        }
        assert!(seq < 20_000, "the ring change did not complete:\n{}", c.lock().unwrap().logs());
    }
    let mut seen: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
    let mut distinct = 0;
    while distinct < sent.len() {
        let p = tokio::time::timeout(Duration::from_secs(30), sub.next_publish()).await.expect("every acknowledged message arrives");
        let (topic, n) = std::str::from_utf8(&p.payload).unwrap().split_once(':').unwrap();
        let list = seen.entry(topic.parse().unwrap()).or_default();
        let n: u32 = n.parse().unwrap();
        if !list.contains(&n) {
            list.push(n);
            distinct += 1;
        }
    }
    for t in 0..TOPICS {
        let expected: Vec<u32> = sent.iter().filter(|(topic, _)| *topic == t).map(|(_, s)| *s).collect();
        assert_eq!(seen.get(&t).cloned().unwrap_or_default(), expected, "topic load/{t}: all delivered, in order");
    }
}

fn switched(c: &LocalCluster, times: usize) -> bool {
    c.proxies.iter().all(|p| p.service.log_text().matches("switched to the new ring").count() >= times)
}

async fn adding_a_shard_under_load(kind: RedisKind) {
    let c = tokio::task::spawn_blocking(move || LocalCluster::start_discovering(kind, 2, 2)).await.unwrap();
    const RETAINED: usize = 300;
    retain_many(c.proxy(0), RETAINED).await;
    let c = Arc::new(Mutex::new(c));
    stream_across(
        c.clone(),
        |c| {
            c.add_shard();
        },
        |c| c.redis.ring_members().len() == 3 && switched(c, 1),
    )
    .await;
    // About 1/S of the topics moved: the new shard holds about a third of the retained
    // messages (tolerance ±40 %), and every retained message is still served exactly once.
    let (moved, p1) = {
        let c = c.lock().unwrap();
        (c.shards[2].service.metric("mqfleet_shard_retained_messages").unwrap_or(0.0), c.proxy(1))
    };
    let expected = RETAINED as f64 / 3.0;
    assert!(
        (expected * 0.6..=expected * 1.4).contains(&moved),
        "the new shard took {moved} of {RETAINED} retained messages; expected about {expected}"
    );
    assert_retained_once(p1, RETAINED).await;
}

on_redis!(adding_a_shard_under_load: adding_a_shard_under_load_loses_nothing_keeps_order_and_moves_a_third, adding_a_shard_under_load_loses_nothing_keeps_order_and_moves_a_third_on_redis_cluster);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_leaving_under_load_hands_everything_over() {
    let c = tokio::task::spawn_blocking(|| {
        let mut c = LocalCluster::start_discovering(RedisKind::Standalone, 2, 0);
        c.add_shard_with(&["--leave-on-shutdown", "true"]);
        c.wait_for_ring(3);
        c.add_proxy(&[]);
        c.add_proxy(&[]);
        c
    })
    .await
    .unwrap();
    const RETAINED: usize = 150;
    retain_many(c.proxy(0), RETAINED).await;
    let c = Arc::new(Mutex::new(c));
    stream_across(
        c.clone(),
        |c| {
            let status = c.shards[2].service.terminate();
            assert!(status.is_some_and(|s| s.success()), "the leaving shard exits cleanly:\n{}", c.logs());
        },
        |c| c.redis.ring_members().len() == 2 && switched(c, 1),
    )
    .await;
    let p1 = {
        let c = c.lock().unwrap();
        assert!(c.shards[2].service.log_text().contains("left the ring"), "{}", c.logs());
        c.proxy(1)
    };
    assert_retained_once(p1, RETAINED).await;
}
