//! The Redis backend against real `redis-server` processes: standalone, a 3-master Redis
//! Cluster where per-client keys must stay in one slot, and a master with a replica under three
//! Sentinels, failed over for real.

use std::time::Duration;

use bytes::Bytes;
use session_store::redis::keys::ClientKeys;
use session_store::*;
use testkit::{RedisCluster, RedisSentinel, RedisServer};

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
        OpResult::Enqueued(seqs) => {
            assert!(seqs[0].seq().is_some() && seqs[1].seq().is_some() && seqs[2] == Queued::NoSession, "{seqs:?}")
        }
        other => panic!("{other:?}"),
    }
    let q = s.load_queue("a", 0).await.unwrap();
    assert_eq!(q.iter().map(|m| &m.message[..]).collect::<Vec<_>>(), [&b"1"[..], b"2"]);
    assert!(q[0].seq < q[1].seq);
    let r = s.write(vec![enqueue(b"3", &["a"])]).await.unwrap();
    assert_eq!(r, vec![OpResult::Enqueued(vec![Queued::Full])], "queue of 2 is full");

    // Delivery state, then acknowledgement.
    s.write(vec![Op::SetState { client_id: "a".into(), seq: q[0].seq, state: DeliveryState::Sent { pkid: 7 } }]).await.unwrap();
    assert_eq!(s.load_queue("a", 0).await.unwrap()[0].state, DeliveryState::Sent { pkid: 7 });
    s.write(vec![Op::Ack { client_id: "a".into(), seq: q[0].seq }]).await.unwrap();
    assert_eq!(s.load_queue("a", 0).await.unwrap().len(), 1);

    // Inbound QoS 2 markers.
    let mark = |pkid, by: &str| Op::MarkInbound { client_id: "a".into(), pkid, by: by.into(), replacing: vec![] };
    let r = s.write(vec![mark(9, "s@1"), mark(3, "s@2")]).await.unwrap();
    assert_eq!(r, [OpResult::Marked(true), OpResult::Marked(true)]);
    assert_eq!(s.load_inbound("a").await.unwrap(), [3, 9]);
    // The same acceptance marking again (a retried write) finds the mark its own; another copy
    // of the message (a resend, accepted at another position) finds it taken: the shard answers
    // that one without routing it.
    assert_eq!(s.write(vec![mark(9, "s@1")]).await.unwrap(), [OpResult::Marked(true)]);
    assert_eq!(s.write(vec![mark(9, "s@7")]).await.unwrap(), [OpResult::Marked(false)]);
    s.write(vec![Op::ClearInbound { client_id: "a".into(), pkid: 9 }]).await.unwrap();
    assert_eq!(s.load_inbound("a").await.unwrap(), [3]);
    assert_eq!(s.write(vec![mark(9, "s@7")]).await.unwrap(), [OpResult::Marked(true)], "new again once released");

    // A refused acceptance's mark: a resend that names it among the refused takes it over; the
    // refused one giving it back afterwards leaves the new holder's mark alone.
    let r = s.write(vec![mark(4, "s@10")]).await.unwrap();
    assert_eq!(r, [OpResult::Marked(true)]);
    let take_over =
        |by: &str| Op::MarkInbound { client_id: "a".into(), pkid: 4, by: by.into(), replacing: vec!["s@8".into(), "s@10".into()] };
    assert_eq!(s.write(vec![take_over("s@11")]).await.unwrap(), [OpResult::Marked(true)]);
    s.write(vec![Op::UnmarkInbound { client_id: "a".into(), pkid: 4, by: "s@10".into() }]).await.unwrap();
    assert_eq!(s.write(vec![mark(4, "s@12")]).await.unwrap(), [OpResult::Marked(false)], "s@11 still holds it");
    // Given back by its holder, the id is new again.
    s.write(vec![Op::UnmarkInbound { client_id: "a".into(), pkid: 4, by: "s@11".into() }]).await.unwrap();
    assert_eq!(s.load_inbound("a").await.unwrap(), [3, 9]);
    assert_eq!(s.write(vec![mark(4, "s@12")]).await.unwrap(), [OpResult::Marked(true)]);

    // Removal takes everything of the session.
    s.write(vec![Op::RemoveSession { client_id: "a".into(), epoch: None }]).await.unwrap();
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
async fn redis_under_sentinel_behaves_like_a_session_store() {
    let sentinel = tokio::task::spawn_blocking(RedisSentinel::start).await.unwrap();
    behaves_like_a_session_store(store(&sentinel.url(), 2).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_follows_a_sentinel_failover_to_the_new_master() {
    let mut sentinel = tokio::task::spawn_blocking(RedisSentinel::start).await.unwrap();
    let s = store(&sentinel.url(), 10).await;
    let Store::Redis(r) = &s else { unreachable!() };
    let before = r.claim("dev", "proxy-a").await.unwrap();
    s.write(vec![Op::PutSession(record("dev", before.epoch, true, 600)), enqueue(b"kept", &["dev"])]).await.unwrap();
    // Replication is asynchronous: wait until the replica has it, as an operator relying on
    // Sentinel would (WAIT), so the failover is what is under test, not replication lag.
    assert_eq!(sentinel.servers[0].cli(&["WAIT", "1", "5000"]), "1");
    let old_master = sentinel.servers[0].port;
    sentinel.servers[0].kill();
    // Operations fail while the Sentinels agree (down-after 1 s), then reach the promoted replica.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let after = loop {
        if let Ok(c) = r.claim("dev", "proxy-b").await {
            break c;
        }
        assert!(tokio::time::Instant::now() < deadline, "the store never reached the new master");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(sentinel.master_port(), Some(sentinel.servers[1].port), "the replica was promoted (old master {old_master})");
    assert_eq!((after.previous_owner.as_deref(), after.has_session), (Some("proxy-a"), true), "the session survived the failover");
    assert!(after.epoch > before.epoch);
    let queued = s.load_queue("dev", 0).await.unwrap();
    assert_eq!(queued.len(), 1, "the queued message survived the failover");
    s.write(vec![Op::PutSession(record("dev", after.epoch, true, 600))]).await.unwrap();
    assert_eq!(sentinel.servers[1].cli(&["HGET", &ClientKeys::new("dev").session, "owner"]), "proxy-b", "writes land on the new master");
}

#[tokio::test]
async fn cluster_spreads_clients_over_slots_but_keeps_each_client_in_one() {
    let cluster = RedisCluster::start();
    let s = store(&cluster.url(), 10).await;
    let mut slots = std::collections::HashSet::new();
    for i in 0..50 {
        let id = format!("{{dev}}-{i}");
        s.write(vec![
            Op::PutSession(record(&id, 1, true, 600)),
            enqueue(b"x", &[&id]),
            Op::MarkInbound { client_id: id.clone(), pkid: 1, by: "s@1".into(), replacing: vec![] },
        ])
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
    assert_eq!((first.previous_owner.as_deref(), first.has_session), (None, false));
    r.write(vec![Op::PutSession(record("dev", first.epoch, true, 600))]).await.unwrap();
    let second = r.claim("dev", "proxy-b").await.unwrap();
    assert_eq!((second.previous_owner.as_deref(), second.has_session), (Some("proxy-a"), true));
    assert!(second.epoch > first.epoch);
    // The old connection's late write is refused; the new one's lands.
    let mut stale = record("dev", first.epoch, false, 600);
    stale.subscriptions.clear();
    r.write(vec![Op::PutSession(stale)]).await.unwrap();
    assert_eq!(r.load_session("dev").await.unwrap().unwrap().subscriptions.len(), 1, "fenced");
    r.write(vec![Op::PutSession(record("dev", second.epoch, true, 600))]).await.unwrap();
    // Release only by the current owner.
    assert!(!r.release("dev", "proxy-a", first.epoch, false).await.unwrap());
    assert!(r.release("dev", "proxy-b", second.epoch, false).await.unwrap());
    assert_eq!(r.owner("dev").await.unwrap(), (None, second.epoch));
    // A clean session (no record) disappears with its release; the next connection's epoch is
    // still higher (fencing and the settled marker compare epochs across connections).
    let c = r.claim("clean", "proxy-a").await.unwrap();
    assert!(r.release("clean", "proxy-a", c.epoch, false).await.unwrap());
    assert_eq!(redis.cli(&["EXISTS", &ClientKeys::new("clean").session]), "0");
    assert!(r.claim("clean", "proxy-a").await.unwrap().epoch > c.epoch);
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
        Op::MarkInbound { client_id: "brief".into(), pkid: 4, by: "s@1".into(), replacing: vec![] },
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

/// An acknowledgement can reach the store late (retried through an outage) — after the session
/// it was for ended and a new one began. Positions never repeat for a client, so it cannot
/// remove the new session's message at the same position.
#[tokio::test]
async fn queue_positions_are_not_reused_by_a_later_session_of_the_same_client() {
    let redis = RedisServer::start();
    let s = store(&redis.url(), 10).await;
    s.write(vec![Op::PutSession(record("again", 1, true, 600)), enqueue(b"old", &["again"])]).await.unwrap();
    let old = s.load_queue("again", 0).await.unwrap()[0].seq;
    s.write(vec![Op::RemoveSession { client_id: "again".into(), epoch: None }]).await.unwrap();
    s.write(vec![Op::PutSession(record("again", 2, true, 600)), enqueue(b"new", &["again"])]).await.unwrap();
    let q = s.load_queue("again", 0).await.unwrap();
    assert_eq!(q.len(), 1);
    assert!(q[0].seq > old, "a later session's position {} must come after the earlier one's {old}", q[0].seq);
    // The earlier session's acknowledgement, arriving late, leaves the new message queued.
    s.write(vec![Op::Ack { client_id: "again".into(), seq: old }]).await.unwrap();
    assert_eq!(s.load_queue("again", 0).await.unwrap().len(), 1);
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

/// A batch of a shard's enqueues is queued in the order given, every one of them: an enqueue
/// overtaken by a later log position would be taken for a replay and dropped.
async fn a_large_batch_is_queued_whole_and_in_order(url: &str) {
    let s = store(url, 1000).await;
    s.write(vec![Op::PutSession(record("burst", 1, true, 600)), Op::PutSession(record("other", 1, true, 600))]).await.unwrap();
    let ops: Vec<Op> = (1..=300u64)
        .map(|pos| Op::Enqueue {
            message: Bytes::from(pos.to_string()),
            expires_at_ms: None,
            to: vec![("burst".into(), Delivery { qos: 1, ..Default::default() }), ("other".into(), Delivery::default())],
            origin: Some(("shard-0".into(), pos)),
        })
        .collect();
    let results = s.write(ops).await.unwrap();
    let seqs: Vec<u64> = results
        .iter()
        .map(|r| match r {
            OpResult::Enqueued(v) => v[0].seq().expect("every copy is queued"),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "queue positions follow the batch order: {seqs:?}");
    for client in ["burst", "other"] {
        let bodies: Vec<String> =
            s.load_queue(client, 0).await.unwrap().iter().map(|q| String::from_utf8(q.message.to_vec()).unwrap()).collect();
        assert_eq!(bodies, (1..=300).map(|p| p.to_string()).collect::<Vec<_>>(), "{client}");
    }
}

#[tokio::test]
async fn a_large_batch_is_queued_whole_and_in_order_standalone() {
    let redis = RedisServer::start();
    a_large_batch_is_queued_whole_and_in_order(&redis.url()).await;
}

#[tokio::test]
async fn a_large_batch_is_queued_whole_and_in_order_on_a_cluster() {
    let cluster = RedisCluster::start();
    a_large_batch_is_queued_whole_and_in_order(&cluster.url()).await;
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
    let seq = |r: &OpResult| seq(r).seq();
    // Twelve was delivered and acknowledged.
    s.write(vec![Op::Ack { client_id: "p".into(), seq: seq(&first[2]).unwrap() }]).await.unwrap();
    // The shard crashed and replays 10, 11 and 12: nothing is queued twice; what is still queued
    // answers with its queue position (so the shard can deliver it live again), what was
    // acknowledged with none.
    let again = s.write(vec![at(10, b"ten"), at(11, b"eleven"), at(12, b"twelve")]).await.unwrap();
    assert_eq!(seq(&again[0]), seq(&first[0]));
    assert_eq!(seq(&again[1]), seq(&first[1]));
    assert_eq!(seq(&again[2]), None);
    assert_eq!(again[2], OpResult::Enqueued(vec![Queued::Delivered]), "told apart from a full queue");
    let queue = s.load_queue("p", 0).await.unwrap();
    assert_eq!(queue.iter().map(|q| &q.message[..]).collect::<Vec<_>>(), [&b"ten"[..], b"eleven"]);
    // Another shard's positions are independent.
    let other = Op::Enqueue {
        message: Bytes::from_static(b"o"),
        expires_at_ms: None,
        to: vec![("p".into(), Delivery::default())],
        origin: Some(("shard-2".into(), 1)),
    };
    assert!(matches!(&s.write(vec![other]).await.unwrap()[0], OpResult::Enqueued(v) if v[0].seq().is_some()));
}

async fn redis_store(url: &str) -> RedisStore {
    RedisStore::connect(RedisTarget::parse(url).unwrap(), 100, Duration::from_secs(5)).await.unwrap()
}

fn will(payload: &str, delay: u32) -> StoredWill {
    StoredWill { message: payload.as_bytes().to_vec(), delay_interval: delay, message_expiry_interval: None }
}

/// Everything about a proxy dying, on one deployment.
async fn a_dead_proxys_sessions_are_settled_once(r: RedisStore) {
    let s = Store::Redis(r.clone());
    // proxy-a holds a clean session with a will, a persistent one with a delayed will, and a
    // client that moved to proxy-b since.
    let clean = r.claim("clean", "proxy-a").await.unwrap();
    assert!(r.set_will("clean", clean.epoch, Some(&will("bye", 0))).await.unwrap());
    let kept = r.claim("kept", "proxy-a").await.unwrap();
    s.write(vec![Op::PutSession(record("kept", kept.epoch, true, 600))]).await.unwrap();
    r.set_will("kept", kept.epoch, Some(&will("later", 30))).await.unwrap();
    r.claim("moved", "proxy-a").await.unwrap();
    let moved = r.claim("moved", "proxy-b").await.unwrap();
    r.set_will("moved", moved.epoch, Some(&will("not yours", 0))).await.unwrap();

    assert!(!r.proxy_beat("proxy-a").await.unwrap(), "a first beat registers");
    assert!(r.proxy_beat("proxy-a").await.unwrap(), "later beats find it registered");
    r.proxy_beat("proxy-b").await.unwrap();
    assert_eq!(r.reap_dead_proxies(Duration::from_secs(60)).await.unwrap(), Vec::<String>::new());
    let mut live = r.live_proxies(Duration::from_secs(60)).await.unwrap();
    live.sort();
    assert_eq!(live, ["proxy-a", "proxy-b"]);

    // proxy-a stops beating; two proxies reap at once: exactly one gets it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.proxy_beat("proxy-b").await.unwrap();
    let (x, y) = tokio::join!(r.reap_dead_proxies(Duration::from_millis(200)), r.reap_dead_proxies(Duration::from_millis(200)));
    let mut reaped = [x.unwrap(), y.unwrap()].concat();
    reaped.sort();
    assert_eq!(reaped, ["proxy-a"], "reaped once");
    assert_eq!(r.live_proxies(Duration::from_millis(200)).await.unwrap(), ["proxy-b"]);

    let mut claimed = r.claimed_by("proxy-a").await.unwrap();
    claimed.sort();
    assert_eq!(claimed, ["clean", "kept", "moved"]);
    let o = r.orphan("clean", "proxy-a", "proxy-b").await.unwrap().expect("owned by the dead proxy");
    let due = vec![OwedWill { epoch: clean.epoch, will: will("bye", 0) }];
    assert_eq!(
        o,
        Orphaned { went_offline: true, delayed_will: None, owed: due },
        "a clean session's will is due now, proxy-b's to publish"
    );
    assert_eq!(r.owner("clean").await.unwrap(), (None, 0), "the clean session is gone");
    assert_eq!(r.orphan("clean", "proxy-a", "proxy-b").await.unwrap(), None, "settled once");
    let o = r.orphan("kept", "proxy-a", "proxy-b").await.unwrap().unwrap();
    assert_eq!(o.delayed_will, Some(Duration::from_secs(30)), "a delayed will waits, in Redis");
    assert!(o.owed.is_empty());
    assert!(s.load_session("kept").await.unwrap().is_some(), "a persistent session outlives its proxy");
    assert_eq!(r.owner("kept").await.unwrap().0, None, "offline");
    assert_eq!(r.orphan("moved", "proxy-a", "proxy-b").await.unwrap(), None, "moved on: no will from here");
    // proxy-a was only paused: when it resumes, its beat tells it that it was taken for dead,
    // and a connection of it that ends now may not publish the will again.
    assert!(!r.proxy_beat("proxy-a").await.unwrap(), "a reaped proxy learns it at its next beat");
    assert!(!r.withdraw_will("kept", kept.epoch, "proxy-a", &will("later", 30)).await.unwrap(), "settled: its will waits in Redis");
    assert!(
        !r.withdraw_will("clean", clean.epoch, "proxy-a", &will("bye", 0)).await.unwrap(),
        "a settled clean session too, though its keys are gone: proxy-b publishes that will"
    );
    // Connections nobody settled publish their own will, once.
    r.set_will("moved", moved.epoch, Some(&will("mine", 0))).await.unwrap();
    assert!(r.withdraw_will("moved", moved.epoch, "proxy-b", &will("mine", 0)).await.unwrap());
    assert!(!r.withdraw_will("moved", moved.epoch, "proxy-b", &will("mine", 0)).await.unwrap(), "once");
    r.forget_proxy("proxy-a").await.unwrap();
    assert!(r.claimed_by("proxy-a").await.unwrap().is_empty());

    // The delayed will comes due: taken once, by whichever proxy asks first.
    r.schedule_will("kept", 1).await.unwrap();
    assert_eq!(r.due_wills(now_ms(), 10).await.unwrap(), ["kept"]);
    let (a, b) = tokio::join!(r.take_will("kept", "proxy-b"), r.take_will("kept", "proxy-c"));
    let taken: Vec<OwedWill> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(taken, [OwedWill { epoch: kept.epoch, will: will("later", 30) }]);
    assert!(r.due_wills(now_ms(), 10).await.unwrap().is_empty());
}

/// A client whose proxy died reconnects elsewhere before the settlement: the dead proxy's
/// connection still owes its will (no delay: due when it ended, MQTT-3.1.3-9), and the
/// settlement publishes it — once, and not if that connection's proxy published it itself
/// (it was alive after all, and got the takeover notice).
#[tokio::test]
async fn a_replaced_connection_still_gets_its_will_exactly_once() {
    let redis = RedisServer::start();
    let r = redis_store(&redis.url()).await;
    for (old_proxy_alive, client) in [(false, "dev-1"), (true, "dev-2")] {
        let old = r.claim(client, "proxy-a").await.unwrap();
        assert!(r.set_will(client, old.epoch, Some(&will("gone", 0))).await.unwrap());
        let new = r.claim(client, "proxy-b").await.unwrap();
        assert_eq!(new.previous_owner.as_deref(), Some("proxy-a"));
        if old_proxy_alive {
            assert!(
                r.withdraw_will(client, old.epoch, "proxy-a", &will("gone", 0)).await.unwrap(),
                "proxy-a publishes its connection's will"
            );
            assert!(accept(&r, client, old.epoch, "proxy-a", "shard-1@1").await, "and a shard accepts it");
            assert_eq!(r.orphan(client, "proxy-a", "proxy-b").await.unwrap(), None, "then the settlement does not");
        } else {
            let o = r.orphan(client, "proxy-a", "proxy-b").await.unwrap().expect("the dead proxy's connection owed a will");
            assert_eq!(o, Orphaned { owed: vec![OwedWill { epoch: old.epoch, will: will("gone", 0) }], ..Orphaned::default() });
            assert_eq!(r.orphan(client, "proxy-a", "proxy-b").await.unwrap(), None, "once");
            assert!(
                !r.withdraw_will(client, old.epoch, "proxy-a", &will("gone", 0)).await.unwrap(),
                "a late end on proxy-a does not publish it again"
            );
        }
        assert_eq!(r.owner(client).await.unwrap(), (Some("proxy-b".into()), new.epoch), "the new connection is untouched");
    }
    // A delayed will is cancelled by the reconnect [MQTT-3.1.3-9]: nothing owed.
    let old = r.claim("dev-3", "proxy-a").await.unwrap();
    r.set_will("dev-3", old.epoch, Some(&will("later", 30))).await.unwrap();
    r.claim("dev-3", "proxy-b").await.unwrap();
    assert_eq!(r.orphan("dev-3", "proxy-a", "proxy-b").await.unwrap(), None);
}

/// A proxy can die holding several connections of one client that newer ones replaced, none
/// of which learnt it (each takeover notice unread): every one of them owes its will, not only
/// the latest. A connection that ended with a normal DISCONNECT owes none [MQTT-3.1.2-10], even
/// when a newer connection had replaced it before its proxy released it (the soak found that
/// will published when the proxy died later).
#[tokio::test]
async fn a_dead_proxy_owes_every_replaced_connections_will_and_no_discarded_one() {
    let redis = RedisServer::start();
    let r = redis_store(&redis.url()).await;
    let first = r.claim("dev", "proxy-a").await.unwrap();
    r.set_will("dev", first.epoch, Some(&will("first", 0))).await.unwrap();
    r.claim("dev", "proxy-b").await.unwrap();
    let third = r.claim("dev", "proxy-a").await.unwrap();
    r.set_will("dev", third.epoch, Some(&will("third", 0))).await.unwrap();
    let fourth = r.claim("dev", "proxy-b").await.unwrap();
    let o = r.orphan("dev", "proxy-a", "proxy-b").await.unwrap().expect("proxy-a's replaced connections owe wills");
    assert!(!o.went_offline, "the session is proxy-b's");
    let mut owed: Vec<_> = o.owed.iter().map(|w| w.will.message.clone()).collect();
    owed.sort();
    assert_eq!(owed, [b"first".to_vec(), b"third".to_vec()], "both, once");
    assert_eq!(r.orphan("dev", "proxy-a", "proxy-b").await.unwrap(), None, "settled once");
    assert_eq!(r.owner("dev").await.unwrap(), (Some("proxy-b".into()), fourth.epoch));

    // Replaced while its DISCONNECT was being handled: the release records the discarded will.
    let polite = r.claim("polite", "proxy-a").await.unwrap();
    r.set_will("polite", polite.epoch, Some(&will("never", 0))).await.unwrap();
    r.claim("polite", "proxy-b").await.unwrap();
    assert!(!r.release("polite", "proxy-a", polite.epoch, true).await.unwrap(), "proxy-b owns it now");
    assert_eq!(r.orphan("polite", "proxy-a", "proxy-b").await.unwrap(), None, "a discarded will is not owed");
    assert!(!r.withdraw_will("polite", polite.epoch, "proxy-a", &will("never", 0)).await.unwrap(), "nor publishable later");

    // Still the owner: a persistent session keeps no will to fire after a normal DISCONNECT.
    let s = Store::Redis(r.clone());
    let kept = r.claim("kept", "proxy-a").await.unwrap();
    s.write(vec![Op::PutSession(record("kept", kept.epoch, true, 600))]).await.unwrap();
    r.set_will("kept", kept.epoch, Some(&will("delayed", 30))).await.unwrap();
    assert!(r.release("kept", "proxy-a", kept.epoch, true).await.unwrap());
    r.schedule_will("kept", 1).await.unwrap();
    assert_eq!(r.take_will("kept", "proxy-b").await.unwrap(), None, "the will went with the DISCONNECT");
}

/// What a shard asks before it routes a will it logged (see `Op::AcceptWill`).
async fn accept(r: &RedisStore, client_id: &str, epoch: u64, proxy: &str, acceptance: &str) -> bool {
    let ask = Op::AcceptWill { client_id: client_id.into(), epoch, proxy: proxy.into(), acceptance: acceptance.into() };
    match Store::Redis(r.clone()).write(vec![ask]).await.unwrap().as_slice() {
        [OpResult::WillAccepted(yes)] => *yes,
        other => panic!("unexpected reply {other:?}"),
    }
}

/// The long soak lost wills of connections that ended just before their proxy was killed: the
/// proxy had taken the will in Redis and died before a shard had it. A taken will is now the
/// proxy's intent until a shard accepts it; a settlement hands unaccepted intents to the
/// settling proxy, and the shard's acceptance lets exactly one copy through, whoever sends it
/// how often — the dead proxy's late copy (it was only paused), the settler's, a resend, or the
/// shard's own replay after a crash (MQTT-3.1.2-8: the will is published; each once).
#[tokio::test]
async fn a_will_its_proxy_died_publishing_is_published_by_the_settler_exactly_once() {
    let redis = RedisServer::start();
    let r = redis_store(&redis.url()).await;
    let c = r.claim("dev", "proxy-a").await.unwrap();
    r.set_will("dev", c.epoch, Some(&will("gone", 0))).await.unwrap();
    // The connection ends (no DISCONNECT): proxy-a takes the will and releases the id...
    r.owe_wills("proxy-a", "dev").await.unwrap();
    assert!(r.withdraw_will("dev", c.epoch, "proxy-a", &will("gone", 0)).await.unwrap());
    assert!(r.release("dev", "proxy-a", c.epoch, false).await.unwrap());
    // ...and dies before any shard accepted the will: its claims no longer list the client,
    // its intents do.
    assert!(r.claimed_by("proxy-a").await.unwrap().is_empty());
    assert_eq!(r.wills_owed_by("proxy-a").await.unwrap(), ["dev"]);
    let o = r.orphan("dev", "proxy-a", "proxy-b").await.unwrap().expect("the will is owed");
    assert_eq!(o, Orphaned { went_offline: false, delayed_will: None, owed: vec![OwedWill { epoch: c.epoch, will: will("gone", 0) }] });
    assert_eq!(r.orphan("dev", "proxy-a", "proxy-b").await.unwrap(), None, "handed out once");

    assert!(!accept(&r, "dev", c.epoch, "proxy-a", "shard-1@5").await, "proxy-a's late copy (it was only paused) is not published");
    assert!(accept(&r, "dev", c.epoch, "proxy-b", "shard-1@6").await, "the settler's copy is");
    assert!(accept(&r, "dev", c.epoch, "proxy-b", "shard-1@6").await, "and is again when the shard replays that entry");
    assert!(!accept(&r, "dev", c.epoch, "proxy-b", "shard-2@1").await, "a second copy (a resend after a lost reply) is not");
    // proxy-b dies in turn: nothing left to settle, the will is out.
    assert_eq!(r.orphan("dev", "proxy-b", "proxy-c").await.unwrap(), None);

    // Accepted before its proxy died: nothing owed.
    let c2 = r.claim("dev", "proxy-a").await.unwrap();
    r.owe_wills("proxy-a", "dev").await.unwrap();
    assert!(r.withdraw_will("dev", c2.epoch, "proxy-a", &will("again", 0)).await.unwrap());
    assert!(accept(&r, "dev", c2.epoch, "proxy-a", "shard-1@7").await);
    assert!(r.release("dev", "proxy-a", c2.epoch, false).await.unwrap());
    assert_eq!(r.orphan("dev", "proxy-a", "proxy-b").await.unwrap(), None);
    // A will nobody recorded (published while Redis did not answer) goes out, once.
    assert!(accept(&r, "dev", 42, "proxy-a", "shard-1@8").await);
    assert!(!accept(&r, "dev", 42, "proxy-a", "shard-1@9").await);

    // A settler that dies with the will it took is settled in turn: the will moves on again.
    let c3 = r.claim("dev", "proxy-a").await.unwrap();
    r.set_will("dev", c3.epoch, Some(&will("third", 0))).await.unwrap();
    r.owe_wills("proxy-b", "dev").await.unwrap();
    let o = r.orphan("dev", "proxy-a", "proxy-b").await.unwrap().expect("the session's will is due");
    assert_eq!(o.owed, [OwedWill { epoch: c3.epoch, will: will("third", 0) }]);
    assert_eq!(r.wills_owed_by("proxy-b").await.unwrap(), ["dev"]);
    let o = r.orphan("dev", "proxy-b", "proxy-c").await.unwrap().expect("proxy-b died publishing it");
    assert_eq!(o.owed, [OwedWill { epoch: c3.epoch, will: will("third", 0) }]);
    assert!(accept(&r, "dev", c3.epoch, "proxy-c", "shard-1@10").await);
    r.forget_proxy("proxy-b").await.unwrap();
    assert!(r.wills_owed_by("proxy-b").await.unwrap().is_empty());
}

#[tokio::test]
async fn dead_proxies_are_reaped_once_and_their_wills_fire_once_standalone() {
    let redis = RedisServer::start();
    a_dead_proxys_sessions_are_settled_once(redis_store(&redis.url()).await).await;
}

#[tokio::test]
async fn dead_proxies_are_reaped_once_and_their_wills_fire_once_on_a_cluster() {
    let cluster = RedisCluster::start();
    a_dead_proxys_sessions_are_settled_once(redis_store(&cluster.url()).await).await;
}

#[tokio::test]
async fn a_reconnect_cancels_a_pending_will_and_fences_the_old_connection() {
    let redis = RedisServer::start();
    let r = redis_store(&redis.url()).await;
    let s = Store::Redis(r.clone());
    let first = r.claim("c", "proxy-a").await.unwrap();
    s.write(vec![Op::PutSession(record("c", first.epoch, false, 600))]).await.unwrap();
    r.set_will("c", first.epoch, Some(&will("w", 10))).await.unwrap();
    r.release("c", "proxy-a", first.epoch, false).await.unwrap();
    r.schedule_will("c", 1).await.unwrap();

    let second = r.claim("c", "proxy-b").await.unwrap();
    assert_eq!(r.take_will("c", "proxy-b").await.unwrap(), None, "the client is back: no will");
    assert!(!r.set_will("c", first.epoch, Some(&will("stale", 0))).await.unwrap(), "an older connection cannot set a will");
    // Nor end the session: the stale connection's removal is refused, the new one's works and
    // keeps its claim.
    s.write(vec![Op::RemoveSession { client_id: "c".into(), epoch: Some(first.epoch) }]).await.unwrap();
    assert!(s.load_session("c").await.unwrap().is_some());
    s.write(vec![Op::RemoveSession { client_id: "c".into(), epoch: Some(second.epoch) }]).await.unwrap();
    assert!(s.load_session("c").await.unwrap().is_none());
    assert_eq!(r.owner("c").await.unwrap(), (Some("proxy-b".into()), second.epoch));
}

#[tokio::test]
async fn takeover_notices_reach_the_proxy_that_lost_the_client() {
    let redis = RedisServer::start();
    let r = redis_store(&redis.url()).await;
    let mut inbox = r.inbox("proxy-a", Duration::from_secs(2)).await.unwrap();
    assert_eq!(inbox.next().await.unwrap(), None, "nothing yet (waits at most a second)");
    r.notify_takeover("proxy-a", "line\nbreak id", 7).await.unwrap();
    assert_eq!(inbox.next().await.unwrap(), Some(Notice::Takeover(Takeover { client_id: "line\nbreak id".into(), epoch: 7 })));
    r.notify_kick("proxy-a", "dev\n1", true).await.unwrap();
    r.notify_kick("proxy-a", "dev-2", false).await.unwrap();
    assert_eq!(inbox.next().await.unwrap(), Some(Notice::Kick { client_id: "dev\n1".into(), discard_session: true }));
    assert_eq!(inbox.next().await.unwrap(), Some(Notice::Kick { client_id: "dev-2".into(), discard_session: false }));
}

#[tokio::test]
async fn shards_register_with_their_link_address() {
    let redis = RedisServer::start();
    let r = redis_store(&redis.url()).await;
    r.shard_beat("shard-b", "10.0.0.2:7883").await.unwrap();
    r.shard_beat("shard-a", "10.0.0.1:7883").await.unwrap();
    assert_eq!(
        r.live_shards(Duration::from_secs(10)).await.unwrap(),
        [("shard-a".to_string(), "10.0.0.1:7883".to_string()), ("shard-b".to_string(), "10.0.0.2:7883".to_string())]
    );
    r.shard_leave("shard-a").await.unwrap();
    assert_eq!(r.live_shards(Duration::from_secs(10)).await.unwrap().len(), 1);
}

#[tokio::test]
async fn ring_changes_are_proposed_once_and_committed_by_epoch() {
    let redis = RedisServer::start();
    let r = redis_store(&redis.url()).await;
    assert_eq!(r.ring().await.unwrap(), RingState::default());
    let e = r.propose_ring(0, &["shard-b".into(), "shard-a".into()]).await.unwrap();
    assert_eq!(e, Some(1));
    assert_eq!(r.propose_ring(0, &["shard-c".into()]).await.unwrap(), None, "one change at a time");
    let state = r.ring().await.unwrap();
    assert_eq!(state.next.as_ref().map(|n| (n.epoch, n.members.clone())), Some((1, vec!["shard-a".to_string(), "shard-b".to_string()])));
    r.ring_ready(1, "shard:shard-a").await.unwrap();
    r.ring_ready(1, "proxy:p").await.unwrap();
    let mut ready = r.ring_ready_set(1).await.unwrap();
    ready.sort();
    assert_eq!(ready, ["proxy:p", "shard:shard-a"]);
    assert!(!r.end_ring_change(2, true).await.unwrap(), "not the change under way");
    assert!(r.end_ring_change(1, true).await.unwrap());
    let state = r.ring().await.unwrap();
    assert_eq!((state.epoch, state.members.clone(), state.next), (1, vec!["shard-a".to_string(), "shard-b".to_string()], None));
    assert_eq!(r.propose_ring(0, &["x".into()]).await.unwrap(), None, "proposals must start from the current epoch");
    let e = r.propose_ring(1, &["x".into()]).await.unwrap().unwrap();
    assert!(r.end_ring_change(e, false).await.unwrap(), "aborted");
    assert_eq!(r.ring().await.unwrap().members, ["shard-a", "shard-b"]);
}
