//! The Redis backend against real `redis-server` processes: standalone, and a 3-master Redis
//! Cluster where per-client keys must stay in one slot.

use std::time::Duration;

use bytes::Bytes;
use session_store::redis::keys::ClientKeys;
use session_store::*;
use testkit::{RedisCluster, RedisServer};

fn record(id: &str, epoch: u64, connected: bool, expiry: u32) -> SessionRecord {
    SessionRecord {
        client_id: id.into(),
        protocol_level: 5,
        expiry_interval: expiry,
        subscriptions: vec![StoredSubscription {
            filter: "a/#".into(),
            qos: 1,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        }],
        will: None,
        epoch,
        connected,
        disconnected_at_ms: if connected { 0 } else { now_ms() },
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn store(url: &str, max_queue_len: u32) -> Store {
    Store::Redis(RedisStore::connect(RedisTarget::parse(url).unwrap(), max_queue_len, Duration::from_secs(5)).await.unwrap())
}

fn enqueue(msg: &'static [u8], to: &[&str]) -> Op {
    Op::Enqueue {
        message: Bytes::from_static(msg),
        expires_at_ms: None,
        to: to.iter().map(|c| (c.to_string(), Delivery { qos: 1, ..Default::default() })).collect(),
        origin: None,
    }
}

/// The behaviour every backend shares, run against one store.
async fn behaves_like_a_session_store(s: Store) {
    // Records round-trip.
    s.write(vec![Op::PutSession(record("a", 1, true, 600)), Op::PutSession(record("{b}", 1, true, 600))]).await.unwrap();
    assert_eq!(s.load_session("a").await.unwrap(), Some(record("a", 1, true, 600)));
    assert_eq!(s.load_session("nobody").await.unwrap(), None);

    // Enqueue to several sessions, bounded per session; not to unknown sessions.
    let r = s.write(vec![enqueue(b"1", &["a", "{b}", "ghost"]), enqueue(b"2", &["a"])]).await.unwrap();
    match &r[0] {
        OpResult::Enqueued(seqs) => assert!(seqs[0].is_some() && seqs[1].is_some() && seqs[2].is_none(), "{seqs:?}"),
        other => panic!("{other:?}"),
    }
    let q = s.load_queue("a", 0).await.unwrap();
    assert_eq!(q.iter().map(|m| &m.message[..]).collect::<Vec<_>>(), [&b"1"[..], b"2"]);
    assert!(q[0].seq < q[1].seq);
    let r = s.write(vec![enqueue(b"3", &["a"])]).await.unwrap();
    assert_eq!(r, vec![OpResult::Enqueued(vec![None])], "queue of 2 is full");

    // Delivery state, then acknowledgement.
    s.write(vec![Op::SetState { client_id: "a".into(), seq: q[0].seq, state: DeliveryState::Sent { pkid: 7 } }]).await.unwrap();
    assert_eq!(s.load_queue("a", 0).await.unwrap()[0].state, DeliveryState::Sent { pkid: 7 });
    s.write(vec![Op::Ack { client_id: "a".into(), seq: q[0].seq }]).await.unwrap();
    assert_eq!(s.load_queue("a", 0).await.unwrap().len(), 1);

    // Inbound QoS 2 markers.
    s.write(vec![Op::MarkInbound { client_id: "a".into(), pkid: 9 }, Op::MarkInbound { client_id: "a".into(), pkid: 3 }]).await.unwrap();
    assert_eq!(s.load_inbound("a").await.unwrap(), [3, 9]);
    s.write(vec![Op::ClearInbound { client_id: "a".into(), pkid: 9 }]).await.unwrap();
    assert_eq!(s.load_inbound("a").await.unwrap(), [3]);

    // Removal takes everything of the session.
    s.write(vec![Op::RemoveSession { client_id: "a".into() }]).await.unwrap();
    assert_eq!(s.load_session("a").await.unwrap(), None);
    assert!(s.load_queue("a", 0).await.unwrap().is_empty());
    assert!(s.load_inbound("a").await.unwrap().is_empty());
    assert_eq!(s.load_queue("{b}", 0).await.unwrap().len(), 1, "other sessions untouched");
}

#[tokio::test]
async fn standalone_redis_behaves_like_a_session_store() {
    let redis = RedisServer::start();
    behaves_like_a_session_store(store(&redis.url(), 2).await).await;
}

#[tokio::test]
async fn redis_cluster_behaves_like_a_session_store() {
    let cluster = RedisCluster::start();
    behaves_like_a_session_store(store(&cluster.url(), 2).await).await;
}

#[tokio::test]
async fn cluster_spreads_clients_over_slots_but_keeps_each_client_in_one() {
    let cluster = RedisCluster::start();
    let s = store(&cluster.url(), 10).await;
    let mut slots = std::collections::HashSet::new();
    for i in 0..50 {
        let id = format!("{{dev}}-{i}");
        s.write(vec![Op::PutSession(record(&id, 1, true, 600)), enqueue(b"x", &[&id]), Op::MarkInbound { client_id: id.clone(), pkid: 1 }])
            .await
            .unwrap();
        let k = ClientKeys::new(&id);
        let slot = cluster.slot_of(&k.session);
        assert!(k.all().iter().all(|key| cluster.slot_of(key) == slot));
        slots.insert(slot);
    }
    assert!(slots.len() > 40, "ids sharing a {{tag}} must not share a slot: {} slots", slots.len());
}

#[tokio::test]
async fn claims_fence_older_connections() {
    let redis = RedisServer::start();
    let Store::Redis(r) = store(&redis.url(), 10).await else { unreachable!() };
    let first = r.claim("dev", "proxy-a").await.unwrap();
    assert_eq!(first, Claim { previous_owner: None, epoch: 1, has_session: false });
    r.write(vec![Op::PutSession(record("dev", first.epoch, true, 600))]).await.unwrap();
    let second = r.claim("dev", "proxy-b").await.unwrap();
    assert_eq!(second, Claim { previous_owner: Some("proxy-a".into()), epoch: 2, has_session: true });
    // The old connection's late write is refused; the new one's lands.
    let mut stale = record("dev", first.epoch, false, 600);
    stale.subscriptions.clear();
    r.write(vec![Op::PutSession(stale)]).await.unwrap();
    assert_eq!(r.load_session("dev").await.unwrap().unwrap().subscriptions.len(), 1, "fenced");
    r.write(vec![Op::PutSession(record("dev", second.epoch, true, 600))]).await.unwrap();
    // Release only by the current owner.
    assert!(!r.release("dev", "proxy-a", first.epoch).await.unwrap());
    assert!(r.release("dev", "proxy-b", second.epoch).await.unwrap());
    assert_eq!(r.owner("dev").await.unwrap(), (None, 2));
    // A clean session (no record) disappears with its release.
    let c = r.claim("clean", "proxy-a").await.unwrap();
    assert!(r.release("clean", "proxy-a", c.epoch).await.unwrap());
    assert_eq!(redis.cli(&["EXISTS", &ClientKeys::new("clean").session]), "0");
}

#[tokio::test]
async fn concurrent_claims_leave_exactly_one_owner() {
    let redis = RedisServer::start();
    let Store::Redis(r) = store(&redis.url(), 10).await else { unreachable!() };
    for round in 0..100 {
        let id = format!("race-{round}");
        let (a, b) = tokio::join!(r.claim(&id, "proxy-a"), r.claim(&id, "proxy-b"));
        let (a, b) = (a.unwrap(), b.unwrap());
        // One saw the other as previous owner; the higher epoch owns.
        let winner = if a.epoch > b.epoch { "proxy-a" } else { "proxy-b" };
        assert_ne!(a.epoch, b.epoch);
        assert_eq!(r.owner(&id).await.unwrap().0.as_deref(), Some(winner));
        assert!(a.previous_owner.is_some() || b.previous_owner.is_some());
    }
}

#[tokio::test]
async fn an_offline_session_expires_with_its_queue() {
    let redis = RedisServer::start();
    let s = store(&redis.url(), 10).await;
    s.write(vec![
        Op::PutSession(record("brief", 1, false, 1)),
        enqueue(b"q", &["brief"]),
        Op::MarkInbound { client_id: "brief".into(), pkid: 4 },
    ])
    .await
    .unwrap();
    let k = ClientKeys::new("brief");
    for key in [&k.session, &k.queue, &k.inbound] {
        let ttl: i64 = redis.cli(&["PTTL", key]).parse().unwrap();
        assert!(ttl > 0 && ttl <= 1000, "{key}: {ttl}");
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(s.load_session("brief").await.unwrap(), None);
    assert!(s.load_queue("brief", 0).await.unwrap().is_empty());
    // Reconnecting (claim) stops the clock.
    s.write(vec![Op::PutSession(record("back", 1, false, 1))]).await.unwrap();
    let Store::Redis(r) = &s else { unreachable!() };
    r.claim("back", "p").await.unwrap();
    assert_eq!(redis.cli(&["PTTL", &ClientKeys::new("back").session]), "-1");
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_error_not_a_hang() {
    let port = testkit::free_port();
    let started = tokio::time::Instant::now();
    let err = RedisStore::connect(RedisTarget::parse(&format!("redis://127.0.0.1:{port}")).unwrap(), 10, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().starts_with("Redis failed while connecting"), "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn replayed_log_positions_are_not_queued_twice() {
    let redis = RedisServer::start();
    let s = store(&redis.url(), 10).await;
    s.write(vec![Op::PutSession(record("p", 1, true, 600))]).await.unwrap();
    let at = |pos: u64, body: &'static [u8]| Op::Enqueue {
        message: Bytes::from_static(body),
        expires_at_ms: None,
        to: vec![("p".into(), Delivery { qos: 1, ..Default::default() })],
        origin: Some(("shard-1".into(), pos)),
    };
    let first = s.write(vec![at(10, b"ten"), at(11, b"eleven"), at(12, b"twelve")]).await.unwrap();
    let seq = |r: &OpResult| match r {
        OpResult::Enqueued(v) => v[0],
        other => panic!("{other:?}"),
    };
    // Twelve was delivered and acknowledged.
    s.write(vec![Op::Ack { client_id: "p".into(), seq: seq(&first[2]).unwrap() }]).await.unwrap();
    // The shard crashed and replays 10, 11 and 12: nothing is queued twice; what is still queued
    // answers with its queue position (so the shard can deliver it live again), what was
    // acknowledged with none.
    let again = s.write(vec![at(10, b"ten"), at(11, b"eleven"), at(12, b"twelve")]).await.unwrap();
    assert_eq!(seq(&again[0]), seq(&first[0]));
    assert_eq!(seq(&again[1]), seq(&first[1]));
    assert_eq!(seq(&again[2]), None);
    let queue = s.load_queue("p", 0).await.unwrap();
    assert_eq!(queue.iter().map(|q| &q.message[..]).collect::<Vec<_>>(), [&b"ten"[..], b"eleven"]);
    // Another shard's positions are independent.
    let other = Op::Enqueue {
        message: Bytes::from_static(b"o"),
        expires_at_ms: None,
        to: vec![("p".into(), Delivery::default())],
        origin: Some(("shard-2".into(), 1)),
    };
    assert!(matches!(&s.write(vec![other]).await.unwrap()[0], OpResult::Enqueued(v) if v[0].is_some()));
}
