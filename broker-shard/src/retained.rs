//! Retained messages of a shard, indexed by topic level for wildcard look-ups (MQTT 5 §3.3.1.3).
//!
//! # Invariants
//! - At most one message per topic; an empty payload deletes [MQTT-3.3.1-6].
//! - A node with no message and no children is removed.

use std::collections::HashMap;
use std::sync::Arc;

use crate::message::Message;

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

#[derive(Debug, Default)]
pub struct RetainedIndex {
    root: Node,
    len: usize,
    bytes: usize,
}

impl RetainedIndex {
    pub fn new() -> RetainedIndex {
        RetainedIndex::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stores `message` as the retained message of its topic, or deletes it if the payload is
    /// empty.
    pub fn set(&mut self, message: Arc<Message>) {
        let topic = message.topic.clone();
        if message.payload.is_empty() {
            self.remove(&topic);
            return;
        }
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        self.bytes += message.payload.len();
        match node.message.replace(message) {
            Some(old) => self.bytes -= old.payload.len(),
            None => self.len += 1,
        }
    }

    pub fn remove(&mut self, topic: &str) {
        let levels: Vec<&str> = topic.split('/').collect();
        if let Some(old) = remove_at(&mut self.root, &levels) {
            self.len -= 1;
            self.bytes -= old.payload.len();
        }
    }

    /// The retained message of one topic.
    pub fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }

    /// Every retained message whose topic matches `filter` (a valid filter).
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        collect(&self.root, &levels, true, &mut out);
        out
    }

    /// Every retained message (for handing topics to another shard).
    pub fn all(&self) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        subtree(&self.root, false, &mut out);
        out
    }
}

fn remove_at(node: &mut Node, levels: &[&str]) -> Option<Arc<Message>> {
    match levels.split_first() {
        None => node.message.take(),
        Some((level, rest)) => {
            let child = node.children.get_mut(*level)?;
            let removed = remove_at(child, rest);
            if child.message.is_none() && child.children.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

/// All messages at and below `node`; at the root, `$` topics are skipped when the filter's
/// first level is a wildcard [MQTT-4.7.2-1].
fn subtree(node: &Node, skip_dollar: bool, out: &mut Vec<Arc<Message>>) {
    if let Some(m) = &node.message {
        out.push(m.clone());
    }
    for (level, child) in &node.children {
        if skip_dollar && level.starts_with('$') {
            continue;
        }
        subtree(child, false, out);
    }
}

fn collect(node: &Node, levels: &[&str], first: bool, out: &mut Vec<Arc<Message>>) {
    match levels.split_first() {
        None => {
            if let Some(m) = &node.message {
                out.push(m.clone());
            }
        }
        Some((&"#", _)) => subtree(node, first, out),
        Some((&"+", rest)) => {
            for (level, child) in &node.children {
                if first && level.starts_with('$') {
                    continue;
                }
                collect(child, rest, false, out);
            }
        }
        Some((level, rest)) => {
            if let Some(child) = node.children.get(*level) {
                collect(child, rest, false, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mqfleet_codec::{PublishProperties, QoS};

    fn msg(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: PublishProperties::default(),
            expires_at_ms: None,
            origin: None,
        })
    }

    fn topics(v: Vec<Arc<Message>>) -> Vec<String> {
        let mut t: Vec<String> = v.iter().map(|m| m.topic.to_string()).collect();
        t.sort();
        t
    }

    #[test]
    fn empty_payload_deletes_mqtt_3_3_1_6() {
        let mut r = RetainedIndex::new();
        r.set(msg("a/b", b"x"));
        assert_eq!(r.len(), 1);
        r.set(msg("a/b", b""));
        assert_eq!(r.len(), 0);
        assert_eq!(r.bytes(), 0);
        assert!(r.root.children.is_empty());
    }

    #[test]
    fn wildcard_lookup_matches_the_reference_matcher() {
        let mut r = RetainedIndex::new();
        for t in ["a", "a/b", "a/b/c", "a/c", "/a", "$SYS/x", "b"] {
            r.set(msg(t, b"x"));
        }
        let all = ["a", "a/b", "a/b/c", "a/c", "/a", "$SYS/x", "b"];
        for f in ["#", "a/#", "a/+", "+", "+/a", "$SYS/#", "+/+", "a/b/c", "nothing"] {
            let mut expected: Vec<String> = all.iter().filter(|t| mqfleet_codec::topic::matches(f, t)).map(|t| t.to_string()).collect();
            expected.sort();
            assert_eq!(topics(r.matching(f)), expected, "filter {f}");
        }
    }

    #[test]
    fn replacing_keeps_one_message_per_topic() {
        let mut r = RetainedIndex::new();
        r.set(msg("t", b"one"));
        r.set(msg("t", b"three"));
        assert_eq!(r.len(), 1);
        assert_eq!(r.bytes(), 5);
        assert_eq!(&r.matching("t")[0].payload[..], b"three");
    }
}
