//! Messages from one client: QoS 1/2 PUBLISHes not yet acknowledged, and QoS 2 packet ids
//! awaiting PUBREL (MQTT 5 §4.3.3, §4.9).
//!
//! # Invariants
//! A packet id is in at most one of `accepting` (sent to its shard, no reply yet) and
//! `awaiting_rel` (PUBREC sent). Their sum is what counts against our Receive Maximum.

use std::collections::{HashMap, HashSet};

use super::PacketIds;

#[derive(Debug, Default)]
pub struct Inbound {
    accepting: HashSet<u16, PacketIds>,
    /// Ids whose PUBREC was sent. `true`: marked in the sessions' store when the session
    /// resumed, in a cluster — a resent PUBLISH with it goes to its shard, which alone can tell a
    /// resend of an accepted copy (answered, not routed) from one of a copy refused after its
    /// mark was written (the mark being given back: routed). Answering it here would lose it.
    awaiting_rel: HashMap<u16, bool, PacketIds>,
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
    /// A resumed session's inbound ids; `ask_shard`: their resends go to their shard (cluster).
    pub fn with_awaiting(ids: impl IntoIterator<Item = u16>, ask_shard: bool) -> Inbound {
        Inbound { accepting: HashSet::default(), awaiting_rel: ids.into_iter().map(|id| (id, ask_shard)).collect() }
    }

    pub fn unacknowledged(&self) -> usize {
        self.accepting.len() + self.awaiting_rel.len()
    }

    pub fn admit(&mut self, pkid: u16, qos2: bool, receive_maximum: u16) -> Admit {
        match self.awaiting_rel.get(&pkid) {
            Some(false) if qos2 => return Admit::Duplicate,
            Some(true) if qos2 => {
                self.awaiting_rel.remove(&pkid);
                self.accepting.insert(pkid);
                return Admit::Route;
            }
            _ => {}
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
            self.awaiting_rel.insert(pkid, false);
        }
    }

    /// PUBREL: true if the id was awaiting it.
    pub fn release(&mut self, pkid: u16) -> bool {
        self.awaiting_rel.remove(&pkid).is_some()
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
    fn a_resumed_id_is_a_duplicate_on_a_single_node_and_asks_its_shard_in_a_cluster() {
        let mut single = Inbound::with_awaiting([4], false);
        assert_eq!(single.admit(4, true, 10), Admit::Duplicate);
        let mut cluster = Inbound::with_awaiting([4, 5], true);
        assert_eq!(cluster.admit(4, true, 10), Admit::Route, "the shard tells a duplicate from a refused copy's resend");
        assert_eq!(cluster.admit(4, true, 10), Admit::InProgress);
        cluster.accepted(4, true);
        assert_eq!(cluster.admit(4, true, 10), Admit::Duplicate, "accepted over this connection: known here");
        assert!(cluster.release(5), "a resumed id's PUBREL completes it");
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
