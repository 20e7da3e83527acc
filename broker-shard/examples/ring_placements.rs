//! Prints topic placements in the form `tests/ring_golden.rs` pins them.
fn main() {
    for n in [3usize, 5] {
        let names: Vec<String> = (0..n).map(|i| format!("shard-{i}")).collect();
        let ring = broker_shard::ring::Ring::new(&names);
        let owners: Vec<usize> = (0..24).map(|i| ring.owner(&format!("devices/{i}/telemetry"))).collect();
        println!("{n}: {owners:?}");
    }
}
