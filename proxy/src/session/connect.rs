//! CONNECT negotiation (MQTT 5 §3.1–3.2): what the server accepts, what it changes, and what it
//! answers in CONNACK.

use broker_shard::Message;
use mqfleet_codec::{topic, ByteString, ConnAckProperties, Connect, Protocol, ReasonCode};

use super::Limits;

/// A will as accepted from CONNECT, published when its connection ends abnormally.
#[derive(Debug, Clone, PartialEq)]
pub struct WillSpec {
    /// `expires_at_ms` is unset: expiry counts from publication.
    pub message: Message,
    pub delay_interval: u32,
    pub message_expiry_interval: Option<u32>,
}

/// Session expiry meaning "never" (MQTT 5 §3.1.2.11.2: 0xFFFFFFFF).
pub const NEVER: u32 = u32::MAX;

/// The outcome of a successful negotiation.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub protocol: Protocol,
    pub client_id: ByteString,
    /// The server chose the id (returned in CONNACK to 5.0 clients).
    pub assigned: bool,
    pub clean_start: bool,
    /// Keep-alive in force, seconds; 0 disables.
    pub keep_alive: u16,
    /// Session expiry in force, seconds; 0 = ends with the connection, [`NEVER`] = never.
    pub session_expiry: u32,
    /// The client's Receive Maximum: our outbound window is at most this.
    pub client_receive_maximum: u16,
    /// The client's Maximum Packet Size: we never send it more [MQTT-3.1.2-24].
    pub client_max_packet_size: u32,
    pub client_topic_alias_maximum: u16,
    pub will: Option<WillSpec>,
    /// CONNACK properties for 5.0 clients (session present and reason are set by the caller).
    pub connack: ConnAckProperties,
}

/// Why the server refuses a CONNECT: sent as the CONNACK reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: ReasonCode,
    pub detail: String,
}

fn refuse(reason: ReasonCode, detail: impl Into<String>) -> Refusal {
    Refusal { reason, detail: detail.into() }
}

