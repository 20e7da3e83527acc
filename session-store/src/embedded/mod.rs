//! The embedded backend: one redb file, one writer thread doing group commit.
//!
//! # Why redb
//! A single-file, pure-Rust, copy-on-write B-tree with ACID transactions and checksummed
//! commits: after `kill -9` the file opens at the last committed transaction, with no recovery
//! step of ours. It runs no background threads (fjall's LSM compaction would compete for the
//! two cores of a small node), and a commit costs one fsync regardless of how many operations
//! it carries, which the writer exploits by batching.
//!
//! # Tables
//! | table      | key                 | value                                   |
//! |------------|---------------------|-----------------------------------------|
//! | `sessions` | client id           | [`SessionRecord`]                       |
//! | `queue`    | (client id, seq)    | entry: message id, delivery, state      |
//! | `bodies`   | message id          | refcount and encoded message            |
//! | `retained` | topic               | encoded message and expiry              |
//! | `inbound`  | (client id, pkid)   | — (QoS 2 awaiting PUBREL)               |
//! | `log`      | log position        | accepted message not yet done (shard)   |
//! | `subscriptions` | (client id, filter) | a persistent session's subscription (shard) |
//! | `meta`     | name                | counters (`next_id`, `log_position`)    |

mod writer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::record::{decode, StoredBody, StoredEntry, StoredRetained};
use crate::{Error, Op, OpResult, QueuedMessage, RetainedRecord, SessionRecord};

pub(crate) const SESSIONS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sessions");
pub(crate) const QUEUE: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("queue");
pub(crate) const BODIES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("bodies");
pub(crate) const RETAINED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("retained");
pub(crate) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
pub(crate) const INBOUND: TableDefinition<'_, (&str, u16), ()> = TableDefinition::new("inbound");
pub(crate) const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
pub(crate) const SUBSCRIPTIONS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("subscriptions");
/// `meta` key of the highest log position ever appended.
pub(crate) const LOG_POSITION: &str = "log_position";

/// When commits reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every commit is fsynced before its operations are acknowledged; commits batch whatever
    /// queued up meanwhile (group commit). Nothing acknowledged is lost on power failure.
    Batch,
    /// Group commit with a window: after the first operation arrives, the writer collects
    /// more for up to this long, then commits and fsyncs them together before acknowledging
    /// any. Nothing acknowledged is lost; fewer fsyncs under load, at the price of up to the
    /// window in latency.
    Window(Duration),
    /// Commits are acknowledged when written to the OS; an fsync follows at least every
    /// interval. A crash of the machine (not of the process) can lose that interval.
    Interval(Duration),
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;

    /// `batch` (alias `per-message`), `group:MS`, `interval:MS`.
    fn from_str(s: &str) -> Result<SyncPolicy, String> {
        let ms = |v: &str| v.parse::<u64>().ok().filter(|ms| *ms > 0).map(Duration::from_millis);
        match s.split_once(':') {
            None if s == "batch" || s == "per-message" => Ok(SyncPolicy::Batch),
            Some(("group", v)) if ms(v).is_some() => Ok(SyncPolicy::Window(ms(v).unwrap_or_default())),
            Some(("interval", v)) if ms(v).is_some() => Ok(SyncPolicy::Interval(ms(v).unwrap_or_default())),
            _ => Err(format!("{s:?} is not a sync policy; expected batch (fsync per commit), group:MS (collect for MS then fsync) or interval:MS (fsync every MS, acknowledge before) with MS > 0")),
        }
    }
}

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Directory holding `mqfleet.redb`; created if missing.
    pub dir: PathBuf,
    pub sync: SyncPolicy,
    /// Most messages queued per session; further ones are dropped for that session.
    pub max_queue_len: u32,
    /// Observes the duration of every commit (batch of writes, fsync included when durable).
    pub commit_latency: Option<prometheus_client::metrics::histogram::Histogram>,
    /// Follows the number of messages in all session queues.
    pub queued: Option<prometheus_client::metrics::gauge::Gauge>,
    /// Fault injection (tests and the soak only): milliseconds every durable commit waits
    /// before it is written, as on a disk whose fsync is slow. Zero: no delay.
    pub commit_delay: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl EmbeddedConfig {
    pub fn new(dir: impl Into<PathBuf>) -> EmbeddedConfig {
        EmbeddedConfig {
            dir: dir.into(),
            sync: SyncPolicy::Batch,
            max_queue_len: 1000,
            commit_latency: None,
            queued: None,
            commit_delay: None,
        }
    }
}

