//! Topic names and topic filters (MQTT 5 §4.7).
//!
//! The codec checks what the specification requires of every topic; limits that are policy
//! (length, number of levels) are passed in by the server as [`TopicLimits`].

use std::fmt;

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Zero length [MQTT-4.7.3-1].
    Empty,
    /// A topic name contains `+` or `#` [MQTT-3.3.2-2].
    WildcardInName,
    /// `#` not alone in the last level [MQTT-4.7.1-1].
    MisplacedMultiLevelWildcard,
    /// `+` not alone in its level [MQTT-4.7.1-2].
    MisplacedSingleLevelWildcard,
    /// More levels than the server allows.
    TooManyLevels { levels: usize, max: usize },
    /// Longer than the server allows.
    TooLong { len: usize, max: usize },
    /// `$share/` without a share name, with a share name containing `/`, `+` or `#`, or without
    /// a filter [MQTT-4.8.2-1, MQTT-4.8.2-2].
    InvalidSharedSubscription,
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::Empty => f.write_str("empty topic (MQTT-4.7.3-1)"),
            TopicError::WildcardInName => f.write_str("topic name contains a wildcard + or # (MQTT-3.3.2-2)"),
            TopicError::MisplacedMultiLevelWildcard => {
                f.write_str("# must be the last level and alone in it (MQTT-4.7.1-1)")
            }
            TopicError::MisplacedSingleLevelWildcard => f.write_str("+ must be alone in its level (MQTT-4.7.1-2)"),
            TopicError::TooManyLevels { levels, max } => write!(f, "{levels} levels, more than the limit of {max}"),
            TopicError::TooLong { len, max } => write!(f, "{len} bytes long, more than the limit of {max}"),
            TopicError::InvalidSharedSubscription => f.write_str(
                "shared subscription must be $share/{ShareName}/{filter} with a non-empty ShareName without / + # (MQTT-4.8.2-1, MQTT-4.8.2-2)",
            ),
        }
    }
}

/// Server policy on topic size. Checked before any work is done with the topic, so that a
/// hostile topic cannot cause quadratic work in the subscription index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    pub max_len: usize,
    pub max_levels: usize,
}

impl Default for TopicLimits {
    /// 65535 bytes is what the wire format allows; 128 levels is EMQX's default.
    fn default() -> Self {
        TopicLimits { max_len: 65_535, max_levels: 128 }
    }
}

impl TopicLimits {
    fn check(&self, s: &str) -> Result<(), TopicError> {
        if s.len() > self.max_len {
            return Err(TopicError::TooLong { len: s.len(), max: self.max_len });
        }
        let levels = s.bytes().filter(|b| *b == b'/').count() + 1;
        if levels > self.max_levels {
            return Err(TopicError::TooManyLevels { levels, max: self.max_levels });
        }
        Ok(())
    }
}

/// A topic name as it appears in PUBLISH: no wildcards. The empty name is checked separately
/// because MQTT 5 allows it together with a Topic Alias.
pub fn check_wildcards_in_name(s: &str) -> Result<(), TopicError> {
    if contains_wildcard(s.as_bytes()) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// True if `bytes` contains `+` or `#`; eight bytes at a time, as it runs on every PUBLISH.
fn contains_wildcard(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS != 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let x = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        if has_zero_byte(x ^ (ONES * u64::from(b'+'))) || has_zero_byte(x ^ (ONES * u64::from(b'#'))) {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| b == b'+' || b == b'#')
}

/// Validates a complete topic name against the specification and `limits`.
pub fn validate_topic_name(s: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    check_wildcards_in_name(s)?;
    limits.check(s)
}

/// Validates a topic filter (not a shared-subscription filter: see [`parse_shared`]).
pub fn validate_topic_filter(s: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    limits.check(s)?;
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedSingleLevelWildcard);
        }
    }
    Ok(())
}

