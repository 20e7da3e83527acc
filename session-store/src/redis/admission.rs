//! What all proxies share about admission: user credentials (PHC hashes), the ACL rules, and
//! fleet-wide rate buckets, so that a device cannot multiply its quota by reconnecting to
//! another proxy.
//!
//! Rates are token buckets kept in Redis ([`scripts::TAKE_TOKENS`], on Redis's clock). Proxies
//! do not ask per message: they lease tokens in chunks and spend them locally, so a client at
//! its rate costs about ten Redis calls per second, whatever its rate.

use super::keys;
use super::{scripts, RedisStore};
use crate::Error;

impl RedisStore {
    /// The PHC hash of a user, if Redis has the user.
    pub async fn user_hash(&self, username: &str) -> Result<Option<String>, Error> {
        redis::cmd("GET").arg(keys::user(username)).query_async(&mut self.conn()).await.map_err(|e| Error::redis("reading a user", e))
    }

    pub async fn set_user_hash(&self, username: &str, hash: &str) -> Result<(), Error> {
        redis::cmd("SET")
            .arg(keys::user(username))
            .arg(hash)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("writing a user", e))
    }

    /// Removes a user; false if there was none.
    pub async fn delete_user(&self, username: &str) -> Result<bool, Error> {
        let n: u64 = redis::cmd("DEL")
            .arg(keys::user(username))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("removing a user", e))?;
        Ok(n > 0)
    }

    /// The fleet's ACL (TOML text), if one is stored.
    pub async fn acl_text(&self) -> Result<Option<String>, Error> {
        redis::cmd("GET").arg(keys::ACL).query_async(&mut self.conn()).await.map_err(|e| Error::redis("reading the ACL", e))
    }

    pub async fn set_acl_text(&self, text: &str) -> Result<(), Error> {
        redis::cmd("SET").arg(keys::ACL).arg(text).query_async(&mut self.conn()).await.map_err(|e| Error::redis("writing the ACL", e))
    }

    /// Takes up to `want` tokens from the fleet-wide bucket `name` of `client_id` (`rate` per
    /// second, `burst` at most); returns how many it got (0 when the bucket is empty).
    pub async fn take_tokens(&self, client_id: &str, name: &str, rate: u64, burst: u64, want: u64) -> Result<u64, Error> {
        scripts::TAKE_TOKENS
            .key(keys::rate_bucket(client_id, name))
            .arg(rate)
            .arg(burst)
            .arg(want)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| Error::redis("taking rate tokens", e))
    }
}
