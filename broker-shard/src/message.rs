//! The application message as it travels between tiers and rests in stores.

use bytes::{BufMut, Bytes, BytesMut};
use mqfleet_codec::{decode_packet, ByteString, Packet, PacketId, Protocol, Publish, PublishProperties, QoS};

/// An application message accepted by the system.
///
/// # Invariants
/// `properties.topic_alias` is `None` and `properties.subscription_identifiers` is empty: both
/// are per-connection and set on the way out. `properties.message_expiry_interval` is `None`:
/// expiry is carried as the absolute `expires_at_ms`, so waiting in a queue counts against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: ByteString,
    pub payload: Bytes,
    /// QoS as published.
    pub qos: QoS,
    /// RETAIN as published.
    pub retain: bool,
    pub properties: PublishProperties,
    /// Unix time (ms) after which the message must not be delivered.
    pub expires_at_ms: Option<u64>,
    /// Client id of the publisher, for No Local; `None` for messages of the system itself.
    pub origin: Option<ByteString>,
}

impl Message {
    /// Builds a message from a received PUBLISH (topic alias already resolved).
    pub fn from_publish(p: Publish, origin: Option<ByteString>, now_ms: u64) -> Message {
        let mut properties = p.properties;
        let expires_at_ms = properties.message_expiry_interval.take().map(|s| now_ms + u64::from(s) * 1000);
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        Message { topic: p.topic, payload: p.payload, qos: p.qos, retain: p.retain, properties, expires_at_ms, origin }
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| now_ms > t)
    }

    /// Seconds left before expiry, rounded up, as sent onwards [MQTT-3.3.2-6]; `None` if the
    /// message does not expire.
    pub fn remaining_expiry_secs(&self, now_ms: u64) -> Option<u32> {
        self.expires_at_ms.map(|t| (t.saturating_sub(now_ms).div_ceil(1000)).min(u64::from(u32::MAX)) as u32)
    }

    /// A PUBLISH of this message for one subscriber; topic alias and subscription ids are the
    /// caller's.
    pub fn to_publish(&self, qos: QoS, retain: bool, pkid: Option<PacketId>, now_ms: u64) -> Publish {
        let mut properties = self.properties.clone();
        properties.message_expiry_interval = self.remaining_expiry_secs(now_ms);
        Publish { dup: false, qos, retain, topic: self.topic.clone(), pkid, properties, payload: self.payload.clone() }
    }

    /// Encodes the message for stores and links: a version byte, the expiry, the origin, then
    /// the message as an MQTT 5 PUBLISH — reusing the codec's strict, tested encoding.
    pub fn encode(&self) -> Bytes {
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: self.qos,
            retain: self.retain,
            topic: self.topic.clone(),
            // A placeholder: stored messages have no packet id, but QoS > 0 PUBLISH needs one.
            pkid: (self.qos != QoS::AtMostOnce).then(|| PacketId::new(1).expect("1 is non-zero")),
            properties: self.properties.clone(),
            payload: self.payload.clone(),
        });
        let origin = self.origin.as_ref().map(|o| o.as_bytes().as_ref()).unwrap_or(b"");
        let mut buf = BytesMut::with_capacity(16 + origin.len() + publish.encoded_len(Protocol::V5));
        buf.put_u8(FORMAT_VERSION);
        buf.put_u64(self.expires_at_ms.unwrap_or(0));
        buf.put_u8(u8::from(self.origin.is_some()));
        buf.put_u16(origin.len() as u16);
        buf.put_slice(origin);
        // Encoding a PUBLISH built from valid parts cannot fail: fields were length-checked when
        // decoded from the client.
        let _ = publish.encode(Protocol::V5, &mut buf);
        buf.freeze()
    }

    /// Decodes what [`Message::encode`] wrote.
    pub fn decode(bytes: &Bytes) -> Result<Message, MessageDecodeError> {
        let err = |detail: &'static str| MessageDecodeError(detail.into());
        if bytes.len() < 12 || bytes[0] != FORMAT_VERSION {
            return Err(err("unknown format version or truncated header"));
        }
        let expires = u64::from_be_bytes(bytes[1..9].try_into().map_err(|_| err("truncated expiry"))?);
        let has_origin = bytes[9] == 1;
        let origin_len = u16::from_be_bytes([bytes[10], bytes[11]]) as usize;
        if bytes.len() < 12 + origin_len {
            return Err(err("truncated origin"));
        }
        let origin = if has_origin {
            Some(ByteString::try_from(bytes.slice(12..12 + origin_len)).map_err(|_| err("origin is not UTF-8"))?)
        } else {
            None
        };
        let mut rest = BytesMut::from(&bytes[12 + origin_len..]);
        match decode_packet(&mut rest, Protocol::V5, usize::MAX) {
            Ok(Some(Packet::Publish(p))) => Ok(Message {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties: p.properties,
                expires_at_ms: (expires != 0).then_some(expires),
                origin,
            }),
            Ok(_) => Err(err("not a PUBLISH")),
            Err(e) => Err(MessageDecodeError(e.to_string())),
        }
    }
}

const FORMAT_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored message cannot be decoded: {0}")]
pub struct MessageDecodeError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let mut m = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: PublishProperties::default(),
            expires_at_ms: Some(12_345),
            origin: Some("dev-1".into()),
        };
        m.properties.content_type = Some("text/plain".into());
        m.properties.user_properties.push(("k".into(), "v".into()));
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        m.origin = None;
        m.expires_at_ms = None;
        m.qos = QoS::AtMostOnce;
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&b""[..], b"\x01", b"\x02aaaaaaaaaaaaaaaa", b"\x01\0\0\0\0\0\0\0\0\x01\xff\xff"] {
            assert!(Message::decode(&Bytes::copy_from_slice(bytes)).is_err());
        }
    }

    #[test]
    fn expiry_is_decremented_by_the_time_waited_mqtt_3_3_2_6() {
        let p = Publish {
            properties: PublishProperties { message_expiry_interval: Some(10), ..Default::default() },
            ..Publish::new("t", QoS::AtMostOnce, Bytes::new(), None)
        };
        let m = Message::from_publish(p, None, 1_000);
        assert_eq!(m.expires_at_ms, Some(11_000));
        assert_eq!(m.to_publish(QoS::AtMostOnce, false, None, 4_500).properties.message_expiry_interval, Some(7));
        assert!(!m.is_expired(11_000));
        assert!(m.is_expired(11_001));
    }
}
