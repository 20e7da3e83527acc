//! CONNACK (MQTT 5 §3.2, MQTT 3.1.1 §3.2).

use bytes::{BufMut, BytesMut};

use crate::properties::ConnAckProperties;
use crate::read::Reader;
use crate::{DecodeError, Protocol, ReasonCode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// Written as the closest 3.1.1 return code for 3.1.1 connections.
    pub reason: ReasonCode,
    pub properties: ConnAckProperties,
}

impl ConnAck {
    pub fn new(reason: ReasonCode, session_present: bool) -> ConnAck {
        ConnAck { session_present, reason, properties: ConnAckProperties::default() }
    }

    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<ConnAck, DecodeError> {
        let flags = r.u8("connect acknowledge flags")?;
        if flags & 0xfe != 0 {
            return Err(r.malformed("reserved connect acknowledge flags are set (MQTT-3.2.2-1)"));
        }
        let code = r.u8("reason code")?;
        let (reason, properties) = if protocol.is_v5() {
            let reason = ReasonCode::from_u8(code).ok_or(DecodeError::InvalidReasonCode { packet: r.packet(), code })?;
            (reason, ConnAckProperties::decode(r)?)
        } else {
            let reason = ReasonCode::from_v3_connack(code).ok_or(DecodeError::InvalidReasonCode { packet: r.packet(), code })?;
            (reason, ConnAckProperties::default())
        };
        // MQTT 3.1 has no Session Present flag: the bit is not read, as it is not written
        // (found by the mqtt_decode fuzz target: decode and encode disagreed).
        Ok(ConnAck { session_present: flags & 1 != 0 && protocol != Protocol::V3_1, reason, properties })
    }

    pub(crate) fn body_len(&self, protocol: Protocol) -> usize {
        2 + if protocol.is_v5() { self.properties.wire_len() } else { 0 }
    }

    pub(crate) fn encode(&self, protocol: Protocol, buf: &mut BytesMut) {
        // MQTT 3.1 has no Session Present flag; the byte is reserved.
        let present = self.session_present && protocol != Protocol::V3_1;
        buf.put_u8(u8::from(present));
        if protocol.is_v5() {
            buf.put_u8(self.reason as u8);
            self.properties.encode(buf);
        } else {
            buf.put_u8(self.reason.to_v3_connack());
        }
    }
}
