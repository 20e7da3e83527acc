//! AUTH (MQTT 5 §3.15); does not exist in 3.1.1.

use bytes::{BufMut, BytesMut};

use crate::properties::AuthProperties;
use crate::read::Reader;
use crate::{DecodeError, ReasonCode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: AuthProperties,
}

impl Auth {
    pub(crate) fn decode(r: &mut Reader) -> Result<Auth, DecodeError> {
        if r.is_empty() {
            return Ok(Auth { reason: ReasonCode::Success, properties: AuthProperties::default() });
        }
        let reason = super::read_reason(r, &[ReasonCode::Success, ReasonCode::ContinueAuthentication, ReasonCode::ReAuthenticate])?;
        let properties = if r.is_empty() { AuthProperties::default() } else { AuthProperties::decode(r)? };
        Ok(Auth { reason, properties })
    }

    pub(crate) fn body_len(&self) -> usize {
        if self.reason == ReasonCode::Success && self.properties.is_empty() {
            0
        } else {
            1 + self.properties.wire_len()
        }
    }

    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        if self.body_len() > 0 {
            buf.put_u8(self.reason as u8);
            self.properties.encode(buf);
        }
    }
}
