//! Authorization with an ACL file: placeholders, the reason codes of both versions, wills,
//! client ids that try to widen a pattern, and a reload that revokes live subscriptions.

mod support;

use mqfleet_codec::{Packet, PacketId, Protocol, QoS, ReasonCode, Subscribe, SubscriptionOptions};
use support::*;

const RULES: &str = r#"
[[rule]]
permission = "allow"
action = "all"
username = "ops"
topics = ["fleet/#"]

[[rule]]
permission = "deny"
action = "subscribe"
topics = ["fleet/secret/#"]

[[rule]]
permission = "allow"
action = "all"
topics = ["fleet/%u/#", "devices/%c/#"]

[[rule]]
permission = "allow"
action = "subscribe"
topics = ["fleet/+/status"]
"#;

/// Users alice, bob and ops (password "pw"), the rules above.
async fn broker(rules: &str) -> (TestBroker, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let passwd = files.path().join("passwd");
    for user in ["alice", "bob", "ops"] {
        add_user(&passwd, user, "pw");
    }
    let acl = files.path().join("acl.toml");
    std::fs::write(&acl, rules).unwrap();
    let (passwd, acl) = (passwd.display().to_string(), acl.display().to_string());
    let b = TestBroker::with(move |c| {
        c.password_file = passwd;
        c.acl_file = acl;
    })
    .await;
    (b, files)
}

async fn user(b: &TestBroker, protocol: Protocol, client_id: &str, name: &str) -> Raw {
    let (raw, ack) = Raw::session(b.addr, login(protocol, client_id, Some(name), Some("pw"))).await;
    assert_eq!(ack.reason, ReasonCode::Success);
    raw
}

