//! Shared test support: brokers started in-process or as real processes, a raw MQTT client
//! speaking through our codec, and helpers for rumqttc, paho-mqtt and the mosquitto tools.
#![allow(dead_code, unused_imports)] // each test binary uses a different part

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use mqfleet_codec::{decode_packet, ConnAck, Connect, Packet, Protocol};
use proxy::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for something that should happen promptly. Generous: CI machines are
/// slow, and a passing test never waits this long.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn config() -> Config {
    Config { mqtt: "127.0.0.1:0".into(), http: "127.0.0.1:0".into(), shards: "local:2".into(), ..Config::default() }
}

/// A broker in this process, on free ports, with its store in a temporary directory.
pub struct TestBroker {
    pub addr: SocketAddr,
    /// The MQTT over TLS, WebSocket and secure WebSocket listeners, when configured.
    pub tls: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    broker: Option<proxy::Broker>,
    pub dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        TestBroker::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = tempfile::tempdir().unwrap();
        TestBroker::in_dir(dir, tweak).await
    }

    pub async fn in_dir(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestBroker {
        let mut c = config();
        c.store = format!("embedded:{}", dir.path().display());
        tweak(&mut c);
        let broker = proxy::start(c.validate().unwrap()).await.unwrap();
        TestBroker {
            addr: broker.mqtt_addr,
            tls: broker.mqtts_addr,
            ws: broker.ws_addr,
            wss: broker.wss_addr,
            http: broker.http_addr,
            broker: Some(broker),
            dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn mark_unready(&self) {
        self.broker.as_ref().unwrap().mark_unready();
    }

    /// What SIGHUP does: re-reads the TLS, password and ACL files; returns what failed.
    pub fn reload(&self) -> Vec<String> {
        self.broker.as_ref().unwrap().reload()
    }

    pub fn context(&self) -> &std::sync::Arc<proxy::Context> {
        self.broker.as_ref().unwrap().context()
    }

    /// Graceful shutdown; returns the data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        let b = self.broker.take().unwrap();
        assert!(b.shutdown().await, "broker did not drain within its grace period");
        self.dir
    }

    /// Fetches an HTTP path from the admin listener.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http.unwrap(), path).await
    }
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// An admin API request (`Authorization: Bearer token` when given); returns the status and the
/// body parsed as JSON (`Null` if it is not JSON).
pub async fn api(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
}

/// A token file for the admin API in `dir`; returns (its path, the token).
pub fn admin_token(dir: &Path) -> (String, String) {
    let token = "0123456789abcdef0123456789abcdef-test".to_string();
    let path = dir.join("admin-token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    (path.display().to_string(), token)
}

// === the real binary ===

/// `mqfleet-proxy` as a child process; killed (SIGKILL) on drop.
pub struct ProxyProcess {
    child: Child,
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ProxyProcess {
    pub fn start(data_dir: &Path, extra: &[&str]) -> ProxyProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mqfleet-proxy"))
            .args(["--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "local:2"])
            .arg("--store")
            .arg(format!("embedded:{}", data_dir.display()))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mqfleet-proxy starts");
        let stdout = child.stdout.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                log2.lock().unwrap().push(line);
            }
        });
        let (mut mqtt, mut http) = (None, None);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while mqtt.is_none() || http.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                panic!("mqfleet-proxy did not report its listeners; log:\n{}", log.lock().unwrap().join("\n"));
            };
            let addr = line.split("address=").nth(1).map(|a| a.split_whitespace().next().unwrap_or("").parse::<SocketAddr>());
            if line.contains("MQTT listener bound") {
                mqtt = addr.and_then(Result::ok);
            } else if line.contains("HTTP listener bound") {
                http = addr.and_then(Result::ok);
            }
        }
        ProxyProcess { child, addr: mqtt.unwrap(), http: http.unwrap(), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        self.child.wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === a raw client ===

/// A client that sends exactly the bytes or packets a test wants and shows exactly what comes
/// back, through our codec.
pub struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    pub protocol: Protocol,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Raw { stream, buf: BytesMut::new(), protocol: Protocol::V5 }
    }

    /// Connects and completes a CONNECT/CONNACK exchange.
    pub async fn session(addr: SocketAddr, connect: Connect) -> (Raw, ConnAck) {
        let mut raw = Raw::connect(addr).await;
        raw.protocol = connect.protocol;
        raw.send(Packet::Connect(Box::new(connect))).await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn v5(addr: SocketAddr, client_id: &str) -> Raw {
        let (raw, ack) = Raw::session(addr, Connect::new(Protocol::V5, client_id)).await;
        assert_eq!(ack.reason, mqfleet_codec::ReasonCode::Success);
        raw
    }

    pub async fn v4(addr: SocketAddr, client_id: &str) -> Raw {
        let (raw, ack) = Raw::session(addr, Connect::new(Protocol::V3_1_1, client_id)).await;
        assert_eq!(ack.reason, mqfleet_codec::ReasonCode::Success);
        raw
    }

    pub async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        p.encode(self.protocol, &mut b).unwrap();
        self.stream.write_all(&b).await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The server may already have closed: that is what some tests expect.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet, or `None` once the server closed the connection. Panics after
    /// [`PATIENCE`] without either.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(PATIENCE).await.expect("a packet or close in time")
    }

    /// `Err(())` if nothing happened within `t`.
    pub async fn recv_within(&mut self, t: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            if let Some(p) = decode_packet(&mut self.buf, self.protocol, usize::MAX).expect("server sent a valid packet") {
                return Ok(Some(p));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK's reason (deliveries arriving meanwhile, e.g.
    /// of the client's own message, are skipped).
    pub async fn publish_qos1(&mut self, pkid: u16, topic: &str) -> mqfleet_codec::ReasonCode {
        let p = mqfleet_codec::Publish::new(topic, mqfleet_codec::QoS::AtLeastOnce, &b"m"[..], mqfleet_codec::PacketId::new(pkid));
        self.send(Packet::Publish(p)).await;
        loop {
            match self.recv().await {
                Some(Packet::PubAck(a)) => return a.reason,
                Some(Packet::Publish(_)) => {}
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }

    /// Asserts nothing arrives for a short while.
    pub async fn expect_silence(&mut self) {
        if let Ok(p) = self.recv_within(Duration::from_millis(300)).await {
            panic!("expected silence, got {p:?}");
        }
    }

    /// Reads until the server closes; returns the last packet seen (e.g. DISCONNECT).
    pub async fn until_closed(&mut self) -> Option<Packet> {
        let mut last = None;
        while let Some(p) = self.recv().await {
            last = Some(p);
        }
        last
    }
}

// === rumqttc ===

/// A rumqttc client whose event loop runs in a task and forwards incoming packets; the same
/// helpers for the 3.1.1 and the 5.0 APIs.
macro_rules! rumqttc_client {
    ($module:ident; $($imports:item)*) => {
        pub mod $module {
            use super::*;
            use tokio::sync::mpsc;
            $($imports)*

            pub struct Client {
                pub client: AsyncClient,
                pub events: mpsc::UnboundedReceiver<Packet>,
                /// From the CONNACK.
                pub session_present: bool,
            }

            pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
                let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
                o.set_keep_alive(Duration::from_secs(30));
                o
            }

            /// Connects, polls the event loop in a task, forwards incoming packets.
            pub async fn connect(o: MqttOptions) -> Client {
                let (client, mut el) = AsyncClient::new(o, 100);
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    loop {
                        match el.poll().await {
                            Ok(Event::Incoming(p)) => {
                                if tx.send(p).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                });
                let mut c = Client { client, events: rx, session_present: false };
                match c.next().await {
                    Packet::ConnAck(a) => {
                        c.session_present = a.session_present;
                        c
                    }
                    other => panic!("expected CONNACK, got {other:?}"),
                }
            }

            impl Client {
                pub async fn next(&mut self) -> Packet {
                    tokio::time::timeout(PATIENCE, self.events.recv()).await.expect("a packet in time").expect("connection open")
                }

                /// Skips packets until a PUBLISH.
                pub async fn next_publish(&mut self) -> Publish {
                    loop {
                        if let Packet::Publish(p) = self.next().await {
                            return p;
                        }
                    }
                }

                pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
                    self.client.subscribe(filter, qos).await.unwrap();
                    loop {
                        if let Packet::SubAck(_) = self.next().await {
                            return;
                        }
                    }
                }

                /// Asserts no PUBLISH arrives for a while (other packets are skipped).
                pub async fn expect_no_publish(&mut self) {
                    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
                    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
                        assert!(!matches!(p, Packet::Publish(_)), "unexpected {p:?}");
                    }
                }
            }
        }
    };
}

rumqttc_client! {
    v4;
    pub use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
}

rumqttc_client! {
    v5;
    pub use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties, SubscribeProperties};
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{AsyncClient, Event, MqttOptions};
}

// === external clients ===

pub fn tool(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| panic!("{name} is not installed; run the README's test command, which installs it"))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
}

