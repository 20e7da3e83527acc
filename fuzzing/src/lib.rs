//! The bodies of mqfleet's fuzz targets, one per parser that reads untrusted bytes. Each must
//! return (never panic, never hang) on any input; where a parser also writes, what it decoded
//! must encode and decode to the same value.
//!
//! `fuzz/` runs them under libFuzzer (`cargo fuzz run TARGET`); `tests/corpus.rs` replays the
//! checked-in corpora (`fuzz/corpus/TARGET/`) in every test run, so a finding, once minimised
//! and added, stays fixed.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::BytesMut;
use mqfleet_codec::{decode_packet, Protocol};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets by name, as the corpus directories are named.
pub const TARGETS: [(&str, Target); 5] = [
    ("mqtt_decode", mqtt_decode),
    ("link_frame", link_frame),
    ("websocket", websocket),
    ("proxy_header", proxy_header),
    ("config_files", config_files),
];

/// MQTT packets in 3.1, 3.1.1 and 5.0 from a byte stream, as a connection reads them.
pub fn mqtt_decode(data: &[u8]) {
    for protocol in [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(packet)) = decode_packet(&mut buf, protocol, 1 << 20) {
            let mut out = BytesMut::new();
            if packet.encode(protocol, &mut out).is_ok() {
                let again = decode_packet(&mut out, protocol, usize::MAX);
                assert_eq!(
                    again.as_ref().ok().and_then(Option::as_ref),
                    Some(&packet),
                    "{protocol:?}: re-encoded packet decodes differently"
                );
            }
        }
    }
}

/// Proxy↔shard link frames, as a link reads them.
pub fn link_frame(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = broker_shard::link::frame::decode_next(&mut buf) {
        let mut out = BytesMut::new();
        broker_shard::link::frame::encode(&frame, &mut out);
        let again = broker_shard::link::frame::decode_next(&mut out);
        assert!(matches!(again, Ok(Some(_))), "a re-encoded frame does not decode: {again:?}");
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime"))
}

/// WebSocket frames after a valid MQTT upgrade, read as the MQTT byte stream.
pub fn websocket(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const UPGRADE: &[u8] = b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let feed = async move {
            // A client sends frames only after the 101 answer (tungstenite refuses bytes
            // pipelined behind the request, as it should).
            let _ = client.write_all(UPGRADE).await;
            let mut answer = Vec::new();
            while !answer.ends_with(b"\r\n\r\n") {
                match client.read_u8().await {
                    Ok(b) => answer.push(b),
                    Err(_) => return,
                }
            }
            assert!(answer.starts_with(b"HTTP/1.1 101"), "upgrade refused: {}", String::from_utf8_lossy(&answer));
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Drain the server's answer so it never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let serve = async {
            if let Ok((mut reader, _writer)) = proxy::websocket::accept(server, 4096).await {
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = reader.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            }
        };
        let both = async { tokio::join!(feed, serve) };
        assert!(tokio::time::timeout(Duration::from_secs(5), both).await.is_ok(), "the WebSocket reader hung");
    });
}

/// A PROXY protocol header (v1 or v2) at the start of a connection.
pub fn proxy_header(data: &[u8]) {
    let mut input = data;
    let _ = runtime().block_on(proxy::proxy_protocol::read_header(&mut input));
}

/// The password and ACL files, then ACL decisions with the parsed rules.
pub fn config_files(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = proxy::auth::password::PasswordFile::parse(text);
    if let Ok(acl) = proxy::auth::acl::Acl::parse(text) {
        use proxy::auth::acl::{Action, Subject};
        for who in
            [Subject { client_id: "dev-1", username: Some("u"), cn: Some("cn") }, Subject { client_id: "+/#", username: None, cn: None }]
        {
            for topic in ["a/b", "$SYS/x", "#", "a/+/c", "$share/g/a/#", ""] {
                let _ = acl.decide(who, Action::Publish, topic);
                let _ = acl.decide(who, Action::Subscribe, topic);
            }
        }
    }
}
