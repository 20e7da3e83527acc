//! Topic aliases in both directions (MQTT 5 §3.3.2.3.4).

use std::collections::HashMap;

use mqfleet_codec::{ByteString, ReasonCode};

/// Aliases the client defines for its PUBLISHes; at most the Topic Alias Maximum we announced.
///
/// The maps of both directions are made at their first alias: most connections never use
/// one, and an empty map inline costs every connection 48 bytes.
pub struct InboundAliases {
    max: u16,
    #[expect(clippy::box_collection, reason = "absent, the box takes 8 bytes where an empty map takes 48")]
    map: Option<Box<HashMap<u16, ByteString>>>,
}

impl InboundAliases {
    pub fn new(max: u16) -> InboundAliases {
        InboundAliases { max, map: None }
    }

    /// The topic of a PUBLISH: sets the alias when both are given, looks it up when the topic
    /// is empty.
    ///
    /// # Errors
    /// 0x94 for an alias above our maximum [MQTT-3.3.2-9]; 0x82 for an empty topic with an
    /// alias never defined (MQTT 5 §3.3.4).
    pub fn resolve(&mut self, topic: ByteString, alias: Option<u16>) -> Result<ByteString, (ReasonCode, &'static str)> {
        let Some(alias) = alias else { return Ok(topic) };
        if alias == 0 || alias > self.max {
            return Err((ReasonCode::TopicAliasInvalid, "topic alias is 0 or above the Topic Alias Maximum (MQTT-3.3.2-9)"));
        }
        if topic.is_empty() {
            let defined = self.map.as_ref().and_then(|m| m.get(&alias)).cloned();
            return defined.ok_or((ReasonCode::ProtocolError, "topic alias used before it was defined"));
        }
        self.map.get_or_insert_default().insert(alias, topic.clone());
        Ok(topic)
    }
}

/// Aliases we assign for topics sent to the client, up to its Topic Alias Maximum. First come,
/// first served: once all are taken, other topics go out in full (never evicting keeps the
/// mapping trivially consistent with what the client holds).
pub struct OutboundAliases {
    max: u16,
    #[expect(clippy::box_collection, reason = "absent, the box takes 8 bytes where an empty map takes 48")]
    map: Option<Box<HashMap<ByteString, u16>>>,
}

/// How to send a topic.
#[derive(Debug, PartialEq, Eq)]
pub enum OutTopic {
    /// Full topic, no alias.
    Full,
    /// Full topic, and define this alias for it.
    Define(u16),
    /// Empty topic with this alias.
    Alias(u16),
}

impl OutboundAliases {
    pub fn new(max: u16) -> OutboundAliases {
        OutboundAliases { max, map: None }
    }

    pub fn assign(&mut self, topic: &ByteString) -> OutTopic {
        if self.max == 0 {
            return OutTopic::Full;
        }
        let map = self.map.get_or_insert_default();
        if let Some(a) = map.get(topic) {
            return OutTopic::Alias(*a);
        }
        if map.len() < usize::from(self.max) {
            let a = map.len() as u16 + 1;
            map.insert(topic.clone(), a);
            return OutTopic::Define(a);
        }
        OutTopic::Full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_alias_defined_then_used() {
        let mut a = InboundAliases::new(2);
        assert_eq!(a.resolve("x/y".into(), Some(1)).unwrap(), "x/y");
        assert_eq!(a.resolve("".into(), Some(1)).unwrap(), "x/y");
        assert_eq!(a.resolve("".into(), Some(2)).unwrap_err().0, ReasonCode::ProtocolError);
        assert_eq!(a.resolve("z".into(), Some(3)).unwrap_err().0, ReasonCode::TopicAliasInvalid);
    }

    #[test]
    fn outbound_aliases_up_to_the_client_maximum() {
        let mut a = OutboundAliases::new(1);
        assert_eq!(a.assign(&"a".into()), OutTopic::Define(1));
        assert_eq!(a.assign(&"a".into()), OutTopic::Alias(1));
        assert_eq!(a.assign(&"b".into()), OutTopic::Full);
        let mut none = OutboundAliases::new(0);
        assert_eq!(none.assign(&"a".into()), OutTopic::Full);
    }
}
