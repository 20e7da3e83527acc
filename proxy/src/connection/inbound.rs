//! Client → server: PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PUBREL, PINGREQ, DISCONNECT, and the
//! acknowledgements that follow once shards and store have done their part.

use std::sync::Arc;

use broker_shard::link::{Marker, Reply, Request, SessionInfo, SubscribeItem};
use broker_shard::{now_ms, Message};
use futures::future::{join_all, BoxFuture, FutureExt};
use mqfleet_codec::topic::{parse_shared, validate_topic_filter, validate_topic_name};
use mqfleet_codec::{Ack, ByteString, Disconnect, Packet, PacketId, Publish, QoS, ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe};
use session_store::{Op, SessionRecord, StoredSubscription};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::{link_down, protocol_error, Connection, End, OpDone, PublishFailed};
use crate::auth::acl::Action;
use crate::metrics::{QosLabel, ReasonLabel};
use crate::session::inbound::Admit;

impl<R, W> Connection<R, W>
where
    R: AsyncRead + super::io::Readiness + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// Memory: every future awaited here is part of the connection task's state for its whole
    /// life (an idle connection included), so the rare and large ones — SUBSCRIBE and
    /// UNSUBSCRIBE with their shard and store round trips — are boxed when they happen.
    pub(super) async fn on_packet(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::PubAck(a) => self.on_puback(a),
            Packet::PubRec(a) => self.on_pubrec(a),
            Packet::PubRel(a) => self.on_pubrel(a),
            Packet::PubComp(a) => self.on_pubcomp(a),
            Packet::Subscribe(s) => Box::pin(self.on_subscribe(s)).await,
            Packet::Unsubscribe(u) => Box::pin(self.on_unsubscribe(u)).await,
            Packet::PingReq => {
                self.send(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => Err(self.on_disconnect(d)),
            Packet::Connect(_) => Err(protocol_error(ReasonCode::ProtocolError, "second CONNECT on one connection (MQTT-3.1.0-2)")),
            Packet::Auth(_) => {
                Err(protocol_error(ReasonCode::ProtocolError, "AUTH without an authentication method in CONNECT (MQTT 5 §4.12)"))
            }
            other @ (Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp) => {
                Err(protocol_error(ReasonCode::ProtocolError, format!("{} is sent by servers, not clients", other.packet_type())))
            }
        }
    }

    // === PUBLISH ===

    async fn on_publish(&mut self, mut p: Publish) -> Result<(), End> {
        let received = Instant::now();
        let qos = p.qos;
        self.ctx.metrics.messages_received.get_or_create(&QosLabel { qos: qos as u8 }).inc();
        self.charge_publish(p.payload.len());
        if self.fleet_rates_apply() {
            // Boxed: a Redis round trip's future is large, and most proxies never make it.
            Box::pin(self.charge_fleet_publish()).await;
        }
        if self.v5() && !p.properties.subscription_identifiers.is_empty() {
            return Err(protocol_error(
                ReasonCode::ProtocolError,
                "PUBLISH from a client carries a Subscription Identifier (MQTT-3.3.4-6)",
            ));
        }
        let topic = self
            .aliases_in
            .resolve(std::mem::take(&mut p.topic), p.properties.topic_alias)
            .map_err(|(reason, detail)| protocol_error(reason, detail))?;
        validate_topic_name(&topic, &self.ctx.limits.topic)
            .map_err(|e| protocol_error(ReasonCode::TopicNameInvalid, format!("topic name: {e}")))?;
        p.topic = topic;

        if let Some(pkid) = p.pkid {
            match self.inbound.admit(pkid.get(), qos == QoS::ExactlyOnce, self.ctx.limits.receive_maximum) {
                Admit::Route => {}
                Admit::Duplicate => {
                    self.send(Packet::PubRec(Ack::new(pkid)));
                    return Ok(());
                }
                Admit::InProgress => return Ok(()),
                Admit::OverLimit => {
                    return Err(protocol_error(
                        ReasonCode::ReceiveMaximumExceeded,
                        format!("more than {} unacknowledged QoS 1/2 PUBLISHes", self.ctx.limits.receive_maximum),
                    ))
                }
            }
        }

        if let Some(reason) = self.refusal(&p) {
            return self.refuse_publish(p, reason);
        }

        let marker = match p.pkid {
            Some(pkid) if qos == QoS::ExactlyOnce && self.session.persistent() => {
                Some(Marker::Qos2 { client_id: self.client_id.clone(), pkid: pkid.get() })
            }
            _ => None,
        };
        let pkid = p.pkid;
        let message = Arc::new(Message::from_publish(p, Some(self.client_id.clone()), now_ms()));
        // Held until the request is on its link: a ring switch waits for it (see `shards`).
        let ctx = self.ctx.clone();
        let _gate = ctx.shards.publish_gate().await;
        let link = ctx.shards.now().owner(&message.topic).clone();
        match pkid {
            None => {
                link.send(Request::Publish { id: None, message, marker: None }).await.map_err(link_down)?;
                self.publish_latency[0].observe(received.elapsed().as_secs_f64());
            }
            Some(pkid) => {
                let reply = link.start(|id| Request::Publish { id: Some(id), message, marker }).await.map_err(link_down)?;
                let latency = self.publish_latency[qos as usize].clone();
                self.ops.push_back(
                    async move {
                        let result = reply.await.map(|_| ()).map_err(PublishFailed::from);
                        latency.observe(received.elapsed().as_secs_f64());
                        OpDone::Published { pkid, qos, result }
                    }
                    .boxed(),
                );
            }
        }
        Ok(())
    }

    /// Policy checks of a PUBLISH that refuse it without closing the connection.
    fn refusal(&self, p: &Publish) -> Option<(ReasonCode, &'static str)> {
        if p.topic.starts_with('$') {
            return Some((ReasonCode::NotAuthorized, "topics starting with $ are reserved for the server"));
        }
        if p.properties.payload_format_indicator == Some(true) && std::str::from_utf8(&p.payload).is_err() {
            return Some((ReasonCode::PayloadFormatInvalid, "payload is not UTF-8 but its Payload Format Indicator says it is"));
        }
        if !self.ctx.settings.auth.allows(&self.identity, &self.client_id, Action::Publish, &p.topic) {
            self.ctx.metrics.acl_denied.get_or_create(&ReasonLabel { reason: "publish" }).inc();
            return Some((ReasonCode::NotAuthorized, "the ACL does not allow this client to publish to this topic"));
        }
        None
    }

    /// Drops a refused PUBLISH, telling a 5.0 client why. A 3.1.1 client has no refusal code:
    /// it gets a normal acknowledgement so that it does not resend forever, and the drop is
    /// counted.
    fn refuse_publish(&mut self, p: Publish, (reason, detail): (ReasonCode, &'static str)) -> Result<(), End> {
        self.ctx.metrics.drop(match reason {
            ReasonCode::PayloadFormatInvalid => "payload_format_invalid",
            _ => "not_authorized",
        });
        tracing::debug!(topic = %p.topic, reason = %reason, detail, "PUBLISH refused");
        let Some(pkid) = p.pkid else {
            if reason == ReasonCode::PayloadFormatInvalid && self.v5() {
                return Err(protocol_error(reason, detail));
            }
            return Ok(());
        };
        let v5 = self.v5();
        let ack = if v5 {
            let mut a = Ack::with_reason(pkid, reason);
            a.properties.reason_string = Some(detail.into());
            a
        } else {
            Ack::new(pkid)
        };
        // A 5.0 PUBREC with an error ends the flow; a 3.1.1 client will still send PUBREL.
        self.inbound.accepted(pkid.get(), p.qos == QoS::ExactlyOnce && !v5);
        self.send(if p.qos == QoS::ExactlyOnce { Packet::PubRec(ack) } else { Packet::PubAck(ack) });
        Ok(())
    }

    pub(super) fn on_op_done(&mut self, done: OpDone) -> Result<(), End> {
        match done {
            OpDone::Published { pkid, qos, result } => self.on_published(pkid, qos, result),
            OpDone::Subscribed { pkid, reasons, retained, failed } => {
                let reasons = failure_replaces(reasons, &failed);
                let mut ack = SubAck::new(pkid, reasons);
                if let Some(f) = failed {
                    ack.properties.reason_string = Some(f.into());
                }
                self.send(Packet::SubAck(ack));
                for (message, delivery) in retained {
                    self.on_deliver(message, broker_shard::link::Recipient { conn: self.conn, delivery, seq: None, share_filter: None });
                }
                Ok(())
            }
            OpDone::Unsubscribed { pkid, reasons, failed } => {
                let reasons = if self.v5() { failure_replaces(reasons, &failed) } else { Vec::new() };
                self.send(Packet::UnsubAck(UnsubAck::new(pkid, reasons)));
                Ok(())
            }
            OpDone::Marked { pkid, failed: None } => {
                self.on_marked(pkid);
                Ok(())
            }
            // Sent without a durable id (or released without a durable PUBREC), a resend after
            // this connection could reach the client as a new message: exactly once would be
            // broken. The connection ends instead; the message waits in the session's queue and
            // its flow goes on over the next connection.
            OpDone::Marked { failed: Some(e), .. } | OpDone::Released { failed: Some(e), .. } => {
                Err(End::Server { reason: ReasonCode::ServerBusy, detail: format!("session store unavailable for a QoS 2 delivery: {e}") })
            }
            OpDone::Released { pkid, failed: None } => {
                self.send(Packet::PubRel(Ack::new(pkid)));
                Ok(())
            }
            OpDone::Cleared { pkid, failed: None } => {
                self.send(Packet::PubComp(Ack::new(pkid)));
                Ok(())
            }
            // The client sends its PUBREL again over its next connection (MQTT-4.4.0-1).
            OpDone::Cleared { failed: Some(e), .. } => {
                Err(End::Server { reason: ReasonCode::ServerBusy, detail: format!("session store unavailable for a PUBREL: {e}") })
            }
            OpDone::Revoked { failed } => {
                if let Some(f) = failed {
                    tracing::warn!(error = %f, "removing revoked subscriptions failed");
                }
                Ok(())
            }
        }
    }

    /// The shard accepted (or could not accept) a QoS 1/2 message: PUBACK / PUBREC now
    /// [MQTT-4.3.2-2, MQTT-4.3.3-2].
    fn on_published(&mut self, pkid: PacketId, qos: QoS, result: Result<(), PublishFailed>) -> Result<(), End> {
        let qos2 = qos == QoS::ExactlyOnce;
        let ack = match result {
            Ok(()) => {
                self.inbound.accepted(pkid.get(), qos2);
                Ack::new(pkid)
            }
            Err(PublishFailed::Quota(detail)) => {
                // 5.0: 0x97 ends the flow. 3.1.1 has no refusal: a normal acknowledgement (so
                // the client does not resend forever) for a message that was dropped, counted.
                self.ctx.metrics.drop("retained_quota");
                let v5 = self.v5();
                self.inbound.accepted(pkid.get(), qos2 && !v5);
                let ack = if v5 {
                    let mut a = Ack::with_reason(pkid, ReasonCode::QuotaExceeded);
                    a.properties.reason_string = Some(detail.into());
                    a
                } else {
                    Ack::new(pkid)
                };
                self.send(if qos2 { Packet::PubRec(ack) } else { Packet::PubAck(ack) });
                return Ok(());
            }
            Err(PublishFailed::Failed(detail)) => {
                self.inbound.accepted(pkid.get(), false);
                if !self.v5() {
                    // 3.1.1 cannot refuse: close, and the client resends on reconnect.
                    return Err(End::Server { reason: ReasonCode::UnspecifiedError, detail });
                }
                let mut a = Ack::with_reason(pkid, ReasonCode::UnspecifiedError);
                a.properties.reason_string = Some(detail.into());
                a
            }
        };
        self.send(if qos2 { Packet::PubRec(ack) } else { Packet::PubAck(ack) });
        Ok(())
    }

    pub(super) fn on_pubrel(&mut self, a: Ack) -> Result<(), End> {
        let reason = if self.inbound.release(a.pkid.get()) {
            if self.session.persistent() {
                // PUBCOMP leaves only once the store forgot the id: were it sent first and the
                // write lost, the resumed session would hold the id as awaiting a PUBREL the
                // client — done with it — never sends: a resend of that id would be taken for
                // a duplicate, and such stale ids fill the Receive Maximum (found by the soak
                // on a Redis Cluster: clients disconnected with 0x93 on every reconnect).
                let (store, client_id, pkid) = (self.ctx.store.clone(), self.client_id.to_string(), a.pkid);
                self.ops.push_back(
                    async move {
                        let failed = store.write(vec![Op::ClearInbound { client_id, pkid: pkid.get() }]).await.err().map(|e| e.to_string());
                        OpDone::Cleared { pkid, failed }
                    }
                    .boxed(),
                );
                return Ok(());
            }
            ReasonCode::Success
        } else if self.v5() {
            // BAD-INPUT F.48.
            ReasonCode::PacketIdentifierNotFound
        } else {
            ReasonCode::Success
        };
        self.send(Packet::PubComp(Ack::with_reason(a.pkid, reason)));
        Ok(())
    }

    // === SUBSCRIBE / UNSUBSCRIBE ===

    async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let sub_id = s.properties.id();
        let mut items = Vec::with_capacity(s.filters.len());
        let mut reasons = Vec::with_capacity(s.filters.len());
        for (filter, options) in &s.filters {
            let Some((group, _)) = split_filter(filter, &self.ctx.limits.topic) else {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            };
            if group.is_some() && options.no_local {
                return Err(protocol_error(ReasonCode::ProtocolError, "No Local set on a shared subscription (MQTT-3.8.3-4)"));
            }
            if !self.ctx.settings.auth.allows(&self.identity, &self.client_id, Action::Subscribe, filter) {
                // 5.0: 0x87; 3.1.1: 0x80 Failure (the codec's 3.1.1 form of every error).
                self.ctx.metrics.acl_denied.get_or_create(&ReasonLabel { reason: "subscribe" }).inc();
                reasons.push(ReasonCode::NotAuthorized);
                continue;
            }
            let known = self.session.subscriptions.contains_key(filter);
            if !known && self.session.subscriptions.len() >= self.ctx.limits.max_subscriptions {
                self.ctx.metrics.limited.get_or_create(&ReasonLabel { reason: "max_subscriptions" }).inc();
                reasons.push(ReasonCode::QuotaExceeded);
                continue;
            }
            self.session.subscriptions.insert(
                filter.clone(),
                StoredSubscription {
                    filter: filter.to_string(),
                    qos: options.qos as u8,
                    no_local: options.no_local,
                    retain_as_published: options.retain_as_published,
                    retain_handling: options.retain_handling as u8,
                    subscription_id: sub_id,
                },
            );
            reasons.push(match options.qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
            items.push(SubscribeItem { filter: filter.clone(), options: *options, id: sub_id });
        }

        let session = SessionInfo { client_id: self.client_id.clone(), conn: Some(self.conn), persistent: self.session.persistent() };
        self.track_subscriptions();
        let mut replies = Vec::new();
        for t in self.ctx.shards.subscription_targets(&items) {
            let session = session.clone();
            let (items, deliver_retained) = (t.items, t.deliver_retained);
            let reply = t.link.start(|id| Request::Subscribe { id, session, items, deliver_retained }).await.map_err(link_down)?;
            replies.push(reply);
        }
        let save = self.record_op();
        let store = self.ctx.store.clone();
        let pkid = s.pkid;
        self.ops.push_back(
            async move {
                let mut retained = Vec::new();
                let mut failed = None;
                for r in join_all(replies).await {
                    match r {
                        Ok(Reply::Subscribed { retained: rt, .. }) => retained.extend(rt),
                        Ok(other) => failed = Some(format!("unexpected reply {other:?}")),
                        Err(e) => failed = Some(e.to_string()),
                    }
                }
                if let Some(op) = save {
                    if let Err(e) = store.write(vec![op]).await {
                        failed = Some(format!("subscription not saved: {e}"));
                    }
                }
                OpDone::Subscribed { pkid, reasons, retained, failed }
            }
            .boxed(),
        );
        Ok(())
    }

    async fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), End> {
        let mut removed = Vec::new();
        let mut reasons = Vec::with_capacity(u.filters.len());
        for filter in &u.filters {
            if split_filter(filter, &self.ctx.limits.topic).is_none() {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            let existed = self.session.subscriptions.contains_key(filter);
            reasons.push(if existed { ReasonCode::Success } else { ReasonCode::NoSubscriptionExisted });
            if existed {
                removed.push(filter.clone());
            }
        }
        let done = self.remove_subscriptions(removed).await?;
        let pkid = u.pkid;
        self.ops.push_back(async move { OpDone::Unsubscribed { pkid, reasons, failed: done.await } }.boxed());
        Ok(())
    }

    /// After an ACL reload: subscriptions it no longer allows are removed, as if unsubscribed
    /// (no packet tells the client; MQTT has none for this).
    pub(super) async fn recheck_subscriptions(&mut self) -> Result<(), End> {
        let auth = self.ctx.settings.auth.clone();
        let revoked: Vec<ByteString> = self
            .session
            .subscriptions
            .keys()
            .filter(|f| !auth.allows(&self.identity, &self.client_id, Action::Subscribe, f))
            .cloned()
            .collect();
        if revoked.is_empty() {
            return Ok(());
        }
        tracing::info!(filters = ?revoked, "subscriptions revoked by the reloaded ACL");
        self.ctx.metrics.acl_denied.get_or_create(&ReasonLabel { reason: "revoked" }).inc_by(revoked.len() as u64);
        let done = self.remove_subscriptions(revoked).await?;
        self.ops.push_back(async move { OpDone::Revoked { failed: done.await } }.boxed());
        Ok(())
    }

    /// Removes `filters` from the session and tells their shards; the future finishes once the
    /// shards and the store have the change, with what failed if anything did.
    async fn remove_subscriptions(&mut self, filters: Vec<ByteString>) -> Result<BoxFuture<'static, Option<String>>, End> {
        for f in &filters {
            self.session.subscriptions.remove(f);
        }
        self.track_subscriptions();
        let mut replies = Vec::new();
        if !filters.is_empty() {
            for link in self.ctx.shards.links_for(filters.iter()) {
                let (client_id, filters) = (self.client_id.clone(), filters.clone());
                replies.push(link.start(|id| Request::Unsubscribe { id, client_id, filters }).await.map_err(link_down)?);
            }
        }
        let save = self.record_op();
        let store = self.ctx.store.clone();
        Ok(async move {
            let mut failed = join_all(replies).await.into_iter().find_map(|r| r.err().map(|e| e.to_string()));
            if let Some(op) = save {
                if let Err(e) = store.write(vec![op]).await {
                    failed = Some(format!("subscription change not saved: {e}"));
                }
            }
            failed
        }
        .boxed())
    }

    /// Cluster: the registry keeps this connection's subscriptions, to re-send them to a
    /// shard that relinks.
    fn track_subscriptions(&self) {
        if self.ctx.cluster.is_some() {
            let session = SessionInfo { client_id: self.client_id.clone(), conn: Some(self.conn), persistent: self.session.persistent() };
            let items = self.session.subscriptions.values().map(crate::subscribe_item).collect();
            self.ctx.registry.set_subscriptions(self.conn, session, items);
        }
    }

    /// The session record as it is now, for persistent sessions.
    pub(super) fn record_op(&self) -> Option<Op> {
        self.session.persistent().then(|| Op::PutSession(self.record(true)))
    }

    pub(super) fn record(&self, connected: bool) -> SessionRecord {
        SessionRecord {
            client_id: self.client_id.to_string(),
            protocol_level: self.protocol.level(),
            expiry_interval: self.session.expiry,
            subscriptions: self.session.subscriptions.values().cloned().collect(),
            will: self.session.will.as_deref().map(crate::lifecycle::stored_will),
            epoch: self.session.epoch,
            connected,
            disconnected_at_ms: if connected { 0 } else { now_ms() },
        }
    }

    // === DISCONNECT ===

    fn on_disconnect(&mut self, d: Disconnect) -> End {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.session.expiry_zero_at_connect && expiry != 0 {
                // MQTT 5 §3.14.2.2.2.
                return protocol_error(ReasonCode::ProtocolError, "DISCONNECT sets a Session Expiry Interval after CONNECT set 0");
            }
            let cap = self.ctx.limits.max_session_expiry_secs;
            self.session.expiry = if cap > 0 { expiry.min(cap) } else { expiry };
        }
        tracing::debug!(reason = %d.reason, "client disconnected");
        End::Client { will: d.reason == ReasonCode::DisconnectWithWill }
    }
}

/// A valid filter as (share group, filter without the `$share/{group}/` prefix); `None` if the
/// filter or the shared-subscription syntax is invalid (MQTT 5 §4.7.1, §4.8.2).
fn split_filter<'a>(filter: &'a str, limits: &mqfleet_codec::topic::TopicLimits) -> Option<(Option<&'a str>, &'a str)> {
    let (group, inner) = match parse_shared(filter).ok()? {
        Some(sf) => (Some(sf.group), sf.filter),
        None => (None, filter),
    };
    validate_topic_filter(inner, limits).ok()?;
    Some((group, inner))
}

/// With a failure, every granted code becomes 0x80 Unspecified error.
fn failure_replaces(reasons: Vec<ReasonCode>, failed: &Option<String>) -> Vec<ReasonCode> {
    match failed {
        None => reasons,
        Some(f) => {
            tracing::warn!(error = %f, "subscription change failed");
            reasons.into_iter().map(|r| if r.is_error() { r } else { ReasonCode::UnspecifiedError }).collect()
        }
    }
}
