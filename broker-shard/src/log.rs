//! The shard's message log (clustered mode): what an entry holds and how it is encoded.
//!
//! Every QoS 1/2 message a shard accepts is appended, in the same commit as its retained-message
//! change, before the publisher is answered; the entry stays until every proxy that got a copy
//! (or the reply) has confirmed it and the copies for persistent sessions are queued in Redis.
//! After a crash the shard replays what is left, and the entry's publisher identity lets it
//! recognise a PUBLISH its proxy sends again because the reply was lost: accepted once, never
//! twice.
//!
//! ```text
//! entry = version u8 (1) | publisher flag u8 | [proxy name: u16 len + UTF-8 | incarnation u64 | request id u64] | message
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

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
    pub message: Message,
}

pub fn encode(publisher: Option<&Publisher>, message: &Message) -> Bytes {
    let body = message.encode();
    let mut b = BytesMut::with_capacity(body.len() + 32);
    b.put_u8(VERSION);
    match publisher {
        Some(p) => {
            b.put_u8(1);
            let name = &p.proxy.as_bytes()[..p.proxy.len().min(u16::MAX as usize)];
            b.put_u16(name.len() as u16);
            b.put_slice(name);
            b.put_u64(p.incarnation);
            b.put_u64(p.request);
        }
        None => b.put_u8(0),
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
    let publisher = match b.get_u8() {
        0 => None,
        1 => {
            if b.remaining() < 2 {
                return Err(short());
            }
            let n = b.get_u16() as usize;
            if b.remaining() < n + 16 {
                return Err(short());
            }
            let proxy = String::from_utf8(b.split_to(n).to_vec()).map_err(|_| EntryError("proxy name is not UTF-8".into()))?;
            Some(Publisher { proxy, incarnation: b.get_u64(), request: b.get_u64() })
        }
        f => return Err(EntryError(format!("unknown publisher flag {f}"))),
    };
    let message = Message::decode(&b).map_err(|e| EntryError(e.0))?;
    Ok(Entry { publisher, message })
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
    fn entries_round_trip_with_and_without_publisher() {
        let p = Publisher { proxy: "proxy-a".into(), incarnation: 7, request: 9 };
        assert_eq!(decode(encode(Some(&p), &message())).unwrap(), Entry { publisher: Some(p), message: message() });
        assert_eq!(decode(encode(None, &message())).unwrap(), Entry { publisher: None, message: message() });
    }

    #[test]
    fn damaged_entries_are_errors_not_panics() {
        let good = encode(Some(&Publisher { proxy: "p".into(), incarnation: 1, request: 2 }), &message());
        for cut in 0..good.len() {
            assert!(decode(good.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut bad = BytesMut::from(&good[..]);
        bad[0] = 9;
        assert_eq!(decode(bad.freeze()).unwrap_err().0, "unknown version 9");
    }
}
