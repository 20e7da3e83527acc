//! Client certificates as identities (CN or SAN → username and client id, fed to the ACL),
//! certificates refused for their names (BAD-INPUT 71), their dates, their issuer or a
//! revocation list, and server certificates rotated while clients stay connected.

mod support;

use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use mqfleet_codec::{decode_packet, ConnAck, Connect, Packet, Protocol, ReasonCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::*;
use testkit::pki::{pki, Ca, ClientCert, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// An MQTT client over TLS speaking through our codec.
struct TlsMqtt {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    protocol: Protocol,
}

impl TlsMqtt {
    /// Handshakes trusting `ca_pem`, presenting `client` (certificate, key) if given, and
    /// sends `connect`. `Err` when the TLS layer refuses or the connection closes first.
    async fn session(
        addr: std::net::SocketAddr,
        ca_pem: &Path,
        client: Option<(&Path, &Path)>,
        connect: Connect,
    ) -> Result<(TlsMqtt, ConnAck), String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(vec![CertificateDer::from_pem_file(cert).unwrap()], PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let stream = tokio::time::timeout(PATIENCE, connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| format!("handshake: {e}"))?;
        let mut c = TlsMqtt { stream, buf: BytesMut::new(), protocol: connect.protocol };
        c.send(Packet::Connect(Box::new(connect))).await?;
        match c.recv().await? {
            Packet::ConnAck(a) => Ok((c, a)),
            other => Err(format!("expected CONNACK, got {other:?}")),
        }
    }

    async fn send(&mut self, p: Packet) -> Result<(), String> {
        let mut b = BytesMut::new();
        p.encode(self.protocol, &mut b).unwrap();
        self.stream.write_all(&b).await.map_err(|e| e.to_string())?;
        self.stream.flush().await.map_err(|e| e.to_string())
    }

    async fn recv(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(p) = decode_packet(&mut self.buf, self.protocol, usize::MAX).map_err(|e| e.to_string())? {
                return Ok(p);
            }
            match tokio::time::timeout(PATIENCE, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err("nothing received in time".into()),
                Ok(Ok(0)) => return Err("closed".into()),
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// A TLS broker asking for client certificates, with `tweak` applied.
async fn broker(p: &Pki, tweak: impl FnOnce(&mut proxy::config::Config)) -> TestBroker {
    let (cert, key, ca) = (p.server_cert.display().to_string(), p.server_key.display().to_string(), p.ca.display().to_string());
    TestBroker::with(move |c| {
        c.mqtts = "127.0.0.1:0".into();
        c.tls_cert = cert;
        c.tls_key = key;
        c.tls_client_ca = ca;
        c.tls_client_auth = "required".into();
        tweak(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_the_client_for_authentication_and_the_acl() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let acl = dir.path().join("acl.toml");
    let rules = concat!(
        "[[rule]]\npermission = \"allow\"\naction = \"all\"\nusername = \"ops\"\ntopics = [\"#\"]\n",
        "[[rule]]\npermission = \"allow\"\naction = \"all\"\ntopics = [\"devices/%cn/#\", \"by-id/%c/#\", \"by-user/%u/#\"]\n",
    );
    std::fs::write(&acl, rules).unwrap();
    let acl = acl.display().to_string();
    let b = broker(&p, |c| {
        c.tls_identity = "cn".into();
        c.tls_identity_as = "both".into();
        c.allow_anonymous = "false".into();
        c.acl_file = acl;
    })
    .await;
    let tls = b.tls.unwrap();

    // The certificate's CN replaces the client id the device chose; a 5.0 client is told.
    let (_c, ack) =
        TlsMqtt::session(tls, &p.ca, Some((&p.client_cert, &p.client_key)), Connect::new(Protocol::V5, "chosen-by-device")).await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
    assert_eq!(ack.properties.assigned_client_identifier.as_deref(), Some("device-1"));
    drop(_c);
    eventually("the first device-1 connection to end", || b.context().registry.owner("device-1").is_none()).await;

    // mosquitto clients with certificates: device-1 subscribes where %cn, %c and %u allow it;
    // ops (its own certificate, its own rule) publishes.
    let (ops_cert, ops_key) =
        p.authority.client(dir.path(), "ops", &ClientCert { common_name: Some("ops"), serial: 7, ..ClientCert::default() });
    let port = tls.port().to_string();
    let args = |cert: &Path, key: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> =
            vec!["-h".into(), "localhost".into(), "-p".into(), port.clone(), "--cafile".into(), p.ca.display().to_string()];
        a.extend(["--cert".into(), cert.display().to_string(), "--key".into(), key.display().to_string()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let topics = ["devices/device-1/cmd", "by-id/device-1/cmd", "by-user/device-1/cmd"];
    let mut sub_args = args(&p.client_cert, &p.client_key, &["-V", "mqttv5", "-q", "1", "-C", "3", "-W", "10", "-v"]);
    for t in topics {
        sub_args.extend(["-t".into(), t.into()]);
    }
    let sub = std::process::Command::new(tool("mosquitto_sub")).args(&sub_args).stdout(std::process::Stdio::piped()).spawn().unwrap();
    eventually("device-1 to subscribe", || b.context().registry.owner("device-1").is_some()).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for t in topics {
        let out = std::process::Command::new(tool("mosquitto_pub"))
            .args(args(&ops_cert, &ops_key, &["-t", t, "-m", "go", "-q", "1"]))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let out = sub.wait_with_output().unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    for t in topics {
        assert!(got.contains(&format!("{t} go")), "{t} missing from {got}");
    }
    // Another device's topics are not device-1's: mosquitto_sub reports the refusal.
    let denied = std::process::Command::new(tool("mosquitto_sub"))
        .args(args(&p.client_cert, &p.client_key, &["-V", "mqttv5", "-t", "devices/device-2/cmd", "-C", "1", "-W", "5"]))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&denied.stderr).contains("denied"), "{denied:?}");

    // paho-mqtt over TLS with the same certificate, told its id in CONNACK.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/paho/mtls.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(["127.0.0.1", &tls.port().to_string()])
        .args([&p.ca, &p.client_cert, &p.client_key])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("assigned device-1") && stdout.contains("received over mtls"), "{stdout}");

    // Without a certificate-named identity nothing gets in: anonymous is off.
    let (_raw, ack) = Raw::session(b.addr, Connect::new(Protocol::V5, "anon")).await;
    assert_eq!(ack.reason, ReasonCode::NotAuthorized);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_whose_name_is_a_wildcard_or_missing_are_refused_bad_input_71() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let b_cn = broker(&p, |c| c.tls_identity = "cn".into()).await;
    let b_san = broker(&p, |c| c.tls_identity = "san".into()).await;
    let ca = &p.authority;
    let cases = [
        (&b_cn, ClientCert { common_name: Some("*.fleet.example"), serial: 10, ..ClientCert::default() }),
        (&b_cn, ClientCert { common_name: Some("dev+1"), serial: 11, ..ClientCert::default() }),
        (&b_cn, ClientCert { common_name: Some("fleet/#"), serial: 12, ..ClientCert::default() }),
        (&b_cn, ClientCert { common_name: None, dns_names: &["dev-1.fleet"], serial: 13, ..ClientCert::default() }),
        (&b_san, ClientCert { common_name: Some("dev-1"), dns_names: &["*.fleet.example"], serial: 14, ..ClientCert::default() }),
        (&b_san, ClientCert { common_name: Some("dev-1"), serial: 15, ..ClientCert::default() }),
    ];
    for (i, (b, cert)) in cases.iter().enumerate() {
        let (c, k) = ca.client(dir.path(), &format!("bad-{i}"), cert);
        for protocol in [Protocol::V5, Protocol::V3_1_1] {
            let (_s, ack) = TlsMqtt::session(b.tls.unwrap(), &p.ca, Some((&c, &k)), Connect::new(protocol, "x")).await.unwrap();
            assert_eq!(ack.reason, ReasonCode::NotAuthorized, "{cert:?} over {protocol:?}");
        }
    }
    assert_eq!(metric(&b_cn, "mqfleet_proxy_auth_failures_total{reason=\"certificate_identity\"}").await, 8);
    // A good SAN gets in.
    let (c, k) = ca.client(
        dir.path(),
        "good-san",
        &ClientCert { common_name: None, dns_names: &["dev-9.fleet"], serial: 16, ..ClientCert::default() },
    );
    let (_s, ack) = TlsMqtt::session(b_san.tls.unwrap(), &p.ca, Some((&c, &k)), Connect::new(Protocol::V5, "x")).await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_foreign_and_revoked_client_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let crl = dir.path().join("revoked.crl.pem");
    p.authority.crl(&crl, &[66]);
    let crl_path = crl.display().to_string();
    let b = broker(&p, |c| c.tls_crl = crl_path).await;
    let tls = b.tls.unwrap();
    let issue = |stem: &str, serial: u64, expired: bool| {
        p.authority.client(dir.path(), stem, &ClientCert { common_name: Some(stem), serial, expired, ..ClientCert::default() })
    };
    let valid = issue("valid", 65, false);
    let revoked = issue("revoked", 66, false);
    let expired = issue("expired", 67, true);
    let other_ca = Ca::new("someone else's CA");
    let foreign = other_ca.client(dir.path(), "foreign", &ClientCert { common_name: Some("foreign"), serial: 65, ..ClientCert::default() });

    let attempt = |(c, k): &(std::path::PathBuf, std::path::PathBuf)| {
        let (c, k, ca) = (c.clone(), k.clone(), p.ca.clone());
        async move { TlsMqtt::session(tls, &ca, Some((&c, &k)), Connect::new(Protocol::V3_1_1, "x")).await.map(|(_, ack)| ack.reason) }
    };
    assert_eq!(attempt(&valid).await, Ok(ReasonCode::Success));
    for (what, cert) in [("revoked", &revoked), ("expired", &expired), ("foreign", &foreign)] {
        let got = attempt(cert).await;
        assert!(got.is_err(), "a {what} certificate got {got:?}");
    }
    assert!(metric(&b, "mqfleet_proxy_disconnects_total{reason=\"tls_handshake\"}").await >= 3);

    // A CRL file that is not one is a configuration error naming it.
    std::fs::write(&crl, "not a crl").unwrap();
    let mut c = config();
    c.mqtts = "127.0.0.1:0".into();
    c.tls_cert = p.server_cert.display().to_string();
    c.tls_key = p.server_key.display().to_string();
    c.tls_client_ca = p.ca.display().to_string();
    c.tls_client_auth = "required".into();
    c.tls_crl = crl.display().to_string();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("tls_crl") && e.contains("revoked.crl.pem"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_served_to_new_clients_while_connected_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let b = broker(&p, |c| {
        c.tls_client_auth = "none".into();
        c.tls_reload_ms = 100;
    })
    .await;
    let tls = b.tls.unwrap();
    let client = None;
    let (mut connected, _) = TlsMqtt::session(tls, &p.ca, client, Connect::new(Protocol::V5, "before")).await.unwrap();

    // cert-manager renews with a new CA: the files change in place.
    let next_ca = Ca::new("next CA");
    let next_ca_file = dir.path().join("next-ca.pem");
    std::fs::write(&next_ca_file, &next_ca.cert_pem).unwrap();
    let (cert, key) = next_ca.server(&["localhost"]);
    std::fs::write(&p.server_key, key).unwrap();
    std::fs::write(&p.server_cert, cert).unwrap();
    let mut rotated = false;
    for _ in 0..100 {
        if TlsMqtt::session(tls, &next_ca_file, None, Connect::new(Protocol::V5, "after")).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(rotated, "the new certificate was never served");
    assert!(
        TlsMqtt::session(tls, &p.ca, None, Connect::new(Protocol::V5, "old-trust")).await.is_err(),
        "the old certificate is still served"
    );
    connected.send(Packet::PingReq).await.unwrap();
    assert_eq!(connected.recv().await, Ok(Packet::PingResp), "the connection from before the rotation is still served");

    // Half-written files keep the current certificate.
    std::fs::write(&p.server_cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    assert!(!b.reload().is_empty(), "the broken file is reported");
    let (_c, ack) = TlsMqtt::session(tls, &next_ca_file, None, Connect::new(Protocol::V5, "still")).await.unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
}
