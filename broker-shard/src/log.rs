//! The shard's message log (clustered mode): what an entry holds and how it is encoded.
//!
//! Every QoS 1/2 message a shard accepts is appended, in the same commit as its retained-message
//! change, before the publisher is answered; the entry stays until every proxy that got a copy
//! (or the reply) has confirmed it and the copies for persistent sessions are queued in Redis.
//! After a crash the shard replays what is left, and the entry's publisher identity lets it
//! recognise a PUBLISH its proxy sends again because the reply was lost: accepted once, never
//! twice. A will carries which connection's will it is, so that a replay asks the cluster
//! again whether to publish it (see `session_store::Op::AcceptWill`).
//!
//! ```text
//! entry     = version u8 (1) | flags u8 (1: publisher, 2: will) | [publisher] | [will] | message
//! publisher = proxy name: u16 len + UTF-8 | incarnation u64 | request id u64
//! will      = client id: u16 len + UTF-8 | connection epoch u64 | proxy id: u16 len + UTF-8
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqfleet_codec::ByteString;

use crate::link::WillRef;
use crate::message::Message;

const VERSION: u8 = 1;

/// Who sent a logged message: a request of one run of one proxy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Publisher {
    pub proxy: String,
    /// Random per proxy process: request ids restart when a proxy restarts.
    pub incarnation: u64,
    pub request: u64,
}

/// A decoded log entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub publisher: Option<Publisher>,
    pub will: Option<WillRef>,
    pub message: Message,
}

const HAS_PUBLISHER: u8 = 1;
const HAS_WILL: u8 = 2;

fn put_str(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

pub fn encode(publisher: Option<&Publisher>, will: Option<&WillRef>, message: &Message) -> Bytes {
    let body = message.encode();
    let mut b = BytesMut::with_capacity(body.len() + 32);
    b.put_u8(VERSION);
    b.put_u8(if publisher.is_some() { HAS_PUBLISHER } else { 0 } | if will.is_some() { HAS_WILL } else { 0 });
    if let Some(p) = publisher {
        put_str(&mut b, &p.proxy);
        b.put_u64(p.incarnation);
        b.put_u64(p.request);
    }
    if let Some(w) = will {
        put_str(&mut b, &w.client_id);
        b.put_u64(w.epoch);
        put_str(&mut b, &w.proxy);
    }
    b.put_slice(&body);
    b.freeze()
}

/// Why a log entry cannot be read (the shard skips it and says so).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log entry unreadable: {0}")]
pub struct EntryError(pub String);

pub fn decode(mut b: Bytes) -> Result<Entry, EntryError> {
    let short = || EntryError("truncated".into());
    if b.remaining() < 2 {
        return Err(short());
    }
    let version = b.get_u8();
    if version != VERSION {
        return Err(EntryError(format!("unknown version {version}")));
    }
    let flags = b.get_u8();
    if flags & !(HAS_PUBLISHER | HAS_WILL) != 0 {
        return Err(EntryError(format!("unknown flags {flags}")));
    }
    let string = |b: &mut Bytes, what: &str| -> Result<String, EntryError> {
        if b.remaining() < 2 {
            return Err(short());
        }
        let n = b.get_u16() as usize;
        if b.remaining() < n {
            return Err(short());
        }
        String::from_utf8(b.split_to(n).to_vec()).map_err(|_| EntryError(format!("{what} is not UTF-8")))
    };
    let u64_of = |b: &mut Bytes| if b.remaining() < 8 { Err(short()) } else { Ok(b.get_u64()) };
    let publisher = if flags & HAS_PUBLISHER != 0 {
        let proxy = string(&mut b, "proxy name")?;
        Some(Publisher { proxy, incarnation: u64_of(&mut b)?, request: u64_of(&mut b)? })
    } else {
        None
    };
    let will = if flags & HAS_WILL != 0 {
        let client_id = ByteString::from(string(&mut b, "will client id")?);
        let epoch = u64_of(&mut b)?;
        Some(WillRef { client_id, epoch, proxy: ByteString::from(string(&mut b, "will proxy id")?) })
    } else {
        None
    };
    let message = Message::decode(&b).map_err(|e| EntryError(e.0))?;
    Ok(Entry { publisher, will, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqfleet_codec::{PublishProperties, QoS};

    fn message() -> Message {
        Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: PublishProperties::default(),
            expires_at_ms: Some(42),
            origin: Some("dev-1".into()),
        }
    }

    #[test]
    fn entries_round_trip_with_and_without_publisher_and_will() {
        let p = Publisher { proxy: "proxy-a".into(), incarnation: 7, request: 9 };
        let w = WillRef { client_id: "dev-1".into(), epoch: 1_700_000_000_000_001, proxy: "proxy-b".into() };
        for (publisher, will) in [(None, None), (Some(p.clone()), None), (None, Some(w.clone())), (Some(p), Some(w))] {
            let entry = Entry { publisher: publisher.clone(), will: will.clone(), message: message() };
            assert_eq!(decode(encode(publisher.as_ref(), will.as_ref(), &message())).unwrap(), entry);
        }
    }

    #[test]
    fn damaged_entries_are_errors_not_panics() {
        let will = WillRef { client_id: "c".into(), epoch: 3, proxy: "p".into() };
        let good = encode(Some(&Publisher { proxy: "p".into(), incarnation: 1, request: 2 }), Some(&will), &message());
        for cut in 0..good.len() {
            assert!(decode(good.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut bad = BytesMut::from(&good[..]);
        bad[0] = 9;
        assert_eq!(decode(bad.freeze()).unwrap_err().0, "unknown version 9");
    }
}
