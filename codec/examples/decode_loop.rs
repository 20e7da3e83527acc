//! Decodes a stream of PUBLISH packets in a loop: a fixed workload for profilers
//! (`valgrind --tool=callgrind`, `perf record`). Not a benchmark: see benches/codec.rs.

use bytes::{Bytes, BytesMut};
use mqfleet_codec::{decode_packet, Packet, PacketId, Protocol, Publish, QoS};

fn main() {
    let protocol = if std::env::args().any(|a| a == "v5") { Protocol::V5 } else { Protocol::V3_1_1 };
    let p = Packet::Publish(Publish::new("devices/1234567/telemetry", QoS::AtLeastOnce, Bytes::from_static(&[7u8; 64]), PacketId::new(42)));
    let mut wire = BytesMut::new();
    for _ in 0..100 {
        p.encode(protocol, &mut wire).unwrap();
    }
    let mut n = 0usize;
    for _ in 0..2_000 {
        let mut buf = wire.clone();
        while let Some(p) = decode_packet(&mut buf, protocol, 1 << 20).unwrap() {
            n += matches!(p, Packet::Publish(_)) as usize;
        }
    }
    println!("{n}");
}
