//! CONNECT (MQTT 5 §3.1, MQTT 3.1.1 §3.1).

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::properties::{id, nonzero, ConnectProperties, WillProperties};
use crate::read::Reader;
use crate::topic;
use crate::utf8::Strictness;
use crate::write::{check_field, field_len, write_field};
use crate::{DecodeError, EncodeError, PacketType, Protocol, QoS};

/// A CONNECT packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: Protocol,
    /// Clean Session (3.1.1) or Clean Start (5.0).
    pub clean_start: bool,
    /// Seconds; 0 disables keep-alive.
    pub keep_alive: u16,
    pub properties: ConnectProperties,
    /// May be empty: the server then assigns one (or refuses, per version and Clean Session).
    pub client_id: ByteString,
    pub will: Option<Will>,
    pub username: Option<ByteString>,
    pub password: Option<Bytes>,
}

/// The Will Message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: WillProperties,
}

mod flag {
    pub const RESERVED: u8 = 0b0000_0001;
    pub const CLEAN_START: u8 = 0b0000_0010;
    pub const WILL: u8 = 0b0000_0100;
    pub const WILL_QOS_SHIFT: u8 = 3;
    pub const WILL_RETAIN: u8 = 0b0010_0000;
    pub const PASSWORD: u8 = 0b0100_0000;
    pub const USERNAME: u8 = 0b1000_0000;
}

impl Connect {
    /// A CONNECT with no will, no credentials and default properties.
    pub fn new(protocol: Protocol, client_id: impl Into<ByteString>) -> Connect {
        Connect {
            protocol,
            clean_start: true,
            keep_alive: 60,
            properties: ConnectProperties::default(),
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Connect, DecodeError> {
        let name = r.binary("protocol name")?;
        let level = r.u8("protocol level")?;
        let protocol = match (&name[..], level) {
            (b"MQTT", 4) => Protocol::V3_1_1,
            (b"MQTT", 5) => Protocol::V5,
            (b"MQIsdp", 3) => Protocol::V3_1,
            (b"MQTT", _) | (b"MQIsdp", _) => {
                // [MQTT-3.1.2-2]: answer 0x84 / 0x01, then close.
                return Err(DecodeError::UnsupportedProtocol { name: String::from_utf8_lossy(&name).into_owned(), level });
            }
            // [MQTT-3.1.2-1]: an unknown protocol name may be closed without CONNACK.
            _ => return Err(r.malformed("protocol name is neither \"MQTT\" nor \"MQIsdp\" (MQTT-3.1.2-1)")),
        };

        let flags = r.u8("connect flags")?;
        if flags & flag::RESERVED != 0 {
            return Err(r.malformed("reserved connect flag bit 0 is set (MQTT-3.1.2-3)"));
        }
        let will_flag = flags & flag::WILL != 0;
        let will_qos_bits = (flags >> flag::WILL_QOS_SHIFT) & 0b11;
        let will_retain = flags & flag::WILL_RETAIN != 0;
        if !will_flag && will_qos_bits != 0 {
            return Err(r.malformed("Will QoS is not 0 while the Will Flag is 0 (MQTT-3.1.2-13)"));
        }
        if !will_flag && will_retain {
            return Err(r.malformed("Will Retain is set while the Will Flag is 0 (MQTT-3.1.2-15)"));
        }
        let will_qos = QoS::from_u8(will_qos_bits).ok_or_else(|| r.malformed("Will QoS is 3 (MQTT-3.1.2-14)"))?;
        let has_username = flags & flag::USERNAME != 0;
        let has_password = flags & flag::PASSWORD != 0;
        if has_password && !has_username && !protocol.is_v5() {
            return Err(r.malformed("Password Flag is set without the User Name Flag (MQTT-3.1.2-22)"));
        }

        let keep_alive = r.u16("keep alive")?;
        let properties = if protocol.is_v5() {
            let p = ConnectProperties::decode(r)?;
            nonzero(PacketType::Connect, id::RECEIVE_MAXIMUM, p.receive_maximum.map(u32::from))?;
            nonzero(PacketType::Connect, id::MAXIMUM_PACKET_SIZE, p.maximum_packet_size)?;
            if p.authentication_data.is_some() && p.authentication_method.is_none() {
                return Err(r.protocol("Authentication Data without Authentication Method"));
            }
            p
        } else {
            ConnectProperties::default()
        };

        let client_id = r.string("client identifier", Strictness::Identifier)?;
        let will = if will_flag {
            let properties = if protocol.is_v5() { WillProperties::decode(r)? } else { WillProperties::default() };
            let topic = r.string("will topic", Strictness::Identifier)?;
            topic::validate_topic_name(&topic, &topic::TopicLimits::default())
                .map_err(|reason| DecodeError::InvalidTopicName { packet: PacketType::Connect, reason })?;
            let payload = r.binary("will payload")?;
            Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
        } else {
            None
        };
        let username = if has_username { Some(r.string("user name", Strictness::Identifier)?) } else { None };
        let password = if has_password { Some(r.binary("password")?) } else { None };

        Ok(Connect { protocol, clean_start: flags & flag::CLEAN_START != 0, keep_alive, properties, client_id, will, username, password })
    }

    pub(crate) fn body_len(&self) -> usize {
        let v5 = self.protocol.is_v5();
        let mut n = field_len(self.protocol.name().as_bytes()) + 1 + 1 + 2;
        if v5 {
            n += self.properties.wire_len();
        }
        n += field_len(self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if v5 {
                n += w.properties.wire_len();
            }
            n += field_len(w.topic.as_bytes()) + field_len(&w.payload);
        }
        if let Some(u) = &self.username {
            n += field_len(u.as_bytes());
        }
        if let Some(p) = &self.password {
            n += field_len(p);
        }
        n
    }

    pub(crate) fn encode(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        check_field("client identifier", self.client_id.as_bytes())?;
        write_field(buf, self.protocol.name().as_bytes());
        buf.put_u8(self.protocol.level());
        let mut flags = 0u8;
        if self.clean_start {
            flags |= flag::CLEAN_START;
        }
        if let Some(w) = &self.will {
            flags |= flag::WILL | (w.qos as u8) << flag::WILL_QOS_SHIFT;
            if w.retain {
                flags |= flag::WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= flag::USERNAME;
        }
        if self.password.is_some() {
            flags |= flag::PASSWORD;
        }
        buf.put_u8(flags);
        buf.put_u16(self.keep_alive);
        if self.protocol.is_v5() {
            self.properties.encode(buf);
        }
        write_field(buf, self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if self.protocol.is_v5() {
                w.properties.encode(buf);
            }
            check_field("will topic", w.topic.as_bytes())?;
            check_field("will payload", &w.payload)?;
            write_field(buf, w.topic.as_bytes());
            write_field(buf, &w.payload);
        }
        if let Some(u) = &self.username {
            check_field("user name", u.as_bytes())?;
            write_field(buf, u.as_bytes());
        }
        if let Some(p) = &self.password {
            check_field("password", p)?;
            write_field(buf, p);
        }
        Ok(())
    }
}
