//! MQTT 5 properties (MQTT 5 §2.2.2).
//!
//! Each packet type has its own property struct with typed fields. One decode loop serves them
//! all: it rejects identifiers that are unknown or not allowed in that packet [MQTT-2.2.2-2]
//! (Malformed Packet) and properties that appear twice where only one is allowed (Protocol
//! Error). User Properties may repeat and keep their order [MQTT-3.1.3-10].

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::read::Reader;
use crate::utf8::Strictness;
use crate::varint::{varint_len, write_varint};
use crate::write::{field_len, write_field};
use crate::{DecodeError, PacketType};

/// Property identifiers (MQTT 5 §2.2.2.2, Table 2-4).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// The specification's name of a property, for error messages.
pub fn property_name(pid: u8) -> &'static str {
    match pid {
        id::PAYLOAD_FORMAT_INDICATOR => "Payload Format Indicator",
        id::MESSAGE_EXPIRY_INTERVAL => "Message Expiry Interval",
        id::CONTENT_TYPE => "Content Type",
        id::RESPONSE_TOPIC => "Response Topic",
        id::CORRELATION_DATA => "Correlation Data",
        id::SUBSCRIPTION_IDENTIFIER => "Subscription Identifier",
        id::SESSION_EXPIRY_INTERVAL => "Session Expiry Interval",
        id::ASSIGNED_CLIENT_IDENTIFIER => "Assigned Client Identifier",
        id::SERVER_KEEP_ALIVE => "Server Keep Alive",
        id::AUTHENTICATION_METHOD => "Authentication Method",
        id::AUTHENTICATION_DATA => "Authentication Data",
        id::REQUEST_PROBLEM_INFORMATION => "Request Problem Information",
        id::WILL_DELAY_INTERVAL => "Will Delay Interval",
        id::REQUEST_RESPONSE_INFORMATION => "Request Response Information",
        id::RESPONSE_INFORMATION => "Response Information",
        id::SERVER_REFERENCE => "Server Reference",
        id::REASON_STRING => "Reason String",
        id::RECEIVE_MAXIMUM => "Receive Maximum",
        id::TOPIC_ALIAS_MAXIMUM => "Topic Alias Maximum",
        id::TOPIC_ALIAS => "Topic Alias",
        id::MAXIMUM_QOS => "Maximum QoS",
        id::RETAIN_AVAILABLE => "Retain Available",
        id::USER_PROPERTY => "User Property",
        id::MAXIMUM_PACKET_SIZE => "Maximum Packet Size",
        id::WILDCARD_SUBSCRIPTION_AVAILABLE => "Wildcard Subscription Available",
        id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => "Subscription Identifier Available",
        id::SHARED_SUBSCRIPTION_AVAILABLE => "Shared Subscription Available",
        _ => "unknown",
    }
}

fn is_known(pid: u8) -> bool {
    property_name(pid) != "unknown"
}

/// A user property: a name/value pair of UTF-8 strings (MQTT 5 §3.3.2.3.7).
pub type UserProperty = (ByteString, ByteString);

// === value types ===

/// A property value type: how it is read, written and measured.
pub(crate) trait PropValue: Sized {
    fn read(r: &mut Reader, pid: u8) -> Result<Self, DecodeError>;
    fn write(&self, buf: &mut BytesMut);
    fn wire_len(&self) -> usize;
}

impl PropValue for u8 {
    fn read(r: &mut Reader, pid: u8) -> Result<Self, DecodeError> {
        r.u8(property_name(pid))
    }
    fn write(&self, buf: &mut BytesMut) {
        buf.put_u8(*self)
    }
    fn wire_len(&self) -> usize {
        1
    }
}

/// A byte that may only be 0 or 1.
impl PropValue for bool {
    fn read(r: &mut Reader, pid: u8) -> Result<Self, DecodeError> {
        match r.u8(property_name(pid))? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::InvalidPropertyValue { packet: r.packet(), property: property_name(pid), value: v.into() }),
        }
    }
    fn write(&self, buf: &mut BytesMut) {
        buf.put_u8(u8::from(*self))
    }
    fn wire_len(&self) -> usize {
        1
    }
}

