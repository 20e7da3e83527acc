//! Variable Byte Integer (MQTT 5 §1.5.5): 7 bits per byte, at most 4 bytes.

/// Largest value a Variable Byte Integer can carry.
pub const VARINT_MAX: u32 = 268_435_455;

/// Outcome of reading a Variable Byte Integer from the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Varint {
    /// The value and how many bytes it took.
    Value(u32, usize),
    /// The buffer ends inside the integer.
    Incomplete,
    /// A fifth byte would be needed [MQTT-1.5.5-1].
    TooLong,
}

pub(crate) fn read_varint(buf: &[u8]) -> Varint {
    let mut value: u32 = 0;
    for (i, &byte) in buf.iter().enumerate().take(4) {
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Varint::Value(value, i + 1);
        }
    }
    if buf.len() >= 4 {
        Varint::TooLong
    } else {
        Varint::Incomplete
    }
}

/// Bytes needed to encode `value`.
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn write_varint(buf: &mut bytes::BytesMut, mut value: usize) {
    use bytes::BufMut;
    debug_assert!(value <= VARINT_MAX as usize);
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_boundaries_round_trip() {
        // Table 1-1 of MQTT 5 §1.5.5.
        for (value, len) in [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4), (268_435_455, 4)] {
            let mut buf = bytes::BytesMut::new();
            write_varint(&mut buf, value);
            assert_eq!(buf.len(), len, "length of {value}");
            assert_eq!(varint_len(value), len);
            assert_eq!(read_varint(&buf), Varint::Value(value as u32, len));
        }
    }

    #[test]
    fn five_byte_encoding_is_rejected_mqtt_1_5_5_1() {
        assert_eq!(read_varint(&[0x80, 0x80, 0x80, 0x80, 0x01]), Varint::TooLong);
    }

    #[test]
    fn truncated_varint_is_incomplete() {
        assert_eq!(read_varint(&[0x80, 0x80]), Varint::Incomplete);
        assert_eq!(read_varint(&[]), Varint::Incomplete);
    }
}
