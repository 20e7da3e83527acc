//! Control packets (MQTT 5 §3), one module per packet family.

mod ack;
mod auth;
mod connack;
mod connect;
mod disconnect;
mod publish;
mod subscribe;
mod unsubscribe;

pub use ack::Ack;
pub use auth::Auth;
pub use connack::ConnAck;
pub use connect::{Connect, Will};
pub use disconnect::Disconnect;
pub use publish::Publish;
pub use subscribe::{RetainHandling, SubAck, Subscribe, SubscriptionOptions};
pub use unsubscribe::{UnsubAck, Unsubscribe};

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::FixedHeader;
use crate::read::Reader;
use crate::varint::{varint_len, write_varint};
use crate::{DecodeError, EncodeError, PacketType, Protocol};

/// Any MQTT control packet, in the form shared by 3.1.1 and 5.0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Boxed: CONNECT is large and rare, and every other packet moves through channels.
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }

    /// Decodes a packet body. CONNECT carries its own protocol version; every other packet is
    /// decoded in the connection's `protocol`.
    #[inline]
    pub fn decode(header: FixedHeader, body: Bytes, protocol: Protocol) -> Result<Packet, DecodeError> {
        let t = header.packet_type;
        let mut r = Reader::new(body, t);
        let packet = match t {
            PacketType::Connect => Packet::Connect(Box::new(Connect::decode(&mut r)?)),
            PacketType::ConnAck => Packet::ConnAck(ConnAck::decode(&mut r, protocol)?),
            PacketType::Publish => Packet::Publish(Publish::decode(&mut r, header.flags, protocol)?),
            PacketType::PubAck => Packet::PubAck(Ack::decode(&mut r, protocol)?),
            PacketType::PubRec => Packet::PubRec(Ack::decode(&mut r, protocol)?),
            PacketType::PubRel => Packet::PubRel(Ack::decode(&mut r, protocol)?),
            PacketType::PubComp => Packet::PubComp(Ack::decode(&mut r, protocol)?),
            PacketType::Subscribe => Packet::Subscribe(Subscribe::decode(&mut r, protocol)?),
            PacketType::SubAck => Packet::SubAck(SubAck::decode(&mut r, protocol)?),
            PacketType::Unsubscribe => Packet::Unsubscribe(Unsubscribe::decode(&mut r, protocol)?),
            PacketType::UnsubAck => Packet::UnsubAck(UnsubAck::decode(&mut r, protocol)?),
            PacketType::PingReq | PacketType::PingResp => {
                if !r.is_empty() {
                    return Err(r.malformed("remaining length must be 0"));
                }
                if t == PacketType::PingReq {
                    Packet::PingReq
                } else {
                    Packet::PingResp
                }
            }
            PacketType::Disconnect => Packet::Disconnect(Disconnect::decode(&mut r, protocol)?),
            PacketType::Auth => {
                if !protocol.is_v5() {
                    return Err(DecodeError::PacketTypeNotInVersion { packet: t, version: "3.1.1" });
                }
                Packet::Auth(Auth::decode(&mut r)?)
            }
        };
        if !r.is_empty() {
            return Err(r.malformed("bytes left over after the last field"));
        }
        Ok(packet)
    }

    /// Length of the body (the Remaining Length).
    fn body_len(&self, protocol: Protocol) -> usize {
        match self {
            Packet::Connect(p) => p.body_len(),
            Packet::ConnAck(p) => p.body_len(protocol),
            Packet::Publish(p) => p.body_len(protocol),
            Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => p.body_len(protocol),
            Packet::Subscribe(p) => p.body_len(protocol),
            Packet::SubAck(p) => p.body_len(protocol),
            Packet::Unsubscribe(p) => p.body_len(protocol),
            Packet::UnsubAck(p) => p.body_len(protocol),
            Packet::PingReq | Packet::PingResp => 0,
            Packet::Disconnect(p) => p.body_len(protocol),
            Packet::Auth(p) => p.body_len(),
        }
    }

    /// Length of the whole packet on the wire in `protocol`.
    pub fn encoded_len(&self, protocol: Protocol) -> usize {
        let body = self.body_len(protocol);
        1 + varint_len(body) + body
    }

    fn first_byte(&self) -> u8 {
        let t = self.packet_type();
        let flags = match self {
            Packet::Publish(p) => p.flags(),
            _ => t.required_flags().unwrap_or(0),
        };
        (t as u8) << 4 | flags
    }

    /// Appends the packet in `protocol`'s wire format to `buf`.
    ///
    /// CONNECT is written in its own `protocol` field's version.
    pub fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<(), EncodeError> {
        if let Packet::Auth(_) = self {
            if !protocol.is_v5() {
                return Err(EncodeError::NotInVersion { packet: PacketType::Auth, version: "3.1.1" });
            }
        }
        let protocol = match self {
            Packet::Connect(c) => c.protocol,
            _ => protocol,
        };
        let body = self.body_len(protocol);
        buf.reserve(1 + varint_len(body) + body);
        buf.put_u8(self.first_byte());
        write_varint(buf, body);
        match self {
            Packet::Connect(p) => p.encode(buf)?,
            Packet::ConnAck(p) => p.encode(protocol, buf),
            Packet::Publish(p) => p.encode(protocol, buf)?,
            Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => p.encode(protocol, buf),
            Packet::Subscribe(p) => p.encode(protocol, buf)?,
            Packet::SubAck(p) => p.encode(protocol, buf),
            Packet::Unsubscribe(p) => p.encode(protocol, buf)?,
            Packet::UnsubAck(p) => p.encode(protocol, buf),
            Packet::PingReq | Packet::PingResp => {}
            Packet::Disconnect(p) => p.encode(protocol, buf),
            Packet::Auth(p) => p.encode(buf),
        }
        Ok(())
    }
}

/// Reads a 5.0 reason code and checks it is one this packet may carry.
pub(crate) fn read_reason(r: &mut Reader, allowed: &[crate::ReasonCode]) -> Result<crate::ReasonCode, DecodeError> {
    let code = r.u8("reason code")?;
    match crate::ReasonCode::from_u8(code) {
        Some(reason) if allowed.contains(&reason) => Ok(reason),
        _ => Err(DecodeError::InvalidReasonCode { packet: r.packet(), code }),
    }
}
