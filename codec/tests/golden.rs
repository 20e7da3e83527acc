//! Golden bytes from the specifications, and the codec-level rows of BAD-INPUT.md. Each test
//! names the normative statement it checks.

use bytes::BytesMut;
use mqfleet_codec::*;

fn decode(protocol: Protocol, bytes: &[u8]) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decode_packet(&mut buf, protocol, 1 << 20).map(|p| p.expect("complete packet"))
}

fn encode(protocol: Protocol, p: &Packet) -> Vec<u8> {
    let mut buf = BytesMut::new();
    p.encode(protocol, &mut buf).unwrap();
    buf.to_vec()
}

fn reason(protocol: Protocol, bytes: &[u8]) -> ReasonCode {
    decode(protocol, bytes).expect_err("must be rejected").reason_code()
}

const V4: Protocol = Protocol::V3_1_1;
const V5: Protocol = Protocol::V5;

// === golden bytes ===

#[test]
fn connect_v3_1_1_golden() {
    // CONNECT, "MQTT" level 4, clean session, keep alive 60, client id "a".
    let bytes = [0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x01, b'a'];
    let Packet::Connect(c) = decode(V4, &bytes).unwrap() else { panic!() };
    assert_eq!(c.protocol, Protocol::V3_1_1);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(&c.client_id[..], "a");
    assert_eq!(encode(V4, &Packet::Connect(c)), bytes);
}

#[test]
fn connect_v3_1_mqisdp_is_accepted() {
    let bytes = [0x10, 0x0f, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3c, 0x00, 0x01, b'a'];
    let Packet::Connect(c) = decode(V4, &bytes).unwrap() else { panic!() };
    assert_eq!(c.protocol, Protocol::V3_1);
}

#[test]
fn connack_v3_and_v5_golden() {
    assert_eq!(encode(V4, &Packet::ConnAck(ConnAck::new(ReasonCode::Success, true))), [0x20, 0x02, 0x01, 0x00]);
    assert_eq!(encode(V5, &Packet::ConnAck(ConnAck::new(ReasonCode::Success, false))), [0x20, 0x03, 0x00, 0x00, 0x00]);
    // 5.0 reason codes map onto 3.1.1 return codes.
    assert_eq!(encode(V4, &Packet::ConnAck(ConnAck::new(ReasonCode::BadUserNameOrPassword, false))), [0x20, 0x02, 0x00, 0x04]);
    assert_eq!(encode(V4, &Packet::ConnAck(ConnAck::new(ReasonCode::ServerBusy, false))), [0x20, 0x02, 0x00, 0x03]);
}

#[test]
fn v3_1_connack_has_no_session_present_flag() {
    assert_eq!(encode(Protocol::V3_1, &Packet::ConnAck(ConnAck::new(ReasonCode::Success, true))), [0x20, 0x02, 0x00, 0x00]);
}

#[test]
fn v5_puback_success_is_two_bytes_mqtt_3_4_2_1() {
    let id = PacketId::new(7).unwrap();
    assert_eq!(encode(V5, &Packet::PubAck(Ack::new(id))), [0x40, 0x02, 0x00, 0x07]);
    assert_eq!(encode(V5, &Packet::PubAck(Ack::with_reason(id, ReasonCode::NotAuthorized))), [0x40, 0x03, 0x00, 0x07, 0x87]);
    assert_eq!(encode(V5, &Packet::PubRel(Ack::new(id))), [0x62, 0x02, 0x00, 0x07]);
}

#[test]
fn v3_suback_failure_is_0x80() {
    let id = PacketId::new(1).unwrap();
    let suback = SubAck::new(id, vec![ReasonCode::GrantedQoS1, ReasonCode::TopicFilterInvalid]);
    assert_eq!(encode(V4, &Packet::SubAck(suback.clone())), [0x90, 0x04, 0x00, 0x01, 0x01, 0x80]);
    assert_eq!(encode(V5, &Packet::SubAck(suback)), [0x90, 0x05, 0x00, 0x01, 0x00, 0x01, 0x8F]);
}

