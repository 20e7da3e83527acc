//! The link wire format: every frame round-trips; any bytes are refused cleanly, never a panic.

use std::sync::Arc;

use broker_shard::link::frame::{decode, decode_next, encode, for_version, Frame, FrameError, MAX_FRAME, MIN_VERSION, VERSION};
use broker_shard::link::*;
use broker_shard::Message;
use bytes::{Bytes, BytesMut};
use mqfleet_codec::{ByteString, PublishProperties, QoS, RetainHandling, SubscriptionOptions};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = ByteString> {
    "[a-z0-9/+#$-]{0,12}".prop_map(ByteString::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn message() -> impl Strategy<Value = Arc<Message>> {
    ("[a-z]{1,8}(/[a-z]{1,4}){0,3}", vec(any::<u8>(), 0..40), qos(), any::<bool>(), option::of(1u64..), option::of(text())).prop_map(
        |(topic, payload, qos, retain, expires_at_ms, origin)| {
            Arc::new(Message {
                topic: topic.into(),
                payload: Bytes::from(payload),
                qos,
                retain,
                properties: PublishProperties::default(),
                expires_at_ms,
                origin,
            })
        },
    )
}

fn session() -> impl Strategy<Value = SessionInfo> {
    (text(), option::of(any::<u64>()), any::<bool>()).prop_map(|(client_id, conn, persistent)| SessionInfo {
        client_id,
        conn: conn.map(ConnId),
        persistent,
    })
}

fn options() -> impl Strategy<Value = SubscriptionOptions> {
    (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(|(qos, no_local, retain_as_published, rh)| SubscriptionOptions {
        qos,
        no_local,
        retain_as_published,
        retain_handling: [RetainHandling::OnSubscribe, RetainHandling::OnNewSubscription, RetainHandling::Never][rh as usize],
    })
}

fn delivery() -> impl Strategy<Value = DeliveryOptions> {
    (qos(), any::<bool>(), vec(any::<u32>(), 0..3)).prop_map(|(qos, retain, subscription_ids)| DeliveryOptions {
        qos,
        retain,
        subscription_ids,
    })
}

fn marker() -> impl Strategy<Value = Option<Marker>> {
    option::of(prop_oneof![
        (text(), any::<u16>()).prop_map(|(client_id, pkid)| Marker::Qos2 { client_id, pkid }),
        (text(), any::<u64>(), text()).prop_map(|(client_id, epoch, proxy)| Marker::Will(WillRef { client_id, epoch, proxy })),
    ])
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (option::of(any::<u64>()), message(), marker()).prop_map(|(id, message, marker)| Request::Publish {
            id: id.map(RequestId),
            message,
            marker
        }),
        (any::<u64>(), session(), vec((text(), options(), option::of(any::<u32>())), 0..4), option::of(any::<u64>())).prop_map(
            |(id, session, items, deliver_retained)| {
                Request::Subscribe {
                    id: RequestId(id),
                    session,
                    items: items.into_iter().map(|(filter, options, id)| SubscribeItem { filter, options, id }).collect(),
                    deliver_retained,
                }
            }
        ),
        (any::<u64>(), text(), vec(text(), 0..4)).prop_map(|(id, client_id, filters)| Request::Unsubscribe {
            id: RequestId(id),
            client_id,
            filters
        }),
        (any::<u64>(), session()).prop_map(|(id, session)| Request::Attach { id: RequestId(id), session }),
        (text(), any::<u64>()).prop_map(|(client_id, c)| Request::Detach { client_id, conn: ConnId(c) }),
        (text(), option::of(any::<u64>())).prop_map(|(client_id, c)| Request::Forget { client_id, conn: c.map(ConnId) }),
        (message(), text(), text()).prop_map(|(message, share_filter, exclude)| Request::Redispatch { message, share_filter, exclude }),
        Just(Request::ResyncDone),
        (any::<u64>(), any::<u64>()).prop_map(|(accepted, queued)| Request::Received { accepted, queued }),
        any::<u64>().prop_map(|id| Request::Flush { id: RequestId(id) }),
        any::<u64>().prop_map(|id| Request::Stats { id: RequestId(id) }),
        (any::<u64>(), vec(message(), 0..3), vec(text(), 0..3)).prop_map(|(id, messages, removed)| Request::AdoptRetained {
            id: RequestId(id),
            messages,
            removed
        }),
        (any::<u64>(), vec((text(), text(), options(), option::of(any::<u32>())), 0..3)).prop_map(|(id, items)| {
            Request::AdoptSubscriptions {
                id: RequestId(id),
                items: items.into_iter().map(|(c, filter, options, id)| (c, SubscribeItem { filter, options, id })).collect(),
            }
        }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let reply = prop_oneof![
        Just(Ok(Reply::Done)),
        any::<u64>().prop_map(|position| Ok(Reply::Accepted { position })),
        any::<[u64; 6]>().prop_map(|[sessions, subscriptions, retained_messages, retained_bytes, log_entries, ring_epoch]| Ok(
            Reply::Stats(ShardStats { sessions, subscriptions, retained_messages, retained_bytes, log_entries, ring_epoch })
        )),
        (vec(any::<bool>(), 0..4), vec((message(), delivery()), 0..3))
            .prop_map(|(existed, retained)| Ok(Reply::Subscribed { existed, retained })),
        vec(any::<bool>(), 0..4).prop_map(|existed| Ok(Reply::Unsubscribed { existed })),
        ("[a-z]{0,5}", "[a-z ]{0,20}").prop_map(|(shard, detail)| Err(ShardError::Store { shard, detail })),
        ("[a-z]{0,5}", "[a-z ]{0,20}").prop_map(|(shard, detail)| Err(ShardError::QuotaExceeded { shard, detail })),
    ];
    prop_oneof![
        (any::<u64>(), reply).prop_map(|(id, result)| Event::Reply { id: RequestId(id), result }),
        (
            message(),
            vec((any::<u64>(), delivery(), option::of(any::<u64>()), option::of(text())), 0..4),
            option::of((any::<u64>(), any::<bool>()))
        )
            .prop_map(|(message, rs, log)| {
                Event::Deliver(Deliver {
                    message,
                    recipients: rs
                        .into_iter()
                        .map(|(c, delivery, seq, share_filter)| Recipient { conn: ConnId(c), delivery, seq, share_filter })
                        .collect(),
                    log: log.map(|(position, queued)| LogRef { position, queued }),
                })
            }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), "[a-z0-9-]{0,10}", any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(version, proxy, incarnation, ring_epoch, credit)| Frame::Hello { version, proxy, incarnation, ring_epoch, credit }),
        (any::<u16>(), "[a-z0-9-]{0,10}", any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(version, shard, log_id, ring_epoch, credit)| Frame::Welcome { version, shard, log_id, ring_epoch, credit }),
        "[a-z ]{0,20}".prop_map(|reason| Frame::Refused { reason }),
        request().prop_map(Frame::Request),
        event().prop_map(Frame::Event),
        any::<u32>().prop_map(Frame::Credit),
        Just(Frame::Ping),
        Just(Frame::Pong),
    ]
}

proptest! {
    #[test]
    fn frames_round_trip_through_a_split_stream(frames in vec(frame(), 1..8), cut in 1usize..50) {
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut wire);
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(cut) {
            buf.extend_from_slice(chunk);
            while let Some(f) = decode_next(&mut buf).unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..300)) {
        let _ = decode(Bytes::from(bytes.clone()));
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode_next(&mut buf) {}
    }
}

#[test]
fn oversize_frames_are_refused_from_their_length_alone() {
    let mut buf = BytesMut::from(&((MAX_FRAME as u32) + 1).to_be_bytes()[..]);
    assert!(matches!(decode_next(&mut buf), Err(FrameError::TooLarge(_))));
}

#[test]
fn a_hostile_item_count_allocates_nothing() {
    // A Deliver claiming four billion recipients in a ten-byte body.
    let mut body = BytesMut::new();
    encode(
        &Frame::Event(Event::Deliver(Deliver {
            message: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: PublishProperties::default(),
                expires_at_ms: None,
                origin: None,
            }),
            recipients: vec![],
            log: None,
        })),
        &mut body,
    );
    // The recipient count comes just before the one-byte log reference.
    let n = body.len();
    body[n - 5..n - 1].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(decode(body.freeze().slice(4..)), Err(FrameError::Truncated("recipients"))));
}

