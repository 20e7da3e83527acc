//! The bookkeeping of a clustered shard's log: which positions still wait for something, which
//! publishes were already accepted, and when an entry can go.
//!
//! An entry may be trimmed once (a) its copies for persistent sessions are queued in the
//! sessions' store and (b) every proxy it was sent to — subscribers' proxies and the
//! publisher's, for the reply — has confirmed receiving it. Until then a crash replays it, and
//! proxies drop what they already had by its position.

use std::collections::{BTreeMap, HashMap};

use crate::log::Publisher;

struct EntryState {
    /// Sends to proxies not yet confirmed.
    waiting: u32,
    /// Lane B is done with it.
    queued: bool,
    publisher: Option<Publisher>,
}

pub(super) struct LogBook {
    last_position: u64,
    entries: BTreeMap<u64, EntryState>,
    /// Logged publishes by their request, until trimmed: a PUBLISH sent again because its
    /// reply was lost is answered, not accepted twice.
    requests: HashMap<Publisher, u64>,
    to_trim: Vec<u64>,
}

impl LogBook {
    /// Continues after `last_position`, the highest position the log ever held.
    pub fn new(last_position: u64) -> LogBook {
        LogBook { last_position, entries: BTreeMap::new(), requests: HashMap::new(), to_trim: Vec::new() }
    }

    /// Entries not yet trimmed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Gives the next position to a new message.
    pub fn append(&mut self, publisher: Option<Publisher>) -> u64 {
        self.last_position += 1;
        self.track(self.last_position, publisher);
        self.last_position
    }

    /// An entry found in the log at start-up.
    pub fn restore(&mut self, position: u64, publisher: Option<Publisher>) {
        self.last_position = self.last_position.max(position);
        self.track(position, publisher);
    }

    fn track(&mut self, position: u64, publisher: Option<Publisher>) {
        if let Some(p) = &publisher {
            self.requests.insert(p.clone(), position);
        }
        self.entries.insert(position, EntryState { waiting: 0, queued: false, publisher });
    }

    /// The position of a publish already accepted from this request, if it is still logged.
    pub fn accepted(&self, publisher: &Publisher) -> Option<u64> {
        self.requests.get(publisher).copied()
    }

    /// A copy of the entry (or its reply) went to a proxy.
    pub fn sent(&mut self, position: u64) {
        if let Some(e) = self.entries.get_mut(&position) {
            e.waiting += 1;
        }
    }

    /// A proxy confirmed one send of the entry.
    pub fn confirmed(&mut self, position: u64) {
        if let Some(e) = self.entries.get_mut(&position) {
            e.waiting = e.waiting.saturating_sub(1);
            self.maybe_trim(position);
        }
    }

    /// Lane B finished the entry.
    pub fn queued(&mut self, position: u64) {
        if let Some(e) = self.entries.get_mut(&position) {
            e.queued = true;
            self.maybe_trim(position);
        }
    }

    /// Lane A refused the entry, which stays until its QoS 2 mark is given back: a resend of its
    /// request is not the same acceptance any more and must be decided afresh.
    pub fn forget_request(&mut self, position: u64) {
        if let Some(p) = self.entries.get_mut(&position).and_then(|e| e.publisher.take()) {
            if self.requests.get(&p) == Some(&position) {
                self.requests.remove(&p);
            }
        }
    }

    /// The message must never be delivered: lane A refused it (and the publisher is told so),
    /// or it was a resend of an accepted message. Its log entry may have been written all the
    /// same (a QoS 2 marker is written after the append, and may be what failed), and a restart
    /// would replay it — late, and against the refusal — so it goes with the trims.
    pub fn dropped(&mut self, position: u64) {
        self.trim(position);
    }

    fn maybe_trim(&mut self, position: u64) {
        let done = self.entries.get(&position).is_some_and(|e| e.queued && e.waiting == 0);
        if done {
            self.trim(position);
        }
    }

    fn trim(&mut self, position: u64) {
        if let Some(e) = self.entries.remove(&position) {
            // A request sent again after a refusal may have a newer entry.
            if let Some(p) = e.publisher.filter(|p| self.requests.get(p) == Some(&position)) {
                self.requests.remove(&p);
            }
        }
        self.to_trim.push(position);
    }

    /// Positions to delete from the log, taken once.
    pub fn take_trims(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.to_trim)
    }

    pub fn pending_trims(&self) -> usize {
        self.to_trim.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher(request: u64) -> Publisher {
        Publisher { proxy: "p".into(), incarnation: 1, request }
    }

    #[test]
    fn an_entry_goes_only_when_queued_and_every_send_is_confirmed() {
        let mut b = LogBook::new(10);
        let p = b.append(Some(publisher(1)));
        assert_eq!(p, 11);
        b.sent(p);
        b.sent(p);
        b.confirmed(p);
        b.queued(p);
        assert!(b.take_trims().is_empty(), "one send is unconfirmed");
        assert_eq!(b.accepted(&publisher(1)), Some(11));
        b.confirmed(p);
        assert_eq!(b.take_trims(), [11]);
        assert_eq!(b.accepted(&publisher(1)), None);
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn restored_entries_continue_the_positions() {
        let mut b = LogBook::new(3);
        b.restore(7, None);
        assert_eq!(b.append(None), 8);
    }

    #[test]
    fn refused_entries_forget_their_request() {
        let mut b = LogBook::new(0);
        let p = b.append(Some(publisher(5)));
        b.dropped(p);
        assert_eq!(b.accepted(&publisher(5)), None);
        assert_eq!(b.take_trims(), [p], "a refused entry that was written anyway is deleted");
        b.queued(p);
        assert!(b.take_trims().is_empty(), "and only once");
    }

    #[test]
    fn a_held_refused_entry_forgets_its_request_at_once_and_spares_a_newer_one() {
        let mut b = LogBook::new(0);
        let first = b.append(Some(publisher(5)));
        b.forget_request(first);
        assert_eq!(b.accepted(&publisher(5)), None, "a resend of the refused request is decided afresh");
        assert!(b.take_trims().is_empty(), "the entry stays while its mark is given back");
        let again = b.append(Some(publisher(5)));
        b.dropped(first);
        assert_eq!(b.take_trims(), [first]);
        assert_eq!(b.accepted(&publisher(5)), Some(again), "the resend's entry still answers for the request");
    }
}
