//! A connection to whichever Redis the Sentinels name as master, following failovers.
//!
//! The `redis` crate asks the Sentinels for the master when a connection is made, but does not
//! follow a failover afterwards: a `ConnectionManager` would reconnect to the same address, which
//! by then is a replica answering READONLY (or nothing at all). So this connection forgets its
//! master on an I/O error, a timeout or a READONLY reply, and the next command asks the
//! Sentinels again. The command that saw the failure fails (the caller's retry or refusal
//! applies, as for any Redis outage); the next one reaches the new master.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value};

use super::SentinelTarget;

#[derive(Clone)]
pub struct SentinelConn(Arc<Inner>);

struct Inner {
    /// Asking the Sentinels is serialised: after a failover every caller would otherwise ask at once.
    client: tokio::sync::Mutex<SentinelClient>,
    current: parking_lot::Mutex<Option<MultiplexedConnection>>,
    config: AsyncConnectionConfig,
    db: i64,
}

impl SentinelConn {
    /// Builds the client and connects to the current master once, so a wrong address or master
    /// name fails at start.
    pub async fn connect(target: &SentinelTarget, timeout: Duration, response_timeout: Duration) -> RedisResult<SentinelConn> {
        let mut info = redis::RedisConnectionInfo::default().set_db(target.db);
        if let Some(user) = &target.username {
            info = info.set_username(user);
        }
        if let Some(password) = &target.password {
            info = info.set_password(password);
        }
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
        let sentinels: Vec<String> = target.sentinels.iter().map(|s| format!("redis://{s}")).collect();
        let client = SentinelClient::build(sentinels, target.master.clone(), Some(node), SentinelServerType::Master)?;
        let conn = SentinelConn(Arc::new(Inner {
            client: tokio::sync::Mutex::new(client),
            current: parking_lot::Mutex::new(None),
            config: AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(response_timeout)),
            db: target.db,
        }));
        conn.master().await?;
        Ok(conn)
    }

    async fn master(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self.0.current.lock().clone() {
            return Ok(c);
        }
        let mut client = self.0.client.lock().await;
        // Another caller may have found the master while this one waited.
        if let Some(c) = self.0.current.lock().clone() {
            return Ok(c);
        }
        let c = client.get_async_connection_with_config(&self.0.config).await?;
        *self.0.current.lock() = Some(c.clone());
        Ok(c)
    }

    /// Forgets the master when the error says it may no longer be one.
    fn check<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result {
            if master_lost(e) {
                tracing::warn!(error = %e, "lost the Redis master; asking the Sentinels again");
                *self.0.current.lock() = None;
            }
        }
        result
    }
}

fn master_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown))
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = async {
                let mut master = self.master().await?;
                master.req_packed_command(cmd).await
            }
            .await;
            self.check(result)
        })
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = async {
                let mut master = self.master().await?;
                master.req_packed_commands(pipeline, offset, count).await
            }
            .await;
            self.check(result)
        })
    }

    fn get_db(&self) -> i64 {
        self.0.db
    }
}
