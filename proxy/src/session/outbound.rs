//! Messages from the server to one client: packet ids, the in-flight window and the queue behind
//! it (MQTT 5 §4.3, §4.9).
//!
//! Design: no I/O, no clock. The connection asks what to send and reports acknowledgements.
//! QoS 0 messages never enter here: they have no packet id and no window.
//!
//! # Invariants
//! - `inflight.len() <= window`.
//! - Every key of `inflight` is a packet id not used by any other in-flight message
//!   [MQTT-2.2.1-4]; ids are reused only after the flow completed.
//! - `pending.len() <= max_pending`.

use std::collections::{HashMap, VecDeque};

use super::PacketIds;
use std::sync::Arc;

use broker_shard::link::DeliveryOptions;
use broker_shard::Message;
use mqfleet_codec::{ByteString, PacketId, QoS};

/// A QoS 1/2 message bound for the client.
#[derive(Debug, Clone)]
pub struct OutMessage {
    pub message: Arc<Message>,
    pub delivery: DeliveryOptions,
    /// Position in the session's durable queue, acknowledged there when the flow completes.
    pub seq: Option<u64>,
    /// Delivered through this shared subscription; redispatched if never acknowledged.
    pub share_filter: Option<ByteString>,
}

/// Where an in-flight message is in its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// QoS 1: PUBLISH sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2: PUBLISH sent, waiting for PUBREC.
    AwaitPubRec,
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    AwaitPubComp,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub msg: OutMessage,
    pub stage: Stage,
}

/// Outcome of [`Outbound::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Send now with this packet id.
    Send(PacketId),
    /// Queued behind the window.
    Queued,
    /// Queue full: dropped.
    Dropped,
}

/// An acknowledgement that does not fit the state: a protocol error of the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnexpectedAck;

pub struct Outbound {
    window: usize,
    max_pending: usize,
    inflight: HashMap<u16, Inflight, PacketIds>,
    pending: VecDeque<OutMessage>,
    next_id: u16,
}

