//! Admission shared by a fleet of proxies through Redis: users set with
//! `mqfleet-proxy passwd redis://…`, the ACL stored with `mqfleet-proxy acl redis://…`, and a
//! fleet-wide publish rate a device cannot escape by reconnecting elsewhere. Real redis-server
//! (standalone and a 3-master Cluster), real shard and proxy processes.

mod support;

use mqfleet_codec::{Packet, PacketId, Protocol, QoS, ReasonCode, Subscribe, SubscriptionOptions};
use support::{login, proxy_tool, Raw};
use testkit::local_cluster::{LocalCluster, RedisKind};

/// A sample (`name{labels}`) of a proxy's metrics; 0 if absent.
async fn metric(c: &LocalCluster, proxy: usize, sample: &str) -> u64 {
    support::sample_in(&c.proxies[proxy].service.http_get("/metrics").unwrap_or_default(), sample)
}

async fn users_acl_and_rates_are_shared_by_every_proxy(kind: RedisKind) {
    let c = tokio::task::spawn_blocking(move || {
        let mut c = LocalCluster::start(kind, 1, 0);
        for _ in 0..2 {
            c.add_proxy(&["--auth-redis", "true", "--fleet-publish-rate", "10"]);
        }
        c
    })
    .await
    .unwrap();
    let url = c.redis.url();

    // A user set once in Redis gets in through either proxy; a wrong password does not.
    let out = proxy_tool(&["passwd", &url, "alice"], "wonderland\n");
    assert!(out.status.success(), "{out:?}");
    for p in 0..2 {
        let (_c, ack) = Raw::session(c.proxy(p), login(Protocol::V5, &format!("alice-{p}"), Some("alice"), Some("wonderland"))).await;
        assert_eq!(ack.reason, ReasonCode::Success, "proxy {p}");
        let (_c, ack) = Raw::session(c.proxy(p), login(Protocol::V5, "x", Some("alice"), Some("wrong"))).await;
        assert_eq!(ack.reason, ReasonCode::BadUserNameOrPassword, "proxy {p}");
    }

    // The ACL, checked and stored by the CLI, reaches both proxies and revokes what it forbids.
    let mut reader = {
        let (mut r, ack) = Raw::session(c.proxy(1), login(Protocol::V5, "reader", Some("alice"), Some("wonderland"))).await;
        assert_eq!(ack.reason, ReasonCode::Success);
        let opts = SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() };
        r.send(Packet::Subscribe(Subscribe::new(PacketId::new(1).unwrap(), vec![("b/#".into(), opts)]))).await;
        assert!(matches!(r.recv().await, Some(Packet::SubAck(a)) if a.reasons == [ReasonCode::GrantedQoS1]));
        r
    };
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.toml");
    std::fs::write(&acl, "[[rule]]\npermission = \"allow\"\naction = \"all\"\nusername = \"alice\"\ntopics = [\"a/#\"]\n").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[rule]]\npermission = \"allow\"\n").unwrap();
    let out = proxy_tool(&["acl", &url, bad.to_str().unwrap()], "");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bad.toml"),
        "a bad ACL is refused before it is stored: {out:?}"
    );
    let out = proxy_tool(&["acl", &url, acl.to_str().unwrap()], "");
    assert!(out.status.success(), "{out:?}");
    let (mut writer, _) = Raw::session(c.proxy(0), login(Protocol::V5, "writer", Some("alice"), Some("wonderland"))).await;
    let mut applied = false;
    for i in 1..=100u16 {
        if writer.publish_qos1(i, "b/x").await == ReasonCode::NotAuthorized {
            applied = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(applied, "proxy 0 never applied the ACL from Redis");
    let mut revoked = false;
    for _ in 0..100 {
        if metric(&c, 1, "mqfleet_proxy_acl_denied_total{reason=\"revoked\"}").await == 1 {
            revoked = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(revoked, "proxy 1 never revoked the reader's b/# subscription");
    // Drain what the reader got before the revocation; nothing comes after it.
    while let Ok(Some(_)) = reader.recv_within(std::time::Duration::from_millis(300)).await {}

    // Fleet-wide rate, 10 per second: a device that spent its bucket on proxy 0 finds it
    // empty on proxy 1 — which a per-proxy limit would have started full.
    let (mut dev, _) = Raw::session(c.proxy(0), login(Protocol::V5, "dev", Some("alice"), Some("wonderland"))).await;
    for i in 1..=15 {
        assert_eq!(dev.publish_qos1(i, "a/t").await, ReasonCode::Success);
    }
    drop(dev);
    let before = metric(&c, 1, "mqfleet_proxy_limited_total{reason=\"fleet_publish_rate\"}").await;
    let (mut dev, _) = Raw::session(c.proxy(1), login(Protocol::V5, "dev", Some("alice"), Some("wonderland"))).await;
    for i in 1..=10 {
        assert_eq!(dev.publish_qos1(i, "a/t").await, ReasonCode::Success, "throttled, never refused");
    }
    let after = metric(&c, 1, "mqfleet_proxy_limited_total{reason=\"fleet_publish_rate\"}").await;
    assert!(after > before, "proxy 1 did not throttle a device whose fleet-wide bucket proxy 0 had emptied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_acl_and_rates_are_shared_by_every_proxy_on_standalone_redis() {
    users_acl_and_rates_are_shared_by_every_proxy(RedisKind::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_acl_and_rates_are_shared_by_every_proxy_on_a_redis_cluster() {
    users_acl_and_rates_are_shared_by_every_proxy(RedisKind::Cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_devices_share_one_fleet_wide_rate() {
    let c = tokio::task::spawn_blocking(|| {
        let mut c = LocalCluster::start(RedisKind::Standalone, 1, 0);
        for _ in 0..2 {
            c.add_proxy(&["--auth-redis", "true", "--fleet-tenant-publish-rate", "10"]);
        }
        c
    })
    .await
    .unwrap();
    assert!(proxy_tool(&["passwd", &c.redis.url(), "acme"], "s3cret\n").status.success());
    // Device 1 of tenant acme spends the tenant's bucket on proxy 0; device 2 — another
    // client id, another proxy, same tenant — finds it empty.
    let (mut d1, _) = Raw::session(c.proxy(0), login(Protocol::V5, "acme-1", Some("acme"), Some("s3cret"))).await;
    for i in 1..=15 {
        assert_eq!(d1.publish_qos1(i, "t").await, ReasonCode::Success);
    }
    let (mut d2, ack) = Raw::session(c.proxy(1), login(Protocol::V5, "acme-2", Some("acme"), Some("s3cret"))).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    for i in 1..=10 {
        assert_eq!(d2.publish_qos1(i, "t").await, ReasonCode::Success);
    }
    assert!(
        metric(&c, 1, "mqfleet_proxy_limited_total{reason=\"fleet_tenant_publish_rate\"}").await > 0,
        "the tenant's second device was not throttled"
    );
}
