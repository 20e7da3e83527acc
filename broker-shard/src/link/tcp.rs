//! The proxy's end of a TCP link: one task per (proxy, shard) that keeps the connection up.
//!
//! # What it guarantees
//! - Requests keep their order. While the shard is away they wait in a bounded queue (callers
//!   get [`LinkError::Busy`] when it is full, never a stall); requests already sent but not
//!   answered are sent again after the reconnect, so a QoS 1/2 PUBLISH is never acknowledged
//!   without the shard's reply, and a shard restart disconnects no device.
//! - A request not answered within the timeout fails with [`LinkError::Timeout`].
//! - After every (re)connect the proxy's subscriptions for this shard are sent again
//!   ([`LinkEvents::resync`]), then `ResyncDone`, then the unanswered requests.
//! - Flow control: the shard grants credit for requests, this end grants credit for events;
//!   neither side sends frames the other has not made room for.
//! - Reconnects back off exponentially with jitter, from 50 ms to 5 s.
//! - Logged deliveries and replies (clustered mode) are confirmed to the shard with one
//!   watermark per lane ([`Request::Received`]); a logged delivery at or below its lane's
//!   watermark was received before (the shard sends unconfirmed ones again after a relink or a
//!   restart) and is dropped here, so a device never gets it twice from the shard.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{complete, Client, DeliverySink, Inner, LinkEvents, Transport, Waiters};
use super::frame::{decode_next, encode, for_version, Frame, VERSION};
use super::{Deliver, Event, LinkError, Reply, Request, RequestId};

/// Settings of one link.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Where the shard listens.
    pub addr: String,
    /// This proxy's stable name (the shard keys its routes by it).
    pub proxy: String,
    /// Requests that may wait while the shard is away.
    pub max_buffered: usize,
    /// Longest wait for a reply.
    pub request_timeout: Duration,
    /// Events this end accepts before granting more credit.
    pub credit: u32,
    /// Random per proxy process (see `Frame::Hello`).
    pub incarnation: u64,
    /// How often received logged events are confirmed to the shard (they only let it trim
    /// its log; tests stretch it to keep entries there).
    pub confirm_every: Duration,
}

impl TcpConfig {
    pub fn new(addr: impl Into<String>, proxy: impl Into<String>) -> TcpConfig {
        TcpConfig {
            addr: addr.into(),
            proxy: proxy.into(),
            max_buffered: 65_536,
            request_timeout: Duration::from_secs(30),
            credit: 1024,
            incarnation: process_incarnation(),
            confirm_every: Duration::from_millis(50),
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Idle links ping so a dead peer is noticed.
const PING_EVERY: Duration = Duration::from_secs(5);

/// A number for this process's run: the same for every link, different after a restart.
pub fn process_incarnation() -> u64 {
    static INCARNATION: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *INCARNATION.get_or_init(unique_now)
}

/// A number not given out before on this machine: the time in nanoseconds mixed with the
/// process id (two processes starting in the same nanosecond still differ).
pub fn unique_now() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ u64::from(std::process::id()).rotate_left(40)
}

/// What this proxy has received of a shard's logged events.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct Watermarks {
    log_id: u64,
    accepted: u64,
    queued: u64,
}

impl Watermarks {
    /// Takes note of `event`; false if it was received before.
    fn admit(&mut self, event: &Event) -> bool {
        match event {
            Event::Deliver(Deliver { log: Some(r), .. }) => {
                let mark = if r.queued { &mut self.queued } else { &mut self.accepted };
                if r.position <= *mark {
                    return false;
                }
                *mark = r.position;
                true
            }
            Event::Reply { result: Ok(Reply::Accepted { position }), .. } => {
                self.accepted = self.accepted.max(*position);
                true
            }
            _ => true,
        }
    }
}

impl Client {
    /// Starts the link task for one shard and returns its client at once; the connection is
    /// made (and remade) in the background.
    pub fn connect_tcp(config: TcpConfig, sink: Arc<dyn DeliverySink>, events: Arc<dyn LinkEvents>, shutdown: CancellationToken) -> Client {
        let (tx, rx) = mpsc::channel(config.max_buffered.max(1));
        let inner = Arc::new(Inner {
            shard: Mutex::new(config.addr.as_str().into()),
            transport: Transport::Tcp { tx, capacity: config.max_buffered },
            waiters: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            latency: std::sync::OnceLock::new(),
        });
        let task = LinkTask {
            config,
            rx,
            inner: inner.clone(),
            sink,
            events,
            unacked: BTreeMap::new(),
            peer_version: VERSION,
            marks: Watermarks::default(),
            confirmed: Watermarks::default(),
            shutdown,
        };
        tokio::spawn(task.run());
        Client::from_inner(inner)
    }
}

struct LinkTask {
    config: TcpConfig,
    rx: mpsc::Receiver<Request>,
    inner: Arc<Inner>,
    sink: Arc<dyn DeliverySink>,
    events: Arc<dyn LinkEvents>,
    /// Sent requests with an id, awaiting their reply: sent again after a reconnect.
    unacked: BTreeMap<u64, (Request, Instant)>,
    /// The link version the shard answered with: requests are written as it understands them
    /// (a rolling upgrade links new proxies to old shards).
    peer_version: u16,
    /// Received from the shard, and what the shard was last told.
    marks: Watermarks,
    confirmed: Watermarks,
    shutdown: CancellationToken,
}

enum Ended {
    Shutdown,
    Lost(String),
}

impl LinkTask {
    fn waiters(&self) -> &Waiters {
        &self.inner.waiters
    }

