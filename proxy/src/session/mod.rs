//! The MQTT session logic of one connection, without I/O: CONNECT negotiation, the outbound
//! in-flight window, inbound QoS tracking and topic aliases. The connection task
//! (`crate::connection`) feeds these with packets and performs what they decide.

pub mod alias;
pub mod connect;
pub mod inbound;
pub mod outbound;

/// How packet-id maps hash: with fixed keys, so the hasher takes no room (the default's random
/// keys cost 16 bytes in every map of every connection). The keys are packet ids, at most
/// Receive Maximum of them per map, so crowding one bucket gains a client nothing.
pub type PacketIds = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

use mqfleet_codec::topic::TopicLimits;

use crate::config::Settings;

/// Per-connection limits, derived once from the settings.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_packet_size: u32,
    pub max_client_id_length: usize,
    pub max_keepalive_secs: u16,
    /// 0: no bound.
    pub max_session_expiry_secs: u32,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    pub max_queued_messages: u32,
    pub max_write_buffer: usize,
    pub topic_alias_maximum: u16,
    pub max_subscriptions: usize,
    pub topic: TopicLimits,
    /// Per-client PUBLISH rates (messages, payload bytes per second); 0: none.
    pub max_publish_rate: u32,
    pub max_publish_bytes_rate: u32,
}

impl Limits {
    /// What a persistent session's durable queue may hold: its in-flight window plus the
    /// messages waiting behind it. The queue keeps every copy until the client acknowledges it,
    /// so a bound of `max_queued_messages` alone would drop messages for a client that is
    /// keeping up, whenever its window is full.
    pub fn session_queue_capacity(&self) -> u32 {
        self.max_queued_messages.saturating_add(u32::from(self.max_inflight))
    }

    pub fn from_settings(s: &Settings) -> Limits {
        let c = &s.raw;
        Limits {
            max_packet_size: c.max_packet_size,
            max_client_id_length: c.max_client_id_length,
            max_keepalive_secs: c.max_keepalive_secs,
            max_session_expiry_secs: c.max_session_expiry_secs,
            receive_maximum: c.receive_maximum,
            max_inflight: c.max_inflight,
            max_queued_messages: c.max_queued_messages,
            max_write_buffer: c.max_write_buffer,
            topic_alias_maximum: c.topic_alias_maximum,
            max_subscriptions: c.max_subscriptions,
            topic: TopicLimits { max_len: c.max_topic_length, max_levels: c.max_topic_levels },
            max_publish_rate: c.max_publish_rate,
            max_publish_bytes_rate: c.max_publish_bytes_rate,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::from_settings(&crate::config::Config::default().validate().expect("defaults are valid"))
    }
}