#[test]
fn disconnect_v5_normal_is_empty() {
    assert_eq!(encode(V5, &Packet::Disconnect(Disconnect::new(ReasonCode::Success))), [0xE0, 0x00]);
    assert_eq!(encode(V5, &Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver))), [0xE0, 0x01, 0x8E]);
    assert_eq!(encode(V4, &Packet::Disconnect(Disconnect::new(ReasonCode::SessionTakenOver))), [0xE0, 0x00]);
}

#[test]
fn auth_does_not_exist_in_v3() {
    assert!(matches!(decode(V4, &[0xF0, 0x00]), Err(DecodeError::PacketTypeNotInVersion { .. })));
    let mut buf = BytesMut::new();
    let auth = Packet::Auth(Auth { reason: ReasonCode::Success, properties: Default::default() });
    assert!(auth.encode(V4, &mut buf).is_err());
    assert!(matches!(decode(V5, &[0xF0, 0x00]), Ok(Packet::Auth(_))));
}

// === BAD-INPUT group A: framing ===

#[test]
fn a1_remaining_length_five_bytes_is_malformed() {
    assert_eq!(reason(V5, &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]), ReasonCode::MalformedPacket);
}

// === BAD-INPUT group B: packet types and flags ===

#[test]
fn b13_reserved_flags_are_malformed_mqtt_2_1_3_1() {
    for bytes in [[0x82u8, 0x00], [0x60, 0x00], [0xC1, 0x00], [0xE1, 0x00], [0xA0, 0x00]] {
        assert_eq!(reason(V5, &bytes), ReasonCode::MalformedPacket, "{bytes:02x?}");
    }
}

#[test]
fn b14_packet_type_zero_is_malformed() {
    assert_eq!(reason(V5, &[0x00, 0x00]), ReasonCode::MalformedPacket);
}

#[test]
fn pingreq_with_body_is_malformed() {
    assert_eq!(reason(V5, &[0xC0, 0x01, 0x00]), ReasonCode::MalformedPacket);
}

// === BAD-INPUT group C: CONNECT ===

fn connect_bytes(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, name.len() as u8];
    body.extend_from_slice(name);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&[0x00, 0x3c]);
    if level == 5 {
        body.push(0x00); // empty properties
    }
    body.extend_from_slice(rest);
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

#[test]
fn c15_wrong_protocol_name_is_malformed_mqtt_3_1_2_1() {
    assert_eq!(reason(V4, &connect_bytes(b"MQTX", 4, 0x02, &[0, 1, b'a'])), ReasonCode::MalformedPacket);
    assert_eq!(reason(V4, &connect_bytes(b"", 4, 0x02, &[0, 1, b'a'])), ReasonCode::MalformedPacket);
    // MQIsdp with level 4: name and level disagree.
    assert_eq!(reason(V4, &connect_bytes(b"MQIsdp", 4, 0x02, &[0, 1, b'a'])), ReasonCode::UnsupportedProtocolVersion);
}

#[test]
fn c16_unsupported_level_is_0x84_mqtt_3_1_2_2() {
    for level in [2u8, 6, 255] {
        assert_eq!(reason(V4, &connect_bytes(b"MQTT", level, 0x02, &[0, 1, b'a'])), ReasonCode::UnsupportedProtocolVersion);
    }
}

#[test]
fn c17_reserved_connect_flag_is_malformed_mqtt_3_1_2_3() {
    assert_eq!(reason(V4, &connect_bytes(b"MQTT", 4, 0x03, &[0, 1, b'a'])), ReasonCode::MalformedPacket);
}

#[test]
fn c18_will_flags_without_will_are_malformed_mqtt_3_1_2_13_and_15() {
    // Will QoS 1 without Will Flag.
    assert_eq!(reason(V4, &connect_bytes(b"MQTT", 4, 0x0A, &[0, 1, b'a'])), ReasonCode::MalformedPacket);
    // Will Retain without Will Flag.
    assert_eq!(reason(V4, &connect_bytes(b"MQTT", 4, 0x22, &[0, 1, b'a'])), ReasonCode::MalformedPacket);
    // Will QoS 3.
    assert_eq!(reason(V4, &connect_bytes(b"MQTT", 4, 0x1E, &[0, 1, b'a', 0, 1, b't', 0, 0])), ReasonCode::MalformedPacket);
    // Will Flag without will topic and payload.
    assert_eq!(reason(V4, &connect_bytes(b"MQTT", 4, 0x06, &[0, 1, b'a'])), ReasonCode::MalformedPacket);
}

