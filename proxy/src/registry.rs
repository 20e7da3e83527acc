//! Live connections of this proxy: who owns which client id, and where each connection's
//! mailbox is; in a cluster also each connection's epoch (to judge takeover notices) and its
//! subscriptions (to re-send them to a shard that relinks).
//!
//! Maps under separate locks, each held only for a map operation (never across an await):
//! `clients` decides ownership on CONNECT; `conns` is read on every delivery, so it is a
//! read-write lock that connects and disconnects take briefly for writing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use broker_shard::link::{ConnId, Recipient, Request, RequestId, SessionInfo, SubscribeItem};
use broker_shard::Message;
use mqfleet_codec::{ByteString, Protocol, ReasonCode};
use parking_lot::{Mutex, RwLock};
use session_store::StoredSubscription;
use tokio::sync::{oneshot, watch};

/// What a connection task receives besides socket input.
#[derive(Debug)]
pub enum ConnMsg {
    /// A message routed to this connection by a shard.
    Deliver(Arc<Message>, Recipient),
    /// Another connection claimed this client id: send DISCONNECT 0x8E and end.
    TakenOver,
    /// The server ends this connection (administrative action, shutdown of a session).
    Close(ReasonCode),
    /// The ACL was reloaded: subscriptions it no longer allows are removed.
    AclChanged,
    /// The admin API asks for this connection's state.
    Inspect(oneshot::Sender<ConnectionView>),
    /// An operator disconnects the client (DISCONNECT 0x98); with `discard_session` its
    /// session ends too instead of waiting for the client.
    Kick { discard_session: bool },
}

/// What the admin API lists about a connected client: fixed at CONNECT, so listing thousands
/// of clients does not disturb them.
#[derive(Debug)]
pub struct ClientInfo {
    pub client_id: ByteString,
    /// Verified username, if any.
    pub username: Option<String>,
    pub protocol: Protocol,
    pub peer: SocketAddr,
    /// The listener it came through (`mqtt`, `mqtts`, `ws`, `wss`).
    pub listener: &'static str,
    pub connected_at_ms: u64,
    pub keep_alive: u16,
    pub clean_start: bool,
    /// Seconds the session outlives the connection, as negotiated at CONNECT.
    pub session_expiry: u32,
    /// CONNACK went out: the connection is live. Until then it is a handshake in progress
    /// (it may be waiting for a previous connection of the client id to finish).
    pub established: AtomicBool,
    /// The connection has ended and is saving its session: no longer a live connection.
    pub closing: AtomicBool,
}

impl ClientInfo {
    /// Past CONNACK and not yet ended.
    pub fn is_live(&self) -> bool {
        self.established.load(Ordering::Relaxed) && !self.closing.load(Ordering::Relaxed)
    }
}

/// A connection's live state, as it answers [`ConnMsg::Inspect`].
#[derive(Debug, Clone)]
pub struct ConnectionView {
    pub subscriptions: Vec<StoredSubscription>,
    /// Deliveries sent and not yet acknowledged by the client.
    pub inflight: usize,
    /// Deliveries waiting for room in the in-flight window.
    pub queued: usize,
    /// QoS 2 PUBLISHes received and awaiting PUBREL.
    pub awaiting_release: usize,
    /// Seconds the session outlives the connection now (a 5.0 DISCONNECT may change it).
    pub session_expiry: u32,
    pub has_will: bool,
}

/// A connection's mailbox. Unbounded so that routing never waits for a device; the
/// connection drains it at once into its own bounded queues, dropping (and counting) what
/// exceeds them.
pub type Mailbox = crate::mailbox::Sender<ConnMsg>;

/// Resolves when the connection's task has finished its clean-up (its sender is dropped).
pub type Exited = watch::Receiver<()>;

struct Owner {
    conn: ConnId,
    info: Arc<ClientInfo>,
    mailbox: Mailbox,
    exited: Exited,
    /// Cluster: the connection epoch from the session store; 0 until the claim there is done.
    epoch: u64,
}

/// The previous owner of a client id, returned by [`Registry::claim`].
pub struct Previous {
    pub conn: ConnId,
    pub mailbox: Mailbox,
    pub exited: Exited,
}

/// A connection's subscriptions as its shards know them.
struct Subscribed {
    session: SessionInfo,
    items: Vec<SubscribeItem>,
}

#[derive(Default)]
pub struct Registry {
    clients: Mutex<HashMap<ByteString, Owner>>,
    conns: RwLock<HashMap<ConnId, Mailbox>>,
    next_conn: AtomicU64,
    /// Cluster: takeover notices that arrived before their connection's claim finished.
    early_takeovers: Mutex<HashMap<ByteString, u64>>,
    subscriptions: Mutex<HashMap<ConnId, Subscribed>>,
}

