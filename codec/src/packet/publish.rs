//! PUBLISH (MQTT 5 §3.3, MQTT 3.1.1 §3.3).

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::properties::{id, nonzero, PublishProperties};
use crate::read::Reader;
use crate::topic;
use crate::utf8::Strictness;
use crate::write::{check_field, field_len, write_field};
use crate::{DecodeError, EncodeError, PacketId, PacketType, Protocol, QoS};

/// A PUBLISH packet.
///
/// # Invariants
/// `pkid` is `Some` exactly when `qos` is not 0 [MQTT-2.2.1-2]; `dup` is false for QoS 0
/// [MQTT-3.3.1-2].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty only in MQTT 5 together with a Topic Alias.
    pub topic: ByteString,
    pub pkid: Option<PacketId>,
    pub properties: PublishProperties,
    pub payload: Bytes,
}

impl Publish {
    /// A PUBLISH; `pkid` must be given for QoS 1 and 2.
    pub fn new(topic: impl Into<ByteString>, qos: QoS, payload: impl Into<Bytes>, pkid: Option<PacketId>) -> Publish {
        Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            pkid: if qos == QoS::AtMostOnce { None } else { pkid },
            properties: PublishProperties::default(),
            payload: payload.into(),
        }
    }

    pub(crate) fn flags(&self) -> u8 {
        u8::from(self.dup) << 3 | (self.qos as u8) << 1 | u8::from(self.retain)
    }

    #[inline]
    pub(crate) fn decode(r: &mut Reader, flags: u8, protocol: Protocol) -> Result<Publish, DecodeError> {
        let dup = flags & 0b1000 != 0;
        let retain = flags & 0b0001 != 0;
        let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or_else(|| r.malformed("QoS bits are both set (MQTT-3.3.1-4)"))?;
        if qos == QoS::AtMostOnce && dup {
            return Err(r.malformed("DUP is set on a QoS 0 message (MQTT-3.3.1-2)"));
        }
        let topic = r.string("topic name", Strictness::Identifier)?;
        topic::check_wildcards_in_name(&topic).map_err(|reason| DecodeError::InvalidTopicName { packet: PacketType::Publish, reason })?;
        if topic.is_empty() && !protocol.is_v5() {
            return Err(DecodeError::InvalidTopicName { packet: PacketType::Publish, reason: topic::TopicError::Empty });
        }
        let pkid = if qos == QoS::AtMostOnce { None } else { Some(r.packet_id()?) };
        let properties = if protocol.is_v5() {
            let p = PublishProperties::decode(r)?;
            nonzero(PacketType::Publish, id::TOPIC_ALIAS, p.topic_alias.map(u32::from))?;
            if topic.is_empty() && p.topic_alias.is_none() {
                return Err(DecodeError::InvalidTopicName { packet: PacketType::Publish, reason: topic::TopicError::Empty });
            }
            p
        } else {
            PublishProperties::default()
        };
        let payload = r.rest();
        Ok(Publish { dup, qos, retain, topic, pkid, properties, payload })
    }

    pub(crate) fn body_len(&self, protocol: Protocol) -> usize {
        let mut n = field_len(self.topic.as_bytes());
        if self.pkid.is_some() {
            n += 2;
        }
        if protocol.is_v5() {
            n += self.properties.wire_len();
        }
        n + self.payload.len()
    }

    pub(crate) fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
        check_field("topic name", self.topic.as_bytes())?;
        write_field(buf, self.topic.as_bytes());
        if let Some(pkid) = self.pkid {
            buf.put_u16(pkid.get());
        }
        if protocol.is_v5() {
            self.properties.encode(buf);
        }
        buf.put_slice(&self.payload);
        Ok(())
    }
}
