//! The admin API (docs/ADMIN.md) of a single-node broker, end to end over HTTP with real MQTT
//! clients (rumqttc, mosquitto_sub/pub) on the other side: its token, clients, kick,
//! subscriptions, publish, cluster view, drain; and the `$SYS` topics.

mod support;

use std::io::Read;
use std::time::Duration;

use mqfleet_codec::{Connect, Packet, PacketId, Protocol, QoS, ReasonCode, Subscribe, SubscriptionOptions};
use serde_json::{json, Value};
use support::*;

async fn broker_with_api() -> (TestBroker, String) {
    let dir = tempfile::tempdir().unwrap();
    let (path, token) = admin_token(dir.path());
    let b = TestBroker::in_dir(dir, |c| c.admin_token_file = path).await;
    (b, token)
}

async fn get(b: &TestBroker, token: &str, path: &str) -> (u16, Value) {
    api(b.http.unwrap(), "GET", path, Some(token), None).await
}

fn ids(page: &Value) -> Vec<&str> {
    page["clients"].as_array().unwrap().iter().map(|c| c["client_id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn the_api_is_off_without_a_token_file_and_refuses_wrong_tokens() {
    let b = TestBroker::start().await;
    let (status, body) = api(b.http.unwrap(), "GET", "/api/v1/clients", None, None).await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("admin_token_file"), "{body}");

    let (b, token) = broker_with_api().await;
    let http = b.http.unwrap();
    for presented in [None, Some("wrong"), Some(&token[..token.len() - 1])] {
        let (status, body) = api(http, "GET", "/api/v1/clients", presented, None).await;
        assert_eq!(status, 401, "{presented:?}");
        assert!(body["error"].is_string());
    }
    assert_eq!(api(http, "GET", "/api/v1/clients", Some(&token), None).await.0, 200);
    // Health and metrics stay open to probes and scrapers.
    assert_eq!(b.http_get("/readyz").await.0, 200);
    assert_eq!(api(http, "GET", "/api/v1/nowhere", Some(&token), None).await.0, 404);

    // A token too short to be safe is a configuration error naming the file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t"), "secret").unwrap();
    let mut c = config();
    c.admin_token_file = dir.path().join("t").display().to_string();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("admin_token_file") && err.contains("at least 32"), "{err}");
}

