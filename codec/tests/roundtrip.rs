//! Property tests: every packet the encoder writes, the decoder reads back unchanged, in both
//! protocol versions, and framing is independent of how the bytes are split.

use bytes::{Bytes, BytesMut};
use mqfleet_codec::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn pkid() -> impl Strategy<Value = PacketId> {
    (1u16..=u16::MAX).prop_map(|v| PacketId::new(v).unwrap())
}

/// Strings that pass the strictest MQTT rules.
fn ident() -> impl Strategy<Value = ByteString> {
    "[a-zA-Z0-9_./ -]{0,24}".prop_map(ByteString::from)
}

fn text() -> impl Strategy<Value = ByteString> {
    "\\PC{0,16}".prop_map(ByteString::from)
}

fn topic_name() -> impl Strategy<Value = ByteString> {
    "[a-z0-9]{1,6}(/[a-z0-9]{0,6}){0,4}".prop_map(ByteString::from)
}

fn topic_filter() -> impl Strategy<Value = ByteString> {
    prop_oneof![topic_name(), Just("#".into()), Just("a/+/c".into()), Just("+/#".into())]
}

fn bin() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..32).prop_map(Bytes::from)
}

fn user_props() -> impl Strategy<Value = Vec<UserProperty>> {
    vec((text(), text()), 0..3)
}

fn publish_props() -> impl Strategy<Value = PublishProperties> {
    (
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(1u16..),
        option::of(topic_name()),
        option::of(bin()),
        option::of(text()),
        user_props(),
        vec(1u32..=268_435_455, 0..3),
    )
        .prop_map(|(pfi, exp, alias, rt, cd, ct, up, subs)| PublishProperties {
            payload_format_indicator: pfi,
            message_expiry_interval: exp,
            topic_alias: alias,
            response_topic: rt,
            correlation_data: cd,
            content_type: ct,
            user_properties: up,
            subscription_identifiers: subs,
        })
}

fn publish(v5: bool) -> impl Strategy<Value = Publish> {
    (qos(), any::<bool>(), any::<bool>(), topic_name(), pkid(), publish_props(), bin()).prop_map(
        move |(qos, dup, retain, topic, id, props, payload)| Publish {
            dup: dup && qos != QoS::AtMostOnce,
            qos,
            retain,
            topic,
            pkid: (qos != QoS::AtMostOnce).then_some(id),
            properties: if v5 { props } else { PublishProperties::default() },
            payload,
        },
    )
}

fn connect(protocol: Protocol) -> impl Strategy<Value = Connect> {
    let v5 = protocol.is_v5();
    (
        any::<bool>(),
        any::<u16>(),
        ident(),
        option::of((topic_name(), bin(), qos(), any::<bool>(), option::of(any::<u32>()))),
        option::of(ident()),
        option::of(bin()),
        option::of(any::<u32>()),
        option::of(1u16..),
        user_props(),
    )
        .prop_map(move |(clean, ka, id, will, user, pass, sei, rm, up)| {
            let mut c = Connect::new(protocol, id);
            c.clean_start = clean;
            c.keep_alive = ka;
            c.will = will.map(|(topic, payload, qos, retain, delay)| Will {
                topic,
                payload,
                qos,
                retain,
                properties: WillProperties { will_delay_interval: if v5 { delay } else { None }, ..Default::default() },
            });
            // 3.1.1 forbids a password without a user name [MQTT-3.1.2-22].
            c.password = if v5 || user.is_some() { pass } else { None };
            c.username = user;
            if v5 {
                c.properties.session_expiry_interval = sei;
                c.properties.receive_maximum = rm;
                c.properties.user_properties = up;
            }
            c
        })
}

fn reason_v5() -> impl Strategy<Value = ReasonCode> {
    prop_oneof![
        Just(ReasonCode::Success),
        Just(ReasonCode::NotAuthorized),
        Just(ReasonCode::QuotaExceeded),
        Just(ReasonCode::PayloadFormatInvalid)
    ]
}

