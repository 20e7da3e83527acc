//! A Redis Cluster connection that replaces itself when it stops answering.
//!
//! Why it exists: the `redis` crate's `cluster_async` connection (1.8) can wedge for good when
//! a node restarts under load. Its driver task stops polling in-flight requests while it
//! refreshes the slot map, and the refresh waits for the topology lock (a fair tokio `RwLock`)
//! that the lock has already granted to one of those requests. From then on every command
//! times out and nothing inside the library repairs it (`tests/cluster_recovery.rs` reproduces
//! it with a few hundred concurrent commands and one node kill). The library cannot be mended
//! from here, so this wrapper watches what its commands come back with: when, for
//! `stale_after`, they have only timed out (no reply of any kind, not even an error a node
//! sent), it builds a new connection from the seed nodes in the background and swaps it in.
//!
//! A true outage (every node unreachable) looks the same from here; a replacement then costs one
//! failed connection attempt per `stale_after`, and the old connection is kept.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use redis::aio::ConnectionLike;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use tokio::time::Instant;

/// Timeouts in a row (with no other outcome between them) before a connection can be wedged.
const WEDGED_AFTER_TIMEOUTS: u32 = 3;

#[derive(Clone)]
pub struct ClusterConn(Arc<Inner>);

struct Inner {
    client: ClusterClient,
    connect_timeout: Duration,
    /// How long commands only time out before the connection is taken for wedged.
    stale_after: Duration,
    current: Mutex<ClusterConnection>,
    health: Mutex<Health>,
    replacements: std::sync::OnceLock<Counter>,
}

/// What the commands sent since the connection's last sign of life came back with.
#[derive(Debug)]
struct Health {
    /// The last reply of any kind: a value, or an error a node sent.
    alive_at: Instant,
    /// Commands that timed out since.
    timeouts: u32,
    /// A replacement is being built.
    replacing: bool,
}

impl Health {
    fn new(now: Instant) -> Health {
        Health { alive_at: now, timeouts: 0, replacing: false }
    }

    /// Records one command's outcome; true when the connection is to be replaced now (the
    /// caller then owes a [`Health::settled`]).
    fn record(&mut self, timed_out: bool, now: Instant, stale_after: Duration) -> bool {
        if !timed_out {
            self.alive_at = now;
            self.timeouts = 0;
            return false;
        }
        self.timeouts = self.timeouts.saturating_add(1);
        if self.replacing || self.timeouts < WEDGED_AFTER_TIMEOUTS || now.duration_since(self.alive_at) < stale_after {
            return false;
        }
        self.replacing = true;
        true
    }

    /// Starts a replacement unless one is being built; true when the caller is to build it.
    fn start_replacing(&mut self) -> bool {
        !std::mem::replace(&mut self.replacing, true)
    }

    /// A replacement ended (made or not): the next one waits for another `stale_after`.
    fn settled(&mut self, now: Instant) {
        *self = Health::new(now);
    }
}

impl ClusterConn {
    /// Connects to the cluster; fails if no seed node answers within `connect_timeout`.
    pub async fn connect(client: ClusterClient, connect_timeout: Duration, response_timeout: Duration) -> RedisResult<ClusterConn> {
        let current = client.get_async_connection().await?;
        Ok(ClusterConn(Arc::new(Inner {
            client,
            connect_timeout,
            stale_after: 2 * response_timeout,
            current: Mutex::new(current),
            health: Mutex::new(Health::new(Instant::now())),
            replacements: std::sync::OnceLock::new(),
        })))
    }

    /// Counts replacements in `counter` (the first counter given stays).
    pub fn count_replacements(&self, counter: Counter) {
        let _ = self.0.replacements.set(counter);
    }

    fn current(&self) -> ClusterConnection {
        self.0.current.lock().clone()
    }

    fn observe<T>(&self, result: &RedisResult<T>) {
        let timed_out = result.as_ref().is_err_and(|e| e.is_timeout());
        let stale_map = result.as_ref().is_err_and(moved_in_transaction);
        let mut health = self.0.health.lock();
        let why = if health.record(timed_out, Instant::now(), self.0.stale_after) {
            "its commands had only timed out (a wedged client, or an outage)"
        } else if stale_map && health.start_replacing() {
            "a transaction was refused with MOVED (a stale slot map)"
        } else {
            return;
        };
        drop(health);
        self.replace(why);
    }

    /// Builds a new connection in the background and swaps it in; commands meanwhile go to the
    /// old one.
    fn replace(&self, why: &'static str) {
        let inner = self.0.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(inner.connect_timeout, inner.client.get_async_connection()).await {
                Ok(Ok(fresh)) => {
                    *inner.current.lock() = fresh;
                    if let Some(c) = inner.replacements.get() {
                        c.inc();
                    }
                    tracing::warn!(stale_after_ms = inner.stale_after.as_millis() as u64, "replaced the Redis Cluster connection: {why}");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not replace the Redis Cluster connection; keeping the old one"),
                Err(_) => tracing::warn!("could not replace the Redis Cluster connection in time; keeping the old one"),
            }
            inner.health.lock().settled(Instant::now());
        });
    }
}

/// A transaction a node refused because one of its keys' slot is elsewhere: the slot map is
/// stale. The `redis` crate follows MOVED for single commands (refreshing its map) but hands it
/// back inside a transaction's abort and keeps the map, so every later transaction to that
/// slot fails the same way (found by the soak, docs/RELIABILITY.md finding 23: after a node
/// restart a proxy's acknowledgements to a few slots failed for a minute and more). A new
/// connection reads the map afresh.
fn moved_in_transaction(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ExecAbort)
        && e.clone().into_server_errors().is_some_and(|errs| errs.iter().any(|(_, s)| s.kind() == Some(redis::ServerErrorKind::Moved)))
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.current().req_packed_command(cmd).await;
            self.observe(&result);
            result
        })
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.current().req_packed_commands(pipeline, offset, count).await;
            self.observe(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(4);

    #[test]
    fn only_timeouts_for_the_whole_window_call_for_a_replacement() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        // Timeouts alone, but not for long enough.
        for ms in [100, 200, 3_900] {
            assert!(!h.record(true, t0 + Duration::from_millis(ms), STALE));
        }
        // Long enough, and enough of them: replace, once.
        assert!(h.record(true, t0 + Duration::from_millis(4_100), STALE));
        assert!(!h.record(true, t0 + Duration::from_millis(4_200), STALE), "one replacement at a time");
        h.settled(t0 + Duration::from_millis(5_000));
        assert!(!h.record(true, t0 + Duration::from_millis(6_000), STALE), "the next one waits for another window");
    }

    #[test]
    fn any_reply_between_timeouts_means_the_connection_works() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        assert!(!h.record(true, t0 + Duration::from_millis(1_000), STALE));
        assert!(!h.record(true, t0 + Duration::from_millis(2_000), STALE));
        // A reply (or an error a node sent, e.g. CLUSTERDOWN) resets the window.
        assert!(!h.record(false, t0 + Duration::from_millis(3_000), STALE));
        for ms in [5_000, 6_000, 6_900] {
            assert!(!h.record(true, t0 + Duration::from_millis(ms), STALE));
        }
        assert!(h.record(true, t0 + Duration::from_millis(7_100), STALE));
    }

    #[test]
    fn a_single_slow_command_is_not_a_wedge() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        assert!(!h.record(true, t0 + Duration::from_secs(60), STALE), "one timeout after a quiet minute");
        assert!(!h.record(true, t0 + Duration::from_secs(61), STALE));
        assert!(h.record(true, t0 + Duration::from_secs(62), STALE));
    }
}