async fn subscribe(c: &mut Raw, pkid: u16, filters: &[&str]) -> Vec<ReasonCode> {
    let opts = SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() };
    let filters = filters.iter().map(|f| ((*f).into(), opts)).collect();
    c.send(Packet::Subscribe(Subscribe::new(PacketId::new(pkid).unwrap(), filters))).await;
    match c.recv().await {
        Some(Packet::SubAck(a)) => a.reasons,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_with_placeholders_decide_subscribe_and_publish_with_the_codes_of_each_version() {
    let (b, _files) = broker(RULES).await;
    let mut alice = user(&b, Protocol::V5, "alice-phone", "alice").await;
    let got = subscribe(
        &mut alice,
        1,
        &["fleet/alice/#", "fleet/bob/#", "fleet/+/status", "fleet/#", "devices/alice-phone/cmd", "fleet/secret/x"],
    )
    .await;
    use ReasonCode::{GrantedQoS1, NotAuthorized};
    // fleet/+/status is within an allow but could match fleet/secret/status, which the earlier
    // deny covers: a deny applies to any overlap. fleet/# is within no allow at all.
    assert_eq!(got, [GrantedQoS1, NotAuthorized, NotAuthorized, NotAuthorized, GrantedQoS1, NotAuthorized]);
    assert_eq!(subscribe(&mut alice, 9, &["fleet/bob/status"]).await, [GrantedQoS1], "within fleet/+/status, clear of the deny");
    assert_eq!(alice.publish_qos1(2, "fleet/alice/temp").await, ReasonCode::Success);
    assert_eq!(alice.publish_qos1(3, "fleet/bob/temp").await, NotAuthorized, "5.0: PUBACK 0x87");

    // 3.1.1: a refused subscription is 0x80 Failure; a refused publish is acknowledged (3.1.1
    // has no refusal) but not delivered, and counted.
    let mut bob = user(&b, Protocol::V3_1_1, "bob-1", "bob").await;
    assert_eq!(subscribe(&mut bob, 1, &["fleet/alice/#", "fleet/bob/#"]).await, [ReasonCode::UnspecifiedError, GrantedQoS1]);
    let mut ops = user(&b, Protocol::V5, "ops-1", "ops").await;
    assert_eq!(subscribe(&mut ops, 1, &["fleet/#"]).await, [GrantedQoS1], "ops sees the whole fleet");
    assert_eq!(bob.publish_qos1(2, "fleet/alice/temp").await, ReasonCode::Success);
    assert_eq!(alice.publish_qos1(4, "fleet/alice/hum").await, ReasonCode::Success);
    match ops.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&*p.topic, "fleet/alice/hum", "bob's refused publish was not delivered"),
        other => panic!("expected a PUBLISH, got {other:?}"),
    }
    assert_eq!(metric(&b, "mqfleet_proxy_acl_denied_total{reason=\"publish\"}").await, 2);
    assert_eq!(metric(&b, "mqfleet_proxy_acl_denied_total{reason=\"subscribe\"}").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_with_wildcards_or_slashes_never_widen_a_placeholder() {
    let (b, _files) = broker(RULES).await;
    for sneaky in ["+", "#", "alice-phone/x", "x/+"] {
        let mut c = user(&b, Protocol::V5, sneaky, "alice").await;
        assert_eq!(
            subscribe(&mut c, 1, &["devices/+/cmd", "devices/#", "devices/alice-phone/x/cmd"]).await,
            [ReasonCode::NotAuthorized; 3],
            "client id {sneaky:?}"
        );
        assert_eq!(c.publish_qos1(2, "devices/alice-phone/x/up").await, ReasonCode::NotAuthorized, "client id {sneaky:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_to_a_topic_the_client_may_not_publish_to_refuses_the_connect_bad_input_19() {
    let (b, _files) = broker(RULES).await;
    for (protocol, topic, expected) in [
        (Protocol::V5, "fleet/bob/last-words", ReasonCode::NotAuthorized),
        (Protocol::V3_1_1, "fleet/bob/last-words", ReasonCode::NotAuthorized),
        (Protocol::V5, "fleet/alice/last-words", ReasonCode::Success),
    ] {
        let mut c = login(protocol, "alice-will", Some("alice"), Some("pw"));
        c.will = Some(mqfleet_codec::Will {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        });
        let (_raw, ack) = Raw::session(b.addr, c).await;
        assert_eq!(ack.reason, expected, "{protocol:?} will to {topic}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_acl_revokes_live_subscriptions_and_a_broken_one_changes_nothing_bad_input_70_73() {
    let open_news = "[[rule]]\npermission = \"allow\"\naction = \"all\"\ntopics = [\"news/#\"]\n";
    let (b, files) = broker(open_news).await;
    let mut reader = user(&b, Protocol::V5, "reader", "bob").await;
    assert_eq!(subscribe(&mut reader, 1, &["news/#"]).await, [ReasonCode::GrantedQoS1]);
    // A persistent session, offline during the change, with a message waiting for it.
    let mut away = login(Protocol::V3_1_1, "away", Some("bob"), Some("pw"));
    away.clean_start = false;
    let (mut c, _) = Raw::session(b.addr, away.clone()).await;
    assert_eq!(subscribe(&mut c, 1, &["news/#"]).await, [ReasonCode::GrantedQoS1]);
    drop(c);
    let mut writer = user(&b, Protocol::V5, "writer", "alice").await;
    assert_eq!(writer.publish_qos1(1, "news/a").await, ReasonCode::Success);
    assert!(matches!(reader.recv().await, Some(Packet::Publish(p)) if &*p.topic == "news/a"));

    // A broken file: the reload fails and names it; the old rules stay in force.
    let acl = files.path().join("acl.toml");
    std::fs::write(&acl, "[[rule]]\npermission = \"allow\"\n").unwrap();
    let problems = b.reload();
    assert!(problems.iter().any(|p| p.contains("acl.toml")), "{problems:?}");
    assert_eq!(writer.publish_qos1(2, "news/b").await, ReasonCode::Success);
    assert!(matches!(reader.recv().await, Some(Packet::Publish(p)) if &*p.topic == "news/b"));

    // Readers lose news/#; writers keep publishing.
    std::fs::write(&acl, "[[rule]]\npermission = \"allow\"\naction = \"publish\"\ntopics = [\"news/#\"]\n").unwrap();
    assert_eq!(b.reload(), Vec::<String>::new());
    eventually("the subscription to be revoked", || {
        b.context().metrics.acl_denied.get_or_create(&proxy::metrics::ReasonLabel { reason: "revoked" }).get() == 1
    })
    .await;
    assert_eq!(writer.publish_qos1(3, "news/c").await, ReasonCode::Success);
    reader.expect_silence().await;
    assert_eq!(subscribe(&mut reader, 2, &["news/#"]).await, [ReasonCode::NotAuthorized]);

    // The persistent session comes back: its queued news (a, b, c) are not delivered and its
    // subscription is gone.
    let (mut c, ack) = Raw::session(b.addr, away).await;
    assert!(ack.session_present);
    c.expect_silence().await;
    eventually("the offline session's subscription to be revoked", || {
        b.context().metrics.acl_denied.get_or_create(&proxy::metrics::ReasonLabel { reason: "revoked" }).get() == 2
    })
    .await;
    assert!(metric(&b, "mqfleet_proxy_dropped_messages_total{reason=\"not_authorized\"}").await >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_need_a_rule_that_names_them_bad_input_60_69() {
    let rules = concat!(
        "[[rule]]\npermission = \"allow\"\naction = \"all\"\nusername = \"ops\"\ntopics = [\"#\", \"$SYS/#\"]\n",
        "[[rule]]\npermission = \"allow\"\naction = \"subscribe\"\ntopics = [\"#\", \"+/status\"]\n",
    );
    let (b, _files) = broker(rules).await;
    let mut alice = user(&b, Protocol::V5, "alice-1", "alice").await;
    use ReasonCode::{GrantedQoS1, NotAuthorized};
    // MQTT-4.7.2-1: a filter starting with a wildcard does not match $ topics, so "#" grants
    // no $SYS; asking for $SYS directly is refused.
    assert_eq!(
        subscribe(&mut alice, 1, &["#", "$SYS/#", "$SYS/broker/clients", "+/status"]).await,
        [GrantedQoS1, NotAuthorized, NotAuthorized, GrantedQoS1]
    );
    let mut ops = user(&b, Protocol::V5, "ops-1", "ops").await;
    assert_eq!(subscribe(&mut ops, 1, &["$SYS/#"]).await, [GrantedQoS1], "a privileged user named by a rule");
}
