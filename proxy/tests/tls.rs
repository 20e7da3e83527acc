//! MQTT over TLS: the mosquitto tools as real TLS clients, client certificates required, a
//! ClientHello split into one-byte writes (BAD-INPUT A7), plain MQTT on the TLS port, and
//! configuration errors that name the file.

mod support;

use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use support::*;
use testkit::pki::{pki, Pki};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

async fn tls_broker(dir: &std::path::Path, client_auth: &str) -> (TestBroker, Pki) {
    let p = pki(dir);
    let (cert, key, ca) = (p.server_cert.display().to_string(), p.server_key.display().to_string(), p.ca.display().to_string());
    let auth = client_auth.to_string();
    let b = TestBroker::with(move |c| {
        c.mqtts = "127.0.0.1:0".into();
        c.tls_cert = cert;
        c.tls_key = key;
        c.tls_client_auth = auth;
        c.tls_client_ca = ca;
    })
    .await;
    (b, p)
}

/// `mosquitto_pub`/`mosquitto_sub` arguments for a TLS connection to `port` (host name
/// `localhost`, which the server certificate names).
fn tls_args(port: u16, p: &Pki, with_client_cert: bool) -> Vec<String> {
    let mut args = vec!["-h".into(), "localhost".into(), "-p".into(), port.to_string(), "--cafile".into(), p.ca.display().to_string()];
    if with_client_cert {
        args.extend(["--cert".into(), p.client_cert.display().to_string(), "--key".into(), p.client_key.display().to_string()]);
    }
    args
}

/// Subscribes with `mosquitto_sub` over TLS, publishes one message with `mosquitto_pub`, and
/// returns what the subscriber printed (or why the publisher failed).
fn round_trip(port: u16, p: &Pki, version: &str, with_client_cert: bool) -> Result<String, String> {
    let args = tls_args(port, p, with_client_cert);
    let sub = Command::new(tool("mosquitto_sub"))
        .args(&args)
        .args(["-V", version, "-t", "secure/t", "-q", "1", "-C", "1", "-W", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let publish = Command::new(tool("mosquitto_pub"))
        .args(&args)
        .args(["-V", version, "-t", "secure/t", "-m", "over tls", "-q", "1"])
        .output()
        .unwrap();
    let out = sub.wait_with_output().unwrap();
    if !publish.status.success() {
        return Err(String::from_utf8_lossy(&publish.stderr).to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_over_tls_in_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (b, p) = tls_broker(dir.path(), "none").await;
    let port = b.tls.expect("TLS listener").port();
    for version in ["mqttv311", "mqttv5"] {
        let p = p.clone();
        let got = tokio::task::spawn_blocking(move || round_trip(port, &p, version, false)).await.unwrap();
        assert_eq!(got.as_deref(), Ok("over tls"), "{version}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_keep_out_clients_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let (b, p) = tls_broker(dir.path(), "required").await;
    let port = b.tls.unwrap().port();
    let without = p.clone();
    let refused = tokio::task::spawn_blocking(move || round_trip(port, &without, "mqttv311", false)).await.unwrap();
    assert!(refused.is_err(), "a client without a certificate got in: {refused:?}");
    let got = tokio::task::spawn_blocking(move || round_trip(port, &p, "mqttv311", true)).await.unwrap();
    assert_eq!(got.as_deref(), Ok("over tls"));
    let (_, metrics) = b.http_get("/metrics").await;
    assert!(metrics.contains(r#"reason="tls_handshake""#), "{metrics}");
}

/// Passes on at most one byte per write: every TLS record the client sends arrives split.
struct OneByteWrites(TcpStream);

impl AsyncRead for OneByteWrites {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for OneByteWrites {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(1);
        Pin::new(&mut self.0).poll_write(cx, &buf[..n])
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// MQTT 3.1.1 CONNECT, clean session, client id "a1".
const CONNECT: [u8; 16] = [0x10, 0x0E, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'a', b'1'];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_split_at_every_byte_still_connects_bad_input_a7() {
    let dir = tempfile::tempdir().unwrap();
    let (b, p) = tls_broker(dir.path(), "none").await;
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(&p.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(b.tls.unwrap()).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio::time::timeout(PATIENCE, connector.connect(name, OneByteWrites(tcp))).await.unwrap().expect("handshake");
    tls.write_all(&CONNECT).await.unwrap();
    tls.flush().await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(PATIENCE, tls.read_exact(&mut connack)).await.unwrap().unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mqtt_on_the_tls_port_is_dropped_and_the_listener_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (b, p) = tls_broker(dir.path(), "none").await;
    let mut plain = TcpStream::connect(b.tls.unwrap()).await.unwrap();
    plain.write_all(&CONNECT).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, plain.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert!(!buf[..n].starts_with(&[0x20]), "no CONNACK for plain MQTT on the TLS port");
    let port = b.tls.unwrap().port();
    let got = tokio::task::spawn_blocking(move || round_trip(port, &p, "mqttv5", false)).await.unwrap();
    assert_eq!(got.as_deref(), Ok("over tls"));
}

#[test]
fn tls_settings_are_checked_with_the_files_named() {
    let mut c = config();
    c.mqtts = "127.0.0.1:0".into();
    let e = c.clone().validate().unwrap_err().to_string();
    assert!(e.contains("tls_cert") && e.contains("tls_key"), "{e}");

    c.tls_cert = "/nonexistent/server.pem".into();
    c.tls_key = "/nonexistent/server.key".into();
    let e = c.clone().validate().unwrap_err().to_string();
    assert!(e.contains("/nonexistent/server.pem"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    c.tls_cert = p.server_cert.display().to_string();
    c.tls_key = p.client_key.display().to_string(); // the wrong key
    let e = c.clone().validate().unwrap_err().to_string();
    assert!(e.contains("tls_key") && e.contains("does not fit"), "{e}");

    c.tls_key = p.server_key.display().to_string();
    c.tls_client_auth = "required".into();
    let e = c.clone().validate().unwrap_err().to_string();
    assert!(e.contains("tls_client_ca"), "{e}");

    c.tls_client_ca = p.ca.display().to_string();
    assert!(c.validate().is_ok());
}
