//! JSON Web Tokens as passwords: a device presents a token signed by the fleet's identity
//! service in CONNECT's password field. HS256 with a shared secret, RS256 or ES256 with the
//! issuer's public key; expiry is required, `nbf`, issuer and audience are checked when
//! configured. The token's `sub` is the username; its optional claim
//! `acl = {"pub": [...], "sub": [...]}` replaces the ACL file for that client.

use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::acl::{Acl, Action, Permission, Rule};

/// Verifies tokens with one key.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("algorithms", &self.validation.algorithms).finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    acl: Option<TokenAcl>,
}

#[derive(Deserialize)]
struct TokenAcl {
    #[serde(default, rename = "pub")]
    publish: Vec<String>,
    #[serde(default, rename = "sub")]
    subscribe: Vec<String>,
}

/// What a valid token says about its holder.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub subject: Option<String>,
    pub acl: Option<Arc<Acl>>,
}

/// Where the key comes from.
pub enum KeySource<'a> {
    /// HS256: the file's bytes (trailing newline removed) are the secret.
    Secret(&'a Path),
    /// RS256 or ES256: a PEM public key (RSA or P-256).
    PublicKey(&'a Path),
}

impl JwtVerifier {
    pub fn new(source: KeySource<'_>, issuer: Option<&str>, audience: Option<&str>) -> Result<JwtVerifier, String> {
        let (key, algorithm) = match source {
            KeySource::Secret(path) => {
                let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let secret = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
                if secret.len() < 32 {
                    return Err(format!("{}: an HS256 secret needs at least 32 bytes, this has {}", path.display(), secret.len()));
                }
                (DecodingKey::from_secret(secret), Algorithm::HS256)
            }
            KeySource::PublicKey(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                match (DecodingKey::from_rsa_pem(&pem), DecodingKey::from_ec_pem(&pem)) {
                    (Ok(k), _) => (k, Algorithm::RS256),
                    (_, Ok(k)) => (k, Algorithm::ES256),
                    (Err(e), _) => return Err(format!("{}: not a PEM RSA or EC public key: {e}", path.display())),
                }
            }
        };
        // One algorithm only: a token cannot choose how it is checked (no alg confusion).
        let mut validation = Validation::new(algorithm);
        validation.validate_nbf = true;
        validation.leeway = 30;
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            validation.set_required_spec_claims(&["exp", "iss"]);
        }
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(JwtVerifier { key, validation })
    }

    /// Does the password look like a token (three base64url parts)? Others go to other backends.
    pub fn looks_like_token(password: &[u8]) -> bool {
        password.starts_with(b"eyJ") && password.iter().filter(|b| **b == b'.').count() == 2
    }

    pub fn verify(&self, token: &str) -> Result<TokenGrant, String> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| e.to_string())?;
        let acl = data.claims.acl.map(|a| {
            let rule =
                |action, topics: Vec<String>| Rule { permission: Permission::Allow, action, topics, username: None, client_id: None };
            Arc::new(Acl::new(vec![rule(Action::Publish, a.publish), rule(Action::Subscribe, a.subscribe)]))
        });
        Ok(TokenGrant { subject: data.claims.sub, acl })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn token(claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    fn verifier(issuer: Option<&str>) -> JwtVerifier {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, SECRET).unwrap();
        JwtVerifier::new(KeySource::Secret(&path), issuer, Some("mqfleet")).unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn a_valid_token_grants_its_subject_and_topics() {
        let v = verifier(Some("idp"));
        let t = token(serde_json::json!({"sub": "dev-1", "iss": "idp", "aud": "mqfleet", "exp": now() + 60,
            "acl": {"pub": ["up/%c"], "sub": ["down/%c/#"]}}));
        assert!(JwtVerifier::looks_like_token(t.as_bytes()));
        let g = v.verify(&t).unwrap();
        assert_eq!(g.subject.as_deref(), Some("dev-1"));
        let acl = g.acl.unwrap();
        let who = super::super::acl::Subject { client_id: "c1", username: Some("dev-1"), cn: None };
        assert!(acl.allows(who, Action::Publish, "up/c1"));
        assert!(!acl.allows(who, Action::Publish, "up/c2"));
        assert!(acl.allows(who, Action::Subscribe, "down/c1/+"));
        assert!(!acl.allows(who, Action::Subscribe, "up/c1"));
    }

    #[test]
    fn expired_foreign_and_misaddressed_tokens_are_refused() {
        let v = verifier(Some("idp"));
        let expired = token(serde_json::json!({"sub": "d", "iss": "idp", "aud": "mqfleet", "exp": now() - 3600}));
        assert!(v.verify(&expired).unwrap_err().contains("Expired"), "{:?}", v.verify(&expired).err());
        let other_issuer = token(serde_json::json!({"sub": "d", "iss": "evil", "aud": "mqfleet", "exp": now() + 60}));
        assert!(v.verify(&other_issuer).is_err());
        let other_audience = token(serde_json::json!({"sub": "d", "iss": "idp", "aud": "other", "exp": now() + 60}));
        assert!(v.verify(&other_audience).is_err());
        let no_expiry = token(serde_json::json!({"sub": "d", "iss": "idp", "aud": "mqfleet"}));
        assert!(v.verify(&no_expiry).is_err());
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "d", "iss": "idp", "aud": "mqfleet", "exp": now() + 60}),
            &EncodingKey::from_secret(b"another secret of thirty-two bytes!!"),
        )
        .unwrap();
        assert!(v.verify(&forged).unwrap_err().contains("InvalidSignature"));
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    #[test]
    fn rs256_and_es256_tokens_verify_with_the_public_key_and_no_other_algorithm_does() {
        let claims = serde_json::json!({"sub": "dev-1", "exp": now() + 60});
        for (alg, key, public) in
            [(Algorithm::RS256, "jwt-rs256.key", "jwt-rs256.pub"), (Algorithm::ES256, "jwt-es256.key", "jwt-es256.pub")]
        {
            let pem = std::fs::read(fixture(key)).unwrap();
            let signing = if alg == Algorithm::RS256 { EncodingKey::from_rsa_pem(&pem) } else { EncodingKey::from_ec_pem(&pem) }.unwrap();
            let token = encode(&Header::new(alg), &claims, &signing).unwrap();
            let v = JwtVerifier::new(KeySource::PublicKey(&fixture(public)), None, None).unwrap();
            assert_eq!(v.verify(&token).unwrap().subject.as_deref(), Some("dev-1"), "{alg:?}");
            // Algorithm confusion: an HS256 token keyed with the (public) key file is refused.
            let public_bytes = std::fs::read(fixture(public)).unwrap();
            let forged = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(&public_bytes)).unwrap();
            assert!(v.verify(&forged).is_err(), "{alg:?}: HS256 accepted");
        }
        let e = JwtVerifier::new(KeySource::PublicKey(&fixture("README")), None, None).unwrap_err();
        assert!(e.contains("not a PEM RSA or EC public key"), "{e}");
    }

    #[test]
    fn short_secrets_are_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "short\n").unwrap();
        let e = JwtVerifier::new(KeySource::Secret(&path), None, None).unwrap_err();
        assert!(e.contains("at least 32 bytes"), "{e}");
    }
}