    fn shard(&self) -> String {
        self.inner.shard.lock().to_string()
    }

    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut linked_before = false;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            match self.session(&mut linked_before).await {
                Ended::Shutdown => return,
                Ended::Lost(why) => {
                    tracing::warn!(shard = %self.shard(), addr = %self.config.addr, error = %why, "shard link lost; reconnecting");
                }
            }
            if linked_before {
                backoff = BACKOFF_MIN;
            }
            self.expire_old_requests();
            // Full jitter: a fleet of proxies does not reconnect in lockstep.
            let wait = backoff.mul_f64(rand_fraction());
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Fails requests that waited longer than the timeout.
    fn expire_old_requests(&mut self) {
        let now = Instant::now();
        let timeout = self.config.request_timeout;
        let expired: Vec<u64> = self.unacked.iter().filter(|(_, (_, t))| now - *t > timeout).map(|(id, _)| *id).collect();
        for id in expired {
            self.unacked.remove(&id);
            if let Some(w) = self.waiters().lock().remove(&id) {
                let _ = w.send(Err(LinkError::Timeout { shard: self.shard(), seconds: timeout.as_secs() }));
            }
        }
    }

    /// One connection: handshake, resync, resend, then frames both ways until it breaks.
    async fn session(&mut self, linked_before: &mut bool) -> Ended {
        let stream = tokio::select! {
            r = TcpStream::connect(&self.config.addr) => match r {
                Ok(s) => s,
                Err(e) => return Ended::Lost(format!("connect: {e}")),
            },
            () = self.shutdown.cancelled() => return Ended::Shutdown,
        };
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let mut rbuf = BytesMut::with_capacity(64 * 1024);
        let mut wbuf = BytesMut::with_capacity(64 * 1024);
        let hello = Frame::Hello {
            version: VERSION,
            proxy: self.config.proxy.clone(),
            incarnation: self.config.incarnation,
            ring_epoch: 0,
            credit: self.config.credit,
        };
        encode(&hello, &mut wbuf);
        if let Err(e) = writer.write_all(&wbuf).await {
            return Ended::Lost(e.to_string());
        }
        wbuf.clear();
        let welcome = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(f) = decode_next(&mut rbuf).map_err(|e| e.to_string())? {
                    return Ok::<_, String>(f);
                }
                if reader.read_buf(&mut rbuf).await.map_err(|e| e.to_string())? == 0 {
                    return Err("closed during the handshake".into());
                }
            }
        })
        .await;
        let mut request_credit = match welcome {
            Ok(Ok(Frame::Welcome { version, shard, credit, log_id, .. })) => {
                *self.inner.shard.lock() = shard.as_str().into();
                self.peer_version = version;
                if log_id != self.marks.log_id {
                    // A new log (first link, or the shard lost its disk): positions start over.
                    self.marks = Watermarks { log_id, ..Watermarks::default() };
                }
                // A confirmation may have died with the last connection: repeat it.
                self.confirmed = Watermarks { log_id, ..Watermarks::default() };
                credit
            }
            Ok(Ok(Frame::Refused { reason })) => return Ended::Lost(format!("refused: {reason}")),
            Ok(Ok(other)) => return Ended::Lost(format!("unexpected handshake frame {other:?}")),
            Ok(Err(e)) => return Ended::Lost(e),
            Err(_) => return Ended::Lost("no Welcome in time".into()),
        };

        // Resync, then what was sent but not answered, in the original order. These go out
        // regardless of credit: the shard sized its credit for a full resync.
        for mut r in self.events.resync() {
            if let Request::Subscribe { id, .. } = &mut r {
                *id = RequestId(self.inner.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            }
            encode(&Frame::Request(r), &mut wbuf);
        }
        encode(&Frame::Request(Request::ResyncDone), &mut wbuf);
        for (r, _) in self.unacked.values() {
            encode(&Frame::Request(for_version(r.clone(), self.peer_version)), &mut wbuf);
            request_credit = request_credit.saturating_sub(1);
        }
        tracing::info!(shard = %self.shard(), addr = %self.config.addr, resent = self.unacked.len(), "shard linked");
        self.events.linked(*linked_before);
        *linked_before = true;

        let mut processed_events: u32 = 0;
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut confirm = tokio::time::interval_at(Instant::now() + self.config.confirm_every, self.config.confirm_every);
        confirm.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            if processed_events >= self.config.credit / 2 {
                encode(&Frame::Credit(processed_events), &mut wbuf);
                processed_events = 0;
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    let _ = writer.write_all(&wbuf).await;
                    return Ended::Shutdown;
                }
                r = writer.write_all(&wbuf), if !wbuf.is_empty() => {
                    if let Err(e) = r {
                        return Ended::Lost(e.to_string());
                    }
                    wbuf.clear();
                }
                r = reader.read_buf(&mut rbuf) => {
                    match r {
                        Ok(0) => return Ended::Lost("closed by the shard".into()),
                        Ok(_) => heard = Instant::now(),
                        Err(e) => return Ended::Lost(e.to_string()),
                    }
                    loop {
                        match decode_next(&mut rbuf) {
                            Ok(Some(Frame::Event(ev))) => {
                                processed_events += 1;
                                if !self.marks.admit(&ev) {
                                    continue; // sent again by the shard; delivered before
                                }
                                if let Event::Reply { id, .. } = &ev {
                                    self.unacked.remove(&id.0);
                                }
                                complete(self.waiters(), ev, self.sink.as_ref());
                            }
                            Ok(Some(Frame::Credit(n))) => request_credit = request_credit.saturating_add(n),
                            Ok(Some(Frame::Ping)) => encode(&Frame::Pong, &mut wbuf),
                            Ok(Some(Frame::Pong)) => {}
                            Ok(Some(Frame::Refused { reason })) => return Ended::Lost(format!("shard refused: {reason}")),
                            Ok(Some(other)) => return Ended::Lost(format!("unexpected frame {other:?}")),
                            Ok(None) => break,
                            Err(e) => return Ended::Lost(e.to_string()),
                        }
                    }
                }
                req = self.rx.recv(), if request_credit > 0 => {
                    let Some(req) = req else { return Ended::Shutdown };
                    self.send(req, &mut wbuf, &mut request_credit);
                    // Batch what is already queued into the same write.
                    while request_credit > 0 && wbuf.len() < 1 << 20 {
                        match self.rx.try_recv() {
                            Ok(req) => self.send(req, &mut wbuf, &mut request_credit),
                            Err(_) => break,
                        }
                    }
                }
                _ = confirm.tick() => {
                    if self.marks != self.confirmed {
                        let m = self.marks;
                        encode(&Frame::Request(Request::Received { accepted: m.accepted, queued: m.queued }), &mut wbuf);
                        self.confirmed = m;
                    }
                }
                _ = ping.tick() => {
                    if heard.elapsed() > PING_EVERY * 3 {
                        return Ended::Lost("shard silent for 15 s".into());
                    }
                    encode(&Frame::Ping, &mut wbuf);
                    self.expire_old_requests();
                }
            }
        }
    }

    fn send(&mut self, req: Request, wbuf: &mut BytesMut, credit: &mut u32) {
        if let Some(id) = request_id(&req) {
            // A caller that gave up (timeout, dropped future) needs no resend.
            if self.waiters().lock().contains_key(&id) {
                self.unacked.insert(id, (req.clone(), Instant::now()));
            }
        }
        encode(&Frame::Request(for_version(req, self.peer_version)), wbuf);
        *credit -= 1;
    }
}

fn request_id(r: &Request) -> Option<u64> {
    match r {
        Request::Publish { id, .. } => id.map(|i| i.0),
        Request::Subscribe { id, .. } | Request::Unsubscribe { id, .. } | Request::Attach { id, .. } => Some(id.0),
        _ => None,
    }
}

/// A number in (0.5, 1]: jitter without a random-number dependency in this crate.
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    0.5 + f64::from(nanos % 1000) / 2000.0
}
