//! Placements are part of the wire contract: every proxy and shard, of any version, on any
//! machine, must send a topic to the same shard. These values were produced by
//! `cargo run -p broker-shard --example ring_placements` and are checked in; if this test fails,
//! the hash changed, and upgrading a running cluster would split topics between two owners.
//! Change it only together with a migration (a rebalance of every topic).

use broker_shard::ring::Ring;

fn owners(shards: usize) -> Vec<usize> {
    let names: Vec<String> = (0..shards).map(|i| format!("shard-{i}")).collect();
    let ring = Ring::new(&names);
    (0..24).map(|i| ring.owner(&format!("devices/{i}/telemetry"))).collect()
}

#[test]
fn placements_on_three_shards_are_pinned() {
    assert_eq!(owners(3), [1, 2, 2, 0, 2, 2, 1, 2, 2, 2, 0, 1, 1, 2, 1, 1, 2, 1, 0, 2, 2, 1, 0, 0]);
}

#[test]
fn placements_on_five_shards_are_pinned() {
    assert_eq!(owners(5), [3, 2, 3, 3, 3, 2, 4, 4, 3, 2, 4, 4, 1, 4, 1, 1, 3, 4, 0, 3, 2, 1, 0, 0]);
}

#[test]
fn placement_does_not_depend_on_the_order_shards_are_listed_in() {
    let a = Ring::new(&["shard-0".to_string(), "shard-1".to_string(), "shard-2".to_string()]);
    let names_b = ["shard-2".to_string(), "shard-0".to_string(), "shard-1".to_string()];
    let b = Ring::new(&names_b);
    for i in 0..200 {
        let t = format!("x/{i}");
        assert_eq!(["shard-0", "shard-1", "shard-2"][a.owner(&t)], names_b[b.owner(&t)], "{t}");
    }
}
