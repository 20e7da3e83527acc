//! Server → client: deliveries from the shards, the outbound QoS flows, resume of queued
//! messages.

use std::sync::Arc;

use broker_shard::link::{DeliveryOptions, Recipient};
use broker_shard::{now_ms, Message};
use futures::future::FutureExt;
use mqfleet_codec::{Ack, Packet, PacketId, Publish, QoS, ReasonCode};
use session_store::{DeliveryState, Op, QueuedMessage};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Connection, End, OpDone};
use crate::session::alias::OutTopic;
use crate::session::outbound::{OutMessage, Push, Stage};

impl<R, W> Connection<R, W>
where
    R: AsyncRead + super::io::Readiness + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// A message routed to this connection.
    pub(super) fn on_deliver(&mut self, message: Arc<Message>, r: Recipient) {
        if r.seq.is_some_and(|s| s <= self.resume_floor) {
            return; // already loaded from the store at resume
        }
        let seq = r.seq;
        self.offer(OutMessage { message, delivery: r.delivery, seq, share_filter: r.share_filter });
    }

    /// Sends or queues one message (or leaves it in the session's store queue behind others
    /// waiting there, see `backlog`).
    fn offer(&mut self, m: OutMessage) {
        if m.seq.is_some() && self.left_behind_backlog() {
            return;
        }
        let metrics = &self.ctx.metrics;
        if m.message.is_expired(now_ms()) {
            metrics.drop("expired");
            self.ack_in_store(m.seq);
            return;
        }
        if !self.ctx.settings.auth.may_receive(&self.identity, &self.client_id, &m.message.topic) {
            // BAD-INPUT 70: the ACL changed since this message was routed or queued here.
            metrics.drop("not_authorized");
            self.ack_in_store(m.seq);
            return;
        }
        if m.delivery.qos == QoS::AtMostOnce {
            if self.io.output.pending() >= self.ctx.limits.max_write_buffer {
                metrics.drop("slow_consumer");
                self.ack_in_store(m.seq);
                return;
            }
            let p = m.message.to_publish(QoS::AtMostOnce, m.delivery.retain, None, now_ms());
            self.emit(p, &m.delivery, None);
            self.ack_in_store(m.seq);
            return;
        }
        if !self.fits(&m) {
            metrics.drop("packet_too_large");
            self.ack_in_store(m.seq);
            return;
        }
        match self.outbound.push(m.clone()) {
            Push::Send(pkid) => self.send_new(pkid, &m),
            Push::Queued => {}
            Push::Dropped => match m.seq {
                // Already in the session's store queue: read back from there when room frees up.
                Some(seq) => self.leave_in_store(seq),
                None => metrics.drop("queue_full"),
            },
        }
    }

    /// Whether the PUBLISH fits the client's Maximum Packet Size [MQTT-3.1.2-24]. A message that
    /// does not is dropped for this client as if delivered [MQTT-3.1.2-25].
    fn fits(&self, m: &OutMessage) -> bool {
        let mut p = m.message.to_publish(m.delivery.qos, m.delivery.retain, PacketId::new(1), now_ms());
        if self.v5() {
            p.properties.subscription_identifiers = m.delivery.subscription_ids.clone();
        }
        Packet::Publish(p).encoded_len(self.protocol) <= self.client_max_packet_size
    }

    /// First transmission of a QoS 1/2 message that got packet id `pkid`.
    fn send_new(&mut self, pkid: PacketId, m: &OutMessage) {
        let p = m.message.to_publish(m.delivery.qos, m.delivery.retain, Some(pkid), now_ms());
        // A QoS 2 delivery of a persistent session goes out only once its packet id is durable:
        // after a crash it is resent with the same id, which the client recognises (MQTT 5 §4.3.3).
        let mark = match m.seq {
            Some(seq) if m.delivery.qos == QoS::ExactlyOnce => Some((seq, pkid.get())),
            _ => None,
        };
        if let Some((seq, id)) = mark {
            let store = self.ctx.store.clone();
            let client_id = self.client_id.to_string();
            self.ops.push_back(
                async move {
                    let op = Op::SetState { client_id, seq, state: DeliveryState::Sent { pkid: id } };
                    let failed = store.write(vec![op]).await.err().map(|e| e.to_string());
                    OpDone::Marked { pkid: id, failed }
                }
                .boxed(),
            );
        }
        let delivery = m.delivery.clone();
        self.emit(p, &delivery, mark.map(|(_, id)| id));
    }

    /// Writes a PUBLISH, or holds it behind a QoS 2 delivery still being marked.
    fn emit(&mut self, mut p: Publish, delivery: &DeliveryOptions, waiting_mark: Option<u16>) {
        if self.v5() {
            p.properties.subscription_identifiers = delivery.subscription_ids.clone();
        }
        if waiting_mark.is_some() || !self.held.is_empty() {
            self.held.push_back((p, waiting_mark));
            return;
        }
        self.write_publish(p);
    }

    fn write_publish(&mut self, mut p: Publish) {
        if self.v5() {
            match self.aliases_out.assign(&p.topic) {
                OutTopic::Full => {}
                OutTopic::Define(a) => p.properties.topic_alias = Some(a),
                OutTopic::Alias(a) => {
                    p.properties.topic_alias = Some(a);
                    p.topic = "".into();
                }
            }
        }
        let qos = p.qos as u8;
        self.send(Packet::Publish(p));
        self.ctx.metrics.messages_sent.get_or_create(&crate::metrics::QosLabel { qos }).inc();
    }

    pub(super) fn on_marked(&mut self, pkid: u16) {
        for (_, waiting) in self.held.iter_mut() {
            if *waiting == Some(pkid) {
                *waiting = None;
            }
        }
        while let Some((_, None)) = self.held.front() {
            let (p, _) = self.held.pop_front().expect("front exists");
            self.write_publish(p);
        }
    }

    /// Sends what the window admits from the queue. A message that expired while it waited is
    /// dropped instead: its onward delivery never started (MQTT 5 §3.3.2.3.3).
    fn pump(&mut self) {
        while let Some((pkid, m)) = self.outbound.next_ready() {
            if m.message.is_expired(now_ms()) {
                self.outbound.abandon(pkid);
                self.ctx.metrics.drop("expired");
                self.ack_in_store(m.seq);
                continue;
            }
            self.send_new(pkid, &m);
        }
        self.read_backlog_when_room();
    }

    fn ack_in_store(&mut self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.store_ops.push(Op::Ack { client_id: self.client_id.to_string(), seq });
        }
    }

    // === acknowledgements from the client ===

    pub(super) fn on_puback(&mut self, a: Ack) -> Result<(), End> {
        match self.outbound.puback(a.pkid) {
            Ok(m) => {
                self.ack_in_store(m.seq);
                self.pump();
            }
            // BAD-INPUT F.48: an unknown id is ignored, not fatal.
            Err(_) => tracing::debug!(pkid = a.pkid.get(), "PUBACK for a packet id not in flight; ignored"),
        }
        Ok(())
    }

    pub(super) fn on_pubrec(&mut self, a: Ack) -> Result<(), End> {
        if a.reason.is_error() {
            // The client refused the message: the flow ends without PUBREL (MQTT 5 §4.3.3).
            if let Ok(m) = self.outbound.pubrec_failed(a.pkid) {
                self.ack_in_store(m.seq);
                self.pump();
            }
            return Ok(());
        }
        match self.outbound.pubrec(a.pkid) {
            // A persistent session's PUBREL leaves only once "released" is durable: were it
            // sent first and the write lost, a resume would send the PUBLISH again, and the
            // client — done with that id after the PUBREL — would take it for a new message.
            Ok(m) => match m.seq {
                Some(seq) => {
                    let (store, client_id, pkid) = (self.ctx.store.clone(), self.client_id.to_string(), a.pkid);
                    self.ops.push_back(
                        async move {
                            let op = Op::SetState { client_id, seq, state: DeliveryState::Released { pkid: pkid.get() } };
                            let failed = store.write(vec![op]).await.err().map(|e| e.to_string());
                            OpDone::Released { pkid, failed }
                        }
                        .boxed(),
                    );
                }
                None => self.send(Packet::PubRel(Ack::new(a.pkid))),
            },
            Err(_) => {
                let reason = if self.v5() { ReasonCode::PacketIdentifierNotFound } else { ReasonCode::Success };
                self.send(Packet::PubRel(Ack::with_reason(a.pkid, reason)));
            }
        }
        Ok(())
    }

    pub(super) fn on_pubcomp(&mut self, a: Ack) -> Result<(), End> {
        match self.outbound.pubcomp(a.pkid) {
            Ok(m) => {
                self.ack_in_store(m.seq);
                self.pump();
            }
            Err(_) => tracing::debug!(pkid = a.pkid.get(), "PUBCOMP for a packet id not awaiting it; ignored"),
        }
        Ok(())
    }

    // === resume ===

    /// Puts the stored queue of a resumed session back in flight: messages sent before are
    /// resent with DUP and their packet id [MQTT-4.4.0-1]; QoS 2 messages past PUBREC get their
    /// PUBREL again; the rest are sent as new.
    pub(super) fn restore(&mut self, queue: Vec<QueuedMessage>) {
        let persistent = self.session.persistent();
        // A packet id is reused only once its flow completed, so of two QoS 2 entries that
        // recorded the same id the older one is complete — its acknowledgement was recorded by
        // a write that was lost (the store went away at that moment). Restoring it would push
        // the newer entry onto a fresh id and deliver that one twice. (QoS 1: below.)
        let mut newest: std::collections::HashMap<u16, u64> = std::collections::HashMap::new();
        for q in &queue {
            if let DeliveryState::Sent { pkid } | DeliveryState::Released { pkid } = q.state {
                let e = newest.entry(pkid).or_insert(q.seq);
                *e = (*e).max(q.seq);
            }
        }
        for mut q in queue {
            if let DeliveryState::Sent { pkid } | DeliveryState::Released { pkid } = q.state {
                if newest.get(&pkid).is_some_and(|&n| n > q.seq) {
                    if q.delivery.qos == 2 {
                        self.resume_floor = self.resume_floor.max(q.seq);
                        self.ack_in_store(Some(q.seq));
                        continue;
                    }
                    // QoS 1 cannot tell "completed, ack lost" from "never reached the client":
                    // the id may have been recorded by a connection the client had already
                    // abandoned, or by a late write (found by the soak: 5 QoS 1 messages lost
                    // around a subscriber's reconnects). Sent again under a fresh id: a
                    // duplicate is allowed at QoS 1, a loss is not.
                    q.state = DeliveryState::Queued;
                }
            }
            self.resume_floor = self.resume_floor.max(q.seq);
            let message = match Message::decode(&q.message) {
                Ok(m) => Arc::new(m),
                Err(e) => {
                    tracing::error!(error = %e, seq = q.seq, "queued message unreadable; discarded");
                    self.ack_in_store(Some(q.seq));
                    continue;
                }
            };
            let qos = QoS::from_u8(q.delivery.qos).unwrap_or(QoS::AtLeastOnce);
            let delivery = DeliveryOptions { qos, retain: q.delivery.retain, subscription_ids: q.delivery.subscription_ids };
            let m = OutMessage { message, delivery, seq: persistent.then_some(q.seq), share_filter: None };
            let resumable = |pkid: u16| PacketId::new(pkid).filter(|p| !self.outbound.is_inflight(p.get()));
            match q.state {
                DeliveryState::Sent { pkid } if qos != QoS::AtMostOnce && resumable(pkid).is_some() => {
                    let pkid = resumable(pkid).expect("checked");
                    let stage = if qos == QoS::ExactlyOnce { Stage::AwaitPubRec } else { Stage::AwaitPubAck };
                    self.outbound.restore(pkid, m.clone(), stage);
                    let mut p = m.message.to_publish(qos, m.delivery.retain, Some(pkid), now_ms());
                    p.dup = true;
                    self.emit(p, &m.delivery, None);
                }
                DeliveryState::Released { pkid } if resumable(pkid).is_some() => {
                    let pkid = resumable(pkid).expect("checked");
                    self.outbound.restore(pkid, m, Stage::AwaitPubComp);
                    self.send(Packet::PubRel(Ack::new(pkid)));
                }
                _ => self.offer(m),
            }
        }
    }
}
