//! Every Redis key mqfleet uses, in one place.
//!
//! Keys of one client share one hash tag so a Redis Cluster keeps them in one slot (and one Lua
//! script may touch them all). The tag is a hash of the client id, never the id itself: an id
//! containing `{…}` must not choose its slot (BAD-INPUT J.76). The tag comes first, so Redis
//! takes it as the tag whatever the id contains; the raw id after it keeps keys unique even if
//! two ids hash alike.
//!
//! | key | type | content |
//! |---|---|---|
//! | `mqf:{H}:s:<id>` | hash | `rec` session record, `epoch` connection epoch, `owner` proxy id |
//! | `mqf:{H}:q:<id>` | hash | queue position → queued message |
//! | `mqf:{H}:qs:<id>` | hash | queue position → delivery state (sent / released) |
//! | `mqf:{H}:n:<id>` | string | last queue position given out |
//! | `mqf:{H}:in:<id>` | set | packet ids of accepted QoS 2 PUBLISHes awaiting PUBREL |
//! | `mqf:{H}:w:<id>` | hash | shard → "log position:queue position" of its last enqueue (replay is idempotent) |
//! | `mqf:{H}:wt:<id>` | hash (10 min) | connection epoch → where its will stands: `intent\n<proxy>\n<will>` (that proxy publishes it), `published\n<shard>@<token>`, `discarded`, `scheduled` (see `scripts::ACCEPT_WILL`): each will once |
//! | `mqf:{H}:prev:<id>` | hash (10 min) | epoch of a connection a newer one replaced before it was released → "owner\ndelay ms\nwill": the will it may still owe if its proxy died |
//! | `mqf:{m}:proxies` | hash | proxy id → "last heartbeat ms\|" (Redis clock) |
//! | `mqf:{m}:shards` | hash | shard name → "last heartbeat ms\|link address" |
//! | `mqf:{m}:ring` | hash | `epoch`, `members` (the shard set the ring is built from); during a change `next`, `next_epoch`, `next_since` |
//! | `mqf:{m}:ring:ready:<epoch>` | set | `proxy:<id>` / `shard:<name>` of participants ready for that change |
//! | `mqf:{m}:wills` | sorted set | client id, scored by when its delayed will is due |
//! | `mqf:{pH}:inbox:<proxy>` | list | takeover notices for the proxy's connections |
//! | `mqf:{pH}:clients:<proxy>` | set | client ids the proxy claimed |
//! | `mqf:{pH}:wills:<proxy>` | sorted set | client ids whose will the proxy took to publish, by when (Unix ms): where a settlement of the proxy looks for intents |
//! | `mqf:{H}:rate:<name>:<id>` | hash | fleet-wide token bucket of a client: `tokens`, `at_ms` |
//! | `mqf:{uH}:user:<name>` | string | a user's PHC password hash (`mqfleet-proxy passwd redis://…`) |
//! | `mqf:{m}:acl` | string | the fleet's ACL rules (TOML, as in an ACL file) |
//!
//! Fields of the session hash: `rec` (the record, persistent sessions only), `epoch`, `owner`
//! (the proxy with the connection), `expiry_ms` (session expiry interval), `will` and
//! `will_delay_ms` (the connection's will, where any proxy can find it).

