//! How strict is each candidate codec? Every vector below breaks a MUST of the specification
//! (BAD-INPUT.md groups A–G). mqfleet-codec must reject all of them; the alternatives are
//! measured for docs/ARCHITECTURE.md ("Codec decision"):
//! `cargo test -p mqfleet-codec --test strictness_vs_alternatives -- --nocapture`.

use bytes::BytesMut;
use mqfleet_codec::{decode_packet, Protocol};

struct Vector {
    name: &'static str,
    v5: bool,
    bytes: &'static [u8],
}

const VECTORS: &[Vector] = &[
    Vector { name: "A1 remaining length in 5 bytes", v5: false, bytes: &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01, 0, 1, b't'] },
    Vector { name: "B13 SUBSCRIBE flags 0000", v5: false, bytes: &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00] },
    Vector { name: "B13 PUBREL flags 0000", v5: false, bytes: &[0x60, 0x02, 0x00, 0x01] },
    Vector { name: "B13 PINGREQ flags 0001", v5: false, bytes: &[0xC1, 0x00] },
    Vector { name: "C17 CONNECT reserved flag", v5: false, bytes: &[0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 1, b'a'] },
    Vector {
        name: "C18 will QoS without will flag",
        v5: false,
        bytes: &[0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x0A, 0, 60, 0, 1, b'a'],
    },
    Vector {
        name: "C20 password without user name (3.1.1)",
        v5: false,
        bytes: &[0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x42, 0, 60, 0, 1, b'a', 0, 1, b'p'],
    },
    Vector {
        name: "C22 client id with U+0000",
        v5: false,
        bytes: &[0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'a', 0],
    },
    Vector {
        name: "C22 client id with U+0001",
        v5: false,
        bytes: &[0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'a', 1],
    },
    Vector {
        name: "C22 client id with encoded surrogate",
        v5: false,
        bytes: &[0x10, 0x0f, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 3, 0xED, 0xA0, 0x80],
    },
    Vector {
        name: "D28 duplicate Message Expiry Interval",
        v5: true,
        bytes: &[0x30, 0x0e, 0, 1, b't', 0x0a, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2],
    },
    Vector { name: "D29 Session Expiry Interval in PUBLISH", v5: true, bytes: &[0x30, 0x09, 0, 1, b't', 0x05, 0x11, 0, 0, 0, 1] },
    Vector { name: "D29 unknown property 0x7F", v5: true, bytes: &[0x30, 0x06, 0, 1, b't', 0x02, 0x7F, 0] },
    Vector { name: "E36 PUBLISH topic with +", v5: false, bytes: &[0x30, 0x05, 0, 3, b'a', b'/', b'+'] },
    Vector { name: "E36 PUBLISH topic with #", v5: false, bytes: &[0x30, 0x03, 0, 1, b'#'] },
    Vector { name: "E37 empty topic without alias (3.1.1)", v5: false, bytes: &[0x30, 0x02, 0, 0] },
    Vector { name: "E38 Topic Alias 0", v5: true, bytes: &[0x30, 0x06, 0, 0, 0x03, 0x23, 0, 0] },
    Vector { name: "E39 QoS 3", v5: false, bytes: &[0x36, 0x05, 0, 1, b't', 0, 1] },
    Vector { name: "E39 DUP on QoS 0", v5: false, bytes: &[0x38, 0x03, 0, 1, b't'] },
    Vector { name: "E40 QoS 1 with packet id 0", v5: false, bytes: &[0x32, 0x05, 0, 1, b't', 0, 0] },
    Vector { name: "G53 SUBSCRIBE without filters", v5: false, bytes: &[0x82, 0x02, 0, 1] },
    Vector { name: "G53 UNSUBSCRIBE without filters", v5: false, bytes: &[0xA2, 0x02, 0, 1] },
    Vector { name: "G55 subscription options reserved bits (5.0)", v5: true, bytes: &[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0xC0] },
    Vector { name: "G55 Retain Handling 3", v5: true, bytes: &[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x30] },
    Vector { name: "G55 subscription QoS 3", v5: false, bytes: &[0x82, 0x06, 0, 1, 0, 1, b'a', 0x03] },
    Vector { name: "G57 Subscription Identifier 0", v5: true, bytes: &[0x82, 0x09, 0, 1, 0x02, 0x0B, 0x00, 0, 1, b'a', 0] },
    Vector { name: "G58 SUBSCRIBE options byte missing", v5: false, bytes: &[0x82, 0x05, 0, 1, 0, 1, b'a'] },
];

fn ours(v: &Vector) -> bool {
    let protocol = if v.v5 { Protocol::V5 } else { Protocol::V3_1_1 };
    decode_packet(&mut BytesMut::from(v.bytes), protocol, 1 << 20).is_err()
}

fn mqttbytes_06(v: &Vector) -> bool {
    let mut b = BytesMut::from(v.bytes);
    let r = std::panic::catch_unwind(move || {
        if v.v5 {
            mqttbytes::v5::read(&mut b, 1 << 20).is_err()
        } else {
            mqttbytes::v4::read(&mut b, 1 << 20).is_err()
        }
    });
    r.unwrap_or(true)
}

fn rumqttc_025(v: &Vector) -> bool {
    let mut b = BytesMut::from(v.bytes);
    let r = std::panic::catch_unwind(move || {
        if v.v5 {
            rumqttc::v5::mqttbytes::v5::Packet::read(&mut b, Some(1 << 20)).is_err()
        } else {
            rumqttc::mqttbytes::v4::Packet::read(&mut b, 1 << 20).is_err()
        }
    });
    r.unwrap_or(true)
}

#[test]
fn mqfleet_codec_rejects_every_vector_and_alternatives_are_measured() {
    let (mut a, mut b, mut c) = (0, 0, 0);
    println!("| vector | mqfleet-codec | mqttbytes 0.6 | rumqttc 0.25 |\n|---|---|---|---|");
    let mark = |x: bool| if x { "rejects" } else { "accepts" };
    for v in VECTORS {
        let (x, y, z) = (ours(v), mqttbytes_06(v), rumqttc_025(v));
        a += x as usize;
        b += y as usize;
        c += z as usize;
        println!("| {} | {} | {} | {} |", v.name, mark(x), mark(y), mark(z));
        assert!(x, "mqfleet-codec accepted: {}", v.name);
    }
    println!("| **rejected** | **{a}/{n}** | **{b}/{n}** | **{c}/{n}** |", n = VECTORS.len());
}