/// Handle to the embedded store; clones share the database and its writer.
///
/// When the last clone is dropped, the writer thread finishes the requests it has, makes them
/// durable and exits, and the file is closed (it can be opened again at once).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    /// `None` only during drop, to close the writer's queue before joining it.
    writer: Option<writer::Handle>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Client ids with a stored session. Written only by the writer thread, under this lock,
    /// in the same step as the commit that creates or removes the record.
    known: Arc<RwLock<HashSet<String>>>,
    path: PathBuf,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writer = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.inner.path).finish()
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store and starts its writer thread.
    ///
    /// # Errors
    /// The directory cannot be created, the file is locked by another process, or it is not a
    /// database of ours.
    pub fn open(config: EmbeddedConfig) -> Result<EmbeddedStore, Error> {
        let open_err = |path: &Path, e: Box<dyn std::error::Error + Send + Sync>| Error::Open { path: path.to_owned(), source: e.into() };
        std::fs::create_dir_all(&config.dir).map_err(|e| open_err(&config.dir, e.into()))?;
        restrict_permissions(&config.dir);
        let path = config.dir.join("mqfleet.redb");
        let db = Database::create(&path).map_err(|e| open_err(&path, e.into()))?;
        restrict_permissions(&path);
        let db = Arc::new(db);
        let state = writer::State::load(&db, config.max_queue_len, config.queued.clone())?;
        let known = Arc::new(RwLock::new(state.session_ids()?));
        let (writer, thread) =
            writer::spawn(db.clone(), state, known.clone(), config.sync, config.commit_latency.clone(), config.commit_delay.clone())?;
        Ok(EmbeddedStore { inner: Arc::new(Inner { db, writer: Some(writer), thread: Some(thread), known, path }) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn may_have_session(&self, client_id: &str) -> bool {
        self.inner.known.read().contains(client_id)
    }

    fn send(&self, r: writer::Request) -> Result<(), Error> {
        self.inner.writer.as_ref().ok_or(Error::Closed)?.send(r)
    }

    pub async fn write(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, Error> {
        let (tx, rx) = oneshot::channel();
        self.send(writer::Request::Write { ops, done: tx })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    pub async fn flush(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(writer::Request::Flush { done: tx })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&Database) -> Result<T, Error> + Send + 'static) -> Result<T, Error> {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(|_| Error::Closed)?
    }

    pub async fn load_session(&self, client_id: &str) -> Result<Option<SessionRecord>, Error> {
        if !self.may_have_session(client_id) {
            return Ok(None);
        }
        let id = client_id.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().map_err(|e| Error::storage("reading a session", e))?;
            let table = txn.open_table(SESSIONS).map_err(|e| Error::storage("reading a session", e))?;
            match table.get(id.as_str()).map_err(|e| Error::storage("reading a session", e))? {
                Some(v) => Ok(Some(decode("session record", v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    pub async fn load_queue(&self, client_id: &str, now_ms: u64) -> Result<Vec<QueuedMessage>, Error> {
        let id = client_id.to_owned();
        self.read(move |db| {
            let doing = "reading a session queue";
            let txn = db.begin_read().map_err(|e| Error::storage(doing, e))?;
            let queue = txn.open_table(QUEUE).map_err(|e| Error::storage(doing, e))?;
            let bodies = txn.open_table(BODIES).map_err(|e| Error::storage(doing, e))?;
            let mut out = Vec::new();
            for item in queue.range((id.as_str(), 0)..=(id.as_str(), u64::MAX)).map_err(|e| Error::storage(doing, e))? {
                let (k, v) = item.map_err(|e| Error::storage(doing, e))?;
                let entry: StoredEntry = decode("queue entry", v.value())?;
                if entry.expires_at_ms.is_some_and(|t| t <= now_ms) {
                    continue;
                }
                let Some(body) = bodies.get(entry.message_id).map_err(|e| Error::storage(doing, e))? else {
                    return Err(Error::Corrupt { what: "queue entry", detail: format!("message {} is missing", entry.message_id) });
                };
                let body: StoredBody = decode("message body", body.value())?;
                out.push(QueuedMessage {
                    seq: k.value().1,
                    message: Bytes::from(body.bytes),
                    delivery: entry.delivery,
                    expires_at_ms: entry.expires_at_ms,
                    state: entry.state,
                });
            }
            Ok(out)
        })
        .await
    }

    pub async fn load_inbound(&self, client_id: &str) -> Result<Vec<u16>, Error> {
        let id = client_id.to_owned();
        self.read(move |db| {
            let doing = "reading QoS 2 markers";
            let txn = db.begin_read().map_err(|e| Error::storage(doing, e))?;
            let table = txn.open_table(INBOUND).map_err(|e| Error::storage(doing, e))?;
            let mut out = Vec::new();
            for item in table.range((id.as_str(), 0)..=(id.as_str(), u16::MAX)).map_err(|e| Error::storage(doing, e))? {
                let (k, _) = item.map_err(|e| Error::storage(doing, e))?;
                out.push(k.value().1);
            }
            Ok(out)
        })
        .await
    }

    /// The shard log: accepted messages not yet done, in order.
    pub async fn log(&self) -> Result<Vec<(u64, Bytes)>, Error> {
        self.read(|db| {
            let doing = "reading the message log";
            let txn = db.begin_read().map_err(|e| Error::storage(doing, e))?;
            let table = txn.open_table(LOG).map_err(|e| Error::storage(doing, e))?;
            let mut out = Vec::new();
            for item in table.iter().map_err(|e| Error::storage(doing, e))? {
                let (k, v) = item.map_err(|e| Error::storage(doing, e))?;
                out.push((k.value(), Bytes::copy_from_slice(v.value())));
            }
            Ok(out)
        })
        .await
    }

    /// The highest log position ever appended (0 if none): a restarted shard continues above it.
    pub async fn log_position(&self) -> Result<u64, Error> {
        self.read(|db| {
            let doing = "reading the log position";
            let txn = db.begin_read().map_err(|e| Error::storage(doing, e))?;
            match txn.open_table(META) {
                Ok(meta) => Ok(meta.get(LOG_POSITION).map_err(|e| Error::storage(doing, e))?.map_or(0, |v| v.value())),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(e) => Err(Error::storage(doing, e)),
            }
        })
        .await
    }

    /// Persistent sessions' subscriptions held by a shard: (client id, filter, entry).
    pub async fn subscriptions(&self) -> Result<Vec<(String, String, Bytes)>, Error> {
        self.read(|db| {
            let doing = "reading subscriptions";
            let txn = db.begin_read().map_err(|e| Error::storage(doing, e))?;
            let table = txn.open_table(SUBSCRIPTIONS).map_err(|e| Error::storage(doing, e))?;
            let mut out = Vec::new();
            for item in table.iter().map_err(|e| Error::storage(doing, e))? {
                let (k, v) = item.map_err(|e| Error::storage(doing, e))?;
                let (c, f) = k.value();
                out.push((c.to_owned(), f.to_owned(), Bytes::copy_from_slice(v.value())));
            }
            Ok(out)
        })
        .await
    }

    pub async fn sessions(&self) -> Result<Vec<SessionRecord>, Error> {
        self.read(|db| {
            let doing = "listing sessions";
            let txn = db.begin_read().map_err(|e| Error::storage(doing, e))?;
            let table = txn.open_table(SESSIONS).map_err(|e| Error::storage(doing, e))?;
            let mut out = Vec::new();
            for item in table.iter().map_err(|e| Error::storage(doing, e))? {
                let (_, v) = item.map_err(|e| Error::storage(doing, e))?;
                out.push(decode("session record", v.value())?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn retained(&self) -> Result<Vec<RetainedRecord>, Error> {
        self.read(|db| {
            let doing = "listing retained messages";
            let txn = db.begin_read().map_err(|e| Error::storage(doing, e))?;
            let table = txn.open_table(RETAINED).map_err(|e| Error::storage(doing, e))?;
            let mut out = Vec::new();
            for item in table.iter().map_err(|e| Error::storage(doing, e))? {
                let (k, v) = item.map_err(|e| Error::storage(doing, e))?;
                let r: StoredRetained = decode("retained message", v.value())?;
                out.push(RetainedRecord { topic: k.value().to_owned(), message: Bytes::from(r.message), expires_at_ms: r.expires_at_ms });
            }
            Ok(out)
        })
        .await
    }
}

/// Session data is private to the broker: directory 0700, files 0600 (BAD-INPUT I.75).
fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if path.is_dir() { 0o700 } else { 0o600 };
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot restrict permissions of the data directory");
        }
    }
}
