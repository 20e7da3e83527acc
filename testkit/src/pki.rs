//! A throw-away PKI for TLS tests: a CA, a server certificate for `localhost` and 127.0.0.1,
//! and a client certificate (CN `device-1`) signed by it, written as PEM files; more client
//! certificates (any names, expired) and revocation lists on demand.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DistinguishedName, DnType, IsCa,
    Issuer, KeyIdMethod, KeyPair, RevokedCertParams, SanType, SerialNumber,
};

#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Issues further certificates from the same CA.
    pub authority: Ca,
}

/// A certificate authority kept in memory.
#[derive(Debug, Clone)]
pub struct Ca {
    params: CertificateParams,
    key_pem: String,
    pub cert_pem: String,
}

/// What a client certificate says.
#[derive(Debug, Clone, Default)]
pub struct ClientCert<'a> {
    pub common_name: Option<&'a str>,
    /// DNS subject alternative names.
    pub dns_names: &'a [&'a str],
    pub serial: u64,
    /// Valid only in 2000.
    pub expired: bool,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = CertifiedIssuer::self_signed(params.clone(), KeyPair::from_pem(&key.serialize_pem()).unwrap()).unwrap();
        Ca { params, key_pem: key.serialize_pem(), cert_pem: cert.pem() }
    }

    fn issuer(&self) -> Issuer<'_, KeyPair> {
        Issuer::from_params(&self.params, KeyPair::from_pem(&self.key_pem).unwrap())
    }

    /// Issues a server certificate for `names`; returns (certificate PEM, key PEM).
    pub fn server(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        (params.signed_by(&key, &self.issuer()).unwrap().pem(), key.serialize_pem())
    }

    /// Issues a client certificate into `dir/{stem}.pem` and `dir/{stem}.key`.
    pub fn client(&self, dir: &Path, stem: &str, c: &ClientCert<'_>) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = c.common_name {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = c.dns_names.iter().map(|n| SanType::DnsName(n.to_string().try_into().unwrap())).collect();
        params.serial_number = Some(SerialNumber::from(c.serial));
        if c.expired {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2000, 12, 31);
        }
        let cert = params.signed_by(&key, &self.issuer()).unwrap();
        let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// Writes a revocation list of these serial numbers to `path`.
    pub fn crl(&self, path: &Path, revoked: &[u64]) {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2020, 1, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: date_time_ymd(2020, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        std::fs::write(path, params.signed_by(&self.issuer()).unwrap().pem().unwrap()).unwrap();
    }
}

/// Writes the files into `dir`.
pub fn pki(dir: &Path) -> Pki {
    let ca = Ca::new("mqfleet test CA");
    let (server_cert, server_key) = ca.server(&["localhost", "127.0.0.1"]);
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let (client_cert, client_key) =
        ca.client(dir, "client", &ClientCert { common_name: Some("device-1"), serial: 1, ..ClientCert::default() });
    Pki {
        ca: write("ca.pem", &ca.cert_pem),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert,
        client_key,
        authority: ca,
    }
}
