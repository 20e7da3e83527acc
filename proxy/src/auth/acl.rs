//! Authorization: which topics a client may publish to and subscribe to.
//!
//! Rules come from a TOML file (`acl_file`) or from a client's token; the first rule that
//! applies decides, and when none applies the answer is no (default deny; a file without rules
//! denies everything, BAD-INPUT 68). Without an ACL file every topic is open (the single-node
//! default), except that nobody publishes to `$` topics (checked by the connection).
//!
//! # Soundness
//! A rule's topics are MQTT filters with placeholders `%c` (client id), `%u` (username) and
//! `%cn` (certificate common name). A placeholder is filled only with a value that is one
//! plain topic level: a value containing `+`, `#` or `/`, or a missing value (no username, no
//! certificate), never widens an `allow` — that rule does not apply — while a `deny` rule
//! treats that level and all below as `#`, so it refuses at least as much as intended.
//!
//! A SUBSCRIBE filter is allowed by an `allow` rule only if every topic it can match is
//! matched by the rule ([`filter_within`]); it is refused by a `deny` rule if any topic could
//! match both ([`overlaps`]). So `allow a/+` does not let `a/#` through, and `deny a/secret`
//! stops `a/+`.

use std::path::Path;

use mqfleet_codec::topic::{matches, parse_shared, validate_topic_filter, TopicLimits};
use serde::Deserialize;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Publish,
    Subscribe,
    /// In rules only: both.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Allow,
    Deny,
}

/// One rule. Without `username` and `client_id` it applies to every client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub permission: Permission,
    pub action: Action,
    pub topics: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
}

/// Who is asking, as far as rules can tell.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    /// Common name of the client certificate, when one was presented.
    pub cn: Option<&'a str>,
}

/// An ordered rule list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AclFile {
    #[serde(default)]
    rule: Vec<Rule>,
}

impl Acl {
    pub fn new(rules: Vec<Rule>) -> Acl {
        Acl { rules }
    }

    /// Reads and checks an ACL file; the error names the file and the rule.
    pub fn load(path: &Path) -> Result<Acl, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Acl::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Acl, String> {
        let file: AclFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for (i, rule) in file.rule.iter().enumerate() {
            if rule.topics.is_empty() {
                return Err(format!("rule {}: no topics", i + 1));
            }
            for t in &rule.topics {
                // Placeholders stand for one level; check the filter with a stand-in.
                let stand_in = t.replace("%cn", "x").replace("%c", "x").replace("%u", "x");
                validate_topic_filter(&stand_in, &TopicLimits::default()).map_err(|e| format!("rule {}: topic {t:?}: {e}", i + 1))?;
            }
        }
        Ok(Acl { rules: file.rule })
    }

    /// The decision for `topic` (a topic name to publish, or a filter to subscribe to; shared
    /// subscriptions are judged by their filter). `None` when no rule applies.
    pub fn decide(&self, who: Subject<'_>, action: Action, topic: &str) -> Option<Permission> {
        let topic = match (action, parse_shared(topic)) {
            (Action::Subscribe, Ok(Some(shared))) => shared.filter,
            _ => topic,
        };
        self.rules.iter().filter(|r| r.concerns(who, action)).find_map(|r| {
            let applies = r.topics.iter().any(|pattern| match (r.permission, fill(pattern, who)) {
                (Permission::Allow, Filled::Exact(p)) => covers(action, &p, topic),
                (Permission::Allow, Filled::Widened(_)) => false,
                (Permission::Deny, Filled::Exact(p) | Filled::Widened(p)) => touches(action, &p, topic),
            });
            applies.then_some(r.permission)
        })
    }

    /// Allowed only by an applicable allow rule ahead of any applicable deny.
    pub fn allows(&self, who: Subject<'_>, action: Action, topic: &str) -> bool {
        self.decide(who, action, topic) == Some(Permission::Allow)
    }
}

impl Rule {
    fn concerns(&self, who: Subject<'_>, action: Action) -> bool {
        (self.action == Action::All || self.action == action)
            && self.username.as_deref().is_none_or(|u| who.username == Some(u))
            && self.client_id.as_deref().is_none_or(|c| who.client_id == c)
    }
}

/// A placeholder value that is one plain topic level.
fn plain(v: Option<&str>) -> Option<&str> {
    v.filter(|v| !v.is_empty() && !v.contains(['+', '#', '/']))
}

