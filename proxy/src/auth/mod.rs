//! Admission: who a client is (authentication) and what it may do (authorization, [`acl`]).
//!
//! # The chain
//! Backends are asked in a fixed order; the first that recognises the client decides:
//! 1. a verified client certificate, when `tls_identity` names a field ([`cert`]);
//! 2. the password file, for a user it lists ([`password`]);
//! 3. users in Redis (`auth_redis`), shared by every proxy of a fleet;
//! 4. a JSON Web Token in the password field ([`jwt`]).
//!
//! Credentials no backend recognises are refused (0x86 / 3.1.1 0x04) — unless no credential
//! backend is configured at all, when they are ignored as Mosquitto does. A client without
//! credentials is anonymous: let in only if `allow_anonymous` says so (by default: while every
//! listener is on a loopback address), else refused with 0x87 / 3.1.1 0x05. An anonymous or
//! unverified username never reaches ACLs: `%u` and `username =` rules see only verified names.
//!
//! # Cost
//! Password hashes are verified on the blocking pool, at most `auth_concurrency` at a time;
//! an authentication storm queues there while the event loop keeps serving everyone else.

pub mod acl;
pub mod cert;
pub mod cli;
pub mod jwt;
pub mod password;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mqfleet_codec::ReasonCode;
use parking_lot::RwLock;
use session_store::RedisStore;
use tokio::sync::Semaphore;

use acl::{Acl, Action, Subject};
use cert::{CertNames, IdentitySource, IdentityUse};
use jwt::JwtVerifier;
use password::{verify_password, PasswordFile};

/// How the proxy admits clients; built from the configuration.
pub struct AuthConfig {
    pub allow_anonymous: bool,
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    pub jwt: Option<JwtVerifier>,
    pub cert_source: IdentitySource,
    pub cert_use: IdentityUse,
    pub concurrency: usize,
    /// Users and ACL rules also come from the session store's Redis (attached at start).
    pub redis: bool,
}

/// What a CONNECT offers.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// Names from the client certificate, when one was presented (and verified).
    pub cert: Option<&'a CertNames>,
}

/// An admitted client.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Verified username (ACLs see only this).
    pub username: Option<String>,
    /// The client id this client must use (from its certificate).
    pub client_id: Option<String>,
    /// Common name of its certificate, for `%cn`.
    pub cn: Option<String>,
    /// Rules that replace the ACL file for this client (from its token).
    pub acl: Option<Arc<Acl>>,
    /// Which backend admitted it (logs and metrics).
    pub method: &'static str,
}

/// A refused CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub reason: ReasonCode,
    /// Metric label.
    pub cause: &'static str,
    pub detail: String,
}

fn denied(reason: ReasonCode, cause: &'static str, detail: impl Into<String>) -> Denied {
    Denied { reason, cause, detail: detail.into() }
}

/// The authentication chain and the ACL, reloadable while running.
pub struct Auth {
    allow_anonymous: bool,
    password_path: Option<PathBuf>,
    passwords: RwLock<Arc<PasswordFile>>,
    acl_path: Option<PathBuf>,
    /// `None`: no ACL file, every topic open.
    acl: RwLock<Option<Arc<Acl>>>,
    jwt: Option<JwtVerifier>,
    cert_source: IdentitySource,
    cert_use: IdentityUse,
    hashing: Arc<Semaphore>,
    /// Set once at start when `auth_redis` is on.
    redis: std::sync::OnceLock<RedisStore>,
    wants_redis: bool,
    /// An ACL is in force (file or Redis): the delivery path checks without a lock otherwise.
    has_acl: AtomicBool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("allow_anonymous", &self.allow_anonymous).field("backends", &self.backends()).finish()
    }
}