impl Registry {
    pub fn next_conn_id(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Registers `conn` as the owner of `client_id` and as a delivery target. Returns the
    /// previous owner, which the caller must take over [MQTT-3.1.4-3].
    pub fn claim(&self, info: Arc<ClientInfo>, conn: ConnId, mailbox: Mailbox, exited: Exited) -> Option<Previous> {
        self.conns.write().insert(conn, mailbox.clone());
        let client_id = info.client_id.clone();
        let prev = self.clients.lock().insert(client_id, Owner { conn, info, mailbox, exited, epoch: 0 });
        prev.map(|o| Previous { conn: o.conn, mailbox: o.mailbox, exited: o.exited })
    }

    /// Removes `conn`; the client id is released only if `conn` still owns it.
    pub fn release(&self, client_id: &ByteString, conn: ConnId) {
        self.conns.write().remove(&conn);
        self.subscriptions.lock().remove(&conn);
        let mut clients = self.clients.lock();
        if clients.get(client_id).is_some_and(|o| o.conn == conn) {
            clients.remove(client_id);
        }
    }

    /// Cluster: `conn` holds the session store's claim with `epoch`. False if a newer
    /// connection elsewhere already took the client over (its notice came first).
    pub fn set_epoch(&self, client_id: &ByteString, conn: ConnId, epoch: u64) -> bool {
        if let Some(o) = self.clients.lock().get_mut(client_id).filter(|o| o.conn == conn) {
            o.epoch = epoch;
        }
        let early = self.early_takeovers.lock().remove(client_id);
        early.is_none_or(|newer| newer <= epoch)
    }

    /// Cluster: a connection with `epoch` on another proxy took `client_id`. Returns the
    /// mailbox of our older connection to close, if there is one; a notice for a connection
    /// still claiming is kept for [`Registry::set_epoch`].
    pub fn taken_over_elsewhere(&self, client_id: &str, epoch: u64) -> Option<Mailbox> {
        let clients = self.clients.lock();
        let o = clients.get(client_id)?;
        if o.epoch == 0 {
            let mut early = self.early_takeovers.lock();
            let e = early.entry(ByteString::from(client_id)).or_insert(0);
            *e = (*e).max(epoch);
            return None;
        }
        (o.epoch < epoch).then(|| o.mailbox.clone())
    }

    /// Records the subscriptions of `conn` (all of them, replacing what was there).
    pub fn set_subscriptions(&self, conn: ConnId, session: SessionInfo, items: Vec<SubscribeItem>) {
        self.subscriptions.lock().insert(conn, Subscribed { session, items });
    }

    /// One Subscribe per connection with the subscriptions `keep` selects, for a shard that
    /// relinked (ids are filled in by the link).
    pub fn resync(&self, keep: impl Fn(&SubscribeItem) -> bool) -> Vec<Request> {
        let subs = self.subscriptions.lock();
        subs.values()
            .filter_map(|s| {
                let items: Vec<SubscribeItem> = s.items.iter().filter(|i| keep(i)).cloned().collect();
                (!items.is_empty()).then(|| Request::Subscribe {
                    id: RequestId(0),
                    session: s.session.clone(),
                    items,
                    deliver_retained: None,
                })
            })
            .collect()
    }

    /// The connection that owns `client_id`, if any.
    pub fn owner(&self, client_id: &str) -> Option<ConnId> {
        self.clients.lock().get(client_id).map(|o| o.conn)
    }

    /// Every live connection's client (admin API), in no particular order; handshakes in
    /// progress and connections that are closing are left out.
    pub fn clients(&self) -> Vec<Arc<ClientInfo>> {
        self.clients.lock().values().filter(|o| o.info.is_live()).map(|o| o.info.clone()).collect()
    }

    /// `conn` has ended: it stays the owner of its client id until released, but is no longer
    /// listed as connected.
    pub fn mark_closing(&self, client_id: &str, conn: ConnId) {
        if let Some(o) = self.clients.lock().get(client_id).filter(|o| o.conn == conn) {
            o.info.closing.store(true, Ordering::Relaxed);
        }
    }

    /// A connected client's description and mailbox (admin API).
    pub fn client(&self, client_id: &str) -> Option<(Arc<ClientInfo>, Mailbox)> {
        self.clients.lock().get(client_id).map(|o| (o.info.clone(), o.mailbox.clone()))
    }

    pub fn is_connected(&self, client_id: &str) -> bool {
        self.clients.lock().contains_key(client_id)
    }

    /// Sends to one connection; false if it is gone.
    pub fn send(&self, conn: ConnId, msg: ConnMsg) -> bool {
        match self.conns.read().get(&conn) {
            Some(m) => m.send(msg).is_ok(),
            None => false,
        }
    }

    /// Runs `f` with the connection map held for reading: one lock for a whole fan-out.
    pub fn with_conns<R>(&self, f: impl FnOnce(&HashMap<ConnId, Mailbox>) -> R) -> R {
        f(&self.conns.read())
    }

    /// Every connection's mailbox (shutdown).
    pub fn all(&self) -> Vec<Mailbox> {
        self.conns.read().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.conns.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Waits until a connection has exited.
pub async fn wait_exited(mut exited: Exited) {
    while exited.changed().await.is_ok() {}
}