/// A rule topic with its placeholders filled.
#[derive(Debug, PartialEq, Eq)]
enum Filled {
    /// Every placeholder had a plain one-level value.
    Exact(String),
    /// Some did not: the pattern up to that level, then `#`. An allow rule does not apply;
    /// a deny rule applies to all of it.
    Widened(String),
}

fn fill(pattern: &str, who: Subject<'_>) -> Filled {
    if !pattern.contains('%') {
        return Filled::Exact(pattern.to_string());
    }
    let mut levels = Vec::new();
    for level in pattern.split('/') {
        let mut out = String::with_capacity(level.len());
        let mut rest = level;
        let mut ok = true;
        while let Some(at) = rest.find('%') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            let (value, used) = if tail.starts_with("%cn") {
                (plain(who.cn), 3)
            } else if tail.starts_with("%c") {
                (plain(Some(who.client_id)), 2)
            } else if tail.starts_with("%u") {
                (plain(who.username), 2)
            } else {
                (Some("%"), 1)
            };
            match value {
                Some(v) => out.push_str(v),
                None => ok = false,
            }
            rest = &tail[used..];
        }
        out.push_str(rest);
        if !ok {
            levels.push("#".to_string());
            return Filled::Widened(levels.join("/"));
        }
        levels.push(out);
    }
    Filled::Exact(levels.join("/"))
}

/// An allow rule's pattern covers a publish topic or every topic of a subscription filter.
fn covers(action: Action, pattern: &str, topic: &str) -> bool {
    match action {
        Action::Publish => matches(pattern, topic),
        _ => filter_within(topic, pattern),
    }
}

/// A deny rule's pattern touches a publish topic or some topic of a subscription filter.
fn touches(action: Action, pattern: &str, topic: &str) -> bool {
    match action {
        Action::Publish => matches(pattern, topic),
        _ => overlaps(topic, pattern),
    }
}

/// Does a wildcard level at the top stay off `$` topics? [MQTT-4.7.2-1]
fn dollar_guard(first_wild: &str, first_other: &str) -> bool {
    !((first_wild == "+" || first_wild == "#") && first_other.starts_with('$'))
}