/// Writes frames of every kind as seeds for the `link_frame` fuzz target:
/// `cargo test -p broker-shard --test frame -- --ignored write_fuzz_seeds`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    use proptest::strategy::ValueTree;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/link_frame");
    std::fs::create_dir_all(&dir).unwrap();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for i in 0..40 {
        let f = frame().new_tree(&mut runner).unwrap().current();
        let mut out = BytesMut::new();
        encode(&f, &mut out);
        std::fs::write(dir.join(format!("seed-{i:02}")), &out).unwrap();
    }
}

/// A proxy linked to a shard of the previous release (a rolling upgrade) writes a will without
/// the marker that shard would not read; everything else goes out as it is.
#[test]
fn requests_are_written_for_the_version_the_shard_speaks() {
    let message = Arc::new(Message {
        topic: "wills/dev".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
        expires_at_ms: None,
        origin: None,
    });
    let will = Marker::Will(WillRef { client_id: "dev".into(), epoch: 7, proxy: "proxy-a".into() });
    let qos2 = Marker::Qos2 { client_id: "dev".into(), pkid: 3 };
    let publish = |marker| Request::Publish { id: Some(RequestId(1)), message: message.clone(), marker };
    assert_eq!(for_version(publish(Some(will.clone())), VERSION), publish(Some(will.clone())));
    assert_eq!(for_version(publish(Some(will)), MIN_VERSION), publish(None));
    assert_eq!(for_version(publish(Some(qos2.clone())), MIN_VERSION), publish(Some(qos2)));
}