#[tokio::test]
async fn clients_are_listed_searched_paged_inspected_and_kicked() {
    let (b, token) = broker_with_api().await;
    let mut persistent = Connect::new(Protocol::V5, "dev-1");
    persistent.clean_start = false;
    persistent.properties.session_expiry_interval = Some(300);
    let (mut dev1, _) = Raw::session(b.addr, persistent).await;
    subscribe_qos1(&mut dev1, "a/+").await;
    let mut dev2 = v4::connect(v4::options(b.addr, "dev-2")).await;
    let mut other = mosquitto_sub(b.addr, &["-i", "other-3", "-V", "mqttv311", "-t", "x/#", "-q", "1"]);
    eventually_api(&b, &token, "/api/v1/clients", |v| v["total"] == 3).await;

    let (_, page) = get(&b, &token, "/api/v1/clients?match=dev-").await;
    assert_eq!(ids(&page), ["dev-1", "dev-2"]);
    assert_eq!(page["clients"][0]["protocol"], "5.0");
    assert_eq!(page["clients"][1]["protocol"], "3.1.1");
    assert_eq!(page["clients"][0]["listener"], "mqtt");
    assert_eq!(page["clients"][0]["clean_start"], false);
    assert_eq!(page["clients"][0]["session_expiry"], 300);
    // Pages follow the cursor.
    let (_, first) = get(&b, &token, "/api/v1/clients?limit=2").await;
    assert_eq!(ids(&first), ["dev-1", "dev-2"]);
    assert_eq!(first["next"], "dev-2");
    let (_, second) = get(&b, &token, "/api/v1/clients?limit=2&after=dev-2").await;
    assert_eq!(ids(&second), ["other-3"]);
    assert!(second["next"].is_null());
    for bad in ["/api/v1/clients?limit=0", "/api/v1/clients?limit=x", "/api/v1/clients?colour=red"] {
        let (status, body) = get(&b, &token, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    let (status, d) = get(&b, &token, "/api/v1/clients/dev-1").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["connection"]["client_id"], "dev-1");
    assert_eq!(d["live"]["subscriptions"][0]["filter"], "a/+");
    assert_eq!(d["live"]["subscriptions"][0]["qos"], 1);
    assert_eq!(d["session"]["expiry_interval"], 300);
    assert_eq!(d["session"]["connected"], true);
    let (status, d) = get(&b, &token, "/api/v1/clients/nobody").await;
    assert_eq!(status, 404, "{d}");

    let (_, subs) = get(&b, &token, "/api/v1/subscriptions").await;
    let all: Vec<(&str, &str)> = subs["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["client_id"].as_str().unwrap(), s["filter"].as_str().unwrap()))
        .collect();
    assert_eq!(all, [("dev-1", "a/+"), ("other-3", "x/#")]);
    let (_, subs) = get(&b, &token, "/api/v1/subscriptions?filter=x/%23").await;
    assert_eq!(subs["subscriptions"].as_array().unwrap().len(), 1);
    let (_, subs) = get(&b, &token, "/api/v1/subscriptions?limit=1").await;
    assert_eq!(subs["truncated"], true);

    // Kick a 3.1.1 client: the connection closes (3.1.1 has no server DISCONNECT).
    let (status, k) = api(b.http.unwrap(), "DELETE", "/api/v1/clients/dev-2", Some(&token), None).await;
    assert_eq!((status, k["outcome"].as_str()), (200, Some("disconnected")));
    assert!(tokio::time::timeout(PATIENCE, async { while dev2.events.recv().await.is_some() {} }).await.is_ok(), "dev-2 closed");
    // A kick is not a ban: mosquitto_sub reconnects on its own, as a new connection.
    let (_, before) = get(&b, &token, "/api/v1/clients/other-3").await;
    api(b.http.unwrap(), "DELETE", "/api/v1/clients/other-3", Some(&token), None).await;
    let since = before["connection"]["connected_at_ms"].as_u64().unwrap();
    eventually_api(&b, &token, "/api/v1/clients/other-3", |v| v["connection"]["connected_at_ms"].as_u64().is_some_and(|t| t > since)).await;
    other.kill().unwrap();
    other.wait().unwrap();
    eventually_api(&b, &token, "/api/v1/clients", |v| v["total"] == 1).await;

    // Kick a 5.0 client keeping its session: DISCONNECT 0x98, the session stays offline.
    let (status, _) = api(b.http.unwrap(), "DELETE", "/api/v1/clients/dev-1", Some(&token), None).await;
    assert_eq!(status, 200);
    match dev1.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::AdministrativeAction),
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    let (_, page) = get(&b, &token, "/api/v1/clients").await;
    assert_eq!(page["total"], 0);
    // A message for it while offline waits in its stored queue.
    let (status, r) =
        api(b.http.unwrap(), "POST", "/api/v1/publish", Some(&token), Some(r#"{"topic":"a/b","payload":"queued","qos":1}"#)).await;
    assert_eq!(status, 200, "{r}");
    let (_, d) = get(&b, &token, "/api/v1/clients/dev-1").await;
    assert!(d["connection"].is_null());
    assert_eq!(d["session"]["connected"], false);
    assert_eq!(d["session"]["queued_messages"], 1);
    assert_eq!(d["session"]["subscriptions"][0]["filter"], "a/+");

    // Discarding the offline session ends it.
    let (status, k) = api(b.http.unwrap(), "DELETE", "/api/v1/clients/dev-1?discard_session=true", Some(&token), None).await;
    assert_eq!((status, k["outcome"].as_str()), (200, Some("session_discarded")));
    eventually_api(&b, &token, "/api/v1/clients/dev-1", |v| v["error"].is_string()).await;
    let (status, _) = api(b.http.unwrap(), "DELETE", "/api/v1/clients/dev-1", Some(&token), None).await;
    assert_eq!(status, 404);
}

async fn subscribe(c: &mut Raw, filters: &[&str]) {
    let items = filters.iter().map(|f| ((*f).into(), SubscriptionOptions::default())).collect();
    c.send(Packet::Subscribe(Subscribe::new(PacketId::new(1).unwrap(), items))).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
}

async fn subscribe_qos1(c: &mut Raw, filter: &str) {
    let opts = SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() };
    c.send(Packet::Subscribe(Subscribe::new(PacketId::new(1).unwrap(), vec![(filter.into(), opts)]))).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
}

/// Polls an API path until `ok` holds for its body.
async fn eventually_api(b: &TestBroker, token: &str, path: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, v) = get(b, token, path).await;
        if ok(&v) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{path} never satisfied the test: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn kicking_with_discard_ends_the_session_and_publishes_a_delayed_will_at_once() {
    let (b, token) = broker_with_api().await;
    let mut watcher = v5::connect(v5::options(b.addr, "watcher")).await;
    watcher.subscribe("wills/#", v5::QoS::AtLeastOnce).await;

    // Connected: kicked with discard, its will (delayed an hour) goes out now [MQTT-3.1.2-8].
    let (mut c, ack) = Raw::session(b.addr, with_will(Protocol::V5, "w-1", Some(3600), Some(3600))).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    let (status, _) = api(b.http.unwrap(), "DELETE", "/api/v1/clients/w-1?discard_session=true", Some(&token), None).await;
    assert_eq!(status, 200);
    match c.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::AdministrativeAction),
        other => panic!("expected DISCONNECT 0x98, got {other:?}"),
    }
    assert_eq!(&watcher.next_publish().await.payload[..], b"w-1 is gone");
    let (status, _) = get(&b, &token, "/api/v1/clients/w-1").await;
    assert_eq!(status, 404, "no session left");

    // Offline with a pending will: discarding the session publishes it (the session ends
    // before the delay) [MQTT-3.1.3-9 is about reconnects; MQTT 5 §3.1.2.5: whichever first].
    let (c, _) = Raw::session(b.addr, with_will(Protocol::V5, "w-2", Some(3600), Some(3600))).await;
    drop(c);
    eventually_api(&b, &token, "/api/v1/clients/w-2", |v| v["session"]["connected"] == false).await;
    watcher.expect_no_publish().await;
    let (status, k) = api(b.http.unwrap(), "DELETE", "/api/v1/clients/w-2?discard_session=true", Some(&token), None).await;
    assert_eq!((status, k["outcome"].as_str()), (200, Some("session_discarded")));
    assert_eq!(&watcher.next_publish().await.payload[..], b"w-2 is gone");
    eventually_api(&b, &token, "/api/v1/clients/w-2", |v| v["error"].is_string()).await;
}

