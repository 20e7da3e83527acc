//! Authentication: anonymous access by listener address, the password file (made with the real
//! `mqfleet-proxy passwd` command) with mosquitto clients, rumqttc and paho, reload on SIGHUP,
//! JSON Web Tokens, and an authentication storm that must not stall connected clients.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use jsonwebtoken::{encode, EncodingKey, Header};
use mqfleet_codec::{Packet, Protocol, Publish, QoS, ReasonCode};
use support::*;

/// [MQTT-3.2.2-6] (5.0) / [MQTT-3.2.2-4] (3.1.1): a refusing CONNACK has Session Present 0;
/// [MQTT-3.2.2-7] / [MQTT-3.2.2-5]: the server then closes the connection.
async fn refused(addr: std::net::SocketAddr, connect: mqfleet_codec::Connect) -> ReasonCode {
    let (mut raw, ack) = Raw::session(addr, connect).await;
    assert!(!ack.session_present, "a refusal never has a session present");
    assert_eq!(raw.until_closed().await, None, "closed after the refusing CONNACK");
    ack.reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_are_refused_once_a_listener_leaves_loopback_bad_input_68() {
    let open_to_all = TestBroker::with(|c| c.mqtt = "0.0.0.0:0".into()).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], open_to_all.port()));
    assert_eq!(refused(addr, login(Protocol::V5, "anon-5", None, None)).await, ReasonCode::NotAuthorized);
    assert_eq!(refused(addr, login(Protocol::V3_1_1, "anon-4", None, None)).await, ReasonCode::NotAuthorized, "3.1.1 return code 5");
    let out = mosquitto_pub(addr, &["-t", "t", "-m", "x", "-V", "mqttv311"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not authorised"), "{out:?}");
    assert_eq!(metric(&open_to_all, "mqfleet_proxy_auth_failures_total{reason=\"anonymous\"}").await, 3);

    let allowed = TestBroker::with(|c| {
        c.mqtt = "0.0.0.0:0".into();
        c.allow_anonymous = "true".into();
    })
    .await;
    Raw::v5(std::net::SocketAddr::from(([127, 0, 0, 1], allowed.port())), "anon").await;
    // And the default, loopback-only broker lets anonymous clients in (every other test).
}

/// A broker with a password file holding alice (password "wonderland") and bob ("builder").
async fn with_users(tweak: impl FnOnce(&mut proxy::config::Config)) -> (TestBroker, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let passwd = files.path().join("passwd");
    add_user(&passwd, "alice", "wonderland");
    add_user(&passwd, "bob", "builder");
    let path = passwd.display().to_string();
    let b = TestBroker::with(move |c| {
        c.password_file = path;
        tweak(c);
    })
    .await;
    (b, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_file_users_get_in_and_wrong_or_unknown_credentials_are_refused() {
    let (b, _files) = with_users(|_| {}).await;
    for version in ["mqttv311", "mqttv5"] {
        let ok = mosquitto_pub(b.addr, &["-V", version, "-u", "alice", "-P", "wonderland", "-t", "t", "-m", "x", "-q", "1"]);
        assert!(ok.status.success(), "{version}: {ok:?}");
        let wrong = mosquitto_pub(b.addr, &["-V", version, "-u", "alice", "-P", "Wonderland", "-t", "t", "-m", "x"]);
        let stderr = String::from_utf8_lossy(&wrong.stderr).to_lowercase();
        assert!(!wrong.status.success() && stderr.contains("bad user name or password"), "{version}: {stderr}");
    }
    assert_eq!(refused(b.addr, login(Protocol::V5, "c", Some("alice"), Some("Wonderland"))).await, ReasonCode::BadUserNameOrPassword);
    assert_eq!(
        refused(b.addr, login(Protocol::V5, "c", Some("mallory"), Some("wonderland"))).await,
        ReasonCode::BadUserNameOrPassword,
        "unknown users are refused, not treated as anonymous"
    );
    assert_eq!(
        refused(b.addr, login(Protocol::V3_1_1, "c", Some("bob"), Some("wonderland"))).await,
        ReasonCode::BadUserNameOrPassword,
        "3.1.1 return code 4"
    );
    assert_eq!(metric(&b, "mqfleet_proxy_auth_failures_total{reason=\"bad_password\"}").await, 4);
    assert_eq!(metric(&b, "mqfleet_proxy_auth_failures_total{reason=\"unknown_user\"}").await, 1);

    // rumqttc with credentials, both APIs.
    let mut o = v5::options(b.addr, "rumqttc-5");
    o.set_credentials("bob", "builder");
    let mut c5 = v5::connect(o).await;
    c5.subscribe("greetings", v5::QoS::AtLeastOnce).await;
    let mut o = v4::options(b.addr, "rumqttc-4");
    o.set_credentials("alice", "wonderland");
    let c4 = v4::connect(o).await;
    c4.client.publish("greetings", v4::QoS::AtLeastOnce, false, "hi bob").await.unwrap();
    assert_eq!(&c5.next_publish().await.payload[..], b"hi bob");

    // paho-mqtt in both versions: good credentials in, a bad password refused with its code.
    let out = paho("auth.py", b.addr);
    assert!(out.contains("v311 good 0") && out.contains("v311 bad 4"), "{out}");
    assert!(out.contains("v5 good 0") && out.contains("v5 bad 134"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_edited_while_running_applies_on_sighup_and_a_broken_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    add_user(&passwd, "alice", "wonderland");
    let proxy = ProxyProcess::start(&dir.path().join("data"), &["--password-file", passwd.to_str().unwrap()]);
    let try_login = |user: &str, pw: &str| mosquitto_pub(proxy.addr, &["-u", user, "-P", pw, "-t", "t", "-m", "x"]).status.success();
    assert!(try_login("alice", "wonderland"));
    add_user(&passwd, "carol", "secret");
    assert!(!try_login("carol", "secret"), "not applied before SIGHUP");
    let hup = || assert!(std::process::Command::new("kill").args(["-HUP", &proxy.pid().to_string()]).status().unwrap().success());
    hup();
    eventually("carol to get in after SIGHUP", || try_login("carol", "secret")).await;
    // BAD-INPUT 73: a reload that fails keeps the running configuration.
    std::fs::write(&passwd, "carol\n").unwrap();
    hup();
    eventually("the failed reload to be logged", || proxy.log_text().contains("reload incomplete")).await;
    assert!(proxy.log_text().contains("line 1: expected username:hash"), "{}", proxy.log_text());
    assert!(try_login("alice", "wonderland") && try_login("carol", "secret"), "the previous users still work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authentication_storm_does_not_stall_connected_clients_bad_input_66() {
    let (b, _files) = with_users(|c| c.auth_concurrency = 1).await;
    let mut bystander = Raw::v5(b.addr, "bystander").await;
    const STORM: usize = 24;
    let finished = Arc::new(AtomicUsize::new(0));
    let mut storm = Vec::new();
    for i in 0..STORM {
        let finished = finished.clone();
        let addr = b.addr;
        storm.push(tokio::spawn(async move {
            let (_raw, ack) = Raw::session(addr, login(Protocol::V5, &format!("attacker-{i}"), Some("alice"), Some("guess"))).await;
            finished.fetch_add(1, Ordering::SeqCst);
            ack.reason
        }));
    }
    // Wait until the storm is being worked through (one hash at a time), then ask the
    // connected client's questions: they are answered while hashes are still queued.
    eventually("the first refusals", || finished.load(Ordering::SeqCst) >= 1).await;
    bystander.send(Packet::PingReq).await;
    assert_eq!(bystander.recv().await, Some(Packet::PingResp));
    let p = Publish::new("chatter", QoS::AtLeastOnce, &b"still here"[..], mqfleet_codec::PacketId::new(1));
    bystander.send(Packet::Publish(p)).await;
    assert!(matches!(bystander.recv().await, Some(Packet::PubAck(_))));
    let done_when_answered = finished.load(Ordering::SeqCst);
    assert!(done_when_answered < STORM, "the connected client was answered only after the whole storm");
    for s in storm {
        assert_eq!(s.await.unwrap(), ReasonCode::BadUserNameOrPassword);
    }
}

const SECRET: &[u8] = b"fleet-signing-secret-of-32-bytes!";

fn token(claims: serde_json::Value) -> String {
    encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_admit_their_subject_and_their_topic_claims_bound_it() {
    let files = tempfile::tempdir().unwrap();
    let secret = files.path().join("jwt.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let path = secret.display().to_string();
    let b = TestBroker::with(move |c| {
        c.jwt_secret_file = path;
        c.jwt_issuer = "fleet-idp".into();
        c.jwt_audience = "mqfleet".into();
    })
    .await;
    let claims = |sub: &str, exp: u64| {
        serde_json::json!({"sub": sub, "iss": "fleet-idp", "aud": "mqfleet", "exp": exp,
            "acl": {"pub": ["telemetry/%u/#"], "sub": ["commands/%u/#"]}})
    };
    let good = token(claims("dev-7", now() + 600));

    // rumqttc 5.0 with the token as password: publishes inside its claim are accepted, others
    // get PUBACK 0x87; subscriptions outside its claim get SUBACK 0x87.
    let mut o = v5::options(b.addr, "dev-7-conn");
    o.set_credentials("dev-7", good.clone());
    let mut dev = v5::connect(o).await;
    dev.client.publish("telemetry/dev-7/temp", v5::QoS::AtLeastOnce, false, "21.5").await.unwrap();
    dev.client.publish("telemetry/dev-8/temp", v5::QoS::AtLeastOnce, false, "spoofed").await.unwrap();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        if let rumqttc::v5::mqttbytes::v5::Packet::PubAck(a) = dev.next().await {
            acks.push(a.reason);
        }
    }
    use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
    assert_eq!(acks, [PubAckReason::Success, PubAckReason::NotAuthorized]);
    dev.client.subscribe("commands/dev-8/#", v5::QoS::AtLeastOnce).await.unwrap();
    loop {
        if let rumqttc::v5::mqttbytes::v5::Packet::SubAck(s) = dev.next().await {
            assert_eq!(s.return_codes, [SubscribeReasonCode::NotAuthorized]);
            break;
        }
    }

    let expired = token(claims("dev-7", now() - 3600));
    assert_eq!(refused(b.addr, login(Protocol::V5, "c", Some("dev-7"), Some(&expired))).await, ReasonCode::BadUserNameOrPassword);
    assert_eq!(
        refused(b.addr, login(Protocol::V5, "c", Some("dev-8"), Some(&good))).await,
        ReasonCode::BadUserNameOrPassword,
        "a token is not valid under another username"
    );
    let foreign =
        encode(&Header::default(), &claims("dev-7", now() + 600), &EncodingKey::from_secret(b"another-secret-of-thirty-two-byte")).unwrap();
    assert_eq!(refused(b.addr, login(Protocol::V3_1_1, "c", Some("dev-7"), Some(&foreign))).await, ReasonCode::BadUserNameOrPassword);
    assert_eq!(metric(&b, "mqfleet_proxy_auth_failures_total{reason=\"bad_token\"}").await, 3);
}

#[test]
fn bad_authentication_settings_are_refused_at_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, "alice:plaintext-password\n").unwrap();
    let mut c = config();
    c.password_file = passwd.display().to_string();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("password_file") && e.contains("passwd: line 1 (alice): not a PHC hash string"), "{e}");

    let mut c = config();
    c.allow_anonymous = "sometimes".into();
    c.acl_file = dir.path().join("missing.toml").display().to_string();
    c.jwt_secret_file = passwd.display().to_string();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("allow_anonymous: \"sometimes\" is not auto, true or false"), "{e}");
    assert!(e.contains("jwt_secret_file") && e.contains("at least 32 bytes"), "{e}");
}
