//! The payload every simulated publisher sends: a fixed header that lets receivers account
//! for the message, then padding to the configured size.
//!
//! ```text
//! magic "MQLT" | version 1 | publish QoS | stream u32 | seq u64 | intended send time (unix ns) u64 | padding
//!      4       |    1      |      1      |     4      |    8    |               8                  | …
//! ```
//! The send time is when the message was *meant* to be sent (open loop), so latency includes
//! any time the publisher fell behind: no coordinated omission.

use bytes::{BufMut, Bytes, BytesMut};

pub const MAGIC: &[u8; 4] = b"MQLT";
pub const HEADER_LEN: usize = 26;
const VERSION: u8 = 1;

/// What a payload says about its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// QoS the message was published with (deliveries may be downgraded).
    pub qos: u8,
    /// The (publisher, topic) sequence this message belongs to.
    pub stream: u32,
    /// Position in its stream, from 0.
    pub seq: u64,
    /// Intended send time, unix nanoseconds.
    pub sent_at_ns: u64,
}

/// How the bytes after the header look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Zero bytes: compresses well, cheap to make.
    #[default]
    Zeros,
    /// Pseudo-random bytes: what encrypted or compressed telemetry looks like.
    Random,
    /// Printable JSON-ish text: `{"t":21.5,"pad":"xxxx…"}` after the header.
    Json,
}

impl Header {
    pub fn encode(&self, size: usize, shape: Shape) -> Bytes {
        let size = size.max(HEADER_LEN);
        let mut b = BytesMut::with_capacity(size);
        b.put_slice(MAGIC);
        b.put_u8(VERSION);
        b.put_u8(self.qos);
        b.put_u32(self.stream);
        b.put_u64(self.seq);
        b.put_u64(self.sent_at_ns);
        let pad = size - HEADER_LEN;
        match shape {
            Shape::Zeros => b.put_bytes(0, pad),
            Shape::Random => {
                // xorshift seeded by the header: different per message, no RNG state to share.
                let mut x = self.seq ^ (u64::from(self.stream) << 32) ^ 0x9E37_79B9_7F4A_7C15;
                for _ in 0..pad {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b.put_u8(x as u8);
                }
            }
            Shape::Json => {
                let body = format!("{{\"t\":{}.5,\"pad\":\"", self.seq % 40);
                let mut text = body.into_bytes();
                text.resize(pad.saturating_sub(2).max(text.len()), b'x');
                text.extend_from_slice(b"\"}");
                text.truncate(pad);
                b.put_slice(&text);
                b.put_bytes(b' ', pad - text.len());
            }
        }
        b.freeze()
    }

    /// `None` for payloads not made by this tool (other traffic on the broker).
    pub fn decode(payload: &[u8]) -> Option<Header> {
        if payload.len() < HEADER_LEN || &payload[..4] != MAGIC || payload[4] != VERSION {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_be_bytes(payload[i..i + 8].try_into().expect("8 bytes"));
        Some(Header { qos: payload[5], stream: u32_at(6), seq: u64_at(10), sent_at_ns: u64_at(18) })
    }
}

/// Unix time in nanoseconds (the same clock on every process of this machine).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_every_shape_and_size() {
        let h = Header { qos: 2, stream: 77, seq: 123_456, sent_at_ns: 1_700_000_000_000_000_000 };
        for shape in [Shape::Zeros, Shape::Random, Shape::Json] {
            for size in [0, 26, 27, 64, 1000] {
                let p = h.encode(size, shape);
                assert_eq!(p.len(), size.max(HEADER_LEN));
                assert_eq!(Header::decode(&p), Some(h), "{shape:?} {size}");
            }
        }
    }

    #[test]
    fn foreign_payloads_are_ignored() {
        assert_eq!(Header::decode(b"hello world, not ours at all"), None);
        assert_eq!(Header::decode(b"MQLT"), None);
    }

    #[test]
    fn json_shape_is_text_after_the_header() {
        let p = Header { qos: 0, stream: 1, seq: 3, sent_at_ns: 0 }.encode(80, Shape::Json);
        let text = std::str::from_utf8(&p[HEADER_LEN..]).unwrap();
        assert!(text.starts_with("{\"t\":3.5,\"pad\":\"x") && text.trim_end().ends_with("\"}"), "{text}");
    }
}