impl Outbound {
    /// `window`: the client's Receive Maximum capped by the server's in-flight limit.
    pub fn new(window: u16, max_pending: usize) -> Outbound {
        Outbound { window: usize::from(window.max(1)), max_pending, inflight: HashMap::default(), pending: VecDeque::new(), next_id: 1 }
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn allocate(&mut self) -> PacketId {
        // `inflight.len() < window <= 65535` when called, so a free id exists.
        loop {
            let id = self.next_id;
            self.next_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.contains_key(&id) {
                return PacketId::new(id).expect("ids start at 1 and skip 0");
            }
        }
    }

    fn start(&mut self, msg: OutMessage) -> PacketId {
        let id = self.allocate();
        let stage = if msg.delivery.qos == QoS::ExactlyOnce { Stage::AwaitPubRec } else { Stage::AwaitPubAck };
        self.inflight.insert(id.get(), Inflight { msg, stage });
        id
    }

    /// Offers a QoS 1/2 message: sent at once if the window allows and nothing waits before
    /// it (order is kept), else queued.
    pub fn push(&mut self, msg: OutMessage) -> Push {
        debug_assert!(msg.delivery.qos != QoS::AtMostOnce);
        if self.pending.is_empty() && self.inflight.len() < self.window {
            return Push::Send(self.start(msg));
        }
        if self.pending.len() >= self.max_pending {
            return Push::Dropped;
        }
        self.pending.push_back(msg);
        Push::Queued
    }

    /// Messages the window and the queue behind it could still take.
    pub fn room(&self) -> usize {
        self.window.saturating_sub(self.inflight.len()) + self.max_pending.saturating_sub(self.pending.len())
    }

    /// What the window and the queue hold when full.
    pub fn capacity(&self) -> usize {
        self.window + self.max_pending
    }

    /// Puts back a message that was in flight on an earlier connection, with its old packet
    /// id and stage (session resume). Resumed messages may exceed the window: they were
    /// already sent.
    pub fn restore(&mut self, pkid: PacketId, msg: OutMessage, stage: Stage) {
        self.inflight.insert(pkid.get(), Inflight { msg, stage });
    }

    /// Whether `pkid` is in flight (resume: avoid reusing ids of restored messages).
    pub fn is_inflight(&self, pkid: u16) -> bool {
        self.inflight.contains_key(&pkid)
    }

    /// The next queued message the window now admits, with its new packet id.
    pub fn next_ready(&mut self) -> Option<(PacketId, OutMessage)> {
        if self.inflight.len() >= self.window {
            return None;
        }
        let msg = self.pending.pop_front()?;
        let id = self.start(msg.clone());
        Some((id, msg))
    }

    /// Removes a message that got its packet id but will not be sent (it expired while queued).
    pub fn abandon(&mut self, pkid: PacketId) {
        self.inflight.remove(&pkid.get());
    }

    /// PUBACK: completes a QoS 1 flow.
    pub fn puback(&mut self, pkid: PacketId) -> Result<OutMessage, UnexpectedAck> {
        self.complete(pkid, Stage::AwaitPubAck)
    }

    /// PUBREC: the QoS 2 message is received; PUBREL follows.
    pub fn pubrec(&mut self, pkid: PacketId) -> Result<&OutMessage, UnexpectedAck> {
        match self.inflight.get_mut(&pkid.get()) {
            Some(e) if e.stage == Stage::AwaitPubRec || e.stage == Stage::AwaitPubComp => {
                e.stage = Stage::AwaitPubComp;
                Ok(&e.msg)
            }
            _ => Err(UnexpectedAck),
        }
    }

    /// PUBREC with an error reason (≥ 0x80): the flow ends without PUBREL.
    pub fn pubrec_failed(&mut self, pkid: PacketId) -> Result<OutMessage, UnexpectedAck> {
        self.complete(pkid, Stage::AwaitPubRec)
    }

    /// PUBCOMP: completes a QoS 2 flow.
    pub fn pubcomp(&mut self, pkid: PacketId) -> Result<OutMessage, UnexpectedAck> {
        self.complete(pkid, Stage::AwaitPubComp)
    }

    fn complete(&mut self, pkid: PacketId, stage: Stage) -> Result<OutMessage, UnexpectedAck> {
        match self.inflight.get(&pkid.get()) {
            Some(e) if e.stage == stage => Ok(self.inflight.remove(&pkid.get()).expect("present").msg),
            _ => Err(UnexpectedAck),
        }
    }

    /// Everything in flight (with packet ids and stages) and everything queued, at the end of
    /// a connection.
    pub fn drain(&mut self) -> (Vec<(u16, Inflight)>, Vec<OutMessage>) {
        let mut inflight: Vec<(u16, Inflight)> = self.inflight.drain().collect();
        inflight.sort_by_key(|(_, e)| e.msg.seq);
        (inflight, self.pending.drain(..).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mqfleet_codec::PublishProperties;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn msg(qos: QoS) -> OutMessage {
        OutMessage {
            message: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::new(),
                qos,
                retain: false,
                properties: PublishProperties::default(),
                expires_at_ms: None,
                origin: None,
            }),
            delivery: DeliveryOptions { qos, ..Default::default() },
            seq: None,
            share_filter: None,
        }
    }

    fn id(v: u16) -> PacketId {
        PacketId::new(v).unwrap()
    }

    #[test]
    fn window_limits_inflight_and_queue_keeps_order() {
        let mut o = Outbound::new(2, 10);
        assert_eq!(o.push(msg(QoS::AtLeastOnce)), Push::Send(id(1)));
        assert_eq!(o.push(msg(QoS::AtLeastOnce)), Push::Send(id(2)));
        assert_eq!(o.push(msg(QoS::AtLeastOnce)), Push::Queued);
        assert!(o.next_ready().is_none());
        o.puback(id(1)).unwrap();
        assert_eq!(o.next_ready().unwrap().0, id(3));
        assert_eq!(o.inflight_len(), 2);
    }

    #[test]
    fn queue_is_bounded() {
        let mut o = Outbound::new(1, 1);
        o.push(msg(QoS::AtLeastOnce));
        assert_eq!(o.push(msg(QoS::AtLeastOnce)), Push::Queued);
        assert_eq!(o.push(msg(QoS::AtLeastOnce)), Push::Dropped);
        assert_eq!(o.room(), 0);
        o.puback(id(1)).unwrap();
        assert_eq!((o.room(), o.capacity()), (1, 2), "the window has room; the queue is still full");
    }

    #[test]
    fn qos2_flow_needs_pubrec_before_pubcomp() {
        let mut o = Outbound::new(5, 5);
        let Push::Send(p) = o.push(msg(QoS::ExactlyOnce)) else { panic!() };
        assert_eq!(o.pubcomp(p).unwrap_err(), UnexpectedAck);
        assert_eq!(o.puback(p).unwrap_err(), UnexpectedAck);
        o.pubrec(p).unwrap();
        o.pubcomp(p).unwrap();
        assert_eq!(o.inflight_len(), 0);
    }

    #[test]
    fn unknown_acks_are_reported() {
        let mut o = Outbound::new(5, 5);
        assert!(o.puback(id(9)).is_err());
        assert!(o.pubrec(id(9)).is_err());
    }

    proptest! {
        /// The allocator never hands out an id that is in flight, whatever the ack order
        /// (the packet-id property).
        #[test]
        fn packet_ids_are_never_reused_while_in_flight(
            window in 1u16..40,
            ops in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 1..400),
        ) {
            let mut o = Outbound::new(window, 1000);
            let mut live: HashSet<u16> = HashSet::new();
            for (push, pick) in ops {
                if push {
                    if let Push::Send(p) = o.push(msg(QoS::AtLeastOnce)) {
                        prop_assert!(live.insert(p.get()), "id {} reused while in flight", p);
                    }
                } else if !live.is_empty() {
                    let v: Vec<u16> = live.iter().copied().collect();
                    let p = v[pick.index(v.len())];
                    o.puback(id(p)).unwrap();
                    live.remove(&p);
                    while let Some((p, _)) = o.next_ready() {
                        prop_assert!(live.insert(p.get()), "id {} reused while in flight", p);
                    }
                }
                prop_assert!(live.len() <= window as usize);
            }
        }
    }
}
