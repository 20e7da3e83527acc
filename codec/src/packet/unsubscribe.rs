//! UNSUBSCRIBE and UNSUBACK (MQTT 5 §3.10–3.11, MQTT 3.1.1 §3.10–3.11).

use bytes::{BufMut, BytesMut};
use bytestring::ByteString;

use crate::properties::{SubAckProperties, UnsubscribeProperties};
use crate::read::Reader;
use crate::utf8::Strictness;
use crate::write::{check_field, field_len, write_field};
use crate::{DecodeError, EncodeError, PacketId, Protocol, ReasonCode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: PacketId,
    pub properties: UnsubscribeProperties,
    pub filters: Vec<ByteString>,
}

impl Unsubscribe {
    pub fn new(pkid: PacketId, filters: Vec<ByteString>) -> Unsubscribe {
        Unsubscribe { pkid, properties: UnsubscribeProperties::default(), filters }
    }

    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Unsubscribe, DecodeError> {
        let pkid = r.packet_id()?;
        let properties = if protocol.is_v5() { UnsubscribeProperties::decode(r)? } else { UnsubscribeProperties::default() };
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(r.string("topic filter", Strictness::Identifier)?);
        }
        if filters.is_empty() {
            return Err(r.protocol("UNSUBSCRIBE carries no topic filter (MQTT-3.10.3-2)"));
        }
        Ok(Unsubscribe { pkid, properties, filters })
    }

    pub(crate) fn body_len(&self, protocol: Protocol) -> usize {
        let mut n = 2;
        if protocol.is_v5() {
            n += self.properties.wire_len();
        }
        n + self.filters.iter().map(|f| field_len(f.as_bytes())).sum::<usize>()
    }

    pub(crate) fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
        buf.put_u16(self.pkid.get());
        if protocol.is_v5() {
            self.properties.encode(buf);
        }
        for f in &self.filters {
            check_field("topic filter", f.as_bytes())?;
            write_field(buf, f.as_bytes());
        }
        Ok(())
    }
}

/// UNSUBACK; in 3.1.1 it carries only the packet identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub pkid: PacketId,
    pub properties: SubAckProperties,
    /// One per filter in 5.0; empty in 3.1.1.
    pub reasons: Vec<ReasonCode>,
}

impl UnsubAck {
    pub fn new(pkid: PacketId, reasons: Vec<ReasonCode>) -> UnsubAck {
        UnsubAck { pkid, properties: SubAckProperties::default(), reasons }
    }

    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<UnsubAck, DecodeError> {
        let pkid = r.packet_id()?;
        if !protocol.is_v5() {
            return Ok(UnsubAck::new(pkid, Vec::new()));
        }
        let properties = SubAckProperties::decode(r)?;
        use ReasonCode::*;
        let allowed = [
            Success,
            NoSubscriptionExisted,
            UnspecifiedError,
            ImplementationSpecificError,
            NotAuthorized,
            TopicFilterInvalid,
            PacketIdentifierInUse,
        ];
        let mut reasons = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            reasons.push(super::read_reason(r, &allowed)?);
        }
        Ok(UnsubAck { pkid, properties, reasons })
    }

    pub(crate) fn body_len(&self, protocol: Protocol) -> usize {
        if protocol.is_v5() {
            2 + self.properties.wire_len() + self.reasons.len()
        } else {
            2
        }
    }

    pub(crate) fn encode(&self, protocol: Protocol, buf: &mut BytesMut) {
        buf.put_u16(self.pkid.get());
        if protocol.is_v5() {
            self.properties.encode(buf);
            for r in &self.reasons {
                buf.put_u8(*r as u8);
            }
        }
    }
}
