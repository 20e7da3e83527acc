//! The proxy's end of a link: sends requests, matches replies to them, and hands deliveries to
//! a [`DeliverySink`]. Two transports behind one API: in-process channels (single node) and
//! TCP ([`super::tcp`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use super::local::{Inbound, EVENT_CHANNEL_CAPACITY};
use super::{Deliver, Event, LinkError, ProxyId, Reply, Request, RequestId};
use crate::ShardHandle;

/// Receives deliveries from the shards. Called on the link's reader task: it must not block.
pub trait DeliverySink: Send + Sync + 'static {
    fn deliver(&self, deliver: Deliver);
}

/// What a link tells its proxy about itself (TCP links only).
pub trait LinkEvents: Send + Sync + 'static {
    /// Requests that restore this proxy's state on the shard after a (re)connect: a Subscribe
    /// for every session with subscriptions there. Their ids are filled in by the link.
    fn resync(&self) -> Vec<Request>;
    /// The link is up and resynchronised (`again`: not the first time).
    fn linked(&self, again: bool);
}

pub(crate) type Waiters = Mutex<HashMap<u64, oneshot::Sender<Result<Reply, LinkError>>>>;

/// A link from this proxy to one shard. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

pub(crate) enum Transport {
    /// The shard's inbox, in this process.
    Local { tx: mpsc::Sender<Inbound>, proxy: ProxyId },
    /// The link task's queue. Bounded: when the shard is away and the queue is full, requests
    /// are refused at once ([`LinkError::Busy`]) instead of stalling connections.
    Tcp { tx: mpsc::Sender<Request>, capacity: usize },
}

pub(crate) struct Inner {
    pub(crate) shard: Mutex<Arc<str>>,
    pub(crate) transport: Transport,
    /// Requests awaiting their reply; completed by the reader, failed by it when the link gives
    /// up on them.
    pub(crate) waiters: Arc<Waiters>,
    pub(crate) next_id: Arc<AtomicU64>,
    /// Round trips of requests with a reply, once the proxy's metrics are attached.
    pub(crate) latency: OnceLock<Histogram>,
}

impl Client {
    /// Opens an in-process link to `shard` and starts its reader task.
    pub async fn connect_local(shard: &ShardHandle, proxy: ProxyId, sink: Arc<dyn DeliverySink>) -> Result<Client, LinkError> {
        let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let down = || LinkError::Down { shard: shard.name().to_owned() };
        shard.tx.send(Inbound::Connect { proxy, name: "local".into(), incarnation: 0, events: events_tx }).await.map_err(|_| down())?;
        let waiters: Arc<Waiters> = Arc::default();
        tokio::spawn(read_local_events(events_rx, waiters.clone(), sink));
        Ok(Client {
            inner: Arc::new(Inner {
                shard: Mutex::new(shard.name().into()),
                transport: Transport::Local { tx: shard.tx.clone(), proxy },
                waiters,
                next_id: Arc::new(AtomicU64::new(1)),
                latency: OnceLock::new(),
            }),
        })
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Client {
        Client { inner }
    }

    /// The shard's name (its address until a TCP link learned the name).
    pub fn shard(&self) -> Arc<str> {
        self.inner.shard.lock().clone()
    }

    /// Times every request with a reply from now on (the first histogram given stays).
    pub fn observe_latency(&self, h: Histogram) {
        let _ = self.inner.latency.set(h);
    }

    /// Requests sent and awaiting their reply.
    pub fn awaiting_reply(&self) -> usize {
        self.inner.waiters.lock().len()
    }

    /// Requests queued for the link task and not yet written (TCP links; 0 in process).
    pub fn queued(&self) -> usize {
        match &self.inner.transport {
            Transport::Local { .. } => 0,
            Transport::Tcp { tx, capacity } => capacity.saturating_sub(tx.capacity()),
        }
    }

    fn down(&self) -> LinkError {
        LinkError::Down { shard: self.shard().to_string() }
    }

    /// Sends a request that needs no reply.
    pub async fn send(&self, request: Request) -> Result<(), LinkError> {
        match &self.inner.transport {
            Transport::Local { tx, proxy } => tx.send(Inbound::Request { proxy: *proxy, request }).await.map_err(|_| self.down()),
            Transport::Tcp { tx, capacity } => tx.try_send(request).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => LinkError::Busy { shard: self.shard().to_string(), buffered: *capacity },
                mpsc::error::TrySendError::Closed(_) => self.down(),
            }),
        }
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
        let timing = self.inner.latency.get().map(|h| (h.clone(), tokio::time::Instant::now()));
        Ok(async move {
            let result = match rx.await {
                Ok(result) => result,
                Err(_) => Err(down),
            };
            if let Some((h, started)) = timing {
                h.observe(started.elapsed().as_secs_f64());
            }
            result
        })
    }

    /// Tells the shard this proxy is going away (its sessions go offline there).
    pub async fn close(&self) {
        if let Transport::Local { tx, proxy } = &self.inner.transport {
            let _ = tx.send(Inbound::Disconnect { proxy: *proxy }).await;
        }
    }
}

/// Completes a waiter with a reply from the shard.
pub(crate) fn complete(waiters: &Waiters, event: Event, sink: &dyn DeliverySink) {
    match event {
        Event::Reply { id, result } => {
            if let Some(w) = waiters.lock().remove(&id.0) {
                let _ = w.send(result.map_err(LinkError::from));
            }
        }
        Event::Deliver(d) => sink.deliver(d),
    }
}

async fn read_local_events(mut rx: mpsc::Receiver<Event>, waiters: Arc<Waiters>, sink: Arc<dyn DeliverySink>) {
    while let Some(event) = rx.recv().await {
        complete(&waiters, event, sink.as_ref());
    }
    // The shard is gone: fail everything still waiting.
    waiters.lock().clear();
}