/// Decides on a CONNECT. `new_id` makes a client identifier when the server must assign one.
pub fn negotiate(c: &Connect, limits: &Limits, new_id: impl FnOnce() -> String) -> Result<Negotiated, Refusal> {
    let v5 = c.protocol.is_v5();
    if c.properties.authentication_method.is_some() {
        // No enhanced authentication method is configured (MQTT 5 §4.12).
        return Err(refuse(ReasonCode::BadAuthenticationMethod, "no authentication method is configured on this server"));
    }

    let (client_id, assigned) = if c.client_id.is_empty() {
        match c.protocol {
            Protocol::V3_1 => return Err(refuse(ReasonCode::ClientIdentifierNotValid, "MQTT 3.1 requires a client identifier")),
            Protocol::V3_1_1 if !c.clean_start => {
                return Err(refuse(ReasonCode::ClientIdentifierNotValid, "empty client identifier with CleanSession=0 (MQTT-3.1.3-8)"))
            }
            _ => (ByteString::from(new_id()), true),
        }
    } else {
        (c.client_id.clone(), false)
    };
    if client_id.len() > limits.max_client_id_length {
        return Err(refuse(
            ReasonCode::ClientIdentifierNotValid,
            format!("client identifier of {} bytes exceeds the limit of {}", client_id.len(), limits.max_client_id_length),
        ));
    }

    let mut connack = ConnAckProperties::default();
    let max_ka = limits.max_keepalive_secs;
    let keep_alive = if c.keep_alive > max_ka || (v5 && c.keep_alive == 0 && max_ka > 0) {
        if !v5 {
            // 3.1.1 has no way to tell the client another value: refuse, as Mosquitto does.
            return Err(refuse(
                ReasonCode::ClientIdentifierNotValid,
                format!("keep-alive of {} s exceeds the server maximum of {} s", c.keep_alive, max_ka),
            ));
        }
        connack.server_keep_alive = Some(max_ka);
        max_ka
    } else {
        c.keep_alive
    };

    let cap = if limits.max_session_expiry_secs == 0 { NEVER } else { limits.max_session_expiry_secs };
    let session_expiry = if v5 {
        let asked = c.properties.session_expiry_interval.unwrap_or(0);
        if asked > cap {
            connack.session_expiry_interval = Some(cap);
            cap
        } else {
            asked
        }
    } else if c.clean_start {
        0
    } else {
        cap
    };

    let will = match &c.will {
        None => None,
        Some(w) => {
            topic::validate_topic_name(&w.topic, &limits.topic)
                .map_err(|e| refuse(ReasonCode::TopicNameInvalid, format!("will topic: {e}")))?;
            if w.topic.starts_with('$') {
                return Err(refuse(ReasonCode::NotAuthorized, "will topics starting with $ are reserved for the server"));
            }
            if w.properties.payload_format_indicator == Some(true) && std::str::from_utf8(&w.payload).is_err() {
                return Err(refuse(
                    ReasonCode::PayloadFormatInvalid,
                    "will payload is not UTF-8 but its Payload Format Indicator says it is",
                ));
            }
            let p = &w.properties;
            let mut message = Message {
                topic: w.topic.clone(),
                payload: w.payload.clone(),
                qos: w.qos,
                retain: w.retain,
                properties: Default::default(),
                expires_at_ms: None,
                origin: Some(client_id.clone()),
            };
            message.properties.payload_format_indicator = p.payload_format_indicator;
            message.properties.content_type = p.content_type.clone();
            message.properties.response_topic = p.response_topic.clone();
            message.properties.correlation_data = p.correlation_data.clone();
            message.properties.user_properties = p.user_properties.clone();
            Some(WillSpec {
                message,
                delay_interval: p.will_delay_interval.unwrap_or(0),
                message_expiry_interval: p.message_expiry_interval,
            })
        }
    };

    if v5 {
        connack.receive_maximum = Some(limits.receive_maximum);
        connack.maximum_packet_size = Some(limits.max_packet_size);
        connack.topic_alias_maximum = Some(limits.topic_alias_maximum);
        if assigned {
            connack.assigned_client_identifier = Some(client_id.clone());
        }
    }

    Ok(Negotiated {
        protocol: c.protocol,
        client_id,
        assigned,
        clean_start: c.clean_start,
        keep_alive,
        session_expiry,
        client_receive_maximum: c.properties.receive_maximum.unwrap_or(u16::MAX),
        client_max_packet_size: c.properties.maximum_packet_size.unwrap_or(u32::MAX),
        client_topic_alias_maximum: c.properties.topic_alias_maximum.unwrap_or(0),
        will,
        connack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn id() -> String {
        "assigned-1".into()
    }

    #[test]
    fn empty_id_with_clean_session_0_is_refused_in_3_1_1_mqtt_3_1_3_8() {
        let mut c = Connect::new(Protocol::V3_1_1, "");
        c.clean_start = false;
        assert_eq!(negotiate(&c, &limits(), id).unwrap_err().reason, ReasonCode::ClientIdentifierNotValid);
        c.clean_start = true;
        assert!(negotiate(&c, &limits(), id).unwrap().assigned);
    }

    #[test]
    fn empty_id_in_5_0_gets_an_assigned_identifier() {
        let n = negotiate(&Connect::new(Protocol::V5, ""), &limits(), id).unwrap();
        assert_eq!(n.client_id, "assigned-1");
        assert_eq!(n.connack.assigned_client_identifier.as_deref(), Some("assigned-1"));
    }

    #[test]
    fn client_id_length_limit_bad_input_c24() {
        let mut l = limits();
        l.max_client_id_length = 4;
        assert!(negotiate(&Connect::new(Protocol::V5, "abcd"), &l, id).is_ok());
        assert_eq!(negotiate(&Connect::new(Protocol::V5, "abcde"), &l, id).unwrap_err().reason, ReasonCode::ClientIdentifierNotValid);
    }

    #[test]
    fn keepalive_above_maximum_refused_in_3_1_1_and_lowered_in_5_0_bad_input_c25() {
        let mut c = Connect::new(Protocol::V3_1_1, "a");
        c.keep_alive = 65535;
        assert!(negotiate(&c, &limits(), id).is_err());
        c.protocol = Protocol::V5;
        let n = negotiate(&c, &limits(), id).unwrap();
        assert_eq!(n.keep_alive, limits().max_keepalive_secs);
        assert_eq!(n.connack.server_keep_alive, Some(limits().max_keepalive_secs));
        // 5.0 keep-alive 0 is capped too: every connection is watched.
        c.keep_alive = 0;
        assert_eq!(negotiate(&c, &limits(), id).unwrap().keep_alive, limits().max_keepalive_secs);
    }

    #[test]
    fn session_expiry_is_capped_and_reported() {
        let mut c = Connect::new(Protocol::V5, "a");
        c.properties.session_expiry_interval = Some(u32::MAX);
        let n = negotiate(&c, &limits(), id).unwrap();
        assert_eq!(n.session_expiry, limits().max_session_expiry_secs);
        assert_eq!(n.connack.session_expiry_interval, Some(limits().max_session_expiry_secs));
        // 3.1.1 persistent session: the cap.
        let mut c = Connect::new(Protocol::V3_1_1, "a");
        c.clean_start = false;
        assert_eq!(negotiate(&c, &limits(), id).unwrap().session_expiry, limits().max_session_expiry_secs);
    }

    #[test]
    fn authentication_method_is_refused_without_configuration_bad_input_d33() {
        let mut c = Connect::new(Protocol::V5, "a");
        c.properties.authentication_method = Some("SCRAM-SHA-1".into());
        assert_eq!(negotiate(&c, &limits(), id).unwrap_err().reason, ReasonCode::BadAuthenticationMethod);
    }

    #[test]
    fn will_payload_must_match_its_format_indicator_bad_input_d34() {
        let mut c = Connect::new(Protocol::V5, "a");
        let mut w = mqfleet_codec::Will {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"\xff"),
            qos: mqfleet_codec::QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        };
        w.properties.payload_format_indicator = Some(true);
        c.will = Some(w);
        assert_eq!(negotiate(&c, &limits(), id).unwrap_err().reason, ReasonCode::PayloadFormatInvalid);
    }

    #[test]
    fn will_on_reserved_topic_is_not_authorized_bad_input_c19() {
        let mut c = Connect::new(Protocol::V5, "a");
        c.will = Some(mqfleet_codec::Will {
            topic: "$SYS/x".into(),
            payload: bytes::Bytes::new(),
            qos: mqfleet_codec::QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        });
        assert_eq!(negotiate(&c, &limits(), id).unwrap_err().reason, ReasonCode::NotAuthorized);
    }
}
