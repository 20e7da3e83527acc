//! MQTT 3.1, 3.1.1 and 5.0 packet codec, without I/O.
//!
//! # Layout
//! - [`frame`]: the fixed header and framing of a byte stream into packets. Oversize packets are
//!   rejected from the fixed header alone, before their body is buffered.
//! - [`packet`]: one module per packet family; each has `decode` (from a complete packet body)
//!   and `encode`/`encoded_len` for a given [`Protocol`].
//! - [`properties`]: MQTT 5 properties, checked per packet type (unknown, misplaced and
//!   duplicated properties are errors).
//! - [`topic`]: topic name and topic filter validation, shared-subscription parsing.
//! - [`utf8`]: the MQTT rules for UTF-8 strings on top of Rust's UTF-8 validation.
//!
//! # Design
//! One [`Packet`] type serves both protocol families: a 3.1.1 packet is a 5.0 packet without
//! properties and with the success reason code. The encoder takes the [`Protocol`] and writes the
//! right wire format, mapping 5.0 reason codes onto 3.1.1 return codes where needed.
//!
//! Decoding is zero-copy: a packet is decoded from a [`bytes::Bytes`] frame, and topic, strings
//! and payload are slices of that frame.
//!
//! Every violation of a MUST of the specifications that a decoder can see is a [`DecodeError`];
//! its [`DecodeError::reason_code`] is the MQTT 5 reason code a server sends before closing.
//! What needs connection state (topic aliases, packet-id reuse, receive maximum) is left to the
//! session layer.

pub mod error;
pub mod frame;
pub mod packet;
pub mod properties;
pub mod reason;
pub mod topic;
pub mod utf8;

mod read;
mod types;
mod varint;
mod write;

pub use error::{DecodeError, EncodeError};
pub use frame::{decode_packet, FixedHeader, MAX_REMAINING_LENGTH};
pub use packet::*;
pub use properties::*;
pub use reason::ReasonCode;
pub use types::{PacketId, PacketType, Protocol, QoS};
pub use varint::varint_len;

pub use bytes::{Bytes, BytesMut};
pub use bytestring::ByteString;
