//! The admin APIs of a cluster (real redis-server, shard and proxy processes): the cluster view,
//! a kick that crosses proxies, metrics of both tiers, and a shard drained through its API
//! handing its topics to the others before it is stopped.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use mqfleet_codec::{Connect, Packet, PacketId, Protocol, QoS, ReasonCode, Subscribe, SubscriptionOptions};
use serde_json::Value;
use support::*;
use testkit::local_cluster::{LocalCluster, RedisKind};

const RETAINED: usize = 60;

fn http(s: &testkit::service::Service) -> SocketAddr {
    s.addrs["HTTP"]
}

async fn retained_topics(addr: SocketAddr) -> BTreeSet<String> {
    let mut c = Raw::v5(addr, "counter").await;
    let opts = SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() };
    c.send(Packet::Subscribe(Subscribe::new(PacketId::new(1).unwrap(), vec![("r/#".into(), opts)]))).await;
    let mut topics = BTreeSet::new();
    while let Ok(Some(p)) = c.recv_within(Duration::from_secs(1)).await {
        if let Packet::Publish(p) = p {
            topics.insert(p.topic.to_string());
            if let Some(pkid) = p.pkid {
                c.send(Packet::PubAck(mqfleet_codec::Ack::new(pkid))).await;
            }
        }
    }
    topics
}

