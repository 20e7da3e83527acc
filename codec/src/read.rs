//! Zero-copy reading of MQTT primitives from the body of one complete packet.

use bytes::{Buf, Bytes};
use bytestring::ByteString;

use crate::utf8::{self, Strictness};
use crate::varint::{read_varint, Varint};
use crate::{DecodeError, PacketId, PacketType};

/// Reads one packet body. Every error names the packet, so a truncated or malformed field is
/// reported as "SUBSCRIBE is truncated: subscription options is missing", not "eof".
pub(crate) struct Reader {
    buf: Bytes,
    packet: PacketType,
}

impl Reader {
    pub fn new(buf: Bytes, packet: PacketType) -> Reader {
        Reader { buf, packet }
    }

    pub fn packet(&self) -> PacketType {
        self.packet
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(self.truncated(what))
        } else {
            Ok(())
        }
    }

    pub fn truncated(&self, what: &'static str) -> DecodeError {
        DecodeError::Truncated { packet: self.packet, what }
    }

    pub fn malformed(&self, reason: &'static str) -> DecodeError {
        DecodeError::Malformed { packet: self.packet, reason }
    }

    pub fn protocol(&self, reason: &'static str) -> DecodeError {
        DecodeError::Protocol { packet: self.packet, reason }
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    pub fn varint(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        match read_varint(&self.buf) {
            Varint::Value(v, n) => {
                self.buf.advance(n);
                Ok(v)
            }
            Varint::Incomplete => Err(self.truncated(what)),
            Varint::TooLong => Err(self.malformed("variable byte integer longer than 4 bytes (MQTT-1.5.5-1)")),
        }
    }

    pub fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        let raw = self.u16("packet identifier")?;
        PacketId::new(raw).ok_or_else(|| self.protocol("packet identifier is 0 (MQTT-2.2.1-3)"))
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }

    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Binary Data: two-byte length, then that many bytes (MQTT 5 §1.5.6).
    pub fn binary(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u16(what)? as usize;
        self.take(len, what)
    }

    /// UTF-8 Encoded String (MQTT 5 §1.5.4), checked at the given strictness.
    pub fn string(&mut self, field: &'static str, strictness: Strictness) -> Result<ByteString, DecodeError> {
        let raw = self.binary(field)?;
        to_string(raw, self.packet, field, strictness)
    }
}

/// Validates `raw` and wraps it without copying: one UTF-8 validation (inside
/// `ByteString::try_from`), then one pass for the MQTT character rules.
pub(crate) fn to_string(raw: Bytes, packet: PacketType, field: &'static str, strictness: Strictness) -> Result<ByteString, DecodeError> {
    let s = ByteString::try_from(raw).map_err(|_| DecodeError::InvalidString { packet, field, reason: utf8::Utf8Violation::NotUtf8 })?;
    utf8::check_chars(&s, strictness).map_err(|reason| DecodeError::InvalidString { packet, field, reason })?;
    Ok(s)
}
