//! The identity a verified client certificate carries: its subject common name or first
//! subject alternative name. The TLS layer has already checked the chain against the client
//! CA bundle (and CRLs); this only reads names.
//!
//! A name that is not valid UTF-8, is empty, or contains a wildcard (`*`, `+`, `#`) or a
//! control character is refused (BAD-INPUT 71): it would otherwise become a client id or
//! username that ACL placeholders and topic filters treat as a pattern.

use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Which certificate field names the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// Certificates do not name clients (they may still be required to connect).
    None,
    CommonName,
    /// The first DNS name, e-mail address or URI among the subject alternative names.
    SubjectAltName,
}

impl FromStr for IdentitySource {
    type Err = String;
    fn from_str(s: &str) -> Result<IdentitySource, String> {
        match s {
            "none" => Ok(IdentitySource::None),
            "cn" => Ok(IdentitySource::CommonName),
            "san" => Ok(IdentitySource::SubjectAltName),
            other => Err(format!("{other:?} is not none, cn or san")),
        }
    }
}

/// What the certificate identity becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityUse {
    pub username: bool,
    pub client_id: bool,
}

impl FromStr for IdentityUse {
    type Err = String;
    fn from_str(s: &str) -> Result<IdentityUse, String> {
        match s {
            "username" => Ok(IdentityUse { username: true, client_id: false }),
            "client_id" => Ok(IdentityUse { username: false, client_id: true }),
            "both" => Ok(IdentityUse { username: true, client_id: true }),
            other => Err(format!("{other:?} is not username, client_id or both")),
        }
    }
}

/// Names read from a client certificate; each `Err` says why that name is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertNames {
    pub common_name: Result<String, String>,
    pub alt_name: Result<String, String>,
}

impl CertNames {
    /// Reads the leaf certificate (DER).
    pub fn read(der: &[u8]) -> Result<CertNames, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable client certificate: {e}"))?;
        let common_name = match cert.subject().iter_common_name().next() {
            None => Err("the certificate subject has no common name".to_string()),
            Some(cn) => cn.as_str().map_err(|_| "the certificate common name is not a UTF-8 string".to_string()).and_then(checked),
        };
        let alt_name = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .find_map(|n| match n {
                    GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => Some(checked(s)),
                    _ => None,
                })
                .unwrap_or_else(|| Err("the certificate has no DNS, e-mail or URI alternative name".into())),
            Ok(None) => Err("the certificate has no subject alternative name".into()),
            Err(e) => Err(format!("unreadable subject alternative name: {e}")),
        };
        Ok(CertNames { common_name, alt_name })
    }

    /// The identity by `source`; `Ok(None)` when certificates do not name clients.
    pub fn identity(&self, source: IdentitySource) -> Result<Option<&str>, &str> {
        match source {
            IdentitySource::None => Ok(None),
            IdentitySource::CommonName => self.common_name.as_deref().map(Some).map_err(String::as_str),
            IdentitySource::SubjectAltName => self.alt_name.as_deref().map(Some).map_err(String::as_str),
        }
    }
}

fn checked(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("the certificate name is empty".into());
    }
    if name.contains(['*', '+', '#']) || name.chars().any(char::is_control) {
        return Err(format!("the certificate name {name:?} contains a wildcard or a control character"));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_and_empty_names_are_refused() {
        assert_eq!(checked("dev-1.fleet"), Ok("dev-1.fleet".into()));
        for bad in ["*.fleet", "dev/+", "#", "", "a\u{0}b"] {
            assert!(checked(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn settings_parse() {
        assert_eq!("san".parse(), Ok(IdentitySource::SubjectAltName));
        assert_eq!("both".parse(), Ok(IdentityUse { username: true, client_id: true }));
        assert!("subject".parse::<IdentitySource>().is_err());
    }
}
