//! The operator commands of `mqfleet-proxy` besides running the broker: `passwd` (users in a
//! password file or in Redis) and `acl` (checks an ACL file and stores it in Redis for every
//! proxy with `auth_redis`).

use std::path::Path;
use std::time::Duration;

use session_store::{RedisStore, RedisTarget};

use super::acl::Acl;
use super::password::{check_username, hash_password, passwd, read_password};

const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

fn redis_target(target: &str) -> Option<Result<RedisTarget, String>> {
    target.starts_with("redis").then(|| RedisTarget::parse(target))
}

async fn connect(target: RedisTarget) -> Result<RedisStore, String> {
    RedisStore::connect(target, 0, REDIS_TIMEOUT).await.map_err(|e| e.to_string())
}

/// `passwd TARGET USER [--delete]`: TARGET is a password file or a Redis URL (the store's).
pub async fn passwd_command(target: &str, user: &str, delete: bool, input: &mut dyn std::io::BufRead) -> Result<String, String> {
    let Some(redis) = redis_target(target) else { return passwd(Path::new(target), user, delete, input) };
    check_username(user)?;
    let store = connect(redis?).await?;
    if delete {
        return match store.delete_user(user).await.map_err(|e| e.to_string())? {
            true => Ok(format!("removed {user} from Redis")),
            false => Err(format!("no user {user:?} in Redis")),
        };
    }
    let hash = hash_password(&read_password(input)?)?;
    store.set_user_hash(user, &hash).await.map_err(|e| e.to_string())?;
    Ok(format!("set {user} in Redis"))
}

/// `acl STORE FILE`: checks the file and stores it as the fleet's ACL.
pub async fn acl_command(store: &str, file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    Acl::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let Some(target) = redis_target(store) else {
        return Err(format!("{store:?} is not a Redis URL (redis://, redis+cluster://, redis+sentinel://)"));
    };
    connect(target?).await?.set_acl_text(&text).await.map_err(|e| e.to_string())?;
    Ok(format!("stored {} as the ACL; proxies with auth_redis apply it within 5 s", file.display()))
}
