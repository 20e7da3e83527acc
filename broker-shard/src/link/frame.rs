//! The link's wire format: one frame per message, length-delimited, versioned.
//!
//! ```text
//! frame   = length u32 (bytes after it) | kind u8 | body
//! string  = length u16 | UTF-8        blob = length u32 | bytes
//! ```
//! Messages inside requests and events use [`Message::encode`] (itself an MQTT 5 PUBLISH), so
//! the link carries nothing the codec does not already validate.
//!
//! Decoding never panics and never trusts a length: every read is bounds-checked, frames above
//! [`MAX_FRAME`] are refused before their body is buffered.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqfleet_codec::{ByteString, QoS, RetainHandling, SubscriptionOptions};

use super::{
    ConnId, Deliver, DeliveryOptions, Event, LogRef, Marker, Recipient, Reply, Request, RequestId, SessionInfo, ShardError, ShardStats,
    SubscribeItem, WillRef,
};
use crate::message::Message;

/// Version of this format. A proxy says which it speaks (Hello); a shard answers with that
/// version if it knows it (Welcome), and the proxy writes its requests for the version
/// answered ([`for_version`]), so that a shard upgraded first keeps serving the proxies of the
/// previous release. (A proxy does not fall back to an older shard's version yet.) 3: wills
/// carry [`Marker::Will`].
pub const VERSION: u16 = 3;
/// The oldest version a shard still accepts.
pub const MIN_VERSION: u16 = 2;

/// `r` as a peer speaking `version` reads it. Before version 3 a will carries no marker: that
/// shard publishes every copy it gets, so a proxy dying just after the shard took the will can
/// have it published twice (its settler sends it again) while the upgrade is under way.
pub fn for_version(r: Request, version: u16) -> Request {
    match r {
        Request::Publish { id, message, marker: Some(Marker::Will(_)) } if version < 3 => Request::Publish { id, message, marker: None },
        r => r,
    }
}

