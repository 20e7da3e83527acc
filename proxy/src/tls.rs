//! TLS for the MQTT listener: certificate chain and key from PEM files, TLS 1.2 and 1.3 with
//! rustls' default suites (modern AEAD suites only, no renegotiation, no compression), client
//! certificates none, optional or required, verified against a CA bundle.
//!
//! Everything is checked when the configuration is: a missing file, a file without a
//! certificate or key, or a key that does not match the certificate is a configuration error
//! naming the file, not a failure at the first handshake.
//!
//! # Reload
//! Certificates are rotated (cert-manager renews them, Kubernetes swaps the Secret's files)
//! without a restart: [`TlsReloader`] rebuilds the configuration on SIGHUP and when a file's
//! modification time changes. Handshakes take the configuration current when they start;
//! established connections are not touched. A rebuild that fails (half-written files, a key
//! that does not fit yet) keeps the previous configuration and is logged.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

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
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// PEM certificate revocation lists for client certificates.
    pub crl: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref(), self.crl.as_ref()].into_iter().flatten().map(PathBuf::as_path)
    }

    /// Modification times of the files, to notice a change.
    fn stamps(&self) -> Vec<Option<SystemTime>> {
        self.paths().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
    }
}

/// A TLS configuration that follows its files.
#[derive(Debug)]
pub struct TlsReloader {
    files: TlsFiles,
    current: parking_lot::RwLock<(Arc<ServerConfig>, Vec<Option<SystemTime>>)>,
}

impl TlsReloader {
    /// Builds the first configuration; errors are configuration errors.
    pub fn new(files: TlsFiles) -> Result<TlsReloader, TlsError> {
        let stamps = files.stamps();
        let config = server_config(&files)?;
        Ok(TlsReloader { files, current: parking_lot::RwLock::new((config, stamps)) })
    }

    /// The configuration for a handshake starting now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().0.clone())
    }

    /// Rebuilds from the files. `Ok(false)` when `only_if_changed` and nothing changed.
    pub fn reload(&self, only_if_changed: bool) -> Result<bool, TlsError> {
        let stamps = self.files.stamps();
        if only_if_changed && self.current.read().1 == stamps {
            return Ok(false);
        }
        let built = server_config(&self.files);
        let mut current = self.current.write();
        // Remember the stamps even on failure: a broken file is reported once, not every poll.
        current.1 = stamps;
        current.0 = built?;
        Ok(true)
    }
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
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("tls_cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| err("tls_key", format!("{}: cannot read a PEM private key: {e}", files.key.display())))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("tls_cert", format!("TLS versions: {e}")))?;
    let builder = match (files.client_auth, &files.client_ca) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => return Err(err("tls_client_ca", "client certificates are asked for (tls_client_auth) but no CA bundle is set")),
        (auth, Some(ca)) => builder.with_client_cert_verifier(client_verifier(ca, files.crl.as_deref(), auth, provider)?),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| err("tls_key", format!("{} does not fit the certificate in {}: {e}", files.key.display(), files.cert.display())))?;
    Ok(Arc::new(config))
}

fn client_verifier(
    ca: &Path,
    crl: Option<&Path>,
    auth: ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("tls_client_ca", ca)? {
        roots.add(cert).map_err(|e| err("tls_client_ca", format!("{}: not a usable CA certificate: {e}", ca.display())))?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if let Some(crl) = crl {
        let crls = CertificateRevocationListDer::pem_file_iter(crl)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| err("tls_crl", format!("{}: cannot read revocation lists: {e}", crl.display())))?;
        if crls.is_empty() {
            return Err(err("tls_crl", format!("{}: no PEM revocation list (X509 CRL) in it", crl.display())));
        }
        builder = builder.with_crls(crls);
    }
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
            cert: "/nonexistent/server.pem".into(),
            key: "/nonexistent/server.key".into(),
            client_ca: None,
            crl: None,
            client_auth: ClientAuth::None,
        };
        let e = server_config(&files).unwrap_err();
        assert_eq!(e.key, "tls_cert");
        assert!(e.message.contains("/nonexistent/server.pem"), "{}", e.message);
    }
}