fn packet(protocol: Protocol) -> impl Strategy<Value = Packet> {
    let v5 = protocol.is_v5();
    let ack = || {
        (pkid(), reason_v5(), option::of(text()))
            .prop_map(move |(id, reason, rs)| {
                if v5 {
                    let mut a = Ack::with_reason(id, reason);
                    a.properties.reason_string = rs;
                    a
                } else {
                    Ack::new(id)
                }
            })
            .boxed()
    };
    let pubrel = || pkid().prop_map(Ack::new);
    let sub_opts = (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(move |(qos, nl, rap, rh)| {
        if v5 {
            SubscriptionOptions {
                qos,
                no_local: nl,
                retain_as_published: rap,
                retain_handling: [RetainHandling::OnSubscribe, RetainHandling::OnNewSubscription, RetainHandling::Never][rh as usize],
            }
        } else {
            SubscriptionOptions::qos(qos)
        }
    });
    let subscribe = (pkid(), vec((topic_filter(), sub_opts), 1..4), option::of(1u32..=268_435_455)).prop_map(move |(id, filters, sid)| {
        let mut s = Subscribe::new(id, filters);
        if v5 {
            s.properties = SubscribeProperties::with_id(sid);
        }
        s
    });
    let suback_reason = prop_oneof![
        Just(ReasonCode::Success),
        Just(ReasonCode::GrantedQoS1),
        Just(ReasonCode::GrantedQoS2),
        Just(ReasonCode::UnspecifiedError)
    ];
    let suback = (pkid(), vec(suback_reason, 1..4)).prop_map(|(id, r)| SubAck::new(id, r));
    let unsubscribe = (pkid(), vec(topic_filter(), 1..4)).prop_map(|(id, f)| Unsubscribe::new(id, f));
    let unsuback = (pkid(), vec(prop_oneof![Just(ReasonCode::Success), Just(ReasonCode::NoSubscriptionExisted)], 1..4))
        .prop_map(move |(id, r)| UnsubAck::new(id, if v5 { r } else { Vec::new() }));
    let connack = (any::<bool>(), prop_oneof![Just(ReasonCode::Success), Just(ReasonCode::NotAuthorized)], option::of(any::<u16>()))
        .prop_map(move |(sp, reason, ka)| {
            let mut c = ConnAck::new(reason, sp && protocol != Protocol::V3_1);
            if v5 {
                c.properties.server_keep_alive = ka;
            }
            c
        });
    let disconnect = prop_oneof![Just(ReasonCode::Success), Just(ReasonCode::DisconnectWithWill), Just(ReasonCode::SessionTakenOver)]
        .prop_map(move |r| Disconnect::new(if v5 { r } else { ReasonCode::Success }));

    let mut options = vec![
        connect(protocol).prop_map(|c| Packet::Connect(Box::new(c))).boxed(),
        connack.prop_map(Packet::ConnAck).boxed(),
        publish(v5).prop_map(Packet::Publish).boxed(),
        ack().prop_map(Packet::PubAck).boxed(),
        ack().prop_map(Packet::PubRec).boxed(),
        pubrel().prop_map(Packet::PubRel).boxed(),
        pubrel().prop_map(Packet::PubComp).boxed(),
        subscribe.prop_map(Packet::Subscribe).boxed(),
        suback.prop_map(Packet::SubAck).boxed(),
        unsubscribe.prop_map(Packet::Unsubscribe).boxed(),
        unsuback.prop_map(Packet::UnsubAck).boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect.prop_map(Packet::Disconnect).boxed(),
    ];
    if v5 {
        options.push(
            (option::of(text()), option::of(bin()))
                .prop_map(|(m, d)| {
                    Packet::Auth(Auth {
                        reason: ReasonCode::ContinueAuthentication,
                        properties: AuthProperties {
                            authentication_method: m,
                            authentication_data: d,
                            reason_string: None,
                            user_properties: vec![],
                        },
                    })
                })
                .boxed(),
        );
    }
    proptest::strategy::Union::new(options)
}

fn round_trip(protocol: Protocol, p: &Packet) {
    let mut buf = BytesMut::new();
    p.encode(protocol, &mut buf).unwrap();
    assert_eq!(buf.len(), p.encoded_len(protocol), "encoded_len disagrees with encode for {p:?}");
    let decoded = decode_packet(&mut buf, protocol, usize::MAX).unwrap().expect("a complete packet");
    assert_eq!(&decoded, p);
    assert!(buf.is_empty());
}

proptest! {
    #[test]
    fn v5_packets_round_trip(p in packet(Protocol::V5)) {
        round_trip(Protocol::V5, &p);
    }

    #[test]
    fn v3_1_1_packets_round_trip(p in packet(Protocol::V3_1_1)) {
        round_trip(Protocol::V3_1_1, &p);
    }

    #[test]
    fn v3_1_packets_round_trip(p in packet(Protocol::V3_1)) {
        round_trip(Protocol::V3_1, &p);
    }

    /// A stream of packets cut at arbitrary points decodes to the same packets
    /// (BAD-INPUT A.6: coalesced and split segments behave identically).
    #[test]
    fn splitting_the_stream_does_not_change_the_packets(
        packets in vec(packet(Protocol::V5), 1..6),
        cuts in vec(1usize..40, 1..20),
    ) {
        let mut wire = BytesMut::new();
        for p in &packets {
            p.encode(Protocol::V5, &mut wire).unwrap();
        }
        let wire = wire.freeze();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut cut = cuts.iter().cycle();
        while pos < wire.len() {
            let n = (*cut.next().unwrap()).min(wire.len() - pos);
            buf.extend_from_slice(&wire[pos..pos + n]);
            pos += n;
            while let Some(p) = decode_packet(&mut buf, Protocol::V5, usize::MAX).unwrap() {
                got.push(p);
            }
        }
        prop_assert_eq!(got, packets);
    }

    /// Arbitrary bytes never panic the decoder (BAD-INPUT: "never panic on input").
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256), v5 in any::<bool>()) {
        let protocol = if v5 { Protocol::V5 } else { Protocol::V3_1_1 };
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode_packet(&mut buf, protocol, 1 << 20) {}
    }
}