#[tokio::test]
async fn messages_published_through_the_api_reach_subscribers_with_their_properties() {
    let (b, token) = broker_with_api().await;
    let http = b.http.unwrap();
    let mut sub = mosquitto_sub(b.addr, &["-t", "api/#", "-v", "-C", "2", "-q", "1"]);
    let mut v5sub = v5::connect(v5::options(b.addr, "v5sub")).await;
    v5sub.subscribe("api/#", v5::QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // mosquitto_sub subscribed

    let (status, r) = api(http, "POST", "/api/v1/publish", Some(&token), Some(r#"{"topic":"api/plain","payload":"hello"}"#)).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["durable"], false);
    let body = json!({
        "topic": "api/bin", "payload": "AAEC/w==", "payload_encoding": "base64", "qos": 2, "retain": true,
        "content_type": "application/octet-stream", "user_properties": [["origin", "ops"]],
        "response_topic": "api/replies", "correlation_data": "Y29ycg==", "message_expiry_interval": 600
    });
    let (status, r) = api(http, "POST", "/api/v1/publish", Some(&token), Some(&body.to_string())).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["durable"], true);

    let p = v5sub.next_publish().await;
    assert_eq!(&p.payload[..], b"hello");
    let p = v5sub.next_publish().await;
    assert_eq!(&p.payload[..], [0, 1, 2, 255]);
    assert_eq!(p.qos, v5::QoS::AtLeastOnce, "granted QoS 1");
    let props = p.properties.unwrap();
    assert_eq!(props.content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(props.user_properties, [("origin".to_string(), "ops".to_string())]);
    assert_eq!(props.response_topic.as_deref(), Some("api/replies"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"corr"[..]));
    assert!(props.message_expiry_interval.is_some_and(|s| s <= 600 && s > 590));
    let out = tokio::task::spawn_blocking(move || {
        let mut s = Vec::new();
        sub.stdout.take().unwrap().read_to_end(&mut s).unwrap();
        sub.wait().unwrap();
        s
    })
    .await
    .unwrap();
    assert!(out.starts_with(b"api/plain hello\napi/bin \x00\x01\x02\xff"), "{:?}", String::from_utf8_lossy(&out));
    // Retained: a late subscriber gets it.
    let mut late = v5::connect(v5::options(b.addr, "late")).await;
    late.subscribe("api/bin", v5::QoS::AtLeastOnce).await;
    assert_eq!(&late.next_publish().await.payload[..], [0, 1, 2, 255]);

    for (bad, says) in [
        (r#"{"topic":"api/+","payload":"x"}"#, "topic"),
        (r#"{"topic":"","payload":"x"}"#, "topic"),
        (r#"{"topic":"api/x","qos":3}"#, "qos"),
        (r#"{"topic":"api/x","payload":"***","payload_encoding":"base64"}"#, "base64"),
        (r#"{"topic":"api/x","payload_format_utf8":true,"payload":"/w==","payload_encoding":"base64"}"#, "UTF-8"),
        (r#"{"topic":"api/x","colour":"red"}"#, "colour"),
        (r#"{"topic":"#, "EOF"),
        ("", "Content-Type"),
    ] {
        let (status, r) = api(http, "POST", "/api/v1/publish", Some(&token), Some(bad)).await;
        assert!((400..500).contains(&status), "{bad}: {status} {r}");
        let error = r["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{bad}: {error}");
    }
    v5sub.expect_no_publish().await;
}

#[tokio::test]
async fn the_cluster_view_shows_the_shards_and_a_drain_refuses_then_readmits_clients() {
    let (b, token) = broker_with_api().await;
    let mut s = Raw::v5(b.addr, "s").await;
    subscribe(&mut s, &["t/1", "t/2"]).await;
    let (status, v) = get(&b, &token, "/api/v1/cluster").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["mode"], "single_node");
    assert_eq!(v["proxy"]["connections"], 1);
    assert_eq!(v["ring"]["members"], json!(["shard-0", "shard-1"]));
    let shards = v["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    let subscriptions: u64 = shards.iter().map(|s| s["stats"]["subscriptions"].as_u64().unwrap()).sum();
    assert_eq!(subscriptions, 2, "{v}");

    let (status, d) = api(b.http.unwrap(), "POST", "/api/v1/drain", Some(&token), None).await;
    assert_eq!((status, d["draining"].as_bool()), (202, Some(true)));
    // The connected client is moved off (0x9C), newcomers are refused the same way.
    match s.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::UseAnotherServer),
        other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
    }
    let (_, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "newcomer")).await;
    assert_eq!(ack.reason, ReasonCode::UseAnotherServer);
    assert_eq!(b.http_get("/readyz").await.0, 503);
    eventually_api(&b, &token, "/api/v1/drain", |v| v["connections"] == 0).await;

    let (status, d) = api(b.http.unwrap(), "DELETE", "/api/v1/drain", Some(&token), None).await;
    assert_eq!((status, d["draining"].as_bool()), (200, Some(false)));
    assert_eq!(b.http_get("/readyz").await.0, 200);
    let (_, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "newcomer")).await;
    assert_eq!(ack.reason, ReasonCode::Success);
}

#[tokio::test]
async fn metrics_cover_latency_inflight_subscriptions_and_the_store() {
    let b = TestBroker::start().await;
    let mut o = v5::options(b.addr, "sub");
    // A persistent session: its state goes through the store.
    o.set_clean_start(false);
    let mut props = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
    props.session_expiry_interval = Some(60);
    o.set_connect_properties(props);
    let mut sub = v5::connect(o).await;
    sub.subscribe("m/#", v5::QoS::AtLeastOnce).await;
    let mut p = Raw::v5(b.addr, "pub").await;
    for i in 1..=5 {
        assert_eq!(p.publish_qos1(i, "m/x").await, ReasonCode::Success);
    }
    for _ in 0..5 {
        sub.next_publish().await;
    }
    assert_eq!(metric(&b, "mqfleet_proxy_subscriptions ").await, 1);
    // Socket bytes count while connections are open, not only when they end.
    eventually_metric(&b, "mqfleet_proxy_received_bytes_total ", |v| v > 5 * 3).await;
    eventually_metric(&b, "mqfleet_proxy_sent_bytes_total ", |v| v > 5 * 3).await;
    assert_eq!(metric(&b, "mqfleet_proxy_publish_seconds_count{qos=\"1\"} ").await, 5);
    assert!(metric(&b, "mqfleet_shard_commit_seconds_count ").await >= 1, "the store's commits are timed");
    eventually_metric(&b, "mqfleet_proxy_link_request_seconds_count{shard=\"shard-", |v| v >= 5).await;
    assert!(b.http_get("/metrics").await.1.contains("mqfleet_proxy_link_awaiting_reply{shard=\"shard-0\"} 0"));
    sub.client.disconnect().await.unwrap();
    eventually_metric(&b, "mqfleet_proxy_subscriptions ", |v| v == 0).await;
    assert_eq!(metric(&b, "mqfleet_proxy_inflight_messages ").await, 0);
    // Offline, its session queue fills in the store.
    for i in 6..=8 {
        assert_eq!(p.publish_qos1(i, "m/x").await, ReasonCode::Success);
    }
    eventually_metric(&b, "mqfleet_proxy_stored_queued_messages ", |v| v == 3).await;
}

/// Polls the sum of the samples starting with `prefix` until `ok`.
async fn eventually_metric(b: &TestBroker, prefix: &str, ok: impl Fn(u64) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = b.http_get("/metrics").await.1;
        let sum: u64 = text
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum();
        if ok(sum) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{prefix}: {sum}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sys_topics_reach_privileged_clients_only_and_never_match_plain_wildcards() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    add_user(&passwords, "ops", "ops-secret");
    add_user(&passwords, "device", "device-secret");
    let acl = dir.path().join("acl.toml");
    std::fs::write(
        &acl,
        r##"
[[rule]]
permission = "allow"
action = "subscribe"
username = "ops"
topics = ["$SYS/#"]

[[rule]]
permission = "allow"
action = "all"
topics = ["#"]
"##,
    )
    .unwrap();
    let b = TestBroker::with(|c| {
        c.password_file = passwords.display().to_string();
        c.acl_file = acl.display().to_string();
        c.sys_interval_ms = 200;
    })
    .await;

    let mut o = v5::options(b.addr, "ops-console");
    o.set_credentials("ops", "ops-secret");
    let mut ops = v5::connect(o).await;
    ops.subscribe("$SYS/broker/clients/connected", v5::QoS::AtMostOnce).await;
    // The retained figure comes first (perhaps from before this client connected), then one
    // per interval that counts it.
    loop {
        let p = ops.next_publish().await;
        assert_eq!(&p.topic[..], b"$SYS/broker/clients/connected");
        let connected: u32 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
        if connected >= 1 {
            break;
        }
    }

    // A device may not read them, even with an explicit filter: SUBACK 0x87.
    let (mut dev, _) = Raw::session(b.addr, login(Protocol::V5, "dev", Some("device"), Some("device-secret"))).await;
    dev.send(Packet::Subscribe(Subscribe::new(
        PacketId::new(1).unwrap(),
        vec![("$SYS/#".into(), Default::default()), ("#".into(), Default::default())],
    )))
    .await;
    match dev.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(a.reasons, [ReasonCode::NotAuthorized, ReasonCode::Success]),
        other => panic!("{other:?}"),
    }
    // `#` never matches `$SYS/…` [MQTT-4.7.2-1]: several intervals pass without one.
    let quiet = tokio::time::timeout(Duration::from_millis(800), dev.recv()).await;
    assert!(quiet.is_err(), "a $SYS message reached a `#` subscriber: {quiet:?}");
    assert!(metric(&b, "mqfleet_proxy_sys_messages_published_total ").await >= 9);

    // mosquitto_sub as ops reads the tree too.
    let mut m = mosquitto_sub(b.addr, &["-u", "ops", "-P", "ops-secret", "-t", "$SYS/broker/version", "-C", "1"]);
    let out = tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        m.stdout.take().unwrap().read_to_string(&mut s).unwrap();
        m.wait().unwrap();
        s
    })
    .await
    .unwrap();
    assert!(out.starts_with("mqfleet "), "{out:?}");
}
