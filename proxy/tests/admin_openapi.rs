//! The proxy's admin API against its description, docs/openapi/proxy.yaml, with schemathesis:
//! generated requests (valid and invalid) from the description; every answer must have a
//! documented status and content type and match its schema, invalid input must be refused,
//! requests without the token must be refused, and nothing may answer 5xx.
//!
//! One check is left out: `positive_data_acceptance` (every schema-valid request accepted).
//! Some of what the proxy refuses depends on its configuration (`max_topic_levels`,
//! `max_packet_size`) or on two fields together (a base64 `payload` only with
//! `payload_encoding = base64`), which a schema cannot say.

mod support;

use std::path::PathBuf;
use std::process::Command;

use mqfleet_codec::{Connect, Packet, PacketId, Protocol, Subscribe, SubscriptionOptions};
use support::*;

/// schemathesis as `./dev test` installs it (`pip install --user`).
fn schemathesis() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("schemathesis")).find(|f| f.is_file()));
    let user = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/bin/schemathesis")).filter(|f| f.is_file());
    on_path.or(user).expect("schemathesis is not installed; run the README's test command, which installs it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_keeps_to_its_openapi_description() {
    let dir = tempfile::tempdir().unwrap();
    let (token_file, token) = admin_token(dir.path());
    let b = TestBroker::with(|c| c.admin_token_file = token_file).await;
    // The client the description's examples name, with a persistent session and a subscription.
    let mut connect = Connect::new(Protocol::V5, "probe-client");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(3600);
    let (mut probe, _) = Raw::session(b.addr, connect).await;
    probe
        .send(Packet::Subscribe(Subscribe::new(PacketId::new(1).unwrap(), vec![("probe/#".into(), SubscriptionOptions::default())])))
        .await;
    assert!(matches!(probe.recv().await, Some(Packet::SubAck(_))));

    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi/proxy.yaml");
    let url = format!("http://{}/api/v1", b.http.unwrap());
    let work = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(schemathesis())
            .current_dir(work.path())
            .args(["run", spec, "--url", &url, "-H", &format!("Authorization: Bearer {token}")])
            .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
            .args(["--phases", "examples,coverage,fuzzing", "--max-examples", "50", "--seed", "1", "--workers", "1"])
            .args(["--generation-database", "none", "--no-color", "--output-truncate", "true", "--request-timeout", "10"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found the API out of line with docs/openapi/proxy.yaml:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Tested: 9"), "every operation was tested:\n{stdout}");
}
