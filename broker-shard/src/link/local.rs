//! In-process transport: the link as a pair of tokio channels (single-node mode).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Event, ProxyId, Request};

/// What a shard's inbox carries.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A proxy opened its link; `events` is where the shard sends replies and deliveries.
    Connect {
        proxy: ProxyId,
        /// The proxy's configured name, and the random number of its current run.
        name: Arc<str>,
        incarnation: u64,
        events: mpsc::Sender<Event>,
    },
    Request {
        proxy: ProxyId,
        request: Request,
    },
    /// The proxy's link is gone: its sessions are offline (persistent) or ended.
    Disconnect {
        proxy: ProxyId,
    },
    /// From the shard's process: the ring (clustered mode).
    Ring {
        me: String,
        current: Option<crate::router::RingMembers>,
        next: Option<crate::router::RingMembers>,
    },
    /// From the shard's process: compute the hand-over to the ring `next`.
    Handover {
        next: crate::router::RingMembers,
        reply: tokio::sync::oneshot::Sender<crate::router::Handover>,
    },
}

/// Capacity of a proxy's event channel. Bounded so that a proxy that stops reading slows its
/// shards instead of growing their memory; the proxy's reader only hands events to connection
/// queues, so it does not stop reading in normal operation.
pub const EVENT_CHANNEL_CAPACITY: usize = 4096;
