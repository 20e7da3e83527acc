//! What a clustered shard keeps on its own disk besides the log, and reads back at start:
//! retained messages, persistent sessions' subscriptions, the log.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use mqfleet_codec::{ByteString, QoS, RetainHandling, SubscriptionOptions};
use session_store::EmbeddedStore;

use crate::link::SubscribeItem;
use crate::log::{self, Entry};
use crate::message::Message;
use crate::now_ms;

/// A shard's state as found on disk.
#[derive(Default)]
pub struct Restored {
    pub retained: Vec<Arc<Message>>,
    /// Subscriptions of persistent sessions, by client id.
    pub subscriptions: Vec<(ByteString, SubscribeItem)>,
    /// Accepted messages not yet done, in position order.
    pub log: Vec<(u64, Entry)>,
    /// The highest position the log ever held.
    pub last_position: u64,
}

impl Restored {
    /// Reads everything; unreadable records are skipped with an error in the log (one damaged
    /// record must not keep a shard down).
    pub async fn load(local: &EmbeddedStore) -> Result<Restored, session_store::Error> {
        let now = now_ms();
        let mut out = Restored { last_position: local.log_position().await?, ..Restored::default() };
        for r in local.retained().await? {
            match Message::decode(&r.message) {
                Ok(m) if !m.is_expired(now) => out.retained.push(Arc::new(m)),
                Ok(_) => {}
                Err(e) => tracing::error!(topic = %r.topic, error = %e, "unreadable retained message skipped"),
            }
        }
        for (client, filter, entry) in local.subscriptions().await? {
            match decode_subscription(&filter, &entry) {
                Some(item) => out.subscriptions.push((client.as_str().into(), item)),
                None => tracing::error!(client_id = %client, filter, "unreadable subscription skipped"),
            }
        }
        for (position, bytes) in local.log().await? {
            match log::decode(bytes) {
                Ok(e) => out.log.push((position, e)),
                Err(e) => tracing::error!(position, error = %e, "unreadable log entry skipped"),
            }
        }
        Ok(out)
    }
}

/// A subscription as the shard stores it: options byte, then an optional identifier.
pub(crate) fn encode_subscription(item: &SubscribeItem) -> Bytes {
    let o = &item.options;
    let mut b = BytesMut::with_capacity(6);
    b.put_u8(o.qos as u8 | u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | (o.retain_handling as u8) << 4);
    if let Some(id) = item.id {
        b.put_u32(id);
    }
    b.freeze()
}

pub(crate) fn decode_subscription(filter: &str, b: &[u8]) -> Option<SubscribeItem> {
    let (&o, rest) = b.split_first()?;
    let options = SubscriptionOptions {
        qos: QoS::from_u8(o & 0b11)?,
        no_local: o & 0b100 != 0,
        retain_as_published: o & 0b1000 != 0,
        retain_handling: match (o >> 4) & 0b11 {
            0 => RetainHandling::OnSubscribe,
            1 => RetainHandling::OnNewSubscription,
            2 => RetainHandling::Never,
            _ => return None,
        },
    };
    let id = match rest.len() {
        0 => None,
        4 => Some(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]])),
        _ => return None,
    };
    Some(SubscribeItem { filter: filter.into(), options, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_round_trip() {
        for id in [None, Some(7)] {
            let item = SubscribeItem {
                filter: "a/+".into(),
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: false,
                    retain_handling: RetainHandling::Never,
                },
                id,
            };
            assert_eq!(decode_subscription("a/+", &encode_subscription(&item)), Some(item));
        }
        assert_eq!(decode_subscription("a", &[0xff]), None);
        assert_eq!(decode_subscription("a", &[0, 1, 2]), None);
    }
}