/// Runs `mosquitto_pub` to completion.
pub fn mosquitto_pub(addr: SocketAddr, args: &[&str]) -> std::process::Output {
    Command::new(tool("mosquitto_pub")).args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()]).args(args).output().unwrap()
}

/// Starts `mosquitto_sub`; the caller reads its output.
pub fn mosquitto_sub(addr: SocketAddr, args: &[&str]) -> Child {
    Command::new(tool("mosquitto_sub"))
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs one of the paho-mqtt scenarios in `tests/paho/`; returns its stdout, panics with its
/// output if it fails.
pub fn paho(script: &str, addr: SocketAddr) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/paho").join(script);
    let out = Command::new(which("python3").unwrap_or_else(|| "python3".into()))
        .arg(&path)
        .args([addr.ip().to_string(), addr.port().to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "paho scenario {script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Runs an operator command of the real `mqfleet-proxy` (`passwd`, `acl`) with `stdin`.
pub fn proxy_tool(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqfleet-proxy"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Adds a user to a password file with the real `mqfleet-proxy passwd` command.
pub fn add_user(file: &Path, user: &str, password: &str) {
    let out = proxy_tool(&["passwd", file.to_str().unwrap(), user], &format!("{password}\n"));
    assert!(out.status.success(), "passwd failed: {out:?}");
}

/// A CONNECT carrying credentials.
pub fn login(protocol: Protocol, client_id: &str, username: Option<&str>, password: Option<&str>) -> Connect {
    let mut c = Connect::new(protocol, client_id);
    c.username = username.map(Into::into);
    c.password = password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
    c
}

/// A CONNECT with a will on `wills/x` ("<client id> is gone"); with `expiry`, a persistent
/// session (Clean Start 0).
pub fn with_will(protocol: Protocol, client_id: &str, delay: Option<u32>, expiry: Option<u32>) -> Connect {
    let mut c = Connect::new(protocol, client_id);
    let mut w = mqfleet_codec::Will {
        topic: "wills/x".into(),
        payload: bytes::Bytes::from(format!("{client_id} is gone")),
        qos: mqfleet_codec::QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    };
    w.properties.will_delay_interval = delay;
    c.will = Some(w);
    if let Some(e) = expiry {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(e);
    }
    c
}

/// The value of a Prometheus sample (`name{labels}`) on the broker's /metrics, 0 if absent.
pub async fn metric(b: &TestBroker, sample: &str) -> u64 {
    sample_in(&b.http_get("/metrics").await.1, sample)
}

/// The value of a Prometheus sample on a process's /metrics, 0 if absent.
pub fn metric_of(s: &testkit::service::Service, sample: &str) -> f64 {
    s.metric(sample).unwrap_or(0.0)
}

/// The value of a Prometheus sample in a /metrics text, 0 if absent.
pub fn sample_in(text: &str, sample: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse::<f64>().ok())).map_or(0, |v| v as u64)
}

/// Waits for a condition, polling; panics with `what` after [`PATIENCE`].
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