/// True if the filter contains a wildcard, i.e. it can match more than one topic name.
pub fn has_wildcard(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

/// A `$share/{ShareName}/{filter}` subscription, split (MQTT 5 §4.8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    pub group: &'a str,
    pub filter: &'a str,
}

pub const SHARE_PREFIX: &str = "$share/";

/// `Ok(None)` for an ordinary filter, `Ok(Some(..))` for a valid shared one.
pub fn parse_shared(s: &str) -> Result<Option<SharedFilter<'_>>, TopicError> {
    let Some(rest) = s.strip_prefix(SHARE_PREFIX) else {
        if s == "$share" {
            return Err(TopicError::InvalidSharedSubscription);
        }
        return Ok(None);
    };
    let Some((group, filter)) = rest.split_once('/') else {
        return Err(TopicError::InvalidSharedSubscription);
    };
    if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
        return Err(TopicError::InvalidSharedSubscription);
    }
    Ok(Some(SharedFilter { group, filter }))
}

/// Does `filter` match `topic`? Both must already be valid. This is the reference matcher
/// (MQTT 5 §4.7): the subscription index in the shard is checked against it.
///
/// Topics starting with `$` are not matched by filters starting with a wildcard [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter_ok(s: &str) -> bool {
        validate_topic_filter(s, &TopicLimits::default()).is_ok()
    }

    #[test]
    fn valid_filters_per_mqtt_4_7_1() {
        for f in ["#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "sport/tennis/#", "+/tennis/#", "$SYS/#"] {
            assert!(filter_ok(f), "{f} should be valid");
        }
    }

    #[test]
    fn invalid_filters_per_mqtt_4_7_1_1_and_4_7_1_2() {
        for f in ["", "a/#/b", "a#", "a/+b", "#/a", "sport/tennis#", "sport+", "++", "##"] {
            assert!(!filter_ok(f), "{f} should be invalid");
        }
    }

    #[test]
    fn topic_name_with_wildcards_is_invalid_mqtt_3_3_2_2() {
        assert_eq!(validate_topic_name("a/+", &TopicLimits::default()), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name("a/#", &TopicLimits::default()), Err(TopicError::WildcardInName));
    }

    #[test]
    fn wildcard_scan_finds_every_position() {
        for len in 1..30 {
            for pos in 0..len {
                for w in ['+', '#'] {
                    let mut t: Vec<char> = "x".repeat(len).chars().collect();
                    t[pos] = w;
                    let t: String = t.into_iter().collect();
                    assert_eq!(check_wildcards_in_name(&t), Err(TopicError::WildcardInName), "{t}");
                }
            }
            assert!(check_wildcards_in_name(&"x".repeat(len)).is_ok());
        }
    }

    #[test]
    fn limits_are_enforced() {
        let limits = TopicLimits { max_len: 8, max_levels: 3 };
        assert!(matches!(validate_topic_name("a/b/c/d", &limits), Err(TopicError::TooManyLevels { levels: 4, max: 3 })));
        assert!(matches!(validate_topic_name("abcdefghi", &limits), Err(TopicError::TooLong { .. })));
    }

    #[test]
    fn shared_subscription_parsing_mqtt_4_8_2() {
        assert_eq!(parse_shared("a/b"), Ok(None));
        assert_eq!(parse_shared("$share/g/a/#"), Ok(Some(SharedFilter { group: "g", filter: "a/#" })));
        for bad in ["$share/", "$share//a", "$share/g", "$share/g/", "$share/g+/a", "$share/#/a", "$share"] {
            assert_eq!(parse_shared(bad), Err(TopicError::InvalidSharedSubscription), "{bad}");
        }
    }

    #[test]
    fn matching_examples_from_mqtt_4_7() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b/c"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcards_mqtt_4_7_2_1() {
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("+/broker", "$SYS/broker"));
        assert!(matches("$SYS/#", "$SYS/broker"));
        assert!(matches("$SYS/+", "$SYS/broker"));
    }
}