impl PropValue for u16 {
    fn read(r: &mut Reader, pid: u8) -> Result<Self, DecodeError> {
        r.u16(property_name(pid))
    }
    fn write(&self, buf: &mut BytesMut) {
        buf.put_u16(*self)
    }
    fn wire_len(&self) -> usize {
        2
    }
}

impl PropValue for u32 {
    fn read(r: &mut Reader, pid: u8) -> Result<Self, DecodeError> {
        r.u32(property_name(pid))
    }
    fn write(&self, buf: &mut BytesMut) {
        buf.put_u32(*self)
    }
    fn wire_len(&self) -> usize {
        4
    }
}

impl PropValue for ByteString {
    fn read(r: &mut Reader, pid: u8) -> Result<Self, DecodeError> {
        let strictness = match pid {
            id::RESPONSE_TOPIC | id::ASSIGNED_CLIENT_IDENTIFIER => Strictness::Identifier,
            _ => Strictness::Text,
        };
        r.string(property_name(pid), strictness)
    }
    fn write(&self, buf: &mut BytesMut) {
        write_field(buf, self.as_bytes())
    }
    fn wire_len(&self) -> usize {
        field_len(self.as_bytes())
    }
}

impl PropValue for Bytes {
    fn read(r: &mut Reader, pid: u8) -> Result<Self, DecodeError> {
        r.binary(property_name(pid))
    }
    fn write(&self, buf: &mut BytesMut) {
        write_field(buf, self)
    }
    fn wire_len(&self) -> usize {
        field_len(self)
    }
}

impl PropValue for UserProperty {
    fn read(r: &mut Reader, _pid: u8) -> Result<Self, DecodeError> {
        let k = r.string("User Property name", Strictness::Text)?;
        let v = r.string("User Property value", Strictness::Text)?;
        Ok((k, v))
    }
    fn write(&self, buf: &mut BytesMut) {
        write_field(buf, self.0.as_bytes());
        write_field(buf, self.1.as_bytes());
    }
    fn wire_len(&self) -> usize {
        field_len(self.0.as_bytes()) + field_len(self.1.as_bytes())
    }
}

/// A Variable Byte Integer property (only Subscription Identifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VarintProp(pub u32);

impl PropValue for VarintProp {
    fn read(r: &mut Reader, pid: u8) -> Result<Self, DecodeError> {
        let v = r.varint(property_name(pid))?;
        if v == 0 {
            // MQTT 5 §3.8.2.1.2: "It is a Protocol Error if the Subscription Identifier has a value of 0."
            return Err(DecodeError::InvalidPropertyValue { packet: r.packet(), property: property_name(pid), value: 0 });
        }
        Ok(VarintProp(v))
    }
    fn write(&self, buf: &mut BytesMut) {
        write_varint(buf, self.0 as usize)
    }
    fn wire_len(&self) -> usize {
        varint_len(self.0 as usize)
    }
}

// === the decode loop ===

/// Reads a property list: a Variable Byte Integer length, then identifier/value pairs.
/// `accept` stores one property; it returns `Ok(false)` for an identifier this packet does not
/// allow.
pub(crate) fn decode_properties(
    r: &mut Reader,
    mut accept: impl FnMut(&mut Reader, u8) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    let len = r.varint("property length")? as usize;
    if len > r.remaining() {
        return Err(r.malformed("property length exceeds the remaining length of the packet"));
    }
    let mut props = Reader::new(r.take(len, "properties")?, r.packet());
    while !props.is_empty() {
        // The identifier is a Variable Byte Integer; every defined one fits in one byte.
        let pid = props.varint("property identifier")?;
        let pid8 = u8::try_from(pid).unwrap_or(0);
        if !is_known(pid8) {
            return Err(DecodeError::UnknownProperty { packet: r.packet(), id: pid8 });
        }
        if !accept(&mut props, pid8)? {
            return Err(DecodeError::PropertyNotAllowed { packet: r.packet(), property: property_name(pid8) });
        }
    }
    Ok(())
}

pub(crate) fn set_once<T: PropValue>(slot: &mut Option<T>, r: &mut Reader, pid: u8) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty { packet: r.packet(), property: property_name(pid) });
    }
    *slot = Some(T::read(r, pid)?);
    Ok(())
}