#[test]
fn c19_will_topic_with_wildcard_is_0x90() {
    assert_eq!(reason(V4, &connect_bytes(b"MQTT", 4, 0x06, &[0, 1, b'a', 0, 3, b'a', b'/', b'#', 0, 0])), ReasonCode::TopicNameInvalid);
}

#[test]
fn c20_password_without_username_v3_is_malformed_mqtt_3_1_2_22() {
    assert_eq!(reason(V4, &connect_bytes(b"MQTT", 4, 0x42, &[0, 1, b'a', 0, 1, b'p'])), ReasonCode::MalformedPacket);
    // 5.0 allows it.
    assert!(decode(V5, &connect_bytes(b"MQTT", 5, 0x42, &[0, 1, b'a', 0, 1, b'p'])).is_ok());
    // User Name Flag set but the field is missing.
    assert_eq!(reason(V4, &connect_bytes(b"MQTT", 4, 0x82, &[0, 1, b'a'])), ReasonCode::MalformedPacket);
}

#[test]
fn c22_bad_strings_in_client_id_are_malformed_mqtt_1_5_4() {
    for id in [&b"a\x00b"[..], b"\xED\xA0\x80", b"a\x01", b"\xEF\xBF\xBF", b"\xC2\x85", b"\xff"] {
        let mut rest = vec![0, id.len() as u8];
        rest.extend_from_slice(id);
        assert_eq!(reason(V4, &connect_bytes(b"MQTT", 4, 0x02, &rest)), ReasonCode::MalformedPacket, "{id:02x?}");
    }
}

// === BAD-INPUT group D: properties ===

fn v5_publish_with_props(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01, b't'];
    body.push(props.len() as u8);
    body.extend_from_slice(props);
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

#[test]
fn d28_duplicate_property_is_protocol_error() {
    // Message Expiry Interval twice.
    let p = v5_publish_with_props(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2]);
    assert_eq!(reason(V5, &p), ReasonCode::ProtocolError);
}

#[test]
fn d29_unknown_or_misplaced_property_is_malformed_mqtt_2_2_2_2() {
    assert_eq!(reason(V5, &v5_publish_with_props(&[0x7f, 0])), ReasonCode::MalformedPacket);
    // Session Expiry Interval is not a PUBLISH property.
    assert_eq!(reason(V5, &v5_publish_with_props(&[0x11, 0, 0, 0, 1])), ReasonCode::MalformedPacket);
}

#[test]
fn d30_property_length_beyond_packet_is_malformed() {
    let mut p = v5_publish_with_props(&[0x02, 0, 0, 0, 1]);
    p[5] = 0x40; // property length 64, far beyond the packet
    assert_eq!(reason(V5, &p), ReasonCode::MalformedPacket);
    // Property length as a 5-byte Variable Byte Integer.
    let bytes = [0x30, 0x09, 0x00, 0x01, b't', 0x80, 0x80, 0x80, 0x80, 0x01, 0x00];
    assert_eq!(reason(V5, &bytes), ReasonCode::MalformedPacket);
}

#[test]
fn d31_zero_receive_maximum_and_packet_size_are_protocol_errors() {
    let mut c = Connect::new(V5, "a");
    c.properties.receive_maximum = Some(0);
    let mut buf = BytesMut::new();
    Packet::Connect(Box::new(c.clone())).encode(V5, &mut buf).unwrap();
    assert_eq!(decode_packet(&mut buf, V5, 1 << 20).unwrap_err().reason_code(), ReasonCode::ProtocolError);
    c.properties.receive_maximum = None;
    c.properties.maximum_packet_size = Some(0);
    let mut buf = BytesMut::new();
    Packet::Connect(Box::new(c)).encode(V5, &mut buf).unwrap();
    assert_eq!(decode_packet(&mut buf, V5, 1 << 20).unwrap_err().reason_code(), ReasonCode::ProtocolError);
}

