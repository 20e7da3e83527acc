//! The shard tier: owns a slice of the topics.
//!
//! # Layout
//! - [`router`]: the shard itself, a single task that owns the subscription index, the retained
//!   messages and the session routes, and turns requests into deliveries.
//! - [`topic`]: the subscription trie; [`retained`]: the retained-message trie.
//! - [`message`]: the application message and its encoding for stores and links.
//! - [`link`]: the proxy <-> shard protocol and its transports.
//!
//! # Path of a PUBLISH
//! The proxy sends [`link::Request::Publish`] to the shard that owns the topic. The router
//! matches it against the trie (exact subscriptions of its topics and every wildcard
//! subscription), picks one member per shared group, writes the copies for persistent sessions
//! and the retained message to the session store in one batch, and once that is durable
//! replies to the publisher's proxy and sends one [`link::Deliver`] per proxy with the list of
//! recipients there.

pub mod config;
pub mod link;
pub mod log;
pub mod message;
pub mod metrics;
pub mod node;
mod pipeline;
pub mod restore;
pub mod retained;
pub mod ring;
pub mod router;
pub mod topic;

pub use message::Message;
pub use metrics::ShardMetrics;
pub use router::{spawn, spawn_clustered, Clustered, ShardConfig, ShardHandle};

/// Unix time in milliseconds (message expiry and session expiry are wall-clock based because
/// they survive restarts).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