/// Every topic matched by `filter` is matched by `pattern`.
pub fn filter_within(filter: &str, pattern: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let p: Vec<&str> = pattern.split('/').collect();
    if !dollar_guard(p[0], f[0]) {
        return false;
    }
    for i in 0.. {
        match (f.get(i).copied(), p.get(i).copied()) {
            (_, Some("#")) => return true,
            (Some("#"), _) => return false,
            (Some(_), Some("+")) => {}
            (Some(fl), Some(pl)) if fl == pl && fl != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
    unreachable!()
}

/// Some topic is matched by both `filter` and `pattern`.
pub fn overlaps(filter: &str, pattern: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let p: Vec<&str> = pattern.split('/').collect();
    if !dollar_guard(p[0], f[0]) || !dollar_guard(f[0], p[0]) {
        return false;
    }
    for i in 0.. {
        match (f.get(i).copied(), p.get(i).copied()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(fl), Some(pl)) if fl == pl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who<'a>(client_id: &'a str, username: Option<&'a str>) -> Subject<'a> {
        Subject { client_id, username, cn: None }
    }

    fn acl(text: &str) -> Acl {
        Acl::parse(text).unwrap()
    }

    #[test]
    fn placeholders_fill_one_level_and_never_widen_an_allow() {
        let dev = who("dev-1", Some("alice"));
        assert_eq!(fill("d/%c/up", dev), Filled::Exact("d/dev-1/up".into()));
        assert_eq!(fill("u/%u/x-%c", dev), Filled::Exact("u/alice/x-dev-1".into()));
        for bad in ["a/b", "+", "#", "x#", ""] {
            assert_eq!(fill("d/%c/up", who(bad, None)), Filled::Widened("d/#".into()), "{bad:?}");
        }
        assert_eq!(fill("d/%u", who("c", None)), Filled::Widened("d/#".into()));
        assert_eq!(fill("d/%cn/up", dev), Filled::Widened("d/#".into()));
        let a = acl("[[rule]]\npermission = \"allow\"\naction = \"all\"\ntopics = [\"d/%c/#\"]\n");
        assert!(a.allows(dev, Action::Publish, "d/dev-1/temp"));
        assert!(!a.allows(dev, Action::Publish, "d/dev-2/temp"));
        // A client id of "+" or "#" or with slashes gets nothing from %c.
        for sneaky in ["+", "#", "dev-2/x", "x/#"] {
            assert!(!a.allows(who(sneaky, None), Action::Subscribe, "d/+/#"), "{sneaky}");
            assert!(!a.allows(who(sneaky, None), Action::Publish, "d/dev-2/x/temp"), "{sneaky}");
        }
    }

    #[test]
    fn a_deny_with_an_unfillable_placeholder_refuses_the_whole_subtree() {
        let a = acl(concat!(
            "[[rule]]\npermission = \"deny\"\naction = \"publish\"\ntopics = [\"cmd/%u/#\"]\n",
            "[[rule]]\npermission = \"allow\"\naction = \"all\"\ntopics = [\"#\"]\n"
        ));
        assert!(!a.allows(who("c", Some("bob")), Action::Publish, "cmd/bob/x"));
        assert!(a.allows(who("c", Some("bob")), Action::Publish, "cmd/eve/x"));
        assert!(!a.allows(who("c", None), Action::Publish, "cmd/eve/x"), "no username: the deny covers all of cmd/");
    }

    #[test]
    fn subscriptions_are_allowed_only_within_and_denied_on_any_overlap() {
        assert!(filter_within("a/b", "a/+"));
        assert!(filter_within("a/+", "a/+"));
        assert!(filter_within("a/+/c", "a/#"));
        assert!(filter_within("a", "a/#"), "a/# matches a itself");
        assert!(!filter_within("a/#", "a/+"));
        assert!(!filter_within("a/+", "a/b"));
        assert!(!filter_within("+/x", "a/x"));
        assert!(!filter_within("$SYS/x", "#"), "MQTT-4.7.2-1: # does not reach $ topics");
        assert!(filter_within("$SYS/x", "$SYS/#"));

        assert!(overlaps("a/+", "a/secret"));
        assert!(overlaps("#", "a/secret"));
        assert!(overlaps("a/secret/#", "+/+"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("a/+", "a/b/c"));
        assert!(!overlaps("#", "$SYS/#"));
    }

    #[test]
    fn first_applicable_rule_wins_and_nothing_applicable_is_denied() {
        let a = acl(concat!(
            "[[rule]]\npermission = \"deny\"\naction = \"subscribe\"\ntopics = [\"a/secret\"]\n",
            "[[rule]]\npermission = \"allow\"\naction = \"subscribe\"\ntopics = [\"a/#\"]\n",
            "[[rule]]\npermission = \"allow\"\naction = \"publish\"\nusername = \"ops\"\ntopics = [\"$SYS/#\", \"a/#\"]\n",
        ));
        let anyone = who("c", None);
        assert!(a.allows(anyone, Action::Subscribe, "a/public"));
        assert!(!a.allows(anyone, Action::Subscribe, "a/+"), "overlaps the denied a/secret");
        assert!(!a.allows(anyone, Action::Subscribe, "$share/g/a/+"), "shared subscriptions are judged by their filter");
        assert!(a.allows(anyone, Action::Subscribe, "$share/g/a/public"));
        assert!(!a.allows(anyone, Action::Publish, "a/x"), "default deny");
        assert!(a.allows(who("c", Some("ops")), Action::Publish, "a/x"));
        assert!(a.allows(who("c", Some("ops")), Action::Publish, "$SYS/broker/x"));
        assert!(!acl("").allows(anyone, Action::Subscribe, "anything"), "BAD-INPUT 68: an empty ACL denies all");
    }

    #[test]
    fn bad_files_are_refused_with_the_rule_named() {
        let e = Acl::parse("[[rule]]\npermission = \"allow\"\naction = \"all\"\ntopics = [\"a/#/b\"]\n").unwrap_err();
        assert!(e.contains("rule 1") && e.contains("a/#/b"), "{e}");
        let e = Acl::parse("[[rule]]\npermission = \"maybe\"\naction = \"all\"\ntopics = [\"a\"]\n").unwrap_err();
        assert!(e.contains("maybe"), "{e}");
        let e = Acl::parse("[[rule]]\npermission = \"allow\"\naction = \"all\"\ntopics = []\n").unwrap_err();
        assert!(e.contains("no topics"), "{e}");
    }
}
