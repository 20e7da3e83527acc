//! Sessions known to a shard: where each one's connection is, and its subscriptions here.

use std::collections::HashMap;

use mqfleet_codec::ByteString;

use crate::link::{ConnId, ProxyId, SessionInfo, SubscribeItem};
use crate::topic::SessionSlot;

pub(super) struct SessionEntry {
    pub client_id: ByteString,
    pub persistent: bool,
    /// Where the session's connection is; `None` while it has none.
    pub route: Option<(ProxyId, ConnId)>,
    /// Its subscriptions on this shard, filters as written by the client.
    pub subscriptions: Vec<SubscribeItem>,
}

/// Sessions in slots, so the trie stores a `u32` per subscriber.
///
/// # Invariants
/// `by_client[c] == s` iff `entries[s]` is `Some` with client id `c`; free slots are `None`.
#[derive(Default)]
pub(super) struct Sessions {
    entries: Vec<Option<SessionEntry>>,
    free: Vec<u32>,
    by_client: HashMap<ByteString, SessionSlot>,
}

impl Sessions {
    pub fn find(&self, client_id: &str) -> Option<SessionSlot> {
        self.by_client.get(client_id).copied()
    }

    /// The entry of a live slot. Slots come from the trie or `by_client`, which only hold
    /// live slots (see the invariant), so this cannot fail.
    pub fn get(&self, slot: SessionSlot) -> &SessionEntry {
        self.entries[slot.0 as usize].as_ref().expect("slot in use")
    }

    pub fn get_mut(&mut self, slot: SessionSlot) -> &mut SessionEntry {
        self.entries[slot.0 as usize].as_mut().expect("slot in use")
    }

    /// Creates or updates the session; returns its slot and whether it was persistent before.
    pub fn upsert(&mut self, info: &SessionInfo, proxy: ProxyId) -> (SessionSlot, bool) {
        let route = info.conn.map(|c| (proxy, c));
        if let Some(slot) = self.find(&info.client_id) {
            let e = self.get_mut(slot);
            let was_persistent = e.persistent;
            e.persistent = info.persistent;
            e.route = route;
            return (slot, was_persistent);
        }
        let entry = SessionEntry { client_id: info.client_id.clone(), persistent: info.persistent, route, subscriptions: Vec::new() };
        let slot = match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = Some(entry);
                SessionSlot(i)
            }
            None => {
                self.entries.push(Some(entry));
                SessionSlot((self.entries.len() - 1) as u32)
            }
        };
        self.by_client.insert(info.client_id.clone(), slot);
        (slot, false)
    }

    pub fn remove(&mut self, slot: SessionSlot) -> SessionEntry {
        let entry = self.entries[slot.0 as usize].take().expect("slot in use");
        self.by_client.remove(&entry.client_id);
        self.free.push(slot.0);
        entry
    }

    /// Every live slot.
    pub fn slots(&self) -> impl Iterator<Item = SessionSlot> + '_ {
        self.entries.iter().enumerate().filter_map(|(i, e)| e.as_ref().map(|_| SessionSlot(i as u32)))
    }

    pub fn routed_to(&self, proxy: ProxyId) -> impl Iterator<Item = SessionSlot> + '_ {
        self.entries.iter().enumerate().filter_map(move |(i, e)| match e {
            Some(e) if e.route.is_some_and(|(p, _)| p == proxy) => Some(SessionSlot(i as u32)),
            _ => None,
        })
    }
}
