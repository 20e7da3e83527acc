//! DISCONNECT (MQTT 5 §3.14, MQTT 3.1.1 §3.14).

use bytes::{BufMut, BytesMut};

use crate::properties::DisconnectProperties;
use crate::read::Reader;
use crate::{DecodeError, Protocol, ReasonCode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Normal disconnection is `Success` (0x00).
    pub reason: ReasonCode,
    pub properties: DisconnectProperties,
}

impl Disconnect {
    pub fn new(reason: ReasonCode) -> Disconnect {
        Disconnect { reason, properties: DisconnectProperties::default() }
    }

    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Disconnect, DecodeError> {
        if !protocol.is_v5() {
            if !r.is_empty() {
                return Err(r.malformed("remaining length must be 0 in MQTT 3.1.1"));
            }
            return Ok(Disconnect::new(ReasonCode::Success));
        }
        if r.is_empty() {
            return Ok(Disconnect::new(ReasonCode::Success));
        }
        let code = r.u8("reason code")?;
        // Every reason code from 0x80 up is a valid DISCONNECT reason except the CONNACK/SUBACK
        // specific ones; below 0x80 only 0x00 and 0x04 (MQTT 5 §3.14.2.1).
        let reason = match ReasonCode::from_u8(code) {
            Some(r @ (ReasonCode::Success | ReasonCode::DisconnectWithWill)) => r,
            Some(r) if r.is_error() => r,
            _ => return Err(DecodeError::InvalidReasonCode { packet: r.packet(), code }),
        };
        let properties = if r.is_empty() { DisconnectProperties::default() } else { DisconnectProperties::decode(r)? };
        Ok(Disconnect { reason, properties })
    }

    pub(crate) fn body_len(&self, protocol: Protocol) -> usize {
        if !protocol.is_v5() {
            return 0;
        }
        match (self.reason, self.properties.is_empty()) {
            (ReasonCode::Success, true) => 0,
            (_, true) => 1,
            (_, false) => 1 + self.properties.wire_len(),
        }
    }

    pub(crate) fn encode(&self, protocol: Protocol, buf: &mut BytesMut) {
        let len = self.body_len(protocol);
        if len >= 1 {
            buf.put_u8(self.reason as u8);
        }
        if len > 1 {
            self.properties.encode(buf);
        }
    }
}