impl Auth {
    /// Reads the password and ACL files; errors are (setting, message naming file and line).
    pub fn new(c: AuthConfig) -> Result<Auth, (&'static str, String)> {
        let passwords = match &c.password_file {
            Some(p) => PasswordFile::load(p).map_err(|e| ("password_file", e))?,
            None => PasswordFile::default(),
        };
        let acl = match &c.acl_file {
            Some(p) => Some(Arc::new(Acl::load(p).map_err(|e| ("acl_file", e))?)),
            None => None,
        };
        Ok(Auth {
            has_acl: AtomicBool::new(acl.is_some()),
            redis: std::sync::OnceLock::new(),
            wants_redis: c.redis,
            allow_anonymous: c.allow_anonymous,
            password_path: c.password_file,
            passwords: RwLock::new(Arc::new(passwords)),
            acl_path: c.acl_file,
            acl: RwLock::new(acl),
            jwt: c.jwt,
            cert_source: c.cert_source,
            cert_use: c.cert_use,
            hashing: Arc::new(Semaphore::new(c.concurrency.max(1))),
        })
    }

    /// The configured credential backends, by name.
    pub fn backends(&self) -> Vec<&'static str> {
        let mut b = Vec::new();
        if self.cert_source != IdentitySource::None {
            b.push("certificate");
        }
        if self.password_path.is_some() {
            b.push("password_file");
        }
        if self.wants_redis {
            b.push("redis");
        }
        if self.jwt.is_some() {
            b.push("jwt");
        }
        b
    }

    /// Gives the Redis backend its store (at start, when `auth_redis` is on).
    pub fn attach_redis(&self, store: RedisStore) {
        if self.wants_redis {
            let _ = self.redis.set(store);
        }
    }

    /// Re-reads the ACL from Redis; `Ok(true)` if it changed (connections must recheck).
    /// Without a stored ACL the file's (or none) stays. On a bad ACL the running one stays.
    pub async fn reload_redis_acl(&self) -> Result<bool, String> {
        let Some(redis) = self.redis.get() else { return Ok(false) };
        let Some(text) = redis.acl_text().await.map_err(|e| e.to_string())? else { return Ok(false) };
        let acl = Acl::parse(&text).map_err(|e| format!("the ACL in Redis: {e}"))?;
        let mut current = self.acl.write();
        if current.as_deref() == Some(&acl) {
            return Ok(false);
        }
        *current = Some(Arc::new(acl));
        self.has_acl.store(true, Ordering::Release);
        Ok(true)
    }

    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Re-reads the password and ACL files. On error nothing changes (the running
    /// configuration stays) and the error names the file.
    pub fn reload(&self) -> Result<(), String> {
        let passwords = self.password_path.as_deref().map(PasswordFile::load).transpose()?;
        let acl = self.acl_path.as_deref().map(Acl::load).transpose()?;
        if let Some(p) = passwords {
            *self.passwords.write() = Arc::new(p);
        }
        if let Some(a) = acl {
            *self.acl.write() = Some(Arc::new(a));
            self.has_acl.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Runs the chain.
    pub async fn authenticate(&self, login: Login<'_>) -> Result<Identity, Denied> {
        let cn = login.cert.and_then(|c| c.common_name.as_ref().ok().cloned());
        if let (Some(names), true) = (login.cert, self.cert_source != IdentitySource::None) {
            let name = match names.identity(self.cert_source) {
                Ok(Some(n)) => n.to_string(),
                Ok(None) => unreachable!("a certificate source is set"),
                Err(why) => return Err(denied(ReasonCode::NotAuthorized, "certificate_identity", why)),
            };
            return Ok(Identity {
                username: if self.cert_use.username { Some(name.clone()) } else { None },
                client_id: self.cert_use.client_id.then_some(name),
                cn,
                acl: None,
                method: "certificate",
            });
        }

        let credentials_checked = self.password_path.is_some() || self.jwt.is_some() || self.wants_redis;
        let passwords = self.passwords.read().clone();
        if let (Some(user), Some(password)) = (login.username, login.password) {
            if passwords.contains(user) {
                let (hash, _) = passwords.hash_for(user);
                if self.verify(hash.to_string(), password).await? {
                    return Ok(Identity { username: Some(user.to_string()), cn, method: "password_file", ..Identity::default() });
                }
                return Err(denied(ReasonCode::BadUserNameOrPassword, "bad_password", format!("wrong password for user {user:?}")));
            }
        }
        if let (Some(redis), Some(user), Some(password)) = (self.redis.get(), login.username, login.password) {
            let stored = redis
                .user_hash(user)
                .await
                .map_err(|e| denied(ReasonCode::ServerUnavailable, "auth_unavailable", format!("cannot read users from Redis: {e}")))?;
            if let Some(hash) = stored {
                if self.verify(hash, password).await? {
                    return Ok(Identity { username: Some(user.to_string()), cn, method: "redis", ..Identity::default() });
                }
                return Err(denied(ReasonCode::BadUserNameOrPassword, "bad_password", format!("wrong password for user {user:?}")));
            }
        }
        if let (Some(jwt), Some(token)) = (&self.jwt, login.password.filter(|p| JwtVerifier::looks_like_token(p))) {
            let token =
                std::str::from_utf8(token).map_err(|_| denied(ReasonCode::BadUserNameOrPassword, "bad_token", "token is not UTF-8"))?;
            let grant =
                jwt.verify(token).map_err(|e| denied(ReasonCode::BadUserNameOrPassword, "bad_token", format!("token refused: {e}")))?;
            if let (Some(sub), Some(user)) = (&grant.subject, login.username) {
                if sub != user {
                    return Err(denied(ReasonCode::BadUserNameOrPassword, "bad_token", "the token's subject is not the CONNECT username"));
                }
            }
            let username = grant.subject.or(login.username.map(String::from));
            return Ok(Identity { username, cn, acl: grant.acl, method: "jwt", ..Identity::default() });
        }

        if credentials_checked && (login.username.is_some() || login.password.is_some()) {
            if let (Some(_), Some(password)) = (login.username, login.password) {
                // An unknown user costs what a wrong password costs.
                let (decoy, _) = passwords.hash_for("");
                let _ = self.verify(decoy.to_string(), password).await;
            }
            return Err(denied(ReasonCode::BadUserNameOrPassword, "unknown_user", "no authentication backend knows these credentials"));
        }
        if self.allow_anonymous {
            return Ok(Identity { cn, method: "anonymous", ..Identity::default() });
        }
        Err(denied(
            ReasonCode::NotAuthorized,
            "anonymous",
            "anonymous access is off on this server (a listener is not on loopback); connect with credentials",
        ))
    }

    /// Verifies a hash on the blocking pool, at most `concurrency` at a time.
    async fn verify(&self, hash: String, password: &[u8]) -> Result<bool, Denied> {
        let busy = || denied(ReasonCode::ServerUnavailable, "auth_unavailable", "password check could not run");
        let Ok(password) = String::from_utf8(password.to_vec()) else { return Ok(false) };
        let _permit = self.hashing.clone().acquire_owned().await.map_err(|_| busy())?;
        tokio::task::spawn_blocking(move || verify_password(&hash, &password)).await.map_err(|_| busy())
    }

    /// May `who` publish to `topic` / subscribe to `filter`? The token's rules if it carried
    /// any, else the ACL file's; without either, yes.
    pub fn allows(&self, identity: &Identity, client_id: &str, action: Action, topic: &str) -> bool {
        let subject = Subject { client_id, username: identity.username.as_deref(), cn: identity.cn.as_deref() };
        match &identity.acl {
            Some(rules) => rules.allows(subject, action, topic),
            None => self.acl.read().as_ref().is_none_or(|rules| rules.allows(subject, action, topic)),
        }
    }

    /// Is an ACL (file or Redis) in force for every client?
    pub fn has_acl(&self) -> bool {
        self.has_acl.load(Ordering::Acquire)
    }

    /// Do any rules apply to this client?
    pub fn restricts(&self, identity: &Identity) -> bool {
        identity.acl.is_some() || self.has_acl()
    }

    /// May this client receive a message on `topic` (checked at delivery, so that a revoked
    /// subscription, a queue filled before a revocation, or a retained message never leaks)?
    /// A topic name is a filter matching only itself, so this is the subscribe rule.
    pub fn may_receive(&self, identity: &Identity, client_id: &str, topic: &str) -> bool {
        // The delivery hot path: no lock at all while no ACL can apply.
        if !self.restricts(identity) {
            return true;
        }
        self.allows(identity, client_id, Action::Subscribe, topic)
    }
}