/// Largest frame accepted: a delivery to every connection of a busy proxy fits easily.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Proxy → shard, first frame: who it is and how many frames the shard may send before
    /// waiting for credit.
    Hello {
        version: u16,
        proxy: String,
        /// Random per proxy process: a new value tells the shard the proxy restarted (its
        /// connections and request ids are new).
        incarnation: u64,
        ring_epoch: u64,
        credit: u32,
    },
    /// Shard → proxy answer to `Hello`.
    Welcome {
        version: u16,
        shard: String,
        /// Identifies the shard's log: positions are comparable only within one log (a shard
        /// that lost its disk starts a new one).
        log_id: u64,
        ring_epoch: u64,
        credit: u32,
    },
    /// Either side refuses the link (version mismatch, shutting down) and closes it.
    Refused {
        reason: String,
    },
    Request(Request),
    Event(Event),
    /// The receiver processed this many frames: the sender may send this many more.
    Credit(u32),
    Ping,
    Pong,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("link frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("link frame truncated while reading {0}")]
    Truncated(&'static str),
    #[error("link frame has unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("link frame field {0} is not valid")]
    Invalid(&'static str),
    #[error("link frame carries an unreadable message: {0}")]
    Message(String),
}

// === encoding ===

fn put_str(b: &mut BytesMut, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    b.put_u16(len as u16);
    b.put_slice(&s.as_bytes()[..len]);
}

fn put_blob(b: &mut BytesMut, v: &[u8]) {
    b.put_u32(v.len() as u32);
    b.put_slice(v);
}

fn put_opt_u32(b: &mut BytesMut, v: Option<u32>) {
    match v {
        Some(x) => {
            b.put_u8(1);
            b.put_u32(x);
        }
        None => b.put_u8(0),
    }
}

fn put_opt_u64(b: &mut BytesMut, v: Option<u64>) {
    match v {
        Some(x) => {
            b.put_u8(1);
            b.put_u64(x);
        }
        None => b.put_u8(0),
    }
}

fn put_session(b: &mut BytesMut, s: &SessionInfo) {
    put_str(b, &s.client_id);
    put_opt_u64(b, s.conn.map(|c| c.0));
    b.put_u8(u8::from(s.persistent));
}

fn put_options(b: &mut BytesMut, o: &SubscriptionOptions) {
    b.put_u8(o.qos as u8 | u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | (o.retain_handling as u8) << 4);
}

fn put_delivery(b: &mut BytesMut, d: &DeliveryOptions) {
    b.put_u8(d.qos as u8 | u8::from(d.retain) << 2);
    b.put_u16(d.subscription_ids.len() as u16);
    for id in &d.subscription_ids {
        b.put_u32(*id);
    }
}

fn put_message(b: &mut BytesMut, m: &Message) {
    put_blob(b, &m.encode());
}

/// Appends `frame` (with its length prefix) to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0); // length, patched below
    match frame {
        Frame::Hello { version, proxy, incarnation, ring_epoch, credit } => {
            out.put_u8(1);
            out.put_u16(*version);
            put_str(out, proxy);
            out.put_u64(*incarnation);
            out.put_u64(*ring_epoch);
            out.put_u32(*credit);
        }
        Frame::Welcome { version, shard, log_id, ring_epoch, credit } => {
            out.put_u8(2);
            out.put_u16(*version);
            put_str(out, shard);
            out.put_u64(*log_id);
            out.put_u64(*ring_epoch);
            out.put_u32(*credit);
        }
        Frame::Refused { reason } => {
            out.put_u8(3);
            put_str(out, reason);
        }
        Frame::Request(r) => {
            out.put_u8(4);
            encode_request(r, out);
        }
        Frame::Event(e) => {
            out.put_u8(5);
            encode_event(e, out);
        }
        Frame::Credit(n) => {
            out.put_u8(6);
            out.put_u32(*n);
        }
        Frame::Ping => out.put_u8(7),
        Frame::Pong => out.put_u8(8),
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn encode_request(r: &Request, b: &mut BytesMut) {
    match r {
        Request::Publish { id, message, marker } => {
            b.put_u8(0);
            put_opt_u64(b, id.map(|i| i.0));
            put_message(b, message);
            match marker {
                None => b.put_u8(0),
                Some(Marker::Qos2 { client_id, pkid }) => {
                    b.put_u8(1);
                    put_str(b, client_id);
                    b.put_u16(*pkid);
                }
                Some(Marker::Will(w)) => {
                    b.put_u8(2);
                    put_str(b, &w.client_id);
                    b.put_u64(w.epoch);
                    put_str(b, &w.proxy);
                }
            }
        }
        Request::Subscribe { id, session, items, deliver_retained } => {
            b.put_u8(1);
            b.put_u64(id.0);
            put_session(b, session);
            put_opt_u64(b, *deliver_retained);
            b.put_u32(items.len() as u32);
            for i in items {
                put_str(b, &i.filter);
                put_options(b, &i.options);
                put_opt_u32(b, i.id);
            }
        }
        Request::Unsubscribe { id, client_id, filters } => {
            b.put_u8(2);
            b.put_u64(id.0);
            put_str(b, client_id);
            b.put_u32(filters.len() as u32);
            for f in filters {
                put_str(b, f);
            }
        }
        Request::Attach { id, session } => {
            b.put_u8(3);
            b.put_u64(id.0);
            put_session(b, session);
        }
        Request::Detach { client_id, conn } => {
            b.put_u8(4);
            put_str(b, client_id);
            b.put_u64(conn.0);
        }
        Request::Forget { client_id, conn } => {
            b.put_u8(5);
            put_str(b, client_id);
            put_opt_u64(b, conn.map(|c| c.0));
        }
        Request::Redispatch { message, share_filter, exclude } => {
            b.put_u8(6);
            put_message(b, message);
            put_str(b, share_filter);
            put_str(b, exclude);
        }
        Request::ResyncDone => b.put_u8(7),
        Request::Received { accepted, queued } => {
            b.put_u8(8);
            b.put_u64(*accepted);
            b.put_u64(*queued);
        }
        Request::Flush { id } => {
            b.put_u8(9);
            b.put_u64(id.0);
        }
        Request::AdoptRetained { id, messages, removed } => {
            b.put_u8(10);
            b.put_u64(id.0);
            b.put_u32(messages.len() as u32);
            for m in messages {
                put_message(b, m);
            }
            b.put_u32(removed.len() as u32);
            for t in removed {
                put_str(b, t);
            }
        }
        Request::Stats { id } => {
            b.put_u8(12);
            b.put_u64(id.0);
        }
        Request::AdoptSubscriptions { id, items } => {
            b.put_u8(11);
            b.put_u64(id.0);
            b.put_u32(items.len() as u32);
            for (client, i) in items {
                put_str(b, client);
                put_str(b, &i.filter);
                put_options(b, &i.options);
                put_opt_u32(b, i.id);
            }
        }
    }
}

fn encode_event(e: &Event, b: &mut BytesMut) {
    match e {
        Event::Reply { id, result } => {
            b.put_u8(0);
            b.put_u64(id.0);
            match result {
                Ok(Reply::Done) => b.put_u8(0),
                Ok(Reply::Subscribed { existed, retained }) => {
                    b.put_u8(1);
                    b.put_u32(existed.len() as u32);
                    for e in existed {
                        b.put_u8(u8::from(*e));
                    }
                    b.put_u32(retained.len() as u32);
                    for (m, d) in retained {
                        put_message(b, m);
                        put_delivery(b, d);
                    }
                }
                Ok(Reply::Unsubscribed { existed }) => {
                    b.put_u8(2);
                    b.put_u32(existed.len() as u32);
                    for e in existed {
                        b.put_u8(u8::from(*e));
                    }
                }
                Ok(Reply::Accepted { position }) => {
                    b.put_u8(4);
                    b.put_u64(*position);
                }
                Ok(Reply::Stats(st)) => {
                    b.put_u8(6);
                    for v in [st.sessions, st.subscriptions, st.retained_messages, st.retained_bytes, st.log_entries, st.ring_epoch] {
                        b.put_u64(v);
                    }
                }
                Err(ShardError::Store { shard, detail }) => {
                    b.put_u8(3);
                    put_str(b, shard);
                    put_str(b, detail);
                }
                Err(ShardError::QuotaExceeded { shard, detail }) => {
                    b.put_u8(5);
                    put_str(b, shard);
                    put_str(b, detail);
                }
            }
        }
        Event::Deliver(d) => {
            b.put_u8(1);
            put_message(b, &d.message);
            b.put_u32(d.recipients.len() as u32);
            for r in &d.recipients {
                b.put_u64(r.conn.0);
                put_delivery(b, &r.delivery);
                put_opt_u64(b, r.seq);
                match &r.share_filter {
                    Some(f) => {
                        b.put_u8(1);
                        put_str(b, f);
                    }
                    None => b.put_u8(0),
                }
            }
            match d.log {
                None => b.put_u8(0),
                Some(LogRef { position, queued }) => {
                    b.put_u8(1 + u8::from(queued));
                    b.put_u64(position);
                }
            }
        }
    }
}

// === decoding ===

struct Rd(Bytes);

impl Rd {
    fn need(&self, n: usize, what: &'static str) -> Result<(), FrameError> {
        if self.0.remaining() < n {
            Err(FrameError::Truncated(what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        self.need(2, what)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        self.need(8, what)?;
        Ok(self.0.get_u64())
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, FrameError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FrameError::Invalid(what)),
        }
    }
    fn string(&mut self, what: &'static str) -> Result<ByteString, FrameError> {
        let n = self.u16(what)? as usize;
        self.need(n, what)?;
        ByteString::try_from(self.0.split_to(n)).map_err(|_| FrameError::Invalid(what))
    }
    fn blob(&mut self, what: &'static str) -> Result<Bytes, FrameError> {
        let n = self.u32(what)? as usize;
        self.need(n, what)?;
        Ok(self.0.split_to(n))
    }
    fn opt_u32(&mut self, what: &'static str) -> Result<Option<u32>, FrameError> {
        Ok(if self.bool(what)? { Some(self.u32(what)?) } else { None })
    }
    fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>, FrameError> {
        Ok(if self.bool(what)? { Some(self.u64(what)?) } else { None })
    }
    /// A count of items each at least `min_size` bytes: refuses counts the frame cannot hold,
    /// so a hostile count allocates nothing.
    fn count(&mut self, what: &'static str, min_size: usize) -> Result<usize, FrameError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_size) > self.0.remaining() {
            return Err(FrameError::Truncated(what));
        }
        Ok(n)
    }
    fn message(&mut self) -> Result<Arc<Message>, FrameError> {
        let b = self.blob("message")?;
        Message::decode(&b).map(Arc::new).map_err(|e| FrameError::Message(e.0))
    }
    fn session(&mut self) -> Result<SessionInfo, FrameError> {
        Ok(SessionInfo {
            client_id: self.string("client id")?,
            conn: self.opt_u64("connection")?.map(ConnId),
            persistent: self.bool("persistent")?,
        })
    }
    fn options(&mut self) -> Result<SubscriptionOptions, FrameError> {
        let b = self.u8("subscription options")?;
        Ok(SubscriptionOptions {
            qos: QoS::from_u8(b & 0b11).ok_or(FrameError::Invalid("subscription QoS"))?,
            no_local: b & 0b100 != 0,
            retain_as_published: b & 0b1000 != 0,
            retain_handling: match (b >> 4) & 0b11 {
                0 => RetainHandling::OnSubscribe,
                1 => RetainHandling::OnNewSubscription,
                2 => RetainHandling::Never,
                _ => return Err(FrameError::Invalid("retain handling")),
            },
        })
    }
    fn delivery(&mut self) -> Result<DeliveryOptions, FrameError> {
        let b = self.u8("delivery")?;
        let n = self.u16("subscription ids")? as usize;
        self.need(n * 4, "subscription ids")?;
        Ok(DeliveryOptions {
            qos: QoS::from_u8(b & 0b11).ok_or(FrameError::Invalid("delivery QoS"))?,
            retain: b & 0b100 != 0,
            subscription_ids: (0..n).map(|_| self.0.get_u32()).collect(),
        })
    }
}

/// Reads the length prefix at the start of `buf`: `Ok(None)` until it is complete; an error for
/// an oversize frame, before its body arrives.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    Ok(Some(n))
}

/// Splits the next complete frame off `buf` and decodes it; `Ok(None)` means "need more".
pub fn decode_next(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let Some(n) = frame_len(buf)? else { return Ok(None) };
    if buf.len() < 4 + n {
        buf.reserve(4 + n - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    decode(buf.split_to(n).freeze()).map(Some)
}

/// Decodes one frame body (without its length prefix).
pub fn decode(body: Bytes) -> Result<Frame, FrameError> {
    let mut r = Rd(body);
    let frame = match r.u8("frame kind")? {
        1 => Frame::Hello {
            version: r.u16("version")?,
            proxy: r.string("proxy")?.to_string(),
            incarnation: r.u64("incarnation")?,
            ring_epoch: r.u64("ring epoch")?,
            credit: r.u32("credit")?,
        },
        2 => Frame::Welcome {
            version: r.u16("version")?,
            shard: r.string("shard")?.to_string(),
            log_id: r.u64("log id")?,
            ring_epoch: r.u64("ring epoch")?,
            credit: r.u32("credit")?,
        },
        3 => Frame::Refused { reason: r.string("reason")?.to_string() },
        4 => Frame::Request(decode_request(&mut r)?),
        5 => Frame::Event(decode_event(&mut r)?),
        6 => Frame::Credit(r.u32("credit")?),
        7 => Frame::Ping,
        8 => Frame::Pong,
        tag => return Err(FrameError::UnknownTag { what: "frame", tag }),
    };
    if r.0.has_remaining() {
        return Err(FrameError::Invalid("bytes after the frame"));
    }
    Ok(frame)
}

fn decode_request(r: &mut Rd) -> Result<Request, FrameError> {
    Ok(match r.u8("request kind")? {
        0 => {
            let id = r.opt_u64("request id")?.map(RequestId);
            let message = r.message()?;
            let marker = match r.u8("marker")? {
                0 => None,
                1 => Some(Marker::Qos2 { client_id: r.string("marker client")?, pkid: r.u16("marker packet id")? }),
                2 => Some(Marker::Will(WillRef {
                    client_id: r.string("will client")?,
                    epoch: r.u64("will epoch")?,
                    proxy: r.string("will proxy")?,
                })),
                tag => return Err(FrameError::UnknownTag { what: "publish marker", tag }),
            };
            Request::Publish { id, message, marker }
        }
        1 => {
            let id = RequestId(r.u64("request id")?);
            let session = r.session()?;
            let deliver_retained = r.opt_u64("deliver retained")?;
            let n = r.count("subscriptions", 4)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(SubscribeItem { filter: r.string("filter")?, options: r.options()?, id: r.opt_u32("subscription id")? });
            }
            Request::Subscribe { id, session, items, deliver_retained }
        }
        2 => {
            let id = RequestId(r.u64("request id")?);
            let client_id = r.string("client id")?;
            let n = r.count("filters", 2)?;
            let filters = (0..n).map(|_| r.string("filter")).collect::<Result<_, _>>()?;
            Request::Unsubscribe { id, client_id, filters }
        }
        3 => Request::Attach { id: RequestId(r.u64("request id")?), session: r.session()? },
        4 => Request::Detach { client_id: r.string("client id")?, conn: ConnId(r.u64("connection")?) },
        5 => Request::Forget { client_id: r.string("client id")?, conn: r.opt_u64("connection")?.map(ConnId) },
        6 => Request::Redispatch { message: r.message()?, share_filter: r.string("share filter")?, exclude: r.string("exclude")? },
        7 => Request::ResyncDone,
        8 => Request::Received { accepted: r.u64("accepted position")?, queued: r.u64("queued position")? },
        9 => Request::Flush { id: RequestId(r.u64("request id")?) },
        10 => {
            let id = RequestId(r.u64("request id")?);
            let n = r.count("retained messages", 4)?;
            let messages = (0..n).map(|_| r.message()).collect::<Result<_, _>>()?;
            let n = r.count("removed topics", 2)?;
            let removed = (0..n).map(|_| r.string("removed topic")).collect::<Result<_, _>>()?;
            Request::AdoptRetained { id, messages, removed }
        }
        11 => {
            let id = RequestId(r.u64("request id")?);
            let n = r.count("subscriptions", 6)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                let client = r.string("client id")?;
                items.push((
                    client,
                    SubscribeItem { filter: r.string("filter")?, options: r.options()?, id: r.opt_u32("subscription id")? },
                ));
            }
            Request::AdoptSubscriptions { id, items }
        }
        12 => Request::Stats { id: RequestId(r.u64("request id")?) },
        tag => return Err(FrameError::UnknownTag { what: "request", tag }),
    })
}

fn decode_event(r: &mut Rd) -> Result<Event, FrameError> {
    Ok(match r.u8("event kind")? {
        0 => {
            let id = RequestId(r.u64("request id")?);
            let result = match r.u8("reply kind")? {
                0 => Ok(Reply::Done),
                1 => {
                    let n = r.count("existed", 1)?;
                    let existed = (0..n).map(|_| r.bool("existed")).collect::<Result<_, _>>()?;
                    let m = r.count("retained", 8)?;
                    let mut retained = Vec::with_capacity(m);
                    for _ in 0..m {
                        retained.push((r.message()?, r.delivery()?));
                    }
                    Ok(Reply::Subscribed { existed, retained })
                }
                2 => {
                    let n = r.count("existed", 1)?;
                    Ok(Reply::Unsubscribed { existed: (0..n).map(|_| r.bool("existed")).collect::<Result<_, _>>()? })
                }
                4 => Ok(Reply::Accepted { position: r.u64("log position")? }),
                6 => Ok(Reply::Stats(ShardStats {
                    sessions: r.u64("sessions")?,
                    subscriptions: r.u64("subscriptions")?,
                    retained_messages: r.u64("retained messages")?,
                    retained_bytes: r.u64("retained bytes")?,
                    log_entries: r.u64("log entries")?,
                    ring_epoch: r.u64("ring epoch")?,
                })),
                3 => Err(ShardError::Store { shard: r.string("shard")?.to_string(), detail: r.string("detail")?.to_string() }),
                5 => Err(ShardError::QuotaExceeded { shard: r.string("shard")?.to_string(), detail: r.string("detail")?.to_string() }),
                tag => return Err(FrameError::UnknownTag { what: "reply", tag }),
            };
            Event::Reply { id, result }
        }
        1 => {
            let message = r.message()?;
            let n = r.count("recipients", 12)?;
            let mut recipients = Vec::with_capacity(n);
            for _ in 0..n {
                recipients.push(Recipient {
                    conn: ConnId(r.u64("connection")?),
                    delivery: r.delivery()?,
                    seq: r.opt_u64("queue position")?,
                    share_filter: if r.bool("shared")? { Some(r.string("share filter")?) } else { None },
                });
            }
            let log = match r.u8("log reference")? {
                0 => None,
                tag @ (1 | 2) => Some(LogRef { position: r.u64("log position")?, queued: tag == 2 }),
                tag => return Err(FrameError::UnknownTag { what: "log reference", tag }),
            };
            Event::Deliver(Deliver { message, recipients, log })
        }
        tag => return Err(FrameError::UnknownTag { what: "event", tag }),
    })
}
