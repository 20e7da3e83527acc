//! Codec errors. Each names the packet and the rule it broke, in words an operator can act on,
//! and maps to the MQTT 5 reason code a server sends before closing the connection.

use crate::{PacketType, ReasonCode};

/// Why a byte stream is not a valid MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("remaining length uses more than 4 bytes (MQTT-1.5.5-1)")]
    RemainingLengthTooLong,

    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },

    #[error("packet type 0 is reserved (MQTT-2.1.2)")]
    ReservedPacketType,

    #[error("{packet} is not defined in MQTT {version}")]
    PacketTypeNotInVersion { packet: PacketType, version: &'static str },

    #[error("{packet} has fixed-header flags {flags:#06b}, the specification requires {expected:#06b} (MQTT-2.1.3-1)")]
    InvalidFlags { packet: PacketType, flags: u8, expected: u8 },

    #[error("{packet} is truncated: {what} is missing")]
    Truncated { packet: PacketType, what: &'static str },

    #[error("{packet} is malformed: {reason}")]
    Malformed { packet: PacketType, reason: &'static str },

    #[error("{packet} breaks the protocol: {reason}")]
    Protocol { packet: PacketType, reason: &'static str },

    #[error("CONNECT asks for protocol {name:?} level {level}; supported are MQIsdp 3 (MQTT 3.1), MQTT 4 (3.1.1) and MQTT 5 (5.0)")]
    UnsupportedProtocol { name: String, level: u8 },

    #[error("{packet} {field} is not a valid MQTT string: {reason}")]
    InvalidString { packet: PacketType, field: &'static str, reason: crate::utf8::Utf8Violation },

    #[error("{packet} topic name is invalid: {reason}")]
    InvalidTopicName { packet: PacketType, reason: crate::topic::TopicError },

    #[error("{packet} carries unknown property identifier {id:#04x}")]
    UnknownProperty { packet: PacketType, id: u8 },

    #[error("{packet} may not carry the {property} property")]
    PropertyNotAllowed { packet: PacketType, property: &'static str },

    #[error("{packet} carries the {property} property more than once")]
    DuplicateProperty { packet: PacketType, property: &'static str },

    #[error("{packet} {property} property has the invalid value {value}")]
    InvalidPropertyValue { packet: PacketType, property: &'static str, value: u32 },

    #[error("{packet} carries unknown reason code {code:#04x}")]
    InvalidReasonCode { packet: PacketType, code: u8 },
}

impl DecodeError {
    /// The MQTT 5 reason code to send (in CONNACK or DISCONNECT) before closing.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            Protocol { .. } | DuplicateProperty { .. } | InvalidPropertyValue { .. } => ReasonCode::ProtocolError,
            UnsupportedProtocol { .. } => ReasonCode::UnsupportedProtocolVersion,
            InvalidTopicName { .. } => ReasonCode::TopicNameInvalid,
            PacketTypeNotInVersion { .. } => ReasonCode::ProtocolError,
            RemainingLengthTooLong
            | ReservedPacketType
            | InvalidFlags { .. }
            | Truncated { .. }
            | Malformed { .. }
            | InvalidString { .. }
            | UnknownProperty { .. }
            | PropertyNotAllowed { .. }
            | InvalidReasonCode { .. } => ReasonCode::MalformedPacket,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{packet} would be {size} bytes, more than the receiver's maximum of {max}")]
    PacketTooLarge { packet: PacketType, size: usize, max: usize },

    #[error("{packet} does not exist in MQTT {version}")]
    NotInVersion { packet: PacketType, version: &'static str },

    #[error("{field} of {len} bytes exceeds the 65535-byte limit of an MQTT string")]
    StringTooLong { field: &'static str, len: usize },
}