// === BAD-INPUT group E: PUBLISH ===

#[test]
fn e36_topic_with_wildcard_is_0x90_mqtt_3_3_2_2() {
    assert_eq!(reason(V4, &[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'+']), ReasonCode::TopicNameInvalid);
    assert_eq!(reason(V4, &[0x30, 0x03, 0x00, 0x01, b'#']), ReasonCode::TopicNameInvalid);
}

#[test]
fn e37_empty_topic_without_alias_is_invalid() {
    assert_eq!(reason(V4, &[0x30, 0x02, 0x00, 0x00]), ReasonCode::TopicNameInvalid);
    assert_eq!(reason(V5, &[0x30, 0x03, 0x00, 0x00, 0x00]), ReasonCode::TopicNameInvalid);
    // With a Topic Alias it is fine in 5.0.
    assert!(decode(V5, &[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01]).is_ok());
}

#[test]
fn e38_topic_alias_zero_is_protocol_error_mqtt_3_3_2_8() {
    assert_eq!(reason(V5, &[0x30, 0x06, 0x00, 0x00, 0x03, 0x23, 0x00, 0x00]), ReasonCode::ProtocolError);
}

#[test]
fn e39_qos3_and_dup_on_qos0_are_malformed_mqtt_3_3_1_4_and_3_3_1_2() {
    assert_eq!(reason(V4, &[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01]), ReasonCode::MalformedPacket);
    assert_eq!(reason(V4, &[0x38, 0x03, 0x00, 0x01, b't']), ReasonCode::MalformedPacket);
}

#[test]
fn e40_qos1_with_packet_id_zero_is_rejected_mqtt_2_2_1_3() {
    assert!(decode(V4, &[0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x00]).is_err());
}

// === BAD-INPUT group G: SUBSCRIBE / UNSUBSCRIBE ===

#[test]
fn g53_subscribe_without_filters_is_protocol_error_mqtt_3_8_3_2() {
    assert_eq!(reason(V4, &[0x82, 0x02, 0x00, 0x01]), ReasonCode::ProtocolError);
    assert_eq!(reason(V4, &[0xA2, 0x02, 0x00, 0x01]), ReasonCode::ProtocolError);
    assert_eq!(reason(V5, &[0x82, 0x03, 0x00, 0x01, 0x00]), ReasonCode::ProtocolError);
}

#[test]
fn g55_bad_subscription_options() {
    // QoS 3.
    assert_eq!(reason(V5, &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x03]), ReasonCode::MalformedPacket);
    // Reserved bits 6-7 [MQTT-3.8.3-5].
    assert_eq!(reason(V5, &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40]), ReasonCode::MalformedPacket);
    // Retain Handling 3.
    assert_eq!(reason(V5, &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30]), ReasonCode::ProtocolError);
    // 3.1.1: any upper bit of the QoS byte [MQTT-3.8.3-4].
    assert_eq!(reason(V4, &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04]), ReasonCode::MalformedPacket);
}

#[test]
fn g57_subscription_identifier_zero_is_protocol_error() {
    assert_eq!(reason(V5, &[0x82, 0x09, 0x00, 0x01, 0x02, 0x0B, 0x00, 0x00, 0x01, b'a', 0x00]), ReasonCode::ProtocolError);
}

#[test]
fn g58_truncated_subscribe_is_malformed() {
    // Options byte missing.
    assert_eq!(reason(V4, &[0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a']), ReasonCode::MalformedPacket);
}

#[test]
fn errors_read_like_sentences() {
    let e = decode(V4, &[0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a']).unwrap_err();
    assert_eq!(e.to_string(), "SUBSCRIBE is truncated: subscription options is missing");
    let e = decode(V5, &v5_publish_with_props(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2])).unwrap_err();
    assert_eq!(e.to_string(), "PUBLISH carries the Message Expiry Interval property more than once");
}