fn put_prop<T: PropValue>(buf: &mut BytesMut, pid: u8, v: &T) {
    buf.put_u8(pid);
    v.write(buf);
}

// === per-packet structs ===

/// Declares a property struct: optional single-valued fields, user properties, and (for
/// PUBLISH) repeated Subscription Identifiers.
macro_rules! property_struct {
    (
        $(#[$meta:meta])*
        $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $pid:ident, )*
        }
        $( repeated_subscription_identifiers: $subs:ident )?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: Option<$ty>, )*
            /// User Properties, in the order received [MQTT-3.1.3-10].
            pub user_properties: Vec<UserProperty>,
            $( /// Subscription Identifiers of every matching subscription [MQTT-3.3.4-4].
               pub $subs: Vec<u32>, )?
        }

        impl $name {
            pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
                let mut p = Self::default();
                decode_properties(r, |r, pid| {
                    match pid {
                        $( id::$pid => set_once(&mut p.$field, r, pid)?, )*
                        id::USER_PROPERTY => p.user_properties.push(UserProperty::read(r, pid)?),
                        $( id::SUBSCRIPTION_IDENTIFIER => p.$subs.push(VarintProp::read(r, pid)?.0), )?
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                Ok(p)
            }

            /// Length of the property list without its own length prefix.
            pub fn encoded_len(&self) -> usize {
                let mut n = 0;
                $( if let Some(v) = &self.$field { n += 1 + v.wire_len(); } )*
                n += self.user_properties.iter().map(|u| 1 + u.wire_len()).sum::<usize>();
                $( n += self.$subs.iter().map(|s| 1 + varint_len(*s as usize)).sum::<usize>(); )?
                n
            }

            /// Length on the wire including the length prefix.
            pub fn wire_len(&self) -> usize {
                let n = self.encoded_len();
                varint_len(n) + n
            }

            pub(crate) fn encode(&self, buf: &mut BytesMut) {
                write_varint(buf, self.encoded_len());
                $( if let Some(v) = &self.$field { put_prop(buf, id::$pid, v); } )*
                $( for s in &self.$subs { put_prop(buf, id::SUBSCRIPTION_IDENTIFIER, &VarintProp(*s)); } )?
                for u in &self.user_properties { put_prop(buf, id::USER_PROPERTY, u); }
            }

            pub fn is_empty(&self) -> bool {
                self.encoded_len() == 0
            }
        }
    };
}

property_struct! {
    /// CONNECT properties (MQTT 5 §3.1.2.11).
    ConnectProperties {
        /// Seconds the session outlives the connection; absent means 0.
        session_expiry_interval: u32 = SESSION_EXPIRY_INTERVAL,
        /// QoS 1/2 PUBLISHes the client will process concurrently; absent means 65535.
        receive_maximum: u16 = RECEIVE_MAXIMUM,
        /// Largest packet the client accepts.
        maximum_packet_size: u32 = MAXIMUM_PACKET_SIZE,
        /// Highest topic alias the client accepts from the server; absent means 0.
        topic_alias_maximum: u16 = TOPIC_ALIAS_MAXIMUM,
        request_response_information: bool = REQUEST_RESPONSE_INFORMATION,
        request_problem_information: bool = REQUEST_PROBLEM_INFORMATION,
        authentication_method: ByteString = AUTHENTICATION_METHOD,
        authentication_data: Bytes = AUTHENTICATION_DATA,
    }
}

property_struct! {
    /// Will properties (MQTT 5 §3.1.3.2).
    WillProperties {
        /// Seconds to wait after the connection closes before publishing the will.
        will_delay_interval: u32 = WILL_DELAY_INTERVAL,
        payload_format_indicator: bool = PAYLOAD_FORMAT_INDICATOR,
        message_expiry_interval: u32 = MESSAGE_EXPIRY_INTERVAL,
        content_type: ByteString = CONTENT_TYPE,
        response_topic: ByteString = RESPONSE_TOPIC,
        correlation_data: Bytes = CORRELATION_DATA,
    }
}

