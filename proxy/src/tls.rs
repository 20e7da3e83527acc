//! TLS for the MQTT listener: certificate chain and key from PEM files, TLS 1.2 and 1.3 with
//! rustls' default suites (modern AEAD suites only, no renegotiation, no compression), client
//! certificates none, optional or required, verified against a CA bundle.
//!
//! Everything is checked when the configuration is: a missing file, a file without a
//! certificate or key, or a key that does not match the certificate is a configuration error
//! naming the file, not a failure at the first handshake.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Whether clients present certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    /// Verified when presented; clients without one are let in (and authenticate otherwise).
    Optional,
    Required,
}

impl FromStr for ClientAuth {
    type Err = String;
    fn from_str(s: &str) -> Result<ClientAuth, String> {
        match s {
            "none" => Ok(ClientAuth::None),
            "optional" => Ok(ClientAuth::Optional),
            "required" => Ok(ClientAuth::Required),
            other => Err(format!("{other:?} is not none, optional or required")),
        }
    }
}

/// The files a TLS listener is made of.
pub struct TlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: Option<&'a Path>,
    pub client_auth: ClientAuth,
}

/// Why a TLS configuration cannot be built; `key` is the setting to fix.
#[derive(Debug, PartialEq, Eq)]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn err(key: &'static str, message: impl Into<String>) -> TlsError {
    TlsError { key, message: message.into() }
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(key, format!("{}: cannot read certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(key, format!("{}: no PEM certificate in it", path.display())));
    }
    Ok(certs)
}

/// Builds the listener's TLS configuration from its files.
pub fn server_config(files: &TlsFiles<'_>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("tls_cert", files.cert)?;
    let key = PrivateKeyDer::from_pem_file(files.key)
        .map_err(|e| err("tls_key", format!("{}: cannot read a PEM private key: {e}", files.key.display())))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("tls_cert", format!("TLS versions: {e}")))?;
    let builder = match (files.client_auth, files.client_ca) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => return Err(err("tls_client_ca", "client certificates are asked for (tls_client_auth) but no CA bundle is set")),
        (auth, Some(ca)) => builder.with_client_cert_verifier(client_verifier(ca, auth, provider)?),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| err("tls_key", format!("{} does not fit the certificate in {}: {e}", files.key.display(), files.cert.display())))?;
    Ok(Arc::new(config))
}

fn client_verifier(
    ca: &Path,
    auth: ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("tls_client_ca", ca)? {
        roots.add(cert).map_err(|e| err("tls_client_ca", format!("{}: not a usable CA certificate: {e}", ca.display())))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if auth == ClientAuth::Optional { builder.allow_unauthenticated() } else { builder };
    builder.build().map_err(|e| err("tls_client_ca", format!("{}: {e}", ca.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_auth_modes_parse_and_others_are_named() {
        assert_eq!("required".parse::<ClientAuth>(), Ok(ClientAuth::Required));
        assert!("always".parse::<ClientAuth>().unwrap_err().contains("\"always\""));
    }

    #[test]
    fn missing_files_are_named_with_their_setting() {
        let files = TlsFiles {
            cert: Path::new("/nonexistent/server.pem"),
            key: Path::new("/nonexistent/server.key"),
            client_ca: None,
            client_auth: ClientAuth::None,
        };
        let e = server_config(&files).unwrap_err();
        assert_eq!(e.key, "tls_cert");
        assert!(e.message.contains("/nonexistent/server.pem"), "{}", e.message);
    }
}
