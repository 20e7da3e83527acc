//! Messages from one client: QoS 1/2 PUBLISHes not yet acknowledged, and QoS 2 packet ids
//! awaiting PUBREL (MQTT 5 §4.3.3, §4.9).
//!
//! # Invariants
//! A packet id is in at most one of `accepting` (sent to its shard, no reply yet) and
//! `awaiting_rel` (PUBREC sent). Their sum is what counts against our Receive Maximum.

use std::collections::HashSet;

use super::PacketIds;

#[derive(Debug, Default)]
pub struct Inbound {
    accepting: HashSet<u16, PacketIds>,
    awaiting_rel: HashSet<u16, PacketIds>,
}

/// What to do with an incoming QoS 1/2 PUBLISH.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// New: route it.
    Route,
    /// QoS 2 id already accepted and awaiting PUBREL: a resend; answer PUBREC again, do not
    /// route it twice (MQTT 5 §4.3.3, Method B).
    Duplicate,
    /// Still being accepted by its shard: its PUBACK/PUBREC is on the way; ignore.
    InProgress,
    /// More unacknowledged PUBLISHes than the Receive Maximum allows.
    OverLimit,
}

impl Inbound {
    pub fn with_awaiting(ids: impl IntoIterator<Item = u16>) -> Inbound {
        Inbound { accepting: HashSet::default(), awaiting_rel: ids.into_iter().collect() }
    }

    pub fn unacknowledged(&self) -> usize {
        self.accepting.len() + self.awaiting_rel.len()
    }

    pub fn admit(&mut self, pkid: u16, qos2: bool, receive_maximum: u16) -> Admit {
        if qos2 && self.awaiting_rel.contains(&pkid) {
            return Admit::Duplicate;
        }
        if self.accepting.contains(&pkid) {
            return Admit::InProgress;
        }
        if self.unacknowledged() >= usize::from(receive_maximum) {
            return Admit::OverLimit;
        }
        self.accepting.insert(pkid);
        Admit::Route
    }

    /// The shard answered. A QoS 2 message accepted now awaits PUBREL.
    pub fn accepted(&mut self, pkid: u16, qos2_awaiting_rel: bool) {
        self.accepting.remove(&pkid);
        if qos2_awaiting_rel {
            self.awaiting_rel.insert(pkid);
        }
    }

    /// PUBREL: true if the id was awaiting it.
    pub fn release(&mut self, pkid: u16) -> bool {
        self.awaiting_rel.remove(&pkid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos2_resend_is_a_duplicate_until_pubrel() {
        let mut i = Inbound::default();
        assert_eq!(i.admit(1, true, 10), Admit::Route);
        assert_eq!(i.admit(1, true, 10), Admit::InProgress);
        i.accepted(1, true);
        assert_eq!(i.admit(1, true, 10), Admit::Duplicate);
        assert!(i.release(1));
        assert!(!i.release(1));
        assert_eq!(i.admit(1, true, 10), Admit::Route);
    }

    #[test]
    fn receive_maximum_counts_accepting_and_awaiting_release() {
        let mut i = Inbound::default();
        assert_eq!(i.admit(1, true, 2), Admit::Route);
        i.accepted(1, true);
        assert_eq!(i.admit(2, false, 2), Admit::Route);
        assert_eq!(i.admit(3, false, 2), Admit::OverLimit);
    }
}
