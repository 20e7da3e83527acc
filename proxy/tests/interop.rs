//! Other people's clients against mqfleet: paho-mqtt (Python, 3.1.1 and 5.0) and the
//! mosquitto command-line tools.

mod support;

use std::io::Read;
use std::time::Duration;

use support::*;

#[tokio::test]
async fn paho_mqtt_3_1_1_scenario() {
    let b = TestBroker::start().await;
    let addr = b.addr;
    let out = tokio::task::spawn_blocking(move || paho("v311.py", addr)).await.unwrap();
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[tokio::test]
async fn paho_mqtt_5_scenario() {
    let b = TestBroker::start().await;
    let addr = b.addr;
    let out = tokio::task::spawn_blocking(move || paho("v5.py", addr)).await.unwrap();
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

/// Reads `mosquitto_sub` output until it exits (it stops after `-C` messages).
fn collect(mut child: std::process::Child) -> String {
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "mosquitto_sub failed: {err}");
    out
}

#[tokio::test]
async fn mosquitto_pub_and_sub_in_both_versions() {
    let b = TestBroker::start().await;
    let addr = b.addr;
    tokio::task::spawn_blocking(move || {
        for version in ["mqttv311", "mqttv5"] {
            let sub = mosquitto_sub(
                addr,
                &["-V", version, "-t", "mq/#", "-q", "2", "-v", "-C", "3", "-W", "10", "-i", &format!("sub-{version}")],
            );
            std::thread::sleep(Duration::from_millis(500));
            for qos in ["0", "1", "2"] {
                let out = mosquitto_pub(addr, &["-V", version, "-t", &format!("mq/{qos}"), "-m", &format!("m{qos}"), "-q", qos]);
                assert!(out.status.success(), "mosquitto_pub: {}", String::from_utf8_lossy(&out.stderr));
            }
            let got = collect(sub);
            assert_eq!(got.lines().collect::<Vec<_>>(), ["mq/0 m0", "mq/1 m1", "mq/2 m2"], "{version}");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn mosquitto_retained_and_persistent_session() {
    let b = TestBroker::start().await;
    let addr = b.addr;
    tokio::task::spawn_blocking(move || {
        assert!(mosquitto_pub(addr, &["-t", "mr/state", "-m", "on", "-r", "-q", "1"]).status.success());
        let got = collect(mosquitto_sub(addr, &["-t", "mr/state", "-C", "1", "-W", "10", "-v"]));
        assert_eq!(got.trim(), "mr/state on");
        // Persistent session (-c) with a queued QoS 1 message.
        let first = mosquitto_sub(addr, &["-t", "mr/q", "-q", "1", "-c", "-i", "persist", "-C", "1", "-W", "10"]);
        std::thread::sleep(Duration::from_millis(500));
        assert!(mosquitto_pub(addr, &["-t", "mr/q", "-m", "one", "-q", "1"]).status.success());
        assert_eq!(collect(first).trim(), "one");
        assert!(mosquitto_pub(addr, &["-t", "mr/q", "-m", "two", "-q", "1"]).status.success());
        let again = collect(mosquitto_sub(addr, &["-t", "mr/q", "-q", "1", "-c", "-i", "persist", "-C", "1", "-W", "10"]));
        assert_eq!(again.trim(), "two", "queued while offline");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn mosquitto_v5_properties_pass_through() {
    let b = TestBroker::start().await;
    let addr = b.addr;
    tokio::task::spawn_blocking(move || {
        let sub = mosquitto_sub(addr, &["-V", "mqttv5", "-t", "mp", "-C", "1", "-W", "10", "-F", "%t %p %P"]);
        std::thread::sleep(Duration::from_millis(500));
        let out = mosquitto_pub(addr, &["-V", "mqttv5", "-t", "mp", "-m", "body", "-D", "publish", "user-property", "site", "north"]);
        assert!(out.status.success());
        assert_eq!(collect(sub).trim(), "mp body site:north");
    })
    .await
    .unwrap();
}
