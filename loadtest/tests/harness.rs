//! mqfleet-loadtest against real brokers: Mosquitto and mqfleet, over TCP, TLS with client
//! certificates and WebSocket; a deliberately lossy relay proves that loss is detected; the
//! report follows its schema and the chart is written.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use mqfleet_codec::{FixedHeader, PacketType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PATIENCE: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_for_port(port: u16) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "nothing listening on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Mosquitto process with the given listener configuration; killed on drop.
struct Mosquitto {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    async fn start(config: impl FnOnce(&Path) -> (String, u16)) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let (conf, port) = config(dir.path());
        let file = dir.path().join("mosquitto.conf");
        std::fs::write(&file, conf).unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (the README's test command installs it)");
        wait_for_port(port).await;
        Mosquitto { child, _dir: dir }
    }

    /// Still running a moment after its port answered: a port taken between choosing it and
    /// Mosquitto binding it (tests run in parallel) makes Mosquitto exit, while the port answers
    /// for whoever took it.
    async fn alive(&mut self) -> bool {
        tokio::time::sleep(Duration::from_millis(100)).await;
        matches!(self.child.try_wait(), Ok(None))
    }

    async fn plain() -> (Mosquitto, u16) {
        for _ in 0..5 {
            let port = free_port();
            let mut m = Mosquitto::start(|_| (format!("listener {port} 127.0.0.1\nallow_anonymous true\n"), port)).await;
            if m.alive().await {
                return (m, port);
            }
        }
        panic!("mosquitto did not stay up on any of 5 free ports");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    report: serde_json::Value,
    report_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Runs the harness binary; every run writes a report.
async fn harness(args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mqfleet-loadtest"))
            .args(args)
            .arg("--report")
            .arg(&report_path)
            .arg("--quiet")
            .env("RUST_BACKTRACE", "0")
            .output(),
    )
    .await
    .expect("harness finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = match std::fs::read(&report_path) {
        Ok(b) => serde_json::from_slice(&b).unwrap(),
        Err(_) => serde_json::Value::Null,
    };
    Run { code: out.status.code().unwrap_or(-1), stdout, stderr, report, report_path, _dir: dir }
}

fn counts(r: &Run, qos: u8) -> serde_json::Value {
    r.report["messages"][format!("qos{qos}")].clone()
}

async fn mqfleet() -> (proxy::Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = proxy::config::Config {
        mqtt: "127.0.0.1:0".into(),
        http: String::new(),
        shards: "local:2".into(),
        store: format!("embedded:{}", dir.path().display()),
        ..Default::default()
    };
    (proxy::start(config.validate().unwrap()).await.unwrap(), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_against_mosquitto() {
    let (_m, port) = Mosquitto::plain().await;
    let target = format!("127.0.0.1:{port}");
    let r = harness(&["telemetry", "-t", &target, "-n", "20", "--rate", "10", "--qos", "1", "-d", "2"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let c = counts(&r, 1);
    assert_eq!(c["published"], 400);
    assert_eq!(c["acknowledged"], 400);
    assert_eq!(c["delivered"], 400);
    assert_eq!(c["lost"], 0);
    assert_eq!(c["duplicated"], 0);
    assert_eq!(r.report["latency_ms"]["qos1"]["count"], 400);
    assert!(r.stdout.contains("verdict: OK"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_against_mqfleet_with_a_qos_mix_and_a_shared_group() {
    let (b, _dir) = mqfleet().await;
    let target = b.mqtt_addr.to_string();
    let r = harness(&[
        "telemetry",
        "-t",
        &target,
        "-n",
        "30",
        "--rate",
        "10",
        "--qos",
        "0:40,1:40,2:20",
        "--subscribers",
        "3",
        "--shared",
        "g",
        "-d",
        "2",
    ])
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let total: u64 = (0..3).map(|q| counts(&r, q)["published"].as_u64().unwrap()).sum();
    assert_eq!(total, 600);
    for q in 0..3 {
        let c = counts(&r, q);
        assert_eq!(c["delivered"], c["published"], "QoS {q}: {c}");
        assert_eq!(c["lost"], 0);
        assert_eq!(c["duplicated"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_clean_against_mqfleet() {
    let (b, _dir) = mqfleet().await;
    let t = b.mqtt_addr.to_string();
    for args in [
        vec!["conn", "-t", &t, "-n", "300", "--connect-rate", "3000"],
        vec!["idle", "-t", &t, "-n", "100", "-d", "1"],
        vec!["command", "-t", &t, "-n", "40", "--rate", "5", "--qos", "2", "-d", "1", "--publishers", "2"],
        vec!["broadcast", "-t", &t, "-n", "40", "--rate", "10", "--qos", "0", "-d", "1"],
        vec!["pairs", "-t", &t, "-n", "4", "--window", "50", "-d", "1"],
        vec!["reqresp", "-t", &t, "-n", "20", "--rate", "5", "-d", "1", "--subscribers", "2"],
        vec!["telemetry", "-t", &t, "-n", "20", "--rate", "5", "--protocol", "3.1.1", "-d", "1"],
    ] {
        let r = harness(&args).await;
        assert_eq!(r.code, 0, "{args:?}\n{}{}", r.stdout, r.stderr);
        assert_eq!(r.report["connections"]["failed"], 0, "{args:?}");
        let delivered: u64 = (0..3).map(|q| counts(&r, q)["delivered"].as_u64().unwrap()).sum();
        let expected: u64 = (0..3).map(|q| counts(&r, q)["expected"].as_u64().unwrap()).sum();
        assert_eq!(delivered, expected, "{args:?}");
        if !["conn", "idle"].contains(&args[0]) {
            assert!(delivered > 0, "{args:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_on_persistent_sessions_loses_nothing_on_mqfleet() {
    // Regression: a message routed while a session re-attached used to wait for the next
    // reconnect (docs/ARCHITECTURE.md, "The link interface").
    let (b, _dir) = mqfleet().await;
    let t = b.mqtt_addr.to_string();
    let r = harness(&[
        "reconnect",
        "-t",
        &t,
        "-n",
        "50",
        "--rate",
        "5",
        "-d",
        "5",
        "--drop-percent",
        "30",
        "--drop-every",
        "1.2",
        "--offline",
        "0.4",
    ])
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(counts(&r, 1)["lost"], 0);
    assert_eq!(counts(&r, 1)["delivered"], counts(&r, 1)["published"]);
}

// === a lossy relay ===

/// Forwards TCP connections to `upstream`, dropping the first broker→client PUBLISH of QoS
/// `drop_qos` that it sees.
async fn lossy_relay(upstream: SocketAddr, drop_qos: u8) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let dropped = dropped.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                });
                let mut buf = BytesMut::new();
                loop {
                    if sr.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        let _ = cw.shutdown().await;
                        return;
                    }
                    while let Ok(Some(h)) = FixedHeader::parse(&buf, usize::MAX) {
                        if buf.len() < h.frame_len() {
                            break;
                        }
                        let frame = buf.split_to(h.frame_len());
                        let qos = (frame[0] >> 1) & 0b11;
                        let is_victim = h.packet_type == PacketType::Publish && qos == drop_qos;
                        if is_victim && !dropped.swap(true, std::sync::atomic::Ordering::SeqCst) {
                            continue;
                        }
                        if cw.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_qos0_message_is_reported_as_lost() {
    let (_m, port) = Mosquitto::plain().await;
    let relay = lossy_relay(format!("127.0.0.1:{port}").parse().unwrap(), 0).await;
    let r = harness(&["broadcast", "-t", &relay.to_string(), "-n", "3", "--rate", "20", "--qos", "0", "-d", "1"]).await;
    let c = counts(&r, 0);
    assert_eq!(c["lost"], 1, "{}", r.stdout);
    assert_eq!(c["delivered"].as_u64().unwrap() + 1, c["expected"].as_u64().unwrap());
    assert_eq!(r.code, 0, "QoS 0 loss is reported but breaks no promise");
    assert!(r.stdout.contains("lost: stream 0"), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_qos1_message_fails_the_run() {
    let (_m, port) = Mosquitto::plain().await;
    let relay = lossy_relay(format!("127.0.0.1:{port}").parse().unwrap(), 1).await;
    let r = harness(&["broadcast", "-t", &relay.to_string(), "-n", "3", "--rate", "20", "--qos", "1", "-d", "1", "--drain", "2"]).await;
    assert_eq!(counts(&r, 1)["lost"], 1, "{}", r.stdout);
    assert_eq!(r.code, 1, "exit status 1 when an acknowledged QoS 1 message is lost");
    assert_eq!(r.report["verdict"]["ok"], false);
    assert_eq!(r.report["verdict"]["lost_qos12"], 1);
}

// === report and chart ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_matches_its_schema_and_the_chart_is_written() {
    let (b, _dir) = mqfleet().await;
    let pid = std::process::id().to_string();
    let r = harness(&["telemetry", "-t", &b.mqtt_addr.to_string(), "-n", "10", "--rate", "20", "-d", "2", "--broker-pid", &pid]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/report_schema.json");
    let check = std::process::Command::new("python3")
        .args(["-c", "import json,sys,jsonschema; jsonschema.validate(json.load(open(sys.argv[2])), json.load(open(sys.argv[1])))", schema])
        .arg(&r.report_path)
        .output()
        .unwrap();
    assert!(check.status.success(), "report does not match its schema:\n{}", String::from_utf8_lossy(&check.stderr));
    assert!(r.report["broker"]["cpu_seconds"].as_f64().unwrap() >= 0.0);
    assert!(!r.report["timeline"].as_array().unwrap().is_empty());
    let svg = std::fs::read_to_string(r.report_path.with_extension("svg")).expect("chart next to the report");
    assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("delivered/s"), "{svg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_file_runs_its_stages_in_order() {
    let (b, _dir) = mqfleet().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("swarm.toml");
    std::fs::write(
        &file,
        format!(
            "target = [\"{}\"]\nqos = \"1\"\n\n[[stage]]\nscenario = \"conn\"\ndevices = 50\n\n[[stage]]\nscenario = \"telemetry\"\ndevices = 10\nrate = 10\nduration = 1\n",
            b.mqtt_addr
        ),
    )
    .unwrap();
    let r = harness(&["run", file.to_str().unwrap()]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("conn against") && r.stdout.contains("telemetry against"), "{}", r.stdout);
    let stage2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.report_path.with_file_name("report.stage2.json")).unwrap()).unwrap();
    assert_eq!(stage2["messages"]["qos1"]["delivered"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_unreachable_brokers_exit_3() {
    let r = harness(&["telemetry", "--qos", "7", "-t", "127.0.0.1:1"]).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("QoS 7 does not exist"), "{}", r.stderr);
    let r = harness(&["telemetry", "-t", &format!("127.0.0.1:{}", free_port()), "-n", "2", "-d", "1"]).await;
    assert_eq!(r.code, 3, "{}", r.stdout);
    assert!(r.report["errors"]["connect_failed"].as_u64().unwrap() >= 2);
}

// === TLS and WebSocket ===

use testkit::pki::pki;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_against_mosquitto() {
    let port = free_port();
    let certs = tempfile::tempdir().unwrap();
    let p = pki(certs.path());
    let conf = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        p.ca.display(),
        p.server_cert.display(),
        p.server_key.display()
    );
    let _m = Mosquitto::start(|_| (conf, port)).await;
    let target = format!("mqtts://localhost:{port}");
    let (ca, cert, key) = (p.ca.to_str().unwrap(), p.client_cert.to_str().unwrap(), p.client_key.to_str().unwrap());
    let r = harness(&["telemetry", "-t", &target, "--ca", ca, "--cert", cert, "--key", key, "-n", "5", "--rate", "10", "-d", "1"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(counts(&r, 1)["delivered"], 50);
    // Without the client certificate the broker refuses the handshake.
    let r = harness(&["telemetry", "-t", &target, "--ca", ca, "-n", "1", "--rate", "10", "-d", "1"]).await;
    assert_eq!(r.code, 3, "{}", r.stdout);
}

/// A WebSocket front (subprotocol `mqtt`) for a TCP broker: MQTT bytes cross it unchanged.
#[allow(clippy::result_large_err)] // the callback signature is tungstenite's
async fn websocket_bridge(upstream: SocketAddr) -> SocketAddr {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let choose_mqtt = |req: &Request, mut resp: Response| {
                    let asks_mqtt = req
                        .headers()
                        .get("Sec-WebSocket-Protocol")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.split(',').any(|p| p.trim() == "mqtt"));
                    if asks_mqtt {
                        resp.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
                    }
                    Ok(resp)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, choose_mqtt).await else { return };
                let Ok(broker) = TcpStream::connect(upstream).await else { return };
                let (mut br, mut bw) = broker.into_split();
                let (mut sink, mut stream) = ws.split();
                tokio::spawn(async move {
                    while let Some(Ok(m)) = stream.next().await {
                        if let Message::Binary(b) = m {
                            if bw.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                    }
                });
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = br.read(&mut buf).await {
                    if n == 0 || sink.send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_transport() {
    let (_m, port) = Mosquitto::plain().await;
    let bridge = websocket_bridge(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let r = harness(&["telemetry", "-t", &format!("ws://{bridge}/mqtt"), "-n", "5", "--rate", "10", "-d", "1"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(counts(&r, 1)["delivered"], 50, "{}{}", r.stdout, r.stderr);
}