/// Polls `path` until `ok` holds.
async fn until(addr: SocketAddr, token: &str, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    loop {
        let (_, v) = api(addr, "GET", path, Some(token), None).await;
        if ok(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{path} never satisfied the test: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_the_cluster_kick_across_proxies_and_drain_a_shard_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let (token_file, token) = admin_token(dir.path());
    let tf = token_file.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        let mut c = LocalCluster::start_discovering(RedisKind::Standalone, 0, 0);
        for i in 0..3 {
            c.add_shard_with(&["--admin-token-file", &tf]);
            c.wait_for_ring(i + 1);
        }
        c.add_proxy(&["--admin-token-file", &tf]);
        c.add_proxy(&["--admin-token-file", &tf]);
        c
    })
    .await
    .unwrap();
    let (p0, p1) = (http(&cluster.proxies[0].service), cluster.proxy(1));

    // Retained messages spread over the shards, and a persistent subscriber on proxy 1.
    let mut publisher = Raw::v5(cluster.proxy(0), "publisher").await;
    for i in 0..RETAINED {
        let mut p = mqfleet_codec::Publish::new(format!("r/{i}"), QoS::AtLeastOnce, "kept", PacketId::new(i as u16 + 1));
        p.retain = true;
        publisher.send(Packet::Publish(p)).await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.reason == ReasonCode::Success));
    }
    let mut far = Connect::new(Protocol::V5, "far");
    far.clean_start = false;
    far.properties.session_expiry_interval = Some(600);
    let (mut far, _) = Raw::session(p1, far).await;
    far.send(Packet::Subscribe(Subscribe::new(PacketId::new(1).unwrap(), vec![("far/in".into(), SubscriptionOptions::default())]))).await;
    assert!(matches!(far.recv().await, Some(Packet::SubAck(_))));

    // The cluster as proxy 0 sees it.
    let v = until(p0, &token, "/api/v1/cluster", |v| v["proxies"].as_array().is_some_and(|p| p.len() == 2)).await;
    assert_eq!(v["mode"], "cluster");
    assert_eq!(v["proxy"]["id"], "proxy-0");
    assert_eq!(v["ring"]["members"].as_array().unwrap().len(), 3);
    let epoch = v["ring"]["epoch"].as_u64().unwrap();
    assert!(epoch >= 3, "three shards joined one by one: {v}");
    let shards = v["shards"].as_array().unwrap();
    let retained: u64 = shards.iter().map(|s| s["stats"]["retained_messages"].as_u64().unwrap()).sum();
    assert_eq!(retained, RETAINED as u64, "{v}");
    assert!(shards.iter().all(|s| s["stats"]["ring_epoch"] == epoch && s["error"].is_null()), "{v}");
    let subscriptions: u64 = shards.iter().map(|s| s["stats"]["subscriptions"].as_u64().unwrap()).sum();
    assert_eq!(subscriptions, 1, "{v}");

    // A client on proxy 1, found and kicked through proxy 0.
    let (status, d) = api(p0, "GET", "/api/v1/clients/far", Some(&token), None).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["proxy"], "proxy-1");
    assert!(d["connection"].is_null(), "not connected to proxy 0");
    assert_eq!(d["session"]["expiry_interval"], 600);
    let (status, k) = api(p0, "DELETE", "/api/v1/clients/far", Some(&token), None).await;
    assert_eq!(status, 202, "{k}");
    assert_eq!((k["outcome"].as_str(), k["proxy"].as_str()), (Some("requested"), Some("proxy-1")));
    match far.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::AdministrativeAction),
        other => panic!("expected DISCONNECT 0x98 from proxy 1, got {other:?}"),
    }

    // Metrics of both tiers, scraped from the processes.
    let proxy = &cluster.proxies[0].service;
    let shard = &cluster.shards[0].service;
    assert!(proxy.metric("mqfleet_proxy_redis_command_seconds_count").unwrap_or(0.0) > 0.0);
    assert!(proxy.metric("mqfleet_proxy_link_request_seconds_count").unwrap_or(0.0) > 0.0);
    assert!(proxy.metric("mqfleet_proxy_publish_seconds_count{qos=\"1\"}").unwrap_or(0.0) > 0.0, "the retained QoS 1 PUBLISHes were timed");
    assert_eq!(proxy.metric("mqfleet_proxy_ring_epoch"), Some(epoch as f64));
    assert_eq!(shard.metric("mqfleet_shard_ring_epoch"), Some(epoch as f64));
    assert!(shard.metric("mqfleet_shard_redis_command_seconds_count").unwrap_or(0.0) > 0.0);
    let commits: f64 = cluster.shards.iter().map(|s| s.service.metric("mqfleet_shard_commit_seconds_count").unwrap_or(0.0)).sum();
    assert!(commits >= 1.0, "commits of the shards' stores are timed");

    // Drain shard 2 through its API: it leaves the ring, the others take its topics.
    let s2 = http(&cluster.shards[2].service);
    let (status, s) = api(s2, "GET", "/api/v1/shard", Some(&token), None).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!((s["name"].as_str(), s["ring"]["member"].as_bool(), s["drain"].as_str()), (Some("shard-2"), Some(true), Some("serving")));
    assert_eq!(api(s2, "POST", "/api/v1/drain", None, None).await.0, 401);
    let (status, d) = api(s2, "POST", "/api/v1/drain", Some(&token), None).await;
    assert_eq!((status, d["state"].as_str()), (202, Some("leaving")));
    until(s2, &token, "/api/v1/drain", |v| v["state"] == "left").await;
    assert_eq!(cluster.redis.ring_members(), ["shard-0", "shard-1"]);
    let (_, s) = api(s2, "GET", "/api/v1/shard", Some(&token), None).await;
    assert_eq!(s["ring"]["member"], false);
    let v = until(p0, &token, "/api/v1/cluster", |v| v["shards"].as_array().is_some_and(|s| s.len() == 2)).await;
    let retained: u64 = v["shards"].as_array().unwrap().iter().map(|s| s["stats"]["retained_messages"].as_u64().unwrap()).sum();
    assert_eq!(retained, RETAINED as u64, "every retained message handed over: {v}");
    let expected: BTreeSet<String> = (0..RETAINED).map(|i| format!("r/{i}")).collect();
    assert_eq!(retained_topics(cluster.proxy(1)).await, expected);

    // Cancelled: the shard asks to be back in the ring.
    let (status, d) = api(s2, "DELETE", "/api/v1/drain", Some(&token), None).await;
    assert_eq!((status, d["state"].as_str()), (200, Some("serving")));
    let mut c = cluster;
    c = tokio::task::spawn_blocking(move || {
        c.wait_for_ring(3);
        c
    })
    .await
    .unwrap();
    assert_eq!(retained_topics(c.proxy(0)).await, expected);
}