property_struct! {
    /// CONNACK properties (MQTT 5 §3.2.2.3).
    ConnAckProperties {
        session_expiry_interval: u32 = SESSION_EXPIRY_INTERVAL,
        receive_maximum: u16 = RECEIVE_MAXIMUM,
        maximum_qos: u8 = MAXIMUM_QOS,
        retain_available: bool = RETAIN_AVAILABLE,
        maximum_packet_size: u32 = MAXIMUM_PACKET_SIZE,
        assigned_client_identifier: ByteString = ASSIGNED_CLIENT_IDENTIFIER,
        topic_alias_maximum: u16 = TOPIC_ALIAS_MAXIMUM,
        reason_string: ByteString = REASON_STRING,
        wildcard_subscription_available: bool = WILDCARD_SUBSCRIPTION_AVAILABLE,
        subscription_identifiers_available: bool = SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        shared_subscription_available: bool = SHARED_SUBSCRIPTION_AVAILABLE,
        server_keep_alive: u16 = SERVER_KEEP_ALIVE,
        response_information: ByteString = RESPONSE_INFORMATION,
        server_reference: ByteString = SERVER_REFERENCE,
        authentication_method: ByteString = AUTHENTICATION_METHOD,
        authentication_data: Bytes = AUTHENTICATION_DATA,
    }
}

property_struct! {
    /// PUBLISH properties (MQTT 5 §3.3.2.3).
    PublishProperties {
        payload_format_indicator: bool = PAYLOAD_FORMAT_INDICATOR,
        /// Seconds until the message expires; forwarded decremented by the time it waited.
        message_expiry_interval: u32 = MESSAGE_EXPIRY_INTERVAL,
        topic_alias: u16 = TOPIC_ALIAS,
        response_topic: ByteString = RESPONSE_TOPIC,
        correlation_data: Bytes = CORRELATION_DATA,
        content_type: ByteString = CONTENT_TYPE,
    }
    repeated_subscription_identifiers: subscription_identifiers
}

property_struct! {
    /// PUBACK, PUBREC, PUBREL and PUBCOMP properties (MQTT 5 §3.4.2.2).
    AckProperties {
        reason_string: ByteString = REASON_STRING,
    }
}

property_struct! {
    /// SUBSCRIBE properties (MQTT 5 §3.8.2.1).
    SubscribeProperties {
        subscription_identifier: VarintProp = SUBSCRIPTION_IDENTIFIER,
    }
}

property_struct! {
    /// SUBACK and UNSUBACK properties (MQTT 5 §3.9.2.1, §3.11.2.1).
    SubAckProperties {
        reason_string: ByteString = REASON_STRING,
    }
}

property_struct! {
    /// UNSUBSCRIBE properties (MQTT 5 §3.10.2.1): user properties only.
    UnsubscribeProperties {}
}

property_struct! {
    /// DISCONNECT properties (MQTT 5 §3.14.2.2).
    DisconnectProperties {
        session_expiry_interval: u32 = SESSION_EXPIRY_INTERVAL,
        reason_string: ByteString = REASON_STRING,
        server_reference: ByteString = SERVER_REFERENCE,
    }
}

property_struct! {
    /// AUTH properties (MQTT 5 §3.15.2.2).
    AuthProperties {
        authentication_method: ByteString = AUTHENTICATION_METHOD,
        authentication_data: Bytes = AUTHENTICATION_DATA,
        reason_string: ByteString = REASON_STRING,
    }
}

impl SubscribeProperties {
    /// The Subscription Identifier, if any (never 0: the decoder refuses 0).
    pub fn id(&self) -> Option<u32> {
        self.subscription_identifier.map(|v| v.0)
    }

    pub fn with_id(id: Option<u32>) -> SubscribeProperties {
        SubscribeProperties { subscription_identifier: id.map(VarintProp), ..Default::default() }
    }
}

/// Checks a decoded property value that must not be zero.
pub(crate) fn nonzero(packet: PacketType, pid: u8, value: Option<u32>) -> Result<(), DecodeError> {
    if value == Some(0) {
        return Err(DecodeError::InvalidPropertyValue { packet, property: property_name(pid), value: 0 });
    }
    Ok(())
}
