//! The subscription index: a trie of topic filters, one level per node (MQTT 5 §4.7, §4.8.2).
//!
//! Matching a topic walks at most two children per level (the literal level and `+`) plus the
//! `#` child at each node, so the cost is bounded by the topic's levels and the number of
//! matching filters, not by the number of subscriptions.
//!
//! # Invariants
//! - A node with no subscribers, no shared groups and no children is removed.
//! - Topics starting with `$` are not matched by filters whose first level is `+` or `#`
//!   [MQTT-4.7.2-1].
//! - A shared group has at least one member.

use std::collections::HashMap;

use mqfleet_codec::SubscriptionOptions;

/// Index of a session in the shard's session table; what the trie stores per subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionSlot(pub u32);

/// A subscription's options as the trie keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
}

/// The members of one `$share/{group}/{filter}` subscription on this shard.
#[derive(Debug, Default)]
pub struct SharedGroup {
    /// The subscription as clients wrote it, `$share/{group}/{filter}`.
    pub share_filter: Box<str>,
    members: Vec<(SessionSlot, SubOptions)>,
    next: usize,
}

impl SharedGroup {
    /// Picks the next member round-robin, preferring members for which `online` holds, never
    /// `exclude`. `None` if no member qualifies.
    pub fn pick(&mut self, online: impl Fn(SessionSlot) -> bool, exclude: Option<SessionSlot>) -> Option<(SessionSlot, SubOptions)> {
        let n = self.members.len();
        let candidate = |want_online: bool| {
            (0..n).map(|i| (self.next + i) % n).find(|&i| {
                let slot = self.members[i].0;
                Some(slot) != exclude && (!want_online || online(slot))
            })
        };
        let i = candidate(true).or_else(|| candidate(false))?;
        self.next = (i + 1) % n;
        Some(self.members[i])
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subscribers: HashMap<SessionSlot, SubOptions>,
    shared: HashMap<Box<str>, SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }
}

/// What a match yields: a direct subscriber, or a shared group to pick one member from.
pub enum Match<'a> {
    Direct(SessionSlot, SubOptions),
    Shared(&'a mut SharedGroup),
}

#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    root: Node,
    len: usize,
}

impl SubscriptionIndex {
    pub fn new() -> SubscriptionIndex {
        SubscriptionIndex::default()
    }

    /// Number of subscriptions (shared memberships included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn node_mut(&mut self, filter: &str) -> &mut Node {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node
    }

    /// Adds or replaces a subscription. Returns true if the session already had a subscription
    /// with this filter (and group), i.e. it was replaced [MQTT-3.8.4-3].
    pub fn insert(&mut self, filter: &str, group: Option<&str>, slot: SessionSlot, opts: SubOptions) -> bool {
        let node = self.node_mut(filter);
        let existed = match group {
            None => node.subscribers.insert(slot, opts).is_some(),
            Some(g) => {
                let group = node.shared.entry(g.into()).or_insert_with(|| SharedGroup {
                    share_filter: format!("{}{g}/{filter}", mqfleet_codec::topic::SHARE_PREFIX).into(),
                    ..Default::default()
                });
                match group.members.iter_mut().find(|(s, _)| *s == slot) {
                    Some(m) => {
                        m.1 = opts;
                        true
                    }
                    None => {
                        group.members.push((slot, opts));
                        false
                    }
                }
            }
        };
        if !existed {
            self.len += 1;
        }
        existed
    }

    /// Removes a subscription; returns whether it existed.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, slot: SessionSlot) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, group, slot);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// The shared group of a filter, for redispatching a message to another member.
    pub fn group_mut(&mut self, filter: &str, group: &str) -> Option<&mut SharedGroup> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.get_mut(level)?;
        }
        node.shared.get_mut(group)
    }

    /// Calls `visit` for every subscription matching `topic`.
    pub fn for_each_match(&mut self, topic: &str, mut visit: impl FnMut(Match<'_>)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        walk(&mut self.root, &levels, true, dollar, &mut visit);
    }
}

