//! Topic → shard: a consistent-hash ring over the shard set.
//!
//! Every proxy and shard builds the same ring from the same shard names, so all proxies send a
//! topic to the same shard. The hash must not change between releases: `tests/ring_golden.rs`
//! pins placements; changing them is a decision that needs a migration (a rebalance).
//!
//! Hash inputs are written as raw bytes only (never `usize` lengths or native integers), so
//! placement does not depend on the platform's word size. The ring's own vnode chaining hashes
//! `u64`s in native byte order: placements are pinned for little-endian machines (x86_64 and
//! aarch64, everything we ship for).

use std::hash::{Hash, Hasher};

use consistent_hash_ring::{Ring as HashRing, RingBuilder};

/// Virtual nodes per shard: with 10 shards, topics spread within a few percent of even.
const VNODES: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    name: String,
    index: usize,
}

impl Hash for Node {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.name.as_bytes());
    }
}

struct Key<'a>(&'a str);

impl Hash for Key<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// The placement of topics on shards.
pub struct Ring {
    ring: HashRing<Node>,
    names: Vec<String>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Ring").field(&self.names).finish()
    }
}

impl Ring {
    /// A ring over shards named `names`; `owner` answers with indices into `names`.
    pub fn new(names: &[String]) -> Ring {
        let nodes: Vec<Node> = names.iter().enumerate().map(|(index, name)| Node { name: name.clone(), index }).collect();
        Ring { ring: RingBuilder::default().vnodes(VNODES).nodes_iter(nodes).build(), names: names.to_vec() }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The name of the shard owning `topic`.
    pub fn owner_name(&self, topic: &str) -> &str {
        &self.names[self.owner(topic)]
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The shard owning `topic` (an index into the names; 0 for an empty ring).
    pub fn owner(&self, topic: &str) -> usize {
        if self.names.len() <= 1 {
            return 0;
        }
        self.ring.try_get(Key(topic)).map(|n| n.index).unwrap_or(0)
    }

    /// Shards that must hold a subscription: the owner of an exact filter, every shard for a
    /// wildcard filter (its matching topics can live anywhere). `filter` is without any
    /// `$share/{group}/` prefix.
    pub fn shards_for_filter(&self, filter: &str) -> ShardSet {
        if mqfleet_codec::topic::has_wildcard(filter) {
            ShardSet::All
        } else {
            ShardSet::One(self.owner(filter))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSet {
    One(usize),
    All,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("shard-{i}")).collect()
    }

    #[test]
    fn topics_spread_over_every_shard() {
        let ring = Ring::new(&names(4));
        let mut counts = [0usize; 4];
        for i in 0..10_000 {
            counts[ring.owner(&format!("devices/{i}/telemetry"))] += 1;
        }
        for c in counts {
            assert!((1_500..=3_500).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn adding_a_shard_moves_about_one_in_s_topics() {
        let (a, b) = (Ring::new(&names(3)), Ring::new(&names(4)));
        let moved = (0..10_000).filter(|i| {
            let t = format!("devices/{i}/cmd");
            a.owner(&t) != b.owner(&t)
        });
        let moved = moved.count();
        assert!((1_800..=3_300).contains(&moved), "moved {moved} of 10000, expected about 2500");
    }

    #[test]
    fn wildcard_filters_go_everywhere() {
        let ring = Ring::new(&names(3));
        assert_eq!(ring.shards_for_filter("a/+/c"), ShardSet::All);
        assert_eq!(ring.shards_for_filter("#"), ShardSet::All);
        assert_eq!(ring.shards_for_filter("a/b"), ShardSet::One(ring.owner("a/b")));
    }
}
