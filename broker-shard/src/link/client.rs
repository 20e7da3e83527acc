//! The proxy's end of a link: sends requests, matches replies to them, and hands deliveries to
//! a [`DeliverySink`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::local::{Inbound, EVENT_CHANNEL_CAPACITY};
use super::{Deliver, Event, LinkError, ProxyId, Reply, Request, RequestId, ShardError};
use crate::ShardHandle;

/// Receives deliveries from the shards. Called on the link's reader task: it must not block.
pub trait DeliverySink: Send + Sync + 'static {
    fn deliver(&self, deliver: Deliver);
}

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Result<Reply, ShardError>>>>;

/// A link from this proxy to one shard. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shard: Arc<str>,
    proxy: ProxyId,
    /// The shard's inbox. Closed when the shard stops; requests then fail with
    /// [`LinkError::Down`].
    tx: mpsc::Sender<Inbound>,
    /// Requests awaiting their reply. The reader task completes them; if it ends, their senders
    /// are dropped and the callers see [`LinkError::Down`].
    waiters: Arc<Waiters>,
    next_id: AtomicU64,
}

impl Client {
    /// Opens an in-process link to `shard` and starts its reader task.
    pub async fn connect_local(shard: &ShardHandle, proxy: ProxyId, sink: Arc<dyn DeliverySink>) -> Result<Client, LinkError> {
        let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let down = || LinkError::Down { shard: shard.name().to_owned() };
        shard.tx.send(Inbound::Connect { proxy, events: events_tx }).await.map_err(|_| down())?;
        let waiters: Arc<Waiters> = Arc::default();
        tokio::spawn(read_events(events_rx, waiters.clone(), sink));
        Ok(Client {
            inner: Arc::new(Inner { shard: shard.name().into(), proxy, tx: shard.tx.clone(), waiters, next_id: AtomicU64::new(1) }),
        })
    }

    pub fn shard(&self) -> &str {
        &self.inner.shard
    }

    fn down(&self) -> LinkError {
        LinkError::Down { shard: self.inner.shard.to_string() }
    }

    /// Sends a request that needs no reply.
    pub async fn send(&self, request: Request) -> Result<(), LinkError> {
        self.inner.tx.send(Inbound::Request { proxy: self.inner.proxy, request }).await.map_err(|_| self.down())
    }

    /// Sends the request `build` makes with a fresh id, and waits for its reply.
    ///
    /// # Cancel safety
    /// Dropping the future before the reply abandons the reply; the request may still be
    /// carried out by the shard.
    pub async fn call(&self, build: impl FnOnce(RequestId) -> Request) -> Result<Reply, LinkError> {
        self.start(build).await?.await
    }

    /// Sends the request now and returns a future of its reply: requests keep the order in
    /// which `start` was awaited, whenever their replies are awaited.
    pub async fn start(
        &self,
        build: impl FnOnce(RequestId) -> Request,
    ) -> Result<impl std::future::Future<Output = Result<Reply, LinkError>> + Send + 'static, LinkError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.waiters.lock().insert(id, tx);
        if let Err(e) = self.send(build(RequestId(id))).await {
            self.inner.waiters.lock().remove(&id);
            return Err(e);
        }
        let down = self.down();
        Ok(async move {
            match rx.await {
                Ok(result) => result.map_err(LinkError::from),
                Err(_) => Err(down),
            }
        })
    }

    /// Tells the shard this proxy is going away (its sessions go offline there).
    pub async fn close(&self) {
        let _ = self.inner.tx.send(Inbound::Disconnect { proxy: self.inner.proxy }).await;
    }
}

async fn read_events(mut rx: mpsc::Receiver<Event>, waiters: Arc<Waiters>, sink: Arc<dyn DeliverySink>) {
    while let Some(event) = rx.recv().await {
        match event {
            Event::Reply { id, result } => {
                if let Some(w) = waiters.lock().remove(&id.0) {
                    let _ = w.send(result);
                }
            }
            Event::Deliver(d) => sink.deliver(d),
        }
    }
    // The shard is gone: fail everything still waiting.
    waiters.lock().clear();
}