fn emit(node: &mut Node, visit: &mut dyn FnMut(Match<'_>)) {
    for (slot, opts) in &node.subscribers {
        visit(Match::Direct(*slot, *opts));
    }
    for group in node.shared.values_mut() {
        visit(Match::Shared(group));
    }
}

fn walk(node: &mut Node, levels: &[&str], first: bool, dollar: bool, visit: &mut dyn FnMut(Match<'_>)) {
    let wildcards_allowed = !(first && dollar);
    if wildcards_allowed {
        // `#` matches the parent level and everything below [MQTT-4.7.1-1].
        if let Some(hash) = node.children.get_mut("#") {
            emit(hash, visit);
        }
    }
    match levels.split_first() {
        None => emit(node, visit),
        Some((level, rest)) => {
            if let Some(child) = node.children.get_mut(*level) {
                walk(child, rest, false, dollar, visit);
            }
            if wildcards_allowed {
                if let Some(plus) = node.children.get_mut("+") {
                    walk(plus, rest, false, dollar, visit);
                }
            }
        }
    }
}

fn remove_at(node: &mut Node, levels: &[&str], group: Option<&str>, slot: SessionSlot) -> bool {
    match levels.split_first() {
        None => match group {
            None => node.subscribers.remove(&slot).is_some(),
            Some(g) => {
                let Some(members) = node.shared.get_mut(g) else { return false };
                let before = members.members.len();
                members.members.retain(|(s, _)| *s != slot);
                let removed = members.members.len() != before;
                if members.members.is_empty() {
                    node.shared.remove(g);
                } else {
                    members.next %= members.members.len();
                }
                removed
            }
        },
        Some((level, rest)) => {
            let Some(child) = node.children.get_mut(*level) else { return false };
            let removed = remove_at(child, rest, group, slot);
            if child.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqfleet_codec::QoS;
    use proptest::prelude::*;

    fn opts() -> SubOptions {
        SubOptions { options: SubscriptionOptions::qos(QoS::AtLeastOnce), id: None }
    }

    fn direct_matches(index: &mut SubscriptionIndex, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        index.for_each_match(topic, |m| {
            if let Match::Direct(s, _) = m {
                out.push(s.0)
            }
        });
        out.sort();
        out
    }

    #[test]
    fn insert_reports_replacement_mqtt_3_8_4_3() {
        let mut i = SubscriptionIndex::new();
        assert!(!i.insert("a/+", None, SessionSlot(1), opts()));
        assert!(i.insert("a/+", None, SessionSlot(1), opts()));
        assert_eq!(i.len(), 1);
    }

    #[test]
    fn removal_prunes_empty_nodes() {
        let mut i = SubscriptionIndex::new();
        i.insert("a/b/c", None, SessionSlot(1), opts());
        assert!(i.remove("a/b/c", None, SessionSlot(1)));
        assert!(!i.remove("a/b/c", None, SessionSlot(1)));
        assert!(i.root.is_empty());
        assert!(i.is_empty());
    }

    #[test]
    fn shared_group_round_robins_and_prefers_online_members() {
        let mut i = SubscriptionIndex::new();
        for s in 1..=3 {
            i.insert("t", Some("g"), SessionSlot(s), opts());
        }
        let g = i.group_mut("t", "g").unwrap();
        let picks: Vec<u32> = (0..6).map(|_| g.pick(|_| true, None).unwrap().0 .0).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        // Only 3 online: always 3.
        assert_eq!(g.pick(|s| s.0 == 3, None).unwrap().0, SessionSlot(3));
        assert_eq!(g.pick(|s| s.0 == 3, None).unwrap().0, SessionSlot(3));
        // Nobody online: still someone (an offline persistent member queues it).
        assert!(g.pick(|_| false, None).is_some());
        // Excluding the only member yields nobody.
        let mut solo = SubscriptionIndex::new();
        solo.insert("t", Some("g"), SessionSlot(9), opts());
        assert!(solo.group_mut("t", "g").unwrap().pick(|_| true, Some(SessionSlot(9))).is_none());
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop_oneof![Just("a"), Just("b"), Just("+"), Just(""), Just("$x")];
        (proptest::collection::vec(level, 1..4), any::<bool>()).prop_map(|(levels, hash)| {
            let mut f = levels.join("/");
            if hash {
                f.push_str("/#");
            }
            f
        })
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        let level = prop_oneof![Just("a"), Just("b"), Just(""), Just("$x")];
        proptest::collection::vec(level, 1..5).prop_map(|l| l.join("/"))
    }

    proptest! {
        /// The trie agrees with the naive reference matcher of the codec on every topic.
        #[test]
        fn trie_agrees_with_reference_matcher(
            filters in proptest::collection::vec(filter_strategy(), 1..12),
            topics in proptest::collection::vec(topic_strategy(), 1..12),
            removals in proptest::collection::vec(0usize..12, 0..4),
        ) {
            let mut index = SubscriptionIndex::new();
            let mut live: Vec<Option<String>> = Vec::new();
            for (slot, f) in filters.iter().enumerate() {
                index.insert(f, None, SessionSlot(slot as u32), opts());
                live.push(Some(f.clone()));
            }
            for r in removals {
                if let Some(Some(f)) = live.get(r).cloned() {
                    index.remove(&f, None, SessionSlot(r as u32));
                    live[r] = None;
                }
            }
            for t in &topics {
                let expected: Vec<u32> = live.iter().enumerate()
                    .filter(|(_, f)| f.as_deref().is_some_and(|f| mqfleet_codec::topic::matches(f, t)))
                    .map(|(s, _)| s as u32)
                    .collect();
                prop_assert_eq!(direct_matches(&mut index, t), expected, "topic {}", t);
            }
        }
    }
}
