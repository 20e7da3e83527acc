//! What an operator sees: exit codes, health endpoints, metrics, graceful shutdown.

mod support;

use std::process::Command;

use mqfleet_codec::{Connect, Packet, Protocol, ReasonCode};
use support::*;

#[test]
fn invalid_configuration_exits_64_naming_every_bad_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_mqfleet-proxy"))
        .args(["--mqtt", "nowhere", "--shards", "local:0", "--store", "redis"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["mqtt:", "shards:", "store:"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
}

#[test]
fn a_misspelt_environment_variable_is_refused_not_ignored() {
    let out = Command::new(env!("CARGO_BIN_EXE_mqfleet-proxy")).env("MQFLEET_PROXY_MAX_CONECTIONS", "5").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MQFLEET_PROXY_MAX_CONECTIONS: no such setting"), "{err}");
    let out = Command::new(testkit::service::binary("mqfleet-shard")).env("MQFLEET_SHARD_FSYNK", "batch").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MQFLEET_SHARD_FSYNK"), "{out:?}");
}

#[test]
fn configuration_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mqfleet.toml");
    std::fs::write(&file, "mqtt = \"127.0.0.1:0\"\nmax_inflight = \"lots\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mqfleet-proxy")).arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mqfleet.toml") && err.contains("max_inflight"), "{err}");
}

#[test]
fn environment_overrides_the_file_and_flags_override_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "max_inflight = 5\nshards = \"local:1\"\n").unwrap();
    // The environment sets an invalid value that only a flag can rescue: the exit status tells
    // which layer won.
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mqfleet-proxy"))
            .arg("--config")
            .arg(&file)
            .env("MQFLEET_PROXY_SHARDS", "local:0")
            .args(extra)
            .args(["--mqtt", "256.0.0.1:1"])
            .output()
            .unwrap()
    };
    let env_wins = run(&[]);
    assert!(String::from_utf8_lossy(&env_wins.stderr).contains("shards: \"local:0\""), "environment overrides the file");
    let flag_wins = run(&["--shards", "local:2"]);
    assert!(!String::from_utf8_lossy(&flag_wins.stderr).contains("shards:"), "flag overrides the environment");
}

#[test]
fn port_in_use_is_a_start_failure_with_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mqfleet-proxy"))
        .args(["--mqtt", &taken.local_addr().unwrap().to_string(), "--http", ""])
        .arg("--store")
        .arg(format!("embedded:{}", dir.path().display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("cannot listen on"), "{log}");
}

#[test]
fn a_locked_data_directory_is_a_start_failure() {
    let dir = tempfile::tempdir().unwrap();
    let _first = ProxyProcess::start(dir.path(), &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_mqfleet-proxy"))
        .args(["--mqtt", "127.0.0.1:0", "--http", ""])
        .arg("--store")
        .arg(format!("embedded:{}", dir.path().display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot open the embedded store"));
}

#[tokio::test]
async fn health_endpoints_and_metrics() {
    let b = TestBroker::start().await;
    assert_eq!(b.http_get("/livez").await.0, 200);
    assert_eq!(b.http_get("/readyz").await.0, 200);
    let mut c = Raw::v5(b.addr, "metered").await;
    c.send(Packet::PingReq).await;
    assert_eq!(c.recv().await, Some(Packet::PingResp));
    let (status, body) = b.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("mqfleet_proxy_connections 1"), "{body}");
    assert!(body.contains(r#"mqfleet_proxy_connects_total{code="0x00"} 1"#), "{body}");
    assert!(!body.contains("metered"), "client ids never appear in metrics (BAD-INPUT I.74)");
}

#[tokio::test]
async fn sigterm_disconnects_v5_clients_with_0x8b_saves_sessions_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = ProxyProcess::start(dir.path(), &[]);
    let mut connect = Connect::new(Protocol::V5, "drained");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(600);
    let (mut c, _) = Raw::session(broker.addr, connect.clone()).await;
    let mut v3 = Raw::v4(broker.addr, "drained3").await;
    let status = tokio::task::spawn_blocking(move || {
        let s = broker.terminate();
        (s, broker)
    });
    match c.until_closed().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::ServerShuttingDown),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert_eq!(v3.until_closed().await, None, "3.1.1 clients are closed");
    let (status, broker) = status.await.unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(broker.log_text().contains("all connections closed and sessions saved"), "{}", broker.log_text());
    drop(broker);
    let broker = ProxyProcess::start(dir.path(), &[]);
    let (_c, ack) = Raw::session(broker.addr, connect).await;
    assert!(ack.session_present);
}

#[tokio::test]
async fn readyz_fails_once_draining_starts_while_livez_stays_up() {
    let b = TestBroker::start().await;
    assert_eq!(b.http_get("/readyz").await.0, 200);
    b.mark_unready();
    assert_eq!(b.http_get("/readyz").await.0, 503);
    assert_eq!(b.http_get("/livez").await.0, 200);
}
