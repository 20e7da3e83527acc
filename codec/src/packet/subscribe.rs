//! SUBSCRIBE and SUBACK (MQTT 5 §3.8–3.9, MQTT 3.1.1 §3.8–3.9).

use bytes::{BufMut, BytesMut};
use bytestring::ByteString;

use crate::properties::{SubAckProperties, SubscribeProperties};
use crate::read::Reader;
use crate::utf8::Strictness;
use crate::write::{check_field, field_len, write_field};
use crate::{DecodeError, EncodeError, PacketId, Protocol, QoS, ReasonCode};

/// When retained messages are sent for a new subscription (MQTT 5 §3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetainHandling {
    /// Send retained messages at the time of the subscribe.
    #[default]
    OnSubscribe = 0,
    /// Send them only if the subscription did not already exist.
    OnNewSubscription = 1,
    /// Do not send them.
    Never = 2,
}

/// Subscription options (MQTT 5 §3.8.3.1); in 3.1.1 only `qos` is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS the server may send to this subscription.
    pub qos: QoS,
    /// Do not deliver the subscriber's own messages [MQTT-3.8.3-3].
    pub no_local: bool,
    /// Keep the RETAIN flag of forwarded messages as published.
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    pub fn qos(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions { qos, ..Default::default() }
    }

    fn to_byte(self) -> u8 {
        (self.retain_handling as u8) << 4 | u8::from(self.retain_as_published) << 3 | u8::from(self.no_local) << 2 | self.qos as u8
    }
}

/// A SUBSCRIBE packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: PacketId,
    pub properties: SubscribeProperties,
    /// Topic filters as sent: validity is checked per filter by the server, which answers an
    /// invalid one with a failure code in SUBACK rather than closing the connection.
    pub filters: Vec<(ByteString, SubscriptionOptions)>,
}

impl Subscribe {
    pub fn new(pkid: PacketId, filters: Vec<(ByteString, SubscriptionOptions)>) -> Subscribe {
        Subscribe { pkid, properties: SubscribeProperties::default(), filters }
    }

    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Subscribe, DecodeError> {
        let pkid = r.packet_id()?;
        let properties = if protocol.is_v5() { SubscribeProperties::decode(r)? } else { SubscribeProperties::default() };
        let mut filters = Vec::new();
        while !r.is_empty() {
            let filter = r.string("topic filter", Strictness::Identifier)?;
            let byte = r.u8("subscription options")?;
            let reserved = if protocol.is_v5() { 0b1100_0000 } else { 0b1111_1100 };
            if byte & reserved != 0 {
                return Err(r.malformed("reserved bits of the subscription options are set (MQTT-3.8.3-5)"));
            }
            let qos = QoS::from_u8(byte & 0b11).ok_or_else(|| r.malformed("subscription QoS is 3 (MQTT-3.8.3-4)"))?;
            let retain_handling = match (byte >> 4) & 0b11 {
                0 => RetainHandling::OnSubscribe,
                1 => RetainHandling::OnNewSubscription,
                2 => RetainHandling::Never,
                _ => return Err(r.protocol("Retain Handling is 3")),
            };
            let options =
                SubscriptionOptions { qos, no_local: byte & 0b0100 != 0, retain_as_published: byte & 0b1000 != 0, retain_handling };
            filters.push((filter, options));
        }
        if filters.is_empty() {
            return Err(r.protocol("SUBSCRIBE carries no topic filter (MQTT-3.8.3-2)"));
        }
        Ok(Subscribe { pkid, properties, filters })
    }

    pub(crate) fn body_len(&self, protocol: Protocol) -> usize {
        let mut n = 2;
        if protocol.is_v5() {
            n += self.properties.wire_len();
        }
        n + self.filters.iter().map(|(f, _)| field_len(f.as_bytes()) + 1).sum::<usize>()
    }

    pub(crate) fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
        buf.put_u16(self.pkid.get());
        if protocol.is_v5() {
            self.properties.encode(buf);
        }
        for (filter, options) in &self.filters {
            check_field("topic filter", filter.as_bytes())?;
            write_field(buf, filter.as_bytes());
            let byte = if protocol.is_v5() { options.to_byte() } else { options.qos as u8 };
            buf.put_u8(byte);
        }
        Ok(())
    }
}

/// A SUBACK packet: one reason code per filter, in order [MQTT-3.8.4-6].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub pkid: PacketId,
    pub properties: SubAckProperties,
    pub reasons: Vec<ReasonCode>,
}

impl SubAck {
    pub fn new(pkid: PacketId, reasons: Vec<ReasonCode>) -> SubAck {
        SubAck { pkid, properties: SubAckProperties::default(), reasons }
    }

    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<SubAck, DecodeError> {
        let pkid = r.packet_id()?;
        let properties = if protocol.is_v5() { SubAckProperties::decode(r)? } else { SubAckProperties::default() };
        use ReasonCode::*;
        let allowed: &[ReasonCode] = if protocol.is_v5() {
            &[
                Success,
                GrantedQoS1,
                GrantedQoS2,
                UnspecifiedError,
                ImplementationSpecificError,
                NotAuthorized,
                TopicFilterInvalid,
                PacketIdentifierInUse,
                QuotaExceeded,
                SharedSubscriptionsNotSupported,
                SubscriptionIdentifiersNotSupported,
                WildcardSubscriptionsNotSupported,
            ]
        } else {
            &[Success, GrantedQoS1, GrantedQoS2, UnspecifiedError]
        };
        let mut reasons = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            reasons.push(super::read_reason(r, allowed)?);
        }
        Ok(SubAck { pkid, properties, reasons })
    }

    pub(crate) fn body_len(&self, protocol: Protocol) -> usize {
        2 + self.reasons.len() + if protocol.is_v5() { self.properties.wire_len() } else { 0 }
    }

    pub(crate) fn encode(&self, protocol: Protocol, buf: &mut BytesMut) {
        buf.put_u16(self.pkid.get());
        if protocol.is_v5() {
            self.properties.encode(buf);
            for r in &self.reasons {
                buf.put_u8(*r as u8);
            }
        } else {
            for r in &self.reasons {
                buf.put_u8(r.to_v3_suback());
            }
        }
    }
}
