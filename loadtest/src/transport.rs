//! Byte streams to the broker: TCP, TLS (with client certificates), WebSocket and secure
//! WebSocket (subprotocol `mqtt`), optionally from a chosen source address.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::io::{CopyToBytes, SinkWriter, StreamReader};

/// How to reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Tcp,
    Tls,
    Ws,
    Wss,
}

/// One broker address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// WebSocket path.
    pub path: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scheme {
            Scheme::Tcp => write!(f, "{}:{}", self.host, self.port),
            Scheme::Tls => write!(f, "mqtts://{}:{}", self.host, self.port),
            Scheme::Ws => write!(f, "ws://{}:{}{}", self.host, self.port, self.path),
            Scheme::Wss => write!(f, "wss://{}:{}{}", self.host, self.port, self.path),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `host:port` (TCP), `mqtt://host:port`, `mqtts://host:port`, `ws://host:port/path`,
    /// `wss://host:port/path`.
    fn from_str(s: &str) -> Result<Target, String> {
        let (scheme, rest) = match s.split_once("://") {
            None => (Scheme::Tcp, s),
            Some(("mqtt" | "tcp", r)) => (Scheme::Tcp, r),
            Some(("mqtts" | "ssl" | "tls", r)) => (Scheme::Tls, r),
            Some(("ws", r)) => (Scheme::Ws, r),
            Some(("wss", r)) => (Scheme::Wss, r),
            Some((other, _)) => return Err(format!("{s:?}: unknown scheme {other:?} (use mqtt, mqtts, ws or wss)")),
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/mqtt".to_string()),
        };
        let (host, port) = hostport.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected host:port"))?;
        let port = port.parse().map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err(format!("{s:?}: empty host"));
        }
        Ok(Target { scheme, host, port, path })
    }
}

/// TLS settings for `mqtts://` and `wss://` targets.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM CA certificates to trust; without, certificates are not verified (`--insecure`
    /// must then be given).
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: bool,
}

impl TlsFiles {
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match (&self.ca, self.insecure) {
            (Some(ca), _) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
                    roots.add(c.map_err(|e| format!("{}: {e}", ca.display()))?).map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                builder.with_root_certificates(roots)
            }
            (None, true) => builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))),
            (None, false) => return Err("TLS target without --ca: give the CA file, or --insecure to skip verification".into()),
        };
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| format!("{}: {e}", cert.display()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("{}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("--cert and --key go together".into()),
        };
        Ok(Arc::new(config))
    }
}

/// Accepts any server certificate (`--insecure`).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// Opens a stream to `target`, from `source` if given.
pub async fn connect(
    target: &Target,
    tls: Option<&Arc<rustls::ClientConfig>>,
    source: Option<IpAddr>,
) -> std::io::Result<(Reader, Writer)> {
    let addr: SocketAddr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{} does not resolve", target.host)))?;
    let tcp = match source {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    // Latency matters more than packet count here, as on the broker side.
    tcp.set_nodelay(true)?;
    let secure = matches!(target.scheme, Scheme::Tls | Scheme::Wss);
    let tls_config = || tls.cloned().ok_or_else(|| std::io::Error::other("TLS target but no TLS configuration"));
    match target.scheme {
        Scheme::Tcp => {
            let (r, w) = tcp.into_split();
            Ok((Box::pin(r), Box::pin(w)))
        }
        Scheme::Tls => {
            let stream = tls_handshake(tcp, &target.host, tls_config()?).await?;
            let (r, w) = tokio::io::split(stream);
            Ok((Box::pin(r), Box::pin(w)))
        }
        Scheme::Ws | Scheme::Wss => {
            let url = format!("{}://{}:{}{}", if secure { "wss" } else { "ws" }, target.host, target.port, target.path);
            if secure {
                let stream = tls_handshake(tcp, &target.host, tls_config()?).await?;
                websocket(stream, &url).await
            } else {
                websocket(tcp, &url).await
            }
        }
    }
}

async fn tls_handshake(
    tcp: TcpStream,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| std::io::Error::other(format!("{host}: {e}")))?;
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// MQTT over WebSocket: each write is one binary frame; frames are read as one byte stream,
/// so MQTT packets may be split across frames or share one (MQTT 5 §6).
async fn websocket<S>(stream: S, url: &str) -> std::io::Result<(Reader, Writer)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut request = url.into_client_request().map_err(std::io::Error::other)?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().expect("valid header value"));
    let (ws, response) = tokio_tungstenite::client_async(request, stream).await.map_err(std::io::Error::other)?;
    if response.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()) != Some("mqtt") {
        return Err(std::io::Error::other("server did not accept the mqtt WebSocket subprotocol"));
    }
    let (sink, stream) = ws.split();
    let reads = stream.filter_map(|m| async move {
        match m {
            Ok(Message::Binary(b)) => Some(Ok::<Bytes, std::io::Error>(b)),
            Ok(Message::Close(_)) => None,
            Ok(_) => Some(Ok(Bytes::new())),
            Err(e) => Some(Err(std::io::Error::other(e))),
        }
    });
    let writes = sink.sink_map_err(std::io::Error::other).with(|b: Bytes| async move { Ok::<_, std::io::Error>(Message::Binary(b)) });
    Ok((Box::pin(StreamReader::new(Box::pin(reads))), Box::pin(SinkWriter::new(CopyToBytes::new(Box::pin(writes))))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t: Target = "127.0.0.1:1883".parse().unwrap();
        assert_eq!((t.scheme, t.port), (Scheme::Tcp, 1883));
        let t: Target = "wss://broker.example:8084/mqtt".parse().unwrap();
        assert_eq!((t.scheme, t.host.as_str(), t.path.as_str()), (Scheme::Wss, "broker.example", "/mqtt"));
        let t: Target = "mqtts://[::1]:8883".parse().unwrap();
        assert_eq!((t.scheme, t.host.as_str()), (Scheme::Tls, "::1"));
        assert!("http://x:1".parse::<Target>().is_err());
        assert!("nohost".parse::<Target>().is_err());
    }
}
