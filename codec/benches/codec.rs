//! Codec speed: mqfleet's codec against mqttbytes 0.6 (the crate the design card names) and
//! rumqttc 0.25's bundled fork of it, on the packets a broker handles most.
//!
//! Run: `cargo bench -p mqfleet-codec --bench codec`. Each decode iteration decodes a stream of
//! 100 packets from one buffer (what a busy connection's read buffer holds); each encode
//! iteration encodes 100 packets into one buffer.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mqfleet_codec::{decode_packet, Packet, PacketId, Protocol, Publish, QoS, Subscribe, SubscriptionOptions};

const N: usize = 100;
const PAYLOAD: [u8; 64] = [7u8; 64];
const TOPIC: &str = "devices/1234567/telemetry";

fn ours_publish(protocol: Protocol) -> Packet {
    let mut p = Publish::new(TOPIC, QoS::AtLeastOnce, Bytes::from_static(&PAYLOAD), PacketId::new(42));
    if protocol.is_v5() {
        p.properties.message_expiry_interval = Some(60);
    }
    Packet::Publish(p)
}

fn stream(protocol: Protocol, packet: &Packet) -> BytesMut {
    let mut b = BytesMut::new();
    for _ in 0..N {
        packet.encode(protocol, &mut b).unwrap();
    }
    b
}

/// Benchmarks decoding `wire` (a stream of packets) with `decode`, which must consume one packet
/// per call.
fn bench_decode<O>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    wire: &BytesMut,
    decode: impl Fn(&mut BytesMut) -> O,
) {
    g.bench_function(name, |b| {
        b.iter_batched(
            || wire.clone(),
            |mut buf| {
                while !buf.is_empty() {
                    std::hint::black_box(decode(&mut buf));
                }
            },
            BatchSize::SmallInput,
        )
    });
}

fn decode_publish(c: &mut Criterion) {
    for (name, protocol) in [("3.1.1", Protocol::V3_1_1), ("5.0", Protocol::V5)] {
        let wire = stream(protocol, &ours_publish(protocol));
        let mut g = c.benchmark_group(format!("decode PUBLISH 64 B, MQTT {name}"));
        g.throughput(Throughput::Elements(N as u64));
        bench_decode(&mut g, "mqfleet-codec", &wire, |b| decode_packet(b, protocol, 1 << 20).unwrap());
        if protocol.is_v5() {
            bench_decode(&mut g, "mqttbytes 0.6", &wire, |b| mqttbytes::v5::read(b, 1 << 20).unwrap());
            bench_decode(&mut g, "rumqttc 0.25 mqttbytes", &wire, |b| rumqttc::v5::mqttbytes::v5::Packet::read(b, Some(1 << 20)).unwrap());
        } else {
            bench_decode(&mut g, "mqttbytes 0.6", &wire, |b| mqttbytes::v4::read(b, 1 << 20).unwrap());
            bench_decode(&mut g, "rumqttc 0.25 mqttbytes", &wire, |b| rumqttc::mqttbytes::v4::Packet::read(b, 1 << 20).unwrap());
        }
        g.finish();
    }
}

fn encode_publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode PUBLISH 64 B, MQTT 3.1.1");
    g.throughput(Throughput::Elements(N as u64));
    let ours = ours_publish(Protocol::V3_1_1);
    g.bench_function("mqfleet-codec", |b| {
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(N * 100);
            for _ in 0..N {
                ours.encode(Protocol::V3_1_1, &mut buf).unwrap();
            }
            std::hint::black_box(buf)
        })
    });
    let mut theirs = mqttbytes::v4::Publish::new(TOPIC, mqttbytes::QoS::AtLeastOnce, PAYLOAD.to_vec());
    theirs.pkid = 42;
    g.bench_function("mqttbytes 0.6", |b| {
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(N * 100);
            for _ in 0..N {
                theirs.write(&mut buf).unwrap();
            }
            std::hint::black_box(buf)
        })
    });
    let mut rc = rumqttc::mqttbytes::v4::Publish::new(TOPIC, rumqttc::mqttbytes::QoS::AtLeastOnce, PAYLOAD.to_vec());
    rc.pkid = 42;
    g.bench_function("rumqttc 0.25 mqttbytes", |b| {
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(N * 100);
            for _ in 0..N {
                rc.write(&mut buf).unwrap();
            }
            std::hint::black_box(buf)
        })
    });
    g.finish();
}

fn decode_subscribe(c: &mut Criterion) {
    let sub = Packet::Subscribe(Subscribe::new(
        PacketId::new(1).unwrap(),
        vec![
            ("devices/+/telemetry".into(), SubscriptionOptions::qos(QoS::AtLeastOnce)),
            ("alerts/#".into(), SubscriptionOptions::qos(QoS::AtMostOnce)),
        ],
    ));
    let wire = stream(Protocol::V5, &sub);
    let mut g = c.benchmark_group("decode SUBSCRIBE (2 filters), MQTT 5.0");
    g.throughput(Throughput::Elements(N as u64));
    bench_decode(&mut g, "mqfleet-codec", &wire, |b| decode_packet(b, Protocol::V5, 1 << 20).unwrap());
    bench_decode(&mut g, "mqttbytes 0.6", &wire, |b| mqttbytes::v5::read(b, 1 << 20).unwrap());
    g.finish();
}

criterion_group!(benches, decode_publish, encode_publish, decode_subscribe);
criterion_main!(benches);
