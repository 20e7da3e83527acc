//! Writing MQTT primitives.

use bytes::{BufMut, BytesMut};

use crate::EncodeError;

/// Length of a UTF-8 string or binary field on the wire.
pub(crate) fn field_len(s: &[u8]) -> usize {
    2 + s.len()
}

pub(crate) fn check_field(field: &'static str, s: &[u8]) -> Result<(), EncodeError> {
    if s.len() > u16::MAX as usize {
        return Err(EncodeError::StringTooLong { field, len: s.len() });
    }
    Ok(())
}

/// Writes a two-byte length and the bytes. Callers check lengths with [`check_field`] first;
/// a longer field is truncated to keep the stream well-formed.
pub(crate) fn write_field(buf: &mut BytesMut, s: &[u8]) {
    let len = s.len().min(u16::MAX as usize);
    buf.put_u16(len as u16);
    buf.put_slice(&s[..len]);
}
