//! MQTT's rules for UTF-8 strings (MQTT 5 §1.5.4), on top of Rust's UTF-8 validation, which
//! already rejects surrogates (U+D800..U+DFFF) and overlong encodings [MQTT-1.5.4-1].

use std::fmt;

/// How a string breaks the MQTT string rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Utf8Violation {
    /// Not well-formed UTF-8 (includes encoded surrogates) [MQTT-1.5.4-1].
    NotUtf8,
    /// Contains U+0000 [MQTT-1.5.4-2].
    Null,
    /// Contains a control character (U+0001..U+001F, U+007F..U+009F) or a non-character
    /// (U+FFFE, U+FFFF, …): allowed by MQTT-1.5.4 only as "SHOULD NOT"; we refuse them in
    /// identifiers and topics, where they only serve to confuse logs and ACLs.
    ControlOrNonCharacter(char),
}

impl fmt::Display for Utf8Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Utf8Violation::NotUtf8 => f.write_str("not well-formed UTF-8 (MQTT-1.5.4-1)"),
            Utf8Violation::Null => f.write_str("contains U+0000 (MQTT-1.5.4-2)"),
            Utf8Violation::ControlOrNonCharacter(c) => {
                write!(f, "contains the control or non-character U+{:04X}", *c as u32)
            }
        }
    }
}

/// How strictly a string field is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// The MUSTs only: well-formed, no U+0000. For free-text fields (user properties,
    /// content type, reason strings).
    Text,
    /// Also no control characters or non-characters. For client identifiers, user names and
    /// topics.
    Identifier,
}

/// Checks `bytes` against the MQTT string rules and returns it as `&str`.
pub fn validate(bytes: &[u8], strictness: Strictness) -> Result<&str, Utf8Violation> {
    let s = std::str::from_utf8(bytes).map_err(|_| Utf8Violation::NotUtf8)?;
    check_chars(s, strictness)?;
    Ok(s)
}

/// The MQTT character rules on an already valid `&str`.
///
/// Hot path (every topic and client id): eight bytes at a time (SWAR) prove the common case —
/// printable ASCII; only a string with something else is looked at character by character.
pub fn check_chars(s: &str, strictness: Strictness) -> Result<(), Utf8Violation> {
    if is_printable_ascii(s.as_bytes()) {
        return Ok(());
    }
    for c in s.chars() {
        if c == '\0' {
            return Err(Utf8Violation::Null);
        }
        if strictness == Strictness::Identifier && (c.is_control() || is_noncharacter(c)) {
            return Err(Utf8Violation::ControlOrNonCharacter(c));
        }
    }
    Ok(())
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// True if every byte is in 0x20..=0x7E.
fn is_printable_ascii(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        // High bit set in a byte of `x` (>= 0x80), or of `x + 1` (0x7F), or a borrow from
        // `x - 0x20` (< 0x20): any of them flags the word.
        if (x | x.wrapping_add(ONES) | x.wrapping_sub(0x20 * ONES) & !x) & HIGHS != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| (0x20..0x7F).contains(&b))
}

fn is_noncharacter(c: char) -> bool {
    let v = c as u32;
    (0xFDD0..=0xFDEF).contains(&v) || (v & 0xFFFE) == 0xFFFE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_is_refused_in_every_field_mqtt_1_5_4_2() {
        assert_eq!(validate(b"a\0b", Strictness::Text), Err(Utf8Violation::Null));
        assert_eq!(validate(b"a\0b", Strictness::Identifier), Err(Utf8Violation::Null));
    }

    #[test]
    fn encoded_surrogate_is_not_utf8_mqtt_1_5_4_1() {
        // U+D800 encoded as in CESU-8.
        assert_eq!(validate(b"\xED\xA0\x80", Strictness::Text), Err(Utf8Violation::NotUtf8));
    }

    #[test]
    fn control_characters_are_refused_in_identifiers_only() {
        assert!(validate(b"a\x01b", Strictness::Text).is_ok());
        assert!(validate(b"a\x01b", Strictness::Identifier).is_err());
        assert!(validate("a\u{85}b".as_bytes(), Strictness::Identifier).is_err());
        assert!(validate("a\u{FFFF}b".as_bytes(), Strictness::Identifier).is_err());
        assert!(validate("a\u{7F}b".as_bytes(), Strictness::Identifier).is_err());
    }

    #[test]
    fn swar_check_agrees_with_the_plain_definition() {
        for len in 0..40 {
            for bad in [0u8, 0x1f, 0x7f, 0x80, 0xff, b' ', b'~', b'a'] {
                for pos in 0..len.max(1) {
                    let mut v = vec![b'x'; len];
                    if len > 0 {
                        v[pos] = bad;
                    }
                    let expected = v.iter().all(|&b| (0x20..0x7F).contains(&b));
                    assert_eq!(is_printable_ascii(&v), expected, "{v:?}");
                }
            }
        }
    }

    #[test]
    fn ordinary_unicode_is_accepted() {
        assert_eq!(validate("température/°C".as_bytes(), Strictness::Identifier), Ok("température/°C"));
    }
}
