//! MQTT over WebSocket and secure WebSocket: paho-mqtt as a real client in both versions,
//! packets split across frames and several packets in one frame [MQTT-6.0.0-2], the `mqtt`
//! subprotocol required [MQTT-6.0.0-3], binary frames only [MQTT-6.0.0-1].

mod support;

use std::path::Path;
use std::process::Command;

use futures::{SinkExt, StreamExt};
use support::*;
use testkit::pki::pki;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn paho_ws(port: u16, scheme: &str, ca: Option<&Path>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/paho/websocket.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).args(["127.0.0.1", &port.to_string(), scheme]);
    if let Some(ca) = ca {
        cmd.arg(ca);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "paho over {scheme} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_over_websocket_in_both_versions() {
    let b = TestBroker::with(|c| c.ws = "127.0.0.1:0".into()).await;
    let port = b.ws.expect("WebSocket listener").port();
    let out = tokio::task::spawn_blocking(move || paho_ws(port, "ws", None)).await.unwrap();
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_over_secure_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let (cert, key) = (p.server_cert.display().to_string(), p.server_key.display().to_string());
    let b = TestBroker::with(move |c| {
        c.wss = "127.0.0.1:0".into();
        c.tls_cert = cert;
        c.tls_key = key;
    })
    .await;
    let port = b.wss.expect("secure WebSocket listener").port();
    let out = tokio::task::spawn_blocking(move || paho_ws(port, "wss", Some(&p.ca))).await.unwrap();
    assert!(out.trim_end().ends_with("ok"), "{out}");
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn open(addr: std::net::SocketAddr, subprotocol: Option<&str>) -> Result<Ws, String> {
    let mut request = format!("ws://{addr}/mqtt").into_client_request().unwrap();
    if let Some(p) = subprotocol {
        request.headers_mut().insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_tungstenite::client_async(request, tcp).await.map(|(ws, _)| ws).map_err(|e| e.to_string())
}

/// Reads binary frames until `n` bytes have come.
async fn read_bytes(ws: &mut Ws, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(PATIENCE, ws.next()).await.expect("bytes in time") {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            Some(Ok(_)) => {}
            other => panic!("connection ended after {got:?}: {other:?}"),
        }
    }
    got
}

/// MQTT 3.1.1 CONNECT, clean session, client id "w1".
const CONNECT: [u8; 16] = [0x10, 0x0E, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'w', b'1'];

#[tokio::test]
async fn packets_split_across_frames_and_sharing_frames_both_work_mqtt_6_0_0_2() {
    let b = TestBroker::with(|c| c.ws = "127.0.0.1:0".into()).await;
    let mut ws = open(b.ws.unwrap(), Some("mqtt")).await.unwrap();
    // One CONNECT in three frames.
    for part in [&CONNECT[..1], &CONNECT[1..7], &CONNECT[7..]] {
        ws.send(Message::Binary(part.to_vec().into())).await.unwrap();
    }
    assert_eq!(read_bytes(&mut ws, 4).await, [0x20, 0x02, 0x00, 0x00]);
    // SUBSCRIBE w/t (QoS 0) and a PUBLISH to it in one frame.
    let mut frame = vec![0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'w', b'/', b't', 0x00];
    frame.extend_from_slice(&[0x30, 0x07, 0x00, 0x03, b'w', b'/', b't', b'h', b'i']);
    ws.send(Message::Binary(frame.into())).await.unwrap();
    let got = read_bytes(&mut ws, 5 + 9).await;
    assert_eq!(&got[..5], [0x90, 0x03, 0x00, 0x01, 0x00], "SUBACK");
    assert_eq!(&got[5..], [0x30, 0x07, 0x00, 0x03, b'w', b'/', b't', b'h', b'i'], "the message, delivered");
}

#[tokio::test]
async fn an_upgrade_without_the_mqtt_subprotocol_is_refused_mqtt_6_0_0_3() {
    let b = TestBroker::with(|c| c.ws = "127.0.0.1:0".into()).await;
    let err = open(b.ws.unwrap(), None).await.unwrap_err();
    assert!(err.contains("400"), "{err}");
    let err = open(b.ws.unwrap(), Some("chat")).await.unwrap_err();
    assert!(err.contains("400"), "{err}");
    // Offered among others, it is chosen.
    assert!(open(b.ws.unwrap(), Some("chat, mqtt")).await.is_ok());
}

#[tokio::test]
async fn a_text_frame_ends_the_connection_mqtt_6_0_0_1() {
    let b = TestBroker::with(|c| c.ws = "127.0.0.1:0".into()).await;
    let mut ws = open(b.ws.unwrap(), Some("mqtt")).await.unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => panic!("answered a text frame with {b:?}"),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open after a text frame");
    // The listener still serves.
    assert!(open(b.ws.unwrap(), Some("mqtt")).await.is_ok());
}
