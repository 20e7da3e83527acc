//! The fixed header (MQTT 5 §2.1) and framing of a byte stream into packets.

use bytes::BytesMut;

use crate::varint::{read_varint, Varint};
use crate::{DecodeError, Packet, PacketType, Protocol};

/// Largest Remaining Length the encoding can express (4-byte Variable Byte Integer).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// A parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    pub packet_type: PacketType,
    /// The low nibble of the first byte.
    pub flags: u8,
    /// Bytes after the fixed header.
    pub remaining_len: usize,
    /// Bytes of the fixed header itself (2..=5).
    pub header_len: usize,
}

impl FixedHeader {
    /// Parses the fixed header at the start of `buf`.
    ///
    /// Returns `Ok(None)` while `buf` does not yet hold the whole header. Fails as soon as the
    /// header is known to be invalid: a reserved packet type, wrong flags, a 5-byte Remaining
    /// Length, or a packet larger than `max_size` — before any of the body is buffered.
    pub fn parse(buf: &[u8], max_size: usize) -> Result<Option<FixedHeader>, DecodeError> {
        let Some(&first) = buf.first() else { return Ok(None) };
        let packet_type = PacketType::from_nibble(first >> 4).ok_or(DecodeError::ReservedPacketType)?;
        let flags = first & 0x0f;
        if let Some(expected) = packet_type.required_flags() {
            if flags != expected {
                return Err(DecodeError::InvalidFlags { packet: packet_type, flags, expected });
            }
        }
        let (remaining_len, varint_len) = match read_varint(&buf[1..]) {
            Varint::Value(v, n) => (v as usize, n),
            Varint::Incomplete => return Ok(None),
            Varint::TooLong => return Err(DecodeError::RemainingLengthTooLong),
        };
        let header_len = 1 + varint_len;
        let size = header_len + remaining_len;
        if size > max_size {
            return Err(DecodeError::PacketTooLarge { size, max: max_size });
        }
        Ok(Some(FixedHeader { packet_type, flags, remaining_len, header_len }))
    }

    /// Length of the whole packet: fixed header plus body.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Splits the first complete packet off `buf` and decodes it.
///
/// `Ok(None)` means "need more bytes"; nothing is consumed then. On error the stream is beyond
/// repair and the connection must be closed.
///
/// `max_size` is the largest packet accepted, header included (the MQTT 5 Maximum Packet Size
/// the server announces).
pub fn decode_packet(buf: &mut BytesMut, protocol: Protocol, max_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = FixedHeader::parse(buf, max_size)? else { return Ok(None) };
    if buf.len() < header.frame_len() {
        // Reserve what the packet needs, but never more than it declared: it passed the size
        // check above, so a hostile length cannot make us allocate beyond `max_size`.
        buf.reserve(header.frame_len() - buf.len());
        return Ok(None);
    }
    let frame = buf.split_to(header.frame_len()).freeze();
    Packet::decode(header, frame.slice(header.header_len..), protocol).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_of_five_bytes_is_malformed_mqtt_1_5_5_1() {
        let err = FixedHeader::parse(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01], usize::MAX).unwrap_err();
        assert_eq!(err, DecodeError::RemainingLengthTooLong);
        assert_eq!(err.reason_code(), crate::ReasonCode::MalformedPacket);
    }

    #[test]
    fn oversize_packet_rejected_from_header_alone() {
        // PUBLISH declaring 2 MB; only the header has arrived.
        let err = FixedHeader::parse(&[0x30, 0x80, 0x80, 0x80, 0x01], 1024).unwrap_err();
        assert!(matches!(err, DecodeError::PacketTooLarge { size: 2_097_157, max: 1024 }));
        assert_eq!(err.reason_code(), crate::ReasonCode::PacketTooLarge);
    }

    #[test]
    fn reserved_type_zero_is_rejected() {
        assert_eq!(FixedHeader::parse(&[0x00, 0x00], 100), Err(DecodeError::ReservedPacketType));
    }

    #[test]
    fn wrong_flags_are_rejected_mqtt_2_1_3_1() {
        // SUBSCRIBE must have flags 0b0010.
        assert!(matches!(FixedHeader::parse(&[0x80, 0x00], 100), Err(DecodeError::InvalidFlags { .. })));
        // PINGREQ must have flags 0.
        assert!(matches!(FixedHeader::parse(&[0xC1, 0x00], 100), Err(DecodeError::InvalidFlags { .. })));
        // PUBREL must have flags 0b0010.
        assert!(matches!(FixedHeader::parse(&[0x60, 0x02], 100), Err(DecodeError::InvalidFlags { .. })));
    }

    #[test]
    fn incomplete_header_needs_more() {
        assert_eq!(FixedHeader::parse(&[], 100), Ok(None));
        assert_eq!(FixedHeader::parse(&[0x30], 100), Ok(None));
        assert_eq!(FixedHeader::parse(&[0x30, 0x80], 100), Ok(None));
    }

    #[test]
    fn byte_at_a_time_yields_the_same_packet() {
        let bytes = [0xC0u8, 0x00, 0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'];
        let mut buf = BytesMut::new();
        let mut packets = Vec::new();
        for b in bytes {
            buf.extend_from_slice(&[b]);
            while let Some(p) = decode_packet(&mut buf, Protocol::V3_1_1, 1024).unwrap() {
                packets.push(p);
            }
        }
        assert_eq!(packets.len(), 2);
        assert!(matches!(packets[0], Packet::PingReq));
        match &packets[1] {
            Packet::Publish(p) => {
                assert_eq!(&p.topic[..], "a");
                assert_eq!(&p.payload[..], b"hi");
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
        assert!(buf.is_empty());
    }
}