/// FNV-1a, 64 bits: stable across processes, versions and machines (no seed, defined byte
/// order), which is all a slot tag needs.
pub fn client_hash(client_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The keys of one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKeys {
    pub session: String,
    pub queue: String,
    pub queue_state: String,
    pub counter: String,
    pub inbound: String,
    pub watermark: String,
    /// Who took the will of which connection; not among [`ClientKeys::all`]: it outlives the
    /// session (see `scripts::WITHDRAW_WILL`, `scripts::ORPHAN`).
    pub wills_taken: String,
    /// Connections replaced before they were released (see `scripts::CLAIM`); not among
    /// [`ClientKeys::all`] either.
    pub replaced: String,
    /// Which acceptance marked each inbound packet id (see `scripts::MARK_INBOUND`); not among
    /// [`ClientKeys::all`]: a stale entry is overwritten by the next mark of its id.
    pub inbound_by: String,
}

impl ClientKeys {
    pub fn new(client_id: &str) -> ClientKeys {
        let tag = format!("mqf:{{{:016x}}}", client_hash(client_id));
        ClientKeys {
            session: format!("{tag}:s:{client_id}"),
            queue: format!("{tag}:q:{client_id}"),
            queue_state: format!("{tag}:qs:{client_id}"),
            counter: format!("{tag}:n:{client_id}"),
            inbound: format!("{tag}:in:{client_id}"),
            watermark: format!("{tag}:w:{client_id}"),
            wills_taken: format!("{tag}:wt:{client_id}"),
            replaced: format!("{tag}:prev:{client_id}"),
            inbound_by: format!("{tag}:inby:{client_id}"),
        }
    }

    pub fn all(&self) -> [&str; 6] {
        [&self.session, &self.queue, &self.queue_state, &self.counter, &self.inbound, &self.watermark]
    }
}

/// Cluster-wide keys share the tag `{m}`, so one script can read and change membership
/// atomically on one Cluster slot.
pub const PROXIES: &str = "mqf:{m}:proxies";
pub const SHARDS: &str = "mqf:{m}:shards";
pub const RING: &str = "mqf:{m}:ring";
pub const WILLS: &str = "mqf:{m}:wills";

/// A fleet-wide rate bucket of a client (a hash: `tokens`, `at_ms`), in the client's slot.
pub fn rate_bucket(client_id: &str, name: &str) -> String {
    format!("mqf:{{{:016x}}}:rate:{name}:{client_id}", client_hash(client_id))
}

/// The fleet's ACL rules (a string: the ACL file's TOML).
pub const ACL: &str = "mqf:{m}:acl";

/// A user's credentials (a string: PHC hash), tagged by a hash of the name like client keys.
pub fn user(username: &str) -> String {
    format!("mqf:{{u{:016x}}}:user:{username}", client_hash(username))
}

/// Participants ready for the ring change to `epoch` (a set).
pub fn ring_ready(epoch: u64) -> String {
    format!("mqf:{{m}}:ring:ready:{epoch}")
}

/// The tag of one proxy's keys: a hash of its id, for the reason client tags are hashed.
fn proxy_tag(proxy: &str) -> String {
    format!("mqf:{{p{:016x}}}", client_hash(proxy))
}

/// Takeover notices for a proxy's connections (a list; the proxy blocks on it).
pub fn proxy_inbox(proxy: &str) -> String {
    format!("{}:inbox:{proxy}", proxy_tag(proxy))
}

/// Client ids whose will a proxy took to publish, scored by when (a superset of its open
/// intents: each is checked against the wills-taken hash before it is acted on).
pub fn proxy_wills(proxy: &str) -> String {
    format!("{}:wills:{proxy}", proxy_tag(proxy))
}

/// Client ids a proxy has claimed (a superset of what it owns: each entry is checked against
/// the session's owner before it is acted on).
pub fn proxy_clients(proxy: &str) -> String {
    format!("{}:clients:{proxy}", proxy_tag(proxy))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis Cluster's slot of a key (CRC16/XMODEM of the hash tag, mod 16384).
    fn slot(key: &str) -> u16 {
        let b = key.as_bytes();
        let tag = match (key.find('{'), key.find('{').and_then(|s| key[s + 1..].find('}').map(|e| s + 1 + e))) {
            (Some(s), Some(e)) if e > s + 1 => &b[s + 1..e],
            _ => b,
        };
        let mut crc: u16 = 0;
        for byte in tag {
            crc ^= u16::from(*byte) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            }
        }
        crc % 16384
    }

    #[test]
    fn all_keys_of_a_client_share_one_slot_whatever_the_id_bad_input_j76() {
        for id in ["plain", "{attacker-chosen}", "a{b}c", "}{", "{}", "x:{s}:y"] {
            let k = ClientKeys::new(id);
            let s = slot(&k.session);
            assert!(k.all().iter().all(|key| slot(key) == s), "{id}");
        }
        // The id does not choose the slot: ids with the same {tag} land in different slots.
        assert_ne!(slot(&ClientKeys::new("{same}-1").session), slot(&ClientKeys::new("{same}-2").session));
    }

    #[test]
    fn hash_is_pinned() {
        // Changing it moves every session to another slot: a migration, not a refactor.
        assert_eq!(client_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(client_hash("device-42"), 0xbda0_5d4c_5052_eee8);
    }
}
