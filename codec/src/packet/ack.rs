//! PUBACK, PUBREC, PUBREL and PUBCOMP (MQTT 5 §3.4–3.7): a packet identifier, and in 5.0 a
//! reason code and properties, both omitted when they are Success and empty.

use bytes::{BufMut, BytesMut};

use crate::properties::AckProperties;
use crate::read::Reader;
use crate::{DecodeError, PacketId, PacketType, Protocol, ReasonCode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub pkid: PacketId,
    pub reason: ReasonCode,
    pub properties: AckProperties,
}

impl Ack {
    pub fn new(pkid: PacketId) -> Ack {
        Ack { pkid, reason: ReasonCode::Success, properties: AckProperties::default() }
    }

    pub fn with_reason(pkid: PacketId, reason: ReasonCode) -> Ack {
        Ack { pkid, reason, properties: AckProperties::default() }
    }

    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Ack, DecodeError> {
        let pkid = r.packet_id()?;
        if !protocol.is_v5() || r.is_empty() {
            return Ok(Ack::new(pkid));
        }
        use ReasonCode::*;
        let allowed: &[ReasonCode] = match r.packet() {
            PacketType::PubAck | PacketType::PubRec => &[
                Success,
                NoMatchingSubscribers,
                UnspecifiedError,
                ImplementationSpecificError,
                NotAuthorized,
                TopicNameInvalid,
                PacketIdentifierInUse,
                QuotaExceeded,
                PayloadFormatInvalid,
            ],
            _ => &[Success, PacketIdentifierNotFound],
        };
        let reason = super::read_reason(r, allowed)?;
        let properties = if r.is_empty() { AckProperties::default() } else { AckProperties::decode(r)? };
        Ok(Ack { pkid, reason, properties })
    }

    pub(crate) fn body_len(&self, protocol: Protocol) -> usize {
        if !protocol.is_v5() {
            return 2;
        }
        match (self.reason, self.properties.is_empty()) {
            (ReasonCode::Success, true) => 2,
            (_, true) => 3,
            (_, false) => 3 + self.properties.wire_len(),
        }
    }

    pub(crate) fn encode(&self, protocol: Protocol, buf: &mut BytesMut) {
        buf.put_u16(self.pkid.get());
        let len = self.body_len(protocol);
        if len > 2 {
            buf.put_u8(self.reason as u8);
        }
        if len > 3 {
            self.properties.encode(buf);
        }
    }
}
